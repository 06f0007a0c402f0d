//! What a run needs before its first phase and removes after its last: the prefix and schema
//! of its own, the settings of the API and worker processes, the broker connection and the
//! store; and deleting all of it again (also after ctrl-c, and for `--clean`).

use crate::{args::Args, procs::Bins};
use lapin::{options::QueueDeleteOptions, Connection};
use notify_store::Store;
use notify_testkit::rabbit;
use notify_types::{broker, config as cfg, Topology};
use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

/// The API key the bench's API accepts and its load generators send.
pub const API_KEY: &str = "bench-key-0123456789abcdef";

pub struct Ctx {
    pub args: Args,
    /// `None` in `--clean` mode.
    pub bins: Option<Bins>,
    /// Environment of the API and worker processes.
    pub settings: HashMap<String, String>,
    pub topology: Topology,
    pub conn: Connection,
    pub store: Store,
    pub logdir: PathBuf,
    /// The clock every latency in this process is counted on.
    pub base: Instant,
    pub prefetch: u16,
}

impl Ctx {
    pub fn bins(&self) -> anyhow::Result<&Bins> {
        self.bins.as_ref().ok_or_else(|| anyhow::anyhow!("the binaries were not built"))
    }
    pub fn raw_queue(&self) -> String {
        format!("{}.bench-raw", self.topology.prefix)
    }
    pub fn rtt_queue(&self) -> String {
        format!("{}.bench-rtt", self.topology.prefix)
    }
}

/// Everything here is on loopback and the broker is spoken to without TLS, so Postgres is too:
/// with sqlx's default `sslmode=prefer`, a server that offers TLS (Debian's does, with its
/// snakeoil certificate) gets every query encrypted both ways (in one same-machine comparison,
/// in-app drain: Postgres 74 -> 56 and worker 64 -> 51 µs of CPU per delivery without it). The
/// compose file's Postgres offers no TLS, so there it runs plain too. An explicit choice
/// (`sslmode`/`ssl-mode` in DATABASE_URL, or `PGSSLMODE`) is kept.
fn plain_on_loopback(url: String) -> String {
    let Ok(mut parsed) = url::Url::parse(&url) else { return url };
    let loopback = matches!(parsed.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    let chosen =
        parsed.query_pairs().any(|(k, _)| k == "sslmode" || k == "ssl-mode") || std::env::var_os("PGSSLMODE").is_some();
    if !loopback || chosen {
        return url;
    }
    parsed.query_pairs_mut().append_pair("sslmode", "disable");
    parsed.into()
}

/// Connects to the broker and Postgres under prefix `bench-{id}` and schema `bench_{id}`; a
/// fresh `id` unless one is given (`--clean` names the run to delete).
pub async fn setup(args: Args, bins: Option<Bins>, id: Option<String>) -> anyhow::Result<Ctx> {
    let id = &id.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..8].to_string());
    let prefix = format!("bench-{id}");
    let schema = format!("bench_{id}");
    let rabbitmq_url = rabbit::rabbitmq_url();
    let database_url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| cfg::DEFAULT_DATABASE_URL.into());
    let database_url = plain_on_loopback(database_url);
    let logdir = std::env::temp_dir().join(format!("notify-bench-{id}"));
    std::fs::create_dir_all(&logdir)?;
    let settings: HashMap<String, String> = [
        ("RABBITMQ_URL", rabbitmq_url.as_str()),
        ("NOTIFY_PREFIX", prefix.as_str()),
        ("QUEUE_TYPE", args.queue_type.as_str()),
        ("RETRY_SCHEDULE", cfg::DEFAULT_RETRY_SCHEDULE),
        ("DATABASE_URL", database_url.as_str()),
        ("DATABASE_SCHEMA", schema.as_str()),
        ("ROUTES_FILE", concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/routes.toml")),
        ("API_HOST", "127.0.0.1"),
        ("API_KEYS", API_KEY),
        ("WEBHOOK_ALLOW_PRIVATE", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let topology = cfg::topology(&settings)?;
    let conn = broker::connect(&rabbitmq_url, "notify-bench", Duration::from_secs(10))
        .await
        .map_err(|e| anyhow::anyhow!("RabbitMQ at {}: {e}", cfg::redact_url(&rabbitmq_url)))?;
    let store = Store::connect_lazy(&database_url, &schema, 2)?;
    store.ping().await.map_err(|e| anyhow::anyhow!("Postgres at {}: {e}", cfg::redact_url(&database_url)))?;
    // The raw consumer and the worker use the same prefetch: the worker's default (twice
    // WORKER_CONCURRENCY) unless set, passed to the worker explicitly so the two can't drift.
    let env_num = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<u64>().ok());
    let prefetch = env_num("WORKER_PREFETCH")
        .unwrap_or(env_num("WORKER_CONCURRENCY").unwrap_or(notify_worker::config::DEFAULT_CONCURRENCY) * 2)
        .min(65535) as u16;
    let mut settings = settings;
    settings.insert("WORKER_PREFETCH".into(), prefetch.to_string());
    Ok(Ctx { args, bins, settings, topology, conn, store, logdir, base: Instant::now(), prefetch })
}

/// Deletes the bench's queues, the topology of its prefix and its schema. Best effort: a
/// failure is printed, and the rest is still deleted.
pub async fn cleanup(ctx: &Ctx) {
    let conn = &ctx.conn;
    for q in [ctx.raw_queue(), ctx.rtt_queue()] {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
            let _ = ch.close(200, "bench cleanup".into()).await;
        }
    }
    let deleted = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(rabbit::delete_topology(
        conn,
        &ctx.topology,
    )))
    .await;
    if deleted.is_err() {
        eprintln!("notify-bench: could not delete every queue of prefix {}", ctx.topology.prefix);
    }
    if let Err(e) = ctx.store.drop_schema().await {
        eprintln!("notify-bench: could not drop schema {}: {e}", ctx.store.schema());
    }
    let _ = conn.close(200, "bench done".into()).await;
}
