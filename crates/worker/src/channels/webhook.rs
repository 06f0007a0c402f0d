//! Webhooks: a JSON POST signed the Standard Webhooks way (HMAC-SHA256 over `id.timestamp.body`).
//!
//! A route's URL must not turn the worker into a way into our own network (SSRF). Unless
//! private targets are allowed, the URL's literal host is checked before anything is sent, and
//! every address a host name resolves to is checked inside the client's own DNS resolver. The
//! addresses that resolver checked are the only ones the connection can use, so a DNS answer
//! that changes between a check and the connect (rebinding) has no gap to slip through; a
//! refusal there comes back through reqwest's error chain as [`ForbiddenTarget`] and ends dead.

use crate::outcome::Outcome;
use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use reqwest::{
    dns::{Addrs, Name, Resolve, Resolving},
    header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER},
    redirect, StatusCode,
};
use sha2::Sha256;
use std::{
    error::Error as StdError,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};
use url::Url;

/// A receiver may ask for a later retry, but not hold a message for longer than this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Answers are read this far so the connection can go back to the pool; beyond it, dropped.
const MAX_DRAIN: usize = 64 * 1024;

#[derive(Clone)]
pub struct WebhookSender {
    client: reqwest::Client,
    timeout: Duration,
    allow_private: bool,
}

impl WebhookSender {
    pub fn new(timeout: Duration, allow_private: bool) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(timeout)
            .user_agent("notify/0.1")
            // A redirect is a second target nobody checked, and could point inwards.
            .redirect(redirect::Policy::none())
            // Through a proxy, the proxy resolves the target and our resolver never sees it.
            .no_proxy()
            .dns_resolver(Arc::new(CheckedResolver { allow_private }))
            .build()?;
        Ok(WebhookSender { client, timeout, allow_private })
    }

    /// POSTs `body` (JSON) to `url` with the Standard Webhooks headers, signed when `secret` is
    /// given. See the module docs for which targets are refused.
    pub async fn send(&self, id: &str, url: &str, secret: Option<&str>, body: &[u8]) -> Outcome {
        match check_url_syntax(url, self.allow_private) {
            Ok(url) => self.post(id, url, secret, body).await,
            Err(e) => Outcome::dead(e),
        }
    }

    /// The part after the literal check; names are checked by the resolver while connecting.
    async fn post(&self, id: &str, url: Url, secret: Option<&str>, body: &[u8]) -> Outcome {
        let shown = redact(&url);
        let timestamp = Utc::now().timestamp();
        let mut request = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(secret) = secret {
            if secret_key(secret).is_err() {
                return Outcome::dead("webhook secret is not valid base64 after `whsec_`");
            }
            request = request.header("webhook-signature", sign(secret, id, timestamp, body));
        }
        let response = match request.body(body.to_vec()).send().await {
            Ok(response) => response,
            Err(e) => return self.failed(&shown, e),
        };
        let status = response.status();
        let after = retry_after(response.headers(), Utc::now());
        drain(response).await;
        classify(status, after, &shown)
    }

    fn failed(&self, shown: &str, e: reqwest::Error) -> Outcome {
        // reqwest's message names the URL, userinfo included; ours names the redacted one.
        let e = e.without_url();
        let chain = std::iter::successors(Some(&e as &(dyn StdError + 'static)), |&e| e.source());
        let mut causes = Vec::new();
        for cause in chain {
            if let Some(forbidden) = cause.downcast_ref::<ForbiddenTarget>() {
                return Outcome::dead(format!("webhook to {shown} refused: {forbidden}"));
            }
            causes.push(cause.to_string());
        }
        let causes = causes.join(": ");
        if e.is_builder() {
            // E.g. an id that is no valid header value: it will not get better.
            Outcome::dead(format!("webhook to {shown}: bad request: {causes}"))
        } else if e.is_timeout() {
            Outcome::retry(format!("webhook to {shown} timed out after {:?}", self.timeout))
        } else {
            Outcome::retry(format!("webhook to {shown} failed: {causes}"))
        }
    }
}

fn classify(status: StatusCode, after: Option<Duration>, shown: &str) -> Outcome {
    let error = format!("webhook to {shown} answered {status}");
    match status.as_u16() {
        200..=299 => Outcome::Delivered,
        408 | 429 | 500..=599 => Outcome::Retry { error, after },
        300..=399 => Outcome::dead(format!("{error}; redirects are not followed")),
        _ => Outcome::dead(error),
    }
}

/// `Retry-After` as delta-seconds or an HTTP-date (a date in the past means now), capped.
fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        // IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) is RFC 2822 with zone `GMT`.
        Err(_) => {
            let when = DateTime::parse_from_rfc2822(value).ok()?;
            (when.with_timezone(&Utc) - now).to_std().unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

async fn drain(mut response: reqwest::Response) {
    let mut left = MAX_DRAIN;
    while let Ok(Some(chunk)) = response.chunk().await {
        let Some(rest) = left.checked_sub(chunk.len()) else {
            return;
        };
        left = rest;
    }
}

/// The URL for messages: without username and password.
fn redact(url: &Url) -> String {
    let mut shown = url.clone();
    // Both only fail for URLs without a host, which never get here.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`. The key is the base64 after
/// `whsec_`, or the secret's own bytes without that prefix (or if that base64 is invalid;
/// [`WebhookSender::send`] refuses such a secret instead of signing with it).
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = secret_key(secret).unwrap_or_else(|_| secret.as_bytes().to_vec());
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

fn secret_key(secret: &str) -> Result<Vec<u8>, base64::DecodeError> {
    match secret.strip_prefix("whsec_") {
        Some(encoded) => BASE64.decode(encoded),
        None => Ok(secret.as_bytes().to_vec()),
    }
}

pub use notify_types::net::{check_url_syntax, is_forbidden_ip};

/// A host name that resolved to an address [`is_forbidden_ip`] refuses.
#[derive(Debug, thiserror::Error)]
#[error("`{host}` resolves to {ip}, a loopback, private or link-local address (not globally reachable; WEBHOOK_ALLOW_PRIVATE=true allows it)")]
pub struct ForbiddenTarget {
    host: String,
    ip: IpAddr,
}

/// The client's resolver: `lookup_host`, then refuse the whole name if ANY address is
/// forbidden (a client trying them in turn would otherwise reach the private one).
struct CheckedResolver {
    allow_private: bool,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: the connector puts in the URL's port.
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allow_private {
                if let Some(bad) = addrs.iter().find(|a| is_forbidden_ip(a.ip())) {
                    return Err(Box::new(ForbiddenTarget { host, ip: bad.ip() }) as _);
                }
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::DeadReason;
    use notify_testkit::webhook::{verify_signature, WebhookReceiver};
    use std::time::Instant;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const WAIT: Duration = Duration::from_secs(10);

    fn sender(allow_private: bool) -> WebhookSender {
        WebhookSender::new(Duration::from_secs(5), allow_private).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn assert_dead(outcome: &Outcome, needle: &str) {
        match outcome {
            Outcome::Dead { reason: DeadReason::Permanent, error } => {
                assert!(error.contains(needle), "{error:?} should mention {needle:?}")
            }
            other => panic!("expected Dead mentioning {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn signs_the_standard_webhooks_reference_vector() {
        let body = br#"{"test": 2432232314}"#;
        let signature = sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_secret_without_prefix_is_used_as_raw_bytes() {
        // printf 'id1.1700000000.{"a":1}' | openssl dgst -sha256 -hmac plain-secret -binary | base64
        let signature = sign("plain-secret", "id1", 1700000000, br#"{"a":1}"#);
        assert_eq!(signature, "v1,4hH8conMRiiWGOOwKcFnFLatFDPu2o6ZaKXoFdITfvE=");
    }

    #[test]
    fn classifies_addresses() {
        let forbidden = [
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "100.127.255.254",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "febf::1",
            "fc00::1",
            "fd12:3456::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::7f00:1",
            // Special-purpose blocks that are not globally reachable (IANA registries).
            "2001:db8::1",
            "fe00::1",
            "198.18.0.1",
            "192.0.0.1",
            "240.0.0.1",
            "192.0.2.1",
            "100::1",
            "2002:7f00:1::",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "3fff::1",
        ];
        for addr in forbidden {
            assert!(is_forbidden_ip(ip(addr)), "{addr} should be forbidden");
        }
        let allowed = [
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.169.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "11.0.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:808:808::1",
            "2a00:1450::1",
        ];
        for addr in allowed {
            assert!(!is_forbidden_ip(ip(addr)), "{addr} should be allowed");
        }
    }

    #[test]
    fn checks_urls_without_dns() {
        assert!(check_url_syntax("https://example.com/hook?x=1", false).is_ok());
        assert!(check_url_syntax("http://8.8.8.8:8080/", false).is_ok());
        assert!(check_url_syntax("http://127.0.0.1:9000/", true).is_ok());
        assert!(check_url_syntax("http://localhost/", true).is_ok());
        let refused = [
            ("ftp://example.com/", "http or https"),
            ("file:///etc/passwd", "http or https"),
            ("mailto:ops@example.com", "http or https"),
            ("not a url", "not a valid URL"),
            ("http://", "not a valid URL"),
            ("http://127.0.0.1/", "loopback or private"),
            ("http://2130706433/", "loopback or private"), // 127.0.0.1 as one number
            ("http://0x7f.1/", "loopback or private"),
            ("http://10.0.0.1/", "loopback or private"),
            ("http://[::1]:8080/", "loopback or private"),
            ("http://[::ffff:192.168.0.1]/", "loopback or private"),
            ("http://169.254.169.254/latest/meta-data", "loopback or private"),
            ("http://LOCALHOST./", "loopback or private"),
            ("http://api.localhost/", "loopback or private"),
        ];
        for (url, needle) in refused {
            let error = check_url_syntax(url, false).expect_err(url);
            assert!(error.contains(needle), "{url}: {error}");
        }
        let error = check_url_syntax("http://user:hunter2@10.0.0.1/", false).unwrap_err();
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date_and_is_capped() {
        let now = DateTime::parse_from_rfc2822("Wed, 21 Oct 2015 07:28:00 GMT").unwrap().to_utc();
        let parse = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, value.parse().unwrap());
            retry_after(&headers, now)
        };
        assert_eq!(parse("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse("86400"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse("Wed, 21 Oct 2015 07:28:30 GMT"), Some(Duration::from_secs(30)));
        assert_eq!(parse("Wed, 21 Oct 2015 07:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse("Thu, 22 Oct 2015 07:28:00 GMT"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse("-5"), None);
        assert_eq!(parse("soon"), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[tokio::test]
    async fn a_2xx_is_delivered_with_standard_webhooks_headers() {
        let receiver = WebhookReceiver::start().await;
        let body = br#"{"event":"user.created","n":1}"#;
        let before = Utc::now().timestamp();
        let outcome = sender(true).send("msg_1", &receiver.url("/hook"), Some(SECRET), body).await;
        assert_eq!(outcome, Outcome::Delivered);

        let got = &receiver.wait_for_delivered(1, WAIT).await[0];
        assert_eq!(got.path, "/hook");
        assert_eq!(got.body, body);
        assert_eq!(got.header("content-type"), Some("application/json"));
        assert_eq!(got.header("user-agent"), Some("notify/0.1"));
        assert_eq!(got.header("webhook-id"), Some("msg_1"));
        let timestamp: i64 = got.header("webhook-timestamp").unwrap().parse().unwrap();
        assert!((before..=Utc::now().timestamp()).contains(&timestamp), "{timestamp}");
        assert!(verify_signature(SECRET, got), "{:?}", got.header("webhook-signature"));
        assert!(!verify_signature("whsec_AAAA", got));

        // Without a secret: same headers, no signature.
        let outcome = sender(true).send("msg_2", &receiver.url("/hook"), None, b"{}").await;
        assert_eq!(outcome, Outcome::Delivered);
        let got = &receiver.wait_for_delivered(2, WAIT).await[1];
        assert_eq!(got.header("webhook-id"), Some("msg_2"));
        assert_eq!(got.header("webhook-signature"), None);
    }

    #[tokio::test]
    async fn retryable_statuses_retry_with_the_receivers_retry_after() {
        let receiver = WebhookReceiver::start().await;
        receiver.script(vec![(503, Some("7".into())), (429, None), (408, None), (500, None)]);
        let sender = sender(true);
        let mut afters = Vec::new();
        for _ in 0..4 {
            match sender.send("m", &receiver.url("/"), Some(SECRET), b"{}").await {
                Outcome::Retry { error, after } => {
                    assert!(error.contains("answered"), "{error}");
                    afters.push(after);
                }
                other => panic!("expected Retry, got {other:?}"),
            }
        }
        assert_eq!(afters, [Some(Duration::from_secs(7)), None, None, None]);
    }

    #[tokio::test]
    async fn gone_and_other_4xx_are_dead() {
        let receiver = WebhookReceiver::start().await;
        receiver.script(vec![(410, None), (400, Some("5".into())), (404, None)]);
        let sender = sender(true);
        for status in ["410 Gone", "400 Bad Request", "404 Not Found"] {
            let outcome = sender.send("m", &receiver.url("/"), None, b"{}").await;
            assert_dead(&outcome, status);
        }
    }

    #[tokio::test]
    async fn redirects_are_dead_and_not_followed() {
        let receiver = WebhookReceiver::start().await;
        receiver.script(vec![(302, None), (307, None)]);
        let sender = sender(true);
        for _ in 0..2 {
            let outcome = sender.send("m", &receiver.url("/"), None, b"{}").await;
            assert_dead(&outcome, "redirects are not followed");
        }
        // The receiver's `Location: /redirected` was never requested.
        let paths: Vec<String> = receiver.requests().into_iter().map(|r| r.path).collect();
        assert_eq!(paths, ["/", "/"]);
    }

    #[tokio::test]
    async fn a_refused_connection_is_retried_and_messages_hide_userinfo() {
        let receiver = WebhookReceiver::start().await;
        let url = receiver.url("/").replace("http://", "http://user:hunter2@");
        receiver.go_down().await;
        match sender(true).send("m", &url, Some(SECRET), b"{}").await {
            Outcome::Retry { error, after: None } => {
                assert!(error.contains("127.0.0.1"), "{error}");
                for secret in ["hunter2", "user", "MfKQ9r8G"] {
                    assert!(!error.contains(secret), "{error}");
                }
            }
            other => panic!("expected Retry, got {other:?}"),
        }
        receiver.come_back().await;
        receiver.always(503);
        match sender(true).send("m", &url, Some(SECRET), b"{}").await {
            Outcome::Retry { error, .. } => assert!(!error.contains("hunter2"), "{error}"),
            other => panic!("expected Retry, got {other:?}"),
        }
        // The userinfo is still sent, as Basic auth.
        assert!(receiver.requests()[0].header("authorization").is_some());
    }

    #[tokio::test]
    async fn private_targets_are_refused_before_any_request() {
        let receiver = WebhookReceiver::start().await;
        let sender = sender(false);
        let port = receiver.addr().port();
        for url in [receiver.url("/"), format!("http://localhost:{port}/"), format!("http://[::1]:{port}/")] {
            let outcome = sender.send("m", &url, None, b"{}").await;
            assert_dead(&outcome, "loopback or private");
        }
        // Past the literal check, the resolver refuses a name whose address is loopback: the
        // path a DNS rebind would take.
        let url = Url::parse(&format!("http://localhost:{port}/")).unwrap();
        let outcome = sender.post("m", url, None, b"{}").await;
        assert_dead(&outcome, "`localhost` resolves to");
        assert!(receiver.requests().is_empty(), "{:?}", receiver.requests());
    }

    #[tokio::test]
    async fn a_bad_secret_or_id_is_dead() {
        let receiver = WebhookReceiver::start().await;
        let sender = sender(true);
        let outcome = sender.send("m", &receiver.url("/"), Some("whsec_!!!"), b"{}").await;
        assert_dead(&outcome, "not valid base64");
        let outcome = sender.send("bad\nid", &receiver.url("/"), None, b"{}").await;
        assert_dead(&outcome, "bad request");
        assert!(receiver.requests().is_empty());
    }

    #[tokio::test]
    async fn a_stalled_receiver_times_out_into_a_retry() {
        let receiver = WebhookReceiver::start().await;
        receiver.set_delay(Duration::from_secs(10));
        let sender = WebhookSender::new(Duration::from_secs(2), true).unwrap();
        let started = Instant::now();
        let outcome = sender.send("m", &receiver.url("/"), None, b"{}").await;
        let elapsed = started.elapsed();
        match outcome {
            Outcome::Retry { error, after: None } => assert!(error.contains("timed out"), "{error}"),
            other => panic!("expected Retry, got {other:?}"),
        }
        assert!(elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(5), "{elapsed:?}");
        assert_eq!(receiver.requests().len(), 1);
    }
}
