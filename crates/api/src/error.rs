//! One JSON error shape for every failure: `{"error": {"code", "message", "fields"?}}`.
//! 500s are opaque to the caller and logged in full.

use actix_web::{http::StatusCode, HttpResponse, ResponseError};
use serde::Serialize;
use std::time::Duration;

/// One invalid field of a 422.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    /// The field's name (a body field, a query parameter or a header such as `Idempotency-Key`).
    #[schema(example = "to")]
    pub field: String,
    #[schema(example = "must be a valid e-mail address")]
    pub message: String,
}

/// The machine-readable code of an error; each goes with one status.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not JSON.
    MalformedJson,
    /// 415: not `application/json`, or a `Content-Encoding`.
    UnsupportedMediaType,
    /// 413: the body is over `API_MAX_BODY_BYTES`.
    PayloadTooLarge,
    /// 422: invalid fields, listed in `fields`.
    ValidationFailed,
    /// 404: no such route, notification or inbox item.
    NotFound,
    /// 405: the path takes another method (`Allow` names it).
    MethodNotAllowed,
    /// 409: a request with the same `Idempotency-Key` is still in progress.
    Conflict,
    /// 401: missing or wrong API key.
    Unauthorized,
    /// 408: the body did not arrive in time.
    RequestTimeout,
    /// 503: broker or database unavailable; `Retry-After` says when to retry.
    ServiceUnavailable,
    /// 500: a bug; logged in full, opaque to the caller.
    InternalError,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    MalformedJson(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{message}")]
    Validation { message: String, fields: Vec<FieldError> },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    #[error("the request body did not arrive within {}s", .0.as_secs_f64())]
    RequestTimeout(Duration),
    #[error("{message}")]
    Unavailable { message: String, retry_after: Duration },
    #[error("internal error")]
    Unexpected(#[source] anyhow::Error),
}

impl From<notify_store::StoreError> for ApiError {
    fn from(e: notify_store::StoreError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "database unavailable");
            ApiError::Unavailable {
                message: "the database is unavailable; retry later".into(),
                retry_after: Duration::from_secs(5),
            }
        } else {
            ApiError::Unexpected(anyhow::Error::new(e))
        }
    }
}

impl ApiError {
    pub fn validation(fields: Vec<FieldError>) -> Self {
        ApiError::Validation { message: "the request has invalid fields".into(), fields }
    }

    pub fn field(field: &str, message: impl Into<String>) -> Self {
        Self::validation(vec![FieldError { field: field.to_string(), message: message.into() }])
    }

    fn code(&self) -> ErrorCode {
        match self {
            ApiError::MalformedJson(_) => ErrorCode::MalformedJson,
            ApiError::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            ApiError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            ApiError::Validation { .. } => ErrorCode::ValidationFailed,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::MethodNotAllowed(_) => ErrorCode::MethodNotAllowed,
            ApiError::Conflict(_) => ErrorCode::Conflict,
            ApiError::Unauthorized(_) => ErrorCode::Unauthorized,
            ApiError::RequestTimeout(_) => ErrorCode::RequestTimeout,
            ApiError::Unavailable { .. } => ErrorCode::ServiceUnavailable,
            ApiError::Unexpected(_) => ErrorCode::InternalError,
        }
    }
}

/// Every error the API answers: `{"error": {"code", "message", "fields"?}}`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ErrorDetail)]
pub struct Inner<'a> {
    code: ErrorCode,
    /// What went wrong, for a person.
    #[schema(example = "the request has invalid fields")]
    message: String,
    /// Only with `validation_failed`: every invalid field at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Vec<FieldError>, nullable = false)]
    fields: Option<&'a [FieldError]>,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let fields = match self {
            ApiError::Validation { fields, .. } => Some(fields.as_slice()),
            _ => None,
        };
        if let ApiError::Unexpected(e) = self {
            tracing::error!(error = format!("{e:#}"), "request failed unexpectedly");
        }
        let body = Body { error: Inner { code: self.code(), message: self.to_string(), fields } };
        let mut res = HttpResponse::build(self.status_code());
        if let ApiError::Unavailable { retry_after, .. } = self {
            res.insert_header(("Retry-After", retry_after.as_secs().max(1).to_string()));
        }
        if let ApiError::RequestTimeout(_) = self {
            // The rest of the body may still be on its way: don't read it as the next request.
            res.force_close();
        }
        res.json(body)
    }
}
