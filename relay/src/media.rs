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

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::hub::ConnId;

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
    /// A pilot's message for session `id` on `device`: an `offer` opens the session (or
    /// renegotiates an open one); anything else needs the session open on the same connection.
    pub fn from_pilot(&self, s: MediaSession, opens: bool) -> Result<(), SessionRefusal> {
        let mut map = self.sessions.lock();
        match map.get(&s.id) {
            Some(open) if open.conn == s.conn && open.device == s.device => Ok(()),
            Some(_) => Err(SessionRefusal::InUse(s.id)),
            None if opens => {
                map.insert(s.id.clone(), s);
                Ok(())
            }
            None => Err(SessionRefusal::Unknown(s.id)),
        }
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
    serde_json::json!({"subtype": "bye", "sessionID": session, "reason": reason}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: &str, conn: u64) -> MediaSession {
        MediaSession { id: id.into(), device: "boat".into(), org: "o".into(), pilot: "p".into(), conn }
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
