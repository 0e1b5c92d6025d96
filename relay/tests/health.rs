//! /health for uptime checkers and /metrics for Prometheus.

mod common;
use common::*;
use relay::store::OperatorRole;

#[tokio::test]
async fn health_is_200_with_counts_and_503_when_the_store_is_locked() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let _dev = r.device("boat-1", &secret).await;
    let _p = r.operator(&key).await;

    let resp = reqwest::get(r.http("/health")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let h: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    assert!(h["uptimeSeconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(h["connections"]["device"], 1);
    assert_eq!(h["connections"]["pilot"], 1);
    assert_eq!(h["store"]["status"], "ok");

    // Another process holds the database's write lock: the relay cannot record anything, so it
    // must not claim to be healthy.
    let path = r.running().relay.store.path().to_owned();
    let locker = rusqlite::Connection::open(&path).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let resp = reqwest::get(r.http("/health")).await.unwrap();
    assert_eq!(resp.status(), 503);
    let h: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(h["store"]["status"], "error");
    assert!(h["store"]["message"].as_str().unwrap().contains("lock"), "{h}");
    locker.execute_batch("ROLLBACK").unwrap();
    assert_eq!(reqwest::get(r.http("/health")).await.unwrap().status(), 200);
    r.stop().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let mut dev = r.device("boat-1", &secret).await;
    dev.telemetry(1, now_ms(), serde_json::json!({})).await;
    dev.send(serde_json::json!({"type":"ping","payload":{}})).await;
    dev.recv_type("pong").await;
    let resp = reqwest::get(r.http("/metrics")).await.unwrap();
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let m = resp.text().await.unwrap();
    assert!(m.contains("tether_connections{role=\"device\"} 1"), "{m}");
    assert!(m.contains("tether_messages_in_total{type=\"telemetry\"} 1"));
    assert!(m.contains("tether_messages_in_total{type=\"ping\"} 1"));
    assert!(m.contains("tether_messages_out_total{type=\"pong\"} 1"));
    assert!(m.contains("# TYPE tether_auth_failures_total counter"));
    r.stop().await;
}

#[tokio::test]
async fn unknown_paths_get_json_404_and_the_console_is_served() {
    let r = start_relay().await;
    let resp = reqwest::get(r.http("/api/nope")).await.unwrap();
    assert_eq!(resp.status(), 404);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    let resp = reqwest::get(r.http("/ws/status/unknown-request")).await.unwrap();
    assert_eq!(resp.status(), 404);
    let resp = reqwest::get(r.http("/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(resp.text().await.unwrap().contains("login-key"));
    r.stop().await;
}

#[tokio::test]
async fn unknown_paths_are_404_for_every_method() {
    let r = start_relay().await;
    let c = reqwest::Client::new();
    for resp in [c.post(r.http("/nope")).send().await.unwrap(), c.delete(r.http("/api/x")).send().await.unwrap()] {
        assert_eq!(resp.status(), 404);
    }
    // A known path with the wrong method is 405.
    assert_eq!(c.get(r.http("/api/auth/ws-ticket")).send().await.unwrap().status(), 405);
    r.stop().await;
}
