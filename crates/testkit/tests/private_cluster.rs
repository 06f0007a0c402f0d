//! The private 3-node cluster through what the failover tests need: all nodes running members,
//! a quorum queue replicated on all three, its leader's node killed (kill -9), a new leader
//! elected elsewhere and confirmed publishes through a survivor, the node restarted and back in.
//! Prints how long each step took (`--nocapture` to see it).

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties, Connection,
};
use notify_testkit::{
    private_cluster::{PrivateCluster, QuorumQueue},
    rabbit::{connect_to, message_count, unique_prefix},
};
use std::time::{Duration, Instant};

const QUEUE: &str = "failover";
/// Measured: 0.5–1.0 s after the kill, most of it the CLI that asks (~0.5–2 s per call).
const ELECTION_TIMEOUT: Duration = Duration::from_secs(30);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Steps and how long they took, printed at the end.
struct Timings(Vec<(&'static str, Duration)>);

impl Timings {
    fn print(&self) {
        for (step, took) in &self.0 {
            println!("private cluster timing: {step:<34} {took:>8.2?}");
        }
    }
}

async fn publish_confirmed(conn: &Connection, body: &[u8]) {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    let confirm = ch
        .basic_publish(
            "".into(),
            QUEUE.into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish frame sent");
    let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .unwrap_or_else(|_| panic!("publish not confirmed within {CONFIRM_TIMEOUT:?}"))
        .expect("confirm");
    assert!(confirm.is_ack(), "publish nacked: {confirm:?}");
    assert!(confirm.take_message().is_none(), "publish returned unroutable");
    let _ = ch.close(200, "published".into()).await;
}

#[tokio::test]
async fn quorum_queue_survives_killing_its_leaders_node() {
    let mut t = Timings(Vec::new());
    let started = Instant::now();
    let cluster = PrivateCluster::shared().await.expect("private cluster starts");
    let startup = started.elapsed();
    let _exclusive = cluster.lock().await.expect("cluster healthy");
    let boot = cluster.start_timings();
    t.0.push(("start (all nodes accept AMQP)", boot.boot));
    t.0.push(("join (all running members)", boot.join));
    t.0.push(("shared() in this test", startup));

    // Three distinct private nodes, all running members of one cluster.
    assert_eq!(cluster.size(), 3);
    let names = cluster.node_names();
    for (i, name) in names.iter().enumerate() {
        assert!(name.starts_with("ntc") && name.ends_with(&format!("-{i}@localhost")), "{name}");
        assert_ne!(cluster.amqp_port(i), 5672);
    }
    let mut running = cluster.running_nodes().await.expect("cluster_status");
    running.sort();
    assert_eq!(running, names, "running members");
    assert_eq!(cluster.rabbitmq_url_list(), cluster.amqp_urls().join(","));

    // A quorum queue in a vhost of this test's own, declared through node 0: 3 members.
    let vhost = unique_prefix("private_cluster");
    cluster.add_vhost(&vhost).await.expect("add vhost");
    let conn = connect_to(&cluster.vhost_url(0, &vhost)).await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    ch.queue_declare(QUEUE.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
        .await
        .expect("declare quorum queue");
    publish_confirmed(&conn, b"before the kill").await;
    let queue = cluster.quorum_queue(&vhost, QUEUE).await.expect("queue status");
    let mut members = queue.members.clone();
    members.sort();
    assert_eq!(members, names, "one member on every node: {queue:?}");
    let leader = queue.leader.clone().expect("a leader");
    let leader_index = cluster.node_index(&leader).expect("leader is one of our nodes");
    println!("private cluster: queue declared through {}, leader on {leader}", cluster.node_name(0));
    drop(conn);

    // kill -9 the leader's node: another node leads within the bound.
    let killed_at = Instant::now();
    cluster.kill(leader_index).await.expect("kill -9 the leader's node");
    t.0.push(("kill -9 (port refuses)", killed_at.elapsed()));
    assert!(!cluster.is_up(leader_index));
    let new_leader = loop {
        match cluster.quorum_queue(&vhost, QUEUE).await {
            Ok(QuorumQueue { leader: Some(node), .. }) if node != leader => break node,
            seen => assert!(
                killed_at.elapsed() < ELECTION_TIMEOUT,
                "no new leader {ELECTION_TIMEOUT:?} after killing {leader}; last seen {seen:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    t.0.push(("kill -> new leader seen", killed_at.elapsed()));
    println!("private cluster: new leader on {new_leader}");
    assert_ne!(new_leader, leader);

    // A confirmed publish through a surviving node (one that does not lead, so the broker has
    // to forward it), and both messages are there.
    let survivor =
        (0..cluster.size()).find(|i| *i != leader_index && cluster.node_name(*i) != new_leader).expect("a third node");
    let publishing = Instant::now();
    let conn = connect_to(&cluster.vhost_url(survivor, &vhost)).await;
    publish_confirmed(&conn, b"after the kill").await;
    t.0.push(("confirmed publish via survivor", publishing.elapsed()));
    assert_eq!(message_count(&conn, QUEUE).await, Some(2));
    t.0.push(("kill -> publish confirmed", killed_at.elapsed()));

    // Restart: the node rejoins by itself, and its member comes back online.
    let restarting = Instant::now();
    cluster.restart(leader_index).await.expect("restart");
    t.0.push(("restart -> running member", restarting.elapsed()));
    assert!(cluster.is_up(leader_index));
    let mut running = cluster.running_nodes().await.expect("cluster_status");
    running.sort();
    assert_eq!(running, names, "all running after the restart");
    let online = loop {
        let queue = cluster.quorum_queue(&vhost, QUEUE).await.expect("queue status");
        if queue.online.len() == 3 {
            break queue;
        }
        assert!(restarting.elapsed() < Duration::from_secs(60), "member not back online: {queue:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    t.0.push(("restart -> member online", restarting.elapsed()));
    println!("private cluster: after the restart {online:?}");
    let conn = connect_to(&cluster.vhost_url(leader_index, &vhost)).await;
    assert_eq!(message_count(&conn, QUEUE).await, Some(2), "messages through the restarted node");
    drop(conn);

    cluster.delete_vhost(&vhost).await.expect("delete vhost");
    t.print();
}

/// Every test of the binary gets the same cluster, started once, and a vhost made through any
/// node is served by all of them.
#[tokio::test]
async fn the_shared_cluster_is_started_once_per_binary() {
    let a = PrivateCluster::shared().await.expect("private cluster starts");
    let b = PrivateCluster::shared().await.expect("private cluster starts");
    assert!(std::ptr::eq(a, b));
    // All nodes up while we look: the other test kills one under this lock.
    let _exclusive = a.lock().await.expect("cluster healthy");
    let vhost = unique_prefix("shared_once");
    a.add_vhost(&vhost).await.expect("add vhost");
    for i in 0..a.size() {
        let conn = connect_to(&a.vhost_url(i, &vhost)).await;
        let _ = conn.close(200, "ok".into()).await;
    }
    a.delete_vhost(&vhost).await.expect("delete vhost");
}
