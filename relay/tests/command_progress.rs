//! `command_progress` travels like a reply, but it neither answers the request (its deadline
//! stays) nor clears a queued copy of it; the final `command_output` still arrives.

mod common;
use std::time::Duration;

use common::*;
use relay::store::OperatorRole;
use serde_json::json;

#[tokio::test]
async fn progress_reaches_the_requester_before_the_output() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let other = r.create_operator("ben", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    let mut p = r.operator(&key).await;
    let mut bystander = r.operator(&other).await;

    p.send(json!({"type":"execute_command","correlationID":"cmd-1","clientID":"boat-1",
        "payload":{"command":"ping","args":["-c","2","10.0.0.1"]}}))
        .await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "delivered");
    dev.recv_type("execute_command").await;

    for (offset, data) in [(0, "PING 10.0.0.1\n"), (14, "64 bytes from 10.0.0.1\n")] {
        dev.send(json!({"type":"command_progress","correlationID":"cmd-1",
            "payload":{"stream":"stdout","data":data,"offset":offset}}))
            .await;
        let prog = p.recv_type("command_progress").await;
        assert_eq!(prog["from"], "boat-1");
        assert_eq!(prog["correlationID"], "cmd-1");
        assert_eq!(prog["clientID"], "op-ana");
        assert_eq!(prog["payload"], json!({"stream":"stdout","data":data,"offset":offset}));
    }
    // Progress naming its recipient works too.
    dev.send(json!({"type":"command_progress","correlationID":"cmd-1","clientID":"op-ana",
        "payload":{"stream":"stderr","data":"warning\n","offset":0}}))
        .await;
    assert_eq!(p.recv_type("command_progress").await["payload"]["stream"], "stderr");

    dev.send(json!({"type":"command_output","correlationID":"cmd-1",
        "payload":{"stdout":"PING 10.0.0.1\n64 bytes from 10.0.0.1\n","stderr":"warning\n","exitCode":0,"durationMs":1002}}))
        .await;
    let out = p.recv_type("command_output").await;
    assert_eq!(out["payload"]["exitCode"], 0);
    assert!(bystander.try_recv(Duration::from_millis(300)).await.is_none(), "progress is never broadcast");

    // Progress nobody asked for is refused like any unrouted reply.
    dev.send(json!({"type":"command_progress","correlationID":"never-sent",
        "payload":{"stream":"stdout","data":"x","offset":0}}))
        .await;
    assert_eq!(dev.recv_type("error").await["payload"]["code"], "unknown_target");
    r.stop().await;
}

#[tokio::test]
async fn the_deadline_still_fires_after_progress_without_output() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let mut dev = r.device("boat-1", &secret).await;
    let mut p = r.operator(&r.admin_key).await;

    // timeoutMs 1: the relay's deadline is 1 ms + its 5 s grace, time enough for the chunk.
    p.send(json!({"type":"execute_command","correlationID":"cmd-2","clientID":"boat-1",
        "payload":{"command":"sleep","args":["60"],"timeoutMs":1}}))
        .await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "delivered");
    dev.recv_type("execute_command").await;
    dev.send(json!({"type":"command_progress","correlationID":"cmd-2",
        "payload":{"stream":"stdout","data":"still going\n","offset":0}}))
        .await;
    assert_eq!(p.recv_type("command_progress").await["correlationID"], "cmd-2");
    let t = p.recv_type("error").await;
    assert_eq!(t["payload"]["code"], "command_timeout", "{t}");
    assert_eq!(t["correlationID"], "cmd-2");
    r.stop().await;
}

#[tokio::test]
async fn progress_does_not_clear_a_queued_request() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let mut p = r.operator(&r.admin_key).await;

    p.send(
        json!({"type":"execute_command","correlationID":"cmd-q","clientID":"boat-1","payload":{"command":"uptime"}}),
    )
    .await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "queued");

    let mut dev = r.device("boat-1", &secret).await;
    let req = dev.recv_type("execute_command").await;
    assert_eq!(req["_offline_queued"], true);
    dev.send(json!({"type":"command_progress","correlationID":"cmd-q",
        "payload":{"stream":"stdout","data":"up 3 days\n","offset":0}}))
        .await;
    assert_eq!(p.recv_type("command_progress").await["payload"]["data"], "up 3 days\n");
    drop(dev);

    // Still unanswered: delivered again on the next connection.
    let mut dev = r.device("boat-1", &secret).await;
    let again = dev.recv_type("execute_command").await;
    assert_eq!(again["correlationID"], "cmd-q");
    dev.send(json!({"type":"command_output","correlationID":"cmd-q","payload":{"stdout":"up 3 days\n","exitCode":0}}))
        .await;
    // The relay clears the queued copy before it forwards the output.
    assert_eq!(p.recv_type("command_output").await["payload"]["exitCode"], 0);
    drop(dev);

    let mut dev = r.device("boat-1", &secret).await;
    dev.send(json!({"type":"ping","correlationID":"after"})).await;
    let next = dev.recv().await;
    assert_eq!(next["type"], "pong", "nothing queued any more: {next}");
    r.stop().await;
}

#[tokio::test]
async fn only_devices_send_progress() {
    let r = start_relay().await;
    r.create_device("boat-1", "default");
    let mut p = r.operator(&r.admin_key).await;
    p.send(json!({"type":"command_progress","correlationID":"x","clientID":"boat-1",
        "payload":{"stream":"stdout","data":"x","offset":0}}))
        .await;
    let e = p.recv_type("error").await;
    assert_eq!(e["payload"]["code"], "not_allowed");
    assert_eq!(e["correlationID"], "x");
    r.stop().await;
}
