//! What the relay tells the pilot console: `GET /api/console` (map tiles, stale-video time,
//! session lifetime), the login session lifetime (`--session-ttl`), the map tile origin in the
//! console page's Content-Security-Policy, and the flags' validation.

mod common;
use std::process::Command;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

const TILES: &str = "https://tile.openstreetmap.org/{z}/{x}/{y}.png";

#[tokio::test]
async fn console_settings_follow_the_flags_and_need_an_operator() {
    let r = start_relay_with(|c| {
        c.console.map_tiles = Some(TILES.into());
        c.console.map_attribution = Some("© OpenStreetMap contributors".into());
        c.console.stale_video_ms = 3500;
        c.session_ttl = 600;
    })
    .await;
    let pilot = r.create_pilot("pia", Some("view"));
    let (status, v) = r.get_json("/api/console", Some(&pilot)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        json!({"mapTiles":TILES,"mapAttribution":"© OpenStreetMap contributors","staleVideoMs":3500,"sessionTtlSecs":600})
    );
    let (status, v) = r.get_json("/api/console", None).await;
    assert_eq!((status, v["error"]["code"].as_str()), (401, Some("auth_failed")), "{v}");
    r.stop().await;

    let r = start_relay().await;
    let (_, v) = r.get_json("/api/console", Some(&r.admin_key)).await;
    assert_eq!(v, json!({"mapTiles":null,"mapAttribution":null,"staleVideoMs":2000,"sessionTtlSecs":43200}));
    r.stop().await;
}

#[tokio::test]
async fn session_ttl_sets_the_cookie_and_older_sessions_are_refused() {
    let r = start_relay_with(|c| c.session_ttl = 120).await;
    let (s, _) = admin_call(
        &r,
        Method::POST,
        "/api/operators",
        Some(json!({"username":"ana","role":"pilot","password":"correct horse battery"})),
    )
    .await;
    assert_eq!(s, 201);
    let http = reqwest::Client::new();
    let login = http
        .post(r.http("/api/auth/login"))
        .json(&json!({"username":"ana","password":"correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("; Max-Age=120"), "{cookie}");
    let body: Value = login.json().await.unwrap();
    assert_eq!(body["expiresIn"], 120);
    let token = cookie.split(';').next().unwrap().to_owned();

    let store = &r.running().relay.store;
    let (created, expires): (i64, i64) = store
        .call_sync(|c| {
            Ok(c.query_row("SELECT created_at, expires_at FROM sessions", [], |r| Ok((r.get(0)?, r.get(1)?)))?)
        })
        .unwrap();
    assert_eq!(expires - created, 120_000, "the store records the session's end");
    let me = |token: String| {
        let http = http.clone();
        let url = r.http("/api/me");
        async move { http.get(url).header("cookie", token).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(me(token.clone()).await, 200);

    // Age the session past the TTL (its recorded expiry untouched): the relay refuses it.
    store.call_sync(|c| Ok(c.execute("UPDATE sessions SET created_at = created_at - 121000", [])?)).unwrap();
    assert_eq!(me(token.clone()).await, 401, "a session older than --session-ttl is refused");
    // And one whose recorded expiry passed.
    store
        .call_sync(|c| Ok(c.execute("UPDATE sessions SET created_at = ?1, expires_at = ?1 - 1", [now_ms() as i64])?))
        .unwrap();
    assert_eq!(me(token).await, 401);
    r.stop().await;
}

fn index_file() -> Vec<u8> {
    std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../client-web/index.html")).unwrap()
}

async fn served_index(r: &TestRelay) -> Vec<u8> {
    let resp = reqwest::get(r.http("/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap().to_vec()
}

#[tokio::test]
async fn map_tile_origin_is_added_to_the_pages_img_src() {
    let r = start_relay().await;
    assert_eq!(served_index(&r).await, index_file(), "without --map-tiles the page is served as it is");
    r.stop().await;

    let r = start_relay_with(|c| c.console.map_tiles = Some(TILES.into())).await;
    let page = String::from_utf8(served_index(&r).await).unwrap();
    let file = String::from_utf8(index_file()).unwrap();
    assert!(file.contains("img-src 'self' data:;"), "the page's policy has the expected img-src");
    assert_eq!(page, file.replacen("img-src 'self' data:", "img-src 'self' data: https://tile.openstreetmap.org", 1));
    // Only the page: other files are untouched.
    let css = reqwest::get(r.http("/style.css")).await.unwrap().bytes().await.unwrap();
    assert_eq!(&css[..], &std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../client-web/style.css")).unwrap()[..]);
    r.stop().await;
}

#[tokio::test]
async fn a_bad_tile_url_stops_the_relay_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let config = relay::RelayConfig {
        port: 0,
        bind: "127.0.0.1".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        console: relay::config::ConsoleConfig {
            map_tiles: Some("ftp://tiles.example/{z}/{x}/{y}.png".into()),
            ..Default::default()
        },
        ..relay::RelayConfig::default()
    };
    let err = relay::start(config).await.expect_err("a bad tile URL is refused");
    assert!(err.to_string().contains("http:// or https://"), "{err}");
}

/// The binary, with the environment variables of the flags under test cleared.
fn relay_cmd(dir: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tether-relay"));
    for v in ["TETHER_MAP_TILES", "TETHER_MAP_ATTRIBUTION", "STALE_VIDEO_MS", "SESSION_TTL", "PORT", "TETHER_DB"] {
        c.env_remove(v);
    }
    c.arg("--data-dir").arg(dir).args(["--port", "0", "--bind", "127.0.0.1"]);
    c
}

#[test]
fn flags_are_validated_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], Option<&str>, &str); 6] = [
        (&["--map-tiles", "ftp://tiles.example/{z}/{x}/{y}.png"], None, "must start with http:// or https://"),
        (&["--map-tiles", "https://tiles.example/{z}/{x}.png"], None, "{y} is missing"),
        (&["--map-tiles", "https://evil.example; script-src *;/{z}/{x}/{y}"], None, "may not contain"),
        (&[], Some("https:///{z}/{x}/{y}.png"), "host name is missing"),
        (&["--session-ttl", "59"], None, "59 is not in 60..=2592000"),
        (&["--stale-video-ms", "100"], None, "100 is not in 200..=60000"),
    ];
    for (args, env, expected) in cases {
        let mut c = relay_cmd(dir.path());
        c.args(args);
        if let Some(v) = env {
            c.env("TETHER_MAP_TILES", v);
        }
        // `init` exits at once should a case be accepted, instead of serving until killed.
        let out = c.arg("init").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {env:?} was accepted");
        assert!(stderr.contains(expected), "{args:?} {env:?}: {stderr}");
    }
}
