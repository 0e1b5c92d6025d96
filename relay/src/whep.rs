//! WHEP (WebRTC-HTTP Egress Protocol, RFC 9725): standard players (GStreamer's `whepsrc`, OBS,
//! ffmpeg builds with WHEP) watch a device through the SFU.
//!
//! - `POST /whep/<device>` with `Authorization: Bearer <api key>` (an operator with `view` on the
//!   device) and an SDP offer (`Content-Type: application/sdp`) -> `201 Created`, the answer SDP
//!   with the relay's candidates in it (WHEP players do not need to trickle), and
//!   `Location: /whep/<device>/<session>`.
//! - `DELETE /whep/<device>/<session>` with the same kind of credential -> `204`.
//! - `PATCH` (trickle ICE, ICE restart) is not supported: `405`, as the RFC allows.
//!
//! Errors are JSON `{"error":{"code","message"}}`: `401` `auth_failed`, `403` `forbidden`, `404`
//! `not_found` (no such device or session), `415` `bad_request` (not `application/sdp`), `400`
//! `bad_request` (an offer the SFU cannot answer), `503` `target_offline` (the device is not
//! connected) or `sfu_unavailable` (no SFU, or the device did not publish in time).

use std::sync::Arc;

use ::media::sfu::{DeviceKey, SfuError, SubscribeOptions};
use bytes::Bytes;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::{Filter, Reply};

use crate::Relay;
use crate::access::Level;
use crate::auth::Identity;
use crate::ops::OpError;
use crate::store::q;

/// The largest offer accepted.
const MAX_OFFER_BYTES: u64 = 64 * 1024;

/// One WHEP viewer: who opened it, for which device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhepSession {
    /// The device watched.
    pub device: String,
    /// The organisation.
    pub org: String,
    /// The operator who opened it.
    pub operator: String,
}

fn err(status: u16, code: &'static str, message: impl Into<String>) -> OpError {
    OpError { status, code, message: message.into() }
}

/// The WHEP routes.
pub fn routes(relay: Arc<Relay>) -> BoxedFilter<(warp::reply::Response,)> {
    let post = warp::path!("whep" / String)
        .and(warp::post())
        .and(crate::api::operator(relay.clone()))
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::body::content_length_limit(MAX_OFFER_BYTES))
        .and(warp::body::bytes())
        .then(|device: String, relay: Arc<Relay>, who: Identity, ctype: Option<String>, body: Bytes| async move {
            match open(&relay, &who, &device, ctype, body).await {
                Ok((id, answer)) => warp::http::Response::builder()
                    .status(StatusCode::CREATED)
                    .header("content-type", "application/sdp")
                    .header("location", format!("/whep/{device}/{id}"))
                    .body(answer.into())
                    .unwrap_or_default(),
                Err(e) => crate::api::error_response(&e),
            }
        });
    let delete = warp::path!("whep" / String / String)
        .and(warp::delete())
        .and(crate::api::operator(relay.clone()))
        .then(|device: String, id: String, relay: Arc<Relay>, who: Identity| async move {
            match close(&relay, &who, &device, &id).await {
                Ok(()) => StatusCode::NO_CONTENT.into_response(),
                Err(e) => crate::api::error_response(&e),
            }
        });
    let patch = warp::path!("whep" / String / String).and(warp::patch()).map(|_: String, _: String| {
        crate::api::error_response(&err(
            405,
            "method_not_allowed",
            "this WHEP server does not take trickled candidates or ICE restarts: its answer carries all its candidates",
        ))
    });
    post.or(delete).unify().or(patch).unify().boxed()
}

async fn open(
    relay: &Arc<Relay>,
    who: &Identity,
    device: &str,
    ctype: Option<String>,
    body: Bytes,
) -> Result<(String, String), OpError> {
    if !ctype.as_deref().is_some_and(|c| c.trim().to_ascii_lowercase().starts_with("application/sdp")) {
        return Err(err(415, "bad_request", "send the SDP offer with Content-Type: application/sdp"));
    }
    let offer = std::str::from_utf8(&body).map_err(|_| OpError::bad_request("the offer is not UTF-8 text"))?;
    if !offer.trim_start().starts_with("v=0") {
        return Err(OpError::bad_request("the body is not an SDP offer (it must start with v=0)"));
    }
    authorize(relay, who, device).await?;
    let Some(sfu) = relay.sfu.clone() else {
        return Err(err(503, "sfu_unavailable", "this relay runs without its SFU (--no-sfu)"));
    };
    if !relay.hub.is_online(device) {
        return Err(err(503, "target_offline", format!("{device} is not connected")));
    }
    let id = format!("whep-{:032x}", rand::random::<u128>());
    relay
        .whep
        .lock()
        .insert(id.clone(), WhepSession { device: device.to_owned(), org: who.org.clone(), operator: who.id.clone() });
    let key = DeviceKey::new(&who.org, device);
    match sfu.subscribe(&key, &id, offer, SubscribeOptions { gather: true }).await {
        Ok(answer) => {
            tracing::info!(session = %id, %device, operator = %who.id, "WHEP viewer added");
            Ok((id, answer))
        }
        Err(e) => {
            relay.whep.lock().remove(&id);
            Err(match e {
                SfuError::Viewer(e) => OpError::bad_request(format!("the offer cannot be answered: {e}")),
                other => err(503, "sfu_unavailable", other.to_string()),
            })
        }
    }
}

async fn close(relay: &Arc<Relay>, who: &Identity, device: &str, id: &str) -> Result<(), OpError> {
    let owned = relay.whep.lock().get(id).is_some_and(|s| {
        s.device == device && s.org == who.org && (s.operator == who.id || who.role == crate::auth::Role::Admin)
    });
    if !owned {
        return Err(OpError::not_found(format!("no WHEP session {id:?} of yours on {device}")));
    }
    relay.whep.lock().remove(id);
    if let Some(sfu) = &relay.sfu {
        sfu.unsubscribe(id).await;
    }
    Ok(())
}

/// The device must be in the operator's org and the operator must hold `view` on it.
async fn authorize(relay: &Arc<Relay>, who: &Identity, device: &str) -> Result<(), OpError> {
    let id = device.to_owned();
    let found = relay.store.call(move |c| q::device_credentials(c, &id)).await?;
    if found.is_none_or(|(d, _)| d.org_id != who.org) {
        return Err(OpError::not_found(format!("no device {device:?} in your organisation")));
    }
    let level = relay.access.level(&relay.store, who, device).await?;
    if level.is_none_or(|l| l < Level::View) {
        return Err(OpError::forbidden(format!("watching {device} needs view permission")));
    }
    Ok(())
}
