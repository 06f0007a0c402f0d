//! notify-mailcatcher: a local SMTP server that keeps every mail, and a web page to read them.
//! `scripts/run` starts it so the worker has somewhere to send e-mail without Docker (the
//! compose stack uses Mailpit instead).
//!
//!     notify-mailcatcher [--smtp ADDR] [--http ADDR]
//!
//! ADDR is host:port; defaults 127.0.0.1:1025 (SMTP) and 127.0.0.1:8025 (page), the ports
//! Mailpit uses. Environment: NOTIFY_MAILCATCHER_SMTP, NOTIFY_MAILCATCHER_HTTP (flags win).
//! Port 0 picks a free port; the first two lines of output name the addresses in use:
//!
//!     smtp: smtp://127.0.0.1:1025
//!     page: http://127.0.0.1:8025/
//!
//! It accepts every mail (no TLS, no authentication) and keeps them in memory until it stops
//! (ctrl-c or SIGTERM). Keep it on loopback.

use notify_testkit::mailcatcher::MailCatcher;
use std::{net::SocketAddr, process::ExitCode, time::Duration};

const USAGE: &str = "usage: notify-mailcatcher [--smtp HOST:PORT] [--http HOST:PORT]\n\
    defaults: --smtp 127.0.0.1:1025 --http 127.0.0.1:8025 \
    (env NOTIFY_MAILCATCHER_SMTP, NOTIFY_MAILCATCHER_HTTP)";

struct Args {
    smtp: SocketAddr,
    http: SocketAddr,
}

fn parse_addr(what: &str, value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| format!("{what}: `{value}` is not HOST:PORT with an IP address (e.g. 127.0.0.1:1025)"))
}

fn parse_args() -> Result<Args, String> {
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
    let mut smtp = parse_addr("NOTIFY_MAILCATCHER_SMTP", &env("NOTIFY_MAILCATCHER_SMTP", "127.0.0.1:1025"))?;
    let mut http = parse_addr("NOTIFY_MAILCATCHER_HTTP", &env("NOTIFY_MAILCATCHER_HTTP", "127.0.0.1:8025"))?;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_string(), Some(value.to_string())),
            None => (arg.clone(), None),
        };
        match flag.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--smtp" | "--http" => {
                let value = inline.or_else(|| args.next()).ok_or(format!("{flag} needs HOST:PORT"))?;
                let addr = parse_addr(&flag, &value)?;
                if flag == "--smtp" {
                    smtp = addr;
                } else {
                    http = addr;
                }
            }
            _ => return Err(format!("unknown argument `{arg}`")),
        }
    }
    Ok(Args { smtp, http })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("notify-mailcatcher: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let catcher = match MailCatcher::start(args.smtp, args.http).await {
        Ok(catcher) => catcher,
        Err(e) => {
            eprintln!(
                "notify-mailcatcher: cannot listen on {} (SMTP) and {} (page): {e}. Is another mail \
                 catcher running? Pick other ports with --smtp/--http.",
                args.smtp, args.http
            );
            return ExitCode::FAILURE;
        }
    };
    println!("smtp: {}", catcher.smtp_url());
    println!("page: {}", catcher.page_url());

    let mut sigterm = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("notify-mailcatcher: cannot watch SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    // One line per caught mail, so the terminal shows that something arrived.
    let mut seen = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => {
                let mails = catcher.mails();
                for (i, mail) in mails.iter().enumerate().skip(seen) {
                    println!(
                        "mail {}: {} -> {}: {}  ({}mails/{})",
                        i + 1,
                        mail.from,
                        mail.to.join(", "),
                        mail.subject,
                        catcher.page_url(),
                        i + 1
                    );
                }
                seen = mails.len();
            }
        }
    }
    println!("stopped ({seen} mail(s) caught)");
    ExitCode::SUCCESS
}
