//! The `notify-mailcatcher` binary as `scripts/run` uses it: a mail sent to its SMTP port shows
//! up on its page, and SIGTERM stops it cleanly.

use lettre::{
    message::{Mailbox, MultiPart},
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
};
use nix::{sys::signal, unistd::Pid};
use std::{process::Stdio, time::Duration};
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
};

const WAIT: Duration = Duration::from_secs(15);

struct Catcher {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    smtp_port: u16,
    page: String,
}

impl Catcher {
    /// Starts the binary on free ports and reads the addresses it prints.
    async fn start() -> Catcher {
        let mut child = Command::new(env!("CARGO_BIN_EXE_notify-mailcatcher"))
            .args(["--smtp", "127.0.0.1:0", "--http=127.0.0.1:0"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting notify-mailcatcher");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let smtp = next_line(&mut lines).await;
        let page = next_line(&mut lines).await;
        let smtp = smtp.strip_prefix("smtp: smtp://127.0.0.1:").unwrap_or_else(|| panic!("first line: {smtp:?}"));
        let page = page.strip_prefix("page: ").unwrap_or_else(|| panic!("second line: {page:?}")).to_string();
        assert!(page.starts_with("http://127.0.0.1:") && page.ends_with('/'), "{page}");
        Catcher { child, lines, smtp_port: smtp.parse().expect("SMTP port"), page }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::get(format!("{}{}", self.page, path.trim_start_matches('/'))).await.expect("GET")
    }
}

async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("notify-mailcatcher printed nothing in time")
        .expect("reading its output")
        .expect("its output ended")
}

#[tokio::test]
async fn a_sent_mail_is_listed_and_readable_on_the_page() {
    let mut catcher = Catcher::start().await;
    let page = catcher.get("/").await;
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("No mail yet"));

    let message = Message::builder()
        .from("notify <notify@example.com>".parse::<Mailbox>().unwrap())
        .to("user@example.com".parse::<Mailbox>().unwrap())
        .subject("Welcome to <notify> & co")
        .multipart(MultiPart::alternative_plain_html(
            "Your account is ready.".to_string(),
            "<p>Your account is <b>ready</b>.</p><script>alert(1)</script>".to_string(),
        ))
        .unwrap();
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(catcher.smtp_port)
        .build()
        .send(message)
        .await
        .expect("the catcher accepts the mail");

    // The list: escaped subject linking to the mail, header From and To.
    let list = catcher.get("/").await.text().await.unwrap();
    assert!(list.contains("<a href=\"/mails/1\">Welcome to &lt;notify&gt; &amp; co</a>"), "{list}");
    assert!(list.contains("notify &lt;notify@example.com&gt;"), "{list}");
    assert!(list.contains("user@example.com"), "{list}");

    // The mail: text body, and the HTML part in a sandboxed frame.
    let mail = catcher.get("/mails/1").await.text().await.unwrap();
    assert!(mail.contains("<h1>Welcome to &lt;notify&gt; &amp; co</h1>"), "{mail}");
    assert!(mail.contains("<pre>Your account is ready.</pre>"), "{mail}");
    assert!(mail.contains("<iframe sandbox src=\"/mails/1/html\""), "{mail}");
    let html = catcher.get("/mails/1/html").await;
    let csp = html.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.starts_with("sandbox;") && csp.contains("default-src 'none'"), "{csp}");
    assert!(html.text().await.unwrap().contains("<b>ready</b>"));
    let raw = catcher.get("/mails/1/raw").await.text().await.unwrap();
    assert!(raw.contains("Subject: "), "{raw}");

    // The JSON list for scripts.
    let api: serde_json::Value = catcher.get("/api/mails").await.json().await.unwrap();
    assert_eq!(api[0]["subject"], "Welcome to <notify> & co");
    assert_eq!(api[0]["envelope_to"][0], "user@example.com");
    assert_eq!(api[0]["text"], "Your account is ready.");

    // Unknown mails and methods.
    assert_eq!(catcher.get("/mails/2").await.status(), 404);
    let post = reqwest::Client::new().post(&catcher.page).send().await.unwrap();
    assert_eq!(post.status(), 405);
    assert_eq!(post.headers()["allow"], "GET, HEAD");

    // It said so in its output, and SIGTERM stops it cleanly.
    let line = next_line(&mut catcher.lines).await;
    assert!(line.starts_with("mail 1: notify@example.com -> user@example.com: Welcome to <notify> & co"), "{line}");
    let pid = Pid::from_raw(catcher.child.id().expect("running") as i32);
    signal::kill(pid, signal::Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(WAIT, catcher.child.wait()).await.expect("stops on SIGTERM").unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(next_line(&mut catcher.lines).await, "stopped (1 mail(s) caught)");
}

#[tokio::test]
async fn a_taken_port_is_reported_and_fails() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_notify-mailcatcher"))
        .args(["--smtp", &format!("127.0.0.1:{port}"), "--http", "127.0.0.1:0"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")) && err.contains("--smtp"), "{err}");
}
