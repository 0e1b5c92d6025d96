//! The control lease: at most one pilot connection drives a device at a time.
//!
//! A pilot with `control` acquires the lease, keeps it alive with heartbeats and releases it.
//! It ends when its holder's connection closes or no heartbeat arrives within the lease
//! timeout. An operator with `admin` on the device can take it over. `app_command` from
//! anyone but the holder is refused with `not_controller`. Every change is announced with
//! `lease_state` to the device and to everyone subscribed to it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use signaling::Envelope;
use signaling::message::LeaseState;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::Relay;
use crate::hub::{Conn, ConnId};

#[derive(Debug, Clone)]
struct Lease {
    holder: String,
    holder_name: String,
    org: String,
    conn: ConnId,
    last_beat: Instant,
}

/// Why a lease request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseRefusal {
    /// Someone else holds it; their username.
    HeldBy(String),
    /// The caller does not hold it.
    NotHolder,
}

/// All leases of this relay.
#[derive(Debug)]
pub struct Leases {
    map: Mutex<HashMap<String, Lease>>,
    timeout: Duration,
}

impl Leases {
    /// Leases that expire after `timeout` without a heartbeat.
    pub fn new(timeout: Duration) -> Self {
        Leases { map: Mutex::new(HashMap::new()), timeout }
    }

    /// The holder of `device`'s lease: operator id and username.
    pub fn holder(&self, device: &str) -> Option<(String, String)> {
        self.map.lock().get(device).map(|l| (l.holder.clone(), l.holder_name.clone()))
    }

    /// Whether connection `conn` holds `device`'s lease.
    pub fn is_holder(&self, device: &str, conn: ConnId) -> bool {
        self.map.lock().get(device).is_some_and(|l| l.conn == conn)
    }

    /// Takes the lease for `conn`. `takeover` (admins only; the caller checks) replaces
    /// another holder. Acquiring a lease one already holds renews it.
    pub fn acquire(&self, device: &str, conn: &Conn, takeover: bool) -> Result<&'static str, LeaseRefusal> {
        let mut map = self.map.lock();
        let reason = match map.get(device) {
            Some(l) if l.conn == conn.id => "renewed",
            Some(l) if !takeover => return Err(LeaseRefusal::HeldBy(l.holder_name.clone())),
            Some(_) => "takeover",
            None => "acquired",
        };
        map.insert(
            device.to_owned(),
            Lease {
                holder: conn.identity.id.clone(),
                holder_name: conn.identity.name.clone(),
                org: conn.identity.org.clone(),
                conn: conn.id,
                last_beat: Instant::now(),
            },
        );
        Ok(reason)
    }

    /// Renews the lease held by `conn`.
    pub fn heartbeat(&self, device: &str, conn: ConnId) -> Result<(), LeaseRefusal> {
        match self.map.lock().get_mut(device) {
            Some(l) if l.conn == conn => {
                l.last_beat = Instant::now();
                Ok(())
            }
            _ => Err(LeaseRefusal::NotHolder),
        }
    }

    /// Gives back the lease held by `conn`.
    pub fn release(&self, device: &str, conn: ConnId) -> Result<(), LeaseRefusal> {
        let mut map = self.map.lock();
        match map.get(device) {
            Some(l) if l.conn == conn => {
                map.remove(device);
                Ok(())
            }
            _ => Err(LeaseRefusal::NotHolder),
        }
    }

    fn remove_where(&self, mut pred: impl FnMut(&Lease) -> bool) -> Vec<(String, String)> {
        let mut map = self.map.lock();
        let gone: Vec<(String, String)> =
            map.iter().filter(|(_, l)| pred(l)).map(|(d, l)| (d.clone(), l.org.clone())).collect();
        for (d, _) in &gone {
            map.remove(d);
        }
        gone
    }

    /// Ends the leases whose holder stopped heartbeating; returns (device, org) pairs.
    pub fn expire(&self, now: Instant) -> Vec<(String, String)> {
        let timeout = self.timeout;
        self.remove_where(|l| now.duration_since(l.last_beat) > timeout)
    }

    /// Ends the leases held by a closed connection.
    pub fn conn_closed(&self, conn: ConnId) -> Vec<(String, String)> {
        self.remove_where(|l| l.conn == conn)
    }

    /// Ends every lease of an operator (disabled, revoked) and announces it.
    pub fn drop_holder(&self, relay: &Relay, operator: &str) {
        for (device, org) in self.remove_where(|l| l.holder == operator) {
            self.announce(relay, &org, &device, "revoked");
        }
    }

    /// The current state of `device`'s lease as a `lease_state` message.
    pub fn state(&self, device: &str, reason: &str) -> String {
        let holder = self.holder(device);
        Envelope::new(LeaseState {
            device_id: device.to_owned(),
            holder: holder.as_ref().map(|h| h.0.clone()),
            holder_name: holder.map(|h| h.1),
            timeout_ms: self.timeout.as_millis() as u64,
            reason: reason.to_owned(),
        })
        .to_json()
    }

    /// Tells the device and its subscribers who holds the lease now. A new holder (`acquired`,
    /// `takeover`) also ends the device's `safety_stop` alert: the robot's stop is cleared then.
    pub fn announce(&self, relay: &Relay, org: &str, device: &str, reason: &str) {
        if matches!(reason, "acquired" | "takeover")
            && let Some(t) = relay.peek_device_telemetry(device)
        {
            t.lock().health.lease_taken();
        }
        let text = Utf8Bytes::from(self.state(device, reason));
        relay.hub.notify_subscribers(device, text.clone());
        relay.hub.send_to(org, device, text);
    }
}
