//! Group commit for the worker's hot path. Every delivery writes Postgres twice (the send
//! guard's claim, then the delivered record or the inbox item); one statement and one commit
//! each cost Postgres ~220 µs of CPU and an fsync. Here concurrent deliveries' writes of the same
//! kind share one statement: a background task takes whatever is waiting (up to
//! [`MAX_BATCH`]), runs one `INSERT .. SELECT FROM unnest(..)` per kind, and answers each caller
//! with its own row's result. Nobody waits for a batch to fill: while [`PARALLEL`] batches are
//! in Postgres, the next one gathers whatever arrives, so batches are as large as the load makes
//! them and a lone delivery goes at once.
//!
//! Semantics are those of one statement per call: a row appears at most once per statement (a
//! second write of the same key waits for the next batch, in arrival order), rows are written
//! in key order (two batches lock shared rows in the same order, so they cannot deadlock), and
//! a failed statement fails every caller in it with the same error.

use crate::columns::ChannelColumn;
use crate::deliveries::{Claim, DeliveryKey};
use crate::errors::{db_err, StoreError};
use crate::inbox::NewInboxItem;
use chrono::{DateTime, Utc};
use notify_types::Channel;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Semaphore};
use uuid::Uuid;

/// Most writes in one statement.
pub const MAX_BATCH: usize = 128;

/// Batches in Postgres at once.
pub const PARALLEL: usize = 2;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A claim waiting in a batch: key, event, attempt, copy and where its answer goes.
type ClaimRow = (DeliveryKey, Option<String>, i32, Option<String>, Reply<Claim>);

pub(crate) enum Op {
    Claim { key: DeliveryKey, event: Option<String>, attempt: i32, copy: Option<String>, reply: Reply<Claim> },
    Delivered { key: DeliveryKey, reply: Reply<()> },
    Inbox { item: NewInboxItem, reply: Reply<bool> },
}

impl Op {
    /// Two ops with the same key must not share a statement.
    fn key(&self) -> (u8, DeliveryKey) {
        match self {
            Op::Claim { key, .. } => (0, *key),
            Op::Delivered { key, .. } => (1, *key),
            Op::Inbox { item, .. } => (2, DeliveryKey::new(item.notification_id, Channel::InApp)),
        }
    }
}

/// The handle: sends ops to the task, which lives as long as a handle does.
pub(crate) struct Batcher {
    tx: mpsc::UnboundedSender<Op>,
    stats: Arc<Stats>,
}

/// Counters of the group commit: statements run and the writes they carried.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    statements: AtomicU64,
    writes: AtomicU64,
}

/// A snapshot of [`crate::pool::Store::group_commit_stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupCommitStats {
    /// Statements (one commit each) that wrote claims, delivered records or inbox items.
    pub statements: u64,
    /// The writes they carried.
    pub writes: u64,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Batcher")
    }
}

impl Batcher {
    /// Spawns the task on the current Tokio runtime.
    pub(crate) fn start(pool: PgPool) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        tokio::spawn(run(pool, rx, stats.clone()));
        Batcher { tx, stats }
    }

    pub(crate) fn stats(&self) -> GroupCommitStats {
        GroupCommitStats {
            statements: self.stats.statements.load(Ordering::Relaxed),
            writes: self.stats.writes.load(Ordering::Relaxed),
        }
    }

    /// Queues `op` (built around `reply`) and waits for its result.
    pub(crate) async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(op(reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

fn gone() -> StoreError {
    StoreError::WriterStopped
}

async fn run(pool: PgPool, mut rx: mpsc::UnboundedReceiver<Op>, stats: Arc<Stats>) {
    let slots = Arc::new(Semaphore::new(PARALLEL));
    // Ops that met their key already in the batch being formed: first in the next one.
    let mut carried: Vec<Op> = Vec::new();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let mut ops = std::mem::take(&mut carried);
        if ops.is_empty() {
            match rx.recv().await {
                Some(op) => ops.push(op),
                None => return,
            }
        }
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut seen = HashSet::with_capacity(ops.len());
        let mut batch = Batch::default();
        for op in ops {
            if seen.insert(op.key()) {
                batch.push(op);
            } else {
                carried.push(op);
            }
        }
        let pool = pool.clone();
        stats.count(&batch);
        tokio::spawn(async move {
            batch.execute(&pool).await;
            drop(permit);
        });
    }
}

impl Stats {
    fn count(&self, batch: &Batch) {
        let kinds = [batch.claims.len(), batch.delivered.len(), batch.inbox.len()];
        let statements = kinds.iter().filter(|n| **n > 0).count() as u64;
        self.statements.fetch_add(statements, Ordering::Relaxed);
        let writes = kinds.iter().sum::<usize>();
        self.writes.fetch_add(writes as u64, Ordering::Relaxed);
        metrics::histogram!("notify_store_group_commit_batch_size").record(writes as f64);
    }
}

#[derive(Default)]
struct Batch {
    claims: Vec<ClaimRow>,
    delivered: Vec<(DeliveryKey, Reply<()>)>,
    inbox: Vec<(NewInboxItem, Reply<bool>)>,
}

impl Batch {
    fn push(&mut self, op: Op) {
        match op {
            Op::Claim { key, event, attempt, copy, reply } => self.claims.push((key, event, attempt, copy, reply)),
            Op::Delivered { key, reply } => self.delivered.push((key, reply)),
            Op::Inbox { item, reply } => self.inbox.push((item, reply)),
        }
    }

    async fn execute(mut self, pool: &PgPool) {
        // Key order: see the module's note on deadlocks.
        self.claims.sort_by_key(|row| key_order(&row.0));
        self.delivered.sort_by_key(|row| key_order(&row.0));
        self.inbox.sort_by_key(|(item, _)| item.notification_id);
        tracing::trace!(
            claims = self.claims.len(),
            delivered = self.delivered.len(),
            inbox = self.inbox.len(),
            "group commit"
        );
        tokio::join!(claim(pool, self.claims), delivered(pool, self.delivered), inbox(pool, self.inbox));
    }
}

/// Answers every caller: its own result, or the statement's error.
fn answer<T, K: Eq + std::hash::Hash>(replies: Vec<(K, Reply<T>)>, result: Result<impl Fn(&K) -> T, StoreError>) {
    match result {
        Ok(of) => {
            for (key, reply) in replies {
                let _ = reply.send(Ok(of(&key)));
            }
        }
        Err(e) => {
            for (_, reply) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// The order rows are written in: the table's primary key order.
fn key_order(key: &DeliveryKey) -> (Uuid, &'static str) {
    (key.notification_id, key.channel.as_str())
}

/// The send guard for many rows, as [`crate::pool::Store::claim`] documents it for one.
async fn claim(pool: &PgPool, rows: Vec<ClaimRow>) {
    if rows.is_empty() {
        return;
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0.notification_id).collect();
    let channels: Vec<&str> = rows.iter().map(|r| r.0.channel.as_str()).collect();
    let events: Vec<Option<&str>> = rows.iter().map(|r| r.1.as_deref()).collect();
    let attempts: Vec<i32> = rows.iter().map(|r| r.2).collect();
    let copies: Vec<Option<&str>> = rows.iter().map(|r| r.3.as_deref()).collect();
    // In DO UPDATE, `deliveries.*` is the row as it was (its latest version: the WHERE is
    // checked after waiting for a concurrent claim of the same row): a claim that finds it
    // still `delivering` by the same copy (or an unnamed one) counts a crash. A `delivered`
    // row, or one `delivering` by another copy, is left alone and returns nothing.
    let result = sqlx::query_as::<_, (Uuid, ChannelColumn, i32)>(
        "INSERT INTO deliveries (notification_id, channel, status, attempts, event, claimed_by)
         SELECT id, channel, 'delivering', GREATEST(attempt, 0), event, copy
           FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[])
                AS t(id, channel, attempt, event, copy)
         ON CONFLICT (notification_id, channel) DO UPDATE
            SET status = 'delivering',
                attempts = GREATEST(deliveries.attempts, EXCLUDED.attempts),
                event = COALESCE(EXCLUDED.event, deliveries.event),
                crashes = deliveries.crashes + (deliveries.status = 'delivering')::int,
                claimed_by = EXCLUDED.claimed_by,
                updated_at = now()
          WHERE deliveries.status <> 'delivered'
            AND NOT (deliveries.status = 'delivering'
                     AND COALESCE(deliveries.claimed_by <> EXCLUDED.claimed_by, false))
         RETURNING notification_id, channel, crashes",
    )
    .bind(&ids)
    .bind(&channels)
    .bind(&attempts)
    .bind(&events)
    .bind(&copies)
    .fetch_all(pool)
    .await
    .map_err(db_err)
    .map(|found| {
        let crashes: HashMap<DeliveryKey, i32> =
            found.into_iter().map(|(id, ch, n)| (DeliveryKey::new(id, ch.0), n)).collect();
        move |key: &DeliveryKey| match crashes.get(key) {
            Some(0) => Claim::Proceed,
            Some(&crashes) => Claim::Unfinished { crashes },
            None => Claim::AlreadyDelivered,
        }
    });
    answer(rows.into_iter().map(|(key, _, _, _, reply)| (key, reply)).collect(), result);
}

/// [`crate::pool::Store::mark_delivered`] for many rows.
async fn delivered(pool: &PgPool, rows: Vec<(DeliveryKey, Reply<()>)>) {
    if rows.is_empty() {
        return;
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0.notification_id).collect();
    let channels: Vec<&str> = rows.iter().map(|r| r.0.channel.as_str()).collect();
    let result = sqlx::query(
        "INSERT INTO deliveries (notification_id, channel, status, attempts, delivered_at)
         SELECT id, channel, 'delivered', 1, now() FROM unnest($1::uuid[], $2::text[]) AS t(id, channel)
         ON CONFLICT (notification_id, channel) DO UPDATE
            SET status = 'delivered',
                attempts = GREATEST(deliveries.attempts, 1),
                last_error = NULL,
                delivered_at = COALESCE(deliveries.delivered_at, now()),
                updated_at = now()",
    )
    .bind(&ids)
    .bind(&channels)
    .execute(pool)
    .await
    .map_err(db_err)
    .map(|_| |_: &()| ());
    answer(rows.into_iter().map(|(_, reply)| ((), reply)).collect(), result);
}

/// [`crate::pool::Store::insert_inbox_item`] for many items: the items and their delivered records in
/// one statement, so a redelivery can never add a second item.
async fn inbox(pool: &PgPool, rows: Vec<(NewInboxItem, Reply<bool>)>) {
    if rows.is_empty() {
        return;
    }
    let n = rows.len();
    let mut item_ids = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let mut users = Vec::with_capacity(n);
    let mut titles = Vec::with_capacity(n);
    let mut bodies = Vec::with_capacity(n);
    let mut data = Vec::with_capacity(n);
    let mut events = Vec::with_capacity(n);
    let mut created: Vec<DateTime<Utc>> = Vec::with_capacity(n);
    for (item, _) in &rows {
        item_ids.push(Uuid::now_v7());
        ids.push(item.notification_id);
        users.push(item.user.as_str());
        titles.push(item.title.as_str());
        bodies.push(item.body.as_str());
        data.push(item.data.clone());
        events.push(item.event.as_deref());
        created.push(item.created_at);
    }
    // The main query reads `item`, so the inbox insert runs first; `delivered` (not read) runs
    // to completion after it, within the same statement.
    let result = sqlx::query_scalar::<_, Uuid>(
        "WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                                 $7::text[], $8::timestamptz[])
                       AS t(id, notification_id, user_id, title, body, data, event, created_at)
         ), item AS (
            INSERT INTO inbox_items (id, notification_id, user_id, title, body, data, event, created_at)
            SELECT id, notification_id, user_id, title, body, data, event, created_at FROM input
            ON CONFLICT (notification_id, user_id) DO NOTHING
            RETURNING notification_id
         ), delivered AS (
            INSERT INTO deliveries (notification_id, channel, status, attempts, event, delivered_at)
            SELECT notification_id, $9, 'delivered', 1, event, now() FROM input
            ON CONFLICT (notification_id, channel) DO UPDATE
               SET status = 'delivered',
                   attempts = GREATEST(deliveries.attempts, 1),
                   last_error = NULL,
                   event = COALESCE(deliveries.event, EXCLUDED.event),
                   delivered_at = COALESCE(deliveries.delivered_at, now()),
                   updated_at = now()
         )
         SELECT notification_id FROM item",
    )
    .bind(&item_ids)
    .bind(&ids)
    .bind(&users)
    .bind(&titles)
    .bind(&bodies)
    .bind(&data)
    .bind(&events)
    .bind(&created)
    .bind(ChannelColumn(Channel::InApp))
    .fetch_all(pool)
    .await
    .map_err(db_err)
    .map(|inserted| {
        let inserted: HashSet<Uuid> = inserted.into_iter().collect();
        move |id: &Uuid| inserted.contains(id)
    });
    answer(rows.into_iter().map(|(item, reply)| (item.notification_id, reply)).collect(), result);
}
