//! The simulated boat: a vessel steering around a loop of waypoints off San Francisco, with
//! speed, heading and a draining battery. Deterministic for a given start, so tests can rely
//! on it; used by `make demo` and the tests alike.
//!
//! It can be steered like a real robot: new waypoints, manual teleop (which times out to
//! station-keeping), safety stops (`stop`, `hold`, `return`) and `resume`. `tether-boat`
//! (examples/src/boat.rs) runs it as a robot program behind the agent's local socket.

use serde_json::{Value, json};

/// Metres per degree of latitude.
const M_PER_DEG: f64 = 111_320.0;

/// Cruising speed on a mission, metres per second.
const CRUISE: f64 = 2.5;
/// Fastest ahead and astern under teleop, metres per second.
const MAX_AHEAD: f64 = 4.0;
const MAX_ASTERN: f64 = 1.5;
/// How fast the speed changes, metres per second per second.
const ACCEL: f64 = 1.0;
/// Turn rate under autopilot, and under full rudder, degrees per second.
const AUTOPILOT_TURN: f64 = 10.0;
const MAX_TURN: f64 = 20.0;
/// A waypoint this close counts as reached, metres.
const ARRIVED: f64 = 15.0;
/// Station-keeping stops the engine this close to its point, metres.
const ON_STATION: f64 = 3.0;
/// Manual mode without a teleop command for this long falls back to holding, seconds.
pub const TELEOP_TIMEOUT: f64 = 2.0;
/// The tidal current a stopped boat drifts with: metres per second, toward this bearing.
const DRIFT_SPEED: f64 = 0.05;
const DRIFT_BEARING: f64 = 120.0;

/// What the boat is doing. `data()["mode"]` and `data()["status"]` report it.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Mode {
    /// Following the waypoint plan, and looping it once done (a single waypoint is held).
    Mission,
    /// Driven by the sticks of the last teleop command; after [`TELEOP_TIMEOUT`] seconds
    /// without one it holds where it is.
    Manual {
        /// -1 (full astern) ..= 1 (full ahead).
        throttle: f64,
        /// -1 (full port) ..= 1 (full starboard).
        rudder: f64,
        /// `elapsed` at the last teleop command.
        since: f64,
    },
    /// Station-keeping at a point.
    Hold {
        /// Degrees.
        latitude: f64,
        /// Degrees.
        longitude: f64,
    },
    /// Engine stopped, drifting with the current.
    Stopped,
    /// Heading for home (the first point of the original mission); holds there on arrival.
    ReturningHome,
}

/// What a safety stop tells the boat to do (the agent's `safety_stop` `policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopPolicy {
    /// `stop`: engine off, drift.
    Stop,
    /// `hold`: keep station where the stop found the boat.
    Hold,
    /// `return`: go home and hold there.
    Return,
}

impl std::str::FromStr for StopPolicy {
    type Err = SteerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stop" => Ok(StopPolicy::Stop),
            "hold" => Ok(StopPolicy::Hold),
            "return" => Ok(StopPolicy::Return),
            other => Err(SteerError::UnknownPolicy(other.to_owned())),
        }
    }
}

/// Why a steering command was refused; the boat keeps doing what it did.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SteerError {
    /// `set_waypoints` with no waypoint.
    #[error("the waypoint list is empty")]
    NoWaypoints,
    /// A latitude outside -90..=90 or a longitude outside -180..=180 (or not a number).
    #[error("({latitude}, {longitude}) is not a position: latitude must be within -90..90, longitude within -180..180")]
    BadPosition {
        /// As given.
        latitude: f64,
        /// As given.
        longitude: f64,
    },
    /// A teleop stick outside -1..=1 (or not a number).
    #[error("{stick} must be between -1 and 1 (got {value})")]
    BadStick {
        /// `throttle` or `rudder`.
        stick: &'static str,
        /// As given.
        value: f64,
    },
    /// A safety stop policy other than `stop`, `hold` or `return`.
    #[error("unknown safety stop policy \"{0}\" (expected stop, hold or return)")]
    UnknownPolicy(String),
}

/// State of the simulated boat.
///
/// Drive it by calling [`Boat::step`] with the seconds that passed, steer it with
/// [`Boat::set_waypoints`], [`Boat::teleop`], [`Boat::safety_stop`] and [`Boat::resume`], and
/// publish [`Boat::data`]. Time is whatever the caller says it is, so tests run it fast.
#[derive(Debug, Clone)]
pub struct Boat {
    /// Degrees.
    pub latitude: f64,
    /// Degrees.
    pub longitude: f64,
    /// Degrees clockwise from north.
    pub heading: f64,
    /// Metres per second through the water (negative astern).
    pub speed: f64,
    /// 0..=100.
    pub battery_percent: f64,
    /// The plan being followed in [`Mode::Mission`].
    waypoints: Vec<(f64, f64)>,
    /// Index into `waypoints` of the next one.
    target: usize,
    /// The first point of the original mission, where `return` goes.
    home: (f64, f64),
    mode: Mode,
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
            speed: CRUISE,
            battery_percent: 100.0,
            home: waypoints[0],
            waypoints,
            target: 1,
            mode: Mode::Mission,
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

/// The signed turn from `from` to `to`, degrees in -180..180.
fn angle_diff(from: f64, to: f64) -> f64 {
    ((to - from + 540.0) % 360.0) - 180.0
}

fn check_position(latitude: f64, longitude: f64) -> Result<(f64, f64), SteerError> {
    if (-90.0..=90.0).contains(&latitude) && (-180.0..=180.0).contains(&longitude) {
        Ok((latitude, longitude))
    } else {
        Err(SteerError::BadPosition { latitude, longitude })
    }
}

fn check_stick(stick: &'static str, value: f64) -> Result<f64, SteerError> {
    if (-1.0..=1.0).contains(&value) { Ok(value) } else { Err(SteerError::BadStick { stick, value }) }
}

impl Boat {
    /// Advances the simulation by `dt` seconds.
    pub fn step(&mut self, dt: f64) {
        self.elapsed += dt;
        if let Mode::Manual { since, .. } = self.mode
            && self.elapsed - since > TELEOP_TIMEOUT
        {
            self.hold_here();
        }
        let pos = self.position();
        // What the helm wants: a heading to turn toward at the autopilot's rate (or a turn rate
        // of its own), and a speed.
        let (want_heading, turn_rate, want_speed) = match self.mode {
            Mode::Mission => {
                if distance_m(pos, self.waypoints[self.target]) < ARRIVED {
                    if self.waypoints.len() == 1 {
                        let (latitude, longitude) = self.waypoints[0];
                        self.mode = Mode::Hold { latitude, longitude };
                    } else {
                        self.target = (self.target + 1) % self.waypoints.len();
                    }
                }
                // Gentle speed variation around the cruising speed.
                (Some(bearing(pos, self.waypoints[self.target])), 0.0, CRUISE + 0.3 * (self.elapsed / 20.0).sin())
            }
            Mode::Manual { throttle, rudder, .. } => {
                (None, rudder * MAX_TURN, throttle * if throttle >= 0.0 { MAX_AHEAD } else { MAX_ASTERN })
            }
            Mode::ReturningHome => {
                if distance_m(pos, self.home) < ARRIVED {
                    self.mode = Mode::Hold { latitude: self.home.0, longitude: self.home.1 };
                }
                (Some(bearing(pos, self.home)), 0.0, CRUISE)
            }
            Mode::Hold { .. } | Mode::Stopped => (None, 0.0, 0.0),
        };
        // A mode change above (arrival) takes effect on this step.
        let (want_heading, want_speed) = match self.mode {
            Mode::Hold { latitude, longitude } => {
                let d = distance_m(pos, (latitude, longitude));
                if d < ON_STATION {
                    (None, 0.0)
                } else {
                    let want = bearing(pos, (latitude, longitude));
                    // Creep while pointing the wrong way, then close in slowing down.
                    let speed = if angle_diff(self.heading, want).abs() > 60.0 { 0.3 } else { (0.25 * d).min(2.0) };
                    (Some(want), speed)
                }
            }
            _ => (want_heading, want_speed),
        };
        let turn = match want_heading {
            Some(want) => angle_diff(self.heading, want).clamp(-AUTOPILOT_TURN * dt, AUTOPILOT_TURN * dt),
            None => turn_rate * dt,
        };
        self.heading = (self.heading + turn + 360.0) % 360.0;
        self.speed += (want_speed - self.speed).clamp(-ACCEL * dt, ACCEL * dt);
        let d = self.speed * dt;
        let h = self.heading.to_radians();
        self.latitude += d * h.cos() / M_PER_DEG;
        self.longitude += d * h.sin() / (M_PER_DEG * self.latitude.to_radians().cos());
        if self.mode == Mode::Stopped {
            let h = DRIFT_BEARING.to_radians();
            self.latitude += DRIFT_SPEED * dt * h.cos() / M_PER_DEG;
            self.longitude += DRIFT_SPEED * dt * h.sin() / (M_PER_DEG * self.latitude.to_radians().cos());
        }
        // About 1% per minute, never below zero.
        self.battery_percent = (self.battery_percent - dt / 60.0).max(0.0);
    }

    /// Goes to one point and holds there.
    pub fn set_waypoint(&mut self, latitude: f64, longitude: f64) -> Result<(), SteerError> {
        self.set_waypoints(vec![(latitude, longitude)])
    }

    /// Follows `waypoints` (latitude, longitude) from the first, then keeps looping them.
    pub fn set_waypoints(&mut self, waypoints: Vec<(f64, f64)>) -> Result<(), SteerError> {
        if waypoints.is_empty() {
            return Err(SteerError::NoWaypoints);
        }
        for &(la, lo) in &waypoints {
            check_position(la, lo)?;
        }
        self.waypoints = waypoints;
        self.target = 0;
        self.mode = Mode::Mission;
        Ok(())
    }

    /// Manual control: `throttle` sets the speed (-1 full astern ..= 1 full ahead), `rudder`
    /// the turn rate (-1 full port ..= 1 full starboard). Send it more often than
    /// [`TELEOP_TIMEOUT`], or the boat holds where it is.
    pub fn teleop(&mut self, throttle: f64, rudder: f64) -> Result<(), SteerError> {
        let throttle = check_stick("throttle", throttle)?;
        let rudder = check_stick("rudder", rudder)?;
        self.mode = Mode::Manual { throttle, rudder, since: self.elapsed };
        Ok(())
    }

    /// Obeys a safety stop: see [`StopPolicy`]. [`Boat::resume`] ends it.
    pub fn safety_stop(&mut self, policy: StopPolicy) {
        match policy {
            StopPolicy::Stop => self.mode = Mode::Stopped,
            StopPolicy::Hold => self.hold_here(),
            StopPolicy::Return => self.mode = Mode::ReturningHome,
        }
    }

    /// Back to the mission: the current waypoint plan, from the waypoint it was heading for.
    pub fn resume(&mut self) {
        self.mode = Mode::Mission;
    }

    /// What the boat is doing.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Where the boat is heading for, if anywhere: the next waypoint, the held point or home.
    pub fn target(&self) -> Option<(f64, f64)> {
        match self.mode {
            Mode::Mission => Some(self.waypoints[self.target]),
            Mode::Hold { latitude, longitude } => Some((latitude, longitude)),
            Mode::ReturningHome => Some(self.home),
            Mode::Manual { .. } | Mode::Stopped => None,
        }
    }

    fn position(&self) -> (f64, f64) {
        (self.latitude, self.longitude)
    }

    fn hold_here(&mut self) {
        self.mode = Mode::Hold { latitude: self.latitude, longitude: self.longitude };
    }

    /// The short mode name: `mission`, `manual`, `hold`, `stop` or `return`.
    pub fn mode_name(&self) -> &'static str {
        match self.mode {
            Mode::Mission => "mission",
            Mode::Manual { .. } => "manual",
            Mode::Hold { .. } => "hold",
            Mode::Stopped => "stop",
            Mode::ReturningHome => "return",
        }
    }

    /// What the boat is doing, in words: `autonomous_navigation` (or `returning_low_battery`
    /// on a mission below 15 %), `manual`, `holding`, `stopped` or `returning_home`.
    pub fn status(&self) -> &'static str {
        match self.mode {
            Mode::Mission if self.battery_percent > 15.0 => "autonomous_navigation",
            Mode::Mission => "returning_low_battery",
            Mode::Manual { .. } => "manual",
            Mode::Hold { .. } => "holding",
            Mode::Stopped => "stopped",
            Mode::ReturningHome => "returning_home",
        }
    }

    /// The telemetry `data` object for the current state (seed 004's shape, plus `mode`,
    /// `target` and, in manual mode, `teleop`).
    pub fn data(&self) -> Value {
        let r = |v: f64, p: i32| (v * 10f64.powi(p)).round() / 10f64.powi(p);
        let target = match self.target() {
            Some(t) => json!({
                "latitude": r(t.0, 6),
                "longitude": r(t.1, 6),
                "distance": r(distance_m(self.position(), t), 1),
            }),
            None => Value::Null,
        };
        let mut data = json!({
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
            "status": self.status(),
            "mode": self.mode_name(),
            "target": target,
        });
        if let Mode::Manual { throttle, rudder, .. } = self.mode {
            data["teleop"] = json!({"throttle": throttle, "rudder": rudder});
        }
        data
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

    fn run(b: &mut Boat, seconds: f64) {
        for _ in 0..(seconds / 0.1).round() as usize {
            b.step(0.1);
        }
    }

    fn pos(b: &Boat) -> (f64, f64) {
        (b.latitude, b.longitude)
    }

    #[test]
    fn set_waypoint_steers_there_and_holds() {
        let mut b = Boat::default();
        let goal = (37.8030, -122.4100);
        b.set_waypoint(goal.0, goal.1).unwrap();
        assert_eq!(b.target(), Some(goal));
        assert_eq!(b.data()["target"]["latitude"], 37.803);
        let first = angle_diff(b.heading, bearing(pos(&b), goal)).abs();
        run(&mut b, 5.0);
        assert!(angle_diff(b.heading, bearing(pos(&b), goal)).abs() < first, "turns toward it");
        run(&mut b, 600.0);
        assert!(distance_m(pos(&b), goal) < ARRIVED, "got there");
        assert_eq!(b.mode(), Mode::Hold { latitude: goal.0, longitude: goal.1 });
        assert_eq!(b.data()["status"], "holding");
        run(&mut b, 120.0);
        assert!(distance_m(pos(&b), goal) < ARRIVED, "stays there");
        assert!(b.speed.abs() < 0.5);
    }

    #[test]
    fn set_waypoints_are_followed_then_looped() {
        let mut b = Boat::default();
        let plan = vec![(37.8100, -122.4150), (37.8100, -122.4250)];
        b.set_waypoints(plan.clone()).unwrap();
        assert_eq!(b.target(), Some(plan[0]));
        let mut seen = Vec::new();
        for _ in 0..30_000 {
            b.step(0.1);
            let t = b.target().unwrap();
            if seen.last() != Some(&t) {
                seen.push(t);
            }
        }
        assert!(seen.len() >= 4, "loops: {seen:?}");
        assert_eq!(&seen[..4], &[plan[0], plan[1], plan[0], plan[1]]);
        assert_eq!(b.status(), "autonomous_navigation");
    }

    #[test]
    fn teleop_drives_and_falls_back_to_holding() {
        let mut b = Boat::default();
        b.teleop(1.0, 0.5).unwrap();
        let h0 = b.heading;
        for _ in 0..10 {
            b.teleop(1.0, 0.5).unwrap();
            run(&mut b, 1.0);
        }
        assert!(b.speed > 3.5, "full ahead: {}", b.speed);
        assert!(angle_diff(h0, b.heading) > 45.0, "turning to starboard");
        assert_eq!(b.data()["status"], "manual");
        assert_eq!(b.data()["teleop"]["throttle"], 1.0);
        assert!(b.data()["target"].is_null());
        // Sticks released, then silence: hold where the silence began.
        run(&mut b, TELEOP_TIMEOUT + 0.5);
        assert!(matches!(b.mode(), Mode::Hold { .. }));
        assert_eq!(b.data()["status"], "holding");
        let held = b.target().unwrap();
        run(&mut b, 120.0);
        assert!(distance_m(pos(&b), held) < ARRIVED);
        // Astern.
        b.teleop(-1.0, 0.0).unwrap();
        run(&mut b, 1.9);
        assert!(b.speed < 0.0);
    }

    #[test]
    fn safety_stop_stop_brakes_to_zero_and_drifts() {
        let mut b = Boat::default();
        run(&mut b, 10.0);
        b.safety_stop(StopPolicy::Stop);
        assert_eq!(b.data()["status"], "stopped");
        run(&mut b, 5.0);
        assert_eq!(b.speed, 0.0);
        assert_eq!(b.data()["gps"]["speed"], 0.0);
        let here = pos(&b);
        let heading = b.heading;
        run(&mut b, 60.0);
        let drift = distance_m(here, pos(&b));
        assert!(drift > 1.0 && drift < 10.0, "drifts slowly: {drift} m");
        assert_eq!(b.heading, heading);
    }

    #[test]
    fn safety_stop_hold_keeps_station() {
        let mut b = Boat::default();
        run(&mut b, 10.0);
        b.safety_stop(StopPolicy::Hold);
        let here = pos(&b);
        assert_eq!(b.target(), Some(here));
        run(&mut b, 300.0);
        assert!(distance_m(here, pos(&b)) < ARRIVED);
        assert_eq!(b.data()["mode"], "hold");
    }

    #[test]
    fn safety_stop_return_heads_home_and_holds_there() {
        let mut b = Boat::default();
        let home = b.home;
        b.set_waypoint(37.8200, -122.4000).unwrap();
        run(&mut b, 300.0);
        let away = distance_m(pos(&b), home);
        assert!(away > 200.0);
        b.safety_stop(StopPolicy::Return);
        assert_eq!(b.data()["status"], "returning_home");
        assert_eq!(b.target(), Some(home));
        run(&mut b, 60.0);
        assert!(distance_m(pos(&b), home) < away, "closing in");
        run(&mut b, 900.0);
        assert!(distance_m(pos(&b), home) < ARRIVED);
        assert_eq!(b.mode(), Mode::Hold { latitude: home.0, longitude: home.1 });
    }

    #[test]
    fn resume_goes_back_to_the_mission() {
        let mut b = Boat::default();
        run(&mut b, 10.0);
        let target = b.target();
        b.safety_stop(StopPolicy::Stop);
        run(&mut b, 10.0);
        b.resume();
        assert_eq!(b.target(), target);
        assert_eq!(b.data()["status"], "autonomous_navigation");
        run(&mut b, 10.0);
        assert!(b.speed > 2.0, "under way again");
    }

    #[test]
    fn bad_steering_is_refused_and_changes_nothing() {
        let mut b = Boat::default();
        assert_eq!(b.set_waypoints(vec![]), Err(SteerError::NoWaypoints));
        assert!(matches!(b.set_waypoint(91.0, 0.0), Err(SteerError::BadPosition { .. })));
        assert!(b.set_waypoint(f64::NAN, 0.0).is_err());
        assert!(b.set_waypoints(vec![(37.0, -122.0), (0.0, 200.0)]).is_err());
        assert!(matches!(b.teleop(1.5, 0.0), Err(SteerError::BadStick { stick: "throttle", .. })));
        assert!(matches!(b.teleop(0.0, f64::NAN), Err(SteerError::BadStick { stick: "rudder", .. })));
        assert_eq!(b.mode(), Mode::Mission);
        assert_eq!(b.target(), Some((37.8120, -122.4300)));
        assert_eq!("hold".parse(), Ok(StopPolicy::Hold));
        assert!("halt".parse::<StopPolicy>().unwrap_err().to_string().contains("halt"));
    }
}
