/**
 * The outgoing message queue, persisted in localStorage so that messages survive
 * reloads and offline periods.
 *
 * Every operation reads, changes and writes the stored array in one synchronous
 * step, so two tabs of the same site share one queue without overwriting each
 * other's additions. Two tabs may still send the same message; each message keeps
 * the messageId it was created with, and the server deduplicates on it.
 *
 * The queue holds at most `max` messages: adding past that drops the oldest. When
 * the storage quota is exceeded the oldest are dropped until the write fits.
 */
import type { KV } from './storage.js';
import { isPlainObject, warn } from './util.js';

/** A Segment message as the SDK builds it. */
export interface Message {
  type: 'track' | 'page' | 'identify' | 'alias' | 'group' | 'screen';
  messageId: string;
  anonymousId: string;
  userId?: string;
  timestamp: string;
  context: Record<string, unknown>;
  event?: string;
  name?: string;
  properties?: Record<string, unknown>;
  traits?: Record<string, unknown>;
  groupId?: string;
  previousId?: string;
  [key: string]: unknown;
}

export class PersistedQueue {
  /** The copy used when storage cannot be written; authoritative then. */
  private memory: Message[] | null = null;

  constructor(
    private kv: KV,
    readonly key: string,
    private max: number,
  ) {}

  /** The queued messages, oldest first. */
  all(): Message[] {
    if (this.memory) return this.memory.slice();
    const raw = this.kv.get(this.key);
    if (!raw) return [];
    try {
      const parsed = JSON.parse(raw);
      if (!Array.isArray(parsed)) return [];
      return parsed.filter((m): m is Message => isPlainObject(m) && typeof m.messageId === 'string');
    } catch {
      return [];
    }
  }

  size(): number {
    return this.all().length;
  }

  /** Append messages, dropping the oldest past `max`. Returns how many were dropped. */
  push(...messages: Message[]): number {
    const list = this.all();
    list.push(...messages);
    let dropped = 0;
    if (list.length > this.max) {
      dropped = list.length - this.max;
      list.splice(0, dropped);
    }
    dropped += this.save(list);
    if (dropped > 0) warn('offline queue full: dropped the ' + dropped + ' oldest message(s)');
    return dropped;
  }

  /** Remove the messages with these ids. */
  remove(ids: Iterable<string>): void {
    const gone = new Set(ids);
    if (gone.size === 0) return;
    const list = this.all();
    const kept = list.filter((m) => !gone.has(m.messageId));
    if (kept.length !== list.length) this.save(kept);
  }

  /** Replace each message by `fn(message)`. */
  update(fn: (m: Message) => Message): void {
    const list = this.all();
    if (list.length) this.save(list.map(fn));
  }

  clear(): void {
    this.memory = null;
    this.kv.remove(this.key);
  }

  /**
   * Write `list`, dropping the oldest until it fits the storage quota. When not even
   * one message fits, the list is kept in memory for this page. Returns how many
   * messages were dropped.
   */
  private save(list: Message[]): number {
    if (!this.kv.persistent) {
      this.memory = list;
      return 0;
    }
    if (list.length === 0) {
      this.kv.remove(this.key);
      this.memory = null;
      return 0;
    }
    let kept = list;
    let dropped = 0;
    while (kept.length > 0) {
      if (this.kv.set(this.key, JSON.stringify(kept))) {
        this.memory = null;
        return dropped;
      }
      // Over the quota: drop the oldest quarter (at least one) and try again.
      const n = Math.max(1, Math.floor(kept.length / 4));
      kept = kept.slice(n);
      dropped += n;
    }
    this.memory = list;
    return 0;
  }
}
