// The console's browser suite: everything a pilot and a fleet admin do, in Debian's chromium
// driven by playwright-core, against the real relay binary, the real agent streaming its
// test-pattern pipeline, and the simulated boat (tether-boat) as the robot's software on the
// agent's local socket. Run by relay/tests/console_suite.rs (`make test`), which finds or
// builds the binaries and passes them in the environment:
//
//   RELAY_BIN DEVICE_BIN BOAT_BIN  the three programs
//   WORK        an empty scratch directory (database, agent configs, logs)
//   SHOTS       where the screenshots go (one per step; <step>-FAILED.png on failure)
//   HOST_IP     a non-loopback address of this machine (Chromium gathers no loopback ICE
//               candidates, so the console is opened at http://HOST_IP:<port>/)
//   CHROMIUM    the browser (default /usr/bin/chromium)
//
// Steps (in order, each one screenshot): wrong password refused; admin logs in with an API
// key; fleet; admin creates a pilot with a password and a handshake key; a second agent
// onboards with it and is approved from the fleet's pending list; the device view: video
// decoding, telemetry updating, plots, track; the control lease; waypoints sent and
// acknowledged; teleop with the deadman; a command's streamed output, speed test, process
// control, the config editor's inline error; the log console with its level filter; the STALE
// banner while the agent is frozen (SIGSTOP), with teleop disabled, and its recovery; the relay
// restarted under the console, which reconnects and resumes telemetry and video without a
// reload; the pilot logs in with a password, sees no admin screen, and is kicked out when the
// admin disables it; the audit log; every admin tab; logout.

import { chromium } from 'playwright-core';
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { mkdirSync, writeFileSync, readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import * as admin from './steps/admin.mjs';
import * as control from './steps/control.mjs';
import * as track from './steps/track.mjs';
import * as commands from './steps/commands.mjs';

const env0 = process.env;
for (const v of ['RELAY_BIN', 'DEVICE_BIN', 'BOAT_BIN', 'WORK', 'SHOTS', 'HOST_IP']) {
  if (!env0[v]) {
    console.error(`suite.mjs: ${v} is not set (run it through relay/tests/console_suite.rs)`);
    process.exit(2);
  }
}
const { RELAY_BIN, DEVICE_BIN, BOAT_BIN, WORK, SHOTS, HOST_IP } = env0;
mkdirSync(SHOTS, { recursive: true });
mkdirSync(WORK, { recursive: true });

const T = { timeout: 20000 };
const ADMIN_KEY = `tk_e2eadmin_${randomBytes(16).toString('hex')}`;
const DB = join(WORK, 'tether.db');
const procs = new Set();

function log(msg) {
  console.log(`[${new Date().toISOString().slice(11, 23)}] ${msg}`);
}

// ---- processes ------------------------------------------------------------------------------

/** Starts a program with its output in WORK/<name>.log; remembered for the final cleanup. */
function start(name, bin, args, extraEnv = {}) {
  const out = join(WORK, `${name}.log`);
  const child = spawn(bin, args, {
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'info', ...extraEnv },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const chunks = [];
  const keep = (d) => {
    chunks.push(d);
    writeFileSync(out, Buffer.concat(chunks));
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  child.name = name;
  child.logFile = out;
  child.exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  procs.add(child);
  child.exited.then(() => procs.delete(child));
  return child;
}

/** Runs a program to completion and returns its stdout; throws with its stderr on failure. */
function run(bin, args, extraEnv = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, args, { env: { ...process.env, ...extraEnv }, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    child.on('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`${bin} ${args.join(' ')} exited ${code}: ${err}`))));
  });
}

async function stop(child, signal = 'SIGTERM') {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), 10000);
  await child.exited;
  clearTimeout(timer);
}

function tail(file, lines = 40) {
  if (!existsSync(file)) return '';
  return readFileSync(file, 'utf8').split('\n').slice(-lines).join('\n');
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.on('error', reject);
    s.listen(0, '0.0.0.0', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function until(what, fn, timeoutMs = 20000) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    try {
      if (await fn()) return;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${what}: not within ${timeoutMs / 1000} s${last ? ` (${last.message})` : ''}`);
}

// ---- the stack ------------------------------------------------------------------------------

const PORT = await freePort();
const BASE = `http://${HOST_IP}:${PORT}/`;
let relay = null;

async function startRelay() {
  relay = start('relay', RELAY_BIN, [
    '--db', DB, '--data-dir', WORK, '--port', String(PORT), '--bind', '0.0.0.0',
    // Quick clock sync and link figures; the STALE default the console picks up.
    '--ping-interval', '2', '--stale-video-ms', '1500',
  ], { TETHER_ADMIN_KEY: ADMIN_KEY });
  await until('the relay answers /health', async () => (await fetch(`http://127.0.0.1:${PORT}/health`)).ok, 60000).catch((e) => {
    throw new Error(`${e.message}\n--- relay log ---\n${tail(relay.logFile)}`);
  });
}

async function api(method, path, body) {
  const res = await fetch(`http://127.0.0.1:${PORT}${path}`, {
    method,
    headers: { Authorization: `Bearer ${ADMIN_KEY}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await res.json().catch(() => null);
  if (!res.ok) throw new Error(`${method} ${path}: HTTP ${res.status} ${JSON.stringify(json)}`);
  return json;
}

function agentConfig({ clientID = '', clientSecret = '', handshakeKey = '', name, video, socket }) {
  return [
    `serverAddress: "ws://127.0.0.1:${PORT}/ws"`,
    `clientID: "${clientID}"`,
    `clientSecret: "${clientSecret}"`,
    `handshakeKey: "${handshakeKey}"`,
    `name: "${name}"`,
    'logLevel: "info"',
    'reconnectInterval: 0.5',
    'telemetry:',
    '  udp: ""',
    `  unixSocket: "${socket ?? ''}"`,
    '  systemMetrics: true',
    '  systemInterval: "2s"',
    'commands:',
    '  allow: ["echo", "uptime"]',
    'safety:',
    '  policy: hold',
    'paths:',
    '  sleeper:',
    '    runOnInit: "sleep 100000"',
    '    runOnInitRestart: "yes"',
    '  ticker:',
    `    runOnInit: "sh -c 'while true; do echo \\"INFO tick from the boat\\"; echo \\"WARN bilge level high\\" >&2; sleep 1; done'"`,
    '    runOnInitRestart: "yes"',
    'video:',
    `  enabled: ${video ? 'true' : 'false'}`,
    '  source: testpattern',
    '  codec: h264',
    '  width: 640',
    '  height: 480',
    '  framerate: 15',
    '',
  ].join('\n');
}

// ---- the browser ----------------------------------------------------------------------------

const browser = await chromium.launch({
  executablePath: env0.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--autoplay-policy=no-user-gesture-required'],
});
const problems = [];
/** Errors the suite causes on purpose (a wrong password, a relay that is down) are expected. */
const EXPECTED_CONSOLE = [/Failed to load resource/, /ERR_CONNECTION_REFUSED/, /WebSocket connection to .* failed/];

async function newConsole(label) {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
  const page = await context.newPage();
  page.on('pageerror', (e) => problems.push(`${label}: page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !EXPECTED_CONSOLE.some((re) => re.test(m.text()))) problems.push(`${label}: console error: ${m.text()}`);
  });
  return page;
}

let current = null; // the page the next screenshot is taken of
let stepNo = 0;

async function step(name, fn, page = current) {
  stepNo++;
  const id = `${String(stepNo).padStart(2, '0')}-${name}`;
  const started = Date.now();
  try {
    await fn();
    if (page) await page.screenshot({ path: join(SHOTS, `${id}.png`), fullPage: true });
    log(`ok: ${id} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
  } catch (e) {
    if (page) await page.screenshot({ path: join(SHOTS, `${id}-FAILED.png`), fullPage: true }).catch(() => {});
    console.error(`FAILED: ${id}: ${e.stack || e.message}`);
    for (const p of [...procs]) console.error(`--- ${p.name} log (end) ---\n${tail(p.logFile, 30)}`);
    await shutdown();
    process.exit(1);
  }
}

async function shutdown() {
  await browser.close().catch(() => {});
  await Promise.all([...procs].map((p) => stop(p)));
}

const text = async (page, testid) => ((await page.getByTestId(testid).first().textContent()) || '').trim();
const videoData = (page, key) => page.evaluate((k) => document.getElementById('video-panel').dataset[k] ?? '', key);

async function loginWithKey(page, key) {
  await page.goto(BASE);
  await page.getByTestId('login-tab-key').click();
  await page.getByTestId('login-key').fill(key);
  await page.getByTestId('login-button').click();
  await page.getByTestId('device-list').waitFor(T);
}

async function openDevice(page, id) {
  await page.getByTestId('nav-fleet').click();
  await page.locator(`[data-testid="device-row"][data-device-id="${id}"]`).click();
  await page.waitForFunction((i) => document.getElementById('device-id')?.textContent === i, id, T);
}

async function telemetrySeq(page) {
  return Number((await text(page, 'telemetry-seq')).replace(/\D/g, '')) || 0;
}

async function waitSeqAdvances(page, by = 3) {
  await page.waitForFunction(() => /\d/.test(document.querySelector('[data-testid="telemetry-seq"]')?.textContent || ''), null, T);
  const first = await telemetrySeq(page);
  await page.waitForFunction(([s, n]) => Number(document.querySelector('[data-testid="telemetry-seq"]').textContent.replace(/\D/g, '')) >= s + n, [first, by], T);
}

async function waitFramesAdvance(page, by = 10) {
  await page.waitForFunction(() => document.getElementById('video-panel').dataset.state === 'live', null, { timeout: 45000 });
  const first = Number(await videoData(page, 'framesDecoded'));
  await page.waitForFunction(([f, n]) => Number(document.getElementById('video-panel').dataset.framesDecoded) >= f + n, [first, by], { timeout: 45000 });
}

// ---- the run --------------------------------------------------------------------------------

log(`relay on port ${PORT}; console at ${BASE}; work dir ${WORK}`);
await run(RELAY_BIN, ['--db', DB, '--data-dir', WORK, 'init'], { TETHER_ADMIN_KEY: ADMIN_KEY });
const created = JSON.parse(await run(RELAY_BIN, ['--db', DB, '--data-dir', WORK, 'device', 'create', '--org', 'default', '--id', 'boat-1', '--name', 'Boat One', '--json']));
await startRelay();

const boatSocket = join(WORK, 'robot.sock');
writeFileSync(join(WORK, 'boat.yaml'), agentConfig({ clientID: 'boat-1', clientSecret: created.clientSecret, name: 'Boat One', video: true, socket: boatSocket }));
let boatAgent = start('agent', DEVICE_BIN, ['--config', join(WORK, 'boat.yaml')]);
const boatSim = start('boat', BOAT_BIN, ['--socket', boatSocket, '--rate', '5']);

const env = { base: BASE, adminKey: ADMIN_KEY, deviceID: 'boat-1', processName: 'sleeper', log };
const page = await newConsole('admin');
current = page;

await step('login-refused', async () => {
  await page.goto(BASE);
  await page.getByTestId('login-tab-password').click();
  await page.getByTestId('login-username').fill('admin');
  await page.getByTestId('login-password').fill('not-the-password');
  await page.getByTestId('login-password-button').click();
  await page.getByTestId('login-error').waitFor({ state: 'visible', ...T });
  const msg = await text(page, 'login-error');
  if (!/wrong username or password/i.test(msg)) throw new Error(`login error says "${msg}"`);
});

await step('fleet', async () => {
  await loginWithKey(page, ADMIN_KEY);
  const row = page.locator('[data-testid="device-row"][data-device-id="boat-1"]');
  await row.waitFor(T);
  await page.waitForFunction(() => document.querySelector('[data-device-id="boat-1"]')?.dataset.online === 'true', null, T);
  // Battery from the boat's telemetry and the link measured by the relay's clock sync.
  await page.waitForFunction(() => /\d+ %/.test(document.querySelector('[data-device-id="boat-1"] [data-testid="device-battery"]')?.textContent || ''), null, T);
  await page.waitForFunction(() => /(good|fair|poor)/.test(document.querySelector('[data-device-id="boat-1"] [data-testid="device-link"]')?.textContent || ''), null, T);
  // Search narrows the list; an unmatched query says so.
  await page.getByTestId('fleet-search').fill('no-such-boat');
  await page.getByTestId('fleet-no-match').waitFor({ state: 'visible', ...T });
  await page.getByTestId('fleet-search').fill('boat one');
  await row.waitFor(T);
  await page.getByTestId('fleet-search').fill('');
  await page.getByTestId('fleet-sort').selectOption('battery');
});

await step('admin-creates-pilot-and-handshake-key', async () => {
  await admin.createPilotWithPassword(page, env);
  env.handshakeKey = await admin.createHandshakeKey(page, env);
});

let rover = null;
await step('pending-device-approved', async () => {
  writeFileSync(join(WORK, 'rover.yaml'), agentConfig({ handshakeKey: env.handshakeKey, name: 'Rover Two', video: false }));
  rover = start('rover-agent', DEVICE_BIN, ['--config', join(WORK, 'rover.yaml')]);
  await page.getByTestId('nav-fleet').click();
  const pending = page.locator('[data-testid="pending-row"]', { hasText: 'Rover Two' });
  await pending.waitFor(T);
  await page.screenshot({ path: join(SHOTS, `${String(stepNo).padStart(2, '0')}-pending-approvals.png`) });
  await pending.getByTestId('pending-device-id').fill('rover-2');
  await pending.getByTestId('pending-approve').click();
  await page.waitForFunction(() => /approved as rover-2/.test(document.querySelector('[data-testid="pending-status"]')?.textContent || ''), null, T);
  // The agent fetches its secret, connects, and the fleet shows it online.
  await page.waitForFunction(() => document.querySelector('[data-device-id="rover-2"]')?.dataset.online === 'true', null, { timeout: 40000 });
});

await step('device-video-decoding', async () => {
  await openDevice(page, 'boat-1');
  await page.getByTestId('video-toggle').click();
  await waitFramesAdvance(page, 15);
  const w = Number(await videoData(page, 'videoWidth'));
  const h = Number(await videoData(page, 'videoHeight'));
  if (w !== 640 || h !== 480) throw new Error(`video decodes at ${w}x${h}, expected 640x480`);
  const mode = await videoData(page, 'mode');
  if (!['p2p', 'sfu'].includes(mode)) throw new Error(`video mode shown as "${mode}"`);
  if ((await videoData(page, 'stale')) !== 'false') throw new Error('live video is marked stale');
});

await step('telemetry-updating', async () => {
  await waitSeqAdvances(page, 5);
  await page.waitForFunction(() => document.querySelector('[data-testid="telemetry-verdict"]')?.textContent.trim() === 'ok', null, T);
  await page.waitForFunction(() => /ms/.test(document.querySelector('[data-testid="clock-offset"]')?.textContent || ''), null, T);
  await page.waitForFunction(() => /\d/.test(document.querySelector('[data-testid="telemetry-age"]')?.textContent || ''), null, T);
  await page.waitForFunction(() => [...document.querySelectorAll('[data-testid="plot"]')].some((p) => Number(p.dataset.points) >= 3), null, T);
  const table = await text(page, 'telemetry-table');
  for (const key of ['gps.latitude', 'battery.percent']) if (!table.includes(key)) throw new Error(`the values table lacks ${key}`);
  await track.trackShowsPosition(page, env);
});

await step('lease-taken', async () => {
  await control.takeAndReleaseLease(page, env);
});

await step('waypoints-sent-and-acknowledged', async () => {
  await track.waypointsSentAndAcknowledged(page, env);
});

await step('teleop-with-deadman', async () => {
  await control.teleopWithDeadman(page, env);
});

await step('command-output', async () => {
  await commands.commandOutputShown(page, env);
});

await step('speed-test', async () => {
  await commands.speedTest(page, env);
});

await step('process-control', async () => {
  await commands.processControl(page, env);
});

await step('config-editor-inline-error', async () => {
  await commands.configEditorShowsInlineError(page, env);
});

await step('log-console', async () => {
  await page.getByTestId('tab-logs').click();
  // The ticker's output: an INFO line on stdout and a WARN line on stderr every second.
  await page.waitForFunction(() => [...document.querySelectorAll('[data-testid="log-line"]')].some((l) => l.dataset.source === 'device' && /tick from the boat/.test(l.textContent) && !l.hidden), null, T);
  await page.getByTestId('log-level').selectOption('warn');
  const visible = await page.evaluate(() => [...document.querySelectorAll('[data-testid="log-line"]')].filter((l) => !l.hidden).map((l) => l.dataset.level));
  if (!visible.length || visible.some((l) => l !== 'warn' && l !== 'error')) throw new Error(`with level "warn" the log shows levels ${[...new Set(visible)].join(', ')}`);
  if (!(await page.evaluate(() => [...document.querySelectorAll('[data-testid="log-line"]')].some((l) => !l.hidden && /bilge level high/.test(l.textContent))))) {
    throw new Error('the WARN line from the device is not shown at level warn');
  }
  await page.getByTestId('log-source').selectOption('system');
  await page.getByTestId('log-level').selectOption('debug');
  if (await page.evaluate(() => [...document.querySelectorAll('[data-testid="log-line"]')].some((l) => !l.hidden && l.dataset.source !== 'system'))) {
    throw new Error('source "system" still shows device lines');
  }
  await page.getByTestId('log-source').selectOption('');
  await page.getByTestId('log-level').selectOption('info');
  await page.getByTestId('tab-telemetry').click();
});

await step('stale-banner-while-video-paused', async () => {
  // Freeze the agent: no frames, no telemetry, its sockets stay open.
  boatAgent.kill('SIGSTOP');
  try {
    await page.getByTestId('video-stale').waitFor({ state: 'visible', ...T });
    if ((await videoData(page, 'stale')) !== 'true') throw new Error('data-stale is not true while the banner shows');
    await control.teleopDisabledWhileStale(page, env);
    await page.getByTestId('video-panel').scrollIntoViewIfNeeded();
    await page.screenshot({ path: join(SHOTS, `${String(stepNo).padStart(2, '0')}-stale-banner.png`) });
  } finally {
    boatAgent.kill('SIGCONT');
  }
  await page.getByTestId('video-stale').waitFor({ state: 'hidden', timeout: 45000 });
  await waitFramesAdvance(page, 5);
});

await step('relay-restart-resumes', async () => {
  await page.evaluate(() => {
    window.__noReload = true;
  });
  const sessionsBefore = Number(await videoData(page, 'sessions'));
  await stop(relay);
  await page.waitForFunction(() => /reconnecting|unreachable/.test(document.querySelector('[data-testid="conn-status"]')?.textContent || ''), null, T);
  await page.getByTestId('device-unreachable').waitFor({ state: 'visible', ...T });
  if (!/relay cannot be reached/i.test(await text(page, 'device-unreachable'))) throw new Error('the device view does not say the relay is unreachable');
  await page.screenshot({ path: join(SHOTS, `${String(stepNo).padStart(2, '0')}-relay-down.png`), fullPage: true });
  await startRelay();
  await page.waitForFunction(() => document.querySelector('[data-testid="conn-status"]')?.textContent === 'connected', null, { timeout: 40000 });
  await page.getByTestId('device-unreachable').waitFor({ state: 'hidden', timeout: 40000 });
  await page.waitForFunction(() => document.querySelector('[data-testid="subscription-status"]')?.textContent === 'subscribed', null, T);
  await waitSeqAdvances(page, 3);
  // Video comes back in a new session, started by the console itself.
  await page.waitForFunction((n) => Number(document.getElementById('video-panel').dataset.sessions) > n, sessionsBefore, { timeout: 45000 });
  await waitFramesAdvance(page, 10);
  if (!(await page.evaluate(() => window.__noReload === true))) throw new Error('the page was reloaded');
});

const pilot = await newConsole('pilot');
await step('pilot-password-login', async () => {
  await pilot.goto(BASE);
  await pilot.getByTestId('login-tab-password').click();
  await pilot.getByTestId('login-username').fill(env.pilotName);
  await pilot.getByTestId('login-password').fill(env.pilotPassword);
  await pilot.getByTestId('login-password-button').click();
  await pilot.locator('[data-testid="device-row"][data-device-id="boat-1"]').waitFor(T);
  if (!(await pilot.getByTestId('nav-admin').isHidden())) throw new Error('a pilot sees the Admin link');
  await pilot.getByTestId('session-expiry').waitFor({ state: 'visible', ...T });
  if (!/session ends \d\d:\d\d/.test(await text(pilot, 'session-expiry'))) throw new Error('the session expiry is not shown');
  await openDevice(pilot, 'boat-1');
  await waitSeqAdvances(pilot, 2);
}, pilot);

await step('revoked-operator-kicked-out', async () => {
  await admin.disableOperator(page, env, env.pilotName);
  await pilot.getByTestId('login-error').waitFor({ state: 'visible', timeout: 30000 });
  if (!(await pilot.locator('#login-screen').isVisible())) throw new Error('the pilot is not back at the login screen');
  const msg = await text(pilot, 'login-error');
  if (!/session ended/i.test(msg)) throw new Error(`the kicked-out pilot reads "${msg}"`);
  await pilot.screenshot({ path: join(SHOTS, `${String(stepNo).padStart(2, '0')}-pilot-kicked-out.png`) });
  // And cannot log in again.
  await pilot.getByTestId('login-tab-password').click();
  await pilot.getByTestId('login-username').fill(env.pilotName);
  await pilot.getByTestId('login-password').fill(env.pilotPassword);
  await pilot.getByTestId('login-password-button').click();
  await pilot.waitForFunction(() => /wrong username or password|disabled/i.test(document.querySelector('[data-testid="login-error"]')?.textContent || ''), null, T);
  await admin.auditShows(page, env, 'operator.disable');
});

await step('admin-screens', async () => {
  await admin.adminTabsLoad(page, env);
});

await step('logout', async () => {
  await page.getByTestId('logout').click();
  await page.locator('#login-screen').waitFor({ state: 'visible', ...T });
  await page.reload();
  await page.locator('#login-screen').waitFor({ state: 'visible', ...T });
});

await shutdown();
await stop(rover);
await stop(boatSim);
await stop(boatAgent);
if (problems.length) {
  console.error(`FAILED: the pages reported errors:\n${problems.join('\n')}`);
  process.exit(1);
}
console.log('console suite: all steps passed');
process.exit(0);
