//! The pilot's side of a video session, as the console does it: a `media::viewer::Viewer` and
//! its signaling over an operator WebSocket (answer and candidates applied, candidates and peer
//! state reported), for the agent video and SFU tests.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use media::rtc::Candidate;
use media::viewer::{NewViewer, OfferedCodec, Viewer, ViewerOptions};
use rtc::rtp;
use rtc::shared::marshal::Marshal;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::{Ws, operator, send};

/// Generous: sessions on loopback come up in well under a second, but the agent also starts a
/// GStreamer pipeline, and CI machines are slow and busy.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Whether an H.264 RTP packet starts a keyframe.
pub fn is_keyframe(p: &rtp::Packet) -> bool {
    media::gst::h264_rtp_is_keyframe(&p.marshal().unwrap())
}

/// Reads until `n` distinct frames (RTP timestamps), from the first keyframe on, have come.
pub async fn frames_from_keyframe(packets: &mut mpsc::Receiver<rtp::Packet>, n: usize) {
    let mut stamps: Vec<u32> = Vec::new();
    while stamps.len() < n {
        let p = tokio::time::timeout(DEADLINE, packets.recv())
            .await
            .expect("no RTP packet in time")
            .expect("the packet stream ended");
        if stamps.is_empty() && !is_keyframe(&p) {
            continue;
        }
        if stamps.last() != Some(&p.header.timestamp) {
            stamps.push(p.header.timestamp);
        }
    }
}

/// One pilot: a viewer and its signaling over its own operator WebSocket.
pub struct Pilot {
    pub session: String,
    pub viewer: Arc<Viewer>,
    pub packets: mpsc::Receiver<rtp::Packet>,
    /// What the pump did not consume: `mode`, `bye`, acks, errors, and the answer (after it was
    /// applied).
    pub inbox: mpsc::UnboundedReceiver<Value>,
    close: Option<oneshot::Sender<()>>,
    pump: JoinHandle<()>,
}

impl Pilot {
    /// Offers session `session` to boat-7 with `codecs`, in `mode` (the relay's default if
    /// None), gathering on loopback only.
    pub async fn offer_with(
        addr: std::net::SocketAddr,
        key: &str,
        session: &str,
        codecs: Vec<OfferedCodec>,
        mode: Option<&str>,
    ) -> Pilot {
        let mut ws = operator(addr, key).await;
        let options = ViewerOptions {
            codecs,
            include_loopback: true,
            udp_addrs: vec!["127.0.0.1:0".to_owned()],
            ..ViewerOptions::default()
        };
        let NewViewer { viewer, offer, candidates, packets } = Viewer::offer(&options).await.unwrap();
        let viewer = Arc::new(viewer);
        let mut payload = json!({"subtype": "offer", "sessionID": session, "sdp": offer});
        if let Some(mode) = mode {
            payload["mode"] = json!(mode);
        }
        send(&mut ws, json!({"type": "webrtc", "correlationID": session, "clientID": "boat-7", "payload": payload}))
            .await;
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        let (close, close_rx) = oneshot::channel();
        let pump = tokio::spawn(pump(ws, viewer.clone(), candidates, session.to_owned(), inbox_tx, close_rx));
        Pilot { session: session.to_owned(), viewer, packets, inbox, close: Some(close), pump }
    }

    pub async fn recv_until(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let v = tokio::time::timeout_at(deadline, self.inbox.recv())
                .await
                .unwrap_or_else(|_| panic!("{}: no {what} in time", self.session))
                .unwrap_or_else(|| panic!("{}: the signaling pump ended waiting for {what}", self.session));
            if want(&v) {
                return v;
            }
        }
    }

    /// The `mode` message the relay sends after the offer.
    pub async fn mode(&mut self) -> Value {
        let v = self.recv_until("a mode message", |v| v["payload"]["subtype"] == "mode").await;
        v["payload"].clone()
    }

    pub async fn connected(&self) {
        let r = tokio::time::timeout(DEADLINE, self.viewer.wait_connected()).await;
        assert!(matches!(r, Ok(Ok(()))), "{}: the viewer did not connect: {r:?}", self.session);
    }

    pub async fn next_packet(&mut self) -> rtp::Packet {
        tokio::time::timeout(DEADLINE, self.packets.recv())
            .await
            .unwrap_or_else(|_| panic!("{}: no RTP packet in time", self.session))
            .unwrap_or_else(|| panic!("{}: the packet stream ended", self.session))
    }

    /// Reads until `n` distinct frames (RTP timestamps), from the first keyframe on, have come.
    pub async fn frames_from_keyframe(&mut self, n: usize) {
        frames_from_keyframe(&mut self.packets, n).await;
    }

    /// Drops what has queued up so far.
    pub fn drain(&mut self) {
        while self.packets.try_recv().is_ok() {}
    }

    pub async fn leave(&mut self) {
        if let Some(close) = self.close.take() {
            let _ = close.send(());
        }
        tokio::time::timeout(DEADLINE, &mut self.pump).await.expect("the pump did not end").unwrap();
        self.viewer.close().await;
    }
}

impl Drop for Pilot {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// The console's signaling in short: the answer and the relay's candidates go to the viewer,
/// the viewer's candidates and its connection state go to the relay, the rest to the inbox.
async fn pump(
    mut ws: Ws,
    viewer: Arc<Viewer>,
    mut candidates: mpsc::UnboundedReceiver<Option<Candidate>>,
    session: String,
    inbox: mpsc::UnboundedSender<Value>,
    mut close: oneshot::Receiver<()>,
) {
    let mut gathering = true;
    let mut state = viewer.state();
    let mut answered = false;
    let mut early: Vec<Candidate> = Vec::new();
    loop {
        tokio::select! {
            m = ws.next() => {
                let text = match m {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => panic!("pilot WebSocket failed: {e}"),
                    None => return,
                };
                let v: Value = serde_json::from_str(&text).unwrap();
                let p = &v["payload"];
                if v["type"] != "webrtc" || p["sessionID"] != session.as_str() {
                    let _ = inbox.send(v);
                    continue;
                }
                match p["subtype"].as_str() {
                    Some("answer") => {
                        assert_eq!(v["from"], "boat-7", "{v}");
                        viewer.apply_answer(p["sdp"].as_str().unwrap()).await.unwrap();
                        answered = true;
                        for c in early.drain(..) {
                            viewer.add_remote_candidate(c).await.unwrap();
                        }
                        let _ = inbox.send(v);
                    }
                    Some("ice_candidate") => {
                        let c: Candidate = serde_json::from_value(p.clone()).unwrap();
                        if answered {
                            if let Err(e) = viewer.add_remote_candidate(c).await {
                                eprintln!("viewer refused the relay's candidate {p}: {e}");
                            }
                        } else {
                            early.push(c);
                        }
                    }
                    _ => {
                        let _ = inbox.send(v);
                    }
                }
            }
            c = candidates.recv(), if gathering => {
                let Some(c) = c else {
                    gathering = false;
                    continue;
                };
                let mut payload = serde_json::to_value(c.unwrap_or_default()).unwrap();
                payload["subtype"] = json!("ice_candidate");
                payload["sessionID"] = json!(session);
                let m = json!({"type": "webrtc", "clientID": "boat-7", "payload": payload});
                ws.send(Message::Text(m.to_string().into())).await.unwrap();
            }
            changed = state.changed() => {
                if changed.is_err() {
                    continue;
                }
                let s = state.borrow_and_update().to_string();
                let m = json!({"type": "webrtc", "clientID": "boat-7",
                               "payload": {"subtype": "state", "sessionID": session, "state": s}});
                let _ = ws.send(Message::Text(m.to_string().into())).await;
            }
            _ = &mut close => {
                let _ = ws.close(None).await;
                while let Some(Ok(_)) = ws.next().await {}
                return;
            }
        }
    }
}
