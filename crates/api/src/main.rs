use notify_api::{ApiConfig, Application};
use notify_types::config::Env;
use std::process::ExitCode;

notify_types::use_mimalloc!();

fn main() -> ExitCode {
    let env = Env::load();
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return healthcheck();
    }
    notify_types::telemetry::init(notify_types::telemetry::DEFAULT_FILTER);
    let config = match ApiConfig::from_source(&env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("notify-api: {e}");
            return ExitCode::from(2);
        }
    };
    let result = actix_web::rt::System::new().block_on(async move {
        let app = Application::build(config).await?;
        app.run_until_stopped().await?;
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "notify-api stopped");
            eprintln!("notify-api: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `notify-api healthcheck`: exit 0 when `GET /ready` on the local port answers 200. For
/// container healthchecks in images without curl.
fn healthcheck() -> ExitCode {
    use std::io::{Read, Write};
    let port = std::env::var("API_PORT").ok().and_then(|p| p.parse::<u16>().ok()).unwrap_or(9919);
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
