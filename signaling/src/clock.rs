//! NTP-style clock-offset estimation between the relay and a device.
//!
//! One exchange gives four timestamps: `t1` relay send, `t2` device receive, `t3` device send,
//! `t4` relay receive (the relay's and the device's own clocks, in ms). From them:
//!
//! - offset `θ = ((t2 - t1) + (t3 - t4)) / 2`: device clock minus relay clock;
//! - round trip `δ = (t4 - t1) - (t3 - t2)`.
//!
//! If the two directions took different times, θ is wrong by half their difference, which is at
//! most δ/2. So the sample with the smallest round trip has the tightest bound, and the filter
//! keeps a window of recent samples and trusts the minimum-RTT one ("minimum-RTT samples win").
//! Clocks also drift (crystals are off by tens of ppm); when the window holds enough good
//! samples over enough time, the drift is fitted by least squares and the best sample's offset
//! is carried forward to `now` along it. The reported uncertainty is δ/2 of the best sample plus
//! a drift allowance for the time since it was taken.
//!
//! Sans-IO: the caller owns the clock and passes every timestamp, including `now`.

use std::collections::VecDeque;

/// Default number of exchanges remembered.
pub const DEFAULT_WINDOW: usize = 16;
/// Drift assumed possible when bounding the error of an old sample, in parts per million.
pub const DRIFT_BOUND_PPM: f64 = 100.0;
/// Largest drift the fit will report; more than this is a bad fit, not a real clock.
pub const MAX_FITTED_DRIFT_PPM: f64 = 1000.0;

/// One completed exchange.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClockSample {
    /// Device clock minus relay clock, ms.
    pub offset_ms: f64,
    /// Network round trip, ms (excluding the device's processing time).
    pub rtt_ms: f64,
    /// Relay clock when the exchange completed (`t4`), ms.
    pub at_ms: f64,
}

/// The filter's current answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClockEstimate {
    /// Device clock minus relay clock at `now`, ms.
    pub offset_ms: f64,
    /// Round trip of the sample the estimate rests on, ms.
    pub rtt_ms: f64,
    /// Bound on the offset's error, ms.
    pub uncertainty_ms: f64,
    /// Fitted drift of the device clock against the relay's, ppm (0 until it can be fitted).
    pub drift_ppm: f64,
    /// Samples in the window.
    pub samples: usize,
}

impl ClockEstimate {
    /// Maps a device timestamp onto the relay clock.
    pub fn device_to_relay(&self, device_ms: f64) -> f64 {
        device_ms - self.offset_ms
    }
}

/// Why an exchange was rejected.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ClockError {
    /// `t4 < t1` or `t3 < t2`, or a timestamp is not finite: the exchange is corrupt.
    #[error("timestamps are not a valid exchange (negative round trip or non-finite values)")]
    InvalidExchange,
}

/// The offset filter for one device.
#[derive(Debug, Clone)]
pub struct ClockSync {
    samples: VecDeque<ClockSample>,
    capacity: usize,
}

impl Default for ClockSync {
    fn default() -> Self {
        Self::new(DEFAULT_WINDOW)
    }
}

impl ClockSync {
    /// A filter remembering the last `capacity` exchanges.
    pub fn new(capacity: usize) -> Self {
        ClockSync { samples: VecDeque::with_capacity(capacity.max(1)), capacity: capacity.max(1) }
    }

    /// Adds one exchange; returns the sample it produced.
    pub fn add(&mut self, t1: f64, t2: f64, t3: f64, t4: f64) -> Result<ClockSample, ClockError> {
        if ![t1, t2, t3, t4].iter().all(|t| t.is_finite()) || t4 < t1 || t3 < t2 {
            return Err(ClockError::InvalidExchange);
        }
        let rtt = ((t4 - t1) - (t3 - t2)).max(0.0);
        let sample = ClockSample { offset_ms: ((t2 - t1) + (t3 - t4)) / 2.0, rtt_ms: rtt, at_ms: t4 };
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
        Ok(sample)
    }

    /// Samples currently in the window, oldest first.
    pub fn samples(&self) -> impl Iterator<Item = &ClockSample> {
        self.samples.iter()
    }

    /// The current estimate at relay time `now_ms`, or `None` before the first exchange.
    pub fn estimate(&self, now_ms: f64) -> Option<ClockEstimate> {
        let best = *self.samples.iter().min_by(|a, b| a.rtt_ms.total_cmp(&b.rtt_ms))?;
        let drift = self.fit_drift(best.rtt_ms);
        let since = now_ms - best.at_ms;
        let offset = best.offset_ms + drift.unwrap_or(0.0) * since;
        let uncertainty = best.rtt_ms / 2.0 + since.abs() * DRIFT_BOUND_PPM * 1e-6;
        Some(ClockEstimate {
            offset_ms: offset,
            rtt_ms: best.rtt_ms,
            uncertainty_ms: uncertainty,
            drift_ppm: drift.map_or(0.0, |d| d * 1e6),
            samples: self.samples.len(),
        })
    }

    /// Least-squares slope of offset over time, using only samples whose round trip is close to
    /// the best (their offsets are trustworthy). Needs three such samples spread over at least
    /// ten seconds; the slope is in ms per ms.
    fn fit_drift(&self, best_rtt: f64) -> Option<f64> {
        let good: Vec<&ClockSample> = self.samples.iter().filter(|s| s.rtt_ms <= best_rtt * 1.5 + 1.0).collect();
        if good.len() < 3 {
            return None;
        }
        let span = good.last()?.at_ms - good.first()?.at_ms;
        if span < 10_000.0 {
            return None;
        }
        let n = good.len() as f64;
        let mx = good.iter().map(|s| s.at_ms).sum::<f64>() / n;
        let my = good.iter().map(|s| s.offset_ms).sum::<f64>() / n;
        let sxx: f64 = good.iter().map(|s| (s.at_ms - mx).powi(2)).sum();
        let sxy: f64 = good.iter().map(|s| (s.at_ms - mx) * (s.offset_ms - my)).sum();
        if sxx <= 0.0 {
            return None;
        }
        let slope = sxy / sxx;
        (slope.abs() * 1e6 <= MAX_FITTED_DRIFT_PPM).then_some(slope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated device clock: `device(t) = t + offset + drift * t` for relay time `t`.
    struct Sim {
        offset: f64,
        drift: f64,
    }

    impl Sim {
        fn device(&self, t: f64) -> f64 {
            t + self.offset + self.drift * t
        }

        /// One exchange starting at relay time `t1` with the given one-way delays.
        fn exchange(&self, sync: &mut ClockSync, t1: f64, up: f64, down: f64, processing: f64) -> f64 {
            let t2 = self.device(t1 + down);
            let t3 = self.device(t1 + down + processing);
            let t4 = t1 + down + processing + up;
            sync.add(t1, t2, t3, t4).unwrap();
            t4
        }

        fn true_offset(&self, t: f64) -> f64 {
            self.device(t) - t
        }
    }

    /// Deterministic pseudo-random numbers in [0, 1) (xorshift), so tests need no RNG crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn symmetric_delay_gives_exact_offset() {
        let sim = Sim { offset: 5_000.0, drift: 0.0 };
        let mut sync = ClockSync::default();
        let t4 = sim.exchange(&mut sync, 1_000.0, 10.0, 10.0, 1.0);
        let e = sync.estimate(t4).unwrap();
        assert!((e.offset_ms - 5_000.0).abs() < 1e-9);
        assert!((e.rtt_ms - 20.0).abs() < 1e-9);
        assert!((e.uncertainty_ms - 10.0).abs() < 1e-6);
        assert!((e.device_to_relay(sim.device(2_000.0)) - 2_000.0).abs() < 1e-9);
    }

    #[test]
    fn negative_skew_is_estimated_too() {
        let sim = Sim { offset: -123_456.0, drift: 0.0 };
        let mut sync = ClockSync::default();
        let t4 = sim.exchange(&mut sync, 50.0, 3.0, 3.0, 0.0);
        assert!((sync.estimate(t4).unwrap().offset_ms + 123_456.0).abs() < 1e-9);
    }

    #[test]
    fn asymmetric_delay_error_stays_within_reported_uncertainty() {
        let sim = Sim { offset: 42.0, drift: 0.0 };
        let mut sync = ClockSync::default();
        // Uplink 4G congestion: 80 ms up, 10 ms down.
        let t4 = sim.exchange(&mut sync, 0.0, 80.0, 10.0, 2.0);
        let e = sync.estimate(t4).unwrap();
        let err = (e.offset_ms - 42.0).abs();
        assert!((err - 35.0).abs() < 1e-9, "error is half the asymmetry: {err}");
        assert!(err <= e.uncertainty_ms, "{err} > {}", e.uncertainty_ms);
    }

    #[test]
    fn minimum_rtt_sample_wins_over_jittery_ones() {
        let sim = Sim { offset: 1_000.0, drift: 0.0 };
        let mut sync = ClockSync::default();
        let mut rng = Rng(7);
        let mut t = 0.0;
        for i in 0..16 {
            // Mostly congested and asymmetric; one quiet exchange.
            let (up, down) = if i == 9 { (5.0, 5.0) } else { (20.0 + 200.0 * rng.next(), 5.0 + 20.0 * rng.next()) };
            t = sim.exchange(&mut sync, t + 1_000.0, up, down, 1.0);
        }
        let e = sync.estimate(t).unwrap();
        assert!((e.rtt_ms - 10.0).abs() < 1e-9);
        assert!((e.offset_ms - 1_000.0).abs() < 0.5, "{}", e.offset_ms);
        // A plain mean over the same window would be far off.
        let mean = sync.samples().map(|s| s.offset_ms).sum::<f64>() / 16.0;
        assert!((mean - 1_000.0).abs() > 10.0, "the test needs jitter that fools a mean: {mean}");
    }

    #[test]
    fn drift_is_fitted_and_followed() {
        // The device clock runs 80 ppm fast and starts 300 ms ahead.
        let sim = Sim { offset: 300.0, drift: 80e-6 };
        let mut sync = ClockSync::default();
        let mut rng = Rng(99);
        let mut t = 0.0;
        for _ in 0..16 {
            let d = 8.0 + 4.0 * rng.next();
            t = sim.exchange(&mut sync, t + 20_000.0, d, d, 0.5);
        }
        // Ask 30 s after the last exchange: the offset has moved 2.4 ms since then.
        let now = t + 30_000.0;
        let e = sync.estimate(now).unwrap();
        assert!((e.drift_ppm - 80.0).abs() < 5.0, "drift {}", e.drift_ppm);
        let err = (e.offset_ms - sim.true_offset(now)).abs();
        assert!(err < 0.5, "error {err} ms");
        assert!(err <= e.uncertainty_ms);
    }

    #[test]
    fn drift_without_enough_span_is_bounded_by_uncertainty() {
        let sim = Sim { offset: 0.0, drift: 50e-6 };
        let mut sync = ClockSync::default();
        let t4 = sim.exchange(&mut sync, 0.0, 5.0, 5.0, 0.0);
        let now = t4 + 60_000.0;
        let e = sync.estimate(now).unwrap();
        assert_eq!(e.drift_ppm, 0.0);
        let err = (e.offset_ms - sim.true_offset(now)).abs();
        assert!(err <= e.uncertainty_ms, "{err} > {}", e.uncertainty_ms);
    }

    #[test]
    fn window_forgets_old_samples() {
        let sim = Sim { offset: 10.0, drift: 0.0 };
        let mut sync = ClockSync::new(4);
        let mut t = sim.exchange(&mut sync, 0.0, 1.0, 1.0, 0.0);
        for _ in 0..4 {
            t = sim.exchange(&mut sync, t + 100.0, 50.0, 50.0, 0.0);
        }
        let e = sync.estimate(t).unwrap();
        assert_eq!(e.samples, 4);
        assert!((e.rtt_ms - 100.0).abs() < 1e-9, "the 2 ms sample has left the window");
    }

    #[test]
    fn corrupt_exchanges_are_rejected() {
        let mut sync = ClockSync::default();
        assert_eq!(sync.add(10.0, 0.0, 1.0, 5.0), Err(ClockError::InvalidExchange));
        assert_eq!(sync.add(0.0, 5.0, 4.0, 10.0), Err(ClockError::InvalidExchange));
        assert_eq!(sync.add(f64::NAN, 5.0, 6.0, 10.0), Err(ClockError::InvalidExchange));
        assert!(sync.estimate(0.0).is_none());
    }
}
