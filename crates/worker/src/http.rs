//! The worker's own small HTTP port (`WORKER_HTTP_HOST`:`WORKER_HTTP_PORT`, default
//! 0.0.0.0:9920), for Kubernetes probes and Prometheus:
//! - `GET /health`: the process answers (liveness); no dependency is checked, so a broker or
//!   database outage never gets the worker restarted, only taken out of readiness;
//! - `GET /ready`: consuming from RabbitMQ and Postgres reachable, as JSON shaped like the
//!   API's `/ready` (200 or 503 with `Retry-After`);
//! - `GET /metrics`: the Prometheus text exposition.
//!
//! hyper's HTTP/1 server, already in the build through reqwest and the test kit: three fixed
//! paths need no router, and axum would add tower and its layers for nothing.

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use notify_store::Store;
use serde_json::json;
use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinSet,
};

/// How long `/ready` waits for Postgres: below the probes' timeout, so a hung database shows
/// as "unreachable" instead of a probe timeout.
const DB_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// A client that has not sent its request head by then is dropped (slow or stuck scrapers).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; probes and a scraper need a handful.
const MAX_CONNECTIONS: usize = 64;

/// What the consume loop tells `/ready`: whether a session is consuming right now.
#[derive(Debug, Default)]
pub struct Readiness {
    consuming: AtomicBool,
}

impl Readiness {
    /// Set when every consumer of a session has started; cleared the moment the session ends
    /// (connection lost, consumer cancelled, shutdown), before in-flight deliveries drain.
    pub fn set_consuming(&self, on: bool) {
        self.consuming.store(on, Ordering::Release);
    }

    pub fn consuming(&self) -> bool {
        self.consuming.load(Ordering::Acquire)
    }
}

/// What the handlers read.
pub struct State {
    pub readiness: Arc<Readiness>,
    pub store: Store,
    /// Sets the gauges that are sampled at scrape time (the SMTP pool) before rendering.
    pub sample: Box<dyn Fn() + Send + Sync>,
}

/// Binds the listener (at start, so a port in use fails the start, naming the address).
pub async fn bind(host: &str, port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .map_err(|e| anyhow::anyhow!("WORKER_HTTP_HOST / WORKER_HTTP_PORT: cannot listen on {host}:{port}: {e}"))
}

/// The running listener; dropping it stops serving.
pub struct Server(tokio::task::JoinHandle<()>);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves on `listener` until the returned [`Server`] is dropped.
pub fn spawn(listener: TcpListener, state: Arc<State>) -> Server {
    Server(tokio::spawn(serve(listener, state)))
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        connections.spawn(connection(stream, state.clone(), permit));
                    }
                    // Over the limit: closing at once beats queueing a probe past its timeout.
                    Err(_) => drop(stream),
                },
                // E.g. out of file descriptors: wait instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            // Reaps finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn connection(stream: TcpStream, state: Arc<State>, _permit: tokio::sync::OwnedSemaphorePermit) {
    let service = service_fn(move |request| answer(request, state.clone()));
    // A client that hangs up mid-request concerns that connection only.
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn answer(request: Request<Incoming>, state: Arc<State>) -> Result<Response<Full<Bytes>>, Infallible> {
    let head = request.method() == Method::HEAD;
    if request.method() != Method::GET && !head {
        let mut response = json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({"error": "only GET and HEAD"}));
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let mut response = match request.uri().path() {
        "/health" => json_response(StatusCode::OK, &json!({"status": "ok"})),
        "/ready" => ready(&state).await,
        "/metrics" => {
            (state.sample)();
            let mut r = Response::new(Full::new(Bytes::from(notify_types::metrics::render())));
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            r
        }
        _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not found: /health, /ready, /metrics"})),
    };
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if head {
        *response.body_mut() = Full::new(Bytes::new());
    }
    Ok(response)
}

/// Ready: consuming from RabbitMQ and Postgres reachable. The same shape as the API's
/// `/ready`; `broker` is `connected` only while consuming.
async fn ready(state: &State) -> Response<Full<Bytes>> {
    let consuming = state.readiness.consuming();
    let database = match tokio::time::timeout(DB_PING_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => "connected",
        _ => "unreachable",
    };
    let ok = consuming && database == "connected";
    let body = json!({
        "status": if ok { "ready" } else { "not_ready" },
        "checks": {"broker": if consuming { "connected" } else { "disconnected" }, "database": database},
    });
    if ok {
        json_response(StatusCode::OK, &body)
    } else {
        let mut response = json_response(StatusCode::SERVICE_UNAVAILABLE, &body);
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("5"));
        response
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
