//! Connections to the relay: `ws://` over TCP, `wss://` over rustls with certificate
//! verification against the public web roots plus an optional private CA file; and the one HTTP
//! request the agent makes (registration status), over the same transport.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::{self, pki_types::pem::PemObject};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::client::Request;

/// A plain or TLS byte stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The agent's WebSocket to the relay.
pub type Socket = WebSocketStream<Box<dyn Io>>;

/// The TLS client configuration: public roots, plus the certificates in `ca_file`.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = ca_file {
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("caFile {}: {e}", path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("caFile {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("caFile {}: no certificate in it", path.display()));
        }
        for c in certs {
            roots.add(c).map_err(|e| format!("caFile {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Opens a TCP (and for `wss`/`https`, TLS) stream to the URL's host.
pub(crate) async fn open(url: &url::Url, tls: &Arc<rustls::ClientConfig>) -> Result<Box<dyn Io>, String> {
    let host = url.host_str().ok_or("the URL has no host")?.to_owned();
    let secure = matches!(url.scheme(), "wss" | "https");
    let port = url.port_or_known_default().unwrap_or(if secure { 443 } else { 80 });
    let tcp = tokio::time::timeout(Duration::from_secs(15), tokio::net::TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(|_| format!("connect to {host}:{port} timed out"))?
        .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if !secure {
        return Ok(Box::new(tcp));
    }
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
    let stream =
        tokio::time::timeout(Duration::from_secs(15), tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp))
            .await
            .map_err(|_| format!("TLS handshake with {host} timed out"))?
            .map_err(|e| format!("TLS with {host}: {e}"))?;
    Ok(Box::new(stream))
}

/// Opens the WebSocket described by `request` (its URI decides ws or wss).
pub async fn websocket(request: Request, tls: &Arc<rustls::ClientConfig>) -> Result<Socket, String> {
    let url = url::Url::parse(&request.uri().to_string()).map_err(|e| e.to_string())?;
    let io = open(&url, tls).await?;
    let (ws, _) = tokio::time::timeout(Duration::from_secs(15), tokio_tungstenite::client_async(request, io))
        .await
        .map_err(|_| "WebSocket handshake timed out".to_owned())?
        .map_err(|e| format!("WebSocket handshake: {e}"))?;
    Ok(ws)
}

/// `GET url`: the status code and the body as JSON (null if it is not JSON).
pub async fn get_json(url: &url::Url, tls: &Arc<rustls::ClientConfig>) -> Result<(u16, serde_json::Value), String> {
    let io = open(url, tls).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let host = url.host_str().unwrap_or_default().to_owned();
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let req = hyper::Request::get(path)
        .header("host", host)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(15), sender.send_request(req))
        .await
        .map_err(|_| "request timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)))
}
