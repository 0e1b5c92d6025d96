//! A device joins with nothing but a handshake key: register, an admin approves (over HTTP or
//! the admin WebSocket, seeing the request live), the device fetches its secret once.

mod common;
use common::*;
use reqwest::Method;
use serde_json::json;

async fn register(r: &TestRelay, key: &str, name: &str) -> serde_json::Value {
    let mut c = Client::connect(&r.ws_url("/ws"), None).await;
    c.send(json!({"type":"register","correlationID":"r1","payload":{"name":name,"handshakeKey":key}})).await;
    let v = c.recv().await;
    if v["type"] == "registration_pending" {
        assert_eq!(v["correlationID"], "r1");
        let close = c.expect_close().await.expect("close after pending");
        assert_eq!(u16::from(close.code), 1000);
    }
    v
}

#[tokio::test]
async fn device_onboarded_end_to_end_by_an_admin_approval() {
    let r = start_relay().await;
    let (status, hk) = admin_call(&r, Method::POST, "/api/handshake-keys", Some(json!({"label":"field kit"}))).await;
    assert_eq!(status, 201, "{hk}");
    let key = hk["key"].as_str().unwrap().to_owned();

    // An admin console is connected and sees the request arrive live.
    let mut admin = r.operator(&r.admin_key).await;
    let pending = register(&r, &key, "Client-1").await;
    assert_eq!(pending["type"], "registration_pending", "{pending}");
    let request_id = pending["payload"]["requestID"].as_str().unwrap().to_owned();
    let live = admin.recv_type("registration_requested").await;
    assert_eq!(live["payload"]["requestID"], request_id.as_str());
    assert_eq!(live["payload"]["name"], "Client-1");

    let (s, st) = call(&r, Method::GET, &format!("/ws/status/{request_id}"), None, None).await;
    assert_eq!((s, st["status"].as_str()), (200, Some("pending")));
    let (_, list) = admin_call(&r, Method::GET, "/api/registrations?status=pending", None).await;
    assert_eq!(list["registrations"][0]["requestID"], request_id.as_str());

    // Approve over the admin WebSocket.
    admin.send(json!({"type":"approve_registration","correlationID":"a1","payload":{"requestID":request_id,"deviceID":"boat-9"}})).await;
    // Every admin (this one included) hears the decision; the approver also gets its ack.
    let (mut ack, mut decided) = (None, None);
    while ack.is_none() || decided.is_none() {
        let m = admin.recv().await;
        match m["type"].as_str().unwrap() {
            "ack" => ack = Some(m),
            "registration_decided" => decided = Some(m),
            other => panic!("unexpected {other}: {m}"),
        }
    }
    let ack = ack.unwrap();
    assert_eq!(ack["correlationID"], "a1");
    assert_eq!(ack["payload"]["data"]["clientID"], "boat-9");
    assert_eq!(decided.unwrap()["payload"]["status"], "approved");

    // The secret comes once; later polls say approved without it.
    let (_, first) = call(&r, Method::GET, &format!("/ws/status/{request_id}"), None, None).await;
    assert_eq!(first["status"], "approved");
    assert_eq!(first["clientID"], "boat-9");
    let secret = first["clientSecret"].as_str().expect("secret on the first poll").to_owned();
    let (_, again) = call(&r, Method::GET, &format!("/ws/status/{request_id}"), None, None).await;
    assert_eq!(again["status"], "approved");
    assert!(again.get("clientSecret").is_none(), "the secret is shown once");

    // Only its hash is stored.
    let raw = std::fs::read(r.running().relay.store.path()).unwrap();
    let wal = std::fs::read(r.running().relay.store.path().with_extension("db-wal")).unwrap_or_default();
    for bytes in [raw, wal] {
        assert!(!String::from_utf8_lossy(&bytes).contains(&secret));
    }
    let mut dev = r.device("boat-9", &secret).await;
    dev.send(json!({"type":"ping","payload":{}})).await;
    assert_eq!(dev.recv_type("pong").await["type"], "pong");

    let (_, audit) = admin_call(&r, Method::GET, "/api/audit", None).await;
    let actions: Vec<&str> =
        audit["entries"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert!(actions.contains(&"registration.approve") && actions.contains(&"handshake_key.create"), "{actions:?}");
    r.stop().await;
}

#[tokio::test]
async fn rejection_and_http_approval_and_unknown_requests() {
    let r = start_relay().await;
    let (_, hk) = admin_call(&r, Method::POST, "/api/handshake-keys", Some(json!({"key":"group-default123"}))).await;
    assert_eq!(hk["key"], "group-default123", "an admin may choose the key (seed 000's example)");
    let a = register(&r, "group-default123", "A").await["payload"]["requestID"].as_str().unwrap().to_owned();
    let b = register(&r, "group-default123", "B").await["payload"]["requestID"].as_str().unwrap().to_owned();
    let (s, _) = admin_call(&r, Method::POST, &format!("/api/registrations/{a}/reject"), None).await;
    assert_eq!(s, 200);
    let (_, st) = call(&r, Method::GET, &format!("/ws/status/{a}"), None, None).await;
    assert_eq!(st["status"], "rejected");
    let (s, again) = admin_call(&r, Method::POST, &format!("/api/registrations/{a}/approve"), Some(json!({}))).await;
    assert_eq!(s, 409, "a decided request stays decided: {again}");
    let (s, ok) =
        admin_call(&r, Method::POST, &format!("/api/registrations/{b}/approve"), Some(json!({"name":"Boat B"}))).await;
    assert_eq!(s, 200, "{ok}");
    assert!(ok["clientID"].as_str().unwrap().starts_with("dev-"));
    let (s, _) = call(&r, Method::GET, "/ws/status/req-unknown", None, None).await;
    assert_eq!(s, 404);
    // Pilots cannot approve.
    let pilot = r.create_operator("ana", "default", relay::store::OperatorRole::Pilot);
    let (s, e) = call(&r, Method::GET, "/api/registrations", Some(&pilot), None).await;
    assert_eq!((s, e["error"]["code"].as_str()), (403, Some("forbidden")));
    r.stop().await;
}

#[tokio::test]
async fn bad_used_up_expired_and_rotated_keys_are_refused() {
    let r = start_relay().await;
    let refused = |v: &serde_json::Value| v["type"] == "error" && v["payload"]["code"] == "invalid_handshake_key";
    assert!(refused(&register(&r, "no-such-key-at-all", "X").await));

    let (_, once) = admin_call(&r, Method::POST, "/api/handshake-keys", Some(json!({"uses":1}))).await;
    let once = once["key"].as_str().unwrap().to_owned();
    assert_eq!(register(&r, &once, "first").await["type"], "registration_pending");
    assert!(refused(&register(&r, &once, "second").await), "the use count ran out");

    let (_, short) = admin_call(&r, Method::POST, "/api/handshake-keys", Some(json!({"expiresIn":0.2}))).await;
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert!(refused(&register(&r, short["key"].as_str().unwrap(), "late").await), "expired");

    let (_, rot) = admin_call(&r, Method::POST, "/api/handshake-keys", Some(json!({}))).await;
    let (id, old) = (rot["id"].as_str().unwrap().to_owned(), rot["key"].as_str().unwrap().to_owned());
    let (_, new) = admin_call(&r, Method::POST, &format!("/api/handshake-keys/{id}/rotate"), None).await;
    assert!(refused(&register(&r, &old, "old").await));
    assert_eq!(register(&r, new["key"].as_str().unwrap(), "new").await["type"], "registration_pending");
    let (s, _) = admin_call(&r, Method::POST, &format!("/api/handshake-keys/{id}/revoke"), None).await;
    assert_eq!(s, 200);
    assert!(refused(&register(&r, new["key"].as_str().unwrap(), "revoked").await));
    let (_, list) = admin_call(&r, Method::GET, "/api/handshake-keys", None).await;
    assert_eq!(list["handshakeKeys"].as_array().unwrap().len(), 3);
    assert!(list.to_string().find(&old).is_none(), "keys are never listed");
    r.stop().await;
}

#[tokio::test]
async fn repeated_bad_keys_are_rate_limited_per_address() {
    let r = start_relay_with(|c| c.auth_failures_per_minute = 3).await;
    for _ in 0..4 {
        let v = register(&r, "guessing-1234567", "X").await;
        assert_eq!(v["payload"]["code"], "invalid_handshake_key");
    }
    let v = register(&r, "guessing-1234567", "X").await;
    assert_eq!(v["payload"]["code"], "rate_limited", "{v}");
    assert!(v["payload"]["retryAfterMs"].as_u64().unwrap() > 0);
    r.stop().await;
}
