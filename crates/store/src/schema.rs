//! The schema a store works in, and the migrations (`/migrations`, embedded at build time)
//! that make it. Everything lives in one Postgres *schema*: every pooled connection is opened
//! with `search_path=<schema>` (a startup option, so it holds for the whole session), and all
//! SQL — the migrations and sqlx's own `_sqlx_migrations` table included — is unqualified.
//! Tests use one schema each and drop it at the end.

use crate::errors::{db_err, migrate_err, StoreError};
use crate::pool::{Store, ACQUIRE_TIMEOUT};
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use std::time::Instant;

/// Validates a schema name: `[a-z_][a-z0-9_]*`, at most 63 bytes, not `pg_*`. The name goes
/// into `CREATE`/`DROP SCHEMA` text (identifiers cannot be bound), so it is checked first.
pub(crate) fn validate_schema(schema: &str) -> Result<(), StoreError> {
    let bad = |why: &str| Err(StoreError::Config(format!("invalid schema name {schema:?}: {why}")));
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

impl Store {
    /// Creates the schema if needed and applies the embedded migrations (`/migrations`) inside
    /// it; `_sqlx_migrations` lives in the schema too. Safe to call concurrently (API and worker
    /// starting together) and repeatedly.
    ///
    /// Concurrency: runs on a connection of its own, under a session advisory lock keyed by
    /// the schema name (so different schemas migrate in parallel; sqlx's own database-wide
    /// lock is switched off). The connection is closed afterwards, which releases the lock
    /// even when a migration failed.
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
            Ok(Err(e)) => return Err(db_err(e).at_target(&self.target)),
            Err(_) => return Err(StoreError::NoConnection { target: self.target.clone(), waited: ACQUIRE_TIMEOUT }),
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
            return Err(StoreError::Config("refusing to drop schema public".into()));
        }
        sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema))
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
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
}
