//! The device's WebRTC sender: one peer connection per viewing pilot, answering the pilot's offer.
//!
//! The pilot (a browser, or a test) offers a `recvonly` video transceiver; [`VideoSender::answer`]
//! builds a peer connection on the webrtc crate (0.21 line), binds one [`TrackLocalStaticRTP`] for
//! the negotiated codec and returns the answer SDP. Everything after that is asynchronous and
//! flows through the `events` channel the caller hands in:
//!
//! - local ICE candidates as they are gathered (trickle), then `LocalCandidate(None)`;
//! - connection state changes, as the browser's `RTCPeerConnectionState` strings;
//! - the receiver's feedback: keyframe requests (PLI/FIR), bandwidth estimates (REMB, or the
//!   transport-wide-cc estimate of a delay-based controller), loss from receiver reports.
//!
//! How to drive it: feed the pilot's trickled candidates to [`VideoSender::add_remote_candidate`],
//! write the encoder's RTP packets with [`VideoSender::write_rtp`] (they are dropped until the
//! connection first comes up, so force a keyframe when `State("connected")` arrives), answer ICE
//! restarts with [`VideoSender::renegotiate`], and end with [`VideoSender::close`].
//!
//! No STUN server is configured unless the settings name one: on a LAN, host candidates are
//! enough, and an unreachable STUN server would only add gathering time (trickle ICE keeps it
//! from delaying the session anyway). Browsers hide their host addresses behind `<uuid>.local`
//! names; with [`PeerSettings::mdns`] the ICE agent resolves them over multicast DNS.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::rtc::ice::mdns::MulticastDnsMode;
use ::rtc::interceptor::{
    Attribute, BandwidthEstimator, CongestionControlBuilder, EstimatorStats, Gcc, Interceptor, Packet, PacketReport,
    Slot, StreamInfo, TaggedPacket,
};
use ::rtc::peer_connection::configuration::media_engine::{MIME_TYPE_H264, MIME_TYPE_VP8};
use ::rtc::rtcp;
use ::rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use ::rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use ::rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use ::rtc::rtcp::receiver_report::ReceiverReport;
use ::rtc::rtcp::reception_report::ReceptionReport;
use ::rtc::rtcp::sender_report::SenderReport;
use ::rtc::rtp;
use ::rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use ::rtc::sansio::Protocol;
use ::rtc::shared::marshal::Unmarshal;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use webrtc::media_stream::MediaStreamTrack;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidateInit, RTCIceCandidateType, RTCIceGatheringState, RTCIceServer, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState, RTCSessionDescription, RTCStatsReportEntry, Registry, SettingEngineBuilder, StatsSelector,
    configure_twcc_sender_only, register_default_interceptors,
};
use webrtc::rtp_transceiver::RtpSender;

/// Payload types we register; the answer uses the offer's numbers, which [`Negotiated`] reports.
const PT_H264_CONSTRAINED_BASELINE: u8 = 102;
const PT_H264_BASELINE: u8 = 104;
const PT_VP8: u8 = 96;
/// What our encoders produce: constrained baseline, level 3.1, FU-A fragmentation allowed.
const H264_FMTP: &str = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f";
/// Baseline decoders accept a constrained-baseline stream, so this is an acceptable fallback.
const H264_FMTP_BASELINE: &str = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f";
/// Where the delay-based estimator starts before the first transport-wide feedback arrives, and
/// the range it may move in; the encoder applies its own configured bounds on top.
const GCC_INITIAL_BPS: f64 = 1_000_000.0;
const GCC_MIN_BPS: f64 = 100_000.0;
const GCC_MAX_BPS: f64 = 50_000_000.0;
/// A new estimate is reported only when it moved at least this much (relative) since the last
/// one, so the encoder is not retuned every 200 ms for noise.
const BANDWIDTH_REPORT_STEP: f64 = 0.05;
/// Position of our RTCP tap in the interceptor chain: past every built-in slot (the highest is
/// 13 000), so all of them have seen the packets it marks for the application.
const FEEDBACK_TAP_SLOT: usize = 14_000;

/// An ICE server, with the browser's `RTCIceServer` field names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IceServer {
    /// `stun:host:port`, `turn:host:port?transport=udp`, `turns:...`.
    pub urls: Vec<String>,
    /// TURN user name; STUN needs none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN password (long-term credential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// The video codec the device's encoder produces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VideoCodec {
    /// H.264 constrained baseline, packetization-mode 1 (profile-level-id 42e01f preferred).
    #[default]
    H264,
    /// VP8.
    Vp8,
}

impl VideoCodec {
    /// Every codec a device can send, in the order `auto` prefers them: H.264 (hardware
    /// encoders, and what browsers decode in hardware) when the viewer offers it, else VP8.
    pub const ALL: [VideoCodec; 2] = [VideoCodec::H264, VideoCodec::Vp8];

    /// The RTP mime type, as the webrtc crate spells it.
    pub fn mime_type(self) -> &'static str {
        match self {
            VideoCodec::H264 => MIME_TYPE_H264,
            VideoCodec::Vp8 => MIME_TYPE_VP8,
        }
    }
}

/// How a peer is built. One value serves every pilot of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSettings {
    /// STUN/TURN servers. Empty (the default): host candidates only, no STUN traffic at all.
    pub ice_servers: Vec<IceServer>,
    /// The codec the encoder produces; the offer must carry it.
    pub codec: VideoCodec,
    /// Resolve the pilot's `<uuid>.local` host candidates with multicast DNS (the ICE agent's
    /// query-only mode: our own candidates stay plain addresses). Default true: browsers hide
    /// their LAN addresses this way, and without it a LAN session has no usable pair. If the
    /// machine cannot open the multicast socket, the peer is built without it and a warning is
    /// logged.
    pub mdns: bool,
    /// Also gather loopback candidates (127.0.0.1). For tests on one machine; browsers gather
    /// none, so it is useless against them.
    pub include_loopback: bool,
    /// Where the peer's sockets are and what addresses it announces (the relay's settings).
    pub reach: Reachability,
}

impl Default for PeerSettings {
    fn default() -> Self {
        PeerSettings {
            ice_servers: Vec::new(),
            codec: VideoCodec::H264,
            mdns: true,
            include_loopback: false,
            reach: Reachability::default(),
        }
    }
}

/// How a server-side peer (the relay's SFU) is reached through firewalls and NAT. The default
/// (nothing set) gathers host candidates on ephemeral UDP ports of every interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reachability {
    /// 1:1 NAT: the public addresses announced instead of the interfaces' own (host candidates
    /// carry these), e.g. a cloud VM's elastic IP. Empty: the interfaces' addresses.
    pub public_ips: Vec<String>,
    /// Bind UDP (and ICE-TCP) sockets on a port from this inclusive range, so a firewall can
    /// open exactly it. None: ephemeral ports.
    pub ports: Option<(u16, u16)>,
    /// Also offer passive ICE-TCP candidates (for viewers whose networks block UDP).
    pub ice_tcp: bool,
}

/// Round-robin cursor over [`Reachability::ports`], shared by every peer of the process.
static NEXT_PORT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Reachability {
    /// A port of the range that is free for UDP (and TCP with ICE-TCP) right now, trying each at
    /// most once from a rotating start; 0 (ephemeral) without a range. Errors when every port of
    /// the range is taken.
    pub(crate) fn pick_port(&self) -> Result<u16, String> {
        let Some((lo, hi)) = self.ports else { return Ok(0) };
        let (lo, hi) = (lo.min(hi), lo.max(hi));
        let span = u32::from(hi - lo) + 1;
        let start = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        for i in 0..span {
            let port = lo + ((start.wrapping_add(i)) % span) as u16;
            let udp_free = std::net::UdpSocket::bind(("0.0.0.0", port)).is_ok();
            let tcp_free = !self.ice_tcp || std::net::TcpListener::bind(("0.0.0.0", port)).is_ok();
            if udp_free && tcp_free {
                return Ok(port);
            }
        }
        Err(format!("every port of the range {lo}-{hi} is in use"))
    }

    /// The UDP and TCP addresses to bind: wildcards (expanded by the stack to every interface)
    /// on the picked port; loopback as well when asked.
    pub(crate) fn sockets(&self, include_loopback: bool, ipv6: bool) -> Result<(Vec<String>, Vec<String>), String> {
        let port = self.pick_port()?;
        let mut udp = vec![format!("0.0.0.0:{port}")];
        if ipv6 {
            udp.push(format!("[::]:{port}"));
        }
        if include_loopback {
            udp.push(format!("127.0.0.1:{port}"));
        }
        let tcp = if self.ice_tcp { vec![format!("0.0.0.0:{port}")] } else { Vec::new() };
        Ok((udp, tcp))
    }

    /// Applies the 1:1 NAT addresses to a setting engine under construction.
    pub(crate) fn apply(&self, engine: SettingEngineBuilder) -> SettingEngineBuilder {
        if self.public_ips.is_empty() {
            engine
        } else {
            engine.with_nat_1to1_ips(self.public_ips.clone(), RTCIceCandidateType::Host)
        }
    }
}

/// One ICE candidate, with the field names of the browser's `RTCIceCandidateInit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    /// The `candidate:...` attribute; empty means "end of candidates".
    pub candidate: String,
    /// The media section this candidate belongs to (ours: the first bundled section).
    #[serde(default)]
    pub sdp_mid: Option<String>,
    /// Index of that media section.
    #[serde(default, rename = "sdpMLineIndex")]
    pub sdp_mline_index: Option<u16>,
}

/// What a [`VideoSender`] reports on its `events` channel.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum PeerEvent {
    /// A gathered local candidate to trickle to the pilot; `None` once gathering is complete
    /// (again after an ICE restart).
    LocalCandidate(Option<Candidate>),
    /// The connection state: `new`, `connecting`, `connected`, `disconnected`, `failed`, `closed`.
    State(String),
    /// The receiver asked for a keyframe (PLI or FIR).
    KeyframeRequested,
    /// The receiver's REMB, or the delay-based estimate from transport-wide-cc feedback.
    Bandwidth {
        /// Bits per second the path is estimated to carry.
        bps: u64,
    },
    /// Fraction of our packets lost since the receiver's previous report (0.0 to 1.0).
    Loss {
        /// 0.0 to 1.0.
        fraction: f32,
    },
}

/// The codec the answer settled on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Negotiated {
    /// `video/H264` or `video/VP8`.
    pub mime_type: String,
    /// 90000 for video.
    pub clock_rate: u32,
    /// The `a=fmtp` parameters, e.g. `level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f`.
    pub fmtp: String,
    /// The payload type every packet written is stamped with.
    pub payload_type: u8,
}

/// Counters for the console and the logs.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct SenderStats {
    /// RTP payload and header bytes sent (retransmissions included).
    pub bytes_sent: u64,
    /// RTP packets sent.
    pub packets_sent: u64,
    /// Round trip from the receiver's reports, else from the ICE pair's checks.
    pub rtt: Option<Duration>,
    /// Fraction lost in the latest receiver report.
    pub fraction_lost: Option<f32>,
    /// Latest bandwidth estimate reported as [`PeerEvent::Bandwidth`].
    pub bandwidth_bps: Option<u64>,
    /// The connection state, as in [`PeerEvent::State`].
    pub state: String,
}

/// Why a peer could not be built or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RtcError {
    /// The offer is not SDP we can read.
    #[error("invalid offer SDP: {0}")]
    InvalidOffer(String),
    /// The offer has no video section the device could send on (none at all, or only
    /// rejected, inactive or `sendonly` ones).
    #[error("the offer has no video m-line the device can send on (sections offered: {offered})")]
    NoVideo {
        /// The offered sections, `kind/direction`, for the log.
        offered: String,
    },
    /// The offer's video section carries no codec the device can send.
    #[error("the offer carries no codec the device can send as {wanted}; offered: {offered}")]
    NoCommonCodec {
        /// What the device can send, with its constraints (`video/H264 (packetization-mode=1,
        /// profile-level-id 42e0xx or 4200xx) or video/VP8`).
        wanted: String,
        /// The offered video codecs, `mime fmtp`.
        offered: String,
    },
    /// A relay's viewer offered no codec the device's stream through the relay is in (it was
    /// negotiated for the viewer that opened it, and the relay does not transcode).
    #[error(
        "the device's stream through the relay is {stream} (negotiated when its first viewer opened it; the relay does not transcode) and this offer does not carry it; offered: {offered}"
    )]
    StreamCodec {
        /// The stream's codec, e.g. `video/H264`.
        stream: String,
        /// The offered video codecs, `mime fmtp`.
        offered: String,
    },
    /// The RTP packet handed to [`VideoSender::write_rtp`] does not parse.
    #[error("not an RTP packet: {0}")]
    BadRtp(String),
    /// The candidate does not parse or does not belong to this session.
    #[error("remote candidate rejected: {0}")]
    BadCandidate(String),
    /// The session was closed.
    #[error("the peer connection is closed")]
    Closed,
    /// No socket could be bound (e.g. every port of the configured range is in use).
    #[error("cannot bind the peer's sockets: {0}")]
    Sockets(String),
    /// The webrtc stack refused a step.
    #[error("webrtc: {context}: {source}")]
    Webrtc {
        /// The step, e.g. "set remote description".
        context: &'static str,
        /// The stack's error.
        #[source]
        source: webrtc::error::Error,
    },
}

fn webrtc_err(context: &'static str) -> impl FnOnce(webrtc::error::Error) -> RtcError {
    move |source| RtcError::Webrtc { context, source }
}

/// One sending peer connection, for one viewing pilot. Cheap to share behind an `Arc`: every
/// method takes `&self`.
pub struct VideoSender {
    /// The webrtc connection; its driver task owns the sockets.
    pc: Arc<dyn PeerConnection>,
    /// The track the encoder's packets are written to.
    track: Arc<TrackLocalStaticRTP>,
    /// Its sender, for the negotiated parameters and the stats selector.
    sender: Arc<dyn RtpSender>,
    /// State shared with the event handler, the RTCP task and the estimator.
    shared: Arc<Shared>,
    /// Rewritten after every renegotiation: the payload type written packets carry.
    negotiated: Mutex<Negotiated>,
    /// The RTCP reader and the event forwarder; ended and awaited by `close`.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for VideoSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoSender")
            .field("ssrc", &self.shared.ssrc)
            .field("negotiated", &self.negotiated())
            .field("state", &self.shared.state())
            .finish_non_exhaustive()
    }
}

impl VideoSender {
    /// Creates the peer, applies the remote offer, adds a `TrackLocalStaticRTP` for the
    /// negotiated codec, creates and sets the answer; returns the answer SDP.
    ///
    /// The answer carries no candidates: they follow on `events` as they are gathered. Fails
    /// with [`RtcError::NoVideo`] or [`RtcError::NoCommonCodec`] when the offer cannot be served.
    ///
    /// `events` is bounded by the caller. Candidates and state changes are never dropped: they
    /// wait in an internal queue (a handful per session) until the channel has room. Feedback
    /// (keyframe requests, bandwidth, loss) is dropped when the channel is full, since a fresh
    /// report follows soon and a stale one is worth nothing.
    pub async fn answer(
        settings: &PeerSettings,
        offer_sdp: &str,
        events: mpsc::Sender<PeerEvent>,
    ) -> Result<(VideoSender, String), RtcError> {
        let offer = OfferSummary::parse(offer_sdp)?;
        offer.check_codec(settings.codec)?;

        let ssrc: u32 = rand::random::<u32>().max(1);
        let (signal_tx, signal_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            events: Mutex::new(Some(events.clone())),
            signal_tx: Mutex::new(Some(signal_tx)),
            state: Mutex::new(RTCPeerConnectionState::New),
            connected_once: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            ssrc,
            bundle: Mutex::new((offer.bundle_mid.clone(), offer.bundle_index)),
            rr_rtt_micros: AtomicU64::new(0),
            fraction_lost_bits: AtomicU64::new(u64::MAX),
            bandwidth_bps: AtomicU64::new(0),
            remb_bps: AtomicU64::new(0),
            gcc_bps: AtomicU64::new(0),
        });
        let forwarder = tokio::spawn(forward_signals(signal_rx, events));

        let pc = match build_peer(settings, &shared).await {
            Ok(pc) => pc,
            Err(e) => {
                shared.end_signals();
                return Err(e);
            }
        };
        match Self::negotiate_first(pc.clone(), settings.codec, offer_sdp, shared.clone()).await {
            Ok((track, sender, negotiated, answer)) => {
                let rtcp = tokio::spawn(read_feedback(track.clone(), shared.clone()));
                let video = VideoSender {
                    pc,
                    track,
                    sender,
                    shared,
                    negotiated: Mutex::new(negotiated),
                    tasks: Mutex::new(vec![rtcp, forwarder]),
                };
                Ok((video, answer))
            }
            Err(e) => {
                shared.closed.store(true, Ordering::Release);
                let _ = pc.close().await;
                shared.end_signals();
                Err(e)
            }
        }
    }

    async fn negotiate_first(
        pc: Arc<dyn PeerConnection>,
        codec: VideoCodec,
        offer_sdp: &str,
        shared: Arc<Shared>,
    ) -> Result<(Arc<TrackLocalStaticRTP>, Arc<dyn RtpSender>, Negotiated, String), RtcError> {
        let offer = RTCSessionDescription::offer(offer_sdp.to_owned()).map_err(webrtc_err("parse offer"))?;
        pc.set_remote_description(offer).await.map_err(webrtc_err("set remote description"))?;

        let (_, fmtp) = registered_codecs(codec)[0];
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            "tether".to_owned(),
            "tether-video".to_owned(),
            "tether-video".to_owned(),
            RtpCodecKind::Video,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(shared.ssrc), ..Default::default() },
                codec: rtp_codec(codec, fmtp),
                ..Default::default()
            }],
        )));
        let sender = pc.add_track(track.clone() as Arc<dyn TrackLocal>).await.map_err(webrtc_err("add video track"))?;

        let answer = pc.create_answer(None).await.map_err(webrtc_err("create answer"))?;
        let answer_sdp = answer.sdp.clone();
        pc.set_local_description(answer).await.map_err(webrtc_err("set local description"))?;

        let negotiated = negotiated_codec(&*sender, codec).await?;
        Ok((track, sender, negotiated, answer_sdp))
    }

    /// The codec, clock rate, fmtp and payload type the answer settled on.
    pub fn negotiated(&self) -> Negotiated {
        self.negotiated.lock().unwrap().clone()
    }

    /// The SSRC every written packet is stamped with.
    pub fn ssrc(&self) -> u32 {
        self.shared.ssrc
    }

    /// Adds a candidate trickled by the pilot. An empty `candidate` (end of candidates) is
    /// accepted and ignored. `.local` names are resolved when [`PeerSettings::mdns`] is on, and
    /// silently dropped otherwise.
    pub async fn add_remote_candidate(&self, c: Candidate) -> Result<(), RtcError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(RtcError::Closed);
        }
        if c.candidate.trim().is_empty() {
            return Ok(());
        }
        let init = RTCIceCandidateInit {
            candidate: c.candidate,
            sdp_mid: c.sdp_mid,
            sdp_mline_index: c.sdp_mline_index,
            ..Default::default()
        };
        self.pc.add_ice_candidate(init).await.map_err(|e| RtcError::BadCandidate(e.to_string()))
    }

    /// A new offer on the same session (ICE restart or renegotiation) -> new answer.
    ///
    /// After an ICE restart, the new generation's candidates follow on `events`, ended by a
    /// new `LocalCandidate(None)`.
    pub async fn renegotiate(&self, offer_sdp: &str) -> Result<String, RtcError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(RtcError::Closed);
        }
        let summary = OfferSummary::parse(offer_sdp)?;
        let codec = codec_of(&self.negotiated().mime_type);
        summary.check_codec(codec)?;
        *self.shared.bundle.lock().unwrap() = (summary.bundle_mid.clone(), summary.bundle_index);

        let offer = RTCSessionDescription::offer(offer_sdp.to_owned()).map_err(webrtc_err("parse offer"))?;
        self.pc.set_remote_description(offer).await.map_err(webrtc_err("set remote description"))?;
        let answer = self.pc.create_answer(None).await.map_err(webrtc_err("create answer"))?;
        let answer_sdp = answer.sdp.clone();
        self.pc.set_local_description(answer).await.map_err(webrtc_err("set local description"))?;

        let negotiated = negotiated_codec(&*self.sender, codec).await?;
        *self.negotiated.lock().unwrap() = negotiated;
        Ok(answer_sdp)
    }

    /// Writes one RTP packet produced by the encoder. Its SSRC and payload type are rewritten to
    /// the negotiated ones, and header extensions the encoder added are stripped (the stack adds
    /// the negotiated ones); sequence numbers and timestamps pass through.
    ///
    /// Until the connection has come up once, packets are dropped (`Ok`): nobody can receive
    /// them yet. Returns [`RtcError::Closed`] after [`close`](Self::close).
    pub async fn write_rtp(&self, packet: &[u8]) -> Result<(), RtcError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(RtcError::Closed);
        }
        let mut buf = packet;
        let pkt = rtp::Packet::unmarshal(&mut buf).map_err(|e| RtcError::BadRtp(e.to_string()))?;
        self.write_packet(pkt).await
    }

    /// [`write_rtp`](Self::write_rtp) for a packet already parsed (the SFU forwards what its
    /// upstream peer received, to many senders, without parsing it again for each).
    pub async fn write_packet(&self, mut pkt: rtp::Packet) -> Result<(), RtcError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(RtcError::Closed);
        }
        if !self.shared.connected_once.load(Ordering::Acquire) {
            return Ok(());
        }
        pkt.header.ssrc = self.shared.ssrc;
        pkt.header.payload_type = self.negotiated.lock().unwrap().payload_type;
        pkt.header.extension = false;
        pkt.header.extension_profile = 0;
        pkt.header.extensions.clear();
        pkt.header.extensions_padding = 0;
        // Unmarshalling already cut the padding off the payload: send it unpadded.
        pkt.header.padding = false;
        self.track.write_rtp(pkt).await.map_err(|e| {
            if self.shared.closed.load(Ordering::Acquire) { RtcError::Closed } else { webrtc_err("write rtp")(e) }
        })
    }

    /// Bytes and packets sent, round trip and loss if known, and the state.
    pub async fn stats(&self) -> SenderStats {
        let mut stats = SenderStats {
            state: self.shared.state().to_string(),
            fraction_lost: self.shared.fraction_lost(),
            bandwidth_bps: match self.shared.bandwidth_bps.load(Ordering::Relaxed) {
                0 => None,
                b => Some(b),
            },
            ..Default::default()
        };
        if self.shared.closed.load(Ordering::Acquire) {
            return stats;
        }
        let report = self.pc.get_stats(Instant::now(), StatsSelector::None).await;
        let mut report_rtt = None;
        let mut pair_rtt = None;
        for entry in report.iter() {
            match entry {
                RTCStatsReportEntry::OutboundRtp(o)
                    if o.sent_rtp_stream_stats.rtp_stream_stats.ssrc == self.shared.ssrc =>
                {
                    stats.bytes_sent = o.sent_rtp_stream_stats.bytes_sent + o.header_bytes_sent;
                    stats.packets_sent = o.sent_rtp_stream_stats.packets_sent;
                }
                RTCStatsReportEntry::RemoteInboundRtp(r)
                    if r.round_trip_time_measurements > 0 && r.round_trip_time > 0.0 =>
                {
                    report_rtt = Duration::try_from_secs_f64(r.round_trip_time).ok();
                }
                RTCStatsReportEntry::IceCandidatePair(p) if p.nominated && p.current_round_trip_time > 0.0 => {
                    pair_rtt = Duration::try_from_secs_f64(p.current_round_trip_time).ok();
                }
                _ => {}
            }
        }
        let rr_rtt = match self.shared.rr_rtt_micros.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        };
        stats.rtt = report_rtt.or(rr_rtt).or(pair_rtt);
        stats
    }

    /// Closes the peer connection, reports `State("closed")` if the stack has not, and ends the
    /// RTCP reader and the event forwarder: queued events are still delivered, then the
    /// `events` stream ends. Idempotent.
    pub async fn close(&self) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.pc.close().await {
            tracing::debug!(error = %e, "closing the peer connection");
        }
        self.shared.set_state(RTCPeerConnectionState::Closed);
        self.shared.end_signals();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        for task in tasks {
            // The RTCP reader ends when the stack closes its event stream; the forwarder when
            // its queue is drained. Neither should take long, unless the caller stopped reading
            // `events`: then give up rather than hang the caller.
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), task).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for VideoSender {
    fn drop(&mut self) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Dropped without close(): the stack's driver would otherwise keep its sockets.
        let pc = self.pc.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = pc.close().await;
            });
        }
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        self.shared.end_signals();
    }
}

/// State the handler (on the stack's driver), the RTCP task, the estimator (inside the
/// interceptor chain) and the [`VideoSender`] share.
struct Shared {
    /// Feedback goes here directly, with `try_send`: dropped when the caller's channel is full.
    /// `None` once closed, so the caller's receiver ends when the forwarder has drained.
    events: Mutex<Option<mpsc::Sender<PeerEvent>>>,
    /// Candidates and state changes go through this unbounded queue, forwarded in order by
    /// `forward_signals`, so the stack's driver never waits on a slow consumer. `None` once the
    /// sender is closed, which ends the forwarder.
    signal_tx: Mutex<Option<mpsc::UnboundedSender<PeerEvent>>>,
    /// Last state reported, so `close` does not report `closed` twice.
    state: Mutex<RTCPeerConnectionState>,
    /// Writes are dropped until the first `connected`.
    connected_once: AtomicBool,
    /// Set by `close` (and `Drop`).
    closed: AtomicBool,
    /// Our SSRC, stamped on every packet; receiver reports about it are ours.
    ssrc: u32,
    /// The mid and index our candidates are tagged with (the first bundled section).
    bundle: Mutex<(Option<String>, u16)>,
    /// Round trip from the latest receiver report, in µs; 0 = unknown.
    rr_rtt_micros: AtomicU64,
    /// `f32::to_bits` of the latest fraction lost; `u64::MAX` = no report yet.
    fraction_lost_bits: AtomicU64,
    /// Latest bandwidth estimate reported (the lower of the two below); 0 = none yet.
    bandwidth_bps: AtomicU64,
    /// The receiver's latest REMB (an SFU passes its weakest viewer's figure this way); 0 = none.
    remb_bps: AtomicU64,
    /// The delay-based estimate of the path to the receiver; 0 = none.
    gcc_bps: AtomicU64,
}

impl Shared {
    fn state(&self) -> RTCPeerConnectionState {
        *self.state.lock().unwrap()
    }

    fn fraction_lost(&self) -> Option<f32> {
        match self.fraction_lost_bits.load(Ordering::Relaxed) {
            u64::MAX => None,
            bits => Some(f32::from_bits(bits as u32)),
        }
    }

    fn signal(&self, event: PeerEvent) {
        if let Some(tx) = &*self.signal_tx.lock().unwrap() {
            let _ = tx.send(event);
        }
    }

    /// Stops all reporting: the forwarder delivers what is queued and ends, and with it the
    /// caller's `events` stream.
    fn end_signals(&self) {
        self.signal_tx.lock().unwrap().take();
        self.events.lock().unwrap().take();
    }

    fn feedback(&self, event: PeerEvent) {
        // Dropped when full: see `VideoSender::answer`.
        if let Some(events) = &*self.events.lock().unwrap() {
            let _ = events.try_send(event);
        }
    }

    fn set_state(&self, state: RTCPeerConnectionState) {
        if state == RTCPeerConnectionState::Unspecified {
            return;
        }
        {
            let mut current = self.state.lock().unwrap();
            if *current == state || *current == RTCPeerConnectionState::Closed {
                return;
            }
            *current = state;
        }
        if state == RTCPeerConnectionState::Connected {
            self.connected_once.store(true, Ordering::Release);
        }
        self.signal(PeerEvent::State(state.to_string()));
    }

    /// A new REMB (`remb`) or delay-based estimate: what the path and the receiver can take is
    /// the lower of the latest of each.
    fn report_bandwidth(&self, bps: u64, remb: bool) {
        if remb {
            self.remb_bps.store(bps, Ordering::Relaxed);
        } else {
            self.gcc_bps.store(bps, Ordering::Relaxed);
        }
        let combined = [self.remb_bps.load(Ordering::Relaxed), self.gcc_bps.load(Ordering::Relaxed)]
            .into_iter()
            .filter(|b| *b > 0)
            .min()
            .unwrap_or(bps);
        self.bandwidth_bps.store(combined, Ordering::Relaxed);
        self.feedback(PeerEvent::Bandwidth { bps: combined });
    }
}

async fn forward_signals(mut rx: mpsc::UnboundedReceiver<PeerEvent>, events: mpsc::Sender<PeerEvent>) {
    while let Some(event) = rx.recv().await {
        if events.send(event).await.is_err() {
            break;
        }
    }
}

/// The stack's callbacks, run on its driver task: translate and queue, never wait.
struct Handler {
    shared: Arc<Shared>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        // A wildcard socket on a machine with no usable interface yields `0.0.0.0`/`::`: nobody
        // can reach that, so do not advertise it.
        if event.candidate.address.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_unspecified()) {
            return;
        }
        match event.candidate.to_json() {
            Ok(init) => {
                let (mid, index) = self.shared.bundle.lock().unwrap().clone();
                self.shared.signal(PeerEvent::LocalCandidate(Some(Candidate {
                    candidate: init.candidate,
                    sdp_mid: mid,
                    sdp_mline_index: Some(index),
                })));
            }
            Err(e) => tracing::warn!(error = %e, "local candidate could not be serialised"),
        }
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.shared.signal(PeerEvent::LocalCandidate(None));
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.shared.set_state(state);
    }
}

async fn build_peer(settings: &PeerSettings, shared: &Arc<Shared>) -> Result<Arc<dyn PeerConnection>, RtcError> {
    let first = build_peer_with(settings, shared, settings.mdns).await;
    match first {
        Err(e) if settings.mdns => {
            // Most likely the multicast socket: no interface with a multicast route. A peer
            // without mDNS still reaches pilots that show plain addresses, or TURN.
            tracing::warn!(error = %e, "peer connection with mDNS failed; building it without mDNS");
            build_peer_with(settings, shared, false).await
        }
        other => other,
    }
}

async fn build_peer_with(
    settings: &PeerSettings,
    shared: &Arc<Shared>,
    mdns: bool,
) -> Result<Arc<dyn PeerConnection>, RtcError> {
    let mut media_engine = MediaEngine::default();
    for (pt, fmtp) in registered_codecs(settings.codec) {
        media_engine
            .register_codec(
                RTCRtpCodecParameters { rtp_codec: rtp_codec(settings.codec, fmtp), payload_type: *pt },
                RtpCodecKind::Video,
            )
            .map_err(webrtc_err("register codec"))?;
    }
    // NACK + PLI, sender/receiver reports, and the transport-cc receiver come with the defaults.
    let registry =
        register_default_interceptors(Registry::new(), &mut media_engine).map_err(webrtc_err("interceptors"))?;
    for feedback in [
        RTCPFeedback { typ: "ccm".to_owned(), parameter: "fir".to_owned() },
        RTCPFeedback { typ: "goog-remb".to_owned(), parameter: String::new() },
    ] {
        media_engine.register_feedback(feedback, RtpCodecKind::Video);
    }
    // Transport-wide sequence numbers on what we send, so the browser reports arrivals, and a
    // delay-based estimator that turns those reports into a bandwidth figure for the encoder.
    // Deliberately no pacer (`configure_congestion_control` would add one): the encoder is the
    // one that must slow down; queueing its frames here would only add latency.
    let registry = configure_twcc_sender_only(registry, &mut media_engine).map_err(webrtc_err("twcc"))?;
    let estimator = ReportingEstimator {
        inner: Gcc::new(GCC_INITIAL_BPS, GCC_MIN_BPS, GCC_MAX_BPS),
        shared: Arc::downgrade(shared),
        heard_feedback: false,
        last_reported: 0.0,
    };
    let registry = registry
        .with(Slot::CongestionControl, CongestionControlBuilder::new(estimator).build())
        .with(Slot::from(FEEDBACK_TAP_SLOT), FeedbackTap::default());

    let config = RTCConfigurationBuilder::new()
        .with_ice_servers(
            settings
                .ice_servers
                .iter()
                .map(|s| RTCIceServer {
                    urls: s.urls.clone(),
                    username: s.username.clone().unwrap_or_default(),
                    credential: s.credential.clone().unwrap_or_default(),
                })
                .collect(),
        )
        .build();
    let setting_engine = settings
        .reach
        .apply(SettingEngineBuilder::new())
        .with_multicast_dns_mode(if mdns { MulticastDnsMode::QueryOnly } else { MulticastDnsMode::Disabled })
        .with_include_loopback_candidate(settings.include_loopback)
        // An ICE restart (after the relay link or the network came back) rebinds the sockets and
        // gathers anew, so the new generation uses the interfaces the robot has now; its
        // candidates are trickled like the first ones.
        .with_discard_local_candidates_during_ice_restart(true)
        .build();

    // Wildcards expand to every interface address (loopback and link-local skipped), and are
    // re-expanded on an ICE restart, so a restart after a network change uses today's addresses.
    let (udp_addrs, tcp_addrs) = settings.reach.sockets(settings.include_loopback, true).map_err(RtcError::Sockets)?;
    let pc = PeerConnectionBuilder::new()
        .with_configuration(config)
        .with_media_engine(media_engine)
        .with_setting_engine(setting_engine)
        .with_interceptor_registry(registry)
        .with_handler(Arc::new(Handler { shared: shared.clone() }))
        .with_udp_addrs(udp_addrs)
        .with_tcp_addrs(tcp_addrs)
        .build()
        .await
        .map_err(webrtc_err("build peer connection"))?;
    Ok(Arc::new(pc))
}

/// The payload types and fmtp lines registered for `codec`, preferred first.
fn registered_codecs(codec: VideoCodec) -> &'static [(u8, &'static str)] {
    match codec {
        VideoCodec::H264 => &[(PT_H264_CONSTRAINED_BASELINE, H264_FMTP), (PT_H264_BASELINE, H264_FMTP_BASELINE)],
        VideoCodec::Vp8 => &[(PT_VP8, "")],
    }
}

fn rtp_codec(codec: VideoCodec, fmtp: &str) -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: codec.mime_type().to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: fmtp.to_owned(),
        rtcp_feedback: Vec::new(),
    }
}

fn codec_of(mime_type: &str) -> VideoCodec {
    if mime_type.eq_ignore_ascii_case(MIME_TYPE_VP8) { VideoCodec::Vp8 } else { VideoCodec::H264 }
}

/// Whether an H.264 fmtp line describes a stream our constrained-baseline, FU-A encoder output
/// can be sent as: packetization-mode=1 and profile 42e0 (constrained baseline) or 4200
/// (baseline), at any level.
fn h264_fmtp_ok(fmtp: &str) -> bool {
    let mut mode = None;
    let mut profile = None;
    for part in fmtp.split(';') {
        let Some((k, v)) = part.split_once('=') else { continue };
        match k.trim().to_ascii_lowercase().as_str() {
            "packetization-mode" => mode = Some(v.trim().to_owned()),
            "profile-level-id" => profile = Some(v.trim().to_ascii_lowercase()),
            _ => {}
        }
    }
    mode.as_deref() == Some("1")
        && profile.is_some_and(|p| p.len() == 6 && (p.starts_with("42e0") || p.starts_with("4200")))
}

fn codec_ok(codec: VideoCodec, mime_type: &str, fmtp: &str) -> bool {
    match codec {
        VideoCodec::H264 => mime_type.eq_ignore_ascii_case(MIME_TYPE_H264) && h264_fmtp_ok(fmtp),
        VideoCodec::Vp8 => mime_type.eq_ignore_ascii_case(MIME_TYPE_VP8),
    }
}

fn wanted(codec: VideoCodec) -> String {
    match codec {
        VideoCodec::H264 => format!("{MIME_TYPE_H264} (packetization-mode=1, profile-level-id 42e0xx or 4200xx)"),
        VideoCodec::Vp8 => MIME_TYPE_VP8.to_owned(),
    }
}

/// Picks, among the sender's negotiated codecs, the one packets are stamped with: the first
/// compatible one, preferring the exact fmtp we registered first.
async fn negotiated_codec(sender: &dyn RtpSender, codec: VideoCodec) -> Result<Negotiated, RtcError> {
    let params = sender.get_parameters().await.map_err(webrtc_err("sender parameters"))?;
    let codecs = &params.rtp_parameters.codecs;
    // Among compatible entries, constrained baseline (42e0..) before plain baseline; otherwise
    // the order the stack negotiated.
    let pick = codecs
        .iter()
        .filter(|c| codec_ok(codec, &c.rtp_codec.mime_type, &c.rtp_codec.sdp_fmtp_line))
        .min_by_key(|c| !c.rtp_codec.sdp_fmtp_line.to_ascii_lowercase().contains("profile-level-id=42e0"));
    match pick {
        Some(c) => Ok(Negotiated {
            mime_type: c.rtp_codec.mime_type.clone(),
            clock_rate: c.rtp_codec.clock_rate,
            fmtp: c.rtp_codec.sdp_fmtp_line.clone(),
            payload_type: c.payload_type,
        }),
        None => Err(RtcError::NoCommonCodec {
            wanted: wanted(codec),
            offered: if codecs.is_empty() {
                "nothing negotiated".to_owned()
            } else {
                codecs
                    .iter()
                    .map(|c| format!("{} {}", c.rtp_codec.mime_type, c.rtp_codec.sdp_fmtp_line))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        }),
    }
}

/// Checks, without building anything, that `offer_sdp` is SDP with a video section a sender
/// could answer (a viewer's `recvonly` or `sendrecv` video). The codec is checked when the
/// sender is built.
pub fn check_viewer_offer(offer_sdp: &str) -> Result<(), RtcError> {
    let summary = OfferSummary::parse(offer_sdp)?;
    match summary.video_codecs {
        Some(_) => Ok(()),
        None => Err(RtcError::NoVideo { offered: summary.sections.join(", ") }),
    }
}

/// The first codec of `prefs` that `offer_sdp`'s video section carries in a form the device can
/// send (H.264: packetization-mode=1, constrained baseline or baseline), without building
/// anything: what a device configured for `prefs` answers with. [`RtcError::NoCommonCodec`]
/// names what the offer had and what `prefs` allow.
pub fn choose_codec(offer_sdp: &str, prefs: &[VideoCodec]) -> Result<VideoCodec, RtcError> {
    OfferSummary::parse(offer_sdp)?.choose(prefs)
}

/// The codecs of [`VideoCodec::ALL`] that `offer_sdp`'s video section carries in a form the
/// device can send, in that order (empty when none is). Fails only when the offer is not SDP or
/// has no video section to answer on.
pub fn sendable_codecs(offer_sdp: &str) -> Result<Vec<VideoCodec>, RtcError> {
    let summary = OfferSummary::parse(offer_sdp)?;
    let Some(codecs) = &summary.video_codecs else {
        return Err(RtcError::NoVideo { offered: summary.sections.join(", ") });
    };
    Ok(VideoCodec::ALL.into_iter().filter(|c| codecs.iter().any(|(mime, fmtp)| codec_ok(*c, mime, fmtp))).collect())
}

/// What we need to know about an offer before handing it to the stack.
struct OfferSummary {
    /// `kind/direction` of every section, for errors.
    sections: Vec<String>,
    /// `(mime, fmtp)` of the video section we will answer on, or None if there is none.
    video_codecs: Option<Vec<(String, String)>>,
    /// The mid and index our candidates are tagged with.
    bundle_mid: Option<String>,
    bundle_index: u16,
}

impl OfferSummary {
    fn parse(offer_sdp: &str) -> Result<OfferSummary, RtcError> {
        let desc = RTCSessionDescription::offer(offer_sdp.to_owned())
            .and_then(|d| d.unmarshal())
            .map_err(|e| RtcError::InvalidOffer(e.to_string()))?;
        if desc.media_descriptions.is_empty() {
            return Err(RtcError::NoVideo { offered: "no media sections".to_owned() });
        }
        let mut sections = Vec::new();
        let mut video_codecs = None;
        for m in &desc.media_descriptions {
            let direction = ["sendrecv", "sendonly", "recvonly", "inactive"]
                .into_iter()
                .find(|d| m.attribute(d).is_some())
                .unwrap_or("sendrecv");
            let rejected = m.media_name.port.value == 0;
            sections.push(format!("{}/{}{}", m.media_name.media, direction, if rejected { " (rejected)" } else { "" }));
            // The pilot must be willing to receive: recvonly (what a viewer offers) or sendrecv.
            if video_codecs.is_none()
                && m.media_name.media == "video"
                && !rejected
                && (direction == "recvonly" || direction == "sendrecv")
            {
                let mut codecs = Vec::new();
                for a in &m.attributes {
                    if a.key != "rtpmap" {
                        continue;
                    }
                    let Some(value) = a.value.as_deref() else { continue };
                    let Some((pt, encoding)) = value.split_once(' ') else { continue };
                    let name = encoding.split('/').next().unwrap_or_default();
                    let fmtp = m
                        .attributes
                        .iter()
                        .filter(|f| f.key == "fmtp")
                        .filter_map(|f| f.value.as_deref())
                        .find_map(|f| f.strip_prefix(pt).and_then(|rest| rest.strip_prefix(' ')))
                        .unwrap_or_default();
                    codecs.push((format!("video/{name}"), fmtp.to_owned()));
                }
                video_codecs = Some(codecs);
            }
        }
        // Candidates are tagged with the BUNDLE group's first mid (the transport every section
        // shares), or the first section's.
        let mids: Vec<Option<String>> =
            desc.media_descriptions.iter().map(|m| m.attribute("mid").flatten().map(str::to_owned)).collect();
        let bundle_first = desc
            .attribute("group")
            .and_then(|g| g.strip_prefix("BUNDLE "))
            .and_then(|g| g.split_whitespace().next().map(str::to_owned));
        let (bundle_mid, bundle_index) = match bundle_first
            .and_then(|b| mids.iter().position(|m| m.as_deref() == Some(b.as_str())).map(|i| (Some(b), i)))
        {
            Some((mid, i)) => (mid, i),
            None => (mids[0].clone(), 0),
        };
        Ok(OfferSummary { sections, video_codecs, bundle_mid, bundle_index: u16::try_from(bundle_index).unwrap_or(0) })
    }

    fn check_codec(&self, codec: VideoCodec) -> Result<(), RtcError> {
        self.choose(&[codec]).map(|_| ())
    }

    /// The first of `prefs` the video section carries in a sendable form.
    fn choose(&self, prefs: &[VideoCodec]) -> Result<VideoCodec, RtcError> {
        let Some(codecs) = &self.video_codecs else {
            return Err(RtcError::NoVideo { offered: self.sections.join(", ") });
        };
        if let Some(codec) = prefs.iter().find(|c| codecs.iter().any(|(mime, fmtp)| codec_ok(**c, mime, fmtp))) {
            return Ok(*codec);
        }
        // The media codecs, for people: not the retransmission and error-correction formats.
        let offered: Vec<String> = codecs
            .iter()
            .filter(|(mime, _)| {
                let name = mime.strip_prefix("video/").unwrap_or(mime).to_ascii_lowercase();
                !matches!(name.as_str(), "rtx" | "red" | "ulpfec" | "flexfec-03")
            })
            .map(|(mime, fmtp)| if fmtp.is_empty() { mime.clone() } else { format!("{mime} {fmtp}") })
            .collect();
        Err(RtcError::NoCommonCodec {
            wanted: prefs.iter().map(|c| wanted(*c)).collect::<Vec<_>>().join(" or "),
            offered: if offered.is_empty() { "none".to_owned() } else { offered.join(", ") },
        })
    }
}

/// Reads the receiver's feedback that [`FeedbackTap`] marked for the application and turns it
/// into [`PeerEvent`]s. Ends when the stack closes the track's event stream (on close).
async fn read_feedback(track: Arc<TrackLocalStaticRTP>, shared: Arc<Shared>) {
    loop {
        match track.poll().await {
            Some(TrackLocalEvent::OnRtcpPacket(packets)) => handle_feedback(&shared, &packets),
            Some(_) => {}
            None => {
                if shared.closed.load(Ordering::Acquire) {
                    return;
                }
                // Unbound for a moment (the stack rebinds a track when its sender is replaced);
                // look again shortly rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn handle_feedback(shared: &Shared, packets: &[Box<dyn rtcp::Packet>]) {
    let mut keyframe = false;
    for packet in packets {
        let any = packet.as_any();
        if any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>() {
            keyframe = true;
        } else if let Some(remb) = any.downcast_ref::<ReceiverEstimatedMaximumBitrate>() {
            if remb.bitrate.is_finite() && remb.bitrate > 0.0 {
                shared.report_bandwidth(remb.bitrate as u64, true);
            }
        } else if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
            handle_reports(shared, &rr.reports);
        } else if let Some(sr) = any.downcast_ref::<SenderReport>() {
            handle_reports(shared, &sr.reports);
        }
    }
    if keyframe {
        shared.feedback(PeerEvent::KeyframeRequested);
    }
}

fn handle_reports(shared: &Shared, reports: &[ReceptionReport]) {
    for report in reports.iter().filter(|r| r.ssrc == shared.ssrc) {
        let fraction = f32::from(report.fraction_lost) / 256.0;
        shared.fraction_lost_bits.store(u64::from(fraction.to_bits()), Ordering::Relaxed);
        shared.feedback(PeerEvent::Loss { fraction });
        if let Some(rtt) = rtt_from_report(ntp_compact(SystemTime::now()), report.last_sender_report, report.delay) {
            shared.rr_rtt_micros.store(rtt.as_micros().max(1) as u64, Ordering::Relaxed);
        }
    }
}

/// The middle 32 bits of the NTP timestamp of `t`: seconds and fraction in 1/65536 s units, as
/// RTCP's LSR and DLSR fields count.
fn ntp_compact(t: SystemTime) -> u32 {
    let since_unix = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_unix.as_secs() + 2_208_988_800;
    let frac = (u64::from(since_unix.subsec_nanos()) << 32) / 1_000_000_000;
    (((secs & 0xffff) << 16) | (frac >> 16)) as u32
}

/// RFC 3550 §6.4.1: round trip = arrival - LSR - DLSR, all in 1/65536 s. None when the receiver
/// has not seen a sender report yet (LSR 0) or the result is not plausible.
fn rtt_from_report(now_compact: u32, last_sender_report: u32, delay: u32) -> Option<Duration> {
    if last_sender_report == 0 {
        return None;
    }
    let units = now_compact.wrapping_sub(last_sender_report).wrapping_sub(delay);
    // Over a minute means clocks or wrapping went wrong, not a real round trip.
    if units > 60 * 65_536 {
        return None;
    }
    Some(Duration::from_secs_f64(f64::from(units) / 65_536.0))
}

/// The last interceptor on the inbound path: marks the RTCP the application acts on (keyframe
/// requests, REMB, reception reports about our stream) for delivery to the track's event
/// stream; everything else continues unmarked and ends at the chain's terminus as usual.
///
/// Only the kept packets stay in a marked message: the stack routes a compound packet by its
/// first packet's destination SSRC, and each kept kind names ours.
#[derive(Default)]
struct FeedbackTap {
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

fn wanted_feedback(packet: &dyn rtcp::Packet) -> bool {
    let any = packet.as_any();
    any.is::<PictureLossIndication>()
        || any.is::<FullIntraRequest>()
        || any.is::<ReceiverEstimatedMaximumBitrate>()
        || any.downcast_ref::<ReceiverReport>().is_some_and(|rr| !rr.reports.is_empty())
        || any.downcast_ref::<SenderReport>().is_some_and(|sr| !sr.reports.is_empty())
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for FeedbackTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = ::rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            let kept: Vec<Box<dyn rtcp::Packet>> =
                packets.iter().filter(|p| wanted_feedback(p.as_ref())).cloned().collect();
            if !kept.is_empty() {
                msg.message.packet = Packet::Rtcp(kept);
                msg.message.add(Attribute::DeliverToApplication);
            }
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for FeedbackTap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// Google Congestion Control, reporting its target as [`PeerEvent::Bandwidth`] once real
/// transport-wide feedback has been heard (its starting guess is not a measurement).
struct ReportingEstimator {
    inner: Gcc,
    /// Weak: the estimator lives inside the connection, which `Shared` outlives only briefly.
    shared: std::sync::Weak<Shared>,
    heard_feedback: bool,
    last_reported: f64,
}

impl ReportingEstimator {
    fn publish(&mut self) {
        if !self.heard_feedback {
            return;
        }
        let target = self.inner.target_bitrate();
        if !target.is_finite() || target <= 0.0 {
            return;
        }
        if self.last_reported > 0.0
            && ((target - self.last_reported).abs() / self.last_reported) < BANDWIDTH_REPORT_STEP
        {
            return;
        }
        self.last_reported = target;
        if let Some(shared) = self.shared.upgrade() {
            shared.report_bandwidth(target as u64, false);
        }
    }
}

impl BandwidthEstimator for ReportingEstimator {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        self.inner.on_reports(now, reports);
        if !reports.is_empty() {
            self.heard_feedback = true;
        }
        self.publish();
    }

    fn target_bitrate(&self) -> f64 {
        self.inner.target_bitrate()
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now);
        self.publish();
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }

    fn stats(&self) -> EstimatorStats {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h264_fmtp_accepts_constrained_baseline_and_baseline_mode_1_only() {
        assert!(h264_fmtp_ok("level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"));
        assert!(h264_fmtp_ok("profile-level-id=42001F; packetization-mode=1"));
        assert!(!h264_fmtp_ok("level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f"));
        assert!(!h264_fmtp_ok("level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=640c1f"));
        assert!(!h264_fmtp_ok(""));
    }

    #[test]
    fn rtt_from_report_follows_rfc3550() {
        // LSR at 1.0 s, answered after 0.25 s, arriving at 1.5 s: 0.25 s round trip.
        let rtt = rtt_from_report(0x0001_8000, 0x0001_0000, 0x0000_4000).unwrap();
        assert_eq!(rtt, Duration::from_millis(250));
        assert_eq!(rtt_from_report(0x0001_8000, 0, 0), None);
        assert_eq!(rtt_from_report(0x0001_0000, 0x0002_0000, 0), None);
    }

    #[test]
    fn candidate_uses_the_browsers_field_names() {
        let c = Candidate {
            candidate: "candidate:1 1 udp 1 192.0.2.2 5000 typ host".to_owned(),
            sdp_mid: Some("0".to_owned()),
            sdp_mline_index: Some(0),
        };
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["sdpMid"], "0");
        assert_eq!(json["sdpMLineIndex"], 0);
        let back: Candidate = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
    }

    /// A recvonly video offer with `rtpmap` and `fmtp` lines for `codecs` (`pt name fmtp`).
    fn video_offer(codecs: &[(u8, &str, &str)]) -> String {
        let pts: Vec<String> = codecs.iter().map(|(pt, _, _)| pt.to_string()).collect();
        let mut sdp = format!(
            "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n\
             m=video 9 UDP/TLS/RTP/SAVPF {}\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\n",
            pts.join(" ")
        );
        for (pt, name, fmtp) in codecs {
            sdp.push_str(&format!("a=rtpmap:{pt} {name}/90000\r\n"));
            if !fmtp.is_empty() {
                sdp.push_str(&format!("a=fmtp:{pt} {fmtp}\r\n"));
            }
        }
        sdp
    }

    #[test]
    fn auto_prefers_sendable_h264_then_vp8_and_names_both_when_neither_is_offered() {
        let auto = &VideoCodec::ALL;
        // Firefox without OpenH264.
        let firefox = video_offer(&[
            (120, "VP8", "max-fs=12288;max-fr=60"),
            (124, "rtx", "apt=120"),
            (121, "VP9", "max-fs=12288;max-fr=60"),
            (99, "AV1", ""),
            (123, "ulpfec", ""),
            (122, "red", ""),
        ]);
        assert_eq!(choose_codec(&firefox, auto).unwrap(), VideoCodec::Vp8);
        assert_eq!(sendable_codecs(&firefox).unwrap(), [VideoCodec::Vp8]);
        // Chrome: H.264 in mode 0 first, mode 1 later, VP8 too.
        let chrome = video_offer(&[
            (96, "VP8", ""),
            (125, "H264", "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f"),
            (127, "H264", "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"),
        ]);
        assert_eq!(choose_codec(&chrome, auto).unwrap(), VideoCodec::H264);
        assert_eq!(choose_codec(&chrome, &[VideoCodec::Vp8]).unwrap(), VideoCodec::Vp8);
        assert_eq!(sendable_codecs(&chrome).unwrap(), [VideoCodec::H264, VideoCodec::Vp8]);
        // H.264 only in forms a constrained-baseline FU-A stream cannot be sent as.
        let unusable_h264 = video_offer(&[
            (125, "H264", "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f"),
            (123, "H264", "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=640c1f"),
            (96, "VP8", ""),
        ]);
        assert_eq!(choose_codec(&unusable_h264, auto).unwrap(), VideoCodec::Vp8);
        // Neither: the refusal names what was offered and what could be sent.
        let neither = video_offer(&[(98, "VP9", "profile-id=0"), (99, "AV1", ""), (100, "rtx", "apt=98")]);
        let err = choose_codec(&neither, auto).unwrap_err();
        assert!(matches!(err, RtcError::NoCommonCodec { .. }), "{err}");
        let text = err.to_string();
        for part in ["video/H264 (packetization-mode=1", "or video/VP8", "offered: video/VP9 profile-id=0, video/AV1"] {
            assert!(text.contains(part), "{text:?} lacks {part:?}");
        }
        assert!(!text.contains("rtx"), "{text}");
        assert!(sendable_codecs(&neither).unwrap().is_empty());
        let err = choose_codec(&firefox, &[VideoCodec::H264]).unwrap_err().to_string();
        assert!(!err.contains("or video/VP8") && err.contains("offered: video/VP8"), "{err}");
    }

    #[test]
    fn offer_without_video_is_refused_before_any_socket_is_opened() {
        let sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\n\
                   a=rtpmap:111 opus/48000/2\r\n";
        let summary = OfferSummary::parse(sdp).unwrap();
        let err = summary.check_codec(VideoCodec::H264).unwrap_err();
        assert!(matches!(err, RtcError::NoVideo { .. }), "{err}");
        assert!(err.to_string().contains("audio/recvonly"), "{err}");
    }
}
