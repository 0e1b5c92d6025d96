//! Revoking a credential closes its live connections within a second, refuses new ones (until
//! an optional expiry), and every admin action lands in the audit log.

mod common;
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::json;

async fn closed_with_revoked(c: &mut Client) -> Duration {
    let start = Instant::now();
    let e = c.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "revoked", "{e}");
    assert_eq!(u16::from(c.expect_close().await.expect("close frame").code), 1008);
    start.elapsed()
}

#[tokio::test]
async fn a_revoked_operator_key_is_disconnected_within_a_second() {
    let r = start_relay().await;
    let key = r.create_pilot("ana", Some("view"));
    let mut p = r.operator(&key).await;
    let key_id = key.split('_').nth(1).unwrap().to_owned();
    let asked = Instant::now();
    let (s, body) = admin_call(&r, Method::POST, &format!("/api/keys/{key_id}/revoke"), None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["closedConnections"], 1);
    closed_with_revoked(&mut p).await;
    assert!(asked.elapsed() < Duration::from_secs(1), "closed {:?} after the request", asked.elapsed());
    let (s, _) = call(&r, Method::POST, "/api/auth/ws-ticket", Some(&key), None).await;
    assert_eq!(s, 401, "the key gets no new tickets");
    let (_, audit) = admin_call(&r, Method::GET, "/api/audit", None).await;
    assert_eq!(audit["entries"][0]["action"], "key.revoke");
    assert_eq!(audit["entries"][0]["subject"], key_id.as_str());
    r.stop().await;
}

#[tokio::test]
async fn disabling_an_operator_closes_all_its_connections() {
    let r = start_relay().await;
    let key = r.create_pilot("ana", Some("view"));
    let (mut a, mut b) = (r.operator(&key).await, r.operator(&key).await);
    let (s, body) = admin_call(&r, Method::POST, "/api/operators/op-ana/disable", None).await;
    assert_eq!((s, body["closedConnections"].as_u64()), (200, Some(2)));
    closed_with_revoked(&mut a).await;
    closed_with_revoked(&mut b).await;
    r.stop().await;
}

#[tokio::test]
async fn device_revocation_permanent_and_temporary() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let mut dev = r.device("boat-1", &secret).await;
    // Temporary: a deny-list entry with an expiry.
    let (s, _) = admin_call(
        &r,
        Method::POST,
        "/api/devices/boat-1/revoke",
        Some(json!({"expiresIn":0.8,"reason":"maintenance"})),
    )
    .await;
    assert_eq!(s, 200);
    closed_with_revoked(&mut dev).await;
    let mut again = Client::connect(&r.ws_url("/ws?clientID=boat-1"), Some(&secret)).await;
    assert_eq!(again.recv().await["payload"]["code"], "revoked", "refused while denied");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut dev = r.device("boat-1", &secret).await;
    // Permanent: the secret stops working until a new one is issued.
    let (s, _) = admin_call(&r, Method::POST, "/api/devices/boat-1/revoke", Some(json!({}))).await;
    assert_eq!(s, 200);
    closed_with_revoked(&mut dev).await;
    let mut c = Client::connect(&r.ws_url("/ws?clientID=boat-1"), Some(&secret)).await;
    assert_eq!(c.recv().await["payload"]["code"], "auth_failed");
    let (_, fresh) = admin_call(&r, Method::POST, "/api/devices/boat-1/rotate-secret", None).await;
    let _dev = r.device("boat-1", fresh["clientSecret"].as_str().unwrap()).await;
    r.stop().await;
}

#[tokio::test]
async fn deny_list_entries_for_tickets_and_removal() {
    let r = start_relay().await;
    let key = r.create_pilot("ana", Some("view"));
    let ticket = r.ticket(&key).await;
    let mut p = Client::connect(&r.ws_url(&format!("/ws/admin?ticket={ticket}")), None).await;
    assert_eq!(p.recv().await["type"], "auth_ok");
    let (s, body) = admin_call(&r, Method::DELETE, &format!("/api/auth/ws-ticket/{ticket}"), None).await;
    assert_eq!((s, body["closedConnections"].as_u64()), (200, Some(1)));
    closed_with_revoked(&mut p).await;

    // An operator on the deny list: connections closed, new tickets refused, then allowed again.
    let mut p = r.operator(&key).await;
    let (s, _) =
        admin_call(&r, Method::POST, "/api/deny", Some(json!({"subject":"op-ana","reason":"lost laptop"}))).await;
    assert_eq!(s, 201);
    closed_with_revoked(&mut p).await;
    let (s, _) = call(&r, Method::POST, "/api/auth/ws-ticket", Some(&key), None).await;
    assert_eq!(s, 401);
    let (_, list) = admin_call(&r, Method::GET, "/api/deny", None).await;
    assert_eq!(list["deny"][0]["subject"], "op-ana");
    let (s, _) = admin_call(&r, Method::DELETE, "/api/deny/op-ana", None).await;
    assert_eq!(s, 200);
    let _p = r.operator(&key).await;
    // An admin cannot lock themselves out.
    let (_, me) = admin_call(&r, Method::GET, "/api/me", None).await;
    let (s, e) = admin_call(&r, Method::POST, "/api/deny", Some(json!({"subject": me["id"]}))).await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("bad_request")), "{e}");
    r.stop().await;
}

#[tokio::test]
async fn an_admin_cannot_deny_or_see_another_orgs_subjects() {
    let r = start_relay().await;
    r.create_org("rival");
    let secret = r.create_device("boat-1", "default");
    let rival = r.create_operator("mallory", "rival", relay::store::OperatorRole::Admin);
    let mut dev = r.device("boat-1", &secret).await;
    let (s, e) = call(&r, Method::POST, "/api/deny", Some(&rival), Some(json!({"subject":"boat-1"}))).await;
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("not_found")), "{e}");
    let (s, _) = admin_call(&r, Method::POST, "/api/deny", Some(json!({"subject":"boat-1","expiresIn":600}))).await;
    assert_eq!(s, 201);
    closed_with_revoked(&mut dev).await;
    let (_, theirs) = call(&r, Method::GET, "/api/deny", Some(&rival), None).await;
    assert_eq!(theirs["deny"].as_array().unwrap().len(), 0, "another org's entries are invisible");
    let (s, _) = call(&r, Method::DELETE, "/api/deny/boat-1", Some(&rival), None).await;
    assert_eq!(s, 404, "and cannot be removed by it");
    r.stop().await;
}
