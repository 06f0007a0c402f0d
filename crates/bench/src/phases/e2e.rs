//! Phase 4, round trip of the raw broker and end to end through notify, at the same rate:
//! half the ingest rate, but at most a share of what the webhook drain sustained (beyond that
//! the queue grows for as long as the phase lasts and the latency measures only that).
//! End to end is a POST to the API until the webhook, timestamped on arrival, reaches this
//! process; both ends on one clock ([`Ctx::base`]).

use crate::{
    load,
    messages::email_envelope,
    phases::{ingest::RunningApi, raw_broker::RAW_CHANNELS, support::start_worker},
    procs, raw,
    report::{opt, problems_of, Report},
    setup::Ctx,
    stats::Latencies,
};
use hyper::body::Bytes;
use notify_types::{broker, Channel};
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

/// Connections of the end-to-end phase.
const E2E_CONNS: usize = 32;
/// The end-to-end phase runs at half the ingest rate (where the issue judges it), first capped
/// at each of these shares of the webhook drain rate in turn, up to the first rate that is not
/// capped. API, worker, broker and Postgres share the machine's cores: on 2 cores the lowest
/// rate leaves about a third of the machine idle, so its latency is the pipeline's own; at the
/// higher ones the machine is ~95% busy and the latency is mostly waiting for a core.
const E2E_DRAIN_SHARES: [f64; 3] = [0.1, 0.25, 1.0];

pub struct E2e {
    pub rate: f64,
    /// The share of the webhook drain rate that capped the rate, if one did.
    pub capped: Option<f64>,
    pub result: load::LoadResult,
    pub received: usize,
    pub latency: Latencies,
    pub cpu: procs::CpuUse,
}

/// Needs the ingest and drain figures in `rep` (its rates follow from them), the API still
/// running and the workers' environment.
pub async fn run(ctx: &Ctx, rep: &mut Report, api: &RunningApi, wenv: &HashMap<String, String>) -> anyhow::Result<()> {
    let d = ctx.args.duration;
    let exchange = ctx.topology.exchange();
    let rtt_q = ctx.rtt_queue();
    let ingest = rep.ingest.first().map_or(0.0, |i| i.result.rate());
    let webhook_drain = rep.drains.iter().find(|d| d.channel == Channel::Webhook).map_or(0.0, |d| d.rate());
    let shares = match ctx.args.e2e_share {
        Some(share) => vec![share],
        None => E2E_DRAIN_SHARES.to_vec(),
    };
    for share in shares {
        let mut rate = ingest / 2.0;
        let capped = rate > webhook_drain * share;
        if capped {
            rate = webhook_drain * share;
        }
        let rate = rate.max(10.0);
        let env = email_envelope(0);
        let meter = procs::Meter::start(&[]);
        let rtt_target =
            raw::Target { conn: &ctx.conn, exchange: &exchange, routing_key: &rtt_q, channels: RAW_CHANNELS };
        let message = (env.to_bytes(), broker::envelope_properties(&env, 1));
        let (rtt, rtt_n) = raw::round_trip(&rtt_target, &rtt_q, message, rate, d, ctx.prefetch).await?;
        let mut rtt_l = rtt.clone();
        println!(
            "» raw round trip at {rate:.0}/s: p50 {} p99 {} ms ({} samples)",
            opt(rtt_l.percentile_ms(50.0), 2),
            opt(rtt_l.percentile_ms(99.0), 2),
            rtt.len()
        );
        rep.cpu(format!("raw round trip at {rate:.0}/s"), meter.stop(rtt_n));

        let e2e = end_to_end(ctx, &api.target, wenv, rate, capped.then_some(share), api.pid).await?;
        rep.worker_peak_kb = rep.worker_peak_kb.max(e2e.1);
        let mut e2e = e2e.0;
        println!(
            "» end to end at {:.0}/s: p50 {} p99 {} ms ({} × 202, {} webhooks received{})",
            e2e.rate,
            opt(e2e.latency.percentile_ms(50.0), 2),
            opt(e2e.latency.percentile_ms(99.0), 2),
            e2e.result.accepted_total,
            e2e.received,
            problems_of(&e2e.result)
        );
        if e2e.received as u64 != e2e.result.accepted_total || e2e.result.other_status + e2e.result.errors > 0 {
            rep.problems.push(format!(
                "end to end: {} × 202, {} received{}",
                e2e.result.accepted_total,
                e2e.received,
                problems_of(&e2e.result)
            ));
        }
        rep.cpu(format!("end to end at {rate:.0}/s"), e2e.cpu.clone());
        rep.e2e.push((rtt, e2e));
        if !capped {
            break;
        }
    }

    Ok(())
}

async fn end_to_end(
    ctx: &Ctx,
    api: &load::Api,
    env: &HashMap<String, String>,
    rate: f64,
    capped: Option<f64>,
    api_pid: u32,
) -> anyhow::Result<(E2e, u64)> {
    let d = ctx.args.duration;
    let stamps = load::StampReceiver::start(ctx.base).await?;
    let mut worker = start_worker(ctx, "worker-e2e", Channel::Webhook, env).await?;
    let addr = stamps.addr;
    let make = Arc::new(move |i: u64, due_ns: u64| {
        Bytes::from(format!(r#"{{"url":"http://{addr}/e2e/{due_ns}","payload":{{"n":{i}}}}}"#))
    });
    let from_ns = (ctx.base.elapsed() + d / 10).as_nanos() as u64;
    let meter = procs::Meter::start(&[("api", api_pid), ("worker", worker.pid().unwrap_or(0))]);
    let result = load::open_loop(api, "/api/v1/notifications/webhook", make, E2E_CONNS, rate, d, ctx.base).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (stamps.count() as u64) < result.accepted_total && Instant::now() < deadline {
        worker.check_alive()?;
        worker.sample_peak();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = stamps.count();
    let cpu = meter.stop(received as u64);
    let latency = stamps.latencies_from(from_ns);
    let (peak, _) = worker.stop(Duration::from_secs(30)).await?;
    Ok((E2e { rate, capped, result, received, latency, cpu }, peak))
}
