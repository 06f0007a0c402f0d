//! What the API says about itself: Prometheus metrics, its OpenAPI description and a browsable
//! reference of it. All open, like `/health`.

use super::AppState;
use crate::error::{ApiError, Body as ErrorBody};
use actix_web::{http::header, web, HttpResponse};
use std::sync::{Arc, OnceLock};

/// Metrics in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security(()),
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", content_type = "text/plain", body = String)),
)]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    crate::metrics::broker_state(state.publisher.state());
    if let Some(store) = &state.store {
        let ping = tokio::time::timeout(std::time::Duration::from_secs(2), store.ping()).await;
        crate::metrics::database_up(matches!(ping, Ok(Ok(()))));
    }
    HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(notify_types::metrics::render())
}

/// This API's OpenAPI 3.1 description.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object)),
)]
pub async fn openapi_json() -> HttpResponse {
    static JSON: OnceLock<String> = OnceLock::new();
    HttpResponse::Ok().content_type("application/json").body(JSON.get_or_init(crate::openapi::json).as_str())
}

/// The API reference (Swagger UI), served by the API itself: it works without internet access.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "operations",
    security(()),
    responses((status = 200, description = "The Swagger UI page", content_type = "text/html", body = String)),
)]
pub async fn docs() -> HttpResponse {
    static PAGE: OnceLock<Vec<u8>> = OnceLock::new();
    let page = PAGE.get_or_init(|| {
        let index = swagger_file("index.html").expect("Swagger UI has an index.html").bytes;
        // The page's assets are relative (`./swagger-ui.css`); the base makes them resolve under
        // /docs/ whatever prefix a proxy puts in front.
        String::from_utf8_lossy(&index).replacen("<head>", "<head>\n    <base href=\"docs/\">", 1).into_bytes()
    });
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(page.as_slice())
}

/// A file of the Swagger UI page (scripts, styles, icons).
#[utoipa::path(
    get,
    path = "/docs/{file}",
    tag = "operations",
    security(()),
    params(("file" = String, Path, description = "A file of the Swagger UI distribution, e.g. `swagger-ui.css`")),
    responses(
        (status = 200, description = "The file", content_type = "application/octet-stream", body = String),
        (status = 404, description = "`not_found`: no such file", body = ErrorBody),
    ),
)]
pub async fn docs_asset(file: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let file = file.into_inner();
    // The index is /docs (with its base); here it would load its assets from the wrong place.
    let asset = (file != "index.html").then(|| swagger_file(&file)).flatten();
    let asset = asset.ok_or_else(|| ApiError::NotFound(format!("no file `{file}` in the API reference")))?;
    Ok(HttpResponse::Ok()
        .content_type(asset.content_type)
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"))
        .body(asset.bytes.into_owned()))
}

fn swagger_file(path: &str) -> Option<utoipa_swagger_ui::SwaggerFile<'static>> {
    static CONFIG: OnceLock<Arc<utoipa_swagger_ui::Config<'static>>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        // Relative to the page's base (/docs/), so it works behind a path prefix too. No
        // validator badge: Swagger UI would fetch it from validator.swagger.io.
        Arc::new(
            utoipa_swagger_ui::Config::new(["../openapi.json"])
                .validator_url("none")
                .display_operation_id(true)
                .try_it_out_enabled(false),
        )
    });
    // `serve` formats the initializer with the config; the other files are static bytes.
    utoipa_swagger_ui::serve(path, config.clone()).ok().flatten()
}
