//! What an attacker's probe of the API and the mail path found (issue 15), one test per finding,
//! each through the real API, broker, Postgres and SMTP server. The text log of this binary is
//! captured with the binaries' own field formatting (for the log-injection case).

use crate::support;

use notify_testkit::{rabbit, webhook::WebhookReceiver};
use notify_worker::outcome::Settled;
use serde_json::{json, Value};
use std::time::Duration;
use support::{email, Harness, API_KEY};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const WAIT: Duration = Duration::from_secs(30);
const EMAIL: &str = "/api/v1/notifications/email";

/// Sends raw bytes to the API and reads what comes back until the server closes the connection
/// or `within` passes (then `closed` is false).
async fn raw_exchange(port: u16, request: &[u8], within: Duration) -> (String, bool) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(within, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn port_of(h: &Harness) -> u16 {
    h.api.base.rsplit(':').next().unwrap().parse().unwrap()
}

/// The distinct fields a 422 names.
fn error_field(body: &Value) -> Vec<String> {
    let fields = body["error"]["fields"].as_array().into_iter().flatten();
    let set: std::collections::BTreeSet<String> = fields.map(|f| f["field"].as_str().unwrap().to_string()).collect();
    set.into_iter().collect()
}

// 1 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_scoped_to_the_api_key_that_used_them() {
    let h = Harness::start_with("idem-scope", |s| {
        s.insert("API_KEYS".into(), "billing:key-billing-71c,accounts:key-accounts-3e9".into());
    })
    .await;
    let client = reqwest::Client::new();
    let post = |key: &'static str| {
        client
            .post(format!("{}{EMAIL}", h.api.base))
            .bearer_auth(key)
            .header("Idempotency-Key", "order-42")
            .json(&email("a@example.com", "same", "same body"))
            .send()
    };
    let a = post("key-billing-71c").await.unwrap();
    assert_eq!(a.status(), 202);
    assert!(a.headers().get("idempotent-replayed").is_none());
    let a_id = a.json::<Value>().await.unwrap()["id"].clone();
    let b = post("key-accounts-3e9").await.unwrap();
    assert_eq!(b.status(), 202, "another producer's key is another key");
    assert!(b.headers().get("idempotent-replayed").is_none(), "B must not get A's answer");
    let b_id = b.json::<Value>().await.unwrap()["id"].clone();
    assert_ne!(a_id, b_id);
    let again = post("key-billing-71c").await.unwrap();
    assert_eq!(again.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    assert_eq!(again.json::<Value>().await.unwrap()["id"], a_id, "A's own retry is still replayed");

    // Both were published, each marked with its producer's name.
    let published = rabbit::drain(&h.amqp, &h.email_queue(), 10).await;
    let mut producers: Vec<String> = published
        .iter()
        .map(|(_, body)| serde_json::from_slice::<Value>(body).unwrap()["producer"].as_str().unwrap().to_string())
        .collect();
    producers.sort();
    assert_eq!(producers, ["accounts", "billing"]);
    h.cleanup().await;
}

// 2 ------------------------------------------------------------------------------------------

/// Whether every CR in `raw` starts a CRLF and every LF ends one.
fn only_crlf(raw: &str) -> bool {
    let b = raw.as_bytes();
    b.iter().enumerate().all(|(i, &c)| match c {
        b'\r' => b.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && b[i - 1] == b'\r',
        _ => true,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_bare_cr_or_lf_reaches_the_smtp_data_and_no_control_character_a_header() {
    let h = Harness::start("smuggle").await;
    let mut worker = h.worker().await;
    let mut req = email("a@example.com", "hi", "line1\r.\rRCPT TO:<x@evil.example>\rline2\nline3");
    req["html"] = "<p>a</p>\r.\rRCPT TO:<y@evil.example>\r".into();
    assert_eq!(h.api.post_json(EMAIL, &req).await.status(), 202);
    // A rendered subject with control characters in it (from the event's payload).
    let event = json!({"event": "user.registered", "user_target": "u1",
                       "payload": {"email": "b@example.com", "name": "A\u{b}B\u{c}C\u{1b}[31mD\u{0}E"}});
    let res = h.api.post_json("/api/v1/events", &event).await;
    assert_eq!(res.status(), 422, "NUL is refused at the door");
    let event = json!({"event": "user.registered", "user_target": "u1",
                       "payload": {"email": "b@example.com", "name": "A\u{b}B\u{c}C\u{1b}[31mD"}});
    assert_eq!(h.api.post_json("/api/v1/events", &event).await.status(), 202);
    worker.next_reports(2, WAIT).await;
    let mails = h.smtp.wait_for_mails(2, WAIT).await;
    for mail in &mails {
        assert!(only_crlf(&mail.raw), "a bare CR or LF reached the wire: {:?}", mail.raw);
        let headers = mail.raw.split("\r\n\r\n").next().unwrap();
        assert!(
            !headers.bytes().any(|b| b.is_ascii_control() && b != b'\r' && b != b'\n'),
            "a control character reached a header: {headers:?}"
        );
    }
    let direct = mails.iter().find(|m| m.to == ["a@example.com"]).unwrap();
    assert!(direct.text_body.contains("RCPT TO:<x@evil.example>") && direct.text_body.contains("line3"), "{direct:?}");
    let event_mail = mails.iter().find(|m| m.to == ["b@example.com"]).unwrap();
    assert_eq!(event_mail.subject, "Welcome to notify, A B C [31mD!");

    // A direct subject or recipient with a control character never gets in at all.
    for (field, value) in [("subject", "a\u{b}b"), ("subject", "a\u{1b}[2Jb"), ("to", "a\u{c}@example.com")] {
        let mut req = email("a@example.com", "s", "b");
        req[field] = value.into();
        let res = h.api.post_json(EMAIL, &req).await;
        assert_eq!(res.status(), 422, "{field}={value:?}");
        assert_eq!(error_field(&res.json().await.unwrap()), [field]);
    }
    worker.stop().await.unwrap();
    h.cleanup().await;
}

// 3 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_gets_408_in_the_json_shape() {
    let h = Harness::start_with("slow-body", |s| {
        s.insert("API_REQUEST_TIMEOUT".into(), "1s".into());
    })
    .await;
    let port = port_of(&h);
    let request = format!(
        "POST {EMAIL} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{}",
        r#"{"to": "a@example.com", "subject": "s", "body":"#
    );
    // Fifty of them at once: each is answered and closed, none is held.
    let started = std::time::Instant::now();
    let answers = futures_util::future::join_all(
        (0..50).map(|_| raw_exchange(port, request.as_bytes(), Duration::from_secs(10))),
    )
    .await;
    for (response, closed) in &answers {
        assert!(closed, "the connection was still open after 10 s: {response:?}");
        assert!(response.starts_with("HTTP/1.1 408"), "{response:?}");
        let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    }
    assert!(started.elapsed() < Duration::from_secs(8), "answered after {:?}", started.elapsed());
    // Headers that stop arriving are cut off by the HTTP layer (no JSON body possible there).
    let (response, closed) =
        raw_exchange(port, format!("POST {EMAIL} HTTP/1.1\r\nHost: x\r\n").as_bytes(), Duration::from_secs(10)).await;
    assert!(closed, "headers that never end held the connection: {response:?}");
    assert!(response.is_empty() || response.starts_with("HTTP/1.1 408"), "{response:?}");
    assert_eq!(h.count(&h.email_queue()).await, 0, "nothing was published");
    h.cleanup().await;
}

// 4 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_subjects_are_folded_and_an_overlong_rendered_subject_is_dead() {
    let h = Harness::start("long-subject").await;
    let mut worker = h.worker().await;
    let subject = "a".repeat(998);
    assert_eq!(h.api.post_json(EMAIL, &email("a@example.com", &subject, "b")).await.status(), 202);
    let name = "n".repeat(900);
    let fits =
        json!({"event": "user.registered", "user_target": "u1", "payload": {"email": "b@example.com", "name": name}});
    assert_eq!(h.api.post_json("/api/v1/events", &fits).await.status(), 202);
    let huge = json!({"event": "user.registered", "user_target": "u1",
                      "payload": {"email": "c@example.com", "name": "x".repeat(200_000)}});
    let res = h.api.post_json("/api/v1/events", &huge).await;
    assert_eq!(res.status(), 202);
    let huge_id: uuid::Uuid = res.json::<Value>().await.unwrap()["event_id"].as_str().unwrap().parse().unwrap();

    let reports = worker.next_reports(3, WAIT).await;
    let dead: Vec<_> = reports.iter().filter(|r| matches!(r.settled, Settled::DeadLettered { .. })).collect();
    assert_eq!(dead.len(), 1, "{reports:?}");
    assert_eq!(dead[0].id, Some(huge_id));
    let status = h.store().delivery_status(huge_id).await.unwrap();
    let error = status[0].last_error.clone().unwrap();
    assert!(error.contains("RFC 5322 allows at most 998"), "{error}");

    let mails = h.smtp.wait_for_mails(2, WAIT).await;
    for mail in &mails {
        let longest = mail.raw.split("\r\n").map(str::len).max().unwrap();
        assert!(longest <= 998, "a line of {longest} octets went out");
    }
    let direct = mails.iter().find(|m| m.to == ["a@example.com"]).unwrap();
    assert_eq!(direct.subject, subject, "the folded subject reads back whole");
    let event_mail = mails.iter().find(|m| m.to == ["b@example.com"]).unwrap();
    assert_eq!(event_mail.subject, format!("Welcome to notify, {name}!"));
    worker.stop().await.unwrap();
    h.cleanup().await;
}

// 5 and 6 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_worker_cannot_send_and_duplicate_keys_are_refused_at_the_door() {
    let h = Harness::start("door").await;
    for to in ["x@[127.0.0.1]", "x@[IPv6:::1]"] {
        let res = h.api.post_json(EMAIL, &email(to, "s", "b")).await;
        assert_eq!(res.status(), 422, "{to}");
        assert_eq!(error_field(&res.json().await.unwrap()), ["to"], "{to}");
    }
    let raw_post = |body: &'static str, path: &'static str| {
        h.api.client.post(format!("{}{path}", h.api.base)).header("content-type", "application/json").body(body).send()
    };
    for (path, body, field) in [
        (EMAIL, r#"{"to":"a@example.com","to":"b@example.com","subject":"s","body":"b"}"#, "to"),
        (EMAIL, r#"{"to":"a@example.com","subject":"s","body":"b","subject":"t"}"#, "subject"),
        (
            "/api/v1/events",
            r#"{"event":"user.registered","user_target":"u","payload":{"email":"a@example.com","name":"n","email":"b@example.com"}}"#,
            "payload.email",
        ),
    ] {
        let res = raw_post(body, path).await.unwrap();
        assert_eq!(res.status(), 422, "{body}");
        let json: Value = res.json().await.unwrap();
        assert_eq!(error_field(&json), [field], "{json}");
    }
    for ch in [notify_types::Channel::Email, notify_types::Channel::InApp] {
        assert_eq!(h.count(&h.topology.queue(ch)).await, 0, "nothing was published");
    }
    h.cleanup().await;
}

// 7 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newline_in_request_text_cannot_forge_a_log_line() {
    let logs = support::logs();
    let h = Harness::start("log-inject").await;
    let mut worker = h.worker().await;
    let forged = "FORGED-7f3a ERROR notify_worker: admin password reset";
    let event = json!({"event": "user.registered", "user_target": "u1",
                       "payload": {"email": format!("x\n{forged}\r\n\u{1b}[2J"), "name": "n"}});
    let res = h.api.post_json("/api/v1/events", &event).await;
    assert_eq!(res.status(), 202);
    let reports = worker.next_reports(1, WAIT).await;
    assert!(matches!(reports[0].settled, Settled::DeadLettered { .. }), "{reports:?}");
    worker.stop().await.unwrap();
    h.cleanup().await;
    let text = logs.text();
    assert!(text.contains("FORGED-7f3a"), "the bad recipient is logged (escaped)");
    for line in text.lines() {
        assert!(!line.starts_with("FORGED-7f3a"), "a forged line: {line:?}");
        assert!(!line.contains('\u{1b}') && !line.contains('\r'), "a control character in the log: {line:?}");
    }
}

// 8 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_targets_that_are_not_globally_reachable_are_refused() {
    let h = Harness::start_with("special-ranges", |s| {
        s.insert("WEBHOOK_ALLOW_PRIVATE".into(), "false".into());
    })
    .await;
    for url in [
        "http://[2002:7f00:1::]/hook",
        "http://198.18.0.1/hook",
        "http://192.0.0.1/hook",
        "http://240.0.0.1/hook",
        "http://192.0.2.10/hook",
        "http://[100::1]/hook",
        "http://[2001:db8::1]/hook",
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/hook",
        "http://[64:ff9b::a00:1]/hook",
    ] {
        let res = h.api.post_json("/api/v1/notifications/webhook", &json!({"url": url, "payload": {}})).await;
        assert_eq!(res.status(), 422, "{url}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(error_field(&body), ["url"], "{url}");
        assert!(body.to_string().contains("WEBHOOK_ALLOW_PRIVATE"), "the refusal says how to allow it: {body}");
    }
    let ok =
        h.api.post_json("/api/v1/notifications/webhook", &json!({"url": "https://1.1.1.1/hook", "payload": {}})).await;
    assert_eq!(ok.status(), 202, "a global address is accepted");
    h.cleanup().await;
}

// 9 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_plain_application_json_is_read() {
    let h = Harness::start("content-types").await;
    let body = email("a@example.com", "s", "b").to_string();
    let post = |content_type: &'static str, encoding: Option<&'static str>| {
        let mut req = h.api.client.post(format!("{}{EMAIL}", h.api.base)).header("content-type", content_type);
        if let Some(e) = encoding {
            req = req.header("content-encoding", e);
        }
        req.body(body.clone()).send()
    };
    for (ct, enc, status) in [
        ("application/vnd.api+json", None, 415),
        ("application/problem+json", None, 415),
        ("application/json", Some("gzip"), 415),
        ("application/json", Some("br"), 415),
        ("application/json; charset=utf-8", None, 202),
        ("Application/JSON", Some("identity"), 202),
    ] {
        let res = post(ct, enc).await.unwrap();
        assert_eq!(res.status(), status, "{ct} {enc:?}");
        if status == 415 {
            let json: Value = res.json().await.unwrap();
            assert_eq!(json["error"]["code"], "unsupported_media_type", "{json}");
        }
    }
    assert_eq!(h.count(&h.email_queue()).await, 2, "only the two accepted ones were published");
    h.cleanup().await;
}

// 10 -----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_is_refused_and_what_reaches_the_app_answers_json() {
    let h = Harness::start("malformed-http").await;
    let port = port_of(&h);
    let auth = format!("Authorization: Bearer {API_KEY}\r\n");
    let long_url = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(64 * 1024));
    let big_headers =
        format!("GET /health HTTP/1.1\r\nHost: x\r\n{}\r\n", "X-Pad: aaaaaaaaaaaaaaaa\r\n".repeat(50_000));
    // Refused by the HTTP layer: a 4xx status (actix-web writes it without a body) and the
    // connection is closed, never a 5xx, never held open.
    let parse_layer: Vec<(&str, Vec<u8>)> = vec![
        ("control byte in a header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n".to_vec()),
        ("bad Content-Length", format!("POST {EMAIL} HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n").into_bytes()),
        (
            "Content-Length and chunked",
            format!("POST {EMAIL} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
                .into_bytes(),
        ),
        ("HTTP/0.9", b"GET /health\r\n\r\n".to_vec()),
        ("no Host in HTTP/1.1", format!("GET /health HTTP/1.1\r\n{auth}\r\n").into_bytes()),
        ("non-ASCII bytes in the path", b"GET /api/v1/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("64 KB URL", long_url.into_bytes()),
        ("1 MB of headers", big_headers.into_bytes()),
        ("control bytes in Idempotency-Key", format!("POST {EMAIL} HTTP/1.1\r\nHost: x\r\n{auth}Idempotency-Key: a\x07b\r\nContent-Length: 0\r\n\r\n").into_bytes()),
    ];
    for (what, request) in parse_layer {
        let (response, closed) = raw_exchange(port, &request, Duration::from_secs(10)).await;
        assert!(closed, "{what}: connection held open: {response:?}");
        let status: u16 = response.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        assert!((400..500).contains(&status), "{what}: {response:?}");
    }
    // Requests that get past the parser are answered by notify, in the JSON error shape.
    let app_layer: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "non-ASCII bytes in Idempotency-Key",
            [format!("POST {EMAIL} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nConnection: close\r\nIdempotency-Key: a").as_bytes(), b"\xff\r\nContent-Length: 2\r\n\r\n{}"].concat(),
            422,
        ),
        ("an unknown method", b"BREW /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), 405),
    ];
    for (what, request, expected) in app_layer {
        let (response, _) = raw_exchange(port, &request, Duration::from_secs(10)).await;
        let status: u16 = response.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        assert_eq!(status, expected, "{what}: {response:?}");
        let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap_or("")).unwrap_or_default();
        assert!(body["error"]["code"].is_string(), "{what}: not the JSON error shape: {response:?}");
    }
    assert_eq!(h.count(&h.email_queue()).await, 0, "nothing was published");
    h.cleanup().await;
}

// 11 -----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive_and_mail_links_are_http_only() {
    let h = Harness::start("bearer-links").await;
    let mut worker = h.worker().await;
    let client = reqwest::Client::new();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let res = client
            .post(format!("{}{EMAIL}", h.api.base))
            .header("authorization", format!("{scheme} {API_KEY}"))
            .json(&email("a@example.com", scheme, "b"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202, "{scheme}");
    }
    let event = |link: &str| json!({"event": "password.reset", "user_target": "u1", "payload": {"email": "r@example.com", "reset_link": link}});
    let res = h.api.post_json("/api/v1/events", &event("javascript:alert(document.cookie)")).await;
    assert_eq!(res.status(), 202);
    let bad_id: uuid::Uuid = res.json::<Value>().await.unwrap()["event_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(h.api.post_json("/api/v1/events", &event("https://app.example.com/reset?t=1")).await.status(), 202);
    // 4 direct mails, 2 events x (email + in-app).
    let reports = worker.next_reports(8, WAIT).await;
    let dead: Vec<_> = reports.iter().filter(|r| matches!(r.settled, Settled::DeadLettered { .. })).collect();
    assert_eq!(dead.len(), 1, "{reports:?}");
    assert_eq!((dead[0].id, dead[0].channel), (Some(bad_id), notify_types::Channel::Email));
    let mails = h.smtp.wait_for_mails(5, WAIT).await;
    assert!(mails.iter().all(|m| !m.raw.to_ascii_lowercase().contains("javascript:")));
    let reset = mails.iter().find(|m| m.to == ["r@example.com"]).unwrap();
    // minijinja's HTML escaping writes `/` as `&#x2f;`, which a mail client reads back as `/`.
    let html = reset.html_body.as_deref().unwrap().replace("&#x2f;", "/");
    assert!(html.contains(r#"href="https://app.example.com/reset?t=1""#), "{reset:?}");
    worker.stop().await.unwrap();
    h.cleanup().await;
}

// Webhooks with private targets allowed still work (the test harness allows loopback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_webhooks_pass_when_private_targets_are_allowed() {
    let h = Harness::start("allowed-loopback").await;
    let hook = WebhookReceiver::start().await;
    let mut worker = h.worker().await;
    let res =
        h.api.post_json("/api/v1/notifications/webhook", &json!({"url": hook.url("/in"), "payload": {"a": 1}})).await;
    assert_eq!(res.status(), 202);
    assert_eq!(worker.next_reports(1, WAIT).await[0].settled, Settled::Delivered);
    assert_eq!(hook.wait_for_delivered(1, WAIT).await[0].json(), json!({"a": 1}));
    worker.stop().await.unwrap();
    h.cleanup().await;
}
