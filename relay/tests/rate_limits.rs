//! Rate limits: a flooding client is refused with `rate_limited` and does not raise a
//! well-behaved neighbour's latency; per-credential overrides raise the limit.

mod common;
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

async fn ping_rtt(c: &mut Client) -> Duration {
    let t = Instant::now();
    c.send(json!({"type":"ping","correlationID":"rtt","payload":{}})).await;
    loop {
        let m = c.recv().await;
        if m["type"] == "pong" {
            return t.elapsed();
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test]
async fn a_flood_is_rate_limited_without_hurting_a_neighbour() {
    let r = start_relay_with(|c| c.messages_per_second = 50).await;
    let flood_key = r.create_pilot("flood", Some("view"));
    let calm_key = r.create_pilot("calm", Some("view"));
    let mut calm = r.operator(&calm_key).await;
    let mut baseline = Vec::new();
    for _ in 0..20 {
        baseline.push(ping_rtt(&mut calm).await);
    }

    let flood = r.operator(&flood_key).await;
    let (mut tx, mut rx) = futures_util::StreamExt::split(flood.ws);
    // Drain the flooder's socket so the relay can always write to it.
    let reader = tokio::spawn(async move {
        let (mut limited, mut retry) = (0, 0u64);
        while let Some(Ok(m)) = futures_util::StreamExt::next(&mut rx).await {
            if let Message::Text(t) = m {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["payload"]["code"] == "rate_limited" {
                    limited += 1;
                    retry = v["payload"]["retryAfterMs"].as_u64().unwrap();
                }
            }
        }
        (limited, retry)
    });
    let ping = Message::Text(json!({"type":"ping","payload":{}}).to_string().into());
    let flooding = tokio::spawn(async move {
        for _ in 0..20_000 {
            if tx.feed(ping.clone()).await.is_err() {
                break;
            }
        }
        let _ = tx.flush().await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let _ = tx.close().await;
    });
    let mut during = Vec::new();
    for _ in 0..20 {
        during.push(ping_rtt(&mut calm).await);
    }
    flooding.await.unwrap();
    let (limited, retry) = reader.await.unwrap();
    let (b, d) = (median(baseline), median(during));
    println!("calm client's median ping: {b:?} before, {d:?} during a 20,000-message flood");
    assert!(limited >= 1, "the flooder was told it is rate limited");
    assert!(retry > 0 && retry <= 1000, "with a retry-after: {retry}");
    // Generous on purpose (wall-clock noise on shared CI machines); an unprotected relay
    // would queue the calm client's pings behind the flood's processing.
    assert!(d < b * 20 + Duration::from_millis(100), "neighbour latency rose from {b:?} to {d:?}");
    let m = reqwest::get(r.http("/metrics")).await.unwrap().text().await.unwrap();
    let refused: u64 = m.lines().find_map(|l| l.strip_prefix("tether_rate_limited_total ")).unwrap().parse().unwrap();
    assert!(refused > 1000, "most of the flood was refused: {refused}");
    r.stop().await;
}

#[tokio::test]
async fn overrides_raise_a_credentials_limit() {
    let r = start_relay_with(|c| c.messages_per_second = 5).await;
    let key = r.create_pilot("bulk", Some("view"));
    let (s, body) =
        admin_call(&r, reqwest::Method::PUT, "/api/limits/op-bulk", Some(json!({"messagesPerSecond": 10000}))).await;
    assert_eq!(s, 200, "{body}");
    let mut p = r.operator(&key).await;
    for i in 0..100 {
        p.send(json!({"type":"ping","correlationID":format!("p{i}"),"payload":{}})).await;
    }
    for _ in 0..100 {
        assert_eq!(p.recv().await["type"], "pong", "nothing refused under the raised limit");
    }
    let (s, e) =
        admin_call(&r, reqwest::Method::PUT, "/api/limits/op-bulk", Some(json!({"messagesPerSecond": -1}))).await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("bad_request")));
    r.stop().await;
}

#[tokio::test]
async fn connection_attempts_per_credential_are_limited() {
    let r = start_relay_with(|c| c.connections_per_minute = 3).await;
    let secret = r.create_device("boat-1", "default");
    for _ in 0..3 {
        drop(r.device("boat-1", &secret).await);
    }
    let mut c = Client::connect(&r.ws_url("/ws?clientID=boat-1"), Some(&secret)).await;
    let e = c.recv().await;
    assert_eq!(e["payload"]["code"], "rate_limited", "{e}");
    assert_eq!(u16::from(c.expect_close().await.unwrap().code), 1013);
    r.stop().await;
}
