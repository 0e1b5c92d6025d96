//! `process_command` and `get_client_config` are requests like `docker_command`: they need
//! `admin` on the device, are stamped with `from` and acknowledged `delivered`, have a result
//! deadline, and are never queued for an offline device.

mod common;
use common::*;
use serde_json::{Value, json};

fn process(corr: &str, action: &str) -> Value {
    json!({"type":"process_command","correlationID":corr,"clientID":"boat-1","from":"forged",
        "payload":{"action":action,"name":"camera"}})
}

fn get_config(corr: &str) -> Value {
    json!({"type":"get_client_config","correlationID":corr,"clientID":"boat-1","payload":{}})
}

#[tokio::test]
async fn routed_to_the_device_and_answered_with_command_result() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_pilot("ana", Some("admin"));
    let mut dev = r.device("boat-1", &secret).await;
    let mut p = r.operator(&key).await;

    p.send(process("p1", "restart")).await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "delivered");
    let req = dev.recv_type("process_command").await;
    assert_eq!(req["from"], "op-ana");
    assert_eq!(req["correlationID"], "p1");
    assert_eq!(req["payload"], json!({"action":"restart","name":"camera"}));
    dev.send(json!({"type":"command_result","correlationID":"p1",
        "payload":{"ok":false,"error":"no supervised process is named \"camera\" (known: ros)","code":"unknown_process"}}))
        .await;
    let res = p.recv_type("command_result").await;
    assert_eq!(res["from"], "boat-1");
    assert_eq!(res["payload"]["code"], "unknown_process", "a code the relay accepts: {res}");

    p.send(get_config("g1")).await;
    assert_eq!(p.recv_type("ack").await["payload"]["status"], "delivered");
    let req = dev.recv_type("get_client_config").await;
    assert_eq!((req["from"].as_str(), req["correlationID"].as_str()), (Some("op-ana"), Some("g1")));
    dev.send(json!({"type":"command_result","correlationID":"g1",
        "payload":{"ok":true,"data":{"config":{"clientSecret":"<redacted>"},"protected":["clientSecret"]}}}))
        .await;
    let res = p.recv_type("command_result").await;
    assert_eq!(res["payload"]["data"]["config"]["clientSecret"], "<redacted>");
    r.stop().await;
}

#[tokio::test]
async fn need_admin_level_and_are_not_queued() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let controller = r.create_pilot("vic", Some("control"));
    let mut v = r.operator(&controller).await;
    let mut admin = r.operator(&r.admin_key).await;

    for m in [process("f1", "stop"), get_config("f2")] {
        v.send(m.clone()).await;
        let e = v.recv_type("error").await;
        assert_eq!(e["payload"]["code"], "forbidden", "{e}");
        assert_eq!(e["correlationID"], m["correlationID"]);
        assert!(e["payload"]["message"].as_str().unwrap().contains("needs admin"), "{e}");

        let mut m = m;
        m["correlationID"] = json!(format!("{}-admin", m["correlationID"].as_str().unwrap()));
        admin.send(m.clone()).await;
        let e = admin.recv_type("error").await;
        assert_eq!(e["payload"]["code"], "target_offline", "{e}");
        assert_eq!(e["correlationID"], m["correlationID"]);
    }

    // Nothing was stored: the device sees none of them when it connects.
    let mut dev = r.device("boat-1", &secret).await;
    dev.send(json!({"type":"ping","correlationID":"p"})).await;
    let next = dev.recv().await;
    assert_eq!(next["type"], "pong", "{next}");

    // And devices cannot send them.
    dev.send(process("x", "start")).await;
    assert_eq!(dev.recv_type("error").await["payload"]["code"], "not_allowed");
    dev.send(get_config("y")).await;
    assert_eq!(dev.recv_type("error").await["payload"]["code"], "not_allowed");
    r.stop().await;
}

#[tokio::test]
async fn an_unanswered_request_times_out() {
    let r = start_relay_with(|c| c.command_timeout = 0.5).await;
    let secret = r.create_device("boat-1", "default");
    let mut dev = r.device("boat-1", &secret).await;
    let mut p = r.operator(&r.admin_key).await;
    for (m, ty) in [(process("t1", "stop"), "process_command"), (get_config("t2"), "get_client_config")] {
        p.send(m.clone()).await;
        assert_eq!(p.recv_type("ack").await["payload"]["status"], "delivered");
        dev.recv_type(ty).await;
        let t = p.recv_type("error").await;
        assert_eq!(t["payload"]["code"], "command_timeout");
        assert_eq!(t["correlationID"], m["correlationID"]);
    }
    r.stop().await;
}
