// The admin screen: devices and registrations, operators, API keys, handshake keys,
// permissions, the deny list and the audit log (docs/api.md sections 4-10), one tab each.
//
// Every tab loads through ctx.api and shows a loading, empty or error state; the relay's error
// code and sentence are shown inline (data-testid="admin-error"). Destructive actions ask for an
// inline confirmation (an editor row under the table row, button "admin-confirm"); results are
// shown inline ("admin-result"). Secrets the relay returns once (device secrets, API keys,
// handshake keys) are shown once ("admin-secret") and dropped from the page when the tab is left.
// Text always goes through textContent: names, labels and reasons are data.

import { DASH, fullDate, relativeTime } from './format.js';

/** The admin tabs, in tab-bar order; `#/admin/<tab>`. */
export const ADMIN_TABS = ['devices', 'operators', 'keys', 'handshake', 'permissions', 'deny', 'audit'];

const TAB_TITLES = {
  devices: 'Devices',
  operators: 'Operators',
  keys: 'API keys',
  handshake: 'Handshake keys',
  permissions: 'Permissions',
  deny: 'Deny list',
  audit: 'Audit log',
};

const LEVELS = ['view', 'control', 'admin'];
const AUDIT_PAGE = 100;
const DENY_KINDS = [
  { value: 'operator', label: 'Operator (op-…)', prefix: '', placeholder: 'op-4c9e812991ee or a username' },
  { value: 'device', label: 'Device', prefix: '', placeholder: 'device id, e.g. boat-1' },
  { value: 'key', label: 'API key', prefix: 'key:', placeholder: 'key id (or a whole tk_ key: only its id is sent)' },
  { value: 'ip', label: 'IP address', prefix: 'ip:', placeholder: '10.0.0.7' },
  { value: 'session', label: 'Login session', prefix: 'session:', placeholder: 'sha256 hex of the session token' },
  { value: 'ticket', label: 'WebSocket ticket', prefix: 'ticket:', placeholder: 'sha256 hex of the ticket' },
];

/** A problem with the form's input, found before asking the relay. */
class Invalid extends Error {
  constructor(message, field = null) {
    super(message);
    this.name = 'Invalid';
    this.code = null;
    this.field = field;
  }
}

const isNum = (x) => typeof x === 'number' && Number.isFinite(x);
const plural = (n, one, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;
const str = (x) => (typeof x === 'string' ? x : x == null ? '' : String(x));

/**
 * Reads a duration typed by a person: "3600" (seconds), "90s", "15m", "2h", "7d", "1w",
 * "1h30m". Returns whole seconds (> 0), or null for an empty input; throws Invalid otherwise.
 */
export function parseDuration(text, field = null) {
  const t = str(text).trim().toLowerCase();
  if (!t) return null;
  let secs;
  if (/^\d+(\.\d+)?$/.test(t)) {
    secs = Number(t);
  } else if (/^(\s*\d+(\.\d+)?\s*[smhdw])+\s*$/.test(t)) {
    const unit = { s: 1, m: 60, h: 3600, d: 86400, w: 604800 };
    secs = 0;
    for (const m of t.matchAll(/(\d+(?:\.\d+)?)\s*([smhdw])/g)) secs += Number(m[1]) * unit[m[2]];
  } else {
    throw new Invalid(`"${text}" is not a duration: write e.g. 3600, 90s, 15m, 2h or 7d.`, field);
  }
  secs = Math.round(secs);
  if (!(secs > 0)) throw new Invalid('A duration must be longer than zero.', field);
  if (secs > 10 * 365 * 86400) throw new Invalid('That duration is longer than ten years.', field);
  return secs;
}

/** "45 s", "15 min", "2 h", "7 d". */
export function spanText(secs) {
  if (!isNum(secs)) return DASH;
  const s = Math.max(0, Math.round(secs));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${Math.round(s / 360) / 10} h`;
  return `${Math.round(s / 8640) / 10} d`;
}

/** "in 3 h", "expired 5 min ago", or `none` when there is no time. */
function untilText(ms, none = 'never', now = Date.now()) {
  if (!isNum(ms)) return none;
  const s = (ms - now) / 1000;
  return s <= 0 ? `expired ${relativeTime(ms, now)}` : `in ${spanText(s)}`;
}

/** Compact JSON for the audit log's detail column; "—" for nothing. */
function compactJson(v) {
  if (v === null || v === undefined) return DASH;
  if (typeof v === 'object' && !Array.isArray(v) && Object.keys(v).length === 0) return DASH;
  try {
    return JSON.stringify(v);
  } catch {
    return '?';
  }
}

/** A YAML scalar for config snippets: JSON strings are valid YAML double-quoted scalars. */
const yaml = (s) => JSON.stringify(str(s));

/** The relay's device endpoint as the browser sees it: what an agent's serverAddress needs. */
function deviceEndpoint() {
  return `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
}

/** `{code, message}` of any failure: the relay's ApiError, a form problem, anything else. */
function describeError(e) {
  if (e && typeof e === 'object') {
    const code = typeof e.code === 'string' && e.code ? e.code : null;
    const message = typeof e.message === 'string' && e.message ? e.message : 'Something went wrong.';
    return { code, message };
  }
  return { code: null, message: str(e) || 'Something went wrong.' };
}

/** Path segments are used as written by the relay (no percent-decoding): refuse what would not route. */
function seg(id) {
  const s = str(id);
  if (!s || /[/?#%\s]/.test(s)) throw new Invalid(`"${s}" cannot be addressed over the API (it contains /, ?, #, % or a space).`);
  return s;
}

/** Copies text to the clipboard; falls back to selecting `el` and the legacy copy command. */
async function copyText(text, el) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // No clipboard API (plain http on another host) or no permission: try the old way.
  }
  try {
    const range = document.createRange();
    range.selectNodeContents(el);
    const sel = getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    return document.execCommand('copy');
  } catch {
    return false;
  }
}

/**
 * The admin screen. Created once by the app with the screen's empty root section; the app calls
 * `show(tab)` for `#/admin` and `#/admin/<tab>`, `hide()` when another screen is shown, and
 * forwards live messages to `onMessage`.
 */
export class AdminScreen {
  /**
   * @param {HTMLElement} root the empty `<section id="admin-screen">`
   * @param {object} ctx the console's panel context (uses h, me, api, toast)
   */
  constructor(root, ctx) {
    this.root = root;
    this.ctx = ctx;
    this.h = ctx.h;
    this.tab = null;
    this.visible = false;
    this.gen = 0;
    this.view = null;
    this.timers = new Set();
    /** operator id -> username, from the last operator list seen (for names in other tabs). */
    this.opNames = new Map();
    /** device id -> group set from this console (GET /api/devices may not report groups). */
    this.groups = new Map();

    const h = this.h;
    root.classList.add('admin-screen');
    root.dataset.state = 'idle';
    this.tabButtons = new Map();
    this.bar = h('div', { class: 'admin-tabs', role: 'tablist', 'aria-label': 'Admin sections' });
    for (const t of ADMIN_TABS) {
      const b = h('button', {
        type: 'button', class: 'admin-tab', role: 'tab', id: `admin-tabbtn-${t}`, 'data-testid': `admin-tab-${t}`,
        'aria-selected': 'false', 'aria-controls': 'admin-body', tabindex: '-1', dataset: { tab: t }, text: TAB_TITLES[t],
      });
      b.addEventListener('click', () => this._go(t));
      this.bar.append(b);
      this.tabButtons.set(t, b);
    }
    this.bar.addEventListener('keydown', (e) => this._onTabKey(e));
    this.orgNote = h('span', { class: 'muted', 'data-testid': 'admin-org' });
    this.forbidden = h('p', {
      class: 'inline-error admin-forbidden', 'data-testid': 'admin-forbidden', role: 'alert', hidden: true,
      text: 'This screen needs the admin role. Ask an admin of your organisation if you need access.',
    });
    this.body = h('div', { id: 'admin-body', class: 'admin-body', role: 'tabpanel' });
    root.append(h('div', { class: 'section-head admin-head' }, h('h2', { text: 'Admin' }), this.orgNote), this.forbidden, this.bar, this.body);
  }

  /**
   * Shows a tab (`devices` when `tab` is missing or unknown). Showing the tab already shown
   * does nothing (use the tab's Refresh buttons to reload).
   * @param {string} [tab]
   */
  show(tab) {
    const t = ADMIN_TABS.includes(tab) ? tab : 'devices';
    const me = this.ctx.me || {};
    if (me.role !== 'admin') {
      this._teardown();
      this.visible = true;
      this.tab = null;
      this.forbidden.hidden = false;
      this.bar.hidden = true;
      this.orgNote.textContent = '';
      this.root.dataset.state = 'forbidden';
      delete this.root.dataset.tab;
      document.title = 'Admin — Tether';
      return;
    }
    this.forbidden.hidden = true;
    this.bar.hidden = false;
    if (this.visible && this.tab === t && this.view) return;
    this._teardown();
    this.visible = true;
    this.tab = t;
    this.root.dataset.state = 'ready';
    this.root.dataset.tab = t;
    this.orgNote.textContent = `organisation ${str(me.org) || '?'}`;
    document.title = `${TAB_TITLES[t]} · Admin — Tether`;
    for (const [name, b] of this.tabButtons) {
      const on = name === t;
      b.setAttribute('aria-selected', String(on));
      b.tabIndex = on ? 0 : -1;
      b.classList.toggle('active', on);
    }
    this.body.setAttribute('aria-labelledby', `admin-tabbtn-${t}`);
    const v = { gen: this.gen, tab: t, editor: null, lists: {}, msg: this.h('div', { class: 'admin-msg', 'data-testid': 'admin-msg' }) };
    this.view = v;
    this[`_tab_${t}`](v);
  }

  /** Leaves the screen: pending answers are ignored, timers stop, shown secrets are dropped. */
  hide() {
    this._teardown();
    this.visible = false;
    this.tab = null;
    this.root.dataset.state = 'idle';
  }

  /**
   * Live messages from the relay. Registration events refresh the devices tab's lists; nothing
   * is consumed (the fleet's pending list wants them too).
   * @returns {boolean}
   */
  onMessage(msg) {
    const type = msg && msg.type;
    if (type !== 'registration_requested' && type !== 'registration_decided') return false;
    const v = this.view;
    if (!v || !this.visible || v.tab !== 'devices') return false;
    clearTimeout(v.regTimer);
    this.timers.delete(v.regTimer);
    v.regTimer = this._later(() => {
      if (!this._alive(v)) return;
      v.lists.registrations?.reload({ background: true });
      if (type === 'registration_decided') v.lists.devices?.reload({ background: true });
    }, 250);
    return false;
  }

  // ---- plumbing -------------------------------------------------------------------------

  _go(tab) {
    const hash = `#/admin/${tab}`;
    if (location.hash !== hash) location.hash = hash;
    else this.show(tab);
  }

  _onTabKey(e) {
    const i = ADMIN_TABS.indexOf(e.target?.dataset?.tab);
    if (i < 0) return;
    let j = null;
    if (e.key === 'ArrowRight') j = (i + 1) % ADMIN_TABS.length;
    else if (e.key === 'ArrowLeft') j = (i - 1 + ADMIN_TABS.length) % ADMIN_TABS.length;
    else if (e.key === 'Home') j = 0;
    else if (e.key === 'End') j = ADMIN_TABS.length - 1;
    if (j === null) return;
    e.preventDefault();
    this.tabButtons.get(ADMIN_TABS[j]).focus();
    this._go(ADMIN_TABS[j]);
  }

  _teardown() {
    this.gen += 1;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    this.view = null;
    // Secrets shown once leave the page with the tab.
    this.body.replaceChildren();
  }

  _alive(v) {
    return this.visible && this.view === v && v.gen === this.gen;
  }

  _later(fn, ms) {
    const t = setTimeout(() => {
      this.timers.delete(t);
      fn();
    }, ms);
    this.timers.add(t);
    return t;
  }

  _api(path, opts) {
    return this.ctx.api(path, opts);
  }

  async _operators() {
    const json = await this._api('/api/operators');
    const list = Array.isArray(json.operators) ? json.operators.filter((o) => o && typeof o.id === 'string') : [];
    for (const o of list) this.opNames.set(o.id, str(o.username) || o.id);
    return list;
  }

  async _devices() {
    const json = await this._api('/api/devices');
    return Array.isArray(json.devices) ? json.devices.filter((d) => d && typeof d.id === 'string') : [];
  }

  /** "ana" for a known operator id, else the id itself. */
  _opName(id) {
    return this.opNames.get(id) || str(id);
  }

  // ---- building blocks -------------------------------------------------------------------

  /** An inline error: what failed, the relay's code and its sentence. */
  _errorBox(err, what = null) {
    const h = this.h;
    const { code, message } = describeError(err);
    return h('p', { class: 'inline-error admin-error', 'data-testid': 'admin-error', role: 'alert', dataset: { code: code || 'invalid' } },
      what ? h('span', { text: `${what}: ` }) : null,
      code ? h('code', { class: 'admin-code', text: code }) : null,
      code ? ' ' : null,
      h('span', { class: 'admin-error-message', text: message }));
  }

  /** Shows a failure in the tab's message area. */
  _fail(v, err, what) {
    if (!this._alive(v)) return;
    v.msg.replaceChildren(this._errorBox(err, what));
  }

  /** Shows a result in the tab's message area (replacing any earlier result or error). */
  _result(v, ...children) {
    if (!this._alive(v)) return null;
    const h = this.h;
    const dismiss = h('button', { type: 'button', class: 'btn btn-small btn-quiet admin-dismiss', 'data-testid': 'admin-dismiss', text: 'Dismiss' });
    const box = h('div', { class: 'admin-result', 'data-testid': 'admin-result', role: 'status' }, h('div', { class: 'admin-result-body' }, ...children), dismiss);
    dismiss.addEventListener('click', () => box.remove());
    v.msg.replaceChildren(box);
    return box;
  }

  /** A value shown once with a copy button. */
  _copyLine(value, testid, label) {
    const h = this.h;
    const code = h(testid === 'admin-snippet' ? 'pre' : 'code', { class: 'mono admin-secret-value', 'data-testid': testid, text: value });
    const btn = h('button', { type: 'button', class: 'btn btn-small', 'data-testid': `${testid === 'admin-secret' ? 'admin-copy' : 'admin-copy-snippet'}`, text: 'Copy', 'aria-label': `Copy ${label}` });
    btn.addEventListener('click', async () => {
      const ok = await copyText(value, code);
      btn.textContent = ok ? 'Copied' : 'Copy failed: select it and copy by hand';
      this._later(() => { btn.textContent = 'Copy'; }, 2500);
    });
    return h('div', { class: 'admin-copy-line' }, code, btn);
  }

  /** A secret shown once: warning, value with copy, optional config snippet. */
  _secretResult(v, { title, lines = [], secret, secretLabel, snippet = null, snippetLabel = null }) {
    const h = this.h;
    const box = this._result(v,
      h('strong', { text: title }),
      ...lines.map((l) => h('p', { class: 'admin-result-line', text: l })),
      h('p', { class: 'admin-warning', 'data-testid': 'admin-secret-warning', role: 'note' },
        h('strong', { text: 'Copy it now: ' }),
        `the ${secretLabel} is shown only this once. The relay keeps only a hash; leaving this tab clears it from the page.`),
      h('div', { class: 'admin-secret-label small muted', text: secretLabel }),
      this._copyLine(secret, 'admin-secret', secretLabel),
      snippet ? h('div', { class: 'admin-secret-label small muted', text: snippetLabel }) : null,
      snippet ? this._copyLine(snippet, 'admin-snippet', snippetLabel) : null);
    if (box) box.classList.add('admin-result-secret');
    return box;
  }

  /** An input or select with a testid, from a field description. */
  _input(f, testid) {
    const h = this.h;
    if (f.type === 'select') {
      const sel = h('select', { id: testid, name: f.name, 'data-testid': testid });
      for (const o of f.options || []) sel.append(h('option', { value: o.value, text: o.label }));
      if (f.value !== undefined) sel.value = f.value;
      return sel;
    }
    return h('input', {
      id: testid, name: f.name, 'data-testid': testid, type: f.type || 'text', placeholder: f.placeholder,
      autocomplete: f.autocomplete || 'off', spellcheck: 'false', autocapitalize: 'off', required: f.required,
      min: f.min, step: f.step, list: f.list, value: f.value, inputmode: f.inputmode,
      'aria-describedby': f.hint ? `${testid}-hint` : null,
    });
  }

  /**
   * A creation form in a card. `onSubmit(values)` may throw (Invalid or ApiError): the error is
   * shown in the tab's message area and the field named by `err.field` gets the focus.
   */
  _form(v, tab, { title, note = null, fields, submit, onSubmit }) {
    const h = this.h;
    const inputs = {};
    const rows = fields.map((f) => {
      const id = `admin-${tab}-${f.name}`;
      const inp = this._input(f, id);
      inputs[f.name] = inp;
      return h('div', { class: `admin-field${f.wide ? ' wide' : ''}` },
        h('label', { for: id, text: f.label }, f.required || f.type === 'select' ? null : h('span', { class: 'muted small', text: ' optional' })),
        inp,
        f.hint ? h('span', { class: 'hint', id: `${id}-hint`, text: f.hint }) : null);
    });
    const button = h('button', { type: 'submit', class: 'btn btn-primary', 'data-testid': `admin-${tab}-create`, text: submit });
    const form = h('form', { class: 'admin-form', novalidate: true, 'aria-label': title }, ...rows, h('div', { class: 'admin-form-actions' }, button));
    const card = h('section', { class: 'panel admin-card' }, h('h3', { text: title }), note ? h('p', { class: 'hint', text: note }) : null, form);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      if (button.disabled) return;
      const values = {};
      for (const [k, el] of Object.entries(inputs)) values[k] = el.type === 'password' ? el.value : el.value.trim();
      button.disabled = true;
      form.setAttribute('aria-busy', 'true');
      v.msg.replaceChildren();
      try {
        await onSubmit(values, { form, inputs, card });
      } catch (err) {
        if (!this._alive(v)) return;
        this._fail(v, err, `${title} failed`);
        if (err && err.field && inputs[err.field]) inputs[err.field].focus();
      } finally {
        button.disabled = false;
        form.removeAttribute('aria-busy');
      }
    });
    return { card, form, inputs, button };
  }

  /**
   * A table with loading, empty and error states. `load()` returns the items, `row(item)` a
   * `<tr>`; `filter(item)` (optional, set later) hides rows.
   */
  _list(v, { name, title, columns, load, row, empty, toolbar = [], footer = null }) {
    const h = this.h;
    const tbody = h('tbody');
    const table = h('table', { class: 'admin-table', 'data-testid': `admin-table-${name}`, 'data-state': 'loading', 'aria-busy': 'true' },
      h('caption', { class: 'admin-sr', text: title }),
      h('thead', {}, h('tr', {}, ...columns.map((c) => h('th', { scope: 'col', class: c.cls || null, text: c.label })))),
      tbody);
    const status = h('div', { class: 'admin-list-status' });
    const count = h('span', { class: 'admin-count muted small', 'data-testid': `admin-count-${name}` });
    const refresh = h('button', { type: 'button', class: 'btn btn-small btn-quiet', 'data-testid': `admin-refresh-${name}`, text: 'Refresh' });
    const el = h('section', { class: 'panel admin-list', 'aria-label': title },
      h('div', { class: 'admin-list-head' }, h('h3', { text: title }), count, h('span', { class: 'spacer' }), ...toolbar, refresh),
      h('div', { class: 'table-wrap' }, table),
      status,
      footer);
    const list = { name, el, table, tbody, status, items: [], loaded: false, seq: 0, columns: columns.length, filter: null, deferred: false };

    list.render = () => {
      if (v.editor && v.editor.list === list) v.editor.close(false);
      const rows = list.items.map((it) => row(it));
      let shown = 0;
      list.items.forEach((it, i) => {
        const visible = !list.filter || list.filter(it);
        rows[i].hidden = !visible;
        if (visible) shown += 1;
      });
      tbody.replaceChildren(...rows);
      count.textContent = list.filter && shown !== list.items.length ? `${shown} of ${list.items.length}` : String(list.items.length);
      table.dataset.count = String(list.items.length);
      if (list.items.length === 0) status.replaceChildren(h('p', { class: 'muted admin-empty', 'data-testid': 'admin-empty', text: empty }));
      else if (shown === 0) status.replaceChildren(h('p', { class: 'muted admin-empty', 'data-testid': 'admin-empty', text: 'Nothing matches the filter.' }));
      else status.replaceChildren();
    };

    /** `background`: a refresh nobody asked for; it waits while an editor is open in this list. */
    list.reload = async ({ background = false } = {}) => {
      if (!this._alive(v)) return;
      if (background && v.editor && v.editor.list === list) {
        list.deferred = true;
        return;
      }
      const my = ++list.seq;
      table.dataset.state = 'loading';
      table.setAttribute('aria-busy', 'true');
      refresh.disabled = true;
      if (!list.loaded) {
        status.replaceChildren(h('p', { class: 'muted admin-loading', 'data-testid': 'admin-loading', text: 'Loading…' }));
      }
      try {
        const items = await load();
        if (!this._alive(v) || my !== list.seq) return;
        list.items = items;
        list.loaded = true;
        list.render();
        table.dataset.state = 'ready';
      } catch (err) {
        if (!this._alive(v) || my !== list.seq) return;
        table.dataset.state = 'error';
        const retry = h('button', { type: 'button', class: 'btn btn-small', 'data-testid': 'admin-retry', text: 'Try again' });
        retry.addEventListener('click', () => list.reload());
        status.replaceChildren(h('div', { class: 'admin-load-error' }, this._errorBox(err, `Could not load the ${title.toLowerCase()}`), retry));
      } finally {
        if (this._alive(v) && my === list.seq) {
          refresh.disabled = false;
          table.removeAttribute('aria-busy');
        }
      }
    };
    refresh.addEventListener('click', () => list.reload());
    v.lists[name] = list;
    return list;
  }

  /** A table row with the testid and id the tests look for. */
  _row(id, cells, data = {}) {
    return this.h('tr', { 'data-testid': 'admin-row', 'data-id': id, dataset: data }, ...cells);
  }

  _td(text, cls = null, title = null) {
    return this.h('td', { class: cls, title, text: text === null || text === undefined || text === '' ? DASH : str(text) });
  }

  /** A time cell: relative text, the full date on hover. */
  _timeTd(ms, none = 'never') {
    const h = this.h;
    if (!isNum(ms)) return h('td', { class: 'muted', text: none });
    return h('td', { class: 'admin-time', title: fullDate(ms) }, h('time', { datetime: new Date(ms).toISOString(), text: relativeTime(ms) }));
  }

  /** Name over a small id. */
  _nameTd(name, id) {
    const h = this.h;
    return h('td', { class: 'admin-name' }, h('span', { text: str(name) || str(id) }), name && name !== id ? h('code', { class: 'admin-sub mono', text: str(id) }) : null);
  }

  _badge(text, kind = '') {
    return this.h('span', { class: `badge admin-badge${kind ? ` admin-badge-${kind}` : ''}`, text });
  }

  _actionBtn(verb, label, onClick, { danger = false, title = null, disabled = false } = {}) {
    const b = this.h('button', {
      type: 'button', class: `btn btn-small${danger ? ' admin-btn-danger' : ' btn-quiet'}`, 'data-testid': `admin-action-${verb}`,
      text: label, title, disabled,
    });
    b.addEventListener('click', onClick);
    return b;
  }

  _actionsTd(...buttons) {
    return this.h('td', { class: 'admin-actions' }, ...buttons.filter(Boolean));
  }

  /**
   * An inline editor (a confirmation, optionally with fields) under `anchor`: a table row
   * (inserted as the next row) or any element (inserted after it). `run(values)` does the work;
   * its failure stays shown in the editor. Escape or Cancel closes it.
   */
  _editor(v, anchor, { list = null, text, fields = [], confirm = 'Confirm', danger = true, run }) {
    const h = this.h;
    if (v.editor) v.editor.close(false);
    const inputs = {};
    const fieldEls = fields.map((f) => {
      const id = `admin-edit-${f.name}`;
      const inp = this._input(f, id);
      inputs[f.name] = inp;
      return h('div', { class: 'admin-field' },
        h('label', { for: id, text: f.label }, f.required ? null : h('span', { class: 'muted small', text: ' optional' })),
        inp,
        f.hint ? h('span', { class: 'hint', id: `${id}-hint`, text: f.hint }) : null);
    });
    const err = h('div', { class: 'admin-editor-error' });
    const ok = h('button', { type: 'submit', class: `btn btn-small ${danger ? 'admin-btn-danger' : 'btn-primary'}`, 'data-testid': 'admin-confirm', text: confirm });
    const cancel = h('button', { type: 'button', class: 'btn btn-small btn-quiet', 'data-testid': 'admin-cancel', text: 'Cancel' });
    const form = h('form', { class: `admin-editor${danger ? ' danger' : ''}`, 'data-testid': 'admin-editor', novalidate: true, 'aria-label': confirm },
      h('p', { class: 'admin-editor-text', text }),
      fieldEls.length ? h('div', { class: 'admin-editor-fields' }, ...fieldEls) : null,
      h('div', { class: 'admin-editor-buttons' }, ok, cancel),
      err);
    const isRow = anchor.tagName === 'TR';
    const holder = isRow
      ? h('tr', { class: 'admin-editor-row' }, h('td', { colspan: String(list ? list.columns : 1) }, form))
      : h('div', { class: 'admin-editor-block' }, form);
    anchor.after(holder);
    anchor.classList.add('admin-editing');
    const opener = document.activeElement;
    const ed = {
      list,
      close: (restoreFocus) => {
        if (v.editor !== ed) return;
        v.editor = null;
        holder.remove();
        anchor.classList.remove('admin-editing');
        if (restoreFocus && opener && opener.isConnected) opener.focus();
        if (list && list.deferred && this._alive(v)) {
          list.deferred = false;
          list.reload({ background: true });
        }
      },
    };
    v.editor = ed;
    cancel.addEventListener('click', () => ed.close(true));
    form.addEventListener('keydown', (e) => {
      if (e.key === 'Escape') {
        e.preventDefault();
        ed.close(true);
      }
    });
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      if (ok.disabled) return;
      const values = {};
      for (const [k, el] of Object.entries(inputs)) values[k] = el.type === 'password' ? el.value : el.value.trim();
      ok.disabled = true;
      cancel.disabled = true;
      form.setAttribute('aria-busy', 'true');
      err.replaceChildren();
      v.msg.replaceChildren();
      try {
        await run(values);
        ed.close(false);
        // The row is rebuilt: hand the focus to the result (its Copy or Dismiss button).
        if (this._alive(v)) v.msg.querySelector('button')?.focus();
      } catch (x) {
        if (!this._alive(v) || v.editor !== ed) return;
        err.replaceChildren(this._errorBox(x, `${confirm} failed`));
        (x && x.field && inputs[x.field] ? inputs[x.field] : ok).focus();
      } finally {
        ok.disabled = false;
        cancel.disabled = false;
        form.removeAttribute('aria-busy');
      }
    });
    (fieldEls.length ? Object.values(inputs)[0] : ok).focus();
    return ed;
  }

  /** Lays the tab out: cards on top, the message area, then the lists. */
  _layout(v, cards, lists) {
    const h = this.h;
    this.body.replaceChildren(
      cards.length ? h('div', { class: 'admin-cards' }, ...cards) : '',
      v.msg,
      ...lists.map((l) => l.el));
    for (const l of lists) l.reload();
  }

  /** Fills a `<select>` with operators (keeps the current choice when it is still there). */
  _fillOperatorSelect(sel, ops, { placeholder = 'Choose an operator…', onlyEnabled = true } = {}) {
    const h = this.h;
    const keep = sel.value;
    sel.replaceChildren(h('option', { value: '', text: placeholder }));
    for (const o of ops) {
      if (onlyEnabled && o.disabled) continue;
      sel.append(h('option', { value: o.id, text: `${str(o.username)} (${str(o.role)}${o.disabled ? ', disabled' : ''})` }));
    }
    if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
  }

  // ---- devices ---------------------------------------------------------------------------

  _tab_devices(v) {
    const h = this.h;
    const create = this._form(v, 'devices', {
      title: 'Create a device',
      note: 'Makes a credential for a device you configure by hand. Devices with a handshake key register themselves and appear under registrations.',
      submit: 'Create device',
      fields: [
        { name: 'name', label: 'Name', required: true, placeholder: 'Boat 7' },
        { name: 'id', label: 'Device id', placeholder: 'automatic: dev-…', hint: 'The clientID; it cannot be changed later.' },
        { name: 'group', label: 'Group', placeholder: 'e.g. harbour', hint: 'For group:<name> permissions.' },
      ],
      onSubmit: async (f, { inputs }) => {
        if (!f.name) throw new Invalid('Give the device a name.', 'name');
        if (f.id && /\s/.test(f.id)) throw new Invalid('A device id cannot contain spaces.', 'id');
        const body = { name: f.name };
        if (f.id) body.id = f.id;
        if (f.group) body.group = f.group;
        const r = await this._api('/api/devices', { method: 'POST', body });
        if (!this._alive(v)) return;
        const id = str(r.clientID) || f.id;
        if (f.group) this.groups.set(id, f.group);
        this._secretResult(v, {
          title: `Device ${str(r.name) || f.name} (${id}) created.`,
          lines: ['Put this configuration on the device (config.yaml of tether-device); it connects on its own.'],
          secret: str(r.clientSecret), secretLabel: 'device secret',
          snippet: this._deviceConfig(id, r.clientSecret, r.name || f.name), snippetLabel: 'agent config.yaml',
        });
        for (const k of ['name', 'id', 'group']) inputs[k].value = '';
        v.lists.devices.reload();
      },
    });

    const readmit = this._form(v, 'devices-readmit', {
      title: 'Re-admit a revoked device',
      note: 'A permanently revoked device leaves the list. Issuing a new secret lets it back in (its old secret stays dead).',
      submit: 'Issue a new secret',
      fields: [{ name: 'id', label: 'Device id', required: true, placeholder: 'boat-1' }],
      onSubmit: async (f, { inputs }) => {
        if (!f.id) throw new Invalid('Enter the id of the revoked device.', 'id');
        await this._rotateDevice(v, seg(f.id), f.id);
        inputs.id.value = '';
      },
    });

    v.regDraft = new Map();
    const statusSel = h('select', { 'data-testid': 'admin-registrations-status', 'aria-label': 'Which registrations' },
      h('option', { value: 'pending', text: 'Pending' }),
      h('option', { value: '', text: 'All' }),
      h('option', { value: 'approved', text: 'Approved' }),
      h('option', { value: 'rejected', text: 'Rejected' }));
    const regs = this._list(v, {
      name: 'registrations',
      title: 'Registrations',
      toolbar: [h('label', { class: 'small admin-inline-label' }, 'Show ', statusSel)],
      empty: 'No registration requests here. Devices appear when they register with a handshake key.',
      columns: [{ label: 'Name' }, { label: 'Request' }, { label: 'From' }, { label: 'Requested' }, { label: 'Status' }, { label: 'Device' }, { label: 'Actions', cls: 'admin-actions-h' }],
      load: async () => {
        const q = statusSel.value ? `?status=${statusSel.value}` : '';
        const json = await this._api(`/api/registrations${q}`);
        return Array.isArray(json.registrations) ? json.registrations.filter((r) => r && typeof r.requestID === 'string') : [];
      },
      row: (r) => this._registrationRow(v, r),
    });
    statusSel.addEventListener('change', () => regs.reload());

    const devices = this._list(v, {
      name: 'devices',
      title: 'Devices',
      empty: 'No devices yet. Create one above, or hand out a handshake key.',
      columns: [{ label: 'Name' }, { label: 'Id' }, { label: 'Online' }, { label: 'Last seen' }, { label: 'Group' }, { label: 'Battery' }, { label: 'Alerts' }, { label: 'Actions', cls: 'admin-actions-h' }],
      load: () => this._devices(),
      row: (d) => this._deviceRow(v, d),
    });
    this._layout(v, [create.card, readmit.card], [regs, devices]);
  }

  _deviceConfig(id, secret, name) {
    return [
      `serverAddress: ${yaml(deviceEndpoint())}`,
      `clientID: ${yaml(id)}`,
      `clientSecret: ${yaml(secret)}`,
      name ? `name: ${yaml(name)}` : null,
    ].filter(Boolean).join('\n') + '\n';
  }

  _deviceRow(v, d) {
    const h = this.h;
    const name = str(d.name) || d.id;
    const hasGroup = Object.prototype.hasOwnProperty.call(d, 'group');
    const group = hasGroup ? d.group : this.groups.get(d.id);
    const tr = this._row(d.id, [], { online: String(d.online === true), name });
    const groupTd = this._td(group || DASH, group ? 'mono' : 'muted',
      hasGroup ? null : 'The relay\'s device list does not report groups; shown when set from this console.');
    const alerts = formatAlerts(d.alerts);
    tr.append(
      h('td', { class: 'admin-name' }, h('strong', { text: name })),
      h('td', {}, h('code', { class: 'mono', text: d.id })),
      h('td', {}, this._badge(d.online ? 'online' : 'offline', d.online ? 'ok' : 'off')),
      d.online ? this._td('now') : this._timeTd(d.lastSeen),
      groupTd,
      this._td(formatBattery(d.battery)),
      this._td(alerts.text, alerts.count ? 'admin-alerts' : 'muted', alerts.title),
      this._actionsTd(
        this._actionBtn('group', 'Group', () => this._editor(v, tr, {
          list: v.lists.devices, danger: false, confirm: 'Save group',
          text: `Permission group of ${name} (${d.id}). Leave empty to take it out of its group.`,
          fields: [{ name: 'group', label: 'Group', placeholder: 'e.g. harbour', value: group || '' }],
          run: async (f) => {
            const r = await this._api(`/api/devices/${seg(d.id)}/group`, { method: 'PUT', body: { group: f.group || null } });
            const g = r && typeof r.group === 'string' ? r.group : null;
            this.groups.set(d.id, g);
            this._result(v, h('span', { text: g ? `${name} is now in group ${g}.` : `${name} is in no group now.` }));
            v.lists.devices.reload();
          },
        })),
        this._actionBtn('rotate', 'Rotate secret', () => this._editor(v, tr, {
          list: v.lists.devices, confirm: 'Rotate secret',
          text: `Issue a new secret for ${name} (${d.id})? The old secret stops working now and the device is disconnected until its config.yaml has the new one.`,
          run: () => this._rotateDevice(v, seg(d.id), name),
        }), { danger: true }),
        this._actionBtn('revoke', 'Revoke', () => this._editor(v, tr, {
          list: v.lists.devices, confirm: 'Revoke device',
          text: `Revoke ${name} (${d.id})? Its connection closes now. Permanent (no duration): its secret stops working until you issue a new one. With a duration: refused until then, the same secret works afterwards.`,
          fields: [
            { name: 'expires', label: 'For', placeholder: 'permanent (or e.g. 2h, 7d)' },
            { name: 'reason', label: 'Reason', placeholder: 'recorded in the audit log' },
          ],
          run: async (f) => {
            const body = {};
            const secs = parseDuration(f.expires, 'expires');
            if (secs) body.expiresIn = secs;
            if (f.reason) body.reason = f.reason;
            const r = await this._api(`/api/devices/${seg(d.id)}/revoke`, { method: 'POST', body });
            const until = isNum(r.expiresAt) ? `until ${fullDate(r.expiresAt)}` : 'permanently (issue a new secret to let it back in)';
            this._result(v, h('span', { text: `${name} (${d.id}) revoked ${until}; ${plural(Number(r.closedConnections) || 0, 'connection')} closed.` }));
            v.lists.devices.reload();
          },
        }), { danger: true }),
      ),
    );
    return tr;
  }

  async _rotateDevice(v, id, name) {
    const r = await this._api(`/api/devices/${id}/rotate-secret`, { method: 'POST' });
    if (!this._alive(v)) return;
    const cid = str(r.clientID) || id;
    this._secretResult(v, {
      title: `New secret for ${name} (${cid}).`,
      lines: ['The old secret no longer works. Replace clientSecret in the device\'s config.yaml and restart the agent.'],
      secret: str(r.clientSecret), secretLabel: 'device secret',
      snippet: this._deviceConfig(cid, r.clientSecret, name !== cid ? name : null), snippetLabel: 'agent config.yaml',
    });
    v.lists.devices.reload();
  }

  _registrationRow(v, r) {
    const h = this.h;
    const pending = r.status === 'pending';
    const tr = this._row(r.requestID, [], { status: str(r.status) });
    const draft = v.regDraft.get(r.requestID) || { deviceID: '', name: '' };
    let deviceCell;
    let actions;
    if (pending) {
      const idIn = h('input', { type: 'text', class: 'admin-small-input', 'data-testid': 'admin-registrations-deviceid', placeholder: 'device id (auto)', 'aria-label': `Device id for ${str(r.name)}`, autocomplete: 'off', spellcheck: 'false', value: draft.deviceID });
      const nameIn = h('input', { type: 'text', class: 'admin-small-input', 'data-testid': 'admin-registrations-name', placeholder: str(r.name) || 'name', 'aria-label': `Name for ${str(r.name)}`, autocomplete: 'off', spellcheck: 'false', value: draft.name });
      const keep = () => v.regDraft.set(r.requestID, { deviceID: idIn.value, name: nameIn.value });
      idIn.addEventListener('input', keep);
      nameIn.addEventListener('input', keep);
      deviceCell = h('td', { class: 'admin-reg-inputs' }, idIn, nameIn);
      const approve = this._actionBtn('approve', 'Approve', async () => {
        const deviceID = idIn.value.trim();
        const name = nameIn.value.trim();
        v.msg.replaceChildren();
        try {
          if (deviceID && (/[\s\p{Cc}]/u.test(deviceID) || deviceID.length > 128)) {
            throw new Invalid('A device id is 1-128 characters without spaces or control characters.');
          }
          approve.disabled = true;
          const body = {};
          if (deviceID) body.deviceID = deviceID;
          if (name) body.name = name;
          const res = await this._api(`/api/registrations/${seg(r.requestID)}/approve`, { method: 'POST', body });
          v.regDraft.delete(r.requestID);
          this._result(v, h('span', { text: `Approved ${str(res.name) || str(r.name)} as ${str(res.clientID) || '?'}. The device fetches its secret on its next poll and connects.` }));
          v.lists.registrations.reload();
          v.lists.devices.reload();
        } catch (e) {
          this._fail(v, e, `Approving ${str(r.name) || r.requestID} failed`);
          approve.disabled = false;
        }
      });
      actions = this._actionsTd(approve,
        this._actionBtn('reject', 'Reject', () => this._editor(v, tr, {
          list: v.lists.registrations, confirm: 'Reject request',
          text: `Reject the request of ${str(r.name)} from ${str(r.remoteAddr) || 'an unknown address'}? The device learns it on its next poll and gives up.`,
          run: async () => {
            const res = await this._api(`/api/registrations/${seg(r.requestID)}/reject`, { method: 'POST' });
            v.regDraft.delete(r.requestID);
            this._result(v, h('span', { text: `Rejected the request of ${str(res.name) || str(r.name)}.` }));
            v.lists.registrations.reload();
          },
        }), { danger: true }));
    } else {
      const fetched = r.status === 'approved'
        ? isNum(r.secretIssuedAt) ? `secret fetched ${relativeTime(r.secretIssuedAt)}` : 'secret not fetched yet'
        : '';
      deviceCell = h('td', {}, r.clientID ? h('code', { class: 'mono', text: str(r.clientID) }) : DASH,
        fetched ? h('span', { class: 'admin-sub muted small', text: fetched, title: fullDate(r.secretIssuedAt) }) : null);
      actions = this._actionsTd();
    }
    tr.append(
      h('td', { class: 'admin-name' }, h('strong', { text: str(r.name) || DASH })),
      h('td', {}, h('code', { class: 'mono admin-ellipsis', text: r.requestID, title: r.requestID })),
      this._td(r.remoteAddr, 'mono'),
      this._timeTd(r.createdAt, DASH),
      h('td', {}, this._badge(str(r.status) || '?', r.status === 'pending' ? 'warn' : r.status === 'approved' ? 'ok' : 'bad')),
      deviceCell,
      actions,
    );
    return tr;
  }

  // ---- operators -------------------------------------------------------------------------

  _tab_operators(v) {
    const h = this.h;
    const me = this.ctx.me || {};
    const create = this._form(v, 'operators', {
      title: 'Create an operator',
      note: 'Creates the operator and a first API key (shown once). With a password they can also log in with username and password.',
      submit: 'Create operator',
      fields: [
        { name: 'username', label: 'Username', required: true, placeholder: 'ana', autocomplete: 'off' },
        { name: 'role', label: 'Role', type: 'select', value: 'pilot', options: [{ value: 'pilot', label: 'pilot' }, { value: 'admin', label: 'admin' }] },
        { name: 'password', label: 'Password', type: 'password', autocomplete: 'new-password', placeholder: 'at least 10 characters', hint: 'Without one, only the API key works.' },
        {
          name: 'access', label: 'Access to every device', type: 'select', value: '',
          options: [{ value: '', label: 'none (grant later)' }, ...LEVELS.map((l) => ({ value: l, label: l }))],
          hint: 'Pilots only: an org-wide grant. Admins hold admin everywhere.',
        },
      ],
      onSubmit: async (f, { inputs }) => {
        if (!f.username || f.username.length > 64) throw new Invalid('A username is 1 to 64 characters.', 'username');
        if (f.password && f.password.length < 10) throw new Invalid('A password needs at least 10 characters.', 'password');
        const body = { username: f.username, role: f.role || 'pilot' };
        if (f.password) body.password = f.password;
        if (body.role === 'pilot' && f.access) body.access = f.access;
        const r = await this._api('/api/operators', { method: 'POST', body });
        if (!this._alive(v)) return;
        const lines = [];
        lines.push(`Operator id ${str(r.operatorID)}.`);
        if (body.role === 'pilot') lines.push(body.access ? `Access: ${body.access} on every device of the organisation.` : 'No access yet: grant some under Permissions.');
        lines.push(body.password ? 'They can log in with the username and password, or with this key.' : 'They log in with this key (no password set).');
        this._secretResult(v, {
          title: `${body.role === 'admin' ? 'Admin' : 'Pilot'} ${str(r.username) || body.username} created.`,
          lines, secret: str(r.apiKey), secretLabel: 'API key',
        });
        inputs.username.value = '';
        inputs.password.value = '';
        v.lists.operators.reload();
      },
    });
    const roleSel = create.inputs.role;
    const syncAccess = () => {
      create.inputs.access.disabled = roleSel.value === 'admin';
      if (roleSel.value === 'admin') create.inputs.access.value = '';
    };
    roleSel.addEventListener('change', syncAccess);

    const ops = this._list(v, {
      name: 'operators',
      title: 'Operators',
      empty: 'No operators.',
      columns: [{ label: 'Username' }, { label: 'Id' }, { label: 'Role' }, { label: 'Access' }, { label: 'State' }, { label: 'Actions', cls: 'admin-actions-h' }],
      load: async () => {
        const [list, perms] = await Promise.all([
          this._operators(),
          this._api('/api/permissions').then((j) => (Array.isArray(j.permissions) ? j.permissions : []), () => null),
        ]);
        v.perms = perms;
        return list;
      },
      row: (o) => this._operatorRow(v, o, me),
    });
    this._layout(v, [create.card], [ops]);
  }

  _operatorRow(v, o, me) {
    const h = this.h;
    const name = str(o.username) || o.id;
    const self = o.id === me.id;
    const tr = this._row(o.id, [], { username: name, role: str(o.role), disabled: String(o.disabled === true) });
    let access = DASH;
    let accessTitle = null;
    if (o.role === 'admin') access = 'admin (role)';
    else if (Array.isArray(v.perms)) {
      const mine = v.perms.filter((p) => p && p.operatorID === o.id);
      const org = mine.find((p) => p.scope === 'org');
      const others = mine.length - (org ? 1 : 0);
      access = [org ? `${org.level} (org)` : null, others ? plural(others, 'other grant') : null].filter(Boolean).join(', ') || 'none';
      accessTitle = mine.map((p) => `${p.scope}: ${p.level}`).join('\n') || null;
    }
    const state = o.disabled
      ? this._badge('disabled', 'bad')
      : this._badge(o.online ? 'online' : 'enabled', o.online ? 'ok' : '');
    tr.append(
      h('td', { class: 'admin-name' }, h('strong', { text: name }), self ? h('span', { class: 'admin-sub muted small', text: 'you' }) : null),
      h('td', {}, h('code', { class: 'mono', text: o.id })),
      this._td(o.role),
      this._td(access, access === 'none' ? 'muted' : null, accessTitle),
      h('td', { 'data-testid': 'admin-operator-state' }, state),
      this._actionsTd(
        o.disabled ? null : this._actionBtn('password', 'Set password', () => this._editor(v, tr, {
          list: v.lists.operators, danger: false, confirm: 'Set password',
          text: `New login password for ${name}. Their current sessions stay logged in.`,
          fields: [{ name: 'password', label: 'Password', type: 'password', autocomplete: 'new-password', required: true, placeholder: 'at least 10 characters' }],
          run: async (f) => {
            if (f.password.length < 10) throw new Invalid('A password needs at least 10 characters.', 'password');
            await this._api(`/api/operators/${seg(o.id)}/password`, { method: 'PUT', body: { password: f.password } });
            this._result(v, h('span', { text: `Password of ${name} set. They can log in with it now.` }));
          },
        })),
        o.disabled ? null : this._actionBtn('disable', 'Disable', () => this._editor(v, tr, {
          list: v.lists.operators, confirm: 'Disable operator',
          text: `Disable ${name}? Their API keys and sessions stop working, their live connections are closed now (kicking them out of any console) and control leases they hold end. There is no re-enable.`,
          run: async () => {
            const r = await this._api(`/api/operators/${seg(o.id)}/disable`, { method: 'POST' });
            this._result(v, h('span', { text: `${name} disabled; ${plural(Number(r.closedConnections) || 0, 'live connection')} closed.` }));
            v.lists.operators.reload();
          },
        }), { danger: true, disabled: self, title: self ? 'You cannot disable yourself here.' : null }),
      ),
    );
    return tr;
  }

  // ---- API keys --------------------------------------------------------------------------

  _tab_keys(v) {
    const h = this.h;
    const me = this.ctx.me || {};
    const create = this._form(v, 'keys', {
      title: 'Create an API key',
      note: 'Another key for an operator, e.g. one per laptop or script, so each can be revoked alone.',
      submit: 'Create key',
      fields: [
        { name: 'operator', label: 'Operator', type: 'select', required: true, options: [{ value: '', label: 'Loading operators…' }] },
        { name: 'label', label: 'Label', placeholder: 'what the key is for, e.g. field laptop' },
      ],
      onSubmit: async (f, { inputs }) => {
        if (!f.operator) throw new Invalid('Choose the operator the key is for.', 'operator');
        const body = {};
        if (f.label) body.label = f.label;
        const r = await this._api(`/api/operators/${seg(f.operator)}/keys`, { method: 'POST', body });
        if (!this._alive(v)) return;
        this._secretResult(v, {
          title: `API key created for ${this._opName(f.operator)}${f.label ? ` (${f.label})` : ''}.`,
          secret: str(r.apiKey), secretLabel: 'API key',
        });
        inputs.label.value = '';
        v.lists.keys.reload();
      },
    });
    const keys = this._list(v, {
      name: 'keys',
      title: 'API keys',
      empty: 'No API keys.',
      columns: [{ label: 'Key id' }, { label: 'Operator' }, { label: 'Label' }, { label: 'Created' }, { label: 'State' }, { label: 'Actions', cls: 'admin-actions-h' }],
      load: async () => {
        const [json, ops] = await Promise.all([this._api('/api/keys'), this._operators().catch(() => null)]);
        if (ops && this._alive(v)) this._fillOperatorSelect(create.inputs.operator, ops);
        const list = Array.isArray(json.keys) ? json.keys.filter((k) => k && typeof k.id === 'string') : [];
        // Live keys first, newest first.
        return list.sort((a, b) => (a.revokedAt == null ? 0 : 1) - (b.revokedAt == null ? 0 : 1) || (Number(b.createdAt) || 0) - (Number(a.createdAt) || 0));
      },
      row: (k) => {
        const tr = this._row(k.id, [], { operator: str(k.operatorID), revoked: String(k.revokedAt != null) });
        const revoked = k.revokedAt != null;
        const own = k.operatorID === me.id;
        tr.append(
          h('td', {}, h('code', { class: 'mono', text: k.id })),
          this._nameTd(this._opName(k.operatorID), k.operatorID),
          this._td(k.label, k.label ? null : 'muted'),
          this._timeTd(k.createdAt, DASH),
          h('td', { title: revoked ? fullDate(k.revokedAt) : null }, revoked ? this._badge('revoked', 'bad') : this._badge('live', 'ok')),
          this._actionsTd(revoked ? null : this._actionBtn('revoke', 'Revoke', () => this._editor(v, tr, {
            list: v.lists.keys, confirm: 'Revoke key',
            text: `Revoke key ${k.id} of ${this._opName(k.operatorID)}? Requests with it fail from now on and console connections opened with it close.` +
              (own ? ' This is one of your own keys: if this console logged in with it, you will be logged out.' : ''),
            run: async () => {
              const r = await this._api(`/api/keys/${seg(k.id)}/revoke`, { method: 'POST' });
              this._result(v, h('span', { text: `Key ${k.id} revoked; ${plural(Number(r.closedConnections) || 0, 'connection')} closed.` }));
              v.lists.keys.reload();
            },
          }), { danger: true })),
        );
        return tr;
      },
    });
    this._layout(v, [create.card], [keys]);
  }

  // ---- handshake keys --------------------------------------------------------------------

  _tab_handshake(v) {
    const h = this.h;
    const create = this._form(v, 'handshake', {
      title: 'Create a handshake key',
      note: 'Devices with this key in their config.yaml register themselves; you approve each one under Devices. The key itself never creates a device.',
      submit: 'Create handshake key',
      fields: [
        { name: 'label', label: 'Label', placeholder: 'field kit' },
        { name: 'expires', label: 'Valid for', placeholder: 'never (or e.g. 7d, 12h)', hint: 'seconds, or 90s, 15m, 2h, 7d, 1w' },
        { name: 'uses', label: 'Registrations allowed', type: 'number', min: '1', step: '1', inputmode: 'numeric', placeholder: 'unlimited' },
        { name: 'key', label: 'Key value', placeholder: 'generated (or at least 12 characters)', hint: 'Leave empty for a random hk_ key.' },
      ],
      onSubmit: async (f, { inputs }) => {
        const body = {};
        if (f.label) body.label = f.label;
        const secs = parseDuration(f.expires, 'expires');
        if (secs) body.expiresIn = secs;
        if (f.uses) {
          const n = Number(f.uses);
          if (!Number.isInteger(n) || n < 1) throw new Invalid('Registrations allowed must be a whole number of at least 1.', 'uses');
          body.uses = n;
        }
        if (f.key) {
          if (f.key.length < 12) throw new Invalid('A chosen key needs at least 12 characters.', 'key');
          body.key = f.key;
        }
        const r = await this._api('/api/handshake-keys', { method: 'POST', body });
        if (!this._alive(v)) return;
        const limits = [
          isNum(r.expiresAt) ? `valid until ${fullDate(r.expiresAt)}` : 'valid until revoked',
          isNum(r.usesLeft) ? `${plural(r.usesLeft, 'registration')} left` : 'unlimited registrations',
        ];
        this._secretResult(v, {
          title: `Handshake key ${str(r.id)}${f.label ? ` (${f.label})` : ''} created: ${limits.join(', ')}.`,
          lines: ['Put it in each new device\'s config.yaml (no clientID): the device registers and waits for your approval.'],
          secret: str(r.key), secretLabel: 'handshake key',
          snippet: this._onboardingConfig(r.key), snippetLabel: 'onboarding config.yaml',
        });
        for (const k of ['label', 'expires', 'uses', 'key']) inputs[k].value = '';
        v.lists.handshake.reload();
      },
    });
    const list = this._list(v, {
      name: 'handshake',
      title: 'Handshake keys',
      empty: 'No handshake keys yet.',
      columns: [{ label: 'Id' }, { label: 'Label' }, { label: 'Created' }, { label: 'Expires' }, { label: 'Uses left', cls: 'num' }, { label: 'State' }, { label: 'Actions', cls: 'admin-actions-h' }],
      load: async () => {
        const json = await this._api('/api/handshake-keys');
        const keys = Array.isArray(json.handshakeKeys) ? json.handshakeKeys.filter((k) => k && typeof k.id === 'string') : [];
        return keys.sort((a, b) => (a.revokedAt == null ? 0 : 1) - (b.revokedAt == null ? 0 : 1) || (Number(b.createdAt) || 0) - (Number(a.createdAt) || 0));
      },
      row: (k) => {
        const now = Date.now();
        const state = k.revokedAt != null ? ['revoked', 'bad']
          : isNum(k.expiresAt) && k.expiresAt <= now ? ['expired', 'bad']
            : k.usesLeft === 0 ? ['used up', 'warn'] : ['live', 'ok'];
        const live = state[0] === 'live';
        const label = str(k.label);
        const tr = this._row(k.id, [], { state: state[0] });
        tr.append(
          h('td', {}, h('code', { class: 'mono', text: k.id })),
          this._td(label, label ? null : 'muted'),
          this._timeTd(k.createdAt, DASH),
          h('td', { title: fullDate(k.expiresAt) || null, text: untilText(k.expiresAt) }),
          this._td(isNum(k.usesLeft) ? String(k.usesLeft) : 'unlimited', 'num'),
          h('td', {}, this._badge(state[0], state[1])),
          this._actionsTd(
            !live ? null : this._actionBtn('rotate', 'Rotate', () => this._editor(v, tr, {
              list: v.lists.handshake, confirm: 'Rotate key',
              text: `Replace the value of ${k.id}${label ? ` (${label})` : ''}? The old value stops working now; devices not yet registered need the new one. Id, label, expiry and uses stay.`,
              run: async () => {
                const r = await this._api(`/api/handshake-keys/${seg(k.id)}/rotate`, { method: 'POST' });
                this._secretResult(v, {
                  title: `New value for handshake key ${str(r.id) || k.id}${label ? ` (${label})` : ''}.`,
                  secret: str(r.key), secretLabel: 'handshake key',
                  snippet: this._onboardingConfig(r.key), snippetLabel: 'onboarding config.yaml',
                });
                v.lists.handshake.reload();
              },
            }), { danger: true }),
            k.revokedAt != null ? null : this._actionBtn('revoke', 'Revoke', () => this._editor(v, tr, {
              list: v.lists.handshake, confirm: 'Revoke key',
              text: `Revoke ${k.id}${label ? ` (${label})` : ''}? Devices can no longer register with it; requests already made stay pending.`,
              run: async () => {
                await this._api(`/api/handshake-keys/${seg(k.id)}/revoke`, { method: 'POST' });
                this._result(v, h('span', { text: `Handshake key ${k.id} revoked.` }));
                v.lists.handshake.reload();
              },
            }), { danger: true }),
          ),
        );
        return tr;
      },
    });
    this._layout(v, [create.card], [list]);
  }

  _onboardingConfig(key) {
    return [
      `serverAddress: ${yaml(deviceEndpoint())}`,
      `handshakeKey: ${yaml(key)}`,
      'name: "new-device"   # the name shown in the approval list; set one per device',
    ].join('\n') + '\n';
  }

  // ---- permissions -----------------------------------------------------------------------

  _tab_permissions(v) {
    const h = this.h;
    const create = this._form(v, 'permissions', {
      title: 'Grant access',
      note: 'Levels: view (telemetry, video) < control (commands, control lease) < admin (shell, docker, config). Granting again on the same scope changes the level. Admins need no grants.',
      submit: 'Grant',
      fields: [
        { name: 'operator', label: 'Operator', type: 'select', required: true, options: [{ value: '', label: 'Loading operators…' }] },
        {
          name: 'scope', label: 'Scope', type: 'select', value: 'org',
          options: [{ value: 'org', label: 'every device (org)' }, { value: 'device', label: 'one device' }, { value: 'group', label: 'a device group' }],
        },
        { name: 'target', label: 'Device id or group', placeholder: 'not needed for org', list: 'admin-permissions-devices' },
        { name: 'level', label: 'Level', type: 'select', value: 'control', options: LEVELS.map((l) => ({ value: l, label: l })) },
      ],
      onSubmit: async (f) => {
        if (!f.operator) throw new Invalid('Choose the operator.', 'operator');
        const scope = this._scope(f.scope, f.target);
        const r = await this._api('/api/permissions', { method: 'PUT', body: { operatorID: f.operator, scope, level: f.level } });
        this._result(v, h('span', { text: `${this._opName(str(r.operatorID) || f.operator)} now has ${str(r.level) || f.level} on ${str(r.scope) || scope}.` }));
        v.lists.permissions.reload();
      },
    });
    const datalist = h('datalist', { id: 'admin-permissions-devices' });
    create.card.append(datalist);
    const target = create.inputs.target;
    const syncScope = () => {
      const kind = create.inputs.scope.value;
      target.disabled = kind === 'org';
      target.placeholder = kind === 'org' ? 'not needed for org' : kind === 'device' ? 'device id, e.g. boat-1' : 'group name, e.g. harbour';
      if (kind === 'org') target.value = '';
    };
    create.inputs.scope.addEventListener('change', syncScope);
    syncScope();

    const list = this._list(v, {
      name: 'permissions',
      title: 'Grants',
      empty: 'No grants. Pilots without a grant see no devices.',
      columns: [{ label: 'Operator' }, { label: 'Scope' }, { label: 'Level' }, { label: 'Actions', cls: 'admin-actions-h' }],
      load: async () => {
        const [json, ops, devs] = await Promise.all([
          this._api('/api/permissions'),
          this._operators().catch(() => null),
          this._devices().catch(() => null),
        ]);
        if (this._alive(v)) {
          if (ops) this._fillOperatorSelect(create.inputs.operator, ops);
          if (devs) datalist.replaceChildren(...devs.map((d) => h('option', { value: d.id, text: str(d.name) })));
        }
        const perms = Array.isArray(json.permissions) ? json.permissions.filter((p) => p && typeof p.operatorID === 'string') : [];
        return perms.sort((a, b) => this._opName(a.operatorID).localeCompare(this._opName(b.operatorID)) || str(a.scope).localeCompare(str(b.scope)));
      },
      row: (p) => {
        const tr = this._row(`${p.operatorID} ${p.scope}`, [], { operator: p.operatorID, scope: str(p.scope), level: str(p.level) });
        tr.append(
          this._nameTd(this._opName(p.operatorID), p.operatorID),
          h('td', {}, h('code', { class: 'mono', text: str(p.scope) })),
          h('td', {}, this._badge(str(p.level), p.level === 'admin' ? 'bad' : p.level === 'control' ? 'warn' : '')),
          this._actionsTd(
            this._actionBtn('edit', 'Change level', () => {
              const s = str(p.scope);
              create.inputs.operator.value = p.operatorID;
              create.inputs.scope.value = s === 'org' ? 'org' : s.startsWith('device:') ? 'device' : 'group';
              syncScope();
              target.value = s === 'org' ? '' : s.slice(s.indexOf(':') + 1);
              create.inputs.level.value = p.level;
              create.inputs.level.focus();
            }),
            this._actionBtn('remove', 'Remove', () => this._editor(v, tr, {
              list: v.lists.permissions, confirm: 'Remove grant',
              text: `Remove ${this._opName(p.operatorID)}'s ${p.level} on ${p.scope}? It takes effect with their next message (a control lease they hold on those devices stays until it ends).`,
              run: async () => {
                await this._api('/api/permissions', { method: 'DELETE', body: { operatorID: p.operatorID, scope: p.scope } });
                this._result(v, h('span', { text: `Removed ${this._opName(p.operatorID)}'s grant on ${p.scope}.` }));
                v.lists.permissions.reload();
              },
            }), { danger: true }),
          ),
        );
        return tr;
      },
    });
    this._layout(v, [create.card], [list]);
  }

  /** `org`, `device:<id>` or `group:<name>` from the form's kind and target. */
  _scope(kind, target) {
    if (kind === 'org') return 'org';
    let t = str(target).trim();
    if (t.startsWith(`${kind}:`)) t = t.slice(kind.length + 1);
    if (!t) throw new Invalid(kind === 'device' ? 'Enter the device id.' : 'Enter the group name.', 'target');
    return `${kind}:${t}`;
  }

  // ---- deny list -------------------------------------------------------------------------

  _tab_deny(v) {
    const h = this.h;
    const me = this.ctx.me || {};
    let ops = [];
    const create = this._form(v, 'deny', {
      title: 'Deny access',
      note: 'Refuses the subject until the entry expires or is removed, and closes its live connections now. ip: and ticket: entries are relay-wide.',
      submit: 'Add to deny list',
      fields: [
        { name: 'kind', label: 'Kind', type: 'select', value: 'operator', options: DENY_KINDS.map((k) => ({ value: k.value, label: k.label })) },
        { name: 'subject', label: 'Subject', required: true, list: 'admin-deny-suggest', placeholder: DENY_KINDS[0].placeholder },
        { name: 'ttl', label: 'For', placeholder: 'until removed (or e.g. 1h, 7d)' },
        { name: 'reason', label: 'Reason', placeholder: 'lost laptop' },
      ],
      onSubmit: async (f, { inputs, form }) => {
        const subject = this._denySubject(f.kind, f.subject, ops);
        if (subject === me.id) throw new Invalid('You cannot deny yourself.', 'subject');
        const secs = parseDuration(f.ttl, 'ttl');
        const body = { subject };
        if (f.reason) body.reason = f.reason;
        if (secs) body.expiresIn = secs;
        // Adding closes live connections: confirm inline before doing it.
        this._editor(v, form, {
          confirm: 'Deny',
          text: `Deny ${subject}${secs ? ` for ${spanText(secs)}` : ' until removed'}? Its live connections close now.`,
          run: async () => {
            const r = await this._api('/api/deny', { method: 'POST', body });
            this._result(v, h('span', {
              text: `${str(r.subject) || subject} denied ${isNum(r.expiresAt) ? `until ${fullDate(r.expiresAt)}` : 'until removed'}; ${plural(Number(r.closedConnections) || 0, 'connection')} closed.`,
            }));
            inputs.subject.value = '';
            inputs.ttl.value = '';
            inputs.reason.value = '';
            v.lists.deny.reload();
          },
        });
      },
    });
    const suggest = h('datalist', { id: 'admin-deny-suggest' });
    create.card.append(suggest);
    let devs = [];
    const syncKind = () => {
      const k = DENY_KINDS.find((x) => x.value === create.inputs.kind.value) || DENY_KINDS[0];
      create.inputs.subject.placeholder = k.placeholder;
      const opts = k.value === 'operator' ? ops.filter((o) => o.id !== me.id).map((o) => [o.id, str(o.username)])
        : k.value === 'device' ? devs.map((d) => [d.id, str(d.name)]) : [];
      suggest.replaceChildren(...opts.map(([value, text]) => h('option', { value, text })));
    };
    create.inputs.kind.addEventListener('change', syncKind);

    const list = this._list(v, {
      name: 'deny',
      title: 'Deny list',
      empty: 'Nothing is denied.',
      columns: [{ label: 'Subject' }, { label: 'Kind' }, { label: 'Reason' }, { label: 'Added' }, { label: 'Expires' }, { label: 'Actions', cls: 'admin-actions-h' }],
      load: async () => {
        const [json, o, d] = await Promise.all([this._api('/api/deny'), this._operators().catch(() => null), this._devices().catch(() => null)]);
        if (o) ops = o;
        if (d) devs = d;
        if (this._alive(v)) syncKind();
        return Array.isArray(json.deny) ? json.deny.filter((e) => e && typeof e.subject === 'string') : [];
      },
      row: (e) => {
        const tr = this._row(e.subject, [], { kind: str(e.kind) });
        const who = e.kind === 'operator' && this.opNames.has(e.subject) ? this.opNames.get(e.subject) : null;
        tr.append(
          h('td', {}, h('code', { class: 'mono', text: e.subject }), who ? h('span', { class: 'admin-sub muted small', text: who }) : null),
          this._td(e.kind),
          this._td(e.reason, e.reason ? null : 'muted'),
          this._timeTd(e.createdAt, DASH),
          h('td', { title: fullDate(e.expiresAt) || null, text: untilText(e.expiresAt, 'until removed') }),
          this._actionsTd(this._actionBtn('remove', 'Remove', async (ev) => {
            const btn = ev.currentTarget;
            btn.disabled = true;
            v.msg.replaceChildren();
            try {
              const r = await this._api(`/api/deny/${seg(e.subject)}`, { method: 'DELETE' });
              this._result(v, h('span', { text: `${str(r.removed) || e.subject} is no longer denied.` }));
              v.lists.deny.reload();
            } catch (x) {
              this._fail(v, x, `Removing ${e.subject} failed`);
              btn.disabled = false;
            }
          })),
        );
        return tr;
      },
    });
    this._layout(v, [create.card], [list]);
  }

  /** The deny-list subject for a kind and what was typed (a username becomes its operator id). */
  _denySubject(kind, value, ops) {
    const k = DENY_KINDS.find((x) => x.value === kind) || DENY_KINDS[0];
    let s = str(value).trim();
    if (!s) throw new Invalid('Enter what to deny.', 'subject');
    if (k.prefix && s.startsWith(k.prefix)) s = s.slice(k.prefix.length);
    if (k.value === 'operator' && !s.startsWith('op-')) {
      const o = ops.find((x) => x.username === s);
      if (!o) throw new Invalid(`No operator "${s}": enter an operator id (op-…) or an existing username.`, 'subject');
      s = o.id;
    }
    if (k.value === 'device' && (s.startsWith('op-') || /^(key|ip|session|ticket):/.test(s))) {
      throw new Invalid(`"${s}" is not a device id; choose the matching kind.`, 'subject');
    }
    if (k.value === 'key') {
      // A whole key pasted by mistake: keep only its id, never send the secret.
      const m = /^tk_([^_\s]+)_/.exec(s);
      if (m) s = m[1];
    }
    if (/\s/.test(s)) throw new Invalid('A subject cannot contain spaces.', 'subject');
    return k.prefix + s;
  }

  // ---- audit log -------------------------------------------------------------------------

  _tab_audit(v) {
    const h = this.h;
    const filter = h('input', { type: 'search', class: 'admin-filter', 'data-testid': 'admin-audit-filter', placeholder: 'Filter: actor, action, subject, detail', 'aria-label': 'Filter the audit log', autocomplete: 'off', spellcheck: 'false' });
    const older = h('button', { type: 'button', class: 'btn btn-small', 'data-testid': 'admin-audit-older', text: 'Older entries' });
    const end = h('span', { class: 'muted small', 'data-testid': 'admin-audit-end' });
    v.audit = { entries: [], more: false };
    const list = this._list(v, {
      name: 'audit',
      title: 'Audit log',
      toolbar: [filter],
      footer: h('div', { class: 'admin-list-foot' }, older, end),
      empty: 'The audit log is empty.',
      columns: [{ label: 'Time' }, { label: 'Actor' }, { label: 'Action' }, { label: 'Subject' }, { label: 'Detail' }],
      // Refresh starts again from the newest entries.
      load: async () => {
        const [json] = await Promise.all([this._api(`/api/audit?limit=${AUDIT_PAGE}`), this._operators().catch(() => null)]);
        const entries = auditEntries(json);
        v.audit.more = entries.length >= AUDIT_PAGE;
        syncOlder();
        return entries;
      },
      row: (e) => {
        const actorName = this.opNames.get(e.actor);
        const subjName = this.opNames.get(e.subject);
        const detail = compactJson(e.detail);
        const tr = this._row(String(e.seq), [], { action: str(e.action), actor: str(e.actor) });
        tr.append(
          h('td', { class: 'admin-time', title: relativeTime(e.at) }, h('time', { datetime: isNum(e.at) ? new Date(e.at).toISOString() : null, text: isNum(e.at) ? fullDate(e.at) : DASH })),
          h('td', {}, h('span', { text: actorName || str(e.actor) || DASH }), actorName ? h('code', { class: 'admin-sub mono', text: str(e.actor) }) : null),
          h('td', {}, h('code', { class: 'mono admin-action-name', text: str(e.action) })),
          h('td', {}, h('code', { class: 'mono', text: str(e.subject) || DASH }), subjName ? h('span', { class: 'admin-sub muted small', text: subjName }) : null),
          h('td', { class: 'mono admin-detail', title: detail.length > 120 ? detail : null, text: detail.length > 240 ? `${detail.slice(0, 239)}…` : detail }),
        );
        return tr;
      },
    });
    const text = (e) => [fullDate(e.at), e.actor, this.opNames.get(e.actor), e.action, e.subject, this.opNames.get(e.subject), compactJson(e.detail)]
      .map((x) => str(x).toLowerCase()).join(' ');
    filter.addEventListener('input', () => {
      const q = filter.value.trim().toLowerCase();
      list.filter = q ? (e) => text(e).includes(q) : null;
      if (list.loaded) list.render();
    });
    const syncOlder = () => {
      older.disabled = !v.audit.more;
      older.hidden = !v.audit.more && !list.items.length;
      end.textContent = v.audit.more ? '' : 'Start of the log.';
    };
    older.addEventListener('click', async () => {
      const last = list.items[list.items.length - 1];
      if (!last) return;
      older.disabled = true;
      older.textContent = 'Loading…';
      try {
        const json = await this._api(`/api/audit?limit=${AUDIT_PAGE}&before=${encodeURIComponent(last.seq)}`);
        if (!this._alive(v)) return;
        const more = auditEntries(json);
        const seen = new Set(list.items.map((e) => e.seq));
        list.items = list.items.concat(more.filter((e) => !seen.has(e.seq)));
        v.audit.more = more.length >= AUDIT_PAGE;
        list.render();
      } catch (e) {
        this._fail(v, e, 'Loading older entries failed');
      } finally {
        if (this._alive(v)) {
          older.textContent = 'Older entries';
          syncOlder();
        }
      }
    });
    this._layout(v, [], [list]);
  }
}

/** Audit entries from a GET /api/audit answer, newest first, junk dropped. */
function auditEntries(json) {
  const list = json && Array.isArray(json.entries) ? json.entries : [];
  return list.filter((e) => e && typeof e === 'object' && isNum(e.seq)).sort((a, b) => b.seq - a.seq);
}

/** Battery from a device record: a percentage, or an object with percent/voltage. */
function formatBattery(b) {
  if (isNum(b)) return `${Math.round(b)} %`;
  if (b && typeof b === 'object') {
    const pct = [b.percent, b.pct, b.percentage, b.level, b.soc].find(isNum);
    const volts = [b.voltage, b.volts].find(isNum);
    const parts = [];
    if (pct !== undefined) parts.push(`${Math.round(pct)} %`);
    if (volts !== undefined) parts.push(`${volts.toFixed(1)} V`);
    if (parts.length) return parts.join(' · ');
  }
  return DASH;
}

/** Alerts from a device record: a list of strings/objects or a count. */
function formatAlerts(a) {
  if (Array.isArray(a)) {
    if (!a.length) return { text: 'none', count: 0, title: null };
    const texts = a.map((x) => (typeof x === 'string' ? x : x && typeof x === 'object' ? str(x.message || x.text || x.code || x.name || x.kind) : str(x))).filter(Boolean);
    return { text: texts.length ? `${a.length}: ${texts.join(', ')}` : String(a.length), count: a.length, title: texts.join('\n') || null };
  }
  if (isNum(a)) return { text: a ? String(a) : 'none', count: a, title: null };
  return { text: DASH, count: 0, title: null };
}
