// A stand-in for the device agent's video, for checking the console without GStreamer or the
// agent: a Chromium page that logs in as the device (first-message `auth`, protocol 3.1),
// answers the console's `webrtc` offers with a canvas animation of the requested size, trickles
// its candidates, reports its peer's connection state (`state`) and ends sessions on `bye`
// (`moved_to_sfu` too), like device/src/video.rs does. The relay's SFU is a pilot like any
// other to it (`from` `relay`, a sessionID starting with `sfu-`).
//
//   import { startFakeDevice } from './fake-device.mjs';
//   const device = await startFakeDevice(browser, { base, deviceId, secret, width, height, fps });
//   ...
//   await device.close();
//
// video.mjs uses it with `--fake-device <secret>`. It is a check of the console, not of the agent.

export async function startFakeDevice(browser, { base, deviceId, secret, width = 640, height = 480, fps = 15 }) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto('about:blank');
  const wsUrl = `${base.replace(/^http/, 'ws').replace(/\/$/, '')}/ws?clientID=${encodeURIComponent(deviceId)}`;
  await page.evaluate(async ({ wsUrl, secret, width, height, fps }) => {
    // The picture: a moving bar and a frame counter, so every frame differs.
    const canvas = document.createElement('canvas');
    canvas.width = width;
    canvas.height = height;
    document.body.append(canvas);
    const g = canvas.getContext('2d');
    let n = 0;
    setInterval(() => {
      n++;
      g.fillStyle = '#123';
      g.fillRect(0, 0, width, height);
      g.fillStyle = '#fc0';
      g.fillRect((n * 8) % width, 0, 40, height);
      g.fillStyle = '#fff';
      g.font = '48px sans-serif';
      g.fillText(`fake device ${n}`, 20, 60);
    }, 1000 / fps);
    const track = canvas.captureStream(fps).getVideoTracks()[0];

    const sessions = new Map(); // sessionID -> {pc, pilot, chain}
    window.fakeDevice = { sessions, offers: 0 };
    const ws = new WebSocket(wsUrl);
    const send = (m) => ws.readyState === WebSocket.OPEN && ws.send(JSON.stringify(m));
    const signal = (pilot, payload) => send({ type: 'webrtc', clientID: pilot, payload });

    function end(id) {
      const s = sessions.get(id);
      if (!s) return;
      sessions.delete(id);
      s.pc.close();
    }

    /** The session `id`, created (with its peer) on its first offer. */
    function session(id, pilot) {
      let s = sessions.get(id);
      if (s) return s;
      const pc = new RTCPeerConnection();
      s = { pc, pilot, chain: Promise.resolve() };
      sessions.set(id, s);
      pc.onicecandidate = (ev) => {
        if (ev.candidate && !ev.candidate.candidate) return;
        const c = ev.candidate ? ev.candidate.toJSON() : { candidate: '' };
        signal(pilot, { subtype: 'ice_candidate', sessionID: id, candidate: c.candidate, sdpMid: c.sdpMid, sdpMLineIndex: c.sdpMLineIndex });
      };
      pc.onconnectionstatechange = () => {
        // Reported like the agent does: the relay decides `auto` sessions on these.
        signal(pilot, { subtype: 'state', sessionID: id, state: pc.connectionState });
        if (pc.connectionState === 'closed' || pc.connectionState === 'failed') end(id);
      };
      return s;
    }

    async function answer(s, id, p) {
      window.fakeDevice.offers++;
      await s.pc.setRemoteDescription({ type: 'offer', sdp: p.sdp });
      const tr = s.pc.getTransceivers()[0];
      if (tr && !tr.sender.track) {
        tr.direction = 'sendonly';
        await tr.sender.replaceTrack(track);
      }
      await s.pc.setLocalDescription(await s.pc.createAnswer());
      signal(s.pilot, { subtype: 'answer', sessionID: id, sdp: s.pc.localDescription.sdp });
    }

    ws.onmessage = (ev) => {
      const m = JSON.parse(ev.data);
      const p = m.payload || {};
      if (m.type === 'ping') send({ type: 'pong', correlationID: m.correlationID, payload: { t: p.t, relayTime: Date.now() } });
      else if (m.type === 'time_sync') send({ type: 'time_sync_response', payload: { t1: p.t1, t2: Date.now(), t3: Date.now() } });
      else if (m.type === 'webrtc') {
        const id = p.sessionID;
        if (p.subtype === 'offer') {
          // Offers and the candidates that follow them are applied in order, per session.
          const s = session(id, m.from);
          s.chain = s.chain.then(() => answer(s, id, p)).catch((e) => {
            signal(m.from, { subtype: 'bye', sessionID: id, reason: 'negotiation_failed', message: String(e) });
            end(id);
          });
        } else if (p.subtype === 'ice_candidate') {
          const s = sessions.get(id);
          if (s && p.candidate) s.chain = s.chain.then(() => s.pc.addIceCandidate(p).catch(() => {}));
        } else if (p.subtype === 'bye') end(id);
      }
    };
    await new Promise((resolve, reject) => {
      ws.onopen = () => ws.send(JSON.stringify({ type: 'auth', payload: { clientSecret: secret } }));
      ws.onerror = () => reject(new Error('fake device: WebSocket failed'));
      const first = ws.onmessage;
      ws.onmessage = (ev) => {
        const m = JSON.parse(ev.data);
        if (m.type === 'auth_ok') {
          ws.onmessage = first;
          resolve();
        } else reject(new Error(`fake device: ${ev.data}`));
      };
    });
  }, { wsUrl, secret, width, height, fps });
  return {
    page,
    errors,
    /** Offers answered so far (first ones and renegotiations). */
    offers: () => page.evaluate(() => window.fakeDevice.offers),
    close: () => context.close(),
  };
}
