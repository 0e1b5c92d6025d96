//! The JSON HTTP API: authentication (API keys, password login with a session cookie,
//! WebSocket tickets), presence, and the admin API for devices, operators, keys, handshake
//! keys, registrations, permissions, the deny list, limits and the audit log.
//!
//! Every handler authenticates with `Authorization: Bearer <api key>` or the `tether_session`
//! cookie, except the device speed test (`/api/device/speedtest`), which authenticates a device
//! with its secret. Failures are JSON `{"error":{"code","message"}}` with 400, 401, 403, 404,
//! 409, 413, 429 or 503. Admin endpoints answer 403 to pilots.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use serde_json::{Value, json};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use crate::Relay;
use crate::access::Level;
use crate::auth::{self, Identity, Role};
use crate::ops::{self, OpError, audit, require_admin};
use crate::store::{OperatorRole, now_ms, q};

/// Largest body the speed test endpoints send or accept: 64 MiB.
pub const SPEEDTEST_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// What `GET /api/device/speedtest` sends when `bytes` is not given: 1 MiB.
pub const SPEEDTEST_DEFAULT_BYTES: u64 = 1024 * 1024;
/// The download body is this buffer repeated, so a 64 MiB answer costs no 64 MiB allocation.
static SPEEDTEST_CHUNK: [u8; 64 * 1024] = [0; 64 * 1024];

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "tether_session";

impl warp::reject::Reject for OpError {}

/// Turns an [`OpError`] into its JSON response.
pub fn error_response(e: &OpError) -> warp::reply::Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    warp::reply::with_status(warp::reply::json(&json!({"error": {"code": e.code, "message": e.message}})), status)
        .into_response()
}

fn reject(e: OpError) -> Rejection {
    warp::reject::custom(e)
}

fn bearer(h: Option<String>) -> Option<String> {
    let h = h?;
    let (scheme, value) = h.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| value.trim().to_owned()).filter(|v| !v.is_empty())
}

/// Refuses an address blocked for failed authentications (before any bcrypt work); returns
/// the address to charge further failures to.
fn ip_gate(relay: &Relay, ip: Option<String>) -> Result<String, OpError> {
    let ip = ip.unwrap_or_else(|| "unknown".into());
    match relay.limits.ip_blocked_for(&ip) {
        Some(wait) => Err(OpError::rate_limited(format!(
            "too many failed authentications from this address; try again in {:.0} s",
            wait.as_secs_f64().ceil()
        ))),
        None => Ok(ip),
    }
}

/// Authenticates an operator from a bearer API key or the session cookie.
/// Failed keys count toward the caller's address block (`ip`), like failed WebSocket
/// authentications and logins; a blocked address is refused before any bcrypt work.
pub async fn operator_identity(
    relay: &Relay,
    authorization: Option<String>,
    cookie: Option<String>,
    ip: Option<String>,
) -> Result<Identity, OpError> {
    let ip = ip_gate(relay, ip)?;
    let who = if let Some(key) = bearer(authorization) {
        match auth::verify_api_key(&relay.store, &relay.hasher, &key).await {
            Ok(who) => who,
            Err(auth::AuthError::Invalid) => {
                relay.metrics.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                relay.limits.auth_failed(&ip);
                return Err(OpError::unauthorized("the API key is invalid, revoked or expired"));
            }
            Err(auth::AuthError::Store(e)) => return Err(e.into()),
        }
    } else if let Some(token) = cookie.filter(|c| !c.is_empty()) {
        let hash = auth::sha256_hex(&token);
        let h2 = hash.clone();
        let max_age = relay.config.session_lifetime().as_millis() as i64;
        let op = relay.store.call(move |c| q::session_operator(c, &h2, max_age)).await?;
        let Some(op) = op else { return Err(OpError::unauthorized("the session has ended; log in again")) };
        Identity {
            id: op.id,
            org: op.org_id,
            role: op.role.into(),
            name: op.username,
            credential: Some(format!("session:{hash}")),
            ticket: None,
        }
    } else {
        return Err(OpError::unauthorized("send Authorization: Bearer <api key>, or log in"));
    };
    if relay.access.identity_denied(&who, now_ms()) {
        return Err(OpError::unauthorized("this credential is on the deny list"));
    }
    Ok(who)
}

/// Authenticates a device over HTTP: `Authorization: Bearer <clientSecret>` plus
/// `X-Client-ID: <device id>`. A wrong secret counts toward the caller's address block like a
/// failed WebSocket authentication; a blocked address is refused before any bcrypt work.
pub async fn device_identity(
    relay: &Relay,
    authorization: Option<String>,
    client_id: Option<String>,
    ip: Option<String>,
) -> Result<Identity, OpError> {
    let ip = ip_gate(relay, ip)?;
    let (Some(secret), Some(id)) = (bearer(authorization), client_id.filter(|c| !c.is_empty())) else {
        return Err(OpError::unauthorized("send Authorization: Bearer <clientSecret> and X-Client-ID: <device id>"));
    };
    let who = match auth::verify_device(&relay.store, &relay.hasher, &id, &secret).await {
        Ok(who) => who,
        Err(auth::AuthError::Invalid) => {
            relay.metrics.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            relay.limits.auth_failed(&ip);
            return Err(OpError::unauthorized("invalid clientID or clientSecret"));
        }
        Err(auth::AuthError::Store(e)) => return Err(e.into()),
    };
    if relay.access.identity_denied(&who, now_ms()) {
        return Err(OpError::unauthorized("this device is on the deny list"));
    }
    Ok(who)
}

fn with_relay(relay: Arc<Relay>) -> impl Filter<Extract = (Arc<Relay>,), Error = std::convert::Infallible> + Clone {
    warp::any().map(move || relay.clone())
}

/// Extracts the authenticated operator.
pub(crate) fn operator(relay: Arc<Relay>) -> impl Filter<Extract = (Arc<Relay>, Identity), Error = Rejection> + Clone {
    with_relay(relay)
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::cookie::optional::<String>(SESSION_COOKIE))
        .and(crate::routes::peer())
        .and_then(
            |relay: Arc<Relay>, h: Option<String>, c: Option<String>, peer: Option<std::net::SocketAddr>| async move {
                match operator_identity(&relay, h, c, peer.map(|p| p.ip().to_string())).await {
                    Ok(who) => Ok((relay, who)),
                    Err(e) => Err(reject(e)),
                }
            },
        )
        .untuple_one()
}

/// Extracts the authenticated device (see [`device_identity`]).
fn device(relay: Arc<Relay>) -> impl Filter<Extract = (Arc<Relay>, Identity), Error = Rejection> + Clone {
    with_relay(relay)
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::header::optional::<String>("x-client-id"))
        .and(crate::routes::peer())
        .and_then(
            |relay: Arc<Relay>, h: Option<String>, id: Option<String>, peer: Option<std::net::SocketAddr>| async move {
                match device_identity(&relay, h, id, peer.map(|p| p.ip().to_string())).await {
                    Ok(who) => Ok((relay, who)),
                    Err(e) => Err(reject(e)),
                }
            },
        )
        .untuple_one()
}

fn speedtest_too_large() -> OpError {
    OpError {
        status: 413,
        code: "bad_request",
        message: format!("a speed test moves at most {SPEEDTEST_MAX_BYTES} bytes (64 MiB)"),
    }
}

/// `GET /api/device/speedtest?bytes=N`: N bytes of a repeated static buffer, streamed.
async fn speedtest_download(query: HashMap<String, String>, _relay: Arc<Relay>, _who: Identity) -> Res {
    let n = match query.get("bytes") {
        None => SPEEDTEST_DEFAULT_BYTES,
        Some(b) => b.parse::<u64>().map_err(|_| reject(OpError::bad_request("bytes must be a whole number")))?,
    };
    if n > SPEEDTEST_MAX_BYTES {
        return Err(reject(OpError::bad_request(format!(
            "bytes may be at most {SPEEDTEST_MAX_BYTES} (64 MiB); asked for {n}"
        ))));
    }
    let mut left = n;
    let chunks = futures_util::stream::iter(std::iter::from_fn(move || {
        let k = left.min(SPEEDTEST_CHUNK.len() as u64);
        left -= k;
        (k > 0).then(|| Ok::<_, std::convert::Infallible>(bytes::Bytes::from_static(&SPEEDTEST_CHUNK[..k as usize])))
    }));
    let mut resp = warp::reply::stream(chunks).into_response();
    let headers = resp.headers_mut();
    headers.insert(warp::http::header::CONTENT_TYPE, warp::http::HeaderValue::from_static("application/octet-stream"));
    headers.insert(warp::http::header::CONTENT_LENGTH, warp::http::HeaderValue::from(n));
    headers.insert(warp::http::header::CACHE_CONTROL, warp::http::HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// `POST /api/device/speedtest`: reads and discards the body, counting it; answers how many
/// bytes arrived and how long reading them took on the relay.
async fn speedtest_upload<S, B>(_relay: Arc<Relay>, _who: Identity, length: Option<u64>, body: S) -> Res
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Send,
    B: bytes::Buf,
{
    use futures_util::StreamExt;
    // A declared length over the cap is refused before a byte is read.
    if length.is_some_and(|l| l > SPEEDTEST_MAX_BYTES) {
        return Err(reject(speedtest_too_large()));
    }
    let started = Instant::now();
    let mut received: u64 = 0;
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| reject(OpError::bad_request(format!("the body could not be read: {e}"))))?;
        received += chunk.remaining() as u64;
        if received > SPEEDTEST_MAX_BYTES {
            return Err(reject(speedtest_too_large()));
        }
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    ok(json!({"bytes": received, "ms": ms}))
}

/// A JSON body of at most 64 KiB; malformed JSON is a 400 with the parser's explanation.
fn json_body<T: serde::de::DeserializeOwned + Send>() -> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    warp::body::content_length_limit(64 * 1024).and(warp::body::bytes()).and_then(|b: bytes::Bytes| async move {
        let b = if b.is_empty() { bytes::Bytes::from_static(b"{}") } else { b };
        serde_json::from_slice::<T>(&b).map_err(|e| reject(OpError::bad_request(format!("invalid JSON body: {e}"))))
    })
}

type Res = Result<warp::reply::Response, Rejection>;

fn ok(v: Value) -> Res {
    Ok(warp::reply::json(&v).into_response())
}

fn created(v: Value) -> Res {
    Ok(warp::reply::with_status(warp::reply::json(&v), StatusCode::CREATED).into_response())
}

fn opt_secs_to_ms(s: Option<f64>) -> Result<Option<i64>, OpError> {
    match s {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 => Ok(Some(now_ms() + (s * 1000.0) as i64)),
        Some(_) => Err(OpError::bad_request("expiresIn must be a positive number of seconds")),
    }
}

#[derive(Deserialize)]
struct Login {
    username: String,
    password: String,
}

#[derive(Deserialize)]
struct NewDevice {
    name: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    group: Option<String>,
}

#[derive(Deserialize, Default)]
struct Revoke {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default, rename = "expiresIn")]
    expires_in: Option<f64>,
}

#[derive(Deserialize)]
struct Group {
    group: Option<String>,
}

#[derive(Deserialize)]
struct NewOperator {
    username: String,
    #[serde(default = "pilot")]
    role: String,
    #[serde(default)]
    password: Option<String>,
    /// Org-wide level for a pilot (view, control, admin); none when absent.
    #[serde(default)]
    access: Option<String>,
}

fn pilot() -> String {
    "pilot".into()
}

#[derive(Deserialize)]
struct Password {
    password: String,
}

#[derive(Deserialize, Default)]
struct Label {
    #[serde(default)]
    label: Option<String>,
}

#[derive(Deserialize, Default)]
struct NewHandshakeKey {
    #[serde(default)]
    label: Option<String>,
    /// A key chosen by the admin (at least 12 characters); generated when absent.
    #[serde(default)]
    key: Option<String>,
    #[serde(default, rename = "expiresIn")]
    expires_in: Option<f64>,
    #[serde(default)]
    uses: Option<i64>,
}

#[derive(Deserialize, Default)]
struct Approve {
    #[serde(default, rename = "deviceID")]
    device_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct PermissionBody {
    #[serde(rename = "operatorID")]
    operator_id: String,
    scope: String,
    #[serde(default)]
    level: Option<String>,
}

#[derive(Deserialize)]
struct DenyBody {
    subject: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default, rename = "expiresIn")]
    expires_in: Option<f64>,
}

#[derive(Deserialize)]
struct QueueLimits {
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default, rename = "ttlSecs")]
    ttl_secs: Option<i64>,
}

fn validate_scope(scope: &str) -> Result<(), OpError> {
    let ok = scope == "org"
        || scope.strip_prefix("device:").is_some_and(|s| !s.is_empty())
        || scope.strip_prefix("group:").is_some_and(|s| !s.is_empty());
    if ok { Ok(()) } else { Err(OpError::bad_request("scope must be \"org\", \"device:<id>\" or \"group:<name>\"")) }
}

fn deny_kind(subject: &str) -> &'static str {
    if subject.starts_with("key:") {
        "key"
    } else if subject.starts_with("session:") {
        "session"
    } else if subject.starts_with("ticket:") {
        "ticket"
    } else if subject.starts_with("ip:") {
        "ip"
    } else if subject.starts_with("op-") {
        "operator"
    } else {
        "device"
    }
}

/// The session cookie; `Secure` when the relay itself serves TLS.
fn session_cookie(token: &str, max_age: u64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}")
}

/// Deny-list subjects of other organisations are invisible: an admin acts only on their own
/// org's devices, operators, keys and sessions (and on relay-wide `ip:` and `ticket:` subjects).
async fn ensure_subject_in_org(relay: &Relay, who: &Identity, subject: &str) -> Result<(), OpError> {
    if q::is_global_subject(subject) {
        return Ok(());
    }
    let s = subject.to_owned();
    match relay.store.call(move |c| q::subject_org(c, &s)).await? {
        Some(org) if org == who.org => Ok(()),
        _ => Err(OpError::not_found(format!("no device, operator, key or session {subject:?} in your organisation"))),
    }
}

/// Every `/api` route.
pub fn routes(relay: Arc<Relay>) -> BoxedFilter<(warp::reply::Response,)> {
    let op = || operator(relay.clone());
    let r = || with_relay(relay.clone());

    // --- authentication ---------------------------------------------------------------
    let login = warp::path!("api" / "auth" / "login")
        .and(warp::post())
        .and(r())
        .and(crate::routes::peer())
        .and(json_body::<Login>())
        .and_then(|relay: Arc<Relay>, peer: Option<SocketAddr>, body: Login| async move {
            let ip = peer.map(|p| p.ip().to_string()).unwrap_or_default();
            if relay.limits.ip_blocked(&ip) {
                return Err(reject(OpError::rate_limited("too many failed logins from this address; wait a minute")));
            }
            let user = body.username.clone();
            let row = relay.store.call(move |c| q::operator_login(c, &user)).await.map_err(|e| reject(e.into()))?;
            let verified = match row {
                Some((op, Some(hash))) => relay.hasher.verify(body.password, hash).await.then_some(op),
                _ => {
                    relay.hasher.verify(body.password, auth::dummy_hash()).await;
                    None
                }
            };
            let Some(op) = verified else {
                relay.limits.auth_failed(&ip);
                relay.metrics.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(reject(OpError::unauthorized("wrong username or password")));
            };
            let token = auth::random_hex(32);
            let hash = auth::sha256_hex(&token);
            let op_id = op.id.clone();
            let ttl = relay.config.session_lifetime();
            let ttl_ms = ttl.as_millis() as i64;
            relay.store.call(move |c| q::create_session(c, &hash, &op_id, ttl_ms)).await.map_err(|e| reject(e.into()))?;
            let body = json!({"id": op.id, "username": op.username, "role": op.role.as_str(), "org": op.org_id, "expiresIn": ttl.as_secs()});
            let reply = warp::reply::with_header(warp::reply::json(&body), "set-cookie", session_cookie(&token, ttl.as_secs(), relay.config.tls_cert.is_some()));
            Ok::<_, Rejection>(reply.into_response())
        });
    let logout = warp::path!("api" / "auth" / "logout").and(warp::post()).and(op()).and_then(
        |relay: Arc<Relay>, who: Identity| async move {
            if let Some(hash) = who.credential.as_deref().and_then(|c| c.strip_prefix("session:")) {
                let h = hash.to_owned();
                relay.store.call(move |c| q::revoke_session(c, &h)).await.map_err(|e| reject(e.into()))?;
                ops::disconnect(&relay, &format!("session:{hash}"), "logged out");
            }
            let reply = warp::reply::with_header(
                warp::reply::json(&json!({"ok": true})),
                "set-cookie",
                session_cookie("", 0, relay.config.tls_cert.is_some()),
            );
            Ok::<_, Rejection>(reply.into_response())
        },
    );
    let ticket = warp::path!("api" / "auth" / "ws-ticket").and(warp::post()).and(op()).and_then(
        |relay: Arc<Relay>, who: Identity| async move {
            let ticket = relay.tickets.issue(who, Instant::now());
            // Whole seconds, rounded up so a sub-second TTL does not read as 0.
            let ttl = relay.tickets.ttl().as_secs_f64().ceil() as u64;
            ok(json!({"ticket": ticket, "expiresIn": ttl}))
        },
    );
    let revoke_ticket = warp::path!("api" / "auth" / "ws-ticket" / String).and(warp::delete()).and(op()).and_then(
        |ticket: String, relay: Arc<Relay>, who: Identity| async move {
            require_admin(&who).map_err(reject)?;
            let unused = relay.tickets.revoke(&ticket);
            let subject = format!("ticket:{}", auth::sha256_hex(&ticket));
            let closed = ops::disconnect(&relay, &subject, "the ticket was revoked");
            audit(&relay, &who, "ticket.revoke", Some(&subject), json!({"closed": closed})).await;
            ok(json!({"revoked": unused || closed > 0, "closedConnections": closed}))
        },
    );
    let me =
        warp::path!("api" / "me").and(warp::get()).and(op()).and_then(|_relay: Arc<Relay>, who: Identity| async move {
            ok(json!({"id": who.id, "username": who.name, "role": who.role.as_str(), "org": who.org}))
        });
    let console_settings = warp::path!("api" / "console").and(warp::get()).and(op()).and_then(
        |relay: Arc<Relay>, _who: Identity| async move {
            let c = &relay.config;
            ok(json!({
                "mapTiles": c.console.map_tiles,
                "mapAttribution": c.console.map_attribution,
                "staleVideoMs": c.console.stale_video_ms,
                "sessionTtlSecs": c.session_ttl,
            }))
        },
    );

    // --- devices and presence ---------------------------------------------------------
    let devices = warp::path!("api" / "devices").and(warp::get()).and(op()).and_then(|relay: Arc<Relay>, who: Identity| async move {
        let org = who.org.clone();
        let rows = relay.store.call(move |c| q::list_devices(c, &org)).await.map_err(|e| reject(e.into()))?;
        let mut list = Vec::new();
        for d in rows {
            let level = relay.access.level(&relay.store, &who, &d.id).await.map_err(|e| reject(e.into()))?;
            let Some(level) = level else { continue };
            let online = relay.hub.is_online(&d.id);
            let lease = relay.leases.holder(&d.id).map(|(id, name)| json!({"holder": id, "holderName": name}));
            let mut entry = json!({"id": d.id, "name": d.name, "online": online, "lastSeen": d.last_seen, "group": d.group, "access": level.as_str(), "lease": lease});
            if let Value::Object(m) = &mut entry {
                m.extend(crate::fleet::summary(&relay, &d.id, online));
            }
            list.push(entry);
        }
        ok(json!({ "devices": list }))
    });
    let presence = warp::path!("api" / "presence")
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .and(op())
        .and_then(|query: HashMap<String, String>, relay: Arc<Relay>, who: Identity| async move {
            let Some(ids) = query.get("devices") else {
                return Err(reject(OpError::bad_request("give ?devices=a,b")));
            };
            let mut out = serde_json::Map::new();
            for id in ids.split(',').map(str::trim).filter(|s| !s.is_empty()).take(1000) {
                let org = relay.org_of(id).await.map_err(|e| reject(e.into()))?;
                let visible = org.as_deref() == Some(who.org.as_str())
                    && relay.access.level(&relay.store, &who, id).await.map_err(|e| reject(e.into()))?.is_some();
                // Devices the caller cannot see read as offline: existence is not disclosed.
                let state = if visible && relay.hub.is_online(id) { "online" } else { "offline" };
                out.insert(id.to_owned(), json!(state));
            }
            ok(Value::Object(out))
        });
    let create_device =
        warp::path!("api" / "devices").and(warp::post()).and(op()).and(json_body::<NewDevice>()).and_then(
            |relay: Arc<Relay>, who: Identity, body: NewDevice| async move {
                require_admin(&who).map_err(reject)?;
                let id = body.id.unwrap_or_else(|| format!("dev-{}", auth::random_hex(6)));
                let (org, name, group, id2) = (who.org.clone(), body.name.clone(), body.group.clone(), id.clone());
                let secret = relay
                    .store
                    .call(move |c| {
                        let s = auth::issue_device_sync(c, &id2, &org, &name)?;
                        if group.is_some() {
                            q::set_device_group(c, &org, &id2, group.as_deref())?;
                        }
                        Ok(s)
                    })
                    .await
                    .map_err(|e| reject(e.into()))?;
                audit(&relay, &who, "device.create", Some(&id), json!({"name": body.name})).await;
                created(json!({"clientID": id, "clientSecret": secret, "name": body.name}))
            },
        );
    let revoke_device = warp::path!("api" / "devices" / String / "revoke")
        .and(warp::post())
        .and(op())
        .and(json_body::<Revoke>())
        .and_then(|id: String, relay: Arc<Relay>, who: Identity, body: Revoke| async move {
            require_admin(&who).map_err(reject)?;
            let until = opt_secs_to_ms(body.expires_in).map_err(reject)?;
            let org = relay.org_of(&id).await.map_err(|e| reject(e.into()))?;
            if org.as_deref() != Some(who.org.as_str()) {
                return Err(reject(OpError::not_found(format!("no device {id:?}"))));
            }
            // A timed revocation is a deny-list entry (the secret works again afterwards); an
            // open-ended one revokes the secret (a new one is needed: rotate-secret).
            let (o, i, reason) = (who.org.clone(), id.clone(), body.reason.clone());
            match until {
                Some(t) => relay.store.call(move |c| q::add_deny(c, &i, "device", reason.as_deref(), Some(t))).await,
                None => relay.store.call(move |c| q::revoke_device(c, &o, &i).map(|_| ())).await,
            }
            .map_err(|e| reject(e.into()))?;
            relay.access.reload_denies(&relay.store).await.map_err(|e| reject(e.into()))?;
            let closed = ops::disconnect(&relay, &id, "this device's credential was revoked");
            audit(
                &relay,
                &who,
                "device.revoke",
                Some(&id),
                json!({"reason": body.reason, "expiresAt": until, "closed": closed}),
            )
            .await;
            ok(json!({"revoked": id, "closedConnections": closed, "expiresAt": until}))
        });
    let rotate_device = warp::path!("api" / "devices" / String / "rotate-secret").and(warp::post()).and(op()).and_then(
        |id: String, relay: Arc<Relay>, who: Identity| async move {
            require_admin(&who).map_err(reject)?;
            let org = relay.org_of(&id).await.map_err(|e| reject(e.into()))?;
            let exists_here = relay
                .store
                .call({
                    let (id, org_id) = (id.clone(), who.org.clone());
                    move |c| {
                        Ok(c.query_row(
                            "SELECT count(*) FROM devices WHERE id = ?1 AND org_id = ?2",
                            rusqlite::params![id, org_id],
                            |r| r.get::<_, i64>(0),
                        )? > 0)
                    }
                })
                .await
                .map_err(|e| reject(e.into()))?;
            if !exists_here || (org.is_some() && org.as_deref() != Some(who.org.as_str())) {
                return Err(reject(OpError::not_found(format!("no device {id:?}"))));
            }
            let secret = auth::new_device_secret();
            let hash =
                relay.hasher.hash(secret.clone(), auth::MACHINE_SECRET_COST).await.map_err(|e| reject(e.into()))?;
            let i = id.clone();
            relay.store.call(move |c| q::set_device_secret(c, &i, &hash)).await.map_err(|e| reject(e.into()))?;
            let closed = ops::disconnect(&relay, &id, "this device's secret was replaced");
            audit(&relay, &who, "device.rotate_secret", Some(&id), json!({"closed": closed})).await;
            ok(json!({"clientID": id, "clientSecret": secret}))
        },
    );
    let device_group = warp::path!("api" / "devices" / String / "group")
        .and(warp::put())
        .and(op())
        .and(json_body::<Group>())
        .and_then(|id: String, relay: Arc<Relay>, who: Identity, body: Group| async move {
            require_admin(&who).map_err(reject)?;
            let (o, i, g) = (who.org.clone(), id.clone(), body.group.clone());
            let found = relay
                .store
                .call(move |c| q::set_device_group(c, &o, &i, g.as_deref()))
                .await
                .map_err(|e| reject(e.into()))?;
            if !found {
                return Err(reject(OpError::not_found(format!("no device {id:?}"))));
            }
            relay.access.invalidate_device(&id);
            audit(&relay, &who, "device.group", Some(&id), json!({"group": body.group})).await;
            ok(json!({"clientID": id, "group": body.group}))
        });

    // --- operators and keys -----------------------------------------------------------
    let operators = warp::path!("api" / "operators").and(warp::get()).and(op()).and_then(|relay: Arc<Relay>, who: Identity| async move {
        require_admin(&who).map_err(reject)?;
        let org = who.org.clone();
        let rows = relay.store.call(move |c| q::list_operators(c, &org)).await.map_err(|e| reject(e.into()))?;
        let list: Vec<_> = rows
            .into_iter()
            .map(|(o, disabled)| json!({"id": o.id, "username": o.username, "role": o.role.as_str(), "disabled": disabled, "online": relay.hub.is_online(&o.id)}))
            .collect();
        ok(json!({ "operators": list }))
    });
    let create_operator = warp::path!("api" / "operators")
        .and(warp::post())
        .and(op())
        .and(json_body::<NewOperator>())
        .and_then(|relay: Arc<Relay>, who: Identity, body: NewOperator| async move {
            require_admin(&who).map_err(reject)?;
            let role = OperatorRole::parse(&body.role)
                .ok_or_else(|| reject(OpError::bad_request("role must be pilot or admin")))?;
            let access = match body.access.as_deref() {
                None | Some("none") => None,
                Some(l) => Some(
                    Level::parse(l)
                        .ok_or_else(|| reject(OpError::bad_request("access must be view, control, admin or none")))?,
                ),
            };
            if body.username.trim().is_empty() || body.username.len() > 64 {
                return Err(reject(OpError::bad_request("username must be 1-64 characters")));
            }
            let password_hash = match &body.password {
                Some(p) if p.len() < 10 => {
                    return Err(reject(OpError::bad_request("passwords need at least 10 characters")));
                }
                Some(p) => Some(relay.hasher.hash(p.clone(), auth::PASSWORD_COST).await.map_err(|e| reject(e.into()))?),
                None => None,
            };
            let id = format!("op-{}", auth::random_hex(6));
            let (org, id2, username) = (who.org.clone(), id.clone(), body.username.clone());
            let key = relay
                .store
                .call(move |c| {
                    q::create_operator(c, &id2, &org, &username, role)?;
                    if let Some(h) = &password_hash {
                        q::set_password(c, &id2, h)?;
                    }
                    if let Some(level) = access {
                        q::set_permission(c, &id2, "org", level.as_str())?;
                    }
                    auth::issue_api_key_sync(c, &id2, Some("created with the operator"))
                })
                .await
                .map_err(|e| reject(e.into()))?;
            audit(
                &relay,
                &who,
                "operator.create",
                Some(&id),
                json!({"username": body.username, "role": role.as_str(), "access": body.access}),
            )
            .await;
            created(json!({"operatorID": id, "username": body.username, "role": role.as_str(), "apiKey": key}))
        });
    let disable_operator = warp::path!("api" / "operators" / String / "disable").and(warp::post()).and(op()).and_then(
        |id: String, relay: Arc<Relay>, who: Identity| async move {
            require_admin(&who).map_err(reject)?;
            let (o, i) = (who.org.clone(), id.clone());
            if !relay.store.call(move |c| q::disable_operator(c, &o, &i)).await.map_err(|e| reject(e.into()))? {
                return Err(reject(OpError::not_found(format!("no enabled operator {id:?}"))));
            }
            let closed = ops::disconnect(&relay, &id, "this operator was disabled");
            relay.leases.drop_holder(&relay, &id);
            audit(&relay, &who, "operator.disable", Some(&id), json!({"closed": closed})).await;
            ok(json!({"disabled": id, "closedConnections": closed}))
        },
    );
    let set_password = warp::path!("api" / "operators" / String / "password")
        .and(warp::put())
        .and(op())
        .and(json_body::<Password>())
        .and_then(|id: String, relay: Arc<Relay>, who: Identity, body: Password| async move {
            if who.id != id {
                require_admin(&who).map_err(reject)?;
            }
            if body.password.len() < 10 {
                return Err(reject(OpError::bad_request("passwords need at least 10 characters")));
            }
            let hash = relay.hasher.hash(body.password, auth::PASSWORD_COST).await.map_err(|e| reject(e.into()))?;
            let (o, i) = (who.org.clone(), id.clone());
            let found = relay
                .store
                .call(move |c| {
                    Ok(q::find_operator(c, &i)?
                        .filter(|op| op.org_id == o)
                        .map(|op| q::set_password(c, &op.id, &hash))
                        .transpose()?
                        .is_some())
                })
                .await
                .map_err(|e| reject(e.into()))?;
            if !found {
                return Err(reject(OpError::not_found(format!("no operator {id:?}"))));
            }
            audit(&relay, &who, "operator.password", Some(&id), json!({})).await;
            ok(json!({"ok": true}))
        });
    let keys = warp::path!("api" / "keys").and(warp::get()).and(op()).and_then(
        |relay: Arc<Relay>, who: Identity| async move {
            require_admin(&who).map_err(reject)?;
            let org = who.org.clone();
            let rows = relay.store.call(move |c| q::list_api_keys(c, &org)).await.map_err(|e| reject(e.into()))?;
            ok(json!({ "keys": rows }))
        },
    );
    let create_key = warp::path!("api" / "operators" / String / "keys")
        .and(warp::post())
        .and(op())
        .and(json_body::<Label>())
        .and_then(|id: String, relay: Arc<Relay>, who: Identity, body: Label| async move {
            require_admin(&who).map_err(reject)?;
            let (o, i, label) = (who.org.clone(), id.clone(), body.label.clone());
            let key = relay
                .store
                .call(move |c| {
                    let op = q::find_operator(c, &i)?
                        .filter(|op| op.org_id == o)
                        .ok_or_else(|| crate::store::StoreError::NotFound(format!("operator {i:?}")))?;
                    auth::issue_api_key_sync(c, &op.id, label.as_deref())
                })
                .await
                .map_err(|e| reject(e.into()))?;
            audit(&relay, &who, "key.create", Some(&id), json!({"label": body.label})).await;
            created(json!({"apiKey": key}))
        });
    let revoke_key = warp::path!("api" / "keys" / String / "revoke").and(warp::post()).and(op()).and_then(
        |key_id: String, relay: Arc<Relay>, who: Identity| async move {
            require_admin(&who).map_err(reject)?;
            let (o, k) = (who.org.clone(), key_id.clone());
            let owner = relay.store.call(move |c| q::revoke_api_key(c, &o, &k)).await.map_err(|e| reject(e.into()))?;
            if owner.is_none() {
                return Err(reject(OpError::not_found(format!("no live API key {key_id:?}"))));
            }
            let closed = ops::disconnect(&relay, &format!("key:{key_id}"), "the API key was revoked");
            audit(&relay, &who, "key.revoke", Some(&key_id), json!({"operatorID": owner, "closed": closed})).await;
            ok(json!({"revoked": key_id, "closedConnections": closed}))
        },
    );

    // --- handshake keys and registrations ---------------------------------------------
    let handshake_keys = warp::path!("api" / "handshake-keys").and(warp::get()).and(op()).and_then(
        |relay: Arc<Relay>, who: Identity| async move {
            require_admin(&who).map_err(reject)?;
            let org = who.org.clone();
            let rows =
                relay.store.call(move |c| q::list_handshake_keys(c, &org)).await.map_err(|e| reject(e.into()))?;
            ok(json!({ "handshakeKeys": rows }))
        },
    );
    let create_handshake = warp::path!("api" / "handshake-keys")
        .and(warp::post())
        .and(op())
        .and(json_body::<NewHandshakeKey>())
        .and_then(|relay: Arc<Relay>, who: Identity, body: NewHandshakeKey| async move {
            require_admin(&who).map_err(reject)?;
            let key = match body.key {
                Some(k) if k.len() < 12 => {
                    return Err(reject(OpError::bad_request("a chosen handshake key needs at least 12 characters")));
                }
                Some(k) => k,
                None => format!("hk_{}", auth::random_hex(16)),
            };
            if body.uses.is_some_and(|u| u <= 0) {
                return Err(reject(OpError::bad_request("uses must be a positive count")));
            }
            let expires = opt_secs_to_ms(body.expires_in).map_err(reject)?;
            let id = format!("hk-{}", auth::random_hex(6));
            let (o, i, h, label, uses) =
                (who.org.clone(), id.clone(), auth::sha256_hex(&key), body.label.clone(), body.uses);
            relay
                .store
                .call(move |c| q::create_handshake_key(c, &i, &o, &h, label.as_deref(), expires, uses))
                .await
                .map_err(|e| reject(e.into()))?;
            audit(
                &relay,
                &who,
                "handshake_key.create",
                Some(&id),
                json!({"label": body.label, "expiresAt": expires, "uses": body.uses}),
            )
            .await;
            created(json!({"id": id, "key": key, "expiresAt": expires, "usesLeft": body.uses}))
        });
    let rotate_handshake = warp::path!("api" / "handshake-keys" / String / "rotate")
        .and(warp::post())
        .and(op())
        .and_then(|id: String, relay: Arc<Relay>, who: Identity| async move {
            require_admin(&who).map_err(reject)?;
            let key = format!("hk_{}", auth::random_hex(16));
            let (o, i, h) = (who.org.clone(), id.clone(), auth::sha256_hex(&key));
            if !relay.store.call(move |c| q::rotate_handshake_key(c, &o, &i, &h)).await.map_err(|e| reject(e.into()))? {
                return Err(reject(OpError::not_found(format!("no live handshake key {id:?}"))));
            }
            audit(&relay, &who, "handshake_key.rotate", Some(&id), json!({})).await;
            ok(json!({"id": id, "key": key}))
        });
    let revoke_handshake = warp::path!("api" / "handshake-keys" / String / "revoke")
        .and(warp::post())
        .and(op())
        .and_then(|id: String, relay: Arc<Relay>, who: Identity| async move {
            require_admin(&who).map_err(reject)?;
            let (o, i) = (who.org.clone(), id.clone());
            if !relay.store.call(move |c| q::revoke_handshake_key(c, &o, &i)).await.map_err(|e| reject(e.into()))? {
                return Err(reject(OpError::not_found(format!("no live handshake key {id:?}"))));
            }
            audit(&relay, &who, "handshake_key.revoke", Some(&id), json!({})).await;
            ok(json!({"revoked": id}))
        });
    let registrations = warp::path!("api" / "registrations")
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .and(op())
        .and_then(|query: HashMap<String, String>, relay: Arc<Relay>, who: Identity| async move {
            require_admin(&who).map_err(reject)?;
            let (org, status) = (who.org.clone(), query.get("status").cloned());
            let rows = relay
                .store
                .call(move |c| q::list_registrations(c, &org, status.as_deref()))
                .await
                .map_err(|e| reject(e.into()))?;
            ok(json!({ "registrations": rows }))
        });
    let approve = warp::path!("api" / "registrations" / String / "approve")
        .and(warp::post())
        .and(op())
        .and(json_body::<Approve>())
        .and_then(|id: String, relay: Arc<Relay>, who: Identity, body: Approve| async move {
            let reg = ops::approve(&relay, &who, &id, body.device_id, body.name).await.map_err(reject)?;
            ok(serde_json::to_value(reg).unwrap_or_default())
        });
    let reject_reg = warp::path!("api" / "registrations" / String / "reject").and(warp::post()).and(op()).and_then(
        |id: String, relay: Arc<Relay>, who: Identity| async move {
            let reg = ops::reject(&relay, &who, &id).await.map_err(reject)?;
            ok(serde_json::to_value(reg).unwrap_or_default())
        },
    );

    // --- permissions, deny list, limits, audit ----------------------------------------
    let permissions = warp::path!("api" / "permissions").and(warp::get()).and(op()).and_then(
        |relay: Arc<Relay>, who: Identity| async move {
            require_admin(&who).map_err(reject)?;
            let org = who.org.clone();
            let rows = relay.store.call(move |c| q::list_permissions(c, &org)).await.map_err(|e| reject(e.into()))?;
            ok(json!({ "permissions": rows }))
        },
    );
    let set_permission =
        warp::path!("api" / "permissions").and(warp::put()).and(op()).and(json_body::<PermissionBody>()).and_then(
            |relay: Arc<Relay>, who: Identity, body: PermissionBody| async move {
                require_admin(&who).map_err(reject)?;
                validate_scope(&body.scope).map_err(reject)?;
                let level = body
                    .level
                    .as_deref()
                    .and_then(Level::parse)
                    .ok_or_else(|| reject(OpError::bad_request("level must be view, control or admin")))?;
                let (o, op_id, scope) = (who.org.clone(), body.operator_id.clone(), body.scope.clone());
                relay
                    .store
                    .call(move |c| {
                        let op = q::find_operator(c, &op_id)?
                            .filter(|op| op.org_id == o)
                            .ok_or_else(|| crate::store::StoreError::NotFound(format!("operator {op_id:?}")))?;
                        q::set_permission(c, &op.id, &scope, level.as_str())?;
                        Ok(op.id)
                    })
                    .await
                    .map_err(|e| reject(e.into()))
                    .map(|id: String| relay.access.invalidate_operator(&id))?;
                audit(
                    &relay,
                    &who,
                    "permission.set",
                    Some(&body.operator_id),
                    json!({"scope": body.scope, "level": level.as_str()}),
                )
                .await;
                ok(json!({"operatorID": body.operator_id, "scope": body.scope, "level": level.as_str()}))
            },
        );
    let delete_permission =
        warp::path!("api" / "permissions").and(warp::delete()).and(op()).and(json_body::<PermissionBody>()).and_then(
            |relay: Arc<Relay>, who: Identity, body: PermissionBody| async move {
                require_admin(&who).map_err(reject)?;
                let (o, op_id, scope) = (who.org.clone(), body.operator_id.clone(), body.scope.clone());
                let removed = relay
                    .store
                    .call(move |c| match q::find_operator(c, &op_id)?.filter(|op| op.org_id == o) {
                        Some(op) => q::delete_permission(c, &op.id, &scope),
                        None => Ok(false),
                    })
                    .await
                    .map_err(|e| reject(e.into()))?;
                if !removed {
                    return Err(reject(OpError::not_found("no such permission")));
                }
                relay.access.invalidate_operator(&body.operator_id);
                audit(&relay, &who, "permission.delete", Some(&body.operator_id), json!({"scope": body.scope})).await;
                ok(json!({"removed": true}))
            },
        );
    let deny_list = warp::path!("api" / "deny").and(warp::get()).and(op()).and_then(
        |relay: Arc<Relay>, who: Identity| async move {
            require_admin(&who).map_err(reject)?;
            let org = who.org.clone();
            let rows = relay
                .store
                .call(move |c| {
                    let mut mine = Vec::new();
                    for d in q::active_denies(c)? {
                        if q::is_global_subject(&d.subject)
                            || q::subject_org(c, &d.subject)?.as_deref() == Some(org.as_str())
                        {
                            mine.push(d);
                        }
                    }
                    Ok(mine)
                })
                .await
                .map_err(|e| reject(e.into()))?;
            ok(json!({ "deny": rows }))
        },
    );
    let add_deny = warp::path!("api" / "deny").and(warp::post()).and(op()).and(json_body::<DenyBody>()).and_then(
        |relay: Arc<Relay>, who: Identity, body: DenyBody| async move {
            require_admin(&who).map_err(reject)?;
            if body.subject.is_empty()
                || body.subject == who.id
                || who.credential.as_deref() == Some(body.subject.as_str())
            {
                return Err(reject(OpError::bad_request("give a subject other than yourself")));
            }
            ensure_subject_in_org(&relay, &who, &body.subject).await.map_err(reject)?;
            let until = opt_secs_to_ms(body.expires_in).map_err(reject)?;
            let (s, reason) = (body.subject.clone(), body.reason.clone());
            relay
                .store
                .call(move |c| q::add_deny(c, &s, deny_kind(&s), reason.as_deref(), until))
                .await
                .map_err(|e| reject(e.into()))?;
            relay.access.reload_denies(&relay.store).await.map_err(|e| reject(e.into()))?;
            let closed = ops::disconnect(&relay, &body.subject, "access was revoked by an administrator");
            audit(
                &relay,
                &who,
                "deny.add",
                Some(&body.subject),
                json!({"reason": body.reason, "expiresAt": until, "closed": closed}),
            )
            .await;
            created(json!({"subject": body.subject, "expiresAt": until, "closedConnections": closed}))
        },
    );
    let remove_deny = warp::path!("api" / "deny" / String).and(warp::delete()).and(op()).and_then(
        |subject: String, relay: Arc<Relay>, who: Identity| async move {
            require_admin(&who).map_err(reject)?;
            ensure_subject_in_org(&relay, &who, &subject).await.map_err(reject)?;
            let s = subject.clone();
            if !relay.store.call(move |c| q::remove_deny(c, &s)).await.map_err(|e| reject(e.into()))? {
                return Err(reject(OpError::not_found(format!("{subject:?} is not on the deny list"))));
            }
            relay.access.reload_denies(&relay.store).await.map_err(|e| reject(e.into()))?;
            audit(&relay, &who, "deny.remove", Some(&subject), json!({})).await;
            ok(json!({"removed": subject}))
        },
    );
    let set_limits = warp::path!("api" / "limits" / String)
        .and(warp::put())
        .and(op())
        .and(json_body::<Value>())
        .and_then(|id: String, relay: Arc<Relay>, who: Identity, body: Value| async move {
            require_admin(&who).map_err(reject)?;
            let limits = crate::limits::Overrides::from_json(&body).map_err(|e| reject(OpError::bad_request(e)))?;
            let org = relay.org_of(&id).await.map_err(|e| reject(e.into()))?;
            if org.as_deref() != Some(who.org.as_str()) {
                return Err(reject(OpError::not_found(format!("no device or operator {id:?}"))));
            }
            let (i, text) = (id.clone(), (!body.as_object().is_some_and(|o| o.is_empty())).then(|| body.to_string()));
            relay.store.call(move |c| q::set_limits(c, &i, text.as_deref())).await.map_err(|e| reject(e.into()))?;
            audit(&relay, &who, "limits.set", Some(&id), body.clone()).await;
            ok(json!({"id": id, "limits": limits}))
        });
    let queue_limits = warp::path!("api" / "org" / "queue")
        .and(warp::put())
        .and(op())
        .and(json_body::<QueueLimits>())
        .and_then(|relay: Arc<Relay>, who: Identity, body: QueueLimits| async move {
            require_admin(&who).map_err(reject)?;
            if body.limit.is_some_and(|l| l < 0) || body.ttl_secs.is_some_and(|t| t <= 0) {
                return Err(reject(OpError::bad_request("limit must be >= 0 and ttlSecs > 0")));
            }
            let (o, l, t) = (who.org.clone(), body.limit, body.ttl_secs);
            relay.store.call(move |c| q::set_org_queue_limits(c, &o, l, t)).await.map_err(|e| reject(e.into()))?;
            audit(&relay, &who, "org.queue_limits", None, json!({"limit": body.limit, "ttlSecs": body.ttl_secs})).await;
            ok(json!({"limit": body.limit, "ttlSecs": body.ttl_secs}))
        });
    let audit_log = warp::path!("api" / "audit")
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .and(op())
        .and_then(|query: HashMap<String, String>, relay: Arc<Relay>, who: Identity| async move {
            require_admin(&who).map_err(reject)?;
            let limit = query.get("limit").and_then(|l| l.parse::<i64>().ok()).unwrap_or(100).clamp(1, 1000);
            let before = query.get("before").and_then(|b| b.parse::<i64>().ok());
            let org = who.org.clone();
            let rows =
                relay.store.call(move |c| q::list_audit(c, &org, limit, before)).await.map_err(|e| reject(e.into()))?;
            ok(json!({ "entries": rows }))
        });

    // --- devices: link speed test ----------------------------------------------------
    let speedtest_get = warp::path!("api" / "device" / "speedtest")
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .and(device(relay.clone()))
        .and_then(speedtest_download);
    let speedtest_post = warp::path!("api" / "device" / "speedtest")
        .and(warp::post())
        .and(device(relay.clone()))
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::body::stream())
        .and_then(speedtest_upload);

    // Each route is boxed before they are combined: one long `.or()` chain of unboxed
    // filters makes a type so deep that compiling it takes minutes.
    let all: Vec<BoxedFilter<(warp::reply::Response,)>> = vec![
        login.boxed(),
        logout.boxed(),
        ticket.boxed(),
        revoke_ticket.boxed(),
        me.boxed(),
        console_settings.boxed(),
        devices.boxed(),
        presence.boxed(),
        create_device.boxed(),
        revoke_device.boxed(),
        rotate_device.boxed(),
        device_group.boxed(),
        operators.boxed(),
        create_operator.boxed(),
        disable_operator.boxed(),
        set_password.boxed(),
        keys.boxed(),
        create_key.boxed(),
        revoke_key.boxed(),
        handshake_keys.boxed(),
        create_handshake.boxed(),
        rotate_handshake.boxed(),
        revoke_handshake.boxed(),
        registrations.boxed(),
        approve.boxed(),
        reject_reg.boxed(),
        permissions.boxed(),
        set_permission.boxed(),
        delete_permission.boxed(),
        deny_list.boxed(),
        add_deny.boxed(),
        remove_deny.boxed(),
        set_limits.boxed(),
        queue_limits.boxed(),
        audit_log.boxed(),
        speedtest_get.boxed(),
        speedtest_post.boxed(),
    ];
    all.into_iter().reduce(|a, b| a.or(b).unify().boxed()).expect("at least one route")
}

/// The `Role` of an operator identity, for tests and handlers.
pub fn is_admin(who: &Identity) -> bool {
    who.role == Role::Admin
}
