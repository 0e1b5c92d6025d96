//! `tether-boat`: the simulated boat as a robot program, talking to the device agent over its
//! local Unix socket exactly as real robot software would (see `device::local`).
//!
//! It says `hello`, publishes the boat's telemetry at a steady rate, carries out the app
//! commands a pilot sends through the relay (`set_waypoint`, `set_waypoints`, `teleop`,
//! `resume`), answering each with a `command_result`, and obeys the agent's `safety_stop` and
//! `safety_clear`. If the agent goes away it keeps sailing and reconnects.
//!
//! ```text
//! tether-boat --socket /run/tether/robot.sock --rate 5 --stream nav
//! ```

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use device::sim::{Boat, StopPolicy};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

/// First wait before reconnecting to the agent; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// An agent that takes no line for this long is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The simulation advances in steps no longer than this (simulated seconds), so a long pause
/// (a reconnect) does not make the boat jump across its turns.
const MAX_STEP: f64 = 0.1;

/// Run the simulated boat as robot software behind a Tether device agent.
#[derive(Debug, Parser)]
#[command(
    name = "tether-boat",
    version,
    about,
    long_about = "Run the simulated boat as robot software behind a Tether device agent.\n\n\
        Connects to the agent's local Unix socket, says hello, publishes the boat's telemetry \
        (position, heading, speed, battery, mode, target) and carries out the app commands a \
        pilot sends through the relay: set_waypoint {latitude, longitude}, set_waypoints \
        {waypoints: [{latitude, longitude}, ...]}, teleop {throttle, rudder} (each -1..1; resend \
        within 2 s or the boat holds position) and resume {}. Obeys the agent's safety_stop \
        (policy stop, hold or return) until safety_clear. Reconnects when the agent restarts. \
        Logs to stderr (RUST_LOG, default info); stops on Ctrl-C or SIGTERM."
)]
struct Args {
    /// The agent's local Unix socket.
    #[arg(long, env = "TETHER_ROBOT_SOCKET", value_name = "PATH", default_value = "/run/tether/robot.sock")]
    socket: PathBuf,
    /// Telemetry frames per second (0.1 to 100).
    #[arg(long, value_name = "HZ", default_value_t = 5.0, value_parser = parse_rate)]
    rate: f64,
    /// The telemetry stream name (1-64 characters of A-Z a-z 0-9 _ . -).
    #[arg(long, value_name = "NAME", default_value = "nav", value_parser = parse_stream)]
    stream: String,
    /// The name this program gives itself in its hello to the agent.
    #[arg(long, value_name = "NAME", default_value = "tether-boat")]
    name: String,
    /// Simulated seconds per real second: above 1 the boat moves, turns and times out faster
    /// (for tests and quick demos).
    #[arg(long, value_name = "FACTOR", default_value_t = 1.0, value_parser = parse_time_scale)]
    time_scale: f64,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(hz) if (0.1..=100.0).contains(&hz) => Ok(hz),
        _ => Err(format!("{s} is not a rate between 0.1 and 100 Hz")),
    }
}

fn parse_stream(s: &str) -> Result<String, String> {
    let ok =
        (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok { Ok(s.to_owned()) } else { Err(format!("\"{s}\" is not a stream name (1-64 of A-Z a-z 0-9 _ . -)")) }
}

fn parse_time_scale(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.01..=1000.0).contains(&f) => Ok(f),
        _ => Err(format!("{s} is not a time scale between 0.01 and 1000")),
    }
}

/// The boat and the clock that drives it.
struct Sim {
    boat: Boat,
    /// When the boat was last stepped.
    last: Instant,
    time_scale: f64,
}

impl Sim {
    /// Steps the boat up to now.
    fn advance(&mut self) {
        let now = Instant::now();
        let mut left = now.duration_since(self.last).as_secs_f64() * self.time_scale;
        self.last = now;
        while left > 0.0 {
            let dt = left.min(MAX_STEP);
            self.boat.step(dt);
            left -= dt;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "Ctrl-C",
            _ = term.recv() => "SIGTERM",
        }
    };
    tokio::pin!(stop);

    let mut sim = Sim { boat: Boat::default(), last: Instant::now(), time_scale: args.time_scale };
    let mut backoff = MIN_BACKOFF;
    info!(socket = %args.socket.display(), rate = args.rate, stream = %args.stream, "tether-boat starting");
    loop {
        let conn = tokio::select! {
            r = UnixStream::connect(&args.socket) => r,
            why = &mut stop => {
                info!("{why}: exiting");
                break;
            }
        };
        match conn {
            Ok(stream) => {
                info!(socket = %args.socket.display(), "connected to the agent");
                backoff = MIN_BACKOFF;
                match session(stream, &args, &mut sim, &mut stop).await {
                    Ok(Some(why)) => {
                        info!("{why}: exiting");
                        break;
                    }
                    Ok(None) => warn!("the agent closed the connection; reconnecting in {backoff:?}"),
                    Err(e) => warn!("lost the agent: {e:#}; reconnecting in {backoff:?}"),
                }
            }
            Err(e) => warn!("cannot reach the agent at {}: {e}; retrying in {backoff:?}", args.socket.display()),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            why = &mut stop => {
                info!("{why}: exiting");
                break;
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    Ok(())
}

/// Serves one connection to the agent. `Ok(Some(signal))` when told to stop, `Ok(None)` when the
/// agent closed the connection.
async fn session(
    stream: UnixStream,
    args: &Args,
    sim: &mut Sim,
    stop: &mut (impl Future<Output = &'static str> + Unpin),
) -> anyhow::Result<Option<&'static str>> {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    send(&mut wr, &json!({"type": "hello", "name": args.name})).await?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            why = &mut *stop => return Ok(Some(why)),
            _ = tick.tick() => {
                sim.advance();
                let frame = json!({
                    "type": "telemetry",
                    "stream": args.stream,
                    "timestamp": now_ms(),
                    "data": sim.boat.data(),
                });
                send(&mut wr, &frame).await?;
            }
            line = lines.next_line() => match line.context("reading from the agent")? {
                Some(line) => {
                    sim.advance();
                    if let Some(reply) = handle(&line, &mut sim.boat) {
                        send(&mut wr, &reply).await?;
                    }
                }
                None => return Ok(None),
            },
        }
    }
}

async fn send(wr: &mut OwnedWriteHalf, msg: &Value) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&line))
        .await
        .context("the agent stopped reading")?
        .context("writing to the agent")
}

fn now_ms() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

/// Acts on one line from the agent; returns the answer to send, if any.
fn handle(line: &str, boat: &mut Boat) -> Option<Value> {
    let msg: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            warn!("the agent sent a line that is not JSON ({e}); ignoring it");
            return None;
        }
    };
    let text = |key: &str| msg[key].as_str().unwrap_or("").to_owned();
    match msg["type"].as_str() {
        Some("welcome") => info!(agent = %text("agent"), "the agent welcomed us"),
        Some("app_command") => return app_command(&msg, boat),
        Some("safety_stop") => {
            let policy = match text("policy").parse() {
                Ok(p) => p,
                Err(e) => {
                    warn!("{e}; stopping instead");
                    StopPolicy::Stop
                }
            };
            warn!(policy = %text("policy"), reason = %text("reason"), "safety stop");
            boat.safety_stop(policy);
        }
        Some("safety_clear") => {
            info!(reason = %text("reason"), "safety stop cleared; resuming the mission");
            boat.resume();
        }
        Some("error") => warn!(code = %text("code"), "the agent refused a message: {}", text("message")),
        other => debug!("ignoring a message of type {other:?}"),
    }
    None
}

/// Carries out an `app_command` and builds its `command_result`.
fn app_command(msg: &Value, boat: &mut Boat) -> Option<Value> {
    let command = msg["command"].as_str().unwrap_or("");
    let from = msg["from"].as_str().unwrap_or("?");
    let outcome = run_command(command, &msg["data"], boat);
    match &outcome {
        Ok(_) => info!(command, from, status = boat.status(), "app command carried out"),
        Err(e) => warn!(command, from, "app command refused: {e}"),
    }
    let Some(id) = msg["correlationID"].as_str() else {
        warn!(command, "the app command has no correlationID, so it cannot be answered");
        return None;
    };
    Some(match outcome {
        Ok(data) => json!({"type": "command_result", "correlationID": id, "ok": true, "data": data}),
        Err(error) => json!({"type": "command_result", "correlationID": id, "ok": false, "error": error}),
    })
}

fn run_command(command: &str, data: &Value, boat: &mut Boat) -> Result<Value, String> {
    match command {
        "set_waypoint" => {
            let (latitude, longitude) = position(data)?;
            boat.set_waypoint(latitude, longitude).map_err(|e| e.to_string())?;
            Ok(json!({"target": {"latitude": latitude, "longitude": longitude}, "status": boat.status()}))
        }
        "set_waypoints" => {
            let list = data["waypoints"]
                .as_array()
                .ok_or("set_waypoints needs data.waypoints: a list of {\"latitude\", \"longitude\"}")?;
            let points = list
                .iter()
                .enumerate()
                .map(|(i, w)| position(w).map_err(|e| format!("waypoint {i}: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            boat.set_waypoints(points).map_err(|e| e.to_string())?;
            Ok(json!({"waypoints": list.len(), "status": boat.status()}))
        }
        "teleop" => {
            let stick = |name: &str| {
                data[name].as_f64().ok_or_else(|| format!("teleop needs a number \"{name}\" between -1 and 1"))
            };
            let (throttle, rudder) = (stick("throttle")?, stick("rudder")?);
            boat.teleop(throttle, rudder).map_err(|e| e.to_string())?;
            Ok(json!({"throttle": throttle, "rudder": rudder, "status": boat.status()}))
        }
        "resume" => {
            boat.resume();
            Ok(json!({"status": boat.status()}))
        }
        other => Err(format!(
            "unknown command \"{other}\"; tether-boat knows set_waypoint, set_waypoints, teleop and resume"
        )),
    }
}

/// `{"latitude": .., "longitude": ..}` as numbers.
fn position(v: &Value) -> Result<(f64, f64), String> {
    let coord = |name: &str| v[name].as_f64().ok_or_else(|| format!("needs a number \"{name}\""));
    Ok((coord("latitude")?, coord("longitude")?))
}
