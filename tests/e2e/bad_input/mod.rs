//! More than a thousand generated bad requests (seeded, so every run sends the same ones) across
//! every POST endpoint and the inbox query: each gets its 4xx in the one JSON error shape —
//! never a 5xx — and none publishes anything. A positive control at the end proves the base
//! bodies the generator mutates are valid and that the queue counts would have seen a publish.

use crate::support;

use futures_util::StreamExt;
use notify_types::Channel;
use reqwest::Method;
use serde_json::Value;
use std::{collections::BTreeMap, time::Duration, time::Instant};
use support::{Harness, API_KEY};

mod cases;
use cases::{endpoints, generate, Auth, Case};

const CONCURRENCY: usize = 8;

struct Outcome {
    status: Option<u16>,
    /// Why the answer is wrong, if it is.
    problem: Option<String>,
}

async fn send(client: &reqwest::Client, base: &str, c: &Case) -> Outcome {
    let mut req = client.request(c.method.clone(), format!("{base}{}", c.path)).body(c.body.clone());
    if let Some(ct) = &c.content_type {
        req = req.header("content-type", ct);
    }
    match &c.auth {
        Auth::Good => req = req.header("authorization", format!("Bearer {API_KEY}")),
        Auth::Missing => {}
        Auth::Header(v) => req = req.header("authorization", v.clone()),
    }
    let res = match req.send().await {
        Ok(r) => r,
        Err(e) => return Outcome { status: None, problem: Some(format!("no answer: {e}")) },
    };
    let status = res.status().as_u16();
    let body = res.bytes().await.unwrap_or_default();
    let problem = if status >= 500 {
        Some(format!("{status}: {}", String::from_utf8_lossy(&body)))
    } else if c.expect.is_some_and(|e| e != status) {
        Some(format!("expected {}, got {status}: {}", c.expect.unwrap(), String::from_utf8_lossy(&body)))
    } else if c.method == Method::POST && (200..300).contains(&status) && c.family != "user" {
        Some(format!("accepted a bad request: {status}"))
    } else if (400..500).contains(&status) {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v) if v["error"]["code"].is_string() && v["error"]["message"].is_string() => None,
            _ => Some(format!("{status} without the JSON error shape: {:?}", String::from_utf8_lossy(&body))),
        }
    } else {
        None
    };
    Outcome { status: Some(status), problem }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_generated_bad_requests_get_no_5xx_and_publish_nothing() {
    let h = Harness::start("bad-input").await;
    let cases = generate();
    let started = Instant::now();
    assert!(cases.len() >= 1_000, "only {} cases", cases.len());
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let base = h.api.base.clone();
    let outcomes: Vec<Outcome> =
        futures_util::stream::iter(&cases).map(|c| send(&client, &base, c)).buffered(CONCURRENCY).collect().await;
    let took = started.elapsed();

    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_family: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    let mut problems = Vec::new();
    for (c, o) in cases.iter().zip(&outcomes) {
        let status = o.status.map_or("no answer".to_string(), |s| s.to_string());
        *by_status.entry(status.clone()).or_default() += 1;
        *by_family.entry(c.family).or_default().entry(status).or_default() += 1;
        if let Some(p) = &o.problem {
            problems.push(format!("[{}] {} {} ({}): {p}", c.family, c.method, short(&c.path), c.what));
        }
    }
    println!("bad input: {} requests in {took:?}; statuses {by_status:?}", cases.len());
    for (family, statuses) in &by_family {
        println!("bad input:   {family:<14} {statuses:?}");
    }
    for p in problems.iter().take(40) {
        println!("bad input: PROBLEM {p}");
    }

    let health = h.api.client.get(format!("{}/health", h.api.base)).send().await.expect("API still answers");
    assert_eq!(health.status(), 200, "/health after the storm");
    let counts = channel_counts(&h).await;
    println!("bad input: messages in the channel queues afterwards {counts:?}");

    let server_errors: usize = by_status.iter().filter(|(s, _)| s.starts_with('5')).map(|(_, n)| n).sum();
    assert_eq!(server_errors, 0, "no 5xx");
    assert!(problems.is_empty(), "{} bad answers, first: {:#?}", problems.len(), &problems[..problems.len().min(20)]);
    assert_eq!(counts, vec![0, 0, 0], "nothing published (email, webhook, in_app)");

    // Positive control: the bodies the generator mutated are valid, and a publish shows in the
    // counts (each event `user.registered` goes to e-mail).
    for ep in &endpoints() {
        let res = h.api.post_json(ep.path, &ep.valid).await;
        assert_eq!(res.status(), 202, "{} accepts its valid body", ep.path);
    }
    let counts = channel_counts(&h).await;
    assert_eq!(counts, vec![3, 1, 1], "the control requests are counted (email, webhook, in_app)");
    h.cleanup().await;
}

async fn channel_counts(h: &Harness) -> Vec<u32> {
    let mut counts = Vec::new();
    for ch in [Channel::Email, Channel::Webhook, Channel::InApp] {
        let mut n = 0;
        for q in h.topology.queues(ch) {
            n += h.count(&q).await;
        }
        counts.push(n);
    }
    counts
}

fn short(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}
