//! The pilot's receiving peer: the other end of a [`VideoSender`](crate::rtc::VideoSender).
//!
//! A browser is the usual viewer; this is the same role on the webrtc crate, for tests and for
//! a command-line viewer. It offers one `recvonly` transceiver with the codecs it is told to
//! (Chrome's H.264 list, VP8, ...), so the device answers it exactly as it answers a browser.
//!
//! How to drive it:
//! 1. [`Viewer::offer`] builds the peer and returns the offer SDP, the local candidate stream and
//!    the packet stream ([`NewViewer`]). Send the offer to the device (a `webrtc` `offer`).
//! 2. Apply the device's answer with [`Viewer::apply_answer`], its trickled candidates with
//!    [`Viewer::add_remote_candidate`]; trickle the `candidates` stream to the device (`None`
//!    marks the end of a generation: send it as `"candidate":""`).
//! 3. Wait for [`ConnectionState::Connected`] ([`Viewer::wait_connected`], or [`Viewer::state`]).
//!    RTP of the first video track then arrives on `packets`, as the stack received it
//!    (reordered by nothing, NACK retransmissions included).
//! 4. Ask for a keyframe with [`Viewer::request_keyframe`] (a PLI); restart ICE after a network
//!    change with [`Viewer::restart_ice`] (a new offer); end with [`Viewer::close`].

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ::rtc::ice::mdns::MulticastDnsMode;
use ::rtc::peer_connection::configuration::RTCOfferOptions;
use ::rtc::rtcp;
use ::rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use ::rtc::rtp;
use ::rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodecParameters, RtpCodecKind};
use ::rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidateInit, RTCIceGatheringState, RTCIceServer, RTCPeerConnectionIceEvent, RTCSessionDescription,
    Registry, SettingEngineBuilder, register_default_interceptors,
};

use crate::rtc::{Candidate, IceServer, Negotiated, Reachability};

/// The connection state, as the webrtc crate (and the browser) names it.
pub use webrtc::peer_connection::RTCPeerConnectionState as ConnectionState;

/// Received packets waiting for the consumer. At 30 frames/s of 720p this is a few seconds of
/// video; a consumer that falls further behind loses the newest packets (counted by
/// [`Viewer::dropped_packets`]) rather than holding the stack's driver up.
pub const PACKET_QUEUE: usize = 4096;

/// H.264 constrained baseline, packetization mode 0 (single NAL units only): Chrome lists it
/// first; a device fragmenting with FU-A must not pick it.
pub const H264_CB_MODE0: &str = "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f";
/// H.264 constrained baseline, packetization mode 1: what a device's encoder sends.
pub const H264_CB_MODE1: &str = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f";
/// H.264 High profile, mode 1: offered by browsers, not producible by a baseline encoder.
pub const H264_HIGH_MODE1: &str = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=640c1f";

/// One codec the viewer offers, with the payload type it numbers it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedCodec {
    /// `video/H264`, `video/VP8`, `audio/opus`.
    pub mime_type: String,
    /// The `a=fmtp` parameters (empty for none).
    pub fmtp: String,
    /// The payload type in the offer; the answer must use the same number.
    pub payload_type: u8,
}

impl OfferedCodec {
    /// Any codec, as a browser would list it.
    pub fn new(mime_type: &str, fmtp: &str, payload_type: u8) -> OfferedCodec {
        OfferedCodec { mime_type: mime_type.to_owned(), fmtp: fmtp.to_owned(), payload_type }
    }

    /// What Chrome offers for H.264, in short and in its order: constrained baseline in mode 0,
    /// then in mode 1 (payload type 127, the entry a device answers with), then High profile.
    /// The numbers are deliberately not the ones a [`VideoSender`](crate::rtc::VideoSender)
    /// registers, so an answer shows it followed the offer.
    pub fn chrome_like_h264() -> Vec<OfferedCodec> {
        vec![
            OfferedCodec::new("video/H264", H264_CB_MODE0, 125),
            OfferedCodec::new("video/H264", H264_CB_MODE1, 127),
            OfferedCodec::new("video/H264", H264_HIGH_MODE1, 123),
        ]
    }

    /// VP8, payload type 120.
    pub fn vp8() -> OfferedCodec {
        OfferedCodec::new("video/VP8", "", 120)
    }

    /// Opus, payload type 111. An offer of audio alone is one a video sender must refuse.
    pub fn opus() -> OfferedCodec {
        OfferedCodec::new("audio/opus", "minptime=10;useinbandfec=1", 111)
    }

    fn is_audio(&self) -> bool {
        self.mime_type.to_ascii_lowercase().starts_with("audio/")
    }

    fn parameters(&self) -> RTCRtpCodecParameters {
        let audio = self.is_audio();
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: self.mime_type.clone(),
                clock_rate: if audio { 48_000 } else { 90_000 },
                channels: if audio { 2 } else { 0 },
                sdp_fmtp_line: self.fmtp.clone(),
                rtcp_feedback: vec![],
            },
            payload_type: self.payload_type,
        }
    }
}

/// Hide the viewer's host address behind an mDNS name, as browsers do by default: the host
/// candidate at `ip` is announced as `name`, which the viewer answers over multicast DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MdnsHostName {
    /// `<something>.local`.
    pub name: String,
    /// The one IPv4 address the name stands for (the stack hides one address per peer).
    pub ip: IpAddr,
}

/// How a viewer is built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewerOptions {
    /// What the offer carries. The transceiver is video if any codec is; an offer of audio
    /// codecs alone makes an audio transceiver (for testing a sender's refusal).
    pub codecs: Vec<OfferedCodec>,
    /// Hide the host candidate behind an mDNS name. None (the default): plain addresses, and no
    /// multicast socket at all (the device's candidates are plain addresses).
    pub mdns: Option<MdnsHostName>,
    /// Also gather loopback candidates, for a device on the same machine.
    pub include_loopback: bool,
    /// UDP sockets to gather on. Empty (the default): every IPv4 interface (`0.0.0.0:0`), plus
    /// `127.0.0.1:0` with `include_loopback`.
    pub udp_addrs: Vec<String>,
    /// STUN/TURN servers; none by default (host candidates only).
    pub ice_servers: Vec<IceServer>,
    /// Public addresses, port range and ICE-TCP, when the viewer is a server (the relay's SFU
    /// receiving a device's video). `ports` applies only when `udp_addrs` is empty.
    pub reach: Reachability,
}

impl ViewerOptions {
    /// Default options offering `codecs`.
    pub fn offering(codecs: Vec<OfferedCodec>) -> ViewerOptions {
        ViewerOptions { codecs, ..ViewerOptions::default() }
    }
}

/// Why a viewer could not be built or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ViewerError {
    /// No remote video track has opened yet (it opens with the first packet).
    #[error("no video track has arrived yet")]
    NoTrack,
    /// [`Viewer::close`] was called.
    #[error("the viewer is closed")]
    Closed,
    /// The connection reached a state it will not leave for `connected` by itself.
    #[error("the connection is {0}")]
    Ended(ConnectionState),
    /// No socket could be bound (e.g. every port of the configured range is in use).
    #[error("cannot bind the viewer's sockets: {0}")]
    Sockets(String),
    /// The device's candidate does not parse or does not belong to this session.
    #[error("remote candidate rejected: {0}")]
    BadCandidate(String),
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

fn webrtc_err(context: &'static str) -> impl FnOnce(webrtc::error::Error) -> ViewerError {
    move |source| ViewerError::Webrtc { context, source }
}

/// What [`Viewer::offer`] returns: the viewer, its offer, and the two streams its owner drains.
pub struct NewViewer {
    /// The control handle; share it behind an `Arc` (every method takes `&self`).
    pub viewer: Viewer,
    /// The offer SDP, already set as the local description. It carries no candidates: they
    /// follow on `candidates`.
    pub offer: String,
    /// Local candidates as they are gathered, tagged with the offer's first mid; `None` ends a
    /// generation (again after [`Viewer::restart_ice`]). Unbounded: a generation is a handful
    /// of candidates, and the stack's driver must never wait on the consumer. Ends on close.
    pub candidates: mpsc::UnboundedReceiver<Option<Candidate>>,
    /// RTP packets of the first remote video track, in arrival order (see [`PACKET_QUEUE`] for
    /// what happens when the consumer is slow). Ends when the track ends or on close.
    pub packets: mpsc::Receiver<rtp::Packet>,
}

impl std::fmt::Debug for NewViewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewViewer").field("viewer", &self.viewer).finish_non_exhaustive()
    }
}

/// The receiving peer connection. Cheap to share behind an `Arc`: every method takes `&self`.
pub struct Viewer {
    /// The webrtc connection; its driver task owns the sockets.
    pc: Arc<dyn PeerConnection>,
    /// Follows the stack's connection state.
    state: watch::Receiver<ConnectionState>,
    /// State the handler (on the stack's driver) and the track reader share with the handle.
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Viewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Viewer")
            .field("state", &*self.state.borrow())
            .field("ssrc", &self.ssrc())
            .finish_non_exhaustive()
    }
}

/// What the handler, the track reader and the [`Viewer`] share.
struct Shared {
    /// Local candidates to the owner; `None` once closed, which ends the owner's stream.
    candidates: Mutex<Option<mpsc::UnboundedSender<Option<Candidate>>>>,
    /// Taken by the first video track's reader; dropped on close.
    packets: Mutex<Option<mpsc::Sender<rtp::Packet>>>,
    /// Connection state changes.
    state: watch::Sender<ConnectionState>,
    /// The first remote video track, for RTCP (PLI) and its codec.
    track: Mutex<Option<Arc<dyn TrackRemote>>>,
    /// The sender's SSRC and payload type, from the first packet.
    first: Mutex<Option<(u32, u8)>>,
    /// Packets lost to a full queue.
    dropped: AtomicU64,
    /// The mid and index local candidates are tagged with (the offer's first section).
    mid: Mutex<(Option<String>, u16)>,
    /// Set by `close` (and `Drop`).
    closed: AtomicBool,
    /// The track reader; aborted on close.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Viewer {
    /// Builds the peer with one `recvonly` transceiver, creates the offer and sets it locally.
    /// Gathering starts now; candidates follow on [`NewViewer::candidates`].
    pub async fn offer(options: &ViewerOptions) -> Result<NewViewer, ViewerError> {
        let mut media_engine = MediaEngine::default();
        for codec in &options.codecs {
            let kind = if codec.is_audio() { RtpCodecKind::Audio } else { RtpCodecKind::Video };
            media_engine.register_codec(codec.parameters(), kind).map_err(webrtc_err("register codec"))?;
        }
        // NACK, PLI, receiver reports and transport-wide feedback, as a browser sends them.
        let registry =
            register_default_interceptors(Registry::new(), &mut media_engine).map_err(webrtc_err("interceptors"))?;
        let mut setting_engine = options
            .reach
            .apply(SettingEngineBuilder::new())
            .with_include_loopback_candidate(options.include_loopback)
            .with_discard_local_candidates_during_ice_restart(true);
        setting_engine = match &options.mdns {
            Some(m) => setting_engine
                .with_multicast_dns_mode(MulticastDnsMode::QueryAndGather)
                .with_multicast_dns_local_name(m.name.clone())
                .with_multicast_dns_local_ip(Some(m.ip)),
            None => setting_engine.with_multicast_dns_mode(MulticastDnsMode::Disabled),
        };
        let config = RTCConfigurationBuilder::new()
            .with_ice_servers(
                options
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
        let (mut udp_addrs, tcp_addrs) =
            options.reach.sockets(options.include_loopback, false).map_err(ViewerError::Sockets)?;
        if !options.udp_addrs.is_empty() {
            udp_addrs = options.udp_addrs.clone();
        }

        let (cand_tx, candidates) = mpsc::unbounded_channel();
        let (packet_tx, packets) = mpsc::channel(PACKET_QUEUE);
        let (state_tx, state) = watch::channel(ConnectionState::New);
        let shared = Arc::new(Shared {
            candidates: Mutex::new(Some(cand_tx)),
            packets: Mutex::new(Some(packet_tx)),
            state: state_tx,
            track: Mutex::new(None),
            first: Mutex::new(None),
            dropped: AtomicU64::new(0),
            mid: Mutex::new((None, 0)),
            closed: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        });
        let pc = PeerConnectionBuilder::new()
            .with_configuration(config)
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .with_setting_engine(setting_engine.build())
            .with_handler(Arc::new(Handler { shared: shared.clone() }))
            .with_udp_addrs(udp_addrs)
            .with_tcp_addrs(tcp_addrs)
            .build()
            .await
            .map_err(webrtc_err("build peer connection"))?;
        let pc: Arc<dyn PeerConnection> = Arc::new(pc);
        let viewer = Viewer { pc, state, shared };

        let video = options.codecs.iter().any(|c| !c.is_audio());
        let kind = if video { RtpCodecKind::Video } else { RtpCodecKind::Audio };
        let init = RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Recvonly, ..Default::default() };
        let offered = async {
            viewer.pc.add_transceiver_from_kind(kind, Some(init)).await.map_err(webrtc_err("add transceiver"))?;
            viewer.make_offer(false).await
        };
        match offered.await {
            Ok(offer) => Ok(NewViewer { viewer, offer, candidates, packets }),
            Err(e) => {
                viewer.close().await;
                Err(e)
            }
        }
    }

    /// Creates an offer (restarting ICE if asked) and sets it locally.
    async fn make_offer(&self, ice_restart: bool) -> Result<String, ViewerError> {
        let options = ice_restart.then_some(RTCOfferOptions { ice_restart: true });
        let offer = self.pc.create_offer(options).await.map_err(webrtc_err("create offer"))?;
        // Before setting it: gathering starts there, and candidates are tagged with this.
        *self.shared.mid.lock().unwrap() = (first_mid(&offer.sdp), 0);
        let sdp = offer.sdp.clone();
        self.pc.set_local_description(offer).await.map_err(webrtc_err("set local description"))?;
        Ok(sdp)
    }

    /// Applies the device's answer.
    pub async fn apply_answer(&self, sdp: &str) -> Result<(), ViewerError> {
        self.check_open()?;
        let answer = RTCSessionDescription::answer(sdp.to_owned()).map_err(webrtc_err("parse answer"))?;
        self.pc.set_remote_description(answer).await.map_err(webrtc_err("set remote description"))
    }

    /// Adds a candidate the device trickled. An empty `candidate` (end of candidates) is
    /// accepted and ignored.
    pub async fn add_remote_candidate(&self, c: Candidate) -> Result<(), ViewerError> {
        self.check_open()?;
        if c.candidate.trim().is_empty() {
            return Ok(());
        }
        let init = RTCIceCandidateInit {
            candidate: c.candidate,
            sdp_mid: c.sdp_mid,
            sdp_mline_index: c.sdp_mline_index,
            ..Default::default()
        };
        self.pc.add_ice_candidate(init).await.map_err(|e| ViewerError::BadCandidate(e.to_string()))
    }

    /// A new offer with fresh ICE credentials, set locally, for the device to answer (through
    /// the same session). The new generation's candidates follow on `candidates`.
    pub async fn restart_ice(&self) -> Result<String, ViewerError> {
        self.check_open()?;
        self.make_offer(true).await
    }

    /// The connection state, to watch.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// Waits until the connection is `connected`; fails as soon as it is `failed` or `closed`.
    /// Callers bound the wait themselves (ICE keeps trying for a while before it fails).
    pub async fn wait_connected(&self) -> Result<(), ViewerError> {
        let mut state = self.state.clone();
        let reached = state
            .wait_for(|s| matches!(s, ConnectionState::Connected | ConnectionState::Failed | ConnectionState::Closed))
            .await
            .map(|s| *s)
            .map_err(|_| ViewerError::Closed)?;
        match reached {
            ConnectionState::Connected => Ok(()),
            other => Err(ViewerError::Ended(other)),
        }
    }

    /// Asks the device for a keyframe with a picture loss indication on its stream.
    pub async fn request_keyframe(&self) -> Result<(), ViewerError> {
        let media_ssrc = self.ssrc().ok_or(ViewerError::NoTrack)?;
        self.write_rtcp(vec![Box::new(PictureLossIndication { sender_ssrc: 0, media_ssrc })]).await
    }

    /// Sends any RTCP to the device on the video track (a REMB, a FIR, ...).
    pub async fn write_rtcp(&self, packets: Vec<Box<dyn rtcp::Packet>>) -> Result<(), ViewerError> {
        self.check_open()?;
        let track = self.shared.track.lock().unwrap().clone().ok_or(ViewerError::NoTrack)?;
        track.write_rtcp(packets).await.map_err(webrtc_err("write rtcp"))
    }

    /// The sender's SSRC, once its first packet has arrived.
    pub fn ssrc(&self) -> Option<u32> {
        self.shared.first.lock().unwrap().map(|(ssrc, _)| ssrc)
    }

    /// The codec the video track carries, with the payload type of its first packet; None
    /// before the track has opened.
    pub async fn codec(&self) -> Option<Negotiated> {
        let track = self.shared.track.lock().unwrap().clone()?;
        let (ssrc, payload_type) = (*self.shared.first.lock().unwrap())?;
        let codec = track.codec(ssrc).await?;
        Some(Negotiated {
            mime_type: codec.mime_type,
            clock_rate: codec.clock_rate,
            fmtp: codec.sdp_fmtp_line,
            payload_type,
        })
    }

    /// Packets dropped because the `packets` queue was full.
    pub fn dropped_packets(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Closes the connection and ends both streams. Idempotent.
    pub async fn close(&self) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.pc.close().await {
            tracing::debug!(error = %e, "closing the viewer's peer connection");
        }
        self.shared.end();
        self.shared.state.send_replace(ConnectionState::Closed);
    }

    fn check_open(&self) -> Result<(), ViewerError> {
        if self.shared.closed.load(Ordering::Acquire) { Err(ViewerError::Closed) } else { Ok(()) }
    }
}

impl Drop for Viewer {
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
        self.shared.end();
    }
}

impl Shared {
    /// Ends the owner's streams and the track reader.
    fn end(&self) {
        self.candidates.lock().unwrap().take();
        self.packets.lock().unwrap().take();
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// The `a=mid` of the first media section.
fn first_mid(sdp: &str) -> Option<String> {
    sdp.lines().find_map(|l| l.trim().strip_prefix("a=mid:").map(str::to_owned))
}

/// The stack's callbacks, run on its driver task: translate and queue, never wait.
struct Handler {
    shared: Arc<Shared>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        let init = match event.candidate.to_json() {
            Ok(init) => init,
            Err(e) => {
                tracing::warn!(error = %e, "local candidate could not be serialised");
                return;
            }
        };
        let (sdp_mid, index) = self.shared.mid.lock().unwrap().clone();
        let c = Candidate { candidate: init.candidate, sdp_mid, sdp_mline_index: Some(index) };
        if let Some(tx) = &*self.shared.candidates.lock().unwrap() {
            let _ = tx.send(Some(c));
        }
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete
            && let Some(tx) = &*self.shared.candidates.lock().unwrap()
        {
            let _ = tx.send(None);
        }
    }

    async fn on_connection_state_change(&self, state: ConnectionState) {
        if state == ConnectionState::Unspecified || self.shared.closed.load(Ordering::Acquire) {
            return;
        }
        self.shared.state.send_replace(state);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if track.kind().await != RtpCodecKind::Video {
            return;
        }
        let Some(packets) = self.shared.packets.lock().unwrap().take() else {
            // Not the first video track (or closed): only the first is read.
            return;
        };
        *self.shared.track.lock().unwrap() = Some(track.clone());
        let reader = tokio::spawn(read_track(track, packets, self.shared.clone()));
        let mut tasks = self.shared.tasks.lock().unwrap();
        if self.shared.closed.load(Ordering::Acquire) {
            reader.abort();
        } else {
            tasks.push(reader);
        }
    }
}

/// Forwards the track's RTP to the owner until the track or the owner's stream ends.
async fn read_track(track: Arc<dyn TrackRemote>, packets: mpsc::Sender<rtp::Packet>, shared: Arc<Shared>) {
    while let Some(event) = track.poll().await {
        let TrackRemoteEvent::OnRtpPacket(packet) = event else { continue };
        shared.first.lock().unwrap().get_or_insert((packet.header.ssrc, packet.header.payload_type));
        match packets.try_send(packet) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}
