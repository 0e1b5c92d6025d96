//! Conformance with seed 003 (practable's `relay`, /work/shared/seeds/003_82e9e9534eac1291.txt)
//! in Tether's mapped form (docs/protocol.md, "practable-style access"): the token goes in the
//! `Authorization` header of an HTTPS access point (`POST /api/auth/ws-ticket`) and is traded for
//! a one-time code (the ticket) that goes in the WebSocket URL (`/ws/admin?ticket=`); sessions can
//! be cancelled (deny list, ticket revocation); each connection reads (`view`) and/or writes
//! (`control`); the experiment (`host`) dials out, so everything is relayed.

mod common;
use common::*;
use relay::store::OperatorRole;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// practable's browser flow: `axios.post(accessURL, {}, {headers: {Authorization: token}})`,
/// then `new WebSocket(url)`. Tether answers the ticket and the client builds the URL
/// (the one difference the practable section of docs/protocol.md names).
async fn access(r: &TestRelay, token: &str) -> (String, String) {
    let resp = reqwest::Client::new()
        .post(r.http("/api/auth/ws-ticket"))
        .header("authorization", format!("Bearer {token}"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["expiresIn"], 30, "{v}");
    let t = v["ticket"].as_str().unwrap().to_owned();
    (r.ws_url(&format!("/ws/admin?ticket={t}")), t)
}

async fn open(url: &str) -> Client {
    let mut c = Client::connect(url, None).await;
    let ok = c.recv().await;
    assert_eq!(ok["type"], "auth_ok", "{ok}");
    c
}

async fn refused(url: &str, bearer: Option<&str>, code: &str) {
    let mut c = Client::connect(url, bearer).await;
    let e = c.recv().await;
    assert_eq!((e["type"].as_str(), e["payload"]["code"].as_str()), (Some("error"), Some(code)), "{e}");
    assert_eq!(u16::from(c.expect_close().await.expect("close frame").code), 1008);
}

/// The live session is cancelled: `error` `revoked`, close 1008 reason `revoked`
/// (docs/protocol.md 3.7).
async fn cancelled(c: &mut Client) {
    let e = c.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "revoked", "{e}");
    let close = c.expect_close().await.expect("close frame");
    assert_eq!((u16::from(close.code), close.reason.as_str()), (1008, "revoked"));
}

#[tokio::test]
async fn the_token_never_goes_in_a_url_and_the_code_works_once() {
    let r = start_relay().await;
    let key = r.create_pilot("student", Some("view"));
    // "it is not desirable to send the tokens in plain text in the ... query param": a token in
    // the WebSocket URL opens nothing, whatever the parameter is called; nor does a token in the
    // WebSocket upgrade's header ("Websocket connections cannot be secured by tokens sent in the
    // headers" in browsers; Tether accepts only tickets on /ws/admin).
    refused(&r.ws_url(&format!("/ws/admin?ticket={key}")), None, "invalid_ticket").await;
    refused(&r.ws_url(&format!("/ws/admin?token={key}")), None, "invalid_ticket").await;
    refused(&r.ws_url(&format!("/ws/admin?code={key}")), None, "invalid_ticket").await;
    refused(&r.ws_url("/ws/admin"), Some(&key), "invalid_ticket").await;

    // "The code is one-time use only": the first connection works, the second is refused and the
    // first is unaffected.
    let (url, ticket) = access(&r, &key).await;
    assert!(!url.contains(&key) && !ticket.contains(&key));
    let mut first = open(&url).await;
    refused(&url, None, "invalid_ticket").await;
    first.send(json!({"type":"ping","payload":{}})).await;
    assert_eq!(first.recv_type("pong").await["type"], "pong");

    // A bad token gets no code.
    let (s, _) = r.post_json("/api/auth/ws-ticket", Some("tk_nosuchkey_0000")).await;
    assert_eq!(s, 401);
    r.stop().await;
}

#[tokio::test]
async fn an_unused_code_expires() {
    let r = start_relay_with(|c| c.ticket_ttl = 0.2).await;
    let key = r.create_pilot("student", Some("view"));
    let issued = tokio::time::Instant::now();
    let (_, v) = r.post_json("/api/auth/ws-ticket", Some(&key)).await;
    let t = v["ticket"].as_str().unwrap();
    // Expiry is the passing of time itself: wait until the ticket's lifetime is over.
    tokio::time::sleep_until(issued + std::time::Duration::from_millis(400)).await;
    refused(&r.ws_url(&format!("/ws/admin?ticket={t}")), None, "invalid_ticket").await;
    r.stop().await;
}

#[tokio::test]
async fn sessions_are_cancelled_by_ticket_revocation_and_the_deny_list() {
    let r = start_relay().await;
    let key = r.create_pilot("student", Some("control"));
    let key_id = key.split('_').nth(1).unwrap().to_owned();

    // Cancel one session by its code (ticket).
    let (url, t) = access(&r, &key).await;
    let mut s1 = open(&url).await;
    let (other_url, _) = access(&r, &key).await;
    let mut s2 = open(&other_url).await;
    let (s, v) = admin_call(&r, Method::DELETE, &format!("/api/auth/ws-ticket/{t}"), None).await;
    assert_eq!((s, v["revoked"].as_bool(), v["closedConnections"].as_u64()), (200, Some(true), Some(1)), "{v}");
    cancelled(&mut s1).await;
    // Only that session: the other one of the same user lives on.
    s2.send(json!({"type":"ping","payload":{}})).await;
    assert_eq!(s2.recv_type("pong").await["type"], "pong");

    // The deny list by ticket hash.
    let (url3, t3) = access(&r, &key).await;
    let mut s3 = open(&url3).await;
    let subject = format!("ticket:{}", hex::encode(Sha256::digest(t3.as_bytes())));
    let (s, v) =
        admin_call(&r, Method::POST, "/api/deny", Some(json!({"subject":subject,"reason":"session over"}))).await;
    assert_eq!((s, v["closedConnections"].as_u64()), (201, Some(1)), "{v}");
    cancelled(&mut s3).await;
    s2.send(json!({"type":"ping","payload":{}})).await;
    assert_eq!(s2.recv_type("pong").await["type"], "pong");

    // The deny list by token (key): every session it opened closes, and it gets no new code until
    // the entry is removed.
    let subject = format!("key:{key_id}");
    let (s, v) = admin_call(&r, Method::POST, "/api/deny", Some(json!({"subject":subject}))).await;
    assert_eq!(s, 201, "{v}");
    cancelled(&mut s2).await;
    let (s, _) = r.post_json("/api/auth/ws-ticket", Some(&key)).await;
    assert_eq!(s, 401);
    let (s, v) = admin_call(&r, Method::GET, "/api/deny", None).await;
    assert_eq!(s, 200);
    assert!(
        v["deny"].as_array().unwrap().iter().any(|e| e["subject"] == subject.as_str() && e["kind"] == "key"),
        "{v}"
    );
    let (s, v) = admin_call(&r, Method::DELETE, &format!("/api/deny/{subject}"), None).await;
    assert_eq!((s, v["removed"].as_str()), (200, Some(subject.as_str())));
    let (url4, _) = access(&r, &key).await;
    let _s4 = open(&url4).await;

    // The deny list by user: its open session closes and new ones are refused with `revoked`.
    let (url5, _) = access(&r, &key).await;
    let mut s5 = open(&url5).await;
    let (s, _) = admin_call(&r, Method::POST, "/api/deny", Some(json!({"subject":"op-student","expiresIn":60}))).await;
    assert_eq!(s, 201);
    cancelled(&mut s5).await;
    r.stop().await;
}

#[tokio::test]
async fn read_only_connections_cannot_write_read_write_ones_can_all_relayed() {
    let r = start_relay().await;
    // The experiment's `host`: dials out to the relay, no open port.
    let secret = r.create_device("pendulum-1", "default");
    let mut host = r.device("pendulum-1", &secret).await;
    let reader_key = r.create_operator_with("reader", "default", OperatorRole::Pilot, None);
    let writer_key = r.create_operator_with("writer", "default", OperatorRole::Pilot, None);
    r.grant("reader", "device:pendulum-1", "view").await;
    r.grant("writer", "device:pendulum-1", "control").await;
    let mut reader = open(&access(&r, &reader_key).await.0).await;
    let mut writer = open(&access(&r, &writer_key).await.0).await;
    subscribe(&mut reader, "pendulum-1").await;
    subscribe(&mut writer, "pendulum-1").await;

    // Both read: the experiment's data stream reaches both connections through the relay.
    host.telemetry(1, now_ms(), json!({"angle":0.25})).await;
    for c in [&mut reader, &mut writer] {
        let m = c.recv_type("telemetry").await;
        assert_eq!(m["payload"]["data"]["angle"], 0.25, "{m}");
    }

    // The read-only connection cannot write: no lease, no command; the host sees nothing.
    reader.send(json!({"type":"lease_acquire","correlationID":"l0","payload":{"deviceID":"pendulum-1"}})).await;
    let e = reader.recv_type("error").await;
    assert_eq!((e["correlationID"].as_str(), e["payload"]["code"].as_str()), (Some("l0"), Some("forbidden")), "{e}");
    reader
        .send(json!({"type":"app_command","correlationID":"w0","clientID":"pendulum-1","payload":{"command":"set_speed","data":{"rps":2}}}))
        .await;
    let e = reader.recv_type("error").await;
    assert_eq!((e["correlationID"].as_str(), e["payload"]["code"].as_str()), (Some("w0"), Some("forbidden")), "{e}");

    // The read-write connection writes (under the control lease, docs/protocol.md 11).
    writer.send(json!({"type":"lease_acquire","correlationID":"l1","payload":{"deviceID":"pendulum-1"}})).await;
    let ack = writer.recv_type("ack").await;
    assert_eq!(
        (ack["correlationID"].as_str(), ack["payload"]["data"]["lease"].as_str()),
        (Some("l1"), Some("acquired"))
    );
    writer
        .send(json!({"type":"app_command","correlationID":"w1","clientID":"pendulum-1","payload":{"command":"set_speed","data":{"rps":2}}}))
        .await;
    // The first command the host receives is the writer's: the reader's never arrived.
    let cmd = host.recv_type("app_command").await;
    assert_eq!(cmd["correlationID"], "w1");
    assert_eq!(cmd["payload"]["data"]["rps"], 2);
    host.send(json!({"type":"command_result","correlationID":"w1","payload":{"ok":true}})).await;
    let res = writer.recv_type("command_result").await;
    assert_eq!((res["correlationID"].as_str(), res["payload"]["ok"].as_bool()), (Some("w1"), Some(true)));

    // Still a reader afterwards: it keeps receiving the stream.
    host.telemetry(2, now_ms(), json!({"angle":0.5})).await;
    let m = reader.recv_type("telemetry").await;
    assert_eq!(m["payload"]["data"]["angle"], 0.5);
    r.stop().await;
}
