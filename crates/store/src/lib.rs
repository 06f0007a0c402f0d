//! PostgreSQL access and migrations shared by the API and the worker, one module per
//! aggregate:
//! - [`deliveries`]: state per (notification, channel) — `queued|delivering|delivered|retrying|dead`,
//!   attempts, last error. [`Store::claim`] is the worker's send guard.
//! - [`inbox`]: the in-app inbox, keyset-paginated newest first.
//! - [`idempotency`]: the API's `Idempotency-Key` records.
//!
//! and around them: [`pool`] (the [`Store`] handle), [`schema`] (the schema and its
//! migrations), [`errors`] and `batch` (the worker's hot-path writes, group-committed).
//! Modules name each other by path (`crate::errors::StoreError`); the re-exports below are for
//! the crates that use the store.

mod batch;
mod columns;
mod dead_letter_actions;
mod dead_letters;
pub mod deliveries;
pub mod errors;
#[cfg(feature = "test-faults")]
pub mod faults;
pub mod idempotency;
pub mod inbox;
pub mod pool;
mod retention;
pub mod schema;

pub use batch::{GroupCommitStats, MAX_BATCH, PARALLEL};
pub use dead_letter_actions::{BeginReplay, DeadLetterAction, ReplayJob};
pub use dead_letters::{
    ChannelHistory, DeadLetter, DeadLetterDetail, DeadLetterFilter, DeadLetterPage, NewDeadLetter, DEAD_REASONS,
    REPLAY_TAKEOVER_AFTER,
};
pub use deliveries::{Claim, DeliveryKey, DeliveryState, DeliveryStatus};
pub use errors::StoreError;
pub use idempotency::{Begin, IDEMPOTENCY_PENDING_TAKEOVER_AFTER};
pub use inbox::{is_valid_cursor, InboxItem, InboxPage, NewInboxItem};
pub use pool::{Store, ACQUIRE_TIMEOUT};
pub use retention::{Purged, Retention};
