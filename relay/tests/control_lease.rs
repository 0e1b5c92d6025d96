//! The control lease: one pilot drives at a time; handover, timeout, disconnect, takeover.

mod common;
use std::time::Duration;

use common::*;
use serde_json::json;

fn lease(ty: &str, takeover: bool) -> serde_json::Value {
    json!({"type": ty, "correlationID": ty, "payload": {"deviceID": "boat-1", "takeover": takeover}})
}

fn waypoint(corr: &str) -> serde_json::Value {
    json!({"type":"app_command","correlationID":corr,"clientID":"boat-1","payload":{"command":"set_waypoint","data":{"latitude":37.77,"longitude":-122.41}}})
}

#[tokio::test]
async fn one_holder_handover_and_everyone_sees_who_holds_it() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let mut dev = r.device("boat-1", &secret).await;
    let ka = r.create_pilot("ana", Some("control"));
    let kb = r.create_pilot("ben", Some("control"));
    let kv = r.create_pilot("vic", Some("view"));
    let (mut a, mut b, mut v) = (r.operator(&ka).await, r.operator(&kb).await, r.operator(&kv).await);
    subscribe(&mut v, "boat-1").await;
    assert!(v.recv_type("lease_state").await["payload"].get("holder").is_none(), "nobody holds it yet");

    a.send(lease("lease_acquire", false)).await;
    assert_eq!(a.recv_type("ack").await["payload"]["data"]["lease"], "acquired");
    let seen = v.recv_type("lease_state").await;
    assert_eq!(seen["payload"]["holderName"], "ana");
    assert_eq!(dev.recv_type("lease_state").await["payload"]["holder"], "op-ana", "the device knows who drives");

    b.send(lease("lease_acquire", false)).await;
    let e = b.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "not_controller");
    assert!(e["payload"]["message"].as_str().unwrap().contains("ana"));
    b.send(waypoint("w-b")).await;
    assert_eq!(b.recv_type("error").await["payload"]["code"], "not_controller");
    a.send(waypoint("w-a")).await;
    assert_eq!(a.recv_type("ack").await["payload"]["status"], "delivered");
    let cmd = dev.recv_type("app_command").await;
    assert_eq!((cmd["from"].as_str(), cmd["correlationID"].as_str()), (Some("op-ana"), Some("w-a")));

    // Hand over: ana releases, ben takes it.
    a.send(lease("lease_release", false)).await;
    assert_eq!(a.recv_type("ack").await["payload"]["data"]["lease"], "released");
    b.send(lease("lease_acquire", false)).await;
    assert_eq!(b.recv_type("ack").await["payload"]["data"]["lease"], "acquired");
    assert_eq!(v.recv_type("lease_state").await["payload"]["reason"], "released");
    assert_eq!(v.recv_type("lease_state").await["payload"]["holderName"], "ben");
    a.send(waypoint("w-a2")).await;
    assert_eq!(a.recv_type("error").await["payload"]["code"], "not_controller");

    // An admin takes over; a pilot cannot.
    a.send(lease("lease_acquire", true)).await;
    assert_eq!(a.recv_type("error").await["payload"]["code"], "forbidden");
    let mut admin = r.operator(&r.admin_key).await;
    admin.send(lease("lease_acquire", true)).await;
    assert_eq!(admin.recv_type("ack").await["payload"]["data"]["lease"], "takeover");
    assert_eq!(v.recv_type("lease_state").await["payload"]["holderName"], "admin");
    r.stop().await;
}

#[tokio::test]
async fn the_lease_ends_when_the_holder_goes_silent_or_disconnects() {
    let r = start_relay_with(|c| c.lease_timeout = 0.5).await;
    r.create_device("boat-1", "default");
    let ka = r.create_pilot("ana", Some("control"));
    let kv = r.create_pilot("vic", Some("view"));
    let mut v = r.operator(&kv).await;
    subscribe(&mut v, "boat-1").await;
    v.recv_type("lease_state").await;

    let mut a = r.operator(&ka).await;
    a.send(lease("lease_acquire", false)).await;
    a.recv_type("ack").await;
    v.recv_type("lease_state").await;
    // Heartbeats keep it alive past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        a.send(lease("lease_heartbeat", false)).await;
        assert_eq!(a.recv_type("ack").await["payload"]["status"], "ok");
    }
    // ...silence ends it.
    let expired = v.recv_type("lease_state").await;
    assert_eq!(expired["payload"]["reason"], "expired");
    assert!(expired["payload"].get("holder").is_none());

    a.send(lease("lease_acquire", false)).await;
    a.recv_type("ack").await;
    v.recv_type("lease_state").await;
    drop(a);
    let gone = v.recv_type("lease_state").await;
    assert_eq!(gone["payload"]["reason"], "disconnected");
    r.stop().await;
}
