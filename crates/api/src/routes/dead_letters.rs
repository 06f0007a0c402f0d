//! `/api/v1/dead-letters`: list and filter dead letters, show one with its message, replay and
//! discard a selection (by ids or by filter). The work is in [`crate::dead_letters`], shared
//! with the `notify-admin` CLI.

use super::AppState;
use crate::{
    auth::Producer,
    dead_letters::{
        parse_filter, AdminError, DeadLetterAdmin, Selector, DEFAULT_ACTION_LIMIT, MAX_ACTION_LIMIT, MAX_IDS,
    },
    error::{ApiError, FieldError},
    extract::{json_body, Fields, Parsed},
};
use crate::{
    error::Body as ErrorBody,
    openapi::{AcceptErrors, ReadErrors},
};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use serde::Deserialize;
use std::{collections::HashMap, time::Duration};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use validator::Validate;

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Store(e) => e.into(),
            AdminError::Broker(detail) => {
                tracing::warn!(%detail, "replay: broker unavailable");
                ApiError::Unavailable {
                    message: "the broker is unavailable; nothing was replayed, retry later".into(),
                    retry_after: Duration::from_secs(5),
                }
            }
        }
    }
}

fn validation(errors: Vec<(String, String)>) -> ApiError {
    ApiError::validation(errors.into_iter().map(|(field, message)| FieldError { field, message }).collect())
}

/// The filters of the dead-letter list (each at most once).
#[allow(dead_code)] // Describes the query string for the OpenAPI document; parsed by hand.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// `email`, `webhook` or `in_app`.
    channel: Option<String>,
    /// The event name (`user.registered`, …).
    event: Option<String>,
    /// `permanent`, `max_attempts`, `unparseable`, `crashed_worker`, `store_query`,
    /// `delivery_limit` or `rejected`.
    reason: Option<String>,
    /// Case-insensitive substring of the last error.
    error: Option<String>,
    /// Died at or after (RFC 3339).
    since: Option<String>,
    /// Died before (RFC 3339).
    until: Option<String>,
    /// 1 to 500 (default 50).
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// One dead letter.
#[allow(dead_code)] // Schema of notify_store::DeadLetter as it is served.
#[derive(ToSchema)]
pub struct DeadLetterDoc {
    /// The dead letter's own id.
    id: Uuid,
    /// `null` only for an unparseable message.
    notification_id: Option<Uuid>,
    channel: String,
    /// `null` for a direct notification.
    event: Option<String>,
    reason: String,
    attempts: i32,
    last_error: Option<String>,
    dead_at: chrono::DateTime<chrono::Utc>,
    replays: i32,
}

/// A page of dead letters, newest first.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct DeadLetterPageDoc {
    items: Vec<DeadLetterDoc>,
    /// Pass as `cursor` for the next page; `null` on the last.
    next_cursor: Option<String>,
    /// How many match the filter in all.
    total: i64,
}

/// One dead letter with the message as it died.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct DeadLetterDetailDoc {
    #[schema(inline)]
    #[serde(flatten)]
    letter: DeadLetterDoc,
    /// The envelope (JSON), or the message's text when it was not JSON.
    message: serde_json::Value,
    /// `dead`, `replaying`, `replayed` or `discarded`.
    status: String,
    status_at: chrono::DateTime<chrono::Utc>,
    /// The AMQP headers it died with.
    headers: serde_json::Value,
}

/// The filter of a replay or discard (the list's filters, as strings).
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct FilterDoc {
    channel: Option<String>,
    event: Option<String>,
    reason: Option<String>,
    error: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

/// What to replay or discard: `ids`, or `filter` with `limit`.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct SelectorDoc {
    ids: Option<Vec<Uuid>>,
    filter: Option<FilterDoc>,
    /// With `filter`: at most this many (default and maximum in the README).
    limit: Option<i64>,
    /// Only say what would be done.
    dry_run: Option<bool>,
}

/// What a replay did.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ReplayedDoc {
    matched: i64,
    replayed: i64,
    ids: Vec<Uuid>,
    not_found: Vec<Uuid>,
    /// Past `REPLAY_LIMIT`, with the reason.
    refused: Vec<RefusedDoc>,
    /// Could not be published; still dead.
    failed: Vec<FailedDoc>,
}

/// What a discard did.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct DiscardedDoc {
    matched: i64,
    discarded: i64,
    ids: Vec<Uuid>,
    not_found: Vec<Uuid>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct RefusedDoc {
    id: Uuid,
    reason: String,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct FailedDoc {
    id: Uuid,
    error: String,
}

/// Dead letters, newest first, filtered and paged.
#[utoipa::path(
    get,
    path = "/api/v1/dead-letters",
    operation_id = "list_dead_letters",
    tag = "dead-letters",
    params(ListQuery),
    responses((status = 200, description = "One page and the total", body = DeadLetterPageDoc), ReadErrors),
)]
pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let query = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map_err(|e| ApiError::field("query", format!("invalid query string: {e}")))?
        .into_inner();
    let mut seen = HashMap::new();
    let mut errors = Vec::new();
    for (name, value) in &query {
        if seen.insert(name.as_str(), value.as_str()).is_some() {
            errors.push((name.clone(), "appears more than once; give each filter once".to_string()));
        }
    }
    let mut limit = DEFAULT_PAGE;
    if let Some(raw) = seen.remove("limit") {
        match raw.parse::<i64>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => limit = n,
            _ => errors.push(("limit".into(), format!("must be a whole number from 1 to {MAX_PAGE}"))),
        }
    }
    let cursor = seen.remove("cursor");
    if cursor.is_some_and(|c| !notify_store::is_valid_cursor(c)) {
        errors.push(("cursor".into(), "is not a cursor from a previous page".into()));
    }
    let mut fields: Vec<(&str, &str)> = seen.into_iter().collect();
    fields.sort();
    let filter = parse_filter(fields, "").map_err(|e| errors.extend(e));
    if !errors.is_empty() {
        errors.sort();
        return Err(validation(errors));
    }
    let filter = filter.unwrap_or_default();
    let page = state.store()?.list_dead_letters(&filter, cursor, limit).await?;
    Ok(HttpResponse::Ok().json(page))
}

/// The dead letter, its status and the message as it died.
#[utoipa::path(
    get,
    path = "/api/v1/dead-letters/{id}",
    operation_id = "show_dead_letter",
    tag = "dead-letters",
    params(("id" = String, Path, description = "The dead letter's id")),
    responses(
        (status = 200, description = "The dead letter with its message", body = DeadLetterDetailDoc),
        (status = 404, description = "`not_found`: no such dead letter", body = ErrorBody),
        ReadErrors,
    ),
)]
pub async fn show(path: web::Path<String>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let raw = path.into_inner();
    let not_found = || ApiError::NotFound(format!("no dead letter `{raw}`"));
    let id = Uuid::parse_str(&raw).map_err(|_| not_found())?;
    let d = state.store()?.dead_letter(id).await?.ok_or_else(not_found)?;
    let mut body = serde_json::to_value(&d.letter).map_err(|e| ApiError::Unexpected(e.into()))?;
    // The envelope as JSON; an unparseable message as the text it was.
    body["message"] = serde_json::from_slice(&d.body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&d.body).into_owned()));
    body["status"] = d.status.into();
    body["status_at"] = serde_json::json!(d.status_at);
    body["headers"] = d.properties.get("headers").cloned().unwrap_or_default();
    Ok(HttpResponse::Ok().json(body))
}

/// The body of a replay or discard: `ids`, or `filter` with `limit`; `dry_run`.
#[derive(Debug, Deserialize, Validate)]
#[serde(deny_unknown_fields)]
pub struct SelectorRequest {
    ids: Option<Vec<Uuid>>,
    filter: Option<HashMap<String, serde_json::Value>>,
    limit: Option<i64>,
    dry_run: Option<bool>,
}

impl Fields for SelectorRequest {
    const FIELDS: &'static [&'static str] = &["ids", "filter", "limit", "dry_run"];
}

impl SelectorRequest {
    fn selector(self) -> Result<Selector, ApiError> {
        let mut errors: Vec<(String, String)> = Vec::new();
        let selector = match (self.ids, self.filter) {
            (Some(ids), None) => {
                if ids.is_empty() || ids.len() > MAX_IDS {
                    errors.push(("ids".into(), format!("must list 1 to {MAX_IDS} dead-letter ids")));
                }
                if self.limit.is_some() {
                    errors.push(("limit".into(), "goes with filter, not with ids".into()));
                }
                Some(Selector::Ids(ids))
            }
            (None, Some(filter)) => {
                let limit = self.limit.unwrap_or(DEFAULT_ACTION_LIMIT);
                if !(1..=MAX_ACTION_LIMIT).contains(&limit) {
                    errors.push(("limit".into(), format!("must be from 1 to {MAX_ACTION_LIMIT}")));
                }
                let mut texts = Vec::new();
                for (name, value) in &filter {
                    match value.as_str() {
                        Some(s) => texts.push((name.as_str(), s)),
                        None => errors.push((format!("filter.{name}"), "must be a string".into())),
                    }
                }
                texts.sort();
                match parse_filter(texts, "filter.") {
                    Ok(filter) => Some(Selector::Filter { filter, limit }),
                    Err(e) => {
                        errors.extend(e);
                        None
                    }
                }
            }
            (Some(_), Some(_)) => {
                errors.push(("ids".into(), "give either ids or filter, not both".into()));
                None
            }
            (None, None) => {
                errors.push(("ids".into(), "give ids, or a filter (with a limit)".into()));
                None
            }
        };
        match selector {
            Some(s) if errors.is_empty() => Ok(s),
            _ => {
                errors.sort();
                Err(validation(errors))
            }
        }
    }
}

fn actor(req: &HttpRequest) -> String {
    req.extensions().get::<Producer>().map(|p| p.0.clone()).unwrap_or_else(|| Producer::anonymous().0)
}

async fn selected(req: &HttpRequest, payload: web::Payload, state: &AppState) -> Result<(Selector, bool), ApiError> {
    let parsed: Parsed<SelectorRequest> = json_body(req, payload, state.body_limits).await?;
    let dry_run = parsed.body.dry_run.unwrap_or(false);
    Ok((parsed.body.selector()?, dry_run))
}

/// Replays dead letters into their channel queues as fresh first attempts (published with
/// confirms before they stop being dead letters; each at most once at a time).
#[utoipa::path(
    post,
    path = "/api/v1/dead-letters/replay",
    operation_id = "replay_dead_letters",
    tag = "dead-letters",
    request_body = SelectorDoc,
    responses((status = 200, description = "What was replayed, refused, failed or not found", body = ReplayedDoc), AcceptErrors),
)]
pub async fn replay(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    admin: web::Data<DeadLetterAdmin>,
) -> Result<HttpResponse, ApiError> {
    let (selector, dry_run) = selected(&req, payload, &state).await?;
    let done = admin.replay(&selector, dry_run, &actor(&req)).await?;
    Ok(HttpResponse::Ok().json(done.to_json("replayed")))
}

/// Discards dead letters for good (status `discarded`).
#[utoipa::path(
    post,
    path = "/api/v1/dead-letters/discard",
    operation_id = "discard_dead_letters",
    tag = "dead-letters",
    request_body = SelectorDoc,
    responses((status = 200, description = "What was discarded or not found", body = DiscardedDoc), AcceptErrors),
)]
pub async fn discard(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    admin: web::Data<DeadLetterAdmin>,
) -> Result<HttpResponse, ApiError> {
    let (selector, dry_run) = selected(&req, payload, &state).await?;
    let done = admin.discard(&selector, dry_run, &actor(&req)).await?;
    Ok(HttpResponse::Ok().json(done.to_json("discarded")))
}
