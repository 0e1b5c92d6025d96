//! The simulated boat: a vessel steering around a loop of waypoints off San Francisco, with
//! speed, heading and a draining battery. Deterministic for a given start, so tests can rely
//! on it; used by `make demo` and the tests alike.

use serde_json::{Value, json};

/// Metres per degree of latitude.
const M_PER_DEG: f64 = 111_320.0;

/// State of the simulated boat.
#[derive(Debug, Clone)]
pub struct Boat {
    /// Degrees.
    pub latitude: f64,
    /// Degrees.
    pub longitude: f64,
    /// Degrees clockwise from north.
    pub heading: f64,
    /// Metres per second.
    pub speed: f64,
    /// 0..=100.
    pub battery_percent: f64,
    waypoints: Vec<(f64, f64)>,
    target: usize,
    /// Seconds simulated so far.
    pub elapsed: f64,
}

impl Default for Boat {
    fn default() -> Self {
        let waypoints = vec![(37.8080, -122.4177), (37.8120, -122.4300), (37.8190, -122.4220), (37.8140, -122.4100)];
        Boat {
            latitude: waypoints[0].0,
            longitude: waypoints[0].1,
            heading: 0.0,
            speed: 2.5,
            battery_percent: 100.0,
            waypoints,
            target: 1,
            elapsed: 0.0,
        }
    }
}

fn bearing(from: (f64, f64), to: (f64, f64)) -> f64 {
    let dy = to.0 - from.0;
    let dx = (to.1 - from.1) * from.0.to_radians().cos();
    (dx.atan2(dy).to_degrees() + 360.0) % 360.0
}

fn distance_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    let dy = (b.0 - a.0) * M_PER_DEG;
    let dx = (b.1 - a.1) * M_PER_DEG * a.0.to_radians().cos();
    (dx * dx + dy * dy).sqrt()
}

impl Boat {
    /// Advances the simulation by `dt` seconds.
    pub fn step(&mut self, dt: f64) {
        self.elapsed += dt;
        let pos = (self.latitude, self.longitude);
        let target = self.waypoints[self.target];
        if distance_m(pos, target) < 15.0 {
            self.target = (self.target + 1) % self.waypoints.len();
        }
        let want = bearing(pos, self.waypoints[self.target]);
        // Turn at most 10 degrees per second toward the target.
        let diff = ((want - self.heading + 540.0) % 360.0) - 180.0;
        self.heading = (self.heading + diff.clamp(-10.0 * dt, 10.0 * dt) + 360.0) % 360.0;
        // Gentle speed variation around 2.5 m/s.
        self.speed = 2.5 + 0.3 * (self.elapsed / 20.0).sin();
        let d = self.speed * dt;
        let h = self.heading.to_radians();
        self.latitude += d * h.cos() / M_PER_DEG;
        self.longitude += d * h.sin() / (M_PER_DEG * self.latitude.to_radians().cos());
        // About 1% per minute under way, never below zero.
        self.battery_percent = (self.battery_percent - dt / 60.0).max(0.0);
    }

    /// The telemetry `data` object for the current state (seed 004's shape).
    pub fn data(&self) -> Value {
        let r = |v: f64, p: i32| (v * 10f64.powi(p)).round() / 10f64.powi(p);
        json!({
            "gps": {
                "latitude": r(self.latitude, 6),
                "longitude": r(self.longitude, 6),
                "heading": r(self.heading, 1),
                "speed": r(self.speed, 2),
            },
            "battery": {
                "percent": r(self.battery_percent, 1),
                "voltage": r(11.0 + 1.6 * self.battery_percent / 100.0, 2),
            },
            "status": if self.battery_percent > 15.0 { "autonomous_navigation" } else { "returning_low_battery" },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boat_moves_steers_and_drains() {
        let mut b = Boat::default();
        let start = (b.latitude, b.longitude);
        for _ in 0..600 {
            b.step(0.5);
        }
        assert!(distance_m(start, (b.latitude, b.longitude)) > 100.0);
        assert!(b.battery_percent < 100.0 && b.battery_percent > 90.0);
        assert!((0.0..360.0).contains(&b.heading));
        let d = b.data();
        assert!(d["gps"]["latitude"].as_f64().unwrap() > 37.0);
    }

    #[test]
    fn it_follows_the_loop() {
        let mut b = Boat::default();
        let mut targets = std::collections::HashSet::new();
        for _ in 0..20_000 {
            b.step(0.5);
            targets.insert(b.target);
        }
        assert_eq!(targets.len(), 4, "visits every waypoint");
    }
}
