//! The messages every phase sends: the same text, shaped as the API receives it (a request
//! body) or as it publishes it (an envelope), so raw and notify move the same bytes.

use hyper::body::Bytes;
use notify_types::{Channel, EmailMessage, Envelope, InAppMessage, WebhookMessage};

const BODY_TEXT: &str = "Hello! Your weekly report is ready: 12 new comments, 3 mentions and 1 pull request \
                         waiting for your review. See you soon.";

/// An e-mail envelope as the API builds it from [`email_request`].
pub fn email_envelope(i: u64) -> Envelope {
    let msg = EmailMessage {
        to: format!("user{i}@example.com"),
        subject: "Your weekly report".into(),
        body: BODY_TEXT.into(),
        html: None,
    };
    Envelope::direct(Channel::Email, uuid::Uuid::now_v7().to_string(), serde_json::to_value(&msg).unwrap())
}

pub fn email_request() -> Bytes {
    let body = serde_json::json!({"to": "user@example.com", "subject": "Your weekly report", "body": BODY_TEXT});
    Bytes::from(serde_json::to_vec(&body).unwrap())
}

/// Message `i` of a pre-filled channel queue: what the API would have published.
pub fn channel_envelope(channel: Channel, i: u64, webhook_url: &str) -> Envelope {
    let payload = match channel {
        Channel::Email => return email_envelope(i),
        Channel::InApp => serde_json::to_value(InAppMessage {
            user: format!("user-{}", i % 100),
            title: "Your weekly report".into(),
            body: BODY_TEXT.into(),
            data: Some(serde_json::json!({"n": i})),
        }),
        Channel::Webhook => serde_json::to_value(WebhookMessage {
            url: webhook_url.to_string(),
            payload: serde_json::json!({"n": i, "text": BODY_TEXT}),
        }),
    };
    Envelope::direct(channel, uuid::Uuid::now_v7().to_string(), payload.unwrap())
}
