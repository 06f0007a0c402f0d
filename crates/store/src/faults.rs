//! Failures the end-to-end tests inject into a store, to show what the API does when a write
//! fails at the worst moment. Compiled only with the `test-faults` feature, which only the
//! tests enable: the release binaries carry none of it.

use crate::errors::StoreError;
use crate::pool::Store;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Counters of failures still to inject. Shared by every clone of a [`Store`].
#[derive(Debug, Default)]
pub struct Faults {
    idempotency_complete: AtomicUsize,
}

impl Faults {
    /// Fails the call (as a pool timeout would) while failures are left to inject.
    pub(crate) fn idempotency_complete(&self) -> Result<(), StoreError> {
        let left = self.idempotency_complete.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match left {
            Ok(_) => Err(StoreError::Unavailable { target: None, source: Arc::new(sqlx::Error::PoolTimedOut) }),
            Err(_) => Ok(()),
        }
    }
}

impl Store {
    /// The next `n` calls of [`Store::idempotency_complete`] (on this store or any clone of it)
    /// fail as if the database were out of reach, without touching it.
    pub fn fail_idempotency_completions(&self, n: usize) {
        self.faults.idempotency_complete.store(n, Ordering::SeqCst);
    }
}
