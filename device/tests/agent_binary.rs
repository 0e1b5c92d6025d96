//! The real tether-device binary against a real relay: authenticates, answers clock sync,
//! publishes the simulated boat, reconnects after the relay restarts, and exits clearly when
//! its credentials are refused.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use relay::RelayConfig;
use relay::store::{OperatorRole, q};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn write_config(dir: &std::path::Path, addr: std::net::SocketAddr, secret: &str) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!("serverAddress: \"ws://{addr}/ws\"\nclientID: boat-7\nclientSecret: \"{secret}\"\nname: Boat 7\nlogLevel: debug\ntelemetry:\n  rateHz: 10\n  simulator: true\n  systemMetrics: false\n  udp: \"\"\n  unixSocket: \"\"\n"),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn agent_publishes_with_clock_sync_and_survives_a_relay_restart() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    let (secret, key) = running
        .relay
        .store
        .call_sync(|c| {
            let s = relay::auth::issue_device_sync(c, "boat-7", "default", "Boat 7")?;
            q::create_operator(c, "op-p", "default", "pilot", OperatorRole::Pilot)?;
            q::set_permission(c, "op-p", "org", "view")?;
            Ok((s, relay::auth::issue_api_key_sync(c, "op-p", None)?))
        })
        .unwrap();
    let config = write_config(dir.path(), addr, &secret);
    let mut agent = agent_cmd(&config).kill_on_drop(true).spawn().unwrap();

    let mut p = pilot(addr, &key).await;
    let first = frame(&mut p).await;
    assert_eq!(first["from"], "boat-7");
    assert!(first["payload"]["data"]["gps"]["latitude"].as_f64().unwrap() > 37.0);
    assert!(first["payload"]["epoch"].is_string(), "the agent sends its boot epoch");
    // Within a couple of seconds the relay has synced clocks with the agent.
    let mut synced = None;
    for _ in 0..60 {
        let f = frame(&mut p).await;
        if f["payload"]["relay"]["ageMs"].is_number() {
            synced = Some(f);
            break;
        }
    }
    let f = synced.expect("frames get an age once clocks are synced");
    let rel = &f["payload"]["relay"];
    assert_eq!(rel["verdict"], "ok");
    // Same host, same clock: the offset is small and the age is small and non-negative-ish.
    assert!(rel["clockOffsetMs"].as_f64().unwrap().abs() < 50.0, "{rel}");
    assert!(rel["ageMs"].as_f64().unwrap() > -50.0 && rel["ageMs"].as_f64().unwrap() < 2_000.0, "{rel}");
    let last_seq = f["payload"]["sequence"].as_u64().unwrap();

    // Restart the relay on the same port: the agent reconnects by itself and continues its
    // sequence without a reset (same epoch).
    drop(p);
    running.shutdown(Duration::from_secs(5)).await;
    let running = start(dir.path(), addr.port()).await;
    let mut p = pilot(addr, &key).await;
    let after = frame(&mut p).await;
    assert!(after["payload"]["sequence"].as_u64().unwrap() > last_seq, "{after} after {last_seq}");
    assert_eq!(after["payload"]["epoch"], first["payload"]["epoch"]);
    assert_eq!(after["payload"]["relay"]["verdict"], "ok", "no gap: frames are only produced while connected");
    assert!(agent.try_wait().unwrap().is_none(), "the agent is still running");
    agent.kill().await.unwrap();
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn refused_credentials_exit_with_code_3_and_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    running
        .relay
        .store
        .call_sync(|c| relay::auth::issue_device_sync(c, "boat-7", "default", "Boat 7").map(|_| ()))
        .unwrap();
    let config = write_config(dir.path(), running.addr, "wrong-secret");
    let out = tokio::time::timeout(Duration::from_secs(30), agent_cmd(&config).output())
        .await
        .expect("the agent gives up instead of retrying forever")
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused this device's credentials"), "{err}");
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn check_subcommand_reports_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, "serverAddress: \"http://relay/ws\"\n").unwrap();
    let out = std::process::Command::new(common::agent_bin()).args(["check", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("serverAddress") && err.contains("scheme"), "{err}");
    std::fs::write(&path, "serverAddress: \"ws://relay:8000/ws\"\nclientID: a\nclientSecret: b\n").unwrap();
    let out = std::process::Command::new(common::agent_bin()).args(["check", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success());
}

async fn admin(addr: std::net::SocketAddr, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let mut req = reqwest::Client::new().request(method, format!("http://{addr}{path}")).bearer_auth(ADMIN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.json().await.unwrap()
}

/// Waits for the relay to list one pending registration; returns its requestID.
async fn pending_request(addr: std::net::SocketAddr) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let list = admin(addr, reqwest::Method::GET, "/api/registrations?status=pending", None).await;
        if let Some(id) = list["registrations"][0]["requestID"].as_str() {
            return id.to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "the agent never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn agent_onboards_with_a_handshake_key_and_stores_its_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    let hk = admin(addr, reqwest::Method::POST, "/api/handshake-keys", Some(serde_json::json!({"label":"test"}))).await;
    let path = dir.path().join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "serverAddress: \"ws://{addr}/ws\"\nhandshakeKey: \"{}\"\nclientID: \"\"\nclientSecret: \"\"\nname: \"Client-1\"\nteamNotes: \"keep me\"\ncommandRestartMaxDelay: \"5m\"\npaths:\n  service-A:\n    runOnInit: \"/usr/bin/true\"\n    runOnInitRestart: \"yes\"\ntelemetry:\n  rateHz: 10\n  simulator: true\n  systemMetrics: false\n  udp: \"\"\n  unixSocket: \"\"\n",
            hk["key"].as_str().unwrap()
        ),
    )
    .unwrap();
    let mut agent = agent_cmd(&path).kill_on_drop(true).spawn().unwrap();
    let request = pending_request(addr).await;
    // While pending, the request id is kept in the config so a restart resumes polling. The
    // relay lists the request as soon as it is made, a moment before the agent has written it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&path).unwrap().contains(&request) {
        assert!(tokio::time::Instant::now() < deadline, "the agent never wrote registrationRequestID {request}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin(
        addr,
        reqwest::Method::POST,
        &format!("/api/registrations/{request}/approve"),
        Some(serde_json::json!({"deviceID":"boat-7"})),
    )
    .await;

    // The agent fetched its secret, saved it and connected with it.
    running
        .relay
        .store
        .call_sync(|c| q::create_operator(c, "op-p", "default", "pilot", OperatorRole::Pilot).map(|_| ()))
        .unwrap();
    running.relay.store.call_sync(|c| q::set_permission(c, "op-p", "org", "view")).unwrap();
    let key = running.relay.store.call_sync(|c| relay::auth::issue_api_key_sync(c, "op-p", None)).unwrap();
    let mut p = pilot(addr, &key).await;
    let f = frame(&mut p).await;
    assert_eq!(f["from"], "boat-7");
    let saved = device::Config::load(&path).unwrap();
    assert_eq!(saved.client_id, "boat-7");
    assert_eq!(saved.client_secret.len(), 64);
    assert!(saved.registration_request_id.is_none());
    assert!(
        saved.paths.contains_key("service-A") && saved.extra.contains_key("teamNotes"),
        "paths and unknown keys kept"
    );
    assert!(agent.try_wait().unwrap().is_none());
    agent.kill().await.unwrap();
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_rejected_registration_ends_the_agent_with_code_4() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    let hk = admin(addr, reqwest::Method::POST, "/api/handshake-keys", Some(serde_json::json!({}))).await;
    let path = dir.path().join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "serverAddress: \"ws://{addr}/ws\"\nhandshakeKey: \"{}\"\nname: \"Intruder\"\n",
            hk["key"].as_str().unwrap()
        ),
    )
    .unwrap();
    let agent = agent_cmd(&path).stderr(std::process::Stdio::piped()).kill_on_drop(true).spawn().unwrap();
    let request = pending_request(addr).await;
    admin(addr, reqwest::Method::POST, &format!("/api/registrations/{request}/reject"), None).await;
    let out = tokio::time::timeout(Duration::from_secs(60), agent.wait_with_output())
        .await
        .expect("the agent stops")
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rejected"), "{}", String::from_utf8_lossy(&out.stderr));

    // A wrong handshake key is refused at once with code 3, no busy loop.
    std::fs::write(&path, format!("serverAddress: \"ws://{addr}/ws\"\nhandshakeKey: \"not-a-real-key-123\"\n"))
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), agent_cmd(&path).output()).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_handshake_key"));
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_agent_gives_up_after_max_reconnect_attempts() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, format!("serverAddress: \"ws://127.0.0.1:{port}/ws\"\nclientID: boat-7\nclientSecret: x\n"))
        .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        agent_cmd(&path).env("MAX_RECONNECT_ATTEMPTS", "3").env("RECONNECT_INTERVAL", "0.1").output(),
    )
    .await
    .expect("the agent gives up")
    .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gave up after 3 failed connection attempts"), "{err}");
    assert_eq!(err.matches("reconnecting in").count(), 2, "three attempts, two waits: {err}");
    // A bad value in the environment is a configuration error.
    let out = std::process::Command::new(common::agent_bin())
        .arg("--config")
        .arg(&path)
        .env("RECONNECT_INTERVAL", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn a_silent_relay_is_detected_and_the_agent_reconnects() {
    // A fake relay: it authenticates the agent, then neither reads nor answers anything (a
    // half-dead 4G link looks like this: TCP stays up, nothing comes back).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, format!("serverAddress: \"ws://{addr}/ws\"\nclientID: boat-7\nclientSecret: x\nconnectionTimeout: 1.5\nreconnectInterval: 0.1\n")).unwrap();
    let mut agent = agent_cmd(&path).kill_on_drop(true).spawn().unwrap();

    let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await.unwrap().unwrap();
    let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
    let ok = json!({"type":"auth_ok","payload":{"clientID":"boat-7","role":"device","org":"default","relayTime":1.0,"pingIntervalMs":20000}});
    ws.send(Message::Text(ok.to_string().into())).await.unwrap();
    let silent_since = std::time::Instant::now();
    // Hold the socket without reading: no pongs, no answers. The agent must give up on it and
    // connect again on its own.
    let (tcp2, _) =
        tokio::time::timeout(Duration::from_secs(15), listener.accept()).await.expect("the agent reconnects").unwrap();
    let waited = silent_since.elapsed();
    assert!(waited >= Duration::from_millis(1400), "not before connectionTimeout: {waited:?}");
    drop((ws, tcp2));
    agent.kill().await.unwrap();
}

#[tokio::test]
async fn the_agent_verifies_wss_against_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let running = relay::start(RelayConfig {
        port: 0,
        bind: "127.0.0.1".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        admin_key: Some(ADMIN.into()),
        tls_cert: Some(cert_path.clone()),
        tls_key: Some(key_path),
        ..RelayConfig::default()
    })
    .await
    .unwrap();
    let secret =
        running.relay.store.call_sync(|c| relay::auth::issue_device_sync(c, "boat-7", "default", "Boat 7")).unwrap();
    let port = running.addr.port();
    let path = dir.path().join("config.yaml");

    // Without the private CA the relay's certificate is not trusted: the agent never connects.
    std::fs::write(
        &path,
        format!("serverAddress: \"wss://localhost:{port}/ws\"\nclientID: boat-7\nclientSecret: \"{secret}\"\n"),
    )
    .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        agent_cmd(&path).env("MAX_RECONNECT_ATTEMPTS", "2").env("RECONNECT_INTERVAL", "0.1").output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate"), "{err}");
    assert!(!running.relay.hub.is_online("boat-7"));

    // With caFile it verifies and connects.
    std::fs::write(
        &path,
        format!("serverAddress: \"wss://localhost:{port}/ws\"\nclientID: boat-7\nclientSecret: \"{secret}\"\ncaFile: \"{}\"\n", cert_path.display()),
    )
    .unwrap();
    let mut agent = agent_cmd(&path).kill_on_drop(true).spawn().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !running.relay.hub.is_online("boat-7") {
        assert!(tokio::time::Instant::now() < deadline, "the agent did not connect over wss");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(agent.try_wait().unwrap().is_none());
    agent.kill().await.unwrap();
    running.shutdown(Duration::from_secs(5)).await;
}
