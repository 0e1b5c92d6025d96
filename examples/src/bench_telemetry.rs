//! `tether-bench telemetry`: the same telemetry workload against Tether, nats-server and
//! Mosquitto, in one run, on one machine.
//!
//! The workload: D devices each publish a ~300-byte JSON telemetry frame (shaped like the
//! simulated boat's: position, heading, speed, battery, status; plus a per-device
//! `sequence` and `sent_ns`, the send time on this process's monotonic clock) R times a second,
//! and P pilots per device, each on its own connection, receive that device's frames.
//!
//! - **Tether**: the release relay binary with a fresh store (a copy of a store provisioned
//!   once per invocation: D devices, D x P pilot operators with `view` on their device and an API
//!   key each). Devices connect to `/ws?clientID=` with `Authorization: Bearer` and answer the
//!   relay's `time_sync` like the agent; pilots trade their key for a ticket, open `/ws/admin` and
//!   `subscribe` (`replay: false`) like the console.
//! - **nats-server** (Debian's) with a generated config enabling `websocket { no_tls: true }`;
//!   clients speak NATS's text protocol over WebSocket, subject `tele.<device>`.
//! - **Mosquitto** (Debian's) on a plain MQTT/TCP listener (its websockets listener does not
//!   start on this Debian build), QoS 0, topic `tele/<device>`; packets are encoded and decoded
//!   with rumqttc's MQTT 3.1.1 codec.
//!
//! The Tether and NATS clients are both tokio-tungstenite, so they cost the same per message; all
//! clients find `sequence` and `sent_ns` by a byte search and never parse the JSON. The whole
//! generator is one current-thread runtime on core 1 (the server gets core 0): one task per
//! connection, and a device writes all the frames that are due in one flush (at most every
//! `--batch-ms`, so above 1000 / batch-ms Hz a device writes a few frames per write).
//!
//! Latency is arrival minus `sent_ns`, both on this process's clock. A frame belongs to the
//! measured window by its send time; after the window the tool waits (up to `DRAIN`) for frames
//! still in flight, and whatever has not arrived by then is a drop.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::bench_proc::{cpu_seconds, have_taskset, status_kib};
use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use memchr::memmem;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish, Subscribe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// How long after a window the tool waits for frames sent in it.
const DRAIN: Duration = Duration::from_secs(3);
/// Connections set up at the same time.
const SETUP_CONCURRENCY: usize = 32;
/// Largest MQTT packet the codec accepts.
const MQTT_MAX: usize = 1 << 20;
/// The generator counts as the limit when it used this share of its core in a window.
const GENERATOR_BUSY: f64 = 0.85;

/// The servers, in the order each round runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Tether,
    Nats,
    Mosquitto,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Tether => "Tether",
            Kind::Nats => "nats-server",
            Kind::Mosquitto => "Mosquitto",
        }
    }
}

/// `tether-bench telemetry` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 200)]
    pub devices: usize,
    /// Telemetry frames per second per device (the fixed workload).
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Pilots per device, each its own connection.
    #[arg(long, default_value_t = 3)]
    pub pilots: usize,
    /// Measured window of the fixed workload, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Seconds of load before the window.
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
    /// Rounds of the fixed workload; each round runs every server in turn, each on a fresh server.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Servers to run, in this order, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "tether,nats,mosquitto")]
    pub servers: Vec<Kind>,
    /// Also find each server's saturation throughput: the same devices and pilots, the rate per
    /// device raised along `--ladder` until a step fails.
    #[arg(long)]
    pub saturation: bool,
    /// Saturation ladder: frames per second per device, comma-separated, increasing.
    #[arg(long, value_delimiter = ',', default_value = "50,100,150,200,300,400,600,800,1000")]
    pub ladder: Vec<f64>,
    /// Measured window of each saturation step, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub sat_seconds: f64,
    /// Seconds at a step's rate before its window.
    #[arg(long, default_value_t = 2.0)]
    pub sat_warmup: f64,
    /// A saturation step fails when its p99 latency exceeds this many milliseconds (or it
    /// delivers under 99% of the offered rate, or anything is dropped).
    #[arg(long, default_value_t = 100.0)]
    pub sat_p99_ms: f64,
    /// A device writes the frames due at most this often (one flush per batch).
    #[arg(long, default_value_t = 10.0)]
    pub batch_ms: f64,
    /// The relay binary.
    #[arg(long, default_value = "target/release/tether-relay")]
    pub relay_bin: PathBuf,
    /// The nats-server binary.
    #[arg(long, default_value = "nats-server")]
    pub nats_bin: PathBuf,
    /// The mosquitto binary.
    #[arg(long, default_value = "mosquitto")]
    pub mosquitto_bin: PathBuf,
    /// Where the provisioned store and each run's server directory live.
    #[arg(long, default_value = "target/bench-telemetry")]
    pub data_dir: PathBuf,
    /// Do not pin the servers to core 0 and this process to core 1.
    #[arg(long)]
    pub no_pin: bool,
}

/// Pins this process to core 1 (before any thread exists), builds one current-thread runtime and
/// runs everything on it.
pub fn main(args: TelemetryArgs) -> anyhow::Result<()> {
    if args.devices == 0 || args.pilots == 0 || args.rate <= 0.0 || args.seconds <= 0.0 {
        bail!("--devices, --pilots, --rate and --seconds must be positive");
    }
    let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| (0..nix::sched::CpuSet::count()).filter(|&i| set.is_set(i).unwrap_or(false)).count())
        .unwrap_or(1);
    let pin = !args.no_pin && cpus >= 2 && have_taskset();
    if pin {
        let mut set = nix::sched::CpuSet::new();
        set.set(1)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).context("pinning to core 1")?;
    } else if !args.no_pin {
        eprintln!("only {cpus} CPU(s) or no taskset: not pinning");
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(args, pin))
}

// ---------------------------------------------------------------------------------------------
// Clocks and /proc

fn clock() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds on this process's monotonic clock.
fn now_ns() -> u64 {
    clock().elapsed().as_nanos() as u64
}

/// Wall clock, ms since the Unix epoch (the device clock of `timestamp` and `time_sync`).
fn wall_ms() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// First line of a command's output (stdout, else stderr).
fn version_of(cmd: &Path, args: &[&str]) -> String {
    match std::process::Command::new(cmd).args(args).output() {
        Ok(o) => {
            let out = String::from_utf8_lossy(&o.stdout);
            let err = String::from_utf8_lossy(&o.stderr);
            out.lines().chain(err.lines()).find(|l| !l.trim().is_empty()).unwrap_or("?").trim().to_owned()
        }
        Err(e) => format!("not runnable: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state of the generator (one thread: Cell and RefCell)

#[derive(Debug, Default)]
struct Shared {
    /// Frames per second per device; 0 = quiet.
    rate: Cell<f64>,
    /// The measured window, by send time (ns); frames sent in it are counted.
    window: Cell<(u64, u64)>,
    sent_total: Cell<u64>,
    sent_in_window: Cell<u64>,
    /// Deliveries of frames sent in the window.
    received: Cell<u64>,
    latencies: RefCell<Vec<u64>>,
    /// Numbers a pilot skipped (sequence jumps), for frames sent in the window.
    seq_missing: Cell<u64>,
    /// Frames a pilot got at or below the highest number it had seen.
    seq_behind: Cell<u64>,
    /// Drops the server reported: Tether's `telemetry_dropped` counts.
    server_reported_drops: Cell<u64>,
    /// Messages the server refused for rate: Tether's `rate_limited` counts.
    rate_limited: Cell<u64>,
    /// Errors the servers sent and connections that ended.
    errors: Cell<u64>,
    closed: Cell<u64>,
    first_errors: RefCell<Vec<String>>,
}

impl Shared {
    fn in_window(&self, sent: u64) -> bool {
        let (a, b) = self.window.get();
        sent >= a && sent < b
    }

    fn error(&self, what: String) {
        self.errors.set(self.errors.get() + 1);
        let mut first = self.first_errors.borrow_mut();
        if first.len() < 8 {
            first.push(what);
        }
    }

    fn closed(&self, what: String) {
        self.closed.set(self.closed.get() + 1);
        let mut first = self.first_errors.borrow_mut();
        if first.len() < 8 {
            first.push(what);
        }
    }

    fn reset_window(&self, window: (u64, u64)) {
        self.window.set(window);
        self.sent_in_window.set(0);
        self.received.set(0);
        self.latencies.borrow_mut().clear();
        self.seq_missing.set(0);
        self.seq_behind.set(0);
        self.server_reported_drops.set(0);
        self.rate_limited.set(0);
        self.errors.set(0);
        self.closed.set(0);
        self.first_errors.borrow_mut().clear();
    }
}

/// What a pilot knows of its device's sequence.
#[derive(Debug, Default)]
struct PilotSeq {
    highest: Option<u64>,
}

static SEQUENCE: OnceLock<memmem::Finder<'static>> = OnceLock::new();
static SENT: OnceLock<memmem::Finder<'static>> = OnceLock::new();

fn number_after(hay: &[u8], finder: &memmem::Finder<'static>) -> Option<u64> {
    let at = finder.find(hay)? + finder.needle().len();
    let digits = hay[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut n = 0u64;
    for &b in &hay[at..at + digits] {
        n = n.wrapping_mul(10).wrapping_add(u64::from(b - b'0'));
    }
    Some(n)
}

/// A pilot got a telemetry frame (any protocol): sequence and send time by byte search.
fn on_frame(sh: &Shared, seq_state: &mut PilotSeq, frame: &[u8]) {
    let now = now_ns();
    let seq = number_after(frame, SEQUENCE.get_or_init(|| memmem::Finder::new(b"\"sequence\":")));
    let sent = number_after(frame, SENT.get_or_init(|| memmem::Finder::new(b"\"sent_ns\":")));
    let (Some(seq), Some(sent)) = (seq, sent) else {
        sh.error(format!("a frame without sequence or sent_ns: {}", String::from_utf8_lossy(frame)));
        return;
    };
    let in_window = sh.in_window(sent);
    match seq_state.highest {
        Some(h) if seq <= h => {
            if in_window {
                sh.seq_behind.set(sh.seq_behind.get() + 1);
            }
        }
        Some(h) => {
            if in_window && seq > h + 1 {
                sh.seq_missing.set(sh.seq_missing.get() + (seq - h - 1));
            }
            seq_state.highest = Some(seq);
        }
        None => seq_state.highest = Some(seq),
    }
    if in_window {
        sh.received.set(sh.received.get() + 1);
        sh.latencies.borrow_mut().push(now.saturating_sub(sent));
    }
}

// ---------------------------------------------------------------------------------------------
// The frame

/// Builds a device's frames: the payload object (about 330 bytes) the three protocols carry.
#[derive(Debug)]
struct FrameGen {
    device: String,
    seq: u64,
    /// Starting position and battery, varied per device.
    lat_micro: i64,
    lon_micro: i64,
}

/// `v / 10^decimals` as a decimal number.
fn push_fixed(out: &mut String, v: i64, decimals: u32) {
    let scale = 10i64.pow(decimals);
    if v < 0 {
        out.push('-');
    }
    let a = v.unsigned_abs();
    let mut ib = itoa::Buffer::new();
    out.push_str(ib.format(a / scale as u64));
    if decimals > 0 {
        out.push('.');
        let frac = a % scale as u64;
        let s = ib.format(frac);
        for _ in s.len()..decimals as usize {
            out.push('0');
        }
        out.push_str(s);
    }
}

impl FrameGen {
    fn new(device: &str, index: usize) -> Self {
        FrameGen {
            device: device.to_owned(),
            seq: 0,
            lat_micro: 37_808_000 + (index as i64 % 1000) * 37,
            lon_micro: -122_417_700 - (index as i64 % 1000) * 41,
        }
    }

    /// The next frame's payload, stamped with `sent` (ns).
    fn payload(&mut self, out: &mut String, sent: u64, wall_ms: u64) {
        let s = self.seq;
        self.seq += 1;
        let mut ib = itoa::Buffer::new();
        out.push_str("{\"subtype\":\"sensor_data\",\"sequence\":");
        out.push_str(ib.format(s));
        out.push_str(",\"sent_ns\":");
        out.push_str(ib.format(sent));
        out.push_str(",\"timestamp\":");
        out.push_str(ib.format(wall_ms));
        out.push_str(",\"system_time\":");
        out.push_str(ib.format(wall_ms));
        out.push_str(",\"epoch\":\"5c1e9a0b\",\"data\":{\"gps\":{\"latitude\":");
        let drift = (s % 10_000) as i64;
        push_fixed(out, self.lat_micro + drift * 3, 6);
        out.push_str(",\"longitude\":");
        push_fixed(out, self.lon_micro - drift * 2, 6);
        out.push_str(",\"heading\":");
        push_fixed(out, (s as i64 * 7) % 3600, 1);
        out.push_str(",\"speed\":");
        push_fixed(out, 200 + (s as i64 % 120), 2);
        out.push_str("},\"battery\":{\"percent\":");
        let battery = 1000 - ((s / 200) % 900) as i64;
        push_fixed(out, battery, 1);
        out.push_str(",\"voltage\":");
        push_fixed(out, 1100 + battery * 16 / 100, 2);
        out.push_str("},\"status\":\"autonomous_navigation\"}}");
    }
}

/// When a device writes and how many frames are due.
#[derive(Debug)]
struct Pacer {
    next: tokio::time::Instant,
    last_ns: u64,
    credit: f64,
    batch: Duration,
}

impl Pacer {
    /// `phase`: a fraction of the first period, so devices do not all write at once.
    fn new(phase: f64, batch: Duration, rate: f64) -> Self {
        let period = Self::period_for(rate, batch);
        Pacer {
            next: tokio::time::Instant::now() + period.mul_f64(phase),
            last_ns: now_ns(),
            credit: phase.min(0.999),
            batch,
        }
    }

    fn period_for(rate: f64, batch: Duration) -> Duration {
        if rate <= 0.0 { Duration::from_millis(20) } else { Duration::from_secs_f64(1.0 / rate).max(batch) }
    }

    /// Called when `next` has passed: how many frames to write now.
    fn due(&mut self, rate: f64) -> usize {
        let now = now_ns();
        let elapsed = now.saturating_sub(self.last_ns) as f64 / 1e9;
        self.last_ns = now;
        let period = Self::period_for(rate, self.batch);
        self.next += period;
        let t = tokio::time::Instant::now();
        if self.next + Duration::from_secs(1) < t {
            // Far behind (the generator stalled): do not burst to catch up.
            self.next = t + period;
            self.credit = 0.0;
            return 0;
        }
        if rate <= 0.0 {
            self.credit = 0.0;
            return 0;
        }
        self.credit += elapsed * rate;
        let n = self.credit.floor();
        self.credit -= n;
        (n as usize).min((rate as usize).max(1))
    }
}

/// Builds `n` payloads; counts them as sent.
fn frames(sh: &Shared, fgen: &mut FrameGen, n: usize, mut each: impl FnMut(&str)) {
    let wall = wall_ms() as u64;
    let mut buf = String::with_capacity(400);
    for _ in 0..n {
        buf.clear();
        let sent = now_ns();
        fgen.payload(&mut buf, sent, wall);
        if sh.in_window(sent) {
            sh.sent_in_window.set(sh.sent_in_window.get() + 1);
        }
        each(&buf);
    }
    sh.sent_total.set(sh.sent_total.get() + n as u64);
}

// ---------------------------------------------------------------------------------------------
// WebSocket clients (Tether and NATS)

type Ws = WebSocketStream<TcpStream>;

async fn ws_connect(addr: &str, path: &str, bearer: Option<&str>) -> anyhow::Result<Ws> {
    let tcp = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let mut req = format!("ws://{addr}{path}").into_client_request()?;
    if let Some(b) = bearer {
        req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {b}"))?);
    }
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, tcp, None).await.context("WebSocket upgrade")?;
    Ok(ws)
}

async fn next_text(ws: &mut Ws, timeout: Duration) -> anyhow::Result<String> {
    loop {
        match tokio::time::timeout(timeout, ws.next()).await.context("timed out waiting for the server")? {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Binary(b))) => return Ok(String::from_utf8_lossy(&b).into_owned()),
            Some(Ok(Message::Close(c))) => bail!("closed by the server: {c:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("WebSocket: {e}"),
            None => bail!("closed by the server"),
        }
    }
}

// --- Tether ----------------------------------------------------------------------------------

/// The raw `t1` of a `time_sync`, echoed as received.
fn raw_t1(text: &str) -> Option<&str> {
    let at = text.find("\"t1\":")? + 5;
    let rest = &text[at..];
    let end = rest.find([',', '}'])?;
    Some(rest[..end].trim())
}

/// `rate_limited`'s "N message(s) refused".
fn refused_count(text: &str) -> u64 {
    text.find("exceeded: ").and_then(|at| text[at + 10..].split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(1)
}

async fn tether_device_connect(addr: &str, id: &str, secret: &str) -> anyhow::Result<Ws> {
    let mut ws = ws_connect(addr, &format!("/ws?clientID={id}"), Some(secret)).await?;
    let first = next_text(&mut ws, Duration::from_secs(30)).await?;
    if !first.starts_with("{\"type\":\"auth_ok\"") {
        bail!("device {id}: expected auth_ok, got {first}");
    }
    Ok(ws)
}

/// A device on the relay: telemetry at the shared rate; answers `time_sync` like the agent.
async fn tether_device(mut ws: Ws, sh: Rc<Shared>, mut fgen: FrameGen, mut pacer: Pacer) {
    loop {
        tokio::select! {
            biased;
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let t = t.as_str();
                    if t.starts_with("{\"type\":\"time_sync\"") {
                        let recv = wall_ms();
                        let Some(t1) = raw_t1(t) else { sh.error(format!("time_sync without t1: {t}")); continue };
                        let answer = format!(
                            "{{\"type\":\"time_sync_response\",\"payload\":{{\"t1\":{t1},\"t2\":{recv:.3},\"t3\":{:.3}}}}}",
                            wall_ms()
                        );
                        if let Err(e) = ws.send(Message::Text(answer.into())).await {
                            sh.closed(format!("{}: {e}", fgen.device));
                            return;
                        }
                    } else if t.starts_with("{\"type\":\"error\"") {
                        if t.contains("\"rate_limited\"") {
                            sh.rate_limited.set(sh.rate_limited.get() + refused_count(t));
                        } else {
                            sh.error(format!("{}: {t}", fgen.device));
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return sh.closed(format!("{}: {e}", fgen.device)),
                None => return sh.closed(format!("{}: closed by the relay", fgen.device)),
            },
            _ = tokio::time::sleep_until(pacer.next) => {
                let n = pacer.due(sh.rate.get());
                if n == 0 {
                    continue;
                }
                let mut batch = Vec::with_capacity(n);
                frames(&sh, &mut fgen, n, |p| {
                    let mut s = String::with_capacity(p.len() + 32);
                    s.push_str("{\"type\":\"telemetry\",\"payload\":");
                    s.push_str(p);
                    s.push('}');
                    batch.push(s);
                });
                for s in batch {
                    if let Err(e) = ws.feed(Message::Text(s.into())).await {
                        return sh.closed(format!("{}: {e}", fgen.device));
                    }
                }
                if let Err(e) = ws.flush().await {
                    return sh.closed(format!("{}: {e}", fgen.device));
                }
            }
        }
    }
}

async fn tether_pilot_connect(http: &reqwest::Client, addr: &str, key: &str, device: &str) -> anyhow::Result<Ws> {
    let resp = http.post(format!("http://{addr}/api/auth/ws-ticket")).bearer_auth(key).send().await?;
    if !resp.status().is_success() {
        bail!("ws-ticket: HTTP {}", resp.status());
    }
    let t: serde_json::Value = resp.json().await?;
    let ticket = t["ticket"].as_str().context("no ticket")?;
    let mut ws = ws_connect(addr, &format!("/ws/admin?ticket={ticket}"), None).await?;
    let first = next_text(&mut ws, Duration::from_secs(30)).await?;
    if !first.starts_with("{\"type\":\"auth_ok\"") {
        bail!("pilot: expected auth_ok, got {first}");
    }
    let sub = format!(
        "{{\"type\":\"subscribe\",\"correlationID\":\"s\",\"payload\":{{\"deviceID\":\"{device}\",\"replay\":false}}}}"
    );
    ws.send(Message::Text(sub.into())).await?;
    loop {
        let m = next_text(&mut ws, Duration::from_secs(30)).await?;
        if m.starts_with("{\"type\":\"subscribed\"") {
            return Ok(ws);
        }
        if m.starts_with("{\"type\":\"error\"") {
            bail!("subscribe {device}: {m}");
        }
    }
}

async fn tether_pilot(mut ws: Ws, sh: Rc<Shared>) {
    let mut seq = PilotSeq::default();
    while let Some(m) = ws.next().await {
        match m {
            Ok(Message::Text(t)) => {
                let b = t.as_bytes();
                if b.starts_with(b"{\"type\":\"telemetry\",") {
                    on_frame(&sh, &mut seq, b);
                } else if b.starts_with(b"{\"type\":\"telemetry_dropped\"") {
                    let count = std::str::from_utf8(b)
                        .ok()
                        .and_then(|s| s.split("\"count\":").nth(1))
                        .and_then(|s| s.split([',', '}']).next())
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(1);
                    sh.server_reported_drops.set(sh.server_reported_drops.get() + count);
                } else if b.starts_with(b"{\"type\":\"error\"") {
                    sh.error(format!("pilot: {}", t.as_str()));
                }
            }
            Ok(Message::Close(_)) => {}
            Ok(_) => {}
            Err(e) => return sh.closed(format!("pilot: {e}")),
        }
    }
    sh.closed("pilot: closed by the relay".into());
}

// --- NATS over WebSocket ---------------------------------------------------------------------

async fn nats_connect(addr: &str) -> anyhow::Result<Ws> {
    let mut ws = ws_connect(addr, "/", None).await?;
    let info = next_text(&mut ws, Duration::from_secs(10)).await?;
    if !info.starts_with("INFO ") {
        bail!("nats: expected INFO, got {info}");
    }
    let connect = "CONNECT {\"verbose\":false,\"pedantic\":false,\"tls_required\":false,\"lang\":\"rust\",\
                   \"version\":\"0.1\",\"protocol\":1,\"echo\":false}\r\nPING\r\n";
    ws.send(Message::Binary(Bytes::from_static(connect.as_bytes()))).await?;
    nats_wait_pong(&mut ws).await?;
    Ok(ws)
}

async fn nats_wait_pong(ws: &mut Ws) -> anyhow::Result<()> {
    loop {
        let m = next_text(ws, Duration::from_secs(10)).await?;
        if m.contains("PONG\r\n") {
            return Ok(());
        }
        if m.starts_with("-ERR") {
            bail!("nats: {m}");
        }
    }
}

async fn nats_device(mut ws: Ws, sh: Rc<Shared>, mut fgen: FrameGen, mut pacer: Pacer) {
    let subject = format!("tele.{}", fgen.device);
    loop {
        tokio::select! {
            biased;
            m = ws.next() => match m {
                Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                    let data = match &m { Some(Ok(m)) => m.clone().into_data(), _ => Bytes::new() };
                    if memmem::find(&data, b"PING\r\n").is_some()
                        && let Err(e) = ws.send(Message::Binary(Bytes::from_static(b"PONG\r\n"))).await
                    {
                        return sh.closed(format!("{}: {e}", fgen.device));
                    }
                    if data.starts_with(b"-ERR") {
                        sh.error(format!("{}: {}", fgen.device, String::from_utf8_lossy(&data)));
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return sh.closed(format!("{}: {e}", fgen.device)),
                None => return sh.closed(format!("{}: closed by nats-server", fgen.device)),
            },
            _ = tokio::time::sleep_until(pacer.next) => {
                let n = pacer.due(sh.rate.get());
                if n == 0 {
                    continue;
                }
                let mut batch = Vec::with_capacity(n);
                frames(&sh, &mut fgen, n, |p| {
                    let mut s = Vec::with_capacity(p.len() + subject.len() + 16);
                    s.extend_from_slice(b"PUB ");
                    s.extend_from_slice(subject.as_bytes());
                    s.push(b' ');
                    s.extend_from_slice(itoa::Buffer::new().format(p.len()).as_bytes());
                    s.extend_from_slice(b"\r\n");
                    s.extend_from_slice(p.as_bytes());
                    s.extend_from_slice(b"\r\n");
                    batch.push(s);
                });
                for s in batch {
                    if let Err(e) = ws.feed(Message::Binary(s.into())).await {
                        return sh.closed(format!("{}: {e}", fgen.device));
                    }
                }
                if let Err(e) = ws.flush().await {
                    return sh.closed(format!("{}: {e}", fgen.device));
                }
            }
        }
    }
}

async fn nats_pilot_connect(addr: &str, device: &str) -> anyhow::Result<Ws> {
    let mut ws = nats_connect(addr).await?;
    let sub = format!("SUB tele.{device} 1\r\nPING\r\n");
    ws.send(Message::Binary(sub.into_bytes().into())).await?;
    nats_wait_pong(&mut ws).await?;
    Ok(ws)
}

/// NATS's byte stream: `MSG <subject> <sid> [reply] <len>\r\n<payload>\r\n`, `PING`, `PONG`,
/// `+OK`, `-ERR ...`, `INFO {...}`. WebSocket messages need not align with operations.
async fn nats_pilot(mut ws: Ws, sh: Rc<Shared>) {
    let mut seq = PilotSeq::default();
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    while let Some(m) = ws.next().await {
        let data = match m {
            Ok(Message::Binary(b)) => b,
            Ok(Message::Text(t)) => Bytes::copy_from_slice(t.as_bytes()),
            Ok(_) => continue,
            Err(e) => return sh.closed(format!("nats pilot: {e}")),
        };
        // Parse in place when nothing is pending; otherwise append and parse the buffer.
        let (consumed, pong) = if buf.is_empty() {
            let (c, p) = nats_parse(&data, &sh, &mut seq);
            if c < data.len() {
                buf.extend_from_slice(&data[c..]);
            }
            (0, p)
        } else {
            buf.extend_from_slice(&data);
            nats_parse(&buf, &sh, &mut seq)
        };
        if consumed > 0 {
            buf.drain(..consumed);
        }
        if pong && let Err(e) = ws.send(Message::Binary(Bytes::from_static(b"PONG\r\n"))).await {
            return sh.closed(format!("nats pilot: {e}"));
        }
    }
    sh.closed("nats pilot: closed by nats-server".into());
}

/// Parses whole operations from `b`; returns the bytes consumed and whether a PING came.
fn nats_parse(b: &[u8], sh: &Shared, seq: &mut PilotSeq) -> (usize, bool) {
    let mut at = 0;
    let mut ping = false;
    while at < b.len() {
        let Some(eol) = memchr::memmem::find(&b[at..], b"\r\n") else { break };
        let line = &b[at..at + eol];
        if line.starts_with(b"MSG ") {
            let len: usize = line
                .rsplit(|&c| c == b' ')
                .next()
                .and_then(|n| std::str::from_utf8(n).ok())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let start = at + eol + 2;
            if b.len() < start + len + 2 {
                break;
            }
            on_frame(sh, seq, &b[start..start + len]);
            at = start + len + 2;
        } else {
            if line == b"PING" {
                ping = true;
            } else if line.starts_with(b"-ERR") {
                sh.error(format!("nats pilot: {}", String::from_utf8_lossy(line)));
            }
            at += eol + 2;
        }
    }
    (at, ping)
}

// --- MQTT ------------------------------------------------------------------------------------

async fn mqtt_connect(addr: &str, client_id: &str) -> anyhow::Result<(TcpStream, BytesMut)> {
    let mut tcp = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let mut c = Connect::new(client_id);
    c.keep_alive = 0;
    c.clean_session = true;
    let mut out = BytesMut::new();
    c.write(&mut out).map_err(|e| anyhow::anyhow!("CONNECT: {e:?}"))?;
    tcp.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    match mqtt_read(&mut tcp, &mut buf).await? {
        Packet::ConnAck(a) if a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success => Ok((tcp, buf)),
        p => bail!("mqtt: expected CONNACK Success, got {p:?}"),
    }
}

async fn mqtt_read(tcp: &mut TcpStream, buf: &mut BytesMut) -> anyhow::Result<Packet> {
    loop {
        match Packet::read(buf, MQTT_MAX) {
            Ok(p) => return Ok(p),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => bail!("mqtt: {e:?}"),
        }
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read_buf(buf)).await.context("mqtt: timed out")??;
        if n == 0 {
            bail!("mqtt: closed by the broker");
        }
    }
}

async fn mqtt_device(mut tcp: TcpStream, sh: Rc<Shared>, mut fgen: FrameGen, mut pacer: Pacer) {
    let topic = format!("tele/{}", fgen.device);
    let mut out = BytesMut::with_capacity(8 * 1024);
    let mut scratch = [0u8; 512];
    loop {
        tokio::select! {
            biased;
            r = tcp.read(&mut scratch) => match r {
                Ok(0) => return sh.closed(format!("{}: closed by mosquitto", fgen.device)),
                Ok(_) => {}
                Err(e) => return sh.closed(format!("{}: {e}", fgen.device)),
            },
            _ = tokio::time::sleep_until(pacer.next) => {
                let n = pacer.due(sh.rate.get());
                if n == 0 {
                    continue;
                }
                out.clear();
                let mut failed = None;
                frames(&sh, &mut fgen, n, |p| {
                    let publish = Publish::from_bytes(topic.as_str(), QoS::AtMostOnce, Bytes::copy_from_slice(p.as_bytes()));
                    if let Err(e) = publish.write(&mut out) {
                        failed = Some(format!("{e:?}"));
                    }
                });
                if let Some(e) = failed {
                    sh.error(format!("{}: encoding PUBLISH: {e}", fgen.device));
                }
                if let Err(e) = tcp.write_all(&out).await {
                    return sh.closed(format!("{}: {e}", fgen.device));
                }
            }
        }
    }
}

async fn mqtt_pilot_connect(addr: &str, client_id: &str, device: &str) -> anyhow::Result<(TcpStream, BytesMut)> {
    let (mut tcp, mut buf) = mqtt_connect(addr, client_id).await?;
    let mut s = Subscribe::new(format!("tele/{device}"), QoS::AtMostOnce);
    s.pkid = 1;
    let mut out = BytesMut::new();
    s.write(&mut out).map_err(|e| anyhow::anyhow!("SUBSCRIBE: {e:?}"))?;
    tcp.write_all(&out).await?;
    match mqtt_read(&mut tcp, &mut buf).await? {
        Packet::SubAck(_) => Ok((tcp, buf)),
        p => bail!("mqtt: expected SUBACK, got {p:?}"),
    }
}

async fn mqtt_pilot(mut tcp: TcpStream, mut buf: BytesMut, sh: Rc<Shared>) {
    let mut seq = PilotSeq::default();
    loop {
        loop {
            match Packet::read(&mut buf, MQTT_MAX) {
                Ok(Packet::Publish(p)) => on_frame(&sh, &mut seq, &p.payload),
                Ok(_) => {}
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => return sh.closed(format!("mqtt pilot: {e:?}")),
            }
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        match tcp.read_buf(&mut buf).await {
            Ok(0) => return sh.closed("mqtt pilot: closed by mosquitto".into()),
            Ok(_) => {}
            Err(e) => return sh.closed(format!("mqtt pilot: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Servers

#[derive(Debug)]
struct Creds {
    devices: Vec<(String, String)>,
    /// Per device, its pilots' API keys.
    pilots: Vec<Vec<String>>,
}

/// Provisions the Tether store once per (devices, pilots) and keeps it as a template; every run
/// gets a copy, so each relay starts on a fresh store.
fn provision(dir: &Path, devices: usize, pilots: usize) -> anyhow::Result<Creds> {
    let creds_file = dir.join("creds.txt");
    if let Ok(text) = std::fs::read_to_string(&creds_file) {
        let mut c = Creds { devices: Vec::new(), pilots: Vec::new() };
        for line in text.lines() {
            let mut f = line.split(' ');
            let (Some(id), Some(secret)) = (f.next(), f.next()) else { continue };
            c.devices.push((id.to_owned(), secret.to_owned()));
            c.pilots.push(f.map(str::to_owned).collect());
        }
        if c.devices.len() == devices && c.pilots.iter().all(|p| p.len() == pilots) && dir.join("tether.db").exists() {
            return Ok(c);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    eprintln!(
        "provisioning {devices} devices and {} pilots (bcrypt cost {}, once)...",
        devices * pilots,
        relay::auth::MACHINE_SECRET_COST
    );
    struct Item {
        device: String,
        secret: String,
        device_hash: String,
        keys: Vec<(String, String, String)>, // key id, key, hash
    }
    let items: Vec<(String, String, Vec<(String, String)>)> = (0..devices)
        .map(|i| {
            let keys = (0..pilots).map(|_| relay::auth::new_api_key()).collect();
            (format!("dev-{i:05}"), relay::auth::new_device_secret(), keys)
        })
        .collect();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let chunk = devices.div_ceil(threads).max(1);
    let cost = relay::auth::MACHINE_SECRET_COST;
    let hashed: Vec<Item> = std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|(device, secret, keys)| Item {
                            device: device.clone(),
                            secret: secret.clone(),
                            device_hash: bcrypt::hash(secret, cost).expect("hash"),
                            keys: keys
                                .iter()
                                .map(|(id, key)| {
                                    let (_, sec) = relay::auth::parse_api_key(key).expect("generated keys parse");
                                    (id.clone(), key.clone(), bcrypt::hash(sec, cost).expect("hash"))
                                })
                                .collect(),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("hash thread")).collect()
    });
    {
        let store = relay::store::Store::open(&dir.join("tether.db"))?;
        relay::server::bootstrap(&store, Some("tk_bench_0123456789abcdef"))?;
        store.call_sync(|c| {
            use relay::store::q;
            let tx = c.transaction()?;
            for it in &hashed {
                q::create_device(&tx, &it.device, "default", &it.device, &it.device_hash)?;
                for (p, (key_id, _, hash)) in it.keys.iter().enumerate() {
                    let op = format!("op-{}-{p}", it.device);
                    q::create_operator(&tx, &op, "default", &op, relay::store::OperatorRole::Pilot)?;
                    q::set_permission(&tx, &op, &format!("device:{}", it.device), "view")?;
                    q::create_api_key(&tx, key_id, &op, hash, Some("tether-bench telemetry"))?;
                }
            }
            tx.commit()?;
            Ok(())
        })?;
    }
    let mut text = String::new();
    for it in &hashed {
        let _ = write!(text, "{} {}", it.device, it.secret);
        for (_, key, _) in &it.keys {
            let _ = write!(text, " {key}");
        }
        text.push('\n');
    }
    std::fs::write(&creds_file, text)?;
    Ok(Creds {
        devices: hashed.iter().map(|it| (it.device.clone(), it.secret.clone())).collect(),
        pilots: hashed.iter().map(|it| it.keys.iter().map(|(_, k, _)| k.clone()).collect()).collect(),
    })
}

/// Copies the template store (with its WAL files, if any) into a fresh directory.
fn fresh_store(template: &Path, dir: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    for f in ["tether.db", "tether.db-wal", "tether.db-shm"] {
        let from = template.join(f);
        if from.exists() {
            std::fs::copy(&from, dir.join(f))?;
        }
    }
    Ok(())
}

#[derive(Debug)]
struct ServerProc {
    kind: Kind,
    child: tokio::process::Child,
    pid: u32,
    /// host:port the clients connect to.
    addr: String,
    dir: PathBuf,
}

impl ServerProc {
    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// The relay's settings for the bench, printed with the results.
fn relay_flags() -> Vec<&'static str> {
    vec![
        "--port",
        "0",
        "--bind",
        "127.0.0.1",
        "--log-level",
        "warn",
        // 200 devices x 3 pilots log in within seconds from one address and one org; the per-
        // credential limit is not the subject.
        "--connections-per-minute",
        "1000000",
        // The saturation ladder sends up to 1000 frames/s (~370 kB/s) per device.
        "--messages-per-second",
        "1000000",
        "--bytes-per-second",
        "1000000000",
    ]
}

fn server_command(kind: Kind, bin: &Path, pin: bool) -> tokio::process::Command {
    let mut cmd = if pin {
        let mut c = tokio::process::Command::new("taskset");
        c.args(["-c", "0"]).arg(bin);
        c
    } else {
        tokio::process::Command::new(bin)
    };
    if kind == Kind::Nats {
        cmd.env("GOMAXPROCS", "1");
    }
    cmd.kill_on_drop(true).stdin(Stdio::null());
    cmd
}

async fn wait_port(addr: &str, what: &str, child: &mut tokio::process::Child, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited ({status}) before listening; see {}", log.display());
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {addr} within 15 s; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_server(
    args: &TelemetryArgs,
    kind: Kind,
    dir: &Path,
    template: &Path,
    pin: bool,
) -> anyhow::Result<ServerProc> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let log_path = dir.join("server.log");
    let log = std::fs::File::create(&log_path)?;
    match kind {
        Kind::Tether => {
            fresh_store(template, dir)?;
            let mut cmd = server_command(kind, &args.relay_bin, pin);
            cmd.arg("--data-dir").arg(dir).args(relay_flags()).env_remove("PORT").stdout(Stdio::piped()).stderr(log);
            let mut child = cmd.spawn().with_context(|| format!("starting {}", args.relay_bin.display()))?;
            let pid = child.id().context("relay pid")?;
            let (addr, mut lines) = crate::bench_proc::relay_listen_addr(&mut child, &log_path).await?;
            tokio::task::spawn_local(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok(ServerProc { kind, child, pid, addr, dir: dir.to_owned() })
        }
        Kind::Nats => {
            let (port, ws_port) = (free_port()?, free_port()?);
            let conf = dir.join("nats.conf");
            std::fs::write(
                &conf,
                format!(
                    "# tether-bench telemetry\nhost: 127.0.0.1\nport: {port}\nmax_payload: 1MB\n\
                     websocket {{\n  host: 127.0.0.1\n  port: {ws_port}\n  no_tls: true\n  compression: false\n}}\n"
                ),
            )?;
            let mut cmd = server_command(kind, &args.nats_bin, pin);
            cmd.arg("-c").arg(&conf).stdout(Stdio::null()).stderr(log);
            let mut child = cmd.spawn().with_context(|| format!("starting {}", args.nats_bin.display()))?;
            let pid = child.id().context("nats pid")?;
            let addr = format!("127.0.0.1:{ws_port}");
            wait_port(&addr, "nats-server", &mut child, &log_path).await?;
            Ok(ServerProc { kind, child, pid, addr, dir: dir.to_owned() })
        }
        Kind::Mosquitto => {
            let port = free_port()?;
            let conf = dir.join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "# tether-bench telemetry\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                     set_tcp_nodelay true\nlog_dest stderr\nlog_type error\nlog_type warning\n"
                ),
            )?;
            let mut cmd = server_command(kind, &args.mosquitto_bin, pin);
            cmd.arg("-c").arg(&conf).stdout(Stdio::null()).stderr(log);
            let mut child = cmd.spawn().with_context(|| format!("starting {}", args.mosquitto_bin.display()))?;
            let pid = child.id().context("mosquitto pid")?;
            let addr = format!("127.0.0.1:{port}");
            wait_port(&addr, "mosquitto", &mut child, &log_path).await?;
            Ok(ServerProc { kind, child, pid, addr, dir: dir.to_owned() })
        }
    }
}

/// Connects every device and pilot and starts their tasks (devices quiet until `sh.rate` > 0).
async fn connect_all(
    server: &ServerProc,
    creds: &Creds,
    args: &TelemetryArgs,
    sh: &Rc<Shared>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let batch = Duration::from_secs_f64(args.batch_ms.max(0.0) / 1000.0);
    let http = reqwest::Client::new();
    let addr = server.addr.as_str();
    let kind = server.kind;
    let mut tasks = Vec::new();

    // Pilots first, so every frame has its watchers.
    let pilot_jobs: Vec<(usize, usize)> =
        (0..args.devices).flat_map(|d| (0..args.pilots).map(move |p| (d, p))).collect();
    let mut pilots = futures_util::stream::iter(pilot_jobs.into_iter().map(|(d, p)| {
        let http = http.clone();
        let device = creds.devices[d].0.clone();
        let key = creds.pilots[d][p].clone();
        let sh = sh.clone();
        async move {
            let task = match kind {
                Kind::Tether => {
                    let ws = tether_pilot_connect(&http, addr, &key, &device).await?;
                    tokio::task::spawn_local(tether_pilot(ws, sh))
                }
                Kind::Nats => {
                    let ws = nats_pilot_connect(addr, &device).await?;
                    tokio::task::spawn_local(nats_pilot(ws, sh))
                }
                Kind::Mosquitto => {
                    let (tcp, buf) = mqtt_pilot_connect(addr, &format!("pilot-{device}-{p}"), &device).await?;
                    tokio::task::spawn_local(mqtt_pilot(tcp, buf, sh))
                }
            };
            Ok::<_, anyhow::Error>(task)
        }
        .map_err_context(format!("pilot {p} of {}", creds.devices[d].0))
    }))
    .buffer_unordered(SETUP_CONCURRENCY);
    while let Some(t) = pilots.next().await {
        tasks.push(t?);
    }
    drop(pilots);

    let n = args.devices;
    let mut devices = futures_util::stream::iter(creds.devices.iter().enumerate().map(|(i, (id, secret))| {
        let sh = sh.clone();
        let rate = args.rate;
        async move {
            let fgen = FrameGen::new(id, i);
            let pacer = Pacer::new(i as f64 / n as f64, batch, rate);
            let task = match kind {
                Kind::Tether => {
                    let ws = tether_device_connect(addr, id, secret).await?;
                    tokio::task::spawn_local(tether_device(ws, sh, fgen, pacer))
                }
                Kind::Nats => {
                    let ws = nats_connect(addr).await?;
                    tokio::task::spawn_local(nats_device(ws, sh, fgen, pacer))
                }
                Kind::Mosquitto => {
                    let (tcp, _) = mqtt_connect(addr, id).await?;
                    tokio::task::spawn_local(mqtt_device(tcp, sh, fgen, pacer))
                }
            };
            Ok::<_, anyhow::Error>(task)
        }
        .map_err_context(format!("device {id}"))
    }))
    .buffer_unordered(SETUP_CONCURRENCY);
    while let Some(t) = devices.next().await {
        tasks.push(t?);
    }
    Ok(tasks)
}

/// `.context()` for a future's `anyhow::Result`.
trait MapErrContext: std::future::Future + Sized {
    fn map_err_context<T>(self, what: String) -> impl std::future::Future<Output = anyhow::Result<T>>
    where
        Self: std::future::Future<Output = anyhow::Result<T>>,
    {
        async move { self.await.context(what) }
    }
}
impl<F: std::future::Future> MapErrContext for F {}

// ---------------------------------------------------------------------------------------------
// Measuring

#[derive(Debug, Clone, Default)]
struct Measure {
    kind: Option<Kind>,
    /// Frames per second per device asked for.
    rate: f64,
    window_s: f64,
    /// Frames the devices sent in the window, per second (offered).
    sent_per_s: f64,
    /// Deliveries that should have happened (frames sent in the window x pilots).
    expected: u64,
    delivered: u64,
    delivered_per_s: f64,
    seq_missing: u64,
    seq_behind: u64,
    server_reported_drops: u64,
    rate_limited: u64,
    errors: u64,
    closed: u64,
    first_errors: Vec<String>,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    server_cpu_s: f64,
    server_threads: usize,
    gen_cpu_s: f64,
    /// The relay's own counters after the window (Tether only).
    relay_metrics: Option<String>,
}

impl Measure {
    fn drops(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }
    fn cpu_us_per_msg(&self) -> f64 {
        if self.delivered == 0 { f64::NAN } else { self.server_cpu_s * 1e6 / self.delivered as f64 }
    }
    fn server_core(&self) -> f64 {
        self.server_cpu_s / self.window_s
    }
    fn gen_core(&self) -> f64 {
        self.gen_cpu_s / self.window_s
    }
    /// The generator may be the limit: it used nearly its whole core, or more CPU than the
    /// server (on a shared machine neither may get a whole core).
    fn generator_busy(&self) -> bool {
        self.gen_core() >= GENERATOR_BUSY || self.gen_core() > self.server_core()
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1e6
}

/// Relay counters that say whether the relay dropped or refused anything.
async fn relay_metrics(addr: &str) -> Option<String> {
    let text = reqwest::get(format!("http://{addr}/metrics")).await.ok()?.text().await.ok()?;
    let keep = [
        "tether_telemetry_delivered_total",
        "tether_telemetry_dropped_total",
        "tether_rate_limited_total",
        "tether_slow_consumer_closes_total",
        "tether_sequence_gaps_total",
    ];
    let parts: Vec<String> = text
        .lines()
        .filter(|l| keep.iter().any(|k| l.starts_with(k)))
        .map(|l| l.trim_start_matches("tether_").replace(' ', "="))
        .collect();
    Some(parts.join(", "))
}

/// Runs the load at `rate` for `warmup`, then measures a window of `seconds` and drains.
async fn measure(
    server: &ServerProc,
    sh: &Shared,
    pilots: u64,
    rate: f64,
    warmup: f64,
    seconds: f64,
) -> anyhow::Result<Measure> {
    sh.rate.set(rate);
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    let pid = server.pid.to_string();
    let t0 = now_ns();
    let t1 = t0 + (seconds * 1e9) as u64;
    sh.reset_window((t0, t1));
    let (s0, g0) = (cpu_seconds(&pid)?, cpu_seconds("self")?);
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_nanos(t1 - t0)).await;
    let (s1, g1) = (cpu_seconds(&pid)?, cpu_seconds("self")?);
    // Frames still in flight: wait until every expected delivery is in, or DRAIN passes.
    let drain_until = Instant::now() + DRAIN;
    while sh.received.get() < sh.sent_in_window.get() * pilots && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let window_s = (t1 - t0) as f64 / 1e9;
    let mut lat = std::mem::take(&mut *sh.latencies.borrow_mut());
    lat.sort_unstable();
    let sent = sh.sent_in_window.get();
    let m = Measure {
        kind: Some(server.kind),
        rate,
        window_s,
        sent_per_s: sent as f64 / window_s,
        expected: sent * pilots,
        delivered: sh.received.get(),
        delivered_per_s: sh.received.get() as f64 / window_s,
        seq_missing: sh.seq_missing.get(),
        seq_behind: sh.seq_behind.get(),
        server_reported_drops: sh.server_reported_drops.get(),
        rate_limited: sh.rate_limited.get(),
        errors: sh.errors.get(),
        closed: sh.closed.get(),
        first_errors: sh.first_errors.borrow().clone(),
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        p999_ms: percentile(&lat, 0.999),
        max_ms: lat.last().map(|&v| v as f64 / 1e6).unwrap_or(f64::NAN),
        server_cpu_s: s1 - s0,
        server_threads: thread_count(server.pid),
        gen_cpu_s: g1 - g0,
        relay_metrics: if server.kind == Kind::Tether { relay_metrics(&server.addr).await } else { None },
    };
    // Keep the allocation for the next window.
    lat.clear();
    *sh.latencies.borrow_mut() = lat;
    Ok(m)
}

/// One server's session: start it, connect everyone, run `steps` (rate, warmup, seconds), stop.
/// Stops early at the first step `stop_after` rejects.
async fn session(
    args: &TelemetryArgs,
    kind: Kind,
    label: &str,
    creds: &Creds,
    template: &Path,
    pin: bool,
    steps: &[(f64, f64, f64)],
    mut keep_going: impl FnMut(&Measure) -> bool,
) -> anyhow::Result<(Vec<Measure>, u64)> {
    let dir = args.data_dir.join(format!("run-{label}"));
    let server = start_server(args, kind, &dir, template, pin).await?;
    let sh = Rc::new(Shared::default());
    sh.window.set((u64::MAX, u64::MAX));
    let setup = Instant::now();
    let tasks = match connect_all(&server, creds, args, &sh).await {
        Ok(t) => t,
        Err(e) => {
            server.stop().await;
            return Err(e.context(format!("{} setup", kind.name())));
        }
    };
    eprintln!(
        "  {} ({label}): {} connections up in {:.1} s (pid {}, {} threads)",
        kind.name(),
        tasks.len(),
        setup.elapsed().as_secs_f64(),
        server.pid,
        thread_count(server.pid)
    );
    let mut out = Vec::new();
    let mut result = Ok(());
    for &(rate, warmup, seconds) in steps {
        match measure(&server, &sh, args.pilots as u64, rate, warmup, seconds).await {
            Ok(m) => {
                let go = keep_going(&m);
                out.push(m);
                if !go {
                    break;
                }
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    sh.rate.set(0.0);
    let hwm = status_kib(server.pid, "VmHWM:").unwrap_or(0);
    for t in &tasks {
        t.abort();
    }
    drop(tasks);
    tokio::task::yield_now().await;
    let _ = &server.dir;
    server.stop().await;
    result?;
    Ok((out, hwm))
}

// ---------------------------------------------------------------------------------------------
// Reporting

fn fmt_ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn spread(v: &[f64], f: impl Fn(f64) -> String) -> String {
    let ok: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    let med = median(ok.clone());
    if ok.len() <= 1 {
        return f(med);
    }
    let lo = ok.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ok.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} ({}-{})", f(med), f(lo), f(hi))
}

fn print_round_line(round: usize, m: &Measure, hwm_kib: u64) {
    println!(
        "| {} | {} | {:.0} | {:.0} | {} | {} / {} / {} / {} | {:.2} | {:.2} | {:.1} | {:.0}% | {:.0}% |",
        round,
        m.kind.map(Kind::name).unwrap_or("?"),
        m.sent_per_s,
        m.delivered_per_s,
        m.drops(),
        fmt_ms(m.p50_ms),
        fmt_ms(m.p99_ms),
        fmt_ms(m.p999_ms),
        fmt_ms(m.max_ms),
        m.server_cpu_s,
        m.cpu_us_per_msg(),
        hwm_kib as f64 / 1024.0,
        m.server_core() * 100.0,
        m.gen_core() * 100.0,
    );
}

fn problems(m: &Measure) -> Vec<String> {
    let mut p = Vec::new();
    if m.drops() > 0 {
        p.push(format!("{} of {} deliveries missing", m.drops(), m.expected));
    }
    if m.seq_missing > 0 || m.seq_behind > 0 {
        p.push(format!("sequence: {} skipped, {} at or behind the highest", m.seq_missing, m.seq_behind));
    }
    if m.server_reported_drops > 0 {
        p.push(format!("relay reported {} dropped (telemetry_dropped)", m.server_reported_drops));
    }
    if m.rate_limited > 0 {
        p.push(format!("{} refused by rate limits", m.rate_limited));
    }
    if m.errors > 0 || m.closed > 0 {
        p.push(format!("{} errors, {} connections ended", m.errors, m.closed));
    }
    p
}

#[derive(Debug, Default)]
struct SatResult {
    steps: Vec<Measure>,
    best: Option<Measure>,
    failure: Option<String>,
    hwm_kib: u64,
}

fn step_verdict(args: &TelemetryArgs, m: &Measure) -> Option<String> {
    let target = args.devices as f64 * m.rate * args.pilots as f64;
    let mut why = Vec::new();
    if m.delivered_per_s < 0.99 * target {
        why.push(format!("delivered {:.0}/s < 99% of {:.0}/s offered", m.delivered_per_s, target));
    }
    if m.drops() > 0 {
        why.push(format!("{} dropped", m.drops()));
    }
    if !(m.p99_ms <= args.sat_p99_ms) {
        why.push(format!("p99 {} ms > {} ms", fmt_ms(m.p99_ms), args.sat_p99_ms));
    }
    if m.closed > 0 {
        why.push(format!("{} connections ended", m.closed));
    }
    if why.is_empty() { None } else { Some(why.join("; ")) }
}

async fn run(args: TelemetryArgs, pin: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)?;
    let needs_tether = args.servers.contains(&Kind::Tether);
    if needs_tether && !args.relay_bin.exists() {
        bail!("{} not found: cargo build --release -p tether-relay --bin tether-relay", args.relay_bin.display());
    }
    let template = args.data_dir.join(format!("store-{}x{}", args.devices, args.pilots));
    let creds = if needs_tether {
        provision(&template, args.devices, args.pilots)?
    } else {
        Creds {
            devices: (0..args.devices).map(|i| (format!("dev-{i:05}"), String::new())).collect(),
            pilots: vec![vec![String::new(); args.pilots]; args.devices],
        }
    };

    // Settings and versions.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("# tether-bench telemetry");
    println!();
    println!(
        "workload: {} devices x {} Hz x {} pilots each = {:.0} deliveries/s; frames ~{} bytes of JSON payload",
        args.devices,
        args.rate,
        args.pilots,
        args.devices as f64 * args.rate * args.pilots as f64,
        {
            let mut s = String::new();
            FrameGen::new("dev-00000", 0).payload(&mut s, 1_000_000_000_000, 1_732_262_400_000);
            s.len()
        }
    );
    println!(
        "window: {} s after {} s warm-up, {} round(s); drain up to {} s; batch {} ms; pinning: {}",
        args.seconds,
        args.warmup,
        args.rounds,
        DRAIN.as_secs(),
        args.batch_ms,
        if pin { "server on core 0 (taskset -c 0), generator on core 1" } else { "none" }
    );
    println!("machine: {} CPUs, load average at start: {}", num_cpus(), load.trim());
    for k in &args.servers {
        match k {
            Kind::Tether => println!(
                "Tether: {} ({}) {}",
                args.relay_bin.display(),
                version_of(&args.relay_bin, &["--version"]),
                relay_flags().join(" ")
            ),
            Kind::Nats => println!(
                "nats-server: {} (GOMAXPROCS=1; websocket no_tls, compression off; clients: NATS over WebSocket)",
                version_of(&args.nats_bin, &["--version"])
            ),
            Kind::Mosquitto => println!(
                "Mosquitto: {} (plain MQTT/TCP listener, set_tcp_nodelay true, persistence false, QoS 0)",
                version_of(&args.mosquitto_bin, &["-h"])
            ),
        }
    }
    println!();

    // Fixed workload, rounds of every server in turn.
    let mut fixed: Vec<(usize, Measure, u64)> = Vec::new();
    for round in 1..=args.rounds {
        for &kind in &args.servers {
            eprintln!("round {round}: {} at {} Hz", kind.name(), args.rate);
            let label = format!("{}-r{round}", format!("{kind:?}").to_lowercase());
            let (ms, hwm) =
                session(&args, kind, &label, &creds, &template, pin, &[(args.rate, args.warmup, args.seconds)], |_| {
                    true
                })
                .await?;
            for m in ms {
                let p = problems(&m);
                if !p.is_empty() {
                    eprintln!("    {}: {}", kind.name(), p.join("; "));
                    for e in &m.first_errors {
                        eprintln!("      {e}");
                    }
                }
                fixed.push((round, m, hwm));
            }
        }
    }

    println!("## Fixed workload: every round");
    println!();
    println!(
        "| round | server | offered frames/s | delivered msgs/s | drops | latency p50 / p99 / p99.9 / max (ms) | server CPU-s | CPU µs per delivered msg | peak RSS (MiB) | server % of core | generator % of core |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (round, m, hwm) in &fixed {
        print_round_line(*round, m, *hwm);
    }
    println!();
    for (round, m, _) in &fixed {
        let k = m.kind.map(Kind::name).unwrap_or("?");
        println!("- round {round}, {k}: {} server threads", m.server_threads);
        if let Some(r) = &m.relay_metrics {
            println!("  relay counters after the window: {r}");
        }
        for p in problems(m) {
            println!("  {p}");
        }
    }
    println!();

    // Side by side: medians (and the spread over rounds).
    let by = |k: Kind| fixed.iter().filter(move |(_, m, _)| m.kind == Some(k)).collect::<Vec<_>>();
    let col = |k: Kind, f: &dyn Fn(&Measure, u64) -> f64, show: &dyn Fn(f64) -> String| -> String {
        let v: Vec<f64> = by(k).iter().map(|(_, m, h)| f(m, *h)).collect();
        if v.is_empty() { "-".into() } else { spread(&v, show) }
    };
    type Row<'a> = (&'a str, Box<dyn Fn(&Measure, u64) -> f64>, Box<dyn Fn(f64) -> String>);
    let rows: Vec<Row> = vec![
        ("offered frames/s (devices)", Box::new(|m, _| m.sent_per_s), Box::new(|v| format!("{v:.0}"))),
        ("delivered msgs/s", Box::new(|m, _| m.delivered_per_s), Box::new(|v| format!("{v:.0}"))),
        ("expected deliveries in the window", Box::new(|m, _| m.expected as f64), Box::new(|v| format!("{v:.0}"))),
        ("drops (expected - delivered)", Box::new(|m, _| m.drops() as f64), Box::new(|v| format!("{v:.0}"))),
        ("sequence numbers skipped at pilots", Box::new(|m, _| m.seq_missing as f64), Box::new(|v| format!("{v:.0}"))),
        ("latency p50 (ms)", Box::new(|m, _| m.p50_ms), Box::new(fmt_ms)),
        ("latency p99 (ms)", Box::new(|m, _| m.p99_ms), Box::new(fmt_ms)),
        ("latency p99.9 (ms)", Box::new(|m, _| m.p999_ms), Box::new(fmt_ms)),
        ("latency max (ms)", Box::new(|m, _| m.max_ms), Box::new(fmt_ms)),
        ("server CPU-s in the window", Box::new(|m, _| m.server_cpu_s), Box::new(|v| format!("{v:.2}"))),
        ("server CPU per delivered msg (µs)", Box::new(|m, _| m.cpu_us_per_msg()), Box::new(|v| format!("{v:.2}"))),
        ("server peak RSS (MiB)", Box::new(|_, h| h as f64 / 1024.0), Box::new(|v| format!("{v:.1}"))),
        ("generator CPU, % of its core", Box::new(|m, _| m.gen_core() * 100.0), Box::new(|v| format!("{v:.0}%"))),
    ];
    if !fixed.is_empty() {
        println!(
            "## Fixed workload side by side: {} x {} Hz x {} (median of {} round(s), range in brackets)",
            args.devices, args.rate, args.pilots, args.rounds
        );
        println!();
        print!("| measure |");
        for k in &args.servers {
            print!(" {} |", k.name());
        }
        println!();
        print!("|---|");
        for _ in &args.servers {
            print!("---|");
        }
        println!();
        for (name, f, show) in &rows {
            print!("| {name} |");
            for &k in &args.servers {
                print!(" {} |", col(k, f.as_ref(), show.as_ref()));
            }
            println!();
        }
        println!();
    }

    // Saturation.
    let mut sat: Vec<(Kind, SatResult)> = Vec::new();
    if args.saturation {
        let mut ladder = args.ladder.clone();
        ladder.retain(|r| *r > 0.0);
        ladder.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        for &kind in &args.servers {
            eprintln!("saturation: {}", kind.name());
            let mut res = SatResult::default();
            let steps: Vec<(f64, f64, f64)> = ladder.iter().map(|&r| (r, args.sat_warmup, args.sat_seconds)).collect();
            let label = format!("{}-sat", format!("{kind:?}").to_lowercase());
            let (ms, hwm) = session(&args, kind, &label, &creds, &template, pin, &steps, |m| {
                let v = step_verdict(&args, m);
                eprintln!(
                    "    {:>5} Hz: delivered {:>8.0}/s, p99 {} ms, server {:.0}% / generator {:.0}% of a core{}",
                    m.rate,
                    m.delivered_per_s,
                    fmt_ms(m.p99_ms),
                    m.server_core() * 100.0,
                    m.gen_core() * 100.0,
                    v.as_deref().map(|w| format!(": FAIL ({w})")).unwrap_or_default()
                );
                v.is_none()
            })
            .await?;
            res.hwm_kib = hwm;
            // One more step halfway between the last pass and the first failure.
            let last_pass = ms.iter().rev().find(|m| step_verdict(&args, m).is_none()).map(|m| m.rate);
            let first_fail = ms.iter().find(|m| step_verdict(&args, m).is_some()).map(|m| m.rate);
            res.steps = ms;
            if let (Some(lo), Some(hi)) = (last_pass, first_fail) {
                let mid = ((lo + hi) / 2.0).round();
                if mid > lo && mid < hi {
                    let label = format!("{}-sat-mid", format!("{kind:?}").to_lowercase());
                    let (ms2, hwm2) =
                        session(&args, kind, &label, &creds, &template, pin, &[(mid, args.sat_warmup, args.sat_seconds)], |m| {
                            let v = step_verdict(&args, m);
                            eprintln!(
                                "    {:>5} Hz: delivered {:>8.0}/s, p99 {} ms, server {:.0}% / generator {:.0}% of a core{}",
                                m.rate,
                                m.delivered_per_s,
                                fmt_ms(m.p99_ms),
                                m.server_core() * 100.0,
                                m.gen_core() * 100.0,
                                v.as_deref().map(|w| format!(": FAIL ({w})")).unwrap_or_default()
                            );
                            true
                        })
                        .await?;
                    res.hwm_kib = res.hwm_kib.max(hwm2);
                    res.steps.extend(ms2);
                }
            }
            res.best = res
                .steps
                .iter()
                .filter(|m| step_verdict(&args, m).is_none())
                .max_by(|a, b| a.delivered_per_s.partial_cmp(&b.delivered_per_s).unwrap_or(std::cmp::Ordering::Equal))
                .cloned();
            res.failure = res
                .steps
                .iter()
                .filter_map(|m| step_verdict(&args, m).map(|w| (m.rate, w, m.generator_busy())))
                .min_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal))
                .map(|(r, w, busy)| {
                    format!("{r} Hz: {w}{}", if busy { " (generator at its core's limit)" } else { "" })
                });
            sat.push((kind, res));
        }

        println!(
            "## Saturation: {} devices x {} pilots, rate per device raised along {:?} Hz ({} s windows after {} s; a step fails below 99% of offered, on any drop, or p99 > {} ms)",
            args.devices, args.pilots, ladder, args.sat_seconds, args.sat_warmup, args.sat_p99_ms
        );
        println!();
        println!(
            "| server | rate (Hz/device) | offered msgs/s | delivered msgs/s | drops | p50 / p99 / max (ms) | server % of core | CPU µs per msg | generator % of core | verdict |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for (kind, res) in &sat {
            for m in &res.steps {
                let offered = args.devices as f64 * m.rate * args.pilots as f64;
                println!(
                    "| {} | {} | {:.0} | {:.0} | {} | {} / {} / {} | {:.0}% | {:.2} | {:.0}% | {} |",
                    kind.name(),
                    m.rate,
                    offered,
                    m.delivered_per_s,
                    m.drops(),
                    fmt_ms(m.p50_ms),
                    fmt_ms(m.p99_ms),
                    fmt_ms(m.max_ms),
                    m.server_core() * 100.0,
                    m.cpu_us_per_msg(),
                    m.gen_core() * 100.0,
                    step_verdict(&args, m).map(|w| format!("fail: {w}")).unwrap_or_else(|| "ok".into())
                );
            }
        }
        println!();
        println!(
            "| server | highest sustained delivered msgs/s | at rate (Hz/device) | server % of core there | generator % of core there | first failure | peak RSS (MiB) |"
        );
        println!("|---|---|---|---|---|---|---|");
        for (kind, res) in &sat {
            match &res.best {
                Some(b) => println!(
                    "| {} | {:.0}{} | {} | {:.0}% | {:.0}% | {} | {:.1} |",
                    kind.name(),
                    b.delivered_per_s,
                    if b.generator_busy() { " (generator-limited: at least this)" } else { "" },
                    b.rate,
                    b.server_core() * 100.0,
                    b.gen_core() * 100.0,
                    res.failure.as_deref().unwrap_or("none on the ladder (at least this)"),
                    res.hwm_kib as f64 / 1024.0
                ),
                None => println!(
                    "| {} | no step passed | - | - | - | {} | {:.1} |",
                    kind.name(),
                    res.failure.as_deref().unwrap_or("-"),
                    res.hwm_kib as f64 / 1024.0
                ),
            }
        }
        println!();
        for (kind, res) in &sat {
            if let Some(b) = &res.best
                && res.failure.is_none()
            {
                println!(
                    "note: {} passed every step of the ladder; its saturation is above {:.0} msgs/s.",
                    kind.name(),
                    b.delivered_per_s
                );
            }
            let gen_limited = res.steps.iter().any(|m| step_verdict(&args, m).is_some() && m.generator_busy())
                || res.best.as_ref().is_some_and(Measure::generator_busy);
            if gen_limited {
                println!(
                    "note: for {} the generator used {:.0}% or more of its core, or more CPU than the server, at the \
                     best or the failing step: the figure may be the generator's limit, not the server's.",
                    kind.name(),
                    GENERATOR_BUSY * 100.0
                );
            }
            for m in &res.steps {
                let p = problems(m);
                if !p.is_empty() || m.relay_metrics.is_some() {
                    println!("- {} at {} Hz: {}", kind.name(), m.rate, p.join("; "));
                    if let Some(r) = &m.relay_metrics {
                        println!("  relay counters after the window: {r}");
                    }
                    for e in m.first_errors.iter().take(3) {
                        println!("  {e}");
                    }
                }
            }
        }
        println!();
    }

    // Ratios: Tether against each other server.
    if args.servers.contains(&Kind::Tether) && args.servers.len() > 1 {
        let med = |k: Kind, f: &dyn Fn(&Measure, u64) -> f64| median(by(k).iter().map(|(_, m, h)| f(m, *h)).collect());
        println!("## Ratios: Tether / other (below 1.0 means Tether is lower; for throughput higher is better)");
        println!();
        print!("| measure |");
        let others: Vec<Kind> = args.servers.iter().copied().filter(|k| *k != Kind::Tether).collect();
        for k in &others {
            print!(" Tether / {} |", k.name());
        }
        println!();
        print!("|---|");
        for _ in &others {
            print!("---|");
        }
        println!();
        let ratio_rows: Vec<(&str, Box<dyn Fn(&Measure, u64) -> f64>)> = vec![
            ("latency p50", Box::new(|m, _| m.p50_ms)),
            ("latency p99", Box::new(|m, _| m.p99_ms)),
            ("latency p99.9", Box::new(|m, _| m.p999_ms)),
            ("server CPU per delivered msg", Box::new(|m, _| m.cpu_us_per_msg())),
            ("server peak RSS", Box::new(|_, h| h as f64)),
        ];
        for (name, f) in &ratio_rows {
            print!("| {name} (fixed workload, medians) |");
            for &k in &others {
                let r = med(Kind::Tether, f.as_ref()) / med(k, f.as_ref());
                print!(" {} |", if r.is_finite() { format!("{r:.2}") } else { "-".into() });
            }
            println!();
        }
        if !sat.is_empty() {
            let best = |k: Kind| {
                sat.iter().find(|(kk, _)| *kk == k).and_then(|(_, r)| r.best.as_ref()).map(|b| b.delivered_per_s)
            };
            print!("| saturation throughput |");
            for &k in &others {
                match (best(Kind::Tether), best(k)) {
                    (Some(a), Some(b)) => print!(" {:.2} |", a / b),
                    _ => print!(" - |"),
                }
            }
            println!();
        }
        println!();
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at the end: {}", load.trim());
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0).max(
        std::fs::read_to_string("/proc/cpuinfo")
            .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
            .unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_what_receivers_search_for() {
        let mut g = FrameGen::new("dev-00007", 7);
        let mut s = String::new();
        g.payload(&mut s, 123_456_789, 1_732_262_400_000);
        let v: serde_json::Value = serde_json::from_str(&s).expect("valid JSON");
        assert_eq!(v["sequence"], 0);
        assert_eq!(v["sent_ns"], 123_456_789u64);
        assert!(v["data"]["gps"]["latitude"].as_f64().unwrap() > 37.0);
        assert!((280..400).contains(&s.len()), "payload is {} bytes", s.len());
        let f = memmem::Finder::new(b"\"sequence\":");
        assert_eq!(number_after(s.as_bytes(), &f), Some(0));
        s.clear();
        g.payload(&mut s, 5, 1);
        assert_eq!(number_after(s.as_bytes(), &f), Some(1));
    }

    #[test]
    fn fixed_point_numbers() {
        let mut s = String::new();
        push_fixed(&mut s, -122_417_700, 6);
        assert_eq!(s, "-122.417700");
        s.clear();
        push_fixed(&mut s, 5, 2);
        assert_eq!(s, "0.05");
    }

    #[test]
    fn nats_stream_parsing_keeps_partial_operations() {
        let sh = Shared::default();
        sh.window.set((0, u64::MAX));
        let mut seq = PilotSeq::default();
        let payload = br#"{"sequence":4,"sent_ns":1}"#;
        let mut stream = Vec::new();
        stream.extend_from_slice(b"+OK\r\nMSG tele.dev-1 1 ");
        stream.extend_from_slice(payload.len().to_string().as_bytes());
        stream.extend_from_slice(b"\r\n");
        stream.extend_from_slice(payload);
        stream.extend_from_slice(b"\r\nPING\r\nMSG tele.dev-1 1 30\r\n{\"seq");
        let (used, ping) = nats_parse(&stream, &sh, &mut seq);
        assert!(ping);
        assert_eq!(sh.received.get(), 1);
        assert_eq!(&stream[used..], b"MSG tele.dev-1 1 30\r\n{\"seq");
    }

    #[test]
    fn time_sync_t1_is_echoed_raw() {
        assert_eq!(raw_t1(r#"{"type":"time_sync","payload":{"t1":1732262400123.456}}"#), Some("1732262400123.456"));
        assert_eq!(refused_count("rate limit exceeded: 37 message(s) refused since"), 37);
    }
}
