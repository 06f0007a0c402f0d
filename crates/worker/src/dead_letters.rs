//! The dead-letter indexer: consumes the worker's channels' `<prefix>.<channel>.dead` queues
//! (still the broker's dead-letter target) and stores every message in PostgreSQL, where
//! operators list, filter, replay and discard them (`/api/v1/dead-letters`, `notify-admin`).
//!
//! A message is acked only after its row committed. While PostgreSQL is down the indexer holds
//! the message it has (unacked, retrying the insert with a backoff) and takes no other: nothing
//! leaves the dead queue before it is stored. A message delivered twice (the indexer died
//! between the commit and the ack) is one row: the insert is keyed by the message's fingerprint.

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties,
};
use notify_store::{NewDeadLetter, Store};
use notify_types::{
    broker::{header_str, header_u32, Failover, UrlOrder},
    headers, Channel, Envelope, Topology,
};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Dead messages taken at once: inserts are one at a time, a few in flight keep it busy.
const PREFETCH: u16 = 32;
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where the indexer connects and what it consumes.
pub struct Indexer {
    pub rabbitmq_url: String,
    pub url_order: UrlOrder,
    pub topology: Topology,
    pub channels: Vec<Channel>,
    pub store: Store,
}

impl Indexer {
    /// Runs until `shutdown`: connects (every node of `RABBITMQ_URL` in turn, then backs off),
    /// consumes the dead queues and indexes what arrives; reconnects after broker loss.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failover = Failover::with_order(&self.rabbitmq_url, self.url_order);
        while !shutdown.is_cancelled() {
            let conn = match failover.connect("notify-worker-dead-letters", CONNECT_TIMEOUT).await {
                Ok((conn, _)) => conn,
                Err(e) => {
                    let wait = failover.backoff();
                    // The consumers' loop warns about the same broker, once per attempt.
                    tracing::debug!(error = %e, retry_in_ms = wait.as_millis() as u64, "dead-letter indexer cannot reach RabbitMQ");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    continue;
                }
            };
            if let Err(e) = self.consume(&conn, &shutdown).await {
                // E.g. the dead queues are not declared yet (the consumers declare them).
                tracing::warn!(error = %e, "dead-letter indexer lost its channel; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "dead-letter indexer stopped".into()))
                .await;
        }
    }

    async fn consume(&self, conn: &lapin::Connection, shutdown: &CancellationToken) -> anyhow::Result<()> {
        // The consumers declare the topology too; declaring it here as well (idempotent) means
        // the dead queues exist whichever connects first. A mismatch is the consumers' error to
        // report: without the queues there is nothing to consume, so wait and try again.
        self.topology.declare(conn).await?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let mut streams = Vec::new();
        for &channel in &self.channels {
            let queue = self.topology.dead_queue(channel);
            let tag = format!("notify-dead-letters-{channel}-{}", Uuid::now_v7().simple());
            let consumer = ch
                .basic_consume(
                    queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            streams.push(consumer.map(move |d| (channel, d)));
        }
        let mut all = futures_util::stream::select_all(streams);
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                next = all.next() => next,
            };
            match next {
                Some((channel, Ok(delivery))) => {
                    if !self.index(channel, &delivery, shutdown).await {
                        break;
                    }
                }
                Some((_, Err(e))) => return Err(e.into()),
                None => break,
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), ch.close(200, "dead-letter indexer stopped".into())).await;
        Ok(())
    }

    /// Stores one dead message, retrying while PostgreSQL is unavailable, then acks. `false`
    /// when shutdown came first (the message stays unacked and returns to the queue).
    async fn index(&self, channel: Channel, delivery: &Delivery, shutdown: &CancellationToken) -> bool {
        let letter = read(channel, delivery);
        let mut wait = Duration::from_millis(200);
        loop {
            match self.store.insert_dead_letter(&letter).await {
                Ok(inserted) => {
                    tracing::info!(
                        %channel,
                        reason = %letter.reason,
                        notification_id = ?letter.notification_id,
                        new = inserted,
                        "dead letter indexed"
                    );
                    crate::execute::ack(delivery).await;
                    return true;
                }
                Err(e) => {
                    // Unavailable or not, the row is not stored: the message must stay.
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot store a dead letter; keeping it in the queue");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => return false,
                    }
                    wait = (wait * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// What a dead message says about itself: our own headers when a worker dead-lettered it, the
/// broker's `x-death` when the broker did (delivery limit, reject).
pub fn read(channel: Channel, delivery: &Delivery) -> NewDeadLetter {
    let props = &delivery.properties;
    let envelope = Envelope::from_bytes(&delivery.data).ok();
    let death = first_death(props);
    let reason = header_str(props, headers::DEAD_REASON)
        .or_else(|| death.as_ref().and_then(|d| table_str(d, "reason")))
        .unwrap_or_else(|| "unknown".into());
    let last_error = header_str(props, headers::LAST_ERROR).or_else(|| {
        death.as_ref().map(|d| {
            let queue = table_str(d, "queue").unwrap_or_default();
            format!("dead-lettered by RabbitMQ: {reason} (queue {queue})")
        })
    });
    let attempts = header_u32(props, headers::ATTEMPTS).or_else(|| header_u32(props, headers::ATTEMPT)).unwrap_or(0);
    let dead_at = header_str(props, headers::DEAD_AT)
        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok().map(|t| t.with_timezone(&Utc)))
        .or_else(|| death.as_ref().and_then(death_time))
        .unwrap_or_else(Utc::now);
    // Without the quorum queue's redelivery counter: a redelivered dead message must hash the
    // same as its first delivery.
    let header_json: serde_json::Map<String, serde_json::Value> = props
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter(|(k, _)| k.as_str() != "x-delivery-count")
                .map(|(k, v)| (k.to_string(), json_of(v)))
                .collect()
        })
        .unwrap_or_default();
    let properties = serde_json::json!({
        "message_id": props.message_id().as_ref().map(|v| v.to_string()),
        "correlation_id": props.correlation_id().as_ref().map(|v| v.to_string()),
        "content_type": props.content_type().as_ref().map(|v| v.to_string()),
        "type": props.kind().as_ref().map(|v| v.to_string()),
        "timestamp": props.timestamp(),
        "headers": header_json,
    });
    let mut hash = Sha256::new();
    hash.update(channel.as_str());
    hash.update([0]);
    hash.update(serde_json::to_vec(&properties).unwrap_or_default());
    hash.update([0]);
    hash.update(&delivery.data);
    NewDeadLetter {
        fingerprint: hex(&hash.finalize()),
        notification_id: envelope.as_ref().map(|e| e.id),
        channel: channel.as_str().to_string(),
        event: envelope.as_ref().and_then(|e| e.event.clone()),
        reason,
        attempts: attempts.min(i32::MAX as u32) as i32,
        last_error,
        dead_at,
        body: delivery.data.clone(),
        properties,
        replays: header_u32(props, headers::REPLAYS).unwrap_or(0).min(i32::MAX as u32) as i32,
    }
}

/// The newest `x-death` entry (RabbitMQ puts the latest dead-lettering first).
fn first_death(props: &BasicProperties) -> Option<FieldTable> {
    match props.headers().as_ref()?.inner().get("x-death")? {
        AMQPValue::FieldArray(a) => a.as_slice().iter().find_map(|v| match v {
            AMQPValue::FieldTable(t) => Some(t.clone()),
            _ => None,
        }),
        _ => None,
    }
}

fn table_str(t: &FieldTable, key: &str) -> Option<String> {
    match t.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn death_time(t: &FieldTable) -> Option<DateTime<Utc>> {
    match t.inner().get("time")? {
        AMQPValue::Timestamp(secs) => DateTime::from_timestamp(i64::try_from(*secs).ok()?, 0),
        _ => None,
    }
}

/// Headers as plain JSON for the operator: strings as strings, numbers as numbers.
fn json_of(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => (*n).into(),
        AMQPValue::Float(f) => serde_json::json!(f),
        AMQPValue::Double(f) => serde_json::json!(f),
        AMQPValue::ShortString(s) => Value::String(s.to_string()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(json_of).collect()),
        AMQPValue::FieldTable(t) => Value::Object(t.inner().iter().map(|(k, v)| (k.to_string(), json_of(v))).collect()),
        AMQPValue::ByteArray(b) => Value::String(hex(b.as_slice())),
        AMQPValue::DecimalValue(_) | AMQPValue::Void => Value::Null,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
