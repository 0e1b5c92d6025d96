//! Real GStreamer pipelines, from the test pattern (or a file, a missing camera, a dead RTSP server)
//! to RTP packets in a channel. No timing asserts: waits are bounded only so a broken pipeline
//! fails the test instead of hanging it, and "soon" is counted in frames.
#![cfg(feature = "gst")]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use media::gst::{Codec, MediaError, Source, VideoPipeline, VideoSettings, h264_rtp_is_keyframe, vp8_rtp_is_keyframe};
use tokio::sync::mpsc;

/// Long enough for a loaded 2-core CI machine to start x264; a stall fails here instead of hanging.
const PACKET_WAIT: Duration = Duration::from_secs(30);

fn settings(codec: Codec) -> VideoSettings {
    VideoSettings {
        source: Source::TestPattern,
        codec,
        width: 320,
        height: 240,
        framerate: 30,
        bitrate_kbps: 300,
        min_bitrate_kbps: 100,
        max_bitrate_kbps: 1_000,
        keyframe_interval_s: 2,
    }
}

/// The receiving side of a pipeline, reading packets and tracking frames.
struct Receiver {
    rx: mpsc::Receiver<Bytes>,
    is_keyframe: fn(&[u8]) -> bool,
}

/// One packet's facts that the tests look at.
struct Packet {
    bytes: Bytes,
    timestamp: u32,
    marker: bool,
    keyframe: bool,
}

impl Receiver {
    fn new(codec: Codec, rx: mpsc::Receiver<Bytes>) -> Self {
        let is_keyframe = match codec {
            Codec::H264 => h264_rtp_is_keyframe,
            Codec::Vp8 => vp8_rtp_is_keyframe,
        };
        Receiver { rx, is_keyframe }
    }

    async fn packet(&mut self, pipeline: &VideoPipeline) -> Packet {
        let bytes = match tokio::time::timeout(PACKET_WAIT, self.rx.recv()).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => panic!("packet channel closed: {:?}", pipeline.error()),
            Err(_) => panic!("no RTP packet within {PACKET_WAIT:?}: {:?}", pipeline.stats()),
        };
        assert!(bytes.len() >= 12 && bytes.len() <= 1200, "RTP packet of {} bytes", bytes.len());
        assert_eq!(bytes[0] >> 6, 2, "RTP version");
        assert_eq!(bytes[1] & 0x7f, 96, "payload type");
        Packet {
            timestamp: u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            marker: bytes[1] & 0x80 != 0,
            keyframe: (self.is_keyframe)(&bytes),
            bytes,
        }
    }

    /// Reads up to `max_packets` until a packet starting a keyframe, and returns it.
    async fn until_keyframe(&mut self, pipeline: &VideoPipeline, max_packets: usize) -> Option<Packet> {
        for _ in 0..max_packets {
            let p = self.packet(pipeline).await;
            if p.keyframe {
                return Some(p);
            }
        }
        None
    }

    /// Reads `frames` whole frames (counted by the RTP marker bit); returns the timestamps of
    /// those that are keyframes.
    async fn frames(&mut self, pipeline: &VideoPipeline, frames: usize) -> BTreeSet<u32> {
        let mut keyframes = BTreeSet::new();
        let mut seen = 0;
        while seen < frames {
            let p = self.packet(pipeline).await;
            if p.keyframe {
                keyframes.insert(p.timestamp);
            }
            if p.marker {
                seen += 1;
            }
        }
        keyframes
    }
}

/// The first keyframe arrives, then a requested one well before the periodic one (two seconds,
/// 60 frames at 30 fps): we ask 10 frames after the first and expect it within 25 more.
async fn keyframes_on_request(codec: Codec, encoder: &str) {
    let (tx, rx) = mpsc::channel(1024);
    let pipeline = VideoPipeline::start(&settings(codec), tx).expect("pipeline starts");
    assert_eq!(pipeline.encoder(), encoder);
    let mut rx = Receiver::new(codec, rx);

    let first = rx.until_keyframe(&pipeline, 300).await.expect("a keyframe in the first 300 packets");
    if codec == Codec::H264 {
        let (profile_idc, constraints) = sps_profile(&first.bytes).expect("SPS sent with the first keyframe");
        assert_eq!(profile_idc, 0x42, "baseline profile");
        assert_ne!(constraints & 0x40, 0, "constraint_set1: constrained baseline, as browsers expect (42e0xx)");
    }
    let first = first.timestamp;
    let before = rx.frames(&pipeline, 10).await;
    assert!(before.iter().all(|&ts| ts == first), "no new keyframe expected yet: {before:?}");

    pipeline.request_keyframe();
    let after = rx.frames(&pipeline, 25).await;
    assert!(
        after.iter().any(|&ts| ts != first),
        "no keyframe within 25 frames of the request (first keyframe ts {first})"
    );
    let stats = pipeline.stats();
    assert_eq!(stats.keyframes_requested, 1);
    assert!(stats.packets >= 36, "{stats:?}");
    assert!(stats.bytes > stats.packets * 12, "{stats:?}");
    assert!(!stats.failed && pipeline.error().is_none());
    pipeline.stop();
}

/// `profile_idc` and the constraint flags of an SPS carried alone or in a STAP-A (RTP header of
/// 12 bytes, as rtph264pay writes it).
fn sps_profile(packet: &[u8]) -> Option<(u8, u8)> {
    let payload = packet.get(12..)?;
    match payload[0] & 0x1f {
        7 => Some((*payload.get(1)?, *payload.get(2)?)),
        24 => {
            let mut rest = &payload[1..];
            while rest.len() > 2 {
                let size = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let nal = rest.get(2..2 + size)?;
                if nal.len() >= 3 && nal[0] & 0x1f == 7 {
                    return Some((nal[1], nal[2]));
                }
                rest = &rest[2 + size..];
            }
            None
        }
        _ => None,
    }
}

#[tokio::test]
async fn h264_test_pattern_gives_keyframes_first_and_on_request() {
    keyframes_on_request(Codec::H264, "x264enc").await;
}

#[tokio::test]
async fn vp8_test_pattern_gives_keyframes_first_and_on_request() {
    keyframes_on_request(Codec::Vp8, "vp8enc").await;
}

async fn bitrate_follows_and_is_clamped(codec: Codec) {
    let (tx, rx) = mpsc::channel(1024);
    let pipeline = VideoPipeline::start(&settings(codec), tx).expect("pipeline starts");
    let mut rx = Receiver::new(codec, rx);
    rx.frames(&pipeline, 5).await;
    assert_eq!(pipeline.encoder_bitrate_kbps(), Some(300));

    assert_eq!(pipeline.set_bitrate(50_000), 1_000, "clamped to max");
    assert_eq!(pipeline.encoder_bitrate_kbps(), Some(1_000));
    assert_eq!(pipeline.set_bitrate(10), 100, "clamped to min");
    assert_eq!(pipeline.encoder_bitrate_kbps(), Some(100));
    assert_eq!(pipeline.set_bitrate(640), 640);
    assert_eq!(pipeline.encoder_bitrate_kbps(), Some(640));
    assert_eq!(pipeline.stats().bitrate_kbps, 640);

    // The live encoder keeps going after being reconfigured.
    rx.frames(&pipeline, 10).await;
    assert!(pipeline.error().is_none());
}

#[tokio::test]
async fn h264_set_bitrate_clamps_and_reaches_x264enc() {
    bitrate_follows_and_is_clamped(Codec::H264).await;
}

#[tokio::test]
async fn vp8_set_bitrate_clamps_and_reaches_vp8enc() {
    bitrate_follows_and_is_clamped(Codec::Vp8).await;
}

#[tokio::test]
async fn full_channel_drops_and_counts_without_blocking() {
    let (tx, mut rx) = mpsc::channel(4);
    let pipeline = VideoPipeline::start(&settings(Codec::Vp8), tx).expect("pipeline starts");
    // Nobody reads: after the first four packets everything is dropped, and the pipeline keeps running.
    let mut waited = Duration::ZERO;
    while pipeline.stats().dropped_packets < 20 {
        assert!(waited < PACKET_WAIT, "no drops counted: {:?}", pipeline.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    let stats = pipeline.stats();
    assert_eq!(stats.packets, 4, "{stats:?}");
    assert!(!stats.failed);
    pipeline.stop();
    // Stopping closes the channel after what was queued.
    let mut queued = 0;
    while rx.recv().await.is_some() {
        queued += 1;
    }
    assert_eq!(queued, 4);
}

#[tokio::test]
async fn dropping_the_pipeline_closes_the_channel() {
    let (tx, rx) = mpsc::channel(1024);
    let pipeline = VideoPipeline::start(&settings(Codec::H264), tx).expect("pipeline starts");
    let mut rx = Receiver::new(Codec::H264, rx);
    rx.frames(&pipeline, 3).await;
    drop(pipeline);
    let mut rx = rx.rx;
    let closed = tokio::time::timeout(PACKET_WAIT, async { while rx.recv().await.is_some() {} }).await;
    assert!(closed.is_ok(), "channel still open after drop");
}

/// The console's pilots need not agree on a codec: a second encoder joins the running pipeline
/// behind the same source (a camera is opened once), starts with a keyframe, takes its own
/// keyframe requests and bitrate, and either encoder can leave without stopping the other.
#[tokio::test]
async fn a_second_codec_joins_the_same_source_and_either_can_leave() {
    let (tx, rx) = mpsc::channel(1024);
    let pipeline = VideoPipeline::start(&settings(Codec::H264), tx).expect("pipeline starts");
    let mut h264 = Receiver::new(Codec::H264, rx);
    h264.until_keyframe(&pipeline, 300).await.expect("an H.264 keyframe");

    let (tx, rx) = mpsc::channel(1024);
    assert_eq!(pipeline.add_codec(Codec::Vp8, tx).expect("VP8 joins"), "vp8enc");
    let mut vp8 = Receiver::new(Codec::Vp8, rx);
    let first = vp8.packet(&pipeline).await;
    assert!(first.keyframe, "the new encoder's first packet starts a keyframe");
    let mut codecs = pipeline.codecs();
    codecs.sort_by_key(|c| c.to_string());
    assert_eq!(codecs, [Codec::H264, Codec::Vp8]);
    let (tx, _unused) = mpsc::channel(4);
    assert!(pipeline.add_codec(Codec::Vp8, tx).is_err(), "one encoder per codec");

    // Both flow, each at its own bitrate.
    h264.frames(&pipeline, 10).await;
    vp8.frames(&pipeline, 10).await;
    assert_eq!(pipeline.set_bitrate_for(Codec::Vp8, 200), Some(200));
    assert_eq!(pipeline.encoder_bitrate_kbps_for(Codec::Vp8), Some(200));
    assert_eq!(pipeline.encoder_bitrate_kbps_for(Codec::H264), Some(300));

    // A keyframe request reaches only its own encoder.
    let before = vp8.until_keyframe(&pipeline, 2000).await.expect("a VP8 keyframe").timestamp;
    vp8.frames(&pipeline, 5).await;
    assert!(pipeline.request_keyframe_for(Codec::Vp8));
    let after = vp8.frames(&pipeline, 25).await;
    assert!(after.iter().any(|&ts| ts != before), "no VP8 keyframe within 25 frames of the request");
    assert_eq!(pipeline.stats_for(Codec::Vp8).unwrap().keyframes_requested, 1);
    assert_eq!(pipeline.stats_for(Codec::H264).unwrap().keyframes_requested, 0);

    // The first encoder leaves: its channel closes, the other goes on.
    assert!(pipeline.remove_codec(Codec::H264));
    assert!(!pipeline.remove_codec(Codec::H264));
    let mut rx = h264.rx;
    let closed = tokio::time::timeout(PACKET_WAIT, async { while rx.recv().await.is_some() {} }).await;
    assert!(closed.is_ok(), "the removed encoder's channel is still open");
    assert_eq!(pipeline.codecs(), [Codec::Vp8]);
    assert!(pipeline.stats_for(Codec::H264).is_none());
    vp8.frames(&pipeline, 10).await;

    // And comes back, from a keyframe with its parameter sets.
    let (tx, rx) = mpsc::channel(1024);
    pipeline.add_codec(Codec::H264, tx).expect("H.264 joins again");
    let mut h264 = Receiver::new(Codec::H264, rx);
    let first = h264.packet(&pipeline).await;
    let first_ts = first.timestamp;
    let key = if first.keyframe { first } else { h264.until_keyframe(&pipeline, 50).await.expect("a keyframe") };
    assert_eq!(key.timestamp, first_ts, "the returning encoder's first frame is a keyframe");
    assert!(sps_profile(&key.bytes).is_some(), "the returning encoder starts with its SPS");
    h264.frames(&pipeline, 10).await;
    vp8.frames(&pipeline, 10).await;
    assert!(pipeline.error().is_none() && pipeline.error_for(Codec::Vp8).is_none());
    pipeline.stop();
}

/// The same with a file (a source that is not live, whose sinks keep to the clock): the encoder
/// added while it plays gets the rest of it, and both channels close at its end.
#[tokio::test]
async fn a_codec_added_to_a_playing_file_gets_the_rest_of_it() {
    let path: PathBuf = std::env::temp_dir().join(format!("tether-media-clip-two-{}.webm", std::process::id()));
    write_clip_frames(&path, 120);
    let (tx, rx) = mpsc::channel(4096);
    let settings = VideoSettings { source: Source::File { path: path.clone() }, ..settings(Codec::H264) };
    let pipeline = VideoPipeline::start(&settings, tx).expect("pipeline starts");
    let mut h264 = Receiver::new(Codec::H264, rx);
    h264.packet(&pipeline).await;
    let (tx, mut vp8) = mpsc::channel(4096);
    pipeline.add_codec(Codec::Vp8, tx).expect("VP8 joins");
    let count = |mut rx: mpsc::Receiver<Bytes>, keyframe: fn(&[u8]) -> bool| async move {
        let (mut packets, mut keyframes) = (0, 0);
        while let Some(p) = rx.recv().await {
            packets += 1;
            keyframes += usize::from(keyframe(&p));
        }
        (packets, keyframes)
    };
    let both = async {
        let vp8_first = tokio::time::timeout(PACKET_WAIT, vp8.recv()).await.expect("a VP8 packet in time");
        assert!(vp8_first.is_some_and(|p| vp8_rtp_is_keyframe(&p)), "VP8 starts with a keyframe");
        tokio::join!(count(h264.rx, h264_rtp_is_keyframe), count(vp8, vp8_rtp_is_keyframe))
    };
    let ((h264_packets, _), (vp8_packets, _)) =
        tokio::time::timeout(Duration::from_secs(60), both).await.expect("the file plays out");
    let _ = std::fs::remove_file(&path);
    assert!(h264_packets > 0 && vp8_packets > 0, "{h264_packets} H.264 and {vp8_packets} VP8 packets");
    assert!(pipeline.stats().ended, "{:?}: {:?}", pipeline.stats(), pipeline.error());
    assert!(pipeline.error().is_none() && pipeline.error_for(Codec::Vp8).is_none());
}

#[test]
fn missing_v4l2_device_fails_with_a_clear_error() {
    let (tx, _rx) = mpsc::channel(16);
    let settings = VideoSettings { source: "v4l2:/dev/video-tether-missing".parse().unwrap(), ..settings(Codec::H264) };
    let err = VideoPipeline::start(&settings, tx).expect_err("no such camera");
    assert_eq!(err, MediaError::DeviceNotFound { path: "/dev/video-tether-missing".into() });
    assert!(err.to_string().contains("/dev/video-tether-missing"), "{err}");
}

#[test]
fn v4l2_device_that_is_not_a_camera_fails_at_start() {
    let (tx, _rx) = mpsc::channel(16);
    let settings = VideoSettings { source: "/dev/null".parse().unwrap(), ..settings(Codec::H264) };
    let err = VideoPipeline::start(&settings, tx).expect_err("/dev/null is not a camera");
    match &err {
        MediaError::Pipeline { element, .. } => assert_eq!(element, "v4l2src", "{err}"),
        other => panic!("unexpected error: {other}"),
    }
}

#[test]
fn missing_file_fails_with_a_clear_error() {
    let (tx, _rx) = mpsc::channel(16);
    let settings = VideoSettings { source: "file:/nonexistent/clip.mp4".parse().unwrap(), ..settings(Codec::Vp8) };
    let err = VideoPipeline::start(&settings, tx).expect_err("no such file");
    assert_eq!(err, MediaError::FileNotFound { path: "/nonexistent/clip.mp4".into() });
}

#[test]
fn invalid_settings_are_refused_before_gstreamer_sees_them() {
    let (tx, _rx) = mpsc::channel(16);
    for bad in [
        VideoSettings { width: 0, ..settings(Codec::H264) },
        VideoSettings { width: 321, ..settings(Codec::H264) },
        VideoSettings { framerate: 0, ..settings(Codec::H264) },
        VideoSettings { min_bitrate_kbps: 2_000, ..settings(Codec::H264) },
    ] {
        let err = VideoPipeline::start(&bad, tx.clone()).expect_err("invalid settings");
        assert!(matches!(err, MediaError::InvalidSettings(_)), "{err}");
    }
}

/// Writes a short VP8/WebM clip with GStreamer itself.
fn write_clip(path: &std::path::Path) {
    write_clip_frames(path, 45);
}

/// Writes a VP8/WebM clip of `frames` frames at 30 fps.
fn write_clip_frames(path: &std::path::Path, frames: u32) {
    use gstreamer as gst;
    use gstreamer::prelude::*;
    media::gst::init().unwrap();
    let description = format!(
        "videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,width=320,height=240,framerate=30/1 \
         ! vp8enc deadline=1 ! webmmux ! filesink location=\"{}\"",
        path.display()
    );
    let pipeline = gst::parse::launch(&description).unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let msg = bus
        .timed_pop_filtered(gst::ClockTime::from_seconds(60), &[gst::MessageType::Eos, gst::MessageType::Error])
        .expect("clip written within 60 s");
    assert!(matches!(msg.view(), gst::MessageView::Eos(_)), "{msg:?}");
    pipeline.set_state(gst::State::Null).unwrap();
}

#[tokio::test]
async fn file_source_plays_to_its_end_and_closes_the_channel() {
    let path: PathBuf = std::env::temp_dir().join(format!("tether-media-clip-{}.webm", std::process::id()));
    write_clip(&path);
    let (tx, mut rx) = mpsc::channel(4096);
    let settings = VideoSettings { source: Source::File { path: path.clone() }, ..settings(Codec::H264) };
    let pipeline = VideoPipeline::start(&settings, tx).expect("pipeline starts");
    let mut packets = 0;
    let mut keyframes = 0;
    let read_all = async {
        while let Some(p) = rx.recv().await {
            packets += 1;
            keyframes += usize::from(h264_rtp_is_keyframe(&p));
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read_all).await.expect("the file plays out");
    let _ = std::fs::remove_file(&path);
    assert!(packets > 0 && keyframes > 0, "{packets} packets, {keyframes} keyframe packets");
    let stats = pipeline.stats();
    assert!(stats.ended, "{stats:?}: {:?}", pipeline.error());
    assert!(pipeline.error().is_none());
}

#[tokio::test]
async fn unreachable_rtsp_camera_closes_the_channel_with_an_error() {
    // A port that was just free on loopback: the connection is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (tx, mut rx) = mpsc::channel(16);
    let settings =
        VideoSettings { source: format!("rtsp://127.0.0.1:{port}/camera").parse().unwrap(), ..settings(Codec::H264) };
    let pipeline = VideoPipeline::start(&settings, tx).expect("rtspsrc starts, then fails");
    let closed = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await.expect("channel closes");
    assert!(closed.is_none());
    let err = pipeline.error().expect("the failure is reported");
    assert!(matches!(&err, MediaError::Pipeline { element, .. } if element == "rtspsrc"), "{err}");
    assert!(pipeline.stats().failed);
}

#[test]
fn sources_parse_from_config_strings() {
    let cases: [(&str, Source); 8] = [
        ("testpattern", Source::TestPattern),
        ("  TestPattern ", Source::TestPattern),
        ("v4l2:/dev/video0", Source::V4l2 { device: "/dev/video0".into() }),
        ("/dev/video2", Source::V4l2 { device: "/dev/video2".into() }),
        ("rtsp://192.0.2.7:8554/cam", Source::Rtsp { url: "rtsp://192.0.2.7:8554/cam".into() }),
        ("rtsps://cam.local/s", Source::Rtsp { url: "rtsps://cam.local/s".into() }),
        ("file:/srv/clip.mp4", Source::File { path: "/srv/clip.mp4".into() }),
        ("file:///srv/clip.mp4", Source::File { path: "/srv/clip.mp4".into() }),
    ];
    for (input, expected) in cases {
        assert_eq!(input.parse::<Source>().unwrap(), expected, "{input}");
    }
    for source in [Source::TestPattern, Source::V4l2 { device: "/dev/video0".into() }] {
        assert_eq!(source.to_string().parse::<Source>().unwrap(), source);
    }
}

#[test]
fn bad_sources_say_what_is_expected() {
    for input in ["", "v4l2:", "v4l2:video0", "rtsp://", "rtsp:///path", "file:", "camera0", "http://x/y"] {
        let err = input.parse::<Source>().expect_err(input);
        assert!(matches!(err, MediaError::InvalidSource { .. }), "{input}: {err}");
        assert!(err.to_string().contains("invalid video source"), "{err}");
    }
    let err = "camera0".parse::<Source>().unwrap_err().to_string();
    assert!(err.contains("testpattern") && err.contains("v4l2:/dev/videoN") && err.contains("rtsp://"), "{err}");
}

#[test]
fn codecs_parse_and_name_their_mime_type() {
    assert_eq!("h264".parse::<Codec>().unwrap(), Codec::H264);
    assert_eq!("VP8".parse::<Codec>().unwrap(), Codec::Vp8);
    assert_eq!(Codec::H264.mime(), "video/H264");
    assert_eq!(Codec::Vp8.mime(), "video/VP8");
    assert!(matches!("vp9".parse::<Codec>(), Err(MediaError::InvalidCodec(_))));
}

/// A minimal RTP packet: version 2, payload type 96, optional CSRC and header extension.
fn rtp(payload: &[u8], csrcs: u8, extension_words: u16) -> Vec<u8> {
    let mut p = vec![0x80 | csrcs, 0x80 | 96, 0, 1, 0, 0, 0x0b, 0xb8, 1, 2, 3, 4];
    for _ in 0..csrcs {
        p.extend_from_slice(&[9, 9, 9, 9]);
    }
    if extension_words > 0 {
        p[0] |= 0x10;
        p.extend_from_slice(&[0xbe, 0xde]);
        p.extend_from_slice(&extension_words.to_be_bytes());
        p.extend(std::iter::repeat_n(0u8, 4 * usize::from(extension_words)));
    }
    p.extend_from_slice(payload);
    p
}

#[test]
fn h264_keyframe_detector_reads_single_stap_a_and_fu_a() {
    // Single NAL units: IDR (5) and SPS (7) are keyframes, a non-IDR slice (1) and PPS (8) are not.
    assert!(h264_rtp_is_keyframe(&rtp(&[0x65, 0x88, 0x84], 0, 0)));
    assert!(h264_rtp_is_keyframe(&rtp(&[0x67, 0x42, 0xe0, 0x1f], 0, 0)));
    assert!(!h264_rtp_is_keyframe(&rtp(&[0x41, 0x9a, 0x02], 0, 0)));
    assert!(!h264_rtp_is_keyframe(&rtp(&[0x68, 0xce], 0, 0)));
    // STAP-A (24) holding PPS then SPS; and one holding only slices.
    let stap_key = [0x78, 0x00, 0x02, 0x68, 0xce, 0x00, 0x04, 0x67, 0x42, 0xe0, 0x1f];
    assert!(h264_rtp_is_keyframe(&rtp(&stap_key, 0, 0)));
    assert!(!h264_rtp_is_keyframe(&rtp(&[0x78, 0x00, 0x02, 0x41, 0x9a, 0x00, 0x02, 0x41, 0x9b], 0, 0)));
    // A STAP-A whose size runs past the end is not trusted.
    assert!(!h264_rtp_is_keyframe(&rtp(&[0x78, 0x00, 0x09, 0x68, 0xce], 0, 0)));
    // FU-A (28): only the start fragment of an IDR counts.
    assert!(h264_rtp_is_keyframe(&rtp(&[0x7c, 0x85, 0x88], 0, 0)));
    assert!(!h264_rtp_is_keyframe(&rtp(&[0x7c, 0x05, 0x88], 0, 0)), "middle fragment");
    assert!(!h264_rtp_is_keyframe(&rtp(&[0x7c, 0x81, 0x9a], 0, 0)), "non-IDR start");
    // The header's CSRCs and extension are skipped.
    assert!(h264_rtp_is_keyframe(&rtp(&[0x65, 0x88], 2, 1)));
    assert!(!h264_rtp_is_keyframe(&rtp(&[0x41, 0x9a], 2, 1)));
    // Garbage is not a keyframe.
    assert!(!h264_rtp_is_keyframe(&[]));
    assert!(!h264_rtp_is_keyframe(&[0x80, 96, 0, 1]));
    assert!(!h264_rtp_is_keyframe(&rtp(&[], 0, 0)));
    let mut wrong_version = rtp(&[0x65], 0, 0);
    wrong_version[0] = 0x40;
    assert!(!h264_rtp_is_keyframe(&wrong_version));
}

#[test]
fn vp8_keyframe_detector_reads_the_descriptor_and_frame_tag() {
    // Key frame tag: P bit 0, then the start code 9d 01 2a after three bytes.
    let key = [0x50, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xf0, 0x00];
    let inter = [0x31, 0x02, 0x00, 0x12, 0x34, 0x56];
    let with = |descriptor: &[u8], frame: &[u8]| rtp(&[descriptor, frame].concat(), 0, 0);

    assert!(vp8_rtp_is_keyframe(&with(&[0x10], &key)), "S=1, no extension");
    assert!(!vp8_rtp_is_keyframe(&with(&[0x10], &inter)));
    assert!(!vp8_rtp_is_keyframe(&with(&[0x00], &key)), "not the start of a partition");
    assert!(!vp8_rtp_is_keyframe(&with(&[0x11], &key)), "partition 1");
    // X=1 with a 15-bit picture id (what rtpvp8pay sends), then TL0PICIDX and TID/KEYIDX.
    assert!(vp8_rtp_is_keyframe(&with(&[0x90, 0x80, 0x81, 0x23], &key)));
    assert!(vp8_rtp_is_keyframe(&with(&[0x90, 0x80, 0x05], &key)), "7-bit picture id");
    assert!(vp8_rtp_is_keyframe(&with(&[0x90, 0xe0, 0x81, 0x23, 0x07, 0x40], &key)));
    assert!(!vp8_rtp_is_keyframe(&with(&[0x90, 0x80, 0x81, 0x23], &inter)));
    // Truncated descriptors and frame tags.
    assert!(!vp8_rtp_is_keyframe(&with(&[0x90], &[])));
    assert!(!vp8_rtp_is_keyframe(&with(&[0x10], &key[..4])));
    assert!(vp8_rtp_is_keyframe(&rtp(&[&[0x10][..], &key].concat(), 1, 2)), "CSRC and extension skipped");
}
