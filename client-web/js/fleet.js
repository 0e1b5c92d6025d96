// The fleet screen: every device of the organisation with presence, last seen, link quality,
// battery and alerts, searchable and sortable; and, for admins, the onboarding requests
// waiting for approval.

import { $, h } from './views.js';
import { fullDate, relativeTime } from './format.js';

const SORTS = {
  status: (a, b) => Number(b.online) - Number(a.online) || byName(a, b),
  name: (a, b) => byName(a, b),
  lastSeen: (a, b) => lastSeenKey(b) - lastSeenKey(a) || byName(a, b),
  battery: (a, b) => (a.battery ?? 101) - (b.battery ?? 101) || byName(a, b),
  alerts: (a, b) => b.alerts.length - a.alerts.length || Number(b.online) - Number(a.online) || byName(a, b),
};
const SORT_STORAGE = 'tether.fleetSort';

function byName(a, b) {
  return a.name.localeCompare(b.name) || a.id.localeCompare(b.id);
}

/** Online devices count as seen now. */
function lastSeenKey(d) {
  return d.online ? Number.MAX_SAFE_INTEGER : d.lastSeen ?? 0;
}

function setText(el, text) {
  const t = String(text);
  if (el.textContent !== t) el.textContent = t;
}

/** The link figure shown in a row: quality and round trip. */
function linkText(d) {
  if (!d.online) return { text: '—', level: 'off', title: 'Offline' };
  const l = d.link;
  if (!l) return { text: 'online', level: '', title: 'The relay has not measured this link yet' };
  const rtt = l.rttMs == null ? '' : ` · ${Math.round(l.rttMs)} ms`;
  const quiet = l.lastMessageMs == null ? '' : `; last message ${(l.lastMessageMs / 1000).toFixed(1)} s ago`;
  return {
    text: `${l.quality ?? '?'}${rtt}`,
    level: l.quality ?? '',
    title: `Link quality as the relay sees it: round trip ${l.rttMs == null ? 'not measured' : `${Math.round(l.rttMs)} ms`}${quiet}`,
  };
}

export class FleetView {
  /** @param {(id: string) => void} onOpen */
  constructor(onOpen) {
    this.list = $('device-list');
    this.rows = new Map(); // device id -> row elements
    this.devices = [];
    this.query = '';
    this.sort = 'status';
    try {
      const saved = localStorage.getItem(SORT_STORAGE);
      if (saved && SORTS[saved]) this.sort = saved;
    } catch {
      /* storage off: default sort */
    }
    $('fleet-sort').value = this.sort;
    this.list.addEventListener('click', (e) => {
      const row = e.target instanceof Element ? e.target.closest('[data-device-id]') : null;
      if (row) onOpen(row.dataset.deviceId);
    });
    $('fleet-search').addEventListener('input', (e) => {
      this.query = e.target.value.trim().toLowerCase();
      this.render(this.devices);
    });
    $('fleet-sort').addEventListener('change', (e) => {
      if (!SORTS[e.target.value]) return;
      this.sort = e.target.value;
      try {
        localStorage.setItem(SORT_STORAGE, this.sort);
      } catch {
        /* not remembered */
      }
      this.render(this.devices);
    });
  }

  _row(id) {
    let r = this.rows.get(id);
    if (r) return r;
    const badge = h('span', { class: 'badge' });
    const name = h('span', { class: 'device-name' });
    const code = h('code', { class: 'device-id', text: id });
    const who = h('span', { class: 'device-who' }, name, code);
    const link = h('span', { class: 'device-link', 'data-testid': 'device-link' });
    const batteryBar = h('span', { class: 'battery-bar' });
    const batteryText = h('span', { class: 'battery-text' });
    const battery = h('span', { class: 'device-battery', 'data-testid': 'device-battery' }, h('span', { class: 'battery-box' }, batteryBar), batteryText);
    const alerts = h('span', { class: 'device-alerts', 'data-testid': 'device-alerts' });
    const seen = h('span', { class: 'device-seen', 'data-testid': 'device-seen' });
    const button = h('button', { type: 'button', class: 'device-row', 'data-testid': 'device-row', dataset: { deviceId: id } },
      badge, who, link, battery, alerts, seen, h('span', { class: 'chevron', 'aria-hidden': 'true', text: '›' }));
    const li = h('li', {}, button);
    r = { li, button, badge, name, link, battery, batteryBar, batteryText, alerts, seen };
    this.rows.set(id, r);
    return r;
  }

  _matches(d) {
    if (!this.query) return true;
    const hay = [d.name, d.id, d.online ? 'online' : 'offline', ...d.alerts.map((a) => `${a.code} ${a.message}`)].join(' ').toLowerCase();
    return this.query.split(/\s+/).every((w) => hay.includes(w));
  }

  render(devices, now = Date.now()) {
    this.devices = devices;
    const shown = devices.filter((d) => this._matches(d)).sort(SORTS[this.sort]);
    const keep = new Set(shown.map((d) => d.id));
    for (const [id, r] of this.rows) {
      if (!keep.has(id)) {
        r.li.remove();
        this.rows.delete(id);
      }
    }
    shown.forEach((d, i) => {
      const r = this._row(d.id);
      setText(r.name, d.name);
      setText(r.badge, d.online ? 'online' : 'offline');
      r.badge.className = `badge ${d.online ? 'badge-online' : 'badge-offline'}`;
      r.button.dataset.online = String(d.online);
      r.button.dataset.alerts = String(d.alerts.length);
      r.button.setAttribute('aria-label', `${d.name}, ${d.online ? 'online' : 'offline'}${d.alerts.length ? `, ${d.alerts.length} alert${d.alerts.length === 1 ? '' : 's'}` : ''}`);

      const link = linkText(d);
      setText(r.link, link.text);
      r.link.dataset.level = link.level;
      r.link.title = link.title;

      const pct = d.battery;
      r.battery.dataset.level = pct == null ? '' : pct < 20 ? 'bad' : pct < 40 ? 'warn' : 'ok';
      r.battery.dataset.percent = pct == null ? '' : String(pct);
      r.batteryBar.style.width = pct == null ? '0' : `${Math.max(0, Math.min(100, pct))}%`;
      setText(r.batteryText, pct == null ? '—' : `${Math.round(pct)} %`);
      r.battery.title = pct == null ? 'No battery reading since the relay started' : `Battery ${pct.toFixed(1)} % (latest telemetry)`;

      const alertKey = d.alerts.map((a) => `${a.code}|${a.message}`).join('\n');
      if (r.alerts.dataset.key !== alertKey) {
        r.alerts.dataset.key = alertKey;
        r.alerts.replaceChildren(
          ...d.alerts.map((a) => h('span', { class: `alert-chip alert-${a.code}`, title: a.message, text: a.code.replace(/_/g, ' ') })),
        );
        if (!d.alerts.length) r.alerts.append(h('span', { class: 'muted', text: 'none' }));
      }

      setText(r.seen, d.online ? 'connected now' : d.lastSeen == null ? 'never seen' : `last seen ${relativeTime(d.lastSeen, now)}`);
      r.seen.title = fullDate(d.lastSeen);
      // Only move nodes that are out of place: moving a focused element would blur it.
      if (this.list.children[i] !== r.li) this.list.insertBefore(r.li, this.list.children[i] ?? null);
    });
    $('fleet-empty').hidden = devices.length !== 0;
    $('fleet-no-match').hidden = devices.length === 0 || shown.length !== 0;
  }

  setError(message) {
    const el = $('fleet-error');
    el.hidden = !message;
    setText(el, message || '');
  }

  setMeta(text) {
    setText($('fleet-meta'), text);
  }
}

/**
 * The onboarding requests waiting for an admin: approve (optionally choosing the device id and
 * name) or reject. `actions` = {approve(requestID, {deviceID, name}), reject(requestID)},
 * both returning promises; failures are shown in the request's row.
 */
export class PendingList {
  constructor(actions) {
    this.actions = actions;
    this.panel = $('pending-panel');
    this.list = $('pending-list');
    this.rows = new Map();
    this.enabled = false;
  }

  /** Only admins see the list. */
  setEnabled(enabled) {
    this.enabled = enabled;
    if (!enabled) this.render([]);
  }

  render(requests, now = Date.now()) {
    const keep = new Set(requests.map((r) => r.requestID));
    for (const [id, row] of this.rows) {
      if (!keep.has(id) && !row.busy) {
        row.li.remove();
        this.rows.delete(id);
      }
    }
    for (const req of requests) {
      let row = this.rows.get(req.requestID);
      if (!row) {
        row = this._row(req);
        this.rows.set(req.requestID, row);
        this.list.append(row.li);
      }
      setText(row.when, `asked ${relativeTime(req.createdAt ?? now, now)}${req.remoteAddr ? ` from ${req.remoteAddr}` : ''}`);
    }
    this._refreshCount();
  }

  _refreshCount() {
    const count = this.rows.size;
    this.panel.hidden = !this.enabled || count === 0;
    setText($('pending-count'), count ? String(count) : '');
  }

  _row(req) {
    const suggested = String(req.name || '').toLowerCase().replace(/[^a-z0-9_.-]+/g, '-').replace(/^-+|-+$/g, '').slice(0, 64);
    const idInput = h('input', { type: 'text', class: 'pending-id', 'data-testid': 'pending-device-id', placeholder: 'dev-… (automatic)',
      value: suggested, 'aria-label': `Device id for ${req.name}`, spellcheck: 'false', autocomplete: 'off' });
    const nameInput = h('input', { type: 'text', class: 'pending-name', 'data-testid': 'pending-device-name', value: req.name || '',
      'aria-label': `Display name for ${req.name}`, autocomplete: 'off' });
    const approve = h('button', { type: 'button', class: 'btn btn-small btn-primary', 'data-testid': 'pending-approve', text: 'Approve' });
    const reject = h('button', { type: 'button', class: 'btn btn-small', 'data-testid': 'pending-reject', text: 'Reject' });
    const status = h('span', { class: 'pending-status small', 'data-testid': 'pending-status', role: 'status' });
    const when = h('span', { class: 'muted small' });
    const li = h('li', { class: 'pending-row', 'data-testid': 'pending-row', dataset: { requestId: req.requestID } },
      h('div', { class: 'pending-who' }, h('strong', { text: req.name || '(no name)' }), h('code', { class: 'muted small', text: req.requestID }), when),
      h('label', { class: 'small' }, 'Device id ', idInput),
      h('label', { class: 'small' }, 'Name ', nameInput),
      approve, reject, status);
    const row = { li, when, busy: false };
    const run = async (what, fn) => {
      row.busy = true;
      approve.disabled = reject.disabled = true;
      setText(status, what === 'approve' ? 'approving…' : 'rejecting…');
      status.dataset.state = 'busy';
      try {
        const res = await fn();
        li.dataset.state = res.status ?? what;
        setText(status, what === 'approve' ? `approved as ${res.clientID ?? idInput.value}; the device connects on its own` : 'rejected');
        status.dataset.state = 'done';
        setTimeout(() => {
          row.busy = false;
          li.remove();
          this.rows.delete(req.requestID);
          this._refreshCount();
        }, 4000);
      } catch (e) {
        row.busy = false;
        approve.disabled = reject.disabled = false;
        setText(status, `${e.message}${e.code ? ` (${e.code})` : ''}`);
        status.dataset.state = 'error';
      }
    };
    approve.addEventListener('click', () => run('approve', () => this.actions.approve(req.requestID, { deviceID: idInput.value.trim(), name: nameInput.value.trim() })));
    reject.addEventListener('click', () => run('reject', () => this.actions.reject(req.requestID)));
    return row;
  }
}
