//! A local mail catcher for development (`scripts/run`): the test kit's SMTP server
//! ([`SmtpServer`]) plus a small web page to read what was sent. It is what Mailpit is in the
//! compose stack, for machines where Mailpit cannot be installed from a package registry.
//!
//! Pages (all GET, plain HTML, no scripts; the list reloads itself every 5 s):
//! - `/`: every mail, newest first: time received, From, To, Subject;
//! - `/mails/{n}`: one mail: its headers, envelope, text body and HTML body (the HTML in a
//!   sandboxed frame: no scripts, nothing loaded from elsewhere);
//! - `/mails/{n}/html`, `/mails/{n}/raw`: the HTML part alone, the message as received;
//! - `/api/mails`: the same list as JSON, for scripts.
//!
//! Mails are kept in memory until the process stops. The SMTP side accepts every mail, with no
//! TLS and no authentication: bind both to loopback (the default of the binary).

use crate::smtp::{Mail, SmtpServer};
use chrono::{DateTime, SecondsFormat, Utc};
use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use mail_parser::{Address, MessageParser};
use std::{
    convert::Infallible,
    fmt::Write as _,
    net::SocketAddr,
    time::{Instant, SystemTime},
};
use tokio::{
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
};

/// A running mail catcher. Dropping it stops both servers.
pub struct MailCatcher {
    smtp: SmtpServer,
    http_addr: SocketAddr,
    http_task: JoinHandle<()>,
}

impl Drop for MailCatcher {
    fn drop(&mut self) {
        self.http_task.abort();
    }
}

impl MailCatcher {
    /// Binds the SMTP server to `smtp` and the web page to `http` (port 0: a free one) and
    /// starts serving both.
    pub async fn start(smtp: SocketAddr, http: SocketAddr) -> std::io::Result<MailCatcher> {
        let smtp = SmtpServer::start_on(smtp).await?;
        let listener = TcpListener::bind(http).await?;
        let http_addr = listener.local_addr()?;
        let http_task = tokio::spawn(accept_loop(listener, smtp.clone()));
        Ok(MailCatcher { smtp, http_addr, http_task })
    }

    pub fn smtp_addr(&self) -> SocketAddr {
        self.smtp.addr()
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `smtp://HOST:PORT`, what `SMTP_URL` should be.
    pub fn smtp_url(&self) -> String {
        self.smtp.url()
    }

    /// `http://HOST:PORT/`, the page listing the mails.
    pub fn page_url(&self) -> String {
        format!("http://{}/", self.http_addr)
    }

    /// The mails caught so far, in the order they arrived.
    pub fn mails(&self) -> Vec<Mail> {
        self.smtp.mails()
    }
}

async fn accept_loop(listener: TcpListener, smtp: SmtpServer) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve(stream, smtp.clone()));
                }
                // E.g. out of file descriptors: wait instead of spinning.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            },
            // Reaps finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve(stream: TcpStream, smtp: SmtpServer) {
    let service = service_fn(move |request| answer(request, smtp.clone()));
    // A browser that hangs up mid-request concerns that connection only.
    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
}

async fn answer(request: Request<Incoming>, smtp: SmtpServer) -> Result<Response<Full<Bytes>>, Infallible> {
    let head = request.method() == Method::HEAD;
    if request.method() != Method::GET && !head {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let mails = smtp.mails();
    let path = request.uri().path().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let mut response = match segments.as_slice() {
        [] => html(StatusCode::OK, list_page(&mails, smtp.addr())),
        ["api", "mails"] => json(&mails),
        ["mails", n, rest @ ..] => match n.parse::<usize>().ok().filter(|n| (1..=mails.len()).contains(n)) {
            None => not_found(&format!("there is no mail {n} (mails caught: {})", mails.len())),
            Some(n) => {
                let mail = &mails[n - 1];
                match rest {
                    [] => html(StatusCode::OK, mail_page(n, mail)),
                    ["raw"] => text(StatusCode::OK, &mail.raw),
                    ["html"] => match &mail.html_body {
                        Some(body) => sandboxed_html(body),
                        None => not_found(&format!("mail {n} has no HTML part")),
                    },
                    _ => not_found("no such page"),
                }
            }
        },
        _ => not_found("no such page"),
    };
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if head {
        *response.body_mut() = Full::new(Bytes::new());
    }
    Ok(response)
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn html(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, "text/html; charset=utf-8", body)
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body.to_string())
}

fn not_found(why: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "{}<h1>Not found</h1><p>{}</p><p><a href=\"/\">All mails</a></p></body></html>",
        page_head("Not found", false),
        escape(why)
    );
    html(StatusCode::NOT_FOUND, body)
}

/// The HTML part as sent, for the frame on the mail's page. The CSP makes it a sandbox of its
/// own even when opened directly: no scripts, no forms, nothing fetched from elsewhere (remote
/// images in a mail stay blank).
fn sandboxed_html(body: &str) -> Response<Full<Bytes>> {
    let mut response = html(StatusCode::OK, body.to_string());
    response.headers_mut().insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:"),
    );
    response
}

fn json(mails: &[Mail]) -> Response<Full<Bytes>> {
    let list: Vec<serde_json::Value> = mails
        .iter()
        .enumerate()
        .map(|(i, mail)| {
            let headers = Headers::of(mail);
            serde_json::json!({
                "id": i + 1,
                "received_at": received_at(mail).to_rfc3339_opts(SecondsFormat::Millis, true),
                "envelope_from": mail.from,
                "envelope_to": mail.to,
                "from": headers.from,
                "to": headers.to,
                "subject": mail.subject,
                "message_id": mail.message_id,
                "text": mail.text_body,
                "html": mail.html_body,
            })
        })
        .collect();
    respond(StatusCode::OK, "application/json", serde_json::Value::Array(list).to_string())
}

/// Wall-clock time the mail was accepted (the SMTP server records an `Instant`).
fn received_at(mail: &Mail) -> DateTime<Utc> {
    let age = Instant::now().saturating_duration_since(mail.accepted_at);
    DateTime::<Utc>::from(SystemTime::now() - age)
}

/// The header fields the pages show, decoded; the envelope stands in for a missing header.
struct Headers {
    from: String,
    to: String,
    date: Option<String>,
}

impl Headers {
    fn of(mail: &Mail) -> Headers {
        let parsed = MessageParser::default().parse(mail.raw.as_bytes());
        let (from, to, date) = match &parsed {
            Some(m) => (addresses(m.from()), addresses(m.to()), m.date().map(|d| d.to_rfc3339())),
            None => (None, None, None),
        };
        Headers { from: from.unwrap_or_else(|| mail.from.clone()), to: to.unwrap_or_else(|| mail.to.join(", ")), date }
    }
}

fn addresses(address: Option<&Address>) -> Option<String> {
    let list: Vec<String> = address?
        .iter()
        .map(|a| match (&a.name, &a.address) {
            (Some(name), Some(addr)) => format!("{name} <{addr}>"),
            (None, Some(addr)) => addr.to_string(),
            (Some(name), None) => name.to_string(),
            (None, None) => String::new(),
        })
        .filter(|s| !s.is_empty())
        .collect();
    (!list.is_empty()).then(|| list.join(", "))
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}\
    h1{font-size:1.4rem}table{border-collapse:collapse;width:100%}\
    th,td{text-align:left;padding:.35rem .6rem;border-bottom:1px solid #ddd;vertical-align:top}\
    th{background:#f3f3f3}tr:hover td{background:#fafafa}.muted{color:#777}\
    pre{background:#f6f6f6;padding:.8rem;white-space:pre-wrap;word-break:break-word}\
    iframe{width:100%;height:24rem;border:1px solid #ddd}dt{font-weight:600}dd{margin:0 0 .4rem 0}";

fn page_head(title: &str, refresh: bool) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>{}<style>{STYLE}</style></head><body>",
        escape(title),
        if refresh { "<meta http-equiv=\"refresh\" content=\"5\">" } else { "" }
    )
}

fn list_page(mails: &[Mail], smtp: SocketAddr) -> String {
    let mut out = page_head(&format!("notify mail catcher ({})", mails.len()), true);
    let _ = write!(
        out,
        "<h1>notify mail catcher</h1><p class=\"muted\">{} mail(s) caught on smtp://{smtp} \
         (newest first; this page reloads every 5 s)</p>",
        mails.len()
    );
    if mails.is_empty() {
        out.push_str("<p>No mail yet.</p>");
    } else {
        out.push_str("<table><tr><th>#</th><th>Received (UTC)</th><th>From</th><th>To</th><th>Subject</th></tr>");
        for (i, mail) in mails.iter().enumerate().rev() {
            let headers = Headers::of(mail);
            let subject = if mail.subject.is_empty() { "(no subject)" } else { &mail.subject };
            let _ = write!(
                out,
                "<tr><td>{n}</td><td>{time}</td><td>{from}</td><td>{to}</td><td><a href=\"/mails/{n}\">{subject}</a></td></tr>",
                n = i + 1,
                time = received_at(mail).format("%Y-%m-%d %H:%M:%S"),
                from = escape(&headers.from),
                to = escape(&headers.to),
                subject = escape(subject),
            );
        }
        out.push_str("</table>");
    }
    out.push_str("</body></html>");
    out
}

fn mail_page(n: usize, mail: &Mail) -> String {
    let headers = Headers::of(mail);
    let subject = if mail.subject.is_empty() { "(no subject)" } else { &mail.subject };
    let mut out = page_head(subject, false);
    let _ = write!(out, "<p><a href=\"/\">&larr; All mails</a></p><h1>{}</h1><dl>", escape(subject));
    let rows = [
        ("From", Some(headers.from.clone())),
        ("To", Some(headers.to.clone())),
        ("Date", headers.date.clone()),
        ("Received", Some(received_at(mail).to_rfc3339_opts(SecondsFormat::Secs, true))),
        ("Message-ID", mail.message_id.clone()),
        ("Envelope", Some(format!("MAIL FROM:<{}> RCPT TO:<{}>", mail.from, mail.to.join(">, <")))),
    ];
    for (name, value) in rows {
        if let Some(value) = value {
            let _ = write!(out, "<dt>{name}</dt><dd>{}</dd>", escape(&value));
        }
    }
    out.push_str("</dl><h2>Text</h2>");
    let _ = write!(out, "<pre>{}</pre>", escape(&mail.text_body));
    if mail.html_body.is_some() {
        let _ = write!(
            out,
            "<h2>HTML</h2><iframe sandbox src=\"/mails/{n}/html\" title=\"HTML body of mail {n}\"></iframe>"
        );
    }
    let _ = write!(out, "<p><a href=\"/mails/{n}/raw\">Message source</a></p></body></html>");
    out
}

/// Text for HTML element content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn markup_in_mail_fields_is_escaped() {
        assert_eq!(escape("<b>\"Tom\" & 'Jerry'</b>"), "&lt;b&gt;&quot;Tom&quot; &amp; &#39;Jerry&#39;&lt;/b&gt;");
    }
}
