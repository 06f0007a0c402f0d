use super::{
    accept::{accept, Accept},
    notifications::{not_blank, single_line},
    request_id, AppState,
};
use crate::{
    error::ApiError,
    extract::{json_body, Fields, Parsed},
};
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::SecondsFormat;
use notify_types::{Envelope, EventPayload, Topology};
use serde::Deserialize;
use validator::Validate;

/// `POST /api/v1/events` (and `/events`): a business event, routed by the routes file.
#[derive(Debug, Deserialize, Validate)]
#[serde(deny_unknown_fields)]
pub struct EventRequest {
    #[validate(required(message = "is required"), length(min = 1, max = 200, message = "must be 1 to 200 characters"))]
    pub event: Option<String>,
    #[validate(
        required(message = "is required"),
        length(min = 1, max = 128, message = "must be 1 to 128 characters"),
        custom(function = "not_blank"),
        custom(function = "single_line")
    )]
    pub user_target: Option<String>,
    #[validate(required(message = "is required"))]
    pub payload: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Fields for EventRequest {
    const FIELDS: &'static [&'static str] = &["event", "user_target", "payload"];
}

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
    let body = serde_json::json!({
        "status": "success",
        "message": "event accepted",
        "event_id": env.id,
        "received_at": env.created_at.to_rfc3339_opts(SecondsFormat::Millis, true),
    });
    accept(&state, &req, &parsed.value, Accept { routing_key: Topology::event_key(&event), env, body }).await
}
