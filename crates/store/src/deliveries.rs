//! Delivery state per (notification, channel): the worker's send guard ([`Store::claim`]),
//! the outcome it records, and what the status endpoint reads.

use crate::batch::Op;
use crate::columns::{text_column, ChannelColumn};
use crate::errors::{db_err, StoreError};
use crate::pool::Store;
use chrono::{DateTime, Utc};
use notify_types::Channel;
use std::fmt;
use uuid::Uuid;

/// What a delivery row is about: one channel of one notification (the table's primary key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    pub notification_id: Uuid,
    pub channel: Channel,
}

impl DeliveryKey {
    pub fn new(notification_id: Uuid, channel: Channel) -> DeliveryKey {
        DeliveryKey { notification_id, channel }
    }
}

impl fmt::Display for DeliveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.notification_id, self.channel)
    }
}

/// Where one channel of a notification stands (`deliveries.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Accepted, no attempt recorded yet.
    Queued,
    /// Claimed by a worker (the send guard): being sent right now, or the attempt died.
    Delivering,
    Delivered,
    /// The last attempt failed; the message waits in a retry tier.
    Retrying,
    /// Dead-lettered.
    Dead,
}

impl DeliveryState {
    pub const ALL: [DeliveryState; 5] = [
        DeliveryState::Queued,
        DeliveryState::Delivering,
        DeliveryState::Delivered,
        DeliveryState::Retrying,
        DeliveryState::Dead,
    ];

    /// The column value (the migrations' CHECK constraint lists the same five).
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Queued => "queued",
            DeliveryState::Delivering => "delivering",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Retrying => "retrying",
            DeliveryState::Dead => "dead",
        }
    }

    fn from_column(s: &str) -> Option<DeliveryState> {
        DeliveryState::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

impl fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

text_column!(DeliveryState, to: |s| s.as_str(), from: DeliveryState::from_column);

/// Result of [`Store::claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Not delivered yet: the row is now `delivering`; go ahead and send.
    Proceed,
    /// Like `Proceed`, but the previous claim never finished (the attempt died mid-way):
    /// `crashes` counts such claims so far, this one included.
    Unfinished { crashes: i32 },
    /// Already delivered, or being delivered right now by another copy of the message (see
    /// [`Store::claim_copy`]): do not send, just ack.
    AlreadyDelivered,
}

/// Delivery state of one channel of a notification.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct DeliveryStatus {
    /// `email`, `webhook` or `in_app`.
    #[schema(value_type = String)]
    pub channel: Channel,
    /// `queued`, `delivering`, `delivered`, `retrying` or `dead`.
    #[schema(value_type = String)]
    pub status: DeliveryState,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub event: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    channel: ChannelColumn,
    status: DeliveryState,
    attempts: i32,
    last_error: Option<String>,
    event: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    delivered_at: Option<DateTime<Utc>>,
}

impl From<DeliveryRow> for DeliveryStatus {
    fn from(r: DeliveryRow) -> Self {
        DeliveryStatus {
            channel: r.channel.0,
            status: r.status,
            attempts: r.attempts,
            last_error: r.last_error,
            event: r.event,
            created_at: r.created_at,
            updated_at: r.updated_at,
            delivered_at: r.delivered_at,
        }
    }
}

impl Store {
    /// The send guard. Atomically (one `INSERT .. ON CONFLICT DO UPDATE .. WHERE`): if `key`
    /// is already `delivered` → [`Claim::AlreadyDelivered`]; otherwise the row is upserted as
    /// `delivering` with `attempts = max(stored, attempt)`, `event` (kept when `None`),
    /// `updated_at = now()` → [`Claim::Proceed`]. A `dead` row can be claimed again
    /// (dead-letter replay).
    ///
    /// Concurrent calls share one statement and one commit (see the `batch` module). That
    /// commit does not wait for the WAL flush (`synchronous_commit=off`, ~1 ms less per
    /// delivery): a claim only says "in progress". What the promise rests on, the delivered
    /// record and the inbox item, commits durably, and its flush covers the claim before it. A
    /// Postgres crash can lose the last claims of at most ~0.6 s (3 × `wal_writer_delay`);
    /// such a delivery is either recorded after the crash (the worker records what it sent
    /// later, see `x-notify-sent`) or was never sent, and only its crash count starts over.
    pub async fn claim(&self, key: DeliveryKey, event: Option<&str>, attempt: i32) -> Result<Claim, StoreError> {
        self.claim_copy(key, event, attempt, None).await
    }

    /// [`Store::claim`] by a named copy of the message (`copy`: what tells this copy from
    /// other publishes of the same notification id; the worker uses the envelope's request id
    /// and creation time, which its retries, redeliveries and dead-letter replays keep).
    ///
    /// Two copies of one notification can be in flight at once: a request with an
    /// `Idempotency-Key` whose publish timed out (503) can land after all, while the caller's
    /// retry publishes the same id again. A claim that finds the row `delivering` by *another*
    /// copy leaves it as it is and answers [`Claim::AlreadyDelivered`]: that copy is being
    /// delivered, and until it is settled it stays in the broker (unacked, then in a retry
    /// tier or dead-lettered), so it carries the notification; sending this one as well would
    /// deliver twice. Only a claim by the same copy (its redelivery after a crash), or by one
    /// that names none, finds an unfinished claim ([`Claim::Unfinished`]) and proceeds. The
    /// test is part of the upsert's `WHERE`, so it holds for copies claimed at the same moment
    /// by different workers.
    pub async fn claim_copy(
        &self,
        key: DeliveryKey,
        event: Option<&str>,
        attempt: i32,
        copy: Option<&str>,
    ) -> Result<Claim, StoreError> {
        let (event, copy) = (event.map(str::to_owned), copy.map(str::to_owned));
        self.claims().call(|reply| Op::Claim { key, event, attempt, copy, reply }).await
    }

    /// Status `delivered`, `delivered_at = now()` (the first time), `last_error` cleared (a
    /// delivered notification has no error; the history of its attempts is in the logs).
    /// Creates the row if it does not exist.
    /// Concurrent calls share one statement and one commit.
    pub async fn mark_delivered(&self, key: DeliveryKey) -> Result<(), StoreError> {
        self.records().call(|reply| Op::Delivered { key, reply }).await
    }

    /// Status `retrying`, `last_error = error`. Never downgrades a `delivered` row.
    /// Creates the row if it does not exist (with `event`, which a stored one keeps).
    pub async fn mark_retrying(&self, key: DeliveryKey, event: Option<&str>, error: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO deliveries (notification_id, channel, status, attempts, last_error, event)
             VALUES ($1, $2, 'retrying', 1, $3, $4)
             ON CONFLICT (notification_id, channel) DO UPDATE
                SET status = 'retrying',
                    last_error = EXCLUDED.last_error,
                    event = COALESCE(deliveries.event, EXCLUDED.event),
                    updated_at = now()
              WHERE deliveries.status <> 'delivered'",
        )
        .bind(key.notification_id)
        .bind(ChannelColumn(key.channel))
        .bind(error)
        .bind(event)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// Status `dead`, `attempts = max(stored, attempts)`, `last_error = error`, the dead-letter
    /// reason stored alongside. Upsert (a message may die before any claim, e.g. bad payload).
    /// Never downgrades a `delivered` row.
    pub async fn mark_dead(
        &self,
        key: DeliveryKey,
        event: Option<&str>,
        attempts: i32,
        error: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO deliveries
                (notification_id, channel, status, attempts, last_error, dead_reason, event)
             VALUES ($1, $2, 'dead', GREATEST($3, 0), $4, $5, $6)
             ON CONFLICT (notification_id, channel) DO UPDATE
                SET status = 'dead',
                    attempts = GREATEST(deliveries.attempts, EXCLUDED.attempts),
                    last_error = EXCLUDED.last_error,
                    dead_reason = EXCLUDED.dead_reason,
                    event = COALESCE(deliveries.event, EXCLUDED.event),
                    updated_at = now()
              WHERE deliveries.status <> 'delivered'",
        )
        .bind(key.notification_id)
        .bind(ChannelColumn(key.channel))
        .bind(attempts)
        .bind(error)
        .bind(reason)
        .bind(event)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// All channels of a notification, ordered by channel; empty when unknown.
    pub async fn delivery_status(&self, id: Uuid) -> Result<Vec<DeliveryStatus>, StoreError> {
        let rows: Vec<DeliveryRow> = sqlx::query_as(
            "SELECT channel, status, attempts, last_error, event,
                    created_at, updated_at, delivered_at
               FROM deliveries
              WHERE notification_id = $1
              ORDER BY channel",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(rows.into_iter().map(DeliveryStatus::from).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_keep_their_column_values() {
        // The values the migrations' CHECK constraint allows: no data migration for the enum.
        let names: Vec<&str> = DeliveryState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["queued", "delivering", "delivered", "retrying", "dead"]);
        for state in DeliveryState::ALL {
            assert_eq!(DeliveryState::from_column(state.as_str()), Some(state));
            // The status endpoint's JSON spells them as the column does.
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        assert_eq!(DeliveryState::from_column("Delivered"), None);
    }
}
