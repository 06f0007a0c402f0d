//! A RabbitMQ node of a test's own, for fault tests: stop it, crash it, raise its memory alarm.
//! The machine's shared node (`rabbit@localhost`, port 5672) is never touched: this node has
//! its own name, ports, data directory and configuration, and cleanup only kills processes
//! that carry this node's unique name or belong to the process group it started.
//!
//! Recipe and traps (RabbitMQ 3.10, Debian package): /work/shared/notes/private-broker.md.
//! - The node runs as the `rabbitmq` user when the tests run as root, as the Debian wrappers
//!   would do; that user's home holds the Erlang cookie, so `rabbitmqctl` (run the same way)
//!   can talk to the node, and every directory the node writes is chowned to it.
//! - The node gets its own `rabbitmq.conf` and `rabbitmq-env.conf`: the machine's files set the
//!   shared node's listener (127.0.0.1:5672) and node name, which would clash.
//! - `rabbitmq-server` in the foreground keeps a shell as parent of the Erlang VM (it turns
//!   SIGTERM into a clean stop), so the VM's OS pid comes from the pid file, not the child.

use crate::poll::poll;
use anyhow::{anyhow, bail, Context, Result};
use lapin::{Connection, ConnectionProperties};
use nix::{
    sys::signal::{kill, killpg, Signal},
    unistd::{Pid, Uid, User},
};
use std::{
    fs,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Mutex, MutexGuard},
    time::Duration,
};
use tokio::process::{Child, Command};

/// Boot takes ~11 s on these machines; leave room for a loaded CI box.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const CTL_TIMEOUT: Duration = Duration::from_secs(60);
const START_POLL_INTERVAL: Duration = Duration::from_millis(100);
const PORT_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Where Debian keeps the real scripts; `/usr/sbin` only has wrappers that `su` to rabbitmq.
const DEBIAN_SCRIPTS: &str = "/usr/lib/rabbitmq/bin";
/// A memory watermark of 0 puts any node over it: the alarm goes off at once.
const ALARM_WATERMARK: &str = "0";
/// RabbitMQ's default relative watermark.
const NORMAL_WATERMARK: &str = "0.4";

/// A private RabbitMQ node. Dropping it kills the node and removes its directory.
pub struct PrivateBroker {
    node: String,
    amqp_port: u16,
    dist_port: u16,
    dir: PathBuf,
    /// Who the node and `rabbitmqctl` run as; `None`: as this process's user.
    user: Option<NodeUser>,
    /// The foreground `rabbitmq-server` of the current run, leader of its own process group.
    server: Mutex<Option<Child>>,
}

#[derive(Clone, Debug)]
struct NodeUser {
    uid: u32,
    gid: u32,
    home: PathBuf,
}

impl PrivateBroker {
    /// Starts a fresh node on free ports and waits until it accepts AMQP connections.
    pub async fn start() -> Result<PrivateBroker> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let short_name = format!("notifytest-{}", &id[..8]);
        let (amqp_port, dist_port) = free_port_pair()?;
        let broker = PrivateBroker {
            node: format!("{short_name}@localhost"),
            amqp_port,
            dist_port,
            dir: std::env::temp_dir().join(&short_name),
            user: node_user()?,
            server: Mutex::new(None),
        };
        // From here on a failure drops `broker`, which removes whatever was made.
        broker.prepare_dir()?;
        broker.launch().await?;
        Ok(broker)
    }

    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f` (guest may log in from loopback only: fine).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// The Erlang node name, e.g. `notifytest-1a2b3c4d@localhost`.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// Graceful stop (`rabbitmqctl shutdown`); returns once the AMQP port refuses connections.
    pub async fn stop(&self) -> Result<()> {
        // `shutdown` itself waits until the node's OS process has exited.
        self.ctl(&["shutdown"]).await?;
        self.reap_server().await?;
        self.wait_port_closed().await
    }

    /// Crash: SIGKILL to the node's Erlang VM, no chance to close connections or flush
    /// anything; returns once the AMQP port refuses connections.
    pub async fn kill(&self) -> Result<()> {
        let pid = self.node_os_pid()?;
        kill(pid, Signal::SIGKILL).with_context(|| format!("kill -9 {pid} ({})", self.node))?;
        self.reap_server().await?;
        self.wait_port_closed().await
    }

    /// Starts the node again with the same name, ports and data (queues and persistent messages
    /// survive) and waits for AMQP. A node still running is stopped gracefully first.
    pub async fn restart(&self) -> Result<()> {
        if self.server_running()? {
            self.stop().await?;
        }
        self.launch().await
    }

    /// Raises (`true`) or clears (`false`) the node's memory alarm: while it is on, the broker
    /// blocks every publishing connection.
    pub async fn set_memory_alarm(&self, on: bool) -> Result<()> {
        let watermark = if on { ALARM_WATERMARK } else { NORMAL_WATERMARK };
        self.ctl(&["set_vm_memory_high_watermark", watermark]).await.map(drop)
    }

    fn prepare_dir(&self) -> Result<()> {
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

    fn node_env(&self) -> Vec<(&'static str, String)> {
        let path = |name: &str| self.dir.join(name).display().to_string();
        vec![
            ("RABBITMQ_NODENAME", self.node.clone()),
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

    /// Spawns `rabbitmq-server` in the foreground and waits until AMQP connections succeed.
    async fn launch(&self) -> Result<()> {
        let out_path = self.dir.join("server.out");
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)
            .with_context(|| format!("opening {}", out_path.display()))?;
        let mut cmd = self.rabbitmq_command("rabbitmq-server");
        cmd.envs(self.node_env())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Its own process group: Drop can kill the script, the VM and its port programs
            // in one go without knowing their pids, and nothing outside it.
            .process_group(0);
        let child = cmd.spawn().with_context(|| format!("spawning rabbitmq-server for {}", self.node))?;
        *self.lock_server() = Some(child);
        self.wait_for_amqp().await
    }

    async fn wait_for_amqp(&self) -> Result<()> {
        let url = self.url();
        let ready = poll(START_TIMEOUT, START_POLL_INTERVAL, async || {
            if let Ok(Some(status)) = self.server_exit_status() {
                // Stop polling: the outcome is known.
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
                "not accepting AMQP on 127.0.0.1:{} after {START_TIMEOUT:?} (last error: {})",
                self.amqp_port,
                last.unwrap_or_default()
            ),
        };
        Err(failure.context(format!(
            "private RabbitMQ node {} did not start; its output:\n{}",
            self.node,
            self.output_tail()
        )))
    }

    /// Waits for the foreground server process (the shell whose VM just exited) and forgets it.
    async fn reap_server(&self) -> Result<()> {
        let Some(mut child) = self.lock_server().take() else {
            return Ok(());
        };
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(status) => status.map(drop).context("waiting for rabbitmq-server"),
            Err(_) => {
                // Keep it, so that Drop still kills its process group.
                *self.lock_server() = Some(child);
                bail!("rabbitmq-server of {} still running {STOP_TIMEOUT:?} after its node stopped", self.node)
            }
        }
    }

    async fn wait_port_closed(&self) -> Result<()> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.amqp_port));
        let closed =
            poll(STOP_TIMEOUT, PORT_POLL_INTERVAL, async || match tokio::net::TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
                Err(e) => Err(e.to_string()),
                Ok(_) => Err("still accepting connections".to_string()),
            })
            .await;
        closed.map_err(|last| {
            anyhow!("port {addr} of {} did not close within {STOP_TIMEOUT:?}: {}", self.node, last.unwrap_or_default())
        })
    }

    /// The Erlang VM's OS pid, from the pid file the node writes at boot, checked against
    /// /proc so that a stale file can never make us signal another process.
    fn node_os_pid(&self) -> Result<Pid> {
        let pid_file = self.dir.join("rabbitmq.pid");
        let text = fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {} (is the node running?)", pid_file.display()))?;
        let pid: i32 =
            text.trim().parse().with_context(|| format!("pid file {} holds `{}`", pid_file.display(), text.trim()))?;
        if !pids_of_node(&self.node).contains(&pid) {
            bail!("pid {pid} from {} is not a running {}", pid_file.display(), self.node);
        }
        Ok(Pid::from_raw(pid))
    }

    /// Runs `rabbitmqctl -n <this node> ARGS` (e.g. to add a user with a password).
    pub async fn rabbitmqctl(&self, args: &[&str]) -> Result<String> {
        self.ctl(args).await
    }

    async fn ctl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.rabbitmq_command("rabbitmqctl");
        cmd.arg("-n").arg(&self.node).args(args);
        let shown = format!("rabbitmqctl -n {} {}", self.node, args.join(" "));
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
            .stdin(Stdio::null())
            .kill_on_drop(true);
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

    fn server_exit_status(&self) -> Result<Option<ExitStatus>> {
        match self.lock_server().as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => Ok(None),
        }
    }

    fn server_running(&self) -> Result<bool> {
        match self.lock_server().as_mut() {
            Some(child) => Ok(child.try_wait()?.is_none()),
            None => Ok(false),
        }
    }

    fn lock_server(&self) -> MutexGuard<'_, Option<Child>> {
        // Only ever held briefly and never across an await; a panic while holding it leaves a
        // valid `Option<Child>`.
        self.server.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last lines of the server's output and of the node's log, to explain a failed start.
    fn output_tail(&self) -> String {
        let tail = |path: PathBuf| {
            let text = fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(20);
            format!("== {} ==\n{}", path.display(), lines[start..].join("\n"))
        };
        format!(
            "{}\n{}",
            tail(self.dir.join("server.out")),
            tail(self.dir.join("log").join(format!("{}.log", self.node)))
        )
    }
}

impl Drop for PrivateBroker {
    /// Best effort, and only this node's processes: any process whose environment names this
    /// node (its VM and launcher, also one left over from an earlier start of this handle) and
    /// the process group of the server it started. Then the data directory goes.
    fn drop(&mut self) {
        let server = self.server.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut server = server.take();
        let mut doomed = pids_of_node(&self.node);
        for pid in &doomed {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        if let Some(pid) = server.as_ref().and_then(Child::id) {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            doomed.push(pid as i32);
        }
        wait_until_gone(&doomed, server.as_mut(), Duration::from_secs(5));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Two distinct free loopback ports (AMQP, distribution), bound at once so they differ and
/// released for the node to take. Ports the shared node and the CLI use are never picked.
fn free_port_pair() -> Result<(u16, u16)> {
    let reserved = |port: u16| matches!(port, 4369 | 5672 | 15672 | 25672 | 35672..=35682);
    for _ in 0..50 {
        let amqp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let dist = std::net::TcpListener::bind("127.0.0.1:0")?;
        let ports = (amqp.local_addr()?.port(), dist.local_addr()?.port());
        if !reserved(ports.0) && !reserved(ports.1) {
            return Ok(ports);
        }
    }
    bail!("found no free port pair outside RabbitMQ's well-known ports")
}

/// As root, the node must run as `rabbitmq` (the user whose cookie `rabbitmqctl` uses and who
/// owns RabbitMQ's installation files); otherwise it runs as the current user.
fn node_user() -> Result<Option<NodeUser>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let user = User::from_name("rabbitmq")
        .context("looking up the rabbitmq user")?
        .context("running as root, but there is no `rabbitmq` user to run the node as")?;
    Ok(Some(NodeUser { uid: user.uid.as_raw(), gid: user.gid.as_raw(), home: user.dir }))
}

/// Processes whose environment carries `RABBITMQ_NODENAME=<node>`: the node's VM and its
/// launcher. The VM's command line does not name the node, its environment does; the shared
/// node's never holds a `notifytest-…` name.
fn pids_of_node(node: &str) -> Vec<i32> {
    let wanted = format!("RABBITMQ_NODENAME={node}");
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // Unreadable (another user's, or gone meanwhile) means not ours.
            fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|var| var == wanted.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

/// Waits (bounded; Drop cannot await) until none of `pids` runs any more, reaping our own
/// `server` child on the way so it does not linger as a zombie of the test process. Other
/// zombies count as gone: their parent reaps them.
fn wait_until_gone(pids: &[i32], mut server: Option<&mut Child>, timeout: Duration) {
    let interval = Duration::from_millis(10);
    let rounds = timeout.as_millis() / interval.as_millis();
    for _ in 0..rounds {
        if let Some(child) = server.as_mut() {
            let _ = child.try_wait();
        }
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
