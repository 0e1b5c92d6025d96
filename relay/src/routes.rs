//! HTTP routes: health, metrics, the operator API, the WebSocket endpoints and the console.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use crate::auth::{self, Identity};
use crate::conn::{self, Endpoint};
use crate::store::q;
use crate::{Relay, ws};

/// JSON error body: `{"error":{"code":..,"message":..}}`.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> warp::reply::Response {
    warp::reply::with_status(
        warp::reply::json(&json!({"error": {"code": code, "message": message}})),
        status,
    )
    .into_response()
}

fn with_relay(
    relay: Arc<Relay>,
) -> impl Filter<Extract = (Arc<Relay>,), Error = Infallible> + Clone {
    warp::any().map(move || relay.clone())
}

fn bearer(h: Option<String>) -> Option<String> {
    let h = h?;
    let (scheme, value) = h.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| value.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Every route of the relay.
pub fn routes(
    relay: Arc<Relay>,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let r = || with_relay(relay.clone());
    let auth_header = || warp::header::optional::<String>("authorization");

    let health = warp::path!("health").and(warp::get()).and(r()).then(health);
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(r())
        .map(|relay: Arc<Relay>| {
            let body = relay
                .metrics
                .render(relay.hub.counts(), relay.started.elapsed().as_secs_f64());
            warp::reply::with_header(body, "content-type", "text/plain; version=0.0.4")
                .into_response()
        });

    let ws_device = warp::path!("ws")
        .and(ws::upgrade())
        .and(warp::query::<HashMap<String, String>>())
        .and(auth_header())
        .and(warp::addr::remote())
        .and(r())
        .map(
            |up: ws::Upgrade,
             q: HashMap<String, String>,
             auth: Option<String>,
             peer: Option<SocketAddr>,
             relay: Arc<Relay>| {
                let endpoint = Endpoint::Device {
                    client_id: q.get("clientID").cloned(),
                    bearer: bearer(auth),
                };
                upgrade_into(up, relay, endpoint, peer)
            },
        );
    let ws_admin = warp::path!("ws" / "admin")
        .and(ws::upgrade())
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::addr::remote())
        .and(r())
        .map(
            |up: ws::Upgrade,
             q: HashMap<String, String>,
             peer: Option<SocketAddr>,
             relay: Arc<Relay>| {
                upgrade_into(
                    up,
                    relay,
                    Endpoint::Operator {
                        ticket: q.get("ticket").cloned(),
                    },
                    peer,
                )
            },
        );
    let ws_status = warp::path!("ws" / "status" / String)
        .and(warp::get())
        .map(|_id: String| {
            json_error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no registration request with this id",
            )
        });

    let ticket = warp::path!("api" / "auth" / "ws-ticket")
        .and(warp::post())
        .and(auth_header())
        .and(r())
        .then(|h: Option<String>, relay: Arc<Relay>| async move {
            match operator(&relay, h).await {
                Ok(who) => {
                    let ticket = relay.tickets.issue(who, Instant::now());
                    // Whole seconds, rounded up so a sub-second TTL does not read as 0.
                    let ttl = relay.tickets.ttl().as_secs_f64().ceil() as u64;
                    warp::reply::json(&json!({"ticket": ticket, "expiresIn": ttl})).into_response()
                }
                Err(r) => r,
            }
        });
    let me = warp::path!("api" / "me")
        .and(warp::get())
        .and(auth_header())
        .and(r())
        .then(|h: Option<String>, relay: Arc<Relay>| async move {
            match operator(&relay, h).await {
                Ok(who) => warp::reply::json(&json!({
                    "id": who.id, "username": who.name, "role": who.role.as_str(), "org": who.org
                }))
                .into_response(),
                Err(r) => r,
            }
        });
    let devices = warp::path!("api" / "devices").and(warp::get()).and(auth_header()).and(r()).then(
        |h: Option<String>, relay: Arc<Relay>| async move {
            let who = match operator(&relay, h).await {
                Ok(w) => w,
                Err(r) => return r,
            };
            let org = who.org.clone();
            match relay.store.call(move |c| q::list_devices(c, &org)).await {
                Ok(rows) => {
                    let list: Vec<_> = rows
                        .into_iter()
                        .map(|d| {
                            let online = relay.hub.is_online(&d.id);
                            json!({"id": d.id, "name": d.name, "online": online, "lastSeen": d.last_seen})
                        })
                        .collect();
                    warp::reply::json(&json!({ "devices": list })).into_response()
                }
                Err(e) => {
                    tracing::error!("listing devices failed: {e}");
                    json_error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the device list could not be read")
                }
            }
        },
    );

    // Matches any method so that unknown paths are 404 (a GET-only filter would turn every
    // non-GET request to an unknown path into a 405).
    let console = warp::method().and(warp::path::full()).and_then(
        |m: warp::http::Method, p: warp::path::FullPath| async move {
            let path = p.as_str();
            if m != warp::http::Method::GET
                || path.starts_with("/api/")
                || !crate::console::has(path)
            {
                return Err(warp::reject::not_found());
            }
            Ok(crate::console::serve(path))
        },
    );

    health
        .or(metrics)
        .or(ws_admin)
        .or(ws_status)
        .or(ws_device)
        .or(ticket)
        .or(me)
        .or(devices)
        .or(console)
        .recover(recover)
}

fn upgrade_into(
    up: ws::Upgrade,
    relay: Arc<Relay>,
    endpoint: Endpoint,
    peer: Option<SocketAddr>,
) -> warp::reply::Response {
    if relay.shutdown.is_cancelled() {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the relay is shutting down",
        );
    }
    let config = ws::socket_config(relay.config.max_message_size);
    let tasks = relay.tasks.clone();
    up.finish(config, move |socket| {
        tasks.track_future(conn::serve(relay, socket, endpoint, peer))
    })
    .into_response()
}

/// Authenticates an operator's API key from the `Authorization` header.
async fn operator(
    relay: &Relay,
    header: Option<String>,
) -> Result<Identity, warp::reply::Response> {
    let Some(key) = bearer(header) else {
        return Err(json_error(
            StatusCode::UNAUTHORIZED,
            "auth_failed",
            "send Authorization: Bearer <api key>",
        ));
    };
    match auth::verify_api_key(&relay.store, &relay.hasher, &key).await {
        Ok(who) => Ok(who),
        Err(auth::AuthError::Invalid) => {
            relay
                .metrics
                .auth_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(json_error(
                StatusCode::UNAUTHORIZED,
                "auth_failed",
                "the API key is invalid, revoked or expired",
            ))
        }
        Err(e) => {
            tracing::error!("API key check failed: {e}");
            Err(json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "credentials could not be checked",
            ))
        }
    }
}

async fn health(relay: Arc<Relay>) -> warp::reply::Response {
    let store = tokio::time::timeout(Duration::from_secs(3), relay.store.probe()).await;
    let (store_ok, store_detail) = match store {
        Ok(Ok(())) => (true, json!({"status": "ok"})),
        Ok(Err(e)) => (false, json!({"status": "error", "message": e.to_string()})),
        Err(_) => (
            false,
            json!({"status": "error", "message": "store probe timed out"}),
        ),
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
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

async fn recover(err: Rejection) -> Result<warp::reply::Response, Infallible> {
    if err.is_not_found() {
        return Ok(json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such endpoint",
        ));
    }
    if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        return Ok(json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this endpoint does not accept that method",
        ));
    }
    if let Some(e) = err.find::<warp::reject::InvalidQuery>() {
        return Ok(json_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &e.to_string(),
        ));
    }
    if let Some(e) = err.find::<warp::reject::MissingHeader>() {
        return Ok(json_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &e.to_string(),
        ));
    }
    tracing::debug!("unhandled rejection: {err:?}");
    Ok(json_error(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "the request could not be handled",
    ))
}
