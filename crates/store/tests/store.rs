//! Integration tests against the real Postgres (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). Each test works in its own schema
//! `t_store_<8 hex>`, dropped at the end (also when the test body panics).

use std::future::Future;
use std::time::{Duration, Instant};

use notify_store::{Begin, Claim, NewInboxItem, Store, StoreError};
use serde_json::json;
use tokio::task::JoinSet;
use uuid::Uuid;

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_string())
}

fn schema_name() -> String {
    // The last 8 hex digits of a v7 UUID are random.
    let id = Uuid::now_v7().simple().to_string();
    format!("t_store_{}", &id[24..])
}

async fn new_store(max_connections: u32) -> Store {
    let store = Store::connect_lazy(&database_url(), &schema_name(), max_connections).unwrap();
    store.migrate().await.expect("migrate");
    store
}

/// Runs `body` with a migrated store in a fresh schema, then drops the schema — also when
/// `body` panics (the panic is re-raised afterwards).
async fn with_store<F, Fut>(max_connections: u32, body: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let store = new_store(max_connections).await;
    let result = tokio::spawn(body(store.clone())).await;
    store.drop_schema().await.expect("drop schema");
    store.close().await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn schema_exists(store: &Store, schema: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

fn inbox_item(user: &str, n: usize) -> NewInboxItem {
    NewInboxItem {
        notification_id: Uuid::now_v7(),
        user: user.to_string(),
        title: format!("title {n}"),
        body: format!("body {n}"),
        data: Some(json!({ "n": n })),
        event: Some("test.event".to_string()),
        created_at: chrono::Utc::now(),
    }
}

// ------------------------------------------------------------------------ deliveries

#[tokio::test]
async fn claim_guard_and_states() {
    with_store(4, |s| async move {
        let id = Uuid::now_v7();
        assert!(s.delivery_status(id).await.unwrap().is_empty());

        // First attempt proceeds.
        assert_eq!(s.claim(id, "email", Some("user.signup"), 1).await.unwrap(), Claim::Proceed);
        let st = s.delivery_status(id).await.unwrap();
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].channel, "email");
        assert_eq!(st[0].status, "delivering");
        assert_eq!(st[0].attempts, 1);
        assert_eq!(st[0].event.as_deref(), Some("user.signup"));
        assert!(st[0].delivered_at.is_none());

        // Fails → retrying with the error.
        s.mark_retrying(id, "email", None, "smtp 451").await.unwrap();
        let st = s.delivery_status(id).await.unwrap();
        assert_eq!(st[0].status, "retrying");
        assert_eq!(st[0].last_error.as_deref(), Some("smtp 451"));

        // Second attempt: attempts goes up; event kept when not given.
        assert_eq!(s.claim(id, "email", None, 2).await.unwrap(), Claim::Proceed);
        // A stale redelivery with a lower attempt number does not lower the count; it finds the
        // previous claim unfinished (still `delivering`) and counts that as a crash.
        assert_eq!(s.claim(id, "email", None, 1).await.unwrap(), Claim::Unfinished { crashes: 1 });
        let st = s.delivery_status(id).await.unwrap();
        assert_eq!(st[0].status, "delivering");
        assert_eq!(st[0].attempts, 2);
        assert_eq!(st[0].event.as_deref(), Some("user.signup"));

        // Delivered: last_error cleared (issue 14: a delivered status shows no error),
        // delivered_at set.
        s.mark_delivered(id, "email").await.unwrap();
        let st = s.delivery_status(id).await.unwrap();
        assert_eq!(st[0].status, "delivered");
        assert_eq!(st[0].attempts, 2);
        assert_eq!(st[0].last_error, None);
        let delivered_at = st[0].delivered_at.expect("delivered_at");
        assert!(st[0].updated_at >= st[0].created_at);

        // The guard: never again.
        assert_eq!(s.claim(id, "email", None, 3).await.unwrap(), Claim::AlreadyDelivered);
        // A late failure report can't downgrade a delivered row.
        s.mark_retrying(id, "email", None, "late").await.unwrap();
        s.mark_dead(id, "email", None, 9, "late", "rejected").await.unwrap();
        s.mark_delivered(id, "email").await.unwrap();
        let st = s.delivery_status(id).await.unwrap();
        assert_eq!(st[0].status, "delivered");
        assert_eq!(st[0].attempts, 2);
        assert_eq!(st[0].last_error, None);
        assert_eq!(st[0].delivered_at, Some(delivered_at));

        // Another channel of the same notification is independent; dead after retries.
        assert_eq!(s.claim(id, "webhook", Some("user.signup"), 1).await.unwrap(), Claim::Proceed);
        s.mark_retrying(id, "webhook", None, "HTTP 500").await.unwrap();
        s.mark_dead(id, "webhook", None, 5, "HTTP 500", "delivery_limit").await.unwrap();
        let st = s.delivery_status(id).await.unwrap();
        assert_eq!(
            st.iter().map(|d| d.channel.as_str()).collect::<Vec<_>>(),
            ["email", "webhook"],
            "ordered by channel"
        );
        assert_eq!(st[1].status, "dead");
        assert_eq!(st[1].attempts, 5);
        assert_eq!(st[1].last_error.as_deref(), Some("HTTP 500"));
        assert!(st[1].delivered_at.is_none());

        // A replayed dead letter can be claimed again.
        assert_eq!(s.claim(id, "webhook", None, 1).await.unwrap(), Claim::Proceed);
        let st = s.delivery_status(id).await.unwrap();
        assert_eq!(st[1].status, "delivering");
        assert_eq!(st[1].attempts, 5);

        // Dead before any claim (bad payload): upsert.
        let id2 = Uuid::now_v7();
        s.mark_dead(id2, "in_app", None, 1, "invalid payload", "rejected").await.unwrap();
        let st = s.delivery_status(id2).await.unwrap();
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].status, "dead");
        assert_eq!(st[0].attempts, 1);
        assert_eq!(st[0].last_error.as_deref(), Some("invalid payload"));

        // Serializes for the API.
        let v = serde_json::to_value(&st[0]).unwrap();
        assert_eq!(v["status"], "dead");
        assert_eq!(v["channel"], "in_app");
    })
    .await;
}

#[tokio::test]
async fn concurrent_claims_after_delivery_are_all_already_delivered() {
    with_store(10, |s| async move {
        let id = Uuid::now_v7();
        assert_eq!(s.claim(id, "email", None, 1).await.unwrap(), Claim::Proceed);
        s.mark_delivered(id, "email").await.unwrap();

        let mut set = JoinSet::new();
        for attempt in 0..10 {
            let s = s.clone();
            set.spawn(async move { s.claim(id, "email", None, attempt + 2).await });
        }
        let results: Vec<_> = set.join_all().await;
        assert_eq!(results.len(), 10);
        for r in results {
            assert_eq!(r.unwrap(), Claim::AlreadyDelivered);
        }
        let st = s.delivery_status(id).await.unwrap();
        assert_eq!(st[0].status, "delivered");
        assert_eq!(st[0].attempts, 1);
    })
    .await;
}

#[tokio::test]
async fn concurrent_first_claims_all_succeed_without_errors() {
    // Ten racing first claims of a brand-new row: ON CONFLICT serializes them, no
    // unique-violation errors, attempts ends at the max.
    with_store(10, |s| async move {
        let id = Uuid::now_v7();
        let mut set = JoinSet::new();
        for attempt in 1..=10 {
            let s = s.clone();
            set.spawn(async move { s.claim(id, "webhook", Some("e"), attempt).await });
        }
        // The first one proceeds; each later one finds the row mid-delivery and counts it.
        let mut crashes: Vec<i32> = set
            .join_all()
            .await
            .into_iter()
            .map(|r| match r.unwrap() {
                Claim::Proceed => 0,
                Claim::Unfinished { crashes } => crashes,
                Claim::AlreadyDelivered => panic!("nothing was delivered"),
            })
            .collect();
        crashes.sort();
        assert_eq!(crashes, (0..10).collect::<Vec<_>>());
        let st = s.delivery_status(id).await.unwrap();
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].attempts, 10);
    })
    .await;
}

// ------------------------------------------------------------------------ inbox

#[tokio::test]
async fn inbox_insert_is_idempotent_and_marks_in_app_delivered() {
    with_store(4, |s| async move {
        let item = inbox_item("alice", 1);
        assert!(s.insert_inbox_item(&item).await.unwrap());
        // Redelivery of the same notification (even with other content) → nothing new.
        let mut again = item.clone();
        again.title = "changed".into();
        assert!(!s.insert_inbox_item(&again).await.unwrap());

        let page = s.list_inbox("alice", false, None, 50).await.unwrap();
        assert_eq!(page.items.len(), 1);
        let it = &page.items[0];
        assert_eq!(it.notification_id, item.notification_id);
        assert_eq!(it.user, "alice");
        assert_eq!(it.title, "title 1");
        assert_eq!(it.body, "body 1");
        assert_eq!(it.data, Some(json!({"n": 1})));
        assert_eq!(it.event.as_deref(), Some("test.event"));
        assert!(!it.read);
        assert!(it.read_at.is_none());
        assert_eq!(it.id.get_version_num(), 7, "UUID v7");
        assert_eq!(page.unread_count, 1);
        assert!(page.next_cursor.is_none());

        // The in_app delivery is delivered, so the guard stops a redelivery.
        let st = s.delivery_status(item.notification_id).await.unwrap();
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].channel, "in_app");
        assert_eq!(st[0].status, "delivered");
        assert!(st[0].delivered_at.is_some());
        assert_eq!(s.claim(item.notification_id, "in_app", None, 2).await.unwrap(), Claim::AlreadyDelivered);

        // Same notification for another user is another item.
        let mut bob = item.clone();
        bob.user = "bob".into();
        assert!(s.insert_inbox_item(&bob).await.unwrap());
        assert_eq!(s.unread_count("bob").await.unwrap(), 1);
        assert_eq!(s.unread_count("alice").await.unwrap(), 1);

        // Concurrent redeliveries: exactly one insert.
        let item = inbox_item("carol", 2);
        let mut set = JoinSet::new();
        for _ in 0..8 {
            let s = s.clone();
            let item = item.clone();
            set.spawn(async move { s.insert_inbox_item(&item).await });
        }
        let inserted = set.join_all().await.into_iter().map(|r| r.unwrap()).filter(|b| *b).count();
        assert_eq!(inserted, 1);
        assert_eq!(s.unread_count("carol").await.unwrap(), 1);

        // Item JSON shape.
        let v = serde_json::to_value(&page.items[0]).unwrap();
        assert_eq!(v["user"], "alice");
        assert_eq!(v["read"], false);
        assert!(v["read_at"].is_null());
    })
    .await;
}

#[tokio::test]
async fn inbox_pagination_newest_first() {
    with_store(4, |s| async move {
        let mut inserted = Vec::new();
        for n in 0..25 {
            let item = inbox_item("dave", n);
            assert!(s.insert_inbox_item(&item).await.unwrap());
            inserted.push(item.notification_id);
        }
        // Someone else's items never show up.
        s.insert_inbox_item(&inbox_item("erin", 0)).await.unwrap();

        let mut seen = Vec::new();
        let mut sizes = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = s.list_inbox("dave", false, cursor.as_deref(), 10).await.unwrap();
            assert_eq!(page.unread_count, 25);
            sizes.push(page.items.len());
            seen.extend(page.items.iter().map(|i| (i.created_at, i.id, i.notification_id)));
            match page.next_cursor {
                Some(c) => {
                    assert!(notify_store::is_valid_cursor(&c));
                    cursor = Some(c)
                }
                None => break,
            }
        }
        assert_eq!(sizes, [10, 10, 5]);
        // Newest first, strictly decreasing (created_at, id) → no overlap.
        for w in seen.windows(2) {
            assert!((w[0].0, w[0].1) > (w[1].0, w[1].1), "order: {w:?}");
        }
        let mut expected = inserted.clone();
        expected.reverse();
        assert_eq!(seen.iter().map(|x| x.2).collect::<Vec<_>>(), expected, "newest first, all 25, no overlap");

        // Exactly one page when it fits; limit is clamped.
        let page = s.list_inbox("dave", false, None, 25).await.unwrap();
        assert_eq!(page.items.len(), 25);
        assert!(page.next_cursor.is_none());
        let page = s.list_inbox("dave", false, None, 0).await.unwrap();
        assert_eq!(page.items.len(), 1);
        let page = s.list_inbox("dave", false, None, 1000).await.unwrap();
        assert_eq!(page.items.len(), 25);

        // A bad cursor is an error (the API validates first with is_valid_cursor).
        assert!(!notify_store::is_valid_cursor("garbage"));
        assert!(matches!(s.list_inbox("dave", false, Some("garbage"), 10).await, Err(StoreError::Other(_))));
        // Unknown user: empty.
        let page = s.list_inbox("nobody", false, None, 10).await.unwrap();
        assert!(page.items.is_empty());
        assert_eq!(page.unread_count, 0);
        assert!(page.next_cursor.is_none());
    })
    .await;
}

#[tokio::test]
async fn inbox_read_state() {
    with_store(4, |s| async move {
        for n in 0..6 {
            s.insert_inbox_item(&inbox_item("frank", n)).await.unwrap();
        }
        s.insert_inbox_item(&inbox_item("grace", 0)).await.unwrap();
        assert_eq!(s.unread_count("frank").await.unwrap(), 6);

        let all = s.list_inbox("frank", false, None, 100).await.unwrap().items;
        // Read the newest and the 3rd.
        assert!(s.mark_read("frank", all[0].id).await.unwrap());
        assert!(s.mark_read("frank", all[2].id).await.unwrap());
        assert_eq!(s.unread_count("frank").await.unwrap(), 4);

        // Idempotent: read_at unchanged.
        let before = s.list_inbox("frank", false, None, 100).await.unwrap().items[0].clone();
        assert!(before.read);
        let read_at = before.read_at.expect("read_at");
        assert!(s.mark_read("frank", all[0].id).await.unwrap());
        let after = s.list_inbox("frank", false, None, 100).await.unwrap().items[0].clone();
        assert_eq!(after.read_at, Some(read_at));

        // Someone else's item: false and unchanged; unknown id: false.
        let grace_item = s.list_inbox("grace", false, None, 10).await.unwrap().items[0].clone();
        assert!(!s.mark_read("frank", grace_item.id).await.unwrap());
        assert!(!s.mark_read("frank", Uuid::now_v7()).await.unwrap());
        let grace_after = s.list_inbox("grace", false, None, 10).await.unwrap();
        assert!(!grace_after.items[0].read);
        assert_eq!(grace_after.unread_count, 1);

        // Unread filter, with pagination.
        let unread = s.list_inbox("frank", true, None, 100).await.unwrap();
        assert_eq!(unread.items.len(), 4);
        assert_eq!(unread.unread_count, 4);
        assert!(unread.items.iter().all(|i| !i.read));
        let ids: Vec<_> = all.iter().enumerate().filter(|(i, _)| *i != 0 && *i != 2).map(|(_, it)| it.id).collect();
        assert_eq!(unread.items.iter().map(|i| i.id).collect::<Vec<_>>(), ids);
        let p1 = s.list_inbox("frank", true, None, 3).await.unwrap();
        assert_eq!(p1.items.len(), 3);
        let p2 = s.list_inbox("frank", true, p1.next_cursor.as_deref(), 3).await.unwrap();
        assert_eq!(p2.items.len(), 1);
        assert!(p2.next_cursor.is_none());
        assert_eq!(p2.items[0].id, ids[3]);

        // Read all.
        assert_eq!(s.mark_all_read("frank").await.unwrap(), 4);
        assert_eq!(s.mark_all_read("frank").await.unwrap(), 0);
        assert_eq!(s.unread_count("frank").await.unwrap(), 0);
        assert!(s.list_inbox("frank", true, None, 10).await.unwrap().items.is_empty());
        let all_after = s.list_inbox("frank", false, None, 100).await.unwrap();
        assert!(all_after.items.iter().all(|i| i.read && i.read_at.is_some()));
        // Earlier read_at not touched by read-all.
        assert_eq!(all_after.items[0].read_at, Some(read_at));
        // Grace untouched.
        assert_eq!(s.unread_count("grace").await.unwrap(), 1);
    })
    .await;
}

// ------------------------------------------------------------------------ idempotency

#[tokio::test]
async fn idempotency_lifecycle() {
    with_store(4, |s| async move {
        let key = "client-key-1";
        let h1 = "a".repeat(64);
        let h2 = "b".repeat(64);
        let body = json!({"id": Uuid::now_v7(), "status": "accepted"});

        assert_eq!(s.idempotency_begin(key, &h1).await.unwrap(), Begin::Owner);
        assert_eq!(s.idempotency_begin(key, &h1).await.unwrap(), Begin::Pending);
        assert_eq!(s.idempotency_begin(key, &h2).await.unwrap(), Begin::Mismatch);

        // A waiter sees the completion.
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.idempotency_wait(key, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.idempotency_complete(key, 202, &body).await.unwrap();
        let waited = waiter.await.unwrap().unwrap();
        assert_eq!(waited, Some(Begin::Replay { status: 202, body: body.clone() }));

        assert_eq!(s.idempotency_begin(key, &h1).await.unwrap(), Begin::Replay { status: 202, body: body.clone() });
        assert_eq!(s.idempotency_begin(key, &h2).await.unwrap(), Begin::Mismatch);
        // Abandon does not remove a completed key.
        s.idempotency_abandon(key).await.unwrap();
        assert!(matches!(s.idempotency_begin(key, &h1).await.unwrap(), Begin::Replay { status: 202, .. }));

        // Owner fails → abandon → the retry owns it again.
        let key2 = "client-key-2";
        assert_eq!(s.idempotency_begin(key2, &h1).await.unwrap(), Begin::Owner);
        s.idempotency_abandon(key2).await.unwrap();
        assert_eq!(s.idempotency_begin(key2, &h1).await.unwrap(), Begin::Owner);

        // wait: times out on a pending key (bounded), None when abandoned / unknown.
        let t = Instant::now();
        assert_eq!(s.idempotency_wait(key2, Duration::from_millis(150)).await.unwrap(), None);
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(150) && waited < Duration::from_secs(2), "{waited:?}");
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.idempotency_wait(key2, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        s.idempotency_abandon(key2).await.unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), None);
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(s.idempotency_wait("unknown", Duration::from_secs(5)).await.unwrap(), None);

        // Purge.
        assert_eq!(s.idempotency_purge(Duration::from_secs(3600)).await.unwrap(), 0);
        // Both keys: the completed one and the failed one (a failed key is kept with its id).
        assert_eq!(s.idempotency_purge(Duration::ZERO).await.unwrap(), 2);
        assert_eq!(s.idempotency_begin(key, &h2).await.unwrap(), Begin::Owner);
    })
    .await;
}

#[tokio::test]
async fn an_idempotency_key_keeps_its_notification_id_through_failures() {
    with_store(4, |s| async move {
        let (key, hash) = ("client-key-9", "c".repeat(64));
        let first = Uuid::now_v7();
        assert_eq!(s.idempotency_begin(key, &hash).await.unwrap(), Begin::Owner);
        assert_eq!(s.idempotency_notification(key, first).await.unwrap(), first);
        // The publish failed (503): the retry owns the key again and gets the first id back.
        s.idempotency_abandon(key).await.unwrap();
        assert_eq!(s.idempotency_begin(key, &hash).await.unwrap(), Begin::Owner);
        assert_eq!(s.idempotency_notification(key, Uuid::now_v7()).await.unwrap(), first);
        // Another request with the key is still another request.
        s.idempotency_abandon(key).await.unwrap();
        assert_eq!(s.idempotency_begin(key, &"d".repeat(64)).await.unwrap(), Begin::Mismatch);
        assert_eq!(s.idempotency_begin(key, &hash).await.unwrap(), Begin::Owner);
        s.idempotency_complete(key, 202, &json!({"id": first})).await.unwrap();
        assert!(matches!(s.idempotency_begin(key, &hash).await.unwrap(), Begin::Replay { status: 202, .. }));
    })
    .await;
}

#[tokio::test]
async fn idempotency_concurrent_begins_have_one_owner() {
    with_store(10, |s| async move {
        let hash = "c".repeat(64);
        let mut set = JoinSet::new();
        for _ in 0..10 {
            let s = s.clone();
            let hash = hash.clone();
            set.spawn(async move { s.idempotency_begin("same-key", &hash).await });
        }
        let results: Vec<Begin> = set.join_all().await.into_iter().map(|r| r.unwrap()).collect();
        let owners = results.iter().filter(|b| **b == Begin::Owner).count();
        let pending = results.iter().filter(|b| **b == Begin::Pending).count();
        assert_eq!(owners, 1, "{results:?}");
        assert_eq!(pending, 9, "{results:?}");
    })
    .await;
}

// ------------------------------------------------------------------------ plumbing

#[tokio::test]
async fn unreachable_database_is_unavailable_fast() {
    // Nothing listens on port 1: connection refused. The pool keeps retrying until its
    // acquire timeout (3 s), then reports Unavailable.
    let store = Store::connect_lazy("postgres://postgres@127.0.0.1:1/test", "t_unreachable", 2)
        .expect("lazy connect does not touch the network");
    let t = Instant::now();
    let err = store.claim(Uuid::now_v7(), "email", None, 1).await.unwrap_err();
    let took = t.elapsed();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.is_unavailable());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(err.to_string().starts_with("database unavailable: "), "{err}");

    eprintln!("claim against an unreachable database failed after {took:?}");

    let t = Instant::now();
    let (ping, migrate) = tokio::join!(store.ping(), store.migrate());
    assert!(matches!(ping, Err(StoreError::Unavailable(_))), "{ping:?}");
    assert!(matches!(migrate, Err(StoreError::Unavailable(_))), "{migrate:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[tokio::test]
async fn migrate_is_idempotent_and_lives_in_the_schema() {
    with_store(4, |s| async move {
        // Twice more, sequentially and concurrently (API and worker starting together).
        s.migrate().await.unwrap();
        let mut set = JoinSet::new();
        for _ in 0..4 {
            let s = s.clone();
            set.spawn(async move { s.migrate().await });
        }
        for r in set.join_all().await {
            r.unwrap();
        }
        s.ping().await.unwrap();

        // sqlx's bookkeeping and our tables are in the test schema (search_path works for
        // the migrator), one row per migration file.
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables
              WHERE table_schema = $1 ORDER BY 1",
        )
        .bind(s.schema())
        .fetch_all(s.pool())
        .await
        .unwrap();
        assert_eq!(
            tables,
            [
                "_sqlx_migrations",
                "dead_letter_actions",
                "dead_letters",
                "deliveries",
                "idempotency_keys",
                "inbox_items"
            ]
        );
        let applied: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\"._sqlx_migrations WHERE success", s.schema()))
                .fetch_one(s.pool())
                .await
                .unwrap();
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".sql"))
            .count();
        assert_eq!(applied, files as i64);
        let current: String = sqlx::query_scalar("SELECT current_schema()::text").fetch_one(s.pool()).await.unwrap();
        assert_eq!(current, s.schema());
    })
    .await;
}

#[tokio::test]
async fn schemas_are_isolated_and_dropped() {
    let a = new_store(2).await;
    let b = new_store(2).await;
    assert_ne!(a.schema(), b.schema());

    let id = Uuid::now_v7();
    a.claim(id, "email", None, 1).await.unwrap();
    a.mark_delivered(id, "email").await.unwrap();
    let item = inbox_item("henry", 0);
    a.insert_inbox_item(&item).await.unwrap();
    assert_eq!(a.idempotency_begin("k", "h").await.unwrap(), Begin::Owner);

    assert!(b.delivery_status(id).await.unwrap().is_empty());
    assert_eq!(b.claim(id, "email", None, 1).await.unwrap(), Claim::Proceed);
    assert_eq!(b.unread_count("henry").await.unwrap(), 0);
    assert!(b.insert_inbox_item(&item).await.unwrap());
    assert_eq!(b.idempotency_begin("k", "h").await.unwrap(), Begin::Owner);
    assert_eq!(a.claim(id, "email", None, 2).await.unwrap(), Claim::AlreadyDelivered);

    a.drop_schema().await.unwrap();
    assert!(!schema_exists(&b, a.schema()).await);
    assert!(schema_exists(&b, b.schema()).await);
    b.drop_schema().await.unwrap();
    assert!(!schema_exists(&a, b.schema()).await);
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn bad_schema_names_are_refused() {
    for bad in ["", "Robert'); DROP", "a b", "x\"y", "pg_catalog", &"a".repeat(64)] {
        assert!(matches!(Store::connect_lazy(&database_url(), bad, 1), Err(StoreError::Other(_))), "{bad:?}");
    }
    assert!(Store::connect_lazy(&database_url(), "public", 1).is_ok());
}

#[tokio::test]
async fn concurrent_writes_share_statements_and_each_gets_its_own_result() {
    with_store(4, |s| async move {
        // 300 deliveries at once, a third of them delivered before: their claims must say so.
        let ids: Vec<Uuid> = (0..300).map(|_| Uuid::now_v7()).collect();
        for id in ids.iter().step_by(3) {
            assert_eq!(s.claim(*id, "webhook", None, 1).await.unwrap(), Claim::Proceed);
            s.mark_delivered(*id, "webhook").await.unwrap();
        }
        let before = s.group_commit_stats();
        let mut set = JoinSet::new();
        for (i, id) in ids.iter().enumerate() {
            let (s, id) = (s.clone(), *id);
            set.spawn(async move { (i, s.claim(id, "webhook", Some("e"), 2).await.unwrap()) });
        }
        let results = set.join_all().await;
        let after = s.group_commit_stats();
        for (i, claim) in &results {
            let expected = if i % 3 == 0 { Claim::AlreadyDelivered } else { Claim::Proceed };
            assert_eq!(*claim, expected, "claim {i}");
        }
        let (statements, writes) = (after.statements - before.statements, after.writes - before.writes);
        println!("300 concurrent claims: {writes} writes in {statements} statements");
        assert_eq!(writes, 300);
        assert!(statements < 300 / 4, "{statements} statements for 300 concurrent claims: not grouped");

        // Inbox items and delivered records the same way, each item exactly once.
        let mut set = JoinSet::new();
        for (i, id) in ids.iter().enumerate().filter(|(i, _)| i % 3 != 0) {
            let (s, id) = (s.clone(), *id);
            set.spawn(async move {
                let item = NewInboxItem {
                    notification_id: id,
                    user: format!("user-{}", i % 7),
                    title: format!("t{i}"),
                    body: "b".into(),
                    data: (i % 2 == 0).then(|| json!({"i": i})),
                    event: None,
                    created_at: chrono::Utc::now(),
                };
                let first = s.insert_inbox_item(&item).await.unwrap();
                let again = s.insert_inbox_item(&item).await.unwrap();
                s.mark_delivered(id, "webhook").await.unwrap();
                (first, again)
            });
        }
        for (first, again) in set.join_all().await {
            assert_eq!((first, again), (true, false), "inserted once, then found");
        }
        let mut items = 0;
        for u in 0..7 {
            items += s.list_inbox(&format!("user-{u}"), false, None, 100).await.unwrap().items.len();
        }
        assert_eq!(items, 200);
        for id in &ids {
            let st = s.delivery_status(*id).await.unwrap();
            assert!(st.iter().all(|r| r.status == "delivered"), "{id}: {st:?}");
        }
    })
    .await;
}
