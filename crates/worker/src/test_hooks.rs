//! Faults on request, for the fault tests only: compiled in with the cargo feature
//! `test-hooks` (the test suite enables it; release builds and the Docker image do not), and
//! even then inert unless the process runs with `NOTIFY_ALLOW_TEST_PANIC` set.

use notify_types::Envelope;

/// Panics on `"__notify_test_panic": "<message>"` in the payload (a panicking delivery must be
/// contained), aborts the process on `"__notify_test_abort"` (a crash no `catch_unwind`
/// contains: the queue's delivery limit must dead-letter a message that keeps killing workers).
pub fn fire(env: &Envelope) {
    if std::env::var_os("NOTIFY_ALLOW_TEST_PANIC").is_none() {
        return;
    }
    if let Some(message) = env.payload.get("__notify_test_panic").and_then(|v| v.as_str()) {
        panic!("{message}");
    }
    if env.payload.get("__notify_test_abort").is_some() {
        tracing::error!("test hook: aborting the process");
        std::process::abort();
    }
}
