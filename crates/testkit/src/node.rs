//! What a private RabbitMQ node is made of, shared by [`crate::private_broker`] (one node) and
//! [`crate::private_cluster`] (several, joined): its name, ports and files, the commands that run
//! it and talk to it, and finding and killing its processes. Recipe and traps: the testkit's
//! README.md ("Private RabbitMQ nodes").
//!
//! Who owns the `rabbitmq-server` process (a tokio child of one test, or a std child that
//! outlives any test's runtime) is up to the caller; everything here works with either.

use crate::poll::poll;
use anyhow::{anyhow, bail, Context, Result};
use lapin::{Connection, ConnectionProperties};
use nix::{
    sys::signal::{kill, Signal},
    unistd::{Pid, Uid, User},
};
use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

const CTL_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const START_POLL_INTERVAL: Duration = Duration::from_millis(100);
const PORT_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Where Debian keeps the real scripts; `/usr/sbin` only has wrappers that `su` to rabbitmq.
const DEBIAN_SCRIPTS: &str = "/usr/lib/rabbitmq/bin";
/// RabbitMQ's default relative watermark.
pub(crate) const NORMAL_WATERMARK: &str = "0.4";

/// One private node: name, ports and directory. Nothing here runs until a caller spawns
/// [`NodeSpec::server_command`].
#[derive(Clone, Debug)]
pub(crate) struct NodeSpec {
    /// Erlang node name, e.g. `notifytest-1a2b3c4d@localhost`.
    pub name: String,
    pub amqp_port: u16,
    pub dist_port: u16,
    /// Data, logs, configuration, pid file and the server's output.
    pub dir: PathBuf,
    /// Who the node and its CLI run as; `None`: as this process's user.
    pub user: Option<NodeUser>,
}

#[derive(Clone, Debug)]
pub(crate) struct NodeUser {
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl NodeSpec {
    /// `amqp://guest:guest@127.0.0.1:PORT/<vhost>` (guest may log in from loopback only: fine).
    pub fn url(&self, vhost: &str) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/{}", self.amqp_port, encode_vhost(vhost))
    }

    /// Creates the node's directory with its own `rabbitmq.conf` (the machine's sets the shared
    /// node's listener), an empty plugin list and an empty `rabbitmq-env.conf` (the machine's
    /// sets the shared node's name), all owned by the node's user.
    pub fn prepare_dir(&self) -> Result<()> {
        for sub in ["", "mnesia", "log"] {
            fs::create_dir_all(self.dir.join(sub))
                .with_context(|| format!("creating {}", self.dir.join(sub).display()))?;
        }
        let files = [
            // No plugins: faster boot, no management listener to clash with the shared node's.
            ("enabled_plugins", String::new()),
            (
                "rabbitmq.conf",
                format!(
                    "# Private test node; replaces /etc/rabbitmq/rabbitmq.conf, whose listener \
                     is the shared node's.\nlisteners.tcp.local = 127.0.0.1:{}\n\
                     vm_memory_high_watermark.relative = {NORMAL_WATERMARK}\n",
                    self.amqp_port
                ),
            ),
            ("rabbitmq-env.conf", "# Private test node: everything comes from the environment.\n".to_string()),
        ];
        for (name, content) in files {
            fs::write(self.dir.join(name), content)
                .with_context(|| format!("writing {}", self.dir.join(name).display()))?;
        }
        if let Some(user) = &self.user {
            // The node runs as `user` and writes its data, logs, pid and feature flags here.
            for path in ["", "mnesia", "log", "enabled_plugins", "rabbitmq.conf"] {
                let path = self.dir.join(path);
                std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))
                    .with_context(|| format!("chown {}", path.display()))?;
            }
        }
        Ok(())
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let path = |name: &str| self.dir.join(name).display().to_string();
        vec![
            ("RABBITMQ_NODENAME", self.name.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_string()),
            ("RABBITMQ_NODE_PORT", self.amqp_port.to_string()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string()),
            ("RABBITMQ_MNESIA_BASE", path("mnesia")),
            ("RABBITMQ_LOG_BASE", path("log")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins")),
            ("RABBITMQ_FEATURE_FLAGS_FILE", path("feature_flags")),
            ("RABBITMQ_PID_FILE", path("rabbitmq.pid")),
            ("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf")),
            ("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf")),
            // Loopback only, like the shared node: epmd (if this node has to start it) and the
            // inter-node port.
            ("ERL_EPMD_ADDRESS", "127.0.0.1".to_string()),
            ("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}".to_string()),
        ]
    }

    /// `rabbitmq-server` in the foreground, output appended to `server.out`, leader of its own
    /// process group (so a terminal's Ctrl-C does not reach it, and the whole group can be
    /// killed without knowing its pids). Spawn it with std or convert it to tokio's.
    pub fn server_command(&self) -> Result<Command> {
        let out_path = self.dir.join("server.out");
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)
            .with_context(|| format!("opening {}", out_path.display()))?;
        let mut cmd = self.rabbitmq_command("rabbitmq-server");
        cmd.envs(self.env()).stdout(out.try_clone()?).stderr(out);
        cmd.process_group(0);
        Ok(cmd)
    }

    /// Runs `SCRIPT -n <node> ARGS` (`rabbitmqctl`, `rabbitmq-queues`, …), bounded in time;
    /// its standard output on success.
    pub async fn cli(&self, script: &str, args: &[&str]) -> Result<String> {
        let mut cmd = tokio::process::Command::from(self.rabbitmq_command(script));
        cmd.arg("-n").arg(&self.name).args(args).kill_on_drop(true);
        let shown = format!("{script} -n {} {}", self.name, args.join(" "));
        let output = tokio::time::timeout(CTL_TIMEOUT, cmd.output())
            .await
            .map_err(|_| anyhow!("`{shown}` did not finish within {CTL_TIMEOUT:?}"))?
            .with_context(|| format!("running `{shown}`"))?;
        if !output.status.success() {
            bail!(
                "`{shown}` failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A RabbitMQ script, run as the node's user with a clean environment: the test process's
    /// own variables (`RABBITMQ_URL`, a developer's `RABBITMQ_NODENAME`…) must not leak in.
    fn rabbitmq_command(&self, script: &str) -> Command {
        let debian = Path::new(DEBIAN_SCRIPTS).join(script);
        let program = if debian.exists() { debian } else { PathBuf::from(script) };
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()))
            // The CLI (Elixir) warns and may mangle output without a UTF-8 locale.
            .env("LC_ALL", "C.UTF-8")
            .stdin(Stdio::null());
        match &self.user {
            Some(user) => {
                // What the Debian wrapper's `su rabbitmq` amounts to: that user's cookie in
                // $HOME, started from its home directory.
                cmd.uid(user.uid).gid(user.gid).env("HOME", &user.home).current_dir(&user.home);
            }
            None => {
                if let Some(home) = std::env::var_os("HOME") {
                    cmd.env("HOME", home);
                }
            }
        }
        cmd
    }

    /// Waits until the node accepts AMQP connections. `exited` tells whether its server process
    /// is gone (the outcome is known then: stop waiting).
    pub async fn wait_for_amqp(&self, timeout: Duration, exited: impl Fn() -> Option<ExitStatus>) -> Result<()> {
        let url = self.url("/");
        let ready = poll(timeout, START_POLL_INTERVAL, async || {
            if let Some(status) = exited() {
                return Ok(Err(anyhow!("rabbitmq-server exited with {status}")));
            }
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                Connection::connect(&url, ConnectionProperties::default()),
            )
            .await;
            match attempt {
                Ok(Ok(conn)) => {
                    let _ = conn.close(200, "ready".into()).await;
                    Ok(Ok(()))
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("AMQP handshake timed out".to_string()),
            }
        })
        .await;
        let failure = match ready {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(exited)) => exited,
            Err(last) => anyhow!(
                "not accepting AMQP on 127.0.0.1:{} after {timeout:?} (last error: {})",
                self.amqp_port,
                last.unwrap_or_default()
            ),
        };
        Err(failure.context(format!(
            "private RabbitMQ node {} did not start; its output:\n{}",
            self.name,
            self.output_tail()
        )))
    }

    /// Waits until the AMQP port refuses connections.
    pub async fn wait_port_closed(&self) -> Result<()> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.amqp_port));
        let closed =
            poll(STOP_TIMEOUT, PORT_POLL_INTERVAL, async || match tokio::net::TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
                Err(e) => Err(e.to_string()),
                Ok(_) => Err("still accepting connections".to_string()),
            })
            .await;
        closed.map_err(|last| {
            anyhow!("port {addr} of {} did not close within {STOP_TIMEOUT:?}: {}", self.name, last.unwrap_or_default())
        })
    }

    /// SIGKILL to the node's Erlang VM (a crash: nothing is closed or flushed).
    pub fn kill_vm(&self) -> Result<()> {
        let pid = self.os_pid()?;
        kill(pid, Signal::SIGKILL).with_context(|| format!("kill -9 {pid} ({})", self.name))
    }

    /// The Erlang VM's OS pid, from the pid file the node writes at boot, checked against
    /// /proc so that a stale file can never make us signal another process.
    fn os_pid(&self) -> Result<Pid> {
        let pid_file = self.dir.join("rabbitmq.pid");
        let text = fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {} (is the node running?)", pid_file.display()))?;
        let pid: i32 =
            text.trim().parse().with_context(|| format!("pid file {} holds `{}`", pid_file.display(), text.trim()))?;
        if !pids_of_nodes(|name| name == self.name).contains(&pid) {
            bail!("pid {pid} from {} is not a running {}", pid_file.display(), self.name);
        }
        Ok(Pid::from_raw(pid))
    }

    /// The last lines of the server's output and of the node's log, to explain a failure.
    pub fn output_tail(&self) -> String {
        let tail = |path: PathBuf| {
            let text = fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(20);
            format!("== {} ==\n{}", path.display(), lines[start..].join("\n"))
        };
        format!(
            "{}\n{}",
            tail(self.dir.join("server.out")),
            tail(self.dir.join("log").join(format!("{}.log", self.name)))
        )
    }
}

/// A vhost as the path of an AMQP URL: `/` is `%2f`, anything outside RFC 3986's unreserved
/// characters is percent-encoded.
pub(crate) fn encode_vhost(vhost: &str) -> String {
    vhost
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02x}"),
        })
        .collect()
}

/// `count` distinct free loopback ports, bound at once so they differ and released for the
/// nodes to take. Ports the shared node and the CLI use are never picked.
pub(crate) fn free_ports(count: usize) -> Result<Vec<u16>> {
    let reserved = |port: u16| matches!(port, 4369 | 5672 | 15672 | 25672 | 35672..=35682);
    let mut held = Vec::with_capacity(count);
    for _ in 0..count + 50 {
        if held.len() == count {
            break;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        if !reserved(listener.local_addr()?.port()) {
            held.push(listener);
        }
    }
    if held.len() < count {
        bail!("found no {count} free ports outside RabbitMQ's well-known ports");
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// As root, the node must run as `rabbitmq` (the user whose cookie `rabbitmqctl` uses and who
/// owns RabbitMQ's installation files); otherwise it runs as the current user.
pub(crate) fn node_user() -> Result<Option<NodeUser>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let user = User::from_name("rabbitmq")
        .context("looking up the rabbitmq user")?
        .context("running as root, but there is no `rabbitmq` user to run the node as")?;
    Ok(Some(NodeUser { uid: user.uid.as_raw(), gid: user.gid.as_raw(), home: user.dir }))
}

/// Processes whose environment carries `RABBITMQ_NODENAME=<name>` with `wanted(name)`: a
/// node's VM, its launcher and their port programs. The VM's command line does not name the
/// node, its environment does; the shared node's never holds a test node's name. An `epmd`
/// one of our nodes had to start is left alone: other nodes may have registered with it since.
pub(crate) fn pids_of_nodes(wanted: impl Fn(&str) -> bool) -> Vec<i32> {
    const VAR: &[u8] = b"RABBITMQ_NODENAME=";
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // Unreadable (another user's, or gone meanwhile) means not ours.
            let named = fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|b| *b == 0)
                    .filter_map(|var| var.strip_prefix(VAR))
                    .any(|name| std::str::from_utf8(name).is_ok_and(&wanted))
            });
            named && fs::read_to_string(format!("/proc/{pid}/comm")).map_or(true, |comm| comm.trim() != "epmd")
        })
        .collect()
}

/// SIGKILL to each of `pids`; errors (already gone) are ignored.
pub(crate) fn kill_all(pids: &[i32]) {
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
}

/// Waits (bounded; Drop cannot await) until none of `pids` runs any more, calling `reap` on
/// the way so that our own children do not linger as zombies. Other zombies count as gone:
/// their parent reaps them.
pub(crate) fn wait_until_gone(pids: &[i32], mut reap: impl FnMut(), timeout: Duration) {
    let interval = Duration::from_millis(10);
    let rounds = timeout.as_millis() / interval.as_millis();
    for _ in 0..rounds {
        reap();
        if pids.iter().all(|pid| !is_running(*pid)) {
            return;
        }
        std::thread::sleep(interval);
    }
}

fn is_running(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) STATE …`; comm may contain spaces and parentheses, the state follows the last `)`.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhosts_are_encoded_for_urls() {
        assert_eq!(encode_vhost("/"), "%2f");
        assert_eq!(encode_vhost("t-a_b.c"), "t-a_b.c");
        assert_eq!(encode_vhost("a b/c"), "a%20b%2fc");
    }

    #[test]
    fn free_ports_differ() {
        let ports = free_ports(6).unwrap();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 6);
        assert!(!ports.contains(&5672));
    }
}
