//! `docker_command` is a request like `execute_command`: it needs `admin` on the device, is
//! stamped with `from` and acknowledged `delivered`, has a result deadline, and is never queued
//! for an offline device.

mod common;
use common::*;
use serde_json::json;

fn docker(corr: &str, action: &str) -> serde_json::Value {
    json!({"type":"docker_command","correlationID":corr,"clientID":"boat-1","from":"forged",
        "payload":{"action":action,"container":"camera"}})
}

#[tokio::test]
async fn routed_to_the_device_and_answered_with_command_result() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_pilot("ana", Some("admin"));
    let mut dev = r.device("boat-1", &secret).await;
    let mut p = r.operator(&key).await;

    p.send(docker("d1", "restart")).await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "delivered");
    let req = dev.recv_type("docker_command").await;
    assert_eq!(req["from"], "op-ana");
    assert_eq!(req["correlationID"], "d1");
    assert_eq!(req["payload"], json!({"action":"restart","container":"camera"}));

    dev.send(json!({"type":"command_result","correlationID":"d1",
        "payload":{"ok":false,"error":"docker is not installed","code":"unsupported"}}))
        .await;
    let res = p.recv_type("command_result").await;
    assert_eq!(res["from"], "boat-1");
    assert_eq!(res["payload"]["code"], "unsupported");
    r.stop().await;
}

#[tokio::test]
async fn needs_admin_level_and_is_not_queued() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let viewer = r.create_pilot("vic", Some("control"));
    let mut v = r.operator(&viewer).await;
    let mut admin = r.operator(&r.admin_key).await;

    v.send(docker("d2", "stop")).await;
    let e = v.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "forbidden", "{e}");
    assert_eq!(e["correlationID"], "d2");

    admin.send(docker("d3", "list")).await;
    let e = admin.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "target_offline", "{e}");
    assert_eq!(e["correlationID"], "d3");

    // Nothing was stored: the device sees neither request when it connects.
    let mut dev = r.device("boat-1", &secret).await;
    dev.send(json!({"type":"ping","correlationID":"p"})).await;
    let next = dev.recv().await;
    assert_eq!(next["type"], "pong", "{next}");

    // And devices cannot send it.
    dev.send(json!({"type":"docker_command","correlationID":"x","clientID":"boat-1","payload":{"action":"list"}}))
        .await;
    assert_eq!(dev.recv_type("error").await["payload"]["code"], "not_allowed");
    r.stop().await;
}

#[tokio::test]
async fn an_unanswered_docker_command_times_out() {
    let r = start_relay_with(|c| c.command_timeout = 0.5).await;
    let secret = r.create_device("boat-1", "default");
    let mut dev = r.device("boat-1", &secret).await;
    let mut p = r.operator(&r.admin_key).await;
    p.send(docker("d4", "start")).await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "delivered");
    dev.recv_type("docker_command").await;
    let t = p.recv_type("error").await;
    assert_eq!(t["payload"]["code"], "command_timeout");
    assert_eq!(t["correlationID"], "d4");
    r.stop().await;
}
