//! The send guard with two copies of one notification in flight (issue 13): an idempotent
//! retry publishes under the id of a request whose publish timed out but landed after all. A
//! copy that finds another copy's claim unfinished must not send; the same copy (its
//! redelivery after a crash) still must. Against the real Postgres (`DATABASE_URL`), each test
//! in a schema of its own, dropped at the end (also when the body panics).

use notify_store::{Claim, DeliveryKey, Store};
use notify_types::Channel::{self, Email, Webhook};
use std::future::Future;
use uuid::Uuid;

use notify_testkit::db::database_url;

fn key(id: Uuid, channel: Channel) -> DeliveryKey {
    DeliveryKey::new(id, channel)
}

/// A migrated store in a fresh schema; `body` gets two handles on it (two workers: each has
/// its own group-commit batcher), then the schema is dropped and any panic re-raised.
async fn with_two_workers<F, Fut>(body: F)
where
    F: FnOnce(Store, Store) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let id = Uuid::now_v7().simple().to_string();
    let schema = format!("t_copies_{}", &id[24..]);
    let a = Store::connect_lazy(&database_url(), &schema, 4).unwrap();
    a.migrate().await.expect("migrate");
    let b = Store::connect_lazy(&database_url(), &schema, 4).unwrap();
    let result = tokio::spawn(body(a.clone(), b.clone())).await;
    a.drop_schema().await.expect("drop schema");
    a.close().await;
    b.close().await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test]
async fn another_copys_unfinished_claim_is_left_alone_and_the_same_copys_counts_a_crash() {
    with_two_workers(|s, _| async move {
        let id = Uuid::now_v7();
        let (first, retry) = (Some("req-1 2026-12-03T10:00:00.000000001Z"), Some("req-2 2026-12-03T10:00:01Z"));
        assert_eq!(s.claim_copy(key(id, Webhook), None, 1, first).await.unwrap(), Claim::Proceed);
        // The retry's copy while the first is being delivered: do not send.
        assert_eq!(s.claim_copy(key(id, Webhook), None, 1, retry).await.unwrap(), Claim::AlreadyDelivered);
        let row = &s.delivery_status(id).await.unwrap()[0];
        assert_eq!((row.status.as_str(), row.attempts), ("delivering", 1), "left as the first copy made it");
        // The first copy again (redelivered after its worker died): a crash, send.
        assert_eq!(s.claim_copy(key(id, Webhook), None, 1, first).await.unwrap(), Claim::Unfinished { crashes: 1 });
        // A claim that names no copy behaves as before the copies were told apart.
        assert_eq!(s.claim(key(id, Webhook), None, 1).await.unwrap(), Claim::Unfinished { crashes: 2 });
        assert_eq!(s.claim_copy(key(id, Webhook), None, 1, retry).await.unwrap(), Claim::Unfinished { crashes: 3 });
        s.mark_delivered(key(id, Webhook)).await.unwrap();
        assert_eq!(s.claim_copy(key(id, Webhook), None, 1, first).await.unwrap(), Claim::AlreadyDelivered);

        // A copy that finds another one's attempt settled (here: to be retried) may go ahead.
        let id = Uuid::now_v7();
        assert_eq!(s.claim_copy(key(id, Email), None, 1, first).await.unwrap(), Claim::Proceed);
        s.mark_retrying(key(id, Email), None, "451 try later").await.unwrap();
        assert_eq!(s.claim_copy(key(id, Email), None, 1, retry).await.unwrap(), Claim::Proceed);
    })
    .await;
}

#[tokio::test]
async fn two_copies_claimed_at_once_by_two_workers_send_once() {
    // Each round: two copies of 64 notifications claimed at the same moment through two
    // stores (two workers' batchers, so separate statements racing on the same rows). Exactly
    // one copy of each may send. Before copies were told apart, the second claim found the
    // first unfinished, counted a crash and sent again.
    with_two_workers(|a, b| async move {
        for round in 0..5 {
            let ids: Vec<Uuid> = (0..64).map(|_| Uuid::now_v7()).collect();
            let claims = |s: Store, copy: String| {
                // All spawned before any runs: the store batches what arrives together.
                let handles: Vec<_> = ids
                    .iter()
                    .map(|&id| {
                        let (s, copy) = (s.clone(), copy.clone());
                        tokio::spawn(async move { s.claim_copy(key(id, Webhook), None, 1, Some(&copy)).await })
                    })
                    .collect();
                async move {
                    let mut out = Vec::new();
                    for h in handles {
                        out.push(h.await.unwrap());
                    }
                    out
                }
            };
            let (x, y) = tokio::join!(claims(a.clone(), format!("x{round}")), claims(b.clone(), format!("y{round}")));
            for (i, (x, y)) in x.into_iter().zip(y).enumerate() {
                let pair = (x.unwrap(), y.unwrap());
                let sends = [pair.0, pair.1].iter().filter(|c| **c != Claim::AlreadyDelivered).count();
                assert_eq!(sends, 1, "round {round}, notification {i}: {pair:?}");
            }
        }
    })
    .await;
}
