// HTTP helpers for the relay's JSON API. Every call takes the operator key explicitly (no hidden
// global), and every failure becomes an ApiError with a human message, so callers only need
// one catch.

const TIMEOUT_MS = 10000;

/** A failed API call. `status` is 0 when the relay could not be reached at all. */
export class ApiError extends Error {
  constructor(message, { status = 0, code = 'network' } = {}) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
  }

  /** True when the key was refused: the session must end. */
  get isAuth() {
    return this.status === 401;
  }

  /** True when the relay (or the proxy in front of it) could not be reached or is down. */
  get isUnreachable() {
    return this.status === 0 || this.status === 502 || this.status === 503 || this.status === 504;
  }
}

/**
 * Sends one request and returns the parsed JSON body. Errors follow the relay's
 * `{"error":{"code":..,"message":..}}` shape; anything else still yields a readable message.
 */
export async function request(path, { key, method = 'GET', body, timeoutMs = TIMEOUT_MS } = {}) {
  const headers = { Accept: 'application/json' };
  if (key) headers.Authorization = `Bearer ${key}`;
  let payload;
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    payload = JSON.stringify(body);
  }

  // A hung request must not leave the login button spinning forever.
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  let res;
  try {
    res = await fetch(path, { method, headers, body: payload, signal: abort.signal, cache: 'no-store' });
  } catch (e) {
    const why = e && e.name === 'AbortError' ? `no answer within ${timeoutMs / 1000} s` : 'network error';
    throw new ApiError(`Cannot reach the relay (${why}).`, { status: 0, code: 'network' });
  } finally {
    clearTimeout(timer);
  }

  let text = '';
  try {
    text = await res.text();
  } catch {
    // Body lost mid-read; handled as "no JSON" below.
  }
  let json = null;
  if (text) {
    try {
      json = JSON.parse(text);
    } catch {
      json = null;
    }
  }

  if (!res.ok) {
    const err = json && typeof json === 'object' ? json.error : null;
    const message =
      err && typeof err.message === 'string' && err.message
        ? err.message
        : `The relay answered HTTP ${res.status}${res.statusText ? ` ${res.statusText}` : ''}.`;
    const code = err && typeof err.code === 'string' ? err.code : `http_${res.status}`;
    throw new ApiError(message, { status: res.status, code });
  }
  if (json === null || typeof json !== 'object') {
    throw new ApiError(`Unexpected answer from ${path} (not JSON).`, { status: res.status, code: 'bad_response' });
  }
  return json;
}

/** `GET /api/me`: who the key belongs to. */
export function getMe(key) {
  return request('/api/me', { key });
}

const num = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : null);

/**
 * `GET /api/devices`, normalised to an array of `{id, name, online, lastSeen, access, lease,
 * battery, link, alerts}` (older relays lack the last three: null, null, []).
 */
export async function listDevices(key) {
  const json = await request('/api/devices', { key });
  const list = Array.isArray(json.devices) ? json.devices : [];
  return list
    .filter((d) => d && typeof d === 'object' && typeof d.id === 'string')
    .map((d) => ({
      id: d.id,
      name: typeof d.name === 'string' && d.name ? d.name : d.id,
      online: d.online === true,
      lastSeen: num(d.lastSeen),
      access: ['view', 'control', 'admin'].includes(d.access) ? d.access : 'view',
      lease: d.lease && typeof d.lease === 'object' && typeof d.lease.holder === 'string'
        ? { holder: d.lease.holder, holderName: typeof d.lease.holderName === 'string' ? d.lease.holderName : d.lease.holder }
        : null,
      group: typeof d.group === 'string' ? d.group : null,
      battery: num(d.battery),
      link: d.link && typeof d.link === 'object'
        ? {
            rttMs: num(d.link.rttMs),
            lastMessageMs: num(d.link.lastMessageMs),
            quality: ['good', 'fair', 'poor'].includes(d.link.quality) ? d.link.quality : null,
          }
        : null,
      alerts: Array.isArray(d.alerts)
        ? d.alerts
            .filter((a) => a && typeof a === 'object' && typeof a.code === 'string')
            .map((a) => ({ code: a.code, message: typeof a.message === 'string' ? a.message : a.code, since: num(a.since) }))
        : [],
    }));
}

/**
 * `POST /api/auth/login` with a username and password. The relay sets the `tether_session`
 * cookie (HttpOnly): later calls without a key use it. Returns `{id, username, role, org, expiresIn}`.
 */
export function login(username, password) {
  return request('/api/auth/login', { method: 'POST', body: { username, password } });
}

/** `POST /api/auth/logout`: ends the cookie session (a key is not revoked). */
export function logout(key) {
  return request('/api/auth/logout', { key, method: 'POST', body: {} });
}

/** `GET /api/console`: the relay's settings for the console (defaults when it has none). */
export async function getConsoleConfig(key) {
  const defaults = { mapTiles: null, mapAttribution: null, staleVideoMs: 2000, sessionTtlSecs: 43200 };
  let json;
  try {
    json = await request('/api/console', { key });
  } catch (e) {
    if (e.status === 404) return defaults; // an older relay
    throw e;
  }
  return {
    mapTiles: typeof json.mapTiles === 'string' && json.mapTiles ? json.mapTiles : null,
    mapAttribution: typeof json.mapAttribution === 'string' && json.mapAttribution ? json.mapAttribution : null,
    staleVideoMs: num(json.staleVideoMs) ?? defaults.staleVideoMs,
    sessionTtlSecs: num(json.sessionTtlSecs) ?? defaults.sessionTtlSecs,
  };
}

/** `GET /api/registrations?status=pending` (admins). */
export async function pendingRegistrations(key) {
  const json = await request('/api/registrations?status=pending', { key });
  return (Array.isArray(json.registrations) ? json.registrations : []).filter(
    (r) => r && typeof r === 'object' && typeof r.requestID === 'string' && r.status === 'pending',
  );
}

/** Approves a registration request; `deviceID` and `name` may be empty for the defaults. */
export function approveRegistration(key, requestID, { deviceID, name } = {}) {
  const body = {};
  if (deviceID) body.deviceID = deviceID;
  if (name) body.name = name;
  return request(`/api/registrations/${encodeURIComponent(requestID)}/approve`, { key, method: 'POST', body });
}

export function rejectRegistration(key, requestID) {
  return request(`/api/registrations/${encodeURIComponent(requestID)}/reject`, { key, method: 'POST', body: {} });
}

/** `POST /api/auth/ws-ticket`: a one-time ticket for opening `/ws/admin`. */
export async function getWsTicket(key) {
  // Empty body as the relay expects: no Content-Type, no payload.
  const json = await request('/api/auth/ws-ticket', { key, method: 'POST' });
  if (typeof json.ticket !== 'string' || !json.ticket) {
    throw new ApiError('The relay returned no WebSocket ticket.', { status: 200, code: 'bad_response' });
  }
  return json.ticket;
}
