// Browser test steps for the admin screen (client-web/js/admin.js). Each export is
// `async (page, env)` (some take one more argument), one checked user flow; it throws an Error
// saying what went wrong.
//
// env: {base, adminKey, deviceID, log(msg)} as for every steps file, plus
//   pilotName      username for createPilotWithPassword (default: e2e-pilot-<time>, written back to env)
//   pilotPassword  its password, >= 10 characters (default: e2e-password-<time>, written back to env)
//
// Precondition for every step unless said otherwise: logged in as an admin, any screen. Steps
// reach the admin screen by clicking [data-testid=nav-admin] (no reload), then the tab.
//
// What the screen exposes:
//   root [data-testid=admin-screen]  data-state="idle|ready|forbidden", data-tab="<tab>"
//   tabs admin-tab-<devices|operators|keys|handshake|permissions|deny|audit>
//   tables admin-table-<name> with data-state="loading|ready|error", data-count; rows
//     data-testid=admin-row data-id=<id> (+ data-username/data-disabled on operators,
//     data-action on audit, data-status on registrations, data-online on devices)
//   forms: inputs admin-<tab>-<field>, submit admin-<tab>-create
//   row actions admin-action-<verb>; inline editor admin-editor with admin-confirm / admin-cancel
//   and fields admin-edit-<field>; results admin-result; errors admin-error; secrets admin-secret
//   (config snippets admin-snippet); refresh buttons admin-refresh-<table>.

const T = { timeout: 15000 };
const SCREEN = '[data-testid="admin-screen"]';

/** The admin screen's visible text, for error messages. */
async function screenText(page) {
  const t = await page.locator(SCREEN).innerText().catch(() => '');
  return t.replace(/\s+/g, ' ').slice(0, 400);
}

/** Throws with the inline error's text if one is shown in the admin screen. */
async function noError(page, what) {
  const err = page.locator(`${SCREEN} [data-testid="admin-error"]`);
  if (await err.count()) {
    const texts = await err.allInnerTexts();
    throw new Error(`${what}: the admin screen shows an error: ${texts.join(' | ')}`);
  }
}

/** Waits until a table finished loading; throws with the inline error if it failed. */
async function waitTable(page, name, what) {
  const sel = `${SCREEN} [data-testid="admin-table-${name}"]`;
  try {
    await page.waitForFunction((s) => {
      const t = document.querySelector(s);
      return !!t && (t.dataset.state === 'ready' || t.dataset.state === 'error');
    }, sel, T);
  } catch {
    throw new Error(`${what}: the ${name} table did not load within 15 s (screen: ${await screenText(page)})`);
  }
  if ((await page.getAttribute(sel, 'data-state')) === 'error') await noError(page, `${what}: loading the ${name} table`);
}

/**
 * Opens an admin tab: clicks [data-testid=nav-admin] unless the admin screen is already shown,
 * then the tab, and waits for its table. Returns nothing.
 */
export async function openAdminTab(page, env, tab) {
  const screen = page.locator(SCREEN);
  if (!(await screen.isVisible())) {
    const nav = page.getByTestId('nav-admin');
    try {
      await nav.waitFor({ state: 'visible', ...T });
    } catch {
      throw new Error('the Admin link [data-testid=nav-admin] is not shown: is the operator an admin and logged in?');
    }
    await nav.click();
    await screen.waitFor({ state: 'visible', ...T });
  }
  const tabBtn = page.getByTestId(`admin-tab-${tab}`);
  await tabBtn.waitFor({ state: 'visible', ...T });
  const already = (await tabBtn.getAttribute('aria-selected')) === 'true';
  // Clicking the selected tab only puts it in the address (#/admin -> #/admin/devices).
  await tabBtn.click();
  await page.waitForFunction((t) => document.querySelector('[data-testid="admin-screen"]')?.dataset.tab === t, tab, T);
  if (already) {
    // Already on it: reload so the table reflects what happened since.
    const sel = `${SCREEN} [data-testid="admin-refresh-${tab}"]`;
    await page.waitForFunction((s) => { const b = document.querySelector(s); return !!b && !b.disabled; }, sel, T);
    await page.locator(sel).click();
  }
  await waitTable(page, tab, `opening the ${tab} tab`);
  if (!page.url().endsWith(`#/admin/${tab}`)) throw new Error(`the address should end in #/admin/${tab}, is ${page.url()}`);
}

/** Waits for the inline result (or throws with the inline error). Returns the result element. */
async function waitResult(page, what) {
  const result = page.locator(`${SCREEN} [data-testid="admin-result"]`);
  const error = page.locator(`${SCREEN} [data-testid="admin-error"]`);
  try {
    await result.or(error).first().waitFor({ state: 'visible', ...T });
  } catch {
    throw new Error(`${what}: neither a result nor an error appeared within 15 s (screen: ${await screenText(page)})`);
  }
  await noError(page, what);
  return result;
}

/** The id (data-id) of the operator row with this username, waiting for it to appear. */
async function operatorRowID(page, username, what) {
  try {
    const handle = await page.waitForFunction((name) => {
      const rows = document.querySelectorAll('[data-testid="admin-table-operators"] [data-testid="admin-row"]');
      for (const r of rows) if (r.dataset.username === name) return r.dataset.id;
      return null;
    }, username, T);
    return await handle.jsonValue();
  } catch {
    throw new Error(`${what}: no row for operator "${username}" in the operators table (screen: ${await screenText(page)})`);
  }
}

/**
 * Creates the pilot `env.pilotName` with password `env.pilotPassword` and org-wide `control`
 * access through the operators form; checks the API key is shown once and the row appears.
 * Returns the operator id (data-id of its row).
 */
export async function createPilotWithPassword(page, env) {
  const stamp = Date.now().toString(36);
  env.pilotName ??= `e2e-pilot-${stamp}`;
  env.pilotPassword ??= `e2e-password-${stamp}`;
  await openAdminTab(page, env, 'operators');
  const screen = page.locator(SCREEN);
  await screen.getByTestId('admin-operators-username').fill(env.pilotName);
  await screen.getByTestId('admin-operators-role').selectOption('pilot');
  await screen.getByTestId('admin-operators-password').fill(env.pilotPassword);
  await screen.getByTestId('admin-operators-access').selectOption('control');
  await screen.getByTestId('admin-operators-create').click();
  const result = await waitResult(page, `creating pilot ${env.pilotName}`);
  const key = ((await result.getByTestId('admin-secret').textContent()) || '').trim();
  if (!/^tk_[^_\s]+_\S+$/.test(key)) throw new Error(`the new operator's API key should be shown once as tk_<id>_<secret>, got "${key}"`);
  const id = await operatorRowID(page, env.pilotName, 'after creating the pilot');
  if (!/^op-/.test(id)) throw new Error(`the pilot's row has data-id "${id}", expected an operator id op-…`);
  const row = screen.locator(`[data-testid="admin-table-operators"] [data-testid="admin-row"][data-id="${id}"]`);
  const rowText = (await row.innerText()).replace(/\s+/g, ' ');
  if (!/pilot/.test(rowText) || !/control \(org\)/.test(rowText)) {
    throw new Error(`the pilot's row should show role pilot and "control (org)" access, shows: ${rowText}`);
  }
  env.pilotID = id;
  env.log?.(`admin: created pilot ${env.pilotName} (${id})`);
  return id;
}

/**
 * Disables the operator `username` (its row's Disable, then the inline confirmation) and waits
 * for the row to show it disabled (data-disabled="true").
 */
export async function disableOperator(page, env, username) {
  await openAdminTab(page, env, 'operators');
  const id = await operatorRowID(page, username, 'before disabling');
  const screen = page.locator(SCREEN);
  const rowSel = `[data-testid="admin-table-operators"] [data-testid="admin-row"][data-id="${id}"]`;
  if ((await page.getAttribute(rowSel, 'data-disabled')) === 'true') throw new Error(`operator ${username} is already disabled`);
  await screen.locator(rowSel).getByTestId('admin-action-disable').click();
  const editor = screen.getByTestId('admin-editor');
  await editor.waitFor({ state: 'visible', ...T });
  const warning = (await editor.innerText()).replace(/\s+/g, ' ');
  if (!/live connections/.test(warning)) throw new Error(`the confirmation should say live connections are closed, says: ${warning}`);
  await editor.getByTestId('admin-confirm').click();
  await waitResult(page, `disabling ${username}`);
  try {
    await page.waitForFunction((s) => document.querySelector(s)?.dataset.disabled === 'true', rowSel, T);
  } catch {
    throw new Error(`operator ${username}'s row never showed disabled (screen: ${await screenText(page)})`);
  }
  const state = ((await screen.locator(rowSel).getByTestId('admin-operator-state').textContent()) || '').trim();
  if (!/disabled/i.test(state)) throw new Error(`the state cell should say disabled, says "${state}"`);
  env.log?.(`admin: disabled ${username} (${id})`);
}

/**
 * Checks the audit log lists an entry with `action` (docs/api.md section 10, e.g.
 * `operator.create`, `operator.disable`, `handshake_key.create`), also through the text filter.
 * `subject` (optional) must then match the entry's subject. Returns the entry's row text.
 */
export async function auditShows(page, env, action, subject = null) {
  await openAdminTab(page, env, 'audit');
  const screen = page.locator(SCREEN);
  const find = ([a, s]) => {
    const rows = document.querySelectorAll('[data-testid="admin-table-audit"] [data-testid="admin-row"]');
    for (const r of rows) {
      if (r.hidden || r.dataset.action !== a) continue;
      if (s && !r.innerText.includes(s)) continue;
      return true;
    }
    return false;
  };
  try {
    await page.waitForFunction(find, [action, subject], T);
  } catch {
    throw new Error(`the audit log shows no ${action} entry${subject ? ` about ${subject}` : ''} (screen: ${await screenText(page)})`);
  }
  // The filter narrows the list to matching entries.
  const filter = screen.getByTestId('admin-audit-filter');
  await filter.fill(action);
  await page.waitForFunction(find, [action, subject], T);
  const visible = await page.evaluate(() => [...document.querySelectorAll('[data-testid="admin-table-audit"] [data-testid="admin-row"]')]
    .filter((r) => !r.hidden).map((r) => r.dataset.action));
  if (visible.some((a) => !a.includes(action))) throw new Error(`filtering by "${action}" still shows other actions: ${[...new Set(visible)].join(', ')}`);
  const row = screen.locator(`[data-testid="admin-table-audit"] [data-testid="admin-row"][data-action="${action}"]`).first();
  const text = (await row.innerText()).replace(/\s+/g, ' ').trim();
  await filter.fill('');
  env.log?.(`admin: audit shows ${text}`);
  return text;
}

/**
 * Creates a handshake key for 5 registrations valid one day; checks it is shown once with an
 * onboarding config.yaml snippet and listed. Returns the key text.
 */
export async function createHandshakeKey(page, env) {
  await openAdminTab(page, env, 'handshake');
  const screen = page.locator(SCREEN);
  const label = `e2e ${Date.now().toString(36)}`;
  await screen.getByTestId('admin-handshake-label').fill(label);
  await screen.getByTestId('admin-handshake-expires').fill('1d');
  await screen.getByTestId('admin-handshake-uses').fill('5');
  await screen.getByTestId('admin-handshake-create').click();
  const result = await waitResult(page, 'creating a handshake key');
  const key = ((await result.getByTestId('admin-secret').textContent()) || '').trim();
  if (key.length < 12) throw new Error(`the handshake key should be shown once, got "${key}"`);
  const snippet = (await result.getByTestId('admin-snippet').textContent()) || '';
  if (!snippet.includes(`handshakeKey: "${key}"`) || !/serverAddress: "wss?:\/\/[^"]+\/ws"/.test(snippet)) {
    throw new Error(`the onboarding snippet should carry serverAddress and handshakeKey, is:\n${snippet}`);
  }
  try {
    await page.waitForFunction((l) => [...document.querySelectorAll('[data-testid="admin-table-handshake"] [data-testid="admin-row"]')]
      .some((r) => r.innerText.includes(l) && /5/.test(r.innerText)), label, T);
  } catch {
    throw new Error(`the new handshake key "${label}" is not listed with 5 uses left (screen: ${await screenText(page)})`);
  }
  env.log?.(`admin: created handshake key ${label}`);
  return key;
}

/**
 * Creates a device through the devices form; checks the secret is shown once with an agent
 * config.yaml snippet, and the device is listed. Returns `{id, secret}`.
 */
export async function createDevice(page, env, { id = `e2e-dev-${Date.now().toString(36)}`, name = 'E2E device' } = {}) {
  await openAdminTab(page, env, 'devices');
  const screen = page.locator(SCREEN);
  await screen.getByTestId('admin-devices-name').fill(name);
  await screen.getByTestId('admin-devices-id').fill(id);
  await screen.getByTestId('admin-devices-create').click();
  const result = await waitResult(page, `creating device ${id}`);
  const secret = ((await result.getByTestId('admin-secret').textContent()) || '').trim();
  if (!/^[0-9a-f]{32,}$/.test(secret)) throw new Error(`the device secret should be shown once, got "${secret}"`);
  const snippet = (await result.getByTestId('admin-snippet').textContent()) || '';
  if (!snippet.includes(`clientID: "${id}"`) || !snippet.includes(`clientSecret: "${secret}"`) || !/serverAddress: "wss?:\/\/[^"]+\/ws"/.test(snippet)) {
    throw new Error(`the agent config snippet is incomplete:\n${snippet}`);
  }
  try {
    await screen.locator(`[data-testid="admin-table-devices"] [data-testid="admin-row"][data-id="${id}"]`).waitFor(T);
  } catch {
    throw new Error(`device ${id} is not listed after creating it (screen: ${await screenText(page)})`);
  }
  env.log?.(`admin: created device ${id}`);
  return { id, secret };
}

/**
 * Approves the pending registration named `name` with device id `deviceID`.
 * Precondition: a device registered with a handshake key under that name (e.g. tether-device
 * with an onboarding config.yaml) and is waiting. Waits up to 15 s for it to appear.
 */
export async function approveRegistration(page, env, name, deviceID) {
  await openAdminTab(page, env, 'devices');
  const screen = page.locator(SCREEN);
  const rowSel = '[data-testid="admin-table-registrations"] [data-testid="admin-row"][data-status="pending"]';
  const findRow = ([s, n]) => {
    for (const r of document.querySelectorAll(s)) if (r.querySelector('.admin-name')?.textContent.trim() === n) return r.dataset.id;
    return null;
  };
  // The list refreshes on registration_requested; Refresh now and then covers a missed message.
  let requestID = null;
  const deadline = Date.now() + T.timeout;
  while (!requestID && Date.now() < deadline) {
    requestID = await page.waitForFunction(findRow, [rowSel, name], { timeout: 3000 }).then((h) => h.jsonValue(), () => null);
    if (!requestID) {
      await screen.getByTestId('admin-refresh-registrations').click().catch(() => {});
      await waitTable(page, 'registrations', 'refreshing registrations');
    }
  }
  if (!requestID) throw new Error(`no pending registration named "${name}" (screen: ${await screenText(page)})`);
  const row = screen.locator(`${rowSel}[data-id="${requestID}"]`);
  await row.getByTestId('admin-registrations-deviceid').fill(deviceID);
  await row.getByTestId('admin-action-approve').click();
  const result = await waitResult(page, `approving ${name}`);
  const text = await result.innerText();
  if (!text.includes(deviceID)) throw new Error(`the approval result should name ${deviceID}, says: ${text}`);
  await screen.locator(`[data-testid="admin-table-devices"] [data-testid="admin-row"][data-id="${deviceID}"]`).waitFor(T)
    .catch(() => { throw new Error(`device ${deviceID} is not listed after approving its registration`); });
  env.log?.(`admin: approved ${name} as ${deviceID}`);
  return requestID;
}

/** Every admin tab loads without an error, and the address follows the tab (#/admin/<tab>). */
export async function adminTabsLoad(page, env) {
  for (const tab of ['devices', 'operators', 'keys', 'handshake', 'permissions', 'deny', 'audit']) {
    await openAdminTab(page, env, tab);
    await noError(page, `the ${tab} tab`);
    if (!page.url().endsWith(`#/admin/${tab}`)) throw new Error(`after clicking the ${tab} tab the address is ${page.url()}`);
  }
}

/**
 * A pilot reaching #/admin sees that it needs the admin role, and no admin data.
 * Precondition: logged in as a pilot (not an admin).
 */
export async function pilotSeesAdminRefused(page, env) {
  if (await page.getByTestId('nav-admin').isVisible()) throw new Error('a pilot should not see the Admin link');
  await page.evaluate(() => { location.hash = '#/admin/operators'; });
  const msg = page.getByTestId('admin-forbidden');
  try {
    await msg.waitFor({ state: 'visible', ...T });
  } catch {
    throw new Error(`a pilot at #/admin should see "needs the admin role" (page: ${(await page.locator('main').innerText()).slice(0, 300)})`);
  }
  if (!/admin role/.test(await msg.innerText())) throw new Error(`the refusal should mention the admin role, says: ${await msg.innerText()}`);
  if (await page.locator(`${SCREEN} [data-testid^="admin-table-"]`).count()) throw new Error('a pilot should not get admin tables');
  await page.evaluate(() => { location.hash = '#/'; });
}
