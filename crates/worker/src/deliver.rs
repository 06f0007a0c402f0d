//! One delivery attempt: envelope in, [`Outcome`] out. The send guard runs first; panics are
//! caught and count as a failed attempt, so one bad message cannot take the process down.

use crate::{
    channels::{email::EmailSender, smtp::Slot, webhook::WebhookSender},
    outcome::DeadReason,
    Outcome,
};
use chrono::SecondsFormat;
use futures_util::FutureExt;
use notify_store::{Claim, DeliveryKey, DeliveryState, NewInboxItem, Store, StoreError};
use notify_types::{routes::Routes, Channel, EmailMessage, Envelope, EventPayload, InAppMessage, Kind, WebhookMessage};
use std::{panic::AssertUnwindSafe, sync::Arc};

pub struct Deliverer {
    /// Deliveries share it; a suspect (a redelivered message whose last delivery died mid-way)
    /// takes it alone, so if it crashes the process again, no other message is implicated.
    pub gate: tokio::sync::RwLock<()>,
    pub crash_limit: u32,
    pub email: EmailSender,
    pub webhook: WebhookSender,
    pub routes: Arc<Routes>,
    pub store: Store,
    pub webhook_secret: Option<String>,
}

impl Deliverer {
    /// Claims (notification, channel) in the send guard, then sends. `redelivered` is the
    /// broker's flag: only such a message can be a suspect.
    pub async fn deliver(&self, channel: Channel, env: &Envelope, attempt: u32, redelivered: bool) -> Outcome {
        // Before the claim; released when the send is done, before the outcome is recorded.
        let email_slot = match channel {
            Channel::Email => Some(self.email.reserve().await),
            _ => None,
        };
        let suspect = redelivered && self.unfinished(channel, env).await;
        let _shared;
        let _alone;
        if suspect {
            tracing::warn!("its last delivery died mid-way: delivering it alone");
            _alone = self.gate.write().await;
        } else {
            _shared = self.gate.read().await;
        }
        // An in-app delivery is one statement that inserts the item and records it delivered,
        // idempotent by itself (a second insert of the same item does nothing), so its first
        // attempt needs no claim. A redelivery or a retry claims as every channel does: that
        // is where a delivery that died mid-way is counted.
        let guarded_by_insert = channel == Channel::InApp && !redelivered && attempt == 1;
        let claim = if guarded_by_insert {
            Ok(Claim::Proceed)
        } else {
            // Named by its publish: a second copy of this id (an idempotent retry's) that finds
            // this one being delivered acks instead of sending again.
            let copy = format!("{} {}", env.correlation_id, env.created_at.to_rfc3339_opts(SecondsFormat::Nanos, true));
            self.store
                .claim_copy(DeliveryKey::new(env.id, channel), env.event.as_deref(), attempt as i32, Some(&copy))
                .await
        };
        match claim {
            Ok(Claim::Proceed) => {}
            Ok(Claim::Unfinished { crashes }) if crashes >= self.crash_limit as i32 => {
                return Outcome::Dead {
                    reason: DeadReason::CrashedWorker,
                    error: format!("{crashes} deliveries of this message died mid-way (WORKER_CRASH_LIMIT)"),
                }
            }
            Ok(Claim::Unfinished { crashes }) => tracing::warn!(crashes, "the previous delivery did not finish"),
            Ok(Claim::AlreadyDelivered) => return Outcome::AlreadyDelivered,
            Err(e) => return defer(e),
        }
        match AssertUnwindSafe(self.send(channel, env, email_slot.as_ref())).catch_unwind().await {
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

    /// Whether this (notification, channel) was left mid-delivery. Errors count as no: the
    /// claim that follows will meet the same database.
    async fn unfinished(&self, channel: Channel, env: &Envelope) -> bool {
        match self.store.delivery_status(env.id).await {
            Ok(rows) => rows.iter().any(|r| r.channel == channel && r.status == DeliveryState::Delivering),
            Err(_) => false,
        }
    }

    /// Records the final outcome of an attempt (the status endpoint reads it).
    pub async fn record(
        &self,
        channel: Channel,
        env: &Envelope,
        attempt: u32,
        outcome: &Outcome,
    ) -> Result<(), StoreError> {
        let key = DeliveryKey::new(env.id, channel);
        let result = match outcome {
            // An in-app delivery is the inbox insert, which marked it delivered in the same
            // statement: nothing is left to record.
            Outcome::Delivered if channel == Channel::InApp => Ok(()),
            Outcome::Delivered => self.store.mark_delivered(key).await,
            Outcome::Retry { error, .. } | Outcome::Defer { error } => {
                self.store.mark_retrying(key, env.event.as_deref(), error).await
            }
            Outcome::Dead { reason, error } => {
                self.store.mark_dead(key, env.event.as_deref(), attempt as i32, error, reason.as_str()).await
            }
            Outcome::AlreadyDelivered | Outcome::RecordLater { .. } => Ok(()),
        };
        if let Err(e) = &result {
            tracing::warn!(error = %e, "could not record the delivery state");
        }
        result
    }

    async fn send(&self, channel: Channel, env: &Envelope, email_slot: Option<&Slot<'_>>) -> Outcome {
        if let Some(panic) = env.payload.get("__notify_test_panic").and_then(|v| v.as_str()) {
            // Lets the fault tests prove that a panicking delivery is contained; inert unless
            // the worker runs with NOTIFY_ALLOW_TEST_PANIC set.
            if std::env::var_os("NOTIFY_ALLOW_TEST_PANIC").is_some() {
                panic!("{panic}");
            }
        }
        if env.payload.get("__notify_test_abort").is_some() && std::env::var_os("NOTIFY_ALLOW_TEST_PANIC").is_some() {
            // A crash that no catch_unwind contains: the crash tests prove that the queue's
            // delivery limit dead-letters a message that keeps killing workers.
            tracing::error!("test hook: aborting the process");
            std::process::abort();
        }
        match (env.kind, channel) {
            (Kind::Direct, Channel::Email) => match parse::<EmailMessage>(env) {
                Ok(msg) => self.email.send(email_slot.expect(EMAIL_SLOT), env, &msg).await,
                Err(o) => o,
            },
            (Kind::Direct, Channel::Webhook) => match parse::<WebhookMessage>(env) {
                Ok(msg) => {
                    let body = serde_json::to_vec(&msg.payload).unwrap_or_default();
                    self.webhook.send(&env.id.to_string(), &msg.url, self.webhook_secret.as_deref(), &body).await
                }
                Err(o) => o,
            },
            (Kind::Direct, Channel::InApp) => match parse::<InAppMessage>(env) {
                Ok(msg) => self.inbox(env, msg).await,
                Err(o) => o,
            },
            (Kind::Event, channel) => self.send_event(channel, env, email_slot).await,
        }
    }

    async fn send_event(&self, channel: Channel, env: &Envelope, email_slot: Option<&Slot<'_>>) -> Outcome {
        let Some(event) = env.event.as_deref() else {
            return Outcome::dead("event envelope without an event name");
        };
        let ev: EventPayload = match parse(env) {
            Ok(ev) => ev,
            Err(o) => return o,
        };
        let ctx = serde_json::json!({
            "id": env.id, "event": event, "user_target": ev.user_target, "payload": ev.payload,
            "created_at": env.created_at,
        });
        let template_error =
            |e: String| Outcome::Dead { reason: DeadReason::Permanent, error: format!("template error: {e}") };
        match channel {
            Channel::Email => match self.routes.render_email(event, &ctx) {
                Ok(msg) => self.email.send(email_slot.expect(EMAIL_SLOT), env, &msg).await,
                Err(e) => template_error(e),
            },
            Channel::InApp => match self.routes.render_in_app(event, &ctx) {
                Ok(msg) => self.inbox(env, msg).await,
                Err(e) => template_error(e),
            },
            Channel::Webhook => {
                let Some(route) = self.routes.webhook(event) else {
                    return Outcome::dead(format!("event `{event}` has no webhook route in this worker's routes file"));
                };
                // The Standard Webhooks payload shape: type, timestamp, data.
                let body = serde_json::json!({
                    "type": event,
                    "timestamp": env.created_at,
                    "data": {"id": env.id, "user_target": ev.user_target, "payload": ev.payload},
                });
                let body = serde_json::to_vec(&body).unwrap_or_default();
                self.webhook.send(&env.id.to_string(), &route.url, route.secret.as_deref(), &body).await
            }
        }
    }

    async fn inbox(&self, env: &Envelope, msg: InAppMessage) -> Outcome {
        if msg.user.trim().is_empty() {
            return Outcome::dead("in-app notification without a user");
        }
        let item = NewInboxItem {
            notification_id: env.id,
            user: msg.user,
            title: msg.title,
            body: msg.body,
            data: msg.data,
            event: env.event.clone(),
            created_at: env.created_at,
        };
        // Inserting the item and marking the delivery happen in one transaction: a
        // redelivery can never add a second item.
        match self.store.insert_inbox_item(&item).await {
            Ok(true) => Outcome::Delivered,
            // The item was there already: a publisher's retry of the same notification.
            Ok(false) => Outcome::AlreadyDelivered,
            Err(e) => defer(e),
        }
    }
}

const EMAIL_SLOT: &str = "deliver() reserves an SMTP slot for every e-mail";

fn parse<T: serde::de::DeserializeOwned>(env: &Envelope) -> Result<T, Outcome> {
    serde_json::from_value(env.payload.clone()).map_err(|e| Outcome::dead(format!("payload is invalid: {e}")))
}

fn defer(e: StoreError) -> Outcome {
    if e.is_unavailable() {
        Outcome::Defer { error: e.to_string() }
    } else {
        Outcome::retry(e.to_string())
    }
}
