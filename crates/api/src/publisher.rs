//! Publishing to RabbitMQ from many concurrent requests.
//!
//! A small pool of confirm-mode channels on one connection is shared by every request; each
//! request publishes and awaits only its own confirm, so confirms are pipelined instead of one
//! request at a time per channel. A supervisor task keeps the connection up: it reconnects with
//! backoff after broker loss and redeclares the topology.

use futures_util::StreamExt;
use lapin::{options::ConfirmSelectOptions, Connection};
use notify_types::{
    broker::{self, PublishError},
    config::redact_url,
    Envelope, Topology, TopologyError,
};
use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};
use tokio_util::sync::CancellationToken;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    topology: Topology,
    timeout: Duration,
    channels: usize,
    session: RwLock<Option<Arc<Session>>>,
    shutdown: CancellationToken,
}

struct Session {
    conn: Connection,
    channels: Vec<lapin::Channel>,
    next: AtomicUsize,
    broken: AtomicBool,
    broken_notify: tokio::sync::Notify,
    /// Woken when the broker blocks the connection: the publishes awaiting a confirm then
    /// answer at once instead of at the timeout (RabbitMQ stops reading from a blocked
    /// connection, so the publish that ran into the alarm waits with the rest).
    blocked_notify: tokio::sync::Notify,
}

/// Why the API is not ready to accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerState {
    Connected,
    Blocked,
    Disconnected,
}

impl BrokerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerState::Connected => "connected",
            BrokerState::Blocked => "blocked",
            BrokerState::Disconnected => "disconnected",
        }
    }
}

impl Publisher {
    /// Connects, declares the topology and starts the supervisor. A topology mismatch is fatal
    /// (returned); an unreachable broker is not: the API starts unready and keeps trying.
    pub async fn start(
        url: String,
        topology: Topology,
        timeout: Duration,
        channels: usize,
    ) -> Result<Publisher, TopologyError> {
        let inner = Arc::new(Inner {
            url,
            topology,
            timeout,
            channels,
            session: RwLock::new(None),
            shutdown: CancellationToken::new(),
        });
        match inner.open_session().await {
            Ok(session) => *inner.session.write().unwrap() = Some(session),
            Err(SessionError::Topology(e)) => return Err(e),
            Err(SessionError::Broker(e)) => tracing::warn!(
                broker = %redact_url(&inner.url),
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
            Some(_) => BrokerState::Connected,
        }
    }

    fn current(&self) -> Option<Arc<Session>> {
        let guard = self.inner.session.read().unwrap();
        guard.as_ref().filter(|s| s.usable()).cloned()
    }

    /// Publishes `env` to the exchange with `routing_key`; Ok only when the broker confirmed it
    /// and returned nothing.
    pub async fn publish(&self, env: &Envelope, routing_key: &str) -> Result<(), PublishError> {
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
        let result = tokio::select! {
            biased;
            result = broker::publish_confirmed(
                &session.channels[n],
                &exchange,
                routing_key,
                &payload,
                broker::envelope_properties(env, 1),
                self.inner.timeout,
            ) => result,
            _ = blocked => Err(PublishError::Blocked),
        };
        if let Err(PublishError::Broker(e)) = &result {
            tracing::warn!(error = %e, "publishing failed; reconnecting to RabbitMQ");
            session.mark_broken();
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
        let conn = broker::connect(&self.url, "notify-api", CONNECT_TIMEOUT).await.map_err(SessionError::Broker)?;
        self.topology.declare(&conn).await.map_err(|e| match e {
            TopologyError::Broker { source, .. } => SessionError::Broker(source),
            mismatch => SessionError::Topology(mismatch),
        })?;
        let mut channels = Vec::with_capacity(self.channels);
        for _ in 0..self.channels {
            let ch = conn.create_channel().await.map_err(SessionError::Broker)?;
            ch.confirm_select(ConfirmSelectOptions::default()).await.map_err(SessionError::Broker)?;
            channels.push(ch);
        }
        tracing::info!(broker = %redact_url(&self.url), channels = channels.len(), "connected to RabbitMQ");
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

/// Keeps a session open: waits for the current one to die, then reconnects with backoff.
async fn supervise(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(200);
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
            backoff = Duration::from_millis(200);
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
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = inner.shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn wait_until_dead(inner: &Inner, session: &Session) {
    let mut events = session.conn.events_listener();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
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
                if !session.usable() || session.channels.iter().any(|c| !c.status().connected()) {
                    return;
                }
            }
        }
    }
}
