//! `tether-boat`, run as the real binary, with the test playing the device agent on a Unix socket.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixListener;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, Command};

/// Generous: the binary may be slow to start on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(60);

/// The test's side of one agent connection.
struct Agent {
    lines: Lines<BufReader<OwnedReadHalf>>,
    wr: OwnedWriteHalf,
}

impl Agent {
    async fn accept(listener: &UnixListener) -> Agent {
        let (stream, _) = tokio::time::timeout(DEADLINE, listener.accept()).await.expect("the boat connects").unwrap();
        let (rd, wr) = stream.into_split();
        Agent { lines: BufReader::new(rd).lines(), wr }
    }

    async fn send(&mut self, v: Value) {
        let mut line = serde_json::to_vec(&v).unwrap();
        line.push(b'\n');
        self.wr.write_all(&line).await.unwrap();
    }

    async fn recv(&mut self) -> Value {
        let line = tokio::time::timeout(DEADLINE, self.lines.next_line())
            .await
            .expect("a line from the boat in time")
            .unwrap()
            .expect("the boat keeps the connection open");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Reads until a message matches `pred`, failing after [`DEADLINE`].
    async fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let give_up = tokio::time::Instant::now() + DEADLINE;
        let mut last = Value::Null;
        while tokio::time::Instant::now() < give_up {
            let msg = self.recv().await;
            if pred(&msg) {
                return msg;
            }
            last = msg;
        }
        panic!("never saw {what}; last message: {last}");
    }

    async fn result_of(&mut self, id: &str) -> Value {
        self.until(&format!("the result of {id}"), |m| m["type"] == "command_result" && m["correlationID"] == id).await
    }

    async fn telemetry(&mut self) -> Value {
        self.until("telemetry", |m| m["type"] == "telemetry").await
    }
}

/// The boat process; prints its log if the test fails, and is killed when dropped.
struct Boat {
    child: Child,
    log: PathBuf,
}

impl Drop for Boat {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- tether-boat log ---\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

fn spawn_boat(socket: &Path, dir: &Path) -> Boat {
    let log = dir.join("boat.log");
    let child = Command::new(env!("CARGO_BIN_EXE_tether-boat"))
        .arg("--socket")
        .arg(socket)
        .args(["--rate", "20", "--stream", "boat-nav", "--time-scale", "5"])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    Boat { child, log }
}

/// Degrees to turn from heading `h` to face from `pos` toward `to` (0..=180).
fn off_course(h: f64, pos: (f64, f64), to: (f64, f64)) -> f64 {
    let dy = to.0 - pos.0;
    let dx = (to.1 - pos.1) * pos.0.to_radians().cos();
    let want = (dx.atan2(dy).to_degrees() + 360.0) % 360.0;
    (((want - h + 540.0) % 360.0) - 180.0).abs()
}

fn gps(frame: &Value) -> (f64, f64, f64) {
    let g = &frame["data"]["gps"];
    (g["latitude"].as_f64().unwrap(), g["longitude"].as_f64().unwrap(), g["heading"].as_f64().unwrap())
}

#[tokio::test]
async fn the_boat_publishes_obeys_commands_and_safety_stops_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("robot.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let mut boat = spawn_boat(&socket, dir.path());
    let mut agent = Agent::accept(&listener).await;

    let hello = agent.recv().await;
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["name"], "tether-boat");
    agent.send(json!({"type":"welcome","agent":"tether-device test"})).await;

    let frame = agent.telemetry().await;
    assert_eq!(frame["stream"], "boat-nav");
    assert!(frame["timestamp"].as_f64().unwrap() > 1.6e12);
    assert_eq!(frame["data"]["status"], "autonomous_navigation");
    assert!(frame["data"]["gps"]["latitude"].as_f64().unwrap() > 37.0);
    assert!(frame["data"]["battery"]["percent"].as_f64().is_some());

    // A waypoint to the south-east: the target changes at once and the boat turns toward it.
    let goal = (37.79, -122.39);
    agent
        .send(json!({"type":"app_command","correlationID":"c-1","command":"set_waypoint","data":{"latitude":goal.0,"longitude":goal.1},"from":"pilot-1"}))
        .await;
    let result = agent.result_of("c-1").await;
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["data"]["target"], json!({"latitude":goal.0,"longitude":goal.1}));
    let frame = agent.telemetry().await;
    assert_eq!(frame["data"]["target"]["latitude"], goal.0);
    assert_eq!(frame["data"]["target"]["longitude"], goal.1);
    let (la, lo, h) = gps(&frame);
    let first = off_course(h, (la, lo), goal);
    agent
        .until("the heading turning toward the waypoint", |m| {
            if m["type"] != "telemetry" {
                return false;
            }
            let (la, lo, h) = gps(m);
            let now = off_course(h, (la, lo), goal);
            now < 5.0 || now < first - 20.0
        })
        .await;

    // Unknown commands and bad arguments are refused with a reason; the boat carries on.
    agent.send(json!({"type":"app_command","correlationID":"c-2","command":"fly","data":{}})).await;
    let result = agent.result_of("c-2").await;
    assert_eq!(result["ok"], false);
    assert!(result["error"].as_str().unwrap().contains("fly"), "{result}");
    agent
        .send(json!({"type":"app_command","correlationID":"c-3","command":"set_waypoint","data":{"latitude":"north"}}))
        .await;
    let result = agent.result_of("c-3").await;
    assert_eq!(result["ok"], false);
    assert!(result["error"].as_str().unwrap().contains("latitude"), "{result}");
    agent
        .send(json!({"type":"app_command","correlationID":"c-4","command":"teleop","data":{"throttle":0.5,"rudder":0}}))
        .await;
    assert_eq!(agent.result_of("c-4").await["ok"], true);
    agent.until("manual mode", |m| m["type"] == "telemetry" && m["data"]["status"] == "manual").await;

    // Safety stop: engine off until cleared.
    agent.send(json!({"type":"safety_stop","policy":"stop","reason":"link_lost","timestamp":1.0})).await;
    agent
        .until("the boat stopped", |m| {
            m["type"] == "telemetry" && m["data"]["status"] == "stopped" && m["data"]["gps"]["speed"] == 0.0
        })
        .await;
    agent.send(json!({"type":"safety_clear","reason":"controller back"})).await;
    agent
        .until("the mission resumed", |m| m["type"] == "telemetry" && m["data"]["status"] == "autonomous_navigation")
        .await;

    // The agent restarts: the boat notices, retries and comes back with a fresh hello.
    drop(agent);
    drop(listener);
    std::fs::remove_file(&socket).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listener = UnixListener::bind(&socket).unwrap();
    let mut agent = Agent::accept(&listener).await;
    assert_eq!(agent.recv().await["type"], "hello");
    assert_eq!(agent.telemetry().await["stream"], "boat-nav");

    // SIGTERM: a clean exit.
    let pid = boat.child.id().unwrap();
    let kill = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(DEADLINE, boat.child.wait()).await.expect("exits in time").unwrap();
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(&boat.log).unwrap();
    assert!(log.contains("SIGTERM"), "{log}");
}

#[tokio::test]
async fn help_describes_the_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_tether-boat")).arg("--help").output().await.unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in ["--socket", "/run/tether/robot.sock", "--rate", "--stream", "set_waypoint", "safety_stop"] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_tether-boat")).args(["--rate", "0"]).output().await.unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("rate"));
}

#[tokio::test]
async fn the_boat_waits_for_an_agent_that_is_not_there_yet() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("later.sock");
    let _boat = spawn_boat(&socket, dir.path());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listener = UnixListener::bind(&socket).unwrap();
    let mut agent = Agent::accept(&listener).await;
    assert_eq!(agent.recv().await["type"], "hello");
    // It answers even without a welcome.
    agent.send(json!({"type":"app_command","correlationID":"r","command":"resume"})).await;
    assert_eq!(agent.result_of("r").await["ok"], true);
}
