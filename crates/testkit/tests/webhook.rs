//! The test webhook receiver against reqwest, the client the worker uses.

use notify_testkit::webhook::{verify_signature, WebhookReceiver};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// The Standard Webhooks reference vector.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const TIMESTAMP: &str = "1614265330";
const PAYLOAD: &str = r#"{"test": 2432232314}"#;
const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

#[tokio::test]
async fn answers_200_by_default_and_records_the_request() {
    let receiver = WebhookReceiver::start().await;
    assert_eq!(receiver.url("/hooks/a?x=1"), format!("http://127.0.0.1:{}/hooks/a?x=1", receiver.addr().port()));

    let response = client()
        .post(receiver.url("/hooks/a?x=1"))
        .header("Content-Type", "application/json")
        .header("X-Mixed-Case", "yes")
        .body(r#"{"hello":"world"}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);

    let delivered = receiver.wait_for_delivered(1, WAIT).await;
    let request = &delivered[0];
    assert_eq!(request.path, "/hooks/a?x=1");
    assert_eq!(request.status, 200);
    assert_eq!(request.headers["x-mixed-case"], "yes");
    assert_eq!(request.header("X-Mixed-Case"), Some("yes"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.json(), serde_json::json!({"hello": "world"}));
    assert_eq!(receiver.requests().len(), 1);
}

#[tokio::test]
async fn scripted_replies_are_consumed_in_order_then_200() {
    let receiver = WebhookReceiver::start().await;
    receiver.script(vec![(503, Some("1".into())), (200, None)]);
    let client = client();
    let url = receiver.url("/s");

    let first = client.post(&url).body("1").send().await.unwrap();
    assert_eq!(first.status(), 503);
    assert_eq!(first.headers()["retry-after"], "1");
    let second = client.post(&url).body("2").send().await.unwrap();
    assert_eq!(second.status(), 200);
    assert!(second.headers().get("retry-after").is_none());
    let third = client.post(&url).body("3").send().await.unwrap();
    assert_eq!(third.status(), 200);

    let statuses: Vec<u16> = receiver.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 200, 200]);
    let delivered: Vec<Vec<u8>> = receiver.delivered().into_iter().map(|r| r.body).collect();
    assert_eq!(delivered, [b"2".to_vec(), b"3".to_vec()]);
}

#[tokio::test]
async fn always_holds_until_reset_and_redirects_carry_a_location() {
    let receiver = WebhookReceiver::start().await;
    let client = client();
    receiver.always(410);
    for _ in 0..2 {
        let response = client.post(receiver.url("/")).send().await.unwrap();
        assert_eq!(response.status(), 410);
    }
    receiver.script(vec![(302, None)]);
    let response = client.post(receiver.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 302);
    assert_eq!(response.headers()["location"], "/redirected");
    receiver.reset();
    let response = client.post(receiver.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(receiver.requests().len(), 4);
    assert_eq!(receiver.delivered().len(), 1);
}

#[tokio::test]
async fn go_down_refuses_connections_and_come_back_serves_on_the_same_port() {
    let receiver = WebhookReceiver::start().await;
    // One pooled client throughout: going down must also close its kept-alive connection.
    let client = client();
    let url = receiver.url("/up");
    assert_eq!(client.post(&url).send().await.unwrap().status(), 200);

    receiver.go_down().await;
    let error = client.post(&url).send().await.expect_err("receiver is down");
    assert!(error.is_connect(), "{error:?}");
    receiver.go_down().await; // idempotent

    receiver.come_back().await;
    assert_eq!(receiver.url("/up"), url);
    assert_eq!(client.post(&url).send().await.unwrap().status(), 200);
    receiver.come_back().await; // idempotent
    assert_eq!(receiver.wait_for_delivered(2, WAIT).await.len(), 2);
}

#[tokio::test]
async fn a_delay_holds_the_answer_but_records_the_request_at_once() {
    let receiver = WebhookReceiver::start().await;
    receiver.set_delay(Duration::from_millis(500));
    let url = receiver.url("/slow");
    let started = Instant::now();
    let request = tokio::spawn(async move { client().post(url).send().await.unwrap().status() });
    receiver.wait_for_requests(1, WAIT).await;
    assert_eq!(request.await.unwrap(), 200);
    assert!(started.elapsed() >= Duration::from_millis(500));
}

#[tokio::test]
async fn verify_signature_accepts_the_reference_vector_and_nothing_else() {
    let receiver = WebhookReceiver::start().await;
    let send = |signature: &'static str, body: &'static str| {
        client()
            .post(receiver.url("/signed"))
            .header("webhook-id", MSG_ID)
            .header("webhook-timestamp", TIMESTAMP)
            .header("webhook-signature", signature)
            .body(body)
            .send()
    };
    send(SIGNATURE, PAYLOAD).await.unwrap();
    // Several signatures, space-separated (key rotation): one matching is enough.
    send("v1,AAAA v1a,xyz v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", PAYLOAD).await.unwrap();
    send(SIGNATURE, r#"{"test": 2432232315}"#).await.unwrap();

    let requests = receiver.wait_for_delivered(3, WAIT).await;
    assert!(verify_signature(SECRET, &requests[0]));
    assert!(verify_signature(SECRET, &requests[1]));
    assert!(!verify_signature(SECRET, &requests[2]), "tampered body");
    assert!(!verify_signature("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSx", &requests[0]));
    assert!(!verify_signature("not-base64-after-prefix", &requests[0]));

    let mut unsigned = requests[0].clone();
    unsigned.headers.remove("webhook-signature");
    assert!(!verify_signature(SECRET, &unsigned));
}

#[tokio::test]
#[should_panic(
    expected = "waited 200ms for 1 delivered webhook(s), but 1 request(s) arrived, 0 of them delivered (statuses in order: [500])"
)]
async fn waiting_panics_saying_what_arrived() {
    let receiver = WebhookReceiver::start().await;
    receiver.always(500);
    let _ = client().post(receiver.url("/")).send().await.unwrap();
    receiver.wait_for_delivered(1, Duration::from_millis(200)).await;
}
