use super::AppState;
use crate::publisher::BrokerState;
use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

/// `GET /health`: always `ok` while the process answers.
#[derive(Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    status: &'static str,
}

/// `GET /ready`.
#[derive(Serialize, ToSchema)]
pub struct Ready {
    status: Readiness,
    checks: ReadyChecks,
}

#[derive(Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    Ready,
    NotReady,
}

#[derive(Serialize, ToSchema)]
pub struct ReadyChecks {
    broker: BrokerState,
    database: DatabaseState,
}

#[derive(Serialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DatabaseState {
    Connected,
    Unreachable,
    /// No `DATABASE_URL`: status, inbox and idempotency keys answer 503.
    NotConfigured,
}

/// Alive: the process answers. No dependency is checked.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    security(()),
    responses((status = 200, description = "The process answers", body = Health)),
)]
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// Ready: connected to RabbitMQ, not blocked by a resource alarm, Postgres reachable.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "Ready to accept", body = Ready),
        (status = 503, description = "Not ready: `checks` says which dependency is missing", body = Ready,
            headers(("Retry-After" = i64, description = "Seconds before asking again"))),
    ),
)]
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let broker = state.publisher.state();
    let database = match &state.store {
        Some(store) => match tokio::time::timeout(std::time::Duration::from_secs(2), store.ping()).await {
            Ok(Ok(())) => DatabaseState::Connected,
            _ => DatabaseState::Unreachable,
        },
        None => DatabaseState::NotConfigured,
    };
    let ok = broker == BrokerState::Connected && database != DatabaseState::Unreachable;
    let body = Ready {
        status: if ok { Readiness::Ready } else { Readiness::NotReady },
        checks: ReadyChecks { broker, database },
    };
    if ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().insert_header(("Retry-After", "5")).json(body)
    }
}
