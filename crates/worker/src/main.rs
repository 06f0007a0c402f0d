use notify_types::config::Env;
use notify_worker::{Worker, WorkerConfig};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

notify_types::use_mimalloc!();

#[tokio::main]
async fn main() -> ExitCode {
    let env = Env::load();
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return healthcheck();
    }
    notify_types::telemetry::init(notify_types::telemetry::DEFAULT_FILTER);
    let config = match WorkerConfig::from_source(&env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("notify-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let result = async { Worker::build(config).await?.run(shutdown).await }.await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "notify-worker stopped");
            eprintln!("notify-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM (containers, systemd) or ctrl-c: stop consuming and finish in-flight deliveries.
async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested: finishing in-flight deliveries");
    shutdown.cancel();
}

/// `notify-worker healthcheck`: exit 0 when `GET /ready` on 127.0.0.1:`WORKER_HTTP_PORT`
/// answers 200, else 1. For container healthchecks in images without curl (as
/// `notify-api healthcheck`).
fn healthcheck() -> ExitCode {
    use std::io::{Read, Write};
    let port = std::env::var("WORKER_HTTP_PORT").ok().and_then(|p| p.parse::<u16>().ok()).unwrap_or(9920);
    let check = || -> std::io::Result<bool> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
        s.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut buf = [0u8; 32];
        let n = s.read(&mut buf)?;
        Ok(buf[..n].starts_with(b"HTTP/1.1 200") || buf[..n].starts_with(b"HTTP/1.0 200"))
    };
    match check() {
        Ok(true) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}
