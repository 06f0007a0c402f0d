//! API keys: every route but /health, /ready, /metrics, /openapi.json and /docs needs
//! `Authorization: Bearer <key>`.

use crate::support;

use serde_json::Value;
use support::{email, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_key_get_401_and_publish_nothing() {
    let h = Harness::start("auth").await;
    let bare = reqwest::Client::new();
    let url = format!("{}/api/v1/notifications/email", h.api.base);
    let body = email("a@example.com", "s", "b");
    let cases: [(&str, Option<String>); 5] = [
        ("no header", None),
        ("wrong key", Some("Bearer not-a-key".into())),
        ("a prefix of a key", Some("Bearer test-key-one".into())),
        ("basic auth", Some("Basic dGVzdDp0ZXN0".into())),
        ("key without scheme", Some(support::API_KEY.into())),
    ];
    for (name, header) in cases {
        let mut req = bare.post(&url).json(&body);
        if let Some(h) = header {
            req = req.header("authorization", h);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 401, "{name}");
        assert_eq!(res.headers()["www-authenticate"], "Bearer", "{name}");
        let err: Value = res.json().await.unwrap();
        assert_eq!(err["error"]["code"], "unauthorized", "{name}");
        assert!(!err.to_string().contains("test-key"), "no key material in errors: {err}");
    }
    // Other routes are protected too; /health, /ready, /metrics, /openapi.json and /docs are open.
    assert_eq!(bare.get(format!("{}/api/v1/users/u/notifications", h.api.base)).send().await.unwrap().status(), 401);
    assert_eq!(bare.post(format!("{}/events", h.api.base)).send().await.unwrap().status(), 401);
    assert_eq!(bare.get(format!("{}/health", h.api.base)).send().await.unwrap().status(), 200);
    assert_eq!(bare.get(format!("{}/ready", h.api.base)).send().await.unwrap().status(), 200);
    for open in ["/metrics", "/openapi.json", "/docs", "/docs/swagger-ui.css"] {
        assert_eq!(bare.get(format!("{}{open}", h.api.base)).send().await.unwrap().status(), 200, "{open}");
    }
    // Open by exact path only: a look-alike path still needs a key.
    assert_eq!(bare.get(format!("{}/docsx", h.api.base)).send().await.unwrap().status(), 401);
    assert_eq!(h.count(&h.email_queue()).await, 0, "nothing published");

    // Both configured keys work.
    for key in support::API_KEYS.split(',') {
        let res = bare.post(&url).bearer_auth(key).json(&body).send().await.unwrap();
        assert_eq!(res.status(), 202);
    }
    notify_testkit::rabbit::wait_for_count(&h.amqp, &h.email_queue(), 2, std::time::Duration::from_secs(5)).await;
    h.cleanup().await;
}
