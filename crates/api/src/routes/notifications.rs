use super::{
    accept::{accept, Accept},
    request_id, AppState,
};
use crate::error::Body as ErrorBody;
use crate::openapi::{AcceptErrors, AcceptHeaders, AcceptedResponse, ReadErrors};
use crate::{
    error::ApiError,
    extract::{json_body, Fields, Parsed},
};
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::SecondsFormat;
use notify_types::{Channel, EmailMessage, Envelope, InAppMessage, Topology, WebhookMessage};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;
use validator::{Validate, ValidationError};

// Every field is optional for serde so that missing ones are reported together by the
// validator, each with its name. Limits: RFC 5321's 254-byte path, RFC 5322's 998-character line.
/// An e-mail to one recipient.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailRequest {
    /// One address the worker's mail library accepts (no domain literals such as `x@[127.0.0.1]`).
    #[schema(required = true, value_type = String, format = Email, min_length = 3, max_length = 254, example = "user@example.com")]
    #[validate(
        required(message = "is required"),
        length(min = 3, max = 254, message = "must be between 3 and 254 characters"),
        email(message = "must be a valid e-mail address"),
        custom(function = "single_line"),
        custom(function = "sendable_address")
    )]
    pub to: Option<String>,
    /// One line, not blank.
    #[schema(required = true, value_type = String, min_length = 1, max_length = 998, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$", example = "Welcome to notify")]
    #[validate(
        required(message = "is required"),
        length(min = 1, max = 998, message = "must be between 1 and 998 characters"),
        custom(function = "not_blank"),
        custom(function = "single_line")
    )]
    pub subject: Option<String>,
    /// The text part, not blank.
    #[schema(required = true, value_type = String, example = "Your account is ready.")]
    #[validate(required(message = "is required"), custom(function = "not_blank"))]
    pub body: Option<String>,
    /// An HTML alternative, not blank.
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

/// Send an e-mail.
#[utoipa::path(
    post,
    path = "/api/v1/notifications/email",
    tag = "notifications",
    request_body = EmailRequest,
    params(AcceptHeaders),
    responses(AcceptedResponse, AcceptErrors),
)]
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

/// A webhook: `payload` is POSTed to `url`, signed.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    /// An absolute http(s) URL. Hosts that are not globally reachable (private, loopback,
    /// link-local, special-purpose) are refused unless `WEBHOOK_ALLOW_PRIVATE=true`.
    #[schema(required = true, value_type = String, format = "uri", min_length = 1, max_length = 2048, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$", example = "https://hooks.example.com/orders")]
    #[validate(
        required(message = "is required"),
        length(min = 1, max = 2048, message = "must be 1 to 2048 characters"),
        custom(function = "single_line")
    )]
    pub url: Option<String>,
    /// Any JSON value but `null`: the body POSTed to `url`.
    #[schema(required = true, value_type = Value, example = json!({"order_id": "o-1001"}))]
    #[validate(required(message = "is required"))]
    pub payload: Option<serde_json::Value>,
}

/// Send a webhook: `payload` is POSTed to `url`, signed (Standard Webhooks).
#[utoipa::path(
    post,
    path = "/api/v1/notifications/webhook",
    tag = "notifications",
    request_body = WebhookRequest,
    params(AcceptHeaders),
    responses(AcceptedResponse, AcceptErrors),
)]
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

/// An item in `user`'s in-app inbox.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InAppRequest {
    /// The inbox's owner: one line, not blank.
    #[schema(required = true, value_type = String, min_length = 1, max_length = 128, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$", example = "u-42")]
    #[validate(
        required(message = "is required"),
        length(min = 1, max = 128, message = "must be 1 to 128 characters"),
        custom(function = "not_blank"),
        custom(function = "single_line")
    )]
    pub user: Option<String>,
    /// Not blank.
    #[schema(required = true, value_type = String, min_length = 1, max_length = 200, example = "Password reset requested")]
    #[validate(
        required(message = "is required"),
        length(min = 1, max = 200, message = "must be 1 to 200 characters"),
        custom(function = "not_blank")
    )]
    pub title: Option<String>,
    /// Not blank.
    #[schema(required = true, value_type = String, min_length = 1, max_length = 10000, example = "A reset link was sent to your e-mail address.")]
    #[validate(
        required(message = "is required"),
        length(min = 1, max = 10000, message = "must be 1 to 10000 characters"),
        custom(function = "not_blank")
    )]
    pub body: Option<String>,
    /// Any JSON, kept with the item.
    #[schema(value_type = Option<Value>)]
    pub data: Option<serde_json::Value>,
}

/// Put an item in a user's in-app inbox.
#[utoipa::path(
    post,
    path = "/api/v1/notifications/in-app",
    tag = "notifications",
    request_body = InAppRequest,
    params(AcceptHeaders),
    responses(AcceptedResponse, AcceptErrors),
)]
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
    let body = Accepted {
        message: "request accepted and is being processed",
        id: env.id,
        received_at: env.created_at.to_rfc3339_opts(SecondsFormat::Millis, true),
    };
    let body = serde_json::to_value(body).map_err(|e| ApiError::Unexpected(e.into()))?;
    accept(state, req, request, Accept { env, routing_key: Topology::direct_key(channel), body }).await
}

/// The 202 of a direct notification.
#[derive(Serialize, ToSchema)]
pub struct Accepted {
    #[schema(example = "request accepted and is being processed")]
    pub message: &'static str,
    /// The notification's id: `GET /api/v1/notifications/{id}` shows its delivery.
    pub id: Uuid,
    /// When the API accepted it (RFC 3339, UTC, milliseconds).
    #[schema(format = DateTime, example = "2026-11-22T11:02:03.123Z")]
    pub received_at: String,
}

/// Delivery state of a notification, one entry per channel.
#[derive(Serialize, ToSchema)]
pub struct NotificationStatus {
    pub id: Uuid,
    pub channels: Vec<ChannelStatus>,
}

/// One channel's delivery state, with its dead-letter history.
#[derive(Serialize, ToSchema)]
pub struct ChannelStatus {
    #[serde(flatten)]
    pub state: notify_store::DeliveryStatus,
    /// How often this channel was replayed from its dead letters (`REPLAY_LIMIT` caps it).
    pub replays: i32,
    /// The channel's latest dead letter, if it ever died: a delivered replay keeps the error
    /// that once killed it here.
    pub last_dead_letter: Option<LastDeadLetter>,
}

/// The latest dead letter of a channel of a notification.
#[derive(Serialize, ToSchema)]
pub struct LastDeadLetter {
    pub id: Uuid,
    pub reason: String,
    pub last_error: Option<String>,
    pub dead_at: chrono::DateTime<chrono::Utc>,
    /// `dead`, `replaying`, `replayed` or `discarded`.
    pub status: String,
}

/// Delivery state of a notification, per channel.
#[utoipa::path(
    get,
    path = "/api/v1/notifications/{id}",
    tag = "notifications",
    params(("id" = String, Path, description = "The notification id from the 202")),
    responses(
        (status = 200, description = "Each channel's status, attempts and last error", body = NotificationStatus),
        (status = 404, description = "`not_found`: no delivery is recorded yet (still queued), or the id is unknown or not an id", body = ErrorBody),
        ReadErrors,
    ),
)]
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
    let channels = channels
        .into_iter()
        .map(|state| {
            let h = history.iter().find(|h| h.channel == state.channel.as_str());
            let last_dead_letter = h.and_then(|h| h.last_dead_letter.as_ref().zip(h.last_dead_letter_status.as_ref()));
            ChannelStatus {
                replays: h.map_or(0, |h| h.replays),
                last_dead_letter: last_dead_letter.map(|(d, status)| LastDeadLetter {
                    id: d.id,
                    reason: d.reason.clone(),
                    last_error: d.last_error.clone(),
                    dead_at: d.dead_at,
                    status: status.clone(),
                }),
                state,
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(NotificationStatus { id, channels }))
}
