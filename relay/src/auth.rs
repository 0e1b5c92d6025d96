//! Credentials: generation, hashing, verification, and one-time WebSocket tickets.
//!
//! Secret formats (all machine-generated, 256 bits of randomness):
//! - device secret: 64 hex characters, presented with the device's clientID;
//! - operator API key: `tk_<keyid>_<secret>`; the key id finds the row, the secret is checked
//!   against its bcrypt hash.
//!
//! Hashing cost: secrets the relay generates are long and random, so brute force is hopeless
//! whatever the cost; a low bcrypt cost ([`MACHINE_SECRET_COST`]) keeps a reconnect storm of
//! thousands of devices cheap. Human passwords use [`PASSWORD_COST`]. All hashing runs on the
//! blocking pool behind a semaphore sized to the CPU count, so a storm queues instead of
//! spawning hundreds of threads, and async workers never stall.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::RngCore;
use tokio::sync::Semaphore;

use crate::store::{OperatorRole, Store, StoreError, q};

/// bcrypt cost for secrets the relay generates (device secrets, API keys).
pub const MACHINE_SECRET_COST: u32 = 6;
/// bcrypt cost for human-chosen passwords.
pub const PASSWORD_COST: u32 = 12;

/// Who is on the other end of a connection or request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Device id or operator id.
    pub id: String,
    /// Organisation; routing never crosses it.
    pub org: String,
    /// What kind of principal.
    pub role: Role,
    /// Display name (device name or username).
    pub name: String,
    /// The credential it authenticated with, as a deny-list subject: `key:<id>` for an API
    /// key, `session:<hash>` for a login session, None for a device secret (the device id
    /// itself is the subject).
    pub credential: Option<String>,
    /// For WebSocket connections opened with a ticket: `ticket:<hash>`.
    pub ticket: Option<String>,
}

impl Identity {
    /// Whether revoking `subject` concerns this identity.
    pub fn matches(&self, subject: &str) -> bool {
        self.id == subject || self.credential.as_deref() == Some(subject) || self.ticket.as_deref() == Some(subject)
    }
}

/// SHA-256 of `s` as hex: for secrets that must be found by value (handshake keys, session
/// tokens, tickets) without keeping them in clear.
pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Kinds of principals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A robot's agent.
    Device,
    /// An operator who watches and drives.
    Pilot,
    /// An operator who also manages the fleet.
    Admin,
}

impl Role {
    /// `device`, `pilot` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Pilot => "pilot",
            Role::Admin => "admin",
        }
    }

    /// True for pilots and admins.
    pub fn is_operator(self) -> bool {
        !matches!(self, Role::Device)
    }
}

impl From<OperatorRole> for Role {
    fn from(r: OperatorRole) -> Self {
        match r {
            OperatorRole::Pilot => Role::Pilot,
            OperatorRole::Admin => Role::Admin,
        }
    }
}

/// Why authentication failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Unknown id, wrong secret, revoked or disabled; deliberately not more specific.
    #[error("invalid credentials")]
    Invalid,
    /// The store could not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// A fresh device secret.
pub fn new_device_secret() -> String {
    random_hex(32)
}

/// A fresh API key and its key id.
pub fn new_api_key() -> (String, String) {
    let id = random_hex(6);
    let key = format!("tk_{id}_{}", random_hex(32));
    (id, key)
}

/// Splits `tk_<id>_<secret>` into id and secret.
pub fn parse_api_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("tk_")?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// The key id used for a bootstrap admin key given in `TETHER_ADMIN_KEY` in a free format.
pub const BOOTSTRAP_KEY_ID: &str = "bootstrap";

/// Hashes and verifies off the async runtime, at most one job per CPU at a time.
#[derive(Debug, Clone)]
pub struct Hasher {
    permits: Arc<Semaphore>,
}

impl Default for Hasher {
    fn default() -> Self {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Hasher { permits: Arc::new(Semaphore::new(n)) }
    }
}

impl Hasher {
    /// bcrypt hash of `secret` at `cost`.
    pub async fn hash(&self, secret: String, cost: u32) -> Result<String, StoreError> {
        let _permit = self.permits.acquire().await.map_err(|e| StoreError::Task(e.to_string()))?;
        tokio::task::spawn_blocking(move || bcrypt::hash(secret, cost))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
            .map_err(|e| StoreError::Task(e.to_string()))
    }

    /// Checks `secret` against a bcrypt `hash`. A malformed hash counts as a mismatch.
    pub async fn verify(&self, secret: String, hash: String) -> bool {
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        tokio::task::spawn_blocking(move || bcrypt::verify(secret, &hash).unwrap_or(false)).await.unwrap_or(false)
    }
}

/// Verifies a device's clientID and secret.
pub async fn verify_device(
    store: &Store,
    hasher: &Hasher,
    client_id: &str,
    secret: &str,
) -> Result<Identity, AuthError> {
    let id = client_id.to_owned();
    let row = store.call(move |c| q::device_credentials(c, &id)).await?;
    let Some((device, Some(hash))) = row else {
        // Spend the same time as a real check so ids cannot be probed by timing.
        let _ = hasher.verify(secret.to_owned(), dummy_hash()).await;
        return Err(AuthError::Invalid);
    };
    if !hasher.verify(secret.to_owned(), hash).await {
        return Err(AuthError::Invalid);
    }
    Ok(Identity {
        id: device.id,
        org: device.org_id,
        role: Role::Device,
        name: device.name,
        credential: None,
        ticket: None,
    })
}

/// A bcrypt hash of a random string nobody knows, used to equalise timing for unknown ids.
pub fn dummy_hash() -> String {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| bcrypt::hash(random_hex(16), MACHINE_SECRET_COST).unwrap_or_default()).clone()
}

/// Verifies an operator API key.
pub async fn verify_api_key(store: &Store, hasher: &Hasher, key: &str) -> Result<Identity, AuthError> {
    let (key_id, secret) = match parse_api_key(key) {
        Some((id, secret)) => (id.to_owned(), secret.to_owned()),
        None => (BOOTSTRAP_KEY_ID.to_owned(), key.to_owned()),
    };
    let row = store.call(move |c| q::api_key(c, &key_id)).await?;
    let Some(row) = row else {
        let _ = hasher.verify(secret, dummy_hash()).await;
        return Err(AuthError::Invalid);
    };
    if !hasher.verify(secret, row.key_hash).await {
        return Err(AuthError::Invalid);
    }
    let op = row.operator;
    Ok(Identity {
        id: op.id,
        org: op.org_id,
        role: op.role.into(),
        name: op.username,
        credential: Some(format!("key:{}", row.id)),
        ticket: None,
    })
}

/// Creates an API key for an operator; returns the key (shown once).
pub fn issue_api_key_sync(
    c: &rusqlite::Connection,
    operator_id: &str,
    label: Option<&str>,
) -> Result<String, StoreError> {
    let (id, key) = new_api_key();
    let (_, secret) = parse_api_key(&key).expect("generated keys parse");
    let hash = bcrypt::hash(secret, MACHINE_SECRET_COST).map_err(|e| StoreError::Task(e.to_string()))?;
    q::create_api_key(c, &id, operator_id, &hash, label)?;
    Ok(key)
}

/// Creates a device credential; returns the secret (shown once).
pub fn issue_device_sync(c: &rusqlite::Connection, id: &str, org_id: &str, name: &str) -> Result<String, StoreError> {
    let secret = new_device_secret();
    let hash = bcrypt::hash(&secret, MACHINE_SECRET_COST).map_err(|e| StoreError::Task(e.to_string()))?;
    q::create_device(c, id, org_id, name, &hash)?;
    Ok(secret)
}

/// One-time WebSocket tickets for operators: `POST /api/auth/ws-ticket` trades an API key for
/// a ticket that opens one `/ws/admin` connection within its lifetime. Tickets live only in
/// memory: a relay restart invalidates them, which is harmless given their 30 s life.
#[derive(Debug)]
pub struct Tickets {
    map: Mutex<HashMap<String, (Identity, Instant)>>,
    ttl: Duration,
}

impl Tickets {
    /// Tickets valid for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Tickets { map: Mutex::new(HashMap::new()), ttl }
    }

    /// Lifetime of new tickets.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Issues a ticket for `who`.
    pub fn issue(&self, who: Identity, now: Instant) -> String {
        let t = random_hex(24);
        self.map.lock().insert(t.clone(), (who, now + self.ttl));
        t
    }

    /// Consumes a ticket: the first call within its lifetime gets the identity (marked with
    /// the ticket's subject `ticket:<hash>`), later calls and calls after expiry get `None`.
    pub fn redeem(&self, ticket: &str, now: Instant) -> Option<Identity> {
        let (mut who, expires) = self.map.lock().remove(ticket)?;
        who.ticket = Some(format!("ticket:{}", sha256_hex(ticket)));
        (now < expires).then_some(who)
    }

    /// Withdraws an unused ticket; true if it existed.
    pub fn revoke(&self, ticket: &str) -> bool {
        self.map.lock().remove(ticket).is_some()
    }

    /// Forgets expired tickets (called periodically).
    pub fn sweep(&self, now: Instant) {
        self.map.lock().retain(|_, (_, exp)| *exp > now);
    }

    /// Outstanding tickets.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// True when no tickets are outstanding.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> Identity {
        Identity {
            id: "op-1".into(),
            org: "o".into(),
            role: Role::Pilot,
            name: "ana".into(),
            credential: None,
            ticket: None,
        }
    }

    #[test]
    fn tickets_work_once_and_expire() {
        let t = Tickets::new(Duration::from_secs(30));
        let now = Instant::now();
        let a = t.issue(who(), now);
        let got = t.redeem(&a, now + Duration::from_secs(1)).unwrap();
        assert_eq!(got.id, "op-1");
        assert!(got.matches(&format!("ticket:{}", sha256_hex(&a))));
        assert_eq!(t.redeem(&a, now + Duration::from_secs(1)), None, "second use refused");
        let b = t.issue(who(), now);
        assert_eq!(t.redeem(&b, now + Duration::from_secs(31)), None, "expired");
        let c = t.issue(who(), now);
        t.sweep(now + Duration::from_secs(31));
        assert!(t.is_empty());
        assert_eq!(t.redeem(&c, now), None);
    }

    #[test]
    fn api_keys_parse() {
        let (id, key) = new_api_key();
        assert_eq!(parse_api_key(&key).unwrap().0, id);
        assert_eq!(parse_api_key("tk__x"), None);
        assert_eq!(parse_api_key("nope"), None);
    }

    #[test]
    fn dummy_hash_is_a_valid_bcrypt_hash() {
        assert!(!bcrypt::verify("x", &dummy_hash()).unwrap());
    }
}
