//! Saving an accepted request's answer under its `Idempotency-Key`, after the broker confirmed
//! the publish. If that write fails, the key stays `pending`, and a minute later a repeat of
//! the request would take it over and publish a second time. So the write is retried: a few
//! times within the request, then in the background until it sticks. Until it does, this
//! process keeps the answer in memory ([`Answers`]) and answers repeats from there, without
//! the database; a repeat that reaches another API instance finds the key stale and first
//! waits longer than the background retry interval (see `accept`), by which time a database
//! that is back has the answer.
//!
//! What remains: the API process dies between the broker's confirm and the saved answer.
//! Then a repeat publishes again, under the same notification id, which the worker's send
//! guard delivers once.

use notify_store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Waits between the attempts made while the caller waits for its 202.
const IN_REQUEST: [Duration; 2] = [Duration::from_millis(50), Duration::from_millis(250)];
/// The longest wait between two background attempts. A repeat that finds the key stale waits
/// for the owner at least three times this (`accept::STALE_WAIT`).
pub const BACKGROUND_MAX_INTERVAL: Duration = Duration::from_secs(1);
/// How long the background keeps trying before it gives up (and logs an error).
const BACKGROUND_FOR: Duration = Duration::from_secs(600);
/// Answers kept in memory at most: only requests whose answer could not be saved are here,
/// so this bounds memory through a long database outage under load.
const MAX_KEPT: usize = 10_000;

/// An answer published under a key and not yet saved in the database.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The request's hash: a repeat with another request under the key is a mismatch.
    pub hash: String,
    pub status: u16,
    pub body: serde_json::Value,
}

/// The answers of this process not yet saved, by key.
#[derive(Debug, Default)]
pub struct Answers(Mutex<HashMap<String, Answer>>);

impl Answers {
    pub fn get(&self, key: &str) -> Option<Answer> {
        self.lock().get(key).cloned()
    }

    fn keep(&self, key: &str, answer: Answer) -> bool {
        let mut kept = self.lock();
        if kept.len() >= MAX_KEPT && !kept.contains_key(key) {
            return false;
        }
        kept.insert(key.to_owned(), answer);
        true
    }

    fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Answer>> {
        // A panic while holding this lock cannot leave the map half-updated (single calls).
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Saves `answer` for `key` (the broker has confirmed the publish): in the request, then, if
/// the database still refuses, from memory and in the background (see the module's note).
pub async fn save(store: &Store, answers: &Arc<Answers>, key: &str, answer: Answer, id: uuid::Uuid) {
    let mut attempt = store.idempotency_complete(key, answer.status, &answer.body).await;
    for wait in IN_REQUEST {
        let Err(e) = &attempt else { return };
        tracing::warn!(error = %e, %id, "accepted, but saving the idempotency record failed; retrying");
        tokio::time::sleep(wait).await;
        attempt = store.idempotency_complete(key, answer.status, &answer.body).await;
    }
    let Err(e) = attempt else { return };
    if !answers.keep(key, answer.clone()) {
        tracing::error!(error = %e, %id, "accepted, but the idempotency record was not saved and too many are waiting to be");
    } else {
        tracing::warn!(error = %e, %id, "accepted, but the idempotency record was not saved yet; saving it in the background");
    }
    let (store, answers, key) = (store.clone(), answers.clone(), key.to_owned());
    tokio::spawn(async move { save_in_background(&store, &answers, &key, &answer, id).await });
}

async fn save_in_background(store: &Store, answers: &Answers, key: &str, answer: &Answer, id: uuid::Uuid) {
    use backon::{ExponentialBuilder, Retryable};
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(BACKGROUND_MAX_INTERVAL)
        .with_total_delay(Some(BACKGROUND_FOR))
        .without_max_times();
    let saved = (|| store.idempotency_complete(key, answer.status, &answer.body))
        .retry(backoff)
        .notify(|e, next| tracing::debug!(error = %e, %id, ?next, "saving the idempotency record"))
        .await;
    match saved {
        Ok(()) => {
            answers.forget(key);
            tracing::info!(%id, "the idempotency record is saved");
        }
        Err(e) => tracing::error!(
            error = %e, %id,
            "gave up saving the idempotency record: this process answers repeats from memory until it stops"
        ),
    }
}
