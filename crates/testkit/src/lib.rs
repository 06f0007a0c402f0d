//! Test support for notify: real servers and a real broker, never fakes inside the process.
//!
//! - [`smtp`]: an SMTP server on loopback that records mails and can be told to refuse or stall;
//! - [`rabbit`]: helpers against the machine's RabbitMQ (`RABBITMQ_URL`): unique prefixes,
//!   queue counts, draining dead letters, cleaning up a topology;
//! - [`private_broker`]: a RabbitMQ node of a test's own, on its own ports, for fault tests that
//!   must stop, crash or alarm a broker without touching the shared one;
//! - [`private_cluster`]: a private 3-node RabbitMQ cluster (own ports, joined, quorum queues
//!   replicated over all nodes) for failover tests, started once per test binary;
//! - [`mailcatcher`]: the SMTP server plus a web page to read the mails, for local runs
//!   (binary `notify-mailcatcher`, started by `scripts/run`).
//!
//! How the private nodes are made, and the traps: this crate's README.md.
//!
//! Every wait here is bounded and ends in a panic (or error) that says what was last seen, so a
//! failing test explains itself instead of hanging.

pub mod db;
pub mod logs;
pub mod mailcatcher;
pub mod private_broker;
pub mod private_cluster;
pub mod rabbit;
pub mod smtp;
pub mod webhook;

mod node;
mod poll;
