// Tether pilot console: entry point. Owns the application state and wires the API, the live
// connection, the views and the panels together. Routing is by location.hash (#/ = fleet,
// #/device/<id> = one device, #/admin[/<tab>] = administration) so that reload and the
// browser's back button work.
//
// Panels (js/track.js, js/control.js, js/commands.js) follow one contract: the app creates
// each once with (rootElement, ctx) and calls open(device) / update(device) / close() as the
// device view opens, refreshes and closes, offers every relay message to onMessage(msg) (true =
// consumed), every telemetry payload of the open device to onTelemetry(payload), and tells them
// relayUp() / relayDown(). `ctx` (below) is how they reach the relay and each other:
// send/request (correlated requests, js/requests.js), api (HTTP), log (the log console), toast,
// events ('lease' from the control panel, 'stale' from the video panel), holdsLease(),
// videoStale(), consoleConfig (GET /api/console).

import * as api from './js/api.js';
import { LiveClient } from './js/live.js';
import { DeviceTelemetry } from './js/telemetry.js';
import { RequestTracker } from './js/requests.js';
import { clockTime, formatBitrate, formatMs, formatPercent, formatRate, fullDate, relativeTime } from './js/format.js';
import { VideoLink, VideoPanel } from './js/video.js';
import { FleetView, PendingList } from './js/fleet.js';
import { LogConsole, levelOfKind, levelOfLine } from './js/logs.js';
import { Plots } from './js/plots.js';
import { TrackPanel } from './js/track.js';
import { ControlPanel } from './js/control.js';
import { CommandsPanel } from './js/commands.js';
import { AdminScreen } from './js/admin.js';
import {
  $, DeviceView, describeFrame, h, renderConn, renderDropped, renderRtt, renderUser,
  setLoginBusy, showLoginError, showScreen, toast,
} from './js/views.js';

const KEY_STORAGE = 'tether.operatorKey';
const EXPIRY_STORAGE = 'tether.sessionExpiresAt';
const LOGIN_TAB_STORAGE = 'tether.loginTab';
const STALE_STORAGE = 'tether.staleVideoMs';
/** Set while a password session (its cookie) may exist. */
const COOKIE_MARKER = 'tether.cookieSession';
const FLEET_REFRESH_MS = 5000;
/** Warn this long before a password session ends. */
const EXPIRY_WARNING_MS = 5 * 60 * 1000;
/** Only a hint for the login error message; the relay is the judge of what a key is. */
const KEY_FORMAT = /^tk_[^_\s]+_\S+$/;

// Web storage can throw (storage disabled, some private modes): the console still works, it
// just does not remember across reloads.
function stored(area, key) {
  try {
    return (area === 'local' ? localStorage : sessionStorage).getItem(key);
  } catch {
    return null;
  }
}
function store(area, key, value) {
  try {
    const s = area === 'local' ? localStorage : sessionStorage;
    if (value === null) s.removeItem(key);
    else s.setItem(key, value);
  } catch {
    /* not persisted */
  }
}

const state = {
  session: null, // a fresh object per login: async work from an old login compares and bails out
  // How this console authenticates: an API key (kept in sessionStorage) or the relay's
  // HttpOnly session cookie after a password login (key null).
  key: null,
  me: null,
  expiresAt: null, // password sessions: when the relay ends it (ms epoch), if known
  consoleConfig: { mapTiles: null, mapAttribution: null, staleVideoMs: 2000, sessionTtlSecs: 43200 },
  live: null,
  relayUp: false,
  conn: { state: 'stopped', retryAt: null, failures: 0 },
  devices: [],
  devicesById: new Map(),
  pending: [],
  fleetTimer: 0,
  expiryTimer: 0,
  // The open device, if any.
  deviceID: null,
  tel: null,
  sub: null, // {state: waiting | pending | subscribed | failed}
  deviceOnline: null,
  dropped: null,
  ignoredTypes: new Set(),
};

const requests = new RequestTracker((msg) => !!state.live && state.live.send(msg));
const events = new EventTarget();

/** What panels get (see the contract at the top). */
const ctx = {
  h,
  get me() {
    return state.me;
  },
  get deviceID() {
    return state.deviceID;
  },
  get consoleConfig() {
    return state.consoleConfig;
  },
  events,
  device: () => (state.deviceID ? state.devicesById.get(state.deviceID) ?? { id: state.deviceID, name: state.deviceID, online: state.deviceOnline === true, access: 'view', lease: null, alerts: [] } : null),
  connected: () => !!state.live && state.live.connected,
  send: (msg) => !!state.live && state.live.send(msg),
  request: (type, payload, opts) => requests.request(type, payload, opts),
  api: (path, opts = {}) => guardAuth(api.request(path, { ...opts, key: state.key })),
  toast,
  log: (level, tag, text) => logLine({ level, source: 'system', tag, text }),
  emit: (type, detail) => events.dispatchEvent(new CustomEvent(type, { detail })),
  holdsLease: () => false, // replaced by the control panel
  videoStale: () => videoPanel.stale,
};

const fleetView = new FleetView((id) => {
  location.hash = `#/device/${encodeURIComponent(id)}`;
});
const pendingList = new PendingList({
  approve: (id, opts) => guardAuth(api.approveRegistration(state.key, id, opts)).finally(() => refreshPending(state.session)),
  reject: (id) => guardAuth(api.rejectRegistration(state.key, id)).finally(() => refreshPending(state.session)),
});
const deviceView = new DeviceView();
const logs = new LogConsole();
const plots = new Plots();
// Video rides on the live connection: it sends through it and hears about its ups and downs.
const videoLink = new VideoLink({
  send: (msg) => !!state.live && state.live.send(msg),
  relayUp: () => !!state.live && state.live.connected,
  relaySession: () => (state.live ? state.live.session : null),
  log: (kind, text) => logEvent(kind, 'video', text),
});
// The panel renders the link into #video-panel; it lives as long as the page.
const videoPanel = new VideoPanel(videoLink, { formatBitrate, formatMs, formatPercent, formatRate }, {
  onStale: (stale, ageMs) => {
    if (state.deviceID) {
      if (stale) logLine({ level: 'warn', source: 'system', tag: 'video', text: `STALE: no new frame for ${(ageMs / 1000).toFixed(1)} s; teleop disabled` });
      else logLine({ level: 'info', source: 'system', tag: 'video', text: 'video is live again' });
    }
    ctx.emit('stale', { stale, ageMs });
  },
});
const panels = [
  new ControlPanel($('control-panel'), ctx),
  new TrackPanel($('track-panel'), ctx),
  new CommandsPanel($('commands-panel'), ctx),
];
const admin = new AdminScreen($('admin-screen'), ctx);

/** Runs a call on every panel; one panel's bug must not take the others down. */
function eachPanel(fn) {
  for (const p of panels) guarded(() => fn(p));
}

/** An API promise whose 401 ends the session (the key was revoked, the session expired). */
function guardAuth(promise) {
  const session = state.session;
  return promise.catch((e) => {
    if (e && e.isAuth && state.session === session && session) logout(`Your session ended: ${e.message}`);
    throw e;
  });
}

// ---- login / logout ---------------------------------------------------------------------------

async function boot() {
  wireUi();
  setLoginTab(stored('local', LOGIN_TAB_STORAGE) === 'key' ? 'key' : 'password');
  const key = stored('session', KEY_STORAGE);
  // Without a stored key, a session cookie from a password login may exist (it is HttpOnly,
  // so only a marker says whether to ask).
  if (!key && stored('local', COOKIE_MARKER) !== '1') {
    showLogin();
    return;
  }
  try {
    const me = await api.getMe(key ?? undefined);
    const expiresAt = key ? null : Number(stored('session', EXPIRY_STORAGE)) || null;
    await enterConsole(key, me, expiresAt);
  } catch (e) {
    if (e.isAuth) {
      store('session', KEY_STORAGE, null);
      store('session', EXPIRY_STORAGE, null);
      store('local', COOKIE_MARKER, null);
      showLogin(key ? `Your session ended: ${e.message}` : 'Your session has ended. Log in again.');
    } else {
      // Keep the key: the relay may just be restarting. "Log in" retries with it.
      if (key) {
        $('login-key').value = key;
        setLoginTab('key');
      }
      showLogin(e.message);
    }
  }
}

function setLoginTab(tab) {
  const key = tab === 'key';
  $('login-form').hidden = !key;
  $('login-password-form').hidden = key;
  $('login-tab-key').setAttribute('aria-selected', String(key));
  $('login-tab-password').setAttribute('aria-selected', String(!key));
  store('local', LOGIN_TAB_STORAGE, tab);
}

function showLogin(error = null) {
  showScreen('login');
  showLoginError(error);
  document.title = 'Tether — pilot console';
  const first = $('login-form').hidden ? $('login-username') : $('login-key');
  first.focus();
}

async function onKeyLogin(ev) {
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
    store('session', KEY_STORAGE, key);
    setLoginBusy(false);
    await enterConsole(key, me, null);
  } catch (e) {
    let message = e.message;
    if (e.isAuth && !KEY_FORMAT.test(key)) message += ' (Operator keys look like tk_<id>_<secret>.)';
    showLoginError(message);
    setLoginBusy(false);
    $('login-key').focus();
    $('login-key').select();
  }
}

async function onPasswordLogin(ev) {
  ev.preventDefault();
  const username = $('login-username').value.trim();
  const password = $('login-password').value;
  if (!username || !password) {
    showLoginError('Enter your username and password.');
    return;
  }
  setLoginBusy(true);
  showLoginError(null);
  try {
    const me = await api.login(username, password);
    const expiresAt = typeof me.expiresIn === 'number' ? Date.now() + me.expiresIn * 1000 : null;
    store('session', KEY_STORAGE, null);
    store('session', EXPIRY_STORAGE, expiresAt === null ? null : String(expiresAt));
    store('local', COOKIE_MARKER, '1');
    $('login-password').value = '';
    setLoginBusy(false);
    await enterConsole(null, me, expiresAt);
  } catch (e) {
    showLoginError(e.status === 401 ? 'Wrong username or password.' : e.message);
    setLoginBusy(false);
    $('login-password').focus();
    $('login-password').select();
  }
}

async function enterConsole(key, me, expiresAt) {
  const session = {};
  state.session = session;
  state.key = key;
  state.me = me && typeof me === 'object' ? me : {};
  state.expiresAt = expiresAt;
  $('login-key').value = '';
  renderUser(state.me);
  const isAdmin = state.me.role === 'admin';
  $('nav-admin').hidden = !isAdmin;
  pendingList.setEnabled(isAdmin);
  renderExpiry();

  // The relay's console settings; an unreachable relay here is not fatal (defaults apply).
  try {
    const cfg = await api.getConsoleConfig(key ?? undefined);
    if (state.session !== session) return;
    state.consoleConfig = cfg;
  } catch (e) {
    if (e.isAuth) {
      logout(`Your session ended: ${e.message}`);
      return;
    }
  }
  applyStaleSetting();

  const live = new LiveClient({
    getTicket: () => api.getWsTicket(key ?? undefined),
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

/** Ends the session here and, for a password session, at the relay. */
function logout(message = null) {
  if (!state.session) return;
  const key = state.key;
  if (!message) api.logout(key ?? undefined).catch(() => {}); // best effort: the relay may be down
  if (state.deviceID) closeDevice();
  admin.hide();
  if (state.live) state.live.stop();
  requests.cancelAll();
  clearTimeout(state.fleetTimer);
  clearTimeout(state.expiryTimer);
  Object.assign(state, {
    session: null, key: null, me: null, live: null, relayUp: false, devices: [], devicesById: new Map(), pending: [],
    dropped: null, expiresAt: null, conn: { state: 'stopped', retryAt: null, failures: 0 },
  });
  state.ignoredTypes.clear();
  store('session', KEY_STORAGE, null);
  store('session', EXPIRY_STORAGE, null);
  store('local', COOKIE_MARKER, null);
  renderUser(null);
  renderDropped(null);
  fleetView.render([]);
  fleetView.setError(null);
  pendingList.setEnabled(false);
  $('nav-admin').hidden = true;
  // Drop the device from the address bar: the next login starts at the fleet.
  history.replaceState(null, '', location.pathname + location.search);
  $('login-key').value = '';
  showLogin(message);
}

/** "session ends 23:04" for password sessions; warns before, and logs out at the end. */
function renderExpiry() {
  const el = $('session-expiry');
  clearTimeout(state.expiryTimer);
  if (!state.session || state.expiresAt === null) {
    el.hidden = true;
    return;
  }
  const left = state.expiresAt - Date.now();
  el.hidden = false;
  el.textContent = left > 0 ? `session ends ${clockTime(state.expiresAt).slice(0, 5)}` : 'session ended';
  el.title = `This login session ends ${fullDate(state.expiresAt)}; log in again then.`;
  el.dataset.level = left < EXPIRY_WARNING_MS ? 'warn' : '';
  if (left <= 0) {
    logout('Your session expired. Log in again.');
    return;
  }
  if (left < EXPIRY_WARNING_MS && !el.dataset.warned) {
    el.dataset.warned = '1';
    toast('warn', 'Session ending:', `your login session ends at ${clockTime(state.expiresAt).slice(0, 8)}.`);
  }
  state.expiryTimer = setTimeout(renderExpiry, Math.min(60000, Math.max(1000, left < EXPIRY_WARNING_MS ? left : left - EXPIRY_WARNING_MS)));
}

function applyStaleSetting() {
  const own = Number(stored('local', STALE_STORAGE));
  const ms = own >= 200 && own <= 60000 ? own : state.consoleConfig.staleVideoMs;
  videoPanel.setStaleMs(ms);
  $('video-stale-s').value = String(ms / 1000);
  $('video-stale-s').title = `The relay's default is ${state.consoleConfig.staleVideoMs / 1000} s`;
}

// ---- routing ----------------------------------------------------------------------------------

function parseHash() {
  let m = /^#\/device\/(.+)$/.exec(location.hash);
  if (m) {
    try {
      return { view: 'device', id: decodeURIComponent(m[1]) };
    } catch {
      return { view: 'fleet' };
    }
  }
  m = /^#\/admin(?:\/([a-z]+))?$/.exec(location.hash);
  if (m) return { view: 'admin', tab: m[1] ?? null };
  return { view: 'fleet' };
}

function route() {
  if (!state.session) return;
  const r = parseHash();
  if (r.view !== 'admin') admin.hide();
  if (r.view === 'device') openDevice(r.id);
  else if (r.view === 'admin') showAdmin(r.tab);
  else showFleet();
}

function showFleet() {
  if (state.deviceID) closeDevice();
  document.title = 'Fleet — Tether';
  showScreen('fleet');
  fleetView.render(state.devices);
}

function showAdmin(tab) {
  if (state.deviceID) closeDevice();
  document.title = 'Admin — Tether';
  showScreen('admin');
  guarded(() => admin.show(tab));
}

// ---- fleet ------------------------------------------------------------------------------------

async function pollFleet(session) {
  clearTimeout(state.fleetTimer);
  if (state.session !== session) return;
  try {
    const devices = await api.listDevices(state.key ?? undefined);
    if (state.session !== session) return;
    onDevices(devices);
    fleetView.setError(null);
    fleetView.setMeta(`${devices.length} device${devices.length === 1 ? '' : 's'} · ${devices.filter((d) => d.online).length} online · updated ${clockTime().slice(0, 8)}`);
  } catch (e) {
    if (state.session !== session) return;
    if (e.isAuth) {
      logout(`Your session ended: ${e.message}`);
      return;
    }
    fleetView.setError(`Could not refresh the device list: ${e.message}${e.isUnreachable ? ' Showing the last known state.' : ''}`);
  }
  refreshPending(session);
  if (state.session === session) state.fleetTimer = setTimeout(() => pollFleet(session), FLEET_REFRESH_MS);
}

async function refreshPending(session) {
  if (!session || state.session !== session || !state.me || state.me.role !== 'admin') return;
  try {
    const list = await api.pendingRegistrations(state.key ?? undefined);
    if (state.session !== session) return;
    state.pending = list;
    pendingList.render(list);
  } catch {
    // The device list shows the relay's trouble already.
  }
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
      eachPanel((p) => p.update(d));
    }
    renderUnreachable();
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
  logs.clear();
  plots.reset();
  videoLink.attach(id);
  const d = state.devicesById.get(id);
  deviceView.renderHeader(d ?? { name: id }, state.sub);
  if (d) setDeviceOnline(d.online, null);
  logEvent('system', 'subscribe', `opening ${d ? `${d.name} (${id})` : id}`);
  eachPanel((p) => p.open(ctx.device()));
  state.live.subscribe(id);
  if (!state.live.connected) logEvent('system', 'subscribe', 'will subscribe once connected to the relay');
  renderUnreachable();
}

function closeDevice() {
  // Leaving the view ends its video: `bye` to the device, peer closed.
  videoLink.stop('closed');
  eachPanel((p) => p.close());
  if (state.live && state.deviceID) state.live.unsubscribe(state.deviceID);
  state.deviceID = null;
  state.tel = null;
  state.sub = null;
  state.deviceOnline = null;
}

function selectTab(name) {
  for (const b of document.querySelectorAll('.tabs .tab')) {
    const on = b.dataset.tab === name;
    b.setAttribute('aria-selected', String(on));
    $(`tab-${b.dataset.tab}`).hidden = !on;
  }
  logs.setVisible(name === 'logs');
}

/** Records the open device's presence and logs changes. */
function setDeviceOnline(online, source) {
  if (typeof online !== 'boolean') return;
  const prev = state.deviceOnline;
  state.deviceOnline = online;
  deviceView.renderBadge(online, !(state.live && state.live.connected));
  if (online) videoLink.deviceOnline();
  if (source && prev !== null && prev !== online) {
    logEvent(online ? 'system' : 'warn', online ? 'online' : 'offline', `device is ${online ? 'online' : 'offline'} (${source})`);
  }
  renderUnreachable();
}

/** Says plainly when the relay or the device cannot be reached. */
function renderUnreachable() {
  const el = $('device-unreachable');
  if (!state.deviceID) {
    el.hidden = true;
    return;
  }
  let text = '';
  let why = '';
  if (!(state.live && state.live.connected)) {
    why = 'relay';
    text = 'The relay cannot be reached: what you see is the last known state. The console reconnects by itself and resumes telemetry and video.';
  } else if (state.deviceOnline === false) {
    const d = state.devicesById.get(state.deviceID);
    why = 'device';
    const seen = d && d.lastSeen ? ` (last seen ${relativeTime(d.lastSeen)})` : '';
    text = `The device is offline${seen}. Requests you send are queued by the relay where the protocol allows it; video and teleop resume when it is back.`;
  }
  el.hidden = !text;
  el.dataset.why = why;
  if (el.textContent !== text) el.textContent = text;
}

/** A line in the log console from the console's own events (kinds as in views.js). */
function logEvent(kind, tag, text, replay = false) {
  if (state.deviceID) logs.add({ level: levelOfKind(kind), source: 'system', tag, text, replay });
}

function logLine(line) {
  if (state.deviceID) logs.add(line);
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
      for (const tr of document.querySelectorAll('#telemetry-body tr')) {
        tr.classList.toggle('plotted', plots.has(tr.dataset.key));
      }
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
  if (status.state !== 'connected') {
    videoLink.relayDown();
    if (state.relayUp) {
      state.relayUp = false;
      eachPanel((p) => p.relayDown());
    }
  }
  if (prev === 'connected' && status.state !== 'connected' && status.state !== 'stopped') {
    logEvent('warn', 'link', `connection to the relay lost${status.reason ? ` (${status.reason})` : ''}`);
  }
  if (status.state === 'replaced') {
    logEvent('error', 'link', 'this operator connected from another console; press "Reconnect now" to take over again');
    toast('warn', 'Connection paused.', 'This operator was connected from another console.');
  }
  renderUnreachable();
}

function onAuthOk(payload) {
  logEvent('system', 'link', `connected to the relay as ${payload.clientID ?? '?'} (${payload.role ?? '?'}, org ${payload.org ?? '?'})`);
  if (state.sub) {
    state.sub.state = 'pending';
    deviceView.renderHeader(null, state.sub);
  }
  videoLink.relayUp();
  state.relayUp = true;
  eachPanel((p) => p.relayUp());
  renderUnreachable();
  // Things may have changed while we were away.
  if (state.session) pollFleet(state.session);
}

function onBadFrame({ error, sample }) {
  console.warn('Ignored a malformed frame from the relay:', error, sample);
  logEvent('error', 'bad frame', `ignored a malformed frame: ${error}`);
}

function onMessage(msg) {
  const p = msg.payload;
  if (requests.handle(msg)) return;
  // Video signaling, and the relay's (or an old agent's) answers to video offers.
  if (videoLink.handle(msg)) return;
  if (state.deviceID) {
    for (const panel of panels) {
      let used = false;
      guarded(() => {
        used = panel.onMessage(msg) === true;
      });
      if (used) return;
    }
  }
  if (!state.deviceID || msg.type === 'registration_requested' || msg.type === 'registration_decided') {
    let used = false;
    guarded(() => {
      used = admin.onMessage(msg) === true;
    });
    if (used) return;
  }
  switch (msg.type) {
    case 'telemetry':
      onTelemetry(msg);
      break;
    case 'log':
      if (msg.from === state.deviceID && p && typeof p.line === 'string') {
        logs.add({
          level: levelOfLine(p.line, p.stream),
          source: 'device',
          tag: `${p.process ?? '?'}${p.stream === 'stderr' ? ' (stderr)' : ''}`,
          text: p.line,
          at: typeof p.timestamp === 'number' ? p.timestamp : Date.now(),
        });
      }
      break;
    case 'presence':
      if (p && typeof p.deviceID === 'string') {
        const d = state.devicesById.get(p.deviceID);
        if (d) {
          d.online = p.status === 'online';
          if (typeof p.lastSeen === 'number') d.lastSeen = p.lastSeen;
          fleetView.render(state.devices);
        }
        if (p.deviceID === state.deviceID) {
          setDeviceOnline(p.status === 'online', 'relay');
          if (d) eachPanel((panel) => panel.update(d));
        }
      }
      break;
    case 'registration_requested':
    case 'registration_decided':
      refreshPending(state.session);
      if (msg.type === 'registration_requested' && p) toast('info', 'Device waiting for approval:', `${p.name ?? '?'}${p.remoteAddr ? ` from ${p.remoteAddr}` : ''}.`);
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
    case 'command_result':
    case 'command_output':
    case 'command_progress':
    case 'speed_test_result':
    case 'ack':
      // Answers to requests this console no longer waits for (timed out, or sent before a reload).
      logEvent('system', 'late answer', `${msg.type}${msg.correlationID ? ` [${msg.correlationID}]` : ''} arrived after its request was given up`);
      break;
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
  const info = tel.ingest(p);
  plots.ingest(p);
  eachPanel((panel) => panel.onTelemetry(p));
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
  $('login-form').addEventListener('submit', onKeyLogin);
  $('login-password-form').addEventListener('submit', onPasswordLogin);
  $('login-tab-key').addEventListener('click', () => {
    setLoginTab('key');
    showLoginError(null);
    $('login-key').focus();
  });
  $('login-tab-password').addEventListener('click', () => {
    setLoginTab('password');
    showLoginError(null);
    $('login-username').focus();
  });
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
  for (const b of document.querySelectorAll('.tabs .tab')) b.addEventListener('click', () => selectTab(b.dataset.tab));
  $('telemetry-body').addEventListener('click', (e) => {
    const tr = e.target instanceof Element ? e.target.closest('tr[data-key]') : null;
    if (tr) {
      plots.toggle(tr.dataset.key);
      scheduleRender();
    }
  });
  $('video-stale-s').addEventListener('change', (e) => {
    const s = Number(e.target.value);
    if (!(s >= 0.2 && s <= 60)) {
      e.target.value = String(videoPanel.staleMs / 1000);
      toast('warn', 'STALE time:', 'choose between 0.2 and 60 seconds.');
      return;
    }
    store('local', STALE_STORAGE, String(Math.round(s * 1000)));
    videoPanel.setStaleMs(Math.round(s * 1000));
  });
  $('video-overlay-toggle').addEventListener('change', (e) => {
    $('video-stats').classList.toggle('video-overlay', e.target.checked);
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
    if (state.deviceID) plots.draw();
  }, 1000);
  selectTab('telemetry');
}

boot().catch((e) => {
  console.error(e);
  showLogin(`The console failed to start: ${e && e.message ? e.message : e}`);
});
