//! Live video, peer to peer: one GStreamer pipeline (started with the first viewer, stopped
//! with the last) feeds one WebRTC sender per viewing pilot.
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
//! The encoder follows the viewers: a keyframe when any of them asks (PLI/FIR, at most one
//! every 500 ms; a request inside that gap is served when it ends), and the bitrate set to the lowest receiver estimate (REMB) between the
//! configured bounds, lowered further while a receiver reports heavy loss.

use std::collections::HashMap;
use std::sync::Arc;
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
    /// Last receiver estimate, bits/s.
    estimate: Option<u64>,
}

struct State {
    config: VideoConfig,
    out: mpsc::Sender<String>,
    sessions: HashMap<String, Session>,
    pipeline: Option<VideoPipeline>,
    packets: Option<mpsc::Receiver<Bytes>>,
    events: mpsc::Sender<(String, PeerEvent)>,
    last_keyframe: Instant,
    /// A keyframe was asked for inside the gap after the previous one: it is forced when the
    /// gap ends (a relay's SFU asks once for a viewer that just joined and must not be ignored).
    keyframe_pending: bool,
}

async fn run(config: VideoConfig, mut rx: mpsc::Receiver<Signal>, out: mpsc::Sender<String>) {
    let (events, mut event_rx) = mpsc::channel(1024);
    let mut st = State {
        config,
        out,
        sessions: HashMap::new(),
        pipeline: None,
        packets: None,
        events,
        last_keyframe: Instant::now() - KEYFRAME_GAP,
        keyframe_pending: false,
    };
    loop {
        tokio::select! {
            s = rx.recv() => match s {
                Some(s) => st.on_signal(s).await,
                None => break,
            },
            Some((id, ev)) = event_rx.recv() => st.on_event(&id, ev).await,
            _ = tokio::time::sleep_until((st.last_keyframe + KEYFRAME_GAP).into()), if st.keyframe_pending => st.keyframe(),
            p = next_packet(&mut st.packets) => match p {
                Some(p) => st.forward(p).await,
                None => st.pipeline_ended().await,
            },
        }
    }
    for (_, s) in st.sessions.drain() {
        s.sender.close().await;
    }
    if let Some(p) = st.pipeline.take() {
        p.stop();
    }
}

async fn next_packet(rx: &mut Option<mpsc::Receiver<Bytes>>) -> Option<Bytes> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
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
                    self.send(pilot, json!({"subtype": "answer", "sessionID": id, "sdp": answer}));
                    self.keyframe();
                }
                Err(e) => {
                    tracing::warn!(session = %id, "renegotiation failed: {e}");
                    self.bye(pilot, id, "negotiation_failed", Some(e.to_string()));
                    self.end(id).await;
                }
            }
            return;
        }
        let codec = if self.config.codec == "vp8" { VideoCodec::Vp8 } else { VideoCodec::H264 };
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
        if let Err(e) = self.ensure_pipeline(codec) {
            tracing::error!("cannot start the video pipeline: {e}");
            sender.close().await;
            self.bye(pilot, id, "video_unavailable", Some(e));
            return;
        }
        tracing::info!(session = %id, %pilot, negotiated = ?sender.negotiated(), "video session started");
        self.sessions
            .insert(id.to_owned(), Session { pilot: pilot.to_owned(), sender: Arc::new(sender), estimate: None });
        self.send(pilot, json!({"subtype": "answer", "sessionID": id, "sdp": answer}));
        self.keyframe();
    }

    fn ensure_pipeline(&mut self, codec: VideoCodec) -> Result<(), String> {
        if self.pipeline.is_some() {
            return Ok(());
        }
        let c = &self.config;
        let source: Source = c.source.parse().map_err(|e: media::gst::MediaError| e.to_string())?;
        let settings = VideoSettings {
            source,
            codec: if codec == VideoCodec::Vp8 { Codec::Vp8 } else { Codec::H264 },
            width: c.width,
            height: c.height,
            framerate: c.framerate,
            bitrate_kbps: c.bitrate_kbps,
            min_bitrate_kbps: c.min_bitrate_kbps,
            max_bitrate_kbps: c.max_bitrate_kbps,
            keyframe_interval_s: c.keyframe_interval,
        };
        let (tx, rx) = mpsc::channel(RTP_QUEUE);
        let p = VideoPipeline::start(&settings, tx).map_err(|e| e.to_string())?;
        tracing::info!(encoder = p.encoder(), source = %c.source, "video pipeline started");
        self.pipeline = Some(p);
        self.packets = Some(rx);
        Ok(())
    }

    async fn forward(&mut self, packet: Bytes) {
        for s in self.sessions.values() {
            // A peer that is not connected yet (or any more) refuses: nothing to do.
            let _ = s.sender.write_rtp(&packet).await;
        }
    }

    async fn pipeline_ended(&mut self) {
        let why = self.pipeline.as_ref().and_then(|p| p.error()).map(|e| e.to_string());
        tracing::error!(error = ?why, "the video pipeline stopped");
        self.packets = None;
        if let Some(p) = self.pipeline.take() {
            p.stop();
        }
        let ids: Vec<(String, String)> = self.sessions.iter().map(|(k, s)| (k.clone(), s.pilot.clone())).collect();
        for (id, pilot) in ids {
            self.bye(&pilot, &id, "video_unavailable", why.clone());
            self.end(&id).await;
        }
    }

    async fn on_event(&mut self, id: &str, ev: PeerEvent) {
        let Some(session) = self.sessions.get_mut(id) else { return };
        let pilot = session.pilot.clone();
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
                        && p.stats().packets > 0
                    {
                        p.request_keyframe();
                        self.last_keyframe = Instant::now();
                        self.keyframe_pending = false;
                    }
                }
                if state == "closed" {
                    self.end(id).await;
                }
            }
            PeerEvent::KeyframeRequested => self.keyframe(),
            PeerEvent::Bandwidth { bps } => {
                session.estimate = Some(bps);
                self.retune();
            }
            PeerEvent::Loss { fraction } => {
                if fraction > 0.1
                    && let Some(p) = &self.pipeline
                {
                    let now = p.encoder_bitrate_kbps().unwrap_or(self.config.bitrate_kbps);
                    let set = p.set_bitrate((now as f32 * 0.85) as u32);
                    tracing::debug!(session = %id, fraction, kbps = set, "loss: bitrate lowered");
                }
            }
            _ => {}
        }
    }

    /// The bitrate follows the weakest viewer's estimate.
    fn retune(&self) {
        let Some(p) = &self.pipeline else { return };
        if let Some(min) = self.sessions.values().filter_map(|s| s.estimate).min() {
            p.set_bitrate((min / 1000) as u32);
        }
    }

    fn keyframe(&mut self) {
        // Not before the pipeline's first packet: the encoder's first frame is a keyframe anyway,
        // and a request that early makes GStreamer's encoder base class stamp it with x264enc's
        // 1000-hour time offset, after which its min-force-key-unit-interval throttle refuses
        // every later request (no keyframe on PLI for the pipeline's whole life).
        let Some(p) = &self.pipeline else {
            self.keyframe_pending = false;
            return;
        };
        if p.stats().packets == 0 {
            // The first frame is a keyframe anyway.
            self.keyframe_pending = false;
        } else if self.last_keyframe.elapsed() >= KEYFRAME_GAP {
            p.request_keyframe();
            self.last_keyframe = Instant::now();
            self.keyframe_pending = false;
        } else {
            self.keyframe_pending = true;
        }
    }

    async fn end(&mut self, id: &str) {
        if let Some(s) = self.sessions.remove(id) {
            s.sender.close().await;
        }
        if self.sessions.is_empty()
            && let Some(p) = self.pipeline.take()
        {
            tracing::info!("last viewer gone; video pipeline stopped");
            self.packets = None;
            p.stop();
        }
    }
}
