// Pure formatting helpers: no DOM, no state, so they are easy to reason about (and to test in
// node). Every function accepts junk input and returns a printable string instead of throwing,
// because the data comes from devices we do not control.

/** Shown wherever a value is unknown or absent. */
export const DASH = '—';

const isFiniteNumber = (x) => typeof x === 'number' && Number.isFinite(x);

/** True for `{...}` values (not arrays, not null). */
export function isPlainObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

/**
 * Flattens nested telemetry `data` into `[key, value]` pairs with dotted keys:
 * `{gps: {latitude: 1}}` -> `[["gps.latitude", 1]]`. Short arrays of scalars stay one value
 * (`[1, 2, 3]` is more readable on one row); other arrays are indexed (`wheels[0].rpm`).
 * Depth and row count are capped so one oversized frame cannot freeze the page.
 */
export function flatten(data, { maxDepth = 8, maxRows = 400 } = {}) {
  const out = [];
  const walk = (value, path, depth) => {
    if (out.length >= maxRows) return;
    if (Array.isArray(value)) {
      const scalars = value.every((x) => x === null || typeof x !== 'object');
      if (value.length === 0 || (scalars && value.length <= 16) || depth >= maxDepth) {
        out.push([path, value]);
        return;
      }
      value.forEach((item, i) => walk(item, `${path}[${i}]`, depth + 1));
      return;
    }
    if (isPlainObject(value)) {
      const keys = Object.keys(value);
      if (keys.length === 0 || depth >= maxDepth) {
        out.push([path, value]);
        return;
      }
      for (const k of keys) walk(value[k], path ? `${path}.${k}` : k, depth + 1);
      return;
    }
    out.push([path || 'value', value]);
  };
  walk(data, '', 0);
  return out;
}

/** Trims a fixed-point string's trailing zeros: "81.50" -> "81.5", "12.00" -> "12". */
function trimZeros(s) {
  return s.includes('.') && !s.includes('e') ? s.replace(/\.?0+$/, '') : s;
}

const COORD_KEY = /^(lat|latitude|lon|lng|long|longitude)$/i;

/** The last path segment of a flattened key, lowercased: "gps.latitude" -> "latitude". */
function leafName(key) {
  const parts = String(key ?? '').split(/[.[\]]/).filter(Boolean);
  return (parts[parts.length - 1] || '').toLowerCase();
}

/** Unit suffix inferred from a key name; only for names whose unit is unambiguous. */
function unitFor(key) {
  const leaf = leafName(key);
  if (/(^|_)(percent|pct)$/.test(leaf)) return ' %';
  if (/(^|_)(voltage|volts)$/.test(leaf)) return ' V';
  if (/(^|_)(heading|bearing|course)$/.test(leaf)) return '°';
  return '';
}

/**
 * Formats a number for a human at a glance: coordinates keep 6 decimals (~0.1 m), other
 * values get fewer decimals the larger they are. Integers are printed as they are.
 */
export function formatNumber(n, key = '') {
  if (!isFiniteNumber(n)) return DASH;
  if (COORD_KEY.test(leafName(key))) return n.toFixed(6);
  if (Number.isInteger(n)) return String(n);
  const a = Math.abs(n);
  let s;
  if (a >= 1e6) s = n.toFixed(0);
  else if (a >= 100) s = n.toFixed(1);
  else if (a >= 1) s = n.toFixed(2);
  else if (a >= 0.01) s = n.toFixed(3);
  else s = n.toPrecision(2);
  return trimZeros(s);
}

function truncate(s, max = 160) {
  return s.length > max ? `${s.slice(0, max - 1)}…` : s;
}

/** Formats one flattened telemetry value (any JSON) for the latest-values table. */
export function formatValue(value, key = '') {
  if (value === null || value === undefined) return DASH;
  if (typeof value === 'number') {
    const s = formatNumber(value, key);
    return s === DASH ? s : s + unitFor(key);
  }
  if (typeof value === 'boolean') return value ? 'true' : 'false';
  if (typeof value === 'string') return truncate(value);
  if (Array.isArray(value)) {
    if (value.length === 0) return '[]';
    if (value.every((x) => x === null || typeof x !== 'object')) {
      return truncate(`[${value.map((x) => (typeof x === 'number' ? formatNumber(x) : String(x))).join(', ')}]`);
    }
    return `[${value.length} items]`;
  }
  try {
    return truncate(JSON.stringify(value));
  } catch {
    return '?';
  }
}

/** Milliseconds with a sensible precision: "35.2 ms", "420 ms", "12.3 s"; "—" when absent. */
export function formatMs(ms) {
  if (!isFiniteNumber(ms)) return DASH;
  const a = Math.abs(ms);
  if (a >= 10000) return `${(ms / 1000).toFixed(1)} s`;
  if (a >= 100) return `${Math.round(ms)} ms`;
  return `${ms.toFixed(1)} ms`;
}

/** Clock offset with its uncertainty: "-120.4 ± 3.1 ms"; "—" until the relay has synced. */
export function formatOffset(offsetMs, uncertaintyMs) {
  if (!isFiniteNumber(offsetMs)) return DASH;
  const sign = offsetMs > 0 ? '+' : '';
  const off = Math.abs(offsetMs) >= 1000 ? offsetMs.toFixed(0) : offsetMs.toFixed(1);
  const unc = isFiniteNumber(uncertaintyMs) ? uncertaintyMs.toFixed(1) : DASH;
  return `${sign}${off} ± ${unc} ms`;
}

/** "just now", "12 s ago", "5 min ago", "3 h ago", "2 d ago"; "never" for null. */
export function relativeTime(epochMs, nowMs = Date.now()) {
  if (!isFiniteNumber(epochMs)) return 'never';
  const s = Math.floor((nowMs - epochMs) / 1000);
  // A slightly negative difference is clock skew between relay and browser: not "in the future".
  if (s < 5) return 'just now';
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

/** "0.4 s ago" style for short local durations measured with performance.now(). */
export function agoShort(ms) {
  if (!isFiniteNumber(ms)) return DASH;
  if (ms < 0) ms = 0;
  if (ms < 10000) return `${(ms / 1000).toFixed(1)} s ago`;
  if (ms < 120000) return `${Math.round(ms / 1000)} s ago`;
  return `${Math.round(ms / 60000)} min ago`;
}

/** Full local date and time, for tooltips. */
export function fullDate(epochMs) {
  if (!isFiniteNumber(epochMs)) return '';
  try {
    return new Date(epochMs).toLocaleString();
  } catch {
    return '';
  }
}

/** Local wall-clock time with milliseconds, "14:03:07.125", for log lines. */
export function clockTime(epochMs = Date.now()) {
  const d = new Date(epochMs);
  const p = (n, w = 2) => String(n).padStart(w, '0');
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

/** Frames per second, one decimal below 10. */
export function formatRate(fps) {
  if (!isFiniteNumber(fps)) return DASH;
  return fps < 10 ? `${fps.toFixed(1)}/s` : `${Math.round(fps)}/s`;
}

/** Bits per second: "850 kbit/s", "2.4 Mbit/s"; "—" when absent. */
export function formatBitrate(bps) {
  if (!isFiniteNumber(bps)) return DASH;
  if (bps < 0) bps = 0;
  if (bps >= 1e6) return `${(bps / 1e6).toFixed(bps >= 1e7 ? 0 : 1)} Mbit/s`;
  return `${Math.round(bps / 1000)} kbit/s`;
}

/** A percentage: "0 %", "0.4 %", "12 %"; "—" when absent. */
export function formatPercent(pct) {
  if (!isFiniteNumber(pct)) return DASH;
  if (pct === 0) return '0 %';
  return pct < 10 ? `${pct.toFixed(1)} %` : `${Math.round(pct)} %`;
}
