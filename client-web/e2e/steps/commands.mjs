// Browser steps for the "Commands & processes" tab (js/commands.js), run against a real relay,
// the real agent (tether-device) and tether-boat.
//
// Common precondition of every step: logged in as an operator with `admin` on the device, the
// device view of env.deviceID open, the relay link up and the device online. Each step opens
// the tab itself (testid `tab-commands`).
//
// env: {base, adminKey, deviceID, log(msg)} plus
//   - processName (processControl): a `paths` entry of the agent, running when the step starts,
//     e.g. `sleeper: {runOnInit: "sleep 1000", runOnInitRestart: "yes"}`.
//
// Agent configuration the steps need (config.yaml):
//   commands.allow includes `echo` and does NOT include `rm` (commandOutputShown);
//   one `paths` entry named env.processName (processControl).
// configEditorShowsInlineError changes commands.timeout and puts it back before it returns.

const WAIT = 20000;

async function openTab(page) {
  await page.getByTestId('tab-commands').click();
  await page.getByTestId('cmd-run').waitFor({ state: 'visible', timeout: WAIT });
}

/** Waits for fn(arg) in the page; on timeout throws `what` plus what the page showed. */
async function waitFor(page, what, fn, arg, timeout = WAIT, show = '[data-testid="commands-panel"]') {
  try {
    await page.waitForFunction(fn, arg, { timeout });
  } catch {
    const seen = await page.evaluate((sel) => {
      const el = document.querySelector(sel) || document.querySelector('.cmdp');
      return el ? el.innerText.replace(/\s+/g, ' ').slice(0, 600) : '(nothing)';
    }, show).catch(() => '?');
    throw new Error(`${what} (within ${timeout / 1000} s); the panel showed: ${seen}`);
  }
}

const enabled = (id) => {
  const el = document.querySelector(`[data-testid="${id}"]`);
  return !!el && !el.disabled;
};

/**
 * Runs `echo hello-from-<random>` and waits for its output with exit code 0, then runs `rm`
 * (not allowed) and checks the refusal names `command_not_allowed`.
 */
export async function commandOutputShown(page, env) {
  await openTab(page);
  await waitFor(page, 'the Run button stayed disabled', enabled, 'cmd-run');
  const token = `hello-from-${Math.random().toString(36).slice(2, 10)}`;
  await page.getByTestId('cmd-program').fill('echo');
  await page.getByTestId('cmd-args').fill(token);
  await page.getByTestId('cmd-timeout').fill('');
  await page.getByTestId('cmd-run').click();
  await waitFor(page, `echo ${token} did not finish with exit 0 and its text`, (t) => {
    const o = document.querySelector('[data-testid="cmd-output"]');
    return o && o.dataset.state === 'done' && o.dataset.exitCode === '0' && o.textContent.includes(t);
  }, token);
  env.log(`echo ran: ${await page.getByTestId('cmd-badges').innerText()}`);

  await page.getByTestId('cmd-program').fill('rm');
  await page.getByTestId('cmd-args').fill('-rf /tmp/tether-e2e-never');
  await page.getByTestId('cmd-run').click();
  await waitFor(page, 'rm was not shown as refused with command_not_allowed', () => {
    const o = document.querySelector('[data-testid="cmd-output"]');
    const s = document.querySelector('[data-testid="cmd-status"]');
    return o && o.dataset.state === 'refused' && /command_not_allowed/.test(`${o.textContent} ${s.textContent}`);
  });
  const items = await page.getByTestId('cmd-history-item').count();
  if (items < 2) throw new Error(`the history lists ${items} runs, expected at least 2`);
  env.log(`rm refused: ${await page.getByTestId('cmd-status').innerText()}`);
}

/** Runs a 1 MB speed test and waits for the round trip and both throughputs. */
export async function speedTest(page, env) {
  await openTab(page);
  await waitFor(page, 'the speed test button stayed disabled', enabled, 'speedtest-run');
  await page.getByTestId('speedtest-bytes').selectOption('1000000');
  await page.getByTestId('speedtest-run').click();
  await waitFor(page, 'the speed test did not start', () => {
    const s = document.querySelector('[data-testid="speedtest-result"]').dataset.state;
    return s === 'running' || s === 'done' || s === 'failed';
  });
  await waitFor(page, 'the speed test did not end', () => {
    const s = document.querySelector('[data-testid="speedtest-result"]').dataset.state;
    return s === 'done' || s === 'failed';
  }, null, 90000);
  const result = page.getByTestId('speedtest-result');
  if ((await result.getAttribute('data-state')) !== 'done') throw new Error(`speed test failed: ${await result.innerText()}`);
  const rtt = await page.getByTestId('speedtest-rtt').innerText();
  const down = await page.getByTestId('speedtest-down').innerText();
  const up = await page.getByTestId('speedtest-up').innerText();
  if (!/\d.*ms/.test(rtt) || !/\d.*Mbit\/s/.test(down) || !/\d.*Mbit\/s/.test(up)) {
    throw new Error(`speed test figures missing: rtt "${rtt}", down "${down}", up "${up}"`);
  }
  env.log(`speed test: rtt ${rtt}, down ${down}, up ${up}`);
}

/** Stops env.processName (with the inline confirmation), sees it stopped, starts it again. */
export async function processControl(page, env) {
  const name = env.processName;
  if (!name) throw new Error('processControl needs env.processName');
  await openTab(page);
  const sel = `[data-testid="process-row"][data-name="${name}"]`;
  await waitFor(page, `no row for process ${name}`, (s) => !!document.querySelector(s), sel);
  await waitFor(page, `${name} is not running`, (s) => document.querySelector(s).dataset.state === 'running', sel);
  const row = page.locator(sel);

  await waitFor(page, 'the Stop button stayed disabled', (s) => !document.querySelector(`${s} [data-testid="process-stop"]`).disabled, sel);
  await row.getByTestId('process-stop').click();
  await row.getByTestId('process-confirm').click({ timeout: WAIT });
  await waitFor(page, `${name} did not reach state stopped`, (s) => {
    const r = document.querySelector(s);
    return r.dataset.state === 'stopped' && r.querySelector('[data-testid="process-outcome"]').dataset.outcome === 'ok';
  }, sel);
  env.log(`stopped ${name}: ${await row.getByTestId('process-outcome').innerText()}`);

  await waitFor(page, 'the Start button stayed disabled', (s) => !document.querySelector(`${s} [data-testid="process-start"]`).disabled, sel);
  await row.getByTestId('process-start').click();
  await waitFor(page, `${name} did not run again`, (s) => {
    const r = document.querySelector(s);
    return r.dataset.state === 'running' && r.querySelector('[data-testid="process-outcome"]').dataset.outcome === 'ok';
  }, sel);
  const outcome = await row.getByTestId('process-outcome').innerText();
  if (/failed/.test(outcome)) throw new Error(`start outcome: ${outcome}`);
  env.log(`started ${name}: ${outcome}`);
}

/** Sets the editor to `mutate(loaded config)`, pretty-printed. */
async function editConfig(page, mutate) {
  const text = await page.getByTestId('config-editor').inputValue();
  const config = JSON.parse(text);
  mutate(config);
  await page.getByTestId('config-editor').fill(`${JSON.stringify(config, null, 2)}\n`);
  return config;
}

async function applyOk(page, what) {
  await page.getByTestId('config-apply').click();
  await waitFor(page, `${what} was not applied`, () => {
    const r = document.querySelector('[data-testid="config-result"]');
    const e = document.querySelector('[data-testid="config-error"]');
    return r.dataset.state === 'ok' || (!e.hidden && r.dataset.state !== 'pending');
  });
  if ((await page.getByTestId('config-result').getAttribute('data-state')) !== 'ok') {
    throw new Error(`${what}: ${await page.getByTestId('config-error').innerText()}`);
  }
}

/**
 * Loads the agent's configuration, sets commands.maxOutputBytes to 0 and applies: the agent's
 * `invalid_config` shows next to the editor naming the field. Then applies a harmless change of
 * commands.timeout (ok), and puts the old value back.
 */
export async function configEditorShowsInlineError(page, env) {
  await openTab(page);
  await waitFor(page, 'Load config stayed disabled', enabled, 'config-load');
  await page.getByTestId('config-load').click();
  await waitFor(page, 'the configuration did not load', () => {
    const ed = document.querySelector('[data-testid="config-editor"]');
    return ed.value.trim().startsWith('{') && !ed.readOnly;
  });

  await editConfig(page, (c) => {
    c.commands = c.commands && typeof c.commands === 'object' ? c.commands : {};
    c.commands.maxOutputBytes = 0;
  });
  await page.getByTestId('config-apply').click();
  await waitFor(page, 'no inline error naming maxOutputBytes', () => {
    const e = document.querySelector('[data-testid="config-error"]');
    return !e.hidden && /maxOutputBytes/.test(e.textContent) && e.dataset.field === 'commands.maxOutputBytes';
  });
  const selected = await page.evaluate(() => {
    const ed = document.querySelector('[data-testid="config-editor"]');
    return ed.value.slice(ed.selectionStart, ed.selectionEnd);
  });
  if (!/maxOutputBytes/.test(selected)) throw new Error(`the editor did not select the field's line (selected "${selected}")`);
  const patch = (await page.getByTestId('config-patch').innerText()).replace(/\s+/g, '');
  env.log(`refused as expected: ${await page.getByTestId('config-error').getAttribute('data-field')} (patch ${patch})`);

  // Fix it: reload the device's copy (discarding the bad edit) and change only commands.timeout.
  await page.getByTestId('config-load').click();
  await page.getByTestId('config-confirm').click({ timeout: WAIT });
  await waitFor(page, 'the configuration did not reload', () => {
    const ed = document.querySelector('[data-testid="config-editor"]');
    const err = document.querySelector('[data-testid="config-error"]');
    return err.hidden && !/"maxOutputBytes": 0\b/.test(ed.value) && ed.value.trim().startsWith('{');
  });
  let before;
  await editConfig(page, (c) => {
    c.commands = c.commands && typeof c.commands === 'object' ? c.commands : {};
    before = c.commands.timeout;
    c.commands.timeout = before === '25s' ? '30s' : '25s';
  });
  await applyOk(page, 'commands.timeout');
  env.log(`applied commands.timeout: ${(await page.getByTestId('config-result').innerText()).replace(/\s+/g, ' ')}`);

  // Leave the agent as we found it.
  await editConfig(page, (c) => {
    if (before === undefined) delete c.commands.timeout;
    else c.commands.timeout = before;
  });
  await applyOk(page, 'restoring commands.timeout');
}
