//! Operators log in with a username and password and get an HttpOnly session cookie; the
//! cookie works for the API and for WebSocket tickets until logout.

mod common;
use common::*;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn password_login_session_cookie_and_logout() {
    let r = start_relay().await;
    let (s, op) = admin_call(
        &r,
        Method::POST,
        "/api/operators",
        Some(json!({"username":"ana","role":"pilot","password":"correct horse battery","access":"view"})),
    )
    .await;
    assert_eq!(s, 201, "{op}");
    let (s, e) =
        admin_call(&r, Method::POST, "/api/operators", Some(json!({"username":"bob","password":"short"}))).await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("bad_request")));

    let http = reqwest::Client::new();
    let bad = http
        .post(r.http("/api/auth/login"))
        .json(&json!({"username":"ana","password":"wrong password!"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    let ok = http
        .post(r.http("/api/auth/login"))
        .json(&json!({"username":"ana","password":"correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let cookie = ok.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let token = cookie.split(';').next().unwrap().to_owned();

    let me: serde_json::Value =
        http.get(r.http("/api/me")).header("cookie", &token).send().await.unwrap().json().await.unwrap();
    assert_eq!((me["username"].as_str(), me["role"].as_str()), (Some("ana"), Some("pilot")));
    let t: serde_json::Value =
        http.post(r.http("/api/auth/ws-ticket")).header("cookie", &token).send().await.unwrap().json().await.unwrap();
    let mut ws = Client::connect(&r.ws_url(&format!("/ws/admin?ticket={}", t["ticket"].as_str().unwrap())), None).await;
    assert_eq!(ws.recv().await["payload"]["clientID"], op["operatorID"]);

    let out = http.post(r.http("/api/auth/logout")).header("cookie", &token).send().await.unwrap();
    assert_eq!(out.status(), 200);
    assert!(out.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    assert_eq!(ws.recv_type("error").await["payload"]["code"], "revoked", "the session's sockets close at logout");
    let after = http.get(r.http("/api/me")).header("cookie", &token).send().await.unwrap();
    assert_eq!(after.status(), 401);
    r.stop().await;
}

#[tokio::test]
async fn admin_api_errors_are_json_with_the_right_status() {
    let r = start_relay().await;
    let pilot = r.create_pilot("pia", Some("view"));
    let cases: Vec<(Method, &str, Option<&str>, Option<serde_json::Value>, u16, &str)> = vec![
        (Method::GET, "/api/operators", None, None, 401, "auth_failed"),
        (Method::GET, "/api/operators", Some(&pilot), None, 403, "forbidden"),
        (
            Method::POST,
            "/api/operators",
            Some(&r.admin_key),
            Some(json!({"username":"x","role":"king"})),
            400,
            "bad_request",
        ),
        (Method::POST, "/api/devices/nope/revoke", Some(&r.admin_key), Some(json!({})), 404, "not_found"),
        (
            Method::PUT,
            "/api/permissions",
            Some(&r.admin_key),
            Some(json!({"operatorID":"op-pia","scope":"planet:mars","level":"view"})),
            400,
            "bad_request",
        ),
        (
            Method::PUT,
            "/api/permissions",
            Some(&r.admin_key),
            Some(json!({"operatorID":"op-nobody","scope":"org","level":"view"})),
            404,
            "not_found",
        ),
        (Method::POST, "/api/handshake-keys", Some(&r.admin_key), Some(json!({"key":"short"})), 400, "bad_request"),
    ];
    for (m, path, key, body, status, code) in cases {
        let (s, v) = call(&r, m.clone(), path, key, body).await;
        assert_eq!((s, v["error"]["code"].as_str()), (status, Some(code)), "{m} {path}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    // Malformed JSON bodies are explained.
    let resp = reqwest::Client::new()
        .post(r.http("/api/operators"))
        .bearer_auth(&r.admin_key)
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("invalid JSON"));
    // Creating things works and shows up.
    let (s, d) = admin_call(&r, Method::POST, "/api/devices", Some(json!({"name":"Rover","id":"rover-1"}))).await;
    assert_eq!((s, d["clientID"].as_str()), (201, Some("rover-1")));
    let (s, _) = admin_call(&r, Method::POST, "/api/devices", Some(json!({"name":"Rover","id":"rover-1"}))).await;
    assert_eq!(s, 409);
    let (_, ops) = admin_call(&r, Method::GET, "/api/operators", None).await;
    assert_eq!(ops["operators"].as_array().unwrap().len(), 2);
    let (s, k) = admin_call(&r, Method::POST, "/api/operators/op-pia/keys", Some(json!({"label":"laptop"}))).await;
    assert_eq!(s, 201);
    assert!(k["apiKey"].as_str().unwrap().starts_with("tk_"));
    let (_, keys) = admin_call(&r, Method::GET, "/api/keys", None).await;
    assert_eq!(keys["keys"].as_array().unwrap().len(), 3);
    assert!(!keys.to_string().contains(k["apiKey"].as_str().unwrap()), "keys are never listed");
    r.stop().await;
}
