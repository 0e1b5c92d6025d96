//! HTTP routes: health, metrics, the operator API, the WebSocket endpoints and the console.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use crate::conn::{self, Endpoint};
use crate::{Relay, ws};

/// JSON error body: `{"error":{"code":..,"message":..}}`.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> warp::reply::Response {
    warp::reply::with_status(warp::reply::json(&json!({"error": {"code": code, "message": message}})), status)
        .into_response()
}

fn with_relay(relay: Arc<Relay>) -> impl Filter<Extract = (Arc<Relay>,), Error = Infallible> + Clone {
    warp::any().map(move || relay.clone())
}

fn bearer(h: Option<String>) -> Option<String> {
    let h = h?;
    let (scheme, value) = h.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| value.trim().to_owned()).filter(|v| !v.is_empty())
}

/// The TCP peer of a request, whether warp's server or the TLS loop accepted it.
pub fn peer() -> impl Filter<Extract = (Option<SocketAddr>,), Error = Infallible> + Clone {
    warp::addr::remote()
        .and(warp::ext::optional::<crate::tls::PeerAddr>())
        .map(|a: Option<SocketAddr>, p: Option<crate::tls::PeerAddr>| a.or(p.map(|p| p.0)))
}

/// Every route of the relay.
pub fn routes(relay: Arc<Relay>) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let r = || with_relay(relay.clone());
    let auth_header = || warp::header::optional::<String>("authorization");

    let health = warp::path!("health").and(warp::get()).and(r()).then(health);
    let metrics = warp::path!("metrics").and(warp::get()).and(r()).map(|relay: Arc<Relay>| {
        let mut body = relay.metrics.render(relay.hub.counts(), relay.started.elapsed().as_secs_f64());
        if let Some(sfu) = &relay.sfu {
            body.push_str(&crate::media::sfu_metrics(&sfu.stats()));
        }
        warp::reply::with_header(body, "content-type", "text/plain; version=0.0.4").into_response()
    });

    let ws_device = warp::path!("ws")
        .and(ws::upgrade())
        .and(warp::query::<HashMap<String, String>>())
        .and(auth_header())
        .and(peer())
        .and(r())
        .map(
            |up: ws::Upgrade,
             q: HashMap<String, String>,
             auth: Option<String>,
             peer: Option<SocketAddr>,
             relay: Arc<Relay>| {
                let endpoint = Endpoint::Device { client_id: q.get("clientID").cloned(), bearer: bearer(auth) };
                upgrade_into(up, relay, endpoint, peer)
            },
        );
    let ws_admin = warp::path!("ws" / "admin")
        .and(ws::upgrade())
        .and(warp::query::<HashMap<String, String>>())
        .and(peer())
        .and(r())
        .map(|up: ws::Upgrade, q: HashMap<String, String>, peer: Option<SocketAddr>, relay: Arc<Relay>| {
            upgrade_into(up, relay, Endpoint::Operator { ticket: q.get("ticket").cloned() }, peer)
        });
    // The Softlab dialect (relay/src/dialect/softlab.rs): first-message auth, then its codec.
    let ws_softlab = warp::path!("ws" / "connect").and(ws::upgrade()).and(peer()).and(r()).map(
        |up: ws::Upgrade, peer: Option<SocketAddr>, relay: Arc<Relay>| {
            let codec = Arc::new(crate::dialect::softlab::Codec::new());
            upgrade_into(up, relay, Endpoint::Dialect(codec), peer)
        },
    );
    let ws_status = warp::path!("ws" / "status" / String).and(warp::get()).and(r()).then(
        |id: String, relay: Arc<Relay>| async move {
            match crate::ops::registration_status(&relay, &id).await {
                Ok(v) => warp::reply::json(&v).into_response(),
                Err(e) => crate::api::error_response(&e),
            }
        },
    );

    // Matches any method so that unknown paths are 404 (a GET-only filter would turn every
    // non-GET request to an unknown path into a 405).
    // With `--map-tiles`, the tile server's origin is allowed as an image source of the page.
    let img_origin: Arc<Option<String>> =
        Arc::new(relay.config.console.map_tiles.as_deref().and_then(|t| crate::config::tile_origin(t).ok()));
    let console =
        warp::method().and(warp::path::full()).and_then(move |m: warp::http::Method, p: warp::path::FullPath| {
            let img_origin = img_origin.clone();
            async move {
                let path = p.as_str();
                if m != warp::http::Method::GET || path.starts_with("/api/") || !crate::console::has(path) {
                    return Err(warp::reject::not_found());
                }
                Ok(crate::console::serve(path, img_origin.as_deref()))
            }
        });

    health
        .or(metrics)
        .or(ws_admin)
        .or(ws_status)
        .or(ws_softlab)
        .or(ws_device)
        .or(crate::dialect::monitoring::routes(relay.clone()))
        .or(crate::dialect::boat::routes(relay.clone()))
        .or(crate::api::routes(relay.clone()))
        .or(crate::whep::routes(relay.clone()))
        .or(console)
        .recover(recover)
}

pub(crate) fn upgrade_into(
    up: ws::Upgrade,
    relay: Arc<Relay>,
    endpoint: Endpoint,
    peer: Option<SocketAddr>,
) -> warp::reply::Response {
    if relay.shutdown.is_cancelled() {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the relay is shutting down");
    }
    let config = ws::socket_config(relay.config.max_message_size);
    let tasks = relay.tasks.clone();
    up.finish(config, move |socket| tasks.track_future(conn::serve(relay, socket, endpoint, peer))).into_response()
}

async fn health(relay: Arc<Relay>) -> warp::reply::Response {
    let store = tokio::time::timeout(Duration::from_secs(3), relay.store.probe()).await;
    let (store_ok, store_detail) = match store {
        Ok(Ok(())) => (true, json!({"status": "ok"})),
        Ok(Err(e)) => (false, json!({"status": "error", "message": e.to_string()})),
        Err(_) => (false, json!({"status": "error", "message": "store probe timed out"})),
    };
    let shutting_down = relay.shutdown.is_cancelled();
    let healthy = store_ok && !shutting_down;
    let body = json!({
        "status": if healthy { "ok" } else if shutting_down { "shutting_down" } else { "unavailable" },
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": relay.started.elapsed().as_secs_f64(),
        "connections": relay.hub.counts(),
        "store": store_detail,
    });
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

async fn recover(err: Rejection) -> Result<warp::reply::Response, Infallible> {
    if let Some(e) = err.find::<crate::ops::OpError>() {
        return Ok(crate::api::error_response(e));
    }
    if err.find::<warp::reject::LengthRequired>().is_some() {
        return Ok(json_error(
            StatusCode::LENGTH_REQUIRED,
            "bad_request",
            "send a JSON body (at least {}) with a Content-Length",
        ));
    }
    if let Some(e) = err.find::<warp::reject::PayloadTooLarge>() {
        return Ok(json_error(StatusCode::PAYLOAD_TOO_LARGE, "bad_request", &e.to_string()));
    }
    if err.is_not_found() {
        return Ok(json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"));
    }
    if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        return Ok(json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this endpoint does not accept that method",
        ));
    }
    if let Some(e) = err.find::<warp::reject::InvalidQuery>() {
        return Ok(json_error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()));
    }
    if let Some(e) = err.find::<warp::reject::MissingHeader>() {
        return Ok(json_error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()));
    }
    tracing::debug!("unhandled rejection: {err:?}");
    Ok(json_error(StatusCode::BAD_REQUEST, "bad_request", "the request could not be handled"))
}
