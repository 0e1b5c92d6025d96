// The console in Firefox: a shorter run than suite.mjs (which drives Chromium), in Debian's
// firefox-esr driven by playwright-core over WebDriver BiDi, against the real relay binary, the
// real agent streaming its test pattern (VP8, see below) and the simulated boat (tether-boat). Run by
// relay/tests/console_firefox.rs, which passes the environment lib/stack.mjs describes
// (FIREFOX names the browser, default /usr/bin/firefox-esr).
//
// Why VP8: Firefox decodes H.264 in WebRTC only through the OpenH264 plugin, which it downloads
// at run time; this machine (like many pilots' networks) has no such download, so its offer has
// no H.264. The agent runs with the default `video.codec` (`auto`: H.264 when the viewer offers
// it, else VP8), and the step checks that VP8 is what was negotiated.
//
// Steps (in order, each one screenshot): wrong password refused; admin logs in with an API key;
// fleet shows the boat online with its battery; the device view: VP8 video decoding at 640x480;
// telemetry updating, plots, track position; the control lease; waypoints sent and acknowledged;
// teleop with the deadman; a command's streamed output; the log console with its level filter;
// the STALE banner while the agent is frozen (SIGSTOP), with teleop disabled, and its recovery
// after SIGCONT; admin creates a pilot, who logs in with a password in a second context.
// Any error a page reports fails the run, except the network errors the run causes on purpose.

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  T, log, stop, createStack, launchFirefox, harness, EXPECTED_CONSOLE,
  text, videoData, loginWithKey, openDevice, waitSeqAdvances, waitFramesAdvance,
} from './lib/stack.mjs';
import * as admin from './steps/admin.mjs';
import * as control from './steps/control.mjs';
import * as track from './steps/track.mjs';
import * as commands from './steps/commands.mjs';
import * as device from './steps/device.mjs';

const began = Date.now();
const stack = await createStack('firefox.mjs', 'relay/tests/console_firefox.rs');
const { DEVICE_BIN, BOAT_BIN, WORK, PORT, BASE, ADMIN_KEY } = stack;

const browser = await launchFirefox();
log(`firefox ${browser.version()} launched in ${((Date.now() - began) / 1000).toFixed(1)} s`);
const h = harness(stack, browser, {
  expected: EXPECTED_CONSOLE,
  // playwright-core's screenshot, in Firefox, appends <style>body {}</style> to the page for a
  // moment (inPagePrepareForScreenshots, syncAnimations); the console's CSP (default-src 'self')
  // blocks it and Firefox reports that as an error. Only that exact style (its sha256 is named in
  // the report) is forgiven: any other CSP violation is the console's and fails the run.
  expectedPageErrors: [/blocked an inline style \(style-src-elem\).*'sha256-YjaKGiklmzC6wjXA513HAMmzus8VE61XCOT\+SmwNZWA='/],
});
const { newConsole, step } = h;
const warnings = [];
const watch = (page, label) => page.on('console', (m) => {
  if (m.type() === 'warning') warnings.push(`${label}: ${m.text()}`);
});

log(`relay on port ${PORT}; console at ${BASE}; work dir ${WORK}`);
await stack.provision();
const created = await stack.createDevice('boat-1', 'Boat One');
await stack.startRelay();

const boatSocket = join(WORK, 'robot.sock');
writeFileSync(join(WORK, 'boat.yaml'), stack.agentConfig({
  // codec: null leaves video.codec out: the agent's default (auto) must pick VP8 for Firefox.
  clientID: 'boat-1', clientSecret: created.clientSecret, name: 'Boat One', video: true, socket: boatSocket, codec: null,
}));
const boatAgent = stack.start('agent', DEVICE_BIN, ['--config', join(WORK, 'boat.yaml')]);
stack.start('boat', BOAT_BIN, ['--socket', boatSocket, '--rate', '5']);

const env = { base: BASE, adminKey: ADMIN_KEY, deviceID: 'boat-1', processName: 'sleeper', log };
const page = await newConsole('admin');
watch(page, 'admin');
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
  await loginWithKey(page, BASE, ADMIN_KEY);
  const row = page.locator('[data-testid="device-row"][data-device-id="boat-1"]');
  await row.waitFor(T);
  await page.waitForFunction(() => document.querySelector('[data-device-id="boat-1"]')?.dataset.online === 'true', null, T);
  await page.waitForFunction(() => /\d+ %/.test(document.querySelector('[data-device-id="boat-1"] [data-testid="device-battery"]')?.textContent || ''), null, T);
  await page.waitForFunction(() => /(good|fair|poor)/.test(document.querySelector('[data-device-id="boat-1"] [data-testid="device-link"]')?.textContent || ''), null, T);
  log(`fleet: boat-1 online, battery ${await text(page, 'device-battery')}, link ${await text(page, 'device-link')}`);
});

await step('device-video-vp8-decoding', async () => {
  await openDevice(page, 'boat-1');
  await page.getByTestId('video-toggle').click();
  await waitFramesAdvance(page, 15);
  const w = Number(await videoData(page, 'videoWidth'));
  const hgt = Number(await videoData(page, 'videoHeight'));
  if (w !== 640 || hgt !== 480) throw new Error(`video decodes at ${w}x${hgt}, expected 640x480`);
  const mode = await videoData(page, 'mode');
  if (!['p2p', 'sfu'].includes(mode)) throw new Error(`video mode shown as "${mode}"`);
  if ((await videoData(page, 'stale')) !== 'false') throw new Error('live video is marked stale');
  await page.waitForFunction(() => /\S/.test(document.querySelector('[data-testid="video-codec"]')?.textContent.replace('—', '') || ''), null, T);
  const codec = await text(page, 'video-codec');
  if (!/^VP8\b/i.test(codec)) throw new Error(`the negotiated codec is "${codec}", expected VP8`);
  // The picture itself: the <video> element has a decoded frame of that size and is playing.
  const el = await page.evaluate(() => {
    const v = document.querySelector('#video-panel video');
    return v ? { w: v.videoWidth, h: v.videoHeight, paused: v.paused, readyState: v.readyState } : null;
  });
  if (!el || el.w !== 640 || el.paused || el.readyState < 2) throw new Error(`the <video> element is not playing: ${JSON.stringify(el)}`);
  log(`video: ${codec}, mode ${mode} (${await text(page, 'video-mode').catch(() => '?')}), ${await videoData(page, 'framesDecoded')} frames, first frame ${await videoData(page, 'firstFrameMs')} ms`);
});

await step('telemetry-plots-track', async () => {
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
});

await step('command-output', async () => {
  await commands.commandOutputShown(page, env);
});

await step('log-console', async () => {
  await device.logConsoleFilters(page, env, (p) => p.screenshot({ path: h.shotPath('log-warn'), fullPage: true }));
});

await step('stale-banner-while-agent-stopped', async () => {
  await device.staleWhileAgentFrozen(page, env, boatAgent, (p) => p.screenshot({ path: h.shotPath('stale-banner') }));
});

await step('admin-creates-pilot', async () => {
  await admin.createPilotWithPassword(page, env);
});

const pilot = await newConsole('pilot');
watch(pilot, 'pilot');
await step('pilot-password-login', async () => {
  await device.pilotPasswordLogin(pilot, env);
}, pilot);

await h.shutdown();
await stop(boatAgent);
if (warnings.length) console.log(`warnings the pages logged (not failures):\n${[...new Set(warnings)].join('\n')}`);
if (h.problems.length) {
  console.error(`FAILED: the pages reported errors:\n${h.problems.join('\n')}`);
  process.exit(1);
}
const total = h.timings.reduce((a, [, s]) => a + s, 0);
console.log(`console in firefox: all steps passed (steps ${total.toFixed(1)} s, run ${((Date.now() - began) / 1000).toFixed(1)} s)`);
process.exit(0);
