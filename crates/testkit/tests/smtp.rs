//! The test SMTP server against lettre's pooled async client, the one the worker uses.

use lettre::{
    message::{Mailbox, MultiPart},
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
};
use notify_testkit::smtp::{Reply, SmtpServer};
use std::{collections::HashSet, time::Duration};

const WAIT: Duration = Duration::from_secs(10);

fn transport(server: &SmtpServer) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1").port(server.addr().port()).build()
}

fn mailbox(addr: &str) -> Mailbox {
    addr.parse().expect("test mailbox")
}

fn plain(subject: &str, body: &str) -> Message {
    Message::builder()
        .from(mailbox("notify@example.com"))
        .to(mailbox("user@example.com"))
        .subject(subject)
        .message_id(Some(format!("<{subject}@notify.test>").replace(' ', "-")))
        .body(body.to_string())
        .expect("test message")
}

#[tokio::test]
async fn a_plain_mail_arrives_with_envelope_and_decoded_body() {
    let server = SmtpServer::start().await;
    assert_eq!(server.url(), format!("smtp://127.0.0.1:{}", server.addr().port()));
    // Non-ASCII makes lettre pick quoted-printable or base64; leading dots test unstuffing.
    let body = "Hallo Zoë,\r\n.a line with a leading dot\r\n..and two\r\nbis bald";
    let message = Message::builder()
        .from(mailbox("Notify <notify@example.com>"))
        .to(mailbox("zoe@example.com"))
        .cc(mailbox("ops@example.com"))
        .subject("Grüße aus dem Test")
        .message_id(Some("<n-1@notify.test>".into()))
        .body(body.to_string())
        .unwrap();

    transport(&server).send(message).await.expect("accepted");

    let mails = server.wait_for_mails(1, WAIT).await;
    let mail = &mails[0];
    assert_eq!(mail.from, "notify@example.com");
    assert_eq!(mail.to, vec!["zoe@example.com", "ops@example.com"]);
    assert_eq!(mail.subject, "Grüße aus dem Test");
    assert_eq!(mail.text_body, body);
    assert_eq!(mail.html_body, None);
    assert_eq!(mail.message_id.as_deref(), Some("<n-1@notify.test>"));
    assert!(mail.raw.ends_with("\r\n"), "{:?}", mail.raw);
    assert_eq!(server.attempts(), 1);
    assert_eq!(server.in_progress(), 0);
}

#[tokio::test]
async fn a_base64_body_is_decoded() {
    let server = SmtpServer::start().await;
    // Mostly non-ASCII: lettre encodes it as base64.
    let body = "ご注文の商品を発送しました。\r\nありがとうございます。";

    transport(&server).send(plain("shipped", body)).await.expect("accepted");

    let mail = server.wait_for_mails(1, WAIT).await.remove(0);
    assert!(mail.raw.contains("Content-Transfer-Encoding: base64"), "{}", mail.raw);
    assert_eq!(mail.text_body, body);
}

#[tokio::test]
async fn a_body_ending_with_a_line_break_keeps_it() {
    let server = SmtpServer::start().await;
    let smtp = transport(&server);
    let bodies = ["ends with a break\r\n", "末尾に改行があります。\r\n"];
    for body in bodies {
        smtp.send(plain("break", body)).await.expect("accepted");
    }

    let mails = server.wait_for_mails(2, WAIT).await;
    for (mail, body) in mails.iter().zip(bodies) {
        assert_eq!(mail.text_body, body, "{}", mail.raw);
    }
}

#[tokio::test]
async fn a_multipart_mail_has_text_and_html_bodies() {
    let server = SmtpServer::start().await;
    let text = "Your code is 123456.\r\nIt expires in 10 minutes.";
    let html = "<p>Your code is <b>123456</b>.</p>\r\n<p>It expires in 10 minutes — really.</p>";
    let message = Message::builder()
        .from(mailbox("notify@example.com"))
        .to(mailbox("user@example.com"))
        .subject("Your code")
        .message_id(Some("<code-1@notify.test>".into()))
        .multipart(MultiPart::alternative_plain_html(text.to_string(), html.to_string()))
        .unwrap();

    transport(&server).send(message).await.expect("accepted");

    let mail = server.wait_for_mails(1, WAIT).await.remove(0);
    assert_eq!(mail.subject, "Your code");
    assert_eq!(mail.text_body, text);
    assert_eq!(mail.html_body.as_deref(), Some(html));
    assert_eq!(mail.message_id.as_deref(), Some("<code-1@notify.test>"));
}

#[tokio::test]
async fn scripted_transient_replies_refuse_then_the_server_accepts_again() {
    let server = SmtpServer::start().await;
    server.script(vec![Reply::transient(), Reply::transient()]);
    let smtp = transport(&server);

    for attempt in 1..=2 {
        let err = smtp.send(plain("retry me", "body")).await.expect_err("scripted refusal");
        assert!(err.is_transient(), "attempt {attempt}: {err:?}");
    }
    smtp.send(plain("retry me", "body")).await.expect("accepted after the script");

    assert_eq!(server.wait_for_mails(1, WAIT).await.len(), 1);
    assert_eq!(server.attempts(), 3, "refused mails count as attempts");
    assert_eq!(server.mails().len(), 1, "refused mails are not recorded");
}

#[tokio::test]
async fn a_standing_permanent_reply_refuses_until_reset() {
    let server = SmtpServer::start().await;
    server.always(Reply::permanent());
    let smtp = transport(&server);

    for _ in 0..2 {
        let err = smtp.send(plain("bounce", "body")).await.unwrap_err();
        assert!(err.is_permanent(), "{err:?}");
    }
    assert!(server.mails().is_empty());
    server.wait_for_attempts(2, WAIT).await;

    server.reset();
    smtp.send(plain("after reset", "body")).await.expect("accepted");
    assert_eq!(server.mails()[0].subject, "after reset");
}

#[tokio::test]
async fn concurrent_sends_through_one_pool_all_arrive() {
    let server = SmtpServer::start().await;
    let smtp = transport(&server);

    let sends = (0..20).map(|i| {
        let smtp = smtp.clone();
        async move { smtp.send(plain(&format!("mail {i}"), "body")).await }
    });
    for result in futures_util::future::join_all(sends).await {
        result.expect("accepted");
    }

    let mails = server.wait_for_mails(20, WAIT).await;
    let subjects: HashSet<String> = mails.iter().map(|m| m.subject.clone()).collect();
    assert_eq!(subjects.len(), 20, "{subjects:?}");
    assert_eq!(server.attempts(), 20);
}

#[tokio::test]
async fn a_delayed_mail_is_in_progress_until_answered() {
    let server = SmtpServer::start().await;
    server.set_delay(Duration::from_millis(300));
    let smtp = transport(&server);

    let send = tokio::spawn(async move { smtp.send(plain("slow", "body")).await });
    // The attempt is counted when DATA ends, before the delay.
    server.wait_for_attempts(1, WAIT).await;
    assert_eq!(server.in_progress(), 1);
    assert!(server.mails().is_empty(), "recorded only when answered");

    send.await.unwrap().expect("accepted after the delay");
    assert_eq!(server.in_progress(), 0);
    assert_eq!(server.mails().len(), 1);
}

#[tokio::test]
#[should_panic(expected = "but 0 mail(s) were accepted out of 0 attempt(s)")]
async fn waiting_for_mails_that_never_come_fails_with_what_arrived() {
    let server = SmtpServer::start().await;
    server.wait_for_mails(1, Duration::from_millis(50)).await;
}
