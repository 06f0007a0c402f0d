//! What one delivery attempt came to ([`Outcome`]) and what became of the message
//! ([`Settled`]). Values only: the steps of `pipeline::process` pass them along.

use std::time::Duration;

/// What one delivery attempt came to. The deliver and record steps produce it; the planning
/// step turns it into broker actions, so senders need no broker and tests need no sleeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Worth trying again later (SMTP 4xx, connection trouble, timeouts). `after` is the
    /// receiver's wish (Retry-After); the next delay tier is used otherwise.
    Retry {
        error: String,
        after: Option<Duration>,
    },
    /// Will never succeed (SMTP 5xx, bad recipient, bad payload).
    Dead {
        reason: DeadReason,
        error: String,
    },
    /// Our own infrastructure failed (the database): try again later without counting an
    /// attempt, so an outage never dead-letters messages early.
    Defer {
        error: String,
    },
    /// The send guard found this (notification, channel) already delivered: ack, send nothing.
    AlreadyDelivered,
    /// Sent, but recording it failed (the database went away in between): come back later
    /// only to record it — never to send again.
    RecordLater {
        error: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// The receiver refused for good.
    Permanent,
    /// Retried MAX_ATTEMPTS times.
    MaxAttempts,
    /// The message could not be read.
    Unparseable,
    /// Its deliveries kept dying mid-way (WORKER_CRASH_LIMIT): it crashes the worker.
    CrashedWorker,
    /// A database statement failed for a reason other than an outage (a query bug): retrying
    /// would fail the same way, so it is not treated as an outage.
    StoreQuery,
}

impl DeadReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Permanent => "permanent",
            DeadReason::MaxAttempts => "max_attempts",
            DeadReason::Unparseable => "unparseable",
            DeadReason::CrashedWorker => "crashed_worker",
            DeadReason::StoreQuery => "store_query",
        }
    }
}

impl Outcome {
    pub fn retry(error: impl Into<String>) -> Self {
        Outcome::Retry { error: error.into(), after: None }
    }

    pub fn dead(error: impl Into<String>) -> Self {
        Outcome::Dead { reason: DeadReason::Permanent, error: error.into() }
    }

    /// The outcome once attempts are counted: a retry after the last attempt is a dead letter.
    /// The one place this rule lives; record and plan both see its result.
    pub fn exhausted_if(self, last_attempt: bool) -> Self {
        match self {
            Outcome::Retry { error, .. } if last_attempt => Outcome::Dead { reason: DeadReason::MaxAttempts, error },
            other => other,
        }
    }
}

/// What became of a delivery, for logs, metrics and tests.
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
