//! The console in a real browser (Debian's chromium driven by playwright-core from
//! client-web/e2e): log in with a key, see the device in the fleet, watch live telemetry with
//! sequence verdicts and ages. Screenshots land in target/screenshots/console/.
//! `make test` installs chromium and playwright-core (see .ci/install-deps.sh).

mod common;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn console_logs_in_and_shows_live_telemetry() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let e2e = root.join("client-web/e2e");
    assert!(
        e2e.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `make deps` (or `make test`)"
    );
    let r = start_relay_with(|c| c.ping_interval = 1.0).await;
    let secret = r.create_device("boat-1", "default");
    let mut dev = r.device("boat-1", &secret).await;
    // A device publishing at 10 Hz and answering clock sync, until the test ends.
    let publisher = tokio::spawn(async move {
        let mut seq = 0u64;
        loop {
            seq += 1;
            dev.telemetry(seq, now_ms().floor(), json!({"gps":{"latitude":37.8 + seq as f64 * 1e-5,"longitude":-122.41,"heading":90.0,"speed":2.5},"battery":{"percent":90.0}})).await;
            // Reading answers the relay's time_sync requests.
            let _ = dev.try_recv(Duration::from_millis(100)).await;
        }
    });
    let shots = root.join("target/screenshots/console");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("node")
            .arg(e2e.join("console.mjs"))
            .arg(r.http("/"))
            .arg(&r.admin_key)
            .arg("boat-1")
            .arg(&shots)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("browser test finished in time")
    .expect("node runs");
    publisher.abort();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "browser test failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("console e2e: all steps passed"), "{stdout}");
    r.stop().await;
}
