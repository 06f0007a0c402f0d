//! The API binary as a child process on the shared broker and database, with a prefix and
//! schema of its own (so counters are this test's alone and nothing is left behind), and the
//! Python tools the contract tests run (schemathesis, openapi-spec-validator) in a venv.
#![allow(dead_code)]

use notify_testkit::rabbit;
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};
use tokio::process::{Child, Command};

pub const API_KEY: &str = "contract-test-key-7d3a1f";

pub struct SpawnedApi {
    pub prefix: String,
    pub schema: String,
    pub base: String,
    /// Sends the API key with every request.
    pub client: reqwest::Client,
    db_url: String,
    child: Child,
    log: PathBuf,
}

impl SpawnedApi {
    /// Starts `notify-api` and waits (bounded) until `/ready` answers 200.
    pub async fn start(test: &str) -> SpawnedApi {
        let prefix = rabbit::unique_prefix(test);
        let schema = prefix.replace(['-', '.'], "_");
        let db_url =
            std::env::var("DATABASE_URL").unwrap_or_else(|_| notify_types::config::DEFAULT_DATABASE_URL.into());
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::env::temp_dir().join(format!("{prefix}-api.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_notify-api"))
            .env("RABBITMQ_URL", rabbit::rabbitmq_url())
            .env("NOTIFY_PREFIX", &prefix)
            .env("API_HOST", "127.0.0.1")
            .env("API_PORT", port.to_string())
            .env("API_KEYS", API_KEY)
            .env("API_HTTP_WORKERS", "2")
            .env("DATABASE_URL", &db_url)
            .env("DATABASE_SCHEMA", &schema)
            .env("ROUTES_FILE", concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/routes.toml"))
            .env("ORDER_WEBHOOK_URL", "https://hooks.example.com/orders")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .kill_on_drop(true)
            .spawn()
            .expect("the notify-api binary runs");
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("authorization", format!("Bearer {API_KEY}").parse().unwrap());
        let client =
            reqwest::Client::builder().timeout(Duration::from_secs(20)).default_headers(headers).build().unwrap();
        let mut api =
            SpawnedApi { prefix, schema, base: format!("http://127.0.0.1:{port}"), client, db_url, child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = api.client.get(format!("{}/ready", api.base)).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(api.child.try_wait().unwrap().is_none(), "the API exited at start\n{}", api.logs());
            assert!(Instant::now() < deadline, "the API was not ready within 30 s\n{}", api.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        api
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGTERM, wait for the exit, then delete the test's queues and schema.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        let _ = self.child.kill().await;
        let conn = rabbit::connect().await;
        let settings: std::collections::HashMap<String, String> =
            [("NOTIFY_PREFIX".to_string(), self.prefix.clone())].into();
        rabbit::delete_topology(&conn, &notify_types::config::topology(&settings).unwrap()).await;
        let _ = conn.close(200, "done".into()).await;
        notify_store::Store::connect_lazy(&self.db_url, &self.schema, 1).unwrap().drop_schema().await.unwrap();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The committed OpenAPI document.
pub fn committed_spec_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi.json")
}

/// Pinned versions of the contract tools (PyPI). Changing one makes a new venv. Hypothesis,
/// schemathesis' generator, is pinned too: its releases change what a seed generates.
pub const SCHEMATHESIS: &str = "schemathesis==4.32.5";
pub const HYPOTHESIS: &str = "hypothesis==6.170.17";
pub const SPEC_VALIDATOR: &str = "openapi-spec-validator==0.9.0";

/// The venv with schemathesis and openapi-spec-validator, installed when missing (printing
/// what it installs, and where). Under `~/.cache/notify/` like scripts/test's tools, so a fresh
/// machine gets it on the first run and later runs reuse it.
pub fn contract_tools() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("notify");
    let tag = [SCHEMATHESIS, HYPOTHESIS, SPEC_VALIDATOR].map(|p| p.replace("==", "-")).join("-");
    let venv = cache.join(format!("contract-tools-{tag}"));
    let python = venv.join("bin/python");
    let ready = || {
        std::process::Command::new(&python)
            .args(["-c", "import schemathesis, openapi_spec_validator"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if ready() {
        return venv;
    }
    // One installer at a time: the contract tests run in parallel.
    let _lock = InstallLock::take(&cache);
    if ready() {
        return venv;
    }
    // Straight to stderr, past the test harness' capture: an install is worth seeing.
    announce(&format!(
        "installing {SCHEMATHESIS}, {HYPOTHESIS} and {SPEC_VALIDATOR} with their dependencies (PyPI, about 60 \
         packages) into a venv of their own, {} (the OpenAPI contract tests run them)",
        venv.display()
    ));
    let _ = std::fs::remove_dir_all(&venv);
    let system_python = ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|p| {
            std::process::Command::new(p).args(["-m", "venv", "--help"]).output().is_ok_and(|o| o.status.success())
        })
        .expect("python3 with the venv module is needed for the contract tests (Debian: apt-get install python3-venv)");
    let run = |cmd: &mut std::process::Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(std::process::Command::new(system_python).args(["-m", "venv"]).arg(&venv), "python3 -m venv");
    run(
        std::process::Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            SCHEMATHESIS,
            HYPOTHESIS,
            SPEC_VALIDATOR,
        ]),
        "pip install of the contract tools",
    );
    assert!(ready(), "the contract tools do not import after installing them into {}", venv.display());
    announce(&format!("installed the contract tools into {}", venv.display()));
    venv
}

fn announce(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "==> {line}");
}

/// An exclusive lock file (created with create_new; removed on drop), taken over when older
/// than 10 minutes (an installer that died).
struct InstallLock(PathBuf);

impl InstallLock {
    fn take(dir: &Path) -> InstallLock {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("contract-tools.lock");
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(_) => return InstallLock(path),
                Err(_) => {
                    let stale = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600));
                    if stale {
                        let _ = std::fs::remove_file(&path);
                    }
                    assert!(Instant::now() < deadline, "waited 10 minutes for {}", path.display());
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }
}

impl Drop for InstallLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
