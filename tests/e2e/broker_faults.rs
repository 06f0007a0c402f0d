//! Broker faults under load, on a private RabbitMQ node (the machine's shared node is never
//! touched): a crash and restart in the middle of a steady stream of POSTs, and a memory alarm
//! while the worker has a backlog. The API and the worker run in-process and are never
//! restarted; they must ride out both faults by themselves.

use crate::support;

use notify_testkit::{private_broker::PrivateBroker, rabbit, smtp::Reply, smtp::SmtpServer};
use notify_worker::{outcome::Settled, pipeline::DeliveryReport};
use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use support::{email, settings, TestApi, TestWorker};
use tokio::sync::{mpsc, oneshot, Semaphore};

const PATH: &str = "/api/v1/notifications/email";
/// The acceptance bound for a 503: a caller must not hang while the broker is in trouble.
const MAX_503_LATENCY: Duration = Duration::from_secs(5);
/// The acceptance bound for recovering after the broker is back, without restarting anything.
const MAX_RECOVERY: Duration = Duration::from_secs(30);

/// One POST of the load: when it was sent, how long it took, what came back.
#[derive(Debug, Clone)]
struct Sample {
    seq: usize,
    sent: Instant,
    took: Duration,
    /// HTTP status, or 0 when no response came (connection error, client timeout).
    status: u16,
    retry_after: bool,
    /// The notification id of a 202.
    id: Option<String>,
}

async fn post(client: &reqwest::Client, url: &str, seq: usize) -> Sample {
    let sent = Instant::now();
    let body = email(&format!("user{seq}@example.com"), &format!("load {seq}"), "steady stream");
    let res = client.post(url).json(&body).send().await;
    let took = sent.elapsed();
    match res {
        Ok(res) => {
            let status = res.status().as_u16();
            let retry_after = res.headers().contains_key("retry-after");
            let id = if status == 202 {
                let body: serde_json::Value = res.json().await.unwrap_or_default();
                body["id"].as_str().map(str::to_string)
            } else {
                None
            };
            Sample { seq, sent, took, status, retry_after, id }
        }
        Err(e) => {
            println!("POST {seq}: no response after {took:?}: {e}");
            Sample { seq, sent, took, status: 0, retry_after: false, id: None }
        }
    }
}

/// The `q`-quantile of `values` (sorted here), or zero for none.
fn quantile(values: &mut [Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort();
    values[((values.len() - 1) as f64 * q).round() as usize]
}

/// Takes the worker's delivery reports into a list stamped with the time each arrived, so the
/// test can tell when the worker delivered again after the fault.
fn collect_reports(worker: &mut TestWorker) -> Arc<Mutex<Vec<(Instant, DeliveryReport)>>> {
    let (_, closed) = mpsc::unbounded_channel();
    let mut rx = std::mem::replace(&mut worker.reports, closed);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Some(report) = rx.recv().await {
            sink.lock().unwrap().push((Instant::now(), report));
        }
    });
    seen
}

/// Message-IDs of the mails received, with how often each came.
fn message_ids(smtp: &SmtpServer) -> HashMap<String, usize> {
    let mut ids = HashMap::new();
    for mail in smtp.mails() {
        *ids.entry(mail.message_id.clone().unwrap_or_default()).or_insert(0) += 1;
    }
    ids
}

/// Waits (bounded) until a mail with Message-ID `<{id}@notify>` came for every id.
async fn wait_delivered(smtp: &SmtpServer, ids: &HashSet<String>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = message_ids(smtp);
        let missing: Vec<&String> = ids.iter().filter(|id| !got.contains_key(&format!("<{id}@notify>"))).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} accepted notifications not delivered within {timeout:?}, e.g. {:?}",
            missing.len(),
            ids.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The worker has drained everything: nothing ready in the queue, then a graceful stop (which
/// finishes in-flight deliveries), and still nothing ready (nothing was handed back).
async fn drain_and_stop(worker: TestWorker, broker: &PrivateBroker, queue: &str) {
    let conn = rabbit::connect_to(&broker.url()).await;
    rabbit::wait_for_count(&conn, queue, 0, Duration::from_secs(60)).await;
    worker.stop().await.expect("worker stops cleanly");
    rabbit::wait_for_count(&conn, queue, 0, Duration::from_secs(10)).await;
    let _ = conn.close(200, "counted".into()).await;
}

// ---------------------------------------------------------------------------------------------

/// Requests of the load in all; more only if the API has not recovered by then.
const TARGET_POSTS: usize = 5_000;
/// ~250 requests per second.
const PACE: Duration = Duration::from_millis(4);
const IN_FLIGHT: usize = 16;
/// The broker is killed once this many requests were sent (~4 s in).
const KILL_AFTER: usize = 1_000;
/// After the broker is back, the load goes on at least until this many more 202s came.
const ACCEPTED_AFTER_RETURN: usize = 250;
/// Hard bounds of the load, whatever happens.
const MAX_POSTS: usize = 15_000;
const LOAD_DEADLINE: Duration = Duration::from_secs(80);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_during_5000_posts_loses_no_202() {
    let _turn = support::private_nodes_one_at_a_time().await;
    let broker = PrivateBroker::start().await.expect("private broker starts");
    let smtp = SmtpServer::start().await;
    let prefix = rabbit::unique_prefix("broker-restart");
    let s = settings(&prefix, &broker.url(), &smtp.url());
    let queue = notify_types::config::topology(&s).unwrap().queue(notify_types::Channel::Email);
    let api = TestApi::start(&s).await.expect("API starts");
    let mut worker = TestWorker::start(&s).await.expect("worker starts");
    let reports = collect_reports(&mut worker);

    // The load: a pacing loop, at most IN_FLIGHT requests at once.
    let back = Arc::new(AtomicBool::new(false));
    let accepted_after_return = Arc::new(AtomicUsize::new(0));
    let (kill_tx, kill_rx) = oneshot::channel::<()>();
    let load = {
        let (client, url) = (api.client.clone(), format!("{}{PATH}", api.base));
        let (back, accepted_after_return) = (back.clone(), accepted_after_return.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let permits = Arc::new(Semaphore::new(IN_FLIGHT));
            let mut tick = tokio::time::interval(PACE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut kill_tx = Some(kill_tx);
            let mut requests = Vec::new();
            for seq in 0..MAX_POSTS {
                let recovered = accepted_after_return.load(Ordering::Relaxed) >= ACCEPTED_AFTER_RETURN;
                if (seq >= TARGET_POSTS && recovered) || started.elapsed() > LOAD_DEADLINE {
                    break;
                }
                if seq == KILL_AFTER {
                    let _ = kill_tx.take().map(|tx| tx.send(()));
                }
                tick.tick().await;
                let permit = permits.clone().acquire_owned().await.unwrap();
                let (client, url, back, counter) =
                    (client.clone(), url.clone(), back.clone(), accepted_after_return.clone());
                requests.push(tokio::spawn(async move {
                    let after_return = back.load(Ordering::Relaxed);
                    let sample = post(&client, &url, seq).await;
                    if after_return && sample.status == 202 {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(permit);
                    sample
                }));
            }
            let mut samples = Vec::with_capacity(requests.len());
            for r in requests {
                samples.push(r.await.unwrap());
            }
            (samples, started.elapsed())
        })
    };

    kill_rx.await.expect("the load reaches the kill point");
    let mails_before_kill = smtp.mails().len();
    broker.kill().await.expect("broker killed (kill -9)");
    let killed = Instant::now();
    println!("broker killed after {KILL_AFTER} requests ({mails_before_kill} mails delivered so far)");
    broker.restart().await.expect("broker restarts");
    let returned = Instant::now();
    back.store(true, Ordering::Relaxed);
    println!("broker back after {:?} down", returned - killed);

    let (samples, load_took) = load.await.unwrap();

    // Statuses: 202 or 503, nothing else.
    let count = |status: u16| samples.iter().filter(|s| s.status == status).count();
    let (accepted, unavailable) = (count(202), count(503));
    let other = samples.len() - accepted - unavailable;
    println!(
        "{} POSTs in {load_took:?} ({:.0}/s): {accepted} × 202, {unavailable} × 503, {other} other",
        samples.len(),
        samples.len() as f64 / load_took.as_secs_f64()
    );
    let others: Vec<(usize, u16)> =
        samples.iter().filter(|s| ![202, 503].contains(&s.status)).map(|s| (s.seq, s.status)).collect();
    assert!(others.is_empty(), "only 202 and 503 expected, got (seq, status) {others:?}");
    assert!(unavailable > 0, "the outage must have been seen by some requests");

    // 503s: fast, with Retry-After.
    let mut lat503: Vec<Duration> = samples.iter().filter(|s| s.status == 503).map(|s| s.took).collect();
    let mut lat202: Vec<Duration> = samples.iter().filter(|s| s.status == 202).map(|s| s.took).collect();
    let (p50_503, max_503) = (quantile(&mut lat503, 0.5), quantile(&mut lat503, 1.0));
    println!(
        "503 latency: p50 {p50_503:?}, p99 {:?}, max {max_503:?}; 202 latency: p50 {:?}, p99 {:?}, max {:?}",
        quantile(&mut lat503, 0.99),
        quantile(&mut lat202, 0.5),
        quantile(&mut lat202, 0.99),
        quantile(&mut lat202, 1.0)
    );
    assert!(max_503 < MAX_503_LATENCY, "a 503 took {max_503:?}");
    assert!(samples.iter().filter(|s| s.status == 503).all(|s| s.retry_after), "every 503 carries Retry-After");

    // The API accepts again without being restarted.
    let first_202_after = samples
        .iter()
        .filter(|s| s.status == 202 && s.sent > killed)
        .map(|s| s.sent + s.took)
        .min()
        .expect("202s again after the broker returned");
    let api_recovery = first_202_after.saturating_duration_since(returned);
    let ids: HashSet<String> = samples.iter().filter_map(|s| s.id.clone()).collect();
    assert_eq!(ids.len(), accepted, "every 202 carries its own id");

    // Every 202 is delivered, once.
    wait_delivered(&smtp, &ids, Duration::from_secs(90)).await;
    let (first_settled_after, first_delivered_after) = {
        let reports = reports.lock().unwrap();
        let after = |delivered_only: bool| {
            reports
                .iter()
                .find(|(at, r)| *at > returned && (!delivered_only || r.settled == Settled::Delivered))
                .map(|(at, _)| at.saturating_duration_since(returned))
        };
        (after(false), after(true))
    };
    let worker_recovery = first_delivered_after.expect("the worker delivers after the broker returned");
    let refused_after_recovery = samples.iter().filter(|s| s.status == 503 && s.sent > first_202_after).count();
    println!(
        "after the broker returned: first 202 in {api_recovery:?}, worker settling again in {:?} and mailing \
         again in {worker_recovery:?}; {refused_after_recovery} × 503 after the first 202",
        first_settled_after.unwrap_or_default()
    );
    assert!(api_recovery < MAX_RECOVERY, "API accepted again only {api_recovery:?} after the broker returned");
    assert!(
        worker_recovery < MAX_RECOVERY,
        "worker delivered again only {worker_recovery:?} after the broker returned"
    );

    drain_and_stop(worker, &broker, &queue).await;
    let mails = smtp.mails();
    let received = message_ids(&smtp);
    let by_seq: HashMap<usize, &Sample> = samples.iter().map(|s| (s.seq, s)).collect();
    let mut delivered_despite_503 = 0;
    for mail in &mails {
        let seq: usize = mail.subject.strip_prefix("load ").and_then(|n| n.parse().ok()).expect("a mail of the load");
        let sample = by_seq[&seq];
        match &sample.id {
            Some(id) => assert_eq!(mail.message_id.as_deref(), Some(format!("<{id}@notify>").as_str())),
            // The publish reached the broker but its confirm was lost with the crash: the
            // caller was told to retry, and the message was kept. At-least-once, as promised.
            None => delivered_despite_503 += 1,
        }
    }
    let (settled_delivered, guarded) = {
        let reports = reports.lock().unwrap();
        let n = |want: Settled| reports.iter().filter(|(_, r)| r.settled == want).count();
        (n(Settled::Delivered), n(Settled::AlreadyDelivered))
    };
    println!(
        "{} mails, {} distinct Message-IDs; {delivered_despite_503} of them for requests answered 503; \
         {settled_delivered} deliveries settled, {guarded} redeliveries acked by the send guard without sending",
        mails.len(),
        received.len()
    );
    assert_eq!(mails.len(), received.len(), "no notification was mailed twice");
    assert!(ids.iter().all(|id| received.contains_key(&format!("<{id}@notify>"))));

    api.stop().await;
    support::drop_schema(&s).await;
}

// ---------------------------------------------------------------------------------------------

const BACKLOG: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_alarm_gives_503_and_ready_false_while_the_worker_keeps_draining() {
    let _turn = support::private_nodes_one_at_a_time().await;
    let broker = PrivateBroker::start().await.expect("private broker starts");
    let smtp = SmtpServer::start().await;
    // Slow while the backlog builds and the alarm goes up, so the worker is surely mid-drain.
    smtp.set_delay(Duration::from_millis(500));
    let prefix = rabbit::unique_prefix("memory-alarm");
    let mut s = settings(&prefix, &broker.url(), &smtp.url());
    // The shipped publish timeout (5 s): a POST that waited for it would miss the 5 s bound.
    s.remove("PUBLISH_TIMEOUT");
    let queue = notify_types::config::topology(&s).unwrap().queue(notify_types::Channel::Email);
    let api = TestApi::start(&s).await.expect("API starts");
    let mut worker = TestWorker::start(&s).await.expect("worker starts");
    let reports = collect_reports(&mut worker);
    let ready = || async {
        let res = api.client.get(format!("{}/ready", api.base)).send().await.expect("API reachable");
        let status = res.status().as_u16();
        (status, res.json::<serde_json::Value>().await.unwrap_or_default())
    };
    let mut ids = HashSet::new();

    // The backlog.
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(16));
    let fill = (0..BACKLOG).map(|seq| {
        let (client, url, permits) = (api.client.clone(), format!("{}{PATH}", api.base), permits.clone());
        tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            post(&client, &url, seq).await
        })
    });
    for sample in futures_util::future::join_all(fill).await {
        let sample = sample.unwrap();
        assert_eq!(sample.status, 202, "POST {} before the alarm", sample.seq);
        ids.insert(sample.id.unwrap());
    }
    let conn = rabbit::connect_to(&broker.url()).await;
    let backlog = rabbit::message_count(&conn, &queue).await.unwrap();
    println!("{BACKLOG} accepted in {:?}; {backlog} waiting in the queue", started.elapsed());
    assert!(backlog > 100, "the worker must still have a backlog when the alarm goes off");

    broker.set_memory_alarm(true).await.expect("memory alarm raised");
    let alarm_on = Instant::now();
    let mails_at_alarm = smtp.mails().len();
    let (status, body) = ready().await;
    println!("alarm on; /ready before the API published anything: {status} {}", body["checks"]);

    // RabbitMQ tells a connection it is blocked (connection.blocked) only when it publishes,
    // and stops reading from it: the publish that finds the alarm is held until the alarm
    // clears. The API answers that request 503 on the notice, not at its publish timeout,
    // and every later one at once. (A 202 here would be fine too: allowed, counted.)
    let mut seq = BACKLOG;
    let mut lat503 = Vec::new();
    let mut accepted_during_alarm = 0;
    while lat503.is_empty() {
        assert!(seq < BACKLOG + 10, "no 503 in 10 POSTs during the alarm");
        let sample = post(&api.client, &format!("{}{PATH}", api.base), seq).await;
        seq += 1;
        println!("POST during the alarm: {} in {:?}", sample.status, sample.took);
        assert!(sample.took < MAX_503_LATENCY, "answered in {:?}", sample.took);
        match sample.status {
            202 => {
                accepted_during_alarm += 1;
                ids.insert(sample.id.unwrap());
            }
            503 => lat503.push(sample.took),
            other => panic!("POST during the alarm answered {other}"),
        }
    }
    for _ in 0..20 {
        let sample = post(&api.client, &format!("{}{PATH}", api.base), seq).await;
        seq += 1;
        assert_eq!(sample.status, 503, "blocked: POST {} answered {}", sample.seq, sample.status);
        assert!(sample.retry_after, "503 with Retry-After");
        lat503.push(sample.took);
    }
    let (p50, max) = (quantile(&mut lat503, 0.5), quantile(&mut lat503, 1.0));
    println!(
        "during the alarm: {accepted_during_alarm} POST(s) accepted before the block, then {} × 503: p50 {p50:?}, max {max:?}",
        lat503.len()
    );
    assert!(max < MAX_503_LATENCY, "a 503 took {max:?}");
    let (status, body) = ready().await;
    println!("/ready during the alarm: {status} {body}");
    assert_eq!(status, 503);
    assert_eq!(body["checks"]["broker"], "blocked");

    // The worker keeps draining while the alarm is on: faster SMTP now, and two transient
    // failures so that it must also publish retries (on its own publishing connection, which
    // the broker blocks) while its acks must go on.
    smtp.script(vec![Reply::transient(), Reply::transient()]);
    smtp.set_delay(Duration::from_millis(20));
    let target = ids.len() - 2;
    let deadline = Instant::now() + Duration::from_secs(40);
    while smtp.mails().len() < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained_during_alarm = smtp.mails().len() - mails_at_alarm;
    let (status, body) = ready().await;
    println!(
        "{drained_during_alarm} mails delivered during the alarm ({} of {} accepted so far, {:?} after the alarm went on); /ready still {status} {}",
        smtp.mails().len(),
        ids.len(),
        alarm_on.elapsed(),
        body["checks"]
    );
    assert_eq!(body["checks"]["broker"], "blocked", "the alarm is still on");
    assert!(drained_during_alarm >= 100, "the worker must keep draining during the alarm");

    // Clear it: 202 again, ready again.
    let clearing = Instant::now();
    broker.set_memory_alarm(false).await.expect("memory alarm cleared");
    let cleared = Instant::now();
    let mut refused_after_clear = 0;
    loop {
        let sample = post(&api.client, &format!("{}{PATH}", api.base), seq).await;
        seq += 1;
        if sample.status == 202 {
            ids.insert(sample.id.unwrap());
            break;
        }
        assert_eq!(sample.status, 503);
        refused_after_clear += 1;
        assert!(cleared.elapsed() < MAX_RECOVERY, "no 202 within {MAX_RECOVERY:?} of clearing the alarm");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = cleared.elapsed();
    let (status, body) = ready().await;
    println!(
        "alarm cleared: first 202 after {recovered:?} ({refused_after_clear} × 503 before); /ready {status} {body}"
    );
    assert!(recovered < MAX_RECOVERY);
    assert_eq!(status, 200);
    assert_eq!(body["checks"]["broker"], "connected");

    // Everything accepted is delivered, once.
    wait_delivered(&smtp, &ids, Duration::from_secs(60)).await;
    drain_and_stop(worker, &broker, &queue).await;
    let received = message_ids(&smtp);
    let mails = smtp.mails().len();
    println!(
        "{} accepted, {mails} mails, {} distinct ({} for requests answered 503 whose publish the broker read after the alarm)",
        ids.len(),
        received.len(),
        received.len() - ids.len()
    );
    let settled: Vec<String> = {
        let mut kinds: HashMap<String, usize> = HashMap::new();
        for (_, r) in reports.lock().unwrap().iter() {
            let kind = format!("{:?}", r.settled);
            *kinds.entry(kind.split([' ', '{']).next().unwrap().to_string()).or_insert(0) += 1;
        }
        kinds.into_iter().map(|(k, n)| format!("{k}: {n}")).collect()
    };
    println!("worker settlements: {}", settled.join(", "));
    for (at, r) in reports.lock().unwrap().iter().filter(|(_, r)| r.settled != Settled::Delivered) {
        // A retry is published on the worker's publishing connection, which the broker blocks
        // during the alarm: it completes once the alarm clears (or is requeued after the
        // worker's publish timeout), while the other deliveries go on being acked.
        println!(
            "  {:?} {:.3?} after the alarm went on, {}",
            r.settled,
            at.saturating_duration_since(alarm_on),
            if *at < clearing {
                "while it was on".to_string()
            } else if *at < cleared {
                "while `rabbitmqctl` was clearing it".to_string()
            } else {
                format!("{:.3?} after it was cleared", *at - cleared)
            }
        );
    }
    assert_eq!(mails, received.len(), "no notification was mailed twice");
    let _ = conn.close(200, "done".into()).await;
    api.stop().await;
    support::drop_schema(&s).await;
}
