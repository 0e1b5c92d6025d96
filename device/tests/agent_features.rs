//! The real agent binary against the real relay: local telemetry inputs with backfill across a
//! relay restart, commands (allow list, timeout, cap, dedupe), process supervision, config
//! updates, app commands, the safety stop, speed test and docker.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// A config for boat-7 with both local inputs and the given extra YAML.
fn config(
    dir: &std::path::Path,
    addr: std::net::SocketAddr,
    secret: &str,
    udp: u16,
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    let sock = dir.join("robot.sock");
    std::fs::write(
        &path,
        format!(
            "serverAddress: \"ws://{addr}/ws\"\nclientID: boat-7\nclientSecret: \"{secret}\"\nname: Boat 7\n\
             logLevel: debug\nreconnectInterval: 0.2\n\
             telemetry:\n  systemMetrics: false\n  udp: \"127.0.0.1:{udp}\"\n  unixSocket: \"{}\"\n  backfillRate: 200\n\
             {extra}",
            sock.display()
        ),
    )
    .unwrap();
    path
}

/// A client of the agent's robot socket, as a team's own software would be.
struct Robot {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    tx: tokio::net::unix::OwnedWriteHalf,
}

impl Robot {
    async fn connect(dir: &std::path::Path) -> Robot {
        let path = dir.join("robot.sock");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(s) => break s,
                Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("the agent never opened its robot socket: {e}"),
            }
        };
        let (r, tx) = stream.into_split();
        let mut robot = Robot { lines: tokio::io::BufReader::new(r).lines(), tx };
        robot.send(json!({"type":"hello","name":"test-robot"})).await;
        assert_eq!(robot.recv_type("welcome").await["type"], "welcome");
        robot
    }

    async fn send(&mut self, v: Value) {
        self.tx.write_all(format!("{v}\n").as_bytes()).await.unwrap();
    }

    async fn recv_type(&mut self, ty: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no {ty} on the robot socket"))
                .unwrap()
                .expect("the agent closed the robot socket");
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["type"] == ty {
                return v;
            }
        }
    }
}

/// Telemetry frames by stream and sequence number, until each `(stream, last)` has arrived.
/// One pass over the link: the streams interleave, so reading them one after the other would
/// throw away the second stream's early frames.
async fn collect_streams(p: &mut Ws, want: &[(&str, u64)]) -> BTreeMap<String, BTreeMap<u64, Value>> {
    let mut got: BTreeMap<String, BTreeMap<u64, Value>> = BTreeMap::new();
    while !want.iter().all(|(s, last)| got.get(*s).is_some_and(|m| m.contains_key(last))) {
        let f = frame(p).await;
        let stream = f["payload"]["stream"].as_str().unwrap_or_default().to_owned();
        let seq = f["payload"]["sequence"].as_u64().unwrap();
        assert!(got.entry(stream).or_default().insert(seq, f).is_none(), "sequence {seq} delivered twice");
    }
    got
}

#[tokio::test]
async fn local_telemetry_reaches_pilots_and_survives_a_relay_restart_as_backfill() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "view");
    let udp_port = free_udp_port();
    let cfg = config(dir.path(), addr, &secret, udp_port, "");
    let mut agent = RunningAgent::spawn(&cfg, &[]);
    agent.wait_for_log("authenticated with the relay").await;
    let mut robot = Robot::connect(dir.path()).await;
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let agent_udp = format!("127.0.0.1:{udp_port}");
    let mut p = pilot(addr, &key).await;
    recv_type(&mut p, "subscribed").await;

    // Live: UDP stream "imu" and Unix-socket stream "nav", each with its own sequence.
    for i in 0..5 {
        udp.send_to(json!({"type":"telemetry","stream":"imu","data":{"i":i}}).to_string().as_bytes(), &agent_udp)
            .await
            .unwrap();
        robot
            .send(json!({"type":"telemetry","stream":"nav","timestamp":1_700_000_000_000u64 + i,"data":{"i":i}}))
            .await;
    }
    let mut live = collect_streams(&mut p, &[("imu", 4), ("nav", 4)]).await;
    let imu = live.remove("imu").unwrap();
    assert_eq!(imu.keys().copied().collect::<Vec<_>>(), (0..5).collect::<Vec<_>>());
    for f in imu.values() {
        assert_eq!(f["payload"]["relay"]["verdict"], "ok", "{f}");
        assert_eq!(f["from"], "boat-7");
    }
    let nav = live.remove("nav").unwrap();
    assert_eq!(nav.keys().copied().collect::<Vec<_>>(), (0..5).collect::<Vec<_>>());
    assert_eq!(nav[&3]["payload"]["timestamp"], 1_700_000_000_003u64, "the robot's own timestamp is kept");
    // A malformed datagram gets an error back and disturbs nothing.
    udp.send_to(b"{not json", &agent_udp).await.unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), udp.recv_from(&mut buf)).await.unwrap().unwrap();
    let err: Value = serde_json::from_slice(&buf[..n]).unwrap();
    assert_eq!(err["code"], "malformed_json");

    // The relay goes away; frames published meanwhile are buffered by the agent.
    drop(p);
    running.shutdown(Duration::from_secs(5)).await;
    agent.wait_for_log("relay link lost").await;
    for i in 5..25 {
        udp.send_to(json!({"type":"telemetry","stream":"imu","data":{"i":i}}).to_string().as_bytes(), &agent_udp)
            .await
            .unwrap();
    }
    // Give the agent the frames before the relay is back (order of events, not timing: the
    // agent logs each reconnect attempt, which comes after it has read its input).
    agent.wait_for_log("cannot connect to the relay").await;

    let running = start(dir.path(), addr.port()).await;
    let mut p = pilot_with(addr, &key, true, false).await;
    agent.wait_for_log("authenticated with the relay").await;
    for i in 25..30 {
        udp.send_to(json!({"type":"telemetry","stream":"imu","data":{"i":i}}).to_string().as_bytes(), &agent_udp)
            .await
            .unwrap();
    }
    let mut imu = BTreeMap::new();
    while !(5..30).all(|s| imu.contains_key(&s)) {
        let f = frame(&mut p).await;
        if f["payload"]["stream"] == "imu" {
            let seq = f["payload"]["sequence"].as_u64().unwrap();
            // Replayed frames from the relay's buffer may repeat what arrived live.
            if f["payload"]["relay"]["replay"] != true {
                assert!(imu.insert(seq, f).is_none(), "sequence {seq} delivered twice");
            } else {
                imu.entry(seq).or_insert(f);
            }
        }
    }
    for s in 5..25 {
        assert_eq!(imu[&s]["payload"]["backfill"], true, "frame {s} was buffered: {}", imu[&s]);
        assert_eq!(imu[&s]["payload"]["data"]["i"], s, "original data");
        assert_ne!(imu[&s]["payload"]["relay"]["verdict"], "duplicate");
    }
    for s in 25..30 {
        assert!(imu[&s]["payload"]["backfill"].is_null(), "frame {s} is live");
    }
    // Every number arrived: the relay's loss counter for the stream ends at zero.
    let last = imu.values().max_by_key(|f| f["payload"]["relay"]["receivedAt"].as_f64().unwrap() as u64).unwrap();
    assert_eq!(last["payload"]["relay"]["lostTotal"], 0, "{last}");
    running.shutdown(Duration::from_secs(5)).await;
}

/// Sends a request to boat-7 and returns the messages for it up to its final answer.
async fn request(p: &mut Ws, ty: &str, corr: &str, payload: Value) -> (Vec<Value>, Value) {
    send(p, json!({"type": ty, "correlationID": corr, "clientID": "boat-7", "payload": payload})).await;
    let mut progress = Vec::new();
    loop {
        let v = recv_until(p, corr, |v| v["correlationID"] == corr).await;
        match v["type"].as_str().unwrap() {
            "ack" => assert_eq!(v["payload"]["status"], "delivered", "{v}"),
            "command_progress" => progress.push(v),
            _ => return (progress, v),
        }
    }
}

#[tokio::test]
async fn commands_honour_the_allow_list_timeout_cap_and_never_run_twice() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "admin");
    let extra = "commands:\n  allow: [\"sh\", \"echo\"]\n  maxOutputBytes: 1000\n";
    let cfg = config(dir.path(), addr, &secret, free_udp_port(), extra);
    let mut agent = RunningAgent::spawn(&cfg, &[]);
    agent.wait_for_log("authenticated with the relay").await;
    let mut p = operator(addr, &key).await;

    let (progress, out) =
        request(&mut p, "execute_command", "c1", json!({"command":"echo","args":["hello","boat"]})).await;
    assert_eq!(out["type"], "command_output", "{out}");
    assert_eq!(out["from"], "boat-7");
    assert_eq!(out["payload"]["stdout"], "hello boat\n");
    assert_eq!(out["payload"]["exitCode"], 0);
    assert!(out["payload"]["durationMs"].is_u64());
    assert_eq!(progress.iter().map(|c| c["payload"]["data"].as_str().unwrap()).collect::<String>(), "hello boat\n");

    let (_, out) = request(&mut p, "execute_command", "c2", json!({"command":"rm","args":["-rf","/"]})).await;
    assert_eq!(out["type"], "command_result", "{out}");
    assert_eq!(out["payload"]["ok"], false);
    assert_eq!(out["payload"]["code"], "command_not_allowed");
    assert!(out["payload"]["error"].as_str().unwrap().contains("allow"), "{out}");
    let (_, out) = request(&mut p, "execute_command", "c3", json!({"command":"echo hi | cat","shell":true})).await;
    assert_eq!(out["payload"]["code"], "command_not_allowed", "shells are off by default: {out}");

    let (_, out) = request(
        &mut p,
        "execute_command",
        "c4",
        json!({"command":"sh","args":["-c","echo started; sleep 30"],"timeoutMs":500}),
    )
    .await;
    assert_eq!(out["payload"]["timedOut"], true, "{out}");
    assert!(out["payload"]["exitCode"].is_null());
    assert_eq!(out["payload"]["stdout"], "started\n");

    let (_, out) =
        request(&mut p, "execute_command", "c5", json!({"command":"sh","args":["-c","yes boat | head -c 50000"]}))
            .await;
    assert_eq!(out["payload"]["truncated"], true, "{out}");
    assert_eq!(out["payload"]["stdout"].as_str().unwrap().len(), 1000);
    assert_eq!(out["payload"]["exitCode"], 0);

    // The same request delivered twice runs once; the second delivery gets the same answer.
    let marker = dir.path().join("runs.txt");
    let payload = json!({"command":"sh","args":["-c", format!("echo run >> {}; echo done", marker.display())]});
    let (_, first) = request(&mut p, "execute_command", "dup-1", payload.clone()).await;
    let (_, second) = request(&mut p, "execute_command", "dup-1", payload).await;
    assert_eq!(first["payload"], second["payload"]);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "run\n", "ran exactly once");
    agent.wait_for_log("redelivered after it finished").await;
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn supervised_processes_restart_with_growing_delay_and_stream_logs() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "view");
    let extra = "commandRestartMaxDelay: \"2s\"\npaths:\n  crasher:\n    runOnInit: \"sh -c 'echo boom $RUN_TAG; exit 3'\"\n    runOnInitRestart: \"yes\"\n    environment:\n      - \"RUN_TAG=tagged\"\n";
    let cfg = config(dir.path(), addr, &secret, free_udp_port(), extra);
    let mut p = pilot_with(addr, &key, false, true).await;
    recv_type(&mut p, "subscribed").await;
    let _agent = RunningAgent::spawn(&cfg, &[]);

    // Collect the log lines and the restart delays (restartAt - since of each `restarting`).
    let mut delays = Vec::new();
    let mut last_restarts = 0;
    let mut lines = Vec::new();
    while delays.len() < 4 || lines.is_empty() {
        let s =
            recv_until(&mut p, "process state or log", |v| v["type"] == "process_state" || v["type"] == "log").await;
        if s["type"] == "log" {
            assert_eq!(s["payload"]["process"], "crasher");
            assert_eq!(s["payload"]["stream"], "stdout");
            lines.push(s["payload"]["line"].as_str().unwrap().to_owned());
            continue;
        }
        let proc_ = &s["payload"]["processes"][0];
        assert_eq!(proc_["name"], "crasher");
        if proc_["state"] == "restarting" && proc_["restarts"].as_u64().unwrap() >= last_restarts {
            last_restarts = proc_["restarts"].as_u64().unwrap() + 1;
            assert_eq!(proc_["lastExit"], "exit 3", "{proc_}");
            delays.push(proc_["restartAt"].as_f64().unwrap() - proc_["since"].as_f64().unwrap());
        }
    }
    assert_eq!(lines[0], "boom tagged", "output with the configured environment");
    assert!(delays[1] > delays[0] * 1.5, "the delay grows: {delays:?}");
    assert!(delays[3] <= 2_100.0, "capped by commandRestartMaxDelay: {delays:?}");
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn config_updates_apply_and_bad_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "admin");
    let extra = "teamNotes: keep\npaths:\n  steady:\n    runOnInit: \"sleep 600\"\n";
    let cfg = config(dir.path(), addr, &secret, free_udp_port(), extra);
    let mut p = pilot(addr, &key).await;
    recv_type(&mut p, "subscribed").await;
    let mut agent = RunningAgent::spawn(&cfg, &[]);
    agent.wait_for_log("authenticated with the relay").await;
    let state = recv_until(&mut p, "steady running", |v| {
        v["type"] == "process_state" && v["payload"]["processes"][0]["state"] == "running"
    })
    .await;
    let steady_pid = state["payload"]["processes"][0]["pid"].clone();

    let update = json!({"config": {"commands": {"allow": ["echo"]}, "paths": {"added": {"runOnInit": "sleep 600"}}}});
    let (_, r) = request(&mut p, "update_client_config", "u1", update).await;
    assert_eq!(r["type"], "command_result", "{r}");
    assert_eq!(r["payload"]["ok"], true, "{r}");
    assert_eq!(r["payload"]["data"]["started"], json!(["added"]));
    assert_eq!(r["payload"]["data"]["unchanged"], json!(["steady"]), "only what changed is restarted");
    let saved = std::fs::read_to_string(&cfg).unwrap();
    assert!(saved.contains("added") && saved.contains("teamNotes"), "saved, unknown keys kept: {saved}");
    let state = recv_until(&mut p, "two processes", |v| {
        v["type"] == "process_state"
            && v["payload"]["processes"].as_array().unwrap().iter().all(|p| p["state"] == "running")
            && v["payload"]["processes"].as_array().unwrap().len() == 2
    })
    .await;
    let steady = state["payload"]["processes"].as_array().unwrap().iter().find(|p| p["name"] == "steady").unwrap();
    assert_eq!(steady["pid"], steady_pid, "the unchanged process kept running");
    // The new allow list is live.
    let (_, out) = request(&mut p, "execute_command", "u2", json!({"command":"echo","args":["applied"]})).await;
    assert_eq!(out["payload"]["stdout"], "applied\n");

    // Bad values and protected keys are refused; the file stays as it was.
    let before = std::fs::read_to_string(&cfg).unwrap();
    let (_, r) =
        request(&mut p, "update_client_config", "u3", json!({"config": {"commands": {"maxOutputBytes": 0}}})).await;
    assert_eq!((r["payload"]["ok"].clone(), r["payload"]["code"].clone()), (json!(false), json!("invalid_config")));
    assert!(r["payload"]["error"].as_str().unwrap().contains("commands.maxOutputBytes"), "{r}");
    let (_, r) =
        request(&mut p, "update_client_config", "u4", json!({"config": {"paths": {"x": {"runOnInit": ""}}}})).await;
    assert_eq!(r["payload"]["code"], "invalid_config", "{r}");
    let (_, r) =
        request(&mut p, "update_client_config", "u5", json!({"config": {"serverAddress": "ws://elsewhere/ws"}})).await;
    assert_eq!(r["payload"]["code"], "invalid_config", "{r}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), before);

    // reload_config: a broken file is refused and the agent keeps working.
    std::fs::write(&cfg, "serverAddress: [broken\n").unwrap();
    let (_, r) = request(&mut p, "reload_config", "u6", json!({})).await;
    assert_eq!(r["payload"]["code"], "invalid_config", "{r}");
    let (_, out) = request(&mut p, "execute_command", "u7", json!({"command":"echo","args":["still here"]})).await;
    assert_eq!(out["payload"]["stdout"], "still here\n");
    // ...and a restart with the broken file falls back to the last good config.
    agent.child.kill().await.unwrap();
    let mut agent = RunningAgent::spawn(&cfg, &[]);
    agent.wait_for_log("running with the last good configuration").await;
    agent.wait_for_log("authenticated with the relay").await;
    // A fixed file reloads.
    std::fs::write(&cfg, before.replace("echo", "uptime")).unwrap();
    let mut p = operator(addr, &key).await;
    let (_, r) = request(&mut p, "reload_config", "u8", json!({})).await;
    assert_eq!(r["payload"]["ok"], true, "{r}");
    let (_, out) = request(&mut p, "execute_command", "u9", json!({"command":"echo","args":["x"]})).await;
    assert_eq!(out["payload"]["code"], "command_not_allowed", "the reloaded allow list is live: {out}");
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn app_commands_reach_the_robot_and_a_silent_controller_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_with(dir.path(), 0, |c| c.lease_timeout = 1.0).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "control");
    let cfg = config(dir.path(), addr, &secret, free_udp_port(), "safety:\n  policy: hold\n");
    let mut agent = RunningAgent::spawn(&cfg, &[]);
    agent.wait_for_log("authenticated with the relay").await;
    let mut p = pilot(addr, &key).await;
    recv_type(&mut p, "subscribed").await;

    // No robot software yet: a command that must not arrive late (teleop, `"queue": false`) is
    // refused at once, although the agent has just started (other commands would wait a while
    // for the robot's first connection: see the next test).
    send(&mut p, json!({"type":"lease_acquire","correlationID":"l1","payload":{"deviceID":"boat-7"}})).await;
    recv_until(&mut p, "lease ack", |v| v["correlationID"] == "l1").await;
    let teleop = json!({"command":"teleop","data":{"throttle":0.4},"queue":false});
    let (_, r) = request(&mut p, "app_command", "a0", teleop).await;
    assert_eq!(r["payload"]["code"], "robot_unavailable", "{r}");
    assert!(r["payload"]["error"].as_str().unwrap().contains("no robot software is connected"), "{r}");

    let mut robot = Robot::connect(dir.path()).await;
    agent.wait_for_log("robot software connected").await;
    send(
        &mut p,
        json!({"type":"app_command","correlationID":"a1","clientID":"boat-7",
        "payload":{"command":"set_waypoint","data":{"latitude":37.81,"longitude":-122.42}}}),
    )
    .await;
    let cmd = robot.recv_type("app_command").await;
    assert_eq!((cmd["command"].as_str(), cmd["correlationID"].as_str()), (Some("set_waypoint"), Some("a1")));
    assert_eq!(cmd["data"]["latitude"], 37.81);
    assert_eq!(cmd["from"], "op-p");
    robot.send(json!({"type":"command_result","correlationID":"a1","ok":true,"data":{"accepted":true}})).await;
    let r = recv_until(&mut p, "app result", |v| v["correlationID"] == "a1" && v["type"] == "command_result").await;
    assert_eq!(r["payload"]["ok"], true);
    assert_eq!(r["payload"]["data"]["accepted"], true);

    // The pilot stops heartbeating: the relay expires the lease, the agent stops the robot and
    // reports it.
    let stop = robot.recv_type("safety_stop").await;
    assert_eq!((stop["policy"].as_str(), stop["reason"].as_str()), (Some("hold"), Some("controller_silent")));
    let report = recv_type(&mut p, "safety_stop").await;
    assert_eq!(report["from"], "boat-7");
    assert_eq!(report["payload"]["reason"], "controller_silent");
    assert_eq!(report["payload"]["controller"], "pilot");
    // Taking control again clears it.
    send(&mut p, json!({"type":"lease_acquire","correlationID":"l2","payload":{"deviceID":"boat-7"}})).await;
    let clear = robot.recv_type("safety_clear").await;
    assert_eq!(clear["reason"], "lease_acquired");
    running.shutdown(Duration::from_secs(5)).await;
}

/// The pilot takes boat-7's lease while the boat is off and sends it waypoints; the relay
/// queues them. Returns the pilot's connection and the waypoints.
async fn queue_waypoints(addr: std::net::SocketAddr, key: &str, corr: &str) -> (Ws, Value) {
    let mut p = pilot(addr, key).await;
    recv_type(&mut p, "subscribed").await;
    send(&mut p, json!({"type":"lease_acquire","correlationID":"l-off","payload":{"deviceID":"boat-7"}})).await;
    let ack = recv_until(&mut p, "lease ack", |v| v["correlationID"] == "l-off").await;
    assert_eq!(ack["payload"]["status"], "ok", "{ack}");
    let waypoints =
        json!({"waypoints":[{"latitude":37.7749,"longitude":-122.4194},{"latitude":37.7801,"longitude":-122.4312}]});
    send(
        &mut p,
        json!({"type":"app_command","correlationID":corr,"clientID":"boat-7",
        "payload":{"command":"set_waypoints","data":waypoints}}),
    )
    .await;
    let ack = recv_until(&mut p, "queued ack", |v| v["correlationID"] == corr).await;
    assert_eq!((ack["type"].as_str(), ack["payload"]["status"].as_str()), (Some("ack"), Some("queued")), "{ack}");
    (p, waypoints)
}

#[tokio::test]
async fn queued_app_commands_wait_for_the_robot_software_to_connect() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "control");
    let cfg = config(dir.path(), addr, &secret, free_udp_port(), "commands:\n  appCommandTimeout: \"20s\"\n");
    let (p, waypoints) = queue_waypoints(addr, &key, "q1").await;

    // The boat powers up: the agent logs in and gets the queued command before the robot's
    // program (which starts at the same time) is on the socket. The command waits for it.
    let mut agent = RunningAgent::spawn(&cfg, &[]);
    agent.wait_for_log("authenticated with the relay").await;
    let held = agent.wait_for_log("holding the app command").await;
    assert!(held.contains("queued while offline") && held.contains("q1"), "{held}");

    // The relay restarts meanwhile and pushes the still unanswered command again at the next
    // login: it is the same command, not held twice.
    drop(p);
    running.shutdown(Duration::from_secs(5)).await;
    agent.wait_for_log("relay link lost").await;
    let running = start(dir.path(), addr.port()).await;
    agent.wait_for_log("authenticated with the relay").await;
    agent.wait_for_log("app_command redelivered while still running").await;
    let mut p = pilot(addr, &key).await;
    recv_type(&mut p, "subscribed").await;

    // The robot's program comes up: it gets the waypoints, once, and the pilot its answer.
    let mut robot = Robot::connect(dir.path()).await;
    let cmd = robot.recv_type("app_command").await;
    assert_eq!((cmd["correlationID"].as_str(), cmd["command"].as_str()), (Some("q1"), Some("set_waypoints")));
    assert_eq!(cmd["data"], waypoints);
    assert_eq!(cmd["from"], "op-p");
    robot.send(json!({"type":"command_result","correlationID":"q1","ok":true,"data":{"waypoints":2}})).await;
    let r = recv_until(&mut p, "q1 result", |v| v["correlationID"] == "q1" && v["type"] == "command_result").await;
    assert_eq!(r["payload"]["ok"], true, "{r}");
    assert_eq!(r["payload"]["data"]["waypoints"], 2);
    agent.wait_for_log("passing a held app command to the robot software").await;
    // The next command the robot hears is the next one sent, not the held one again.
    send(&mut p, json!({"type":"lease_acquire","correlationID":"l2","payload":{"deviceID":"boat-7"}})).await;
    recv_until(&mut p, "lease ack", |v| v["correlationID"] == "l2").await;
    send(&mut p, json!({"type":"app_command","correlationID":"q2","clientID":"boat-7","payload":{"command":"resume"}}))
        .await;
    let cmd = robot.recv_type("app_command").await;
    assert_eq!(cmd["correlationID"], "q2", "{cmd}");
    robot.send(json!({"type":"command_result","correlationID":"q2","ok":true})).await;
    let r = recv_until(&mut p, "q2 result", |v| v["correlationID"] == "q2" && v["type"] == "command_result").await;
    assert_eq!(r["payload"]["ok"], true, "{r}");

    // The robot's program goes away: a live command is refused at once, never delivered late.
    drop(robot);
    agent.wait_for_log("robot software disconnected").await;
    let (_, r) = request(&mut p, "app_command", "q3", json!({"command":"set_waypoint","data":{"latitude":37.8}})).await;
    assert_eq!(r["payload"]["code"], "robot_unavailable", "{r}");
    assert!(r["payload"]["error"].as_str().unwrap().contains("no robot software is connected"), "{r}");
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_queued_app_command_is_refused_when_no_robot_software_connects_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "control");
    let cfg = config(dir.path(), addr, &secret, free_udp_port(), "commands:\n  appCommandTimeout: \"1s\"\n");
    let (mut p, _) = queue_waypoints(addr, &key, "q1").await;

    let mut agent = RunningAgent::spawn(&cfg, &[]);
    agent.wait_for_log("authenticated with the relay").await;
    agent.wait_for_log("holding the app command").await;
    let held_at = std::time::Instant::now();
    let r = recv_until(&mut p, "q1 result", |v| v["correlationID"] == "q1" && v["type"] == "command_result").await;
    assert!(held_at.elapsed() >= Duration::from_millis(500), "answered after the wait, not at once");
    assert_eq!((r["payload"]["ok"].as_bool(), r["payload"]["code"].as_str()), (Some(false), Some("robot_unavailable")));
    let error = r["payload"]["error"].as_str().unwrap();
    let sock = dir.path().join("robot.sock");
    assert!(
        error.contains("waited 1 s for robot software")
            && error.contains("telemetry.unixSocket")
            && error.contains(&sock.display().to_string()),
        "{error}"
    );
    agent.wait_for_log("waited 1 s for robot software").await;
    // The agent started more than appCommandTimeout ago: a live command without robot
    // software is now refused at once.
    send(&mut p, json!({"type":"lease_acquire","correlationID":"l2","payload":{"deviceID":"boat-7"}})).await;
    recv_until(&mut p, "lease ack", |v| v["correlationID"] == "l2").await;
    let (_, r) = request(&mut p, "app_command", "a1", json!({"command":"resume"})).await;
    assert_eq!(r["payload"]["code"], "robot_unavailable", "{r}");
    assert!(r["payload"]["error"].as_str().unwrap().contains("no robot software is connected"), "{r}");
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn speed_test_and_docker_commands() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "admin");
    let cfg = config(dir.path(), addr, &secret, free_udp_port(), "");
    // A docker CLI stand-in on PATH records its arguments and lists one container.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let log = dir.path().join("docker-args.txt");
    std::fs::write(
        bin.join("docker"),
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\nif [ \"$1\" = ps ]; then echo '{{\"Names\":\"web\",\"State\":\"running\"}}'; fi\n\
             if [ \"$2\" = ghost ]; then echo 'Error: No such container: ghost' >&2; exit 1; fi\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(bin.join("docker"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let mut agent = RunningAgent::spawn(&cfg, &[("PATH", &path)]);
    agent.wait_for_log("authenticated with the relay").await;
    let mut p = operator(addr, &key).await;

    let (_, r) = request(&mut p, "speed_test", "s1", json!({"bytes": 200000})).await;
    assert_eq!(r["type"], "speed_test_result", "{r}");
    for k in ["uploadMbps", "downloadMbps", "rttMs"] {
        assert!(r["payload"][k].as_f64().unwrap() > 0.0, "{k}: {r}");
    }

    let (_, r) = request(&mut p, "docker_command", "d1", json!({"action":"list"})).await;
    assert_eq!(r["payload"]["ok"], true, "{r}");
    assert_eq!(r["payload"]["data"]["containers"][0]["Names"], "web");
    let (_, r) = request(&mut p, "docker_command", "d2", json!({"action":"restart","container":"web"})).await;
    assert_eq!(r["payload"]["ok"], true, "{r}");
    let (_, r) = request(&mut p, "docker_command", "d3", json!({"action":"stop","container":"ghost"})).await;
    assert_eq!(r["payload"]["code"], "command_failed", "{r}");
    assert!(r["payload"]["error"].as_str().unwrap().contains("No such container"), "{r}");
    let (_, r) = request(&mut p, "docker_command", "d4", json!({"action":"start","container":"--privileged"})).await;
    assert_eq!(r["payload"]["code"], "invalid_payload", "{r}");
    let args = std::fs::read_to_string(&log).unwrap();
    assert!(args.contains("restart web") && !args.contains("privileged"), "{args}");
    agent.child.kill().await.unwrap();

    // Without docker: a clear `unsupported`.
    let mut agent = RunningAgent::spawn(&cfg, &[("PATH", "/nonexistent")]);
    agent.wait_for_log("authenticated with the relay").await;
    let (_, r) = request(&mut p, "docker_command", "d5", json!({"action":"list"})).await;
    assert_eq!(r["payload"]["code"], "unsupported", "{r}");
    running.shutdown(Duration::from_secs(5)).await;
}

/// The supervised process `name` in a `process_state` message.
fn process<'a>(state: &'a Value, name: &str) -> &'a Value {
    state["payload"]["processes"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap_or(&Value::Null)
}

fn alive(pid: &Value) -> bool {
    std::path::Path::new(&format!("/proc/{}", pid.as_u64().unwrap())).exists()
}

/// Another pilot of boat-7's organisation, with `level` on every device; returns its API key.
fn second_pilot(running: &relay::RunningRelay, id: &'static str, level: &'static str) -> String {
    use relay::store::{OperatorRole, q};
    running
        .relay
        .store
        .call_sync(move |c| {
            q::create_operator(c, id, "default", id, OperatorRole::Pilot)?;
            q::set_permission(c, id, "org", level)?;
            relay::auth::issue_api_key_sync(c, id, None)
        })
        .unwrap()
}

/// A subscribed pilot that keeps what arrives while it waits for an answer, so a
/// `process_state` that overtakes a `command_result` is not lost.
struct Watcher {
    ws: Ws,
    backlog: std::collections::VecDeque<Value>,
}

impl Watcher {
    /// The next message matching `want`, from what was kept first; earlier ones are skipped.
    async fn next(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.backlog.iter().position(&want) {
            return self.backlog.drain(..=i).next_back().unwrap();
        }
        self.backlog.clear();
        recv_until(&mut self.ws, what, want).await
    }

    /// Sends a request to boat-7 and returns its answer (after the `ack`), keeping the rest.
    async fn request(&mut self, ty: &str, corr: &str, payload: Value) -> Value {
        send(&mut self.ws, json!({"type": ty, "correlationID": corr, "clientID": "boat-7", "payload": payload})).await;
        loop {
            let v = recv_until(&mut self.ws, corr, |_| true).await;
            if v["correlationID"] != corr {
                self.backlog.push_back(v);
            } else if v["type"] != "ack" {
                return v;
            }
        }
    }
}

#[tokio::test]
async fn processes_are_stopped_started_and_restarted_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "admin");
    let controller = second_pilot(&running, "op-c", "control");
    let extra = "paths:\n  svc:\n    runOnInit: \"sleep 1000\"\n    runOnInitRestart: \"yes\"\n  \
                 other:\n    runOnInit: \"sleep 1000\"\n";
    let cfg = config(dir.path(), addr, &secret, free_udp_port(), extra);
    let mut p = Watcher { ws: pilot(addr, &key).await, backlog: Default::default() };
    p.next("subscribed", |v| v["type"] == "subscribed").await;
    let mut agent = RunningAgent::spawn(&cfg, &[]);
    let is_state = |v: &Value| v["type"] == "process_state";
    let state = p
        .next("both running", |v| {
            is_state(v) && process(v, "svc")["state"] == "running" && process(v, "other")["state"] == "running"
        })
        .await;
    let pid1 = process(&state, "svc")["pid"].clone();
    let other_pid = process(&state, "other")["pid"].clone();

    // stop: answered with the state afterwards; subscribers see `stopped`.
    let r = p.request("process_command", "pc1", json!({"action":"stop","name":"svc"})).await;
    assert_eq!(r["type"], "command_result", "{r}");
    assert_eq!(r["from"], "boat-7");
    assert_eq!(r["payload"]["ok"], true, "{r}");
    assert_eq!(
        r["payload"]["data"],
        json!({"name":"svc","action":"stop","state":"stopped","changed":true,"lastExit":"signal 15"})
    );
    p.next("svc stopped", |v| is_state(v) && process(v, "svc")["state"] == "stopped").await;
    assert!(!alive(&pid1), "the process is gone");
    // It is not restarted although runOnInitRestart is on: snapshots come in order, and every
    // one up to the restart of `other` (which follows the stop) still shows svc stopped.
    let r = p.request("process_command", "pc2", json!({"action":"restart","name":"other"})).await;
    assert_eq!(r["payload"]["data"]["state"], "running", "{r}");
    let other_new = r["payload"]["data"]["pid"].clone();
    assert_ne!(other_new, other_pid);
    p.next("other restarted", |v| {
        if !is_state(v) {
            return false;
        }
        assert_eq!(process(v, "svc")["state"], "stopped", "svc came back on its own: {v}");
        process(v, "other")["pid"] == other_new
    })
    .await;
    let r = p.request("process_command", "pc3", json!({"action":"stop","name":"svc"})).await;
    let data = &r["payload"]["data"];
    assert_eq!((data["state"].as_str(), data["changed"].as_bool()), (Some("stopped"), Some(false)), "{r}");

    // start: running again with a new pid; starting a running process is a no-op.
    let r = p.request("process_command", "pc4", json!({"action":"start","name":"svc"})).await;
    assert_eq!(r["payload"]["data"]["state"], "running", "{r}");
    assert_eq!(r["payload"]["data"]["changed"], true);
    let pid2 = r["payload"]["data"]["pid"].clone();
    assert!(pid2.is_u64() && pid2 != pid1, "{r}");
    p.next("svc running", |v| is_state(v) && process(v, "svc")["pid"] == pid2).await;
    let r = p.request("process_command", "pc5", json!({"action":"start","name":"svc"})).await;
    assert_eq!(r["payload"]["ok"], true, "{r}");
    assert_eq!((r["payload"]["data"]["changed"].as_bool(), &r["payload"]["data"]["pid"]), (Some(false), &pid2));

    // restart: stopped, then running with a new pid.
    let r = p.request("process_command", "pc6", json!({"action":"restart","name":"svc"})).await;
    let pid3 = r["payload"]["data"]["pid"].clone();
    assert_eq!(r["payload"]["data"]["state"], "running", "{r}");
    assert!(pid3.is_u64() && pid3 != pid2 && !alive(&pid2), "{r}");
    p.next("svc stopped for the restart", |v| is_state(v) && process(v, "svc")["state"] == "stopped").await;
    p.next("svc restarted", |v| is_state(v) && process(v, "svc")["pid"] == pid3).await;

    // A redelivered request runs once: the second delivery gets the first answer.
    let first = p.request("process_command", "pc-dup", json!({"action":"restart","name":"svc"})).await;
    let second = p.request("process_command", "pc-dup", json!({"action":"restart","name":"svc"})).await;
    assert_eq!(first["payload"], second["payload"]);
    agent.wait_for_log("redelivered after it finished").await;
    let pid4 = first["payload"]["data"]["pid"].clone();
    let r = p.request("process_command", "pc7", json!({"action":"start","name":"svc"})).await;
    assert_eq!(r["payload"]["data"]["pid"], pid4, "restarted once, not twice");

    // Refusals.
    let r = p.request("process_command", "pc8", json!({"action":"stop","name":"ghost"})).await;
    assert_eq!((r["payload"]["ok"].as_bool(), r["payload"]["code"].as_str()), (Some(false), Some("unknown_process")));
    assert!(r["payload"]["error"].as_str().unwrap().contains("other, svc"), "lists the known ones: {r}");
    let r = p.request("process_command", "pc9", json!({"action":"explode","name":"svc"})).await;
    assert_eq!(r["payload"]["code"], "invalid_payload", "{r}");
    let r = p.request("process_command", "pc10", json!({"action":"stop"})).await;
    assert_eq!(r["payload"]["code"], "invalid_payload", "{r}");
    assert!(alive(&pid4), "refusals touched nothing");

    // A pilot with only `control` is refused by the relay, for both requests.
    let mut c = operator(addr, &controller).await;
    let (_, e) = request(&mut c, "process_command", "f1", json!({"action":"stop","name":"svc"})).await;
    assert_eq!((e["type"].as_str(), e["payload"]["code"].as_str()), (Some("error"), Some("forbidden")), "{e}");
    let (_, e) = request(&mut c, "get_client_config", "f2", json!({})).await;
    assert_eq!((e["type"].as_str(), e["payload"]["code"].as_str()), (Some("error"), Some("forbidden")), "{e}");

    // An offline device: refused at once, not queued.
    agent.child.kill().await.unwrap();
    p.next("offline", |v| v["type"] == "presence" && v["payload"]["status"] == "offline").await;
    let e = p.request("process_command", "o1", json!({"action":"start","name":"svc"})).await;
    assert_eq!(e["payload"]["code"], "target_offline", "{e}");
    let e = p.request("get_client_config", "o2", json!({})).await;
    assert_eq!(e["payload"]["code"], "target_offline", "{e}");
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_running_config_is_read_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), 0).await;
    let addr = running.addr;
    let (secret, key) = fleet(&running, "admin");
    let extra = "teamNotes: keep\ncommands:\n  allow: [\"uptime\"]\npaths:\n  steady:\n    runOnInit: \"sleep 600\"\n";
    let cfg = config(dir.path(), addr, &secret, free_udp_port(), extra);
    let mut agent = RunningAgent::spawn(&cfg, &[]);
    agent.wait_for_log("authenticated with the relay").await;
    let mut p = operator(addr, &key).await;

    send(&mut p, json!({"type":"get_client_config","correlationID":"g1","clientID":"boat-7","payload":{}})).await;
    let raw = recv_until(&mut p, "config", |v| v["correlationID"] == "g1" && v["type"] == "command_result").await;
    assert!(!raw.to_string().contains(&secret), "the secret never leaves the device: {raw}");
    let data = &raw["payload"]["data"];
    assert_eq!(raw["payload"]["ok"], true, "{raw}");
    assert_eq!(
        data["protected"],
        json!(["serverAddress", "clientID", "clientSecret", "handshakeKey", "registrationRequestID", "caFile"])
    );
    let c = &data["config"];
    assert_eq!(c["clientSecret"], "<redacted>");
    assert_eq!(c["handshakeKey"], "", "an unset secret is shown empty");
    assert_eq!(c["clientID"], "boat-7");
    assert_eq!(c["serverAddress"], format!("ws://{addr}/ws"));
    assert_eq!(c["paths"]["steady"]["runOnInit"], "sleep 600");
    assert_eq!(c["paths"]["steady"]["runOnInitRestart"], "no");
    assert_eq!(c["commands"]["allow"], json!(["uptime"]));
    assert_eq!(c["commands"]["timeout"], "30s", "defaults are filled in, in config.yaml's notation");
    assert_eq!(c["teamNotes"], "keep", "unknown keys too");

    // What an update changes is what the next read shows; the placeholder cannot be written back.
    let (_, r) = request(&mut p, "update_client_config", "g2", json!({"config": {"logLevel": "warn"}})).await;
    assert_eq!(r["payload"]["ok"], true, "{r}");
    let (_, r) = request(&mut p, "get_client_config", "g3", json!({})).await;
    assert_eq!(r["payload"]["data"]["config"]["logLevel"], "warn", "{r}");
    let patch = json!({"config": {"video": {"iceServers": [{"urls": ["turn:t:3478"], "credential": "<redacted>"}]}}});
    let (_, r) = request(&mut p, "update_client_config", "g4", patch).await;
    assert_eq!(r["payload"]["code"], "invalid_config", "{r}");
    running.shutdown(Duration::from_secs(5)).await;
}
