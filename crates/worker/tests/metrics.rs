//! The worker's HTTP port as an operator uses it: `/metrics` counts exactly what went through
//! the real pipeline (API, RabbitMQ, worker, SMTP), and `/ready` follows the broker while
//! `/health` does not. The worker runs as its own process, so its counters hold only what this
//! test sent (in one process the API's and other tests' deliveries would share the recorder).

use notify_testkit::{private_broker::PrivateBroker, rabbit, smtp::Reply, smtp::SmtpServer};
use std::{
    collections::HashMap,
    path::PathBuf,
    process::Stdio,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tokio::process::{Child, Command};

const ROUTES_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/routes.toml");
const API_KEY: &str = "metrics-test-key-5b8e1f";

fn db_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| notify_types::config::DEFAULT_DATABASE_URL.into())
}

/// The settings both binaries get, with the test's prefix and schema.
fn settings(prefix: &str, rabbitmq_url: &str, smtp_url: &str) -> HashMap<String, String> {
    [
        ("RABBITMQ_URL", rabbitmq_url),
        ("NOTIFY_PREFIX", prefix),
        ("RETRY_SCHEDULE", "50ms"),
        ("MAX_ATTEMPTS", "6"),
        ("SMTP_URL", smtp_url),
        ("SMTP_TIMEOUT", "5s"),
        ("WORKER_CHANNELS", "email"),
        ("WORKER_CONCURRENCY", "8"),
        ("WORKER_HTTP_HOST", "127.0.0.1"),
        ("WORKER_HTTP_PORT", "0"),
        ("WORKER_DEAD_LETTER_INTERVAL", "1s"),
        ("API_HOST", "127.0.0.1"),
        ("API_PORT", "0"),
        ("API_HTTP_WORKERS", "2"),
        ("API_KEYS", API_KEY),
        ("DATABASE_URL", &db_url()),
        ("DATABASE_SCHEMA", &prefix.replace(['-', '.'], "_")),
        ("ROUTES_FILE", ROUTES_FILE),
        ("RUST_LOG", "info"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A `notify-worker` process; its output goes to a file, where its HTTP address is read.
struct WorkerProcess {
    child: Child,
    log: PathBuf,
    base: String,
}

impl WorkerProcess {
    async fn start(settings: &HashMap<String, String>) -> WorkerProcess {
        let log = std::env::temp_dir().join(format!("{}-worker.log", settings["NOTIFY_PREFIX"]));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_notify-worker"))
            .env_clear()
            .envs(settings)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .kill_on_drop(true)
            .spawn()
            .expect("worker binary runs");
        let mut worker = WorkerProcess { child, log, base: String::new() };
        // Port 0: the worker says which port it got in its start line.
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let logs = worker.logs();
            if let Some(addr) = logs
                .lines()
                .filter(|l| l.contains("HTTP listener"))
                .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")).map(str::to_string))
            {
                break addr;
            }
            if let Ok(Some(status)) = worker.child.try_wait() {
                panic!("worker exited ({status}) before listening:\n{logs}");
            }
            assert!(Instant::now() < deadline, "no `HTTP listener` line within 30 s:\n{logs}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        worker.base = format!("http://{addr}");
        worker
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `notify-worker healthcheck` (the compose healthcheck) against this worker's port.
    async fn healthcheck(&self) -> bool {
        let port = self.base.rsplit_once(':').expect("http://HOST:PORT").1;
        let run =
            Command::new(env!("CARGO_BIN_EXE_notify-worker")).arg("healthcheck").env("WORKER_HTTP_PORT", port).status();
        tokio::time::timeout(Duration::from_secs(10), run).await.expect("healthcheck ends").unwrap().success()
    }

    async fn stop(mut self) {
        let pid = self.child.id().expect("worker still running").to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.unwrap().unwrap();
        assert!(status.success(), "worker exit: {status}\n{}", self.logs());
        let _ = std::fs::remove_file(&self.log);
    }
}

async fn get(client: &reqwest::Client, url: &str) -> Result<(u16, String), reqwest::Error> {
    let response = client.get(url).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

/// The value of the sample `name{labels}` in a Prometheus text exposition (labels in any
/// order), if present.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        if metric != name {
            return None;
        }
        let mut found: Vec<(&str, &str)> = rest
            .trim_end_matches('}')
            .split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once('=').map(|(k, v)| (k, v.trim_matches('"'))))
            .collect();
        let mut wanted = labels.to_vec();
        found.sort();
        wanted.sort();
        (found == wanted).then(|| value.parse().ok()).flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_went_through_the_pipeline() {
    let prefix = rabbit::unique_prefix("worker-metrics");
    let smtp = SmtpServer::start().await;
    let settings = settings(&prefix, &rabbit::rabbitmq_url(), &smtp.url());
    let mut api_config = notify_api::ApiConfig::from_source(&settings).unwrap();
    api_config.handle_signals = false;
    let app = notify_api::Application::build(api_config).await.expect("API starts");
    let api = format!("http://127.0.0.1:{}", app.port());
    let api_handle = app.handle();
    tokio::spawn(app.run_until_stopped());
    let worker = WorkerProcess::start(&settings).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();

    // Every series is there, at zero, before the first delivery.
    let (status, before) = get(&http, &format!("{}/metrics", worker.base)).await.unwrap();
    assert_eq!(status, 200);
    let delivered = [("channel", "email"), ("outcome", "delivered")];
    assert_eq!(sample(&before, "notify_worker_deliveries_total", &delivered), Some(0.0), "{before}");

    // The relay's replies, in the order transactions finish: 3 "try later", 5 "never", then
    // it accepts. 30 requests: 5 dead, 25 delivered (3 of them on their second attempt).
    let mut replies = vec![Reply::transient(); 3];
    replies.extend(vec![Reply::permanent(); 5]);
    smtp.script(replies);
    for i in 0..30 {
        let res = http
            .post(format!("{api}/api/v1/notifications/email"))
            .bearer_auth(API_KEY)
            .json(&serde_json::json!({"to": format!("user{i}@example.com"), "subject": "hi", "body": "b"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202, "{}", res.text().await.unwrap());
    }
    smtp.wait_for_mails(25, Duration::from_secs(60)).await;

    // Bounded wait until the worker has counted everything it settled, then exact values.
    let count = |text: &str, outcome: &str| {
        sample(text, "notify_worker_deliveries_total", &[("channel", "email"), ("outcome", outcome)]).unwrap_or(-1.0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let (_, text) = get(&http, &format!("{}/metrics", worker.base)).await.unwrap();
        if count(&text, "delivered") >= 25.0 && count(&text, "dead") >= 5.0 && count(&text, "retry") >= 3.0 {
            break text;
        }
        assert!(Instant::now() < deadline, "not all 33 deliveries counted within 30 s:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let email = [("channel", "email")];
    println!(
        "delivered {} dead {} retry {} deferred {} duplicate {}; end-to-end count {:?}, attempts timed {:?}",
        count(&text, "delivered"),
        count(&text, "dead"),
        count(&text, "retry"),
        count(&text, "deferred"),
        count(&text, "duplicate"),
        sample(&text, "notify_worker_end_to_end_seconds_count", &email),
        sample(&text, "notify_worker_delivery_duration_seconds_count", &email),
    );
    assert_eq!(count(&text, "delivered"), 25.0, "{text}");
    assert_eq!(count(&text, "dead"), 5.0, "{text}");
    assert_eq!(count(&text, "retry"), 3.0, "{text}");
    assert_eq!(count(&text, "deferred"), 0.0, "{text}");
    assert_eq!(count(&text, "duplicate"), 0.0, "{text}");
    assert_eq!(sample(&text, "notify_worker_end_to_end_seconds_count", &email), Some(25.0), "{text}");
    assert_eq!(sample(&text, "notify_worker_delivery_duration_seconds_count", &email), Some(33.0), "{text}");
    let tier = [("channel", "email"), ("tier", "50ms")];
    assert_eq!(sample(&text, "notify_worker_retries_total", &tier), Some(3.0), "{text}");
    assert_eq!(sample(&text, "notify_worker_in_flight", &email), Some(0.0), "{text}");
    let batch_writes = sample(&text, "notify_store_group_commit_batch_size_sum", &[]).unwrap_or(0.0);
    assert!(batch_writes > 0.0, "the send guard's writes go through the group commit: {text}");
    assert!(sample(&text, "notify_worker_smtp_connections", &[("state", "idle")]).unwrap_or(0.0) >= 1.0, "{text}");
    assert_eq!(smtp.mails().len(), 25);

    // The dead letters waiting are counted on the worker's timer (every second here): with
    // DEAD_LETTER_INDEX (the default) they have moved from the dead queue into PostgreSQL, and
    // are counted there.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = get(&http, &format!("{}/metrics", worker.base)).await.unwrap();
        match sample(&text, "notify_dead_letters", &email) {
            Some(5.0) => break,
            seen => {
                assert!(Instant::now() < deadline, "notify_dead_letters{{channel=email}} not 5 within 10 s: {seen:?}")
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    worker.stop().await;
    api_handle.stop(true).await;
    let topology = notify_types::config::topology(&settings).unwrap();
    let conn = rabbit::connect().await;
    rabbit::delete_topology(&conn, &topology).await;
    let _ = conn.close(200, "test done".into()).await;
    notify_store::Store::connect_lazy(&settings["DATABASE_URL"], &settings["DATABASE_SCHEMA"], 1)
        .unwrap()
        .drop_schema()
        .await
        .unwrap();
}

/// Polls `url` every 50 ms until it answers `status`; returns how long that took.
async fn wait_for_status(client: &reqwest::Client, url: &str, status: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < limit {
        match get(client, url).await {
            Ok((s, _)) if s == status => return started.elapsed(),
            other => last = Some(other.map(|(s, b)| format!("{s} {b}")).map_err(|e| e.to_string())),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not answer {status} within {limit:?}; last: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_the_broker_and_health_stays_up() {
    let broker = PrivateBroker::start().await.expect("private RabbitMQ node");
    let prefix = rabbit::unique_prefix("worker-ready");
    let smtp = SmtpServer::start().await;
    let settings = settings(&prefix, &broker.url(), &smtp.url());
    let worker = WorkerProcess::start(&settings).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().unwrap();
    let (ready, health) = (format!("{}/ready", worker.base), format!("{}/health", worker.base));

    let took = wait_for_status(&client, &ready, 200, Duration::from_secs(30)).await;
    println!("ready after start: {took:?}");
    assert!(worker.healthcheck().await, "`notify-worker healthcheck` exits 0 while ready");

    // /health, every 100 ms from now until the broker is back: every answer must be 200.
    let stop_polling = Arc::new(AtomicBool::new(false));
    let (answers, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(std::sync::Mutex::new(Vec::new())));
    let poller = tokio::spawn({
        let (client, health) = (client.clone(), health.clone());
        let (stop, answers, failures) = (stop_polling.clone(), answers.clone(), failures.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                match get(&client, &health).await {
                    Ok((200, _)) => {}
                    other => failures.lock().unwrap().push(format!("{other:?}")),
                }
                answers.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    let stopping = Instant::now();
    broker.stop().await.expect("node stops");
    let stop_took = stopping.elapsed();
    let unready = wait_for_status(&client, &ready, 503, Duration::from_secs(5)).await;
    let (_, body) = get(&client, &ready).await.unwrap();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "not_ready", "{body}");
    assert_eq!(body["checks"]["broker"], "disconnected", "{body}");
    assert_eq!(body["checks"]["database"], "connected", "{body}");
    assert!(!worker.healthcheck().await, "`notify-worker healthcheck` exits 1 while unready");
    println!(
        "broker stop took {stop_took:?}; /ready 503 {unready:?} after the node was down ({:?} after the stop began)",
        stop_took + unready
    );

    let restarting = Instant::now();
    broker.restart().await.expect("node restarts");
    let restart_took = restarting.elapsed();
    let back = wait_for_status(&client, &ready, 200, Duration::from_secs(30)).await;
    println!("broker restart took {restart_took:?}; /ready 200 again {back:?} after the node was up");

    stop_polling.store(true, Ordering::Relaxed);
    poller.await.unwrap();
    let answers = answers.load(Ordering::Relaxed);
    let failures = failures.lock().unwrap().clone();
    println!("/health answered {answers} times while the broker was stopped and restarted, {} not 200", failures.len());
    assert!(failures.is_empty(), "/health not 200: {failures:?}");
    assert!(answers >= 10, "/health was polled throughout ({answers} answers)");
    assert!(unready <= Duration::from_secs(5));

    worker.stop().await;
    notify_store::Store::connect_lazy(&settings["DATABASE_URL"], &settings["DATABASE_SCHEMA"], 1)
        .unwrap()
        .drop_schema()
        .await
        .unwrap();
}
