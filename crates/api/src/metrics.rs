//! The API's Prometheus metrics: what it was asked (requests by route pattern, method and
//! status, with their durations), what it accepted (by channel), how long the broker took to
//! confirm, and whether the broker is up or blocking publishers. Served at `GET /metrics`.
//!
//! Labels never carry request data: the route is the matched pattern (`/api/v1/users/{user}/…`,
//! never the user), unmatched paths are one label, and methods outside the standard ones are
//! `other`.

use crate::publisher::BrokerState;
use actix_web::{
    body::MessageBody,
    dev::{ServiceRequest, ServiceResponse},
    http::Method,
    middleware::Next,
};
use std::time::Instant;

pub const REQUESTS: &str = "notify_api_requests_total";
pub const REQUEST_DURATION: &str = "notify_api_request_duration_seconds";
pub const PUBLISH_DURATION: &str = "notify_api_publish_duration_seconds";
pub const ACCEPTED: &str = "notify_api_accepted_total";
pub const BROKER_UP: &str = "notify_api_broker_up";
pub const BROKER_BLOCKED: &str = "notify_api_broker_blocked";
pub const DATABASE_UP: &str = "notify_api_database_up";

/// The `route` label of a request that matched no route (404 from the default service).
pub const UNMATCHED: &str = "unmatched";

/// Every metric name the API exports (the dashboard check in scripts/check-deploy.py reads
/// metric names from this file).
pub const NAMES: &[&str] =
    &[REQUESTS, REQUEST_DURATION, PUBLISH_DURATION, ACCEPTED, BROKER_UP, BROKER_BLOCKED, DATABASE_UP];

/// Installs the process's recorder and describes the metrics (`# HELP` lines).
pub fn init() {
    notify_types::metrics::prometheus();
    metrics::describe_counter!(REQUESTS, "HTTP requests answered, by route pattern, method and status");
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time from a request reaching the API to its response, by route pattern"
    );
    metrics::describe_histogram!(
        PUBLISH_DURATION,
        metrics::Unit::Seconds,
        "Time from publishing a message to the broker's confirm (or the failure)"
    );
    metrics::describe_counter!(ACCEPTED, "Notifications accepted (202), by channel (`event` for events)");
    metrics::describe_gauge!(BROKER_UP, "1 while the API's broker connection is open and confirming publishes");
    metrics::describe_gauge!(BROKER_BLOCKED, "1 while the broker blocks the API's publishes (resource alarm)");
    metrics::describe_gauge!(DATABASE_UP, "1 when PostgreSQL answered the scrape's ping (2 s bound)");
}

/// Middleware: counts and times every request, including those refused before their handler
/// (401 from the key check, 405, 404).
pub async fn record(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    // The pattern is looked up in the app's resource map, so it is known before routing.
    let route = req.match_pattern().unwrap_or_else(|| UNMATCHED.to_string());
    let method = method_label(req.method());
    let started = Instant::now();
    let result = next.call(req).await;
    let status = match &result {
        Ok(res) => res.status(),
        Err(e) => e.as_response_error().status_code(),
    };
    metrics::histogram!(REQUEST_DURATION, "route" => route.clone()).record(started.elapsed().as_secs_f64());
    metrics::counter!(REQUESTS, "route" => route, "method" => method, "status" => status_label(status.as_u16()))
        .increment(1);
    result
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        // Extension methods are free text: one label for all of them.
        _ => "other",
    }
}

/// The status as a label without allocating for the common ones.
fn status_label(status: u16) -> metrics::SharedString {
    match status {
        200 => "200".into(),
        202 => "202".into(),
        400 => "400".into(),
        401 => "401".into(),
        404 => "404".into(),
        405 => "405".into(),
        422 => "422".into(),
        503 => "503".into(),
        other => other.to_string().into(),
    }
}

/// Sets the broker gauges from the publisher's state (at every scrape, so they are exact).
pub fn broker_state(state: BrokerState) {
    let up = matches!(state, BrokerState::Connected | BrokerState::Blocked);
    metrics::gauge!(BROKER_UP).set(if up { 1.0 } else { 0.0 });
    metrics::gauge!(BROKER_BLOCKED).set(if state == BrokerState::Blocked { 1.0 } else { 0.0 });
}

/// Sets the database gauge from a ping made for this scrape.
pub fn database_up(up: bool) {
    metrics::gauge!(DATABASE_UP).set(if up { 1.0 } else { 0.0 });
}

/// One publish, timed from the call to the broker's answer.
pub fn publish_duration(elapsed: std::time::Duration) {
    metrics::histogram!(PUBLISH_DURATION).record(elapsed.as_secs_f64());
}

/// One accepted notification: `channel` is the direct channel or `event`.
pub fn accepted(channel: &'static str) {
    metrics::counter!(ACCEPTED, "channel" => channel).increment(1);
}
