//! Fleet operations shared by the admin HTTP API and the admin WebSocket messages, each
//! recorded in the audit log.

use serde_json::json;
use signaling::message::{Presence, RegistrationEvent};
use signaling::{Envelope, ErrorCode};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::Relay;
use crate::auth::{self, Identity, Role};
use crate::store::{StoreError, q};

/// Why an operation failed, with the HTTP status it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    /// HTTP status.
    pub status: u16,
    /// Stable code.
    pub code: &'static str,
    /// A sentence.
    pub message: String,
}

impl OpError {
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        OpError { status: 400, code: "bad_request", message: message.into() }
    }
    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        OpError { status: 401, code: "auth_failed", message: message.into() }
    }
    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        OpError { status: 403, code: "forbidden", message: message.into() }
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        OpError { status: 404, code: "not_found", message: message.into() }
    }
    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        OpError { status: 409, code: "conflict", message: message.into() }
    }
    /// 429.
    pub fn rate_limited(message: impl Into<String>) -> Self {
        OpError { status: 429, code: "rate_limited", message: message.into() }
    }
    /// 503.
    pub fn unavailable(message: impl Into<String>) -> Self {
        OpError { status: 503, code: "store_unavailable", message: message.into() }
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Exists(what) => OpError::conflict(format!("{what} already exists")),
            StoreError::NotFound(what) => OpError::not_found(format!("{what} not found")),
            e => {
                tracing::error!("store failure: {e}");
                OpError::unavailable("the store could not complete the operation")
            }
        }
    }
}

impl From<OpError> for ErrorCode {
    fn from(e: OpError) -> Self {
        match e.status {
            401 => ErrorCode::AuthFailed,
            403 => ErrorCode::Forbidden,
            404 => ErrorCode::UnknownTarget,
            429 => ErrorCode::RateLimited,
            400 | 409 => ErrorCode::InvalidPayload,
            _ => ErrorCode::Internal,
        }
    }
}

/// Requires the admin role.
pub fn require_admin(who: &Identity) -> Result<(), OpError> {
    if who.role == Role::Admin { Ok(()) } else { Err(OpError::forbidden("this needs an operator with the admin role")) }
}

/// Appends to the audit log; a failure is logged, never fatal to the operation.
pub async fn audit(relay: &Relay, who: &Identity, action: &str, subject: Option<&str>, detail: serde_json::Value) {
    let (org, actor, action, subject) =
        (who.org.clone(), who.id.clone(), action.to_owned(), subject.map(str::to_owned));
    let r =
        relay.store.call(move |c| q::audit(c, Some(&org), &actor, &action, subject.as_deref(), Some(&detail))).await;
    if let Err(e) = r {
        tracing::error!("audit log write failed: {e}");
    }
}

/// Sends an event to every admin connection of `org`.
pub fn notify_admins(relay: &Relay, org: &str, text: String) {
    let text = Utf8Bytes::from(text);
    for c in relay.hub.connections() {
        if c.identity.org == org && c.identity.role == Role::Admin {
            let _ = c.outbox.push_control(text.clone());
        }
    }
}

/// Closes every live connection `subject` concerns (an id, `key:<id>`, `session:<hash>`,
/// `ticket:<hash>`) with `revoked`. Returns how many were closed.
pub fn disconnect(relay: &Relay, subject: &str, why: &str) -> usize {
    let mut n = 0;
    for c in relay.hub.connections() {
        let ip_match = subject.strip_prefix("ip:").is_some_and(|ip| c.peer_ip.as_deref() == Some(ip));
        if c.identity.matches(subject) || ip_match {
            relay.metrics.count_error(ErrorCode::Revoked);
            let _ = c.outbox.push_control(Envelope::error(ErrorCode::Revoked, why, None).to_json());
            c.outbox.close(1008, "revoked");
            n += 1;
        }
    }
    n
}

fn registration_event(r: &q::Registration) -> RegistrationEvent {
    RegistrationEvent {
        request_id: r.id.clone(),
        name: r.name.clone(),
        status: r.status.clone(),
        remote_addr: r.remote_addr.clone(),
        client_id: r.device_id.clone(),
    }
}

/// Records a registration request made with a valid handshake key and tells the org's admins.
pub async fn register(
    relay: &Relay,
    key: &str,
    name: &str,
    remote: Option<String>,
) -> Result<Option<q::Registration>, OpError> {
    let hash = auth::sha256_hex(key);
    let Some((key_id, org)) = relay.store.call(move |c| q::consume_handshake_key(c, &hash)).await? else {
        return Ok(None);
    };
    let id = format!("req-{}", auth::random_hex(16));
    let (name, remote2, org2) = (name.to_owned(), remote.clone(), org.clone());
    let reg = relay
        .store
        .call(move |c| {
            let r = q::create_registration(c, &id, &org2, &key_id, &name, remote2.as_deref())?;
            q::audit(
                c,
                Some(&org2),
                "relay",
                "registration.request",
                Some(&r.id),
                Some(&json!({"name": r.name, "remoteAddr": remote2})),
            )?;
            Ok(r)
        })
        .await?;
    notify_admins(
        relay,
        &org,
        Envelope::new(signaling::Body::RegistrationRequested(registration_event(&reg))).to_json(),
    );
    Ok(Some(reg))
}

/// Approves a pending request, creating the device.
pub async fn approve(
    relay: &Relay,
    who: &Identity,
    request_id: &str,
    device_id: Option<String>,
    name: Option<String>,
) -> Result<q::Registration, OpError> {
    require_admin(who)?;
    let rid = request_id.to_owned();
    let reg = relay.store.call(move |c| q::get_registration(c, &rid)).await?;
    let reg = reg
        .filter(|r| r.org_id == who.org)
        .ok_or_else(|| OpError::not_found(format!("no registration request {request_id:?}")))?;
    if reg.status != "pending" {
        return Err(OpError::conflict(format!("the request is already {}", reg.status)));
    }
    let device_id = device_id.unwrap_or_else(|| format!("dev-{}", auth::random_hex(6)));
    if device_id.is_empty() || device_id.len() > 128 || device_id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(OpError::bad_request("deviceID must be 1-128 characters without spaces"));
    }
    let name = name.unwrap_or(reg.name.clone());
    let (org, rid, actor) = (who.org.clone(), request_id.to_owned(), who.id.clone());
    let updated = relay
        .store
        .call(move |c| q::approve_registration(c, &org, &rid, &device_id, &name, &actor))
        .await?
        .ok_or_else(|| OpError::conflict("the request was decided meanwhile"))?;
    audit(relay, who, "registration.approve", Some(request_id), json!({"clientID": updated.device_id})).await;
    notify_admins(
        relay,
        &who.org,
        Envelope::new(signaling::Body::RegistrationDecided(registration_event(&updated))).to_json(),
    );
    Ok(updated)
}

/// Rejects a pending request.
pub async fn reject(relay: &Relay, who: &Identity, request_id: &str) -> Result<q::Registration, OpError> {
    require_admin(who)?;
    let (org, rid, actor) = (who.org.clone(), request_id.to_owned(), who.id.clone());
    let updated = relay.store.call(move |c| q::reject_registration(c, &org, &rid, &actor)).await?;
    let Some(updated) = updated else {
        let rid = request_id.to_owned();
        let existing = relay.store.call(move |c| q::get_registration(c, &rid)).await?.filter(|r| r.org_id == who.org);
        return Err(match existing {
            Some(r) => OpError::conflict(format!("the request is already {}", r.status)),
            None => OpError::not_found(format!("no registration request {request_id:?}")),
        });
    };
    audit(relay, who, "registration.reject", Some(request_id), json!({})).await;
    notify_admins(
        relay,
        &who.org,
        Envelope::new(signaling::Body::RegistrationDecided(registration_event(&updated))).to_json(),
    );
    Ok(updated)
}

/// What `GET /ws/status/<requestID>` answers. The secret is generated when the device first
/// fetches it after approval and only its hash is stored: it exists in clear only in this
/// one response.
pub async fn registration_status(relay: &Relay, request_id: &str) -> Result<serde_json::Value, OpError> {
    let rid = request_id.to_owned();
    let reg = relay.store.call(move |c| q::get_registration(c, &rid)).await?;
    let Some(reg) = reg else { return Err(OpError::not_found("no registration request with this id")) };
    match reg.status.as_str() {
        "approved" => {
            let device = reg.device_id.clone().unwrap_or_default();
            if reg.secret_issued_at.is_none() {
                let secret = auth::new_device_secret();
                let hash = relay.hasher.hash(secret.clone(), auth::MACHINE_SECRET_COST).await?;
                let (rid, dev) = (reg.id.clone(), device.clone());
                if relay.store.call(move |c| q::issue_registration_secret(c, &rid, &dev, &hash)).await? {
                    return Ok(json!({"status": "approved", "clientID": device, "clientSecret": secret}));
                }
            }
            Ok(json!({"status": "approved", "clientID": device}))
        }
        other => Ok(json!({"status": other})),
    }
}

/// Tells a device's subscribers it came online or went offline.
pub fn announce_presence(relay: &Relay, device: &str, online: bool, last_seen: i64) {
    let p = Presence {
        device_id: device.to_owned(),
        status: if online { "online" } else { "offline" }.into(),
        last_seen: Some(last_seen),
    };
    relay.hub.notify_subscribers(device, Utf8Bytes::from(Envelope::new(p).to_json()));
}
