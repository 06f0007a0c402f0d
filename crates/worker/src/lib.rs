//! notify-worker: consumes the channel queues, delivers, and settles every message exactly one
//! way: ack after delivery, republish to a delay tier (confirmed) then ack, or dead-letter
//! (confirmed) then ack. Nothing is acked before its fate is safe in the broker.

pub mod channels;
pub mod config;
pub mod consumer;
pub mod dead_letters;
pub mod deliver;
pub mod outcome;
pub mod retention;
pub mod settle;

pub use config::WorkerConfig;
pub use consumer::Worker;
pub use outcome::Outcome;
