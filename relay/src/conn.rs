//! One WebSocket connection, from upgrade to close.
//!
//! A connection is two tasks: this module's read loop, which authenticates, decodes, checks and
//! routes what the peer sends; and a writer task, the only thing that writes to the socket,
//! which drains the connection's [`Outbox`], sends pings and finally the close frame. The read
//! loop never waits on another connection: everything it produces for others is a non-blocking
//! push into their outboxes.
//!
//! Close codes: 1000 normal, 1001 relay shutting down or idle timeout, 1002 WebSocket protocol
//! error, 1003 binary before auth, 1007 text frame not UTF-8, 1008 policy (authentication
//! failed, message before auth, slow consumer), 1009 message too big, 4409 replaced by a newer
//! connection of the same device.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use signaling::message::{
    self, AuthOk, Body, Frame, Pong, TelemetryAnnotation, TelemetryDropped, TelemetryHeader,
    TimeSync, Unsubscribed,
};
use signaling::{Envelope, ErrorCode};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};

use crate::Relay;
use crate::auth::{self, Identity, Role};
use crate::hub::{Conn, Delivery};
use crate::metrics::type_index;
use crate::outbox::{Next, Outbox};
use crate::ws::Socket;

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
}

/// Clock-sync exchanges sent quickly after a device connects, before settling to the ping
/// interval, so frame ages are available within a second or two.
const QUICK_SYNCS: u32 = 4;
const QUICK_SYNC_GAP: Duration = Duration::from_millis(250);
/// How long the writer gets to flush the close frame after the read loop ends.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Most messages written before one flush.
const WRITE_BATCH: usize = 64;

fn error_text(
    relay: &Relay,
    code: ErrorCode,
    message: impl Into<String>,
    correlation_id: Option<String>,
) -> String {
    relay.metrics.count_error(code);
    relay.metrics.count_out(type_index("error"), 1);
    Envelope::error(code, message, correlation_id).to_json()
}

/// Runs a connection to completion.
pub async fn serve(
    relay: Arc<Relay>,
    socket: Socket,
    endpoint: Endpoint,
    peer: Option<SocketAddr>,
) {
    relay
        .metrics
        .connections_opened
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (sink, mut stream) = socket.split();
    let outbox = Arc::new(Outbox::new(
        relay.config.control_queue,
        relay.config.telemetry_queue,
    ));
    let writer = relay
        .tasks
        .spawn(write_loop(relay.clone(), sink, outbox.clone()));

    let identity = tokio::select! {
        r = authenticate(&relay, &mut stream, &outbox, endpoint) => r,
        _ = relay.shutdown.cancelled() => {
            outbox.close(1001, "relay shutting down");
            None
        }
    };
    if let Some(identity) = identity {
        tracing::info!(id = %identity.id, role = identity.role.as_str(), org = %identity.org, ?peer, "connected");
        let conn = Arc::new(Conn {
            id: relay.next_conn_id(),
            identity,
            outbox: outbox.clone(),
        });
        let mut session = Session::new(relay.clone(), conn.clone());
        session.run(&mut stream).await;
        relay.hub.detach(&conn);
        if conn.identity.role == Role::Device {
            relay.mark_seen(&conn.identity.id, crate::store::now_ms());
        }
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
    if tokio::time::timeout(CLOSE_GRACE, outbox.done())
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// Authenticates the connection; on failure queues the error and the close, returns `None`.
async fn authenticate(
    relay: &Relay,
    stream: &mut futures_util::stream::SplitStream<Socket>,
    outbox: &Outbox,
    endpoint: Endpoint,
) -> Option<Identity> {
    let fail = |code: ErrorCode, msg: &str, corr: Option<String>| {
        relay
            .metrics
            .auth_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = outbox.push_control(error_text(relay, code, msg, corr));
        outbox.close(1008, code.as_str());
        None
    };
    match endpoint {
        Endpoint::Operator { ticket } => {
            let Some(ticket) = ticket else {
                return fail(
                    ErrorCode::InvalidTicket,
                    "a ticket is required: POST /api/auth/ws-ticket, then connect to /ws/admin?ticket=<ticket>",
                    None,
                );
            };
            match relay.tickets.redeem(&ticket, Instant::now()) {
                Some(who) => Some(who),
                None => fail(
                    ErrorCode::InvalidTicket,
                    "the ticket is unknown, already used or expired; request a new one",
                    None,
                ),
            }
        }
        Endpoint::Device {
            client_id,
            bearer: Some(secret),
        } => {
            let Some(id) = client_id else {
                return fail(
                    ErrorCode::AuthFailed,
                    "the clientID query parameter is required with a bearer secret",
                    None,
                );
            };
            verify_device(relay, &id, &secret).await.or_else(|| {
                fail(
                    ErrorCode::AuthFailed,
                    "invalid clientID or clientSecret",
                    None,
                )
            })
        }
        Endpoint::Device {
            client_id,
            bearer: None,
        } => {
            let first = tokio::time::timeout(relay.config.auth_deadline(), stream.next()).await;
            let text = match first {
                Err(_) => {
                    return fail(
                        ErrorCode::AuthTimeout,
                        "no auth message arrived in time",
                        None,
                    );
                }
                Ok(None) => return None,
                Ok(Some(Err(e))) => {
                    if let Some((code, msg, close)) = read_error(&e) {
                        let _ = outbox.push_control(error_text(relay, code, msg, None));
                        outbox.close(close, code.as_str());
                    }
                    return None;
                }
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(Message::Binary(_)))) => {
                    let _ = outbox.push_control(error_text(
                        relay,
                        ErrorCode::BinaryNotSupported,
                        "messages are JSON text frames; authenticate first",
                        None,
                    ));
                    outbox.close(1003, "binary_not_supported");
                    return None;
                }
                Ok(Some(Ok(Message::Close(_)))) => return None,
                Ok(Some(Ok(_))) => {
                    return fail(
                        ErrorCode::NotAuthenticated,
                        "send {\"type\":\"auth\",...} first",
                        None,
                    );
                }
            };
            relay.metrics.count_in(type_index("auth"), text.len());
            match message::decode(&text) {
                Ok(Envelope {
                    body: Body::Auth(a),
                    correlation_id,
                    ..
                }) => {
                    let Some(id) = client_id else {
                        return fail(
                            ErrorCode::AuthFailed,
                            "connect to /ws?clientID=<your clientID> to authenticate",
                            correlation_id,
                        );
                    };
                    verify_device(relay, &id, &a.client_secret)
                        .await
                        .or_else(|| {
                            fail(
                                ErrorCode::AuthFailed,
                                "invalid clientID or clientSecret",
                                correlation_id,
                            )
                        })
                }
                Ok(Envelope {
                    body: Body::Register(_),
                    correlation_id,
                    ..
                }) => {
                    // Onboarding with handshake keys lands with the access work; until then no
                    // key is valid, and the device is told so plainly.
                    fail(
                        ErrorCode::InvalidHandshakeKey,
                        "this relay has no handshake keys configured; ask an admin for a device credential",
                        correlation_id,
                    )
                }
                Ok(env) => fail(
                    ErrorCode::NotAuthenticated,
                    "authenticate first: send {\"type\":\"auth\",\"payload\":{\"clientSecret\":...}}",
                    env.correlation_id,
                ),
                Err(e) => {
                    let corr = e.correlation_id.clone();
                    fail(e.code(), &e.to_string(), corr)
                }
            }
        }
    }
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
        tungstenite::Error::Capacity(c) => Some((
            ErrorCode::FrameTooLarge,
            format!("message too large: {c}"),
            1009,
        )),
        tungstenite::Error::Utf8(_) => Some((
            ErrorCode::MalformedJson,
            "text frame is not valid UTF-8".into(),
            1007,
        )),
        tungstenite::Error::Protocol(p) => Some((
            ErrorCode::MalformedJson,
            format!("WebSocket protocol error: {p}"),
            1002,
        )),
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
    end_reason: String,
}

impl Session {
    fn new(relay: Arc<Relay>, conn: Arc<Conn>) -> Self {
        Session {
            relay,
            conn,
            last_rx: Instant::now(),
            next_sync: Instant::now(),
            syncs_sent: 0,
            sync_pending: Vec::new(),
            end_reason: String::new(),
        }
    }

    fn is_device(&self) -> bool {
        self.conn.identity.role == Role::Device
    }

    fn push(&self, ty: &str, text: String) {
        self.relay.metrics.count_out(type_index(ty), 1);
        if let Err(e) = self.conn.outbox.push_control(text) {
            if e == crate::outbox::PushError::Overflow {
                self.relay
                    .metrics
                    .slow_consumers
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(id = %self.conn.identity.id, "closing slow consumer: its outbound queue is full");
            }
        }
    }

    fn error(&self, code: ErrorCode, message: impl Into<String>, correlation_id: Option<String>) {
        let text = error_text(&self.relay, code, message, correlation_id);
        if let Err(crate::outbox::PushError::Overflow) = self.conn.outbox.push_control(text) {
            self.relay
                .metrics
                .slow_consumers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
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
        let id = &self.conn.identity;
        let ok = AuthOk {
            client_id: id.id.clone(),
            role: id.role.as_str().to_owned(),
            org: id.org.clone(),
            relay_time: relay.clock.now_ms(),
            ping_interval_ms: relay.config.ping_every().as_millis() as u64,
        };
        self.push("auth_ok", Envelope::new(ok).to_json());
        if self.is_device() {
            relay.mark_seen(&id.id, crate::store::now_ms());
            // The device may have rebooted with its clock stepped: old samples would keep
            // describing the old clock until they left the window. The quick syncs after
            // connecting rebuild the estimate within a second; until then frames carry no age.
            relay.device_telemetry(&id.id).lock().clock = signaling::ClockSync::default();
        }
        let idle = relay.config.idle_timeout();
        loop {
            let deadline = if self.is_device() {
                self.next_sync.min(self.last_rx + idle)
            } else {
                self.last_rx + idle
            };
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
                        if !self.on_message(m).await {
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

    fn send_time_sync(&mut self, now: Instant) {
        let t1 = self.relay.clock.now_ms();
        if self.sync_pending.len() >= 8 {
            self.sync_pending.remove(0);
        }
        self.sync_pending.push(t1);
        self.push("time_sync", Envelope::new(TimeSync { t1 }).to_json());
        self.syncs_sent += 1;
        self.next_sync = now
            + if self.syncs_sent < QUICK_SYNCS {
                QUICK_SYNC_GAP
            } else {
                self.relay.config.ping_every()
            };
    }

    /// Handles one frame; false ends the connection.
    async fn on_message(&mut self, m: Message) -> bool {
        match m {
            Message::Text(t) => {
                self.on_text(&t).await;
                true
            }
            Message::Binary(_) => {
                self.relay.metrics.count_in(type_index("other"), 0);
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

    async fn on_text(&mut self, text: &Utf8Bytes) {
        let frame = match message::decode_frame(text.as_str()) {
            Ok(f) => f,
            Err(e) => {
                self.relay.metrics.count_in(type_index("other"), text.len());
                let msg = e.to_string();
                self.error(e.code(), msg, e.correlation_id);
                return;
            }
        };
        match frame {
            Frame::Telemetry {
                header,
                payload,
                correlation_id,
            } => {
                self.relay
                    .metrics
                    .count_in(type_index("telemetry"), text.len());
                if !self.is_device() {
                    self.error(
                        ErrorCode::NotAllowed,
                        "only devices publish telemetry",
                        correlation_id,
                    );
                    return;
                }
                self.on_telemetry(&header, payload);
            }
            Frame::Message { envelope, payload } => {
                let ty = envelope.body.type_name();
                self.relay.metrics.count_in(type_index(ty), text.len());
                self.on_envelope(envelope, payload).await;
            }
        }
    }

    fn on_telemetry(&mut self, header: &TelemetryHeader<'_>, payload: &RawValue) {
        let relay = &self.relay;
        let device = &self.conn.identity.id;
        let now = relay.clock.now_ms();
        let stream = header.stream_name();
        let (verdict, counters, estimate) = {
            let state = relay.device_telemetry(device);
            let mut st = state.lock();
            let (v, c) = st.sequences.observe_ref(
                stream,
                header.sequence,
                header.epoch.as_deref(),
                header.backfill,
            );
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
        let annotation = TelemetryAnnotation {
            received_at: now,
            stream: stream.to_owned(),
            verdict: verdict.as_str().to_owned(),
            missing: verdict.missing(),
            lost_total: counters.lost,
            age_ms: estimate.map(|e| now - e.device_to_relay(header.timestamp)),
            clock_offset_ms: estimate.map(|e| e.offset_ms),
            clock_uncertainty_ms: estimate.map(|e| e.uncertainty_ms),
            replay: false,
        };
        let text = message::encode_forwarded_telemetry(device, payload, &annotation);
        let fan = relay.hub.publish_telemetry(device, Utf8Bytes::from(text));
        m.telemetry_delivered
            .fetch_add(fan.delivered as u64, Relaxed);
        m.telemetry_dropped.fetch_add(fan.dropped as u64, Relaxed);
        m.count_out(type_index("telemetry"), fan.delivered as u64);
    }

    async fn on_envelope(&mut self, env: Envelope, payload: Option<&RawValue>) {
        let corr = env.correlation_id.clone();
        let role = self.conn.identity.role;
        match env.body {
            Body::Ping(p) => {
                let pong = Pong {
                    t: p.t,
                    relay_time: Some(self.relay.clock.now_ms()),
                };
                let mut e = Envelope::new(pong);
                e.correlation_id = corr;
                self.push("pong", e.to_json());
            }
            Body::Pong(_) => {}
            Body::TimeSyncResponse(r) if role == Role::Device => {
                let t4 = self.relay.clock.now_ms();
                // Match within a microsecond: clients' float printing and parsing need not be
                // exactly round-trip.
                let Some(i) = self
                    .sync_pending
                    .iter()
                    .position(|t| (*t - r.t1).abs() < 1e-3)
                else {
                    self.error(
                        ErrorCode::InvalidPayload,
                        "t1 does not match a time_sync this relay sent",
                        corr,
                    );
                    return;
                };
                self.sync_pending.remove(i);
                let state = self.relay.device_telemetry(&self.conn.identity.id);
                let added = state.lock().clock.add(r.t1, r.t2, r.t3, t4);
                if let Err(e) = added {
                    self.error(ErrorCode::InvalidPayload, e.to_string(), corr);
                }
            }
            Body::Subscribe(s) if role.is_operator() => {
                if !self.device_in_my_org(&s.device_id, corr.clone()).await {
                    return;
                }
                self.relay
                    .hub
                    .subscribe(&s.device_id, &self.conn, s.replay, corr);
                self.relay.metrics.count_out(type_index("subscribed"), 1);
            }
            Body::Unsubscribe(u) if role.is_operator() => {
                self.relay.hub.unsubscribe(&u.device_id, self.conn.id);
                let mut e = Envelope::new(Unsubscribed {
                    device_id: u.device_id,
                });
                e.correlation_id = corr;
                self.push("unsubscribed", e.to_json());
            }
            Body::ExecuteCommand(_)
            | Body::UpdateClientConfig(_)
            | Body::ReloadConfig(_)
            | Body::SpeedTest(_)
                if role.is_operator() =>
            {
                self.route_request(env.body.type_name(), corr, env.client_id, payload)
                    .await;
            }
            Body::WebRtc(_) => {
                if role.is_operator() {
                    self.route_request("webrtc", corr, env.client_id, payload)
                        .await;
                } else {
                    self.route_reply("webrtc", corr, env.client_id, payload)
                        .await;
                }
            }
            Body::CommandOutput(_) | Body::CommandResult(_) | Body::SpeedTestResult(_)
                if role == Role::Device =>
            {
                self.route_reply(env.body.type_name(), corr, env.client_id, payload)
                    .await;
            }
            other => {
                let who = if role == Role::Device {
                    "a device"
                } else {
                    "an operator"
                };
                self.error(
                    ErrorCode::NotAllowed,
                    format!(
                        "{who} cannot send {:?} messages on this endpoint",
                        other.type_name()
                    ),
                    corr,
                );
            }
        }
    }

    /// True if `device` is a device of the sender's org; otherwise answers `unknown_target`.
    async fn device_in_my_org(&self, device: &str, corr: Option<String>) -> bool {
        let id = device.to_owned();
        let found = self
            .relay
            .store
            .call(move |c| crate::store::q::device_credentials(c, &id))
            .await;
        match found {
            Ok(Some((d, _))) if d.org_id == self.conn.identity.org => true,
            Ok(_) => {
                self.error(
                    ErrorCode::UnknownTarget,
                    format!("no device {device:?} in your organisation"),
                    corr,
                );
                false
            }
            Err(e) => {
                tracing::error!("device lookup failed: {e}");
                self.error(
                    ErrorCode::Internal,
                    "the relay could not look up the device; try again",
                    corr,
                );
                false
            }
        }
    }

    /// True if `target` exists in the sender's org; otherwise answers `unknown_target`.
    async fn same_org(&self, target: &str, corr: Option<String>) -> bool {
        match self.relay.org_of(target).await {
            Ok(Some(org)) if org == self.conn.identity.org => true,
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
                self.error(
                    ErrorCode::Internal,
                    "the relay could not look up the target; try again",
                    corr,
                );
                false
            }
        }
    }

    /// Operator -> device (or peer) request: forward with `from`, remember the route back.
    async fn route_request(
        &self,
        ty: &str,
        corr: Option<String>,
        target: Option<String>,
        payload: Option<&RawValue>,
    ) {
        let Some(target) = target else {
            self.error(
                ErrorCode::InvalidPayload,
                format!("{ty} needs clientID: the device it is for"),
                corr,
            );
            return;
        };
        let me = &self.conn.identity;
        let text = message::encode_routed(ty, corr.as_deref(), Some(&target), &me.id, payload);
        match self
            .relay
            .hub
            .send_to(&me.org, &target, Utf8Bytes::from(text))
        {
            Delivery::Delivered(n) => {
                self.relay.metrics.count_out(type_index(ty), n as u64);
                if let Some(c) = &corr {
                    self.relay
                        .hub
                        .remember_request(&target, c, &self.conn, Instant::now());
                }
            }
            Delivery::NotConnected => {
                if self.same_org(&target, corr.clone()).await {
                    self.error(
                        ErrorCode::TargetOffline,
                        format!("{target} is not connected"),
                        corr,
                    );
                }
            }
        }
    }

    /// Device -> operator reply: to the named `clientID`, else back to whoever sent the
    /// request with this correlationID.
    async fn route_reply(
        &self,
        ty: &str,
        corr: Option<String>,
        target: Option<String>,
        payload: Option<&RawValue>,
    ) {
        let me = &self.conn.identity;
        let route = corr
            .as_deref()
            .and_then(|c| self.relay.hub.reply_route(&me.id, c));
        let target_id = match (&target, &route) {
            (Some(t), _) => t.clone(),
            (None, Some((who, _))) => who.clone(),
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
            self.error(
                ErrorCode::NotAllowed,
                "devices answer operators; they cannot message other devices",
                corr,
            );
            return;
        }
        let text = Utf8Bytes::from(message::encode_routed(
            ty,
            corr.as_deref(),
            Some(&target_id),
            &me.id,
            payload,
        ));
        // Prefer the exact connection that asked; fall back to the identity's other connections.
        if let (None, Some((_, conn))) = (&target, &route) {
            if self.relay.hub.send_to_conn(*conn, text.clone()) {
                self.relay.metrics.count_out(type_index(ty), 1);
                return;
            }
        }
        match self.relay.hub.send_to(&me.org, &target_id, text) {
            Delivery::Delivered(n) => self.relay.metrics.count_out(type_index(ty), n as u64),
            Delivery::NotConnected => {
                if self.same_org(&target_id, corr.clone()).await {
                    self.error(
                        ErrorCode::TargetOffline,
                        format!("{target_id} is not connected"),
                        corr,
                    );
                }
            }
        }
    }
}

type Sink = SplitSink<Socket, Message>;

/// The writer task: the only writer of the socket.
async fn write_loop(relay: Arc<Relay>, mut sink: Sink, outbox: Arc<Outbox>) {
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
                let frame = CloseFrame {
                    code: code.into(),
                    reason: reason.into(),
                };
                let _ = tokio::time::timeout(CLOSE_GRACE, async {
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    let _ = sink.close().await;
                })
                .await;
                break;
            }
            first => {
                tokio::time::timeout(stall, write_batch(&relay, &mut sink, &outbox, first)).await
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
) -> Result<(), tungstenite::Error> {
    let mut item = Some(first);
    let mut n = 0;
    while let Some(next) = item.take() {
        match next {
            Next::Text(t) => {
                relay
                    .metrics
                    .bytes_out
                    .fetch_add(t.len() as u64, std::sync::atomic::Ordering::Relaxed);
                sink.feed(Message::Text(t)).await?;
            }
            Next::Dropped { count, total } => {
                relay.metrics.count_out(type_index("telemetry_dropped"), 1);
                let text = Envelope::new(TelemetryDropped { count, total }).to_json();
                sink.feed(Message::Text(text.into())).await?;
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
