//! Every command is acknowledged by the relay and later answered by the device with the same
//! correlationID; a command whose deadline passes gets `command_timeout`.

mod common;
use common::*;
use serde_json::json;

#[tokio::test]
async fn ack_then_result_or_timeout() {
    let r = start_relay_with(|c| c.command_timeout = 0.5).await;
    let secret = r.create_device("boat-1", "default");
    let mut dev = r.device("boat-1", &secret).await;
    let mut p = r.operator(&r.admin_key).await;

    p.send(json!({"type":"reload_config","correlationID":"r1","clientID":"boat-1","payload":{}})).await;
    let ack = p.recv_type("ack").await;
    assert_eq!((ack["correlationID"].as_str(), ack["payload"]["status"].as_str()), (Some("r1"), Some("delivered")));
    assert_eq!(dev.recv_type("reload_config").await["correlationID"], "r1");
    dev.send(json!({"type":"command_result","correlationID":"r1","payload":{"ok":true}})).await;
    assert_eq!(p.recv_type("command_result").await["payload"]["ok"], true);

    // No answer: the deadline (COMMAND_TIMEOUT, 0.5 s here) passes.
    p.send(json!({"type":"speed_test","correlationID":"s1","clientID":"boat-1","payload":{}})).await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "delivered");
    let t = p.recv_type("error").await;
    assert_eq!(t["payload"]["code"], "command_timeout");
    assert_eq!(t["correlationID"], "s1");

    // An answered command never times out.
    p.send(json!({"type":"update_client_config","correlationID":"u1","clientID":"boat-1","payload":{"config":{}}}))
        .await;
    p.recv_type("ack").await;
    dev.send(json!({"type":"command_result","correlationID":"u1","payload":{"ok":false,"error":"invalid logLevel"}}))
        .await;
    assert_eq!(p.recv_type("command_result").await["payload"]["error"], "invalid logLevel");
    assert!(p.try_recv(std::time::Duration::from_millis(2500)).await.is_none(), "no timeout after a result");
    r.stop().await;
}
