//! The relay's automatic choice between peer to peer and its SFU (protocol section 4.13,
//! "Modes"), across real network namespaces: the device and the pilot are separate hosts that
//! reach the relay but, unless the test links them, not each other.
//!
//! - The relay runs in the test process, in the root namespace, on 0.0.0.0.
//! - The real agent binary runs in namespace `boat` (`ip netns exec`), with its test-pattern
//!   camera, and reaches the relay at the root side of the boat's veth.
//! - The pilot runs on a thread of the test that has entered namespace `pilot` (setns) and
//!   drives a current-thread runtime of its own there: its WebSocket and its
//!   `media::viewer::Viewer`'s UDP sockets all live in `pilot`. It behaves like the console:
//!   offers with `"mode":"auto"`, trickles candidates both ways, reports its peer connection's
//!   state, and on `mode` `sfu` closes its peer and offers again, on the same session, with a
//!   new one.
//!
//! Blocked (no boat <-> pilot path): peer to peer cannot connect, so the relay must move the
//! session to its SFU, answer the new offer itself, and the pilot must then get H.264 frames
//! (marker bits and an IDR) from it. Direct (a veth between boat and pilot): peer to peer
//! connects, frames flow, and the session must stay peer to peer well past the relay's
//! deadline.
//!
//! Needs root and iproute2: without them the tests fail, saying so (they never skip).
#![cfg(feature = "video")]

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::{Ws, fleet, start_with};
use futures_util::{SinkExt, StreamExt};
use media::rtc::Candidate;
use media::viewer::{ConnectionState, OfferedCodec, Viewer, ViewerOptions};
use netns::Topology;
use rtc::rtp;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Everything the pilot does must be done within this (a GStreamer pipeline starting on a busy
/// CI machine, ICE giving up on the blocked path, the SFU's own setup with the device).
const DEADLINE: Duration = Duration::from_secs(60);
/// Frames the pilot must see: this many RTP packets ending a frame (marker bit)...
const MARKED_PACKETS: u64 = 30;
/// ... and at least this many H.264 IDR slices among them.
const KEYFRAMES: u64 = 1;
/// In the direct case: how long the pilot keeps watching after frames flow, for a `mode` `sfu`
/// that must not come (longer than the relay's 5 s default deadline, which that case keeps).
const WATCH: Duration = Duration::from_secs(8);
/// The relay's peer-to-peer deadline in the blocked case (its default is 5 s): shorter keeps
/// that case quick, and it has no direct path to wait for anyway.
const BLOCKED_P2P_TIMEOUT: f64 = 2.0;

const WIDTH: u32 = 320;
const HEIGHT: u32 = 240;
const FRAMERATE: u32 = 15;

/// boat-7's config: video from the test pattern, H.264; no local inputs; no `includeLoopback`
/// (its candidates are the namespace's real interfaces).
fn agent_config(dir: &std::path::Path, relay: SocketAddr, secret: &str) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "serverAddress: \"ws://{relay}/ws\"\nclientID: boat-7\nclientSecret: \"{secret}\"\nname: Boat 7\n\
             logLevel: info\nreconnectInterval: 0.2\n\
             telemetry:\n  systemMetrics: false\n  udp: \"\"\n  unixSocket: \"\"\n\
             video:\n  enabled: true\n  source: testpattern\n  codec: h264\n  width: {WIDTH}\n  height: {HEIGHT}\n  \
             framerate: {FRAMERATE}\n"
        ),
    )
    .unwrap();
    path
}

/// The agent binary inside a namespace, its log echoed and awaitable.
struct NsAgent {
    _child: tokio::process::Child,
    logs: mpsc::UnboundedReceiver<String>,
}

impl NsAgent {
    fn spawn(ns: &str, config: &std::path::Path) -> NsAgent {
        let mut cmd = Topology::exec_in(ns, env!("CARGO_BIN_EXE_tether-device"));
        cmd.arg("--config").arg(config).stderr(std::process::Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                eprintln!("agent: {l}");
                let _ = tx.send(l);
            }
        });
        NsAgent { _child: child, logs }
    }

    async fn wait_for_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, self.logs.recv()).await {
                Ok(Some(l)) if l.contains(needle) => return l,
                Ok(Some(_)) => {}
                Ok(None) => panic!("the agent exited before logging {needle:?}"),
                Err(_) => panic!("the agent never logged {needle:?}"),
            }
        }
    }
}

/// What the pilot is to do.
#[derive(Debug, Clone)]
struct Plan {
    /// The relay, as the pilot's namespace reaches it.
    relay: SocketAddr,
    key: String,
    session: String,
    /// After frames flow, keep watching this long before reporting.
    watch: Duration,
}

/// What one of the pilot's peer connections went through.
#[derive(Debug, Default)]
struct ViewerStats {
    /// Connection states, in order.
    states: Vec<String>,
    packets: u64,
    /// Packets with the marker bit (the last of a frame).
    marked: u64,
    /// Packets carrying an IDR slice's start (or all of it).
    keyframes: u64,
    /// The negotiated codec, once the track opened.
    codec: Option<String>,
}

/// What the pilot saw, for the test to judge.
#[derive(Debug, Default)]
struct Report {
    /// Everything, in order, with times from the first offer.
    timeline: Vec<String>,
    /// `mode` payloads, in order.
    modes: Vec<Value>,
    /// Answers: which of the pilot's peers (0-based) was current, and the whole message.
    answers: Vec<(usize, Value)>,
    /// `bye` messages for the session.
    byes: Vec<Value>,
    /// `error` messages.
    errors: Vec<Value>,
    /// One entry per peer connection the pilot made.
    viewers: Vec<ViewerStats>,
    /// Which peer met the frame criterion, and when.
    frames: Option<(usize, Duration)>,
    /// Why the pilot stopped.
    ended: String,
    /// When it stopped.
    stopped: Duration,
}

impl Report {
    fn note(&mut self, t0: Instant, line: String) {
        let line = format!("{:>7.3}s {line}", t0.elapsed().as_secs_f64());
        eprintln!("pilot: {line}");
        self.timeline.push(line);
    }

    fn dump(&self) -> String {
        format!("pilot timeline:\n  {}\nviewers: {:?}\nended: {}", self.timeline.join("\n  "), self.viewers, self.ended)
    }
}

/// Whether an H.264 RTP payload (RFC 6184) carries an IDR slice: on its own, inside a STAP-A
/// aggregate, or as the first fragment of an FU-A.
fn carries_idr(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else { return false };
    match first & 0x1f {
        5 => true,
        24 => {
            let mut at = 1;
            while at + 2 <= payload.len() {
                let size = usize::from(u16::from_be_bytes([payload[at], payload[at + 1]]));
                at += 2;
                if size > 0 && at < payload.len() && payload[at] & 0x1f == 5 {
                    return true;
                }
                at += size;
            }
            false
        }
        // FU-A: the start fragment of an IDR slice.
        28 => payload.len() >= 2 && payload[1] & 0x80 != 0 && payload[1] & 0x1f == 5,
        _ => false,
    }
}

/// The pilot's current peer connection and the streams it owns.
struct Peer {
    viewer: Arc<Viewer>,
    candidates: mpsc::UnboundedReceiver<Option<Candidate>>,
    gathering: bool,
    packets: mpsc::Receiver<rtp::Packet>,
    receiving: bool,
    state: watch::Receiver<ConnectionState>,
    watching: bool,
    /// The remote description is set: candidates can be added.
    answered: bool,
    /// Remote candidates that came before the answer.
    early: Vec<Candidate>,
}

impl Peer {
    /// A new viewer offering what Chrome offers (H.264 first, VP8), on every interface of the
    /// pilot's namespace.
    async fn new() -> (Peer, String) {
        let mut codecs = OfferedCodec::chrome_like_h264();
        codecs.push(OfferedCodec::vp8());
        let new = Viewer::offer(&ViewerOptions::offering(codecs)).await.unwrap();
        let viewer = Arc::new(new.viewer);
        let state = viewer.state();
        let peer = Peer {
            viewer,
            candidates: new.candidates,
            gathering: true,
            packets: new.packets,
            receiving: true,
            state,
            watching: true,
            answered: false,
            early: Vec::new(),
        };
        (peer, new.offer)
    }
}

/// An operator WebSocket from inside the pilot's namespace (ticket first; no proxy).
async fn operator(relay: SocketAddr, key: &str) -> Ws {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let t: Value = client
        .post(format!("http://{relay}/api/auth/ws-ticket"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = format!("ws://{relay}/ws/admin?ticket={}", t["ticket"].as_str().unwrap());
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// What woke the pilot.
enum Event {
    Stop,
    Ws(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Candidate(Option<Option<Candidate>>),
    State(Option<ConnectionState>),
    Packet(Option<rtp::Packet>),
}

/// The pilot, as the console behaves: runs inside the pilot's namespace until frames have
/// flowed (and `plan.watch` after), the deadline passes, or the session ends.
async fn pilot(plan: Plan) -> Report {
    let mut report = Report::default();
    let mut ws = operator(plan.relay, &plan.key).await;
    let session = plan.session.as_str();
    let t0 = Instant::now();
    let mut stop_at = t0 + DEADLINE;

    let offer_msg = |sdp: &str, correlation: &str| {
        json!({"type": "webrtc", "correlationID": correlation, "clientID": "boat-7",
               "payload": {"subtype": "offer", "sessionID": session, "sdp": sdp, "mode": "auto"}})
    };
    let (mut peer, offer) = Peer::new().await;
    report.viewers.push(ViewerStats::default());
    send(&mut ws, offer_msg(&offer, session)).await;
    report.note(t0, "offer 1 sent (mode auto)".into());
    let mut moved = false;

    loop {
        let event = tokio::select! {
            _ = tokio::time::sleep_until(stop_at) => Event::Stop,
            m = ws.next() => Event::Ws(m),
            c = peer.candidates.recv(), if peer.gathering => Event::Candidate(c),
            s = peer.state.changed(), if peer.watching => {
                Event::State(s.ok().map(|()| *peer.state.borrow_and_update()))
            }
            p = peer.packets.recv(), if peer.receiving => Event::Packet(p),
        };
        let current = report.viewers.len() - 1;
        match event {
            Event::Stop => {
                report.ended = if report.frames.is_some() {
                    "frames flowed".into()
                } else {
                    "deadline passed without frames".into()
                };
                break;
            }
            Event::Ws(None) => {
                report.ended = "the relay closed the WebSocket".into();
                break;
            }
            Event::Ws(Some(Err(e))) => {
                report.ended = format!("WebSocket error: {e}");
                break;
            }
            Event::Ws(Some(Ok(Message::Text(text)))) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                let p = &v["payload"];
                if v["type"] == "error" {
                    report.note(t0, format!("ERROR {v}"));
                    report.errors.push(v);
                    continue;
                }
                if v["type"] == "ack" {
                    report.note(t0, format!("ack {}", v["correlationID"]));
                    continue;
                }
                if v["type"] != "webrtc" || p["sessionID"] != session {
                    continue;
                }
                match p["subtype"].as_str().unwrap_or_default() {
                    "answer" => {
                        report.note(
                            t0,
                            format!("answer from {} (mode {}) for peer {}", v["from"], p["mode"], current + 1),
                        );
                        report.answers.push((current, v.clone()));
                        match peer.viewer.apply_answer(p["sdp"].as_str().unwrap_or_default()).await {
                            Ok(()) => {
                                peer.answered = true;
                                for c in std::mem::take(&mut peer.early) {
                                    if let Err(e) = peer.viewer.add_remote_candidate(c).await {
                                        report.note(t0, format!("early candidate refused: {e}"));
                                    }
                                }
                            }
                            Err(e) => report.note(t0, format!("the answer did not apply: {e}")),
                        }
                    }
                    "ice_candidate" => {
                        let c: Candidate = serde_json::from_value(p.clone()).unwrap();
                        report.note(t0, format!("remote candidate from {}: {:?}", v["from"], c.candidate));
                        if !peer.answered {
                            peer.early.push(c);
                        } else if let Err(e) = peer.viewer.add_remote_candidate(c).await {
                            report.note(t0, format!("candidate refused: {e}"));
                        }
                    }
                    "mode" => {
                        report.note(
                            t0,
                            format!("mode {} reason {} auto {}: {}", p["mode"], p["reason"], p["auto"], p["message"]),
                        );
                        report.modes.push(p.clone());
                        if p["mode"] == "sfu" && !moved {
                            // As the console does: close the peer-to-peer attempt and offer
                            // again, same session, from a new peer (the relay is the remote now).
                            moved = true;
                            peer.viewer.close().await;
                            let (next, offer) = Peer::new().await;
                            peer = next;
                            report.viewers.push(ViewerStats::default());
                            send(&mut ws, offer_msg(&offer, &format!("{session}-2"))).await;
                            report.note(t0, "offer 2 sent (new peer) after mode sfu".into());
                        }
                    }
                    "bye" => {
                        report.note(t0, format!("bye from {}: {p}", v["from"]));
                        report.byes.push(v.clone());
                        report.ended = format!("the session ended: {p}");
                        break;
                    }
                    other => report.note(t0, format!("{other} from {}: {p}", v["from"])),
                }
            }
            Event::Ws(Some(Ok(_))) => {}
            Event::Candidate(None) => peer.gathering = false,
            Event::Candidate(Some(c)) => {
                let mut payload = serde_json::to_value(c.clone().unwrap_or_default()).unwrap();
                payload["subtype"] = json!("ice_candidate");
                payload["sessionID"] = json!(session);
                send(&mut ws, json!({"type": "webrtc", "clientID": "boat-7", "payload": payload})).await;
                report.note(t0, format!("local candidate sent: {:?}", c.map(|c| c.candidate)));
            }
            Event::State(None) => peer.watching = false,
            Event::State(Some(state)) => {
                let state = state.to_string();
                report.note(t0, format!("peer {} state {state}", current + 1));
                report.viewers[current].states.push(state.clone());
                send(
                    &mut ws,
                    json!({"type": "webrtc", "clientID": "boat-7",
                           "payload": {"subtype": "state", "sessionID": session, "state": state}}),
                )
                .await;
            }
            Event::Packet(None) => peer.receiving = false,
            Event::Packet(Some(packet)) => {
                let stats = &mut report.viewers[current];
                if stats.packets == 0 {
                    stats.codec = peer.viewer.codec().await.map(|c| c.mime_type);
                    let codec = stats.codec.clone();
                    report.note(t0, format!("peer {} first RTP packet ({codec:?})", current + 1));
                }
                let stats = &mut report.viewers[current];
                stats.packets += 1;
                stats.marked += u64::from(packet.header.marker);
                stats.keyframes += u64::from(carries_idr(&packet.payload));
                if report.frames.is_none() && stats.marked >= MARKED_PACKETS && stats.keyframes >= KEYFRAMES {
                    let summary = format!(
                        "peer {} has frames: {} packets, {} marked, {} keyframes",
                        current + 1,
                        stats.packets,
                        stats.marked,
                        stats.keyframes
                    );
                    report.frames = Some((current, t0.elapsed()));
                    report.note(t0, summary);
                    stop_at = Instant::now() + plan.watch;
                }
            }
        }
    }
    report.stopped = t0.elapsed();
    report.note(t0, format!("pilot stops: {}", report.ended));
    peer.viewer.close().await;
    let _ = ws.close(None).await;
    report
}

/// The test's setup and the pilot's run: relay in the root namespace, agent in `boat`, pilot
/// in `pilot`; returns what the pilot saw.
async fn run(direct: bool, watch: Duration, tune: impl FnOnce(&mut relay::RelayConfig)) -> Report {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,webrtc=warn,rtc=warn")),
        )
        .with_test_writer()
        .try_init();
    let topology = Topology::build(direct);
    let dir = tempfile::tempdir().unwrap();
    let running = start_with(dir.path(), 0, |c| {
        c.bind = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        tune(c);
    })
    .await;
    let port = running.addr.port();
    let (secret, key) = fleet(&running, "view");

    let config = agent_config(dir.path(), SocketAddr::from((topology.relay_for_boat, port)), &secret);
    let mut agent = NsAgent::spawn(&topology.boat, &config);
    agent.wait_for_log("authenticated with the relay").await;

    let plan = Plan {
        relay: SocketAddr::from((topology.relay_for_pilot, port)),
        key,
        session: if direct { "cam-direct".into() } else { "cam-blocked".into() },
        watch,
    };
    let pilot_thread = netns::run_in(&topology.pilot, "pilot", move || pilot(plan));
    let joined = tokio::time::timeout(
        DEADLINE + watch + Duration::from_secs(30),
        tokio::task::spawn_blocking(move || pilot_thread.join()),
    )
    .await
    .expect("the pilot thread did not finish after its own deadline")
    .unwrap();
    let report = match joined {
        Ok(report) => report,
        Err(panic) => {
            eprintln!("{}\n{}", Topology::describe(&topology.boat), Topology::describe(&topology.pilot));
            std::panic::resume_unwind(panic)
        }
    };
    eprintln!("{}", report.dump());
    running.shutdown(Duration::from_secs(5)).await;
    drop(agent);
    drop(topology);
    report
}

/// Panics with the pilot's timeline when `ok` is false.
#[track_caller]
fn check(ok: bool, what: &str, report: &Report) {
    assert!(ok, "{what}\n{}", report.dump());
}

fn is_p2p_first(mode: &Value) -> bool {
    mode["mode"] == "p2p" && mode["reason"] == "auto_p2p_first" && mode["auto"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_the_sfu_when_no_direct_path_exists() {
    let report = run(false, Duration::ZERO, |c| c.media.p2p_timeout = BLOCKED_P2P_TIMEOUT).await;
    check(report.errors.is_empty(), "the relay refused something", &report);
    check(report.modes.first().is_some_and(is_p2p_first), "first mode: p2p, auto_p2p_first", &report);
    let moved = report.modes.iter().position(|m| m["mode"] == "sfu");
    check(moved.is_some(), "no mode sfu: the relay never moved the blocked session to its SFU", &report);
    let sfu = &report.modes[moved.unwrap()];
    check(
        sfu["auto"] == true && (sfu["reason"] == "p2p_timeout" || sfu["reason"] == "p2p_failed"),
        &format!("mode sfu with reason p2p_timeout or p2p_failed, auto: {sfu}"),
        &report,
    );
    // The direct attempt really was impossible.
    let first = &report.viewers[0];
    check(
        !first.states.iter().any(|s| s == "connected") && first.packets == 0,
        "the peer-to-peer attempt connected although no path exists",
        &report,
    );
    check(report.viewers.len() == 2, "the pilot did not offer again after mode sfu", &report);
    let sfu_answers: Vec<&Value> = report.answers.iter().filter(|(i, _)| *i == 1).map(|(_, v)| v).collect();
    check(!sfu_answers.is_empty(), "no answer to the offer after mode sfu", &report);
    check(
        sfu_answers.iter().all(|a| a["from"] == "boat-7" && a["payload"]["mode"] == "sfu"),
        "the SFU's answer comes from the device's id with mode sfu",
        &report,
    );
    check(
        report.ended == "frames flowed" && report.frames.is_some_and(|(peer, _)| peer == 1),
        "no frames through the SFU",
        &report,
    );
    let stats = &report.viewers[1];
    check(
        stats.codec.as_deref().is_some_and(|c| c.eq_ignore_ascii_case("video/h264")),
        "the SFU's track is H.264",
        &report,
    );
    check(report.byes.is_empty(), "the session ended", &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_stays_peer_to_peer_when_a_direct_path_exists() {
    // The relay's default deadline (5 s): the session must stay peer to peer well past it.
    let report = run(true, WATCH, |_| {}).await;
    check(report.errors.is_empty(), "the relay refused something", &report);
    check(report.frames.is_some_and(|(peer, _)| peer == 0), "no frames over the direct path", &report);
    check(
        report.ended == "frames flowed" && report.frames.is_some_and(|(_, at)| report.stopped >= at + WATCH),
        "the pilot did not watch the whole window after frames flowed",
        &report,
    );
    check(report.modes.first().is_some_and(is_p2p_first), "first mode: p2p, auto_p2p_first", &report);
    check(!report.modes.iter().any(|m| m["mode"] == "sfu"), "moved to the SFU although peer to peer works", &report);
    check(report.modes.last().is_some_and(|m| m["mode"] == "p2p"), "final mode p2p", &report);
    check(report.viewers.len() == 1, "the pilot made a second peer", &report);
    check(report.viewers[0].states.iter().any(|s| s == "connected"), "the peer connected", &report);
    check(
        report.answers.iter().all(|(_, a)| a["from"] == "boat-7" && a["payload"]["mode"] != "sfu"),
        "the device answered, not the SFU",
        &report,
    );
    check(report.byes.is_empty(), "the session ended", &report);
}
