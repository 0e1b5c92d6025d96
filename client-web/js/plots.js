// Small live plots of numeric telemetry fields: the last 60 s of each, one canvas per field.
// Fields are picked automatically (the first few numeric ones, coordinates and counters
// skipped); clicking a key in the latest-values table adds or removes its plot.

import { $, h } from './views.js';
import { flatten, formatNumber } from './format.js';

const WINDOW_MS = 60000;
const AUTO_MAX = 6;
const MAX_PLOTS = 12;
const MAX_POINTS = 1200;
/** Not worth an automatic plot: positions move too little to see, ids and counters only grow. */
const SKIP_AUTO = /(^|\.)(lat|latitude|lon|lng|longitude|sequence|timestamp|system_time|uptime_s|total|rx_bytes|tx_bytes|used|available|pid)$/i;

export class Plots {
  constructor() {
    this.box = $('plots');
    this.series = new Map(); // key -> {points: [[t, v]], canvas, value, el, auto}
    this.removed = new Set(); // keys the pilot removed: not re-added automatically
    this.dirty = false;
    this._raf = 0;
    new ResizeObserver(() => this._schedule()).observe(this.box);
  }

  reset() {
    this.series.clear();
    this.removed.clear();
    this.box.replaceChildren();
    $('plots-empty').hidden = false;
  }

  /** Adds or removes the plot of a key (from a click in the values table). */
  toggle(key) {
    if (this.series.has(key)) {
      this.series.get(key).el.remove();
      this.series.delete(key);
      this.removed.add(key);
    } else if (this.series.size < MAX_PLOTS) {
      this.removed.delete(key);
      this._add(key, false);
    }
    $('plots-empty').hidden = this.series.size > 0;
    this._schedule();
  }

  has(key) {
    return this.series.has(key);
  }

  /** One live telemetry payload (replayed frames are not plotted: they are not "now"). */
  ingest(payload, now = performance.now()) {
    if (!payload || !payload.data || (payload.relay && payload.relay.replay)) return;
    const rows = flatten(payload.data, { maxRows: 200 });
    for (const [key, value] of rows) {
      if (typeof value !== 'number' || !Number.isFinite(value)) continue;
      let s = this.series.get(key);
      if (!s) {
        const autoCount = [...this.series.values()].filter((x) => x.auto).length;
        if (autoCount >= AUTO_MAX || this.removed.has(key) || SKIP_AUTO.test(key)) continue;
        s = this._add(key, true);
      }
      s.points.push([now, value]);
      if (s.points.length > MAX_POINTS) s.points.splice(0, s.points.length - MAX_POINTS);
    }
    $('plots-empty').hidden = this.series.size > 0;
    this._schedule();
  }

  _add(key, auto) {
    const canvas = h('canvas', { class: 'plot-canvas', 'aria-hidden': 'true' });
    const value = h('span', { class: 'plot-value mono' });
    const remove = h('button', { type: 'button', class: 'plot-remove', title: `Remove the plot of ${key}`, 'aria-label': `Remove the plot of ${key}`, text: '×' });
    const el = h('figure', { class: 'plot', 'data-testid': 'plot', dataset: { key } },
      h('figcaption', {}, h('span', { class: 'plot-key mono', text: key }), value, remove), canvas);
    remove.addEventListener('click', () => this.toggle(key));
    this.box.append(el);
    const s = { points: [], canvas, value, el, auto };
    this.series.set(key, s);
    return s;
  }

  _schedule() {
    if (this._raf) return;
    this._raf = requestAnimationFrame(() => {
      this._raf = 0;
      this.draw();
    });
  }

  draw(now = performance.now()) {
    for (const [key, s] of this.series) {
      const cut = now - WINDOW_MS;
      let i = 0;
      while (i < s.points.length && s.points[i][0] < cut) i++;
      if (i) s.points.splice(0, i);
      const last = s.points[s.points.length - 1];
      s.value.textContent = last ? formatNumber(last[1], key) : '—';
      s.el.dataset.points = String(s.points.length);
      drawSeries(s.canvas, s.points, now);
    }
  }
}

function drawSeries(canvas, points, now) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const ht = canvas.clientHeight;
  if (!w || !ht) return;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(ht * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(ht * dpr);
  }
  const g = canvas.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, ht);
  if (points.length === 0) return;
  let lo = Infinity;
  let hi = -Infinity;
  for (const [, v] of points) {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  if (hi - lo < 1e-9) {
    hi += 1;
    lo -= 1;
  }
  const pad = 3;
  const x = (t) => pad + ((t - (now - WINDOW_MS)) / WINDOW_MS) * (w - 2 * pad);
  const y = (v) => ht - pad - ((v - lo) / (hi - lo)) * (ht - 2 * pad);
  const style = getComputedStyle(canvas);
  g.strokeStyle = style.getPropertyValue('--plot-line').trim() || '#0b57d0';
  g.lineWidth = 1.5;
  g.beginPath();
  points.forEach(([t, v], i) => (i ? g.lineTo(x(t), y(v)) : g.moveTo(x(t), y(v))));
  g.stroke();
  g.fillStyle = g.strokeStyle;
  const [lt, lv] = points[points.length - 1];
  g.beginPath();
  g.arc(x(lt), y(lv), 2.5, 0, Math.PI * 2);
  g.fill();
  g.fillStyle = '#4a5260';
  g.font = '10px system-ui, sans-serif';
  g.fillText(formatNumber(hi), pad, 10);
  g.fillText(formatNumber(lo), pad, ht - pad);
}
