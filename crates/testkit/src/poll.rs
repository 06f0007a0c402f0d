//! Bounded polling, for outcomes nobody notifies us about (a queue's depth, a port closing).

use std::time::Duration;
use tokio::time::Instant;

/// Calls `probe` every `interval` until it returns `Ok`, or `timeout` has passed.
///
/// On timeout returns the last `Err` the probe gave (`None` only if it never ran), so callers
/// can say what they saw last. Bounded in time by `timeout` and in count by
/// `timeout / interval + 1` rounds, whichever comes first.
pub(crate) async fn poll<T, S>(
    timeout: Duration,
    interval: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, S>,
) -> Result<T, Option<S>> {
    let deadline = Instant::now() + timeout;
    let interval = interval.max(Duration::from_millis(1));
    let rounds = timeout.as_millis() / interval.as_millis() + 1;
    let mut last = None;
    for _ in 0..=rounds {
        match probe().await {
            Ok(value) => return Ok(value),
            Err(seen) => last = Some(seen),
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep_until((now + interval).min(deadline)).await;
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_first_success() {
        let mut calls = 0;
        let result: Result<u32, Option<u32>> = poll(Duration::from_secs(5), Duration::from_millis(1), async || {
            calls += 1;
            if calls == 3 {
                Ok(calls)
            } else {
                Err(calls)
            }
        })
        .await;
        assert_eq!(result, Ok(3));
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline_with_the_last_observation() {
        let started = Instant::now();
        let mut calls = 0u32;
        let result: Result<(), Option<u32>> = poll(Duration::from_millis(50), Duration::from_millis(10), async || {
            calls += 1;
            Err(calls)
        })
        .await;
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(50), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        assert_eq!(result, Err(Some(calls)));
        assert!(calls <= 7, "at most timeout/interval + 1 rounds, got {calls}");
    }
}
