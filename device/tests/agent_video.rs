//! Live video end to end: the real agent binary streams its test pattern (videotestsrc) over
//! WebRTC to a `media::viewer::Viewer` in the test, with the real relay carrying the signaling
//! on an operator WebSocket, as it does for the console.
//!
//! What arrives must be video a decoder can show at the configured size:
//! - RTP sequence numbers only move forward, and keyframes are present (IDR with SPS/PPS for
//!   H.264, key frames for VP8);
//! - the codec's own header states the configured size: the H.264 SPS (macroblock counts and
//!   cropping) or the VP8 key frame header (14-bit width and height);
//! - H.264 frames keep their NAL units in the order the standard requires (no parameter set or
//!   delimiter between the slices of one picture);
//! - the packets, from the first keyframe on, go through a GStreamer decoder (`avdec_h264` or
//!   `openh264dec`; `vp8dec`) and come out as frames of that size. Where no decoder element is
//!   installed the test says so and the header checks stand alone.
//!
//! Then a PLI from the viewer brings a keyframe before the encoder's periodic one would come,
//! and the pilot closing its WebSocket makes the agent end the session and stop its pipeline.
//!
//! The codec: `h264` and `vp8` send that codec; `auto` (the default) answers H.264 when the
//! offer has it and VP8 otherwise (Firefox without OpenH264), refuses an offer with neither with
//! `negotiation_failed` and a message naming both sides, and serves an H.264 and a VP8 viewer at
//! once from one source, each codec's encoder coming and going with its viewers.
//! No timing is asserted beyond generous deadlines.
#![cfg(feature = "video")]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::video::Pilot;
use common::*;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use media::viewer::OfferedCodec;
use rtc::rtp;
use rtc::rtp::codec::h264::H264Packet;
use rtc::rtp::packetizer::Depacketizer;
use rtc::shared::marshal::Marshal;
use serde_json::json;
use tokio::sync::mpsc;

/// Generous: a session on loopback comes up in well under a second, but the agent also starts
/// a GStreamer pipeline, and CI machines are slow and busy.
const DEADLINE: Duration = Duration::from_secs(60);

const WIDTH: u32 = 320;
const HEIGHT: u32 = 240;
const FRAMERATE: u32 = 15;
/// The encoder's own keyframe interval: `media::gst` makes one every two seconds of frames.
const GOP_FRAMES: u64 = 2 * FRAMERATE as u64;
/// Frames collected from the first keyframe on, for the checks and the decoder.
const FRAMES: u64 = 20;
/// Bound on the packets read while collecting them (a 320x240 frame is a handful).
const MAX_PACKETS: usize = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    H264,
    Vp8,
}

impl Codec {
    fn config_name(self) -> &'static str {
        match self {
            Codec::H264 => "h264",
            Codec::Vp8 => "vp8",
        }
    }

    /// What a browser offers: Chrome's H.264 list, and VP8 after it.
    fn offered() -> Vec<OfferedCodec> {
        let mut codecs = OfferedCodec::chrome_like_h264();
        codecs.push(OfferedCodec::vp8());
        codecs
    }

    /// What Debian's Firefox offers without its OpenH264 plugin (downloaded at run time, so
    /// missing offline): VP8 and VP9, no H.264.
    fn firefox_without_openh264() -> Vec<OfferedCodec> {
        vec![OfferedCodec::new("video/VP8", "max-fs=12288;max-fr=60", 120), vp9()]
    }

    fn mime(self) -> &'static str {
        match self {
            Codec::H264 => "video/h264",
            Codec::Vp8 => "video/vp8",
        }
    }

    /// Whether the packet starts a keyframe (H.264: carries an SPS or an IDR slice).
    fn is_keyframe(self, packet: &rtp::Packet) -> bool {
        let raw = packet.marshal().unwrap();
        match self {
            Codec::H264 => media::gst::h264_rtp_is_keyframe(&raw),
            Codec::Vp8 => media::gst::vp8_rtp_is_keyframe(&raw),
        }
    }
}

/// boat-7's config: no local inputs (parallel tests would share their default addresses), and
/// the given `video:` block.
fn config(dir: &std::path::Path, addr: std::net::SocketAddr, secret: &str, video: &str) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "serverAddress: \"ws://{addr}/ws\"\nclientID: boat-7\nclientSecret: \"{secret}\"\nname: Boat 7\n\
             logLevel: info\nreconnectInterval: 0.2\n\
             telemetry:\n  systemMetrics: false\n  udp: \"\"\n  unixSocket: \"\"\n{video}"
        ),
    )
    .unwrap();
    path
}

fn vp9() -> OfferedCodec {
    OfferedCodec::new("video/VP9", "profile-id=0", 121)
}

/// The `video:` block with `video.codec` set to `codec`, or left out (the default, `auto`).
fn video_block(codec: Option<&str>) -> String {
    let codec = codec.map(|c| format!("  codec: {c}\n")).unwrap_or_default();
    format!(
        "video:\n  enabled: true\n  source: testpattern\n{codec}  width: {WIDTH}\n  height: {HEIGHT}\n  \
         framerate: {FRAMERATE}\n  includeLoopback: true\n"
    )
}

/// The viewer's packets as frames: checks on every packet that sequence numbers only move
/// forward, and numbers frames by RTP timestamp.
struct Stream {
    codec: Codec,
    last_seq: Option<u16>,
    last_timestamp: Option<u32>,
    /// Index of the frame the last packet belongs to.
    frame: u64,
    /// The frame of the last keyframe reported by `next_keyframe`.
    last_keyframe: Option<u64>,
    /// Sequence gaps seen (loss; none expected on loopback, but not an error).
    gaps: u64,
}

impl Stream {
    fn new(codec: Codec) -> Stream {
        Stream { codec, last_seq: None, last_timestamp: None, frame: 0, last_keyframe: None, gaps: 0 }
    }

    async fn next(&mut self, packets: &mut mpsc::Receiver<rtp::Packet>) -> rtp::Packet {
        let p = tokio::time::timeout(DEADLINE, packets.recv())
            .await
            .expect("no RTP packet in time")
            .expect("the viewer's packet stream ended");
        let seq = p.header.sequence_number;
        if let Some(last) = self.last_seq {
            let step = seq.wrapping_sub(last);
            assert!((1..0x8000).contains(&step), "sequence number went from {last} to {seq}");
            self.gaps += u64::from(step - 1);
        }
        self.last_seq = Some(seq);
        if self.last_timestamp.is_some_and(|t| t != p.header.timestamp) {
            self.frame += 1;
        }
        self.last_timestamp = Some(p.header.timestamp);
        p
    }

    /// Reads up to the first packet of the next keyframe; returns its frame's index.
    async fn next_keyframe(&mut self, packets: &mut mpsc::Receiver<rtp::Packet>) -> u64 {
        loop {
            let p = self.next(packets).await;
            if self.codec.is_keyframe(&p) && self.last_keyframe != Some(self.frame) {
                self.last_keyframe = Some(self.frame);
                return self.frame;
            }
        }
    }

    /// Reads until frame `frame` has begun.
    async fn until_frame(&mut self, packets: &mut mpsc::Receiver<rtp::Packet>, frame: u64) {
        while self.frame < frame {
            self.next(packets).await;
        }
    }
}

/// Reads packets from the first keyframe until `FRAMES` frames have arrived; returns those
/// frames' packets (the first is the keyframe's first).
async fn collect(stream: &mut Stream, packets: &mut mpsc::Receiver<rtp::Packet>) -> Vec<rtp::Packet> {
    let mut all = Vec::new();
    let first_key = loop {
        let p = stream.next(packets).await;
        let key = stream.codec.is_keyframe(&p);
        all.push(p);
        if key {
            stream.last_keyframe = Some(stream.frame);
            break stream.frame;
        }
        assert!(all.len() < MAX_PACKETS, "no keyframe in {MAX_PACKETS} packets");
    };
    // Earlier packets of the keyframe's frame belong to it (an SEI before the SPS, say).
    let timestamp = all.last().unwrap().header.timestamp;
    let start = all.iter().position(|p| p.header.timestamp == timestamp).unwrap();
    let mut got = all.split_off(start);
    loop {
        let p = stream.next(packets).await;
        if stream.frame >= first_key + FRAMES {
            return got;
        }
        got.push(p);
        assert!(got.len() < MAX_PACKETS, "{FRAMES} frames took more than {MAX_PACKETS} packets");
    }
}

/// Groups packets into frames by timestamp, in order.
fn frames(packets: &[rtp::Packet]) -> Vec<&[rtp::Packet]> {
    packets.chunk_by(|a, b| a.header.timestamp == b.header.timestamp).collect()
}

/// The NAL units of H.264 packets (RFC 6184: single NAL, STAP-A, FU-A), via the webrtc crate's
/// depacketizer.
fn h264_nals(packets: &[rtp::Packet]) -> Vec<Vec<u8>> {
    let mut depacketizer = H264Packet::default();
    let mut nals = Vec::new();
    for p in packets {
        let annex_b = depacketizer.depacketize(&p.payload).unwrap();
        // Annex B: every NAL after a 4-byte start code (emulation prevention keeps the code
        // itself out of NAL bodies).
        let mut rest = &annex_b[..];
        while let Some(body) = rest.strip_prefix(&[0, 0, 0, 1][..]) {
            let end = body.windows(4).position(|w| w == [0, 0, 0, 1]).unwrap_or(body.len());
            nals.push(body[..end].to_vec());
            rest = &body[end..];
        }
    }
    nals
}

/// The bits of an H.264 RBSP (emulation prevention bytes removed).
struct Bits {
    data: Vec<u8>,
    at: usize,
}

impl Bits {
    fn new(nal_body: &[u8]) -> Bits {
        let mut data = Vec::with_capacity(nal_body.len());
        let mut zeros = 0;
        for &b in nal_body {
            if zeros >= 2 && b == 3 {
                zeros = 0;
                continue;
            }
            zeros = if b == 0 { zeros + 1 } else { 0 };
            data.push(b);
        }
        Bits { data, at: 0 }
    }

    fn bit(&mut self) -> u32 {
        let byte = self.data.get(self.at / 8).copied().expect("SPS ended early");
        let bit = (byte >> (7 - self.at % 8)) & 1;
        self.at += 1;
        u32::from(bit)
    }

    fn bits(&mut self, n: u32) -> u32 {
        (0..n).fold(0, |v, _| (v << 1) | self.bit())
    }

    /// Exp-Golomb, unsigned.
    fn ue(&mut self) -> u32 {
        let mut zeros = 0;
        while self.bit() == 0 {
            zeros += 1;
            assert!(zeros < 32, "bad Exp-Golomb code in the SPS");
        }
        (1 << zeros) - 1 + self.bits(zeros)
    }

    fn se(&mut self) -> i32 {
        let k = self.ue();
        if k % 2 == 1 { k.div_ceil(2) as i32 } else { -((k / 2) as i32) }
    }
}

/// What the test reads from an SPS.
#[derive(Debug)]
struct Sps {
    profile_idc: u32,
    constraint_flags: u32,
    width: u32,
    height: u32,
}

/// Parses a sequence parameter set (H.264 7.3.2.1.1) up to the picture size and cropping.
fn parse_sps(nal: &[u8]) -> Sps {
    assert_eq!(nal[0] & 0x1f, 7, "not an SPS");
    let mut r = Bits::new(&nal[1..]);
    let profile_idc = r.bits(8);
    let constraint_flags = r.bits(8);
    let _level_idc = r.bits(8);
    let _sps_id = r.ue();
    let mut chroma_format_idc = 1;
    let mut separate_colour_planes = false;
    if [100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135].contains(&profile_idc) {
        chroma_format_idc = r.ue();
        if chroma_format_idc == 3 {
            separate_colour_planes = r.bit() == 1;
        }
        let _bit_depth_luma = r.ue();
        let _bit_depth_chroma = r.ue();
        let _qpprime_y_zero_transform_bypass = r.bit();
        assert_eq!(r.bit(), 0, "SPS scaling matrices are not parsed by this test");
    }
    let _log2_max_frame_num = r.ue();
    match r.ue() {
        0 => {
            let _log2_max_poc_lsb = r.ue();
        }
        1 => {
            let _delta_pic_order_always_zero = r.bit();
            let _offset_for_non_ref_pic = r.se();
            let _offset_for_top_to_bottom_field = r.se();
            for _ in 0..r.ue() {
                let _offset_for_ref_frame = r.se();
            }
        }
        _ => {}
    }
    let _max_num_ref_frames = r.ue();
    let _gaps_allowed = r.bit();
    let width_in_mbs = r.ue() + 1;
    let height_in_map_units = r.ue() + 1;
    let frame_mbs_only = r.bit();
    if frame_mbs_only == 0 {
        let _mb_adaptive_frame_field = r.bit();
    }
    let _direct_8x8_inference = r.bit();
    let (mut crop_left, mut crop_right, mut crop_top, mut crop_bottom) = (0, 0, 0, 0);
    if r.bit() == 1 {
        (crop_left, crop_right, crop_top, crop_bottom) = (r.ue(), r.ue(), r.ue(), r.ue());
    }
    // Crop units (7-19 to 7-22): in chroma samples, doubled vertically for field coding.
    let (sub_width, sub_height) = match (chroma_format_idc, separate_colour_planes) {
        (1, false) => (2, 2),
        (2, false) => (2, 1),
        _ => (1, 1),
    };
    let (crop_x, crop_y) = if chroma_format_idc == 0 || separate_colour_planes {
        (1, 2 - frame_mbs_only)
    } else {
        (sub_width, sub_height * (2 - frame_mbs_only))
    };
    Sps {
        profile_idc,
        constraint_flags,
        width: width_in_mbs * 16 - crop_x * (crop_left + crop_right),
        height: (2 - frame_mbs_only) * height_in_map_units * 16 - crop_y * (crop_top + crop_bottom),
    }
}

/// The H.264 checks: every keyframe carries SPS, PPS and an IDR slice; the SPS says
/// constrained baseline at the configured size; frame sizes are plausible.
fn check_h264(packets: &[rtp::Packet]) {
    let mut keyframes = 0;
    for frame in frames(packets) {
        let nals = h264_nals(frame);
        let types: Vec<u8> = nals.iter().map(|n| n[0] & 0x1f).collect();
        let bytes: usize = nals.iter().map(Vec::len).sum();
        assert!(types.iter().any(|t| matches!(t, 1 | 5)), "a frame without a slice: NAL types {types:?}");
        assert!(bytes < 1_000_000, "a {bytes}-byte frame at {WIDTH}x{HEIGHT}");
        // H.264 7.4.1.2.3: after a picture's last slice, an AUD, SPS, PPS or SEI starts the next
        // access unit. Between the slices of one frame they cut the picture in two, and a
        // decoder that follows the standard (openh264, GStreamer's parser) loses it.
        let first_slice = types.iter().position(|t| matches!(t, 1 | 5)).unwrap();
        assert!(
            !types[first_slice..].iter().any(|t| matches!(t, 6..=9)),
            "SEI, SPS, PPS or AUD between the slices of one frame: NAL types {types:?}"
        );
        if !types.contains(&5) {
            continue;
        }
        keyframes += 1;
        assert!(types.contains(&7) && types.contains(&8), "an IDR frame without SPS and PPS: NAL types {types:?}");
        assert!(bytes > 100, "a {bytes}-byte keyframe cannot hold a {WIDTH}x{HEIGHT} picture");
        for sps in nals.iter().filter(|n| n[0] & 0x1f == 7) {
            let sps = parse_sps(sps);
            assert_eq!((sps.width, sps.height), (WIDTH, HEIGHT), "{sps:?}");
            // profile-level-id 42e0xx: Baseline with constraint_set1 (constrained baseline).
            assert_eq!(sps.profile_idc, 66, "{sps:?}");
            assert!(sps.constraint_flags & 0x40 != 0, "not constrained baseline: {sps:?}");
        }
    }
    assert!(keyframes >= 1, "no IDR frame among {} packets", packets.len());
}

/// The VP8 data of a packet: its payload without the payload descriptor (RFC 7741 4.2). Not the
/// webrtc crate's depacketizer: it refuses payloads under 4 bytes, which the last fragment of a
/// frame can be (browsers take them).
fn vp8_data(payload: &[u8]) -> &[u8] {
    assert!(payload.len() >= 2, "a VP8 payload of {} bytes", payload.len());
    let first = payload[0];
    let mut at = 1;
    if first & 0x80 != 0 {
        let ext = payload[1];
        at = 2;
        if ext & 0x80 != 0 {
            // PictureID: 7 bits, or 15 with its M bit.
            at += if payload[at] & 0x80 != 0 { 2 } else { 1 };
        }
        if ext & 0x40 != 0 {
            at += 1; // TL0PICIDX
        }
        if ext & 0x30 != 0 {
            at += 1; // TID / Y / KEYIDX
        }
    }
    assert!(at < payload.len(), "a VP8 payload with no data: {payload:02x?}");
    &payload[at..]
}

/// The VP8 checks (RFC 6386 9.1): key frames start with the start code and state the
/// configured size, unscaled; frame sizes are plausible.
fn check_vp8(packets: &[rtp::Packet]) {
    let mut keyframes = 0;
    for frame in frames(packets) {
        let mut data = Vec::new();
        for p in frame {
            data.extend_from_slice(vp8_data(&p.payload));
        }
        assert!(data.len() >= 3 && data.len() < 1_000_000, "a {}-byte frame", data.len());
        let tag = u32::from(data[0]) | (u32::from(data[1]) << 8) | (u32::from(data[2]) << 16);
        let first_partition = (tag >> 5) as usize;
        assert!(first_partition < data.len(), "first partition {first_partition} of a {}-byte frame", data.len());
        if tag & 1 != 0 {
            continue;
        }
        keyframes += 1;
        assert!(data.len() > 100, "a {}-byte key frame cannot hold a {WIDTH}x{HEIGHT} picture", data.len());
        assert_eq!(data[3..6], [0x9d, 0x01, 0x2a], "key frame start code");
        let width = u16::from_le_bytes([data[6], data[7]]);
        let height = u16::from_le_bytes([data[8], data[9]]);
        assert_eq!(
            (u32::from(width & 0x3fff), u32::from(height & 0x3fff), width >> 14, height >> 14),
            (WIDTH, HEIGHT, 0, 0),
            "key frame size and scaling"
        );
    }
    assert!(keyframes >= 1, "no key frame among {} packets", packets.len());
}

/// Decodes the packets with GStreamer; returns the decoder used and the size of every decoded
/// frame, or None when no decoder element for the codec is installed.
fn decode(codec: Codec, payload_type: u8, packets: Vec<Bytes>) -> Option<(&'static str, Vec<(i32, i32)>)> {
    gst::init().unwrap();
    let (candidates, caps_name, depay): (&[&'static str], _, _) = match codec {
        Codec::H264 => (&["avdec_h264", "openh264dec"], "H264", "rtph264depay ! h264parse"),
        Codec::Vp8 => (&["vp8dec", "avdec_vp8"], "VP8", "rtpvp8depay"),
    };
    let decoder = candidates.iter().copied().find(|d| gst::ElementFactory::find(d).is_some())?;
    let description = format!(
        "appsrc name=src format=time do-timestamp=true block=true \
         caps=\"application/x-rtp,media=video,clock-rate=90000,encoding-name={caps_name},payload={payload_type}\" \
         ! {depay} ! {decoder} ! appsink name=sink sync=false"
    );
    let pipeline = gst::parse::launch(&description).unwrap().downcast::<gst::Pipeline>().unwrap();
    let src = pipeline.by_name("src").unwrap().downcast::<gst_app::AppSrc>().unwrap();
    let sink = pipeline.by_name("sink").unwrap().downcast::<gst_app::AppSink>().unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    for p in packets {
        src.push_buffer(gst::Buffer::from_slice(p)).unwrap();
    }
    src.end_of_stream().unwrap();
    let mut sizes = Vec::new();
    while let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_seconds(30)) {
        let s = sample.caps().unwrap().structure(0).unwrap().to_owned();
        sizes.push((s.get::<i32>("width").unwrap(), s.get::<i32>("height").unwrap()));
    }
    let error = pipeline.bus().unwrap().pop_filtered(&[gst::MessageType::Error]);
    pipeline.set_state(gst::State::Null).unwrap();
    if let Some(e) = error {
        panic!("{decoder} failed: {e:?}");
    }
    assert!(sink.is_eos(), "{decoder} stalled after {} frames", sizes.len());
    Some((decoder, sizes))
}

/// Receives `FRAMES` frames from the first keyframe on and checks them as `codec`: the
/// negotiated codec, the codec's headers, and a decoder's output.
async fn receive_and_decode(pilot: &mut Pilot, codec: Codec) -> Stream {
    let mut stream = Stream::new(codec);
    let packets = collect(&mut stream, &mut pilot.packets).await;
    let negotiated = pilot.viewer.codec().await.expect("the track has a codec");
    assert_eq!(negotiated.mime_type.to_ascii_lowercase(), codec.mime(), "{negotiated:?}");
    assert_eq!(negotiated.clock_rate, 90_000);
    if codec == Codec::H264 {
        // The offer's packetization-mode=1 constrained-baseline entry, with the offer's number.
        assert!(negotiated.fmtp.contains("packetization-mode=1"), "{negotiated:?}");
        assert!(negotiated.fmtp.contains("42e01f"), "{negotiated:?}");
    }
    assert!(packets.iter().all(|p| p.header.payload_type == negotiated.payload_type));
    match codec {
        Codec::H264 => check_h264(&packets),
        Codec::Vp8 => check_vp8(&packets),
    }

    let raw: Vec<Bytes> = packets.iter().map(|p| p.marshal().unwrap().freeze()).collect();
    let count = raw.len();
    let decoded = tokio::task::spawn_blocking(move || decode(codec, negotiated.payload_type, raw)).await.unwrap();
    match decoded {
        Some((decoder, sizes)) => {
            eprintln!("{decoder} decoded {} frames from {count} packets", sizes.len());
            // The last frame may still sit in the depayloader when the stream ends.
            assert!(sizes.len() as u64 >= FRAMES - 2, "{decoder} decoded {} of {FRAMES} frames", sizes.len());
            assert!(sizes.iter().all(|s| *s == (WIDTH as i32, HEIGHT as i32)), "{decoder} decoded sizes {sizes:?}");
        }
        None => eprintln!("NOTE: no {codec:?} decoder element installed; the codec header check stands alone"),
    }
    stream
}

/// The whole story for one session: an agent with `video.codec` set to `config_codec` (None:
/// the default), a pilot offering `offered`; `codec` is what must arrive. Connect through the
/// relay, receive, check, decode, PLI, leave.
async fn stream_through_the_relay(config_codec: Option<&str>, offered: Vec<OfferedCodec>, codec: Codec) {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    // `view` is all a pilot needs to watch.
    let (secret, key) = fleet(&running, "view");
    let cfg = config(dir.path(), addr, &secret, &video_block(config_codec));
    let mut agent = RunningAgent::spawn(&cfg, &[]);
    agent.wait_for_log("authenticated with the relay").await;

    let session = format!("video-{}-{}", config_codec.unwrap_or("default"), codec.config_name());
    let mut pilot = Pilot::offer_with(addr, &key, &session, offered, None).await;
    let ack = pilot.recv_until("the offer's ack", |v| v["correlationID"] == session.as_str()).await;
    assert_eq!((&ack["type"], &ack["payload"]["status"]), (&json!("ack"), &json!("delivered")), "{ack}");
    pilot.connected().await;

    let mut stream = receive_and_decode(&mut pilot, codec).await;

    // A PLI brings a keyframe before the periodic one. The request races the encoder's own
    // schedule only if it arrives within a frame or two of it, so a few tries settle it.
    let mut tries = Vec::new();
    loop {
        let before = stream.next_keyframe(&mut pilot.packets).await;
        stream.until_frame(&mut pilot.packets, before + 3).await;
        pilot.viewer.request_keyframe().await.unwrap();
        let after = stream.next_keyframe(&mut pilot.packets).await;
        if after - before < GOP_FRAMES {
            break;
        }
        tries.push(after - before);
        assert!(tries.len() < 3, "keyframes only every {tries:?} frames despite a PLI each time");
    }
    assert_eq!(stream.gaps, 0, "packets were lost on loopback");
    assert_eq!(pilot.viewer.dropped_packets(), 0);

    // The pilot leaves: the relay tells the agent, which ends the session and, as the last
    // viewer is gone, stops the pipeline.
    pilot.leave().await;
    let line = agent.wait_for_log("video session ended by the pilot side").await;
    assert!(line.contains("pilot_left"), "{line}");
    agent.wait_for_log("last viewer gone; video pipeline stopped").await;
    pilot.viewer.close().await;
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h264_test_pattern_reaches_a_webrtc_viewer_through_the_relay() {
    stream_through_the_relay(Some("h264"), Codec::offered(), Codec::H264).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vp8_test_pattern_reaches_a_webrtc_viewer_through_the_relay() {
    stream_through_the_relay(Some("vp8"), Codec::offered(), Codec::Vp8).await;
}

/// The default `video.codec` (`auto`) with Chrome's offer (H.264 and VP8): H.264.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_answers_an_offer_with_h264_and_vp8_in_h264() {
    stream_through_the_relay(None, Codec::offered(), Codec::H264).await;
}

/// `auto` with Firefox's offer when it has no OpenH264 (VP8 and VP9 only): VP8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_answers_an_offer_without_h264_in_vp8() {
    stream_through_the_relay(Some("auto"), Codec::firefox_without_openh264(), Codec::Vp8).await;
}

/// An offer with neither codec is refused with `negotiation_failed`, and the message names what
/// the offer had and what the agent can send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_refuses_an_offer_with_neither_h264_nor_vp8_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "view");
    let cfg = config(dir.path(), addr, &secret, &video_block(None));
    let mut agent = RunningAgent::spawn(&cfg, &[]);
    agent.wait_for_log("authenticated with the relay").await;

    let offered = vec![vp9(), OfferedCodec::new("video/AV1", "", 99), OfferedCodec::new("video/rtx", "apt=121", 122)];
    let mut pilot = Pilot::offer_with(addr, &key, "neither-1", offered, None).await;
    let bye = pilot.recv_until("bye", |v| v["type"] == "webrtc" && v["payload"]["subtype"] == "bye").await;
    assert_eq!((&bye["from"], &bye["payload"]["sessionID"]), (&json!("boat-7"), &json!("neither-1")), "{bye}");
    assert_eq!(bye["payload"]["reason"], "negotiation_failed", "{bye}");
    let message = bye["payload"]["message"].as_str().unwrap_or_default();
    for part in ["video/H264", "packetization-mode=1", "video/VP8", "offered: video/VP9 profile-id=0, video/AV1"] {
        assert!(message.contains(part), "the refusal {message:?} does not name {part:?}");
    }
    assert!(!message.contains("rtx"), "{message}");
    // Nothing was started for it.
    let line = agent.wait_for_log("cannot answer the video offer").await;
    assert!(line.contains("neither-1"), "{line}");
    pilot.viewer.close().await;
    running.shutdown(Duration::from_secs(5)).await;
}

/// Two pilots whose browsers agree on no codec watch at once: the agent answers one in H.264,
/// the other in VP8, both encoded from the one test pattern (a camera is opened once); each
/// codec's encoder goes when its last viewer leaves, comes back for a new one, and the pipeline
/// stops with the last viewer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_serves_h264_and_vp8_viewers_at_once_from_one_source() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "view");
    let cfg = config(dir.path(), addr, &secret, &video_block(None));
    let mut agent = RunningAgent::spawn(&cfg, &[]);
    agent.wait_for_log("authenticated with the relay").await;

    let mut chrome = Pilot::offer_with(addr, &key, "both-chrome", Codec::offered(), None).await;
    chrome.connected().await;
    let mut chrome_stream = receive_and_decode(&mut chrome, Codec::H264).await;
    agent.wait_for_log("video pipeline started").await;

    let mut firefox = Pilot::offer_with(addr, &key, "both-firefox", Codec::firefox_without_openh264(), None).await;
    firefox.connected().await;
    let line = agent.wait_for_log("video encoder added for a viewer").await;
    assert!(line.contains("Vp8") && line.contains("vp8enc"), "{line}");
    receive_and_decode(&mut firefox, Codec::Vp8).await;
    // The H.264 viewer was not disturbed: its stream went on, in order, without loss.
    let frame = chrome_stream.frame;
    chrome_stream.until_frame(&mut chrome.packets, frame + 10).await;
    assert_eq!(chrome_stream.gaps, 0);

    // The VP8 viewer leaves: its encoder goes, H.264 goes on.
    firefox.leave().await;
    let line = agent.wait_for_log("its encoder removed").await;
    assert!(line.contains("Vp8"), "{line}");
    let frame = chrome_stream.frame;
    chrome_stream.until_frame(&mut chrome.packets, frame + 10).await;
    assert_eq!(chrome_stream.gaps, 0);

    // A new VP8 viewer brings it back; then the H.264 one leaves, and VP8 goes on alone.
    let mut firefox = Pilot::offer_with(addr, &key, "both-firefox-2", Codec::firefox_without_openh264(), None).await;
    firefox.connected().await;
    agent.wait_for_log("video encoder added for a viewer").await;
    let mut firefox_stream = receive_and_decode(&mut firefox, Codec::Vp8).await;
    chrome.leave().await;
    let line = agent.wait_for_log("its encoder removed").await;
    assert!(line.contains("H264"), "{line}");
    let frame = firefox_stream.frame;
    firefox_stream.until_frame(&mut firefox.packets, frame + 10).await;
    firefox_stream.next_keyframe(&mut firefox.packets).await;

    firefox.leave().await;
    agent.wait_for_log("last viewer gone; video pipeline stopped").await;
    chrome.viewer.close().await;
    firefox.viewer.close().await;
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_to_an_agent_with_video_disabled_ends_with_bye_video_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "view");
    let cfg = config(dir.path(), addr, &secret, "video:\n  enabled: false\n");
    let mut agent = RunningAgent::spawn(&cfg, &[]);
    agent.wait_for_log("authenticated with the relay").await;

    let mut pilot = Pilot::offer_with(addr, &key, "off-1", OfferedCodec::chrome_like_h264(), None).await;
    let bye = pilot.recv_until("bye", |v| v["type"] == "webrtc" && v["payload"]["subtype"] == "bye").await;
    assert_eq!(bye["from"], "boat-7", "{bye}");
    assert_eq!(bye["payload"]["subtype"], "bye", "{bye}");
    assert_eq!(bye["payload"]["sessionID"], "off-1", "{bye}");
    assert_eq!(bye["payload"]["reason"], "video_disabled", "{bye}");

    // The bye ended the session at the relay too. Asked from another connection, the relay
    // would say "in use" for an open session; a closed one must be opened with an offer first.
    let mut other = operator(addr, &key).await;
    send(
        &mut other,
        json!({"type": "webrtc", "correlationID": "late", "clientID": "boat-7",
               "payload": {"subtype": "ice_candidate", "sessionID": "off-1", "candidate": ""}}),
    )
    .await;
    let refused = recv_until(&mut other, "the refusal", |v| v["correlationID"] == "late").await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert!(refused["payload"]["message"].as_str().unwrap().contains("open one with an offer first"), "{refused}");
    pilot.viewer.close().await;
    running.shutdown(Duration::from_secs(5)).await;
}
