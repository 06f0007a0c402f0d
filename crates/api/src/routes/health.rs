use super::AppState;
use crate::publisher::BrokerState;
use actix_web::{web, HttpResponse};
use serde_json::json;

/// Alive: the process answers. No dependency is checked.
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Ready to accept: connected to RabbitMQ and not blocked by a resource alarm.
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let broker = state.publisher.state();
    let body = json!({
        "status": if broker == BrokerState::Connected { "ready" } else { "not_ready" },
        "checks": {"broker": broker.as_str()},
    });
    if broker == BrokerState::Connected {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().insert_header(("Retry-After", "5")).json(body)
    }
}
