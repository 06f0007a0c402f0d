//! One delivery attempt: envelope in, [`Outcome`] out. Panics are caught and count as a
//! failed attempt, so one bad message cannot take the process down.

use crate::{channels::email::EmailSender, Outcome};
use futures_util::FutureExt;
use notify_types::{Channel, EmailMessage, Envelope};
use std::panic::AssertUnwindSafe;

pub struct Deliverer {
    pub email: EmailSender,
}

impl Deliverer {
    pub async fn deliver(&self, channel: Channel, env: &Envelope) -> Outcome {
        match AssertUnwindSafe(self.deliver_inner(channel, env)).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Outcome::retry(format!("delivery panicked: {what}"))
            }
        }
    }

    async fn deliver_inner(&self, channel: Channel, env: &Envelope) -> Outcome {
        match channel {
            Channel::Email => match serde_json::from_value::<EmailMessage>(env.payload.clone()) {
                Ok(msg) => self.email.send(env, &msg).await,
                Err(e) => Outcome::dead(format!("e-mail payload is invalid: {e}")),
            },
            other => Outcome::dead(format!("channel {other} is not delivered by this worker version")),
        }
    }
}
