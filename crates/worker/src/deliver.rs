//! Step 2 of `pipeline::process`: one delivery attempt, [`Received`] in, [`Outcome`] out. The
//! job is built (nothing claimed yet), the send guard claims (notification, channel), then the
//! job runs. Panics are caught and count as a failed attempt, so one bad message cannot take
//! the process down.

use crate::{
    channels::{email::EmailSender, webhook::WebhookSender},
    job::Job,
    outcome::{DeadReason, Outcome},
    received::Received,
};
use chrono::SecondsFormat;
use futures_util::FutureExt;
use notify_store::{Claim, DeliveryKey, DeliveryState, Store, StoreError};
use notify_types::{routes::Routes, Channel, Envelope};
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
    pub async fn deliver(&self, received: &Received) -> Outcome {
        let env = match &received.envelope {
            Ok(env) => env,
            Err(e) => return Outcome::Dead { reason: DeadReason::Unparseable, error: e.to_string() },
        };
        // Sent before, recording failed: only the record is due, never a second send.
        if received.sent {
            return Outcome::Delivered;
        }
        let channel = received.channel;
        let job = match Job::build(self, channel, env).await {
            Ok(job) => job,
            Err(dead) => return dead,
        };
        let suspect = received.redelivered && self.unfinished(channel, env).await;
        let _shared;
        let _alone;
        if suspect {
            tracing::warn!("its last delivery died mid-way: delivering it alone");
            _alone = self.gate.write().await;
        } else {
            _shared = self.gate.read().await;
        }
        if let Some(stop) = self.claim(received, env).await {
            return stop;
        }
        match AssertUnwindSafe(self.run(env, job)).catch_unwind().await {
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

    /// The send guard. `None` to go on sending; otherwise the outcome without sending.
    async fn claim(&self, received: &Received, env: &Envelope) -> Option<Outcome> {
        let channel = received.channel;
        // An in-app delivery is one statement that inserts the item and records it delivered,
        // idempotent by itself (a second insert of the same item does nothing), so its first
        // attempt needs no claim. A redelivery or a retry claims as every channel does: that
        // is where a delivery that died mid-way is counted.
        if channel == Channel::InApp && !received.redelivered && received.attempt == 1 {
            return None;
        }
        // Named by its publish: a second copy of this id (an idempotent retry's) that finds
        // this one being delivered acks instead of sending again.
        let copy = format!("{} {}", env.correlation_id, env.created_at.to_rfc3339_opts(SecondsFormat::Nanos, true));
        let key = DeliveryKey::new(env.id, channel);
        let claim = self.store.claim_copy(key, env.event.as_deref(), received.attempt as i32, Some(&copy));
        match claim.await {
            Ok(Claim::Proceed) => None,
            Ok(Claim::Unfinished { crashes }) if crashes >= self.crash_limit as i32 => Some(Outcome::Dead {
                reason: DeadReason::CrashedWorker,
                error: format!("{crashes} deliveries of this message died mid-way (WORKER_CRASH_LIMIT)"),
            }),
            Ok(Claim::Unfinished { crashes }) => {
                tracing::warn!(crashes, "the previous delivery did not finish");
                None
            }
            Ok(Claim::AlreadyDelivered) => Some(Outcome::AlreadyDelivered),
            Err(e) => Some(store_failed(e)),
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

    async fn run(&self, env: &Envelope, job: Job<'_>) -> Outcome {
        #[cfg(feature = "test-hooks")]
        crate::test_hooks::fire(env);
        match job {
            Job::Email { slot, message } => self.email.send(&slot, env, &message).await,
            Job::Webhook { url, secret, body } => {
                self.webhook.send(&env.id.to_string(), &url, secret.as_deref(), &body).await
            }
            // Inserting the item and marking the delivery happen in one statement: a
            // redelivery can never add a second item.
            Job::InApp(item) => match self.store.insert_inbox_item(&item).await {
                Ok(true) => Outcome::Delivered,
                // The item was there already: a publisher's retry of the same notification.
                Ok(false) => Outcome::AlreadyDelivered,
                Err(e) => store_failed(e),
            },
        }
    }
}

/// A store error during delivery: an outage defers (no attempt counted); a query bug would
/// fail the same way again, so the message is dead with its own reason and logged as an error;
/// anything else is retried like a failed attempt.
pub fn store_failed(e: StoreError) -> Outcome {
    if e.is_unavailable() {
        Outcome::Defer { error: e.to_string() }
    } else if e.is_query_bug() {
        tracing::error!(error = %e, "database query failed (not an outage)");
        Outcome::Dead { reason: DeadReason::StoreQuery, error: e.to_string() }
    } else {
        Outcome::retry(e.to_string())
    }
}
