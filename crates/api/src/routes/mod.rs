mod health;
mod notifications;

use crate::{error::ApiError, publisher::Publisher};
use actix_web::{web, HttpRequest, HttpResponse};

pub use notifications::EmailRequest;

/// What every handler can reach.
pub struct AppState {
    pub publisher: Publisher,
    pub max_body_bytes: usize,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/notifications/email")
            .route(web::post().to(notifications::send_email))
            .default_service(web::to(method_not_allowed)),
    )
    .service(web::resource("/health").route(web::get().to(health::health)).default_service(web::to(method_not_allowed)))
    .service(web::resource("/ready").route(web::get().to(health::ready)).default_service(web::to(method_not_allowed)));
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    actix_web::ResponseError::error_response(&ApiError::MethodNotAllowed(req.method().to_string()))
}

pub async fn not_found(req: HttpRequest) -> HttpResponse {
    actix_web::ResponseError::error_response(&ApiError::NotFound(format!("no route for {} {}", req.method(), req.path())))
}

/// The request id: the caller's `X-Request-Id` when it is sane, else a new one. It travels in
/// the envelope as `correlation_id`, linking the API's and the worker's logs.
pub fn request_id(req: &HttpRequest) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}
