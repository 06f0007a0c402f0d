//! The RabbitMQ helpers against the machine's broker (`RABBITMQ_URL`).

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties,
};
use notify_testkit::rabbit::{connect, delete_topology, drain, message_count, unique_prefix, wait_for_count};
use notify_types::{broker::header_str, Channel, QueueType, Topology};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn counts_drains_and_deletes_a_topology() {
    let conn = connect().await;
    let topology =
        Topology::new(unique_prefix("counts_drains_and_deletes"), QueueType::Quorum, vec![Duration::from_millis(50)]);
    let dead = topology.dead_queue(Channel::Email);
    assert_eq!(message_count(&conn, &dead).await, None, "not declared yet");
    topology.declare(&conn).await.expect("declare");
    assert_eq!(message_count(&conn, &dead).await, Some(0));

    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..3 {
        let mut headers = FieldTable::default();
        headers.insert("x-reason".into(), AMQPValue::LongString(format!("r{i}").into()));
        ch.basic_publish(
            "".into(),
            dead.as_str().into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    wait_for_count(&conn, &dead, 3, WAIT).await;

    let taken = drain(&conn, &dead, 2).await;
    let bodies: Vec<&[u8]> = taken.iter().map(|(_, body)| body.as_slice()).collect();
    assert_eq!(bodies, [b"m0", b"m1"]);
    assert_eq!(header_str(&taken[0].0, "x-reason").as_deref(), Some("r0"));
    wait_for_count(&conn, &dead, 1, WAIT).await;
    assert_eq!(drain(&conn, &dead, 10).await.len(), 1, "stops when empty");

    delete_topology(&conn, &topology).await;
    for queue in Channel::ALL.into_iter().flat_map(|c| topology.queues(c)).chain([topology.probe_queue()]) {
        assert_eq!(message_count(&conn, &queue).await, None, "{queue}");
    }
    // Deleting again (e.g. cleanup after a half-failed test) is fine.
    delete_topology(&conn, &topology).await;
    assert!(drain(&conn, &dead, 1).await.is_empty(), "missing queue");
}

#[tokio::test]
#[should_panic(expected = "last saw no such queue")]
async fn waiting_on_a_missing_queue_says_so() {
    let conn = connect().await;
    let queue = format!("{}.nothing", unique_prefix("missing"));
    wait_for_count(&conn, &queue, 1, Duration::from_millis(100)).await;
}
