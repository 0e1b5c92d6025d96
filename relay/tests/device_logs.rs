//! A device's `log` lines reach only the subscribers that asked for them with `logs: true`, on
//! the telemetry lane; `unsubscribe` ends them and subscribing again changes the choice.

mod common;
use std::time::Duration;

use common::*;
use relay::store::OperatorRole;
use serde_json::{Value, json};

fn log(line: &str) -> Value {
    json!({"type":"log","payload":{"process":"ros","stream":"stdout","line":line,"timestamp":1732262400000u64}})
}

async fn subscribe_logs(c: &mut Client, logs: bool) {
    c.send(json!({"type":"subscribe","payload":{"deviceID":"boat-1","replay":false,"logs":logs}})).await;
    c.recv_type("subscribed").await;
}

/// Receives up to the next telemetry frame (the marker) and returns the log lines before it.
async fn logs_before_marker(c: &mut Client) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let m = c.recv().await;
        match m["type"].as_str() {
            Some("telemetry") => return lines,
            Some("log") => lines.push(m["payload"]["line"].as_str().unwrap().to_owned()),
            _ => {}
        }
    }
}

#[tokio::test]
async fn logs_only_for_subscribers_that_asked() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let mut dev = r.device("boat-1", &secret).await;
    let mut ana = r.operator(&r.create_operator("ana", "default", OperatorRole::Pilot)).await;
    let mut ben = r.operator(&r.create_operator("ben", "default", OperatorRole::Pilot)).await;
    subscribe_logs(&mut ana, true).await;
    subscribe_logs(&mut ben, false).await;

    // Log lines and telemetry share the telemetry lane, in order: a frame sent after the
    // lines is a marker that everything before it has been delivered.
    dev.send(log("starting")).await;
    dev.send(log("ready")).await;
    dev.telemetry(1, now_ms(), json!({})).await;
    assert_eq!(logs_before_marker(&mut ana).await, vec!["starting", "ready"]);
    assert!(logs_before_marker(&mut ben).await.is_empty(), "ben did not ask for logs");

    let m = {
        dev.send(log("one more")).await;
        ana.recv_type("log").await
    };
    assert_eq!(m["from"], "boat-1");
    assert_eq!(m["payload"]["process"], "ros");
    assert_eq!(m["payload"]["stream"], "stdout");

    // Subscribing again changes the choice both ways.
    subscribe_logs(&mut ana, false).await;
    subscribe_logs(&mut ben, true).await;
    dev.send(log("swapped")).await;
    dev.telemetry(2, now_ms(), json!({})).await;
    assert!(logs_before_marker(&mut ana).await.is_empty());
    assert_eq!(logs_before_marker(&mut ben).await, vec!["swapped"]);

    // Unsubscribing ends logs with the rest.
    ben.send(json!({"type":"unsubscribe","payload":{"deviceID":"boat-1"}})).await;
    ben.recv_type("unsubscribed").await;
    dev.send(log("after")).await;
    dev.telemetry(3, now_ms(), json!({})).await;
    assert!(logs_before_marker(&mut ana).await.is_empty());
    assert!(ben.try_recv(Duration::from_millis(300)).await.is_none());
    r.stop().await;
}

#[tokio::test]
async fn operators_cannot_send_logs() {
    let r = start_relay().await;
    let (_dev, mut ana) = r.boat_and_pilot().await;
    let mut l = log("forged");
    l["correlationID"] = json!("l");
    ana.send(l).await;
    let e = ana.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "not_allowed");
    assert_eq!(e["correlationID"], "l");
    r.stop().await;
}
