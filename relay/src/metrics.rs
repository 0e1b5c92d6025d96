//! Counters for `/metrics` (Prometheus text format). Plain atomics: incrementing one is a
//! single uncontended instruction on the hot path.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use signaling::{Body, ErrorCode};

use crate::hub::ConnCounts;

const N_TYPES: usize = Body::TYPES.len();

/// Index of a message type in [`Body::TYPES`]; unknown types share the last slot.
pub fn type_index(ty: &str) -> usize {
    Body::TYPES.iter().position(|t| *t == ty).unwrap_or(N_TYPES)
}

fn type_label(i: usize) -> &'static str {
    Body::TYPES.get(i).copied().unwrap_or("other")
}

/// Every counter the relay exports.
#[derive(Debug)]
pub struct Metrics {
    messages_in: [AtomicU64; N_TYPES + 1],
    messages_out: [AtomicU64; N_TYPES + 1],
    /// Bytes received in text frames.
    pub bytes_in: AtomicU64,
    /// Bytes written in text frames.
    pub bytes_out: AtomicU64,
    /// Telemetry deliveries to subscribers.
    pub telemetry_delivered: AtomicU64,
    /// Telemetry frames dropped from slow subscribers' queues.
    pub telemetry_dropped: AtomicU64,
    /// Frames judged `gap`, and the numbers they skipped.
    pub sequence_gaps: AtomicU64,
    /// Sum of missing numbers over all gaps.
    pub sequence_missing: AtomicU64,
    /// Frames judged `duplicate`.
    pub sequence_duplicates: AtomicU64,
    /// Frames judged `reordered`.
    pub sequence_reordered: AtomicU64,
    /// Frames judged `reset`.
    pub sequence_resets: AtomicU64,
    /// Failed authentications (bad secret, key, ticket, timeout).
    pub auth_failures: AtomicU64,
    /// Connections accepted since start.
    pub connections_opened: AtomicU64,
    /// Connections closed because their control queue overflowed.
    pub slow_consumers: AtomicU64,
    /// Messages refused by rate limits.
    pub rate_limited: AtomicU64,
    errors: [AtomicU64; 32], // more than ErrorCode::ALL.len(); checked by a test
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            messages_in: std::array::from_fn(|_| AtomicU64::new(0)),
            messages_out: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            telemetry_delivered: AtomicU64::new(0),
            telemetry_dropped: AtomicU64::new(0),
            sequence_gaps: AtomicU64::new(0),
            sequence_missing: AtomicU64::new(0),
            sequence_duplicates: AtomicU64::new(0),
            sequence_reordered: AtomicU64::new(0),
            sequence_resets: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            connections_opened: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

const ERROR_CODES: &[ErrorCode] = ErrorCode::ALL;

impl Metrics {
    /// Counts one received message of type index `i` (see [`type_index`]).
    pub fn count_in(&self, i: usize, bytes: usize) {
        self.messages_in[i.min(N_TYPES)].fetch_add(1, Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Relaxed);
    }

    /// Counts `n` messages of type index `i` queued for sending.
    pub fn count_out(&self, i: usize, n: u64) {
        self.messages_out[i.min(N_TYPES)].fetch_add(n, Relaxed);
    }

    /// Counts an `error` sent with `code`.
    pub fn count_error(&self, code: ErrorCode) {
        if let Some(i) = ERROR_CODES.iter().position(|c| *c == code) {
            self.errors[i].fetch_add(1, Relaxed);
        }
    }

    /// Renders the Prometheus exposition text.
    pub fn render(&self, conns: ConnCounts, uptime_secs: f64) -> String {
        let mut o = String::with_capacity(8192);
        let counter = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let _ = writeln!(
            o,
            "# HELP tether_uptime_seconds Seconds since the relay started.\n# TYPE tether_uptime_seconds gauge\ntether_uptime_seconds {uptime_secs:.3}"
        );
        let _ = writeln!(
            o,
            "# HELP tether_connections Live authenticated connections by role.\n# TYPE tether_connections gauge"
        );
        for (role, n) in [("device", conns.device), ("pilot", conns.pilot), ("admin", conns.admin)] {
            let _ = writeln!(o, "tether_connections{{role=\"{role}\"}} {n}");
        }
        counter(
            &mut o,
            "tether_connections_opened_total",
            "WebSocket connections accepted.",
            self.connections_opened.load(Relaxed),
        );
        let _ = writeln!(
            o,
            "# HELP tether_messages_in_total Messages received, by type.\n# TYPE tether_messages_in_total counter"
        );
        for (i, c) in self.messages_in.iter().enumerate() {
            let v = c.load(Relaxed);
            if v > 0 {
                let _ = writeln!(o, "tether_messages_in_total{{type=\"{}\"}} {v}", type_label(i));
            }
        }
        let _ = writeln!(
            o,
            "# HELP tether_messages_out_total Messages queued for sending, by type.\n# TYPE tether_messages_out_total counter"
        );
        for (i, c) in self.messages_out.iter().enumerate() {
            let v = c.load(Relaxed);
            if v > 0 {
                let _ = writeln!(o, "tether_messages_out_total{{type=\"{}\"}} {v}", type_label(i));
            }
        }
        counter(&mut o, "tether_bytes_in_total", "Bytes received in text frames.", self.bytes_in.load(Relaxed));
        counter(&mut o, "tether_bytes_out_total", "Bytes sent in text frames.", self.bytes_out.load(Relaxed));
        counter(
            &mut o,
            "tether_telemetry_delivered_total",
            "Telemetry frames queued to subscribers.",
            self.telemetry_delivered.load(Relaxed),
        );
        counter(
            &mut o,
            "tether_telemetry_dropped_total",
            "Telemetry frames dropped from slow subscribers' queues.",
            self.telemetry_dropped.load(Relaxed),
        );
        counter(
            &mut o,
            "tether_sequence_gaps_total",
            "Telemetry frames that arrived after a gap.",
            self.sequence_gaps.load(Relaxed),
        );
        counter(
            &mut o,
            "tether_sequence_missing_total",
            "Sequence numbers skipped by gaps.",
            self.sequence_missing.load(Relaxed),
        );
        counter(
            &mut o,
            "tether_sequence_duplicates_total",
            "Telemetry frames seen twice.",
            self.sequence_duplicates.load(Relaxed),
        );
        counter(
            &mut o,
            "tether_sequence_reordered_total",
            "Telemetry frames that arrived late and filled a gap.",
            self.sequence_reordered.load(Relaxed),
        );
        counter(
            &mut o,
            "tether_sequence_resets_total",
            "Telemetry sequence counter restarts.",
            self.sequence_resets.load(Relaxed),
        );
        counter(&mut o, "tether_auth_failures_total", "Failed authentications.", self.auth_failures.load(Relaxed));
        counter(
            &mut o,
            "tether_rate_limited_total",
            "Messages refused by rate limits.",
            self.rate_limited.load(Relaxed),
        );
        counter(
            &mut o,
            "tether_slow_consumer_closes_total",
            "Connections closed because they stopped reading.",
            self.slow_consumers.load(Relaxed),
        );
        let _ =
            writeln!(o, "# HELP tether_errors_total Error messages sent, by code.\n# TYPE tether_errors_total counter");
        for (i, code) in ERROR_CODES.iter().enumerate() {
            let v = self.errors[i].load(Relaxed);
            if v > 0 {
                let _ = writeln!(o, "tether_errors_total{{code=\"{code}\"}} {v}");
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_error_code_has_a_counter() {
        assert!(super::ERROR_CODES.len() <= 32);
    }
}
