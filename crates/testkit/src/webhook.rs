//! A real HTTP/1.1 server on 127.0.0.1 for webhook tests (hyper): it records every request,
//! answers 200 unless told otherwise ([`WebhookReceiver::script`], [`WebhookReceiver::always`]),
//! can stall ([`WebhookReceiver::set_delay`]), and can go away and come back on the same port
//! ([`WebhookReceiver::go_down`], [`WebhookReceiver::come_back`]).
//!
//! [`verify_signature`] checks Standard Webhooks signatures with its own HMAC, so a test does
//! not trust the worker's signing code to check itself.

use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::{
    body::{Bytes, Incoming},
    header::{HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER},
    server::conn::http1,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
    task::{JoinHandle, JoinSet},
};

/// A running test webhook receiver. Cloning shares it; it stops when the last clone drops.
#[derive(Clone)]
pub struct WebhookReceiver {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    state: Arc<watch::Sender<State>>,
    /// `None` while down.
    running: Mutex<Option<Running>>,
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let running = self.running.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(running) = running.take() {
            // The connections live in a JoinSet owned by the accept task, so this ends them too.
            running.task.abort();
        }
    }
}

/// What the connections record and the test reads. It lives in a watch channel so that
/// waiting for requests is a notification, not a sleep loop.
#[derive(Default)]
struct State {
    requests: Vec<ReceivedWebhook>,
    script: VecDeque<(u16, Option<String>)>,
    always: Option<u16>,
    delay: Duration,
}

impl State {
    /// The script first, then the standing status, then 200.
    fn next_reply(&mut self) -> (u16, Option<String>) {
        self.script.pop_front().or_else(|| self.always.map(|status| (status, None))).unwrap_or((200, None))
    }
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct ReceivedWebhook {
    /// Path and query, e.g. `/hooks/a?x=1`.
    pub path: String,
    /// Lowercase names; a repeated header's values joined with `, `.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// The status it was (or, during a delay, will be) answered with.
    pub status: u16,
}

impl ReceivedWebhook {
    /// The body as JSON.
    ///
    /// # Panics
    /// If the body is not JSON, showing it.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("webhook body on {} is not JSON ({e}): {:?}", self.path, String::from_utf8_lossy(&self.body))
        })
    }

    /// A header by name, in any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

impl WebhookReceiver {
    /// Starts a receiver on 127.0.0.1 with a free port that answers 200 to everything.
    pub async fn start() -> WebhookReceiver {
        let listener =
            TcpListener::bind("127.0.0.1:0").await.expect("binding the test webhook receiver to 127.0.0.1:0");
        let addr = listener.local_addr().expect("address of the test webhook receiver");
        let state = Arc::new(watch::Sender::new(State::default()));
        let running = Running::spawn(listener, state.clone());
        WebhookReceiver { inner: Arc::new(Inner { addr, state, running: Mutex::new(Some(running)) }) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:PORT{path}`; `path` should start with `/`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.inner.addr)
    }

    /// Statuses for the next requests, one consumed per request, each with an optional
    /// `Retry-After` value; afterwards 200 (or [`WebhookReceiver::always`]). A 3xx carries
    /// `Location: /redirected`, so a client that follows it shows up as another request.
    /// Replaces any script not yet consumed.
    ///
    /// # Panics
    /// On a status outside 100..=999.
    pub fn script(&self, replies: Vec<(u16, Option<String>)>) {
        for (status, _) in &replies {
            valid_status(*status);
        }
        self.inner.state.send_modify(|s| s.script = replies.into_iter().collect());
    }

    /// Every request gets `status` from now on (after any script), until
    /// [`WebhookReceiver::reset`].
    pub fn always(&self, status: u16) {
        valid_status(status);
        self.inner.state.send_modify(|s| s.always = Some(status));
    }

    /// Answer 200 again at once: clears the script, the standing status and the delay.
    /// Recorded requests stay.
    pub fn reset(&self) {
        self.inner.state.send_modify(|s| {
            s.script.clear();
            s.always = None;
            s.delay = Duration::ZERO;
        });
    }

    /// Holds each request this long (after recording it) before answering, to make a client
    /// time out or to keep a delivery in flight.
    pub fn set_delay(&self, delay: Duration) {
        self.inner.state.send_modify(|s| s.delay = delay);
    }

    /// Closes the port and every open connection (kept-alive ones included), so clients get
    /// "connection refused" until [`WebhookReceiver::come_back`]. Requests being answered are
    /// cut off (they stay recorded). Does nothing if already down.
    pub async fn go_down(&self) {
        let running = self.lock_running().take();
        if let Some(running) = running {
            // The accept task may already be gone (e.g. aborted); either way the port is shut.
            let _ = running.stop.send(());
            let _ = running.task.await;
        }
    }

    /// Listens again on the same port. Does nothing if not down.
    ///
    /// # Panics
    /// If the port cannot be bound again within a few seconds (another process took it).
    pub async fn come_back(&self) {
        if self.lock_running().is_some() {
            return;
        }
        let mut attempts = 0;
        let listener = loop {
            // tokio sets SO_REUSEADDR, so our own closed connections in TIME_WAIT do not block
            // this; retrying covers a port that is briefly held elsewhere.
            match TcpListener::bind(self.inner.addr).await {
                Ok(listener) => break listener,
                Err(e) if attempts >= 50 => {
                    panic!("test webhook receiver: cannot bind {} again: {e}", self.inner.addr)
                }
                Err(_) => attempts += 1,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let running = Running::spawn(listener, self.inner.state.clone());
        let mut slot = self.lock_running();
        match slot.as_ref() {
            // A concurrent `come_back` won; ours stops again when dropped (its `stop` closes).
            Some(_) => drop(running),
            None => *slot = Some(running),
        }
    }

    /// Every request received, in order, whatever it was answered.
    pub fn requests(&self) -> Vec<ReceivedWebhook> {
        self.inner.state.borrow().requests.clone()
    }

    /// The requests answered (or being answered) 2xx, in order.
    pub fn delivered(&self) -> Vec<ReceivedWebhook> {
        let state = self.inner.state.borrow();
        state.requests.iter().filter(|r| is_2xx(r.status)).cloned().collect()
    }

    /// Waits until at least `n` requests were answered 2xx and returns all of those.
    ///
    /// # Panics
    /// After `timeout`, saying how many requests arrived and how they were answered.
    pub async fn wait_for_delivered(&self, n: usize, timeout: Duration) -> Vec<ReceivedWebhook> {
        let done = |s: &State| s.requests.iter().filter(|r| is_2xx(r.status)).count() >= n;
        self.wait_until(timeout, done, &format!("{n} delivered webhook(s)")).await;
        self.delivered()
    }

    /// Waits until at least `n` requests arrived, whatever they were answered.
    ///
    /// # Panics
    /// After `timeout`, saying how many requests arrived and how they were answered.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) {
        let what = format!("{n} webhook request(s)");
        self.wait_until(timeout, |s| s.requests.len() >= n, &what).await;
    }

    async fn wait_until(&self, timeout: Duration, done: impl FnMut(&State) -> bool, what: &str) {
        let mut changes = self.inner.state.subscribe();
        // `wait_for` checks the current state first, then wakes on every change; the sender
        // lives as long as `self`, so it cannot fail.
        let reached = tokio::time::timeout(timeout, changes.wait_for(done)).await;
        if reached.is_err() {
            let s = self.inner.state.borrow();
            let statuses: Vec<u16> = s.requests.iter().map(|r| r.status).collect();
            panic!(
                "test webhook receiver {}: waited {timeout:?} for {what}, but {} request(s) \
                 arrived, {} of them delivered (statuses in order: {statuses:?})",
                self.inner.addr,
                s.requests.len(),
                statuses.iter().filter(|status| is_2xx(**status)).count(),
            );
        }
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.inner.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn is_2xx(status: u16) -> bool {
    (200..300).contains(&status)
}

fn valid_status(status: u16) {
    assert!(StatusCode::from_u16(status).is_ok(), "test webhook receiver: {status} is not an HTTP status");
}

impl Running {
    fn spawn(listener: TcpListener, state: Arc<watch::Sender<State>>) -> Running {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, state, stopped));
        Running { stop, task }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<watch::Sender<State>>, mut stop: oneshot::Receiver<()>) {
    // Owning the connections here means stopping (or aborting) this task ends them.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            // A send or a dropped sender: both mean stop.
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve(stream, state.clone()));
                }
                // E.g. out of file descriptors: wait instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            // Reaps finished connections so the set does not grow over a long test.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn serve(stream: TcpStream, state: Arc<watch::Sender<State>>) {
    let service = service_fn(move |request| answer(request, state.clone()));
    // A client that hangs up mid-request is normal in these tests.
    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
}

async fn answer(
    request: Request<Incoming>,
    state: Arc<watch::Sender<State>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path_and_query().map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let mut headers: HashMap<String, String> = HashMap::new();
    for (name, value) in request.headers() {
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_string())
            .and_modify(|seen| {
                seen.push_str(", ");
                seen.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes().to_vec(),
        // The client went away mid-body: nothing was received, nobody to answer.
        Err(_) => return Ok(Response::new(Full::default())),
    };

    let (mut reply, mut delay) = ((200, None), Duration::ZERO);
    state.send_modify(|s| {
        reply = s.next_reply();
        delay = s.delay;
        s.requests.push(ReceivedWebhook { path, headers, body, status: reply.0 });
    });
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let (status, retry_after) = reply;
    let status = StatusCode::from_u16(status).expect("checked by script/always");
    let mut response = Response::new(Full::new(Bytes::from(status.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if status.is_redirection() {
        headers.insert(LOCATION, HeaderValue::from_static("/redirected"));
    }
    if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
        headers.insert(RETRY_AFTER, value);
    }
    Ok(response)
}

/// True when `webhook-signature` holds a `v1,<base64>` entry (entries are space-separated) that
/// is the HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{body}` under `secret` — the base64
/// after `whsec_`, or the secret's own bytes without that prefix. Does not judge the timestamp's
/// age.
pub fn verify_signature(secret: &str, received: &ReceivedWebhook) -> bool {
    let (Some(id), Some(timestamp), Some(signatures)) =
        (received.header("webhook-id"), received.header("webhook-timestamp"), received.header("webhook-signature"))
    else {
        return false;
    };
    let key = match secret.strip_prefix("whsec_") {
        Some(encoded) => match BASE64.decode(encoded) {
            Ok(key) => key,
            Err(_) => return false,
        },
        None => secret.as_bytes().to_vec(),
    };
    signatures
        .split(' ')
        .filter_map(|entry| entry.trim_end_matches(',').strip_prefix("v1,"))
        .filter_map(|encoded| BASE64.decode(encoded).ok())
        .any(|signature| {
            let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
            for part in [id.as_bytes(), b".", timestamp.as_bytes(), b".", &received.body] {
                mac.update(part);
            }
            mac.verify_slice(&signature).is_ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_comes_before_the_standing_status_and_then_200() {
        let mut state =
            State { script: vec![(503, Some("1".to_string()))].into(), always: Some(500), ..State::default() };
        assert_eq!(state.next_reply(), (503, Some("1".to_string())));
        assert_eq!(state.next_reply(), (500, None));
        state.always = None;
        assert_eq!(state.next_reply(), (200, None));
    }
}
