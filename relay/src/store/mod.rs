//! The embedded store: SQLite in WAL mode.
//!
//! Holds organisations, devices (bcrypt hash of each secret), operators (pilots and admins) and
//! their API keys. The schema already has the tables that onboarding with approval,
//! permissions, the deny list, the offline queue and the audit log use, so those features add
//! code, not migrations of existing data.
//!
//! Every call runs on the blocking pool ([`Store::call`]), never on an async worker, so a slow
//! disk stalls no connection. Nothing here is called per telemetry frame: last-seen times are
//! batched in memory by [`crate::Relay`] and written every 10 s with [`Store::touch_devices`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{Connection, params};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed (I/O, locking, corruption, constraint).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A name that must be unique is taken.
    #[error("{0} already exists")]
    Exists(String),
    /// A referenced row does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The blocking task running the query was cancelled or panicked.
    #[error("store task failed: {0}")]
    Task(String),
}

/// Roles of operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperatorRole {
    /// Watches and drives devices.
    Pilot,
    /// Manages the fleet as well.
    Admin,
}

impl OperatorRole {
    /// `pilot` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorRole::Pilot => "pilot",
            OperatorRole::Admin => "admin",
        }
    }

    /// Parses `pilot` or `admin`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pilot" => Some(OperatorRole::Pilot),
            "admin" => Some(OperatorRole::Admin),
            _ => None,
        }
    }
}

/// An organisation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Org {
    /// Stable id.
    pub id: String,
    /// Unique display name.
    pub name: String,
}

/// A device row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceRow {
    /// The clientID.
    pub id: String,
    /// Owning organisation.
    pub org_id: String,
    /// Display name.
    pub name: String,
    /// Last time the device was seen connected, ms since the Unix epoch.
    pub last_seen: Option<i64>,
    /// Its permission group, if any (filled by `q::list_devices`; `None` elsewhere).
    pub group: Option<String>,
}

/// An operator row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OperatorRow {
    /// Stable id (`op-...`).
    pub id: String,
    /// Owning organisation.
    pub org_id: String,
    /// Login name.
    pub username: String,
    /// Pilot or admin.
    pub role: OperatorRole,
}

/// What is needed to verify a presented API key.
#[derive(Debug, Clone)]
pub struct ApiKeyRow {
    /// Key id (the part after `tk_`).
    pub id: String,
    /// bcrypt hash of the secret part.
    pub key_hash: String,
    /// The operator the key belongs to.
    pub operator: OperatorRow,
}

const SCHEMA: &[&str] = &[
    // Version 1.
    r#"
    CREATE TABLE orgs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        -- Offline queue limits for the org's devices; NULL = relay default.
        queue_limit INTEGER,
        queue_ttl_secs INTEGER
    );
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        org_id TEXT NOT NULL REFERENCES orgs(id),
        name TEXT NOT NULL,
        -- bcrypt hash of the clientSecret; NULL until approved.
        secret_hash TEXT,
        -- Devices can be grouped for permissions.
        group_name TEXT,
        created_at INTEGER NOT NULL,
        last_seen INTEGER,
        revoked_at INTEGER,
        -- Per-device overrides of rate limits and queue limits (JSON), NULL = defaults.
        limits_json TEXT
    );
    CREATE INDEX devices_org ON devices(org_id);
    CREATE TABLE operators (
        id TEXT PRIMARY KEY,
        org_id TEXT NOT NULL REFERENCES orgs(id),
        username TEXT NOT NULL UNIQUE,
        -- bcrypt hash of the login password; NULL for key-only operators.
        password_hash TEXT,
        role TEXT NOT NULL CHECK (role IN ('pilot', 'admin')),
        created_at INTEGER NOT NULL,
        disabled_at INTEGER,
        limits_json TEXT
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        operator_id TEXT NOT NULL REFERENCES operators(id),
        key_hash TEXT NOT NULL,
        label TEXT,
        created_at INTEGER NOT NULL,
        last_used INTEGER,
        expires_at INTEGER,
        revoked_at INTEGER
    );
    CREATE INDEX api_keys_operator ON api_keys(operator_id);
    CREATE TABLE handshake_keys (
        id TEXT PRIMARY KEY,
        org_id TEXT NOT NULL REFERENCES orgs(id),
        key_hash TEXT NOT NULL,
        label TEXT,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        uses_left INTEGER,
        revoked_at INTEGER
    );
    CREATE TABLE registration_requests (
        id TEXT PRIMARY KEY,
        org_id TEXT NOT NULL REFERENCES orgs(id),
        handshake_key_id TEXT NOT NULL REFERENCES handshake_keys(id),
        name TEXT NOT NULL,
        remote_addr TEXT,
        status TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
        device_id TEXT REFERENCES devices(id),
        -- The issued secret, kept only until the device has fetched it once.
        secret_once TEXT,
        created_at INTEGER NOT NULL,
        decided_at INTEGER,
        decided_by TEXT
    );
    CREATE TABLE permissions (
        operator_id TEXT NOT NULL REFERENCES operators(id),
        -- Exactly one of device_id and group_name is set.
        device_id TEXT REFERENCES devices(id),
        group_name TEXT,
        level TEXT NOT NULL CHECK (level IN ('view', 'control', 'admin')),
        PRIMARY KEY (operator_id, device_id, group_name)
    );
    CREATE TABLE deny_list (
        subject TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        reason TEXT,
        created_at INTEGER NOT NULL,
        expires_at INTEGER
    );
    CREATE TABLE offline_queue (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        target_id TEXT NOT NULL,
        sender_id TEXT NOT NULL,
        correlation_id TEXT,
        message_json TEXT NOT NULL,
        enqueued_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    );
    CREATE INDEX offline_queue_target ON offline_queue(target_id, seq);
    CREATE TABLE audit_log (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        org_id TEXT,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT,
        detail_json TEXT
    );
    "#,
    // Version 2: permissions by scope, operator sessions, onboarding and queue bookkeeping.
    r#"
    DROP TABLE permissions;
    CREATE TABLE permissions (
        operator_id TEXT NOT NULL REFERENCES operators(id),
        -- 'org' (every device of the operator's org), 'device:<id>' or 'group:<name>'.
        scope TEXT NOT NULL,
        level TEXT NOT NULL CHECK (level IN ('view', 'control', 'admin')),
        PRIMARY KEY (operator_id, scope)
    );
    CREATE TABLE sessions (
        -- SHA-256 of the cookie token: a stolen database yields no usable session.
        id TEXT PRIMARY KEY,
        operator_id TEXT NOT NULL REFERENCES operators(id),
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE INDEX handshake_keys_hash ON handshake_keys(key_hash);
    -- When the device fetched its secret (the secret itself is never stored).
    ALTER TABLE registration_requests ADD COLUMN secret_issued_at INTEGER;
    CREATE INDEX registration_requests_org ON registration_requests(org_id, status);
    ALTER TABLE offline_queue ADD COLUMN msg_type TEXT NOT NULL DEFAULT '';
    -- Set when pushed to the device; the row stays until the device answers the
    -- correlationID (or the row expires), so a crash between push and write loses nothing.
    ALTER TABLE offline_queue ADD COLUMN delivered_at INTEGER;
    CREATE INDEX offline_queue_expiry ON offline_queue(expires_at);
    CREATE INDEX audit_log_org ON audit_log(org_id, seq);
    "#,
];

/// Handle to the SQLite database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    /// A second connection used only by health probes, so a probe never waits behind a query.
    probe: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir { path: dir.to_owned(), source })?;
        }
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        migrate(&mut conn)?;
        let probe = Connection::open(path)?;
        probe.busy_timeout(Duration::from_millis(1000))?;
        Ok(Store { conn: Arc::new(Mutex::new(conn)), probe: Arc::new(Mutex::new(probe)), path: path.to_owned() })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock())).await.map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Runs `f` on the calling thread (for the CLI and start-up, outside the runtime's workers).
    pub fn call_sync<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        f(&mut self.conn.lock())
    }

    /// Checks that the store can take its write lock (without writing anything). Fails when
    /// the file is locked by someone else, read-only, gone bad, or the disk is unusable.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let probe = self.probe.clone();
        tokio::task::spawn_blocking(move || {
            let conn = probe.lock();
            conn.execute_batch("BEGIN IMMEDIATE; SELECT count(*) FROM orgs; ROLLBACK;").map_err(|e| {
                let _ = conn.execute_batch("ROLLBACK");
                StoreError::from(e)
            })
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Writes a WAL checkpoint so the main file is complete (used at shutdown).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(|c| {
            c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
            Ok(())
        })
        .await
    }

    /// Records when devices were last seen, in one transaction.
    pub async fn touch_devices(&self, seen: Vec<(String, i64)>) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        self.call(move |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached("UPDATE devices SET last_seen = ?2 WHERE id = ?1")?;
                for (id, at) in &seen {
                    st.execute(params![id, at])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in SCHEMA.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// Queries, all synchronous: call them inside [`Store::call`] or [`Store::call_sync`].
pub mod q;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_migrates_once_and_rows_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tether.db");
        let store = Store::open(&path).unwrap();
        store
            .call_sync(|c| {
                q::create_org(c, "org-1", "acme")?;
                q::create_device(c, "boat-1", "org-1", "Boat", "hash")?;
                q::create_operator(c, "op-1", "org-1", "ana", OperatorRole::Pilot)?;
                q::create_api_key(c, "k1", "op-1", "khash", None)?;
                Ok(())
            })
            .unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        store
            .call_sync(|c| {
                assert!(matches!(q::create_org(c, "org-2", "acme"), Err(StoreError::Exists(_))));
                assert_eq!(q::list_devices(c, "org-1")?.len(), 1);
                assert_eq!(q::principal_org(c, "op-1")?.as_deref(), Some("org-1"));
                assert_eq!(q::principal_org(c, "boat-1")?.as_deref(), Some("org-1"));
                assert_eq!(q::principal_org(c, "nobody")?, None);
                let k = q::api_key(c, "k1")?.unwrap();
                assert_eq!(k.operator.username, "ana");
                assert_eq!(k.operator.role, OperatorRole::Pilot);
                Ok(())
            })
            .unwrap();
    }
}
