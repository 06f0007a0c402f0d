//! The API and the worker as separate release processes: building them, starting them with
//! the bench's settings, their peak RSS (VmHWM) and stopping them with SIGTERM.

use nix::{sys::signal, unistd::Pid};
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};
use tokio::process::{Child, Command};

pub struct Bins {
    pub api: PathBuf,
    pub worker: PathBuf,
}

/// `cargo build --release -p notify-api -p notify-worker` into the target directory this bench
/// runs from (unless `skip`), then the two binaries next to the bench's own — or those in
/// `bin_dir` (no build), e.g. to compare two builds.
pub fn build(skip: bool, bin_dir: Option<&Path>) -> anyhow::Result<Bins> {
    if let Some(dir) = bin_dir {
        let bins = Bins { api: dir.join("notify-api"), worker: dir.join("notify-worker") };
        for b in [&bins.api, &bins.worker] {
            anyhow::ensure!(b.exists(), "{} is missing", b.display());
        }
        return Ok(bins);
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or_else(|| anyhow::anyhow!("the bench binary has no directory"))?;
    let target = dir.parent().ok_or_else(|| anyhow::anyhow!("{} is not inside a target dir", dir.display()))?;
    if !skip {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        println!("building the API and the worker: cargo build --release -p notify-api -p notify-worker");
        let status = std::process::Command::new(cargo)
            .args(["build", "--release", "--quiet", "-p", "notify-api", "-p", "notify-worker"])
            .env("CARGO_TARGET_DIR", target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()?;
        anyhow::ensure!(status.success(), "building notify-api and notify-worker failed ({status})");
    }
    let bins = Bins { api: target.join("release/notify-api"), worker: target.join("release/notify-worker") };
    for b in [&bins.api, &bins.worker] {
        anyhow::ensure!(b.exists(), "{} is missing: cargo build --release -p notify-api -p notify-worker", b.display());
    }
    Ok(bins)
}

/// A running child process; its stdout and stderr go to `<logdir>/<name>.log`.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    /// VmHWM read last (kB): the child's peak resident set so far.
    pub peak_kb: u64,
}

impl Proc {
    pub fn spawn(name: &str, bin: &Path, env: &HashMap<String, String>, logdir: &Path) -> anyhow::Result<Proc> {
        let log = logdir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(bin)
            .envs(env)
            // No stray `.env` from the caller's directory.
            .current_dir(logdir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", bin.display()))?;
        Ok(Proc { name: name.to_string(), child, log, peak_kb: 0 })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Fails (with the end of its log) if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 15)
            );
        }
        Ok(())
    }

    /// Reads VmHWM from /proc/<pid>/status and keeps the highest value seen.
    pub fn sample_peak(&mut self) -> u64 {
        if let Some(pid) = self.pid() {
            if let Some(kb) = vm_hwm_kb(pid) {
                self.peak_kb = self.peak_kb.max(kb);
            }
        }
        self.peak_kb
    }

    /// SIGTERM, then waits up to `grace` before SIGKILL. Returns the peak RSS (kB) read just
    /// before the signal and the exit status.
    pub async fn stop(mut self, grace: Duration) -> anyhow::Result<(u64, ExitStatus)> {
        let peak = self.sample_peak();
        if let Some(pid) = self.pid() {
            let _ = signal::kill(Pid::from_raw(pid as i32), signal::Signal::SIGTERM);
        }
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                eprintln!("{} did not stop within {grace:?} of SIGTERM; killing it", self.name);
                self.child.kill().await?;
                self.child.wait().await?
            }
        };
        Ok((peak, status))
    }
}

/// User + system CPU time a process has used so far (`/proc/<pid>/stat`, USER_HZ = 100).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Busy and total time of all CPUs so far (`/proc/stat`), to tell how loaded the machine was.
pub fn machine_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// Processes whose command name is `comm` (e.g. `beam.smp`, `postgres`).
pub fn pids_named(comm: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm))
        .collect()
}

pub fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// CPU used by the parts of the system during one phase.
pub struct Meter {
    machine: Option<(u64, u64)>,
    parts: Vec<(String, Vec<(u32, Duration)>)>,
    /// Whose new processes count too (postgres backends opened during the phase).
    rescan: Vec<(String, &'static str)>,
}

/// CPU per message of each part, and how busy the whole machine was.
#[derive(Debug, Clone, Default)]
pub struct CpuUse {
    pub per_msg_us: Vec<(String, f64)>,
    pub machine_busy: Option<f64>,
}

impl Meter {
    /// Starts measuring the bench itself, RabbitMQ (`beam.smp`), Postgres and the given
    /// children.
    pub fn start(children: &[(&str, u32)]) -> Meter {
        let snap = |pids: Vec<u32>| pids.into_iter().map(|p| (p, cpu_time(p).unwrap_or_default())).collect::<Vec<_>>();
        let mut parts = Vec::new();
        for (name, pid) in children {
            parts.push((name.to_string(), snap(vec![*pid])));
        }
        parts.push(("rabbitmq".to_string(), snap(pids_named("beam.smp"))));
        parts.push(("postgres".to_string(), snap(pids_named("postgres"))));
        parts.push(("bench".to_string(), snap(vec![std::process::id()])));
        Meter { machine: machine_cpu(), parts, rescan: vec![("postgres".to_string(), "postgres")] }
    }

    pub fn stop(&self, messages: u64) -> CpuUse {
        let mut out = CpuUse::default();
        for (name, start) in &self.parts {
            let mut used = Duration::ZERO;
            for (pid, before) in start {
                used += cpu_time(*pid).unwrap_or(*before).saturating_sub(*before);
            }
            if let Some((_, comm)) = self.rescan.iter().find(|(n, _)| n == name) {
                for pid in pids_named(comm) {
                    if !start.iter().any(|(p, _)| *p == pid) {
                        used += cpu_time(pid).unwrap_or_default();
                    }
                }
            }
            out.per_msg_us.push((name.clone(), used.as_secs_f64() * 1e6 / messages.max(1) as f64));
        }
        if let (Some((b0, t0)), Some((b1, t1))) = (self.machine, machine_cpu()) {
            if t1 > t0 {
                out.machine_busy = Some((b1 - b0) as f64 / (t1 - t0) as f64);
            }
        }
        out
    }
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.per_msg_us.iter().map(|(n, us)| format!("{n} {us:.0}")).collect();
        write!(f, "CPU µs/msg: {}", parts.join(", "))?;
        if let Some(b) = self.machine_busy {
            write!(f, "; machine {:.0}% busy", b * 100.0)?;
        }
        Ok(())
    }
}
