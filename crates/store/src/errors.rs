//! The store's one error type. It keeps the `sqlx::Error` it came from (callers log the chain
//! and tests inspect it), and it answers the one question every caller has: is the database
//! out of reach right now (wait and retry: [`StoreError::is_unavailable`]), or did this
//! statement fail in a way that retrying will not fix ([`StoreError::is_query_bug`])? The
//! worker dead-letters the second kind with a reason of its own instead of retrying it as an
//! outage, so the split errs on the side of "unavailable" for anything about the environment
//! (connections, credentials, server state) rather than about the statement.

use sqlx::migrate::MigrateError;
use std::sync::Arc;
use std::time::Duration;

/// Errors from the store. `Clone` because one failed group-commit statement answers every
/// caller that was batched into it (hence the `Arc`s around the sources).
///
/// The messages include their cause (`database unavailable: PostgreSQL at h:p/db: ...`):
/// the API and the worker log errors with `%e`, and operators read the cause there.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Postgres can't be used right now: connection refused/reset, I/O, pool timeout or
    /// closed, TLS, authentication, unknown database, server shutting down/starting up, too
    /// many connections, out of resources, deadlock or serialization failure, statement
    /// cancelled. Callers may retry.
    #[error("database unavailable: {}{source}", at(.target))]
    Unavailable {
        /// `host:port/database` when known (connecting), for the message.
        target: Option<String>,
        #[source]
        source: Arc<sqlx::Error>,
    },
    /// A connection of our own (migrations) did not open within the time allowed.
    #[error("database unavailable: PostgreSQL at {target}: no connection within {waited:?}")]
    NoConnection { target: String, waited: Duration },
    /// The group-commit task stopped (its runtime is shutting down). Callers may retry.
    #[error("database unavailable: the store's writer task has stopped")]
    WriterStopped,
    /// The database answered, and the statement failed: SQL syntax, missing table or column,
    /// constraint violation, a value that does not decode. Retrying will not help.
    #[error("database query failed: {}{source}", at(.target))]
    Query {
        target: Option<String>,
        #[source]
        source: Arc<sqlx::Error>,
    },
    /// A migration failed for a reason other than the database being out of reach.
    #[error("database migration failed: {source}")]
    Migration {
        #[source]
        source: Arc<MigrateError>,
    },
    /// Bad settings: database URL, schema name, no Tokio runtime.
    #[error("{0}")]
    Config(String),
    /// A malformed inbox cursor (the API checks with `is_valid_cursor` first and answers 400).
    #[error("invalid inbox cursor {0:?}")]
    BadCursor(String),
    /// A row the store's own writes never produce, or one that changed under us too often.
    #[error("{0}")]
    Inconsistent(String),
}

fn at(target: &Option<String>) -> String {
    target.as_ref().map(|t| format!("PostgreSQL at {t}: ")).unwrap_or_default()
}

impl StoreError {
    /// `true` when the database is out of reach right now and a later retry may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. } | StoreError::NoConnection { .. } | StoreError::WriterStopped)
    }

    /// `true` when the database answered and the statement itself failed (a bug in the SQL or
    /// the schema, or data the store cannot decode): retrying the same work will not help.
    pub fn is_query_bug(&self) -> bool {
        matches!(self, StoreError::Query { .. })
    }

    /// The `sqlx::Error` behind this error, if there is one.
    pub fn sqlx_error(&self) -> Option<&sqlx::Error> {
        match self {
            StoreError::Unavailable { source, .. } | StoreError::Query { source, .. } => Some(source),
            _ => None,
        }
    }

    /// Names where the database is (`PostgreSQL at host:port/database: ...`) in the message.
    pub(crate) fn at_target(self, target: &str) -> StoreError {
        match self {
            StoreError::Unavailable { source, .. } => StoreError::Unavailable { target: Some(target.into()), source },
            StoreError::Query { source, .. } => StoreError::Query { target: Some(target.into()), source },
            other => other,
        }
    }
}

/// Sorts a `sqlx::Error` into [`StoreError::Unavailable`] or [`StoreError::Query`].
pub(crate) fn db_err(e: sqlx::Error) -> StoreError {
    let source = Arc::new(e);
    if is_outage(&source) {
        StoreError::Unavailable { target: None, source }
    } else {
        StoreError::Query { target: None, source }
    }
}

fn is_outage(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        // Only raised while connecting: a connection setting this host cannot use.
        | sqlx::Error::Configuration(_) => true,
        // A connection closed by the other end before the server answered (a proxy or load
        // balancer with no live Postgres behind it, a server going down) comes back as a
        // protocol error: sqlx reads the EOF as "unexpected response from SSLRequest: 0x00".
        sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| is_outage_sqlstate(&c)),
        _ => false,
    }
}

/// SQLSTATEs that say nothing about the statement, only about the server or the session:
/// 08 connection exception; 28 invalid authorization (a rotated password must not
/// dead-letter every message); 3D000 no such database; 40 transaction rollback (deadlock,
/// serialization failure: retry); 53 insufficient resources (disk full, out of memory, too
/// many connections); 57 operator intervention (shutdown, cannot connect now, statement
/// timeout); 58 system error (I/O on the server).
fn is_outage_sqlstate(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "28" | "40" | "53" | "57" | "58")) || code == "3D000"
}

/// Sorts a migration error: an outage stays an outage (the caller retries at start).
pub(crate) fn migrate_err(e: MigrateError) -> StoreError {
    match e {
        MigrateError::Execute(e) => db_err(e),
        MigrateError::ExecuteMigration(e, _) if is_outage(&e) => db_err(e),
        other => StoreError::Migration { source: Arc::new(other) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_and_query_bugs_are_told_apart() {
        assert!(db_err(sqlx::Error::PoolTimedOut).is_unavailable());
        assert!(db_err(sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into())).is_unavailable());
        let bug = db_err(sqlx::Error::ColumnNotFound("nope".into()));
        assert!(bug.is_query_bug() && !bug.is_unavailable());
        for (code, outage) in [
            ("08006", true),
            ("28P01", true),
            ("3D000", true),
            ("40P01", true),
            ("53300", true),
            ("57014", true),
            ("57P01", true),
            ("58030", true),
            ("42601", false),
            ("42703", false),
            ("23505", false),
            ("22P02", false),
        ] {
            assert_eq!(is_outage_sqlstate(code), outage, "{code}");
        }
    }

    #[test]
    fn the_cause_is_kept_and_named() {
        let e = db_err(sqlx::Error::PoolTimedOut).at_target("db:5432/test");
        assert!(e.to_string().starts_with("database unavailable: PostgreSQL at db:5432/test: "), "{e}");
        let source = std::error::Error::source(&e).expect("a source");
        assert!(source.downcast_ref::<Arc<sqlx::Error>>().is_some(), "the sqlx::Error itself");
        assert!(matches!(e.sqlx_error(), Some(sqlx::Error::PoolTimedOut)));
    }
}
