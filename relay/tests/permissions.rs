//! Permissions: role x permission x message type, checked for every message an operator sends
//! about a device.

mod common;
use common::*;
use relay::store::OperatorRole;
use serde_json::{Value, json};

/// The message of each type that an operator may send about `boat-1`.
fn message(ty: &str) -> Value {
    let payload = match ty {
        "subscribe" | "lease_acquire" | "lease_release" | "lease_heartbeat" => json!({"deviceID":"boat-1"}),
        "webrtc" => json!({"subtype":"offer","sessionID":"s","sdp":"v=0"}),
        "app_command" => json!({"command":"set_waypoint","data":{"latitude":37.77,"longitude":-122.41}}),
        "execute_command" => json!({"command":"ls"}),
        "update_client_config" => json!({"config":{"logLevel":"debug"}}),
        "process_command" => json!({"action":"restart","name":"ros"}),
        _ => json!({}),
    };
    json!({"type": ty, "correlationID": "c", "clientID": "boat-1", "payload": payload})
}

/// Whether the relay let the message past the permission check.
async fn allowed(p: &mut Client) -> bool {
    let mut v = p.recv().await;
    // A subscription is followed by the lease state, a video offer by its `mode`
    // announcement; neither decides anything here.
    while v["type"] == "lease_state" || v["payload"]["subtype"] == "mode" {
        v = p.recv().await;
    }
    match (v["type"].as_str().unwrap(), v["payload"]["code"].as_str()) {
        ("error", Some("forbidden")) => false,
        // Past the permission check, these are the next gates; they prove access was granted.
        ("error", Some("not_controller")) | ("subscribed", _) | ("ack", _) => true,
        other => panic!("unexpected answer {other:?}: {v}"),
    }
}

#[tokio::test]
async fn every_role_and_level_against_every_device_message() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    r.create_device("boat-2", "default");
    let _dev = r.device("boat-1", &secret).await;
    // (operator, expected maximum level or None)
    let admin_role = r.admin_key.clone();
    let none = r.create_pilot("none", None);
    let view = r.create_pilot("view", Some("view"));
    let control = r.create_pilot("control", Some("control"));
    let full = r.create_pilot("full", Some("admin"));
    let dev_grant = r.create_pilot("devgrant", None);
    r.grant("devgrant", "device:boat-1", "control").await;
    let other_dev = r.create_pilot("otherdev", None);
    r.grant("otherdev", "device:boat-2", "admin").await;
    let group = r.create_pilot("group", None);
    r.grant("group", "group:harbour", "view").await;
    let (s, _) =
        admin_call(&r, reqwest::Method::PUT, "/api/devices/boat-1/group", Some(json!({"group":"harbour"}))).await;
    assert_eq!(s, 200);
    // The device list shows each device's group (null without one).
    let (_, list) = r.get_json("/api/devices", Some(&r.admin_key)).await;
    let group_of =
        |id: &str| list["devices"].as_array().unwrap().iter().find(|d| d["id"] == id).unwrap()["group"].clone();
    assert_eq!(group_of("boat-1"), "harbour");
    assert_eq!(group_of("boat-2"), serde_json::Value::Null);

    let rank = |l: &str| ["view", "control", "admin"].iter().position(|x| *x == l).unwrap();
    let operators: Vec<(&str, &str, Option<&str>)> = vec![
        ("admin role", &admin_role, Some("admin")),
        ("pilot, no grant", &none, None),
        ("pilot, view", &view, Some("view")),
        ("pilot, control", &control, Some("control")),
        ("pilot, admin level", &full, Some("admin")),
        ("pilot, control on this device", &dev_grant, Some("control")),
        ("pilot, admin on another device", &other_dev, None),
        ("pilot, view via group", &group, Some("view")),
    ];
    let types: &[(&str, &str)] = &[
        ("subscribe", "view"),
        ("webrtc", "view"),
        ("lease_heartbeat", "control"),
        ("app_command", "control"),
        ("execute_command", "admin"),
        ("update_client_config", "admin"),
        ("reload_config", "admin"),
        ("speed_test", "admin"),
        ("process_command", "admin"),
        ("get_client_config", "admin"),
    ];
    let mut table = Vec::new();
    for (name, key, level) in &operators {
        let mut p = r.operator(key).await;
        for (ty, needs) in types {
            let mut m = message(ty);
            // Each operator opens its own media session.
            m["payload"]["sessionID"] = json!(name);
            if *ty != "webrtc" {
                m = message(ty);
            }
            p.send(m).await;
            let got = allowed(&mut p).await;
            let want = level.is_some_and(|l| rank(l) >= rank(needs));
            table.push(format!("{name:32} {ty:22} {}", if got { "allowed" } else { "forbidden" }));
            assert_eq!(got, want, "{name} sending {ty} (needs {needs}, has {level:?})");
        }
    }
    println!("{}", table.join("\n"));
    r.stop().await;
}

#[tokio::test]
async fn a_view_only_pilot_is_refused_a_command_with_a_clear_error() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let mut dev = r.device("boat-1", &secret).await;
    let key = r.create_pilot("watcher", Some("view"));
    let mut p = r.operator(&key).await;
    p.send(json!({"type":"execute_command","correlationID":"x","clientID":"boat-1","payload":{"command":"reboot"}}))
        .await;
    let e = p.recv().await;
    assert_eq!(e["payload"]["code"], "forbidden");
    assert_eq!(e["correlationID"], "x");
    assert!(e["payload"]["message"].as_str().unwrap().contains("needs admin"), "{e}");
    assert!(dev.try_recv(std::time::Duration::from_millis(300)).await.is_none(), "the device never saw it");
    // Granting and revoking take effect at once.
    r.grant("watcher", "device:boat-1", "admin").await;
    p.send(json!({"type":"execute_command","correlationID":"y","clientID":"boat-1","payload":{"command":"ls"}})).await;
    assert_eq!(p.recv().await["payload"]["status"], "delivered");
    assert_eq!(dev.recv_type("execute_command").await["correlationID"], "y");
    let (s, _) = admin_call(
        &r,
        reqwest::Method::DELETE,
        "/api/permissions",
        Some(json!({"operatorID":"op-watcher","scope":"device:boat-1"})),
    )
    .await;
    assert_eq!(s, 200);
    p.send(json!({"type":"execute_command","correlationID":"z","clientID":"boat-1","payload":{"command":"ls"}})).await;
    assert_eq!(p.recv().await["payload"]["code"], "forbidden");
    let _ = OperatorRole::Pilot;
    r.stop().await;
}

#[tokio::test]
async fn pilots_only_list_devices_they_can_see() {
    let r = start_relay().await;
    r.create_device("boat-1", "default");
    r.create_device("boat-2", "default");
    let key = r.create_pilot("one", None);
    r.grant("one", "device:boat-2", "view").await;
    let (_, list) = r.get_json("/api/devices", Some(&key)).await;
    let ids: Vec<&str> = list["devices"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["boat-2"]);
    assert_eq!(list["devices"][0]["access"], "view");
    r.stop().await;
}

#[tokio::test]
async fn grants_may_name_the_operator_by_username() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let _dev = r.device("boat-1", &secret).await;
    let key = r.create_pilot("pat", None);
    let (s, body) = admin_call(
        &r,
        reqwest::Method::PUT,
        "/api/permissions",
        Some(json!({"operatorID":"pat","scope":"org","level":"view"})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let mut p = r.operator(&key).await;
    subscribe(&mut p, "boat-1").await;
    r.stop().await;
}
