//! The API carries a W3C `traceparent` in the AMQP headers of what it publishes: a child of the
//! caller's trace context when the request had one, a new trace otherwise.

mod support;

use notify_testkit::rabbit;
use notify_types::{broker, headers, telemetry::TraceParent, Channel};
use support::SpawnedApi;

#[tokio::test]
async fn published_messages_carry_the_request_trace_context() {
    let api = SpawnedApi::start("api-trace").await;
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = serde_json::json!({"to": "user@example.com", "subject": "trace", "body": "b"});
    let url = api.url("/api/v1/notifications/email");
    let r = api.client.post(&url).header("traceparent", caller).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = api.client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 202);

    let conn = rabbit::connect().await;
    let settings: std::collections::HashMap<String, String> =
        [("NOTIFY_PREFIX".to_string(), api.prefix.clone())].into();
    let topology = notify_types::config::topology(&settings).unwrap();
    rabbit::wait_for_count(&conn, &topology.queue(Channel::Email), 2, std::time::Duration::from_secs(10)).await;
    let messages = rabbit::drain(&conn, &topology.queue(Channel::Email), 10).await;
    let _ = conn.close(200, "done".into()).await;
    api.stop().await;

    let contexts: Vec<TraceParent> = messages
        .iter()
        .map(|(props, _)| {
            let header = broker::header_str(props, headers::TRACEPARENT).expect("a traceparent header");
            TraceParent::parse(&header).unwrap_or_else(|| panic!("a valid traceparent: {header}"))
        })
        .collect();
    assert_eq!(contexts.len(), 2);
    let parent = TraceParent::parse(caller).unwrap();
    let joined = contexts.iter().filter(|c| c.trace_id == parent.trace_id).collect::<Vec<_>>();
    assert_eq!(joined.len(), 1, "the request with a traceparent joins the caller's trace: {contexts:?}");
    assert_ne!(joined[0].span_id, parent.span_id, "as a child span of the caller's");
    assert!(contexts.iter().any(|c| c.trace_id != parent.trace_id), "the other request starts its own trace");
}
