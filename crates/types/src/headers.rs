//! Our own AMQP headers. RabbitMQ 4 ignores `x-death` on republished messages, so the attempt
//! count travels in a header we own.

/// 1-based number of the attempt this message is waiting for.
pub const ATTEMPT: &str = "x-notify-attempt";
/// Why a message is in a dead-letter queue (`permanent`, `max_attempts`, `unparseable`, ...).
pub const DEAD_REASON: &str = "x-notify-dead-reason";
/// The last delivery error (shortened).
pub const LAST_ERROR: &str = "x-notify-last-error";
/// Attempts made before dead-lettering.
pub const ATTEMPTS: &str = "x-notify-attempts";
/// When the message was dead-lettered (RFC 3339).
pub const DEAD_AT: &str = "x-notify-dead-at";
/// The queue the message came from (for replay).
pub const ORIGIN_QUEUE: &str = "x-notify-origin-queue";
/// How many times delivery was deferred because our own infrastructure (Postgres) was down;
/// deferrals do not count as attempts but back off through the tiers.
pub const DEFERRALS: &str = "x-notify-deferrals";
/// Set on a message that was sent but whose record failed: when it comes back, the worker only
/// records the delivery, it never sends again.
pub const SENT: &str = "x-notify-sent";
/// W3C trace context (`00-<trace id>-<parent span id>-<flags>`) of the request that published
/// the message: the worker's delivery span continues that trace
/// (`telemetry::set_parent_from_traceparent`).
pub const TRACEPARENT: &str = "traceparent";
/// How many times this notification was replayed from its channel's dead letters (operator
/// replay, `notify-admin` or `POST /api/v1/dead-letters/replay`); counts toward `REPLAY_LIMIT`.
pub const REPLAYS: &str = "x-notify-replays";
