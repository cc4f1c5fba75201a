// A fake browser for the unit tests: localStorage, document (cookies, events),
// window events, location, navigator and a scripted fetch. Installed on globalThis
// (the SDK reads those globals when it uses them) and removed again by uninstall().

export class FakeStorage {
  constructor({ quota = Infinity } = {}) {
    this.data = new Map();
    this.quota = quota; // characters, summed over keys and values
  }
  get length() {
    return this.data.size;
  }
  key(i) {
    return [...this.data.keys()][i] ?? null;
  }
  getItem(k) {
    return this.data.has(k) ? this.data.get(k) : null;
  }
  setItem(k, v) {
    v = String(v);
    let used = 0;
    for (const [key, value] of this.data) if (key !== k) used += key.length + value.length;
    if (used + k.length + v.length > this.quota) {
      const e = new Error('QuotaExceededError');
      e.name = 'QuotaExceededError';
      throw e;
    }
    this.data.set(k, v);
  }
  removeItem(k) {
    this.data.delete(k);
  }
  clear() {
    this.data.clear();
  }
}

class Events {
  constructor() {
    this.listeners = new Map();
  }
  addEventListener(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(fn);
  }
  removeEventListener(type, fn) {
    this.listeners.get(type)?.delete(fn);
  }
  dispatch(type, event = {}) {
    for (const fn of [...(this.listeners.get(type) ?? [])]) fn({ type, ...event });
  }
  count(type) {
    return this.listeners.get(type)?.size ?? 0;
  }
}

/** A cookie jar behind document.cookie: the setter takes one Set-Cookie-like string. */
export class CookieJar {
  constructor(initial = '') {
    this.values = new Map();
    this.writes = []; // every string assigned to document.cookie
    for (const part of initial.split(';')) {
      const eq = part.indexOf('=');
      if (eq > 0) this.values.set(part.slice(0, eq).trim(), part.slice(eq + 1).trim());
    }
  }
  get header() {
    return [...this.values].map(([k, v]) => `${k}=${v}`).join('; ');
  }
  set(str) {
    this.writes.push(str);
    const [pair, ...attrs] = str.split(';');
    const eq = pair.indexOf('=');
    const name = pair.slice(0, eq).trim();
    const value = pair.slice(eq + 1).trim();
    const maxAge = attrs.map((a) => a.trim()).find((a) => a.toLowerCase().startsWith('max-age='));
    if (maxAge && Number(maxAge.split('=')[1]) <= 0) this.values.delete(name);
    else this.values.set(name, value);
  }
}

/**
 * Scripted fetch: `respond(call)` returns {status, body, headers} or throws (network
 * error); the default answers 200 {"success": true}. Every call is recorded with its
 * url, options, parsed JSON body and time.
 */
export class FakeFetch {
  constructor() {
    this.calls = [];
    this.respond = () => ({ status: 200, body: { success: true } });
    this.fn = async (url, options = {}) => {
      let json = null;
      try {
        json = options.body ? JSON.parse(options.body) : null;
      } catch {
        json = null;
      }
      const call = { url, options, json, at: Date.now() };
      this.calls.push(call);
      const answer = await this.respond(call);
      const headers = new Map(Object.entries(answer.headers ?? {}).map(([k, v]) => [k.toLowerCase(), v]));
      const text = answer.body === undefined ? '' : typeof answer.body === 'string' ? answer.body : JSON.stringify(answer.body);
      return {
        status: answer.status,
        ok: answer.status >= 200 && answer.status < 300,
        headers: { get: (k) => headers.get(k.toLowerCase()) ?? null },
        text: async () => text,
        json: async () => JSON.parse(text),
      };
    };
  }
  /** The messages of every /v1/batch call, flattened. */
  get messages() {
    return this.calls.filter((c) => c.url.endsWith('/v1/batch')).flatMap((c) => c.json.batch);
  }
  get batches() {
    return this.calls.filter((c) => c.url.endsWith('/v1/batch'));
  }
}

const KEYS = ['localStorage', 'document', 'location', 'navigator', 'fetch', 'addEventListener', 'removeEventListener'];

/**
 * Install a fake browser on globalThis. `storage` and `cookies` can be shared across
 * installs to simulate a reload.
 */
export function install({
  href = 'https://shop.example/products/p1?utm_source=newsletter&utm_campaign=spring#reviews',
  title = 'Product p1',
  referrer = 'https://search.example/',
  storage = new FakeStorage(),
  cookies = new CookieJar(),
  fetch = new FakeFetch(),
} = {}) {
  const saved = {};
  for (const k of KEYS) saved[k] = Object.getOwnPropertyDescriptor(globalThis, k);
  const url = new URL(href);
  const win = new Events();
  const doc = new Events();
  doc.title = title;
  doc.referrer = referrer;
  doc.visibilityState = 'visible';
  Object.defineProperty(doc, 'cookie', {
    get: () => cookies.header,
    set: (v) => cookies.set(v),
  });
  const define = (k, value) => Object.defineProperty(globalThis, k, { value, configurable: true, writable: true });
  define('localStorage', storage);
  define('document', doc);
  define('location', { href, pathname: url.pathname, search: url.search, protocol: url.protocol, hash: url.hash });
  define('navigator', { userAgent: 'FakeBrowser/1.0', language: 'en-AU', languages: ['en-AU', 'en'] });
  define('fetch', fetch.fn);
  define('addEventListener', win.addEventListener.bind(win));
  define('removeEventListener', win.removeEventListener.bind(win));
  const warnings = [];
  const origWarn = console.warn;
  console.warn = (...args) => warnings.push(args.join(' '));
  return {
    storage,
    cookies,
    fetch,
    win,
    doc,
    warnings,
    uninstall() {
      console.warn = origWarn;
      for (const k of KEYS) {
        if (saved[k]) Object.defineProperty(globalThis, k, saved[k]);
        else delete globalThis[k];
      }
    },
  };
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Wait until `cond()` is true (polling every 5 ms), or fail after `ms`. */
export async function until(cond, ms = 2000, what = 'condition') {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}
