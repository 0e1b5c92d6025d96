// Rendering. The page skeleton lives in index.html (so tests find every data-testid from the
// start); these functions only fill it in. Text always goes through textContent, never
// innerHTML: device names and relay messages are data, not markup.

import { DASH, agoShort, clockTime, formatMs, formatOffset, formatRate, formatValue, formatNumber } from './format.js';

export const $ = (id) => document.getElementById(id);

/** Creates an element: h('span', {class: 'x', dataset: {id: 1}}, 'text', child). */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) el.append(c);
  return el;
}

/** Sets textContent only when it changed (cheap, and avoids needless layout work). */
function setText(el, text) {
  const t = String(text);
  if (el.textContent !== t) el.textContent = t;
}

const SCREENS = ['boot', 'login', 'fleet', 'device', 'admin'];

export function showScreen(name) {
  for (const s of SCREENS) $(`${s}-screen`).hidden = s !== name;
  const loggedIn = name === 'fleet' || name === 'device' || name === 'admin';
  $('conn-bar').hidden = !loggedIn;
  $('logout').hidden = !loggedIn;
  $('user').hidden = !loggedIn;
  $('topnav').hidden = !loggedIn;
  $('nav-fleet').classList.toggle('active', name === 'fleet' || name === 'device');
  $('nav-admin').classList.toggle('active', name === 'admin');
  if (!loggedIn) {
    $('dropped-warning').hidden = true;
    $('session-expiry').hidden = true;
  }
}

// ---- login ----------------------------------------------------------------------------------

export function setLoginBusy(busy) {
  for (const id of ['login-button', 'login-key', 'login-password-button', 'login-username', 'login-password']) $(id).disabled = busy;
  setText($('login-button'), busy ? 'Checking…' : 'Log in');
  setText($('login-password-button'), busy ? 'Checking…' : 'Log in');
}

export function showLoginError(message) {
  const el = $('login-error');
  el.hidden = !message;
  setText(el, message || '');
}

export function renderUser(me) {
  const el = $('user');
  if (!me) {
    setText(el, '');
    return;
  }
  setText(el, `${me.username ?? me.id ?? '?'} · ${me.role ?? '?'} · ${me.org ?? '?'}`);
  el.title = me.id ? `operator ${me.id}` : '';
}

// ---- connection banner -------------------------------------------------------------------------

/**
 * Renders the connection banner. Called on every status change and every 250 ms while a retry
 * is pending, so the countdown ticks.
 */
export function renderConn(status, now = performance.now()) {
  const bar = $('conn-bar');
  const state = status.state;
  const secs = status.retryAt != null ? Math.max(0, Math.ceil((status.retryAt - now) / 1000)) : 0;
  let text;
  switch (state) {
    case 'connected':
      text = 'connected';
      break;
    case 'connecting':
      text = status.unreachable
        ? 'relay unreachable · reconnecting now…'
        : status.failures > 0
          ? 'reconnecting now…'
          : 'connecting…';
      break;
    case 'reconnecting':
      text = `reconnecting in ${secs}s…`;
      break;
    case 'unreachable':
      text = `relay unreachable · reconnecting in ${secs}s…`;
      break;
    case 'replaced':
      text = 'paused: this key was connected from another console';
      break;
    default:
      text = 'offline';
  }
  // The visual state follows the worst news: "connecting" after failures still looks degraded.
  const look = state === 'connecting' && status.unreachable ? 'unreachable' : state === 'connecting' && status.failures > 0 ? 'reconnecting' : state;
  bar.dataset.state = look;
  $('conn-status').dataset.state = state;
  setText($('conn-status'), text);
  setText($('conn-reason'), state === 'connected' || !status.reason ? '' : `(${status.reason})`);
  $('reconnect-now').hidden = !(state === 'reconnecting' || state === 'unreachable' || state === 'replaced');
  if (state !== 'connected') renderRtt(null);
}

export function renderRtt(rttMs, relayOffsetMs = null) {
  const el = $('rtt');
  setText(el, rttMs == null ? '' : `round trip ${formatMs(rttMs)}`);
  el.title =
    relayOffsetMs == null
      ? 'Round trip to the relay (ping/pong)'
      : `Round trip to the relay (ping/pong). Relay clock is ${formatMs(relayOffsetMs)} from this browser's.`;
}

// ---- dropped-telemetry warning ------------------------------------------------------------------

export function renderDropped(dropped) {
  const el = $('dropped-warning');
  el.hidden = !dropped;
  if (dropped) {
    setText(
      $('dropped-text'),
      `The relay dropped ${dropped.count} frame${dropped.count === 1 ? '' : 's'} for this console at ${clockTime(dropped.at)} ` +
        `(${dropped.total} since connecting) because it was reading too slowly.`,
    );
  }
}

// ---- toasts -----------------------------------------------------------------------------------

const TOAST_MS = 6000;
const MAX_TOASTS = 4;

/** A transient notice in the corner. kind: error | warn | info. */
export function toast(kind, title, message = '') {
  const box = $('toasts');
  // The same notice again (e.g. a burst of identical errors) refreshes the existing toast.
  const key = `${kind}|${title}|${message}`;
  for (const t of box.children) {
    if (t.dataset.key === key) {
      clearTimeout(Number(t.dataset.timer));
      t.dataset.timer = String(setTimeout(() => t.remove(), TOAST_MS));
      t.dataset.repeat = String(Number(t.dataset.repeat || 1) + 1);
      return;
    }
  }
  const el = h('div', { class: `toast toast-${kind}`, role: kind === 'error' ? 'alert' : 'status', 'data-testid': 'toast' },
    h('strong', { text: title }),
    message ? h('span', { text: ` ${message}` }) : null);
  el.dataset.key = key;
  el.addEventListener('click', () => el.remove());
  box.append(el);
  while (box.children.length > MAX_TOASTS) box.firstElementChild.remove();
  el.dataset.timer = String(setTimeout(() => el.remove(), TOAST_MS));
}

// ---- device view ------------------------------------------------------------------------------

/** A value not refreshed for this long is dimmed as stale. */
const STALE_MS = 5000;

export class DeviceView {
  constructor() {
    this.valueRows = new Map(); // key -> {tr, value, updated}
    this.streamRows = new Map(); // stream -> {tr, cells}
  }

  /** Resets the view for a newly opened device. */
  reset(deviceID) {
    this.valueRows.clear();
    this.streamRows.clear();
    $('telemetry-body').replaceChildren();
    $('stream-body').replaceChildren();
    $('telemetry-empty').hidden = false;
    setText($('device-id'), deviceID);
    setText($('device-name'), deviceID);
    setText($('device-sub'), '');
    this.renderBadge(null);
    for (const id of ['telemetry-seq', 'telemetry-verdict', 'telemetry-age', 'clock-offset', 'fps', 'last-frame', 'lost-total']) {
      setText($(id), DASH);
    }
    setText($('gap-count'), '0');
    setText($('seq-stream'), '');
    setText($('verdict-note'), '');
    $('telemetry-verdict').dataset.verdict = '';
  }

  renderHeader(device, subscription) {
    if (device) {
      setText($('device-name'), device.name);
      document.title = `${device.name} — Tether`;
    }
    let sub = 'subscribing…';
    if (subscription && subscription.state === 'subscribed') sub = 'subscribed';
    else if (subscription && subscription.state === 'failed') sub = 'subscription failed';
    else if (subscription && subscription.state === 'waiting') sub = 'waiting for connection…';
    setText($('device-sub'), sub);
  }

  /** `stale`: the relay link is down, so the presence shown is only the last known one. */
  renderBadge(online, stale = false) {
    const b = $('device-badge');
    setText(b, online === true ? 'online' : online === false ? 'offline' : '…');
    b.className = `badge ${online === true ? 'badge-online' : online === false ? 'badge-offline' : ''}`;
    b.dataset.online = online == null ? '' : String(online);
    b.classList.toggle('stale', stale);
    b.title = stale ? 'Last known state: the connection to the relay is down' : '';
  }

  /** Renders the tiles and tables from a DeviceTelemetry. */
  renderTelemetry(tel, now = performance.now()) {
    const last = tel.last;
    if (last) {
      setText($('telemetry-seq'), last.seq ?? DASH);
      setText($('seq-stream'), tel.streams.size > 1 ? last.stream : '');
      const v = $('telemetry-verdict');
      setText(v, last.verdict);
      v.dataset.verdict = last.verdict;
      setText($('verdict-note'), last.verdict === 'gap' && last.missing != null ? `${last.missing} missing` : '');
      const age = $('telemetry-age');
      setText(age, formatMs(last.ageMs));
      age.dataset.level = last.ageMs == null ? '' : last.ageMs > 5000 ? 'bad' : last.ageMs > 1000 ? 'warn' : 'ok';
      setText($('clock-offset'), formatOffset(last.clockOffsetMs, last.clockUncertaintyMs));
      const lf = $('last-frame');
      setText(lf, agoShort(now - last.at));
      lf.dataset.level = now - last.at > 5000 ? 'bad' : now - last.at > 2000 ? 'warn' : 'ok';
    }
    const totals = tel.totals();
    setText($('gap-count'), totals.gap);
    $('gap-count').dataset.level = totals.gap > 0 ? 'warn' : 'ok';
    setText($('lost-total'), totals.lostTotal ?? DASH);
    setText($('fps'), tel.liveFrames || last ? formatRate(tel.rate(now)) : DASH);

    this._renderValues(tel, now);
    this._renderStreams(tel, now);
  }

  _renderValues(tel, now) {
    const body = $('telemetry-body');
    for (const [key, entry] of tel.values) {
      let r = this.valueRows.get(key);
      if (!r) {
        const value = h('td', { class: 'num mono' });
        const updated = h('td', { class: 'num muted' });
        const tr = h('tr', { dataset: { key } }, h('th', { scope: 'row', class: 'key', text: key }), value, updated);
        body.append(tr);
        r = { tr, value, updated };
        this.valueRows.set(key, r);
      }
      setText(r.value, formatValue(entry.value, key));
      setText(r.updated, entry.replay ? 'replayed' : agoShort(now - entry.at));
      const stale = entry.replay || now - entry.at > STALE_MS;
      if (r.tr.classList.contains('stale') !== stale) r.tr.classList.toggle('stale', stale);
    }
    $('telemetry-empty').hidden = tel.values.size > 0;
  }

  _renderStreams(tel, now) {
    const body = $('stream-body');
    for (const [name, s] of tel.streams) {
      let r = this.streamRows.get(name);
      if (!r) {
        const cells = {};
        const tr = h('tr', { dataset: { stream: name } }, h('th', { scope: 'row', text: name }));
        for (const c of ['seq', 'ok', 'gap', 'duplicate', 'reordered', 'reset', 'lost', 'rate']) {
          cells[c] = h('td', { class: `num mono c-${c}`, 'data-testid': `stream-${c}` });
          tr.append(cells[c]);
        }
        body.append(tr);
        r = { tr, cells };
        this.streamRows.set(name, r);
      }
      const c = r.cells;
      setText(c.seq, s.lastSeq ?? DASH);
      c.seq.title = s.epoch ? `epoch ${s.epoch}` : '';
      for (const v of ['ok', 'gap', 'duplicate', 'reordered', 'reset']) {
        setText(c[v], s.counts[v]);
        c[v].dataset.nonzero = String(v !== 'ok' && s.counts[v] > 0);
      }
      setText(c.gap, s.missing ? `${s.counts.gap} (${s.missing})` : s.counts.gap);
      c.gap.title = s.missing ? `${s.counts.gap} gaps, ${s.missing} frames missing in them` : '';
      setText(c.lost, s.lostTotal ?? DASH);
      setText(c.rate, formatRate(tel.rate(now, name)));
    }
  }
}

/** One line of text describing a non-ok (or replayed) telemetry frame for the log. */
export function describeFrame(info) {
  const seq = info.seq == null ? '#?' : `#${formatNumber(info.seq)}`;
  let what = `${info.stream} ${seq}`;
  if (info.verdict === 'gap') what += info.missing != null ? ` — ${info.missing} frame${info.missing === 1 ? '' : 's'} missing` : ' — frames missing';
  else if (info.verdict === 'duplicate') what += ' — already received';
  else if (info.verdict === 'reordered') what += ' — arrived late, out of order';
  else if (info.verdict === 'reset') what += ` — counters restarted${info.epoch ? ` (epoch ${info.epoch})` : ''}`;
  if (info.lostTotal != null && info.verdict !== 'ok') what += `; relay lostTotal ${info.lostTotal}`;
  if (info.backfill) what += '; backfilled by the device';
  return what;
}
