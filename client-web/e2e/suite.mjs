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
//
// The harness (programs, relay, agent configurations, browser, steps and screenshots) is
// lib/stack.mjs, shared with firefox.mjs.

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  T, log, stop, createStack, launchChromium, harness,
  text, videoData, loginWithKey as loginWith, openDevice, waitSeqAdvances, waitFramesAdvance,
} from './lib/stack.mjs';
import * as admin from './steps/admin.mjs';
import * as control from './steps/control.mjs';
import * as track from './steps/track.mjs';
import * as commands from './steps/commands.mjs';
import * as device from './steps/device.mjs';

const stack = await createStack('suite.mjs', 'relay/tests/console_suite.rs');
const { DEVICE_BIN, BOAT_BIN, WORK, PORT, BASE, ADMIN_KEY } = stack;
const start = stack.start;
const startRelay = stack.startRelay;
const agentConfig = stack.agentConfig;

const browser = await launchChromium();
const h = harness(stack, browser);
const { newConsole, step, shutdown, problems } = h;
const loginWithKey = (page, key) => loginWith(page, BASE, key);

// ---- the run --------------------------------------------------------------------------------

log(`relay on port ${PORT}; console at ${BASE}; work dir ${WORK}`);
await stack.provision();
const created = await stack.createDevice('boat-1', 'Boat One');
await startRelay();

const boatSocket = join(WORK, 'robot.sock');
writeFileSync(join(WORK, 'boat.yaml'), agentConfig({ clientID: 'boat-1', clientSecret: created.clientSecret, name: 'Boat One', video: true, socket: boatSocket }));
let boatAgent = start('agent', DEVICE_BIN, ['--config', join(WORK, 'boat.yaml')]);
const boatSim = start('boat', BOAT_BIN, ['--socket', boatSocket, '--rate', '5']);

const env = { base: BASE, adminKey: ADMIN_KEY, deviceID: 'boat-1', processName: 'sleeper', log };
const page = await newConsole('admin');
h.current = page;

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
  await page.screenshot({ path: h.shotPath('pending-approvals') });
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
  await device.telemetryUpdating(page, env);
});

await step('lease-taken', async () => {
  await control.takeAndReleaseLease(page, env);
});

await step('waypoints-sent-and-acknowledged', async () => {
  await track.waypointsSentAndAcknowledged(page, env);
});

await step('teleop-with-deadman', async () => {
  await control.teleopWithDeadman(page, env);
  await control.teleopWithGamepad(page, env);
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
  await device.logConsoleFilters(page, env);
});

await step('stale-banner-while-video-paused', async () => {
  await device.staleWhileAgentFrozen(page, env, boatAgent, (p) => p.screenshot({ path: h.shotPath('stale-banner') }));
});

await step('relay-restart-resumes', async () => {
  await page.evaluate(() => {
    window.__noReload = true;
  });
  const sessionsBefore = Number(await videoData(page, 'sessions'));
  await stop(stack.relay);
  await page.waitForFunction(() => /reconnecting|unreachable/.test(document.querySelector('[data-testid="conn-status"]')?.textContent || ''), null, T);
  await page.getByTestId('device-unreachable').waitFor({ state: 'visible', ...T });
  if (!/relay cannot be reached/i.test(await text(page, 'device-unreachable'))) throw new Error('the device view does not say the relay is unreachable');
  await page.screenshot({ path: h.shotPath('relay-down'), fullPage: true });
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
  await device.pilotPasswordLogin(pilot, env);
}, pilot);

await step('revoked-operator-kicked-out', async () => {
  await admin.disableOperator(page, env, env.pilotName);
  await pilot.getByTestId('login-error').waitFor({ state: 'visible', timeout: 30000 });
  if (!(await pilot.locator('#login-screen').isVisible())) throw new Error('the pilot is not back at the login screen');
  const msg = await text(pilot, 'login-error');
  if (!/session ended/i.test(msg)) throw new Error(`the kicked-out pilot reads "${msg}"`);
  await pilot.screenshot({ path: h.shotPath('pilot-kicked-out') });
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
  // A screenshot of every admin tab.
  for (const tab of ['devices', 'operators', 'keys', 'handshake', 'permissions', 'deny', 'audit']) {
    await admin.openAdminTab(page, env, tab);
    await page.screenshot({ path: h.shotPath(`admin-${tab}`), fullPage: true });
  }
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
