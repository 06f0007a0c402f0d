//! Configuration helpers: every setting comes from the environment (and `.env`), is validated
//! once at start, and an error names the key.

use std::{fmt::Display, str::FromStr, time::Duration};

#[derive(Debug, thiserror::Error)]
#[error("invalid setting {key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: &str, message: impl Into<String>) -> Self {
        ConfigError { key: key.to_string(), message: message.into() }
    }
}

/// Where settings come from: the process environment, or a map (tests).
pub trait Source {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment, after loading `.env` if present.
#[derive(Debug, Clone, Copy, Default)]
pub struct Env;

impl Env {
    pub fn load() -> Self {
        let _ = dotenvy::dotenv();
        Env
    }
}

impl Source for Env {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.trim().is_empty())
    }
}

impl Source for std::collections::HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        self.get(key).cloned().filter(|v| !v.trim().is_empty())
    }
}

pub fn string(src: &dyn Source, key: &str, default: &str) -> String {
    src.get(key).unwrap_or_else(|| default.to_string())
}

pub fn parse<T>(src: &dyn Source, key: &str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: Display,
{
    match src.get(key) {
        None => Ok(default),
        Some(raw) => raw.trim().parse::<T>().map_err(|e| ConfigError::new(key, format!("`{raw}` is not valid: {e}"))),
    }
}

/// A positive integer in `min..=max`.
pub fn bounded(src: &dyn Source, key: &str, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    let v: u64 = parse(src, key, default)?;
    if v < min || v > max {
        return Err(ConfigError::new(key, format!("{v} is out of range {min}..={max}")));
    }
    Ok(v)
}

/// A duration like `250ms`, `5s`, `2m`.
pub fn duration(src: &dyn Source, key: &str, default: Duration) -> Result<Duration, ConfigError> {
    match src.get(key) {
        None => Ok(default),
        Some(raw) => humantime::parse_duration(raw.trim())
            .map_err(|e| ConfigError::new(key, format!("`{raw}` is not a duration like 5s or 250ms: {e}"))),
    }
}

/// A comma-separated list of durations, e.g. `1s,10s,1m,5m,30m`.
pub fn durations(src: &dyn Source, key: &str, default: &str) -> Result<Vec<Duration>, ConfigError> {
    let raw = src.get(key).unwrap_or_else(|| default.to_string());
    let mut out = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let d = humantime::parse_duration(part)
            .map_err(|e| ConfigError::new(key, format!("`{part}` is not a duration: {e}")))?;
        if d < Duration::from_millis(1) {
            return Err(ConfigError::new(key, format!("`{part}` must be at least 1ms")));
        }
        out.push(d);
    }
    if out.is_empty() {
        return Err(ConfigError::new(key, "needs at least one delay, e.g. 1s,10s,1m"));
    }
    Ok(out)
}

/// `RABBITMQ_URL`: one AMQP URL, or several of one cluster separated by commas. Each is checked
/// for its scheme and form; all must name the same virtual host (they are one broker).
pub fn amqp_url(src: &dyn Source, key: &str, default: &str) -> Result<String, ConfigError> {
    let raw = string(src, key, default);
    let urls = crate::broker::split_urls(&raw);
    if urls.is_empty() {
        return Err(ConfigError::new(key, "needs at least one amqp:// or amqps:// URL"));
    }
    let mut vhost: Option<String> = None;
    for url in &urls {
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(ConfigError::new(key, format!("`{}` must start with amqp:// or amqps://", redact_url(url))));
        }
        let parsed = url::Url::parse(url)
            .map_err(|e| ConfigError::new(key, format!("`{}` is not a URL: {e}", redact_url(url))))?;
        let this = parsed.path().to_string();
        match &vhost {
            Some(first) if *first != this => {
                return Err(ConfigError::new(
                    key,
                    format!("all URLs must name the same virtual host (one cluster); `{}` differs", redact_url(url)),
                ))
            }
            _ => vhost = Some(this),
        }
    }
    Ok(urls.join(","))
}

/// A resource-name prefix: letters, digits, `-`, `_`, `.`.
pub fn prefix(src: &dyn Source, key: &str, default: &str) -> Result<String, ConfigError> {
    let p = string(src, key, default);
    if p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(ConfigError::new(key, format!("`{p}` may only hold letters, digits, '-', '_' and '.'")));
    }
    Ok(p)
}

/// A URL (or a comma-separated list of them) with passwords replaced by `***`, for logs and
/// error messages.
pub fn redact_url(raw: &str) -> String {
    if raw.contains(',') {
        return crate::broker::split_urls(raw).iter().map(|u| redact_url(u)).collect::<Vec<_>>().join(",");
    }
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparseable url>".to_string(),
    }
}

/// The topology settings both binaries share: `NOTIFY_PREFIX`, `QUEUE_TYPE`, `RETRY_SCHEDULE`,
/// `DELIVERY_LIMIT`.
pub fn topology(src: &dyn Source) -> Result<crate::topology::Topology, ConfigError> {
    let prefix = prefix(src, "NOTIFY_PREFIX", "notify")?;
    let queue_type: crate::topology::QueueType = parse(src, "QUEUE_TYPE", crate::topology::QueueType::Quorum)?;
    let delays = durations(src, "RETRY_SCHEDULE", DEFAULT_RETRY_SCHEDULE)?;
    let mut topology = crate::topology::Topology::new(prefix, queue_type, delays);
    topology.delivery_limit = bounded(src, "DELIVERY_LIMIT", 10, 1, 1000)? as u32;
    Ok(topology)
}

pub const DEFAULT_RETRY_SCHEDULE: &str = "1s,10s,1m,5m,30m";
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
pub const DEFAULT_RABBITMQ_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn src(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn errors_name_the_key() {
        let s = src(&[("WORKER_CONCURRENCY", "lots"), ("RETRY_SCHEDULE", "1s,soon")]);
        let e = parse::<u32>(&s, "WORKER_CONCURRENCY", 4).unwrap_err();
        assert!(e.to_string().contains("WORKER_CONCURRENCY"), "{e}");
        let e = durations(&s, "RETRY_SCHEDULE", "1s").unwrap_err();
        assert!(e.to_string().contains("RETRY_SCHEDULE") && e.to_string().contains("soon"), "{e}");
        let e = bounded(&src(&[("X", "0")]), "X", 1, 1, 10).unwrap_err();
        assert!(e.to_string().contains("out of range"));
    }

    #[test]
    fn rabbitmq_url_takes_a_list_of_one_clusters_nodes() {
        let list = "amqp://u:pw@n1:5672/v, amqp://u:pw@n2:5673/v";
        let got = amqp_url(&src(&[("RABBITMQ_URL", list)]), "RABBITMQ_URL", "").unwrap();
        assert_eq!(got, "amqp://u:pw@n1:5672/v,amqp://u:pw@n2:5673/v");
        assert_eq!(redact_url(&got), "amqp://u:***@n1:5672/v,amqp://u:***@n2:5673/v");
        let e =
            amqp_url(&src(&[("RABBITMQ_URL", "amqp://u:pw@n1/v,amqp://u:pw@n2/w")]), "RABBITMQ_URL", "").unwrap_err();
        assert!(e.to_string().contains("same virtual host") && !e.to_string().contains("pw@"), "{e}");
        let e = amqp_url(&src(&[("RABBITMQ_URL", "amqp://n1/v,http://n2/v")]), "RABBITMQ_URL", "").unwrap_err();
        assert!(e.to_string().contains("http://n2"), "{e}");
        assert!(amqp_url(&src(&[("RABBITMQ_URL", " , ")]), "RABBITMQ_URL", "").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("amqp://user:s3cret@host:5672/%2f"), "amqp://user:***@host:5672/%2f");
        let e = amqp_url(&src(&[("RABBITMQ_URL", "http://u:s3cret@h")]), "RABBITMQ_URL", "").unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn schedule_parses() {
        let d = durations(&src(&[]), "RETRY_SCHEDULE", "50ms, 1s,2m").unwrap();
        assert_eq!(d, vec![Duration::from_millis(50), Duration::from_secs(1), Duration::from_secs(120)]);
    }
}
