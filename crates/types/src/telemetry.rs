//! Logging setup shared by both binaries: `RUST_LOG` filters, `LOG_FORMAT=json` for machines;
//! and the W3C trace context (`traceparent`) the API publishes with and the worker continues.

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

/// A W3C trace context, as carried in a `traceparent` header (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    /// The id of the span that sent it: the parent of the receiver's span.
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` for anything the W3C spec says to ignore (wrong
    /// lengths, upper-case or non-hex digits, all-zero ids, version `ff`).
    pub fn parse(value: &str) -> Option<TraceParent> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // A later version may append fields; version 00 has exactly four.
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let hex =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex(version, 2) || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
        let span_id = u64::from_str_radix(span, 16).ok().filter(|s| *s != 0)?;
        let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
        Some(TraceParent { trace_id, span_id, sampled })
    }

    /// A new trace (sampled: notify records every request).
    pub fn root() -> TraceParent {
        TraceParent { trace_id: rand::random::<u128>().max(1), span_id: new_span_id(), sampled: true }
    }

    /// The context a hop below this one sends: same trace, a new span id.
    pub fn child(&self) -> TraceParent {
        TraceParent { span_id: new_span_id(), ..*self }
    }

    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// The header value.
    pub fn header(&self) -> String {
        format!("00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, u8::from(self.sampled))
    }
}

fn new_span_id() -> u64 {
    rand::random::<u64>().max(1)
}

/// The trace context the API publishes a request's message with: a child of the caller's
/// `traceparent` when it sent a valid one (the request joins the caller's trace), else a new
/// trace.
pub fn outgoing(incoming: Option<&str>) -> TraceParent {
    incoming.and_then(TraceParent::parse).map_or_else(TraceParent::root, |parent| parent.child())
}

/// Makes `span` — the worker's delivery span — part of the trace in a message's `traceparent`
/// header: records its `trace_id` and `parent_span_id` (the publishing request's span), so the
/// delivery's log lines carry the trace of the request that caused them. `span` must declare
/// both fields (`trace_id = tracing::field::Empty, parent_span_id = tracing::field::Empty`);
/// a missing or malformed header records nothing. Returns the parsed context.
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: Option<&str>) -> Option<TraceParent> {
    let parent = traceparent.and_then(TraceParent::parse)?;
    span.record("trace_id", parent.trace_id_hex().as_str());
    span.record("parent_span_id", parent.span_id_hex().as_str());
    Some(parent)
}

#[cfg(test)]
mod tests {
    use super::TraceParent;

    #[test]
    fn traceparent_round_trips_and_rejects_what_w3c_ignores() {
        let tp = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.span_id_hex(), "00f067aa0ba902b7");
        assert!(tp.sampled);
        assert_eq!(tp.header(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let child = super::outgoing(Some(&tp.header()));
        assert_eq!(child.trace_id, tp.trace_id, "a child stays in the caller's trace");
        assert_ne!(child.span_id, tp.span_id);
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        let root = super::outgoing(Some("garbage"));
        assert_eq!(TraceParent::parse(&root.header()), Some(root), "a new trace when the caller's is invalid");
    }

    #[test]
    fn the_delivery_span_records_the_trace_of_the_request() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;
        // A subscriber that keeps what spans record, to see the fields a log line would show.
        #[derive(Clone, Default)]
        struct Recorded(Arc<Mutex<Vec<String>>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorded {
            fn on_record(
                &self,
                _: &tracing::span::Id,
                values: &tracing::span::Record<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                struct V<'a>(&'a mut Vec<String>);
                impl tracing::field::Visit for V<'_> {
                    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                        self.0.push(format!("{}={:?}", f.name(), v));
                    }
                }
                values.record(&mut V(&mut self.0.lock().unwrap()));
            }
        }
        let recorded = Recorded::default();
        let subscriber = tracing_subscriber::registry().with(recorded.clone());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "delivery",
                trace_id = tracing::field::Empty,
                parent_span_id = tracing::field::Empty
            );
            let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            assert!(super::set_parent_from_traceparent(&span, Some(header)).is_some());
            assert!(super::set_parent_from_traceparent(&span, Some("nonsense")).is_none());
        });
        let fields = recorded.0.lock().unwrap().clone();
        assert_eq!(fields, ["trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"", "parent_span_id=\"00f067aa0ba902b7\""]);
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(super::escape_controls("a\nb\r\u{1b}[31m\0c"), "a\\nb\\r\\u{1b}[31m\\0c");
        assert_eq!(super::escape_controls("plain é"), "plain é");
    }
}
