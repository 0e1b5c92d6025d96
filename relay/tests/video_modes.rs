//! Video modes at the signaling level (docs/protocol.md 4.13), with a device played by the test:
//! the `mode` announcement after an offer, refusals of bad modes, `--no-sfu`, the `auto`
//! fallback to the SFU on the deadline and on a `failed` report (the device's attempt ends with
//! `moved_to_sfu`, the pilot's next offer goes to the SFU, which offers to the device itself),
//! and a `connected` report keeping the session peer to peer. State reports are not forwarded.
//! Media itself is covered with real peers in device/tests/sfu.rs and sfu_netns.rs.

mod common;

use std::time::Duration;

use common::*;
use relay::store::OperatorRole;
use serde_json::{Value, json};

fn offer(session: &str, mode: Option<&str>) -> Value {
    let mut payload = json!({"subtype":"offer","sessionID":session,"sdp":"v=0 offer"});
    if let Some(m) = mode {
        payload["mode"] = json!(m);
    }
    json!({"type":"webrtc","correlationID":session,"clientID":"boat-1","payload":payload})
}

/// The smallest offer an SFU sender accepts: one receive-only H.264 video section.
const VIEWER_OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n\
    m=video 9 UDP/TLS/RTP/SAVPF 102\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\n\
    a=rtpmap:102 H264/90000\r\na=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n";

fn state(session: &str, s: &str) -> Value {
    json!({"type":"webrtc","clientID":"boat-1","payload":{"subtype":"state","sessionID":session,"state":s}})
}

/// The pilot's ack and `mode` announcement for its offer, in that order.
async fn ack_and_mode(p: &mut Client, session: &str) -> Value {
    let ack = p.recv().await;
    assert_eq!((&ack["type"], &ack["correlationID"]), (&json!("ack"), &json!(session)), "{ack}");
    let mode = p.recv().await;
    assert_eq!((&mode["type"], &mode["payload"]["subtype"]), (&json!("webrtc"), &json!("mode")), "{mode}");
    assert_eq!(mode["from"], "boat-1", "{mode}");
    assert_eq!(mode["payload"]["sessionID"], session, "{mode}");
    assert!(mode["payload"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{mode}");
    mode["payload"].clone()
}

#[tokio::test]
async fn bad_modes_are_refused_and_auto_without_an_sfu_stays_peer_to_peer() {
    let r = start_relay_with(|c| c.media.no_sfu = true).await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    let mut p = r.operator(&key).await;

    p.send(offer("m1", Some("turbo"))).await;
    let e = p.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "invalid_payload", "{e}");
    assert!(e["payload"]["message"].as_str().unwrap().contains("auto"), "{e}");
    p.send(offer("m2", Some("sfu"))).await;
    let e = p.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "unsupported", "{e}");
    assert!(e["payload"]["message"].as_str().unwrap().contains("--no-sfu"), "{e}");
    assert_eq!(r.running().relay.media.len(), 0, "refused offers open nothing");

    p.send(offer("m3", None)).await;
    assert_eq!(dev.recv_type("webrtc").await["payload"]["sessionID"], "m3");
    let mode = ack_and_mode(&mut p, "m3").await;
    assert_eq!((&mode["mode"], &mode["reason"], &mode["auto"]), (&json!("p2p"), &json!("sfu_disabled"), &json!(false)));
    r.stop().await;
}

#[tokio::test]
async fn auto_moves_to_the_sfu_when_peer_to_peer_does_not_connect_in_time() {
    let r = start_relay_with(|c| c.media.p2p_timeout = 0.5).await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    let mut p = r.operator(&key).await;

    p.send(offer("a1", Some("auto"))).await;
    let o = dev.recv_type("webrtc").await;
    assert_eq!((&o["from"], &o["payload"]["subtype"]), (&json!("op-ana"), &json!("offer")));
    let mode = ack_and_mode(&mut p, "a1").await;
    assert_eq!(
        (&mode["mode"], &mode["reason"], &mode["auto"]),
        (&json!("p2p"), &json!("auto_p2p_first"), &json!(true))
    );
    // A state other than connected or failed changes nothing, and is not forwarded.
    p.send(state("a1", "connecting")).await;

    // Nobody reports `connected`: after the deadline the device's attempt ends and the pilot
    // is told to offer again.
    let bye = dev.recv_type("webrtc").await;
    assert_eq!(bye["payload"], json!({"subtype":"bye","sessionID":"a1","reason":"moved_to_sfu"}), "{bye}");
    assert_eq!(bye["from"], "op-ana");
    let mode = p.recv_type("webrtc").await["payload"].clone();
    assert_eq!(
        (&mode["subtype"], &mode["mode"], &mode["reason"]),
        (&json!("mode"), &json!("sfu"), &json!("p2p_timeout"))
    );
    // The device's late answer for the abandoned attempt reaches no one and upsets nothing.
    dev.send(json!({"type":"webrtc","payload":{"subtype":"answer","sessionID":"a1","sdp":"v=0 late"}})).await;
    assert!(dev.try_recv(Duration::from_millis(300)).await.is_none(), "no error for a late answer");
    assert!(p.try_recv(Duration::from_millis(300)).await.is_none(), "the late answer was not forwarded");

    // The pilot's new offer on the same session goes to the SFU, which asks the device to
    // publish: an offer from `relay` on an upstream session of its own. (The SFU reads the
    // offer, so this one is real SDP: a receive-only H.264 section.)
    let mut again = offer("a1", Some("sfu"));
    again["payload"]["sdp"] = json!(VIEWER_OFFER);
    p.send(again).await;
    let ack = p.recv_type("ack").await;
    assert_eq!(ack["correlationID"], "a1");
    let up = dev.recv_type("webrtc").await;
    assert_eq!(up["from"], "relay", "{up}");
    assert_eq!(up["payload"]["subtype"], "offer", "{up}");
    let upstream = up["payload"]["sessionID"].as_str().unwrap().to_owned();
    assert!(upstream.starts_with("sfu-"), "{up}");
    assert!(up["payload"]["sdp"].as_str().unwrap().contains("H264/90000"), "{up}");
    // This device will not publish: the pilot hears why.
    dev.send(json!({"type":"webrtc","clientID":"relay","payload":{"subtype":"bye","sessionID":upstream,"reason":"video_disabled"}}))
        .await;
    let bye = p.recv_type("webrtc").await;
    assert_eq!((&bye["payload"]["subtype"], &bye["payload"]["reason"]), (&json!("bye"), &json!("sfu_failed")), "{bye}");
    assert!(bye["payload"]["message"].as_str().unwrap().contains("video_disabled"), "{bye}");
    assert_eq!(r.running().relay.media.len(), 0);
    r.stop().await;
}

#[tokio::test]
async fn a_failed_report_moves_at_once_and_a_connected_one_keeps_peer_to_peer() {
    let r = start_relay_with(|c| c.media.p2p_timeout = 1.0).await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    let mut p = r.operator(&key).await;

    // The device reports `connected`: the deadline passes and nothing moves.
    p.send(offer("c1", None)).await;
    dev.recv_type("webrtc").await;
    let mode = ack_and_mode(&mut p, "c1").await;
    assert_eq!(mode["reason"], "auto_p2p_first");
    dev.send(
        json!({"type":"webrtc","clientID":"op-ana","payload":{"subtype":"state","sessionID":"c1","state":"connected"}}),
    )
    .await;
    let heard = p.try_recv(Duration::from_millis(2000)).await;
    assert!(heard.is_none(), "the pilot heard {heard:?}");
    let heard = dev.try_recv(Duration::from_millis(100)).await;
    assert!(heard.is_none(), "the device heard {heard:?}");

    // Later the direct path fails for good: the pilot's `failed` moves the session at once.
    p.send(state("c1", "failed")).await;
    let bye = dev.recv_type("webrtc").await;
    assert_eq!(bye["payload"]["reason"], "moved_to_sfu", "{bye}");
    let mode = p.recv_type("webrtc").await["payload"].clone();
    assert_eq!((&mode["mode"], &mode["reason"]), (&json!("sfu"), &json!("p2p_failed")), "{mode}");
    // An offer the SFU cannot read ends the session with the reason, and asks nothing of the
    // device.
    p.send(offer("c1", Some("sfu"))).await;
    let bye = p.recv_signal().await;
    assert_eq!((&bye["payload"]["subtype"], &bye["payload"]["reason"]), (&json!("bye"), &json!("sfu_failed")), "{bye}");
    assert!(bye["payload"]["message"].as_str().unwrap().contains("SDP"), "{bye}");
    let heard = dev.try_recv(Duration::from_millis(300)).await;
    assert!(heard.is_none(), "the device heard {heard:?}");
    r.stop().await;
}
