//! What hurt a newcomer in the first hour (issue 14), each through the real API, broker,
//! Postgres and SMTP server: secrets in the inbox, reading by the 202's id, 422s that list
//! everything, 405s with `Allow`, a delivered status without an error, database errors that say
//! where and why.

use crate::support;

use notify_testkit::smtp::Reply;
use notify_worker::outcome::Settled;
use serde_json::{json, Value};
use std::{collections::BTreeSet, time::Duration};
use support::{email, Harness};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reset_inbox_item_holds_no_token_and_is_read_by_the_202_id() {
    let h = Harness::start("inbox-first-hour").await;
    let mut worker = h.worker().await;
    let event = json!({"event": "password.reset", "user_target": "reno",
                       "payload": {"email": "reno@example.com", "reset_link": "https://app.example.com/r?t=SECRET-TOKEN"}});
    let res = h.api.post_json("/api/v1/events", &event).await;
    assert_eq!(res.status(), 202);
    let id = res.json::<Value>().await.unwrap()["event_id"].as_str().unwrap().to_string();
    worker.next_reports(2, WAIT).await;

    let inbox: Value = h
        .api
        .client
        .get(format!("{}/api/v1/users/reno/notifications", h.api.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let item = &inbox["items"][0];
    assert_eq!(item["notification_id"], id.as_str(), "{inbox}");
    assert!(item["data"].is_null(), "the payload is not copied into the inbox: {item}");
    assert!(!inbox.to_string().contains("SECRET-TOKEN"), "{inbox}");
    assert_eq!(inbox["unread_count"], 1);

    // Read by the id the 202 returned (the notification's), not only by the item's own id.
    let read =
        h.api.client.post(format!("{}/api/v1/users/reno/notifications/{id}/read", h.api.base)).send().await.unwrap();
    assert_eq!(read.status(), 200);
    let inbox: Value = h
        .api
        .client
        .get(format!("{}/api/v1/users/reno/notifications", h.api.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(inbox["unread_count"], 0, "{inbox}");
    assert_eq!(inbox["items"][0]["read"], true);
    // Another user cannot read reno's item by that id.
    let other =
        h.api.client.post(format!("{}/api/v1/users/mallory/notifications/{id}/read", h.api.base)).send().await.unwrap();
    assert_eq!(other.status(), 404);
    worker.stop().await.unwrap();
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_422_lists_every_field_and_a_405_says_what_is_allowed() {
    let h = Harness::start("fields-allow").await;
    let res = h.api.post_json("/api/v1/notifications/email", &json!({"to": "not-an-address", "subjct": "hi"})).await;
    assert_eq!(res.status(), 422);
    let body: Value = res.json().await.unwrap();
    let fields: BTreeSet<&str> =
        body["error"]["fields"].as_array().unwrap().iter().map(|f| f["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["body", "subject", "subjct", "to"].into(), "unknown, invalid and missing together: {body}");

    for (method, path, allow) in [
        (reqwest::Method::GET, "/api/v1/notifications/email", "POST"),
        (reqwest::Method::DELETE, "/api/v1/events", "POST"),
        (reqwest::Method::POST, "/health", "GET"),
    ] {
        let res = h.api.client.request(method.clone(), format!("{}{path}", h.api.base)).send().await.unwrap();
        assert_eq!(res.status(), 405, "{method} {path}");
        assert_eq!(res.headers().get("allow").map(|v| v.to_str().unwrap()), Some(allow), "{method} {path}");
        assert_eq!(res.json::<Value>().await.unwrap()["error"]["code"], "method_not_allowed");
    }
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_status_has_no_last_error() {
    let h = Harness::start("delivered-no-error").await;
    h.smtp.script(vec![Reply::transient()]);
    let mut worker = h.worker().await;
    let res = h.api.post_json("/api/v1/notifications/email", &email("a@example.com", "s", "b")).await;
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let reports = worker.next_reports(2, WAIT).await;
    assert!(matches!(reports[0].settled, Settled::Retrying { .. }), "{reports:?}");
    assert_eq!(reports[1].settled, Settled::Delivered);
    let status: Value = h
        .api
        .client
        .get(format!("{}/api/v1/notifications/{id}", h.api.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ch = &status["channels"][0];
    assert_eq!((ch["status"].as_str(), ch["attempts"].as_i64()), (Some("delivered"), Some(2)), "{status}");
    assert!(ch["last_error"].is_null(), "{status}");
    worker.stop().await.unwrap();
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_errors_name_the_host_port_and_cause() {
    let schema = "t_db_errors_first_hour";
    // Nothing listens on port 1.
    let store = notify_store::Store::connect_lazy("postgres://postgres@127.0.0.1:1/test", schema, 1).unwrap();
    let e = store.migrate().await.unwrap_err().to_string();
    assert!(e.contains("127.0.0.1:1") && e.to_lowercase().contains("refused"), "{e}");
    // A MySQL URL is not taken for a Postgres one.
    let e = notify_store::Store::connect_lazy("mysql://root@127.0.0.1:3306/test", schema, 1).unwrap_err().to_string();
    assert!(e.contains("postgres://") && e.contains("mysql://"), "{e}");
    // Credentials: this machine's Postgres trusts loopback logins, so a wrong password cannot
    // fail here; an unknown role and an unknown database are refused the same way a wrong
    // password is (authentication phase), and must say so with where.
    let store = notify_store::Store::connect_lazy("postgres://nobody-here@127.0.0.1:5432/test", schema, 1).unwrap();
    let e = store.migrate().await.unwrap_err().to_string();
    assert!(e.contains("127.0.0.1:5432") && e.contains("nobody-here"), "{e}");
    let store =
        notify_store::Store::connect_lazy("postgres://postgres@127.0.0.1:5432/no_such_db_x", schema, 1).unwrap();
    let e = store.migrate().await.unwrap_err().to_string();
    assert!(e.contains("127.0.0.1:5432") && e.contains("no_such_db_x") && e.contains("does not exist"), "{e}");
    // And through the API's readiness: the database is reported unreachable.
    let h = Harness::start_with("db-ready", |s| {
        s.insert("DATABASE_URL".into(), "postgres://postgres@127.0.0.1:1/test".into());
    })
    .await;
    let ready = reqwest::get(format!("{}/ready", h.api.base)).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.json::<Value>().await.unwrap()["checks"]["database"], "unreachable");
    h.api.stop().await;
    notify_testkit::rabbit::delete_topology(&h.amqp, &h.topology).await;
}
