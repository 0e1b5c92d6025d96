// Browser test steps for the control panel (client-web/js/control.js): the control lease and
// teleop. Each export is `async (page, env)`, one checked user flow; it throws an Error saying
// what went wrong.
//
// env: {base, adminKey, deviceID, log(msg)} as for every steps file. Nothing else is needed.
//
// The panel is `[data-testid="control-panel"]`; its root carries
//   data-lease="free|mine|other|unknown", data-lease-lost="<code>|",
//   data-teleop="disabled|ready|driving", data-teleop-disabled-reason="stale|no-lease|relay-down|offline|no-access|",
//   data-teleop-armed="true|false", data-teleop-sent="<count>", data-last-command='{"throttle":..,"rudder":..}'.

const T = { timeout: 15000 };
const PANEL = '[data-testid="control-panel"]';

/** Reads the panel's data-* attributes. */
async function panelState(page) {
  return page.evaluate((sel) => {
    const el = document.querySelector(sel);
    return el ? { ...el.dataset } : null;
  }, PANEL);
}

/** Waits until the panel's data-<key> equals one of `values`; the error shows the panel's state. */
async function waitData(page, key, values, what) {
  const want = Array.isArray(values) ? values : [values];
  try {
    await page.waitForFunction(
      ([sel, k, w]) => {
        const el = document.querySelector(sel);
        return !!el && w.includes(el.dataset[k]);
      },
      [PANEL, key, want], T);
  } catch {
    const s = await panelState(page);
    const text = await page.locator(PANEL).innerText().catch(() => '');
    throw new Error(`${what}: data-${key} never became ${want.join(' or ')} ` +
      `(panel data: ${JSON.stringify(s)}; panel text: ${text.replace(/\s+/g, ' ').slice(0, 300)})`);
  }
}

async function text(page, testid) {
  return ((await page.locator(PANEL).getByTestId(testid).textContent()) || '').trim();
}

/**
 * Takes the control lease and leaves it held.
 * Preconditions: the device view is open; the operator has `control` or `admin` on the device;
 * nobody holds its lease (data-lease="free").
 */
export async function takeAndReleaseLease(page, env) {
  const panel = page.locator(PANEL);
  await waitData(page, 'lease', 'free', 'the lease should be free before taking it');
  if ((await text(page, 'lease-holder')) !== 'Free') throw new Error(`lease-holder should say Free, says "${await text(page, 'lease-holder')}"`);
  await panel.getByTestId('lease-take').click();
  await waitData(page, 'lease', 'mine', 'after "Take control"');
  const holder = await text(page, 'lease-holder');
  if (!/^You \(since \d\d:\d\d:\d\d\)$/.test(holder)) throw new Error(`lease-holder should say "You (since hh:mm:ss)", says "${holder}"`);
  if (!(await panel.getByTestId('lease-release').isVisible())) throw new Error('the Release button is not shown while holding the lease');
  if (await panel.getByTestId('lease-error').isVisible()) throw new Error(`lease-error shown: ${await text(page, 'lease-error')}`);
  // Teleop becomes possible unless something else (video stale, device offline) forbids it.
  const s = await panelState(page);
  if (s.teleopDisabledReason === 'no-lease') throw new Error('teleop still says no-lease while the lease is held');
  env.log(`lease taken: ${holder}`);
}

/**
 * Gives the lease back.
 * Preconditions: the device view is open and this console holds the lease (data-lease="mine"),
 * e.g. after takeAndReleaseLease.
 */
export async function releaseLease(page, env) {
  const panel = page.locator(PANEL);
  await waitData(page, 'lease', 'mine', 'the lease should be held before releasing it');
  await panel.getByTestId('lease-release').click();
  await waitData(page, 'lease', 'free', 'after "Release"');
  const holder = await text(page, 'lease-holder');
  if (holder !== 'Free') throw new Error(`lease-holder should say Free after release, says "${holder}"`);
  await waitData(page, 'teleop', 'disabled', 'teleop after release');
  if (!(await panel.getByTestId('lease-take').isEnabled())) throw new Error('"Take control" is not enabled after release');
  env.log('lease released');
}

/**
 * Drives with the keyboard and checks the deadman: W held sends throttle > 0 at 10 Hz; letting
 * go sends {"throttle":0,"rudder":0} and sending stops. Disarms Drive at the end.
 * Preconditions: the device view of a device whose robot software is tether-boat is open; this
 * console holds the lease (data-lease="mine"); the device is online; the video is not stale
 * (it may be live or off).
 */
export async function teleopWithDeadman(page, env) {
  const panel = page.locator(PANEL);
  await waitData(page, 'lease', 'mine', 'teleop needs the lease');
  await waitData(page, 'teleop', 'ready', 'teleop should be ready (lease held, video not stale, relay up, device online)');
  const arm = panel.getByTestId('teleop-arm');
  await arm.click();
  if ((await arm.getAttribute('aria-pressed')) !== 'true') throw new Error('Drive did not arm (aria-pressed is not true)');
  const before = Number((await panelState(page)).teleopSent) || 0;

  await page.keyboard.down('w');
  try {
    await page.waitForFunction(
      ([sel, n]) => {
        const el = document.querySelector(sel);
        if (!el || Number(el.dataset.teleopSent) < n + 3) return false;
        try {
          return JSON.parse(el.dataset.lastCommand).throttle > 0 && el.dataset.teleop === 'driving';
        } catch {
          return false;
        }
      },
      [PANEL, before], T);
    // The boat answers each teleop with ok and its status.
    await page.waitForFunction(
      (sel) => /^ok\b.*manual/.test(document.querySelector(sel)?.querySelector('[data-testid="teleop-last-result"]')?.textContent || ''),
      PANEL, T);
    const state = await text(page, 'teleop-state');
    if (!/driving/i.test(state)) throw new Error(`teleop-state should say driving while W is held, says "${state}"`);
    const throttle = Number(await text(page, 'teleop-throttle'));
    if (!(throttle > 0)) throw new Error(`teleop-throttle should be > 0 while W is held, shows "${await text(page, 'teleop-throttle')}"`);
  } catch (e) {
    await page.keyboard.up('w');
    const s = await panelState(page);
    throw new Error(`driving with W held: ${e.message} (panel data: ${JSON.stringify(s)}; last answer: ${await text(page, 'teleop-last-result').catch(() => '?')})`);
  }
  const driving = Number((await panelState(page)).teleopSent);
  await page.keyboard.up('w');

  await page.waitForFunction(
    (sel) => document.querySelector(sel)?.dataset.lastCommand === '{"throttle":0,"rudder":0}', PANEL, T)
    .catch(async () => {
      throw new Error(`no zero command after releasing W (data-last-command ${(await panelState(page)).lastCommand})`);
    });
  await waitData(page, 'teleop', 'ready', 'after releasing W');
  // Sending stops: the count stays put for 700 ms (a few ticks at 10 Hz).
  await page.waitForFunction(
    (sel) => {
      const n = document.querySelector(sel)?.dataset.teleopSent;
      const w = window;
      if (w.__ctlSent !== n) {
        w.__ctlSent = n;
        w.__ctlSince = performance.now();
        return false;
      }
      return performance.now() - w.__ctlSince > 700;
    },
    PANEL, { ...T, polling: 50 });
  const after = Number((await panelState(page)).teleopSent);
  if (after - driving > 5) throw new Error(`${after - driving} commands were sent after releasing W; expected the zero and at most a few repeats`);
  if ((await panelState(page)).lastCommand !== '{"throttle":0,"rudder":0}') throw new Error('the last command sent is not a zero');

  await arm.click();
  if ((await arm.getAttribute('aria-pressed')) !== 'false') throw new Error('Drive did not disarm');
  env.log(`teleop: ${driving - before} commands while W was held, ${after - driving} zero(s) after`);
}

/**
 * Teleop with a gamepad: the page's Gamepad API is given a standard-mapping pad the test moves
 * (navigator.getGamepads replaced before the press; the browser has no real pad here). With the
 * stick forward and no deadman nothing is sent; holding RB (button 5) drives with throttle > 0;
 * letting go of RB sends {"throttle":0,"rudder":0} at once. Disarms Drive and removes the pad.
 * Preconditions: as for teleopWithDeadman.
 */
export async function teleopWithGamepad(page, env) {
  await waitData(page, 'lease', 'mine', 'teleop needs the lease');
  await waitData(page, 'teleop', 'ready', 'teleop should be ready before the gamepad test');
  await page.evaluate(() => {
    const pad = {
      id: 'Tether test pad (STANDARD GAMEPAD)', index: 0, connected: true, mapping: 'standard', timestamp: 0,
      axes: [0, 0, 0, 0], buttons: Array.from({ length: 17 }, () => ({ pressed: false, touched: false, value: 0 })),
    };
    window.__testPad = pad;
    Object.defineProperty(navigator, 'getGamepads', { configurable: true, value: () => [window.__testPad] });
    const ev = new Event('gamepadconnected');
    ev.gamepad = pad;
    window.dispatchEvent(ev);
  });
  const setPad = (axes, deadman) => page.evaluate(([a, d]) => {
    window.__testPad.axes = a;
    window.__testPad.buttons[5] = { pressed: d, touched: d, value: d ? 1 : 0 };
    window.__testPad.timestamp = performance.now();
  }, [axes, deadman]);
  const panel = page.locator(PANEL);
  await page.waitForFunction((sel) => /Tether test pad/.test(document.querySelector(sel)?.querySelector('[data-testid="teleop-gamepad"]')?.textContent || ''), PANEL, T)
    .catch(() => { throw new Error('the panel does not show the connected gamepad'); });
  const arm = panel.getByTestId('teleop-arm');
  await arm.click();
  const before = Number((await panelState(page)).teleopSent) || 0;
  // Stick forward without the deadman: nothing may be sent (watch for half a second).
  await setPad([0, -0.8, 0, 0], false);
  await page.waitForTimeout(500);
  if (Number((await panelState(page)).teleopSent) !== before) throw new Error('teleop commands were sent without the deadman button held');
  await setPad([0, -0.8, 0.5, 0], true);
  await page.waitForFunction(([sel, n]) => {
    const el = document.querySelector(sel);
    try {
      const c = JSON.parse(el.dataset.lastCommand);
      return Number(el.dataset.teleopSent) >= n + 3 && c.throttle > 0 && c.rudder > 0 && el.dataset.teleop === 'driving';
    } catch {
      return false;
    }
  }, [PANEL, before], T).catch(async () => {
    throw new Error(`holding RB with the stick forward did not drive (panel data: ${JSON.stringify(await panelState(page))})`);
  });
  // Let go of the deadman with the stick still forward: an immediate zero.
  await setPad([0, -0.8, 0.5, 0], false);
  await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.lastCommand === '{"throttle":0,"rudder":0}', PANEL, T)
    .catch(async () => { throw new Error(`no zero command after releasing the deadman (${(await panelState(page)).lastCommand})`); });
  await waitData(page, 'teleop', 'ready', 'after releasing the deadman');
  await arm.click();
  await page.evaluate(() => {
    window.__testPad.connected = false;
    Object.defineProperty(navigator, 'getGamepads', { configurable: true, value: () => [] });
    window.dispatchEvent(new Event('gamepaddisconnected'));
  });
  env.log('teleop: gamepad deadman drove and stopped the boat');
}

/**
 * Checks that teleop is refused while the video is stale.
 * Preconditions: the device view is open and its video is stale (`#video-panel` has
 * data-stale="true", set by the app). The lease may or may not be held; the relay is up and the
 * device online (otherwise those reasons come first).
 */
export async function teleopDisabledWhileStale(page, env) {
  await page.waitForFunction(() => document.querySelector('#video-panel')?.dataset.stale === 'true', null, T)
    .catch(() => {
      throw new Error('precondition: #video-panel never had data-stale="true"');
    });
  await waitData(page, 'teleop', 'disabled', 'while the video is stale');
  await waitData(page, 'teleopDisabledReason', 'stale', 'while the video is stale');
  const arm = page.locator(PANEL).getByTestId('teleop-arm');
  if (!(await arm.isDisabled())) throw new Error('the Drive toggle is enabled while the video is stale');
  if ((await arm.getAttribute('aria-pressed')) !== 'false') throw new Error('Drive is still armed while the video is stale');
  const state = await text(page, 'teleop-state');
  if (!/STALE/.test(state)) throw new Error(`teleop-state should say the video is STALE, says "${state}"`);
  env.log(`teleop disabled while stale: "${state}"`);
}

/**
 * A second console (another browser context, same operator key) takes the lease; this console
 * sees it held by another connection, takes it over through the confirm step, and the second
 * console shows it lost, with "Take control again" once the lease is free.
 * Preconditions: the device view is open in `page`; the operator has `admin` on the device
 * (env.adminKey is an admin's); the lease is free or held by `page`. Leaves the lease free.
 * Logging in uses the API-key tab (login-tab-key, login-key, login-button).
 */
export async function takeoverFromSecondConsole(page, env) {
  const mine = (await panelState(page))?.lease === 'mine';
  if (mine) await releaseLease(page, env);
  await waitData(page, 'lease', 'free', 'the lease should be free before the second console takes it');
  const context = await page.context().browser().newContext({ viewport: { width: 1280, height: 900 } });
  const other = await context.newPage();
  try {
    await other.goto(`${env.base}/#/device/${encodeURIComponent(env.deviceID)}`);
    const keyTab = other.getByTestId('login-tab-key');
    if (await keyTab.isVisible().catch(() => false)) await keyTab.click();
    await other.getByTestId('login-key').fill(env.adminKey);
    await other.getByTestId('login-button').click();
    const row = other.locator(`[data-testid="device-row"][data-device-id="${env.deviceID}"]`);
    await Promise.race([
      other.locator(PANEL).waitFor({ state: 'visible', ...T }),
      row.waitFor(T).then(() => row.click()),
    ]);
    await waitData(other, 'lease', 'free', 'second console: the lease should be free');
    await other.locator(PANEL).getByTestId('lease-take').click();
    await waitData(other, 'lease', 'mine', 'second console: after "Take control"');

    // The first console sees another connection of the same operator holding it.
    await waitData(page, 'lease', 'other', 'first console, after the second took the lease');
    const holder = await text(page, 'lease-holder');
    if (!/another/.test(holder)) throw new Error(`lease-holder should name the other holder, says "${holder}"`);
    await waitData(page, 'teleopDisabledReason', 'no-lease', 'first console: teleop without the lease');
    if (!(await page.locator(PANEL).getByTestId('lease-take').isDisabled())) throw new Error('"Take control" is enabled while another console holds the lease');
    await page.locator(PANEL).getByTestId('lease-takeover').click();
    const confirm = page.locator(PANEL).getByTestId('lease-takeover-confirm');
    await confirm.waitFor({ state: 'visible', ...T });
    await confirm.click();
    await waitData(page, 'lease', 'mine', 'first console, after the takeover');

    // The second console learns it lost the lease.
    await waitData(other, 'lease', 'other', 'second console, after the takeover');
    await waitData(other, 'leaseLost', 'takeover', 'second console should show the lease as lost by takeover');
    await other.locator(PANEL).getByTestId('lease-lost').waitFor({ state: 'visible', ...T });

    await releaseLease(page, env);
    const again = other.locator(PANEL).getByTestId('lease-take-again');
    await again.waitFor({ state: 'visible', ...T });
    if (!(await again.isEnabled())) throw new Error('"Take control again" is disabled in the second console though the lease is free');
    env.log('takeover: second console saw the lease lost and offers "Take control again"');
  } finally {
    await context.close();
  }
  // The second console's connection closed without holding anything: the lease stays free.
  await waitData(page, 'lease', 'free', 'after closing the second console');
}
