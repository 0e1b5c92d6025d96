// Browser test steps for the device view's telemetry, log console, STALE banner and a pilot's
// password login, shared by suite.mjs (Chromium) and firefox.mjs. Each export is one checked
// flow that throws an Error saying what went wrong.
//
// Preconditions unless said otherwise: the device view of a device whose agent runs the test
// configuration of lib/stack.mjs (a `ticker` process printing an INFO line on stdout and a WARN
// line on stderr every second; tether-boat publishing GPS and battery) is open.

import { T, text, videoData, openDevice, waitSeqAdvances, waitFramesAdvance } from '../lib/stack.mjs';
import * as control from './control.mjs';
import * as track from './track.mjs';

const lines = '[data-testid="log-line"]';

/** Live frames: the sequence advances with verdict ok, age and clock offset; plots fill; the track has a fix. */
export async function telemetryUpdating(page, env) {
  await waitSeqAdvances(page, 5);
  await page.waitForFunction(() => document.querySelector('[data-testid="telemetry-verdict"]')?.textContent.trim() === 'ok', null, T);
  await page.waitForFunction(() => /ms/.test(document.querySelector('[data-testid="clock-offset"]')?.textContent || ''), null, T);
  await page.waitForFunction(() => /\d/.test(document.querySelector('[data-testid="telemetry-age"]')?.textContent || ''), null, T);
  await page.waitForFunction(() => [...document.querySelectorAll('[data-testid="plot"]')].some((p) => Number(p.dataset.points) >= 3), null, T);
  const table = await text(page, 'telemetry-table');
  for (const key of ['gps.latitude', 'battery.percent']) if (!table.includes(key)) throw new Error(`the values table lacks ${key}`);
  await track.trackShowsPosition(page, env);
}

/**
 * The log console shows the device's process output; level "warn" hides the INFO lines and
 * keeps the WARN line; source "system" hides the device's lines. `atWarn(page)` runs while the
 * filter is at "warn" (e.g. a screenshot). Leaves the filters at their defaults and the
 * Telemetry tab open.
 */
export async function logConsoleFilters(page, env, atWarn = async () => {}) {
  await page.getByTestId('tab-logs').click();
  await page.waitForFunction((s) => [...document.querySelectorAll(s)].some((l) => l.dataset.source === 'device' && /tick from the boat/.test(l.textContent) && !l.hidden), lines, T);
  await page.getByTestId('log-level').selectOption('warn');
  const visible = await page.evaluate((s) => [...document.querySelectorAll(s)].filter((l) => !l.hidden).map((l) => l.dataset.level), lines);
  if (!visible.length || visible.some((l) => l !== 'warn' && l !== 'error')) throw new Error(`with level "warn" the log shows levels ${[...new Set(visible)].join(', ')}`);
  if (!(await page.evaluate((s) => [...document.querySelectorAll(s)].some((l) => !l.hidden && /bilge level high/.test(l.textContent)), lines))) {
    throw new Error('the WARN line from the device is not shown at level warn');
  }
  await atWarn(page);
  await page.getByTestId('log-source').selectOption('system');
  await page.getByTestId('log-level').selectOption('debug');
  if (await page.evaluate((s) => [...document.querySelectorAll(s)].some((l) => !l.hidden && l.dataset.source !== 'system'), lines)) {
    throw new Error('source "system" still shows device lines');
  }
  await page.getByTestId('log-source').selectOption('');
  await page.getByTestId('log-level').selectOption('info');
  await page.getByTestId('tab-telemetry').click();
  env.log?.('log console: device lines shown, level and source filters work');
}

/**
 * Freezes the agent process (SIGSTOP: no frames, no telemetry, its sockets stay open) until
 * the STALE banner shows, checks teleop is disabled, then lets it run again (SIGCONT) and waits
 * for live video. `whileStale(page)` runs with the banner up (e.g. a screenshot).
 */
export async function staleWhileAgentFrozen(page, env, agent, whileStale = async () => {}) {
  agent.kill('SIGSTOP');
  const frozen = Date.now();
  try {
    await page.getByTestId('video-stale').waitFor({ state: 'visible', ...T });
    env.log?.(`STALE banner ${((Date.now() - frozen) / 1000).toFixed(1)} s after SIGSTOP`);
    if ((await videoData(page, 'stale')) !== 'true') throw new Error('data-stale is not true while the banner shows');
    await control.teleopDisabledWhileStale(page, env);
    await page.getByTestId('video-panel').scrollIntoViewIfNeeded();
    await whileStale(page);
  } finally {
    agent.kill('SIGCONT');
  }
  const resumed = Date.now();
  await page.getByTestId('video-stale').waitFor({ state: 'hidden', timeout: 45000 });
  await waitFramesAdvance(page, 5);
  env.log?.(`video live again ${((Date.now() - resumed) / 1000).toFixed(1)} s after SIGCONT`);
}

/**
 * A pilot logs in with `env.pilotName` / `env.pilotPassword` (a fresh page), sees no Admin
 * link and the session's end, and watches `env.deviceID`'s telemetry.
 */
export async function pilotPasswordLogin(pilot, env) {
  await pilot.goto(env.base);
  await pilot.getByTestId('login-tab-password').click();
  await pilot.getByTestId('login-username').fill(env.pilotName);
  await pilot.getByTestId('login-password').fill(env.pilotPassword);
  await pilot.getByTestId('login-password-button').click();
  await pilot.locator(`[data-testid="device-row"][data-device-id="${env.deviceID}"]`).waitFor(T);
  if (!(await pilot.getByTestId('nav-admin').isHidden())) throw new Error('a pilot sees the Admin link');
  await pilot.getByTestId('session-expiry').waitFor({ state: 'visible', ...T });
  if (!/session ends \d\d:\d\d/.test(await text(pilot, 'session-expiry'))) throw new Error('the session expiry is not shown');
  await openDevice(pilot, env.deviceID);
  await waitSeqAdvances(pilot, 2);
}
