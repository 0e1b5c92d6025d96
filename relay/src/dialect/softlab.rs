//! The Softlab dialect: `GET /ws/connect`, mapped onto the native protocol at the edge.
//!
//! Authentication (first message, within the auth deadline):
//! - `{"auth_key":"tk_...","sender":"my_pc"}`: the master key is an ordinary operator API key;
//!   the connection *is* that operator (its id, org, role, permissions, limits, deny list).
//!   `sender` is a label for this connection, echoed as `client_id`; it never replaces the
//!   relay-set `sender` of forwarded messages, which is the operator id.
//! - `{"device_token":"<clientID>:<clientSecret>"}`: an ordinary device credential, the id and
//!   its secret joined by a colon (the secret is checked against its bcrypt hash, like `/ws`).
//!
//! After that, [`Codec::inbound`] turns every frame into native messages that go through the
//! connection's normal read loop (authorization, rate limits, routing, offline queue), and
//! [`Codec::render`] turns every native message the writer sends into Softlab's shape.
//! docs/protocol.md section "Softlab dialect" has the full mapping.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use signaling::ErrorCode;

use crate::Relay;
use crate::auth::{Identity, Role};
use crate::dialect::{BoxFuture, Inbound};

/// `app_command` name that carries a Softlab passthrough message to a device.
pub const PASSTHROUGH_COMMAND: &str = "softlab";
/// Correlation id prefix (then the device id) of the lease requests the adapter makes on a
/// commander's behalf; their answers are not shown (the `app_command` that follows gets the
/// same verdict).
const LEASE_CORR: &str = "_softlab_lease:";
/// Keys of a Softlab message the relay owns or that must never be forwarded.
const RESERVED: &[&str] = &["target", "sender", "type", "correlationID", "_offline_queued", "auth_key", "device_token"];
/// Native requests a commander may send by naming `type` (routed to `target`).
/// (The routed operator requests, as the native path lists them.)
const REQUESTS: &[&str] = crate::conn::WITH_RESULT;
/// Native device-scoped operations a commander may send by naming `type` (`deviceID` = `target`).
const DEVICE_OPS: &[&str] = &["lease_acquire", "lease_release", "lease_heartbeat", "subscribe", "unsubscribe"];
/// Native replies a worker (device) may send by naming `type`.
const REPLIES: &[&str] = &["command_output", "command_progress", "command_result", "speed_test_result"];
/// Native messages with nothing to say to a Softlab client (its protocol has no such thing).
const SILENT: &[&str] = &[
    "ack",
    "time_sync",
    "lease_state",
    "presence",
    "telemetry_dropped",
    "subscribed",
    "unsubscribed",
    "registration_requested",
    "registration_decided",
];

/// Per-connection state of a Softlab socket.
#[derive(Debug, Default)]
pub struct Codec {
    /// The commander's `sender` label (master keys), echoed as `client_id`.
    label: Mutex<Option<String>>,
    /// Whether the peer authenticated as a device (a worker).
    device: AtomicBool,
    /// Renew a control lease with `lease_acquire` when it was last touched this long ago
    /// (half the relay's lease lifetime); `lease_heartbeat` keeps it alive in between.
    lease_every: Mutex<Duration>,
    /// Devices whose lease this commander took, and when it was last renewed.
    leases: Mutex<HashMap<String, Instant>>,
}

/// The credentials of a first message.
#[derive(Debug, PartialEq)]
pub enum Credentials {
    /// Operator API key plus the connection's label.
    MasterKey { key: String, sender: String },
    /// Device id and secret.
    DeviceToken { client_id: String, secret: String },
}

const MISSING: &str = "auth_key, device_token, or sender (for Master Keys) was missing";

/// Reads the credentials from a first message.
pub fn credentials(text: &str) -> Result<Credentials, String> {
    let Ok(Value::Object(m)) = serde_json::from_str::<Value>(text) else {
        return Err(format!("the first message must be a JSON object: {MISSING}"));
    };
    let s = |k: &str| m.get(k).and_then(Value::as_str).map(str::trim).filter(|v| !v.is_empty());
    if let Some(key) = s("auth_key") {
        let Some(sender) = s("sender") else { return Err(MISSING.into()) };
        if sender.len() > 128 {
            return Err("sender is limited to 128 characters".into());
        }
        return Ok(Credentials::MasterKey { key: key.to_owned(), sender: sender.to_owned() });
    }
    if let Some(token) = s("device_token") {
        return match token.split_once(':') {
            Some((id, secret)) if !id.is_empty() && !secret.is_empty() => {
                Ok(Credentials::DeviceToken { client_id: id.to_owned(), secret: secret.to_owned() })
            }
            _ => Err("invalid device token: it is <clientID>:<clientSecret>".into()),
        };
    }
    Err(MISSING.into())
}

/// Checks a first message's credentials against the store.
async fn authenticate(relay: &Relay, codec: &Codec, text: &str) -> Result<Identity, (ErrorCode, String)> {
    let creds = credentials(text).map_err(|m| (ErrorCode::AuthFailed, m))?;
    match creds {
        Credentials::MasterKey { key, sender } => {
            match crate::auth::verify_api_key(&relay.store, &relay.hasher, &key).await {
                Ok(who) => {
                    *codec.label.lock() = Some(sender);
                    *codec.lease_every.lock() = relay.config.lease_lifetime() / 2;
                    Ok(who)
                }
                Err(crate::auth::AuthError::Invalid) => {
                    Err((ErrorCode::AuthFailed, "the master key is invalid, revoked or expired".into()))
                }
                Err(e) => {
                    tracing::error!("softlab: master key could not be checked: {e}");
                    Err((ErrorCode::Internal, "the relay could not check the key; try again".into()))
                }
            }
        }
        Credentials::DeviceToken { client_id, secret } => {
            match crate::auth::verify_device(&relay.store, &relay.hasher, &client_id, &secret).await {
                Ok(who) => {
                    codec.device.store(who.role == Role::Device, Ordering::Relaxed);
                    Ok(who)
                }
                Err(crate::auth::AuthError::Invalid) => Err((ErrorCode::AuthFailed, "invalid device token".into())),
                Err(e) => {
                    tracing::error!("softlab: device token could not be checked: {e}");
                    Err((ErrorCode::Internal, "the relay could not check the token; try again".into()))
                }
            }
        }
    }
}

fn envelope(ty: &str, corr: Option<&str>, client_id: Option<&str>, payload: Value) -> String {
    let mut m = Map::new();
    m.insert("type".into(), json!(ty));
    if let Some(c) = corr {
        m.insert("correlationID".into(), json!(c));
    }
    if let Some(c) = client_id {
        m.insert("clientID".into(), json!(c));
    }
    m.insert("payload".into(), payload);
    Value::Object(m).to_string()
}

fn corr_of(m: &Map<String, Value>) -> Option<String> {
    m.get("correlationID").and_then(Value::as_str).map(str::to_owned)
}

impl crate::dialect::Codec for Codec {
    fn authenticate<'a>(
        &'a self,
        relay: &'a Relay,
        first: &'a str,
    ) -> BoxFuture<'a, Result<Identity, (ErrorCode, String)>> {
        Box::pin(authenticate(relay, self, first))
    }

    fn inbound(&self, text: &str) -> Inbound {
        self.translate(text)
    }

    fn outbound(&self, native: &str) -> Option<String> {
        self.render(native)
    }
}

impl Codec {
    /// A fresh codec for a new socket.
    pub fn new() -> Self {
        Codec::default()
    }

    /// Translates one Softlab frame from an authenticated connection into native messages.
    fn translate(&self, text: &str) -> Inbound {
        let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(text) else {
            return Inbound::Refuse(ErrorCode::MalformedJson, "messages are JSON objects".into(), None);
        };
        if m.get("action").and_then(Value::as_str) == Some("ping") {
            return Inbound::Native(vec![envelope("ping", None, None, json!({}))]);
        }
        // Credentials are never forwarded (a client library may repeat them).
        m.remove("auth_key");
        m.remove("device_token");
        let Some(target) = m.get("target").and_then(Value::as_str).map(str::to_owned).filter(|t| !t.is_empty()) else {
            return Inbound::Refuse(
                ErrorCode::InvalidPayload,
                "a message needs a target (the client_id it is for), or is {\"action\":\"ping\"}".into(),
                corr_of(&m),
            );
        };
        let corr = corr_of(&m);
        let ty = m.get("type").and_then(Value::as_str).map(str::to_owned);
        let device = self.device.load(Ordering::Relaxed);
        let native_payload = |m: &Map<String, Value>| match m.get("payload") {
            Some(p @ Value::Object(_)) => p.clone(),
            _ => Value::Object(
                m.iter()
                    .filter(|(k, _)| !RESERVED.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
        };
        if let Some(ty) = ty.as_deref().filter(|t| signaling::message::Body::TYPES.contains(t)) {
            let allowed =
                if device { REPLIES.contains(&ty) } else { REQUESTS.contains(&ty) || DEVICE_OPS.contains(&ty) };
            if !allowed {
                let who = if device { "a device" } else { "a commander" };
                return Inbound::Refuse(
                    ErrorCode::NotAllowed,
                    format!("{who} cannot send native {ty:?} messages through the Softlab dialect"),
                    corr,
                );
            }
            if DEVICE_OPS.contains(&ty) {
                let mut p = native_payload(&m);
                if let Value::Object(p) = &mut p {
                    p.insert("deviceID".into(), json!(target));
                }
                return Inbound::Native(vec![envelope(ty, corr.as_deref(), None, p)]);
            }
            return Inbound::Native(vec![envelope(ty, corr.as_deref(), Some(&target), native_payload(&m))]);
        }
        // Passthrough: the whole message, `sender` left to the relay.
        m.remove("sender");
        m.remove("_offline_queued");
        let whole = Value::Object(m);
        if device {
            let p = json!({"ok": true, "data": {"softlab": whole}});
            return Inbound::Native(vec![envelope("command_result", corr.as_deref(), Some(&target), p)]);
        }
        let mut out = Vec::with_capacity(2);
        // app_command needs the control lease: take it (or keep it alive) on the commander's
        // behalf; the native checks decide, and a refusal shows on the app_command itself.
        let lease = {
            let every = *self.lease_every.lock();
            let mut held = self.leases.lock();
            let now = Instant::now();
            let fresh = held.get(&target).is_some_and(|t| now.duration_since(*t) < every);
            held.insert(target.clone(), now);
            if fresh { "lease_heartbeat" } else { "lease_acquire" }
        };
        let lease_corr = format!("{LEASE_CORR}{target}");
        out.push(envelope(lease, Some(&lease_corr), None, json!({"deviceID": target})));
        let no_queue = whole.get("queue") == Some(&Value::Bool(false));
        let mut p = json!({"command": PASSTHROUGH_COMMAND, "data": whole});
        if no_queue {
            // Refuses the offline queue like a native request (`target_offline` at once).
            p["queue"] = Value::Bool(false);
        }
        out.push(envelope("app_command", corr.as_deref(), Some(&target), p));
        Inbound::Native(out)
    }

    /// Renders one native message for the Softlab client; None if Softlab has nothing for it.
    fn render(&self, text: &str) -> Option<String> {
        let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(text) else { return Some(text.to_owned()) };
        let Some(ty) = m.get("type").and_then(Value::as_str).map(str::to_owned) else { return Some(text.to_owned()) };
        let queued = m.get("_offline_queued").and_then(Value::as_bool) == Some(true);
        let corr = m.get("correlationID").and_then(Value::as_str).map(str::to_owned);
        let from = m.get("from").and_then(Value::as_str).map(str::to_owned);
        let payload = m.get("payload").cloned().unwrap_or(Value::Null);
        match ty.as_str() {
            "auth_ok" => {
                let id = self.label.lock().clone().or_else(|| payload["clientID"].as_str().map(str::to_owned));
                return Some(json!({"status": "authenticated", "client_id": id}).to_string());
            }
            "pong" => return Some(json!({"status": "pong"}).to_string()),
            "error" => {
                if let Some(device) = corr.as_deref().and_then(|c| c.strip_prefix(LEASE_CORR)) {
                    // The lease is not ours (any more): take it afresh next time.
                    self.leases.lock().remove(device);
                    return None;
                }
                let mut e = json!({"status": "error", "message": payload["message"], "code": payload["code"]});
                if let Some(c) = corr {
                    e["correlationID"] = json!(c);
                }
                if let Some(r) = payload.get("retryAfterMs") {
                    e["retryAfterMs"] = r.clone();
                }
                return Some(e.to_string());
            }
            t if SILENT.contains(&t) => return None,
            _ => {}
        }
        // Passthrough messages come back whole, with the relay-set sender.
        let inner = match ty.as_str() {
            "app_command" if payload["command"] == PASSTHROUGH_COMMAND => payload.get("data"),
            "command_result" => payload.get("data").and_then(|d| d.get("softlab")),
            _ => None,
        };
        let mut out = match inner {
            Some(Value::Object(o)) => {
                let mut o = o.clone();
                if let Some(c) = corr {
                    o.entry("correlationID").or_insert(json!(c));
                }
                o
            }
            _ => {
                // Any other native message: as it is, with `sender`.
                m.remove("_offline_queued");
                m
            }
        };
        if let Some(f) = from {
            out.insert("sender".into(), json!(f));
        }
        if queued {
            out.insert("_offline_queued".into(), json!(true));
        }
        Some(Value::Object(out).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_both_ways_and_missing() {
        assert_eq!(
            credentials(r#"{"auth_key":"tk_a_b","sender":"my_pc"}"#),
            Ok(Credentials::MasterKey { key: "tk_a_b".into(), sender: "my_pc".into() })
        );
        assert_eq!(
            credentials(r#"{"device_token":"pi-1:abc"}"#),
            Ok(Credentials::DeviceToken { client_id: "pi-1".into(), secret: "abc".into() })
        );
        assert_eq!(credentials(r#"{"auth_key":"tk_a_b"}"#), Err(MISSING.into()));
        assert_eq!(credentials(r#"{}"#), Err(MISSING.into()));
        assert!(credentials(r#"{"device_token":"nocolon"}"#).is_err());
    }

    #[test]
    fn renders_errors_pongs_and_passthrough() {
        let c = Codec::new();
        assert_eq!(c.render(r#"{"type":"pong","payload":{}}"#).unwrap(), r#"{"status":"pong"}"#);
        let e: Value = serde_json::from_str(
            &c.render(r#"{"type":"error","payload":{"code":"auth_failed","message":"no"}}"#).unwrap(),
        )
        .unwrap();
        assert_eq!(e["status"], "error");
        assert_eq!(e["message"], "no");
        assert!(c.render(r#"{"type":"time_sync","payload":{"t1":1}}"#).is_none());
        let p: Value = serde_json::from_str(&c.render(r#"{"_offline_queued":true,"type":"app_command","clientID":"pi","from":"op-1","payload":{"command":"softlab","data":{"target":"pi","speed":100}}}"#).unwrap()).unwrap();
        assert_eq!(p, json!({"target":"pi","speed":100,"sender":"op-1","_offline_queued":true}));
    }
}
