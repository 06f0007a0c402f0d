//! The in-app inbox: items per user, keyset-paginated newest first. Items are written by the
//! worker (through the group commit, together with their delivered record) and read and marked
//! read through the API.

use crate::batch::Op;
use crate::errors::{db_err, StoreError};
use crate::pool::Store;
use chrono::{DateTime, Datelike, Utc};
use uuid::Uuid;

/// A new in-app inbox item (see [`Store::insert_inbox_item`]).
#[derive(Debug, Clone)]
pub struct NewInboxItem {
    pub notification_id: Uuid,
    pub user: String,
    pub title: String,
    pub body: String,
    pub data: Option<serde_json::Value>,
    pub event: Option<String>,
    /// When the notification was accepted: the inbox is ordered by it, so concurrent workers
    /// delivering out of order do not shuffle a user's inbox.
    pub created_at: DateTime<Utc>,
}

/// One in-app inbox item.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct InboxItem {
    pub id: Uuid,
    pub notification_id: Uuid,
    pub user: String,
    pub title: String,
    pub body: String,
    pub data: Option<serde_json::Value>,
    pub event: Option<String>,
    pub created_at: DateTime<Utc>,
    pub read_at: Option<DateTime<Utc>>,
    pub read: bool,
}

#[derive(sqlx::FromRow)]
struct InboxRow {
    id: Uuid,
    notification_id: Uuid,
    user_id: String,
    title: String,
    body: String,
    data: Option<serde_json::Value>,
    event: Option<String>,
    created_at: DateTime<Utc>,
    read_at: Option<DateTime<Utc>>,
}

impl From<InboxRow> for InboxItem {
    fn from(r: InboxRow) -> Self {
        InboxItem {
            id: r.id,
            notification_id: r.notification_id,
            user: r.user_id,
            title: r.title,
            body: r.body,
            data: r.data,
            event: r.event,
            created_at: r.created_at,
            read: r.read_at.is_some(),
            read_at: r.read_at,
        }
    }
}

/// One page of a user's inbox.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct InboxPage {
    pub items: Vec<InboxItem>,
    /// Pass as `before` to get the next (older) page; `None` on the last page.
    pub next_cursor: Option<String>,
    /// The user's total unread count (independent of the page and filter).
    pub unread_count: i64,
}

/// Encodes a keyset cursor `(created_at, id)` as `<unix micros>_<uuid simple hex>`.
pub(crate) fn encode_cursor(created_at: DateTime<Utc>, id: Uuid) -> String {
    format!("{}_{}", created_at.timestamp_micros(), id.simple())
}

pub(crate) fn decode_cursor(cursor: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let (micros, id) = cursor.split_once('_')?;
    let micros: i64 = micros.parse().ok()?;
    // Years 1 to 9999: every cursor we hand out, and well inside what Postgres can store (a
    // time before 4713 BC would fail the query instead of being a bad cursor).
    let at = DateTime::from_timestamp_micros(micros).filter(|at| (1..=9999).contains(&at.year()))?;
    let id = Uuid::try_parse(id).ok()?;
    Some((at, id))
}

/// Whether `cursor` is a well-formed inbox cursor (as produced in [`InboxPage::next_cursor`]).
/// Lets the API answer 400 for a bad `before` instead of a 500 from [`Store::list_inbox`].
pub fn is_valid_cursor(cursor: &str) -> bool {
    decode_cursor(cursor).is_some()
}

impl Store {
    /// Inserts the item (id: UUID v7) unless (notification_id, user) already has one → `true`
    /// when inserted, `false` when it existed. In the same statement (so atomically) marks
    /// (notification_id, `in_app`) delivered, so a redelivery can never create a second item.
    /// Concurrent calls share one statement and one commit (see the `batch` module).
    pub async fn insert_inbox_item(&self, item: &NewInboxItem) -> Result<bool, StoreError> {
        let item = item.clone();
        self.records().call(|reply| Op::Inbox { item, reply }).await
    }

    /// A page of the user's inbox, newest first (`created_at DESC, id DESC`). `before` is a
    /// cursor from a previous page's `next_cursor` (malformed → [`StoreError::BadCursor`];
    /// check with [`is_valid_cursor`] first to answer 400). `limit` is clamped to 1..=100.
    pub async fn list_inbox(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<&str>,
        limit: i64,
    ) -> Result<InboxPage, StoreError> {
        let limit = limit.clamp(1, 100);
        let before = match before {
            Some(c) => Some(decode_cursor(c).ok_or_else(|| StoreError::BadCursor(c.to_owned()))?),
            None => None,
        };
        // Static fragments only (no user input in the SQL text); literal `read_at IS NULL`
        // so the planner can use the partial unread index.
        let mut sql = String::from(
            "SELECT id, notification_id, user_id, title, body, data, event, created_at, read_at
               FROM inbox_items
              WHERE user_id = $1",
        );
        if unread_only {
            sql.push_str(" AND read_at IS NULL");
        }
        if before.is_some() {
            sql.push_str(" AND (created_at, id) < ($3, $4)");
        }
        sql.push_str(" ORDER BY created_at DESC, id DESC LIMIT $2");

        let mut query = sqlx::query_as::<_, InboxRow>(&sql).bind(user).bind(limit + 1);
        if let Some((at, id)) = before {
            query = query.bind(at).bind(id);
        }
        let mut rows = query.fetch_all(&self.pool).await.map_err(db_err)?;

        let next_cursor = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|r| encode_cursor(r.created_at, r.id))
        } else {
            None
        };
        let unread_count = self.unread_count(user).await?;
        Ok(InboxPage { items: rows.into_iter().map(InboxItem::from).collect(), next_cursor, unread_count })
    }

    /// Number of unread items of the user.
    pub async fn unread_count(&self, user: &str) -> Result<i64, StoreError> {
        sqlx::query_scalar("SELECT count(*) FROM inbox_items WHERE user_id = $1 AND read_at IS NULL")
            .bind(user)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)
    }

    /// Marks the user's own item read, found by its own id or by its notification's id (the id
    /// the API's 202 returned). `Ok(false)` when the user has no such item (→ 404).
    /// Idempotent: an already read item → `true`, `read_at` unchanged.
    pub async fn mark_read(&self, user: &str, item_id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE inbox_items SET read_at = COALESCE(read_at, now())
              WHERE (id = $1 OR notification_id = $1) AND user_id = $2",
        )
        .bind(item_id)
        .bind(user)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() > 0)
    }

    /// Marks all the user's unread items read; returns how many changed.
    pub async fn mark_all_read(&self, user: &str) -> Result<u64, StoreError> {
        let done = sqlx::query("UPDATE inbox_items SET read_at = now() WHERE user_id = $1 AND read_at IS NULL")
            .bind(user)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip() {
        let at = DateTime::from_timestamp_micros(1_763_810_000_123_456).unwrap();
        let id = Uuid::now_v7();
        let c = encode_cursor(at, id);
        assert_eq!(decode_cursor(&c), Some((at, id)));
        assert!(is_valid_cursor(&c));
        for bad in ["", "x", "12_", "_abc", "12_nothex", "1.5_0190"] {
            assert!(!is_valid_cursor(bad), "{bad}");
        }
    }
}
