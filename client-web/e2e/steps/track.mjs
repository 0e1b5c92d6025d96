// Browser test steps of the track panel (client-web/js/track.js): the GPS track on the map and
// the waypoint editor. Each function is one checked user flow, `(page, env)`, throwing an Error
// that says what went wrong. `env` = {base, adminKey, deviceID, log(msg)}; nothing else is used.
//
// The panel's root is [data-testid=track-panel] (index.html); it exposes data-fixes,
// data-waypoints, data-waypoint-state, data-editing, data-target-lat/-lon and
// data-boat-lat/-lon.

const T = 15000; // the usual wait
const T_SEND = 30000; // a send: relay ack, agent, tether-boat and back

const panelState = (page) => page.evaluate(() => {
  const r = document.querySelector('[data-testid="track-panel"]');
  const text = (id) => document.querySelector(`[data-testid="${id}"]`)?.textContent?.trim() || '';
  return {
    ...(r ? r.dataset : {}),
    status: text('waypoint-status'),
    hint: text('waypoint-send-hint'),
    position: text('track-position'),
  };
});

/** Waits for `fn` (run in the page, with `arg`); on timeout throws `what` and the panel's state. */
async function waitFor(page, what, fn, arg, timeout = T) {
  try {
    await page.waitForFunction(fn, arg, { timeout });
  } catch {
    throw new Error(`track: ${what} (waited ${timeout / 1000} s); panel: ${JSON.stringify(await panelState(page))}`);
  }
}

const waitFixes = (page, n) => waitFor(page, `fewer than ${n + 1} GPS fixes arrived`,
  (min) => Number(document.querySelector('[data-testid="track-panel"]')?.dataset.fixes || 0) > min, n);

/**
 * The map shows the device's position: more than 2 fixes counted and the position readout shows
 * a latitude and longitude (and a heading for tether-boat).
 *
 * Preconditions: the device view of a device publishing GPS telemetry (e.g. tether-boat
 * behind the agent) is open; any operator.
 */
export async function trackShowsPosition(page, env) {
  await page.getByTestId('track-canvas').waitFor({ state: 'visible', timeout: T });
  await waitFixes(page, 2);
  const readout = await page.getByTestId('track-position').textContent();
  const m = /(-?\d+\.\d+),\s*(-?\d+\.\d+)/.exec(readout || '');
  if (!m || Math.abs(Number(m[1])) > 90 || Math.abs(Number(m[2])) > 180) {
    throw new Error(`track: the position readout shows no latitude/longitude: "${readout}"`);
  }
  const label = await page.getByTestId('track-canvas').getAttribute('aria-label');
  if (!label) throw new Error('track: the map canvas has no aria-label');
  env.log(`track: position ${m[1]}, ${m[2]} (${readout})`);
}

/**
 * Plans three waypoints by clicking the map, drags one, sends them and waits for the device's
 * acknowledgement; then the boat's telemetry target must become one of the sent waypoints.
 *
 * Preconditions: the device view of a tether-boat device (the demo boat) is open and the boat
 * is publishing; the operator has control or admin on it and this console holds its control
 * lease (ControlPanel's `lease-take` pressed, e.g. by control.mjs's step). Leaves edit mode
 * off, with the sent plan on the map.
 */
export async function waypointsSentAndAcknowledged(page, env) {
  const root = page.getByTestId('track-panel');
  const canvas = page.getByTestId('track-canvas');
  await canvas.waitFor({ state: 'visible', timeout: T });
  await waitFixes(page, 2);

  if ((await root.getAttribute('data-editing')) !== 'true') await page.getByTestId('waypoint-edit').click();
  await waitFor(page, 'edit mode did not turn on',
    () => document.querySelector('[data-testid="track-panel"]').dataset.editing === 'true');
  if (Number(await root.getAttribute('data-waypoints')) > 0) await page.getByTestId('waypoint-clear').click();
  await waitFor(page, 'the plan did not clear',
    () => document.querySelector('[data-testid="track-panel"]').dataset.waypoints === '0');

  // Three clicks on the map, spread over it (the map holds still in edit mode).
  await canvas.scrollIntoViewIfNeeded();
  const box = await canvas.boundingBox();
  if (!box || box.width < 100 || box.height < 100) throw new Error(`track: the map is too small to click: ${JSON.stringify(box)}`);
  const points = [[0.3, 0.3], [0.7, 0.35], [0.45, 0.7]].map(([fx, fy]) => [box.x + fx * box.width, box.y + fy * box.height]);
  for (const [i, [x, y]] of points.entries()) {
    await page.mouse.click(x, y);
    await waitFor(page, `click ${i + 1} on the map did not add waypoint ${i + 1}`,
      (n) => document.querySelector('[data-testid="track-panel"]').dataset.waypoints === String(n), i + 1);
  }
  const coords = () => page.$$eval('[data-testid="waypoint-item"]', (rows) => rows.map((r) => ({
    index: r.dataset.index,
    lat: Number(r.querySelector('input[data-field="lat"]').value),
    lon: Number(r.querySelector('input[data-field="lon"]').value),
  })));
  const placed = await coords();
  if (placed.length !== 3 || placed.some((w) => !Number.isFinite(w.lat) || !Number.isFinite(w.lon))) {
    throw new Error(`track: the waypoint list does not show 3 coordinates: ${JSON.stringify(placed)}`);
  }

  // Drag the second waypoint down and to the right.
  const [sx, sy] = points[1];
  await page.mouse.move(sx, sy);
  await page.mouse.down();
  await page.mouse.move(sx + 50, sy + 35, { steps: 8 });
  await page.mouse.up();
  const moved = await coords();
  if (moved.length !== 3) throw new Error(`track: dragging a waypoint changed their number: ${JSON.stringify(moved)}`);
  if (!(moved[1].lat < placed[1].lat && moved[1].lon > placed[1].lon)) {
    throw new Error(`track: dragging waypoint 2 south-east did not move it: ${JSON.stringify(placed[1])} -> ${JSON.stringify(moved[1])}`);
  }
  if (moved[0].lat !== placed[0].lat || moved[2].lon !== placed[2].lon) {
    throw new Error('track: dragging waypoint 2 moved another waypoint');
  }

  const send = page.getByTestId('waypoint-send');
  if (await send.isDisabled()) {
    throw new Error(`track: Send is disabled: "${await page.getByTestId('waypoint-send-hint').textContent()}" (is the control lease held?)`);
  }
  await send.click();
  await waitFor(page, 'the send got no final answer',
    () => ['acknowledged', 'refused', 'failed'].includes(document.querySelector('[data-testid="track-panel"]').dataset.waypointState),
    null, T_SEND);
  const st = await panelState(page);
  if (st.waypointState !== 'acknowledged') throw new Error(`track: the waypoints were not acknowledged: ${st.waypointState}: "${st.status}"`);
  if (!/acknowledged by the device/i.test(st.status)) throw new Error(`track: the status line does not say so: "${st.status}"`);

  // The boat steers for the first of them (tether-boat: target = waypoint 1, rounded to 1e-6).
  await waitFor(page, 'the boat\'s target did not become one of the sent waypoints', (wps) => {
    const d = document.querySelector('[data-testid="track-panel"]').dataset;
    const lat = Number(d.targetLat);
    const lon = Number(d.targetLon);
    return d.targetLat !== undefined && wps.some((w) => Math.abs(w.lat - lat) < 2e-6 && Math.abs(w.lon - lon) < 2e-6);
  }, moved, T);

  await page.getByTestId('waypoint-edit').click();
  await waitFor(page, 'edit mode did not turn off',
    () => document.querySelector('[data-testid="track-panel"]').dataset.editing === 'false');
  const after = await panelState(page);
  env.log(`track: 3 waypoints sent and acknowledged ("${st.status}"); target now ${after.targetLat}, ${after.targetLon}`);
}
