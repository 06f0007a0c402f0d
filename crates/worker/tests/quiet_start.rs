//! A clean start and stop of the notify-worker process logs no ERROR and no WARN: an operator
//! who sees one must be able to trust that something is wrong.

use notify_testkit::rabbit;
use std::{process::Stdio, time::Duration};
use tokio::process::Command;

#[tokio::test]
async fn a_clean_start_and_stop_logs_no_error_or_warning() {
    let prefix = rabbit::unique_prefix("quiet-worker");
    let schema = prefix.replace(['-', '.'], "_");
    let db_url = std::env::var("DATABASE_URL").unwrap_or_else(|_| notify_types::config::DEFAULT_DATABASE_URL.into());
    let log = std::env::temp_dir().join(format!("{prefix}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_notify-worker"))
        .env("RABBITMQ_URL", rabbit::rabbitmq_url())
        .env("NOTIFY_PREFIX", &prefix)
        .env("DATABASE_URL", &db_url)
        .env("DATABASE_SCHEMA", &schema)
        .env("ROUTES_FILE", concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/routes.toml"))
        .env("ORDER_WEBHOOK_URL", "https://hooks.example.com/orders")
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let consuming = async {
        while !logs().contains("connected; consuming") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), consuming)
        .await
        .unwrap_or_else(|_| panic!("never consumed\n{}", logs()));
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.unwrap().unwrap();
    let text = logs();
    assert!(status.success(), "{status}\n{text}");
    assert!(text.contains("worker stopped"), "{text}");
    for line in text.lines() {
        assert!(!line.contains(" WARN ") && !line.contains(" ERROR "), "a clean run logged: {line}");
    }

    let conn = rabbit::connect().await;
    let settings: std::collections::HashMap<String, String> = [("NOTIFY_PREFIX".to_string(), prefix.clone())].into();
    rabbit::delete_topology(&conn, &notify_types::config::topology(&settings).unwrap()).await;
    notify_store::Store::connect_lazy(&db_url, &schema, 1).unwrap().drop_schema().await.unwrap();
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn a_wrong_vhost_is_one_warning_per_attempt_in_notifys_words() {
    let prefix = rabbit::unique_prefix("wrong-vhost");
    let schema = prefix.replace(['-', '.'], "_");
    let db_url = std::env::var("DATABASE_URL").unwrap_or_else(|_| notify_types::config::DEFAULT_DATABASE_URL.into());
    let base = rabbit::rabbitmq_url();
    let url = format!("{}/no-such-vhost-{prefix}", base.rsplit_once('/').unwrap().0);
    let log = std::env::temp_dir().join(format!("{prefix}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_notify-worker"))
        .env("RABBITMQ_URL", &url)
        .env("NOTIFY_PREFIX", &prefix)
        .env("DATABASE_URL", &db_url)
        .env("DATABASE_SCHEMA", &schema)
        .env("ROUTES_FILE", concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/routes.toml"))
        .env("ORDER_WEBHOOK_URL", "https://hooks.example.com/orders")
        .env_remove("RUST_LOG")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let attempts = || logs().lines().filter(|l| l.contains("cannot reach RabbitMQ")).count();
    let two = async {
        while attempts() < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), two)
        .await
        .unwrap_or_else(|_| panic!("no retries logged\n{}", logs()));
    child.kill().await.unwrap();
    let text = logs();
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains(" WARN ")).collect();
    assert!(warnings.iter().all(|l| l.contains("cannot reach RabbitMQ") && l.contains("vhost")), "{text}");
    assert!(!text.contains(" ERROR "), "lapin's own errors are not shown by default:\n{text}");
    notify_store::Store::connect_lazy(&db_url, &schema, 1).unwrap().drop_schema().await.unwrap();
    let _ = std::fs::remove_file(&log);
}
