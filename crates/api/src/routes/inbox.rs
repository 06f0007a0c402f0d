//! The in-app inbox of a user: newest first, cursor pagination, unread filter and count.

use super::AppState;
use crate::error::ApiError;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use uuid::Uuid;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    unread: Option<bool>,
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    cursor: Option<String>,
}

pub async fn list(
    user: web::Path<String>,
    query: Result<web::Query<ListQuery>, actix_web::Error>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    check_user(&user)?;
    let q = query.map_err(|e| ApiError::field("query", format!("invalid query: {e}")))?.into_inner();
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::field("limit", "must be between 1 and 100"));
    }
    if q.cursor.as_deref().is_some_and(|c| !notify_store::is_valid_cursor(c)) {
        return Err(ApiError::field("cursor", "is not a cursor from a previous page"));
    }
    let page = state.store()?.list_inbox(&user, q.unread.unwrap_or(false), q.cursor.as_deref(), limit).await?;
    Ok(HttpResponse::Ok().json(page))
}

pub async fn mark_read(
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (user, raw) = path.into_inner();
    check_user(&user)?;
    let not_found = || ApiError::NotFound(format!("user `{user}` has no notification `{raw}`"));
    let id = Uuid::parse_str(&raw).map_err(|_| not_found())?;
    if !state.store()?.mark_read(&user, id).await? {
        return Err(not_found());
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({"id": id, "read": true})))
}

pub async fn mark_all_read(user: web::Path<String>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    check_user(&user)?;
    let updated = state.store()?.mark_all_read(&user).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"updated": updated, "unread_count": 0})))
}

/// Postgres cannot compare text holding a NUL (it answers an error, not "no rows"), and no user
/// can have one: the API refuses NUL in every body.
fn check_user(user: &str) -> Result<(), ApiError> {
    if user.contains('\0') {
        return Err(ApiError::field("user", "must not contain NUL characters (\\u0000)"));
    }
    Ok(())
}
