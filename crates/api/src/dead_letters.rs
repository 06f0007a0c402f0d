//! Acting on dead letters, shared by `POST /api/v1/dead-letters/{replay,discard}` and the
//! `notify-admin` CLI: selecting them (by ids or by filter), replaying and discarding, and the
//! audit record of each action.
//!
//! Replay of one dead letter, in this order, so that a crash at any point leaves it either still
//! listed as dead or replayed, never gone:
//! 1. take it: `dead` → `replaying` in PostgreSQL (conditional: of concurrent callers exactly
//!    one wins), refused when it was replayed `REPLAY_LIMIT` times already; in the same
//!    transaction its delivery record becomes claimable again (`queued`, attempts reset);
//! 2. publish it to its channel queue as a fresh first attempt (`x-notify-attempt: 1`,
//!    `x-notify-replays: n`), with publisher confirms;
//! 3. record it `replayed`. A publish that fails puts it back to `dead`.
//!
//! A replayer that dies between 1 and 3 leaves the row `replaying`: still listed, and taken
//! over by a later replay after [`notify_store::REPLAY_TAKEOVER_AFTER`]. If the worker has moved
//! that replay's delivery record on meanwhile, the publish happened and only the record is
//! written; otherwise it is published (again).

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::{
    options::ConfirmSelectOptions,
    types::{AMQPValue, FieldTable},
    BasicProperties,
};
use notify_store::{BeginReplay, DeadLetterAction, DeadLetterFilter, ReplayJob, Store, StoreError, DEAD_REASONS};
use notify_types::{
    broker::{publish_confirmed, Failover, UrlOrder},
    headers, Channel, Topology,
};
use serde::Serialize;
use std::time::Duration;
use uuid::Uuid;

/// Dead letters replayed at once (each is a few statements and a confirmed publish).
const IN_FLIGHT: usize = 32;
/// Default and largest `limit` of a replay or discard by filter.
pub const DEFAULT_ACTION_LIMIT: i64 = 100;
pub const MAX_ACTION_LIMIT: i64 = 10_000;
/// Most ids in one request.
pub const MAX_IDS: usize = 10_000;

/// What to act on.
#[derive(Debug, Clone)]
pub enum Selector {
    Ids(Vec<Uuid>),
    Filter { filter: DeadLetterFilter, limit: i64 },
}

impl Selector {
    fn describe(&self) -> serde_json::Value {
        match self {
            Selector::Ids(ids) => serde_json::json!({ "ids": ids }),
            Selector::Filter { filter, limit } => serde_json::json!({ "filter": filter, "limit": limit }),
        }
    }
}

/// A dead letter a replay would not take, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Refused {
    pub id: Uuid,
    pub reason: String,
}

/// A dead letter whose replay could not be published (it is still dead).
#[derive(Debug, Clone, Serialize)]
pub struct Failed {
    pub id: Uuid,
    pub error: String,
}

/// The outcome of a replay or discard.
#[derive(Debug, Clone, Default)]
pub struct Done {
    pub matched: usize,
    /// Replayed or discarded (for a dry run: would be).
    pub ids: Vec<Uuid>,
    pub not_found: Vec<Uuid>,
    pub refused: Vec<Refused>,
    pub failed: Vec<Failed>,
}

impl Done {
    /// The JSON answer; `verb` is `replayed` or `discarded`.
    pub fn to_json(&self, verb: &str) -> serde_json::Value {
        let mut v = serde_json::json!({
            "matched": self.matched,
            verb: self.ids.len(),
            "ids": self.ids,
            "not_found": self.not_found,
        });
        if verb == "replayed" {
            v["refused"] = serde_json::json!(self.refused);
            v["failed"] = serde_json::json!(self.failed);
        }
        v
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot reach RabbitMQ: {0}")]
    Broker(String),
}

/// Replays and discards dead letters.
#[derive(Clone)]
pub struct DeadLetterAdmin {
    pub store: Store,
    pub rabbitmq_url: String,
    pub url_order: UrlOrder,
    pub topology: Topology,
    /// Replays per notification and channel (`REPLAY_LIMIT`).
    pub replay_limit: u32,
    pub publish_timeout: Duration,
}

impl DeadLetterAdmin {
    /// The candidates of a selector, and the ids asked for that are not (or no longer) dead.
    async fn candidates(&self, selector: &Selector) -> Result<(Vec<Uuid>, Vec<Uuid>), StoreError> {
        match selector {
            Selector::Ids(ids) => {
                let found = self.store.takeable_dead_letters(ids).await?;
                let mut not_found: Vec<Uuid> = ids.iter().filter(|id| !found.contains(id)).copied().collect();
                not_found.dedup();
                Ok((found, not_found))
            }
            Selector::Filter { filter, limit } => {
                Ok((self.store.select_dead_letters(filter, *limit).await?, Vec::new()))
            }
        }
    }

    /// Replays the selected dead letters (see the module's note); `actor` is who asked.
    pub async fn replay(&self, selector: &Selector, dry_run: bool, actor: &str) -> Result<Done, AdminError> {
        let (candidates, not_found) = self.candidates(selector).await?;
        let mut done = Done { matched: candidates.len(), not_found, ..Done::default() };
        let limit = self.replay_limit as i32;
        if dry_run {
            for id in candidates {
                match self.store.dead_letter(id).await? {
                    Some(d) if d.letter.replays >= limit => done.refused.push(self.refusal(id, d.letter.replays)),
                    Some(_) => done.ids.push(id),
                    None => done.not_found.push(id),
                }
            }
        } else if !candidates.is_empty() {
            let publisher = self.connect().await?;
            let results: Vec<(Uuid, Result<Step, StoreError>)> = futures_util::stream::iter(candidates)
                .map(|id| {
                    let publisher = &publisher;
                    async move { (id, self.replay_one(publisher, id, limit).await) }
                })
                .buffer_unordered(IN_FLIGHT)
                .collect()
                .await;
            publisher.close().await;
            for (id, result) in results {
                match result? {
                    Step::Replayed => done.ids.push(id),
                    Step::Refused(replays) => done.refused.push(self.refusal(id, replays)),
                    Step::NotFound => done.not_found.push(id),
                    Step::Failed(error) => done.failed.push(Failed { id, error }),
                }
            }
        }
        self.audit("replay", selector, dry_run, actor, &done).await;
        Ok(done)
    }

    fn refusal(&self, id: Uuid, replays: i32) -> Refused {
        Refused {
            id,
            reason: format!(
                "replayed {replays} times already (REPLAY_LIMIT {}): fix the cause, or discard it",
                self.replay_limit
            ),
        }
    }

    async fn replay_one(&self, publisher: &Publisher, id: Uuid, limit: i32) -> Result<Step, StoreError> {
        let (job, published) = match self.store.begin_replay(id, limit).await? {
            BeginReplay::Taken { job, published } => (job, published),
            BeginReplay::Refused { replays } => return Ok(Step::Refused(replays)),
            BeginReplay::NotFound => return Ok(Step::NotFound),
        };
        if !published {
            if let Err(error) = self.publish(publisher, &job).await {
                tracing::warn!(dead_letter = %id, %error, "replay not published; the dead letter stays");
                self.store.abort_replay(&job).await?;
                return Ok(Step::Failed(error));
            }
        }
        self.store.finish_replay(&job).await?;
        tracing::info!(dead_letter = %id, notification_id = ?job.notification_id, channel = %job.channel, replay = job.replay, "dead letter replayed");
        Ok(Step::Replayed)
    }

    async fn publish(&self, publisher: &Publisher, job: &ReplayJob) -> Result<(), String> {
        let channel: Channel = job.channel.parse()?;
        let queue = self.topology.queue(channel);
        let props = replay_properties(&job.properties, job.replay);
        publish_confirmed(&publisher.channel, "", &queue, &job.body, props, self.publish_timeout)
            .await
            .map_err(|e| e.to_string())
    }

    async fn connect(&self) -> Result<Publisher, AdminError> {
        let mut failover = Failover::with_order(&self.rabbitmq_url, self.url_order);
        let (conn, _) = failover
            .connect("notify-admin-replay", Duration::from_secs(5))
            .await
            .map_err(|e| AdminError::Broker(e.to_string()))?;
        let channel = conn.create_channel().await.map_err(|e| AdminError::Broker(e.to_string()))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| AdminError::Broker(e.to_string()))?;
        Ok(Publisher { conn, channel })
    }

    /// Discards the selected dead letters for good (status `discarded`).
    pub async fn discard(&self, selector: &Selector, dry_run: bool, actor: &str) -> Result<Done, AdminError> {
        let (candidates, not_found) = self.candidates(selector).await?;
        let mut done = Done { matched: candidates.len(), not_found, ..Done::default() };
        if dry_run {
            done.ids = candidates;
        } else {
            let discarded = self.store.discard_dead_letters(&candidates).await?;
            done.not_found.extend(candidates.iter().filter(|id| !discarded.contains(id)));
            done.ids = discarded;
        }
        self.audit("discard", selector, dry_run, actor, &done).await;
        Ok(done)
    }

    /// Logs the action and writes its audit record (a failed write is logged, not fatal: the
    /// action is done, and the log line carries the same facts).
    async fn audit(&self, action: &str, selector: &Selector, dry_run: bool, actor: &str, done: &Done) {
        let described = selector.describe();
        tracing::info!(
            actor,
            action,
            dry_run,
            selector = %described,
            matched = done.matched,
            done = done.ids.len(),
            not_found = done.not_found.len(),
            refused = done.refused.len(),
            failed = done.failed.len(),
            "dead letters acted on"
        );
        let record = DeadLetterAction {
            actor,
            action,
            dry_run,
            selector: described,
            matched: done.matched as i32,
            done: done.ids.len() as i32,
            ids: &done.ids,
        };
        if let Err(e) = self.store.record_dead_letter_action(&record).await {
            tracing::warn!(error = %e, action, "could not write the audit record of a dead-letter action");
        }
    }
}

enum Step {
    Replayed,
    Refused(i32),
    NotFound,
    Failed(String),
}

struct Publisher {
    conn: lapin::Connection,
    channel: lapin::Channel,
}

impl Publisher {
    async fn close(self) {
        let _ = self.channel.close(200, "replay done".into()).await;
        let _ = self.conn.close(200, "replay done".into()).await;
    }
}

/// The stored properties of the dead message as a fresh first attempt, numbered as a replay.
fn replay_properties(stored: &serde_json::Value, replay: i32) -> BasicProperties {
    let text = |key: &str| stored.get(key).and_then(|v| v.as_str()).map(|s| s.to_string());
    let mut headers = FieldTable::default();
    headers.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(1));
    headers.insert(headers::REPLAYS.into(), AMQPValue::LongUInt(replay.max(0) as u32));
    let mut props = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
    if let Some(v) = text("message_id") {
        props = props.with_message_id(v.into());
    }
    if let Some(v) = text("correlation_id") {
        props = props.with_correlation_id(v.into());
    }
    if let Some(v) = text("content_type") {
        props = props.with_content_type(v.into());
    }
    if let Some(v) = text("type") {
        props = props.with_type(v.into());
    }
    if let Some(v) = stored.get("timestamp").and_then(|v| v.as_u64()) {
        props = props.with_timestamp(v);
    }
    props
}

/// Reads a filter from named text values (query parameters, JSON strings, CLI flags): every
/// problem as (field, message), all at once. `prefix` goes before field names (`filter.`).
pub fn parse_filter<'a>(
    fields: impl IntoIterator<Item = (&'a str, &'a str)>,
    prefix: &str,
) -> Result<DeadLetterFilter, Vec<(String, String)>> {
    let mut f = DeadLetterFilter::default();
    let mut errors = Vec::new();
    let time = |v: &str| DateTime::parse_from_rfc3339(v.trim()).map(|t| t.with_timezone(&Utc));
    for (name, value) in fields {
        let field = format!("{prefix}{name}");
        if value.contains('\0') {
            // PostgreSQL cannot compare text holding a NUL: no dead letter has one.
            errors.push((field, "must not contain NUL characters (\\u0000)".to_string()));
            continue;
        }
        match name {
            "channel" => match value.parse::<Channel>() {
                Ok(c) => f.channel = Some(c.as_str().to_string()),
                Err(e) => errors.push((field, e)),
            },
            "reason" if DEAD_REASONS.contains(&value) => f.reason = Some(value.to_string()),
            "reason" => {
                errors.push((field, format!("unknown reason `{value}` (expected one of: {})", DEAD_REASONS.join(", "))))
            }
            "event" if !value.trim().is_empty() => f.event = Some(value.to_string()),
            "error" if !value.is_empty() => f.error = Some(value.to_string()),
            "event" | "error" => errors.push((field, "must not be empty".to_string())),
            "since" | "until" => match time(value) {
                Ok(t) if name == "since" => f.since = Some(t),
                Ok(t) => f.until = Some(t),
                Err(e) => {
                    errors.push((field, format!("`{value}` is not an RFC 3339 time such as 2026-12-03T10:00:00Z: {e}")))
                }
            },
            other => errors.push((
                field,
                format!("`{other}` is not a filter (expected channel, event, reason, error, since, until)"),
            )),
        }
    }
    if let (Some(since), Some(until)) = (f.since, f.until) {
        if since >= until {
            errors.push((format!("{prefix}until"), "must be later than since".to_string()));
        }
    }
    if errors.is_empty() {
        Ok(f)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_name_their_bad_fields() {
        let f =
            parse_filter([("channel", "in-app"), ("reason", "max_attempts"), ("since", "2026-12-03T10:00:00Z")], "")
                .unwrap();
        assert_eq!(f.channel.as_deref(), Some("in_app"));
        assert_eq!(f.reason.as_deref(), Some("max_attempts"));
        let bad =
            parse_filter([("channel", "sms"), ("reason", "tired"), ("until", "yesterday"), ("x", "1")], "filter.")
                .unwrap_err();
        let names: Vec<&str> = bad.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(names, ["filter.channel", "filter.reason", "filter.until", "filter.x"]);
        let props = replay_properties(&serde_json::json!({"message_id": "m", "timestamp": 7}), 2);
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "m");
        assert_eq!(notify_types::broker::header_u32(&props, headers::REPLAYS), Some(2));
        assert_eq!(notify_types::broker::header_u32(&props, headers::ATTEMPT), Some(1));
    }
}
