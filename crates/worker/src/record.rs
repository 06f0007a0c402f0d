//! Step 3 of `pipeline::process`: the attempt's outcome written to the send guard's record (the
//! status endpoint reads it). A send whose record fails because Postgres is down becomes
//! [`Outcome::RecordLater`]: the message comes back only to be recorded, never sent again.

use crate::{outcome::Outcome, received::Received};
use notify_store::{DeliveryKey, Store, StoreError};
use notify_types::Channel;

pub async fn record(store: &Store, received: &Received, outcome: Outcome) -> Outcome {
    let Ok(env) = &received.envelope else {
        // Nothing to record for a message that is not an envelope: no id to record it under.
        return outcome;
    };
    let channel = received.channel;
    let key = DeliveryKey::new(env.id, channel);
    let event = env.event.as_deref();
    let result = match &outcome {
        // An in-app delivery is the inbox insert, which marked it delivered in the same
        // statement: nothing is left to record.
        Outcome::Delivered if channel == Channel::InApp => Ok(()),
        Outcome::Delivered => store.mark_delivered(key).await,
        Outcome::Retry { error, .. } | Outcome::Defer { error } => store.mark_retrying(key, event, error).await,
        Outcome::Dead { reason, error } => {
            store.mark_dead(key, event, received.attempt as i32, error, reason.as_str()).await
        }
        Outcome::AlreadyDelivered | Outcome::RecordLater { .. } => Ok(()),
    };
    match result {
        Ok(()) => outcome,
        Err(e) => recording_failed(outcome, e),
    }
}

/// What a failed record makes of the outcome. Only a send must not be lost to an outage: it
/// is recorded later. A query bug is logged as an error and the outcome acted on as it is (a
/// sent message is never dead-lettered, so it can never be replayed into a second send).
fn recording_failed(outcome: Outcome, e: StoreError) -> Outcome {
    if !e.is_unavailable() {
        tracing::error!(error = %e, "could not record the delivery state (query failed, not an outage)");
        return outcome;
    }
    tracing::warn!(error = %e, "could not record the delivery state");
    match outcome {
        Outcome::Delivered => Outcome::RecordLater { error: e.to_string() },
        other => other,
    }
}
