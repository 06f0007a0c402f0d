//! Publishing to RabbitMQ from many concurrent requests.
//!
//! A small pool of confirm-mode channels on one connection is shared by every request; each
//! request publishes and awaits only its own confirm, so confirms are pipelined instead of one
//! request at a time per channel. A supervisor task keeps the connection up: after broker loss
//! it tries the other nodes of `RABBITMQ_URL` at once ([`Failover`]), then backs off, and
//! redeclares the topology.
//!
//! A connection can stay open while every publish on it fails: after a node of a cluster died,
//! a connection (or a load balancer's connection) can keep getting nacks or confirm timeouts
//! although a fresh connection would succeed. So publishes count their failures in a row:
//! [`FAILING_AFTER`] of them make the API unready, [`REPLACE_AFTER`] replace the connection, and
//! while failing the supervisor probes the broker (a confirmed publish to the probe queue), so
//! readiness comes back without waiting for a client to try.
//!
//! A nack also replaces the channel that got it, at once. Why (RabbitMQ 3.10.8, read from its
//! `rabbit_quorum_queue` and `rabbit_fifo_client`): a channel's first publish to a quorum queue
//! asks the node the queue's record names as leader to register it; if that node is down the
//! publish is nacked and the channel stays unregistered, so every later publish on it asks the
//! dead node again and is nacked, until that node returns (`update/2` never refreshes the
//! channel's view). A connection made in the ~0.1–0.5 s between a leader's node dying and the
//! new leader updating the record gets such channels. When only some channels of the pool are
//! stuck (their first publishes came before the update, the others' after), the successes in
//! between keep the failure count from ever reaching [`REPLACE_AFTER`]: measured at 40 POST/s,
//! one or two of four channels kept refusing 25–50 % of requests for as long as the node was
//! down. A fresh channel reads the record again.

use futures_util::StreamExt;
use lapin::{options::ConfirmSelectOptions, Connection};
use notify_types::{
    broker::{self, Failover, PublishError},
    Envelope, Topology, TopologyError,
};
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};
use tokio_util::sync::CancellationToken;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Nacks or confirm timeouts in a row that make the API unready (`/ready` 503).
pub const FAILING_AFTER: u32 = 2;
/// Nacks or confirm timeouts in a row after which the connection is replaced.
pub const REPLACE_AFTER: u32 = 3;
/// How often the supervisor probes the broker while publishes are failing.
const PROBE_EVERY: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    failover: tokio::sync::Mutex<Failover>,
    /// The nodes, redacted, for logs.
    nodes: String,
    topology: Topology,
    timeout: Duration,
    channels: usize,
    session: RwLock<Option<Arc<Session>>>,
    /// Publishes (and probes) that failed in a row with a nack or a confirm timeout; reset by
    /// a confirmed one.
    failures: AtomicU32,
    shutdown: CancellationToken,
}

struct Session {
    conn: Connection,
    channels: Vec<Slot>,
    next: AtomicUsize,
    broken: AtomicBool,
    broken_notify: tokio::sync::Notify,
    /// Woken when the broker blocks the connection: the publishes awaiting a confirm then
    /// answer at once instead of at the timeout (RabbitMQ stops reading from a blocked
    /// connection, so the publish that ran into the alarm waits with the rest).
    blocked_notify: tokio::sync::Notify,
}

/// One channel of the pool, replaced in place when it gets a nack.
struct Slot {
    channel: RwLock<lapin::Channel>,
    /// A replacement is being opened.
    replacing: AtomicBool,
}

impl Slot {
    fn new(channel: lapin::Channel) -> Slot {
        Slot { channel: RwLock::new(channel), replacing: AtomicBool::new(false) }
    }

    fn current(&self) -> lapin::Channel {
        self.channel.read().unwrap().clone()
    }
}

/// Why the API is not ready to accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BrokerState {
    Connected,
    /// A resource alarm: the broker refuses publishes until it clears.
    Blocked,
    /// Connected, but the last publishes were nacked or not confirmed in time.
    #[serde(rename = "publishes_failing")]
    Failing,
    Disconnected,
}

impl BrokerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerState::Connected => "connected",
            BrokerState::Blocked => "blocked",
            BrokerState::Failing => "publishes_failing",
            BrokerState::Disconnected => "disconnected",
        }
    }
}

impl Publisher {
    /// Connects, declares the topology and starts the supervisor. A topology mismatch is fatal
    /// (returned); an unreachable broker is not: the API starts unready and keeps trying.
    pub async fn start(
        failover: Failover,
        topology: Topology,
        timeout: Duration,
        channels: usize,
    ) -> Result<Publisher, TopologyError> {
        let inner = Arc::new(Inner {
            nodes: failover.describe(),
            failover: tokio::sync::Mutex::new(failover),
            topology,
            timeout,
            channels,
            session: RwLock::new(None),
            failures: AtomicU32::new(0),
            shutdown: CancellationToken::new(),
        });
        match inner.open_session().await {
            Ok(session) => *inner.session.write().unwrap() = Some(session),
            Err(SessionError::Topology(e)) => return Err(e),
            Err(SessionError::Broker(e)) => tracing::warn!(
                broker = %inner.nodes,
                error = %e,
                "RabbitMQ is unreachable at start; the API answers 503 until it connects"
            ),
        }
        tokio::spawn(supervise(inner.clone()));
        Ok(Publisher { inner })
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    pub fn state(&self) -> BrokerState {
        match self.current() {
            None => BrokerState::Disconnected,
            Some(s) if s.conn.status().blocked() => BrokerState::Blocked,
            Some(_) if self.inner.failures.load(Ordering::Relaxed) >= FAILING_AFTER => BrokerState::Failing,
            Some(_) => BrokerState::Connected,
        }
    }

    fn current(&self) -> Option<Arc<Session>> {
        let guard = self.inner.session.read().unwrap();
        guard.as_ref().filter(|s| s.usable()).cloned()
    }

    /// Publishes `env` to the exchange with `routing_key`, with the request's W3C trace context
    /// in the `traceparent` header; Ok only when the broker confirmed it and returned nothing.
    pub async fn publish(&self, env: &Envelope, routing_key: &str, traceparent: &str) -> Result<(), PublishError> {
        let session = self.current().ok_or(PublishError::NotConnected)?;
        // Registered before the check, so a block arriving in between still wakes us.
        let blocked = session.blocked_notify.notified();
        tokio::pin!(blocked);
        blocked.as_mut().enable();
        if session.conn.status().blocked() {
            return Err(PublishError::Blocked);
        }
        let n = session.next.fetch_add(1, Ordering::Relaxed) % session.channels.len();
        let (exchange, payload) = (self.inner.topology.exchange(), env.to_bytes());
        let channel = session.channels[n].current();
        let started = std::time::Instant::now();
        let result = tokio::select! {
            biased;
            result = broker::publish_confirmed(
                &channel,
                &exchange,
                routing_key,
                &payload,
                broker::with_header(broker::envelope_properties(env, 1), notify_types::headers::TRACEPARENT, traceparent),
                self.inner.timeout,
            ) => result,
            _ = blocked => Err(PublishError::Blocked),
        };
        crate::metrics::publish_duration(started.elapsed());
        self.inner.count(&session, &result);
        if matches!(result, Err(PublishError::Nacked)) {
            self.inner.replace_channel(&session, n);
        }
        result
    }

    /// Stops the supervisor and closes the connection.
    pub async fn close(&self) {
        self.inner.shutdown.cancel();
        let session = self.inner.session.write().unwrap().take();
        if let Some(s) = session {
            let _ = s.conn.close(200, "api shutting down".into()).await;
        }
    }
}

enum SessionError {
    Topology(TopologyError),
    Broker(lapin::Error),
}

impl Inner {
    /// Keeps the failure count of the publishes (and probes) on `session`, and replaces a
    /// connection whose publishes keep failing.
    fn count(&self, session: &Session, result: &Result<(), PublishError>) {
        match result {
            Ok(()) => {
                if self.failures.swap(0, Ordering::Relaxed) >= FAILING_AFTER {
                    tracing::info!("RabbitMQ confirms publishes again");
                }
            }
            Err(PublishError::Nacked | PublishError::Timeout(_) | PublishError::NotConfirmed) => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if failures >= REPLACE_AFTER && !session.broken.load(Ordering::Relaxed) {
                    tracing::warn!(failures, "publishes keep failing on this connection; replacing it");
                    session.mark_broken();
                }
            }
            Err(PublishError::Broker(e)) => {
                tracing::warn!(error = %e, "publishing failed; reconnecting to RabbitMQ");
                session.mark_broken();
            }
            Err(PublishError::Blocked | PublishError::NotConnected | PublishError::Unroutable { .. }) => {}
        }
    }

    /// Opens a new channel in slot `n` of `session` in the background and closes the old one
    /// once publishes still awaiting it have timed out. One replacement per slot at a time; a
    /// connection that cannot open a channel is replaced.
    fn replace_channel(&self, session: &Arc<Session>, n: usize) {
        if session.channels[n].replacing.swap(true, Ordering::Relaxed) {
            return;
        }
        tracing::warn!(channel = n, "a publish was nacked; replacing its channel");
        let (session, grace) = (session.clone(), self.timeout);
        tokio::spawn(async move {
            let slot = &session.channels[n];
            let opened = async {
                let ch = session.conn.create_channel().await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                Ok::<_, lapin::Error>(ch)
            };
            match opened.await {
                Ok(ch) => {
                    let old = std::mem::replace(&mut *slot.channel.write().unwrap(), ch);
                    slot.replacing.store(false, Ordering::Relaxed);
                    tokio::time::sleep(grace).await;
                    let _ = old.close(200, "replaced after a nack".into()).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open a channel; reconnecting to RabbitMQ");
                    session.mark_broken();
                    slot.replacing.store(false, Ordering::Relaxed);
                }
            }
        });
    }

    /// One confirmed publish to the probe queue.
    async fn probe(&self, session: &Arc<Session>) -> Result<(), PublishError> {
        let result = broker::publish_confirmed(
            &session.channels[0].current(),
            &self.topology.exchange(),
            Topology::PROBE_KEY,
            b"probe",
            lapin::BasicProperties::default(),
            self.timeout,
        )
        .await;
        self.count(session, &result);
        if matches!(result, Err(PublishError::Nacked)) {
            self.replace_channel(session, 0);
        }
        result
    }
}

impl Session {
    fn usable(&self) -> bool {
        !self.broken.load(Ordering::Relaxed) && self.conn.status().connected()
    }

    fn mark_broken(&self) {
        self.broken.store(true, Ordering::Relaxed);
        self.broken_notify.notify_one();
    }
}

impl Inner {
    async fn open_session(&self) -> Result<Arc<Session>, SessionError> {
        let (conn, node) =
            self.failover.lock().await.connect("notify-api", CONNECT_TIMEOUT).await.map_err(SessionError::Broker)?;
        self.topology.declare(&conn).await.map_err(|e| match e {
            TopologyError::Broker { source, .. } => SessionError::Broker(source),
            mismatch => SessionError::Topology(mismatch),
        })?;
        let mut channels = Vec::with_capacity(self.channels);
        for _ in 0..self.channels {
            let ch = conn.create_channel().await.map_err(SessionError::Broker)?;
            ch.confirm_select(ConfirmSelectOptions::default()).await.map_err(SessionError::Broker)?;
            channels.push(Slot::new(ch));
        }
        tracing::info!(broker = %node, channels = channels.len(), "connected to RabbitMQ");
        Ok(Arc::new(Session {
            conn,
            channels,
            next: AtomicUsize::new(0),
            broken: AtomicBool::new(false),
            broken_notify: tokio::sync::Notify::new(),
            blocked_notify: tokio::sync::Notify::new(),
        }))
    }
}

/// Keeps a session open: waits for the current one to die, then reconnects: every node of
/// `RABBITMQ_URL` at once, then again after a backoff.
async fn supervise(inner: Arc<Inner>) {
    loop {
        let current = inner.session.read().unwrap().clone();
        if let Some(session) = current {
            wait_until_dead(&inner, &session).await;
            if inner.shutdown.is_cancelled() {
                return;
            }
            tracing::warn!("lost the RabbitMQ connection; reconnecting");
            inner.session.write().unwrap().take();
            let _ = tokio::time::timeout(Duration::from_secs(1), session.conn.close(320, "reconnecting".into())).await;
        }
        if inner.shutdown.is_cancelled() {
            return;
        }
        match inner.open_session().await {
            Ok(session) => {
                *inner.session.write().unwrap() = Some(session);
                continue;
            }
            Err(SessionError::Topology(e)) => {
                tracing::error!(error = %e, "cannot declare the topology")
            }
            Err(SessionError::Broker(e)) => {
                tracing::debug!(error = %e, "RabbitMQ still unreachable")
            }
        }
        let backoff = inner.failover.lock().await.backoff();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = inner.shutdown.cancelled() => return,
        }
    }
}

async fn wait_until_dead(inner: &Inner, session: &Arc<Session>) {
    let mut events = session.conn.events_listener();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut probe = tokio::time::interval(PROBE_EVERY);
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = session.broken_notify.notified() => return,
            ev = events.next() => match ev {
                Some(lapin::Event::Error(e)) => {
                    tracing::warn!(error = %e, "RabbitMQ connection error");
                    return;
                }
                Some(lapin::Event::ConnectionBlocked(reason)) => {
                    tracing::warn!(%reason, "RabbitMQ blocked publishers; answering 503 until it unblocks");
                    session.blocked_notify.notify_waiters();
                }
                Some(lapin::Event::ConnectionUnblocked) => tracing::info!("RabbitMQ unblocked publishers"),
                Some(_) => {}
                None => return,
            },
            _ = tick.tick() => {
                if !session.usable() || session.channels.iter().any(|c| !c.current().status().connected()) {
                    return;
                }
            }
            _ = probe.tick(), if inner.failures.load(Ordering::Relaxed) >= FAILING_AFTER => {
                if let Err(e) = inner.probe(session).await {
                    tracing::debug!(error = %e, "readiness probe failed");
                }
            }
        }
    }
}
