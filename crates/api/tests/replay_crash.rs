//! kill -9 of `notify-admin dead-letters replay` in the middle of replaying 1,000 dead letters
//! (issue 10, acceptance 4): after a rerun, every one is delivered exactly once or still listed
//! as dead — none lost, none sent twice. A real worker (in this process) indexes the dead
//! letters and delivers the replays to the test SMTP server.

use chrono::{SecondsFormat, Utc};
use lapin::types::{AMQPValue, LongString};
use notify_store::{DeadLetterFilter, Store};
use notify_testkit::{rabbit, smtp::SmtpServer};
use notify_types::{broker, headers, Channel, Envelope, Topology};
use notify_worker::{Worker, WorkerConfig};
use std::{
    collections::{HashMap, HashSet},
    process::Stdio,
    time::{Duration, Instant},
};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const N: usize = 1_000;
/// Replayed dead letters before the kill.
const KILL_AFTER: i64 = 300;
const WAIT: Duration = Duration::from_secs(120);
const ROUTES_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/routes.toml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_replay_then_rerun_loses_and_duplicates_nothing() {
    let prefix = rabbit::unique_prefix("dl-cli-kill");
    let schema = prefix.replace(['-', '.'], "_");
    let db_url = std::env::var("DATABASE_URL").unwrap_or_else(|_| notify_types::config::DEFAULT_DATABASE_URL.into());
    let smtp = SmtpServer::start().await;
    let settings: HashMap<String, String> = [
        ("RABBITMQ_URL", rabbit::rabbitmq_url()),
        ("NOTIFY_PREFIX", prefix.clone()),
        ("RETRY_SCHEDULE", "50ms".into()),
        ("SMTP_URL", smtp.url()),
        ("DATABASE_URL", db_url.clone()),
        ("DATABASE_SCHEMA", schema.clone()),
        ("ROUTES_FILE", ROUTES_FILE.into()),
        ("WORKER_CONCURRENCY", "32".into()),
        ("WORKER_CHANNELS", "email".into()),
        ("DEAD_LETTER_INDEX", "true".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let topology = notify_types::config::topology(&settings).unwrap();
    let conn = rabbit::connect().await;
    topology.declare(&conn).await.unwrap();
    let store = Store::connect_lazy(&db_url, &schema, 4).unwrap();

    // 1,000 dead letters as the worker makes them (headers of settle.rs), straight into the
    // dead queue; the worker's indexer takes them into PostgreSQL.
    let ids = dead_letters(&conn, &topology).await;
    let shutdown = CancellationToken::new();
    let worker = Worker::build(WorkerConfig::from_source(&settings).unwrap()).await.unwrap();
    let worker_task = tokio::spawn(worker.run(shutdown.clone()));
    wait_for(|| async { listed(&store).await == N as i64 }, "1,000 dead letters indexed").await;

    // The first replay, killed mid-way.
    let started = Instant::now();
    let mut cli = admin(&settings)
        .args(["--channel", "email", "--limit", "1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let replayed_at_kill = loop {
        let n = replayed(&store).await;
        if n >= KILL_AFTER {
            break n;
        }
        assert!(cli.try_wait().unwrap().is_none(), "the replay finished before the kill (only {n} replayed)");
        assert!(started.elapsed() < WAIT, "only {n} replayed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let pid = cli.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(10), cli.wait()).await.unwrap().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9));
    let after_kill = replayed(&store).await;

    // The rerun, to the end.
    let out = tokio::time::timeout(WAIT, admin(&settings).args(["--channel", "email", "--limit", "1000"]).output())
        .await
        .expect("the rerun finishes")
        .unwrap();
    let rerun = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "rerun: {rerun} {}", String::from_utf8_lossy(&out.stderr));

    // Everything replayed is delivered; what the killed run had taken stays listed.
    let still = listed(&store).await;
    wait_for(|| async { smtp.mails().len() as i64 >= N as i64 - still }, "the replays delivered").await;
    wait_for(
        || async { rabbit::message_count(&conn, &topology.queue(Channel::Email)).await == Some(0) },
        "queue drained",
    )
    .await;
    shutdown.cancel();
    worker_task.await.unwrap().unwrap();

    let mails = smtp.mails();
    let mailed: Vec<Uuid> = mails
        .iter()
        .map(|m| m.message_id.clone().unwrap().trim_matches(['<', '>']).trim_end_matches("@notify").parse().unwrap())
        .collect();
    let mailed_once: HashSet<Uuid> = mailed.iter().copied().collect();
    assert_eq!(mailed.len(), mailed_once.len(), "no notification mailed twice");
    let page = store.list_dead_letters(&DeadLetterFilter::default(), None, 500).await.unwrap();
    let still_dead: HashSet<Uuid> = page.items.iter().filter_map(|d| d.notification_id).collect();
    let lost: Vec<&Uuid> = ids.iter().filter(|id| !mailed_once.contains(id) && !still_dead.contains(id)).collect();
    assert!(lost.is_empty(), "{} neither delivered nor listed: {lost:?}", lost.len());
    assert!(mailed_once.iter().all(|id| ids.contains(id)));
    println!(
        "replay kill -9: {replayed_at_kill} replayed when killed ({after_kill} after), rerun: {}; \
         {} mails ({} distinct), {} still listed as dead, 0 lost",
        rerun.lines().next().unwrap_or(""),
        mailed.len(),
        mailed_once.len(),
        still_dead.len()
    );
    rabbit::delete_topology(&conn, &topology).await;
    store.drop_schema().await.unwrap();
    let _ = conn.close(200, "test done".into()).await;
}

fn admin(settings: &HashMap<String, String>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_notify-admin"));
    cmd.args(["dead-letters", "replay"]).envs(settings).env("RUST_LOG", "warn").stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

async fn dead_letters(conn: &lapin::Connection, topology: &Topology) -> HashSet<Uuid> {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let queue = topology.dead_queue(Channel::Email);
    let mut ids = HashSet::new();
    for i in 0..N {
        let payload =
            serde_json::json!({"to": format!("u{i}@example.com"), "subject": format!("mail {i}"), "body": "b"});
        let env = Envelope::direct(Channel::Email, format!("req-{i}"), payload);
        let mut props = broker::envelope_properties(&env, 1);
        let mut h = props.headers().clone().unwrap_or_default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        h.insert(headers::DEAD_REASON.into(), text("permanent"));
        h.insert(headers::ATTEMPTS.into(), AMQPValue::LongUInt(1));
        h.insert(headers::LAST_ERROR.into(), text("550 5.1.1 mailbox unavailable"));
        h.insert(headers::DEAD_AT.into(), text(&Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)));
        props = props.with_headers(h);
        broker::publish_confirmed(&ch, "", &queue, &env.to_bytes(), props, Duration::from_secs(10)).await.unwrap();
        ids.insert(env.id);
    }
    let _ = ch.close(200, "published".into()).await;
    ids
}

async fn listed(store: &Store) -> i64 {
    store.list_dead_letters(&DeadLetterFilter::default(), None, 1).await.map(|p| p.total).unwrap_or(-1)
}

async fn replayed(store: &Store) -> i64 {
    sqlx_count(store, "SELECT count(*) FROM dead_letters WHERE status = 'replayed'").await
}

async fn sqlx_count(store: &Store, sql: &str) -> i64 {
    use sqlx::Row;
    sqlx::query(sql).fetch_one(store.pool()).await.map(|r| r.get::<i64, _>(0)).unwrap_or(-1)
}

async fn wait_for<F: std::future::Future<Output = bool>>(mut probe: impl FnMut() -> F, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !probe().await {
        assert!(Instant::now() < deadline, "waited {WAIT:?} for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
