//! Bad input gets a stable error code and a sentence; connections that must end are closed
//! with the proper code; nobody else is disturbed.

mod common;
use common::*;
use futures_util::SinkExt;
use relay::store::OperatorRole;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

async fn error_code(c: &mut Client) -> String {
    let e = c.recv_type("error").await;
    assert!(!e["payload"]["message"].as_str().unwrap().is_empty());
    e["payload"]["code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn recoverable_bad_input_gets_errors_and_the_connection_lives_on() {
    let r = start_relay().await;
    let (mut dev, mut pilot) = r.boat_and_pilot().await;

    dev.send_text("{this is not json").await;
    assert_eq!(error_code(&mut dev).await, "malformed_json");
    dev.send(json!({"type":"launch_missiles","correlationID":"c9","payload":{}})).await;
    let e = dev.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "unknown_type");
    assert_eq!(e["correlationID"], "c9", "errors answer the request's correlationID");
    dev.send(json!({"payload":{}})).await;
    assert_eq!(error_code(&mut dev).await, "unknown_type");
    dev.send(json!({"type":"telemetry","payload":{"sequence":"one","timestamp":1}})).await;
    assert_eq!(error_code(&mut dev).await, "invalid_payload");
    dev.send(json!({"type":"telemetry","payload":{"sequence":1,"timestamp":1,"relay":{"verdict":"ok"}}})).await;
    assert_eq!(error_code(&mut dev).await, "invalid_payload");
    dev.ws.send(Message::Binary(vec![1u8, 2, 3].into())).await.unwrap();
    assert_eq!(error_code(&mut dev).await, "binary_not_supported");
    dev.send(json!({"type":"subscribe","payload":{"deviceID":"boat-1"}})).await;
    assert_eq!(error_code(&mut dev).await, "not_allowed");
    pilot.send(json!({"type":"telemetry","payload":{"sequence":1,"timestamp":1}})).await;
    assert_eq!(error_code(&mut pilot).await, "not_allowed");
    pilot.send(json!({"type":"execute_command","payload":{"command":"ls"}})).await;
    assert_eq!(error_code(&mut pilot).await, "invalid_payload", "a request without a target");

    // Both connections still work.
    dev.telemetry(1, now_ms(), json!({"ok":true})).await;
    let f = pilot.recv_type("telemetry").await;
    assert_eq!(f["payload"]["data"]["ok"], true);
    let metrics = reqwest::get(r.http("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tether_errors_total{code=\"malformed_json\"} 1"), "{metrics}");
    r.stop().await;
}

#[tokio::test]
async fn oversize_frame_closes_with_1009_and_others_continue() {
    let r = start_relay_with(|c| c.max_message_size = 64 * 1024).await;
    let secret = r.create_device("boat-1", "default");
    let secret2 = r.create_device("boat-2", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    let mut other = r.device("boat-2", &secret2).await;
    let mut pilot = r.operator(&key).await;
    subscribe(&mut pilot, "boat-2").await;

    let big = "x".repeat(100 * 1024);
    dev.telemetry(1, now_ms(), json!({ "blob": big })).await;
    let e = dev.recv().await;
    assert_eq!(e["payload"]["code"], "frame_too_large", "{e}");
    assert_eq!(u16::from(dev.expect_close().await.expect("close frame").code), 1009);

    other.telemetry(1, now_ms(), json!({"still":"here"})).await;
    assert_eq!(pilot.recv_type("telemetry").await["payload"]["data"]["still"], "here");
    r.stop().await;
}

#[tokio::test]
async fn frames_just_under_the_limit_are_accepted() {
    let r = start_relay_with(|c| c.max_message_size = 64 * 1024).await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    let mut pilot = r.operator(&key).await;
    subscribe(&mut pilot, "boat-1").await;
    let blob = "y".repeat(60 * 1024);
    dev.telemetry(1, now_ms(), json!({ "blob": blob })).await;
    let f = pilot.recv_type("telemetry").await;
    assert_eq!(f["payload"]["data"]["blob"].as_str().unwrap().len(), 60 * 1024);
    r.stop().await;
}
