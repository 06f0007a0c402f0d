//! Command-line arguments. Defaults that depend on `--quick` are resolved here, so the phases
//! read plain values.

use clap::Parser;
use notify_types::QueueType;
use std::{path::PathBuf, time::Duration};

/// The raw broker and notify side by side, with the ratios ours/raw.
#[derive(Parser)]
#[command(
    name = "notify-bench",
    about,
    // As before clap: a repeated option is no error, the last one counts.
    args_override_self = true,
    after_help = "notify-bench --clean bench-XXXXXXXX deletes what a killed run left behind.\n\
                  Build in release: cargo run -p notify-bench --release -- [OPTIONS]"
)]
struct Cli {
    /// Shorter phases and drains (3 s, 2 000 messages instead of 8 s, 10 000)
    #[arg(long)]
    quick: bool,
    /// Type of every queue the bench declares: quorum or classic
    #[arg(long, value_name = "TYPE", default_value_t = QueueType::Quorum)]
    queue_type: QueueType,
    /// Length of each load phase, 0.5 to 120 seconds
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Messages pre-filled for each drain (and the raw consume), 100 to 1000000
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
    drain_count: Option<u64>,
    /// Only one end-to-end run, at most this share (0.05 to 1) of the webhook drain rate
    #[arg(long, value_name = "F", value_parser = parse_share)]
    e2e_share: Option<f64>,
    /// Use the release binaries already built next to the bench instead of building them
    #[arg(long)]
    no_build: bool,
    /// notify-api and notify-worker from DIR (no build), e.g. to compare two builds
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Keep the API and worker logs also after a successful run
    #[arg(long)]
    keep_logs: bool,
    /// Dead letters of the dead-letter phase (list/filter pages, replay throughput)
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    dead_letters: u64,
    /// Only the dead-letter phase, without the API and worker processes
    #[arg(long)]
    dead_letters_only: bool,
    /// Only delete the queues and schema an interrupted run with this prefix left behind
    #[arg(long, value_name = "PREFIX", value_parser = parse_prefix)]
    clean: Option<String>,
}

/// The arguments with `--quick`'s defaults applied.
pub struct Args {
    pub queue_type: QueueType,
    pub duration: Duration,
    pub drain_count: u64,
    pub no_build: bool,
    pub keep_logs: bool,
    /// notify-api and notify-worker from here instead of a build.
    pub bin_dir: Option<PathBuf>,
    /// Only delete what an interrupted run with this prefix left behind.
    pub clean: Option<String>,
    /// The end-to-end phase's rate is at most this share of the webhook drain rate.
    pub e2e_share: Option<f64>,
    /// Dead letters of the dead-letter phase; with `dead_letters_only`, only that phase runs.
    pub dead_letters: u64,
    pub dead_letters_only: bool,
}

impl Args {
    /// Parses the process's arguments; on an error or `--help`, clap prints and exits.
    pub fn parse() -> Args {
        let cli = Cli::parse();
        Args {
            queue_type: cli.queue_type,
            duration: cli.duration.unwrap_or(Duration::from_secs(if cli.quick { 3 } else { 8 })),
            drain_count: cli.drain_count.unwrap_or(if cli.quick { 2_000 } else { 10_000 }),
            no_build: cli.no_build,
            keep_logs: cli.keep_logs,
            bin_dir: cli.bin_dir,
            clean: cli.clean,
            e2e_share: cli.e2e_share,
            dead_letters: cli.dead_letters,
            dead_letters_only: cli.dead_letters_only,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    // Shorter windows are mostly warm-up; longer ones make the drains' backlogs meaningless.
    if !(0.5..=120.0).contains(&secs) {
        return Err("must be 0.5 to 120 seconds".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_share(s: &str) -> Result<f64, String> {
    let share: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !(0.05..=1.0).contains(&share) {
        return Err("must be 0.05 to 1".into());
    }
    Ok(share)
}

/// Only the bench's own prefixes, so `--clean` cannot delete another application's queues.
fn parse_prefix(s: &str) -> Result<String, String> {
    let ok = s.strip_prefix("bench-").is_some_and(|id| id.len() == 8 && id.chars().all(|c| c.is_ascii_hexdigit()));
    if !ok {
        return Err(format!("takes a prefix like bench-1a2b3c4d, not `{s}`"));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_follow_quick() {
        let cli = Cli::try_parse_from(["notify-bench", "--quick"]).unwrap();
        assert!(cli.quick && cli.duration.is_none() && cli.drain_count.is_none());
        assert_eq!(cli.queue_type, QueueType::Quorum);
    }

    #[test]
    fn values_out_of_range_are_refused() {
        for bad in [
            &["--duration", "0.1"][..],
            &["--drain-count", "99"],
            &["--e2e-share", "2"],
            &["--clean", "notify"],
            &["--queue-type", "stream"],
        ] {
            let argv = std::iter::once("notify-bench").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} was accepted");
        }
        let cli =
            Cli::try_parse_from(["notify-bench", "--queue-type", "classic", "--clean", "bench-1a2b3c4d"]).unwrap();
        assert_eq!(cli.queue_type, QueueType::Classic);
        assert_eq!(cli.clean.as_deref(), Some("bench-1a2b3c4d"));
        let cli = Cli::try_parse_from(["notify-bench", "--duration", "3", "--duration", "4"]).unwrap();
        assert_eq!(cli.duration, Some(Duration::from_secs(4)));
    }
}
