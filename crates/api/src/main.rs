use notify_api::{ApiConfig, Application};
use notify_types::config::Env;
use std::process::ExitCode;

notify_types::use_mimalloc!();

fn main() -> ExitCode {
    let env = Env::load();
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return notify_types::probe::healthcheck("API_PORT", 9919);
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
