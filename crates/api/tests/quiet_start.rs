//! A clean start and stop of the notify-api process logs no ERROR and no WARN: an operator
//! who sees one must be able to trust that something is wrong.

use notify_testkit::rabbit;
use std::{process::Stdio, time::Duration};
use tokio::process::Command;

#[tokio::test]
async fn a_clean_start_and_stop_logs_no_error_or_warning() {
    let prefix = rabbit::unique_prefix("quiet-api");
    let schema = notify_testkit::db::schema_of(&prefix);
    let db_url = notify_testkit::db::database_url();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::env::temp_dir().join(format!("{prefix}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_notify-api"))
        .env("RABBITMQ_URL", rabbit::rabbitmq_url())
        .env("NOTIFY_PREFIX", &prefix)
        .env("API_HOST", "127.0.0.1")
        .env("API_PORT", port.to_string())
        .env("API_KEYS", "quiet:quiet-key-1b2c")
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
    let client = reqwest::Client::new();
    let ready = async {
        loop {
            match client.get(format!("http://127.0.0.1:{port}/ready")).send().await {
                Ok(r) if r.status() == 200 => break,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), ready).await.unwrap_or_else(|_| panic!("never ready\n{}", logs()));
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.unwrap().unwrap();
    let text = logs();
    assert!(status.success(), "{status}\n{text}");
    assert!(text.contains("notify-api listening"), "{text}");
    for line in text.lines() {
        assert!(!line.contains(" WARN ") && !line.contains(" ERROR "), "a clean run logged: {line}");
    }

    let conn = rabbit::connect().await;
    let settings: std::collections::HashMap<String, String> = [("NOTIFY_PREFIX".to_string(), prefix.clone())].into();
    let topology = notify_types::config::topology(&settings).unwrap();
    rabbit::delete_topology(&conn, &topology).await;
    notify_store::Store::connect_lazy(&db_url, &schema, 1).unwrap().drop_schema().await.unwrap();
    let _ = std::fs::remove_file(&log);
}
