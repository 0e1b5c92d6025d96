//! The relay checks each stream's sequence and tells pilots what it saw.

mod common;
use common::*;
use relay::store::OperatorRole;
use serde_json::json;

#[tokio::test]
async fn skipped_sequence_is_reported_as_gap_and_counted() {
    let r = start_relay().await;
    let (mut dev, mut p) = r.boat_and_pilot().await;

    for seq in [1u64, 2, 5, 5, 4, 6] {
        dev.telemetry(seq, now_ms(), json!({})).await;
    }
    let mut verdicts = vec![];
    for _ in 0..6 {
        let f = p.recv_type("telemetry").await;
        let rel = &f["payload"]["relay"];
        verdicts.push((
            f["payload"]["sequence"].as_u64().unwrap(),
            rel["verdict"].as_str().unwrap().to_owned(),
            rel["missing"].as_u64(),
            rel["lostTotal"].as_u64().unwrap(),
        ));
    }
    assert_eq!(
        verdicts,
        vec![
            (1, "ok".into(), None, 0),
            (2, "ok".into(), None, 0),
            (5, "gap".into(), Some(2), 2),
            (5, "duplicate".into(), None, 2),
            (4, "reordered".into(), None, 1),
            (6, "ok".into(), None, 1),
        ]
    );
    let metrics = reqwest::get(r.http("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tether_sequence_gaps_total 1"), "{metrics}");
    assert!(metrics.contains("tether_sequence_missing_total 2"));
    assert!(metrics.contains("tether_sequence_duplicates_total 1"));
    r.stop().await;
}

#[tokio::test]
async fn streams_are_checked_separately_and_epoch_change_is_a_reset() {
    let r = start_relay().await;
    let (mut dev, mut p) = r.boat_and_pilot().await;
    let frame = |stream: &str, seq: u64, epoch: &str| json!({"type":"telemetry","payload":{"stream":stream,"sequence":seq,"timestamp":now_ms(),"epoch":epoch,"data":{}}});
    dev.send(frame("gps", 10, "a")).await;
    dev.send(frame("imu", 500, "a")).await;
    dev.send(frame("gps", 11, "a")).await;
    dev.send(frame("gps", 0, "b")).await;
    let got: Vec<_> = futures_collect(&mut p, 4).await;
    assert_eq!(got, vec!["gps:ok", "imu:ok", "gps:ok", "gps:reset"]);
    r.stop().await;
}

async fn futures_collect(p: &mut Client, n: usize) -> Vec<String> {
    let mut out = vec![];
    for _ in 0..n {
        let f = p.recv_type("telemetry").await;
        let rel = &f["payload"]["relay"];
        out.push(format!("{}:{}", rel["stream"].as_str().unwrap(), rel["verdict"].as_str().unwrap()));
    }
    out
}

#[tokio::test]
async fn sequence_state_survives_a_reconnect() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut p = r.operator(&key).await;
    subscribe(&mut p, "boat-1").await;
    let mut dev = r.device("boat-1", &secret).await;
    dev.telemetry(1, now_ms(), json!({})).await;
    p.recv_type("telemetry").await;
    drop(dev);
    let mut dev = r.device("boat-1", &secret).await;
    dev.telemetry(4, now_ms(), json!({})).await;
    let f = p.recv_type("telemetry").await;
    assert_eq!(f["payload"]["relay"]["verdict"], "gap");
    assert_eq!(f["payload"]["relay"]["missing"], 2);
    r.stop().await;
}
