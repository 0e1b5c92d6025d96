// The device's log console: the output lines of its supervised processes (`log`, protocol
// 4.30) and the console's own system events (link, video, lease, commands, telemetry verdicts),
// newest last, filterable by level, source and text. Keeps the last MAX lines.

import { $, h } from './views.js';
import { clockTime } from './format.js';

const MAX = 2000;
const LEVELS = { debug: 0, info: 1, warn: 2, error: 3 };

/** The level of a process's output line: its own marker if it has one, else by stream. */
export function levelOfLine(line, stream) {
  const m = /\b(TRACE|DEBUG|INFO|NOTICE|WARN|WARNING|ERROR|ERR|FATAL|CRITICAL|PANIC)\b/.exec(String(line).slice(0, 80));
  if (m) {
    const w = m[1];
    if (w === 'TRACE' || w === 'DEBUG') return 'debug';
    if (w === 'INFO' || w === 'NOTICE') return 'info';
    if (w === 'WARN' || w === 'WARNING') return 'warn';
    return 'error';
  }
  return stream === 'stderr' ? 'warn' : 'info';
}

/** Maps the console's event kinds (verdicts, system, warn, error) to a level. */
export function levelOfKind(kind) {
  if (kind === 'error' || kind === 'gap') return 'error';
  if (kind === 'warn' || kind === 'duplicate' || kind === 'reordered' || kind === 'reset') return 'warn';
  if (kind === 'debug') return 'debug';
  return 'info';
}

export class LogConsole {
  constructor() {
    this.list = $('frame-log');
    this.level = $('log-level').value;
    this.source = '';
    this.text = '';
    this.unseen = 0;
    this.visible = false;
    $('log-level').addEventListener('change', (e) => {
      this.level = e.target.value;
      this._applyFilter();
    });
    $('log-source').addEventListener('change', (e) => {
      this.source = e.target.value;
      this._applyFilter();
    });
    $('log-filter').addEventListener('input', (e) => {
      this.text = e.target.value.trim().toLowerCase();
      this._applyFilter();
    });
    $('log-clear').addEventListener('click', () => this.clear());
  }

  clear() {
    this.list.replaceChildren();
    this.unseen = 0;
    this._badge();
    $('log-empty').hidden = true;
  }

  /** The log tab is shown / hidden: unseen warnings count on its badge meanwhile. */
  setVisible(visible) {
    this.visible = visible;
    if (visible) {
      this.unseen = 0;
      this._badge();
      this.list.scrollTop = this.list.scrollHeight;
    }
  }

  /**
   * Appends a line. source: `device` (a process's output) or `system` (the console's events).
   * @param {{level: string, source: string, tag: string, text: string, at?: number, replay?: boolean}} line
   */
  add({ level, source, tag, text, at = Date.now(), replay = false }) {
    const lvl = LEVELS[level] === undefined ? 'info' : level;
    const atBottom = this.list.scrollHeight - this.list.scrollTop - this.list.clientHeight < 24;
    const li = h('li', { class: `log-row log-${lvl}${replay ? ' log-replay' : ''}`, 'data-testid': 'log-line',
      dataset: { level: lvl, source, kind: lvl, replay: String(replay) } },
      h('time', { class: 'mono', text: clockTime(at), title: new Date(at).toISOString() }),
      h('span', { class: `tag tag-level tag-${lvl}`, text: lvl }),
      replay ? h('span', { class: 'tag tag-replay', text: 'replay' }) : null,
      h('span', { class: `tag tag-source`, text: tag ?? source }),
      h('span', { class: 'log-text', text }));
    li.hidden = !this._matches(li);
    this.list.append(li);
    while (this.list.children.length > MAX) this.list.firstElementChild.remove();
    if (atBottom) this.list.scrollTop = this.list.scrollHeight;
    if (!this.visible && LEVELS[lvl] >= LEVELS.warn) {
      this.unseen++;
      this._badge();
    }
    $('log-empty').hidden = true;
  }

  _matches(li) {
    if (LEVELS[li.dataset.level] < LEVELS[this.level]) return false;
    if (this.source && li.dataset.source !== this.source) return false;
    if (this.text && !li.textContent.toLowerCase().includes(this.text)) return false;
    return true;
  }

  _applyFilter() {
    let shown = 0;
    for (const li of this.list.children) {
      li.hidden = !this._matches(li);
      if (!li.hidden) shown++;
    }
    $('log-empty').hidden = shown > 0 || this.list.children.length === 0;
    this.list.scrollTop = this.list.scrollHeight;
  }

  _badge() {
    const b = $('log-badge');
    b.textContent = this.unseen ? String(this.unseen > 99 ? '99+' : this.unseen) : '';
    b.title = this.unseen ? `${this.unseen} new warning or error line${this.unseen === 1 ? '' : 's'}` : '';
  }
}
