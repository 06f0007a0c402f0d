//! notify-admin: the operators' CLI. It reads the service's own settings (environment and
//! `.env`: DATABASE_URL, DATABASE_SCHEMA, RABBITMQ_URL, NOTIFY_PREFIX, REPLAY_LIMIT, ...), so it
//! works wherever the API runs, e.g. `kubectl exec deploy/notify-api -- notify-admin ...`.
//!
//! ```text
//! notify-admin dead-letters list    [--channel C] [--event E] [--reason R] [--error TEXT] [--since T] [--until T] [--limit N] [--cursor C] [--json]
//! notify-admin dead-letters show    ID [--json]
//! notify-admin dead-letters replay  [ID...] [filters] [--limit N] [--dry-run] [--json]
//! notify-admin dead-letters discard [ID...] [filters] [--limit N] [--dry-run] [--json]
//! ```

use clap::{Args, Parser, Subcommand};
use notify_api::dead_letters::{parse_filter, DeadLetterAdmin, Done, Selector, DEFAULT_ACTION_LIMIT, MAX_ACTION_LIMIT};
use notify_store::{DeadLetterFilter, Store};
use notify_types::config::{self as cfg, Env, Source};
use std::{process::ExitCode, time::Duration};
use uuid::Uuid;

/// Who the audit records name for actions taken here.
const ACTOR: &str = "cli";

#[derive(Parser)]
#[command(name = "notify-admin", version, about = "Operate notify: inspect, replay and discard dead letters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Dead letters: notifications a channel gave up on.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetters),
}

#[derive(Subcommand)]
enum DeadLetters {
    /// List dead letters, newest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Page size, 1–500.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=500))]
        limit: i64,
        /// The next page: the cursor a previous page printed.
        #[arg(long)]
        cursor: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its message.
    Show {
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to their channel queue as a fresh first attempt.
    Replay(ActionArgs),
    /// Remove dead letters for good.
    Discard(ActionArgs),
}

#[derive(Args)]
struct FilterArgs {
    /// email, webhook or in_app.
    #[arg(long)]
    channel: Option<String>,
    /// Event name (e.g. password.reset).
    #[arg(long)]
    event: Option<String>,
    /// permanent, max_attempts, unparseable, crashed_worker, delivery_limit or rejected.
    #[arg(long)]
    reason: Option<String>,
    /// Text in the last error (case-insensitive).
    #[arg(long)]
    error: Option<String>,
    /// Died at or after this time (RFC 3339, e.g. 2026-12-03T10:00:00Z).
    #[arg(long)]
    since: Option<String>,
    /// Died before this time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
}

#[derive(Args)]
struct ActionArgs {
    /// Dead-letter ids; without them, the filter selects.
    ids: Vec<Uuid>,
    #[command(flatten)]
    filter: FilterArgs,
    /// With a filter: act on at most this many (oldest first).
    #[arg(long, default_value_t = DEFAULT_ACTION_LIMIT, value_parser = clap::value_parser!(i64).range(1..=MAX_ACTION_LIMIT))]
    limit: i64,
    /// Show what would be done, do nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

impl FilterArgs {
    fn parse(&self) -> Result<DeadLetterFilter, String> {
        let given = [
            ("channel", &self.channel),
            ("event", &self.event),
            ("reason", &self.reason),
            ("error", &self.error),
            ("since", &self.since),
            ("until", &self.until),
        ];
        let fields = given.iter().filter_map(|(name, v)| v.as_deref().map(|v| (*name, v)));
        parse_filter(fields, "--").map_err(|errors| {
            errors.iter().map(|(field, message)| format!("{field}: {message}")).collect::<Vec<_>>().join("\n")
        })
    }

    fn is_empty(&self) -> bool {
        [&self.channel, &self.event, &self.reason, &self.error, &self.since, &self.until].iter().all(|v| v.is_none())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = Env::load();
    // Logs (the audit line of every action) go to stderr; the answer to stdout.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,notify_api=info,lapin=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .fmt_fields(notify_types::telemetry::text_fields())
        .init();
    match run(cli, &env).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("notify-admin: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli, env: &dyn Source) -> Result<ExitCode, String> {
    let Command::DeadLetters(command) = cli.command;
    let admin = admin(env)?;
    admin.store.migrate().await.map_err(|e| e.to_string())?;
    match command {
        DeadLetters::List { filter, limit, cursor, json } => {
            let filter = filter.parse()?;
            if cursor.as_deref().is_some_and(|c| !notify_store::is_valid_cursor(c)) {
                return Err("--cursor: is not a cursor from a previous page".into());
            }
            let page =
                admin.store.list_dead_letters(&filter, cursor.as_deref(), limit).await.map_err(|e| e.to_string())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&page).map_err(|e| e.to_string())?);
            } else {
                print_table(&page.items);
                println!("{} of {} dead letters", page.items.len(), page.total);
                if let Some(c) = page.next_cursor {
                    println!("next page: --cursor {c}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadLetters::Show { id, json } => {
            let Some(d) = admin.store.dead_letter(id).await.map_err(|e| e.to_string())? else {
                return Err(format!("no dead letter {id}"));
            };
            let message: serde_json::Value = serde_json::from_slice(&d.body)
                .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&d.body).into_owned()));
            let mut v = serde_json::to_value(&d.letter).map_err(|e| e.to_string())?;
            v["status"] = d.status.clone().into();
            v["message"] = message;
            v["headers"] = d.properties.get("headers").cloned().unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?);
            } else {
                print_table(std::slice::from_ref(&d.letter));
                println!("status: {} (since {})", d.status, d.status_at);
                println!("message:\n{}", serde_json::to_string_pretty(&v["message"]).unwrap_or_default());
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadLetters::Replay(args) => {
            let selector = selector(&args)?;
            let done = admin.replay(&selector, args.dry_run, ACTOR).await.map_err(|e| e.to_string())?;
            Ok(report(&done, "replayed", &args))
        }
        DeadLetters::Discard(args) => {
            let selector = selector(&args)?;
            let done = admin.discard(&selector, args.dry_run, ACTOR).await.map_err(|e| e.to_string())?;
            Ok(report(&done, "discarded", &args))
        }
    }
}

fn admin(env: &dyn Source) -> Result<DeadLetterAdmin, String> {
    let err = |e: cfg::ConfigError| e.to_string();
    let store = Store::connect_lazy(
        &cfg::string(env, "DATABASE_URL", cfg::DEFAULT_DATABASE_URL),
        &cfg::string(env, "DATABASE_SCHEMA", "public"),
        4,
    )
    .map_err(|e| format!("DATABASE_URL / DATABASE_SCHEMA: {e}"))?;
    Ok(DeadLetterAdmin {
        store,
        rabbitmq_url: cfg::amqp_url(env, "RABBITMQ_URL", cfg::DEFAULT_RABBITMQ_URL).map_err(err)?,
        url_order: cfg::parse(env, "RABBITMQ_URL_ORDER", Default::default()).map_err(err)?,
        topology: cfg::topology(env).map_err(err)?,
        replay_limit: cfg::bounded(env, "REPLAY_LIMIT", 5, 0, 1000).map_err(err)? as u32,
        publish_timeout: cfg::duration(env, "PUBLISH_TIMEOUT", Duration::from_secs(5)).map_err(err)?,
    })
}

fn selector(args: &ActionArgs) -> Result<Selector, String> {
    match (args.ids.is_empty(), args.filter.is_empty()) {
        (false, true) => Ok(Selector::Ids(args.ids.clone())),
        (true, _) => Ok(Selector::Filter { filter: args.filter.parse()?, limit: args.limit }),
        (false, false) => Err("give dead-letter ids or filters, not both".into()),
    }
}

/// Prints the outcome; exit code 1 when something selected was refused or failed.
fn report(done: &Done, verb: &str, args: &ActionArgs) -> ExitCode {
    if args.json {
        println!("{}", serde_json::to_string_pretty(&done.to_json(verb)).unwrap_or_default());
    } else {
        let verb = if args.dry_run { format!("would be {verb}") } else { verb.to_string() };
        println!("matched {}, {verb} {}", done.matched, done.ids.len());
        for id in &done.not_found {
            println!("not found (or no longer dead): {id}");
        }
        for r in &done.refused {
            println!("refused {}: {}", r.id, r.reason);
        }
        for f in &done.failed {
            println!("failed {}: {}", f.id, f.error);
        }
    }
    if done.refused.is_empty() && done.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_table(items: &[notify_store::DeadLetter]) {
    println!(
        "{:<36}  {:<24}  {:<7}  {:<16}  {:<14}  {:>3}  {:>3}  LAST ERROR",
        "ID", "DIED", "CHANNEL", "EVENT", "REASON", "ATT", "REP"
    );
    for d in items {
        let error: String = d.last_error.as_deref().unwrap_or("").chars().take(60).collect();
        println!(
            "{:<36}  {:<24}  {:<7}  {:<16}  {:<14}  {:>3}  {:>3}  {}",
            d.id,
            d.dead_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            d.channel,
            d.event.as_deref().unwrap_or("-"),
            d.reason,
            d.attempts,
            d.replays,
            error.escape_debug()
        );
    }
}
