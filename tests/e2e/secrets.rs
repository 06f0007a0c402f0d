//! No secret from the configuration appears in any log line or error body, whatever happens:
//! deliveries, retries, a broker crash, refused keys, bad settings. Logs of both binaries are
//! captured at debug level (this test binary installs the only subscriber).

use crate::support;

use notify_testkit::{private_broker::PrivateBroker, rabbit, smtp::Reply, smtp::SmtpServer, webhook::WebhookReceiver};
use serde_json::json;
use std::{collections::HashMap, time::Duration};
use support::{TestApi, TestWorker};

const AMQP_PASSWORD: &str = "amqp-pw-Q7x9Lr2";
const PG_PASSWORD: &str = "pg-pw-Vb83kZt";
const SMTP_PASSWORD: &str = "smtp-pw-Hn27cXa";
const API_KEY: &str = "api-key-Ke91mWq3";
const DIRECT_HOOK_SECRET: &str = "whsec_ZGlyZWN0LWhvb2stc2VjcmV0LTQ0Mjk=";
const ROUTE_HOOK_SECRET: &str = "whsec_cm91dGUtaG9vay1zZWNyZXQtNzcxMw==";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_or_error_bodies() {
    let logs = support::logs();
    let mut bodies: Vec<String> = Vec::new();

    let _turn = support::private_nodes_one_at_a_time().await;

    let broker = PrivateBroker::start().await.expect("private broker");
    broker.rabbitmqctl(&["add_user", "notify", AMQP_PASSWORD]).await.unwrap();
    broker.rabbitmqctl(&["set_permissions", "-p", "/", "notify", ".*", ".*", ".*"]).await.unwrap();
    let smtp = SmtpServer::start().await;
    smtp.script(vec![Reply::transient()]);
    let hook = WebhookReceiver::start().await;
    hook.script(vec![(500, None)]);

    let prefix = rabbit::unique_prefix("secrets");
    let amqp_url = format!("amqp://notify:{AMQP_PASSWORD}@127.0.0.1:{}/%2f", broker.amqp_port());
    let smtp_url = format!("smtp://mailer:{SMTP_PASSWORD}@{}", smtp.addr());
    let mut s: HashMap<String, String> = support::settings(&prefix, &amqp_url, &smtp_url);
    s.insert("DATABASE_URL".into(), format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:5432/test"));
    s.insert("API_KEYS".into(), API_KEY.into());
    s.insert("WEBHOOK_SECRET".into(), DIRECT_HOOK_SECRET.into());
    let routes = support::routes_file(&prefix, &hook.url("/orders"));
    let text = std::fs::read_to_string(&routes).unwrap().replace(support::WEBHOOK_SECRET, ROUTE_HOOK_SECRET);
    std::fs::write(&routes, text).unwrap();
    s.insert("ROUTES_FILE".into(), routes.clone());

    let api = TestApi::start(&s).await.unwrap();
    let mut worker = TestWorker::start(&s).await.unwrap();
    let client = reqwest::Client::new();
    let post = |path: &str, key: &str, body: serde_json::Value| {
        client.post(format!("{}{path}", api.base)).bearer_auth(key).json(&body).send()
    };

    // Deliveries on every channel, each with a failure first (retries log their errors).
    let mail = post("/api/v1/notifications/email", API_KEY, support::email("a@example.com", "s", "b")).await.unwrap();
    assert_eq!(mail.status(), 202);
    let ev =
        post("/api/v1/events", API_KEY, json!({"event": "order.completed", "user_target": "u", "payload": {"n": 1}}));
    assert_eq!(ev.await.unwrap().status(), 202);
    let direct = post("/api/v1/notifications/webhook", API_KEY, json!({"url": hook.url("/direct"), "payload": {}}));
    assert_eq!(direct.await.unwrap().status(), 202);
    let inbox = post("/api/v1/notifications/in-app", API_KEY, json!({"user": "u", "title": "t", "body": "b"}));
    assert_eq!(inbox.await.unwrap().status(), 202);
    let reports = worker.next_reports(6, Duration::from_secs(30)).await;
    println!("settled: {:?}", reports.iter().map(|r| (r.channel, r.settled.clone())).collect::<Vec<_>>());
    assert_eq!(smtp.wait_for_mails(1, Duration::from_secs(30)).await.len(), 1);
    hook.wait_for_delivered(2, Duration::from_secs(30)).await;

    // Refused keys and bad requests.
    for key in ["wrong", &API_KEY[..5]] {
        let res = post("/api/v1/notifications/email", key, json!({})).await.unwrap();
        assert_eq!(res.status(), 401);
        bodies.push(res.text().await.unwrap());
    }
    let res = post(
        "/api/v1/notifications/webhook",
        API_KEY,
        json!({"url": format!("http://user:{AMQP_PASSWORD}@10.0.0.1/x"), "payload": {}}),
    );
    let res = res.await.unwrap();
    bodies.push(res.text().await.unwrap());

    // A broker crash: both binaries log connection errors while it is down.
    broker.kill().await.unwrap();
    let res = post("/api/v1/notifications/email", API_KEY, support::email("b@example.com", "s", "b")).await.unwrap();
    assert_eq!(res.status(), 503);
    bodies.push(res.text().await.unwrap());
    let ready = client.get(format!("{}/ready", api.base)).send().await.unwrap();
    bodies.push(ready.text().await.unwrap());
    broker.restart().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while client.get(format!("{}/ready", api.base)).send().await.unwrap().status() != 200 {
        assert!(std::time::Instant::now() < deadline, "API recovers");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Bad settings: the error messages name the key without the secret.
    for (key, value) in [
        ("RABBITMQ_URL", format!("http://notify:{AMQP_PASSWORD}@127.0.0.1/")),
        ("SMTP_URL", format!("ftp://mailer:{SMTP_PASSWORD}@127.0.0.1")),
    ] {
        let mut bad = s.clone();
        bad.insert(key.into(), value);
        let err = notify_worker::WorkerConfig::from_source(&bad).unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
        bodies.push(err);
    }
    let mut unreachable = s.clone();
    unreachable.insert("DATABASE_URL".into(), format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:1/test"));
    let store =
        notify_store::Store::connect_lazy(&unreachable["DATABASE_URL"], &unreachable["DATABASE_SCHEMA"], 1).unwrap();
    bodies.push(store.ping().await.unwrap_err().to_string());

    worker.stop().await.unwrap();
    api.stop().await;
    support::drop_schema(&support::settings(&prefix, "amqp://x/", "smtp://x")).await;
    let _ = std::fs::remove_file(routes);

    let text = logs.text();
    let lines = text.lines().count();
    let secrets = [AMQP_PASSWORD, PG_PASSWORD, SMTP_PASSWORD, API_KEY, DIRECT_HOOK_SECRET, ROUTE_HOOK_SECRET];
    // The base64 parts of the webhook secrets (the key material) must not leak either.
    let key_material: Vec<&str> = [DIRECT_HOOK_SECRET, ROUTE_HOOK_SECRET].iter().map(|s| &s[6..]).collect();
    let mut leaks = Vec::new();
    for secret in secrets.iter().chain(key_material.iter()) {
        for (n, line) in text.lines().enumerate() {
            if line.contains(secret) {
                leaks.push(format!("log line {n}: {line}"));
            }
        }
        for body in &bodies {
            if body.contains(secret) {
                leaks.push(format!("error text: {body}"));
            }
        }
    }
    println!(
        "scanned {lines} log lines and {} error texts for {} secret strings: {} leaks",
        bodies.len(),
        secrets.len() + key_material.len(),
        leaks.len()
    );
    assert!(lines > 100, "the logs were captured ({lines} lines)");
    assert!(text.contains("***"), "redacted URLs are logged");
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}
