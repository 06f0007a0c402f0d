mod accept;
mod events;
mod health;
mod inbox;
mod notifications;

use crate::{error::ApiError, publisher::Publisher};
use actix_web::{web, HttpRequest, HttpResponse};
use notify_store::Store;
use notify_types::routes::Routes;
use std::sync::Arc;

pub use notifications::EmailRequest;

/// What every handler can reach.
pub struct AppState {
    pub publisher: Publisher,
    pub body_limits: crate::extract::BodyLimits,
    pub routes: Arc<Routes>,
    pub store: Option<Store>,
    pub allow_private_webhooks: bool,
}

impl AppState {
    fn store(&self) -> Result<&Store, ApiError> {
        self.store.as_ref().ok_or_else(|| ApiError::Unavailable {
            message: "no database is configured (DATABASE_URL)".into(),
            retry_after: std::time::Duration::from_secs(60),
        })
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    let resource = |path: &str, route: actix_web::Route| {
        web::resource(path).route(route).default_service(web::to(method_not_allowed))
    };
    cfg.service(resource("/api/v1/notifications/email", web::post().to(notifications::send_email)))
        .service(resource("/api/v1/notifications/webhook", web::post().to(notifications::send_webhook)))
        .service(resource("/api/v1/notifications/in-app", web::post().to(notifications::send_in_app)))
        .service(resource("/api/v1/notifications/{id}", web::get().to(notifications::status)))
        .service(resource("/api/v1/events", web::post().to(events::post_event)))
        .service(resource("/events", web::post().to(events::post_event)))
        .service(resource("/api/v1/users/{user}/notifications", web::get().to(inbox::list)))
        .service(resource("/api/v1/users/{user}/notifications/read-all", web::post().to(inbox::mark_all_read)))
        .service(resource("/api/v1/users/{user}/notifications/{id}/read", web::post().to(inbox::mark_read)))
        .service(resource("/health", web::get().to(health::health)))
        .service(resource("/ready", web::get().to(health::ready)));
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    actix_web::ResponseError::error_response(&ApiError::MethodNotAllowed(req.method().to_string()))
}

pub async fn not_found(req: HttpRequest) -> HttpResponse {
    actix_web::ResponseError::error_response(&ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
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
