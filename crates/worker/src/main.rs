use notify_types::config::Env;
use notify_worker::{Worker, WorkerConfig};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

notify_types::use_mimalloc!();

#[tokio::main]
async fn main() -> ExitCode {
    let env = Env::load();
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return notify_types::probe::healthcheck("WORKER_HTTP_PORT", 9920);
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
