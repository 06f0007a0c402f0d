//! A private RabbitMQ node through the faults the fault tests need: memory alarm, crash,
//! restart with data kept. Prints how long each step took (`--nocapture` to see it).

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties, Connection, ConnectionProperties,
};
use notify_testkit::{
    private_broker::PrivateBroker,
    rabbit::{connect_to, drain, message_count, wait_for_count},
};
use std::time::{Duration, Instant};

const QUEUE: &str = "fault-test";

/// Steps and how long they took, printed at the end.
struct Timings(Vec<(&'static str, Duration)>, Instant);

impl Timings {
    fn lap(&mut self, step: &'static str) {
        self.0.push((step, self.1.elapsed()));
        self.1 = Instant::now();
    }
}

async fn publish_persistent(ch: &lapin::Channel, body: &[u8]) -> lapin::PublisherConfirm {
    ch.basic_publish(
        "".into(),
        QUEUE.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .expect("publish frame sent")
}

#[tokio::test]
async fn private_node_survives_memory_alarm_crash_and_restart() {
    let mut t = Timings(Vec::new(), Instant::now());
    let broker = PrivateBroker::start().await.expect("private node starts");
    t.lap("start");
    assert_ne!(broker.amqp_port(), 5672);
    assert_eq!(broker.url(), format!("amqp://guest:guest@127.0.0.1:{}/%2f", broker.amqp_port()));

    // Publish with confirms and get the message back.
    let conn = connect_to(&broker.url()).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    ch.queue_declare(QUEUE.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args).await.unwrap();
    let confirm = publish_persistent(&ch, b"hello").await.await.unwrap();
    assert!(confirm.is_ack());
    let got = drain(&conn, QUEUE, 10).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, b"hello");
    t.lap("publish + get");

    // Memory alarm: the broker blocks publishers; nothing is confirmed while it is on.
    broker.set_memory_alarm(true).await.expect("alarm on");
    let pending = publish_persistent(&ch, b"during the alarm").await;
    let within_2s = tokio::time::timeout(Duration::from_secs(2), pending).await;
    assert!(
        within_2s.is_err() || conn.status().blocked(),
        "a publish was confirmed during a memory alarm and the connection is not blocked"
    );
    assert!(conn.status().blocked(), "connection.blocked was received");
    t.lap("alarm on + 2 s unconfirmed");
    broker.set_memory_alarm(false).await.expect("alarm off");
    // The blocked publish now goes through: once the broker took it, it counts one message.
    let confirm = publish_persistent(&ch, b"after the alarm").await;
    tokio::time::timeout(Duration::from_secs(10), confirm).await.expect("confirmed after the alarm cleared").unwrap();
    assert!(!conn.status().blocked());
    assert_eq!(message_count(&conn, QUEUE).await, Some(2));
    t.lap("alarm off + confirms");

    // Crash: the port refuses, a connection fails.
    broker.kill().await.expect("kill -9");
    t.lap("kill");
    let refused = Connection::connect(&broker.url(), ConnectionProperties::default()).await;
    assert!(refused.is_err(), "connected to a killed node");

    // Restart with the data kept: both persistent messages of the quorum queue are back.
    broker.restart().await.expect("restart");
    t.lap("restart");
    let conn = connect_to(&broker.url()).await;
    wait_for_count(&conn, QUEUE, 2, Duration::from_secs(30)).await;
    t.lap("queue recovered");

    // And a graceful stop.
    broker.stop().await.expect("stop");
    t.lap("stop");
    drop(broker);
    t.lap("drop (cleanup)");

    for (step, took) in &t.0 {
        println!("private broker timing: {step:<28} {took:>8.2?}");
    }
}
