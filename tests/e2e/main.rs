//! The end-to-end tests of notify, one binary: the API and the worker against the real
//! RabbitMQ, PostgreSQL, SMTP server and HTTP receiver. Every test has its own prefix (queues,
//! exchange, vhost) and Postgres schema, so they run in parallel and leave nothing behind —
//! also when one fails (`support::Leftovers`).
//!
//! `TEST_LOG=1 cargo test --test e2e [NAME]` prints the services' logs.

mod support;

mod auth;
mod bad_input;
mod broker_faults;
mod broker_outage;
mod cluster;
mod dead_letters;
mod email_pipeline;
mod events;
mod first_hour;
mod hardening;
mod idempotency_retry;
mod poison;
mod postgres_outage;
mod secrets;
mod topology;
mod validation;
