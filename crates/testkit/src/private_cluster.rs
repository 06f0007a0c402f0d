//! A private RabbitMQ cluster on this machine, for failover tests: `n` nodes of the test's own
//! (name `ntc<random>-<i>@localhost`, own AMQP and inter-node ports, own data directory and
//! configuration), joined into one cluster. The machine's shared node (`rabbit@localhost`,
//! port 5672) is never touched; epmd is shared, as RabbitMQ intends.
//!
//! Recipe, traps and measured timings: crates/testkit/README.md. In short:
//! - Nodes start in parallel, then nodes `1..n` join node 0 (`stop_app`, `join_cluster`,
//!   `start_app`, also in parallel), then we wait until `cluster_status` lists every node as
//!   running. 3 nodes on 2 busy cores: 17–24 s in all (49 s one node after the other).
//! - That is too slow to do per test: [`PrivateCluster::shared`] starts one cluster per test
//!   binary. Tests that kill or stop nodes (or need all of them up) take
//!   [`PrivateCluster::lock`] so that they do not crash each other's nodes; the lock first
//!   restarts any node a failed test left down.
//! - Node `i` is index `i` everywhere: `amqp_url(i)`, `node_name(i)` (`…-i@localhost`),
//!   `kill(i)`. Node 0 is the one the others joined; after that no node is special.
//!
//! Cleanup, also for the shared cluster (a static is never dropped):
//! - Drop (and a panic while starting) kills every process whose environment carries
//!   `RABBITMQ_NODENAME=ntc<random>-…` (the nodes' VMs, launchers and port programs) and the
//!   process groups of the servers, waits for them (bounded) and removes the directory.
//! - The shared cluster does the same from a libc `atexit` handler, which runs when the test
//!   binary ends normally or through `std::process::exit` (libtest's way of failing).
//! - For every other end (SIGKILL, Ctrl-C, abort), each cluster starts a watchdog first: a
//!   `/bin/sh` in its own process group that blocks reading a pipe only this process holds the
//!   write end of. When this process dies, however it dies, the kernel closes that end, the
//!   watchdog reads end-of-file and kills and removes the same things. (`PR_SET_PDEATHSIG` would
//!   not do: it fires when the spawning *thread* ends, and the Erlang VM is a grandchild.)
//! - Server processes are std children, not tokio ones: they outlive any single test's runtime.

use crate::node::{self, NodeSpec, NodeUser, STOP_TIMEOUT};
use anyhow::{anyhow, bail, Context, Result};
use futures_util::future::try_join_all;
use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};
use std::{
    fs,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{Mutex, MutexGuard, Once},
    time::{Duration, Instant},
};

/// Nodes of [`PrivateCluster::shared`]: the smallest cluster that survives losing one.
pub const SHARED_SIZE: usize = 3;
/// First boot of all nodes at once; 12.5–16.3 s measured for 3 nodes on 2 busy cores.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// A single node starting again (~6–11 s measured).
const RESTART_TIMEOUT: Duration = Duration::from_secs(120);
/// Until `cluster_status` lists the nodes we expect as running.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(90);
const MEMBERSHIP_POLL_INTERVAL: Duration = Duration::from_millis(500);
const JOIN_ATTEMPTS: usize = 3;
/// How long Drop and the exit handler wait for killed processes.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);
const REAP_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Runs as `sh -c WATCHDOG sh PREFIX DIR`; see the module docs.
const WATCHDOG: &str = r#"
trap '' HUP INT
prefix="RABBITMQ_NODENAME=$1"
while read -r _; do :; done
for round in 1 2 3 4 5; do
  found=
  for env in /proc/[0-9]*/environ; do
    grep -qzF "$prefix" "$env" 2>/dev/null || continue
    pid=${env#/proc/}; pid=${pid%/environ}
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = epmd ] && continue
    kill -9 "$pid" 2>/dev/null && found=1
  done
  [ -z "$found" ] && break
  sleep 0.2
done
rm -rf -- "$2"
"#;

/// How long [`PrivateCluster::start`] took.
#[derive(Clone, Copy, Debug)]
pub struct StartTimings {
    /// From spawning the nodes until all of them accepted AMQP connections.
    pub boot: Duration,
    /// From then until `cluster_status` listed all of them as running members.
    pub join: Duration,
}

/// A quorum queue as `rabbitmqctl list_queues` sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumQueue {
    /// Node of the current Raft leader; `None` while none is known.
    pub leader: Option<String>,
    /// Nodes holding a member (replica).
    pub members: Vec<String>,
    /// Members currently running.
    pub online: Vec<String>,
}

/// A private RabbitMQ cluster. Dropping it kills its nodes and removes their directories.
pub struct PrivateCluster {
    /// `ntc<8 hex>`: the prefix of every node name, and the directory's name.
    id: String,
    dir: PathBuf,
    nodes: Vec<ClusterNode>,
    timings: StartTimings,
    /// Taken by tests that stop or kill nodes; see [`PrivateCluster::lock`].
    exclusive: tokio::sync::Mutex<()>,
    watchdog: Mutex<Option<(Child, ChildStdin)>>,
}

struct ClusterNode {
    spec: NodeSpec,
    /// The foreground `rabbitmq-server` of the node's current run.
    server: Mutex<Option<Child>>,
}

static SHARED: tokio::sync::OnceCell<std::result::Result<PrivateCluster, String>> = tokio::sync::OnceCell::const_new();
static EXIT_HANDLER: Once = Once::new();

impl PrivateCluster {
    /// Starts `n` fresh nodes (at once), joins nodes `1..n` to node 0 and waits until
    /// `cluster_status` lists all of them as running. Bounded: a few minutes at worst.
    pub async fn start(n: usize) -> Result<PrivateCluster> {
        if n == 0 {
            bail!("a cluster needs at least one node");
        }
        let random = uuid::Uuid::new_v4().simple().to_string();
        let id = format!("ntc{}", &random[..8]);
        let dir = std::env::temp_dir().join(&id);
        let user = node::node_user()?;
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // The watchdog comes first: from here on, nothing outlives this process.
        let watchdog = match spawn_watchdog(&id, &dir) {
            Ok(watchdog) => watchdog,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let ports = node::free_ports(2 * n)?;
        let nodes = (0..n)
            .map(|i| ClusterNode {
                spec: NodeSpec {
                    name: format!("{id}-{i}@localhost"),
                    amqp_port: ports[2 * i],
                    dist_port: ports[2 * i + 1],
                    dir: dir.join(format!("node-{i}")),
                    user: user.clone(),
                },
                server: Mutex::new(None),
            })
            .collect();
        let mut cluster = PrivateCluster {
            id,
            dir,
            nodes,
            timings: StartTimings { boot: Duration::ZERO, join: Duration::ZERO },
            exclusive: tokio::sync::Mutex::new(()),
            watchdog: Mutex::new(Some(watchdog)),
        };
        // From here on a failure drops `cluster`, which kills and removes whatever was made.
        cluster.chown_dir(user.as_ref())?;
        let started = Instant::now();
        for node in &cluster.nodes {
            node.spec.prepare_dir()?;
            cluster.spawn_server(node)?;
        }
        try_join_all(cluster.nodes.iter().map(|node| cluster.wait_for_amqp(node, BOOT_TIMEOUT))).await?;
        cluster.timings.boot = started.elapsed();

        let joining = Instant::now();
        try_join_all((1..n).map(|i| cluster.join(i))).await?;
        cluster.wait_until_running(&cluster.node_names()).await?;
        cluster.timings.join = joining.elapsed();
        Ok(cluster)
    }

    /// The cluster of this test binary ([`SHARED_SIZE`] nodes), started by the first caller and
    /// reused by every test of the binary (each test may run on its own runtime). Torn down
    /// when the process exits, see the module docs. If starting failed, every caller gets that
    /// failure (it is not retried).
    ///
    /// Tests isolate their queues in a vhost of their own ([`PrivateCluster::add_vhost`]).
    /// Tests that stop or kill nodes, or need every node up while they run, hold
    /// [`PrivateCluster::lock`].
    pub async fn shared() -> Result<&'static PrivateCluster> {
        let started = SHARED
            .get_or_init(|| async {
                EXIT_HANDLER.call_once(|| {
                    // SAFETY: atexit(3) of the C library std links anyway; it registers a plain
                    // `extern "C" fn` and has no other preconditions.
                    let registered = unsafe { atexit(cleanup_shared_at_exit) };
                    // Without it the watchdog still cleans up, just after the process is gone.
                    debug_assert_eq!(registered, 0, "atexit failed");
                });
                PrivateCluster::start(SHARED_SIZE).await.map_err(|e| format!("{e:#}"))
            })
            .await;
        started.as_ref().map_err(|e| anyhow!("the shared private RabbitMQ cluster did not start: {e}"))
    }

    /// Exclusive use of the cluster for a test that stops or kills nodes, until the guard is
    /// dropped (also by a panic). Before returning it restarts any node that is down (a test
    /// that failed half-way) and waits until all nodes are running members again.
    pub async fn lock(&self) -> Result<tokio::sync::MutexGuard<'_, ()>> {
        let guard = self.exclusive.lock().await;
        self.heal().await?;
        Ok(guard)
    }

    /// Restarts every node whose server is not running and waits until all are members again.
    pub async fn heal(&self) -> Result<()> {
        let down: Vec<usize> = (0..self.size()).filter(|i| !self.is_up(*i)).collect();
        try_join_all(down.into_iter().map(|i| self.launch(i))).await?;
        self.wait_until_running(&self.node_names()).await
    }

    /// How long the start took (boot, join).
    pub fn start_timings(&self) -> StartTimings {
        self.timings
    }

    /// Number of nodes.
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f` of node `i` (guest logs in from loopback only).
    ///
    /// # Panics
    /// If there is no node `i` (here and in every method taking a node index).
    pub fn amqp_url(&self, i: usize) -> String {
        self.node(i).spec.url("/")
    }

    /// [`PrivateCluster::amqp_url`] of every node, in node order.
    pub fn amqp_urls(&self) -> Vec<String> {
        (0..self.size()).map(|i| self.amqp_url(i)).collect()
    }

    /// Node `i`'s URL for `vhost` (percent-encoded), e.g. `amqp://guest:guest@127.0.0.1:PORT/t-x`.
    pub fn vhost_url(&self, i: usize, vhost: &str) -> String {
        self.node(i).spec.url(vhost)
    }

    /// All nodes' URLs, comma-separated: a `RABBITMQ_URL` for the whole cluster, default vhost.
    pub fn rabbitmq_url_list(&self) -> String {
        self.amqp_urls().join(",")
    }

    /// All nodes' URLs for `vhost`, comma-separated.
    pub fn vhost_url_list(&self, vhost: &str) -> String {
        (0..self.size()).map(|i| self.vhost_url(i, vhost)).collect::<Vec<_>>().join(",")
    }

    pub fn amqp_port(&self, i: usize) -> u16 {
        self.node(i).spec.amqp_port
    }

    /// Node `i`'s Erlang name, `ntc<random>-<i>@localhost`.
    pub fn node_name(&self, i: usize) -> &str {
        &self.node(i).spec.name
    }

    /// Every node's name, in node order.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.spec.name.clone()).collect()
    }

    /// The index of the node called `name`.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.spec.name == name)
    }

    /// Whether node `i`'s server process is running (as far as this handle knows: it started
    /// it and has not seen it exit).
    pub fn is_up(&self, i: usize) -> bool {
        lock(&self.node(i).server).as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Crash: SIGKILL to node `i`'s Erlang VM; returns once its AMQP port refuses connections.
    /// The other nodes notice at once (the inter-node connection breaks).
    pub async fn kill(&self, i: usize) -> Result<()> {
        let node = self.node(i);
        node.spec.kill_vm()?;
        self.reap_server(node).await?;
        node.spec.wait_port_closed().await
    }

    /// Graceful stop of node `i` (`rabbitmqctl shutdown`); returns once its port refuses
    /// connections. It stays a member of the cluster.
    pub async fn stop(&self, i: usize) -> Result<()> {
        let node = self.node(i);
        node.spec.cli("rabbitmqctl", &["shutdown"]).await?;
        self.reap_server(node).await?;
        node.spec.wait_port_closed().await
    }

    /// Starts node `i` again with its name, ports and data; it rejoins the cluster by itself.
    /// Returns once `cluster_status` lists it as running. A node still running is stopped
    /// gracefully first.
    pub async fn restart(&self, i: usize) -> Result<()> {
        if self.is_up(i) {
            self.stop(i).await?;
        }
        self.launch(i).await?;
        self.wait_until_running(&[self.node_name(i).to_string()]).await
    }

    /// Runs `rabbitmqctl -n <node i> ARGS`; its standard output.
    pub async fn rabbitmqctl(&self, i: usize, args: &[&str]) -> Result<String> {
        self.node(i).spec.cli("rabbitmqctl", args).await
    }

    /// Runs `rabbitmq-queues -n <node i> ARGS`; its standard output.
    pub async fn rabbitmq_queues(&self, i: usize, args: &[&str]) -> Result<String> {
        self.node(i).spec.cli("rabbitmq-queues", args).await
    }

    /// Runs `rabbitmqctl ARGS` against the first node that answers (nodes that are up first).
    pub async fn rabbitmqctl_any(&self, args: &[&str]) -> Result<String> {
        let (mut order, down): (Vec<usize>, Vec<usize>) = (0..self.size()).partition(|i| self.is_up(*i));
        order.extend(down);
        let mut failures = Vec::new();
        for i in order {
            match self.rabbitmqctl(i, args).await {
                Ok(out) => return Ok(out),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        bail!("no node answered `rabbitmqctl {}`:\n{}", args.join(" "), failures.join("\n"))
    }

    /// The nodes `cluster_status` lists as running (asked of any node that answers).
    pub async fn running_nodes(&self) -> Result<Vec<String>> {
        let out = self.rabbitmqctl_any(&["cluster_status", "--formatter", "json"]).await?;
        let status: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("cluster_status is not JSON: {out}"))?;
        Ok(strings(&status["running_nodes"]))
    }

    /// Waits (bounded) until `cluster_status` lists each of `names` as running.
    pub async fn wait_until_running(&self, names: &[String]) -> Result<()> {
        let deadline = Instant::now() + MEMBERSHIP_TIMEOUT;
        loop {
            let seen = self.running_nodes().await;
            if let Ok(running) = &seen {
                if names.iter().all(|name| running.contains(name)) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                let seen = match seen {
                    Ok(running) => format!("running: {running:?}"),
                    Err(e) => format!("{e:#}"),
                };
                bail!("{names:?} not all running cluster members after {MEMBERSHIP_TIMEOUT:?}; last seen {seen}");
            }
            tokio::time::sleep(MEMBERSHIP_POLL_INTERVAL).await;
        }
    }

    /// Leader, members and online members of quorum queue `queue` in `vhost`
    /// (`rabbitmqctl list_queues`, asked of any node that answers).
    pub async fn quorum_queue(&self, vhost: &str, queue: &str) -> Result<QuorumQueue> {
        let args = [
            "list_queues",
            "-p",
            vhost,
            "--timeout",
            "15",
            "name",
            "type",
            "leader",
            "members",
            "online",
            "--formatter",
            "json",
        ];
        let out = self.rabbitmqctl_any(&args).await?;
        let rows: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("list_queues is not JSON: {out}"))?;
        let row = rows
            .as_array()
            .and_then(|rows| rows.iter().find(|row| row["name"] == queue))
            .with_context(|| format!("no queue `{queue}` in vhost `{vhost}`: {out}"))?;
        if row["type"] != "quorum" {
            bail!("queue `{queue}` in vhost `{vhost}` is not a quorum queue: {row}");
        }
        let leader = row["leader"].as_str().filter(|name| name.contains('@')).map(str::to_string);
        Ok(QuorumQueue { leader, members: strings(&row["members"]), online: strings(&row["online"]) })
    }

    /// The node of quorum queue `queue`'s leader.
    pub async fn quorum_leader(&self, vhost: &str, queue: &str) -> Result<String> {
        self.quorum_queue(vhost, queue)
            .await?
            .leader
            .with_context(|| format!("quorum queue `{queue}` in vhost `{vhost}` has no leader"))
    }

    /// Creates `vhost` and gives `guest` all permissions in it. A test that works in a vhost of
    /// its own (e.g. named by [`crate::rabbit::unique_prefix`]) shares the cluster safely.
    pub async fn add_vhost(&self, vhost: &str) -> Result<()> {
        self.rabbitmqctl_any(&["add_vhost", vhost]).await?;
        self.rabbitmqctl_any(&["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"]).await.map(drop)
    }

    /// Deletes `vhost` with everything in it.
    pub async fn delete_vhost(&self, vhost: &str) -> Result<()> {
        self.rabbitmqctl_any(&["delete_vhost", vhost]).await.map(drop)
    }

    fn node(&self, i: usize) -> &ClusterNode {
        self.nodes.get(i).unwrap_or_else(|| panic!("no node {i}: the cluster has {} nodes", self.nodes.len()))
    }

    fn chown_dir(&self, user: Option<&NodeUser>) -> Result<()> {
        if let Some(user) = user {
            std::os::unix::fs::chown(&self.dir, Some(user.uid), Some(user.gid))
                .with_context(|| format!("chown {}", self.dir.display()))?;
        }
        Ok(())
    }

    fn spawn_server(&self, node: &ClusterNode) -> Result<()> {
        let child = node
            .spec
            .server_command()?
            .spawn()
            .with_context(|| format!("spawning rabbitmq-server for {}", node.spec.name))?;
        *lock(&node.server) = Some(child);
        Ok(())
    }

    async fn wait_for_amqp(&self, node: &ClusterNode, timeout: Duration) -> Result<()> {
        node.spec.wait_for_amqp(timeout, || exit_status(&node.server)).await
    }

    /// Spawns node `i`'s server again and waits for AMQP (not for membership).
    async fn launch(&self, i: usize) -> Result<()> {
        let node = self.node(i);
        self.spawn_server(node)?;
        self.wait_for_amqp(node, RESTART_TIMEOUT).await
    }

    /// Node `i` joins node 0: `stop_app`, `join_cluster`, `start_app`. Joins of several nodes
    /// may run at once (checked on 3.10.8); a failed join is retried.
    async fn join(&self, i: usize) -> Result<()> {
        let seed = self.node_name(0).to_string();
        self.rabbitmqctl(i, &["stop_app"]).await?;
        let mut attempt = 1;
        loop {
            match self.rabbitmqctl(i, &["join_cluster", &seed]).await {
                Ok(_) => break,
                Err(e) if attempt < JOIN_ATTEMPTS => {
                    eprintln!(
                        "private cluster: {} joining {seed} failed (attempt {attempt}), retrying: {e:#}",
                        self.node_name(i)
                    );
                    attempt += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
        self.rabbitmqctl(i, &["start_app"]).await?;
        self.wait_for_amqp(self.node(i), RESTART_TIMEOUT).await
    }

    /// Waits (bounded) for the server process whose VM just exited, and forgets it.
    async fn reap_server(&self, node: &ClusterNode) -> Result<()> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            {
                let mut server = lock(&node.server);
                match server.as_mut().map(Child::try_wait) {
                    None | Some(Ok(Some(_))) => {
                        *server = None;
                        return Ok(());
                    }
                    Some(Ok(None)) => {}
                    Some(Err(e)) => return Err(e).context("waiting for rabbitmq-server"),
                }
            }
            if Instant::now() >= deadline {
                // Keep it, so that cleanup still kills its process group.
                bail!("rabbitmq-server of {} still running {STOP_TIMEOUT:?} after its node stopped", node.spec.name);
            }
            tokio::time::sleep(REAP_POLL_INTERVAL).await;
        }
    }

    /// Kills every process of this cluster's nodes, waits for them (bounded) and removes the
    /// directory. Synchronous and idempotent: Drop and the exit handler call it. Never blocks
    /// on a lock another thread holds (at exit that thread may never run again).
    fn cleanup(&self) {
        let prefix = format!("{}-", self.id);
        let ours = |name: &str| name.starts_with(&prefix);
        let mut doomed = node::pids_of_nodes(ours);
        node::kill_all(&doomed);
        for node in &self.nodes {
            if let Some(pid) = try_lock(&node.server).and_then(|server| server.as_ref().map(Child::id)) {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                doomed.push(pid as i32);
            }
        }
        let reap = || {
            for node in &self.nodes {
                if let Some(mut server) = try_lock(&node.server) {
                    if let Some(child) = server.as_mut() {
                        let _ = child.try_wait();
                    }
                }
            }
        };
        node::wait_until_gone(&doomed, reap, CLEANUP_TIMEOUT);
        // A port program forked while we were killing.
        let stragglers = node::pids_of_nodes(ours);
        node::kill_all(&stragglers);
        node::wait_until_gone(&stragglers, reap, CLEANUP_TIMEOUT);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        self.cleanup();
        // Closing the pipe wakes the watchdog; it finds nothing left and exits.
        let watchdog = self.watchdog.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((mut child, stdin)) = watchdog {
            drop(stdin);
            let pid = child.id() as i32;
            node::wait_until_gone(
                &[pid],
                || {
                    let _ = child.try_wait();
                },
                CLEANUP_TIMEOUT,
            );
        }
    }
}

extern "C" {
    /// atexit(3), declared here rather than pulling in the `libc` crate for one function.
    fn atexit(callback: extern "C" fn()) -> std::ffi::c_int;
}

extern "C" fn cleanup_shared_at_exit() {
    // Unwinding out of an `extern "C"` function aborts: contain any panic.
    let _ = std::panic::catch_unwind(|| {
        if let Some(Ok(cluster)) = SHARED.get() {
            cluster.cleanup();
        }
    });
}

/// The watchdog (see the module docs) and the write end of its pipe.
fn spawn_watchdog(id: &str, dir: &std::path::Path) -> Result<(Child, ChildStdin)> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(WATCHDOG)
        .arg("sh")
        .arg(format!("{id}-"))
        .arg(dir)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Out of the terminal's foreground group: a Ctrl-C to `cargo test` does not reach it.
        .process_group(0);
    let mut child = cmd.spawn().context("spawning the private cluster's watchdog (/bin/sh)")?;
    let stdin = child.stdin.take().context("watchdog without a stdin pipe")?;
    Ok((child, stdin))
}

fn exit_status(server: &Mutex<Option<Child>>) -> Option<ExitStatus> {
    lock(server).as_mut().and_then(|child| child.try_wait().ok().flatten())
}

fn lock(server: &Mutex<Option<Child>>) -> MutexGuard<'_, Option<Child>> {
    // Only ever held briefly and never across an await; a panic while holding it leaves a valid
    // `Option<Child>`.
    server.lock().unwrap_or_else(|e| e.into_inner())
}

fn try_lock(server: &Mutex<Option<Child>>) -> Option<MutexGuard<'_, Option<Child>>> {
    match server.try_lock() {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}
