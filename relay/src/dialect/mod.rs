//! Seed dialects: edge adapters that let clients written for other systems talk to Tether.
//!
//! A dialect connection is an ordinary [`crate::conn`] connection with a [`Codec`]: the codec
//! authenticates the peer's first message with ordinary Tether credentials, turns each frame the
//! peer sends into native messages (which then take exactly the native path: authorization, rate
//! limits, routing, the offline queue, metrics), and renders each native message the writer is
//! about to send in the dialect's shape. The hub never sees a dialect message.

use std::future::Future;
use std::pin::Pin;

use signaling::ErrorCode;

use crate::Relay;
use crate::auth::Identity;

pub mod boat;
pub mod monitoring;
pub mod softlab;

/// A boxed future, for the codec's asynchronous authentication.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What one dialect frame becomes on the way in.
#[derive(Debug)]
pub enum Inbound {
    /// Native messages, handled in order as if the peer had sent them.
    Native(Vec<String>),
    /// The frame cannot be expressed natively: answered with this native error (code, message,
    /// correlationID), which the writer renders in the dialect's error shape.
    Refuse(ErrorCode, String, Option<String>),
}

/// One connection's translation between a dialect and the native protocol.
pub trait Codec: Send + Sync + std::fmt::Debug + 'static {
    /// Authenticates the peer from its first text frame; `Err((code, message))` refuses it
    /// (the error is rendered by [`Codec::outbound`], then the connection closes with 1008).
    fn authenticate<'a>(
        &'a self,
        relay: &'a Relay,
        first: &'a str,
    ) -> BoxFuture<'a, Result<Identity, (ErrorCode, String)>>;

    /// Authentication from the HTTP upgrade alone (an `Authorization` header, a `?ticket=`),
    /// without waiting for a first message. `None` (the default): [`Codec::authenticate`] reads
    /// the first message.
    fn authenticate_upgrade<'a>(
        &'a self,
        _relay: &'a Relay,
    ) -> Option<BoxFuture<'a, Result<Identity, (ErrorCode, String)>>> {
        None
    }

    /// Native messages handled right after authentication, as if the peer had sent them
    /// (e.g. a `subscribe` for a stream endpoint).
    fn after_auth(&self, _who: &Identity) -> Vec<String> {
        Vec::new()
    }

    /// A frame from the peer.
    fn inbound(&self, text: &str) -> Inbound;

    /// A native message about to be written to the peer, in the dialect's shape; `None` when the
    /// dialect has nothing to show for it (housekeeping such as `time_sync` or `lease_state`).
    fn outbound(&self, native: &str) -> Option<String>;
}
