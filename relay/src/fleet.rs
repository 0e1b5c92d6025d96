//! The fleet summary of `GET /api/devices`: each device's battery, link and active alerts
//! (docs/api.md section 3).
//!
//! All of it lives in relay memory only; a relay restart forgets it. Two kinds of state:
//!
//! - [`Health`], inside the device's [`crate::DeviceTelemetry`]: the battery and sequence gaps
//!   are updated inside the critical section the telemetry path already takes for sequence
//!   checking, so a frame takes no extra lock; the safety stop and failing processes come from
//!   rare control messages (`safety_stop`, `process_state`, `lease_state`).
//! - [`DeviceLink`], two atomics per device: when the relay last heard from the device and the
//!   smoothed clock-sync round trip. The connection's read loop stores them (relaxed); the API
//!   reads them.
//!
//! Sans-IO like the rest of the bookkeeping: every method takes the relay-clock time `now_ms`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use signaling::ClockEstimate;
use signaling::message::{ProcessState, SafetyStop};

/// Below this battery percent a device has the `battery_low` alert.
pub const BATTERY_LOW_PERCENT: f64 = 20.0;
/// How long after the last sequence gap the `telemetry_gaps` alert stays active.
pub const GAP_WINDOW_MS: f64 = 60_000.0;
/// `good` link: round trip below this and a message within [`GOOD_SILENCE_MS`].
pub const GOOD_RTT_MS: f64 = 150.0;
/// `good` link: heard from within this long.
pub const GOOD_SILENCE_MS: u64 = 5_000;
/// `poor` link: round trip above this, or nothing heard for [`POOR_SILENCE_MS`].
pub const POOR_RTT_MS: f64 = 500.0;
/// `poor` link: nothing heard for this long.
pub const POOR_SILENCE_MS: u64 = 15_000;
/// A connection reads the battery out of a telemetry frame at most this often: parsing the
/// frame's `data` costs about as much as the rest of the hot path, and a battery level changes
/// slowly.
pub const BATTERY_SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Weight of a new clock-sync round trip in the smoothed value (as TCP's SRTT, but faster:
/// exchanges are 20 s apart).
const RTT_GAIN: f64 = 0.25;
/// `rtt` bits meaning "not measured on this connection yet".
const NO_RTT: u64 = u64::MAX;

/// One alert of a device, as `GET /api/devices` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// `safety_stop`, `process_failed`, `battery_low` or `telemetry_gaps`.
    pub code: &'static str,
    /// A sentence for people.
    pub message: String,
    /// Since when, ms since the Unix epoch (relay clock).
    pub since: i64,
}

#[derive(Debug, Clone)]
struct GapRun {
    /// First gap of the run.
    since_ms: f64,
    /// Latest gap; the run ends [`GAP_WINDOW_MS`] after it.
    last_ms: f64,
    /// Frames skipped in the run and not filled by late (reordered) frames since.
    missing: u64,
    /// Stream of the latest gap.
    stream: String,
}

#[derive(Debug, Clone)]
struct FailingProcess {
    name: String,
    state: String,
    last_exit: Option<String>,
    restarts: u32,
    since_ms: f64,
}

/// What the relay knows about a device's health. Lives in the device's
/// [`crate::DeviceTelemetry`], so it is kept across reconnects and while the device is offline.
#[derive(Debug, Default)]
pub struct Health {
    battery: Option<f64>,
    /// When the battery last went below [`BATTERY_LOW_PERCENT`].
    battery_low_since: Option<f64>,
    gaps: Option<GapRun>,
    /// The last `safety_stop`, until a pilot acquires (or takes over) the lease.
    safety_stop: Option<Alert>,
    /// Processes `failed` or `restarting` in the last `process_state`.
    failing: Vec<FailingProcess>,
}

impl Health {
    /// A battery reading from a telemetry frame.
    pub fn battery(&mut self, percent: f64, now_ms: f64) {
        self.battery = Some(percent);
        if percent < BATTERY_LOW_PERCENT {
            self.battery_low_since.get_or_insert(now_ms);
        } else {
            self.battery_low_since = None;
        }
    }

    /// The last battery percent seen.
    pub fn battery_percent(&self) -> Option<f64> {
        self.battery
    }

    /// The sequence check's verdict on a frame of `stream`.
    pub fn verdict(&mut self, verdict: signaling::Verdict, stream: &str, now_ms: f64) {
        match verdict {
            signaling::Verdict::Gap { missing } => match &mut self.gaps {
                Some(run) if run.missing > 0 && now_ms - run.last_ms <= GAP_WINDOW_MS => {
                    run.last_ms = now_ms;
                    run.missing += missing;
                    if run.stream != stream {
                        stream.clone_into(&mut run.stream);
                    }
                }
                _ => self.gaps = Some(GapRun { since_ms: now_ms, last_ms: now_ms, missing, stream: stream.to_owned() }),
            },
            // A late frame fills one of the holes.
            signaling::Verdict::Reordered => {
                if let Some(run) = &mut self.gaps {
                    run.missing = run.missing.saturating_sub(1);
                }
            }
            _ => {}
        }
    }

    /// A `safety_stop` from the device, received at `now_ms`. A stop reported `late` happened
    /// at its own `timestamp` (device clock, mapped onto the relay's when the offset is known).
    pub fn safety_stop(&mut self, stop: &SafetyStop, now_ms: f64, clock: Option<ClockEstimate>) {
        let at = if stop.late && stop.timestamp.is_finite() {
            clock.map_or(stop.timestamp, |c| c.device_to_relay(stop.timestamp))
        } else {
            now_ms
        };
        let mut message = format!("safety stop ({}): {} at {}", stop.policy, stop.reason, clock_time(at));
        if let Some(c) = &stop.controller {
            message.push_str(&format!(", controller {c}"));
        }
        if stop.late {
            message.push_str(", reported late");
        }
        self.safety_stop = Some(Alert { code: "safety_stop", message, since: at as i64 });
    }

    /// A pilot acquired or took over the control lease: the robot's stop is cleared.
    pub fn lease_taken(&mut self) {
        self.safety_stop = None;
    }

    /// A `process_state` snapshot: remembers the processes that are `failed` or `restarting`,
    /// each since it was first seen so in an unbroken run of snapshots.
    pub fn process_state(&mut self, state: &ProcessState, now_ms: f64) {
        let before = std::mem::take(&mut self.failing);
        self.failing = state
            .processes
            .iter()
            .filter(|p| p.state == "failed" || p.state == "restarting")
            .map(|p| FailingProcess {
                name: p.name.clone(),
                state: p.state.clone(),
                last_exit: p.last_exit.clone(),
                restarts: p.restarts,
                since_ms: before.iter().find(|b| b.name == p.name).map_or(now_ms, |b| b.since_ms),
            })
            .collect();
    }

    /// The active alerts, most severe first; at most one per code.
    pub fn alerts(&self, now_ms: f64) -> Vec<Alert> {
        let mut out = Vec::new();
        if let Some(a) = &self.safety_stop {
            out.push(a.clone());
        }
        if !self.failing.is_empty() {
            let parts: Vec<String> = self
                .failing
                .iter()
                .map(|p| {
                    let mut s = format!("{} {}", p.name, p.state);
                    let mut why = Vec::new();
                    if let Some(e) = &p.last_exit {
                        why.push(e.clone());
                    }
                    if p.restarts > 0 {
                        why.push(format!("{} restart{}", p.restarts, if p.restarts == 1 { "" } else { "s" }));
                    }
                    if !why.is_empty() {
                        s.push_str(&format!(" ({})", why.join(", ")));
                    }
                    s
                })
                .collect();
            let since = self.failing.iter().map(|p| p.since_ms).fold(f64::INFINITY, f64::min);
            out.push(Alert {
                code: "process_failed",
                message: format!("process {}", parts.join("; ")),
                since: since as i64,
            });
        }
        if let (Some(b), Some(since)) = (self.battery, self.battery_low_since) {
            out.push(Alert { code: "battery_low", message: format!("battery low: {b} %"), since: since as i64 });
        }
        if let Some(run) = &self.gaps
            && run.missing > 0
            && now_ms - run.last_ms <= GAP_WINDOW_MS
        {
            let frames = if run.missing == 1 { "frame" } else { "frames" };
            out.push(Alert {
                code: "telemetry_gaps",
                message: format!(
                    "{} telemetry {frames} missing since {}, latest gap on stream {} at {}",
                    run.missing,
                    clock_time(run.since_ms),
                    run.stream,
                    clock_time(run.last_ms)
                ),
                since: run.since_ms as i64,
            });
        }
        out
    }
}

/// `HH:MM:SS UTC` of a Unix time in ms.
fn clock_time(ms: f64) -> String {
    let s = (ms / 1000.0).floor().rem_euclid(86_400.0) as u64;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}

/// The battery percent in a telemetry payload: the first number among `data.battery.percent`,
/// `data.battery_percent`, `data.battery` (a bare number) and `data.battery.level`. Only the
/// fields on those paths are looked at; everything else is skipped without being built.
pub fn battery_percent(payload: &RawValue) -> Option<f64> {
    #[derive(Deserialize)]
    struct Payload<'a> {
        #[serde(borrow, default)]
        data: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Data<'a> {
        #[serde(borrow, default)]
        battery: Option<&'a RawValue>,
        #[serde(borrow, default)]
        battery_percent: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Battery<'a> {
        #[serde(borrow, default)]
        percent: Option<&'a RawValue>,
        #[serde(borrow, default)]
        level: Option<&'a RawValue>,
    }
    fn number(v: Option<&RawValue>) -> Option<f64> {
        serde_json::from_str::<f64>(v?.get()).ok().filter(|n| n.is_finite())
    }
    // Objects only: serde would also fill these structs from arrays, by position.
    let data = serde_json::from_str::<Payload>(payload.get()).ok()?.data.filter(|d| d.get().starts_with('{'))?;
    let data = serde_json::from_str::<Data>(data.get()).ok()?;
    let nested =
        data.battery.filter(|b| b.get().starts_with('{')).and_then(|b| serde_json::from_str::<Battery>(b.get()).ok());
    number(nested.as_ref().and_then(|b| b.percent))
        .or_else(|| number(data.battery_percent))
        .or_else(|| number(data.battery))
        .or_else(|| number(nested.as_ref().and_then(|b| b.level)))
}

/// Reads the battery out of a connection's telemetry frames at most every
/// [`BATTERY_SAMPLE_EVERY`], and only from frames that mention `battery` at all; the rest of
/// the frames pay one comparison.
#[derive(Debug)]
pub struct BatterySampler {
    due: Instant,
}

impl BatterySampler {
    /// A sampler that reads the first frame.
    pub fn new(now: Instant) -> Self {
        BatterySampler { due: now }
    }

    /// The battery percent of a frame received at `now`, if this frame is sampled and has one.
    pub fn sample(&mut self, payload: &RawValue, now: Instant) -> Option<f64> {
        if now < self.due || !payload.get().contains("battery") {
            return None;
        }
        self.due = now + BATTERY_SAMPLE_EVERY;
        battery_percent(payload)
    }
}

/// When the relay last heard from a device, and the round trip of its clock syncs.
#[derive(Debug)]
pub struct DeviceLink {
    /// Ms since the relay started ([`crate::Relay::started`]) of the last message received.
    heard: AtomicU64,
    /// Smoothed round trip, ms, as `f64` bits; [`NO_RTT`] before the connection's first sample.
    rtt: AtomicU64,
}

impl Default for DeviceLink {
    fn default() -> Self {
        DeviceLink { heard: AtomicU64::new(0), rtt: AtomicU64::new(NO_RTT) }
    }
}

impl DeviceLink {
    /// A new connection of the device, at `since_start` (relay uptime): no round trip yet.
    pub fn connected(&self, since_start: Duration) {
        self.rtt.store(NO_RTT, Relaxed);
        self.heard(since_start);
    }

    /// Something arrived from the device at `since_start` (relay uptime).
    pub fn heard(&self, since_start: Duration) {
        self.heard.store(since_start.as_millis() as u64, Relaxed);
    }

    /// A clock-sync round trip; returns the new smoothed value. Only the device's connection
    /// writes it, so load-then-store is not a race.
    pub fn rtt_sample(&self, rtt_ms: f64) -> f64 {
        let smoothed = match self.rtt_ms() {
            Some(old) => old + RTT_GAIN * (rtt_ms - old),
            None => rtt_ms,
        };
        self.rtt.store(smoothed.to_bits(), Relaxed);
        smoothed
    }

    /// The smoothed round trip, if measured on the current connection.
    pub fn rtt_ms(&self) -> Option<f64> {
        let bits = self.rtt.load(Relaxed);
        (bits != NO_RTT).then(|| f64::from_bits(bits))
    }

    /// Ms since the last message, given the relay's uptime `now_since_start`.
    pub fn silent_ms(&self, now_since_start: Duration) -> u64 {
        (now_since_start.as_millis() as u64).saturating_sub(self.heard.load(Relaxed))
    }
}

/// `good`, `fair` or `poor` (docs/api.md, `GET /api/devices`).
pub fn quality(rtt_ms: Option<f64>, silent_ms: u64) -> &'static str {
    if silent_ms >= POOR_SILENCE_MS || rtt_ms.is_some_and(|r| r > POOR_RTT_MS) {
        "poor"
    } else if silent_ms < GOOD_SILENCE_MS && rtt_ms.is_some_and(|r| r < GOOD_RTT_MS) {
        "good"
    } else {
        "fair"
    }
}

/// Every device's [`DeviceLink`].
#[derive(Debug, Default)]
pub struct Links {
    map: Mutex<HashMap<String, Arc<DeviceLink>>>,
}

impl Links {
    /// The link state of `device`, created on first use (once per connection).
    pub fn of(&self, device: &str) -> Arc<DeviceLink> {
        self.map.lock().entry(device.to_owned()).or_default().clone()
    }

    /// The link state of `device`, if it ever connected.
    pub fn get(&self, device: &str) -> Option<Arc<DeviceLink>> {
        self.map.lock().get(device).cloned()
    }
}

/// The `battery`, `link` and `alerts` fields of one device in `GET /api/devices`.
pub fn summary(relay: &crate::Relay, device: &str, online: bool) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::{Value, json};
    let now = relay.clock.now_ms();
    let (battery, alerts) = match relay.peek_device_telemetry(device) {
        Some(t) => {
            let t = t.lock();
            (t.health.battery_percent(), t.health.alerts(now))
        }
        None => (None, Vec::new()),
    };
    let link = match relay.links.get(device) {
        Some(l) if online => {
            let (rtt, silent) = (l.rtt_ms(), l.silent_ms(relay.started.elapsed()));
            json!({"rttMs": rtt.map(|r| (r * 10.0).round() / 10.0), "lastMessageMs": silent, "quality": quality(rtt, silent)})
        }
        _ => Value::Null,
    };
    let mut m = serde_json::Map::new();
    m.insert("battery".into(), battery.map_or(Value::Null, |b| json!(b)));
    m.insert("link".into(), link);
    m.insert("alerts".into(), json!(alerts));
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use signaling::message::ProcessInfo;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn battery_paths_in_order() {
        let b = |data: &str| battery_percent(&raw(&format!(r#"{{"sequence":1,"timestamp":2,"data":{data}}}"#)));
        assert_eq!(b(r#"{"battery":{"percent":97.4,"level":3}}"#), Some(97.4));
        assert_eq!(b(r#"{"battery_percent":55,"battery":{"level":3}}"#), Some(55.0));
        assert_eq!(b(r#"{"battery":42}"#), Some(42.0));
        assert_eq!(b(r#"{"battery":{"level":0.5,"voltage":12}}"#), Some(0.5));
        assert_eq!(b(r#"{"battery":{"percent":"full"},"battery_percent":null}"#), None);
        assert_eq!(b(r#"{"gps":{"battery":10}}"#), None, "only the documented paths");
        assert_eq!(b(r#"[1,2]"#), None);
        assert_eq!(battery_percent(&raw(r#"{"sequence":1,"timestamp":2}"#)), None);
    }

    #[test]
    fn battery_is_sampled_at_most_once_a_second() {
        let t = Instant::now();
        let mut s = BatterySampler::new(t);
        let frame = |p: u32| raw(&format!(r#"{{"data":{{"battery":{{"percent":{p}}}}}}}"#));
        assert_eq!(s.sample(&raw(r#"{"data":{"speed":1}}"#), t), None);
        assert_eq!(s.sample(&frame(50), t), Some(50.0), "a frame without battery does not use up the turn");
        assert_eq!(s.sample(&frame(49), t + Duration::from_millis(500)), None);
        assert_eq!(s.sample(&frame(48), t + BATTERY_SAMPLE_EVERY), Some(48.0));
    }

    #[test]
    fn link_quality_thresholds() {
        assert_eq!(quality(Some(20.0), 100), "good");
        assert_eq!(quality(None, 100), "fair", "an unmeasured link is not called good");
        assert_eq!(quality(Some(200.0), 100), "fair");
        assert_eq!(quality(Some(20.0), 6_000), "fair");
        assert_eq!(quality(Some(600.0), 100), "poor");
        assert_eq!(quality(Some(20.0), 15_000), "poor");
        let l = DeviceLink::default();
        assert_eq!(l.rtt_ms(), None);
        assert_eq!(l.rtt_sample(100.0), 100.0);
        assert_eq!(l.rtt_sample(200.0), 125.0);
        l.heard(Duration::from_millis(1_000));
        assert_eq!(l.silent_ms(Duration::from_millis(3_500)), 2_500);
        l.connected(Duration::from_millis(4_000));
        assert_eq!(l.rtt_ms(), None);
    }

    #[test]
    fn alerts_start_and_clear() {
        let mut h = Health::default();
        let t0 = 1_732_262_584_000.0; // 08:03:04 UTC
        assert!(h.alerts(t0).is_empty());
        h.battery(15.0, t0);
        h.battery(14.0, t0 + 1000.0);
        let stop = SafetyStop {
            policy: "hold".into(),
            reason: "controller_silent".into(),
            timestamp: 5.0,
            ..Default::default()
        };
        h.safety_stop(&stop, t0, None);
        let proc = |name: &str, state: &str| ProcessInfo {
            name: name.into(),
            state: state.into(),
            restarts: 4,
            last_exit: Some("signal 9".into()),
            ..Default::default()
        };
        h.process_state(&ProcessState { processes: vec![proc("ros", "running"), proc("camera", "restarting")] }, t0);
        h.process_state(&ProcessState { processes: vec![proc("camera", "restarting")] }, t0 + 5.0);
        h.verdict(signaling::Verdict::Gap { missing: 3 }, "imu", t0);
        let a = h.alerts(t0 + 10.0);
        let codes: Vec<_> = a.iter().map(|a| a.code).collect();
        assert_eq!(codes, ["safety_stop", "process_failed", "battery_low", "telemetry_gaps"]);
        assert_eq!(a[0].message, "safety stop (hold): controller_silent at 08:03:04 UTC");
        assert_eq!(a[1].message, "process camera restarting (signal 9, 4 restarts)");
        assert_eq!(a[1].since, t0 as i64, "kept while it stays failing");
        assert_eq!((a[2].message.as_str(), a[2].since), ("battery low: 14 %", t0 as i64));
        assert!(a[3].message.starts_with("3 telemetry frames missing"), "{}", a[3].message);

        h.lease_taken();
        h.battery(80.0, t0);
        h.process_state(&ProcessState { processes: vec![proc("camera", "running")] }, t0);
        // Late frames fill holes; gaps age out after the window.
        h.verdict(signaling::Verdict::Reordered, "imu", t0);
        assert_eq!(h.alerts(t0)[0].message.split(' ').next(), Some("2"));
        assert!(h.alerts(t0 + GAP_WINDOW_MS + 1.0).is_empty());

        // A late stop dates from its own timestamp, mapped onto the relay clock.
        let late = SafetyStop { late: true, timestamp: t0 + 2000.0, controller: Some("ana".into()), ..stop };
        let est = ClockEstimate { offset_ms: 2000.0, rtt_ms: 1.0, uncertainty_ms: 0.5, drift_ppm: 0.0, samples: 1 };
        h.safety_stop(&late, t0 + 60_000.0, Some(est));
        let a = h.alerts(t0 + 60_000.0);
        assert_eq!(a[0].since, t0 as i64);
        assert!(a[0].message.ends_with("controller ana, reported late"), "{}", a[0].message);
    }
}
