//! Live video, peer to peer: one GStreamer pipeline (started with the first viewer, stopped
//! with the last) feeds one WebRTC sender per viewing pilot.
//!
//! The codec is chosen per session from the viewer's offer (`video.codec`: `auto`, the default,
//! answers H.264 when the offer has it and VP8 otherwise; `h264` or `vp8` only that one). The
//! pipeline's source is shared, with one encoder per codec in use: a VP8 viewer joining H.264
//! ones adds a VP8 encoder, removed again when the last VP8 viewer leaves.
//!
//! The service runs as its own task. The agent hands it every `webrtc` message from the relay;
//! it answers through the agent's outgoing queue:
//! - `offer` on a new `sessionID`: a peer answers it (the pilot's browser offers a receive-only
//!   video transceiver), the pipeline starts if it is not running, a keyframe is forced so the
//!   new viewer's picture starts at once. An `offer` on an open session renegotiates it (the
//!   browser's ICE restart after a network change).
//! - `ice_candidate`: trickled both ways; an empty `candidate` marks the end.
//! - `bye`: the session ends (the relay sends `pilot_left` when the pilot's connection closes,
//!   `moved_to_sfu` when an `auto` session moves to its SFU).
//!
//! Every change of a peer's connection state is reported to the relay (`state`), which decides
//! `auto` sessions on it. The relay's SFU is a viewer like any other (`from` `relay`).
//!
//! Each encoder follows its viewers: a keyframe when any of them asks (PLI/FIR, at most one
//! every 500 ms; a request inside that gap is served when it ends), and the bitrate set to the
//! lowest receiver estimate (REMB) between the configured bounds, lowered further while a
//! receiver reports heavy loss.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use media::gst::{Codec, Source, VideoPipeline, VideoSettings};
use media::rtc::{Candidate, IceServer, PeerEvent, PeerSettings, VideoCodec, VideoSender};
use serde_json::{Value, json};
use signaling::Envelope;
use signaling::message::WebRtc;
use tokio::sync::mpsc;

use crate::config::VideoConfig;

/// Packets buffered between the encoder and the senders.
const RTP_QUEUE: usize = 1024;
/// Fewest milliseconds between two forced keyframes.
const KEYFRAME_GAP: Duration = Duration::from_millis(500);

/// A message from a pilot, as the relay forwarded it.
#[derive(Debug)]
pub struct Signal {
    /// The pilot (`from`).
    pub from: String,
    /// The signaling payload.
    pub payload: WebRtc,
}

/// Handle on the video task.
#[derive(Debug, Clone)]
pub struct VideoService {
    tx: mpsc::Sender<Signal>,
}

impl VideoService {
    /// Starts the task; `out` receives encoded messages for the relay.
    pub fn start(config: VideoConfig, out: mpsc::Sender<String>) -> VideoService {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(run(config, rx, out));
        VideoService { tx }
    }

    /// Hands a pilot's message to the task (dropped with a warning if it is swamped).
    pub fn signal(&self, signal: Signal) {
        if self.tx.try_send(signal).is_err() {
            tracing::warn!("video signaling queue full; a webrtc message was dropped");
        }
    }
}

struct Session {
    pilot: String,
    sender: Arc<VideoSender>,
    /// What the session was answered with; its packets come from that codec's encoder.
    codec: VideoCodec,
    /// Last receiver estimate, bits/s.
    estimate: Option<u64>,
}

/// One codec's encoder in the pipeline, while some session uses that codec.
struct Encoder {
    packets: mpsc::Receiver<Bytes>,
    last_keyframe: Instant,
    /// A keyframe was asked for inside the gap after the previous one: it is forced when the
    /// gap ends (a relay's SFU asks once for a viewer that just joined and must not be ignored).
    keyframe_pending: bool,
}

struct State {
    config: VideoConfig,
    /// What `video.codec` allows, preferred first (`auto`: H.264, then VP8).
    codecs: Vec<VideoCodec>,
    out: mpsc::Sender<String>,
    sessions: HashMap<String, Session>,
    /// One source; one encoder per codec some session uses.
    pipeline: Option<VideoPipeline>,
    encoders: HashMap<VideoCodec, Encoder>,
    events: mpsc::Sender<(String, PeerEvent)>,
    /// Which encoder's packets are looked at first, in turn, so a busy one cannot starve the other.
    turn: usize,
}

/// The codecs `video.codec` allows, preferred first.
fn allowed_codecs(config: &str) -> Vec<VideoCodec> {
    match config {
        "h264" => vec![VideoCodec::H264],
        "vp8" => vec![VideoCodec::Vp8],
        _ => VideoCodec::ALL.to_vec(),
    }
}

fn gst_codec(codec: VideoCodec) -> Codec {
    match codec {
        VideoCodec::H264 => Codec::H264,
        VideoCodec::Vp8 => Codec::Vp8,
    }
}

async fn run(config: VideoConfig, mut rx: mpsc::Receiver<Signal>, out: mpsc::Sender<String>) {
    let (events, mut event_rx) = mpsc::channel(1024);
    let mut st = State {
        codecs: allowed_codecs(&config.codec),
        config,
        out,
        sessions: HashMap::new(),
        pipeline: None,
        encoders: HashMap::new(),
        events,
        turn: 0,
    };
    loop {
        let keyframe_due = st.keyframe_due();
        tokio::select! {
            s = rx.recv() => match s {
                Some(s) => st.on_signal(s).await,
                None => break,
            },
            Some((id, ev)) = event_rx.recv() => st.on_event(&id, ev).await,
            _ = tokio::time::sleep_until(keyframe_due.unwrap_or_else(Instant::now).into()), if keyframe_due.is_some() => {
                st.pending_keyframes();
            }
            (codec, p) = next_packet(&mut st.encoders, &mut st.turn) => match p {
                Some(p) => st.forward(codec, p).await,
                None => st.encoder_ended(codec).await,
            },
        }
    }
    for (_, s) in st.sessions.drain() {
        s.sender.close().await;
    }
    st.encoders.clear();
    if let Some(p) = st.pipeline.take() {
        p.stop();
    }
}

/// The next packet of any encoder (None: that encoder's channel closed); never ready without one.
async fn next_packet(encoders: &mut HashMap<VideoCodec, Encoder>, turn: &mut usize) -> (VideoCodec, Option<Bytes>) {
    std::future::poll_fn(|cx| {
        *turn = turn.wrapping_add(1);
        let all = VideoCodec::ALL;
        for i in 0..all.len() {
            let codec = all[(*turn + i) % all.len()];
            if let Some(e) = encoders.get_mut(&codec)
                && let Poll::Ready(p) = e.packets.poll_recv(cx)
            {
                return Poll::Ready((codec, p));
            }
        }
        Poll::Pending
    })
    .await
}

impl State {
    fn send(&self, to: &str, payload: Value) {
        let Ok(w) = serde_json::from_value::<WebRtc>(payload) else { return };
        let mut e = Envelope::new(w);
        e.client_id = Some(to.to_owned());
        if self.out.try_send(e.to_json()).is_err() {
            tracing::warn!("outgoing queue full; a webrtc message to {to} was dropped");
        }
    }

    fn bye(&self, to: &str, session: &str, reason: &str, message: Option<String>) {
        let mut p = json!({"subtype": "bye", "sessionID": session, "reason": reason});
        if let Some(m) = message {
            p["message"] = json!(m);
        }
        self.send(to, p);
    }

    async fn on_signal(&mut self, s: Signal) {
        let Some(id) = s.payload.session_id.clone() else { return };
        match s.payload.subtype.as_str() {
            "offer" => {
                let Some(sdp) = s.payload.rest.get("sdp").and_then(Value::as_str).map(str::to_owned) else {
                    self.bye(&s.from, &id, "invalid_offer", Some("the offer has no sdp".into()));
                    return;
                };
                self.on_offer(&s.from, &id, &sdp).await;
            }
            "ice_candidate" => {
                let Some(session) = self.sessions.get(&id) else { return };
                let c: Candidate = match serde_json::from_value(Value::Object(s.payload.rest.clone())) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(session = %id, "unreadable ICE candidate: {e}");
                        return;
                    }
                };
                if c.candidate.is_empty() {
                    return;
                }
                if let Err(e) = session.sender.add_remote_candidate(c).await {
                    tracing::warn!(session = %id, "remote ICE candidate refused: {e}");
                }
            }
            "bye" => {
                let reason = s.payload.rest.get("reason").and_then(Value::as_str).unwrap_or("bye").to_owned();
                tracing::info!(session = %id, pilot = %s.from, %reason, "video session ended by the pilot side");
                self.end(&id).await;
            }
            other => tracing::debug!(session = %id, "ignoring webrtc {other:?}"),
        }
    }

    async fn on_offer(&mut self, pilot: &str, id: &str, sdp: &str) {
        if !self.config.enabled {
            self.bye(pilot, id, "video_disabled", Some("video.enabled is off on this device".into()));
            return;
        }
        if let Some(session) = self.sessions.get(id) {
            match session.sender.renegotiate(sdp).await {
                Ok(answer) => {
                    tracing::info!(session = %id, "video session renegotiated (ICE restart)");
                    let codec = session.codec;
                    self.send(pilot, json!({"subtype": "answer", "sessionID": id, "sdp": answer}));
                    self.keyframe(codec);
                }
                Err(e) => {
                    tracing::warn!(session = %id, "renegotiation failed: {e}");
                    self.bye(pilot, id, "negotiation_failed", Some(e.to_string()));
                    self.end(id).await;
                }
            }
            return;
        }
        // `auto`: H.264 if the offer has it (constrained baseline, packetization-mode 1), else
        // VP8; `h264` or `vp8`: that one. The refusal names what the offer had.
        let codec = match media::rtc::choose_codec(sdp, &self.codecs) {
            Ok(codec) => codec,
            Err(e) => {
                tracing::warn!(session = %id, %pilot, "cannot answer the video offer: {e}");
                self.bye(pilot, id, "negotiation_failed", Some(e.to_string()));
                return;
            }
        };
        let settings = PeerSettings {
            ice_servers: self
                .config
                .ice_servers
                .iter()
                .map(|s| IceServer {
                    urls: s.urls.clone(),
                    username: s.username.clone(),
                    credential: s.credential.clone(),
                })
                .collect(),
            codec,
            mdns: true,
            include_loopback: self.config.include_loopback,
            ..PeerSettings::default()
        };
        let (etx, mut erx) = mpsc::channel(256);
        let answered = VideoSender::answer(&settings, sdp, etx).await;
        let (sender, answer) = match answered {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(session = %id, %pilot, "cannot answer the video offer: {e}");
                self.bye(pilot, id, "negotiation_failed", Some(e.to_string()));
                return;
            }
        };
        // Tag this session's events for the one loop.
        let (tag, events) = (id.to_owned(), self.events.clone());
        tokio::spawn(async move {
            while let Some(ev) = erx.recv().await {
                if events.send((tag.clone(), ev)).await.is_err() {
                    break;
                }
            }
        });
        if let Err(e) = self.ensure_encoder(codec) {
            tracing::error!(?codec, "cannot start the video pipeline: {e}");
            sender.close().await;
            self.bye(pilot, id, "video_unavailable", Some(e));
            return;
        }
        tracing::info!(session = %id, %pilot, ?codec, negotiated = ?sender.negotiated(), "video session started");
        self.sessions.insert(
            id.to_owned(),
            Session { pilot: pilot.to_owned(), sender: Arc::new(sender), codec, estimate: None },
        );
        self.send(pilot, json!({"subtype": "answer", "sessionID": id, "sdp": answer}));
        self.keyframe(codec);
    }

    /// Starts the pipeline with `codec`'s encoder, or adds that encoder to the running one (the
    /// source is shared: a camera is opened once).
    fn ensure_encoder(&mut self, codec: VideoCodec) -> Result<(), String> {
        if self.encoders.contains_key(&codec) {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel(RTP_QUEUE);
        match &self.pipeline {
            Some(p) => {
                let encoder = p.add_codec(gst_codec(codec), tx).map_err(|e| e.to_string())?;
                tracing::info!(?codec, encoder, "video encoder added for a viewer of another codec");
            }
            None => {
                let c = &self.config;
                let source: Source = c.source.parse().map_err(|e: media::gst::MediaError| e.to_string())?;
                let settings = VideoSettings {
                    source,
                    codec: gst_codec(codec),
                    width: c.width,
                    height: c.height,
                    framerate: c.framerate,
                    bitrate_kbps: c.bitrate_kbps,
                    min_bitrate_kbps: c.min_bitrate_kbps,
                    max_bitrate_kbps: c.max_bitrate_kbps,
                    keyframe_interval_s: c.keyframe_interval,
                };
                let p = VideoPipeline::start(&settings, tx).map_err(|e| e.to_string())?;
                tracing::info!(?codec, encoder = p.encoder(), source = %c.source, "video pipeline started");
                self.pipeline = Some(p);
            }
        }
        self.encoders.insert(
            codec,
            Encoder { packets: rx, last_keyframe: Instant::now() - KEYFRAME_GAP, keyframe_pending: false },
        );
        Ok(())
    }

    /// `codec` has no session left: its encoder goes, and the pipeline with the last one.
    fn drop_encoder(&mut self, codec: VideoCodec) {
        let had = self.encoders.remove(&codec).is_some();
        if self.encoders.is_empty() {
            if let Some(p) = self.pipeline.take() {
                tracing::info!("last viewer gone; video pipeline stopped");
                p.stop();
            }
        } else if had && let Some(p) = &self.pipeline {
            p.remove_codec(gst_codec(codec));
            tracing::info!(?codec, "last viewer of this codec gone; its encoder removed");
        }
    }

    async fn forward(&mut self, codec: VideoCodec, packet: Bytes) {
        for s in self.sessions.values().filter(|s| s.codec == codec) {
            // A peer that is not connected yet (or any more) refuses: nothing to do.
            let _ = s.sender.write_rtp(&packet).await;
        }
    }

    /// `codec`'s packet channel closed: its encoder (or the whole pipeline) stopped.
    async fn encoder_ended(&mut self, codec: VideoCodec) {
        let why = self.pipeline.as_ref().and_then(|p| p.error_for(gst_codec(codec))).map(|e| e.to_string());
        tracing::error!(?codec, error = ?why, "the video pipeline stopped");
        let ids: Vec<(String, String)> =
            self.sessions.iter().filter(|(_, s)| s.codec == codec).map(|(k, s)| (k.clone(), s.pilot.clone())).collect();
        for (id, pilot) in ids {
            self.bye(&pilot, &id, "video_unavailable", why.clone());
            self.end(&id).await;
        }
        self.drop_encoder(codec);
    }

    async fn on_event(&mut self, id: &str, ev: PeerEvent) {
        let Some(session) = self.sessions.get_mut(id) else { return };
        let (pilot, codec) = (session.pilot.clone(), session.codec);
        match ev {
            PeerEvent::LocalCandidate(Some(c)) => {
                let mut p = serde_json::to_value(&c).unwrap_or_default();
                p["subtype"] = json!("ice_candidate");
                p["sessionID"] = json!(id);
                self.send(&pilot, p);
            }
            PeerEvent::LocalCandidate(None) => {
                self.send(&pilot, json!({"subtype": "ice_candidate", "sessionID": id, "candidate": ""}));
            }
            PeerEvent::State(state) => {
                tracing::info!(session = %id, %state, "video peer state");
                // The relay decides `auto` sessions (peer to peer, or its SFU) on these reports.
                self.send(&pilot, json!({"subtype": "state", "sessionID": id, "state": state}));
                if state == "connected" {
                    // Packets written before the peer connected were dropped, the first
                    // keyframe with them: the new viewer needs one now, whatever the throttle.
                    // (Unless nothing has come out yet: then the first frame is the keyframe,
                    // and asking would break later requests; see `keyframe`.)
                    if let Some(p) = &self.pipeline
                        && p.stats_for(gst_codec(codec)).is_some_and(|s| s.packets > 0)
                        && let Some(e) = self.encoders.get_mut(&codec)
                    {
                        p.request_keyframe_for(gst_codec(codec));
                        e.last_keyframe = Instant::now();
                        e.keyframe_pending = false;
                    }
                }
                if state == "closed" {
                    self.end(id).await;
                }
            }
            PeerEvent::KeyframeRequested => self.keyframe(codec),
            PeerEvent::Bandwidth { bps } => {
                session.estimate = Some(bps);
                self.retune(codec);
            }
            PeerEvent::Loss { fraction } => {
                if fraction > 0.1
                    && let Some(p) = &self.pipeline
                {
                    let now = p.encoder_bitrate_kbps_for(gst_codec(codec)).unwrap_or(self.config.bitrate_kbps);
                    let set = p.set_bitrate_for(gst_codec(codec), (now as f32 * 0.85) as u32);
                    tracing::debug!(session = %id, fraction, kbps = ?set, "loss: bitrate lowered");
                }
            }
            _ => {}
        }
    }

    /// `codec`'s encoder bitrate follows the weakest estimate among that codec's viewers.
    fn retune(&self, codec: VideoCodec) {
        let Some(p) = &self.pipeline else { return };
        if let Some(min) = self.sessions.values().filter(|s| s.codec == codec).filter_map(|s| s.estimate).min() {
            p.set_bitrate_for(gst_codec(codec), (min / 1000) as u32);
        }
    }

    fn keyframe(&mut self, codec: VideoCodec) {
        // Not before the encoder's first packet: its first frame is a keyframe anyway, and a
        // request that early makes GStreamer's encoder base class stamp it with x264enc's
        // 1000-hour time offset, after which its min-force-key-unit-interval throttle refuses
        // every later request (no keyframe on PLI for the encoder's whole life).
        let Some(e) = self.encoders.get_mut(&codec) else { return };
        let Some(p) = &self.pipeline else {
            e.keyframe_pending = false;
            return;
        };
        if p.stats_for(gst_codec(codec)).is_none_or(|s| s.packets == 0) {
            // The first frame is a keyframe anyway.
            e.keyframe_pending = false;
        } else if e.last_keyframe.elapsed() >= KEYFRAME_GAP {
            p.request_keyframe_for(gst_codec(codec));
            e.last_keyframe = Instant::now();
            e.keyframe_pending = false;
        } else {
            e.keyframe_pending = true;
        }
    }

    /// When the earliest keyframe held back by the gap is due.
    fn keyframe_due(&self) -> Option<Instant> {
        self.encoders.values().filter(|e| e.keyframe_pending).map(|e| e.last_keyframe + KEYFRAME_GAP).min()
    }

    /// Forces the held-back keyframes whose gap has passed.
    fn pending_keyframes(&mut self) {
        let due: Vec<VideoCodec> = self
            .encoders
            .iter()
            .filter(|(_, e)| e.keyframe_pending && e.last_keyframe.elapsed() >= KEYFRAME_GAP)
            .map(|(c, _)| *c)
            .collect();
        for codec in due {
            self.keyframe(codec);
        }
    }

    async fn end(&mut self, id: &str) {
        let Some(s) = self.sessions.remove(id) else { return };
        s.sender.close().await;
        if !self.sessions.values().any(|o| o.codec == s.codec) {
            self.drop_encoder(s.codec);
        }
    }
}
