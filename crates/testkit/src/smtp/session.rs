//! The SMTP conversation with one client. Commands are handled strictly in order, one reply
//! each, which is all PIPELINING asks of a server.

use super::{Mail, Reply, State};
use std::{io, sync::Arc, time::Duration};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpListener, TcpStream,
    },
    sync::watch,
    task::JoinSet,
};

/// Connections one server accepts in its life; far more than a test opens.
const MAX_CONNECTIONS: usize = 100_000;
/// Commands one connection may send; a pooled connection carries many mails, each ~5 commands.
const MAX_COMMANDS: usize = 1_000_000;
/// RFC 5321 allows 512 octets per command line; some slack for long parameters.
const MAX_COMMAND_LINE: usize = 4096;
/// Bigger than anything notify sends; keeps a runaway client from eating memory.
const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;
/// Longer than lettre's pool idle timeout (60 s), so the pool, not the server, retires idle
/// connections, as with a real relay.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

const GREETING: &str = "220 127.0.0.1 ESMTP notify-testkit\r\n";

pub(super) async fn accept_loop(listener: TcpListener, state: Arc<watch::Sender<State>>) {
    // Owning the sessions here means aborting this task (the server handle dropped) ends them.
    let mut sessions = JoinSet::new();
    for _ in 0..MAX_CONNECTIONS {
        while sessions.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, _)) => {
                state.send_modify(|s| s.connections += 1);
                sessions.spawn(serve(stream, state.clone()));
            }
            // A failed accept (e.g. the client reset first) concerns that client only.
            Err(e) => eprintln!("test SMTP server: accept failed: {e}"),
        }
    }
    drop(listener);
    while sessions.join_next().await.is_some() {}
}

async fn serve(stream: TcpStream, state: Arc<watch::Sender<State>>) {
    let (read, write) = stream.into_split();
    let mut session =
        Session { reader: BufReader::new(read), writer: write, state, greeted: false, transaction: None, finished: 0 };
    // An I/O error or timeout only ends this client's conversation; the test sees the outcome
    // on the client side.
    let _ = session.run().await;
}

/// The envelope of the transaction under way.
struct Transaction {
    from: String,
    to: Vec<String>,
}

struct Session {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    state: Arc<watch::Sender<State>>,
    greeted: bool,
    transaction: Option<Transaction>,
    /// Transactions that reached the end of DATA on this connection.
    finished: usize,
}

enum Next {
    Continue,
    Close,
}

impl Session {
    async fn run(&mut self) -> io::Result<()> {
        self.send(GREETING).await?;
        let mut line = Vec::new();
        for _ in 0..MAX_COMMANDS {
            if !self.read_line(&mut line, MAX_COMMAND_LINE).await? {
                return Ok(());
            }
            let Some(command) = trim_line_end(&line) else {
                self.send("500 5.5.2 line too long\r\n").await?;
                return Ok(());
            };
            let command = String::from_utf8_lossy(command).into_owned();
            if let Next::Close = self.handle(&command).await? {
                return Ok(());
            }
        }
        self.send("421 4.7.0 too many commands, closing\r\n").await
    }

    async fn handle(&mut self, command: &str) -> io::Result<Next> {
        let (verb, arg) = match command.split_once(' ') {
            Some((verb, arg)) => (verb.to_ascii_uppercase(), arg.trim()),
            None => (command.to_ascii_uppercase(), ""),
        };
        match verb.as_str() {
            "EHLO" => {
                self.greeted = true;
                self.transaction = None;
                self.send(&format!(
                    "250-127.0.0.1 greets {arg}\r\n250-PIPELINING\r\n250-8BITMIME\r\n\
                     250-SMTPUTF8\r\n250-AUTH PLAIN LOGIN\r\n250 SIZE {MAX_MESSAGE_BYTES}\r\n"
                ))
                .await?;
            }
            "HELO" => {
                self.greeted = true;
                self.transaction = None;
                self.send("250 127.0.0.1\r\n").await?;
            }
            "MAIL" => {
                let reply = if !self.greeted {
                    "503 5.5.1 EHLO or HELO first"
                } else if self.transaction.is_some() {
                    "503 5.5.1 nested MAIL command"
                } else if let Some(from) = path_after(arg, "FROM:") {
                    self.transaction = Some(Transaction { from, to: Vec::new() });
                    "250 2.1.0 OK"
                } else {
                    "501 5.5.4 syntax: MAIL FROM:<address>"
                };
                self.send(&format!("{reply}\r\n")).await?;
            }
            "RCPT" => {
                let reply = match (&mut self.transaction, path_after(arg, "TO:")) {
                    (None, _) => "503 5.5.1 MAIL first",
                    (Some(_), None) => "501 5.5.4 syntax: RCPT TO:<address>",
                    (Some(tx), Some(to)) => {
                        tx.to.push(to);
                        "250 2.1.5 OK"
                    }
                };
                self.send(&format!("{reply}\r\n")).await?;
            }
            "DATA" => return self.data().await,
            "RSET" => {
                self.transaction = None;
                self.send("250 2.0.0 OK\r\n").await?;
            }
            "NOOP" => self.send("250 2.0.0 OK\r\n").await?,
            "QUIT" => {
                self.send("221 2.0.0 bye\r\n").await?;
                return Ok(Next::Close);
            }
            "VRFY" => self.send("252 2.1.5 will try\r\n").await?,
            // Any credentials are accepted: clients configured with a password (as in
            // production) can talk to this server; the tests check the password never leaks.
            "AUTH" if arg.to_ascii_uppercase().starts_with("PLAIN") => {
                if arg.split_whitespace().nth(1).is_none() {
                    // The credentials come on the next line.
                    self.send("334 \r\n").await?;
                    let _ = self.read_line(&mut Vec::new(), MAX_COMMAND_LINE).await?;
                }
                self.send("235 2.7.0 authenticated\r\n").await?;
            }
            "AUTH" if arg.to_ascii_uppercase().starts_with("LOGIN") => {
                self.send("334 VXNlcm5hbWU6\r\n").await?;
                let _ = self.read_line(&mut Vec::new(), MAX_COMMAND_LINE).await?;
                self.send("334 UGFzc3dvcmQ6\r\n").await?;
                let _ = self.read_line(&mut Vec::new(), MAX_COMMAND_LINE).await?;
                self.send("235 2.7.0 authenticated\r\n").await?;
            }
            _ => self.send("500 5.5.2 command not recognized\r\n").await?,
        }
        Ok(Next::Continue)
    }

    async fn data(&mut self) -> io::Result<Next> {
        let Some(tx) = self.transaction.take() else {
            self.send("503 5.5.1 MAIL first\r\n").await?;
            return Ok(Next::Continue);
        };
        if tx.to.is_empty() {
            // Keep the transaction: RFC 5321 lets the client still add recipients.
            self.transaction = Some(tx);
            self.send("554 5.5.1 no valid recipients\r\n").await?;
            return Ok(Next::Continue);
        }
        self.send("354 End data with <CR><LF>.<CR><LF>\r\n").await?;
        let Some(raw) = self.read_message().await? else {
            self.send("552 5.3.4 message too big, closing\r\n").await?;
            return Ok(Next::Close);
        };
        self.finish(tx, raw).await?;
        self.finished += 1;
        let limit = self.state.borrow().per_connection;
        Ok(if limit.is_some_and(|n| self.finished >= n) { Next::Close } else { Next::Continue })
    }

    /// Reads the message up to the lone `.` line and undoes dot-stuffing. `None` if it exceeds
    /// the size limit (the connection is then closed, there is no way to resynchronise cheaply).
    async fn read_message(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut message = Vec::new();
        let mut line = Vec::new();
        // Every line read consumes at least one byte of the budget, so this ends.
        while message.len() <= MAX_MESSAGE_BYTES {
            let budget = MAX_MESSAGE_BYTES + 3 - message.len();
            if !self.read_line(&mut line, budget).await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if trim_line_end(&line) == Some(b".") {
                return Ok(Some(message));
            }
            let unstuffed = line.strip_prefix(b".").unwrap_or(&line);
            message.extend_from_slice(unstuffed);
        }
        Ok(None)
    }

    /// Counts the attempt, picks the reply, holds an accepted mail for the configured delay,
    /// records it and only then answers, so a test that sees the mail knows it was accepted.
    async fn finish(&mut self, tx: Transaction, raw: Vec<u8>) -> io::Result<()> {
        let mut reply = Reply::accepted();
        let mut delay = Duration::ZERO;
        self.state.send_modify(|s| {
            s.attempts += 1;
            s.in_progress += 1;
            reply = s.next_reply();
            delay = s.delay;
        });
        let mut in_progress = InProgress(Some(self.state.clone()));
        if reply.accepts() {
            // The delay is the feature here (a slow relay), not a wait for an outcome.
            tokio::time::sleep(delay).await;
            let raw = String::from_utf8_lossy(&raw).into_owned();
            let mail = Mail::parse(tx.from, tx.to, raw);
            // Accepted and no longer in progress in one step, so an observer reading `mails()`
            // and `in_progress()` one after the other never counts a mail twice.
            in_progress.0.take();
            self.state.send_modify(|s| {
                s.mails.push(mail);
                s.in_progress -= 1;
            });
        }
        self.send(&reply.to_wire()).await
    }

    /// Reads one line (up to and including `\n`, at most `max` bytes) into `line`. `false` at
    /// the end of the stream; a line cut off by the end of stream counts as the end too.
    async fn read_line(&mut self, line: &mut Vec<u8>, max: usize) -> io::Result<bool> {
        line.clear();
        let mut limited = (&mut self.reader).take(max as u64);
        let read = tokio::time::timeout(IDLE_TIMEOUT, limited.read_until(b'\n', line))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        Ok(read > 0 && (line.ends_with(b"\n") || read == max))
    }

    async fn send(&mut self, reply: &str) -> io::Result<()> {
        self.writer.write_all(reply.as_bytes()).await?;
        self.writer.flush().await
    }
}

/// Decrements `in_progress` however the transaction ends (refused, client gone, server dropped
/// mid-delay), unless taken out when the mail was accepted.
struct InProgress(Option<Arc<watch::Sender<State>>>);

impl Drop for InProgress {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            state.send_modify(|s| s.in_progress -= 1);
        }
    }
}

/// The line without its CRLF (or bare LF); `None` if it has no line end, i.e. was too long.
fn trim_line_end(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\n")?;
    Some(line.strip_suffix(b"\r").unwrap_or(line))
}

/// The address in `FROM:<a@b> PARAMS` / `TO:<a@b>`, without brackets; parameters (BODY=8BITMIME,
/// SMTPUTF8, SIZE=…) are accepted and ignored.
fn path_after(arg: &str, keyword: &str) -> Option<String> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start();
    match rest.strip_prefix('<') {
        Some(bracketed) => bracketed.split_once('>').map(|(addr, _)| addr.to_string()),
        // Lenient: some clients omit the brackets.
        None => rest.split_whitespace().next().map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_taken_from_mail_and_rcpt_arguments() {
        assert_eq!(path_after("FROM:<a@b.c> BODY=8BITMIME SMTPUTF8", "FROM:"), Some("a@b.c".into()));
        assert_eq!(path_after("from: <a@b.c>", "FROM:"), Some("a@b.c".into()));
        assert_eq!(path_after("FROM:<>", "FROM:"), Some(String::new()));
        assert_eq!(path_after("TO:x@y", "TO:"), Some("x@y".into()));
        assert_eq!(path_after("FROM:<a@b.c>", "TO:"), None);
        assert_eq!(path_after("TO", "TO:"), None);
    }

    #[test]
    fn line_ends_are_trimmed_and_unterminated_lines_rejected() {
        assert_eq!(trim_line_end(b"NOOP\r\n"), Some(&b"NOOP"[..]));
        assert_eq!(trim_line_end(b"NOOP\n"), Some(&b"NOOP"[..]));
        assert_eq!(trim_line_end(b"NOOP"), None);
    }
}
