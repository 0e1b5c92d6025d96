//! One WebSocket connection, from upgrade to close.
//!
//! A connection is two tasks: this module's read loop, which authenticates, decodes, checks and
//! routes what the peer sends; and a writer task, the only thing that writes to the socket,
//! which drains the connection's [`Outbox`], sends pings and finally the close frame. The read
//! loop never waits on another connection: everything it produces for others is a non-blocking
//! push into their outboxes.
//!
//! Every message an operator sends about a device passes [`Session::authorize`]: the device
//! must be in the operator's org and the operator must hold the level that
//! [`crate::access::required_level`] names for the message type.
//!
//! Close codes: 1000 normal (also after `registration_pending`), 1001 relay shutting down or
//! idle timeout, 1002 WebSocket protocol error, 1003 binary before auth, 1007 text frame not
//! UTF-8, 1008 policy (authentication failed, message before auth, slow consumer, revoked),
//! 1009 message too big, 1013 too many connection attempts (try again later), 4409 replaced by
//! a newer connection of the same device.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use signaling::message::{
    self, Ack, AuthOk, Body, Frame, Pong, RegistrationPending, TelemetryAnnotation, TelemetryDropped, TelemetryHeader,
    TimeSync, Unsubscribed, WebRtc,
};
use signaling::{Envelope, ErrorCode};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};

use crate::Relay;
use crate::access::{Level, required_level};
use crate::auth::{self, Identity, Role};
use crate::fleet::{BatterySampler, DeviceLink};
use crate::hub::{Conn, Delivery, PendingRequest};
use crate::leases::LeaseRefusal;
use crate::limits::{ConnLimiter, Overrides};
use crate::media::{self, MediaSession, Requested};
use crate::metrics::type_index;
use crate::ops;
use crate::outbox::{Next, Outbox};
use crate::store::now_ms;
use crate::store::q::{self, EnqueueOutcome};
use crate::ws::Socket;

/// A boxed message handler (see [`Session::on_text`]).
type BoxFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// Which endpoint the socket came in on, with the credentials offered in the HTTP request.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// `/ws[?clientID=]`: devices (authentication or registration).
    Device {
        /// `clientID` query parameter.
        client_id: Option<String>,
        /// `Authorization: Bearer` header value.
        bearer: Option<String>,
    },
    /// `/ws/admin?ticket=`: operators.
    Operator {
        /// `ticket` query parameter.
        ticket: Option<String>,
    },
    /// A seed dialect's path (relay/src/dialect): its codec authenticates the first message and
    /// translates every frame to and from the native messages.
    Dialect(Arc<dyn crate::dialect::Codec>),
}

/// Clock-sync exchanges sent quickly after a device connects, before settling to the ping
/// interval, so frame ages are available within a second or two.
const QUICK_SYNCS: u32 = 4;
const QUICK_SYNC_GAP: Duration = Duration::from_millis(250);
/// How long the writer gets to flush the close frame after the read loop ends.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Most messages written before one flush.
const WRITE_BATCH: usize = 64;
/// Extra time a device gets beyond a command's own `timeoutMs` to report its result.
const RESULT_GRACE: Duration = Duration::from_secs(5);
/// Message types that may wait in the offline queue for a device. Signaling (`webrtc`) is
/// not queued: an offer is worthless minutes later. Neither are `docker_command` and
/// `process_command`: starting or stopping a container or a process is a decision about the
/// robot's state now, not whenever it returns. Nor `get_client_config`: the console asks for
/// the configuration to edit it now, and a copy delivered hours later would be stale.
const QUEUEABLE: &[&str] = &["execute_command", "update_client_config", "reload_config", "speed_test", "app_command"];
/// Message types that are requests with a result (and so a deadline).
pub(crate) const WITH_RESULT: &[&str] = &[
    "execute_command",
    "docker_command",
    "process_command",
    "update_client_config",
    "reload_config",
    "get_client_config",
    "speed_test",
    "app_command",
];
/// Whether a request says `"queue": false` in its payload: for an offline device it wants
/// `target_offline` now rather than a delivery later (teleop, which would be dangerous late).
fn refuses_queue(payload: Option<&RawValue>) -> bool {
    #[derive(serde::Deserialize)]
    struct Queue {
        #[serde(default)]
        queue: Option<bool>,
    }
    payload.and_then(|p| serde_json::from_str::<Queue>(p.get()).ok()).is_some_and(|q| q.queue == Some(false))
}

/// Replies that end a request: they stop its deadline and clear a queued copy. Other replies
/// (`command_progress`, `webrtc`) are routed the same way but leave the request open.
const FINAL_REPLIES: &[&str] = &["command_output", "command_result", "speed_test_result"];

/// A session id as the relay accepts it: 1 to 128 characters.
fn valid_session(id: Option<String>) -> Option<String> {
    id.filter(|s| !s.is_empty() && s.len() <= 128)
}

/// A payload the relay wrote itself, as raw JSON.
fn raw(json: &str) -> Option<&RawValue> {
    serde_json::from_str::<&RawValue>(json).ok()
}

fn error_text(relay: &Relay, code: ErrorCode, message: impl Into<String>, correlation_id: Option<String>) -> String {
    relay.metrics.count_error(code);
    relay.metrics.count_out(type_index("error"), 1);
    Envelope::error(code, message, correlation_id).to_json()
}

fn rate_limited_text(
    relay: &Relay,
    message: impl Into<String>,
    retry_after: Duration,
    correlation_id: Option<String>,
) -> String {
    relay.metrics.count_error(ErrorCode::RateLimited);
    relay.metrics.count_out(type_index("error"), 1);
    let mut e = Envelope::error(ErrorCode::RateLimited, message, correlation_id);
    if let Body::Error(p) = &mut e.body {
        p.retry_after_ms = Some(retry_after.as_millis().max(1) as u64);
    }
    e.to_json()
}

/// Runs a connection to completion.
pub async fn serve(relay: Arc<Relay>, socket: Socket, endpoint: Endpoint, peer: Option<SocketAddr>) {
    relay.metrics.connections_opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (sink, mut stream) = socket.split();
    let outbox = Arc::new(Outbox::new(relay.config.control_queue, relay.config.telemetry_queue));
    let codec = match &endpoint {
        Endpoint::Dialect(c) => Some(c.clone()),
        _ => None,
    };
    let writer = relay.tasks.spawn(write_loop(relay.clone(), sink, outbox.clone(), codec.clone()));
    let peer_ip = peer.map(|p| p.ip().to_string());

    let admitted = tokio::select! {
        // Boxed, like every large future a connection awaits once or now and then: a spawned
        // task is allocated at the size of its largest state, and an idle connection should
        // only pay for waiting (`Session::run`'s loop), not for authentication or message
        // handling it is not doing (about 4 KiB per connection otherwise).
        r = Box::pin(authenticate(&relay, &mut stream, &outbox, endpoint, peer_ip.as_deref())) => r,
        _ = relay.shutdown.cancelled() => {
            outbox.close(1001, "relay shutting down");
            None
        }
    };
    if let Some((identity, overrides)) = admitted {
        tracing::info!(id = %identity.id, role = identity.role.as_str(), org = %identity.org, ?peer, "connected");
        let conn = Arc::new(Conn { id: relay.next_conn_id(), identity, outbox: outbox.clone(), peer_ip });
        let mut session = Session::new(relay.clone(), conn.clone(), relay.limits.for_connection(&overrides));
        session.codec = codec;
        session.run(&mut stream).await;
        session.finish();
        tracing::info!(id = %conn.identity.id, ?peer, reason = %session.end_reason, "disconnected");
    }
    outbox.close(1000, "");
    // Closing handshake: keep reading (and discarding) until the peer answers our close or the
    // grace period ends. Dropping a socket with unread data makes the kernel send a reset,
    // which can destroy the close frame (and the error before it) in the peer's buffer.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(m)) = stream.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
    if tokio::time::timeout(CLOSE_GRACE, outbox.done()).await.is_err() {
        writer.abort();
    }
}

/// Authenticates the connection (or handles a registration); on failure queues the error and
/// the close and returns `None`. On success returns the identity and its limit overrides.
async fn authenticate(
    relay: &Relay,
    stream: &mut futures_util::stream::SplitStream<Socket>,
    outbox: &Outbox,
    endpoint: Endpoint,
    ip: Option<&str>,
) -> Option<(Identity, Overrides)> {
    let ip_key = ip.unwrap_or("unknown");
    // Queue the error, then close with `close`: the one way this function turns a peer away.
    let close_with = |code: ErrorCode, msg: &str, corr: Option<String>, close: u16| {
        let _ = outbox.push_control(error_text(relay, code, msg, corr));
        outbox.close(close, code.as_str());
        None
    };
    let refuse = |code: ErrorCode, msg: &str, corr: Option<String>| close_with(code, msg, corr, 1008);
    let fail = |code: ErrorCode, msg: &str, corr: Option<String>| {
        relay.metrics.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        relay.limits.auth_failed(ip_key);
        refuse(code, msg, corr)
    };
    if let Some(wait) = relay.limits.ip_blocked_for(ip_key) {
        let msg = format!(
            "too many failed authentications from this address; try again in {:.0} s",
            wait.as_secs_f64().ceil()
        );
        let _ = outbox.push_control(rate_limited_text(relay, msg, wait, None));
        outbox.close(1008, "rate_limited");
        return None;
    }
    if ip.is_some_and(|ip| relay.access.is_denied(&format!("ip:{ip}"), now_ms())) {
        return refuse(ErrorCode::Revoked, "this address is on the deny list", None);
    }
    let identity = match endpoint {
        // A dialect whose credentials came with the upgrade (headers, query): checked at once.
        Endpoint::Dialect(codec) if codec.authenticate_upgrade(relay).is_some() => {
            match codec.authenticate_upgrade(relay).expect("checked above").await {
                Ok(who) => who,
                Err((code, msg)) => return fail(code, &msg, None),
            }
        }
        Endpoint::Dialect(codec) => {
            let first = tokio::time::timeout(relay.config.auth_deadline(), stream.next()).await;
            let text = match first {
                Err(_) => return fail(ErrorCode::AuthTimeout, "no auth message arrived in time", None),
                Ok(Some(Ok(Message::Text(t)))) if t.len() <= relay.config.max_message_size => t,
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) => return None,
                Ok(Some(Err(e))) => {
                    return read_error(&e).and_then(|(code, msg, close)| close_with(code, &msg, None, close));
                }
                Ok(Some(Ok(_))) => {
                    return fail(ErrorCode::NotAuthenticated, "authenticate first with a JSON text message", None);
                }
            };
            relay.metrics.count_in(type_index("auth"), text.len());
            match codec.authenticate(relay, text.as_str()).await {
                Ok(who) => who,
                // Only a bad credential counts towards the address's authentication failures.
                Err((code @ (ErrorCode::Forbidden | ErrorCode::UnknownTarget | ErrorCode::Internal), msg)) => {
                    return refuse(code, &msg, None);
                }
                Err((code, msg)) => return fail(code, &msg, None),
            }
        }
        Endpoint::Operator { ticket } => {
            let Some(ticket) = ticket else {
                return fail(
                    ErrorCode::InvalidTicket,
                    "a ticket is required: POST /api/auth/ws-ticket, then connect to /ws/admin?ticket=<ticket>",
                    None,
                );
            };
            match relay.tickets.redeem(&ticket, Instant::now()) {
                Some(who) => who,
                None => {
                    return fail(
                        ErrorCode::InvalidTicket,
                        "the ticket is unknown, already used or expired; request a new one",
                        None,
                    );
                }
            }
        }
        Endpoint::Device { client_id, bearer: Some(secret) } => {
            let Some(id) = client_id else {
                return fail(
                    ErrorCode::AuthFailed,
                    "the clientID query parameter is required with a bearer secret",
                    None,
                );
            };
            match verify_device(relay, &id, &secret).await {
                Some(who) => who,
                None => return fail(ErrorCode::AuthFailed, "invalid clientID or clientSecret", None),
            }
        }
        Endpoint::Device { client_id, bearer: None } => {
            let first = tokio::time::timeout(relay.config.auth_deadline(), stream.next()).await;
            let text = match first {
                Err(_) => return fail(ErrorCode::AuthTimeout, "no auth message arrived in time", None),
                Ok(None) => return None,
                Ok(Some(Err(e))) => {
                    return read_error(&e).and_then(|(code, msg, close)| close_with(code, &msg, None, close));
                }
                Ok(Some(Ok(m))) if oversize(&m, relay.config.max_message_size).is_some() => {
                    return close_with(
                        ErrorCode::FrameTooLarge,
                        "the first message exceeds the size limit",
                        None,
                        1009,
                    );
                }
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(Message::Binary(_)))) => {
                    return close_with(
                        ErrorCode::BinaryNotSupported,
                        "messages are JSON text frames; authenticate first",
                        None,
                        1003,
                    );
                }
                Ok(Some(Ok(Message::Close(_)))) => return None,
                Ok(Some(Ok(_))) => {
                    return fail(ErrorCode::NotAuthenticated, "send {\"type\":\"auth\",...} first", None);
                }
            };
            relay.metrics.count_in(type_index("auth"), text.len());
            match message::decode(&text) {
                Ok(Envelope { body: Body::Auth(a), correlation_id, .. }) => {
                    let Some(id) = client_id else {
                        return fail(
                            ErrorCode::AuthFailed,
                            "connect to /ws?clientID=<your clientID> to authenticate",
                            correlation_id,
                        );
                    };
                    match verify_device(relay, &id, &a.client_secret).await {
                        Some(who) => who,
                        None => return fail(ErrorCode::AuthFailed, "invalid clientID or clientSecret", correlation_id),
                    }
                }
                Ok(Envelope { body: Body::Register(r), correlation_id, .. }) => {
                    match ops::register(relay, &r.handshake_key, &r.name, ip.map(str::to_owned)).await {
                        Ok(Some(reg)) => {
                            tracing::info!(request = %reg.id, name = %reg.name, "registration pending approval");
                            let mut e = Envelope::new(RegistrationPending { request_id: reg.id });
                            e.correlation_id = correlation_id;
                            let _ = outbox.push_control(e.to_json());
                            outbox.close(1000, "registration pending: poll /ws/status/<requestID>");
                            return None;
                        }
                        Ok(None) => {
                            return fail(
                                ErrorCode::InvalidHandshakeKey,
                                "the handshake key is unknown, expired or used up",
                                correlation_id,
                            );
                        }
                        Err(e) => return refuse(ErrorCode::Internal, &e.message, correlation_id),
                    }
                }
                Ok(env) => {
                    return fail(
                        ErrorCode::NotAuthenticated,
                        "authenticate first: send {\"type\":\"auth\",\"payload\":{\"clientSecret\":...}}",
                        env.correlation_id,
                    );
                }
                Err(e) => {
                    let corr = e.correlation_id.clone();
                    return fail(e.code(), &e.to_string(), corr);
                }
            }
        }
    };
    if relay.access.identity_denied(&identity, now_ms()) {
        return refuse(ErrorCode::Revoked, "this credential is on the deny list", None);
    }
    let id = identity.id.clone();
    let overrides = match relay.store.call(move |c| q::limits_of(c, &id)).await {
        Ok(text) => Overrides::from_stored(text.as_deref()),
        Err(e) => {
            tracing::error!("could not read limits: {e}");
            Overrides::default()
        }
    };
    if let Err(wait) = relay.limits.connect(&identity.id, &overrides) {
        let _ = outbox.push_control(rate_limited_text(
            relay,
            "too many connection attempts with this credential",
            wait,
            None,
        ));
        outbox.close(1013, "rate_limited");
        return None;
    }
    Some((identity, overrides))
}

/// The length of a data message over `limit`, if it is one.
fn oversize(m: &Message, limit: usize) -> Option<usize> {
    let len = match m {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        _ => return None,
    };
    (len > limit).then_some(len)
}

async fn verify_device(relay: &Relay, id: &str, secret: &str) -> Option<Identity> {
    match auth::verify_device(&relay.store, &relay.hasher, id, secret).await {
        Ok(who) => Some(who),
        Err(auth::AuthError::Invalid) => None,
        Err(e) => {
            tracing::error!("device authentication could not be checked: {e}");
            None
        }
    }
}
/// Maps a read error to what the peer should be told, if the socket is still writable.
fn read_error(e: &tungstenite::Error) -> Option<(ErrorCode, String, u16)> {
    match e {
        tungstenite::Error::Capacity(c) => Some((ErrorCode::FrameTooLarge, format!("message too large: {c}"), 1009)),
        tungstenite::Error::Utf8(_) => Some((ErrorCode::MalformedJson, "text frame is not valid UTF-8".into(), 1007)),
        tungstenite::Error::Protocol(p) => {
            Some((ErrorCode::MalformedJson, format!("WebSocket protocol error: {p}"), 1002))
        }
        _ => None,
    }
}

/// The authenticated part of a connection.
struct Session {
    relay: Arc<Relay>,
    conn: Arc<Conn>,
    last_rx: Instant,
    /// For devices: when to send the next clock-sync request, and how many went out.
    next_sync: Instant,
    syncs_sent: u32,
    /// `t1` values of outstanding clock-sync requests: a response must echo one of them.
    sync_pending: Vec<f64>,
    /// This connection's rate limits.
    limiter: ConnLimiter,
    end_reason: String,
    /// For devices: last message and clock-sync round trip, for `GET /api/devices`.
    link: Option<Arc<DeviceLink>>,
    /// For devices: when the next telemetry frame may be read for its battery.
    battery: BatterySampler,
    /// The dialect translating this connection's frames, if it came in on a dialect path.
    codec: Option<Arc<dyn crate::dialect::Codec>>,
}

impl Session {
    fn new(relay: Arc<Relay>, conn: Arc<Conn>, limiter: ConnLimiter) -> Self {
        Session {
            relay,
            conn,
            last_rx: Instant::now(),
            next_sync: Instant::now(),
            syncs_sent: 0,
            sync_pending: Vec::new(),
            limiter,
            end_reason: String::new(),
            link: None,
            battery: BatterySampler::new(Instant::now()),
            codec: None,
        }
    }

    fn is_device(&self) -> bool {
        self.conn.identity.role == Role::Device
    }

    fn me(&self) -> &Identity {
        &self.conn.identity
    }

    fn push(&self, ty: &str, text: String) {
        self.relay.metrics.count_out(type_index(ty), 1);
        if let Err(crate::outbox::PushError::Overflow) = self.conn.outbox.push_control(text) {
            self.relay.metrics.slow_consumers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(id = %self.me().id, "closing slow consumer: its outbound queue is full");
        }
    }

    fn error(&self, code: ErrorCode, message: impl Into<String>, correlation_id: Option<String>) {
        self.push("error", error_text(&self.relay, code, message, correlation_id));
    }

    fn ack(
        &self,
        status: &str,
        correlation_id: Option<String>,
        queue_depth: Option<u64>,
        data: Option<serde_json::Value>,
    ) {
        let mut e = Envelope::new(Ack { status: status.to_owned(), queue_depth, data });
        e.correlation_id = correlation_id;
        self.push("ack", e.to_json());
    }

    async fn run(&mut self, stream: &mut futures_util::stream::SplitStream<Socket>) {
        let relay = self.relay.clone();
        for old in relay.hub.attach(self.conn.clone()) {
            let _ = old.outbox.push_control(error_text(
                &relay,
                ErrorCode::Replaced,
                "a newer connection of this device took over",
                None,
            ));
            old.outbox.close(4409, "replaced");
        }
        let id = self.me().clone();
        let ok = AuthOk {
            client_id: id.id.clone(),
            role: id.role.as_str().to_owned(),
            org: id.org.clone(),
            relay_time: relay.clock.now_ms(),
            ping_interval_ms: relay.config.ping_every().as_millis() as u64,
        };
        self.push("auth_ok", Envelope::new(ok).to_json());
        if self.is_device() {
            let now = now_ms();
            relay.mark_seen(&id.id, now);
            // The device may have rebooted with its clock stepped: old samples would keep
            // describing the old clock until they left the window. The quick syncs after
            // connecting rebuild the estimate within a second; until then frames carry no age.
            relay.device_telemetry(&id.id).lock().clock = signaling::ClockSync::default();
            let link = relay.links.of(&id.id);
            link.connected(relay.started.elapsed());
            self.link = Some(link);
            ops::announce_presence(&relay, &id.id, true, now);
            self.push("lease_state", relay.leases.state(&id.id, "current"));
            Box::pin(self.deliver_queued()).await;
        }
        if let Some(codec) = self.codec.clone() {
            for text in codec.after_auth(self.me()) {
                let text = Utf8Bytes::from(text);
                if let Some(handling) = self.on_text(&text) {
                    handling.await;
                }
            }
        }
        let idle = relay.config.idle_timeout();
        loop {
            let deadline = if self.is_device() { self.next_sync.min(self.last_rx + idle) } else { self.last_rx + idle };
            tokio::select! {
                biased;
                _ = relay.shutdown.cancelled() => {
                    self.error(ErrorCode::ShuttingDown, "the relay is shutting down; reconnect shortly", None);
                    self.conn.outbox.close(1001, "relay shutting down");
                    self.end_reason = "relay shutdown".into();
                    return;
                }
                _ = self.conn.outbox.done() => {
                    self.end_reason = "writer stopped".into();
                    return;
                }
                msg = stream.next() => match msg {
                    None => { self.end_reason = "peer closed the socket".into(); return; }
                    Some(Err(e)) => {
                        if let Some((code, text, close)) = read_error(&e) {
                            self.error(code, text, None);
                            self.conn.outbox.close(close, code.as_str());
                        }
                        self.end_reason = format!("read error: {e}");
                        return;
                    }
                    Some(Ok(m)) => {
                        self.last_rx = Instant::now();
                        if let Some(link) = &self.link {
                            link.heard(self.last_rx.saturating_duration_since(relay.started));
                        }
                        if !self.on_message(m).await {
                            return;
                        }
                        if self.conn.outbox.is_closing() {
                            self.end_reason = "closed by the relay".into();
                            return;
                        }
                    }
                },
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let now = Instant::now();
                    if now >= self.last_rx + idle {
                        self.conn.outbox.close(1001, "idle timeout");
                        self.end_reason = format!("no traffic for {:.1} s", idle.as_secs_f64());
                        return;
                    }
                    if self.is_device() && now >= self.next_sync {
                        self.send_time_sync(now);
                    }
                }
            }
        }
    }

    /// Cleans up after the connection: hub membership, presence, leases, media sessions.
    fn finish(&self) {
        let relay = &self.relay;
        relay.hub.detach(&self.conn);
        let me = self.me();
        if self.is_device() {
            let now = now_ms();
            relay.mark_seen(&me.id, now);
            // A replacement connection may already be up; only announce a real departure.
            if !relay.hub.is_online(&me.id) {
                ops::announce_presence(relay, &me.id, false, now);
                for s in relay.media.device_gone(&me.id) {
                    let bye = media::bye_payload(&s.id, "device_offline");
                    let text = message::encode_routed("webrtc", None, Some(&s.pilot), &me.id, raw(&bye));
                    relay.hub.send_to_conn(s.conn, Utf8Bytes::from(text));
                }
                if let Some(sfu) = relay.sfu.clone() {
                    // Its WHEP viewers end with it (a later DELETE finds nothing: 404).
                    relay.whep.lock().retain(|_, s| !(s.org == me.org && s.device == me.id));
                    let key = ::media::sfu::DeviceKey::new(&me.org, &me.id);
                    tokio::spawn(async move { sfu.device_gone(&key).await });
                }
            }
        } else {
            for (device, org) in relay.leases.conn_closed(self.conn.id) {
                relay.leases.announce(relay, &org, &device, "disconnected");
            }
            for s in relay.media.conn_closed(self.conn.id) {
                if s.mode == media::Mode::Sfu {
                    if let Some(sfu) = relay.sfu.clone() {
                        tokio::spawn(async move { sfu.unsubscribe(&s.id).await });
                    }
                    continue;
                }
                let bye = media::bye_payload(&s.id, "pilot_left");
                let text = message::encode_routed("webrtc", None, Some(&s.device), &s.pilot, raw(&bye));
                relay.hub.send_to(&s.org, &s.device, Utf8Bytes::from(text));
            }
        }
    }

    /// Pushes the device's offline queue, oldest first, marked `"_offline_queued": true`.
    async fn deliver_queued(&self) {
        let device = self.me().id.clone();
        let d = device.clone();
        let rows = match self.relay.store.call(move |c| q::queued_for(c, &d)).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(%device, "could not read the offline queue: {e}");
                return;
            }
        };
        if rows.is_empty() {
            return;
        }
        let mut seqs = Vec::with_capacity(rows.len());
        for row in &rows {
            let text = format!(
                "{{\"_offline_queued\":true,{}",
                row.message_json.trim_start().strip_prefix('{').unwrap_or("}")
            );
            self.push(&row.msg_type, text);
            seqs.push(row.seq);
            if let Some(corr) = &row.correlation_id {
                let deadline = WITH_RESULT
                    .contains(&row.msg_type.as_str())
                    .then(|| Instant::now() + self.relay.config.command_deadline());
                self.relay.hub.remember_request(
                    &device,
                    corr,
                    PendingRequest {
                        requester: row.sender_id.clone(),
                        org: self.me().org.clone(),
                        conn: None,
                        deadline,
                        at: Instant::now(),
                    },
                );
            }
        }
        tracing::info!(%device, count = seqs.len(), "delivered queued messages");
        if let Err(e) = self.relay.store.call(move |c| q::mark_delivered(c, &seqs)).await {
            tracing::error!(%device, "could not mark queued messages delivered: {e}");
        }
    }

    fn send_time_sync(&mut self, now: Instant) {
        let t1 = self.relay.clock.now_ms();
        if self.sync_pending.len() >= 8 {
            self.sync_pending.remove(0);
        }
        self.sync_pending.push(t1);
        self.push("time_sync", Envelope::new(TimeSync { t1 }).to_json());
        self.syncs_sent += 1;
        self.next_sync =
            now + if self.syncs_sent < QUICK_SYNCS { QUICK_SYNC_GAP } else { self.relay.config.ping_every() };
    }

    /// Handles one frame; false ends the connection.
    async fn on_message(&mut self, m: Message) -> bool {
        if let Some(len) = oversize(&m, self.relay.config.max_message_size) {
            let limit = self.relay.config.max_message_size;
            self.error(
                ErrorCode::FrameTooLarge,
                format!("message of {len} bytes exceeds the {limit}-byte limit"),
                None,
            );
            self.conn.outbox.close(1009, "frame_too_large");
            self.end_reason = format!("message of {len} bytes over the limit");
            return false;
        }
        match m {
            Message::Text(t) => {
                if let Err(wait) = self.limiter.admit(t.len()) {
                    self.refuse_over_limit(wait);
                    return true;
                }
                match self.codec.clone() {
                    Some(codec) => self.on_dialect(&*codec, &t).await,
                    None => {
                        if let Some(handling) = self.on_text(&t) {
                            handling.await;
                        }
                    }
                }
                true
            }
            Message::Binary(b) => {
                self.relay.metrics.count_in(type_index("other"), b.len());
                self.error(
                    ErrorCode::BinaryNotSupported,
                    "binary frames are not accepted; send JSON in text frames",
                    None,
                );
                true
            }
            Message::Close(_) => {
                self.end_reason = "peer sent close".into();
                false
            }
            // Pings are answered by tungstenite; pongs only prove liveness (last_rx).
            _ => true,
        }
    }

    /// Over the rate limit: the message is not processed, and the sender hears so at most once
    /// a second (with the count), so the refusals cannot become a flood themselves.
    fn refuse_over_limit(&mut self, wait: Duration) {
        self.relay.metrics.rate_limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.limiter.refused_unreported += 1;
        let due = self.limiter.last_report.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if due {
            let n = std::mem::take(&mut self.limiter.refused_unreported);
            self.limiter.last_report = Some(Instant::now());
            let text = rate_limited_text(
                &self.relay,
                format!("rate limit exceeded: {n} message(s) refused since the last notice; slow down"),
                wait,
                None,
            );
            self.push("error", text);
        }
    }

    /// A dialect frame: translated to native messages handled as if the peer had sent them, or
    /// refused with an error (which the writer renders in the dialect's shape).
    async fn on_dialect(&mut self, codec: &dyn crate::dialect::Codec, text: &Utf8Bytes) {
        match codec.inbound(text.as_str()) {
            crate::dialect::Inbound::Native(msgs) => {
                for m in msgs {
                    let m = Utf8Bytes::from(m);
                    if let Some(handling) = self.on_text(&m) {
                        handling.await;
                    }
                }
            }
            crate::dialect::Inbound::Refuse(code, msg, corr) => {
                self.relay.metrics.count_in(type_index("other"), text.len());
                self.error(code, msg, corr);
            }
        }
    }

    /// Handles one native text frame: telemetry at once, any other message through the
    /// future this returns, boxed (see `serve`). Not an `async fn` on purpose: the decoded frame
    /// would then stay in the connection task's state for its whole life, which an idle device
    /// pays for; this way the caller holds only the box while a message is handled, and
    /// telemetry allocates nothing.
    fn on_text<'a>(&'a mut self, text: &'a Utf8Bytes) -> Option<BoxFuture<'a>> {
        let frame = match message::decode_frame(text.as_str()) {
            Ok(f) => f,
            Err(e) => {
                self.relay.metrics.count_in(type_index("other"), text.len());
                let msg = e.to_string();
                self.error(e.code(), msg, e.correlation_id);
                return None;
            }
        };
        match frame {
            Frame::Telemetry { header, payload, correlation_id } => {
                self.relay.metrics.count_in(type_index("telemetry"), text.len());
                if !self.is_device() {
                    self.error(ErrorCode::NotAllowed, "only devices publish telemetry", correlation_id);
                    return None;
                }
                self.on_telemetry(&header, payload);
                None
            }
            Frame::Message { envelope, payload } => {
                let ty = envelope.body.type_name();
                self.relay.metrics.count_in(type_index(ty), text.len());
                Some(Box::pin(self.on_envelope(envelope, payload)))
            }
        }
    }

    fn on_telemetry(&mut self, header: &TelemetryHeader<'_>, payload: &RawValue) {
        let relay = &self.relay;
        let device = &self.conn.identity.id;
        let now = relay.clock.now_ms();
        let stream = header.stream_name();
        let battery = self.battery.sample(payload, self.last_rx);
        let (verdict, counters, estimate) = {
            let state = relay.device_telemetry(device);
            let mut st = state.lock();
            let (v, c) = st.sequences.observe_ref(stream, header.sequence, header.epoch.as_deref(), header.backfill);
            st.health.verdict(v, stream, now);
            if let Some(b) = battery {
                st.health.battery(b, now);
            }
            (v, c, st.clock.estimate(now))
        };
        use std::sync::atomic::Ordering::Relaxed;
        let m = &relay.metrics;
        match verdict {
            signaling::Verdict::Gap { missing } => {
                m.sequence_gaps.fetch_add(1, Relaxed);
                m.sequence_missing.fetch_add(missing, Relaxed);
            }
            signaling::Verdict::Duplicate => {
                m.sequence_duplicates.fetch_add(1, Relaxed);
            }
            signaling::Verdict::Reordered => {
                m.sequence_reordered.fetch_add(1, Relaxed);
            }
            signaling::Verdict::Reset => {
                m.sequence_resets.fetch_add(1, Relaxed);
            }
            signaling::Verdict::Ok => {}
        }
        let annotation = TelemetryAnnotation::live(now, stream, verdict, counters, estimate, header.timestamp);
        let text = message::encode_forwarded_telemetry(device, payload, &annotation);
        let fan = relay.hub.publish_telemetry(device, Utf8Bytes::from(text));
        m.telemetry_delivered.fetch_add(fan.delivered as u64, Relaxed);
        m.telemetry_dropped.fetch_add(fan.dropped as u64, Relaxed);
        m.count_out(type_index("telemetry"), fan.delivered as u64);
    }

    async fn on_envelope(&mut self, env: Envelope, payload: Option<&RawValue>) {
        let corr = env.correlation_id.clone();
        let role = self.me().role;
        let ty = env.body.type_name();
        match env.body {
            Body::Ping(p) => {
                let pong = Pong { t: p.t, relay_time: Some(self.relay.clock.now_ms()) };
                let mut e = Envelope::new(pong);
                e.correlation_id = corr;
                self.push("pong", e.to_json());
            }
            Body::Pong(_) => {}
            Body::TimeSyncResponse(r) if role == Role::Device => {
                let t4 = self.relay.clock.now_ms();
                // Match within a microsecond: clients' float printing and parsing need not be
                // exactly round-trip.
                let Some(i) = self.sync_pending.iter().position(|t| (*t - r.t1).abs() < 1e-3) else {
                    self.error(ErrorCode::InvalidPayload, "t1 does not match a time_sync this relay sent", corr);
                    return;
                };
                self.sync_pending.remove(i);
                let state = self.relay.device_telemetry(&self.me().id);
                let added = state.lock().clock.add(r.t1, r.t2, r.t3, t4);
                match added {
                    Ok(sample) => {
                        if let Some(link) = &self.link {
                            link.rtt_sample(sample.rtt_ms);
                        }
                    }
                    Err(e) => self.error(ErrorCode::InvalidPayload, e.to_string(), corr),
                }
            }
            Body::Subscribe(s) if role.is_operator() => {
                if self.authorize(&s.device_id, ty, corr.clone()).await.is_none() {
                    return;
                }
                self.relay.hub.subscribe(&s.device_id, &self.conn, s.replay, s.logs, corr);
                self.relay.metrics.count_out(type_index("subscribed"), 1);
                self.push("lease_state", self.relay.leases.state(&s.device_id, "current"));
            }
            Body::Unsubscribe(u) if role.is_operator() => {
                self.relay.hub.unsubscribe(&u.device_id, self.conn.id);
                let mut e = Envelope::new(Unsubscribed { device_id: u.device_id });
                e.correlation_id = corr;
                self.push("unsubscribed", e.to_json());
            }
            Body::LeaseAcquire(l) | Body::LeaseRelease(l) | Body::LeaseHeartbeat(l) if role.is_operator() => {
                self.on_lease(ty, &l.device_id, l.takeover, corr).await;
            }
            Body::ApproveRegistration(a) if role.is_operator() => {
                match ops::approve(&self.relay, self.me(), &a.request_id, a.device_id, a.name).await {
                    Ok(reg) => {
                        self.ack("ok", corr, None, Some(json!({"requestID": reg.id, "clientID": reg.device_id})))
                    }
                    Err(e) => self.error(e.clone().into(), e.message, corr),
                }
            }
            Body::RejectRegistration(r) if role.is_operator() => {
                match ops::reject(&self.relay, self.me(), &r.request_id).await {
                    Ok(reg) => self.ack("ok", corr, None, Some(json!({"requestID": reg.id}))),
                    Err(e) => self.error(e.clone().into(), e.message, corr),
                }
            }
            Body::ExecuteCommand(_)
            | Body::DockerCommand(_)
            | Body::ProcessCommand(_)
            | Body::UpdateClientConfig(_)
            | Body::ReloadConfig(_)
            | Body::GetClientConfig(_)
            | Body::SpeedTest(_)
            | Body::AppCommand(_)
                if role.is_operator() =>
            {
                let timeout_ms = match &env.body {
                    Body::ExecuteCommand(c) => c.timeout_ms,
                    _ => None,
                };
                self.route_request(ty, corr, env.client_id, payload, timeout_ms).await;
            }
            Body::CommandOutput(_) | Body::CommandProgress(_) | Body::CommandResult(_) | Body::SpeedTestResult(_)
                if role == Role::Device =>
            {
                self.route_reply(ty, corr, env.client_id, payload).await;
            }
            Body::WebRtc(w) if role.is_operator() => self.pilot_webrtc(w, corr, env.client_id, payload).await,
            Body::WebRtc(w) if role == Role::Device => self.device_webrtc(w, corr, env.client_id, payload).await,
            Body::ProcessState(p) if role == Role::Device => {
                let now = self.relay.clock.now_ms();
                self.relay.device_telemetry(&self.me().id).lock().health.process_state(&p, now);
                let text = message::encode_routed(ty, corr.as_deref(), None, &self.me().id, payload);
                let n = self.relay.hub.publish_process_state(&self.me().id, Utf8Bytes::from(text));
                self.relay.metrics.count_out(type_index(ty), n as u64);
            }
            Body::Log(_) if role == Role::Device => {
                let text = message::encode_routed(ty, corr.as_deref(), None, &self.me().id, payload);
                let fan = self.relay.hub.publish_log(&self.me().id, Utf8Bytes::from(text));
                self.relay.metrics.count_out(type_index(ty), fan.delivered as u64);
            }
            Body::SafetyStop(stop) if role == Role::Device => {
                let device = self.me().id.clone();
                let text = message::encode_routed(ty, corr.as_deref(), None, &device, payload);
                // Operators hear of it first; the audit record follows (a store write).
                self.relay.hub.notify_subscribers(&device, Utf8Bytes::from(text));
                self.relay.metrics.count_out(type_index(ty), 1);
                tracing::warn!(%device, policy = %stop.policy, reason = %stop.reason, late = stop.late, "safety stop");
                {
                    let now = self.relay.clock.now_ms();
                    let state = self.relay.device_telemetry(&device);
                    let mut st = state.lock();
                    let clock = st.clock.estimate(now);
                    st.health.safety_stop(&stop, now, clock);
                }
                let detail = json!({
                    "policy": stop.policy,
                    "reason": stop.reason,
                    "controller": stop.controller,
                    "late": stop.late,
                    "timestamp": stop.timestamp,
                });
                ops::audit(&self.relay, self.me(), "device.safety_stop", Some(&device), detail).await;
            }
            _ => {
                let who = if role == Role::Device { "a device" } else { "an operator" };
                self.error(ErrorCode::NotAllowed, format!("{who} cannot send {ty:?} messages on this endpoint"), corr);
            }
        }
    }

    /// Pilot -> device signaling: needs `view` on the device and a sessionID; an `offer` opens
    /// the session (media.rs), everything else must belong to one this connection opened.
    async fn pilot_webrtc(&self, w: WebRtc, corr: Option<String>, target: Option<String>, payload: Option<&RawValue>) {
        let Some(device) = target else {
            self.error(ErrorCode::InvalidPayload, "webrtc needs clientID: the device it is for", corr);
            return;
        };
        if self.authorize(&device, "webrtc", corr.clone()).await.is_none() {
            return;
        }
        let Some(id) = valid_session(w.session_id.clone()) else {
            self.error(ErrorCode::InvalidPayload, "webrtc messages need a sessionID (1 to 128 characters)", corr);
            return;
        };
        let me = self.me();
        let offer = w.subtype == "offer";
        let requested = if offer {
            let asked = w.rest.get("mode").and_then(Value::as_str);
            match Requested::parse(asked.unwrap_or(&self.relay.config.media.default_mode)) {
                Some(r) => Some((r, asked.is_some())),
                None => {
                    self.error(ErrorCode::InvalidPayload, "mode must be \"p2p\", \"sfu\" or \"auto\"", corr);
                    return;
                }
            }
        } else {
            None
        };
        if requested.is_some_and(|(r, _)| r == Requested::Sfu) && self.relay.sfu.is_none() {
            self.error(ErrorCode::Unsupported, "this relay runs without its SFU (--no-sfu): use mode p2p", corr);
            return;
        }
        if offer && !self.relay.hub.is_online(&device) {
            // Refused before anything opens: signaling is never queued.
            self.error(ErrorCode::TargetOffline, format!("{device} is not connected"), corr);
            return;
        }
        let fresh = MediaSession::new(&id, &device, &me.org, &me.id, self.conn.id);
        let (session, opened) = match self.relay.media.from_pilot(fresh, offer) {
            Ok(s) => s,
            Err(e) => {
                self.error(ErrorCode::InvalidPayload, e.to_string(), corr);
                return;
            }
        };
        // A new session's mode, announced (`mode`) after the offer's ack.
        let (session, announce) = match requested {
            Some((r, explicit)) if opened => match self.open_session(&session, r, explicit) {
                Some((s, reason)) => (s, Some(reason)),
                None => return,
            },
            _ => (session, None),
        };
        if w.subtype == "state" {
            self.on_peer_state(&session, w.rest.get("state").and_then(Value::as_str));
            return;
        }
        if session.mode == media::Mode::Sfu {
            self.pilot_sfu(&session, &w, corr, announce).await;
            return;
        }
        if offer {
            self.relay.media.update(&id, |s| {
                s.connected = false;
                s.attempt += 1;
            });
            self.arm_fallback(&id);
        }
        let text = message::encode_routed("webrtc", corr.as_deref(), Some(&device), &me.id, payload);
        match self.relay.hub.send_to(&me.org, &device, Utf8Bytes::from(text)) {
            Delivery::Delivered(n) => {
                self.relay.metrics.count_out(type_index("webrtc"), n as u64);
                // Only messages that ask (with a correlationID) are acknowledged; trickled
                // candidates usually do not.
                if corr.is_some() {
                    self.ack("delivered", corr, None, None);
                }
                if let Some(reason) = announce {
                    self.announce_mode(&session, reason);
                }
            }
            Delivery::NotConnected => {
                self.relay.media.end(&id);
                self.error(ErrorCode::TargetOffline, format!("{device} is not connected"), corr);
                return;
            }
        }
        if w.subtype == "bye" {
            self.relay.media.end(&id);
        }
    }

    /// Tells the pilot which mode its session is in and why.
    fn announce_mode(&self, s: &MediaSession, reason: &str) {
        let s = self.relay.media.get(&s.id).unwrap_or_else(|| s.clone());
        media::to_pilot(&self.relay, &s, &media::mode_payload(&s, reason, self.relay.config.media.p2p_timeout));
    }

    /// Decides a new session's mode and records it; returns the session and the reason to
    /// announce. None if the session vanished meanwhile.
    fn open_session(
        &self,
        s: &MediaSession,
        requested: Requested,
        explicit: bool,
    ) -> Option<(MediaSession, &'static str)> {
        let cfg = &self.relay.config.media;
        let has_sfu = self.relay.sfu.is_some();
        let (mode, auto, reason) = match requested {
            Requested::P2p => (media::Mode::P2p, false, if explicit { "requested" } else { "default" }),
            Requested::Sfu => (media::Mode::Sfu, false, if explicit { "requested" } else { "default" }),
            Requested::Auto if !has_sfu => (media::Mode::P2p, false, "sfu_disabled"),
            Requested::Auto => {
                let watching = self.relay.media.count_device(&s.org, &s.device, &s.id);
                if watching >= cfg.sfu_above_viewers {
                    (media::Mode::Sfu, true, "viewers")
                } else {
                    (media::Mode::P2p, true, "auto_p2p_first")
                }
            }
        };
        let s = self.relay.media.update(&s.id, |s| {
            s.mode = mode;
            s.auto = auto;
        })?;
        tracing::info!(session = %s.id, device = %s.device, pilot = %s.pilot, mode = mode.as_str(), %reason, "video session opened");
        Some((s, reason))
    }

    /// An `auto` session's peer-to-peer attempt gets `--p2p-timeout` to report `connected`.
    fn arm_fallback(&self, id: &str) {
        let Some(s) = self.relay.media.get(id).filter(|s| s.auto && s.mode == media::Mode::P2p) else { return };
        let relay = self.relay.clone();
        let (id, attempt) = (id.to_owned(), s.attempt);
        let deadline = relay.config.media.p2p_deadline();
        let shutdown = relay.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(deadline) => media::fallback(&relay, &id, Some(attempt), "p2p_timeout"),
                _ = shutdown.cancelled() => {}
            }
        });
    }

    /// A side's report of its peer connection state: `connected` settles an `auto` session's
    /// attempt, `failed` moves it to the SFU. Not forwarded.
    fn on_peer_state(&self, s: &MediaSession, state: Option<&str>) {
        if s.mode != media::Mode::P2p {
            return;
        }
        match state {
            Some("connected") => {
                self.relay.media.update(&s.id, |s| s.connected = true);
            }
            Some("failed") => media::fallback(&self.relay, &s.id, None, "p2p_failed"),
            _ => {}
        }
    }

    /// A pilot's message in an SFU session: offers are answered by the SFU (the answer and its
    /// candidates come back through `media::route_sfu`), candidates go to its peer, `bye` ends it.
    async fn pilot_sfu(&self, s: &MediaSession, w: &WebRtc, corr: Option<String>, announce: Option<&str>) {
        let Some(sfu) = self.relay.sfu.clone() else { return };
        match w.subtype.as_str() {
            "offer" => {
                let Some(sdp) = w.rest.get("sdp").and_then(Value::as_str).map(str::to_owned) else {
                    self.error(ErrorCode::InvalidPayload, "an offer needs sdp", corr);
                    return;
                };
                if corr.is_some() {
                    self.ack("delivered", corr, None, None);
                }
                if let Some(reason) = announce {
                    self.announce_mode(s, reason);
                }
                let (relay, s) = (self.relay.clone(), s.clone());
                tokio::spawn(async move {
                    let key = s.key();
                    let options = ::media::sfu::SubscribeOptions::default();
                    if let Err(e) = sfu.subscribe(&key, &s.id, &sdp, options).await {
                        tracing::warn!(session = %s.id, device = %s.device, "SFU could not serve the viewer: {e}");
                        if relay.media.end(&s.id).is_some() {
                            let bye = json!({"subtype": "bye", "sessionID": s.id, "reason": "sfu_failed", "message": e.to_string()});
                            media::to_pilot(&relay, &s, &bye);
                        }
                    }
                });
            }
            "ice_candidate" => {
                let c: ::media::rtc::Candidate = match serde_json::from_value(Value::Object(w.rest.clone())) {
                    Ok(c) => c,
                    Err(e) => {
                        self.error(ErrorCode::InvalidPayload, format!("unreadable ICE candidate: {e}"), corr);
                        return;
                    }
                };
                if let Err(e) = sfu.viewer_candidate(&s.id, c).await {
                    tracing::debug!(session = %s.id, "candidate for the SFU refused: {e}");
                }
            }
            "bye" => {
                self.relay.media.end(&s.id);
                sfu.unsubscribe(&s.id).await;
            }
            other => tracing::debug!(session = %s.id, "ignoring webrtc {other:?} in an SFU session"),
        }
    }

    /// Device -> pilot signaling: only within a session the pilot opened, and only to the
    /// connection that opened it. If that pilot is gone, the device hears `bye` (`pilot_left`).
    /// Messages of the SFU's upstream sessions go to the SFU.
    async fn device_webrtc(&self, w: WebRtc, corr: Option<String>, target: Option<String>, payload: Option<&RawValue>) {
        if target.as_deref().is_some_and(|t| self.relay.hub.role_of(t) == Some(Role::Device)) {
            self.error(ErrorCode::NotAllowed, "devices answer operators; they cannot message other devices", corr);
            return;
        }
        let me = self.me();
        let Some(id) = valid_session(w.session_id) else {
            self.error(ErrorCode::InvalidPayload, "webrtc messages need a sessionID (1 to 128 characters)", corr);
            return;
        };
        if let Some(sfu) = &self.relay.sfu {
            let key = ::media::sfu::DeviceKey::new(&me.org, &me.id);
            if sfu.from_device(&key, &id, &w.subtype, &w.rest).await {
                return;
            }
        }
        let Some(session) = self.relay.media.for_device(&id, &me.id) else {
            if id.starts_with("sfu-") {
                // An upstream the SFU already closed: nothing to tell anyone.
                tracing::debug!(session = %id, "late message for a closed SFU upstream");
                return;
            }
            self.error(
                ErrorCode::InvalidPayload,
                format!("no open session {id:?} with this device: the pilot left or never sent an offer"),
                corr,
            );
            return;
        };
        if session.mode == media::Mode::Sfu {
            // Left over from a peer-to-peer attempt that moved to the SFU.
            tracing::debug!(session = %id, subtype = %w.subtype, "device message for a session now in the SFU dropped");
            return;
        }
        if w.subtype == "state" {
            self.on_peer_state(&session, w.rest.get("state").and_then(Value::as_str));
            return;
        }
        let text = message::encode_routed("webrtc", corr.as_deref(), Some(&session.pilot), &me.id, payload);
        if self.relay.hub.send_to_conn(session.conn, Utf8Bytes::from(text)) {
            self.relay.metrics.count_out(type_index("webrtc"), 1);
            if w.subtype == "bye" {
                self.relay.media.end(&id);
            }
        } else {
            self.relay.media.end(&id);
            let bye = media::bye_payload(&id, "pilot_left");
            self.push("webrtc", message::encode_routed("webrtc", None, Some(&me.id), &session.pilot, raw(&bye)));
        }
    }

    /// Checks that `device` is a device of the sender's org and that the sender holds the
    /// level message type `ty` needs on it; answers `unknown_target` or `forbidden` otherwise.
    async fn authorize(&self, device: &str, ty: &str, corr: Option<String>) -> Option<Level> {
        let id = device.to_owned();
        let found = self.relay.store.call(move |c| q::device_credentials(c, &id)).await;
        match found {
            Ok(Some((d, _))) if d.org_id == self.me().org => {}
            Ok(_) => {
                self.error(ErrorCode::UnknownTarget, format!("no device {device:?} in your organisation"), corr);
                return None;
            }
            Err(e) => {
                tracing::error!("device lookup failed: {e}");
                self.error(ErrorCode::Internal, "the relay could not look up the device; try again", corr);
                return None;
            }
        }
        let level = match self.relay.access.level(&self.relay.store, self.me(), device).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("permission lookup failed: {e}");
                self.error(ErrorCode::Internal, "the relay could not check permissions; try again", corr);
                return None;
            }
        };
        let needed = required_level(ty).unwrap_or(Level::Admin);
        match level {
            Some(l) if l >= needed => Some(l),
            _ => {
                let have = level.map_or("no access", Level::as_str);
                self.error(
                    ErrorCode::Forbidden,
                    format!("{ty} needs {} permission on {device} (you have {have})", needed.as_str()),
                    corr,
                );
                None
            }
        }
    }

    async fn on_lease(&self, ty: &str, device: &str, takeover: bool, corr: Option<String>) {
        let Some(level) = self.authorize(device, ty, corr.clone()).await else { return };
        let leases = &self.relay.leases;
        let org = self.me().org.clone();
        match ty {
            "lease_acquire" => {
                if takeover && level < Level::Admin {
                    self.error(ErrorCode::Forbidden, format!("taking over needs admin permission on {device}"), corr);
                    return;
                }
                match leases.acquire(device, &self.conn, takeover) {
                    Ok(reason) => {
                        self.ack("ok", corr, None, Some(json!({"deviceID": device, "lease": reason})));
                        audit_lease(&self.relay, self.me(), device, reason);
                        leases.announce(&self.relay, &org, device, reason);
                    }
                    Err(LeaseRefusal::HeldBy(name)) => {
                        self.error(
                            ErrorCode::NotController,
                            format!("{name} holds the control lease of {device}"),
                            corr,
                        );
                    }
                    Err(LeaseRefusal::NotHolder) => {
                        self.error(ErrorCode::NotController, "you do not hold this lease", corr)
                    }
                }
            }
            "lease_release" => match leases.release(device, self.conn.id) {
                Ok(()) => {
                    self.ack("ok", corr, None, Some(json!({"deviceID": device, "lease": "released"})));
                    leases.announce(&self.relay, &org, device, "released");
                }
                Err(_) => {
                    self.error(ErrorCode::NotController, format!("you do not hold the control lease of {device}"), corr)
                }
            },
            _ => match leases.heartbeat(device, self.conn.id) {
                Ok(()) => {
                    if corr.is_some() {
                        self.ack("ok", corr, None, None);
                    }
                }
                Err(_) => {
                    self.error(ErrorCode::NotController, format!("you do not hold the control lease of {device}"), corr)
                }
            },
        }
    }

    /// Operator -> device request: check permission (and the lease for app commands), forward
    /// with `from`, acknowledge `delivered`; for an offline device, store it and acknowledge
    /// `queued`. Requests with a result get a deadline (`command_timeout`).
    async fn route_request(
        &self,
        ty: &str,
        corr: Option<String>,
        target: Option<String>,
        payload: Option<&RawValue>,
        timeout_ms: Option<u64>,
    ) {
        let Some(target) = target else {
            self.error(ErrorCode::InvalidPayload, format!("{ty} needs clientID: the device it is for"), corr);
            return;
        };
        if self.authorize(&target, ty, corr.clone()).await.is_none() {
            return;
        }
        if ty == "app_command" && !self.relay.leases.is_holder(&target, self.conn.id) {
            let holder = self.relay.leases.holder(&target).map(|h| h.1);
            let msg = match holder {
                Some(name) => format!("{name} holds the control lease of {target}; app commands need it"),
                None => format!("take the control lease of {target} (lease_acquire) before sending app commands"),
            };
            self.error(ErrorCode::NotController, msg, corr);
            return;
        }
        let me = self.me();
        let text = message::encode_routed(ty, corr.as_deref(), Some(&target), &me.id, payload);
        let deadline = WITH_RESULT.contains(&ty).then(|| {
            let d = timeout_ms
                .map(|ms| Duration::from_millis(ms) + RESULT_GRACE)
                .unwrap_or_else(|| self.relay.config.command_deadline());
            Instant::now() + d
        });
        match self.relay.hub.send_to(&me.org, &target, Utf8Bytes::from(text.clone())) {
            Delivery::Delivered(n) => {
                self.relay.metrics.count_out(type_index(ty), n as u64);
                if let Some(c) = &corr {
                    let pending = PendingRequest {
                        requester: me.id.clone(),
                        org: me.org.clone(),
                        conn: Some(self.conn.id),
                        deadline,
                        at: Instant::now(),
                    };
                    self.relay.hub.remember_request(&target, c, pending);
                }
                self.ack("delivered", corr, None, None);
            }
            Delivery::NotConnected if QUEUEABLE.contains(&ty) && !refuses_queue(payload) => {
                self.enqueue(ty, corr, &target, text).await
            }
            Delivery::NotConnected => self.error(ErrorCode::TargetOffline, format!("{target} is not connected"), corr),
        }
    }

    async fn enqueue(&self, ty: &str, corr: Option<String>, target: &str, text: String) {
        let cfg = &self.relay.config;
        let (default_limit, default_ttl) = (cfg.queue_limit as i64, (cfg.queue_ttl * 1000.0) as i64);
        let (t, sender, c, ty2) = (target.to_owned(), self.me().id.clone(), corr.clone(), ty.to_owned());
        let outcome = self
            .relay
            .store
            .call(move |conn| {
                let (limit, ttl) = q::queue_limits(conn, &t)?;
                let limit = limit.unwrap_or(default_limit);
                let ttl = ttl.map(|s| s * 1000).unwrap_or(default_ttl);
                q::enqueue(conn, &t, &sender, c.as_deref(), &ty2, &text, ttl, limit)
            })
            .await;
        match outcome {
            Ok(EnqueueOutcome::Queued { depth, .. }) => self.ack("queued", corr, Some(depth as u64), None),
            Ok(EnqueueOutcome::Full { limit }) => self.error(
                ErrorCode::QueueFull,
                format!("{target} is offline and its queue already holds {limit} messages; this one was not stored"),
                corr,
            ),
            Err(e) => {
                tracing::error!(%target, "could not queue a message: {e}");
                self.error(
                    ErrorCode::Internal,
                    format!("{target} is offline and the message could not be stored"),
                    corr,
                );
            }
        }
    }

    /// Device -> operator reply: to the named `clientID`, else back to whoever sent the
    /// request with this correlationID. Only a final reply ([`FINAL_REPLIES`]) closes the
    /// request; progress keeps it open, deadline included.
    async fn route_reply(&self, ty: &str, corr: Option<String>, target: Option<String>, payload: Option<&RawValue>) {
        let me = self.me();
        let route = corr.as_deref().and_then(|c| self.relay.hub.reply_route(&me.id, c));
        let target_id = match (&target, &route) {
            (Some(t), _) => t.clone(),
            (None, Some(r)) => r.requester.clone(),
            (None, None) => {
                self.error(
                    ErrorCode::UnknownTarget,
                    format!("{ty} needs clientID, or the correlationID of a request that is waiting for it"),
                    corr,
                );
                return;
            }
        };
        if self.relay.hub.role_of(&target_id) == Some(Role::Device) {
            self.error(ErrorCode::NotAllowed, "devices answer operators; they cannot message other devices", corr);
            return;
        }
        if FINAL_REPLIES.contains(&ty)
            && let Some(c) = &corr
        {
            self.relay.hub.mark_answered(&me.id, c);
            // A queued request is done once its result arrives.
            let (d, c2) = (me.id.clone(), c.clone());
            if let Err(e) = self.relay.store.call(move |s| q::ack_queued(s, &d, &c2)).await {
                tracing::warn!("could not clear an answered queued message: {e}");
            }
        }
        let text = Utf8Bytes::from(message::encode_routed(ty, corr.as_deref(), Some(&target_id), &me.id, payload));
        // Prefer the exact connection that asked; fall back to the identity's other connections.
        if let Some(PendingRequest { conn: Some(conn), requester, .. }) = &route
            && target.as_deref().is_none_or(|t| t == requester)
            && self.relay.hub.send_to_conn(*conn, text.clone())
        {
            self.relay.metrics.count_out(type_index(ty), 1);
            return;
        }
        match self.relay.hub.send_to(&me.org, &target_id, text) {
            Delivery::Delivered(n) => self.relay.metrics.count_out(type_index(ty), n as u64),
            Delivery::NotConnected => {
                if target.is_none() {
                    // The requester left; the result is recorded in the log rather than lost silently.
                    tracing::warn!(device = %me.id, requester = %target_id, correlation = ?corr, "result for a disconnected requester was dropped");
                } else if self.same_org(&target_id, corr.clone()).await {
                    self.error(ErrorCode::TargetOffline, format!("{target_id} is not connected"), corr);
                }
            }
        }
    }

    /// True if `target` exists in the sender's org; otherwise answers `unknown_target`.
    async fn same_org(&self, target: &str, corr: Option<String>) -> bool {
        match self.relay.org_of(target).await {
            Ok(Some(org)) if org == self.me().org => true,
            Ok(_) => {
                self.error(
                    ErrorCode::UnknownTarget,
                    format!("no device or operator {target:?} in your organisation"),
                    corr,
                );
                false
            }
            Err(e) => {
                tracing::error!("directory lookup failed: {e}");
                self.error(ErrorCode::Internal, "the relay could not look up the target; try again", corr);
                false
            }
        }
    }
}

fn audit_lease(relay: &Arc<Relay>, who: &Identity, device: &str, reason: &str) {
    if reason == "renewed" {
        return;
    }
    let (relay, who, device, reason) = (relay.clone(), who.clone(), device.to_owned(), reason.to_owned());
    tokio::spawn(async move { ops::audit(&relay, &who, &format!("lease.{reason}"), Some(&device), json!({})).await });
}

type Sink = SplitSink<Socket, Message>;

/// The writer task: the only writer of the socket.
async fn write_loop(
    relay: Arc<Relay>,
    mut sink: Sink,
    outbox: Arc<Outbox>,
    codec: Option<Arc<dyn crate::dialect::Codec>>,
) {
    let ping_every = relay.config.ping_every();
    // A write that cannot finish in this long means the peer's TCP window stays shut.
    let stall = relay.config.idle_timeout();
    let mut ping = tokio::time::interval_at((Instant::now() + ping_every).into(), ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            n = outbox.next() => n,
            _ = ping.tick() => {
                match tokio::time::timeout(stall, sink.send(Message::Ping(Default::default()))).await {
                    Ok(Ok(())) => continue,
                    _ => break,
                }
            }
        };
        let result = match next {
            Next::Close(code, reason) => {
                let frame = CloseFrame { code: code.into(), reason: reason.into() };
                let _ = tokio::time::timeout(CLOSE_GRACE, async {
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    let _ = sink.close().await;
                })
                .await;
                break;
            }
            first => {
                // Boxed: the writer of an idle connection only holds its wait (see `serve`).
                tokio::time::timeout(stall, Box::pin(write_batch(&relay, &mut sink, &outbox, first, codec.as_deref())))
                    .await
            }
        };
        if !matches!(result, Ok(Ok(()))) {
            break;
        }
    }
    outbox.finish();
}

/// Writes `first` and whatever else is queued (up to a batch), then flushes once.
async fn write_batch(
    relay: &Relay,
    sink: &mut Sink,
    outbox: &Outbox,
    first: Next,
    codec: Option<&dyn crate::dialect::Codec>,
) -> Result<(), tungstenite::Error> {
    let mut item = Some(first);
    let mut n = 0;
    while let Some(next) = item.take() {
        match next {
            Next::Text(t) => {
                // A dialect connection sees the native message in its own shape, or not at all.
                let t = match codec {
                    Some(c) => c.outbound(t.as_str()).map(Utf8Bytes::from),
                    None => Some(t),
                };
                if let Some(t) = t {
                    relay.metrics.bytes_out.fetch_add(t.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    sink.feed(Message::Text(t)).await?;
                }
            }
            Next::Dropped { count, total } => {
                relay.metrics.count_out(type_index("telemetry_dropped"), 1);
                let text = Envelope::new(TelemetryDropped { count, total }).to_json();
                let text = match codec {
                    Some(c) => c.outbound(&text),
                    None => Some(text),
                };
                if let Some(text) = text {
                    sink.feed(Message::Text(text.into())).await?;
                }
            }
            Next::Close(code, reason) => {
                // Put it back for the main loop, which closes.
                outbox.close(code, reason);
                break;
            }
        }
        n += 1;
        if n < WRITE_BATCH {
            item = outbox.try_next();
        }
    }
    sink.flush().await
}
