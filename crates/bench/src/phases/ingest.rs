//! Phase 2, ingest: the API alone (no worker), under 32 and then 128 closed-loop connections.
//! With nothing consuming, every 202 must be a message in the e-mail queue. The API started
//! here keeps running for the end-to-end phase, so its peak RSS covers both.

use crate::{
    load,
    messages::email_request,
    phases::support::{purge, wait_count, wait_ready},
    procs::{self, Proc},
    report::{opt, problems_of, Report},
    setup::{Ctx, API_KEY},
};
use notify_types::Channel;
use std::time::Duration;

/// Warm-up before each HTTP load window (connections, first requests).
const WARMUP: Duration = Duration::from_secs(1);

pub struct Ingest {
    pub conns: usize,
    pub result: load::LoadResult,
    pub queued: Option<u32>,
}

/// The API process and how to reach it; dropping it kills the process.
pub struct RunningApi {
    pub proc: Proc,
    pub target: load::Api,
    pub pid: u32,
}

pub async fn run(ctx: &Ctx, rep: &mut Report) -> anyhow::Result<RunningApi> {
    let d = ctx.args.duration;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut env = ctx.settings.clone();
    env.insert("API_PORT".into(), port.to_string());
    let mut api = Proc::spawn("api", &ctx.bins()?.api, &env, &ctx.logdir)?;
    let target = load::Api { addr: ([127, 0, 0, 1], port).into(), auth: format!("Bearer {API_KEY}") };
    wait_ready(&mut api, &target).await?;
    let email_q = ctx.topology.queue(Channel::Email);
    let api_pid = api.pid().unwrap_or(0);
    for conns in [32, 128] {
        let meter = procs::Meter::start(&[("api", api_pid)]);
        let result = load::closed_loop(&target, "/api/v1/notifications/email", email_request(), conns, WARMUP, d).await;
        let cpu = meter.stop(result.accepted_total);
        api.check_alive()?;
        api.sample_peak();
        let queued = wait_count(&ctx.conn, &email_q, result.accepted_total, Duration::from_secs(15)).await;
        let (p50, p99) = (result.latency.clone().percentile_ms(50.0), result.latency.clone().percentile_ms(99.0));
        println!(
            "» ingest {conns} conns: {:.0} 202/s, p50 {} p99 {} ms; {} × 202 in total, queue holds {}{}",
            result.rate(),
            opt(p50, 2),
            opt(p99, 2),
            result.accepted_total,
            queued.map_or("?".into(), |q| q.to_string()),
            problems_of(&result),
        );
        rep.cpu(format!("ingest {conns} conns"), cpu);
        if queued.map(u64::from) != Some(result.accepted_total) {
            rep.problems
                .push(format!("ingest {conns}: {} × 202 but the queue holds {queued:?}", result.accepted_total));
        }
        if result.other_status + result.errors > 0 {
            rep.problems.push(format!("ingest {conns}: {}", problems_of(&result)));
        }
        purge(&ctx.conn, &email_q).await?;
        rep.ingest.push(Ingest { conns, result, queued });
    }
    Ok(RunningApi { proc: api, target, pid: api_pid })
}
