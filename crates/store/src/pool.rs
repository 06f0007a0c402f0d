//! The [`Store`] handle: the connection pools of one Postgres schema, and the group-commit
//! tasks of the worker's hot path. Each aggregate (deliveries, inbox, idempotency keys) adds
//! its own `impl Store` block in its own module; this one only opens and closes.

use crate::batch::{Batcher, GroupCommitStats, PARALLEL};
use crate::errors::StoreError;
use crate::schema::validate_schema;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Connection;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How long [`Store::connect_lazy`]'s pool waits for a connection (including connecting) before
/// giving up with [`StoreError::Unavailable`].
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// A pooled connection idle at least this long is pinged before it is handed out.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(5);

/// Handle to the database (a connection pool bound to one schema). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) pool: PgPool,
    pub(crate) schema: String,
    /// Connections whose commits do not wait for the WAL flush: claims only.
    claims_pool: PgPool,
    /// The group-commit tasks of the worker's hot-path writes, started on first use: claims
    /// in one; delivered records and inbox items in the other, so that a record (the write
    /// between an accepted e-mail and its ack) never waits behind a batch of claims.
    claims: Arc<OnceLock<Batcher>>,
    records: Arc<OnceLock<Batcher>>,
    /// How to open a connection of our own (migrations), where the real cause of a failure
    /// shows (the pool only says it timed out).
    pub(crate) options: PgConnectOptions,
    /// `host:port/database`, for messages.
    pub(crate) target: String,
    /// Failures the end-to-end tests inject (feature `test-faults`; not in release builds).
    #[cfg(feature = "test-faults")]
    pub(crate) faults: Arc<crate::faults::Faults>,
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

impl Store {
    /// Creates a lazy pool: nothing is connected until first use, so this does not fail when
    /// Postgres is down. Every connection gets `search_path=<schema>`. Waiting for a connection
    /// is bounded by [`ACQUIRE_TIMEOUT`] (3 s).
    ///
    /// Errors only for a bad URL or schema name (or when called outside a Tokio runtime).
    pub fn connect_lazy(database_url: &str, schema: &str, max_connections: u32) -> Result<Store, StoreError> {
        validate_schema(schema)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::Config("Store::connect_lazy must be called inside a Tokio runtime".into()));
        }
        let scheme = database_url.split_once("://").map(|(s, _)| s).unwrap_or("");
        if !matches!(scheme, "postgres" | "postgresql") {
            return Err(StoreError::Config(format!(
                "the database URL must start with postgres:// or postgresql:// (notify needs PostgreSQL), not `{scheme}://`"
            )));
        }
        let options = PgConnectOptions::from_str(database_url)
            .map_err(|e| StoreError::Config(format!("invalid database URL: {e}")))?
            .options([("search_path", schema)]);
        let pool = lazy_pool(options.clone(), max_connections);
        let target = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or(options.get_username())
        );
        // Claims commit without waiting for the WAL flush (see [`Store::claim`]).
        let claims_pool = lazy_pool(options.clone().options([("synchronous_commit", "off")]), PARALLEL as u32);
        Ok(Store {
            pool,
            claims_pool,
            schema: schema.to_owned(),
            claims: Arc::default(),
            records: Arc::default(),
            options,
            target,
            #[cfg(feature = "test-faults")]
            faults: Arc::default(),
        })
    }

    pub(crate) fn claims(&self) -> &Batcher {
        self.claims.get_or_init(|| Batcher::start(self.claims_pool.clone()))
    }

    pub(crate) fn records(&self) -> &Batcher {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_url_is_an_error() {
        match Store::connect_lazy("not a url", "s", 1) {
            Err(StoreError::Config(_)) => {}
            other => panic!("{other:?}"),
        }
        assert!(Store::connect_lazy("postgres://x@127.0.0.1/db", "Bad", 1).is_err());
    }
}
