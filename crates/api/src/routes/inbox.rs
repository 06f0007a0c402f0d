//! The in-app inbox of a user: newest first, cursor pagination, unread filter and count.

use super::AppState;
use crate::error::ApiError;
use crate::error::Body as ErrorBody;
use crate::openapi::ReadErrors;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only unread items.
    #[serde(default)]
    unread: Option<bool>,
    /// Items per page.
    #[serde(default)]
    #[param(minimum = 1, maximum = 100, default = 20)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[serde(default)]
    cursor: Option<String>,
}

/// The inbox's owner, as in the item's `user`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // documents the path; the handlers read it as a string
pub struct UserPath {
    /// The user (no NUL character).
    #[param(min_length = 1)]
    user: String,
}

/// `POST …/{id}/read`.
#[derive(Serialize, ToSchema)]
pub struct MarkedRead {
    /// The id the request named (item or notification id).
    pub id: Uuid,
    pub read: bool,
}

/// `POST …/read-all`.
#[derive(Serialize, ToSchema)]
pub struct AllRead {
    /// Items that were unread.
    pub updated: u64,
    #[schema(example = 0)]
    pub unread_count: i64,
}

/// A user's inbox, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/users/{user}/notifications",
    tag = "inbox",
    params(UserPath, ListQuery),
    responses((status = 200, description = "One page of items and the user's unread count", body = notify_store::InboxPage), ReadErrors),
)]
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

/// Mark one item read, by the item's `id` or its `notification_id`.
#[utoipa::path(
    post,
    path = "/api/v1/users/{user}/notifications/{id}/read",
    tag = "inbox",
    params(UserPath, ("id" = String, Path, description = "The item's `id` or its `notification_id`")),
    responses(
        (status = 200, description = "Read", body = MarkedRead),
        (status = 404, description = "`not_found`: the user has no such item", body = ErrorBody),
        ReadErrors,
    ),
)]
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
    Ok(HttpResponse::Ok().json(MarkedRead { id, read: true }))
}

/// Mark every item of the user read.
#[utoipa::path(
    post,
    path = "/api/v1/users/{user}/notifications/read-all",
    tag = "inbox",
    params(UserPath),
    responses((status = 200, description = "All read", body = AllRead), ReadErrors),
)]
pub async fn mark_all_read(user: web::Path<String>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    check_user(&user)?;
    let updated = state.store()?.mark_all_read(&user).await?;
    Ok(HttpResponse::Ok().json(AllRead { updated, unread_count: 0 }))
}

/// Postgres cannot compare text holding a NUL (it answers an error, not "no rows"), and no user
/// can have one: the API refuses NUL in every body.
fn check_user(user: &str) -> Result<(), ApiError> {
    if user.contains('\0') {
        return Err(ApiError::field("user", "must not contain NUL characters (\\u0000)"));
    }
    Ok(())
}
