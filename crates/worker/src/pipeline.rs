//! The path of one message, top to bottom: receive → deliver → record → plan → execute →
//! report. Each step is its own module and hands the next a value; only `plan` decides what
//! happens in the broker, and only `execute` does it.

use crate::{
    deliver::Deliverer,
    execute::Executor,
    metrics,
    outcome::Settled,
    plan::{plan, RetryPolicy},
    received::Received,
    record::record,
};
use lapin::message::Delivery;
use notify_types::Channel;
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

/// What became of one delivery; tests wait on these instead of sleeping.
#[derive(Debug, Clone)]
pub struct DeliveryReport {
    pub id: Option<Uuid>,
    pub channel: Channel,
    pub attempt: u32,
    pub settled: Settled,
}

/// Everything a delivery needs, shared by the consume loops of one broker session.
pub struct Pipeline {
    pub deliverer: Arc<Deliverer>,
    pub policy: RetryPolicy,
    pub executor: Executor,
    pub reports: Option<mpsc::UnboundedSender<DeliveryReport>>,
}

impl Pipeline {
    pub async fn process(&self, channel: Channel, delivery: Delivery) {
        let received = Received::read(channel, &delivery, self.policy.max_attempts);
        let span = received.span();
        async {
            let started = Instant::now();
            let outcome = self.deliverer.deliver(&received).await;
            let outcome = record(&self.deliverer.store, &received, outcome).await;
            let plan = plan(&received, outcome, &self.policy, chrono::Utc::now(), &mut rand::rng());
            let settled = self.executor.execute(&delivery, plan).await;
            let elapsed = started.elapsed();
            tracing::info!(?settled, elapsed_ms = elapsed.as_millis() as u64, "delivery settled");
            self.report(&received, settled, elapsed);
        }
        .instrument(span)
        .await
    }

    /// The one place a settled delivery is counted (metrics) and reported (tests).
    fn report(&self, received: &Received, settled: Settled, elapsed: Duration) {
        let created_at = received.envelope.as_ref().ok().map(|env| env.created_at);
        metrics::delivery(received.channel, &settled, elapsed, created_at);
        if let Some(tx) = &self.reports {
            let id = received.envelope.as_ref().ok().map(|env| env.id);
            let _ = tx.send(DeliveryReport { id, channel: received.channel, attempt: received.attempt, settled });
        }
    }
}
