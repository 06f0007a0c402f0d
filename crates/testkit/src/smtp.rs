//! A real SMTP server on 127.0.0.1 for tests: it speaks enough RFC 5321 for lettre's pooled
//! async client (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT; PIPELINING, 8BITMIME and
//! SMTPUTF8 advertised; no STARTTLS, no AUTH), records every accepted mail, and can be told to
//! refuse ([`SmtpServer::script`], [`SmtpServer::always`]) or to hold mails in flight
//! ([`SmtpServer::set_delay`]).
//!
//! The reply to a transaction is chosen at the end of DATA, the way a real relay refuses: the
//! client has sent the whole message and learns only then that it must retry or give up.

mod session;

use mail_parser::{MessageParser, PartType};
use std::{collections::VecDeque, net::SocketAddr, sync::Arc, time::Duration};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

/// A running test SMTP server. Cloning shares the server; it stops when the last clone drops.
#[derive(Clone)]
pub struct SmtpServer {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    state: Arc<watch::Sender<State>>,
    accept_task: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The sessions live in a JoinSet owned by the accept task, so this ends them too.
        self.accept_task.abort();
    }
}

/// What the sessions record and the test reads. It lives in a watch channel so that waiting
/// for mails is a notification, not a sleep loop.
#[derive(Default)]
struct State {
    mails: Vec<Mail>,
    attempts: usize,
    in_progress: usize,
    script: VecDeque<Reply>,
    always: Option<Reply>,
    delay: Duration,
    /// Close a connection after this many transactions (a relay's per-session limit).
    per_connection: Option<usize>,
    connections: usize,
}

impl State {
    /// The reply for the transaction that just finished its DATA: the script first, then the
    /// standing order, then acceptance.
    fn next_reply(&mut self) -> Reply {
        self.script.pop_front().or_else(|| self.always.clone()).unwrap_or_else(Reply::accepted)
    }
}

impl SmtpServer {
    /// Starts a server on 127.0.0.1 with a free port that accepts every mail.
    pub async fn start() -> SmtpServer {
        SmtpServer::start_on("127.0.0.1:0".parse().expect("a socket address"))
            .await
            .expect("binding the test SMTP server to 127.0.0.1:0")
    }

    /// Starts a server on `addr` (port 0: a free one) that accepts every mail; used by the
    /// `notify-mailcatcher` binary, which listens on a fixed port.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<SmtpServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(watch::Sender::new(State::default()));
        let accept_task = tokio::spawn(session::accept_loop(listener, state.clone()));
        Ok(SmtpServer { inner: Arc::new(Inner { addr, state, accept_task }) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `smtp://127.0.0.1:PORT`: plain SMTP, no TLS, no credentials.
    pub fn url(&self) -> String {
        format!("smtp://{}", self.inner.addr)
    }

    /// Replies for the next transactions, one consumed per transaction at the end of DATA;
    /// afterwards the server accepts again (or applies [`SmtpServer::always`]). A refused mail
    /// is not in [`SmtpServer::mails`] but counts in [`SmtpServer::attempts`]. Replaces any
    /// script not yet consumed.
    pub fn script(&self, replies: Vec<Reply>) {
        self.inner.state.send_modify(|s| s.script = replies.into_iter().collect());
    }

    /// Every transaction gets `reply` from now on (after any script), until [`SmtpServer::reset`].
    pub fn always(&self, reply: Reply) {
        self.inner.state.send_modify(|s| s.always = Some(reply));
    }

    /// Accept everything again: clears the script, the standing reply and the delay. Recorded
    /// mails and counters stay.
    pub fn reset(&self) {
        self.inner.state.send_modify(|s| {
            s.script.clear();
            s.always = None;
            s.delay = Duration::ZERO;
        });
    }

    /// Holds each accepted mail this long before answering the end of DATA, so deliveries stay
    /// in flight (e.g. while a test stops the worker).
    pub fn set_delay(&self, delay: Duration) {
        self.inner.state.send_modify(|s| s.delay = delay);
    }

    /// Closes each connection, without a word, right after its `n`th transaction — as relays
    /// with a per-session message limit or a short idle timeout do. A client finds out at its
    /// next command.
    pub fn close_after(&self, n: usize) {
        self.inner.state.send_modify(|s| s.per_connection = Some(n.max(1)));
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.inner.state.borrow().connections
    }

    /// Accepted mails in the order they were accepted.
    pub fn mails(&self) -> Vec<Mail> {
        self.inner.state.borrow().mails.clone()
    }

    /// Transactions that reached the end of DATA, accepted or refused.
    pub fn attempts(&self) -> usize {
        self.inner.state.borrow().attempts
    }

    /// Transactions whose DATA has arrived and which are not yet accepted (in `mails()`) or
    /// refused.
    pub fn in_progress(&self) -> usize {
        self.inner.state.borrow().in_progress
    }

    /// Waits until at least `n` mails were accepted and returns all of them.
    ///
    /// # Panics
    /// After `timeout`, saying how many mails and attempts arrived.
    pub async fn wait_for_mails(&self, n: usize, timeout: Duration) -> Vec<Mail> {
        self.wait_until(timeout, |s| s.mails.len() >= n, &format!("{n} accepted mail(s)")).await;
        self.mails()
    }

    /// Waits until [`SmtpServer::attempts`] is at least `n`.
    ///
    /// # Panics
    /// After `timeout`, saying how many attempts and mails arrived.
    pub async fn wait_for_attempts(&self, n: usize, timeout: Duration) {
        self.wait_until(timeout, |s| s.attempts >= n, &format!("{n} attempt(s)")).await;
    }

    async fn wait_until(&self, timeout: Duration, done: impl FnMut(&State) -> bool, what: &str) {
        let mut changes = self.inner.state.subscribe();
        // `wait_for` checks the current state first, then wakes on every change the sessions
        // publish; the sender lives as long as `self`, so it cannot fail.
        let reached = tokio::time::timeout(timeout, changes.wait_for(done)).await;
        if reached.is_err() {
            let s = self.inner.state.borrow();
            panic!(
                "test SMTP server {}: waited {timeout:?} for {what}, but {} mail(s) were \
                 accepted out of {} attempt(s) ({} in progress)",
                self.inner.addr,
                s.mails.len(),
                s.attempts,
                s.in_progress,
            );
        }
    }
}

/// An SMTP reply: `code` and the text after it (which may carry an enhanced status code).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, text: &str) -> Reply {
        Reply { code, text: text.to_string() }
    }

    /// `451 4.3.0 try again later`: lettre reports it as `is_transient()`.
    pub fn transient() -> Reply {
        Reply::new(451, "4.3.0 try again later")
    }

    /// `550 5.1.1 mailbox unavailable`: lettre reports it as `is_permanent()`.
    pub fn permanent() -> Reply {
        Reply::new(550, "5.1.1 mailbox unavailable")
    }

    fn accepted() -> Reply {
        Reply::new(250, "2.0.0 OK: queued")
    }

    /// 2xx: the mail is taken and recorded.
    fn accepts(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// The reply on the wire; a text with several lines becomes a multi-line reply.
    fn to_wire(&self) -> String {
        let lines: Vec<&str> = self.text.lines().collect();
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.push_str(&format!("{}{sep}{line}\r\n", self.code));
        }
        if lines.is_empty() {
            out.push_str(&format!("{}\r\n", self.code));
        }
        out
    }
}

/// One accepted mail: the SMTP envelope, the raw message and its decoded parts.
#[derive(Clone, Debug)]
pub struct Mail {
    /// Envelope sender (`MAIL FROM`), without angle brackets; empty for the null sender.
    pub from: String,
    /// Envelope recipients (`RCPT TO`), without angle brackets, in order.
    pub to: Vec<String>,
    /// The message as received, dot-unstuffed, CRLF line ends, ending with the last line's CRLF.
    pub raw: String,
    /// Decoded `Subject` (RFC 2047 encoded words resolved); empty if missing.
    pub subject: String,
    /// The decoded text/plain body (quoted-printable or base64 undone), exactly as the sender
    /// wrote it (without the line end SMTP adds after the last line); converted from the HTML
    /// part if there is no text part.
    pub text_body: String,
    /// The decoded text/html part, if the mail has one.
    pub html_body: Option<String>,
    /// The `Message-ID` header with its angle brackets, e.g. `<id@host>`.
    pub message_id: Option<String>,
    /// When the server took the mail (just before its 250 reply). A real relay keeps a mail
    /// it took even if the client is gone by the time the reply is sent.
    pub accepted_at: std::time::Instant,
}

impl Mail {
    fn parse(from: String, to: Vec<String>, raw: String) -> Mail {
        let mut mail = Mail {
            from,
            to,
            raw,
            subject: String::new(),
            text_body: String::new(),
            html_body: None,
            message_id: None,
            accepted_at: std::time::Instant::now(),
        };
        // SMTP ends the data with the last line's CRLF even when the sender's message did not
        // end with one (lettre always writes `CRLF . CRLF` after the message). Parsing without
        // it gives back the sender's exact text, whatever the transfer encoding.
        let sent = mail.raw.strip_suffix("\r\n").unwrap_or(&mail.raw);
        let Some(message) = MessageParser::default().parse(sent.as_bytes()) else {
            return mail;
        };
        mail.subject = message.subject().unwrap_or_default().to_string();
        mail.message_id = message.message_id().map(|id| format!("<{id}>"));
        // `body_text` converts from HTML when there is no text part; `body_html` converts from
        // text when there is no HTML part, which must not count as an HTML body.
        mail.text_body = message.body_text(0).map(|text| text.into_owned()).unwrap_or_default();
        mail.html_body = message.html_part(0).and_then(|part| match &part.body {
            PartType::Html(html) => Some(html.to_string()),
            _ => None,
        });
        mail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_written_as_single_or_multi_line() {
        assert_eq!(Reply::transient().to_wire(), "451 4.3.0 try again later\r\n");
        assert_eq!(Reply::new(554, "first\nsecond").to_wire(), "554-first\r\n554 second\r\n");
        assert_eq!(Reply::new(250, "").to_wire(), "250\r\n");
    }

    #[test]
    fn script_comes_before_the_standing_reply_and_then_acceptance() {
        let mut state = State { script: vec![Reply::transient()].into(), ..State::default() };
        assert_eq!(state.next_reply(), Reply::transient());
        assert!(state.next_reply().accepts());
        state.always = Some(Reply::permanent());
        assert_eq!(state.next_reply(), Reply::permanent());
    }

    #[test]
    fn quoted_printable_multipart_is_decoded() {
        let raw = "From: a@example.com\r\nTo: b@example.com\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\
                   Message-ID: <id-1@example.com>\r\nMIME-Version: 1.0\r\n\
                   Content-Type: multipart/alternative; boundary=\"XX\"\r\n\r\n\
                   --XX\r\nContent-Type: text/plain; charset=utf-8\r\n\
                   Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe\r\n\
                   --XX\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>hi</p>\r\n--XX--\r\n";
        let mail = Mail::parse("a@example.com".into(), vec![], raw.into());
        assert_eq!(mail.subject, "Grüße");
        assert_eq!(mail.text_body, "Grüße");
        assert_eq!(mail.html_body.as_deref(), Some("<p>hi</p>"));
        assert_eq!(mail.message_id.as_deref(), Some("<id-1@example.com>"));
    }

    #[test]
    fn a_text_only_mail_has_no_html_body() {
        let raw = "Subject: plain\r\n\r\nline one\r\nline two\r\n";
        let mail = Mail::parse(String::new(), vec![], raw.into());
        assert_eq!(mail.text_body, "line one\r\nline two");
        assert_eq!(mail.html_body, None);
        assert_eq!(mail.message_id, None);
    }
}
