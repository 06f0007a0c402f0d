//! notify-bench: the raw broker and notify side by side, in one run on one machine, with the
//! ratios ours/raw (so a figure means something on a noisy machine).
//!
//! ```text
//! cargo run -p notify-bench --release [-- --quick] [--queue-type quorum|classic] [--duration SECS]
//! ```
//!
//! It builds `notify-api` and `notify-worker` in release first (`cargo build --release -p
//! notify-api -p notify-worker`, skip with `--no-build`) and runs them as separate processes
//! against the local RabbitMQ (`RABBITMQ_URL`) and Postgres (`DATABASE_URL`) under a prefix
//! and schema of its own, with a loopback SMTP sink and webhook receivers in this process.
//! Everything it declares or creates is removed at the end, also after ctrl-c. Settings of the
//! API and worker not set by the bench (API_HTTP_WORKERS, API_PUBLISH_CHANNELS,
//! WORKER_CONCURRENCY, WORKER_PREFETCH, RUST_LOG, ...) pass through from the environment.
//!
//! Layout: [`args`] the command line, [`setup`] what a run creates and deletes, [`phases`] what
//! it measures (one module per phase; how to add one is in its doc), [`report`] the tables;
//! [`raw`], [`load`], [`procs`] and [`stats`] are the instruments the phases use.

mod args;
mod load;
mod messages;
mod phases;
mod procs;
mod raw;
mod report;
mod setup;
mod stats;

use std::{process::ExitCode, time::Instant};

#[tokio::main]
async fn main() -> ExitCode {
    let args = args::Args::parse();
    if let Some(prefix) = args.clean.clone() {
        let id = prefix.trim_start_matches("bench-").to_string();
        return match setup::setup(args, None, Some(id)).await {
            Ok(ctx) => {
                setup::cleanup(&ctx).await;
                let _ = std::fs::remove_dir_all(&ctx.logdir);
                println!("deleted the queues of {prefix} and schema {}", ctx.store.schema());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("notify-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.dead_letters_only {
        return phases::dead_letters::only(args).await;
    }
    if cfg!(debug_assertions) {
        eprintln!("notify-bench measures nothing useful in a debug build: cargo run -p notify-bench --release");
        return ExitCode::from(2);
    }
    let bins = match procs::build(args.no_build, args.bin_dir.as_deref()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("notify-bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let ctx = match setup::setup(args, Some(bins), None).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("notify-bench: cannot start: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut report = report::Report::default();
    let started = Instant::now();
    let outcome = tokio::select! {
        r = phases::run(&ctx, &mut report) => r,
        _ = stop_signal() => Err(anyhow::anyhow!("interrupted; cleaning up")),
    };
    // Any process still running was dropped with its phase: kill_on_drop ended it.
    setup::cleanup(&ctx).await;
    let ok = match outcome {
        Ok(()) => {
            report::print(&ctx, &mut report, started.elapsed());
            report.problems.is_empty()
        }
        Err(e) => {
            eprintln!("notify-bench: {e:#}");
            false
        }
    };
    // The logs are what explains a failed run; after a good one they are only clutter in /tmp.
    if ctx.args.keep_logs || !ok {
        println!("logs of the API and worker processes: {}", ctx.logdir.display());
    } else {
        let _ = std::fs::remove_dir_all(&ctx.logdir);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// ctrl-c or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
