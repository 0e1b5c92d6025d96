//! WebRTC signaling sessions: an offer opens a session between one pilot connection and one
//! device; everything else in it is routed between exactly those two; when either side goes,
//! the other hears `bye` with the reason.

mod common;

use common::*;
use relay::store::OperatorRole;
use serde_json::json;

fn offer(session: &str) -> serde_json::Value {
    json!({"type":"webrtc","clientID":"boat-1","payload":{"subtype":"offer","sessionID":session,"sdp":"v=0 offer","mode":"p2p"}})
}

#[tokio::test]
async fn sessions_route_between_one_pilot_connection_and_the_device() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    let mut tab1 = r.operator(&key).await;
    let mut tab2 = r.operator(&key).await;

    tab1.send(offer("s1")).await;
    let o = dev.recv_type("webrtc").await;
    assert_eq!((o["from"].as_str(), o["payload"]["sessionID"].as_str()), (Some("op-ana"), Some("s1")));
    // The answer goes to the tab that offered, not to the same pilot's other tab.
    dev.send(
        json!({"type":"webrtc","clientID":"op-ana","payload":{"subtype":"answer","sessionID":"s1","sdp":"v=0 a"}}),
    )
    .await;
    let a = tab1.recv_signal().await;
    assert_eq!(a["payload"]["subtype"], "answer");
    assert_eq!(a["from"], "boat-1");
    assert!(tab2.try_recv(std::time::Duration::from_millis(300)).await.is_none());
    // Trickled candidates both ways.
    tab1.send(json!({"type":"webrtc","clientID":"boat-1","payload":{"subtype":"ice_candidate","sessionID":"s1","candidate":"candidate:1 1 udp 1 10.0.0.1 5000 typ host","sdpMid":"0","sdpMLineIndex":0}})).await;
    assert_eq!(dev.recv_type("webrtc").await["payload"]["sdpMid"], "0");
    dev.send(json!({"type":"webrtc","payload":{"subtype":"ice_candidate","sessionID":"s1","candidate":"candidate:2 1 udp 1 10.0.0.2 5001 typ host"}})).await;
    assert_eq!(tab1.recv_signal().await["payload"]["subtype"], "ice_candidate");

    // Someone else's session id, a candidate before any offer, a message without sessionID.
    tab2.send(offer("s1")).await;
    let e = tab2.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "invalid_payload");
    assert!(e["payload"]["message"].as_str().unwrap().contains("in use"), "{e}");
    tab2.send(json!({"type":"webrtc","clientID":"boat-1","payload":{"subtype":"ice_candidate","sessionID":"s9","candidate":""}})).await;
    assert!(tab2.recv_type("error").await["payload"]["message"].as_str().unwrap().contains("offer first"));
    tab2.send(json!({"type":"webrtc","clientID":"boat-1","payload":{"subtype":"offer","sdp":"v=0"}})).await;
    assert!(tab2.recv_type("error").await["payload"]["message"].as_str().unwrap().contains("sessionID"));
    dev.send(json!({"type":"webrtc","payload":{"subtype":"answer","sessionID":"nope","sdp":"x"}})).await;
    assert_eq!(dev.recv_type("error").await["payload"]["code"], "invalid_payload");

    // The offering tab closes: the device is told the pilot left.
    drop(tab1);
    let bye = dev.recv_type("webrtc").await;
    assert_eq!(bye["payload"], json!({"subtype":"bye","sessionID":"s1","reason":"pilot_left"}));
    assert_eq!(bye["from"], "op-ana");
    // The session is gone: the device's late candidate is refused.
    dev.send(json!({"type":"webrtc","payload":{"subtype":"ice_candidate","sessionID":"s1","candidate":""}})).await;
    assert_eq!(dev.recv_type("error").await["payload"]["code"], "invalid_payload");
    r.stop().await;
}

#[tokio::test]
async fn the_pilot_hears_why_a_session_ended() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    let mut p = r.operator(&key).await;
    p.send(offer("s1")).await;
    dev.recv_type("webrtc").await;
    // The device ends it.
    dev.send(json!({"type":"webrtc","payload":{"subtype":"bye","sessionID":"s1","reason":"video_disabled"}})).await;
    assert_eq!(p.recv_signal().await["payload"]["reason"], "video_disabled");
    assert_eq!(r.running().relay.media.len(), 0);
    // The device goes offline mid-session.
    p.send(offer("s2")).await;
    dev.recv_type("webrtc").await;
    drop(dev);
    let bye = p.recv_signal().await;
    assert_eq!(bye["payload"], json!({"subtype":"bye","sessionID":"s2","reason":"device_offline"}));
    assert_eq!(bye["from"], "boat-1");
    // And an offer to an offline device is refused without opening anything.
    p.send(offer("s3")).await;
    assert_eq!(p.recv_type("error").await["payload"]["code"], "target_offline");
    assert_eq!(r.running().relay.media.len(), 0);
    r.stop().await;
}
