//! Logging setup shared by both binaries: `RUST_LOG` filters, `LOG_FORMAT=json` for machines.

use tracing_subscriber::{
    field::MakeExt,
    fmt::{self, FormatFields},
    EnvFilter,
};

/// The filter when `RUST_LOG` is unset. lapin's own log is off: every broker failure it logs
/// (as ERROR, several lines per attempt, some of them untrue for notify such as "backoff attempts
/// exhausted, aborting recovery") reaches notify as an error, which notify logs once, in its own
/// words, with what it does next. `RUST_LOG=info,lapin=debug` shows lapin's lines again.
pub const DEFAULT_FILTER: &str = "info,lapin=off";

pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("LOG_FORMAT").map(|v| v.eq_ignore_ascii_case("json")).unwrap_or(false);
    // Colours only for a person at a terminal: escape codes in files and container logs are
    // noise, and formatting them took about 7% of the API's CPU per request.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = fmt::fmt().with_env_filter(filter).with_target(true).with_ansi(ansi);
    let result = if json { builder.json().try_init() } else { builder.fmt_fields(text_fields()).try_init() };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}

/// Field formatting of the text log: like tracing's default, but every control character in a
/// value (CR, LF, ESC, ...) is written escaped (`\n`, `\u{1b}`), so text from a request (an
/// e-mail address, a URL, an error quoting them) can neither start a forged log line nor send
/// escape sequences to a terminal. JSON logs are escaped by JSON itself.
pub fn text_fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    fmt::format::debug_fn(|w, field, value| {
        let text = escape_controls(&format!("{value:?}"));
        if field.name() == "message" {
            write!(w, "{text}")
        } else {
            write!(w, "{field}={text}")
        }
    })
    .delimited(" ")
}

/// `text` with each control character replaced by its Rust escape.
pub fn escape_controls(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars().fold(String::with_capacity(text.len() + 8), |mut out, c| {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
        out
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(super::escape_controls("a\nb\r\u{1b}[31m\0c"), "a\\nb\\r\\u{1b}[31m\\0c");
        assert_eq!(super::escape_controls("plain é"), "plain é");
    }
}
