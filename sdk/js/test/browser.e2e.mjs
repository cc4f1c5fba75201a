#!/usr/bin/env node
// End-to-end test of the chorus web SDK in headless Chromium against a RUNNING chorus.
//
//   CHORUS_HTTP=http://127.0.0.1:8080 CHORUS_WRITE_KEY=... CHORUS_SECRET_KEY=... \
//     node test/browser.e2e.mjs            (after `npm ci && npm run build`)
//
// CHORUS_SECRET_KEY must carry every scope; only this script's Node side uses it (to
// read profiles and to mint a visitor token through POST /v1/tokens), never the page.
// Optional: CHROMIUM_PATH (default /usr/bin/chromium), E2E_PAGE_PORT (the test page's
// port, default random: set it when chorus allows browser origins per source and
// needs a fixed http://127.0.0.1:PORT), E2E_TIMEOUT_MS (poll limit, default 60000).
//
// The page is served by a local http server on 127.0.0.1 and loads dist/chorus.js as
// an ES module. Scenario (ids unique per run):
//   a. an anonymous visitor views a page and a product; the events reach the profile
//      of anonymous_id:<id>, and getContext() answers for the visitor anonymously;
//   b. identify(userId, {email}); Node mints a visitor token for customer_id:<userId>;
//      with it getContext() / getRecommendations() answer for that customer, and the
//      customer's profile holds the anonymous id; the write key alone is now refused;
//   c. chorus "down" (every request to it aborted): two events tracked, the page
//      reloaded, chorus back: both events arrive exactly once, and a resend of the same
//      messageIds is deduplicated;
//   d. an event tracked just before leaving the page is sent at pagehide (keepalive).
// Chromium runs with this script's HTTP proxy (the "gate", see startGate), which
// forwards everything; in (c) it also refuses chorus-bound requests, because a keepalive
// fetch sent at page exit escapes page.route.
// One line per check, then `N passed, N failed`; exit status 1 with the reason on the
// first failure.
import http from 'node:http';
import net from 'node:net';
import { readFile, mkdtemp, rm, access } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import crypto from 'node:crypto';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const DIST = path.resolve(HERE, '..', 'dist');
const CHORUS = (process.env.CHORUS_HTTP || '').replace(/\/+$/, '');
const WRITE_KEY = process.env.CHORUS_WRITE_KEY || '';
const SECRET_KEY = process.env.CHORUS_SECRET_KEY || '';
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const PAGE_PORT = Number(process.env.E2E_PAGE_PORT || 0);
const TIMEOUT = Number(process.env.E2E_TIMEOUT_MS || 60000);
const RUN = crypto.randomBytes(4).toString('hex');

let passed = 0;
const pageLog = [];

class CheckFailed extends Error {}

function ok(what) {
  passed++;
  console.log(`ok   - ${what}`);
}
function fail(what, why) {
  throw new CheckFailed(`FAIL - ${what}: ${why}`);
}
function check(cond, what, why) {
  if (!cond) fail(what, why);
  ok(what);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const short = (v, n = 600) => {
  const s = typeof v === 'string' ? v : JSON.stringify(v);
  return s && s.length > n ? s.slice(0, n) + '...' : s;
};

// ------------------------------------------------------------------ chorus, from Node

async function api(method, pathname, body) {
  const res = await fetch(CHORUS + pathname, {
    method,
    headers: { Authorization: `Bearer ${SECRET_KEY}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = text;
  }
  return { status: res.status, json };
}

/** Poll `fn` (returning {done, value, last}) until done or the timeout. */
async function poll(what, fn, timeout = TIMEOUT) {
  const end = Date.now() + timeout;
  let last;
  for (let delay = 250; ; delay = Math.min(delay * 1.5, 2000)) {
    const r = await fn();
    last = r.last ?? r.value;
    if (r.done) return r.value;
    if (Date.now() > end) fail(what, `not within ${timeout} ms; last answer: ${short(last)}`);
    await sleep(delay);
  }
}

const profileOf = (identifier) => api('GET', `/v1/profiles/${identifier}`);
const eventCount = (p) => Number(p?.metrics?.event_count ?? p?.event_count ?? 0);
const activityTypes = (p) => (p?.recent_activity || []).map((a) => a.event_type ?? a.type ?? a.kind);
const activityIds = (p) => (p?.recent_activity || []).map((a) => a.event_id ?? a.id).filter(Boolean);

// ---------------------------------------------------------------------- the test page

const PAGE = (config) => `<!doctype html>
<html><head><meta charset="utf-8"><title>chorus web SDK e2e</title></head>
<body><h1>chorus web SDK e2e</h1>
<script type="module">
  import * as chorus from '/dist/chorus.js';
  const config = ${JSON.stringify(config)};
  window.chorusWarnings = [];
  const warn = console.warn.bind(console);
  console.warn = (...args) => {
    window.chorusWarnings.push(args.join(' '));
    warn(...args);
  };
  window.chorus = chorus;
  window.client = chorus.init(config);
  // Runs a client call in the page; errors come back as data, not exceptions.
  window.call = async (fn) => {
    try {
      return { ok: true, value: await fn(window.client) };
    } catch (e) {
      return { ok: false, status: e.status, code: e.code, message: String(e && e.message) };
    }
  };
  window.queuedMessages = () => {
    const out = [];
    for (let i = 0; i < localStorage.length; i++) {
      const k = localStorage.key(i);
      if (k.startsWith('chorus:queue:')) out.push(...JSON.parse(localStorage.getItem(k)));
    }
    return out;
  };
  window.chorusReady = true;
</script></body></html>`;

function startPageServer(config) {
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, 'http://127.0.0.1');
    try {
      if (url.pathname === '/' || url.pathname === '/index.html') {
        res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Cache-Control': 'no-store' });
        return res.end(PAGE(config));
      }
      const m = /^\/dist\/([\w.-]+\.js)$/.exec(url.pathname);
      if (m) {
        const body = await readFile(path.join(DIST, m[1]));
        res.writeHead(200, { 'Content-Type': 'text/javascript; charset=utf-8', 'Cache-Control': 'no-store' });
        return res.end(body);
      }
      if (url.pathname === '/favicon.ico') {
        res.writeHead(204);
        return res.end();
      }
    } catch {
      // fall through to 404
    }
    res.writeHead(404, { 'Content-Type': 'text/plain' });
    res.end('not found');
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(PAGE_PORT, '127.0.0.1', () => resolve(server));
  });
}

/**
 * The browser's HTTP proxy ("gate"): forwards everything, except that while `down` it
 * refuses requests to chorus with 502. page.route aborts the page's own requests to
 * chorus; the gate also stops what page.route cannot see: a `keepalive` fetch sent at
 * page exit is carried on by the browser after the page is gone and escapes Playwright's
 * interception (seen with Chromium 156 / playwright-core 1.65).
 */
function startGate(chorusOrigin) {
  const target = new URL(chorusOrigin);
  const chorusHostPort = `${target.hostname}:${target.port || (target.protocol === 'https:' ? 443 : 80)}`;
  const gate = { down: false, refused: 0, tunnels: new Set(), seen: [] };
  const server = http.createServer((req, res) => {
    let url;
    try {
      url = new URL(req.url);
    } catch {
      res.writeHead(400);
      return res.end();
    }
    if (url.origin === chorusOrigin) gate.seen.push(`${req.method} ${url.pathname}`);
    if (gate.down && url.origin === chorusOrigin) {
      gate.refused++;
      res.writeHead(502, { 'Content-Type': 'text/plain', Connection: 'close' });
      return res.end('chorus is down (e2e gate)');
    }
    const headers = { ...req.headers };
    delete headers['proxy-connection'];
    delete headers['proxy-authorization'];
    const upstream = http.request(
      { hostname: url.hostname, port: url.port || 80, method: req.method, path: url.pathname + url.search, headers },
      (up) => {
        res.writeHead(up.statusCode || 502, up.headers);
        up.pipe(res);
      },
    );
    upstream.on('error', () => {
      if (!res.headersSent) res.writeHead(502, { Connection: 'close' });
      res.end();
    });
    req.pipe(upstream);
  });
  // https targets: CONNECT tunnels (refused, and open ones cut, while down).
  server.on('connect', (req, client, head) => {
    const toChorus = req.url === chorusHostPort;
    if (gate.down && toChorus) {
      gate.refused++;
      return client.end('HTTP/1.1 502 Bad Gateway\r\n\r\n');
    }
    const [host, port] = req.url.split(':');
    const up = net.connect(Number(port) || 443, host, () => {
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
      up.write(head);
      up.pipe(client);
      client.pipe(up);
    });
    const tunnel = { up, client, toChorus };
    gate.tunnels.add(tunnel);
    const close = () => {
      gate.tunnels.delete(tunnel);
      up.destroy();
      client.destroy();
    };
    up.on('error', close);
    client.on('error', close);
    up.on('close', close);
    client.on('close', close);
  });
  gate.setDown = (down) => {
    gate.down = down;
    if (down) for (const t of gate.tunnels) if (t.toChorus) t.client.destroy();
  };
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve({ gate, server }));
  });
}

// --------------------------------------------------------------------------- main

async function main() {
  const missing = ['CHORUS_HTTP', 'CHORUS_WRITE_KEY', 'CHORUS_SECRET_KEY'].filter((k) => !process.env[k]);
  if (missing.length) fail('environment', `set ${missing.join(', ')} (a running chorus and its keys)`);
  try {
    await access(path.join(DIST, 'chorus.js'));
  } catch {
    fail('build', `${path.join(DIST, 'chorus.js')} is missing: run \`npm ci && npm run build\` in sdk/js`);
  }
  try {
    await access(CHROMIUM);
  } catch {
    fail('chromium', `${CHROMIUM} not found: apt-get install -y --no-install-recommends chromium (or set CHROMIUM_PATH)`);
  }
  const chorusOrigin = new URL(CHORUS).origin;

  const config = {
    writeKey: WRITE_KEY,
    host: CHORUS,
    flushAt: 20,
    flushInterval: 300,
    backoff: { base: 500, max: 4000 },
  };
  const server = await startPageServer(config);
  const { gate, server: gateServer } = await startGate(chorusOrigin);
  const pageUrl = `http://127.0.0.1:${server.address().port}/`;
  const userDataDir = await mkdtemp(path.join(tmpdir(), 'chorus-e2e-chromium-'));
  console.log(`# chorus ${CHORUS}, test page ${pageUrl}, run ${RUN}`);

  let context;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
      // Every request goes through the gate (Playwright adds <-loopback> to the bypass
      // list, so 127.0.0.1 is proxied too).
      proxy: { server: `http://127.0.0.1:${gateServer.address().port}` },
      timeout: 60000,
    });
    ok(`chromium (${CHROMIUM}) launched headless with a fresh profile`);
    const page = context.pages()[0] || (await context.newPage());
    page.on('console', (m) => pageLog.push(`console.${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => pageLog.push(`pageerror: ${e.message}`));
    page.on('requestfailed', (r) => pageLog.push(`requestfailed: ${r.method()} ${r.url()} ${r.failure()?.errorText}`));

    const load = async (reload = false) => {
      if (reload) await page.reload({ waitUntil: 'load' });
      else await page.goto(pageUrl, { waitUntil: 'load' });
      await page.waitForFunction(() => window.chorusReady === true, null, { timeout: 15000 });
    };
    const inPage = (fn, arg) => page.evaluate(fn, arg);
    await load();
    ok('test page loaded dist/chorus.js as an ES module');

    await scenarioA(page, inPage, gate);
    await scenarioB(page, inPage);
    await scenarioC(page, inPage, load, chorusOrigin, gate);
    const leaked = pageLog.filter((l) => l.includes(WRITE_KEY));
    check(leaked.length === 0, 'the page never logged the write key', short(leaked));
  } finally {
    await context?.close().catch(() => {});
    server.close();
    gateServer.close();
    await rm(userDataDir, { recursive: true, force: true }).catch(() => {});
  }
}

let state = {};

async function scenarioA(page, inPage, gate) {
  const anonId = await inPage(() => window.client.anonymousId());
  check(typeof anonId === 'string' && anonId.length >= 8, `(a) anonymous visitor has an id (${anonId})`, short(anonId));
  const productId = `e2e-p-${RUN}`;
  const category = `e2e-cat-${RUN}`;
  state = { anonId, productId, category };
  const sent = await inPage(
    async ({ productId, category }) => {
      const c = window.client;
      const ids = [c.page('E2E Product Page'), c.track('Product Viewed', { product_id: productId, price: 19.99, category })];
      await c.flush();
      return { ids, queued: c.queued(), warnings: window.chorusWarnings.splice(0) };
    },
    { productId, category },
  );
  check(
    sent.queued === 0 && sent.warnings.length === 0,
    '(a) page + track("Product Viewed") accepted by POST /v1/batch',
    `still queued: ${sent.queued}; ${short(sent.warnings)}`,
  );
  state.aIds = sent.ids;
  const posts = gate.seen.filter((r) => r === 'POST /v1/batch').length;
  const preflights = gate.seen.filter((r) => r === 'OPTIONS /v1/batch').length;
  check(
    posts >= 1 && preflights === 0,
    '(a) batches are CORS simple requests (text/plain, write key in the body: no preflight)',
    `${posts} POST, ${preflights} OPTIONS /v1/batch`,
  );

  const profile = await poll('(a) events reach the anonymous profile', async () => {
    const r = await profileOf(`anonymous_id:${anonId}`);
    const types = r.status === 200 ? activityTypes(r.json) : [];
    const done = r.status === 200 && eventCount(r.json) >= 2 && types.includes('product.viewed');
    return { done, value: r.json, last: r };
  });
  ok(`(a) GET /v1/profiles/anonymous_id:${anonId} shows the events (event_count ${eventCount(profile)}, activity ${short(activityTypes(profile), 120)})`);
  state.anonCanonical = profile.canonical_id;

  const ctx = await poll('(a) getContext() answers for the anonymous visitor', async () => {
    const r = await inPage(() => window.call((c) => c.getContext()));
    return { done: r.ok && r.value && typeof r.value === 'object', value: r.value, last: r };
  });
  const mentions = JSON.stringify(ctx).includes(productId) || JSON.stringify(ctx).includes(category);
  ok(`(a) getContext() answered anonymously (Basic write key)${mentions ? ', mentioning the viewed product' : ''}: ${short(ctx, 160)}`);
  if (ctx.canonical_id && state.anonCanonical) {
    check(ctx.canonical_id === state.anonCanonical, '(a) the context is the visitor\'s', `${ctx.canonical_id} != ${state.anonCanonical}`);
  }
}

async function mintToken(userId) {
  const r = await api('POST', '/v1/tokens', {
    identifier: `customer_id:${userId}`,
    scopes: ['read:context', 'read:recommendations'],
    ttl: '15m',
  });
  if (r.status !== 200 || !r.json || typeof r.json.token !== 'string') {
    fail('(b) POST /v1/tokens mints a visitor token', `HTTP ${r.status}: ${short(r.json)}`);
  }
  return r.json;
}

async function scenarioB(page, inPage) {
  const { anonId } = state;
  const userId = `e2e-user-${RUN}`;
  const email = `e2e-${RUN}@example.com`;
  const sent = await inPage(
    async ({ userId, email }) => {
      const c = window.client;
      const id = c.identify(userId, { email, first_name: 'E2E' });
      await c.flush();
      return { id, queued: c.queued(), userId: c.userId(), anon: c.anonymousId(), warnings: window.chorusWarnings.splice(0) };
    },
    { userId, email },
  );
  check(sent.queued === 0 && !sent.warnings.length && sent.userId === userId && sent.anon === anonId, `(b) identify(${userId}, {email}) accepted`, short(sent));

  const profile = await poll('(b) the customer profile holds the trait and the anonymous id', async () => {
    const r = await profileOf(`customer_id:${userId}`);
    if (r.status !== 200) return { done: false, last: r };
    const text = JSON.stringify(r.json);
    let linked = text.includes(anonId);
    if (!linked) {
      const a = await profileOf(`anonymous_id:${anonId}`);
      linked = a.status === 200 && a.json && a.json.canonical_id === r.json.canonical_id;
    }
    return { done: text.includes(email) && linked, value: r.json, last: r };
  });
  ok(`(b) GET /v1/profiles/customer_id:${userId} holds ${email} and is linked to anonymous_id:${anonId} (event_count ${eventCount(profile)})`);

  const minted = await mintToken(userId);
  ok(`(b) POST /v1/tokens minted a visitor token for customer_id:${userId} (expires ${minted.expires_at})`);

  await inPage((token) => window.client.setVisitorToken(token), minted.token);
  const ctx = await poll('(b) getContext() with the visitor token', async () => {
    const r = await inPage(() => window.call((c) => c.getContext()));
    return { done: r.ok && r.value && typeof r.value === 'object', value: r.value, last: r };
  });
  if (ctx.canonical_id !== undefined) {
    check(ctx.canonical_id === profile.canonical_id, '(b) getContext() (Bearer, /v1/context/me) answers for the customer', `${ctx.canonical_id} != ${profile.canonical_id}`);
  } else {
    ok(`(b) getContext() (Bearer, /v1/context/me) answered: ${short(ctx, 160)}`);
  }
  const recs = await poll('(b) getRecommendations() with the visitor token', async () => {
    const r = await inPage(() => window.call((c) => c.getRecommendations()));
    return { done: r.ok && r.value && typeof r.value === 'object', value: r.value, last: r };
  });
  if (recs.canonical_id !== undefined) {
    check(recs.canonical_id === profile.canonical_id, '(b) getRecommendations() (Bearer, /v1/recommendations/me) answers for the customer', `${recs.canonical_id} != ${profile.canonical_id}`);
  } else {
    ok(`(b) getRecommendations() (Bearer, /v1/recommendations/me) answered: ${short(recs, 160)}`);
  }

  // A token provider (as a site would fetch one from its backend) works too.
  await page.exposeFunction('mintVisitorToken', async () => (await mintToken(userId)).token);
  const viaProvider = await inPage(async () => {
    window.client.setVisitorToken(() => window.mintVisitorToken());
    return window.call((c) => c.getContext());
  });
  check(viaProvider.ok, '(b) getContext() with a token provider function', short(viaProvider));

  // Without a token, the write key no longer reads a visitor linked to a customer.
  const anonymous = await inPage(async () => {
    window.client.setVisitorToken(null);
    return window.call((c) => c.getContext());
  });
  check(
    !anonymous.ok && anonymous.status === 403 && anonymous.code === 'token_required',
    '(b) without the token, GET /v1/context/anonymous_id:... is refused (403 token_required)',
    short(anonymous),
  );
  return { anonId, userId };
}

async function scenarioC(page, inPage, load, chorusOrigin, gate) {
  // A new anonymous visitor, so that its event counts start at zero.
  const anon2 = await inPage(() => {
    window.client.reset();
    return window.client.anonymousId();
  });
  check(anon2 !== state.anonId && !(await inPage(() => window.client.userId())), `(c) reset() started a new anonymous visitor (${anon2})`, anon2);

  let blocked = 0;
  const matcher = (url) => url.origin === chorusOrigin;
  const handler = (route) => {
    blocked++;
    return route.abort('internetdisconnected');
  };
  gate.setDown(true);
  await page.route(matcher, handler);
  const p2 = `e2e-p2-${RUN}`;
  const p3 = `e2e-p3-${RUN}`;
  const offline = await inPage(
    async ({ p2, p3 }) => {
      const c = window.client;
      const ids = [
        c.track('Product Viewed', { product_id: p2, price: 5, category: 'e2e-offline' }),
        c.track('Product Added', { product_id: p3, price: 7.5, quantity: 1, category: 'e2e-offline' }),
      ];
      await c.flush();
      return { ids, queued: c.queued() };
    },
    { p2, p3 },
  );
  check(blocked >= 1 && offline.queued === 2, '(c) chorus down: two events tracked and kept in the queue', `blocked ${blocked} requests, queued ${offline.queued}`);
  const stored = await inPage(() => window.queuedMessages());
  check(
    stored.length === 2 && offline.ids.every((id) => stored.some((m) => m.messageId === id)),
    '(c) the queue is persisted in localStorage (chorus:queue:...)',
    short(stored.map((m) => m.messageId)),
  );

  await load(true);
  const after = await inPage(() => ({ anon: window.client.anonymousId(), queued: window.client.queued() }));
  check(after.anon === anon2 && after.queued === 2, '(c) after a reload (chorus still down) the anonymous id and both events are still there', short(after));

  await sleep(2000); // time for anything that slipped through to be processed
  const nothing = await profileOf(`anonymous_id:${anon2}`);
  const exitSends = gate.refused;
  check(
    nothing.status === 404,
    `(c) nothing reached chorus while it was down (GET /v1/profiles/anonymous_id:... is 404; ${exitSends} exit-time request(s) got past page.route and were refused by the test's proxy)`,
    `HTTP ${nothing.status}: ${short(nothing.json)}`,
  );

  const blockedBefore = blocked;
  await page.unroute(matcher, handler);
  gate.setDown(false);
  const t0 = Date.now();
  await poll('(c) chorus back: the SDK retries and empties its queue', async () => {
    const q = await inPage(() => window.client.queued());
    return { done: q === 0, value: q, last: `queued ${q}` };
  }, 30000);
  ok(`(c) chorus back: the SDK's own retry delivered the queue after ${Date.now() - t0} ms (${blockedBefore} requests were aborted while down)`);

  const identifier = `anonymous_id:${anon2}`;
  await poll('(c) both offline events reach the profile', async () => {
    const r = await profileOf(identifier);
    return { done: r.status === 200 && eventCount(r.json) >= 2, value: r.json, last: r };
  });
  await sleep(3000); // let any duplicate be processed too
  let profile = (await profileOf(identifier)).json;
  const types = activityTypes(profile);
  check(
    eventCount(profile) === 2 && types.filter((t) => t === 'product.viewed').length === 1 && types.filter((t) => t === 'cart.item_added').length === 1,
    `(c) both events arrived exactly once (event_count 2; activity ${short(types, 120)})`,
    `event_count ${eventCount(profile)}, activity ${short(types)}`,
  );
  const eventIds = activityIds(profile);
  if (offline.ids.every((id) => eventIds.includes(id))) {
    check(offline.ids.every((id) => eventIds.filter((x) => x === id).length === 1), '(c) recent_activity holds each messageId once', short(eventIds));
  }

  // Resend the very same messages (as a page that died before its answer would): deduplicated.
  const res = await fetch(`${CHORUS}/v1/batch`, {
    method: 'POST',
    headers: { 'Content-Type': 'text/plain' },
    body: JSON.stringify({ batch: stored, sentAt: new Date().toISOString(), writeKey: WRITE_KEY }),
  });
  check(res.ok, '(c) a resend of the same messageIds is accepted', `HTTP ${res.status}: ${short(await res.text())}`);
  await sleep(3000);
  profile = (await profileOf(identifier)).json;
  check(eventCount(profile) === 2, '(c) ... and deduplicated (event_count still 2)', `event_count ${eventCount(profile)}`);

  // (d) An event tracked just before the visitor leaves goes out at pagehide (keepalive).
  const postsBefore = gate.seen.filter((r) => r === 'POST /v1/batch').length;
  await inPage(() => window.client.track('Product Viewed', { product_id: 'exit-' + Date.now(), category: 'e2e-exit' }));
  await page.goto('about:blank');
  await poll('(d) an event tracked right before leaving the page arrives', async () => {
    const r = await profileOf(identifier);
    return { done: r.status === 200 && eventCount(r.json) >= 3, value: r.json, last: r };
  });
  await sleep(2000);
  profile = (await profileOf(identifier)).json;
  check(
    eventCount(profile) === 3 && gate.seen.filter((r) => r === 'POST /v1/batch').length > postsBefore,
    '(d) an event tracked right before leaving the page was sent at pagehide and counted once',
    `event_count ${eventCount(profile)}`,
  );
}

main().then(
  () => {
    console.log(`${passed} passed, 0 failed`);
  },
  (e) => {
    if (e instanceof CheckFailed) console.log(e.message);
    else console.log(`FAIL - unexpected error: ${e && e.stack ? e.stack : e}`);
    if (pageLog.length) console.log('# page log:\n' + pageLog.slice(-30).map((l) => '#   ' + l).join('\n'));
    console.log(`${passed} passed, 1 failed`);
    process.exitCode = 1;
  },
);
