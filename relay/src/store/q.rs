//! Queries, all synchronous: call them inside [`super::Store::call`] or [`super::Store::call_sync`].

use rusqlite::{Connection, OptionalExtension, params};

use super::*;

fn exists_err(e: rusqlite::Error, what: &str) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
            StoreError::Exists(what.to_owned())
        }
        e => e.into(),
    }
}

/// Creates an organisation.
pub fn create_org(c: &Connection, id: &str, name: &str) -> Result<Org, StoreError> {
    c.execute("INSERT INTO orgs (id, name, created_at) VALUES (?1, ?2, ?3)", params![id, name, now_ms()])
        .map_err(|e| exists_err(e, &format!("org {name:?}")))?;
    Ok(Org { id: id.to_owned(), name: name.to_owned() })
}

/// Finds an organisation by id or name.
pub fn find_org(c: &Connection, id_or_name: &str) -> Result<Option<Org>, StoreError> {
    Ok(c.query_row("SELECT id, name FROM orgs WHERE id = ?1 OR name = ?1", params![id_or_name], |r| {
        Ok(Org { id: r.get(0)?, name: r.get(1)? })
    })
    .optional()?)
}

/// Lists organisations.
pub fn list_orgs(c: &Connection) -> Result<Vec<Org>, StoreError> {
    let mut st = c.prepare("SELECT id, name FROM orgs ORDER BY name")?;
    let rows = st.query_map([], |r| Ok(Org { id: r.get(0)?, name: r.get(1)? }))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Creates a device with an already-hashed secret.
pub fn create_device(c: &Connection, id: &str, org_id: &str, name: &str, secret_hash: &str) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO devices (id, org_id, name, secret_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, org_id, name, secret_hash, now_ms()],
    )
    .map_err(|e| exists_err(e, &format!("device {id:?}")))?;
    Ok(())
}

/// A device's org, name and secret hash, unless revoked.
pub fn device_credentials(c: &Connection, id: &str) -> Result<Option<(DeviceRow, Option<String>)>, StoreError> {
    Ok(c.query_row(
        "SELECT id, org_id, name, last_seen, secret_hash FROM devices WHERE id = ?1 AND revoked_at IS NULL",
        params![id],
        |r| {
            Ok((
                DeviceRow { id: r.get(0)?, org_id: r.get(1)?, name: r.get(2)?, last_seen: r.get(3)?, group: None },
                r.get(4)?,
            ))
        },
    )
    .optional()?)
}

/// Devices of an organisation.
pub fn list_devices(c: &Connection, org_id: &str) -> Result<Vec<DeviceRow>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT id, org_id, name, last_seen, group_name FROM devices WHERE org_id = ?1 AND revoked_at IS NULL ORDER BY name, id",
    )?;
    let rows = st.query_map(params![org_id], |r| {
        Ok(DeviceRow { id: r.get(0)?, org_id: r.get(1)?, name: r.get(2)?, last_seen: r.get(3)?, group: r.get(4)? })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The org of a device or operator id, for routing decisions about offline targets.
pub fn principal_org(c: &Connection, id: &str) -> Result<Option<String>, StoreError> {
    Ok(c.query_row(
        "SELECT org_id FROM devices WHERE id = ?1 AND revoked_at IS NULL
         UNION ALL SELECT org_id FROM operators WHERE id = ?1 AND disabled_at IS NULL LIMIT 1",
        params![id],
        |r| r.get(0),
    )
    .optional()?)
}

/// Creates an operator.
pub fn create_operator(
    c: &Connection,
    id: &str,
    org_id: &str,
    username: &str,
    role: OperatorRole,
) -> Result<OperatorRow, StoreError> {
    c.execute(
        "INSERT INTO operators (id, org_id, username, role, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, org_id, username, role.as_str(), now_ms()],
    )
    .map_err(|e| exists_err(e, &format!("operator {username:?}")))?;
    Ok(OperatorRow { id: id.to_owned(), org_id: org_id.to_owned(), username: username.to_owned(), role })
}

fn operator_from_row(r: &rusqlite::Row<'_>, base: usize) -> rusqlite::Result<OperatorRow> {
    let role: String = r.get(base + 3)?;
    Ok(OperatorRow {
        id: r.get(base)?,
        org_id: r.get(base + 1)?,
        username: r.get(base + 2)?,
        role: OperatorRole::parse(&role).unwrap_or(OperatorRole::Pilot),
    })
}

/// Finds an operator by id or username.
pub fn find_operator(c: &Connection, id_or_name: &str) -> Result<Option<OperatorRow>, StoreError> {
    Ok(c.query_row(
        "SELECT id, org_id, username, role FROM operators WHERE (id = ?1 OR username = ?1) AND disabled_at IS NULL",
        params![id_or_name],
        |r| operator_from_row(r, 0),
    )
    .optional()?)
}

/// Counts operators (zero means a first start).
pub fn operator_count(c: &Connection) -> Result<i64, StoreError> {
    Ok(c.query_row("SELECT count(*) FROM operators", [], |r| r.get(0))?)
}

/// Stores an API key hash for an operator.
pub fn create_api_key(
    c: &Connection,
    key_id: &str,
    operator_id: &str,
    key_hash: &str,
    label: Option<&str>,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO api_keys (id, operator_id, key_hash, label, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![key_id, operator_id, key_hash, label, now_ms()],
    )
    .map_err(|e| exists_err(e, &format!("api key {key_id:?}")))?;
    Ok(())
}

/// A live (not revoked, not expired, operator enabled) API key by id.
pub fn api_key(c: &Connection, key_id: &str) -> Result<Option<ApiKeyRow>, StoreError> {
    Ok(c.query_row(
        "SELECT k.id, k.key_hash, o.id, o.org_id, o.username, o.role
         FROM api_keys k JOIN operators o ON o.id = k.operator_id
         WHERE k.id = ?1 AND k.revoked_at IS NULL AND o.disabled_at IS NULL
           AND (k.expires_at IS NULL OR k.expires_at > ?2)",
        params![key_id, now_ms()],
        |r| Ok(ApiKeyRow { id: r.get(0)?, key_hash: r.get(1)?, operator: operator_from_row(r, 2)? }),
    )
    .optional()?)
}

// ---------------------------------------------------------------------------------------------
// Devices: groups, revocation, secrets.

/// Sets (or replaces) a device's secret hash and clears any revocation.
pub fn set_device_secret(c: &Connection, id: &str, secret_hash: &str) -> Result<bool, StoreError> {
    Ok(c.execute("UPDATE devices SET secret_hash = ?2, revoked_at = NULL WHERE id = ?1", params![id, secret_hash])?
        == 1)
}

/// Marks a device revoked: its secret stops working.
pub fn revoke_device(c: &Connection, org_id: &str, id: &str) -> Result<bool, StoreError> {
    Ok(c.execute(
        "UPDATE devices SET revoked_at = ?3 WHERE id = ?1 AND org_id = ?2 AND revoked_at IS NULL",
        params![id, org_id, now_ms()],
    )? == 1)
}

/// Puts a device in a permission group (None removes it from its group).
pub fn set_device_group(c: &Connection, org_id: &str, id: &str, group: Option<&str>) -> Result<bool, StoreError> {
    Ok(c.execute("UPDATE devices SET group_name = ?3 WHERE id = ?1 AND org_id = ?2", params![id, org_id, group])? == 1)
}

/// A device's group, if any (revoked devices included, so checks fail closed elsewhere).
pub fn device_group(c: &Connection, id: &str) -> Result<Option<String>, StoreError> {
    Ok(c.query_row("SELECT group_name FROM devices WHERE id = ?1", params![id], |r| r.get(0)).optional()?.flatten())
}

// ---------------------------------------------------------------------------------------------
// Operators: passwords, keys, sessions.

/// Sets an operator's password hash.
pub fn set_password(c: &Connection, operator_id: &str, hash: &str) -> Result<bool, StoreError> {
    Ok(c.execute("UPDATE operators SET password_hash = ?2 WHERE id = ?1", params![operator_id, hash])? == 1)
}

/// An enabled operator and its password hash, by username.
pub fn operator_login(c: &Connection, username: &str) -> Result<Option<(OperatorRow, Option<String>)>, StoreError> {
    Ok(c.query_row(
        "SELECT id, org_id, username, role, password_hash FROM operators WHERE username = ?1 AND disabled_at IS NULL",
        params![username],
        |r| Ok((operator_from_row(r, 0)?, r.get(4)?)),
    )
    .optional()?)
}

/// Operators of an organisation (disabled ones included, flagged).
pub fn list_operators(c: &Connection, org_id: &str) -> Result<Vec<(OperatorRow, bool)>, StoreError> {
    let mut st = c.prepare(
        "SELECT id, org_id, username, role, disabled_at IS NOT NULL FROM operators WHERE org_id = ?1 ORDER BY username",
    )?;
    let rows = st.query_map(params![org_id], |r| Ok((operator_from_row(r, 0)?, r.get(4)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Disables an operator: keys and sessions stop working.
pub fn disable_operator(c: &Connection, org_id: &str, id: &str) -> Result<bool, StoreError> {
    Ok(c.execute(
        "UPDATE operators SET disabled_at = ?3 WHERE id = ?1 AND org_id = ?2 AND disabled_at IS NULL",
        params![id, org_id, now_ms()],
    )? == 1)
}

/// An API key's metadata (never its hash).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApiKeyInfo {
    /// Key id (`tk_<id>_...`).
    pub id: String,
    /// Owner.
    #[serde(rename = "operatorID")]
    pub operator_id: String,
    /// Note.
    pub label: Option<String>,
    /// ms since the Unix epoch.
    #[serde(rename = "createdAt")]
    pub created_at: i64,
    /// ms since the Unix epoch, if revoked.
    #[serde(rename = "revokedAt")]
    pub revoked_at: Option<i64>,
}

/// API keys of an organisation's operators.
pub fn list_api_keys(c: &Connection, org_id: &str) -> Result<Vec<ApiKeyInfo>, StoreError> {
    let mut st = c.prepare(
        "SELECT k.id, k.operator_id, k.label, k.created_at, k.revoked_at FROM api_keys k
         JOIN operators o ON o.id = k.operator_id WHERE o.org_id = ?1 ORDER BY k.created_at",
    )?;
    let rows = st.query_map(params![org_id], |r| {
        Ok(ApiKeyInfo {
            id: r.get(0)?,
            operator_id: r.get(1)?,
            label: r.get(2)?,
            created_at: r.get(3)?,
            revoked_at: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Revokes an API key of the org; returns its operator.
pub fn revoke_api_key(c: &Connection, org_id: &str, key_id: &str) -> Result<Option<String>, StoreError> {
    let op: Option<String> = c
        .query_row(
            "SELECT k.operator_id FROM api_keys k JOIN operators o ON o.id = k.operator_id
             WHERE k.id = ?1 AND o.org_id = ?2 AND k.revoked_at IS NULL",
            params![key_id, org_id],
            |r| r.get(0),
        )
        .optional()?;
    if op.is_some() {
        c.execute("UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1", params![key_id, now_ms()])?;
    }
    Ok(op)
}

/// Stores a login session (by the hash of its token) that ends `ttl_ms` from now.
pub fn create_session(c: &Connection, id_hash: &str, operator_id: &str, ttl_ms: i64) -> Result<(), StoreError> {
    let now = now_ms();
    c.execute(
        "INSERT INTO sessions (id, operator_id, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
        params![id_hash, operator_id, now, now + ttl_ms],
    )?;
    Ok(())
}

/// The operator of a live session: not revoked, not past its expiry, and not older than
/// `max_age_ms` (the current `--session-ttl`, so shortening it also ends older sessions).
pub fn session_operator(c: &Connection, id_hash: &str, max_age_ms: i64) -> Result<Option<OperatorRow>, StoreError> {
    let now = now_ms();
    Ok(c.query_row(
        "SELECT o.id, o.org_id, o.username, o.role FROM sessions s JOIN operators o ON o.id = s.operator_id
         WHERE s.id = ?1 AND s.revoked_at IS NULL AND s.expires_at > ?2 AND s.created_at > ?3
           AND o.disabled_at IS NULL",
        params![id_hash, now, now - max_age_ms],
        |r| operator_from_row(r, 0),
    )
    .optional()?)
}

/// Ends a session.
pub fn revoke_session(c: &Connection, id_hash: &str) -> Result<bool, StoreError> {
    Ok(c.execute(
        "UPDATE sessions SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        params![id_hash, now_ms()],
    )? == 1)
}

// ---------------------------------------------------------------------------------------------
// Handshake keys and registration requests.

/// A handshake key's metadata (never the key).
#[derive(Debug, Clone, serde::Serialize)]
pub struct HandshakeKeyInfo {
    /// Stable id.
    pub id: String,
    /// Note.
    pub label: Option<String>,
    /// ms since the Unix epoch.
    #[serde(rename = "createdAt")]
    pub created_at: i64,
    /// ms since the Unix epoch; None = never.
    #[serde(rename = "expiresAt")]
    pub expires_at: Option<i64>,
    /// Registrations still allowed; None = unlimited.
    #[serde(rename = "usesLeft")]
    pub uses_left: Option<i64>,
    /// ms since the Unix epoch, if revoked.
    #[serde(rename = "revokedAt")]
    pub revoked_at: Option<i64>,
}

/// Creates a handshake key (stored as the SHA-256 of the key).
pub fn create_handshake_key(
    c: &Connection,
    id: &str,
    org_id: &str,
    key_hash: &str,
    label: Option<&str>,
    expires_at: Option<i64>,
    uses_left: Option<i64>,
) -> Result<(), StoreError> {
    let taken: i64 =
        c.query_row("SELECT count(*) FROM handshake_keys WHERE key_hash = ?1", params![key_hash], |r| r.get(0))?;
    if taken > 0 {
        return Err(StoreError::Exists("a handshake key with this value".into()));
    }
    c.execute(
        "INSERT INTO handshake_keys (id, org_id, key_hash, label, created_at, expires_at, uses_left)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![id, org_id, key_hash, label, now_ms(), expires_at, uses_left],
    )?;
    Ok(())
}

/// Handshake keys of an organisation.
pub fn list_handshake_keys(c: &Connection, org_id: &str) -> Result<Vec<HandshakeKeyInfo>, StoreError> {
    let mut st = c.prepare(
        "SELECT id, label, created_at, expires_at, uses_left, revoked_at FROM handshake_keys WHERE org_id = ?1 ORDER BY created_at",
    )?;
    let rows = st.query_map(params![org_id], |r| {
        Ok(HandshakeKeyInfo {
            id: r.get(0)?,
            label: r.get(1)?,
            created_at: r.get(2)?,
            expires_at: r.get(3)?,
            uses_left: r.get(4)?,
            revoked_at: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Replaces a handshake key's value (same id and settings).
pub fn rotate_handshake_key(c: &Connection, org_id: &str, id: &str, key_hash: &str) -> Result<bool, StoreError> {
    Ok(c.execute(
        "UPDATE handshake_keys SET key_hash = ?3 WHERE id = ?1 AND org_id = ?2 AND revoked_at IS NULL",
        params![id, org_id, key_hash],
    )? == 1)
}

/// Expires a handshake key now.
pub fn revoke_handshake_key(c: &Connection, org_id: &str, id: &str) -> Result<bool, StoreError> {
    Ok(c.execute(
        "UPDATE handshake_keys SET revoked_at = ?3 WHERE id = ?1 AND org_id = ?2 AND revoked_at IS NULL",
        params![id, org_id, now_ms()],
    )? == 1)
}

/// Uses a handshake key once: if it is valid (not revoked, not expired, uses left), takes one
/// use and returns its id and org.
pub fn consume_handshake_key(c: &mut Connection, key_hash: &str) -> Result<Option<(String, String)>, StoreError> {
    let tx = c.transaction()?;
    let row: Option<(String, String, Option<i64>)> = tx
        .query_row(
            "SELECT id, org_id, uses_left FROM handshake_keys
             WHERE key_hash = ?1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?2)",
            params![key_hash, now_ms()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((id, org, uses)) = row else { return Ok(None) };
    match uses {
        Some(n) if n <= 0 => return Ok(None),
        Some(_) => {
            tx.execute("UPDATE handshake_keys SET uses_left = uses_left - 1 WHERE id = ?1", params![id])?;
        }
        None => {}
    }
    tx.commit()?;
    Ok(Some((id, org)))
}

/// A registration request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Registration {
    /// The requestID.
    #[serde(rename = "requestID")]
    pub id: String,
    /// Organisation of the handshake key used.
    #[serde(skip)]
    pub org_id: String,
    /// The name the device gave.
    pub name: String,
    /// Where it connected from.
    #[serde(rename = "remoteAddr")]
    pub remote_addr: Option<String>,
    /// pending, approved or rejected.
    pub status: String,
    /// The device created on approval.
    #[serde(rename = "clientID")]
    pub device_id: Option<String>,
    /// ms since the Unix epoch.
    #[serde(rename = "createdAt")]
    pub created_at: i64,
    /// When the device fetched its secret.
    #[serde(rename = "secretIssuedAt")]
    pub secret_issued_at: Option<i64>,
}

const REG_COLS: &str = "id, org_id, name, remote_addr, status, device_id, created_at, secret_issued_at";

fn registration_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Registration> {
    Ok(Registration {
        id: r.get(0)?,
        org_id: r.get(1)?,
        name: r.get(2)?,
        remote_addr: r.get(3)?,
        status: r.get(4)?,
        device_id: r.get(5)?,
        created_at: r.get(6)?,
        secret_issued_at: r.get(7)?,
    })
}

/// Records a pending registration.
pub fn create_registration(
    c: &Connection,
    id: &str,
    org_id: &str,
    handshake_key_id: &str,
    name: &str,
    remote_addr: Option<&str>,
) -> Result<Registration, StoreError> {
    c.execute(
        "INSERT INTO registration_requests (id, org_id, handshake_key_id, name, remote_addr, status, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6)",
        params![id, org_id, handshake_key_id, name, remote_addr, now_ms()],
    )?;
    get_registration(c, id)?.ok_or_else(|| StoreError::NotFound(format!("registration {id}")))
}

/// A registration by requestID.
pub fn get_registration(c: &Connection, id: &str) -> Result<Option<Registration>, StoreError> {
    Ok(c.query_row(
        &format!("SELECT {REG_COLS} FROM registration_requests WHERE id = ?1"),
        params![id],
        registration_from_row,
    )
    .optional()?)
}

/// Registrations of an org, newest first, optionally only one status.
pub fn list_registrations(c: &Connection, org_id: &str, status: Option<&str>) -> Result<Vec<Registration>, StoreError> {
    let mut st = c.prepare(&format!(
        "SELECT {REG_COLS} FROM registration_requests WHERE org_id = ?1 AND (?2 IS NULL OR status = ?2) ORDER BY created_at DESC LIMIT 500"
    ))?;
    let rows = st.query_map(params![org_id, status], registration_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Approves a pending request: creates the device (without a secret yet; the device gets one
/// when it polls its status). Returns the updated request, or None if it was not pending.
pub fn approve_registration(
    c: &mut Connection,
    org_id: &str,
    id: &str,
    device_id: &str,
    name: &str,
    decided_by: &str,
) -> Result<Option<Registration>, StoreError> {
    let tx = c.transaction()?;
    let pending: i64 = tx.query_row(
        "SELECT count(*) FROM registration_requests WHERE id = ?1 AND org_id = ?2 AND status = 'pending'",
        params![id, org_id],
        |r| r.get(0),
    )?;
    if pending == 0 {
        return Ok(None);
    }
    // The device row first: the request references it.
    tx.execute(
        "INSERT INTO devices (id, org_id, name, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![device_id, org_id, name, now_ms()],
    )
    .map_err(|e| exists_err(e, &format!("device {device_id:?}")))?;
    tx.execute(
        "UPDATE registration_requests SET status = 'approved', device_id = ?3, decided_at = ?4, decided_by = ?5
         WHERE id = ?1 AND org_id = ?2",
        params![id, org_id, device_id, now_ms(), decided_by],
    )?;
    tx.commit()?;
    get_registration(c, id)
}

/// Rejects a pending request.
pub fn reject_registration(
    c: &Connection,
    org_id: &str,
    id: &str,
    decided_by: &str,
) -> Result<Option<Registration>, StoreError> {
    let n = c.execute(
        "UPDATE registration_requests SET status = 'rejected', decided_at = ?3, decided_by = ?4
         WHERE id = ?1 AND org_id = ?2 AND status = 'pending'",
        params![id, org_id, now_ms(), decided_by],
    )?;
    if n == 0 { Ok(None) } else { get_registration(c, id) }
}

/// Gives an approved request's device its secret hash, once: true if this call did it.
pub fn issue_registration_secret(
    c: &mut Connection,
    id: &str,
    device_id: &str,
    secret_hash: &str,
) -> Result<bool, StoreError> {
    let tx = c.transaction()?;
    let n = tx.execute(
        "UPDATE registration_requests SET secret_issued_at = ?2 WHERE id = ?1 AND status = 'approved' AND secret_issued_at IS NULL",
        params![id, now_ms()],
    )?;
    if n == 0 {
        return Ok(false);
    }
    tx.execute("UPDATE devices SET secret_hash = ?2 WHERE id = ?1", params![device_id, secret_hash])?;
    tx.commit()?;
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Permissions.

/// One grant.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    /// The operator.
    #[serde(rename = "operatorID")]
    pub operator_id: String,
    /// `org`, `device:<id>` or `group:<name>`.
    pub scope: String,
    /// `view`, `control` or `admin`.
    pub level: String,
}

/// Grants (or changes) a permission.
pub fn set_permission(c: &Connection, operator_id: &str, scope: &str, level: &str) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO permissions (operator_id, scope, level) VALUES (?1, ?2, ?3)
         ON CONFLICT (operator_id, scope) DO UPDATE SET level = excluded.level",
        params![operator_id, scope, level],
    )?;
    Ok(())
}

/// Removes a permission.
pub fn delete_permission(c: &Connection, operator_id: &str, scope: &str) -> Result<bool, StoreError> {
    Ok(c.execute("DELETE FROM permissions WHERE operator_id = ?1 AND scope = ?2", params![operator_id, scope])? == 1)
}

/// Grants of one operator.
pub fn operator_grants(c: &Connection, operator_id: &str) -> Result<Vec<Grant>, StoreError> {
    let mut st = c.prepare_cached("SELECT operator_id, scope, level FROM permissions WHERE operator_id = ?1")?;
    let rows = st.query_map(params![operator_id], |r| {
        Ok(Grant { operator_id: r.get(0)?, scope: r.get(1)?, level: r.get(2)? })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Grants in an organisation.
pub fn list_permissions(c: &Connection, org_id: &str) -> Result<Vec<Grant>, StoreError> {
    let mut st = c.prepare(
        "SELECT p.operator_id, p.scope, p.level FROM permissions p JOIN operators o ON o.id = p.operator_id
         WHERE o.org_id = ?1 ORDER BY p.operator_id, p.scope",
    )?;
    let rows =
        st.query_map(params![org_id], |r| Ok(Grant { operator_id: r.get(0)?, scope: r.get(1)?, level: r.get(2)? }))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---------------------------------------------------------------------------------------------
// Deny list.

/// A deny-list entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Deny {
    /// What is denied: a device id, operator id, `key:<id>`, `session:<hash>`, `ip:<addr>`.
    pub subject: String,
    /// device, operator, key, session, ip.
    pub kind: String,
    /// Why.
    pub reason: Option<String>,
    /// ms since the Unix epoch.
    #[serde(rename = "createdAt")]
    pub created_at: i64,
    /// ms since the Unix epoch; None = until removed.
    #[serde(rename = "expiresAt")]
    pub expires_at: Option<i64>,
}

/// Adds (or replaces) a deny-list entry.
pub fn add_deny(
    c: &Connection,
    subject: &str,
    kind: &str,
    reason: Option<&str>,
    expires_at: Option<i64>,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO deny_list (subject, kind, reason, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (subject) DO UPDATE SET kind = excluded.kind, reason = excluded.reason,
           created_at = excluded.created_at, expires_at = excluded.expires_at",
        params![subject, kind, reason, now_ms(), expires_at],
    )?;
    Ok(())
}

/// Removes a deny-list entry.
pub fn remove_deny(c: &Connection, subject: &str) -> Result<bool, StoreError> {
    Ok(c.execute("DELETE FROM deny_list WHERE subject = ?1", params![subject])? == 1)
}

/// The organisation a deny-list subject belongs to: `Ok(Some(org))` for devices, operators,
/// keys and sessions; `Ok(None)` for relay-wide subjects (`ip:`, `ticket:`) and for unknown ones
/// (see `is_global`).
pub fn subject_org(c: &Connection, subject: &str) -> Result<Option<String>, StoreError> {
    let q = |sql: &str, v: &str| -> Result<Option<String>, StoreError> {
        Ok(c.query_row(sql, params![v], |r| r.get(0)).optional()?)
    };
    if let Some(k) = subject.strip_prefix("key:") {
        return q("SELECT o.org_id FROM api_keys k JOIN operators o ON o.id = k.operator_id WHERE k.id = ?1", k);
    }
    if let Some(s) = subject.strip_prefix("session:") {
        return q("SELECT o.org_id FROM sessions s JOIN operators o ON o.id = s.operator_id WHERE s.id = ?1", s);
    }
    q("SELECT org_id FROM devices WHERE id = ?1 UNION ALL SELECT org_id FROM operators WHERE id = ?1 LIMIT 1", subject)
}

/// Subjects that belong to no organisation: addresses and tickets.
pub fn is_global_subject(subject: &str) -> bool {
    subject.starts_with("ip:") || subject.starts_with("ticket:")
}

/// Entries in force now (expired ones are deleted).
pub fn active_denies(c: &Connection) -> Result<Vec<Deny>, StoreError> {
    let now = now_ms();
    c.execute("DELETE FROM deny_list WHERE expires_at IS NOT NULL AND expires_at <= ?1", params![now])?;
    let mut st =
        c.prepare("SELECT subject, kind, reason, created_at, expires_at FROM deny_list ORDER BY created_at")?;
    let rows = st.query_map([], |r| {
        Ok(Deny {
            subject: r.get(0)?,
            kind: r.get(1)?,
            reason: r.get(2)?,
            created_at: r.get(3)?,
            expires_at: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---------------------------------------------------------------------------------------------
// Offline queue.

/// A queued message.
#[derive(Debug, Clone)]
pub struct Queued {
    /// Order of arrival.
    pub seq: i64,
    /// Who sent it.
    pub sender_id: String,
    /// Its correlationID.
    pub correlation_id: Option<String>,
    /// Its type.
    pub msg_type: String,
    /// The message as it would have been delivered.
    pub message_json: String,
    /// ms since the Unix epoch.
    pub expires_at: i64,
    /// When it was pushed to the device (it then waits for the device's answer).
    pub delivered_at: Option<i64>,
}

/// Why a message could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Stored, with this sequence number; `depth` messages now wait for the target.
    Queued {
        /// Row sequence.
        seq: i64,
        /// Messages waiting for the target, this one included.
        depth: i64,
    },
    /// The target's queue holds `limit` messages already.
    Full {
        /// The limit in force.
        limit: i64,
    },
}

/// Stores a message for an offline target unless its queue is full.
#[allow(clippy::too_many_arguments)]
pub fn enqueue(
    c: &mut Connection,
    target_id: &str,
    sender_id: &str,
    correlation_id: Option<&str>,
    msg_type: &str,
    message_json: &str,
    ttl_ms: i64,
    limit: i64,
) -> Result<EnqueueOutcome, StoreError> {
    let now = now_ms();
    let tx = c.transaction()?;
    let depth: i64 = tx.query_row(
        "SELECT count(*) FROM offline_queue WHERE target_id = ?1 AND expires_at > ?2 AND delivered_at IS NULL",
        params![target_id, now],
        |r| r.get(0),
    )?;
    if depth >= limit {
        return Ok(EnqueueOutcome::Full { limit });
    }
    tx.execute(
        "INSERT INTO offline_queue (target_id, sender_id, correlation_id, msg_type, message_json, enqueued_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![target_id, sender_id, correlation_id, msg_type, message_json, now, now + ttl_ms],
    )?;
    let seq = tx.last_insert_rowid();
    tx.commit()?;
    Ok(EnqueueOutcome::Queued { seq, depth: depth + 1 })
}

/// Unexpired messages for a target, oldest first.
pub fn queued_for(c: &Connection, target_id: &str) -> Result<Vec<Queued>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT seq, sender_id, correlation_id, msg_type, message_json, expires_at, delivered_at FROM offline_queue
         WHERE target_id = ?1 AND expires_at > ?2 ORDER BY seq",
    )?;
    let rows = st.query_map(params![target_id, now_ms()], |r| {
        Ok(Queued {
            seq: r.get(0)?,
            sender_id: r.get(1)?,
            correlation_id: r.get(2)?,
            msg_type: r.get(3)?,
            message_json: r.get(4)?,
            expires_at: r.get(5)?,
            delivered_at: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Marks messages as pushed to the target; messages without a correlationID cannot be
/// acknowledged, so they are deleted instead.
pub fn mark_delivered(c: &mut Connection, seqs: &[i64]) -> Result<(), StoreError> {
    let tx = c.transaction()?;
    {
        let mut del = tx.prepare_cached("DELETE FROM offline_queue WHERE seq = ?1 AND correlation_id IS NULL")?;
        let mut mark = tx.prepare_cached("UPDATE offline_queue SET delivered_at = ?2 WHERE seq = ?1")?;
        let now = now_ms();
        for s in seqs {
            if del.execute(params![s])? == 0 {
                mark.execute(params![s, now])?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// The target answered `correlation_id`: its queued request is done.
pub fn ack_queued(c: &Connection, target_id: &str, correlation_id: &str) -> Result<bool, StoreError> {
    Ok(c.execute(
        "DELETE FROM offline_queue WHERE target_id = ?1 AND correlation_id = ?2",
        params![target_id, correlation_id],
    )? > 0)
}

/// Removes and returns messages whose time ran out before the target took them.
pub fn take_expired(c: &mut Connection) -> Result<Vec<(String, Queued)>, StoreError> {
    let now = now_ms();
    let tx = c.transaction()?;
    let expired = {
        let mut st = tx.prepare(
            "SELECT target_id, seq, sender_id, correlation_id, msg_type, message_json, expires_at, delivered_at FROM offline_queue
             WHERE expires_at <= ?1 ORDER BY seq",
        )?;
        let rows = st.query_map(params![now], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Queued {
                    seq: r.get(1)?,
                    sender_id: r.get(2)?,
                    correlation_id: r.get(3)?,
                    msg_type: r.get(4)?,
                    message_json: r.get(5)?,
                    expires_at: r.get(6)?,
                    delivered_at: r.get(7)?,
                },
            ))
        })?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    tx.execute("DELETE FROM offline_queue WHERE expires_at <= ?1", params![now])?;
    tx.commit()?;
    Ok(expired)
}

/// Queue limits for a target: the device's override, else its org's, else `None`.
pub fn queue_limits(c: &Connection, device_id: &str) -> Result<(Option<i64>, Option<i64>), StoreError> {
    Ok(c.query_row(
        "SELECT coalesce(json_extract(d.limits_json, '$.queueLimit'), o.queue_limit),
                coalesce(json_extract(d.limits_json, '$.queueTtlSecs'), o.queue_ttl_secs)
         FROM devices d JOIN orgs o ON o.id = d.org_id WHERE d.id = ?1",
        params![device_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()?
    .unwrap_or((None, None)))
}

/// Sets an org's queue limits (None = relay default).
pub fn set_org_queue_limits(
    c: &Connection,
    org_id: &str,
    limit: Option<i64>,
    ttl_secs: Option<i64>,
) -> Result<bool, StoreError> {
    Ok(c.execute(
        "UPDATE orgs SET queue_limit = ?2, queue_ttl_secs = ?3 WHERE id = ?1",
        params![org_id, limit, ttl_secs],
    )? == 1)
}

/// Sets a device's or operator's limit overrides (JSON object; None clears them).
pub fn set_limits(c: &Connection, id: &str, limits_json: Option<&str>) -> Result<bool, StoreError> {
    let n = c.execute("UPDATE devices SET limits_json = ?2 WHERE id = ?1", params![id, limits_json])?
        + c.execute("UPDATE operators SET limits_json = ?2 WHERE id = ?1", params![id, limits_json])?;
    Ok(n > 0)
}

/// A principal's limit overrides (JSON object text).
pub fn limits_of(c: &Connection, id: &str) -> Result<Option<String>, StoreError> {
    Ok(c.query_row(
        "SELECT limits_json FROM devices WHERE id = ?1 UNION ALL SELECT limits_json FROM operators WHERE id = ?1 LIMIT 1",
        params![id],
        |r| r.get(0),
    )
    .optional()?
    .flatten())
}

// ---------------------------------------------------------------------------------------------
// Audit log.

/// One audit entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditEntry {
    /// Order.
    pub seq: i64,
    /// ms since the Unix epoch.
    pub at: i64,
    /// Who did it (operator id, or `relay`).
    pub actor: String,
    /// What (e.g. `device.revoke`).
    pub action: String,
    /// To what.
    pub subject: Option<String>,
    /// Details.
    pub detail: Option<serde_json::Value>,
}

/// Appends to the audit log.
pub fn audit(
    c: &Connection,
    org_id: Option<&str>,
    actor: &str,
    action: &str,
    subject: Option<&str>,
    detail: Option<&serde_json::Value>,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO audit_log (at, org_id, actor, action, subject, detail_json) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![now_ms(), org_id, actor, action, subject, detail.map(|d| d.to_string())],
    )?;
    Ok(())
}

/// Audit entries of an org, newest first, before `before_seq` if given.
pub fn list_audit(
    c: &Connection,
    org_id: &str,
    limit: i64,
    before_seq: Option<i64>,
) -> Result<Vec<AuditEntry>, StoreError> {
    let mut st = c.prepare(
        "SELECT seq, at, actor, action, subject, detail_json FROM audit_log
         WHERE org_id = ?1 AND (?2 IS NULL OR seq < ?2) ORDER BY seq DESC LIMIT ?3",
    )?;
    let rows = st.query_map(params![org_id, before_seq, limit], |r| {
        let detail: Option<String> = r.get(5)?;
        Ok(AuditEntry {
            seq: r.get(0)?,
            at: r.get(1)?,
            actor: r.get(2)?,
            action: r.get(3)?,
            subject: r.get(4)?,
            detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
