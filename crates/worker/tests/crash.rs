//! The worker binary under process faults: kill -9 in the middle of a load, a message that
//! kills the process every time it is delivered, and SIGTERM under load. Each test runs real
//! `notify-worker` processes against the machine's RabbitMQ and Postgres and a test SMTP server.

use futures_util::{stream, StreamExt};
use lapin::types::AMQPValue;
use notify_testkit::{
    rabbit,
    smtp::{Mail, SmtpServer},
};
use notify_types::{broker, broker::header_str, headers, Channel, EmailMessage, Envelope, QueueType, Topology};
use std::{
    collections::{HashMap, HashSet},
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};
use tokio::process::{Child, Command};

const ROUTES_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/routes.toml");
const SIGKILL: i32 = 9;
const SIGABRT: i32 = 6;

/// One test's prefix, schema and broker connection.
struct Setup {
    prefix: String,
    schema: String,
    db_url: String,
    topology: Topology,
    conn: lapin::Connection,
    logs: Vec<PathBuf>,
}

impl Setup {
    async fn new(test: &str, delivery_limit: u32) -> Setup {
        let prefix = rabbit::unique_prefix(test);
        let mut topology = Topology::new(&prefix, QueueType::Quorum, vec![Duration::from_millis(50)]);
        topology.delivery_limit = delivery_limit;
        let conn = rabbit::connect().await;
        topology.declare(&conn).await.unwrap();
        let db_url = notify_testkit::db::database_url();
        let schema = notify_testkit::db::schema_of(&prefix);
        Setup { prefix, schema, db_url, topology, conn, logs: Vec::new() }
    }

    fn queue(&self) -> String {
        self.topology.queue(Channel::Email)
    }

    /// Publishes every envelope to the e-mail channel with confirms (64 in flight at once).
    async fn publish(&self, envs: &[Envelope]) {
        let ch = self.conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        let exchange = self.topology.exchange();
        let key = Topology::direct_key(Channel::Email);
        let results: Vec<_> = stream::iter(envs)
            .map(|env| {
                let (ch, exchange, key) = (&ch, &exchange, &key);
                async move {
                    let body = env.to_bytes();
                    let props = broker::envelope_properties(env, 1);
                    broker::publish_confirmed(ch, exchange, key, &body, props, Duration::from_secs(10)).await
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

    /// Starts a worker process for the e-mail channel; its logs go to a file of the test.
    fn worker(&mut self, smtp: &SmtpServer, extra: &[(&str, &str)]) -> WorkerProcess {
        let log = std::env::temp_dir().join(format!("{}-worker-{}.log", self.prefix, self.logs.len() + 1));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_notify-worker"));
        cmd.env("RABBITMQ_URL", rabbit::rabbitmq_url())
            .env("NOTIFY_PREFIX", &self.prefix)
            .env("RETRY_SCHEDULE", "50ms")
            .env("DELIVERY_LIMIT", self.topology.delivery_limit.to_string())
            .env("SMTP_URL", smtp.url())
            .env("WORKER_CHANNELS", "email")
            .env("WORKER_HTTP_HOST", "127.0.0.1")
            .env("WORKER_HTTP_PORT", "0")
            .env("RUST_LOG", "info")
            .env("DATABASE_URL", &self.db_url)
            .env("DATABASE_SCHEMA", &self.schema)
            .env("ROUTES_FILE", ROUTES_FILE)
            // These tests read the dead queue itself.
            .env("DEAD_LETTER_INDEX", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("worker binary runs");
        self.logs.push(log.clone());
        WorkerProcess { child, log }
    }

    async fn cleanup(self) {
        rabbit::delete_topology(&self.conn, &self.topology).await;
        notify_store::Store::connect_lazy(&self.db_url, &self.schema, 1).unwrap().drop_schema().await.unwrap();
        for log in &self.logs {
            let _ = std::fs::remove_file(log);
        }
        let _ = self.conn.close(200, "test done".into()).await;
    }
}

struct WorkerProcess {
    child: Child,
    log: PathBuf,
}

impl WorkerProcess {
    fn pid(&self) -> String {
        self.child.id().expect("worker still running").to_string()
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

    /// SIGTERM, then waits (bounded) for the exit; returns the status and how long it took.
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

fn tail(logs: &str) -> String {
    let lines: Vec<&str> = logs.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn email(i: usize) -> Envelope {
    let msg = EmailMessage { to: format!("u{i}@example.com"), subject: format!("s{i}"), body: "b".into(), html: None };
    Envelope::direct(Channel::Email, format!("req-{i}"), serde_json::to_value(&msg).unwrap())
}

/// The notification id in a mail's `Message-ID: <{id}@notify>`.
fn notification_id(mail: &Mail) -> String {
    let mid = mail.message_id.as_deref().expect("every mail has a Message-ID");
    mid.trim_matches(['<', '>']).trim_end_matches("@notify").to_string()
}

fn distinct_ids(mails: &[Mail]) -> HashSet<String> {
    mails.iter().map(notification_id).collect()
}

/// Reason, queue and count of the first `x-death` entry.
fn x_death(props: &lapin::BasicProperties) -> Option<(String, String, i64)> {
    let headers = props.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    let text = |key: &str| match first.inner().get(key) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_string(),
        _ => String::new(),
    };
    let count = match first.inner().get("count") {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => *n as i64,
        _ => -1,
    };
    Some((text("reason"), text("queue"), count))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_worker_three_times_with_1000_emails_in_flight_loses_nothing() {
    const TOTAL: usize = 1000;
    let mut s = Setup::new("kill9", 5).await;
    let smtp = SmtpServer::start().await;
    // A short relay delay keeps deliveries in flight at every kill.
    smtp.set_delay(Duration::from_millis(10));
    let envs: Vec<Envelope> = (0..TOTAL).map(email).collect();
    // notification id -> recipient, to tell a duplicate from a second, different mail.
    let expected: HashMap<String, String> =
        envs.iter().enumerate().map(|(i, e)| (e.id.to_string(), format!("u{i}@example.com"))).collect();
    let started = Instant::now();
    s.publish(&envs).await;
    rabbit::wait_for_count(&s.conn, &s.queue(), TOTAL as u32, Duration::from_secs(30)).await;
    println!("published {TOTAL} e-mails (confirmed) in {:?}", started.elapsed());

    let settings = [("WORKER_CONCURRENCY", "16"), ("SMTP_POOL_SIZE", "16"), ("SMTP_TIMEOUT", "5s")];
    let mut worker = s.worker(&smtp, &settings);
    // Distinct ids mailed when each worker started and when it was killed.
    let mut at_start = vec![0usize];
    let mut at_kill = Vec::new();
    // When each SIGKILL was sent.
    let mut kills = Vec::new();
    for (k, threshold) in [150usize, 400, 700].into_iter().enumerate() {
        smtp.wait_for_mails(threshold, Duration::from_secs(90)).await;
        kills.push(Instant::now());
        let status = worker.kill_9().await;
        assert_eq!(status.signal(), Some(SIGKILL), "worker {} died of SIGKILL: {status:?}", k + 1);
        let mails = smtp.mails();
        let distinct = distinct_ids(&mails).len();
        println!("kill -9 #{}: {} mails accepted by SMTP ({distinct} distinct ids)", k + 1, mails.len());
        assert!(distinct < TOTAL, "mails were still pending at kill #{}", k + 1);
        at_kill.push(distinct);
        worker = s.worker(&smtp, &settings);
        at_start.push(distinct);
    }

    // After the last restart: every notification mailed, bounded.
    smtp.wait_for_mails(TOTAL, Duration::from_secs(90)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let distinct = distinct_ids(&smtp.mails()).len();
        if distinct == TOTAL {
            break;
        }
        assert!(Instant::now() < deadline, "only {distinct} of {TOTAL} distinct mails\n{}", tail(&worker.logs()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    at_kill.push(TOTAL);
    let took = started.elapsed();
    rabbit::wait_for_count(&s.conn, &s.queue(), 0, Duration::from_secs(30)).await;
    let (status, stop_took) = worker.sigterm(Duration::from_secs(30)).await;
    let logs = worker.logs();
    assert!(status.success(), "last worker exits cleanly on SIGTERM, got {status:?}\n{}", tail(&logs));
    assert!(logs.contains("worker stopped"), "{}", tail(&logs));

    // Every worker after a restart made progress.
    for (n, (start, end)) in at_start.iter().zip(&at_kill).enumerate() {
        println!("worker {}: distinct ids mailed {start} -> {end}", n + 1);
        assert!(end > start, "worker {} delivered nothing new ({start} -> {end})", n + 1);
    }

    // Nothing left in any queue now that no worker holds a message: nothing unacked.
    let ready = rabbit::message_count(&s.conn, &s.queue()).await;
    let dead = rabbit::message_count(&s.conn, &s.topology.dead_queue(Channel::Email)).await;
    let retry = rabbit::message_count(&s.conn, &s.topology.retry_queues(Channel::Email)[0]).await;
    assert_eq!((ready, dead, retry), (Some(0), Some(0), Some(0)), "(queue, dead, retry) after the last worker stopped");

    let mails = smtp.mails();
    let ids = distinct_ids(&mails);
    let duplicates = mails.len() - ids.len();
    println!(
        "{TOTAL} published, 3 x kill -9: {} mails received, {} distinct notification ids, {duplicates} duplicate(s), \
         0 lost; all mailed after {took:?}; last worker stopped on SIGTERM in {stop_took:?}",
        mails.len(),
        ids.len()
    );
    assert_eq!(ids.len(), TOTAL, "every notification mailed");
    assert!(ids.iter().all(|id| expected.contains_key(id)), "no mail with an unknown Message-ID");
    // A duplicate (crash between the SMTP 250 and the Postgres commit) must be the same mail
    // with the same Message-ID, so the receiver drops it: one Message-ID per recipient.
    let mut per_recipient: HashMap<&str, HashSet<String>> = HashMap::new();
    for mail in &mails {
        assert_eq!(mail.to.len(), 1, "one recipient per mail");
        per_recipient.entry(mail.to[0].as_str()).or_default().insert(notification_id(mail));
    }
    assert_eq!(per_recipient.len(), TOTAL);
    for (id, to) in &expected {
        let seen = &per_recipient[to.as_str()];
        assert_eq!(seen, &HashSet::from([id.clone()]), "{to} got mails with other Message-IDs");
    }
    // Only a mail in flight at a kill can come twice: at most the 16 concurrent deliveries per
    // kill. Each duplicate's first copy was taken by the server right around a kill: either
    // after SIGKILL was sent (the relay took a mail whose sender was already gone: no sender
    // can know, RFC 1047), or just before it, while the worker's delivered record was not yet
    // committed. A first copy taken long before any kill would mean the send guard failed.
    assert!(duplicates <= 3 * 16, "{duplicates} duplicates: more than the in-flight mails of 3 kills");
    let mut copies: HashMap<String, Vec<Instant>> = HashMap::new();
    for mail in &mails {
        copies.entry(notification_id(mail)).or_default().push(mail.accepted_at);
    }
    let (mut after_kill, mut before_kill) = (0, Vec::new());
    for (id, times) in copies.iter().filter(|(_, t)| t.len() > 1) {
        let first = times[0];
        let nearest = kills.iter().min_by_key(|k| first.max(**k) - first.min(**k)).expect("three kills");
        if first >= *nearest {
            assert!(first - *nearest < Duration::from_secs(2), "{id}: first copy {:?} after a kill", first - *nearest);
            after_kill += times.len() - 1;
        } else {
            let gap = *nearest - first;
            assert!(
                gap < Duration::from_millis(50),
                "{id} mailed {} times, first copy {gap:?} before a kill",
                times.len()
            );
            before_kill.extend(std::iter::repeat_n(gap, times.len() - 1));
        }
    }
    before_kill.sort();
    println!(
        "duplicates: {duplicates}, every one with its original's Message-ID; {after_kill} taken by the SMTP server \
         after SIGKILL was sent (sender already gone), {} taken before it, by {:?} at most (the worker's record was \
         not yet committed); none earlier",
        before_kill.len(),
        before_kill.last().copied().unwrap_or_default()
    );

    // The send guard's record: every notification delivered exactly once in Postgres.
    let store = notify_store::Store::connect_lazy(&s.db_url, &s.schema, 4).unwrap();
    let statuses: Vec<_> = stream::iter(expected.keys())
        .map(|id| {
            let store = &store;
            async move { store.delivery_status(id.parse().unwrap()).await.unwrap() }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let delivered = statuses.iter().filter(|rows| {
        rows.len() == 1 && rows[0].channel == Channel::Email && rows[0].status == notify_store::DeliveryState::Delivered
    });
    let delivered = delivered.count();
    let max_attempts = statuses.iter().flatten().map(|r| r.attempts).max().unwrap_or(0);
    println!("deliveries table: {delivered} of {TOTAL} rows delivered (highest attempts {max_attempts})");
    assert_eq!(delivered, TOTAL, "every delivery recorded as delivered");
    store.close().await;
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_kills_the_worker_is_dead_lettered_by_the_delivery_limit() {
    const GOOD: usize = 20;
    const LIMIT: u32 = 2;
    let mut s = Setup::new("poison-abort", LIMIT).await;
    let smtp = SmtpServer::start().await;
    let poison = Envelope::direct(
        Channel::Email,
        "req-poison".to_string(),
        serde_json::json!({"to": "poison@example.com", "subject": "p", "body": "b", "__notify_test_abort": true}),
    );
    let mut envs: Vec<Envelope> = (0..GOOD / 2).map(email).collect();
    envs.push(poison.clone());
    envs.extend((GOOD / 2..GOOD).map(email));
    s.publish(&envs).await;

    // One delivery at a time: the poison message is the only one a crash takes down. With a
    // larger prefetch, every message the dying worker holds is returned with it and counts
    // toward the limit too, so good messages can be dead-lettered alongside (seen with the
    // defaults: up to all 20 good ones in the dead-letter queue after 3 crashes).
    let settings = [("WORKER_CONCURRENCY", "1"), ("WORKER_PREFETCH", "1"), ("NOTIFY_ALLOW_TEST_PANIC", "1")];
    let dead_queue = s.topology.dead_queue(Channel::Email);
    let (worker, crashes) = run_through_crashes(&mut s, &smtp, &settings, GOOD).await;
    let mut worker = worker;
    let (status, _) = worker.sigterm(Duration::from_secs(30)).await;
    assert!(status.success(), "the surviving worker exits cleanly: {status:?}\n{}", tail(&worker.logs()));

    let mails = smtp.mails();
    let mailed = distinct_ids(&mails);
    let good: HashSet<String> = envs.iter().filter(|e| e.id != poison.id).map(|e| e.id.to_string()).collect();
    let dead = rabbit::drain(&s.conn, &dead_queue, 10).await;
    let left = rabbit::message_count(&s.conn, &s.queue()).await;
    let (reason, from_queue, count) = x_death(&dead[0].0).expect("the dead letter has an x-death header");
    let dead_id = dead[0].0.message_id().as_ref().map(|m| m.to_string());
    let store = notify_store::Store::connect_lazy(&s.db_url, &s.schema, 1).unwrap();
    let poison_state = store.delivery_status(poison.id).await.unwrap();
    store.close().await;
    println!(
        "delivery limit {LIMIT}: {crashes} worker crash(es), then the poison message was dead-lettered \
         (x-death reason `{reason}` from `{from_queue}`, count {count}); {} of {GOOD} good mails delivered; \
         the poison's send-guard row: {:?}",
        mailed.len(),
        poison_state.iter().map(|r| (&r.status, r.attempts)).collect::<Vec<_>>()
    );
    // Each return (here: each crash) counts; the return past the limit dead-letters, so a
    // message is delivered at most limit + 1 times (3.10: exactly that).
    assert!((1..=LIMIT as usize + 1).contains(&crashes), "{crashes} crashes with a delivery limit of {LIMIT}");
    assert_eq!(dead.len(), 1, "only the poison message is dead");
    assert_eq!(dead_id, Some(poison.id.to_string()));
    assert_eq!(reason, "delivery_limit");
    assert_eq!(from_queue, s.queue());
    assert_eq!(mailed, good, "every good mail delivered");
    assert_eq!(mails.len(), GOOD, "each good mail once");
    assert!(mails.iter().all(|m| m.to != ["poison@example.com"]), "the poison message was never mailed");
    assert_eq!(left, Some(0));
    s.cleanup().await;
}

/// Runs worker processes, restarting each one the poison message kills (bounded), until `good`
/// mails arrived and one message is dead-lettered. Returns the surviving worker and the crashes.
async fn run_through_crashes(
    s: &mut Setup,
    smtp: &SmtpServer,
    settings: &[(&str, &str)],
    good: usize,
) -> (WorkerProcess, usize) {
    let dead_queue = s.topology.dead_queue(Channel::Email);
    let mut worker = s.worker(smtp, settings);
    let mut crashes = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let done = async {
            loop {
                let dead = rabbit::message_count(&s.conn, &dead_queue).await.unwrap_or(0);
                if distinct_ids(&smtp.mails()).len() >= good && dead >= 1 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let exited = tokio::select! {
            status = worker.child.wait() => Some(Some(status.unwrap())),
            _ = done => Some(None),
            _ = tokio::time::sleep_until(deadline.into()) => None,
        };
        let Some(exited) = exited else {
            panic!(
                "after {crashes} crash(es): {} mails, dead queue {:?}\n{}",
                smtp.mails().len(),
                rabbit::message_count(&s.conn, &dead_queue).await,
                tail(&worker.logs())
            );
        };
        let Some(status) = exited else { return (worker, crashes) };
        crashes += 1;
        assert_eq!(status.signal(), Some(SIGABRT), "the worker died of the poison message: {status:?}");
        assert!(worker.logs().contains("test hook: aborting the process"), "{}", tail(&worker.logs()));
        assert!(crashes <= 8, "nothing stopped the crashes");
        println!("worker process {crashes} aborted by the poison message; restarting");
        worker = s.worker(smtp, settings);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_kills_the_worker_is_dead_lettered_by_the_worker_without_taking_good_ones_along() {
    // Default-like concurrency and prefetch: each crash returns every message the worker held.
    // The worker itself notices the message whose deliveries keep dying (WORKER_CRASH_LIMIT=3,
    // default), delivers such suspects alone, and dead-letters it; the broker's delivery limit
    // (default 10) is never reached by the good messages.
    const GOOD: usize = 100;
    let mut s = Setup::new("poison-crash-limit", 10).await;
    let smtp = SmtpServer::start().await;
    let poison = Envelope::direct(
        Channel::Email,
        "req-poison".to_string(),
        serde_json::json!({"to": "poison@example.com", "subject": "p", "body": "b", "__notify_test_abort": true}),
    );
    let mut envs: Vec<Envelope> = (0..GOOD / 2).map(email).collect();
    envs.push(poison.clone());
    envs.extend((GOOD / 2..GOOD).map(email));
    s.publish(&envs).await;
    let settings = [("WORKER_CONCURRENCY", "16"), ("WORKER_PREFETCH", "32"), ("NOTIFY_ALLOW_TEST_PANIC", "1")];
    let (mut worker, crashes) = run_through_crashes(&mut s, &smtp, &settings, GOOD).await;
    let (status, _) = worker.sigterm(Duration::from_secs(30)).await;
    assert!(status.success(), "the surviving worker exits cleanly: {status:?}\n{}", tail(&worker.logs()));

    let mails = smtp.mails();
    let mailed = distinct_ids(&mails);
    let good: HashSet<String> = envs.iter().filter(|e| e.id != poison.id).map(|e| e.id.to_string()).collect();
    let dead = rabbit::drain(&s.conn, &s.topology.dead_queue(Channel::Email), 200).await;
    let store = notify_store::Store::connect_lazy(&s.db_url, &s.schema, 1).unwrap();
    let poison_state = store.delivery_status(poison.id).await.unwrap();
    store.close().await;
    println!(
        "crash limit 3: {crashes} worker crash(es); dead-lettered {} message(s) with reason {:?}; \
         {} of {GOOD} good mails delivered ({} raw: same-Message-ID copies of mails in flight at a crash); \
         the poison's status {:?}",
        dead.len(),
        dead.first().and_then(|d| header_str(&d.0, headers::DEAD_REASON)),
        mailed.len(),
        mails.len(),
        poison_state.iter().map(|r| (&r.status, r.attempts)).collect::<Vec<_>>()
    );
    assert_eq!(crashes, 3, "three deliveries died, the fourth was refused");
    assert_eq!(dead.len(), 1, "only the poison message is dead");
    assert_eq!(dead[0].0.message_id().as_ref().map(|m| m.to_string()), Some(poison.id.to_string()));
    assert_eq!(header_str(&dead[0].0, headers::DEAD_REASON).as_deref(), Some("crashed_worker"));
    assert_eq!(mailed, good, "every good mail delivered");
    assert!(mails.iter().all(|m| m.to != ["poison@example.com"]), "the poison message was never mailed");
    assert_eq!(poison_state[0].status, notify_store::DeliveryState::Dead, "the status endpoint shows it dead");
    assert_eq!(rabbit::message_count(&s.conn, &s.queue()).await, Some(0));
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_in_flight_and_exits_cleanly() {
    const TOTAL: usize = 300;
    let mut s = Setup::new("sigterm-load", 5).await;
    let smtp = SmtpServer::start().await;
    smtp.set_delay(Duration::from_millis(300));
    let envs: Vec<Envelope> = (0..TOTAL).map(email).collect();
    let ids: HashSet<String> = envs.iter().map(|e| e.id.to_string()).collect();
    s.publish(&envs).await;

    let mut worker = s.worker(&smtp, &[("WORKER_CONCURRENCY", "8"), ("SMTP_POOL_SIZE", "8")]);
    let started = Instant::now();
    smtp.wait_for_mails(TOTAL / 3, Duration::from_secs(90)).await;
    // SIGTERM when every delivery slot is busy at the relay (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(10);
    while smtp.in_progress() < 8 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Read the mails first, then the in-flight ones: a mail finishing in between is counted in
    // neither, so `mailed_at_term + in_flight` is a lower bound of what must arrive.
    let mailed_at_term = smtp.mails().len();
    let in_flight = smtp.in_progress();
    let (status, took) = worker.sigterm(Duration::from_secs(30)).await;
    let logs = worker.logs();
    assert!(status.success(), "exit code 0 after SIGTERM, got {status:?}\n{}", tail(&logs));
    assert!(took < Duration::from_secs(30), "exited in {took:?}");
    assert!(logs.contains("worker stopped"), "{}", tail(&logs));

    let mails = smtp.mails();
    let mailed = distinct_ids(&mails);
    let left = rabbit::drain(&s.conn, &s.queue(), TOTAL + 1).await;
    let queued: HashSet<String> = left.iter().map(|(p, _)| p.message_id().as_ref().unwrap().to_string()).collect();
    println!(
        "SIGTERM after {mailed_at_term} mails ({:?}) with {in_flight} in flight: exit 0 after {took:?}; \
         {} mailed + {} still queued = {} of {TOTAL}",
        started.elapsed() - took,
        mailed.len(),
        queued.len(),
        mailed.len() + queued.len()
    );
    assert!(in_flight > 0, "deliveries were in flight at SIGTERM");
    assert!(mails.len() >= mailed_at_term + in_flight, "every in-flight delivery completed");
    assert_eq!(mails.len(), mailed.len(), "no mail sent twice");
    assert_eq!(left.len(), queued.len(), "no message queued twice");
    assert!(mailed.is_disjoint(&queued), "a mailed message was not acked");
    assert_eq!(mailed.len() + queued.len(), TOTAL);
    assert_eq!(mailed.union(&queued).cloned().collect::<HashSet<_>>(), ids, "nothing lost");
    s.cleanup().await;
}
