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
    fn heartbeat_is_added_only_when_missing() {
        assert_eq!(with_default_heartbeat("amqp://h:5672/%2f"), "amqp://h:5672/%2f?heartbeat=10");
        assert_eq!(with_default_heartbeat("amqp://h/%2f?frame_max=8192"), "amqp://h/%2f?frame_max=8192&heartbeat=10");
        assert_eq!(with_default_heartbeat("amqp://h/?heartbeat=5"), "amqp://h/?heartbeat=5");
    }
}
