//! Dead letters (issue 10): listing and filtering over many dead letters (p50 / p99 per page)
//! and replay throughput (dead letters/s back into their channel queue, confirmed).
//!
//! The dead letters are made with one bulk INSERT (as the worker's indexer would have stored
//! them: envelopes of all three channels, six reasons, varied errors, one per second of dead
//! time); replay goes through the same code as the API and `notify-admin`. No worker consumes
//! the replays: they are counted in the channel queue, then purged.

use crate::{args::Args, phases::support, report::thousands, setup, setup::Ctx, stats::Latencies};
use notify_api::dead_letters::{DeadLetterAdmin, Selector};
use notify_store::{DeadLetterFilter, Store};
use notify_types::Channel;
use std::{fmt::Write as _, time::Duration, time::Instant};

/// Pages fetched per query shape.
const ROUNDS: usize = 50;
const PAGE: i64 = 50;

pub struct Figures {
    n: u64,
    /// (what was asked, page latencies, total it matched)
    pages: Vec<(String, Latencies, i64)>,
    replayed: usize,
    replay_elapsed: Duration,
}

pub async fn run(ctx: &Ctx, n: u64) -> anyhow::Result<Figures> {
    println!("dead letters: inserting {n} …");
    let store = Store::connect_lazy(&ctx.settings["DATABASE_URL"], ctx.store.schema(), 8)?;
    store.migrate().await?;
    fill(&store, n).await?;
    let time = |secs_ago: i64| chrono::Utc::now() - chrono::Duration::seconds(secs_ago);
    let mid = (n / 2) as i64;
    let shapes: Vec<(String, DeadLetterFilter)> = vec![
        ("newest page, no filter".into(), DeadLetterFilter::default()),
        (
            "channel=email&reason=max_attempts".into(),
            DeadLetterFilter {
                channel: Some("email".into()),
                reason: Some("max_attempts".into()),
                ..Default::default()
            },
        ),
        (
            "event=password.reset&error=mailbox (case-insensitive substring)".into(),
            DeadLetterFilter {
                event: Some("password.reset".into()),
                error: Some("MAILBOX".into()),
                ..Default::default()
            },
        ),
        (
            format!("error=user{mid}@ (one match)"),
            DeadLetterFilter { error: Some(format!("user{mid}@")), ..Default::default() },
        ),
        (
            "since/until: a one-hour window".into(),
            DeadLetterFilter { since: Some(time(mid + 3600)), until: Some(time(mid)), ..Default::default() },
        ),
    ];
    let mut pages = Vec::new();
    for (name, filter) in shapes {
        let mut lat = Latencies::default();
        let mut total = 0;
        for _ in 0..ROUNDS {
            let started = Instant::now();
            total = store.list_dead_letters(&filter, None, PAGE).await?.total;
            lat.push(started.elapsed());
        }
        pages.push((name, lat, total));
    }

    // Replay: the webhook dead letters, up to a twentieth of them, into notify.webhook.
    let count = (n / 20).clamp(1, 5_000) as i64;
    let admin = DeadLetterAdmin {
        store: store.clone(),
        rabbitmq_url: ctx.settings["RABBITMQ_URL"].clone(),
        url_order: Default::default(),
        topology: ctx.topology.clone(),
        replay_limit: 5,
        publish_timeout: Duration::from_secs(10),
    };
    let selector = Selector::Filter {
        filter: DeadLetterFilter { channel: Some("webhook".into()), ..Default::default() },
        limit: count,
    };
    let started = Instant::now();
    let done = admin.replay(&selector, false, "bench").await?;
    let replay_elapsed = started.elapsed();
    let queue = ctx.topology.queue(Channel::Webhook);
    let queued = support::wait_count(&ctx.conn, &queue, done.ids.len() as u64, Duration::from_secs(30)).await;
    anyhow::ensure!(
        queued == Some(done.ids.len() as u32) && done.failed.is_empty(),
        "replayed {} but the queue holds {queued:?} ({} failed)",
        done.ids.len(),
        done.failed.len()
    );
    support::purge(&ctx.conn, &queue).await?;
    store.close().await;
    Ok(Figures { n, pages, replayed: done.ids.len(), replay_elapsed })
}

/// `--dead-letters-only`: this phase alone, without the API and worker processes (a debug
/// build runs it too, as a check that it works; its figures then mean nothing).
pub async fn only(args: Args) -> std::process::ExitCode {
    let n = args.dead_letters;
    if cfg!(debug_assertions) {
        eprintln!("notify-bench: debug build: the dead-letter phase runs, its figures mean nothing");
    }
    let ctx = match setup::setup(args, None, None).await {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("notify-bench: cannot start: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = async {
        ctx.topology.declare(&ctx.conn).await?;
        run(&ctx, n).await
    }
    .await;
    setup::cleanup(&ctx).await;
    let _ = std::fs::remove_dir_all(&ctx.logdir);
    match result {
        Ok(mut figures) => {
            let mut t = String::from(
                "| measure | raw broker | notify | ours/raw | target | result |\n|---|---:|---:|---:|---|---|\n",
            );
            figures.rows(&mut t);
            println!("{t}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("notify-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn fill(store: &Store, n: u64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO dead_letters (id, fingerprint, notification_id, channel, event, reason, attempts,
                                   last_error, dead_at, body, properties)
         SELECT gen_random_uuid(), 'bench-' || g, x.id, x.channel, x.event,
                (ARRAY['permanent','max_attempts','unparseable','crashed_worker','delivery_limit','rejected'])[1 + (g / 3) % 6],
                1 + g % 6, 'SMTP 550 5.1.1 mailbox unavailable: user' || g || '@example.com',
                now() - make_interval(secs => g),
                convert_to(json_build_object('version', 1, 'id', x.id, 'kind', 'direct', 'channel', x.channel,
                    'created_at', now(), 'correlation_id', 'bench-' || g,
                    'payload', json_build_object('url', 'http://127.0.0.1:9/hook', 'payload', json_build_object('n', g)))::text, 'UTF8'),
                jsonb_build_object('message_id', x.id::text, 'content_type', 'application/json', 'type', 'direct')
           FROM generate_series(1, $1) g,
                LATERAL (SELECT gen_random_uuid() AS id,
                                (ARRAY['email','webhook','in_app'])[1 + g % 3] AS channel,
                                (ARRAY[NULL,'user.registered','password.reset','order.completed'])[1 + (g / 7) % 4] AS event) x",
    )
    .bind(n as i64)
    .execute(store.pool())
    .await?;
    sqlx::query("ANALYZE dead_letters").execute(store.pool()).await?;
    Ok(())
}

impl Figures {
    /// The rows of the benchmark's table.
    pub fn rows(&mut self, t: &mut String) {
        for (name, lat, total) in &mut self.pages {
            let (p50, p99) = (lat.percentile_ms(50.0).unwrap_or(0.0), lat.percentile_ms(99.0).unwrap_or(0.0));
            let verdict = if p99 < 100.0 { "PASS" } else { "MISS" };
            let _ = writeln!(
                t,
                "| dead letters: page of {PAGE} + total over {}, {name} ({total} match), p50 / p99 ms | | {p50:.1} / {p99:.1} | | p99 < 100 | {verdict} |",
                thousands(self.n as f64)
            );
        }
        let rate = crate::stats::rate(self.replayed as u64, self.replay_elapsed);
        let _ = writeln!(
            t,
            "| dead letters: replay into the channel queue (confirmed), dead letters/s ({} replayed) | | {} | | | |",
            self.replayed,
            thousands(rate)
        );
    }
}
