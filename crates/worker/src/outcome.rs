use std::time::Duration;

/// What one delivery attempt came to. Handlers return it; the settle step acts on it, so
/// handlers need no broker and tests need no sleeps.
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
}

impl DeadReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Permanent => "permanent",
            DeadReason::MaxAttempts => "max_attempts",
            DeadReason::Unparseable => "unparseable",
            DeadReason::CrashedWorker => "crashed_worker",
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
}
