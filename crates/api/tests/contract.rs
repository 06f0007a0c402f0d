//! The API against its own OpenAPI document: schemathesis (PyPI, pinned in `support`) fuzzes
//! every operation of the spec the live API serves — on the real broker and database — and
//! checks each response against the spec: 0 server errors, 0 responses that contradict it.
//!
//! Every check of schemathesis runs except `positive_data_acceptance` (schema-valid data must be
//! accepted): the schema cannot say everything the API checks — not blank, an address lettre can
//! send to, an event of the routes file, a webhook host that is globally reachable — so some
//! schema-valid requests get the 422 the spec documents for them.
//!
//! Bounded: 50 examples per operation and phase, one worker (schemathesis' Hypothesis is not
//! thread-safe in every place: two workers sometimes died with an internal error); one to two minutes
//! here. `NOTIFY_SCHEMATHESIS_SEED` picks another seed (the default is fixed, so a run is
//! repeatable), `NOTIFY_SCHEMATHESIS_EXAMPLES` another bound.

mod support;

use std::time::Duration;
use support::{SpawnedApi, API_KEY};

const DEFAULT_SEED: &str = "20261203";
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_response_contradicting_the_spec() {
    let venv = tokio::task::spawn_blocking(support::contract_tools).await.unwrap();
    let api = SpawnedApi::start("contract").await;
    let spec = api.client.get(api.url("/openapi.json")).send().await.unwrap().text().await.unwrap();
    let operations = count_operations(&spec);
    // Its own directory: schemathesis keeps a cache (.schemathesis/) where it runs.
    let work = std::env::temp_dir().join(format!("{}-schemathesis", api.prefix));
    std::fs::create_dir_all(&work).unwrap();
    let spec_file = work.join("openapi.json");
    std::fs::write(&spec_file, &spec).unwrap();
    let seed = std::env::var("NOTIFY_SCHEMATHESIS_SEED").unwrap_or_else(|_| DEFAULT_SEED.into());
    let examples = std::env::var("NOTIFY_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "50".into());

    // Loaded from the file of the served spec, not the URL: schemathesis leaves out the
    // operation that serves the spec it was loaded from, and /openapi.json is tested too.
    let mut cmd = tokio::process::Command::new(venv.join("bin/schemathesis"));
    cmd.arg("run")
        .arg(&spec_file)
        .args(["--url", &api.base])
        .args(["--header", &format!("Authorization: Bearer {API_KEY}")])
        .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance"])
        .args(["--max-examples", &examples, "--seed", &seed, "--workers", "1"])
        .args(["--request-timeout", "10", "--output-truncate", "false", "--no-color"])
        .current_dir(&work)
        .kill_on_drop(true);
    let started = std::time::Instant::now();
    let out = tokio::time::timeout(RUN_TIMEOUT, cmd.output()).await;
    let took = started.elapsed();
    let _ = std::fs::remove_dir_all(&work);
    let api_logs = api.logs();
    api.stop().await;
    let out =
        out.unwrap_or_else(|_| panic!("schemathesis ran longer than {RUN_TIMEOUT:?}")).expect("schemathesis runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let summary = text.find("SUMMARY").map_or(text.as_str(), |i| &text[i..]);
    println!("schemathesis (seed {seed}, {examples} examples, {:.0} s):\n{summary}", took.as_secs_f64());
    assert!(
        out.status.success(),
        "schemathesis found disagreements between the API and its spec (exit {:?}):\n{text}\n--- API log ---\n{api_logs}",
        out.status.code()
    );
    assert!(
        summary.contains(&format!("Selected: {operations}/{operations}"))
            && summary.contains(&format!("Tested: {operations}")),
        "not every one of the spec's {operations} operations was tested:\n{summary}"
    );
    for phase in ["Examples", "Coverage", "Fuzzing", "Stateful"] {
        assert!(summary.contains(&format!("✅ {phase}")), "phase {phase} did not pass:\n{summary}");
    }
}

fn count_operations(spec: &str) -> usize {
    let spec: serde_json::Value = serde_json::from_str(spec).unwrap();
    spec["paths"].as_object().unwrap().values().map(|item| item.as_object().unwrap().len()).sum()
}
