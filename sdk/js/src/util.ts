/** Small dependency-free helpers shared by the SDK's modules. */

// The browser globals the SDK touches, read lazily so that the module can be
// imported where they do not exist (server-side rendering, Node tests).
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export const g: any = globalThis;

/** A random UUID v4: crypto.randomUUID, else getRandomValues, else Math.random. */
export function uuid(): string {
  const c = g.crypto;
  if (c && typeof c.randomUUID === 'function') {
    try {
      return c.randomUUID();
    } catch {
      // randomUUID exists but throws outside secure contexts in some browsers.
    }
  }
  const bytes = new Uint8Array(16);
  if (c && typeof c.getRandomValues === 'function') {
    c.getRandomValues(bytes);
  } else {
    for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
  }
  bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
  bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
  const hex: string[] = [];
  for (let i = 0; i < 16; i++) hex.push((bytes[i] + 0x100).toString(16).slice(1));
  return (
    hex.slice(0, 4).join('') + '-' + hex.slice(4, 6).join('') + '-' + hex.slice(6, 8).join('') + '-' +
    hex.slice(8, 10).join('') + '-' + hex.slice(10, 16).join('')
  );
}

/** The UTF-8 bytes of a string. */
export function utf8(s: string): Uint8Array {
  if (typeof g.TextEncoder === 'function') return new g.TextEncoder().encode(s);
  const bin = unescape(encodeURIComponent(s));
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** How many bytes a string takes in UTF-8 (what the server's size limits count). */
export function byteLength(s: string): number {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      n += 4; // a surrogate pair
      i++;
    } else n += 3;
  }
  return n;
}

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';

/** Standard base64 of a string's UTF-8 bytes (what HTTP Basic auth carries). */
export function base64(s: string): string {
  const bytes = utf8(s);
  let out = '';
  for (let i = 0; i < bytes.length; i += 3) {
    const a = bytes[i];
    const b = i + 1 < bytes.length ? bytes[i + 1] : 0;
    const c = i + 2 < bytes.length ? bytes[i + 2] : 0;
    const n = (a << 16) | (b << 8) | c;
    out += B64[(n >> 18) & 63] + B64[(n >> 12) & 63];
    out += i + 1 < bytes.length ? B64[(n >> 6) & 63] : '=';
    out += i + 2 < bytes.length ? B64[n & 63] : '=';
  }
  return out;
}

/** FNV-1a (32 bit) as 8 hex digits: a short, stable name for a host + write key. */
export function fnv1a(s: string): string {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return ('0000000' + h.toString(16)).slice(-8);
}

/** console.warn with the SDK's prefix; never pass it the write key. */
export function warn(message: string): void {
  const con = g.console;
  if (con && typeof con.warn === 'function') con.warn('[chorus] ' + message);
}

/** setTimeout that does not keep a Node process alive (a no-op difference in browsers). */
export function timer(fn: () => void, ms: number): ReturnType<typeof setTimeout> {
  const t = setTimeout(fn, ms);
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  const anyT = t as any;
  if (anyT && typeof anyT.unref === 'function') anyT.unref();
  return t;
}

export function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
