// Segment's official Node library (@segment/analytics-node, unchanged) against chorus.
//
// Env: CHORUS_HTTP (e.g. http://127.0.0.1:8080), CHORUS_WRITE_KEY, CHORUS_SECRET_KEY.
//
// Sends, with ids unique to this run:
//   1. a client with flushAt 1: an anonymous "Product Viewed" (anonymousId only), then the same
//      message again with the same messageId (a client retry), each its own POST /v1/batch;
//   2. a client with flushAt 20: alias(previous anonymous id -> user id), identify(traits),
//      "Product Viewed", "Order Completed" (order_id, total, currency, products[]) and page,
//      delivered by closeAndFlush() as one POST /v1/batch.
// Then reads chorus with the secret key, polling up to 60 s per check: the profile of
// customer_id:<user> carries the traits, purchase_count 1, lifetime_value = total, each event
// counted once (the duplicate is not), the anonymous event is in it (the alias linked the previous
// id: anonymous_id:<prev> answers the same canonical_id), and the context answers.
// Prints one line per check; on failure prints one "FAIL: ..." line and exits 1.
import { Analytics } from '@segment/analytics-node'
import {
  HOST,
  WRITE_KEY,
  activityTypes,
  contains,
  contextPath,
  counts,
  fail,
  get,
  metric,
  ok,
  poll,
  profilePath,
  short,
  sleep,
  suffix,
} from './chorus_reads.mjs'

const S = suffix()
const USER_ID = `node-user-${S}`
const PREV_ANON = `node-anon-${S}`
const EMAIL = `node-${S}@example.com`
const NAME = `Node Tester ${S}`
const ORDER_ID = `node-order-${S}`
const PRODUCTS = [
  { product_id: `node-sku-a-${S}`, sku: 'A-1', name: 'Trail Shoe', price: 89.5, quantity: 1, category: 'Shoes' },
  { product_id: `node-sku-b-${S}`, sku: 'B-2', name: 'Wool Sock', price: 20, quantity: 2, category: 'Socks' },
]
const TOTAL = 129.5
const DUP_MESSAGE_ID = `node-dup-${S}`

console.log(`run  user=${USER_ID} previous_anonymous_id=${PREV_ANON} host=${HOST}`)

/** A client of the official library, its requests observed through its own emitter events. */
function client(options) {
  const analytics = new Analytics({ writeKey: WRITE_KEY, host: HOST, maxRetries: 2, httpRequestTimeout: 10_000, ...options })
  const requests = []
  const errors = []
  analytics.on('http_request', (r) => {
    let messages = -1
    try {
      messages = JSON.parse(r.body).batch.length
    } catch {
      // not JSON
    }
    requests.push({ method: r.method, path: new URL(r.url).pathname, auth: (r.headers.Authorization ?? '').split(' ')[0], messages, status: null })
  })
  analytics.on('http_response', (r) => {
    const pending = requests.find((q) => q.status === null)
    if (pending) pending.status = r.status
  })
  analytics.on('error', (e) => errors.push(`${e.code}: ${e.reason?.message ?? e.reason ?? ''}`))
  // the callback of every call: the library's own report of delivery
  const done = (label) => (err) => err && errors.push(`${label}: ${err.message ?? err}`)
  return { analytics, requests, errors, done }
}

const describe = (requests) =>
  requests.map((r) => `${r.method} ${r.path} [${r.messages} msg, ${r.auth}] -> ${r.status ?? 'no answer'}`).join(', ')

async function flushed(c, what) {
  try {
    await c.analytics.closeAndFlush({ timeout: 30_000 })
  } catch (e) {
    await fail(`${what}: closeAndFlush failed: ${e.message}`)
  }
  if (c.errors.length) await fail(`${what}: the library reported: ${c.errors[0]} (requests: ${describe(c.requests) || 'none'}; is ${HOST} up?)`)
  if (!c.requests.length) await fail(`${what}: the library sent nothing`)
  const bad = c.requests.filter((r) => r.status !== 200 || r.path !== '/v1/batch')
  if (bad.length) await fail(`${what}: expected POST /v1/batch answered 200, saw: ${describe(c.requests)}`)
}

// ---------------------------------------------------------------- 1. one request per call
const single = client({ flushAt: 1 })
const viewedAnon = { product_id: PRODUCTS[0].product_id, price: 89.5, category: 'Shoes', name: 'Trail Shoe' }
single.analytics.track(
  { anonymousId: PREV_ANON, event: 'Product Viewed', properties: viewedAnon, messageId: DUP_MESSAGE_ID },
  single.done('track'),
)
await sleep(300)
single.analytics.track(
  { anonymousId: PREV_ANON, event: 'Product Viewed', properties: viewedAnon, messageId: DUP_MESSAGE_ID },
  single.done('track (again)'),
)
await flushed(single, 'anonymous track')
if (single.requests.length !== 2) await fail(`anonymous track: expected 2 requests with flushAt 1, saw: ${describe(single.requests)}`)
ok(`flushAt 1: anonymous 'Product Viewed' sent twice with one messageId (${describe(single.requests)})`)

// ---------------------------------------------------------------- 2. one batch of five calls
const batched = client({ flushAt: 20, flushInterval: 10_000 })
const a = batched.analytics
a.alias({ previousId: PREV_ANON, userId: USER_ID }, batched.done('alias'))
a.identify({ userId: USER_ID, traits: { email: EMAIL, name: NAME, first_name: 'Node', plan: 'gold' } }, batched.done('identify'))
a.track(
  {
    userId: USER_ID,
    event: 'Product Viewed',
    properties: { product_id: PRODUCTS[1].product_id, price: 20, category: 'Socks', name: 'Wool Sock' },
  },
  batched.done('track Product Viewed'),
)
a.track(
  {
    userId: USER_ID,
    event: 'Order Completed',
    properties: { order_id: ORDER_ID, total: TOTAL, revenue: TOTAL, currency: 'USD', products: PRODUCTS },
  },
  batched.done('track Order Completed'),
)
a.page(
  {
    userId: USER_ID,
    category: 'Shop',
    name: 'Checkout',
    properties: { url: `https://shop.example/checkout?run=${S}`, path: '/checkout', title: 'Checkout' },
  },
  batched.done('page'),
)
await flushed(batched, 'batched calls')
const delivered = batched.requests.reduce((n, r) => n + r.messages, 0)
if (batched.requests.length !== 1 || delivered !== 5) {
  await fail(`batched calls: expected the 5 calls in one POST /v1/batch, saw: ${describe(batched.requests)}`)
}
ok(`closeAndFlush: alias, identify, 2 tracks, page sent as ${describe(batched.requests)}`)

// ---------------------------------------------------------------- reads (secret key), polled
const PROFILE = profilePath(`customer_id:${USER_ID}`)
const EXPECTED = { 'product.viewed': 2, 'order.completed': 1, 'page.viewed': 1 }
const countsMatch = (p) => Object.entries(EXPECTED).every(([t, n]) => counts(p)[t] === n)

await poll(
  PROFILE,
  (p) => (contains(p.attributes, NAME) && contains(p.attributes, 'gold') ? null : `attributes lack the identify traits name/plan: ${short(p.attributes)}`),
  'identify traits',
)
ok(`profile customer_id:${USER_ID} attributes carry the traits (name '${NAME}', plan 'gold')`)

const profile = await poll(
  PROFILE,
  (p) =>
    contains(p.attributes, EMAIL) || contains(p.identity, EMAIL)
      ? null
      : `neither attributes nor identity carry the email: ${short({ attributes: p.attributes, identity: p.identity })}`,
  'identify email',
)
ok(`profile carries the email trait ${EMAIL}`)

await poll(
  PROFILE,
  (p) =>
    metric(p, 'purchase_count') === 1 && Math.abs(Number(metric(p, 'lifetime_value') ?? 0) - TOTAL) < 0.005
      ? null
      : `metrics purchase_count=${metric(p, 'purchase_count')} lifetime_value=${metric(p, 'lifetime_value')}, want 1 and ${TOTAL}`,
  'order metrics',
)
ok(`metrics: purchase_count 1, lifetime_value ${TOTAL} (Order Completed ${ORDER_ID})`)

await poll(
  PROFILE,
  (p) => (countsMatch(p) ? null : `event_counts ${short(counts(p))}, want ${short(EXPECTED)} (the anonymous event is one of the two product.viewed)`),
  'event counts',
)
ok(`event_counts ${short(EXPECTED)}: the aliased anonymous view is counted, its duplicate messageId is not`)

const anon = await poll(
  profilePath(`anonymous_id:${PREV_ANON}`),
  (p) => (p.canonical_id && p.canonical_id === profile.canonical_id ? null : `canonical_id ${short(p.canonical_id)}, want ${short(profile.canonical_id)}`),
  'alias',
)
ok(`alias: anonymous_id:${PREV_ANON} answers the same canonical_id '${anon.canonical_id}'`)

const context = await poll(contextPath(`customer_id:${USER_ID}`), () => null, 'context')
ok(`GET /v1/context/customer_id:${USER_ID} answers (keys: ${Object.keys(context).sort().join(', ')})`)

// last, after every other effect has shown: nothing was counted twice meanwhile
await sleep(2000)
const [status, p] = await get(PROFILE)
if (status !== 200) await fail(`GET ${PROFILE} -> ${status} on the final read`)
if (!countsMatch(p)) await fail(`final read: event_counts ${short(counts(p))}, want ${short(EXPECTED)}`)
const sum = Object.values(counts(p)).reduce((x, y) => x + y, 0)
if (metric(p, 'event_count') !== sum) {
  await fail(`final read: metrics.event_count ${metric(p, 'event_count')} != sum of event_counts ${sum} (${short(counts(p))})`)
}
const types = activityTypes(p)
const missing = Object.keys(EXPECTED).filter((t) => !types.has(t))
if (missing.length) await fail(`final read: recent_activity types [${[...types]}] lack [${missing}]`)
ok(`final read: event_count ${sum} = sum of event_counts ${short(counts(p))}; recent_activity has ${Object.keys(EXPECTED).sort().join(', ')}`)
console.log('PASS node_client (@segment/analytics-node)')
