//! The tether-relay binary: store subcommands print secrets once, first start prints an admin
//! key, SIGTERM closes sockets with 1001 and exits cleanly.

mod common;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

const ENV_VARS: &[&str] = &[
    "PORT",
    "BIND_ADDRESS",
    "TETHER_DATA_DIR",
    "TETHER_DB",
    "LOG_LEVEL",
    "TETHER_ADMIN_KEY",
    "DEBUG_MODE",
    "PING_INTERVAL",
];

fn relay_cmd(db: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tether-relay"));
    for v in ENV_VARS {
        c.env_remove(v);
    }
    c.arg("--db").arg(db);
    c
}

fn json_out(c: &mut Command) -> Value {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn store_subcommands_create_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    json_out(relay_cmd(&db).args(["org", "create", "acme", "--json"]));
    let dev = json_out(
        relay_cmd(&db).args(["device", "create", "--org", "acme", "--name", "Boat", "--id", "boat-1", "--json"]),
    );
    assert_eq!(dev["clientID"], "boat-1");
    assert_eq!(dev["clientSecret"].as_str().unwrap().len(), 64);
    let op = json_out(relay_cmd(&db).args([
        "operator",
        "create",
        "--org",
        "acme",
        "--username",
        "ana",
        "--role",
        "admin",
        "--json",
    ]));
    assert!(op["apiKey"].as_str().unwrap().starts_with("tk_"));
    let key = json_out(relay_cmd(&db).args(["key", "create", "--operator", "ana", "--json"]));
    // Passwords come from stdin, never from the command line.
    let set_password = |pw: &str| {
        let mut child = relay_cmd(&db)
            .args(["operator", "passwd", "--username", "ana"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(pw.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = set_password("correct horse battery\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = set_password("short\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 10"));
    let pilot = json_out(relay_cmd(&db).args([
        "operator",
        "create",
        "--org",
        "acme",
        "--username",
        "pia",
        "--access",
        "control",
        "--json",
    ]));
    assert_eq!(pilot["role"], "pilot");
    let grants = relay::store::Store::open(&db)
        .unwrap()
        .call_sync(|c| relay::store::q::operator_grants(c, pilot["operatorID"].as_str().unwrap()))
        .unwrap();
    assert_eq!(grants[0].level, "control");
    assert_ne!(key["apiKey"], op["apiKey"]);
    // The database holds no secret in clear.
    let raw = std::fs::read(&db).unwrap();
    let hay = String::from_utf8_lossy(&raw);
    assert!(!hay.contains(dev["clientSecret"].as_str().unwrap()));
    // Mistakes are explained.
    let out = relay_cmd(&db).args(["device", "create", "--org", "nope", "--name", "X"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("organisation \"nope\" not found"));
    let out = relay_cmd(&db)
        .args(["device", "create", "--org", "acme", "--name", "Boat", "--id", "boat-1"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = relay_cmd(&db).args(["--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--port", "[env: PORT=]", "PING_INTERVAL", "TELEMETRY_BUFFER_SIZE", "CONNECTION_TIMEOUT"] {
        assert!(help.contains(flag), "help mentions {flag}: {help}");
    }
}

#[tokio::test]
async fn first_start_prints_a_key_and_sigterm_closes_with_1001() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let mut child = tokio::process::Command::from(relay_cmd(&db));
    child.args(["--port", "0", "--bind", "127.0.0.1"]).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = child.spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), stdout.next_line()).await.unwrap().unwrap().unwrap();
    let addr = line.strip_prefix("tether-relay listening on http://").expect(&line).to_owned();
    // The first-start banner carries the admin key.
    let mut key = None;
    while key.is_none() {
        let l = tokio::time::timeout(Duration::from_secs(10), stderr.next_line()).await.unwrap().unwrap().unwrap();
        if let Some(k) = l.trim().strip_prefix("tk_") {
            key = Some(format!("tk_{k}"));
        }
    }
    let key = key.unwrap();
    let mut ws = common::operator_at(&addr, &key).await;
    tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });

    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    assert_eq!(ws.recv().await["payload"]["code"], "shutting_down");
    assert_eq!(u16::from(ws.expect_close().await.unwrap().code), 1001);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");

    // A second start finds the admin and prints no new key.
    let out = tokio::process::Command::from(relay_cmd(&db))
        .args(["--port", "0", "--bind", "127.0.0.1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = out;
    let mut lines = BufReader::new(out.stdout.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await.unwrap().unwrap().unwrap();
    Command::new("kill").args(["-TERM", &out.id().unwrap().to_string()]).status().unwrap();
    let res = tokio::time::timeout(Duration::from_secs(20), out.wait_with_output()).await.unwrap().unwrap();
    assert!(!String::from_utf8_lossy(&res.stderr).contains("FIRST START"));
}
