use notify_types::config::{self as cfg, ConfigError, Source};
use notify_types::{Channel, Topology};
use std::time::Duration;

/// Deliveries at once per channel unless `WORKER_CONCURRENCY` says otherwise (the benchmark
/// derives its raw consumer's prefetch from it).
pub const DEFAULT_CONCURRENCY: u64 = 128;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Settings of the worker, read once at start.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub rabbitmq_url: String,
    /// Which node of `RABBITMQ_URL` to try first (`RABBITMQ_URL_ORDER`).
    pub rabbitmq_url_order: notify_types::broker::UrlOrder,
    pub topology: Topology,
    pub smtp_url: String,
    pub email_from: String,
    pub smtp_timeout: Duration,
    pub smtp_pool_size: u32,
    /// Deliveries running at once, per channel.
    pub concurrency: usize,
    /// Unacked messages the broker may push to each consumer.
    pub prefetch: u16,
    /// Attempts including the first; then the message is dead-lettered.
    pub max_attempts: u32,
    /// Fraction (0..1) by which a retry delay is randomly shortened, so a burst of failures
    /// does not come back at the same instant.
    pub jitter: f64,
    /// How long in-flight deliveries get to finish after SIGTERM.
    pub shutdown_timeout: Duration,
    /// Channels this worker consumes.
    pub channels: Vec<Channel>,
    pub routes_file: String,
    pub database_url: String,
    pub database_schema: String,
    pub webhook_timeout: Duration,
    /// Webhooks to private, loopback and link-local addresses are refused unless true.
    pub webhook_allow_private: bool,
    /// Signing secret of direct webhooks (`POST /api/v1/notifications/webhook`); event webhooks
    /// use the secret of their route.
    pub webhook_secret: Option<String>,
    /// Deliveries of one message that may die mid-way (the process crashed) before the worker
    /// dead-letters it itself. Below the queue's DELIVERY_LIMIT, which stays as the backstop.
    pub crash_limit: u32,
    /// The probe and metrics port (`/health`, `/ready`, `/metrics`); port 0 picks a free one.
    pub http_host: String,
    pub http_port: u16,
    /// How often the dead-letter queues are counted for `notify_dead_letters`.
    pub dead_letter_interval: Duration,
    /// Whether this worker moves its channels' dead letters from the broker's dead queues into
    /// PostgreSQL (`DEAD_LETTER_INDEX`). Off: they stay in the queues, unlisted.
    pub dead_letter_index: bool,
    /// Ages and batch size of the retention purge.
    pub retention: notify_store::Retention,
    /// How often the retention purge runs (`RETENTION_INTERVAL`).
    pub retention_interval: Duration,
}

impl WorkerConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let smtp_url = cfg::string(src, "SMTP_URL", "smtp://127.0.0.1:1025");
        lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(&smtp_url).map_err(|e| {
            ConfigError::new("SMTP_URL", format!("`{}` is not a usable SMTP URL: {e}", cfg::redact_url(&smtp_url)))
        })?;
        let email_from = cfg::string(src, "EMAIL_FROM", "notify <notify@localhost>");
        email_from
            .parse::<lettre::message::Mailbox>()
            .map_err(|e| ConfigError::new("EMAIL_FROM", format!("`{email_from}` is not a mailbox: {e}")))?;
        let jitter: f64 = cfg::parse(src, "RETRY_JITTER", 0.2)?;
        if !(0.0..1.0).contains(&jitter) {
            return Err(ConfigError::new("RETRY_JITTER", "must be in 0.0..1.0"));
        }
        let raw_channels = cfg::string(src, "WORKER_CHANNELS", "email,webhook,in_app");
        let mut channels = Vec::new();
        for part in raw_channels.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let c: Channel = part.parse().map_err(|e: String| ConfigError::new("WORKER_CHANNELS", e))?;
            if !channels.contains(&c) {
                channels.push(c);
            }
        }
        if channels.is_empty() {
            return Err(ConfigError::new("WORKER_CHANNELS", "needs at least one channel"));
        }
        let concurrency = cfg::bounded(src, "WORKER_CONCURRENCY", DEFAULT_CONCURRENCY, 1, 10_000)? as usize;
        Ok(WorkerConfig {
            rabbitmq_url: cfg::amqp_url(src, "RABBITMQ_URL", cfg::DEFAULT_RABBITMQ_URL)?,
            rabbitmq_url_order: cfg::parse(src, "RABBITMQ_URL_ORDER", Default::default())?,
            topology: cfg::topology(src)?,
            smtp_url,
            email_from,
            smtp_timeout: cfg::duration(src, "SMTP_TIMEOUT", Duration::from_secs(10))?,
            smtp_pool_size: cfg::bounded(src, "SMTP_POOL_SIZE", 8, 1, 1000)? as u32,
            concurrency,
            prefetch: cfg::bounded(src, "WORKER_PREFETCH", (concurrency * 2).min(65535) as u64, 1, 65535)? as u16,
            max_attempts: cfg::bounded(src, "MAX_ATTEMPTS", 6, 1, 1000)? as u32,
            jitter,
            shutdown_timeout: cfg::duration(src, "WORKER_SHUTDOWN_TIMEOUT", Duration::from_secs(25))?,
            channels,
            routes_file: cfg::string(src, "ROUTES_FILE", "config/routes.toml"),
            database_url: cfg::string(src, "DATABASE_URL", cfg::DEFAULT_DATABASE_URL),
            database_schema: cfg::string(src, "DATABASE_SCHEMA", "public"),
            webhook_timeout: cfg::duration(src, "WEBHOOK_TIMEOUT", Duration::from_secs(10))?,
            webhook_allow_private: cfg::parse(src, "WEBHOOK_ALLOW_PRIVATE", false)?,
            webhook_secret: src.get("WEBHOOK_SECRET"),
            crash_limit: cfg::bounded(src, "WORKER_CRASH_LIMIT", 3, 1, 1000)? as u32,
            http_host: cfg::string(src, "WORKER_HTTP_HOST", "0.0.0.0"),
            http_port: cfg::parse(src, "WORKER_HTTP_PORT", 9920u16)?,
            dead_letter_interval: cfg::duration(src, "WORKER_DEAD_LETTER_INTERVAL", Duration::from_secs(15))?,
            dead_letter_index: cfg::parse(src, "DEAD_LETTER_INDEX", true)?,
            retention: notify_store::Retention {
                deliveries: cfg::duration(src, "RETENTION_DELIVERIES", DAY * 30)?,
                inbox_items: cfg::duration(src, "RETENTION_INBOX", DAY * 90)?,
                idempotency_keys: cfg::duration(src, "RETENTION_IDEMPOTENCY_KEYS", DAY)?,
                dead_letters: cfg::duration(src, "RETENTION_DEAD_LETTERS", DAY * 30)?,
                batch: cfg::bounded(src, "RETENTION_BATCH", 500, 1, 100_000)? as i64,
            },
            retention_interval: cfg::duration(src, "RETENTION_INTERVAL", Duration::from_secs(600))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn src(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = WorkerConfig::from_source(&src(&[])).unwrap();
        assert_eq!(c.max_attempts, 6);
        assert_eq!((c.concurrency, c.prefetch), (128, 256));
        assert_eq!(c.channels, vec![Channel::Email, Channel::Webhook, Channel::InApp]);
        assert_eq!((c.http_host.as_str(), c.http_port), ("0.0.0.0", 9920));
    }

    #[test]
    fn bad_settings_name_their_key() {
        for (key, value) in [
            ("SMTP_URL", "ftp://x"),
            ("EMAIL_FROM", "not a mailbox"),
            ("WORKER_CHANNELS", "email,sms"),
            ("RETRY_JITTER", "1.5"),
            ("MAX_ATTEMPTS", "0"),
            ("QUEUE_TYPE", "stream"),
            ("WORKER_HTTP_PORT", "99999"),
        ] {
            let e = WorkerConfig::from_source(&src(&[(key, value)])).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
    }
}
