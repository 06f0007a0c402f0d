//! Connecting to RabbitMQ and publishing with confirms, shared by the API and the worker.

use crate::{headers, Envelope};
use lapin::{
    options::BasicPublishOptions,
    types::{AMQPValue, FieldTable, ShortString},
    BasicProperties, Confirmation, Connection, ConnectionProperties,
};
use std::time::Duration;

/// Heartbeat asked for when the URL does not set one: a dead peer is noticed within ~20 s.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker did not confirm the publish within {0:?}")]
    Timeout(Duration),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no queue is bound for routing key `{routing_key}` on exchange `{exchange}` (message returned: {reply})")]
    Unroutable { exchange: String, routing_key: String, reply: String },
    #[error("publisher confirms are not enabled on this channel")]
    NotConfirmed,
    #[error("the broker blocked publishers (resource alarm)")]
    Blocked,
    #[error("not connected to the broker")]
    NotConnected,
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
}

impl PublishError {
    /// Unroutable means the topology is wrong: retrying will not help.
    pub fn is_unroutable(&self) -> bool {
        matches!(self, PublishError::Unroutable { .. })
    }
}

/// Adds `heartbeat=10` to an AMQP URL that does not choose its own.
pub fn with_default_heartbeat(url: &str) -> String {
    if url.contains("heartbeat=") {
        return url.to_string();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}heartbeat={DEFAULT_HEARTBEAT_SECS}")
}

/// The URLs of a `RABBITMQ_URL` value: one, or several nodes of one cluster separated by commas.
pub fn split_urls(raw: &str) -> Vec<String> {
    raw.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_string).collect()
}

/// Where to connect next, for both binaries' reconnect loops: the nodes of `RABBITMQ_URL` in
/// turn, the first one picked at random (so many clients spread over a cluster); after a loss
/// the other nodes are tried at once, the lost one last; only when every node failed does the
/// caller wait, for [`Failover::backoff`] (200 ms doubling to 5 s, reset by a connection).
#[derive(Debug, Clone)]
pub struct Failover {
    urls: Vec<String>,
    next: usize,
    backoff: Duration,
}

/// First and longest wait between rounds of connection attempts.
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Which node of `RABBITMQ_URL` a client connects to first (`RABBITMQ_URL_ORDER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UrlOrder {
    /// A random one: many clients spread over the cluster. The default.
    #[default]
    Random,
    /// The first listed (e.g. a node close by); the others only after it failed.
    Listed,
}

impl std::str::FromStr for UrlOrder {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "random" => Ok(UrlOrder::Random),
            "listed" => Ok(UrlOrder::Listed),
            other => Err(format!("unknown order `{other}` (expected random or listed)")),
        }
    }
}

impl Failover {
    /// `list`: a `RABBITMQ_URL` value (validated by `config::amqp_url`), first node at random.
    pub fn new(list: &str) -> Failover {
        Failover::with_order(list, UrlOrder::Random)
    }

    pub fn with_order(list: &str, order: UrlOrder) -> Failover {
        let urls = split_urls(list);
        let next = match order {
            UrlOrder::Random if urls.len() > 1 => rand::random_range(0..urls.len()),
            _ => 0,
        };
        Failover { urls, next, backoff: BACKOFF_START }
    }

    /// Connects to the first node that answers, trying each once, starting with the next one in
    /// turn. On success the node after it becomes the next, and the backoff is reset. The error
    /// is the last node's; every failure is logged at debug with the node's redacted URL.
    pub async fn connect(&mut self, name: &str, timeout: Duration) -> Result<(Connection, String), lapin::Error> {
        let mut last = None;
        for _ in 0..self.urls.len().max(1) {
            let i = self.next % self.urls.len().max(1);
            self.next = i + 1;
            let url = self.urls.get(i).map(String::as_str).unwrap_or("");
            match connect(url, name, timeout).await {
                Ok(conn) => {
                    self.backoff = BACKOFF_START;
                    return Ok((conn, crate::config::redact_url(url)));
                }
                Err(e) => {
                    tracing::debug!(broker = %crate::config::redact_url(url), error = %e, "RabbitMQ node unreachable");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed))
        }))
    }

    /// A second connection, to the node of the last one if it answers (else the round goes on):
    /// a client whose connections sit on one node is disturbed only by that node's loss.
    pub async fn connect_beside(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<(Connection, String), lapin::Error> {
        self.next = self.next.checked_sub(1).unwrap_or(self.urls.len().saturating_sub(1));
        self.connect(name, timeout).await
    }

    /// How long to wait before the next round, doubling each time it is asked.
    pub fn backoff(&mut self) -> Duration {
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        wait
    }

    /// The nodes, passwords redacted, for logs.
    pub fn describe(&self) -> String {
        crate::config::redact_url(&self.urls.join(","))
    }
}

/// Opens a connection named `name` (shown in the management UI), bounded by `timeout`.
pub async fn connect(url: &str, name: &str, timeout: Duration) -> Result<Connection, lapin::Error> {
    let url = with_default_heartbeat(url);
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(timeout, Connection::connect(&url, props)).await {
        Ok(result) => result,
        Err(_) => Err(lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connecting to RabbitMQ timed out",
        ))))),
    }
}

/// AMQP properties of an envelope: persistent, `message_id` = notification id.
pub fn envelope_properties(env: &Envelope, attempt: u32) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(attempt));
    BasicProperties::default()
        .with_message_id(env.id.to_string().into())
        .with_correlation_id(env.correlation_id.as_str().into())
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_timestamp(env.created_at.timestamp().max(0) as u64)
        .with_type(env.kind.as_str().into())
        .with_headers(headers)
}

/// `props` with one more string header (e.g. [`headers::TRACEPARENT`]).
pub fn with_header(props: BasicProperties, key: &str, value: &str) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(key.into(), AMQPValue::LongString(value.into()));
    props.with_headers(headers)
}

/// Publishes with `mandatory` and waits for the broker's confirm, bounded by `timeout`.
/// Success only for an ack with nothing returned.
pub async fn publish_confirmed(
    ch: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    properties: BasicProperties,
    timeout: Duration,
) -> Result<(), PublishError> {
    let work = async {
        let confirm = ch
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                payload,
                properties,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => Err(PublishError::Unroutable {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
                reply: returned.reply_text.to_string(),
            }),
            Confirmation::Nack(None) => Err(PublishError::Nacked),
            Confirmation::NotRequested => Err(PublishError::NotConfirmed),
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(PublishError::Timeout(timeout)),
    }
}

/// Reads an integer header whatever integer type the publisher used.
pub fn header_u32(props: &BasicProperties, key: &str) -> Option<u32> {
    let value = props.headers().as_ref()?.inner().get(key)?.clone();
    match value {
        AMQPValue::ShortShortUInt(v) => Some(v as u32),
        AMQPValue::ShortUInt(v) => Some(v as u32),
        AMQPValue::LongUInt(v) => Some(v),
        AMQPValue::ShortShortInt(v) => u32::try_from(v).ok(),
        AMQPValue::ShortInt(v) => u32::try_from(v).ok(),
        AMQPValue::LongInt(v) => u32::try_from(v).ok(),
        AMQPValue::LongLongInt(v) => u32::try_from(v).ok(),
        _ => None,
    }
}

/// Reads a string header.
pub fn header_str(props: &BasicProperties, key: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_tries_every_node_in_turn_from_a_random_one() {
        let list = "amqp://a:1/%2f, amqp://b:2/%2f ,amqp://c:3/%2f";
        assert_eq!(split_urls(list), ["amqp://a:1/%2f", "amqp://b:2/%2f", "amqp://c:3/%2f"]);
        let starts: std::collections::HashSet<usize> = (0..64).map(|_| Failover::new(list).next).collect();
        assert_eq!(starts.len(), 3, "clients spread over the nodes");
        assert!((0..16).all(|_| Failover::with_order(list, UrlOrder::Listed).next == 0));
        assert_eq!("Listed".parse::<UrlOrder>(), Ok(UrlOrder::Listed));
        assert!("first".parse::<UrlOrder>().is_err());
        let mut f = Failover::new(list);
        let waits: Vec<u128> = (0..7).map(|_| f.backoff().as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[tokio::test]
    async fn failover_reaches_the_node_that_answers() {
        // Two closed ports: every node is tried once, each refused at once, and the round ends.
        let dead = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (d1, d2) = (dead(), dead());
        let mut f = Failover::new(&format!("amqp://127.0.0.1:{d1}/%2f,amqp://127.0.0.1:{d2}/%2f"));
        let started = std::time::Instant::now();
        assert!(f.connect("t", Duration::from_secs(2)).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(2), "refused nodes fail fast");
    }

    #[test]
    fn heartbeat_is_added_only_when_missing() {
        assert_eq!(with_default_heartbeat("amqp://h:5672/%2f"), "amqp://h:5672/%2f?heartbeat=10");
        assert_eq!(with_default_heartbeat("amqp://h/%2f?frame_max=8192"), "amqp://h/%2f?frame_max=8192&heartbeat=10");
        assert_eq!(with_default_heartbeat("amqp://h/?heartbeat=5"), "amqp://h/?heartbeat=5");
    }
}
