//! A device's `safety_stop` reaches every subscriber of the device and is written to the audit
//! log with the device, reason, policy and controller.

mod common;
use std::time::Duration;

use common::*;
use relay::store::OperatorRole;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn fanned_out_to_subscribers_and_audited() {
    let r = start_relay().await;
    let (mut dev, mut ana) = r.boat_and_pilot().await;
    let other = r.create_operator("ben", "default", OperatorRole::Pilot);
    let mut ben = r.operator(&other).await;

    let stop = json!({"policy":"hold","reason":"controller_silent","timestamp":1732262400123u64,"controller":"op-ana"});
    dev.send(json!({"type":"safety_stop","payload":stop})).await;
    let got = ana.recv_type("safety_stop").await;
    assert_eq!(got["from"], "boat-1");
    assert_eq!(got["payload"], stop);
    assert!(ben.try_recv(Duration::from_millis(300)).await.is_none(), "only subscribers");

    // A stop that happened while the link was down is reported late.
    dev.send(json!({"type":"safety_stop","payload":{"policy":"stop","reason":"link_lost","timestamp":1732262300000u64,"late":true}}))
        .await;
    let late = ana.recv_type("safety_stop").await;
    assert_eq!(late["payload"]["late"], true);

    // The relay handles a device's messages in order: once the pong is back, both audit
    // records are written.
    dev.send(json!({"type":"ping","correlationID":"sync"})).await;
    dev.recv_type("pong").await;
    let (status, audit) = admin_call(&r, Method::GET, "/api/audit", None).await;
    assert_eq!(status, 200, "{audit}");
    let stops: Vec<_> =
        audit["entries"].as_array().unwrap().iter().filter(|e| e["action"] == "device.safety_stop").collect();
    assert_eq!(stops.len(), 2, "{audit}");
    // Newest first.
    let (newest, first) = (stops[0], stops[1]);
    assert_eq!(first["actor"], "boat-1");
    assert_eq!(first["subject"], "boat-1");
    assert_eq!(first["detail"]["reason"], "controller_silent");
    assert_eq!(first["detail"]["policy"], "hold");
    assert_eq!(first["detail"]["controller"], "op-ana");
    assert_eq!(first["detail"]["late"], false);
    assert_eq!(newest["detail"]["reason"], "link_lost");
    assert_eq!(newest["detail"]["controller"], serde_json::Value::Null);
    assert_eq!(newest["detail"]["late"], true);
    r.stop().await;
}

#[tokio::test]
async fn operators_cannot_send_safety_stop() {
    let r = start_relay().await;
    let (_dev, mut ana) = r.boat_and_pilot().await;
    ana.send(json!({"type":"safety_stop","correlationID":"s","clientID":"boat-1",
        "payload":{"policy":"hold","reason":"link_lost","timestamp":1.0}}))
        .await;
    let e = ana.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "not_allowed");
    assert_eq!(e["correlationID"], "s");
    let (_, audit) = admin_call(&r, Method::GET, "/api/audit", None).await;
    assert!(audit["entries"].as_array().unwrap().iter().all(|e| e["action"] != "device.safety_stop"));
    r.stop().await;
}
