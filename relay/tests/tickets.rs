//! WebSocket tickets work once and expire.

mod common;
use std::time::Duration;

use common::*;

#[tokio::test]
async fn a_ticket_cannot_be_reused() {
    let r = start_relay().await;
    let t = r.ticket(&r.admin_key).await;
    let url = r.ws_url(&format!("/ws/admin?ticket={t}"));
    let mut first = Client::connect(&url, None).await;
    let ok = first.recv().await;
    assert_eq!(ok["type"], "auth_ok");
    assert_eq!(ok["payload"]["role"], "admin");

    let mut second = Client::connect(&url, None).await;
    let e = second.recv().await;
    assert_eq!(e["payload"]["code"], "invalid_ticket");
    assert_eq!(u16::from(second.expect_close().await.unwrap().code), 1008);
    // The first connection is unaffected.
    first.send(serde_json::json!({"type":"ping","payload":{}})).await;
    assert_eq!(first.recv().await["type"], "pong");
    r.stop().await;
}

#[tokio::test]
async fn an_expired_ticket_is_refused() {
    let r = start_relay_with(|c| c.ticket_ttl = 0.3).await;
    let (_, resp) = r.post_json("/api/auth/ws-ticket", Some(&r.admin_key)).await;
    assert_eq!(resp["expiresIn"], 1, "expiresIn is whole seconds, rounded up");
    let t = resp["ticket"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut c = Client::connect(&r.ws_url(&format!("/ws/admin?ticket={t}")), None).await;
    assert_eq!(c.recv().await["payload"]["code"], "invalid_ticket");
    c.expect_close().await;
    r.stop().await;
}

#[tokio::test]
async fn default_ticket_lifetime_is_30_seconds() {
    let r = start_relay().await;
    let (_, resp) = r.post_json("/api/auth/ws-ticket", Some(&r.admin_key)).await;
    assert_eq!(resp["expiresIn"], 30);
    r.stop().await;
}
