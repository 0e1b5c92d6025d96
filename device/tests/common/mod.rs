//! Shared harness for the agent binary tests: a real relay on port 0, the real agent binary
//! with its log captured, and pilots on real WebSockets.
#![allow(dead_code)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use relay::RelayConfig;
use relay::store::{OperatorRole, q};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;

#[cfg(feature = "video")]
pub mod video;

pub const ADMIN: &str = "tk_admin_0123456789abcdef";

/// A pilot's WebSocket.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The real agent binary: this package's build, or the binary named by `TETHER_AGENT_BIN` (to
/// run the tests against another build of the agent, e.g. the `release-small` one that ships).
pub fn agent_bin() -> std::ffi::OsString {
    std::env::var_os("TETHER_AGENT_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_tether-device").into())
}

/// The real agent binary ([`agent_bin`]), run with `config`.
pub fn agent_cmd(config: &std::path::Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(agent_bin());
    c.arg("--config").arg(config);
    c
}

/// A relay on `port` (0 for any) with its data in `dir`; `tune` adjusts the config.
pub async fn start_with(dir: &std::path::Path, port: u16, tune: impl FnOnce(&mut RelayConfig)) -> relay::RunningRelay {
    let mut config = RelayConfig {
        port,
        bind: "127.0.0.1".parse().unwrap(),
        data_dir: dir.to_owned(),
        admin_key: Some(ADMIN.into()),
        ping_interval: 1.0,
        ..RelayConfig::default()
    };
    tune(&mut config);
    relay::start(config).await.unwrap()
}

pub async fn start(dir: &std::path::Path, port: u16) -> relay::RunningRelay {
    start_with(dir, port, |_| {}).await
}

/// Device `boat-7` and operator `op-p` with `level` on the whole org; returns the device's
/// secret and the operator's API key.
pub fn fleet(running: &relay::RunningRelay, level: &'static str) -> (String, String) {
    running
        .relay
        .store
        .call_sync(move |c| {
            let s = relay::auth::issue_device_sync(c, "boat-7", "default", "Boat 7")?;
            q::create_operator(c, "op-p", "default", "pilot", OperatorRole::Pilot)?;
            q::set_permission(c, "op-p", "org", level)?;
            Ok((s, relay::auth::issue_api_key_sync(c, "op-p", None)?))
        })
        .unwrap()
}

/// An operator WebSocket (ticket exchange first, as the protocol requires).
pub async fn operator(addr: std::net::SocketAddr, key: &str) -> Ws {
    let t: Value = reqwest::Client::new()
        .post(format!("http://{addr}/api/auth/ws-ticket"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = format!("ws://{addr}/ws/admin?ticket={}", t["ticket"].as_str().unwrap());
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// An operator subscribed to boat-7's telemetry (and logs if asked).
pub async fn pilot_with(addr: std::net::SocketAddr, key: &str, replay: bool, logs: bool) -> Ws {
    let mut ws = operator(addr, key).await;
    send(&mut ws, serde_json::json!({"type":"subscribe","payload":{"deviceID":"boat-7","replay":replay,"logs":logs}}))
        .await;
    ws
}

pub async fn pilot(addr: std::net::SocketAddr, key: &str) -> Ws {
    pilot_with(addr, key, false, false).await
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next message matching `want`, within one overall deadline (other traffic keeps
/// arriving, so a per-message timeout would never fire).
pub async fn recv_until(ws: &mut Ws, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {what} in time"))
            .unwrap_or_else(|| panic!("link closed waiting for {what}"))
            .unwrap();
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if want(&v) {
                return v;
            }
        }
    }
}

/// The next message of type `ty`.
pub async fn recv_type(ws: &mut Ws, ty: &str) -> Value {
    recv_until(ws, ty, |v| v["type"] == ty).await
}

/// The next live telemetry frame; fails on a relay error.
pub async fn frame(ws: &mut Ws) -> Value {
    let v = recv_until(ws, "telemetry", |v| v["type"] == "telemetry" || v["type"] == "error").await;
    assert_ne!(v["type"], "error", "the relay refused: {v}");
    v
}

/// A running agent whose log lines can be awaited.
pub struct RunningAgent {
    pub child: tokio::process::Child,
    logs: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl RunningAgent {
    /// Spawns the agent; its log is echoed to the test's stderr as well.
    pub fn spawn(config: &std::path::Path, env: &[(&str, &str)]) -> RunningAgent {
        let mut cmd = agent_cmd(config);
        cmd.envs(env.iter().copied()).stderr(std::process::Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                eprintln!("agent: {l}");
                let _ = tx.send(l);
            }
        });
        RunningAgent { child, logs }
    }

    /// Waits for a log line containing `needle`.
    pub async fn wait_for_log(&mut self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, self.logs.recv()).await {
                Ok(Some(l)) if l.contains(needle) => return l,
                Ok(Some(_)) => {}
                Ok(None) => panic!("the agent exited before logging {needle:?}"),
                Err(_) => panic!("the agent never logged {needle:?}"),
            }
        }
    }
}

/// A UDP port that was free a moment ago.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
