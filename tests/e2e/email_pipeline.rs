//! The core pipeline for e-mail: accepted by the API, delivered by the worker through a real
//! SMTP server, retried through the delay tiers and dead-lettered.

use crate::support;

use notify_testkit::{rabbit, smtp::Reply};
use notify_types::{broker::header_str, broker::header_u32, headers};
use notify_worker::outcome::{DeadReason, Settled};
use serde_json::Value;
use std::{collections::HashSet, time::Duration};
use support::{email, Harness, TEST_MAX_ATTEMPTS};

const WAIT: Duration = Duration::from_secs(30);

/// The README's example request.
fn readme_example() -> Value {
    serde_json::json!({
        "to": "user@example.com",
        "subject": "Welcome to notify",
        "body": "Your account is ready."
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_email_is_delivered_exactly_once_and_the_queue_ends_empty() {
    let h = Harness::start("deliver-once").await;
    let mut worker = h.worker().await;

    let res = h.api.post_json("/api/v1/notifications/email", &readme_example()).await;
    assert_eq!(res.status(), 202);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["message"], "request accepted and is being processed");
    assert!(body["received_at"].as_str().unwrap().ends_with('Z'), "{body}");
    let id = body["id"].as_str().unwrap().to_string();

    let reports = worker.next_reports(1, WAIT).await;
    assert_eq!(reports[0].settled, Settled::Delivered);
    assert_eq!(reports[0].id.unwrap().to_string(), id);
    let mails = h.smtp.wait_for_mails(1, WAIT).await;
    assert_eq!(mails[0].subject, "Welcome to notify");
    assert_eq!(mails[0].text_body.trim_end(), "Your account is ready.", "lettre ends the body with CRLF");
    assert_eq!(mails[0].to, vec!["user@example.com".to_string()]);
    assert!(
        mails[0].message_id.as_deref().unwrap_or("").contains(&id),
        "Message-ID derives from the id: {:?}",
        mails[0].message_id
    );

    // Once the worker's connection is closed, anything left unacked would be back in the queue.
    worker.stop().await.unwrap();
    assert_eq!(h.count(&h.email_queue()).await, 0, "nothing left or unacked");
    assert_eq!(h.smtp.mails().len(), 1, "exactly one mail");
    assert_eq!(h.smtp.attempts(), 1);
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_alternative_is_sent_with_the_text_body() {
    let h = Harness::start("html").await;
    let mut worker = h.worker().await;
    let mut req = email("a@example.com", "Hi", "plain words");
    req["html"] = "<p>rich words</p>".into();
    assert_eq!(h.api.post_json("/api/v1/notifications/email", &req).await.status(), 202);
    worker.next_reports(1, WAIT).await;
    let mail = &h.smtp.wait_for_mails(1, WAIT).await[0];
    assert_eq!(mail.text_body, "plain words");
    assert_eq!(mail.html_body.as_deref().map(str::trim), Some("<p>rich words</p>"));
    worker.stop().await.unwrap();
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_posts_become_hundred_distinct_mails() {
    let h = Harness::start("hundred").await;
    let mut worker = h.worker().await;

    let posts = (0..100).map(|i| {
        let api = &h.api;
        async move {
            let res = api
                .post_json(
                    "/api/v1/notifications/email",
                    &email(&format!("user{i}@example.com"), &format!("mail {i}"), &format!("body {i}")),
                )
                .await;
            assert_eq!(res.status(), 202);
            res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
        }
    });
    let ids: HashSet<String> = futures_util::future::join_all(posts).await.into_iter().collect();
    assert_eq!(ids.len(), 100, "100 distinct ids");

    let reports = worker.next_reports(100, WAIT).await;
    assert!(reports.iter().all(|r| r.settled == Settled::Delivered), "{reports:?}");
    h.smtp.wait_for_mails(100, WAIT).await;
    worker.stop().await.unwrap();

    let mails = h.smtp.mails();
    assert_eq!(mails.len(), 100, "none lost, none duplicated");
    let subjects: HashSet<&str> = mails.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(subjects.len(), 100);
    let mailed_ids: HashSet<String> = mails
        .iter()
        .map(|m| m.message_id.clone().unwrap().trim_matches(['<', '>']).trim_end_matches("@notify").to_string())
        .collect();
    assert_eq!(mailed_ids, ids, "every accepted id was mailed once");
    assert_eq!(h.count(&h.email_queue()).await, 0);
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_4xx_twice_is_delivered_on_attempt_three_through_the_delay_tiers() {
    let h = Harness::start("retry-then-ok").await;
    h.smtp.script(vec![Reply::transient(), Reply::transient()]);
    let mut worker = h.worker().await;
    assert_eq!(
        h.api.post_json("/api/v1/notifications/email", &email("r@example.com", "retry me", "b")).await.status(),
        202
    );

    let reports = worker.next_reports(3, WAIT).await;
    let settled: Vec<_> = reports.iter().map(|r| (r.attempt, r.settled.clone())).collect();
    assert!(matches!(settled[0], (1, Settled::Retrying { next_attempt: 2, .. })), "{settled:?}");
    assert!(matches!(settled[1], (2, Settled::Retrying { next_attempt: 3, .. })), "{settled:?}");
    assert_eq!(settled[2], (3, Settled::Delivered));
    assert_eq!(h.smtp.attempts(), 3);
    assert_eq!(h.smtp.wait_for_mails(1, WAIT).await.len(), 1);
    worker.stop().await.unwrap();
    assert_queues_empty(&h, false).await;
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_5xx_is_dead_lettered_on_attempt_one_with_the_reason() {
    let h = Harness::start("permanent").await;
    h.smtp.always(Reply::permanent());
    let mut worker = h.worker().await;
    let res = h.api.post_json("/api/v1/notifications/email", &email("gone@example.com", "s", "b")).await;
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();

    let reports = worker.next_reports(1, WAIT).await;
    assert_eq!(
        (reports[0].attempt, reports[0].settled.clone()),
        (1, Settled::DeadLettered { reason: DeadReason::Permanent })
    );
    worker.stop().await.unwrap();
    assert_eq!(h.smtp.attempts(), 1);
    assert!(h.smtp.mails().is_empty());

    let dead = rabbit::drain(&h.amqp, &h.email_dead_queue(), 10).await;
    assert_eq!(dead.len(), 1);
    let (props, body) = &dead[0];
    assert_eq!(props.message_id().as_ref().unwrap().as_str(), id);
    assert_eq!(header_str(props, headers::DEAD_REASON).as_deref(), Some("permanent"));
    assert_eq!(header_u32(props, headers::ATTEMPTS), Some(1));
    assert!(header_str(props, headers::LAST_ERROR).unwrap().contains("550"), "{props:?}");
    let env = notify_types::Envelope::from_bytes(body).expect("the original envelope is kept");
    assert_eq!(env.id.to_string(), id);
    assert_queues_empty(&h, true).await;
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_failing_smtp_makes_exactly_max_attempts_then_dead_letters() {
    let h = Harness::start("max-attempts").await;
    h.smtp.always(Reply::transient());
    let mut worker = h.worker().await;
    assert_eq!(
        h.api.post_json("/api/v1/notifications/email", &email("busy@example.com", "s", "b")).await.status(),
        202
    );

    let n = TEST_MAX_ATTEMPTS as usize;
    let reports = worker.next_reports(n, WAIT).await;
    let last = reports.last().unwrap();
    assert_eq!(
        (last.attempt, last.settled.clone()),
        (TEST_MAX_ATTEMPTS, Settled::DeadLettered { reason: DeadReason::MaxAttempts })
    );
    assert!(reports[..n - 1].iter().all(|r| matches!(r.settled, Settled::Retrying { .. })), "{reports:?}");
    worker.stop().await.unwrap();
    assert_eq!(h.smtp.attempts(), n, "exactly MAX_ATTEMPTS attempts");

    let dead = rabbit::drain(&h.amqp, &h.email_dead_queue(), 10).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(header_str(&dead[0].0, headers::DEAD_REASON).as_deref(), Some("max_attempts"));
    assert_eq!(header_u32(&dead[0].0, headers::ATTEMPTS), Some(TEST_MAX_ATTEMPTS));
    assert!(header_str(&dead[0].0, headers::LAST_ERROR).unwrap().contains("451"));
    assert_queues_empty(&h, true).await;
    h.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparseable_message_goes_to_the_dead_letter_queue_at_once() {
    let h = Harness::start("unparseable").await;
    let mut worker = h.worker().await;
    let ch = h.amqp.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    notify_types::broker::publish_confirmed(
        &ch,
        &h.topology.exchange(),
        "channel.email",
        b"{not an envelope",
        lapin::BasicProperties::default().with_message_id("garbage-1".into()),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let reports = worker.next_reports(1, WAIT).await;
    assert_eq!(reports[0].settled, Settled::DeadLettered { reason: DeadReason::Unparseable });
    worker.stop().await.unwrap();
    let dead = rabbit::drain(&h.amqp, &h.email_dead_queue(), 10).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1, b"{not an envelope");
    assert_eq!(header_str(&dead[0].0, headers::DEAD_REASON).as_deref(), Some("unparseable"));
    assert_eq!(h.smtp.attempts(), 0);
    h.cleanup().await;
}

/// The channel queue and every retry tier are empty; the dead-letter queue too when `dead_drained`.
async fn assert_queues_empty(h: &Harness, dead_drained: bool) {
    let ch = notify_types::Channel::Email;
    assert_eq!(h.count(&h.topology.queue(ch)).await, 0, "channel queue empty");
    for q in h.topology.retry_queues(ch) {
        assert_eq!(h.count(&q).await, 0, "retry queue {q} empty");
    }
    if dead_drained {
        assert_eq!(h.count(&h.topology.dead_queue(ch)).await, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_closing_pooled_connections_costs_no_attempt() {
    // One pooled connection, which the relay closes after every mail: each next mail finds it
    // dead at MAIL FROM, where nothing of the mail has been sent, and goes out on a new one.
    let h = Harness::start_with("relay-closes", |s| {
        s.insert("SMTP_POOL_SIZE".into(), "1".into());
    })
    .await;
    h.smtp.close_after(1);
    let mut worker = h.worker().await;
    const N: usize = 5;
    for i in 0..N {
        let res = h.api.post_json("/api/v1/notifications/email", &email("u@example.com", &format!("m{i}"), "b")).await;
        assert_eq!(res.status(), 202);
        // One at a time, so each mail meets the connection the previous one left in the pool.
        let reports = worker.next_reports(1, WAIT).await;
        assert_eq!((reports[0].attempt, &reports[0].settled), (1, &Settled::Delivered), "mail {i}");
    }
    worker.stop().await.unwrap();
    println!("{N} mails, {} SMTP connections, {} attempts", h.smtp.connections(), h.smtp.attempts());
    assert_eq!(h.smtp.mails().len(), N);
    assert_eq!(h.smtp.attempts(), N, "no mail was tried twice");
    assert_eq!(h.smtp.connections(), N, "a new connection for each mail");
    h.cleanup().await;
}
