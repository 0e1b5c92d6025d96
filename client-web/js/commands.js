// "Commands & processes" tab of the device view: run an allowed program and watch its output,
// measure the link with a speed test, start and stop the agent's supervised processes, and
// edit the agent's configuration (JSON merge patch). Everything here needs `admin` on the
// device (the relay refuses the requests otherwise); a viewer sees the process table only.
//
// Requests go through ctx.request (js/requests.js). Every answer is checked against the
// panel's generation (`this._gen`, bumped by open and close), so an answer that arrives after
// the view closed or moved to another device changes nothing.

import { describeFailure, resultError } from './requests.js';
import { DASH, formatMs, fullDate } from './format.js';

/** Runs kept in the history list. */
const HISTORY = 20;
/** Relay's default deadline for routed requests (COMMAND_TIMEOUT) plus a little slack, so
 *  the relay's own `command_timeout` (clearer) arrives before this console gives up. */
const RELAY_DEADLINE_MS = 65_000;
/** Beyond the relay's deadline: its `command_timeout` for `timeoutMs` + 5 s wins. */
const SLACK_MS = 2_000;
/** A request for an offline device waits in the relay's queue (default time to live one
 *  day); the relay says `expired` if it never runs. Wait that long rather than give up. */
const QUEUED_WAIT_MS = 25 * 3600_000;
/** Characters of one stream shown in the pane; the rest is summarised (keeps the page fast). */
const MAX_SHOWN = 1_000_000;
/** Keys the agent never changes through update_client_config (protocol.md 4.15). */
const DEFAULT_PROTECTED = ['serverAddress', 'clientID', 'clientSecret', 'handshakeKey', 'registrationRequestID', 'caFile'];
const REDACTED = '<redacted>';
const SPEED_SIZES = [
  [1_000_000, '1 MB'],
  [5_000_000, '5 MB'],
  [20_000_000, '20 MB'],
];
/** Relay error codes that mean "refused, nothing ran" (the rest mean "no result"). */
const REFUSAL_CODES = new Set(['forbidden', 'unknown_target', 'invalid_payload', 'queue_full', 'rate_limited', 'not_allowed']);

const utf8 = new TextEncoder();
const isObj = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
const isNum = (v) => typeof v === 'number' && Number.isFinite(v);

// ---- pure helpers (exported for tests) ---------------------------------------------------------

/**
 * Splits a command line into words like a POSIX shell would, without running anything:
 * whitespace separates, 'single quotes' keep everything literally, "double quotes" allow \" and
 * \\, a backslash outside quotes escapes the next character. Throws on an unclosed quote.
 * @param {string} text
 * @returns {string[]}
 */
export function splitArgs(text) {
  const out = [];
  let cur = '';
  let inWord = false;
  let quote = null;
  const s = String(text ?? '');
  for (let i = 0; i < s.length; i++) {
    const c = s[i];
    if (quote === "'") {
      if (c === "'") quote = null;
      else cur += c;
    } else if (quote === '"') {
      if (c === '"') quote = null;
      else if (c === '\\' && (s[i + 1] === '"' || s[i + 1] === '\\')) cur += s[++i];
      else cur += c;
    } else if (/\s/.test(c)) {
      if (inWord) out.push(cur);
      cur = '';
      inWord = false;
    } else {
      inWord = true;
      if (c === "'" || c === '"') quote = c;
      else if (c === '\\' && i + 1 < s.length) cur += s[++i];
      else cur += c;
    }
  }
  if (quote) throw new Error(`the ${quote === '"' ? 'double' : 'single'} quote is not closed`);
  if (inWord) out.push(cur);
  return out;
}

/** Deep equality of JSON values. */
export function jsonEqual(a, b) {
  if (a === b) return true;
  if (Array.isArray(a)) {
    return Array.isArray(b) && a.length === b.length && a.every((x, i) => jsonEqual(x, b[i]));
  }
  if (isObj(a) && isObj(b)) {
    const ka = Object.keys(a);
    return ka.length === Object.keys(b).length && ka.every((k) => Object.hasOwn(b, k) && jsonEqual(a[k], b[k]));
  }
  return false;
}

/**
 * The RFC 7386 JSON merge patch that turns `from` into `to`: changed and added keys carry their
 * new value, removed keys `null`, objects are compared key by key, anything else (arrays
 * included) is replaced whole. Returns `{}` when nothing changed (for two objects).
 * @param {any} from
 * @param {any} to
 * @returns {any}
 */
export function mergePatch(from, to) {
  if (!isObj(from) || !isObj(to)) return to;
  const patch = {};
  for (const k of Object.keys(from)) if (!Object.hasOwn(to, k)) patch[k] = null;
  for (const [k, v] of Object.entries(to)) {
    if (!Object.hasOwn(from, k)) patch[k] = v;
    else if (jsonEqual(from[k], v)) continue;
    else if (isObj(from[k]) && isObj(v)) patch[k] = mergePatch(from[k], v);
    else patch[k] = v;
  }
  return patch;
}

/** Dotted paths of every leaf in a patch: `{a: {b: 1}, c: null}` -> `['a.b', 'c']`. */
export function patchPaths(patch, prefix = '') {
  if (!isObj(patch) || Object.keys(patch).length === 0) return prefix ? [prefix] : [];
  return Object.entries(patch).flatMap(([k, v]) => {
    const p = prefix ? `${prefix}.${k}` : k;
    return isObj(v) && Object.keys(v).length ? patchPaths(v, p) : [p];
  });
}

/** The value at a dotted path (`commands.timeout`), or undefined. */
function getPath(obj, path) {
  let v = obj;
  for (const seg of path.split('.')) {
    if (!isObj(v) || !Object.hasOwn(v, seg)) return undefined;
    v = v[seg];
  }
  return v;
}

/** Paths inside `value` whose string is the `<redacted>` placeholder. */
function findRedacted(value, path = '') {
  if (value === REDACTED) return [path || '(root)'];
  if (Array.isArray(value)) return value.flatMap((x, i) => findRedacted(x, `${path}[${i}]`));
  if (isObj(value)) return Object.entries(value).flatMap(([k, v]) => findRedacted(v, path ? `${path}.${k}` : k));
  return [];
}

/**
 * Where a JSON.parse error points: `{line, column, offset}` (1-based line and column), or null.
 * Understands V8's "at position N (line L column C)", older V8's "at position N" and Firefox's
 * "at line L column C".
 */
export function jsonErrorPosition(message, text) {
  const msg = String(message ?? '');
  const lineOf = (offset) => {
    const before = text.slice(0, offset);
    const line = before.split('\n').length;
    return { line, column: offset - before.lastIndexOf('\n'), offset };
  };
  const lc = /line (\d+) column (\d+)/.exec(msg);
  if (lc) {
    const line = Number(lc[1]);
    const column = Number(lc[2]);
    const lines = text.split('\n');
    let offset = 0;
    for (let i = 0; i < line - 1 && i < lines.length; i++) offset += lines[i].length + 1;
    return { line, column, offset: offset + column - 1 };
  }
  const pos = /position (\d+)/.exec(msg);
  if (pos) return lineOf(Math.min(Number(pos[1]), text.length));
  if (/unexpected end/i.test(msg)) return lineOf(text.length);
  return null;
}

/**
 * The configuration field an agent's error names: `commands.maxOutputBytes: must be …` ->
 * `commands.maxOutputBytes`. The agent may put context first (`the updated config is invalid:
 * update_client_config: commands.maxOutputBytes: …`, or a file name from reload_config), so
 * every `: `-separated part is considered: the first whose top-level key is in `known` (the
 * loaded configuration's keys) wins; without such a part, the first dotted path that is not a
 * file name. A lone word counts only if it is a known key, so an ordinary sentence's first word
 * is never taken for a field.
 */
export function errorField(message, known = []) {
  const parts = String(message ?? '').split(/:\s+/).slice(0, -1);
  const paths = parts.map((p) => p.trim()).filter((p) => /^[A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*$/.test(p));
  const top = (p) => p.split(/[.[]/)[0];
  const byKey = paths.find((p) => known.includes(top(p)));
  if (byKey) return byKey;
  return paths.find((p) => /[.[]/.test(p) && !/\.(ya?ml|json|pem|toml)$/i.test(p)) || null;
}

/** The line (0-based start/end offsets) in pretty JSON `text` where `field` is defined. */
export function locateField(text, field) {
  const segs = field.split(/\.|\[\d+\]/).filter(Boolean);
  let from = 0;
  let at = -1;
  for (const seg of segs) {
    const quoted = JSON.stringify(seg).replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
    const re = new RegExp(`${quoted}\\s*:`, 'g');
    re.lastIndex = from;
    const m = re.exec(text);
    if (!m) break;
    at = m.index;
    from = m.index + m[0].length;
  }
  if (at < 0) return null;
  const start = text.lastIndexOf('\n', at) + 1;
  const nl = text.indexOf('\n', at);
  return { start, end: nl < 0 ? text.length : nl, line: text.slice(0, at).split('\n').length };
}

/** "14:03:07" today, "2026-11-21 14:03" on another day. */
function localTime(ms) {
  if (!isNum(ms)) return DASH;
  const d = new Date(ms);
  const p = (n) => String(n).padStart(2, '0');
  const time = `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  if (d.toDateString() === new Date().toDateString()) return time;
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${time.slice(0, 5)}`;
}

/** Seconds, for "ran 1.2 s". */
function secs(ms) {
  if (!isNum(ms)) return DASH;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  return ms < 60_000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.floor(ms / 60_000)} min ${Math.round((ms % 60_000) / 1000)} s`;
}

function mbps(v) {
  if (!isNum(v)) return DASH;
  return `${v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)} Mbit/s`;
}

/** "device offline — queued (2 waiting)" from an `ack` `queued`. */
function queuedText(depth) {
  return `device offline — queued${isNum(depth) ? ` (${depth} waiting)` : ''}`;
}

/** A word as a shell would need it written (for the "runs:" preview). */
function shellQuote(w) {
  return /^[\w@%+=:,./-]+$/.test(w) ? w : `'${w.replace(/'/g, "'\\''")}'`;
}

function listText(v) {
  return Array.isArray(v) && v.length ? v.map(String).join(', ') : 'none';
}

// ---- the panel -----------------------------------------------------------------------------

/**
 * The "Commands & processes" tab. Created once by app.js with the tab's `<section>`; see the
 * panel contract (open/update/close/onMessage/relayUp/relayDown).
 *
 * Root data attributes: `data-access` (view|control|admin), `data-link` (up|down),
 * `data-online` (true|false).
 */
export class CommandsPanel {
  /**
   * @param {HTMLElement} root  the tab's empty `<section>`
   * @param {object} ctx        the console context (panel contract)
   */
  constructor(root, ctx) {
    this.root = root;
    this.ctx = ctx;
    this._gen = 0;
    this._device = null;
    this._timer = 0;
    this._patchTimer = 0;
    root.classList.add('cmdp');
    this._build();
    this._reset();
    this._render();
  }

  // ---- contract ----

  /** A device view opened. */
  open(device) {
    this._gen++;
    this._reset();
    this._device = device || null;
    this._render();
  }

  /** The open device's record changed (access, online). */
  update(device) {
    if (!this._device) return;
    this._device = device || this._device;
    // The app may update the record in place, so compare with what was last drawn.
    if (this._shownOnline !== (this._device.online !== false)) this._renderProcesses();
    this._render();
  }

  /** The view closed: forget everything, ignore late answers, stop timers. */
  close() {
    this._gen++;
    this._device = null;
    this._reset();
    this._render();
  }

  /** Consumes the open device's `process_state`. */
  onMessage(msg) {
    if (!this._device || !msg || msg.type !== 'process_state') return false;
    if (msg.from !== undefined && msg.from !== this._device.id) return false;
    const list = msg.payload && Array.isArray(msg.payload.processes) ? msg.payload.processes : [];
    this._procs = list.filter((p) => isObj(p) && typeof p.name === 'string' && p.name);
    this._procsStale = false;
    this._procsSeen = true;
    this._renderProcesses();
    this._tickNeeded();
    return true;
  }

  /** Telemetry is not used here. */
  onTelemetry() {}

  relayUp() {
    this._render();
  }

  relayDown() {
    // The last snapshot stays on screen, marked as possibly out of date until a new one comes.
    if (this._procsSeen) this._procsStale = true;
    this._renderProcesses();
    this._render();
  }

  // ---- state ----

  _reset() {
    clearInterval(this._timer);
    this._timer = 0;
    clearTimeout(this._patchTimer);
    this._patchTimer = 0;
    this._runs = []; // newest first
    this._runSeq = 0;
    this._selected = null;
    this._speed = { state: 'idle' };
    this._procs = [];
    this._procsSeen = false;
    this._procsStale = false;
    this._procUi = new Map(); // name -> {pending, confirm, outcome}
    this._cfg = { loaded: null, text: '', protected: DEFAULT_PROTECTED, busy: null, stale: false };
    if (!this.el) return;
    const e = this.el;
    e.program.value = '';
    e.args.value = '';
    e.timeout.value = '';
    e.argsPreview.textContent = '';
    e.allowList.replaceChildren();
    e.editor.value = '';
    e.editor.removeAttribute('aria-invalid');
    this._showConfigError(null);
    this._setConfigResult(null);
    this._setConfigNote(null);
    this._cancelConfigConfirm();
    this._renderRun();
    this._renderHistory();
    this._renderSpeed();
    this._renderProcesses();
    this._renderPatch();
  }

  /** True while `gen` is still the open view's generation. */
  _live(gen) {
    return gen === this._gen && this._device !== null;
  }

  /** Why admin actions are not possible now, or null. `queueable`: offline is fine. */
  _blocked(queueable) {
    if (!this._device) return 'no device open';
    if (!this.ctx.connected()) return 'relay link down — reconnecting';
    if (this._device.access !== 'admin') return 'needs admin on this device';
    if (!queueable && this._device.online === false) return 'the device is offline';
    return null;
  }

  /** The local deadline for a routed request: long when the relay will queue it. */
  _wait(ms) {
    return this._device && this._device.online === false ? QUEUED_WAIT_MS : ms;
  }

  // ---- DOM ----

  _build() {
    const h = this.ctx.h;
    const e = (this.el = {});
    const section = (cls, title, sub, ...body) =>
      h('section', { class: `panel ${cls}`, 'aria-label': title },
        h('h3', {}, title, sub ? ' ' : null, sub ? h('span', { class: 'muted small', text: sub }) : null), ...body);
    const reason = (id) => (e[id] = h('p', {
      class: 'hint cmdp-reason', 'data-testid': `${id.replace(/Reason$/, '')}-reason`, hidden: true,
    }));

    // 1. Run a command.
    e.program = h('input', { id: 'cmd-program', type: 'text', 'data-testid': 'cmd-program', placeholder: 'uptime',
      autocomplete: 'off', spellcheck: 'false', list: 'cmd-allow-list', required: true });
    e.allowList = h('datalist', { id: 'cmd-allow-list' });
    e.args = h('input', { id: 'cmd-args', type: 'text', 'data-testid': 'cmd-args', placeholder: "-h /  or  'two words'",
      autocomplete: 'off', spellcheck: 'false' });
    e.timeout = h('input', { id: 'cmd-timeout', type: 'number', min: '1', step: 'any', 'data-testid': 'cmd-timeout',
      placeholder: 'default', inputmode: 'decimal' });
    e.run = h('button', { class: 'btn btn-primary', type: 'submit', 'data-testid': 'cmd-run', text: 'Run' });
    e.argsPreview = h('p', { class: 'hint mono cmdp-preview', 'data-testid': 'cmd-args-preview', 'aria-live': 'polite' });
    e.form = h('form', { class: 'cmdp-form', novalidate: true },
      h('label', { for: 'cmd-program' }, h('span', { text: 'Program' }), e.program),
      h('label', { for: 'cmd-args', class: 'cmdp-grow' }, h('span', { text: 'Arguments' }), e.args),
      h('label', { for: 'cmd-timeout', class: 'cmdp-narrow' }, h('span', { text: 'Timeout (s)' }), e.timeout),
      e.run, e.allowList);
    const cmdReason = reason('cmdReason');
    e.statusText = h('span');
    e.elapsed = h('span', { 'aria-hidden': 'true' });
    e.status = h('p', { class: 'cmdp-status', 'data-testid': 'cmd-status', role: 'status' }, e.statusText, e.elapsed);
    e.badges = h('span', { class: 'cmdp-badges', 'data-testid': 'cmd-badges' });
    e.outTitle = h('span', { class: 'mono cmdp-out-title', 'data-testid': 'cmd-output-title' });
    e.output = h('pre', { class: 'cmdp-term', 'data-testid': 'cmd-output', tabindex: '0', 'aria-label': 'Command output',
      'aria-live': 'off' });
    e.history = h('ol', { class: 'cmdp-history', 'data-testid': 'cmd-history', 'aria-label': 'Recent runs' });
    e.historyEmpty = h('p', { class: 'muted small', text: 'No runs yet.' });
    const runPanel = section('cmdp-run', 'Run a command', 'programs from the agent’s commands.allow, started without a shell',
      e.form, e.argsPreview, cmdReason, e.status,
      h('div', { class: 'cmdp-out-head' }, e.outTitle, e.badges), e.output,
      h('h3', { class: 'cmdp-sub', text: 'History' }), e.history, e.historyEmpty);

    // 2. Speed test.
    e.speedBytes = h('select', { id: 'speedtest-bytes', 'data-testid': 'speedtest-bytes' },
      ...SPEED_SIZES.map(([v, label]) => h('option', { value: String(v), text: label })));
    e.speedRun = h('button', { class: 'btn btn-primary', type: 'button', 'data-testid': 'speedtest-run', text: 'Run speed test' });
    const speedReason = reason('speedtestReason');
    e.speedResult = h('div', { class: 'cmdp-speed', 'data-testid': 'speedtest-result', 'aria-live': 'polite' });
    const speedPanel = section('cmdp-speedtest', 'Speed test', 'device ↔ relay, each way',
      h('div', { class: 'cmdp-row' }, h('label', { for: 'speedtest-bytes' }, 'Size ', e.speedBytes), e.speedRun),
      speedReason, e.speedResult);

    // 3. Processes.
    e.procBody = h('tbody');
    e.procTable = h('table', { class: 'cmdp-procs', 'data-testid': 'process-table' },
      h('thead', {}, h('tr', {}, ...['Name', 'State', 'PID', 'Restarts', 'Last exit', 'Since', 'Actions']
        .map((t) => h('th', { scope: 'col', class: ['PID', 'Restarts'].includes(t) ? 'num' : null, text: t })))),
      e.procBody);
    e.procEmpty = h('p', { class: 'muted', 'data-testid': 'process-empty',
      text: 'This device supervises no processes (config.yaml `paths`).' });
    e.procNote = h('p', { class: 'hint', 'data-testid': 'process-note', hidden: true });
    const procPanel = section('cmdp-processes', 'Processes', 'supervised by the agent; times are the device’s clock',
      e.procNote, h('div', { class: 'table-wrap' }, e.procTable), e.procEmpty);

    // 4. Config editor.
    e.cfgLoad = h('button', { class: 'btn', type: 'button', 'data-testid': 'config-load', text: 'Load config' });
    e.cfgValidate = h('button', { class: 'btn', type: 'button', 'data-testid': 'config-validate', text: 'Validate' });
    e.cfgApply = h('button', { class: 'btn btn-primary', type: 'button', 'data-testid': 'config-apply', text: 'Apply' });
    e.cfgReload = h('button', { class: 'btn btn-quiet', type: 'button', 'data-testid': 'config-reload', text: 'Reload from file',
      title: 'The agent reads config.yaml on the device again' });
    e.cfgConfirm = h('span', { class: 'cmdp-confirm', hidden: true });
    const cfgReason = reason('configReason');
    e.editor = h('textarea', { class: 'cmdp-editor', 'data-testid': 'config-editor', spellcheck: 'false', rows: '22',
      'aria-label': 'Agent configuration (JSON)', placeholder: 'Load the device’s configuration to edit it.', autocomplete: 'off',
      'aria-describedby': 'cmdp-editor-hint' });
    e.cfgError = h('div', { class: 'inline-error cmdp-cfg-error', 'data-testid': 'config-error', role: 'alert', hidden: true });
    e.cfgNote = h('p', { class: 'hint cmdp-note', 'data-testid': 'config-note', hidden: true });
    e.cfgResult = h('div', { class: 'cmdp-cfg-result', 'data-testid': 'config-result', 'aria-live': 'polite', hidden: true });
    e.patch = h('pre', { class: 'cmdp-patch', 'data-testid': 'config-patch', tabindex: '0', 'aria-label': 'Merge patch to send' });
    const cfgPanel = section('cmdp-config', 'Agent configuration', 'config.yaml as JSON; Apply sends only what changed',
      h('div', { class: 'cmdp-row' }, e.cfgLoad, e.cfgValidate, e.cfgApply, h('span', { class: 'spacer' }), e.cfgReload),
      e.cfgConfirm, cfgReason,
      h('div', { class: 'cmdp-cfg-cols' },
        h('div', { class: 'cmdp-cfg-main' }, e.cfgError, e.editor,
          h('p', { class: 'hint', id: 'cmdp-editor-hint',
            text: 'Tab indents; press Esc then Tab to leave the editor. Secrets show as <redacted>: leave them as they are.' }),
          e.cfgNote),
        h('div', { class: 'cmdp-cfg-side' }, h('h3', { class: 'cmdp-sub', text: 'Patch to send' }), e.patch, e.cfgResult)));

    this.root.replaceChildren(h('div', { class: 'cmdp-grid' }, runPanel, speedPanel, procPanel, cfgPanel));

    // Events.
    e.form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this._runCommand();
    });
    const preview = () => this._renderArgsPreview();
    e.program.addEventListener('input', preview);
    e.args.addEventListener('input', preview);
    e.history.addEventListener('click', (ev) => {
      const b = ev.target.closest('button[data-run]');
      if (b) this._select(Number(b.dataset.run));
    });
    e.speedRun.addEventListener('click', () => this._speedTest());
    e.procBody.addEventListener('click', (ev) => this._onProcClick(ev));
    e.procBody.addEventListener('keydown', (ev) => {
      const tr = ev.key === 'Escape' && ev.target.closest('tr[data-name]');
      if (tr && this._procUiOf(tr.dataset.name).confirm) {
        // Handled here: the app's Escape (back to the fleet) must not see it.
        ev.stopPropagation();
        this._procConfirm(tr.dataset.name, null);
      }
    });
    e.cfgLoad.addEventListener('click', () => this._loadConfigAsked());
    e.cfgValidate.addEventListener('click', () => this._validateClicked());
    e.cfgApply.addEventListener('click', () => this._applyConfig());
    e.cfgReload.addEventListener('click', () => this._reloadConfig());
    e.editor.addEventListener('keydown', (ev) => this._editorKey(ev));
    e.editor.addEventListener('input', () => {
      clearTimeout(this._patchTimer);
      this._patchTimer = setTimeout(() => this._renderPatch(), 250);
    });
  }

  /** Enables and explains every control from the current access, link and device state. */
  _render() {
    const e = this.el;
    const d = this._device;
    this.root.dataset.access = d ? String(d.access ?? '') : '';
    this.root.dataset.link = this.ctx.connected() ? 'up' : 'down';
    this.root.dataset.online = d ? String(d.online !== false) : '';

    const queueable = this._blocked(true);
    const live = this._blocked(false);
    const offlineNote = !queueable && d && d.online === false ? 'device offline — requests are queued and run when it reconnects' : null;

    for (const el of [e.program, e.args, e.timeout, e.run]) el.disabled = !!queueable;
    this._reason(e.cmdReason, queueable || offlineNote);

    e.speedBytes.disabled = !!queueable || this._speed.state === 'running' || this._speed.state === 'queued';
    e.speedRun.disabled = e.speedBytes.disabled;
    this._reason(e.speedtestReason, queueable || offlineNote);

    const busy = this._cfg.busy;
    const loaded = this._cfg.loaded !== null;
    e.cfgLoad.disabled = !!live || !!busy;
    e.cfgReload.disabled = !!queueable || !!busy;
    e.cfgValidate.disabled = !loaded;
    e.cfgApply.disabled = !!queueable || !!busy || !loaded;
    e.editor.readOnly = !loaded;
    e.cfgLoad.textContent = busy === 'load' ? 'Loading…' : 'Load config';
    e.cfgApply.textContent = busy === 'apply' ? 'Applying…' : 'Apply';
    e.cfgReload.textContent = busy === 'reload' ? 'Reloading…' : 'Reload from file';
    this._reason(e.configReason, live && live !== 'the device is offline' ? live
      : live ? 'the device is offline: loading needs it connected (changes are queued)' : null);

    this._renderProcActions();
  }

  _reason(el, text) {
    el.hidden = !text;
    el.textContent = text || '';
  }

  /** One interval while something shows elapsed time or a countdown; none otherwise. */
  _tickNeeded() {
    const needed = this._runs.some((r) => r.state === 'running' || r.state === 'sending')
      || this._speed.state === 'running'
      || this._procs.some((p) => p.state === 'restarting' && isNum(p.restartAt));
    if (needed && !this._timer) this._timer = setInterval(() => this._tick(), 1000);
    if (!needed && this._timer) {
      clearInterval(this._timer);
      this._timer = 0;
    }
  }

  _tick() {
    const sel = this._selectedRun();
    if (sel && (sel.state === 'running' || sel.state === 'sending')) this._renderStatus(sel);
    if (this._speed.state === 'running' && this.el.speedElapsed) this.el.speedElapsed.textContent = secs(Date.now() - this._speed.started);
    this._renderProcCountdowns();
    this._tickNeeded();
  }

  // ---- 1. run a command --------------------------------------------------------------------

  /** Program and argument words from the form; throws a sentence with `field` (the culprit). */
  _readForm() {
    const fail = (field, message) => Object.assign(new Error(message), { field });
    const split = (field, label) => {
      try {
        return splitArgs(this.el[field].value);
      } catch (err) {
        throw fail(field, `${label}: ${err.message}.`);
      }
    };
    const words = split('program', 'Program');
    if (!words.length) throw fail('program', 'Enter the program to run, e.g. uptime.');
    const args = [...words.slice(1), ...split('args', 'Arguments')];
    const t = this.el.timeout.value.trim();
    let timeoutMs;
    if (t) {
      const s = Number(t);
      if (!Number.isFinite(s) || s <= 0) throw fail('timeout', 'The timeout is a number of seconds above zero.');
      timeoutMs = Math.max(1, Math.round(s * 1000));
    }
    return { command: words[0], args, timeoutMs };
  }

  _renderArgsPreview() {
    const el = this.el.argsPreview;
    if (!this.el.program.value.trim() && !this.el.args.value.trim()) {
      el.textContent = '';
      return;
    }
    try {
      const { command, args } = this._readForm();
      el.textContent = `runs: ${[command, ...args].map(shellQuote).join(' ')}`;
      el.removeAttribute('data-invalid');
    } catch (err) {
      el.textContent = err.message;
      el.dataset.invalid = 'true';
    }
  }

  _runCommand() {
    if (this._blocked(true)) return;
    let form;
    try {
      form = this._readForm();
    } catch (err) {
      this.el.argsPreview.textContent = err.message;
      this.el.argsPreview.dataset.invalid = 'true';
      (this.el[err.field] || this.el.program).focus();
      return;
    }
    const run = {
      id: ++this._runSeq, ...form, started: Date.now(), state: 'sending', status: 'sending…',
      segs: [], shown: 0, next: { stdout: 0, stderr: 0 }, result: null,
    };
    this._runs.unshift(run);
    this._runs.length = Math.min(this._runs.length, HISTORY);
    this._selected = run.id;
    this._renderRun();
    this._renderHistory();
    this._tickNeeded();

    const gen = this._gen;
    const payload = { command: form.command, args: form.args };
    if (form.timeoutMs !== undefined) payload.timeoutMs = form.timeoutMs;
    const label = [form.command, ...form.args].join(' ');
    this.ctx.log('info', 'command', `run ${label}`);
    this.ctx.request('execute_command', payload, {
      clientID: this._device.id,
      timeoutMs: this._wait(form.timeoutMs !== undefined ? form.timeoutMs + 5000 + SLACK_MS : RELAY_DEADLINE_MS),
      onAck: (ack) => {
        if (!this._live(gen) || run.result) return;
        if (ack.status === 'queued') {
          run.state = 'queued';
          run.status = `${queuedText(ack.queueDepth)}, runs when it reconnects`;
          this._runChanged(run, true);
          return;
        }
        run.state = 'running';
        run.status = 'running';
        this._runChanged(run);
      },
      onProgress: (p) => {
        if (!this._live(gen) || run.result) return;
        run.state = 'running';
        run.status = 'running';
        this._addChunk(run, p);
      },
    }).then((msg) => {
      if (!this._live(gen)) return;
      this._finishRun(run, msg, label);
    }, (err) => {
      if (!this._live(gen)) return;
      run.result = { error: err };
      run.state = REFUSAL_CODES.has(err.code) ? 'refused' : 'failed';
      run.status = describeFailure(err);
      this.ctx.log('error', 'command', `${label}: ${run.status}`);
      this._runChanged(run, true);
    });
  }

  _finishRun(run, msg, label) {
    const p = isObj(msg.payload) ? msg.payload : {};
    if (msg.type === 'command_output') {
      run.result = {
        stdout: typeof p.stdout === 'string' ? p.stdout : '',
        stderr: typeof p.stderr === 'string' ? p.stderr : '',
        exitCode: Number.isInteger(p.exitCode) ? p.exitCode : null,
        durationMs: isNum(p.durationMs) ? p.durationMs : null,
        timedOut: p.timedOut === true,
        truncated: p.truncated === true,
      };
      run.state = 'done';
      run.status = `finished at ${localTime(Date.now())}`;
      const cut = run.result.truncated ? ' (output truncated)' : '';
      this.ctx.log(run.result.exitCode === 0 ? 'info' : 'warn', 'command', `${label}: ${this._doneText(run.result)}${cut}`);
    } else if (msg.type === 'command_result' && p.ok === false) {
      run.result = { refusal: resultError(msg), code: p.code };
      run.state = 'refused';
      run.status = `refused: ${resultError(msg)}`;
      this._learnAllowList(p.error);
      this.ctx.log('warn', 'command', `${label}: ${run.status}`);
    } else {
      // Not what the shipped agent sends; show whatever came rather than nothing.
      run.result = { stdout: JSON.stringify(p, null, 2), stderr: '', exitCode: null, other: msg.type };
      run.state = 'done';
      run.status = `answered with ${msg.type}`;
    }
    this._runChanged(run, true);
  }

  _doneText(r) {
    if (r.timedOut) return `timed out after ${secs(r.durationMs)}`;
    if (r.exitCode === null) return 'could not start, or was killed';
    return `exit ${r.exitCode}${r.durationMs !== null ? ` in ${secs(r.durationMs)}` : ''}`;
  }

  /** "… is not in this device's commands.allow list (uptime, df)" -> suggestions for the field. */
  _learnAllowList(error) {
    const m = /commands\.allow list \(([^)]*)\)/.exec(String(error ?? ''));
    if (!m) return;
    const names = m[1].split(',').map((s) => s.trim()).filter(Boolean);
    this.el.allowList.replaceChildren(...names.map((n) => this.ctx.h('option', { value: n })));
  }

  /** Adds one command_progress chunk, marking a gap the offset reveals. */
  _addChunk(run, p) {
    const stream = p.stream === 'stderr' ? 'stderr' : 'stdout';
    const data = typeof p.data === 'string' ? p.data : '';
    const offset = isNum(p.offset) ? p.offset : run.next[stream];
    if (offset < run.next[stream]) return; // a repeat of what is already shown
    const segs = [];
    if (offset > run.next[stream]) segs.push({ stream, gap: offset - run.next[stream] });
    run.next[stream] = offset + utf8.encode(data).length;
    if (data) segs.push({ stream, text: data });
    for (const s of segs) {
      if (s.text !== undefined) {
        if (run.shown >= MAX_SHOWN * 2) {
          s.text = undefined;
          s.clipped = true;
        } else {
          run.shown += s.text.length;
        }
      }
      const last = run.segs[run.segs.length - 1];
      if (s.clipped && last && last.clipped) continue;
      run.segs.push(s);
      if (this._selected === run.id) this._appendSeg(s);
    }
    if (this._selected === run.id) {
      this._renderStatus(run);
      this.el.output.dataset.state = 'running';
    }
  }

  _segEl(s) {
    const h = this.ctx.h;
    if (s.gap) return h('span', { class: 'cmdp-gap', text: `[… ${s.gap} bytes of ${s.stream} skipped]\n` });
    if (s.clipped) {
      return h('span', { class: 'cmdp-gap', text: '[… more output than this pane shows; the complete output follows when the program ends]\n' });
    }
    return h('span', { class: s.stream === 'stderr' ? 'cmdp-stderr' : null, text: s.text });
  }

  _appendSeg(s) {
    const out = this.el.output;
    const atEnd = out.scrollHeight - out.scrollTop - out.clientHeight < 24;
    const empty = out.querySelector('.cmdp-placeholder');
    if (empty) empty.remove();
    out.append(this._segEl(s));
    if (atEnd) out.scrollTop = out.scrollHeight;
  }

  _runChanged(run, final = false) {
    if (this._selected === run.id) {
      if (final) this._renderRun();
      else this._renderStatus(run);
    }
    this._renderHistory();
    this._tickNeeded();
  }

  _selectedRun() {
    return this._runs.find((r) => r.id === this._selected) || null;
  }

  _select(id) {
    this._selected = id;
    this._renderRun();
    this._renderHistory();
  }

  _renderStatus(run) {
    const e = this.el;
    e.output.dataset.state = run.state === 'sending' ? 'running' : run.state;
    const going = run.state === 'running' || run.state === 'sending';
    e.statusText.textContent = going ? `${run.status}…` : run.status;
    e.elapsed.textContent = going ? ` ${secs(Date.now() - run.started)}` : '';
    e.status.dataset.state = run.state;
  }

  /** Redraws the pane for the selected run (streamed chunks, or the final output). */
  _renderRun() {
    const e = this.el;
    const h = this.ctx.h;
    const run = this._selectedRun();
    e.badges.replaceChildren();
    e.output.removeAttribute('data-exit-code');
    if (!run) {
      e.output.dataset.state = 'idle';
      e.statusText.textContent = '';
      e.elapsed.textContent = '';
      e.status.dataset.state = 'idle';
      e.outTitle.textContent = '';
      e.output.replaceChildren(h('span', { class: 'cmdp-placeholder', text: 'Output appears here.' }));
      return;
    }
    e.outTitle.textContent = `$ ${[run.command, ...run.args].join(' ')}`;
    e.outTitle.title = `started ${fullDate(run.started)}`;
    this._renderStatus(run);
    const r = run.result;
    const badge = (cls, text, testid) => e.badges.append(h('span', { class: `badge ${cls}`, text, 'data-testid': testid }));
    if (r && 'stdout' in r) {
      if (r.exitCode !== null) e.output.dataset.exitCode = String(r.exitCode);
      if (r.timedOut) badge('cmdp-bad', 'timed out', 'cmd-badge-timeout');
      else if (r.exitCode === null) badge('cmdp-bad', 'no exit code', 'cmd-badge-exit');
      else badge(r.exitCode === 0 ? 'cmdp-good' : 'cmdp-bad', this._doneText(r), 'cmd-badge-exit');
      if (r.truncated) badge('cmdp-warn', 'truncated', 'cmd-badge-truncated');
      const parts = [];
      const add = (text, stream) => {
        if (!text) return;
        parts.push(h('span', { class: stream === 'stderr' ? 'cmdp-stderr' : null, text: text.slice(0, MAX_SHOWN) }));
        if (text.length > MAX_SHOWN) {
          const more = `\n[… ${text.length - MAX_SHOWN} more characters of ${stream} not shown here]\n`;
          parts.push(h('span', { class: 'cmdp-gap', text: more }));
        }
      };
      add(r.stdout, 'stdout');
      if (r.stdout && r.stderr && !r.stdout.endsWith('\n')) parts.push('\n');
      add(r.stderr, 'stderr');
      if (!parts.length) parts.push(h('span', { class: 'cmdp-placeholder', text: '(no output)' }));
      e.output.replaceChildren(...parts);
    } else if (r && (r.refusal || r.error)) {
      badge('cmdp-bad', run.state, 'cmd-badge-refused');
      const text = r.refusal ? `Refused by the device: ${r.refusal}` : describeFailure(r.error);
      e.output.replaceChildren(h('span', { class: 'cmdp-refusal', text }));
    } else {
      if (run.state === 'queued') badge('cmdp-warn', 'queued', 'cmd-badge-queued');
      const segs = run.segs.map((s) => this._segEl(s));
      const waiting = run.state === 'queued' ? 'Waiting for the device to reconnect…' : 'Waiting for output…';
      e.output.replaceChildren(...(segs.length ? segs : [h('span', { class: 'cmdp-placeholder', text: waiting })]));
    }
    e.output.scrollTop = e.output.scrollHeight;
  }

  _renderHistory() {
    const h = this.ctx.h;
    const e = this.el;
    e.historyEmpty.hidden = this._runs.length > 0;
    e.history.replaceChildren(...this._runs.map((r) => {
      const current = r.id === this._selected;
      const look = r.state === 'done' && !(r.result && r.result.exitCode === 0) ? 'failed' : r.state;
      return h('li', {},
        h('button', { type: 'button', class: 'cmdp-hist', 'data-testid': 'cmd-history-item', 'data-run': String(r.id),
          'data-state': r.state, 'aria-current': current ? 'true' : null, title: `started ${fullDate(r.started)}` },
          h('span', { class: 'mono cmdp-hist-cmd', text: [r.command, ...r.args].join(' ') }),
          h('span', { class: `cmdp-dot cmdp-st-${look}`, text: this._histState(r) }),
          h('time', { class: 'muted small', text: localTime(r.started) })));
    }));
  }

  _histState(r) {
    if (r.state === 'done' && r.result) {
      if (r.result.timedOut) return 'timed out';
      return r.result.exitCode === null ? 'no exit code' : `exit ${r.result.exitCode}`;
    }
    return r.state === 'sending' ? 'running' : r.state;
  }

  // ---- 2. speed test -------------------------------------------------------------------------

  _speedTest() {
    if (this._blocked(true) || this._speed.state === 'running' || this._speed.state === 'queued') return;
    const bytes = Number(this.el.speedBytes.value) || SPEED_SIZES[0][0];
    const gen = this._gen;
    this._speed = { state: 'running', bytes, started: Date.now() };
    this._renderSpeed();
    this._render();
    this._tickNeeded();
    const done = (s) => {
      if (!this._live(gen)) return;
      this._speed = { ...s, bytes, tookMs: Date.now() - this._speed.started };
      this._renderSpeed();
      this._render();
      this._tickNeeded();
    };
    this.ctx.log('info', 'speedtest', `speed test, ${bytes / 1e6} MB each way`);
    this.ctx.request('speed_test', { bytes }, {
      clientID: this._device.id,
      timeoutMs: this._wait(RELAY_DEADLINE_MS),
      onAck: (ack) => {
        if (!this._live(gen) || ack.status !== 'queued') return;
        this._speed = { ...this._speed, state: 'queued', queueDepth: ack.queueDepth };
        this._renderSpeed();
        this._render();
      },
    }).then((msg) => {
      const p = isObj(msg.payload) ? msg.payload : {};
      if (msg.type === 'speed_test_result') {
        done({ state: 'done', result: p });
        this.ctx.log('info', 'speedtest', `rtt ${formatMs(p.rttMs)}, down ${mbps(p.downloadMbps)}, up ${mbps(p.uploadMbps)}`);
      } else {
        const text = resultError(msg) || `unexpected answer ${msg.type}`;
        done({ state: 'failed', error: text });
        this.ctx.log('error', 'speedtest', text);
      }
    }, (err) => {
      done({ state: 'failed', error: describeFailure(err) });
      if (this._live(gen)) this.ctx.log('error', 'speedtest', describeFailure(err));
    });
  }

  _renderSpeed() {
    const h = this.ctx.h;
    const s = this._speed;
    const el = this.el.speedResult;
    el.dataset.state = s.state;
    const size = (b) => (SPEED_SIZES.find(([v]) => v === b) || [0, `${b} bytes`])[1];
    if (s.state === 'idle') {
      const text = 'Measures the round trip, then downloads and uploads the chosen size through the relay.';
      el.replaceChildren(h('p', { class: 'muted small', text }));
    } else if (s.state === 'running') {
      this.el.speedElapsed = h('span', { 'aria-hidden': 'true', text: secs(Date.now() - s.started) });
      el.replaceChildren(h('p', { class: 'cmdp-running' }, `running (${size(s.bytes)} each way)… `, this.el.speedElapsed));
    } else if (s.state === 'queued') {
      el.replaceChildren(h('p', { class: 'cmdp-warn-text', text: `${queuedText(s.queueDepth)}, runs when it reconnects` }));
    } else if (s.state === 'failed') {
      el.replaceChildren(h('p', { class: 'inline-error', 'data-testid': 'speedtest-error', text: s.error }));
    } else {
      const r = s.result;
      const fig = (label, value, testid) => h('div', { class: 'cmdp-fig' },
        h('dt', { text: label }), h('dd', { class: 'mono', 'data-testid': testid, text: value }));
      el.replaceChildren(
        h('dl', { class: 'cmdp-figs' },
          fig('Round trip', formatMs(r.rttMs), 'speedtest-rtt'),
          fig('Download', mbps(r.downloadMbps), 'speedtest-down'),
          fig('Upload', mbps(r.uploadMbps), 'speedtest-up')),
        h('p', { class: 'muted small', text: `${size(s.bytes)} each way; answered in ${secs(s.tookMs)}, at ${localTime(Date.now())}` }));
    }
  }

  // ---- 3. processes --------------------------------------------------------------------------

  _procUiOf(name) {
    let u = this._procUi.get(name);
    if (!u) this._procUi.set(name, (u = { pending: null, confirm: null, outcome: null }));
    return u;
  }

  /** Rebuilds the rows from the latest snapshot, keeping focus, confirmations and outcomes. */
  _renderProcesses() {
    const e = this.el;
    const h = this.ctx.h;
    const names = new Set(this._procs.map((p) => p.name));
    for (const n of [...this._procUi.keys()]) if (!names.has(n)) this._procUi.delete(n);
    const existing = new Map([...e.procBody.children].map((tr) => [tr.dataset.name, tr]));
    const rows = this._procs.map((p) => {
      let tr = existing.get(p.name);
      if (!tr) {
        tr = h('tr', { 'data-testid': 'process-row' },
          h('th', { scope: 'row', class: 'mono cmdp-pname' }),
          h('td', { class: 'cmdp-pstate' }),
          h('td', { class: 'num mono' }),
          h('td', { class: 'num mono' }),
          h('td', { class: 'mono cmdp-pexit' }),
          h('td', { class: 'mono' }),
          h('td', { class: 'cmdp-pactions' }));
        tr.dataset.name = p.name;
      }
      existing.delete(p.name);
      this._fillRow(tr, p);
      return tr;
    });
    for (const tr of existing.values()) tr.remove();
    rows.forEach((tr, i) => {
      if (e.procBody.children[i] !== tr) e.procBody.insertBefore(tr, e.procBody.children[i] || null);
    });
    const none = this._procs.length === 0;
    e.procTable.hidden = none;
    e.procEmpty.hidden = !none;
    this._shownOnline = !this._device || this._device.online !== false;
    e.procTable.dataset.stale = String(this._procsStale || !this._shownOnline);
    const note = none ? null
      : this._procsStale ? 'The relay link was down: this is the last known state until the next update.'
        : !this._shownOnline ? 'The device is offline: this is its last known state.' : null;
    e.procNote.hidden = !note;
    e.procNote.textContent = note || '';
    this._renderProcActions();
  }

  _fillRow(tr, p) {
    const h = this.ctx.h;
    const c = tr.children;
    const state = typeof p.state === 'string' ? p.state : 'unknown';
    tr.dataset.state = state;
    c[0].textContent = p.name;
    const cls = `badge cmdp-ps cmdp-ps-${state.replace(/[^a-z]/g, '')}`;
    const badge = h('span', { class: cls, 'data-testid': 'process-state', text: state });
    const countdown = h('span', { class: 'small cmdp-countdown', 'data-testid': 'process-countdown' });
    c[1].replaceChildren(badge, countdown);
    c[2].textContent = isNum(p.pid) ? String(p.pid) : DASH;
    c[3].textContent = isNum(p.restarts) ? String(p.restarts) : '0';
    c[4].textContent = typeof p.lastExit === 'string' && p.lastExit ? p.lastExit : DASH;
    c[4].title = c[4].textContent;
    c[5].textContent = localTime(p.since);
    c[5].title = isNum(p.since) ? `${fullDate(p.since)} (device clock)` : '';
    this._fillCountdown(countdown, p);
  }

  _fillCountdown(el, p) {
    if (p.state === 'restarting' && isNum(p.restartAt)) {
      const s = Math.ceil((p.restartAt - Date.now()) / 1000);
      el.textContent = s > 0 ? ` in ${s} s` : ' due now';
    } else {
      el.textContent = '';
    }
  }

  _renderProcCountdowns() {
    for (const tr of this.el.procBody.children) {
      const p = this._procs.find((x) => x.name === tr.dataset.name);
      const el = tr.querySelector('.cmdp-countdown');
      if (p && el) this._fillCountdown(el, p);
    }
  }

  /** The actions cell of every row: buttons, an inline confirmation, the last outcome. */
  _renderProcActions() {
    const h = this.ctx.h;
    const blocked = this._blocked(false);
    for (const tr of this.el.procBody.children) {
      const name = tr.dataset.name;
      const p = this._procs.find((x) => x.name === name) || {};
      const u = this._procUiOf(name);
      const cell = tr.lastElementChild;
      // Rebuild only what changed: update() comes every few seconds, and a button replaced
      // under the pointer between mousedown and mouseup loses its click.
      const sig = JSON.stringify([blocked, u.pending, u.confirm, u.outcome, p.state]);
      if (tr.dataset.sig === sig) continue;
      tr.dataset.sig = sig;
      const focused = cell.contains(document.activeElement) ? document.activeElement.dataset.testid : null;
      const parts = [];
      if (u.confirm && !u.pending) {
        parts.push(h('span', { class: 'cmdp-confirm', role: 'group', 'aria-label': `Confirm ${u.confirm}` },
          h('span', { text: `${u.confirm === 'stop' ? 'Stop' : 'Restart'} ${name}? ` }),
          h('button', { class: 'btn btn-small cmdp-danger', type: 'button', 'data-testid': 'process-confirm', 'data-action': 'confirm',
            text: u.confirm === 'stop' ? 'Yes, stop' : 'Yes, restart', disabled: !!blocked }),
          h('button', { class: 'btn btn-small btn-quiet', type: 'button', 'data-testid': 'process-cancel', 'data-action': 'cancel',
            text: 'Cancel' })));
      } else {
        const btn = (action, label, off) => h('button', {
          class: 'btn btn-small', type: 'button', 'data-testid': `process-${action}`, 'data-action': action, text: label,
          disabled: !!(blocked || u.pending || off), title: blocked ? `Not now: ${blocked}` : null,
          'aria-label': `${label} ${name}`,
        });
        parts.push(
          btn('start', 'Start', p.state === 'running' || p.state === 'starting'),
          btn('stop', 'Stop', p.state === 'stopped'),
          btn('restart', 'Restart', false));
      }
      const o = u.pending ? { kind: 'pending', text: `${u.pending}…` } : u.outcome;
      parts.push(h('span', { class: 'cmdp-outcome small', 'data-testid': 'process-outcome', 'data-outcome': o ? o.kind : 'none',
        role: 'status', text: o ? o.text : '' }));
      cell.replaceChildren(h('div', { class: 'cmdp-acts' }, ...parts));
      if (focused) {
        const again = cell.querySelector(`[data-testid="${focused}"]`) || cell.querySelector('button:not(:disabled)');
        if (again) again.focus();
      }
    }
  }

  _onProcClick(ev) {
    const b = ev.target.closest('button[data-action]');
    const tr = ev.target.closest('tr[data-name]');
    if (!b || !tr) return;
    const name = tr.dataset.name;
    const action = b.dataset.action;
    const u = this._procUiOf(name);
    if (action === 'cancel') this._procConfirm(name, null);
    else if (action === 'confirm') this._procSend(name, u.confirm);
    else if (action === 'start') this._procSend(name, 'start');
    else this._procConfirm(name, action);
  }

  _procConfirm(name, action) {
    const u = this._procUiOf(name);
    const was = u.confirm;
    u.confirm = action;
    this._renderProcActions();
    const tr = [...this.el.procBody.children].find((r) => r.dataset.name === name);
    if (!tr) return;
    const target = tr.querySelector(action ? '[data-testid="process-confirm"]' : `[data-testid="process-${was || 'stop'}"]`);
    if (target) target.focus();
  }

  _procSend(name, action) {
    if (!action || this._blocked(false)) return;
    const u = this._procUiOf(name);
    if (u.pending) return;
    u.confirm = null;
    u.pending = { start: 'starting', stop: 'stopping', restart: 'restarting' }[action];
    u.outcome = null;
    this._renderProcActions();
    const gen = this._gen;
    this.ctx.log('info', 'process', `${action} ${name}`);
    const finish = (kind, text) => {
      if (!this._live(gen)) return;
      u.pending = null;
      u.outcome = { kind, text: `${text} · ${localTime(Date.now())}` };
      this.ctx.log(kind === 'ok' ? 'info' : 'error', 'process', `${action} ${name}: ${text}`);
      this._renderProcActions();
    };
    this.ctx.request('process_command', { action, name }, { clientID: this._device.id, timeoutMs: RELAY_DEADLINE_MS })
      .then((msg) => {
        const p = isObj(msg.payload) ? msg.payload : {};
        if (msg.type === 'command_result' && p.ok === true) {
          const d = isObj(p.data) ? p.data : {};
          const now = typeof d.state === 'string' ? `, now ${d.state}` : '';
          finish('ok', d.changed === false ? `${action}: nothing to do${now}` : `${action}: done${now}`);
        } else {
          finish('error', `${action} failed: ${resultError(msg) || `unexpected answer ${msg.type}`}`);
        }
      }, (err) => finish('error', `${action} failed: ${describeFailure(err)}`));
  }

  // ---- 4. configuration ----------------------------------------------------------------------

  _dirty() {
    return this._cfg.loaded !== null && this.el.editor.value !== this._cfg.text;
  }

  _loadConfigAsked() {
    if (this._dirty()) {
      this._askConfig('Discard your edits and load the device’s configuration?', 'Discard and load', () => this._loadConfig());
    } else {
      this._loadConfig();
    }
  }

  _askConfig(question, label, onYes) {
    const h = this.ctx.h;
    const el = this.el.cfgConfirm;
    const yes = h('button', { class: 'btn btn-small cmdp-danger', type: 'button', 'data-testid': 'config-confirm', text: label });
    const no = h('button', { class: 'btn btn-small btn-quiet', type: 'button', 'data-testid': 'config-cancel', text: 'Cancel' });
    yes.addEventListener('click', () => {
      this._cancelConfigConfirm();
      onYes();
    });
    no.addEventListener('click', () => {
      this._cancelConfigConfirm();
      this.el.cfgLoad.focus();
    });
    el.replaceChildren(h('span', { text: `${question} ` }), yes, no);
    el.onkeydown = (ev) => {
      if (ev.key === 'Escape') {
        ev.stopPropagation();
        no.click();
      }
    };
    el.hidden = false;
    yes.focus();
  }

  _cancelConfigConfirm() {
    if (!this.el) return;
    this.el.cfgConfirm.hidden = true;
    this.el.cfgConfirm.replaceChildren();
  }

  /** Asks the device for its configuration; `keepResult` keeps the last result shown. */
  _loadConfig(keepResult = false) {
    if (this._blocked(false) || this._cfg.busy) return;
    const gen = this._gen;
    this._cfg.busy = 'load';
    this._showConfigError(null);
    this._setConfigNote(null);
    this._render();
    this.ctx.request('get_client_config', {}, { clientID: this._device.id, timeoutMs: RELAY_DEADLINE_MS })
      .then((msg) => {
        if (!this._live(gen)) return;
        this._cfg.busy = null;
        const p = isObj(msg.payload) ? msg.payload : {};
        const data = isObj(p.data) ? p.data : {};
        if (msg.type !== 'command_result' || p.ok !== true || !isObj(data.config)) {
          const why = resultError(msg) || 'the device sent no configuration';
          this._showConfigError({ text: `Could not load the configuration: ${why}`, code: p.code || 'load' });
        } else {
          const prot = Array.isArray(data.protected) ? data.protected.filter((k) => typeof k === 'string') : DEFAULT_PROTECTED;
          this._setLoaded(data.config, prot);
          if (!keepResult) this._setConfigResult(null);
          this._setConfigNote(`Loaded at ${localTime(Date.now())}.`);
        }
        this._render();
      }, (err) => {
        if (!this._live(gen)) return;
        this._cfg.busy = null;
        this._showConfigError({ text: `Could not load the configuration: ${describeFailure(err)}`, code: err.code });
        this._render();
      });
  }

  _setLoaded(config, prot) {
    const text = `${JSON.stringify(config, null, 2)}\n`;
    this._cfg.loaded = config;
    this._cfg.text = text;
    this._cfg.protected = prot;
    this._cfg.stale = false;
    this.el.editor.value = text;
    this.el.editor.removeAttribute('aria-invalid');
    this._renderPatch();
  }

  /**
   * Checks the editor: JSON syntax, an object at the top, protected keys unchanged, no
   * `<redacted>` placeholder sent back as a value. Returns `{config, patch}` or `{error}`.
   */
  _check() {
    const text = this.el.editor.value;
    let config;
    try {
      config = JSON.parse(text);
    } catch (err) {
      const pos = jsonErrorPosition(err.message, text);
      // The position is shown as "Line L, column C"; drop the engine's own way of saying it.
      const msg = String(err.message).replace(/^JSON\.parse: /, '')
        .replace(/\s*(in JSON )?at position \d+( \(line \d+ column \d+\))?/, '')
        .replace(/\s*at line \d+ column \d+ of the JSON data/, '');
      return { error: { text: pos ? `Line ${pos.line}, column ${pos.column}: ${msg}` : msg, code: 'syntax', pos } };
    }
    if (!isObj(config)) return { error: { text: 'The configuration must be one JSON object ({ … }).', code: 'syntax' } };
    for (const key of this._cfg.protected) {
      if (!jsonEqual(getPath(this._cfg.loaded, key), getPath(config, key))) {
        const text = `${key}: protected — it can only be changed in config.yaml on the device; put back its loaded value.`;
        return { error: { text, code: 'protected', field: key } };
      }
    }
    const patch = mergePatch(this._cfg.loaded, config);
    const secret = findRedacted(patch);
    if (secret.length) {
      const field = secret[0].replace(/^\(root\)$/, '');
      const text = `${secret[0]}: would send the placeholder ${REDACTED} as the value; type the real secret, or leave the setting unchanged.`;
      return { error: { text, code: 'redacted', field: field || undefined } };
    }
    return { config, patch };
  }

  _validateClicked() {
    if (this._cfg.loaded === null) return;
    const r = this._check();
    if (r.error) {
      this._showConfigError(r.error, true);
      this._setConfigNote(null);
      return;
    }
    this._showConfigError(null);
    const n = patchPaths(r.patch).length;
    const list = patchPaths(r.patch).join(', ');
    this._setConfigNote(n ? `Valid. ${n} setting${n === 1 ? '' : 's'} would change: ${list}.` : 'Valid, and nothing changed.');
  }

  _applyConfig() {
    if (this._blocked(true) || this._cfg.busy || this._cfg.loaded === null) return;
    if (this._cfg.stale) {
      this._showConfigError({
        text: 'The device reloaded its config.yaml since you loaded it: Load config again before applying (your edits would be compared with an old copy).',
        code: 'stale',
      });
      return;
    }
    const r = this._check();
    this._renderPatch();
    if (r.error) {
      this._showConfigError(r.error, true);
      return;
    }
    this._showConfigError(null);
    if (!Object.keys(r.patch).length) {
      this._setConfigNote('Nothing to apply: the editor matches the loaded configuration.');
      return;
    }
    this._setConfigNote(null);
    const gen = this._gen;
    const editedText = this.el.editor.value;
    this._cfg.busy = 'apply';
    this._setConfigResult({ state: 'pending', text: 'Sending the patch…' });
    this._render();
    this.ctx.log('info', 'config', `update_client_config: ${patchPaths(r.patch).join(', ')}`);
    this.ctx.request('update_client_config', { config: r.patch }, {
      clientID: this._device.id,
      timeoutMs: this._wait(RELAY_DEADLINE_MS),
      onAck: (ack) => {
        if (this._live(gen) && ack.status === 'queued') {
          this._setConfigResult({ state: 'queued', text: `${queuedText(ack.queueDepth)}; it applies when the device reconnects.` });
        }
      },
    }).then((msg) => {
      if (!this._live(gen)) return;
      this._cfg.busy = null;
      if (this._configAnswer(msg, 'Applied')) {
        // The applied configuration is the new baseline for the next patch.
        this._cfg.loaded = r.config;
        this._cfg.text = editedText;
        this._renderPatch();
      }
      this._render();
    }, (err) => this._configFailed(gen, err));
  }

  _reloadConfig() {
    if (this._blocked(true) || this._cfg.busy) return;
    const gen = this._gen;
    this._cfg.busy = 'reload';
    this._showConfigError(null);
    this._setConfigNote(null);
    this._setConfigResult({ state: 'pending', text: 'Asking the agent to read config.yaml again…' });
    this._render();
    this.ctx.log('info', 'config', 'reload_config');
    this.ctx.request('reload_config', {}, {
      clientID: this._device.id,
      timeoutMs: this._wait(RELAY_DEADLINE_MS),
      onAck: (ack) => {
        if (this._live(gen) && ack.status === 'queued') {
          this._setConfigResult({ state: 'queued', text: 'Device offline — queued; it reloads when the device reconnects.' });
        }
      },
    }).then((msg) => {
      if (!this._live(gen)) return;
      this._cfg.busy = null;
      if (this._configAnswer(msg, 'Reloaded from config.yaml') && this._cfg.loaded !== null) {
        if (this._dirty()) this._cfg.stale = true;
        else if (this._device.online !== false) this._loadConfig(true);
      }
      this._render();
    }, (err) => this._configFailed(gen, err));
  }

  /** Shows an update/reload answer; true when it succeeded. */
  _configAnswer(msg, what) {
    const p = isObj(msg.payload) ? msg.payload : {};
    if (msg.type === 'command_result' && p.ok === true) {
      const d = isObj(p.data) ? p.data : {};
      const lines = [
        ['Needs an agent restart', d.restartRequired, 'restart'],
        ['Started', d.started, 'started'],
        ['Restarted', d.restarted, 'restarted'],
        ['Stopped', d.stopped, 'stopped'],
        ['Unchanged', d.unchanged, 'unchanged'],
      ];
      this._setConfigResult({ state: 'ok', text: `${what} at ${localTime(Date.now())}.`, lines });
      this.ctx.log('info', 'config', `${what}; restart required: ${listText(d.restartRequired)}; started: ${listText(d.started)}; `
        + `restarted: ${listText(d.restarted)}; stopped: ${listText(d.stopped)}`);
      return true;
    }
    const text = resultError(msg) || `unexpected answer ${msg.type}`;
    const field = errorField(p.error, this._cfg.loaded ? Object.keys(this._cfg.loaded) : []);
    this._setConfigResult({ state: 'error', text: 'Not applied: the device kept its configuration.' });
    this._showConfigError({ text, code: p.code || 'error', field }, true);
    this.ctx.log('error', 'config', text);
    return false;
  }

  _configFailed(gen, err) {
    if (!this._live(gen)) return;
    this._cfg.busy = null;
    this._setConfigResult({ state: 'error', text: 'No confirmation from the device.' });
    this._showConfigError({ text: describeFailure(err), code: err.code });
    this.ctx.log('error', 'config', describeFailure(err));
    this._render();
  }

  _setConfigNote(text) {
    this.el.cfgNote.hidden = !text;
    this.el.cfgNote.textContent = text || '';
  }

  _setConfigResult(r) {
    const h = this.ctx.h;
    const el = this.el.cfgResult;
    el.hidden = !r;
    el.dataset.state = r ? r.state : 'none';
    if (!r) {
      el.replaceChildren();
      return;
    }
    const parts = [h('p', { class: 'cmdp-result-head', text: r.text })];
    if (r.lines) {
      parts.push(h('dl', { class: 'cmdp-report' }, ...r.lines.flatMap(([label, list, key]) => [
        h('dt', { text: label }),
        h('dd', { class: `mono${key === 'restart' && Array.isArray(list) && list.length ? ' cmdp-warn-text' : ''}`,
          'data-testid': `config-result-${key}`, text: listText(list) }),
      ])));
    }
    el.replaceChildren(...parts);
  }

  /**
   * Shows (or hides, with null) the inline error next to the editor. `err.field` names the
   * configuration field at fault; its line is selected in the editor. `err.pos` (syntax
   * errors) selects the character.
   */
  _showConfigError(err, point = false) {
    const h = this.ctx.h;
    const el = this.el.cfgError;
    const editor = this.el.editor;
    if (!err) {
      el.hidden = true;
      el.replaceChildren();
      el.removeAttribute('data-field');
      el.removeAttribute('data-code');
      editor.removeAttribute('aria-invalid');
      return;
    }
    el.hidden = false;
    el.dataset.code = err.code || '';
    if (err.field) el.dataset.field = err.field;
    else el.removeAttribute('data-field');
    editor.setAttribute('aria-invalid', 'true');
    const parts = [h('span', { text: err.text })];
    if (err.field) {
      const go = h('button', { class: 'btn btn-small btn-quiet cmdp-field', type: 'button', 'data-testid': 'config-error-field',
        text: `Go to ${err.field}` });
      go.addEventListener('click', () => this._pointAtField(err.field));
      parts.push(' ', go);
    } else if (err.pos) {
      const go = h('button', { class: 'btn btn-small btn-quiet cmdp-field', type: 'button', 'data-testid': 'config-error-field',
        text: `Go to line ${err.pos.line}` });
      go.addEventListener('click', () => this._selectRange(err.pos.offset, err.pos.offset + 1, err.pos.line));
      parts.push(' ', go);
    }
    el.replaceChildren(...parts);
    if (point) {
      if (err.field) this._pointAtField(err.field);
      else if (err.pos) this._selectRange(err.pos.offset, err.pos.offset + 1, err.pos.line);
    }
  }

  _pointAtField(field) {
    const at = locateField(this.el.editor.value, field);
    if (at) this._selectRange(at.start, at.end, at.line);
  }

  /** Selects text in the editor and scrolls it into view. */
  _selectRange(start, end, line) {
    const ed = this.el.editor;
    ed.focus({ preventScroll: true });
    ed.setSelectionRange(start, Math.max(start, end));
    const lh = parseFloat(getComputedStyle(ed).lineHeight) || 18;
    ed.scrollTop = Math.max(0, (line - 3) * lh);
  }

  _renderPatch() {
    clearTimeout(this._patchTimer);
    this._patchTimer = 0;
    const el = this.el.patch;
    if (this._cfg.loaded === null) {
      el.textContent = 'Load the configuration first.';
      el.dataset.state = 'none';
      return;
    }
    let edited;
    try {
      edited = JSON.parse(this.el.editor.value);
    } catch {
      el.textContent = 'The JSON does not parse: Validate shows where.';
      el.dataset.state = 'invalid';
      return;
    }
    const patch = mergePatch(this._cfg.loaded, edited);
    const empty = isObj(patch) && Object.keys(patch).length === 0;
    el.textContent = empty ? 'No changes.' : JSON.stringify(patch, null, 2);
    el.dataset.state = empty ? 'empty' : 'changes';
  }

  /** Tab indents (Esc, then Tab leaves); Enter keeps the line's indentation. */
  _editorKey(ev) {
    const ed = ev.currentTarget;
    if (ev.key === 'Escape') {
      this._tabEscapes = true;
      return;
    }
    const escaping = this._tabEscapes;
    this._tabEscapes = false;
    if (ed.readOnly || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.key === 'Tab' && !ev.shiftKey && !escaping) {
      ev.preventDefault();
      this._insert(ed, '  ');
    } else if (ev.key === 'Enter' && !ev.shiftKey) {
      const before = ed.value.slice(0, ed.selectionStart);
      const indent = /[ \t]*/.exec(before.slice(before.lastIndexOf('\n') + 1))[0];
      const extra = /[{[]\s*$/.test(before) ? '  ' : '';
      ev.preventDefault();
      this._insert(ed, `\n${indent}${extra}`);
    }
  }

  /** Inserts text at the caret, keeping the browser's undo history where it can. */
  _insert(ed, text) {
    if (!(document.execCommand && document.execCommand('insertText', false, text))) {
      ed.setRangeText(text, ed.selectionStart, ed.selectionEnd, 'end');
      ed.dispatchEvent(new Event('input'));
    }
  }
}
