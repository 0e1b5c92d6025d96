//! Seed dialects against the REAL agent binary (issue 8, cross-dialect): a Softlab commander on
//! `/ws/connect` commands a native `tether-device` (execute_command, the allow list, ping), and a
//! monitoring-dialect browser on `/api/v1/ws/metrics/<device>` receives that agent's own system
//! metrics in seed 002's shape.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// boat-7's config: commands allowed `echo` only, system metrics every 200 ms, no local inputs.
fn config(dir: &std::path::Path, addr: std::net::SocketAddr, secret: &str) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "serverAddress: \"ws://{addr}/ws\"\nclientID: boat-7\nclientSecret: \"{secret}\"\nname: Boat 7\n\
             logLevel: debug\nreconnectInterval: 0.2\n\
             telemetry:\n  systemMetrics: true\n  systemInterval: 200ms\n  udp: \"\"\n  unixSocket: \"\"\n\
             commands:\n  allow: [\"echo\"]\n"
        ),
    )
    .unwrap();
    path
}

/// A WebSocket on `path` of the relay (no ticket: the dialects authenticate in the first message).
async fn dialect(addr: std::net::SocketAddr, path: &str) -> Ws {
    tokio_tungstenite::connect_async(format!("ws://{addr}{path}")).await.unwrap().0
}

/// A relay, boat-7 with an admin operator, and the real agent online.
async fn setup(dir: &std::path::Path) -> (relay::RunningRelay, String, RunningAgent) {
    let running = start(dir, 0).await;
    let (secret, key) = fleet(&running, "admin");
    let cfg = config(dir, running.addr, &secret);
    let mut agent = RunningAgent::spawn(&cfg, &[]);
    agent.wait_for_log("authenticated with the relay").await;
    (running, key, agent)
}

#[tokio::test]
async fn a_softlab_commander_commands_the_real_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (running, key, _agent) = setup(dir.path()).await;
    let mut c = dialect(running.addr, "/ws/connect").await;

    send(&mut c, json!({"auth_key": key, "sender": "my_pc"})).await;
    let ok = recv_until(&mut c, "authenticated", |v| v.get("status").is_some()).await;
    assert_eq!(ok, json!({"status":"authenticated","client_id":"my_pc"}));

    // A native request in Softlab's frame: the real agent runs it and answers natively; the
    // commander sees the answer as it is, with `sender` = the device.
    send(
        &mut c,
        json!({"target":"boat-7","type":"execute_command","correlationID":"c1",
               "payload":{"command":"echo","args":["hello-softlab"]}}),
    )
    .await;
    let out = recv_until(&mut c, "command_output c1", |v| {
        v["correlationID"] == "c1"
            && (v["type"] == "command_output" || v["type"] == "command_result" || v["status"] == "error")
    })
    .await;
    assert_eq!(out["type"], "command_output", "{out}");
    assert_eq!(out["sender"], "boat-7", "{out}");
    assert_eq!(out["from"], "boat-7", "{out}");
    assert_eq!(out["payload"]["stdout"], "hello-softlab\n", "{out}");
    assert_eq!(out["payload"]["exitCode"], 0, "{out}");
    assert!(out["payload"]["durationMs"].is_u64(), "{out}");

    // The same with the command's fields beside `type` (no `payload` object), as the docs' example.
    send(
        &mut c,
        json!({"target":"boat-7","type":"execute_command","correlationID":"c2","command":"echo","args":["flat"]}),
    )
    .await;
    let out = recv_until(&mut c, "command_output c2", |v| {
        v["correlationID"] == "c2"
            && (v["type"] == "command_output" || v["type"] == "command_result" || v["status"] == "error")
    })
    .await;
    assert_eq!(out["type"], "command_output", "{out}");
    assert_eq!(out["sender"], "boat-7", "{out}");
    assert_eq!(out["payload"]["stdout"], "flat\n", "{out}");

    // Not on the agent's allow list: refused by the agent, shown in Softlab's shape.
    send(
        &mut c,
        json!({"target":"boat-7","type":"execute_command","correlationID":"c3",
               "payload":{"command":"rm","args":["-rf","/tmp/nothing-here"]}}),
    )
    .await;
    let out = recv_until(&mut c, "refusal c3", |v| {
        v["correlationID"] == "c3"
            && (v["type"] == "command_output" || v["type"] == "command_result" || v["status"] == "error")
    })
    .await;
    assert_eq!(out["type"], "command_result", "{out}");
    assert_eq!(out["sender"], "boat-7", "{out}");
    assert_eq!(out["payload"]["ok"], false, "{out}");
    assert_eq!(out["payload"]["code"], "command_not_allowed", "{out}");

    send(&mut c, json!({"action":"ping"})).await;
    let pong = recv_until(&mut c, "pong", |v| v.get("status").is_some()).await;
    assert_eq!(pong, json!({"status":"pong"}));

    drop(c);
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_monitoring_browser_streams_the_real_agents_system_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (running, key, _agent) = setup(dir.path()).await;
    let mut b = dialect(running.addr, "/api/v1/ws/metrics/boat-7").await;

    send(&mut b, json!({"type":"auth","token": key})).await;
    let ok = recv_until(&mut b, "auth_success", |v| v["type"] == "auth_success" || v["type"] == "error").await;
    assert_eq!(ok, json!({"type":"auth_success","server_id":"boat-7","message":"Connected successfully"}));

    // Two frames from the agent's 200 ms ticker, each in the seed's shape.
    let mut stamps = Vec::new();
    for _ in 0..2 {
        let m = recv_until(&mut b, "metrics", |v| v["type"] == "metrics" || v["type"] == "error").await;
        assert_eq!(m["type"], "metrics", "{m}");
        assert_eq!(m["server_id"], "boat-7", "{m}");
        let data = &m["data"];
        let mem = data["memory_percent"].as_f64().unwrap_or_else(|| panic!("no memory_percent: {m}"));
        assert!((0.0..=100.0).contains(&mem), "{m}");
        assert!(data["memory"]["total"].as_u64().unwrap_or(0) > 0, "{m}");
        assert!(data["uptime_s"].as_f64().unwrap_or(0.0) > 0.0, "{m}");
        let ts = data["timestamp"].as_str().unwrap_or_else(|| panic!("no ISO timestamp: {m}"));
        assert!(ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "YYYY-MM-DDTHH:MM:SS.mmmZ: {ts}");
        assert!(data.get("relay").is_none() && data.get("subtype").is_none(), "only payload.data: {m}");
        stamps.push(ts.to_owned());
    }
    assert!(stamps[0] < stamps[1], "two samples, in order: {stamps:?}");

    // The browser's ping.
    send(&mut b, json!({"type":"ping"})).await;
    recv_until(&mut b, "pong", |v| v["type"] == "pong").await;

    drop(b);
    running.shutdown(Duration::from_secs(5)).await;
}
