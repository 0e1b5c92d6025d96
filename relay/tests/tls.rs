//! The relay serves HTTPS and WSS itself when given a certificate and key. The certificate
//! is made here at test time (rcgen); clients trust exactly it.

mod common;
use std::sync::Arc;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

async fn tls_connect(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config).connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

#[tokio::test]
async fn https_and_wss_with_a_certificate_made_at_test_time() {
    let TlsRelay { relay: r, client: config, files: _files, .. } = start_tls_relay().await;
    let secret = r.create_device("boat-1", "default");

    // HTTPS: /health over TLS.
    let mut s = tls_connect(r.addr(), config.clone()).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"status\":\"ok\""));

    // WSS: a device authenticates and gets its answers.
    let tls = tls_connect(r.addr(), config.clone()).await.unwrap();
    let mut req = "wss://localhost/ws?clientID=boat-1".into_client_request().unwrap();
    req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {secret}")).unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    let next_type = async |ws: &mut tokio_tungstenite::WebSocketStream<_>| loop {
        let m = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        if let Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["type"] != "time_sync" && v["type"] != "lease_state" {
                return v["type"].as_str().unwrap().to_owned();
            }
        }
    };
    assert_eq!(next_type(&mut ws).await, "auth_ok");
    ws.send(Message::Text(json!({"type":"ping","payload":{}}).to_string().into())).await.unwrap();
    assert_eq!(next_type(&mut ws).await, "pong");

    // A client that does not trust the certificate cannot connect; plain HTTP gets nothing.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    assert!(tls_connect(r.addr(), tls_client_config(&other.cert)).await.is_err());
    let plain = reqwest::get(r.http("/health")).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    r.stop().await;
}

#[tokio::test]
async fn a_bad_certificate_is_a_clear_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, "not a certificate").unwrap();
    std::fs::write(&key_path, "not a key").unwrap();
    let err = relay::start(relay::RelayConfig {
        port: 0,
        bind: "127.0.0.1".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        tls_cert: Some(cert_path),
        tls_key: Some(key_path),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
}
