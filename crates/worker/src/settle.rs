//! Acting on an [`Outcome`]: every path makes the message's fate safe in the broker (confirmed
//! publish) before acking the delivery, so a crash at any point redelivers instead of losing.

use crate::{outcome::DeadReason, Outcome};
use chrono::{SecondsFormat, Utc};
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties,
};
use notify_types::{
    broker::{header_u32, publish_confirmed, PublishError},
    headers, Channel, Topology,
};
use rand::Rng;
use std::time::Duration;

/// What happened to a delivery, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Delivered,
    Retrying {
        next_attempt: u32,
        delay: Duration,
        /// The delay tier (retry queue) it went to; `delay` is the tier's TTL less jitter.
        tier: Duration,
    },
    DeadLettered {
        reason: DeadReason,
    },
    /// The send guard had it as delivered: acked without sending.
    AlreadyDelivered,
    /// Our infrastructure failed; republished to a delay tier without counting an attempt.
    Deferred {
        delay: Duration,
    },
    /// The outcome could not be made safe (broker trouble): the message goes back to its queue.
    Requeued,
}

pub struct Settler {
    pub publish: lapin::Channel,
    pub topology: Topology,
    pub max_attempts: u32,
    pub jitter: f64,
    pub timeout: Duration,
}

const MAX_ERROR_LEN: usize = 512;

impl Settler {
    /// The outcome that will be acted on: a retry after the last attempt becomes a dead letter.
    pub fn decide(&self, attempt: u32, outcome: Outcome) -> Outcome {
        match outcome {
            Outcome::Retry { error, .. } if attempt >= self.max_attempts => {
                Outcome::Dead { reason: DeadReason::MaxAttempts, error }
            }
            other => other,
        }
    }

    pub async fn settle(&self, channel: Channel, delivery: &Delivery, attempt: u32, outcome: Outcome) -> Settled {
        let result = match self.decide(attempt, outcome) {
            Outcome::Delivered => Ok(Settled::Delivered),
            Outcome::AlreadyDelivered => {
                tracing::info!("already delivered (redelivery); acking without sending");
                Ok(Settled::AlreadyDelivered)
            }
            Outcome::Retry { error, after } => {
                let tier = match after {
                    Some(min) => self.topology.delay_at_least(min),
                    None => self.topology.delay_before(attempt + 1),
                };
                self.retry(channel, delivery, attempt + 1, tier, after, &error, &[]).await
            }
            Outcome::Defer { error } => {
                // Deferrals back off through the tiers on a count of their own, so a long
                // database outage does not spin every message at the first tier's rate.
                let (deferrals, tier) = self.next_deferral(delivery);
                self.retry(channel, delivery, attempt, tier, None, &error, &[(headers::DEFERRALS, deferrals)])
                    .await
                    .map(deferred)
            }
            Outcome::RecordLater { error } => {
                let (deferrals, tier) = self.next_deferral(delivery);
                let counters = [(headers::DEFERRALS, deferrals), (headers::SENT, 1)];
                self.retry(channel, delivery, attempt, tier, None, &error, &counters).await.map(deferred)
            }
            Outcome::Dead { reason, error } => {
                tracing::warn!(%error, reason = reason.as_str(), "dead-lettering");
                self.dead_letter(channel, delivery, attempt, reason, &error).await
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

    /// The deferral count this republish carries and its tier: deferrals back off through the
    /// tiers on a count of their own, apart from attempts.
    fn next_deferral(&self, delivery: &Delivery) -> (u32, Duration) {
        let deferrals = header_u32(&delivery.properties, headers::DEFERRALS).unwrap_or(0) + 1;
        (deferrals, self.topology.delay_before(deferrals + 1))
    }

    /// Republishes to the delay tier `tier`, carrying attempt number `next_attempt` (the same
    /// number for a deferral) and the given counter headers.
    #[allow(clippy::too_many_arguments)]
    async fn retry(
        &self,
        channel: Channel,
        delivery: &Delivery,
        next_attempt: u32,
        tier: Duration,
        after: Option<Duration>,
        error: &str,
        counters: &[(&str, u32)],
    ) -> Result<Settled, PublishError> {
        // The tier's TTL is the upper bound; jitter only shortens, and never below Retry-After.
        let shortest = after.unwrap_or_default().max(tier.mul_f64(1.0 - self.jitter)).min(tier);
        let delay = if shortest < tier { rand::rng().random_range(shortest..=tier) } else { tier };
        let queue = self.topology.retry_queue(channel, tier);
        let mut headers = headers_of(&delivery.properties);
        headers.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(next_attempt));
        headers.insert(headers::LAST_ERROR.into(), long(&shorten(error)));
        for (key, value) in counters {
            headers.insert((*key).into(), AMQPValue::LongUInt(*value));
        }
        let props = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_expiration(delay.as_millis().to_string().into());
        publish_confirmed(&self.publish, "", &queue, &delivery.data, props, self.timeout).await?;
        tracing::info!(next_attempt, delay_ms = delay.as_millis() as u64, %error, "retry scheduled");
        Ok(Settled::Retrying { next_attempt, delay, tier })
    }

    async fn dead_letter(
        &self,
        channel: Channel,
        delivery: &Delivery,
        attempt: u32,
        reason: DeadReason,
        error: &str,
    ) -> Result<Settled, PublishError> {
        let mut headers = headers_of(&delivery.properties);
        headers.insert(headers::DEAD_REASON.into(), long(reason.as_str()));
        headers.insert(headers::ATTEMPTS.into(), AMQPValue::LongUInt(attempt));
        headers.insert(headers::LAST_ERROR.into(), long(&shorten(error)));
        headers.insert(headers::DEAD_AT.into(), long(&Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)));
        headers.insert(headers::ORIGIN_QUEUE.into(), long(&self.topology.queue(channel)));
        let props = without_expiration(delivery.properties.clone()).with_headers(headers).with_delivery_mode(2);
        let queue = self.topology.dead_queue(channel);
        publish_confirmed(&self.publish, "", &queue, &delivery.data, props, self.timeout).await?;
        Ok(Settled::DeadLettered { reason })
    }
}

fn deferred(settled: Settled) -> Settled {
    match settled {
        Settled::Retrying { delay, .. } => Settled::Deferred { delay },
        other => other,
    }
}

/// Acks, noting when the ack could not be sent (dead channel): the broker will redeliver, and
/// the redelivery is harmless.
pub async fn ack(delivery: &Delivery) {
    match delivery.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!("ack not sent (channel closed); the message will be redelivered")
        }
        Err(e) => tracing::warn!(error = %e, "ack failed; the message will be redelivered"),
    }
}

fn headers_of(props: &BasicProperties) -> FieldTable {
    props.headers().clone().unwrap_or_default()
}

fn without_expiration(props: BasicProperties) -> BasicProperties {
    // BasicProperties has no "unset"; rebuild the fields we use.
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
    out
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn shorten(s: &str) -> String {
    if s.len() <= MAX_ERROR_LEN {
        return s.to_string();
    }
    let mut end = MAX_ERROR_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let s = "é".repeat(600);
        let short = shorten(&s);
        assert!(short.len() <= MAX_ERROR_LEN + '…'.len_utf8());
        assert!(short.ends_with('…'));
    }
}
