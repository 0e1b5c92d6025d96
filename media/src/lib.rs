//! Media plumbing for Tether.
//!
//! - [`gst`] (feature `gst`): the capture and encoding pipeline (test pattern with a clock
//!   overlay, V4L2, RTSP, file; H.264 or VP8) producing RTP packets.
//! - [`rtc`] (feature `rtc`): the device's WebRTC sending peer, one per viewing pilot (webrtc
//!   0.21): answers the pilot's offer, trickles ICE, surfaces PLI/FIR, REMB/TWCC estimates and
//!   loss.
//! - `viewer` (feature `rtc`): the receiving side a pilot runs, for tests and tools; also the
//!   relay's upstream peer that receives a device's video.
//! - [`sfu`] (feature `rtc`): the relay's selective forwarding unit: one upstream per device,
//!   one sending peer per viewer, keyframe and bitrate feedback folded between them.
//!
//! The dependency direction is `signaling <- media <- {relay, device}`.

#[cfg(feature = "gst")]
pub mod gst;
#[cfg(feature = "rtc")]
pub mod rtc;
#[cfg(feature = "rtc")]
pub mod sfu;
#[cfg(feature = "rtc")]
pub mod viewer;
