//! Rate limits (governor), so that one abusive client cannot hurt the rest:
//!
//! - **per connection**: messages per second and bytes per second, each with a burst of twice
//!   the rate. Over the limit, the message is not processed and the sender gets
//!   `rate_limited` with `retryAfterMs` (at most one such error per second, saying how many
//!   messages it covers, so the answer cannot become a flood of its own);
//! - **per credential**: connection attempts per minute (a device stuck in a reconnect loop,
//!   a leaked key);
//! - **per IP address**: failed authentications per minute; past it, the address is refused
//!   without checking credentials (no bcrypt work) until the limit refills.
//!
//! Defaults come from the relay config; a device or operator may carry overrides (its
//! `limits_json`, set with `PUT /api/limits/<id>`), the "can be increased per user" of seed 001.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;
use serde::Serialize;

/// Per-principal overrides of the default limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Overrides {
    /// Messages per second on one connection.
    #[serde(rename = "messagesPerSecond", skip_serializing_if = "Option::is_none")]
    pub messages_per_second: Option<u32>,
    /// Bytes per second on one connection.
    #[serde(rename = "bytesPerSecond", skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<u32>,
    /// Connection attempts per minute.
    #[serde(rename = "connectionsPerMinute", skip_serializing_if = "Option::is_none")]
    pub connections_per_minute: Option<u32>,
    /// Offline queue capacity (devices).
    #[serde(rename = "queueLimit", skip_serializing_if = "Option::is_none")]
    pub queue_limit: Option<u32>,
    /// Offline queue time to live in seconds (devices).
    #[serde(rename = "queueTtlSecs", skip_serializing_if = "Option::is_none")]
    pub queue_ttl_secs: Option<u32>,
}

impl Overrides {
    /// Parses and validates `{"messagesPerSecond":..,"bytesPerSecond":..,...}`.
    pub fn from_json(v: &serde_json::Value) -> Result<Overrides, String> {
        let obj = v.as_object().ok_or("limits must be a JSON object")?;
        let mut o = Overrides::default();
        for (k, val) in obj {
            let n = val
                .as_u64()
                .filter(|n| *n > 0 && *n <= u32::MAX as u64)
                .ok_or(format!("{k} must be a positive integer"))? as u32;
            match k.as_str() {
                "messagesPerSecond" => o.messages_per_second = Some(n),
                "bytesPerSecond" => o.bytes_per_second = Some(n),
                "connectionsPerMinute" => o.connections_per_minute = Some(n),
                "queueLimit" => o.queue_limit = Some(n),
                "queueTtlSecs" => o.queue_ttl_secs = Some(n),
                other => return Err(format!("unknown limit {other:?}")),
            }
        }
        Ok(o)
    }

    /// Parses stored overrides; bad stored JSON means no overrides.
    pub fn from_stored(text: Option<&str>) -> Overrides {
        text.and_then(|t| serde_json::from_str(t).ok()).and_then(|v| Overrides::from_json(&v).ok()).unwrap_or_default()
    }
}

/// The defaults (from the relay config).
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    /// Messages per second per connection.
    pub messages_per_second: u32,
    /// Bytes per second per connection.
    pub bytes_per_second: u32,
    /// Connection attempts per minute per credential.
    pub connections_per_minute: u32,
    /// Failed authentications per minute per IP address.
    pub auth_failures_per_minute: u32,
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).expect("max(1) is non-zero")
}

/// One connection's limiters.
#[derive(Debug)]
pub struct ConnLimiter {
    messages: DefaultDirectRateLimiter,
    bytes: DefaultDirectRateLimiter,
    bytes_burst: u32,
    clock: DefaultClock,
    /// Messages refused since the last `rate_limited` error was sent.
    pub refused_unreported: u64,
    /// When the last `rate_limited` error was sent.
    pub last_report: Option<Instant>,
}

impl ConnLimiter {
    /// Admits one message of `len` bytes, or says how long until one would be admitted.
    pub fn admit(&mut self, len: usize) -> Result<(), Duration> {
        if let Err(nu) = self.messages.check() {
            return Err(nu.wait_time_from(self.clock.now()));
        }
        // A single message bigger than the whole burst is admitted against the full burst
        // (the size limit, not the rate limit, is what bounds one message).
        let n = nz((len as u64).min(self.bytes_burst as u64) as u32);
        match self.bytes.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(nu)) => Err(nu.wait_time_from(self.clock.now())),
            Err(_) => Err(Duration::from_secs(1)),
        }
    }
}

/// Relay-wide limiter state.
#[derive(Debug)]
pub struct Limits {
    defaults: Defaults,
    ip_failures: DefaultKeyedRateLimiter<String>,
    /// IP -> refused until.
    ip_blocked: Mutex<HashMap<String, Instant>>,
    /// Per-principal connection limiters and when each was last used.
    connects: Mutex<HashMap<String, (Arc<DefaultDirectRateLimiter>, Instant)>>,
    clock: DefaultClock,
}

impl Limits {
    /// Limits with these defaults.
    pub fn new(defaults: Defaults) -> Self {
        Limits {
            defaults,
            ip_failures: RateLimiter::keyed(Quota::per_minute(nz(defaults.auth_failures_per_minute))),
            ip_blocked: Mutex::new(HashMap::new()),
            connects: Mutex::new(HashMap::new()),
            clock: DefaultClock::default(),
        }
    }

    /// The defaults.
    pub fn defaults(&self) -> Defaults {
        self.defaults
    }

    /// Whether `ip` is refused for now after too many failed authentications, and for how long.
    pub fn ip_blocked_for(&self, ip: &str) -> Option<Duration> {
        let mut b = self.ip_blocked.lock();
        let now = Instant::now();
        match b.get(ip) {
            Some(until) if *until > now => Some(*until - now),
            Some(_) => {
                b.remove(ip);
                None
            }
            None => None,
        }
    }

    /// Whether `ip` is refused for now.
    pub fn ip_blocked(&self, ip: &str) -> bool {
        self.ip_blocked_for(ip).is_some()
    }

    /// Records a failed authentication from `ip`.
    pub fn auth_failed(&self, ip: &str) {
        if let Err(nu) = self.ip_failures.check_key(&ip.to_owned()) {
            let wait = nu.wait_time_from(self.clock.now()).max(Duration::from_secs(1));
            tracing::warn!(%ip, "too many failed authentications; refusing this address for {:.0} s", wait.as_secs_f64());
            self.ip_blocked.lock().insert(ip.to_owned(), Instant::now() + wait);
        }
    }

    /// Admits a connection by `principal`, or says how long until one would be admitted.
    pub fn connect(&self, principal: &str, o: &Overrides) -> Result<(), Duration> {
        let per_min = o.connections_per_minute.unwrap_or(self.defaults.connections_per_minute);
        let limiter = {
            let mut m = self.connects.lock();
            let e = m
                .entry(principal.to_owned())
                .or_insert_with(|| (Arc::new(RateLimiter::direct(Quota::per_minute(nz(per_min)))), Instant::now()));
            e.1 = Instant::now();
            e.0.clone()
        };
        limiter.check().map_err(|nu| nu.wait_time_from(self.clock.now()))
    }

    /// Limiters for a new connection of a principal with these overrides.
    pub fn for_connection(&self, o: &Overrides) -> ConnLimiter {
        let mps = o.messages_per_second.unwrap_or(self.defaults.messages_per_second);
        let bps = o.bytes_per_second.unwrap_or(self.defaults.bytes_per_second);
        ConnLimiter {
            messages: RateLimiter::direct(Quota::per_second(nz(mps)).allow_burst(nz(mps.saturating_mul(2)))),
            bytes: RateLimiter::direct(Quota::per_second(nz(bps)).allow_burst(nz(bps.saturating_mul(2)))),
            bytes_burst: bps.saturating_mul(2).max(1),
            clock: DefaultClock::default(),
            refused_unreported: 0,
            last_report: None,
        }
    }

    /// Forgets idle limiter state (called periodically).
    pub fn sweep(&self) {
        self.ip_failures.retain_recent();
        let now = Instant::now();
        self.ip_blocked.lock().retain(|_, until| *until > now);
        // A per-minute limiter unused for two minutes has refilled completely: forgetting it
        // loses nothing.
        self.connects.lock().retain(|_, (_, last)| now.duration_since(*last) < Duration::from_secs(120));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::new(Defaults {
            messages_per_second: 10,
            bytes_per_second: 1000,
            connections_per_minute: 3,
            auth_failures_per_minute: 2,
        })
    }

    #[test]
    fn messages_over_the_burst_are_refused_with_a_wait() {
        let l = limits();
        let mut c = l.for_connection(&Overrides::default());
        let admitted = (0..100).filter(|_| c.admit(10).is_ok()).count();
        assert!((20..=22).contains(&admitted), "burst of 2x the rate: {admitted}");
        let wait = c.admit(10).unwrap_err();
        assert!(wait <= Duration::from_millis(200));
    }

    #[test]
    fn bytes_are_limited_too_and_overrides_raise_limits() {
        let l = limits();
        let mut c = l.for_connection(&Overrides::default());
        assert!(c.admit(1500).is_ok());
        assert!(c.admit(1500).is_err(), "2000-byte burst exhausted");
        let mut big = l.for_connection(&Overrides {
            bytes_per_second: Some(1_000_000),
            messages_per_second: Some(1000),
            ..Default::default()
        });
        assert!((0..100).all(|_| big.admit(1500).is_ok()));
    }

    #[test]
    fn auth_failures_block_an_ip_and_connects_are_limited_per_principal() {
        let l = limits();
        assert!(!l.ip_blocked("1.2.3.4"));
        l.auth_failed("1.2.3.4");
        l.auth_failed("1.2.3.4");
        assert!(!l.ip_blocked("1.2.3.4"));
        l.auth_failed("1.2.3.4");
        assert!(l.ip_blocked("1.2.3.4"));
        assert!(!l.ip_blocked("5.6.7.8"), "other addresses are unaffected");
        let o = Overrides::default();
        assert!((0..3).all(|_| l.connect("dev-1", &o).is_ok()));
        assert!(l.connect("dev-1", &o).is_err());
        assert!(l.connect("dev-2", &o).is_ok());
    }

    #[test]
    fn overrides_validate() {
        assert!(Overrides::from_json(&serde_json::json!({"messagesPerSecond": 5})).is_ok());
        assert!(Overrides::from_json(&serde_json::json!({"messagesPerSecond": 0})).is_err());
        assert!(Overrides::from_json(&serde_json::json!({"nope": 1})).is_err());
        assert!(Overrides::from_json(&serde_json::json!([1])).is_err());
    }
}
