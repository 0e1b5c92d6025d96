//! The pilot CLI, run as a real binary against a real relay and the real device agent binary.

use std::process::Stdio;
use std::time::Duration;

use relay::RelayConfig;
use relay::store::{OperatorRole, q};

#[tokio::test]
async fn pilot_cli_prints_verdicts_and_ages_of_the_simulated_boat() {
    let dir = tempfile::tempdir().unwrap();
    let running = relay::start(RelayConfig {
        port: 0,
        bind: "127.0.0.1".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        admin_key: Some("tk_admin_0123456789abcdef".into()),
        ..RelayConfig::default()
    })
    .await
    .unwrap();
    let (secret, key) = running
        .relay
        .store
        .call_sync(|c| {
            let s = relay::auth::issue_device_sync(c, "demo-boat", "default", "Demo boat")?;
            q::create_operator(c, "op-p", "default", "pilot", OperatorRole::Pilot)?;
            q::set_permission(c, "op-p", "org", "view")?;
            Ok((s, relay::auth::issue_api_key_sync(c, "op-p", None)?))
        })
        .unwrap();
    // The agent runs in-process here (the same library the tether-device binary runs; the
    // device crate's own tests run the binary).
    let agent_config = device::Config::parse(
        &format!(
            "serverAddress: \"ws://{}/ws\"\nclientID: demo-boat\nclientSecret: \"{secret}\"\ntelemetry:\n  rateHz: 20\n  simulator: true\n  systemMetrics: false\n  udp: \"\"\n  unixSocket: \"\"\n",
            running.addr
        ),
        "test",
    )
    .unwrap();
    let (stop_agent, cancel) = device::link::tokio_util_shim::cancel_pair();
    let agent = tokio::spawn(async move { device::Agent::new(agent_config).run(cancel).await });

    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tether-pilot"))
            .args(["--relay", &format!("http://{}", running.addr), "--api-key", &key, "--device", "demo-boat"])
            .args(["--count", "40"])
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .output(),
    )
    .await
    .expect("the pilot printed 40 frames in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pilot failed: {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("[replay]")).collect();
    assert_eq!(lines.len(), 40, "{stdout}");
    assert!(lines.iter().all(|l| l.starts_with("demo-boat sensor_data seq=")), "{stdout}");
    assert!(lines.iter().all(|l| l.contains("verdict=ok")), "{stdout}");
    assert!(lines.iter().all(|l| l.contains(" pos=37.")), "{stdout}");
    // The relay syncs clocks within the first second, so the last frames carry an age.
    let last = lines.last().unwrap();
    assert!(!last.contains("age=—") && last.contains("ms offset="), "{last}");

    // A wrong key gets a clear message and a failing exit status.
    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether-pilot"))
        .args(["--relay", &format!("http://{}", running.addr), "--api-key", "tk_x_y", "--device", "demo-boat"])
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("ticket refused"));

    stop_agent.cancel();
    assert!(agent.await.unwrap().is_ok());
    running.shutdown(Duration::from_secs(5)).await;
}
