//! An `Idempotency-Key` whose answer could not be saved after the broker confirmed the
//! publish (issue 12): a repeat of the request after the one-minute takeover time must get the
//! first 202 again and publish nothing. The failure is injected into the API's own store
//! (`notify-store`'s `test-faults` feature, absent from the binaries), and the API's clock is
//! moved past the minute instead of waiting through it. No worker runs: what was published
//! stays in the e-mail queue, where it is counted.

use crate::support;

use chrono::{DateTime, Utc};
use notify_api::{ApiConfig, Application, Clock};
use notify_testkit::rabbit;
use notify_types::{Channel, Topology};
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::{email, API_KEY};

const EMAIL: &str = "/api/v1/notifications/email";

/// A clock the test moves: the system's plus an offset in seconds.
fn movable_clock() -> (Clock, Arc<AtomicI64>) {
    let offset = Arc::new(AtomicI64::new(0));
    let read = offset.clone();
    let clock = Clock::from_fn(move || -> DateTime<Utc> {
        Utc::now() + chrono::Duration::seconds(read.load(Ordering::SeqCst))
    });
    (clock, offset)
}

/// A running API of this test's world.
struct Api {
    app_store: notify_store::Store,
    base: String,
    handle: actix_web::dev::ServerHandle,
}

async fn start_api(settings: &HashMap<String, String>, clock: Clock) -> Api {
    let mut config = ApiConfig::from_source(settings).unwrap();
    config.handle_signals = false;
    let app = Application::build_with_clock(config, clock).await.expect("API starts");
    let (base, handle, app_store) = (format!("http://127.0.0.1:{}", app.port()), app.handle(), app.store().clone());
    tokio::spawn(app.run_until_stopped());
    Api { app_store, base, handle }
}

/// POSTs `body` with the key; the status, the `Idempotent-Replayed` header and the body.
async fn post(api: &Api, key: &str, body: &Value) -> (u16, bool, Value) {
    let res = reqwest::Client::new()
        .post(format!("{}{EMAIL}", api.base))
        .bearer_auth(API_KEY)
        .header("Idempotency-Key", key)
        .json(body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("API reachable");
    let replayed = res.headers().get("idempotent-replayed").is_some();
    (res.status().as_u16(), replayed, res.json().await.unwrap())
}

/// Runs `body` with the test's settings and topology, then deletes its queues and schema,
/// also when `body` panics (the panic is re-raised afterwards).
async fn with_world<F, Fut>(test: &str, body: F)
where
    F: FnOnce(HashMap<String, String>, Topology) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let prefix = rabbit::unique_prefix(test);
    // No worker runs, so the SMTP address is never used.
    let settings = support::settings(&prefix, &rabbit::rabbitmq_url(), "smtp://127.0.0.1:1");
    let topology = notify_types::config::topology(&settings).unwrap();
    let result = tokio::spawn(body(settings.clone(), topology.clone())).await;
    let amqp = rabbit::connect().await;
    rabbit::delete_topology(&amqp, &topology).await;
    let _ = amqp.close(200, "test done".into()).await;
    support::drop_schema(&settings).await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn queued(topology: &Topology) -> u32 {
    let amqp = rabbit::connect().await;
    let n = rabbit::message_count(&amqp, &topology.queue(Channel::Email)).await.expect("the e-mail queue exists");
    let _ = amqp.close(200, "counted".into()).await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_answer_failed_once_to_save_answers_the_first_202_a_minute_later() {
    with_world("idem-save-fails-once", |settings, topology| async move {
        let (clock, offset) = movable_clock();
        let api = start_api(&settings, clock).await;
        let body = email("once@example.com", "once", "only once");

        api.app_store.fail_idempotency_completions(1);
        let (status, replayed, first) = post(&api, "key-1", &body).await;
        assert_eq!((status, replayed), (202, false), "{first}");
        assert_eq!(queued(&topology).await, 1, "published once");

        // 61 s later (past the takeover minute) the caller retries with the same key.
        offset.store(61, Ordering::SeqCst);
        let (status, replayed, again) = post(&api, "key-1", &body).await;
        assert_eq!((status, replayed), (202, true), "{again}");
        assert_eq!(again, first, "the first 202, same id");
        assert_eq!(queued(&topology).await, 1, "nothing published again");
        api.handle.stop(true).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_answer_is_not_saved_yet_answers_the_first_202_on_every_instance() {
    with_world("idem-save-keeps-failing", |settings, topology| async move {
        let (clock, offset) = movable_clock();
        let one = start_api(&settings, clock.clone()).await;
        let two = start_api(&settings, clock).await;
        let body = email("twice@example.com", "once", "only once");

        // The database refuses the answer for as long as the request waits, and on.
        one.app_store.fail_idempotency_completions(usize::MAX);
        let (status, _, first) = post(&one, "key-2", &body).await;
        assert_eq!(status, 202, "{first}");
        assert_eq!(queued(&topology).await, 1);

        // A minute later the key is still pending in the database. The instance that published
        // answers from what it knows.
        offset.store(61, Ordering::SeqCst);
        let (status, replayed, again) = post(&one, "key-2", &body).await;
        assert_eq!((status, replayed, &again), (202, true, &first));
        // Another request under the key is still another request.
        let (status, _, _) = post(&one, "key-2", &email("other@example.com", "x", "y")).await;
        assert_eq!(status, 422);

        // The database takes writes again; another instance finds the key stale and waits for
        // the owner's background save rather than publishing again.
        one.app_store.fail_idempotency_completions(0);
        let (status, replayed, elsewhere) = post(&two, "key-2", &body).await;
        assert_eq!((status, replayed, &elsewhere), (202, true, &first));
        assert_eq!(queued(&topology).await, 1, "nothing published again");
        one.handle.stop(true).await;
        two.handle.stop(true).await;
    })
    .await;
}
