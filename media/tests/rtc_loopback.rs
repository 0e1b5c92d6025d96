//! `media::rtc::VideoSender` against a receiving peer built on the webrtc crate, in process, over
//! real UDP on loopback (and, for the mDNS test, inside a network namespace of its own).
//!
//! The receiver plays the pilot's browser: it offers a `recvonly` video transceiver, candidates
//! are trickled both ways through channels, and RTP written on the sender must come out of the
//! receiver's track unchanged. No timing is asserted beyond generous deadlines.
#![cfg(feature = "rtc")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use media::rtc::{Candidate, PeerEvent, PeerSettings, RtcError, VideoCodec, VideoSender};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::peer_connection::configuration::RTCOfferOptions;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodecParameters, RtpCodecKind};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCIceCandidateInit,
    RTCIceGatheringState, RTCPeerConnectionIceEvent, RTCPeerConnectionState, RTCSessionDescription, Registry,
    SettingEngineBuilder, register_default_interceptors,
};

/// Generous: a connection on loopback takes well under a second; CI machines are slow and busy.
const DEADLINE: Duration = Duration::from_secs(30);

const H264_CB_MODE1: &str = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f";
const H264_CB_MODE0: &str = "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f";
const H264_HIGH_MODE1: &str = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=640c1f";

/// Payload types the receiver offers: deliberately not the ones the sender registers, so the
/// test shows the answer follows the offer.
const PT_H264_MODE0: u8 = 125;
const PT_H264_MODE1: u8 = 127;
const PT_H264_HIGH: u8 = 123;
const PT_VP8: u8 = 120;

fn video_codec(mime: &str, fmtp: &str, payload_type: u8) -> RTCRtpCodecParameters {
    RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: mime.to_owned(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: fmtp.to_owned(),
            rtcp_feedback: vec![],
        },
        payload_type,
    }
}

/// What Chrome offers for H.264, in short: mode 0 first, the one we want, and High profile.
fn chrome_like_h264() -> Vec<RTCRtpCodecParameters> {
    vec![
        video_codec("video/H264", H264_CB_MODE0, PT_H264_MODE0),
        video_codec("video/H264", H264_CB_MODE1, PT_H264_MODE1),
        video_codec("video/H264", H264_HIGH_MODE1, PT_H264_HIGH),
    ]
}

/// The receiver's callbacks: candidates, state and tracks go to the test through channels.
struct ReceiverHandler {
    candidates: mpsc::UnboundedSender<Option<RTCIceCandidateInit>>,
    state: watch::Sender<RTCPeerConnectionState>,
    tracks: mpsc::UnboundedSender<Arc<dyn TrackRemote>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for ReceiverHandler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            let _ = self.candidates.send(Some(init));
        }
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.candidates.send(None);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.state.send(state);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let _ = self.tracks.send(track);
    }
}

/// How the receiving peer is built.
struct ReceiverOptions {
    /// Video codecs it offers; empty: it offers audio only.
    codecs: Vec<RTCRtpCodecParameters>,
    /// Hide host candidates behind an mDNS name, as browsers do (`<name>.local`).
    mdns_name: Option<String>,
    /// Apply the sender's trickled candidates. Without them the receiver can only learn the
    /// sender's address from the sender's own checks, which shows the sender reached it.
    learn_sender_candidates: bool,
}

impl ReceiverOptions {
    fn offering(codecs: Vec<RTCRtpCodecParameters>) -> ReceiverOptions {
        ReceiverOptions { codecs, mdns_name: None, learn_sender_candidates: true }
    }
}

/// The pilot's side: a recvonly offer, the receiving track's packets, its state.
struct Receiver {
    pc: Arc<dyn PeerConnection>,
    candidates: mpsc::UnboundedReceiver<Option<RTCIceCandidateInit>>,
    state: watch::Receiver<RTCPeerConnectionState>,
    tracks: mpsc::UnboundedReceiver<Arc<dyn TrackRemote>>,
}

impl Receiver {
    async fn new(options: &ReceiverOptions) -> Result<Receiver> {
        let mut media_engine = MediaEngine::default();
        for codec in &options.codecs {
            media_engine.register_codec(codec.clone(), RtpCodecKind::Video)?;
        }
        if options.codecs.is_empty() {
            media_engine.register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: RTCRtpCodec {
                        mime_type: "audio/opus".to_owned(),
                        clock_rate: 48_000,
                        channels: 2,
                        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
                        rtcp_feedback: vec![],
                    },
                    payload_type: 111,
                },
                RtpCodecKind::Audio,
            )?;
        }
        let registry = register_default_interceptors(Registry::new(), &mut media_engine)?;
        let mut setting_engine = SettingEngineBuilder::new()
            .with_include_loopback_candidate(true)
            .with_discard_local_candidates_during_ice_restart(true);
        setting_engine = match &options.mdns_name {
            Some(name) => setting_engine
                .with_multicast_dns_mode(MulticastDnsMode::QueryAndGather)
                .with_multicast_dns_local_name(name.clone())
                .with_multicast_dns_local_ip(Some(std::net::Ipv4Addr::LOCALHOST.into())),
            None => setting_engine.with_multicast_dns_mode(MulticastDnsMode::Disabled),
        };

        let (cand_tx, candidates) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
        let (track_tx, tracks) = mpsc::unbounded_channel();
        let pc = PeerConnectionBuilder::new()
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .with_setting_engine(setting_engine.build())
            .with_handler(Arc::new(ReceiverHandler { candidates: cand_tx, state: state_tx, tracks: track_tx }))
            .with_udp_addrs(vec!["127.0.0.1:0".to_owned()])
            .build()
            .await?;
        let pc: Arc<dyn PeerConnection> = Arc::new(pc);
        let kind = if options.codecs.is_empty() { RtpCodecKind::Audio } else { RtpCodecKind::Video };
        pc.add_transceiver_from_kind(
            kind,
            Some(RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Recvonly, ..Default::default() }),
        )
        .await?;
        Ok(Receiver { pc, candidates, state, tracks })
    }
}

/// The receiver's offer (an ICE-restart offer if asked), applied locally.
async fn make_offer(pc: &Arc<dyn PeerConnection>, ice_restart: bool) -> Result<String> {
    let options = ice_restart.then_some(RTCOfferOptions { ice_restart: true });
    let offer = pc.create_offer(options).await?;
    let sdp = offer.sdp.clone();
    pc.set_local_description(offer).await?;
    Ok(sdp)
}

/// A connected sender and receiver, with the plumbing between them running.
struct Session {
    video: Arc<VideoSender>,
    receiver: Arc<dyn PeerConnection>,
    receiver_state: watch::Receiver<RTCPeerConnectionState>,
    /// Every event the sender reported, candidates included (they were also applied).
    events: Events,
    /// The receiver's track, once it has opened.
    track: Arc<dyn TrackRemote>,
    /// RTP packets the receiver's track delivered.
    rtp: mpsc::UnboundedReceiver<rtp::Packet>,
    /// The candidate lines the receiver trickled to the sender.
    receiver_candidates: mpsc::UnboundedReceiver<String>,
    /// Numbers the packets the test writes.
    payloader: Arc<Payloader>,
    /// The candidate pumps and the track reader; aborted on drop.
    tasks: Vec<JoinHandle<()>>,
}

/// The sender's events as the test sees them: a stream, and what was already read from it.
struct Events {
    rx: mpsc::UnboundedReceiver<PeerEvent>,
    history: Vec<PeerEvent>,
}

impl Events {
    /// Moves what has arrived so far into `history`; returns its length, a mark for `wait_for`.
    fn mark(&mut self) -> usize {
        while let Ok(e) = self.rx.try_recv() {
            self.history.push(e);
        }
        self.history.len()
    }

    /// The first event at or after `since` in the history that matches, waiting for it if needed.
    /// Returns it and its index.
    async fn wait_for(
        &mut self,
        what: &str,
        since: usize,
        pred: impl Fn(&PeerEvent) -> bool,
    ) -> Result<(PeerEvent, usize)> {
        if let Some(i) = self.history.iter().skip(since).position(&pred) {
            return Ok((self.history[since + i].clone(), since + i));
        }
        let (events, history) = (&mut self.rx, &mut self.history);
        let found = timeout(DEADLINE, async {
            while let Some(e) = events.recv().await {
                history.push(e.clone());
                if pred(&e) {
                    return true;
                }
            }
            false
        })
        .await;
        match found {
            Ok(true) => Ok((self.history[self.history.len() - 1].clone(), self.history.len() - 1)),
            Ok(false) => bail!("event stream ended waiting for {what}; saw {:?}", &self.history[since..]),
            Err(_) => bail!("timed out waiting for {what}; saw {:?}", &self.history[since..]),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Applies the sender's events to the receiver (candidates) and hands every event to the test.
fn pump_sender_events(
    mut events: mpsc::Receiver<PeerEvent>,
    receiver: Arc<dyn PeerConnection>,
    learn_candidates: bool,
    to_test: mpsc::UnboundedSender<PeerEvent>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let PeerEvent::LocalCandidate(Some(c)) = &event
                && learn_candidates
            {
                let init = RTCIceCandidateInit {
                    candidate: c.candidate.clone(),
                    sdp_mid: c.sdp_mid.clone(),
                    sdp_mline_index: c.sdp_mline_index,
                    ..Default::default()
                };
                if let Err(e) = receiver.add_ice_candidate(init).await {
                    eprintln!("receiver refused candidate {}: {e}", c.candidate);
                }
            }
            let _ = to_test.send(event);
        }
    })
}

/// Trickles the receiver's candidates to the sender, as the relay would carry them.
fn pump_receiver_candidates(
    mut candidates: mpsc::UnboundedReceiver<Option<RTCIceCandidateInit>>,
    video: Arc<VideoSender>,
    seen: mpsc::UnboundedSender<String>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(c) = candidates.recv().await {
            let c = match c {
                Some(init) => Candidate {
                    candidate: init.candidate,
                    sdp_mid: init.sdp_mid,
                    sdp_mline_index: init.sdp_mline_index,
                },
                // What a browser sends at the end of gathering.
                None => Candidate { candidate: String::new(), sdp_mid: None, sdp_mline_index: None },
            };
            let _ = seen.send(c.candidate.clone());
            if let Err(e) = video.add_remote_candidate(c).await {
                eprintln!("sender refused candidate: {e}");
            }
        }
    })
}

fn read_track(track: Arc<dyn TrackRemote>, out: mpsc::UnboundedSender<rtp::Packet>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(event) = track.poll().await {
            if let TrackRemoteEvent::OnRtpPacket(packet) = event {
                let _ = out.send(packet);
            }
        }
    })
}

async fn wait_receiver_state(
    state: &mut watch::Receiver<RTCPeerConnectionState>,
    want: RTCPeerConnectionState,
) -> Result<()> {
    let reached = timeout(DEADLINE, state.wait_for(|s| *s == want)).await.map(|r| r.is_ok());
    match reached {
        Ok(true) => Ok(()),
        Ok(false) => bail!("receiver state channel closed"),
        Err(_) => bail!("timed out waiting for the receiver to be {want}; it is {}", *state.borrow()),
    }
}

fn loopback_settings(codec: VideoCodec) -> PeerSettings {
    PeerSettings { codec, include_loopback: true, mdns: false, ..PeerSettings::default() }
}

/// What `connect` negotiated, for the tests that look at the SDP.
struct Negotiation {
    offer: String,
    answer: String,
}

/// Offer, answer, trickle both ways, and wait until both sides are connected and the
/// receiver's track has opened (it opens on the first packet, so filler is written until then).
async fn connect(settings: PeerSettings, options: ReceiverOptions) -> Result<(Session, Negotiation)> {
    let Receiver { pc: receiver, candidates, state: mut receiver_state, mut tracks } = Receiver::new(&options).await?;
    let offer = make_offer(&receiver, false).await?;

    let (events_tx, events_rx) = mpsc::channel(64);
    let (video, answer) = VideoSender::answer(&settings, &offer, events_tx).await?;
    let video = Arc::new(video);
    receiver.set_remote_description(RTCSessionDescription::answer(answer.clone())?).await?;

    let (to_test, rx) = mpsc::unbounded_channel();
    let mut events = Events { rx, history: Vec::new() };
    let (seen_tx, receiver_candidates) = mpsc::unbounded_channel();
    let payloader = Arc::new(Payloader::default());
    let mut tasks = vec![
        pump_sender_events(events_rx, receiver.clone(), options.learn_sender_candidates, to_test),
        pump_receiver_candidates(candidates, video.clone(), seen_tx),
    ];

    let (_, connected_at) =
        events.wait_for("the sender to connect", 0, |e| *e == PeerEvent::State("connected".to_owned())).await?;
    ensure!(
        events.history[..connected_at].iter().any(|e| matches!(e, PeerEvent::LocalCandidate(Some(_)))),
        "the sender trickled no candidate before connecting: {:?}",
        events.history
    );
    wait_receiver_state(&mut receiver_state, RTCPeerConnectionState::Connected).await?;

    // The track opens when media arrives: write filler until it does.
    let track = timeout(DEADLINE, async {
        loop {
            tokio::select! {
                track = tracks.recv() => break track,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {
                    video.write_rtp(&payloader.filler()).await.ok();
                }
            }
        }
    })
    .await
    .map_err(|_| anyhow!("the receiver's track never opened"))?
    .context("track channel closed")?;
    let (rtp_tx, rtp) = mpsc::unbounded_channel();
    tasks.push(read_track(track.clone(), rtp_tx));
    let session =
        Session { video, receiver, receiver_state, events, track, rtp, receiver_candidates, payloader, tasks };
    Ok((session, Negotiation { offer, answer }))
}

/// Stands in for the encoder's payloader: one sequence-number counter per session, as a real
/// pipeline has (jumps would read as loss in the receiver's reports).
#[derive(Default)]
struct Payloader {
    seq: AtomicU16,
}

impl Payloader {
    /// The next packet, and its sequence number.
    fn packet(&self, timestamp: u32, marker: bool, payload: &[u8]) -> (u16, Vec<u8>) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        (seq, rtp_packet(seq, timestamp, marker, payload))
    }

    /// A filler packet (a non-IDR slice).
    fn filler(&self) -> Vec<u8> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        rtp_packet(seq, u32::from(seq) * 3000, true, &filler(seq))
    }
}

/// A hand-made RTP packet as an encoder's payloader would emit it: its own SSRC and payload
/// type, which the sender must rewrite.
fn rtp_packet(seq: u16, timestamp: u32, marker: bool, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + payload.len());
    p.push(0x80);
    p.push(if marker { 0x80 | 96 } else { 96 });
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&timestamp.to_be_bytes());
    p.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// A non-IDR slice NAL (type 1), tagged with its sequence number.
fn filler(seq: u16) -> Vec<u8> {
    let mut nal = vec![0x41, 0x9a];
    nal.extend_from_slice(&seq.to_be_bytes());
    nal.extend_from_slice(&[0x55; 20]);
    nal
}

/// SPS, PPS and a (tiny) IDR slice, each a single-NAL-unit packet.
fn keyframe_nals() -> Vec<Vec<u8>> {
    vec![
        vec![0x67, 0x42, 0xe0, 0x1f, 0x8c, 0x8d, 0x40, 0x50, 0x1e, 0xd0, 0x0f, 0x08, 0x84, 0x6a],
        vec![0x68, 0xce, 0x3c, 0x80],
        {
            let mut idr = vec![0x65, 0x88, 0x84, 0x00];
            idr.extend((0..900u32).map(|i| (i * 7 % 251) as u8));
            idr
        },
    ]
}

/// Writes SPS/PPS/IDR with increasing sequence numbers and checks they come out of the
/// receiver's track with the same payloads, in order, stamped with the sender's SSRC and the
/// negotiated payload type.
async fn send_keyframe_and_check(session: &mut Session, timestamp: u32) -> Result<()> {
    let nals = keyframe_nals();
    let pt = session.video.negotiated().payload_type;
    // Resend the group until it is seen: a packet written in the instant a path changes (ICE
    // restart) may be lost, and this test is about delivery, not about the first try.
    let result = timeout(DEADLINE, async {
        loop {
            let mut group_first = None;
            for (i, nal) in nals.iter().enumerate() {
                let (seq, packet) = session.payloader.packet(timestamp, i + 1 == nals.len(), nal);
                group_first.get_or_insert(seq);
                session.video.write_rtp(&packet).await?;
            }
            let group_first = group_first.unwrap_or_default();
            let mut got = Vec::new();
            let window = tokio::time::sleep(Duration::from_millis(500));
            tokio::pin!(window);
            loop {
                tokio::select! {
                    p = session.rtp.recv() => {
                        let p = p.ok_or_else(|| anyhow!("track reader ended"))?;
                        let s = p.header.sequence_number;
                        if s.wrapping_sub(group_first) < nals.len() as u16 {
                            ensure!(p.header.ssrc == session.video.ssrc(), "ssrc not rewritten: {:x}", p.header.ssrc);
                            ensure!(p.header.payload_type == pt, "payload type {} != negotiated {pt}", p.header.payload_type);
                            got.push((s, p.payload.to_vec()));
                            if got.len() == nals.len() {
                                break;
                            }
                        }
                    }
                    _ = &mut window => break,
                }
            }
            if got.len() == nals.len() {
                let seqs: Vec<u16> = got.iter().map(|(s, _)| *s).collect();
                ensure!(seqs.windows(2).all(|w| w[1] == w[0].wrapping_add(1)), "out of order: {seqs:?}");
                for ((_, payload), nal) in got.iter().zip(&nals) {
                    ensure!(payload == nal, "payload changed in transit");
                }
                return Ok::<(), anyhow::Error>(());
            }
        }
    })
    .await;
    result.map_err(|_| anyhow!("the keyframe never arrived whole"))?
}

/// Writes filler packets every 20 ms until aborted: receiver reports and transport-wide
/// feedback only cover a stream that is sending.
fn keep_sending(session: &Session) -> JoinHandle<()> {
    let (video, payloader) = (session.video.clone(), session.payloader.clone());
    tokio::spawn(async move {
        loop {
            let _ = video.write_rtp(&payloader.filler()).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h264_media_flows_and_feedback_surfaces() -> Result<()> {
    let (mut session, sdp) =
        connect(loopback_settings(VideoCodec::H264), ReceiverOptions::offering(chrome_like_h264())).await?;

    // The answer picked the offer's mode-1 constrained-baseline entry, with the offer's number.
    let negotiated = session.video.negotiated();
    assert_eq!(negotiated.mime_type.to_ascii_lowercase(), "video/h264");
    assert_eq!(negotiated.clock_rate, 90_000);
    assert_eq!(negotiated.payload_type, PT_H264_MODE1, "{negotiated:?}");
    assert!(negotiated.fmtp.contains("packetization-mode=1"), "{negotiated:?}");
    assert!(negotiated.fmtp.contains("42e01f"), "{negotiated:?}");
    assert!(sdp.answer.contains(&format!("a=rtpmap:{PT_H264_MODE1} H264/90000")), "{}", sdp.answer);
    // Trickle ICE: the answer itself carries no candidate, and there is no STUN server.
    assert!(!sdp.answer.contains("a=candidate"), "{}", sdp.answer);
    assert!(!sdp.answer.contains("typ srflx"));

    send_keyframe_and_check(&mut session, 900_000).await?;

    // A PLI from the receiver surfaces as a keyframe request (and nothing asked before it).
    let before = session.events.mark();
    assert!(!session.events.history.contains(&PeerEvent::KeyframeRequested), "{:?}", session.events.history);
    let pli = PictureLossIndication { sender_ssrc: 0, media_ssrc: session.video.ssrc() };
    session.track.write_rtcp(vec![Box::new(pli)]).await?;
    session.events.wait_for("KeyframeRequested", before, |e| *e == PeerEvent::KeyframeRequested).await?;

    // So does a REMB, as a Bandwidth figure.
    let remb =
        ReceiverEstimatedMaximumBitrate { sender_ssrc: 0, bitrate: 2_500_000.0, ssrcs: vec![session.video.ssrc()] };
    session.track.write_rtcp(vec![Box::new(remb)]).await?;
    session.events.wait_for("Bandwidth from REMB", before, |e| *e == PeerEvent::Bandwidth { bps: 2_500_000 }).await?;

    // Receiver reports surface as Loss (nothing is lost on loopback), transport-wide feedback as
    // the delay-based estimate (any figure but the REMB's).
    let feeder = keep_sending(&session);
    let (loss, _) = session.events.wait_for("Loss", 0, |e| matches!(e, PeerEvent::Loss { .. })).await?;
    assert_eq!(loss, PeerEvent::Loss { fraction: 0.0 });
    let (bandwidth, _) = session
        .events
        .wait_for(
            "Bandwidth from transport-wide feedback",
            0,
            |e| matches!(e, PeerEvent::Bandwidth { bps } if *bps != 2_500_000),
        )
        .await?;
    assert!(matches!(bandwidth, PeerEvent::Bandwidth { bps } if bps >= 100_000), "{bandwidth:?}");
    feeder.abort();

    let stats = session.video.stats().await;
    assert_eq!(stats.state, "connected");
    assert!(stats.packets_sent >= 3, "{stats:?}");
    assert!(stats.bytes_sent > 0, "{stats:?}");
    assert_eq!(stats.fraction_lost, Some(0.0), "{stats:?}");
    assert!(stats.rtt.is_some(), "{stats:?}");

    session.video.close().await;
    session.receiver.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vp8_is_negotiated_when_the_encoder_is_vp8() -> Result<()> {
    // The offer carries both codecs, H.264 first, as a browser's does.
    let mut codecs = chrome_like_h264();
    codecs.push(video_codec("video/VP8", "", PT_VP8));
    let (mut session, _) = connect(loopback_settings(VideoCodec::Vp8), ReceiverOptions::offering(codecs)).await?;

    let negotiated = session.video.negotiated();
    assert_eq!(negotiated.mime_type.to_ascii_lowercase(), "video/vp8");
    assert_eq!(negotiated.payload_type, PT_VP8);
    let received_codec = session.track.codec(session.video.ssrc()).await;
    assert_eq!(received_codec.map(|c| c.mime_type.to_ascii_lowercase()), Some("video/vp8".to_owned()));

    // A VP8 keyframe-like payload: payload descriptor, then frame bytes.
    let payload: Vec<u8> = [0x10u8, 0x00, 0x9d, 0x01, 0x2a].into_iter().chain(std::iter::repeat_n(0xab, 300)).collect();
    let packet = timeout(DEADLINE, async {
        loop {
            session.video.write_rtp(&session.payloader.packet(42, true, &payload).1).await?;
            if let Ok(Some(p)) = timeout(Duration::from_millis(300), session.rtp.recv()).await
                && p.payload.as_ref() == payload.as_slice()
            {
                return Ok::<rtp::Packet, anyhow::Error>(p);
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no VP8 packet arrived"))??;
    assert_eq!(packet.header.payload_type, PT_VP8);

    session.video.close().await;
    session.receiver.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_without_usable_video_fails_clearly() -> Result<()> {
    // Audio only.
    let receiver = Receiver::new(&ReceiverOptions::offering(vec![])).await?;
    let offer = make_offer(&receiver.pc, false).await?;
    let (tx, mut rx) = mpsc::channel(8);
    let err = VideoSender::answer(&loopback_settings(VideoCodec::H264), &offer, tx).await.unwrap_err();
    assert!(matches!(err, RtcError::NoVideo { .. }), "{err}");
    assert!(err.to_string().contains("no video m-line"), "{err}");
    assert!(err.to_string().contains("audio/recvonly"), "{err}");
    // Nothing was started: the event channel is closed without an event.
    assert!(rx.recv().await.is_none());
    receiver.pc.close().await?;

    // H.264, but only in forms our encoder's output cannot be sent as (mode 0, High profile).
    let receiver = Receiver::new(&ReceiverOptions::offering(vec![
        video_codec("video/H264", H264_CB_MODE0, PT_H264_MODE0),
        video_codec("video/H264", H264_HIGH_MODE1, PT_H264_HIGH),
    ]))
    .await?;
    let offer = make_offer(&receiver.pc, false).await?;
    let (tx, _rx) = mpsc::channel(8);
    let err = VideoSender::answer(&loopback_settings(VideoCodec::H264), &offer, tx).await.unwrap_err();
    assert!(matches!(err, RtcError::NoCommonCodec { .. }), "{err}");
    assert!(err.to_string().contains("640c1f"), "the error lists what was offered: {err}");

    // VP8 wanted, only H.264 offered.
    let (tx, _rx) = mpsc::channel(8);
    let err = VideoSender::answer(&loopback_settings(VideoCodec::Vp8), &offer, tx).await.unwrap_err();
    assert!(matches!(err, RtcError::NoCommonCodec { .. }), "{err}");
    receiver.pc.close().await?;

    // Not SDP at all.
    let (tx, _rx) = mpsc::channel(8);
    let err = VideoSender::answer(&PeerSettings::default(), "hello", tx).await.unwrap_err();
    assert!(matches!(err, RtcError::InvalidOffer(_)), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_restart_keeps_media_flowing() -> Result<()> {
    let (mut session, first) =
        connect(loopback_settings(VideoCodec::H264), ReceiverOptions::offering(chrome_like_h264())).await?;
    send_keyframe_and_check(&mut session, 1_000).await?;

    // Everything the first generation gathered has been reported by now.
    let before = session.events.mark();
    let first_generation: Vec<String> = session.events.history[..before]
        .iter()
        .filter_map(|e| match e {
            PeerEvent::LocalCandidate(Some(c)) => Some(c.candidate.clone()),
            _ => None,
        })
        .collect();
    ensure!(!first_generation.is_empty());

    // The pilot's side restarts ICE: new credentials both ways, new candidates both ways.
    let restart_offer = make_offer(&session.receiver, true).await?;
    assert_ne!(ufrag(&restart_offer), ufrag(&first.offer), "the offer restarts ICE");
    let answer = session.video.renegotiate(&restart_offer).await?;
    assert!(ufrag(&answer).is_some());
    assert_ne!(ufrag(&answer), ufrag(&first.answer), "the answer restarts ICE too");
    session.receiver.set_remote_description(RTCSessionDescription::answer(answer)?).await?;

    // The sender's sockets were rebound: its new candidates are not the old ones, and the new
    // generation ends with its own end-of-candidates.
    let (_, new_at) = session
        .events
        .wait_for(
            "a candidate of the restarted generation",
            before,
            |e| matches!(e, PeerEvent::LocalCandidate(Some(c)) if !first_generation.contains(&c.candidate)),
        )
        .await?;
    session
        .events
        .wait_for("the restarted generation's end of candidates", new_at, |e| *e == PeerEvent::LocalCandidate(None))
        .await?;
    assert_eq!(session.video.negotiated().payload_type, PT_H264_MODE1);

    send_keyframe_and_check(&mut session, 2_000).await?;
    assert_eq!(*session.receiver_state.borrow(), RTCPeerConnectionState::Connected);
    assert_eq!(session.video.stats().await.state, "connected");

    session.video.close().await;
    session.receiver.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_with_state_closed() -> Result<()> {
    let (mut session, _) =
        connect(loopback_settings(VideoCodec::H264), ReceiverOptions::offering(chrome_like_h264())).await?;
    let before = session.events.mark();
    session.video.close().await;
    session.events.wait_for("State(closed)", before, |e| *e == PeerEvent::State("closed".to_owned())).await?;
    let err = session.video.write_rtp(&session.payloader.filler()).await.unwrap_err();
    assert!(matches!(err, RtcError::Closed), "{err}");
    assert_eq!(session.video.stats().await.state, "closed");
    // Closing twice is harmless, and a closed sender refuses candidates.
    session.video.close().await;
    let err = session.video.add_remote_candidate(Candidate::default()).await.unwrap_err();
    assert!(matches!(err, RtcError::Closed), "{err}");
    // The event stream ends (a closed pipe is the normal end), without a second `closed`.
    let rest = timeout(DEADLINE, async {
        let mut rest = Vec::new();
        while let Some(e) = session.events.rx.recv().await {
            rest.push(e);
        }
        rest
    })
    .await
    .map_err(|_| anyhow!("the event stream did not end after close"))?;
    assert!(!rest.contains(&PeerEvent::State("closed".to_owned())), "closed twice: {rest:?}");
    session.receiver.close().await?;
    Ok(())
}

fn ufrag(sdp: &str) -> Option<String> {
    sdp.lines().find_map(|l| l.trim().strip_prefix("a=ice-ufrag:").map(str::to_owned))
}

/// Set in the copy of this test binary that runs inside its own network namespace.
const NETNS_ENV: &str = "TETHER_RTC_TEST_NETNS";

/// The pilot hides its host candidates behind an mDNS name, as Chrome does by default; the
/// sender (mDNS on, as by default) must resolve it to connect.
///
/// mDNS is multicast, so the test runs in a network namespace of its own, where the only
/// interface is loopback with a multicast route: no query leaves the machine. The test binary
/// re-executes itself there under `unshare --net`; where namespaces cannot be made (no
/// privilege), it says so and passes without running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mdns_host_candidates_are_resolved() -> Result<()> {
    if std::env::var_os(NETNS_ENV).is_some() {
        return mdns_session().await;
    }
    let probe = tokio::process::Command::new("unshare").args(["--net", "true"]).output().await;
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED mdns_host_candidates_are_resolved: cannot create a network namespace ({probe:?})");
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let script =
        "ip link set lo up && ip link set lo multicast on && ip route add 224.0.0.0/4 dev lo && exec \"$0\" \"$@\"";
    let out = tokio::process::Command::new("unshare")
        .args(["--net", "--", "sh", "-c", script])
        .arg(&exe)
        .args(["--exact", "mdns_host_candidates_are_resolved", "--nocapture", "--test-threads=1"])
        .env(NETNS_ENV, "1")
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "the namespaced run failed ({}):\n{stdout}\n{stderr}", out.status);
    ensure!(stdout.contains("1 passed"), "the namespaced run did not run the test:\n{stdout}\n{stderr}");
    Ok(())
}

async fn mdns_session() -> Result<()> {
    let settings = PeerSettings { codec: VideoCodec::H264, include_loopback: true, ..PeerSettings::default() };
    assert!(settings.mdns, "mDNS resolution is on by default");
    // The receiver does not learn the sender's candidates: the session can only come up if the
    // sender resolves the receiver's `.local` name and sends its checks there.
    let options = ReceiverOptions {
        codecs: chrome_like_h264(),
        mdns_name: Some("tether-pilot-test.local".to_owned()),
        learn_sender_candidates: false,
    };
    let (mut session, sdp) = connect(settings, options).await?;
    ensure!(!sdp.answer.contains("a=candidate"), "the answer gave the receiver our candidates");
    let mut lines: Vec<String> =
        sdp.offer.lines().filter(|l| l.starts_with("a=candidate")).map(str::to_owned).collect();
    while let Ok(c) = session.receiver_candidates.try_recv() {
        lines.push(c);
    }
    let real: Vec<&String> = lines.iter().filter(|l| !l.is_empty()).collect();
    ensure!(!real.is_empty(), "the receiver trickled no candidate");
    ensure!(real.iter().all(|l| l.contains(".local")), "the receiver's candidates are not all mDNS names: {real:?}");
    ensure!(!real.iter().any(|l| l.contains("127.0.0.1")), "the receiver leaked its address: {real:?}");

    send_keyframe_and_check(&mut session, 10).await?;
    session.video.close().await;
    session.receiver.close().await?;
    Ok(())
}
