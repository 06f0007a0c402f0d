//! A pool of SMTP connections on lettre's `AsyncSmtpConnection`, with `TCP_NODELAY` set.
//!
//! Why not lettre's own `AsyncSmtpTransport` pool: its sockets keep Nagle's algorithm on, and
//! lettre writes a mail's content and the closing `.` in two writes, so the 5-byte dot waits in
//! the kernel for the server's delayed ACK (40 ms on Linux) before it leaves. Every mail took
//! 40 ms more per connection, and — worse for the send guard — the mail sat 40 ms in the state
//! "complete on our side, not yet accepted by the server": a worker killed then could not record
//! it, yet the kernel still handed the dot to the server after the process was gone, so the
//! redelivery sent it again. The transport also sent a `NOOP` before every mail to test the
//! pooled connection. Here the dot goes out with the content's last segment, and only a
//! connection idle for more than [`TEST_IDLE_AFTER`] is tested first. Each step of a
//! conversation gets `SMTP_TIMEOUT`, except the answer to the final dot, which gets the 10
//! minutes RFC 5321 gives it ([`DATA_END_TIMEOUT`]).
//!
//! `smtps://` (TLS from the first byte) still uses lettre's own socket, because lettre takes a
//! custom stream only before TLS; `smtp://` and `smtp://…?tls=required|opportunistic`
//! (STARTTLS, upgraded by lettre on our socket) get `TCP_NODELAY`.

use lettre::{
    address::Envelope,
    transport::smtp::{
        authentication::{Credentials, DEFAULT_MECHANISMS},
        client::{AsyncSmtpConnection, Tls, TlsParameters},
        commands::{Data, Mail, Rcpt},
        extension::{ClientId, Extension, MailBodyParameter, MailParameter},
        Error as LettreError,
    },
};
use std::future::Future;
use std::{
    borrow::Cow,
    sync::Mutex,
    time::{Duration, Instant},
};
use tokio::sync::{Semaphore, SemaphorePermit};

/// A pooled connection idle for longer than this gets a `NOOP` before it carries a mail.
const TEST_IDLE_AFTER: Duration = Duration::from_secs(2);
/// A pooled connection idle for longer than this is closed instead of reused (servers drop
/// idle clients after a few minutes; RFC 5321 asks them to wait at least 5).
const MAX_IDLE: Duration = Duration::from_secs(30);
/// How long the answer to the mail's final `.` may take (RFC 5321 4.5.3.2.6: 10 minutes). The
/// relay may be scanning or queueing the mail; giving up earlier and retrying can only end in a
/// second copy, so this wait is not cut to `SMTP_TIMEOUT`, which bounds every other step.
const DATA_END_TIMEOUT: Duration = Duration::from_secs(600);

/// Why a mail was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    /// The server answered with an error code, or the conversation broke.
    #[error("{0}")]
    Smtp(#[from] LettreError),
    /// The TCP connection could not be opened.
    #[error("cannot connect to the SMTP server: {0}")]
    Connect(#[source] std::io::Error),
    /// A step of the conversation took longer than allowed.
    #[error("no answer from the SMTP server within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The mail needs an extension the server does not offer (SMTPUTF8, 8BITMIME).
    #[error("the SMTP server cannot take this mail: {0}")]
    Unsupported(&'static str),
}

impl SmtpError {
    /// A 5xx answer, or a mail this server can never take: sending it again cannot succeed.
    pub fn is_permanent(&self) -> bool {
        match self {
            SmtpError::Smtp(e) => e.is_permanent(),
            SmtpError::Unsupported(_) => true,
            SmtpError::Connect(_) | SmtpError::Timeout(_) => false,
        }
    }
}

/// Where and how to reach the SMTP server (parsed from `SMTP_URL` the way lettre parses it).
struct Server {
    host: String,
    port: u16,
    tls: Tls,
    credentials: Option<Credentials>,
    hello: ClientId,
}

pub struct SmtpPool {
    server: Server,
    timeout: Duration,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    slots: Semaphore,
    size: usize,
}

/// The right to one of the pool's `size` conversations. A delivery takes it before it claims
/// its send guard, so no more e-mail deliveries are claimed than can be talking to the relay
/// (one claimed while waiting for a connection would count as dying mid-way in a crash).
pub struct Slot<'a>(#[allow(dead_code)] SemaphorePermit<'a>);

impl SmtpPool {
    /// `smtp://[user:pass@]host[:port][/hello-name][?tls=required|opportunistic]` or `smtps://…`;
    /// the same forms, defaults and ports as lettre's `AsyncSmtpTransport::from_url`.
    pub fn from_url(url: &str, timeout: Duration, size: u32) -> anyhow::Result<SmtpPool> {
        let url = url::Url::parse(url).map_err(|e| anyhow::anyhow!("SMTP_URL is not a URL: {e}"))?;
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| anyhow::anyhow!("SMTP_URL has no host"))?;
        // IPv6 literals come bracketed from the URL; connect() wants them bare.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let tls_param = url.query_pairs().find(|(k, _)| k == "tls").map(|(_, v)| v.into_owned());
        let params = || TlsParameters::new(host.clone());
        let (tls, default_port) = match (url.scheme(), tls_param.as_deref()) {
            ("smtp", None) => (Tls::None, 25),
            ("smtp", Some("required")) => (Tls::Required(params()?), 587),
            ("smtp", Some("opportunistic")) => (Tls::Opportunistic(params()?), 587),
            ("smtps", _) => (Tls::Wrapper(params()?), 465),
            (scheme, tls) => anyhow::bail!(
                "SMTP_URL: unknown scheme `{scheme}` or tls parameter {tls:?} (smtp://, smtps://, ?tls=required|opportunistic)"
            ),
        };
        let hello = match url.path().trim_matches('/') {
            "" => ClientId::default(),
            name => ClientId::Domain(name.to_string()),
        };
        let decode = |s: &str| -> anyhow::Result<String> {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(Cow::into_owned)
                .map_err(|_| anyhow::anyhow!("SMTP_URL: user or password is not UTF-8 once decoded"))
        };
        let credentials = match url.password() {
            Some(password) => Some(Credentials::new(decode(url.username())?, decode(password)?)),
            None => None,
        };
        let port = url.port().unwrap_or(default_port);
        Ok(SmtpPool {
            server: Server { host, port, tls, credentials, hello },
            timeout,
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(size as usize),
            size: size as usize,
        })
    }

    /// Conversations reserved by deliveries, and open connections waiting idle (the metrics).
    pub fn usage(&self) -> (usize, usize) {
        let in_use = self.size.saturating_sub(self.slots.available_permits());
        (in_use, self.idle.lock().expect("pool lock").len())
    }

    /// Waits for one of the `size` conversations.
    pub async fn reserve(&self) -> Slot<'_> {
        Slot(self.slots.acquire().await.expect("the pool's semaphore is never closed"))
    }

    /// Sends one mail on a pooled connection, in the conversation `_slot` reserved. A
    /// connection that saw an error is closed, not returned. A reused connection that fails
    /// before the server took `MAIL FROM` (the relay closed it while it was idle) is replaced
    /// by a new one once: nothing of the mail was sent on it.
    pub async fn send(&self, _slot: &Slot<'_>, envelope: &Envelope, mail: &[u8]) -> Result<(), SmtpError> {
        let (mut conn, mut reused) = within(self.timeout, self.checkout()).await?;
        loop {
            match self.transaction(&mut conn, envelope, mail).await {
                Ok(()) => {
                    self.idle.lock().expect("pool lock").push((conn, Instant::now()));
                    return Ok(());
                }
                Err(Step::Mail(e)) if reused && !matches!(e, SmtpError::Unsupported(_)) => {
                    tracing::debug!(error = %e, "pooled SMTP connection was closed; opening a new one");
                    (conn, reused) = (within(self.timeout, self.connect()).await?, false);
                }
                Err(Step::Mail(e) | Step::Later(e)) => return Err(e),
            }
        }
    }

    /// One mail transaction, as lettre's `AsyncSmtpConnection::send` runs it, with a time limit
    /// per step and the step that failed.
    async fn transaction(&self, conn: &mut AsyncSmtpConnection, envelope: &Envelope, mail: &[u8]) -> Result<(), Step> {
        let mut options = Vec::new();
        let non_ascii = envelope.from().into_iter().chain(envelope.to()).any(|a| !AsRef::<str>::as_ref(a).is_ascii());
        if non_ascii {
            if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
                return Err(Step::Mail(SmtpError::Unsupported("non-ASCII address and no SMTPUTF8")));
            }
            options.push(MailParameter::SmtpUtfEight);
        }
        if !mail.is_ascii() {
            if !conn.server_info().supports_feature(Extension::EightBitMime) {
                return Err(Step::Mail(SmtpError::Unsupported("non-ASCII content and no 8BITMIME")));
            }
            options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        within(self.timeout, conn.command(Mail::new(envelope.from().cloned(), options))).await.map_err(Step::Mail)?;
        for to in envelope.to() {
            within(self.timeout, conn.command(Rcpt::new(to.clone(), vec![]))).await.map_err(Step::Later)?;
        }
        within(self.timeout, conn.command(Data)).await.map_err(Step::Later)?;
        within(DATA_END_TIMEOUT.max(self.timeout), conn.message(mail)).await.map_err(Step::Later)?;
        Ok(())
    }

    /// The most recently used idle connection (tested first if it idled a while), or a new one;
    /// `true` with a reused one. A connection given up is dropped without `QUIT`: on a
    /// half-open one that would only hold the wait up.
    async fn checkout(&self) -> Result<(AsyncSmtpConnection, bool), SmtpError> {
        loop {
            let next = self.idle.lock().expect("pool lock").pop();
            let Some((mut conn, since)) = next else { break };
            let idle = since.elapsed();
            if idle > MAX_IDLE {
                continue;
            }
            if idle < TEST_IDLE_AFTER || conn.test_connected().await {
                return Ok((conn, true));
            }
        }
        Ok((self.connect().await?, false))
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, SmtpError> {
        let s = &self.server;
        let mut conn = match &s.tls {
            Tls::Wrapper(params) => {
                AsyncSmtpConnection::connect_tokio1(
                    (s.host.as_str(), s.port),
                    Some(self.timeout),
                    &s.hello,
                    Some(params.clone()),
                    None,
                )
                .await?
            }
            _ => {
                // The error names where it tried: a wrong SMTP_URL host or port is then plain.
                let at = |e: std::io::Error| {
                    SmtpError::Connect(std::io::Error::new(e.kind(), format!("{}:{}: {e}", s.host, s.port)))
                };
                let tcp = tokio::net::TcpStream::connect((s.host.as_str(), s.port)).await.map_err(at)?;
                tcp.set_nodelay(true).map_err(SmtpError::Connect)?;
                AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &s.hello).await?
            }
        };
        match &s.tls {
            Tls::Required(params) => conn.starttls(params.clone(), &s.hello).await?,
            Tls::Opportunistic(params) if conn.can_starttls() => conn.starttls(params.clone(), &s.hello).await?,
            _ => {}
        }
        if let Some(credentials) = &s.credentials {
            conn.auth(DEFAULT_MECHANISMS, credentials).await?;
        }
        Ok(conn)
    }
}

/// Where a transaction failed: at `MAIL FROM` (nothing of the mail sent yet) or later.
enum Step {
    Mail(SmtpError),
    Later(SmtpError),
}

/// `step` bounded by `limit`.
async fn within<T, E: Into<SmtpError>>(
    limit: Duration,
    step: impl Future<Output = Result<T, E>>,
) -> Result<T, SmtpError> {
    match tokio::time::timeout(limit, step).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(SmtpError::Timeout(limit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(url: &str) -> Server {
        SmtpPool::from_url(url, Duration::from_secs(1), 1).unwrap().server
    }

    #[test]
    fn urls_are_read_like_lettre_reads_them() {
        let s = parsed("smtp://127.0.0.1:1025");
        assert_eq!((s.host.as_str(), s.port, matches!(s.tls, Tls::None)), ("127.0.0.1", 1025, true));
        assert!(s.credentials.is_none());
        let s = parsed("smtp://mail.example.com?tls=required");
        assert_eq!((s.port, matches!(s.tls, Tls::Required(_))), (587, true));
        let s = parsed("smtp://mail.example.com?tls=opportunistic");
        assert!(matches!(s.tls, Tls::Opportunistic(_)));
        let s = parsed("smtps://u%40x:p%2Fw@mail.example.com/me.example");
        assert_eq!((s.port, matches!(s.tls, Tls::Wrapper(_))), (465, true));
        assert_eq!(s.credentials, Some(Credentials::new("u@x".into(), "p/w".into())));
        assert_eq!(s.hello, ClientId::Domain("me.example".into()));
        assert_eq!(parsed("smtp://[::1]:25").host, "::1");
    }

    #[test]
    fn bad_urls_are_refused_with_the_key_named() {
        for url in ["mail.example.com", "http://mail.example.com", "smtp://h?tls=maybe", "smtp://"] {
            let e = SmtpPool::from_url(url, Duration::from_secs(1), 1).err().map(|e| e.to_string());
            assert!(e.as_deref().is_some_and(|e| e.contains("SMTP_URL")), "{url}: {e:?}");
        }
    }
}
