//! Three `notify-worker` processes on a private 3-node RabbitMQ cluster (issue 13), each
//! connected first to another node (`RABBITMQ_URL` lists all three, `RABBITMQ_URL_ORDER=listed`),
//! drain 2,000 in-app notifications; one is killed with kill -9 and one stopped with SIGTERM
//! mid-drain. Nothing may be lost and nothing delivered twice: every notification has exactly
//! one inbox row in Postgres, and the workers' logs show one `Delivered` settle per id at most.
//!
//! This binary starts its own cluster (`PrivateCluster::shared` is per test binary, ~20 s).

use futures_util::{stream, StreamExt};
use notify_testkit::{private_cluster::PrivateCluster, rabbit, smtp::SmtpServer};
use notify_types::{broker, Channel, Envelope, InAppMessage, QueueType, Topology};
use std::{
    collections::{HashMap, HashSet},
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};
use tokio::process::{Child, Command};
use uuid::Uuid;

const ROUTES_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/routes.toml");
const TOTAL: usize = 2000;
/// Per worker: slow enough that the drain lasts a few seconds, so the faults hit it mid-way.
const CONCURRENCY: &str = "4";
/// kill -9 the first worker once this many inbox rows exist, SIGTERM the second at the next.
const KILL_AT: i64 = 500;
const TERM_AT: i64 = 1000;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
const SIGKILL: i32 = 9;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_one_killed_one_stopped_lose_and_duplicate_nothing() {
    let cluster = PrivateCluster::shared().await.expect("private cluster starts");
    let _exclusive = cluster.lock().await.expect("cluster healthy");
    let prefix = rabbit::unique_prefix("cluster-workers");
    cluster.add_vhost(&prefix).await.expect("vhost added");
    let db_url = notify_testkit::db::database_url();
    let schema = notify_testkit::db::schema_of(&prefix);
    let store = notify_store::Store::connect_lazy(&db_url, &schema, 4).unwrap();
    let mut logs = Vec::new();
    let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(drain(
        cluster, &prefix, &db_url, &store, &mut logs,
    )))
    .await;
    // Cleanup, also after a failure: vhost (with its queues), schema, log files.
    if let Err(e) = cluster.delete_vhost(&prefix).await {
        eprintln!("cleanup: deleting vhost {prefix} failed: {e:#}");
    }
    if let Err(e) = store.drop_schema().await {
        eprintln!("cleanup: dropping schema {schema} failed: {e}");
    }
    for log in &logs {
        let _ = std::fs::remove_file(log);
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn drain(
    cluster: &PrivateCluster,
    prefix: &str,
    db_url: &str,
    store: &notify_store::Store,
    logs: &mut Vec<PathBuf>,
) {
    let started = Instant::now();
    // The topology the workers declare (same settings), declared and filled through node 0.
    let topology = Topology::new(prefix, QueueType::Quorum, vec![Duration::from_millis(50)]);
    let conn = rabbit::connect_to(&cluster.vhost_url(0, prefix)).await;
    topology.declare(&conn).await.expect("topology declared");
    store.migrate().await.expect("schema migrated");
    let envs: Vec<Envelope> = (0..TOTAL).map(in_app).collect();
    let expected: HashSet<Uuid> = envs.iter().map(|e| e.id).collect();
    publish(&conn, &topology, &envs).await;
    let queue = topology.queue(Channel::InApp);
    rabbit::wait_for_count(&conn, &queue, TOTAL as u32, Duration::from_secs(30)).await;
    println!("published {TOTAL} in-app notifications (confirmed) in {:.2?}", started.elapsed());

    let smtp = SmtpServer::start().await;
    let n = cluster.size();
    let mut workers: Vec<WorkerProcess> = (0..n)
        .map(|first| {
            // Worker `first` connects to node `first`, then to the others in turn.
            let urls: Vec<String> = (0..n).map(|k| cluster.vhost_url((first + k) % n, prefix)).collect();
            let log = std::env::temp_dir().join(format!("{prefix}-worker-{first}.log"));
            logs.push(log.clone());
            WorkerProcess::spawn(&urls.join(","), prefix, db_url, &smtp.url(), log)
        })
        .collect();
    let t0 = Instant::now();

    // kill -9 worker 0 mid-drain.
    let at_kill = wait_for_rows(store, KILL_AT, &mut workers).await;
    let status = workers[0].kill_9().await;
    assert_eq!(status.signal(), Some(SIGKILL), "worker 0 died of SIGKILL: {status:?}");
    println!("kill -9 worker 0 at {:.2?} with {at_kill} inbox rows", t0.elapsed());

    // SIGTERM worker 1 mid-drain: it finishes what it holds and exits cleanly.
    let at_term = wait_for_rows(store, TERM_AT, &mut workers[1..]).await;
    let (status, took) = workers[1].sigterm(Duration::from_secs(30)).await;
    let stopped_logs = workers[1].logs();
    assert!(status.success(), "worker 1 exits cleanly on SIGTERM, got {status:?}\n{}", tail(&stopped_logs));
    assert!(stopped_logs.contains("worker stopped"), "{}", tail(&stopped_logs));
    println!("SIGTERM worker 1 at {:.2?} with {at_term} inbox rows; it exited in {took:.2?}", t0.elapsed());

    // Worker 2 drains the rest, including what the killed worker held.
    let all = wait_for_rows(store, TOTAL as i64, &mut workers[2..]).await;
    let drained = t0.elapsed();
    rabbit::wait_for_count(&conn, &queue, 0, Duration::from_secs(30)).await;
    let (status, _) = workers[2].sigterm(Duration::from_secs(30)).await;
    assert!(status.success(), "worker 2 exits cleanly on SIGTERM, got {status:?}\n{}", tail(&workers[2].logs()));
    // No worker holds a message now: nothing unacked, nothing retried or dead-lettered.
    let counts = (
        rabbit::message_count(&conn, &queue).await,
        rabbit::message_count(&conn, &topology.retry_queues(Channel::InApp)[0]).await,
        rabbit::message_count(&conn, &topology.dead_queue(Channel::InApp)).await,
    );
    assert_eq!(counts, (Some(0), Some(0), Some(0)), "(queue, retry, dead) after the last worker stopped");
    let _ = conn.close(200, "test done".into()).await;

    // Postgres: one inbox row per notification, for exactly the notifications published.
    let rows: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT notification_id, count(*) FROM inbox_items GROUP BY notification_id")
            .fetch_all(store.pool())
            .await
            .expect("inbox rows counted");
    let ids: HashSet<Uuid> = rows.iter().map(|(id, _)| *id).collect();
    let second_rows: i64 = rows.iter().map(|(_, n)| n - 1).sum();
    let lost = expected.difference(&ids).count();
    let unknown = ids.difference(&expected).count();
    let delivered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM deliveries WHERE channel = 'in_app' AND status = 'delivered' AND attempts = 1",
    )
    .fetch_one(store.pool())
    .await
    .expect("deliveries counted");
    // The workers' logs: how each delivery was settled, per notification id.
    let mut settles: HashMap<String, HashMap<String, usize>> = HashMap::new();
    for w in &workers {
        for (id, settled) in settled_lines(&w.logs()) {
            *settles.entry(id).or_default().entry(settled).or_default() += 1;
        }
    }
    let delivered_twice: Vec<&String> =
        settles.iter().filter(|(_, s)| s.get("Delivered").copied().unwrap_or(0) > 1).map(|(id, _)| id).collect();
    let mut by_outcome: HashMap<&str, usize> = HashMap::new();
    for s in settles.values() {
        for (outcome, n) in s {
            *by_outcome.entry(outcome.as_str()).or_default() += n;
        }
    }
    println!(
        "{TOTAL} published; {all} inbox rows after {drained:.2?}: {} notifications, {lost} lost, {second_rows} \
         second rows, {unknown} unknown; {delivered} delivered records; settles in the logs: {by_outcome:?}, \
         {} ids settled Delivered twice; test took {:.2?}",
        ids.len(),
        delivered_twice.len(),
        started.elapsed()
    );
    assert_eq!(lost, 0, "notifications without an inbox row");
    assert_eq!(second_rows, 0, "second inbox rows");
    assert_eq!(unknown, 0, "inbox rows of notifications never published");
    assert_eq!(delivered, TOTAL as i64, "one delivered record (first attempt) per notification");
    assert!(
        delivered_twice.is_empty(),
        "ids settled Delivered twice: {:?}",
        &delivered_twice[..5.min(delivered_twice.len())]
    );
}

fn in_app(i: usize) -> Envelope {
    let msg = InAppMessage { user: format!("user-{}", i % 20), title: format!("t{i}"), body: "b".into(), data: None };
    Envelope::direct(Channel::InApp, format!("req-{i}"), serde_json::to_value(&msg).unwrap())
}

/// Publishes every envelope to the in-app channel with confirms (64 in flight at once).
async fn publish(conn: &lapin::Connection, topology: &Topology, envs: &[Envelope]) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let (exchange, key) = (topology.exchange(), Topology::direct_key(Channel::InApp));
    let results: Vec<_> = stream::iter(envs)
        .map(|env| {
            let (ch, exchange, key) = (&ch, &exchange, &key);
            async move {
                let props = broker::envelope_properties(env, 1);
                broker::publish_confirmed(ch, exchange, key, &env.to_bytes(), props, Duration::from_secs(10)).await
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for r in results {
        r.expect("publish confirmed");
    }
    let _ = ch.close(200, "published".into()).await;
}

/// Waits (bounded) until the inbox holds at least `n` rows; fails early if one of `running`
/// exited. Returns the count seen.
async fn wait_for_rows(store: &notify_store::Store, n: i64, running: &mut [WorkerProcess]) -> i64 {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox_items")
            .fetch_one(store.pool())
            .await
            .expect("inbox rows counted");
        if rows >= n {
            return rows;
        }
        for w in running.iter_mut() {
            assert!(w.runs(), "a worker exited early\n{}", tail(&w.logs()));
        }
        assert!(Instant::now() < deadline, "only {rows} of {n} inbox rows after {DRAIN_TIMEOUT:?}");
    }
}

/// `(notification id, settled outcome)` of every `delivery settled` line.
fn settled_lines(logs: &str) -> Vec<(String, String)> {
    let field = |line: &str, name: &str| -> Option<String> {
        let start = line.find(&format!("{name}="))? + name.len() + 1;
        let value: String = line[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        Some(value)
    };
    logs.lines()
        .filter(|l| l.contains("delivery settled"))
        .filter_map(|l| Some((field(l, "notification_id")?, field(l, "settled")?)))
        .collect()
}

fn tail(logs: &str) -> String {
    let lines: Vec<&str> = logs.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

struct WorkerProcess {
    child: Child,
    log: PathBuf,
}

impl WorkerProcess {
    /// A worker of the in-app channel; its output goes to `log`.
    fn spawn(rabbitmq_url: &str, prefix: &str, db_url: &str, smtp_url: &str, log: PathBuf) -> WorkerProcess {
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_notify-worker"))
            .env("RABBITMQ_URL", rabbitmq_url)
            .env("RABBITMQ_URL_ORDER", "listed")
            .env("NOTIFY_PREFIX", prefix)
            .env("RETRY_SCHEDULE", "50ms")
            .env("WORKER_CHANNELS", "in_app")
            .env("WORKER_HTTP_HOST", "127.0.0.1")
            .env("WORKER_HTTP_PORT", "0")
            .env("WORKER_CONCURRENCY", CONCURRENCY)
            .env("SMTP_URL", smtp_url)
            .env("DATABASE_URL", db_url)
            .env("DATABASE_SCHEMA", notify_testkit::db::schema_of(prefix))
            .env("ROUTES_FILE", ROUTES_FILE)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("worker binary runs");
        WorkerProcess { child, log }
    }

    fn pid(&self) -> String {
        self.child.id().expect("worker still running").to_string()
    }

    fn runs(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no handler runs, nothing is acked or closed.
    async fn kill_9(&mut self) -> ExitStatus {
        let sent = std::process::Command::new("kill").args(["-KILL", &self.pid()]).status().unwrap();
        assert!(sent.success(), "kill -KILL");
        tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.expect("killed worker reaped").unwrap()
    }

    /// SIGTERM, then waits (bounded) for the exit; the status and how long it took.
    async fn sigterm(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let started = Instant::now();
        let sent = std::process::Command::new("kill").args(["-TERM", &self.pid()]).status().unwrap();
        assert!(sent.success(), "kill -TERM");
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("worker still running {limit:?} after SIGTERM\n{}", tail(&self.logs())),
        };
        (status, started.elapsed())
    }
}
