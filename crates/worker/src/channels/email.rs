//! E-mail over SMTP: lettre builds the mail, [`SmtpPool`] sends it.

use super::smtp::{Slot, SmtpPool};
use crate::Outcome;
use lettre::{
    message::{header::ContentType, Mailbox, MultiPart, SinglePart},
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
        let builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(msg.subject.clone())
            .message_id(Some(message_id(env)));
        let built = match &msg.html {
            Some(html) => builder.multipart(MultiPart::alternative_plain_html(msg.body.clone(), html.clone())),
            None => builder.singlepart(SinglePart::builder().header(ContentType::TEXT_PLAIN).body(msg.body.clone())),
        };
        built.map_err(|e| format!("cannot build the mail: {e}"))
    }
}

pub fn message_id(env: &Envelope) -> String {
    format!("<{}@notify>", env.id)
}
