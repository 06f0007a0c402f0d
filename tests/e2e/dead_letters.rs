//! Dead letters you can act on (issue 10): made through the real pipeline (test SMTP server,
//! HTTP receiver, the broker's own dead-lettering), indexed by the worker, listed, filtered,
//! replayed and discarded through the API.

use crate::support;

use chrono::{DateTime, Utc};
use notify_testkit::{smtp::Reply, webhook::WebhookReceiver};
use notify_types::{broker, Channel, Envelope, Topology};
use notify_worker::outcome::Settled;
use serde_json::{json, Value};
use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};
use support::{email, Harness, TEST_MAX_ATTEMPTS};

const WAIT: Duration = Duration::from_secs(60);

/// A harness whose worker indexes dead letters, with `extra` settings.
async fn harness(test: &str, extra: &[(&str, &str)]) -> Harness {
    let extra: Vec<(String, String)> = extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Harness::start_with(test, move |s| {
        s.insert("DEAD_LETTER_INDEX".into(), "true".into());
        s.extend(extra);
    })
    .await
}

async fn get(h: &Harness, path_and_query: &str) -> (u16, Value) {
    let res = h.api.client.get(format!("{}{path_and_query}", h.api.base)).send().await.expect("API reachable");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn post(h: &Harness, path: &str, body: &Value) -> (u16, Value) {
    let res = h.api.post_json(path, body).await;
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Waits (bounded) until the list answers `total` for `query`.
async fn wait_total(h: &Harness, query: &str, total: i64) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, page) = get(h, &format!("/api/v1/dead-letters?{query}")).await;
        let shown = page["items"].as_array().map_or(0, Vec::len) as i64;
        if status == 200 && page["total"] == total && shown == total.min(50) {
            return page;
        }
        assert!(tokio::time::Instant::now() < deadline, "{query}: waited for total {total}, last saw {status} {page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Walks every page of `query` with `limit`: the notification ids seen, failing on a repeat;
/// checks `total` on every page.
async fn walk(h: &Harness, query: &str, limit: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut total = None;
    for _ in 0..1000 {
        let and = if query.is_empty() { "" } else { "&" };
        let mut q = format!("/api/v1/dead-letters?{query}{and}limit={limit}");
        if let Some(c) = &cursor {
            q.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = get(h, &q).await;
        assert_eq!(status, 200, "{q}: {page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= limit, "{q}: page larger than the limit");
        let mut last: Option<DateTime<Utc>> = None;
        for item in items {
            let at: DateTime<Utc> = item["dead_at"].as_str().unwrap().parse().unwrap();
            assert!(last.is_none_or(|l| l >= at), "{q}: newest first");
            last = Some(at);
            // An unparseable message has no notification id: its own id stands in.
            let key = item["notification_id"].as_str().or(item["id"].as_str()).unwrap();
            assert!(seen.insert(key.to_string()), "{q}: repeated {item}");
        }
        assert_eq!(*total.get_or_insert(page["total"].clone()), page["total"], "{q}: total changed");
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => {
                assert_eq!(page["total"], seen.len() as i64, "{q}: total is the number of items");
                return seen;
            }
        }
    }
    panic!("{query}: more than 1000 pages");
}

async fn post_mails(h: &Harness, tag: &str, n: usize) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for i in 0..n {
        let (status, body) = post(
            h,
            "/api/v1/notifications/email",
            &email(&format!("{tag}{i}@example.com"), &format!("{tag} {i}"), "b"),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        ids.insert(body["id"].as_str().unwrap().to_string());
    }
    ids
}

/// Reports until `n` of them match `wanted`; others may come between (a delivery deferred while
/// PostgreSQL is slow), but none may be a dead letter unless wanted.
async fn until_settled(
    worker: &mut support::TestWorker,
    n: usize,
    wanted: impl Fn(&Settled) -> bool,
) -> Vec<notify_worker::pipeline::DeliveryReport> {
    let mut all = Vec::new();
    while all.iter().filter(|r: &&notify_worker::pipeline::DeliveryReport| wanted(&r.settled)).count() < n {
        let r = worker.next_reports(1, WAIT).await.remove(0);
        assert!(wanted(&r.settled) || !matches!(r.settled, Settled::DeadLettered { .. }), "{r:?} after {all:?}");
        all.push(r);
    }
    all
}

fn mailed_ids(h: &Harness) -> Vec<String> {
    h.smtp
        .mails()
        .iter()
        .map(|m| m.message_id.clone().unwrap().trim_matches(['<', '>']).trim_end_matches("@notify").to_string())
        .collect()
}

fn set(v: &Value) -> BTreeSet<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

/// Acceptance 1–3: 60 dead letters through the pipeline; filters, paging, totals; replay by
/// filter once the SMTP server recovers; two concurrent replays of the same ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_dead_letters_are_filtered_paged_and_replayed_once() {
    let h = harness("dl-sixty", &[]).await;
    let hooks = WebhookReceiver::start().await;
    hooks.always(410);
    let mut worker = h.worker().await;

    h.smtp.always(Reply::permanent());
    let permanent = post_mails(&h, "perm", 30).await;
    until_settled(&mut worker, 30, |s| matches!(s, Settled::DeadLettered { .. })).await;
    let between = Utc::now();
    h.smtp.always(Reply::transient());
    let exhausted = post_mails(&h, "busy", 20).await;
    let mut hooked = BTreeSet::new();
    for i in 0..10 {
        let req = json!({"url": hooks.url("/gone"), "payload": {"i": i}});
        let (status, body) = post(&h, "/api/v1/notifications/webhook", &req).await;
        assert_eq!(status, 202, "{body}");
        hooked.insert(body["id"].as_str().unwrap().to_string());
    }
    let reports = until_settled(&mut worker, 30, |s| matches!(s, Settled::DeadLettered { .. })).await;
    let retries = reports.iter().filter(|r| matches!(r.settled, Settled::Retrying { .. })).count();
    assert_eq!(retries, 20 * (TEST_MAX_ATTEMPTS as usize - 1), "{reports:?}");
    wait_total(&h, "", 60).await;

    let email: BTreeSet<String> = permanent.union(&exhausted).cloned().collect();
    let permanent_all: BTreeSet<String> = permanent.union(&hooked).cloned().collect();
    let late: BTreeSet<String> = exhausted.union(&hooked).cloned().collect();
    let since = between.to_rfc3339_opts(chrono::SecondsFormat::Micros, true).replace('+', "%2B");
    for (query, want) in [
        ("channel=email", &email),
        ("channel=webhook", &hooked),
        ("reason=permanent", &permanent_all),
        ("reason=max_attempts", &exhausted),
        ("error=550", &permanent),
        ("error=TRY%20AGAIN", &exhausted),
        ("error=410", &hooked),
        (&*format!("until={since}"), &permanent),
        (&*format!("since={since}"), &late),
        (&*format!("since={since}&channel=email&reason=max_attempts"), &exhausted),
    ] {
        assert_eq!(&walk(&h, query, 7).await, want, "{query}");
    }
    let all = walk(&h, "", 7).await;
    assert_eq!(all.len(), 60);
    let (_, page) = get(&h, "/api/v1/dead-letters?channel=webhook&limit=1").await;
    let item = &page["items"][0];
    assert_eq!(
        (item["reason"].as_str(), item["event"].is_null(), item["attempts"].as_i64()),
        (Some("permanent"), true, Some(1))
    );
    let (status, shown) = get(&h, &format!("/api/v1/dead-letters/{}", item["id"].as_str().unwrap())).await;
    assert_eq!(status, 200);
    assert_eq!(shown["message"]["id"], item["notification_id"], "the envelope as it was: {shown}");
    assert_eq!(shown["message"]["payload"]["url"], hooks.url("/gone"));

    // Acceptance 2: the SMTP server recovers; replay what used up its attempts.
    let one = exhausted.iter().next().unwrap().clone();
    let (_, st) = get(&h, &format!("/api/v1/notifications/{one}")).await;
    assert_eq!(
        (st["channels"][0]["status"].as_str(), st["channels"][0]["replays"].as_i64()),
        (Some("dead"), Some(0)),
        "{st}"
    );
    h.smtp.reset();
    let (status, done) = post(&h, "/api/v1/dead-letters/replay", &json!({"filter": {"reason": "max_attempts"}})).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!((done["matched"].as_i64(), done["replayed"].as_i64()), (Some(20), Some(20)), "{done}");
    let reports = until_settled(&mut worker, 20, |s| *s == Settled::Delivered).await;
    assert!(reports.iter().all(|r| r.attempt == 1), "each a fresh first attempt: {reports:?}");
    h.smtp.wait_for_mails(20, WAIT).await;
    assert_eq!(mailed_ids(&h).into_iter().collect::<BTreeSet<_>>(), exhausted, "the 20, each once");
    assert_eq!(walk(&h, "reason=max_attempts", 7).await.len(), 0);
    assert_eq!(walk(&h, "", 7).await, permanent_all, "the list lost exactly those 20");
    assert_eq!(h.count(&h.email_dead_queue()).await, 0, "the dead queue stays drained");
    let (_, st) = get(&h, &format!("/api/v1/notifications/{one}")).await;
    let ch = &st["channels"][0];
    assert_eq!(
        (ch["status"].as_str(), ch["replays"].as_i64(), ch["attempts"].as_i64()),
        (Some("delivered"), Some(1), Some(1)),
        "{st}"
    );
    let history = &ch["last_dead_letter"];
    assert_eq!(
        (history["reason"].as_str(), history["status"].as_str()),
        (Some("max_attempts"), Some("replayed")),
        "{st}"
    );
    assert!(history["last_error"].as_str().unwrap().contains("451"), "the error that killed it: {st}");

    // Acceptance 3: two callers replay the same 10 dead letters at the same moment.
    let (_, page) = get(&h, "/api/v1/dead-letters?reason=permanent&channel=email&limit=10").await;
    let ten: Vec<String> = page["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().into()).collect();
    let ten_notifications: BTreeSet<String> =
        page["items"].as_array().unwrap().iter().map(|i| i["notification_id"].as_str().unwrap().into()).collect();
    let body = json!({ "ids": ten });
    let ((s1, a), (s2, b)) =
        tokio::join!(post(&h, "/api/v1/dead-letters/replay", &body), post(&h, "/api/v1/dead-letters/replay", &body));
    assert_eq!((s1, s2), (200, 200), "{a} {b}");
    let (ra, rb) = (set(&a["ids"]), set(&b["ids"]));
    assert!(ra.is_disjoint(&rb), "one dead letter replayed by both: {a} {b}");
    assert_eq!(ra.union(&rb).cloned().collect::<Vec<_>>().len(), 10, "{a} {b}");
    assert_eq!(set(&a["not_found"]), rb, "what one replayed is no longer a dead letter to the other");
    until_settled(&mut worker, 10, |s| *s == Settled::Delivered).await;
    h.smtp.wait_for_mails(30, WAIT).await;
    worker.stop().await.unwrap();
    let mailed = mailed_ids(&h);
    let distinct: BTreeSet<String> = mailed.iter().cloned().collect();
    assert_eq!(mailed.len(), 30, "20 + 10 mails, none twice: {mailed:?}");
    assert!(ten_notifications.is_subset(&distinct));
    println!(
        "dead letters: 60 listed; replayed 20 by reason and 10 by two racing callers ({} + {}); 30 mails, 30 distinct",
        ra.len(),
        rb.len()
    );
    h.cleanup().await;
}

/// Acceptance 5: a message the broker dead-lettered itself (delivery limit, reject) and an
/// unparseable one are listed with their reasons and can be discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_made_and_unparseable_dead_letters_are_listed_and_discarded() {
    let h = harness("dl-broker", &[("DELIVERY_LIMIT", "1")]).await;
    let ch = h.amqp.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let publish = |env: &Envelope| {
        let (ch, exchange) = (ch.clone(), h.topology.exchange());
        let (body, props) = (env.to_bytes(), broker::envelope_properties(env, 1));
        async move {
            broker::publish_confirmed(&ch, &exchange, &Topology::direct_key(Channel::Email), &body, props, WAIT)
                .await
                .unwrap()
        }
    };
    let mail =
        |to: &str| Envelope::direct(Channel::Email, "dl-broker".into(), json!({"to": to, "subject": "s", "body": "b"}));
    // No worker yet: a consumer that keeps giving the message back, then one that refuses it.
    let (limited, rejected) = (mail("limit@example.com"), mail("reject@example.com"));
    publish(&limited).await;
    for _ in 0..10 {
        let Some(m) = ch.basic_get(h.email_queue().as_str().into(), Default::default()).await.unwrap() else { break };
        m.delivery.acker.reject(lapin::options::BasicRejectOptions { requeue: true }).await.unwrap();
    }
    assert_eq!(h.count(&h.email_queue()).await, 0, "the delivery limit dead-lettered it");
    publish(&rejected).await;
    let m = ch.basic_get(h.email_queue().as_str().into(), Default::default()).await.unwrap().expect("a message");
    m.delivery.acker.reject(lapin::options::BasicRejectOptions { requeue: false }).await.unwrap();
    broker::publish_confirmed(
        &ch,
        &h.topology.exchange(),
        "channel.email",
        b"{not an envelope",
        Default::default(),
        WAIT,
    )
    .await
    .unwrap();

    let mut worker = h.worker().await;
    worker.next_reports(1, WAIT).await;
    let page = wait_total(&h, "", 3).await;
    let by_reason: HashMap<String, Value> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["reason"].as_str().unwrap().to_string(), i.clone()))
        .collect();
    assert_eq!(by_reason["delivery_limit"]["notification_id"], limited.id.to_string(), "{page}");
    assert_eq!(by_reason["rejected"]["notification_id"], rejected.id.to_string(), "{page}");
    assert!(by_reason["unparseable"]["notification_id"].is_null(), "{page}");
    assert!(by_reason["delivery_limit"]["last_error"].as_str().unwrap().contains("delivery_limit"), "{page}");
    for reason in ["delivery_limit", "rejected", "unparseable"] {
        assert_eq!(walk(&h, &format!("reason={reason}"), 7).await.len(), 1, "{reason}");
    }
    let (_, st) = get(&h, &format!("/api/v1/notifications/{}", limited.id)).await;
    assert_eq!(st["channels"][0]["status"], "dead", "the broker's dead letter shows in the status: {st}");
    let (_, shown) =
        get(&h, &format!("/api/v1/dead-letters/{}", by_reason["unparseable"]["id"].as_str().unwrap())).await;
    assert_eq!(shown["message"], "{not an envelope");

    let ids: Vec<&Value> = by_reason.values().map(|i| &i["id"]).collect();
    let (status, done) = post(&h, "/api/v1/dead-letters/discard", &json!({ "ids": ids })).await;
    assert_eq!((status, done["discarded"].as_i64()), (200, Some(3)), "{done}");
    wait_total(&h, "", 0).await;
    let (status, again) = post(&h, "/api/v1/dead-letters/replay", &json!({ "ids": ids })).await;
    assert_eq!(
        (status, again["replayed"].as_i64(), again["not_found"].as_array().map(Vec::len)),
        (200, Some(0), Some(3)),
        "{again}"
    );
    let (_, shown) = get(&h, &format!("/api/v1/dead-letters/{}", ids[0].as_str().unwrap())).await;
    assert_eq!(shown["status"], "discarded");
    worker.stop().await.unwrap();
    assert_eq!(h.count(&h.email_dead_queue()).await, 0);
    assert_eq!(h.smtp.attempts(), 0, "nothing was sent");
    h.cleanup().await;
}

/// Acceptance 6: past REPLAY_LIMIT a replay is refused with the reason; discard removes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_limit_refuses_and_discard_removes_for_good() {
    let h = harness("dl-limit", &[("REPLAY_LIMIT", "1")]).await;
    h.smtp.always(Reply::permanent());
    let mut worker = h.worker().await;
    let id = post_mails(&h, "poison", 1).await.into_iter().next().unwrap();
    worker.next_reports(1, WAIT).await;
    let page = wait_total(&h, "", 1).await;
    let first = page["items"][0]["id"].clone();
    let (_, done) = post(&h, "/api/v1/dead-letters/replay", &json!({ "ids": [first] })).await;
    assert_eq!(done["replayed"], 1, "{done}");
    // It dies again: a new dead letter, replayed once.
    worker.next_reports(1, WAIT).await;
    let page = wait_total(&h, "", 1).await;
    let second = page["items"][0].clone();
    assert_ne!(second["id"], first);
    assert_eq!(
        (second["notification_id"].as_str(), second["replays"].as_i64()),
        (Some(id.as_str()), Some(1)),
        "{page}"
    );
    let (status, refused) = post(&h, "/api/v1/dead-letters/replay", &json!({ "ids": [second["id"]] })).await;
    assert_eq!((status, refused["replayed"].as_i64()), (200, Some(0)), "{refused}");
    assert_eq!(refused["refused"][0]["id"], second["id"], "{refused}");
    assert!(refused["refused"][0]["reason"].as_str().unwrap().contains("REPLAY_LIMIT"), "{refused}");
    wait_total(&h, "", 1).await;
    let (_, done) =
        post(&h, "/api/v1/dead-letters/discard", &json!({"filter": {"channel": "email"}, "limit": 10})).await;
    assert_eq!((done["matched"].as_i64(), done["discarded"].as_i64()), (Some(1), Some(1)), "{done}");
    wait_total(&h, "", 0).await;
    let (_, again) = post(&h, "/api/v1/dead-letters/replay", &json!({ "ids": [second["id"]] })).await;
    assert_eq!(again["not_found"][0], second["id"], "{again}");
    worker.stop().await.unwrap();
    assert_eq!(h.smtp.attempts(), 2, "sent once, replayed once, never again");
    h.cleanup().await;
}

/// Acceptance 8: bad filters are a 422 naming the field, no key a 401; nothing is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_filters_and_missing_keys_are_refused_and_replay_nothing() {
    let h = harness("dl-bad", &[]).await;
    h.smtp.always(Reply::permanent());
    let mut worker = h.worker().await;
    post_mails(&h, "x", 1).await;
    worker.next_reports(1, WAIT).await;
    wait_total(&h, "", 1).await;
    h.smtp.reset();
    for (query, field) in [
        ("reason=tired", "reason"),
        ("channel=sms", "channel"),
        ("since=yesterday", "since"),
        ("until=2026-13-01T00:00:00Z", "until"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("cursor=nope", "cursor"),
        ("colour=red", "colour"),
    ] {
        let (status, body) = get(&h, &format!("/api/v1/dead-letters?{query}")).await;
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(body["error"]["fields"][0]["field"], field, "{query}: {body}");
    }
    for (body, field) in [
        (json!({"filter": {"reason": "tired"}}), "filter.reason"),
        (json!({"filter": {"channel": "sms"}}), "filter.channel"),
        (json!({"filter": {"since": "soon"}}), "filter.since"),
        (json!({"filter": {}, "limit": 0}), "limit"),
        (json!({"filter": {}, "limit": 10001}), "limit"),
        (json!({"ids": []}), "ids"),
        (json!({}), "ids"),
        (json!({"ids": ["not-a-uuid"]}), "ids[0]"),
    ] {
        for action in ["replay", "discard"] {
            let (status, answer) = post(&h, &format!("/api/v1/dead-letters/{action}"), &body).await;
            assert_eq!(status, 422, "{action} {body}: {answer}");
            assert_eq!(answer["error"]["fields"][0]["field"], field, "{action} {body}: {answer}");
        }
    }
    let anonymous = reqwest::Client::new();
    let res = anonymous.get(format!("{}/api/v1/dead-letters", h.api.base)).send().await.unwrap();
    assert_eq!(res.status(), 401);
    for action in ["replay", "discard"] {
        let res = anonymous
            .post(format!("{}/api/v1/dead-letters/{action}", h.api.base))
            .json(&json!({"filter": {}, "limit": 10}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
    }
    wait_total(&h, "", 1).await;
    worker.stop().await.unwrap();
    assert_eq!(h.smtp.attempts(), 1, "no rejected request replayed anything");
    h.cleanup().await;
}

/// Acceptance 7: the worker purges rows past their age in small batches; newer ones, and
/// what is still in flight or still dead, stay; an inbox page still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_old_rows_and_keeps_the_rest() {
    let ages = [
        ("RETENTION_DELIVERIES", "1h"),
        ("RETENTION_INBOX", "1h"),
        ("RETENTION_IDEMPOTENCY_KEYS", "1h"),
        ("RETENTION_DEAD_LETTERS", "1h"),
        ("RETENTION_INTERVAL", "100ms"),
        ("RETENTION_BATCH", "7"),
    ];
    let h = harness("dl-retention", &ages).await;
    let store = h.store();
    let pool = store.pool();
    // Two hours old (past the ages) and new rows of every kind; the API migrated the schema.
    let old = "now() - interval '2 hours'";
    for (sql, n) in [
        (format!("INSERT INTO deliveries (notification_id, channel, status, attempts, created_at, updated_at) SELECT gen_random_uuid(), 'email', 'delivered', 1, {old}, {old} FROM generate_series(1, $1)"), 30),
        (format!("INSERT INTO deliveries (notification_id, channel, status, attempts, created_at, updated_at) SELECT gen_random_uuid(), 'email', 'retrying', 1, {old}, {old} FROM generate_series(1, $1)"), 5),
        ("INSERT INTO deliveries (notification_id, channel, status, attempts) SELECT gen_random_uuid(), 'email', 'delivered', 1 FROM generate_series(1, $1)".into(), 10),
        (format!("INSERT INTO inbox_items (id, notification_id, user_id, title, body, created_at) SELECT gen_random_uuid(), gen_random_uuid(), 'u1', 'old', 'b', {old} FROM generate_series(1, $1)"), 20),
        ("INSERT INTO inbox_items (id, notification_id, user_id, title, body) SELECT gen_random_uuid(), gen_random_uuid(), 'u1', 'new', 'b' FROM generate_series(1, $1)".into(), 5),
        (format!("INSERT INTO idempotency_keys (key, request_hash, state, response_status, response_body, created_at) SELECT 'old-' || g, 'h', 'completed', 202, '{{}}', {old} FROM generate_series(1, $1) g"), 15),
        ("INSERT INTO idempotency_keys (key, request_hash, state, response_status, response_body) SELECT 'new-' || g, 'h', 'completed', 202, '{}' FROM generate_series(1, $1) g".into(), 3),
    ] {
        sqlx::query(&sql).bind(n).execute(pool).await.unwrap();
    }
    for (status, at, n) in [("replayed", old, 10), ("discarded", old, 10), ("dead", old, 5), ("replayed", "now()", 3)] {
        sqlx::query(&format!(
            "INSERT INTO dead_letters (id, fingerprint, channel, reason, dead_at, body, properties, status, status_at)
             SELECT gen_random_uuid(), gen_random_uuid()::text, 'email', 'permanent', {old}, '\\x00', '{{}}', $1, {at}
               FROM generate_series(1, $2)"
        ))
        .bind(status)
        .bind(n)
        .execute(pool)
        .await
        .unwrap();
    }
    let count = |sql: &'static str| async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await.unwrap() };
    let worker = h.worker().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = count(
            "SELECT (SELECT count(*) FROM deliveries) + (SELECT count(*) FROM inbox_items)
                               + (SELECT count(*) FROM idempotency_keys) + (SELECT count(*) FROM dead_letters)",
        )
        .await;
        if left == 15 + 5 + 3 + 8 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{left} rows left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count("SELECT count(*) FROM deliveries WHERE status = 'retrying'").await, 5, "in flight: kept");
    assert_eq!(count("SELECT count(*) FROM deliveries WHERE status = 'delivered'").await, 10);
    assert_eq!(count("SELECT count(*) FROM inbox_items WHERE title = 'new'").await, 5);
    assert_eq!(count("SELECT count(*) FROM idempotency_keys WHERE key LIKE 'new-%'").await, 3);
    assert_eq!(
        count("SELECT count(*) FROM dead_letters WHERE status = 'dead'").await,
        5,
        "dead ones wait for an operator"
    );
    assert_eq!(count("SELECT count(*) FROM dead_letters WHERE status = 'replayed'").await, 3);
    let (status, page) = get(&h, "/api/v1/users/u1/notifications?limit=10").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!((page["items"].as_array().unwrap().len(), page["unread_count"].as_i64()), (5, Some(5)), "{page}");
    assert!(page["items"].as_array().unwrap().iter().all(|i| i["title"] == "new"), "{page}");
    worker.stop().await.unwrap();
    h.cleanup().await;
}

/// A dead letter is acked off its queue only once stored: while PostgreSQL refuses it, the
/// indexer holds it unacked (a stopped worker gives it back to the queue); once it can be
/// stored it is, once, however often the broker delivered it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_stays_in_its_queue_until_it_is_stored_and_is_stored_once() {
    let h = harness("dl-keep", &[]).await;
    let store = h.store();
    let dead_queue = h.email_dead_queue();
    let ch = h.amqp.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let publish_dead = |env: &Envelope| {
        let mut props = broker::envelope_properties(env, 1);
        let mut headers = props.headers().clone().unwrap_or_default();
        let text = |s: &str| lapin::types::AMQPValue::LongString(s.into());
        headers.insert(notify_types::headers::DEAD_REASON.into(), text("permanent"));
        headers.insert(notify_types::headers::LAST_ERROR.into(), text("550 5.1.1 mailbox unavailable"));
        headers.insert(notify_types::headers::DEAD_AT.into(), text("2026-12-03T10:00:00.000Z"));
        props = props.with_headers(headers);
        let (ch, queue, body) = (ch.clone(), dead_queue.clone(), env.to_bytes());
        async move { broker::publish_confirmed(&ch, "", &queue, &body, props, WAIT).await.unwrap() }
    };
    let mail = |i: u32| {
        Envelope::direct(
            Channel::Email,
            format!("keep-{i}"),
            json!({"to": "k@example.com", "subject": "s", "body": "b"}),
        )
    };
    let mut worker = h.worker().await;
    publish_dead(&mail(1)).await;
    wait_total(&h, "", 1).await;

    // PostgreSQL refuses the inserts (the table is away); the same dead message arrives twice,
    // as after an indexer crash between its commit and its ack.
    sqlx::query("ALTER TABLE dead_letters RENAME TO dead_letters_away").execute(store.pool()).await.unwrap();
    let twice = mail(2);
    publish_dead(&twice).await;
    publish_dead(&twice).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while h.count(&dead_queue).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the indexer never took the messages");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.stop().await.unwrap();
    assert_eq!(h.count(&dead_queue).await, 2, "not acked while they could not be stored: back in the queue");

    sqlx::query("ALTER TABLE dead_letters_away RENAME TO dead_letters").execute(store.pool()).await.unwrap();
    worker = h.worker().await;
    let page = wait_total(&h, "", 2).await;
    let ids: BTreeSet<&str> =
        page["items"].as_array().unwrap().iter().map(|i| i["notification_id"].as_str().unwrap()).collect();
    assert!(ids.contains(twice.id.to_string().as_str()), "{page}");
    worker.stop().await.unwrap();
    assert_eq!(h.count(&dead_queue).await, 0, "stored, then acked");
    h.cleanup().await;
}
