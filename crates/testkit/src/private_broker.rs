//! A RabbitMQ node of a test's own, for fault tests: stop it, crash it, raise its memory alarm.
//! The machine's shared node (`rabbit@localhost`, port 5672) is never touched: this node has
//! its own name, ports, data directory and configuration, and cleanup only kills processes
//! that carry this node's unique name or belong to the process group it started.
//!
//! Recipe and traps (RabbitMQ 3.10, Debian package): crates/testkit/README.md, "Private RabbitMQ
//! nodes"; the parts shared with [`crate::private_cluster`] live in `node.rs`.
//! - The node runs as the `rabbitmq` user when the tests run as root, as the Debian wrappers
//!   would do; that user's home holds the Erlang cookie, so `rabbitmqctl` (run the same way)
//!   can talk to the node, and every directory the node writes is chowned to it.
//! - The node gets its own `rabbitmq.conf` and `rabbitmq-env.conf`: the machine's files set the
//!   shared node's listener (127.0.0.1:5672) and node name, which would clash.
//! - `rabbitmq-server` in the foreground keeps a shell as parent of the Erlang VM (it turns
//!   SIGTERM into a clean stop), so the VM's OS pid comes from the pid file, not the child.

use crate::node::{self, NodeSpec, NORMAL_WATERMARK, STOP_TIMEOUT};
use anyhow::{bail, Context, Result};
use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};
use std::{
    process::ExitStatus,
    sync::{Mutex, MutexGuard},
    time::Duration,
};
use tokio::process::Child;

/// Boot takes ~11 s on these machines; leave room for a loaded CI box.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// A memory watermark of 0 puts any node over it: the alarm goes off at once.
const ALARM_WATERMARK: &str = "0";

/// A private RabbitMQ node. Dropping it kills the node and removes its directory.
pub struct PrivateBroker {
    spec: NodeSpec,
    /// The foreground `rabbitmq-server` of the current run, leader of its own process group.
    server: Mutex<Option<Child>>,
}

impl PrivateBroker {
    /// Starts a fresh node on free ports and waits until it accepts AMQP connections.
    pub async fn start() -> Result<PrivateBroker> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let short_name = format!("notifytest-{}", &id[..8]);
        let ports = node::free_ports(2)?;
        let broker = PrivateBroker {
            spec: NodeSpec {
                name: format!("{short_name}@localhost"),
                amqp_port: ports[0],
                dist_port: ports[1],
                dir: std::env::temp_dir().join(&short_name),
                user: node::node_user()?,
            },
            server: Mutex::new(None),
        };
        // From here on a failure drops `broker`, which removes whatever was made.
        broker.spec.prepare_dir()?;
        broker.launch().await?;
        Ok(broker)
    }

    pub fn amqp_port(&self) -> u16 {
        self.spec.amqp_port
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f` (guest may log in from loopback only: fine).
    pub fn url(&self) -> String {
        self.spec.url("/")
    }

    /// The Erlang node name, e.g. `notifytest-1a2b3c4d@localhost`.
    pub fn node_name(&self) -> &str {
        &self.spec.name
    }

    /// Graceful stop (`rabbitmqctl shutdown`); returns once the AMQP port refuses connections.
    pub async fn stop(&self) -> Result<()> {
        // `shutdown` itself waits until the node's OS process has exited.
        self.ctl(&["shutdown"]).await?;
        self.reap_server().await?;
        self.spec.wait_port_closed().await
    }

    /// Crash: SIGKILL to the node's Erlang VM, no chance to close connections or flush
    /// anything; returns once the AMQP port refuses connections.
    pub async fn kill(&self) -> Result<()> {
        self.spec.kill_vm()?;
        self.reap_server().await?;
        self.spec.wait_port_closed().await
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

    /// Spawns `rabbitmq-server` in the foreground and waits until AMQP connections succeed.
    async fn launch(&self) -> Result<()> {
        let mut cmd = tokio::process::Command::from(self.spec.server_command()?);
        cmd.kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("spawning rabbitmq-server for {}", self.spec.name))?;
        *self.lock_server() = Some(child);
        self.spec.wait_for_amqp(START_TIMEOUT, || self.server_exit_status().ok().flatten()).await
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
                bail!("rabbitmq-server of {} still running {STOP_TIMEOUT:?} after its node stopped", self.spec.name)
            }
        }
    }

    /// Runs `rabbitmqctl -n <this node> ARGS` (e.g. to add a user with a password).
    pub async fn rabbitmqctl(&self, args: &[&str]) -> Result<String> {
        self.ctl(args).await
    }

    async fn ctl(&self, args: &[&str]) -> Result<String> {
        self.spec.cli("rabbitmqctl", args).await
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
}

impl Drop for PrivateBroker {
    /// Best effort, and only this node's processes: any process whose environment names this
    /// node (its VM and launcher, also one left over from an earlier start of this handle) and
    /// the process group of the server it started. Then the data directory goes.
    fn drop(&mut self) {
        let server = self.server.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut server = server.take();
        let mut doomed = node::pids_of_nodes(|name| name == self.spec.name);
        node::kill_all(&doomed);
        if let Some(pid) = server.as_ref().and_then(Child::id) {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            doomed.push(pid as i32);
        }
        node::wait_until_gone(
            &doomed,
            || {
                if let Some(child) = server.as_mut() {
                    let _ = child.try_wait();
                }
            },
            Duration::from_secs(5),
        );
        let _ = std::fs::remove_dir_all(&self.spec.dir);
    }
}
