//! Dead letters in PostgreSQL: the worker's indexer inserts each message it takes off a
//! `<prefix>.<channel>.dead` queue; operators list, filter, replay and discard them.
//!
//! A row is listed while its status is `dead` or `replaying` (a replayer took it; if that
//! replayer died, the row stays listed and a later replay may take it over after
//! [`REPLAY_TAKEOVER_AFTER`]). `replayed` and `discarded` rows are history, purged by retention.

use crate::{
    errors::{db_err, StoreError},
    inbox::{decode_cursor, encode_cursor},
    pool::Store,
};
use chrono::{DateTime, Utc};
use sqlx::{Postgres, QueryBuilder, Row};
use std::time::Duration;
use uuid::Uuid;

/// A row left `replaying` this long by a replayer that never finished (it crashed between
/// taking it and recording the outcome) may be taken by the next replay.
pub const REPLAY_TAKEOVER_AFTER: Duration = Duration::from_secs(60);

/// The reasons a dead letter can have: the worker's (`x-notify-dead-reason`) and the broker's
/// own dead-letterings (`x-death`) of messages that never passed through a worker.
pub const DEAD_REASONS: &[&str] =
    &["permanent", "max_attempts", "unparseable", "crashed_worker", "store_query", "delivery_limit", "rejected"];

/// An ILIKE pattern matching `text` anywhere, with LIKE's wildcards in it taken literally.
fn substring_pattern(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// A dead message as the indexer read it off a dead queue.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub fingerprint: String,
    pub notification_id: Option<Uuid>,
    pub channel: String,
    pub event: Option<String>,
    pub reason: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub dead_at: DateTime<Utc>,
    pub body: Vec<u8>,
    /// The AMQP properties a replay republishes (see the API's replay).
    pub properties: serde_json::Value,
    pub replays: i32,
}

/// One dead letter as the API lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: Uuid,
    pub notification_id: Option<Uuid>,
    pub channel: String,
    pub event: Option<String>,
    pub reason: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub dead_at: DateTime<Utc>,
    pub replays: i32,
}

/// One dead letter with its message and state.
#[derive(Debug, Clone)]
pub struct DeadLetterDetail {
    pub letter: DeadLetter,
    pub status: String,
    pub status_at: DateTime<Utc>,
    pub body: Vec<u8>,
    pub properties: serde_json::Value,
}

/// What to list, replay or discard. Every field narrows; `error` is a case-insensitive
/// substring of the last error; `since` is inclusive, `until` exclusive.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DeadLetterFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

/// One page of dead letters, newest first.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetterPage {
    pub items: Vec<DeadLetter>,
    pub next_cursor: Option<String>,
    /// How many dead letters match the filter in all.
    pub total: i64,
}

const LISTED: &str = "status IN ('dead', 'replaying')";
const COLUMNS: &str = "id, notification_id, channel, event, reason, attempts, last_error, dead_at, replays";

pub(crate) fn push_filter(q: &mut QueryBuilder<'_, Postgres>, f: &DeadLetterFilter) {
    q.push(" WHERE ").push(LISTED);
    if let Some(v) = &f.channel {
        q.push(" AND channel = ").push_bind(v.clone());
    }
    if let Some(v) = &f.event {
        q.push(" AND event = ").push_bind(v.clone());
    }
    if let Some(v) = &f.reason {
        q.push(" AND reason = ").push_bind(v.clone());
    }
    if let Some(v) = &f.error {
        // Alone, the error text is served by the trigram index on last_error (ILIKE; the
        // operator's `%`, `_` and `\` escaped). With another filter, that filter's index narrows
        // the rows and the text is checked on them (strpos): the planner can't tell a text
        // every row contains from a rare one, and a trigram scan of a common text reads them all.
        let narrowed =
            f.channel.is_some() || f.event.is_some() || f.reason.is_some() || f.since.is_some() || f.until.is_some();
        if narrowed {
            q.push(" AND strpos(lower(last_error), lower(").push_bind(v.clone()).push(")) > 0");
        } else {
            q.push(" AND last_error ILIKE ").push_bind(substring_pattern(v));
        }
    }
    if let Some(v) = f.since {
        q.push(" AND dead_at >= ").push_bind(v);
    }
    if let Some(v) = f.until {
        q.push(" AND dead_at < ").push_bind(v);
    }
}

impl Store {
    /// Dead letters of `channel` waiting for an operator (status `dead`), for the
    /// `notify_dead_letters` gauge.
    pub async fn waiting_dead_letters(&self, channel: &str) -> Result<i64, StoreError> {
        sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE channel = $1 AND status = 'dead'")
            .bind(channel)
            .fetch_one(self.pool())
            .await
            .map_err(db_err)
    }

    /// Inserts a dead letter unless the same message is stored already (same fingerprint) →
    /// `true` when inserted. A parseable message's delivery record becomes `dead` in the same
    /// transaction (a broker-made dead letter never passed through a worker that would record
    /// it; a delivered record is never downgraded).
    pub async fn insert_dead_letter(&self, d: &NewDeadLetter) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await.map_err(db_err)?;
        let inserted = sqlx::query(
            "INSERT INTO dead_letters (id, fingerprint, notification_id, channel, event, reason, attempts,
                                       last_error, dead_at, body, properties, replays)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (fingerprint) DO NOTHING",
        )
        .bind(Uuid::now_v7())
        .bind(&d.fingerprint)
        .bind(d.notification_id)
        .bind(&d.channel)
        .bind(&d.event)
        .bind(&d.reason)
        .bind(d.attempts)
        .bind(&d.last_error)
        .bind(d.dead_at)
        .bind(&d.body)
        .bind(&d.properties)
        .bind(d.replays)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?
        .rows_affected()
            == 1;
        if let (true, Some(id)) = (inserted, d.notification_id) {
            sqlx::query(
                "INSERT INTO deliveries (notification_id, channel, status, attempts, last_error, dead_reason, event, replays)
                 VALUES ($1, $2, 'dead', GREATEST($3, 0), $4, $5, $6, $7)
                 ON CONFLICT (notification_id, channel) DO UPDATE
                    SET status = 'dead',
                        attempts = GREATEST(deliveries.attempts, EXCLUDED.attempts),
                        last_error = COALESCE(EXCLUDED.last_error, deliveries.last_error),
                        dead_reason = EXCLUDED.dead_reason,
                        event = COALESCE(deliveries.event, EXCLUDED.event),
                        updated_at = now()
                  WHERE deliveries.status <> 'delivered'",
            )
            .bind(id)
            .bind(&d.channel)
            .bind(d.attempts)
            .bind(&d.last_error)
            .bind(&d.reason)
            .bind(&d.event)
            .bind(d.replays)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(inserted)
    }

    /// A page of listed dead letters matching `filter`, newest first (`dead_at DESC, id DESC`).
    /// `cursor` is a previous page's `next_cursor` (check it with [`crate::inbox::is_valid_cursor`]);
    /// `limit` is clamped to 1..=500.
    pub async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        cursor: Option<&str>,
        limit: i64,
    ) -> Result<DeadLetterPage, StoreError> {
        let limit = limit.clamp(1, 500);
        let after = match cursor {
            Some(c) => Some(decode_cursor(c).ok_or_else(|| StoreError::BadCursor(c.to_string()))?),
            None => None,
        };
        let mut q = QueryBuilder::<Postgres>::new(format!("SELECT {COLUMNS} FROM dead_letters"));
        push_filter(&mut q, filter);
        if let Some((at, id)) = after {
            q.push(" AND (dead_at, id) < (").push_bind(at).push(", ").push_bind(id).push(")");
        }
        q.push(" ORDER BY dead_at DESC, id DESC LIMIT ").push_bind(limit + 1);
        // The page and its total from one snapshot: a dead letter indexed in between must not
        // be counted and missing (or the other way round).
        let mut tx = self.pool().begin().await.map_err(db_err)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        let mut items: Vec<DeadLetter> = q.build_query_as().fetch_all(&mut *tx).await.map_err(db_err)?;
        let next_cursor = if items.len() as i64 > limit {
            items.truncate(limit as usize);
            items.last().map(|d| encode_cursor(d.dead_at, d.id))
        } else {
            None
        };
        let mut count = QueryBuilder::<Postgres>::new("SELECT count(*) FROM dead_letters");
        push_filter(&mut count, filter);
        let total: i64 = count.build_query_scalar().fetch_one(&mut *tx).await.map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(DeadLetterPage { items, next_cursor, total })
    }

    /// One dead letter, whatever its status; `None` when unknown.
    pub async fn dead_letter(&self, id: Uuid) -> Result<Option<DeadLetterDetail>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS}, status, status_at, body, properties FROM dead_letters WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(db_err)?;
        let Some(row) = row else { return Ok(None) };
        let letter = <DeadLetter as sqlx::FromRow<_>>::from_row(&row).map_err(db_err)?;
        Ok(Some(DeadLetterDetail {
            letter,
            status: row.try_get("status").map_err(db_err)?,
            status_at: row.try_get("status_at").map_err(db_err)?,
            body: row.try_get("body").map_err(db_err)?,
            properties: row.try_get("properties").map_err(db_err)?,
        }))
    }

    /// Per channel of a notification: how often it was replayed, and its latest dead letter
    /// (whatever became of it), for the status endpoint's history.
    pub async fn dead_letter_history(&self, notification_id: Uuid) -> Result<Vec<ChannelHistory>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT d.channel AS history_channel, d.replays AS history_replays, l.status AS dl_status,
                    {}
               FROM deliveries d
               LEFT JOIN LATERAL (SELECT * FROM dead_letters x
                                   WHERE x.notification_id = d.notification_id AND x.channel = d.channel
                                   ORDER BY x.dead_at DESC LIMIT 1) l ON true
              WHERE d.notification_id = $1
              ORDER BY d.channel",
            COLUMNS.split(", ").map(|c| format!("l.{c}")).collect::<Vec<_>>().join(", ")
        ))
        .bind(notification_id)
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: Option<Uuid> = row.try_get("id").map_err(db_err)?;
            let last_dead_letter = match id {
                Some(_) => Some(<DeadLetter as sqlx::FromRow<_>>::from_row(&row).map_err(db_err)?),
                None => None,
            };
            out.push(ChannelHistory {
                channel: row.try_get("history_channel").map_err(db_err)?,
                replays: row.try_get("history_replays").map_err(db_err)?,
                last_dead_letter_status: row.try_get("dl_status").map_err(db_err)?,
                last_dead_letter,
            });
        }
        Ok(out)
    }
}

/// What [`Store::dead_letter_history`] tells of one channel.
#[derive(Debug, Clone)]
pub struct ChannelHistory {
    pub channel: String,
    pub replays: i32,
    pub last_dead_letter: Option<DeadLetter>,
    pub last_dead_letter_status: Option<String>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_text_is_matched_literally() {
        assert_eq!(super::substring_pattern("mailbox"), "%mailbox%");
        assert_eq!(super::substring_pattern(r"50%_off\now"), r"%50\%\_off\\now%");
    }
}
