//! What the browser tests share: the address Chromium can use for media, and the workspace
//! binaries they run (`CARGO_BIN_EXE_*` exists only for a package's own binaries).
#![allow(dead_code)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The sources the agent binary is built from.
pub const AGENT_SOURCES: &[&str] = &[
    "device/src",
    "device/Cargo.toml",
    "media/src",
    "media/Cargo.toml",
    "signaling/src",
    "signaling/Cargo.toml",
    "Cargo.lock",
];

/// The sources of `tether-boat` (the simulated boat lives in the agent's library).
pub const BOAT_SOURCES: &[&str] =
    &["examples/src/boat.rs", "examples/Cargo.toml", "device/src", "signaling/src", "Cargo.lock"];

/// The address this machine uses for outside traffic: where Chromium and the agent gather
/// their host candidates.
pub fn interface_address() -> IpAddr {
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

/// A workspace binary of another package (`bin` of `package`), built with the Cargo that runs
/// this test (same profile and target directory) if it is missing or older than `sources`.
/// `cargo test --workspace`, what `make test` runs, builds every binary before any test starts.
/// `TETHER_<BIN>_BIN` (e.g. `TETHER_DEVICE_BIN` for tether-device) names another binary.
pub fn workspace_binary(root: &Path, package: &str, bin: &str, sources: &[&str]) -> PathBuf {
    let var = format!("TETHER_{}_BIN", bin.trim_start_matches("tether-").to_uppercase());
    if let Some(p) = std::env::var_os(&var) {
        return p.into();
    }
    // This test runs as target/<profile>/deps/<test>-<hash>.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).expect("test binary in target/<profile>/deps").to_owned();
    let path = profile_dir.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    let newest_source = sources.iter().filter_map(|p| newest(&root.join(p))).max();
    if built.is_some_and(|b| newest_source.is_none_or(|s| s <= b)) {
        return path;
    }
    let Some(cargo) = std::env::var_os("CARGO") else {
        panic!(
            "{} is missing or older than its sources: run `cargo build -p {package} --bin {bin}` first",
            path.display()
        );
    };
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let mut build = std::process::Command::new(cargo);
    build.current_dir(root).args(["build", "-p", package, "--bin", bin, "--profile", &profile]);
    // The same target directory as this test, unless it is not a plain <target>/<profile>.
    if let Some(target) = profile_dir.parent().filter(|t| t.join("CACHEDIR.TAG").exists()) {
        build.env("CARGO_TARGET_DIR", target);
    }
    eprintln!("building {bin}: {build:?}");
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building {bin} failed");
    assert!(path.exists(), "cargo built {bin} somewhere other than {}", path.display());
    path
}

/// The newest modification time of a file, or of any file under a directory.
fn newest(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path).ok()?.filter_map(Result::ok).filter_map(|e| newest(&e.path())).max()
}

/// The end of a log file, for failure messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Runs one of the console's browser scripts (`client-web/e2e/<script>`) against the real
/// binaries: the relay (this package's), the agent and `tether-boat` (built if needed), on this
/// machine's interface address, with screenshots in `target/screenshots/<shots>/`. `extra` adds
/// environment variables. Fails with the script's output (and the relay's log) unless it exits
/// 0 and prints `done`.
pub async fn run_console_script(script: &str, shots: &str, done: &str, extra: &[(&str, &std::ffi::OsStr)]) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let e2e = root.join("client-web/e2e");
    assert!(
        e2e.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `make deps` (or `make test`)"
    );
    let ip = interface_address();
    let device = workspace_binary(&root, "tether-device", "tether-device", AGENT_SOURCES);
    let boat = workspace_binary(&root, "tether-examples", "tether-boat", BOAT_SOURCES);
    let work = tempfile::tempdir().unwrap();
    let shots = root.join("target/screenshots").join(shots);
    let _ = std::fs::remove_dir_all(&shots);
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(e2e.join(script))
        .env("RELAY_BIN", env!("CARGO_BIN_EXE_tether-relay"))
        .env("DEVICE_BIN", &device)
        .env("BOAT_BIN", &boat)
        .env("WORK", work.path())
        .env("SHOTS", &shots)
        .env("HOST_IP", ip.to_string())
        .kill_on_drop(true);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    // The script has its own deadlines per step; this only guards against a hung browser.
    let out = tokio::time::timeout(std::time::Duration::from_secs(600), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within 10 minutes; logs in {}", work.path().display()))
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{stderr}\nrelay log:\n{}",
        tail(&work.path().join("relay.log"))
    );
    assert!(stdout.contains(done), "{stdout}\n{stderr}");
}
