/**
 * @chorus/web: the chorus web SDK.
 *
 * Speaks Segment's analytics.js wire format to chorus (`POST {host}/v1/batch`) and reads
 * the visitor's real-time context and recommendations back (`GET {host}/v1/context/...`).
 *
 *   import { init } from '@chorus/web';
 *   const chorus = init({ writeKey: 'wk_...', host: 'https://chorus.example.com' });
 *   chorus.page();
 *   chorus.track('Product Viewed', { product_id: 'p1', price: 19.99, category: 'shoes' });
 *
 * The named function exports (`track`, `identify`, ...) and the default export act on
 * the client the last `init` made.
 */
import { ChorusClient, type ChorusOptions, type VisitorToken } from './client.js';

export { ChorusClient, ChorusError } from './client.js';
export type { ChorusOptions, ConsentOptions, VisitorToken } from './client.js';
export type { Message } from './queue.js';
export { backoffDelay, DEFAULT_BACKOFF } from './backoff.js';
export type { BackoffOptions } from './backoff.js';
export { LIBRARY_NAME, VERSION } from './version.js';

let instance: ChorusClient | null = null;

/** Create the client (and make it the default one). A previous default client is closed. */
export function init(options: ChorusOptions): ChorusClient {
  const client = new ChorusClient(options);
  if (instance) instance.close();
  instance = client;
  return client;
}

/** The client the last `init` made. */
export function client(): ChorusClient {
  if (!instance) throw new Error('chorus: call init({writeKey, host}) first');
  return instance;
}

type Traits = Record<string, unknown>;

export function identify(userId?: string | Traits | null, traits?: Traits): string | null {
  return client().identify(userId, traits);
}
export function track(event: string, properties?: Record<string, unknown>): string | null {
  return client().track(event, properties);
}
export function page(name?: string | Record<string, unknown> | null, properties?: Record<string, unknown>): string | null {
  return client().page(name, properties);
}
export function alias(userId: string, previousId?: string): string | null {
  return client().alias(userId, previousId);
}
export function group(groupId: string, traits?: Traits): string | null {
  return client().group(groupId, traits);
}
export function getContext(): Promise<unknown> {
  return client().getContext();
}
export function getRecommendations(): Promise<unknown> {
  return client().getRecommendations();
}
export function setConsent(categoryPreferences: Record<string, boolean>): void {
  client().setConsent(categoryPreferences);
}
export function setVisitorToken(token: VisitorToken | null): void {
  client().setVisitorToken(token);
}
export function flush(): Promise<void> {
  return client().flush();
}
export function reset(): void {
  client().reset();
}
export function anonymousId(id?: string): string {
  return client().anonymousId(id);
}
export function userId(): string | null {
  return client().userId();
}

const chorus = {
  init,
  client,
  identify,
  track,
  page,
  alias,
  group,
  getContext,
  getRecommendations,
  setConsent,
  setVisitorToken,
  flush,
  reset,
  anonymousId,
  userId,
};

export default chorus;
