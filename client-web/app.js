// Tether pilot console: entry point. Owns the application state and wires the API, the live
// connection and the views together. Routing is by location.hash (#/ = fleet,
// #/device/<id> = one device) so that reload and the browser's back button work.

import * as api from './js/api.js';
import { LiveClient } from './js/live.js';
import { DeviceTelemetry } from './js/telemetry.js';
import { clockTime, formatBitrate, formatMs, formatPercent, formatRate } from './js/format.js';
import { VideoLink, VideoPanel } from './js/video.js';
import {
  $, DeviceView, FleetView, describeFrame, renderConn, renderDropped, renderRtt, renderUser,
  setLoginBusy, showLoginError, showScreen, toast,
} from './js/views.js';

const KEY_STORAGE = 'tether.operatorKey';
const FLEET_REFRESH_MS = 5000;
/** Only a hint for the login error message; the relay is the judge of what a key is. */
const KEY_FORMAT = /^tk_[^_\s]+_\S+$/;

// sessionStorage can throw (storage disabled, some private modes): the console still works,
// the key just does not survive a reload.
const storage = {
  get() {
    try { return sessionStorage.getItem(KEY_STORAGE); } catch { return null; }
  },
  set(v) {
    try { sessionStorage.setItem(KEY_STORAGE, v); } catch { /* not persisted */ }
  },
  clear() {
    try { sessionStorage.removeItem(KEY_STORAGE); } catch { /* nothing stored */ }
  },
};

const state = {
  session: null, // a fresh object per login: async work from an old login compares and bails out
  key: null,
  me: null,
  live: null,
  conn: { state: 'stopped', retryAt: null, failures: 0 },
  devices: [],
  devicesById: new Map(),
  fleetTimer: 0,
  // The open device, if any.
  deviceID: null,
  tel: null,
  sub: null, // {state: waiting | pending | subscribed | failed}
  deviceOnline: null,
  dropped: null,
  ignoredTypes: new Set(),
};

const fleetView = new FleetView((id) => {
  location.hash = `#/device/${encodeURIComponent(id)}`;
});
const deviceView = new DeviceView();
// Video rides on the live connection: it sends through it and hears about its ups and downs.
const videoLink = new VideoLink({
  send: (msg) => !!state.live && state.live.send(msg),
  relayUp: () => !!state.live && state.live.connected,
  relaySession: () => (state.live ? state.live.session : null),
  log: (kind, text) => logEvent(kind, 'video', text),
});
// The panel renders the link into #video-panel; it lives as long as the page.
new VideoPanel(videoLink, { formatBitrate, formatMs, formatPercent, formatRate });

// ---- login / logout ---------------------------------------------------------------------------

async function boot() {
  wireUi();
  const key = storage.get();
  if (!key) {
    showLogin();
    return;
  }
  try {
    const me = await api.getMe(key);
    enterConsole(key, me);
  } catch (e) {
    if (e.isAuth) {
      storage.clear();
      showLogin(`Your session ended: ${e.message}`);
    } else {
      // Keep the key: the relay may just be restarting. "Log in" retries with it.
      $('login-key').value = key;
      showLogin(e.message);
    }
  }
}

function showLogin(error = null) {
  showScreen('login');
  showLoginError(error);
  document.title = 'Tether — pilot console';
  $('login-key').focus();
}

async function onLoginSubmit(ev) {
  ev.preventDefault();
  const key = $('login-key').value.trim();
  if (!key) {
    showLoginError('Enter your operator API key.');
    return;
  }
  setLoginBusy(true);
  showLoginError(null);
  try {
    const me = await api.getMe(key);
    storage.set(key);
    enterConsole(key, me);
  } catch (e) {
    let message = e.message;
    if (e.isAuth && !KEY_FORMAT.test(key)) message += ' (Operator keys look like tk_<id>_<secret>.)';
    showLoginError(message);
    setLoginBusy(false);
    $('login-key').focus();
    $('login-key').select();
    return;
  }
  setLoginBusy(false);
}

function enterConsole(key, me) {
  const session = {};
  state.session = session;
  state.key = key;
  state.me = me && typeof me === 'object' ? me : {};
  $('login-key').value = '';
  renderUser(state.me);

  const live = new LiveClient({
    getTicket: () => api.getWsTicket(key),
    url: (ticket) =>
      `${location.protocol === 'https:' ? 'wss://' : 'ws://'}${location.host}/ws/admin?ticket=${encodeURIComponent(ticket)}`,
  });
  state.live = live;
  live.addEventListener('status', (e) => guarded(() => onConnStatus(e.detail)));
  live.addEventListener('auth_ok', (e) => guarded(() => onAuthOk(e.detail)));
  live.addEventListener('rtt', (e) => guarded(() => renderRtt(e.detail.rttMs, e.detail.relayOffsetMs)));
  live.addEventListener('message', (e) => guarded(() => onMessage(e.detail)));
  live.addEventListener('bad-frame', (e) => guarded(() => onBadFrame(e.detail)));
  live.addEventListener('auth-lost', (e) => logout(`Your session ended: ${e.detail.message}`));
  live.start();

  showScreen('fleet');
  pollFleet(session);
  route();
}

function logout(message = null) {
  if (state.deviceID) closeDevice();
  if (state.live) state.live.stop();
  clearTimeout(state.fleetTimer);
  Object.assign(state, {
    session: null, key: null, me: null, live: null, devices: [], devicesById: new Map(), dropped: null,
    conn: { state: 'stopped', retryAt: null, failures: 0 },
  });
  state.ignoredTypes.clear();
  storage.clear();
  renderUser(null);
  renderDropped(null);
  fleetView.render([]);
  fleetView.setError(null);
  // Drop the device from the address bar: the next login starts at the fleet.
  history.replaceState(null, '', location.pathname + location.search);
  $('login-key').value = '';
  showLogin(message);
}

// ---- routing ----------------------------------------------------------------------------------

function parseHash() {
  const m = /^#\/device\/(.+)$/.exec(location.hash);
  if (m) {
    try {
      return { view: 'device', id: decodeURIComponent(m[1]) };
    } catch {
      return { view: 'fleet' };
    }
  }
  return { view: 'fleet' };
}

function route() {
  if (!state.session) return;
  const r = parseHash();
  if (r.view === 'device') openDevice(r.id);
  else showFleet();
}

function showFleet() {
  if (state.deviceID) closeDevice();
  document.title = 'Fleet — Tether';
  showScreen('fleet');
  fleetView.render(state.devices);
}

// ---- fleet ------------------------------------------------------------------------------------

async function pollFleet(session) {
  clearTimeout(state.fleetTimer);
  if (state.session !== session) return;
  try {
    const devices = await api.listDevices(state.key);
    if (state.session !== session) return;
    onDevices(devices);
    fleetView.setError(null);
    fleetView.setMeta(`refreshes every ${FLEET_REFRESH_MS / 1000} s · updated ${clockTime().slice(0, 8)}`);
  } catch (e) {
    if (state.session !== session) return;
    if (e.isAuth) {
      logout(`Your session ended: ${e.message}`);
      return;
    }
    fleetView.setError(`Could not refresh the device list: ${e.message}`);
  }
  if (state.session === session) state.fleetTimer = setTimeout(() => pollFleet(session), FLEET_REFRESH_MS);
}

function onDevices(devices) {
  state.devices = devices;
  state.devicesById = new Map(devices.map((d) => [d.id, d]));
  fleetView.render(devices);
  if (state.deviceID) {
    const d = state.devicesById.get(state.deviceID);
    if (d) {
      setDeviceOnline(d.online, 'device list');
      deviceView.renderHeader(d, state.sub);
    }
  }
}

// ---- device view ------------------------------------------------------------------------------

function openDevice(id) {
  showScreen('device');
  if (state.deviceID === id) return;
  if (state.deviceID) closeDevice();

  state.deviceID = id;
  state.tel = new DeviceTelemetry(id);
  state.deviceOnline = null;
  state.sub = { state: state.live && state.live.connected ? 'pending' : 'waiting' };
  deviceView.reset(id);
  videoLink.attach(id);
  const d = state.devicesById.get(id);
  deviceView.renderHeader(d ?? { name: id }, state.sub);
  if (d) setDeviceOnline(d.online, null);
  logEvent('system', 'subscribe', `opening ${d ? `${d.name} (${id})` : id}`);
  state.live.subscribe(id);
  if (!state.live.connected) logEvent('system', 'subscribe', 'will subscribe once connected to the relay');
}

function closeDevice() {
  // Leaving the view ends its video: `bye` to the device, peer closed.
  videoLink.stop('closed');
  if (state.live && state.deviceID) state.live.unsubscribe(state.deviceID);
  state.deviceID = null;
  state.tel = null;
  state.sub = null;
  state.deviceOnline = null;
}

/** Records the open device's presence; logs changes (the relay has no presence events yet). */
function setDeviceOnline(online, source) {
  if (typeof online !== 'boolean') return;
  const prev = state.deviceOnline;
  state.deviceOnline = online;
  deviceView.renderBadge(online, !(state.live && state.live.connected));
  if (source && prev !== null && prev !== online) {
    logEvent(online ? 'system' : 'warn', online ? 'online' : 'offline', `device is ${online ? 'online' : 'offline'} (${source})`);
  }
}

function logEvent(kind, tag, text, replay = false) {
  if (state.deviceID) deviceView.log({ kind, tag, text, replay });
}

let renderQueued = false;

/** Coalesces renders to one per animation frame however many frames arrive. */
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    guarded(() => {
      if (state.tel) deviceView.renderTelemetry(state.tel);
    });
  });
}

// ---- live connection events -------------------------------------------------------------------

function onConnStatus(status) {
  const prev = state.conn.state;
  state.conn = status;
  renderConn(status);
  if (state.deviceID) deviceView.renderBadge(state.deviceOnline, status.state !== 'connected');
  if (status.state !== 'connected' && state.sub) {
    state.sub.state = 'waiting';
    deviceView.renderHeader(null, state.sub);
  }
  if (status.state !== 'connected') videoLink.relayDown();
  if (prev === 'connected' && status.state !== 'connected' && status.state !== 'stopped') {
    logEvent('warn', 'link', `connection to the relay lost${status.reason ? ` (${status.reason})` : ''}`);
  }
  if (status.state === 'replaced') {
    logEvent('error', 'link', 'this key connected from another console; press "Reconnect now" to take over again');
    toast('warn', 'Connection paused.', 'This key was connected from another console.');
  }
}

function onAuthOk(payload) {
  logEvent('system', 'link', `connected to the relay as ${payload.clientID ?? '?'} (${payload.role ?? '?'}, org ${payload.org ?? '?'})`);
  if (state.sub) {
    state.sub.state = 'pending';
    deviceView.renderHeader(null, state.sub);
  }
  videoLink.relayUp();
}

function onBadFrame({ error, sample }) {
  console.warn('Ignored a malformed frame from the relay:', error, sample);
  logEvent('error', 'bad frame', `ignored a malformed frame: ${error}`);
}

function onMessage(msg) {
  const p = msg.payload;
  // Video signaling, and the relay's (or an old agent's) answers to video offers.
  if (videoLink.handle(msg)) return;
  switch (msg.type) {
    case 'telemetry':
      onTelemetry(msg);
      break;
    case 'subscribed':
      if (p.deviceID !== state.deviceID || !state.tel) break;
      state.sub = { state: 'subscribed' };
      state.tel.startReplay(p.replayed);
      if (typeof p.online === 'boolean') setDeviceOnline(p.online, 'relay');
      deviceView.renderHeader(state.devicesById.get(state.deviceID), state.sub);
      logEvent('system', 'subscribed', `device ${p.online === true ? 'online' : p.online === false ? 'offline' : 'presence unknown'}; ` +
        `${Number(p.replayed) || 0} buffered frame${Number(p.replayed) === 1 ? '' : 's'} follow`);
      maybeLogReplaySummary(false);
      scheduleRender();
      break;
    case 'unsubscribed':
      // We only unsubscribe when leaving the view, so for the open device this is the relay's doing.
      if (p.deviceID === state.deviceID && state.sub && state.sub.state === 'subscribed') {
        state.sub = { state: 'failed' };
        deviceView.renderHeader(null, state.sub);
        logEvent('warn', 'unsubscribed', 'the relay ended this subscription');
      }
      break;
    case 'error': {
      const code = typeof p.code === 'string' ? p.code : 'error';
      const message = typeof p.message === 'string' ? p.message : 'The relay reported an error.';
      const extra = typeof p.retryAfterMs === 'number' ? ` (retry after ${Math.ceil(p.retryAfterMs / 1000)} s)` : '';
      toast('error', `${code}:`, message + extra);
      logEvent('error', code, `${message}${extra}${msg.correlationID ? ` [${msg.correlationID}]` : ''}`);
      if (msg.subscribeFor && msg.subscribeFor === state.deviceID && state.sub) {
        state.sub = { state: 'failed' };
        deviceView.renderHeader(null, state.sub);
      }
      break;
    }
    case 'telemetry_dropped': {
      const count = Number(p.count) || 0;
      const total = Number(p.total) || 0;
      state.dropped = { count, total, at: Date.now() };
      renderDropped(state.dropped);
      toast('warn', 'Telemetry dropped:', `${count} frame${count === 1 ? '' : 's'} (${total} in total on this connection).`);
      logEvent('warn', 'dropped', `relay dropped ${count} frame${count === 1 ? '' : 's'} for this console (${total} total)`);
      break;
    }
    case 'auth_ok':
    case 'ping':
    case 'pong':
      break; // handled by LiveClient
    default:
      // Newer relays may send types this console does not know yet: mention each once.
      if (!state.ignoredTypes.has(msg.type)) {
        state.ignoredTypes.add(msg.type);
        logEvent('system', 'ignored', `message type "${msg.type}" is not handled by this console`);
      }
  }
}

function onTelemetry(msg) {
  const tel = state.tel;
  // Frames from another device (e.g. a late one after switching views) are not for this view.
  if (!tel || (msg.from !== undefined && msg.from !== state.deviceID)) return;
  const p = msg.payload;
  if (!p || typeof p !== 'object' || Array.isArray(p) || !p.relay || typeof p.relay !== 'object') {
    onBadFrame({ error: 'telemetry without a payload or relay annotation', sample: '' });
    return;
  }
  const info = tel.ingest(msg.payload);
  if (info.replay) {
    if (info.verdict !== 'ok') logEvent(info.verdict, info.verdict, describeFrame(info), true);
    maybeLogReplaySummary(false);
  } else {
    // The first live frame ends the replay, even if fewer buffered frames came than announced.
    maybeLogReplaySummary(true);
    if (info.verdict !== 'ok') logEvent(info.verdict, info.verdict, describeFrame(info));
  }
  scheduleRender();
}

function maybeLogReplaySummary(force) {
  const r = state.tel && state.tel.takeReplaySummary(force);
  if (!r) return;
  if (r.expected === 0 && r.received === 0) return;
  const range = r.firstSeq != null ? ` (#${r.firstSeq}–#${r.lastSeq})` : '';
  const short = r.received < r.expected ? `, ${r.expected - r.received} fewer than announced` : '';
  const nonOk = r.nonOk ? `, ${r.nonOk} with non-ok verdicts` : '';
  logEvent('system', 'buffered', `${r.received} buffered frame${r.received === 1 ? '' : 's'} received${range}${short}${nonOk}`, true);
}

// ---- wiring -----------------------------------------------------------------------------------

/** Runs a handler; a bug or odd frame is logged and shown, never allowed to kill the page. */
let lastCrashToast = 0;
function guarded(fn) {
  try {
    fn();
  } catch (e) {
    console.error(e);
    if (Date.now() - lastCrashToast > 5000) {
      lastCrashToast = Date.now();
      toast('error', 'Console error:', e && e.message ? e.message : String(e));
    }
  }
}

function wireUi() {
  $('login-form').addEventListener('submit', onLoginSubmit);
  $('login-show').addEventListener('change', (e) => {
    $('login-key').type = e.target.checked ? 'text' : 'password';
  });
  $('logout').addEventListener('click', () => logout());
  $('back-to-fleet').addEventListener('click', () => {
    location.hash = '#/';
  });
  $('reconnect-now').addEventListener('click', () => state.live && state.live.reconnectNow());
  $('dropped-dismiss').addEventListener('click', () => {
    state.dropped = null;
    renderDropped(null);
  });
  window.addEventListener('hashchange', () => guarded(route));
  document.addEventListener('keydown', (e) => {
    const typing = e.target instanceof HTMLElement && /^(INPUT|TEXTAREA|SELECT)$/.test(e.target.tagName);
    if (e.key === 'Escape' && state.deviceID && !typing) location.hash = '#/';
  });

  // The countdown in the banner, and time-based figures ("0.4 s ago", rate), need ticking.
  setInterval(() => guarded(() => {
    if (state.session && state.conn.retryAt != null) renderConn(state.conn);
  }), 250);
  setInterval(() => {
    if (state.tel) scheduleRender();
  }, 1000);
}

boot().catch((e) => {
  console.error(e);
  showLogin(`The console failed to start: ${e && e.message ? e.message : e}`);
});
