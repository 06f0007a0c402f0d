//! The OpenAPI 3.1 description of the API, generated from the handlers' `#[utoipa::path]`
//! annotations and the request/response types' `ToSchema` derives; served at
//! `GET /openapi.json` and browsable at `GET /docs` (Swagger UI, served from the binary).
//!
//! **Adding a route** (three steps; tests catch each one forgotten):
//! 1. annotate its handler with `#[utoipa::path(get|post, path = "…", responses(…), tag = "…")]`
//!    (see `routes::inbox::list` for a GET with parameters, `routes::notifications::send_email`
//!    for a POST with a body; open routes add `security(())`); the sets [`AcceptErrors`] and
//!    [`ReadErrors`] cover the usual error statuses, `body = ErrorBody` documents another;
//! 2. list the handler in `paths(…)` of [`ApiDoc`] below (and new body types in `components`
//!    when they are not reached through a handler);
//! 3. regenerate the committed file: `UPDATE_OPENAPI=1 cargo test -p notify-api --test openapi`.
//!
//! `tests/openapi.rs` (crate notify-api) walks the actix router and fails for a route missing
//! from the spec, and fails when the served spec differs from the committed `openapi.json`.

use crate::error::{Body as ErrorBody, ErrorCode, FieldError, Inner as ErrorDetail};
use crate::routes;
use std::collections::BTreeMap;
use utoipa::openapi::{
    header::HeaderBuilder,
    security::{Http, HttpAuthScheme, SecurityScheme},
    ContentBuilder, Ref, RefOr, Response, ResponseBuilder, Type,
};
use utoipa::{IntoResponses, Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "notify",
        description = "A notification service: POST a notification or an event, get a 202 once \
RabbitMQ has confirmed it; workers deliver it by e-mail, webhook and an in-app inbox.\n\n\
Every route except `/health`, `/ready`, `/metrics`, `/openapi.json` and `/docs` needs \
`Authorization: Bearer <key>`. Errors always have the shape `{\"error\": {\"code\", \"message\", \"fields\"?}}`.",
        license(name = "MIT", identifier = "MIT"),
    ),
    paths(
        routes::notifications::send_email,
        routes::notifications::send_webhook,
        routes::notifications::send_in_app,
        routes::notifications::status,
        routes::events::post_event,
        routes::events::post_event_legacy,
        routes::inbox::list,
        routes::inbox::mark_read,
        routes::inbox::mark_all_read,
        routes::dead_letters::list,
        routes::dead_letters::show,
        routes::dead_letters::replay,
        routes::dead_letters::discard,
        routes::health::health,
        routes::health::ready,
        routes::meta::metrics,
        routes::meta::openapi_json,
        routes::meta::docs,
        routes::meta::docs_asset,
    ),
    // Schemas reached only through the hand-written responses below.
    components(schemas(ErrorBody, ErrorDetail, ErrorCode, FieldError, routes::notifications::Accepted, routes::events::EventAccepted)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "notifications", description = "Direct notifications to one channel, and their delivery status"),
        (name = "events", description = "Business events, routed to channels by the routes file"),
        (name = "inbox", description = "A user's in-app inbox"),
        (name = "dead-letters", description = "What could not be delivered: list, show, replay, discard"),
        (name = "operations", description = "Health, readiness, metrics and this description"),
    ),
)]
pub struct ApiDoc;

/// The spec as served: pretty JSON with a trailing newline (the committed file's form).
pub fn json() -> String {
    let mut text = ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

/// The `bearer` security scheme every protected operation refers to.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.description = Some("One of the keys in `API_KEYS` (the scheme name is case-insensitive).".into());
        components.add_security_scheme("bearer", SecurityScheme::Http(http));
    }
}

/// A response with the error body.
fn error(description: &str) -> ResponseBuilder {
    ResponseBuilder::new()
        .description(description)
        .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("Error"))).build())
}

fn with_header(response: ResponseBuilder, name: &str, description: &str, kind: Type) -> ResponseBuilder {
    let schema = utoipa::openapi::ObjectBuilder::new().schema_type(kind).build();
    response.header(name, HeaderBuilder::new().schema(Some(schema)).description(Some(description)).build())
}

fn unauthorized() -> Response {
    with_header(
        error("`unauthorized`: no `Authorization: Bearer <key>`, or a key not in `API_KEYS`"),
        "WWW-Authenticate",
        "`Bearer`",
        Type::String,
    )
    .build()
}

fn unavailable(what: &str) -> Response {
    with_header(
        error(&format!("`service_unavailable`: {what}; nothing was done, retry after `Retry-After` seconds")),
        "Retry-After",
        "Seconds to wait before retrying",
        Type::Integer,
    )
    .build()
}

fn internal() -> Response {
    error("`internal_error`: a bug (e.g. a message the broker could not route); logged in full").build()
}

fn map(entries: Vec<(u16, Response)>) -> BTreeMap<String, RefOr<Response>> {
    entries.into_iter().map(|(status, r)| (status.to_string(), RefOr::T(r))).collect()
}

/// The errors of a POST that publishes (notifications, events).
pub struct AcceptErrors;

impl IntoResponses for AcceptErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        map(vec![
            (400, error("`malformed_json`: the body is not JSON").build()),
            (401, unauthorized()),
            (408, error("`request_timeout`: the body did not arrive within `API_REQUEST_TIMEOUT`").build()),
            (409, error("`conflict`: a request with the same `Idempotency-Key` is still in progress").build()),
            (413, error("`payload_too_large`: the body is over `API_MAX_BODY_BYTES`").build()),
            (
                415,
                error("`unsupported_media_type`: `Content-Type` is not `application/json`, or the body has a `Content-Encoding`")
                    .build(),
            ),
            (
                422,
                error("`validation_failed`: invalid, missing, unknown, duplicated or wrongly typed fields, each in `fields`; or an `Idempotency-Key` reused with another request")
                    .build(),
            ),
            (500, internal()),
            (503, unavailable("the broker is down, blocked or did not confirm in time, or (with `Idempotency-Key`) the database is unavailable")),
        ])
    }
}

/// The errors of a route that reads or writes PostgreSQL (status, inbox).
pub struct ReadErrors;

impl IntoResponses for ReadErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        map(vec![
            (401, unauthorized()),
            (422, error("`validation_failed`: an invalid parameter, named in `fields`").build()),
            (500, internal()),
            (503, unavailable("the database is unavailable")),
        ])
    }
}

/// The optional headers of every POST that publishes.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // documents the headers; the handlers read them from the request
pub struct AcceptHeaders {
    /// Same key + same request → the first 202 again, nothing published again; same key +
    /// another request → 422. Scoped to the API key's producer.
    #[param(
        rename = "Idempotency-Key",
        nullable = false,
        min_length = 1,
        max_length = 255,
        pattern = r"^[\x21-\x7E]+$"
    )]
    idempotency_key: Option<String>,
    /// The caller's request id (≤ 128 visible ASCII characters; else a new one is made): the
    /// `correlation_id` in both binaries' logs, returned as `X-Request-Id`.
    #[param(rename = "X-Request-Id", nullable = false)]
    x_request_id: Option<String>,
    /// The caller's W3C trace context: the message carries a child of it to the worker, whose
    /// delivery joins the trace. Invalid values are ignored (a new trace starts), as W3C asks.
    #[param(
        rename = "traceparent",
        nullable = false,
        example = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    )]
    traceparent: Option<String>,
}

fn accepted(schema: &str) -> BTreeMap<String, RefOr<Response>> {
    let header = |description: &str| {
        HeaderBuilder::new()
            .schema(Some(utoipa::openapi::ObjectBuilder::new().schema_type(Type::String).build()))
            .description(Some(description))
            .build()
    };
    let response = ResponseBuilder::new()
        .description("Accepted: RabbitMQ confirmed the persistent message")
        .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name(schema))).build())
        .header("X-Request-Id", header("The request id (`correlation_id`): the caller's `X-Request-Id` or a new one"))
        .header(
            "Idempotent-Replayed",
            header("`true` when this is the first answer to the same `Idempotency-Key` again"),
        )
        .build();
    map(vec![(202, response)])
}

/// The 202 of a direct notification.
pub struct AcceptedResponse;

impl IntoResponses for AcceptedResponse {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        accepted("Accepted")
    }
}

/// The 202 of an event.
pub struct EventAcceptedResponse;

impl IntoResponses for EventAcceptedResponse {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        accepted("EventAccepted")
    }
}
