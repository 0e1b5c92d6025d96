//! Every way authentication can fail gets a clear error and a policy close.

mod common;
use std::time::Duration;

use common::*;
use serde_json::json;

async fn refused(c: &mut Client, code: &str) {
    let e = c.recv().await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["payload"]["code"], code, "{e}");
    assert!(!e["payload"]["message"].as_str().unwrap().is_empty());
    let close = c.expect_close().await.expect("close frame");
    assert_eq!(u16::from(close.code), 1008);
}

#[tokio::test]
async fn wrong_secret_in_header_is_refused() {
    let r = start_relay().await;
    r.create_device("boat-1", "default");
    let mut c = Client::connect(&r.ws_url("/ws?clientID=boat-1"), Some("not-the-secret")).await;
    refused(&mut c, "auth_failed").await;
    r.stop().await;
}

#[tokio::test]
async fn wrong_secret_in_first_message_is_refused_and_right_one_works() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let mut c = Client::connect(&r.ws_url("/ws?clientID=boat-1"), None).await;
    c.send(json!({"type":"auth","correlationID":"a1","payload":{"clientSecret":"nope"}})).await;
    let e = c.recv().await;
    assert_eq!(e["correlationID"], "a1");
    assert_eq!(e["payload"]["code"], "auth_failed");
    c.expect_close().await;

    let mut c = Client::connect(&r.ws_url("/ws?clientID=boat-1"), None).await;
    c.send(json!({"type":"auth","payload":{"clientSecret":secret}})).await;
    let ok = c.recv().await;
    assert_eq!(ok["type"], "auth_ok");
    assert_eq!(c.recv().await["type"], "lease_state");
    assert_eq!(ok["payload"]["clientID"], "boat-1");
    assert_eq!(ok["payload"]["role"], "device");
    r.stop().await;
}

#[tokio::test]
async fn unknown_client_id_is_refused_like_a_wrong_secret() {
    let r = start_relay().await;
    let mut c = Client::connect(&r.ws_url("/ws?clientID=ghost"), Some("x")).await;
    refused(&mut c, "auth_failed").await;
    r.stop().await;
}

#[tokio::test]
async fn anything_before_auth_is_refused() {
    let r = start_relay().await;
    r.create_device("boat-1", "default");
    let mut c = Client::connect(&r.ws_url("/ws?clientID=boat-1"), None).await;
    c.send(json!({"type":"telemetry","payload":{"sequence":1,"timestamp":1}})).await;
    refused(&mut c, "not_authenticated").await;
    r.stop().await;
}

#[tokio::test]
async fn silence_after_connect_times_out() {
    let r = start_relay_with(|c| c.auth_timeout = 0.3).await;
    let mut c = Client::connect(&r.ws_url("/ws?clientID=boat-1"), None).await;
    refused(&mut c, "auth_timeout").await;
    r.stop().await;
}

#[tokio::test]
async fn register_without_handshake_keys_is_an_invalid_key() {
    let r = start_relay().await;
    let mut c = Client::connect(&r.ws_url("/ws"), None).await;
    c.send(json!({"type":"register","payload":{"name":"Client-1","handshakeKey":"group-default123"}})).await;
    refused(&mut c, "invalid_handshake_key").await;
    r.stop().await;
}

#[tokio::test]
async fn bad_api_keys_get_401_json() {
    let r = start_relay().await;
    let http = reqwest::Client::new();
    for auth in [None, Some("Bearer tk_nope_nope"), Some("Bearer garbage"), Some("Basic abc")] {
        let mut req = http.post(r.http("/api/auth/ws-ticket"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "auth_failed");
    }
    let metrics = reqwest::get(r.http("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tether_auth_failures_total 2"), "{metrics}");
    // The admin key from the config works, and /api/me describes it.
    let me: serde_json::Value =
        http.get(r.http("/api/me")).bearer_auth(&r.admin_key).send().await.unwrap().json().await.unwrap();
    assert_eq!(me["role"], "admin");
    assert_eq!(me["org"], "default");
    let _ = Duration::ZERO;
    r.stop().await;
}

#[tokio::test]
async fn guessing_api_keys_gets_the_address_blocked() {
    let r = start_relay_with(|c| c.auth_failures_per_minute = 3).await;
    let mut codes = vec![];
    for _ in 0..5 {
        let (s, v) = call(&r, reqwest::Method::GET, "/api/me", Some("tk_guess_guess"), None).await;
        codes.push((s, v["error"]["code"].as_str().unwrap().to_owned()));
    }
    assert_eq!(codes[0], (401, "auth_failed".into()));
    assert_eq!(codes[4], (429, "rate_limited".into()), "{codes:?}");
    // Even the right key waits out the block from this address.
    let (s, _) = call(&r, reqwest::Method::GET, "/api/me", Some(&r.admin_key), None).await;
    assert_eq!(s, 429);
    r.stop().await;
}

#[tokio::test]
async fn admin_socket_without_ticket_is_refused() {
    let r = start_relay().await;
    let mut c = Client::connect(&r.ws_url("/ws/admin"), None).await;
    refused(&mut c, "invalid_ticket").await;
    r.stop().await;
}
