//! The device speed test endpoints: `GET /api/device/speedtest?bytes=N` sends N bytes and
//! `POST /api/device/speedtest` counts what it reads; both authenticate the device with its
//! secret and `X-Client-ID`, cap transfers at 64 MiB, and work over plain HTTP and TLS alike.

mod common;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::ServerName;

const CAP: u64 = 64 * 1024 * 1024;

fn get(r: &TestRelay, query: &str, id: Option<&str>, secret: Option<&str>) -> reqwest::RequestBuilder {
    with_creds(reqwest::Client::new().get(r.http(&format!("/api/device/speedtest{query}"))), id, secret)
}

fn post(r: &TestRelay, id: Option<&str>, secret: Option<&str>) -> reqwest::RequestBuilder {
    with_creds(reqwest::Client::new().post(r.http("/api/device/speedtest")), id, secret)
}

fn with_creds(mut req: reqwest::RequestBuilder, id: Option<&str>, secret: Option<&str>) -> reqwest::RequestBuilder {
    if let Some(id) = id {
        req = req.header("x-client-id", id);
    }
    if let Some(s) = secret {
        req = req.bearer_auth(s);
    }
    req
}

async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Reads a whole `Connection: close` HTTP/1.1 response: status code, headers, body.
async fn read_response(mut s: impl AsyncRead + Unpin) -> (u16, String, Vec<u8>) {
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await.expect("response within the deadline") {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete header") + 4;
    let head = String::from_utf8(raw[..end].to_vec()).unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head, raw[end..].to_vec())
}

#[tokio::test]
async fn download_sends_the_bytes_asked_for() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");

    for n in [0u64, 1, 65_536, 65_537, 3_000_000] {
        let resp = get(&r, &format!("?bytes={n}"), Some("boat-1"), Some(&secret)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/octet-stream");
        assert_eq!(resp.headers()["content-length"], n.to_string().as_str());
        assert_eq!(resp.bytes().await.unwrap().len() as u64, n);
    }
    // Without `bytes`: 1 MiB.
    let resp = get(&r, "", Some("boat-1"), Some(&secret)).send().await.unwrap();
    assert_eq!(resp.bytes().await.unwrap().len(), 1024 * 1024);
    // The cap itself is allowed (read as a stream, not held in memory here).
    let mut resp = get(&r, &format!("?bytes={CAP}"), Some("boat-1"), Some(&secret)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut total = 0u64;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        total += chunk.len() as u64;
    }
    assert_eq!(total, CAP);

    // Over the cap, or not a number: 400 with the API's error shape.
    let (status, body) =
        json_of(get(&r, &format!("?bytes={}", CAP + 1), Some("boat-1"), Some(&secret)).send().await.unwrap()).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_request");
    assert!(body["error"]["message"].as_str().unwrap().contains("64 MiB"), "{body}");
    let (status, _) = json_of(get(&r, "?bytes=lots", Some("boat-1"), Some(&secret)).send().await.unwrap()).await;
    assert_eq!(status, 400);
    r.stop().await;
}

#[tokio::test]
async fn upload_counts_the_body() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    for n in [0usize, 10, 5_000_000] {
        let (status, body) =
            json_of(post(&r, Some("boat-1"), Some(&secret)).body(vec![7u8; n]).send().await.unwrap()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["bytes"], n as u64);
        assert!(body["ms"].as_f64().unwrap() >= 0.0);
    }

    // A declared length over the cap is refused before the body is read. Raw HTTP, so the
    // test need not send 64 MiB: only the header promises it.
    let mut s = tokio::net::TcpStream::connect(r.addr()).await.unwrap();
    let req = format!(
        "POST /api/device/speedtest HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {secret}\r\n\
         X-Client-ID: boat-1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        CAP + 1
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let (status, _, body) = read_response(s).await;
    assert_eq!(status, 413);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
    r.stop().await;
}

#[tokio::test]
async fn both_need_the_device_credentials() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let other = r.create_device("boat-2", "default");
    let cases: [(Option<&str>, Option<&str>); 5] = [
        (None, None),
        (Some("boat-1"), None),
        (None, Some(&secret)),
        (Some("boat-1"), Some(&other)),
        (Some("nope"), Some(&secret)),
    ];
    for (id, s) in cases {
        let (status, body) = json_of(get(&r, "?bytes=10", id, s).send().await.unwrap()).await;
        assert_eq!(status, 401, "GET with {id:?}: {body}");
        assert_eq!(body["error"]["code"], "auth_failed");
        let (status, body) = json_of(post(&r, id, s).body(vec![0u8; 10]).send().await.unwrap()).await;
        assert_eq!(status, 401, "POST with {id:?}: {body}");
        assert_eq!(body["error"]["code"], "auth_failed");
    }
    // An operator's API key is not a device credential.
    let (status, _) = json_of(get(&r, "?bytes=10", Some("boat-1"), Some(&r.admin_key)).send().await.unwrap()).await;
    assert_eq!(status, 401);
    // Authentication comes before the size checks.
    let (status, _) = json_of(get(&r, &format!("?bytes={}", CAP + 1), None, None).send().await.unwrap()).await;
    assert_eq!(status, 401);
    r.stop().await;
}

#[tokio::test]
async fn works_over_tls_on_the_same_port() {
    let TlsRelay { relay: r, client: config, files: _files, .. } = start_tls_relay().await;
    let secret = r.create_device("boat-1", "default");
    let connect = async || {
        let tcp = tokio::net::TcpStream::connect(r.addr()).await.unwrap();
        tokio_rustls::TlsConnector::from(config.clone())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    };

    let mut s = connect().await;
    let req = format!(
        "GET /api/device/speedtest?bytes=200000 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {secret}\r\n\
         X-Client-ID: boat-1\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let (status, head, body) = read_response(s).await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(body.len(), 200_000);

    let mut s = connect().await;
    let payload = vec![1u8; 300_000];
    let req = format!(
        "POST /api/device/speedtest HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {secret}\r\n\
         X-Client-ID: boat-1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(&payload).await.unwrap();
    let (status, head, body) = read_response(s).await;
    assert_eq!(status, 200, "{head}");
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["bytes"], 300_000);

    let mut s = connect().await;
    s.write_all(b"GET /api/device/speedtest?bytes=10 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(s).await.0, 401);
    r.stop().await;
}
