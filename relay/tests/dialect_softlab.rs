//! Softlab dialect conformance (seed 001): the messages printed in the seed's document, replayed
//! against `/ws/connect` and `/api/presence`, get the documented answers; a Softlab commander
//! commands a native agent. Credentials are ordinary Tether ones: a master key is an operator
//! API key, a device token is `<clientID>:<clientSecret>`.

mod common;
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

/// The seed's routing example, verbatim.
const SEED_MESSAGE: &str = r#"{
"target": "mouse_pi",
"sender": "tkinter_bot",
"priority": "highest",
"speed": 100,
"subtasks": "Mx1920y1080 / C"
}"#;

async fn connect(r: &TestRelay) -> Client {
    let mut c = Client::connect(&r.ws_url("/ws/connect"), None).await;
    c.auto_time_sync = false;
    c
}

/// A commander authenticated with a master key (Option A), the answer checked.
async fn commander(r: &TestRelay, key: &str, sender: &str) -> Client {
    let mut c = connect(r).await;
    c.send_text(&format!("{{\n\"auth_key\": \"{key}\",\n\"sender\": \"{sender}\"\n}}")).await;
    assert_eq!(c.recv().await, json!({"status": "authenticated", "client_id": sender}));
    c
}

/// A worker authenticated with a device token (Option B).
async fn worker(r: &TestRelay, id: &str, secret: &str) -> Client {
    let mut c = connect(r).await;
    c.send_text(&format!("{{\n\"device_token\": \"{id}:{secret}\"\n}}")).await;
    assert_eq!(c.recv().await, json!({"status": "authenticated", "client_id": id}));
    c
}

fn operator_id(r: &TestRelay, username: &str) -> String {
    let u = username.to_owned();
    r.running().relay.store.call_sync(move |c| Ok(relay::store::q::find_operator(c, &u)?.unwrap().id)).unwrap()
}

async fn refused(c: &mut Client) -> Value {
    let e = c.recv().await;
    assert_eq!(e["status"], "error", "{e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    assert_eq!(u16::from(c.expect_close().await.expect("close frame").code), 1008);
    e
}

#[tokio::test]
async fn authenticates_with_a_master_key_or_a_device_token() {
    let r = start_relay().await;
    let secret = r.create_device("mouse_pi", "default");
    let _c = commander(&r, &r.admin_key, "my_controller_id").await;
    let _w = worker(&r, "mouse_pi", &secret).await;
    // The Python wrapper's commander: sender "my_pc".
    let _pc = commander(&r, &r.admin_key, "my_pc").await;
    r.stop().await;
}

#[tokio::test]
async fn missing_or_bad_credentials_are_refused_in_softlab_shape_and_closed() {
    let r = start_relay().await;
    let secret = r.create_device("mouse_pi", "default");
    // Master key without sender.
    let mut c = connect(&r).await;
    c.send(json!({"auth_key": r.admin_key})).await;
    let e = refused(&mut c).await;
    assert!(e["message"].as_str().unwrap().contains("sender"), "{e}");
    // Nothing at all.
    let mut c = connect(&r).await;
    c.send(json!({})).await;
    refused(&mut c).await;
    // A wrong key, a wrong token, a token that is not <clientID>:<secret>.
    for first in [
        json!({"auth_key": "tk_nokey_0000", "sender": "my_pc"}),
        json!({"device_token": format!("mouse_pi:{}x", secret)}),
        json!({"device_token": secret}),
    ] {
        let mut c = connect(&r).await;
        c.send(first).await;
        refused(&mut c).await;
    }
    // Commands before authentication are not accepted either.
    let mut c = connect(&r).await;
    c.send_text(r#"{"action": "ping"}"#).await;
    refused(&mut c).await;
    r.stop().await;
}

#[tokio::test]
async fn ping_is_answered_with_pong() {
    let r = start_relay().await;
    let secret = r.create_device("mouse_pi", "default");
    let mut c = commander(&r, &r.admin_key, "my_pc").await;
    c.send_text(r#"{"action": "ping"}"#).await;
    assert_eq!(c.recv().await, json!({"status": "pong"}));
    let mut w = worker(&r, "mouse_pi", &secret).await;
    w.send_text(r#"{"action": "ping"}"#).await;
    assert_eq!(w.recv().await, json!({"status": "pong"}));
    r.stop().await;
}

#[tokio::test]
async fn messages_are_forwarded_whole_with_the_relay_set_sender() {
    let r = start_relay().await;
    let secret = r.create_device("mouse_pi", "default");
    let admin = operator_id(&r, "admin");
    let mut c = commander(&r, &r.admin_key, "tkinter_bot").await;
    let mut w = worker(&r, "mouse_pi", &secret).await;
    // The seed's message: its `sender` is replaced by the relay's (the client cannot forge it).
    c.send_text(SEED_MESSAGE).await;
    let got = w.recv().await;
    assert_eq!(
        got,
        json!({"target": "mouse_pi", "sender": admin, "priority": "highest", "speed": 100, "subtasks": "Mx1920y1080 / C"})
    );
    // The Python wrapper's send_message("mouse_pi", {"command": "move", "x": 100}).
    c.send(json!({"target": "mouse_pi", "command": "move", "x": 100})).await;
    assert_eq!(w.recv().await, json!({"target": "mouse_pi", "command": "move", "x": 100, "sender": admin}));
    // The worker answers the sender; it arrives with the worker's id as sender.
    w.send(json!({"target": got["sender"], "sender": "someone_else", "status": "moved", "x": 100})).await;
    assert_eq!(c.recv().await, json!({"target": admin, "sender": "mouse_pi", "status": "moved", "x": 100}));
    // A message without a target is refused in Softlab's shape (never dropped silently).
    c.send(json!({"command": "move"})).await;
    let e = c.recv().await;
    assert_eq!(e["status"], "error");
    assert_eq!(e["code"], "invalid_payload");
    // An unknown target likewise.
    c.send(json!({"target": "nobody", "x": 1})).await;
    let e = c.recv().await;
    assert_eq!((e["status"].as_str(), e["code"].as_str()), (Some("error"), Some("unknown_target")), "{e}");
    r.stop().await;
}

#[tokio::test]
async fn offline_targets_get_their_messages_at_next_login_marked_offline_queued() {
    let r = start_relay().await;
    let secret = r.create_device("mouse_pi", "default");
    let admin = operator_id(&r, "admin");
    let mut c = commander(&r, &r.admin_key, "tkinter_bot").await;
    c.send_text(SEED_MESSAGE).await;
    c.send(json!({"target": "mouse_pi", "command": "move", "x": 100})).await;
    // Teleop-like traffic may refuse the queue: an error at once, nothing stored.
    c.send(json!({"target": "mouse_pi", "command": "stick", "queue": false})).await;
    let e = c.recv().await;
    assert_eq!((e["status"].as_str(), e["code"].as_str()), (Some("error"), Some("target_offline")), "{e}");
    // Nothing comes back for a queued message; a ping proves both were handled.
    c.send_text(r#"{"action": "ping"}"#).await;
    assert_eq!(c.recv().await, json!({"status": "pong"}));
    let mut w = worker(&r, "mouse_pi", &secret).await;
    assert_eq!(
        w.recv().await,
        json!({"target": "mouse_pi", "sender": admin, "priority": "highest", "speed": 100,
               "subtasks": "Mx1920y1080 / C", "_offline_queued": true})
    );
    assert_eq!(
        w.recv().await,
        json!({"target": "mouse_pi", "command": "move", "x": 100, "sender": admin, "_offline_queued": true})
    );
    // Delivered once: not again at the next login.
    drop(w);
    let mut w = worker(&r, "mouse_pi", &secret).await;
    w.send_text(r#"{"action": "ping"}"#).await;
    assert_eq!(w.recv().await, json!({"status": "pong"}), "nothing queued before the pong");
    r.stop().await;
}

#[tokio::test]
async fn presence_answers_as_documented_with_a_master_key() {
    let r = start_relay().await;
    let secret = r.create_device("mouse_pi", "default");
    r.create_device("sensor_pi", "default");
    let _w = worker(&r, "mouse_pi", &secret).await;
    let (s, body) = r.get_json("/api/presence?devices=mouse_pi,sensor_pi", Some(&r.admin_key)).await;
    assert_eq!(s, 200);
    assert_eq!(body, json!({"mouse_pi": "online", "sensor_pi": "offline"}));
    r.stop().await;
}

#[tokio::test]
async fn permissions_and_revocation_apply_as_for_native_clients() {
    let r = start_relay().await;
    let _secret = r.create_device("mouse_pi", "default");
    let key = r.create_pilot("viewer", Some("view"));
    let mut c = commander(&r, &key, "my_pc").await;
    // View level cannot drive (app_command needs control) nor run commands (admin).
    c.send(json!({"target": "mouse_pi", "command": "move"})).await;
    let e = c.recv().await;
    assert_eq!((e["status"].as_str(), e["code"].as_str()), (Some("error"), Some("forbidden")), "{e}");
    c.send(json!({"target": "mouse_pi", "type": "execute_command", "command": "ls"})).await;
    let e = c.recv().await;
    assert_eq!((e["status"].as_str(), e["code"].as_str()), (Some("error"), Some("forbidden")), "{e}");
    // Revoking the master key closes the Softlab connection.
    let key_id = key.split('_').nth(1).unwrap().to_owned();
    let (s, body) = admin_call(&r, Method::POST, &format!("/api/keys/{key_id}/revoke"), None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["closedConnections"], 1);
    let e = refused(&mut c).await;
    assert_eq!(e["code"], "revoked");
    // And the key no longer authenticates.
    let mut c = connect(&r).await;
    c.send(json!({"auth_key": key, "sender": "my_pc"})).await;
    refused(&mut c).await;
    r.stop().await;
}

/// Cross-dialect: a Softlab commander runs a command on a native agent and gets its answer.
#[tokio::test]
async fn a_softlab_pilot_commands_a_native_agent() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let admin = operator_id(&r, "admin");
    let mut dev = r.device("boat-1", &secret).await;
    let mut c = commander(&r, &r.admin_key, "my_pc").await;
    c.send(json!({"target": "boat-1", "type": "execute_command", "correlationID": "sl-1",
                  "command": "echo", "args": ["hi"]}))
        .await;
    let m = dev.recv_type("execute_command").await;
    assert_eq!(m["correlationID"], "sl-1");
    assert_eq!(m["clientID"], "boat-1");
    assert_eq!(m["from"], admin.as_str());
    assert_eq!(m["payload"], json!({"command": "echo", "args": ["hi"]}));
    dev.send(json!({"type": "command_output", "correlationID": "sl-1",
                    "payload": {"stdout": "hi\n", "stderr": "", "exitCode": 0, "durationMs": 2}}))
        .await;
    let out = c.recv().await;
    assert_eq!(out["type"], "command_output", "{out}");
    assert_eq!(out["correlationID"], "sl-1");
    assert_eq!(out["sender"], "boat-1");
    assert_eq!(out["payload"]["stdout"], "hi\n");
    assert_eq!(out["payload"]["exitCode"], 0);
    // A Softlab passthrough reaches the native agent as an app_command (control lease taken
    // on the commander's behalf).
    c.send_text(&SEED_MESSAGE.replace("mouse_pi", "boat-1")).await;
    let m = dev.recv_type("app_command").await;
    assert_eq!(m["from"], admin.as_str());
    assert_eq!(m["payload"]["command"], "softlab");
    assert_eq!(m["payload"]["data"]["speed"], 100);
    assert!(m["payload"]["data"].get("sender").is_none(), "the client's sender is not forwarded");
    r.stop().await;
}

/// Cross-dialect the other way: a native pilot commands a Softlab worker, which answers in
/// native terms; the worker's passthrough reaches the pilot as a `command_result`.
#[tokio::test]
async fn a_native_pilot_commands_a_softlab_worker() {
    let r = start_relay().await;
    let secret = r.create_device("mouse_pi", "default");
    let admin = operator_id(&r, "admin");
    let mut w = worker(&r, "mouse_pi", &secret).await;
    let mut p = r.operator(&r.admin_key).await;
    p.send(json!({"type": "execute_command", "correlationID": "n1", "clientID": "mouse_pi",
                  "payload": {"command": "uptime"}}))
        .await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "delivered");
    let m = w.recv().await;
    assert_eq!(m["type"], "execute_command", "{m}");
    assert_eq!(m["sender"], admin.as_str());
    assert_eq!(m["correlationID"], "n1");
    assert_eq!(m["payload"]["command"], "uptime");
    w.send(json!({"target": m["sender"], "type": "command_output", "correlationID": "n1",
                  "payload": {"stdout": "up 3 days\n", "stderr": "", "exitCode": 0, "durationMs": 1}}))
        .await;
    let out = p.recv_type("command_output").await;
    assert_eq!(out["from"], "mouse_pi");
    assert_eq!(out["payload"]["stdout"], "up 3 days\n");
    w.send(json!({"target": admin, "temperature": 41.5})).await;
    let res = p.recv_type("command_result").await;
    assert_eq!(res["from"], "mouse_pi");
    assert_eq!(res["payload"]["data"]["softlab"], json!({"target": admin, "temperature": 41.5}));
    // Workers do not message workers, and may not send native requests.
    let sensor = r.create_device("sensor_pi", "default");
    let _s = worker(&r, "sensor_pi", &sensor).await;
    w.send(json!({"target": "sensor_pi", "x": 1})).await;
    assert_eq!(w.recv().await["code"], "not_allowed");
    w.send(json!({"target": "sensor_pi", "type": "execute_command", "command": "ls"})).await;
    assert_eq!(w.recv().await["code"], "not_allowed");
    r.stop().await;
}

/// A Softlab connection has its identity's rate limits: a flood of pings is refused in
/// Softlab's shape, with the time to wait.
#[tokio::test]
async fn a_flood_is_rate_limited_in_softlab_shape() {
    let r = start_relay_with(|c| c.messages_per_second = 5).await;
    let mut c = commander(&r, &r.admin_key, "my_pc").await;
    for _ in 0..200 {
        c.send_text(r#"{"action": "ping"}"#).await;
    }
    loop {
        let m = c.recv().await;
        if m["status"] == "pong" {
            continue;
        }
        assert_eq!(m["status"], "error", "{m}");
        assert_eq!(m["code"], "rate_limited", "{m}");
        assert!(m["retryAfterMs"].as_u64().is_some_and(|ms| ms > 0), "{m}");
        break;
    }
    r.stop().await;
}

/// The seed document writes its URLs with a trailing slash (`/ws/connect/`, `/api/presence/`);
/// clients copied from it work as they are.
#[tokio::test]
async fn the_seeds_urls_with_a_trailing_slash_work() {
    let r = start_relay().await;
    r.create_device("mouse_pi", "default");
    let mut c = Client::connect(&r.ws_url("/ws/connect/"), None).await;
    c.send(json!({"auth_key": r.admin_key, "sender": "my_pc"})).await;
    assert_eq!(c.recv().await, json!({"status": "authenticated", "client_id": "my_pc"}));
    let (s, body) = r.get_json("/api/presence/?devices=mouse_pi", Some(&r.admin_key)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body, json!({"mouse_pi": "offline"}));
    r.stop().await;
}

/// A worker's device token is a device credential: revoking the device closes the Softlab
/// connection and the token stops working; what a commander does is audited like native.
#[tokio::test]
async fn device_revocation_and_audit_apply_to_softlab_connections() {
    let r = start_relay().await;
    let secret = r.create_device("mouse_pi", "default");
    let mut c = commander(&r, &r.admin_key, "my_pc").await;
    let mut w = worker(&r, "mouse_pi", &secret).await;
    // The control lease taken on the commander's behalf is in the audit log.
    c.send_text(SEED_MESSAGE).await;
    assert_eq!(w.recv().await["speed"], 100);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, audit) = admin_call(&r, Method::GET, "/api/audit", None).await;
        let found = audit["entries"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["action"] == "lease.acquired" && e["subject"] == "mouse_pi"));
        if found {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no lease.acquired audit entry: {audit}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, _) = admin_call(&r, Method::POST, "/api/devices/mouse_pi/revoke", Some(json!({}))).await;
    assert_eq!(s, 200);
    let e = refused(&mut w).await;
    assert_eq!(e["code"], "revoked");
    let mut again = connect(&r).await;
    again.send(json!({"device_token": format!("mouse_pi:{secret}")})).await;
    refused(&mut again).await;
    r.stop().await;
}
