//! With the broker gone the API answers 503 + Retry-After quickly instead of hanging, and
//! recovers by itself when the broker returns. Uses a private broker node on its own ports;
//! the machine's shared RabbitMQ is never touched.

use crate::support;

use notify_testkit::{private_broker::PrivateBroker, rabbit, smtp::SmtpServer};
use std::time::{Duration, Instant};
use support::{email, settings, TestApi};

const PATH: &str = "/api/v1/notifications/email";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_get_503_within_5s_while_the_broker_is_down_and_202_after_it_returns() {
    let _turn = support::private_nodes_one_at_a_time().await;
    let broker = PrivateBroker::start().await.expect("private broker starts");
    let smtp = SmtpServer::start().await;
    let s = settings(&rabbit::unique_prefix("outage"), &broker.url(), &smtp.url());
    let api = TestApi::start(&s).await.unwrap();
    assert_eq!(api.post_json(PATH, &email("a@example.com", "before", "b")).await.status(), 202);

    broker.kill().await.expect("broker killed");
    for i in 0..3 {
        let started = Instant::now();
        let res = api.post_json(PATH, &email("a@example.com", "during", "b")).await;
        let took = started.elapsed();
        println!("POST {i} during the outage: {} in {took:?}", res.status());
        assert_eq!(res.status(), 503);
        assert!(took < Duration::from_secs(5), "answered in {took:?}");
        assert!(res.headers().get("retry-after").is_some());
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], "service_unavailable");
    }
    let ready = api.client.get(format!("{}/ready", api.base)).send().await.unwrap();
    assert_eq!(ready.status(), 503);

    // An API started while the broker is down starts unready instead of failing.
    let late = TestApi::start(&s).await.expect("starts without a broker");
    let res = late.post_json(PATH, &email("a@example.com", "late", "b")).await;
    assert_eq!(res.status(), 503);

    broker.restart().await.expect("broker back");
    let back = Instant::now();
    for api in [&api, &late] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = api.client.get(format!("{}/ready", api.base)).send().await.unwrap();
            if ready.status() == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "API not ready 30 s after the broker returned");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(api.post_json(PATH, &email("a@example.com", "after", "b")).await.status(), 202);
    }
    println!("both APIs accepting again {:?} after the broker returned", back.elapsed());
    api.stop().await;
    late.stop().await;
    support::drop_schema(&s).await;
}
