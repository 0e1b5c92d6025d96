// Track panel: the device's GPS track, heading and target drawn on a canvas map, and a waypoint
// editor that sends `set_waypoints` (an `app_command`, docs/protocol.md 4.20) to the device.
//
// The map is north-up. World coordinates are metres with y pointing north:
// - without a tile server, a local equirectangular projection around an origin near the data
//   (set whenever the view is fitted), over a metre grid;
// - with `ctx.consoleConfig.mapTiles` (a slippy-tile URL template with {z}/{x}/{y}), Web
//   Mercator metres (EPSG:3857) for everything, so the tiles line up.
// The view is a centre in world coordinates and a scale in CSS pixels per world unit; drawing
// happens in one requestAnimationFrame callback, only after something changed.

import { describeFailure, resultError } from './requests.js';

const R = 6378137; // WGS 84 / Web Mercator sphere radius, metres
const D2R = Math.PI / 180;
const MERC_MAX_LAT = 85.05112878;
/** Positions kept for the trail. */
const TRAIL_MAX = 2000;
/** Waypoints in one plan (far more than a pilot clicks; keeps the message small). */
const WAYPOINTS_MAX = 200;
const TILE_CACHE_MAX = 300;
const TILE_MAX_ZOOM = 19;
/** Zoom limits, metres per CSS pixel. */
const MIN_MPP = 0.02;
const MAX_MPP = 50000;
/** Smallest span a fitted view shows, metres (a single fix is not a zoom-to-infinity). */
const MIN_FIT_SPAN_M = 120;
/** How close (CSS px) a pointer must be to pick a waypoint, and how far it moves to be a drag. */
const HIT_PX = 12;
const DRAG_PX = 4;
/**
 * How long to wait for the relay's ack, and then for the device's answer, before saying that
 * none came: the relay's own deadline (COMMAND_TIMEOUT, 60 s by default) plus some slack. The
 * relay always answers within it unless the link or the relay dropped the request.
 */
const ANSWER_WATCHDOG_MS = 75000;
/** The request tracker's deadline: long, since a queued request waits (a day by default). */
const REQUEST_TIMEOUT_MS = 25 * 3600 * 1000;
/** Relay `error` codes that mean "refused"; any other failure (timeouts, expiry, link) is "failed". */
const REFUSAL_CODES = new Set(['not_controller', 'forbidden', 'unknown_target', 'invalid_payload',
  'queue_full', 'rate_limited', 'target_offline']);
/** States in which the waypoints on the map are the ones sent to the device. */
const SENT_STATES = new Set(['sending', 'delivered', 'queued', 'acknowledged']);
/** States in which an answer is awaited shortly; the plan cannot be edited meanwhile. */
const BUSY_STATES = new Set(['sending', 'delivered']);

const NO_WAYPOINTS = 'Add at least one waypoint to send.';

const COLORS = {
  bg: '#eef1f5',
  grid: '#d9dee6',
  trail: '#0b57d0',
  boat: '#0d1117',
  target: '#b0127a',
  draft: '#c25400',
  sent: '#0a6b2d',
  selected: '#0b57d0',
  text: '#0d1117',
  halo: 'rgba(255,255,255,0.85)',
};

// ---- pure helpers ------------------------------------------------------------------------------

const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
/** A longitude folded into -180..180. */
const wrapLon = (lon) => ((((lon + 180) % 360) + 360) % 360) - 180;
const round6 = (v) => Math.round(v * 1e6) / 1e6;

/**
 * The position in a telemetry payload's `data`, or null: `gps.latitude`/`gps.longitude` (also
 * `latitude`/`longitude` or `lat`/`lon` at the top level or in `gps`), heading in degrees
 * clockwise from north (`gps.heading` or `heading`), speed in m/s. Out-of-range values and the
 * 0,0 that receivers report without a fix are not positions.
 * @param {any} data
 * @returns {{lat: number, lon: number, heading: number|null, speed: number|null}|null}
 */
export function readFix(data) {
  if (!data || typeof data !== 'object') return null;
  const gps = data.gps && typeof data.gps === 'object' ? data.gps : {};
  const first = (...vals) => vals.find(isNum);
  const lat = first(gps.latitude, gps.lat, data.latitude, data.lat);
  const lon = first(gps.longitude, gps.lon, gps.lng, data.longitude, data.lon, data.lng);
  if (lat === undefined || lon === undefined) return null;
  if (lat < -90 || lat > 90 || lon < -180 || lon > 180 || (lat === 0 && lon === 0)) return null;
  const heading = first(gps.heading, data.heading);
  const speed = first(gps.speed, data.speed);
  return {
    lat,
    lon,
    heading: heading === undefined ? null : ((heading % 360) + 360) % 360,
    speed: speed === undefined ? null : speed,
  };
}

/**
 * The target in `data.target` ({latitude, longitude, distance}): the target, null when the
 * device says it has none, undefined when the payload does not say.
 */
export function readTarget(data) {
  if (!data || typeof data !== 'object' || !('target' in data)) return undefined;
  const t = data.target;
  if (!t || typeof t !== 'object') return null;
  const lat = isNum(t.latitude) ? t.latitude : t.lat;
  const lon = isNum(t.longitude) ? t.longitude : t.lon;
  if (!isNum(lat) || !isNum(lon) || Math.abs(lat) > 90 || Math.abs(lon) > 180) return null;
  return { lat, lon, distance: isNum(t.distance) ? t.distance : null };
}

/** Parses one coordinate typed by the pilot: {value} or {error}. */
export function parseCoord(text, kind) {
  const max = kind === 'lat' ? 90 : 180;
  const name = kind === 'lat' ? 'Latitude' : 'Longitude';
  const s = String(text).trim();
  if (s === '') return { error: `${name} is missing` };
  if (!/^[+-]?(\d+\.?\d*|\.\d+)$/.test(s)) return { error: `${name} must be a number in degrees` };
  const v = Number(s);
  if (!Number.isFinite(v) || v < -max || v > max) return { error: `${name} must be between -${max} and ${max}` };
  return { value: v };
}

/** Web Mercator metres (EPSG:3857). */
const MERCATOR = {
  kind: 'mercator',
  fwd(lat, lon) {
    const phi = clamp(lat, -MERC_MAX_LAT, MERC_MAX_LAT) * D2R;
    return [R * lon * D2R, R * Math.log(Math.tan(Math.PI / 4 + phi / 2))];
  },
  inv(x, y) {
    return [(2 * Math.atan(Math.exp(y / R)) - Math.PI / 2) / D2R, wrapLon(x / R / D2R)];
  },
  /** True metres per world unit at a latitude. */
  metresPerUnit(lat) { return Math.cos(clamp(lat, -MERC_MAX_LAT, MERC_MAX_LAT) * D2R); },
};

/** Local equirectangular metres around (lat0, lon0). */
function localProjection(lat0, lon0) {
  const k = Math.max(0.01, Math.cos(lat0 * D2R));
  return {
    kind: 'local',
    lat0,
    lon0,
    fwd(lat, lon) { return [R * wrapLon(lon - lon0) * D2R * k, R * (lat - lat0) * D2R]; },
    inv(x, y) { return [clamp(lat0 + y / R / D2R, -90, 90), wrapLon(lon0 + x / (R * D2R * k))]; },
    metresPerUnit() { return 1; },
  };
}

/** 1, 2 or 5 times a power of ten, the largest not above `v`. */
function niceStep(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  const m = v / p;
  return (m >= 5 ? 5 : m >= 2 ? 2 : 1) * p;
}

const formatDistance = (m) => (m >= 1000 ? `${+(m / 1000).toFixed(m >= 10000 ? 0 : 1)} km` : `${+m.toFixed(m >= 10 ? 0 : 1)} m`);
const formatLatLon = (lat, lon) => `${lat.toFixed(6)}, ${lon.toFixed(6)}`;

/** A usable slippy-tile URL template, or null. */
function tileTemplate(cfg) {
  const t = cfg && typeof cfg.mapTiles === 'string' ? cfg.mapTiles.trim() : '';
  return t && t.includes('{z}') && t.includes('{x}') && t.includes('{y}') ? t : null;
}

// ---- the panel ---------------------------------------------------------------------------------

/**
 * The track map and waypoint editor of the device view (see the panel contract).
 *
 * Root data-* attributes: `data-fixes` (positions received), `data-waypoints` (waypoints in
 * the plan), `data-waypoint-state` (`editing|sending|delivered|queued|acknowledged|refused|failed`),
 * `data-editing`, `data-follow`, `data-projection` (`local|mercator`), `data-boat-lat`/`-lon`,
 * `data-heading` and `data-target-lat`/`-lon` (latest fix and target, absent when unknown),
 * `data-tiles-failed` (tile images that failed to load, with a tile server only).
 */
export class TrackPanel {
  /**
   * @param {HTMLElement} root  the empty panel section
   * @param {object} ctx        the console context (panel contract)
   */
  constructor(root, ctx) {
    this.root = root;
    this.ctx = ctx;
    this._open = false;
    this._gen = 0; // bumped by open/close: answers that belong to an earlier view are dropped
    this._sendSeq = 0;
    this._raf = 0;
    this._watchdog = 0;
    this._ro = null;
    this._w = 0;
    this._h = 0;
    this._dpr = 1;
    this._tiles = new Map(); // url -> {img, ok: true|false|null}
    this._tilesFailed = 0;
    this._build();
    this._reset();
    if (ctx.events) ctx.events.addEventListener('lease', (e) => this._onLease(e.detail || {}));
  }

  // ---- contract ----

  /** A device view opened. */
  open(device) {
    this._reset();
    this._open = true;
    this._gen++;
    this._device = device || null;
    this._lease = device && device.lease ? device.lease : null;
    this._template = undefined;
    this._applyConfig();
    if (this._ro) this._ro.disconnect(); // opened again without a close
    this._ro = new ResizeObserver(() => this._resize());
    this._ro.observe(this.el.stage);
    this._watchDpr();
    this._resize();
    this._renderAll();
  }

  /** The open device's record was refreshed. */
  update(device) {
    if (!this._open || !device) return;
    const wasOnline = this._device && this._device.online;
    this._device = device;
    this._applyConfig(); // GET /api/console may have answered after the view opened
    if (device.lease !== undefined && !this._leaseFromEvent) this._lease = device.lease;
    if (this._state === 'queued' && device.online && !wasOnline) this._armWatchdog(this._sendSeq);
    this._renderControls();
  }

  /** The view closed: stop drawing and timers, forget the track and the plan. */
  close() {
    this._open = false;
    this._gen++;
    if (this._ro) this._ro.disconnect();
    this._ro = null;
    if (this._dprQuery) this._dprQuery.removeEventListener('change', this._dprListener);
    this._dprQuery = null;
    this._reset();
    this._renderAll();
  }

  /** Takes the map settings from ctx.consoleConfig; a change of tile server re-projects the view. */
  _applyConfig() {
    const cfg = this.ctx.consoleConfig || {};
    const template = tileTemplate(cfg);
    const attribution = template && typeof cfg.mapAttribution === 'string' ? cfg.mapAttribution : '';
    if (this.el.attribution.textContent !== attribution) this.el.attribution.textContent = attribution;
    this.el.attribution.hidden = !attribution;
    if (template === this._template) return;
    // Keep what the pilot looks at: the same centre and metres per pixel in the new projection.
    const keep = this._view ? { centre: this._proj.inv(this._view.cx, this._view.cy), mpp: this._metresPerPixel() } : null;
    this._template = template;
    this._proj = template ? MERCATOR : keep ? localProjection(...keep.centre) : null; // else set by the first fit
    this.root.dataset.projection = template ? 'mercator' : 'local';
    if (template) this.root.dataset.tilesFailed = String(this._tilesFailed);
    else delete this.root.dataset.tilesFailed;
    if (keep) {
      const [cx, cy] = this._proj.fwd(...keep.centre);
      this._view = { cx, cy, s: this._proj.metresPerUnit(keep.centre[0]) / keep.mpp };
      this._clampScale();
      this._requestDraw();
    }
  }

  /** Nothing here is consumed: the panel only reads telemetry and its own requests' answers. */
  onMessage() {
    return false;
  }

  /** A telemetry payload of the open device (live or replayed). */
  onTelemetry(payload) {
    if (!this._open || !payload || typeof payload !== 'object') return;
    const data = payload.data;
    const relay = payload.relay && typeof payload.relay === 'object' ? payload.relay : {};
    const t = isNum(payload.timestamp) ? payload.timestamp : isNum(relay.receivedAt) ? relay.receivedAt : Date.now();
    let changed = false;
    const target = readTarget(data);
    if (target !== undefined && t >= this._targetT) {
      this._target = target;
      this._targetT = t;
      changed = true;
    }
    const fix = readFix(data);
    if (fix && this._addFix(fix, t, payload, relay)) changed = true;
    if (!changed) return;
    const hadView = !!this._view;
    if (!hadView || this._autoFit) this._fit();
    else if (this._follow) this._centreOnBoat();
    if (!hadView || this._fixes === 1) this._renderControls();
    this._renderReadout();
    this._requestDraw();
  }

  relayUp() {
    if (this._open) this._renderControls();
  }

  relayDown() {
    if (this._open) this._renderControls();
  }

  // ---- state ----

  _reset() {
    cancelAnimationFrame(this._raf);
    this._raf = 0;
    clearTimeout(this._watchdog);
    this._watchdog = 0;
    this._device = null;
    this._lease = null;
    this._leaseFromEvent = false;
    this._trail = []; // {lat, lon, t, heading, speed, key}, oldest first
    this._keys = new Set();
    this._fixes = 0;
    this._target = null;
    this._targetT = -Infinity;
    this._waypoints = []; // {lat, lon, latText, lonText, latError, lonError}
    this._selected = -1;
    this._editing = false;
    this._state = 'editing';
    this._status = { text: '', level: '' };
    this._view = null;
    this._autoFit = true;
    this._follow = false;
    this._gesture = null;
    this._cursor = null;
  }

  /** Inserts a fix in time order (replayed frames may be older than live ones); false if seen. */
  _addFix(fix, t, payload, relay) {
    const stream = relay.stream || payload.stream || payload.subtype || '';
    const key = isNum(payload.sequence) ? `${stream}|${payload.epoch || ''}|${payload.sequence}` : null;
    if (key !== null) {
      if (this._keys.has(key)) return false;
      this._keys.add(key);
    }
    const point = { ...fix, t, key };
    const trail = this._trail;
    if (!trail.length || t >= trail[trail.length - 1].t) {
      trail.push(point);
    } else {
      let lo = 0;
      let hi = trail.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (trail[mid].t <= t) lo = mid + 1;
        else hi = mid;
      }
      trail.splice(lo, 0, point);
    }
    while (trail.length > TRAIL_MAX) {
      const old = trail.shift();
      if (old.key !== null) this._keys.delete(old.key);
    }
    this._fixes++;
    return true;
  }

  _latest() {
    return this._trail.length ? this._trail[this._trail.length - 1] : null;
  }

  _validWaypoints() {
    return this._waypoints.every((w) => !w.latError && !w.lonError && isNum(w.lat) && isNum(w.lon));
  }

  /** Why Send is unavailable, or '' when it can be pressed. */
  _sendBlocker() {
    const access = this._device && this._device.access;
    if (access !== 'control' && access !== 'admin') {
      return `Sending waypoints needs control access to this device (you have ${access || 'no'} access).`;
    }
    if (this.ctx.connected && !this.ctx.connected()) return 'Not connected to the relay.';
    if (BUSY_STATES.has(this._state)) return 'Waiting for the answer to the last send.';
    if (!this._waypoints.length) return NO_WAYPOINTS;
    if (!this._validWaypoints()) return 'Fix the highlighted coordinates first.';
    if (!this._holdsLease()) {
      const l = this._lease;
      const who = l && (l.holderName || l.holder);
      return who
        ? `${who} holds the control lease; only the lease holder can send waypoints.`
        : 'Take the control lease first (Control panel) to send waypoints.';
    }
    return '';
  }

  _holdsLease() {
    try {
      return typeof this.ctx.holdsLease === 'function' && !!this.ctx.holdsLease();
    } catch {
      return false;
    }
  }

  _onLease(detail) {
    if (!this._open || (detail.deviceID && detail.deviceID !== this.ctx.deviceID)) return;
    this._leaseFromEvent = true;
    this._lease = detail.holder ? { holder: detail.holder, holderName: detail.holderName } : null;
    this._renderControls();
  }

  // ---- waypoint editing ----

  _canEdit() {
    return this._editing && !BUSY_STATES.has(this._state);
  }

  /** The plan changed: it is a draft again. */
  _edited() {
    if (!BUSY_STATES.has(this._state)) this._setState('editing');
    this._renderList();
    this._renderControls();
    this._requestDraw();
  }

  _addWaypoint(lat, lon) {
    if (this._waypoints.length >= WAYPOINTS_MAX) {
      this._setStatus(`A plan holds at most ${WAYPOINTS_MAX} waypoints.`, 'warn');
      return false;
    }
    const w = { lat: null, lon: null, latText: '', lonText: '', latError: '', lonError: '' };
    if (isNum(lat) && isNum(lon)) Object.assign(w, this._coords(lat, lon));
    else Object.assign(w, { latError: 'Latitude is missing', lonError: 'Longitude is missing' });
    this._waypoints.push(w);
    this._selected = this._waypoints.length - 1;
    this._edited();
    return true;
  }

  _coords(lat, lon) {
    const la = round6(clamp(lat, -90, 90));
    const lo = round6(wrapLon(lon));
    return { lat: la, lon: lo, latText: la.toFixed(6), lonText: lo.toFixed(6), latError: '', lonError: '' };
  }

  _removeWaypoint(i) {
    if (i < 0 || i >= this._waypoints.length) return;
    this._waypoints.splice(i, 1);
    if (this._selected === i) this._selected = -1;
    else if (this._selected > i) this._selected--;
    this._edited();
  }

  _setEditing(on) {
    this._editing = on;
    if (on) {
      // The map holds still while the plan is edited: points stay where they were clicked.
      this._autoFit = false;
      this._follow = false;
    } else {
      this._selected = -1;
    }
    this._renderList(true);
    this._renderControls();
    this._requestDraw();
  }

  // ---- sending ----

  _send() {
    if (this._sendBlocker()) return;
    const seq = ++this._sendSeq;
    const gen = this._gen;
    const waypoints = this._waypoints.map((w) => ({ latitude: w.lat, longitude: w.lon }));
    const n = waypoints.length;
    const plural = n === 1 ? 'waypoint' : 'waypoints';
    this._selected = -1;
    this._setState('sending', `Sending ${n} ${plural}…`);
    this._armWatchdog(seq);
    const first = waypoints[0];
    this.ctx.log('info', 'waypoints', `sending ${n} ${plural} (first ${formatLatLon(first.latitude, first.longitude)})`);
    this._renderList(true);
    this._renderControls();
    this._requestDraw();

    const current = () => gen === this._gen && seq === this._sendSeq;
    const onAck = (ack) => {
      if (!current() || !SENT_STATES.has(this._state)) return;
      if (ack && ack.status === 'queued') {
        // No deadline while the device is away; update() starts one when it comes back.
        clearTimeout(this._watchdog);
        const depth = isNum(ack.queueDepth)
          ? ` (${ack.queueDepth} ${ack.queueDepth === 1 ? 'request' : 'requests'} waiting for the device)` : '';
        this._setState('queued', `The device is offline: the relay queued the waypoints${depth}. They will be delivered when it reconnects.`);
        this.ctx.log('info', 'waypoints', `waypoints queued at the relay for the offline device${depth}`);
      } else {
        this._armWatchdog(seq);
        this._setState('delivered', 'Delivered to the device; waiting for its acknowledgement…');
        this.ctx.log('info', 'waypoints', 'waypoints delivered to the device');
      }
      this._renderControls();
    };
    this.ctx
      .request('app_command', { command: 'set_waypoints', data: { waypoints } },
        { clientID: this.ctx.deviceID, onAck, timeoutMs: REQUEST_TIMEOUT_MS })
      .then((msg) => {
        if (gen !== this._gen) return;
        // The plan may have been edited since (after a queued ack): then the outcome of the
        // earlier plan is logged and toasted, and the draft stays a draft.
        const shown = current() && this._state !== 'editing';
        const refused = resultError(msg);
        if (refused) {
          this.ctx.log('error', 'waypoints', `waypoints refused by the device: ${refused}`);
          if (shown) this._finish('refused', `Refused by the device: ${refused}`, 'bad');
          else this.ctx.toast('error', 'Earlier waypoints refused', refused);
          return;
        }
        const data = msg && msg.payload && msg.payload.data && typeof msg.payload.data === 'object' ? msg.payload.data : {};
        const count = isNum(data.waypoints) ? data.waypoints : n;
        const status = typeof data.status === 'string' && data.status ? `; status: ${data.status}` : '';
        const text = `Acknowledged by the device: ${count} ${count === 1 ? 'waypoint' : 'waypoints'}${status}.`;
        this.ctx.log('info', 'waypoints', `waypoints acknowledged by the device (${count}${status ? `, ${data.status}` : ''})`);
        if (shown) this._finish('acknowledged', text, 'ok');
        else this.ctx.toast('info', 'Earlier waypoints acknowledged', `${text} The plan on the map has changed since.`);
      })
      .catch((err) => {
        if (gen !== this._gen) return;
        const code = err && err.code;
        let text = describeFailure(err);
        if (code === 'not_controller') text += ' — take the control lease first.';
        const refused = REFUSAL_CODES.has(code);
        const wasSent = this._state === 'delivered' || this._state === 'queued';
        this.ctx.log('error', 'waypoints', `waypoints ${refused ? 'refused' : 'not acknowledged'}: ${text}`);
        if (!current() || this._state === 'editing') {
          this.ctx.toast('error', 'Earlier waypoints not acknowledged', text);
          return;
        }
        const lead = refused ? 'Refused by the relay: ' : wasSent ? 'No acknowledgement: ' : 'Not sent: ';
        this._finish(refused ? 'refused' : 'failed', lead + text, 'bad');
      });
  }

  _finish(state, text, level) {
    clearTimeout(this._watchdog);
    this._watchdog = 0;
    this._setState(state, text, level);
    this._renderList(true);
    this._renderControls();
    this._requestDraw();
  }

  /** Says so when neither the relay nor the device answered in time. A late answer still counts. */
  _armWatchdog(seq) {
    clearTimeout(this._watchdog);
    this._watchdog = setTimeout(() => {
      this._watchdog = 0;
      if (!this._open || seq !== this._sendSeq || !SENT_STATES.has(this._state) || this._state === 'acknowledged') return;
      const text = `No answer within ${ANSWER_WATCHDOG_MS / 1000} s (the link or the relay may have dropped the request). Check the device and send again.`;
      this.ctx.log('error', 'waypoints', `waypoints not acknowledged: ${text}`);
      this._finish('failed', text, 'bad');
    }, ANSWER_WATCHDOG_MS);
  }

  _setState(state, text, level = '') {
    this._state = state;
    if (text !== undefined) this._status = { text, level };
    else this._status = { text: '', level: '' };
    this._renderStatus();
  }

  _setStatus(text, level) {
    this._status = { text, level };
    this._renderStatus();
  }

  // ---- view ----

  _size() {
    return [this._w || 400, this._h || 300];
  }

  /** Fits the trail, the target and the plan into the view. */
  _fit() {
    const pts = this._trail.map((p) => [p.lat, p.lon]);
    for (const w of this._waypoints) if (isNum(w.lat) && isNum(w.lon) && !w.latError && !w.lonError) pts.push([w.lat, w.lon]);
    if (this._target) pts.push([this._target.lat, this._target.lon]);
    if (!pts.length) return;
    if (!this._template) {
      let [laMin, laMax, loMin, loMax] = [Infinity, -Infinity, Infinity, -Infinity];
      for (const [la, lo] of pts) {
        laMin = Math.min(laMin, la); laMax = Math.max(laMax, la);
        loMin = Math.min(loMin, lo); loMax = Math.max(loMax, lo);
      }
      this._proj = localProjection((laMin + laMax) / 2, (loMin + loMax) / 2);
    }
    let [xMin, xMax, yMin, yMax] = [Infinity, -Infinity, Infinity, -Infinity];
    for (const [la, lo] of pts) {
      const [x, y] = this._proj.fwd(la, lo);
      xMin = Math.min(xMin, x); xMax = Math.max(xMax, x);
      yMin = Math.min(yMin, y); yMax = Math.max(yMax, y);
    }
    const cx = (xMin + xMax) / 2;
    const cy = (yMin + yMax) / 2;
    const mpu = this._proj.metresPerUnit(this._proj.inv(cx, cy)[0]);
    const minSpan = MIN_FIT_SPAN_M / mpu;
    const [W, H] = this._size();
    const pad = 28;
    const s = Math.min((W - 2 * pad) / Math.max(xMax - xMin, minSpan), (H - 2 * pad) / Math.max(yMax - yMin, minSpan));
    this._view = { cx, cy, s };
    this._clampScale();
  }

  _clampScale() {
    const v = this._view;
    const mpu = this._proj.metresPerUnit(this._proj.inv(v.cx, v.cy)[0]);
    v.s = clamp(v.s, mpu / MAX_MPP, mpu / MIN_MPP);
  }

  _centreOnBoat() {
    const p = this._latest();
    if (!p || !this._view) return;
    [this._view.cx, this._view.cy] = this._proj.fwd(p.lat, p.lon);
  }

  /** Zooms by `factor` keeping the world point under (px, py) in place (default: the centre). */
  _zoom(factor, px, py) {
    const v = this._view;
    if (!v) return;
    const [W, H] = this._size();
    if (this._follow || px === undefined) [px, py] = [W / 2, H / 2];
    const [wx, wy] = this._toWorld(px, py);
    v.s *= factor;
    this._clampScale();
    v.cx = wx - (px - W / 2) / v.s;
    v.cy = wy + (py - H / 2) / v.s;
    this._autoFit = false;
    this._renderControls();
    this._requestDraw();
  }

  _pan(dxPx, dyPx) {
    const v = this._view;
    if (!v) return;
    v.cx -= dxPx / v.s;
    v.cy += dyPx / v.s;
    this._autoFit = false;
    this._follow = false;
    this._renderControls();
    this._requestDraw();
  }

  _toScreen(x, y) {
    const v = this._view;
    return [this._w / 2 + (x - v.cx) * v.s, this._h / 2 - (y - v.cy) * v.s];
  }

  _toWorld(px, py) {
    const v = this._view;
    const [W, H] = this._size();
    return [v.cx + (px - W / 2) / v.s, v.cy - (py - H / 2) / v.s];
  }

  _latLonAt(px, py) {
    return this._proj.inv(...this._toWorld(px, py));
  }

  /** The waypoint drawn within HIT_PX of (px, py), or -1. */
  _hitWaypoint(px, py) {
    if (!this._view) return -1;
    let best = -1;
    let bestD = HIT_PX;
    this._waypoints.forEach((w, i) => {
      if (!isNum(w.lat) || w.latError || w.lonError) return;
      const [sx, sy] = this._toScreen(...this._proj.fwd(w.lat, w.lon));
      const d = Math.hypot(sx - px, sy - py);
      if (d <= bestD) [best, bestD] = [i, d];
    });
    return best;
  }

  _resize() {
    const rect = this.el.stage.getBoundingClientRect();
    const w = Math.round(rect.width);
    const h = Math.round(rect.height);
    const dpr = window.devicePixelRatio || 1;
    if (w === this._w && h === this._h && dpr === this._dpr) return;
    const first = !this._w || !this._h;
    [this._w, this._h, this._dpr] = [w, h, dpr];
    this.canvas.width = Math.max(1, Math.round(w * dpr));
    this.canvas.height = Math.max(1, Math.round(h * dpr));
    if (this._view && (this._autoFit || first)) this._fit();
    else if (this._view && this._follow) this._centreOnBoat();
    // Resizing cleared the canvas: draw now rather than show a blank frame.
    cancelAnimationFrame(this._raf);
    this._raf = 0;
    this._draw();
  }

  /** Redraws when the device pixel ratio changes (browser zoom, another screen). */
  _watchDpr() {
    if (this._dprQuery) this._dprQuery.removeEventListener('change', this._dprListener);
    this._dprQuery = matchMedia(`(resolution: ${window.devicePixelRatio || 1}dppx)`);
    this._dprListener = () => {
      if (!this._open) return;
      this._resize();
      this._watchDpr();
    };
    this._dprQuery.addEventListener('change', this._dprListener);
  }

  _requestDraw() {
    if (!this._open || this._raf) return;
    this._raf = requestAnimationFrame(() => {
      this._raf = 0;
      this._draw();
    });
  }

  // ---- drawing ----

  _draw() {
    const W = this._w;
    const H = this._h;
    if (!W || !H) return;
    const g = this.canvas.getContext('2d');
    g.setTransform(this._dpr, 0, 0, this._dpr, 0, 0);
    g.fillStyle = COLORS.bg;
    g.fillRect(0, 0, W, H);
    this.el.empty.hidden = !!this._view || !this._open;
    if (!this._view || !this._open) return;
    this._drawGrid(g, W, H); // under the tiles too: it shows where a tile failed
    if (this._template) this._drawTiles(g, W, H);
    this._drawPlan(g);
    this._drawTrail(g);
    this._drawTarget(g);
    this._drawBoat(g);
    this._drawScaleBar(g, W, H);
    this._drawNorth(g, W);
  }

  _metresPerPixel() {
    const v = this._view;
    return this._proj.metresPerUnit(this._proj.inv(v.cx, v.cy)[0]) / v.s;
  }

  _drawGrid(g, W, H) {
    const v = this._view;
    const step = niceStep(90 / v.s); // world units (metres here), about 90 px apart
    const [x0, y1] = this._toWorld(0, 0);
    const [x1, y0] = this._toWorld(W, H);
    g.lineWidth = 1;
    g.strokeStyle = COLORS.grid;
    g.beginPath();
    for (let x = Math.ceil(x0 / step) * step; x <= x1; x += step) {
      const sx = Math.round(this._toScreen(x, 0)[0]) + 0.5;
      g.moveTo(sx, 0);
      g.lineTo(sx, H);
    }
    for (let y = Math.ceil(y0 / step) * step; y <= y1; y += step) {
      const sy = Math.round(this._toScreen(0, y)[1]) + 0.5;
      g.moveTo(0, sy);
      g.lineTo(W, sy);
    }
    g.stroke();
  }

  _drawTiles(g, W, H) {
    const v = this._view;
    const world = 2 * Math.PI * R;
    const z = clamp(Math.round(Math.log2((v.s * world) / 256)), 0, TILE_MAX_ZOOM);
    const n = 2 ** z;
    const tileWorld = world / n;
    const tilePx = tileWorld * v.s;
    const [x0, yTop] = this._toWorld(0, 0);
    const [x1, yBot] = this._toWorld(W, H);
    const tx0 = Math.floor((x0 + world / 2) / tileWorld);
    const tx1 = Math.floor((x1 + world / 2) / tileWorld);
    const ty0 = Math.max(0, Math.floor((world / 2 - yTop) / tileWorld));
    const ty1 = Math.min(n - 1, Math.floor((world / 2 - yBot) / tileWorld));
    if ((tx1 - tx0 + 1) * (ty1 - ty0 + 1) > 200) return;
    for (let ty = ty0; ty <= ty1; ty++) {
      for (let tx = tx0; tx <= tx1; tx++) {
        const txw = ((tx % n) + n) % n;
        const [sx, sy] = this._toScreen(-world / 2 + tx * tileWorld, world / 2 - ty * tileWorld);
        const [dx, dy, size] = [Math.floor(sx), Math.floor(sy), Math.ceil(tilePx) + 1];
        const tile = this._tile(z, txw, ty);
        if (tile.ok) {
          g.drawImage(tile.img, dx, dy, size, size);
          continue;
        }
        // Until it loads (or if it failed), a part of a parent tile already in the cache.
        for (let k = 1; k <= 4 && z - k >= 0; k++) {
          const parent = this._tiles.get(this._tileUrl(z - k, txw >> k, ty >> k));
          if (!parent || !parent.ok) continue;
          const sub = 256 / 2 ** k;
          const mask = 2 ** k - 1;
          g.drawImage(parent.img, (txw & mask) * sub, (ty & mask) * sub, sub, sub, dx, dy, size, size);
          break;
        }
      }
    }
  }

  _tileUrl(z, x, y) {
    return this._template
      .replaceAll('{z}', String(z))
      .replaceAll('{x}', String(x))
      .replaceAll('{y}', String(y))
      .replaceAll('{s}', 'abc'[(x + y) % 3])
      .replaceAll('{r}', '');
  }

  /** The cached tile for (z, x, y), starting its load if needed. */
  _tile(z, x, y) {
    const url = this._tileUrl(z, x, y);
    let entry = this._tiles.get(url);
    if (entry) {
      this._tiles.delete(url); // most recently used last
      this._tiles.set(url, entry);
      return entry;
    }
    const img = new Image();
    entry = { img, ok: null };
    img.decoding = 'async';
    img.referrerPolicy = 'no-referrer';
    img.onload = () => {
      entry.ok = true;
      this._requestDraw();
    };
    img.onerror = () => {
      entry.ok = false;
      this._tilesFailed++;
      if (this._template) this.root.dataset.tilesFailed = String(this._tilesFailed);
    };
    img.src = url;
    this._tiles.set(url, entry);
    while (this._tiles.size > TILE_CACHE_MAX) {
      const [oldUrl, old] = this._tiles.entries().next().value;
      old.img.onload = old.img.onerror = null;
      this._tiles.delete(oldUrl);
    }
    return entry;
  }

  /** The plan: a path through the waypoints, numbered markers. */
  _drawPlan(g) {
    const sent = SENT_STATES.has(this._state);
    const color = sent ? COLORS.sent : COLORS.draft;
    const pts = [];
    this._waypoints.forEach((w, i) => {
      if (isNum(w.lat) && isNum(w.lon) && !w.latError && !w.lonError) pts.push([i, ...this._toScreen(...this._proj.fwd(w.lat, w.lon))]);
    });
    if (!pts.length) return;
    g.save();
    g.strokeStyle = color;
    g.lineWidth = 2;
    g.setLineDash(sent ? [] : [7, 5]);
    g.beginPath();
    pts.forEach(([, x, y], k) => (k ? g.lineTo(x, y) : g.moveTo(x, y)));
    g.stroke();
    g.setLineDash([]);
    g.font = '700 11px system-ui, sans-serif';
    g.textAlign = 'center';
    g.textBaseline = 'middle';
    for (const [i, x, y] of pts) {
      if (i === this._selected) {
        g.strokeStyle = COLORS.selected;
        g.lineWidth = 3;
        g.beginPath(); g.arc(x, y, 13, 0, 2 * Math.PI); g.stroke();
      }
      g.fillStyle = color;
      g.strokeStyle = '#fff';
      g.lineWidth = 2;
      g.beginPath(); g.arc(x, y, 9, 0, 2 * Math.PI); g.fill(); g.stroke();
      g.fillStyle = '#fff';
      g.fillText(String(i + 1), x, y + 0.5);
    }
    g.restore();
  }

  _drawTrail(g) {
    const trail = this._trail;
    if (trail.length < 2) return;
    g.save();
    g.strokeStyle = COLORS.trail;
    g.lineWidth = 2;
    g.lineJoin = 'round';
    g.globalAlpha = 0.8;
    g.beginPath();
    trail.forEach((p, i) => {
      const [x, y] = this._toScreen(...this._proj.fwd(p.lat, p.lon));
      if (i) g.lineTo(x, y);
      else g.moveTo(x, y);
    });
    g.stroke();
    g.restore();
  }

  _drawTarget(g) {
    const t = this._target;
    if (!t) return;
    const [x, y] = this._toScreen(...this._proj.fwd(t.lat, t.lon));
    const boat = this._latest();
    g.save();
    g.strokeStyle = COLORS.target;
    if (boat) {
      const [bx, by] = this._toScreen(...this._proj.fwd(boat.lat, boat.lon));
      g.lineWidth = 1.5;
      g.setLineDash([3, 4]);
      g.beginPath(); g.moveTo(bx, by); g.lineTo(x, y); g.stroke();
      g.setLineDash([]);
    }
    g.lineWidth = 2.5;
    g.beginPath(); g.arc(x, y, 11, 0, 2 * Math.PI); g.stroke();
    g.beginPath();
    g.moveTo(x - 16, y); g.lineTo(x - 6, y); g.moveTo(x + 6, y); g.lineTo(x + 16, y);
    g.moveTo(x, y - 16); g.lineTo(x, y - 6); g.moveTo(x, y + 6); g.lineTo(x, y + 16);
    g.stroke();
    g.restore();
  }

  _drawBoat(g) {
    const p = this._latest();
    if (!p) return;
    const [x, y] = this._toScreen(...this._proj.fwd(p.lat, p.lon));
    g.save();
    g.translate(x, y);
    g.fillStyle = COLORS.boat;
    g.strokeStyle = '#fff';
    g.lineWidth = 2;
    g.beginPath();
    if (p.heading === null) {
      g.arc(0, 0, 7, 0, 2 * Math.PI);
    } else {
      g.rotate(p.heading * D2R); // heading is clockwise from north; canvas angles are clockwise
      g.moveTo(0, -15);
      g.lineTo(9, 10);
      g.lineTo(0, 5);
      g.lineTo(-9, 10);
      g.closePath();
    }
    g.fill();
    g.stroke();
    g.restore();
  }

  _drawScaleBar(g, W, H) {
    const mpp = this._metresPerPixel();
    const metres = niceStep(110 * mpp);
    const px = metres / mpp;
    const x = 12;
    const y = H - 14;
    g.save();
    g.fillStyle = COLORS.halo;
    g.fillRect(x - 6, y - 20, px + 12, 28);
    g.strokeStyle = COLORS.text;
    g.lineWidth = 2;
    g.beginPath();
    g.moveTo(x, y - 6); g.lineTo(x, y); g.lineTo(x + px, y); g.lineTo(x + px, y - 6);
    g.stroke();
    g.fillStyle = COLORS.text;
    g.font = '600 12px system-ui, sans-serif';
    g.textBaseline = 'bottom';
    g.textAlign = 'left';
    g.fillText(formatDistance(metres), x + 2, y - 5);
    g.restore();
  }

  _drawNorth(g, W) {
    const x = W - 24;
    const y = 30;
    g.save();
    g.fillStyle = COLORS.halo;
    g.beginPath(); g.arc(x, y, 17, 0, 2 * Math.PI); g.fill();
    g.fillStyle = COLORS.text;
    g.beginPath(); g.moveTo(x, y - 13); g.lineTo(x + 6, y + 2); g.lineTo(x, y - 2); g.lineTo(x - 6, y + 2); g.closePath(); g.fill();
    g.font = '700 11px system-ui, sans-serif';
    g.textAlign = 'center';
    g.textBaseline = 'top';
    g.fillText('N', x, y + 3);
    g.restore();
  }

  // ---- DOM ----

  _build() {
    const h = this.ctx.h;
    const btn = (testid, text, title, extra = {}) =>
      h('button', { class: 'btn btn-small btn-quiet', type: 'button', 'data-testid': testid, text, title, ...extra });
    this.root.classList.add('track-panel');
    const el = (this.el = {});
    el.position = h('span', { class: 'track-position mono', 'data-testid': 'track-position', role: 'status', 'aria-live': 'off' }, 'no position yet');
    el.target = h('span', { class: 'track-target mono small', 'data-testid': 'track-target' });
    el.fit = btn('track-fit', 'Fit', 'Show the whole track, the target and the waypoints');
    el.follow = btn('track-follow', 'Follow', 'Keep the boat in the centre', { 'aria-pressed': 'false' });
    el.zoomIn = btn('track-zoom-in', '+', 'Zoom in', { 'aria-label': 'Zoom in' });
    el.zoomOut = btn('track-zoom-out', '−', 'Zoom out', { 'aria-label': 'Zoom out' });
    this.canvas = h('canvas', {
      class: 'track-canvas',
      'data-testid': 'track-canvas',
      tabindex: '0',
      role: 'application',
      'aria-roledescription': 'map',
      'aria-label': 'Track map, north up: the boat (arrow pointing along its heading), its trail, '
        + 'its target (ring) and the waypoints (numbered). Arrow keys pan, + and - zoom. In edit mode '
        + 'Enter adds a waypoint at the centre and Delete removes the selected one.',
    });
    el.empty = h('p', { class: 'track-empty muted' }, 'Waiting for a GPS position from the device…');
    el.cursor = h('span', { class: 'track-cursor mono', 'data-testid': 'track-cursor', 'aria-hidden': 'true' });
    el.attribution = h('span', { class: 'track-attribution', 'data-testid': 'track-attribution', hidden: true });
    el.stage = h('div', { class: 'track-stage' }, this.canvas, el.empty, el.cursor, el.attribution);

    el.edit = h('button', { class: 'btn btn-small', type: 'button', 'data-testid': 'waypoint-edit', 'aria-pressed': 'false', text: 'Edit waypoints' });
    el.add = btn('waypoint-add', 'Add', 'Add a waypoint at the centre of the map (then adjust its coordinates)');
    el.clear = btn('waypoint-clear', 'Clear', 'Remove every waypoint from the plan');
    el.send = h('button', { class: 'btn btn-small btn-primary', type: 'button', 'data-testid': 'waypoint-send', 'aria-describedby': 'track-send-hint', text: 'Send' });
    el.sendHint = h('p', { class: 'hint track-send-hint', id: 'track-send-hint', 'data-testid': 'waypoint-send-hint' });
    el.status = h('p', { class: 'track-status', 'data-testid': 'waypoint-status', role: 'status', 'aria-live': 'polite' });
    el.list = h('ol', { class: 'waypoint-list', 'data-testid': 'waypoint-list', 'aria-label': 'Waypoints' });

    this.root.append(
      h('div', { class: 'track-head' },
        h('h3', { text: 'Track' }), el.position, h('span', { class: 'spacer' }),
        h('div', { class: 'track-tools', role: 'group', 'aria-label': 'Map view' }, el.fit, el.follow, el.zoomOut, el.zoomIn)),
      el.target,
      el.stage,
      h('div', { class: 'track-legend small muted', 'aria-hidden': 'true' },
        h('span', { class: 'lg lg-trail' }), 'trail ', h('span', { class: 'lg lg-boat' }), 'boat ',
        h('span', { class: 'lg lg-target' }), 'target ', h('span', { class: 'lg lg-draft' }), 'draft ',
        h('span', { class: 'lg lg-sent' }), 'sent'),
      h('div', { class: 'track-wp' },
        h('div', { class: 'track-wp-head' },
          h('h3', { text: 'Waypoints' }), h('span', { class: 'spacer' }), el.edit, el.add, el.clear, el.send),
        el.sendHint,
        el.status,
        el.list),
    );

    el.fit.addEventListener('click', () => {
      this._follow = false;
      this._autoFit = !this._editing;
      this._fit();
      this._renderControls();
      this._requestDraw();
    });
    el.follow.addEventListener('click', () => {
      this._follow = !this._follow;
      if (this._follow) {
        this._autoFit = false;
        this._centreOnBoat();
      }
      this._renderControls();
      this._requestDraw();
    });
    el.zoomIn.addEventListener('click', () => this._zoom(2));
    el.zoomOut.addEventListener('click', () => this._zoom(0.5));
    el.edit.addEventListener('click', () => this._setEditing(!this._editing));
    el.add.addEventListener('click', () => {
      if (!this._canEdit()) return;
      const at = this._view ? this._latLonAt(this._w / 2, this._h / 2) : [null, null];
      if (!this._addWaypoint(...at)) return;
      const lat = this.el.list.lastElementChild && this.el.list.lastElementChild.querySelector('input');
      if (lat) {
        lat.focus();
        lat.select(); // typing replaces the map-centre position
      }
    });
    el.clear.addEventListener('click', () => {
      if (!this._canEdit() || !this._waypoints.length) return;
      this._waypoints = [];
      this._selected = -1;
      this._edited();
    });
    el.send.addEventListener('click', () => this._send());

    const c = this.canvas;
    c.addEventListener('pointerdown', (e) => this._pointerDown(e));
    c.addEventListener('pointermove', (e) => this._pointerMove(e));
    c.addEventListener('pointerup', (e) => this._pointerUp(e));
    c.addEventListener('pointercancel', () => { this._gesture = null; });
    c.addEventListener('pointerleave', () => {
      this._cursor = null;
      this._renderCursor();
    });
    c.addEventListener('wheel', (e) => {
      if (!this._view) return;
      e.preventDefault();
      const unit = e.deltaMode === 1 ? 16 : e.deltaMode === 2 ? 400 : 1;
      const [px, py] = this._eventPoint(e);
      this._zoom(Math.exp(clamp(-e.deltaY * unit * 0.002, -1, 1)), px, py);
    }, { passive: false });
    c.addEventListener('keydown', (e) => this._key(e));
  }

  _eventPoint(e) {
    const r = this.canvas.getBoundingClientRect();
    return [e.clientX - r.left, e.clientY - r.top];
  }

  _pointerDown(e) {
    if (!this._open || (e.pointerType === 'mouse' && e.button !== 0)) return;
    this.canvas.focus({ preventScroll: true });
    const [px, py] = this._eventPoint(e);
    const hit = this._canEdit() ? this._hitWaypoint(px, py) : -1;
    this._gesture = { id: e.pointerId, x0: px, y0: py, x: px, y: py, waypoint: hit, moved: false };
    if (hit >= 0 && hit !== this._selected) {
      this._selected = hit;
      this._renderList();
      this._requestDraw();
    }
    this.canvas.setPointerCapture(e.pointerId);
  }

  _pointerMove(e) {
    const [px, py] = this._eventPoint(e);
    const gest = this._gesture;
    if (this._view) {
      this._cursor = this._latLonAt(px, py);
      this._renderCursor();
    }
    if (!gest || gest.id !== e.pointerId) {
      this.canvas.dataset.hover = this._canEdit() && this._hitWaypoint(px, py) >= 0 ? 'waypoint' : '';
      return;
    }
    if (!gest.moved && Math.hypot(px - gest.x0, py - gest.y0) < DRAG_PX) return;
    gest.moved = true;
    if (gest.waypoint >= 0 && this._canEdit() && this._waypoints[gest.waypoint]) {
      Object.assign(this._waypoints[gest.waypoint], this._coords(...this._latLonAt(px, py)));
      this._edited();
    } else if (gest.waypoint < 0) {
      this.canvas.dataset.hover = 'panning';
      this._pan(px - gest.x, py - gest.y);
    }
    gest.x = px;
    gest.y = py;
  }

  _pointerUp(e) {
    const gest = this._gesture;
    if (!gest || gest.id !== e.pointerId) return;
    this._gesture = null;
    this.canvas.dataset.hover = '';
    if (gest.moved || gest.waypoint >= 0 || !this._canEdit() || !this._view) return;
    // A click on empty map in edit mode: a new waypoint at the end.
    const [px, py] = this._eventPoint(e);
    this._addWaypoint(...this._latLonAt(px, py));
  }

  _key(e) {
    if (!this._view) return;
    const step = Math.min(this._w, this._h) / 6;
    const k = e.key;
    let handled = true;
    if (k === 'ArrowLeft') this._pan(step, 0);
    else if (k === 'ArrowRight') this._pan(-step, 0);
    else if (k === 'ArrowUp') this._pan(0, step);
    else if (k === 'ArrowDown') this._pan(0, -step);
    else if (k === '+' || k === '=') this._zoom(2);
    else if (k === '-' || k === '_') this._zoom(0.5);
    else if ((k === 'Delete' || k === 'Backspace') && this._canEdit() && this._selected >= 0) this._removeWaypoint(this._selected);
    else if (k === 'Enter' && this._canEdit()) this._addWaypoint(...this._latLonAt(this._w / 2, this._h / 2));
    else if (k === 'Escape' && this._selected >= 0) {
      this._selected = -1;
      this._renderList();
      this._requestDraw();
    } else handled = false;
    if (handled) e.preventDefault();
  }

  // ---- rendering the DOM ----

  _renderAll() {
    this._renderReadout();
    this._renderCursor();
    this._renderStatus();
    this._renderList(true);
    this._renderControls();
    if (this._open) this._requestDraw();
    else this._draw();
  }

  _renderReadout() {
    const ds = this.root.dataset;
    ds.fixes = String(this._fixes);
    const p = this._latest();
    if (p) {
      const parts = [formatLatLon(p.lat, p.lon)];
      if (p.heading !== null) parts.push(`heading ${p.heading.toFixed(1)}°`);
      if (p.speed !== null) parts.push(`${p.speed.toFixed(1)} m/s`);
      this.el.position.textContent = parts.join(' · ');
      ds.boatLat = String(p.lat);
      ds.boatLon = String(p.lon);
      if (p.heading !== null) ds.heading = String(p.heading);
      else delete ds.heading;
    } else {
      this.el.position.textContent = 'no position yet';
      delete ds.boatLat;
      delete ds.boatLon;
      delete ds.heading;
    }
    const t = this._target;
    if (t) {
      const dist = t.distance !== null ? ` (${formatDistance(t.distance)} away)` : '';
      this.el.target.textContent = `Target ${formatLatLon(t.lat, t.lon)}${dist}`;
      ds.targetLat = String(t.lat);
      ds.targetLon = String(t.lon);
    } else {
      this.el.target.textContent = p ? 'No target' : '';
      delete ds.targetLat;
      delete ds.targetLon;
    }
  }

  _renderCursor() {
    const c = this._cursor;
    this.el.cursor.textContent = c ? formatLatLon(c[0], c[1]) : '';
    this.el.cursor.hidden = !c;
  }

  _renderStatus() {
    const ds = this.root.dataset;
    ds.waypointState = this._state;
    ds.waypoints = String(this._waypoints.length);
    let { text, level } = this._status;
    if (this._state === 'editing' && !level) {
      const n = this._waypoints.length;
      if (n) text = `Plan of ${n} ${n === 1 ? 'waypoint' : 'waypoints'}, not sent.`;
      else if (this._editing) text = 'Click the map to add waypoints (drag one to move it), or press "Add" and type the coordinates.';
      else text = 'No waypoints. Press "Edit waypoints", then click the map to add them.';
    }
    this.el.status.textContent = text;
    this.el.status.dataset.state = this._state;
    this.el.status.dataset.level = level || '';
  }

  /** The waypoint rows. `rebuild` recreates them; otherwise values are updated in place. */
  _renderList(rebuild = false) {
    const list = this.el.list;
    const wps = this._waypoints;
    if (rebuild || list.children.length !== wps.length) {
      const focused = document.activeElement && list.contains(document.activeElement) ? document.activeElement : null;
      const focusKey = focused ? `${focused.closest('li')?.dataset.index}:${focused.dataset.field || 'remove'}` : null;
      list.replaceChildren(...wps.map((_, i) => this._row(i)));
      if (focusKey) {
        const [i, field] = focusKey.split(':');
        const row = list.children[Math.min(Number(i), list.children.length - 1)];
        const target = row && (field === 'remove' ? row.querySelector('button') : row.querySelector(`input[data-field="${field}"]`));
        (target || this.el.edit).focus();
      }
    }
    wps.forEach((w, i) => this._fillRow(list.children[i], w, i));
    list.hidden = !wps.length;
    this._renderStatus();
  }

  _row(i) {
    const h = this.ctx.h;
    const input = (field) => {
      const el = h('input', {
        class: 'mono',
        type: 'text',
        inputmode: 'decimal',
        autocomplete: 'off',
        spellcheck: 'false',
        'data-field': field,
        'data-testid': field === 'lat' ? 'waypoint-lat' : 'waypoint-lon',
        'aria-label': `Waypoint ${i + 1} ${field === 'lat' ? 'latitude' : 'longitude'}`,
        'aria-describedby': `track-wp-err-${i}`,
      });
      el.addEventListener('input', (e) => this._typed(i, field, el.value, e.inputType));
      el.addEventListener('change', () => {
        // A "lat, lon" pair typed into the latitude is split when the field is left.
        if (field === 'lat') this._typed(i, field, el.value, 'insertFromPaste');
        // A typed position may be outside the view; show it (unless the pilot placed the view).
        if (!this._view || this._autoFit) {
          this._fit();
          this._renderControls();
          this._requestDraw();
        }
      });
      el.addEventListener('focus', () => {
        if (this._selected !== i) {
          this._selected = i;
          this._renderList();
          this._requestDraw();
        }
      });
      return el;
    };
    const remove = h('button', {
      class: 'btn btn-small btn-quiet waypoint-remove',
      type: 'button',
      'data-testid': 'waypoint-remove',
      'aria-label': `Remove waypoint ${i + 1}`,
      title: 'Remove this waypoint',
      text: '✕',
    });
    remove.addEventListener('click', () => {
      if (this._canEdit()) this._removeWaypoint(i);
    });
    return h('li', { class: 'waypoint-item', 'data-testid': 'waypoint-item', dataset: { index: i } },
      h('span', { class: 'wp-num', 'aria-hidden': 'true', text: String(i + 1) }),
      h('label', { class: 'wp-field' }, h('span', { class: 'wp-label', text: 'Lat' }), input('lat')),
      h('label', { class: 'wp-field' }, h('span', { class: 'wp-label', text: 'Lon' }), input('lon')),
      remove,
      h('span', { class: 'wp-error', id: `track-wp-err-${i}`, 'data-testid': 'waypoint-error', role: 'alert' }));
  }

  _fillRow(li, w, i) {
    const editable = this._canEdit();
    for (const input of li.querySelectorAll('input')) {
      const field = input.dataset.field;
      const text = field === 'lat' ? w.latText : w.lonText;
      if (input.value !== text && document.activeElement !== input) input.value = text;
      input.readOnly = !editable;
      input.setAttribute('aria-invalid', (field === 'lat' ? w.latError : w.lonError) ? 'true' : 'false');
    }
    li.querySelector('.waypoint-remove').hidden = !editable;
    const err = [w.latError, w.lonError].filter(Boolean).join('; ');
    const errEl = li.querySelector('.wp-error');
    if (errEl.textContent !== err) errEl.textContent = err;
    errEl.hidden = !err;
    li.dataset.selected = String(i === this._selected);
    li.dataset.invalid = String(!!err);
  }

  /**
   * A coordinate typed in the list. A "lat, lon" pair pasted into a latitude (or typed, once
   * the field is left: `change` passes inputType insertFromPaste) fills both fields.
   */
  _typed(i, field, value, inputType = '') {
    const w = this._waypoints[i];
    if (!w || !this._canEdit()) return;
    const num = '([+-]?(?:\\d+\\.?\\d*|\\.\\d+))';
    const pair = /^insertFrom(Paste|Drop)$/.test(inputType) && new RegExp(`^\\s*${num}\\s*[,;\\s]\\s*${num}\\s*$`).exec(value);
    if (pair && field === 'lat') {
      w.latText = pair[1];
      w.lonText = pair[2];
      const li = this.el.list.children[i];
      if (li) li.querySelector('input[data-field="lat"]').value = pair[1];
      if (li) li.querySelector('input[data-field="lon"]').value = pair[2];
    } else if (field === 'lat') w.latText = value;
    else w.lonText = value;
    const la = parseCoord(w.latText, 'lat');
    const lo = parseCoord(w.lonText, 'lon');
    w.latError = la.error || '';
    w.lonError = lo.error || '';
    if (!la.error) w.lat = la.value;
    if (!lo.error) w.lon = lo.value;
    this._edited();
  }

  _renderControls() {
    const el = this.el;
    const open = this._open;
    const hasView = !!this._view;
    for (const b of [el.fit, el.follow, el.zoomIn, el.zoomOut]) b.disabled = !open || !hasView;
    el.follow.disabled = !open || !this._latest();
    el.follow.setAttribute('aria-pressed', String(this._follow));
    this.root.dataset.follow = String(this._follow);
    this.root.dataset.editing = String(this._editing);
    el.edit.setAttribute('aria-pressed', String(this._editing));
    el.edit.textContent = this._editing ? 'Done editing' : 'Edit waypoints';
    el.edit.disabled = !open || BUSY_STATES.has(this._state);
    el.add.hidden = el.clear.hidden = !this._editing;
    el.add.disabled = !this._canEdit();
    el.clear.disabled = !this._canEdit() || !this._waypoints.length;
    const blocker = open ? this._sendBlocker() : 'No device is open.';
    el.send.disabled = !!blocker;
    const n = this._waypoints.length;
    el.send.textContent = n ? `Send ${n} ${n === 1 ? 'waypoint' : 'waypoints'}` : 'Send';
    // With no waypoints the status line already says what to do.
    el.sendHint.textContent = blocker;
    el.sendHint.hidden = !blocker || blocker === NO_WAYPOINTS;
    this.canvas.dataset.mode = this._canEdit() ? 'edit' : 'view';
  }
}
