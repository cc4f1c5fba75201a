/** `context` for each message, as analytics.js builds it, from the browser's state. */
import { LIBRARY_NAME, VERSION } from './version.js';
import { g } from './util.js';

export interface PageInfo {
  path: string;
  referrer: string;
  search: string;
  title: string;
  url: string;
}

/** The current page: url (without the #fragment), path, search, referrer, title. */
export function pageInfo(): PageInfo {
  const loc = g.location;
  const doc = g.document;
  const href = loc && typeof loc.href === 'string' ? loc.href : '';
  const hash = href.indexOf('#');
  return {
    path: (loc && loc.pathname) || '',
    referrer: (doc && doc.referrer) || '',
    search: (loc && loc.search) || '',
    title: (doc && doc.title) || '',
    url: hash >= 0 ? href.slice(0, hash) : href,
  };
}

/** `context.campaign` from the page's utm_* parameters, or null when there are none. */
export function campaign(search: string): Record<string, string> | null {
  if (!search || typeof g.URLSearchParams !== 'function') return null;
  const params = new g.URLSearchParams(search) as URLSearchParams;
  const out: Record<string, string> = {};
  params.forEach((value, key) => {
    if (key.indexOf('utm_') !== 0 || !value) return;
    let name = key.slice(4);
    if (name === 'campaign') name = 'name';
    if (name) out[name] = value;
  });
  return Object.keys(out).length ? out : null;
}

function timezone(): string | undefined {
  try {
    return Intl.DateTimeFormat().resolvedOptions().timeZone || undefined;
  } catch {
    return undefined;
  }
}

/** The `context` of a message, with `context.consent` when preferences are known. */
export function buildContext(consent: Record<string, boolean> | null): Record<string, unknown> {
  const nav = g.navigator;
  const page = pageInfo();
  const ctx: Record<string, unknown> = {
    library: { name: LIBRARY_NAME, version: VERSION },
    page,
  };
  if (nav && nav.userAgent) ctx.userAgent = nav.userAgent;
  const locale = nav && (nav.language || (nav.languages && nav.languages[0]));
  if (locale) ctx.locale = locale;
  const tz = timezone();
  if (tz) ctx.timezone = tz;
  const utm = campaign(page.search);
  if (utm) ctx.campaign = utm;
  if (consent) ctx.consent = { categoryPreferences: { ...consent } };
  return ctx;
}
