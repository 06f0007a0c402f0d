//! Step 1 of `pipeline::process`: a broker delivery read once into a value. Nothing after this
//! step looks at the raw AMQP headers; the executor only copies them onto a republished message.

use lapin::message::Delivery;
use notify_types::{
    broker::{header_str, header_u32},
    headers, Channel, Envelope, EnvelopeError,
};

/// What the worker knows about a message before doing anything with it.
#[derive(Debug)]
pub struct Received {
    pub channel: Channel,
    /// 1-based number of this attempt (`x-notify-attempt`; 1 when missing).
    pub attempt: u32,
    /// Whether this is the last attempt `MAX_ATTEMPTS` allows.
    pub last_attempt: bool,
    /// Deliveries deferred so far because our own infrastructure was down (`x-notify-deferrals`).
    pub deferrals: u32,
    /// The message was sent before and only its record is due (`x-notify-sent`).
    pub sent: bool,
    /// The broker's flag: a previous delivery of this message was not settled.
    pub redelivered: bool,
    /// The W3C trace context the API published with, if any.
    pub traceparent: Option<String>,
    /// The AMQP message id (the notification id, also when the body can't be read).
    pub message_id: Option<String>,
    /// The envelope, or why the body is not one.
    pub envelope: Result<Envelope, EnvelopeError>,
}

impl Received {
    pub fn read(channel: Channel, delivery: &Delivery, max_attempts: u32) -> Received {
        let props = &delivery.properties;
        let attempt = header_u32(props, headers::ATTEMPT).unwrap_or(1).max(1);
        Received {
            channel,
            attempt,
            last_attempt: attempt >= max_attempts,
            deferrals: header_u32(props, headers::DEFERRALS).unwrap_or(0),
            sent: header_u32(props, headers::SENT).is_some(),
            redelivered: delivery.redelivered,
            traceparent: header_str(props, headers::TRACEPARENT),
            message_id: props.message_id().as_ref().map(|id| id.to_string()),
            envelope: Envelope::from_bytes(&delivery.data),
        }
    }

    /// The delivery's span: every log line of this message carries its ids, and the trace of
    /// the request that published it (`trace_id`, `parent_span_id` from `traceparent`).
    pub fn span(&self) -> tracing::Span {
        let channel = self.channel;
        let attempt = self.attempt;
        let span = match &self.envelope {
            Ok(env) => tracing::info_span!(
                "delivery",
                notification_id = %env.id,
                %channel,
                attempt,
                correlation_id = %env.correlation_id,
                producer = env.producer.as_deref().unwrap_or("-"),
                redelivered = self.redelivered,
                trace_id = tracing::field::Empty,
                parent_span_id = tracing::field::Empty,
            ),
            Err(_) => tracing::warn_span!(
                "delivery",
                %channel,
                attempt,
                message_id = ?self.message_id,
                trace_id = tracing::field::Empty,
                parent_span_id = tracing::field::Empty,
            ),
        };
        notify_types::telemetry::set_parent_from_traceparent(&span, self.traceparent.as_deref());
        span
    }
}
