//! Conformance of the monitoring-agent dialect (seed 002, docs/protocol.md "Monitoring agent
//! dialect"): the messages printed in the seed document, replayed verbatim (placeholders such as
//! `your-api-key-here` and `uuid` filled in), get the documented answers; and the dialect meets the
//! native protocol: a monitoring agent's metrics reach a native pilot as telemetry, a native
//! pilot's `execute_command` / `docker_command` is answered by the monitoring agent.

mod common;
use common::*;
use serde_json::{Value, json};

// The seed's messages, as printed.
const SEED_AUTH: &str = r#"{
      "type": "auth",
      "api_key": "your-api-key-here"
    }"#;
/// Printed with `[...]` placeholders, which are not JSON.
const SEED_METRICS: &str = r#"{
  "type": "metrics",
  "server_id": "uuid",
  "cpu_percent": 45.2,
  "memory_percent": 62.5,
  "disk_usage": [...],
  "network": [...],
  "timestamp": "2024-01-01T00:00:00Z"
}"#;
const SEED_COMMAND: &str = r#"{
  "type": "command",
  "command_id": "uuid",
  "command": "ls -la"
}"#;
const SEED_COMMAND_RESPONSE: &str = r#"{
  "type": "command_response",
  "command_id": "uuid",
  "output": "total 100\n...",
  "exit_code": 0,
  "duration_ms": 150
}"#;
const SEED_DOCKER_COMMAND: &str = r#"{
  "type": "docker_command",
  "command_id": "uuid",
  "action": "start",
  "container_id": "container-id"
}"#;
const SEED_DOCKER_RESPONSE: &str = r#"{
  "type": "docker_response",
  "command_id": "uuid",
  "success": true,
  "message": "Container started"
}"#;

/// The seed's metrics with its `[...]` placeholders filled in.
fn metrics_text() -> String {
    SEED_METRICS.replacen("[...]", r#"[{"mount":"/","percent":71.3}]"#, 1).replacen(
        "[...]",
        r#"[{"interface":"eth0","bytes_sent":1024,"bytes_recv":2048}]"#,
        1,
    )
}

fn parse(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

/// The agent's API key: `<clientID>:<clientSecret>` of an ordinary Tether device.
async fn agent(r: &TestRelay, id: &str, secret: &str) -> Client {
    let mut a = Client::connect(&r.ws_url("/api/v1/agents/ws"), None).await;
    a.send_text(&SEED_AUTH.replace("your-api-key-here", &format!("{id}:{secret}"))).await;
    let ok = a.recv().await;
    assert_eq!(ok, json!({"type":"auth_success","server_id":id,"message":"Connected successfully"}));
    a
}

/// A browser stream (`metrics` or `logs`) authenticated with `token`; `auth_success` consumed.
async fn browser(r: &TestRelay, kind: &str, server: &str, token: &str) -> Client {
    let mut b = Client::connect(&r.ws_url(&format!("/api/v1/ws/{kind}/{server}")), None).await;
    b.send(json!({"type":"auth","token":token})).await;
    let ok = b.recv().await;
    assert_eq!(ok["type"], "auth_success", "{ok}");
    assert_eq!(ok["server_id"], server);
    b
}

#[tokio::test]
async fn agent_auth_ok_and_bad_key() {
    let r = start_relay().await;
    let secret = r.create_device("srv-1", "default");

    // The seed's placeholder key is not a Tether credential.
    let mut bad = Client::connect(&r.ws_url("/api/v1/agents/ws"), None).await;
    bad.send_text(SEED_AUTH).await;
    let e = bad.recv().await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["message"], "Invalid or inactive API key");
    assert_eq!(bad.expect_close().await.map(|f| u16::from(f.code)), Some(1008));

    // A wrong secret for a real device is refused the same way.
    let mut wrong = Client::connect(&r.ws_url("/api/v1/agents/ws"), None).await;
    wrong.send(json!({"type":"auth","api_key":"srv-1:not-the-secret"})).await;
    assert_eq!(wrong.recv().await["message"], "Invalid or inactive API key");
    wrong.expect_close().await;

    // Something else first is refused too.
    let mut early = Client::connect(&r.ws_url("/api/v1/agents/ws"), None).await;
    early.send_text(&metrics_text()).await;
    assert_eq!(early.recv().await["type"], "error");
    early.expect_close().await;

    // The real key: presence like a native device.
    let key = r.create_pilot("ana", Some("admin"));
    let mut p = r.operator(&key).await;
    subscribe(&mut p, "srv-1").await;
    let mut a = agent(&r, "srv-1", &secret).await;
    let online = p.recv_type("presence").await;
    assert_eq!(online["payload"]["deviceID"], "srv-1");
    assert_eq!(online["payload"]["status"], "online");
    let (_, presence) = r.get_json("/api/presence?devices=srv-1", Some(&key)).await;
    assert_eq!(presence["srv-1"], "online", "{presence}");

    // Invalid frames after auth get the seed's error, and the connection stays.
    a.send_text("not json").await;
    assert_eq!(a.recv().await, json!({"type":"error","message":"Invalid message format","code":"malformed_json"}));
    a.send(json!({"type":"bogus"})).await;
    assert_eq!(a.recv().await["message"], "Invalid message format");
    a.send(json!({"type":"ping"})).await;
    assert_eq!(a.recv().await, json!({"type":"pong"}));

    drop(a);
    let offline = p.recv_type("presence").await;
    assert_eq!(offline["payload"]["status"], "offline");
    r.stop().await;
}

#[tokio::test]
async fn a_monitoring_agents_metrics_reach_a_native_pilot() {
    let r = start_relay().await;
    let secret = r.create_device("srv-1", "default");
    let key = r.create_pilot("ana", Some("view"));
    let mut p = r.operator(&key).await;
    subscribe(&mut p, "srv-1").await;
    let mut a = agent(&r, "srv-1", &secret).await;

    // Verbatim, the printed example is not JSON (`[...]`): the seed's invalid-message answer.
    a.send_text(SEED_METRICS).await;
    assert_eq!(a.recv().await["message"], "Invalid message format");

    // Filled in, it is relayed as native telemetry with the relay's annotations.
    a.send_text(&metrics_text()).await;
    let t = p.recv_type("telemetry").await;
    assert_eq!(t["from"], "srv-1");
    let pl = &t["payload"];
    assert_eq!(pl["subtype"], "system_metrics");
    assert_eq!(pl["stream"], "metrics");
    assert_eq!(pl["sequence"], 1);
    assert_eq!(pl["timestamp"], 1_704_067_200_000.0);
    assert_eq!(pl["data"]["cpu_percent"], 45.2);
    assert_eq!(pl["data"]["memory_percent"], 62.5);
    assert_eq!(pl["data"]["disk_usage"][0]["mount"], "/");
    assert_eq!(pl["data"]["network"][0]["interface"], "eth0");
    assert!(pl["data"].get("server_id").is_none(), "{t}");
    assert_eq!(pl["relay"]["stream"], "metrics");
    assert_eq!(pl["relay"]["verdict"], "ok");
    assert!(pl["relay"]["receivedAt"].as_f64().is_some());

    // The adapter numbers the frames: the next one is 2, verdict ok.
    a.send_text(&metrics_text()).await;
    let t2 = p.recv_type("telemetry").await;
    assert_eq!(t2["payload"]["sequence"], 2);
    assert_eq!(t2["payload"]["relay"]["verdict"], "ok");

    // The server_id in the frame is not trusted: the relay stamps the authenticated device.
    a.send_text(&metrics_text().replace("\"uuid\"", "\"someone-else\"")).await;
    assert_eq!(p.recv_type("telemetry").await["from"], "srv-1");
    r.stop().await;
}

#[tokio::test]
async fn a_native_pilots_execute_command_is_answered_by_the_agent() {
    let r = start_relay().await;
    let secret = r.create_device("srv-1", "default");
    let key = r.create_pilot("ana", Some("admin"));
    let mut a = agent(&r, "srv-1", &secret).await;
    let mut p = r.operator(&key).await;

    p.send(json!({"type":"execute_command","correlationID":"uuid","clientID":"srv-1",
        "payload":{"command":"ls","args":["-la"]}}))
        .await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "delivered");
    assert_eq!(a.recv().await, parse(SEED_COMMAND));

    a.send_text(SEED_COMMAND_RESPONSE).await;
    let out = p.recv_type("command_output").await;
    assert_eq!(out["correlationID"], "uuid");
    assert_eq!(out["from"], "srv-1");
    assert_eq!(out["payload"]["stdout"], "total 100\n...");
    assert_eq!(out["payload"]["exitCode"], 0);
    assert_eq!(out["payload"]["durationMs"], 150);

    // Arguments are quoted into the single command string.
    p.send(json!({"type":"execute_command","correlationID":"c2","clientID":"srv-1",
        "payload":{"command":"echo","args":["a b"]}}))
        .await;
    assert_eq!(a.recv().await, json!({"type":"command","command_id":"c2","command":"echo 'a b'"}));

    // Permissions are the native ones: a viewer cannot command the agent.
    let viewer = r.create_pilot("vic", Some("view"));
    let mut v = r.operator(&viewer).await;
    v.send(json!({"type":"execute_command","correlationID":"c3","clientID":"srv-1","payload":{"command":"ls"}})).await;
    assert_eq!(v.recv_type("error").await["payload"]["code"], "forbidden");

    // A request the dialect cannot express is answered `unsupported` at once, not dropped.
    p.send(json!({"type":"reload_config","correlationID":"rc","clientID":"srv-1","payload":{}})).await;
    let res = p.recv_type("command_result").await;
    assert_eq!(res["correlationID"], "rc");
    assert_eq!(res["from"], "srv-1");
    assert_eq!(res["payload"]["ok"], false);
    assert_eq!(res["payload"]["code"], "unsupported");

    // A response nobody waits for gets an error in the seed's shape.
    a.send(json!({"type":"command_response","command_id":"nobody","output":"","exit_code":0,"duration_ms":1})).await;
    let e = a.recv().await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["command_id"], "nobody");
    r.stop().await;
}

#[tokio::test]
async fn docker_command_and_docker_response() {
    let r = start_relay().await;
    let secret = r.create_device("srv-1", "default");
    let mut a = agent(&r, "srv-1", &secret).await;
    let mut p = r.operator(&r.admin_key).await;

    p.send(json!({"type":"docker_command","correlationID":"uuid","clientID":"srv-1",
        "payload":{"action":"start","container":"container-id"}}))
        .await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "delivered");
    assert_eq!(a.recv().await, parse(SEED_DOCKER_COMMAND));

    a.send_text(SEED_DOCKER_RESPONSE).await;
    let res = p.recv_type("command_result").await;
    assert_eq!(res["correlationID"], "uuid");
    assert_eq!(res["from"], "srv-1");
    assert_eq!(res["payload"], json!({"ok":true,"data":{"message":"Container started"}}));

    // A failure becomes ok:false with the message.
    p.send(json!({"type":"docker_command","correlationID":"d2","clientID":"srv-1",
        "payload":{"action":"stop","container":"db"}}))
        .await;
    assert_eq!(a.recv().await["command_id"], "d2");
    a.send(json!({"type":"docker_response","command_id":"d2","success":false,"message":"No such container: db"})).await;
    let res = p.recv_type("command_result").await;
    assert_eq!(res["payload"]["ok"], false);
    assert_eq!(res["payload"]["error"], "No such container: db");
    assert_eq!(res["payload"]["code"], "command_failed");
    r.stop().await;
}

#[tokio::test]
async fn browser_metrics_stream_with_token_auth() {
    let r = start_relay().await;
    let secret = r.create_device("srv-1", "default");
    let key = r.create_pilot("ana", Some("view"));
    let mut a = agent(&r, "srv-1", &secret).await;

    // The token may be an operator API key or a one-time ticket.
    let mut by_key = browser(&r, "metrics", "srv-1", &key).await;
    let ticket = r.ticket(&key).await;
    let mut by_ticket = browser(&r, "metrics", "srv-1", &ticket).await;

    a.send_text(&metrics_text()).await;
    for b in [&mut by_key, &mut by_ticket] {
        let m = b.recv_type("metrics").await;
        assert_eq!(m["data"]["cpu_percent"], 45.2, "{m}");
        assert_eq!(m["data"]["memory_percent"], 62.5);
        assert_eq!(m["data"]["timestamp"], "2024-01-01T00:00:00.000Z");
    }

    // The ticket was used up.
    let mut again = Client::connect(&r.ws_url("/api/v1/ws/metrics/srv-1"), None).await;
    again.send(json!({"type":"auth","token":ticket})).await;
    assert_eq!(again.recv().await["type"], "error");
    again.expect_close().await;

    // The agent going away is an alert.
    drop(a);
    let alert = by_key.recv_type("alert").await;
    assert_eq!(alert["data"]["severity"], "warning", "{alert}");
    r.stop().await;
}

#[tokio::test]
async fn browser_streams_refuse_without_a_valid_token_or_view_permission() {
    let r = start_relay().await;
    r.create_device("srv-1", "default");
    let nobody = r.create_pilot("nobody", None);
    for kind in ["metrics", "logs"] {
        let url = r.ws_url(&format!("/api/v1/ws/{kind}/srv-1"));
        // No token.
        let mut b = Client::connect(&url, None).await;
        b.send(json!({"type":"auth"})).await;
        assert_eq!(b.recv().await["type"], "error");
        assert_eq!(b.expect_close().await.map(|f| u16::from(f.code)), Some(1008));
        // The seed's placeholder token.
        let mut b = Client::connect(&url, None).await;
        b.send_text(r#"{"type": "auth", "token": "jwt-access-token"}"#).await;
        let e = b.recv().await;
        assert_eq!(e["type"], "error");
        assert_eq!(e["message"], "Invalid or expired token");
        b.expect_close().await;
        // A valid key without view permission.
        let mut b = Client::connect(&url, None).await;
        b.send(json!({"type":"auth","token":nobody})).await;
        let e = b.recv().await;
        assert_eq!(e["code"], "forbidden", "{e}");
        b.expect_close().await;
    }
    // An unknown server.
    let mut b = Client::connect(&r.ws_url("/api/v1/ws/metrics/nope"), None).await;
    b.send(json!({"type":"auth","token":r.admin_key})).await;
    assert_eq!(b.recv().await["code"], "unknown_target");
    b.expect_close().await;
    r.stop().await;
}

#[tokio::test]
async fn browser_logs_stream() {
    let r = start_relay().await;
    let secret = r.create_device("srv-1", "default");
    let native_secret = r.create_device("boat-1", "default");
    let key = r.create_pilot("ana", Some("view"));
    let mut a = agent(&r, "srv-1", &secret).await;
    let mut logs = browser(&r, "logs", "srv-1", &key).await;

    // The agent's log entry in the browser's shape comes out as the browser's log entry.
    a.send(json!({"type":"log","data":{"level":"INFO","message":"Log message","timestamp":"2024-01-01T00:00:00Z"}}))
        .await;
    let l = logs.recv_type("log").await;
    assert_eq!(l["data"]["level"], "INFO");
    assert_eq!(l["data"]["message"], "Log message");
    assert_eq!(l["data"]["timestamp"], "2024-01-01T00:00:00.000Z");

    // Metrics do not appear on the logs stream; a native device's log lines do on its own.
    a.send_text(&metrics_text()).await;
    let mut dev = r.device("boat-1", &native_secret).await;
    let mut boat_logs = browser(&r, "logs", "boat-1", &key).await;
    dev.send(
        json!({"type":"log","payload":{"process":"ros","stream":"stderr","line":"drift","timestamp":1704067200000.0}}),
    )
    .await;
    let l = boat_logs.recv_type("log").await;
    assert_eq!(
        l["data"],
        json!({"level":"ERROR","message":"drift","timestamp":"2024-01-01T00:00:00.000Z","process":"ros"})
    );
    a.send(json!({"type":"log","level":"WARNING","message":"second","timestamp":"2024-01-01T00:00:01Z"})).await;
    let l = logs.recv_type("log").await;
    assert_eq!(l["data"]["message"], "second", "metrics must not show up as log entries");
    r.stop().await;
}

#[tokio::test]
async fn rate_limits_revocation_and_audit_like_native() {
    let r = start_relay_with(|c| c.messages_per_second = 5).await;
    let secret = r.create_device("srv-1", "default");
    let key = r.create_pilot("ana", Some("view"));
    let mut a = agent(&r, "srv-1", &secret).await;
    let mut b = browser(&r, "metrics", "srv-1", &key).await;

    // A flooding agent is refused with rate_limited, in the seed's error shape.
    for _ in 0..40 {
        a.send_text(&metrics_text()).await;
    }
    let e = a.recv_type("error").await;
    assert_eq!(e["code"], "rate_limited", "{e}");
    assert!(e["message"].as_str().unwrap().contains("rate limit"), "{e}");

    // Revoking the device closes the agent; its key stops working.
    let (s, _) = admin_call(&r, reqwest::Method::POST, "/api/devices/srv-1/revoke", Some(json!({}))).await;
    assert_eq!(s, 200);
    let e = a.recv_type("error").await;
    assert_eq!(e["code"], "revoked", "{e}");
    assert_eq!(a.expect_close().await.map(|f| u16::from(f.code)), Some(1008));
    let mut again = Client::connect(&r.ws_url("/api/v1/agents/ws"), None).await;
    again.send(json!({"type":"auth","api_key":format!("srv-1:{secret}")})).await;
    assert_eq!(again.recv().await["message"], "Invalid or inactive API key");

    // Revoking the operator's key closes its browser stream.
    let key_id = key.split('_').nth(1).unwrap().to_owned();
    let (s, _) = admin_call(&r, reqwest::Method::POST, &format!("/api/keys/{key_id}/revoke"), None).await;
    assert_eq!(s, 200);
    let e = b.recv_type("error").await;
    assert_eq!(e["code"], "revoked", "{e}");
    b.expect_close().await;
    let (_, audit) = admin_call(&r, reqwest::Method::GET, "/api/audit", None).await;
    let actions: Vec<&str> = audit["entries"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    assert!(actions.contains(&"key.revoke") && actions.contains(&"device.revoke"), "{actions:?}");
    r.stop().await;
}

#[tokio::test]
async fn the_offline_queue_like_native() {
    let r = start_relay().await;
    let secret = r.create_device("srv-1", "default");
    let mut p = r.operator(&r.admin_key).await;

    // Both wait for the offline agent.
    p.send(json!({"type":"reload_config","correlationID":"rc","clientID":"srv-1","payload":{}})).await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "queued");
    p.send(json!({"type":"execute_command","correlationID":"q1","clientID":"srv-1","payload":{"command":"uptime"}}))
        .await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "queued");

    // At login the command arrives marked; the reload it cannot express is answered for it.
    let mut a = agent(&r, "srv-1", &secret).await;
    assert_eq!(a.recv().await, json!({"type":"command","command_id":"q1","command":"uptime","_offline_queued":true}));
    let res = p.recv_type("command_result").await;
    assert_eq!((res["correlationID"].as_str(), res["payload"]["code"].as_str()), (Some("rc"), Some("unsupported")));
    a.send(json!({"type":"command_response","command_id":"q1","output":"up 3 days","exit_code":0,"duration_ms":4}))
        .await;
    assert_eq!(p.recv_type("command_output").await["payload"]["stdout"], "up 3 days");

    // Both answered: nothing comes back at the next login (the pong is the first message).
    a.ws.close(None).await.unwrap();
    let mut a = agent(&r, "srv-1", &secret).await;
    a.send(json!({"type":"ping"})).await;
    assert_eq!(a.recv().await, json!({"type":"pong"}));
    r.stop().await;
}
