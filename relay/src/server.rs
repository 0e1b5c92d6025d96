//! Starting and stopping a relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use signaling::{Envelope, ErrorCode};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::auth::{self, BOOTSTRAP_KEY_ID, MACHINE_SECRET_COST};
use crate::hub::LocalHub;
use crate::store::{OperatorRole, Store, StoreError, q};
use crate::{Relay, RelayConfig, routes};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A setting is out of range or malformed (the binary's flag parser catches these first).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The database could not be opened or initialised.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// The TLS certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// What a first start created, to show the operator once.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// The organisation created.
    pub org: String,
    /// The admin's username.
    pub username: String,
    /// The admin API key, when the relay generated it (None if it came from the config).
    pub generated_key: Option<String>,
}

/// A started relay.
#[derive(Debug)]
pub struct RunningRelay {
    /// Where it listens (useful with port 0).
    pub addr: SocketAddr,
    /// Shared state, for tests and the binary.
    pub relay: Arc<Relay>,
    /// Set on first start.
    pub bootstrap: Option<Bootstrap>,
    server: tokio::task::JoinHandle<()>,
}

/// On an empty store, creates the `default` org and an `admin` operator with an API key
/// (`admin_key` if given, otherwise a random one returned for printing).
pub fn bootstrap(store: &Store, admin_key: Option<&str>) -> Result<Option<Bootstrap>, StoreError> {
    store.call_sync(|c| {
        if q::operator_count(c)? > 0 {
            return Ok(None);
        }
        let tx = c.transaction()?;
        let org = match q::find_org(&tx, "default")? {
            Some(o) => o,
            None => q::create_org(&tx, "default", "default")?,
        };
        let op_id = format!("op-{}", auth::random_hex(6));
        q::create_operator(&tx, &op_id, &org.id, "admin", OperatorRole::Admin)?;
        let generated_key = match admin_key {
            Some(key) => {
                let (key_id, secret) = auth::parse_api_key(key).unwrap_or((BOOTSTRAP_KEY_ID, key));
                let hash = bcrypt::hash(secret, MACHINE_SECRET_COST).map_err(|e| StoreError::Task(e.to_string()))?;
                q::create_api_key(&tx, key_id, &op_id, &hash, Some("bootstrap"))?;
                None
            }
            None => Some(auth::issue_api_key_sync(&tx, &op_id, Some("bootstrap"))?),
        };
        tx.commit()?;
        Ok(Some(Bootstrap { org: org.name, username: "admin".into(), generated_key }))
    })
}

/// Binds with a deep accept backlog: after a relay restart thousands of devices connect at
/// once, and tokio's default backlog (1024) would make the rest wait for SYN retransmits.
///
/// `TCP_NODELAY` is set on the listening socket, and Linux passes it on to every accepted one:
/// the writer task already batches what is queued into one write, so Nagle's algorithm could
/// only hold a small frame back until the peer's (possibly delayed) ACK.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Opens the store, binds the port and starts serving. Returns once the relay is listening.
pub async fn start(config: RelayConfig) -> Result<RunningRelay, StartError> {
    config.validate().map_err(StartError::Config)?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::load(cert, key)?),
        _ => None,
    };
    let store = Store::open(&config.db_path())?;
    let bootstrap = bootstrap(&store, config.admin_key.as_deref())?;
    let addr = SocketAddr::new(config.bind, config.port);
    let listener = listen(addr).map_err(|source| StartError::Bind { addr, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
    let hub = Arc::new(LocalHub::new(config.telemetry_buffer_size));
    let relay = Arc::new(Relay::new(config, store, hub));

    if let Err(e) = relay.access.reload_denies(&relay.store).await {
        tracing::error!("could not load the deny list: {e}");
    }
    relay.tasks.spawn(housekeeping(relay.clone()));
    if let Some(rx) = relay.sfu_out.lock().take() {
        // Not tracked: it ends when the relay (and with it the SFU's sender) is dropped.
        tokio::spawn(crate::media::route_sfu(relay.clone(), rx));
    }
    let shutdown = relay.shutdown.clone();
    let server = match tls {
        Some(tls) => tokio::spawn(crate::tls::serve(listener, tls, relay.clone(), shutdown)),
        None => {
            let server = warp::serve(routes::routes(relay.clone()))
                .incoming(listener)
                .graceful(async move { shutdown.cancelled().await });
            tokio::spawn(server.run())
        }
    };
    tracing::info!(%addr, tls = relay.config.tls_cert.is_some(), db = %relay.store.path().display(), "relay listening");
    Ok(RunningRelay { addr, relay, bootstrap, server })
}

/// Periodic work: expired tickets and reply routes, batched last-seen writes.
async fn housekeeping(relay: Arc<Relay>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = relay.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        relay.tickets.sweep(now);
        relay.hub.sweep(now);
        for t in relay.hub.take_timed_out(now) {
            let text = Utf8Bytes::from(
                Envelope::error(
                    ErrorCode::CommandTimeout,
                    format!("{} did not report a result in time", t.device),
                    Some(t.correlation_id.clone()),
                )
                .to_json(),
            );
            relay.metrics.count_error(ErrorCode::CommandTimeout);
            let sent = t.request.conn.is_some_and(|c| relay.hub.send_to_conn(c, text.clone()));
            if !sent {
                relay.hub.send_to(&t.request.org, &t.request.requester, text);
            }
        }
        for (device, org) in relay.leases.expire(now) {
            relay.leases.announce(&relay, &org, &device, "expired");
        }
        n += 1;
        if n.is_multiple_of(2) {
            expire_queued(&relay).await;
        }
        if n.is_multiple_of(10) {
            relay.flush_presence().await;
            relay.limits.sweep();
        }
    }
}

/// Tells the senders of queued messages that expired before their device came back.
async fn expire_queued(relay: &Relay) {
    let expired = match relay.store.call(q::take_expired).await {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("offline queue expiry failed: {e}");
            return;
        }
    };
    for (target, row) in expired {
        tracing::info!(%target, sender = %row.sender_id, kind = %row.msg_type, "queued message expired");
        let text = Utf8Bytes::from(
            Envelope::error(
                ErrorCode::Expired,
                if row.delivered_at.is_some() {
                    format!("{target} received the queued {} but never answered it", row.msg_type)
                } else {
                    format!("{target} stayed offline; the queued {} expired undelivered", row.msg_type)
                },
                row.correlation_id.clone(),
            )
            .to_json(),
        );
        relay.metrics.count_error(ErrorCode::Expired);
        if let Ok(Some(org)) = relay.org_of(&row.sender_id).await {
            relay.hub.send_to(&org, &row.sender_id, text);
        }
        let detail = serde_json::json!({"target": target, "type": row.msg_type, "correlationID": row.correlation_id});
        let (org, sender) = (relay.org_of(&target).await.ok().flatten(), row.sender_id.clone());
        let _ = relay
            .store
            .call(move |c| q::audit(c, org.as_deref(), "relay", "queue.expired", Some(&sender), Some(&detail)))
            .await;
    }
}

impl RunningRelay {
    /// Stops accepting, closes every socket with 1001, waits for connections to end (up to
    /// `grace`), then writes last-seen times and checkpoints the database.
    pub async fn shutdown(self, grace: Duration) {
        let relay = self.relay.clone();
        relay.shutdown.cancel();
        let _ = tokio::time::timeout(grace, self.server).await;
        relay.tasks.close();
        if tokio::time::timeout(grace, relay.tasks.wait()).await.is_err() {
            tracing::warn!("some connections did not close within {grace:?}");
        }
        relay.flush_presence().await;
        if let Err(e) = relay.store.flush().await {
            tracing::error!("final store checkpoint failed: {e}");
        }
        tracing::info!("relay stopped");
    }
}
