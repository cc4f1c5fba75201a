// Unit tests over the compiled SDK (dist/) in a fake browser: `npm test`.
import { test, describe, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { install, FakeStorage, CookieJar, FakeFetch, sleep, until } from './fake-env.mjs';
import * as sdk from '../dist/chorus.js';
import { backoffDelay, DEFAULT_BACKOFF, parseRetryAfter, isRetryable } from '../dist/backoff.js';
import { chunk, batchBody, MAX_KEEPALIVE_BYTES } from '../dist/transport.js';
import { parseStoredId } from '../dist/storage.js';

const HOST = 'https://chorus.example';
const WRITE_KEY = 'wk_test_0123456789';
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
// Fast retries for the tests.
const FAST = { base: 10, max: 40, jitter: 0 };

let env;
const clients = [];
function start(options = {}, envOptions = {}) {
  env = install(envOptions);
  return env;
}
function make(options = {}) {
  const c = new sdk.ChorusClient({ writeKey: WRITE_KEY, host: HOST, backoff: FAST, ...options });
  clients.push(c);
  return c;
}
/** A second page load: the old client stops, a new one starts over the same storage and cookies. */
function reload(options = {}, fetch = env.fetch) {
  for (const c of clients.splice(0)) c.close();
  const { storage, cookies } = env;
  env.uninstall();
  env = install({ storage, cookies, fetch });
  return make(options);
}
function queueKeys(storage) {
  return [...storage.data.keys()].filter((k) => k.startsWith('chorus:queue:'));
}
function queued(storage) {
  const keys = queueKeys(storage);
  return keys.length ? JSON.parse(storage.getItem(keys[0])) : [];
}

afterEach(() => {
  for (const c of clients.splice(0)) c.close();
  env?.uninstall();
  env = undefined;
});

describe('wire format', () => {
  test('track builds a Segment message and flush posts {batch, sentAt, writeKey} as text/plain', async () => {
    start();
    const c = make();
    const id = c.track('Product Viewed', { product_id: 'p1', price: 19.99, category: 'shoes' });
    assert.match(id, UUID);
    await c.flush();
    assert.equal(env.fetch.calls.length, 1);
    const call = env.fetch.calls[0];
    assert.equal(call.url, HOST + '/v1/batch');
    assert.equal(call.options.method, 'POST');
    assert.equal(call.options.headers['Content-Type'], 'text/plain');
    assert.equal(call.options.headers.Authorization, undefined, 'no Authorization: no CORS preflight');
    assert.equal(call.options.credentials, 'omit');
    assert.equal(call.json.writeKey, WRITE_KEY);
    assert.ok(!isNaN(Date.parse(call.json.sentAt)));
    const [m] = call.json.batch;
    assert.equal(m.type, 'track');
    assert.equal(m.event, 'Product Viewed');
    assert.deepEqual(m.properties, { product_id: 'p1', price: 19.99, category: 'shoes' });
    assert.equal(m.messageId, id);
    assert.match(m.anonymousId, UUID);
    assert.equal(m.anonymousId, c.anonymousId());
    assert.equal(m.userId, undefined);
    assert.ok(new Date(m.timestamp).toISOString() === m.timestamp);
    assert.deepEqual(m.context.library, { name: 'chorus-web', version: sdk.VERSION });
    assert.deepEqual(m.context.page, {
      path: '/products/p1',
      referrer: 'https://search.example/',
      search: '?utm_source=newsletter&utm_campaign=spring',
      title: 'Product p1',
      url: 'https://shop.example/products/p1?utm_source=newsletter&utm_campaign=spring',
    });
    assert.deepEqual(m.context.campaign, { source: 'newsletter', name: 'spring' });
    assert.equal(m.context.userAgent, 'FakeBrowser/1.0');
    assert.equal(m.context.locale, 'en-AU');
    assert.equal(typeof m.context.timezone, 'string');
    assert.equal(m.context.consent, undefined, 'no consent known yet');
    assert.equal(c.queued(), 0);
  });

  test('identify, page, alias and group', async () => {
    start();
    const c = make();
    const anon = c.anonymousId();
    c.page('Home', { section: 'top' });
    c.identify('u-1', { email: 'ann@example.com' });
    c.alias('u-2');
    c.group('acme', { plan: 'pro' });
    c.identify({ first_name: 'Ann' });
    await c.flush();
    const [page, identify, alias, group, traitsOnly] = env.fetch.messages;
    assert.equal(page.type, 'page');
    assert.equal(page.name, 'Home');
    assert.equal(page.properties.name, 'Home');
    assert.equal(page.properties.section, 'top');
    assert.equal(page.properties.path, '/products/p1');
    assert.equal(page.userId, undefined);
    assert.equal(identify.type, 'identify');
    assert.equal(identify.userId, 'u-1');
    assert.equal(identify.anonymousId, anon);
    assert.deepEqual(identify.traits, { email: 'ann@example.com' });
    assert.equal(alias.type, 'alias');
    assert.equal(alias.userId, 'u-2');
    assert.equal(alias.previousId, 'u-1');
    assert.equal(group.type, 'group');
    assert.equal(group.groupId, 'acme');
    assert.equal(group.userId, 'u-1');
    assert.deepEqual(group.traits, { plan: 'pro' });
    assert.equal(traitsOnly.userId, 'u-1');
    assert.deepEqual(traitsOnly.traits, { first_name: 'Ann' });
    assert.equal(c.userId(), 'u-1');
  });

  test('messages over 32 KB are dropped with a warning', async () => {
    start();
    const c = make();
    assert.equal(c.track('Big', { blob: 'x'.repeat(40 * 1024) }), null);
    assert.equal(c.queued(), 0);
    assert.match(env.warnings.join('\n'), /over the 32 KB limit/);
  });

  test('the library version is package.json\'s', () => {
    const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'));
    assert.equal(sdk.VERSION, pkg.version);
    assert.equal(sdk.LIBRARY_NAME, 'chorus-web');
  });

  test('no runtime dependencies: dist imports only its own modules', () => {
    const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'));
    assert.equal(pkg.dependencies, undefined);
    const dist = new URL('../dist/', import.meta.url);
    const files = readdirSync(dist).filter((f) => f.endsWith('.js'));
    assert.ok(files.includes('chorus.js'));
    for (const f of files) {
      const src = readFileSync(new URL(f, dist), 'utf8')
        .replace(/\/\*[\s\S]*?\*\//g, '')
        .replace(/^\s*\/\/.*$/gm, '');
      for (const [, spec] of src.matchAll(/(?:import|export)[^'"]*?from\s*['"]([^'"]+)['"]/g)) {
        assert.match(spec, /^\.\/[\w-]+\.js$/, `${f} imports ${spec}`);
        assert.ok(files.includes(spec.slice(2)), `${f} imports missing ${spec}`);
      }
    }
  });

  test('the default singleton acts on the client init made', async () => {
    start();
    assert.throws(() => sdk.track('x'), /init/);
    const c = sdk.init({ writeKey: WRITE_KEY, host: HOST + '/' });
    clients.push(c);
    assert.equal(sdk.client(), c);
    assert.match(sdk.default.track('Thing'), UUID);
    assert.equal(c.queued(), 1);
    await sdk.flush();
    assert.equal(env.fetch.calls[0].url, HOST + '/v1/batch', 'trailing slash of host trimmed');
    assert.equal(sdk.anonymousId(), c.anonymousId());
  });
});

describe('batching', () => {
  test('sends when flushAt messages are queued', async () => {
    start();
    const c = make({ flushAt: 3, flushInterval: 60000 });
    c.track('a');
    c.track('b');
    await sleep(20);
    assert.equal(env.fetch.calls.length, 0);
    c.track('c');
    await until(() => env.fetch.calls.length === 1, 1000, 'a batch');
    assert.deepEqual(env.fetch.calls[0].json.batch.map((m) => m.event), ['a', 'b', 'c']);
    await until(() => c.queued() === 0, 1000, 'an empty queue');
  });

  test('sends flushInterval ms after the first message, all together', async () => {
    start();
    const c = make({ flushAt: 100, flushInterval: 50 });
    const t0 = Date.now();
    c.track('a');
    c.track('b');
    await sleep(20);
    assert.equal(env.fetch.calls.length, 0);
    await until(() => env.fetch.calls.length === 1, 1000, 'the interval flush');
    assert.ok(env.fetch.calls[0].at - t0 >= 45);
    assert.equal(env.fetch.calls[0].json.batch.length, 2);
  });

  test('large queues go in batches of at most 100 messages, in order', async () => {
    start();
    const c = make({ flushAt: 1000, flushInterval: 60000 });
    for (let i = 0; i < 250; i++) c.track('e' + i);
    await c.flush();
    assert.deepEqual(env.fetch.batches.map((b) => b.json.batch.length), [100, 100, 50]);
    assert.deepEqual(env.fetch.messages.map((m) => m.event), Array.from({ length: 250 }, (_, i) => 'e' + i));
  });

  test('chunk keeps bodies under the byte limit', () => {
    const msgs = Array.from({ length: 30 }, (_, i) => ({ messageId: 'm' + i, type: 'track', blob: 'y'.repeat(5000) }));
    const chunks = chunk(msgs, WRITE_KEY, MAX_KEEPALIVE_BYTES, 100);
    assert.ok(chunks.length >= 3);
    assert.deepEqual(chunks.flat().map((m) => m.messageId), msgs.map((m) => m.messageId));
    for (const c of chunks) assert.ok(Buffer.byteLength(batchBody(c, WRITE_KEY)) <= MAX_KEEPALIVE_BYTES);
  });
});

describe('retry and backoff', () => {
  test('the backoff schedule doubles from base up to max, jittered downwards', () => {
    const opts = { base: 1000, max: 60000, jitter: 0.5 };
    const hi = [1, 2, 3, 4, 5, 6, 7, 8, 20].map((n) => backoffDelay(n, opts, () => 0.999999));
    const lo = [1, 2, 3, 4, 5, 6, 7, 8, 20].map((n) => backoffDelay(n, opts, () => 0));
    assert.deepEqual(hi, [1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]);
    assert.deepEqual(lo, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
    assert.equal(backoffDelay(1000, opts, () => 1), 60000, 'no overflow');
    assert.deepEqual(DEFAULT_BACKOFF, opts);
    for (let i = 0; i < 100; i++) {
      const d = backoffDelay(3, opts);
      assert.ok(d >= 2000 && d <= 4000);
    }
  });

  test('Retry-After and what is retried', () => {
    assert.equal(parseRetryAfter('3'), 3000);
    assert.equal(parseRetryAfter(new Date(10_000).toUTCString(), 4_000), 6000);
    assert.equal(parseRetryAfter(null), null);
    assert.equal(parseRetryAfter('soon'), null);
    for (const s of [0, 429, 500, 502, 503]) assert.ok(isRetryable(s), String(s));
    for (const s of [400, 401, 403, 404, 413]) assert.ok(!isRetryable(s), String(s));
  });

  test('network errors, 5xx and 429 are retried with growing delays and the same messageIds', async () => {
    start();
    const answers = [
      () => {
        throw new TypeError('Failed to fetch');
      },
      () => ({ status: 503, body: { code: 'broker_unavailable', message: 'down' } }),
      () => ({ status: 429, body: { code: 'rate_limited' } }),
      () => ({ status: 200, body: { success: true } }),
    ];
    env.fetch.respond = () => answers.shift()();
    const c = make({ flushAt: 1, backoff: { base: 40, max: 1000, jitter: 0 } });
    const id = c.track('Product Viewed', { product_id: 'p1' });
    await until(() => env.fetch.calls.length === 4, 3000, 'four attempts');
    await until(() => c.queued() === 0, 1000, 'an empty queue');
    const ids = env.fetch.calls.map((call) => call.json.batch.map((m) => m.messageId).join());
    assert.deepEqual(ids, [id, id, id, id]);
    const gaps = env.fetch.calls.slice(1).map((call, i) => call.at - env.fetch.calls[i].at);
    // 40, 80, 160 ms (jitter 0), allowing for timer slack.
    assert.ok(gaps[0] >= 35 && gaps[0] < 200, `gap 1 ${gaps[0]}`);
    assert.ok(gaps[1] >= 75 && gaps[1] < 300, `gap 2 ${gaps[1]}`);
    assert.ok(gaps[2] >= 155 && gaps[2] < 500, `gap 3 ${gaps[2]}`);
    await sleep(100);
    assert.equal(env.fetch.calls.length, 4, 'nothing more once sent');
  });

  test('Retry-After makes the client wait at least that long', async () => {
    start();
    let n = 0;
    env.fetch.respond = () => (n++ === 0 ? { status: 429, headers: { 'Retry-After': '0.3' } } : { status: 200, body: {} });
    const c = make({ flushAt: 1 });
    c.track('a');
    await until(() => env.fetch.calls.length === 2, 2000, 'the retry');
    assert.ok(env.fetch.calls[1].at - env.fetch.calls[0].at >= 290);
  });

  test('other 4xx answers drop the batch with a warning that does not show the write key', async () => {
    start();
    env.fetch.respond = () => ({ status: 400, body: { code: 'invalid_event', message: 'batch[0]: bad' } });
    const c = make({ flushAt: 1 });
    c.track('a');
    await until(() => env.fetch.calls.length === 1, 1000, 'the send');
    await until(() => c.queued() === 0, 1000, 'the drop');
    await sleep(80);
    assert.equal(env.fetch.calls.length, 1, 'not retried');
    const text = env.warnings.join('\n');
    assert.match(text, /dropped 1 message\(s\): HTTP 400 invalid_event/);
    assert.ok(!text.includes(WRITE_KEY));
  });

  test('an explicit flush retries at once; coming back online too', async () => {
    start();
    let up = false;
    env.fetch.respond = () => {
      if (!up) throw new TypeError('offline');
      return { status: 200, body: {} };
    };
    const c = make({ flushAt: 1, backoff: { base: 60000, max: 60000 } });
    c.track('a');
    await until(() => env.fetch.calls.length === 1, 1000, 'the first attempt');
    await sleep(10);
    up = true;
    await c.flush();
    assert.equal(env.fetch.calls.length, 2);
    assert.equal(c.queued(), 0);
    up = false;
    c.track('b');
    await until(() => env.fetch.calls.length === 3, 1000, 'the attempt of b');
    await sleep(10);
    up = true;
    env.win.dispatch('online');
    await until(() => c.queued() === 0, 1000, 'the online flush');
    assert.equal(env.fetch.calls.length, 4);
  });
});

describe('offline queue', () => {
  test('undelivered messages persist in localStorage and are sent after a reload, once', async () => {
    start();
    env.fetch.respond = () => {
      throw new TypeError('Failed to fetch');
    };
    const c = make({ flushAt: 1, backoff: { base: 60000, max: 60000 } });
    const a = c.track('Product Viewed', { product_id: 'p1' });
    const b = c.track('Product Added', { product_id: 'p2' });
    await until(() => env.fetch.calls.length >= 1, 1000, 'a failed attempt');
    await sleep(20);
    assert.deepEqual(queueKeys(env.storage).length, 1);
    assert.deepEqual(queued(env.storage).map((m) => m.messageId), [a, b]);

    const fetch = new FakeFetch();
    const c2 = reload({}, fetch);
    await until(() => fetch.calls.length === 1, 1000, 'the send after reload');
    await until(() => c2.queued() === 0, 1000, 'an empty queue');
    assert.deepEqual(fetch.messages.map((m) => m.messageId), [a, b], 'original messageIds, in order');
    assert.deepEqual(queueKeys(env.storage), []);
    await sleep(50);
    assert.equal(fetch.calls.length, 1, 'sent once');
  });

  test('the queue is bounded by maxQueue, dropping the oldest', async () => {
    start();
    env.fetch.respond = () => {
      throw new TypeError('Failed to fetch');
    };
    const c = make({ maxQueue: 3, flushInterval: 60000, flushAt: 100 });
    for (const e of ['a', 'b', 'c', 'd', 'e']) c.track(e);
    assert.deepEqual(queued(env.storage).map((m) => m.event), ['c', 'd', 'e']);
    assert.match(env.warnings.join('\n'), /queue full/);
  });

  test('when storage is full the oldest are dropped until the queue fits', async () => {
    start({}, { storage: new FakeStorage({ quota: 6000 }) });
    const c = make({ flushInterval: 60000, flushAt: 100 });
    for (let i = 0; i < 20; i++) c.track('e' + i, { pad: 'z'.repeat(200) });
    const kept = queued(env.storage).map((m) => m.event);
    assert.ok(kept.length > 0 && kept.length < 20, `kept ${kept.length}`);
    assert.equal(kept[kept.length - 1], 'e19', 'the newest is kept');
  });

  test('without localStorage the queue lives in memory', async () => {
    start();
    Object.defineProperty(globalThis, 'localStorage', {
      configurable: true,
      get() {
        throw new Error('SecurityError');
      },
    });
    const c = make({ flushInterval: 60000, flushAt: 100 });
    c.track('a');
    assert.equal(c.queued(), 1);
    await c.flush();
    assert.equal(env.fetch.messages.length, 1);
    assert.equal(c.queued(), 0);
  });

  test('pagehide sends the queue with keepalive fetches under 64 KB each', async () => {
    start();
    const c = make({ flushAt: 1000, flushInterval: 60000 });
    const ids = [];
    for (let i = 0; i < 40; i++) ids.push(c.track('e' + i, { pad: 'p'.repeat(3000) }));
    env.win.dispatch('pagehide', { persisted: false });
    assert.ok(env.fetch.calls.length >= 2, `${env.fetch.calls.length} requests`);
    for (const call of env.fetch.calls) {
      assert.equal(call.options.keepalive, true);
      assert.ok(Buffer.byteLength(call.options.body) <= 64 * 1024);
    }
    assert.deepEqual(env.fetch.messages.map((m) => m.messageId), ids);
    await until(() => c.queued() === 0, 1000, 'confirmation');
    // A second pagehide sends nothing more.
    env.win.dispatch('pagehide', {});
    await sleep(10);
    assert.equal(env.fetch.messages.length, 40);
  });

  test('visibilitychange to hidden flushes too; an unconfirmed exit send is resent on the next load', async () => {
    start();
    let answer;
    env.fetch.respond = () => new Promise((r) => (answer = r)); // the page goes away before the answer
    const c = make({ flushAt: 1000, flushInterval: 60000 });
    const id = c.track('a');
    env.doc.visibilityState = 'hidden';
    env.doc.dispatch('visibilitychange');
    assert.equal(env.fetch.calls.length, 1);
    assert.equal(env.fetch.calls[0].options.keepalive, true);
    env.doc.dispatch('visibilitychange');
    env.win.dispatch('pagehide');
    assert.equal(env.fetch.calls.length, 1, 'a message in a keepalive request is not sent twice');
    assert.deepEqual(queued(env.storage).map((m) => m.messageId), [id], 'kept until confirmed');
    const fetch = new FakeFetch();
    reload({}, fetch);
    await until(() => fetch.messages.length === 1, 1000, 'the resend');
    assert.equal(fetch.messages[0].messageId, id, 'same messageId: the server deduplicates');
    answer({ status: 200, body: {} });
  });
});

describe('consent', () => {
  test('with consent required, messages are held (persisted) until setConsent grants', async () => {
    start();
    const c = make({ flushAt: 1, consent: { required: true } });
    const a = c.track('a');
    c.page();
    await c.flush();
    await sleep(20);
    assert.equal(env.fetch.calls.length, 0, 'held');
    assert.equal(queued(env.storage).length, 2, 'held in the persisted queue');
    env.win.dispatch('pagehide');
    assert.equal(env.fetch.calls.length, 0, 'not even at exit');

    // Still held after a reload.
    const c2 = reload({ flushAt: 1, consent: { required: true } });
    await sleep(20);
    assert.equal(env.fetch.calls.length, 0);
    c2.setConsent({ analytics: true, advertising: false });
    await until(() => c2.queued() === 0, 1000, 'the release');
    const msgs = env.fetch.messages;
    assert.equal(msgs.length, 2);
    assert.equal(msgs[0].messageId, a);
    for (const m of msgs) assert.deepEqual(m.context.consent, { categoryPreferences: { analytics: true, advertising: false } });
    c2.track('b');
    await until(() => env.fetch.messages.length === 3 && c2.queued() === 0, 1000, 'b');
    assert.deepEqual(env.fetch.messages[2].context.consent.categoryPreferences, { analytics: true, advertising: false });
    // The grant is remembered by the next page.
    const fetch = new FakeFetch();
    const c3 = reload({ flushAt: 1, consent: { required: true } }, fetch);
    c3.track('c');
    await until(() => fetch.messages.length === 1, 1000, 'c');
    assert.deepEqual(c3.consentPreferences(), { analytics: true, advertising: false });
  });

  test('a refusal discards held messages and drops later calls', async () => {
    start();
    const c = make({ flushAt: 1, consent: { required: true, categories: ['analytics'] } });
    c.track('a');
    c.setConsent({ marketing: true, analytics: false });
    assert.equal(c.queued(), 0);
    assert.equal(c.track('b'), null);
    await c.flush();
    assert.equal(env.fetch.calls.length, 0);
    c.setConsent({ analytics: true });
    c.track('c');
    await until(() => env.fetch.messages.length === 1, 1000, 'c');
    assert.equal(env.fetch.messages[0].event, 'c');
  });

  test('without consent required, messages flow and carry consent once it is known', async () => {
    start();
    const c = make({ flushAt: 1 });
    c.track('a');
    await until(() => env.fetch.messages.length === 1, 1000, 'a');
    assert.equal(env.fetch.messages[0].context.consent, undefined);
    c.setConsent({ analytics: false });
    c.track('b');
    await until(() => env.fetch.messages.length === 2, 1000, 'b');
    assert.deepEqual(env.fetch.messages[1].context.consent, { categoryPreferences: { analytics: false } });
  });
});

describe('identity', () => {
  test('a new visitor gets a uuid in cookie and localStorage (JSON-quoted)', () => {
    start();
    const c = make();
    const id = c.anonymousId();
    assert.match(id, UUID);
    assert.equal(env.cookies.values.get('ajs_anonymous_id'), id);
    assert.equal(env.storage.getItem('ajs_anonymous_id'), JSON.stringify(id));
    const write = env.cookies.writes.find((w) => w.startsWith('ajs_anonymous_id='));
    assert.match(write, /; path=\/;/);
    assert.match(write, /max-age=31536000/);
    assert.match(write, /SameSite=Lax/);
    assert.match(write, /; Secure$/, 'https page: Secure');
  });

  for (const [what, setup, expected] of [
    ['a bare cookie (analytics.js next)', (e) => e.cookies.set('ajs_anonymous_id=abc-123'), 'abc-123'],
    ['a JSON-quoted, URL-encoded cookie (classic analytics.js)', (e) => e.cookies.set('ajs_anonymous_id=%22q-456%22'), 'q-456'],
    ['a JSON-quoted localStorage value', (e) => e.storage.setItem('ajs_anonymous_id', '"xyz-789"'), 'xyz-789'],
    ['a bare localStorage value', (e) => e.storage.setItem('ajs_anonymous_id', 'bare-1'), 'bare-1'],
  ]) {
    test(`adopts ${what}`, async () => {
      start();
      setup(env);
      const c = make({ flushAt: 1 });
      assert.equal(c.anonymousId(), expected);
      assert.equal(env.cookies.values.get('ajs_anonymous_id'), expected, 'cookie written bare');
      assert.equal(env.storage.getItem('ajs_anonymous_id'), JSON.stringify(expected));
      c.track('a');
      await until(() => env.fetch.messages.length === 1, 1000, 'a');
      assert.equal(env.fetch.messages[0].anonymousId, expected);
    });
  }

  test('the cookie wins over localStorage; "null" counts as absent', () => {
    assert.equal(parseStoredId('"null"'), null);
    assert.equal(parseStoredId('null'), null);
    assert.equal(parseStoredId(''), null);
    assert.equal(parseStoredId('" spaced "'), 'spaced');
    start();
    env.cookies.set('ajs_anonymous_id=from-cookie');
    env.storage.setItem('ajs_anonymous_id', '"from-storage"');
    assert.equal(make().anonymousId(), 'from-cookie');
  });

  test('userId persists (ajs_user_id) across reloads; reset forgets it and starts a new anonymous id', () => {
    start();
    env.storage.setItem('ajs_user_id', '"legacy-user"');
    let c = make();
    assert.equal(c.userId(), 'legacy-user', 'adopted from analytics.js');
    c.identify('u-9', { email: 'x@example.com' });
    assert.equal(env.cookies.values.get('ajs_user_id'), 'u-9');
    const anon = c.anonymousId();
    c = reload();
    assert.equal(c.userId(), 'u-9');
    assert.equal(c.anonymousId(), anon);
    c.reset();
    assert.equal(c.userId(), null);
    assert.notEqual(c.anonymousId(), anon);
    assert.equal(env.cookies.values.has('ajs_user_id'), false);
    assert.equal(env.storage.getItem('ajs_user_id'), null);
  });
});

describe('reads', () => {
  test('anonymous visitors read with the write key (Basic) by anonymous_id', async () => {
    start();
    env.cookies.set('ajs_anonymous_id=anon-1');
    env.fetch.respond = () => ({ status: 200, body: { session: { page_views: 1 }, cart: { items: [] } } });
    const c = make();
    const ctx = await c.getContext();
    assert.deepEqual(ctx, { session: { page_views: 1 }, cart: { items: [] } });
    const call = env.fetch.calls[0];
    assert.equal(call.url, HOST + '/v1/context/anonymous_id:anon-1');
    assert.equal(call.options.method, 'GET');
    assert.equal(call.options.headers.Authorization, 'Basic ' + Buffer.from(WRITE_KEY + ':').toString('base64'));
    await c.getRecommendations();
    assert.equal(env.fetch.calls[1].url, HOST + '/v1/recommendations/anonymous_id:anon-1');
  });

  test('with a visitor token (string or provider) reads go to /me with Bearer', async () => {
    start();
    env.fetch.respond = () => ({ status: 200, body: { items: [] } });
    const c = make({ visitorToken: 'vt_1' });
    await c.getRecommendations();
    assert.equal(env.fetch.calls[0].url, HOST + '/v1/recommendations/me');
    assert.equal(env.fetch.calls[0].options.headers.Authorization, 'Bearer vt_1');
    let asked = 0;
    c.setVisitorToken(async () => 'vt_' + ++asked);
    await c.getContext();
    await c.getContext();
    assert.deepEqual(env.fetch.calls.slice(1).map((x) => x.options.headers.Authorization), ['Bearer vt_1', 'Bearer vt_2']);
    assert.equal(env.fetch.calls[1].url, HOST + '/v1/context/me');
    c.setVisitorToken(async () => null);
    await c.getContext();
    assert.match(env.fetch.calls[3].url, /\/v1\/context\/anonymous_id:/, 'no token: anonymous read');
    c.setVisitorToken(async () => {
      throw new Error('backend down');
    });
    await assert.rejects(c.getContext(), (e) => e.code === 'token_provider_failed' && e.status === 0);
  });

  test('non-2xx reads throw a ChorusError with status and code', async () => {
    start();
    env.fetch.respond = () => ({ status: 403, body: { error: { code: 'token_required', message: 'linked to a customer' } } });
    const c = make();
    await assert.rejects(c.getContext(), (e) => {
      assert.ok(e instanceof sdk.ChorusError);
      assert.equal(e.status, 403);
      assert.equal(e.code, 'token_required');
      assert.match(e.message, /403 token_required: linked to a customer/);
      return true;
    });
    env.fetch.respond = () => ({ status: 502, body: 'Bad gateway' });
    await assert.rejects(c.getRecommendations(), (e) => e.status === 502 && e.code === 'http_502');
    env.fetch.respond = () => {
      throw new TypeError('Failed to fetch');
    };
    await assert.rejects(c.getContext(), (e) => e.status === 0 && e.code === 'network_error');
  });
});

describe('lifecycle', () => {
  test('close removes the listeners', () => {
    start();
    const c = make();
    assert.equal(env.win.count('pagehide'), 1);
    assert.equal(env.doc.count('visibilitychange'), 1);
    c.close();
    assert.equal(env.win.count('pagehide'), 0);
    assert.equal(env.doc.count('visibilitychange'), 0);
  });

  test('init rejects bad options', () => {
    start();
    assert.throws(() => new sdk.ChorusClient({ host: HOST }), /writeKey/);
    assert.throws(() => new sdk.ChorusClient({ writeKey: 'k', host: 'chorus.example' }), /host/);
  });
});
