// Drives the console's video panel in Debian's chromium against a running relay and a real
// device agent streaming its test pattern:
//   node video.mjs <base-url> <api-key> <device-id> <screenshot-dir> [options]
// Options:
//   --no-mdns        run Chromium with --disable-features=WebRtcHideLocalIpsWithMdns (host
//                    candidates carry plain addresses); by default Chromium hides them behind
//                    <uuid>.local names, as every pilot's browser does, and the agent must resolve them
//   --width N --height N   the resolution the agent is configured for (default 640x480)
//   --runs N         how many Start -> first frame timings to take (default 5; 0 skips)
//   --no-recovery    skip the relay-reconnect and bye steps
//   --fake-device S  play the device too: a Chromium page logs in as <device-id> with secret S
//                    and answers with a canvas (fake-device.mjs); checks the console alone
//   --mode M         choose video mode M (auto | p2p | sfu) in the panel's selector before the
//                    first Start (default: leave the selector at its default, auto); every offer
//                    must ask for it (`sfu` after the relay moved an `auto` session to its SFU)
//   --expect-mode M  after the first frame the panel's data-mode must be M (p2p | sfu); so must
//                    every later fresh session's, and the one after the ICE restart when --mode
//                    is p2p or sfu (an `auto` session may move to the SFU during the blip)
// Steps: log in, open the device, Start video, frames decoded at the configured size; Stop
// says bye; N timed starts (click to the first presented frame, measured in the page with
// requestVideoFrameCallback); the media path drops every packet (Chromium's WebRTC network
// emulation) until the console restarts ICE on the same session; the relay WebSocket is cut
// (routed through Playwright) and the console starts a new session by itself; a `bye` is
// shown with its reason and Start works again.
// Prints `video e2e timing: {json}` (with `mode`: the panel's data-mode after the first frame;
// `firstSession`: the first session's click -> first frame, answer and connected times, the only
// cold start through the SFU, whose upstream stays open between the quick timed runs) and, on
// success, `video e2e: all steps passed`; exits 1 with what failed otherwise.
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import { startFakeDevice } from './fake-device.mjs';

const args = process.argv.slice(2);
const positional = [];
const opts = { mdns: true, width: 640, height: 480, runs: 5, recovery: true };
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (a === '--no-mdns') opts.mdns = false;
  else if (a === '--no-recovery') opts.recovery = false;
  else if (a === '--width') opts.width = Number(args[++i]);
  else if (a === '--height') opts.height = Number(args[++i]);
  else if (a === '--runs') opts.runs = Number(args[++i]);
  else if (a === '--fake-device') opts.fakeSecret = args[++i];
  else if (a === '--mode') opts.mode = args[++i];
  else if (a === '--expect-mode') opts.expectMode = args[++i];
  else positional.push(a);
}
const [base, key, deviceId, shots] = positional;
const badMode = (opts.mode !== undefined && !['auto', 'p2p', 'sfu'].includes(opts.mode)) ||
  (opts.expectMode !== undefined && !['p2p', 'sfu'].includes(opts.expectMode));
if (!base || !key || !deviceId || !shots || badMode) {
  console.error('usage: node video.mjs <base-url> <api-key> <device-id> <screenshot-dir> [--no-mdns] [--width N --height N] [--runs N] [--no-recovery] [--fake-device SECRET] [--mode auto|p2p|sfu] [--expect-mode p2p|sfu]');
  process.exit(2);
}
const variant = `${opts.fakeSecret ? 'fake-' : ''}${opts.mdns ? 'mdns' : 'plain'}${opts.mode ? `-${opts.mode}` : ''}`;
/** The mode every offer asks for first: the selector's choice, `auto` by default. */
const asked = opts.mode ?? 'auto';
/** The mode a playing session must be in: given, or implied by a fixed choice; null: p2p or sfu. */
const fixedMode = opts.expectMode ?? (opts.mode === 'p2p' || opts.mode === 'sfu' ? opts.mode : null);
mkdirSync(shots, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ...(opts.mdns ? [] : ['--disable-features=WebRtcHideLocalIpsWithMdns'])],
});
const problems = [];
let page;
const fake = opts.fakeSecret
  ? await startFakeDevice(browser, { base, deviceId, secret: opts.fakeSecret, width: opts.width, height: opts.height })
  : null;

function watch(p) {
  p.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  p.on('console', (m) => { if (m.type() === 'error') problems.push(`console error: ${m.text()}`); });
}

async function step(name, fn) {
  const shot = `${shots}/${variant}-${name}`;
  try {
    await fn();
    await page.screenshot({ path: `${shot}.png` });
    console.log(`ok: ${variant} ${name}`);
  } catch (e) {
    await page.screenshot({ path: `${shot}-FAILED.png` }).catch(() => {});
    const panel = await page.evaluate(() => JSON.stringify(document.getElementById('video-panel')?.dataset ?? {})).catch(() => '?');
    const log = await page.evaluate(() => document.getElementById('frame-log')?.innerText ?? '').catch(() => '');
    console.error(`FAILED: ${variant} ${name}: ${e.message}\n  panel: ${panel}\n  console log:\n${log}`);
    await browser.close();
    process.exit(1);
  }
}

const t = { timeout: 20000 };
const panel = () => page.getByTestId('video-panel');
const toggle = () => page.getByTestId('video-toggle');
const data = (name) => page.evaluate((n) => document.getElementById('video-panel').dataset[n], name);
/**
 * Waits until the panel's data-<name> satisfies `op` against `arg`: 'is' (equal), 'set'
 * (non-empty), 'changed' (non-empty and not arg), 'above' (a number greater than arg).
 * (Fixed operators: the console's CSP forbids evaluating code built from strings.)
 */
const waitData = (name, op, arg = null, timeout = t.timeout) => page.waitForFunction(
  ([n, o, a]) => {
    const v = document.getElementById('video-panel').dataset[n] ?? '';
    if (o === 'is') return v === a;
    if (o === 'set') return v !== '';
    if (o === 'changed') return v !== '' && v !== a;
    if (o === 'above') return v !== '' && Number(v) > a;
    throw new Error(`unknown operator ${o}`);
  },
  [name, op, arg], { timeout });

/** Logs in, opens the device, waits for the relay connection. */
async function openConsole() {
  await page.goto(base);
  await page.getByTestId('login-tab-key').click();
  await page.getByTestId('login-key').fill(key);
  await page.getByTestId('login-button').click();
  const row = page.locator(`[data-testid="device-row"][data-device-id="${deviceId}"]`);
  await row.waitFor(t);
  await page.waitForFunction(
    (id) => /online/i.test(document.querySelector(`[data-device-id="${id}"]`)?.textContent || ''), deviceId, t);
  await row.click();
  await page.waitForFunction(() => /connected/.test(document.querySelector('[data-testid="conn-status"]')?.textContent || ''), null, t);
  await panel().waitFor({ state: 'visible', ...t });
  // A fresh browser context: the selector starts at the default, and remembers a choice.
  const select = page.getByTestId('video-mode-select');
  if ((await select.inputValue()) !== 'auto') throw new Error(`the mode selector starts at ${await select.inputValue()}, not auto`);
  if (opts.mode) {
    await select.selectOption(opts.mode);
    const kept = await page.evaluate(() => localStorage.getItem('tether.videoMode'));
    if (kept !== opts.mode) throw new Error(`the chosen mode was not remembered (localStorage has ${kept})`);
  }
}

/**
 * Waits for the current session to be live with frames decoding at the configured size, in
 * mode `fixedMode` unless `anyMode` (then p2p or sfu).
 */
async function assertPlaying(label, { anyMode = false } = {}) {
  await waitData('state', 'is', 'live');
  await waitData('framesDecoded', 'above', 0);
  const f1 = Number(await data('framesDecoded'));
  // framesDecoded comes from getStats once a second: a few more frames prove it keeps going.
  await waitData('framesDecoded', 'above', f1 + 4);
  const size = await page.evaluate(() => {
    const v = document.getElementById('video-player');
    return { w: v.videoWidth, h: v.videoHeight, playing: !v.paused && v.readyState >= 2 };
  });
  if (size.w !== opts.width || size.h !== opts.height) throw new Error(`${label}: video is ${size.w}x${size.h}, expected ${opts.width}x${opts.height}`);
  if (!size.playing) throw new Error(`${label}: the <video> element is not playing`);
  const shown = await page.getByTestId('video-resolution').textContent();
  if (shown !== `${opts.width}×${opts.height}`) throw new Error(`${label}: the panel shows resolution ${shown}`);
  const mode = await data('mode');
  if (mode !== 'p2p' && mode !== 'sfu') throw new Error(`${label}: mode is "${mode}"`);
  if (fixedMode && !anyMode && mode !== fixedMode) {
    throw new Error(`${label}: mode is ${mode} (reason "${await data('modeReason')}"), expected ${fixedMode}`);
  }
  if ((await page.getByTestId('video-mode-label').textContent()) === '') throw new Error(`${label}: the mode in use is not shown`);
  return Number(await data('framesDecoded'));
}

// ---- the console's own WebSocket traffic, as Chromium sent and received it ---------------------
const sent = [];
const received = [];
function recordSignaling(p) {
  p.on('websocket', (ws) => {
    const keep = (list) => ({ payload }) => {
      try {
        const m = JSON.parse(String(payload));
        if (m.type === 'webrtc') list.push(m);
      } catch { /* not JSON: not ours */ }
    };
    ws.on('framesent', keep(sent));
    ws.on('framereceived', keep(received));
  });
}

page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
watch(page);
recordSignaling(page);

await step('01-open-device', openConsole);

/** The panel's data-mode (and its reason) after the first frame of the first session. */
let firstMode = null;
let firstModeReason = null;
/** The first session's timings (ms after the click). */
let firstSession = null;

await step('02-video-live', async () => {
  if ((await data('state')) !== 'off') throw new Error(`panel starts in state ${await data('state')}`);
  await toggle().click();
  await assertPlaying('first session');
  if ((await toggle().textContent()) !== 'Stop video') throw new Error('the button does not offer Stop');
  if ((await toggle().getAttribute('aria-pressed')) !== 'true') throw new Error('aria-pressed is not true while playing');
  for (const id of ['video-bitrate', 'video-fps', 'video-codec', 'video-connection']) {
    await page.waitForFunction((i) => (document.querySelector(`[data-testid="${i}"]`)?.textContent || '—') !== '—', id, t);
  }
  const codec = await page.getByTestId('video-codec').textContent();
  if (!/^(H264|VP8)/i.test(codec)) throw new Error(`codec shown as ${codec}`);
  firstMode = await data('mode');
  firstModeReason = await data('modeReason');
  const id = await data('sessionId');
  // Signaling as the protocol says: one offer with a correlationID, candidates without; two
  // when the relay moved an `auto` session to its SFU (the second on the same session, asking
  // for `sfu`). Every offer names the mode.
  const offers = sent.filter((m) => m.payload.subtype === 'offer');
  const moved = received.some((m) => m.payload.subtype === 'mode' && m.payload.sessionID === id &&
    m.payload.mode === 'sfu' && ['p2p_timeout', 'p2p_failed'].includes(m.payload.reason));
  if (offers.length !== (moved ? 2 : 1) || offers.some((o) => !o.correlationID || o.clientID !== deviceId || o.payload.sessionID !== id)) {
    throw new Error(`offers sent${moved ? ' (moved to the SFU)' : ''}: ${JSON.stringify(offers).slice(0, 300)}`);
  }
  if (offers[0].payload.mode !== asked) throw new Error(`the offer asked for mode ${offers[0].payload.mode}, expected ${asked}`);
  if (moved && offers[1].payload.mode !== 'sfu') throw new Error(`the offer after the move to the SFU asked for ${offers[1].payload.mode}`);
  // The peer's connection state, reported to the relay as it changes (no correlationID).
  const states = sent.filter((m) => m.payload.subtype === 'state' && m.payload.sessionID === id);
  if (!states.some((m) => m.payload.state === 'connected')) throw new Error(`no state "connected" reported: ${JSON.stringify(states.map((m) => m.payload.state))}`);
  if (states.some((m) => m.correlationID || m.clientID !== deviceId)) throw new Error('a state report carried a correlationID or no clientID');
  const mine = sent.filter((m) => m.payload.subtype === 'ice_candidate');
  if (mine.some((m) => m.correlationID)) throw new Error('a trickled candidate carried a correlationID');
  const host = mine.map((m) => m.payload.candidate).filter((c) => / typ host/.test(c));
  if (!host.length) throw new Error(`the console trickled no host candidate: ${JSON.stringify(mine.map((m) => m.payload))}`);
  const hidden = host.filter((c) => /\.local /.test(c));
  if (opts.mdns && hidden.length !== host.length) throw new Error(`expected only mDNS host candidates, sent: ${host.join(' | ')}`);
  if (!opts.mdns && hidden.length) throw new Error(`expected plain host candidates, sent: ${host.join(' | ')}`);
  if (!mine.some((m) => m.payload.candidate === '')) throw new Error('the console sent no end-of-candidates');
  const theirs = received.filter((m) => m.payload.subtype === 'ice_candidate' && m.payload.candidate);
  const answers = received.filter((m) => m.payload.subtype === 'answer' && m.payload.sessionID === id);
  if (!answers.length) throw new Error('no answer received');
  if (firstMode === 'sfu' && answers[answers.length - 1].payload.mode !== 'sfu') throw new Error('the SFU\'s answer does not say "mode":"sfu"');
  console.log(`  ${variant}: mode ${firstMode}${firstModeReason ? ` (${firstModeReason})` : ''}, asked for ${asked}${moved ? '; moved to the SFU' : ''}`);
  console.log(`  ${variant}: console host candidates ${host.map((c) => c.split(' ')[4]).join(', ')}; device candidates ${theirs.map((m) => m.payload.candidate.split(' ').slice(4, 6).join(':')).join(', ')}`);
  firstSession = {
    firstFrameMs: Number(await data('firstFrameMs')),
    answerMs: Number(await data('answerMs')),
    connectedMs: Number(await data('connectedMs')),
  };
  console.log(`  ${variant}: first frame ${firstSession.firstFrameMs} ms after the click (answer ${firstSession.answerMs} ms, connected ${firstSession.connectedMs} ms)`);
});

await step('03-stop', async () => {
  const id = await data('sessionId');
  await toggle().click();
  await waitData('state', 'is', 'off');
  if ((await data('framesDecoded')) !== '0') throw new Error('stats survive Stop');
  await page.waitForFunction(() => !document.getElementById('video-player').srcObject, null, t);
  await waitUntil(() => sent.some((m) => m.payload.subtype === 'bye' && m.payload.sessionID === id), 'a bye for the stopped session');
  if ((await toggle().textContent()) !== 'Start video') throw new Error('the button does not offer Start after Stop');
});

async function waitUntil(pred, what, timeout = t.timeout) {
  const end = Date.now() + timeout;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// ---- click to first frame, several times --------------------------------------------------------
const timing = { variant, width: opts.width, height: opts.height, mode: firstMode, modeReason: firstModeReason, firstSession, runs: [] };
if (opts.runs > 0) {
  await step('04-timing', async () => {
    for (let i = 0; i < opts.runs; i++) {
      await toggle().click();
      await waitData('firstFrameMs', 'set');
      const mode = await data('mode');
      if (fixedMode && mode !== fixedMode) throw new Error(`run ${i + 1}: mode is ${mode}, expected ${fixedMode}`);
      timing.runs.push({
        firstFrameMs: Number(await data('firstFrameMs')),
        answerMs: Number(await data('answerMs')),
        connectedMs: Number(await data('connectedMs')),
        mode,
      });
      await toggle().click();
      await waitData('state', 'is', 'off');
      // Let the agent stop its pipeline (last viewer gone), so every run starts it afresh (peer
      // to peer; through the SFU the relay keeps the device's upstream open for 10 s: warm runs).
      await page.waitForTimeout(500);
    }
  });
  const first = timing.runs.map((r) => r.firstFrameMs).sort((a, b) => a - b);
  timing.medianFirstFrameMs = first[Math.floor(first.length / 2)];
  timing.minFirstFrameMs = first[0];
  timing.maxFirstFrameMs = first[first.length - 1];

  // Glass to glass: the agent's test pattern carries its capture time as a block code
  // (media::gst::TIME_CODE_BITS: 40 bits of ms since the epoch + an 8-bit checksum, 24 blocks
  // a row, two rows, bottom left). Each presented frame is drawn to a canvas, the code read back
  // and compared with the time the frame is shown. Same host, same clock.
  await step('04b-glass-to-glass', async () => {
    await toggle().click();
    await assertPlaying('glass to glass');
    const g = await page.evaluate(async (n) => {
      const v = document.getElementById('video-player');
      const c = document.createElement('canvas');
      const ctx = c.getContext('2d', { willReadFrequently: true });
      const samples = [];
      let unreadable = 0;
      await new Promise((resolve) => {
        const onFrame = (_now, meta) => {
          const w = meta.width;
          const h = meta.height;
          c.width = w;
          c.height = h;
          ctx.drawImage(v, 0, 0, w, h);
          const side = Math.max(4, Math.floor(w / 48)) & ~1;
          const img = ctx.getImageData(0, h - 2 * side, 24 * side, 2 * side).data;
          const bits = [];
          for (let i = 0; i < 48; i++) {
            const cx = (i % 24) * side + (side >> 1);
            const cy = Math.floor(i / 24) * side + (side >> 1);
            bits.push(img[(cy * 24 * side + cx) * 4] > 128 ? 1 : 0);
          }
          let value = 0;
          for (let i = 0; i < 40; i++) value = value * 2 + bits[i];
          let check = 0;
          for (let i = 40; i < 48; i++) check = check * 2 + bits[i];
          let sum = 0;
          for (let k = 0, t = value; k < 5; k++, t = Math.floor(t / 256)) sum += t % 256;
          if (sum % 256 !== check) {
            unreadable++;
          } else {
            const shown = performance.timeOrigin + meta.expectedDisplayTime;
            const period = 2 ** 40;
            samples.push(shown - (value + Math.floor(shown / period) * period));
          }
          if (samples.length >= n || unreadable > 3 * n) resolve();
          else v.requestVideoFrameCallback(onFrame);
        };
        v.requestVideoFrameCallback(onFrame);
      });
      return { samples, unreadable };
    }, 60);
    if (g.samples.length < 10) throw new Error(`the time code was readable in only ${g.samples.length} frames (${g.unreadable} unreadable)`);
    const s = g.samples.slice().sort((a, b) => a - b);
    timing.glassToGlass = {
      frames: s.length,
      unreadable: g.unreadable,
      medianMs: Math.round(s[Math.floor(s.length / 2)]),
      p90Ms: Math.round(s[Math.floor(s.length * 0.9)]),
      minMs: Math.round(s[0]),
      maxMs: Math.round(s[s.length - 1]),
    };
    await toggle().click();
    await waitData('state', 'is', 'off');
  });
}
console.log(`video e2e timing: ${JSON.stringify(timing)}`);

// ---- a network blip on the media path: ICE restart on the same session ---------------------------
if (opts.recovery) {
  await step('05-ice-restart', async () => {
    // Chromium's network emulation drops this page's WebRTC packets on demand (and only those:
    // the relay WebSocket keeps working, so the restart can be signaled). It must be in place
    // before the peer connection exists, so it is set up (losing nothing) before Start.
    const cdp = await page.context().newCDPSession(page);
    await cdp.send('Network.enable');
    // An empty urlPattern matches everything, peer-to-peer connections included.
    const conditions = (packetLoss) => cdp.send('Network.emulateNetworkConditionsByRule', {
      offline: false,
      matchedNetworkConditions: [{ urlPattern: '', latency: 0, downloadThroughput: -1, uploadThroughput: -1, packetLoss }],
    });
    await conditions(0);
    await toggle().click();
    await assertPlaying('before the blip');
    const id = await data('sessionId');
    await conditions(100);
    await waitData('state', 'is', 'recovering', 30000);
    await waitData('iceRestarts', 'above', 0, 30000);
    await conditions(0);
    // An `auto` session may have been moved to the SFU meanwhile (a side reported `failed`).
    await assertPlaying('after the ICE restart', { anyMode: !(opts.mode === 'p2p' || opts.mode === 'sfu') });
    if ((await data('sessionId')) !== id) throw new Error('the ICE restart started a new session instead');
    const offers = sent.filter((m) => m.payload.subtype === 'offer' && m.payload.sessionID === id);
    if (offers.length < 2) throw new Error(`expected a restart offer on session ${id}, saw ${offers.length} offer(s)`);
    console.log(`  ${variant}: recovered after ${await data('iceRestarts')} ICE restart(s), mode ${await data('mode')}`);
    await cdp.detach();
    await toggle().click();
    await waitData('state', 'is', 'off');
  });
}

// ---- recovery: the relay link drops; a bye is shown ----------------------------------------------
if (opts.recovery) {
  await page.close();
  // The console's WebSocket goes through Playwright, which can cut it like a network blip.
  const context = await browser.newContext({ viewport: { width: 1280, height: 1000 } });
  const routes = [];
  await context.routeWebSocket(/\/ws\/admin/, (ws) => {
    ws.connectToServer();
    routes.push(ws);
  });
  page = await context.newPage();
  watch(page);

  await step('06-relay-reconnect', async () => {
    await openConsole();
    await toggle().click();
    await assertPlaying('before the cut');
    const first = await data('sessionId');
    await routes[routes.length - 1].close({ code: 4000, reason: 'test: network blip' });
    // The console notices, reconnects with backoff, and starts a new session by itself.
    await waitData('sessionId', 'changed', first, 30000);
    await assertPlaying('after the reconnect');
    if (routes.length < 2) throw new Error('the console did not open a new WebSocket');
    if ((await data('sessions')) !== '2') throw new Error(`sessions: ${await data('sessions')}`);
  });

  await step('07-bye-shown', async () => {
    // The agent ends sessions itself only when its pipeline breaks; say so in its name, on the
    // console's own socket (the agent is still streaming: the console must stop showing it).
    const sessionID = await data('sessionId');
    routes[routes.length - 1].send(JSON.stringify({
      type: 'webrtc', from: deviceId,
      payload: { subtype: 'bye', sessionID, reason: 'video_unavailable', message: 'injected by the test' },
    }));
    await waitData('state', 'is', 'ended');
    if ((await data('endReason')) !== 'video_unavailable') throw new Error(`end reason ${await data('endReason')}`);
    const reason = await page.getByTestId('video-reason').textContent();
    if (!/cannot produce video/.test(reason) || !/injected by the test/.test(reason)) throw new Error(`reason shown: ${reason}`);
    if ((await toggle().textContent()) !== 'Start again') throw new Error('no Start again button');
    await page.screenshot({ path: `${shots}/${variant}-07-bye-shown-ended.png` });
    await toggle().click();
    await assertPlaying('after Start again');
    await toggle().click();
    await waitData('state', 'is', 'off');
  });
  await context.close();
}

if (fake) problems.push(...fake.errors.map((e) => `fake device: ${e}`));
await browser.close();
if (problems.length) {
  console.error(`FAILED: the page reported errors:\n${problems.join('\n')}`);
  process.exit(1);
}
console.log(`video e2e: all steps passed (${variant})`);
