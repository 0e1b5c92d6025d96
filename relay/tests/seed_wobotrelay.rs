//! Conformance with seed 000 (WobotRelay, /work/shared/seeds/000_4f0200824f24fa77.txt), the
//! protocol Tether's native protocol extends (docs/protocol.md). Every exchange the document
//! prints is replayed as printed, placeholders filled with real values, against a real relay;
//! where the document needs an agent, the test's native client plays it and answers as the
//! document says. The document's JSON carries `// ...` comments; those are not JSON, so the
//! messages are sent without them, otherwise byte for byte.

mod common;
use common::*;
use reqwest::Method;
use serde_json::json;

/// The seed's onboarding, end to end, with its example config's `name: "Client-1"` and
/// `handshakeKey: "group-default123"`: `/ws` handshake, admin approval over the admin WebSocket
/// (opened with a ticket from `POST /api/auth/ws-ticket`), `/ws/status/:requestID` polling, then
/// the persistent `/ws?clientID=...` connection with the populated clientID/clientSecret.
/// Returns the relay, the admin connection and the connected device `client-abc-123`.
async fn onboard() -> (TestRelay, Client, Client) {
    let r = start_relay().await;
    let (s, hk) = admin_call(&r, Method::POST, "/api/handshake-keys", Some(json!({"key":"group-default123"}))).await;
    assert_eq!(s, 201, "{hk}");
    assert_eq!(hk["key"], "group-default123");

    // Admin UI: "/api/auth/ws-ticket POST Generates WebSocket tickets for admin UIs", then
    // "/ws/admin?ticket=...".
    let (s, t) = r.post_json("/api/auth/ws-ticket", Some(&r.admin_key)).await;
    assert_eq!(s, 200, "{t}");
    let ticket = t["ticket"].as_str().unwrap();
    let mut admin = Client::connect(&r.ws_url(&format!("/ws/admin?ticket={ticket}")), None).await;
    let ok = admin.recv().await;
    assert_eq!((ok["type"].as_str(), ok["payload"]["role"].as_str()), (Some("auth_ok"), Some("admin")), "{ok}");

    // "/ws GET Initial client handshake endpoint". The seed prints no handshake message; Tether's
    // is `register` (docs/protocol.md 3.3) carrying the config's name and handshakeKey.
    let mut hs = Client::connect(&r.ws_url("/ws"), None).await;
    hs.send(
        json!({"type":"register","correlationID":"r1","payload":{"name":"Client-1","handshakeKey":"group-default123"}}),
    )
    .await;
    let pending = hs.recv().await;
    assert_eq!(pending["type"], "registration_pending", "{pending}");
    assert_eq!(pending["correlationID"], "r1");
    let request_id = pending["payload"]["requestID"].as_str().unwrap().to_owned();
    let close = hs.expect_close().await.expect("close frame after registration_pending");
    assert_eq!(u16::from(close.code), 1000);

    // The admin sees the request live and approves it, choosing the seed's clientID.
    let live = admin.recv_type("registration_requested").await;
    assert_eq!(live["payload"]["requestID"], request_id.as_str());
    assert_eq!(live["payload"]["name"], "Client-1");

    // "/ws/status/:requestID GET Client polling endpoint for approval status": pending first.
    let (s, st) = call(&r, Method::GET, &format!("/ws/status/{request_id}"), None, None).await;
    assert_eq!((s, st["status"].as_str()), (200, Some("pending")), "{st}");

    admin
        .send(json!({"type":"approve_registration","correlationID":"a1","payload":{"requestID":request_id,"deviceID":"client-abc-123"}}))
        .await;
    let ack = admin.recv_type("ack").await;
    assert_eq!(ack["correlationID"], "a1");
    assert_eq!(ack["payload"]["data"]["clientID"], "client-abc-123");

    // "The clientID and clientSecret fields are initially empty and are populated by the server
    // during the authentication and approval process."
    let (s, st) = call(&r, Method::GET, &format!("/ws/status/{request_id}"), None, None).await;
    assert_eq!((s, st["status"].as_str()), (200, Some("approved")), "{st}");
    assert_eq!(st["clientID"], "client-abc-123");
    let secret = st["clientSecret"].as_str().expect("the secret on the first poll after approval").to_owned();
    assert_eq!(secret.len(), 64);
    // "Client secrets are long-lived credentials ... stored securely": Tether shows the secret
    // once (docs/protocol.md 3.3) and stores only its bcrypt hash (the seed's "bcrypt hashing for
    // credentials").
    let (_, again) = call(&r, Method::GET, &format!("/ws/status/{request_id}"), None, None).await;
    assert_eq!(again["status"], "approved");
    assert!(again.get("clientSecret").is_none(), "{again}");

    // "/ws?clientID=... GET Persistent WebSocket connection for clients".
    let dev = r.device("client-abc-123", &secret).await;
    (r, admin, dev)
}

#[tokio::test]
async fn onboarding_with_handshake_key_and_admin_approval_then_persistent_connection() {
    let (r, mut admin, mut dev) = onboard().await;
    dev.send(json!({"type":"ping","payload":{}})).await;
    assert_eq!(dev.recv_type("pong").await["type"], "pong");
    // The approved device is in the fleet.
    let (_, devices) = admin_call(&r, Method::GET, "/api/devices", None).await;
    assert!(devices.to_string().contains("client-abc-123"), "{devices}");
    admin.send(json!({"type":"ping","payload":{}})).await;
    assert_eq!(admin.recv_type("pong").await["type"], "pong");

    // A wrong secret is refused on the persistent endpoint.
    let mut bad = Client::connect(&r.ws_url("/ws?clientID=client-abc-123"), Some(&"0".repeat(64))).await;
    assert_eq!(bad.recv().await["payload"]["code"], "auth_failed");
    assert_eq!(u16::from(bad.expect_close().await.unwrap().code), 1008);
    r.stop().await;
}

#[tokio::test]
async fn execute_command_as_printed_is_routed_and_answered_by_command_output() {
    let (r, mut admin, mut dev) = onboard().await;
    // The seed's message, exactly (less its comments).
    admin
        .send_text(
            r#"{
"type": "execute_command",
"correlationID": "cmd-xyz123",
"clientID": "client-abc-123",
"payload": {
"command": "ls",
"args": ["-l", "/home/user"]
}
}"#,
        )
        .await;
    // "The server would then route this message to the client with ID client-abc-123."
    let got = dev.recv_type("execute_command").await;
    assert_eq!(got["correlationID"], "cmd-xyz123");
    assert_eq!(got["payload"]["command"], "ls");
    assert_eq!(got["payload"]["args"], json!(["-l", "/home/user"]));
    // "The client would execute ls -l /home/user and send back a command_output message with the
    // same correlationID."
    dev.send(json!({"type":"command_output","correlationID":"cmd-xyz123","payload":{
        "stdout":"total 0\n","stderr":"","exitCode":0,"durationMs":3}}))
        .await;
    let out = admin.recv_type("command_output").await;
    assert_eq!(out["correlationID"], "cmd-xyz123");
    assert_eq!(out["payload"]["stdout"], "total 0\n");
    assert_eq!(out["payload"]["exitCode"], 0);
    r.stop().await;
}

#[tokio::test]
async fn update_client_config_as_printed_then_reload_config() {
    let (r, mut admin, mut dev) = onboard().await;
    admin
        .send_text(
            r#"{
"type": "update_client_config",
"correlationID": "cfg-update-789",
"clientID": "client-abc-123",
"payload": {
"config": {
"logLevel": "debug",
"paths": {
"my-app-service": {
"runOnInit": "/opt/my-app/start.sh",
"runOnInitRestart": "yes",
"environment": [
"APP_ENV=staging"
]
}
}
}
}
}"#,
        )
        .await;
    let got = dev.recv_type("update_client_config").await;
    assert_eq!(got["correlationID"], "cfg-update-789");
    assert_eq!(
        got["payload"]["config"],
        json!({"logLevel":"debug","paths":{"my-app-service":{"runOnInit":"/opt/my-app/start.sh",
            "runOnInitRestart":"yes","environment":["APP_ENV=staging"]}}})
    );
    // "The client will receive this update, save it to its local config.yaml, and trigger a
    // reload if necessary." The seed prints no answer; Tether's is `command_result`
    // (docs/protocol.md 4.15), here as the shipped agent would report it.
    dev.send(json!({"type":"command_result","correlationID":"cfg-update-789","payload":{"ok":true,"data":{
        "restartRequired":["logLevel"],"restarted":["my-app-service"],"started":[],"stopped":[],"unchanged":[]}}}))
        .await;
    let res = admin.recv_type("command_result").await;
    assert_eq!(res["correlationID"], "cfg-update-789");
    assert_eq!(res["payload"]["ok"], true);
    assert_eq!(res["payload"]["data"]["restarted"], json!(["my-app-service"]));

    // "(or if reload_config is sent)".
    admin.send(json!({"type":"reload_config","correlationID":"rl-1","clientID":"client-abc-123","payload":{}})).await;
    let got = dev.recv_type("reload_config").await;
    assert_eq!(got["correlationID"], "rl-1");
    dev.send(json!({"type":"command_result","correlationID":"rl-1","payload":{"ok":true}})).await;
    let res = admin.recv_type("command_result").await;
    assert_eq!((res["correlationID"].as_str(), res["payload"]["ok"].as_bool()), (Some("rl-1"), Some(true)));
    r.stop().await;
}

#[tokio::test]
async fn speed_test_on_request_and_the_generic_envelope() {
    let (r, mut admin, mut dev) = onboard().await;
    // "It ... can perform tasks like speed tests when requested" ("speed_test_result" is one of
    // the envelope's example types). The seed prints no speed test message; Tether's shape is in
    // docs/protocol.md 4.17.
    admin
        .send(
            json!({"type":"speed_test","correlationID":"st-1","clientID":"client-abc-123","payload":{"bytes":1000000}}),
        )
        .await;
    let got = dev.recv_type("speed_test").await;
    assert_eq!(got["correlationID"], "st-1");
    dev.send(json!({"type":"speed_test_result","correlationID":"st-1","payload":{"uploadMbps":12.5,"downloadMbps":30.0,"rttMs":40.0}}))
        .await;
    let res = admin.recv_type("speed_test_result").await;
    assert_eq!(res["correlationID"], "st-1");
    assert_eq!(res["payload"]["downloadMbps"], 30.0);

    // The envelope template as printed, with its placeholder type: the envelope parses, but
    // "message_type" is no type of the protocol, so Tether answers `unknown_type` and (being
    // authenticated) keeps the connection open (docs/protocol.md 7.1).
    admin
        .send_text(
            r#"{
"type": "message_type",
"correlationID": "unique_request_id",
"clientID": "client-abc-123",
"payload": {
}
}"#,
        )
        .await;
    let e = admin.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "unknown_type", "{e}");
    admin.send(json!({"type":"ping","payload":{}})).await;
    assert_eq!(admin.recv_type("pong").await["type"], "pong");

    // "The correlationID is crucial for asynchronous communication": two requests in flight,
    // answered in the opposite order, each answer carries its own request's correlationID.
    for id in ["cmd-a", "cmd-b"] {
        admin
            .send(json!({"type":"execute_command","correlationID":id,"clientID":"client-abc-123","payload":{"command":"true","args":[]}}))
            .await;
        assert_eq!(dev.recv_type("execute_command").await["correlationID"], id);
    }
    for (id, out) in [("cmd-b", "b\n"), ("cmd-a", "a\n")] {
        dev.send(json!({"type":"command_output","correlationID":id,"payload":{"stdout":out,"stderr":"","exitCode":0,"durationMs":1}}))
            .await;
        let res = admin.recv_type("command_output").await;
        assert_eq!((res["correlationID"].as_str(), res["payload"]["stdout"].as_str()), (Some(id), Some(out)));
    }
    r.stop().await;
}
