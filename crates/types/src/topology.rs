//! The RabbitMQ topology of notify, in one place. Both binaries call [`Topology::declare`] at
//! start; declaring is idempotent, and a queue that exists with other arguments is a clear error
//! naming the queue.
//!
//! For a prefix `notify` and the e-mail channel:
//! - `notify` (topic exchange): direct notifications are published with key `channel.email`;
//! - `notify.email`: the channel queue the worker consumes; dead-letters (reject, delivery
//!   limit) go to `notify.email.dead`;
//! - `notify.email.retry.<delay>`: one delay queue per retry tier; its TTL expiry dead-letters
//!   the message back to `notify.email`;
//! - `notify.email.dead`: messages that could not be delivered, with reason headers.

use crate::channel::Channel;
use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
    ExchangeKind,
};
use std::{fmt, str::FromStr, time::Duration};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated, supports a delivery limit and at-least-once dead-lettering. The default.
    Quorum,
    /// For single-node brokers that want the least overhead; no delivery limit.
    Classic,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

impl FromStr for QueueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            other => Err(format!("unknown queue type `{other}` (expected quorum or classic)")),
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(
        "queue `{queue}` already exists with other arguments: {detail}. Delete it (it must be \
         empty) or set QUEUE_TYPE / RETRY_SCHEDULE / the prefix to match how it was declared"
    )]
    Mismatch { queue: String, detail: String },
    #[error("declaring `{name}` failed: {source}")]
    Broker {
        name: String,
        #[source]
        source: lapin::Error,
    },
}

/// Names and shape of every exchange, queue and binding notify uses.
#[derive(Debug, Clone)]
pub struct Topology {
    pub prefix: String,
    pub queue_type: QueueType,
    /// Delay of each retry tier; attempt `n` (1-based) that fails waits `retry_delays[n-1]`
    /// (the last tier repeats).
    pub retry_delays: Vec<Duration>,
    /// Deliveries of one message before the broker dead-letters it (quorum queues only): the
    /// safety net for a message that kills workers.
    pub delivery_limit: u32,
    /// Event bindings: (event name, channel). The routing key is `event.<name>`.
    pub event_routes: Vec<(String, Channel)>,
}

impl Topology {
    pub fn new(prefix: impl Into<String>, queue_type: QueueType, retry_delays: Vec<Duration>) -> Self {
        Topology { prefix: prefix.into(), queue_type, retry_delays, delivery_limit: 10, event_routes: Vec::new() }
    }

    pub fn exchange(&self) -> String {
        self.prefix.clone()
    }

    pub fn queue(&self, channel: Channel) -> String {
        format!("{}.{}", self.prefix, channel)
    }

    pub fn dead_queue(&self, channel: Channel) -> String {
        format!("{}.{}.dead", self.prefix, channel)
    }

    /// Retry queues are named by their delay, so changing the schedule declares new queues
    /// instead of clashing with the old ones.
    pub fn retry_queue(&self, channel: Channel, delay: Duration) -> String {
        format!("{}.{}.retry.{}", self.prefix, channel, humantime::format_duration(delay))
    }

    pub fn retry_queues(&self, channel: Channel) -> Vec<String> {
        let mut names: Vec<String> = self.retry_delays.iter().map(|d| self.retry_queue(channel, *d)).collect();
        names.dedup();
        names
    }

    /// Every queue of a channel, channel queue first.
    pub fn queues(&self, channel: Channel) -> Vec<String> {
        let mut all = vec![self.queue(channel), self.dead_queue(channel)];
        all.extend(self.retry_queues(channel));
        all
    }

    /// Routing key of a direct notification for `channel`.
    pub fn direct_key(channel: Channel) -> String {
        format!("channel.{channel}")
    }

    /// Routing key of a business event.
    pub fn event_key(event: &str) -> String {
        format!("event.{event}")
    }

    /// The delay before attempt `next_attempt` (2-based: the first retry is attempt 2).
    pub fn delay_before(&self, next_attempt: u32) -> Duration {
        let idx = (next_attempt.saturating_sub(2) as usize).min(self.retry_delays.len().saturating_sub(1));
        self.retry_delays.get(idx).copied().unwrap_or(Duration::from_secs(1))
    }

    /// The tier whose delay is at least `min` (for `Retry-After`); the longest tier otherwise.
    pub fn delay_at_least(&self, min: Duration) -> Duration {
        let mut sorted = self.retry_delays.clone();
        sorted.sort();
        sorted.iter().copied().find(|d| *d >= min).or(sorted.last().copied()).unwrap_or(min)
    }

    fn base_args(&self) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("x-queue-type".into(), long_str(self.queue_type.as_str()));
        if self.queue_type == QueueType::Quorum {
            // Spread leaders over a cluster's nodes instead of placing every one on the node of
            // whichever client declared first (RabbitMQ 3.10+ and 4.x). A queue declared
            // before this argument existed keeps its place: see `declare_queue`.
            t.insert(LEADER_LOCATOR.into(), long_str("balanced"));
        }
        t
    }

    /// The readiness probe's queue: while the API's publishes keep failing it publishes a probe
    /// message here (confirmed), so it learns that the broker accepts again without waiting
    /// for a client's request. It holds at most one message.
    pub fn probe_queue(&self) -> String {
        format!("{}.probe", self.prefix)
    }

    /// Routing key of the readiness probe.
    pub const PROBE_KEY: &'static str = "probe";

    fn probe_args(&self) -> FieldTable {
        let mut args = self.base_args();
        args.insert("x-max-length".into(), AMQPValue::LongInt(1));
        args
    }

    fn dead_letter_to(&self, args: &mut FieldTable, target_queue: &str) {
        // Dead-letter through the default exchange straight into the target queue.
        args.insert("x-dead-letter-exchange".into(), long_str(""));
        args.insert("x-dead-letter-routing-key".into(), long_str(target_queue));
        if self.queue_type == QueueType::Quorum {
            // At-least-once dead-lettering needs reject-publish overflow; with it, a message
            // moves to the target only once the target confirmed it.
            args.insert("x-dead-letter-strategy".into(), long_str("at-least-once"));
            args.insert("x-overflow".into(), long_str("reject-publish"));
        }
    }

    /// Arguments of the channel queue.
    pub fn queue_args(&self, channel: Channel) -> FieldTable {
        let mut args = self.base_args();
        self.dead_letter_to(&mut args, &self.dead_queue(channel));
        if self.queue_type == QueueType::Quorum {
            args.insert("x-delivery-limit".into(), AMQPValue::LongInt(self.delivery_limit as i32));
        }
        args
    }

    pub fn retry_args(&self, channel: Channel, delay: Duration) -> FieldTable {
        let mut args = self.base_args();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay.as_millis() as i64));
        self.dead_letter_to(&mut args, &self.queue(channel));
        args
    }

    pub fn dead_args(&self) -> FieldTable {
        self.base_args()
    }

    /// Declares the exchange, every channel's queues and the bindings. Idempotent.
    pub async fn declare(&self, conn: &lapin::Connection) -> Result<(), TopologyError> {
        // A failed declaration closes its channel, so each step gets a fresh one when needed.
        let exchange = self.exchange();
        let mut ch = conn.create_channel().await.map_err(|e| broker(&exchange, e))?;
        ch.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .map_err(|e| broker(&exchange, e))?;

        for channel in Channel::ALL {
            declare_queue(conn, &mut ch, &self.dead_queue(channel), self.dead_args()).await?;
            let queue = self.queue(channel);
            declare_queue(conn, &mut ch, &queue, self.queue_args(channel)).await?;
            for delay in dedup(&self.retry_delays) {
                let name = self.retry_queue(channel, delay);
                declare_queue(conn, &mut ch, &name, self.retry_args(channel, delay)).await?;
            }
            let mut keys = vec![Self::direct_key(channel)];
            keys.extend(
                self.event_routes.iter().filter(|(_, c)| *c == channel).map(|(event, _)| Self::event_key(event)),
            );
            for key in keys {
                ch.queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| broker(&queue, e))?;
            }
        }
        let probe = self.probe_queue();
        declare_queue(conn, &mut ch, &probe, self.probe_args()).await?;
        ch.queue_bind(
            probe.as_str().into(),
            exchange.as_str().into(),
            Self::PROBE_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| broker(&probe, e))?;
        let _ = ch.close(200, "topology declared".into()).await;
        Ok(())
    }
}

fn dedup(delays: &[Duration]) -> Vec<Duration> {
    let mut out: Vec<Duration> = Vec::new();
    for d in delays {
        if !out.contains(d) {
            out.push(*d);
        }
    }
    out
}

const LEADER_LOCATOR: &str = "x-queue-leader-locator";

/// Declares one queue. A queue declared before notify set a leader locator differs only in
/// that argument (RabbitMQ refuses it as inequivalent): it is declared again without it, on a
/// fresh channel (the refusal closed `ch`), and keeps its place.
async fn declare_queue(
    conn: &lapin::Connection,
    ch: &mut lapin::Channel,
    name: &str,
    mut args: FieldTable,
) -> Result<(), TopologyError> {
    loop {
        let options = QueueDeclareOptions { durable: true, ..Default::default() };
        let Err(e) = ch.queue_declare(name.into(), options, args.clone()).await else {
            return Ok(());
        };
        let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
            return Err(broker(name, e));
        };
        if amqp.get_id() != 406 {
            return Err(broker(name, e));
        }
        let detail = amqp.get_message().to_string();
        let has_locator = args.inner().contains_key(LEADER_LOCATOR);
        if !(has_locator && detail.contains(LEADER_LOCATOR)) {
            return Err(TopologyError::Mismatch { queue: name.to_string(), detail });
        }
        tracing::debug!(queue = name, "declared before notify chose leader placement; keeping its place");
        let mut without = FieldTable::default();
        for (k, v) in args.inner().iter().filter(|(k, _)| k.as_str() != LEADER_LOCATOR) {
            without.insert(k.clone(), v.clone());
        }
        args = without;
        *ch = conn.create_channel().await.map_err(|e| broker(name, e))?;
    }
}

fn broker(name: &str, source: lapin::Error) -> TopologyError {
    TopologyError::Broker { name: name.to_string(), source }
}

fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// A short string for AMQP header keys and values.
pub fn short(s: &str) -> ShortString {
    ShortString::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo() -> Topology {
        Topology::new(
            "notify",
            QueueType::Quorum,
            vec![Duration::from_secs(1), Duration::from_secs(30), Duration::from_secs(300)],
        )
    }

    #[test]
    fn names_are_readable_in_the_management_ui() {
        let t = topo();
        assert_eq!(t.exchange(), "notify");
        assert_eq!(t.queue(Channel::Email), "notify.email");
        assert_eq!(t.dead_queue(Channel::InApp), "notify.in_app.dead");
        assert_eq!(t.retry_queue(Channel::Email, Duration::from_secs(300)), "notify.email.retry.5m");
        assert_eq!(t.retry_queue(Channel::Email, Duration::from_millis(50)), "notify.email.retry.50ms");
    }

    #[test]
    fn retry_tiers_follow_the_schedule_and_the_last_repeats() {
        let t = topo();
        assert_eq!(t.delay_before(2), Duration::from_secs(1));
        assert_eq!(t.delay_before(3), Duration::from_secs(30));
        assert_eq!(t.delay_before(4), Duration::from_secs(300));
        assert_eq!(t.delay_before(9), Duration::from_secs(300));
        assert_eq!(t.delay_at_least(Duration::from_secs(10)), Duration::from_secs(30));
        assert_eq!(t.delay_at_least(Duration::from_secs(3600)), Duration::from_secs(300));
    }
}
