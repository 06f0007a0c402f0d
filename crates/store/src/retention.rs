//! Retention: old delivery records, inbox items, idempotency keys and finished dead letters are
//! deleted in small batches, one worker at a time, so the tables do not grow without bound.

use crate::{
    errors::{db_err, StoreError},
    pool::Store,
};
use std::time::Duration;

/// How old each kind of row may get, and how many rows one statement deletes.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Delivery records (`delivered` or `dead`) not updated for this long. A broker redelivery
    /// of a message older than this would no longer be stopped by the send guard.
    pub deliveries: Duration,
    pub inbox_items: Duration,
    pub idempotency_keys: Duration,
    /// Dead letters replayed or discarded this long ago (dead ones are kept until acted on).
    pub dead_letters: Duration,
    pub batch: i64,
}

/// Rows deleted by one [`Store::purge_batch`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub deliveries: u64,
    pub inbox_items: u64,
    pub idempotency_keys: u64,
    pub dead_letters: u64,
}

impl Purged {
    pub fn total(&self) -> u64 {
        self.deliveries + self.inbox_items + self.idempotency_keys + self.dead_letters
    }
}

impl Store {
    /// Deletes at most `batch` rows of each kind past its age, in one short transaction under
    /// a transaction-level advisory lock of this schema: `None` when another worker holds it
    /// (that one is purging). Call again while a kind came back full.
    pub async fn purge_batch(&self, r: &Retention) -> Result<Option<Purged>, StoreError> {
        let mut tx = self.pool().begin().await.map_err(db_err)?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("notify-store/retention/{}", self.schema()))
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
        if !locked {
            return Ok(None);
        }
        let statements = [
            // No index on updated_at (it would cost every delivery its HOT update): old rows
            // sit early in the heap, so the scan finds a batch quickly.
            "DELETE FROM deliveries WHERE ctid IN (SELECT ctid FROM deliveries
                WHERE status IN ('delivered', 'dead') AND updated_at < now() - make_interval(secs => $1) LIMIT $2)",
            "DELETE FROM inbox_items WHERE id IN (SELECT id FROM inbox_items
                WHERE created_at < now() - make_interval(secs => $1) LIMIT $2)",
            "DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys
                WHERE created_at < now() - make_interval(secs => $1) LIMIT $2)",
            "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters
                WHERE status IN ('replayed', 'discarded') AND status_at < now() - make_interval(secs => $1) LIMIT $2)",
        ];
        let ages = [r.deliveries, r.inbox_items, r.idempotency_keys, r.dead_letters];
        let mut counts = [0u64; 4];
        for (i, (sql, age)) in statements.iter().zip(ages).enumerate() {
            counts[i] = sqlx::query(sql)
                .bind(age.as_secs_f64())
                .bind(r.batch.max(1))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?
                .rows_affected();
        }
        tx.commit().await.map_err(db_err)?;
        let [deliveries, inbox_items, idempotency_keys, dead_letters] = counts;
        Ok(Some(Purged { deliveries, inbox_items, idempotency_keys, dead_letters }))
    }
}
