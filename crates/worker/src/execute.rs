//! Step 5 of `pipeline::process`: carries a [`Plan`] out, and only that — the I/O. A republish is
//! confirmed by the broker before the delivery is acked, so a crash at any point redelivers
//! instead of losing; when the republish fails the delivery is nacked back to its queue.

use crate::{
    outcome::Settled,
    plan::{Header, Plan},
};
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties,
};
use notify_types::{
    broker::{publish_confirmed, PublishError},
    headers::{DEAD_REASON, LAST_ERROR},
};
use std::time::Duration;

/// Publishes on a confirm-mode AMQP channel of its own connection (see `consumer`).
pub struct Executor {
    pub amqp_channel: lapin::Channel,
    pub timeout: Duration,
}

impl Executor {
    pub async fn execute(&self, delivery: &Delivery, plan: Plan) -> Settled {
        let result = match plan {
            Plan::Ack(settled) => {
                if settled == Settled::AlreadyDelivered {
                    tracing::info!("already delivered (redelivery); acking without sending");
                }
                Ok(settled)
            }
            Plan::Retry { queue, expiration, headers, settled } => {
                tracing::info!(%queue, delay_ms = expiration.as_millis() as u64, error = text(&headers, LAST_ERROR), "retry scheduled");
                let props = with_headers(delivery.properties.clone(), headers)
                    .with_expiration(expiration.as_millis().to_string().into());
                self.publish(&queue, delivery, props).await.map(|()| settled)
            }
            Plan::DeadLetter { queue, headers, settled } => {
                tracing::warn!(
                    reason = text(&headers, DEAD_REASON),
                    error = text(&headers, LAST_ERROR),
                    "dead-lettering"
                );
                // A dead letter keeps no expiration: it waits until an operator acts on it.
                let props = with_headers(without_expiration(&delivery.properties), headers);
                self.publish(&queue, delivery, props).await.map(|()| settled)
            }
        };
        match result {
            Ok(settled) => {
                ack(delivery).await;
                settled
            }
            Err(e) => {
                // Not acked: the message must come back. Nack (not reject) so that broker
                // trouble does not count toward the poison-message delivery limit on 4.3+.
                tracing::warn!(error = %e, "could not republish; returning the message to its queue");
                let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                Settled::Requeued
            }
        }
    }

    async fn publish(&self, queue: &str, delivery: &Delivery, props: BasicProperties) -> Result<(), PublishError> {
        publish_confirmed(&self.amqp_channel, "", queue, &delivery.data, props, self.timeout).await
    }
}

/// Acks, noting when the ack could not be sent (dead channel): the broker will redeliver, and
/// the redelivery is harmless.
pub async fn ack(delivery: &Delivery) {
    match delivery.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!("ack not sent (channel closed); the message will be redelivered"),
        Err(e) => tracing::warn!(error = %e, "ack failed; the message will be redelivered"),
    }
}

/// The message's own headers with the plan's set on top; persistent.
fn with_headers(props: BasicProperties, set: Vec<(&'static str, Header)>) -> BasicProperties {
    let mut headers: FieldTable = props.headers().clone().unwrap_or_default();
    for (key, value) in set {
        let value = match value {
            Header::U32(v) => AMQPValue::LongUInt(v),
            Header::Text(s) => AMQPValue::LongString(LongString::from(s)),
        };
        headers.insert(key.into(), value);
    }
    props.with_headers(headers).with_delivery_mode(2)
}

/// A text header of the plan, for the log line.
fn text<'a>(headers: &'a [(&'static str, Header)], key: &str) -> &'a str {
    match headers.iter().find(|(k, _)| *k == key) {
        Some((_, Header::Text(s))) => s,
        _ => "",
    }
}

/// The properties without `expiration` (BasicProperties has no "unset": the fields notify
/// uses are copied; headers are set by the caller).
fn without_expiration(props: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = props.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = props.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = props.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = props.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(h) = props.headers() {
        out = out.with_headers(h.clone());
    }
    out
}
