//! `media::rtc::VideoSender` against a receiving peer built on the webrtc crate, in process, over
//! real UDP on loopback (and, for the mDNS test, inside a network namespace of its own).
//!
//! The receiver is `media::viewer::Viewer`, playing the pilot's browser: it offers a `recvonly`
//! video transceiver, candidates are trickled both ways through channels, and RTP written on the
//! sender must come out of the viewer's track unchanged. No timing is asserted beyond generous deadlines.
#![cfg(feature = "rtc")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use anyhow::{Result, anyhow, bail, ensure};
use media::rtc::{Candidate, PeerEvent, PeerSettings, RtcError, VideoCodec, VideoSender};
use media::viewer::{
    ConnectionState, H264_CB_MODE0, H264_HIGH_MODE1, MdnsHostName, NewViewer, OfferedCodec, Viewer, ViewerOptions,
};
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtp;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Generous: a connection on loopback takes well under a second; CI machines are slow and busy.
const DEADLINE: Duration = Duration::from_secs(30);

/// The payload types `OfferedCodec::chrome_like_h264` and `OfferedCodec::vp8` use: deliberately
/// not the ones the sender registers, so the test shows the answer follows the offer.
const PT_H264_MODE0: u8 = 125;
const PT_H264_MODE1: u8 = 127;
const PT_H264_HIGH: u8 = 123;
const PT_VP8: u8 = 120;

/// The pilot's side on loopback only, as the tests run it.
fn viewer_options(codecs: Vec<OfferedCodec>) -> ViewerOptions {
    ViewerOptions {
        codecs,
        include_loopback: true,
        udp_addrs: vec!["127.0.0.1:0".to_owned()],
        ..ViewerOptions::default()
    }
}

/// A connected sender and viewer, with the plumbing between them running.
struct Session {
    video: Arc<VideoSender>,
    viewer: Arc<Viewer>,
    /// Every event the sender reported, candidates included (they were also applied).
    events: Events,
    /// RTP packets the viewer's track delivered.
    rtp: mpsc::Receiver<rtp::Packet>,
    /// The candidate lines the viewer trickled to the sender.
    viewer_candidates: mpsc::UnboundedReceiver<String>,
    /// Numbers the packets the test writes.
    payloader: Arc<Payloader>,
    /// The candidate pumps; aborted on drop.
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

/// Applies the sender's events to the viewer (candidates) and hands every event to the test.
fn pump_sender_events(
    mut events: mpsc::Receiver<PeerEvent>,
    viewer: Arc<Viewer>,
    learn_candidates: bool,
    to_test: mpsc::UnboundedSender<PeerEvent>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let PeerEvent::LocalCandidate(Some(c)) = &event
                && learn_candidates
                && let Err(e) = viewer.add_remote_candidate(c.clone()).await
            {
                eprintln!("viewer refused candidate {}: {e}", c.candidate);
            }
            let _ = to_test.send(event);
        }
    })
}

/// Trickles the viewer's candidates to the sender, as the relay would carry them.
fn pump_viewer_candidates(
    mut candidates: mpsc::UnboundedReceiver<Option<Candidate>>,
    video: Arc<VideoSender>,
    seen: mpsc::UnboundedSender<String>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(c) = candidates.recv().await {
            // `None` is what a browser sends as an empty candidate at the end of gathering.
            let c = c.unwrap_or_default();
            let _ = seen.send(c.candidate.clone());
            if let Err(e) = video.add_remote_candidate(c).await {
                eprintln!("sender refused candidate: {e}");
            }
        }
    })
}

fn loopback_settings(codec: VideoCodec) -> PeerSettings {
    PeerSettings { codec, include_loopback: true, mdns: false, ..PeerSettings::default() }
}

/// What `connect` negotiated, for the tests that look at the SDP.
struct Negotiation {
    offer: String,
    answer: String,
}

/// Offer, answer, trickle both ways, and wait until both sides are connected and the viewer's
/// track has opened (it opens on the first packet, so filler is written until one arrives).
///
/// With `learn_sender_candidates` off, the viewer is not told the sender's candidates: it can
/// then only learn the sender's address from the sender's own checks, which shows the sender
/// reached it.
async fn connect(
    settings: PeerSettings,
    options: ViewerOptions,
    learn_sender_candidates: bool,
) -> Result<(Session, Negotiation)> {
    let NewViewer { viewer, offer, candidates, packets: mut rtp } = Viewer::offer(&options).await?;
    let viewer = Arc::new(viewer);

    let (events_tx, events_rx) = mpsc::channel(64);
    let (video, answer) = VideoSender::answer(&settings, &offer, events_tx).await?;
    let video = Arc::new(video);
    viewer.apply_answer(&answer).await?;

    let (to_test, rx) = mpsc::unbounded_channel();
    let mut events = Events { rx, history: Vec::new() };
    let (seen_tx, viewer_candidates) = mpsc::unbounded_channel();
    let payloader = Arc::new(Payloader::default());
    let tasks = vec![
        pump_sender_events(events_rx, viewer.clone(), learn_sender_candidates, to_test),
        pump_viewer_candidates(candidates, video.clone(), seen_tx),
    ];

    let (_, connected_at) =
        events.wait_for("the sender to connect", 0, |e| *e == PeerEvent::State("connected".to_owned())).await?;
    ensure!(
        events.history[..connected_at].iter().any(|e| matches!(e, PeerEvent::LocalCandidate(Some(_)))),
        "the sender trickled no candidate before connecting: {:?}",
        events.history
    );
    timeout(DEADLINE, viewer.wait_connected())
        .await
        .map_err(|_| anyhow!("timed out waiting for the viewer to connect; it is {}", *viewer.state().borrow()))??;

    // The track opens when media arrives: write filler until the first packet comes out.
    timeout(DEADLINE, async {
        loop {
            tokio::select! {
                p = rtp.recv() => break p,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {
                    video.write_rtp(&payloader.filler()).await.ok();
                }
            }
        }
    })
    .await
    .map_err(|_| anyhow!("the viewer's track never opened"))?
    .ok_or_else(|| anyhow!("the viewer's packet stream ended"))?;
    ensure!(viewer.ssrc() == Some(video.ssrc()), "the viewer reads another stream");
    let session = Session { video, viewer, events, rtp, viewer_candidates, payloader, tasks };
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
        connect(loopback_settings(VideoCodec::H264), viewer_options(OfferedCodec::chrome_like_h264()), true).await?;

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
    session.viewer.request_keyframe().await?;
    session.events.wait_for("KeyframeRequested", before, |e| *e == PeerEvent::KeyframeRequested).await?;

    // So does a REMB, as a Bandwidth figure.
    let remb =
        ReceiverEstimatedMaximumBitrate { sender_ssrc: 0, bitrate: 2_500_000.0, ssrcs: vec![session.video.ssrc()] };
    session.viewer.write_rtcp(vec![Box::new(remb)]).await?;
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
    session.viewer.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vp8_is_negotiated_when_the_encoder_is_vp8() -> Result<()> {
    // The offer carries both codecs, H.264 first, as a browser's does.
    let mut codecs = OfferedCodec::chrome_like_h264();
    codecs.push(OfferedCodec::vp8());
    let (mut session, _) = connect(loopback_settings(VideoCodec::Vp8), viewer_options(codecs), true).await?;

    let negotiated = session.video.negotiated();
    assert_eq!(negotiated.mime_type.to_ascii_lowercase(), "video/vp8");
    assert_eq!(negotiated.payload_type, PT_VP8);
    let received_codec = session.viewer.codec().await;
    assert_eq!(received_codec.as_ref().map(|c| c.mime_type.to_ascii_lowercase()), Some("video/vp8".to_owned()));
    assert_eq!(received_codec.map(|c| c.payload_type), Some(PT_VP8));

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
    session.viewer.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_without_usable_video_fails_clearly() -> Result<()> {
    // Audio only.
    let NewViewer { viewer, offer, .. } = Viewer::offer(&viewer_options(vec![OfferedCodec::opus()])).await?;
    let (tx, mut rx) = mpsc::channel(8);
    let err = VideoSender::answer(&loopback_settings(VideoCodec::H264), &offer, tx).await.unwrap_err();
    assert!(matches!(err, RtcError::NoVideo { .. }), "{err}");
    assert!(err.to_string().contains("no video m-line"), "{err}");
    assert!(err.to_string().contains("audio/recvonly"), "{err}");
    // Nothing was started: the event channel is closed without an event.
    assert!(rx.recv().await.is_none());
    viewer.close().await;

    // H.264, but only in forms our encoder's output cannot be sent as (mode 0, High profile).
    let NewViewer { viewer, offer, .. } = Viewer::offer(&viewer_options(vec![
        OfferedCodec::new("video/H264", H264_CB_MODE0, PT_H264_MODE0),
        OfferedCodec::new("video/H264", H264_HIGH_MODE1, PT_H264_HIGH),
    ]))
    .await?;
    let (tx, _rx) = mpsc::channel(8);
    let err = VideoSender::answer(&loopback_settings(VideoCodec::H264), &offer, tx).await.unwrap_err();
    assert!(matches!(err, RtcError::NoCommonCodec { .. }), "{err}");
    assert!(err.to_string().contains("640c1f"), "the error lists what was offered: {err}");

    // VP8 wanted, only H.264 offered.
    let (tx, _rx) = mpsc::channel(8);
    let err = VideoSender::answer(&loopback_settings(VideoCodec::Vp8), &offer, tx).await.unwrap_err();
    assert!(matches!(err, RtcError::NoCommonCodec { .. }), "{err}");
    viewer.close().await;

    // Not SDP at all.
    let (tx, _rx) = mpsc::channel(8);
    let err = VideoSender::answer(&PeerSettings::default(), "hello", tx).await.unwrap_err();
    assert!(matches!(err, RtcError::InvalidOffer(_)), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_restart_keeps_media_flowing() -> Result<()> {
    let (mut session, first) =
        connect(loopback_settings(VideoCodec::H264), viewer_options(OfferedCodec::chrome_like_h264()), true).await?;
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
    let restart_offer = session.viewer.restart_ice().await?;
    assert_ne!(ufrag(&restart_offer), ufrag(&first.offer), "the offer restarts ICE");
    let answer = session.video.renegotiate(&restart_offer).await?;
    assert!(ufrag(&answer).is_some());
    assert_ne!(ufrag(&answer), ufrag(&first.answer), "the answer restarts ICE too");
    session.viewer.apply_answer(&answer).await?;

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
    assert_eq!(*session.viewer.state().borrow(), ConnectionState::Connected);
    assert_eq!(session.video.stats().await.state, "connected");

    session.video.close().await;
    session.viewer.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_with_state_closed() -> Result<()> {
    let (mut session, _) =
        connect(loopback_settings(VideoCodec::H264), viewer_options(OfferedCodec::chrome_like_h264()), true).await?;
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
    session.viewer.close().await;
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
    let options = ViewerOptions {
        mdns: Some(MdnsHostName {
            name: "tether-pilot-test.local".to_owned(),
            ip: std::net::Ipv4Addr::LOCALHOST.into(),
        }),
        ..viewer_options(OfferedCodec::chrome_like_h264())
    };
    let (mut session, sdp) = connect(settings, options, false).await?;
    ensure!(!sdp.answer.contains("a=candidate"), "the answer gave the receiver our candidates");
    let mut lines: Vec<String> =
        sdp.offer.lines().filter(|l| l.starts_with("a=candidate")).map(str::to_owned).collect();
    while let Ok(c) = session.viewer_candidates.try_recv() {
        lines.push(c);
    }
    let real: Vec<&String> = lines.iter().filter(|l| !l.is_empty()).collect();
    ensure!(!real.is_empty(), "the receiver trickled no candidate");
    ensure!(real.iter().all(|l| l.contains(".local")), "the receiver's candidates are not all mDNS names: {real:?}");
    ensure!(!real.iter().any(|l| l.contains("127.0.0.1")), "the receiver leaked its address: {real:?}");

    send_keyframe_and_check(&mut session, 10).await?;
    session.video.close().await;
    session.viewer.close().await;
    Ok(())
}
