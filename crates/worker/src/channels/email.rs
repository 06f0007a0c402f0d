//! E-mail over SMTP: lettre builds the mail, [`SmtpPool`] sends it.

use super::smtp::{Slot, SmtpPool};
use crate::outcome::Outcome;
use base64::Engine;
use lettre::{
    message::{
        header::{ContentType, HeaderName, HeaderValue},
        Mailbox, MultiPart, SinglePart,
    },
    Message,
};
use notify_types::{EmailMessage, Envelope};
use std::{sync::Arc, time::Duration};

#[derive(Clone)]
pub struct EmailSender {
    pool: Arc<SmtpPool>,
    from: Mailbox,
}

impl EmailSender {
    pub fn new(url: &str, from: &str, timeout: Duration, pool_size: u32) -> anyhow::Result<Self> {
        let pool = SmtpPool::from_url(url, timeout, pool_size)?;
        Ok(EmailSender { pool: Arc::new(pool), from: from.parse()? })
    }

    /// The SMTP pool, for its usage gauges.
    pub fn pool(&self) -> Arc<SmtpPool> {
        self.pool.clone()
    }

    /// Waits for one of the SMTP pool's conversations (see [`Slot`]).
    pub async fn reserve(&self) -> Slot<'_> {
        self.pool.reserve().await
    }

    /// Sends one e-mail in the conversation `slot` reserved. The `Message-ID` is derived from the notification id so a receiver
    /// can drop the rare duplicate left by a crash between send and ack.
    pub async fn send(&self, slot: &Slot<'_>, env: &Envelope, msg: &EmailMessage) -> Outcome {
        let message = match self.build(env, msg) {
            Ok(m) => m,
            Err(e) => return Outcome::dead(e),
        };
        match self.pool.send(slot, message.envelope(), &message.formatted()).await {
            Ok(_) => Outcome::Delivered,
            Err(e) if e.is_permanent() => Outcome::dead(format!("SMTP refused the mail: {e}")),
            Err(e) => Outcome::retry(format!("SMTP failed: {e}")),
        }
    }

    fn build(&self, env: &Envelope, msg: &EmailMessage) -> Result<Message, String> {
        let to: Mailbox = msg.to.parse().map_err(|e| format!("bad recipient `{}`: {e}", msg.to))?;
        let subject = subject_header(&msg.subject)?;
        let builder =
            Message::builder().from(self.from.clone()).to(to).raw_header(subject).message_id(Some(message_id(env)));
        let (body, html) = (crlf(&msg.body), msg.html.as_deref().map(crlf));
        let built = match html {
            Some(html) => builder.multipart(MultiPart::alternative_plain_html(body, html)),
            None => builder.singlepart(SinglePart::builder().header(ContentType::TEXT_PLAIN).body(body)),
        };
        built.map_err(|e| format!("cannot build the mail: {e}"))
    }
}

/// RFC 5322's limit on a line, and so on an unfolded subject.
pub const MAX_SUBJECT_CHARS: usize = 998;
/// Longest run without a space that lettre's folding is left to handle; a longer one would
/// make a header line it cannot fold.
const MAX_UNFOLDED_WORD: usize = 60;
/// Bytes of UTF-8 per RFC 2047 encoded word: 52 base64 characters, a 64-octet word, so even
/// the first line (after `Subject: `) stays within RFC 5322's recommended 78.
const ENCODED_WORD_BYTES: usize = 39;

/// Every line break as CRLF, whatever the sender used. A bare CR or LF never reaches the SMTP
/// data, where a relay that ends lines on a lone CR would read what follows as commands
/// (SMTP smuggling); the SMTP client then dot-stuffs whole lines only.
pub fn crlf(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 32);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                chars.next_if_eq(&'\n');
                out.push_str("\r\n");
            }
            '\n' => out.push_str("\r\n"),
            c => out.push(c),
        }
    }
    out
}

/// The `Subject` header of a (possibly rendered) subject: control characters become spaces
/// (they never reach a header), over [`MAX_SUBJECT_CHARS`] is a permanent failure, and a subject
/// with a word too long to fold is sent as RFC 2047 encoded words, so no header line exceeds
/// RFC 5322's 998 octets.
pub fn subject_header(subject: &str) -> Result<HeaderValue, String> {
    let clean: String = subject.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let chars = clean.chars().count();
    if chars > MAX_SUBJECT_CHARS {
        return Err(format!("the subject is {chars} characters long; RFC 5322 allows at most {MAX_SUBJECT_CHARS}"));
    }
    let name = HeaderName::new_from_ascii_str("Subject");
    if clean.split(' ').all(|word| word.len() <= MAX_UNFOLDED_WORD) {
        return Ok(HeaderValue::new(name, clean));
    }
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in clean.chars() {
        if chunk.len() + c.len_utf8() > ENCODED_WORD_BYTES {
            words.push(encoded_word(&chunk));
            chunk.clear();
        }
        chunk.push(c);
    }
    if !chunk.is_empty() {
        words.push(encoded_word(&chunk));
    }
    Ok(HeaderValue::dangerous_new_pre_encoded(name, clean, words.join("\r\n ")))
}

fn encoded_word(text: &str) -> String {
    format!("=?utf-8?b?{}?=", base64::engine::general_purpose::STANDARD.encode(text))
}

pub fn message_id(env: &Envelope) -> String {
    format!("<{}@notify>", env.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_break_becomes_crlf() {
        assert_eq!(crlf("a\r.\rRCPT TO:<x@evil.example>\r"), "a\r\n.\r\nRCPT TO:<x@evil.example>\r\n");
        assert_eq!(crlf("a\nb\r\nc\n\rd"), "a\r\nb\r\nc\r\n\r\nd");
        assert_eq!(crlf("plain"), "plain");
    }

    fn encoded(subject: &str) -> String {
        let mut headers = lettre::message::header::Headers::new();
        headers.insert_raw(subject_header(subject).unwrap());
        headers.to_string()
    }

    #[test]
    fn subject_lines_stay_within_rfc_5322() {
        for subject in ["a".repeat(998), format!("{} tail", "ü".repeat(500)), "word ".repeat(199)] {
            let header = encoded(&subject);
            assert!(header.split("\r\n").all(|line| line.len() <= 78), "{header}");
        }
        assert_eq!(encoded("Hello there"), "Subject: Hello there\r\n");
        assert!(subject_header(&"a".repeat(999)).unwrap_err().contains("999 characters"));
    }

    #[test]
    fn control_characters_never_reach_a_header() {
        let header = encoded("a\u{b}b\u{c}c\u{1b}[31md\0e\r\nBcc: x@evil.example");
        assert!(!header.trim_end().bytes().any(|b| b.is_ascii_control() && b != b'\r' && b != b'\n'), "{header:?}");
        assert!(!header.contains("\r\nBcc"), "{header:?}");
    }
}
