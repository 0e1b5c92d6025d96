//! Messages for an offline device are stored and delivered in order at its next login,
//! marked `_offline_queued`; a full queue or an expired message is reported, never silent.

mod common;
use std::time::Duration;

use common::*;
use serde_json::json;

fn cmd(corr: &str, n: u32) -> serde_json::Value {
    json!({"type":"execute_command","correlationID":corr,"clientID":"boat-1","payload":{"command":"echo","args":[n.to_string()]}})
}

#[tokio::test]
async fn queued_in_order_delivered_at_login_and_answered() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let mut p = r.operator(&r.admin_key).await;
    for i in 1..=3 {
        p.send(cmd(&format!("q{i}"), i)).await;
        let ack = p.recv_type("ack").await;
        assert_eq!(ack["correlationID"], format!("q{i}"));
        assert_eq!(ack["payload"]["status"], "queued");
        assert_eq!(ack["payload"]["queueDepth"], i);
    }
    // App commands queue too; signaling does not.
    let mut dev = r.device("boat-1", &secret).await;
    for i in 1..=3 {
        let m = dev.recv_type("execute_command").await;
        assert_eq!(m["_offline_queued"], true);
        assert_eq!(m["correlationID"], format!("q{i}"), "in order");
        assert_eq!(
            m["from"],
            r.running().relay.store.call_sync(|c| Ok(relay::store::q::find_operator(c, "admin")?.unwrap().id)).unwrap()
        );
    }
    // The device's answer reaches the sender, and the queue entry is done.
    dev.send(
        json!({"type":"command_output","correlationID":"q2","payload":{"stdout":"2\n","exitCode":0,"durationMs":1}}),
    )
    .await;
    let out = p.recv_type("command_output").await;
    assert_eq!(out["correlationID"], "q2");
    // A later command goes straight through.
    p.send(cmd("live", 9)).await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "delivered");
    assert!(dev.recv_type("execute_command").await.get("_offline_queued").is_none());
    // Unanswered queued commands come again at the next login (the device de-duplicates by
    // correlationID); the answered one does not.
    drop(dev);
    let mut dev = r.device("boat-1", &secret).await;
    let again: Vec<String> = vec![dev.recv_type("execute_command").await, dev.recv_type("execute_command").await]
        .into_iter()
        .map(|m| m["correlationID"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(again, vec!["q1", "q3"]);
    r.stop().await;
}

#[tokio::test]
async fn a_full_queue_and_an_expired_message_are_reported() {
    let r = start_relay_with(|c| {
        c.queue_limit = 2;
        c.queue_ttl = 1.0;
    })
    .await;
    r.create_device("boat-1", "default");
    let mut p = r.operator(&r.admin_key).await;
    for i in 1..=2 {
        p.send(cmd(&format!("q{i}"), i)).await;
        assert_eq!(p.recv_type("ack").await["payload"]["status"], "queued");
    }
    p.send(cmd("q3", 3)).await;
    let e = p.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "queue_full");
    assert_eq!(e["correlationID"], "q3");
    // After the TTL the sender hears about each expired message.
    let mut expired = vec![];
    while expired.len() < 2 {
        let m = p.recv_type("error").await;
        assert_eq!(m["payload"]["code"], "expired", "{m}");
        expired.push(m["correlationID"].as_str().unwrap().to_owned());
    }
    expired.sort();
    assert_eq!(expired, vec!["q1", "q2"]);
    r.stop().await;
}

#[tokio::test]
async fn per_org_limits_apply() {
    let r = start_relay().await;
    r.create_device("boat-1", "default");
    let (s, _) = admin_call(&r, reqwest::Method::PUT, "/api/org/queue", Some(json!({"limit":1,"ttlSecs":3600}))).await;
    assert_eq!(s, 200);
    let mut p = r.operator(&r.admin_key).await;
    p.send(cmd("a", 1)).await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "queued");
    p.send(cmd("b", 2)).await;
    assert_eq!(p.recv_type("error").await["payload"]["code"], "queue_full");
    // A device's own override wins over its org's.
    let (s, _) = admin_call(&r, reqwest::Method::PUT, "/api/limits/boat-1", Some(json!({"queueLimit":3}))).await;
    assert_eq!(s, 200);
    for c in ["b", "c"] {
        p.send(cmd(c, 2)).await;
        assert_eq!(p.recv_type("ack").await["payload"]["status"], "queued");
    }
    p.send(cmd("d", 2)).await;
    assert_eq!(p.recv_type("error").await["payload"]["code"], "queue_full");
    let _ = Duration::ZERO;
    r.stop().await;
}

/// `"queue": false` (teleop: a stick command must never arrive late): an offline device gives
/// `target_offline` at once and nothing is stored; the same request without it is queued, and
/// only that one reaches the device at its login.
#[tokio::test]
async fn a_request_that_refuses_the_queue_is_not_stored() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let mut p = r.operator(&r.admin_key).await;
    p.send(json!({"type":"lease_acquire","correlationID":"l1","payload":{"deviceID":"boat-1"}})).await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "ok");
    let teleop = |corr: &str, queue: Option<bool>| {
        let mut payload = json!({"command":"teleop","data":{"throttle":0.5,"rudder":0.0}});
        if let Some(q) = queue {
            payload["queue"] = json!(q);
        }
        json!({"type":"app_command","correlationID":corr,"clientID":"boat-1","payload":payload})
    };
    p.send(teleop("t1", Some(false))).await;
    let err = p.recv_type("error").await;
    assert_eq!(err["correlationID"], "t1");
    assert_eq!(err["payload"]["code"], "target_offline", "{err}");
    p.send(teleop("t2", Some(true))).await;
    let ack = p.recv_type("ack").await;
    assert_eq!((ack["correlationID"].as_str(), ack["payload"]["status"].as_str()), (Some("t2"), Some("queued")));
    assert_eq!(ack["payload"]["queueDepth"], 1, "t1 was not stored");
    let mut dev = r.device("boat-1", &secret).await;
    let m = dev.recv_type("app_command").await;
    assert_eq!(m["correlationID"], "t2", "the refused t1 was never stored, so t2 comes first");
}
