//! Shared pieces of notify: the message envelope, channels, the RabbitMQ topology (names and one
//! `declare` both binaries call at start), confirmed publishing and configuration helpers.

pub mod broker;
pub mod channel;
pub mod config;
pub mod envelope;
pub mod headers;
pub mod net;
pub mod routes;
pub mod telemetry;
pub mod topology;

pub use channel::Channel;
pub use envelope::{EmailMessage, Envelope, EventPayload, InAppMessage, Kind, WebhookMessage, ENVELOPE_VERSION};
pub use topology::{QueueType, Topology, TopologyError};
