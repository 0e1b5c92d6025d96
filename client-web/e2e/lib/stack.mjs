// What the console's browser runs share (suite.mjs in Chromium, firefox.mjs in Firefox): the
// programs they start and stop, the relay on a free port with its database provisioned, agent
// configurations, the browsers, and the step/screenshot/console-error harness around the pages.
//
//   const stack = await createStack('suite.mjs', 'relay/tests/console_suite.rs'); // env, port
//   await stack.provision();                             // relay init
//   const boat = await stack.createDevice('boat-1', 'Boat One');
//   await stack.startRelay();
//   const h = harness(stack, await launchChromium());    // or launchFirefox()
//   const page = await h.newConsole('admin'); h.current = page;
//   await h.step('fleet', async () => { ... });          // one screenshot per step
//   await h.shutdown();                                  // then fail if h.problems is not empty
//
// The environment (set by the Rust test that runs the script):
//   RELAY_BIN DEVICE_BIN BOAT_BIN  the three programs
//   WORK        an empty scratch directory (database, agent configs, logs)
//   SHOTS       where the screenshots go (one per step; <step>-FAILED.png on failure)
//   HOST_IP     a non-loopback address of this machine (browsers gather no loopback ICE
//               candidates, so the console is opened at http://HOST_IP:<port>/)
//   CHROMIUM    Chromium (default /usr/bin/chromium); FIREFOX  Firefox (default /usr/bin/firefox-esr)

import { chromium, firefox } from 'playwright-core';
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { mkdirSync, writeFileSync, readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';

/** The usual wait of a step. */
export const T = { timeout: 20000 };

export function log(msg) {
  console.log(`[${new Date().toISOString().slice(11, 23)}] ${msg}`);
}

// ---- processes ------------------------------------------------------------------------------

/** Every program started with start() and still running; stopped by stopAll(). */
export const procs = new Set();

/** Runs a program to completion and returns its stdout; throws with its stderr on failure. */
export function run(bin, args, extraEnv = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, args, { env: { ...process.env, ...extraEnv }, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    child.on('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`${bin} ${args.join(' ')} exited ${code}: ${err}`))));
  });
}

/** Stops a program started with start(): `signal`, then SIGKILL after 10 s. */
export async function stop(child, signal = 'SIGTERM') {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), 10000);
  await child.exited;
  clearTimeout(timer);
}

export function stopAll() {
  return Promise.all([...procs].map((p) => stop(p)));
}

export function tail(file, lines = 40) {
  if (!existsSync(file)) return '';
  return readFileSync(file, 'utf8').split('\n').slice(-lines).join('\n');
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.on('error', reject);
    s.listen(0, '0.0.0.0', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export async function until(what, fn, timeoutMs = 20000) {
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

/**
 * Reads the environment (exits 2 naming `script` and its `runner` if a variable is missing), creates WORK and
 * SHOTS and picks the relay's port. Returns the stack: its settings and what starts its parts.
 */
export async function createStack(script, runner) {
  const env0 = process.env;
  for (const v of ['RELAY_BIN', 'DEVICE_BIN', 'BOAT_BIN', 'WORK', 'SHOTS', 'HOST_IP']) {
    if (!env0[v]) {
      console.error(`${script}: ${v} is not set (run it through ${runner})`);
      process.exit(2);
    }
  }
  const { RELAY_BIN, DEVICE_BIN, BOAT_BIN, WORK, SHOTS, HOST_IP } = env0;
  mkdirSync(SHOTS, { recursive: true });
  mkdirSync(WORK, { recursive: true });
  const PORT = await freePort();
  const ADMIN_KEY = `tk_e2eadmin_${randomBytes(16).toString('hex')}`;
  const DB = join(WORK, 'tether.db');

  const stack = {
    RELAY_BIN, DEVICE_BIN, BOAT_BIN, WORK, SHOTS, HOST_IP, PORT, ADMIN_KEY, DB,
    BASE: `http://${HOST_IP}:${PORT}/`,
    /** The running relay (replaced by each startRelay()). */
    relay: null,

    /** Starts a program with its output in WORK/<name>.log; remembered for the final cleanup. */
    start(name, bin, args, extraEnv = {}) {
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
    },

    /** `tether-relay init` with the admin key. */
    async provision() {
      await run(RELAY_BIN, ['--db', DB, '--data-dir', WORK, 'init'], { TETHER_ADMIN_KEY: ADMIN_KEY });
    },

    /** Creates a device in org `default`; returns the CLI's JSON (with its clientSecret). */
    async createDevice(id, name) {
      return JSON.parse(await run(RELAY_BIN, ['--db', DB, '--data-dir', WORK, 'device', 'create', '--org', 'default', '--id', id, '--name', name, '--json']));
    },

    /** Starts the relay (again) and waits until it answers /health. */
    async startRelay() {
      stack.relay = stack.start('relay', RELAY_BIN, [
        '--db', DB, '--data-dir', WORK, '--port', String(PORT), '--bind', '0.0.0.0',
        // Quick clock sync and link figures; the STALE default the console picks up.
        '--ping-interval', '2', '--stale-video-ms', '1500',
      ], { TETHER_ADMIN_KEY: ADMIN_KEY });
      const relay = stack.relay;
      await until('the relay answers /health', async () => (await fetch(`http://127.0.0.1:${PORT}/health`)).ok, 60000).catch((e) => {
        throw new Error(`${e.message}\n--- relay log ---\n${tail(relay.logFile)}`);
      });
    },

    /** A call of the relay's API with the admin key; returns the JSON answer. */
    async api(method, path, body) {
      const res = await fetch(`http://127.0.0.1:${PORT}${path}`, {
        method,
        headers: { Authorization: `Bearer ${ADMIN_KEY}`, 'Content-Type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const json = await res.json().catch(() => null);
      if (!res.ok) throw new Error(`${method} ${path}: HTTP ${res.status} ${JSON.stringify(json)}`);
      return json;
    },

    /**
     * An agent configuration for this relay: the robot's software on `socket`, system metrics
     * every 2 s, `echo` and `uptime` allowed, processes `sleeper` and `ticker` (an INFO line on
     * stdout and a WARN line on stderr every second), and the test pattern at 640x480 15 fps in
     * `codec` when `video` (`video.codec`; null leaves it out: the agent's default, `auto`, which
     * answers each viewer in H.264 if its browser offers it, else VP8).
     */
    agentConfig({ clientID = '', clientSecret = '', handshakeKey = '', name, video, socket, codec = 'h264' }) {
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
        ...(codec ? [`  codec: ${codec}`] : []),
        '  width: 640',
        '  height: 480',
        '  framerate: 15',
        '',
      ].join('\n');
    },
  };
  return stack;
}

// ---- the browsers ---------------------------------------------------------------------------

/** Debian's chromium, headless. */
export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--autoplay-policy=no-user-gesture-required'],
  });
}

/**
 * Debian's firefox-esr, headless, driven over WebDriver BiDi (playwright-core's `moz-firefox`
 * channel: the browser as shipped, no patched Juggler build). `prefs` are added to the profile.
 */
export function launchFirefox(prefs = {}) {
  return firefox.launch({
    channel: 'moz-firefox',
    executablePath: process.env.FIREFOX || '/usr/bin/firefox-esr',
    headless: true,
    firefoxUserPrefs: {
      // No update checks, telemetry or plugin downloads (there is no internet here; OpenH264
      // would be one of them).
      'media.gmp-manager.updateEnabled': false,
      'media.gmp-gmpopenh264.autoupdate': false,
      'datareporting.policy.dataSubmissionEnabled': false,
      'toolkit.telemetry.enabled': false,
      ...prefs,
    },
  });
}

/**
 * Errors the suite causes on purpose (a wrong password, a relay that is down) are expected.
 * Chromium words them so; see firefox.mjs for Firefox's.
 */
export const EXPECTED_CONSOLE = [/Failed to load resource/, /ERR_CONNECTION_REFUSED/, /WebSocket connection to .* failed/];

/**
 * The harness of one browser: pages whose errors are collected, steps with a screenshot each,
 * and the cleanup. `expected`: console errors that are not problems; `expectedPageErrors`: page
 * errors that are not (none by default).
 */
export function harness(stack, browser, { expected = EXPECTED_CONSOLE, expectedPageErrors = [] } = {}) {
  const h = {
    browser,
    /** What the pages reported: any entry fails the run at finish(). */
    problems: [],
    /** The page the next screenshot is taken of. */
    current: null,
    stepNo: 0,
    /** Step timings: [id, seconds]. */
    timings: [],

    /** A new browser context and page (1400x1000) whose errors become problems. */
    async newConsole(label) {
      const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
      const page = await context.newPage();
      page.on('pageerror', (e) => {
        if (!expectedPageErrors.some((re) => re.test(e.message))) h.problems.push(`${label}: page error: ${e.message}`);
      });
      page.on('console', (m) => {
        if (m.type() === 'error' && !expected.some((re) => re.test(m.text()))) h.problems.push(`${label}: console error: ${m.text()}`);
      });
      return page;
    },

    /** The path of an extra screenshot of the current step: SHOTS/<nn>-<name>.png. */
    shotPath(name) {
      return join(stack.SHOTS, `${String(h.stepNo).padStart(2, '0')}-${name}.png`);
    },

    /**
     * Runs one step and screenshots `page` (full page) as SHOTS/<nn>-<name>.png; on failure
     * <nn>-<name>-FAILED.png, the end of every program's log, cleanup and exit 1.
     */
    async step(name, fn, page = h.current) {
      h.stepNo++;
      const id = `${String(h.stepNo).padStart(2, '0')}-${name}`;
      const started = Date.now();
      try {
        await fn();
        if (page) await page.screenshot({ path: join(stack.SHOTS, `${id}.png`), fullPage: true });
        const secs = (Date.now() - started) / 1000;
        h.timings.push([id, secs]);
        log(`ok: ${id} (${secs.toFixed(1)} s)`);
      } catch (e) {
        if (page) await page.screenshot({ path: join(stack.SHOTS, `${id}-FAILED.png`), fullPage: true }).catch(() => {});
        console.error(`FAILED: ${id}: ${e.stack || e.message}`);
        if (h.problems.length) console.error(`the pages reported errors before that:\n${h.problems.join('\n')}`);
        for (const p of [...procs]) console.error(`--- ${p.name} log (end) ---\n${tail(p.logFile, 30)}`);
        await h.shutdown();
        process.exit(1);
      }
    },

    /** Closes the browser and stops every program. */
    async shutdown() {
      await browser.close().catch(() => {});
      await stopAll();
    },
  };
  return h;
}

// ---- the console's pages --------------------------------------------------------------------

/** The trimmed text of the first [data-testid=<testid>]. */
export const text = async (page, testid) => ((await page.getByTestId(testid).first().textContent()) || '').trim();

/** #video-panel's data-<key> ('' when unset). */
export const videoData = (page, key) => page.evaluate((k) => document.getElementById('video-panel').dataset[k] ?? '', key);

export async function loginWithKey(page, base, key) {
  await page.goto(base);
  await page.getByTestId('login-tab-key').click();
  await page.getByTestId('login-key').fill(key);
  await page.getByTestId('login-button').click();
  await page.getByTestId('device-list').waitFor(T);
}

/** Opens a device's view from the fleet. */
export async function openDevice(page, id) {
  await page.getByTestId('nav-fleet').click();
  await page.locator(`[data-testid="device-row"][data-device-id="${id}"]`).click();
  await page.waitForFunction((i) => document.getElementById('device-id')?.textContent === i, id, T);
}

export async function telemetrySeq(page) {
  return Number((await text(page, 'telemetry-seq')).replace(/\D/g, '')) || 0;
}

/** Waits until the device view's telemetry sequence number grows by `by`. */
export async function waitSeqAdvances(page, by = 3) {
  await page.waitForFunction(() => /\d/.test(document.querySelector('[data-testid="telemetry-seq"]')?.textContent || ''), null, T);
  const first = await telemetrySeq(page);
  await page.waitForFunction(([s, n]) => Number(document.querySelector('[data-testid="telemetry-seq"]').textContent.replace(/\D/g, '')) >= s + n, [first, by], T);
}

/** Waits until the video is live and has decoded `by` more frames. */
export async function waitFramesAdvance(page, by = 10) {
  await page.waitForFunction(() => document.getElementById('video-panel').dataset.state === 'live', null, { timeout: 45000 });
  const first = Number(await videoData(page, 'framesDecoded'));
  await page.waitForFunction(([f, n]) => Number(document.getElementById('video-panel').dataset.framesDecoded) >= f + n, [first, by], { timeout: 45000 });
}
