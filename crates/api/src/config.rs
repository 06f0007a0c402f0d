use notify_types::config::{self as cfg, ConfigError, Source};
use notify_types::Topology;
use std::time::Duration;

/// Settings of the API, read once at start.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub host: String,
    pub port: u16,
    pub rabbitmq_url: String,
    /// Which node of `RABBITMQ_URL` to try first (`RABBITMQ_URL_ORDER`).
    pub rabbitmq_url_order: notify_types::broker::UrlOrder,
    pub topology: Topology,
    /// Upper bound on publish + confirm; past it the caller gets 503.
    pub publish_timeout: Duration,
    /// Requests larger than this get 413 (far below the broker's own message limit).
    pub max_body_bytes: usize,
    /// Time a client gets to send a request's headers, and then its body (408 past it).
    pub request_timeout: Duration,
    /// Publishing channels shared by all requests (confirms are pipelined on each).
    pub publish_channels: usize,
    /// Whether the server handles SIGTERM/ctrl-c itself (the binary) or is stopped by its
    /// owner (tests).
    pub handle_signals: bool,
    /// HTTP worker threads (0 = one per core).
    pub http_workers: usize,
    pub routes_file: String,
    /// Postgres, for idempotency keys, status and the inbox. The accept path without an
    /// `Idempotency-Key` never touches it.
    pub database_url: String,
    /// Schema of notify's tables (lets deployments or tests share one database).
    pub database_schema: String,
    /// Direct webhooks to private, loopback and link-local addresses are refused unless true.
    pub allow_private_webhooks: bool,
    /// Bearer keys (`API_KEYS`, comma-separated, each `name:key` or bare). Empty:
    /// authentication is off.
    pub api_keys: crate::auth::ApiKeys,
    /// Replays per notification and channel before a replay is refused (`REPLAY_LIMIT`).
    pub replay_limit: u32,
}

impl ApiConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        Ok(ApiConfig {
            host: cfg::string(src, "API_HOST", "0.0.0.0"),
            port: cfg::parse(src, "API_PORT", 9919u16)?,
            rabbitmq_url: cfg::amqp_url(src, "RABBITMQ_URL", cfg::DEFAULT_RABBITMQ_URL)?,
            rabbitmq_url_order: cfg::parse(src, "RABBITMQ_URL_ORDER", Default::default())?,
            topology: cfg::topology(src)?,
            publish_timeout: cfg::duration(src, "PUBLISH_TIMEOUT", Duration::from_secs(5))?,
            max_body_bytes: cfg::bounded(src, "API_MAX_BODY_BYTES", 256 * 1024, 1024, 16 * 1024 * 1024)? as usize,
            request_timeout: cfg::duration(src, "API_REQUEST_TIMEOUT", Duration::from_secs(10))?,
            publish_channels: cfg::bounded(src, "API_PUBLISH_CHANNELS", 4, 1, 64)? as usize,
            handle_signals: true,
            http_workers: cfg::bounded(src, "API_HTTP_WORKERS", 0, 0, 256)? as usize,
            routes_file: cfg::string(src, "ROUTES_FILE", "config/routes.toml"),
            database_url: cfg::string(src, "DATABASE_URL", cfg::DEFAULT_DATABASE_URL),
            database_schema: cfg::string(src, "DATABASE_SCHEMA", "public"),
            allow_private_webhooks: cfg::parse(src, "WEBHOOK_ALLOW_PRIVATE", false)?,
            api_keys: crate::auth::ApiKeys::parse(&cfg::string(src, "API_KEYS", ""))
                .map_err(|m| ConfigError::new("API_KEYS", m))?,
            replay_limit: cfg::bounded(src, "REPLAY_LIMIT", 5, 0, 1000)? as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn defaults_and_bad_keys() {
        let empty: HashMap<String, String> = HashMap::new();
        let c = ApiConfig::from_source(&empty).unwrap();
        assert_eq!(c.port, 9919);
        assert_eq!(c.topology.exchange(), "notify");
        let bad: HashMap<String, String> = [("API_PORT".to_string(), "99999".to_string())].into();
        let e = ApiConfig::from_source(&bad).unwrap_err();
        assert_eq!(e.key, "API_PORT");
    }
}
