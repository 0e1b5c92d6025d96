//! Routing never crosses organisations, and targets that are unknown or offline are named.

mod common;
use common::*;
use relay::store::OperatorRole;
use serde_json::json;

#[tokio::test]
async fn a_pilot_of_org_b_cannot_reach_org_a_devices() {
    let r = start_relay().await;
    r.create_org("org-b");
    let secret = r.create_device("boat-a", "default");
    let kb = r.create_operator("bob", "org-b", OperatorRole::Admin);
    let mut dev = r.device("boat-a", &secret).await;
    let mut b = r.operator(&kb).await;

    b.send(json!({"type":"subscribe","correlationID":"s","payload":{"deviceID":"boat-a"}})).await;
    let e = b.recv().await;
    assert_eq!(e["payload"]["code"], "unknown_target", "{e}");
    assert_eq!(e["correlationID"], "s");
    b.send(json!({"type":"execute_command","correlationID":"c","clientID":"boat-a","payload":{"command":"ls"}})).await;
    assert_eq!(b.recv().await["payload"]["code"], "unknown_target");
    b.send(json!({"type":"webrtc","clientID":"boat-a","payload":{"subtype":"offer","sessionID":"s1","sdp":"v=0"}}))
        .await;
    assert_eq!(b.recv().await["payload"]["code"], "unknown_target");
    // The device never saw any of it.
    dev.telemetry(1, now_ms(), json!({})).await;
    assert!(dev.try_recv(std::time::Duration::from_millis(300)).await.is_none());
    // And org B's device list does not show it.
    let (_, list) = r.get_json("/api/devices", Some(&kb)).await;
    assert_eq!(list["devices"].as_array().unwrap().len(), 0);
    r.stop().await;
}

#[tokio::test]
async fn unknown_and_offline_targets_are_named() {
    let r = start_relay().await;
    r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut p = r.operator(&key).await;
    p.send(json!({"type":"execute_command","correlationID":"c1","clientID":"nope","payload":{"command":"ls"}})).await;
    let e = p.recv().await;
    assert_eq!(e["payload"]["code"], "unknown_target");
    assert_eq!(e["correlationID"], "c1");
    // Signaling for an offline device is refused (a command would be queued: offline_queue.rs).
    p.send(json!({"type":"webrtc","correlationID":"c2","clientID":"boat-1","payload":{"subtype":"offer","sessionID":"s2","sdp":"v=0"}}))
        .await;
    let e = p.recv().await;
    assert_eq!(e["payload"]["code"], "target_offline");
    assert_eq!(e["correlationID"], "c2");
    let (_, list) = r.get_json("/api/devices", Some(&key)).await;
    assert_eq!(list["devices"][0]["id"], "boat-1");
    assert_eq!(list["devices"][0]["online"], false);
    r.stop().await;
}

#[tokio::test]
async fn subscribing_to_an_operator_or_messaging_another_device_is_refused() {
    let r = start_relay().await;
    let s1 = r.create_device("boat-1", "default");
    let s2 = r.create_device("boat-2", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut p = r.operator(&key).await;
    p.send(json!({"type":"subscribe","payload":{"deviceID":"op-ana"}})).await;
    assert_eq!(p.recv().await["payload"]["code"], "unknown_target");
    let mut d1 = r.device("boat-1", &s1).await;
    let mut d2 = r.device("boat-2", &s2).await;
    d1.send(json!({"type":"webrtc","clientID":"boat-2","payload":{"subtype":"offer","sdp":"v=0"}})).await;
    assert_eq!(d1.recv_type("error").await["payload"]["code"], "not_allowed");
    assert!(d2.try_recv(std::time::Duration::from_millis(300)).await.is_none());
    r.stop().await;
}
