//! SIGTERM to the notify-api process under load: in-flight requests finish, the process exits
//! 0, and every 202 it gave is a message in the queue.

use notify_testkit::rabbit;
use notify_types::{Channel, QueueType, Topology};
use std::{
    collections::{HashMap, HashSet},
    process::Stdio,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tokio::process::Command;

const API_KEY: &str = "shutdown-test-key-5c1e9a";
const TASKS: usize = 32;
const MAX_REQUESTS: usize = 5000;
const LOAD_TIME: Duration = Duration::from_secs(10);
/// A request that takes longer than this counts as hung.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Completed requests before the SIGTERM.
const TERM_AFTER: usize = 1000;

#[derive(Debug)]
enum Outcome {
    /// 202 with the notification id.
    Accepted(String),
    /// 503: nothing accepted, retry later.
    Unavailable,
    /// The connection was refused: the request never reached the API.
    Refused,
    /// Sent, but no complete response (connection closed mid-shutdown): it may or may not
    /// have been accepted.
    Lost(String),
    /// No answer within the client's timeout.
    Hung,
    /// Any other status.
    Other(u16),
}

struct Sent {
    request: String,
    outcome: Outcome,
    at: Instant,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn fire(
    task: usize,
    client: reqwest::Client,
    url: String,
    started: Instant,
    stop: Arc<AtomicBool>,
    issued: Arc<AtomicUsize>,
    completed: Arc<AtomicUsize>,
) -> Vec<Sent> {
    let body = serde_json::json!({"to": "load@example.com", "subject": "shutdown", "body": "b"});
    let mut sent = Vec::new();
    for n in 0..MAX_REQUESTS {
        if stop.load(Ordering::Relaxed)
            || started.elapsed() > LOAD_TIME
            || issued.fetch_add(1, Ordering::Relaxed) >= MAX_REQUESTS
        {
            break;
        }
        let request = format!("sd-{task}-{n}");
        let outcome = match client.post(&url).header("x-request-id", &request).json(&body).send().await {
            Ok(resp) if resp.status().as_u16() == 202 => match resp.json::<serde_json::Value>().await {
                Ok(v) => Outcome::Accepted(v["id"].as_str().expect("202 body has the id").to_string()),
                Err(e) => Outcome::Lost(format!("202 without a complete body: {e}")),
            },
            Ok(resp) if resp.status().as_u16() == 503 => Outcome::Unavailable,
            Ok(resp) => Outcome::Other(resp.status().as_u16()),
            Err(e) if e.is_timeout() => Outcome::Hung,
            Err(e) if e.is_connect() => Outcome::Refused,
            Err(e) => Outcome::Lost(format!("{e:?}")),
        };
        let refused = matches!(outcome, Outcome::Refused);
        sent.push(Sent { request, outcome, at: Instant::now() });
        completed.fetch_add(1, Ordering::Relaxed);
        if refused {
            // The API is gone; a client would back off here.
            break;
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_in_flight_and_exits_cleanly() {
    let prefix = rabbit::unique_prefix("api-sigterm");
    let schema = notify_testkit::db::schema_of(&prefix);
    let db_url = notify_testkit::db::database_url();
    // What the API declares with these settings (for counting and cleanup).
    let topology = Topology::new(&prefix, QueueType::Quorum, vec![Duration::from_millis(50)]);
    let conn = rabbit::connect().await;
    let port = free_port();
    let log = std::env::temp_dir().join(format!("{prefix}-api.log"));
    let out = std::fs::File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_notify-api"))
        .env("RABBITMQ_URL", rabbit::rabbitmq_url())
        .env("NOTIFY_PREFIX", &prefix)
        .env("RETRY_SCHEDULE", "50ms")
        .env("API_HOST", "127.0.0.1")
        .env("API_PORT", port.to_string())
        .env("API_KEYS", API_KEY)
        .env("DATABASE_URL", &db_url)
        .env("DATABASE_SCHEMA", &schema)
        .env("ROUTES_FILE", concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/routes.toml"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .spawn()
        .expect("api binary runs");
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let base = format!("http://127.0.0.1:{port}");

    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {API_KEY}").parse().unwrap());
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .default_headers(headers)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(resp) = client.get(format!("{base}/ready")).send().await {
            if resp.status().is_success() {
                break;
            }
        }
        assert!(child.try_wait().unwrap().is_none(), "the API exited at start\n{}", logs());
        assert!(Instant::now() < deadline, "the API was not ready in 30 s\n{}", logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicUsize::new(0));
    let url = format!("{base}/api/v1/notifications/email");
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let args = (client.clone(), url.clone(), stop.clone(), issued.clone(), completed.clone());
            tokio::spawn(fire(t, args.0, args.1, started, args.2, args.3, args.4))
        })
        .collect();

    // SIGTERM in the middle of the load.
    while completed.load(Ordering::Relaxed) < TERM_AFTER && started.elapsed() < LOAD_TIME {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done_at_term = completed.load(Ordering::Relaxed);
    let term_at = Instant::now();
    let pid = child.id().expect("API running").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(status) => status.unwrap(),
        Err(_) => panic!("the API was still running 30 s after SIGTERM\n{}", logs()),
    };
    let exit_took = term_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for task in tasks {
        sent.extend(task.await.unwrap());
    }
    let api_logs = logs();
    assert!(status.success(), "exit code 0 after SIGTERM, got {status:?}\n{api_logs}");

    let queued = rabbit::drain(&conn, &topology.queue(Channel::Email), MAX_REQUESTS + 100).await;
    // request id (correlation id) -> notification id of each queued message
    let queued: HashMap<String, String> = queued
        .iter()
        .map(|(p, _)| {
            (
                p.correlation_id().as_ref().expect("correlation id").to_string(),
                p.message_id().as_ref().expect("message id").to_string(),
            )
        })
        .collect();
    let queued_ids: HashSet<&String> = queued.values().collect();

    let count = |f: fn(&Outcome) -> bool| sent.iter().filter(|s| f(&s.outcome)).count();
    let accepted = count(|o| matches!(o, Outcome::Accepted(_)));
    let unavailable = count(|o| matches!(o, Outcome::Unavailable));
    let refused = count(|o| matches!(o, Outcome::Refused));
    let lost = count(|o| matches!(o, Outcome::Lost(_)));
    let accepted_after_term =
        sent.iter().filter(|s| matches!(s.outcome, Outcome::Accepted(_)) && s.at > term_at).count();
    let lost_but_queued =
        sent.iter().filter(|s| matches!(s.outcome, Outcome::Lost(_)) && queued.contains_key(&s.request)).count();
    println!(
        "{} requests from {TASKS} tasks, SIGTERM after {done_at_term}: {accepted} x 202 ({accepted_after_term} answered \
         after SIGTERM), {unavailable} x 503, {refused} refused, {lost} lost mid-shutdown ({lost_but_queued} of them \
         queued); {} messages queued; exit 0 {exit_took:?} after SIGTERM",
        sent.len(),
        queued.len()
    );
    for s in &sent {
        if let Outcome::Lost(error) = &s.outcome {
            println!("  lost: {} {error}", s.request);
        }
    }

    assert!(exit_took < Duration::from_secs(30), "exit took {exit_took:?}");
    let hung = count(|o| matches!(o, Outcome::Hung));
    assert_eq!(hung, 0, "no request hangs past {REQUEST_TIMEOUT:?}");
    let other: Vec<u16> =
        sent.iter().filter_map(|s| if let Outcome::Other(c) = s.outcome { Some(c) } else { None }).collect();
    assert!(other.is_empty(), "only 202, 503 or a connection error; got statuses {other:?}");
    assert!(accepted >= TERM_AFTER / 2, "the load was accepted before the SIGTERM ({accepted} x 202)");
    // Every 202 is a message in the queue, under the id the caller got.
    for s in &sent {
        if let Outcome::Accepted(id) = &s.outcome {
            assert_eq!(queued.get(&s.request), Some(id), "202 for {} (id {id}) is not in the queue", s.request);
        }
    }
    assert_eq!(queued_ids.len(), queued.len(), "one message per request");
    // Nothing queued that the caller was told was not accepted.
    let may_be_queued: HashSet<&str> = sent
        .iter()
        .filter(|s| matches!(s.outcome, Outcome::Accepted(_) | Outcome::Lost(_)))
        .map(|s| s.request.as_str())
        .collect();
    let unexpected: Vec<&String> = queued.keys().filter(|r| !may_be_queued.contains(r.as_str())).collect();
    assert!(unexpected.is_empty(), "queued without a 202 or a lost response: {unexpected:?}");
    assert_eq!(queued.len(), accepted + lost_but_queued);

    rabbit::delete_topology(&conn, &topology).await;
    notify_store::Store::connect_lazy(&db_url, &schema, 1).unwrap().drop_schema().await.unwrap();
    let _ = std::fs::remove_file(&log);
    let _ = conn.close(200, "test done".into()).await;
}
