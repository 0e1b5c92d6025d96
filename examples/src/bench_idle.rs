//! `tether-bench idle`: what N idle, authenticated device connections cost a server, in memory
//! and in the CPU their heartbeats take; the relay side by side with nats-server (WebSocket) and
//! Mosquitto (MQTT over TCP) holding the same N idle clients.
//!
//! For each N, every server is a fresh process pinned to core 0 (`taskset -c 0`; nats-server
//! also with `GOMAXPROCS=1`). The clients are this binary again (`idle-worker`, hidden), as many
//! processes as needed for at most `--per-worker` connections each (a process may open at most
//! 20,000 files here), each pinned to core 1 with a single-threaded runtime. The clients behave
//! like idle agents:
//!
//! - **Tether**: a device of the provisioned store (`target/bench-storm`, shared with `storm`)
//!   connects to `/ws?clientID=` with `Authorization: Bearer <secret>` and waits for `auth_ok`.
//!   Then it does what an idle `tether-device` does: a WebSocket ping every third of the
//!   connection timeout (the agent's `connection_timeout / 3`), answers the relay's pings (pong,
//!   by tungstenite) and its `time_sync` with a `time_sync_response` (t1 echoed, t2 at arrival,
//!   t3 at send, as device/src/link.rs does).
//! - **NATS**: a WebSocket client (`ws://`, binary frames) reads `INFO`, sends `CONNECT` with a
//!   user and password, subscribes to its command subject (`cmd.<id>`) and waits for the `PONG`
//!   to its `PING`. nats-server pings every `--ping-interval` (set in its config) and the
//!   client answers `PONG`; the client pings on the same schedule as the agent.
//! - **MQTT**: a TCP client sends `CONNECT` (MQTT 3.1.1, user and password, clean session,
//!   keep-alive = the connection timeout), waits for `CONNACK`, subscribes to `cmd/<id>` (QoS 1)
//!   and sends `PINGREQ` on the agent's schedule. Mosquitto itself never pings.
//!
//! Measured per server: RSS before the clients connect and with N connected after
//! `--settle` seconds (`VmRSS`), and the CPU time (`/proc/<pid>/stat`) over an idle window of
//! `--window` seconds, during which nothing but heartbeats flows.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use signaling::Envelope;
use signaling::message::{self, Body, TimeSyncResponse};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::{cpu_seconds, provision, rss_kib};

/// The servers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Server {
    /// The Tether relay (release binary), native device protocol.
    Tether,
    /// nats-server, WebSocket listener.
    Nats,
    /// Mosquitto, MQTT over TCP.
    Mosquitto,
}

impl Server {
    fn label(self) -> &'static str {
        match self {
            Server::Tether => "tether-relay",
            Server::Nats => "nats-server (WebSocket)",
            Server::Mosquitto => "mosquitto (MQTT/TCP)",
        }
    }
}

/// The password of the broker user every NATS and MQTT client logs in with.
const BROKER_USER: &str = "bench";
const BROKER_PASSWORD: &str = "bench-idle-0123456789";

/// `tether-bench idle` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    /// Connection counts, one run (fresh servers) each, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "5000,10000,15000")]
    pub counts: Vec<usize>,
    /// Which servers to hold the connections against.
    #[arg(long, value_delimiter = ',', default_value = "tether,nats,mosquitto")]
    pub servers: Vec<Server>,
    /// Length of the idle window over which CPU is measured, seconds. A multiple of
    /// `--ping-interval` counts every server ping equally often.
    #[arg(long, default_value_t = 60.0)]
    pub window: f64,
    /// Seconds between the last client's authentication and the RSS reading (the relay's first
    /// quick clock syncs happen in the first second of a connection).
    #[arg(long, default_value_t = 5.0)]
    pub settle: f64,
    /// The relay's `--ping-interval` (WebSocket ping and `time_sync`), and nats-server's
    /// `ping_interval`, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub ping_interval: f64,
    /// The relay's `--connection-timeout` and the agent's `connectionTimeout`, seconds. Clients
    /// ping every third of it, as the agent does; MQTT clients use it as their keep-alive.
    #[arg(long, default_value_t = 30.0)]
    pub connection_timeout: f64,
    /// Run the servers one after the other for each N instead of all at once. All at once, the
    /// servers share core 0 while idle and the run takes a third of the time; each one's CPU
    /// is still its own (`/proc`).
    #[arg(long)]
    pub sequential: bool,
    /// Most connections per client process (a process may open at most 20,000 files).
    #[arg(long, default_value_t = 8000)]
    pub per_worker: usize,
    /// Connections each client process has in progress at once (connecting, authenticating).
    #[arg(long, default_value_t = 128)]
    pub in_flight: usize,
    /// The relay binary.
    #[arg(long, default_value = "target/release/tether-relay")]
    pub relay_bin: PathBuf,
    /// Extra environment for the relay, `NAME=value` (e.g. `MALLOC_ARENA_MAX=2`), repeatable.
    #[arg(long)]
    pub relay_env: Vec<String>,
    /// The nats-server binary.
    #[arg(long, default_value = "/usr/sbin/nats-server")]
    pub nats_bin: PathBuf,
    /// The mosquitto binary.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    pub mosquitto_bin: PathBuf,
    /// The relay's store with the provisioned devices (shared with `storm`; created or extended
    /// on first use).
    #[arg(long, default_value = "target/bench-storm")]
    pub data_dir: PathBuf,
    /// Where the brokers' configs and the servers' logs go.
    #[arg(long, default_value = "target/bench-idle")]
    pub work_dir: PathBuf,
    /// Do not pin the servers to core 0 and the clients to core 1.
    #[arg(long)]
    pub no_pin: bool,
}

/// `tether-bench idle-worker`: one client process (started by `idle`).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    server: Server,
    #[arg(long)]
    addr: String,
    /// The devices' secrets (Tether): `<id> <secret>` lines.
    #[arg(long)]
    creds: Option<PathBuf>,
    #[arg(long)]
    from: usize,
    #[arg(long)]
    count: usize,
    /// Seconds between the client's own pings.
    #[arg(long)]
    client_ping: f64,
    /// MQTT keep-alive, seconds.
    #[arg(long)]
    keepalive: u16,
    #[arg(long)]
    in_flight: usize,
    #[arg(long)]
    no_pin: bool,
}

fn pin_to(core: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(core)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pinning to core {core}"))
}

fn cores() -> usize {
    nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| (0..nix::sched::CpuSet::count()).filter(|&i| set.is_set(i).unwrap_or(false)).count())
        .unwrap_or(1)
}

/// `tether-bench idle`.
pub fn main(args: IdleArgs) -> anyhow::Result<()> {
    let pin = !args.no_pin && cores() >= 2;
    if pin {
        pin_to(1)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run_all(args, pin))
}

// ---------------------------------------------------------------------------------------------
// Servers

struct ServerProc {
    kind: Server,
    child: Child,
    pid: u32,
    /// Where clients connect (`host:port`).
    addr: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn pinned(bin: &Path, pin: bool) -> Command {
    if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

async fn wait_port(addr: &str, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited ({status}) before listening on {addr}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {addr} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_server(args: &IdleArgs, kind: Server, pin: bool) -> anyhow::Result<ServerProc> {
    std::fs::create_dir_all(&args.work_dir)?;
    let log = |name: &str| std::fs::File::create(args.work_dir.join(name));
    match kind {
        Server::Tether => {
            let mut cmd = pinned(&args.relay_bin, pin);
            cmd.arg("--data-dir")
                .arg(&args.data_dir)
                .arg("--db")
                .arg(args.data_dir.join("tether.db"))
                .args(["--port", "0", "--bind", "127.0.0.1", "--log-level", "warn"])
                .args(["--ping-interval", &args.ping_interval.to_string()])
                .args(["--connection-timeout", &args.connection_timeout.to_string()])
                .env_remove("PORT")
                .stdout(Stdio::piped())
                .stderr(log("relay.log")?)
                .kill_on_drop(true);
            for kv in &args.relay_env {
                let (k, v) = kv.split_once('=').with_context(|| format!("--relay-env {kv}: NAME=value"))?;
                cmd.env(k, v);
            }
            let mut child = cmd.spawn().with_context(|| format!("starting {}", args.relay_bin.display()))?;
            let pid = child.id().context("relay pid")?;
            let (addr, mut lines) =
                crate::bench_proc::relay_listen_addr(&mut child, &args.work_dir.join("relay.log")).await?;
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok(ServerProc { kind, child, pid, addr })
        }
        Server::Nats => {
            let (port, ws_port) = (free_port()?, free_port()?);
            let conf = args.work_dir.join("nats.conf");
            std::fs::write(
                &conf,
                format!(
                    "listen: \"127.0.0.1:{port}\"\n\
                     ping_interval: \"{ping}s\"\n\
                     ping_max: 3\n\
                     max_connections: 100000\n\
                     authorization {{ user: \"{BROKER_USER}\", password: \"{BROKER_PASSWORD}\" }}\n\
                     websocket {{\n  host: \"127.0.0.1\"\n  port: {ws_port}\n  no_tls: true\n  compression: false\n}}\n",
                    ping = args.ping_interval
                ),
            )?;
            let mut cmd = pinned(&args.nats_bin, pin);
            cmd.arg("-c")
                .arg(&conf)
                .env("GOMAXPROCS", "1")
                .stdout(Stdio::null())
                .stderr(log("nats.log")?)
                .kill_on_drop(true);
            let mut child = cmd.spawn().with_context(|| format!("starting {}", args.nats_bin.display()))?;
            let pid = child.id().context("nats pid")?;
            let addr = format!("127.0.0.1:{ws_port}");
            wait_port(&addr, &mut child, "nats-server").await?;
            Ok(ServerProc { kind, child, pid, addr })
        }
        Server::Mosquitto => {
            let port = free_port()?;
            let dir = std::fs::canonicalize(&args.work_dir)?;
            let passwd = dir.join("mosquitto.passwd");
            let _ = std::fs::remove_file(&passwd);
            let status = std::process::Command::new("mosquitto_passwd")
                .args(["-b", "-c"])
                .arg(&passwd)
                .args([BROKER_USER, BROKER_PASSWORD])
                .stdout(Stdio::null())
                .status()
                .context("mosquitto_passwd")?;
            if !status.success() {
                bail!("mosquitto_passwd failed: {status}");
            }
            let conf = dir.join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "per_listener_settings false\n\
                     listener {port} 127.0.0.1\n\
                     allow_anonymous false\n\
                     password_file {}\n\
                     persistence false\n\
                     max_keepalive 3600\n\
                     connection_messages false\n\
                     log_dest stderr\n\
                     log_type error\n\
                     log_type warning\n\
                     user root\n",
                    passwd.display()
                ),
            )?;
            let mut cmd = pinned(&args.mosquitto_bin, pin);
            cmd.arg("-c").arg(&conf).stdout(Stdio::null()).stderr(log("mosquitto.log")?).kill_on_drop(true);
            let mut child = cmd.spawn().with_context(|| format!("starting {}", args.mosquitto_bin.display()))?;
            let pid = child.id().context("mosquitto pid")?;
            let addr = format!("127.0.0.1:{port}");
            wait_port(&addr, &mut child, "mosquitto").await?;
            Ok(ServerProc { kind, child, pid, addr })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client processes

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

/// What a worker reports: `stats <alive> <lost> <server pings> <pongs> <time syncs> <cpu s>`.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    alive: u64,
    lost: u64,
    server_pings: u64,
    pongs: u64,
    syncs: u64,
    cpu: f64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.alive += o.alive;
        self.lost += o.lost;
        self.server_pings += o.server_pings;
        self.pongs += o.pongs;
        self.syncs += o.syncs;
        self.cpu += o.cpu;
    }

    fn minus(&self, o: &Stats) -> Stats {
        Stats {
            alive: self.alive,
            lost: self.lost - o.lost,
            server_pings: self.server_pings - o.server_pings,
            pongs: self.pongs - o.pongs,
            syncs: self.syncs - o.syncs,
            cpu: self.cpu - o.cpu,
        }
    }
}

impl WorkerProc {
    async fn line(&mut self) -> anyhow::Result<String> {
        self.lines.next_line().await?.context("a client process exited")
    }

    async fn stats(&mut self) -> anyhow::Result<Stats> {
        self.stdin.write_all(b"stats\n").await?;
        self.stdin.flush().await?;
        let line = self.line().await?;
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() != Some(&"stats") || f.len() < 7 {
            bail!("unexpected worker output: {line}");
        }
        Ok(Stats {
            alive: f[1].parse()?,
            lost: f[2].parse()?,
            server_pings: f[3].parse()?,
            pongs: f[4].parse()?,
            syncs: f[5].parse()?,
            cpu: f[6].parse()?,
        })
    }
}

async fn spawn_workers(args: &IdleArgs, s: &ServerProc, n: usize, pin: bool) -> anyhow::Result<Vec<WorkerProc>> {
    let exe = std::env::current_exe()?;
    let creds = args.data_dir.join("secrets.txt");
    let per = args.per_worker.max(1);
    let mut workers = Vec::new();
    let mut from = 0;
    while from < n {
        let count = per.min(n - from);
        let mut cmd = Command::new(&exe);
        cmd.arg("idle-worker")
            .args([
                "--server",
                match s.kind {
                    Server::Tether => "tether",
                    Server::Nats => "nats",
                    Server::Mosquitto => "mosquitto",
                },
            ])
            .args(["--addr", &s.addr])
            .args(["--from", &from.to_string(), "--count", &count.to_string()])
            .args(["--client-ping", &(args.connection_timeout / 3.0).to_string()])
            .args(["--keepalive", &(args.connection_timeout.round() as u16).to_string()])
            .args(["--in-flight", &args.in_flight.to_string()])
            .arg("--creds")
            .arg(&creds)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if !pin {
            cmd.arg("--no-pin");
        }
        let mut child = cmd.spawn().context("starting a client process")?;
        let stdin = child.stdin.take().context("stdin")?;
        let lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        workers.push(WorkerProc { child, stdin, lines });
        from += count;
    }
    Ok(workers)
}

async fn sum_stats(workers: &mut [WorkerProc]) -> anyhow::Result<Stats> {
    let mut total = Stats::default();
    for w in workers {
        total.add(&w.stats().await?);
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------------
// The run

struct Row {
    n: usize,
    kind: Server,
    rss_before: u64,
    rss_with: u64,
    rss_end: u64,
    connect_secs: f64,
    failed: u64,
    window: Stats,
    cpu: f64,
    window_secs: f64,
}

async fn run_all(args: IdleArgs, pin: bool) -> anyhow::Result<()> {
    if pin && std::process::Command::new("taskset").arg("--version").stdout(Stdio::null()).status().is_err() {
        bail!("taskset not found (or pass --no-pin)");
    }
    let max = args.counts.iter().copied().max().unwrap_or(0);
    if args.servers.contains(&Server::Tether) {
        if !args.relay_bin.exists() {
            bail!("{} not found: build it with `cargo build --release -p tether-relay`", args.relay_bin.display());
        }
        provision(&args.data_dir, max)?;
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average at start: {}", load.trim());
    let mut rows = Vec::new();
    for &n in &args.counts {
        if args.sequential {
            for &s in &args.servers {
                rows.extend(run_group(&args, &[s], n, pin).await.with_context(|| format!("{} at {n}", s.label()))?);
            }
        } else {
            rows.extend(run_group(&args, &args.servers, n, pin).await.with_context(|| format!("N = {n}"))?);
        }
        // The rows so far, in case a later N fails.
        eprintln!("{}", table(&args, &rows));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average at the end: {}", load.trim());
    print!("{}", table(&args, &rows));
    Ok(())
}

async fn run_group(args: &IdleArgs, kinds: &[Server], n: usize, pin: bool) -> anyhow::Result<Vec<Row>> {
    let mut servers = Vec::new();
    for &k in kinds {
        servers.push(start_server(args, k, pin).await?);
    }
    // The baseline is read after the servers' start-up allocations have settled.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: Vec<u64> = servers.iter().map(|s| rss_kib(s.pid)).collect::<anyhow::Result<_>>()?;
    eprintln!("N = {n}: connecting to {}", kinds.iter().map(|k| k.label()).collect::<Vec<_>>().join(", "));
    let start = Instant::now();
    let mut groups = Vec::new();
    for s in &servers {
        groups.push(spawn_workers(args, s, n, pin).await?);
    }
    // Each worker says `ready <ok> <failed> <first error>` once every connection is up or failed.
    let mut connect_secs = vec![0.0; servers.len()];
    let mut failed = vec![0u64; servers.len()];
    // Generous: on a loaded machine the relay (one core, bcrypt per device) may manage only
    // 30-50 devices a second.
    let deadline = Duration::from_secs(300 + n as u64 / 10);
    for (i, g) in groups.iter_mut().enumerate() {
        for w in g.iter_mut() {
            let line = tokio::time::timeout(deadline.saturating_sub(start.elapsed()), w.line())
                .await
                .with_context(|| format!("{}: clients not connected in time", servers[i].kind.label()))??;
            let f: Vec<&str> = line.splitn(4, ' ').collect();
            if f.first() != Some(&"ready") || f.len() < 3 {
                bail!("unexpected worker output: {line}");
            }
            let bad: u64 = f[2].parse()?;
            if bad > 0 {
                eprintln!("{}: {bad} clients failed, first: {}", servers[i].kind.label(), f.get(3).unwrap_or(&""));
            }
            failed[i] += bad;
        }
        connect_secs[i] = start.elapsed().as_secs_f64();
        eprintln!("  {}: {} connected after {:.1} s", servers[i].kind.label(), n as u64 - failed[i], connect_secs[i]);
    }
    for s in &servers {
        if s.kind == Server::Tether {
            let health: serde_json::Value =
                reqwest::get(format!("http://{}/health", s.addr)).await?.json().await.context("relay /health")?;
            let devices = health["connections"]["device"].as_u64().unwrap_or(0);
            eprintln!("  the relay counts {devices} device connections");
        }
    }
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let with: Vec<u64> = servers.iter().map(|s| rss_kib(s.pid)).collect::<anyhow::Result<_>>()?;
    let cpu0: Vec<f64> = servers.iter().map(|s| cpu_seconds(s.pid)).collect::<anyhow::Result<_>>()?;
    let mut stats0 = Vec::new();
    for g in groups.iter_mut() {
        stats0.push(sum_stats(g).await?);
    }
    let t0 = Instant::now();
    eprintln!("  idle window of {:.0} s", args.window);
    tokio::time::sleep(Duration::from_secs_f64(args.window)).await;
    let cpu1: Vec<f64> = servers.iter().map(|s| cpu_seconds(s.pid)).collect::<anyhow::Result<_>>()?;
    let window_secs = t0.elapsed().as_secs_f64();
    let end: Vec<u64> = servers.iter().map(|s| rss_kib(s.pid)).collect::<anyhow::Result<_>>()?;
    let mut rows = Vec::new();
    for (i, g) in groups.iter_mut().enumerate() {
        let stats1 = sum_stats(g).await?;
        rows.push(Row {
            n,
            kind: servers[i].kind,
            rss_before: before[i],
            rss_with: with[i],
            rss_end: end[i],
            connect_secs: connect_secs[i],
            failed: failed[i],
            window: stats1.minus(&stats0[i]),
            cpu: cpu1[i] - cpu0[i],
            window_secs,
        });
    }
    for g in groups.iter_mut() {
        for w in g.iter_mut() {
            let _ = w.stdin.write_all(b"quit\n").await;
        }
    }
    for g in groups.iter_mut() {
        for w in g.iter_mut() {
            if tokio::time::timeout(Duration::from_secs(10), w.child.wait()).await.is_err() {
                let _ = w.child.kill().await;
            }
        }
    }
    // `kill` waits for the server to exit, so its sockets are closed before the next run.
    for mut s in servers {
        let _ = s.child.kill().await;
    }
    Ok(rows)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn table(args: &IdleArgs, rows: &[Row]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    writeln!(
        out,
        "idle connections: servers on core 0, clients on core 1; ping interval {} s, clients ping every {} s; \
         RSS {} s after the last client connected; CPU over an idle window of {} s ({})",
        args.ping_interval,
        args.connection_timeout / 3.0,
        args.settle,
        args.window,
        if args.sequential { "one server at a time" } else { "all servers at once" }
    )
    .ok();
    writeln!(
        out,
        "| N | server | held (failed) | RSS before | RSS with N | **per connection** | idle CPU in the window | \
         CPU per connection per minute | heartbeats per connection in the window (server pings / client pongs received / time syncs) |"
    ).ok();
    writeln!(out, "|---|---|---|---|---|---|---|---|---|").ok();
    for r in rows {
        let per = (r.rss_with.saturating_sub(r.rss_before)) as f64 / r.n as f64;
        let minutes = r.window_secs / 60.0;
        let per_conn_min_us = r.cpu / r.n as f64 / minutes * 1e6;
        let held = r.window.alive;
        let n = r.n as f64;
        writeln!(
        out,
            "| {} | {} | {} ({}) | {} | {} | **{:.2} KiB** | {:.2} s ({:.1}% of a core) | {:.1} µs | {:.2} / {:.2} / {:.2} |",
            r.n,
            r.kind.label(),
            held,
            r.failed,
            mib(r.rss_before),
            mib(r.rss_with),
            per,
            r.cpu,
            r.cpu / r.window_secs * 100.0,
            per_conn_min_us,
            r.window.server_pings as f64 / n,
            r.window.pongs as f64 / n,
            r.window.syncs as f64 / n,
        ).ok();
    }
    writeln!(out).ok();
    writeln!(
        out,
        "| N | server | connect phase | RSS at the end of the window | clients lost in the window | client processes' CPU in the window |"
    ).ok();
    writeln!(out, "|---|---|---|---|---|---|").ok();
    for r in rows {
        writeln!(
            out,
            "| {} | {} | {:.1} s | {} | {} | {:.2} s |",
            r.n,
            r.kind.label(),
            r.connect_secs,
            mib(r.rss_end),
            r.window.lost,
            r.window.cpu
        )
        .ok();
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The client process

#[derive(Debug, Default)]
struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
    alive: AtomicU64,
    lost: AtomicU64,
    server_pings: AtomicU64,
    pongs: AtomicU64,
    syncs: AtomicU64,
}

/// `tether-bench idle-worker`.
pub fn worker_main(args: WorkerArgs) -> anyhow::Result<()> {
    if !args.no_pin && cores() >= 2 {
        pin_to(1)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(worker(args))
}

fn client_ws_config() -> WebSocketConfig {
    // tungstenite's default read buffer is 128 KiB per socket: too much for 8,000 clients.
    let mut c = WebSocketConfig::default();
    c.read_buffer_size = 4096;
    c.write_buffer_size = 0;
    c
}

async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let ids: Vec<(String, String)> = match args.server {
        Server::Tether => {
            let path = args.creds.as_ref().context("--creds")?;
            std::fs::read_to_string(path)?
                .lines()
                .filter_map(|l| l.split_once(' '))
                .skip(args.from)
                .take(args.count)
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .collect()
        }
        _ => (args.from..args.from + args.count).map(|i| (format!("dev-{i:05}"), String::new())).collect(),
    };
    if ids.len() < args.count {
        bail!("only {} credentials from {}", ids.len(), args.from);
    }
    let c = Arc::new(Counters::default());
    let permits = Arc::new(tokio::sync::Semaphore::new(args.in_flight.max(1)));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let every = Duration::from_secs_f64(args.client_ping);
    let addr: Arc<str> = args.addr.clone().into();
    for (id, secret) in ids {
        let (c, permits, first_error, addr) = (c.clone(), permits.clone(), first_error.clone(), addr.clone());
        let (server, keepalive) = (args.server, args.keepalive);
        tokio::spawn(async move {
            let permit = permits.acquire_owned().await.expect("semaphore");
            let r = match server {
                Server::Tether => tether_client(&addr, &id, &secret, every, &c, permit).await,
                Server::Nats => nats_client(&addr, &id, every, &c, permit).await,
                Server::Mosquitto => mqtt_client(&addr, &id, every, keepalive, &c, permit).await,
            };
            if let Err(e) = r {
                first_error.lock().expect("lock").get_or_insert_with(|| format!("{id}: {e:#}"));
            }
        });
    }
    let n = args.count as u64;
    while c.ok.load(Relaxed) + c.failed.load(Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = first_error.lock().expect("lock").clone().unwrap_or_default();
    println!("ready {} {} {}", c.ok.load(Relaxed), c.failed.load(Relaxed), err.replace('\n', " "));
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Some(cmd) = stdin.next_line().await? {
        match cmd.trim() {
            "stats" => println!(
                "stats {} {} {} {} {} {}",
                c.alive.load(Relaxed),
                c.lost.load(Relaxed),
                c.server_pings.load(Relaxed),
                c.pongs.load(Relaxed),
                c.syncs.load(Relaxed),
                cpu_seconds(std::process::id())?
            ),
            "quit" => break,
            _ => {}
        }
    }
    Ok(())
}

/// Counts the connection as up (or failed) exactly once, and tracks it while it lives.
struct Up<'a> {
    c: &'a Counters,
    up: bool,
}

impl<'a> Up<'a> {
    fn new(c: &'a Counters) -> Self {
        Up { c, up: false }
    }

    fn ready(&mut self) {
        self.up = true;
        self.c.ok.fetch_add(1, Relaxed);
        self.c.alive.fetch_add(1, Relaxed);
    }
}

impl Drop for Up<'_> {
    fn drop(&mut self) {
        if self.up {
            self.c.alive.fetch_sub(1, Relaxed);
            self.c.lost.fetch_add(1, Relaxed);
        } else {
            self.c.failed.fetch_add(1, Relaxed);
        }
    }
}

fn now_ms() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

fn ticker(every: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// A Tether device, idle: pings like the agent's writer, answers `time_sync` like its link.
async fn tether_client(
    addr: &str,
    id: &str,
    secret: &str,
    every: Duration,
    c: &Counters,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    let mut up = Up::new(c);
    let mut attempt = 0u64;
    let mut ws = loop {
        attempt += 1;
        let mut req = format!("ws://{addr}/ws?clientID={id}").into_client_request()?;
        req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {secret}"))?);
        match tokio_tungstenite::connect_async_with_config(req, Some(client_ws_config()), false).await {
            Ok((ws, _)) => break ws,
            // As the agent would: back off and retry (a full listen backlog, for instance).
            Err(_) if attempt < 10 => tokio::time::sleep(Duration::from_millis(200 * attempt)).await,
            Err(e) => return Err(e.into()),
        }
    };
    loop {
        match tokio::time::timeout(Duration::from_secs(120), ws.next()).await? {
            Some(Ok(Message::Text(t))) if t.contains("\"auth_ok\"") => break,
            Some(Ok(Message::Text(t))) if t.contains("\"error\"") => bail!("{t}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed before auth_ok"),
        }
    }
    drop(permit);
    up.ready();
    let mut ping = ticker(every);
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let recv_ms = now_ms();
                    if let Ok(Envelope { body: Body::TimeSync(s), .. }) = message::decode_from_relay(&t) {
                        let r = TimeSyncResponse { t1: s.t1, t2: recv_ms, t3: now_ms() };
                        ws.send(Message::Text(Envelope::new(r).to_json().into())).await?;
                        c.syncs.fetch_add(1, Relaxed);
                    }
                }
                // tungstenite queues the pong and sends it with the next read or write.
                Some(Ok(Message::Ping(_))) => { c.server_pings.fetch_add(1, Relaxed); }
                Some(Ok(Message::Pong(_))) => { c.pongs.fetch_add(1, Relaxed); }
                Some(Ok(Message::Close(f))) => bail!("closed by the relay: {f:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("the relay closed the socket"),
            },
            _ = ping.tick() => ws.send(Message::Ping(Default::default())).await?,
        }
    }
}

/// A NATS client over WebSocket, idle: answers the server's `PING`, pings on the agent's schedule.
async fn nats_client(
    addr: &str,
    id: &str,
    every: Duration,
    c: &Counters,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    let mut up = Up::new(c);
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/"), Some(client_ws_config()), false).await?;
    let connect = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"user\":\"{BROKER_USER}\",\"pass\":\"{BROKER_PASSWORD}\",\
         \"name\":\"{id}\",\"lang\":\"rust\",\"version\":\"0.1\",\"protocol\":1}}\r\nSUB cmd.{id} 1\r\nPING\r\n"
    );
    let mut sent_connect = false;
    loop {
        let data = match tokio::time::timeout(Duration::from_secs(60), ws.next()).await? {
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Text(t))) => t.as_bytes().to_vec().into(),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed before the first PONG"),
        };
        let text = String::from_utf8_lossy(&data);
        if text.contains("-ERR") {
            bail!("{}", text.trim());
        }
        if !sent_connect && text.starts_with("INFO ") {
            ws.send(Message::Binary(connect.clone().into_bytes().into())).await?;
            sent_connect = true;
        }
        if sent_connect && text.contains("PONG") {
            break;
        }
    }
    drop(permit);
    up.ready();
    let mut ping = ticker(every);
    loop {
        tokio::select! {
            m = ws.next() => {
                let data = match m {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Text(t))) => t.as_bytes().to_vec().into(),
                    Some(Ok(Message::Close(f))) => bail!("closed by nats-server: {f:?}"),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.into()),
                    None => bail!("nats-server closed the socket"),
                };
                for line in data.split(|&b| b == b'\n') {
                    match line.strip_suffix(b"\r").unwrap_or(line) {
                        b"PING" => {
                            c.server_pings.fetch_add(1, Relaxed);
                            ws.send(Message::Binary(b"PONG\r\n".to_vec().into())).await?;
                        }
                        b"PONG" => { c.pongs.fetch_add(1, Relaxed); }
                        _ => {}
                    }
                }
            }
            _ = ping.tick() => ws.send(Message::Binary(b"PING\r\n".to_vec().into())).await?,
        }
    }
}

fn mqtt_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn mqtt_packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// An MQTT 3.1.1 client over TCP, idle: `PINGREQ` on the agent's schedule.
async fn mqtt_client(
    addr: &str,
    id: &str,
    every: Duration,
    keepalive: u16,
    c: &Counters,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    let mut up = Up::new(c);
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut body = Vec::new();
    mqtt_str(&mut body, "MQTT");
    body.push(4); // protocol level: 3.1.1
    body.push(0b1100_0010); // user name, password, clean session
    body.extend_from_slice(&keepalive.to_be_bytes());
    mqtt_str(&mut body, id);
    mqtt_str(&mut body, BROKER_USER);
    mqtt_str(&mut body, BROKER_PASSWORD);
    s.write_all(&mqtt_packet(0x10, &body)).await?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(60), s.read_exact(&mut connack)).await??;
    if connack[0] != 0x20 || connack[3] != 0 {
        bail!("CONNACK {connack:02x?}");
    }
    let mut body = vec![0, 1]; // packet id
    mqtt_str(&mut body, &format!("cmd/{id}"));
    body.push(1); // QoS 1
    s.write_all(&mqtt_packet(0x82, &body)).await?;
    let mut suback = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(60), s.read_exact(&mut suback)).await??;
    if suback[0] != 0x90 || suback[4] > 2 {
        bail!("SUBACK {suback:02x?}");
    }
    drop(permit);
    up.ready();
    let mut ping = ticker(every);
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            r = s.read(&mut buf) => {
                let n = r?;
                if n == 0 {
                    bail!("mosquitto closed the connection");
                }
                // Nothing but PINGRESP (d0 00) comes to an idle client.
                let pongs = buf[..n].iter().filter(|&&b| b == 0xd0).count();
                c.pongs.fetch_add(pongs as u64, Relaxed);
            }
            _ = ping.tick() => s.write_all(&[0xc0, 0]).await?,
        }
    }
}
