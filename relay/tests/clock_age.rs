//! The relay estimates each device's clock offset and reports frame ages in relay time.

mod common;
use common::*;
use relay::store::OperatorRole;
use serde_json::json;

#[tokio::test]
async fn age_is_corrected_by_the_device_clock_offset() {
    let r = start_relay_with(|c| c.ping_interval = 0.5).await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    // This device's clock is 5 s ahead of the relay's.
    dev.clock_offset_ms = 5_000.0;
    let mut p = r.operator(&key).await;
    subscribe(&mut p, "boat-1").await;

    // Answer a few clock-sync requests (the relay sends them right after auth).
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut answered = 0;
    while answered < 3 {
        assert!(tokio::time::Instant::now() < deadline, "relay sent no time_sync");
        dev.auto_time_sync = false;
        let m = dev.recv().await;
        if m["type"] == "time_sync" {
            let t2 = now_ms() + dev.clock_offset_ms;
            dev.send(json!({"type":"time_sync_response","payload":{"t1":m["payload"]["t1"],"t2":t2,"t3":t2}})).await;
            answered += 1;
        }
    }
    dev.auto_time_sync = true;
    // Let the relay process the last response.
    dev.send(json!({"type":"ping","payload":{}})).await;
    dev.recv_type("pong").await;

    // A sample taken 200 ms ago by the device's (skewed) clock.
    let sampled = now_ms() + 5_000.0 - 200.0;
    dev.telemetry(1, sampled.floor(), json!({})).await;
    let f = p.recv_type("telemetry").await;
    let rel = &f["payload"]["relay"];
    let offset = rel["clockOffsetMs"].as_f64().expect("offset present after sync");
    let age = rel["ageMs"].as_f64().expect("age present after sync");
    let unc = rel["clockUncertaintyMs"].as_f64().unwrap();
    assert!((offset - 5_000.0).abs() < 250.0, "offset {offset}");
    // Without correction the age would read about -4800 ms.
    assert!(age > 100.0 && age < 1_500.0, "age {age} (uncertainty {unc})");
    r.stop().await;
}

#[tokio::test]
async fn before_any_sync_age_is_absent_not_guessed() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    dev.auto_time_sync = false;
    let mut p = r.operator(&key).await;
    subscribe(&mut p, "boat-1").await;
    dev.telemetry(1, now_ms(), json!({})).await;
    let f = p.recv_type("telemetry").await;
    assert!(f["payload"]["relay"].get("ageMs").is_none());
    assert!(f["payload"]["relay"].get("clockOffsetMs").is_none());
    r.stop().await;
}

#[tokio::test]
async fn a_forged_time_sync_response_is_refused() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let mut dev = r.device("boat-1", &secret).await;
    dev.send(json!({"type":"time_sync_response","correlationID":"x","payload":{"t1":1.0,"t2":2.0,"t3":3.0}})).await;
    let e = dev.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "invalid_payload");
    assert_eq!(e["correlationID"], "x");
    r.stop().await;
}
