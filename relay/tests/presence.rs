//! Presence: the HTTP API of seed 001 and live online/offline events.

mod common;
use common::*;

#[tokio::test]
async fn presence_api_and_events() {
    let r = start_relay().await;
    r.create_org("other");
    let secret = r.create_device("mouse_pi", "default");
    r.create_device("sensor_pi", "default");
    r.running()
        .relay
        .store
        .call_sync(|c| relay::auth::issue_device_sync(c, "their_pi", "other", "x").map(|_| ()))
        .unwrap();
    let key = r.create_pilot("ana", Some("view"));
    let mut p = r.operator(&key).await;
    subscribe(&mut p, "mouse_pi").await;

    let dev = r.device("mouse_pi", &secret).await;
    let online = p.recv_type("presence").await;
    assert_eq!(online["payload"]["deviceID"], "mouse_pi");
    assert_eq!(online["payload"]["status"], "online");
    let (s, v) = r.get_json("/api/presence?devices=mouse_pi,sensor_pi,their_pi,nope", Some(&key)).await;
    assert_eq!(s, 200);
    assert_eq!(v, serde_json::json!({"mouse_pi":"online","sensor_pi":"offline","their_pi":"offline","nope":"offline"}));

    drop(dev);
    let offline = p.recv_type("presence").await;
    assert_eq!(offline["payload"]["status"], "offline");
    assert!(offline["payload"]["lastSeen"].as_i64().unwrap() > 1_600_000_000_000);
    let (_, v) = r.get_json("/api/presence?devices=mouse_pi", Some(&key)).await;
    assert_eq!(v["mouse_pi"], "offline");
    let (s, _) = r.get_json("/api/presence?devices=mouse_pi", None).await;
    assert_eq!(s, 401);
    r.stop().await;
}
