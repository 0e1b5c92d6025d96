//! Who may do what: permission levels per operator per device, and the deny list.
//!
//! Levels are ordered `view < control < admin`:
//! - `view`: telemetry (`subscribe`), video (`webrtc`), presence;
//! - `control`: application commands (`app_command`) and the control lease;
//! - `admin`: `execute_command`, `docker_command`, `process_command`, configuration (reading it
//!   included), speed tests.
//!
//! Admins (operator role `admin`) hold `admin` on every device of their organisation. Pilots
//! hold what was granted, for the whole org (`org`), a device (`device:<id>`) or a device
//! group (`group:<name>`); the highest matching grant wins. No grant, no access.
//!
//! Grants and device groups are cached in memory and invalidated by the admin API when they
//! change, so a check on the hot path costs a hash lookup, not a query.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::auth::{Identity, Role};
use crate::store::{Store, StoreError, q};

/// Permission levels, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Watch.
    View,
    /// Drive.
    Control,
    /// Manage.
    Admin,
}

impl Level {
    /// Parses `view`, `control` or `admin`.
    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "view" => Some(Level::View),
            "control" => Some(Level::Control),
            "admin" => Some(Level::Admin),
            _ => None,
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::View => "view",
            Level::Control => "control",
            Level::Admin => "admin",
        }
    }
}

/// The level an operator needs on the target device to send a message of type `ty`, or None
/// for messages that need no device permission (ping, relay operations checked elsewhere).
pub fn required_level(ty: &str) -> Option<Level> {
    match ty {
        "subscribe" | "webrtc" => Some(Level::View),
        "app_command" | "lease_acquire" | "lease_release" | "lease_heartbeat" => Some(Level::Control),
        "execute_command"
        | "docker_command"
        | "process_command"
        | "update_client_config"
        | "reload_config"
        | "get_client_config"
        | "speed_test" => Some(Level::Admin),
        _ => None,
    }
}

#[derive(Debug, Default)]
struct Grants {
    org: Option<Level>,
    devices: HashMap<String, Level>,
    groups: HashMap<String, Level>,
}

/// Permission and deny-list checks with their caches.
#[derive(Debug, Default)]
pub struct Access {
    grants: RwLock<HashMap<String, Arc<Grants>>>,
    groups: RwLock<HashMap<String, Option<String>>>,
    /// subject -> expiry (ms since the Unix epoch), None = until removed.
    denies: RwLock<HashMap<String, Option<i64>>>,
}

impl Access {
    /// Forgets an operator's cached grants (after a change).
    pub fn invalidate_operator(&self, operator_id: &str) {
        self.grants.write().remove(operator_id);
    }

    /// Forgets a device's cached group (after a change).
    pub fn invalidate_device(&self, device_id: &str) {
        self.groups.write().remove(device_id);
    }

    async fn grants_of(&self, store: &Store, operator_id: &str) -> Result<Arc<Grants>, StoreError> {
        if let Some(g) = self.grants.read().get(operator_id) {
            return Ok(g.clone());
        }
        let id = operator_id.to_owned();
        let rows = store.call(move |c| q::operator_grants(c, &id)).await?;
        let mut g = Grants::default();
        for row in rows {
            let Some(level) = Level::parse(&row.level) else { continue };
            if row.scope == "org" {
                g.org = g.org.max(Some(level));
            } else if let Some(d) = row.scope.strip_prefix("device:") {
                g.devices.insert(d.to_owned(), level);
            } else if let Some(gr) = row.scope.strip_prefix("group:") {
                g.groups.insert(gr.to_owned(), level);
            }
        }
        let g = Arc::new(g);
        self.grants.write().insert(operator_id.to_owned(), g.clone());
        Ok(g)
    }

    async fn group_of(&self, store: &Store, device_id: &str) -> Result<Option<String>, StoreError> {
        if let Some(g) = self.groups.read().get(device_id) {
            return Ok(g.clone());
        }
        let id = device_id.to_owned();
        let g = store.call(move |c| q::device_group(c, &id)).await?;
        self.groups.write().insert(device_id.to_owned(), g.clone());
        Ok(g)
    }

    /// The level `who` holds on `device` (which the caller has checked is in `who`'s org).
    pub async fn level(&self, store: &Store, who: &Identity, device: &str) -> Result<Option<Level>, StoreError> {
        match who.role {
            Role::Admin => return Ok(Some(Level::Admin)),
            Role::Device => return Ok(None),
            Role::Pilot => {}
        }
        let g = self.grants_of(store, &who.id).await?;
        let mut best = g.org;
        best = best.max(g.devices.get(device).copied());
        if !g.groups.is_empty()
            && let Some(group) = self.group_of(store, device).await?
        {
            best = best.max(g.groups.get(&group).copied());
        }
        Ok(best)
    }

    /// Reloads the deny list from the store.
    pub async fn reload_denies(&self, store: &Store) -> Result<(), StoreError> {
        let rows = store.call(|c| q::active_denies(c)).await?;
        *self.denies.write() = rows.into_iter().map(|d| (d.subject, d.expires_at)).collect();
        Ok(())
    }

    /// Whether `subject` is on the deny list now.
    pub fn is_denied(&self, subject: &str, now_ms: i64) -> bool {
        match self.denies.read().get(subject) {
            Some(None) => true,
            Some(Some(exp)) => *exp > now_ms,
            None => false,
        }
    }

    /// Whether any of the identity's subjects (its id, its credential) is denied.
    pub fn identity_denied(&self, who: &Identity, now_ms: i64) -> bool {
        self.is_denied(&who.id, now_ms) || who.credential.as_deref().is_some_and(|c| self.is_denied(c, now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_parse() {
        assert!(Level::View < Level::Control && Level::Control < Level::Admin);
        for l in [Level::View, Level::Control, Level::Admin] {
            assert_eq!(Level::parse(l.as_str()), Some(l));
        }
        assert_eq!(required_level("execute_command"), Some(Level::Admin));
        assert_eq!(required_level("docker_command"), Some(Level::Admin));
        assert_eq!(required_level("process_command"), Some(Level::Admin));
        assert_eq!(required_level("get_client_config"), Some(Level::Admin));
        assert_eq!(required_level("ping"), None);
    }
}
