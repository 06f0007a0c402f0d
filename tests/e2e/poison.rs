//! A message whose delivery panics is contained: the panic counts as a failed attempt, the
//! message is dead-lettered after MAX_ATTEMPTS with the panic in its headers, and the worker
//! keeps delivering everything else exactly once.

use crate::support;

use notify_testkit::rabbit;
use notify_types::{
    broker::{self, header_str, header_u32},
    headers, Channel, Envelope,
};
use notify_worker::outcome::{DeadReason, Settled};
use serde_json::{json, Value};
use std::{
    collections::HashSet,
    time::{Duration, Instant},
};
use support::{email, Harness, TEST_MAX_ATTEMPTS};

const GOOD: usize = 1_000;
const WAIT: Duration = Duration::from_secs(120);
const POST_CONCURRENCY: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_message_is_dead_lettered_and_1000_good_ones_are_delivered() {
    // The worker's test hook only fires with this set in its process (this test binary).
    std::env::set_var("NOTIFY_ALLOW_TEST_PANIC", "1");
    let h = Harness::start("poison").await;
    let mut worker = h.worker().await;
    let started = Instant::now();

    // Half of the good mails, then the poison one, then the other half, so the panic happens
    // while good deliveries are in flight around it.
    let mut ids: HashSet<String> = post_good(&h, 0..GOOD / 2).await;
    let poison = Envelope::direct(
        Channel::Email,
        "poison-test".into(),
        json!({
            "to": "poison@example.com",
            "subject": "poison",
            "body": "this delivery panics",
            "__notify_test_panic": "boom",
        }),
    );
    let ch = h.amqp.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    broker::publish_confirmed(
        &ch,
        &h.topology.exchange(),
        &notify_types::Topology::direct_key(Channel::Email),
        &poison.to_bytes(),
        broker::envelope_properties(&poison, 1),
        Duration::from_secs(5),
    )
    .await
    .expect("poison message published");
    ids.extend(post_good(&h, GOOD / 2..GOOD).await);
    assert_eq!(ids.len(), GOOD, "{GOOD} distinct ids accepted");
    let posted_in = started.elapsed();

    // One report per good mail, MAX_ATTEMPTS for the poison one.
    let n = GOOD + TEST_MAX_ATTEMPTS as usize;
    let reports = worker.next_reports(n, WAIT).await;
    let settled_in = started.elapsed();
    let (poisoned, good): (Vec<_>, Vec<_>) = reports.iter().partition(|r| r.id == Some(poison.id));

    let poison_path: Vec<_> = poisoned.iter().map(|r| (r.attempt, r.settled.clone())).collect();
    assert_eq!(poison_path.len(), TEST_MAX_ATTEMPTS as usize, "{poison_path:?}");
    for (i, (attempt, settled)) in poison_path.iter().enumerate() {
        assert_eq!(*attempt, i as u32 + 1, "{poison_path:?}");
        if i + 1 < poison_path.len() {
            assert!(matches!(settled, Settled::Retrying { .. }), "{poison_path:?}");
        } else {
            assert_eq!(*settled, Settled::DeadLettered { reason: DeadReason::MaxAttempts }, "{poison_path:?}");
        }
    }
    assert!(good.iter().all(|r| r.settled == Settled::Delivered && r.attempt == 1), "{good:?}");
    let good_ids: HashSet<String> = good.iter().map(|r| r.id.unwrap().to_string()).collect();
    assert_eq!(good_ids, ids, "every accepted mail settled once, as delivered on attempt 1");
    // Deliveries after the first panic prove the worker kept going; had a panic escaped and
    // ended the consumer session, its prefetched messages would have come back as redeliveries
    // (AlreadyDelivered reports) — there are none.
    let first_panic = reports.iter().position(|r| r.id == Some(poison.id)).unwrap();
    let delivered_after_panic = reports[first_panic..].iter().filter(|r| r.settled == Settled::Delivered).count();
    assert!(
        !reports.iter().any(|r| matches!(r.settled, Settled::AlreadyDelivered | Settled::Requeued)),
        "no redelivery, no requeue"
    );

    let mails = h.smtp.wait_for_mails(GOOD, WAIT).await;
    // Nothing more may come: the worker stops gracefully (its task did not die of the panic)
    // and has nothing left in flight.
    worker.stop().await.expect("the worker ran to the end without a restart");
    let mails_after_stop = h.smtp.mails();
    assert_eq!(mails_after_stop.len(), mails.len());
    let message_ids: HashSet<String> = mails_after_stop
        .iter()
        .map(|m| m.message_id.clone().unwrap().trim_matches(['<', '>']).trim_end_matches("@notify").to_string())
        .collect();
    assert_eq!(mails_after_stop.len(), GOOD, "raw mails: none lost, none twice");
    assert_eq!(message_ids, ids, "distinct Message-IDs are exactly the accepted ids");
    assert!(!mails_after_stop.iter().any(|m| m.subject == "poison"), "the poison mail was never sent");

    let dead = rabbit::drain(&h.amqp, &h.email_dead_queue(), 10).await;
    assert_eq!(dead.len(), 1, "only the poison message is dead");
    let (props, body) = &dead[0];
    let reason = header_str(props, headers::DEAD_REASON);
    let attempts = header_u32(props, headers::ATTEMPTS);
    let last_error = header_str(props, headers::LAST_ERROR).unwrap_or_default();
    assert_eq!(props.message_id().as_ref().unwrap().as_str(), poison.id.to_string());
    assert_eq!(reason.as_deref(), Some("max_attempts"));
    assert_eq!(attempts, Some(TEST_MAX_ATTEMPTS));
    assert!(last_error.contains("panicked") && last_error.contains("boom"), "{last_error}");
    assert_eq!(Envelope::from_bytes(body).unwrap().id, poison.id, "the original envelope is kept");
    for q in h.topology.queues(Channel::Email) {
        assert_eq!(h.count(&q).await, 0, "queue {q} ends empty");
    }

    println!(
        "poison: {GOOD} good mails posted in {posted_in:?}, all settled in {settled_in:?}; \
         raw mails {}, distinct Message-IDs {}; {delivered_after_panic} delivered after the first panic",
        mails_after_stop.len(),
        message_ids.len()
    );
    println!("poison: path {poison_path:?}");
    println!("poison: dead letter reason={reason:?} attempts={attempts:?} last_error={last_error:?}");
    h.cleanup().await;
}

/// Posts good mails `range` through the API, a few at a time; returns the accepted ids.
async fn post_good(h: &Harness, range: std::ops::Range<usize>) -> HashSet<String> {
    use futures_util::StreamExt;
    futures_util::stream::iter(range)
        .map(|i| async move {
            let res = h
                .api
                .post_json(
                    "/api/v1/notifications/email",
                    &email(&format!("user{i}@example.com"), &format!("mail {i}"), &format!("body {i}")),
                )
                .await;
            assert_eq!(res.status(), 202, "mail {i}");
            res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
        })
        .buffer_unordered(POST_CONCURRENCY)
        .collect()
        .await
}
