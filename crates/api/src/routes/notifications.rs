use super::{
    accept::{accept, Accept},
    request_id, AppState,
};
use crate::{
    error::ApiError,
    extract::{json_body, Fields, Parsed},
};
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::SecondsFormat;
use notify_types::{Channel, EmailMessage, Envelope, InAppMessage, Topology, WebhookMessage};
use serde::Deserialize;
use uuid::Uuid;
use validator::{Validate, ValidationError};

/// `POST /api/v1/notifications/email`. Every field is optional for serde so that missing ones
/// are reported together by the validator, each with its name. Limits: RFC 5321's 254-byte
/// path, RFC 5322's 998-character line.
#[derive(Debug, Deserialize, Validate)]
#[serde(deny_unknown_fields)]
pub struct EmailRequest {
    #[validate(
        required(message = "is required"),
        length(min = 3, max = 254, message = "must be between 3 and 254 characters"),
        email(message = "must be a valid e-mail address"),
        custom(function = "single_line"),
        custom(function = "sendable_address")
    )]
    pub to: Option<String>,
    #[validate(
        required(message = "is required"),
        length(min = 1, max = 998, message = "must be between 1 and 998 characters"),
        custom(function = "not_blank"),
        custom(function = "single_line")
    )]
    pub subject: Option<String>,
    #[validate(required(message = "is required"), custom(function = "not_blank"))]
    pub body: Option<String>,
    #[validate(custom(function = "not_blank"))]
    pub html: Option<String>,
}

/// One line of text: no CR or LF, and no other control character (VT, FF, ESC, NUL, ...),
/// since these values end up in mail headers, log lines and URLs.
impl Fields for EmailRequest {
    const FIELDS: &'static [&'static str] = &["to", "subject", "body", "html"];
}

impl Fields for WebhookRequest {
    const FIELDS: &'static [&'static str] = &["url", "payload"];
}

impl Fields for InAppRequest {
    const FIELDS: &'static [&'static str] = &["user", "title", "body", "data"];
}

pub(super) fn single_line(value: &str) -> Result<(), ValidationError> {
    if value.contains(['\r', '\n']) {
        return Err(ValidationError::new("line_break").with_message("must not contain line breaks (CR or LF)".into()));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        let message = format!("must not contain control characters (found U+{:04X})", c as u32);
        return Err(ValidationError::new("control_character").with_message(message.into()));
    }
    Ok(())
}

/// The worker parses recipients with lettre; what lettre refuses (e.g. a domain literal such as
/// `x@[127.0.0.1]`) would be accepted here and dead there, so the API asks lettre too.
fn sendable_address(value: &str) -> Result<(), ValidationError> {
    match value.parse::<lettre::message::Mailbox>() {
        Ok(_) => Ok(()),
        Err(e) => Err(ValidationError::new("unsendable")
            .with_message(format!("is not an address the mail server can be given: {e}").into())),
    }
}

pub(super) fn not_blank(value: &str) -> Result<(), ValidationError> {
    if value.trim().is_empty() {
        return Err(ValidationError::new("blank").with_message("must not be empty or blank".into()));
    }
    Ok(())
}

pub async fn send_email(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let parsed: Parsed<EmailRequest> = json_body(&req, payload, state.body_limits).await?;
    let body = parsed.body;
    let message = EmailMessage {
        to: body.to.unwrap_or_default(),
        subject: body.subject.unwrap_or_default(),
        body: body.body.unwrap_or_default(),
        html: body.html,
    };
    direct(&state, &req, &parsed.value, Channel::Email, serde_json::to_value(&message)).await
}

/// `POST /api/v1/notifications/webhook`: `payload` is POSTed to `url`, signed.
#[derive(Debug, Deserialize, Validate)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    #[validate(
        required(message = "is required"),
        length(min = 1, max = 2048, message = "must be 1 to 2048 characters"),
        custom(function = "single_line")
    )]
    pub url: Option<String>,
    #[validate(required(message = "is required"))]
    pub payload: Option<serde_json::Value>,
}

pub async fn send_webhook(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let parsed: Parsed<WebhookRequest> = json_body(&req, payload, state.body_limits).await?;
    let url = parsed.body.url.unwrap_or_default();
    notify_types::net::check_url_syntax(&url, state.allow_private_webhooks).map_err(|m| ApiError::field("url", m))?;
    let message = WebhookMessage { url, payload: parsed.body.payload.unwrap_or_default() };
    direct(&state, &req, &parsed.value, Channel::Webhook, serde_json::to_value(&message)).await
}

/// `POST /api/v1/notifications/in-app`: an item in `user`'s inbox.
#[derive(Debug, Deserialize, Validate)]
#[serde(deny_unknown_fields)]
pub struct InAppRequest {
    #[validate(
        required(message = "is required"),
        length(min = 1, max = 128, message = "must be 1 to 128 characters"),
        custom(function = "not_blank"),
        custom(function = "single_line")
    )]
    pub user: Option<String>,
    #[validate(
        required(message = "is required"),
        length(min = 1, max = 200, message = "must be 1 to 200 characters"),
        custom(function = "not_blank")
    )]
    pub title: Option<String>,
    #[validate(
        required(message = "is required"),
        length(min = 1, max = 10000, message = "must be 1 to 10000 characters"),
        custom(function = "not_blank")
    )]
    pub body: Option<String>,
    pub data: Option<serde_json::Value>,
}

pub async fn send_in_app(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let parsed: Parsed<InAppRequest> = json_body(&req, payload, state.body_limits).await?;
    let b = parsed.body;
    let message = InAppMessage {
        user: b.user.unwrap_or_default(),
        title: b.title.unwrap_or_default(),
        body: b.body.unwrap_or_default(),
        data: b.data.filter(|d| !d.is_null()),
    };
    direct(&state, &req, &parsed.value, Channel::InApp, serde_json::to_value(&message)).await
}

async fn direct(
    state: &AppState,
    req: &HttpRequest,
    request: &serde_json::Value,
    channel: Channel,
    payload: Result<serde_json::Value, serde_json::Error>,
) -> Result<HttpResponse, ApiError> {
    let payload = payload.map_err(|e| ApiError::Unexpected(e.into()))?;
    let env = Envelope::direct(channel, request_id(req), payload);
    let body = serde_json::json!({
        "message": "request accepted and is being processed",
        "id": env.id,
        "received_at": env.created_at.to_rfc3339_opts(SecondsFormat::Millis, true),
    });
    accept(state, req, request, Accept { env, routing_key: Topology::direct_key(channel), body }).await
}

/// `GET /api/v1/notifications/{id}`: delivery state per channel.
pub async fn status(path: web::Path<String>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let raw = path.into_inner();
    let id = Uuid::parse_str(&raw).map_err(|_| ApiError::NotFound(format!("`{raw}` is not a notification id")))?;
    let store = state.store()?;
    let channels = store.delivery_status(id).await?;
    if channels.is_empty() {
        return Err(ApiError::NotFound(format!(
            "no delivery of notification {id} is recorded: the id is unknown, or the notification is still queued"
        )));
    }
    // How often each channel was replayed from its dead letters, and its latest dead letter:
    // a delivered replay keeps the error that once killed it there.
    let history = store.dead_letter_history(id).await?;
    let mut channels = serde_json::to_value(channels).map_err(|e| ApiError::Unexpected(e.into()))?;
    for ch in channels.as_array_mut().into_iter().flatten() {
        let h = history.iter().find(|h| ch["channel"] == h.channel.as_str());
        ch["replays"] = h.map_or(0, |h| h.replays).into();
        ch["last_dead_letter"] =
            match h.and_then(|h| h.last_dead_letter.as_ref().zip(h.last_dead_letter_status.as_ref())) {
                Some((d, status)) => serde_json::json!({
                    "id": d.id, "reason": d.reason, "last_error": d.last_error, "dead_at": d.dead_at, "status": status,
                }),
                None => serde_json::Value::Null,
            };
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({"id": id, "channels": channels})))
}
