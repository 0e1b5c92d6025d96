//! A pilot who subscribes late first gets the buffered frames, marked as replay.

mod common;
use common::*;
use relay::store::OperatorRole;
use serde_json::json;

#[tokio::test]
async fn late_subscriber_gets_the_last_frames_as_replay_then_live() {
    let r = start_relay_with(|c| c.telemetry_buffer_size = 3).await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    for seq in 1..=5u64 {
        dev.telemetry(seq, now_ms(), json!({"n":seq})).await;
    }
    // Make sure the relay has processed the frames before subscribing.
    dev.send(json!({"type":"ping","payload":{}})).await;
    dev.recv_type("pong").await;

    let mut p = r.operator(&key).await;
    let s = subscribe(&mut p, "boat-1").await;
    assert_eq!(s["payload"]["replayed"], 3);
    for seq in 3..=5u64 {
        let f = p.recv_type("telemetry").await;
        assert_eq!(f["payload"]["sequence"], seq);
        assert_eq!(f["payload"]["relay"]["replay"], true);
    }
    dev.telemetry(6, now_ms(), json!({"n":6})).await;
    let live = p.recv_type("telemetry").await;
    assert_eq!(live["payload"]["sequence"], 6);
    assert!(live["payload"]["relay"].get("replay").is_none());

    // replay:false skips the buffer.
    let mut q = r.operator(&key).await;
    q.send(json!({"type":"subscribe","payload":{"deviceID":"boat-1","replay":false}})).await;
    assert_eq!(q.recv().await["payload"]["replayed"], 0);
    dev.telemetry(7, now_ms(), json!({})).await;
    assert_eq!(q.recv_type("telemetry").await["payload"]["sequence"], 7);
    r.stop().await;
}

#[tokio::test]
async fn subscribing_to_an_offline_device_works_and_says_offline() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut p = r.operator(&key).await;
    let s = subscribe(&mut p, "boat-1").await;
    assert_eq!(s["payload"]["online"], false);
    let mut dev = r.device("boat-1", &secret).await;
    dev.telemetry(1, now_ms(), json!({})).await;
    assert_eq!(p.recv_type("telemetry").await["payload"]["sequence"], 1);
    r.stop().await;
}
