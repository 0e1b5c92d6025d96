//! WebSocket upgrade with our own `WebSocketConfig`.
//!
//! warp's `ws()` filter cannot set tungstenite's read buffer, which defaults to 128 KiB per
//! socket — too much for thousands of idle devices. hyper 1's `OnUpgrade` is `Clone` and sits in
//! the request's extensions, so this filter takes it, answers the handshake itself (101 with
//! `Sec-WebSocket-Accept`) and builds the `WebSocketStream` with [`socket_config`].
//!
//! Under tungstenite sits [`LazyRead`]: tungstenite keeps a read buffer of `read_buffer_size`
//! per socket for the socket's whole life, and reads at most that much per call. `LazyRead`
//! reads from the kernel into one scratch buffer per thread ([`SCRATCH`] bytes) and keeps only
//! what tungstenite did not take yet, so tungstenite's own buffer can be small
//! ([`READ_CHUNK`]) while a busy socket still gets up to 16 KiB per `read` syscall.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use warp::Filter;
use warp::http::{HeaderValue, Response, StatusCode, header};

/// The upgraded socket type.
pub type Socket = WebSocketStream<LazyRead<TokioIo<hyper::upgrade::Upgraded>>>;

/// tungstenite's read buffer per socket (its `read_buffer_size`): kept for the socket's life,
/// and the most it asks for per read. [`LazyRead`] serves those reads from memory.
pub const READ_CHUNK: usize = 512;
/// Bytes read from the kernel per `read` syscall at most (one buffer per thread).
pub const SCRATCH: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// A socket whose reads go through a per-thread scratch buffer: an idle socket holds no read
/// buffer at all, a busy one holds only the bytes of its last read that the reader has not
/// taken yet (freed once taken).
#[derive(Debug)]
pub struct LazyRead<S> {
    inner: S,
    pending: Bytes,
}

impl<S> LazyRead<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        LazyRead { inner, pending: Bytes::new() }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LazyRead<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.pending.is_empty() {
            let n = this.pending.len().min(buf.remaining());
            buf.put_slice(&this.pending[..n]);
            this.pending.advance(n);
            if this.pending.is_empty() {
                // Release the allocation, not just the bytes.
                this.pending = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= SCRATCH {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        SCRATCH_BUF.with_borrow_mut(|scratch| {
            let mut tmp = ReadBuf::new(&mut scratch[..]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut tmp))?;
            let data = tmp.filled();
            let n = data.len().min(buf.remaining());
            buf.put_slice(&data[..n]);
            if n < data.len() {
                this.pending = Bytes::copy_from_slice(&data[n..]);
            }
            Poll::Ready(Ok(()))
        })
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LazyRead<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

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
    // Small: an idle socket keeps this much. Busy ones still read up to 16 KiB per syscall,
    // through `LazyRead`.
    c.read_buffer_size = READ_CHUNK;
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
                    let ws = WebSocketStream::from_raw_socket(
                        LazyRead::new(TokioIo::new(upgraded)),
                        Role::Server,
                        Some(config),
                    )
                    .await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Small reads get every byte, in order, from large kernel reads; the leftover is freed
    /// once taken; a large read goes straight to the socket.
    #[tokio::test]
    async fn lazy_read_serves_small_reads_from_one_large_read() {
        let (mut a, b) = tokio::io::duplex(64 * 1024);
        let sent: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        a.write_all(&sent).await.unwrap();
        let mut r = LazyRead::new(b);
        let mut got = Vec::new();
        let mut chunk = [0u8; READ_CHUNK];
        let n = r.read(&mut chunk).await.unwrap();
        assert_eq!(n, READ_CHUNK);
        got.extend_from_slice(&chunk[..n]);
        // One read from the socket took a whole scratch buffer; the rest of it waits in memory.
        assert_eq!(r.pending.len(), SCRATCH - READ_CHUNK);
        while got.len() < SCRATCH {
            let n = r.read(&mut chunk).await.unwrap();
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(r.pending.is_empty());
        let mut big = vec![0u8; SCRATCH];
        let mut rest = sent.len() - got.len();
        while rest > 0 {
            let n = r.read(&mut big).await.unwrap();
            assert!(r.pending.is_empty(), "a large read bypasses the scratch buffer");
            got.extend_from_slice(&big[..n]);
            rest -= n;
        }
        assert_eq!(got, sent);
        a.shutdown().await.unwrap();
        drop(a);
        assert_eq!(r.read(&mut chunk).await.unwrap(), 0);
    }
}
