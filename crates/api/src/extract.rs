//! Reading a JSON request body with exact status codes: 415 for a non-JSON content type, 413
//! past the size limit, 400 for malformed JSON, 422 naming the field for wrong types, unknown
//! or invalid fields.

use crate::error::{ApiError, FieldError};
use actix_web::{http::header, web, HttpRequest};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use validator::{Validate, ValidationErrors};

/// A parsed and validated request, with its JSON value (for the idempotency hash).
pub struct Parsed<T> {
    pub body: T,
    pub value: serde_json::Value,
}

/// Reads, parses and validates a JSON body into `T`.
pub async fn json_body<T>(req: &HttpRequest, mut payload: web::Payload, limit: usize) -> Result<Parsed<T>, ApiError>
where
    T: DeserializeOwned + Validate,
{
    check_content_type(req)?;
    if let Some(len) =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::MalformedJson(format!("could not read the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    parse(&body)
}

/// Parses and validates an in-memory body.
pub fn parse<T>(body: &[u8]) -> Result<Parsed<T>, ApiError>
where
    T: DeserializeOwned + Validate,
{
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::MalformedJson(format!("the body is not valid JSON: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(ApiError::field("", "the body must be a JSON object"));
    };
    if let Some((field, _)) = object.iter().find(|(k, v)| k.contains('\0') || has_nul(v)) {
        return Err(ApiError::field(field, "must not contain NUL characters (\\u0000)"));
    }
    let parsed: T = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        ApiError::field(&field, clean_serde_message(&e.into_inner().to_string()))
    })?;
    parsed.validate().map_err(|e| ApiError::validation(field_errors(&e)))?;
    Ok(Parsed { body: parsed, value })
}

/// Whether a string (or key) anywhere in `value` holds a NUL: Postgres cannot store one in text
/// or jsonb (status, inbox), so such a request could never be delivered everywhere.
fn has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(has_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn check_content_type(req: &HttpRequest) -> Result<(), ApiError> {
    let raw = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = raw.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let is_json = essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"));
    if is_json {
        Ok(())
    } else if raw.is_empty() {
        Err(ApiError::UnsupportedMediaType("Content-Type must be application/json (none was sent)".into()))
    } else {
        Err(ApiError::UnsupportedMediaType(format!("Content-Type must be application/json, not `{raw}`")))
    }
}

/// serde's messages mention Rust types; keep them but drop the trailing position noise.
fn clean_serde_message(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Flattens validator's errors into a sorted per-field list.
pub fn field_errors(errors: &ValidationErrors) -> Vec<FieldError> {
    let mut out: Vec<FieldError> = errors
        .field_errors()
        .iter()
        .flat_map(|(field, errs)| {
            errs.iter().map(move |e| FieldError {
                field: field.to_string(),
                message: e.message.as_ref().map(|m| m.to_string()).unwrap_or_else(|| e.code.to_string()),
            })
        })
        .collect();
    out.sort_by(|a, b| a.field.cmp(&b.field).then(a.message.cmp(&b.message)));
    out
}
