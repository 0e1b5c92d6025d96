//! `tether-bench sfu`: what the relay's SFU costs. One publisher sends synthetic H.264 at a fixed
//! bitrate; the relay (the release binary, a child process, pinned to core 0) pulls it as the SFU
//! upstream and forwards it to N receivers; this process (pinned to core 1) is both the publisher
//! and the receivers.
//!
//! - The publisher is a device: it connects to `/ws` with its secret, answers the relay's
//!   upstream `offer` (`sfu-...`, from `relay`) with a [`VideoSender`], trickles its candidates,
//!   and once connected writes one frame every 1/fps: FU-A fragments of one NAL unit (an IDR,
//!   preceded by SPS and PPS, every `--keyframe-every` frames and whenever the relay asks for a
//!   keyframe, at most every 500 ms like the agent; a P slice otherwise). Every packet carries,
//!   right after its NAL (or FU) header, its send time (ns on this process's monotonic clock) and
//!   its index in the whole stream.
//! - Each receiver is a pilot: its own operator WebSocket, a [`Viewer`] offering with
//!   `"mode":"sfu"`, and the console's signaling (answer and candidates in, candidates and state
//!   out). It keeps (index, send time, arrival time, size) of every packet.
//! - Per receiver count, a fresh relay: receivers join (`--join-concurrency` at a time) and each
//!   waits for its first keyframe; after `--warmup` seconds a window of `--seconds` starts. The
//!   relay's CPU comes from `/proc/<pid>/stat`, its peak RSS from `VmHWM`. After the window one
//!   more receiver joins, to time a join while the others are watching.
//!
//! Everything runs on one machine and one clock (`CLOCK_MONOTONIC`), so one-way latency is
//! arrival minus send time, with no clock offset.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::bench_proc::{cpu_seconds, have_taskset, parse_stat, status_kib};
use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use media::rtc::{Candidate, PeerEvent, PeerSettings, VideoCodec, VideoSender};
use media::viewer::{NewViewer, OfferedCodec, Viewer, ViewerOptions};
use rtc::rtp;
use serde_json::{Value, json};

use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// The device that publishes.
const DEVICE: &str = "bench-cam";
/// The stamp every packet carries: send time (ns) and index, both big-endian u64.
const STAMP: usize = 16;
/// How long a receiver may take to connect and see its first keyframe.
const SETUP_DEADLINE: Duration = Duration::from_secs(60);
/// The agent ignores keyframe requests closer together than this; so does the publisher.
const KEYFRAME_MIN_GAP: Duration = Duration::from_millis(500);

/// `tether-bench sfu` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct SfuArgs {
    /// Receiver counts, one run (and one fresh relay) each, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    pub receivers: Vec<usize>,
    /// Length of the measurement window of each run, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// The publisher's bitrate (RTP payload and header), kbit/s.
    #[arg(long, default_value_t = 2000)]
    pub bitrate_kbps: u32,
    /// Frames per second.
    #[arg(long, default_value_t = 25)]
    pub fps: u32,
    /// A keyframe every this many frames (besides those the relay asks for). Keyframes are
    /// three times the average frame, P frames smaller, so the average stays at the bitrate.
    #[arg(long, default_value_t = 50)]
    pub keyframe_every: u32,
    /// RTP payload size of a full FU-A fragment, bytes.
    #[arg(long, default_value_t = 1100)]
    pub packet_bytes: usize,
    /// Seconds between the last receiver's first keyframe and the start of the window.
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
    /// How many receivers set up at the same time.
    #[arg(long, default_value_t = 10)]
    pub join_concurrency: usize,
    /// The relay binary to start.
    #[arg(long, default_value = "target/release/tether-relay")]
    pub relay_bin: PathBuf,
    /// Where each run's relay keeps its database and log (`<dir>/n<receivers>`), recreated per run.
    #[arg(long, default_value = "target/bench-sfu")]
    pub data_dir: PathBuf,
    /// Do not pin the relay to core 0 and this process to core 1.
    #[arg(long)]
    pub no_pin: bool,
}

/// Pins this process to core 1 (before any thread exists, so every thread inherits it), builds
/// the runtime and runs every receiver count.
pub fn main(args: SfuArgs) -> anyhow::Result<()> {
    let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| (0..nix::sched::CpuSet::count()).filter(|&i| set.is_set(i).unwrap_or(false)).count())
        .unwrap_or(1);
    let pin = !args.no_pin && cpus >= 2;
    if pin {
        let mut set = nix::sched::CpuSet::new();
        set.set(1)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).context("pinning to core 1")?;
    } else if !args.no_pin {
        eprintln!("only {cpus} CPU available: not pinning");
    }
    // One worker: the receivers share the one core this process has; the publisher has its own
    // thread (and runtime) on the same core, so its CPU can be told apart.
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("bench-rx").enable_all().build()?;
    rt.block_on(run_all(args, pin))
}

fn clock() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds on the process's one clock.
fn now_ns() -> u64 {
    clock().elapsed().as_nanos() as u64
}

/// This process's CPU seconds: all threads, and the publisher's thread alone.
fn own_cpu() -> anyhow::Result<(f64, f64)> {
    let total = cpu_seconds("self")?;
    let mut publisher = 0.0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else { continue };
        let (name, secs) = parse_stat(&stat)?;
        if name == "bench-pub" {
            publisher += secs;
        }
    }
    Ok((total, publisher))
}

// ---------------------------------------------------------------------------------------------
// Relay

/// The store of one run: the device and a pilot with `view`; returns the device's secret and
/// the pilot's API key.
fn provision(dir: &Path) -> anyhow::Result<(String, String)> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let store = relay::store::Store::open(&dir.join("tether.db"))?;
    relay::server::bootstrap(&store, Some("tk_bench_0123456789abcdef"))?;
    let creds = store.call_sync(|c| {
        let secret = relay::auth::issue_device_sync(c, DEVICE, "default", "Bench camera")?;
        relay::store::q::create_operator(c, "op-bench", "default", "bench", relay::store::OperatorRole::Pilot)?;
        relay::store::q::set_permission(c, "op-bench", "org", "view")?;
        Ok((secret, relay::auth::issue_api_key_sync(c, "op-bench", Some("tether-bench sfu"))?))
    })?;
    Ok(creds)
}

struct RelayProcess {
    child: tokio::process::Child,
    pid: u32,
    addr: String,
}

async fn spawn_relay(args: &SfuArgs, dir: &Path, taskset: bool) -> anyhow::Result<RelayProcess> {
    let mut cmd = if taskset {
        let mut c = tokio::process::Command::new("taskset");
        c.args(["-c", "0"]).arg(&args.relay_bin);
        c
    } else {
        tokio::process::Command::new(&args.relay_bin)
    };
    let log = std::fs::File::create(dir.join("relay.log"))?;
    cmd.arg("--data-dir")
        .arg(dir)
        .args(["--port", "0", "--bind", "127.0.0.1", "--log-level", "warn", "--rtc-loopback"])
        // Signaling is not the subject: few pings, no idle timeouts, no connection limit.
        .args(["--ping-interval", "60", "--connection-timeout", "600", "--connections-per-minute", "100000"])
        .env_remove("PORT")
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("starting {}", args.relay_bin.display()))?;
    // taskset execs the relay: same pid.
    let pid = child.id().context("relay pid")?;
    let (addr, mut lines) = crate::bench_proc::relay_listen_addr(&mut child, &dir.join("relay.log")).await?;
    // Keep draining stdout so the relay never blocks on it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    if !taskset && !args.no_pin {
        // No taskset: pin the threads that exist now (the runtime's workers start with it).
        let mut set = nix::sched::CpuSet::new();
        set.set(0)?;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let tid: i32 = task?.file_name().to_string_lossy().parse()?;
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set);
        }
    }
    Ok(RelayProcess { child, pid, addr })
}

// ---------------------------------------------------------------------------------------------
// Publisher

#[derive(Debug, Default)]
struct PubStats {
    authenticated: AtomicBool,
    connected: AtomicBool,
    /// Index of the next packet (= packets sent so far).
    next_index: AtomicU64,
    bytes: AtomicU64,
    keyframes: AtomicU64,
    keyframe_requests: AtomicU64,
    /// Latest bandwidth figure the relay sent (REMB of its weakest viewer), bits/s.
    remb_bps: AtomicU64,
    upstream_offers: AtomicU64,
    error: Mutex<Option<String>>,
}

#[derive(Debug, Clone, Copy)]
struct Stream {
    fps: u32,
    bitrate_kbps: u32,
    keyframe_every: u32,
    packet_bytes: usize,
}

type Current = Arc<Mutex<Option<Arc<VideoSender>>>>;

fn publisher_thread(
    addr: String,
    secret: String,
    stream: Stream,
    stats: Arc<PubStats>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("bench-pub".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                *stats.error.lock().unwrap() = Some(format!("publisher runtime: {e}"));
                return;
            }
        };
        if let Err(e) = rt.block_on(publish(addr, secret, stream, stats.clone(), stop)) {
            *stats.error.lock().unwrap() = Some(format!("{e:#}"));
        }
    })
}

/// The device: answers the relay's upstream offers and streams while connected.
async fn publish(
    addr: String,
    secret: String,
    stream: Stream,
    stats: Arc<PubStats>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut req = format!("ws://{addr}/ws?clientID={DEVICE}").into_client_request()?;
    req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {secret}"))?);
    let (ws, _) = tokio_tungstenite::connect_async(req).await.context("device WebSocket")?;
    let (mut sink, mut incoming) = ws.split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Value>();
    let writer = tokio::spawn(async move {
        while let Some(v) = out_rx.recv().await {
            if sink.send(Message::Text(v.to_string().into())).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let current: Current = Arc::new(Mutex::new(None));
    let keyframe_wanted = Arc::new(AtomicBool::new(true));
    let streamer = tokio::spawn(stream_frames(stream, stats.clone(), current.clone(), keyframe_wanted.clone()));
    let settings =
        PeerSettings { codec: VideoCodec::H264, mdns: false, include_loopback: true, ..PeerSettings::default() };
    let result = loop {
        let m = tokio::select! {
            m = incoming.next() => m,
            _ = stop.changed() => break Ok(()),
        };
        let text = match m {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            Some(Err(e)) => break Err(anyhow::anyhow!("device WebSocket: {e}")),
            None => break Err(anyhow::anyhow!("the relay closed the device's WebSocket")),
        };
        let v: Value = serde_json::from_str(&text)?;
        match v["type"].as_str() {
            Some("auth_ok") => stats.authenticated.store(true, Ordering::Release),
            Some("error") => break Err(anyhow::anyhow!("the relay sent the device an error: {v}")),
            Some("webrtc") => {}
            _ => continue,
        }
        let p = &v["payload"];
        let session = p["sessionID"].as_str().unwrap_or_default().to_owned();
        match p["subtype"].as_str() {
            Some("offer") => {
                stats.upstream_offers.fetch_add(1, Ordering::Relaxed);
                let old = current.lock().unwrap().take();
                if let Some(old) = old {
                    old.close().await;
                }
                stats.connected.store(false, Ordering::Release);
                let sdp = p["sdp"].as_str().unwrap_or_default();
                let (etx, erx) = mpsc::channel(256);
                match VideoSender::answer(&settings, sdp, etx).await {
                    Ok((sender, answer)) => {
                        let _ = out.send(json!({"type": "webrtc", "clientID": "relay",
                            "payload": {"subtype": "answer", "sessionID": session, "sdp": answer}}));
                        *current.lock().unwrap() = Some(Arc::new(sender));
                        tokio::spawn(sender_events(session, erx, out.clone(), stats.clone(), keyframe_wanted.clone()));
                    }
                    Err(e) => break Err(anyhow::anyhow!("answering the relay's offer: {e}")),
                }
            }
            Some("ice_candidate") => {
                let sender = current.lock().unwrap().clone();
                if let (Some(sender), Ok(c)) = (sender, serde_json::from_value::<Candidate>(p.clone())) {
                    let _ = sender.add_remote_candidate(c).await;
                }
            }
            Some("bye") => {
                let old = current.lock().unwrap().take();
                stats.connected.store(false, Ordering::Release);
                if let Some(old) = old {
                    old.close().await;
                }
            }
            _ => {}
        }
    };
    streamer.abort();
    let sender = current.lock().unwrap().take();
    if let Some(sender) = sender {
        sender.close().await;
    }
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    result
}

/// The sender's events: candidates and state to the relay, keyframe requests and REMB noted.
async fn sender_events(
    session: String,
    mut events: mpsc::Receiver<PeerEvent>,
    out: mpsc::UnboundedSender<Value>,
    stats: Arc<PubStats>,
    keyframe_wanted: Arc<AtomicBool>,
) {
    while let Some(ev) = events.recv().await {
        match ev {
            PeerEvent::LocalCandidate(c) => {
                let mut payload = serde_json::to_value(c.unwrap_or_default()).unwrap_or_default();
                payload["subtype"] = json!("ice_candidate");
                payload["sessionID"] = json!(session);
                let _ = out.send(json!({"type": "webrtc", "clientID": "relay", "payload": payload}));
            }
            PeerEvent::State(state) => {
                match state.as_str() {
                    "connected" => {
                        keyframe_wanted.store(true, Ordering::Release);
                        stats.connected.store(true, Ordering::Release);
                    }
                    "failed" | "closed" | "disconnected" => stats.connected.store(false, Ordering::Release),
                    _ => {}
                }
                let _ = out.send(json!({"type": "webrtc", "clientID": "relay",
                    "payload": {"subtype": "state", "sessionID": session, "state": state}}));
            }
            PeerEvent::KeyframeRequested => {
                stats.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                keyframe_wanted.store(true, Ordering::Release);
            }
            PeerEvent::Bandwidth { bps } => stats.remb_bps.store(bps, Ordering::Relaxed),
            _ => {}
        }
    }
}

/// One RTP packet: `nal_header` (1 byte, or FU indicator + FU header), the stamp (send time,
/// index), then filler up to `len` payload bytes.
fn packet(header: &[u8], len: usize, marker: bool, seq: u16, ts: u32, stats: &PubStats) -> rtp::Packet {
    let len = len.max(header.len() + STAMP);
    let mut payload = vec![0u8; len];
    payload[..header.len()].copy_from_slice(header);
    let index = stats.next_index.fetch_add(1, Ordering::AcqRel);
    payload[header.len()..header.len() + 8].copy_from_slice(&now_ns().to_be_bytes());
    payload[header.len() + 8..header.len() + STAMP].copy_from_slice(&index.to_be_bytes());
    stats.bytes.fetch_add(len as u64 + 12, Ordering::Relaxed);
    rtp::Packet {
        header: rtp::Header {
            version: 2,
            marker,
            payload_type: 102,
            sequence_number: seq,
            timestamp: ts,
            ssrc: 0x7e7e_0001,
            ..Default::default()
        },
        payload: Bytes::from(payload),
    }
}

/// The encoder: one frame every 1/fps while the upstream is connected.
async fn stream_frames(stream: Stream, stats: Arc<PubStats>, current: Current, keyframe_wanted: Arc<AtomicBool>) {
    let period = Duration::from_secs_f64(1.0 / f64::from(stream.fps.max(1)));
    let average = (f64::from(stream.bitrate_kbps) * 1000.0 / 8.0 / f64::from(stream.fps.max(1))) as usize;
    let k = stream.keyframe_every.max(1) as usize;
    let (key_bytes, p_bytes) = if k >= 4 { (3 * average, average * (k - 3) / (k - 1)) } else { (average, average) };
    let chunk = stream.packet_bytes.max(64) - 2;
    let mut next = tokio::time::Instant::now();
    let mut frame: u32 = 0;
    let mut seq: u16 = 0;
    let mut since_key = usize::MAX;
    let mut last_key: Option<Instant> = None;
    loop {
        next += period;
        let now = tokio::time::Instant::now();
        if now > next + Duration::from_secs(1) {
            next = now; // fell far behind (e.g. suspended): do not burst to catch up
        }
        tokio::time::sleep_until(next).await;
        let ts = frame.wrapping_mul(90_000 / stream.fps.max(1));
        frame = frame.wrapping_add(1);
        let sender = current.lock().unwrap().clone();
        let Some(sender) = sender.filter(|_| stats.connected.load(Ordering::Acquire)) else { continue };
        let requested =
            keyframe_wanted.load(Ordering::Acquire) && last_key.is_none_or(|t| t.elapsed() >= KEYFRAME_MIN_GAP);
        let key = since_key >= k || requested;
        let mut packets = Vec::with_capacity(32);
        let (nal_type, nri, mut bytes) = if key { (5u8, 3u8, key_bytes) } else { (1u8, 2u8, p_bytes) };
        if key {
            keyframe_wanted.store(false, Ordering::Release);
            last_key = Some(Instant::now());
            since_key = 0;
            stats.keyframes.fetch_add(1, Ordering::Relaxed);
            // SPS and PPS as single NAL unit packets.
            packets.push(packet(&[0x67], 1 + STAMP + 8, false, seq, ts, &stats));
            seq = seq.wrapping_add(1);
            packets.push(packet(&[0x68], 1 + STAMP + 4, false, seq, ts, &stats));
            seq = seq.wrapping_add(1);
            bytes = bytes.saturating_sub(2 * (12 + 1 + STAMP) + 12);
        }
        since_key = since_key.saturating_add(1);
        // FU-A fragments of one NAL unit of `bytes` payload bytes (its header byte is folded
        // into the FU indicator and header).
        let fragments = bytes.div_ceil(chunk).max(1);
        let mut left = bytes;
        for i in 0..fragments {
            let this = left.min(chunk).max(STAMP);
            left = left.saturating_sub(chunk);
            let start = if i == 0 { 0x80 } else { 0 };
            let end = if i + 1 == fragments { 0x40 } else { 0 };
            let header = [(nri << 5) | 28, start | end | nal_type];
            packets.push(packet(&header, 2 + this, i + 1 == fragments, seq, ts, &stats));
            seq = seq.wrapping_add(1);
        }
        for p in packets {
            if sender.write_packet(p).await.is_err() {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Receivers

/// One received packet.
#[derive(Debug, Clone, Copy)]
struct Rec {
    index: u64,
    sent: u64,
    arrived: u64,
    bytes: u32,
}

/// The send time, index and "starts a keyframe" of a publisher packet.
fn read_stamp(payload: &[u8]) -> Option<(u64, u64, bool)> {
    let nal = payload.first()? & 0x1f;
    let (offset, key) = match nal {
        28 => {
            let fu = *payload.get(1)?;
            (2, fu & 0x80 != 0 && fu & 0x1f == 5)
        }
        7 => (1, true),
        _ => (1, false),
    };
    let s = payload.get(offset..offset + STAMP)?;
    let sent = u64::from_be_bytes(s[..8].try_into().ok()?);
    let index = u64::from_be_bytes(s[8..].try_into().ok()?);
    Some((sent, index, key))
}

#[derive(Debug, Default)]
struct Joined {
    offer: u64,
    answer: Option<u64>,
    connected: Option<u64>,
    first_packet: Option<u64>,
    first_keyframe: Option<u64>,
}

#[derive(Debug)]
struct Received {
    joined: Joined,
    recs: Vec<Rec>,
    dropped: u64,
    ended: Option<String>,
}

/// A pilot's operator WebSocket (ticket first).
async fn operator(addr: &str, key: &str) -> anyhow::Result<Ws> {
    let t: Value = reqwest::Client::new()
        .post(format!("http://{addr}/api/auth/ws-ticket"))
        .bearer_auth(key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let ticket = t["ticket"].as_str().context("no ticket")?;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/admin?ticket={ticket}")).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"auth_ok\"") => return Ok(ws),
            Some(Ok(Message::Text(t))) if t.contains("\"error\"") => bail!("operator refused: {t}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("the relay closed the operator WebSocket"),
        }
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The console's signaling: the relay's answer and candidates to the viewer, the viewer's
/// candidates and state to the relay. Ends on `close`, noting why a session ended otherwise.
async fn pump(
    mut ws: Ws,
    viewer: Arc<Viewer>,
    mut candidates: mpsc::UnboundedReceiver<Option<Candidate>>,
    session: String,
    answered_at: Arc<AtomicU64>,
    ended: Arc<Mutex<Option<String>>>,
    mut close: oneshot::Receiver<()>,
) {
    let mut gathering = true;
    let mut state = viewer.state();
    let mut answered = false;
    let mut early: Vec<Candidate> = Vec::new();
    let send = |v: Value| Message::Text(v.to_string().into());
    loop {
        tokio::select! {
            m = ws.next() => {
                let text = match m {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        *ended.lock().unwrap() = Some(format!("operator WebSocket: {e}"));
                        return;
                    }
                    None => {
                        *ended.lock().unwrap() = Some("the relay closed the operator WebSocket".into());
                        return;
                    }
                };
                let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                if v["type"] == "error" {
                    *ended.lock().unwrap() = Some(format!("relay error: {v}"));
                    continue;
                }
                let p = &v["payload"];
                if v["type"] != "webrtc" || p["sessionID"] != session.as_str() {
                    continue;
                }
                match p["subtype"].as_str() {
                    Some("answer") => {
                        answered_at.store(now_ns(), Ordering::Release);
                        if let Err(e) = viewer.apply_answer(p["sdp"].as_str().unwrap_or_default()).await {
                            *ended.lock().unwrap() = Some(format!("the relay's answer: {e}"));
                        }
                        answered = true;
                        for c in early.drain(..) {
                            let _ = viewer.add_remote_candidate(c).await;
                        }
                    }
                    Some("ice_candidate") => {
                        if let Ok(c) = serde_json::from_value::<Candidate>(p.clone()) {
                            if answered {
                                let _ = viewer.add_remote_candidate(c).await;
                            } else {
                                early.push(c);
                            }
                        }
                    }
                    Some("bye") => {
                        *ended.lock().unwrap() = Some(format!("bye: {p}"));
                    }
                    _ => {}
                }
            }
            c = candidates.recv(), if gathering => {
                let Some(c) = c else {
                    gathering = false;
                    continue;
                };
                let mut payload = serde_json::to_value(c.unwrap_or_default()).unwrap_or_default();
                payload["subtype"] = json!("ice_candidate");
                payload["sessionID"] = json!(session);
                let _ = ws.send(send(json!({"type": "webrtc", "clientID": DEVICE, "payload": payload}))).await;
            }
            changed = state.changed() => {
                if changed.is_err() {
                    continue;
                }
                let s = state.borrow_and_update().to_string();
                let _ = ws.send(send(json!({"type": "webrtc", "clientID": DEVICE,
                    "payload": {"subtype": "state", "sessionID": session, "state": s}}))).await;
            }
            _ = &mut close => {
                let _ = ws.close(None).await;
                return;
            }
        }
    }
}

/// One receiver: joins (holding a setup permit until its first keyframe), reports ready, then
/// records every packet until `stop`.
async fn receiver(
    session: String,
    addr: String,
    key: String,
    setup: Arc<Semaphore>,
    ready: mpsc::UnboundedSender<Result<(), String>>,
    mut stop: watch::Receiver<bool>,
) -> Received {
    let permit = setup.acquire_owned().await.ok();
    let mut joined = Joined::default();
    let ended = Arc::new(Mutex::new(None));
    let fail = |ready: &mpsc::UnboundedSender<Result<(), String>>, joined: Joined, why: String| {
        let _ = ready.send(Err(format!("{session}: {why}")));
        Received { joined, recs: Vec::new(), dropped: 0, ended: Some(why) }
    };
    let mut ws = match operator(&addr, &key).await {
        Ok(ws) => ws,
        Err(e) => return fail(&ready, joined, format!("{e:#}")),
    };
    let options = ViewerOptions {
        codecs: OfferedCodec::chrome_like_h264(),
        include_loopback: true,
        udp_addrs: vec!["127.0.0.1:0".to_owned()],
        ..ViewerOptions::default()
    };
    let NewViewer { viewer, offer, candidates, mut packets } = match Viewer::offer(&options).await {
        Ok(v) => v,
        Err(e) => return fail(&ready, joined, format!("viewer: {e}")),
    };
    let viewer = Arc::new(viewer);
    joined.offer = now_ns();
    let offer = json!({"type": "webrtc", "correlationID": session, "clientID": DEVICE,
        "payload": {"subtype": "offer", "sessionID": session, "sdp": offer, "mode": "sfu"}});
    if let Err(e) = ws.send(Message::Text(offer.to_string().into())).await {
        return fail(&ready, joined, format!("sending the offer: {e}"));
    }
    let answered_at = Arc::new(AtomicU64::new(0));
    let (close, close_rx) = oneshot::channel();
    let pump: JoinHandle<()> = tokio::spawn(pump(
        ws,
        viewer.clone(),
        candidates,
        session.clone(),
        answered_at.clone(),
        ended.clone(),
        close_rx,
    ));
    let mut recs = Vec::with_capacity(16_384);
    let deadline = tokio::time::Instant::now() + SETUP_DEADLINE;
    let mut watch_state = viewer.state();
    let mut reported = false;
    let mut permit = permit;
    loop {
        let p = tokio::select! {
            p = packets.recv() => p,
            _ = tokio::time::sleep_until(deadline), if !reported => {
                let why = format!("no keyframe within {} s (state {})", SETUP_DEADLINE.as_secs(),
                    *viewer.state().borrow());
                let _ = ready.send(Err(format!("{session}: {why}")));
                *ended.lock().unwrap() = Some(why);
                break;
            }
            _ = watch_state.changed(), if joined.connected.is_none() => {
                if *watch_state.borrow_and_update() == media::viewer::ConnectionState::Connected {
                    joined.connected = Some(now_ns());
                }
                continue;
            }
            _ = stop.changed() => break,
        };
        let Some(p) = p else { break };
        let arrived = now_ns();
        let Some((sent, index, key)) = read_stamp(&p.payload) else { continue };
        recs.push(Rec { index, sent, arrived, bytes: (p.payload.len() + 12) as u32 });
        joined.first_packet.get_or_insert(arrived);
        if key && joined.first_keyframe.is_none() {
            joined.first_keyframe = Some(arrived);
            reported = true;
            permit.take();
            let _ = ready.send(Ok(()));
        }
    }
    let a = answered_at.load(Ordering::Acquire);
    joined.answer = (a > 0).then_some(a);
    let _ = close.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), pump).await;
    let dropped = viewer.dropped_packets();
    viewer.close().await;
    let ended = ended.lock().unwrap().take();
    Received { joined, recs, dropped, ended }
}

// ---------------------------------------------------------------------------------------------
// One run

#[derive(Debug, Clone, serde::Serialize)]
struct RunResult {
    receivers: usize,
    window_s: f64,
    publisher_pps: f64,
    publisher_mbps: f64,
    delivered_pps: f64,
    delivered_mbps: f64,
    relay_cpu_s: f64,
    relay_core_pct: f64,
    forwarded_per_core_s: f64,
    relay_cpu_us_per_packet: f64,
    relay_peak_rss_mib: f64,
    relay_rss_mib: f64,
    relay_threads: u64,
    loss_pct: f64,
    queue_drops: u64,
    latency_ms_p50: f64,
    latency_ms_p99: f64,
    latency_ms_p999: f64,
    latency_ms_max: f64,
    jitter_ms_median: f64,
    jitter_ms_max: f64,
    receiver_p50_ms_best: f64,
    receiver_p50_ms_worst: f64,
    bench_core_pct: f64,
    publisher_core_pct: f64,
    keyframes_in_window: u64,
    keyframe_requests_total: u64,
    remb_kbps_last: f64,
    first_join_packet_ms: f64,
    first_join_keyframe_ms: f64,
    join_packet_ms_p50: Option<f64>,
    join_packet_ms_max: Option<f64>,
    join_keyframe_ms_p50: Option<f64>,
    join_keyframe_ms_max: Option<f64>,
    late_join_answer_ms: Option<f64>,
    late_join_connected_ms: Option<f64>,
    late_join_packet_ms: Option<f64>,
    late_join_keyframe_ms: Option<f64>,
}

fn pct_of(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

async fn run_one(args: &SfuArgs, n: usize, taskset: bool) -> anyhow::Result<RunResult> {
    let dir = args.data_dir.join(format!("n{n}"));
    let (secret, key) = provision(&dir)?;
    let mut relay = spawn_relay(args, &dir, taskset).await?;
    let addr = relay.addr.clone();
    eprintln!("[{n} receivers] relay pid {} on {addr}", relay.pid);

    let stats = Arc::new(PubStats::default());
    let (stop_pub, stop_pub_rx) = watch::channel(false);
    let stream = Stream {
        fps: args.fps,
        bitrate_kbps: args.bitrate_kbps,
        keyframe_every: args.keyframe_every,
        packet_bytes: args.packet_bytes,
    };
    let publisher = publisher_thread(addr.clone(), secret, stream, stats.clone(), stop_pub_rx)?;
    let t = Instant::now();
    while !stats.authenticated.load(Ordering::Acquire) {
        if let Some(e) = stats.error.lock().unwrap().clone() {
            bail!("publisher: {e}");
        }
        if t.elapsed() > Duration::from_secs(15) {
            bail!("the publisher did not authenticate within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Join.
    let setup = Arc::new(Semaphore::new(args.join_concurrency.max(1)));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tasks.push(tokio::spawn(receiver(
            format!("bench-{i}"),
            addr.clone(),
            key.clone(),
            setup.clone(),
            ready_tx.clone(),
            stop_rx.clone(),
        )));
        if i == 0 {
            // The first one opens the upstream alone, so its join time is the cold one.
            match tokio::time::timeout(SETUP_DEADLINE + Duration::from_secs(5), ready_rx.recv()).await {
                Ok(Some(Ok(()))) => {}
                Ok(Some(Err(e))) => bail!("receiver failed: {e}"),
                _ => bail!("the first receiver did not get a keyframe in time"),
            }
        }
    }
    for _ in 1..n {
        match tokio::time::timeout(SETUP_DEADLINE + Duration::from_secs(5), ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => bail!("receiver failed: {e}"),
            _ => bail!("not every receiver got a keyframe in time"),
        }
    }
    eprintln!("[{n} receivers] all receiving; warming up {} s", args.warmup);
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;

    // The window.
    let pid = relay.pid.to_string();
    let (t0, cpu0, own0, i0, b0, k0) = (
        now_ns(),
        cpu_seconds(&pid)?,
        own_cpu()?,
        stats.next_index.load(Ordering::Acquire),
        stats.bytes.load(Ordering::Relaxed),
        stats.keyframes.load(Ordering::Relaxed),
    );
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    let (t1, cpu1, own1, i1, b1, k1) = (
        now_ns(),
        cpu_seconds(&pid)?,
        own_cpu()?,
        stats.next_index.load(Ordering::Acquire),
        stats.bytes.load(Ordering::Relaxed),
        stats.keyframes.load(Ordering::Relaxed),
    );
    eprintln!("[{n} receivers] window done; one more receiver joins");
    // Packets of the window still in flight arrive meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A late joiner, with the others watching.
    let (late_ready, mut late_ready_rx) = mpsc::unbounded_channel();
    let (late_stop, late_stop_rx) = watch::channel(false);
    let late = tokio::spawn(receiver(
        "bench-late".into(),
        addr.clone(),
        key.clone(),
        Arc::new(Semaphore::new(1)),
        late_ready,
        late_stop_rx,
    ));
    let late_ok = matches!(
        tokio::time::timeout(SETUP_DEADLINE + Duration::from_secs(5), late_ready_rx.recv()).await,
        Ok(Some(Ok(())))
    );
    let _ = late_stop.send(true);
    let late = late.await?;
    if !late_ok {
        eprintln!("[{n} receivers] the late receiver failed: {:?}", late.ended);
    }

    let peak_rss = status_kib(relay.pid, "VmHWM:")?;
    let rss = status_kib(relay.pid, "VmRSS:")?;
    let threads = std::fs::read_to_string(format!("/proc/{}/status", relay.pid))?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0);
    let _ = stop.send(true);
    let mut results = Vec::with_capacity(n);
    for t in tasks {
        results.push(t.await?);
    }
    let _ = stop_pub.send(true);
    let _ = tokio::task::spawn_blocking(move || publisher.join()).await;
    relay.child.kill().await.ok();
    let _ = relay.child.wait().await;
    if let Some(e) = stats.error.lock().unwrap().clone() {
        eprintln!("[{n} receivers] publisher: {e}");
    }

    // Figures.
    let window_s = (t1 - t0) as f64 / 1e9;
    let sent = i1 - i0;
    let relay_cpu = cpu1 - cpu0;
    let (mut delivered, mut delivered_bytes, mut unique_total, mut drops) = (0u64, 0u64, 0u64, 0u64);
    let mut latencies: Vec<f64> = Vec::new();
    let mut jitters: Vec<f64> = Vec::new();
    // Each receiver's median latency: the fan-out writes to the receivers one after another, so
    // where a receiver sits in that order shows here.
    let mut medians: Vec<f64> = Vec::new();
    for r in &results {
        let mut own: Vec<f64> = Vec::new();
        if let Some(e) = &r.ended {
            eprintln!("[{n} receivers] a receiver ended early: {e}");
        }
        drops += r.dropped;
        let mut seen = vec![false; sent as usize];
        let (mut jitter, mut jitter_sum, mut jitter_n) = (0.0f64, 0.0f64, 0u64);
        let mut prev: Option<&Rec> = None;
        for rec in &r.recs {
            if (t0..t1).contains(&rec.arrived) {
                delivered += 1;
                delivered_bytes += u64::from(rec.bytes);
            }
            if !(i0..i1).contains(&rec.index) {
                continue;
            }
            let slot = &mut seen[(rec.index - i0) as usize];
            if *slot {
                continue; // a retransmission of one already counted
            }
            *slot = true;
            let latency = rec.arrived.saturating_sub(rec.sent) as f64 / 1e6;
            latencies.push(latency);
            own.push(latency);
            // RFC 3550 interarrival jitter, with the real send times as the timestamps.
            if let Some(p) = prev {
                let d = (rec.arrived as f64 - p.arrived as f64) - (rec.sent as f64 - p.sent as f64);
                jitter += (d.abs() - jitter) / 16.0;
                jitter_sum += jitter;
                jitter_n += 1;
            }
            prev = Some(rec);
        }
        unique_total += seen.iter().filter(|s| **s).count() as u64;
        if jitter_n > 0 {
            jitters.push(jitter_sum / jitter_n as f64 / 1e6);
        }
        if !own.is_empty() {
            own.sort_by(f64::total_cmp);
            medians.push(pct_of(&own, 0.5));
        }
    }
    medians.sort_by(f64::total_cmp);
    latencies.sort_by(f64::total_cmp);
    jitters.sort_by(f64::total_cmp);
    let expected = sent * n as u64;
    let join = |f: fn(&Joined) -> Option<u64>, r: &Received| f(&r.joined).map(|t| ms(t.saturating_sub(r.joined.offer)));
    let mut later_packet: Vec<f64> = results.iter().skip(1).filter_map(|r| join(|j| j.first_packet, r)).collect();
    let mut later_key: Vec<f64> = results.iter().skip(1).filter_map(|r| join(|j| j.first_keyframe, r)).collect();
    later_packet.sort_by(f64::total_cmp);
    later_key.sort_by(f64::total_cmp);
    let opt = |v: &[f64], p: f64| (!v.is_empty()).then(|| pct_of(v, p));
    Ok(RunResult {
        receivers: n,
        window_s,
        publisher_pps: sent as f64 / window_s,
        publisher_mbps: (b1 - b0) as f64 * 8.0 / window_s / 1e6,
        delivered_pps: delivered as f64 / window_s,
        delivered_mbps: delivered_bytes as f64 * 8.0 / window_s / 1e6,
        relay_cpu_s: relay_cpu,
        relay_core_pct: relay_cpu / window_s * 100.0,
        forwarded_per_core_s: if relay_cpu > 0.0 { delivered as f64 / relay_cpu } else { f64::INFINITY },
        relay_cpu_us_per_packet: if delivered > 0 { relay_cpu * 1e6 / delivered as f64 } else { f64::NAN },
        relay_peak_rss_mib: peak_rss as f64 / 1024.0,
        relay_rss_mib: rss as f64 / 1024.0,
        relay_threads: threads,
        loss_pct: if expected > 0 { (1.0 - unique_total as f64 / expected as f64) * 100.0 } else { f64::NAN },
        queue_drops: drops,
        latency_ms_p50: pct_of(&latencies, 0.5),
        latency_ms_p99: pct_of(&latencies, 0.99),
        latency_ms_p999: pct_of(&latencies, 0.999),
        latency_ms_max: latencies.last().copied().unwrap_or(f64::NAN),
        jitter_ms_median: pct_of(&jitters, 0.5),
        jitter_ms_max: jitters.last().copied().unwrap_or(f64::NAN),
        receiver_p50_ms_best: medians.first().copied().unwrap_or(f64::NAN),
        receiver_p50_ms_worst: medians.last().copied().unwrap_or(f64::NAN),
        bench_core_pct: (own1.0 - own0.0) / window_s * 100.0,
        publisher_core_pct: (own1.1 - own0.1) / window_s * 100.0,
        keyframes_in_window: k1 - k0,
        keyframe_requests_total: stats.keyframe_requests.load(Ordering::Relaxed),
        remb_kbps_last: stats.remb_bps.load(Ordering::Relaxed) as f64 / 1000.0,
        first_join_packet_ms: results.first().and_then(|r| join(|j| j.first_packet, r)).unwrap_or(f64::NAN),
        first_join_keyframe_ms: results.first().and_then(|r| join(|j| j.first_keyframe, r)).unwrap_or(f64::NAN),
        join_packet_ms_p50: opt(&later_packet, 0.5),
        join_packet_ms_max: later_packet.last().copied(),
        join_keyframe_ms_p50: opt(&later_key, 0.5),
        join_keyframe_ms_max: later_key.last().copied(),
        late_join_answer_ms: join(|j| j.answer, &late),
        late_join_connected_ms: join(|j| j.connected, &late),
        late_join_packet_ms: join(|j| j.first_packet, &late),
        late_join_keyframe_ms: join(|j| j.first_keyframe, &late),
    })
}

fn f1(v: f64) -> String {
    if v.is_finite() { format!("{v:.1}") } else { "-".into() }
}

fn f2(v: f64) -> String {
    if v.is_finite() { format!("{v:.2}") } else { "-".into() }
}

fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn o(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into())
}

async fn run_all(args: SfuArgs, pinned: bool) -> anyhow::Result<()> {
    if !args.relay_bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p tether-relay --bin tether-relay`",
            args.relay_bin.display()
        );
    }
    let taskset = pinned && have_taskset();
    if pinned && !taskset {
        eprintln!("taskset not found: pinning the relay's threads after start instead");
    }
    let _ = clock();
    let mut runs = Vec::new();
    for &n in &args.receivers {
        let r = run_one(&args, n, taskset).await.with_context(|| format!("the run with {n} receivers"))?;
        eprintln!("[{n} receivers] {}", serde_json::to_string(&r)?);
        runs.push(r);
        // Let the kernel reclaim the last run's sockets.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let cols: Vec<String> =
        runs.iter().map(|r| format!("{} receiver{}", r.receivers, if r.receivers == 1 { "" } else { "s" })).collect();
    println!(
        "SFU forwarding: one publisher, H.264 {} kbit/s at {} fps ({}-byte fragments, keyframe every {} frames), \
         {} s window after {} s warm-up, relay {}{}",
        args.bitrate_kbps,
        args.fps,
        args.packet_bytes,
        args.keyframe_every,
        args.seconds,
        args.warmup,
        args.relay_bin.display(),
        if pinned { ", relay on core 0, bench on core 1" } else { ", not pinned" }
    );
    println!();
    println!("| measure | {} |", cols.join(" | "));
    println!("|---|{}", "---|".repeat(cols.len()));
    let row = |name: &str, f: &dyn Fn(&RunResult) -> String| {
        println!("| {name} | {} |", runs.iter().map(f).collect::<Vec<_>>().join(" | "));
    };
    row("publisher -> relay, packets/s (Mbit/s)", &|r| {
        format!("{} ({})", thousands(r.publisher_pps), f2(r.publisher_mbps))
    });
    row("delivered to receivers, packets/s (Mbit/s)", &|r| {
        format!("{} ({})", thousands(r.delivered_pps), f1(r.delivered_mbps))
    });
    row("relay CPU, % of one core", &|r| f1(r.relay_core_pct));
    row("**forwarded packets per relay core-second**", &|r| format!("**{}**", thousands(r.forwarded_per_core_s)));
    row("relay CPU per delivered packet, µs", &|r| f1(r.relay_cpu_us_per_packet));
    row("relay peak RSS (VmHWM), MiB", &|r| f1(r.relay_peak_rss_mib));
    row("loss at the receivers, % (queue drops)", &|r| format!("{} ({})", f2(r.loss_pct), r.queue_drops));
    row("one-way latency p50 / p99 / p99.9 / max, ms", &|r| {
        format!(
            "{} / {} / {} / {}",
            f2(r.latency_ms_p50),
            f2(r.latency_ms_p99),
            f2(r.latency_ms_p999),
            f1(r.latency_ms_max)
        )
    });
    row("median latency of the best / worst placed receiver, ms", &|r| {
        format!("{} / {}", f2(r.receiver_p50_ms_best), f2(r.receiver_p50_ms_worst))
    });
    row("interarrival jitter (RFC 3550, vs send times), median / worst receiver, ms", &|r| {
        format!("{} / {}", f2(r.jitter_ms_median), f2(r.jitter_ms_max))
    });
    row("offer -> first packet / first keyframe, first receiver (opens the upstream), ms", &|r| {
        format!("{:.0} / {:.0}", r.first_join_packet_ms, r.first_join_keyframe_ms)
    });
    row("offer -> first packet, the others joining (p50 / max), ms", &|r| {
        format!("{} / {}", o(r.join_packet_ms_p50), o(r.join_packet_ms_max))
    });
    row("offer -> first keyframe, the others joining (p50 / max), ms", &|r| {
        format!("{} / {}", o(r.join_keyframe_ms_p50), o(r.join_keyframe_ms_max))
    });
    row("one more joins while they watch: offer -> answer / connected / first packet / first keyframe, ms", &|r| {
        format!(
            "{} / {} / {} / {}",
            o(r.late_join_answer_ms),
            o(r.late_join_connected_ms),
            o(r.late_join_packet_ms),
            o(r.late_join_keyframe_ms)
        )
    });
    row("bench process CPU, % of its core (publisher thread)", &|r| {
        format!("{} ({})", f1(r.bench_core_pct), f1(r.publisher_core_pct))
    });
    row("keyframes sent in the window", &|r| r.keyframes_in_window.to_string());
    row("REMB the relay sent the publisher at the end (weakest receiver's estimate), kbit/s", &|r| {
        format!("{:.0}", r.remb_kbps_last)
    });
    for r in &runs {
        println!(
            "{}",
            serde_json::to_string(&json!({"bench": "sfu", "settings": {
            "bitrateKbps": args.bitrate_kbps, "fps": args.fps, "packetBytes": args.packet_bytes,
            "keyframeEvery": args.keyframe_every, "seconds": args.seconds, "warmup": args.warmup,
            "joinConcurrency": args.join_concurrency, "pinned": pinned}, "result": r}))?
        );
    }
    Ok(())
}
