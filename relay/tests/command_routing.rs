//! Requests reach the device with the relay-stamped `from`; replies find the requester by
//! correlationID.

mod common;
use common::*;
use relay::store::OperatorRole;
use serde_json::json;

#[tokio::test]
async fn execute_command_round_trip() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let other = r.create_operator("ben", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    let mut p = r.operator(&key).await;
    let mut bystander = r.operator(&other).await;

    p.send(json!({"type":"execute_command","correlationID":"cmd-1","clientID":"boat-1","from":"forged",
        "payload":{"command":"ls","args":["-l","/tmp"],"cwd":"/"}}))
        .await;
    let req = dev.recv_type("execute_command").await;
    assert_eq!(req["from"], "op-ana", "the relay stamps from; a client cannot choose it");
    assert_eq!(req["correlationID"], "cmd-1");
    assert_eq!(req["payload"]["args"], json!(["-l", "/tmp"]));
    assert_eq!(req["payload"]["cwd"], "/", "unknown payload fields pass through");

    dev.send(json!({"type":"command_output","correlationID":"cmd-1",
        "payload":{"stdout":"total 0\n","stderr":"","exitCode":0,"durationMs":3}}))
        .await;
    let out = p.recv_type("command_output").await;
    assert_eq!(out["from"], "boat-1");
    assert_eq!(out["payload"]["stdout"], "total 0\n");
    assert!(bystander.try_recv(std::time::Duration::from_millis(300)).await.is_none());

    // A reply nobody asked for is refused, not broadcast.
    dev.send(json!({"type":"command_output","correlationID":"never-sent","payload":{}})).await;
    assert_eq!(dev.recv_type("error").await["payload"]["code"], "unknown_target");
    r.stop().await;
}

#[tokio::test]
async fn webrtc_signaling_is_routed_both_ways() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    let mut p = r.operator(&key).await;
    p.send(json!({"type":"webrtc","correlationID":"s1","clientID":"boat-1","payload":{"subtype":"offer","sessionID":"s1","sdp":"v=0","mode":"p2p"}})).await;
    let offer = dev.recv_type("webrtc").await;
    assert_eq!(offer["payload"]["sdp"], "v=0");
    assert_eq!(offer["from"], "op-ana");
    dev.send(
        json!({"type":"webrtc","clientID":"op-ana","payload":{"subtype":"answer","sessionID":"s1","sdp":"v=0 answer"}}),
    )
    .await;
    let answer = p.recv_signal().await;
    assert_eq!(answer["payload"]["subtype"], "answer");
    assert_eq!(answer["from"], "boat-1");
    r.stop().await;
}

#[tokio::test]
async fn a_newer_device_connection_replaces_the_older() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let mut old = r.device("boat-1", &secret).await;
    let _new = r.device("boat-1", &secret).await;
    assert_eq!(old.recv_type("error").await["payload"]["code"], "replaced");
    assert_eq!(u16::from(old.expect_close().await.unwrap().code), 4409);
    let health: serde_json::Value = reqwest::get(r.http("/health")).await.unwrap().json().await.unwrap();
    assert_eq!(health["connections"]["device"], 1);
    r.stop().await;
}
