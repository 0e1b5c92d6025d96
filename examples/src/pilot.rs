//! `tether-pilot`: a command-line pilot that follows one device's telemetry.
//!
//! It uses only what docs/protocol.md describes: trade an API key for a one-time ticket
//! (`POST /api/auth/ws-ticket`), open `/ws/admin?ticket=`, send `subscribe`, and print every
//! `telemetry` frame with the relay's sequence verdict, the frame's age and the clock offset.
//!
//! ```text
//! tether-pilot --relay http://localhost:8000 --api-key tk_... --device demo-boat
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
    let mut live = 0u64;
    let mut ping = tokio::time::interval(Duration::from_secs(15));
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = ping.tick() => {
                ws.send(Message::Text(json!({"type":"ping","payload":{}}).to_string().into())).await?;
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
