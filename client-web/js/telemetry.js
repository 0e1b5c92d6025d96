// The telemetry model for one open device: latest values, per-stream verdict counters, rates
// and the replay bookkeeping. No DOM here; views.js renders it.

import { flatten, isPlainObject } from './format.js';

export const VERDICTS = ['ok', 'gap', 'duplicate', 'reordered', 'reset'];

/** Window over which frames per second are averaged. */
const RATE_WINDOW_MS = 5000;

const num = (x) => (typeof x === 'number' && Number.isFinite(x) ? x : null);
const str = (x) => (typeof x === 'string' && x ? x : null);

function newStream(name) {
  return {
    name,
    counts: { ok: 0, gap: 0, duplicate: 0, reordered: 0, reset: 0, other: 0 },
    missing: 0, // frames the relay reported missing in gaps we saw live
    lostTotal: null, // the relay's own running total, from the newest frame
    lastSeq: null,
    epoch: null,
    arrivals: [], // performance.now() of live frames within the rate window
    appliedTs: null, // device timestamp of the frame whose values the table shows
    appliedLive: false,
  };
}

export class DeviceTelemetry {
  constructor(deviceID) {
    this.deviceID = deviceID;
    this.openedAt = performance.now();
    this.streams = new Map(); // stream name -> stream record (insertion order = first seen)
    this.values = new Map(); // flattened key -> {value, stream, at, replay}
    this.last = null; // the newest live frame's annotations
    this.liveFrames = 0;
    this.replayFrames = 0;
    this.arrivals = []; // all streams, for the headline rate
    this.replay = null; // {expected, received, firstSeq, lastSeq, nonOk, reported}
  }

  _stream(name) {
    let s = this.streams.get(name);
    if (!s) {
      s = newStream(name);
      this.streams.set(name, s);
    }
    return s;
  }

  /** Called on `subscribed`: `expected` buffered frames (relay.replay = true) follow. */
  startReplay(expected) {
    this.replay = { expected: num(expected) ?? 0, received: 0, firstSeq: null, lastSeq: null, nonOk: 0, reported: false };
  }

  /**
   * Marks the replay as finished and returns its summary once (or null): when all announced
   * frames have arrived, or when a live frame shows the replay is over.
   */
  takeReplaySummary(force = false) {
    const r = this.replay;
    if (!r || r.reported) return null;
    if (!force && r.received < r.expected) return null;
    r.reported = true;
    return { ...r };
  }

  /**
   * Ingests one telemetry payload. Returns a description of the frame for the log:
   * `{replay, verdict, stream, seq, missing, epoch, lostTotal}`. Never throws on odd input.
   */
  ingest(payload, now = performance.now()) {
    const p = isPlainObject(payload) ? payload : {};
    const relay = isPlainObject(p.relay) ? p.relay : {};
    const replay = relay.replay === true;
    const verdict = str(relay.verdict) ?? 'unknown';
    const streamName = str(relay.stream) ?? str(p.stream) ?? str(p.subtype) ?? 'sensor_data';
    const seq = num(p.sequence);
    const ts = num(p.timestamp);
    const epoch = str(p.epoch);
    const missing = num(relay.missing);
    const lostTotal = num(relay.lostTotal);
    const s = this._stream(streamName);
    const info = { replay, verdict, stream: streamName, seq, missing, epoch, lostTotal, backfill: p.backfill === true };

    if (replay) {
      // Buffered frames: shown, but not counted as live traffic seen by this console.
      this.replayFrames++;
      const r = this.replay ?? (this.replay = { expected: 0, received: 0, firstSeq: null, lastSeq: null, nonOk: 0, reported: false });
      r.received++;
      if (r.firstSeq === null) r.firstSeq = seq;
      r.lastSeq = seq;
      if (verdict !== 'ok') r.nonOk++;
      if (!s.appliedLive && lostTotal !== null) s.lostTotal = lostTotal;
      if (s.lastSeq === null) s.lastSeq = seq;
      // After a reconnect the relay replays frames we may already have shown; only newer
      // samples may replace what the table shows.
      if (ts === null ? !s.appliedLive : s.appliedTs === null || ts > s.appliedTs) {
        this._apply(p.data, streamName, ts, now, true);
      }
      return info;
    }

    this.liveFrames++;
    if (verdict in s.counts) s.counts[verdict]++;
    else s.counts.other++;
    if (verdict === 'gap' && missing !== null) s.missing += missing;
    if (lostTotal !== null) s.lostTotal = lostTotal;
    s.lastSeq = seq;
    if (epoch) s.epoch = epoch;
    s.arrivals.push(now);
    this.arrivals.push(now);
    this.last = {
      stream: streamName,
      seq,
      verdict,
      missing,
      ageMs: num(relay.ageMs),
      clockOffsetMs: num(relay.clockOffsetMs),
      clockUncertaintyMs: num(relay.clockUncertaintyMs),
      at: now,
    };
    // A duplicate or reordered frame is older than what we already show: do not go back.
    if (verdict !== 'duplicate' && verdict !== 'reordered') {
      this._apply(p.data, streamName, ts, now, false);
      s.appliedLive = true;
    }
    return info;
  }

  _apply(data, stream, ts, now, replay) {
    if (data === undefined) return;
    const s = this._stream(stream);
    s.appliedTs = ts;
    for (const [key, value] of flatten(data)) {
      this.values.set(key, { value, stream, at: now, replay });
    }
  }

  _prune(list, now) {
    const cutoff = now - RATE_WINDOW_MS;
    let i = 0;
    while (i < list.length && list[i] < cutoff) i++;
    if (i) list.splice(0, i);
  }

  /** Live frames per second over the last few seconds (all streams, or one). */
  rate(now = performance.now(), streamName = null) {
    const list = streamName ? this.streams.get(streamName)?.arrivals : this.arrivals;
    if (!list) return 0;
    this._prune(list, now);
    // Until the view has been open for a whole window, divide by the time it has been open.
    const span = Math.min(RATE_WINDOW_MS, Math.max(1000, now - this.openedAt));
    return (list.length * 1000) / span;
  }

  /** Totals over all streams. */
  totals() {
    const t = { ok: 0, gap: 0, duplicate: 0, reordered: 0, reset: 0, other: 0, missing: 0, lostTotal: null };
    for (const s of this.streams.values()) {
      for (const v of Object.keys(s.counts)) t[v] += s.counts[v];
      t.missing += s.missing;
      if (s.lostTotal !== null) t.lostTotal = (t.lostTotal ?? 0) + s.lostTotal;
    }
    return t;
  }
}
