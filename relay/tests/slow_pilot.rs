//! A pilot that stops reading does not delay the device or the other pilot: its telemetry is
//! dropped oldest-first (counted and reported), while everyone else gets every frame.

mod common;
use std::time::Duration;

use common::*;
use relay::store::OperatorRole;
use serde_json::json;

#[tokio::test]
async fn a_stalled_pilot_sheds_frames_while_the_other_gets_all() {
    let r = start_relay_with(|c| {
        c.telemetry_queue = 16;
        // This test floods on purpose; rate limits are tested in rate_limits.rs.
        c.bytes_per_second = 1 << 30;
        c.messages_per_second = 100_000;
    })
    .await;
    let secret = r.create_device("boat-1", "default");
    let k1 = r.create_operator("fast", "default", OperatorRole::Pilot);
    let k2 = r.create_operator("stuck", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    let mut fast = r.operator(&k1).await;
    let mut stuck = r.operator(&k2).await;
    subscribe(&mut fast, "boat-1").await;
    subscribe(&mut stuck, "boat-1").await;
    // From here on `stuck` reads nothing. 400 frames of 32 KiB (about 13 MB) is far more than
    // the kernel's socket buffers hold, so the relay's writer for `stuck` blocks.
    let blob = "z".repeat(32 * 1024);
    const N: u64 = 400;
    let reader = tokio::spawn(async move {
        for seq in 1..=N {
            let f = fast.recv_type("telemetry").await;
            assert_eq!(f["payload"]["sequence"], seq, "the reading pilot sees every frame in order");
            assert_eq!(f["payload"]["relay"]["verdict"], "ok");
        }
        fast
    });
    for seq in 1..=N {
        dev.telemetry(seq, now_ms(), json!({ "blob": blob })).await;
    }
    // The device is never blocked: a round trip through the relay still answers promptly.
    dev.send(json!({"type":"ping","payload":{}})).await;
    dev.recv_type("pong").await;
    let _fast =
        tokio::time::timeout(Duration::from_secs(60), reader).await.expect("the reading pilot got all frames").unwrap();

    let metrics = reqwest::get(r.http("/metrics")).await.unwrap().text().await.unwrap();
    let dropped: u64 =
        metrics.lines().find_map(|l| l.strip_prefix("tether_telemetry_dropped_total ")).unwrap().parse().unwrap();
    assert!(dropped > 0, "frames for the stalled pilot were dropped, not queued forever");

    // When the stalled pilot reads again it is told how many frames it lost before the next one.
    let mut saw_notice = false;
    let mut last_seq = 0;
    while let Some(m) = stuck.try_recv(Duration::from_secs(2)).await {
        match m["type"].as_str().unwrap() {
            "telemetry_dropped" => {
                saw_notice = true;
                assert!(m["payload"]["count"].as_u64().unwrap() > 0);
            }
            "telemetry" => last_seq = m["payload"]["sequence"].as_u64().unwrap(),
            _ => {}
        }
    }
    assert!(saw_notice, "the stalled pilot is told about the drop");
    assert_eq!(last_seq, N, "what it does get ends with the newest frame");
    r.stop().await;
}
