//! Phase 1, the raw broker on its own: confirmed publishes (many in flight, then as many as 32
//! HTTP connections can have), and consume + ack of a backlog as large as the drains'. These
//! are the denominators of the report's ratios.

use crate::{
    messages::email_envelope,
    phases::support::{purge, wait_count},
    procs, raw,
    report::Report,
    setup::Ctx,
};
use notify_types::broker;
use std::{sync::Arc, time::Duration};

/// Confirm-mode channels and outstanding confirms per channel of the raw publisher (the API
/// publishes on 4 channels by default, with every request's confirm outstanding at once).
pub const RAW_CHANNELS: usize = 4;
pub const RAW_WINDOW: usize = 64;
/// Outstanding confirms per channel of the second raw run: 32 in all, the most 32 HTTP
/// connections can have.
pub const RAW_WINDOW_32: usize = 8;
/// At most this many raw publishes per run, so consuming them back stays short.
const RAW_MAX: u64 = 150_000;

pub async fn run(ctx: &Ctx, rep: &mut Report) -> anyhow::Result<()> {
    let d = ctx.args.duration;
    let exchange = ctx.topology.exchange();
    let raw_q = ctx.raw_queue();
    let raw_target = raw::Target { conn: &ctx.conn, exchange: &exchange, routing_key: &raw_q, channels: RAW_CHANNELS };
    let env = email_envelope(0);
    let (raw_body, raw_props) = (env.to_bytes(), broker::envelope_properties(&env, 1));
    let make: raw::MakeMessage = Arc::new(move |_| (raw_body.clone(), raw_props.clone()));
    let meter = procs::Meter::start(&[]);
    let published = raw::publish(&raw_target, make.clone(), RAW_WINDOW, RAW_MAX, d).await?;
    let cpu = meter.stop(published.confirmed);
    println!(
        "» raw publish: {:.0} msg/s confirmed ({} in {:.2?}, {} failed)",
        published.rate(),
        published.confirmed,
        published.elapsed,
        published.failed
    );
    rep.cpu("raw publish", cpu);
    purge(&ctx.conn, &raw_q).await?;
    rep.raw_publish = Some(published);
    // The same with only 32 confirms outstanding: what the broker does at the concurrency of
    // 32 HTTP connections.
    let meter = procs::Meter::start(&[]);
    let published = raw::publish(&raw_target, make.clone(), RAW_WINDOW_32, RAW_MAX, d).await?;
    println!(
        "» raw publish, {} in flight: {:.0} msg/s confirmed ({} in {:.2?}, {} failed)",
        RAW_CHANNELS * RAW_WINDOW_32,
        published.rate(),
        published.confirmed,
        published.elapsed,
        published.failed
    );
    rep.cpu(format!("raw publish, {} in flight", RAW_CHANNELS * RAW_WINDOW_32), meter.stop(published.confirmed));
    purge(&ctx.conn, &raw_q).await?;
    rep.raw_publish_32 = Some(published);
    let n = ctx.args.drain_count;
    let filled = raw::publish(&raw_target, make, RAW_WINDOW, n, Duration::from_secs(120)).await?;
    let in_queue = wait_count(&ctx.conn, &raw_q, filled.confirmed, Duration::from_secs(15)).await.unwrap_or(0);
    anyhow::ensure!(u64::from(in_queue) == n, "pre-filling {raw_q}: the queue holds {in_queue}, not {n}");
    let meter = procs::Meter::start(&[]);
    let consumed = raw::consume(&ctx.conn, &raw_q, ctx.prefetch, n, Duration::from_secs(120)).await?;
    println!("» raw consume + ack: {:.0} msg/s ({} in {:.2?})", consumed.rate(), consumed.acked, consumed.elapsed);
    rep.cpu("raw consume + ack", meter.stop(consumed.acked));
    anyhow::ensure!(consumed.acked == n, "the raw consumer took {} of {n} messages", consumed.acked);
    rep.raw_consume = Some(consumed);
    Ok(())
}
