//! The safety stop, as a state machine without I/O: the agent feeds it what happens (lease
//! changes from the relay, the link going down and up, the clock) and carries out what it
//! returns (tell the robot software, report to the relay).
//!
//! It fires when
//! - the relay says the pilot holding the control lease went silent (`lease_state` with reason
//!   `expired`: no heartbeat within the relay's LEASE_TIMEOUT) or disconnected, if
//!   `safety.onControllerLost` is on; or
//! - the relay link has been down for `safety.linkLossTimeout`, if `safety.linkLoss` is
//!   `always`, or `whenControlled` and a pilot held the lease when the link went down.
//!
//! A stop stays in force until a pilot takes the control lease again (a human decides that the
//! robot may move); the robot software then gets `safety_clear`. Every stop is reported to the
//! relay as `safety_stop`; one that happened while the link was down is reported once it is
//! back, with its original time and `late: true`.

use std::time::{Duration, Instant};

use signaling::message::{LeaseState, SafetyStop};

use crate::config::{LinkLossScope, SafetyConfig};

/// What the agent must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Tell the robot software to stop (and report it to the relay).
    Stop(SafetyStop),
    /// Tell the robot software the stop is over.
    Clear {
        /// Why (`lease_acquired`).
        reason: String,
    },
}

/// The safety state.
#[derive(Debug)]
pub struct Safety {
    config: SafetyConfig,
    /// Who holds the control lease, as last reported by the relay.
    controller: Option<String>,
    /// When the link went down, and who was in control then.
    link_down: Option<(Instant, Option<String>)>,
    /// The stop in force, if any.
    active: Option<SafetyStop>,
    /// Whether the link-loss stop already fired for the current outage.
    fired_for_outage: bool,
}

impl Safety {
    /// A new state; the link starts down (the agent has not connected yet), but an outage only
    /// counts once a link was up.
    pub fn new(config: SafetyConfig) -> Self {
        Safety { config, controller: None, link_down: None, active: None, fired_for_outage: false }
    }

    /// Replaces the configuration (config updates).
    pub fn set_config(&mut self, config: SafetyConfig) {
        self.config = config;
    }

    /// The stop in force.
    pub fn active(&self) -> Option<&SafetyStop> {
        self.active.as_ref()
    }

    /// A `lease_state` from the relay.
    pub fn on_lease(&mut self, lease: &LeaseState, now_ms: f64) -> Option<Action> {
        let previous = self.controller.take();
        self.controller = lease.holder_name.clone().or_else(|| lease.holder.clone());
        match lease.reason.as_str() {
            "expired" | "disconnected" if self.config.on_controller_lost => {
                let reason = if lease.reason == "expired" { "controller_silent" } else { "controller_disconnected" };
                self.stop(reason, previous, now_ms, false)
            }
            "acquired" | "takeover" if self.active.is_some() => {
                self.active = None;
                Some(Action::Clear { reason: "lease_acquired".into() })
            }
            _ => None,
        }
    }

    /// The relay link went down.
    pub fn on_link_down(&mut self, now: Instant) {
        if self.link_down.is_none() {
            self.link_down = Some((now, self.controller.clone()));
            self.fired_for_outage = false;
        }
    }

    /// The relay link is up again.
    pub fn on_link_up(&mut self) {
        self.link_down = None;
    }

    /// When [`Safety::poll`] should next be called.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.link_down {
            Some((since, controller)) if !self.fired_for_outage && self.link_loss_applies(controller) => {
                Some(*since + self.config.link_loss_timeout.value)
            }
            _ => None,
        }
    }

    /// Checks the link-loss deadline.
    pub fn poll(&mut self, now: Instant, now_ms: f64) -> Option<Action> {
        let deadline = self.next_deadline()?;
        if now < deadline {
            return None;
        }
        self.fired_for_outage = true;
        let controller = self.link_down.as_ref().and_then(|(_, c)| c.clone());
        self.stop("link_lost", controller, now_ms, true)
    }

    fn link_loss_applies(&self, controller: &Option<String>) -> bool {
        match self.config.link_loss {
            LinkLossScope::Always => true,
            LinkLossScope::WhenControlled => controller.is_some(),
            LinkLossScope::Never => false,
        }
    }

    fn stop(&mut self, reason: &str, controller: Option<String>, now_ms: f64, late: bool) -> Option<Action> {
        let stop = SafetyStop {
            policy: self.config.policy.as_str().into(),
            reason: reason.into(),
            timestamp: now_ms.floor(),
            controller,
            late,
        };
        self.active = Some(stop.clone());
        Some(Action::Stop(stop))
    }

    /// How long the link has been down.
    pub fn outage(&self, now: Instant) -> Option<Duration> {
        self.link_down.as_ref().map(|(since, _)| now.duration_since(*since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn lease(holder: Option<&str>, reason: &str) -> LeaseState {
        LeaseState {
            device_id: "boat".into(),
            holder: holder.map(str::to_owned),
            holder_name: holder.map(str::to_owned),
            timeout_ms: 10_000,
            reason: reason.into(),
        }
    }

    fn cfg(scope: LinkLossScope) -> SafetyConfig {
        SafetyConfig {
            link_loss: scope,
            link_loss_timeout: serde_norway::from_str::<Dur>("10s").unwrap(),
            ..SafetyConfig::default()
        }
    }

    #[test]
    fn a_silent_controller_stops_the_robot_until_someone_takes_control() {
        let mut s = Safety::new(cfg(LinkLossScope::WhenControlled));
        assert_eq!(s.on_lease(&lease(Some("ana"), "acquired"), 1.0), None);
        let Some(Action::Stop(stop)) = s.on_lease(&lease(None, "expired"), 2.0) else { panic!("no stop") };
        assert_eq!((stop.reason.as_str(), stop.policy.as_str()), ("controller_silent", "stop"));
        assert_eq!(stop.controller.as_deref(), Some("ana"));
        assert!(s.active().is_some());
        assert_eq!(
            s.on_lease(&lease(Some("bo"), "acquired"), 3.0),
            Some(Action::Clear { reason: "lease_acquired".into() })
        );
        assert!(s.active().is_none());
        // A normal release is not a stop.
        assert_eq!(s.on_lease(&lease(None, "released"), 4.0), None);
    }

    #[test]
    fn link_loss_fires_once_per_outage_when_controlled() {
        let t0 = Instant::now();
        let mut s = Safety::new(cfg(LinkLossScope::WhenControlled));
        s.on_link_down(t0);
        assert_eq!(s.next_deadline(), None, "nobody in control: no deadline");
        s.on_link_up();
        s.on_lease(&lease(Some("ana"), "acquired"), 1.0);
        s.on_link_down(t0);
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(10)));
        assert_eq!(s.poll(t0 + Duration::from_secs(5), 1.0), None);
        let Some(Action::Stop(stop)) = s.poll(t0 + Duration::from_secs(10), 2.0) else { panic!("no stop") };
        assert!(stop.late && stop.reason == "link_lost");
        assert_eq!(s.poll(t0 + Duration::from_secs(20), 3.0), None, "once per outage");
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn scopes() {
        let t0 = Instant::now();
        let mut always = Safety::new(cfg(LinkLossScope::Always));
        always.on_link_down(t0);
        assert!(always.poll(t0 + Duration::from_secs(11), 1.0).is_some());
        let mut never = Safety::new(cfg(LinkLossScope::Never));
        never.on_lease(&lease(Some("ana"), "acquired"), 1.0);
        never.on_link_down(t0);
        assert!(never.poll(t0 + Duration::from_secs(11), 1.0).is_none());
    }
}
