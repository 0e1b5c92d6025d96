//! `tether-pilot`: a command-line pilot that follows one device's telemetry.
//!
//! It uses only what docs/protocol.md describes: trade an API key for a one-time ticket
//! (`POST /api/auth/ws-ticket`), open `/ws/admin?ticket=`, send `subscribe`, and print every
//! `telemetry` frame with the relay's sequence verdict, the frame's age and the clock offset.
//!
//! With `--waypoint` or `--command` it also takes the device's control lease, sends one app
//! command (the robot software answers it through the agent) and keeps the lease alive while it
//! follows the telemetry.
//!
//! ```text
//! tether-pilot --relay http://localhost:8000 --api-key tk_... --device demo-boat
//! tether-pilot ... --device demo-boat --waypoint 37.8150,-122.4250
//! tether-pilot ... --device demo-boat --command teleop --data '{"throttle":0.5,"rudder":-0.3}'
//! ```

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Follow a device's telemetry through a Tether relay.
#[derive(Debug, Parser)]
#[command(name = "tether-pilot", version, about)]
struct Args {
    /// The relay's base URL.
    #[arg(long, env = "TETHER_RELAY", default_value = "http://localhost:8000")]
    relay: String,
    /// An operator API key (pilot or admin).
    #[arg(long, env = "TETHER_API_KEY", hide_env_values = true)]
    api_key: String,
    /// The device to follow.
    #[arg(long)]
    device: String,
    /// Stop after this many live frames (default: run until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
    /// Skip the relay's buffered frames.
    #[arg(long)]
    no_replay: bool,
    /// Print each frame as one JSON line instead of a summary.
    #[arg(long)]
    json: bool,
    /// Steer: send the robot to this waypoint (`set_waypoint`); needs control permission.
    #[arg(long, value_name = "LAT,LON", conflicts_with = "command")]
    waypoint: Option<String>,
    /// Send this app command to the robot software (`set_waypoints`, `teleop`, `resume`, ...).
    #[arg(long)]
    command: Option<String>,
    /// The app command's data, as JSON.
    #[arg(long, default_value = "{}", requires = "command")]
    data: String,
}

/// The app command asked for on the command line, if any.
fn app_command(args: &Args) -> anyhow::Result<Option<Value>> {
    if let Some(w) = &args.waypoint {
        let (lat, lon) = w.split_once(',').context("--waypoint takes LAT,LON")?;
        let lat: f64 = lat.trim().parse().context("--waypoint: the latitude is not a number")?;
        let lon: f64 = lon.trim().parse().context("--waypoint: the longitude is not a number")?;
        return Ok(Some(json!({"command": "set_waypoint", "data": {"latitude": lat, "longitude": lon}})));
    }
    match &args.command {
        Some(c) => {
            let data: Value = serde_json::from_str(&args.data).context("--data is not JSON")?;
            Ok(Some(json!({"command": c, "data": data})))
        }
        None => Ok(None),
    }
}

fn fmt_ms(v: &Value) -> String {
    v.as_f64().map(|x| format!("{x:.1}ms")).unwrap_or_else(|| "—".into())
}

fn summary(f: &Value) -> String {
    let p = &f["payload"];
    let r = &p["relay"];
    let verdict = match r["missing"].as_u64() {
        Some(n) => format!("{} ({n} missing)", r["verdict"].as_str().unwrap_or("?")),
        None => r["verdict"].as_str().unwrap_or("?").to_owned(),
    };
    let offset = match (r["clockOffsetMs"].as_f64(), r["clockUncertaintyMs"].as_f64()) {
        (Some(o), Some(u)) => format!("{o:.1}±{u:.1}ms"),
        _ => "—".into(),
    };
    let gps = &p["data"]["gps"];
    let pos = match (gps["latitude"].as_f64(), gps["longitude"].as_f64()) {
        (Some(la), Some(lo)) => format!(" pos={la:.5},{lo:.5} hdg={}", gps["heading"]),
        _ => String::new(),
    };
    format!(
        "{}{} {} seq={} verdict={} age={} offset={} lost={}{}",
        if r["replay"] == true { "[replay] " } else { "" },
        f["from"].as_str().unwrap_or("?"),
        r["stream"].as_str().unwrap_or("?"),
        p["sequence"],
        verdict,
        fmt_ms(&r["ageMs"]),
        offset,
        r["lostTotal"],
        pos
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let steer = app_command(&args)?;
    let base = args.relay.trim_end_matches('/');
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/auth/ws-ticket"))
        .bearer_auth(&args.api_key)
        .send()
        .await
        .with_context(|| format!("cannot reach the relay at {base}"))?;
    let status = resp.status();
    let body: Value = resp.json().await.context("the relay's answer is not JSON")?;
    if !status.is_success() {
        bail!("ticket refused ({status}): {}", body["error"]["message"].as_str().unwrap_or("no reason given"));
    }
    let ticket = body["ticket"].as_str().context("no ticket in the answer")?;
    let ws_base = base.replacen("http", "ws", 1);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{ws_base}/ws/admin?ticket={ticket}"))
        .await
        .context("opening /ws/admin")?;
    ws.send(Message::Text(
        json!({"type":"subscribe","correlationID":"sub-1","payload":{"deviceID":args.device,"replay":!args.no_replay}})
            .to_string()
            .into(),
    ))
    .await?;
    let send = |v: Value| Message::Text(v.to_string().into());
    if steer.is_some() {
        ws.send(send(json!({"type":"lease_acquire","correlationID":"lease-1","payload":{"deviceID":args.device}})))
            .await?;
    }
    let mut holding = false;
    let mut live = 0u64;
    let mut ping = tokio::time::interval(Duration::from_secs(15));
    let mut heartbeat = tokio::time::interval(Duration::from_secs(2));
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = ping.tick() => {
                ws.send(send(json!({"type":"ping","payload":{}}))).await?;
                continue;
            }
            _ = heartbeat.tick(), if holding => {
                ws.send(send(json!({"type":"lease_heartbeat","payload":{"deviceID":args.device}}))).await?;
                continue;
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let text = match msg {
            None => bail!("the relay closed the connection"),
            Some(Err(e)) => bail!("connection lost: {e}"),
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(f))) => bail!("the relay closed the connection: {f:?}"),
            Some(Ok(_)) => continue,
        };
        let v: Value = serde_json::from_str(&text).context("relay sent invalid JSON")?;
        match v["type"].as_str() {
            Some("auth_ok") => eprintln!("connected as {} ({})", v["payload"]["clientID"], v["payload"]["role"]),
            Some("subscribed") => eprintln!(
                "subscribed to {} (online: {}, replaying {} frames)",
                v["payload"]["deviceID"], v["payload"]["online"], v["payload"]["replayed"]
            ),
            Some("telemetry") => {
                if args.json {
                    println!("{text}");
                } else {
                    println!("{}", summary(&v));
                }
                if v["payload"]["relay"]["replay"] != true {
                    live += 1;
                    if args.count.is_some_and(|c| live >= c) {
                        return Ok(());
                    }
                }
            }
            Some("ack") if v["correlationID"] == "lease-1" => {
                holding = true;
                eprintln!("holding the control lease of {}", args.device);
                if let Some(cmd) = &steer {
                    let mut m = json!({"type":"app_command","correlationID":"cmd-1","clientID":args.device});
                    m["payload"] = cmd.clone();
                    ws.send(send(m)).await?;
                }
            }
            Some("command_result") => eprintln!(
                "{} {}: {}",
                v["payload"]["ok"].as_bool().map_or("?", |ok| if ok { "done" } else { "refused" }),
                v["correlationID"],
                if v["payload"]["ok"] == true {
                    v["payload"]["data"].to_string()
                } else {
                    v["payload"]["error"].to_string()
                }
            ),
            Some("safety_stop") => {
                eprintln!("SAFETY STOP on {}: {} ({})", v["from"], v["payload"]["policy"], v["payload"]["reason"])
            }
            Some("lease_state") => eprintln!(
                "control lease of {}: {} ({})",
                v["payload"]["deviceID"], v["payload"]["holderName"], v["payload"]["reason"]
            ),
            Some("telemetry_dropped") => {
                eprintln!("warning: the relay dropped {} frames for this slow connection", v["payload"]["count"])
            }
            Some("error") => {
                let code = v["payload"]["code"].as_str().unwrap_or("?");
                bail!("relay error {code}: {}", v["payload"]["message"].as_str().unwrap_or(""));
            }
            _ => {}
        }
    }
}
