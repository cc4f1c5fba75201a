/**
 * The retry schedule for failed sends (network errors, 5xx, 429).
 *
 * Attempt n (1-based) waits min(max, base * 2^(n-1)) scaled by a random factor in
 * [1 - jitter, 1]: with the defaults (base 1 s, max 60 s, jitter 0.5) attempt 1 waits
 * 0.5-1 s, attempt 2 1-2 s, attempt 3 2-4 s ... and from attempt 7 on 30-60 s.
 * A `Retry-After` answer (429/503) waits at least that long.
 */
export interface BackoffOptions {
  /** First delay in ms (default 1000). */
  base: number;
  /** Largest delay in ms (default 60000). */
  max: number;
  /** Fraction of the delay that is randomised, 0..1 (default 0.5). */
  jitter: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { base: 1000, max: 60000, jitter: 0.5 };

/** The wait in ms before retry `attempt` (1 = the first retry). `random` returns [0, 1). */
export function backoffDelay(
  attempt: number,
  options: BackoffOptions = DEFAULT_BACKOFF,
  random: () => number = Math.random,
): number {
  const n = Math.max(1, Math.floor(attempt));
  // 2^(n-1) overflows to Infinity for huge n; min() then caps it at max.
  const ceiling = Math.min(options.max, options.base * Math.pow(2, n - 1));
  const jitter = Math.min(1, Math.max(0, options.jitter));
  const r = Math.min(1, Math.max(0, random()));
  return Math.round(ceiling * (1 - jitter) + ceiling * jitter * r);
}

/** A `Retry-After` header (delta seconds or an HTTP date) in ms, or null. */
export function parseRetryAfter(value: string | null | undefined, now: number = Date.now()): number | null {
  if (!value) return null;
  const trimmed = value.trim();
  if (/^\d+(\.\d+)?$/.test(trimmed)) return Math.round(parseFloat(trimmed) * 1000);
  const at = Date.parse(trimmed);
  if (isNaN(at)) return null;
  return Math.max(0, at - now);
}

/** Whether a send that ended with `status` (0 = network error) is worth retrying. */
export function isRetryable(status: number): boolean {
  return status === 0 || status === 429 || status >= 500;
}
