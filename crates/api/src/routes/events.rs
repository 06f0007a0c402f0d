use super::{
    accept::{accept, Accept},
    notifications::{not_blank, single_line},
    request_id, AppState,
};
use crate::openapi::{AcceptErrors, AcceptHeaders, EventAcceptedResponse};
use crate::{
    error::ApiError,
    extract::{json_body, Fields, Parsed},
};
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::SecondsFormat;
use notify_types::{Envelope, EventPayload, Topology};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;
use validator::Validate;

/// A business event, routed to channels by the routes file.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventRequest {
    /// An event of the routes file (`ROUTES_FILE`); an unknown one is a 422 naming the known ones.
    #[schema(required = true, value_type = String, min_length = 1, max_length = 200, example = "password.reset")]
    #[validate(required(message = "is required"), length(min = 1, max = 200, message = "must be 1 to 200 characters"))]
    pub event: Option<String>,
    /// Who the event is about (the in-app inbox's owner): one line, not blank.
    #[schema(required = true, value_type = String, min_length = 1, max_length = 128, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$", example = "u-42")]
    #[validate(
        required(message = "is required"),
        length(min = 1, max = 128, message = "must be 1 to 128 characters"),
        custom(function = "not_blank"),
        custom(function = "single_line")
    )]
    pub user_target: Option<String>,
    /// The event's data, in scope of the route's templates as `payload`.
    #[schema(required = true, value_type = Object, example = json!({"email": "user@example.com", "reset_link": "https://example.com/reset/abc"}))]
    #[validate(required(message = "is required"))]
    pub payload: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Fields for EventRequest {
    const FIELDS: &'static [&'static str] = &["event", "user_target", "payload"];
}

/// The 202 of an event.
#[derive(Serialize, ToSchema)]
pub struct EventAccepted {
    #[schema(example = "success")]
    pub status: &'static str,
    #[schema(example = "event accepted")]
    pub message: &'static str,
    /// The notification id of the event: `GET /api/v1/notifications/{id}` shows its channels.
    pub event_id: Uuid,
    /// When the API accepted it (RFC 3339, UTC, milliseconds).
    #[schema(format = DateTime, example = "2026-11-22T11:02:03.123Z")]
    pub received_at: String,
}

/// Publish a business event; the broker routes it to every channel the routes file gives it.
#[utoipa::path(
    post,
    path = "/api/v1/events",
    tag = "events",
    request_body = EventRequest,
    params(AcceptHeaders),
    responses(EventAcceptedResponse, AcceptErrors),
)]
pub async fn post_event(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let parsed: Parsed<EventRequest> = json_body(&req, payload, state.body_limits).await?;
    let b = parsed.body;
    let event = b.event.unwrap_or_default();
    match state.routes.channels(&event) {
        None => {
            let known = state.routes.events().join(", ");
            return Err(ApiError::field("event", format!("unknown event `{event}`; known events: {known}")));
        }
        Some([]) => {
            let why: Vec<String> = state
                .routes
                .disabled()
                .iter()
                .filter(|(e, _, _)| *e == event)
                .map(|(_, channel, why)| format!("its {channel} route is off: {why}"))
                .collect();
            return Err(ApiError::field("event", format!("event `{event}` goes to no channel: {}", why.join("; "))));
        }
        Some(_) => {}
    }
    let env = Envelope::event(
        &event,
        request_id(&req),
        &EventPayload { user_target: b.user_target.unwrap_or_default(), payload: b.payload.unwrap_or_default().into() },
    );
    let body = EventAccepted {
        status: "success",
        message: "event accepted",
        event_id: env.id,
        received_at: env.created_at.to_rfc3339_opts(SecondsFormat::Millis, true),
    };
    let body = serde_json::to_value(body).map_err(|e| ApiError::Unexpected(e.into()))?;
    accept(&state, &req, &parsed.value, Accept { routing_key: Topology::event_key(&event), env, body }).await
}

/// The same as `POST /api/v1/events`, for older clients.
#[utoipa::path(
    post,
    path = "/events",
    tag = "events",
    request_body = EventRequest,
    params(AcceptHeaders),
    responses(EventAcceptedResponse, AcceptErrors),
)]
pub async fn post_event_legacy(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    post_event(req, payload, state).await
}
