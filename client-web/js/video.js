// Live video from the open device, peer to peer or through the relay's SFU, signaled over the
// console's one WebSocket to the relay (protocol section 4.13, `webrtc`).
//
// VideoLink owns the RTCPeerConnection and the signaling of one session at a time; it has no
// DOM and reports through events:
//
//   change   its snapshot() changed (state, ICE, timings, the reason a session ended)
//   stream   {stream} a MediaStream to play, or null when there is nothing to play
//   stats    the figures of the latest getStats() sample (once a second while a peer exists)
//
// VideoPanel renders a VideoLink into the #video-panel skeleton of index.html, plays the
// stream and exposes what tests read as data-* attributes on the panel (among them data-mode,
// `p2p` | `sfu` once known, data-mode-reason, the relay's reason, and data-mode-requested), and
// keeps the pilot's choice of mode (the selector, remembered in localStorage).
//
// How a session goes: start() picks a fresh sessionID, creates a peer with one receive-only
// video transceiver, sends the `offer` (the only message with a correlationID, so the relay's
// `ack`/`error` and an old agent's `command_result` can be matched to it) and trickles its ICE
// candidates as the browser finds them. The device answers and trickles its own; candidates
// that arrive before the answer is applied wait in a buffer. After a network blip (ICE
// `disconnected` for a few seconds, or `failed`) the same session is renegotiated with an ICE
// restart offer. When the relay link drops, the relay ends the session (the device hears
// `pilot_left`), so once the console is connected again a new session starts if video was on.
// A `bye` from the relay or the device ends the session with its reason; Start begins again.
//
// Modes: every offer carries the mode the pilot chose (`auto`, `p2p` or `sfu`); the relay says
// which one the session is in and why (`mode`). In `sfu` the relay answers the offer itself and
// forwards the device's video. An `auto` session tries peer to peer first, and the relay moves it
// to its SFU when no direct path connects within its deadline (it says how long in the `mode`
// message) or a side reports `failed`: this console then closes its peer and sends a fresh offer
// on the same session to the relay (a new peer *generation*; signaling that belongs to the
// abandoned peer is dropped). So the relay can decide, every change of the peer's connection
// state is reported to it (`state`), and while an `auto` session is still peer to peer no ICE
// restart is tried before the relay's deadline has passed (or, after `failed`, before it had a
// moment to move the session). In `sfu` and `p2p` ICE restarts work as they always did: a new
// offer on the session, answered by the relay's SFU or by the device.

/** ICE `disconnected` for this long (a blip that did not heal by itself) triggers a restart. */
const DISCONNECTED_GRACE_MS = 3000;
/** A session that is not connected this long after its answer is restarted. */
const CONNECT_TIMEOUT_MS = 15000;
/** After an ICE restart, the next one if still not connected: doubling up to the maximum. */
const RESTART_BASE_MS = 5000;
const RESTART_MAX_MS = 30000;
/** The device must answer an offer within this (an agent without video never does). */
const ANSWER_TIMEOUT_MS = 15000;
const STATS_EVERY_MS = 1000;
/** No new frame for this long while connected is shown as a frozen picture. */
const STALL_MS = 2500;
/** What the pilot may choose. `auto` is the default. */
export const VIDEO_MODES = ['auto', 'p2p', 'sfu'];
/** The relay's --p2p-timeout when its `mode` message does not say (protocol 4.13). */
const P2P_TIMEOUT_MS = 5000;
/** Slack on top of the relay's deadline before this console acts on its own. */
const DECISION_MARGIN_MS = 2000;
/** After `failed` in an `auto` session still peer to peer: how long the relay has to move it. */
const FAILED_GRACE_MS = 3000;

/** Why a session ended, for people. Unknown reasons are shown as they came. */
const BYE_REASONS = {
  device_offline: 'the device went offline',
  pilot_left: 'the relay ended the session (this console was disconnected)',
  video_disabled: 'video is turned off on this device (video.enabled in its config)',
  video_unavailable: 'the device cannot produce video right now',
  negotiation_failed: 'the device could not negotiate a stream with this browser',
  invalid_offer: "the device refused this browser's offer",
  no_answer: 'the device did not answer the offer',
  unsupported: 'this device agent does not support video',
  target_offline: 'the device is not connected',
  forbidden: 'you are not allowed to view this device',
  unknown_target: 'the device is not in your organisation',
  peer_error: 'this browser could not set up the connection',
  moved_to_sfu: 'the relay moved the video to its SFU',
  publisher_left: "the device's stream to the relay ended",
  sfu_failed: 'the relay could not carry the video through its SFU',
  sfu_unsupported: 'this relay has no SFU (started with --no-sfu): choose Auto or Peer to peer',
  no_viewers: "the relay stopped the device's stream: nobody was watching",
};

/** Ends after which video that was on starts again by itself once the device is online. */
const RESUMABLE = new Set(['device_offline', 'target_offline', 'publisher_left']);

/** The modes, for people. */
export const MODE_NAMES = { auto: 'Auto', p2p: 'Peer to peer', sfu: 'Through relay (SFU)' };

/** The seconds in a relay message such as "... within 5 s ...", or null. */
function secondsIn(message) {
  const m = /within\s+(\d+(?:\.\d+)?)\s*s\b/.exec(message || '');
  return m ? Number(m[1]) : null;
}

/**
 * Why the session is in its mode, for people: "trying direct first", "no direct path within 5 s".
 * `connected`: the current peer is connected (an `auto` session that made it peer to peer).
 */
export function describeModeReason(reason, message, connected = false) {
  const secs = secondsIn(message);
  switch (reason) {
    case 'requested':
      return 'as chosen';
    case 'default':
      return "the relay's default";
    case 'auto_p2p_first':
      return connected ? 'direct path connected' : 'trying direct first';
    case 'viewers':
      return 'several pilots watch this device';
    case 'p2p_timeout':
      return secs != null ? `no direct path within ${secs} s` : 'no direct path in time';
    case 'p2p_failed':
      return 'the direct path failed';
    case 'sfu_disabled':
      return 'this relay has no SFU';
    default:
      return reason ? String(reason) : '';
  }
}

/** A readable sentence for an end reason and the optional detail that came with it. */
export function describeEnd(reason, message) {
  const base = BYE_REASONS[reason] ?? (reason ? `reason "${reason}"` : 'no reason given');
  return message ? `${base} (${message})` : base;
}

/** A session id no other console will pick: 16 random hex digits (works without HTTPS). */
function newSessionID() {
  const b = new Uint8Array(8);
  crypto.getRandomValues(b);
  return `v-${Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('')}`;
}

const num = (x) => (typeof x === 'number' && Number.isFinite(x) ? x : null);

/** "H264 42e01f", "VP8": the codec stats entry's MIME subtype and H.264 profile. */
function describeCodec(codec) {
  const name = String(codec.mimeType || '?').replace(/^video\//i, '');
  const profile = /profile-level-id=([0-9a-f]+)/i.exec(codec.sdpFmtpLine || '');
  return profile ? `${name} ${profile[1]}` : name;
}

/** The ICE servers in an `auth_ok` payload, if the relay ever provides any: none otherwise. */
function iceServersFrom(session) {
  const list = session && Array.isArray(session.iceServers) ? session.iceServers : [];
  return list.filter((s) => s && (typeof s.urls === 'string' || Array.isArray(s.urls)));
}

export class VideoLink extends EventTarget {
  /**
   * @param {object} opts
   * @param {(msg: object) => boolean} opts.send      sends one message on the relay socket
   * @param {() => boolean} opts.relayUp              whether the relay socket is connected
   * @param {() => object|null} opts.relaySession     the current `auth_ok` payload
   * @param {(kind: string, text: string) => void} [opts.log]  kind: system | warn | error
   */
  constructor({ send, relayUp, relaySession, log = () => {} }) {
    super();
    this._send = send;
    this._relayUp = relayUp;
    this._relaySession = relaySession;
    this._log = log;
    this.deviceID = null;
    /** Whether the user wants video: survives relay reconnects, cleared by stop() and bye. */
    this.wanted = false;
    /**
     * Video that was on ended because the device (or its stream to the relay) went away: it
     * starts again by itself when the device is back online (deviceOnline()).
     */
    this.resumeWhenOnline = false;
    this.state = 'off'; // off | starting | connecting | live | recovering | waiting | ended
    this.detail = '';
    this.endReason = null;
    this.endMessage = null;
    this.sessions = 0; // sessions started since the device was opened
    /** The mode the pilot chose (see setMode()): what the next offer asks for. */
    this.mode = 'auto';
    this.s = null; // the current session, see _begin()
    /** Ids of the last few sessions, to recognise the relay's refusals of their late messages. */
    this.recent = new Set();
  }

  // ---- public API -------------------------------------------------------------------------

  /** A newly opened device: forgets everything about the previous one. */
  attach(deviceID) {
    this.stop('closed');
    this.deviceID = deviceID;
    this.resumeWhenOnline = false;
    this.endReason = this.endMessage = null;
    this.sessions = 0;
    this._set('off', '');
  }

  /** Start pressed. */
  start() {
    if (!this.deviceID) return;
    this.wanted = true;
    this.resumeWhenOnline = false;
    this.endReason = this.endMessage = null;
    this._begin(performance.now());
  }

  /**
   * The pilot chose a mode (one of VIDEO_MODES). Video that is on starts again in it: a `bye`
   * for the current session and a new one, since the relay decides a session's mode on its
   * first offer.
   */
  setMode(mode) {
    if (!VIDEO_MODES.includes(mode) || mode === this.mode) return;
    this.mode = mode;
    const s = this.s;
    if (this.wanted && s && !s.relayLost && s.requested !== mode) {
      this._log('system', `video mode ${MODE_NAMES[mode]}: starting a new session`);
      this._send({ type: 'webrtc', clientID: this.deviceID, payload: { subtype: 'bye', sessionID: s.id, reason: 'mode_changed' } });
      this.endReason = this.endMessage = null;
      this._begin(performance.now());
    } else this._emit('change');
  }

  /** Stop pressed (`stopped`) or the view closed (`closed`): says `bye` and closes the peer. */
  stop(reason = 'stopped') {
    this.wanted = false;
    this.resumeWhenOnline = false;
    const s = this.s;
    if (s && !s.relayLost) this._send({ type: 'webrtc', clientID: this.deviceID, payload: { subtype: 'bye', sessionID: s.id, reason } });
    this._close();
    if (this.deviceID) this._set('off', '');
  }

  /** The relay socket went down: the relay ends our session, so wait for it to come back. */
  relayDown() {
    const s = this.s;
    if (!s || s.relayLost) return;
    s.relayLost = true;
    clearTimeout(s.timers.restart);
    clearTimeout(s.timers.answer);
    if (this.wanted) {
      this._log('warn', 'relay connection lost: a new video session starts when it is back');
      this._set('waiting', 'waiting for the relay connection');
    }
  }

  /** The relay socket is up again (`auth_ok`): a new session if video was on. */
  relayUp() {
    if (this.wanted && (!this.s || this.s.relayLost)) {
      this._log('system', 'relay connection back: starting a new video session');
      this._begin(performance.now());
    }
  }

  /** The open device is online (again): video that ended with it starts again. */
  deviceOnline() {
    if (!this.resumeWhenOnline || this.s || !this.deviceID || !this._relayUp()) return;
    this._log('system', 'the device is back: starting the video again');
    this.start();
  }

  /**
   * A message from the relay. Returns true when it belonged to video (the caller then does
   * not report it elsewhere): `webrtc` from the open device, and `ack`/`error`/`command_result`
   * answering one of our offers.
   */
  handle(msg) {
    const p = msg.payload || {};
    if (msg.type === 'webrtc') {
      // Every `webrtc` message is video's; only the open device's current session acts.
      if (msg.from !== undefined && msg.from !== this.deviceID) return true;
      const s = this.s;
      // Late messages of a session already ended are expected (a candidate in flight): drop.
      if (!s || p.sessionID !== s.id) return true;
      this._onSignal(s, p);
      return true;
    }
    const s = this.s;
    if (msg.type === 'error' && !msg.correlationID && typeof p.message === 'string' && [...this.recent].some((id) => p.message.includes(id))) {
      // A candidate that crossed the session's end on the wire ("no session ..."): expected.
      console.debug('relay refused a message of an ended video session:', p.message);
      return true;
    }
    if (!s || !msg.correlationID || !s.offers.has(msg.correlationID)) return false;
    if (msg.type === 'ack') {
      if (this.state === 'starting' && p.status === 'delivered') {
        this._set('starting', s.peerMode === 'sfu' ? "offer delivered, waiting for the relay's answer" : "offer delivered, waiting for the device's answer");
      }
      return true;
    }
    if (msg.type === 'error') {
      let code = typeof p.code === 'string' ? p.code : 'error';
      // A relay without the SFU refuses `sfu` offers: say that, not "the agent has no video".
      if (code === 'unsupported' && s.offerModes.get(msg.correlationID) === 'sfu') code = 'sfu_unsupported';
      this._end(code, typeof p.message === 'string' ? p.message : null);
      return true;
    }
    if (msg.type === 'command_result' && p.ok === false) {
      // An agent that predates video refuses `webrtc` like any unknown request.
      this._end(typeof p.code === 'string' ? p.code : 'unsupported', typeof p.message === 'string' ? p.message : null);
      return true;
    }
    return false;
  }

  /** The player presented its first frame of the current session. */
  firstFrame(at = performance.now()) {
    const s = this.s;
    if (!s || s.t.firstFrame != null) return;
    s.t.firstFrame = at;
    this._log('system', `first video frame ${Math.round(at - s.t.click)} ms after start`);
    this._emit('change');
  }

  /** The mode the current session is in (`p2p` | `sfu`); null without one or until known. */
  currentMode() {
    return this.s ? this._modeOf(this.s) : null;
  }

  /** Everything the panel shows, as plain data. */
  snapshot() {
    const s = this.s;
    const since = (t) => (s && t != null ? t - s.t.click : null);
    return {
      deviceID: this.deviceID,
      state: this.state,
      detail: this.detail,
      wanted: this.wanted,
      sessionID: s ? s.id : null,
      /** The mode chosen for the next session, and the one the current session asked for. */
      chosenMode: this.mode,
      requestedMode: s ? s.requested : null,
      /** The mode in use (`p2p` | `sfu`, null until known) and the relay's why. */
      mode: s ? this._modeOf(s) : null,
      modeAuto: s ? s.auto : null,
      modeReason: s ? s.modeReason : null,
      modeMessage: s ? s.modeMessage : null,
      /** Peer connections in this session: 1, 2 after a move to the SFU. */
      generation: s ? s.gen : 0,
      peerConnected: !!(s && s.genConnected),
      connectionState: s ? s.pc.connectionState : null,
      iceState: s ? s.pc.iceConnectionState : null,
      iceRestarts: s ? s.restarts : 0,
      endReason: this.endReason,
      endMessage: this.endMessage,
      sessions: this.sessions,
      timings: {
        answerMs: since(s && s.t.answer),
        connectedMs: since(s && s.t.connected),
        firstFrameMs: since(s && s.t.firstFrame),
      },
      stats: s ? s.stats : null,
    };
  }

  // ---- session lifecycle ------------------------------------------------------------------

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _set(state, detail) {
    this.state = state;
    this.detail = detail;
    this._emit('change');
  }

  async _begin(clickAt) {
    this._close();
    if (!this._relayUp()) {
      this._set('waiting', 'waiting for the relay connection');
      return;
    }
    const s = {
      id: newSessionID(),
      pc: null, // the current peer, see _newPeer()
      gen: 0, // which peer: a move to the SFU replaces it (stale signaling is told by this)
      requested: this.mode, // what the first offer asks for
      mode: null, // the relay's word: p2p | sfu
      auto: null,
      modeReason: null,
      modeMessage: null,
      peerMode: null, // whom the current peer talks to: p2p (the device) | sfu (the relay)
      offered: false, // the current peer has sent its offer (signaling before that is stale)
      reported: null, // the connection state last reported to the relay, for this peer
      genConnected: false, // the current peer has been connected
      decideBy: null, // auto, peer to peer: no ICE restart before the relay's decision (ms)
      p2pTimeoutMs: P2P_TIMEOUT_MS, // the relay's deadline for a direct path, as it said
      failedAt: null, // when the current peer went `failed`
      held: false, // a restart is being held back for the relay's decision (logged once)
      offers: new Set(), // correlationIDs of our offers in this session
      offerModes: new Map(), // correlationID -> the mode it asked for
      offerCount: 0,
      awaitingAnswer: false,
      pendingCandidates: [], // the remote peer's candidates that came before its answer
      relayLost: false,
      restarts: 0,
      restartDelay: RESTART_BASE_MS,
      timers: { disconnected: 0, restart: 0, answer: 0, stats: 0 },
      t: { click: clickAt, answer: null, connected: null, firstFrame: null },
      stats: null,
      prev: null, // the previous inbound-rtp sample, for rates
      lastFrames: 0, // framesDecoded when it last grew, and when that was
      lastFrameAt: null,
      stream: null,
    };
    this.s = s;
    this.sessions++;
    this.recent.add(s.id);
    if (this.recent.size > 8) this.recent.delete(this.recent.values().next().value);
    if (!this._newPeer(s)) return;
    s.timers.stats = setInterval(() => this._sample(s), STATS_EVERY_MS);
    this._set('starting', 'sending the offer');
    await this._firstOffer(s);
  }

  /**
   * A new peer for session `s` (its first, or the one that replaces the peer-to-peer attempt
   * when the relay moves the session to its SFU): one receive-only video transceiver, trickled
   * candidates, state changes reported to the relay. Returns false when the browser refused.
   */
  _newPeer(s) {
    let pc;
    try {
      pc = new RTCPeerConnection({ iceServers: iceServersFrom(this._relaySession()) });
    } catch (e) {
      this._end('peer_error', e && e.message ? e.message : String(e));
      return false;
    }
    const gen = ++s.gen;
    s.pc = pc;
    s.offered = false;
    s.reported = null;
    s.genConnected = false;
    s.failedAt = null;
    s.held = false;
    s.awaitingAnswer = false;
    s.pendingCandidates = [];
    const mine = () => this.s === s && s.gen === gen;

    pc.addTransceiver('video', { direction: 'recvonly' });
    pc.ontrack = (ev) => {
      if (!mine()) return;
      s.stream = ev.streams && ev.streams[0] ? ev.streams[0] : new MediaStream([ev.track]);
      this._emit('stream', { stream: s.stream });
    };
    pc.onicecandidate = (ev) => {
      if (!mine() || s.relayLost) return;
      // null ends this gathering generation; Chrome's own `candidate: ""` events are redundant.
      if (ev.candidate && !ev.candidate.candidate) return;
      const c = ev.candidate ? ev.candidate.toJSON() : { candidate: '' };
      const payload = { subtype: 'ice_candidate', sessionID: s.id, candidate: c.candidate ?? '' };
      if (c.sdpMid != null) payload.sdpMid = c.sdpMid;
      if (c.sdpMLineIndex != null) payload.sdpMLineIndex = c.sdpMLineIndex;
      if (c.usernameFragment) payload.usernameFragment = c.usernameFragment;
      this._send({ type: 'webrtc', clientID: this.deviceID, payload });
    };
    pc.oniceconnectionstatechange = () => mine() && this._onIceState(s);
    pc.onconnectionstatechange = () => {
      if (!mine()) return;
      this._reportState(s);
      this._onIceState(s);
    };
    return true;
  }

  /** The first offer of the current peer; a failure ends the session. */
  async _firstOffer(s) {
    const gen = s.gen;
    try {
      await this._offer(s, false);
    } catch (e) {
      if (this.s === s && s.gen === gen) this._end('peer_error', e && e.message ? e.message : String(e));
    }
  }

  /** The mode the next offer of `s` asks for: `sfu` once the relay carries it, else the choice. */
  _offerMode(s) {
    return s.peerMode === 'sfu' || s.mode === 'sfu' ? 'sfu' : s.requested;
  }

  /** The mode in use: the relay's word, else whom the answer came from. */
  _modeOf(s) {
    return s.mode ?? s.peerMode;
  }

  /**
   * Whether the relay may still move `s` to its SFU by itself (`auto`, still peer to peer, on a
   * relay that has an SFU, or one that has not said anything yet).
   */
  _autoPending(s) {
    if (s.requested !== 'auto' || s.peerMode === 'sfu' || s.mode === 'sfu') return false;
    if (s.mode == null) return true;
    return s.auto !== false && s.modeReason !== 'sfu_disabled';
  }

  /**
   * How long an ICE restart of `s` waits for the relay's own decision (0: go ahead). An `auto`
   * session that is still peer to peer is the relay's to move before its deadline, and right
   * after a side reported `failed`; restarting then would race its move.
   */
  _holdFor(s) {
    if (!this._autoPending(s)) return 0;
    let until = s.decideBy ?? 0;
    // A relay that never spoke of modes moves nothing: its deadline is all we wait for.
    if (s.failedAt != null && s.mode != null) until = Math.max(until, s.failedAt + FAILED_GRACE_MS);
    return Math.max(0, until - performance.now());
  }

  /** Tells the relay the current peer's connection state, when it changed (no correlationID). */
  _reportState(s) {
    const state = s.pc.connectionState;
    if (!s.offered || s.relayLost || state === s.reported) return;
    s.reported = state;
    this._send({ type: 'webrtc', clientID: this.deviceID, payload: { subtype: 'state', sessionID: s.id, state } });
  }

  /** Creates and sends an offer on session `s` (an ICE restart when `restart`). */
  async _offer(s, restart) {
    const gen = s.gen;
    const pc = s.pc;
    const mine = () => this.s === s && s.gen === gen;
    const offer = await pc.createOffer(restart ? { iceRestart: true } : {});
    if (!mine()) return;
    await pc.setLocalDescription(offer);
    if (!mine() || s.relayLost) return;
    const correlationID = `${s.id}.${++s.offerCount}`;
    const mode = this._offerMode(s);
    s.offers.add(correlationID);
    s.offerModes.set(correlationID, mode);
    s.awaitingAnswer = true;
    const sent = this._send({
      type: 'webrtc',
      correlationID,
      clientID: this.deviceID,
      payload: { subtype: 'offer', sessionID: s.id, sdp: pc.localDescription.sdp, mode },
    });
    if (!sent) {
      this.relayDown();
      return;
    }
    s.offered = true;
    // Every peer-to-peer attempt of an `auto` session (the first offer, an ICE restart) gets the
    // relay's deadline anew: its own word (`mode`), else its default.
    if (mode === 'auto' && this._autoPending(s)) s.decideBy = performance.now() + s.p2pTimeoutMs + DECISION_MARGIN_MS;
    // The relay judges each offer's attempt afresh (an `auto` session's deadline restarts): it
    // hears the peer's state again, even unchanged, once it is past `new`.
    s.reported = null;
    if (pc.connectionState !== 'new') this._reportState(s);
    clearTimeout(s.timers.answer);
    s.timers.answer = setTimeout(() => {
      if (mine() && s.awaitingAnswer) this._end('no_answer', `no answer within ${ANSWER_TIMEOUT_MS / 1000} s`);
    }, ANSWER_TIMEOUT_MS);
  }

  async _onSignal(s, p) {
    const gen = s.gen;
    const mine = () => this.s === s && s.gen === gen;
    switch (p.subtype) {
      case 'answer': {
        if (typeof p.sdp !== 'string') return;
        // Before this peer's offer went out, or with no offer outstanding, it answers an
        // abandoned one (the peer-to-peer attempt the relay moved away from, a duplicate).
        if (!s.offered || s.pc.signalingState !== 'have-local-offer') {
          console.debug('video: dropped an answer that belongs to no outstanding offer', p.mode ?? '');
          return;
        }
        clearTimeout(s.timers.answer);
        if (s.t.answer == null) s.t.answer = performance.now();
        // The relay's SFU marks its answers; the device's carry no mode.
        const from = p.mode === 'sfu' ? 'sfu' : 'p2p';
        if (s.peerMode == null) s.peerMode = from;
        try {
          await s.pc.setRemoteDescription({ type: 'answer', sdp: p.sdp });
        } catch (e) {
          if (mine()) this._fail(s, `the ${from === 'sfu' ? "relay's" : "device's"} answer was not usable: ${e.message}`);
          return;
        }
        if (!mine()) return;
        s.awaitingAnswer = false;
        const queued = s.pendingCandidates.splice(0);
        for (const c of queued) await this._addCandidate(s, c);
        if (!mine()) return;
        if (this.state === 'starting') this._set('connecting', s.peerMode === 'sfu' ? 'connecting through the relay' : 'connecting to the device');
        else this._emit('change');
        this._armConnectTimeout(s);
        break;
      }
      case 'ice_candidate': {
        if (typeof p.candidate !== 'string') return;
        if (!s.offered) return; // the abandoned peer's, still in flight
        const c = { candidate: p.candidate, sdpMid: p.sdpMid ?? null, sdpMLineIndex: p.sdpMLineIndex ?? null };
        if (typeof p.usernameFragment === 'string') c.usernameFragment = p.usernameFragment;
        // Our offer has one media section: a candidate that names none belongs to it.
        if (c.sdpMid == null && c.sdpMLineIndex == null) c.sdpMLineIndex = 0;
        if (s.awaitingAnswer || !s.pc.remoteDescription) s.pendingCandidates.push(c);
        else await this._addCandidate(s, c);
        break;
      }
      case 'mode':
        this._onMode(s, p);
        break;
      case 'bye':
        // Meant for the device's side of a peer-to-peer attempt the relay took over; if it
        // reaches us, the `mode` message that moves us follows (or came first).
        if (p.reason === 'moved_to_sfu') {
          if (s.peerMode !== 'sfu' && s.offered) this._moveToSfu(s, 'moved_to_sfu', typeof p.message === 'string' ? p.message : null);
          break;
        }
        this._end(typeof p.reason === 'string' ? p.reason : 'bye', typeof p.message === 'string' ? p.message : null);
        break;
      default:
        break; // a subtype this console does not use (e.g. the device's own `state`)
    }
  }

  /** The relay says which mode the session is in and why. */
  _onMode(s, p) {
    if (p.mode !== 'p2p' && p.mode !== 'sfu') return;
    const reason = typeof p.reason === 'string' ? p.reason : null;
    const message = typeof p.message === 'string' ? p.message : null;
    const changed = s.mode !== p.mode || s.modeReason !== reason;
    s.mode = p.mode;
    s.auto = typeof p.auto === 'boolean' ? p.auto : null;
    s.modeReason = reason;
    s.modeMessage = message;
    if (changed) {
      const why = describeModeReason(reason, message);
      this._log('system', `video: ${MODE_NAMES[p.mode]}${why ? ` — ${why}` : ''}${message ? ` (relay: ${message})` : ''}`);
    }
    if (p.mode === 'p2p') {
      if (s.peerMode == null) s.peerMode = 'p2p';
      // The relay's deadline for a direct path, counted from now (the offer was just accepted).
      const secs = secondsIn(message);
      if (secs != null) s.p2pTimeoutMs = secs * 1000;
      if (reason === 'auto_p2p_first' && !s.genConnected) s.decideBy = performance.now() + s.p2pTimeoutMs + DECISION_MARGIN_MS;
      this._emit('change');
      return;
    }
    // `sfu`. The current peer talks to the device (the relay said p2p for it, or it is moved
    // away from a direct attempt): the relay carries the video now, so offer to it afresh.
    const moved = s.peerMode === 'p2p' || (s.peerMode == null && (reason === 'p2p_timeout' || reason === 'p2p_failed'));
    if (moved && s.offered) {
      this._moveToSfu(s, reason, message);
      return;
    }
    // The SFU answers this peer's offer itself (`requested`, `default`, `viewers`).
    s.peerMode = 'sfu';
    this._emit('change');
  }

  /**
   * The relay moved session `s` to its SFU: a new peer on the same sessionID, and a fresh offer
   * (`"mode":"sfu"`) that the relay answers. Nothing for the pilot to do.
   */
  _moveToSfu(s, reason, message) {
    if (s.relayLost || !this.wanted) return;
    const why = describeModeReason(reason, message) || 'moved by the relay';
    this._log('warn', `video: the relay carries the video now (${why}): new offer on session ${s.id}`);
    const was = this.state;
    this._closePeer(s);
    s.peerMode = 'sfu';
    if (s.mode !== 'sfu') s.mode = 'sfu';
    s.decideBy = null;
    s.restartDelay = RESTART_BASE_MS;
    if (!this._newPeer(s)) return;
    this._set(was === 'live' || was === 'recovering' ? 'recovering' : 'starting', `${why}; switching to the relay (SFU)`);
    this._firstOffer(s);
  }

  async _addCandidate(s, c) {
    try {
      await s.pc.addIceCandidate(c);
    } catch (e) {
      // A candidate of a previous ICE generation, or an end marker this browser rejects:
      // harmless, connectivity does not depend on it.
      console.debug('ICE candidate not added:', e && e.message, c);
    }
  }

  _onIceState(s) {
    const ice = s.pc.iceConnectionState;
    const conn = s.pc.connectionState;
    clearTimeout(s.timers.disconnected);
    if (conn === 'connected' || ice === 'connected' || ice === 'completed') {
      clearTimeout(s.timers.restart);
      s.restartDelay = RESTART_BASE_MS;
      s.genConnected = true;
      s.failedAt = null;
      s.held = false;
      if (s.t.connected == null) s.t.connected = performance.now();
      if (this.state !== 'live') {
        if (this.state === 'recovering') this._log('system', 'video connection recovered');
        this._set('live', '');
        this._sample(s);
      } else this._emit('change');
      return;
    }
    if (s.relayLost || this.state === 'ended' || this.state === 'off') {
      this._emit('change');
      return;
    }
    if (ice === 'failed' || conn === 'failed') {
      if (s.failedAt == null) s.failedAt = performance.now();
      this._restart(s, 'the connection failed');
    } else if (ice === 'disconnected' || conn === 'disconnected') {
      this._set('recovering', 'connection interrupted, waiting for it to come back');
      s.timers.disconnected = setTimeout(() => {
        if (this.s === s && s.pc.iceConnectionState === 'disconnected') this._restart(s, `no media for ${DISCONNECTED_GRACE_MS / 1000} s`);
      }, DISCONNECTED_GRACE_MS);
    } else {
      this._emit('change');
    }
  }

  /** If the session is not connected CONNECT_TIMEOUT_MS after its (re)negotiation: restart. */
  _armConnectTimeout(s) {
    clearTimeout(s.timers.restart);
    if (s.genConnected && this.state === 'live') return;
    s.timers.restart = setTimeout(() => {
      if (this.s === s && this.state !== 'live') this._restart(s, 'not connected in time');
    }, s.restarts ? s.restartDelay : CONNECT_TIMEOUT_MS);
  }

  /** ICE restart on the same session: a new offer with new credentials. */
  async _restart(s, why) {
    if (this.s !== s || s.relayLost || !this.wanted) return;
    if (!this._relayUp()) {
      this.relayDown();
      return;
    }
    // An `auto` session still peer to peer: the relay's move to its SFU comes first.
    const hold = this._holdFor(s);
    if (hold > 0) {
      const gen = s.gen;
      if (!s.held) {
        s.held = true;
        this._log('system', `video: ${why}; no ICE restart for ${(hold / 1000).toFixed(1)} s: the relay may carry the video instead (auto)`);
      }
      this._set(this.state === 'live' || this.state === 'recovering' ? 'recovering' : this.state, `${why}; waiting for the relay to take over`);
      clearTimeout(s.timers.restart);
      s.timers.restart = setTimeout(() => {
        if (this.s === s && s.gen === gen && this.state !== 'live') this._restart(s, why);
      }, hold);
      return;
    }
    s.held = false;
    s.restarts++;
    const gen = s.gen;
    this._log('warn', `video: ${why}; ICE restart #${s.restarts}`);
    this._set('recovering', `${why}; restarting ICE (attempt ${s.restarts})`);
    try {
      await this._offer(s, true);
    } catch (e) {
      if (this.s === s && s.gen === gen) this._fail(s, `ICE restart failed: ${e.message}`);
      return;
    }
    if (this.s !== s || s.gen !== gen) return;
    s.restartDelay = Math.min(RESTART_MAX_MS, s.restartDelay * 2);
    // If this restart does not connect either, the next one follows (answered or not).
    clearTimeout(s.timers.restart);
    s.timers.restart = setTimeout(() => {
      if (this.s === s && this.state !== 'live') this._restart(s, 'still not connected');
    }, s.restartDelay);
  }

  /** A local failure: tell the device, end the session. */
  _fail(s, message) {
    if (!s.relayLost) this._send({ type: 'webrtc', clientID: this.deviceID, payload: { subtype: 'bye', sessionID: s.id, reason: 'negotiation_failed', message } });
    this._end('peer_error', message);
  }

  /** The session is over (bye, refusal, failure): show why and offer Start again. */
  _end(reason, message) {
    const resume = this.wanted && RESUMABLE.has(reason);
    this.wanted = false;
    this.resumeWhenOnline = resume;
    this.endReason = reason;
    this.endMessage = message;
    const why = describeEnd(reason, message) + (resume ? '; it starts again when the device is back' : '');
    this._log(reason === 'device_offline' ? 'warn' : 'error', `video ended: ${why}`);
    this._close();
    this._set('ended', why);
  }

  /** Closes the session's current peer (the session itself goes on). */
  _closePeer(s) {
    for (const t of [s.timers.disconnected, s.timers.restart, s.timers.answer]) clearTimeout(t);
    const pc = s.pc;
    if (pc) {
      pc.ontrack = pc.onicecandidate = pc.oniceconnectionstatechange = pc.onconnectionstatechange = null;
      try {
        pc.close();
      } catch {
        // Already closed.
      }
    }
    s.stream = null;
    s.stats = null;
    s.prev = null;
    s.lastFrames = 0;
    s.lastFrameAt = null;
    this._emit('stream', { stream: null });
  }

  _close() {
    const s = this.s;
    if (!s) return;
    this.s = null;
    clearInterval(s.timers.stats);
    this._closePeer(s);
  }

  // ---- statistics -------------------------------------------------------------------------

  async _sample(s) {
    const gen = s.gen;
    let report;
    try {
      report = await s.pc.getStats();
    } catch {
      return;
    }
    if (this.s !== s || s.gen !== gen) return;
    let inbound = null;
    let transport = null;
    const pairs = [];
    report.forEach((r) => {
      if (r.type === 'inbound-rtp' && (r.kind === 'video' || r.mediaType === 'video')) inbound = r;
      else if (r.type === 'transport') transport = r;
      else if (r.type === 'candidate-pair') pairs.push(r);
    });
    const pair =
      (transport && transport.selectedCandidatePairId && report.get(transport.selectedCandidatePairId)) ||
      pairs.find((p) => p.nominated && p.state === 'succeeded') ||
      null;
    const local = pair ? report.get(pair.localCandidateId) : null;
    const remote = pair ? report.get(pair.remoteCandidateId) : null;
    const codec = inbound && inbound.codecId ? report.get(inbound.codecId) : null;

    const out = {
      bitrateBps: null,
      fps: null,
      rttMs: pair && num(pair.currentRoundTripTime) != null ? pair.currentRoundTripTime * 1000 : null,
      lossPct: null,
      packetsLost: inbound ? num(inbound.packetsLost) : null,
      packetsReceived: inbound ? num(inbound.packetsReceived) : null,
      framesDecoded: inbound ? num(inbound.framesDecoded) ?? 0 : 0,
      frameWidth: inbound ? num(inbound.frameWidth) : null,
      frameHeight: inbound ? num(inbound.frameHeight) : null,
      codec: codec ? describeCodec(codec) : null,
      // p2p: media straight between browser and device (a TURN relay, when configured, still
      // counts as p2p at this level: the route says which); sfu: through the relay's SFU.
      mode: this._modeOf(s),
      route: local && remote ? `${local.candidateType}/${local.protocol || '?'} ↔ ${remote.candidateType}` : null,
      relayed: !!(local && local.candidateType === 'relay') || !!(remote && remote.candidateType === 'relay'),
    };
    // A picture that stopped moving while ICE still says connected is worth saying.
    const now = performance.now();
    if (s.lastFrameAt == null || out.framesDecoded > s.lastFrames) {
      s.lastFrames = out.framesDecoded;
      s.lastFrameAt = now;
    }
    out.stalledMs = out.framesDecoded > 0 ? now - s.lastFrameAt : null;
    const prev = s.prev;
    if (inbound && prev && inbound.timestamp > prev.timestamp) {
      const dt = (inbound.timestamp - prev.timestamp) / 1000;
      out.bitrateBps = ((num(inbound.bytesReceived) ?? 0) - (num(prev.bytesReceived) ?? 0)) * 8 / dt;
      out.fps = num(inbound.framesPerSecond) ?? ((num(inbound.framesDecoded) ?? 0) - (num(prev.framesDecoded) ?? 0)) / dt;
      const lost = (num(inbound.packetsLost) ?? 0) - (num(prev.packetsLost) ?? 0);
      const got = (num(inbound.packetsReceived) ?? 0) - (num(prev.packetsReceived) ?? 0);
      out.lossPct = lost + got > 0 ? (Math.max(0, lost) / (Math.max(0, lost) + got)) * 100 : 0;
    }
    if (inbound) s.prev = inbound;
    s.stats = out;
    this._emit('stats', out);
  }
}

// ---- the panel ------------------------------------------------------------------------------

const STATE_TEXT = {
  off: 'off',
  starting: 'starting…',
  connecting: 'connecting…',
  live: 'live',
  recovering: 'recovering…',
  waiting: 'waiting for the relay…',
  ended: 'ended',
};

function setText(el, text) {
  const t = String(text);
  if (el.textContent !== t) el.textContent = t;
}

/** Where the chosen mode is remembered (localStorage; it can throw, then nothing is kept). */
const MODE_STORAGE = 'tether.videoMode';
const modeStorage = {
  get() {
    try {
      const m = localStorage.getItem(MODE_STORAGE);
      return VIDEO_MODES.includes(m) ? m : null;
    } catch {
      return null;
    }
  },
  set(m) {
    try {
      localStorage.setItem(MODE_STORAGE, m);
    } catch {
      // Not remembered: the choice holds for this page only.
    }
  },
};

/** The mode line under the panel's head: "Peer to peer — trying direct first". */
function modeLine(snap) {
  if (!snap.mode) return '';
  const why = describeModeReason(snap.modeReason, snap.modeMessage, snap.mode === 'p2p' && snap.peerConnected);
  return why ? `${MODE_NAMES[snap.mode]} — ${why}` : MODE_NAMES[snap.mode];
}

export class VideoPanel {
  /**
   * @param {VideoLink} link
   * @param {object} fmt  formatters: {formatBitrate, formatMs, formatRate, formatPercent}
   */
  constructor(link, fmt, { staleMs = 2000, onStale = () => {} } = {}) {
    this.link = link;
    this.fmt = fmt;
    // Frozen-video detection (the STALE banner): the time of the last new frame on screen.
    this.staleMs = staleMs;
    this.onStale = onStale;
    this.stale = false;
    this._lastFrameAt = null; // performance.now() of the newest frame since video was wanted
    this._seenFrames = -1; // getVideoPlaybackQuality().totalVideoFrames at the last check
    const $ = (id) => document.getElementById(id);
    this.el = {
      panel: $('video-panel'),
      toggle: $('video-toggle'),
      modeSelect: $('video-mode-select'),
      modeLabel: $('video-mode-label'),
      fullscreen: $('video-fullscreen'),
      status: $('video-status'),
      detail: $('video-detail'),
      reason: $('video-reason'),
      video: $('video-player'),
      placeholder: $('video-placeholder'),
      conn: $('vs-conn'),
      mode: $('vs-mode'),
      bitrate: $('vs-bitrate'),
      fps: $('vs-fps'),
      rtt: $('vs-rtt'),
      loss: $('vs-loss'),
      frames: $('vs-frames'),
      res: $('vs-res'),
      codec: $('vs-codec'),
      first: $('vs-first'),
      age: $('vs-age'),
      staleBox: $('video-stale'),
      staleText: $('video-stale-text'),
    };
    this.el.toggle.addEventListener('click', () => (this.link.wanted || this.link.s ? this.link.stop('stopped') : this.link.start()));
    // The chosen mode survives reloads; changing it while video is on starts it again in it.
    link.setMode(modeStorage.get() ?? link.mode);
    this.el.modeSelect.value = link.mode;
    this.el.modeSelect.addEventListener('change', () => {
      const m = this.el.modeSelect.value;
      if (!VIDEO_MODES.includes(m)) return;
      modeStorage.set(m);
      this.link.setMode(m);
    });
    this.el.fullscreen.addEventListener('click', () => {
      const v = this.el.video;
      if (v.requestFullscreen) v.requestFullscreen().catch(() => {});
    });
    link.addEventListener('change', () => this.render());
    link.addEventListener('stats', () => this.renderStats());
    link.addEventListener('stream', (e) => this._play(e.detail.stream));
    this.el.video.addEventListener('resize', () => this.renderStats());
    this._watchFrames();
    this.render();
    this.renderStats();
  }

  /** The STALE threshold in ms (the relay's default, or the pilot's choice). */
  setStaleMs(ms) {
    if (Number.isFinite(ms) && ms >= 100) this.staleMs = ms;
    this._checkStale();
  }

  /**
   * Notes every new frame: requestVideoFrameCallback where the browser has it, and the decoded
   * frame counter checked five times a second as well (it also works while rVFC is throttled).
   */
  _watchFrames() {
    const v = this.el.video;
    this.el.panel.dataset.stale = 'false';
    const onFrame = () => {
      this._lastFrameAt = performance.now();
      v.requestVideoFrameCallback(onFrame);
    };
    if (typeof v.requestVideoFrameCallback === 'function') v.requestVideoFrameCallback(onFrame);
    setInterval(() => {
      const q = typeof v.getVideoPlaybackQuality === 'function' ? v.getVideoPlaybackQuality() : null;
      const n = q ? q.totalVideoFrames : -1;
      if (n > 0 && n !== this._seenFrames) {
        if (this._seenFrames !== -1 || this._lastFrameAt === null) this._lastFrameAt = performance.now();
        this._seenFrames = n;
      }
      this._checkStale();
    }, 200);
  }

  /**
   * Stale: video is wanted, a frame was shown since, and none newer for staleMs. Video that is
   * off is not stale (there is no picture to trust); before its first frame it is "starting".
   */
  _checkStale(now = performance.now()) {
    const wanted = this.link.wanted || !!this.link.s || this.link.resumeWhenOnline;
    if (!wanted) {
      this._lastFrameAt = null;
      this._seenFrames = -1;
    }
    const age = this._lastFrameAt === null ? null : now - this._lastFrameAt;
    const stale = wanted && age !== null && age > this.staleMs;
    const e = this.el;
    setText(e.age, age === null ? '—' : this.fmt.formatMs(age));
    e.age.dataset.level = age === null ? '' : stale ? 'bad' : age > this.staleMs / 2 ? 'warn' : 'ok';
    e.panel.dataset.frameAgeMs = age === null ? '' : String(Math.round(age));
    if (stale) setText(e.staleText, `no new frame for ${(age / 1000).toFixed(1)} s — the picture is frozen; teleop is disabled`);
    if (stale !== this.stale) {
      this.stale = stale;
      e.panel.dataset.stale = String(stale);
      e.staleBox.hidden = !stale;
      this.onStale(stale, age);
    }
  }

  _play(stream) {
    const v = this.el.video;
    if (v.srcObject !== stream) v.srcObject = stream;
    if (!stream) {
      this.renderStats();
      return;
    }
    const session = this.link.s;
    const onFrame = (now) => {
      if (this.link.s === session) this.link.firstFrame(now);
    };
    // The first presented frame, as precisely as the browser can say.
    if (typeof v.requestVideoFrameCallback === 'function') v.requestVideoFrameCallback(onFrame);
    else v.addEventListener('loadeddata', () => onFrame(performance.now()), { once: true });
    // Muted autoplay is allowed everywhere; play() only makes it explicit.
    v.play().catch(() => {});
  }

  render() {
    const snap = this.link.snapshot();
    const e = this.el;
    const active = snap.wanted || snap.sessionID !== null;
    e.panel.dataset.state = snap.state;
    e.panel.dataset.sessionId = snap.sessionID ?? '';
    e.panel.dataset.iceRestarts = String(snap.iceRestarts);
    e.panel.dataset.endReason = snap.endReason ?? '';
    e.panel.dataset.firstFrameMs = snap.timings.firstFrameMs == null ? '' : String(Math.round(snap.timings.firstFrameMs));
    e.panel.dataset.answerMs = snap.timings.answerMs == null ? '' : String(Math.round(snap.timings.answerMs));
    e.panel.dataset.connectedMs = snap.timings.connectedMs == null ? '' : String(Math.round(snap.timings.connectedMs));
    e.panel.dataset.sessions = String(snap.sessions);
    // The mode in use (p2p | sfu, empty until known) and the relay's reason; what was asked.
    e.panel.dataset.mode = snap.mode ?? '';
    e.panel.dataset.modeReason = snap.modeReason ?? '';
    e.panel.dataset.modeRequested = snap.requestedMode ?? '';
    e.panel.dataset.peerGeneration = String(snap.generation);

    if (e.modeSelect.value !== snap.chosenMode) e.modeSelect.value = snap.chosenMode;
    e.modeSelect.disabled = !snap.deviceID;
    const line = modeLine(snap);
    setText(e.modeLabel, line);
    e.modeLabel.hidden = !line;
    e.modeLabel.dataset.mode = snap.mode ?? '';
    e.modeLabel.title = snap.modeMessage ? `Relay: ${snap.modeMessage}` : '';

    setText(e.toggle, active ? 'Stop video' : snap.state === 'ended' ? 'Start again' : 'Start video');
    e.toggle.setAttribute('aria-pressed', String(active));
    e.toggle.classList.toggle('btn-primary', !active);
    e.toggle.disabled = !snap.deviceID;
    e.fullscreen.hidden = snap.state !== 'live';

    setText(e.status, STATE_TEXT[snap.state] ?? snap.state);
    e.status.dataset.state = snap.state;
    setText(e.detail, snap.state === 'ended' ? '' : snap.detail);
    e.reason.hidden = snap.state !== 'ended';
    setText(e.reason, snap.state === 'ended' ? `Video ended: ${snap.detail}.` : '');

    const conn = snap.connectionState;
    setText(e.conn, conn ? (snap.iceState && snap.iceState !== conn ? `${conn} (ICE ${snap.iceState})` : conn) : '—');
    e.conn.dataset.level = conn === 'connected' ? 'ok' : conn === 'failed' || conn === 'disconnected' ? 'bad' : '';
    setText(e.first, snap.timings.firstFrameMs == null ? '—' : this.fmt.formatMs(snap.timings.firstFrameMs));
    e.first.title =
      snap.timings.answerMs == null
        ? 'Time from pressing Start to the first frame on screen'
        : `From pressing Start: answer ${Math.round(snap.timings.answerMs)} ms` +
          (snap.timings.connectedMs == null ? '' : `, connected ${Math.round(snap.timings.connectedMs)} ms`) +
          (snap.timings.firstFrameMs == null ? '' : `, first frame ${Math.round(snap.timings.firstFrameMs)} ms`);
    this._placeholder(snap);
    this.renderStats();
  }

  _placeholder(snap) {
    const viaRelay = snap.mode === 'sfu';
    const text = {
      off: 'Video is off. Press "Start video" to watch the device.',
      starting: viaRelay ? 'Asking the relay for the video…' : 'Asking the device for video…',
      connecting: viaRelay ? 'Connecting to the relay…' : 'Connecting to the device…',
      waiting: 'Waiting for the relay connection…',
      ended: 'Video ended. Press "Start again" to retry.',
    }[snap.state];
    const playing = snap.state === 'live' || snap.state === 'recovering';
    const hasFrame = this.el.video.videoWidth > 0;
    this.el.placeholder.hidden = playing && hasFrame;
    setText(this.el.placeholder, text ?? (hasFrame ? '' : 'Waiting for the first frame…'));
  }

  renderStats() {
    const st = this.link.s ? this.link.s.stats : null;
    const e = this.el;
    const f = this.fmt;
    const v = e.video;
    const w = v.videoWidth || (st && st.frameWidth) || 0;
    const hgt = v.videoHeight || (st && st.frameHeight) || 0;
    e.panel.dataset.framesDecoded = String(st ? st.framesDecoded : 0);
    e.panel.dataset.videoWidth = String(v.videoWidth || 0);
    e.panel.dataset.videoHeight = String(v.videoHeight || 0);
    const mode = this.link.currentMode();
    setText(e.mode, mode ? (st && st.route ? `${mode} · ${st.route}` : mode) : '—');
    e.mode.dataset.mode = mode ?? '';
    e.mode.title =
      mode === 'sfu'
        ? "Media comes through the relay's SFU (the route is this browser's path to the relay)"
        : st && st.relayed
          ? 'Media goes through a TURN server'
          : 'Media goes straight between this browser and the device';
    setText(e.bitrate, st && st.bitrateBps != null ? f.formatBitrate(st.bitrateBps) : '—');
    setText(e.fps, st && st.fps != null ? f.formatRate(st.fps) : '—');
    setText(e.rtt, st && st.rttMs != null ? f.formatMs(st.rttMs) : '—');
    setText(e.loss, st && st.lossPct != null ? `${f.formatPercent(st.lossPct)}${st.packetsLost ? ` · ${st.packetsLost} total` : ''}` : '—');
    e.loss.dataset.level = st && st.lossPct != null ? (st.lossPct > 5 ? 'bad' : st.lossPct > 1 ? 'warn' : 'ok') : '';
    setText(e.frames, st ? st.framesDecoded : '—');
    setText(e.res, w && hgt ? `${w}×${hgt}` : '—');
    setText(e.codec, st && st.codec ? st.codec : '—');
    const stalled = this.link.state === 'live' && st && st.stalledMs > STALL_MS;
    e.panel.dataset.stalled = String(!!stalled);
    if (this.link.state === 'live') setText(e.detail, stalled ? `no new frames for ${Math.round(st.stalledMs / 1000)} s` : '');
    this._placeholder(this.link.snapshot());
  }
}
