//! `process_state` from a device reaches every subscriber of that device, and the relay keeps
//! the latest one so a pilot subscribing later gets it right after `subscribed`.

mod common;
use std::time::Duration;

use common::*;
use relay::store::OperatorRole;
use serde_json::{Value, json};

fn state(name: &str, st: &str, restarts: u32) -> Value {
    json!({"type":"process_state","payload":{"processes":[
        {"name":name,"state":st,"pid":4242,"restarts":restarts,"since":1732262400000u64}]}})
}

#[tokio::test]
async fn fanned_out_and_replayed_on_subscribe() {
    let r = start_relay().await;
    let (mut dev, mut ana) = r.boat_and_pilot().await;
    let other = r.create_operator("ben", "default", OperatorRole::Pilot);
    let mut ben = r.operator(&other).await;

    // ana is subscribed: she gets it live, with from stamped. ben is not subscribed.
    dev.send(state("ros", "running", 0)).await;
    let live = ana.recv_type("process_state").await;
    assert_eq!(live["from"], "boat-1");
    assert_eq!(live["payload"]["processes"][0]["name"], "ros");
    assert_eq!(live["payload"]["processes"][0]["state"], "running");
    assert!(ben.try_recv(Duration::from_millis(300)).await.is_none(), "only subscribers");

    dev.send(state("ros", "restarting", 1)).await;
    assert_eq!(ana.recv_type("process_state").await["payload"]["processes"][0]["restarts"], 1);

    // ben subscribes later: subscribed, then the newest snapshot, then lease_state.
    ben.send(json!({"type":"subscribe","correlationID":"s","payload":{"deviceID":"boat-1","replay":false}})).await;
    assert_eq!(ben.recv().await["type"], "subscribed");
    let replayed = ben.recv().await;
    assert_eq!(replayed["type"], "process_state", "{replayed}");
    assert_eq!(replayed["from"], "boat-1");
    assert_eq!(replayed["payload"]["processes"][0]["state"], "restarting");
    assert_eq!(ben.recv().await["type"], "lease_state");

    // The snapshot outlives the device's connection.
    drop(dev);
    assert_eq!(ana.recv_type("presence").await["payload"]["status"], "offline");
    let mut cat = r.operator(&r.admin_key).await;
    subscribe(&mut cat, "boat-1").await;
    assert_eq!(cat.recv().await["payload"]["processes"][0]["state"], "restarting");
    r.stop().await;
}

#[tokio::test]
async fn operators_cannot_publish_process_state() {
    let r = start_relay().await;
    let (_dev, mut ana) = r.boat_and_pilot().await;
    let mut st = state("ros", "running", 0);
    st["clientID"] = json!("boat-1");
    st["correlationID"] = json!("ps");
    ana.send(st).await;
    let e = ana.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "not_allowed");
    assert_eq!(e["correlationID"], "ps");
    r.stop().await;
}
