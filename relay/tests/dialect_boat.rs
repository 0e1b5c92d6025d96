//! The Boat dialect (seed 004, docs/protocol.md "Boat dialect"): `/ws/device/<id>` and
//! `/ws/client/<id>` with flat messages. Replays the exact messages printed in the seed's
//! document and checks the documented answers; then a Boat-dialect boat with native pilots.

mod common;

use common::*;
use serde_json::{Value, json};

/// The seed's telemetry message, verbatim.
const SEED_TELEMETRY: &str = r#"{
"type": "telemetry",
"subtype": "sensor_data",
"sequence": 1234,
"timestamp": 1625049600000,
"system_time": 1625049600000,
"data": {
"gps": {
"latitude": 37.7749,
"longitude": -122.4194,
"heading": 225.5,
"speed": 2.3
},
"status": "autonomous_navigation"
}
}"#;

const SEED_BOAT_OFFER: &str = r#"{
"type": "webrtc",
"subtype": "offer",
"boatId": "boat-123",
"sdp": "SDP_OFFER_DATA_HERE"
}"#;

const SEED_ICE: &str = r#"{
"type": "webrtc",
"subtype": "ice_candidate",
"boatId": "boat-123",
"candidate": "ICE_CANDIDATE_DATA_HERE"
}"#;

const SEED_SET_WAYPOINTS: &str = r#"{
"type": "command",
"command": "set_waypoints",
"boatId": "boat-123",
"data": {
"waypoints": [
{
"latitude": 37.7749,
"longitude": -122.4194
},
{
"latitude": 37.7750,
"longitude": -122.4180
},
{
"latitude": 37.7765,
"longitude": -122.4175
}
],
"mode": "autonomous"
}
}"#;

const SEED_SET_WAYPOINT: &str = r#"{
"type": "command",
"command": "set_waypoint",
"boatId": "boat-123",
"data": {
"latitude": 37.7749,
"longitude": -122.4194,
"mode": "autonomous"
}
}"#;

const SEED_ANSWER: &str = r#"{
"type": "webrtc",
"subtype": "answer",
"boatId": "boat-123",
"sdp": "SDP_ANSWER_DATA_HERE"
}"#;

fn seed(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

/// A Boat-dialect connection: flat messages, so the native helper's time_sync answer is off.
async fn boat_conn(r: &TestRelay, path: &str, bearer: Option<&str>) -> Client {
    let mut c = Client::connect(&r.ws_url(path), bearer).await;
    c.auto_time_sync = false;
    c
}

/// The next flat message of type `ty`, skipping others (time_sync included).
async fn next(c: &mut Client, ty: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let v = c.try_recv(left).await.unwrap_or_else(|| panic!("no flat {ty:?} message within {WAIT:?}"));
        if v["type"] == ty {
            return v;
        }
    }
}

/// Boat `boat-123` on `/ws/device/boat-123` (auth_ok checked) and a client on
/// `/ws/client/client-1?boatId=boat-123` with the API key of pilot `ana` (control access).
async fn boat_and_client(r: &TestRelay) -> (Client, Client, String) {
    let secret = r.create_device("boat-123", "default");
    let key = r.create_pilot("ana", Some("control"));
    let mut boat = boat_conn(r, "/ws/device/boat-123", Some(&secret)).await;
    let ok = boat.recv().await;
    assert_eq!(
        (ok["type"].as_str(), ok["clientID"].as_str(), ok["role"].as_str()),
        (Some("auth_ok"), Some("boat-123"), Some("device")),
        "{ok}"
    );
    let mut client = boat_conn(r, "/ws/client/client-1?boatId=boat-123", Some(&key)).await;
    let ok = client.recv().await;
    assert_eq!((ok["type"].as_str(), ok["clientID"].as_str()), (Some("auth_ok"), Some("op-ana")), "{ok}");
    let sub = next(&mut client, "subscribed").await;
    assert_eq!((sub["deviceID"].as_str(), sub["online"].as_bool()), (Some("boat-123"), Some(true)), "{sub}");
    (boat, client, key)
}

#[tokio::test]
async fn seed_messages_flow_between_the_boat_and_its_client() {
    let r = start_relay().await;
    let (mut boat, mut client, _) = boat_and_client(&r).await;

    // Telemetry: relayed flat with its fields, the boat named, and the relay's annotation.
    boat.send_text(SEED_TELEMETRY).await;
    let t = next(&mut client, "telemetry").await;
    let sent = seed(SEED_TELEMETRY);
    for k in ["subtype", "sequence", "timestamp", "system_time", "data"] {
        assert_eq!(t[k], sent[k], "{k} in {t}");
    }
    assert_eq!(t["boatId"], "boat-123");
    assert_eq!(t["relay"]["verdict"], "ok");
    assert!(t.get("payload").is_none(), "flat: {t}");

    // The boat's offer and candidate reach the client flat; the answer and the client's
    // candidate reach the boat flat.
    boat.send_text(SEED_BOAT_OFFER).await;
    let o = next(&mut client, "webrtc").await;
    assert_eq!(
        (o["subtype"].as_str(), o["boatId"].as_str(), o["sdp"].as_str()),
        (Some("offer"), Some("boat-123"), Some("SDP_OFFER_DATA_HERE")),
        "{o}"
    );
    boat.send_text(SEED_ICE).await;
    let i = next(&mut client, "webrtc").await;
    assert_eq!(
        (i["subtype"].as_str(), i["candidate"].as_str(), i["boatId"].as_str()),
        (Some("ice_candidate"), Some("ICE_CANDIDATE_DATA_HERE"), Some("boat-123")),
        "{i}"
    );
    client.send_text(SEED_ANSWER).await;
    let a = next(&mut boat, "webrtc").await;
    assert_eq!(
        (a["subtype"].as_str(), a["boatId"].as_str(), a["sdp"].as_str(), a["from"].as_str()),
        (Some("answer"), Some("boat-123"), Some("SDP_ANSWER_DATA_HERE"), Some("op-ana")),
        "{a}"
    );
    client.send_text(SEED_ICE).await;
    let i = next(&mut boat, "webrtc").await;
    assert_eq!(
        (i["subtype"].as_str(), i["candidate"].as_str()),
        (Some("ice_candidate"), Some("ICE_CANDIDATE_DATA_HERE")),
        "{i}"
    );

    // Commands: set_waypoints and set_waypoint arrive as sent; the client hears `delivered`.
    client.send_text(SEED_SET_WAYPOINTS).await;
    let c = next(&mut boat, "command").await;
    let sent = seed(SEED_SET_WAYPOINTS);
    assert_eq!(
        (c["command"].as_str(), c["boatId"].as_str(), c["from"].as_str()),
        (Some("set_waypoints"), Some("boat-123"), Some("op-ana")),
        "{c}"
    );
    assert_eq!(c["data"], sent["data"]);
    assert_eq!(next(&mut client, "ack").await["status"], "delivered");
    client.send_text(SEED_SET_WAYPOINT).await;
    let c = next(&mut boat, "command").await;
    assert_eq!(c["command"], "set_waypoint");
    assert_eq!(c["data"], seed(SEED_SET_WAYPOINT)["data"]);
    assert_eq!(next(&mut client, "ack").await["status"], "delivered");
    r.stop().await;
}

#[tokio::test]
async fn a_client_on_the_boats_path_id_and_a_ticket() {
    let r = start_relay().await;
    let secret = r.create_device("boat-123", "default");
    let key = r.create_pilot("ana", Some("view"));
    let mut boat = boat_conn(&r, "/ws/device/boat-123", Some(&secret)).await;
    assert_eq!(boat.recv().await["type"], "auth_ok");
    // A browser: a ticket in the query; the path names the boat, so it is subscribed to it.
    let t = r.ticket(&key).await;
    let mut client = boat_conn(&r, &format!("/ws/client/boat-123?ticket={t}"), None).await;
    assert_eq!(client.recv().await["type"], "auth_ok");
    // The implicit subscription is the adapter's own: its `subscribed` is not shown, its
    // lease_state is (flat).
    let l = next(&mut client, "lease_state").await;
    assert_eq!(l["deviceID"], "boat-123");
    boat.send_text(SEED_TELEMETRY).await;
    assert_eq!(next(&mut client, "telemetry").await["sequence"], 1234);
    // View access only: a command is refused in the flat error shape, the boat sees nothing.
    client.send_text(SEED_SET_WAYPOINT).await;
    let e = next(&mut client, "error").await;
    assert_eq!(e["code"], "forbidden", "{e}");
    assert!(e["message"].as_str().unwrap().contains("control"), "{e}");
    // The ticket worked once.
    let mut again = boat_conn(&r, &format!("/ws/client/boat-123?ticket={t}"), None).await;
    assert_eq!(next(&mut again, "error").await["code"], "invalid_ticket");
    r.stop().await;
}

#[tokio::test]
async fn bad_credentials_are_refused_flat() {
    let r = start_relay().await;
    let secret = r.create_device("boat-123", "default");
    let _ = r.create_pilot("ana", Some("control"));
    for (path, bearer, code) in [
        ("/ws/device/boat-123", Some("0".repeat(64)), "auth_failed"),
        ("/ws/device/boat-123", None, "auth_failed"),
        ("/ws/device/boat-999", Some(secret.clone()), "auth_failed"),
        ("/ws/client/client-1", Some("tk_nope_nope".to_owned()), "auth_failed"),
        ("/ws/client/client-1", None, "invalid_ticket"),
        ("/ws/client/client-1?ticket=nope", None, "invalid_ticket"),
    ] {
        let mut c = boat_conn(&r, path, bearer.as_deref()).await;
        let e = c.recv().await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some(code)), "{path}: {e}");
        assert!(e["message"].is_string());
        let close = c.expect_close().await.expect("close frame");
        assert_eq!(u16::from(close.code), 1008, "{path}");
    }
    r.stop().await;
}

#[tokio::test]
async fn the_control_lease_applies_to_boat_clients() {
    let r = start_relay().await;
    let (mut boat, mut client, _) = boat_and_client(&r).await;
    // A native pilot holds the lease: the Boat client's command is refused, flat.
    let bob = r.create_pilot("bob", Some("control"));
    let mut native = r.operator(&bob).await;
    native.send(json!({"type":"lease_acquire","correlationID":"l1","payload":{"deviceID":"boat-123"}})).await;
    assert_eq!(native.recv_type("ack").await["payload"]["data"]["lease"], "acquired");
    client.send_text(SEED_SET_WAYPOINTS).await;
    let e = next(&mut client, "error").await;
    assert_eq!(e["code"], "not_controller", "{e}");
    assert!(e["message"].as_str().unwrap().contains("bob"), "{e}");
    native.send(json!({"type":"lease_release","correlationID":"l2","payload":{"deviceID":"boat-123"}})).await;
    assert_eq!(native.recv_type("ack").await["payload"]["data"]["lease"], "released");
    // Free again: the client's command takes the lease, and the native pilot now cannot command.
    client.send_text(SEED_SET_WAYPOINTS).await;
    assert_eq!(next(&mut boat, "command").await["command"], "set_waypoints");
    native
        .send(json!({"type":"app_command","correlationID":"w1","clientID":"boat-123","payload":{"command":"stop"}}))
        .await;
    assert_eq!(native.recv_type("error").await["payload"]["code"], "not_controller");
    // A command without boatId cannot be routed: refused, flat.
    client.send(json!({"type":"command","command":"set_waypoint","data":{}})).await;
    assert_eq!(next(&mut client, "error").await["code"], "invalid_payload");
    r.stop().await;
}

/// Cross-dialect: a Boat-dialect boat's telemetry reaches a native pilot annotated (sequence
/// verdicts; frame ages once the boat answers the relay's flat time_sync).
#[tokio::test]
async fn boat_telemetry_reaches_a_native_pilot_with_verdicts_and_age() {
    let r = start_relay().await;
    let secret = r.create_device("boat-123", "default");
    let key = r.create_pilot("ana", Some("view"));
    let mut boat = boat_conn(&r, "/ws/device/boat-123", Some(&secret)).await;
    assert_eq!(boat.recv().await["type"], "auth_ok");
    // The relay's time_sync reaches the boat flat; a boat that answers flat gets ages.
    let ts = next(&mut boat, "time_sync").await;
    let t1 = ts["t1"].as_f64().expect("flat t1");
    let skew = 5_000.0;
    let t2 = now_ms() + skew;
    boat.send(json!({"type":"time_sync_response","t1":t1,"t2":t2,"t3":t2})).await;
    let mut pilot = r.operator(&key).await;
    subscribe(&mut pilot, "boat-123").await;

    let mut frame = seed(SEED_TELEMETRY);
    let mut send = |seq: u64| {
        frame["sequence"] = json!(seq);
        frame["timestamp"] = json!(now_ms() + skew - 100.0);
        frame["system_time"] = frame["timestamp"].clone();
        frame.to_string()
    };
    let mut expect = Vec::new();
    for (seq, verdict) in [(1234, "ok"), (1235, "ok"), (1238, "gap"), (1238, "duplicate")] {
        let text = send(seq);
        boat.send_text(&text).await;
        expect.push((seq, verdict));
    }
    for (seq, verdict) in expect {
        let t = pilot.recv_type("telemetry").await;
        assert_eq!(t["from"], "boat-123");
        let p = &t["payload"];
        assert_eq!((p["sequence"].as_u64(), p["relay"]["verdict"].as_str()), (Some(seq), Some(verdict)), "{t}");
        assert_eq!(p["subtype"], "sensor_data");
        assert_eq!(p["data"]["gps"]["heading"], 225.5);
        if verdict == "gap" {
            assert_eq!(p["relay"]["missing"], 2);
        }
        // The 5 s skew is taken out: the age is about the 100 ms the sample was old.
        let age = p["relay"]["ageMs"].as_f64().unwrap_or_else(|| panic!("ageMs in {t}"));
        assert!((50.0..2_000.0).contains(&age), "age {age} in {t}");
        assert!((p["relay"]["clockOffsetMs"].as_f64().unwrap() - skew).abs() < 1_000.0, "{t}");
    }
    r.stop().await;
}

/// Cross-dialect: video signaling between a Boat-dialect boat and a native pilot, both ways of
/// opening it.
#[tokio::test]
async fn boat_video_signaling_reaches_a_native_pilot() {
    let r = start_relay().await;
    let secret = r.create_device("boat-123", "default");
    let key = r.create_pilot("ana", Some("view"));
    let mut boat = boat_conn(&r, "/ws/device/boat-123", Some(&secret)).await;
    assert_eq!(boat.recv().await["type"], "auth_ok");
    let mut pilot = r.operator(&key).await;
    subscribe(&mut pilot, "boat-123").await;

    // The native pilot offers: the boat gets it flat with boatId; its seed-shaped answer and
    // candidate (no sessionID) come back native, in the pilot's session.
    pilot
        .send(json!({"type":"webrtc","correlationID":"s1","clientID":"boat-123","payload":{"subtype":"offer","sessionID":"s1","sdp":"v=0 pilot offer","mode":"p2p"}}))
        .await;
    let o = next(&mut boat, "webrtc").await;
    assert_eq!(
        (o["subtype"].as_str(), o["boatId"].as_str(), o["sdp"].as_str(), o["from"].as_str()),
        (Some("offer"), Some("boat-123"), Some("v=0 pilot offer"), Some("op-ana")),
        "{o}"
    );
    assert!(o.get("payload").is_none(), "flat: {o}");
    boat.send_text(SEED_ANSWER).await;
    let a = pilot.recv_signal().await;
    assert_eq!(a["from"], "boat-123");
    assert_eq!(a["payload"]["subtype"], "answer");
    assert_eq!(a["payload"]["sessionID"], "s1");
    assert_eq!(a["payload"]["sdp"], "SDP_ANSWER_DATA_HERE");
    boat.send_text(SEED_ICE).await;
    let i = pilot.recv_signal().await;
    assert_eq!(
        (i["payload"]["subtype"].as_str(), i["payload"]["sessionID"].as_str()),
        (Some("ice_candidate"), Some("s1")),
        "{i}"
    );
    pilot
        .send(json!({"type":"webrtc","clientID":"boat-123","payload":{"subtype":"ice_candidate","sessionID":"s1","candidate":"candidate:1"}}))
        .await;
    assert_eq!(next(&mut boat, "webrtc").await["candidate"], "candidate:1");
    pilot.send(json!({"type":"webrtc","clientID":"boat-123","payload":{"subtype":"bye","sessionID":"s1"}})).await;
    assert_eq!(next(&mut boat, "webrtc").await["subtype"], "bye");

    // The seed's flow: the boat offers; the subscribed native pilot gets a native offer in a
    // session the relay opened for it, and answers in it.
    boat.send_text(SEED_BOAT_OFFER).await;
    let o = pilot.recv_signal().await;
    assert_eq!(
        (o["from"].as_str(), o["payload"]["subtype"].as_str(), o["payload"]["sdp"].as_str()),
        (Some("boat-123"), Some("offer"), Some("SDP_OFFER_DATA_HERE")),
        "{o}"
    );
    let session = o["payload"]["sessionID"].as_str().unwrap().to_owned();
    pilot
        .send(json!({"type":"webrtc","clientID":"boat-123","payload":{"subtype":"answer","sessionID":session,"sdp":"v=0 pilot answer"}}))
        .await;
    let a = next(&mut boat, "webrtc").await;
    assert_eq!(
        (a["subtype"].as_str(), a["sdp"].as_str(), a["boatId"].as_str()),
        (Some("answer"), Some("v=0 pilot answer"), Some("boat-123")),
        "{a}"
    );
    boat.send_text(SEED_ICE).await;
    assert_eq!(pilot.recv_signal().await["payload"]["sessionID"], session.as_str());

    // Nobody watching: the boat's offer is refused flat, not dropped. (The pilot's departure
    // ends its session first: the boat hears bye.)
    drop(pilot);
    let bye = next(&mut boat, "webrtc").await;
    assert_eq!((bye["subtype"].as_str(), bye["reason"].as_str()), (Some("bye"), Some("pilot_left")), "{bye}");
    boat.send_text(SEED_BOAT_OFFER).await;
    assert_eq!(next(&mut boat, "error").await["code"], "target_offline");
    r.stop().await;
}

/// Presence, rate limits, revocation and audit are the native ones.
#[tokio::test]
async fn presence_rate_limits_revocation_and_audit_like_native() {
    let r = start_relay_with(|c| c.messages_per_second = 5).await;
    let secret = r.create_device("boat-123", "default");
    let key = r.create_pilot("ana", Some("control"));
    let mut pilot = r.operator(&r.create_pilot("bob", Some("view"))).await;
    subscribe(&mut pilot, "boat-123").await;

    // The boat on /ws/device/ is online for a native subscriber.
    let mut boat = boat_conn(&r, "/ws/device/boat-123", Some(&secret)).await;
    assert_eq!(boat.recv().await["type"], "auth_ok");
    let p = pilot.recv_type("presence").await;
    assert_eq!(
        (p["payload"]["deviceID"].as_str(), p["payload"]["status"].as_str()),
        (Some("boat-123"), Some("online")),
        "{p}"
    );
    let mut client = boat_conn(&r, "/ws/client/client-1?boatId=boat-123", Some(&key)).await;
    assert_eq!(client.recv().await["type"], "auth_ok");

    // A client command takes the lease: audited as native.
    client.send_text(SEED_SET_WAYPOINT).await;
    assert_eq!(next(&mut boat, "command").await["command"], "set_waypoint");

    // A flooding boat is refused with rate_limited, flat.
    for _ in 0..40 {
        boat.send_text(SEED_TELEMETRY).await;
    }
    let e = next(&mut boat, "error").await;
    assert_eq!(e["code"], "rate_limited", "{e}");
    assert!(e["retryAfterMs"].as_u64().is_some(), "{e}");

    // Revoking the client's key closes it; revoking the boat closes it and its secret fails.
    let key_id = key.split('_').nth(1).unwrap().to_owned();
    let (s, _) = admin_call(&r, reqwest::Method::POST, &format!("/api/keys/{key_id}/revoke"), None).await;
    assert_eq!(s, 200);
    assert_eq!(next(&mut client, "error").await["code"], "revoked");
    assert_eq!(client.expect_close().await.map(|f| u16::from(f.code)), Some(1008));
    let (s, _) = admin_call(&r, reqwest::Method::POST, "/api/devices/boat-123/revoke", Some(json!({}))).await;
    assert_eq!(s, 200);
    assert_eq!(next(&mut boat, "error").await["code"], "revoked");
    assert_eq!(boat.expect_close().await.map(|f| u16::from(f.code)), Some(1008));
    let p = pilot.recv_type("presence").await;
    assert_eq!(p["payload"]["status"], "offline", "{p}");
    let mut again = boat_conn(&r, "/ws/device/boat-123", Some(&secret)).await;
    assert_eq!(next(&mut again, "error").await["code"], "auth_failed");

    let (_, audit) = admin_call(&r, reqwest::Method::GET, "/api/audit", None).await;
    let actions: Vec<&str> = audit["entries"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    for a in ["lease.acquired", "key.revoke", "device.revoke"] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }
    r.stop().await;
}

/// The seed's client URL names no boat: the client watches every boat it may view.
#[tokio::test]
async fn a_client_naming_no_boat_watches_the_boats_it_may_view() {
    let r = start_relay().await;
    let s1 = r.create_device("boat-123", "default");
    let s2 = r.create_device("boat-456", "default");
    let key = r.create_pilot("ana", None);
    r.grant("ana", "device:boat-123", "view").await;
    let mut b1 = boat_conn(&r, "/ws/device/boat-123", Some(&s1)).await;
    assert_eq!(b1.recv().await["type"], "auth_ok");
    let mut b2 = boat_conn(&r, "/ws/device/boat-456", Some(&s2)).await;
    assert_eq!(b2.recv().await["type"], "auth_ok");
    let mut client = boat_conn(&r, "/ws/client/client-1", Some(&key)).await;
    assert_eq!(client.recv().await["type"], "auth_ok");
    // Subscribed (to boat-123 only) once its lease_state arrives.
    assert_eq!(next(&mut client, "lease_state").await["deviceID"], "boat-123");
    // boat-456's frame goes first; the first one the client sees is boat-123's.
    b2.send_text(SEED_TELEMETRY).await;
    b1.send_text(SEED_TELEMETRY).await;
    let t = next(&mut client, "telemetry").await;
    assert_eq!((t["boatId"].as_str(), t["sequence"].as_u64()), (Some("boat-123"), Some(1234)), "{t}");
    r.stop().await;
}
