//! What one delivery will do, built from the envelope before anything is claimed or sent:
//! payloads parsed, event templates rendered, the e-mail's SMTP slot reserved. A message that
//! can't become a job is dead here, without touching the send guard.

use crate::{
    channels::smtp::Slot,
    deliver::Deliverer,
    outcome::{DeadReason, Outcome},
};
use notify_store::NewInboxItem;
use notify_types::{
    routes::RenderError, Channel, EmailMessage, Envelope, EventPayload, InAppMessage, Kind, WebhookMessage,
};

pub enum Job<'a> {
    /// An e-mail, holding one of the SMTP pool's conversations: the slot is taken before the
    /// send guard's claim, so no more e-mails are claimed than can be talking to the relay.
    Email { slot: Slot<'a>, message: EmailMessage },
    /// A JSON body POSTed to `url` (signed with `secret`).
    Webhook { url: String, secret: Option<String>, body: Vec<u8> },
    /// An inbox item.
    InApp(NewInboxItem),
}

impl<'a> Job<'a> {
    pub async fn build(deliverer: &'a Deliverer, channel: Channel, env: &Envelope) -> Result<Job<'a>, Outcome> {
        match (env.kind, channel) {
            (Kind::Direct, Channel::Email) => {
                let message: EmailMessage = parse(env)?;
                Ok(Job::Email { slot: deliverer.email.reserve().await, message })
            }
            (Kind::Direct, Channel::Webhook) => {
                let msg: WebhookMessage = parse(env)?;
                Ok(Job::Webhook { url: msg.url, secret: deliverer.webhook_secret.clone(), body: json(&msg.payload)? })
            }
            (Kind::Direct, Channel::InApp) => inbox(env, parse(env)?),
            (Kind::Event, channel) => Job::event(deliverer, channel, env).await,
        }
    }

    /// An event rendered through the worker's routes file for `channel`.
    async fn event(deliverer: &'a Deliverer, channel: Channel, env: &Envelope) -> Result<Job<'a>, Outcome> {
        let Some(event) = env.event.as_deref() else {
            return Err(Outcome::dead("event envelope without an event name"));
        };
        let ev: EventPayload = parse(env)?;
        let ctx = serde_json::json!({
            "id": env.id, "event": event, "user_target": ev.user_target, "payload": ev.payload,
            "created_at": env.created_at,
        });
        let routes = &deliverer.routes;
        let template_error =
            |e: RenderError| Outcome::Dead { reason: DeadReason::Permanent, error: format!("template error: {e}") };
        match channel {
            Channel::Email => {
                let message = routes.render_email(event, &ctx).map_err(template_error)?;
                Ok(Job::Email { slot: deliverer.email.reserve().await, message })
            }
            Channel::InApp => inbox(env, routes.render_in_app(event, &ctx).map_err(template_error)?),
            Channel::Webhook => {
                let Some(route) = routes.webhook(event) else {
                    return Err(Outcome::dead(format!(
                        "event `{event}` has no webhook route in this worker's routes file"
                    )));
                };
                // The Standard Webhooks payload shape: type, timestamp, data.
                let body = serde_json::json!({
                    "type": event,
                    "timestamp": env.created_at,
                    "data": {"id": env.id, "user_target": ev.user_target, "payload": ev.payload},
                });
                Ok(Job::Webhook { url: route.url.clone(), secret: route.secret.clone(), body: json(&body)? })
            }
        }
    }
}

fn inbox<'a>(env: &Envelope, msg: InAppMessage) -> Result<Job<'a>, Outcome> {
    if msg.user.trim().is_empty() {
        return Err(Outcome::dead("in-app notification without a user"));
    }
    Ok(Job::InApp(NewInboxItem {
        notification_id: env.id,
        user: msg.user,
        title: msg.title,
        body: msg.body,
        data: msg.data,
        event: env.event.clone(),
        created_at: env.created_at,
    }))
}

fn parse<T: serde::de::DeserializeOwned>(env: &Envelope) -> Result<T, Outcome> {
    serde_json::from_value(env.payload.clone()).map_err(|e| Outcome::dead(format!("payload is invalid: {e}")))
}

/// A webhook body. Serialising a `serde_json::Value` cannot fail today; if it ever does, the
/// message is dead rather than POSTed with an empty body.
fn json(value: &serde_json::Value) -> Result<Vec<u8>, Outcome> {
    serde_json::to_vec(value).map_err(|e| Outcome::dead(format!("cannot serialise the webhook body: {e}")))
}
