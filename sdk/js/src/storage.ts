/**
 * Persistence: localStorage (with an in-memory fallback when it is missing,
 * disabled or full) and first-party cookies.
 *
 * Identity keys are the ones Segment's analytics.js uses, so a site moving from
 * analytics.js keeps its visitors' ids:
 *   - cookie `ajs_anonymous_id` / `ajs_user_id`: analytics.js (v2, "next") writes the bare
 *     value, the classic analytics.js wrote it JSON-quoted and URL-encoded (`%22abc%22`);
 *   - localStorage `ajs_anonymous_id` / `ajs_user_id`: JSON-encoded (`"abc"`).
 * Both spellings are read; this SDK writes the cookie bare and localStorage JSON-quoted.
 * The SDK's own keys are prefixed `chorus:`.
 */
import { g } from './util.js';

/** A string key/value store. */
export interface KV {
  /** True when values survive a reload (localStorage works). */
  readonly persistent: boolean;
  get(key: string): string | null;
  /** False when the value could not be stored (e.g. the quota is exceeded). */
  set(key: string, value: string): boolean;
  remove(key: string): void;
}

class MemoryKV implements KV {
  readonly persistent = false;
  private data = new Map<string, string>();
  get(key: string): string | null {
    const v = this.data.get(key);
    return v === undefined ? null : v;
  }
  set(key: string, value: string): boolean {
    this.data.set(key, value);
    return true;
  }
  remove(key: string): void {
    this.data.delete(key);
  }
}

class LocalStorageKV implements KV {
  readonly persistent = true;
  constructor(private ls: Storage) {}
  get(key: string): string | null {
    try {
      return this.ls.getItem(key);
    } catch {
      return null;
    }
  }
  set(key: string, value: string): boolean {
    try {
      this.ls.setItem(key, value);
      return true;
    } catch {
      return false;
    }
  }
  remove(key: string): void {
    try {
      this.ls.removeItem(key);
    } catch {
      // nothing to do
    }
  }
}

/** localStorage when it can be written, otherwise memory (lost on reload). */
export function createKV(): KV {
  try {
    const ls = g.localStorage as Storage | undefined;
    if (ls) {
      const probe = 'chorus:probe';
      ls.setItem(probe, '1');
      ls.removeItem(probe);
      return new LocalStorageKV(ls);
    }
  } catch {
    // Access denied (sandboxed iframe, blocked third-party storage...).
  }
  return new MemoryKV();
}

/** The value of cookie `name` (URL-decoded), or null. */
export function readCookie(name: string): string | null {
  const doc = g.document;
  if (!doc) return null;
  let all = '';
  try {
    all = String(doc.cookie || '');
  } catch {
    return null;
  }
  for (const part of all.split(';')) {
    const eq = part.indexOf('=');
    if (eq < 0) continue;
    if (part.slice(0, eq).trim() !== name) continue;
    const raw = part.slice(eq + 1).trim();
    try {
      return decodeURIComponent(raw);
    } catch {
      return raw;
    }
  }
  return null;
}

const YEAR_SECONDS = 365 * 24 * 60 * 60;

/** Set a first-party cookie: path /, SameSite=Lax, Secure on https, for `maxAge` seconds. */
export function writeCookie(name: string, value: string, maxAge = YEAR_SECONDS): void {
  const doc = g.document;
  if (!doc) return;
  const expires = new Date(Date.now() + maxAge * 1000).toUTCString();
  const secure = g.location && g.location.protocol === 'https:' ? '; Secure' : '';
  try {
    doc.cookie =
      name + '=' + encodeURIComponent(value) + '; path=/; max-age=' + maxAge + '; expires=' + expires +
      '; SameSite=Lax' + secure;
  } catch {
    // cookies disabled
  }
}

export function removeCookie(name: string): void {
  const doc = g.document;
  if (!doc) return;
  try {
    doc.cookie = name + '=; path=/; max-age=0; expires=Thu, 01 Jan 1970 00:00:00 GMT; SameSite=Lax';
  } catch {
    // cookies disabled
  }
}

/**
 * An id as analytics.js may have stored it: bare (`abc`) or JSON-quoted (`"abc"`).
 * Empty values and the strings "null"/"undefined" count as absent.
 */
export function parseStoredId(raw: string | null | undefined): string | null {
  if (raw === null || raw === undefined) return null;
  let v = String(raw).trim();
  if (v.length >= 2 && v.charAt(0) === '"' && v.charAt(v.length - 1) === '"') {
    try {
      const parsed = JSON.parse(v);
      v = typeof parsed === 'string' ? parsed.trim() : '';
    } catch {
      v = v.slice(1, -1).trim();
    }
  }
  if (v === '' || v === 'null' || v === 'undefined') return null;
  return v;
}

/**
 * An identity value kept in a cookie and in localStorage under the same name.
 * Reads prefer the cookie, then localStorage, then the in-memory copy.
 */
export class PersistedId {
  private memory: string | null = null;
  constructor(private kv: KV, readonly name: string) {}

  read(): string | null {
    const fromCookie = parseStoredId(readCookie(this.name));
    if (fromCookie) return (this.memory = fromCookie);
    const fromStorage = parseStoredId(this.kv.get(this.name));
    if (fromStorage) return (this.memory = fromStorage);
    return this.memory;
  }

  write(value: string): void {
    this.memory = value;
    writeCookie(this.name, value);
    this.kv.set(this.name, JSON.stringify(value));
  }

  clear(): void {
    this.memory = null;
    removeCookie(this.name);
    this.kv.remove(this.name);
  }
}
