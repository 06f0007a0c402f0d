//! SIGTERM to the worker process while deliveries are in flight: they complete and are acked,
//! prefetched-but-unstarted messages go back to the queue, nothing is lost or sent twice.

use notify_testkit::{rabbit, smtp::SmtpServer};
use notify_types::{broker, Channel, EmailMessage, Envelope, QueueType, Topology};
use std::{
    collections::HashSet,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_deliveries_and_loses_nothing() {
    let prefix = rabbit::unique_prefix("sigterm");
    let smtp = SmtpServer::start().await;
    // Each mail takes 1.5 s to be accepted, so deliveries are surely in flight at SIGTERM.
    smtp.set_delay(Duration::from_millis(1500));
    let topology = Topology::new(&prefix, QueueType::Quorum, vec![Duration::from_millis(50)]);
    let conn = rabbit::connect().await;
    topology.declare(&conn).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let mut ids = HashSet::new();
    for i in 0..10 {
        let msg =
            EmailMessage { to: format!("u{i}@example.com"), subject: format!("s{i}"), body: "b".into(), html: None };
        let env = Envelope::direct(Channel::Email, format!("req-{i}"), serde_json::to_value(&msg).unwrap());
        ids.insert(env.id.to_string());
        broker::publish_confirmed(
            &ch,
            &topology.exchange(),
            &Topology::direct_key(Channel::Email),
            &env.to_bytes(),
            broker::envelope_properties(&env, 1),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    }

    let db_url = notify_testkit::db::database_url();
    let schema = prefix.replace('-', "_");
    let child = Command::new(env!("CARGO_BIN_EXE_notify-worker"))
        .env("RABBITMQ_URL", rabbit::rabbitmq_url())
        .env("NOTIFY_PREFIX", &prefix)
        .env("RETRY_SCHEDULE", "50ms")
        .env("SMTP_URL", smtp.url())
        .env("WORKER_CONCURRENCY", "4")
        .env("WORKER_PREFETCH", "10")
        .env("WORKER_CHANNELS", "email")
        .env("WORKER_HTTP_HOST", "127.0.0.1")
        .env("WORKER_HTTP_PORT", "0")
        .env("RUST_LOG", "info")
        .env("DATABASE_URL", &db_url)
        .env("DATABASE_SCHEMA", &schema)
        .env("ROUTES_FILE", concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/routes.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("worker binary runs");

    // Wait (bounded) until 4 deliveries are in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while smtp.in_progress() < 4 {
        assert!(Instant::now() < deadline, "deliveries never got in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let in_flight = smtp.in_progress();
    let sent = Instant::now();
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let took = sent.elapsed();
    let logs = format!("{}{}", String::from_utf8_lossy(&exit.stdout), String::from_utf8_lossy(&exit.stderr));
    assert!(exit.status.success(), "clean exit, got {:?}\n{logs}", exit.status);
    assert!(took < Duration::from_secs(30), "exited in {took:?}");

    let mails = smtp.mails();
    println!("SIGTERM with {in_flight} in flight: {} mails completed, exit after {took:?}", mails.len());
    assert_eq!(mails.len(), in_flight, "every in-flight delivery completed");
    let mailed: HashSet<String> = mails
        .iter()
        .map(|m| m.message_id.clone().unwrap().trim_matches(['<', '>']).trim_end_matches("@notify").to_string())
        .collect();
    // The rest went back to the queue (the process is gone, so nothing can be unacked).
    let left = rabbit::drain(&conn, &topology.queue(Channel::Email), 100).await;
    let queued: HashSet<String> = left.iter().map(|(p, _)| p.message_id().as_ref().unwrap().to_string()).collect();
    assert_eq!(mailed.len() + queued.len(), 10, "mailed {mailed:?} queued {queued:?}");
    assert!(mailed.is_disjoint(&queued), "a mailed message was not acked");
    assert_eq!(mailed.union(&queued).cloned().collect::<HashSet<_>>(), ids, "nothing lost");
    assert!(logs.contains("worker stopped"), "{logs}");
    rabbit::delete_topology(&conn, &topology).await;
    notify_store::Store::connect_lazy(&db_url, &schema, 1).unwrap().drop_schema().await.unwrap();
}
