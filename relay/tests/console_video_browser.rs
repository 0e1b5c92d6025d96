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
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

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
    let agent = agent_binary(&root);

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

/// The address this machine uses for outside traffic: where Chromium and the agent gather
/// their host candidates.
fn interface_address() -> IpAddr {
    if let Ok(s) = std::env::var("TETHER_TEST_IP") {
        return s.parse().expect("TETHER_TEST_IP is an IP address");
    }
    // Connecting a UDP socket only picks the route and source address; nothing is sent.
    let routed = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("1.1.1.1:53").map(|()| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .ok();
    // No default route (an isolated machine): any global address of an interface that is up.
    let listed = || {
        let out = std::process::Command::new("ip")
            .args(["-4", "-o", "addr", "show", "scope", "global", "up"])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace().skip_while(|w| *w != "inet").nth(1)?.split('/').next()?.parse().ok()
    };
    match routed.or_else(listed) {
        Some(ip) if !ip.is_loopback() && !ip.is_unspecified() => ip,
        other => panic!(
            "no non-loopback IPv4 address ({other:?}): Chromium gathers no loopback ICE candidates, so this \
             test needs an interface (or set TETHER_TEST_IP)"
        ),
    }
}

/// The `tether-device` binary, built if it is missing or older than its sources.
fn agent_binary(root: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("TETHER_DEVICE_BIN") {
        return p.into();
    }
    // This test runs as target/<profile>/deps/console_video_browser-<hash>.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).expect("test binary in target/<profile>/deps").to_owned();
    let bin = profile_dir.join(format!("tether-device{}", std::env::consts::EXE_SUFFIX));
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let sources = [
        "device/src",
        "device/Cargo.toml",
        "media/src",
        "media/Cargo.toml",
        "signaling/src",
        "signaling/Cargo.toml",
        "Cargo.lock",
    ]
    .iter()
    .filter_map(|p| newest(&root.join(p)))
    .max();
    if built.is_some_and(|b| sources.is_none_or(|s| s <= b)) {
        return bin;
    }
    let Some(cargo) = std::env::var_os("CARGO") else {
        panic!("{} is missing or older than its sources: run `cargo build -p tether-device` first", bin.display());
    };
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let mut build = std::process::Command::new(cargo);
    build.current_dir(root).args(["build", "-p", "tether-device", "--bin", "tether-device", "--profile", &profile]);
    // The same target directory as this test, unless it is not a plain <target>/<profile>.
    if let Some(target) = profile_dir.parent().filter(|t| t.join("CACHEDIR.TAG").exists()) {
        build.env("CARGO_TARGET_DIR", target);
    }
    eprintln!("building the agent: {build:?}");
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building tether-device failed");
    assert!(bin.exists(), "cargo built tether-device somewhere other than {}", bin.display());
    bin
}

/// The newest modification time of a file, or of any file under a directory.
fn newest(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path).ok()?.filter_map(Result::ok).filter_map(|e| newest(&e.path())).max()
}

/// The end of the agent's log, for failure messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}
