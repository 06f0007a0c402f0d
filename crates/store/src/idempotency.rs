//! The API's `Idempotency-Key` records: one row per (producer-scoped) key, owned by the first
//! request that carries it, replayed to the ones after it.
//!
//! The time rules (a pending key older than [`IDEMPOTENCY_PENDING_TAKEOVER_AFTER`] may be
//! taken over) are decided with the caller's clock (`now` arguments, also written as the
//! key's `created_at`), not the database's `now()`: the API's tests move that clock past the
//! takeover time instead of sleeping through it. The API hosts' clocks are NTP-synchronised;
//! their skew is far below the minute the rule is about.

use crate::columns::text_column;
use crate::errors::{db_err, StoreError};
use crate::pool::Store;
use chrono::{DateTime, Utc};
use std::time::Duration;
use uuid::Uuid;

/// A `pending` idempotency key older than this may have been left by a crashed owner:
/// [`Store::idempotency_begin`] answers [`Begin::Stale`], and after waiting for the owner the
/// caller may take it over ([`Store::idempotency_take_over`]).
pub const IDEMPOTENCY_PENDING_TAKEOVER_AFTER: Duration = Duration::from_secs(60);

const IDEMPOTENCY_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Result of [`Store::idempotency_begin`] / [`Store::idempotency_wait`].
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// The caller owns the key: do the work, then `idempotency_complete` (or `_abandon`).
    Owner,
    /// Same key and same request, already completed: answer this again.
    Replay { status: u16, body: serde_json::Value },
    /// Same key, different request.
    Mismatch,
    /// Same key and request, the owner is still working on it.
    Pending,
    /// Same key and request, pending for longer than [`IDEMPOTENCY_PENDING_TAKEOVER_AFTER`]:
    /// the owner crashed, or it published and is still retrying to save its answer (the
    /// database was out of reach). Wait for it ([`Store::idempotency_wait`]) at least as long
    /// as the owner's retry interval, then take over ([`Store::idempotency_take_over`]).
    Stale,
}

/// `idempotency_keys.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyState {
    /// Owned by a request that has not answered yet.
    Pending,
    /// Answered; the answer is stored.
    Completed,
    /// The owner gave up (its publish failed): the next request with the key takes it over.
    Failed,
}

impl KeyState {
    fn as_str(self) -> &'static str {
        match self {
            KeyState::Pending => "pending",
            KeyState::Completed => "completed",
            KeyState::Failed => "failed",
        }
    }

    fn from_column(s: &str) -> Option<KeyState> {
        [KeyState::Pending, KeyState::Completed, KeyState::Failed].into_iter().find(|k| k.as_str() == s)
    }
}

text_column!(KeyState, to: |s| s.as_str(), from: KeyState::from_column);

#[derive(sqlx::FromRow)]
struct IdempotencyRow {
    request_hash: String,
    state: KeyState,
    response_status: Option<i32>,
    response_body: Option<serde_json::Value>,
    stale: bool,
}

fn replay_of(key: &str, status: Option<i32>, body: Option<serde_json::Value>) -> Result<Begin, StoreError> {
    match (status.and_then(|s| u16::try_from(s).ok()), body) {
        (Some(status), Some(body)) => Ok(Begin::Replay { status, body }),
        _ => Err(StoreError::Inconsistent(format!("idempotency key {key:?} is completed but has no stored response"))),
    }
}

impl Store {
    /// Starts handling a request carrying an `Idempotency-Key` (`key` is used as given;
    /// `request_hash` is the caller's hex sha256 of path + body):
    /// - key absent → inserted as `pending` → [`Begin::Owner`] (exactly one concurrent caller
    ///   wins: `INSERT .. ON CONFLICT DO NOTHING`);
    /// - present with another hash → [`Begin::Mismatch`];
    /// - present, same hash, completed → [`Begin::Replay`];
    /// - present, same hash, pending → [`Begin::Pending`], or [`Begin::Stale`] when it was
    ///   created (or last taken over) more than [`IDEMPOTENCY_PENDING_TAKEOVER_AFTER`] before
    ///   `now`;
    /// - present, same hash, failed (see [`Store::idempotency_abandon`]) → taken over → `Owner`.
    ///
    /// An owner asks [`Store::idempotency_notification`] for the id to publish under.
    pub async fn idempotency_begin(
        &self,
        key: &str,
        request_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Begin, StoreError> {
        let stale_secs = IDEMPOTENCY_PENDING_TAKEOVER_AFTER.as_secs_f64();
        // A few rounds: the row can vanish (abandoned) between our INSERT and SELECT.
        for _ in 0..5 {
            let inserted: Option<(String,)> = sqlx::query_as(
                "INSERT INTO idempotency_keys (key, request_hash, state, created_at)
                 VALUES ($1, $2, 'pending', $3)
                 ON CONFLICT (key) DO NOTHING
                 RETURNING key",
            )
            .bind(key)
            .bind(request_hash)
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
            if inserted.is_some() {
                return Ok(Begin::Owner);
            }

            let existing: Option<IdempotencyRow> = sqlx::query_as(
                "SELECT request_hash, state, response_status, response_body,
                        (state = 'pending'
                         AND created_at < $3 - make_interval(secs => $2)) AS stale
                   FROM idempotency_keys WHERE key = $1",
            )
            .bind(key)
            .bind(stale_secs)
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
            let Some(row) = existing else { continue };

            if row.request_hash != request_hash {
                return Ok(Begin::Mismatch);
            }
            match row.state {
                KeyState::Completed => return replay_of(key, row.response_status, row.response_body),
                KeyState::Failed => {
                    let taken = sqlx::query(
                        "UPDATE idempotency_keys SET state = 'pending', created_at = $3
                          WHERE key = $1 AND request_hash = $2 AND state = 'failed'",
                    )
                    .bind(key)
                    .bind(request_hash)
                    .bind(now)
                    .execute(&self.pool)
                    .await
                    .map_err(db_err)?;
                    if taken.rows_affected() == 1 {
                        return Ok(Begin::Owner);
                    }
                }
                KeyState::Pending if row.stale => return Ok(Begin::Stale),
                KeyState::Pending => return Ok(Begin::Pending),
            }
        }
        Err(StoreError::Inconsistent("idempotency key kept changing under contention".into()))
    }

    /// Takes over a [`Begin::Stale`] key: `true` when this caller is now its owner (the
    /// takeover time starts again at `now`), `false` when it is no longer stale (completed,
    /// failed, or taken over by another caller first: ask [`Store::idempotency_begin`] again).
    pub async fn idempotency_take_over(
        &self,
        key: &str,
        request_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let taken = sqlx::query(
            "UPDATE idempotency_keys SET created_at = $4
              WHERE key = $1 AND request_hash = $2 AND state = 'pending'
                AND created_at < $4 - make_interval(secs => $3)",
        )
        .bind(key)
        .bind(request_hash)
        .bind(IDEMPOTENCY_PENDING_TAKEOVER_AFTER.as_secs_f64())
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        if taken.rows_affected() == 1 {
            tracing::warn!("took over a stale pending idempotency key");
        }
        Ok(taken.rows_affected() == 1)
    }

    /// Stores the response of the owner: state `completed`, status and body.
    pub async fn idempotency_complete(
        &self,
        key: &str,
        status: u16,
        body: &serde_json::Value,
    ) -> Result<(), StoreError> {
        #[cfg(feature = "test-faults")]
        self.faults.idempotency_complete()?;
        let done = sqlx::query(
            "UPDATE idempotency_keys
                SET state = 'completed', response_status = $2, response_body = $3,
                    completed_at = now()
              WHERE key = $1",
        )
        .bind(key)
        .bind(i32::from(status))
        .bind(body)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        if done.rows_affected() == 0 {
            tracing::warn!("idempotency_complete: key not found (abandoned meanwhile?)");
        }
        Ok(())
    }

    /// The notification id of an owned key: the first owner's (`proposed` is stored if none
    /// is yet). Every publish for one key goes out under this id, so however many times a
    /// failed or crashed request is retried, the worker's send guard delivers it once.
    pub async fn idempotency_notification(&self, key: &str, proposed: Uuid) -> Result<Uuid, StoreError> {
        let row: Option<(Uuid,)> = sqlx::query_as(
            "UPDATE idempotency_keys SET notification_id = COALESCE(notification_id, $2)
              WHERE key = $1 RETURNING notification_id",
        )
        .bind(key)
        .bind(proposed)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        row.map(|(id,)| id)
            .ok_or_else(|| StoreError::Inconsistent(format!("idempotency key {key:?} vanished while owned")))
    }

    /// The owner failed (e.g. broker down): the key becomes `failed`, keeping its notification
    /// id, so a retry with the same request becomes the owner and publishes under that id. A
    /// completed row is left alone.
    pub async fn idempotency_abandon(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE idempotency_keys SET state = 'failed' WHERE key = $1 AND state = 'pending'")
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// Polls (every ~20 ms, up to `timeout`) until a pending key completes →
    /// `Some(Begin::Replay { .. })`; `None` on timeout, when the owner failed, or when the row is gone.
    pub async fn idempotency_wait(&self, key: &str, timeout: Duration) -> Result<Option<Begin>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let row: Option<(KeyState, Option<i32>, Option<serde_json::Value>)> = sqlx::query_as(
                "SELECT state, response_status, response_body
                   FROM idempotency_keys WHERE key = $1",
            )
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
            match row {
                None | Some((KeyState::Failed, _, _)) => return Ok(None),
                Some((KeyState::Completed, status, body)) => return replay_of(key, status, body).map(Some),
                Some((KeyState::Pending, _, _)) => {}
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(IDEMPOTENCY_POLL_INTERVAL.min(deadline - now)).await;
        }
    }

    /// Deletes idempotency keys created more than `older_than` ago; returns how many.
    pub async fn idempotency_purge(&self, older_than: Duration) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)")
            .bind(older_than.as_secs_f64())
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected())
    }
}
