//! The hub: who is connected, who subscribes to which device, and delivery between them.
//!
//! Connection code talks to the [`Hub`] trait only. [`LocalHub`] is the single-process
//! implementation; a clustered one (NATS) implements the same trait and keeps the connection
//! code untouched. The hub only ever sees native messages, already encoded as text: it routes
//! bytes, it does not parse them.
//!
//! Ordering guarantee for telemetry: publishing a frame and subscribing to a device both take
//! the device's channel lock, so a new subscriber gets every frame exactly once — from the replay
//! buffer or live, never both, never neither. The same lock orders a device's `process_state`
//! snapshots against subscribing: a new subscriber gets the remembered snapshot right after
//! `subscribed`, and every later one live.
//!
//! What a subscriber receives on which lane of its [`Outbox`]: `presence`, `lease_state`,
//! `process_state` and `safety_stop` on the control lane (never dropped); telemetry frames and,
//! for subscriptions made with `logs: true`, `log` lines on the telemetry lane (dropped oldest
//! first when the subscriber reads too slowly, so logs can never hold up control messages).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use signaling::Envelope;
use signaling::message::{Subscribed, mark_replay};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::auth::{Identity, Role};
use crate::outbox::Outbox;

/// Process-unique connection number.
pub type ConnId = u64;

/// A live, authenticated connection as the hub sees it.
#[derive(Debug)]
pub struct Conn {
    /// Unique per connection (an identity may have several, e.g. browser tabs).
    pub id: ConnId,
    /// Who it is.
    pub identity: Identity,
    /// Where to put messages for it.
    pub outbox: Arc<Outbox>,
    /// The peer's IP address, for `ip:` deny-list entries.
    pub peer_ip: Option<String>,
}

/// A request waiting for its result.
#[derive(Debug, Clone)]
pub struct PendingRequest {
    /// Who asked (operator id).
    pub requester: String,
    /// The requester's organisation.
    pub org: String,
    /// The connection that asked, if it is known (not for queued requests delivered later).
    pub conn: Option<ConnId>,
    /// When the requester should hear `command_timeout` if no result came.
    pub deadline: Option<Instant>,
    /// When it was sent.
    pub at: Instant,
}

/// A request whose deadline passed without a result.
#[derive(Debug, Clone)]
pub struct TimedOut {
    /// The device it was sent to.
    pub device: String,
    /// Its correlationID.
    pub correlation_id: String,
    /// Who asked, and on which connection.
    pub request: PendingRequest,
}

/// Result of sending to an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued on this many connections.
    Delivered(usize),
    /// The identity has no live connection in that org.
    NotConnected,
}

/// Result of a telemetry fan-out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FanOut {
    /// Subscribers the frame was queued for.
    pub delivered: usize,
    /// Older frames dropped from slow subscribers' queues to make room.
    pub dropped: usize,
}

/// Live connections by role.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConnCounts {
    /// Device agents.
    pub device: usize,
    /// Pilots.
    pub pilot: usize,
    /// Admins.
    pub admin: usize,
}

/// How long the route back from a device's reply to the requester is remembered.
pub const REPLY_ROUTE_TTL: Duration = Duration::from_secs(600);

/// The routing boundary. All methods are non-blocking.
pub trait Hub: Send + Sync + std::fmt::Debug {
    /// Registers a connection. A device has one connection at a time: any older connection of
    /// the same device is returned so the caller can close it as replaced.
    fn attach(&self, conn: Arc<Conn>) -> Vec<Arc<Conn>>;
    /// Removes a connection and its subscriptions.
    fn detach(&self, conn: &Conn);
    /// Whether `id` has a live connection.
    fn is_online(&self, id: &str) -> bool;
    /// The role of a connected identity.
    fn role_of(&self, id: &str) -> Option<Role>;
    /// Queues a control message on every connection of `target` in `org`.
    fn send_to(&self, org: &str, target: &str, text: Utf8Bytes) -> Delivery;
    /// Queues a control message on one connection, if it is still live.
    fn send_to_conn(&self, conn: ConnId, text: Utf8Bytes) -> bool;
    /// Buffers a device's telemetry frame for replay and fans it out to its subscribers.
    fn publish_telemetry(&self, device: &str, live: Utf8Bytes) -> FanOut;
    /// Subscribes `conn` to `device`: queues `subscribed` (answering `correlation_id`), then
    /// the device's last `process_state` if one is remembered, then, if `replay`, the buffered
    /// telemetry frames marked as replay. With `logs` the subscription also receives the
    /// device's `log` lines. Subscribing again replaces the subscription (and its `logs`
    /// choice). Returns how many frames were replayed.
    fn subscribe(
        &self,
        device: &str,
        conn: &Arc<Conn>,
        replay: bool,
        logs: bool,
        correlation_id: Option<String>,
    ) -> usize;
    /// Ends a subscription, its log lines included; false if there was none.
    fn unsubscribe(&self, device: &str, conn: ConnId) -> bool;
    /// Remembers `text` (a forwarded `process_state`) as `device`'s current process state, so
    /// later subscribers get it on subscribing, and queues it as a control message for every
    /// subscriber. Returns how many subscribers it was queued for.
    fn publish_process_state(&self, device: &str, text: Utf8Bytes) -> usize;
    /// Queues a forwarded `log` line on the telemetry lane of every subscriber of `device` that
    /// subscribed with `logs`; nothing is buffered for later subscribers.
    fn publish_log(&self, device: &str, text: Utf8Bytes) -> FanOut;
    /// Remembers that `requester` sent request `correlation_id` to `device`, so the device's
    /// reply (which may not name a target) finds its way back.
    fn remember_request(&self, device: &str, correlation_id: &str, request: PendingRequest);
    /// Where a device's reply with `correlation_id` should go.
    fn reply_route(&self, device: &str, correlation_id: &str) -> Option<PendingRequest>;
    /// The device sent the result of `correlation_id`: its deadline no longer applies.
    fn mark_answered(&self, device: &str, correlation_id: &str);
    /// Removes and returns requests whose deadline has passed.
    fn take_timed_out(&self, now: Instant) -> Vec<TimedOut>;
    /// Queues a control message (presence, lease state, safety stop) for every subscriber of
    /// `device`.
    fn notify_subscribers(&self, device: &str, text: Utf8Bytes);
    /// The connections subscribed to `device` (a Boat-dialect boat's own offer goes to each).
    fn subscribers_of(&self, device: &str) -> Vec<Arc<Conn>>;
    /// Live connections by role.
    fn counts(&self) -> ConnCounts;
    /// Ids of connected devices.
    fn online_devices(&self) -> Vec<String>;
    /// Every live connection (for shutdown).
    fn connections(&self) -> Vec<Arc<Conn>>;
    /// Housekeeping: forgets expired reply routes.
    fn sweep(&self, now: Instant);
}

#[derive(Debug, Default)]
struct Registry {
    conns: HashMap<ConnId, Arc<Conn>>,
    by_identity: HashMap<String, Vec<ConnId>>,
    subs_by_conn: HashMap<ConnId, HashSet<String>>,
}

#[derive(Debug, Default)]
struct Channel {
    /// The last frames, as sent live.
    buffer: VecDeque<Utf8Bytes>,
    /// The device's last `process_state`, as forwarded, for subscribers that come later.
    process_state: Option<Utf8Bytes>,
    subscribers: HashMap<ConnId, Subscriber>,
}

#[derive(Debug)]
struct Subscriber {
    outbox: Arc<Outbox>,
    /// Whether it asked for the device's `log` lines.
    logs: bool,
}

/// The in-process hub.
#[derive(Debug)]
pub struct LocalHub {
    registry: RwLock<Registry>,
    channels: Mutex<HashMap<String, Arc<Mutex<Channel>>>>,
    replies: Mutex<HashMap<(String, String), PendingRequest>>,
    buffer_size: usize,
}

impl LocalHub {
    /// A hub keeping the last `buffer_size` telemetry frames per device for replay.
    pub fn new(buffer_size: usize) -> Self {
        LocalHub {
            registry: RwLock::new(Registry::default()),
            channels: Mutex::new(HashMap::new()),
            replies: Mutex::new(HashMap::new()),
            buffer_size,
        }
    }

    /// The device's channel if it has one: paths that only read subscribers do not create one
    /// (an idle device that nobody watches should not carry an empty channel).
    fn existing_channel(&self, device: &str) -> Option<Arc<Mutex<Channel>>> {
        self.channels.lock().get(device).cloned()
    }

    fn channel(&self, device: &str) -> Arc<Mutex<Channel>> {
        let mut map = self.channels.lock();
        if let Some(c) = map.get(device) {
            return c.clone();
        }
        let c = Arc::new(Mutex::new(Channel::default()));
        map.insert(device.to_owned(), c.clone());
        c
    }
}

impl Hub for LocalHub {
    fn attach(&self, conn: Arc<Conn>) -> Vec<Arc<Conn>> {
        let mut reg = self.registry.write();
        let mut replaced = Vec::new();
        if conn.identity.role == Role::Device
            && let Some(old) = reg.by_identity.remove(&conn.identity.id)
        {
            for id in old {
                if let Some(c) = reg.conns.remove(&id) {
                    replaced.push(c);
                }
            }
        }
        reg.by_identity.entry(conn.identity.id.clone()).or_default().push(conn.id);
        reg.conns.insert(conn.id, conn);
        replaced
    }

    fn detach(&self, conn: &Conn) {
        let subs = {
            let mut reg = self.registry.write();
            if reg.conns.remove(&conn.id).is_some()
                && let Some(list) = reg.by_identity.get_mut(&conn.identity.id)
            {
                list.retain(|c| *c != conn.id);
                if list.is_empty() {
                    reg.by_identity.remove(&conn.identity.id);
                }
            }
            reg.subs_by_conn.remove(&conn.id).unwrap_or_default()
        };
        for device in subs {
            self.channel(&device).lock().subscribers.remove(&conn.id);
        }
    }

    fn is_online(&self, id: &str) -> bool {
        self.registry.read().by_identity.contains_key(id)
    }

    fn role_of(&self, id: &str) -> Option<Role> {
        let reg = self.registry.read();
        let conn = reg.by_identity.get(id)?.first()?;
        reg.conns.get(conn).map(|c| c.identity.role)
    }

    fn send_to(&self, org: &str, target: &str, text: Utf8Bytes) -> Delivery {
        let reg = self.registry.read();
        let Some(ids) = reg.by_identity.get(target) else {
            return Delivery::NotConnected;
        };
        let mut n = 0;
        for id in ids {
            if let Some(c) = reg.conns.get(id).filter(|c| c.identity.org == org)
                && c.outbox.push_control(text.clone()).is_ok()
            {
                n += 1;
            }
        }
        if n == 0 { Delivery::NotConnected } else { Delivery::Delivered(n) }
    }

    fn send_to_conn(&self, conn: ConnId, text: Utf8Bytes) -> bool {
        let reg = self.registry.read();
        reg.conns.get(&conn).is_some_and(|c| c.outbox.push_control(text).is_ok())
    }

    fn publish_telemetry(&self, device: &str, live: Utf8Bytes) -> FanOut {
        let channel = self.channel(device);
        let mut ch = channel.lock();
        if self.buffer_size > 0 {
            if ch.buffer.len() >= self.buffer_size {
                ch.buffer.pop_front();
            }
            ch.buffer.push_back(live.clone());
        }
        let mut out = FanOut::default();
        for sub in ch.subscribers.values() {
            // A closing subscriber refuses; its connection task detaches it.
            if let Ok(dropped) = sub.outbox.push_telemetry(live.clone()) {
                out.delivered += 1;
                out.dropped += dropped as usize;
            }
        }
        out
    }

    fn subscribe(
        &self,
        device: &str,
        conn: &Arc<Conn>,
        replay: bool,
        logs: bool,
        correlation_id: Option<String>,
    ) -> usize {
        self.registry.write().subs_by_conn.entry(conn.id).or_default().insert(device.to_owned());
        let online = self.is_online(device);
        let channel = self.channel(device);
        let mut ch = channel.lock();
        let replayed = if replay { ch.buffer.len() } else { 0 };
        let mut answer = Envelope::new(Subscribed { device_id: device.to_owned(), online, replayed });
        answer.correlation_id = correlation_id;
        let _ = conn.outbox.push_control(answer.to_json());
        if let Some(state) = &ch.process_state {
            let _ = conn.outbox.push_control(state.clone());
        }
        if replay {
            for frame in &ch.buffer {
                let _ = conn.outbox.push_telemetry(Utf8Bytes::from(mark_replay(frame.as_str())));
            }
        }
        ch.subscribers.insert(conn.id, Subscriber { outbox: conn.outbox.clone(), logs });
        replayed
    }

    fn unsubscribe(&self, device: &str, conn: ConnId) -> bool {
        let had = self.registry.write().subs_by_conn.get_mut(&conn).is_some_and(|s| s.remove(device));
        self.channel(device).lock().subscribers.remove(&conn);
        had
    }

    fn publish_process_state(&self, device: &str, text: Utf8Bytes) -> usize {
        let channel = self.channel(device);
        let mut ch = channel.lock();
        ch.process_state = Some(text.clone());
        ch.subscribers.values().filter(|s| s.outbox.push_control(text.clone()).is_ok()).count()
    }

    fn publish_log(&self, device: &str, text: Utf8Bytes) -> FanOut {
        let channel = self.channel(device);
        let ch = channel.lock();
        let mut out = FanOut::default();
        for sub in ch.subscribers.values().filter(|s| s.logs) {
            if let Ok(dropped) = sub.outbox.push_telemetry(text.clone()) {
                out.delivered += 1;
                out.dropped += dropped as usize;
            }
        }
        out
    }

    fn remember_request(&self, device: &str, correlation_id: &str, request: PendingRequest) {
        self.replies.lock().insert((device.to_owned(), correlation_id.to_owned()), request);
    }

    fn reply_route(&self, device: &str, correlation_id: &str) -> Option<PendingRequest> {
        self.replies.lock().get(&(device.to_owned(), correlation_id.to_owned())).cloned()
    }

    fn mark_answered(&self, device: &str, correlation_id: &str) {
        if let Some(r) = self.replies.lock().get_mut(&(device.to_owned(), correlation_id.to_owned())) {
            r.deadline = None;
        }
    }

    fn take_timed_out(&self, now: Instant) -> Vec<TimedOut> {
        let mut out = Vec::new();
        self.replies.lock().retain(|(device, corr), r| {
            if r.deadline.is_some_and(|d| d <= now) {
                out.push(TimedOut { device: device.clone(), correlation_id: corr.clone(), request: r.clone() });
                false
            } else {
                true
            }
        });
        out
    }

    fn notify_subscribers(&self, device: &str, text: Utf8Bytes) {
        let Some(channel) = self.existing_channel(device) else {
            return;
        };
        let ch = channel.lock();
        for sub in ch.subscribers.values() {
            let _ = sub.outbox.push_control(text.clone());
        }
    }

    fn subscribers_of(&self, device: &str) -> Vec<Arc<Conn>> {
        let ids: Vec<ConnId> = self.channel(device).lock().subscribers.keys().copied().collect();
        let reg = self.registry.read();
        ids.iter().filter_map(|id| reg.conns.get(id).cloned()).collect()
    }

    fn counts(&self) -> ConnCounts {
        let reg = self.registry.read();
        let mut c = ConnCounts::default();
        for conn in reg.conns.values() {
            match conn.identity.role {
                Role::Device => c.device += 1,
                Role::Pilot => c.pilot += 1,
                Role::Admin => c.admin += 1,
            }
        }
        c
    }

    fn online_devices(&self) -> Vec<String> {
        let reg = self.registry.read();
        reg.conns.values().filter(|c| c.identity.role == Role::Device).map(|c| c.identity.id.clone()).collect()
    }

    fn connections(&self) -> Vec<Arc<Conn>> {
        self.registry.read().conns.values().cloned().collect()
    }

    fn sweep(&self, now: Instant) {
        self.replies.lock().retain(|_, r| r.deadline.is_some() || now.duration_since(r.at) < REPLY_ROUTE_TTL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Next;

    fn conn(id: ConnId, who: &str, org: &str, role: Role) -> Arc<Conn> {
        Arc::new(Conn {
            id,
            identity: Identity {
                id: who.into(),
                org: org.into(),
                role,
                name: who.into(),
                credential: None,
                ticket: None,
            },
            outbox: Arc::new(Outbox::new(16, 4)),
            peer_ip: None,
        })
    }

    fn text(n: &Next) -> &str {
        match n {
            Next::Text(t) => t.as_str(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn replay_then_live_exactly_once() {
        let hub = LocalHub::new(2);
        let dev = conn(1, "d", "o", Role::Device);
        hub.attach(dev);
        for i in 0..3 {
            hub.publish_telemetry(
                "d",
                Utf8Bytes::from(format!(r#"{{"type":"telemetry","payload":{{"n":{i},"relay":{{"a":1}}}}}}"#)),
            );
        }
        let p = conn(2, "p", "o", Role::Pilot);
        hub.attach(p.clone());
        assert_eq!(hub.subscribe("d", &p, true, false, Some("c".into())), 2);
        hub.publish_telemetry(
            "d",
            Utf8Bytes::from(r#"{"type":"telemetry","payload":{"n":3,"relay":{"a":1}}}"#.to_owned()),
        );
        assert!(text(&p.outbox.next().await).contains("\"subscribed\""));
        let a = p.outbox.next().await;
        assert!(text(&a).contains("\"n\":1") && text(&a).contains("\"replay\":true"));
        assert!(text(&p.outbox.next().await).contains("\"n\":2"));
        let live = p.outbox.next().await;
        assert!(text(&live).contains("\"n\":3") && !text(&live).contains("replay"));
    }

    #[test]
    fn routing_stays_inside_the_org_and_devices_are_replaced() {
        let hub = LocalHub::new(0);
        hub.attach(conn(1, "d", "org-a", Role::Device));
        assert_eq!(hub.send_to("org-b", "d", Utf8Bytes::from_static("x")), Delivery::NotConnected);
        assert_eq!(hub.send_to("org-a", "d", Utf8Bytes::from_static("x")), Delivery::Delivered(1));
        let replaced = hub.attach(conn(2, "d", "org-a", Role::Device));
        assert_eq!(replaced.len(), 1);
        assert_eq!(hub.counts().device, 1);
        // Operators may hold several connections.
        hub.attach(conn(3, "op", "org-a", Role::Pilot));
        hub.attach(conn(4, "op", "org-a", Role::Pilot));
        assert_eq!(hub.send_to("org-a", "op", Utf8Bytes::from_static("x")), Delivery::Delivered(2));
    }

    #[test]
    fn detach_removes_subscriptions() {
        let hub = LocalHub::new(4);
        let p = conn(2, "p", "o", Role::Pilot);
        hub.attach(p.clone());
        hub.subscribe("d", &p, false, false, None);
        assert_eq!(hub.publish_telemetry("d", Utf8Bytes::from_static("{}")).delivered, 1);
        hub.detach(&p);
        assert_eq!(hub.publish_telemetry("d", Utf8Bytes::from_static("{}")).delivered, 0);
        assert!(!hub.is_online("p"));
    }

    #[tokio::test]
    async fn process_state_is_remembered_for_later_subscribers() {
        let hub = LocalHub::new(4);
        let early = conn(2, "p", "o", Role::Pilot);
        hub.subscribe("d", &early, false, false, None);
        assert!(text(&early.outbox.next().await).contains("\"subscribed\""));
        assert_eq!(hub.publish_process_state("d", Utf8Bytes::from_static("state-1")), 1);
        assert_eq!(text(&early.outbox.next().await), "state-1");
        hub.publish_process_state("d", Utf8Bytes::from_static("state-2"));
        let late = conn(3, "q", "o", Role::Pilot);
        hub.subscribe("d", &late, false, false, None);
        assert!(text(&late.outbox.next().await).contains("\"subscribed\""));
        assert_eq!(text(&late.outbox.next().await), "state-2", "only the newest snapshot");
        assert!(late.outbox.is_empty());
    }

    #[tokio::test]
    async fn logs_reach_only_subscribers_that_asked_and_a_resubscribe_updates_it() {
        let hub = LocalHub::new(0);
        let with = conn(2, "p", "o", Role::Pilot);
        let without = conn(3, "q", "o", Role::Pilot);
        hub.subscribe("d", &with, false, true, None);
        hub.subscribe("d", &without, false, false, None);
        with.outbox.next().await;
        without.outbox.next().await;
        assert_eq!(hub.publish_log("d", Utf8Bytes::from_static("line")).delivered, 1);
        assert_eq!(text(&with.outbox.next().await), "line");
        assert!(without.outbox.is_empty());
        hub.subscribe("d", &with, false, false, None);
        with.outbox.next().await;
        assert_eq!(hub.publish_log("d", Utf8Bytes::from_static("line")).delivered, 0);
        hub.subscribe("d", &without, false, true, None);
        without.outbox.next().await;
        assert_eq!(hub.publish_log("d", Utf8Bytes::from_static("line")).delivered, 1);
        assert!(hub.unsubscribe("d", without.id));
        assert_eq!(hub.publish_log("d", Utf8Bytes::from_static("line")).delivered, 0);
    }
}
