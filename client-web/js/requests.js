// Requests with correlation IDs over the live connection.
//
// A request is one message with a fresh `correlationID`. The relay answers it with `ack`
// (`delivered`, `queued`, or `ok` with `data` for the requests it answers itself, e.g. leases),
// or with `error`; the device answers routed requests with `command_result`, `command_output`
// or `speed_test_result`, and streams `command_progress` before a final `command_output`.
// The tracker settles each request once, with its final answer, and never leaves one pending
// forever: every request has a deadline.

/** Message types that end a request. `ack` ends only requests the relay itself answers. */
const FINAL = new Set(['command_result', 'command_output', 'speed_test_result']);

/** A failed request: the relay's `error`, a timeout, or a send that could not happen. */
export class RequestError extends Error {
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'RequestError';
    this.code = code;
    Object.assign(this, extra);
  }
}

export class RequestTracker {
  /** @param {(msg: object) => boolean} send  sends one message; false when the link is down */
  constructor(send) {
    this._send = send;
    this._pending = new Map(); // correlationID -> entry
    this._counter = 0;
    this._prefix = Math.random().toString(36).slice(2, 8);
  }

  /**
   * Sends `{type, correlationID, clientID?, payload}` and resolves with the final answer
   * message (a `command_result` with `ok:false` still resolves: the caller reads it). Rejects
   * with a RequestError on an `error` answer (its `code`), on `timeout`, or `not_connected`.
   *
   * @param {string} type
   * @param {object} payload
   * @param {object} [opts]
   * @param {string} [opts.clientID]   the target device (routed requests)
   * @param {number} [opts.timeoutMs]  how long to wait for the final answer (default 35 s)
   * @param {number} [opts.queuedTimeoutMs]  once the relay says `queued` (the device is offline),
   *   how long to wait from then on (default 25 h: the relay keeps queued requests a day)
   * @param {boolean} [opts.ackIsFinal] resolve with the relay's `ack` (leases, registrations)
   * @param {(ack: object) => void} [opts.onAck]            `ack` payloads (`delivered`, `queued`)
   * @param {(progress: object) => void} [opts.onProgress]  `command_progress` payloads
   */
  request(type, payload, { clientID, timeoutMs = 35000, queuedTimeoutMs = 25 * 3600 * 1000, ackIsFinal = false, onAck, onProgress } = {}) {
    const correlationID = `c-${this._prefix}-${++this._counter}`;
    const msg = { type, correlationID, payload: payload ?? {} };
    if (clientID !== undefined) msg.clientID = clientID;
    return new Promise((resolve, reject) => {
      if (!this._send(msg)) {
        reject(new RequestError('not_connected', 'Not connected to the relay; try again once the banner says connected.'));
        return;
      }
      const expire = (ms) => setTimeout(() => {
        this._pending.delete(correlationID);
        reject(new RequestError('timeout', `No answer to ${type} within ${Math.round(ms / 1000)} s.`));
      }, ms);
      this._pending.set(correlationID, { type, resolve, reject, timer: expire(timeoutMs), expire, queuedTimeoutMs, ackIsFinal, onAck, onProgress });
    });
  }

  /** Offers a message from the relay; returns true when it belonged to a pending request. */
  handle(msg) {
    const id = msg && msg.correlationID;
    if (typeof id !== 'string') return false;
    const entry = this._pending.get(id);
    if (!entry) return false;
    const p = msg.payload && typeof msg.payload === 'object' ? msg.payload : {};
    const settle = () => {
      clearTimeout(entry.timer);
      this._pending.delete(id);
    };
    if (msg.type === 'error') {
      settle();
      const text = typeof p.message === 'string' && p.message ? p.message : `${entry.type} was refused.`;
      entry.reject(new RequestError(typeof p.code === 'string' ? p.code : 'error', text, { payload: p }));
      return true;
    }
    if (msg.type === 'ack') {
      if (entry.ackIsFinal) {
        settle();
        entry.resolve(msg);
      } else {
        if (p.status === 'queued') {
          // The device is offline: the answer comes when it is back, however long that takes.
          clearTimeout(entry.timer);
          entry.timer = entry.expire(entry.queuedTimeoutMs);
        }
        if (entry.onAck) entry.onAck(p);
      }
      return true;
    }
    if (msg.type === 'command_progress') {
      if (entry.onProgress) entry.onProgress(p);
      return true;
    }
    if (FINAL.has(msg.type)) {
      settle();
      entry.resolve(msg);
      return true;
    }
    return false;
  }

  /** Rejects everything pending (logout). */
  cancelAll(reason = 'The console logged out.') {
    for (const [id, e] of this._pending) {
      clearTimeout(e.timer);
      e.reject(new RequestError('cancelled', reason));
      this._pending.delete(id);
    }
  }
}

/** A short human sentence for a failed request, for inline errors and toasts. */
export function describeFailure(err) {
  if (err instanceof RequestError) return `${err.message} (${err.code})`;
  return err && err.message ? err.message : String(err);
}

/** The error sentence of a `command_result` with `ok:false`, or null when it succeeded. */
export function resultError(msg) {
  const p = msg && msg.payload;
  if (!p || p.ok !== false) return null;
  const text = typeof p.error === 'string' && p.error ? p.error : 'the device refused the request';
  return typeof p.code === 'string' ? `${text} (${p.code})` : text;
}
