//! Postgres going away for a while (its connections cut, new ones dropped) defers deliveries
//! instead of counting attempts: nothing is lost, nothing is sent twice, nothing is
//! dead-lettered. The worker reaches Postgres through a loopback TCP proxy the test controls;
//! the shared Postgres itself is never touched.

use crate::support;

use notify_worker::outcome::Settled;
use serde_json::Value;
use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use support::{email, Harness};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

const MAILS: usize = 200;
const OUTAGE: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_for_a_while_retries_without_losing_or_dead_lettering() {
    let h = Harness::start("pg-outage").await;
    // Slow SMTP keeps deliveries flowing for a few seconds, so the outage lands mid-stream.
    h.smtp.set_delay(Duration::from_millis(150));
    let (upstream, rewrite) = split_database_url(&h.settings["DATABASE_URL"]);
    let proxy = TcpProxy::start(&upstream).await;
    let mut worker_settings = h.settings.clone();
    worker_settings.insert("DATABASE_URL".into(), rewrite(&proxy.addr()));
    let mut worker = support::TestWorker::start(&worker_settings).await.expect("worker starts");
    let started = Instant::now();

    let posts = (0..MAILS).map(|i| {
        let api = &h.api;
        async move {
            let res = api
                .post_json(
                    "/api/v1/notifications/email",
                    &email(&format!("user{i}@example.com"), &format!("mail {i}"), &format!("body {i}")),
                )
                .await;
            assert_eq!(res.status(), 202);
            res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
        }
    });
    let ids: HashSet<String> = futures_util::future::join_all(posts).await.into_iter().collect();
    assert_eq!(ids.len(), MAILS);

    // Cut once a part has been delivered, while the rest is queued or in flight.
    let mut reports = worker.next_reports(MAILS / 5, WAIT).await;
    let delivered_before = count(&reports, |s| *s == Settled::Delivered);
    proxy.cut();
    let cut_at = Instant::now();
    let mut during = Vec::new();
    let outage_end = tokio::time::Instant::now() + OUTAGE;
    while let Ok(Some(r)) = tokio::time::timeout_at(outage_end, worker.reports.recv()).await {
        during.push(r);
    }
    proxy.restore();
    let outage = cut_at.elapsed();

    let deferred_during = count(&during, |s| matches!(s, Settled::Deferred { .. }));
    let delivered_during = count(&during, |s| *s == Settled::Delivered);
    reports.extend(during);
    // Then everything left gets delivered once Postgres is back.
    let deadline = tokio::time::Instant::now() + WAIT;
    // A retry or dead letter ends the wait at once (the assertions below say why).
    while count(&reports, |s| *s == Settled::Delivered) < MAILS && reports.iter().all(|r| expected(&r.settled)) {
        match tokio::time::timeout_at(deadline, worker.reports.recv()).await {
            Ok(Some(r)) => reports.push(r),
            Ok(None) => panic!("worker stopped"),
            Err(_) => panic!(
                "only {} of {MAILS} delivered {WAIT:?} after the outage: {:?}",
                count(&reports, |s| *s == Settled::Delivered),
                histogram(&reports)
            ),
        }
    }
    assert!(
        reports.iter().all(|r| expected(&r.settled)),
        "only deliveries and deferrals, no retry, no dead letter, no requeue: {:?}; dead letters' errors: {:?}",
        histogram(&reports),
        dead_errors(&h).await
    );
    let total = started.elapsed();
    h.smtp.wait_for_mails(MAILS, WAIT).await;
    worker.stop().await.expect("worker stops cleanly");

    let mails = h.smtp.mails();
    let message_ids: HashSet<String> = mails
        .iter()
        .map(|m| m.message_id.clone().unwrap().trim_matches(['<', '>']).trim_end_matches("@notify").to_string())
        .collect();
    let deferred = count(&reports, |s| matches!(s, Settled::Deferred { .. }));
    let max_attempt = reports.iter().map(|r| r.attempt).max().unwrap_or(0);
    let delivered_ids: HashSet<String> =
        reports.iter().filter(|r| r.settled == Settled::Delivered).map(|r| r.id.unwrap().to_string()).collect();
    let dead = h.count(&h.email_dead_queue()).await;
    // Mails sent just before the database went away could not be recorded at once: they came
    // back (`x-notify-sent`) only to be recorded, so every row ends `delivered`.
    let store = h.store();
    let mut statuses: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let rows = store.delivery_status(id.parse().unwrap()).await.unwrap();
        let status = rows.first().map(|r| r.status.to_string()).unwrap_or_else(|| "none".into());
        *statuses.entry(status).or_default() += 1;
    }

    println!(
        "postgres outage: {MAILS} mails; {delivered_before} delivered before the cut, outage {outage:?} \
         ({delivered_during} delivered and {deferred_during} deferred during it); {deferred} deferrals in all; \
         total {total:?}; max attempt seen {max_attempt}; raw mails {}, distinct Message-IDs {}; dead letters {dead}; \
         proxy: {} connections forwarded, {} dropped while cut; delivery rows by status {statuses:?}",
        mails.len(),
        message_ids.len(),
        proxy.forwarded(),
        proxy.dropped(),
    );
    println!("postgres outage: reports {:?}", histogram(&reports));

    assert!(delivered_before > 0 && delivered_before < MAILS, "the outage started mid-stream");
    assert!(deferred_during > 0, "deliveries during the outage were deferred: {:?}", histogram(&reports));
    assert!(proxy.dropped() > 0, "the worker tried Postgres during the outage");
    assert_eq!(delivered_ids, ids, "every accepted mail reported delivered");
    assert_eq!(count(&reports, |s| *s == Settled::Delivered), MAILS, "each delivered once");
    assert_eq!(mails.len(), MAILS, "raw mails: none lost, none twice");
    assert_eq!(message_ids, ids, "distinct Message-IDs are exactly the accepted ids");
    assert_eq!(max_attempt, 1, "a deferral is not an attempt");
    assert_eq!(dead, 0, "nothing dead-lettered");
    assert_eq!(statuses, HashMap::from([("delivered".to_string(), MAILS)]), "the status endpoint tells the truth");
    for q in h.topology.queues(notify_types::Channel::Email) {
        assert_eq!(h.count(&q).await, 0, "queue {q} ends empty");
    }
    h.cleanup().await;
}

fn expected(s: &Settled) -> bool {
    matches!(s, Settled::Delivered | Settled::Deferred { .. })
}

/// The last errors of (up to 5) dead letters, to say why a message was dead-lettered.
async fn dead_errors(h: &Harness) -> Vec<Option<String>> {
    let dead = notify_testkit::rabbit::drain(&h.amqp, &h.email_dead_queue(), 5).await;
    dead.iter().map(|(p, _)| notify_types::broker::header_str(p, notify_types::headers::LAST_ERROR)).collect()
}

fn count(reports: &[notify_worker::pipeline::DeliveryReport], f: impl Fn(&Settled) -> bool) -> usize {
    reports.iter().filter(|r| f(&r.settled)).count()
}

fn histogram(reports: &[notify_worker::pipeline::DeliveryReport]) -> Vec<(String, usize)> {
    let mut h: HashMap<String, usize> = HashMap::new();
    for r in reports {
        let kind = format!("{:?}", r.settled);
        let kind = kind.split([' ', '{']).next().unwrap_or_default().to_string();
        *h.entry(kind).or_default() += 1;
    }
    let mut v: Vec<_> = h.into_iter().collect();
    v.sort();
    v
}

/// `postgres://user@host:port/db?x` → ("host:port", a function putting another host:port in).
fn split_database_url(url: &str) -> (String, impl Fn(&str) -> String) {
    let (scheme, rest) = url.split_once("://").expect("DATABASE_URL has a scheme");
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, hp)) => (format!("{u}@"), hp.to_string()),
        None => (String::new(), authority.to_string()),
    };
    let upstream = if hostport.contains(':') { hostport } else { format!("{hostport}:5432") };
    let (scheme, tail) = (scheme.to_string(), tail.to_string());
    (upstream, move |addr: &str| format!("{scheme}://{userinfo}{addr}{tail}"))
}

/// A loopback TCP forwarder: `cut` closes every live connection and drops new ones at once
/// (as a database that went away answers), `restore` forwards again.
struct TcpProxy {
    addr: std::net::SocketAddr,
    open: watch::Sender<bool>,
    forwarded: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    async fn start(upstream: &str) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, _) = watch::channel(true);
        let forwarded = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let upstream = upstream.to_string();
        let task = tokio::spawn({
            let open = open.clone();
            let (forwarded, dropped) = (forwarded.clone(), dropped.clone());
            async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else { continue };
                    let mut state = open.subscribe();
                    if !*state.borrow_and_update() {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        drop(client);
                        continue;
                    }
                    forwarded.fetch_add(1, Ordering::Relaxed);
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = state.wait_for(|open| !open) => {}
                        }
                        // Dropping both ends closes them.
                    });
                }
            }
        });
        TcpProxy { addr, open, forwarded, dropped, task }
    }

    fn addr(&self) -> String {
        self.addr.to_string()
    }

    fn cut(&self) {
        self.open.send_replace(false);
    }

    fn restore(&self) {
        self.open.send_replace(true);
    }

    fn forwarded(&self) -> usize {
        self.forwarded.load(Ordering::Relaxed)
    }

    fn dropped(&self) -> usize {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
