//! The bench's phases, run in order by [`run`]. Each phase prints a `»` line per figure as it
//! goes (so a long run shows progress) and records its figures in the [`Report`]; the tables
//! are printed only at the end, from the report, with the ratios ours/raw.
//!
//! Order matters: the raw broker's figures come first (they are the denominators), ingest
//! starts the API that the later phases keep using, and the end-to-end rates follow from the
//! ingest and webhook drain rates.
//!
//! To add a phase:
//! 1. a module here with `pub async fn run(ctx: &Ctx, rep: &mut Report, ...) -> anyhow::Result<_>`
//!    taking what it needs from the earlier phases ([`ingest::RunningApi`] for the API, the
//!    workers' environment from [`drain::run`]); workers via [`support::start_worker`], one
//!    run per worker so its CPU and RSS are its own;
//! 2. its result type in that module, a field for it in [`Report`] and its rows in
//!    [`crate::report::print`]; CPU per message with [`Report::cpu`], and every check that
//!    failed pushed to `rep.problems` (a run with problems exits non-zero);
//! 3. a call in [`run`] below, and a `mod` line here. Whatever the phase declares must be
//!    deleted by [`crate::setup::cleanup`] (anything under the run's prefix and schema is).

pub mod dead_letters;
pub mod drain;
pub mod e2e;
pub mod ingest;
pub mod raw_broker;
pub mod support;

use crate::{report::Report, setup::Ctx};
use std::time::Duration;

pub async fn run(ctx: &Ctx, rep: &mut Report) -> anyhow::Result<()> {
    ctx.topology.declare(&ctx.conn).await?;
    support::declare_bench_queue(ctx, &ctx.raw_queue()).await?;
    support::declare_bench_queue(ctx, &ctx.rtt_queue()).await?;
    println!(
        "notify-bench: prefix {} schema {} queue type {} — phases of {:?}, drains of {} messages",
        ctx.topology.prefix,
        ctx.store.schema(),
        ctx.topology.queue_type,
        ctx.args.duration,
        ctx.args.drain_count
    );
    raw_broker::run(ctx, rep).await?;
    let api = ingest::run(ctx, rep).await?;
    let worker_env = drain::run(ctx, rep).await?;
    e2e::run(ctx, rep, &api, &worker_env).await?;

    let (peak, status) = api.proc.stop(Duration::from_secs(30)).await?;
    rep.api_peak_kb = peak;
    println!("» API peak RSS {:.1} MiB (exit {status})", peak as f64 / 1024.0);
    rep.dead_letters = Some(dead_letters::run(ctx, ctx.args.dead_letters).await?);
    Ok(())
}
