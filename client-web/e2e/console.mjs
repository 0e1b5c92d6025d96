// Drives the console in Debian's chromium against a running relay:
//   node console.mjs <base-url> <api-key> <device-id> <screenshot-dir>
// Logs in, finds the device in the fleet, opens it and waits for live telemetry with a
// sequence verdict and an age. Exits 0 on success; prints what failed and exits 1 otherwise.
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';

const [base, key, deviceId, shots] = process.argv.slice(2);
if (!base || !key || !deviceId || !shots) {
  console.error('usage: node console.mjs <base-url> <api-key> <device-id> <screenshot-dir>');
  process.exit(2);
}
mkdirSync(shots, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const problems = [];
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
page.on('console', (m) => { if (m.type() === 'error') problems.push(`console error: ${m.text()}`); });

async function step(name, fn) {
  try {
    await fn();
    await page.screenshot({ path: `${shots}/${name}.png` });
    console.log(`ok: ${name}`);
  } catch (e) {
    await page.screenshot({ path: `${shots}/${name}-FAILED.png` }).catch(() => {});
    console.error(`FAILED: ${name}: ${e.message}`);
    await browser.close();
    process.exit(1);
  }
}

const t = { timeout: 15000 };
await step('01-login-refused', async () => {
  await page.goto(base);
  await page.getByTestId('login-key').fill('tk_wrong_key');
  await page.getByTestId('login-button').click();
  await page.getByTestId('login-error').waitFor({ state: 'visible', ...t });
});
// The refused login above makes the browser log its 401; from here on no error is expected.
problems.length = 0;
await step('02-fleet', async () => {
  await page.getByTestId('login-key').fill(key);
  await page.getByTestId('login-button').click();
  await page.locator(`[data-testid="device-row"][data-device-id="${deviceId}"]`).waitFor(t);
  await page.waitForFunction(
    (id) => /online/i.test(document.querySelector(`[data-device-id="${id}"]`)?.textContent || ''),
    deviceId, t);
});
await step('03-device-telemetry', async () => {
  await page.locator(`[data-testid="device-row"][data-device-id="${deviceId}"]`).click();
  await page.waitForFunction(() => /connected/.test(document.querySelector('[data-testid="conn-status"]')?.textContent || ''), null, t);
  // Live frames: the sequence keeps increasing, the verdict is ok, the age is shown in ms.
  const seqOf = async () => Number((await page.getByTestId('telemetry-seq').textContent()).replace(/\D/g, ''));
  await page.waitForFunction(() => /\d/.test(document.querySelector('[data-testid="telemetry-seq"]')?.textContent || ''), null, t);
  const first = await seqOf();
  await page.waitForFunction((s) => Number(document.querySelector('[data-testid="telemetry-seq"]').textContent.replace(/\D/g, '')) > s + 3, first, t);
  await page.waitForFunction(() => document.querySelector('[data-testid="telemetry-verdict"]')?.textContent.trim() === 'ok', null, t);
  await page.waitForFunction(() => /\d+(\.\d+)?\s*ms/.test(document.querySelector('[data-testid="telemetry-age"]')?.textContent || ''), null, t);
  await page.waitForFunction(() => /ms/.test(document.querySelector('[data-testid="clock-offset"]')?.textContent || ''), null, t);
  const table = await page.getByTestId('telemetry-table').textContent();
  if (!table.includes('gps.latitude')) throw new Error(`telemetry table lacks gps.latitude: ${table.slice(0, 200)}`);
});
await browser.close();
if (problems.length) {
  console.error(`FAILED: the page reported errors:\n${problems.join('\n')}`);
  process.exit(1);
}
console.log('console e2e: all steps passed');
