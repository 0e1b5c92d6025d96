//! `speed_test`: round trip, download and upload against the relay's
//! `/api/device/speedtest` endpoint, on one keep-alive HTTP connection over the same transport
//! as the WebSocket (TLS with the same trust for `wss://`). The device authenticates with its
//! own credentials (`X-Client-ID` and `Authorization: Bearer <clientSecret>`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use signaling::message::SpeedTestResult;
use tokio_rustls::rustls;

/// Bytes moved each way when the request does not say (1 MiB: a few seconds on a poor 4G link).
pub const DEFAULT_BYTES: u64 = 1 << 20;
/// The most a request may ask for each way.
pub const MAX_BYTES: u64 = 64 << 20;
/// Round trips measured (the median is reported).
const PINGS: usize = 5;
/// Longest a whole test may take.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The endpoint URL for a relay at `server_address` (`ws://host:port/ws` ->
/// `http://host:port/api/device/speedtest`; a path prefix before `/ws` is kept).
pub fn endpoint(server_address: &str) -> Result<url::Url, String> {
    let mut u = url::Url::parse(server_address).map_err(|e| format!("serverAddress: {e}"))?;
    let scheme = if u.scheme() == "wss" { "https" } else { "http" };
    u.set_scheme(scheme).map_err(|_| "serverAddress: cannot derive the HTTP URL".to_owned())?;
    let base = u.path().trim_end_matches('/').trim_end_matches("/ws").to_owned();
    u.set_path(&format!("{base}/api/device/speedtest"));
    u.set_query(None);
    Ok(u)
}

/// Runs the test, moving `bytes` each way.
pub async fn run(
    server_address: &str,
    client_id: &str,
    secret: &str,
    tls: &Arc<rustls::ClientConfig>,
    bytes: u64,
) -> Result<SpeedTestResult, String> {
    if bytes > MAX_BYTES {
        return Err(format!("bytes: at most {MAX_BYTES} per direction, asked for {bytes}"));
    }
    let work = async {
        let url = endpoint(server_address)?;
        let io = crate::net::open(&url, tls).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(io))
            .await
            .map_err(|e| format!("speed test connection: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let host = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_owned(),
        };
        let path = url.path().to_owned();
        let mut call = async |method: hyper::Method, query: String, body: Bytes| -> Result<(u64, Duration), String> {
            sender.ready().await.map_err(|e| e.to_string())?;
            let req = hyper::Request::builder()
                .method(method)
                .uri(format!("{path}{query}"))
                .header("host", &host)
                .header("x-client-id", client_id)
                .header("authorization", format!("Bearer {secret}"))
                .body(Full::new(body))
                .map_err(|e| e.to_string())?;
            let start = Instant::now();
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let mut body = resp.into_body();
            let mut received = 0u64;
            let mut text = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| e.to_string())?;
                if let Some(d) = frame.data_ref() {
                    received += d.len() as u64;
                    if !status.is_success() && text.len() < 4096 {
                        text.extend_from_slice(d);
                    }
                }
            }
            if !status.is_success() {
                return Err(format!("the relay answered {status}: {}", String::from_utf8_lossy(&text)));
            }
            Ok((received, start.elapsed()))
        };
        let mut rtts = Vec::with_capacity(PINGS);
        for _ in 0..PINGS {
            let (_, t) = call(hyper::Method::GET, "?bytes=0".into(), Bytes::new()).await?;
            rtts.push(t.as_secs_f64() * 1000.0);
        }
        rtts.sort_by(f64::total_cmp);
        let rtt_ms = rtts[PINGS / 2];
        let (got, t) = call(hyper::Method::GET, format!("?bytes={bytes}"), Bytes::new()).await?;
        if got != bytes {
            return Err(format!("download: expected {bytes} bytes, received {got}"));
        }
        let download_mbps = mbps(bytes, t, rtt_ms);
        let (_, t) = call(hyper::Method::POST, String::new(), Bytes::from(vec![0u8; bytes as usize])).await?;
        let upload_mbps = mbps(bytes, t, rtt_ms);
        Ok(SpeedTestResult {
            upload_mbps: Some(upload_mbps),
            download_mbps: Some(download_mbps),
            rtt_ms: Some((rtt_ms * 100.0).round() / 100.0),
        })
    };
    tokio::time::timeout(TEST_TIMEOUT, work)
        .await
        .map_err(|_| format!("the speed test did not finish in {} s", TEST_TIMEOUT.as_secs()))?
}

/// Throughput in Mbit/s over a transfer that took `t`, less one round trip of request latency.
fn mbps(bytes: u64, t: Duration, rtt_ms: f64) -> f64 {
    let secs = (t.as_secs_f64() - rtt_ms / 1000.0).max(t.as_secs_f64() / 2.0).max(1e-6);
    ((bytes as f64 * 8.0 / secs / 1e6) * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_follows_the_server_address() {
        assert_eq!(endpoint("ws://h:8000/ws").unwrap().as_str(), "http://h:8000/api/device/speedtest");
        assert_eq!(endpoint("wss://h/tether/ws").unwrap().as_str(), "https://h/tether/api/device/speedtest");
        assert_eq!(endpoint("ws://h:8000/ws?clientID=x").unwrap().as_str(), "http://h:8000/api/device/speedtest");
    }

    #[test]
    fn throughput_figures() {
        assert_eq!(mbps(1_000_000, Duration::from_secs(1), 0.0), 8.0);
        assert!(mbps(1, Duration::ZERO, 0.0).is_finite());
    }
}
