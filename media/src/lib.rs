//! Media plumbing for Tether: GStreamer capture -> RTP -> WebRTC tracks (feature `gst`) and SFU
//! forwarding (feature `rtc`).
//!
//! Empty for now: live video is the subject of its own issues. The crate exists so the workspace
//! and the dependency direction (`signaling <- media <- {relay, device}`) are fixed from the start.

#[cfg(feature = "gst")]
pub mod gst;
#[cfg(feature = "rtc")]
pub mod rtc;
