//! Cross-dialect (issue 8): a Boat-dialect device's telemetry and video reach the native console.
//!
//! The relay runs in-process on this machine's interface address (Chromium gathers no loopback
//! ICE candidates). The TEST plays a seed-004 boat on `/ws/device/boat-9` with its
//! `Authorization: Bearer <clientSecret>`: flat telemetry at 10 Hz (GPS and battery, sequence
//! from 1), flat `time_sync_response`s to the relay's flat `time_sync`, and, when the console's
//! offer arrives flat, an answer from a `media::rtc::VideoSender` fed by a `media::gst`
//! test pattern (640x480, 15 fps; codec chosen from the offer), sent back flat with `boatId` and
//! no `sessionID` (the seed has none: the relay puts it in the session of the offer), as are its
//! ICE candidates. Meanwhile Debian's chromium, driven by client-web/e2e/boat-dialect.mjs, logs
//! in to the console with the admin key, sees boat-9 online, opens it, sees the sequence advance
//! with verdict `ok`, starts video and decodes frames at 640x480. Screenshots go to
//! target/screenshots/boat-dialect/.
#![cfg(feature = "video")]

mod common;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use media::gst::{Codec, VideoPipeline, VideoSettings};
use media::rtc::{Candidate, PeerEvent, PeerSettings, VideoCodec, VideoSender};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const BOAT: &str = "boat-9";
const WIDTH: u32 = 640;
const HEIGHT: u32 = 480;
const FPS: u32 = 15;

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1000.0
}

/// The address this machine uses for outside traffic (as relay/tests/common/browser.rs finds
/// it); `TETHER_TEST_IP` overrides it.
fn interface_address() -> IpAddr {
    if let Ok(s) = std::env::var("TETHER_TEST_IP") {
        return s.parse().expect("TETHER_TEST_IP is an IP address");
    }
    // Connecting a UDP socket only picks the route and source address; nothing is sent.
    let routed = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("1.1.1.1:53").map(|()| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .ok();
    let listed = || {
        let out = std::process::Command::new("ip")
            .args(["-4", "-o", "addr", "show", "scope", "global", "up"])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace().skip_while(|w| *w != "inet").nth(1)?.split('/').next()?.parse().ok()
    };
    match routed.or_else(listed) {
        Some(ip) if !ip.is_loopback() && !ip.is_unspecified() => ip,
        other => panic!("no non-loopback IPv4 address ({other:?}): Chromium needs one for ICE (or set TETHER_TEST_IP)"),
    }
}

/// What the boat did, for the assertions and for failure messages.
#[derive(Default)]
struct Report {
    log: Vec<String>,
    telemetry_sent: u64,
    time_syncs: u64,
    offers: u64,
    answers: u64,
    connected: bool,
    packets: u64,
}

type Shared = Arc<Mutex<Report>>;

fn note(r: &Shared, line: String) {
    eprintln!("boat: {line}");
    r.lock().unwrap().log.push(line);
}

/// The seed's boat: flat messages on `/ws/device/boat-9`, video answered with the media crate.
async fn boat(url: String, secret: String, report: Shared) {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {secret}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.expect("the boat connects");
    let (mut tx, mut rx) = ws.split();
    let flat = |v: Value| Message::Text(v.to_string().into());

    let (events_tx, mut events) = mpsc::channel::<(String, PeerEvent)>(1024);
    let mut sessions: HashMap<String, Arc<VideoSender>> = HashMap::new();
    let mut pipeline: Option<(VideoPipeline, VideoCodec)> = None;
    let mut packets: Option<mpsc::Receiver<Bytes>> = None;
    let mut last_keyframe = Instant::now();
    let mut authed = false;
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let started = Instant::now();

    loop {
        tokio::select! {
            m = rx.next() => {
                let Some(Ok(m)) = m else {
                    note(&report, "the relay closed the boat's WebSocket".into());
                    break;
                };
                let Message::Text(t) = m else { continue };
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str().unwrap_or_default() {
                    "auth_ok" => {
                        assert_eq!((v["clientID"].as_str(), v["role"].as_str()), (Some(BOAT), Some("device")), "{v}");
                        note(&report, format!("authenticated: {v}"));
                        authed = true;
                    }
                    "time_sync" => {
                        // Flat, as the dialect renders it; answered flat with our clock.
                        let t1 = v["t1"].as_f64().unwrap_or_else(|| panic!("flat t1 in {v}"));
                        let t = now_ms();
                        tx.send(flat(json!({"type":"time_sync_response","t1":t1,"t2":t,"t3":t}))).await.unwrap();
                        report.lock().unwrap().time_syncs += 1;
                    }
                    "webrtc" => {
                        assert_eq!(v["boatId"], BOAT, "flat webrtc names the boat: {v}");
                        assert!(v.get("payload").is_none(), "flat: {v}");
                        let id = v["sessionID"].as_str().unwrap_or_default().to_owned();
                        match v["subtype"].as_str().unwrap_or_default() {
                            "offer" => {
                                report.lock().unwrap().offers += 1;
                                let sdp = v["sdp"].as_str().expect("the offer has sdp");
                                note(&report, format!("offer from {} in session {id} (mode {})", v["from"], v["mode"]));
                                let answer = if let Some(s) = sessions.get(&id) {
                                    s.renegotiate(sdp).await.expect("renegotiation")
                                } else {
                                    // The codec from the offer (H.264 if it has it, else VP8), as
                                    // the agent's `auto`; a second session gets the running one.
                                    let prefs = match &pipeline {
                                        Some((_, c)) => vec![*c],
                                        None => VideoCodec::ALL.to_vec(),
                                    };
                                    let codec = media::rtc::choose_codec(sdp, &prefs).expect("a codec we can send");
                                    let settings = PeerSettings { codec, mdns: true, ..PeerSettings::default() };
                                    let (etx, mut erx) = mpsc::channel(256);
                                    let (sender, answer) = VideoSender::answer(&settings, sdp, etx).await.expect("the offer is answered");
                                    let (tag, fwd) = (id.clone(), events_tx.clone());
                                    tokio::spawn(async move {
                                        while let Some(ev) = erx.recv().await {
                                            if fwd.send((tag.clone(), ev)).await.is_err() {
                                                break;
                                            }
                                        }
                                    });
                                    if pipeline.is_none() {
                                        let (ptx, prx) = mpsc::channel(1024);
                                        let settings = VideoSettings {
                                            codec: match codec {
                                                VideoCodec::H264 => Codec::H264,
                                                VideoCodec::Vp8 => Codec::Vp8,
                                            },
                                            width: WIDTH,
                                            height: HEIGHT,
                                            framerate: FPS,
                                            ..VideoSettings::default()
                                        };
                                        let p = VideoPipeline::start(&settings, ptx).expect("the test pattern pipeline starts");
                                        note(&report, format!("pipeline started: {codec:?} with {}", p.encoder()));
                                        pipeline = Some((p, codec));
                                        packets = Some(prx);
                                    }
                                    note(&report, format!("answering session {id} in {codec:?}"));
                                    sessions.insert(id.clone(), Arc::new(sender));
                                    answer
                                };
                                // The seed's shape: no sessionID (the relay knows the session).
                                tx.send(flat(json!({"type":"webrtc","subtype":"answer","boatId":BOAT,"sdp":answer}))).await.unwrap();
                                report.lock().unwrap().answers += 1;
                            }
                            "ice_candidate" => {
                                let Some(s) = sessions.get(&id) else { continue };
                                let c: Candidate = serde_json::from_value(v.clone()).expect("a candidate");
                                if !c.candidate.is_empty()
                                    && let Err(e) = s.add_remote_candidate(c).await
                                {
                                    note(&report, format!("remote candidate refused: {e}"));
                                }
                            }
                            "bye" => {
                                note(&report, format!("bye in session {id}: {v}"));
                                if let Some(s) = sessions.remove(&id) {
                                    s.close().await;
                                }
                            }
                            other => note(&report, format!("webrtc {other}: {v}")),
                        }
                    }
                    "error" => note(&report, format!("relay error: {v}")),
                    _ => {}
                }
            }
            _ = tick.tick(), if authed => {
                seq += 1;
                let t = now_ms();
                let secs = started.elapsed().as_secs_f64();
                let frame = json!({
                    "type": "telemetry", "subtype": "sensor_data", "sequence": seq, "timestamp": t, "system_time": t,
                    "data": {
                        "gps": {"latitude": 37.7749 + secs * 1e-5, "longitude": -122.4194, "heading": 225.5, "speed": 2.3},
                        "battery": {"percent": 87.5, "voltage": 12.4},
                        "status": "autonomous_navigation"
                    }
                });
                tx.send(flat(frame)).await.unwrap();
                report.lock().unwrap().telemetry_sent = seq;
            }
            Some((id, ev)) = events.recv() => match ev {
                PeerEvent::LocalCandidate(c) => {
                    let mut m = json!({"type":"webrtc","subtype":"ice_candidate","boatId":BOAT,"candidate":""});
                    if let Some(c) = c {
                        for (k, v) in serde_json::to_value(&c).unwrap().as_object().unwrap() {
                            m[k] = v.clone();
                        }
                    }
                    tx.send(flat(m)).await.unwrap();
                }
                PeerEvent::State(state) => {
                    note(&report, format!("session {id}: peer {state}"));
                    if state == "connected" {
                        report.lock().unwrap().connected = true;
                        // Packets written before the peer connected were dropped: a keyframe now
                        // (only once the encoder has produced its first, see device/src/video.rs).
                        if let Some((p, _)) = &pipeline
                            && report.lock().unwrap().packets > 0
                        {
                            p.request_keyframe();
                            last_keyframe = Instant::now();
                        }
                    }
                }
                PeerEvent::KeyframeRequested => {
                    if let Some((p, _)) = &pipeline
                        && report.lock().unwrap().packets > 0
                        && last_keyframe.elapsed() >= Duration::from_millis(500)
                    {
                        p.request_keyframe();
                        last_keyframe = Instant::now();
                    }
                }
                _ => {}
            },
            Some(p) = async { packets.as_mut()?.recv().await }, if packets.is_some() => {
                report.lock().unwrap().packets += 1;
                for s in sessions.values() {
                    let _ = s.write_rtp(&p).await;
                }
            }
        }
    }
    for (_, s) in sessions.drain() {
        s.close().await;
    }
    if let Some((p, _)) = pipeline {
        p.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boat_dialect_devices_telemetry_and_video_reach_the_native_console() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let e2e = root.join("client-web/e2e");
    assert!(
        e2e.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `make deps` (or `make test`)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&chromium).exists(), "no chromium at {chromium}: run `make deps` (or `make test`)");
    let ip = interface_address();

    let dir = tempfile::tempdir().unwrap();
    let running = start_with(dir.path(), 0, |c| c.bind = ip).await;
    let secret =
        running.relay.store.call_sync(|c| relay::auth::issue_device_sync(c, BOAT, "default", "Boat 9")).unwrap();
    let addr = running.addr;

    let report: Shared = Arc::default();
    let boat_task = tokio::spawn(boat(format!("ws://{addr}/ws/device/{BOAT}"), secret, report.clone()));

    let shots = root.join("target/screenshots/boat-dialect");
    let _ = std::fs::remove_dir_all(&shots);
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new("node")
            .arg(e2e.join("boat-dialect.mjs"))
            .arg(format!("http://{addr}/"))
            .arg(ADMIN)
            .arg(BOAT)
            .arg(&shots)
            .env("CHROMIUM", &chromium)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| {
        panic!("the browser script did not finish in 5 minutes; boat:\n{}", report.lock().unwrap().log.join("\n"))
    })
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!boat_task.is_finished(), "the boat stopped early:\n{}", report.lock().unwrap().log.join("\n"));
    {
        let r = report.lock().unwrap();
        assert!(
            out.status.success() && stdout.contains("boat dialect e2e: all steps passed"),
            "the console did not show the Boat-dialect boat:\n{stdout}\n{stderr}\nboat (telemetry sent {}, time_syncs {}, offers {}, answers {}, packets {}):\n{}",
            r.telemetry_sent,
            r.time_syncs,
            r.offers,
            r.answers,
            r.packets,
            r.log.join("\n")
        );
        print!("{stdout}");
        assert!(r.telemetry_sent >= 10 && r.offers >= 1 && r.answers >= 1, "{}", r.log.join("\n"));
        assert!(r.connected, "the boat's peer never connected:\n{}", r.log.join("\n"));
        assert!(r.packets > 0, "the pipeline produced nothing");
    }
    boat_task.abort();
    let _ = boat_task.await;
    running.shutdown(Duration::from_secs(5)).await;
}
