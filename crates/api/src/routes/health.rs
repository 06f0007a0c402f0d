use super::AppState;
use crate::publisher::BrokerState;
use actix_web::{web, HttpResponse};
use serde_json::json;

/// Alive: the process answers. No dependency is checked.
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Ready: connected to RabbitMQ, not blocked by a resource alarm, Postgres reachable.
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let broker = state.publisher.state();
    let database = match &state.store {
        Some(store) => match tokio::time::timeout(std::time::Duration::from_secs(2), store.ping()).await {
            Ok(Ok(())) => "connected",
            _ => "unreachable",
        },
        None => "not_configured",
    };
    let ok = broker == BrokerState::Connected && database != "unreachable";
    let body = json!({
        "status": if ok { "ready" } else { "not_ready" },
        "checks": {"broker": broker.as_str(), "database": database},
    });
    if ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().insert_header(("Retry-After", "5")).json(body)
    }
}
