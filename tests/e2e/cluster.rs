//! Failover on a private 3-node RabbitMQ cluster (issue 13). The API and the worker run in this
//! process, with `RABBITMQ_URL` listing the cluster's nodes (`RABBITMQ_URL_ORDER=listed`, so the
//! test chooses the node each connects to first); webhooks go to a receiver on loopback, which
//! records each request's `webhook-id` (the notification id).
//!
//! 1. The webhook queue's leader node killed (kill -9) under 200 POST/s, API and worker on other
//!    nodes: no 5xx, every accepted id delivered exactly once.
//! 2. The node the API and the worker are connected to (and the queue leader) killed under
//!    200 POST/s: the 503 window, the time until the worker consumes again, nothing lost or
//!    duplicated; then the node restarts and rejoins under load, and nothing changes. The same
//!    at 40 POST/s, where some channels of the API's new connection used to stay nacked.
//! 3. Quorum lost (two of three nodes killed) for 10 s while clients retry every 503 with their
//!    `Idempotency-Key`: `/ready` 503 during, every key delivered exactly once, counted by
//!    notification id and by key.
//!
//! One cluster per test binary (`PrivateCluster::shared`, ~20 s to start). Every test holds its
//! lock (they kill nodes), works in a vhost, topology prefix and Postgres schema of its own, and
//! removes them even when it fails (the lock heals nodes a failed test left down). The figures
//! are printed (`--nocapture`).

use crate::support;

use futures_util::FutureExt;
use notify_testkit::{private_cluster::PrivateCluster, rabbit, smtp::SmtpServer, webhook::WebhookReceiver};
use notify_types::{Channel, Topology};
use notify_worker::outcome::Settled;
use serde_json::{json, Value};
use std::{
    collections::{HashMap, HashSet},
    ops::Range,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
    time::Duration,
};
use support::{TestApi, TestWorker};
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
    time::{Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WEBHOOK: &str = "/api/v1/notifications/webhook";
/// One POST every 5 ms: 200/s.
const EVERY: Duration = Duration::from_millis(5);
/// POSTs of a failover run: 6 s at 200/s.
const POSTS: usize = 1200;
/// The node is killed once this many POSTs were sent (2 s in).
const KILL_AFTER: usize = 400;
/// Until everything accepted was delivered and the queue is empty.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Until a new leader is seen after a kill (measured 0.5–1 s, most of it the CLI).
const ELECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Issue 13's targets with one node of three down.
const ACCEPTING_AGAIN_WITHIN: Duration = Duration::from_secs(2);
const CONSUMING_AGAIN_WITHIN: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- the tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_queue_leaders_node_loses_and_duplicates_nothing() {
    let _turn = support::private_nodes_one_at_a_time().await;
    let cluster = PrivateCluster::shared().await.expect("private cluster starts");
    let _exclusive = cluster.lock().await.expect("cluster healthy");
    let w = World::new(cluster, "cluster-leader-killed").await;
    let outcome = AssertUnwindSafe(leader_node_killed(&w)).catch_unwind().await;
    w.finish(outcome).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_node_notify_is_connected_to_fails_over_within_seconds() {
    let _turn = support::private_nodes_one_at_a_time().await;
    let cluster = PrivateCluster::shared().await.expect("private cluster starts");
    let _exclusive = cluster.lock().await.expect("cluster healthy");
    let w = World::new(cluster, "cluster-connected-killed").await;
    let outcome = AssertUnwindSafe(connected_node_killed(&w)).catch_unwind().await;
    w.finish(outcome).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_over_at_a_low_rate_leaves_no_publish_channel_nacked() {
    let _turn = support::private_nodes_one_at_a_time().await;
    let cluster = PrivateCluster::shared().await.expect("private cluster starts");
    let _exclusive = cluster.lock().await.expect("cluster healthy");
    let w = World::new(cluster, "cluster-low-rate").await;
    let outcome = AssertUnwindSafe(low_rate_failover(&w)).catch_unwind().await;
    w.finish(outcome).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_lost_for_ten_seconds_with_idempotent_retries_delivers_each_key_once() {
    let _turn = support::private_nodes_one_at_a_time().await;
    let cluster = PrivateCluster::shared().await.expect("private cluster starts");
    let _exclusive = cluster.lock().await.expect("cluster healthy");
    let w = World::new(cluster, "cluster-quorum-lost").await;
    let outcome = AssertUnwindSafe(quorum_lost(&w)).catch_unwind().await;
    w.finish(outcome).await;
}

// ---------------------------------------------------------------- 1. the leader's node

async fn leader_node_killed(w: &World) {
    let c = w.cluster;
    let started = Instant::now();
    // Declared before the API starts, so the test knows the leader and can keep notify off it.
    let l = w.declare(0).await;
    let others: Vec<usize> = (0..c.size()).filter(|&i| i != l).collect();
    let api = TestApi::start(&w.settings(&[others[0], others[1], l])).await.expect("API starts");
    let mut worker = TestWorker::start(&w.settings(&[others[1], others[0], l])).await.expect("worker starts");
    println!(
        "[leader] webhook queue leader on node {l}; API first on node {}, worker on node {}",
        others[0], others[1]
    );
    let t0 = Instant::now();
    let reports = track(&mut worker, t0);
    let (sent, mut sent_seen) = watch::channel(0usize);
    let target = w.hook.url("/leader");
    let kill = async {
        sent_seen.wait_for(|n| *n >= KILL_AFTER).await.expect("load running");
        let killed_at = t0.elapsed();
        c.kill(l).await.expect("kill -9 the leader's node");
        let (new_leader, seen_at) = w.wait_for_new_leader(l, t0).await;
        (killed_at, new_leader, seen_at)
    };
    let never = CancellationToken::new();
    let (posts, (killed_at, new_leader, leader_seen_at)) =
        tokio::join!(load(&api, &target, t0, (0..POSTS, EVERY), &never, &sent), kill);
    println!(
        "[leader] kill -9 node {l} at {:.2?} (POST {KILL_AFTER}); new leader node {new_leader} seen {:.2?} later",
        killed_at,
        leader_seen_at - killed_at
    );
    assert_ne!(new_leader, l);
    let around: Vec<&Post> = posts.iter().filter(|p| p.answered >= killed_at).collect();
    let slowest = around.iter().map(|p| p.answered - p.sent).max().unwrap_or_default();
    let last = posts.iter().map(|p| p.sent).max().unwrap_or_default();
    println!("[leader] {} POSTs sent in {last:.2?}, slowest answer after the kill {slowest:.2?}", posts.len());
    let refused: Vec<&Post> = posts.iter().filter(|p| p.status != 202).collect();
    assert!(refused.is_empty(), "{} of {} POSTs not accepted: {:?}", refused.len(), posts.len(), head(&refused));

    let accepted = accepted_ids(&posts);
    w.wait_until_delivered(&accepted, others[0]).await;
    worker.stop().await.expect("worker stops cleanly");
    api.stop().await;
    let tally = Tally::of(&w.hook, &accepted, "n");
    println!("[leader] {tally}");
    tally.assert_exactly_once();
    assert_eq!(tally.unexpected, 0, "deliveries of ids never accepted");
    let reports = reports.lock().unwrap().clone();
    println!("[leader] worker settled {} deliveries: {}", reports.len(), settled_summary(&reports));

    let back = Instant::now();
    c.restart(l).await.expect("the killed node restarts and rejoins");
    println!("[leader] node {l} restarted and rejoined in {:.2?}; test took {:.2?}", back.elapsed(), started.elapsed());
}

// ---------------------------------------------------------------- 2. notify's own node

async fn connected_node_killed(w: &World) {
    let c = w.cluster;
    let started = Instant::now();
    // The worst node to lose: the one notify is connected to that also leads the webhook queue,
    // so the API's first publishes after reconnecting wait for the election too.
    let k = w.declare(0).await;
    let n = c.size();
    let order = [k, (k + 1) % n, (k + 2) % n];
    let api = TestApi::start(&w.settings(&order)).await.expect("API starts");
    let mut worker = TestWorker::start(&w.settings(&order)).await.expect("worker starts");
    println!("[connected] API and worker first on node {k}, which leads the webhook queue; then {:?}", &order[1..]);
    let t0 = Instant::now();
    let reports = track(&mut worker, t0);
    let (sent, mut sent_seen) = watch::channel(0usize);
    let target = w.hook.url("/connected");
    let kill = async {
        sent_seen.wait_for(|n| *n >= KILL_AFTER).await.expect("load running");
        let killed_at = t0.elapsed();
        c.kill(k).await.expect("kill -9 notify's node");
        killed_at
    };
    let never = CancellationToken::new();
    let (posts, killed_at) = tokio::join!(load(&api, &target, t0, (0..POSTS, EVERY), &never, &sent), kill);

    // The 503 window: from the first 5xx after the kill to the first 202 after it. POSTs sent
    // in the first milliseconds after the SIGKILL can still be accepted by the dying node (the
    // VM takes a moment to die), so "after it" means sent after the API answered that 5xx: by
    // then it had lost the connection, and only a new one can accept.
    let failed = |p: &&Post| p.status != 202;
    let first_5xx = posts
        .iter()
        .filter(failed)
        .filter(|p| p.answered >= killed_at)
        .map(|p| p.answered)
        .min()
        .expect("the API refused something when its node died");
    let recovered: Vec<&Post> = posts.iter().filter(|p| p.status == 202 && p.sent >= first_5xx).collect();
    let accepting_again = recovered.iter().map(|p| p.answered).min().expect("the API accepted again after the kill");
    let window = accepting_again.saturating_sub(first_5xx);
    let refused = posts.iter().filter(failed).count();
    let statuses = status_counts(&posts);
    // Refused although sent after the first POST accepted again (e.g. a channel of the new
    // connection nacked while the new leader was being elected), and the last refusal.
    let refused_later: Vec<&Post> = posts.iter().filter(failed).filter(|p| p.sent >= accepting_again).collect();
    let last_refused = posts.iter().filter(failed).map(|p| p.sent).max().unwrap_or_default();
    // The worker consumes again: the first delivery of a message accepted on the new connection.
    let after_kill: HashSet<String> = recovered.iter().filter_map(|p| p.id.clone()).collect();

    let accepted = accepted_ids(&posts);
    w.wait_until_delivered(&accepted, order[1]).await;
    let consuming_again = reports
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.settled == Settled::Delivered && r.id.is_some_and(|id| after_kill.contains(&id.to_string())))
        .map(|r| r.at)
        .min()
        .expect("a message accepted after the kill was delivered");
    let tally = Tally::of(&w.hook, &accepted, "n");
    let last = posts.iter().map(|p| p.sent).max().unwrap_or_default();
    println!(
        "[connected] kill -9 node {k} at {killed_at:.2?} (POST {KILL_AFTER}); {} POSTs sent in {last:.2?}: \
         {statuses:?}, refused: {:?}",
        posts.len(),
        reasons(&posts)
    );
    println!(
        "[connected] 503 window {window:.2?} (first 5xx {:.2?} after the kill, accepting again {:.2?} after \
         it); {refused} POSTs refused, {} of them sent after accepting again; the last refused was sent {:.2?} \
         after the kill",
        first_5xx - killed_at,
        accepting_again - killed_at,
        refused_later.len(),
        last_refused.saturating_sub(killed_at)
    );
    println!(
        "[connected] consuming again {:.2?} after the kill (first delivery of a message accepted after it)",
        consuming_again - killed_at
    );
    println!("[connected] {tally}");
    assert!(window <= ACCEPTING_AGAIN_WITHIN, "503 window {window:?}");
    assert!(
        accepting_again - killed_at <= ACCEPTING_AGAIN_WITHIN,
        "accepting again {:?} after the kill",
        accepting_again - killed_at
    );
    assert!(
        last_refused.saturating_sub(killed_at) < ACCEPTING_AGAIN_WITHIN,
        "refused {:?} after the kill: {:?}",
        last_refused.saturating_sub(killed_at),
        head(&refused_later)
    );
    assert!(
        consuming_again - killed_at <= CONSUMING_AGAIN_WITHIN,
        "consuming again {:?} after the kill",
        consuming_again - killed_at
    );
    tally.assert_exactly_once();

    // The node comes back and rejoins while the load goes on; nothing changes for notify.
    let stop = CancellationToken::new();
    let (sent, mut sent_seen) = watch::channel(0usize);
    let restart = async {
        let from = Instant::now();
        c.restart(k).await.expect("notify's node restarts and rejoins");
        let took = from.elapsed();
        // A little more after it is back: 2 s.
        let now = *sent_seen.borrow_and_update();
        sent_seen.wait_for(|n| *n >= now + 400).await.expect("load running");
        stop.cancel();
        took
    };
    let (more, restart_took) =
        tokio::join!(load(&api, &target, t0, (POSTS..POSTS + 12_000, EVERY), &stop, &sent), restart);
    println!(
        "[connected] node {k} restarted and rejoined in {restart_took:.2?}; {} POSTs meanwhile and after: {:?}",
        more.len(),
        status_counts(&more)
    );
    let refused: Vec<&Post> = more.iter().filter(|p| p.status != 202).collect();
    assert!(refused.is_empty(), "refused while the node came back: {:?}", head(&refused));
    let accepted: HashSet<String> = accepted.into_iter().chain(accepted_ids(&more)).collect();
    w.wait_until_delivered(&accepted, order[1]).await;
    worker.stop().await.expect("worker stops cleanly");
    api.stop().await;
    let tally = Tally::of(&w.hook, &accepted, "n");
    println!("[connected] after the restart, both phases: {tally}");
    tally.assert_exactly_once();
    let reports = reports.lock().unwrap().clone();
    println!("[connected] worker settled {} deliveries: {}", reports.len(), settled_summary(&reports));
    println!("[connected] test took {:.2?}", started.elapsed());
}

// ---------------------------------------------------------------- 2b. ... at a low rate

/// The low-rate failover: one POST every 25 ms (40/s) for 6 s, the kill at 1 s.
const SLOW_EVERY: Duration = Duration::from_millis(25);
const SLOW_POSTS: usize = 240;
const SLOW_KILL_AFTER: usize = 40;

/// At 200 POST/s the new connection's channels all make their first publish within a few
/// milliseconds; at 40/s they are spread over ~100 ms, and some make it before the new leader
/// updated the queue's record and some after. Before the API replaced a channel on its first
/// nack, those that made it before were nacked until the dead node returned, 25–50 % of all
/// POSTs in 3 of 3 runs, and the successes in between kept the connection from being replaced
/// (see `crates/api/src/publisher.rs`).
async fn low_rate_failover(w: &World) {
    let c = w.cluster;
    let started = Instant::now();
    let k = w.declare(0).await;
    let n = c.size();
    let order = [k, (k + 1) % n, (k + 2) % n];
    let api = TestApi::start(&w.settings(&order)).await.expect("API starts");
    let mut worker = TestWorker::start(&w.settings(&order)).await.expect("worker starts");
    println!("[low rate] API and worker first on node {k}, which leads the webhook queue");
    let t0 = Instant::now();
    let _reports = track(&mut worker, t0);
    let (sent, mut sent_seen) = watch::channel(0usize);
    let target = w.hook.url("/low-rate");
    let kill = async {
        sent_seen.wait_for(|n| *n >= SLOW_KILL_AFTER).await.expect("load running");
        let killed_at = t0.elapsed();
        c.kill(k).await.expect("kill -9 notify's node");
        killed_at
    };
    let never = CancellationToken::new();
    let (posts, killed_at) = tokio::join!(load(&api, &target, t0, (0..SLOW_POSTS, SLOW_EVERY), &never, &sent), kill);
    let refused: Vec<&Post> = posts.iter().filter(|p| p.status != 202).collect();
    let timeline: String = posts
        .iter()
        .filter(|p| p.sent >= killed_at)
        .map(|p| match (p.status, p.reason.as_deref()) {
            (202, _) => '.',
            (_, Some("nack")) => 'N',
            (_, Some("not_connected")) => 'C',
            (_, Some("timeout")) => 'T',
            _ => '?',
        })
        .collect();
    let late: Vec<&&Post> = refused.iter().filter(|p| p.sent >= killed_at + ACCEPTING_AGAIN_WITHIN).collect();
    println!(
        "[low rate] kill -9 node {k} at {killed_at:.2?}; {} POSTs, refused: {:?}; {} refused sent 2 s or more after the kill",
        posts.len(),
        reasons(&posts),
        late.len()
    );
    println!("[low rate] after the kill, one POST every 25 ms (. accepted, N nack, C not connected, T timeout):");
    for chunk in timeline.as_bytes().chunks(40) {
        println!("[low rate]   {}", String::from_utf8_lossy(chunk));
    }
    assert!(late.is_empty(), "still refused 2 s after the kill: {:?}", head(&late));

    let accepted = accepted_ids(&posts);
    w.wait_until_delivered(&accepted, order[1]).await;
    worker.stop().await.expect("worker stops cleanly");
    api.stop().await;
    let tally = Tally::of(&w.hook, &accepted, "n");
    println!("[low rate] {tally}");
    tally.assert_exactly_once();
    println!("[low rate] test took {:.2?}", started.elapsed());
}

// ---------------------------------------------------------------- 3. quorum lost

/// Keys of the quorum test: 50 new keys a second for 15 s.
const KEYS: usize = 750;
const KEY_EVERY: Duration = Duration::from_millis(20);
/// The kill comes once this many keys were started (2 s in).
const QUORUM_KILL_AFTER: usize = 100;
const OUTAGE: Duration = Duration::from_secs(10);
/// A client retries a 503 after its `Retry-After`, but at most after this.
const RETRY_CAP: Duration = Duration::from_millis(500);
/// A client gives up after this long (the test then fails).
const CLIENT_DEADLINE: Duration = Duration::from_secs(120);

async fn quorum_lost(w: &World) {
    let c = w.cluster;
    let started = Instant::now();
    let leader = w.declare(0).await;
    // notify stays on node k, a follower; the other two, the webhook queue's leader among
    // them, go down.
    let k = (leader + 1) % c.size();
    let down: Vec<usize> = (0..c.size()).filter(|&i| i != k).collect();
    let mut settings = w.settings(&[k, down[0], down[1]]);
    settings.insert("PUBLISH_TIMEOUT".into(), "1s".into());
    let api = TestApi::start(&settings).await.expect("API starts");
    let mut worker = TestWorker::start(&settings).await.expect("worker starts");
    println!("[quorum] API and worker on node {k}; nodes {down:?} go down; webhook queue leader on node {leader}");
    let t0 = Instant::now();
    let reports = track(&mut worker, t0);

    let stop_polling = CancellationToken::new();
    let readiness =
        tokio::spawn(poll_ready(api.client.clone(), format!("{}/ready", api.base), t0, stop_polling.clone()));
    let (started_keys, mut started_seen) = watch::channel(0usize);
    let target = w.hook.url("/quorum");
    let clients = async {
        let mut tick = tokio::time::interval(KEY_EVERY);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut tasks = JoinSet::new();
        for i in 0..KEYS {
            tick.tick().await;
            let key = format!("{}-key-{i}", w.prefix);
            let body = json!({"url": target, "payload": {"key": key}});
            tasks.spawn(keyed_client(api.client.clone(), format!("{}{WEBHOOK}", api.base), key, body, t0));
            started_keys.send_modify(|n| *n += 1);
        }
        let mut results = tasks.join_all().await;
        results.sort_by_key(|r| r.accepted_at);
        results
    };
    let outage = async {
        started_seen.wait_for(|n| *n >= QUORUM_KILL_AFTER).await.expect("clients running");
        let killed = Instant::now();
        let killed_at = t0.elapsed();
        futures_util::future::try_join_all(down.iter().map(|&i| c.kill(i))).await.expect("kill -9 two nodes");
        tokio::time::sleep_until(killed + OUTAGE).await;
        let restarted_at = t0.elapsed();
        futures_util::future::try_join_all(down.iter().map(|&i| c.restart(i))).await.expect("both nodes back");
        (killed_at, restarted_at, t0.elapsed())
    };
    let (results, (killed_at, restarted_at, back_at)) = tokio::join!(clients, outage);
    let all_done_at = results.iter().filter_map(|r| r.accepted_at).max().unwrap_or_default();

    // `/ready` answers 200 again (bounded), then the poller stops.
    let ready_again = wait_ready(&api, t0).await;
    stop_polling.cancel();
    let polls = readiness.await.expect("readiness poller");

    let not_accepted: Vec<&KeyResult> = results.iter().filter(|r| r.id.is_none()).collect();
    let attempts: usize = results.iter().map(|r| r.attempts).sum();
    let retried = results.iter().filter(|r| r.attempts > 1).count();
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for r in &results {
        for (s, n) in &r.statuses {
            *statuses.entry(*s).or_default() += n;
        }
    }
    println!(
        "[quorum] kill -9 nodes {down:?} at {killed_at:.2?}; restart at {restarted_at:.2?}, both running members at \
         {back_at:.2?}; last key accepted at {all_done_at:.2?}"
    );
    println!(
        "[quorum] {} keys, {attempts} POSTs ({statuses:?}), {retried} keys retried, max {} attempts for one key",
        results.len(),
        results.iter().map(|r| r.attempts).max().unwrap_or(0)
    );
    let during: Vec<&ReadyPoll> = polls.iter().filter(|p| p.at >= killed_at && p.at <= restarted_at).collect();
    let unready: Vec<&ReadyPoll> = during.iter().copied().filter(|p| p.status == 503).collect();
    let first_unready = unready.first().map(|p| p.at);
    let broker_states: HashSet<&str> = unready.iter().map(|p| p.broker.as_str()).collect();
    // Once unready, `/ready` must not claim 200 again while quorum is still lost.
    let flapped: Vec<&&ReadyPoll> =
        during.iter().filter(|p| p.status == 200 && first_unready.is_some_and(|f| p.at > f)).collect();
    let accepted_during = results.iter().filter(|r| r.accepted_at.is_some_and(|t| t > killed_at && t < restarted_at));
    let first_after = results.iter().filter_map(|r| r.accepted_at).filter(|t| *t >= restarted_at).min();
    println!(
        "[quorum] /ready during the outage: {} polls, {} answered 503 (the first {} after the kill; checks.broker \
         {:?}), {} answered 200 after the first 503; 200 again at {ready_again:.2?} ({:.2?} after both nodes \
         were running members)",
        during.len(),
        unready.len(),
        first_unready.map(|f| format!("{:.2?}", f - killed_at)).unwrap_or_else(|| "never".into()),
        broker_states,
        flapped.len(),
        ready_again.saturating_sub(back_at)
    );
    println!(
        "[quorum] keys accepted during the outage: {}; first 202 after the restart began: {}",
        accepted_during.count(),
        first_after.map(|t| format!("{:.2?} after it", t - restarted_at)).unwrap_or_else(|| "none".into())
    );
    assert!(not_accepted.is_empty(), "{} keys never accepted: {:?}", not_accepted.len(), head(&not_accepted));
    assert!(!unready.is_empty(), "/ready never answered 503 while quorum was lost: {during:?}");
    assert!(flapped.is_empty(), "/ready answered 200 while quorum was still lost: {flapped:?}");
    assert_eq!(statuses.get(&500), None, "no 500s");

    // One id per key, each delivered once; counted again by the key in the payload.
    let accepted: HashSet<String> = results.iter().filter_map(|r| r.id.clone()).collect();
    assert_eq!(accepted.len(), results.len(), "every key has an id of its own");
    w.wait_until_delivered(&accepted, k).await;
    worker.stop().await.expect("worker stops cleanly");
    api.stop().await;
    let tally = Tally::of(&w.hook, &accepted, "key");
    println!("[quorum] {tally}");
    tally.assert_exactly_once();
    assert_eq!(tally.unexpected, 0, "a key delivered under an id the API never answered with");
    let reports = reports.lock().unwrap().clone();
    let guarded = reports.iter().filter(|r| r.settled == Settled::AlreadyDelivered).count();
    println!(
        "[quorum] worker settled {} deliveries: {} ({guarded} copies of ids already delivered, stopped by the send guard)",
        reports.len(),
        settled_summary(&reports)
    );
    println!("[quorum] test took {:.2?}", started.elapsed());
}

#[derive(Debug)]
struct KeyResult {
    key: String,
    attempts: usize,
    statuses: HashMap<u16, usize>,
    id: Option<String>,
    accepted_at: Option<Duration>,
}

/// A caller that follows the contract: the same key and body until a 202; a 503 (or 409, or
/// no answer) is retried after `Retry-After`, capped at [`RETRY_CAP`]; bounded by
/// [`CLIENT_DEADLINE`].
async fn keyed_client(client: reqwest::Client, url: String, key: String, body: Value, t0: Instant) -> KeyResult {
    let deadline = t0 + CLIENT_DEADLINE;
    let mut r = KeyResult { key, attempts: 0, statuses: HashMap::new(), id: None, accepted_at: None };
    while Instant::now() < deadline {
        r.attempts += 1;
        let res = client.post(&url).header("Idempotency-Key", &r.key).json(&body).send().await;
        let (status, retry_after) = match res {
            Ok(res) => {
                let status = res.status().as_u16();
                let retry_after = res
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs);
                if status == 202 {
                    let answer: Value = res.json().await.unwrap_or_default();
                    r.id = answer["id"].as_str().map(str::to_string);
                    r.accepted_at = Some(t0.elapsed());
                }
                (status, retry_after)
            }
            Err(_) => (0, None),
        };
        *r.statuses.entry(status).or_default() += 1;
        match status {
            202 => break,
            503 | 409 | 0 => {}
            _ => break,
        }
        tokio::time::sleep(retry_after.unwrap_or(RETRY_CAP).min(RETRY_CAP)).await;
    }
    r
}

#[derive(Debug)]
struct ReadyPoll {
    at: Duration,
    status: u16,
    broker: String,
}

/// GET /ready every 100 ms until `stop`.
async fn poll_ready(client: reqwest::Client, url: String, t0: Instant, stop: CancellationToken) -> Vec<ReadyPoll> {
    let mut polls = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return polls,
            _ = tick.tick() => {}
        }
        let res = client.get(&url).timeout(Duration::from_secs(5)).send().await;
        let at = t0.elapsed();
        let (status, broker) = match res {
            Ok(res) => {
                let status = res.status().as_u16();
                let body: Value = res.json().await.unwrap_or_default();
                (status, body["checks"]["broker"].as_str().unwrap_or("?").to_string())
            }
            Err(e) => (0, format!("{e}")),
        };
        polls.push(ReadyPoll { at, status, broker });
    }
}

/// Waits (bounded) until `/ready` answers 200; when it did.
async fn wait_ready(api: &TestApi, t0: Instant) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let res = api.client.get(format!("{}/ready", api.base)).send().await.expect("API answers");
        if res.status() == 200 {
            return t0.elapsed();
        }
        let body: Value = res.json().await.unwrap_or_default();
        assert!(Instant::now() < deadline, "/ready not 200 again within 30 s: {body}");
    }
}

// ---------------------------------------------------------------- one test's world

struct World {
    cluster: &'static PrivateCluster,
    /// Vhost, topology prefix and (as `support::schema_of`) Postgres schema.
    prefix: String,
    base: HashMap<String, String>,
    hook: WebhookReceiver,
    _smtp: SmtpServer,
}

impl World {
    async fn new(cluster: &'static PrivateCluster, test: &str) -> World {
        let prefix = rabbit::unique_prefix(test);
        cluster.add_vhost(&prefix).await.expect("vhost added");
        let smtp = SmtpServer::start().await;
        let mut base = support::settings(&prefix, &cluster.vhost_url_list(&prefix), &smtp.url());
        base.insert("RABBITMQ_URL_ORDER".into(), "listed".into());
        base.insert("WORKER_CHANNELS".into(), "webhook".into());
        World { cluster, prefix, base, hook: WebhookReceiver::start().await, _smtp: smtp }
    }

    /// Settings whose `RABBITMQ_URL` lists the nodes in `order`: notify connects to the first,
    /// then to the others in turn.
    fn settings(&self, order: &[usize]) -> HashMap<String, String> {
        let mut s = self.base.clone();
        let urls: Vec<String> = order.iter().map(|&i| self.cluster.vhost_url(i, &self.prefix)).collect();
        s.insert("RABBITMQ_URL".into(), urls.join(","));
        s
    }

    fn topology(&self) -> Topology {
        notify_types::config::topology(&self.base).expect("topology settings")
    }

    fn queue(&self) -> String {
        self.topology().queue(Channel::Webhook)
    }

    async fn connect(&self, node: usize) -> lapin::Connection {
        rabbit::connect_to(&self.cluster.vhost_url(node, &self.prefix)).await
    }

    /// Declares the topology through `node` (as notify would); the index of the node that
    /// leads the webhook queue.
    async fn declare(&self, node: usize) -> usize {
        let conn = self.connect(node).await;
        self.topology().declare(&conn).await.expect("topology declared");
        let _ = conn.close(200, "declared".into()).await;
        let leader = self.cluster.quorum_leader(&self.prefix, &self.queue()).await.expect("webhook queue leader");
        self.cluster.node_index(&leader).expect("the leader is one of the cluster's nodes")
    }

    /// Waits for the webhook queue to have a leader other than node `old`; that node and when.
    async fn wait_for_new_leader(&self, old: usize, t0: Instant) -> (usize, Duration) {
        let deadline = Instant::now() + ELECTION_TIMEOUT;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let seen = self.cluster.quorum_leader(&self.prefix, &self.queue()).await;
            if let Some(i) = seen.as_ref().ok().and_then(|name| self.cluster.node_index(name)).filter(|&i| i != old) {
                return (i, t0.elapsed());
            }
            assert!(Instant::now() < deadline, "no new leader {ELECTION_TIMEOUT:?} after the kill; last seen {seen:?}");
        }
    }

    /// Waits (bounded) until every id in `ids` reached the receiver, then until the webhook
    /// queue is empty (asked through `node`, which must be up).
    async fn wait_until_delivered(&self, ids: &HashSet<String>, node: usize) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let requests = self.hook.requests();
            let seen: HashSet<&str> = requests.iter().filter_map(|r| r.header("webhook-id")).collect();
            let missing: Vec<&String> = ids.iter().filter(|id| !seen.contains(id.as_str())).collect();
            if missing.is_empty() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{} of {} accepted ids not delivered within {DRAIN_TIMEOUT:?}, e.g. {:?}",
                missing.len(),
                ids.len(),
                &missing[..missing.len().min(5)]
            );
            // Woken by the next request; the outer timeout ends the wait first.
            let _ =
                tokio::time::timeout(left, self.hook.wait_for_requests(requests.len() + 1, DRAIN_TIMEOUT * 2)).await;
        }
        let conn = self.connect(node).await;
        rabbit::wait_for_count(&conn, &self.queue(), 0, DRAIN_TIMEOUT).await;
        let _ = conn.close(200, "counted".into()).await;
    }

    /// Cleans up (nodes healed, vhost and schema removed), then fails if the scenario did.
    async fn finish(self, outcome: Result<(), Box<dyn std::any::Any + Send>>) {
        if let Err(e) = self.cluster.heal().await {
            eprintln!("cleanup: healing the cluster failed: {e:#}");
        }
        if let Err(e) = self.cluster.delete_vhost(&self.prefix).await {
            eprintln!("cleanup: deleting vhost {} failed: {e:#}", self.prefix);
        }
        let store =
            notify_store::Store::connect_lazy(&self.base["DATABASE_URL"], &self.base["DATABASE_SCHEMA"], 1).unwrap();
        if let Err(e) = store.drop_schema().await {
            eprintln!("cleanup: dropping schema {} failed: {e}", self.base["DATABASE_SCHEMA"]);
        }
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}

// ---------------------------------------------------------------- load and counting

#[derive(Debug, Clone)]
struct Post {
    n: usize,
    sent: Duration,
    answered: Duration,
    status: u16,
    /// The notification id of a 202.
    id: Option<String>,
    /// Why a refusal: `nack`, `timeout`, `not_connected`, `blocked`, or the error's words.
    reason: Option<String>,
}

/// POSTs webhooks numbered `numbers` (the number goes in the payload as `n`), one every
/// `every`, each in a task of its own so a slow answer never slows the rate, until all were
/// sent or `stop` is cancelled; `sent` counts them. Returns every POST in order once all were
/// answered (the client's timeout bounds each).
async fn load(
    api: &TestApi,
    target: &str,
    t0: Instant,
    (numbers, every): (Range<usize>, Duration),
    stop: &CancellationToken,
    sent: &watch::Sender<usize>,
) -> Vec<Post> {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut tasks = JoinSet::new();
    for n in numbers {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let (client, url) = (api.client.clone(), format!("{}{WEBHOOK}", api.base));
        let body = json!({"url": target, "payload": {"n": n}});
        tasks.spawn(async move {
            let sent = t0.elapsed();
            let (status, id, reason) = match client.post(url).json(&body).send().await {
                Ok(res) => {
                    let status = res.status().as_u16();
                    let answer: Value = res.json().await.unwrap_or_default();
                    let id = answer["id"].as_str().filter(|_| status == 202).map(str::to_string);
                    (status, id, (status != 202).then(|| refusal(&answer)))
                }
                Err(e) => (0, None, Some(format!("no answer: {e}"))),
            };
            Post { n, sent, answered: t0.elapsed(), status, id, reason }
        });
        sent.send_modify(|k| *k += 1);
    }
    let mut posts = tasks.join_all().await;
    posts.sort_by_key(|p| p.n);
    posts
}

/// What a refusal's message says went wrong with the broker.
fn refusal(answer: &Value) -> String {
    let message = answer["error"]["message"].as_str().unwrap_or("?");
    let known = [
        ("(nack)", "nack"),
        ("did not confirm", "timeout"),
        ("not connected", "not_connected"),
        ("blocked", "blocked"),
        ("broker error", "connection_lost"),
    ];
    known.iter().find(|(words, _)| message.contains(words)).map(|(_, r)| r.to_string()).unwrap_or(message.to_string())
}

fn reasons(posts: &[Post]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for reason in posts.iter().filter_map(|p| p.reason.clone()) {
        *counts.entry(reason).or_default() += 1;
    }
    counts
}

fn accepted_ids(posts: &[Post]) -> HashSet<String> {
    posts.iter().filter_map(|p| p.id.clone()).collect()
}

fn status_counts(posts: &[Post]) -> std::collections::BTreeMap<u16, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for p in posts {
        *counts.entry(p.status).or_default() += 1;
    }
    counts
}

fn head<T: std::fmt::Debug>(items: &[T]) -> String {
    format!("{:?}", &items[..items.len().min(5)])
}

/// One settled delivery, when the worker reported it.
#[derive(Debug, Clone)]
struct Report {
    at: Duration,
    id: Option<Uuid>,
    settled: Settled,
}

/// Collects the worker's delivery reports with the time each arrived.
fn track(worker: &mut TestWorker, t0: Instant) -> Arc<Mutex<Vec<Report>>> {
    let mut reports = std::mem::replace(&mut worker.reports, mpsc::unbounded_channel().1);
    let log = Arc::new(Mutex::new(Vec::new()));
    let into = log.clone();
    tokio::spawn(async move {
        while let Some(r) = reports.recv().await {
            into.lock().unwrap().push(Report { at: t0.elapsed(), id: r.id, settled: r.settled });
        }
    });
    log
}

fn settled_summary(reports: &[Report]) -> String {
    let mut counts: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for r in reports {
        let name = format!("{:?}", r.settled);
        let name = name.split([' ', '{', '(']).next().unwrap_or("?").to_string();
        *counts.entry(name).or_default() += 1;
    }
    format!("{counts:?}")
}

/// What the receiver got, counted by notification id (`webhook-id`) and by a payload field
/// that names the request (`n` of a POST, or the idempotency key).
struct Tally {
    accepted: usize,
    deliveries: usize,
    /// Accepted ids never delivered.
    lost: Vec<String>,
    /// Ids delivered more than once.
    twice_by_id: Vec<(String, usize)>,
    /// Requests (by payload field) delivered more than once, under any ids.
    twice_by_request: Vec<(String, usize)>,
    /// Deliveries of ids no 202 named (a refused request whose publish landed after all).
    unexpected: usize,
}

impl Tally {
    fn of(hook: &WebhookReceiver, accepted: &HashSet<String>, field: &str) -> Tally {
        let requests = hook.requests();
        let mut by_id: HashMap<String, usize> = HashMap::new();
        let mut by_request: HashMap<String, usize> = HashMap::new();
        for r in &requests {
            let id = r.header("webhook-id").expect("every webhook has a webhook-id").to_string();
            *by_id.entry(id).or_default() += 1;
            *by_request.entry(r.json()[field].to_string()).or_default() += 1;
        }
        let twice = |m: &HashMap<String, usize>| -> Vec<(String, usize)> {
            m.iter().filter(|(_, n)| **n > 1).map(|(k, n)| (k.clone(), *n)).collect()
        };
        Tally {
            accepted: accepted.len(),
            deliveries: requests.len(),
            lost: accepted.iter().filter(|id| !by_id.contains_key(*id)).cloned().collect(),
            twice_by_id: twice(&by_id),
            twice_by_request: twice(&by_request),
            unexpected: by_id.keys().filter(|id| !accepted.contains(*id)).count(),
        }
    }

    fn assert_exactly_once(&self) {
        assert!(self.lost.is_empty(), "{} accepted ids never delivered: {:?}", self.lost.len(), head(&self.lost));
        assert!(self.twice_by_id.is_empty(), "ids delivered twice: {:?}", head(&self.twice_by_id));
        assert!(self.twice_by_request.is_empty(), "requests delivered twice: {:?}", head(&self.twice_by_request));
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} accepted, {} webhooks received: {} lost, {} ids twice, {} requests twice, {} of ids never accepted",
            self.accepted,
            self.deliveries,
            self.lost.len(),
            self.twice_by_id.len(),
            self.twice_by_request.len(),
            self.unexpected
        )
    }
}
