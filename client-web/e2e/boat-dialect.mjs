// Cross-dialect (issue 8): the native console shows a Boat-dialect boat's telemetry and video.
//   node boat-dialect.mjs <base-url> <api-key> <device-id> <screenshot-dir>
// Run by device/tests/dialect_boat_console.rs, which serves the console from an in-process relay
// and plays the boat itself on /ws/device/<device-id> (flat telemetry at 10 Hz, flat webrtc
// answered with the media crate's test pattern, 640x480). Steps, one screenshot each: log in
// with the API key; the device is online in the fleet; its view shows the sequence advancing
// with verdict ok and the GPS and battery values; Start video plays live at 640x480 with more
// than 10 frames decoded. Prints `boat dialect e2e: all steps passed`; exits 1 naming the step
// that failed otherwise.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { T, log, text, videoData, launchChromium, loginWithKey, openDevice, waitSeqAdvances } from './lib/stack.mjs';

const [base, key, deviceId, shots] = process.argv.slice(2);
if (!base || !key || !deviceId || !shots) {
  console.error('usage: node boat-dialect.mjs <base-url> <api-key> <device-id> <screenshot-dir>');
  process.exit(2);
}
mkdirSync(shots, { recursive: true });

const browser = await launchChromium();
const problems = [];
const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
page.on('console', (m) => { if (m.type() === 'error') problems.push(`console error: ${m.text()}`); });

let n = 0;
async function step(name, fn) {
  const id = `${String(++n).padStart(2, '0')}-${name}`;
  try {
    await fn();
    await page.screenshot({ path: join(shots, `${id}.png`), fullPage: true });
    log(`ok: ${id}`);
  } catch (e) {
    await page.screenshot({ path: join(shots, `${id}-FAILED.png`), fullPage: true }).catch(() => {});
    const panel = await page.evaluate(() => JSON.stringify(document.getElementById('video-panel')?.dataset ?? {})).catch(() => '?');
    console.error(`FAILED: ${id}: ${e.stack || e.message}\n  video panel: ${panel}`);
    if (problems.length) console.error(`the page reported:\n${problems.join('\n')}`);
    await browser.close();
    process.exit(1);
  }
}

const row = () => page.locator(`[data-testid="device-row"][data-device-id="${deviceId}"]`);

await step('login', () => loginWithKey(page, base, key));

await step('fleet-online', async () => {
  await row().waitFor(T);
  await page.waitForFunction(
    (id) => document.querySelector(`[data-testid="device-row"][data-device-id="${id}"]`)?.dataset.online === 'true', deviceId, T);
});

await step('telemetry', async () => {
  await openDevice(page, deviceId);
  await waitSeqAdvances(page, 5);
  await page.waitForFunction(() => document.querySelector('[data-testid="telemetry-verdict"]')?.textContent.trim() === 'ok', null, T);
  await page.waitForFunction(
    () => ['gps.latitude', 'battery.percent'].every((k) => (document.querySelector('[data-testid="telemetry-table"]')?.textContent || '').includes(k)),
    null, T);
  log(`  sequence ${await text(page, 'telemetry-seq')}, verdict ${await text(page, 'telemetry-verdict')}, age ${await text(page, 'telemetry-age')}, clock offset ${await text(page, 'clock-offset')}`);
});

await step('video', async () => {
  await page.getByTestId('video-toggle').click();
  const live = { timeout: 60000 };
  await page.waitForFunction(() => document.getElementById('video-panel').dataset.state === 'live', null, live);
  await page.waitForFunction(() => Number(document.getElementById('video-panel').dataset.framesDecoded) > 10, null, live);
  await page.waitForFunction(() => document.getElementById('video-panel').dataset.videoWidth === '640', null, live);
  const [w, h, frames, mode] = await Promise.all(['videoWidth', 'videoHeight', 'framesDecoded', 'mode'].map((k) => videoData(page, k)));
  const codec = await text(page, 'video-codec').catch(() => '?');
  log(`  video ${w}x${h}, ${frames} frames decoded, mode ${mode}, codec ${codec}`);
  if (h !== '480') throw new Error(`video height ${h}, expected 480`);
});

await browser.close();
if (problems.length) {
  console.error(`FAILED: the page reported errors:\n${problems.join('\n')}`);
  process.exit(1);
}
console.log('boat dialect e2e: all steps passed');
