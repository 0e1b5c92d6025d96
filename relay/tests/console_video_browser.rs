//! Live video in a real browser: the real agent (`tether-device` streaming its test pattern as
//! H.264, 640x480 at 15 fps) answers the console's offer through the real relay's signaling, and
//! Debian's chromium, driven by client-web/e2e/video.mjs, decodes its frames at that size. Run
//! three times: in mode `auto` (the console's default; the agent reports its peer's state, so
//! the session must stay peer to peer) with Chromium's default mDNS host candidates (`<uuid>.local`,
//! as every pilot's browser sends them) and with `--disable-features=WebRtcHideLocalIpsWithMdns`,
//! then in mode `sfu` (mDNS candidates again): the console plays through the relay's SFU, whose
//! viewer peer must resolve those names. Every run times click -> first frame (printed, for
//! docs/benchmarks.md; `--nocapture` shows it, and it is written to
//! target/screenshots/video/timing-<variant>.json); the first and the SFU run also drop the
//! media path until the console restarts ICE, cut the console's relay WebSocket to see a new
//! session start by itself, and check that a `bye` is shown. `RUST_LOG` (e.g.
//! `info,media=debug`) prints the relay's log, its SFU's peer states among it.
//!
//! Two choices make this work on any Linux machine with a network interface:
//! - **Addresses.** Chromium gathers no loopback ICE candidates, so media must flow over a
//!   real interface. The test finds the address the kernel would use for outside traffic (a UDP
//!   socket "connected" to a public address: no packet is sent) and binds the relay there too,
//!   so the console is served the way a LAN pilot sees it (plain http, not a secure context).
//!   `TETHER_TEST_IP` overrides the choice.
//! - **The agent binary.** `CARGO_BIN_EXE_*` exists only for a package's own binaries, so the
//!   test looks where Cargo puts every workspace binary: next to its own `deps/` directory
//!   (`target/<profile>/tether-device`). `cargo test --workspace` (what `make test` runs)
//!   builds it before any test starts. When it is missing or older than the agent's sources
//!   (e.g. `cargo test -p tether-relay` alone), the test builds it with the Cargo that runs it,
//!   same profile and target directory. `TETHER_DEVICE_BIN` names another binary.
//!
//! `make test` installs chromium and playwright-core (see .ci/install-deps.sh).

mod common;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::browser::*;
use common::*;

/// The agent's video settings, which the browser must see.
const WIDTH: u32 = 640;
const HEIGHT: u32 = 480;
const FPS: u32 = 15;
/// Click -> first frame measurements per run.
const TIMED_RUNS: u32 = 7;

#[tokio::test]
async fn console_plays_the_agents_test_pattern_in_chromium() {
    // The relay's own log (its SFU's peer states among it), when asked for: RUST_LOG=info,media=debug.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let e2e = root.join("client-web/e2e");
    assert!(
        e2e.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `make deps` (or `make test`)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&chromium).exists(), "no chromium at {chromium}: run `make deps` (or `make test`)");
    let ip = interface_address();
    let agent = workspace_binary(&root, "tether-device", "tether-device", AGENT_SOURCES);

    let r = start_relay_with(|c| {
        c.bind = ip;
        c.ping_interval = 1.0;
    })
    .await;
    let secret = r.create_device("boat-1", "default");
    // A pilot who may only watch: video needs `view`, nothing more.
    let key = r.create_pilot("ana", Some("view"));

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "serverAddress: \"ws://{addr}/ws\"\nclientID: boat-1\nclientSecret: \"{secret}\"\nname: Boat 1\nlogLevel: info\n\
             telemetry:\n  rateHz: 2\n  simulator: true\n  systemMetrics: false\n  udp: \"\"\n  unixSocket: \"\"\n\
             video:\n  enabled: true\n  source: testpattern\n  codec: h264\n  width: {WIDTH}\n  height: {HEIGHT}\n  framerate: {FPS}\n  bitrateKbps: 800\n",
            addr = r.addr()
        ),
    )
    .unwrap();
    let log_path = dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut agent = tokio::process::Command::new(&agent)
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run the agent {}: {e}", agent.display()));

    let shots = root.join("target/screenshots/video");
    let variants: [(&str, &[&str]); 3] = [
        ("mdns", &["--expect-mode", "p2p"]),
        ("plain", &["--no-mdns", "--no-recovery", "--expect-mode", "p2p"]),
        ("sfu", &["--mode", "sfu", "--expect-mode", "sfu"]),
    ];
    for (variant, flags) in variants {
        let out = tokio::time::timeout(
            Duration::from_secs(300),
            tokio::process::Command::new("node")
                .arg(e2e.join("video.mjs"))
                .arg(r.http("/"))
                .arg(&key)
                .arg("boat-1")
                .arg(&shots)
                .args([
                    "--width",
                    &WIDTH.to_string(),
                    "--height",
                    &HEIGHT.to_string(),
                    "--runs",
                    &TIMED_RUNS.to_string(),
                ])
                .args(flags)
                .env("CHROMIUM", &chromium)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("{variant}: the browser test did not finish in time\nagent log:\n{}", tail(&log_path))
        })
        .expect("node runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let alive = agent.try_wait().unwrap().is_none();
        assert!(
            out.status.success() && stdout.contains("video e2e: all steps passed"),
            "{variant}: browser test failed (agent {}):\n{stdout}\n{stderr}\nagent log:\n{}",
            if alive { "still running" } else { "exited" },
            tail(&log_path)
        );
        print!("{stdout}");
        if let Some(json) = stdout.lines().find_map(|l| l.strip_prefix("video e2e timing: ")) {
            std::fs::write(shots.join(format!("timing-{variant}.json")), json).unwrap();
        }
    }
    agent.kill().await.unwrap();
    r.stop().await;
}
