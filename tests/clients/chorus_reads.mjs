// Shared by node_client.mjs and browser_next.mjs: the environment, one-line output, and reads of
// chorus's API with the secret key (Authorization: Bearer), polled because processing is
// asynchronous.
import { randomBytes } from 'node:crypto'

export const POLL_SECONDS = 60

const cleanups = []
/** Run fn (closing a browser, a server) before the process exits on a failure. */
export function onFail(fn) {
  cleanups.push(fn)
}

export async function fail(reason) {
  console.log(`FAIL: ${String(reason).replace(/\s*\n\s*/g, ' ')}`)
  for (const fn of cleanups.splice(0).reverse()) {
    try {
      await fn()
    } catch {
      // already failing
    }
  }
  process.exit(1)
}

// anything unexpected still ends as one line
process.on('uncaughtException', (e) => fail(`unexpected ${e?.name ?? 'error'}: ${e?.message ?? e}`))
process.on('unhandledRejection', (e) => fail(`unexpected ${e?.name ?? 'rejection'}: ${e?.message ?? e}`))

export function ok(line) {
  console.log(`ok   ${line}`)
}

export function env(name) {
  const value = (process.env[name] ?? '').trim()
  if (!value) {
    console.log(`FAIL: ${name} is not set`)
    process.exit(1)
  }
  return value
}

export const HOST = env('CHORUS_HTTP').replace(/\/+$/, '')
export const WRITE_KEY = env('CHORUS_WRITE_KEY')
export const SECRET_KEY = env('CHORUS_SECRET_KEY')

export const suffix = () => randomBytes(5).toString('hex')
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
export const short = (value) => JSON.stringify(value)?.slice(0, 300)

export async function get(path) {
  try {
    const res = await fetch(HOST + path, {
      headers: { Authorization: `Bearer ${SECRET_KEY}`, Accept: 'application/json' },
      signal: AbortSignal.timeout(10_000),
    })
    const text = await res.text()
    try {
      return [res.status, JSON.parse(text)]
    } catch {
      return [res.status, text]
    }
  } catch (e) {
    return [0, `${e.name}: ${e.cause?.message ?? e.message}`]
  }
}

/** GET path until check(body) returns null/undefined (satisfied) or 60 s pass; check returns a reason otherwise. */
export async function poll(path, check, what) {
  const deadline = Date.now() + POLL_SECONDS * 1000
  for (;;) {
    const [status, body] = await get(path)
    if (status === 401 || status === 403) {
      await fail(`GET ${path} -> ${status} ${short(body)} (is CHORUS_SECRET_KEY a secret key with every scope?)`)
    }
    const reason =
      status === 200 && body && typeof body === 'object' ? check(body) : `GET ${path} -> ${status} ${short(body)}`
    if (reason == null) return body
    if (Date.now() >= deadline) await fail(`${what}: after ${POLL_SECONDS} s, ${reason}`)
    await sleep(1000)
  }
}

/** `type:value` as a path segment: the value escaped, the colon kept as the contract writes it. */
const idPath = (identifier) => encodeURIComponent(identifier).replace(/%3A/gi, ':')
export const profilePath = (identifier) => `/v1/profiles/${idPath(identifier)}`
export const contextPath = (identifier) => `/v1/context/${idPath(identifier)}`

/** Whether needle appears as a value anywhere inside value. */
export function contains(value, needle) {
  if (Array.isArray(value)) return value.some((v) => contains(v, needle))
  if (value && typeof value === 'object') return Object.values(value).some((v) => contains(v, needle))
  return value === needle
}

export const counts = (profile) => profile.event_counts ?? {}
export const metric = (profile, name) => (profile.metrics ?? {})[name]
export const activityTypes = (profile) =>
  new Set((profile.recent_activity ?? []).map((a) => a.type ?? a.event_type).filter(Boolean))
