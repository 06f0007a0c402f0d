use crate::channel::Channel;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Version of the envelope layout. A worker refuses (dead-letters) envelopes of a version it
/// does not know instead of guessing.
pub const ENVELOPE_VERSION: u32 = 1;

/// What the API publishes and the worker consumes; the same struct on both sides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u32,
    pub id: Uuid,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
    pub created_at: DateTime<Utc>,
    /// The API's request id: links the logs of both binaries.
    pub correlation_id: String,
    /// Who sent it: the name of the API key the request was authenticated with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer: Option<String>,
    pub payload: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A notification addressed to one channel (`POST /api/v1/notifications/{channel}`).
    Direct,
    /// A business event routed to the channels configured for it.
    Event,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Event => "event",
        }
    }
}

/// Payload of a direct e-mail notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailMessage {
    pub to: String,
    pub subject: String,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
}

impl Envelope {
    /// A new direct notification for `channel`, with a time-ordered (v7) id.
    pub fn direct(channel: Channel, correlation_id: String, payload: serde_json::Value) -> Self {
        Envelope {
            version: ENVELOPE_VERSION,
            id: Uuid::now_v7(),
            kind: Kind::Direct,
            event: None,
            channel: Some(channel),
            created_at: Utc::now(),
            correlation_id,
            producer: None,
            payload,
        }
    }

    /// The same envelope, marked as sent by `producer`.
    pub fn with_producer(mut self, producer: &str) -> Self {
        self.producer = Some(producer.to_string());
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serializes")
    }

    /// Parses a message body, refusing unknown versions.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let env: Envelope = serde_json::from_slice(bytes).map_err(EnvelopeError::Malformed)?;
        if env.version != ENVELOPE_VERSION {
            return Err(EnvelopeError::Version(env.version));
        }
        Ok(env)
    }
}

/// Why a message body is not an envelope this build can deliver.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("bad envelope: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("unsupported envelope version {0}")]
    Version(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_and_rejects_unknown_versions() {
        let env = Envelope::direct(Channel::Email, "req-1".into(), serde_json::json!({"to": "a@b.c"}));
        let back = Envelope::from_bytes(&env.to_bytes()).unwrap();
        assert_eq!(back, env);
        let mut v = serde_json::to_value(&env).unwrap();
        v["version"] = 99.into();
        let err = Envelope::from_bytes(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(err, EnvelopeError::Version(99)), "{err}");
        assert!(Envelope::from_bytes(b"not json").is_err());
    }
}

/// Payload of a direct in-app notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InAppMessage {
    pub user: String,
    pub title: String,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// Payload of a direct webhook notification: `payload` is POSTed to `url` as it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookMessage {
    pub url: String,
    pub payload: serde_json::Value,
}

/// Payload of an event envelope: what the producer posted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventPayload {
    pub user_target: String,
    pub payload: serde_json::Value,
}

impl Envelope {
    /// A new business event, routed by name to the channels configured for it.
    pub fn event(event: &str, correlation_id: String, payload: &EventPayload) -> Self {
        Envelope {
            version: ENVELOPE_VERSION,
            id: Uuid::now_v7(),
            kind: Kind::Event,
            event: Some(event.to_string()),
            channel: None,
            created_at: Utc::now(),
            correlation_id,
            producer: None,
            payload: serde_json::to_value(payload).expect("an event payload always serializes"),
        }
    }
}
