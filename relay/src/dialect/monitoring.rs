//! The monitoring-agent dialect (docs/protocol.md, "Monitoring agent dialect").
//!
//! - `GET /api/v1/agents/ws`: a server-monitoring agent. `{"type":"auth","api_key":"<clientID>:<clientSecret>"}`
//!   authenticates it as the Tether device `<clientID>`; its `metrics` become native `telemetry`
//!   (stream `metrics`, subtype `system_metrics`, sequence numbers assigned here); native
//!   `execute_command` / `docker_command` reach it as `command` / `docker_command`, and its
//!   `command_response` / `docker_response` go back as `command_output` / `command_result`, the
//!   `command_id` being the native `correlationID`.
//! - `GET /api/v1/ws/metrics/<server_id>` and `/api/v1/ws/logs/<server_id>`: browsers.
//!   `{"type":"auth","token":"<operator API key or one-time ticket>"}`, then a native `subscribe`
//!   (view permission) whose telemetry or log lines are rendered as `metrics` / `log`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde_json::{Map, Value, json};
use signaling::ErrorCode;
use signaling::message;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use warp::Filter;

use super::{BoxFuture, Codec, Inbound};
use crate::Relay;
use crate::access::Level;
use crate::auth::{self, Identity};
use crate::conn::Endpoint;
use crate::hub::{Delivery, Hub, PendingRequest};
use crate::store::q;

/// The message a refused agent key gets (the seed's wording).
pub const BAD_API_KEY: &str = "Invalid or inactive API key";
/// The message an unreadable or unknown frame gets (the seed's wording).
pub const INVALID_FORMAT: &str = "Invalid message format";

/// The dialect's three WebSocket paths.
pub fn routes(relay: Arc<Relay>) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    let r = move || {
        let relay = relay.clone();
        warp::any().map(move || relay.clone())
    };
    let agent =
        warp::path!("api" / "v1" / "agents" / "ws").and(crate::ws::upgrade()).and(crate::routes::peer()).and(r()).map(
            |up, peer: Option<SocketAddr>, relay: Arc<Relay>| {
                let codec = Arc::new(AgentCodec::default());
                crate::routes::upgrade_into(up, relay, Endpoint::Dialect(codec), peer)
            },
        );
    let metrics = warp::path!("api" / "v1" / "ws" / "metrics" / String)
        .and(crate::ws::upgrade())
        .and(crate::routes::peer())
        .and(r())
        .map(|server: String, up, peer: Option<SocketAddr>, relay: Arc<Relay>| {
            let codec = Arc::new(BrowserCodec { server_id: server, logs: false });
            crate::routes::upgrade_into(up, relay, Endpoint::Dialect(codec), peer)
        });
    let logs = warp::path!("api" / "v1" / "ws" / "logs" / String)
        .and(crate::ws::upgrade())
        .and(crate::routes::peer())
        .and(r())
        .map(|server: String, up, peer: Option<SocketAddr>, relay: Arc<Relay>| {
            let codec = Arc::new(BrowserCodec { server_id: server, logs: true });
            crate::routes::upgrade_into(up, relay, Endpoint::Dialect(codec), peer)
        });
    agent.or(metrics).unify().or(logs).unify()
}

fn parse(text: &str) -> Option<Map<String, Value>> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

fn str_field<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

/// The native error message a frame is answered with: `(code, message, correlationID)`.
fn native_error(v: &Value) -> (String, String, Option<String>) {
    let p = &v["payload"];
    (
        p["code"].as_str().unwrap_or("internal").to_owned(),
        p["message"].as_str().unwrap_or("error").to_owned(),
        v["correlationID"].as_str().map(str::to_owned),
    )
}

/// A server-monitoring agent (`/api/v1/agents/ws`), authenticated as a Tether device.
#[derive(Debug)]
pub struct AgentCodec {
    /// The device, once authenticated.
    me: OnceLock<Identity>,
    /// The hub, to answer requests this dialect cannot express.
    hub: OnceLock<Arc<dyn Hub>>,
    /// The store, to clear a queued request answered `unsupported`.
    store: OnceLock<crate::store::Store>,
    /// The last sequence number assigned to a `metrics` frame on this connection.
    seq: AtomicU64,
    /// This connection's sequence epoch: a reconnect starts a new count.
    epoch: String,
}

impl Default for AgentCodec {
    fn default() -> Self {
        AgentCodec {
            me: OnceLock::new(),
            hub: OnceLock::new(),
            store: OnceLock::new(),
            seq: AtomicU64::new(0),
            epoch: auth::random_hex(4),
        }
    }
}

impl AgentCodec {
    fn metrics(&self, mut m: Map<String, Value>) -> Inbound {
        m.remove("type");
        // The relay stamps the sender itself: a `server_id` in the frame is not trusted.
        m.remove("server_id");
        let iso = m.remove("timestamp");
        let ts = iso
            .as_ref()
            .and_then(Value::as_str)
            .and_then(parse_rfc3339)
            .unwrap_or_else(|| crate::store::now_ms() as f64);
        let sequence = match m.remove("sequence").and_then(|s| s.as_u64()) {
            Some(s) => s,
            None => self.seq.fetch_add(1, Ordering::Relaxed) + 1,
        };
        let payload = json!({
            "subtype": "system_metrics",
            "stream": "metrics",
            "sequence": sequence,
            "epoch": self.epoch,
            "timestamp": ts,
            "system_time": ts,
            "data": Value::Object(m),
        });
        Inbound::Native(vec![json!({"type": "telemetry", "payload": payload}).to_string()])
    }

    /// A request the agent cannot express: the requester gets `command_result` `unsupported`
    /// from the device at once, exactly as if the agent had answered it.
    fn unsupported(&self, ty: &str, corr: Option<&str>, queued: bool) -> Option<String> {
        let (Some(me), Some(hub), Some(corr)) = (self.me.get(), self.hub.get(), corr) else {
            return Some(
                json!({"type": "error", "message": format!("{ty} is not supported by this agent protocol")})
                    .to_string(),
            );
        };
        let payload = json!({"ok": false, "code": "unsupported",
            "error": format!("{} is a monitoring agent: it cannot receive {ty}", me.id)})
        .to_string();
        let raw = serde_json::value::RawValue::from_string(payload).ok();
        let route = hub.reply_route(&me.id, corr);
        hub.mark_answered(&me.id, corr);
        let reply = route.map(|PendingRequest { requester, conn, .. }| {
            let text = message::encode_routed("command_result", Some(corr), Some(&requester), &me.id, raw.as_deref());
            (requester, conn, text)
        });
        let device = me.id.clone();
        let (hub, me) = (hub.clone(), me.clone());
        let send = move || {
            let Some((requester, conn, text)) = reply else { return };
            let sent = conn.is_some_and(|c| hub.send_to_conn(c, Utf8Bytes::from(text.clone())));
            if !sent && let Delivery::NotConnected = hub.send_to(&me.org, &requester, Utf8Bytes::from(text)) {
                tracing::warn!(device = %me.id, %requester, "unsupported-request answer for a disconnected requester dropped");
            }
        };
        // A request delivered from the offline queue stays there until answered: clear it first,
        // so that once the requester has the answer, a reconnect cannot bring the request back.
        match self.store.get().filter(|_| queued) {
            Some(store) => {
                let (store, d, c) = (store.clone(), device, corr.to_owned());
                tokio::spawn(async move {
                    if let Err(e) = store.call(move |s| q::ack_queued(s, &d, &c)).await {
                        tracing::warn!("could not clear an unsupported queued request: {e}");
                    }
                    send();
                });
            }
            None => send(),
        }
        None
    }
}

impl Codec for AgentCodec {
    fn authenticate<'a>(
        &'a self,
        relay: &'a Relay,
        first: &'a str,
    ) -> BoxFuture<'a, Result<Identity, (ErrorCode, String)>> {
        Box::pin(async move {
            let Some(m) = parse(first).filter(|m| str_field(m, "type") == Some("auth")) else {
                return Err((
                    ErrorCode::NotAuthenticated,
                    "Authenticate first: {\"type\":\"auth\",\"api_key\":...}".into(),
                ));
            };
            let Some((id, secret)) = str_field(&m, "api_key").and_then(|k| k.split_once(':')) else {
                return Err((ErrorCode::AuthFailed, BAD_API_KEY.into()));
            };
            match auth::verify_device(&relay.store, &relay.hasher, id, secret).await {
                Ok(who) => {
                    let _ = self.me.set(who.clone());
                    let _ = self.hub.set(relay.hub.clone());
                    let _ = self.store.set(relay.store.clone());
                    Ok(who)
                }
                Err(auth::AuthError::Invalid) => Err((ErrorCode::AuthFailed, BAD_API_KEY.into())),
                Err(e) => {
                    tracing::error!("agent authentication could not be checked: {e}");
                    Err((ErrorCode::Internal, "the relay could not check the API key; try again".into()))
                }
            }
        })
    }

    fn inbound(&self, text: &str) -> Inbound {
        let Some(m) = parse(text) else {
            return Inbound::Refuse(ErrorCode::MalformedJson, INVALID_FORMAT.into(), None);
        };
        let id = str_field(&m, "command_id").map(str::to_owned);
        match str_field(&m, "type") {
            Some("metrics") => self.metrics(m),
            Some("command_response") => {
                let Some(id) = id else {
                    return Inbound::Refuse(ErrorCode::InvalidPayload, INVALID_FORMAT.into(), None);
                };
                let payload = json!({
                    "stdout": str_field(&m, "output").unwrap_or(""),
                    "stderr": str_field(&m, "error").unwrap_or(""),
                    "exitCode": m.get("exit_code").and_then(Value::as_i64),
                    "durationMs": m.get("duration_ms").and_then(Value::as_u64).unwrap_or(0),
                });
                Inbound::Native(vec![
                    json!({"type": "command_output", "correlationID": id, "payload": payload}).to_string(),
                ])
            }
            Some("docker_response") => {
                let Some(id) = id else {
                    return Inbound::Refuse(ErrorCode::InvalidPayload, INVALID_FORMAT.into(), None);
                };
                let ok = m.get("success").and_then(Value::as_bool).unwrap_or(false);
                let msg = str_field(&m, "message").unwrap_or("").to_owned();
                let mut payload = json!({"ok": ok, "data": {"message": msg}});
                if !ok {
                    payload["error"] = json!(msg);
                    payload["code"] = json!("command_failed");
                }
                Inbound::Native(vec![
                    json!({"type": "command_result", "correlationID": id, "payload": payload}).to_string(),
                ])
            }
            Some("log") => {
                let d = m.get("data").and_then(Value::as_object).unwrap_or(&m);
                let level = str_field(d, "level").unwrap_or("INFO").to_ascii_uppercase();
                let stream = if matches!(level.as_str(), "ERROR" | "CRITICAL" | "FATAL" | "WARNING" | "WARN") {
                    "stderr"
                } else {
                    "stdout"
                };
                let ts =
                    str_field(d, "timestamp").and_then(parse_rfc3339).unwrap_or_else(|| crate::store::now_ms() as f64);
                let payload = json!({"process": "agent", "stream": stream, "line": str_field(d, "message").unwrap_or(""),
                    "timestamp": ts, "level": level});
                Inbound::Native(vec![json!({"type": "log", "payload": payload}).to_string()])
            }
            Some("ping" | "heartbeat") => Inbound::Native(vec![json!({"type": "ping"}).to_string()]),
            Some("auth") => Inbound::Refuse(ErrorCode::InvalidPayload, "Already authenticated".into(), None),
            _ => Inbound::Refuse(ErrorCode::UnknownType, INVALID_FORMAT.into(), id),
        }
    }

    fn outbound(&self, native: &str) -> Option<String> {
        let v: Value = serde_json::from_str(native).ok()?;
        let corr = v["correlationID"].as_str();
        let queued = v.get("_offline_queued").is_some();
        let p = &v["payload"];
        let mut out = match v["type"].as_str()? {
            "auth_ok" => {
                json!({"type": "auth_success", "server_id": p["clientID"], "message": "Connected successfully"})
            }
            "execute_command" => {
                let mut command = p["command"].as_str().unwrap_or("").to_owned();
                for a in p["args"].as_array().into_iter().flatten() {
                    command.push(' ');
                    command.push_str(&shell_quote(a.as_str().unwrap_or("")));
                }
                json!({"type": "command", "command_id": corr, "command": command})
            }
            "docker_command" => json!({"type": "docker_command", "command_id": corr, "action": p["action"],
                "container_id": p.get("container").cloned().unwrap_or(Value::Null)}),
            "error" => {
                let (code, message, corr) = native_error(&v);
                let mut e = json!({"type": "error", "message": message, "code": code});
                if let Some(c) = corr {
                    e["command_id"] = json!(c);
                }
                e
            }
            "pong" => json!({"type": "pong"}),
            // Requests a monitoring agent has no words for: answered `unsupported` at once.
            ty @ ("update_client_config"
            | "reload_config"
            | "speed_test"
            | "app_command"
            | "process_command"
            | "get_client_config"
            | "webrtc") => return self.unsupported(ty, corr, queued),
            // Housekeeping (time_sync, lease_state, ack, ...) has no equivalent.
            _ => return None,
        };
        if queued {
            out["_offline_queued"] = json!(true);
        }
        Some(out.to_string())
    }
}

/// Quotes a command argument for the single command string the agent runs.
fn shell_quote(a: &str) -> String {
    if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c)) {
        a.to_owned()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// A browser stream: `/api/v1/ws/metrics/<server_id>` or `/api/v1/ws/logs/<server_id>`.
#[derive(Debug)]
pub struct BrowserCodec {
    /// The device streamed.
    server_id: String,
    /// Log lines rather than metrics.
    logs: bool,
}

impl Codec for BrowserCodec {
    fn authenticate<'a>(
        &'a self,
        relay: &'a Relay,
        first: &'a str,
    ) -> BoxFuture<'a, Result<Identity, (ErrorCode, String)>> {
        Box::pin(async move {
            let Some(token) = parse(first)
                .filter(|m| str_field(m, "type") == Some("auth"))
                .and_then(|m| str_field(&m, "token").map(str::to_owned))
            else {
                return Err((
                    ErrorCode::NotAuthenticated,
                    "Authenticate first: {\"type\":\"auth\",\"token\":...}".into(),
                ));
            };
            let who = match relay.tickets.redeem(&token, Instant::now()) {
                Some(who) => who,
                None => match auth::verify_api_key(&relay.store, &relay.hasher, &token).await {
                    Ok(who) => who,
                    Err(_) => return Err((ErrorCode::AuthFailed, "Invalid or expired token".into())),
                },
            };
            let id = self.server_id.clone();
            let device = relay.store.call(move |c| q::device_credentials(c, &id)).await;
            if !matches!(&device, Ok(Some((d, _))) if d.org_id == who.org) {
                return Err((ErrorCode::UnknownTarget, format!("Server {} not found", self.server_id)));
            }
            match relay.access.level(&relay.store, &who, &self.server_id).await {
                Ok(Some(l)) if l >= Level::View => Ok(who),
                Ok(_) => Err((ErrorCode::Forbidden, format!("Not allowed to view server {}", self.server_id))),
                Err(e) => {
                    tracing::error!("permission lookup failed: {e}");
                    Err((ErrorCode::Internal, "the relay could not check permissions; try again".into()))
                }
            }
        })
    }

    fn after_auth(&self, _who: &Identity) -> Vec<String> {
        vec![
            json!({"type": "subscribe", "correlationID": "stream",
                "payload": {"deviceID": self.server_id, "replay": false, "logs": self.logs}})
            .to_string(),
        ]
    }

    fn inbound(&self, text: &str) -> Inbound {
        match parse(text).as_ref().and_then(|m| str_field(m, "type")) {
            Some("ping" | "heartbeat") => Inbound::Native(vec![json!({"type": "ping"}).to_string()]),
            Some(_) => {
                Inbound::Refuse(ErrorCode::NotAllowed, "This stream only sends; nothing is accepted".into(), None)
            }
            None => Inbound::Refuse(ErrorCode::MalformedJson, INVALID_FORMAT.into(), None),
        }
    }

    fn outbound(&self, native: &str) -> Option<String> {
        let v: Value = serde_json::from_str(native).ok()?;
        let p = &v["payload"];
        let out = match v["type"].as_str()? {
            "subscribed" => {
                json!({"type": "auth_success", "server_id": self.server_id, "message": "Connected successfully"})
            }
            "telemetry" if !self.logs => {
                let mut data = match &p["data"] {
                    Value::Object(m) => m.clone(),
                    Value::Null => Map::new(),
                    other => Map::from_iter([("value".to_owned(), other.clone())]),
                };
                if let Some(ts) = p["timestamp"].as_f64() {
                    data.entry("timestamp").or_insert_with(|| json!(format_rfc3339(ts)));
                }
                json!({"type": "metrics", "server_id": v["from"], "data": data})
            }
            "log" if self.logs => {
                let level = match p["level"].as_str() {
                    Some(l) => l.to_owned(),
                    None if p["stream"] == "stderr" => "ERROR".to_owned(),
                    None => "INFO".to_owned(),
                };
                let ts = p["timestamp"].as_f64().map(format_rfc3339);
                json!({"type": "log", "server_id": v["from"], "data": {"level": level, "message": p["line"],
                    "timestamp": ts, "process": p["process"]}})
            }
            "presence" => {
                let online = p["status"] == "online";
                json!({"type": "alert", "server_id": self.server_id, "data": {
                    "severity": if online { "info" } else { "warning" },
                    "message": format!("Server {} is {}", self.server_id, if online { "online" } else { "offline" }),
                    "timestamp": p["lastSeen"].as_f64().map(format_rfc3339)}})
            }
            "safety_stop" => json!({"type": "alert", "server_id": self.server_id, "data": {
                "severity": "critical", "message": format!("Safety stop: {}", p["reason"].as_str().unwrap_or("")),
                "timestamp": p["timestamp"].as_f64().map(format_rfc3339)}}),
            "error" => {
                let (code, message, _) = native_error(&v);
                json!({"type": "error", "message": message, "code": code})
            }
            "pong" => json!({"type": "pong"}),
            _ => return None,
        };
        Some(out.to_string())
    }
}

/// Parses an RFC 3339 time (`2024-01-01T00:00:00Z`, fractions and offsets allowed) to Unix ms.
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut frac = 0.0;
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        frac = format!("0.{}", &r[..n]).parse::<f64>().ok()?;
        rest = &r[n..];
    }
    let offset_min = match rest {
        "Z" | "z" | "" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let v = o[1..3].parse::<i64>().ok()? * 60 + o[4..6].parse::<i64>().ok()?;
            if o.starts_with('-') { -v } else { v }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset_min * 60;
    Some(secs as f64 * 1000.0 + (frac * 1000.0).round())
}

/// Formats Unix ms as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_rfc3339(ms: f64) -> String {
    let ms = ms.round() as i64;
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, sod) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z", sod / 3600, sod % 3600 / 60, sod % 60)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        assert_eq!(parse_rfc3339("2024-01-01T00:00:00Z"), Some(1_704_067_200_000.0));
        assert_eq!(parse_rfc3339("2024-01-01T01:00:00.250+01:00"), Some(1_704_067_200_250.0));
        assert_eq!(parse_rfc3339("not a time"), None);
        assert_eq!(format_rfc3339(1_704_067_200_250.0), "2024-01-01T00:00:00.250Z");
    }

    #[test]
    fn arguments_are_quoted() {
        assert_eq!(shell_quote("-la"), "-la");
        assert_eq!(shell_quote("a b"), "'a b'");
    }
}
