//! Helpers against the machine's RabbitMQ (`RABBITMQ_URL`). Tests share that broker, so each
//! one works under its own [`unique_prefix`] and deletes its topology at the end.
//!
//! These are test helpers: a broker that misbehaves is a failed test, so they panic with a
//! message naming the queue instead of returning errors.

use crate::poll::poll;
use lapin::{
    options::{BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
    BasicProperties, Connection,
};
use notify_types::{Channel, Topology};
use std::time::Duration;

/// Where the broker is when `RABBITMQ_URL` is not set: the local node, default vhost.
pub const DEFAULT_RABBITMQ_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Queue depths change within milliseconds; each probe opens and closes a channel.
const COUNT_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Keeps prefixes (and so queue names) short and readable in the management UI.
const MAX_TEST_NAME: usize = 40;

/// `RABBITMQ_URL`, or [`DEFAULT_RABBITMQ_URL`].
pub fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_RABBITMQ_URL.to_string())
}

/// A topology prefix of one test run, e.g. `t-email_is_retried-1a2b3c4d`: the test's name (so
/// leftovers in the management UI say who made them) and random hex (so parallel and repeated
/// runs never share queues). Only `[a-z0-9-_.]`.
pub fn unique_prefix(test: &str) -> String {
    let name: String = test
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .take(MAX_TEST_NAME)
        .collect();
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("t-{name}-{}", &random[..8])
}

/// Connects to [`rabbitmq_url`].
pub async fn connect() -> Connection {
    connect_to(&rabbitmq_url()).await
}

/// Connects to `url` the way notify does (heartbeat, bounded by a timeout).
///
/// # Panics
/// If the broker cannot be reached, naming the URL without its password.
pub async fn connect_to(url: &str) -> Connection {
    notify_types::broker::connect(url, "notify-testkit", CONNECT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ at {}: {e}", notify_types::config::redact_url(url)))
}

/// Ready messages in `queue`, from a passive declare; `None` if the queue does not exist.
pub async fn message_count(conn: &Connection, queue: &str) -> Option<u32> {
    // A passive declare of a missing queue closes its channel (404), so each call has its own,
    // and closes it otherwise: polling must not use up the connection's channel ids.
    let ch = open_channel(conn).await;
    let declared = ch
        .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await;
    match declared {
        Ok(q) => {
            let _ = ch.close(200, "counted".into()).await;
            Some(q.message_count())
        }
        Err(e) if is_not_found(&e) => None,
        Err(e) => panic!("counting messages in queue `{queue}` failed: {e}"),
    }
}

/// Waits until `queue` holds exactly `n` ready messages.
///
/// # Panics
/// After `timeout`, with the last count seen (or that the queue does not exist).
pub async fn wait_for_count(conn: &Connection, queue: &str, n: u32, timeout: Duration) {
    let reached = poll(timeout, COUNT_POLL_INTERVAL, async || match message_count(conn, queue).await {
        Some(count) if count == n => Ok(()),
        other => Err(other),
    })
    .await;
    if let Err(last) = reached {
        let seen = match last.flatten() {
            Some(count) => format!("{count} ready message(s)"),
            None => "no such queue".to_string(),
        };
        panic!("queue `{queue}`: waited {timeout:?} for {n} ready message(s), last saw {seen}");
    }
}

/// Takes up to `max` messages off `queue` (basic.get, then ack) and returns their properties
/// and bodies, e.g. to read a dead letter's reason headers. Stops early when the queue is
/// empty or missing.
pub async fn drain(conn: &Connection, queue: &str, max: usize) -> Vec<(BasicProperties, Vec<u8>)> {
    let ch = open_channel(conn).await;
    let mut taken = Vec::new();
    for _ in 0..max {
        let message = match ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(e) if is_not_found(&e) => return taken,
            Err(e) => panic!("basic.get on queue `{queue}` failed: {e}"),
        };
        let delivery = message.delivery;
        let acked = delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap_or_else(|e| panic!("ack of a message from `{queue}` failed: {e}"));
        // `Ok(false)` means the channel died: the message goes back to the queue, so handing
        // it out as taken would be a lie.
        assert!(acked, "ack of a message from `{queue}` was not sent (channel closed)");
        taken.push((delivery.properties, delivery.data));
    }
    let _ = ch.close(200, "drained".into()).await;
    taken
}

/// Deletes every queue of `topology` (all channels) and its exchange; missing ones are fine,
/// so this also cleans up after a test that failed half-way.
pub async fn delete_topology(conn: &Connection, topology: &Topology) {
    let all = Channel::ALL.into_iter().flat_map(|c| topology.queues(c)).chain([topology.probe_queue()]);
    {
        for queue in all {
            let ch = open_channel(conn).await;
            match ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await {
                Ok(_) => {
                    let _ = ch.close(200, "deleted".into()).await;
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => panic!("deleting queue `{queue}` failed: {e}"),
            }
        }
    }
    let exchange = topology.exchange();
    let ch = open_channel(conn).await;
    match ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await {
        Ok(()) => {
            let _ = ch.close(200, "deleted".into()).await;
        }
        Err(e) if is_not_found(&e) => {}
        Err(e) => panic!("deleting exchange `{exchange}` failed: {e}"),
    }
}

async fn open_channel(conn: &Connection) -> lapin::Channel {
    conn.create_channel().await.unwrap_or_else(|e| panic!("opening a RabbitMQ channel failed: {e}"))
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_safe_names_and_unique() {
        let a = unique_prefix("tests::Email is retried!");
        let b = unique_prefix("tests::Email is retried!");
        assert_ne!(a, b);
        assert!(a.starts_with("t-tests--email-is-retried--"), "{a}");
        assert_eq!(a.len(), "t-tests--email-is-retried--".len() + 8);
        assert!(a.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c)));
    }

    #[test]
    fn passwords_are_hidden_in_messages() {
        assert_eq!(
            notify_types::config::redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(notify_types::config::redact_url("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
