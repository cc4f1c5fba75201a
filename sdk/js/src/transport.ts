/**
 * Sending batches to chorus (Segment HTTP Tracking API, `POST {host}/v1/batch`).
 *
 * Body: `{"batch": [message, ...], "sentAt": ISO-8601, "writeKey": "..."}` sent as
 * `Content-Type: text/plain` with no Authorization header and no credentials. The
 * write key travels in the body (chorus accepts it there, as Segment does) so the
 * POST is a CORS "simple request": no preflight round trip, and `keepalive` fetches
 * at page exit work (Chromium refuses keepalive requests that need a preflight).
 *
 * Server limits (the contract): 32 KB per message, 500 KB per batch body, 2,500
 * messages per batch. The SDK drops single messages over 32 KB when they are made and
 * cuts batches well under the body limit; a `keepalive` body must stay under 64 KB
 * (browsers refuse more in flight per page), so exit-time sends are cut smaller.
 */
import type { Message } from './queue.js';
import { isRetryable, parseRetryAfter } from './backoff.js';
import { byteLength, g } from './util.js';

/** Largest message the server accepts (32 KB). */
export const MAX_MESSAGE_BYTES = 32 * 1024;
/** Largest batch body the SDK sends with an ordinary fetch (server limit 500 KB). */
export const MAX_BATCH_BYTES = 450 * 1024;
/** Most messages the SDK puts in one batch (server limit 2,500). */
export const MAX_BATCH_MESSAGES = 100;
/** Largest batch body sent with `keepalive` (browsers allow 64 KB in flight per page). */
export const MAX_KEEPALIVE_BYTES = 60 * 1024;

/** What a send came to. `status` 0 means the request failed (network, CORS, abort). */
export interface SendResult {
  ok: boolean;
  status: number;
  retryable: boolean;
  /** From a `Retry-After` header, in ms. */
  retryAfterMs: number | null;
  /** The server's error code (`{"code"}` or `{"error":{"code"}}`), when it gave one. */
  code: string | null;
  message: string | null;
}

/** The body sent for `batch`. */
export function batchBody(batch: Message[], writeKey: string, sentAt: string = new Date().toISOString()): string {
  return JSON.stringify({ batch, sentAt, writeKey });
}

/** Bytes the envelope of a batch body adds to its messages (with margin). */
function envelopeBytes(writeKey: string): number {
  return byteLength(batchBody([], writeKey, new Date().toISOString())) + 16;
}

/**
 * Cut `messages` (in order) into batches whose bodies stay under `maxBytes` and that
 * hold at most `maxCount` messages each.
 */
export function chunk(messages: Message[], writeKey: string, maxBytes: number, maxCount: number): Message[][] {
  const out: Message[][] = [];
  const base = envelopeBytes(writeKey);
  let current: Message[] = [];
  let size = base;
  for (const m of messages) {
    const bytes = byteLength(JSON.stringify(m)) + 1; // the comma
    if (current.length > 0 && (size + bytes > maxBytes || current.length >= maxCount)) {
      out.push(current);
      current = [];
      size = base;
    }
    current.push(m);
    size += bytes;
  }
  if (current.length) out.push(current);
  return out;
}

/** POST one batch. Never throws: failures come back as a SendResult. */
export async function postBatch(host: string, writeKey: string, batch: Message[], keepalive: boolean): Promise<SendResult> {
  const fetchFn = g.fetch;
  if (typeof fetchFn !== 'function') {
    return { ok: false, status: 0, retryable: true, retryAfterMs: null, code: 'no_fetch', message: 'fetch is not available' };
  }
  let response: Response;
  try {
    response = await fetchFn(host + '/v1/batch', {
      method: 'POST',
      headers: { 'Content-Type': 'text/plain' },
      body: batchBody(batch, writeKey),
      keepalive,
      credentials: 'omit',
      mode: 'cors',
    });
  } catch (e) {
    return {
      ok: false,
      status: 0,
      retryable: true,
      retryAfterMs: null,
      code: 'network_error',
      message: e instanceof Error ? e.message : String(e),
    };
  }
  const status = response.status;
  if (status >= 200 && status < 300) {
    return { ok: true, status, retryable: false, retryAfterMs: null, code: null, message: null };
  }
  const { code, message } = await errorOf(response);
  let retryAfter: string | null = null;
  try {
    retryAfter = response.headers && response.headers.get('Retry-After');
  } catch {
    // no headers
  }
  return { ok: false, status, retryable: isRetryable(status), retryAfterMs: parseRetryAfter(retryAfter), code, message };
}

/** The code and message of a chorus error body: `{"code","message"}` or `{"error":{"code","message"}}`. */
export async function errorOf(response: Response): Promise<{ code: string | null; message: string | null; body: unknown }> {
  let body: unknown = null;
  try {
    const text = await response.text();
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  const b: any = body;
  const err = b && typeof b === 'object' ? (b.error && typeof b.error === 'object' ? b.error : b) : null;
  const code = err && typeof err.code === 'string' ? err.code : null;
  const message = err && typeof err.message === 'string' ? err.message : null;
  return { code, message, body };
}
