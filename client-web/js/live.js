// The live WebSocket connection to the relay.
//
// LiveClient owns one socket at a time and keeps it alive: every (re)connect fetches a fresh
// one-time ticket, waits for `auth_ok`, re-sends the subscriptions the UI asked for, pings to
// measure the round trip and to detect a dead link, and on any failure retries with
// exponential backoff. The UI only calls subscribe()/unsubscribe() and listens to events:
//
//   status      {state, retryAt, failures, reason}  state: connecting | connected |
//               reconnecting | unreachable | replaced | stopped
//   auth_ok     the auth_ok payload
//   rtt         {rttMs, relayOffsetMs}
//   message     every parsed message (after the client's own handling), e.g. telemetry
//   bad-frame   {error, sample} for frames that are not JSON objects with a "type"
//   auth-lost   {message} the key was refused when asking for a ticket: log out

const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 10000;
/** A connection that lived this long counts as healthy: the next failure starts over at 0.5 s. */
const STABLE_AFTER_MS = 10000;
/** Opened sockets that do not say auth_ok within this are abandoned. */
const AUTH_TIMEOUT_MS = 10000;
/** Failures in a row after which the banner says "relay unreachable". */
const UNREACHABLE_AFTER = 3;

export class LiveClient extends EventTarget {
  /**
   * @param {object} opts
   * @param {() => Promise<string>} opts.getTicket  fetches a one-time ticket (may throw ApiError)
   * @param {(ticket: string) => string} opts.url   builds the WebSocket URL for a ticket
   * @param {number} [opts.pingEveryMs]
   */
  constructor({ getTicket, url, pingEveryMs = 10000 }) {
    super();
    this.getTicket = getTicket;
    this.buildUrl = url;
    this.pingEveryMs = pingEveryMs;

    this.state = 'stopped';
    this.retryAt = null; // performance.now() time of the next attempt, while waiting
    this.failures = 0; // consecutive failed attempts
    this.rttMs = null;
    this.session = null; // the auth_ok payload of the current connection

    this._ws = null;
    this._gen = 0; // bumped on every attempt; stale socket callbacks compare and bail out
    this._stopped = true;
    this._authedAt = 0;
    this._lastRx = 0;
    this._subs = new Set();
    this._pendingSubs = new Map(); // correlationID -> deviceID
    this._subCounter = 0;
    this._replacedBy = false; // set by an `error` with code `replaced`, acted on at close
    this._minRetryMs = 0; // from `rate_limited`'s retryAfterMs
    this._wasUnreachable = false;
    this._timers = { retry: 0, auth: 0, ping: 0, watchdog: 0 };
    this._onOnline = () => {
      // The browser regained a network: no point waiting out the backoff.
      if (this.retryAt !== null) this.reconnectNow();
    };
  }

  // ---- public API -------------------------------------------------------------------------

  start() {
    if (!this._stopped) return;
    this._stopped = false;
    this.failures = 0;
    if (typeof window !== 'undefined') window.addEventListener('online', this._onOnline);
    this._connect();
  }

  /** Closes the connection for good (logout). Subscriptions are forgotten. */
  stop() {
    this._stopped = true;
    this._gen++;
    this._teardown(1000, 'client stopped');
    this._subs.clear();
    this._pendingSubs.clear();
    this.retryAt = null;
    this._wasUnreachable = false;
    if (typeof window !== 'undefined') window.removeEventListener('online', this._onOnline);
    this._setState('stopped');
  }

  /** Skips the remaining backoff (or resumes after `replaced`) and connects now. */
  reconnectNow() {
    if (this.state === 'connected' || this.state === 'connecting') return;
    if (this._stopped && this.state !== 'replaced') return;
    this._stopped = false;
    this._gen++;
    this._teardown();
    this._connect();
  }

  get connected() {
    return this.state === 'connected';
  }

  /** Sends one message if the connection is up; returns whether it was sent. */
  send(msg) {
    const ws = this._ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || this.state !== 'connected') return false;
    try {
      ws.send(JSON.stringify(msg));
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Subscribes to a device's telemetry. Remembered across reconnects: after every new
   * `auth_ok` the subscription is sent again (and the relay replays its buffer again).
   * Returns the correlationID used, or null if it will be sent once connected.
   */
  subscribe(deviceID) {
    this._subs.add(deviceID);
    return this.connected ? this._sendSubscribe(deviceID) : null;
  }

  unsubscribe(deviceID) {
    this._subs.delete(deviceID);
    for (const [cid, id] of this._pendingSubs) if (id === deviceID) this._pendingSubs.delete(cid);
    // Not connected: nothing to do, the relay forgets subscriptions with the connection.
    this.send({ type: 'unsubscribe', payload: { deviceID } });
  }

  /** The device a subscribe correlationID was for (while its answer is pending). */
  subscriptionFor(correlationID) {
    return this._pendingSubs.get(correlationID) ?? null;
  }

  // ---- internals --------------------------------------------------------------------------

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit('status', { state, retryAt: this.retryAt, failures: this.failures, ...extra });
  }

  _sendSubscribe(deviceID) {
    const correlationID = `sub-${++this._subCounter}`;
    this._pendingSubs.set(correlationID, deviceID);
    // `logs`: the device's process output for the log console (protocol 4.30).
    this.send({ type: 'subscribe', correlationID, payload: { deviceID, logs: true } });
    return correlationID;
  }

  async _connect() {
    if (this._stopped) return;
    const gen = ++this._gen;
    this.retryAt = null;
    this._replacedBy = false;
    this._setState('connecting', { unreachable: this._wasUnreachable });

    let ticket;
    try {
      ticket = await this.getTicket();
    } catch (e) {
      if (gen !== this._gen || this._stopped) return;
      if (e && e.status === 401) {
        // The key itself was refused: retrying cannot help.
        this.stop();
        this._emit('auth-lost', { message: e.message });
        return;
      }
      const unreachable = !e || e.status === 0 || e.isUnreachable;
      this._fail(unreachable ? 'network' : 'ticket', `ticket: ${e && e.message ? e.message : e}`);
      return;
    }
    if (gen !== this._gen || this._stopped) return;

    let ws;
    try {
      ws = new WebSocket(this.buildUrl(ticket));
    } catch (e) {
      this._fail('network', `cannot open WebSocket: ${e && e.message ? e.message : e}`);
      return;
    }
    this._ws = ws;
    let opened = false;

    ws.onopen = () => {
      if (gen !== this._gen) return;
      opened = true;
      this._lastRx = performance.now();
    };
    ws.onmessage = (ev) => {
      if (gen !== this._gen) return;
      this._lastRx = performance.now();
      this._onMessage(ev.data);
    };
    ws.onerror = () => {
      // Always followed by onclose, which carries the details.
    };
    ws.onclose = (ev) => {
      if (gen !== this._gen) return;
      const code = ev && ev.code ? ev.code : 1006;
      const why = ev && ev.reason ? `: ${ev.reason}` : '';
      if (this._replacedBy || (ev && ev.reason === 'replaced')) {
        this._replacedBy = false;
        this._halt('replaced', 'another session took over this connection');
        return;
      }
      // Closed before it ever opened: the relay refused the upgrade or is not there.
      this._fail(opened ? 'closed' : 'network', `${opened ? 'connection closed' : 'could not connect'} (${code}${why})`);
    };

    this._timers.auth = setTimeout(() => {
      if (gen === this._gen && this.state !== 'connected') this._fail('timeout', 'no auth_ok from the relay');
    }, AUTH_TIMEOUT_MS);
  }

  _onMessage(data) {
    if (typeof data !== 'string') {
      this._emit('bad-frame', { error: 'binary frame', sample: '' });
      return;
    }
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (e) {
      this._emit('bad-frame', { error: `not JSON (${e.message})`, sample: data.slice(0, 120) });
      return;
    }
    if (!msg || typeof msg !== 'object' || Array.isArray(msg) || typeof msg.type !== 'string') {
      this._emit('bad-frame', { error: 'no "type" field', sample: data.slice(0, 120) });
      return;
    }
    if (!msg.payload || typeof msg.payload !== 'object') msg.payload = {};

    switch (msg.type) {
      case 'auth_ok':
        this._onAuthOk(msg.payload);
        break;
      case 'ping':
        // The relay checks on us too: answer at once, echoing its `t`.
        this.send({
          type: 'pong',
          ...(msg.correlationID ? { correlationID: msg.correlationID } : {}),
          payload: { ...(typeof msg.payload.t === 'number' ? { t: msg.payload.t } : {}), relayTime: Date.now() },
        });
        break;
      case 'pong':
        this._onPong(msg.payload);
        break;
      case 'subscribed':
      case 'unsubscribed':
        if (msg.correlationID && this._pendingSubs.has(msg.correlationID)) {
          if (typeof msg.payload.deviceID !== 'string') msg.payload.deviceID = this._pendingSubs.get(msg.correlationID);
          this._pendingSubs.delete(msg.correlationID);
        }
        break;
      case 'error':
        this._onError(msg);
        break;
      default:
        break;
    }
    this._emit('message', msg);
  }

  _onAuthOk(payload) {
    clearTimeout(this._timers.auth);
    this.session = payload;
    this._authedAt = performance.now();
    this.retryAt = null;
    this._wasUnreachable = false;
    this._pendingSubs.clear();
    this._setState('connected');
    this._emit('auth_ok', payload);
    for (const id of this._subs) this._sendSubscribe(id);

    this._ping();
    clearInterval(this._timers.ping);
    this._timers.ping = setInterval(() => this._ping(), this.pingEveryMs);

    // Detects a silently dead link (laptop asleep, Wi-Fi gone): our own pings every 10 s get
    // pongs, so a long silence means the socket is gone even if the browser has not noticed.
    const relayPing = Number(payload && payload.pingIntervalMs) || 0;
    const deadAfter = Math.max(25000, 2.5 * this.pingEveryMs, 2.5 * Math.min(relayPing, 60000));
    clearInterval(this._timers.watchdog);
    this._timers.watchdog = setInterval(() => {
      if (this.state === 'connected' && performance.now() - this._lastRx > deadAfter) {
        this._fail('timeout', `no message from the relay for ${Math.round(deadAfter / 1000)} s`);
      }
    }, 2000);
  }

  _ping() {
    this.send({ type: 'ping', payload: { t: performance.now() } });
  }

  _onPong(payload) {
    const t = payload.t;
    const now = performance.now();
    if (typeof t !== 'number' || !Number.isFinite(t) || t > now || now - t > 120000) return;
    this.rttMs = now - t;
    // Relay clock minus ours, assuming the pong was stamped half way through the round trip.
    const relayOffsetMs =
      typeof payload.relayTime === 'number' ? payload.relayTime - (Date.now() - this.rttMs / 2) : null;
    this._emit('rtt', { rttMs: this.rttMs, relayOffsetMs });
  }

  _onError(msg) {
    const p = msg.payload;
    if (msg.correlationID && this._pendingSubs.has(msg.correlationID)) {
      // Tell the UI which device's subscribe failed before the correlation is forgotten.
      msg.subscribeFor = this._pendingSubs.get(msg.correlationID);
      this._pendingSubs.delete(msg.correlationID);
    }
    if (p.code === 'replaced') {
      // Another console with this identity took over. Reconnecting automatically would make
      // the two fight forever, so wait for the user (the banner offers a button).
      this._replacedBy = true;
    } else if (p.code === 'rate_limited' && typeof p.retryAfterMs === 'number') {
      this._minRetryMs = p.retryAfterMs;
    }
  }

  /** Stops timers and closes the socket without triggering our own close handler. */
  _teardown(code, reason) {
    clearTimeout(this._timers.retry);
    clearTimeout(this._timers.auth);
    clearInterval(this._timers.ping);
    clearInterval(this._timers.watchdog);
    const ws = this._ws;
    this._ws = null;
    this.session = null;
    this.rttMs = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try {
        if (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN) ws.close(code ?? 1000, reason);
      } catch {
        // Already closing.
      }
    }
  }

  /** Gives up on automatic reconnection (`replaced`): reconnectNow() resumes. */
  _halt(state, reason) {
    this._gen++;
    this._teardown();
    this._stopped = true;
    this.retryAt = null;
    this._setState(state, { reason });
  }

  /** One attempt failed (or a live connection died): schedule the next with backoff. */
  _fail(kind, reason) {
    const wasStable = this._authedAt && performance.now() - this._authedAt >= STABLE_AFTER_MS;
    this._gen++;
    this._teardown();
    this._authedAt = 0;
    if (this._stopped) return;

    if (wasStable) this.failures = 0;
    this.failures++;
    // 0.5 s doubling to 10 s, with "equal jitter" (half fixed, half random) so that many
    // consoles cut off at once by a relay restart do not all come back in the same instant.
    const nominal = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (this.failures - 1));
    let delay = nominal / 2 + Math.random() * (nominal / 2);
    if (this._minRetryMs) {
      delay = Math.max(delay, this._minRetryMs);
      this._minRetryMs = 0;
    }
    this.retryAt = performance.now() + delay;
    const gen = this._gen;
    this._timers.retry = setTimeout(() => {
      if (gen === this._gen) this._connect();
    }, delay);

    const unreachable = kind === 'network' || this.failures >= UNREACHABLE_AFTER;
    this._wasUnreachable = unreachable;
    this._setState(unreachable ? 'unreachable' : 'reconnecting', { reason, unreachable });
  }
}
