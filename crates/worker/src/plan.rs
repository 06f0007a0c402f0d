//! Step 4 of `pipeline::process`: what to do with the message in the broker, decided by one
//! pure function from what was received and what the attempt came to. No I/O, no clock and no
//! randomness of its own (both are passed in), so every rule here is unit-tested without a
//! broker. `execute` carries the plan out.

use crate::{
    outcome::{Outcome, Settled},
    received::Received,
};
use chrono::{DateTime, SecondsFormat, Utc};
use notify_types::{headers, Topology};
use rand::Rng;
use std::time::Duration;

/// Longest `x-notify-last-error` carried in a header.
pub const MAX_ERROR_LEN: usize = 512;

/// The retry rules: the delay tiers (from the topology), attempts and jitter.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub topology: Topology,
    /// Attempts including the first; then the message is dead-lettered.
    pub max_attempts: u32,
    /// Fraction (0..1) by which a retry delay is randomly shortened.
    pub jitter: f64,
}

/// A header value the plan sets on the message it republishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    U32(u32),
    Text(String),
}

/// What the executor does with the delivery. Every variant ends with the delivery acked, and
/// nothing is acked before the republish it depends on is confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to publish.
    Ack(Settled),
    /// Publish a copy to `queue` (a delay tier), expiring after `expiration`, then ack.
    Retry { queue: String, expiration: Duration, headers: Vec<(&'static str, Header)>, settled: Settled },
    /// Publish a copy to the channel's dead-letter queue (no expiration), then ack.
    DeadLetter { queue: String, headers: Vec<(&'static str, Header)>, settled: Settled },
}

/// The plan for a message that was `received` and whose attempt came to `outcome`.
pub fn plan(
    received: &Received,
    outcome: Outcome,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
    rng: &mut impl Rng,
) -> Plan {
    let channel = received.channel;
    let topology = &policy.topology;
    match outcome.exhausted_if(received.last_attempt) {
        Outcome::Delivered => Plan::Ack(Settled::Delivered),
        Outcome::AlreadyDelivered => Plan::Ack(Settled::AlreadyDelivered),
        Outcome::Retry { error, after } => {
            let next_attempt = received.attempt + 1;
            let tier = match after {
                Some(min) => topology.delay_at_least(min),
                None => topology.delay_before(next_attempt),
            };
            let delay = jittered(tier, after, policy.jitter, rng);
            Plan::Retry {
                queue: topology.retry_queue(channel, tier),
                expiration: delay,
                headers: vec![(headers::ATTEMPT, Header::U32(next_attempt)), last_error(&error)],
                settled: Settled::Retrying { next_attempt, delay, tier },
            }
        }
        // Our infrastructure failed: the same attempt again later. Deferrals back off through
        // the tiers on a count of their own, so a long database outage does not spin every
        // message at the first tier's rate.
        Outcome::Defer { error } => deferral(received, &error, policy, rng, false),
        // Sent, not recorded: come back only to record, marked so it is never sent again.
        Outcome::RecordLater { error } => deferral(received, &error, policy, rng, true),
        Outcome::Dead { reason, error } => Plan::DeadLetter {
            queue: topology.dead_queue(channel),
            headers: vec![
                (headers::DEAD_REASON, Header::Text(reason.as_str().into())),
                (headers::ATTEMPTS, Header::U32(received.attempt)),
                last_error(&error),
                (headers::DEAD_AT, Header::Text(now.to_rfc3339_opts(SecondsFormat::Millis, true))),
                (headers::ORIGIN_QUEUE, Header::Text(topology.queue(channel))),
            ],
            settled: Settled::DeadLettered { reason },
        },
    }
}

fn deferral(received: &Received, error: &str, policy: &RetryPolicy, rng: &mut impl Rng, sent: bool) -> Plan {
    let deferrals = received.deferrals + 1;
    let tier = policy.topology.delay_before(deferrals + 1);
    let delay = jittered(tier, None, policy.jitter, rng);
    let mut headers = vec![
        (headers::ATTEMPT, Header::U32(received.attempt)),
        last_error(error),
        (headers::DEFERRALS, Header::U32(deferrals)),
    ];
    if sent || received.sent {
        headers.push((headers::SENT, Header::U32(1)));
    }
    Plan::Retry {
        queue: policy.topology.retry_queue(received.channel, tier),
        expiration: delay,
        headers,
        settled: Settled::Deferred { delay },
    }
}

/// The tier's TTL is the upper bound; jitter only shortens it, and never below Retry-After.
fn jittered(tier: Duration, after: Option<Duration>, jitter: f64, rng: &mut impl Rng) -> Duration {
    let shortest = after.unwrap_or_default().max(tier.mul_f64(1.0 - jitter)).min(tier);
    if shortest < tier {
        rng.random_range(shortest..=tier)
    } else {
        tier
    }
}

fn last_error(error: &str) -> (&'static str, Header) {
    (headers::LAST_ERROR, Header::Text(shorten(error)))
}

/// Cuts an error to [`MAX_ERROR_LEN`] bytes on a char boundary.
pub fn shorten(s: &str) -> String {
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
#[path = "plan_tests.rs"]
mod tests;
