//! Video through the relay's SFU, end to end: the real agent binary publishes its test pattern
//! once to the relay; pilots (`media::viewer::Viewer`s on operator WebSockets, as the console
//! does it) and a WHEP client (plain HTTP) receive it from the relay's own peers.
//!
//! - fan-out: ten viewers all get frames from one upstream; one leaving mid-stream does not
//!   interrupt the others (no sequence gap on loopback); a viewer joining later gets a keyframe
//!   within 2 s although the encoder's own keyframe interval is 60 s (so only the relay's
//!   forwarded keyframe request can bring it); when the device goes, every viewer hears `bye`;
//! - `auto` with more than `--sfu-above-viewers` pilots sends the next one to the SFU;
//! - WHEP: POST an offer, get a 201 with the answer and Location, receive frames, DELETE; and the
//!   errors a WHEP client can meet.
#![cfg(feature = "video")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use media::rtc::Candidate;
use media::viewer::{NewViewer, OfferedCodec, Viewer, ViewerOptions};
use rtc::rtp;
use rtc::shared::marshal::Marshal;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

const DEADLINE: Duration = Duration::from_secs(60);

/// boat-7's config: the test pattern at a small size, loopback candidates (everything runs on
/// one machine), and a keyframe only every 60 s unless someone asks.
fn config(dir: &std::path::Path, addr: std::net::SocketAddr, secret: &str) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "serverAddress: \"ws://{addr}/ws\"\nclientID: boat-7\nclientSecret: \"{secret}\"\nname: Boat 7\n\
             logLevel: info\nreconnectInterval: 0.2\n\
             telemetry:\n  systemMetrics: false\n  udp: \"\"\n  unixSocket: \"\"\n\
             video:\n  enabled: true\n  source: testpattern\n  codec: h264\n  width: 320\n  height: 240\n  \
             framerate: 15\n  bitrateKbps: 300\n  minBitrateKbps: 100\n  keyframeInterval: 60\n  includeLoopback: true\n"
        ),
    )
    .unwrap();
    path
}

/// A relay whose SFU gathers loopback candidates, with `tune` on top.
async fn relay(dir: &std::path::Path, tune: impl FnOnce(&mut relay::RelayConfig)) -> relay::RunningRelay {
    start_with(dir, 0, |c| {
        c.media.include_loopback = true;
        tune(c);
    })
    .await
}

fn viewer_options() -> ViewerOptions {
    ViewerOptions {
        codecs: OfferedCodec::chrome_like_h264(),
        include_loopback: true,
        udp_addrs: vec!["127.0.0.1:0".to_owned()],
        ..ViewerOptions::default()
    }
}

fn is_keyframe(p: &rtp::Packet) -> bool {
    media::gst::h264_rtp_is_keyframe(&p.marshal().unwrap())
}

/// One pilot: a viewer and its signaling over its own operator WebSocket.
struct Pilot {
    session: String,
    viewer: Arc<Viewer>,
    packets: mpsc::Receiver<rtp::Packet>,
    /// What the pump did not consume: `mode`, `bye`, acks, errors.
    inbox: mpsc::UnboundedReceiver<Value>,
    close: Option<oneshot::Sender<()>>,
    pump: JoinHandle<()>,
}

impl Pilot {
    /// Offers session `session` to boat-7 in `mode`.
    async fn offer(addr: std::net::SocketAddr, key: &str, session: &str, mode: &str) -> Pilot {
        let mut ws = operator(addr, key).await;
        let NewViewer { viewer, offer, candidates, packets } = Viewer::offer(&viewer_options()).await.unwrap();
        let viewer = Arc::new(viewer);
        send(
            &mut ws,
            json!({"type": "webrtc", "correlationID": session, "clientID": "boat-7",
                   "payload": {"subtype": "offer", "sessionID": session, "sdp": offer, "mode": mode}}),
        )
        .await;
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        let (close, close_rx) = oneshot::channel();
        let pump = tokio::spawn(pump(ws, viewer.clone(), candidates, session.to_owned(), inbox_tx, close_rx));
        Pilot { session: session.to_owned(), viewer, packets, inbox, close: Some(close), pump }
    }

    async fn recv_until(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let v = tokio::time::timeout_at(deadline, self.inbox.recv())
                .await
                .unwrap_or_else(|_| panic!("{}: no {what} in time", self.session))
                .unwrap_or_else(|| panic!("{}: the signaling pump ended waiting for {what}", self.session));
            if want(&v) {
                return v;
            }
        }
    }

    /// The `mode` message the relay sends after the offer.
    async fn mode(&mut self) -> Value {
        let v = self.recv_until("a mode message", |v| v["payload"]["subtype"] == "mode").await;
        v["payload"].clone()
    }

    async fn connected(&self) {
        let r = tokio::time::timeout(DEADLINE, self.viewer.wait_connected()).await;
        assert!(matches!(r, Ok(Ok(()))), "{}: the viewer did not connect: {r:?}", self.session);
    }

    async fn next_packet(&mut self) -> rtp::Packet {
        tokio::time::timeout(DEADLINE, self.packets.recv())
            .await
            .unwrap_or_else(|_| panic!("{}: no RTP packet in time", self.session))
            .unwrap_or_else(|| panic!("{}: the packet stream ended", self.session))
    }

    /// Reads until `n` distinct frames (RTP timestamps), from the first keyframe on, have come.
    async fn frames_from_keyframe(&mut self, n: usize) {
        loop {
            let p = self.next_packet().await;
            if is_keyframe(&p) {
                let mut stamps = vec![p.header.timestamp];
                while stamps.len() < n {
                    let p = self.next_packet().await;
                    if stamps.last() != Some(&p.header.timestamp) {
                        stamps.push(p.header.timestamp);
                    }
                }
                return;
            }
        }
    }

    /// Drops what has queued up so far.
    fn drain(&mut self) {
        while self.packets.try_recv().is_ok() {}
    }

    async fn leave(&mut self) {
        if let Some(close) = self.close.take() {
            let _ = close.send(());
        }
        tokio::time::timeout(DEADLINE, &mut self.pump).await.expect("the pump did not end").unwrap();
        self.viewer.close().await;
    }
}

impl Drop for Pilot {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// The console's signaling in short: the answer and the relay's candidates go to the viewer,
/// the viewer's candidates and its connection state go to the relay, the rest to the inbox.
async fn pump(
    mut ws: Ws,
    viewer: Arc<Viewer>,
    mut candidates: mpsc::UnboundedReceiver<Option<Candidate>>,
    session: String,
    inbox: mpsc::UnboundedSender<Value>,
    mut close: oneshot::Receiver<()>,
) {
    let mut gathering = true;
    let mut state = viewer.state();
    let mut answered = false;
    let mut early: Vec<Candidate> = Vec::new();
    loop {
        tokio::select! {
            m = ws.next() => {
                let text = match m {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => panic!("pilot WebSocket failed: {e}"),
                    None => return,
                };
                let v: Value = serde_json::from_str(&text).unwrap();
                let p = &v["payload"];
                if v["type"] != "webrtc" || p["sessionID"] != session.as_str() {
                    let _ = inbox.send(v);
                    continue;
                }
                match p["subtype"].as_str() {
                    Some("answer") => {
                        assert_eq!(v["from"], "boat-7", "{v}");
                        viewer.apply_answer(p["sdp"].as_str().unwrap()).await.unwrap();
                        answered = true;
                        for c in early.drain(..) {
                            viewer.add_remote_candidate(c).await.unwrap();
                        }
                        let _ = inbox.send(v);
                    }
                    Some("ice_candidate") => {
                        let c: Candidate = serde_json::from_value(p.clone()).unwrap();
                        if answered {
                            if let Err(e) = viewer.add_remote_candidate(c).await {
                                eprintln!("viewer refused the relay's candidate {p}: {e}");
                            }
                        } else {
                            early.push(c);
                        }
                    }
                    _ => {
                        let _ = inbox.send(v);
                    }
                }
            }
            c = candidates.recv(), if gathering => {
                let Some(c) = c else {
                    gathering = false;
                    continue;
                };
                let mut payload = serde_json::to_value(c.unwrap_or_default()).unwrap();
                payload["subtype"] = json!("ice_candidate");
                payload["sessionID"] = json!(session);
                let m = json!({"type": "webrtc", "clientID": "boat-7", "payload": payload});
                ws.send(Message::Text(m.to_string().into())).await.unwrap();
            }
            changed = state.changed() => {
                if changed.is_err() {
                    continue;
                }
                let s = state.borrow_and_update().to_string();
                let m = json!({"type": "webrtc", "clientID": "boat-7",
                               "payload": {"subtype": "state", "sessionID": session, "state": s}});
                let _ = ws.send(Message::Text(m.to_string().into())).await;
            }
            _ = &mut close => {
                let _ = ws.close(None).await;
                while let Some(Ok(_)) = ws.next().await {}
                return;
            }
        }
    }
}

/// Waits until the relay's SFU has `viewers` viewers and `publications` upstreams.
async fn sfu_counts(running: &relay::RunningRelay, publications: usize, viewers: usize) {
    let sfu = running.relay.sfu.as_ref().expect("the relay has its SFU");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = sfu.stats();
        if s.publications == publications && s.viewers == viewers {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "SFU stats stayed {s:?}, want {publications} upstream(s), {viewers} viewer(s)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upstream_feeds_ten_viewers_and_a_late_viewer_gets_a_keyframe_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let running = relay(dir.path(), |_| {}).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "view");
    let mut agent = RunningAgent::spawn(&config(dir.path(), addr, &secret), &[]);
    agent.wait_for_log("authenticated with the relay").await;

    let mut pilots = Vec::new();
    for i in 0..10 {
        let mut p = Pilot::offer(addr, &key, &format!("fan-{i}"), "sfu").await;
        let mode = p.mode().await;
        assert_eq!((&mode["mode"], &mode["reason"]), (&json!("sfu"), &json!("requested")), "{mode}");
        let answer = p.recv_until("the relay's answer", |v| v["payload"]["subtype"] == "answer").await;
        assert_eq!(answer["payload"]["mode"], "sfu", "{answer}");
        pilots.push(p);
    }
    for p in &pilots {
        p.connected().await;
    }
    for p in &mut pilots {
        p.frames_from_keyframe(10).await;
    }
    // Ten viewers, one upstream: the device encodes and sends once.
    sfu_counts(&running, 1, 10).await;
    let stats = running.relay.sfu.as_ref().unwrap().stats();
    assert!(stats.packets_out >= 10 * 10, "{stats:?}");

    // One leaves mid-stream; the others' streams go on without a gap.
    let mut gone = pilots.remove(3);
    for p in &mut pilots {
        p.drain();
    }
    let mut last_seq: Vec<Option<u16>> = vec![None; pilots.len()];
    gone.leave().await;
    sfu_counts(&running, 1, 9).await;
    // Packets continue, in sequence, for a good second after the departure on every viewer.
    for (i, p) in pilots.iter_mut().enumerate() {
        let mut stamps = 0;
        let mut last_ts = None;
        while stamps < 20 {
            let pkt = p.next_packet().await;
            if let Some(prev) = last_seq[i] {
                assert_eq!(
                    pkt.header.sequence_number,
                    prev.wrapping_add(1),
                    "{}: a gap after a viewer left",
                    p.session
                );
            }
            last_seq[i] = Some(pkt.header.sequence_number);
            if last_ts != Some(pkt.header.timestamp) {
                stamps += 1;
                last_ts = Some(pkt.header.timestamp);
            }
        }
    }

    // A late viewer: its first keyframe comes within 2 s of its connection, from the request
    // the relay forwards (the encoder's own would take up to 60 s).
    let mut late = Pilot::offer(addr, &key, "fan-late", "sfu").await;
    late.connected().await;
    let connected_at = Instant::now();
    loop {
        let p = late.next_packet().await;
        if is_keyframe(&p) {
            break;
        }
        assert!(connected_at.elapsed() < Duration::from_secs(10), "no keyframe at all for the late viewer");
    }
    let waited = connected_at.elapsed();
    eprintln!("late viewer: first keyframe {waited:?} after connecting");
    assert!(waited <= Duration::from_secs(2), "the late viewer waited {waited:?} for a keyframe");
    late.frames_from_keyframe(5).await;
    sfu_counts(&running, 1, 10).await;

    // The device goes: every viewer is told.
    agent.child.kill().await.unwrap();
    pilots.push(late);
    for p in &mut pilots {
        let bye = p.recv_until("bye", |v| v["payload"]["subtype"] == "bye").await;
        assert_eq!(bye["payload"]["reason"], "device_offline", "{bye}");
    }
    sfu_counts(&running, 0, 0).await;
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_sends_pilots_beyond_the_limit_to_the_sfu() {
    let dir = tempfile::tempdir().unwrap();
    let running = relay(dir.path(), |c| c.media.sfu_above_viewers = 1).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "view");
    let mut agent = RunningAgent::spawn(&config(dir.path(), addr, &secret), &[]);
    agent.wait_for_log("authenticated with the relay").await;

    // The first pilot goes peer to peer, and stays there: the agent reports `connected`.
    let mut first = Pilot::offer(addr, &key, "auto-1", "auto").await;
    let mode = first.mode().await;
    assert_eq!(
        (&mode["mode"], &mode["reason"], &mode["auto"]),
        (&json!("p2p"), &json!("auto_p2p_first"), &json!(true))
    );
    first.connected().await;
    first.frames_from_keyframe(5).await;

    // The second is beyond the limit of one: the SFU serves it.
    let mut second = Pilot::offer(addr, &key, "auto-2", "auto").await;
    let mode = second.mode().await;
    assert_eq!((&mode["mode"], &mode["reason"]), (&json!("sfu"), &json!("viewers")), "{mode}");
    second.connected().await;
    second.frames_from_keyframe(5).await;
    sfu_counts(&running, 1, 1).await;

    // The first has not been moved meanwhile (its deadline, 5 s, has passed by now or will).
    tokio::time::sleep(Duration::from_secs(6)).await;
    while let Ok(v) = first.inbox.try_recv() {
        assert_ne!(v["payload"]["subtype"], "mode", "the connected p2p session was moved: {v}");
        assert_ne!(v["payload"]["subtype"], "bye", "the connected p2p session ended: {v}");
    }
    first.drain();
    first.frames_from_keyframe(2).await;

    first.leave().await;
    second.leave().await;
    // The upstream lingers 10 s after its last viewer, then closes.
    sfu_counts(&running, 1, 0).await;
    sfu_counts(&running, 0, 0).await;
    drop(agent);
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whep_client_watches_through_the_sfu() {
    let dir = tempfile::tempdir().unwrap();
    let running = relay(dir.path(), |_| {}).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "view");
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/whep/boat-7");

    // Errors first, with the device still offline.
    let r = http.post(&url).header("content-type", "application/sdp").body("v=0\r\n").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r =
        http.post(&url).bearer_auth(&key).header("content-type", "text/plain").body("v=0\r\n").send().await.unwrap();
    assert_eq!(r.status(), 415);
    let r = http
        .post(format!("http://{addr}/whep/no-such-boat"))
        .bearer_auth(&key)
        .header("content-type", "application/sdp")
        .body("v=0\r\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .post(&url)
        .bearer_auth(&key)
        .header("content-type", "application/sdp")
        .body("v=0\r\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "target_offline", "{body}");

    let mut agent = RunningAgent::spawn(&config(dir.path(), addr, &secret), &[]);
    agent.wait_for_log("authenticated with the relay").await;

    // A WHEP player does not trickle: it offers with its candidates in the SDP.
    let NewViewer { viewer, offer, mut candidates, mut packets } = Viewer::offer(&viewer_options()).await.unwrap();
    let mut gathered = Vec::new();
    while let Some(Some(c)) = tokio::time::timeout(DEADLINE, candidates.recv()).await.unwrap() {
        gathered.push(c);
    }
    let offer = media::sfu::with_candidates(&offer, &gathered);
    let r =
        http.post(&url).bearer_auth(&key).header("content-type", "application/sdp").body(offer).send().await.unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    assert_eq!(r.headers()["content-type"], "application/sdp");
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("/whep/boat-7/whep-"), "{location}");
    let answer = r.text().await.unwrap();
    assert!(answer.contains("a=candidate:"), "the answer carries the relay's candidates: {answer}");
    viewer.apply_answer(&answer).await.unwrap();
    tokio::time::timeout(DEADLINE, viewer.wait_connected()).await.unwrap().unwrap();
    let mut frames = Vec::new();
    let mut keyframe = false;
    while frames.len() < 10 {
        let p = tokio::time::timeout(DEADLINE, packets.recv()).await.unwrap().unwrap();
        keyframe |= is_keyframe(&p);
        if keyframe && frames.last() != Some(&p.header.timestamp) {
            frames.push(p.header.timestamp);
        }
    }
    sfu_counts(&running, 1, 1).await;

    // Trickle is not offered; then the session ends with DELETE, once.
    let session_url = format!("http://{addr}{location}");
    let r = http.patch(&session_url).bearer_auth(&key).body("").send().await.unwrap();
    assert_eq!(r.status(), 405);
    let r = http.delete(&session_url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.delete(&session_url).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 204);
    sfu_counts(&running, 1, 0).await;
    let r = http.delete(&session_url).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 404);
    viewer.close().await;
    drop(agent);
    running.shutdown(Duration::from_secs(5)).await;
}

/// The address this machine uses for outside traffic (a non-loopback interface).
fn interface_address() -> std::net::IpAddr {
    // Connecting a UDP socket only picks the route and source address; nothing is sent.
    let ip = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|()| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .expect("this test needs a non-loopback IPv4 interface with a route");
    assert!(!ip.is_loopback() && !ip.is_unspecified(), "no usable interface address ({ip})");
    ip
}

/// `n` consecutive UDP and TCP ports that are free right now, above 20000.
fn free_port_range(n: u16) -> (u16, u16) {
    let mut base = 20_000 + (std::process::id() % 20_000) as u16;
    loop {
        let free = (base..base + n).all(|p| {
            std::net::UdpSocket::bind(("0.0.0.0", p)).is_ok() && std::net::TcpListener::bind(("0.0.0.0", p)).is_ok()
        });
        if free {
            return (base, base + n - 1);
        }
        base = if base > 60_000 { 20_000 } else { base + n };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sfu_announces_its_public_address_on_ports_of_its_range_with_ice_tcp() {
    let ip = interface_address();
    let (lo, hi) = free_port_range(40);
    let dir = tempfile::tempdir().unwrap();
    // The "public" address is the interface's own here (a real 1:1 NAT would map it), so the
    // viewer can still reach it; what is checked is what the relay announces, and that media
    // flows over it.
    let running = start_with(dir.path(), 0, |c| {
        c.media.public_ips = vec![ip.to_string()];
        c.media.rtc_ports = Some((lo, hi));
        c.media.ice_tcp = true;
    })
    .await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "view");
    let mut agent = RunningAgent::spawn(&config(dir.path(), addr, &secret), &[]);
    agent.wait_for_log("authenticated with the relay").await;

    let options = ViewerOptions { codecs: OfferedCodec::chrome_like_h264(), ..ViewerOptions::default() };
    let NewViewer { viewer, offer, mut candidates, mut packets } = Viewer::offer(&options).await.unwrap();
    let mut gathered = Vec::new();
    while let Some(Some(c)) = tokio::time::timeout(DEADLINE, candidates.recv()).await.unwrap() {
        gathered.push(c);
    }
    let offer = media::sfu::with_candidates(&offer, &gathered);
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/whep/boat-7"))
        .bearer_auth(&key)
        .header("content-type", "application/sdp")
        .body(offer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let answer = r.text().await.unwrap();
    // a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type> ...
    let lines: Vec<Vec<&str>> = answer
        .lines()
        .filter_map(|l| l.trim().strip_prefix("a=candidate:"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let v4: Vec<&Vec<&str>> = lines.iter().filter(|f| f[4].parse::<std::net::Ipv4Addr>().is_ok()).collect();
    assert!(!v4.is_empty(), "no IPv4 candidates in {answer}");
    for f in &v4 {
        assert_eq!(f[4], ip.to_string(), "a candidate does not carry the public address: {f:?}");
        let port: u16 = f[5].parse().unwrap();
        assert!((lo..=hi).contains(&port) || port == 9, "port {port} is outside {lo}-{hi}: {f:?}");
    }
    assert!(v4.iter().any(|f| f[2].eq_ignore_ascii_case("udp")), "no UDP candidate: {answer}");
    assert!(
        v4.iter().any(|f| f[2].eq_ignore_ascii_case("tcp") && f.windows(2).any(|w| w == ["tcptype", "passive"])),
        "no passive ICE-TCP candidate: {answer}"
    );
    viewer.apply_answer(&answer).await.unwrap();
    tokio::time::timeout(DEADLINE, viewer.wait_connected()).await.unwrap().unwrap();
    let mut keyframe = false;
    let mut frames = 0;
    let mut last = None;
    while frames < 5 {
        let p = tokio::time::timeout(DEADLINE, packets.recv()).await.unwrap().unwrap();
        keyframe |= is_keyframe(&p);
        if keyframe && last != Some(p.header.timestamp) {
            frames += 1;
            last = Some(p.header.timestamp);
        }
    }
    viewer.close().await;
    drop(agent);
    running.shutdown(Duration::from_secs(5)).await;
}
