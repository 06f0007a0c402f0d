//! HTTP load against the API (hyper, one keep-alive connection per task, so the connection
//! count is exact) and the timestamping webhook receiver of the end-to-end phase.

use crate::stats::{rate, Latencies};
use http_body_util::{BodyExt, Full};
use hyper::{
    body::{Bytes, Incoming},
    client::conn::http1::SendRequest,
    header::{AUTHORIZATION, CONTENT_TYPE, HOST},
    server::conn::http1 as server_http1,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::{net::TcpListener, task::JoinSet};

/// Connection errors a task tolerates (reconnecting each time) before it gives up.
const MAX_ERRORS_PER_CONN: u64 = 20;
/// Upper bound on one request; a slower one counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub struct Api {
    pub addr: SocketAddr,
    pub auth: String,
}

#[derive(Debug, Default)]
pub struct LoadResult {
    /// 202 answers over the whole run (warm-up included): what the queue must hold.
    pub accepted_total: u64,
    /// 202 answers completed inside the measured window.
    pub accepted_window: u64,
    pub other_status: u64,
    pub errors: u64,
    pub window: Duration,
    pub latency: Latencies,
    pub first_problem: Option<String>,
}

impl LoadResult {
    pub fn rate(&self) -> f64 {
        rate(self.accepted_window, self.window)
    }

    fn merge(&mut self, o: LoadResult) {
        self.accepted_total += o.accepted_total;
        self.accepted_window += o.accepted_window;
        self.other_status += o.other_status;
        self.errors += o.errors;
        self.latency.extend(o.latency);
        if self.first_problem.is_none() {
            self.first_problem = o.first_problem;
        }
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn post(api: &Api, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::post(path)
        .header(HOST, api.addr.to_string())
        .header(CONTENT_TYPE, "application/json")
        .header(AUTHORIZATION, &api.auth)
        .body(Full::new(body))
        .expect("a valid request")
}

/// Sends one request on `sender` (reconnecting first if it is gone) and returns the status.
async fn send(
    api: &Api,
    sender: &mut Option<SendRequest<Full<Bytes>>>,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<StatusCode> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        *sender = Some(connect(api.addr).await?);
    }
    let s = sender.as_mut().expect("connected above");
    let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
        s.ready().await?;
        let res = s.send_request(req).await?;
        let status = res.status();
        res.into_body().collect().await?;
        anyhow::Ok(status)
    })
    .await;
    match result {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(e)) => {
            *sender = None;
            Err(e)
        }
        Err(_) => {
            *sender = None;
            anyhow::bail!("no answer within {REQUEST_TIMEOUT:?}")
        }
    }
}

/// Closed loop: `conns` connections, each sending the next request as soon as the previous
/// one is answered, for `warmup + window`. Rate and latency count only requests that completed
/// inside the window; `accepted_total` counts every 202.
pub async fn closed_loop(
    api: &Api,
    path: &'static str,
    body: Bytes,
    conns: usize,
    warmup: Duration,
    window: Duration,
) -> LoadResult {
    let start = Instant::now();
    let (measure_from, end) = (start + warmup, start + warmup + window);
    let mut tasks = JoinSet::new();
    for _ in 0..conns {
        let (api, body) = (api.clone(), body.clone());
        tasks.spawn(async move {
            let mut r = LoadResult::default();
            let mut sender = None;
            while Instant::now() < end && r.errors < MAX_ERRORS_PER_CONN {
                let sent = Instant::now();
                match send(&api, &mut sender, post(&api, path, body.clone())).await {
                    Ok(StatusCode::ACCEPTED) => {
                        r.accepted_total += 1;
                        let done = Instant::now();
                        if done >= measure_from && done <= end {
                            r.accepted_window += 1;
                            r.latency.push(done - sent);
                        }
                    }
                    Ok(other) => {
                        r.other_status += 1;
                        r.first_problem.get_or_insert_with(|| format!("HTTP {other}"));
                    }
                    Err(e) => {
                        r.errors += 1;
                        r.first_problem.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            r
        });
    }
    let mut out = LoadResult { window, ..Default::default() };
    while let Some(r) = tasks.join_next().await {
        out.merge(r.expect("load task panicked"));
    }
    out
}

/// Open loop at `rate_per_s` for `duration`: request `i` is due at `i / rate` after the start
/// and is sent then (or at once when its connection is late); `make(i, due_ns)` builds its body,
/// `due_ns` counted from `base`. Returns the 202 count and problems (latency is measured where
/// the request ends up).
pub async fn open_loop(
    api: &Api,
    path: &'static str,
    make: Arc<dyn Fn(u64, u64) -> Bytes + Send + Sync>,
    conns: usize,
    rate_per_s: f64,
    duration: Duration,
    base: Instant,
) -> LoadResult {
    let start = Instant::now();
    let offset = (start - base).as_nanos() as u64;
    let mut tasks = JoinSet::new();
    for k in 0..conns {
        let (api, make) = (api.clone(), make.clone());
        tasks.spawn(async move {
            let mut r = LoadResult::default();
            let mut sender = None;
            for round in 0u64.. {
                let i = round * conns as u64 + k as u64;
                let due = Duration::from_secs_f64(i as f64 / rate_per_s);
                if due >= duration || r.errors >= MAX_ERRORS_PER_CONN {
                    break;
                }
                tokio::time::sleep_until((start + due).into()).await;
                let body = make(i, offset + due.as_nanos() as u64);
                match send(&api, &mut sender, post(&api, path, body)).await {
                    Ok(StatusCode::ACCEPTED) => r.accepted_total += 1,
                    Ok(other) => {
                        r.other_status += 1;
                        r.first_problem.get_or_insert_with(|| format!("HTTP {other}"));
                    }
                    Err(e) => {
                        r.errors += 1;
                        r.first_problem.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            r
        });
    }
    let mut out = LoadResult { window: duration, ..Default::default() };
    while let Some(r) = tasks.join_next().await {
        out.merge(r.expect("load task panicked"));
    }
    out.accepted_window = out.accepted_total;
    out
}

/// `GET path` → status, for readiness checks.
pub async fn get_status(addr: SocketAddr, path: &str) -> anyhow::Result<StatusCode> {
    let mut sender = connect(addr).await?;
    let req = Request::get(path).header(HOST, addr.to_string()).body(Full::new(Bytes::new()))?;
    let res = tokio::time::timeout(Duration::from_secs(2), sender.send_request(req)).await??;
    Ok(res.status())
}

/// A webhook receiver that stamps arrival: `POST /e2e/<due_ns>` records `(due_ns, now - due_ns)`
/// (both counted from `base`, latency in microseconds) and answers 200.
pub struct StampReceiver {
    pub addr: SocketAddr,
    stamps: Arc<Mutex<Vec<(u64, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StampReceiver {
    pub async fn start(base: Instant) -> anyhow::Result<StampReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stamps = Arc::new(Mutex::new(Vec::new()));
        let lat = stamps.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        let lat = lat.clone();
                        conns.spawn(async move {
                            let service = service_fn(move |req: Request<Incoming>| {
                                let lat = lat.clone();
                                async move {
                                    let now = base.elapsed().as_nanos() as u64;
                                    let due = req.uri().path().strip_prefix("/e2e/").and_then(|s| s.parse::<u64>().ok());
                                    let _ = req.into_body().collect().await;
                                    if let Some(due) = due {
                                        lat.lock().unwrap().push((due, now.saturating_sub(due) / 1000));
                                    }
                                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                                }
                            });
                            let _ = server_http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(StampReceiver { addr, stamps, task })
    }

    pub fn count(&self) -> usize {
        self.stamps.lock().unwrap().len()
    }

    /// Latencies of the requests due at or after `from_ns`.
    pub fn latencies_from(&self, from_ns: u64) -> Latencies {
        let mut out = Latencies::default();
        for (due, us) in self.stamps.lock().unwrap().iter() {
            if *due >= from_ns {
                out.push_micros(*us);
            }
        }
        out
    }
}

impl Drop for StampReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
