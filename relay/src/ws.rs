//! WebSocket upgrade with our own `WebSocketConfig`.
//!
//! warp's `ws()` filter cannot set tungstenite's read buffer, which defaults to 128 KiB per
//! socket — too much for thousands of idle devices. hyper 1's `OnUpgrade` is `Clone` and sits in
//! the request's extensions, so this filter takes it, answers the handshake itself (101 with
//! `Sec-WebSocket-Accept`) and builds the `WebSocketStream` with [`socket_config`].

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use warp::Filter;
use warp::http::{HeaderValue, Response, StatusCode, header};

/// The upgraded socket type.
pub type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// A pending upgrade, extracted by [`upgrade`].
pub struct Upgrade {
    key: String,
    on_upgrade: Option<OnUpgrade>,
}

impl std::fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrade").finish_non_exhaustive()
    }
}

/// Limits for every relay socket. tungstenite itself accepts messages up to four times the
/// relay's limit: the relay refuses those above its limit itself, after reading them whole, so
/// the stream stays in sync and the `frame_too_large` error and the 1009 close reach the peer.
/// (When tungstenite refuses a frame, the rest of it stays unread, and closing a socket with
/// unread data makes the kernel send a reset that can destroy that close.)
pub fn socket_config(max_message_size: usize) -> WebSocketConfig {
    let hard_cap = max_message_size.saturating_mul(4).max(max_message_size + 64 * 1024);
    let mut c = WebSocketConfig::default();
    // Small read chunks: idle sockets stay small; busy ones still read 4 KiB per syscall.
    c.read_buffer_size = 4096;
    // The writer task feeds a batch of queued messages (up to 64) and then flushes once, so a
    // busy pilot's frames leave in one write instead of one syscall each. tungstenite writes
    // out early only if a batch outgrows this; idle sockets keep an empty buffer.
    c.write_buffer_size = 64 * 1024;
    c.max_write_buffer_size = 4 << 20;
    c.max_message_size = Some(hard_cap);
    c.max_frame_size = Some(hard_cap);
    c
}

/// Matches a WebSocket upgrade request (GET with `Upgrade: websocket` and a key).
pub fn upgrade() -> impl Filter<Extract = (Upgrade,), Error = warp::Rejection> + Clone {
    warp::get()
        .and(warp::header::<String>("upgrade"))
        .and(warp::header::<String>("sec-websocket-key"))
        .and(warp::header::optional::<String>("sec-websocket-version"))
        .and(warp::ext::optional::<OnUpgrade>())
        .and_then(|up: String, key: String, version: Option<String>, on_upgrade: Option<OnUpgrade>| async move {
            if !up.eq_ignore_ascii_case("websocket") || version.as_deref().is_some_and(|v| v.trim() != "13") {
                return Err(warp::reject::not_found());
            }
            Ok(Upgrade { key, on_upgrade })
        })
}

impl Upgrade {
    /// Answers the handshake and runs `f` on the socket once the upgrade completes.
    pub fn finish<F, Fut>(self, config: WebSocketConfig, f: F) -> Response<Bytes>
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Some(on_upgrade) = self.on_upgrade else {
            let mut r = Response::new(Bytes::from_static(b"connection cannot be upgraded"));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return r;
        };
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
                    f(ws).await;
                }
                Err(e) => tracing::debug!("websocket upgrade failed: {e}"),
            }
        });
        let mut r = Response::new(Bytes::new());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Ok(v) = HeaderValue::from_str(&derive_accept_key(self.key.as_bytes())) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        r
    }
}
