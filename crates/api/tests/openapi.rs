//! The OpenAPI document: it covers exactly the routes the router serves (each path and
//! method), it is valid OpenAPI 3.1, and the served one is the committed `openapi.json`.
//!
//! After changing a route or a body type, regenerate the committed file:
//! `UPDATE_OPENAPI=1 cargo test -p notify-api --test openapi`.

mod support;

use actix_web::{http::Method, test as actix_test, web, App, HttpRequest, HttpResponse};
use std::collections::BTreeSet;
use support::SpawnedApi;
use utoipa::OpenApi;

/// The route patterns registered in the app's router, read from its resource map (what
/// `HttpRequest::match_pattern` matches against). actix-web has no public iterator over it, so
/// the patterns are read from its `Debug` form; the test fails if that yields nothing.
async fn routed_patterns() -> Vec<String> {
    let app = actix_test::init_service(App::new().configure(notify_api::routes::configure).default_service(web::to(
        |req: HttpRequest| async move { HttpResponse::Ok().body(format!("{:?}", req.resource_map())) },
    )))
    .await;
    let dump =
        actix_test::call_and_read_body(&app, actix_test::TestRequest::get().uri("/no/such/route/at/all").to_request())
            .await;
    let dump = String::from_utf8(dump.to_vec()).unwrap();
    let mut patterns = Vec::new();
    for (i, _) in dump.match_indices("Single(\"") {
        let rest = &dump[i + "Single(\"".len()..];
        let pattern = &rest[..rest.find('"').expect("a closing quote")];
        // The root node's pattern is "".
        if !pattern.is_empty() && !patterns.iter().any(|p| p == pattern) {
            patterns.push(pattern.to_string());
        }
    }
    assert!(
        patterns.iter().any(|p| p == "/health") && patterns.len() >= 10,
        "router walk found {patterns:?} in\n{dump}"
    );
    patterns
}

#[actix_web::test]
async fn every_route_of_the_router_is_in_the_spec_and_nothing_else() {
    let app = actix_test::init_service(App::new().configure(notify_api::routes::configure)).await;
    let mut routed = BTreeSet::new();
    for pattern in routed_patterns().await {
        // Every resource serves one method and answers any other with 405 + `Allow` naming it:
        // ask with a method no route takes.
        let path =
            pattern.split('/').map(|seg| if seg.starts_with('{') { "x" } else { seg }).collect::<Vec<_>>().join("/");
        let res = actix_test::call_service(
            &app,
            actix_test::TestRequest::default().method(Method::PATCH).uri(&path).to_request(),
        )
        .await;
        assert_eq!(res.status(), 405, "PATCH {path} (pattern {pattern})");
        let allow = res.headers().get("allow").expect("405 names the allowed method").to_str().unwrap();
        routed.insert((pattern.clone(), allow.to_ascii_lowercase()));
    }
    let spec = serde_json::to_value(notify_api::openapi::ApiDoc::openapi()).unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in ["get", "put", "post", "delete", "options", "head", "patch", "trace"] {
            if item.get(method).is_some() {
                documented.insert((path.clone(), method.to_string()));
            }
        }
    }
    let missing: Vec<_> = routed.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&routed).collect();
    assert!(
        missing.is_empty(),
        "routes served but not in the OpenAPI document (annotate the handler with #[utoipa::path] and list it \
         in ApiDoc, crates/api/src/openapi.rs): {missing:?}"
    );
    assert!(stale.is_empty(), "operations in the OpenAPI document that no route serves: {stale:?}");
    println!("{} routes of the router, each in the spec: {routed:?}", routed.len());
}

#[tokio::test]
async fn the_served_spec_is_the_committed_file() {
    let api = SpawnedApi::start("openapi-served").await;
    // Open like /health: no key.
    let res = reqwest::get(api.url("/openapi.json")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    let served = res.text().await.unwrap();
    api.stop().await;

    let path = support::committed_spec_path();
    if std::env::var("UPDATE_OPENAPI").as_deref() == Ok("1") {
        std::fs::write(&path, &served).unwrap();
        println!("wrote {}", path.display());
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != served {
        let line = committed.lines().zip(served.lines()).position(|(a, b)| a != b).map_or_else(
            || {
                format!(
                    "lengths differ: {} lines committed, {} served",
                    committed.lines().count(),
                    served.lines().count()
                )
            },
            |n| {
                format!(
                    "first difference at line {}:\n  committed: {}\n  served:    {}",
                    n + 1,
                    committed.lines().nth(n).unwrap(),
                    served.lines().nth(n).unwrap()
                )
            },
        );
        panic!(
            "the served /openapi.json differs from the committed {} ({line}).\nIf the change is intended, \
             regenerate it: UPDATE_OPENAPI=1 cargo test -p notify-api --test openapi",
            path.display()
        );
    }
}

#[test]
fn the_spec_is_valid_openapi_3_1() {
    let spec = notify_api::openapi::json();
    let value: serde_json::Value = serde_json::from_str(&spec).unwrap();
    assert_eq!(value["openapi"], "3.1.0");
    assert_eq!(value["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    let file = std::env::temp_dir().join(format!("notify-openapi-{}.json", std::process::id()));
    std::fs::write(&file, &spec).unwrap();
    let venv = support::contract_tools();
    let out = std::process::Command::new(venv.join("bin/openapi-spec-validator"))
        .args(["--schema", "3.1.0"])
        .arg(&file)
        .output()
        .expect("openapi-spec-validator runs");
    let _ = std::fs::remove_file(&file);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("openapi-spec-validator: {}", text.trim());
    assert!(out.status.success() && text.contains("OK"), "openapi-spec-validator refused the spec:\n{text}");
}
