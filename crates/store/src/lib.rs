//! PostgreSQL access and migrations shared by the API and the worker.
//!
//! Everything lives in one Postgres *schema* chosen at [`Store::connect_lazy`]: every pooled
//! connection is opened with `search_path=<schema>` (a startup option, so it holds for the whole
//! session), and all SQL here — including the migrations and sqlx's own `_sqlx_migrations`
//! table — is written unqualified. Tests use one schema each and drop it at the end.
//!
//! What is stored:
//! - `deliveries`: state per (notification, channel) — `queued|delivering|delivered|retrying|dead`,
//!   attempts, last error. [`Store::claim`] is the worker's send guard.
//! - `inbox_items`: the in-app inbox, keyset-paginated newest first.
//! - `idempotency_keys`: the API's `Idempotency-Key` records.

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, Utc};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::Connection;
use uuid::Uuid;

mod batch;
use batch::{Batcher, Op};
pub use batch::{GroupCommitStats, MAX_BATCH, PARALLEL};

/// How long [`Store::connect_lazy`]'s pool waits for a connection (including connecting) before
/// giving up with [`StoreError::Unavailable`].
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// A `pending` idempotency key older than this is considered abandoned by a crashed owner:
/// the next [`Store::idempotency_begin`] with the same request hash takes it over (`Owner`).
pub const IDEMPOTENCY_PENDING_TAKEOVER_AFTER: Duration = Duration::from_secs(60);

/// The channel name used for in-app deliveries (matches `notify_types::Channel::InApp`).
pub const IN_APP_CHANNEL: &str = "in_app";

const IDEMPOTENCY_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A pooled connection idle at least this long is pinged before it is handed out.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(5);

/// Errors from the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Postgres can't be reached right now (connection refused/reset, timeout, pool timeout or
    /// closed, server shutting down/starting up, too many connections). Callers may retry.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Anything else (bad configuration, bad cursor, SQL error, ...).
    #[error("database error: {0}")]
    Other(String),
}

impl StoreError {
    /// `true` for [`StoreError::Unavailable`].
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

fn db_err(e: sqlx::Error) -> StoreError {
    let unavailable = match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
        // A connection closed by the other end before the server answered (a proxy or load
        // balancer with no live Postgres behind it, a server going down) comes back as a
        // protocol error: sqlx reads the EOF as "unexpected response from SSLRequest: 0x00".
        sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| {
            // 08xxx connection_exception, admin/crash shutdown, cannot_connect_now,
            // too_many_connections.
            c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    };
    if unavailable {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Other(e.to_string())
    }
}

/// A pool that connects on first use, waits at most [`ACQUIRE_TIMEOUT`] for a connection and
/// pings only connections idle for a while.
fn lazy_pool(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .min_connections(0)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        // sqlx pings every connection before each use by default: a round trip as dear as the
        // query itself (and it pings again on release, which stays). Only a connection idle
        // long enough to have gone stale unnoticed is pinged before use; a busy one that died
        // fails its query, which callers treat as "unavailable" anyway.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options)
}

fn migrate_err(e: MigrateError) -> StoreError {
    match e {
        MigrateError::Execute(e) => db_err(e),
        MigrateError::ExecuteMigration(e, version) => match db_err(e) {
            StoreError::Unavailable(m) => StoreError::Unavailable(m),
            StoreError::Other(m) => StoreError::Other(format!("migration {version}: {m}")),
        },
        other => StoreError::Other(format!("migration failed: {other}")),
    }
}

/// Validates a schema name: `[a-z_][a-z0-9_]*`, at most 63 bytes, not `pg_*`.
fn validate_schema(schema: &str) -> Result<(), StoreError> {
    let bad = |why: &str| Err(StoreError::Other(format!("invalid schema name {schema:?}: {why}")));
    if schema.is_empty() || schema.len() > 63 {
        return bad("must be 1 to 63 characters");
    }
    if !schema.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        return bad("only a-z, 0-9 and _ are allowed");
    }
    if schema.as_bytes()[0].is_ascii_digit() {
        return bad("must not start with a digit");
    }
    if schema.starts_with("pg_") {
        return bad("the pg_ prefix is reserved by PostgreSQL");
    }
    Ok(())
}

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
}

/// Delivery state of one channel of a notification.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct DeliveryStatus {
    pub channel: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub event: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    channel: String,
    status: String,
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
            channel: r.channel,
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
fn encode_cursor(created_at: DateTime<Utc>, id: Uuid) -> String {
    format!("{}_{}", created_at.timestamp_micros(), id.simple())
}

fn decode_cursor(cursor: &str) -> Option<(DateTime<Utc>, Uuid)> {
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

#[derive(sqlx::FromRow)]
struct IdempotencyRow {
    request_hash: String,
    state: String,
    response_status: Option<i32>,
    response_body: Option<serde_json::Value>,
    stale: bool,
}

fn replay_of(key: &str, status: Option<i32>, body: Option<serde_json::Value>) -> Result<Begin, StoreError> {
    match (status.and_then(|s| u16::try_from(s).ok()), body) {
        (Some(status), Some(body)) => Ok(Begin::Replay { status, body }),
        _ => Err(StoreError::Other(format!("idempotency key {key:?} is completed but has no stored response"))),
    }
}

/// Handle to the database (a connection pool bound to one schema). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    schema: String,
    /// Connections whose commits do not wait for the WAL flush: claims only.
    claims_pool: PgPool,
    /// The group-commit tasks of the worker's hot-path writes, started on first use: claims
    /// in one; delivered records and inbox items in the other, so that a record (the write
    /// between an accepted e-mail and its ack) never waits behind a batch of claims.
    claims: Arc<OnceLock<Batcher>>,
    records: Arc<OnceLock<Batcher>>,
    /// How to open a connection of our own (migrations), where the real cause of a failure
    /// shows (the pool only says it timed out).
    options: PgConnectOptions,
    /// `host:port/database`, for messages.
    target: String,
}

impl Store {
    /// Creates a lazy pool: nothing is connected until first use, so this does not fail when
    /// Postgres is down. Every connection gets `search_path=<schema>`. Waiting for a connection
    /// is bounded by [`ACQUIRE_TIMEOUT`] (3 s).
    ///
    /// Errors only for a bad URL or schema name (or when called outside a Tokio runtime).
    pub fn connect_lazy(database_url: &str, schema: &str, max_connections: u32) -> Result<Store, StoreError> {
        validate_schema(schema)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::Other("Store::connect_lazy must be called inside a Tokio runtime".into()));
        }
        let scheme = database_url.split_once("://").map(|(s, _)| s).unwrap_or("");
        if !matches!(scheme, "postgres" | "postgresql") {
            return Err(StoreError::Other(format!(
                "the database URL must start with postgres:// or postgresql:// (notify needs PostgreSQL), not `{scheme}://`"
            )));
        }
        let options = PgConnectOptions::from_str(database_url)
            .map_err(|e| StoreError::Other(format!("invalid database URL: {e}")))?
            .options([("search_path", schema)]);
        let pool = lazy_pool(options.clone(), max_connections);
        let target = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or(options.get_username())
        );
        // Claims commit without waiting for the WAL flush (see [`Store::claim`]).
        let claims_pool = lazy_pool(options.clone().options([("synchronous_commit", "off")]), batch::PARALLEL as u32);
        Ok(Store {
            pool,
            claims_pool,
            schema: schema.to_owned(),
            claims: Arc::default(),
            records: Arc::default(),
            options,
            target,
        })
    }

    fn claims(&self) -> &Batcher {
        self.claims.get_or_init(|| Batcher::start(self.claims_pool.clone()))
    }

    fn records(&self) -> &Batcher {
        self.records.get_or_init(|| Batcher::start(self.pool.clone()))
    }

    /// How many statements the worker's hot-path writes took so far, and how many writes they
    /// carried (claims, delivered records and inbox items share statements under load).
    pub fn group_commit_stats(&self) -> GroupCommitStats {
        let stats = |b: &OnceLock<Batcher>| b.get().map(Batcher::stats).unwrap_or_default();
        let (w, r) = (stats(&self.claims), stats(&self.records));
        GroupCommitStats { statements: w.statements + r.statements, writes: w.writes + r.writes }
    }

    /// The schema this store works in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The underlying pool (its connections have `search_path` set to [`Store::schema`]).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes the pools (waits for checked-out connections to come back).
    pub async fn close(&self) {
        self.claims_pool.close().await;
        self.pool.close().await;
    }

    /// Creates the schema if needed and applies the embedded migrations (`/migrations`) inside
    /// it; `_sqlx_migrations` lives in the schema too. Safe to call concurrently (API and worker
    /// starting together) and repeatedly.
    ///
    /// Concurrency: runs on a connection taken out of the pool, under a session advisory lock
    /// keyed by the schema name (so different schemas migrate in parallel; sqlx's own
    /// database-wide lock is switched off). The connection is closed afterwards, which releases
    /// the lock even when a migration failed.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        // A connection of its own, not the pool's: a wrong port, password or database name
        // then shows as what it is (refused, authentication failed, ...) with where it went,
        // instead of the pool's "timed out".
        // Notices ("relation _sqlx_migrations already exists, skipping") are not news.
        let options = self.options.clone().options([("client_min_messages", "warning")]);
        let connect = tokio::time::timeout(ACQUIRE_TIMEOUT, PgConnection::connect_with(&options));
        let mut conn = match connect.await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(self.at_target(db_err(e))),
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "PostgreSQL at {}: no connection within {:?}",
                    self.target, ACQUIRE_TIMEOUT
                )))
            }
        };
        let result = self.migrate_on(&mut conn).await;
        if let Err(e) = conn.close().await {
            tracing::debug!(error = %e, "closing the migration connection");
        }
        match &result {
            Ok(()) => tracing::info!(
                schema = %self.schema,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "database migrated"
            ),
            Err(e) => {
                tracing::error!(schema = %self.schema, error = %e, "database migration failed")
            }
        }
        result
    }

    /// `e` with where the database is (`PostgreSQL at host:port/database: ...`).
    fn at_target(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Unavailable(m) => StoreError::Unavailable(format!("PostgreSQL at {}: {m}", self.target)),
            StoreError::Other(m) => StoreError::Other(format!("PostgreSQL at {}: {m}", self.target)),
        }
    }

    async fn migrate_on(&self, conn: &mut PgConnection) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
            .bind(format!("notify-store/migrate/{}", self.schema))
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        // Only when missing: `IF NOT EXISTS` on an existing schema makes the server send a
        // notice, which sqlx logs as a warning at every start.
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&self.schema)
            .fetch_one(&mut *conn)
            .await
            .map_err(db_err)?;
        if !exists {
            // The name is validated ([a-z_][a-z0-9_]*), quoting is belt and braces.
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", self.schema))
                .execute(&mut *conn)
                .await
                .map_err(db_err)?;
        }
        let mut migrator: Migrator = sqlx::migrate!("../../migrations");
        migrator.set_locking(false);
        migrator.run_direct(conn).await.map_err(migrate_err)
    }

    /// `SELECT 1`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&self.pool).await.map_err(db_err)?;
        Ok(())
    }

    /// Drops the schema with everything in it (tests' cleanup). Refuses `public`.
    pub async fn drop_schema(&self) -> Result<(), StoreError> {
        if self.schema == "public" {
            return Err(StoreError::Other("refusing to drop schema public".into()));
        }
        sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema))
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    // ---------------------------------------------------------------- deliveries

    /// The send guard. Atomically (one `INSERT .. ON CONFLICT DO UPDATE .. WHERE`): if
    /// (id, channel) is already `delivered` → [`Claim::AlreadyDelivered`]; otherwise the row is
    /// upserted as `delivering` with `attempts = max(stored, attempt)`, `event` (kept when
    /// `None`), `updated_at = now()` → [`Claim::Proceed`]. A `dead` row can be claimed again
    /// (dead-letter replay).
    ///
    /// Concurrent calls share one statement and one commit (see the `batch` module). That
    /// commit does not wait for the WAL flush (`synchronous_commit=off`, ~1 ms less per
    /// delivery): a claim only says "in progress". What the promise rests on, the delivered
    /// record and the inbox item, commits durably, and its flush covers the claim before it. A
    /// Postgres crash can lose the last claims of at most ~0.6 s (3 × `wal_writer_delay`);
    /// such a delivery is either recorded after the crash (the worker records what it sent
    /// later, see `x-notify-sent`) or was never sent, and only its crash count starts over.
    pub async fn claim(&self, id: Uuid, channel: &str, event: Option<&str>, attempt: i32) -> Result<Claim, StoreError> {
        self.claim_copy(id, channel, event, attempt, None).await
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
        id: Uuid,
        channel: &str,
        event: Option<&str>,
        attempt: i32,
        copy: Option<&str>,
    ) -> Result<Claim, StoreError> {
        let (channel, event, copy) = (channel.to_owned(), event.map(str::to_owned), copy.map(str::to_owned));
        self.claims().call(|reply| Op::Claim { id, channel, event, attempt, copy, reply }).await
    }

    /// Status `delivered`, `delivered_at = now()` (the first time), `last_error` cleared (a
    /// delivered notification has no error; the history of its attempts is in the logs).
    /// Creates the row if it does not exist.
    /// Concurrent calls share one statement and one commit.
    pub async fn mark_delivered(&self, id: Uuid, channel: &str) -> Result<(), StoreError> {
        let channel = channel.to_owned();
        self.records().call(|reply| Op::Delivered { id, channel, reply }).await
    }

    /// Status `retrying`, `last_error = error`. Never downgrades a `delivered` row.
    /// Creates the row if it does not exist (with `event`, which a stored one keeps).
    pub async fn mark_retrying(
        &self,
        id: Uuid,
        channel: &str,
        event: Option<&str>,
        error: &str,
    ) -> Result<(), StoreError> {
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
        .bind(id)
        .bind(channel)
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
        id: Uuid,
        channel: &str,
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
        .bind(id)
        .bind(channel)
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

    // ---------------------------------------------------------------- inbox

    /// Inserts the item (id: UUID v7) unless (notification_id, user) already has one → `true`
    /// when inserted, `false` when it existed. In the same statement (so atomically) marks
    /// (notification_id, `in_app`) delivered, so a redelivery can never create a second item.
    /// Concurrent calls share one statement and one commit (see the `batch` module).
    pub async fn insert_inbox_item(&self, item: &NewInboxItem) -> Result<bool, StoreError> {
        let item = item.clone();
        self.records().call(|reply| Op::Inbox { item, reply }).await
    }

    /// A page of the user's inbox, newest first (`created_at DESC, id DESC`). `before` is a
    /// cursor from a previous page's `next_cursor` (malformed → [`StoreError::Other`]; check
    /// with [`is_valid_cursor`] first to answer 400). `limit` is clamped to 1..=100.
    pub async fn list_inbox(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<&str>,
        limit: i64,
    ) -> Result<InboxPage, StoreError> {
        let limit = limit.clamp(1, 100);
        let before = match before {
            Some(c) => Some(decode_cursor(c).ok_or_else(|| StoreError::Other(format!("invalid cursor {c:?}")))?),
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

    // ---------------------------------------------------------------- idempotency keys

    /// Starts handling a request carrying an `Idempotency-Key` (`key` is used as given;
    /// `request_hash` is the caller's hex sha256 of path + body):
    /// - key absent → inserted as `pending` → [`Begin::Owner`] (exactly one concurrent caller
    ///   wins: `INSERT .. ON CONFLICT DO NOTHING`);
    /// - present with another hash → [`Begin::Mismatch`];
    /// - present, same hash, completed → [`Begin::Replay`];
    /// - present, same hash, pending → [`Begin::Pending`], except that a pending row older than
    ///   [`IDEMPOTENCY_PENDING_TAKEOVER_AFTER`] (its owner crashed) is taken over → `Owner`;
    /// - present, same hash, failed (see [`Store::idempotency_abandon`]) → taken over → `Owner`.
    ///
    /// An owner asks [`Store::idempotency_notification`] for the id to publish under.
    pub async fn idempotency_begin(&self, key: &str, request_hash: &str) -> Result<Begin, StoreError> {
        let stale_secs = IDEMPOTENCY_PENDING_TAKEOVER_AFTER.as_secs_f64();
        // A few rounds: the row can vanish (abandoned) between our INSERT and SELECT.
        for _ in 0..5 {
            let inserted: Option<(String,)> = sqlx::query_as(
                "INSERT INTO idempotency_keys (key, request_hash, state)
                 VALUES ($1, $2, 'pending')
                 ON CONFLICT (key) DO NOTHING
                 RETURNING key",
            )
            .bind(key)
            .bind(request_hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
            if inserted.is_some() {
                return Ok(Begin::Owner);
            }

            let existing: Option<IdempotencyRow> = sqlx::query_as(
                "SELECT request_hash, state, response_status, response_body,
                        (state = 'pending'
                         AND created_at < now() - make_interval(secs => $2)) AS stale
                   FROM idempotency_keys WHERE key = $1",
            )
            .bind(key)
            .bind(stale_secs)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
            let Some(row) = existing else { continue };

            if row.request_hash != request_hash {
                return Ok(Begin::Mismatch);
            }
            if row.state == "completed" {
                return replay_of(key, row.response_status, row.response_body);
            }
            if row.state == "failed" {
                let taken = sqlx::query(
                    "UPDATE idempotency_keys SET state = 'pending', created_at = now()
                      WHERE key = $1 AND request_hash = $2 AND state = 'failed'",
                )
                .bind(key)
                .bind(request_hash)
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
                if taken.rows_affected() == 1 {
                    return Ok(Begin::Owner);
                }
                continue;
            }
            if row.stale {
                let taken = sqlx::query(
                    "UPDATE idempotency_keys SET created_at = now()
                      WHERE key = $1 AND request_hash = $2 AND state = 'pending'
                        AND created_at < now() - make_interval(secs => $3)",
                )
                .bind(key)
                .bind(request_hash)
                .bind(stale_secs)
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
                if taken.rows_affected() == 1 {
                    tracing::warn!("took over a stale pending idempotency key");
                    return Ok(Begin::Owner);
                }
                continue;
            }
            return Ok(Begin::Pending);
        }
        Err(StoreError::Other("idempotency key kept changing under contention".into()))
    }

    /// Stores the response of the owner: state `completed`, status and body.
    pub async fn idempotency_complete(
        &self,
        key: &str,
        status: u16,
        body: &serde_json::Value,
    ) -> Result<(), StoreError> {
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
        row.map(|(id,)| id).ok_or_else(|| StoreError::Other(format!("idempotency key {key:?} vanished while owned")))
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
            let row: Option<(String, Option<i32>, Option<serde_json::Value>)> = sqlx::query_as(
                "SELECT state, response_status, response_body
                   FROM idempotency_keys WHERE key = $1",
            )
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
            match row {
                None => return Ok(None),
                Some((state, _, _)) if state == "failed" => return Ok(None),
                Some((state, status, body)) if state == "completed" => {
                    return replay_of(key, status, body).map(Some);
                }
                Some(_) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        assert!(validate_schema("t_store_0a1b2c3d").is_ok());
        assert!(validate_schema("public").is_ok());
        assert!(validate_schema("_x").is_ok());
        assert!(validate_schema("").is_err());
        assert!(validate_schema(&"a".repeat(64)).is_err());
        assert!(validate_schema(&"a".repeat(63)).is_ok());
        assert!(validate_schema("Upper").is_err());
        assert!(validate_schema("a-b").is_err());
        assert!(validate_schema("a\"; DROP TABLE x; --").is_err());
        assert!(validate_schema("1abc").is_err());
        assert!(validate_schema("pg_temp").is_err());
    }

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

    #[tokio::test]
    async fn bad_url_is_an_error() {
        match Store::connect_lazy("not a url", "s", 1) {
            Err(StoreError::Other(_)) => {}
            other => panic!("{other:?}"),
        }
        assert!(Store::connect_lazy("postgres://x@127.0.0.1/db", "Bad", 1).is_err());
    }
}
