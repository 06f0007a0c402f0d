//! The tests' PostgreSQL: where it is and how a test names its own schema.

/// `DATABASE_URL`, or the default that `scripts/test` sets up.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| notify_types::config::DEFAULT_DATABASE_URL.to_string())
}

/// The test's own schema, named after its unique prefix (see `rabbit::unique_prefix`).
pub fn schema_of(prefix: &str) -> String {
    prefix.replace(['-', '.'], "_")
}
