//! Retention: every `RETENTION_INTERVAL` the worker deletes rows past their age (see
//! [`notify_store::Retention`]) in batches of `RETENTION_BATCH`, until none is left. Workers
//! take turns through a PostgreSQL advisory lock: while one purges, the others skip.

use notify_store::{Purged, Retention, Store};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Batches in one round at most, so one round stays short; the next round goes on.
const MAX_BATCHES_PER_ROUND: usize = 1000;

pub async fn run(store: Store, retention: Retention, every: Duration, shutdown: CancellationToken) {
    loop {
        let mut purged = Purged::default();
        for _ in 0..MAX_BATCHES_PER_ROUND {
            if shutdown.is_cancelled() {
                return;
            }
            match store.purge_batch(&retention).await {
                Ok(Some(batch)) => {
                    purged.deliveries += batch.deliveries;
                    purged.inbox_items += batch.inbox_items;
                    purged.idempotency_keys += batch.idempotency_keys;
                    purged.dead_letters += batch.dead_letters;
                    let full = retention.batch as u64;
                    let more = [batch.deliveries, batch.inbox_items, batch.idempotency_keys, batch.dead_letters]
                        .iter()
                        .any(|n| *n >= full);
                    if !more {
                        break;
                    }
                }
                // Another worker holds the lock: it purges this round.
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "retention purge failed; trying again next round");
                    break;
                }
            }
        }
        if purged.total() > 0 {
            tracing::info!(
                deliveries = purged.deliveries,
                inbox_items = purged.inbox_items,
                idempotency_keys = purged.idempotency_keys,
                dead_letters = purged.dead_letters,
                "retention: old rows purged"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
