//! WebRTC signaling sessions between a pilot and a device.
//!
//! A pilot opens a session with an `offer` carrying a `sessionID` of its choosing; from then on
//! every `webrtc` message of that session (answer, ICE candidates, renegotiation, `bye`) is
//! routed between exactly that pilot connection and that device. When either side goes away the
//! relay ends the session and tells the other side why, with
//! `{"subtype":"bye","sessionID":..,"reason":..}`:
//! - `pilot_left`: the pilot's connection closed (sent to the device, which tears the peer down);
//! - `device_offline`: the device disconnected (sent to the pilot).
//!
//! A `bye` from either side ends the session as well.
//!
//! Each session is in one of two modes: `p2p` (the relay forwards signaling between the pilot
//! and the device) or `sfu` (the relay's SFU answers the pilot; the device publishes once to
//! the SFU on an upstream session of the SFU's own). An `auto` session starts peer to peer and
//! moves to the SFU when it has not reported `connected` within the deadline or reports
//! `failed` ([`fallback`]). The SFU's messages come out of its channel and are routed by
//! [`route_sfu`].

use std::collections::HashMap;
use std::sync::Arc;

use ::media::sfu::{DeviceKey, SfuOut};
use parking_lot::Mutex;
use serde_json::{Value, json};
use signaling::message;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::Relay;
use crate::hub::ConnId;

/// Who carries a session's media.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Directly between the pilot and the device; the relay only forwards signaling.
    P2p,
    /// Through the relay's SFU, which answers the pilot itself.
    Sfu,
}

impl Mode {
    /// The protocol's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::P2p => "p2p",
            Mode::Sfu => "sfu",
        }
    }
}

/// What an offer asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    /// `p2p`.
    P2p,
    /// `sfu`.
    Sfu,
    /// `auto`.
    Auto,
}

impl Requested {
    /// Parses `p2p`, `sfu` or `auto`.
    pub fn parse(s: &str) -> Option<Requested> {
        match s {
            "p2p" => Some(Requested::P2p),
            "sfu" => Some(Requested::Sfu),
            "auto" => Some(Requested::Auto),
            _ => None,
        }
    }
}

/// One signaling session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaSession {
    /// The session's id (chosen by the pilot).
    pub id: String,
    /// The device streaming.
    pub device: String,
    /// The organisation both belong to.
    pub org: String,
    /// The pilot watching.
    pub pilot: String,
    /// The pilot's connection.
    pub conn: ConnId,
    /// Who carries the media now.
    pub mode: Mode,
    /// Whether the relay may move the session to the SFU (`auto`).
    pub auto: bool,
    /// Whether a side reported `connected` for the current peer-to-peer attempt.
    pub connected: bool,
    /// Counts the offers that started a peer-to-peer attempt; the fallback timer of an older
    /// attempt does nothing.
    pub attempt: u64,
}

impl MediaSession {
    /// A new peer-to-peer session.
    pub fn new(id: &str, device: &str, org: &str, pilot: &str, conn: ConnId) -> MediaSession {
        MediaSession {
            id: id.to_owned(),
            device: device.to_owned(),
            org: org.to_owned(),
            pilot: pilot.to_owned(),
            conn,
            mode: Mode::P2p,
            auto: false,
            connected: false,
            attempt: 0,
        }
    }

    /// The SFU's key for this session's device.
    pub fn key(&self) -> DeviceKey {
        DeviceKey::new(&self.org, &self.device)
    }
}

/// Why a pilot's message does not fit a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionRefusal {
    /// The sessionID belongs to another pilot connection or device.
    #[error("sessionID {0:?} is in use by another session; choose a new one")]
    InUse(String),
    /// Only an `offer` opens a session.
    #[error("no session {0:?}: open one with an offer first")]
    Unknown(String),
}

/// Open sessions, by id.
#[derive(Debug, Default)]
pub struct MediaSessions {
    sessions: Mutex<HashMap<String, MediaSession>>,
}

impl MediaSessions {
    /// A pilot's message for session `s.id` on `s.device`: an `offer` opens the session (or
    /// renegotiates an open one); anything else needs the session open on the same connection.
    /// Returns the session as it is now, and whether this message opened it.
    pub fn from_pilot(&self, s: MediaSession, opens: bool) -> Result<(MediaSession, bool), SessionRefusal> {
        let mut map = self.sessions.lock();
        match map.get(&s.id) {
            Some(open) if open.conn == s.conn && open.device == s.device => Ok((open.clone(), false)),
            Some(_) => Err(SessionRefusal::InUse(s.id)),
            None if opens => {
                map.insert(s.id.clone(), s.clone());
                Ok((s, true))
            }
            None => Err(SessionRefusal::Unknown(s.id)),
        }
    }

    /// The session `id`, if open.
    pub fn get(&self, id: &str) -> Option<MediaSession> {
        self.sessions.lock().get(id).cloned()
    }

    /// Changes an open session; returns it as changed.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut MediaSession)) -> Option<MediaSession> {
        let mut map = self.sessions.lock();
        let s = map.get_mut(id)?;
        f(s);
        Some(s.clone())
    }

    /// Open sessions watching `device` of `org`, `except` one.
    pub fn count_device(&self, org: &str, device: &str, except: &str) -> usize {
        self.sessions.lock().values().filter(|s| s.org == org && s.device == device && s.id != except).count()
    }

    /// The session a device's message belongs to, if it is the device's.
    pub fn for_device(&self, id: &str, device: &str) -> Option<MediaSession> {
        self.sessions.lock().get(id).filter(|s| s.device == device).cloned()
    }

    /// Ends a session.
    pub fn end(&self, id: &str) -> Option<MediaSession> {
        self.sessions.lock().remove(id)
    }

    /// Ends every session of a pilot connection that closed.
    pub fn conn_closed(&self, conn: ConnId) -> Vec<MediaSession> {
        self.take(|s| s.conn == conn)
    }

    /// Ends every session of a device that went offline.
    pub fn device_gone(&self, device: &str) -> Vec<MediaSession> {
        self.take(|s| s.device == device)
    }

    /// How many sessions are open.
    pub fn len(&self) -> usize {
        self.sessions.lock().len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take(&self, pred: impl Fn(&MediaSession) -> bool) -> Vec<MediaSession> {
        let mut map = self.sessions.lock();
        let ids: Vec<String> = map.values().filter(|s| pred(s)).map(|s| s.id.clone()).collect();
        ids.into_iter().filter_map(|id| map.remove(&id)).collect()
    }
}

/// The `bye` payload the relay sends when it ends a session.
pub fn bye_payload(session: &str, reason: &str) -> String {
    json!({"subtype": "bye", "sessionID": session, "reason": reason}).to_string()
}

/// Sends a `webrtc` payload to a session's pilot connection, `from` the device.
pub fn to_pilot(relay: &Relay, s: &MediaSession, payload: &Value) -> bool {
    let text = message::encode_routed("webrtc", None, Some(&s.pilot), &s.device, raw(&payload.to_string()));
    relay.hub.send_to_conn(s.conn, Utf8Bytes::from(text))
}

/// Sends a `webrtc` payload to a device, `from` someone.
pub fn to_device(relay: &Relay, org: &str, device: &str, from: &str, payload: &Value) {
    let text = message::encode_routed("webrtc", None, Some(device), from, raw(&payload.to_string()));
    let _ = relay.hub.send_to(org, device, Utf8Bytes::from(text));
}

fn raw(json: &str) -> Option<&serde_json::value::RawValue> {
    serde_json::from_str(json).ok()
}

/// The `mode` message telling a pilot who carries its session and why.
pub fn mode_payload(s: &MediaSession, reason: &str, deadline_s: f64) -> Value {
    let message = match reason {
        "requested" => format!("{} as requested", describe(s.mode)),
        "default" => format!("{} (the relay's default mode)", describe(s.mode)),
        "auto_p2p_first" => format!(
            "trying peer to peer first; the relay carries the video if no direct path connects within {deadline_s} s"
        ),
        "viewers" => "several pilots watch this device, so the relay carries the video once for all of them".to_owned(),
        "p2p_timeout" => {
            format!("no direct path connected within {deadline_s} s; the relay carries the video now: send a new offer")
        }
        "p2p_failed" => "the direct connection failed; the relay carries the video now: send a new offer".to_owned(),
        "sfu_disabled" => "this relay has no SFU: peer to peer only".to_owned(),
        other => other.to_owned(),
    };
    json!({"subtype": "mode", "sessionID": s.id, "mode": s.mode.as_str(), "auto": s.auto, "reason": reason, "message": message})
}

fn describe(mode: Mode) -> &'static str {
    match mode {
        Mode::P2p => "peer to peer",
        Mode::Sfu => "through the relay's SFU",
    }
}

/// Moves an `auto` session that is still peer to peer to the SFU: the device's attempt ends
/// (`bye` `moved_to_sfu`) and the pilot is told to offer again (`mode` `sfu`). With `attempt`
/// (the deadline's check) nothing happens if that attempt connected or was replaced.
pub fn fallback(relay: &Arc<Relay>, id: &str, attempt: Option<u64>, reason: &str) {
    let mut moved = false;
    let s = relay.media.update(id, |s| {
        if s.mode != Mode::P2p || !s.auto {
            return;
        }
        if let Some(a) = attempt
            && (s.attempt != a || s.connected)
        {
            return;
        }
        s.mode = Mode::Sfu;
        s.connected = false;
        moved = true;
    });
    let Some(s) = s.filter(|_| moved) else { return };
    tracing::info!(session = %s.id, device = %s.device, pilot = %s.pilot, %reason, "video session moves to the SFU");
    let bye = json!({"subtype": "bye", "sessionID": s.id, "reason": "moved_to_sfu"});
    to_device(relay, &s.org, &s.device, &s.pilot, &bye);
    to_pilot(relay, &s, &mode_payload(&s, reason, relay.config.media.p2p_timeout));
}

/// The SFU's lines of `/metrics` (Prometheus text format).
pub fn sfu_metrics(s: &::media::sfu::SfuStats) -> String {
    format!(
        "# HELP tether_sfu_publications Devices publishing into the SFU.\n# TYPE tether_sfu_publications gauge\n\
         tether_sfu_publications {}\n\
         # HELP tether_sfu_viewers Viewers served by the SFU.\n# TYPE tether_sfu_viewers gauge\n\
         tether_sfu_viewers {}\n\
         # HELP tether_sfu_packets_in_total RTP packets received from devices.\n# TYPE tether_sfu_packets_in_total counter\n\
         tether_sfu_packets_in_total {}\n\
         # HELP tether_sfu_packets_out_total RTP packets forwarded to viewers.\n# TYPE tether_sfu_packets_out_total counter\n\
         tether_sfu_packets_out_total {}\n\
         # HELP tether_sfu_packets_dropped_total Packets a viewer lost because it fell behind.\n# TYPE tether_sfu_packets_dropped_total counter\n\
         tether_sfu_packets_dropped_total {}\n\
         # HELP tether_sfu_keyframe_requests_total Keyframe requests sent to devices.\n# TYPE tether_sfu_keyframe_requests_total counter\n\
         tether_sfu_keyframe_requests_total {}\n",
        s.publications, s.viewers, s.packets_in, s.packets_out, s.packets_dropped, s.keyframe_requests
    )
}

/// Delivers what the SFU has to say: upstream signaling to devices (`from` `relay`), candidates
/// to viewers' pilot connections, and the end of viewers whose publisher went away.
pub async fn route_sfu(relay: Arc<Relay>, mut rx: mpsc::UnboundedReceiver<SfuOut>) {
    while let Some(out) = rx.recv().await {
        match out {
            SfuOut::ToDevice { key, payload } => to_device(&relay, &key.org, &key.device, "relay", &payload),
            SfuOut::ToViewer { viewer, payload, .. } => {
                if let Some(s) = relay.media.get(&viewer).filter(|s| s.mode == Mode::Sfu) {
                    to_pilot(&relay, &s, &payload);
                } else if !relay.whep.lock().contains_key(&viewer)
                    && let Some(sfu) = relay.sfu.clone()
                {
                    // The pilot left while its viewer was being set up: nobody will ever
                    // connect to it.
                    tracing::debug!(%viewer, "SFU viewer without a session; removing it");
                    tokio::spawn(async move { sfu.unsubscribe(&viewer).await });
                }
            }
            SfuOut::ViewerEnded { viewer, reason, message, .. } => {
                relay.whep.lock().remove(&viewer);
                if let Some(s) = relay.media.end(&viewer) {
                    let bye = json!({"subtype": "bye", "sessionID": s.id, "reason": reason, "message": message});
                    to_pilot(&relay, &s, &bye);
                }
            }
            other => tracing::debug!("SFU output not routed: {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: &str, conn: u64) -> MediaSession {
        MediaSession::new(id, "boat", "o", "p", conn)
    }

    #[test]
    fn offers_open_sessions_that_only_their_pilot_can_use() {
        let m = MediaSessions::default();
        assert_eq!(m.from_pilot(s("a", 1), false), Err(SessionRefusal::Unknown("a".into())));
        m.from_pilot(s("a", 1), true).unwrap();
        m.from_pilot(s("a", 1), false).unwrap();
        assert_eq!(m.from_pilot(s("a", 2), true), Err(SessionRefusal::InUse("a".into())));
        assert!(m.for_device("a", "boat").is_some());
        assert!(m.for_device("a", "other").is_none());
        m.from_pilot(s("b", 1), true).unwrap();
        m.from_pilot(s("c", 2), true).unwrap();
        assert_eq!(m.conn_closed(1).len(), 2);
        assert_eq!(m.device_gone("boat").len(), 1);
        assert!(m.is_empty());
    }
}
