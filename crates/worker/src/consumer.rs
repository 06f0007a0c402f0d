//! The consume loop: one consumer per channel queue with its own prefetch and concurrency, a
//! confirm-mode channel for retries and dead letters, reconnection after broker loss, and
//! graceful shutdown (stop consuming, finish in-flight deliveries, close).

use crate::{
    channels::{email::EmailSender, webhook::WebhookSender},
    config::WorkerConfig,
    deliver::Deliverer,
    execute::Executor,
    http::{self, Readiness},
    metrics,
    pipeline::{DeliveryReport, Pipeline},
    plan::RetryPolicy,
};
use futures_util::StreamExt;
use lapin::{
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions},
    types::FieldTable,
    Connection,
};
use notify_store::Store;
use notify_types::{broker::Failover, routes::Routes, Channel, TopologyError};
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Worker {
    config: WorkerConfig,
    deliverer: Arc<Deliverer>,
    reports: Option<mpsc::UnboundedSender<DeliveryReport>>,
    /// Bound at build, served while `run` runs.
    http: Option<tokio::net::TcpListener>,
    http_addr: SocketAddr,
    readiness: Arc<Readiness>,
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
        let side = shutdown.child_token();
        let side_tasks = self.start_side_tasks(&side);
        let result = self.consume_until_stopped(&shutdown).await;
        side.cancel();
        for task in side_tasks {
            let _ = task.await;
        }
        result
    }

    /// The dead-letter indexer and the retention purge (crate::dead_letters, crate::retention):
    /// they run beside the consumers until `shutdown`.
    fn start_side_tasks(&self, shutdown: &CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        let store = self.deliverer.store.clone();
        let mut tasks = Vec::new();
        if self.config.dead_letter_index {
            let indexer = crate::dead_letters::Indexer {
                rabbitmq_url: self.config.rabbitmq_url.clone(),
                url_order: self.config.rabbitmq_url_order,
                topology: self.config.topology.clone(),
                channels: self.config.channels.clone(),
                store: store.clone(),
            };
            tasks.push(tokio::spawn(indexer.run(shutdown.clone())));
        }
        let (retention, every) = (self.config.retention.clone(), self.config.retention_interval);
        tasks.push(tokio::spawn(crate::retention::run(store, retention, every, shutdown.clone())));
        tasks
    }

    async fn consume_until_stopped(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let shutdown = shutdown.clone();
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
        let pipeline = Arc::new(Pipeline {
            deliverer: self.deliverer.clone(),
            policy: RetryPolicy {
                topology: self.config.topology.clone(),
                max_attempts: self.config.max_attempts,
                jitter: self.config.jitter,
            },
            executor: Executor { amqp_channel: publish, timeout: PUBLISH_TIMEOUT },
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
            loops.spawn(consume_loop(channel, consumer, permits, pipeline.clone(), tracker.clone(), stop.clone()));
            consumers.push((ch, tag));
        }

        let counting = conn.create_channel().await?;
        let (topology, channels) = (&self.config.topology, &self.config.channels);
        let stored = self.config.dead_letter_index.then_some(&self.deliverer.store);
        let dead_letters =
            metrics::watch_dead_letters(&counting, topology, channels, self.config.dead_letter_interval, stored);
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
        let publish = &pipeline.executor.amqp_channel;
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
    pipeline: Arc<Pipeline>,
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
                let pipeline = pipeline.clone();
                tracker.spawn(async move {
                    let _in_flight = metrics::in_flight(channel);
                    pipeline.process(channel, delivery).await;
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
