//! Table-driven tests of [`plan`]: no broker, no database; clock and rng are fixed.

use super::*;
use crate::outcome::DeadReason;
use notify_types::{Channel, Envelope, QueueType};
use rand::{rngs::StdRng, SeedableRng};

const MS: fn(u64) -> Duration = Duration::from_millis;

fn policy() -> RetryPolicy {
    RetryPolicy {
        topology: Topology::new("t", QueueType::Quorum, vec![MS(1_000), MS(10_000), MS(60_000)]),
        max_attempts: 4,
        jitter: 0.2,
    }
}

fn received(attempt: u32) -> Received {
    Received {
        channel: Channel::Email,
        attempt,
        last_attempt: attempt >= policy().max_attempts,
        deferrals: 0,
        sent: false,
        redelivered: false,
        traceparent: None,
        message_id: None,
        envelope: Ok(Envelope::direct(Channel::Email, "req".into(), serde_json::json!({}))),
    }
}

fn now() -> DateTime<Utc> {
    "2026-12-03T12:00:00.123Z".parse().unwrap()
}

/// Plans `outcome` for `received` with 200 different seeds, so jitter bounds are exercised.
fn plans(received: &Received, outcome: &Outcome) -> Vec<Plan> {
    (0..200).map(|seed| plan(received, outcome.clone(), &policy(), now(), &mut StdRng::seed_from_u64(seed))).collect()
}

fn header<'a>(headers: &'a [(&'static str, Header)], key: &str) -> Option<&'a Header> {
    headers.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
}

fn retry(error: &str) -> Outcome {
    Outcome::retry(error)
}

#[test]
fn delivered_and_duplicates_are_acked_with_nothing_published() {
    for (outcome, settled) in
        [(Outcome::Delivered, Settled::Delivered), (Outcome::AlreadyDelivered, Settled::AlreadyDelivered)]
    {
        // Also on the last attempt: only a retry is turned into a dead letter there.
        for attempt in [1, 4] {
            assert_eq!(plans(&received(attempt), &outcome), vec![Plan::Ack(settled.clone()); 200]);
        }
    }
}

#[test]
fn each_retry_goes_to_its_tier_with_jitter_only_shortening() {
    // (attempt that failed, tier of the next attempt)
    let table = [(1, MS(1_000)), (2, MS(10_000)), (3, MS(60_000))];
    for (attempt, tier) in table {
        let shortest = tier.mul_f64(0.8);
        let mut delays = Vec::new();
        for p in plans(&received(attempt), &retry("451 busy")) {
            let Plan::Retry { queue, expiration, headers, settled } = p else { panic!("attempt {attempt}: {p:?}") };
            assert_eq!(queue, policy().topology.retry_queue(Channel::Email, tier), "attempt {attempt}");
            assert!(
                expiration >= shortest && expiration <= tier,
                "attempt {attempt}: {expiration:?} not in {shortest:?}..={tier:?}"
            );
            assert_eq!(header(&headers, headers::ATTEMPT), Some(&Header::U32(attempt + 1)));
            assert_eq!(header(&headers, headers::LAST_ERROR), Some(&Header::Text("451 busy".into())));
            assert_eq!(header(&headers, headers::SENT), None);
            assert_eq!(settled, Settled::Retrying { next_attempt: attempt + 1, delay: expiration, tier });
            delays.push(expiration);
        }
        delays.sort();
        delays.dedup();
        assert!(delays.len() > 100, "attempt {attempt}: jitter spreads the delays ({} distinct)", delays.len());
    }
}

#[test]
fn without_jitter_the_delay_is_the_tier() {
    let policy = RetryPolicy { jitter: 0.0, ..policy() };
    let p = plan(&received(1), retry("x"), &policy, now(), &mut StdRng::seed_from_u64(1));
    assert!(matches!(p, Plan::Retry { expiration, .. } if expiration == MS(1_000)), "{p:?}");
}

#[test]
fn retry_after_picks_the_tier_that_covers_it_and_jitter_never_goes_below_it() {
    // (Retry-After, tier, shortest allowed delay)
    let table = [
        (MS(500), MS(1_000), MS(800)),         // jitter's bound is above Retry-After
        (MS(950), MS(1_000), MS(950)),         // Retry-After is above jitter's bound
        (MS(5_000), MS(10_000), MS(8_000)),    // a longer tier than attempt 2's own
        (MS(600_000), MS(60_000), MS(60_000)), // longer than every tier: the longest
    ];
    for (after, tier, shortest) in table {
        let outcome = Outcome::Retry { error: "429".into(), after: Some(after) };
        for p in plans(&received(1), &outcome) {
            let Plan::Retry { queue, expiration, .. } = p else { panic!("{p:?}") };
            assert_eq!(queue, policy().topology.retry_queue(Channel::Email, tier), "Retry-After {after:?}");
            assert!(expiration >= shortest && expiration <= tier, "Retry-After {after:?}: {expiration:?}");
        }
    }
}

#[test]
fn a_retry_on_the_last_attempt_is_a_dead_letter_with_its_evidence() {
    for p in plans(&received(4), &retry("451 still busy")) {
        let Plan::DeadLetter { queue, headers, settled } = p else { panic!("{p:?}") };
        assert_eq!(queue, "t.email.dead");
        assert_eq!(settled, Settled::DeadLettered { reason: DeadReason::MaxAttempts });
        assert_eq!(header(&headers, headers::DEAD_REASON), Some(&Header::Text("max_attempts".into())));
        assert_eq!(header(&headers, headers::ATTEMPTS), Some(&Header::U32(4)));
        assert_eq!(header(&headers, headers::LAST_ERROR), Some(&Header::Text("451 still busy".into())));
        assert_eq!(header(&headers, headers::DEAD_AT), Some(&Header::Text("2026-12-03T12:00:00.123Z".into())));
        assert_eq!(header(&headers, headers::ORIGIN_QUEUE), Some(&Header::Text("t.email".into())));
    }
}

#[test]
fn dead_outcomes_are_dead_letters_on_any_attempt_with_their_reason() {
    let table = [
        (DeadReason::Permanent, "550 no such user"),
        (DeadReason::Unparseable, "bad envelope"),
        // The crash limit (WORKER_CRASH_LIMIT): the deliver step refuses to send again, on the
        // first attempt too.
        (DeadReason::CrashedWorker, "3 deliveries of this message died mid-way"),
        (DeadReason::StoreQuery, "column does not exist"),
    ];
    for (reason, error) in table {
        for attempt in [1, 2, 4] {
            let p = plan(
                &received(attempt),
                Outcome::Dead { reason, error: error.into() },
                &policy(),
                now(),
                &mut StdRng::seed_from_u64(7),
            );
            let Plan::DeadLetter { headers, settled, .. } = p else { panic!("{reason:?}: {p:?}") };
            assert_eq!(settled, Settled::DeadLettered { reason });
            assert_eq!(header(&headers, headers::DEAD_REASON), Some(&Header::Text(reason.as_str().into())));
            assert_eq!(header(&headers, headers::ATTEMPTS), Some(&Header::U32(attempt)));
        }
    }
}

#[test]
fn deferrals_back_off_through_the_tiers_without_counting_an_attempt() {
    // (deferrals so far, tier of this deferral)
    let table = [(0, MS(1_000)), (1, MS(10_000)), (2, MS(60_000)), (9, MS(60_000))];
    for (deferrals, tier) in table {
        // Even on the last attempt: an outage of ours never dead-letters.
        let received = Received { deferrals, ..received(4) };
        for p in plans(&received, &Outcome::Defer { error: "database unavailable".into() }) {
            let Plan::Retry { queue, expiration, headers, settled } = p else { panic!("{p:?}") };
            assert_eq!(queue, policy().topology.retry_queue(Channel::Email, tier), "deferrals {deferrals}");
            assert!(expiration <= tier && expiration >= tier.mul_f64(0.8));
            assert_eq!(header(&headers, headers::ATTEMPT), Some(&Header::U32(4)), "same attempt again");
            assert_eq!(header(&headers, headers::DEFERRALS), Some(&Header::U32(deferrals + 1)));
            assert_eq!(header(&headers, headers::SENT), None, "not sent: it will be sent");
            assert_eq!(settled, Settled::Deferred { delay: expiration });
        }
    }
}

#[test]
fn record_later_comes_back_marked_sent_and_the_marker_stays() {
    for sent_before in [false, true] {
        let received = Received { sent: sent_before, deferrals: 1, ..received(2) };
        let p = plan(
            &received,
            Outcome::RecordLater { error: "database unavailable".into() },
            &policy(),
            now(),
            &mut StdRng::seed_from_u64(3),
        );
        let Plan::Retry { queue, headers, settled, .. } = p else { panic!("{p:?}") };
        assert_eq!(queue, policy().topology.retry_queue(Channel::Email, MS(10_000)));
        assert_eq!(header(&headers, headers::SENT), Some(&Header::U32(1)));
        assert_eq!(header(&headers, headers::DEFERRALS), Some(&Header::U32(2)));
        assert_eq!(header(&headers, headers::ATTEMPT), Some(&Header::U32(2)));
        assert!(matches!(settled, Settled::Deferred { .. }));
    }
}

#[test]
fn a_message_marked_sent_is_acked_once_recorded_and_keeps_its_marker_when_deferred() {
    // The deliver step does not send a message marked sent; it comes here as Delivered.
    let received = Received { sent: true, deferrals: 2, ..received(3) };
    assert_eq!(
        plan(&received, Outcome::Delivered, &policy(), now(), &mut StdRng::seed_from_u64(1)),
        Plan::Ack(Settled::Delivered)
    );
    let p = plan(&received, Outcome::Defer { error: "down".into() }, &policy(), now(), &mut StdRng::seed_from_u64(1));
    let Plan::Retry { headers, .. } = p else { panic!("{p:?}") };
    assert_eq!(header(&headers, headers::SENT), Some(&Header::U32(1)), "never sent twice");
}

#[test]
fn long_errors_are_cut_on_a_char_boundary() {
    let s = "é".repeat(600);
    let short = shorten(&s);
    assert!(short.len() <= MAX_ERROR_LEN + '…'.len_utf8());
    assert!(short.ends_with('…'));
    let p = plan(&received(1), retry(&s), &policy(), now(), &mut StdRng::seed_from_u64(1));
    let Plan::Retry { headers, .. } = p else { panic!() };
    assert_eq!(header(&headers, headers::LAST_ERROR), Some(&Header::Text(short)));
}
