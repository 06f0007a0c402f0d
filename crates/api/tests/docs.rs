//! `GET /docs` renders in a real browser with no network but the API: headless Chromium (Debian
//! package `chromium`) loads the page with every other host unresolvable and every request not
//! to 127.0.0.1 sent to a dead proxy, runs its scripts, and the rendered DOM lists every
//! operation of the spec (path and operation id). Skipped, saying so, when Chromium is absent.
//!
//! `NOTIFY_DOCS_SCREENSHOT=/path/file.png` also saves a screenshot of the page there.

mod support;

use std::{path::PathBuf, process::Stdio, time::Duration};
use support::SpawnedApi;

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().map(PathBuf::from).find(|p| p.exists())
}

/// Runs Chromium headless on `url` with the network closed to anything but loopback.
async fn headless(chromium: &PathBuf, profile: &std::path::Path, args: &[&str], url: &str) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox", // root in CI and containers
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        // No name resolves but loopback's, and whatever still tries goes to a closed port.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1",
        // Lets the page's scripts fetch the spec and render before the DOM is read.
        "--virtual-time-budget=15000",
        "--window-size=1280,2000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .stdin(Stdio::null())
    .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("chromium finished within 120 s")
        .expect("chromium runs")
}

#[tokio::test]
async fn docs_render_offline_in_headless_chromium_listing_every_operation() {
    let Some(chromium) = chromium() else {
        println!(
            "SKIPPED: /usr/bin/chromium is not installed (Debian: apt-get install chromium); /docs was not rendered"
        );
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "docs test SKIPPED: chromium is not installed (apt-get install chromium)");
        return;
    };
    let api = SpawnedApi::start("docs").await;
    let spec: serde_json::Value = reqwest::get(api.url("/openapi.json")).await.unwrap().json().await.unwrap();
    let profile = std::env::temp_dir().join(format!("{}-chromium", api.prefix));
    let url = api.url("/docs");
    let dom = headless(&chromium, &profile, &["--dump-dom"], &url).await;
    let screenshot = match std::env::var("NOTIFY_DOCS_SCREENSHOT") {
        Ok(path) => Some((path.clone(), headless(&chromium, &profile, &[&format!("--screenshot={path}")], &url).await)),
        Err(_) => None,
    };
    api.stop().await;
    let _ = std::fs::remove_dir_all(&profile);

    let html = String::from_utf8_lossy(&dom.stdout).to_string();
    assert!(dom.status.success(), "chromium failed: {}", String::from_utf8_lossy(&dom.stderr));
    assert!(html.contains("swagger-ui"), "no Swagger UI in the rendered page:\n{html}");
    let mut missing = Vec::new();
    let mut listed = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        for op in item.as_object().unwrap().values() {
            let id = op["operationId"].as_str().unwrap();
            // Swagger UI writes each operation's path as data-path and its id as text.
            if html.contains(&format!("data-path=\"{path}\"")) && html.contains(&format!(">{id}<")) {
                listed += 1;
            } else {
                missing.push(format!("{path} ({id})"));
            }
        }
    }
    println!("/docs rendered offline by {}: {listed} operations listed", chromium.display());
    assert!(missing.is_empty(), "operations not shown on /docs: {missing:?}\n{html}");
    if let Some((path, out)) = screenshot {
        assert!(out.status.success(), "screenshot failed: {}", String::from_utf8_lossy(&out.stderr));
        let png = std::fs::read(&path).expect("the screenshot was written");
        assert!(png.starts_with(b"\x89PNG"), "{path} is a PNG");
        println!("screenshot: {path}");
    }
}
