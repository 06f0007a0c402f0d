//! notify-worker: consumes the channel queues, delivers, and settles every message exactly one
//! way: ack after delivery, republish to a delay tier (confirmed) then ack, or dead-letter
//! (confirmed) then ack. Nothing is acked before its fate is safe in the broker.
//!
//! The path of one message: `pipeline::process` → `received` → `deliver` (with `job`) →
//! `record` → `plan` (pure) → `execute`. `consumer` owns the broker session around it.

pub mod channels;
pub mod config;
pub mod consumer;
pub mod dead_letters;
pub mod deliver;
pub mod execute;
pub mod http;
pub mod job;
pub mod metrics;
pub mod outcome;
pub mod pipeline;
pub mod plan;
pub mod received;
pub mod record;
pub mod retention;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;

pub use config::WorkerConfig;
pub use consumer::Worker;
pub use outcome::Outcome;
