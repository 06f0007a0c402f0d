//! A clean start and stop of the notify-worker process logs no ERROR and no WARN: an operator
//! who sees one must be able to trust that something is wrong. And a broker that refuses it is
//! one warning per attempt, in notify's words.

use notify_testkit::rabbit;
use std::{path::PathBuf, process::Stdio, time::Duration};
use tokio::process::{Child, Command};

/// A worker process of a test's own (prefix, schema) on `rabbitmq_url`, logging to a file.
struct Run {
    child: Child,
    log: PathBuf,
    prefix: String,
    schema: String,
    db_url: String,
}

impl Run {
    fn start(test: &str, rabbitmq_url: impl FnOnce(&str) -> String) -> Run {
        let prefix = rabbit::unique_prefix(test);
        let schema = notify_testkit::db::schema_of(&prefix);
        let db_url = notify_testkit::db::database_url();
        let log = std::env::temp_dir().join(format!("{prefix}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_notify-worker"))
            .env("RABBITMQ_URL", rabbitmq_url(&prefix))
            .env("NOTIFY_PREFIX", &prefix)
            .env("DATABASE_URL", &db_url)
            .env("DATABASE_SCHEMA", &schema)
            .env("ROUTES_FILE", concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/routes.toml"))
            .env("ORDER_WEBHOOK_URL", "https://hooks.example.com/orders")
            .env("WORKER_HTTP_HOST", "127.0.0.1")
            .env("WORKER_HTTP_PORT", "0")
            .env_remove("RUST_LOG")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Run { child, log, prefix, schema, db_url }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until `done` holds for the log so far.
    async fn wait_for(&self, what: &str, done: impl Fn(&str) -> bool) {
        let waiting = async {
            while !done(&self.logs()) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .unwrap_or_else(|_| panic!("{what} not seen within 30 s\n{}", self.logs()));
    }

    async fn cleanup(self) {
        notify_store::Store::connect_lazy(&self.db_url, &self.schema, 1).unwrap().drop_schema().await.unwrap();
        let _ = std::fs::remove_file(&self.log);
    }
}

#[tokio::test]
async fn a_clean_start_and_stop_logs_no_error_or_warning() {
    let mut run = Run::start("quiet-worker", |_| rabbit::rabbitmq_url());
    run.wait_for("consuming", |log| log.contains("connected; consuming")).await;
    let pid = run.child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(30), run.child.wait()).await.unwrap().unwrap();
    let text = run.logs();
    assert!(status.success(), "{status}\n{text}");
    assert!(text.contains("worker stopped"), "{text}");
    for line in text.lines() {
        assert!(!line.contains(" WARN ") && !line.contains(" ERROR "), "a clean run logged: {line}");
    }

    let conn = rabbit::connect().await;
    let settings: std::collections::HashMap<String, String> =
        [("NOTIFY_PREFIX".to_string(), run.prefix.clone())].into();
    rabbit::delete_topology(&conn, &notify_types::config::topology(&settings).unwrap()).await;
    run.cleanup().await;
}

#[tokio::test]
async fn a_wrong_vhost_is_one_warning_per_attempt_in_notifys_words() {
    let base = rabbit::rabbitmq_url();
    let mut run =
        Run::start("wrong-vhost", |prefix| format!("{}/no-such-vhost-{prefix}", base.rsplit_once('/').unwrap().0));
    let attempts = |log: &str| log.lines().filter(|l| l.contains("cannot reach RabbitMQ")).count();
    run.wait_for("two connection attempts", |log| attempts(log) >= 2).await;
    run.child.kill().await.unwrap();
    let text = run.logs();
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains(" WARN ")).collect();
    assert!(warnings.iter().all(|l| l.contains("cannot reach RabbitMQ") && l.contains("vhost")), "{text}");
    assert!(!text.contains(" ERROR "), "lapin's own errors are not shown by default:\n{text}");
    run.cleanup().await;
}
