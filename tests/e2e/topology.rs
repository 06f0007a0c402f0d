//! Both binaries declare the topology at start: twice is harmless, and a queue that exists
//! with other arguments stops startup with its name.

use crate::support;

use lapin::{
    options::QueueDeclareOptions,
    types::{AMQPValue, FieldTable},
};
use notify_testkit::{rabbit, smtp::SmtpServer};
use notify_types::Channel;
use support::{settings, TestApi, TestWorker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_worker_both_declaring_is_idempotent() {
    let prefix = rabbit::unique_prefix("declare-twice");
    let smtp = SmtpServer::start().await;
    let s = settings(&prefix, &rabbit::rabbitmq_url(), &smtp.url());
    let api = TestApi::start(&s).await.expect("first declaration");
    let api2 = TestApi::start(&s).await.expect("second declaration by another API");
    let mut worker = TestWorker::start(&s).await.unwrap();
    // The worker declared too and consumes: a message flows end to end.
    let res = api2.post_json("/api/v1/notifications/email", &support::email("x@example.com", "s", "b")).await;
    assert_eq!(res.status(), 202);
    worker.next_reports(1, std::time::Duration::from_secs(30)).await;
    worker.stop().await.unwrap();
    api.stop().await;
    api2.stop().await;
    let conn = rabbit::connect().await;
    let topology = notify_types::config::topology(&s).unwrap();
    for c in Channel::ALL {
        for q in topology.queues(c) {
            assert_eq!(rabbit::message_count(&conn, &q).await, Some(0), "{q}");
        }
    }
    rabbit::delete_topology(&conn, &topology).await;
    support::drop_schema(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_with_other_arguments_stops_startup_naming_it() {
    let prefix = rabbit::unique_prefix("mismatch");
    let smtp = SmtpServer::start().await;
    let s = settings(&prefix, &rabbit::rabbitmq_url(), &smtp.url());
    let topology = notify_types::config::topology(&s).unwrap();
    let queue = topology.queue(Channel::Email);
    // Someone created the e-mail queue as a classic queue by hand.
    let conn = rabbit::connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("classic".into()));
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
        .await
        .unwrap();

    let err = TestApi::start(&s).await.err().expect("the API refuses to start").to_string();
    assert!(err.contains(&format!("`{queue}`")), "API error names the queue: {err}");
    assert!(err.contains("inequivalent arg"), "and what differs: {err}");

    let worker = TestWorker::start(&s).await.unwrap();
    let err = worker.stop_result().await.expect_err("the worker stops").to_string();
    assert!(err.contains(&format!("`{queue}`")), "worker error names the queue: {err}");

    rabbit::delete_topology(&conn, &topology).await;
    support::drop_schema(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_declared_before_leader_placement_keep_working() {
    let prefix = rabbit::unique_prefix("pre-locator");
    let smtp = SmtpServer::start().await;
    let s = settings(&prefix, &rabbit::rabbitmq_url(), &smtp.url());
    let topology = notify_types::config::topology(&s).unwrap();
    // The e-mail queue as an earlier notify declared it: quorum, same arguments, but no
    // `x-queue-leader-locator` (RabbitMQ calls that inequivalent).
    let conn = rabbit::connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = topology.queue_args(Channel::Email);
    let before = args.inner().len();
    let mut old = FieldTable::default();
    for (k, v) in args.inner().iter().filter(|(k, _)| k.as_str() != "x-queue-leader-locator") {
        old.insert(k.clone(), v.clone());
    }
    assert_eq!(old.inner().len() + 1, before, "this notify sets a leader locator");
    args = old;
    let queue = topology.queue(Channel::Email);
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
        .await
        .unwrap();

    let api = TestApi::start(&s).await.expect("the API starts on the older queue");
    let mut worker = TestWorker::start(&s).await.unwrap();
    let res = api.post_json("/api/v1/notifications/email", &support::email("x@example.com", "s", "b")).await;
    assert_eq!(res.status(), 202);
    worker.next_reports(1, std::time::Duration::from_secs(30)).await;
    worker.stop().await.unwrap();
    api.stop().await;
    rabbit::delete_topology(&conn, &topology).await;
    support::drop_schema(&s).await;
}
