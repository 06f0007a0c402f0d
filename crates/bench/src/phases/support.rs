//! Helpers several phases share: the bench's own queues, waiting for a queue to hold what was
//! published, and starting the API and a worker only once they are really serving.

use crate::{load, procs::Proc, setup::Ctx};
use lapin::{
    options::{QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions},
    types::FieldTable,
    Connection,
};
use notify_testkit::rabbit;
use notify_types::Channel;
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

pub async fn declare_bench_queue(ctx: &Ctx, queue: &str) -> anyhow::Result<()> {
    let ch = ctx.conn.create_channel().await?;
    // Same type and arguments as a channel queue.
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions { durable: true, ..Default::default() },
        ctx.topology.queue_args(Channel::Email),
    )
    .await?;
    ch.queue_bind(
        queue.into(),
        ctx.topology.exchange().as_str().into(),
        queue.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

pub async fn purge(conn: &Connection, queue: &str) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    ch.queue_purge(queue.into(), QueuePurgeOptions::default()).await?;
    let _ = ch.close(200, "purged".into()).await;
    Ok(())
}

/// Polls the ready count of `queue` until it is `n` (or `timeout`); the last count seen.
pub async fn wait_count(conn: &Connection, queue: &str, n: u64, timeout: Duration) -> Option<u32> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    for _ in 0..10_000 {
        last = rabbit::message_count(conn, queue).await;
        if last.map(u64::from) == Some(n) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

pub async fn wait_ready(api: &mut Proc, target: &load::Api) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        api.check_alive()?;
        if let Ok(s) = load::get_status(target.addr, "/ready").await {
            if s.is_success() {
                return Ok(());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "the API was not ready within 30 s (log: {})", api.log.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a worker for `channel` only and waits until its consumer is on the queue.
pub async fn start_worker(
    ctx: &Ctx,
    name: &str,
    channel: Channel,
    env: &HashMap<String, String>,
) -> anyhow::Result<Proc> {
    let mut env = env.clone();
    env.insert("WORKER_CHANNELS".into(), channel.as_str().into());
    // Several workers run at once: each gets a free port for its probes and metrics.
    env.insert("WORKER_HTTP_HOST".into(), "127.0.0.1".into());
    env.insert("WORKER_HTTP_PORT".into(), "0".into());
    let mut worker = Proc::spawn(name, &ctx.bins()?.worker, &env, &ctx.logdir)?;
    let queue = ctx.topology.queue(channel);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        worker.check_alive()?;
        let ch = ctx.conn.create_channel().await?;
        let q = ch
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let _ = ch.close(200, "counted".into()).await;
        if q.consumer_count() > 0 {
            return Ok(worker);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name} did not consume within 30 s (log: {})",
            worker.log.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
