//! Queued commands survive a relay killed with SIGKILL: the real binary, restarted on the same
//! database, delivers every one in order.

mod common;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Client;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

const KEY: &str = "tk_admin_0123456789abcdef0123";

async fn start(db: &std::path::Path) -> (tokio::process::Child, String) {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether-relay"));
    for v in ["PORT", "TETHER_DB", "TETHER_DATA_DIR", "LOG_LEVEL"] {
        c.env_remove(v);
    }
    c.env("TETHER_ADMIN_KEY", KEY).arg("--db").arg(db).args(["--port", "0", "--bind", "127.0.0.1"]);
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::null()).kill_on_drop(true).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await.unwrap().unwrap().unwrap();
    (child, line.strip_prefix("tether-relay listening on http://").unwrap().to_owned())
}

#[tokio::test]
async fn queued_commands_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let (mut relay, addr) = start(&db).await;
    let dev: Value = reqwest::Client::new()
        .post(format!("http://{addr}/api/devices"))
        .bearer_auth(KEY)
        .json(&json!({"name":"Boat","id":"boat-1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = dev["clientSecret"].as_str().unwrap().to_owned();
    let mut p = common::operator_at(&addr, KEY).await;
    for i in 0..10 {
        p.send(json!({"type":"update_client_config","correlationID":format!("cfg-{i}"),"clientID":"boat-1","payload":{"config":{"n":i}}}))
            .await;
        assert_eq!(p.recv_type("ack").await["payload"]["status"], "queued");
    }
    // No graceful anything: SIGKILL.
    let pid = relay.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
    relay.wait().await.unwrap();

    let (_relay, addr) = start(&db).await;
    let mut d = Client::connect(&format!("ws://{addr}/ws?clientID=boat-1"), Some(&secret)).await;
    assert_eq!(d.recv().await["type"], "auth_ok");
    for i in 0..10 {
        let m = d.recv_type("update_client_config").await;
        assert_eq!(m["correlationID"], format!("cfg-{i}"), "every command, in order");
        assert_eq!(m["_offline_queued"], true);
        assert_eq!(m["payload"]["config"]["n"], i);
    }
}
