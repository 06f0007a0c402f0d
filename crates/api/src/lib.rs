//! notify-api: accepts notification requests over HTTP and hands them to RabbitMQ durably.
//! A 202 means the broker confirmed the message; anything less is an error the caller sees.

pub mod auth;
pub mod clock;
pub mod config;
pub mod dead_letters;
pub mod error;
pub mod extract;
pub mod metrics;
pub mod openapi;
pub mod publisher;
pub mod routes;
pub mod startup;

pub use clock::Clock;
pub use config::ApiConfig;
pub use startup::Application;
