mod accept;
pub mod answers;
pub(crate) mod dead_letters;
pub(crate) mod events;
pub(crate) mod health;
pub(crate) mod inbox;
pub(crate) mod meta;
pub(crate) mod notifications;

use crate::{error::ApiError, publisher::Publisher};
use actix_web::{web, HttpRequest, HttpResponse};
use notify_store::Store;
use notify_types::routes::Routes;
use std::sync::Arc;

pub(crate) use accept::hex;
pub use notifications::EmailRequest;

/// What every handler can reach.
pub struct AppState {
    pub publisher: Publisher,
    pub body_limits: crate::extract::BodyLimits,
    pub routes: Arc<Routes>,
    pub store: Option<Store>,
    pub allow_private_webhooks: bool,
    /// The time the idempotency rules read.
    pub clock: crate::clock::Clock,
    /// Answers published under an `Idempotency-Key` and not saved in the database yet.
    pub answers: Arc<answers::Answers>,
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
    // Every resource serves one method; any other answers 405 with `Allow` naming it.
    let resource = |path: &str, allow: &'static str, route: actix_web::Route| {
        web::resource(path)
            .route(route)
            .default_service(web::to(move |req: HttpRequest| method_not_allowed(req, allow)))
    };
    let (get, post) = (web::get, web::post);
    cfg.service(resource("/api/v1/notifications/email", "POST", post().to(notifications::send_email)))
        .service(resource("/api/v1/notifications/webhook", "POST", post().to(notifications::send_webhook)))
        .service(resource("/api/v1/notifications/in-app", "POST", post().to(notifications::send_in_app)))
        .service(resource("/api/v1/notifications/{id}", "GET", get().to(notifications::status)))
        .service(resource("/api/v1/events", "POST", post().to(events::post_event)))
        .service(resource("/events", "POST", post().to(events::post_event_legacy)))
        .service(resource("/api/v1/users/{user}/notifications", "GET", get().to(inbox::list)))
        .service(resource("/api/v1/users/{user}/notifications/read-all", "POST", post().to(inbox::mark_all_read)))
        .service(resource("/api/v1/users/{user}/notifications/{id}/read", "POST", post().to(inbox::mark_read)))
        .service(resource("/api/v1/dead-letters", "GET", get().to(dead_letters::list)))
        .service(resource("/api/v1/dead-letters/replay", "POST", post().to(dead_letters::replay)))
        .service(resource("/api/v1/dead-letters/discard", "POST", post().to(dead_letters::discard)))
        .service(resource("/api/v1/dead-letters/{id}", "GET", get().to(dead_letters::show)))
        .service(resource("/health", "GET", get().to(health::health)))
        .service(resource("/ready", "GET", get().to(health::ready)))
        .service(resource("/metrics", "GET", get().to(meta::metrics)))
        .service(resource("/openapi.json", "GET", get().to(meta::openapi_json)))
        .service(resource("/docs", "GET", get().to(meta::docs)))
        .service(resource("/docs/{file}", "GET", get().to(meta::docs_asset)));
}

async fn method_not_allowed(req: HttpRequest, allow: &'static str) -> HttpResponse {
    let mut res = actix_web::ResponseError::error_response(&ApiError::MethodNotAllowed(req.method().to_string()));
    res.headers_mut().insert(actix_web::http::header::ALLOW, actix_web::http::header::HeaderValue::from_static(allow));
    res
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
