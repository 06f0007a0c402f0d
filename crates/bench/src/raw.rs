//! The broker on its own, with lapin: confirmed persistent publishes (several channels,
//! pipelined confirms), consume + manual ack, and the publish → consume round trip. The same
//! publishing code pre-fills the channel queues for the drain phases.

use crate::stats::{rate, Latencies};
use futures_util::{stream::FuturesUnordered, StreamExt};
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions},
    types::{FieldTable, ShortString},
    BasicProperties, Confirmation, Connection,
};
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

/// How long outstanding confirms may take after the last publish before the phase fails.
const CONFIRM_TAIL: Duration = Duration::from_secs(30);

/// Where to publish: through `exchange` with `routing_key`, on `channels` confirm-mode channels
/// of `conn`.
pub struct Target<'a> {
    pub conn: &'a Connection,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub channels: usize,
}

/// Builds message `i`: body and properties.
pub type MakeMessage = Arc<dyn Fn(u64) -> (Vec<u8>, BasicProperties) + Send + Sync>;

#[derive(Debug, Clone, Copy, Default)]
pub struct Published {
    pub confirmed: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

impl Published {
    pub fn rate(&self) -> f64 {
        rate(self.confirmed, self.elapsed)
    }
}

/// Publishes to `to` (mandatory, persistent as `make` says), each channel keeping up to
/// `window` confirms outstanding, until `total` messages or `duration`, whichever comes first.
/// Counts broker acks with nothing returned; `elapsed` runs until the last confirm arrived.
pub async fn publish(
    to: &Target<'_>,
    make: MakeMessage,
    window: usize,
    total: u64,
    duration: Duration,
) -> anyhow::Result<Published> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..to.channels {
        let ch = to.conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let (exchange, key, make, next) =
            (to.exchange.to_string(), to.routing_key.to_string(), make.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut inflight = FuturesUnordered::new();
            let (mut confirmed, mut failed) = (0u64, 0u64);
            let mut count = |c: Result<Confirmation, lapin::Error>| match c {
                Ok(Confirmation::Ack(None)) => confirmed += 1,
                _ => failed += 1,
            };
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                if inflight.len() >= window {
                    if let Some(c) = inflight.next().await {
                        count(c);
                    }
                }
                let (body, props) = make(i);
                let confirm = ch
                    .basic_publish(
                        ShortString::from(exchange.as_str()),
                        ShortString::from(key.as_str()),
                        BasicPublishOptions { mandatory: true, ..Default::default() },
                        &body,
                        props,
                    )
                    .await?;
                inflight.push(confirm);
            }
            let tail = tokio::time::timeout(CONFIRM_TAIL, async {
                while let Some(c) = inflight.next().await {
                    count(c);
                }
            })
            .await;
            anyhow::ensure!(tail.is_ok(), "confirms still outstanding {CONFIRM_TAIL:?} after the last publish");
            let _ = ch.close(200, "bench done".into()).await;
            anyhow::Ok((confirmed, failed))
        }));
    }
    let mut out = Published::default();
    for t in tasks {
        let (c, f) = t.await??;
        out.confirmed += c;
        out.failed += f;
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Consumed {
    pub acked: u64,
    pub elapsed: Duration,
}

impl Consumed {
    pub fn rate(&self) -> f64 {
        rate(self.acked, self.elapsed)
    }
}

/// One consumer with `prefetch`, acking every message on its own (as the worker does), until
/// `n` messages or `timeout`.
pub async fn consume(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    n: u64,
    timeout: Duration,
) -> anyhow::Result<Consumed> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(queue.into(), "notify-bench-raw".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut acked = 0;
    let mut last = started;
    while acked < n {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                delivery.ack(BasicAckOptions::default()).await?;
                acked += 1;
                last = Instant::now();
            }
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => anyhow::bail!("the raw consumer ended after {acked} messages"),
            Err(_) => break,
        }
    }
    let _ = ch.close(200, "bench done".into()).await;
    Ok(Consumed { acked, elapsed: last - started })
}

/// Publish → consume latency at `rate` messages/s for `duration` (open loop: each message is
/// published at its scheduled time, whatever happened to the previous ones). The publisher uses
/// the target's channels round-robin; the consumer on `queue` has `prefetch` and acks each
/// message. Samples of the first 10% of the run are dropped (warm-up).
pub async fn round_trip(
    to: &Target<'_>,
    queue: &str,
    (body, props): (Vec<u8>, BasicProperties),
    rate_per_s: f64,
    duration: Duration,
    prefetch: u16,
) -> anyhow::Result<(Latencies, u64)> {
    let conn = to.conn;
    let base = Instant::now();
    let warm_ns = (duration.as_nanos() / 10) as u64;
    let sent = Arc::new(AtomicU64::new(0));
    let publishing_done = Arc::new(tokio::sync::Notify::new());

    let cch = conn.create_channel().await?;
    cch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = cch
        .basic_consume(queue.into(), "notify-bench-rtt".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let (sent_c, done_c) = (sent.clone(), publishing_done.clone());
    let consuming = tokio::spawn(async move {
        let mut lat = Latencies::default();
        let mut received = 0u64;
        let mut finished = false;
        let deadline = tokio::time::Instant::now() + duration + Duration::from_secs(30);
        let done = done_c.notified();
        tokio::pin!(done);
        loop {
            if finished && received >= sent_c.load(Ordering::Acquire) {
                break;
            }
            tokio::select! {
                _ = &mut done, if !finished => finished = true,
                d = tokio::time::timeout_at(deadline, consumer.next()) => match d {
                    Ok(Some(Ok(delivery))) => {
                        let now = base.elapsed().as_nanos() as u64;
                        let sent_at = delivery.properties.message_id().as_ref().and_then(|m| m.as_str().parse::<u64>().ok());
                        if let Some(sent_at) = sent_at.filter(|s| *s >= warm_ns) {
                            lat.push_micros(now.saturating_sub(sent_at) / 1000);
                        }
                        delivery.ack(BasicAckOptions::default()).await?;
                        received += 1;
                    }
                    Ok(Some(Err(e))) => return Err(anyhow::Error::from(e)),
                    Ok(None) | Err(_) => break,
                },
            }
        }
        anyhow::Ok((lat, received))
    });

    let mut chans = Vec::new();
    for _ in 0..to.channels {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        chans.push(ch);
    }
    let mut inflight = FuturesUnordered::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n = 0u64;
    let mut failed = 0u64;
    let (exchange, key) = (ShortString::from(to.exchange), ShortString::from(to.routing_key));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let elapsed = base.elapsed();
                if elapsed >= duration {
                    break;
                }
                let due = (elapsed.as_secs_f64() * rate_per_s) as u64;
                while n < due {
                    let at = (n as f64 / rate_per_s * 1e9) as u64;
                    let p = props.clone().with_message_id(at.to_string().into());
                    let ch = &chans[(n as usize) % chans.len()];
                    let confirm = ch
                        .basic_publish(exchange.clone(), key.clone(), BasicPublishOptions { mandatory: true, ..Default::default() }, &body, p)
                        .await?;
                    inflight.push(confirm);
                    n += 1;
                    sent.store(n, Ordering::Release);
                }
            }
            Some(c) = inflight.next(), if !inflight.is_empty() => {
                if !matches!(c, Ok(Confirmation::Ack(None))) {
                    failed += 1;
                }
            }
        }
    }
    let _ = tokio::time::timeout(CONFIRM_TAIL, async {
        while let Some(c) = inflight.next().await {
            if !matches!(c, Ok(Confirmation::Ack(None))) {
                failed += 1;
            }
        }
    })
    .await;
    publishing_done.notify_one();
    let (lat, received) = consuming.await??;
    for ch in chans {
        let _ = ch.close(200, "bench done".into()).await;
    }
    let _ = cch.close(200, "bench done".into()).await;
    anyhow::ensure!(failed == 0, "{failed} round-trip publishes were not confirmed");
    Ok((lat, received))
}
