//! `tether-bench`: Tether's own load tools. Each subcommand prints a table and the exact
//! settings it ran with, for docs/benchmarks.md.
//!
//! - `storm`: after a relay restart, N devices whose secrets the relay issued reconnect at
//!   once; how long until all are authenticated, and what it cost the relay.
//! - `sfu`: one publisher at ~2 Mbit/s and 1, 10, 50 receivers through the relay's SFU; the
//!   relay's CPU per forwarded packet, its memory, loss, latency and jitter at the receivers, and
//!   the time from a receiver's offer to its first frame (`bench_sfu.rs`).
//! - `telemetry`: the same telemetry workload (D devices x R Hz x P pilots each) against Tether,
//!   nats-server and Mosquitto in one run: delivered messages/s, drops, latency, server CPU per
//!   delivered message and peak RSS, side by side, and each one's saturation throughput
//!   (`bench_telemetry.rs`).
//!
//! Run it against a release build: `cargo run --release -p tether-examples --bin tether-bench -- storm`.

mod bench_idle;
mod bench_proc;
mod bench_sfu;
mod bench_telemetry;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// Tether's load tools.
#[derive(Debug, Parser)]
#[command(name = "tether-bench", version, about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// N devices reconnect at once to a freshly started relay.
    Storm {
        /// How many devices.
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// The relay binary to start.
        #[arg(long, default_value = "target/release/tether-relay")]
        relay_bin: PathBuf,
        /// Where to keep the database and the devices' secrets between runs (provisioning
        /// 10,000 bcrypt hashes takes a while).
        #[arg(long, default_value = "target/bench-storm")]
        data_dir: PathBuf,
    },
    /// One publisher, N receivers through the relay's SFU: relay CPU per forwarded packet,
    /// memory, loss, latency, jitter and time to first frame.
    Sfu(bench_sfu::SfuArgs),
    /// The same telemetry workload against Tether, nats-server and Mosquitto: delivered msgs/s,
    /// drops, latency, server CPU per message, peak RSS, saturation throughput.
    Telemetry(bench_telemetry::TelemetryArgs),
    /// N idle, authenticated device connections (5k, 10k, 15k) held against the relay,
    /// nats-server and Mosquitto: RSS per connection and the CPU their heartbeats cost.
    Idle(bench_idle::IdleArgs),
    /// One client process of `idle` (started by it).
    #[command(hide = true)]
    IdleWorker(bench_idle::WorkerArgs),
}

/// utime + stime of a process, seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    bench_proc::cpu_seconds(&pid.to_string())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    bench_proc::status_kib(pid, "VmRSS:")
}

/// Creates the devices once; later runs reuse the database and the saved secrets, and a run
/// that needs more devices adds only the missing ones.
fn provision(dir: &Path, n: usize) -> anyhow::Result<Vec<(String, String)>> {
    let secrets_file = dir.join("secrets.txt");
    let db = dir.join("tether.db");
    let mut creds: Vec<(String, String)> = match std::fs::read_to_string(&secrets_file) {
        Ok(text) if db.exists() => {
            text.lines().filter_map(|l| l.split_once(' ')).map(|(a, b)| (a.to_owned(), b.to_owned())).collect()
        }
        _ => Vec::new(),
    };
    if creds.len() >= n {
        creds.truncate(n);
        return Ok(creds);
    }
    if creds.is_empty() {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
    }
    let store = relay::store::Store::open(&db)?;
    relay::server::bootstrap(&store, Some("tk_bench_0123456789abcdef"))?;
    let have = creds.len();
    eprintln!("provisioning {} devices (bcrypt cost {}, once)...", n - have, relay::auth::MACHINE_SECRET_COST);
    let new: Vec<(String, String)> =
        (have..n).map(|i| (format!("storm-{i:05}"), relay::auth::new_device_secret())).collect();
    // Hash on every core.
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let chunk = new.len().div_ceil(threads);
    let hashes: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = new
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|(_, sec)| bcrypt::hash(sec, relay::auth::MACHINE_SECRET_COST).expect("hash"))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("hash thread")).collect()
    });
    store.call_sync(|c| {
        let tx = c.transaction()?;
        for ((id, _), hash) in new.iter().zip(&hashes) {
            relay::store::q::create_device(&tx, id, "default", id, hash)?;
        }
        tx.commit()?;
        Ok(())
    })?;
    creds.extend(new);
    let text: String = creds.iter().map(|(a, b)| format!("{a} {b}\n")).collect();
    std::fs::write(&secrets_file, text)?;
    Ok(creds)
}

async fn storm(devices: usize, relay_bin: PathBuf, dir: PathBuf) -> anyhow::Result<()> {
    if !relay_bin.exists() {
        bail!("{} not found: build it with `cargo build --release -p tether-relay`", relay_bin.display());
    }
    let creds = provision(&dir, devices)?;
    let mut child = tokio::process::Command::new(&relay_bin)
        .arg("--db")
        .arg(dir.join("tether.db"))
        .args(["--port", "0", "--bind", "127.0.0.1", "--log-level", "warn"])
        // The storm is one credential each, once; the per-credential limit is not the subject.
        .args(["--ping-interval", "60", "--connection-timeout", "180"])
        .env_remove("PORT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("relay pid")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let line =
        tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await??.context("relay said nothing")?;
    let addr = line.strip_prefix("tether-relay listening on http://").context("unexpected relay output")?.to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cpu0, rss0) = (cpu_seconds(pid)?, rss_kib(pid)?);

    let start = Instant::now();
    let (release, done) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::with_capacity(devices);
    for (id, secret) in creds {
        let addr = addr.clone();
        let mut done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut attempts = 0u32;
            loop {
                attempts += 1;
                let mut req = format!("ws://{addr}/ws?clientID={id}").into_client_request().expect("request");
                req.headers_mut()
                    .insert("authorization", HeaderValue::from_str(&format!("Bearer {secret}")).expect("header"));
                match tokio_tungstenite::connect_async(req).await {
                    Ok((mut ws, _)) => {
                        while let Some(Ok(m)) = ws.next().await {
                            if let Message::Text(t) = m {
                                if t.contains("\"auth_ok\"") {
                                    let at = start.elapsed();
                                    // Hold the socket until every device is in.
                                    let _ = done.wait_for(|d| *d).await;
                                    drop(ws);
                                    return Ok::<_, String>((at, attempts));
                                }
                                if t.contains("\"error\"") {
                                    return Err(format!("{id}: {t}"));
                                }
                            }
                        }
                    }
                    Err(e) if attempts < 20 => {
                        // As a real agent would: back off briefly and retry.
                        tokio::time::sleep(Duration::from_millis(200 * attempts as u64)).await;
                        let _ = e;
                    }
                    Err(e) => return Err(format!("{id}: {e}")),
                }
            }
        }));
    }
    // Devices park after auth_ok, holding their sockets; tasks that finish early have failed.
    // The relay's own count of connected devices says when everyone is in.
    let deadline = Instant::now() + Duration::from_secs(300);
    let (all_in, cpu1, rss1) = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if Instant::now() > deadline {
            bail!("the storm did not complete within 300 s");
        }
        let failed = tasks.iter().filter(|t| t.is_finished()).count();
        let health: serde_json::Value = reqwest::get(format!("http://{addr}/health")).await?.json().await?;
        let connected = health["connections"]["device"].as_u64().unwrap_or(0) as usize;
        if connected + failed >= devices {
            break (start.elapsed(), cpu_seconds(pid)?, rss_kib(pid)?);
        }
    };
    let _ = release.send(true);
    let (mut times, mut retries, mut failures) = (Vec::with_capacity(devices), 0, Vec::new());
    for t in tasks {
        match t.await? {
            Ok((at, attempts)) => {
                times.push(at);
                retries += attempts.saturating_sub(1);
            }
            Err(e) => failures.push(e),
        }
    }
    times.sort();
    let pct = |p: f64| {
        times.get(((times.len() as f64 * p) as usize).min(times.len().saturating_sub(1))).copied().unwrap_or_default()
    };
    println!("reconnect storm: {devices} devices, relay {}", relay_bin.display());
    println!("| measure | value |");
    println!("|---|---|");
    println!("| authenticated | {} of {devices} |", times.len());
    println!("| failures | {} |", failures.len());
    println!("| connect retries | {retries} |");
    println!("| all authenticated after | {:.2} s |", all_in.as_secs_f64());
    println!(
        "| per-device time to auth_ok, p50 / p99 / max | {:.2} / {:.2} / {:.2} s |",
        pct(0.5).as_secs_f64(),
        pct(0.99).as_secs_f64(),
        times.last().copied().unwrap_or_default().as_secs_f64()
    );
    println!(
        "| relay CPU during the storm | {:.2} s ({:.2} ms per device) |",
        cpu1 - cpu0,
        (cpu1 - cpu0) * 1000.0 / devices as f64
    );
    println!("| relay RSS before / with all connected | {} / {} MiB |", rss0 / 1024, rss1 / 1024);
    println!("| relay RSS per connection | {:.1} KiB |", (rss1.saturating_sub(rss0)) as f64 / devices as f64);
    for f in failures.iter().take(5) {
        println!("failure: {f}");
    }
    child.kill().await.ok();
    if !failures.is_empty() {
        bail!("{} devices failed", failures.len());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Storm { devices, relay_bin, data_dir } => {
            tokio::runtime::Runtime::new()?.block_on(storm(devices, relay_bin, data_dir))
        }
        // Builds its own runtime, after pinning the process to its core.
        Cmd::Sfu(args) => bench_sfu::main(args),
        // Pins itself to core 1 and builds a current-thread runtime.
        Cmd::Telemetry(args) => bench_telemetry::main(args),
        Cmd::Idle(args) => bench_idle::main(args),
        Cmd::IdleWorker(args) => bench_idle::worker_main(args),
    }
}
