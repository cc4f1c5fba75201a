// Segment's official browser library (@segment/analytics-next, unchanged) in headless Chromium
// against chorus.
//
// Env: CHORUS_HTTP (e.g. http://127.0.0.1:8080), CHORUS_WRITE_KEY, CHORUS_SECRET_KEY; optional:
//   CHORUS_PAGE_PORT     port of the local page server (default: random); the page's origin is
//                        http://127.0.0.1:<port>, which the write key's source must allow (CORS)
//   CHROMIUM             the browser binary (default /usr/bin/chromium); never downloaded
//   CHORUS_AJS_DELIVERY  "standard" (default: one request per call, /v1/p /v1/t /v1/i) or
//                        "batching" (analytics-next's batching strategy: POST /v1/b)
//   CHORUS_SKIP_BROWSER_READS=1  skip the reads the page itself makes (anonymous context with the
//                        write key, visitor token for /v1/context/me)
//
// A local Node server (127.0.0.1) serves a shop page that loads analytics-next's own browser
// bundle from node_modules (dist/umd, no CDN) with inline cdnSettings, so it never fetches
// settings; every request to any other origin is aborted and fails the run. The page calls
// page() on load; the test clicks "View product" (track "Product Viewed") and logs in
// (identify(userId, {email, name})). Then, reading chorus with the secret key (polling up to 60 s):
// the profile of customer_id:<userId> contains analytics-next's anonymous id (linked at login),
// anonymous_id:<anonymousId> answers the same canonical_id, and the anonymous page and track
// events count in it. The page's own reads: before login the anonymous context answers to the
// write key, after login it needs a token (403 token_required), and a visitor token minted with
// the secret key reads /v1/context/me.
// Prints one line per check; on failure prints one "FAIL: ..." line and exits 1.
import http from 'node:http'
import net from 'node:net'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { chromium } from 'playwright-core'
import {
  HOST,
  SECRET_KEY,
  WRITE_KEY,
  activityTypes,
  contains,
  counts,
  fail,
  get,
  ok,
  onFail,
  poll,
  profilePath,
  short,
  sleep,
  suffix,
} from './chorus_reads.mjs'

const HERE = path.dirname(fileURLToPath(import.meta.url))
const UMD = path.join(HERE, 'node_modules', '@segment', 'analytics-next', 'dist', 'umd')
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium'
const DELIVERY = process.env.CHORUS_AJS_DELIVERY || 'standard'
const BROWSER_READS = process.env.CHORUS_SKIP_BROWSER_READS !== '1'
const WAIT_MS = 30_000

if (!['standard', 'batching'].includes(DELIVERY)) await fail(`CHORUS_AJS_DELIVERY must be standard or batching, not ${DELIVERY}`)
if (!fs.existsSync(path.join(UMD, 'index.js'))) await fail(`no analytics-next browser bundle at ${UMD}/index.js (run npm ci in ${HERE})`)
if (!fs.existsSync(CHROMIUM)) await fail(`no browser at ${CHROMIUM} (apt-get install -y --no-install-recommends chromium)`)

const S = suffix()
const USER_ID = `web-user-${S}`
const EMAIL = `web-${S}@example.com`
const NAME = `Web Tester ${S}`
const PRODUCT = { product_id: `web-sku-${S}`, sku: 'W-1', name: 'Rain Jacket', price: 149.0, category: 'Jackets', currency: 'USD' }

const api = new URL(HOST)
const API_ORIGIN = api.origin
// analytics-next posts to `${protocol}://${apiHost}/${p|t|i|...}` (or `/b` when batching)
const API_HOST = `${api.host}${api.pathname.replace(/\/+$/, '')}/v1`
const PROTOCOL = api.protocol.replace(':', '')

// ---------------------------------------------------------------- the page and its server
const segmentSettings = {
  apiKey: WRITE_KEY,
  apiHost: API_HOST,
  protocol: PROTOCOL,
  ...(DELIVERY === 'batching' ? { deliveryStrategy: { strategy: 'batching', config: { size: 10, timeout: 1000 } } } : {}),
}
const CONFIG = {
  writeKey: WRITE_KEY,
  // inline settings: analytics-next never asks a CDN for them
  cdnSettings: {
    integrations: { 'Segment.io': segmentSettings },
    plan: {},
    // no telemetry (it would go to api.segment.io by default)
    metrics: { sampleRate: 0 },
  },
  options: { integrations: { 'Segment.io': { apiHost: API_HOST, protocol: PROTOCOL } } },
  product: PRODUCT,
}

const PAGE = `<!doctype html>
<html>
<head>
<meta charset="utf-8">
<title>chorus test shop</title>
<script>
  // analytics-next loads its lazy chunks from <_cdn>/analytics-next/bundles/: this server, not a CDN
  window.analytics = { _cdn: location.origin }
</script>
<script src="/analytics-next/bundles/index.js"></script>
<script>
  const config = ${JSON.stringify(CONFIG).replace(/</g, '\\u003c')}
  window.shop = {}
  window.shop.ready = AnalyticsNext.AnalyticsBrowser.load(
    { writeKey: config.writeKey, cdnURL: location.origin, cdnSettings: config.cdnSettings },
    config.options
  ).then(([analytics]) => {
    window.shop.analytics = analytics
    analytics.page()
    return analytics.user().anonymousId()
  })
  window.shop.viewProduct = () => window.shop.analytics.track('Product Viewed', config.product)
  window.shop.logIn = (userId, email, name) => window.shop.analytics.identify(userId, { email, name })
</script>
</head>
<body>
  <h1>Rain Jacket</h1>
  <button id="view" onclick="window.shop.viewProduct()">View product</button>
  <form id="login" onsubmit="event.preventDefault(); window.shop.logIn(this.user.value, this.email.value, this.fullname.value)">
    <input name="user" placeholder="customer id">
    <input name="email" placeholder="email">
    <input name="fullname" placeholder="name">
    <button type="submit">Log in</button>
  </form>
</body>
</html>
`

const served = []
const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://page')
  served.push(url.pathname)
  if (url.pathname === '/' || url.pathname === '/shop') {
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Cache-Control': 'no-store' })
    return res.end(PAGE)
  }
  if (url.pathname === '/favicon.ico') {
    res.writeHead(204)
    return res.end()
  }
  const m = url.pathname.match(/^\/analytics-next\/bundles\/([\w.-]+\.js)$/)
  if (m && fs.existsSync(path.join(UMD, m[1]))) {
    res.writeHead(200, { 'Content-Type': 'text/javascript; charset=utf-8' })
    return fs.createReadStream(path.join(UMD, m[1])).pipe(res)
  }
  res.writeHead(404, { 'Content-Type': 'text/plain' })
  res.end('not found')
})
await new Promise((resolve, reject) => {
  server.once('error', reject)
  server.listen(Number(process.env.CHORUS_PAGE_PORT || 0), '127.0.0.1', resolve)
}).catch((e) => fail(`page server: ${e.message}`))
onFail(() => server.close())
const PAGE_ORIGIN = `http://127.0.0.1:${server.address().port}`
console.log(`run  user=${USER_ID} page=${PAGE_ORIGIN}/ api=${PROTOCOL}://${API_HOST} delivery=${DELIVERY}`)

// ---------------------------------------------------------------- the browser
// Nothing but the page's server and chorus: the browser's proxy is a local black hole that answers
// nothing, so no request leaves the machine (Chromium's own background requests included); a
// request of the page to any other origin fails the run. (Playwright's request interception is not
// used for this: it answers CORS preflights itself, which would hide chorus's CORS.)
const foreign = [] // the page's requests to other origins
const background = [] // what reached the black hole
const blackHole = net.createServer((socket) => {
  socket.once('data', (chunk) => {
    background.push(chunk.toString('latin1').split('\r\n')[0])
    socket.destroy()
  })
  socket.on('error', () => {})
})
await new Promise((resolve) => blackHole.listen(0, '127.0.0.1', resolve))
onFail(() => blackHole.close())
const bypass = [...new Set(['127.0.0.1', 'localhost', api.hostname])].join(';')

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chorus-chromium-'))
onFail(() => fs.rmSync(userDataDir, { recursive: true, force: true }))
let context
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    serviceWorkers: 'block',
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      `--proxy-server=http://127.0.0.1:${blackHole.address().port}`,
      `--proxy-bypass-list=${bypass}`,
    ],
  })
} catch (e) {
  await fail(`cannot launch ${CHROMIUM}: ${e.message.split('\n')[0]}`)
}
onFail(() => context.close())

const localOrigin = (u) => u.origin === PAGE_ORIGIN || u.origin === API_ORIGIN || ['data:', 'blob:', 'about:'].includes(u.protocol)
context.on('request', (req) => {
  if (!localOrigin(new URL(req.url()))) foreign.push(req.url())
})
const page = context.pages()[0] ?? (await context.newPage())
const pageErrors = []
page.on('pageerror', (e) => pageErrors.push(e.message))
page.on('console', (m) => m.type() === 'error' && pageErrors.push(m.text()))

// what analytics-next sends to chorus, as the browser saw it
const sent = [] // {method, path, status, headers, body, messages, failure}
const records = new WeakMap()
page.on('request', (req) => {
  const u = new URL(req.url())
  if (u.origin !== API_ORIGIN || req.method() !== 'POST') return
  let body = null
  try {
    body = JSON.parse(req.postData() ?? 'null')
  } catch {
    body = req.postData()
  }
  const messages = Array.isArray(body?.batch) ? body.batch : body ? [body] : []
  const record = { method: req.method(), path: u.pathname, status: null, headers: null, body, messages, failure: null }
  sent.push(record)
  records.set(req, record)
  req.allHeaders().then((h) => (record.headers = h), () => {})
  req.response().then(
    (res) => (record.status = res ? res.status() : null),
    () => {},
  )
})
page.on('requestfailed', (req) => {
  const rec = records.get(req)
  if (rec) rec.failure = req.failure()?.errorText ?? 'failed'
})

const describe = (records) =>
  records.map((r) => `${r.method} ${r.path} [${r.messages.map((m) => m.type).join('+')}] -> ${r.status ?? r.failure ?? 'pending'}`).join(', ')

/** Wait until a request carrying a message of `type` was answered; fail on a refusal or a CORS/network failure. */
async function delivered(type, what) {
  const deadline = Date.now() + WAIT_MS
  for (;;) {
    const mine = sent.filter((r) => r.messages.some((m) => m.type === type))
    const good = mine.find((r) => r.status === 200)
    if (good) return good.messages.find((m) => m.type === type)
    const bad = mine.find((r) => (r.status && r.status !== 200) || r.failure)
    if (bad) {
      const why = !bad.failure
        ? `HTTP ${bad.status}`
        : bad.failure === 'net::ERR_FAILED'
          ? `${bad.failure} (CORS: chorus must allow the origin ${PAGE_ORIGIN} for this write key's source, and answer the preflight)`
          : `${bad.failure} (is chorus up at ${HOST}?)`
      await fail(`${what}: ${bad.method} ${bad.path} -> ${why}; page errors: ${short(pageErrors)}`)
    }
    if (foreign.length) await fail(`the page requested another origin (stopped by the local black-hole proxy): ${foreign[0]}`)
    if (Date.now() >= deadline) {
      await fail(`${what}: no ${type} message answered 200 within ${WAIT_MS / 1000} s; sent: ${describe(sent) || 'nothing'}; page errors: ${short(pageErrors)}`)
    }
    await sleep(100)
  }
}

// ---------------------------------------------------------------- drive the page
try {
  await page.goto(`${PAGE_ORIGIN}/`, { waitUntil: 'load', timeout: WAIT_MS })
} catch (e) {
  await fail(`cannot open ${PAGE_ORIGIN}/: ${e.message.split('\n')[0]}`)
}
let anonymousId
try {
  anonymousId = await page.evaluate(() => window.shop.ready)
} catch (e) {
  await fail(`AnalyticsBrowser.load failed in the page: ${e.message.split('\n')[0]}; page errors: ${short(pageErrors)}`)
}
if (!anonymousId) await fail('analytics.user().anonymousId() is empty')
ok(`analytics-next loaded from ${served.filter((p) => p.endsWith('.js')).join(', ')} with inline cdnSettings; anonymousId ${anonymousId}`)

const pageMsg = await delivered('page', 'page() on load')
await page.click('#view')
const trackMsg = await delivered('track', 'track("Product Viewed")')
for (const [label, m] of [['page', pageMsg], ['track', trackMsg]]) {
  if (m.userId || m.anonymousId !== anonymousId) await fail(`${label} should be anonymous (anonymousId ${anonymousId}, no userId): ${short(m)}`)
}
ok(`anonymous page + track "Product Viewed" delivered: ${describe(sent)}`)

/** A GET made by the page itself (CORS), as a site's own script would. */
const pageGet = (path, authorization) =>
  page.evaluate(
    async ({ url, authorization }) => {
      try {
        const res = await fetch(url, { headers: { Authorization: authorization } })
        const text = await res.text()
        let body = text
        try {
          body = JSON.parse(text)
        } catch {}
        return { status: res.status, body }
      } catch (e) {
        return { status: 0, body: String(e) }
      }
    },
    { url: HOST + path, authorization },
  )
const anonPath = `/v1/context/anonymous_id:${encodeURIComponent(anonymousId)}`
const basic = `Basic ${Buffer.from(`${WRITE_KEY}:`).toString('base64')}`

async function pagePoll(path, authorization, want, what) {
  const deadline = Date.now() + 60_000
  for (;;) {
    const r = await pageGet(path, authorization)
    if (want(r)) return r
    if (Date.now() >= deadline) await fail(`${what}: after 60 s the page's GET ${path} -> ${r.status} ${short(r.body)}`)
    await sleep(1000)
  }
}

if (BROWSER_READS) {
  await pagePoll(anonPath, basic, (r) => r.status === 200, 'anonymous context before login')
  ok(`page reads GET ${anonPath} with the write key (Basic) before login -> 200`)
}

// log in: identify(userId, {email, name})
await page.fill('input[name=user]', USER_ID)
await page.fill('input[name=email]', EMAIL)
await page.fill('input[name=fullname]', NAME)
await page.click('#login button[type=submit]')
const identifyMsg = await delivered('identify', 'identify at login')
if (identifyMsg.userId !== USER_ID || identifyMsg.anonymousId !== anonymousId) {
  await fail(`identify should carry userId ${USER_ID} and anonymousId ${anonymousId}: ${short(identifyMsg)}`)
}
ok(`login: identify("${USER_ID}", {email, name}) delivered with anonymousId ${anonymousId}`)
const sameAnon = await page.evaluate(() => window.shop.analytics.user().anonymousId())
if (sameAnon !== anonymousId) await fail(`the anonymous id changed at login: ${anonymousId} -> ${sameAnon}`)

// ---------------------------------------------------------------- verify with the secret key
const PROFILE = profilePath(`customer_id:${USER_ID}`)
const profile = await poll(
  PROFILE,
  (p) => (contains(p.identity, `anonymous_id:${anonymousId}`) || contains(p, anonymousId) ? null : `the profile does not contain ${anonymousId}: identity ${short(p.identity)}`),
  'anonymous id linked at login',
)
ok(`profile customer_id:${USER_ID} contains analytics-next's anonymous id ${anonymousId}`)

const anon = await poll(
  profilePath(`anonymous_id:${anonymousId}`),
  (p) => (p.canonical_id && p.canonical_id === profile.canonical_id ? null : `canonical_id ${short(p.canonical_id)}, want ${short(profile.canonical_id)}`),
  'anonymous profile',
)
ok(`anonymous_id:${anonymousId} answers the same canonical_id '${anon.canonical_id}'`)

const EXPECTED = { 'page.viewed': 1, 'product.viewed': 1 }
const final = await poll(
  PROFILE,
  (p) => {
    if (!Object.entries(EXPECTED).every(([t, n]) => counts(p)[t] === n)) return `event_counts ${short(counts(p))}, want ${short(EXPECTED)}`
    const types = activityTypes(p)
    if (!Object.keys(EXPECTED).every((t) => types.has(t))) return `recent_activity types [${[...types]}] lack ${Object.keys(EXPECTED)}`
    if (!contains(p.attributes, EMAIL) && !contains(p.identity, EMAIL)) return `the email ${EMAIL} is in neither attributes nor identity`
    return null
  },
  'anonymous events in the profile',
)
ok(`the anonymous page and track count in the known profile: event_counts ${short(counts(final))}; email ${EMAIL} kept`)

if (BROWSER_READS) {
  const after = await pagePoll(anonPath, basic, (r) => r.status === 403, 'anonymous context after login')
  if (after.body?.error?.code !== 'token_required') await fail(`after login the page's GET ${anonPath} -> 403 ${short(after.body)}, want code token_required`)
  ok(`after login the write key no longer reads ${anonPath}: 403 token_required`)

  let token
  try {
    const res = await fetch(`${HOST}/v1/tokens`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${SECRET_KEY}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ identifier: `customer_id:${USER_ID}`, scopes: ['read:context', 'read:recommendations'], ttl: '15m' }),
    })
    const body = await res.json().catch(() => null)
    if (res.status !== 200 || !body?.token) await fail(`POST /v1/tokens -> ${res.status} ${short(body)}`)
    token = body.token
  } catch (e) {
    await fail(`POST /v1/tokens: ${e.message}`)
  }
  const me = await pagePoll('/v1/context/me', `Bearer ${token}`, (r) => r.status === 200, 'visitor token')
  ok(`a visitor token (minted by the backend) reads GET /v1/context/me from the page -> 200 (keys: ${Object.keys(me.body ?? {}).sort().join(', ')})`)
}

if (foreign.length) await fail(`the page requested another origin (stopped by the local black-hole proxy): ${foreign[0]}`)
// the facts of the wire, for whoever reads the log
const first = sent[0]
ok(
  `wire: ${describe(sent)}; content-type ${first.headers?.['content-type']}; authorization ${(first.headers?.authorization ?? 'none').split(' ')[0]}; ` +
    `body keys ${Object.keys(first.body ?? {}).sort().join(',')}; messageId ${first.messages[0]?.messageId}`,
)
if (background.length) console.log(`info Chromium's own background requests, stopped locally: ${[...new Set(background)].join(', ')}`)
await context.close()
server.close()
blackHole.close()
fs.rmSync(userDataDir, { recursive: true, force: true })
console.log(`PASS browser_next (@segment/analytics-next, ${DELIVERY})`)
