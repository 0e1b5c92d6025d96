//! Tether's wire protocol and sans-IO state machines.
//!
//! Nothing in this crate opens a socket, reads a clock or spawns a task: callers pass `now`
//! explicitly (milliseconds on whatever clock they own) and drive the state machines themselves.
//! That keeps every behaviour testable with synthetic time and lets the relay, the device agent
//! and the examples share one definition of the protocol.
//!
//! - [`message`]: the native envelope `{type, correlationID, clientID, from, payload}` and every
//!   message family, plus [`message::decode`], the fast decoder the relay uses on its hot path.
//! - [`error`]: stable error codes carried in `error` messages.
//! - [`sequence`]: [`SequenceTracker`], a per-stream verdict (ok, gap, duplicate, reordered, reset).
//! - [`clock`]: [`ClockSync`], NTP-style offset estimation from four timestamps.

pub mod clock;
pub mod error;
pub mod message;
pub mod sequence;

pub use clock::{ClockEstimate, ClockSample, ClockSync};
pub use error::ErrorCode;
pub use message::{Body, DecodeError, Envelope};
pub use sequence::{SequenceCounters, SequenceTracker, StreamSequence, Verdict};
