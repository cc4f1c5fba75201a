/**
 * The chorus web client: Segment analytics.js-compatible tracking calls, a persisted
 * offline queue with batching and retry, consent hold, and visitor context reads.
 */
import { backoffDelay, DEFAULT_BACKOFF, type BackoffOptions } from './backoff.js';
import { buildContext, pageInfo } from './context.js';
import { PersistedQueue, type Message } from './queue.js';
import { createKV, PersistedId, type KV } from './storage.js';
import {
  chunk,
  errorOf,
  MAX_BATCH_BYTES,
  MAX_BATCH_MESSAGES,
  MAX_KEEPALIVE_BYTES,
  MAX_MESSAGE_BYTES,
  postBatch,
  type SendResult,
} from './transport.js';
import { base64, byteLength, fnv1a, g, isPlainObject, timer, uuid, warn } from './util.js';

/** A visitor token, or a function that fetches one (from the site's own backend). */
export type VisitorToken = string | (() => Promise<string | null | undefined>);

export interface ConsentOptions {
  /**
   * When true, messages are held in the (persisted) queue and not sent until
   * `setConsent` grants; a refusal discards them.
   */
  required: boolean;
  /**
   * The categories that must all be granted (true) for sending. When absent or empty,
   * any granted category is enough.
   */
  categories?: string[];
}

export interface ChorusOptions {
  /** The source's write key (public: it only allows sending events). */
  writeKey: string;
  /** chorus's HTTP base URL, e.g. `https://chorus.example.com`. */
  host: string;
  /** Send as soon as this many messages are queued (default 20). */
  flushAt?: number;
  /** Otherwise send this many ms after the first queued message (default 2000). */
  flushInterval?: number;
  /** Most messages kept in the offline queue; the oldest are dropped past it (default 1000). */
  maxQueue?: number;
  /** Consent handling; see ConsentOptions. Default: not required. */
  consent?: ConsentOptions;
  /** A visitor token for reads as the known customer; see setVisitorToken. */
  visitorToken?: VisitorToken;
  /** The retry schedule (ms); see backoff.ts. */
  backoff?: Partial<BackoffOptions>;
}

/** An unsuccessful read (or a token provider's failure). `status` 0: no HTTP answer. */
export class ChorusError extends Error {
  readonly status: number;
  readonly code: string;
  readonly body: unknown;
  constructor(message: string, status: number, code: string, body: unknown = null) {
    super(message);
    this.name = 'ChorusError';
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

type Traits = Record<string, unknown>;
type Properties = Record<string, unknown>;
type Preferences = Record<string, boolean>;
type Inflight = 'fetch' | 'keepalive';

const ANONYMOUS_ID = 'ajs_anonymous_id';
const USER_ID = 'ajs_user_id';
const CONSENT_KEY = 'chorus:consent';

function positive(value: number | undefined, fallback: number, min: number): number {
  return typeof value === 'number' && isFinite(value) && value >= min ? value : fallback;
}

export class ChorusClient {
  private readonly options: Readonly<Required<Omit<ChorusOptions, 'visitorToken' | 'consent' | 'backoff'>>>;
  private readonly consent: ConsentOptions;
  private readonly backoff: BackoffOptions;
  private readonly kv: KV;
  private readonly queue: PersistedQueue;
  private readonly anon: PersistedId;
  private readonly user: PersistedId;
  private token: VisitorToken | null;
  private prefs: Preferences | null;

  /** messageId -> how it is being sent right now. */
  private readonly inflight = new Map<string, Inflight>();
  /** Ids sent (or dropped) by this page, never to be sent again by it. */
  private readonly done = new Set<string>();
  private flushTimer: ReturnType<typeof setTimeout> | null = null;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private attempts = 0;
  private running: Promise<void> | null = null;
  private rerun = false;
  private closed = false;
  private readonly detach: Array<() => void> = [];

  constructor(options: ChorusOptions) {
    if (!options || typeof options.writeKey !== 'string' || !options.writeKey) {
      throw new Error('chorus: init needs a writeKey');
    }
    if (typeof options.host !== 'string' || !/^https?:\/\//.test(options.host)) {
      throw new Error('chorus: init needs host, an http(s) URL');
    }
    this.options = {
      writeKey: options.writeKey,
      host: options.host.replace(/\/+$/, ''),
      flushAt: Math.floor(positive(options.flushAt, 20, 1)),
      flushInterval: positive(options.flushInterval, 2000, 0),
      maxQueue: Math.floor(positive(options.maxQueue, 1000, 1)),
    };
    this.consent = {
      required: !!(options.consent && options.consent.required),
      categories: (options.consent && options.consent.categories) || [],
    };
    const b = options.backoff || {};
    this.backoff = {
      base: positive(b.base, DEFAULT_BACKOFF.base, 0),
      max: positive(b.max, DEFAULT_BACKOFF.max, 0),
      jitter: positive(b.jitter, DEFAULT_BACKOFF.jitter, 0),
    };
    this.token = options.visitorToken || null;
    this.kv = createKV();
    // One queue per host + write key, so that messages go where they were meant to.
    this.queue = new PersistedQueue(
      this.kv,
      'chorus:queue:' + fnv1a(this.options.host + '|' + this.options.writeKey),
      this.options.maxQueue,
    );
    this.anon = new PersistedId(this.kv, ANONYMOUS_ID);
    this.user = new PersistedId(this.kv, USER_ID);
    // Adopt the ids analytics.js (or an earlier visit) left, and store them in both places.
    this.anon.write(this.anon.read() || uuid());
    const uid = this.user.read();
    if (uid) this.user.write(uid);
    this.prefs = this.loadConsent();
    this.listen();
    // Send what an earlier page left in the queue.
    if (this.queue.size() > 0) this.schedule(0);
  }

  // ---------------------------------------------------------------- identity

  /** The anonymous id (adopted from analytics.js's `ajs_anonymous_id` when present); with an argument, sets it. */
  anonymousId(id?: string): string {
    if (typeof id === 'string' && id) {
      this.anon.write(id);
      return id;
    }
    let current = this.anon.read();
    if (!current) {
      current = uuid();
      this.anon.write(current);
    }
    return current;
  }

  /** The known user's id, or null. */
  userId(): string | null {
    return this.user.read();
  }

  /** Forget the user (logout): clears the user id and starts a new anonymous id. */
  reset(): void {
    this.user.clear();
    this.anon.write(uuid());
  }

  // ------------------------------------------------------------ Segment calls

  /** Identify the visitor: `identify(userId?, traits?)` or `identify(traits)`. Returns the messageId, or null when dropped. */
  identify(userId?: string | Traits | null, traits?: Traits): string | null {
    if (isPlainObject(userId)) {
      traits = userId;
      userId = undefined;
    }
    if (typeof userId === 'number') userId = String(userId);
    if (typeof userId === 'string' && userId) this.user.write(userId);
    return this.enqueue({ type: 'identify', traits: { ...(traits || {}) } });
  }

  /** Record an event, e.g. `track("Product Viewed", {product_id, price, category})`. */
  track(event: string, properties?: Properties): string | null {
    if (typeof event !== 'string' || !event) throw new Error('chorus: track needs an event name');
    return this.enqueue({ type: 'track', event, properties: { ...(properties || {}) } });
  }

  /** Record a page view; properties default to the page's path, referrer, search, title and url. */
  page(name?: string | Properties | null, properties?: Properties): string | null {
    if (isPlainObject(name)) {
      properties = name;
      name = undefined;
    }
    const props: Properties = { ...pageInfo(), ...(properties || {}) };
    const msg: Partial<Message> = { type: 'page', properties: props };
    if (typeof name === 'string' && name) {
      msg.name = name;
      props.name = name;
    }
    return this.enqueue(msg);
  }

  /** Link the current identity to `userId` (previousId defaults to the current user or anonymous id). */
  alias(userId: string, previousId?: string): string | null {
    if (typeof userId !== 'string' || !userId) throw new Error('chorus: alias needs a userId');
    const previous = previousId || this.userId() || this.anonymousId();
    return this.enqueue({ type: 'alias', userId, previousId: previous });
  }

  /** Associate the visitor with a group (account, company). */
  group(groupId: string, traits?: Traits): string | null {
    if (typeof groupId !== 'string' || !groupId) throw new Error('chorus: group needs a groupId');
    return this.enqueue({ type: 'group', groupId, traits: { ...(traits || {}) } });
  }

  // ------------------------------------------------------------------ consent

  /**
   * Record the visitor's consent, e.g. `setConsent({analytics: true, marketing: false})`.
   * Every later message carries it as `context.consent.categoryPreferences`, and so do
   * held messages that were made before it was known. With `consent.required`, a grant
   * releases the held messages; a refusal discards them and drops later calls.
   */
  setConsent(categoryPreferences: Record<string, boolean>): void {
    const prefs: Preferences = {};
    for (const key of Object.keys(categoryPreferences || {})) prefs[key] = categoryPreferences[key] === true;
    this.prefs = prefs;
    this.kv.set(CONSENT_KEY, JSON.stringify(prefs));
    if (this.consent.required && !this.granted()) {
      const n = this.queue.size();
      this.queue.clear();
      if (n) warn('consent refused: discarded ' + n + ' held message(s)');
      return;
    }
    this.queue.update((m) => {
      const ctx = isPlainObject(m.context) ? m.context : {};
      if (ctx.consent) return m;
      return { ...m, context: { ...ctx, consent: { categoryPreferences: { ...prefs } } } };
    });
    this.kick(true);
  }

  /** The consent preferences given so far, or null. */
  consentPreferences(): Record<string, boolean> | null {
    return this.prefs ? { ...this.prefs } : null;
  }

  // ------------------------------------------------------------------- reads

  /** Set (or with null, clear) the visitor token used for reads as the known customer. */
  setVisitorToken(token: VisitorToken | null): void {
    this.token = token || null;
  }

  /** The visitor's real-time context (session, cart, recent interactions). */
  getContext(): Promise<unknown> {
    return this.read('context');
  }

  /** The visitor's recommendations. */
  getRecommendations(): Promise<unknown> {
    return this.read('recommendations');
  }

  // ------------------------------------------------------------------ sending

  /**
   * Send every queued message now (ignoring a pending retry delay). Resolves when the
   * attempt is over; messages that could not be sent stay queued for a retry.
   */
  flush(): Promise<void> {
    return this.kick(true);
  }

  /** How many messages wait in the queue (held, failed or not yet sent). */
  queued(): number {
    return this.queue.size();
  }

  /** Stop timers and listeners (the queue stays persisted). */
  close(): void {
    this.closed = true;
    this.clearTimers();
    for (const off of this.detach.splice(0)) off();
  }

  // ---------------------------------------------------------------- internals

  private loadConsent(): Preferences | null {
    const raw = this.kv.get(CONSENT_KEY);
    if (!raw) return null;
    try {
      const parsed = JSON.parse(raw);
      if (!isPlainObject(parsed)) return null;
      const prefs: Preferences = {};
      for (const key of Object.keys(parsed)) prefs[key] = parsed[key] === true;
      return prefs;
    } catch {
      return null;
    }
  }

  /** Whether the known preferences grant what consent.categories asks (or any category). */
  private granted(): boolean {
    const prefs = this.prefs;
    if (!prefs) return false;
    const wanted = this.consent.categories || [];
    if (wanted.length) return wanted.every((c) => prefs[c] === true);
    return Object.keys(prefs).some((c) => prefs[c] === true);
  }

  private mayQueue(): boolean {
    return !(this.consent.required && this.prefs && !this.granted());
  }

  private maySend(): boolean {
    return !this.consent.required || this.granted();
  }

  private enqueue(partial: Partial<Message>): string | null {
    if (!this.mayQueue()) return null;
    const msg = {
      ...partial,
      messageId: uuid(),
      anonymousId: this.anonymousId(),
      timestamp: new Date().toISOString(),
      context: buildContext(this.prefs),
    } as Message;
    if (!msg.userId) {
      const uid = this.userId();
      if (uid) msg.userId = uid;
    }
    const size = byteLength(JSON.stringify(msg));
    if (size > MAX_MESSAGE_BYTES) {
      warn('dropped a ' + msg.type + ' message of ' + size + ' bytes (over the 32 KB limit)');
      return null;
    }
    this.queue.push(msg);
    if (this.maySend() && !this.retryTimer) {
      if (this.queue.size() >= this.options.flushAt) void this.kick(false);
      else if (!this.flushTimer) this.schedule(this.options.flushInterval);
    }
    return msg.messageId;
  }

  private schedule(ms: number): void {
    if (this.closed || this.flushTimer) return;
    this.flushTimer = timer(() => {
      this.flushTimer = null;
      void this.kick(false);
    }, ms);
  }

  private clearTimers(): void {
    if (this.flushTimer) clearTimeout(this.flushTimer);
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.flushTimer = null;
    this.retryTimer = null;
  }

  /** Start a send loop. `now`: ignore a pending retry delay (an explicit flush). */
  private kick(now: boolean): Promise<void> {
    if (this.retryTimer && !now) return this.running || Promise.resolve();
    this.clearTimers();
    if (this.running) {
      this.rerun = true;
      return this.running;
    }
    const run = (async () => {
      try {
        do {
          this.rerun = false;
          await this.drain();
        } while (this.rerun && !this.retryTimer && !this.closed);
      } finally {
        this.running = null;
      }
    })();
    this.running = run;
    return run;
  }

  /** Send queued messages batch by batch until none is left or a send must be retried. */
  private async drain(): Promise<void> {
    while (!this.closed && this.maySend()) {
      const pending = this.queue.all().filter((m) => !this.inflight.has(m.messageId) && !this.done.has(m.messageId));
      if (!pending.length) return;
      const batch = chunk(pending, this.options.writeKey, MAX_BATCH_BYTES, MAX_BATCH_MESSAGES)[0];
      const result = await this.send(batch, 'fetch');
      if (!result.ok && result.retryable) {
        this.scheduleRetry(result);
        return;
      }
      this.attempts = 0;
    }
  }

  /** After a failed send: try again after the next backoff delay (or Retry-After). */
  private scheduleRetry(result: SendResult): void {
    if (this.closed) return;
    this.attempts++;
    let wait = backoffDelay(this.attempts, this.backoff);
    if (result.retryAfterMs !== null) wait = Math.min(Math.max(wait, result.retryAfterMs), 3600000);
    this.clearTimers();
    this.retryTimer = timer(() => {
      this.retryTimer = null;
      void this.kick(false);
    }, wait);
  }

  /** Send one batch and settle the queue by the answer (success and 4xx remove it). */
  private async send(batch: Message[], how: Inflight): Promise<SendResult> {
    const ids = batch.map((m) => m.messageId);
    for (const id of ids) this.inflight.set(id, how);
    let result: SendResult;
    try {
      result = await postBatch(this.options.host, this.options.writeKey, batch, how === 'keepalive');
    } finally {
      for (const id of ids) if (this.inflight.get(id) === how) this.inflight.delete(id);
    }
    if (result.ok || !result.retryable) {
      if (!result.ok) {
        warn(
          'dropped ' + batch.length + ' message(s): HTTP ' + result.status +
            (result.code ? ' ' + result.code : '') + (result.message ? ': ' + result.message : ''),
        );
      }
      for (const id of ids) this.done.add(id);
      this.queue.remove(ids);
    }
    return result;
  }

  /**
   * At page exit: send what is queued with `keepalive` fetches (which outlive the page)
   * in bodies under 64 KB. The messages stay queued until an answer confirms them, so
   * if the page is gone first, the next page load sends them again with the same
   * messageIds and the server deduplicates them.
   */
  private flushAtExit(unloading: boolean): void {
    if (this.closed || !this.maySend()) return;
    const pending = this.queue.all().filter((m) => {
      if (this.done.has(m.messageId)) return false;
      const how = this.inflight.get(m.messageId);
      // An ordinary fetch is cancelled when the page unloads: send those again then.
      return how === undefined || (unloading && how === 'fetch');
    });
    if (!pending.length) return;
    for (const batch of chunk(pending, this.options.writeKey, MAX_KEEPALIVE_BYTES, MAX_BATCH_MESSAGES)) {
      void this.send(batch, 'keepalive').then((result) => {
        // Still here (the page was only hidden) and it failed: retry as usual.
        if (!result.ok && result.retryable && !this.retryTimer) this.scheduleRetry(result);
      });
    }
  }

  private listen(): void {
    const win = g;
    const doc = g.document;
    const on = (target: any, type: string, fn: (e: any) => void) => {
      if (target && typeof target.addEventListener === 'function') {
        target.addEventListener(type, fn);
        this.detach.push(() => target.removeEventListener(type, fn));
      }
    };
    on(win, 'pagehide', () => this.flushAtExit(true));
    on(doc, 'visibilitychange', () => {
      if (doc.visibilityState === 'hidden') this.flushAtExit(false);
    });
    // Back online: retry now rather than at the end of the backoff delay.
    on(win, 'online', () => {
      if (this.queue.size() > 0) void this.kick(true);
    });
  }

  private async authorization(): Promise<string> {
    let token: string | null | undefined = null;
    if (typeof this.token === 'function') {
      try {
        token = await this.token();
      } catch (e) {
        throw new ChorusError(
          'chorus: the visitor token provider failed: ' + (e instanceof Error ? e.message : String(e)),
          0,
          'token_provider_failed',
        );
      }
    } else {
      token = this.token;
    }
    if (typeof token === 'string' && token) return 'Bearer ' + token;
    return 'Basic ' + base64(this.options.writeKey + ':');
  }

  private async read(kind: 'context' | 'recommendations'): Promise<unknown> {
    const auth = await this.authorization();
    const who = auth.indexOf('Bearer ') === 0
      ? 'me'
      : encodeURIComponent('anonymous_id:' + this.anonymousId()).replace(/%3A/gi, ':');
    const url = this.options.host + '/v1/' + kind + '/' + who;
    const fetchFn = g.fetch;
    if (typeof fetchFn !== 'function') throw new ChorusError('chorus: fetch is not available', 0, 'no_fetch');
    let response: Response;
    try {
      response = await fetchFn(url, {
        method: 'GET',
        headers: { Authorization: auth, Accept: 'application/json' },
        credentials: 'omit',
        mode: 'cors',
        cache: 'no-store',
      });
    } catch (e) {
      throw new ChorusError(
        'chorus: GET /v1/' + kind + ' failed: ' + (e instanceof Error ? e.message : String(e)),
        0,
        'network_error',
      );
    }
    if (response.status < 200 || response.status >= 300) {
      const { code, message, body } = await errorOf(response);
      throw new ChorusError(
        'chorus: GET /v1/' + kind + ' answered ' + response.status + (code ? ' ' + code : '') +
          (message ? ': ' + message : ''),
        response.status,
        code || 'http_' + response.status,
        body,
      );
    }
    try {
      return await response.json();
    } catch {
      throw new ChorusError('chorus: GET /v1/' + kind + ' answered with invalid JSON', response.status, 'invalid_json');
    }
  }
}
