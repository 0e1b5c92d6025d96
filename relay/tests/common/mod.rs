//! Test harness: a real relay on 127.0.0.1:0 with a temporary SQLite store, and WebSocket
//! clients speaking the native protocol with tokio-tungstenite.
#![allow(dead_code)]

pub mod browser;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use relay::auth;
use relay::store::{OperatorRole, q};
use relay::{RelayConfig, RunningRelay};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, http::HeaderValue};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected message may take before the test fails (generous: CI is slow).
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestRelay {
    pub running: Option<RunningRelay>,
    pub dir: tempfile::TempDir,
    pub admin_key: String,
}

pub async fn start_relay() -> TestRelay {
    start_relay_with(|_| {}).await
}

pub async fn start_relay_with(tweak: impl FnOnce(&mut RelayConfig)) -> TestRelay {
    let dir = tempfile::tempdir().unwrap();
    let admin_key = format!("tk_testadmin_{}", auth::random_hex(16));
    let mut config = RelayConfig {
        port: 0,
        bind: "127.0.0.1".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        admin_key: Some(admin_key.clone()),
        ..RelayConfig::default()
    };
    tweak(&mut config);
    let running = relay::start(config).await.expect("relay starts");
    TestRelay { running: Some(running), dir, admin_key }
}

impl TestRelay {
    pub fn running(&self) -> &RunningRelay {
        self.running.as_ref().unwrap()
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.running().addr
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr())
    }

    pub fn create_org(&self, name: &str) {
        self.running().relay.store.call_sync(|c| q::create_org(c, name, name).map(|_| ())).unwrap();
    }

    /// Creates a device in `org` and returns its secret.
    pub fn create_device(&self, id: &str, org: &str) -> String {
        self.running().relay.store.call_sync(|c| auth::issue_device_sync(c, id, org, id)).unwrap()
    }

    /// Creates an operator `op-<username>` in `org` and returns an API key. Pilots get
    /// org-wide `admin` level on devices (use `create_pilot` for narrower access).
    pub fn create_operator(&self, username: &str, org: &str, role: OperatorRole) -> String {
        let access = (role == OperatorRole::Pilot).then_some("admin");
        self.create_operator_with(username, org, role, access)
    }

    /// A pilot with org-wide `access` (view, control, admin) or none.
    pub fn create_pilot(&self, username: &str, access: Option<&str>) -> String {
        self.create_operator_with(username, "default", OperatorRole::Pilot, access)
    }

    pub fn create_operator_with(&self, username: &str, org: &str, role: OperatorRole, access: Option<&str>) -> String {
        self.running()
            .relay
            .store
            .call_sync(|c| {
                let id = format!("op-{username}");
                q::create_operator(c, &id, org, username, role)?;
                if let Some(level) = access {
                    q::set_permission(c, &id, "org", level)?;
                }
                auth::issue_api_key_sync(c, &id, None)
            })
            .unwrap()
    }

    /// Grants `level` on `scope` to operator `op-<username>` through the admin API.
    pub async fn grant(&self, username: &str, scope: &str, level: &str) {
        let r = reqwest::Client::new()
            .put(self.http("/api/permissions"))
            .bearer_auth(&self.admin_key)
            .json(&json!({"operatorID": format!("op-{username}"), "scope": scope, "level": level}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    /// `GET path` with an optional bearer key: status and JSON body.
    pub async fn get_json(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        let mut req = reqwest::Client::new().get(self.http(path));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    /// `POST path` (empty body) with an optional bearer key: status and JSON body.
    pub async fn post_json(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        let mut req = reqwest::Client::new().post(self.http(path));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    /// The common scene: device `boat-1` connected and pilot `ana` subscribed to it.
    pub async fn boat_and_pilot(&self) -> (Client, Client) {
        let secret = self.create_device("boat-1", "default");
        let key = self.create_operator("ana", "default", OperatorRole::Pilot);
        let dev = self.device("boat-1", &secret).await;
        let mut pilot = self.operator(&key).await;
        subscribe(&mut pilot, "boat-1").await;
        (dev, pilot)
    }

    pub async fn ticket(&self, api_key: &str) -> String {
        let r =
            reqwest::Client::new().post(self.http("/api/auth/ws-ticket")).bearer_auth(api_key).send().await.unwrap();
        assert_eq!(r.status(), 200, "ticket request refused");
        let v: Value = r.json().await.unwrap();
        v["ticket"].as_str().unwrap().to_owned()
    }

    /// An operator connection, authenticated (auth_ok consumed).
    pub async fn operator(&self, api_key: &str) -> Client {
        let t = self.ticket(api_key).await;
        let mut c = Client::connect(&self.ws_url(&format!("/ws/admin?ticket={t}")), None).await;
        let ok = c.recv().await;
        assert_eq!(ok["type"], "auth_ok", "{ok}");
        c
    }

    /// A device connection with the bearer header, authenticated (auth_ok and the initial
    /// lease_state consumed).
    pub async fn device(&self, id: &str, secret: &str) -> Client {
        let mut c = Client::connect(&self.ws_url(&format!("/ws?clientID={id}")), Some(secret)).await;
        let ok = c.recv().await;
        assert_eq!(ok["type"], "auth_ok", "{ok}");
        let lease = c.recv().await;
        assert_eq!(lease["type"], "lease_state", "{lease}");
        c
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(Duration::from_secs(5)).await;
        }
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Client {
    pub ws: Ws,
    /// Added to this client's clock when it answers time_sync (simulates a skewed device clock).
    pub clock_offset_ms: f64,
    /// Answer time_sync automatically (devices) instead of returning it.
    pub auto_time_sync: bool,
}

pub fn now_ms() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64() * 1000.0
}

impl Client {
    pub async fn connect(url: &str, bearer: Option<&str>) -> Client {
        let mut req = url.into_client_request().unwrap();
        if let Some(b) = bearer {
            req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {b}")).unwrap());
        }
        let (ws, _) = tokio_tungstenite::connect_async(req).await.expect("websocket connects");
        Client { ws, clock_offset_ms: 0.0, auto_time_sync: true }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::Text(v.to_string().into())).await.unwrap();
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws.send(Message::Text(s.to_owned().into())).await.unwrap();
    }

    /// The next JSON message, answering time_sync and skipping ping/pong control frames.
    pub async fn recv(&mut self) -> Value {
        match self.try_recv(WAIT).await {
            Some(v) => v,
            None => panic!("no message within {WAIT:?}"),
        }
    }

    /// Like `recv`, but `None` on timeout or close.
    pub async fn try_recv(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()??;
            match m {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).expect("relay sends JSON");
                    if self.auto_time_sync && v["type"] == "time_sync" {
                        let t2 = now_ms() + self.clock_offset_ms;
                        let t1 = v["payload"]["t1"].clone();
                        self.send(json!({"type":"time_sync_response","payload":{"t1":t1,"t2":t2,"t3":t2}})).await;
                        continue;
                    }
                    return Some(v);
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// The next message of type `ty`, skipping others. One overall deadline, so a steady
    /// stream of other messages cannot keep a test waiting forever.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT * 3;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.try_recv(left).await.unwrap_or_else(|| panic!("no {ty:?} message within {:?}", WAIT * 3));
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// The next `webrtc` message other than the relay's `mode` announcements.
    pub async fn recv_signal(&mut self) -> Value {
        loop {
            let v = self.recv_type("webrtc").await;
            if v["payload"]["subtype"] != "mode" {
                return v;
            }
        }
    }

    /// Waits for the close frame; returns it (None if the socket just ended).
    pub async fn expect_close(&mut self) -> Option<CloseFrame> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("connection not closed within {WAIT:?}"),
                Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(Message::Close(f)))) => return f,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Sends one telemetry frame in the seed's shape.
    pub async fn telemetry(&mut self, sequence: u64, timestamp: f64, data: Value) {
        self.send(json!({"type":"telemetry","payload":{
            "subtype":"sensor_data","sequence":sequence,"timestamp":timestamp,"system_time":timestamp,"data":data}}))
            .await;
    }
}

/// An operator connection to a relay at `addr` (e.g. a relay binary the test started),
/// authenticated with `key` through a ticket; auth_ok consumed.
pub async fn operator_at(addr: &str, key: &str) -> Client {
    let t: Value = reqwest::Client::new()
        .post(format!("http://{addr}/api/auth/ws-ticket"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut c = Client::connect(&format!("ws://{addr}/ws/admin?ticket={}", t["ticket"].as_str().unwrap()), None).await;
    assert_eq!(c.recv().await["type"], "auth_ok");
    c
}

/// Subscribes and returns the `subscribed` answer.
pub async fn subscribe(c: &mut Client, device: &str) -> Value {
    c.send(json!({"type":"subscribe","correlationID":"sub-1","payload":{"deviceID":device}})).await;
    let v = c.recv().await;
    assert_eq!(v["type"], "subscribed", "{v}");
    v
}

/// Sends a JSON request with the admin key; returns status and JSON body.
pub async fn admin_call(r: &TestRelay, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    call(r, method, path, Some(&r.admin_key), body).await
}

/// Sends a JSON request with `key` (or none); returns status and JSON body.
pub async fn call(
    r: &TestRelay,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, r.http(path));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A relay serving HTTPS/WSS with a certificate made now (rcgen, for `localhost`), and a client
/// configuration that trusts exactly that certificate.
pub struct TlsRelay {
    pub relay: TestRelay,
    pub cert: rcgen::CertifiedKey<rcgen::KeyPair>,
    pub client: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
    /// The PEM files; removed when dropped.
    pub files: tempfile::TempDir,
}

pub async fn start_tls_relay() -> TlsRelay {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let files = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let relay = start_relay_with(|c| {
        c.tls_cert = Some(cert_path.clone());
        c.tls_key = Some(key_path.clone());
    })
    .await;
    let client = tls_client_config(&cert.cert);
    TlsRelay { relay, cert, client, files }
}

/// A rustls client configuration trusting only `trusted`.
pub fn tls_client_config(trusted: &rcgen::Certificate) -> std::sync::Arc<tokio_rustls::rustls::ClientConfig> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.der().clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}
