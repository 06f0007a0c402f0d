//! `GET /metrics` of the API binary: the request counter matches the requests sent, by route
//! pattern, method and status; accepted notifications by channel; one publish timed per
//! acceptance; broker gauges; and no request data in any label. The binary runs as a child
//! process, so the counters are this test's alone.

mod support;

use std::collections::{BTreeMap, HashMap};
use support::SpawnedApi;

/// `name{labels}` → value of every sample in a Prometheus text exposition.
fn samples(text: &str) -> HashMap<(String, BTreeMap<String, String>), f64> {
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let labels = rest.strip_suffix('}').expect("labels end with }");
                let labels = labels
                    .split("\",")
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l.split_once("=\"").expect("label=\"value\"");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.insert((name, labels), value.parse().expect("a number"));
    }
    out
}

fn get(samples: &HashMap<(String, BTreeMap<String, String>), f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    samples.get(&(name.to_string(), labels)).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn the_request_counter_matches_the_requests_sent_by_route_and_status() {
    let api = SpawnedApi::start("api-metrics").await;
    let anonymous = reqwest::Client::new();
    let email = serde_json::json!({"to": "user@example.com", "subject": "metrics", "body": "b"});
    for _ in 0..7 {
        let r = api.client.post(api.url("/api/v1/notifications/email")).json(&email).send().await.unwrap();
        assert_eq!(r.status(), 202);
    }
    for _ in 0..3 {
        let r = api
            .client
            .post(api.url("/api/v1/notifications/email"))
            .json(&serde_json::json!({"to": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422);
    }
    for _ in 0..2 {
        let r = anonymous.post(api.url("/api/v1/notifications/email")).json(&email).send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
    let event = serde_json::json!({"event": "password.reset", "user_target": "u-1", "payload": {"email": "a@example.com", "reset_link": "https://example.com/r"}});
    for _ in 0..2 {
        let r = api.client.post(api.url("/api/v1/events")).json(&event).send().await.unwrap();
        assert_eq!(r.status(), 202);
    }
    let in_app = serde_json::json!({"user": "secret-user-0", "title": "t", "body": "b"});
    let r = api.client.post(api.url("/api/v1/notifications/in-app")).json(&in_app).send().await.unwrap();
    assert_eq!(r.status(), 202);
    // User names in paths must not become labels.
    for n in 0..4 {
        let r = api.client.get(api.url(&format!("/api/v1/users/secret-user-{n}/notifications"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = api.client.get(api.url("/no/such/secret-path")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = api.client.get(api.url("/api/v1/notifications/email")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    for _ in 0..3 {
        assert_eq!(anonymous.get(api.url("/health")).send().await.unwrap().status(), 200);
    }

    // Open like /health.
    let res = anonymous.get(api.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = res.text().await.unwrap();
    api.stop().await;
    let s = samples(&text);
    let requests = |route: &str, method: &str, status: &str| {
        get(&s, "notify_api_requests_total", &[("method", method), ("route", route), ("status", status)])
    };
    let email_route = "/api/v1/notifications/email";
    let counted = [
        (email_route, "POST", "202", requests(email_route, "POST", "202")),
        (email_route, "POST", "422", requests(email_route, "POST", "422")),
        (email_route, "POST", "401", requests(email_route, "POST", "401")),
        (email_route, "GET", "405", requests(email_route, "GET", "405")),
        ("/api/v1/events", "POST", "202", requests("/api/v1/events", "POST", "202")),
        ("/api/v1/notifications/in-app", "POST", "202", requests("/api/v1/notifications/in-app", "POST", "202")),
        (
            "/api/v1/users/{user}/notifications",
            "GET",
            "200",
            requests("/api/v1/users/{user}/notifications", "GET", "200"),
        ),
        ("unmatched", "GET", "404", requests("unmatched", "GET", "404")),
        ("/health", "GET", "200", requests("/health", "GET", "200")),
    ];
    for (route, method, status, n) in counted {
        println!("notify_api_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}");
    }
    let sent = [7.0, 3.0, 2.0, 1.0, 2.0, 1.0, 4.0, 1.0, 3.0];
    assert_eq!(counted.map(|c| c.3), sent, "counted vs sent, in the order printed above\n{text}");

    let duration_count = |route: &str| get(&s, "notify_api_request_duration_seconds_count", &[("route", route)]);
    assert_eq!(duration_count(email_route), 13.0, "every request to the route is timed");
    assert_eq!(get(&s, "notify_api_accepted_total", &[("channel", "email")]), 7.0);
    assert_eq!(get(&s, "notify_api_accepted_total", &[("channel", "event")]), 2.0);
    assert_eq!(get(&s, "notify_api_accepted_total", &[("channel", "in_app")]), 1.0);
    assert_eq!(get(&s, "notify_api_publish_duration_seconds_count", &[]), 10.0, "one publish per 202");
    assert_eq!(get(&s, "notify_api_broker_up", &[]), 1.0);
    assert_eq!(get(&s, "notify_api_broker_blocked", &[]), 0.0);
    assert_eq!(get(&s, "notify_api_database_up", &[]), 1.0);
    assert!(
        get(&s, "notify_api_publish_duration_seconds_bucket", &[("le", "+Inf")]) == 10.0,
        "a real histogram with buckets\n{text}"
    );
    for secret in ["secret-user", "secret-path", "user@example.com", support::API_KEY] {
        assert!(!text.contains(secret), "request data `{secret}` in the metrics:\n{text}");
    }
}
