//! Shutdown closes every socket with 1001 and stops accepting.

mod common;
use common::*;
use relay::store::OperatorRole;

#[tokio::test]
async fn shutdown_closes_sockets_with_going_away() {
    let r = start_relay().await;
    let secret = r.create_device("boat-1", "default");
    let key = r.create_operator("ana", "default", OperatorRole::Pilot);
    let mut dev = r.device("boat-1", &secret).await;
    let mut p = r.operator(&key).await;
    let addr = r.addr();
    let stopping = tokio::spawn(r.stop());
    for c in [&mut dev, &mut p] {
        let e = c.recv_type("error").await;
        assert_eq!(e["payload"]["code"], "shutting_down");
        assert_eq!(u16::from(c.expect_close().await.expect("close frame").code), 1001);
    }
    stopping.await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no longer accepting");
}
