//! Phase 3, drain: each channel queue pre-filled with `--drain-count` messages (what the API
//! would have published), then drained by a worker for that channel alone, one channel per
//! worker run, into the loopback SMTP sink, the webhook receiver or the inbox table.

use crate::{
    messages::channel_envelope,
    phases::{
        raw_broker::{RAW_CHANNELS, RAW_WINDOW},
        support::{start_worker, wait_count},
    },
    procs::{self, Proc},
    raw,
    report::Report,
    setup::Ctx,
    stats,
};
use notify_store::Store;
use notify_testkit::{rabbit, smtp::SmtpServer, webhook::WebhookReceiver};
use notify_types::{broker, Channel, Topology};
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

pub struct Drain {
    pub channel: Channel,
    pub n: u64,
    pub delivered: u64,
    pub elapsed: Duration,
    pub received: usize,
    pub left_in_queue: Option<u32>,
}

impl Drain {
    pub fn rate(&self) -> f64 {
        stats::rate(self.delivered, self.elapsed)
    }
}

/// Drains every channel; returns the workers' environment (the settings plus the SMTP sink's
/// URL), which the end-to-end phase's worker is started with too.
pub async fn run(ctx: &Ctx, rep: &mut Report) -> anyhow::Result<HashMap<String, String>> {
    let smtp = SmtpServer::start().await;
    let hooks = WebhookReceiver::start().await;
    let mut wenv = ctx.settings.clone();
    wenv.insert("SMTP_URL".into(), smtp.url());
    for channel in [Channel::InApp, Channel::Webhook, Channel::Email] {
        let ((dr, worker), cpu) = drain(ctx, channel, &wenv, &smtp, &hooks).await?;
        let (peak, status) = worker.stop(Duration::from_secs(30)).await?;
        rep.worker_peak_kb = rep.worker_peak_kb.max(peak);
        println!(
            "» drain {channel}: {:.0} deliveries/s ({} of {} in {:.2?}; {} received by the sink, {} left in the queue; worker peak RSS {:.1} MiB, exit {status})",
            dr.rate(),
            dr.delivered,
            dr.n,
            dr.elapsed,
            dr.received,
            dr.left_in_queue.map_or("?".into(), |q| q.to_string()),
            peak as f64 / 1024.0
        );
        rep.cpu(format!("drain {channel}"), cpu);
        if dr.delivered != dr.n || dr.received as u64 != dr.n || dr.left_in_queue != Some(0) {
            rep.problems.push(format!(
                "drain {channel}: {} of {} recorded delivered, {} received, {:?} left in the queue",
                dr.delivered, dr.n, dr.received, dr.left_in_queue
            ));
        }
        rep.drains.push(dr);
    }
    Ok(wenv)
}

/// Delivered rows of `channel`: count, and the time from the first claim to the last
/// `delivered_at` (Postgres' clock on both ends, so polling does not blur it).
async fn delivered(store: &Store, channel: Channel) -> anyhow::Result<(u64, Duration)> {
    let (n, secs): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'delivered'),
                EXTRACT(EPOCH FROM (max(delivered_at) - min(created_at)))::float8
           FROM deliveries WHERE channel = $1",
    )
    .bind(channel.as_str())
    .fetch_one(store.pool())
    .await?;
    Ok((n as u64, Duration::from_secs_f64(secs.unwrap_or(0.0).max(0.0))))
}

async fn drain(
    ctx: &Ctx,
    channel: Channel,
    env: &HashMap<String, String>,
    smtp: &SmtpServer,
    hooks: &WebhookReceiver,
) -> anyhow::Result<((Drain, Proc), procs::CpuUse)> {
    let n = ctx.args.drain_count;
    let queue = ctx.topology.queue(channel);
    let url = hooks.url("/hook");
    let make: raw::MakeMessage = Arc::new(move |i| {
        let env = channel_envelope(channel, i, &url);
        (env.to_bytes(), broker::envelope_properties(&env, 1))
    });
    let key = Topology::direct_key(channel);
    let exchange = ctx.topology.exchange();
    let target = raw::Target { conn: &ctx.conn, exchange: &exchange, routing_key: &key, channels: RAW_CHANNELS };
    let filled = raw::publish(&target, make, RAW_WINDOW, n, Duration::from_secs(120)).await?;
    anyhow::ensure!(filled.confirmed == n, "pre-filling {queue}: {} of {n} confirmed", filled.confirmed);
    let queued = wait_count(&ctx.conn, &queue, n, Duration::from_secs(15)).await;
    anyhow::ensure!(queued.map(u64::from) == Some(n), "pre-filling {queue}: the queue holds {queued:?}, not {n}");

    let mut worker = start_worker(ctx, &format!("worker-{channel}"), channel, env).await?;
    let meter = procs::Meter::start(&[("worker", worker.pid().unwrap_or(0))]);
    // Generous: a slow channel still ends, with what it managed in the report.
    let limit = Duration::from_secs(60).max(Duration::from_millis(n * 20));
    let deadline = Instant::now() + limit;
    let mut seen = (0, Duration::ZERO);
    while Instant::now() < deadline {
        worker.check_alive()?;
        worker.sample_peak();
        seen = delivered(&ctx.store, channel).await?;
        if seen.0 >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if seen.0 < n {
        eprintln!("drain {channel}: only {} of {n} delivered after {limit:?}", seen.0);
    }
    let cpu = meter.stop(seen.0);
    worker.sample_peak();
    let left_in_queue = rabbit::message_count(&ctx.conn, &queue).await;
    let received = match channel {
        Channel::Email => smtp.mails().len(),
        Channel::Webhook => hooks.delivered().len(),
        Channel::InApp => {
            let items: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox_items").fetch_one(ctx.store.pool()).await?;
            items as usize
        }
    };
    Ok(((Drain { channel, n, delivered: seen.0, elapsed: seen.1, received, left_in_queue }, worker), cpu))
}
