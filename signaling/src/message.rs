//! The native envelope and every message family.
//!
//! On the wire a message is one JSON object in a WebSocket text frame:
//!
//! ```json
//! {"type":"execute_command","correlationID":"cmd-1","clientID":"dev-1","payload":{"command":"ls"}}
//! ```
//!
//! [`Envelope`] holds the routing fields and a [`Body`], which is tagged on `type` with its
//! content in `payload`. Serialising an `Envelope` always writes `payload` (an empty object for
//! messages without fields) so that every client can rely on it.
//!
//! Decoding goes through [`decode`], which parses the envelope once, keeps `payload` as a raw
//! slice and then parses only the payload type that `type` names. It produces the same values
//! as serde's derived `Deserialize` (a test checks both on every example) but avoids buffering
//! the whole object, and lets the relay forward a telemetry payload without re-encoding it
//! (see [`decode_frame`]).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::ErrorCode;

/// One message with its routing fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// `type` and `payload`.
    #[serde(flatten)]
    pub body: Body,
    /// Links a request to its acknowledgement, progress and result. Chosen by the requester.
    #[serde(rename = "correlationID", default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The target of a request (a device or operator id). Absent on messages for the relay itself.
    #[serde(rename = "clientID", default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The authenticated sender, stamped by the relay on everything it forwards. The relay
    /// ignores any `from` a client sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

impl Envelope {
    /// A message without routing fields.
    pub fn new(body: impl Into<Body>) -> Self {
        Envelope { body: body.into(), correlation_id: None, client_id: None, from: None }
    }

    /// Sets `correlationID`.
    pub fn with_correlation(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets `clientID` (the target).
    pub fn to(mut self, target: impl Into<String>) -> Self {
        self.client_id = Some(target.into());
        self
    }

    /// An `error` message answering the request with `correlation_id`.
    pub fn error(code: ErrorCode, message: impl Into<String>, correlation_id: Option<String>) -> Self {
        Envelope {
            body: Body::Error(ErrorPayload { code, message: message.into(), retry_after_ms: None }),
            correlation_id,
            client_id: None,
            from: None,
        }
    }

    /// Serialises to JSON text. Serialising these types cannot fail (no maps with non-string
    /// keys, no failing `Serialize` impls), so this returns a `String` directly.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("envelope serialisation is infallible")
    }
}

macro_rules! bodies {
    // `From<Payload> for Body` only for payload types used by one variant; a variant marked
    // `shared` reuses another's payload type and is built explicitly.
    (@from $variant:ident $payload:ty) => {
        impl From<$payload> for Body {
            fn from(p: $payload) -> Body { Body::$variant(p) }
        }
    };
    (@from $variant:ident $payload:ty, shared) => {};
    ($( $(#[$doc:meta])* $variant:ident = $wire:literal ($payload:ty) $(, $shared:ident)?; )*) => {
        /// Every native message type. The variant's wire name is its `type`.
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(tag = "type", content = "payload")]
        #[non_exhaustive]
        pub enum Body {
            $( $(#[$doc])* #[serde(rename = $wire)] $variant($payload), )*
        }

        impl Body {
            /// The wire name of this message's `type`.
            pub fn type_name(&self) -> &'static str {
                match self { $( Body::$variant(_) => $wire, )* }
            }

            /// Every known wire type, for documentation and metrics labels.
            pub const TYPES: &'static [&'static str] = &[ $( $wire, )* ];

            /// Parses `payload` as the payload of message type `ty`.
            pub fn from_parts(ty: &str, payload: &str) -> Result<Body, DecodeErrorKind> {
                match ty {
                    $( $wire => serde_json::from_str::<$payload>(payload)
                        .map(Body::$variant)
                        .map_err(|e| DecodeErrorKind::InvalidPayload(e.to_string())), )*
                    _ => Err(DecodeErrorKind::UnknownType(ty.to_owned())),
                }
            }
        }

        $( bodies!(@from $variant $payload $(, $shared)?); )*
    };
}

bodies! {
    /// Device -> relay: authenticate with the secret issued at onboarding (first message on
    /// `/ws?clientID=` when no `Authorization` header was sent).
    Auth = "auth" (Auth);
    /// Relay -> client: authentication succeeded.
    AuthOk = "auth_ok" (AuthOk);
    /// Device -> relay on `/ws`: ask to join a fleet with a handshake key.
    Register = "register" (Register);
    /// Relay -> device: the registration waits for an admin's approval.
    RegistrationPending = "registration_pending" (RegistrationPending);
    /// Relay -> client: a request failed.
    Error = "error" (ErrorPayload);
    /// Either way: application-level liveness check, answered by `pong`.
    Ping = "ping" (Ping);
    /// Answer to `ping`, carrying the answerer's clock.
    Pong = "pong" (Pong);
    /// Relay -> device: first half of a clock-offset exchange (`t1` = relay send time).
    TimeSync = "time_sync" (TimeSync);
    /// Device -> relay: `t1` echoed, `t2` = device receive time, `t3` = device send time.
    TimeSyncResponse = "time_sync_response" (TimeSyncResponse);
    /// Device -> relay -> subscribed pilots: one telemetry frame. Pilots receive it with
    /// `from` and `payload.relay` (the relay's annotations).
    Telemetry = "telemetry" (Telemetry);
    /// Relay -> pilot: frames for this connection were dropped because it read too slowly.
    TelemetryDropped = "telemetry_dropped" (TelemetryDropped);
    /// Pilot -> relay: start receiving a device's telemetry (with replay of the buffer).
    Subscribe = "subscribe" (Subscribe);
    /// Relay -> pilot: the subscription is active.
    Subscribed = "subscribed" (Subscribed);
    /// Pilot -> relay: stop receiving a device's telemetry.
    Unsubscribe = "unsubscribe" (Unsubscribe);
    /// Relay -> pilot: the subscription has ended.
    Unsubscribed = "unsubscribed" (Unsubscribed);
    /// Device <-> pilot through the relay: WebRTC offer/answer/ICE candidates.
    WebRtc = "webrtc" (WebRtc);
    /// Operator -> device: run a program.
    ExecuteCommand = "execute_command" (ExecuteCommand);
    /// Device -> operator: the output and exit status of `execute_command`.
    CommandOutput = "command_output" (CommandOutput);
    /// Device -> operator: a chunk of a running command's output, before its `command_output`.
    CommandProgress = "command_progress" (CommandProgress);
    /// Operator -> device: list, start, stop or restart containers through the docker CLI.
    DockerCommand = "docker_command" (DockerCommand);
    /// Operator -> device: start, stop or restart one supervised process (a `paths` entry).
    ProcessCommand = "process_command" (ProcessCommand);
    /// Device -> relay -> the device's subscribers: the supervised processes' state.
    ProcessState = "process_state" (ProcessState);
    /// Device -> relay -> pilots subscribed with `logs: true`: one line of a supervised
    /// process's output.
    Log = "log" (LogLine);
    /// Device -> relay -> the device's subscribers: the agent told the robot software to stop
    /// (controller silent or link lost); sent late, with its original time, if the link was down.
    SafetyStop = "safety_stop" (SafetyStop);
    /// Operator -> device: replace (merge) configuration and save it to config.yaml.
    UpdateClientConfig = "update_client_config" (UpdateClientConfig);
    /// Operator -> device: re-read config.yaml and apply it.
    ReloadConfig = "reload_config" (Empty);
    /// Operator -> device: send the running configuration (secrets redacted) in a
    /// `command_result`.
    GetClientConfig = "get_client_config" (Empty), shared;
    /// Operator -> device: measure link throughput and round trip.
    SpeedTest = "speed_test" (SpeedTest);
    /// Device -> operator: the speed test's figures.
    SpeedTestResult = "speed_test_result" (SpeedTestResult);
    /// Device -> operator: the outcome of a request that has no result type of its own
    /// (`update_client_config`, `reload_config`, `get_client_config`, `process_command`,
    /// `app_command`).
    CommandResult = "command_result" (CommandResult);
    /// Relay -> requester: what the relay did with a request (`delivered`, `queued`, `ok`).
    Ack = "ack" (Ack);
    /// Operator -> device: an application command for the robot's own software
    /// (`set_waypoints`, `teleop`, ...). Needs `control` and the control lease.
    AppCommand = "app_command" (AppCommand);
    /// Relay -> admins: a device asked to join with a handshake key.
    RegistrationRequested = "registration_requested" (RegistrationEvent);
    /// Relay -> admins: a registration was approved or rejected.
    RegistrationDecided = "registration_decided" (RegistrationEvent), shared;
    /// Admin -> relay: approve a pending registration.
    ApproveRegistration = "approve_registration" (ApproveRegistration);
    /// Admin -> relay: reject a pending registration.
    RejectRegistration = "reject_registration" (RejectRegistration);
    /// Pilot -> relay: take the control lease of a device (`takeover` for admins).
    LeaseAcquire = "lease_acquire" (LeaseRequest);
    /// Pilot -> relay: give the lease back.
    LeaseRelease = "lease_release" (LeaseRequest), shared;
    /// Pilot -> relay: keep the lease alive.
    LeaseHeartbeat = "lease_heartbeat" (LeaseRequest), shared;
    /// Relay -> device and its viewers: who holds the control lease now.
    LeaseState = "lease_state" (LeaseState);
    /// Relay -> a device's subscribers: the device came online or went offline.
    Presence = "presence" (Presence);
}

/// `ack` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// `delivered` (on the target's connection), `queued` (stored for an offline device) or
    /// `ok` (a relay operation succeeded).
    pub status: String,
    /// For `queued`: how many messages now wait for the target.
    #[serde(rename = "queueDepth", default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<u64>,
    /// Operation results, e.g. the clientID of an approved device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// `app_command` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppCommand {
    /// The command name (`set_waypoint`, `set_waypoints`, `teleop`, ...).
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub data: Value,
}

/// `registration_requested` / `registration_decided` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrationEvent {
    /// The request.
    #[serde(rename = "requestID")]
    pub request_id: String,
    /// The device's name.
    pub name: String,
    /// pending, approved or rejected.
    pub status: String,
    /// Where the device connected from.
    #[serde(rename = "remoteAddr", default, skip_serializing_if = "Option::is_none")]
    pub remote_addr: Option<String>,
    /// The device id, once approved.
    #[serde(rename = "clientID", default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// `approve_registration` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApproveRegistration {
    /// The request to approve.
    #[serde(rename = "requestID")]
    pub request_id: String,
    /// The clientID to give the device (default `dev-<random>`).
    #[serde(rename = "deviceID", default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// A display name (default: the name the device sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `reject_registration` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectRegistration {
    /// The request to reject.
    #[serde(rename = "requestID")]
    pub request_id: String,
}

/// `lease_acquire` / `lease_release` / `lease_heartbeat` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// The device.
    #[serde(rename = "deviceID")]
    pub device_id: String,
    /// For `lease_acquire` by an admin: take the lease from its holder.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub takeover: bool,
}

/// `lease_state` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseState {
    /// The device.
    #[serde(rename = "deviceID")]
    pub device_id: String,
    /// Operator id of the holder; absent when nobody holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// The holder's username.
    #[serde(rename = "holderName", default, skip_serializing_if = "Option::is_none")]
    pub holder_name: Option<String>,
    /// How long the lease lasts without a heartbeat.
    #[serde(rename = "timeoutMs")]
    pub timeout_ms: u64,
    /// Why it changed: acquired, released, takeover, expired, disconnected.
    pub reason: String,
}

/// `presence` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    /// The device.
    #[serde(rename = "deviceID")]
    pub device_id: String,
    /// online or offline.
    pub status: String,
    /// Last time it was connected, ms since the Unix epoch.
    #[serde(rename = "lastSeen", default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<i64>,
}

/// A payload without fields, serialised as `{}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Empty {}

/// `auth` payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Auth {
    /// The device's secret, issued once at approval.
    #[serde(rename = "clientSecret")]
    pub client_secret: String,
}

/// `auth_ok` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthOk {
    /// The authenticated identity (device id or operator id).
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// `device`, `pilot` or `admin`.
    pub role: String,
    /// The organisation the identity belongs to; routing never crosses it.
    pub org: String,
    /// Relay wall clock (ms since the Unix epoch) when it sent this.
    #[serde(rename = "relayTime")]
    pub relay_time: f64,
    /// How often the relay pings and runs time sync, so clients can size their own timers.
    #[serde(rename = "pingIntervalMs")]
    pub ping_interval_ms: u64,
}

/// `register` payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Register {
    /// A human name for the device, shown to admins.
    pub name: String,
    /// The fleet's handshake key.
    #[serde(rename = "handshakeKey")]
    pub handshake_key: String,
}

/// `registration_pending` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrationPending {
    /// Poll `GET /ws/status/<requestID>` with this.
    #[serde(rename = "requestID")]
    pub request_id: String,
}

/// `error` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorPayload {
    /// Stable machine-readable code.
    pub code: ErrorCode,
    /// A sentence for humans.
    pub message: String,
    /// For `rate_limited`: when a retry may succeed.
    #[serde(rename = "retryAfterMs", default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// `ping` payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ping {
    /// Sender's clock when sent (echoed in `pong`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t: Option<f64>,
}

/// `pong` payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pong {
    /// The `t` of the `ping`, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t: Option<f64>,
    /// Answerer's wall clock (ms since the Unix epoch) when it answered.
    #[serde(rename = "relayTime", default, skip_serializing_if = "Option::is_none")]
    pub relay_time: Option<f64>,
}

/// `time_sync` payload (relay -> device).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TimeSync {
    /// Relay clock at send, ms.
    pub t1: f64,
}

/// `time_sync_response` payload (device -> relay).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TimeSyncResponse {
    /// The relay's `t1`, echoed.
    pub t1: f64,
    /// Device clock when the `time_sync` arrived, ms.
    pub t2: f64,
    /// Device clock when this response was sent, ms.
    pub t3: f64,
}

/// `telemetry` payload, as the device sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// What kind of frame (`sensor_data`, `status`, ...). Defaults to `sensor_data`.
    #[serde(default = "default_subtype")]
    pub subtype: String,
    /// The sequence stream this frame belongs to; defaults to `subtype`. Each stream has its
    /// own sequence numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Per-stream counter stamped by the device, +1 per frame.
    pub sequence: u64,
    /// Device clock when the data was sampled, ms since the Unix epoch.
    #[serde(serialize_with = "ms::ser")]
    pub timestamp: f64,
    /// Device clock when the frame was sent, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "ms::ser_opt")]
    pub system_time: Option<f64>,
    /// Changes whenever the device restarts its counters (e.g. a boot id), so the relay can
    /// tell a restart from duplicates without guessing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// True when the frame was buffered while the link was down and is sent late.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub backfill: bool,
    /// The sensor values; any JSON.
    #[serde(default)]
    pub data: Value,
    /// Added by the relay on frames it forwards to pilots; a device must not send it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<TelemetryAnnotation>,
}

/// Millisecond timestamps: whole values are written as integers (`1625049600000`, as the seed
/// devices send them), fractional ones as floats.
mod ms {
    use serde::Serializer;

    pub fn ser<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.fract() == 0.0 && v.abs() < 9.0e15 { s.serialize_i64(*v as i64) } else { s.serialize_f64(*v) }
    }

    pub fn ser_opt<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => ser(v, s),
            None => s.serialize_none(),
        }
    }
}

fn default_subtype() -> String {
    "sensor_data".to_owned()
}

/// What the relay adds to each telemetry frame it forwards (`payload.relay`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryAnnotation {
    /// Relay wall clock when the frame arrived, ms since the Unix epoch.
    #[serde(rename = "receivedAt")]
    pub received_at: f64,
    /// The stream the sequence was checked on.
    pub stream: String,
    /// `ok`, `gap`, `duplicate`, `reordered` or `reset`.
    pub verdict: String,
    /// For `gap`: how many frames are missing before this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<u64>,
    /// Frames missing on this stream so far (gaps not later filled by reordered frames).
    #[serde(rename = "lostTotal")]
    pub lost_total: u64,
    /// Age of the sample when it reached the relay: receive time minus `timestamp` mapped onto
    /// the relay clock. Absent until the first clock-sync exchange with the device completes.
    #[serde(rename = "ageMs", default, skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<f64>,
    /// Device clock minus relay clock, ms, as currently estimated.
    #[serde(rename = "clockOffsetMs", default, skip_serializing_if = "Option::is_none")]
    pub clock_offset_ms: Option<f64>,
    /// Bound on the offset's error, ms (half the best round trip plus drift since).
    #[serde(rename = "clockUncertaintyMs", default, skip_serializing_if = "Option::is_none")]
    pub clock_uncertainty_ms: Option<f64>,
    /// True when this frame comes from the relay's buffer on subscribe, not live.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replay: bool,
}

impl TelemetryAnnotation {
    /// The annotation of a live frame that arrived at `received_at` (relay ms) on `stream`,
    /// stamped `device_timestamp` by the device: the sequence tracker's verdict and counters, and
    /// the clock estimate if there is one yet (no estimate, no age).
    pub fn live(
        received_at: f64,
        stream: &str,
        verdict: crate::Verdict,
        counters: crate::SequenceCounters,
        estimate: Option<crate::ClockEstimate>,
        device_timestamp: f64,
    ) -> Self {
        TelemetryAnnotation {
            received_at,
            stream: stream.to_owned(),
            verdict: verdict.as_str().to_owned(),
            missing: verdict.missing(),
            lost_total: counters.lost,
            age_ms: estimate.map(|e| received_at - e.device_to_relay(device_timestamp)),
            clock_offset_ms: estimate.map(|e| e.offset_ms),
            clock_uncertainty_ms: estimate.map(|e| e.uncertainty_ms),
            replay: false,
        }
    }
}

/// `telemetry_dropped` payload.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TelemetryDropped {
    /// Frames dropped since the previous notice.
    pub count: u64,
    /// Frames dropped on this connection since it opened.
    pub total: u64,
}

/// `subscribe` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscribe {
    /// The device whose telemetry to receive.
    #[serde(rename = "deviceID")]
    pub device_id: String,
    /// Whether to receive the buffered frames first (default true).
    #[serde(default = "yes")]
    pub replay: bool,
    /// Also receive the device's `log` lines (default false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub logs: bool,
}

fn yes() -> bool {
    true
}

/// `subscribed` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscribed {
    /// The device subscribed to.
    #[serde(rename = "deviceID")]
    pub device_id: String,
    /// Whether the device is connected right now.
    pub online: bool,
    /// How many buffered frames follow, marked `relay.replay = true`.
    pub replayed: usize,
}

/// `unsubscribe` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unsubscribe {
    /// The device to stop receiving.
    #[serde(rename = "deviceID")]
    pub device_id: String,
}

/// `unsubscribed` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unsubscribed {
    /// The device no longer subscribed to.
    #[serde(rename = "deviceID")]
    pub device_id: String,
}

/// `webrtc` payload. The relay routes it by `clientID` without interpreting SDP or candidates;
/// fields other than `subtype` and `sessionID` pass through untouched (W3C names: `sdp`,
/// `candidate`, `sdpMid`, `sdpMLineIndex`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebRtc {
    /// `offer`, `answer`, `ice_candidate`, `bye`, ...
    pub subtype: String,
    /// Identifies one media session between a device and a pilot.
    #[serde(rename = "sessionID", default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Everything else, passed through.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// `execute_command` payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecuteCommand {
    /// The program to run.
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Kill it after this long.
    #[serde(rename = "timeoutMs", default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Run `command` through `sh -c` (only if the device's config allows shell commands).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shell: bool,
}

/// `command_progress` payload: output produced so far by a running `execute_command`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommandProgress {
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The text (UTF-8, invalid bytes replaced).
    pub data: String,
    /// Bytes of this stream sent before this chunk.
    pub offset: u64,
}

/// `docker_command` payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DockerCommand {
    /// `list`, `start`, `stop` or `restart`.
    pub action: String,
    /// The container (name or id); not needed for `list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// `process_command` payload. Both fields default to empty so that the device, not the relay,
/// explains what is missing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessCommand {
    /// `start`, `stop` or `restart`.
    #[serde(default)]
    pub action: String,
    /// The process: its key under `paths` in the device's config.yaml.
    #[serde(default)]
    pub name: String,
}

/// One supervised process in `process_state`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Its key under `paths` in config.yaml.
    pub name: String,
    /// `starting`, `running`, `exited`, `restarting`, `failed` (could not start) or `stopped`.
    pub state: String,
    /// OS process id while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Restarts so far.
    #[serde(default)]
    pub restarts: u32,
    /// How the last run ended: `exit 3`, `signal 9`, or why it could not start.
    #[serde(rename = "lastExit", default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// When the next start is due while `restarting`, ms since the Unix epoch (device clock).
    #[serde(rename = "restartAt", default, skip_serializing_if = "Option::is_none")]
    pub restart_at: Option<f64>,
    /// When `state` last changed, ms since the Unix epoch (device clock).
    pub since: f64,
}

/// `process_state` payload: every supervised process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessState {
    /// One entry per `paths` entry.
    pub processes: Vec<ProcessInfo>,
}

/// `log` payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// The supervised process (its `paths` key), or `agent`.
    pub process: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The line, without its newline.
    pub line: String,
    /// Device clock, ms since the Unix epoch.
    pub timestamp: f64,
}

/// `safety_stop` payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SafetyStop {
    /// What the robot was told to do: `hold`, `stop` or `return`.
    pub policy: String,
    /// `controller_silent` (the control lease expired), `controller_disconnected` or `link_lost`.
    pub reason: String,
    /// Device clock when the stop was issued, ms since the Unix epoch.
    pub timestamp: f64,
    /// The pilot who held the control lease, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    /// True when the stop happened while the link was down and is reported afterwards.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub late: bool,
}

/// `command_output` payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommandOutput {
    /// Standard output (possibly capped).
    #[serde(default)]
    pub stdout: String,
    /// Standard error (possibly capped).
    #[serde(default)]
    pub stderr: String,
    /// Exit code; absent when the program was killed or could not start.
    #[serde(rename = "exitCode", default)]
    pub exit_code: Option<i32>,
    /// Wall time the program ran.
    #[serde(rename = "durationMs", default)]
    pub duration_ms: u64,
    /// True when the program was killed at its timeout.
    #[serde(rename = "timedOut", default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// True when output beyond the device's cap was discarded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// `update_client_config` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateClientConfig {
    /// Keys to set in the device's config.yaml (merged over the current file).
    pub config: Value,
}

/// `speed_test` payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpeedTest {
    /// How many bytes to move each way (device default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

/// `speed_test_result` payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpeedTestResult {
    /// Device -> relay throughput.
    #[serde(rename = "uploadMbps", default, skip_serializing_if = "Option::is_none")]
    pub upload_mbps: Option<f64>,
    /// Relay -> device throughput.
    #[serde(rename = "downloadMbps", default, skip_serializing_if = "Option::is_none")]
    pub download_mbps: Option<f64>,
    /// Round trip to the relay.
    #[serde(rename = "rttMs", default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

/// `command_result` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    /// Whether the request took effect.
    pub ok: bool,
    /// Why not, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The stable error code, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    /// Anything the device wants to return.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// What went wrong decoding a frame.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeErrorKind {
    /// Not JSON, or not a JSON object.
    #[error("the frame is not a valid JSON object: {0}")]
    MalformedJson(String),
    /// No `type` field.
    #[error("the message has no \"type\" field")]
    MissingType,
    /// A `type` this protocol does not define.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// The payload does not fit the type.
    #[error("invalid payload: {0}")]
    InvalidPayload(String),
}

impl DecodeErrorKind {
    /// The protocol error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeErrorKind::MalformedJson(_) => ErrorCode::MalformedJson,
            DecodeErrorKind::MissingType | DecodeErrorKind::UnknownType(_) => ErrorCode::UnknownType,
            DecodeErrorKind::InvalidPayload(_) => ErrorCode::InvalidPayload,
        }
    }
}

/// A decoding failure, with the request's correlationID when it could be read, so the error
/// reply can name the request it answers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind}")]
pub struct DecodeError {
    /// What went wrong.
    pub kind: DecodeErrorKind,
    /// The `correlationID` of the failed message, if readable.
    pub correlation_id: Option<String>,
}

impl DecodeError {
    /// The protocol error code.
    pub fn code(&self) -> ErrorCode {
        self.kind.code()
    }
}

/// The routing fields and the raw payload, parsed without touching the payload's contents.
#[derive(Debug, Deserialize)]
pub struct RawEnvelope<'a> {
    /// `type`.
    #[serde(rename = "type", borrow, default)]
    pub ty: Option<Cow<'a, str>>,
    /// `correlationID`.
    #[serde(rename = "correlationID", default)]
    pub correlation_id: Option<String>,
    /// `clientID`.
    #[serde(rename = "clientID", default)]
    pub client_id: Option<String>,
    /// `from` (only meaningful on messages from the relay).
    #[serde(default)]
    pub from: Option<String>,
    /// `payload`, unparsed.
    #[serde(borrow, default)]
    pub payload: Option<&'a RawValue>,
}

const EMPTY_OBJECT: &str = "{}";

/// Reads the routing fields of `text`, leaving `payload` unparsed.
pub fn decode_raw(text: &str) -> Result<RawEnvelope<'_>, DecodeError> {
    // serde's derived struct visitors also accept arrays; a message must be an object.
    if !text.trim_start().starts_with('{') {
        return Err(DecodeError {
            kind: DecodeErrorKind::MalformedJson("a message must be a JSON object".into()),
            correlation_id: None,
        });
    }
    serde_json::from_str::<RawEnvelope<'_>>(text)
        .map_err(|e| DecodeError { kind: DecodeErrorKind::MalformedJson(e.to_string()), correlation_id: None })
}

/// Decodes one text frame into an [`Envelope`]. Any `from` in the input is discarded: only the
/// relay stamps `from`.
pub fn decode(text: &str) -> Result<Envelope, DecodeError> {
    let raw = decode_raw(text)?;
    finish(raw)
}

/// Decodes a message received from the relay, keeping the `from` the relay stamped (clients
/// use this; the relay itself uses [`decode`]).
pub fn decode_from_relay(text: &str) -> Result<Envelope, DecodeError> {
    let mut raw = decode_raw(text)?;
    let from = raw.from.take();
    let mut env = finish(raw)?;
    env.from = from;
    Ok(env)
}

fn finish(raw: RawEnvelope<'_>) -> Result<Envelope, DecodeError> {
    let fail = |kind| DecodeError { kind, correlation_id: raw.correlation_id.clone() };
    let ty = raw.ty.as_deref().ok_or_else(|| fail(DecodeErrorKind::MissingType))?;
    let payload = raw.payload.map(RawValue::get).unwrap_or(EMPTY_OBJECT);
    if !payload.starts_with('{') {
        return Err(fail(DecodeErrorKind::InvalidPayload("payload must be a JSON object".into())));
    }
    let body = Body::from_parts(ty, payload).map_err(fail)?;
    Ok(Envelope { body, correlation_id: raw.correlation_id, client_id: raw.client_id, from: None })
}

/// The fields of a telemetry payload the relay needs, read without materialising `data`.
#[derive(Debug, Deserialize)]
pub struct TelemetryHeader<'a> {
    /// See [`Telemetry::subtype`].
    #[serde(borrow, default)]
    pub subtype: Option<Cow<'a, str>>,
    /// See [`Telemetry::stream`].
    #[serde(borrow, default)]
    pub stream: Option<Cow<'a, str>>,
    /// See [`Telemetry::sequence`].
    pub sequence: u64,
    /// See [`Telemetry::timestamp`].
    pub timestamp: f64,
    /// See [`Telemetry::epoch`].
    #[serde(borrow, default)]
    pub epoch: Option<Cow<'a, str>>,
    /// See [`Telemetry::backfill`].
    #[serde(default)]
    pub backfill: bool,
    /// Must be absent: the relay adds it.
    #[serde(default)]
    pub relay: Option<serde::de::IgnoredAny>,
}

impl TelemetryHeader<'_> {
    /// The sequence stream: `stream`, else `subtype`, else `sensor_data`.
    pub fn stream_name(&self) -> &str {
        self.stream.as_deref().or(self.subtype.as_deref()).unwrap_or("sensor_data")
    }
}

/// A decoded frame as the relay's hot path sees it: telemetry keeps its payload as raw JSON so
/// it can be forwarded without re-encoding; everything else is a full [`Envelope`].
#[derive(Debug)]
pub enum Frame<'a> {
    /// A telemetry frame.
    Telemetry {
        /// The parsed header fields.
        header: TelemetryHeader<'a>,
        /// The payload exactly as received (a JSON object).
        payload: &'a RawValue,
        /// `correlationID`, if any.
        correlation_id: Option<String>,
    },
    /// Any other message, with its payload bytes for forwarding unchanged.
    Message {
        /// The decoded message.
        envelope: Envelope,
        /// The payload as received, if there was one.
        payload: Option<&'a RawValue>,
    },
}

/// Decodes one text frame for the relay (see [`Frame`]).
pub fn decode_frame(text: &str) -> Result<Frame<'_>, DecodeError> {
    let raw = decode_raw(text)?;
    if raw.ty.as_deref() == Some("telemetry") {
        let fail = |kind| DecodeError { kind, correlation_id: raw.correlation_id.clone() };
        let payload = raw
            .payload
            .filter(|p| p.get().starts_with('{'))
            .ok_or_else(|| fail(DecodeErrorKind::InvalidPayload("telemetry needs a payload object".into())))?;
        let header: TelemetryHeader<'_> =
            serde_json::from_str(payload.get()).map_err(|e| fail(DecodeErrorKind::InvalidPayload(e.to_string())))?;
        if header.relay.is_some() {
            return Err(fail(DecodeErrorKind::InvalidPayload(
                "\"relay\" is added by the relay and must not be sent".into(),
            )));
        }
        return Ok(Frame::Telemetry { header, payload, correlation_id: raw.correlation_id });
    }
    let payload = raw.payload;
    finish(raw).map(|envelope| Frame::Message { envelope, payload })
}

/// Builds the frame a pilot receives for one telemetry payload: the device's payload bytes
/// unchanged, with `relay` appended as the last key, and `from` set. `payload` must be a JSON
/// object (as [`decode_frame`] guarantees).
pub fn encode_forwarded_telemetry(from: &str, payload: &RawValue, annotation: &TelemetryAnnotation) -> String {
    let raw = payload.get().trim_end();
    let body = raw.strip_suffix('}').unwrap_or(raw).trim_end();
    let annotation = serde_json::to_string(annotation).expect("annotation serialisation is infallible");
    let from = serde_json::to_string(from).expect("string serialisation is infallible");
    let mut out = String::with_capacity(raw.len() + annotation.len() + from.len() + 48);
    out.push_str("{\"type\":\"telemetry\",\"from\":");
    out.push_str(&from);
    out.push_str(",\"payload\":");
    out.push_str(body);
    // `{}` has nothing before its closing brace: no separating comma then.
    if !body.trim_start().eq("{") {
        out.push(',');
    }
    out.push_str("\"relay\":");
    out.push_str(&annotation);
    out.push_str("}}");
    out
}

/// Turns a frame made by [`encode_forwarded_telemetry`] into its replay form, by adding
/// `"replay":true` as the last key of the annotation. Works on the encoded text so buffered
/// frames are stored once, as sent live.
pub fn mark_replay(live: &str) -> String {
    let head = live.strip_suffix("}}}").unwrap_or(live);
    let mut out = String::with_capacity(live.len() + 16);
    out.push_str(head);
    out.push_str(",\"replay\":true}}}");
    out
}

/// Builds a routed message: the sender's payload bytes unchanged, with the relay's `from`.
pub fn encode_routed(
    ty: &str,
    correlation_id: Option<&str>,
    client_id: Option<&str>,
    from: &str,
    payload: Option<&RawValue>,
) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("string serialisation is infallible");
    let payload = payload.map(RawValue::get).unwrap_or(EMPTY_OBJECT);
    let mut out = String::with_capacity(payload.len() + 96);
    out.push_str("{\"type\":");
    out.push_str(&q(ty));
    if let Some(c) = correlation_id {
        out.push_str(",\"correlationID\":");
        out.push_str(&q(c));
    }
    if let Some(c) = client_id {
        out.push_str(",\"clientID\":");
        out.push_str(&q(c));
    }
    out.push_str(",\"from\":");
    out.push_str(&q(from));
    out.push_str(",\"payload\":");
    out.push_str(payload);
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    mod robustness {
        use super::*;
        use proptest::prelude::*;

        fn check(text: &str) {
            // Must return, never panic; a success must describe a JSON object.
            if let Ok(Frame::Telemetry { payload, .. }) = decode_frame(text) {
                let ann = TelemetryAnnotation {
                    received_at: 0.0,
                    stream: "s".into(),
                    verdict: "ok".into(),
                    missing: None,
                    lost_total: 0,
                    age_ms: None,
                    clock_offset_ms: None,
                    clock_uncertainty_ms: None,
                    replay: false,
                };
                let out = encode_forwarded_telemetry("d", payload, &ann);
                serde_json::from_str::<Value>(&out).expect("forwarded frame is JSON");
                serde_json::from_str::<Value>(&mark_replay(&out)).expect("replay frame is JSON");
            }
            let _ = decode(text);
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn arbitrary_text_never_panics(s in ".{0,200}") {
                check(&s);
            }

            #[test]
            fn mutated_valid_frames_never_panic(idx in 0usize..23, cut in 0usize..400, insert in "[{}\\[\\]\",:0-9a-z ]{0,4}") {
                let examples = examples();
                let text = examples[idx % examples.len()].to_string();
                let cut = cut.min(text.len());
                let cut = (0..=cut).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
                let mutated = format!("{}{}{}", &text[..cut], insert, &text[cut..]);
                check(&mutated);
                check(&text[..cut]);
            }
        }
    }

    #[test]
    fn replay_marking_keeps_the_frame_valid() {
        let text = r#"{"type":"telemetry","payload":{"sequence":1,"timestamp":2,"data":{}}}"#;
        let Frame::Telemetry { payload, .. } = decode_frame(text).unwrap() else { panic!() };
        let ann = TelemetryAnnotation {
            received_at: 1.0,
            stream: "s".into(),
            verdict: "ok".into(),
            missing: None,
            lost_total: 0,
            age_ms: None,
            clock_offset_ms: None,
            clock_uncertainty_ms: None,
            replay: false,
        };
        let replay = mark_replay(&encode_forwarded_telemetry("d", payload, &ann));
        let env: Envelope = serde_json::from_str(&replay).unwrap();
        let Body::Telemetry(t) = env.body else { panic!() };
        assert!(t.relay.unwrap().replay);
    }

    #[test]
    fn routed_messages_keep_unknown_payload_fields() {
        let text =
            r#"{"type":"execute_command","correlationID":"c","clientID":"d","payload":{"command":"ls","extra":[1]}}"#;
        let raw = decode_raw(text).unwrap();
        let out = encode_routed("execute_command", Some("c"), Some("d"), "op-\"1", raw.payload);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["payload"]["extra"][0], 1);
        assert_eq!(v["from"], "op-\"1");
        assert_eq!(v["clientID"], "d");
        let env = decode(&out).unwrap();
        assert!(matches!(env.body, Body::ExecuteCommand(_)));
    }

    /// One example per message type; docs/protocol.md shows the same shapes.
    pub(crate) fn examples() -> Vec<Value> {
        vec![
            json!({"type":"auth","payload":{"clientSecret":"s3cret"}}),
            json!({"type":"auth_ok","payload":{"clientID":"dev-1","role":"device","org":"default","relayTime":1.7e12,"pingIntervalMs":20000}}),
            json!({"type":"register","payload":{"name":"Client-1","handshakeKey":"group-default123"}}),
            json!({"type":"registration_pending","payload":{"requestID":"req-1"}}),
            json!({"type":"error","correlationID":"c1","payload":{"code":"unknown_target","message":"no such client"}}),
            json!({"type":"ping","payload":{"t":12.5}}),
            json!({"type":"pong","payload":{"t":12.5,"relayTime":1.7e12}}),
            json!({"type":"time_sync","payload":{"t1":1000.0}}),
            json!({"type":"time_sync_response","payload":{"t1":1000.0,"t2":1500.0,"t3":1501.0}}),
            json!({"type":"telemetry","payload":{"subtype":"sensor_data","sequence":1234,"timestamp":1625049600000u64,"system_time":1625049600000u64,"data":{"gps":{"latitude":37.7749}}}}),
            json!({"type":"telemetry_dropped","payload":{"count":3,"total":10}}),
            json!({"type":"subscribe","correlationID":"s1","payload":{"deviceID":"dev-1"}}),
            json!({"type":"subscribed","payload":{"deviceID":"dev-1","online":true,"replayed":5}}),
            json!({"type":"unsubscribe","payload":{"deviceID":"dev-1"}}),
            json!({"type":"unsubscribed","payload":{"deviceID":"dev-1"}}),
            json!({"type":"webrtc","clientID":"pilot-1","payload":{"subtype":"offer","sessionID":"s-1","sdp":"v=0"}}),
            json!({"type":"execute_command","correlationID":"cmd-1","clientID":"dev-1","payload":{"command":"ls","args":["-l","/tmp"]}}),
            json!({"type":"command_output","correlationID":"cmd-1","payload":{"stdout":"a\n","stderr":"","exitCode":0,"durationMs":3}}),
            json!({"type":"update_client_config","correlationID":"cfg-1","clientID":"dev-1","payload":{"config":{"logLevel":"debug"}}}),
            json!({"type":"reload_config","clientID":"dev-1","payload":{}}),
            json!({"type":"speed_test","clientID":"dev-1","payload":{}}),
            json!({"type":"speed_test_result","payload":{"uploadMbps":12.5,"downloadMbps":30.0,"rttMs":40.0}}),
            json!({"type":"command_progress","correlationID":"cmd-1","payload":{"stream":"stdout","data":"total 8\n","offset":0}}),
            json!({"type":"docker_command","correlationID":"d-1","clientID":"boat-1","payload":{"action":"restart","container":"web"}}),
            json!({"type":"process_command","correlationID":"pc-1","clientID":"boat-1","payload":{"action":"restart","name":"camera"}}),
            json!({"type":"get_client_config","correlationID":"gc-1","clientID":"boat-1","payload":{}}),
            json!({"type":"process_state","payload":{"processes":[{"name":"autopilot","state":"restarting","restarts":2,"lastExit":"exit 3","restartAt":1732200004000.0,"since":1732200000000.0}]}}),
            json!({"type":"log","payload":{"process":"autopilot","stream":"stderr","line":"gps fix lost","timestamp":1732200000123.0}}),
            json!({"type":"safety_stop","payload":{"policy":"hold","reason":"link_lost","timestamp":1732200000000.0,"controller":"ana","late":true}}),
            json!({"type":"command_result","correlationID":"cfg-1","payload":{"ok":true}}),
            json!({"type":"ack","correlationID":"cmd-1","payload":{"status":"queued","queueDepth":3}}),
            json!({"type":"app_command","correlationID":"w1","clientID":"boat-1","payload":{"command":"set_waypoints","data":{"waypoints":[{"latitude":37.7749,"longitude":-122.4194}]}}}),
            json!({"type":"registration_requested","payload":{"requestID":"req-1","name":"Client-1","status":"pending","remoteAddr":"10.0.0.7:5000"}}),
            json!({"type":"registration_decided","payload":{"requestID":"req-1","name":"Client-1","status":"approved","clientID":"dev-1"}}),
            json!({"type":"approve_registration","correlationID":"a1","payload":{"requestID":"req-1","deviceID":"boat-9"}}),
            json!({"type":"reject_registration","payload":{"requestID":"req-1"}}),
            json!({"type":"lease_acquire","payload":{"deviceID":"boat-1","takeover":true}}),
            json!({"type":"lease_release","payload":{"deviceID":"boat-1"}}),
            json!({"type":"lease_heartbeat","payload":{"deviceID":"boat-1"}}),
            json!({"type":"lease_state","payload":{"deviceID":"boat-1","holder":"op-1","holderName":"ana","timeoutMs":10000,"reason":"acquired"}}),
            json!({"type":"presence","payload":{"deviceID":"boat-1","status":"online","lastSeen":1732262400123u64}}),
        ]
    }

    #[test]
    fn every_type_has_an_example_and_fast_decode_matches_serde() {
        let examples = examples();
        for ty in Body::TYPES {
            assert!(examples.iter().any(|e| e["type"] == *ty), "no example for {ty}");
        }
        for ex in examples {
            let text = ex.to_string();
            let fast = decode(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let derived: Envelope = serde_json::from_str(&text).unwrap();
            assert_eq!(serde_json::to_value(&fast).unwrap(), serde_json::to_value(&derived).unwrap());
            assert_eq!(fast.body.type_name(), ex["type"]);
        }
    }

    #[test]
    fn decode_errors_carry_codes_and_correlation() {
        let e = decode("{not json").unwrap_err();
        assert_eq!(e.code(), ErrorCode::MalformedJson);
        let e = decode("[1,2]").unwrap_err();
        assert_eq!(e.code(), ErrorCode::MalformedJson);
        let e = decode(r#"{"payload":{}}"#).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::MissingType);
        let e = decode(r#"{"type":"warp_drive","correlationID":"x"}"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::UnknownType);
        assert_eq!(e.correlation_id.as_deref(), Some("x"));
        let e = decode(r#"{"type":"execute_command","correlationID":"y","payload":{"args":[]}}"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidPayload);
        assert_eq!(e.correlation_id.as_deref(), Some("y"));
    }

    #[test]
    fn payloads_must_be_objects() {
        let e = decode(r#"{"type":"execute_command","clientID":"d","payload":["ls"]}"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidPayload);
        // An explicit null is treated like an absent payload.
        assert!(decode(r#"{"type":"ping","payload":null}"#).is_ok());
    }

    #[test]
    fn from_is_never_taken_from_the_client() {
        let env = decode(r#"{"type":"ping","from":"admin","payload":{}}"#).unwrap();
        assert_eq!(env.from, None);
    }

    #[test]
    fn missing_payload_is_an_empty_object() {
        let env = decode(r#"{"type":"reload_config"}"#).unwrap();
        assert!(matches!(env.body, Body::ReloadConfig(_)));
        assert!(env.to_json().contains("\"payload\":{}"));
    }

    #[test]
    fn telemetry_is_forwarded_byte_for_byte_with_annotation() {
        let text = r#"{"type":"telemetry","payload":{"subtype":"sensor_data","sequence":7,"timestamp":1625049600000,"data":{"v":1.50}}}"#;
        let Frame::Telemetry { header, payload, .. } = decode_frame(text).unwrap() else { panic!() };
        assert_eq!(header.sequence, 7);
        assert_eq!(header.stream_name(), "sensor_data");
        let ann = TelemetryAnnotation {
            received_at: 1.0,
            stream: "sensor_data".into(),
            verdict: "ok".into(),
            missing: None,
            lost_total: 0,
            age_ms: Some(3.5),
            clock_offset_ms: Some(-2.0),
            clock_uncertainty_ms: Some(0.5),
            replay: false,
        };
        let out = encode_forwarded_telemetry("dev-\"1\"", payload, &ann);
        assert!(out.contains(r#""timestamp":1625049600000,"data":{"v":1.50},"relay":{"#), "{out}");
        let env: Envelope = serde_json::from_str(&out).unwrap();
        assert_eq!(env.from.as_deref(), Some("dev-\"1\""));
        let Body::Telemetry(t) = env.body else { panic!() };
        assert_eq!(t.relay, Some(ann));
        assert_eq!(t.sequence, 7);
    }

    #[test]
    fn telemetry_with_relay_field_or_bad_header_is_rejected() {
        let e = decode_frame(r#"{"type":"telemetry","payload":{"sequence":1,"timestamp":1,"relay":{}}}"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidPayload);
        let e = decode_frame(r#"{"type":"telemetry","payload":{"sequence":-1,"timestamp":1}}"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidPayload);
        let e = decode_frame(r#"{"type":"telemetry"}"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidPayload);
        let e = decode_frame(r#"{"type":"telemetry","payload":[1]}"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidPayload);
        // A struct-shaped array must not pass for a payload object.
        let e = decode_frame(r#"{"type":"telemetry","payload":[null,null,5,1.0]}"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidPayload);
        let e = decode_frame(r#"["telemetry",null,null,{"sequence":1,"timestamp":1}]"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::MalformedJson);
    }

    #[test]
    fn empty_payload_object_forwards_validly() {
        // A header needs sequence and timestamp, so build the raw value directly.
        let raw = RawValue::from_string("{ }".into()).unwrap();
        let ann = TelemetryAnnotation {
            received_at: 1.0,
            stream: "s".into(),
            verdict: "ok".into(),
            missing: None,
            lost_total: 0,
            age_ms: None,
            clock_offset_ms: None,
            clock_uncertainty_ms: None,
            replay: true,
        };
        let out = encode_forwarded_telemetry("d", &raw, &ann);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["payload"]["relay"]["replay"], true);
    }
}
