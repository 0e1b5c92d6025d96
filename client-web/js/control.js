// Control panel: the device's control lease (who may drive it) and teleop (keyboard and
// gamepad driving with a deadman).
//
// Lease (docs/protocol.md sections 4.23, 4.24 and 11): the relay tells every subscriber who
// holds the lease (`lease_state`). This console takes it with `lease_acquire`, keeps it with a
// `lease_heartbeat` every timeoutMs / 3 and gives it back with `lease_release` (also when the
// view closes). A lease is held by one *connection*: when the relay link drops it is gone, and
// it is never taken again without the pilot asking.
//
// Teleop: `app_command` `{command: 'teleop', data: {throttle, rudder}}` (each -1..1) at 10 Hz
// while a key or the gamepad's deadman button is held and the Drive toggle is armed. Letting
// go (keyup, window blur, deadman button) sends an immediate zero, two more zeros on the next
// ticks, then nothing: the boat holds position 2 s after its last teleop. Teleop is possible
// only while this console holds the lease, the video is not stale, the relay link is up and the
// device is online; losing any of these mid-drive sends a zero (when it can still be delivered),
// disarms and says why.

import { describeFailure, resultError } from './requests.js';

/** Teleop commands per second while driving. */
const TELEOP_HZ = 10;
/** Zero commands sent when the pilot lets go (the first at once, the rest on the next ticks). */
const ZERO_REPEATS = 3;
/**
 * How long the request tracker waits for a teleop answer: beyond the relay's own deadline
 * (COMMAND_TIMEOUT, 60 s by default), so its `command_timeout` still finds the request here.
 */
const TELEOP_TIMEOUT_MS = 65000;
/** Driving stops when the oldest unanswered teleop command is this old. */
const ANSWER_STALL_MS = 3000;
/** Consecutive failed teleop commands after which driving stops. */
const MAX_FAILURES = 5;
/** Gamepad stick deadzone (fraction of full deflection). */
const DEADZONE = 0.1;
/** Standard-mapping buttons that act as the deadman: RB (5) or LB (4). */
const DEADMAN_BUTTONS = [5, 4];
const DEFAULT_LEASE_TIMEOUT_MS = 10000;

/** Keyboard codes (physical keys, so WASD works on any layout) to stick directions. */
const KEYS = {
  KeyW: 'ahead', ArrowUp: 'ahead',
  KeyS: 'astern', ArrowDown: 'astern',
  KeyA: 'port', ArrowLeft: 'port',
  KeyD: 'starboard', ArrowRight: 'starboard',
};

/** Sentences for why teleop is disabled, by `data-teleop-disabled-reason`. */
const REASONS = {
  'no-access': 'You have view access to this device; driving needs control access',
  'relay-down': 'Relay connection lost',
  offline: 'Device offline',
  stale: 'Video is STALE — teleop disabled',
  'no-lease': 'Take control (the control lease) to drive',
  'lost-lease': 'You no longer hold the control lease',
  closed: 'No device open',
};

const REASON_TEXT = {
  controller_silent: 'its controller went silent (the control lease expired)',
  controller_disconnected: 'its controller disconnected',
  link_lost: 'its link to the relay was lost',
};

const round2 = (v) => Math.round(v * 100) / 100 || 0; // `|| 0`: no -0
const clamp1 = (v) => Math.max(-1, Math.min(1, Number.isFinite(v) ? v : 0));
const hms = (ms) => {
  const d = new Date(ms);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, '0')).join(':');
};
/** A stick axis with the deadzone removed and the rest rescaled to 0..1. */
const deadzone = (v) => {
  const a = Math.abs(Number(v) || 0);
  return a <= DEADZONE ? 0 : Math.sign(v) * Math.min(1, (a - DEADZONE) / (1 - DEADZONE));
};
/** Writes text only when it changed (no needless DOM work or screen-reader repeats at 10 Hz). */
const setText = (el, text) => {
  const t = String(text);
  if (el.textContent !== t) el.textContent = t;
};
const isTyping = (t) =>
  t instanceof HTMLElement && (/^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName) || t.isContentEditable);

/**
 * The control lease and teleop of the open device. Created once by app.js; see the panel
 * contract (open/update/close/onMessage/relayUp/relayDown).
 */
export class ControlPanel {
  /**
   * @param {HTMLElement} root  the empty panel section
   * @param {object} ctx        the console's shared context (panel contract)
   */
  constructor(root, ctx) {
    this.root = root;
    this.ctx = ctx;
    ctx.holdsLease = () => this.mine;
    this._build();
    this._reset();
    const recheck = () => this._guard(() => {
      this._gate();
      this._render();
    });
    ctx.events.addEventListener('stale', recheck);
    ctx.events.addEventListener('lease', recheck);
    this._render();
  }

  // ---- panel contract -------------------------------------------------------------------------

  /** A device view opened. */
  open(device) {
    this._reset();
    this.deviceID = device && device.id != null ? String(device.id) : this.ctx.deviceID;
    this.device = device || null;
    this.session = {};
    this._fromRecord(device);
    this._listen();
    this.tickTimer = setInterval(() => this._guard(() => this._tick()), 1000 / TELEOP_HZ);
    this._pollPad();
    this._render();
  }

  /** The open device's record was refreshed. */
  update(device) {
    if (!this.deviceID || !device) return;
    this.device = device;
    this._fromRecord(device);
    this._gate();
    this._render();
  }

  /** The view closed: stop driving, give the lease back, forget everything. */
  close() {
    if (!this.deviceID) return;
    const id = this.deviceID;
    if (this.mine) {
      if (this.driving()) this._sendRaw({ throttle: 0, rudder: 0 });
      this.ctx.request('lease_release', { deviceID: id }, { ackIsFinal: true }).catch(() => {});
      this.ctx.log('info', 'lease', `released the control lease of ${id} (view closed)`);
    }
    this._reset();
    this._render();
  }

  /** Every relay message while the view is open; true when consumed. */
  onMessage(msg) {
    if (!this.deviceID || !msg || typeof msg !== 'object') return false;
    const p = msg.payload && typeof msg.payload === 'object' ? msg.payload : {};
    switch (msg.type) {
      case 'lease_state':
        if (p.deviceID !== this.deviceID) return false;
        this._guard(() => this._onLeaseState(p));
        return true;
      case 'safety_stop':
        if (msg.from !== undefined && msg.from !== this.deviceID) return false;
        this._guard(() => this._onSafetyStop(p));
        return true;
      case 'subscribed':
        // The relay's word on presence at (re)subscribe; the record may be older.
        if (p.deviceID === this.deviceID && typeof p.online === 'boolean') {
          this.online = p.online;
          this._gate();
          this._render();
        }
        return false;
      case 'presence':
        // The app refreshes the record too; reacting here stops teleop without waiting for it.
        if (p.deviceID === this.deviceID && (p.status === 'online' || p.status === 'offline')) {
          this.online = p.status === 'online';
          this._gate();
          this._render();
        }
        return false;
      default:
        return false;
    }
  }

  /** Telemetry is not used by this panel. */
  onTelemetry() {}

  /** The relay link is back: learn the lease again from `lease_state`; never re-take it. */
  relayUp() {
    if (!this.deviceID) return;
    this._gate();
    this._render();
  }

  /** The relay link dropped: a held lease is gone on the relay side. */
  relayDown() {
    if (!this.deviceID) return;
    if (this.mine) this._lost('relay', 'the relay connection dropped, which ends the lease on the relay');
    this.leaseKnown = false;
    this.fromMessage = false;
    this.confirming = false;
    this._gate();
    this._render();
  }

  // ---- state ----------------------------------------------------------------------------------

  _reset() {
    clearInterval(this.tickTimer);
    clearInterval(this.beatTimer);
    if (this.listeners) this.listeners.abort();
    this.tickTimer = 0;
    this.beatTimer = 0;
    this.listeners = null;
    this.session = null; // a fresh object per open: late answers of an old view are ignored
    this.deviceID = null;
    this.device = null;
    this.online = null;
    // Lease.
    this.leaseKnown = false; // a lease_state (or the record) told us the holder
    this.fromMessage = false; // the holder came from lease_state (the record is older)
    this.holder = null;
    this.holderName = null;
    this.timeoutMs = DEFAULT_LEASE_TIMEOUT_MS;
    this.mine = false;
    this.since = null;
    this.acquiring = false;
    this.releasing = false;
    this.expect = null; // the lease_state reason our own acquire will announce
    this.confirming = false;
    this.lost = null; // {why, at} when this console lost a lease it held
    this.leaseError = null;
    this.safety = null;
    this.lastEmitted = '';
    // Teleop.
    this.armed = false;
    this.keys = new Set();
    this.pad = null; // {id, index, mapping}
    this.padState = null; // {deadman, throttle, rudder}
    this.padDeadman = false; // the deadman is held and counts
    this.padBlocked = false; // the deadman was already held when armed or focus left: ignore until let go
    this.zeroLeft = 0;
    this.active = false;
    this.cmd = { throttle: 0, rudder: 0 };
    this.sent = 0;
    this.sentTimes = [];
    this.lastSent = null;
    this.unanswered = new Map(); // send number -> Date.now() when sent
    this.failures = 0;
    this.lastResult = null; // {ok, text}
    this.disarmedBecause = null;
    this.reason = 'closed';
    this._emitLease();
  }

  /** Takes presence, access and (until a lease_state arrives) the lease from the record. */
  _fromRecord(device) {
    if (!device) return;
    if (typeof device.online === 'boolean') this.online = device.online;
    if (!this.fromMessage && !this.mine && 'lease' in device) {
      const l = device.lease && typeof device.lease === 'object' ? device.lease : null;
      this._setHolder(l && l.holder ? String(l.holder) : null, l && l.holderName ? String(l.holderName) : null);
      this.leaseKnown = true;
    }
  }

  _access() {
    const d = this.ctx.device ? this.ctx.device() || this.device : this.device;
    return (d && d.access) || (this.device && this.device.access) || 'view';
  }

  _canControl() {
    const a = this._access();
    return a === 'control' || a === 'admin';
  }

  /** How to name the lease holder: "ana", or "your other console window" for this operator. */
  _holderLabel() {
    if (this.holder && this.ctx.me && this.holder === this.ctx.me.id) return 'your other console window';
    return this.holderName || this.holder || 'another pilot';
  }

  _setHolder(holder, holderName) {
    this.holder = holder;
    this.holderName = holderName;
    this._emitLease();
  }

  /** `free | mine | other | unknown`. */
  leaseKind() {
    if (this.mine) return 'mine';
    if (!this.leaseKnown || !this.ctx.connected()) return 'unknown';
    return this.holder ? 'other' : 'free';
  }

  _emitLease() {
    const detail = {
      deviceID: this.deviceID, holder: this.holder, holderName: this.holderName, mine: this.mine,
      timeoutMs: this.timeoutMs,
    };
    const key = JSON.stringify(detail);
    if (key === this.lastEmitted) return;
    this.lastEmitted = key;
    if (this.ctx.emit) this.ctx.emit('lease', detail);
  }

  // ---- lease ----------------------------------------------------------------------------------

  _onLeaseState(p) {
    const holder = typeof p.holder === 'string' && p.holder ? p.holder : null;
    const holderName = typeof p.holderName === 'string' && p.holderName ? p.holderName : null;
    const reason = typeof p.reason === 'string' ? p.reason : '';
    const timeoutMs = Number(p.timeoutMs);
    if (Number.isFinite(timeoutMs) && timeoutMs >= 1000 && timeoutMs !== this.timeoutMs) {
      this.timeoutMs = timeoutMs;
      if (this.mine) this._startHeartbeats();
    }
    const meID = this.ctx.me && this.ctx.me.id;
    const prevHolder = this.holder;
    const wasMine = this.mine;
    this.leaseKnown = true;
    this.fromMessage = true;

    // Our own acquire, announced (possibly before its ack was processed).
    const ours = holder && holder === meID && (
      (this.expect && reason === this.expect) || (this.acquiring && ['acquired', 'renewed', 'takeover'].includes(reason)));
    if (ours) {
      this.expect = null;
      if (!this.mine) this._becameMine();
    } else if (this.mine && (holder !== meID || reason === 'takeover' || reason === 'acquired')) {
      // Someone else holds it now (a takeover by this operator from another window included),
      // or nobody does.
      if (reason === 'released' && this.releasing) {
        this._released();
      } else {
        const who = holder === meID ? 'your other console window' : holderName || holder;
        const why = {
          takeover: `${who || 'another pilot'} took over control`,
          expired: 'the lease expired (no heartbeat reached the relay in time)',
          disconnected: 'the relay saw this console disconnect',
          revoked: 'your access was revoked',
          released: 'the lease was released',
        }[reason] || `the relay reports the lease as ${holder ? `held by ${who}` : 'free'} (${reason || 'no reason'})`;
        this._lost(reason || 'other', why);
      }
    }
    this._setHolder(holder, holderName);
    if (reason === 'acquired' || reason === 'takeover') this.safety = null; // the agent clears its stop
    if (this.confirming && (!holder || this.mine)) this.confirming = false;

    if (holder !== prevHolder && wasMine === this.mine && reason !== 'current') {
      const who = holder ? (holder === meID ? `${holderName || holder} (you, in another console window)` : holderName || holder) : null;
      this.ctx.log('info', 'lease', who ? `${who} holds the control lease (${reason})` : `the control lease is free (${reason})`);
    }
    this._gate();
    this._render();
  }

  _onSafetyStop(p) {
    const policy = typeof p.policy === 'string' ? p.policy : 'stop';
    const reason = typeof p.reason === 'string' ? p.reason : '';
    const controller = typeof p.controller === 'string' && p.controller ? p.controller : null;
    const late = p.late === true;
    const ts = Number(p.timestamp);
    const at = Number.isFinite(ts) && ts > 0 ? ts : Date.now();
    const why = REASON_TEXT[reason] || (reason ? `reason "${reason}"` : 'no reason given');
    const text = `The device was told to ${policy.toUpperCase()}: ${why}` +
      `${controller ? ` (controller: ${controller})` : ''}, at ${hms(at)}` +
      `${late ? ' — reported late: it happened while the device was cut off from the relay' : ''}.`;
    this.safety = { policy, reason, controller, late, at, text };
    this.ctx.log('warn', 'safety stop', text);
    this._render();
  }

  _becameMine() {
    this.mine = true;
    this.since = Date.now();
    this.lost = null;
    this.safety = null;
    this.failures = 0;
    this._startHeartbeats();
    this._emitLease();
  }

  _released() {
    this.mine = false;
    this.releasing = false;
    this.since = null;
    clearInterval(this.beatTimer);
    this.beatTimer = 0;
    this._emitLease();
  }

  /** This console lost a lease it held. */
  _lost(code, why) {
    if (!this.mine) return;
    this.mine = false;
    this.since = null;
    this.releasing = false;
    clearInterval(this.beatTimer);
    this.beatTimer = 0;
    this.lost = { code, why, at: Date.now() };
    // Whoever holds it now is not this connection; a lease_state (if one comes) says who.
    if (this.holder && this.holder === (this.ctx.me && this.ctx.me.id)) this._setHolder(null, null);
    this.ctx.log('warn', 'lease', `you lost the control lease of ${this.deviceID}: ${why}`);
    this._emitLease();
    this._gate();
  }

  _startHeartbeats() {
    clearInterval(this.beatTimer);
    const every = Math.max(500, Math.floor(this.timeoutMs / 3));
    this.beatTimer = setInterval(() => this._heartbeat(), every);
  }

  _heartbeat() {
    if (!this.mine || !this.ctx.connected()) return;
    const session = this.session;
    const id = this.deviceID;
    this.ctx.request('lease_heartbeat', { deviceID: id }, { ackIsFinal: true, timeoutMs: this.timeoutMs })
      .catch((err) => {
        if (session !== this.session || !err) return;
        if (err.code === 'not_controller' || err.code === 'forbidden') {
          this._guard(() => {
            this._lost(err.code, `the relay refused the heartbeat: ${describeFailure(err)}`);
            this._render();
          });
        }
        // timeout / not_connected: relayDown() handles a dropped link.
      });
  }

  async _acquire(takeover) {
    if (this.acquiring || !this.deviceID) return;
    const session = this.session;
    const id = this.deviceID;
    this.acquiring = true;
    this.confirming = false;
    this.leaseError = null;
    this._render();
    const payload = takeover ? { deviceID: id, takeover: true } : { deviceID: id };
    const from = this._holderLabel();
    try {
      const ack = await this.ctx.request('lease_acquire', payload, { ackIsFinal: true, timeoutMs: 10000 });
      if (session !== this.session) {
        // The view closed (or another opened) meanwhile: give back what nobody will keep alive.
        this.ctx.request('lease_release', { deviceID: id }, { ackIsFinal: true }).catch(() => {});
        return;
      }
      const data = ack && ack.payload && ack.payload.data;
      const how = data && typeof data.lease === 'string' ? data.lease : 'acquired';
      this.expect = this.mine ? null : how;
      if (!this.mine) this._becameMine();
      this._setHolder(this.ctx.me && this.ctx.me.id, this.ctx.me && this.ctx.me.username);
      this.leaseKnown = true;
      this.ctx.log('info', 'lease', how === 'takeover'
        ? `you took over control of ${id} from ${from}`
        : `you took control of ${id} (${how})`);
    } catch (err) {
      if (session !== this.session) return;
      this.leaseError = `Could not take control: ${describeFailure(err)}`;
      this.ctx.log('error', 'lease', this.leaseError);
    } finally {
      if (session === this.session) {
        this.acquiring = false;
        this._gate();
        this._render();
      }
    }
  }

  async _release() {
    if (!this.mine || this.releasing) return;
    const session = this.session;
    const id = this.deviceID;
    if (this.driving()) this._sendRaw({ throttle: 0, rudder: 0 });
    this._disarm(null);
    this.releasing = true;
    this.leaseError = null;
    clearInterval(this.beatTimer);
    this.beatTimer = 0;
    this._render();
    try {
      await this.ctx.request('lease_release', { deviceID: id }, { ackIsFinal: true, timeoutMs: 10000 });
      if (session !== this.session) return;
      if (this.mine) {
        this._released();
        this._setHolder(null, null);
      }
      this.ctx.log('info', 'lease', `you released the control lease of ${id}`);
    } catch (err) {
      if (session !== this.session) return;
      if (err && err.code === 'not_controller') {
        this._lost('not_controller', `the relay says this console did not hold it: ${describeFailure(err)}`);
      } else {
        this.releasing = false;
        if (this.mine) this._startHeartbeats();
        this.leaseError = `Could not release: ${describeFailure(err)}`;
        this.ctx.log('error', 'lease', this.leaseError);
      }
    } finally {
      if (session === this.session) {
        this.releasing = false;
        this._gate();
        this._render();
      }
    }
  }

  // ---- teleop ---------------------------------------------------------------------------------

  /** Why teleop cannot run now ('' when it can). */
  _disabledReason() {
    if (!this.deviceID) return 'closed';
    if (!this._canControl()) return 'no-access';
    if (!this.ctx.connected()) return 'relay-down';
    if (this.online === false) return 'offline';
    if (this.ctx.videoStale()) return 'stale';
    if (!this.mine) return 'no-lease';
    return '';
  }

  /** Whether teleop commands are going out (input held, or the trailing zeros). */
  driving() {
    return this.active || this.zeroLeft > 0;
  }

  /** Re-checks the teleop conditions; stops and disarms the moment one fails. */
  _gate() {
    const reason = this._disabledReason();
    this.reason = reason;
    if (!reason) return;
    if (this.armed || this.active) {
      const sentence = reason === 'no-lease' ? REASONS['lost-lease'] : REASONS[reason];
      // A zero can still be delivered when only the video went stale.
      this.ctx.log('warn', 'teleop', `${this.active ? 'stopped driving' : 'Drive disarmed'}: ${sentence}`);
      if (this.active && this._canSendZero()) this._stopInput();
      this._disarm(sentence);
    }
  }

  _canSendZero() {
    return this.mine && this.ctx.connected() && this.online !== false;
  }

  _arm() {
    if (this._disabledReason()) return;
    this.armed = true;
    this.disarmedBecause = null;
    this.failures = 0;
    this.unanswered.clear();
    this.keys.clear();
    // A deadman already held when arming does not count: it must be pressed anew.
    this.padDeadman = false;
    this.padBlocked = !!(this.padState && this.padState.deadman);
    this.ctx.log('info', 'teleop', 'Drive armed');
  }

  _disarm(why) {
    const was = this.armed;
    this.armed = false;
    this.keys.clear();
    this.padDeadman = false;
    this.active = false;
    this.cmd = { throttle: 0, rudder: 0 };
    if (why) this.disarmedBecause = why;
    if (was && !why) this.ctx.log('info', 'teleop', 'Drive disarmed');
  }

  /** The pilot let go: zero now, then ZERO_REPEATS - 1 more on the next ticks. */
  _stopInput() {
    this.active = false;
    this.cmd = { throttle: 0, rudder: 0 };
    if (this._canSendZero()) {
      this._send({ throttle: 0, rudder: 0 });
      this.zeroLeft = ZERO_REPEATS - 1;
    } else {
      this.zeroLeft = 0;
    }
  }

  /** The current stick command from the gamepad (deadman held) or the keyboard. */
  _input() {
    const ps = this.padState;
    if (ps && ps.deadman && this.padDeadman) {
      return { active: true, throttle: round2(clamp1(ps.throttle)), rudder: round2(clamp1(ps.rudder)) };
    }
    const has = (dir) => [...this.keys].some((k) => KEYS[k] === dir);
    const gain = this.gain();
    const t = (has('ahead') ? 1 : 0) - (has('astern') ? 1 : 0);
    const r = (has('starboard') ? 1 : 0) - (has('port') ? 1 : 0);
    return { active: this.keys.size > 0, throttle: round2(t * gain), rudder: round2(r * gain) };
  }

  /** Keyboard stick deflection, 0.25..1. */
  gain() {
    const v = Number(this.els && this.els.gain.value);
    return v > 0 && v <= 1 ? v : 0.5;
  }

  _tick() {
    this._pollPad();
    this._gate();
    this._checkStall();
    if (this.armed && !this.reason) {
      const input = this._input();
      if (input.active) {
        this.active = true;
        this.cmd = { throttle: input.throttle, rudder: input.rudder };
        this._send(this.cmd);
        this.zeroLeft = ZERO_REPEATS - 1;
      } else if (this.active) {
        this._stopInput();
      } else if (this.zeroLeft > 0) {
        this.zeroLeft--;
        this._send({ throttle: 0, rudder: 0 });
      }
    } else if (this.zeroLeft > 0) {
      this.zeroLeft--;
      if (this._canSendZero()) this._send({ throttle: 0, rudder: 0 });
      else this.zeroLeft = 0;
    }
    this._render();
  }

  /** Sends one teleop command and tracks its answer. */
  _send(data) {
    const session = this.session;
    const started = performance.now();
    this.sent++;
    this.sentTimes.push(Date.now());
    this.lastSent = { throttle: round2(data.throttle), rudder: round2(data.rudder) };
    const n = this.sent;
    this.unanswered.set(n, Date.now());
    // `queue: false`: an offline device refuses it (target_offline) instead of getting it later.
    this.ctx.request('app_command', { command: 'teleop', data: this.lastSent, queue: false },
      {
        clientID: this.deviceID,
        timeoutMs: TELEOP_TIMEOUT_MS,
        onAck: (ack) => {
          // Never let stick commands wait in the offline queue for a later delivery.
          if (session === this.session && ack && ack.status === 'queued') {
            this._guard(() => {
              this.online = false;
              this.ctx.log('warn', 'teleop', 'a teleop command was queued: the device went offline');
              this._gate();
              this._render();
            });
          }
        },
      })
      .then((msg) => {
        if (session !== this.session) return;
        this.unanswered.delete(n);
        const ms = Math.round(performance.now() - started);
        const err = resultError(msg);
        if (err) {
          this._failed(`refused: ${err}`);
        } else {
          this.failures = 0;
          const d = msg.payload && msg.payload.data && typeof msg.payload.data === 'object' ? msg.payload.data : {};
          const num = (v) => (typeof v === 'number' ? v.toFixed(2) : '?');
          const status = typeof d.status === 'string' ? d.status : 'ok';
          this.lastResult = { ok: true, text: `ok · ${status} · throttle ${num(d.throttle)} rudder ${num(d.rudder)} · ${ms} ms` };
        }
        this._render();
      })
      .catch((err) => {
        if (session !== this.session) return;
        this.unanswered.delete(n);
        this._guard(() => {
          if (err && (err.code === 'not_controller' || err.code === 'forbidden' || err.code === 'unknown_target' || err.code === 'target_offline')) {
            this.lastResult = { ok: false, text: describeFailure(err) };
            if (err.code === 'not_controller') {
              this._lost('not_controller', `a teleop command was refused: ${describeFailure(err)}`);
            }
            this.active = false;
            this.zeroLeft = 0;
            this._disarm(`Stopped: ${describeFailure(err)}`);
            this.ctx.log('error', 'teleop', `stopped driving: ${describeFailure(err)}`);
          } else if (err && err.code === 'not_connected') {
            this._gate();
          } else {
            this._failed(describeFailure(err));
          }
          this._render();
        });
      });
  }

  /** Sends a zero without counting it as driving (closing the view, releasing). */
  _sendRaw(data) {
    this.lastSent = data;
    this.sent++;
    this.ctx.request('app_command', { command: 'teleop', data, queue: false }, { clientID: this.deviceID, timeoutMs: TELEOP_TIMEOUT_MS })
      .catch(() => {});
    this.active = false;
    this.zeroLeft = 0;
  }

  /** A device that stops answering while driving: stop, say so. */
  _checkStall() {
    if (!this.armed || !this.unanswered.size) return;
    const oldest = this.unanswered.values().next().value;
    if (Date.now() - oldest < ANSWER_STALL_MS) return;
    const text = `no answer from the device for ${(ANSWER_STALL_MS / 1000).toFixed(0)} s`;
    this.lastResult = { ok: false, text };
    if (this.active && this._canSendZero()) this._stopInput();
    this._disarm(`Stopped: ${text}`);
    this.ctx.log('error', 'teleop', `stopped driving: ${text}`);
    this.unanswered.clear(); // the answers may still come; they no longer count as late
  }

  _failed(text) {
    this.failures++;
    this.lastResult = { ok: false, text };
    if (this.failures === 1 || this.failures === MAX_FAILURES) this.ctx.log('error', 'teleop', `teleop failed: ${text}`);
    if (this.failures >= MAX_FAILURES && (this.armed || this.active)) {
      if (this.active && this._canSendZero()) this._stopInput();
      this._disarm(`Stopped after ${MAX_FAILURES} failed commands in a row: ${text}`);
    }
  }

  // ---- input ----------------------------------------------------------------------------------

  _listen() {
    this.listeners = new AbortController();
    const opts = { signal: this.listeners.signal };
    const guard = (fn) => (e) => this._guard(() => fn(e));
    window.addEventListener('keydown', guard((e) => this._onKey(e, true)), opts);
    window.addEventListener('keyup', guard((e) => this._onKey(e, false)), opts);
    window.addEventListener('blur', guard(() => this._letGo('window lost focus')), opts);
    document.addEventListener('visibilitychange', guard(() => {
      if (document.hidden) this._letGo('page hidden');
    }), opts);
    window.addEventListener('gamepadconnected', guard(() => { this._pollPad(); this._render(); }), opts);
    window.addEventListener('gamepaddisconnected', guard(() => {
      this._pollPad();
      this._render();
    }), opts);
  }

  _onKey(e, down) {
    if (!this.armed) return;
    if (e.code === 'Space') {
      if (isTyping(e.target) || e.ctrlKey || e.altKey || e.metaKey) return;
      // Also swallow the keyup: it would click a focused button (e.g. Drive, re-arming it).
      e.preventDefault();
      if (down && !e.repeat) {
        if (this.driving() && this._canSendZero()) this._stopInput();
        this._disarm('all stop (Space), zero command sent');
        this.ctx.log('warn', 'teleop', 'all stop (Space)');
        this._render();
      }
      return;
    }
    if (!KEYS[e.code]) return;
    if (down) {
      if (isTyping(e.target) || e.ctrlKey || e.altKey || e.metaKey) return;
      e.preventDefault();
      this.keys.add(e.code);
    } else {
      if (!this.keys.delete(e.code)) return;
      e.preventDefault();
      if (this.keys.size === 0 && this.active && !(this.padState && this.padState.deadman && this.padDeadman)) {
        this._stopInput(); // deadman: zero at once, not at the next tick
        this._render();
      }
    }
  }

  /** Focus left the page: every key counts as released (no keyup will come). */
  _letGo(why) {
    this.keys.clear();
    this.padDeadman = false;
    this.padBlocked = true;
    if (this.active) {
      this._stopInput();
      this.ctx.log('info', 'teleop', `zero command: ${why}`);
    }
    this._render();
  }

  /** Reads the first connected gamepad; detects the deadman being let go. */
  _pollPad() {
    const pads = typeof navigator.getGamepads === 'function' ? navigator.getGamepads() : [];
    let pad = null;
    for (const p of pads || []) {
      if (p && p.connected) {
        pad = p;
        break;
      }
    }
    if (!pad) {
      this.pad = null;
      this.padState = null;
      if (this.padDeadman) this._padReleased();
      return;
    }
    this.pad = { id: String(pad.id), index: pad.index, mapping: pad.mapping };
    const pressed = (i) => !!(pad.buttons[i] && pad.buttons[i].pressed);
    const deadman = DEADMAN_BUTTONS.some(pressed);
    const ax = pad.axes || [];
    const right = ax.length >= 4 ? deadzone(ax[2]) : 0;
    this.padState = {
      deadman,
      throttle: -deadzone(ax[1]),
      rudder: right !== 0 ? right : deadzone(ax[0]),
    };
    if (!deadman) {
      this.padBlocked = false;
      if (this.padDeadman) this._padReleased();
    } else if (this.armed && !this.padBlocked) {
      this.padDeadman = true;
    }
  }

  _padReleased() {
    this.padDeadman = false;
    if (this.active && this.keys.size === 0) this._stopInput();
  }

  // ---- view -----------------------------------------------------------------------------------

  _build() {
    const h = this.ctx.h;
    const root = this.root;
    root.classList.add('control-panel');
    root.replaceChildren();
    const btn = (testid, text, cls = 'btn btn-small') => h('button', { class: cls, type: 'button', 'data-testid': testid, text });
    const els = {};
    els.leaseBadge = h('span', { class: 'badge ctl-lease-badge', 'data-testid': 'lease-badge' });
    els.safety = h('div', { class: 'ctl-safety', 'data-testid': 'safety-stop', role: 'alert', hidden: true });
    els.safetyText = h('span', {});
    els.safety.append(h('strong', { text: 'SAFETY STOP' }), ' ', els.safetyText,
      h('span', { class: 'ctl-safety-hint', text: ' It stays in force until a pilot takes control again.' }));
    els.holder = h('strong', { class: 'ctl-holder', 'data-testid': 'lease-holder', text: '—' });
    els.take = btn('lease-take', 'Take control', 'btn btn-small btn-primary');
    els.release = btn('lease-release', 'Release');
    els.takeover = btn('lease-takeover', 'Take over…');
    els.take.addEventListener('click', () => this._guard(() => this._acquire(false)));
    els.release.addEventListener('click', () => this._guard(() => this._release()));
    els.takeover.addEventListener('click', () => this._guard(() => {
      this.confirming = true;
      this._render();
      els.confirmBtn.focus();
    }));
    els.confirmText = h('span', {});
    els.confirmBtn = btn('lease-takeover-confirm', 'Take over', 'btn btn-small ctl-danger');
    els.confirmCancel = btn('lease-takeover-cancel', 'Cancel', 'btn btn-small btn-quiet');
    els.confirmBtn.addEventListener('click', () => this._guard(() => this._acquire(true)));
    els.confirmCancel.addEventListener('click', () => this._guard(() => {
      this.confirming = false;
      this._render();
      els.takeover.focus();
    }));
    els.confirm = h('div', { class: 'ctl-confirm', 'data-testid': 'lease-takeover-box', role: 'alertdialog', hidden: true },
      els.confirmText, h('span', { class: 'ctl-buttons' }, els.confirmBtn, els.confirmCancel));
    els.lost = h('div', { class: 'ctl-lost', 'data-testid': 'lease-lost', role: 'alert', hidden: true });
    els.lostText = h('span', {});
    els.again = btn('lease-take-again', 'Take control again', 'btn btn-primary');
    els.again.addEventListener('click', () => this._guard(() => this._acquire(false)));
    els.lostDismiss = btn('lease-lost-dismiss', 'Dismiss', 'btn btn-small btn-quiet');
    els.lostDismiss.addEventListener('click', () => this._guard(() => {
      this.lost = null;
      this._render();
    }));
    els.lost.append(els.lostText, h('span', { class: 'ctl-buttons' }, els.again, els.lostDismiss));
    els.leaseError = h('p', { class: 'inline-error ctl-error', 'data-testid': 'lease-error', role: 'alert', hidden: true });
    els.access = h('p', { class: 'hint', 'data-testid': 'lease-access', hidden: true });

    els.arm = h('button', {
      class: 'btn ctl-arm', type: 'button', 'data-testid': 'teleop-arm', 'aria-pressed': 'false',
      title: 'Arm the keyboard and gamepad for driving',
    }, 'Drive');
    els.arm.addEventListener('click', () => this._guard(() => {
      if (this.armed) {
        if (this.driving() && this._canSendZero()) this._stopInput();
        this._disarm(null);
      } else {
        this._arm();
      }
      this._render();
    }));
    els.state = h('span', { class: 'ctl-state', 'data-testid': 'teleop-state', 'aria-live': 'polite' });
    els.gain = h('select', { class: 'ctl-gain', 'data-testid': 'teleop-gain', title: 'How far a held key moves the stick' });
    for (const [v, label] of [['0.25', '25 %'], ['0.5', '50 %'], ['0.75', '75 %'], ['1', '100 %']]) {
      els.gain.append(h('option', { value: v, text: label }));
    }
    els.gain.value = '0.5';
    // Give the keys back to driving once a power is chosen.
    els.gain.addEventListener('change', () => els.gain.blur());
    els.resume = btn('teleop-resume', 'Resume mission', 'btn btn-small btn-quiet');
    els.resume.title = 'Send "resume": the boat goes back to its waypoint mission';
    els.resume.addEventListener('click', () => this._guard(() => this._resume()));

    const bar = (testid, label) => {
      const fill = h('span', { class: 'ctl-bar-fill' });
      const value = h('span', { class: 'mono ctl-bar-value', 'data-testid': testid, text: '0.00' });
      const row = h('div', { class: 'ctl-bar-row' },
        h('span', { class: 'ctl-bar-label', text: label }),
        h('span', { class: 'ctl-bar', role: 'presentation' }, h('span', { class: 'ctl-bar-mid' }), fill),
        value);
      return { row, fill, value };
    };
    els.throttle = bar('teleop-throttle', 'Throttle');
    els.rudder = bar('teleop-rudder', 'Rudder');
    els.dot = h('span', { class: 'ctl-dot' });
    els.pad2d = h('div', { class: 'ctl-2d', 'aria-hidden': 'true' }, h('span', { class: 'ctl-2d-h' }), h('span', { class: 'ctl-2d-v' }), els.dot);

    const stat = (label, testid, wide = false) => {
      const dd = h('dd', { class: 'mono', 'data-testid': testid, text: '—' });
      return [h('div', { class: wide ? 'ctl-wide' : null }, h('dt', { text: label }), dd), dd];
    };
    const [sentRow, sent] = stat('Sent', 'teleop-sent');
    const [rateRow, rate] = stat('Rate', 'teleop-rate');
    const [padRow, pad] = stat('Gamepad', 'teleop-gamepad', true);
    const [resultRow, result] = stat('Last answer', 'teleop-last-result', true);
    Object.assign(els, { sent, rate, pad, result });

    root.append(
      h('div', { class: 'ctl-head' }, h('h3', { text: 'Control' }), els.leaseBadge),
      els.safety,
      h('div', { class: 'ctl-lease' },
        h('span', { class: 'muted', text: 'Control lease:' }), els.holder,
        h('span', { class: 'ctl-buttons' }, els.take, els.release, els.takeover)),
      els.confirm, els.lost, els.leaseError, els.access,
      h('div', { class: 'ctl-teleop' },
        h('div', { class: 'ctl-teleop-row' }, els.arm, els.state),
        h('div', { class: 'ctl-sticks' }, els.pad2d,
          h('div', { class: 'ctl-bars' }, els.throttle.row, els.rudder.row)),
        h('dl', { class: 'ctl-stats' }, sentRow, rateRow, padRow, resultRow),
        h('div', { class: 'ctl-teleop-row small' },
          h('label', { class: 'muted' }, 'Key power ', els.gain), els.resume),
        h('p', { class: 'hint' },
          'Keys while Drive is on: W/S or ↑/↓ throttle ahead/astern, A/D or ←/→ rudder port/starboard, Space all stop. ' +
          'Gamepad: hold RB (or LB) as deadman; left stick ↕ throttle, right stick ↔ rudder. ' +
          'Letting go sends a zero; without commands the boat holds position after 2 s.')),
    );
    this.els = els;
  }

  async _resume() {
    if (!this.mine || !this.deviceID) return;
    const session = this.session;
    if (this.driving() && this._canSendZero()) this._stopInput();
    this._disarm(null);
    this._render();
    try {
      const msg = await this.ctx.request('app_command', { command: 'resume', data: {} }, { clientID: this.deviceID, timeoutMs: 15000 });
      if (session !== this.session) return;
      const err = resultError(msg);
      this.lastResult = err ? { ok: false, text: `resume refused: ${err}` } : { ok: true, text: 'resume: ok · back on the mission' };
      this.ctx.log(err ? 'error' : 'info', 'command', err ? `resume refused: ${err}` : 'resume: the device is back on its mission');
    } catch (err) {
      if (session !== this.session) return;
      this.lastResult = { ok: false, text: `resume failed: ${describeFailure(err)}` };
      this.ctx.log('error', 'command', this.lastResult.text);
    }
    this._render();
  }

  _render() {
    const e = this.els;
    if (!e) return;
    const open = !!this.deviceID;
    const kind = this.leaseKind();
    const connected = this.ctx.connected();
    const canControl = open && this._canControl();
    const admin = open && this._access() === 'admin';
    const who = this._holderLabel();
    const meID = this.ctx.me && this.ctx.me.id;

    // Lease.
    this.root.dataset.lease = kind;
    this.root.dataset.leaseLost = this.lost ? this.lost.code : '';
    let holderText;
    if (!open) holderText = '—';
    else if (kind === 'mine') holderText = `You (since ${hms(this.since || Date.now())})`;
    else if (kind === 'free') holderText = 'Free';
    else if (kind === 'other') holderText = this.holder === meID ? 'You, in another console window' : `${who} (another pilot)`;
    else holderText = connected ? 'Unknown (waiting for the relay)' : 'Unknown — relay connection lost';
    setText(e.holder, holderText);
    setText(e.leaseBadge, { mine: 'You drive', free: 'Free', other: 'Held', unknown: 'Unknown' }[kind]);
    e.leaseBadge.dataset.kind = kind;

    const busy = this.acquiring || this.releasing;
    e.take.hidden = kind === 'mine' || !!this.lost;
    setText(e.take, this.acquiring && !this.confirming ? 'Taking control…' : 'Take control');
    e.take.disabled = !canControl || !connected || busy || kind === 'other' || kind === 'unknown';
    e.take.title = kind === 'other' ? `${who} holds the lease` : '';
    e.release.hidden = kind !== 'mine';
    e.release.disabled = busy || !connected;
    setText(e.release, this.releasing ? 'Releasing…' : 'Release');
    e.takeover.hidden = !(admin && kind === 'other');
    e.takeover.disabled = busy || !connected || this.confirming;
    e.confirm.hidden = !(this.confirming && admin && kind === 'other');
    setText(e.confirmText, `Take control from ${who}? The current holder loses control at once and its driving stops.`);
    setText(e.confirmBtn, this.acquiring ? 'Taking over…' : `Take over from ${who}`);
    e.confirmBtn.disabled = busy || !connected;

    e.lost.hidden = !(open && this.lost && kind !== 'mine');
    if (this.lost) setText(e.lostText, `You lost the control lease at ${hms(this.lost.at)}: ${this.lost.why}. ` +
      (kind === 'other' ? `Now held by ${who}.` : connected ? 'Take it again when you are ready.' : 'Reconnecting to the relay…'));
    e.again.hidden = !(canControl && (kind === 'free' || kind === 'unknown'));
    e.again.disabled = !connected || busy || kind !== 'free';
    setText(e.again, this.acquiring ? 'Taking control…' : 'Take control again');

    e.leaseError.hidden = !this.leaseError;
    setText(e.leaseError, this.leaseError || '');
    e.access.hidden = !open || canControl;
    setText(e.access, `You have ${this._access()} access to this device: taking control and driving need control access. Ask an admin.`);
    if (!canControl) {
      e.take.disabled = true;
      e.release.disabled = true;
    }

    e.safety.hidden = !(open && this.safety);
    setText(e.safetyText, this.safety ? this.safety.text : '');

    // Teleop.
    const reason = this._disabledReason();
    const driving = !reason && this.armed && this.driving();
    const teleop = reason ? 'disabled' : driving ? 'driving' : 'ready';
    this.root.dataset.teleop = teleop;
    this.root.dataset.teleopDisabledReason = reason;
    this.root.dataset.teleopArmed = String(this.armed);
    this.root.dataset.teleopSent = String(this.sent);
    this.root.dataset.lastCommand = this.lastSent ? JSON.stringify(this.lastSent) : '';
    e.arm.setAttribute('aria-pressed', String(this.armed));
    e.arm.disabled = !!reason;
    setText(e.arm, this.armed ? 'Drive: ON' : 'Drive');
    e.arm.classList.toggle('is-armed', this.armed);

    let sentence;
    if (reason) {
      sentence = reason === 'no-lease' && this.lost ? REASONS['lost-lease'] : REASONS[reason];
    } else if (driving) {
      sentence = 'Driving';
    } else if (this.armed) {
      sentence = this.pad ? 'Armed — hold W/A/S/D, the arrows, or the gamepad\'s RB to drive' : 'Armed — hold W/A/S/D or the arrows to drive';
    } else {
      sentence = this.disarmedBecause
        ? `Disarmed: ${this.disarmedBecause.replace(/\.$/, '')}. Press Drive to arm again.`
        : 'Ready — press Drive to arm the keyboard and gamepad';
    }
    setText(e.state, sentence);
    e.state.dataset.level = reason ? 'bad' : driving ? 'ok' : this.disarmedBecause ? 'warn' : '';

    const show = driving ? this.cmd : this.armed ? this._preview() : { throttle: 0, rudder: 0 };
    const setBar = (b, v) => {
      setText(b.value, (v >= 0 ? '+' : '') + v.toFixed(2));
      b.fill.style.left = `${50 + Math.min(0, v) * 50}%`;
      b.fill.style.width = `${Math.abs(v) * 50}%`;
    };
    setBar(e.throttle, show.throttle);
    setBar(e.rudder, show.rudder);
    e.dot.style.left = `${50 + show.rudder * 50}%`;
    e.dot.style.top = `${50 - show.throttle * 50}%`;
    this.root.classList.toggle('is-driving', driving);

    const now = Date.now();
    while (this.sentTimes.length && now - this.sentTimes[0] > 1000) this.sentTimes.shift();
    const waiting = this.unanswered.size;
    setText(e.sent, String(this.sent) + (waiting > 2 ? ` (${waiting} awaiting an answer)` : ''));
    setText(e.rate, driving ? `${this.sentTimes.length}/s (target ${TELEOP_HZ}/s)` : 'idle');
    setText(e.pad, this.pad
      ? `${this.pad.id}${this.pad.mapping === 'standard' ? '' : ' (non-standard mapping: sticks may differ)'}` +
        `${this.padState && this.padState.deadman ? ' · deadman held' : ''}`
      : typeof navigator.getGamepads === 'function' ? 'none — connect one and press a button' : 'not supported by this browser');
    setText(e.result, this.lastResult ? this.lastResult.text : '—');
    e.result.dataset.level = this.lastResult ? (this.lastResult.ok ? '' : 'bad') : '';
    e.resume.disabled = !open || !this.mine || !connected || this.online === false;
    e.gain.disabled = !open;
  }

  /** What the input would send now (shown while armed but idle). */
  _preview() {
    const i = this._input();
    return i.active ? i : { throttle: 0, rudder: 0 };
  }

  _guard(fn) {
    try {
      return fn();
    } catch (err) {
      console.error(err);
      if (this.ctx.toast) this.ctx.toast('error', 'Control panel error:', err && err.message ? err.message : String(err));
      return undefined;
    }
  }
}
