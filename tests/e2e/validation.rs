//! Bad input gets the right 4xx with field errors, in the one JSON error shape, and publishes
//! nothing.

use crate::support;

use serde_json::Value;
use support::Harness;

const PATH: &str = "/api/v1/notifications/email";

struct Case {
    name: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    /// For 422: a field that must be named in `error.fields`.
    field: Option<&'static str>,
}

fn json_case(name: &'static str, body: Value, status: u16, field: Option<&'static str>) -> Case {
    Case { name, content_type: Some("application/json"), body: body.to_string().into_bytes(), status, field }
}

fn raw_case(name: &'static str, content_type: Option<&'static str>, body: &str, status: u16) -> Case {
    Case { name, content_type, body: body.as_bytes().to_vec(), status, field: None }
}

fn ok() -> Value {
    serde_json::json!({"to": "a@example.com", "subject": "Hello", "body": "Body"})
}

fn with(key: &str, value: Value) -> Value {
    let mut v = ok();
    v[key] = value;
    v
}

fn without(key: &str) -> Value {
    let mut v = ok();
    v.as_object_mut().unwrap().remove(key);
    v
}

fn cases() -> Vec<Case> {
    use serde_json::json;
    vec![
        // 400: not JSON
        raw_case("truncated json", Some("application/json"), r#"{"to": "a@example.com""#, 400),
        raw_case("trailing comma", Some("application/json"), r#"{"to": "a@example.com",}"#, 400),
        raw_case("not json at all", Some("application/json"), "to=a@example.com", 400),
        raw_case("empty body", Some("application/json"), "", 400),
        raw_case("single quotes", Some("application/json"), "{'to': 'a@example.com'}", 400),
        raw_case("invalid utf-8 escape", Some("application/json"), r#"{"to": "\ud800"}"#, 400),
        // 415: wrong content type
        raw_case("text/plain", Some("text/plain"), &ok().to_string(), 415),
        raw_case("form encoded", Some("application/x-www-form-urlencoded"), "to=a%40example.com", 415),
        raw_case("no content type", None, &ok().to_string(), 415),
        raw_case("xml", Some("application/xml"), "<to>a@example.com</to>", 415),
        // 413: too large
        raw_case(
            "body over the limit",
            Some("application/json"),
            &with("body", "x".repeat(300 * 1024).into()).to_string(),
            413,
        ),
        // 422: missing fields
        json_case("missing to", without("to"), 422, Some("to")),
        json_case("missing subject", without("subject"), 422, Some("subject")),
        json_case("missing body", without("body"), 422, Some("body")),
        json_case("empty object", json!({}), 422, Some("to")),
        json_case("null to", with("to", Value::Null), 422, Some("to")),
        // 422: empty / blank
        json_case("empty to", with("to", "".into()), 422, Some("to")),
        json_case("empty subject", with("subject", "".into()), 422, Some("subject")),
        json_case("blank subject", with("subject", "   ".into()), 422, Some("subject")),
        json_case("empty body", with("body", "".into()), 422, Some("body")),
        json_case("blank html", with("html", " ".into()), 422, Some("html")),
        // 422: bad addresses
        json_case("address without @", with("to", "not-an-address".into()), 422, Some("to")),
        json_case("address without domain", with("to", "a@".into()), 422, Some("to")),
        json_case("address with spaces", with("to", "a b@example.com".into()), 422, Some("to")),
        json_case("two addresses", with("to", "a@example.com, b@example.com".into()), 422, Some("to")),
        json_case("overlong address", with("to", format!("{}@example.com", "a".repeat(250)).into()), 422, Some("to")),
        // 422: header injection
        json_case("CRLF in subject", with("subject", "Hi\r\nBcc: victim@example.com".into()), 422, Some("subject")),
        json_case("LF in subject", with("subject", "Hi\nBcc: victim@example.com".into()), 422, Some("subject")),
        json_case("CR in subject", with("subject", "Hi\rX: y".into()), 422, Some("subject")),
        json_case("CRLF in to", with("to", "a@example.com\r\nBcc: victim@example.com".into()), 422, Some("to")),
        // 422: oversized fields
        json_case("subject over 998 chars", with("subject", "s".repeat(999).into()), 422, Some("subject")),
        // 422: wrong types
        json_case("to is a number", with("to", 42.into()), 422, Some("to")),
        json_case("to is a list", with("to", json!(["a@example.com"])), 422, Some("to")),
        json_case("subject is an object", with("subject", json!({"text": "hi"})), 422, Some("subject")),
        json_case("body is a bool", with("body", true.into()), 422, Some("body")),
        json_case("html is a number", with("html", 1.into()), 422, Some("html")),
        json_case("unknown field", with("cc", "b@example.com".into()), 422, None),
        json_case("top-level array", json!([ok()]), 422, None),
        json_case("top-level string", json!("hello"), 422, None),
        json_case("top-level null", Value::Null, 422, None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_the_right_4xx_and_publish_nothing() {
    let h = Harness::start("validation").await;
    let cases = cases();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for case in &cases {
        let mut req = h.api.client.post(format!("{}{PATH}", h.api.base)).body(case.body.clone());
        if let Some(ct) = case.content_type {
            req = req.header("Content-Type", ct);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        let code_ok = body["error"]["code"].is_string() && body["error"]["message"].is_string();
        let field_ok = match case.field {
            None => true,
            Some(f) => body["error"]["fields"]
                .as_array()
                .is_some_and(|fs| fs.iter().any(|x| x["field"] == f && x["message"].is_string())),
        };
        if status != case.status || !code_ok || !field_ok {
            failures
                .push(format!("{}: expected {} (field {:?}), got {status} {body}", case.name, case.status, case.field));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases wrong:\n{}", failures.len(), cases.len(), failures.join("\n"));

    // No worker runs here, so anything published would still be in the queue.
    assert_eq!(h.count(&h.email_queue()).await, 0, "rejected requests published nothing");
    // ...and the count does see a valid one.
    let res = h.api.post_json(PATH, &ok()).await;
    assert_eq!(res.status(), 202);
    notify_testkit::rabbit::wait_for_count(&h.amqp, &h.email_queue(), 1, std::time::Duration::from_secs(5)).await;
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_fields_are_all_listed_at_once() {
    let h = Harness::start("all-fields").await;
    let res = h.api.post_json(PATH, &serde_json::json!({})).await;
    assert_eq!(res.status(), 422);
    let body: Value = res.json().await.unwrap();
    let fields: Vec<&str> =
        body["error"]["fields"].as_array().unwrap().iter().map(|f| f["field"].as_str().unwrap()).collect();
    assert_eq!(fields, vec!["body", "subject", "to"]);
    assert_eq!(body["error"]["code"], "validation_failed");
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_answer_json_errors() {
    let h = Harness::start("routes").await;
    let res = h.api.client.get(format!("{}{PATH}", h.api.base)).send().await.unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(res.json::<Value>().await.unwrap()["error"]["code"], "method_not_allowed");
    let res = h.api.client.get(format!("{}/api/v1/nope", h.api.base)).send().await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.json::<Value>().await.unwrap()["error"]["code"], "not_found");
    let res = h.api.client.get(format!("{}/health", h.api.base)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = h.api.client.get(format!("{}/ready", h.api.base)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["checks"]["broker"], "connected");
    h.cleanup().await;
}
