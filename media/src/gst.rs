//! GStreamer capture and encoding: one live pipeline per camera, whose RTP packets reach the WebRTC
//! side through a bounded channel.
//!
//! How to drive it: call [`init`] once, build [`VideoSettings`] from config, [`VideoPipeline::start`]
//! it with the sending half of a bounded `tokio::sync::mpsc` channel, and read the receiving half:
//! each item is one RTP packet (payload type 96, at most 1200 bytes) ready for a webrtc-crate
//! `TrackLocalStaticRTP`. Feed the receiver's feedback back in: a bandwidth estimate (REMB, TWCC or
//! loss) through [`VideoPipeline::set_bitrate`], a PLI/FIR through [`VideoPipeline::request_keyframe`].
//!
//! One pipeline can encode the source in both codecs at once: [`VideoPipeline::add_codec`] adds
//! an encoder (its own channel) behind the same source, [`VideoPipeline::remove_codec`] takes
//! one out, and the `_for` methods address one codec's encoder.
//!
//! The channel is never waited on: when it is full the packet is dropped and counted in
//! [`PipelineStats::dropped_packets`], so a slow consumer costs frames, not capture latency.
//!
//! A pipeline ends when its source does (the end of a file) or when it fails (camera unplugged, RTSP
//! server gone, encoder error). Either way the packet channel closes, so `recv()` returns `None`,
//! and [`VideoPipeline::error`] says why (`None` after a clean end of stream). Every bus error and
//! warning is also logged with `tracing`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;
use tokio::sync::mpsc;

/// Largest RTP packet the payloaders produce: leaves room for SRTP, TURN and VPN overheads under
/// a 1500-byte path MTU.
pub const RTP_MTU: u32 = 1200;

/// Dynamic RTP payload type used for both codecs; the WebRTC side rewrites it to the negotiated one.
pub const RTP_PAYLOAD_TYPE: u32 = 96;

/// Forced keyframes are at most this close together (ns): a burst of PLIs from several viewers
/// costs one keyframe per interval instead of one per request. Later requests wait, not vanish.
const MIN_FORCED_KEYFRAME_INTERVAL_NS: u64 = 250_000_000;

/// Name of the application message that tells the bus thread to finish.
const STOP_MESSAGE: &str = "tether-stop";

/// Why a pipeline could not be built, started, or kept running.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// `gst_init` failed: the GStreamer libraries are missing or broken.
    #[error(
        "GStreamer could not be initialised ({reason}): install the Debian packages libgstreamer1.0-0 and gstreamer1.0-plugins-base"
    )]
    Init { reason: String },
    /// A GStreamer element the pipeline needs is not installed.
    #[error("GStreamer element `{element}` (plugin {plugin}) is missing: install the Debian package {package}")]
    MissingElement { element: &'static str, plugin: &'static str, package: &'static str },
    /// A video source string (config or flag) could not be parsed.
    #[error("invalid video source `{input}`: {reason}")]
    InvalidSource { input: String, reason: &'static str },
    /// A codec name other than `h264` or `vp8`.
    #[error("unknown video codec `{0}`: expected h264 or vp8")]
    InvalidCodec(String),
    /// Settings that no pipeline can satisfy (zero size, min bitrate above max, ...).
    #[error("invalid video settings: {0}")]
    InvalidSettings(String),
    /// The V4L2 device named in the settings does not exist.
    #[error("V4L2 camera {} does not exist (is the camera plugged in, and is the path right?)", .path.display())]
    DeviceNotFound { path: PathBuf },
    /// The file source names a file that does not exist.
    #[error("video file {} does not exist", .path.display())]
    FileNotFound { path: PathBuf },
    /// The pipeline could not be assembled (elements refused to link).
    #[error("could not build the video pipeline: {0}")]
    Build(String),
    /// An element reported an error while starting or streaming.
    #[error("GStreamer element `{element}` failed: {message}")]
    Pipeline { element: String, message: String, debug: Option<String> },
}

/// Initialises GStreamer once per process; later calls return the first call's result.
pub fn init() -> Result<(), MediaError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| gst::init().map_err(|e| e.to_string())).clone().map_err(|reason| MediaError::Init { reason })
}

/// Video codec sent to the browser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Codec {
    /// H.264 constrained baseline (profile-level-id 42e01f): every browser decodes it, often in hardware.
    #[default]
    H264,
    /// VP8: software everywhere, but resilient and royalty free.
    Vp8,
}

impl Codec {
    /// The WebRTC codec MIME type (`RTCRtpCodecCapability::mime_type`).
    pub fn mime(&self) -> &'static str {
        match self {
            Codec::H264 => "video/H264",
            Codec::Vp8 => "video/VP8",
        }
    }
}

impl FromStr for Codec {
    type Err = MediaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "h264" | "h.264" | "avc" => Ok(Codec::H264),
            "vp8" => Ok(Codec::Vp8),
            _ => Err(MediaError::InvalidCodec(s.to_string())),
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Codec::H264 => "h264",
            Codec::Vp8 => "vp8",
        })
    }
}

/// Where the frames come from.
///
/// Parsed from the strings used in config and flags: `testpattern`, `v4l2:/dev/video0` (or just
/// `/dev/video0`), `rtsp://camera/stream`, `file:/path/clip.mp4`. `Display` writes the same form back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Source {
    /// `videotestsrc` with the wall-clock time (UTC, milliseconds) burnt in, so glass-to-glass
    /// latency can be read off a received frame.
    #[default]
    TestPattern,
    /// A V4L2 camera (`v4l2src`).
    V4l2 { device: PathBuf },
    /// An IP camera's RTSP stream, decoded and re-encoded (`rtspsrc latency=0 ! decodebin`).
    Rtsp { url: String },
    /// A media file, played once in real time (`filesrc ! decodebin`).
    File { path: PathBuf },
}

const SOURCE_FORMS: &str =
    "expected testpattern, v4l2:/dev/videoN, /dev/videoN, rtsp://host/path or file:/path/clip.mp4";

impl FromStr for Source {
    type Err = MediaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let input = s.trim();
        let invalid = |reason| MediaError::InvalidSource { input: s.to_string(), reason };
        if input.is_empty() {
            return Err(invalid(
                "the source is empty; expected testpattern, v4l2:/dev/videoN, rtsp://... or file:/path",
            ));
        }
        if input.eq_ignore_ascii_case("testpattern") || input.eq_ignore_ascii_case("test-pattern") {
            return Ok(Source::TestPattern);
        }
        if let Some(device) = input.strip_prefix("v4l2:") {
            let device = device.strip_prefix("//").unwrap_or(device);
            if device.is_empty() {
                return Err(invalid("v4l2: needs a device path, e.g. v4l2:/dev/video0"));
            }
            if !device.starts_with('/') {
                return Err(invalid("the V4L2 device must be an absolute path, e.g. v4l2:/dev/video0"));
            }
            return Ok(Source::V4l2 { device: PathBuf::from(device) });
        }
        if input.starts_with("/dev/") {
            return Ok(Source::V4l2 { device: PathBuf::from(input) });
        }
        let lower = input.to_ascii_lowercase();
        if lower.starts_with("rtsp://") || lower.starts_with("rtsps://") || lower.starts_with("rtspt://") {
            let rest = &input[input.find("://").map_or(0, |i| i + 3)..];
            if rest.is_empty() || rest.starts_with('/') {
                return Err(invalid("the RTSP URL has no host, e.g. rtsp://192.0.2.10:554/stream"));
            }
            return Ok(Source::Rtsp { url: input.to_string() });
        }
        if let Some(path) = input.strip_prefix("file:") {
            // Accept both `file:/p` and the URI form `file:///p`.
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(invalid("file: needs a path, e.g. file:/srv/clip.mp4"));
            }
            return Ok(Source::File { path: PathBuf::from(path) });
        }
        Err(invalid(SOURCE_FORMS))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::TestPattern => f.write_str("testpattern"),
            Source::V4l2 { device } => write!(f, "v4l2:{}", device.display()),
            Source::Rtsp { url } => f.write_str(url),
            Source::File { path } => write!(f, "file:{}", path.display()),
        }
    }
}

/// Everything a pipeline is built from; the device agent fills it from its config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoSettings {
    /// Where frames come from.
    pub source: Source,
    /// Codec offered to the browser.
    pub codec: Codec,
    /// Encoded width in pixels (the source is scaled, letterboxed if its aspect differs).
    pub width: u32,
    /// Encoded height in pixels.
    pub height: u32,
    /// Encoded frames per second (the source's frames are dropped or duplicated to match).
    pub framerate: u32,
    /// Bitrate at start, before the receiver's estimate arrives, in kbit/s.
    pub bitrate_kbps: u32,
    /// Floor for [`VideoPipeline::set_bitrate`]: below it the picture is not worth sending.
    pub min_bitrate_kbps: u32,
    /// Ceiling for [`VideoPipeline::set_bitrate`]: what the uplink is allowed to carry.
    pub max_bitrate_kbps: u32,
    /// Seconds between the encoder's own keyframes (default 2), so a lost keyframe costs at
    /// most that long even when no receiver asks for one. Longer saves uplink; receivers'
    /// keyframe requests (PLI/FIR) are served whatever it is.
    pub keyframe_interval_s: u32,
}

impl Default for VideoSettings {
    fn default() -> Self {
        VideoSettings {
            source: Source::TestPattern,
            codec: Codec::H264,
            width: 640,
            height: 480,
            framerate: 30,
            bitrate_kbps: 1_000,
            min_bitrate_kbps: 150,
            max_bitrate_kbps: 4_000,
            keyframe_interval_s: 2,
        }
    }
}

impl VideoSettings {
    /// Checks what GStreamer would otherwise reject later, with less helpful words.
    pub fn validate(&self) -> Result<(), MediaError> {
        let bad = |m: String| Err(MediaError::InvalidSettings(m));
        if self.width < 16 || self.height < 16 || self.width > 7680 || self.height > 4320 {
            return bad(format!("size {}x{} is outside 16x16..7680x4320", self.width, self.height));
        }
        if !self.width.is_multiple_of(2) || !self.height.is_multiple_of(2) {
            return bad(format!("size {}x{} must be even (4:2:0 chroma)", self.width, self.height));
        }
        if self.framerate == 0 || self.framerate > 120 {
            return bad(format!("frame rate {} is outside 1..=120", self.framerate));
        }
        if self.min_bitrate_kbps == 0 || self.min_bitrate_kbps > self.max_bitrate_kbps {
            return bad(format!(
                "bitrate bounds {}..{} kbit/s must satisfy 0 < min <= max",
                self.min_bitrate_kbps, self.max_bitrate_kbps
            ));
        }
        if self.max_bitrate_kbps > 100_000 {
            return bad(format!("max bitrate {} kbit/s is above 100000", self.max_bitrate_kbps));
        }
        Ok(())
    }

    fn clamp_bitrate(&self, kbps: u32) -> u32 {
        kbps.clamp(self.min_bitrate_kbps, self.max_bitrate_kbps)
    }

    /// Frames between the encoder's own keyframes.
    fn keyframe_interval(&self) -> u32 {
        self.framerate * self.keyframe_interval_s.clamp(1, 3600)
    }
}

/// Counters since [`VideoPipeline::start`]; cheap to read, safe to poll from a stats task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PipelineStats {
    /// RTP packets handed to the channel.
    pub packets: u64,
    /// Bytes of those packets (RTP header included).
    pub bytes: u64,
    /// Packets dropped because the channel was full or already closed.
    pub dropped_packets: u64,
    /// Calls to [`VideoPipeline::request_keyframe`].
    pub keyframes_requested: u64,
    /// Bitrate currently asked of the encoder, in kbit/s.
    pub bitrate_kbps: u32,
    /// The source reached its end (a file source played out).
    pub ended: bool,
    /// The pipeline died; [`VideoPipeline::error`] says why.
    pub failed: bool,
}

/// An encoder the pipeline knows how to configure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoder {
    Vaapi,
    V4l2,
    Nvenc,
    X264,
    Vp8,
}

impl Encoder {
    /// Hardware H.264 encoders, best first; x264enc is the fallback.
    const HARDWARE_H264: [Encoder; 3] = [Encoder::Vaapi, Encoder::V4l2, Encoder::Nvenc];

    fn factory(self) -> &'static str {
        match self {
            Encoder::Vaapi => "vaapih264enc",
            Encoder::V4l2 => "v4l2h264enc",
            Encoder::Nvenc => "nvh264enc",
            Encoder::X264 => "x264enc",
            Encoder::Vp8 => "vp8enc",
        }
    }

    fn configure(self, enc: &gst::Element, settings: &VideoSettings, kbps: u32) {
        let gop = u64::from(settings.keyframe_interval());
        set_number(enc, "min-force-key-unit-interval", MIN_FORCED_KEYFRAME_INTERVAL_NS);
        match self {
            Encoder::X264 => {
                set_str(enc, "tune", "zerolatency");
                set_str(enc, "speed-preset", "ultrafast");
                set_number(enc, "key-int-max", gop);
                set_number(enc, "bframes", 0);
            }
            Encoder::Vaapi => {
                set_str(enc, "rate-control", "cbr");
                set_number(enc, "keyframe-period", gop);
                set_number(enc, "max-bframes", 0);
            }
            Encoder::Nvenc => {
                set_str(enc, "preset", "low-latency-hq");
                set_str(enc, "rc-mode", "cbr");
                set_number(enc, "gop-size", gop);
                set_number(enc, "bframes", 0);
                set_bool(enc, "zerolatency", true);
            }
            Encoder::V4l2 => {}
            Encoder::Vp8 => {
                set_number(enc, "deadline", 1);
                set_number(enc, "cpu-used", 8);
                set_str(enc, "end-usage", "cbr");
                set_number(enc, "lag-in-frames", 0);
                set_number(enc, "keyframe-max-dist", gop);
                set_str(enc, "error-resilient", "default");
            }
        }
        self.apply_bitrate(enc, settings, kbps);
    }

    fn apply_bitrate(self, enc: &gst::Element, settings: &VideoSettings, kbps: u32) {
        let applied = match self {
            Encoder::X264 | Encoder::Vaapi | Encoder::Nvenc => set_number(enc, "bitrate", u64::from(kbps)),
            Encoder::Vp8 => set_number(enc, "target-bitrate", u64::from(kbps) * 1000),
            Encoder::V4l2 => {
                let controls = gst::Structure::builder("controls")
                    .field("video_bitrate", (kbps * 1000) as i32)
                    .field("h264_i_frame_period", settings.keyframe_interval() as i32)
                    .build();
                enc.find_property("extra-controls").is_some() && {
                    enc.set_property("extra-controls", controls);
                    true
                }
            }
        };
        if !applied {
            tracing::warn!(encoder = self.factory(), kbps, "encoder has no bitrate property; bitrate unchanged");
        }
    }

    fn bitrate_kbps(self, enc: &gst::Element) -> Option<u32> {
        let (name, divisor) = match self {
            Encoder::X264 | Encoder::Vaapi | Encoder::Nvenc => ("bitrate", 1),
            Encoder::Vp8 => ("target-bitrate", 1000),
            Encoder::V4l2 => return None,
        };
        enc.find_property(name)?;
        let value = enc.property_value(name);
        let raw = value.get::<u32>().map(u64::from).or_else(|_| value.get::<i32>().map(|v| v.max(0) as u64)).ok()?;
        u32::try_from(raw / divisor).ok()
    }
}

/// Sets a numeric property whatever its integer type, clamped to the property's range: GLib
/// panics on out-of-range values and encoders differ in how they declare them.
fn set_number(element: &gst::Element, name: &str, value: u64) -> bool {
    let Some(pspec) = element.find_property(name) else {
        return false;
    };
    let v = value.min(i64::MAX as u64) as i64;
    let value = if let Some(p) = pspec.downcast_ref::<glib::ParamSpecUInt>() {
        (v.clamp(i64::from(p.minimum()), i64::from(p.maximum())) as u32).to_value()
    } else if let Some(p) = pspec.downcast_ref::<glib::ParamSpecInt>() {
        (v.clamp(i64::from(p.minimum()), i64::from(p.maximum())) as i32).to_value()
    } else if let Some(p) = pspec.downcast_ref::<glib::ParamSpecUInt64>() {
        (v as u64).clamp(p.minimum(), p.maximum()).to_value()
    } else if let Some(p) = pspec.downcast_ref::<glib::ParamSpecInt64>() {
        v.clamp(p.minimum(), p.maximum()).to_value()
    } else {
        tracing::warn!(element = %element.name(), property = name, "property is not an integer; not set");
        return false;
    };
    element.set_property_from_value(name, &value);
    true
}

fn set_bool(element: &gst::Element, name: &str, value: bool) {
    if element.find_property(name).is_some_and(|p| p.value_type() == glib::Type::BOOL) {
        element.set_property(name, value);
    }
}

/// Sets an enum or flags property by its nick, skipping (with a warning) what this version of the
/// element does not have, rather than panicking as `set_property_from_str` would.
fn set_str(element: &gst::Element, name: &str, nick: &str) {
    let Some(pspec) = element.find_property(name) else {
        tracing::warn!(element = %element.name(), property = name, "no such property; not set");
        return;
    };
    let ty = pspec.value_type();
    let value = if ty.is_a(glib::Type::ENUM) {
        glib::EnumClass::with_type(ty).and_then(|c| c.to_value_by_nick(nick))
    } else if ty.is_a(glib::Type::FLAGS) {
        glib::FlagsClass::with_type(ty).and_then(|c| c.to_value_by_nick(nick))
    } else if ty == glib::Type::STRING {
        Some(nick.to_value())
    } else {
        None
    };
    match value {
        Some(value) => element.set_property_from_value(name, &value),
        None => tracing::warn!(element = %element.name(), property = name, nick, "value not accepted; not set"),
    }
}

/// The plugin and Debian package that provide an element, for [`MediaError::MissingElement`].
fn provider(element: &str) -> (&'static str, &'static str) {
    match element {
        "capsfilter" | "queue" | "filesrc" | "tee" | "clocksync" => ("coreelements", "libgstreamer1.0-0"),
        "videotestsrc" => ("videotestsrc", "gstreamer1.0-plugins-base"),
        "videoconvert" => ("videoconvert", "gstreamer1.0-plugins-base"),
        "videoscale" => ("videoscale", "gstreamer1.0-plugins-base"),
        "videorate" => ("videorate", "gstreamer1.0-plugins-base"),
        "appsink" => ("app", "gstreamer1.0-plugins-base"),
        "decodebin" => ("playback", "gstreamer1.0-plugins-base"),
        "textoverlay" => ("pango", "gstreamer1.0-x"),
        "v4l2src" | "v4l2h264enc" => ("video4linux2", "gstreamer1.0-plugins-good"),
        "rtspsrc" => ("rtsp", "gstreamer1.0-plugins-good"),
        "rtph264pay" | "rtpvp8pay" => ("rtp", "gstreamer1.0-plugins-good"),
        "vp8enc" => ("vpx", "gstreamer1.0-plugins-good"),
        "h264parse" => ("videoparsersbad", "gstreamer1.0-plugins-bad"),
        "nvh264enc" => ("nvcodec", "gstreamer1.0-plugins-bad"),
        "x264enc" => ("x264", "gstreamer1.0-plugins-ugly"),
        "vaapih264enc" => ("vaapi", "gstreamer1.0-vaapi"),
        _ => ("unknown", "gstreamer1.0-plugins-base"),
    }
}

/// Creates an element, or says which package to install when its plugin is missing.
fn make(factory: &'static str, name: &str) -> Result<gst::Element, MediaError> {
    let missing = || {
        let (plugin, package) = provider(factory);
        MediaError::MissingElement { element: factory, plugin, package }
    };
    if gst::ElementFactory::find(factory).is_none() {
        return Err(missing());
    }
    gst::ElementFactory::make(factory).name(name).build().map_err(|_| missing())
}

fn element_exists(factory: &str) -> bool {
    gst::ElementFactory::find(factory).is_some()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One encoder branch's state, shared by its appsink callback (streaming thread), the bus thread
/// and the owner.
#[derive(Default)]
struct Shared {
    packets: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
    keyframes_requested: AtomicU64,
    bitrate_kbps: AtomicU32,
    /// First error an element of this branch reported.
    error: Mutex<Option<MediaError>>,
    /// The packet channel. Taken (which closes it for the receiver) when the branch or the whole
    /// pipeline ends, fails or is stopped, so the consumer learns of it from `recv()` returning
    /// `None`.
    sender: Mutex<Option<mpsc::Sender<Bytes>>>,
}

impl Shared {
    fn with_sender(packets: mpsc::Sender<Bytes>, kbps: u32) -> Shared {
        let shared = Shared::default();
        *lock(&shared.sender) = Some(packets);
        shared.bitrate_kbps.store(kbps, Ordering::Relaxed);
        shared
    }

    fn deliver(&self, packet: Bytes) {
        let len = packet.len() as u64;
        let sent = match lock(&self.sender).as_ref() {
            Some(tx) => tx.try_send(packet).is_ok(),
            None => false,
        };
        if sent {
            self.packets.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(len, Ordering::Relaxed);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn close(&self) {
        lock(&self.sender).take();
    }

    fn fail(&self, error: MediaError) {
        lock(&self.error).get_or_insert(error);
        self.close();
    }
}

/// What the bus thread and the owner share about the whole pipeline.
#[derive(Default)]
struct PipelineShared {
    /// The source reached its end: every branch's channel is closed.
    ended: AtomicBool,
    /// First error of the source or of the chain every branch shares; it ends every branch.
    error: Mutex<Option<MediaError>>,
    /// The attached branches, by the prefix of their elements' names, so the bus thread can tell
    /// whose error it is.
    branches: Mutex<Vec<(String, Arc<Shared>)>>,
}

impl PipelineShared {
    fn attach(&self, prefix: &str, branch: Arc<Shared>) {
        lock(&self.branches).push((prefix.to_owned(), branch));
    }

    fn detach(&self, prefix: &str) {
        lock(&self.branches).retain(|(p, _)| p != prefix);
    }

    /// The attached branch `element` belongs to.
    fn branch_of(&self, element: &str) -> Option<Arc<Shared>> {
        lock(&self.branches).iter().find(|(p, _)| element.starts_with(p.as_str())).map(|(_, b)| Arc::clone(b))
    }

    fn close_all(&self) {
        for (_, branch) in lock(&self.branches).iter() {
            branch.close();
        }
    }

    fn fail(&self, error: MediaError) {
        lock(&self.error).get_or_insert(error);
        self.close_all();
    }
}

/// The name prefix of a branch's elements: `enc<n>-<codec>-`, `n` counting the branches a
/// pipeline ever had, so a late message from a removed branch is never taken for its successor's.
fn branch_prefix(n: u32, codec: Codec) -> String {
    format!("enc{n}-{codec}-")
}

/// Whether `element` is named like a branch's element (attached or not).
fn is_branch_element(element: &str) -> bool {
    element
        .strip_prefix("enc")
        .and_then(|rest| rest.split_once('-'))
        .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The encoders to try for `codec`, best first: for H.264 the hardware ones GStreamer has, then
/// x264enc.
fn encoder_candidates(codec: Codec) -> Vec<Encoder> {
    match codec {
        Codec::H264 => {
            Encoder::HARDWARE_H264.into_iter().filter(|e| element_exists(e.factory())).chain([Encoder::X264]).collect()
        }
        Codec::Vp8 => vec![Encoder::Vp8],
    }
}

/// One codec's encoder: `tee -> queue -> videoconvert -> encoder -> [caps -> h264parse] ->
/// payloader -> appsink`, with its own packet channel.
struct Branch {
    prefix: String,
    encoder: gst::Element,
    encoder_kind: Encoder,
    /// Where keyframe requests enter: upstream events sent to the sink travel through the
    /// payloader and parser, which add the parameter sets the new keyframe needs, to the encoder.
    appsink: gst::Element,
    /// From the queue to the appsink.
    elements: Vec<gst::Element>,
    /// The tee's request pad feeding the queue.
    tee_pad: gst::Pad,
    /// Held while a new bitrate is recorded and applied, so concurrent callers cannot leave the
    /// encoder on a different value than the one recorded.
    bitrate_change: Mutex<()>,
    shared: Arc<Shared>,
}

impl Branch {
    fn set_bitrate(&self, settings: &VideoSettings, kbps: u32) -> u32 {
        let kbps = settings.clamp_bitrate(kbps);
        let _guard = lock(&self.bitrate_change);
        if self.shared.bitrate_kbps.swap(kbps, Ordering::Relaxed) != kbps {
            self.encoder_kind.apply_bitrate(&self.encoder, settings, kbps);
            tracing::debug!(encoder = self.encoder_kind.factory(), kbps, "encoder bitrate changed");
        }
        kbps
    }

    fn request_keyframe(&self) {
        self.shared.keyframes_requested.fetch_add(1, Ordering::Relaxed);
        let event = gst_video::UpstreamForceKeyUnitEvent::builder().all_headers(true).build();
        if !self.appsink.send_event(event) {
            tracing::debug!(
                encoder = self.encoder_kind.factory(),
                "force-key-unit event not handled (pipeline not running?)"
            );
        }
    }

    fn stats(&self, pipeline: &PipelineShared) -> PipelineStats {
        let s = &self.shared;
        PipelineStats {
            packets: s.packets.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            dropped_packets: s.dropped.load(Ordering::Relaxed),
            keyframes_requested: s.keyframes_requested.load(Ordering::Relaxed),
            bitrate_kbps: s.bitrate_kbps.load(Ordering::Relaxed),
            ended: pipeline.ended.load(Ordering::Relaxed),
            failed: lock(&s.error).is_some() || lock(&pipeline.error).is_some(),
        }
    }
}

/// A running capture -> encode -> RTP pipeline: one source, scaled and paced once, feeding one
/// encoder per codec in use through a `tee`, each encoder with its own packet channel.
///
/// [`start`](Self::start) builds it with the settings' codec. [`add_codec`](Self::add_codec)
/// adds an encoder for another codec while it runs (a viewer that can only decode VP8 while
/// others watch H.264), [`remove_codec`](Self::remove_codec) takes one out; the source is opened
/// once whatever the number of encoders (a V4L2 camera streams to one reader only). The methods
/// without a codec act on the codec the pipeline was started with; the `_for` ones on any.
///
/// Dropping it (or [`stop`](Self::stop)) sets the pipeline to NULL, joins its bus thread and closes
/// every packet channel. It is `Send + Sync`: share it behind an `Arc` between the RTP forwarder
/// and the RTCP reader that calls [`set_bitrate`](Self::set_bitrate) and
/// [`request_keyframe`](Self::request_keyframe).
pub struct VideoPipeline {
    pipeline: gst::Pipeline,
    /// Where the encoders' branches start.
    tee: gst::Element,
    settings: VideoSettings,
    shared: Arc<PipelineShared>,
    branches: Mutex<HashMap<Codec, Arc<Branch>>>,
    /// Numbers the branches (see [`branch_prefix`]).
    next_branch: AtomicU32,
    bus_thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for VideoPipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let encoders: Vec<(Codec, &'static str)> =
            lock(&self.branches).iter().map(|(c, b)| (*c, b.encoder_kind.factory())).collect();
        f.debug_struct("VideoPipeline")
            .field("source", &self.settings.source)
            .field("encoders", &encoders)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Tries `codec`'s encoders in order of preference until one starts: an encoder whose pipeline
/// fails is logged and the next one tried; any other error, or the last encoder's, is returned.
fn first_encoder<T>(codec: Codec, mut start: impl FnMut(Encoder) -> Result<T, MediaError>) -> Result<T, MediaError> {
    let candidates = encoder_candidates(codec);
    let mut last_error = None;
    for (i, encoder) in candidates.iter().copied().enumerate() {
        match start(encoder) {
            Ok(started) => return Ok(started),
            Err(error @ MediaError::Pipeline { .. }) if i + 1 < candidates.len() => {
                tracing::warn!(encoder = encoder.factory(), %error, "encoder failed to start; trying the next one");
                last_error = Some(error);
            }
            Err(error) => return Err(error),
        }
    }
    Err(last_error.unwrap_or_else(|| MediaError::Build("no encoder available".into())))
}

impl VideoPipeline {
    /// Builds and plays the pipeline with one encoder, for `settings.codec`; every RTP packet
    /// (payloaded with MTU 1200) is handed to `packets` with `try_send`: a full channel drops the
    /// packet and counts it, so the streaming thread never blocks.
    ///
    /// For H.264 a hardware encoder is used when GStreamer has one (vaapih264enc, v4l2h264enc,
    /// nvh264enc), falling back to x264enc if it cannot start.
    pub fn start(settings: &VideoSettings, packets: mpsc::Sender<Bytes>) -> Result<VideoPipeline, MediaError> {
        init()?;
        settings.validate()?;
        match &settings.source {
            Source::V4l2 { device } if !device.exists() => {
                return Err(MediaError::DeviceNotFound { path: device.clone() });
            }
            Source::File { path } if !path.is_file() => {
                return Err(MediaError::FileNotFound { path: path.clone() });
            }
            _ => {}
        }
        first_encoder(settings.codec, |encoder| Self::try_start(settings, encoder, packets.clone()))
    }

    fn try_start(
        settings: &VideoSettings,
        encoder_kind: Encoder,
        packets: mpsc::Sender<Bytes>,
    ) -> Result<VideoPipeline, MediaError> {
        let shared = Arc::new(PipelineShared::default());
        let kbps = settings.clamp_bitrate(settings.bitrate_kbps);

        let pipeline = gst::Pipeline::with_name("tether-video");
        let tee = build_source(&pipeline, settings)?;
        let prefix = branch_prefix(0, settings.codec);
        let parts =
            build_branch(&pipeline, &shared, settings, settings.codec, encoder_kind, kbps, false, &prefix, packets)?;
        let tee_pad = link_to_tee(&tee, &parts.elements[0])?;
        shared.attach(&prefix, Arc::clone(&parts.shared));

        let bus = pipeline.bus().ok_or_else(|| MediaError::Build("pipeline has no bus".into()))?;
        if pipeline.set_state(gst::State::Playing).is_err() {
            // Errors from a failed state change are already on the bus. (Not timed_pop_filtered
            // with a zero timeout: gstreamer-rs 0.25 gives up before looking.)
            let error = bus.iter().find_map(|msg| pipeline_error(&msg)).unwrap_or_else(|| MediaError::Pipeline {
                element: "tether-video".into(),
                message: "the pipeline refused to start".into(),
                debug: None,
            });
            let _ = pipeline.set_state(gst::State::Null);
            return Err(error);
        }
        let bus_thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new().name("tether-gst-bus".into()).spawn(move || watch_bus(&bus, &shared))
        };
        let bus_thread = match bus_thread {
            Ok(thread) => thread,
            Err(e) => {
                let _ = pipeline.set_state(gst::State::Null);
                return Err(MediaError::Build(format!("could not spawn the bus thread: {e}")));
            }
        };
        tracing::info!(
            source = %settings.source,
            encoder = encoder_kind.factory(),
            width = settings.width,
            height = settings.height,
            framerate = settings.framerate,
            kbps,
            "video pipeline playing"
        );
        let branch = Branch {
            prefix,
            encoder: parts.encoder,
            encoder_kind,
            appsink: parts.appsink,
            elements: parts.elements,
            tee_pad,
            bitrate_change: Mutex::new(()),
            shared: parts.shared,
        };
        Ok(VideoPipeline {
            pipeline,
            tee,
            settings: settings.clone(),
            shared,
            branches: Mutex::new(HashMap::from([(settings.codec, Arc::new(branch))])),
            next_branch: AtomicU32::new(1),
            bus_thread: Some(bus_thread),
        })
    }

    /// Adds an encoder for `codec` to the running pipeline, its packets handed to `packets` as
    /// [`start`](Self::start) does; returns the encoder's element name. Its first frame is a
    /// keyframe. Fails if the pipeline already encodes `codec`, or has ended or failed.
    pub fn add_codec(&self, codec: Codec, packets: mpsc::Sender<Bytes>) -> Result<&'static str, MediaError> {
        let mut branches = lock(&self.branches);
        if branches.contains_key(&codec) {
            return Err(MediaError::InvalidSettings(format!("the pipeline already encodes {codec}")));
        }
        if let Some(error) = lock(&self.shared.error).clone() {
            return Err(error);
        }
        let source_ended =
            self.tee.static_pad("sink").is_some_and(|pad| pad.sticky_event::<gst::event::Eos>(0).is_some());
        if self.shared.ended.load(Ordering::Relaxed) || source_ended {
            return Err(MediaError::Build("the video source has ended".into()));
        }
        let kbps = self.settings.clamp_bitrate(self.settings.bitrate_kbps);
        let (branch, encoder_kind) = first_encoder(codec, |encoder_kind| {
            let prefix = branch_prefix(self.next_branch.fetch_add(1, Ordering::Relaxed), codec);
            self.attach_branch(codec, encoder_kind, kbps, &prefix, packets.clone()).map(|b| (b, encoder_kind))
        })?;
        tracing::info!(%codec, encoder = encoder_kind.factory(), kbps, "video encoder added");
        branches.insert(codec, Arc::new(branch));
        Ok(encoder_kind.factory())
    }

    fn attach_branch(
        &self,
        codec: Codec,
        encoder_kind: Encoder,
        kbps: u32,
        prefix: &str,
        packets: mpsc::Sender<Bytes>,
    ) -> Result<Branch, MediaError> {
        let parts = build_branch(
            &self.pipeline,
            &self.shared,
            &self.settings,
            codec,
            encoder_kind,
            kbps,
            true,
            prefix,
            packets,
        )?;
        // Sink first, so nothing reaches an element that is not playing yet; a hardware encoder
        // that cannot open its device fails here.
        for element in parts.elements.iter().rev() {
            if element.sync_state_with_parent().is_err() {
                discard(&self.pipeline, &parts.elements);
                return Err(MediaError::Pipeline {
                    element: element.name().to_string(),
                    message: "the element refused to start".into(),
                    debug: None,
                });
            }
        }
        self.shared.attach(prefix, Arc::clone(&parts.shared));
        let tee_pad = match link_to_tee(&self.tee, &parts.elements[0]) {
            Ok(pad) => pad,
            Err(error) => {
                self.shared.detach(prefix);
                discard(&self.pipeline, &parts.elements);
                return Err(error);
            }
        };
        Ok(Branch {
            prefix: prefix.to_owned(),
            encoder: parts.encoder,
            encoder_kind,
            appsink: parts.appsink,
            elements: parts.elements,
            tee_pad,
            bitrate_change: Mutex::new(()),
            shared: parts.shared,
        })
    }

    /// Takes `codec`'s encoder out of the running pipeline and closes its packet channel; the
    /// source and the other encoders go on. False if the pipeline does not encode `codec`.
    pub fn remove_codec(&self, codec: Codec) -> bool {
        let Some(branch) = lock(&self.branches).remove(&codec) else { return false };
        self.shared.detach(&branch.prefix);
        branch.shared.close();
        let Some(queue_sink) = branch.elements[0].static_pad("sink") else { return true };
        let (pipeline, tee, elements) = (self.pipeline.clone(), self.tee.clone(), branch.elements.clone());
        // Between two buffers (at once if none is flowing): unlink, release the tee's pad, stop
        // and remove the branch's elements.
        branch.tee_pad.add_probe(gst::PadProbeType::IDLE, move |pad, _| {
            let _ = pad.unlink(&queue_sink);
            tee.release_request_pad(pad);
            discard(&pipeline, &elements);
            gst::PadProbeReturn::Remove
        });
        tracing::info!(%codec, encoder = branch.encoder_kind.factory(), "video encoder removed");
        true
    }

    /// The codecs the pipeline encodes now.
    pub fn codecs(&self) -> Vec<Codec> {
        lock(&self.branches).keys().copied().collect()
    }

    fn branch(&self, codec: Codec) -> Option<Arc<Branch>> {
        lock(&self.branches).get(&codec).cloned()
    }

    /// Clamps `kbps` to the configured bounds, applies it to the live encoder and returns the value set.
    pub fn set_bitrate(&self, kbps: u32) -> u32 {
        self.set_bitrate_for(self.settings.codec, kbps).unwrap_or_else(|| self.settings.clamp_bitrate(kbps))
    }

    /// [`set_bitrate`](Self::set_bitrate) on `codec`'s encoder; None if there is none.
    pub fn set_bitrate_for(&self, codec: Codec, kbps: u32) -> Option<u32> {
        self.branch(codec).map(|b| b.set_bitrate(&self.settings, kbps))
    }

    /// The bitrate the encoder element reports now, in kbit/s (`None` where the element does not
    /// expose it as a property, as v4l2h264enc).
    pub fn encoder_bitrate_kbps(&self) -> Option<u32> {
        self.encoder_bitrate_kbps_for(self.settings.codec)
    }

    /// [`encoder_bitrate_kbps`](Self::encoder_bitrate_kbps) of `codec`'s encoder.
    pub fn encoder_bitrate_kbps_for(&self, codec: Codec) -> Option<u32> {
        self.branch(codec).and_then(|b| b.encoder_kind.bitrate_kbps(&b.encoder))
    }

    /// Asks the encoder for a keyframe (with SPS/PPS for H.264) as soon as possible, as a PLI or
    /// FIR from a receiver requires. Cheap to call on every PLI: forced keyframes are at least
    /// 250 ms apart, and requests in between are served by the next one.
    pub fn request_keyframe(&self) {
        self.request_keyframe_for(self.settings.codec);
    }

    /// [`request_keyframe`](Self::request_keyframe) of `codec`'s encoder; false if there is none.
    pub fn request_keyframe_for(&self, codec: Codec) -> bool {
        self.branch(codec).map(|b| b.request_keyframe()).is_some()
    }

    /// The encoder's element name: `x264enc`, `vaapih264enc`, `v4l2h264enc`, `nvh264enc` or
    /// `vp8enc` (`none` once that codec's encoder was removed).
    pub fn encoder(&self) -> &'static str {
        self.encoder_for(self.settings.codec).unwrap_or("none")
    }

    /// The element name of `codec`'s encoder.
    pub fn encoder_for(&self, codec: Codec) -> Option<&'static str> {
        self.branch(codec).map(|b| b.encoder_kind.factory())
    }

    /// The settings the pipeline was started with.
    pub fn settings(&self) -> &VideoSettings {
        &self.settings
    }

    /// Counters and liveness of the encoder the pipeline was started with.
    pub fn stats(&self) -> PipelineStats {
        self.stats_for(self.settings.codec).unwrap_or_else(|| PipelineStats {
            ended: self.shared.ended.load(Ordering::Relaxed),
            failed: lock(&self.shared.error).is_some(),
            ..PipelineStats::default()
        })
    }

    /// Counters and liveness of `codec`'s encoder.
    pub fn stats_for(&self, codec: Codec) -> Option<PipelineStats> {
        self.branch(codec).map(|b| b.stats(&self.shared))
    }

    /// Why the pipeline died, if it did: the first error its bus reported (the source's, else
    /// that of the encoder it was started with). `None` while it runs and after a clean end of
    /// stream.
    pub fn error(&self) -> Option<MediaError> {
        self.error_for(self.settings.codec)
    }

    /// Why `codec`'s encoder stopped, if it failed: the source's error, else its own.
    pub fn error_for(&self, codec: Codec) -> Option<MediaError> {
        if let Some(e) = lock(&self.shared.error).clone() {
            return Some(e);
        }
        self.branch(codec).and_then(|b| lock(&b.shared.error).clone())
    }

    /// Stops the pipeline (to NULL), joins its bus thread and closes the packet channels.
    pub fn stop(self) {
        drop(self);
    }

    fn shutdown(&mut self) {
        // The bus thread goes first: a pipeline in NULL flushes its bus, which would drop the
        // stop message.
        if let Some(thread) = self.bus_thread.take() {
            if let Some(bus) = self.pipeline.bus() {
                let _ = bus.post(gst::message::Application::new(gst::Structure::new_empty(STOP_MESSAGE)));
            }
            let _ = thread.join();
        }
        let _ = self.pipeline.set_state(gst::State::Null);
        self.shared.close_all();
        for branch in lock(&self.branches).values() {
            branch.shared.close();
        }
    }
}

impl Drop for VideoPipeline {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Stops elements taken out of (or never joined to) the flow and removes them from `pipeline`.
fn discard(pipeline: &gst::Pipeline, elements: &[gst::Element]) {
    for element in elements {
        let _ = element.set_state(gst::State::Null);
    }
    let _ = pipeline.remove_many(elements);
}

/// Requests a pad of `tee` and links it to `first`'s sink pad.
fn link_to_tee(tee: &gst::Element, first: &gst::Element) -> Result<gst::Pad, MediaError> {
    let tee_pad = tee.request_pad_simple("src_%u").ok_or_else(|| MediaError::Build("the tee gave no pad".into()))?;
    let sink =
        first.static_pad("sink").ok_or_else(|| MediaError::Build(format!("{} has no sink pad", first.name())))?;
    if let Err(e) = tee_pad.link(&sink) {
        tee.release_request_pad(&tee_pad);
        return Err(MediaError::Build(format!("could not link the tee to {}: {e:?}", first.name())));
    }
    Ok(tee_pad)
}

/// Turns an error message from the bus into a [`MediaError::Pipeline`].
fn pipeline_error(msg: &gst::Message) -> Option<MediaError> {
    let gst::MessageView::Error(err) = msg.view() else {
        return None;
    };
    Some(MediaError::Pipeline {
        element: msg.src().map(|s| s.name().to_string()).unwrap_or_else(|| "tether-video".into()),
        message: err.error().to_string(),
        debug: err.debug().map(|d| d.to_string()),
    })
}

/// Runs on its own thread until [`VideoPipeline::shutdown`] posts the stop message.
fn watch_bus(bus: &gst::Bus, shared: &PipelineShared) {
    while let Some(msg) = bus.timed_pop(gst::ClockTime::NONE) {
        match msg.view() {
            gst::MessageView::Application(app) if app.structure().is_some_and(|s| s.name() == STOP_MESSAGE) => {
                break;
            }
            gst::MessageView::Error(_) => {
                if let Some(error) = pipeline_error(&msg) {
                    let (element, details) = match &error {
                        MediaError::Pipeline { element, debug, .. } => {
                            (element.clone(), debug.clone().unwrap_or_default())
                        }
                        _ => (String::new(), String::new()),
                    };
                    match shared.branch_of(&element) {
                        Some(branch) => {
                            tracing::error!(%error, details, "a video encoder failed");
                            branch.fail(error);
                        }
                        // A branch being added (an encoder that could not start, tried no
                        // further) or already removed: nobody reads it.
                        None if is_branch_element(&element) => {
                            tracing::debug!(%error, "an encoder that is not attached reported an error");
                        }
                        None => {
                            tracing::error!(%error, details, "video pipeline failed");
                            shared.fail(error);
                        }
                    }
                }
            }
            gst::MessageView::Warning(w) => {
                let element = msg.src().map(|s| s.name().to_string()).unwrap_or_default();
                tracing::warn!(element, warning = %w.error(), debug = ?w.debug(), "video pipeline warning");
            }
            gst::MessageView::Eos(_) => {
                tracing::info!("video source ended");
                shared.ended.store(true, Ordering::Relaxed);
                shared.close_all();
            }
            _ => {}
        }
    }
}

/// Adds the source and the chain every encoder shares (convert, scale, rate, the test pattern's
/// time code and clock) to `pipeline`, ending in a `tee`; returns the tee.
fn build_source(pipeline: &gst::Pipeline, settings: &VideoSettings) -> Result<gst::Element, MediaError> {
    let link_err = |e: glib::BoolError| MediaError::Build(e.to_string());
    let add = |elements: &[&gst::Element]| pipeline.add_many(elements.iter().copied()).map_err(link_err);

    // Raw video, scaled and paced to what was asked: the chain every source feeds.
    let convert = make("videoconvert", "videoconvert")?;
    let scale = make("videoscale", "videoscale")?;
    let rate = make("videorate", "videorate")?;
    let raw_caps = make("capsfilter", "raw-caps")?;
    raw_caps.set_property(
        "caps",
        gst::Caps::builder("video/x-raw")
            .field("width", settings.width as i32)
            .field("height", settings.height as i32)
            .field("framerate", gst::Fraction::new(settings.framerate as i32, 1))
            .field("pixel-aspect-ratio", gst::Fraction::new(1, 1))
            .build(),
    );
    add(&[&convert, &scale, &rate, &raw_caps])?;
    gst::Element::link_many([&convert, &scale, &rate, &raw_caps]).map_err(link_err)?;
    let live = match &settings.source {
        Source::TestPattern => {
            let src = make("videotestsrc", "videotestsrc")?;
            src.set_property("is-live", true);
            set_str(&src, "pattern", "smpte");
            add(&[&src])?;
            src.link(&convert).map_err(link_err)?;
            true
        }
        Source::V4l2 { device } => {
            let src = make("v4l2src", "v4l2src")?;
            src.set_property("device", device.to_string_lossy().as_ref());
            add(&[&src])?;
            src.link(&convert).map_err(link_err)?;
            true
        }
        Source::Rtsp { url } => {
            let src = make("rtspsrc", "rtspsrc")?;
            src.set_property("location", url.as_str());
            set_number(&src, "latency", 0);
            let decode = make("decodebin", "decodebin")?;
            add(&[&src, &decode])?;
            link_dynamic(&src, &decode, "application/x-rtp", Some("video"));
            link_dynamic(&decode, &convert, "video/", None);
            true
        }
        Source::File { path } => {
            let src = make("filesrc", "filesrc")?;
            src.set_property("location", path_str(path));
            let decode = make("decodebin", "decodebin")?;
            add(&[&src, &decode])?;
            src.link(&decode).map_err(link_err)?;
            link_dynamic(&decode, &convert, "video/", None);
            false
        }
    };

    // The test pattern carries the wall-clock time so latency can be read off a received frame:
    // as text for people, and as a block code (see `TIME_CODE_BITS`) for programs.
    let mut tail = raw_caps.clone();
    if settings.source == Source::TestPattern {
        let i420 = make("capsfilter", "time-code-caps")?;
        i420.set_property("caps", gst::Caps::builder("video/x-raw").field("format", "I420").build());
        let convert1 = make("videoconvert", "videoconvert-time-code")?;
        add(&[&convert1, &i420])?;
        gst::Element::link_many([&tail, &convert1, &i420]).map_err(link_err)?;
        stamp_time_code(&i420);
        tail = i420;
        if element_exists("textoverlay") {
            let overlay = make("textoverlay", "clock-overlay")?;
            set_str(&overlay, "font-desc", "Monospace Bold 14");
            set_str(&overlay, "halignment", "left");
            set_str(&overlay, "valignment", "top");
            set_bool(&overlay, "shaded-background", true);
            overlay.set_property("text", wall_clock_text().as_str());
            stamp_wall_clock(&overlay);
            let convert2 = make("videoconvert", "videoconvert-overlay")?;
            add(&[&overlay, &convert2])?;
            gst::Element::link_many([&tail, &overlay, &convert2]).map_err(link_err)?;
            tail = convert2;
        } else {
            let (_, package) = provider("textoverlay");
            tracing::warn!(package, "textoverlay is missing: the test pattern has no clock overlay");
        }
    }

    // A file is played in real time, as a camera delivers: otherwise it is decoded as fast as
    // the machine can, and the encoders' leaky queues drop most of it.
    if !live {
        let pace = make("clocksync", "clocksync")?;
        add(&[&pace])?;
        tail.link(&pace).map_err(link_err)?;
        tail = pace;
    }
    // Every encoder's branch starts here. A pad that is not linked (for a moment, between two
    // branches) must not stop the source.
    let tee = make("tee", "tee")?;
    set_bool(&tee, "allow-not-linked", true);
    add(&[&tee])?;
    tail.link(&tee).map_err(link_err)?;
    Ok(tee)
}

/// What [`build_branch`] made.
struct BranchParts {
    /// From the queue to the appsink, linked.
    elements: Vec<gst::Element>,
    encoder: gst::Element,
    appsink: gst::Element,
    shared: Arc<Shared>,
}

/// Adds one encoder's elements to `pipeline`, named `<prefix><factory>`, and links them (not
/// yet to the tee); its packets go to `packets`. `added`: to a pipeline already playing.
/// Nothing is left in the pipeline on failure.
#[allow(clippy::too_many_arguments)]
fn build_branch(
    pipeline: &gst::Pipeline,
    pipeline_shared: &Arc<PipelineShared>,
    settings: &VideoSettings,
    codec: Codec,
    encoder_kind: Encoder,
    kbps: u32,
    added: bool,
    prefix: &str,
    packets: mpsc::Sender<Bytes>,
) -> Result<BranchParts, MediaError> {
    let name = |element: &str| format!("{prefix}{element}");
    // A leaky queue: if the encoder falls behind, old frames are dropped instead of piling up
    // latency (and a slow encoder does not hold up the others).
    let queue = make("queue", &name("queue"))?;
    set_number(&queue, "max-size-buffers", 2);
    set_number(&queue, "max-size-bytes", 0);
    set_number(&queue, "max-size-time", 0);
    set_str(&queue, "leaky", "downstream");
    // Each encoder takes the raw format it likes best; a no-op when the shared chain already
    // delivers it.
    let convert = make("videoconvert", &name("videoconvert"))?;

    let encoder = make(encoder_kind.factory(), &name(encoder_kind.factory()))?;
    encoder_kind.configure(&encoder, settings, kbps);
    let mut chain = vec![queue, convert, encoder.clone()];
    match codec {
        Codec::H264 => {
            let caps = make("capsfilter", &name("h264-caps"))?;
            caps.set_property(
                "caps",
                gst::Caps::builder("video/x-h264")
                    .field("profile", "constrained-baseline")
                    .field("stream-format", "byte-stream")
                    .build(),
            );
            let parse = make("h264parse", &name("h264parse"))?;
            set_number_signed(&parse, "config-interval", -1);
            let pay = make("rtph264pay", &name("rtph264pay"))?;
            // h264parse already puts SPS/PPS at the head of every keyframe. With -1 here the
            // payloader inserts them again before *each* IDR slice, and x264 cuts a frame into
            // several slices: parameter sets between two slices of one picture start a new
            // access unit (H.264 7.4.1.2.3) and decoders drop the frame. 0 keeps the order legal;
            // forced keyframes still carry all headers.
            set_number_signed(&pay, "config-interval", 0);
            set_str(&pay, "aggregate-mode", "zero-latency");
            chain.extend([caps, parse, pay]);
        }
        Codec::Vp8 => {
            let pay = make("rtpvp8pay", &name("rtpvp8pay"))?;
            chain.push(pay);
        }
    }
    let pay = chain.last().cloned().ok_or_else(|| MediaError::Build("empty chain".into()))?;
    set_number(&pay, "mtu", u64::from(RTP_MTU));
    set_number(&pay, "pt", u64::from(RTP_PAYLOAD_TYPE));

    let shared = Arc::new(Shared::with_sender(packets, kbps));
    let appsink = gst_app::AppSink::builder()
        .name(name("rtp-sink"))
        // The source is paced (a camera, a test pattern, a file through `clocksync`): packets
        // leave as soon as they are made.
        .sync(false)
        // An encoder added to a playing pipeline must not make the whole pipeline wait for its
        // first buffer again (live sources never do anyway).
        .async_(!added)
        .drop(true)
        .max_buffers(8)
        .enable_last_sample(false)
        .build();
    let shared_cb = Arc::clone(&shared);
    let (shared_eos, pipeline_eos) = (Arc::clone(&shared), Arc::downgrade(pipeline_shared));
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                if let Some(buffer) = sample.buffer() {
                    let map = buffer.map_readable().map_err(|_| gst::FlowError::Error)?;
                    shared_cb.deliver(Bytes::copy_from_slice(map.as_slice()));
                }
                Ok(gst::FlowSuccess::Ok)
            })
            // The source's end reached this encoder: its channel closes now, whether or not the
            // pipeline's own end-of-stream message (which waits for every sink) comes.
            .eos(move |_| {
                if let Some(p) = pipeline_eos.upgrade() {
                    p.ended.store(true, Ordering::Relaxed);
                }
                shared_eos.close();
            })
            .build(),
    );
    let appsink: gst::Element = appsink.upcast();
    chain.push(appsink.clone());

    pipeline.add_many(chain.iter()).map_err(|e| MediaError::Build(e.to_string()))?;
    if let Err(e) = gst::Element::link_many(chain.iter()) {
        discard(pipeline, &chain);
        return Err(MediaError::Build(e.to_string()));
    }
    Ok(BranchParts { elements: chain, encoder, appsink, shared })
}

fn set_number_signed(element: &gst::Element, name: &str, value: i32) {
    if element.find_property(name).is_some_and(|p| p.value_type() == glib::Type::I32) {
        element.set_property(name, value);
    }
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Links `src`'s pads as they appear (rtspsrc, decodebin) to `sink`, taking the first whose caps
/// name starts with `caps_prefix` (and, for RTP, whose `media` field matches). Other streams
/// (audio) stay unlinked and are discarded by their element.
fn link_dynamic(src: &gst::Element, sink: &gst::Element, caps_prefix: &'static str, media: Option<&'static str>) {
    let sink = sink.downgrade();
    src.connect_pad_added(move |src, pad| {
        let Some(sink) = sink.upgrade() else { return };
        let caps = pad.current_caps().unwrap_or_else(|| pad.query_caps(None));
        let Some(s) = caps.structure(0) else { return };
        if !s.name().starts_with(caps_prefix) {
            return;
        }
        if let Some(media) = media
            && s.get::<&str>("media").ok() != Some(media)
        {
            return;
        }
        let Some(sink_pad) = sink.static_pad("sink") else { return };
        if sink_pad.is_linked() {
            return;
        }
        if let Err(e) = pad.link(&sink_pad) {
            tracing::warn!(src = %src.name(), pad = %pad.name(), error = ?e, "could not link the new pad");
        }
    });
}

/// Bits of the test pattern's time code: 40 bits of milliseconds since the Unix epoch (modulo
/// 2^40, about 34 years), most significant first, then an 8-bit checksum (the sum of those five
/// bytes, modulo 256).
///
/// Layout, so a viewer can read it back: square blocks of side `max(4, width / 48)` rounded down
/// to even, 24 per row, two rows, in the bottom-left corner (the first row starts at
/// `height - 2 * side`); bit `i` is row `i / 24`, column `i % 24`; a 1 is bright (luma 235), a
/// 0 dark (luma 16), chroma neutral. Read each block's centre pixel and compare against mid-grey.
pub const TIME_CODE_BITS: usize = 48;

/// The block side of the time code for a frame `width` pixels wide.
pub fn time_code_block(width: u32) -> u32 {
    (width / 48).max(4) & !1
}

/// The 48 bits for `ms` milliseconds since the Unix epoch.
pub fn time_code_bits(ms: u64) -> [bool; TIME_CODE_BITS] {
    let v = ms & ((1 << 40) - 1);
    let bytes = v.to_be_bytes();
    let sum = bytes[3..].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    let word = (v << 8) | u64::from(sum);
    std::array::from_fn(|i| word >> (TIME_CODE_BITS - 1 - i) & 1 == 1)
}

/// Reads a time code back (the 40-bit millisecond value) if the checksum holds.
pub fn time_code_value(bits: &[bool; TIME_CODE_BITS]) -> Option<u64> {
    let word = bits.iter().fold(0u64, |a, b| (a << 1) | u64::from(*b));
    let v = word >> 8;
    let sum = v.to_be_bytes()[3..].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    (sum == (word & 0xff) as u8).then_some(v)
}

/// Paints the time code of `ms` into an I420 frame's planes.
fn paint_time_code(frame: &mut gst_video::VideoFrameRef<&mut gst::BufferRef>, ms: u64) {
    let (w, h) = (frame.width(), frame.height());
    let side = time_code_block(w);
    if 24 * side > w || 2 * side > h {
        return;
    }
    let y0 = h - 2 * side;
    let bits = time_code_bits(ms);
    let strides: Vec<usize> = frame.plane_stride().iter().map(|s| *s as usize).collect();
    for (plane, stride) in strides.iter().enumerate().take(3) {
        // Chroma planes are half size both ways in I420.
        let shift = u32::from(plane > 0);
        let Ok(data) = frame.plane_data_mut(plane as u32) else { return };
        for (i, bit) in bits.iter().enumerate() {
            let (bx, by) = ((i % 24) as u32 * side, y0 + (i / 24) as u32 * side);
            let value = if plane > 0 {
                128
            } else if *bit {
                235
            } else {
                16
            };
            for y in (by >> shift)..((by + side) >> shift) {
                let row = y as usize * stride;
                let (from, to) = (row + (bx >> shift) as usize, row + ((bx + side) >> shift) as usize);
                if let Some(px) = data.get_mut(from..to) {
                    px.fill(value);
                }
            }
        }
    }
}

/// Paints the wall-clock time code into each frame leaving `element`'s source pad (I420).
fn stamp_time_code(element: &gst::Element) {
    let Some(pad) = element.static_pad("src") else {
        return;
    };
    pad.add_probe(gst::PadProbeType::BUFFER, |pad, info| {
        let Some(info_caps) = pad.current_caps() else { return gst::PadProbeReturn::Ok };
        let Ok(video) = gst_video::VideoInfo::from_caps(&info_caps) else { return gst::PadProbeReturn::Ok };
        if let Some(gst::PadProbeData::Buffer(buffer)) = info.data.as_mut() {
            let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            if let Ok(mut frame) = gst_video::VideoFrameRef::from_buffer_ref_writable(buffer.make_mut(), &video) {
                paint_time_code(&mut frame, ms);
            }
        }
        gst::PadProbeReturn::Ok
    });
}

/// Rewrites the overlay's text with the wall-clock time of each frame as it passes.
fn stamp_wall_clock(overlay: &gst::Element) {
    let Some(pad) = overlay.static_pad("video_sink") else {
        return;
    };
    let weak = overlay.downgrade();
    pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
        if let Some(overlay) = weak.upgrade() {
            overlay.set_property("text", wall_clock_text().as_str());
        }
        gst::PadProbeReturn::Ok
    });
}

/// `HH:MM:SS.mmm UTC` of now.
fn wall_clock_text() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs() % 86_400;
    format!("{:02}:{:02}:{:02}.{:03} UTC", secs / 3600, (secs / 60) % 60, secs % 60, now.subsec_millis())
}

/// The payload of an RTP packet: after the fixed header, CSRCs and extension, before padding.
fn rtp_payload(packet: &[u8]) -> Option<&[u8]> {
    if packet.len() < 12 || packet[0] >> 6 != 2 {
        return None;
    }
    let csrc_count = usize::from(packet[0] & 0x0f);
    let mut start = 12 + 4 * csrc_count;
    if packet[0] & 0x10 != 0 {
        let ext = packet.get(start..start + 4)?;
        start += 4 + 4 * usize::from(u16::from_be_bytes([ext[2], ext[3]]));
    }
    let mut end = packet.len();
    if packet[0] & 0x20 != 0 {
        let padding = usize::from(*packet.last()?);
        end = end.checked_sub(padding)?;
    }
    packet.get(start..end).filter(|p| !p.is_empty())
}

/// Whether an H.264 RTP packet (RFC 6184) starts a keyframe: it carries an IDR slice (type 5) or a
/// sequence parameter set (type 7), alone, inside a STAP-A, or as the first fragment of a FU-A.
pub fn h264_rtp_is_keyframe(rtp_packet: &[u8]) -> bool {
    const IDR: u8 = 5;
    const SPS: u8 = 7;
    const STAP_A: u8 = 24;
    const FU_A: u8 = 28;
    let Some(payload) = rtp_payload(rtp_packet) else {
        return false;
    };
    let is_key = |nal_type: u8| nal_type == IDR || nal_type == SPS;
    match payload[0] & 0x1f {
        t @ 1..=23 => is_key(t),
        STAP_A => {
            let mut rest = &payload[1..];
            while rest.len() >= 2 {
                let size = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let Some(nal) = rest.get(2..2 + size) else {
                    return false;
                };
                if nal.first().is_some_and(|h| is_key(h & 0x1f)) {
                    return true;
                }
                rest = &rest[2 + size..];
            }
            false
        }
        FU_A => payload.get(1).is_some_and(|fu| fu & 0x80 != 0 && is_key(fu & 0x1f)),
        _ => false,
    }
}

/// Whether a VP8 RTP packet (RFC 7741) starts a key frame: the payload descriptor's S bit is set
/// with partition 0, and the VP8 frame tag's P bit is 0 with the key frame start code after it.
pub fn vp8_rtp_is_keyframe(rtp_packet: &[u8]) -> bool {
    let Some(payload) = rtp_payload(rtp_packet) else {
        return false;
    };
    let first = payload[0];
    let start_of_partition = first & 0x10 != 0;
    let partition = first & 0x07;
    if !start_of_partition || partition != 0 {
        return false;
    }
    let mut at = 1;
    if first & 0x80 != 0 {
        let Some(&ext) = payload.get(1) else {
            return false;
        };
        at = 2;
        if ext & 0x80 != 0 {
            // PictureID: 7 bits, or 15 when its M bit is set.
            let Some(&pid) = payload.get(at) else {
                return false;
            };
            at += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if ext & 0x40 != 0 {
            at += 1; // TL0PICIDX
        }
        if ext & 0x30 != 0 {
            at += 1; // TID / Y / KEYIDX
        }
    }
    let Some(frame) = payload.get(at..) else {
        return false;
    };
    // Key frame: P bit clear, then three bytes of tag and the start code 9d 01 2a.
    frame.len() >= 6 && frame[0] & 0x01 == 0 && frame[3..6] == [0x9d, 0x01, 0x2a]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_codes_round_trip_and_catch_misreads() {
        let ms = 1_795_341_563_557u64;
        let mut bits = time_code_bits(ms);
        assert_eq!(time_code_value(&bits), Some(ms & ((1 << 40) - 1)));
        bits[5] = !bits[5];
        assert_eq!(time_code_value(&bits), None, "a flipped bit fails the checksum");
        assert_eq!(time_code_block(640), 12);
        assert_eq!(time_code_block(100), 4);
    }

    #[test]
    fn the_time_code_is_painted_where_viewers_read_it() {
        init().unwrap();
        let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::I420, 320, 240).build().unwrap();
        let mut buffer = gst::Buffer::with_size(info.size()).unwrap();
        let ms = 1_700_000_000_123u64;
        {
            let mut frame =
                gst_video::VideoFrameRef::from_buffer_ref_writable(buffer.get_mut().unwrap(), &info).unwrap();
            paint_time_code(&mut frame, ms);
        }
        let frame = gst_video::VideoFrame::from_buffer_readable(buffer, &info).unwrap();
        let (y, stride) = (frame.plane_data(0).unwrap(), frame.plane_stride()[0] as usize);
        let side = time_code_block(320) as usize;
        let y0 = 240 - 2 * side;
        let bits: [bool; TIME_CODE_BITS] = std::array::from_fn(|i| {
            let (cx, cy) = ((i % 24) * side + side / 2, y0 + (i / 24) * side + side / 2);
            y[cy * stride + cx] > 128
        });
        assert_eq!(time_code_value(&bits), Some(ms & ((1 << 40) - 1)));
    }

    #[test]
    fn wall_clock_text_has_milliseconds() {
        let text = wall_clock_text();
        assert_eq!(text.len(), "00:00:00.000 UTC".len(), "{text}");
        assert_eq!(&text[8..9], ".");
    }

    #[test]
    fn branch_elements_are_told_apart_from_the_shared_chain() {
        assert_eq!(branch_prefix(3, Codec::Vp8), "enc3-vp8-");
        assert!(is_branch_element(&format!("{}vp8enc", branch_prefix(3, Codec::Vp8))));
        assert!(is_branch_element("enc12-h264-rtph264pay"));
        for shared in ["encoder-queue", "videoconvert", "tee", "clocksync", "enc-x", "rtspsrc"] {
            assert!(!is_branch_element(shared), "{shared}");
        }
    }

    #[test]
    fn provider_names_debian_packages() {
        assert_eq!(provider("x264enc"), ("x264", "gstreamer1.0-plugins-ugly"));
        assert_eq!(provider("textoverlay").1, "gstreamer1.0-x");
    }
}
