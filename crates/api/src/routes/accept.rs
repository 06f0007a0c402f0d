//! The accept step shared by every POST: publish with confirms, answer 202 — and with an
//! `Idempotency-Key`, answer a repeated request with the first 202 without publishing again.

use super::answers::{self, Answer};
use super::AppState;
use crate::auth::Producer;
use crate::error::ApiError;
use actix_web::{http::StatusCode, HttpMessage, HttpRequest, HttpResponse};
use notify_store::{Begin, Store};
use notify_types::{broker::PublishError, Envelope};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// How long a repeated request waits for the first one with its key to finish.
const PENDING_WAIT: Duration = Duration::from_secs(10);
/// How long a request that finds its key stale waits for the owner before publishing again:
/// three of the owner's background attempts to save its answer.
const STALE_WAIT: Duration = Duration::from_secs(3 * answers::BACKGROUND_MAX_INTERVAL.as_secs());

pub struct Accept {
    pub env: Envelope,
    pub routing_key: String,
    /// The 202 body.
    pub body: serde_json::Value,
}

pub async fn accept(
    state: &AppState,
    req: &HttpRequest,
    request: &serde_json::Value,
    mut a: Accept,
) -> Result<HttpResponse, ApiError> {
    let producer = req.extensions().get::<Producer>().cloned().unwrap_or_else(Producer::anonymous);
    a.env.producer = Some(producer.0.clone());
    let Some(key) = idempotency_key(req)? else {
        publish(state, &a.env, &a.routing_key, traceparent(req)).await?;
        return Ok(accepted(&a.env, a.body));
    };
    // Keys are scoped to the producer: another API key's `k` is another key (names hold no `:`).
    let key = format!("{}:{key}", producer.0);
    // Canonical JSON (sorted keys) of path + body: the same request in other whitespace or key
    // order is the same request.
    let hash = hex(&Sha256::digest(format!("{}\n{}", req.path(), request)));
    // This process published under the key and has not saved the answer yet: that answer.
    if let Some(answer) = state.answers.get(&key) {
        return if answer.hash == hash { Ok(replay(answer.status, answer.body)) } else { Err(mismatch()) };
    }
    let store = state.store()?;
    for _ in 0..3 {
        match store.idempotency_begin(&key, &hash, state.clock.now()).await? {
            Begin::Owner => return own(state, store, &key, hash, a, traceparent(req)).await,
            Begin::Replay { status, body } => return Ok(replay(status, body)),
            Begin::Mismatch => return Err(mismatch()),
            Begin::Pending => {
                if let Some(Begin::Replay { status, body }) = store.idempotency_wait(&key, PENDING_WAIT).await? {
                    return Ok(replay(status, body));
                }
                // The first request gave up (its key was released): try to become the owner.
            }
            Begin::Stale => {
                // Its owner crashed, or it published and is still saving its answer (the
                // database was out of reach): give it a few of its retries before publishing
                // again.
                if let Some(Begin::Replay { status, body }) = store.idempotency_wait(&key, STALE_WAIT).await? {
                    return Ok(replay(status, body));
                }
                if store.idempotency_take_over(&key, &hash, state.clock.now()).await? {
                    return own(state, store, &key, hash, a, traceparent(req)).await;
                }
            }
        }
    }
    Err(ApiError::Conflict("a request with this Idempotency-Key is still in progress; retry later".into()))
}

/// The owner of a key publishes under the key's notification id and saves its answer.
async fn own(
    state: &AppState,
    store: &Store,
    key: &str,
    hash: String,
    mut a: Accept,
    trace: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    // The key's notification id: this request's, or the one an earlier attempt with this key
    // (a 503, a crash) may have published after all.
    let id = match store.idempotency_notification(key, a.env.id).await {
        Ok(id) => id,
        Err(e) => {
            release(store, key).await;
            return Err(e.into());
        }
    };
    a.set_id(id);
    if let Err(e) = publish(state, &a.env, &a.routing_key, trace).await {
        // Not accepted: the key keeps its id, and the caller's retry publishes under it.
        release(store, key).await;
        return Err(e);
    }
    let answer = Answer { hash, status: 202, body: a.body.clone() };
    answers::save(store, &state.answers, key, answer, id).await;
    Ok(accepted(&a.env, a.body))
}

fn mismatch() -> ApiError {
    ApiError::field("Idempotency-Key", "was already used with a different request; use a new key for a new request")
}

impl Accept {
    /// Publishes under `id` (an idempotency key's), in the envelope and the 202 body.
    fn set_id(&mut self, id: uuid::Uuid) {
        self.env.id = id;
        for field in ["id", "event_id"] {
            if let Some(v) = self.body.get_mut(field) {
                *v = serde_json::json!(id);
            }
        }
    }
}

async fn release(store: &Store, key: &str) {
    if let Err(e) = store.idempotency_abandon(key).await {
        tracing::warn!(error = %e, "could not release an idempotency key; it is retried after the takeover time");
    }
}

fn accepted(env: &Envelope, body: serde_json::Value) -> HttpResponse {
    HttpResponse::Accepted().insert_header(("X-Request-Id", env.correlation_id.clone())).json(body)
}

fn replay(status: u16, body: serde_json::Value) -> HttpResponse {
    HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::ACCEPTED))
        .insert_header(("Idempotent-Replayed", "true"))
        .json(body)
}

fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(raw) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    match raw.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()) => Ok(Some(k.to_string())),
        _ => Err(ApiError::field("Idempotency-Key", "must be 1 to 255 visible ASCII characters")),
    }
}

fn traceparent(req: &HttpRequest) -> Option<&str> {
    req.headers().get(notify_types::headers::TRACEPARENT).and_then(|v| v.to_str().ok())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Publishes and maps broker trouble to the caller's answer: 503 + Retry-After when it may
/// pass, 500 when the topology is wrong.
///
/// `traceparent`: the caller's W3C trace context header, if any; the message joins that trace.
pub async fn publish(
    state: &AppState,
    env: &Envelope,
    routing_key: &str,
    traceparent: Option<&str>,
) -> Result<(), ApiError> {
    let started = std::time::Instant::now();
    let trace = notify_types::telemetry::outgoing(traceparent);
    match state.publisher.publish(env, routing_key, &trace.header()).await {
        Ok(()) => {
            crate::metrics::accepted(env.channel.map_or("event", |c| c.as_str()));
            tracing::info!(id = %env.id, correlation_id = %env.correlation_id, trace_id = %trace.trace_id_hex(), producer = env.producer.as_deref().unwrap_or("-"), routing_key, elapsed_ms = started.elapsed().as_millis() as u64, "accepted");
            Ok(())
        }
        Err(e @ PublishError::Unroutable { .. }) => {
            tracing::error!(id = %env.id, error = %e, "message unroutable: the topology is missing a binding");
            Err(ApiError::Unexpected(anyhow::anyhow!(e)))
        }
        Err(e) => {
            tracing::warn!(id = %env.id, error = %e, "not accepted: broker unavailable");
            Err(ApiError::Unavailable {
                message: format!("the message broker is unavailable ({e}); the request was not accepted, retry later"),
                retry_after: Duration::from_secs(if matches!(e, PublishError::Blocked) { 10 } else { 5 }),
            })
        }
    }
}
