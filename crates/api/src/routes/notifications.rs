use super::{request_id, AppState};
use crate::{error::ApiError, extract::json_body};
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::SecondsFormat;
use notify_types::{broker::PublishError, Channel, EmailMessage, Envelope, Topology};
use serde::Deserialize;
use std::time::Duration;
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
        custom(function = "single_line")
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

fn single_line(value: &str) -> Result<(), ValidationError> {
    if value.contains(['\r', '\n']) {
        return Err(ValidationError::new("line_break").with_message("must not contain line breaks (CR or LF)".into()));
    }
    Ok(())
}

fn not_blank(value: &str) -> Result<(), ValidationError> {
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
    let body: EmailRequest = json_body(&req, payload, state.max_body_bytes).await?;
    let message = EmailMessage {
        to: body.to.unwrap_or_default(),
        subject: body.subject.unwrap_or_default(),
        body: body.body.unwrap_or_default(),
        html: body.html,
    };
    let payload = serde_json::to_value(&message).map_err(|e| ApiError::Unexpected(e.into()))?;
    let env = Envelope::direct(Channel::Email, request_id(&req), payload);
    publish(&state, &env, &Topology::direct_key(Channel::Email)).await?;
    Ok(HttpResponse::Accepted().insert_header(("X-Request-Id", env.correlation_id.clone())).json(
        serde_json::json!({
            "message": "request accepted and is being processed",
            "id": env.id,
            "received_at": env.created_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        }),
    ))
}

/// Publishes and maps broker trouble to the caller's answer: 503 + Retry-After when it may
/// pass, 500 when the topology is wrong.
pub async fn publish(state: &AppState, env: &Envelope, routing_key: &str) -> Result<(), ApiError> {
    let started = std::time::Instant::now();
    match state.publisher.publish(env, routing_key).await {
        Ok(()) => {
            tracing::info!(id = %env.id, correlation_id = %env.correlation_id, routing_key, elapsed_ms = started.elapsed().as_millis() as u64, "accepted");
            Ok(())
        }
        Err(e @ PublishError::Unroutable { .. }) => {
            tracing::error!(id = %env.id, error = %e, "message unroutable: the topology is missing a binding");
            Err(ApiError::Unexpected(anyhow::anyhow!(e)))
        }
        Err(e) => {
            tracing::warn!(id = %env.id, error = %e, "not accepted: broker unavailable");
            Err(ApiError::Unavailable {
                message: format!("the message broker is unavailable ({e}); nothing was accepted, retry later"),
                retry_after: Duration::from_secs(if matches!(e, PublishError::Blocked) { 10 } else { 5 }),
            })
        }
    }
}
