//! Device telemetry reaches every subscribed pilot, stamped and annotated by the relay.

mod common;
use common::*;
use relay::store::OperatorRole;
use serde_json::json;

#[tokio::test]
async fn telemetry_fans_out_to_two_pilots() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let k1 = r.create_operator("ana", "default", OperatorRole::Pilot);
    let k2 = r.create_operator("ben", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    let mut p1 = r.operator(&k1).await;
    let mut p2 = r.operator(&k2).await;
    let s = subscribe(&mut p1, "boat-1").await;
    assert_eq!(s["payload"]["online"], true);
    assert_eq!(s["correlationID"], "sub-1");
    subscribe(&mut p2, "boat-1").await;

    for seq in 1..=5u64 {
        dev.telemetry(seq, now_ms(), json!({"gps":{"latitude":37.7749,"longitude":-122.4194},"n":seq})).await;
    }
    for p in [&mut p1, &mut p2] {
        for seq in 1..=5u64 {
            let f = p.recv_type("telemetry").await;
            assert_eq!(f["from"], "boat-1", "relay stamps the sender");
            assert_eq!(f["payload"]["sequence"], seq);
            assert_eq!(f["payload"]["data"]["n"], seq, "device payload forwarded unchanged");
            let relay = &f["payload"]["relay"];
            assert_eq!(relay["verdict"], "ok");
            assert_eq!(relay["stream"], "sensor_data");
            assert!(relay["receivedAt"].as_f64().unwrap() > 1.6e12);
            assert!(relay.get("replay").is_none());
        }
    }
    // An unsubscribed pilot gets nothing more.
    p2.send(json!({"type":"unsubscribe","payload":{"deviceID":"boat-1"}})).await;
    assert_eq!(p2.recv().await["type"], "unsubscribed");
    dev.telemetry(6, now_ms(), json!({})).await;
    assert_eq!(p1.recv_type("telemetry").await["payload"]["sequence"], 6);
    assert!(p2.try_recv(std::time::Duration::from_millis(300)).await.is_none());
    r.stop().await;
}

#[tokio::test]
async fn device_ping_gets_pong_with_relay_time() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let mut dev = r.device("boat-1", &secret).await;
    dev.send(json!({"type":"ping","correlationID":"p1","payload":{"t":42.5}})).await;
    let pong = dev.recv_type("pong").await;
    assert_eq!(pong["correlationID"], "p1");
    assert_eq!(pong["payload"]["t"], 42.5);
    assert!(pong["payload"]["relayTime"].as_f64().unwrap() > 1.6e12);
    r.stop().await;
}
