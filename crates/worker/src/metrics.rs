//! What the worker counts, in one place. The pipeline calls [`delivery`] once per settled
//! delivery (its report step), so every counter moves exactly once per delivery; the gauges
//! are sampled: in-flight by a guard around each delivery, dead letters by a passive declare on
//! a timer, the SMTP pool when `/metrics` is scraped.
//!
//! Labels carry only bounded, non-personal values: the channel, the outcome, the retry tier of
//! the configured schedule, the SMTP pool state. Never an id, an address or a key.

use crate::outcome::Settled;
use chrono::{DateTime, Utc};
use lapin::{options::QueueDeclareOptions, types::FieldTable};
use metrics::{Counter, Gauge, Histogram};
use notify_types::{Channel, Topology};
use std::{sync::OnceLock, time::Duration};

pub const DELIVERIES: &str = "notify_worker_deliveries_total";
pub const DELIVERY_DURATION: &str = "notify_worker_delivery_duration_seconds";
pub const END_TO_END: &str = "notify_worker_end_to_end_seconds";
pub const IN_FLIGHT: &str = "notify_worker_in_flight";
pub const RETRIES: &str = "notify_worker_retries_total";
pub const DEAD_LETTERS: &str = "notify_dead_letters";
pub const SMTP_CONNECTIONS: &str = "notify_worker_smtp_connections";

/// The `outcome` label of a settled delivery.
pub fn outcome(settled: &Settled) -> &'static str {
    match settled {
        Settled::Delivered => "delivered",
        Settled::Retrying { .. } => "retry",
        Settled::DeadLettered { .. } => "dead",
        Settled::Deferred { .. } => "deferred",
        Settled::AlreadyDelivered => "duplicate",
        // Broker trouble: nothing was settled, the message went back to its queue.
        Settled::Requeued => "requeued",
    }
}

const OUTCOMES: [&str; 6] = ["delivered", "retry", "dead", "deferred", "duplicate", "requeued"];

/// Handles of the per-channel series, registered once: recording is then an atomic add, with
/// no label hashing or registry lookup per delivery.
struct Series {
    deliveries: [Counter; OUTCOMES.len()],
    duration: Histogram,
    end_to_end: Histogram,
    in_flight: Gauge,
}

fn series(channel: Channel) -> &'static Series {
    static ALL: OnceLock<[Series; 3]> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        // The recorder must exist before handles are taken, or they would record nowhere.
        notify_types::metrics::prometheus();
        Channel::ALL.map(|c| Series {
            deliveries: OUTCOMES.map(|o| metrics::counter!(DELIVERIES, "channel" => c.as_str(), "outcome" => o)),
            duration: metrics::histogram!(DELIVERY_DURATION, "channel" => c.as_str()),
            end_to_end: metrics::histogram!(END_TO_END, "channel" => c.as_str()),
            in_flight: metrics::gauge!(IN_FLIGHT, "channel" => c.as_str()),
        })
    });
    &all[Channel::ALL.iter().position(|c| *c == channel).expect("Channel::ALL lists every channel")]
}

/// Describes the metrics (the `# HELP` lines) and registers every per-channel series at zero,
/// so a scrape before the first delivery already shows them (a rate over a series that
/// appears only later misses its first increments).
pub fn init() {
    notify_types::metrics::prometheus();
    metrics::describe_counter!(
        DELIVERIES,
        "Settled deliveries by channel and outcome (delivered, retry, dead, deferred, duplicate, requeued)."
    );
    metrics::describe_histogram!(
        DELIVERY_DURATION,
        metrics::Unit::Seconds,
        "One delivery attempt: send, record and settle."
    );
    metrics::describe_histogram!(
        END_TO_END,
        metrics::Unit::Seconds,
        "From the API's acceptance (created_at) to delivered."
    );
    metrics::describe_gauge!(IN_FLIGHT, "Deliveries being worked on now.");
    metrics::describe_counter!(RETRIES, "Retries scheduled, by delay tier.");
    metrics::describe_gauge!(DEAD_LETTERS, "Dead letters waiting: still in the dead-letter queue, plus those stored in PostgreSQL with status dead (sampled on a timer).");
    metrics::describe_gauge!(SMTP_CONNECTIONS, "SMTP pool: conversations reserved (in_use) and open connections idle.");
    metrics::describe_histogram!(
        "notify_store_group_commit_batch_size",
        "Writes carried by one group-commit round of the send guard."
    );
    for channel in Channel::ALL {
        series(channel);
    }
}

/// Records one settled delivery: its outcome, how long the attempt took (send, record and
/// settle), for a delivered message the time since the API accepted it (`created_at`, unknown
/// for a message that could not be read), and for a retry its tier.
pub fn delivery(channel: Channel, settled: &Settled, elapsed: Duration, created_at: Option<DateTime<Utc>>) {
    let s = series(channel);
    let label = outcome(settled);
    let i = OUTCOMES.iter().position(|o| *o == label).expect("OUTCOMES lists every outcome");
    s.deliveries[i].increment(1);
    s.duration.record(elapsed.as_secs_f64());
    match settled {
        Settled::Delivered => {
            if let Some(created_at) = created_at {
                // Clocks of two machines: a negative span is skew, not time travel.
                let since = (Utc::now() - created_at).to_std().unwrap_or_default();
                s.end_to_end.record(since.as_secs_f64());
            }
        }
        Settled::Retrying { tier, .. } => {
            let tier = humantime::format_duration(*tier).to_string();
            metrics::counter!(RETRIES, "channel" => channel.as_str(), "tier" => tier).increment(1);
        }
        _ => {}
    }
}

/// Counts one delivery in flight until dropped.
pub struct InFlight(&'static Gauge);

pub fn in_flight(channel: Channel) -> InFlight {
    let gauge = &series(channel).in_flight;
    gauge.increment(1.0);
    InFlight(gauge)
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The SMTP pool: conversations reserved by deliveries, and open connections waiting idle.
pub fn smtp_pool(in_use: usize, idle: usize) {
    metrics::gauge!(SMTP_CONNECTIONS, "state" => "in_use").set(in_use as f64);
    metrics::gauge!(SMTP_CONNECTIONS, "state" => "idle").set(idle as f64);
}

/// Every `interval` (`WORKER_DEAD_LETTER_INTERVAL`), sets `notify_dead_letters{channel}` to the ready messages
/// of each channel's dead-letter queue (a passive declare on `ch`: quorum queue counts from
/// `rabbitmqctl` lag by seconds, this does not). Never returns: the session drops it when it
/// ends, and the next session starts another on its own channel.
pub async fn watch_dead_letters(
    ch: &lapin::Channel,
    topology: &Topology,
    channels: &[Channel],
    interval: Duration,
    indexed: Option<&notify_store::Store>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for &channel in channels {
            let queue = topology.dead_queue(channel);
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            let in_queue = match ch.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await {
                Ok(q) => q.message_count() as f64,
                // The topology declared these queues at the session's start: a failure here is
                // the session's trouble, which the consumers notice and end it for.
                Err(e) => {
                    tracing::debug!(%channel, error = %e, "could not count dead letters");
                    continue;
                }
            };
            // With DEAD_LETTER_INDEX the queue is only a buffer: those waiting are in Postgres.
            let stored = match indexed {
                Some(store) => match store.waiting_dead_letters(channel.as_str()).await {
                    Ok(n) => n as f64,
                    Err(e) => {
                        tracing::debug!(%channel, error = %e, "could not count stored dead letters");
                        continue;
                    }
                },
                None => 0.0,
            };
            metrics::gauge!(DEAD_LETTERS, "channel" => channel.as_str()).set(in_queue + stored);
        }
    }
}
