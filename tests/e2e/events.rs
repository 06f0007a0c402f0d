//! Events routed to e-mail, webhook and in-app channels; delivery state; the inbox; the send
//! guard; idempotency keys; webhook target checks; routes-file errors.

use crate::support;

use notify_testkit::webhook::{verify_signature, WebhookReceiver};
use notify_types::{broker, Envelope, EventPayload, Topology};
use notify_worker::outcome::{DeadReason, Settled};
use serde_json::{json, Value};
use std::{collections::HashSet, time::Duration};
use support::{email, routes_file, Harness, TestApi, TestWorker, WEBHOOK_SECRET};

const WAIT: Duration = Duration::from_secs(30);

/// A harness whose `order.completed` webhook goes to a receiver of its own.
async fn with_receiver(test: &str, extra: &[(&str, &str)]) -> (Harness, WebhookReceiver) {
    let hook = WebhookReceiver::start().await;
    let url = hook.url("/orders");
    let extra: Vec<(String, String)> = extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let h = Harness::start_with(test, |s| {
        let file = routes_file(&s["NOTIFY_PREFIX"], &url);
        s.insert("ROUTES_FILE".into(), file);
        s.extend(extra);
    })
    .await;
    (h, hook)
}

async fn post(h: &Harness, path: &str, body: Value) -> Value {
    let res = h.api.post_json(path, &body).await;
    assert_eq!(res.status(), 202, "{path} {body}");
    res.json().await.unwrap()
}

fn reset_event(user: &str) -> Value {
    json!({"event": "password.reset", "user_target": user,
           "payload": {"email": "ann@example.com", "name": "Ann", "reset_link": "https://app.example.com/reset?t=abc123"}})
}

async fn get(h: &Harness, path: &str) -> (u16, Value) {
    let res = h.api.client.get(format!("{}{path}", h.api.base)).send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_fan_out_to_their_channels_exactly_once() {
    let (h, hook) = with_receiver("fan-out", &[]).await;
    let mut worker = h.worker().await;

    let reset = post(&h, "/api/v1/events", reset_event("u-1")).await;
    assert_eq!(reset["status"], "success");
    assert_eq!(reset["message"], "event accepted");
    let reset_id = reset["event_id"].as_str().unwrap().to_string();
    let order = post(
        &h,
        "/api/v1/events",
        json!({"event": "order.completed", "user_target": "u-1", "payload": {"order_id": 42}}),
    )
    .await;
    // The seed's path works too.
    post(&h, "/events", json!({"event": "user.registered", "user_target": "u-2", "payload": {"email": "bob@example.com", "name": "Bob"}})).await;

    let reports = worker.next_reports(4, WAIT).await;
    assert!(reports.iter().all(|r| r.settled == Settled::Delivered), "{reports:?}");

    let mails = h.smtp.wait_for_mails(2, WAIT).await;
    let reset_mail = mails.iter().find(|m| m.subject == "Reset your password").expect("reset mail");
    assert!(reset_mail.text_body.contains("https://app.example.com/reset?t=abc123"), "{}", reset_mail.text_body);
    assert_eq!(reset_mail.to, vec!["ann@example.com".to_string()]);
    // HTML-escaped by the template (minijinja writes `/` as `&#x2f;`), which mail clients decode.
    let html = reset_mail.html_body.as_deref().unwrap();
    assert!(html.contains("<a href=\"https:&#x2f;&#x2f;app.example.com&#x2f;reset?t=abc123\">"), "{html}");
    let welcome = mails.iter().find(|m| m.subject == "Welcome to notify, Bob!").expect("welcome mail");
    assert_eq!(welcome.to, vec!["bob@example.com".to_string()]);

    let (status, inbox) = get(&h, "/api/v1/users/u-1/notifications").await;
    assert_eq!(status, 200);
    assert_eq!(inbox["items"].as_array().unwrap().len(), 1);
    assert_eq!(inbox["items"][0]["title"], "Password reset requested");
    assert_eq!(inbox["items"][0]["notification_id"], reset_id.as_str());

    let hooks = hook.wait_for_delivered(1, WAIT).await;
    let received = &hooks[0];
    assert!(verify_signature(WEBHOOK_SECRET, received), "signature verifies with the route's secret");
    assert!(!verify_signature("whsec_d3Jvbmctc2VjcmV0", received), "and not with another secret");
    assert_eq!(received.header("webhook-id"), order["event_id"].as_str());
    let body = received.json();
    assert_eq!(body["type"], "order.completed");
    assert_eq!(body["data"]["payload"]["order_id"], 42);

    // Status: delivered on every channel of the event, one attempt each.
    let (status, st) = get(&h, &format!("/api/v1/notifications/{reset_id}")).await;
    assert_eq!(status, 200);
    let channels: Vec<(String, String, i64)> = st["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["channel"].as_str().unwrap().into(),
                c["status"].as_str().unwrap().into(),
                c["attempts"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(channels, vec![("email".into(), "delivered".into(), 1), ("in_app".into(), "delivered".into(), 1)]);

    worker.stop().await.unwrap();
    assert_eq!(h.smtp.mails().len(), 2);
    assert_eq!(hook.requests().len(), 1);
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_events_and_ids_get_clear_errors() {
    let h = Harness::start("unknown").await;
    let res =
        h.api.post_json("/api/v1/events", &json!({"event": "user.deleted", "user_target": "u", "payload": {}})).await;
    assert_eq!(res.status(), 422);
    let body: Value = res.json().await.unwrap();
    let msg = body["error"]["fields"][0]["message"].as_str().unwrap();
    assert!(msg.contains("user.deleted") && msg.contains("password.reset") && msg.contains("order.completed"), "{msg}");
    let (status, body) = get(&h, &format!("/api/v1/notifications/{}", uuid::Uuid::now_v7())).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(get(&h, "/api/v1/notifications/not-a-uuid").await.0, 404);
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_down_is_delivered_later_while_email_keeps_flowing() {
    let (h, hook) = with_receiver("isolation", &[("MAX_ATTEMPTS", "40")]).await;
    hook.go_down().await;
    let mut worker = h.worker().await;
    let order =
        post(&h, "/api/v1/events", json!({"event": "order.completed", "user_target": "u", "payload": {"order_id": 7}}))
            .await;
    let id = order["event_id"].as_str().unwrap().to_string();
    for i in 0..5 {
        post(&h, "/api/v1/notifications/email", email(&format!("e{i}@example.com"), "s", "b")).await;
    }
    // All five mails get through while the webhook keeps failing.
    let mut webhook_retries = 0;
    let mut mails_delivered = 0;
    while mails_delivered < 5 || webhook_retries < 2 {
        let r = worker.next_reports(1, WAIT).await.remove(0);
        match (r.channel, &r.settled) {
            (notify_types::Channel::Email, Settled::Delivered) => mails_delivered += 1,
            (notify_types::Channel::Webhook, Settled::Retrying { .. }) => webhook_retries += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(h.smtp.mails().len(), 5);
    // Status shows the webhook retrying (or, caught mid-way, its next attempt under way), with
    // its attempts and the error.
    let (_, st) = get(&h, &format!("/api/v1/notifications/{id}")).await;
    let status = st["channels"][0]["status"].as_str().unwrap_or_default();
    assert!(status == "retrying" || status == "delivering", "{st}");
    assert!(st["channels"][0]["attempts"].as_i64().unwrap() >= 2, "{st}");
    assert!(st["channels"][0]["last_error"].is_string(), "{st}");

    hook.come_back().await;
    let delivered = hook.wait_for_delivered(1, WAIT).await;
    assert_eq!(delivered[0].header("webhook-id"), Some(id.as_str()));
    loop {
        let r = worker.next_reports(1, WAIT).await.remove(0);
        if r.settled == Settled::Delivered {
            assert!(r.attempt >= 3, "delivered on attempt {}", r.attempt);
            break;
        }
    }
    let (_, st) = get(&h, &format!("/api/v1/notifications/{id}")).await;
    assert_eq!(st["channels"][0]["status"], "delivered", "{st}");
    worker.stop().await.unwrap();
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_410_is_dead_on_attempt_one() {
    let (h, hook) = with_receiver("gone", &[]).await;
    hook.always(410);
    let mut worker = h.worker().await;
    let order =
        post(&h, "/api/v1/events", json!({"event": "order.completed", "user_target": "u", "payload": {}})).await;
    let r = worker.next_reports(1, WAIT).await.remove(0);
    assert_eq!((r.attempt, r.settled), (1, Settled::DeadLettered { reason: DeadReason::Permanent }));
    assert_eq!(hook.requests().len(), 1);
    let (_, st) = get(&h, &format!("/api/v1/notifications/{}", order["event_id"].as_str().unwrap())).await;
    assert_eq!(st["channels"][0]["status"], "dead", "{st}");
    assert_eq!(st["channels"][0]["attempts"], 1, "{st}");
    assert!(st["channels"][0]["last_error"].as_str().unwrap().contains("410"), "{st}");
    worker.stop().await.unwrap();
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_lists_pages_counts_and_marks_read_per_user() {
    let h = Harness::start("inbox").await;
    let mut worker = h.worker().await;
    for i in 0..25 {
        post(
            &h,
            "/api/v1/notifications/in-app",
            json!({"user": "alice", "title": format!("t{i}"), "body": "b", "data": {"n": i}}),
        )
        .await;
    }
    for i in 0..3 {
        post(&h, "/api/v1/notifications/in-app", json!({"user": "bob", "title": format!("bob {i}"), "body": "b"}))
            .await;
    }
    worker.next_reports(28, WAIT).await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut sizes = Vec::new();
    loop {
        let q = cursor.as_ref().map(|c| format!("&cursor={c}")).unwrap_or_default();
        let (status, page) = get(&h, &format!("/api/v1/users/alice/notifications?limit=10{q}")).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["unread_count"], 25);
        let items = page["items"].as_array().unwrap();
        sizes.push(items.len());
        seen.extend(
            items.iter().map(|i| (i["id"].as_str().unwrap().to_string(), i["title"].as_str().unwrap().to_string())),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(sizes.len() < 10, "pagination ends");
    }
    assert_eq!(sizes, vec![10, 10, 5]);
    let titles: Vec<&str> = seen.iter().map(|(_, t)| t.as_str()).collect();
    let expected: Vec<String> = (0..25).rev().map(|i| format!("t{i}")).collect();
    assert_eq!(titles, expected, "newest first, no overlap, nothing missing");

    let first = seen[0].0.clone();
    let res =
        h.api.client.post(format!("{}/api/v1/users/bob/notifications/{first}/read", h.api.base)).send().await.unwrap();
    assert_eq!(res.status(), 404, "bob cannot touch alice's item");
    let res = h
        .api
        .client
        .post(format!("{}/api/v1/users/alice/notifications/{first}/read", h.api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (_, unread) = get(&h, "/api/v1/users/alice/notifications?unread=true&limit=100").await;
    assert_eq!(unread["unread_count"], 24);
    assert_eq!(unread["items"].as_array().unwrap().len(), 24);
    assert!(unread["items"].as_array().unwrap().iter().all(|i| i["id"] != first.as_str()));

    let res =
        h.api.client.post(format!("{}/api/v1/users/alice/notifications/read-all", h.api.base)).send().await.unwrap();
    assert_eq!(res.json::<Value>().await.unwrap()["updated"], 24);
    let (_, after) = get(&h, "/api/v1/users/alice/notifications?unread=true").await;
    assert_eq!((after["unread_count"].as_i64(), after["items"].as_array().unwrap().len()), (Some(0), 0));
    let (_, bob) = get(&h, "/api/v1/users/bob/notifications").await;
    assert_eq!(bob["unread_count"], 3, "bob's items are untouched");
    assert!(bob["items"].as_array().unwrap().iter().all(|i| i["user"] == "bob"));
    assert_eq!(get(&h, "/api/v1/users/alice/notifications?limit=0").await.0, 422);
    assert_eq!(get(&h, "/api/v1/users/alice/notifications?cursor=garbage").await.0, 422);
    worker.stop().await.unwrap();
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_delivered_twice_by_the_broker_sends_once() {
    let (h, hook) = with_receiver("redelivery", &[]).await;
    let mut worker = h.worker().await;
    let ch = h.amqp.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let reset = Envelope::event(
        "password.reset",
        "req-1".into(),
        &EventPayload { user_target: "carol".into(), payload: reset_event("carol")["payload"].clone() },
    );
    let order = Envelope::event(
        "order.completed",
        "req-2".into(),
        &EventPayload { user_target: "carol".into(), payload: json!({"order_id": 1}) },
    );
    // The same envelopes (same ids) twice, as a broker redelivery or a publisher retry would.
    for round in 0..2 {
        for env in [&reset, &order] {
            broker::publish_confirmed(
                &ch,
                &h.topology.exchange(),
                &Topology::event_key(env.event.as_deref().unwrap()),
                &env.to_bytes(),
                broker::envelope_properties(env, 1),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        }
        let reports = worker.next_reports(3, WAIT).await;
        let expected = if round == 0 { Settled::Delivered } else { Settled::AlreadyDelivered };
        assert!(reports.iter().all(|r| r.settled == expected), "round {round}: {reports:?}");
    }
    worker.stop().await.unwrap();
    assert_eq!(h.smtp.mails().len(), 1, "one mail");
    assert_eq!(hook.requests().len(), 1, "one webhook");
    let (_, inbox) = get(&h, "/api/v1/users/carol/notifications").await;
    assert_eq!(inbox["items"].as_array().unwrap().len(), 1, "one inbox item");
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_ten_times_at_once_gives_one_delivery() {
    let h = Harness::start("idempotency").await;
    let body = email("idem@example.com", "once", "only once");
    let send = |key: &'static str, body: Value| {
        let api = &h.api;
        async move {
            let res = api
                .client
                .post(format!("{}/api/v1/notifications/email", api.base))
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
                .unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let answers = futures_util::future::join_all((0..10).map(|_| send("key-1", body.clone()))).await;
    assert!(answers.iter().all(|(s, _)| *s == 202), "{answers:?}");
    let bodies: HashSet<String> = answers.iter().map(|(_, b)| b.to_string()).collect();
    assert_eq!(bodies.len(), 1, "10 identical 202 bodies: {bodies:?}");
    // Same key, other body.
    let (status, err) = send("key-1", email("other@example.com", "x", "y")).await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["fields"][0]["field"], "Idempotency-Key");

    // One message was published: the worker delivers one, and the queue is then empty.
    let mut worker = h.worker().await;
    worker.next_reports(1, WAIT).await;
    worker.stop().await.unwrap();
    assert_eq!(h.count(&h.email_queue()).await, 0);
    assert_eq!(h.smtp.mails().len(), 1);
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_to_private_addresses_are_refused_unless_allowed() {
    let h = Harness::start_with("private-hooks", |s| {
        s.insert("WEBHOOK_ALLOW_PRIVATE".into(), "false".into());
    })
    .await;
    for url in [
        "http://127.0.0.1:9000/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://localhost/x",
        "http://[::1]/x",
    ] {
        let res = h.api.post_json("/api/v1/notifications/webhook", &json!({"url": url, "payload": {"a": 1}})).await;
        assert_eq!(res.status(), 422, "{url}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["fields"][0]["field"], "url", "{url}: {body}");
    }
    assert_eq!(h.count(&h.topology.queue(notify_types::Channel::Webhook)).await, 0);
    let ok = h
        .api
        .post_json("/api/v1/notifications/webhook", &json!({"url": "https://hooks.example.com/x", "payload": {}}))
        .await;
    assert_eq!(ok.status(), 202);
    h.cleanup().await;

    // Allowed by config (as in these tests): a direct webhook reaches a loopback receiver.
    let hook = WebhookReceiver::start().await;
    let h = Harness::start("loopback-allowed").await;
    let mut worker = h.worker().await;
    post(&h, "/api/v1/notifications/webhook", json!({"url": hook.url("/direct"), "payload": {"hello": "world"}})).await;
    worker.next_reports(1, WAIT).await;
    assert_eq!(hook.wait_for_delivered(1, WAIT).await[0].json(), json!({"hello": "world"}));
    worker.stop().await.unwrap();
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_routes_file_stops_startup_naming_the_event_and_field() {
    let prefix = notify_testkit::rabbit::unique_prefix("bad-routes");
    let smtp = notify_testkit::smtp::SmtpServer::start().await;
    let cases = [
        ("[events.\"order.shipped\".sms]\nto = \"x\"\n", "order.shipped", "sms"),
        (
            "[events.\"user.registered\".email]\nto = \"{{ payload.email\"\nsubject = \"s\"\nbody = \"b\"\n",
            "user.registered",
            "email.to",
        ),
        ("[events.\"order.completed\".webhook]\nsecret = \"s\"\n", "order.completed", "url"),
    ];
    for (i, (text, event, field)) in cases.iter().enumerate() {
        let path = std::env::temp_dir().join(format!("{prefix}-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let mut s = support::settings(&prefix, &notify_testkit::rabbit::rabbitmq_url(), &smtp.url());
        s.insert("ROUTES_FILE".into(), path.to_string_lossy().into_owned());
        let api_err = TestApi::start(&s).await.err().expect("API refuses").to_string();
        assert!(api_err.contains(event) && api_err.contains(field), "API: {api_err}");
        let worker_err = TestWorker::start(&s).await.err().expect("worker refuses").to_string();
        assert!(worker_err.contains(event) && worker_err.contains(field), "worker: {worker_err}");
        let _ = std::fs::remove_file(path);
    }
}
