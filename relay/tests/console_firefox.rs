//! The console in Firefox (client-web/e2e/firefox.mjs): Debian's firefox-esr driven by
//! playwright-core over WebDriver BiDi against the real `tether-relay` binary, the real agent
//! streaming its test pattern on its default `video.codec` (`auto`), which must answer Firefox in
//! VP8 (Firefox decodes H.264 only through the OpenH264 plugin it downloads at run time, so it
//! offers none here), and the simulated boat (`tether-boat`). Login, fleet, VP8 video, telemetry
//! and plots, track, the control lease, waypoints, teleop, a command, the log console, the STALE
//! banner while the agent is frozen, a pilot's password login; any error a page reports fails it.
//! Screenshots land in target/screenshots/console-firefox/. `make test` installs firefox-esr and
//! playwright-core (see .ci/install-deps.sh); FIREFOX names another Firefox binary.

mod common;
use std::path::PathBuf;
use std::time::Duration;

use common::browser::*;

#[tokio::test]
async fn the_console_works_in_firefox() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let e2e = root.join("client-web/e2e");
    assert!(
        e2e.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `make deps` (or `make test`)"
    );
    let firefox = std::env::var_os("FIREFOX").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/firefox-esr".into());
    assert!(
        firefox.exists(),
        "{} is missing: run `make deps` (installs Debian's firefox-esr) or set FIREFOX",
        firefox.display()
    );
    let ip = interface_address();
    let device = workspace_binary(&root, "tether-device", "tether-device", AGENT_SOURCES);
    let boat = workspace_binary(&root, "tether-examples", "tether-boat", BOAT_SOURCES);
    let work = tempfile::tempdir().unwrap();
    let shots = root.join("target/screenshots/console-firefox");
    let _ = std::fs::remove_dir_all(&shots);
    let run = tokio::process::Command::new("node")
        .arg(e2e.join("firefox.mjs"))
        .env("RELAY_BIN", env!("CARGO_BIN_EXE_tether-relay"))
        .env("DEVICE_BIN", &device)
        .env("BOAT_BIN", &boat)
        .env("WORK", work.path())
        .env("SHOTS", &shots)
        .env("HOST_IP", ip.to_string())
        .env("FIREFOX", &firefox)
        .kill_on_drop(true)
        .output();
    // The run has its own deadlines per step; this only guards against a hung browser.
    let out = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .unwrap_or_else(|_| {
            panic!("the Firefox run did not finish within 10 minutes; logs in {}", work.path().display())
        })
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the console failed in Firefox:\n{stdout}\n{stderr}\nrelay log:\n{}",
        tail(&work.path().join("relay.log"))
    );
    assert!(stdout.contains("console in firefox: all steps passed"), "{stdout}\n{stderr}");
}
