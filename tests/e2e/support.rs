//! Shared setup of the end-to-end tests: an API on port 0 and an in-process worker, both on a
//! topology with a unique prefix (so tests run in parallel and leave nothing behind), a real
//! SMTP server on loopback, and a millisecond retry schedule.
#![allow(dead_code)]

use notify_api::{ApiConfig, Application};
use notify_testkit::logs::Captured;
use notify_testkit::{rabbit, smtp::SmtpServer};
use notify_types::{QueueType, Topology};
use notify_worker::{pipeline::DeliveryReport, Worker, WorkerConfig};
use std::{collections::HashMap, sync::OnceLock, time::Duration};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Retry schedule of the tests: three tiers in milliseconds.
pub const TEST_SCHEDULE: &str = "50ms,100ms,200ms";
pub const TEST_MAX_ATTEMPTS: u32 = 4;

/// Two keys, as in a rotation; the test client sends the first.
pub const API_KEYS: &str = "test-key-one-4f1d9c,test-key-two-8e2a7b";
pub const API_KEY: &str = "test-key-one-4f1d9c";

/// Settings as a user would give them, with the test's own prefix and broker.
pub fn settings(prefix: &str, broker_url: &str, smtp_url: &str) -> HashMap<String, String> {
    [
        ("RABBITMQ_URL", broker_url),
        ("NOTIFY_PREFIX", prefix),
        ("RETRY_SCHEDULE", TEST_SCHEDULE),
        ("MAX_ATTEMPTS", &TEST_MAX_ATTEMPTS.to_string()),
        ("SMTP_URL", smtp_url),
        ("EMAIL_FROM", "notify <notify@example.com>"),
        ("WORKER_CONCURRENCY", "16"),
        ("SMTP_TIMEOUT", "5s"),
        ("PUBLISH_TIMEOUT", "3s"),
        ("API_HOST", "127.0.0.1"),
        ("API_PORT", "0"),
        ("API_HTTP_WORKERS", "2"),
        ("WORKER_HTTP_HOST", "127.0.0.1"),
        ("WORKER_HTTP_PORT", "0"),
        ("DATABASE_URL", &database_url()),
        ("DATABASE_SCHEMA", &schema_of(prefix)),
        ("ROUTES_FILE", concat!(env!("CARGO_MANIFEST_DIR"), "/config/routes.toml")),
        ("WEBHOOK_ALLOW_PRIVATE", "true"),
        ("API_KEYS", API_KEYS),
        // Most tests read dead letters off the broker's dead queues; tests/dead_letters.rs
        // turns the indexer (which drains those queues into PostgreSQL) on.
        ("DEAD_LETTER_INDEX", "false"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

pub use notify_testkit::db::{database_url, schema_of};

/// Drops the test's schema.
pub async fn drop_schema(settings: &HashMap<String, String>) {
    let store = notify_store::Store::connect_lazy(&settings["DATABASE_URL"], &settings["DATABASE_SCHEMA"], 1).unwrap();
    store.drop_schema().await.expect("schema dropped");
}

/// What every test of this binary logged, at `debug`, formatted as the binaries format text
/// logs. One subscriber per process: the tests that read logs share it and look for markers of
/// their own. With `TEST_LOG=1` the logs are also printed (on the failing test's output).
pub fn logs() -> &'static Captured {
    use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let writer = logs.clone();
        let captured = fmt::layer()
            .with_ansi(false)
            .fmt_fields(notify_types::telemetry::text_fields())
            .with_writer(move || writer.clone());
        let printed = std::env::var_os("TEST_LOG").map(|_| fmt::layer().with_test_writer());
        tracing_subscriber::registry().with(EnvFilter::new("debug")).with(captured).with(printed).init();
        logs
    })
}

/// Tests that run RabbitMQ nodes of their own (a private broker, the private cluster) take
/// turns: in one test binary they would otherwise boot and kill Erlang nodes at the same time,
/// and on a 2-core machine a node then misses its start deadline. Hold the guard for the test.
pub async fn private_nodes_one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

/// Removes a test's queues, exchange and schema when the test panics before its own cleanup
/// (a leftover quorum queue holds broker file handles; enough of them wedge the broker).
pub struct Leftovers {
    topology: Topology,
    settings: HashMap<String, String>,
}

impl Leftovers {
    pub fn guard(topology: &Topology, settings: &HashMap<String, String>) -> Leftovers {
        Leftovers { topology: topology.clone(), settings: settings.clone() }
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let (topology, settings) = (self.topology.clone(), self.settings.clone());
        // The test's runtime is unwinding: clean up on a runtime of its own, bounded.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let work = async {
                    let amqp = rabbit::connect().await;
                    rabbit::delete_topology(&amqp, &topology).await;
                    let _ = amqp.close(200, "test failed; cleaned up".into()).await;
                    drop_schema(&settings).await;
                };
                if tokio::time::timeout(Duration::from_secs(30), work).await.is_err() {
                    eprintln!("cleanup of {} did not finish within 30 s", topology.prefix);
                }
            })
        });
        let _ = cleanup.join();
    }
}

pub struct TestApi {
    pub base: String,
    pub client: reqwest::Client,
    handle: actix_web::dev::ServerHandle,
}

impl TestApi {
    pub async fn start(settings: &HashMap<String, String>) -> anyhow::Result<TestApi> {
        logs();
        let mut config = ApiConfig::from_source(settings)?;
        config.handle_signals = false;
        let app = Application::build(config).await?;
        let base = format!("http://127.0.0.1:{}", app.port());
        let handle = app.handle();
        tokio::spawn(app.run_until_stopped());
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("authorization", format!("Bearer {API_KEY}").parse().unwrap());
        let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).default_headers(headers).build()?;
        Ok(TestApi { base, client, handle })
    }

    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client.post(format!("{}{path}", self.base)).json(body).send().await.expect("API reachable")
    }

    pub async fn stop(&self) {
        self.handle.stop(true).await;
    }
}

pub struct TestWorker {
    pub shutdown: CancellationToken,
    pub reports: mpsc::UnboundedReceiver<DeliveryReport>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestWorker {
    pub async fn start(settings: &HashMap<String, String>) -> anyhow::Result<TestWorker> {
        logs();
        let config = WorkerConfig::from_source(settings)?;
        let mut worker = Worker::build(config).await?;
        let reports = worker.reports();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker.run(shutdown.clone()));
        Ok(TestWorker { shutdown, reports, task })
    }

    /// Waits for `n` delivery reports (bounded), in the order they were settled.
    pub async fn next_reports(&mut self, n: usize, timeout: Duration) -> Vec<DeliveryReport> {
        let mut out = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.reports.recv()).await {
                Ok(Some(r)) => out.push(r),
                Ok(None) => panic!("worker stopped after {} of {n} reports", out.len()),
                Err(_) => panic!("only {} of {n} deliveries settled within {timeout:?}: {out:?}", out.len()),
            }
        }
        out
    }

    /// Waits for the worker to end by itself (e.g. a fatal startup error), bounded.
    pub async fn stop_result(self) -> anyhow::Result<()> {
        tokio::time::timeout(Duration::from_secs(30), self.task).await??
    }

    /// Graceful stop: in-flight deliveries finish, the connection closes (so nothing can stay
    /// unacked behind it).
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task).await??
    }
}

/// One test's world: its own prefix on the shared broker, an SMTP server, an API and a worker.
pub struct Harness {
    pub prefix: String,
    pub settings: HashMap<String, String>,
    pub topology: Topology,
    pub smtp: SmtpServer,
    pub api: TestApi,
    pub amqp: lapin::Connection,
    _leftovers: Leftovers,
}

pub const WEBHOOK_SECRET: &str = "whsec_dGVzdC1zZWNyZXQtZm9yLW9yZGVyLXdlYmhvb2tz";

/// The shipped routes file with `order.completed` aimed at `webhook_url`, written to a
/// file of the test's own.
pub fn routes_file(prefix: &str, webhook_url: &str) -> String {
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/routes.toml")).unwrap();
    let text = shipped
        .lines()
        .map(|l| {
            if l.starts_with("url = ") {
                format!("url = \"{webhook_url}\"")
            } else if l.starts_with("secret = ") {
                format!("secret = \"{WEBHOOK_SECRET}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = std::env::temp_dir().join(format!("{prefix}-routes.toml"));
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

impl Harness {
    pub async fn start(test: &str) -> Harness {
        Self::start_with(test, |_| {}).await
    }

    /// Starts with settings adjusted by `adjust` (before the API starts).
    pub async fn start_with(test: &str, adjust: impl FnOnce(&mut HashMap<String, String>)) -> Harness {
        let prefix = rabbit::unique_prefix(test);
        let smtp = SmtpServer::start().await;
        let mut settings = settings(&prefix, &rabbit::rabbitmq_url(), &smtp.url());
        adjust(&mut settings);
        let api = TestApi::start(&settings).await.expect("API starts");
        let topology = notify_types::config::topology(&settings).unwrap();
        assert_eq!(topology.queue_type, QueueType::Quorum);
        let amqp = rabbit::connect().await;
        let _leftovers = Leftovers::guard(&topology, &settings);
        Harness { prefix, settings, topology, smtp, api, amqp, _leftovers }
    }

    pub async fn worker(&self) -> TestWorker {
        TestWorker::start(&self.settings).await.expect("worker starts")
    }

    pub fn email_queue(&self) -> String {
        self.topology.queue(notify_types::Channel::Email)
    }

    pub fn email_dead_queue(&self) -> String {
        self.topology.dead_queue(notify_types::Channel::Email)
    }

    /// Ready messages in a queue of this test.
    pub async fn count(&self, queue: &str) -> u32 {
        rabbit::message_count(&self.amqp, queue).await.unwrap_or_else(|| panic!("queue {queue} exists"))
    }

    pub fn store(&self) -> notify_store::Store {
        notify_store::Store::connect_lazy(&self.settings["DATABASE_URL"], &self.settings["DATABASE_SCHEMA"], 4).unwrap()
    }

    /// Stops the API and removes every queue, the exchange and the schema of this test.
    pub async fn cleanup(self) {
        self.api.stop().await;
        drop_schema(&self.settings).await;
        rabbit::delete_topology(&self.amqp, &self.topology).await;
        let _ = self.amqp.close(200, "test done".into()).await;
    }
}

pub fn email(to: &str, subject: &str, body: &str) -> serde_json::Value {
    serde_json::json!({"to": to, "subject": subject, "body": body})
}
