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

use std::time::{Duration, Instant};

use common::video::{DEADLINE, Pilot, frames_from_keyframe, is_keyframe};
use common::*;
use media::viewer::{NewViewer, OfferedCodec, Viewer, ViewerOptions};
use serde_json::{Value, json};

/// Offers session `session` to boat-7 in `mode`, as Chrome offers H.264.
async fn offer(addr: std::net::SocketAddr, key: &str, session: &str, mode: &str) -> Pilot {
    Pilot::offer_with(addr, key, session, OfferedCodec::chrome_like_h264(), Some(mode)).await
}

/// boat-7's config: the test pattern at a small size, loopback candidates (everything runs on
/// one machine), and a keyframe only every 60 s unless someone asks; `video.codec` left at its
/// default (`auto`).
fn config(dir: &std::path::Path, addr: std::net::SocketAddr, secret: &str) -> std::path::PathBuf {
    config_with_codec(dir, addr, secret, None)
}

/// [`config`] with `video.codec` set to `codec` (None: the default).
fn config_with_codec(
    dir: &std::path::Path,
    addr: std::net::SocketAddr,
    secret: &str,
    codec: Option<&str>,
) -> std::path::PathBuf {
    let codec = codec.map(|c| format!("  codec: {c}\n")).unwrap_or_default();
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "serverAddress: \"ws://{addr}/ws\"\nclientID: boat-7\nclientSecret: \"{secret}\"\nname: Boat 7\n\
             logLevel: info\nreconnectInterval: 0.2\n\
             telemetry:\n  systemMetrics: false\n  udp: \"\"\n  unixSocket: \"\"\n\
             video:\n  enabled: true\n  source: testpattern\n{codec}  width: 320\n  height: 240\n  \
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

/// A WHEP player's viewer and its offer: it does not trickle, so the offer waits for its
/// candidates and carries them.
async fn whep_offer(options: &ViewerOptions) -> (Viewer, String, tokio::sync::mpsc::Receiver<rtc::rtp::Packet>) {
    let NewViewer { viewer, offer, mut candidates, packets } = Viewer::offer(options).await.unwrap();
    let mut gathered = Vec::new();
    while let Some(Some(c)) = tokio::time::timeout(DEADLINE, candidates.recv()).await.unwrap() {
        gathered.push(c);
    }
    (viewer, media::sfu::with_candidates(&offer, &gathered), packets)
}

/// POSTs an SDP offer to a WHEP endpoint, as a WHEP player does.
async fn whep_post(
    http: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    key: &str,
    sdp: impl Into<reqwest::Body>,
) -> reqwest::Response {
    http.post(url).bearer_auth(key).header("content-type", "application/sdp").body(sdp).send().await.unwrap()
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
        let mut p = offer(addr, &key, &format!("fan-{i}"), "sfu").await;
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
    let mut late = offer(addr, &key, "fan-late", "sfu").await;
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
    let offered = Instant::now();
    let mut first = offer(addr, &key, "auto-1", "auto").await;
    let mode = first.mode().await;
    assert_eq!(
        (&mode["mode"], &mode["reason"], &mode["auto"]),
        (&json!("p2p"), &json!("auto_p2p_first"), &json!(true))
    );
    first.connected().await;
    first.frames_from_keyframe(5).await;

    // The second is beyond the limit of one: the SFU serves it.
    let mut second = offer(addr, &key, "auto-2", "auto").await;
    let mode = second.mode().await;
    assert_eq!((&mode["mode"], &mode["reason"]), (&json!("sfu"), &json!("viewers")), "{mode}");
    second.connected().await;
    second.frames_from_keyframe(5).await;
    sfu_counts(&running, 1, 1).await;

    // The first keeps its direct path past its deadline: its packets keep coming through the
    // deadline and a second beyond it, and neither it nor the relay moved the session.
    let past_deadline = offered + running.relay.config.media.p2p_deadline() + Duration::from_secs(1);
    while Instant::now() < past_deadline {
        first.next_packet().await;
    }
    while let Ok(v) = first.inbox.try_recv() {
        assert_ne!(v["payload"]["subtype"], "mode", "the connected p2p session was moved: {v}");
        assert_ne!(v["payload"]["subtype"], "bye", "the connected p2p session ended: {v}");
    }
    let session = running.relay.media.get("auto-1").expect("the first session is open");
    assert_eq!(session.mode, relay::media::Mode::P2p, "{session:?}");
    assert!(session.connected, "the agent's `connected` report was recorded: {session:?}");

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
    let r = whep_post(&http, format!("http://{addr}/whep/no-such-boat"), &key, "v=0\r\n").await;
    assert_eq!(r.status(), 404);
    let r = whep_post(&http, &url, &key, "v=0\r\n").await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "target_offline", "{body}");

    let mut agent = RunningAgent::spawn(&config(dir.path(), addr, &secret), &[]);
    agent.wait_for_log("authenticated with the relay").await;
    // Not SDP a sender can answer: refused, and no upstream is opened for it.
    let r = whep_post(&http, &url, &key, "v=0\r\n").await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    assert_eq!(running.relay.sfu.as_ref().unwrap().stats().publications, 0);

    // A WHEP player does not trickle: it offers with its candidates in the SDP.
    let (viewer, offer, mut packets) = whep_offer(&viewer_options()).await;
    let r = whep_post(&http, &url, &key, offer).await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    assert_eq!(r.headers()["content-type"], "application/sdp");
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("/whep/boat-7/whep-"), "{location}");
    let answer = r.text().await.unwrap();
    assert!(answer.contains("a=candidate:"), "the answer carries the relay's candidates: {answer}");
    viewer.apply_answer(&answer).await.unwrap();
    tokio::time::timeout(DEADLINE, viewer.wait_connected()).await.unwrap().unwrap();
    frames_from_keyframe(&mut packets, 10).await;
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

    // A WHEP session ends with its device: once the device is gone, nothing is left to DELETE.
    let (second, offer, _packets) = whep_offer(&viewer_options()).await;
    let r = whep_post(&http, &url, &key, offer).await;
    assert_eq!(r.status(), 201);
    let second_url = format!("http://{addr}{}", r.headers()["location"].to_str().unwrap());
    sfu_counts(&running, 1, 1).await;
    agent.child.kill().await.unwrap();
    sfu_counts(&running, 0, 0).await;
    let r = http.delete(&second_url).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 404);
    second.close().await;
    running.shutdown(Duration::from_secs(5)).await;
}

/// What Debian's Firefox offers without its OpenH264 plugin: VP8 and VP9, no H.264.
fn firefox_codecs() -> Vec<OfferedCodec> {
    vec![
        OfferedCodec::new("video/VP8", "max-fs=12288;max-fr=60", 120),
        OfferedCodec::new("video/VP9", "profile-id=0", 121),
    ]
}

/// Reads until a VP8 keyframe, then `n` frames (RTP timestamps) from it.
async fn vp8_frames_from_keyframe(p: &mut Pilot, n: usize) {
    let mut stamps: Vec<u32> = Vec::new();
    while stamps.len() < n {
        let pkt = p.next_packet().await;
        if stamps.is_empty() && !media::gst::vp8_rtp_is_keyframe(&rtc::shared::marshal::Marshal::marshal(&pkt).unwrap())
        {
            continue;
        }
        if stamps.last() != Some(&pkt.header.timestamp) {
            stamps.push(pkt.header.timestamp);
        }
    }
}

/// The relay does not transcode: the device's upstream is opened in a codec its first viewer
/// decodes (Firefox without OpenH264: VP8, from an agent on the default `auto`), later viewers
/// get that codec, and one that cannot decode it is refused with a message saying so, without
/// disturbing the others. An offer with neither codec is refused before any upstream opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_codec_follows_the_first_viewer_and_a_viewer_without_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let running = relay(dir.path(), |_| {}).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "view");
    let mut agent = RunningAgent::spawn(&config(dir.path(), addr, &secret), &[]);
    agent.wait_for_log("authenticated with the relay").await;

    let vp9_only = vec![OfferedCodec::new("video/VP9", "profile-id=0", 121)];
    let mut neither = Pilot::offer_with(addr, &key, "sfu-vp9", vp9_only, Some("sfu")).await;
    let bye = neither.recv_until("bye", |v| v["payload"]["subtype"] == "bye").await;
    assert_eq!(bye["payload"]["reason"], "sfu_failed", "{bye}");
    let message = bye["payload"]["message"].as_str().unwrap_or_default();
    for part in ["video/H264", "video/VP8", "offered: video/VP9"] {
        assert!(message.contains(part), "{message:?} does not name {part:?}");
    }
    assert_eq!(running.relay.sfu.as_ref().unwrap().stats().publications, 0, "an upstream was opened for it");

    let mut firefox = Pilot::offer_with(addr, &key, "sfu-firefox", firefox_codecs(), Some("sfu")).await;
    firefox.connected().await;
    vp8_frames_from_keyframe(&mut firefox, 10).await;
    let negotiated = firefox.viewer.codec().await.unwrap();
    assert_eq!(negotiated.mime_type.to_ascii_lowercase(), "video/vp8", "{negotiated:?}");
    let line = agent.wait_for_log("video session started session=sfu-").await;
    assert!(line.contains("codec=Vp8"), "the device answered the upstream in VP8: {line}");

    // Chrome decodes VP8 too: it gets the same stream.
    let mut chrome_codecs = OfferedCodec::chrome_like_h264();
    chrome_codecs.push(OfferedCodec::vp8());
    let mut chrome = Pilot::offer_with(addr, &key, "sfu-chrome", chrome_codecs, Some("sfu")).await;
    chrome.connected().await;
    vp8_frames_from_keyframe(&mut chrome, 10).await;
    assert_eq!(chrome.viewer.codec().await.unwrap().mime_type.to_ascii_lowercase(), "video/vp8");
    sfu_counts(&running, 1, 2).await;

    // A viewer with H.264 alone cannot be served from a VP8 stream.
    let mut h264_only = offer(addr, &key, "sfu-h264", "sfu").await;
    let bye = h264_only.recv_until("bye", |v| v["payload"]["subtype"] == "bye").await;
    assert_eq!(bye["payload"]["reason"], "sfu_failed", "{bye}");
    let message = bye["payload"]["message"].as_str().unwrap_or_default();
    for part in ["stream through the relay is video/VP8", "does not transcode", "offered: video/H264"] {
        assert!(message.contains(part), "{message:?} does not name {part:?}");
    }
    // The others go on (the keyframe interval is 60 s: frames, not a keyframe, are awaited).
    firefox.drain();
    let mut stamps = std::collections::BTreeSet::new();
    while stamps.len() < 5 {
        stamps.insert(firefox.next_packet().await.header.timestamp);
    }
    sfu_counts(&running, 1, 2).await;

    firefox.leave().await;
    chrome.leave().await;
    h264_only.viewer.close().await;
    neither.viewer.close().await;
    drop(agent);
    running.shutdown(Duration::from_secs(5)).await;
}

/// An agent that sends H.264 only, and a first SFU viewer that decodes no H.264: the relay
/// offers the device VP8 alone, the device refuses, and the viewer hears why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h264_only_agent_refuses_an_upstream_for_a_vp8_viewer_and_the_viewer_hears_why() {
    let dir = tempfile::tempdir().unwrap();
    let running = relay(dir.path(), |_| {}).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "view");
    let mut agent = RunningAgent::spawn(&config_with_codec(dir.path(), addr, &secret, Some("h264")), &[]);
    agent.wait_for_log("authenticated with the relay").await;

    let mut firefox = Pilot::offer_with(addr, &key, "sfu-firefox", firefox_codecs(), Some("sfu")).await;
    let bye = firefox.recv_until("bye", |v| v["payload"]["subtype"] == "bye").await;
    assert_eq!(bye["payload"]["reason"], "sfu_failed", "{bye}");
    let message = bye["payload"]["message"].as_str().unwrap_or_default();
    for part in ["negotiation_failed", "can send as video/H264", "offered: video/VP8"] {
        assert!(message.contains(part), "{message:?} does not name {part:?}");
    }
    sfu_counts(&running, 0, 0).await;
    firefox.viewer.close().await;
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
    let (viewer, offer, mut packets) = whep_offer(&options).await;
    let r = whep_post(&reqwest::Client::new(), format!("http://{addr}/whep/boat-7"), &key, offer).await;
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
    frames_from_keyframe(&mut packets, 5).await;
    viewer.close().await;
    drop(agent);
    running.shutdown(Duration::from_secs(5)).await;
}
