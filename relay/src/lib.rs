//! The Tether relay.
//!
//! Read top-down: [`server`] binds and runs everything; [`routes`] maps HTTP paths to handlers;
//! [`ws`] upgrades sockets; [`conn`] drives one WebSocket connection (authentication, the
//! read loop, the writer task); [`hub`] routes between connections; [`outbox`] is each
//! connection's bounded outbound queue; [`auth`] and [`store`] hold identity and state;
//! [`metrics`] counts.

pub mod access;
pub mod api;
pub mod auth;
pub mod config;
pub mod conn;
pub mod console;
pub mod dialect;
pub mod fleet;
pub mod hub;
pub mod leases;
pub mod limits;
pub mod media;
pub mod metrics;
pub mod ops;
pub mod outbox;
pub mod routes;
pub mod server;
pub mod store;
pub mod tls;
pub mod whep;
pub mod ws;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use signaling::{ClockSync, SequenceTracker};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::RelayConfig;
pub use server::{RunningRelay, StartError, start};

use auth::{Hasher, Tickets};
use hub::Hub;
use metrics::Metrics;
use store::Store;

/// The relay's clock: Unix milliseconds that never go backwards (the wall clock read once at
/// start, advanced by the monotonic clock), so clock-sync arithmetic is not upset by NTP steps
/// on the relay host.
#[derive(Debug, Clone, Copy)]
pub struct RelayClock {
    base_unix_ms: f64,
    base: Instant,
}

impl Default for RelayClock {
    fn default() -> Self {
        RelayClock { base_unix_ms: store::now_ms() as f64, base: Instant::now() }
    }
}

impl RelayClock {
    /// Milliseconds since the Unix epoch, with sub-millisecond precision.
    pub fn now_ms(&self) -> f64 {
        self.base_unix_ms + self.base.elapsed().as_secs_f64() * 1000.0
    }
}

/// Sequence and clock state of one device. Kept across reconnects so a gap spanning a
/// reconnect is still seen as a gap.
#[derive(Debug, Default)]
pub struct DeviceTelemetry {
    /// Per-stream sequence checking.
    pub sequences: SequenceTracker<String>,
    /// Clock offset estimation against this relay.
    pub clock: ClockSync,
    /// Battery, gaps, safety stop and failing processes, for `GET /api/devices`.
    pub health: fleet::Health,
}

/// Everything a relay process shares between connections and handlers.
#[derive(Debug)]
pub struct Relay {
    /// Settings.
    pub config: RelayConfig,
    /// The database.
    pub store: Store,
    /// Password/secret hashing off the async runtime.
    pub hasher: Hasher,
    /// One-time WebSocket tickets.
    pub tickets: Tickets,
    /// Permissions and the deny list.
    pub access: access::Access,
    /// Control leases.
    pub leases: leases::Leases,
    /// WebRTC signaling sessions.
    pub media: media::MediaSessions,
    /// The SFU, unless turned off (`--no-sfu`).
    pub sfu: Option<Arc<::media::sfu::Sfu>>,
    /// What the SFU has to say, until `server::start` takes it to route it.
    pub sfu_out: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<::media::sfu::SfuOut>>>,
    /// WHEP sessions: id -> who opened it.
    pub whep: Mutex<HashMap<String, whep::WhepSession>>,
    /// Rate limits.
    pub limits: limits::Limits,
    /// Routing between connections.
    pub hub: Arc<dyn Hub>,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// Time base for timestamps and clock sync.
    pub clock: RelayClock,
    /// Fired once when the relay starts shutting down.
    pub shutdown: CancellationToken,
    /// Every connection and background task, awaited at shutdown.
    pub tasks: TaskTracker,
    /// When the relay started, for `/health`; also the time base of [`fleet::DeviceLink`].
    pub started: Instant,
    /// Each device's link state (last message, clock-sync round trip), for `GET /api/devices`.
    pub links: fleet::Links,
    devices: Mutex<HashMap<String, Arc<Mutex<DeviceTelemetry>>>>,
    last_seen: Mutex<HashMap<String, i64>>,
    next_conn: AtomicU64,
}

impl Relay {
    /// Assembles the shared state.
    pub fn new(config: RelayConfig, store: Store, hub: Arc<dyn Hub>) -> Self {
        let tickets = Tickets::new(config.ticket_lifetime());
        let limits = limits::Limits::new(limits::Defaults {
            messages_per_second: config.messages_per_second,
            bytes_per_second: config.bytes_per_second,
            connections_per_minute: config.connections_per_minute,
            auth_failures_per_minute: config.auth_failures_per_minute,
        });
        let (sfu, sfu_out) = if config.media.no_sfu {
            (None, None)
        } else {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (Some(::media::sfu::Sfu::new(config.media.sfu_settings(), tx)), Some(rx))
        };
        Relay {
            sfu,
            sfu_out: Mutex::new(sfu_out),
            whep: Mutex::new(HashMap::new()),
            access: access::Access::default(),
            leases: leases::Leases::new(config.lease_lifetime()),
            media: media::MediaSessions::default(),
            limits,
            config,
            store,
            hasher: Hasher::default(),
            tickets,
            hub,
            metrics: Metrics::default(),
            clock: RelayClock::default(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            started: Instant::now(),
            links: fleet::Links::default(),
            devices: Mutex::new(HashMap::new()),
            last_seen: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        }
    }

    /// A fresh connection number.
    pub fn next_conn_id(&self) -> hub::ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// The telemetry state of `device`, created on first use.
    pub fn device_telemetry(&self, device: &str) -> Arc<Mutex<DeviceTelemetry>> {
        self.devices.lock().entry(device.to_owned()).or_default().clone()
    }

    /// The telemetry state of `device`, if it has any (nothing is created).
    pub fn peek_device_telemetry(&self, device: &str) -> Option<Arc<Mutex<DeviceTelemetry>>> {
        self.devices.lock().get(device).cloned()
    }

    /// Notes that `device` was connected at `at_ms`; written to the store in batches.
    pub fn mark_seen(&self, device: &str, at_ms: i64) {
        self.last_seen.lock().insert(device.to_owned(), at_ms);
    }

    /// Writes batched last-seen times to the store.
    pub async fn flush_presence(&self) {
        let now = store::now_ms();
        for d in self.hub.online_devices() {
            self.mark_seen(&d, now);
        }
        let batch: Vec<(String, i64)> = self.last_seen.lock().drain().collect();
        if let Err(e) = self.store.touch_devices(batch).await {
            tracing::warn!("could not record last-seen times: {e}");
        }
    }

    /// The org of a device or operator id, from the store.
    pub async fn org_of(&self, id: &str) -> Result<Option<String>, store::StoreError> {
        let id = id.to_owned();
        self.store.call(move |c| store::q::principal_org(c, &id)).await
    }
}
