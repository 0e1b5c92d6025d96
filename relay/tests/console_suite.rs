//! The console's browser suite (client-web/e2e/suite.mjs): everything a pilot and a fleet admin
//! do, in Debian's chromium driven by playwright-core, against the real `tether-relay` binary
//! (restarted once under the console), the real agent streaming its test pattern, a second
//! agent onboarding with a handshake key, and the simulated boat (`tether-boat`) answering
//! waypoints and teleop on the agent's local socket. The suite lists its steps; screenshots
//! of every screen land in target/screenshots/console-suite/. `make test` installs chromium
//! and playwright-core (see .ci/install-deps.sh).

mod common;
use std::path::PathBuf;
use std::time::Duration;

use common::browser::*;

#[tokio::test]
async fn the_console_does_what_pilots_and_admins_do() {
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
    let shots = root.join("target/screenshots/console-suite");
    let _ = std::fs::remove_dir_all(&shots);
    let run = tokio::process::Command::new("node")
        .arg(e2e.join("suite.mjs"))
        .env("RELAY_BIN", env!("CARGO_BIN_EXE_tether-relay"))
        .env("DEVICE_BIN", &device)
        .env("BOAT_BIN", &boat)
        .env("WORK", work.path())
        .env("SHOTS", &shots)
        .env("HOST_IP", ip.to_string())
        .kill_on_drop(true)
        .output();
    // The suite has its own deadlines per step; this only guards against a hung browser.
    let out = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .unwrap_or_else(|_| {
            panic!("the console suite did not finish within 10 minutes; logs in {}", work.path().display())
        })
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the console suite failed:\n{stdout}\n{stderr}\nrelay log:\n{}",
        tail(&work.path().join("relay.log"))
    );
    assert!(stdout.contains("console suite: all steps passed"), "{stdout}\n{stderr}");
}
