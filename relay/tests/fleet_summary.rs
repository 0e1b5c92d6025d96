//! `GET /api/devices` summarises each device for the console's fleet view: the battery from
//! its telemetry, its link to the relay (clock-sync round trip, silence, quality) while it is
//! online, and its active alerts (safety stop until a pilot takes the lease again, failing
//! processes, low battery, telemetry gaps).

mod common;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// The device `id` as `GET /api/devices` lists it to the admin.
async fn listed(r: &TestRelay, id: &str) -> Value {
    let (status, body) = r.get_json("/api/devices", Some(&r.admin_key)).await;
    assert_eq!(status, 200, "{body}");
    body["devices"].as_array().unwrap().iter().find(|d| d["id"] == id).cloned().unwrap_or_else(|| panic!("{body}"))
}

/// Polls the listing of `id` until `done` holds; panics with the last listing at the deadline.
async fn listed_until(r: &TestRelay, id: &str, dev: Option<&mut Client>, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut dev = dev;
    loop {
        // A device answers the relay's time_sync while it reads; a ping round trip makes it read.
        if let Some(d) = dev.as_deref_mut() {
            d.send(json!({"type":"ping"})).await;
            d.recv_type("pong").await;
        }
        let v = listed(r, id).await;
        if done(&v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not met in time: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn codes(device: &Value) -> Vec<String> {
    device["alerts"].as_array().unwrap().iter().map(|a| a["code"].as_str().unwrap().to_owned()).collect()
}

fn alert<'a>(device: &'a Value, code: &str) -> &'a Value {
    device["alerts"].as_array().unwrap().iter().find(|a| a["code"] == code).unwrap_or_else(|| panic!("{device}"))
}

#[tokio::test]
async fn battery_and_alerts_appear_and_the_safety_stop_clears_with_a_new_lease() {
    let r = start_relay().await;
    r.create_device("boat-2", "default");
    let (mut dev, mut ana) = r.boat_and_pilot().await;
    let before = now_ms();

    let quiet = listed(&r, "boat-1").await;
    assert_eq!((&quiet["battery"], &quiet["alerts"]), (&Value::Null, &json!([])), "{quiet}");

    dev.telemetry(0, now_ms(), json!({"battery":{"percent":15,"voltage":11.2}})).await;
    // Frame 4 after frame 0: three frames lost on this stream.
    dev.telemetry(4, now_ms(), json!({"speed":1.5})).await;
    dev.send(json!({"type":"safety_stop","payload":{"policy":"hold","reason":"controller_silent","timestamp":now_ms(),"controller":"ana"}})).await;
    dev.send(json!({"type":"process_state","payload":{"processes":[
        {"name":"ros","state":"running","pid":42,"since":1.0},
        {"name":"camera","state":"restarting","restarts":4,"lastExit":"signal 9","restartAt":2.0,"since":1.0}]}}))
        .await;
    // The relay handles a device's messages in order: once the pong is back, all are recorded.
    dev.send(json!({"type":"ping"})).await;
    dev.recv_type("pong").await;

    let d = listed(&r, "boat-1").await;
    assert_eq!(d["battery"], 15.0, "{d}");
    assert_eq!(codes(&d), ["safety_stop", "process_failed", "battery_low", "telemetry_gaps"], "{d}");
    let stop = alert(&d, "safety_stop");
    let msg = stop["message"].as_str().unwrap();
    assert!(msg.starts_with("safety stop (hold): controller_silent at ") && msg.contains("UTC"), "{msg}");
    let since = stop["since"].as_f64().unwrap();
    assert!(since >= before - 1.0 && since <= now_ms() + 1.0, "since is when the relay got it: {stop}");
    assert_eq!(alert(&d, "process_failed")["message"], "process camera restarting (signal 9, 4 restarts)");
    assert_eq!(alert(&d, "battery_low")["message"], "battery low: 15 %");
    assert!(alert(&d, "telemetry_gaps")["message"].as_str().unwrap().starts_with("3 telemetry frames missing"));
    for a in d["alerts"].as_array().unwrap() {
        assert!(a["since"].as_i64().unwrap() > 1_700_000_000_000, "ms since the epoch: {a}");
    }
    // The other device has none of it.
    let other = listed(&r, "boat-2").await;
    assert_eq!((&other["battery"], &other["alerts"], &other["link"]), (&Value::Null, &json!([]), &Value::Null));

    // A pilot takes the lease: the robot's stop is cleared, the rest stays.
    ana.send(json!({"type":"lease_acquire","correlationID":"l1","payload":{"deviceID":"boat-1"}})).await;
    let ack = ana.recv_type("ack").await;
    assert_eq!(ack["payload"]["data"]["lease"], "acquired", "{ack}");
    let d = listed(&r, "boat-1").await;
    assert_eq!(codes(&d), ["process_failed", "battery_low", "telemetry_gaps"], "{d}");

    // Recovery clears the rest. The battery is the last value read, whatever the path; a
    // connection reads it from at most one frame a second, so keep the frames coming.
    dev.send(json!({"type":"process_state","payload":{"processes":[{"name":"camera","state":"running","since":3.0}]}}))
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seq = 5;
    let d = loop {
        dev.telemetry(seq, now_ms(), json!({"battery_percent":80})).await;
        seq += 1;
        dev.send(json!({"type":"ping"})).await;
        dev.recv_type("pong").await;
        let d = listed(&r, "boat-1").await;
        if d["battery"] == 80.0 {
            break d;
        }
        assert!(tokio::time::Instant::now() < deadline, "battery not updated: {d}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(codes(&d), ["telemetry_gaps"], "a gap stays listed for 60 s: {d}");
    r.stop().await;
}

#[tokio::test]
async fn link_has_the_clock_sync_round_trip_while_online_and_is_null_offline() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let mut dev = r.device("boat-1", &secret).await;

    let d = listed_until(&r, "boat-1", Some(&mut dev), |d| d["link"]["rttMs"].is_number()).await;
    let link = &d["link"];
    let rtt = link["rttMs"].as_f64().unwrap();
    assert!((0.0..1000.0).contains(&rtt), "{link}");
    assert!(link["lastMessageMs"].as_u64().unwrap() < 5_000, "{link}");
    assert!(["good", "fair", "poor"].contains(&link["quality"].as_str().unwrap()), "{link}");
    assert_eq!(link["quality"], "good", "loopback, just heard from: {link}");

    dev.ws.close(None).await.unwrap();
    let d = listed_until(&r, "boat-1", None, |d| d["online"] == false).await;
    assert_eq!(d["link"], Value::Null, "{d}");
    r.stop().await;
}
