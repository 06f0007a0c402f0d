//! The consume loop: one consumer per channel queue with its own prefetch and concurrency, a
//! confirm-mode channel for retries and dead letters, reconnection after broker loss, and
//! graceful shutdown (stop consuming, finish in-flight deliveries, close).

use crate::{
    channels::{email::EmailSender, webhook::WebhookSender},
    deliver::Deliverer,
    http::{self, Readiness},
    metrics,
    outcome::DeadReason,
    settle::{Settled, Settler},
    Outcome, WorkerConfig,
};
use futures_util::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions},
    types::FieldTable,
    Connection,
};
use notify_store::Store;
use notify_types::{
    broker::{header_u32, Failover},
    headers,
    routes::Routes,
    Channel, Envelope, TopologyError,
};
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;
use uuid::Uuid;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// What became of one delivery; tests wait on these instead of sleeping.
#[derive(Debug, Clone)]
pub struct DeliveryReport {
    pub id: Option<Uuid>,
    pub channel: Channel,
    pub attempt: u32,
    pub settled: Settled,
}

pub struct Worker {
    config: WorkerConfig,
    deliverer: Arc<Deliverer>,
    reports: Option<mpsc::UnboundedSender<DeliveryReport>>,
    /// Bound at build, served while `run` runs.
    http: Option<tokio::net::TcpListener>,
    http_addr: SocketAddr,
    readiness: Arc<Readiness>,
}

struct Ctx {
    deliverer: Arc<Deliverer>,
    settler: Settler,
    reports: Option<mpsc::UnboundedSender<DeliveryReport>>,
}

enum SessionEnd {
    Stopped,
    Lost,
}

impl Worker {
    pub async fn build(config: WorkerConfig) -> anyhow::Result<Worker> {
        let email = EmailSender::new(&config.smtp_url, &config.email_from, config.smtp_timeout, config.smtp_pool_size)?;
        let webhook = WebhookSender::new(config.webhook_timeout, config.webhook_allow_private)?;
        let routes = Arc::new(Routes::load(&config.routes_file)?);
        routes.warn_disabled();
        let store = Store::connect_lazy(
            &config.database_url,
            &config.database_schema,
            (config.concurrency as u32).clamp(2, 32),
        )
        .map_err(|e| anyhow::anyhow!("DATABASE_URL / DATABASE_SCHEMA: {e}"))?;
        let mut config = config;
        config.topology.event_routes = routes.bindings();
        let deliverer = Deliverer {
            gate: tokio::sync::RwLock::new(()),
            crash_limit: config.crash_limit,
            email,
            webhook,
            routes,
            store,
            webhook_secret: config.webhook_secret.clone(),
        };
        // Before anything records; then every series exists at zero for the first scrape.
        metrics::init();
        let http = http::bind(&config.http_host, config.http_port).await?;
        let http_addr = http.local_addr()?;
        tracing::info!(addr = %http_addr, "HTTP listener: /health, /ready, /metrics");
        let readiness = Arc::new(Readiness::default());
        Ok(Worker { config, deliverer: Arc::new(deliverer), reports: None, http: Some(http), http_addr, readiness })
    }

    /// Where `/health`, `/ready` and `/metrics` answer (the port, if `WORKER_HTTP_PORT` was 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// A stream of delivery reports (one per settled delivery).
    pub fn reports(&mut self) -> mpsc::UnboundedReceiver<DeliveryReport> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.reports = Some(tx);
        rx
    }

    /// Runs until `shutdown` is cancelled. Reconnects after broker loss; returns an error only
    /// for what reconnecting cannot fix (a topology mismatch).
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // Up first, so liveness answers while the database and the broker are awaited; stops
        // (dropped) when `run` returns.
        let pool = self.deliverer.email.pool();
        let state = http::State {
            readiness: self.readiness.clone(),
            store: self.deliverer.store.clone(),
            sample: Box::new(move || {
                let (in_use, idle) = pool.usage();
                metrics::smtp_pool(in_use, idle);
            }),
        };
        let listener = self.http.take().expect("run takes the listener once");
        let _http = http::spawn(listener, Arc::new(state));
        // The send guard needs the tables: wait for Postgres before taking any message.
        let mut backoff = Duration::from_millis(200);
        while let Err(e) = self.deliverer.store.migrate().await {
            tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot prepare the database");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        // Every node of RABBITMQ_URL in turn: after a loss the others at once, then a backoff.
        let mut failover = Failover::with_order(&self.config.rabbitmq_url, self.config.rabbitmq_url_order);
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let (conn, url) = match failover.connect("notify-worker", CONNECT_TIMEOUT).await {
                Ok(c) => c,
                Err(e) => {
                    let backoff = failover.backoff();
                    tracing::warn!(broker = %failover.describe(), error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot reach RabbitMQ");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                    continue;
                }
            };
            match self.config.topology.declare(&conn).await {
                Ok(()) => {}
                Err(e @ TopologyError::Mismatch { .. }) => {
                    let _ = conn.close(200, "topology mismatch".into()).await;
                    return Err(e.into());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "declaring the topology failed; reconnecting");
                    continue;
                }
            }
            tracing::info!(broker = %url, channels = ?self.config.channels, "connected; consuming");
            match self.consume(&conn, &mut failover, &shutdown).await {
                Ok(SessionEnd::Stopped) => {
                    let _ = conn.close(200, "worker shutting down".into()).await;
                    let batched = self.deliverer.store.group_commit_stats();
                    tracing::info!(
                        store_writes = batched.writes,
                        store_statements = batched.statements,
                        "worker stopped"
                    );
                    return Ok(());
                }
                Ok(SessionEnd::Lost) => {
                    tracing::warn!("lost the RabbitMQ connection; reconnecting")
                }
                Err(e) => tracing::warn!(error = %e, "consuming failed; reconnecting"),
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(320, "reconnecting".into())).await;
        }
    }

    async fn consume(
        &self,
        conn: &Connection,
        failover: &mut Failover,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, lapin::Error> {
        // Retries and dead letters are published on a connection of their own: during a
        // resource alarm RabbitMQ stops reading from connections that publish, and acks on the
        // consuming connection must keep flowing so the worker keeps draining. It goes to the
        // same node, so only that node's loss ends the session.
        let (pub_conn, _) = failover.connect_beside("notify-worker-publish", CONNECT_TIMEOUT).await?;
        let end = self.consume_with(conn, &pub_conn, shutdown).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), pub_conn.close(200, "worker session ended".into())).await;
        end
    }

    async fn consume_with(
        &self,
        conn: &Connection,
        pub_conn: &Connection,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, lapin::Error> {
        let publish = pub_conn.create_channel().await?;
        publish.confirm_select(ConfirmSelectOptions::default()).await?;
        let ctx = Arc::new(Ctx {
            deliverer: self.deliverer.clone(),
            settler: Settler {
                publish,
                topology: self.config.topology.clone(),
                max_attempts: self.config.max_attempts,
                jitter: self.config.jitter,
                timeout: PUBLISH_TIMEOUT,
            },
            reports: self.reports.clone(),
        });
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let mut loops = tokio::task::JoinSet::new();
        let mut consumers = Vec::new();
        for &channel in &self.config.channels {
            let ch = conn.create_channel().await?;
            ch.basic_qos(self.config.prefetch, BasicQosOptions::default()).await?;
            let queue = self.config.topology.queue(channel);
            let tag = format!("notify-worker-{}-{}", channel, Uuid::now_v7().simple());
            let consumer = ch
                .basic_consume(
                    queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let permits = Arc::new(Semaphore::new(self.config.concurrency));
            loops.spawn(consume_loop(channel, consumer, permits, ctx.clone(), tracker.clone(), stop.clone()));
            consumers.push((ch, tag));
        }

        let counting = conn.create_channel().await?;
        let (topology, channels) = (&self.config.topology, &self.config.channels);
        let dead_letters = metrics::watch_dead_letters(&counting, topology, channels, self.config.dead_letter_interval);
        self.readiness.set_consuming(true);
        let end = tokio::select! {
            _ = shutdown.cancelled() => SessionEnd::Stopped,
            _ = loops.join_next() => SessionEnd::Lost,
            _ = connection_lost(pub_conn) => SessionEnd::Lost,
            // Never ends by itself; counts until the session does.
            _ = dead_letters => SessionEnd::Lost,
        };
        // Unready at once, not after the drain below (which may take WORKER_SHUTDOWN_TIMEOUT).
        self.readiness.set_consuming(false);
        let _ = tokio::time::timeout(Duration::from_secs(2), counting.close(200, "session ended".into())).await;
        // Stop taking new deliveries; what was prefetched but not started goes back to the
        // queue when its channel closes.
        stop.cancel();
        for (ch, tag) in &consumers {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
            )
            .await;
        }
        while loops.join_next().await.is_some() {}
        tracker.close();
        let in_flight = tracker.len();
        if in_flight > 0 {
            tracing::info!(in_flight, "waiting for in-flight deliveries");
        }
        if tokio::time::timeout(self.config.shutdown_timeout, tracker.wait()).await.is_err() {
            tracing::warn!(
                left = tracker.len(),
                "in-flight deliveries did not finish in time; they will be redelivered"
            );
        }
        for (ch, _) in &consumers {
            let _ = tokio::time::timeout(Duration::from_secs(2), ch.close(200, "consumer stopped".into())).await;
        }
        // Closed here, not by its drop: a dropped channel's close is queued behind the
        // connection's own close, which lapin reports as an ERROR on every clean shutdown.
        let publish = &ctx.settler.publish;
        let _ = tokio::time::timeout(Duration::from_secs(2), publish.close(200, "worker session ended".into())).await;
        Ok(end)
    }
}

/// Resolves when the connection stops being usable.
async fn connection_lost(conn: &Connection) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while conn.status().connected() {
        tick.tick().await;
    }
}

async fn consume_loop(
    channel: Channel,
    mut consumer: lapin::Consumer,
    permits: Arc<Semaphore>,
    ctx: Arc<Ctx>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = stop.cancelled() => return,
        };
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            d = consumer.next() => d,
        };
        match next {
            Some(Ok(delivery)) => {
                let ctx = ctx.clone();
                tracker.spawn(async move {
                    let _in_flight = metrics::in_flight(channel);
                    process(&ctx, channel, delivery).await;
                    drop(permit);
                });
            }
            Some(Err(e)) => {
                tracing::warn!(%channel, error = %e, "consumer failed");
                return;
            }
            None => {
                tracing::warn!(%channel, "consumer ended");
                return;
            }
        }
    }
}

async fn process(ctx: &Ctx, channel: Channel, delivery: Delivery) {
    let attempt = header_u32(&delivery.properties, headers::ATTEMPT).unwrap_or(1).max(1);
    let env = match Envelope::from_bytes(&delivery.data) {
        Ok(env) => env,
        Err(error) => {
            let span =
                tracing::warn_span!("delivery", %channel, attempt, message_id = ?delivery.properties.message_id());
            let outcome = Outcome::Dead { reason: DeadReason::Unparseable, error };
            let started = Instant::now();
            let settled = ctx.settler.settle(channel, &delivery, attempt, outcome).instrument(span).await;
            report(ctx, None, channel, attempt, settled, started.elapsed(), None);
            return;
        }
    };
    let span = tracing::info_span!(
        "delivery",
        notification_id = %env.id,
        %channel,
        attempt,
        correlation_id = %env.correlation_id,
        producer = env.producer.as_deref().unwrap_or("-"),
        redelivered = delivery.redelivered,
    );
    async {
        let started = Instant::now();
        // A message that comes back with `x-notify-sent` was sent before; only its record is due.
        let outcome = if header_u32(&delivery.properties, headers::SENT).is_some() {
            Outcome::Delivered
        } else {
            ctx.settler.decide(attempt, ctx.deliverer.deliver(channel, &env, attempt, delivery.redelivered).await)
        };
        let outcome = match ctx.deliverer.record(channel, &env, attempt, &outcome).await {
            Err(e) if outcome == Outcome::Delivered && e.is_unavailable() => {
                Outcome::RecordLater { error: e.to_string() }
            }
            _ => outcome,
        };
        let settled = ctx.settler.settle(channel, &delivery, attempt, outcome).await;
        tracing::info!(?settled, elapsed_ms = started.elapsed().as_millis() as u64, "delivery settled");
        report(ctx, Some(env.id), channel, attempt, settled, started.elapsed(), Some(env.created_at));
    }
    .instrument(span)
    .await
}

/// The one place a settled delivery is counted (metrics) and reported (tests).
fn report(
    ctx: &Ctx,
    id: Option<Uuid>,
    channel: Channel,
    attempt: u32,
    settled: Settled,
    elapsed: Duration,
    created_at: Option<chrono::DateTime<chrono::Utc>>,
) {
    metrics::delivery(channel, &settled, elapsed, created_at);
    if let Some(tx) = &ctx.reports {
        let _ = tx.send(DeliveryReport { id, channel, attempt, settled });
    }
}
