//! The Boat dialect: the autonomous-boat relay's `/ws/device/<device_id>` and
//! `/ws/client/<client_id>` (seed 004, docs/protocol.md "Boat dialect").
//!
//! Boat messages are flat: the native envelope's fields (`type`, `correlationID`, `from`) and the
//! payload's fields side by side in one object, with the boat named `boatId`. On the way in a
//! flat message becomes the native envelope (`payload` = every field but the envelope's), with
//! these renamings: a client's `command` is an `app_command` to `boatId`; a client's `boatId`
//! is the native `clientID`; `webrtc` without `sessionID` gets the implicit session of its
//! (boat, client connection) pair. On the way out every native message is flattened the same
//! way, `app_command` shown as `command`, with `boatId` naming the boat.
//!
//! Decisions (documented in docs/protocol.md):
//! - credentials at the upgrade: the device's clientSecret (`Authorization: Bearer`), a client's
//!   operator API key (`Authorization: Bearer`) or a ticket (`?ticket=`);
//! - a client subscribes implicitly to the boats in `?boatId=a,b`, else to the boat its path
//!   names (if it is one), else to every boat of its organisation it may view, and to every
//!   boat a later message names;
//! - a client's `command` acquires (or renews) the control lease first, so a seed client never
//!   heartbeats; a lease held by another connection refuses it with `not_controller`;
//! - the relay's `time_sync` reaches the boat flat (`{"type":"time_sync","t1":..}`); a boat
//!   answering `{"type":"time_sync_response","t1","t2","t3"}` gets frame ages; one that does not
//!   gets none (absent, never guessed from `system_time`, which bounds the offset one way only);
//! - a boat's own `offer` (the seed's flow) opens one session with each connection subscribed
//!   to the boat; the boat's later candidates go to every session it is in.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use signaling::ErrorCode;
use signaling::message;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use warp::Filter;

use super::{BoxFuture, Codec, Inbound};
use crate::Relay;
use crate::auth::{self, Identity};
use crate::conn::Endpoint;
use crate::media::MediaSession;
use crate::store::q;

/// Correlation ids of the adapter's own housekeeping (implicit subscribe, lease): their answers
/// are not shown to the peer (the message that caused them gets the same verdict itself).
const INTERNAL: &str = "boat~";
/// Most boats a client that names none is subscribed to.
const MAX_DEFAULT_BOATS: usize = 64;

/// Which end of the boat relay a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `/ws/device/<device_id>`: the boat.
    Device,
    /// `/ws/client/<client_id>`: a control client.
    Client,
}

/// One Boat-dialect connection's codec.
#[derive(Debug)]
pub struct Boat {
    relay: Arc<Relay>,
    side: Side,
    /// The id in the path: the boat's device id, or the client's label.
    path_id: String,
    bearer: Option<String>,
    ticket: Mutex<Option<String>>,
    /// `?boatId=` of a client.
    boats: Vec<String>,
    /// Unique per connection: names its implicit sessions.
    token: String,
    seq: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    me: Option<Identity>,
    /// Client: boats subscribed to.
    subscribed: HashSet<String>,
    /// Client: the session each boat's signaling is in.
    sessions: HashMap<String, String>,
    /// Device: the sessions its signaling without `sessionID` goes to.
    device_sessions: Vec<String>,
    /// Client without `?boatId=`: the boats found at authentication.
    default_boats: Vec<String>,
}

impl Boat {
    /// A codec for a connection on `side` with the path's id and the upgrade's credentials.
    pub fn new(
        relay: Arc<Relay>,
        side: Side,
        path_id: String,
        bearer: Option<String>,
        ticket: Option<String>,
        boats: Option<String>,
    ) -> Boat {
        let boats = boats
            .map(|b| b.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default();
        Boat {
            relay,
            side,
            path_id,
            bearer,
            ticket: Mutex::new(ticket),
            boats,
            token: auth::random_hex(6),
            seq: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        }
    }

    fn internal(&self, what: &str) -> String {
        format!("{INTERNAL}{what}-{}", self.seq.fetch_add(1, Ordering::Relaxed))
    }

    fn subscribe_text(&self, boat: &str) -> String {
        json!({"type":"subscribe","correlationID":self.internal("sub"),"payload":{"deviceID":boat,"replay":false}})
            .to_string()
    }

    /// A client's implicit subscription to `boat`, the first time it names it.
    fn implicit_subscribe(&self, boat: &str, out: &mut Vec<String>) {
        if self.state.lock().subscribed.insert(boat.to_owned()) {
            out.push(self.subscribe_text(boat));
        }
    }

    fn implicit_session(&self, boat: &str) -> String {
        format!("boat-{}-{boat}", self.token)
    }

    async fn verify(&self, relay: &Relay) -> Result<Identity, (ErrorCode, String)> {
        match self.side {
            Side::Device => {
                let Some(secret) = &self.bearer else {
                    return Err((
                        ErrorCode::AuthFailed,
                        "send the boat's clientSecret as Authorization: Bearer".into(),
                    ));
                };
                match auth::verify_device(&relay.store, &relay.hasher, &self.path_id, secret).await {
                    Ok(who) => Ok(who),
                    Err(auth::AuthError::Invalid) => {
                        Err((ErrorCode::AuthFailed, "invalid device id or clientSecret".into()))
                    }
                    Err(e) => {
                        tracing::error!("device authentication could not be checked: {e}");
                        Err((ErrorCode::AuthFailed, "invalid device id or clientSecret".into()))
                    }
                }
            }
            Side::Client => {
                let ticket = self.ticket.lock().take();
                let who = if let Some(key) = &self.bearer {
                    match auth::verify_api_key(&relay.store, &relay.hasher, key).await {
                        Ok(who) => who,
                        Err(_) => {
                            return Err((ErrorCode::AuthFailed, "the API key is invalid, revoked or expired".into()));
                        }
                    }
                } else if let Some(ticket) = ticket {
                    relay.tickets.redeem(&ticket, Instant::now()).ok_or_else(|| {
                        (
                            ErrorCode::InvalidTicket,
                            "the ticket is unknown, already used or expired; request a new one".into(),
                        )
                    })?
                } else {
                    return Err((
                        ErrorCode::InvalidTicket,
                        "send an operator API key as Authorization: Bearer, or a ticket from POST /api/auth/ws-ticket as ?ticket="
                            .into(),
                    ));
                };
                if self.boats.is_empty() {
                    let boats = self.default_boats(relay, &who).await;
                    self.state.lock().default_boats = boats;
                }
                Ok(who)
            }
        }
    }

    /// The boats a client that names none in `?boatId=` watches: the one its path names, if it
    /// is a boat of its organisation; otherwise every boat of the organisation it may view (the
    /// seed's relay serves one boat to every client), at most [`MAX_DEFAULT_BOATS`].
    async fn default_boats(&self, relay: &Relay, who: &Identity) -> Vec<String> {
        let (org, path) = (who.org.clone(), self.path_id.clone());
        let found = relay
            .store
            .call(move |c| {
                if let Some((d, _)) = q::device_credentials(c, &path)?
                    && d.org_id == org
                {
                    return Ok(vec![d.id]);
                }
                Ok(q::list_devices(c, &org)?.into_iter().map(|d| d.id).collect::<Vec<_>>())
            })
            .await;
        let ids = match found {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!("could not list the boats of a Boat-dialect client: {e}");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for id in ids {
            if out.len() >= MAX_DEFAULT_BOATS {
                break;
            }
            if matches!(relay.access.level(&relay.store, who, &id).await, Ok(Some(_))) {
                out.push(id);
            }
        }
        out
    }

    /// A boat's own offer (the seed's flow): one session with each connection subscribed to it.
    fn device_offer(&self, payload: Map<String, Value>, corr: Option<String>) -> Inbound {
        let Some(me) = self.state.lock().me.clone() else {
            return Inbound::Native(Vec::new());
        };
        let relay = &self.relay;
        let mut sessions = Vec::new();
        for conn in relay.hub.subscribers_of(&me.id) {
            if conn.identity.org != me.org {
                continue;
            }
            let id = format!("boat-{}-{}", me.id, conn.id);
            let fresh = MediaSession::new(&id, &me.id, &me.org, &conn.identity.id, conn.id);
            if relay.media.from_pilot(fresh, true).is_err() {
                continue;
            }
            let mut p = payload.clone();
            p.insert("sessionID".into(), Value::String(id.clone()));
            let p = Value::Object(p).to_string();
            let raw = serde_json::from_str::<&serde_json::value::RawValue>(&p).ok();
            let text = message::encode_routed("webrtc", corr.as_deref(), Some(&conn.identity.id), &me.id, raw);
            if relay.hub.send_to_conn(conn.id, Utf8Bytes::from(text)) {
                sessions.push(id);
            } else {
                relay.media.end(&id);
            }
        }
        if sessions.is_empty() {
            return Inbound::Refuse(
                ErrorCode::TargetOffline,
                format!("no client is watching {}: the offer was not delivered", me.id),
                corr,
            );
        }
        relay.metrics.count_out(crate::metrics::type_index("webrtc"), sessions.len() as u64);
        self.state.lock().device_sessions = sessions;
        Inbound::Native(Vec::new())
    }
}

fn native(ty: &str, corr: Option<Value>, client_id: Option<Value>, payload: Map<String, Value>) -> String {
    let mut m = Map::new();
    m.insert("type".into(), Value::String(ty.to_owned()));
    if let Some(c) = corr {
        m.insert("correlationID".into(), c);
    }
    if let Some(c) = client_id {
        m.insert("clientID".into(), c);
    }
    m.insert("payload".into(), Value::Object(payload));
    Value::Object(m).to_string()
}

impl Codec for Boat {
    fn authenticate<'a>(
        &'a self,
        relay: &'a Relay,
        _first: &'a str,
    ) -> BoxFuture<'a, Result<Identity, (ErrorCode, String)>> {
        Box::pin(self.verify(relay))
    }

    fn authenticate_upgrade<'a>(
        &'a self,
        relay: &'a Relay,
    ) -> Option<BoxFuture<'a, Result<Identity, (ErrorCode, String)>>> {
        Some(Box::pin(self.verify(relay)))
    }

    fn after_auth(&self, who: &Identity) -> Vec<String> {
        self.state.lock().me = Some(who.clone());
        if self.side == Side::Device {
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.boats.is_empty() {
            let boats = std::mem::take(&mut self.state.lock().default_boats);
            for b in boats {
                self.state.lock().subscribed.insert(b.clone());
                out.push(self.subscribe_text(&b));
            }
        } else {
            for b in &self.boats {
                self.state.lock().subscribed.insert(b.clone());
                // Named explicitly: refusals are shown (no internal correlation id).
                out.push(json!({"type":"subscribe","payload":{"deviceID":b,"replay":false}}).to_string());
            }
        }
        out
    }

    fn inbound(&self, text: &str) -> Inbound {
        // Anything that is not a JSON object with a string `type` gets the native verdict
        // (malformed_json, unknown_type), rendered flat.
        let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(text) else {
            return Inbound::Native(vec![text.to_owned()]);
        };
        let Some(ty) = m.remove("type").and_then(|t| t.as_str().map(str::to_owned)) else {
            return Inbound::Native(vec![text.to_owned()]);
        };
        let corr = m.remove("correlationID");
        let corr_s = corr.as_ref().and_then(Value::as_str).map(str::to_owned);
        if corr_s.as_deref().is_some_and(|c| c.starts_with(INTERNAL)) {
            return Inbound::Refuse(
                ErrorCode::InvalidPayload,
                format!("correlationIDs starting with {INTERNAL:?} are reserved by the relay"),
                corr_s,
            );
        }
        let client_id = m.remove("clientID");
        // A peer never chooses its own `from`.
        m.remove("from");
        match self.side {
            Side::Device => {
                if ty == "webrtc" && !m.contains_key("sessionID") {
                    m.remove("boatId");
                    if m.get("subtype").and_then(Value::as_str) == Some("offer") {
                        return self.device_offer(m, corr_s);
                    }
                    let sessions = self.state.lock().device_sessions.clone();
                    if sessions.is_empty() {
                        return Inbound::Refuse(
                            ErrorCode::InvalidPayload,
                            "no open video session: send an offer first, or answer a client's offer".into(),
                            corr_s,
                        );
                    }
                    return Inbound::Native(
                        sessions
                            .into_iter()
                            .map(|s| {
                                let mut p = m.clone();
                                p.insert("sessionID".into(), Value::String(s));
                                native("webrtc", corr.clone(), None, p)
                            })
                            .collect(),
                    );
                }
                Inbound::Native(vec![native(&ty, corr, client_id, m)])
            }
            Side::Client => {
                let boat = m.remove("boatId").or(client_id);
                let boat_s = boat.as_ref().and_then(Value::as_str).map(str::to_owned);
                let mut out = Vec::new();
                if let Some(b) = &boat_s
                    && (ty == "command" || ty == "webrtc")
                {
                    self.implicit_subscribe(b, &mut out);
                }
                match ty.as_str() {
                    "command" => {
                        let Some(b) = boat_s else {
                            return Inbound::Refuse(
                                ErrorCode::InvalidPayload,
                                "command needs boatId: the boat it is for".into(),
                                corr_s,
                            );
                        };
                        if !m.get("command").is_some_and(Value::is_string) {
                            return Inbound::Refuse(
                                ErrorCode::InvalidPayload,
                                "command needs \"command\": its name, e.g. set_waypoints".into(),
                                corr_s,
                            );
                        }
                        out.push(
                            json!({"type":"lease_acquire","correlationID":self.internal("lease"),"payload":{"deviceID":b}})
                                .to_string(),
                        );
                        out.push(native("app_command", corr, boat, m));
                    }
                    "webrtc" => {
                        if let Some(b) = &boat_s
                            && !m.contains_key("sessionID")
                        {
                            let offer = m.get("subtype").and_then(Value::as_str) == Some("offer");
                            let id = {
                                let mut st = self.state.lock();
                                let id = match st.sessions.get(b) {
                                    Some(id) if !offer => id.clone(),
                                    _ => self.implicit_session(b),
                                };
                                st.sessions.insert(b.clone(), id.clone());
                                id
                            };
                            m.insert("sessionID".into(), Value::String(id));
                        }
                        out.push(native("webrtc", corr, boat, m));
                    }
                    _ => out.push(native(&ty, corr, boat, m)),
                }
                Inbound::Native(out)
            }
        }
    }

    fn outbound(&self, native: &str) -> Option<String> {
        let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(native) else {
            return Some(native.to_owned());
        };
        let corr = m.remove("correlationID");
        if corr.as_ref().and_then(Value::as_str).is_some_and(|c| c.starts_with(INTERNAL)) {
            return None;
        }
        let ty = m.remove("type").and_then(|t| t.as_str().map(str::to_owned)).unwrap_or_default();
        let from = m.remove("from");
        m.remove("clientID");
        let queued = m.remove("_offline_queued");
        let payload = match m.remove("payload") {
            Some(Value::Object(p)) => p,
            _ => Map::new(),
        };
        let session = payload.get("sessionID").and_then(Value::as_str).map(str::to_owned);
        let subtype = payload.get("subtype").and_then(Value::as_str).unwrap_or_default().to_owned();
        let mut out = Map::new();
        let shown_type = if ty == "app_command" { "command".to_owned() } else { ty.clone() };
        out.insert("type".into(), Value::String(shown_type));
        if let Some(c) = corr {
            out.insert("correlationID".into(), c);
        }
        let boat = match self.side {
            Side::Device => Some(Value::String(self.path_id.clone())),
            Side::Client => from.clone().filter(|f| f.as_str() != Some("relay")),
        };
        if let Some(f) = from {
            out.insert("from".into(), f);
        }
        if let Some(b) = boat.filter(|_| ty != "auth_ok" && ty != "error") {
            out.insert("boatId".into(), b);
        }
        if let Some(q) = queued {
            out.insert("_offline_queued".into(), q);
        }
        for (k, v) in payload {
            out.entry(k).or_insert(v);
        }
        if ty == "webrtc"
            && let Some(id) = session
        {
            let mut st = self.state.lock();
            match self.side {
                Side::Device if subtype == "bye" => st.device_sessions.retain(|s| *s != id),
                Side::Device if subtype == "offer" => st.device_sessions = vec![id],
                Side::Device => {}
                Side::Client => {
                    if let Some(b) = out.get("boatId").and_then(Value::as_str) {
                        if subtype == "bye" {
                            st.sessions.remove(b);
                        } else {
                            st.sessions.insert(b.to_owned(), id);
                        }
                    }
                }
            }
        }
        Some(Value::Object(out).to_string())
    }
}

/// `Authorization: Bearer <value>` (scheme case-insensitive).
fn bearer(h: Option<String>) -> Option<String> {
    let h = h?;
    let (scheme, value) = h.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| value.trim().to_owned()).filter(|v| !v.is_empty())
}

/// The two routes, `GET /ws/device/<device_id>` and `GET /ws/client/<client_id>`.
pub fn routes(relay: Arc<Relay>) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    let side = warp::path!("ws" / "device" / String)
        .map(|id: String| (Side::Device, id))
        .or(warp::path!("ws" / "client" / String).map(|id: String| (Side::Client, id)))
        .unify();
    side.and(crate::ws::upgrade())
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::header::optional::<String>("authorization"))
        .and(crate::routes::peer())
        .and(warp::any().map(move || relay.clone()))
        .map(
            |(side, id): (Side, String),
             up,
             q: HashMap<String, String>,
             auth: Option<String>,
             peer: Option<SocketAddr>,
             relay: Arc<Relay>| {
                let codec = Arc::new(Boat::new(
                    relay.clone(),
                    side,
                    id,
                    bearer(auth),
                    q.get("ticket").cloned(),
                    q.get("boatId").cloned(),
                ));
                crate::routes::upgrade_into(up, relay, Endpoint::Dialect(codec), peer)
            },
        )
}
