#!/usr/bin/env python3
"""Segment's official Python library (segment-analytics-python, unchanged) against chorus.

Env: CHORUS_HTTP (e.g. http://127.0.0.1:8080), CHORUS_WRITE_KEY, CHORUS_SECRET_KEY.

Sends, with ids unique to this run:
  1. a sync_mode, gzip client: an anonymous "Product Viewed" (anonymous_id only), then the very
     same message again with the same message_id (a client retry);
  2. the module-level API (segment.analytics, a background consumer, flush()): alias(previous
     anonymous id -> user id), identify(traits), "Product Viewed", "Order Completed" (order_id,
     total, currency, products[]) and page, which the library batches into one POST /v1/batch.
Then reads chorus with the secret key (Authorization: Bearer), polling up to 60 s per check:
  the profile of customer_id:<user> carries the traits, purchase_count 1, lifetime_value = total,
  each event counted once (the duplicate is not), the anonymous event is in it (the alias linked
  the previous id: anonymous_id:<prev> answers the same canonical_id), and the context answers.
Prints one line per check; on failure prints one "FAIL: ..." line and exits 1.
"""

import gzip
import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import segment.analytics as analytics
from segment.analytics import Client
from segment.analytics import request as segment_request  # observed only, never changed

POLL_SECONDS = 60


def fail(reason):
    print(f"FAIL: {reason}", flush=True)
    sys.exit(1)


# anything unexpected still ends as one line
sys.excepthook = lambda kind, error, tb: fail(f"unexpected {kind.__name__}: {error}")


def ok(line):
    print(f"ok   {line}", flush=True)


def env(name):
    value = os.environ.get(name, "").strip()
    if not value:
        fail(f"{name} is not set")
    return value


HOST = env("CHORUS_HTTP").rstrip("/")
WRITE_KEY = env("CHORUS_WRITE_KEY")
SECRET_KEY = env("CHORUS_SECRET_KEY")

# ---------------------------------------------------------------- observe what the library sends
# A response hook on the library's own requests session: it records each request it made, and
# changes nothing about it.
sent = []


def _record(response, *args, **kwargs):
    req = response.request
    body = req.body or b""
    if isinstance(body, str):
        body = body.encode("utf-8")
    if req.headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    try:
        messages = len(json.loads(body).get("batch", []))
    except ValueError:
        messages = -1
    sent.append(
        {
            "method": req.method,
            "path": urllib.parse.urlsplit(req.url).path,
            "status": response.status_code,
            "messages": messages,
            "gzip": req.headers.get("Content-Encoding") == "gzip",
            "auth": (req.headers.get("Authorization") or "").split(" ")[0],
        }
    )


segment_request._session.hooks["response"].append(_record)


def describe(requests):
    return ", ".join(
        f"{r['method']} {r['path']} [{r['messages']} msg{', gzip' if r['gzip'] else ''}, {r['auth']}] -> {r['status']}"
        for r in requests
    )


# ---------------------------------------------------------------- the run's ids and payloads
SUFFIX = secrets.token_hex(5)
USER_ID = f"py-user-{SUFFIX}"
PREV_ANON = f"py-anon-{SUFFIX}"
EMAIL = f"py-{SUFFIX}@example.com"
NAME = f"Py Tester {SUFFIX}"
ORDER_ID = f"py-order-{SUFFIX}"
PRODUCTS = [
    {"product_id": f"py-sku-a-{SUFFIX}", "sku": "A-1", "name": "Trail Shoe", "price": 89.5, "quantity": 1, "category": "Shoes"},
    {"product_id": f"py-sku-b-{SUFFIX}", "sku": "B-2", "name": "Wool Sock", "price": 20.0, "quantity": 2, "category": "Socks"},
]
TOTAL = 129.5
DUP_MESSAGE_ID = f"py-dup-{SUFFIX}"

print(f"run  user={USER_ID} previous_anonymous_id={PREV_ANON} host={HOST}", flush=True)

# ---------------------------------------------------------------- 1. sync_mode + gzip client
sync_client = Client(WRITE_KEY, host=HOST, sync_mode=True, gzip=True, timeout=15)
viewed_anon = {"product_id": PRODUCTS[0]["product_id"], "price": PRODUCTS[0]["price"], "category": "Shoes", "name": "Trail Shoe"}
try:
    before = len(sent)
    sync_client.track(anonymous_id=PREV_ANON, event="Product Viewed", properties=viewed_anon, message_id=DUP_MESSAGE_ID)
    sync_client.track(anonymous_id=PREV_ANON, event="Product Viewed", properties=viewed_anon, message_id=DUP_MESSAGE_ID)
except segment_request.APIError as e:
    fail(f"sync_mode track rejected by {HOST}/v1/batch: {e}")
except Exception as e:  # connection refused, timeout, ...
    fail(f"sync_mode track could not reach {HOST}: {e.__class__.__name__}: {e}")
first = sent[before:]
if len(first) != 2 or any(r["status"] != 200 or r["path"] != "/v1/batch" or not r["gzip"] for r in first):
    fail(f"sync_mode anonymous track: expected 2 gzip POST /v1/batch answered 200, saw: {describe(first)}")
ok(f"sync_mode gzip: anonymous 'Product Viewed' sent twice with one messageId ({describe(first)})")

# ---------------------------------------------------------------- 2. module-level API, batched
errors = []
analytics.write_key = WRITE_KEY
analytics.host = HOST
analytics.max_retries = 2
analytics.on_error = lambda error, items: errors.append(f"{error} ({len(items)} messages)")

before = len(sent)
calls = [
    ("alias", lambda: analytics.alias(previous_id=PREV_ANON, user_id=USER_ID)),
    ("identify", lambda: analytics.identify(USER_ID, {"email": EMAIL, "name": NAME, "first_name": "Py", "plan": "gold"})),
    (
        "track Product Viewed",
        lambda: analytics.track(
            USER_ID,
            "Product Viewed",
            {"product_id": PRODUCTS[1]["product_id"], "price": PRODUCTS[1]["price"], "category": "Socks", "name": "Wool Sock"},
        ),
    ),
    (
        "track Order Completed",
        lambda: analytics.track(
            USER_ID,
            "Order Completed",
            {"order_id": ORDER_ID, "total": TOTAL, "revenue": TOTAL, "currency": "USD", "products": PRODUCTS},
        ),
    ),
    (
        "page",
        lambda: analytics.page(
            USER_ID,
            category="Shop",
            name="Checkout",
            properties={"url": f"https://shop.example/checkout?run={SUFFIX}", "path": "/checkout", "title": "Checkout"},
        ),
    ),
]
for label, call in calls:
    try:
        success, _ = call()
    except Exception as e:
        fail(f"analytics.{label} raised {e.__class__.__name__}: {e}")
    if not success:
        fail(f"analytics.{label} was not queued")
analytics.flush()
if errors:
    fail(f"the library reported a delivery error: {errors[0]}")
batch = sent[before:]
delivered = sum(r["messages"] for r in batch if r["status"] == 200)
if not batch or any(r["status"] != 200 or r["path"] != "/v1/batch" for r in batch) or delivered != len(calls):
    fail(f"batched calls: expected {len(calls)} messages in POST /v1/batch answered 200, saw: {describe(batch)}")
if max(r["messages"] for r in batch) < 2:
    fail(f"batched calls: the library sent no multi-message batch: {describe(batch)}")
ok(f"module API: alias, identify, 2 tracks, page flushed as {describe(batch)}")

# ---------------------------------------------------------------- reads (secret key), polled


def get(path):
    req = urllib.request.Request(HOST + path, headers={"Authorization": f"Bearer {SECRET_KEY}", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, json.loads(res.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, f"{e.__class__.__name__}: {e}"


def poll(path, check, what):
    """GET path until check(body) returns None (satisfied) or 60 s pass; check returns a reason otherwise."""
    deadline = time.monotonic() + POLL_SECONDS
    while True:
        status, body = get(path)
        if status in (401, 403):
            fail(f"GET {path} -> {status} {json.dumps(body)[:300]} (is CHORUS_SECRET_KEY a secret key with every scope?)")
        reason = check(body) if status == 200 and isinstance(body, dict) else f"GET {path} -> {status} {json.dumps(body)[:300]}"
        if reason is None:
            return body
        if time.monotonic() >= deadline:
            fail(f"{what}: after {POLL_SECONDS} s, {reason}")
        time.sleep(1)


def contains(value, needle):
    if isinstance(value, dict):
        return any(contains(v, needle) for v in value.values())
    if isinstance(value, list):
        return any(contains(v, needle) for v in value)
    return value == needle


def counts(p):
    return p.get("event_counts") or {}


def metric(p, name):
    return (p.get("metrics") or {}).get(name)


PROFILE = f"/v1/profiles/{urllib.parse.quote('customer_id:' + USER_ID, safe=':')}"
EXPECTED = {"product.viewed": 2, "order.completed": 1, "page.viewed": 1}

poll(
    PROFILE,
    lambda p: None
    if contains(p.get("attributes"), NAME) and contains(p.get("attributes"), "gold")
    else f"attributes lack the identify traits name/plan: {json.dumps(p.get('attributes'))[:300]}",
    "identify traits",
)
ok(f"profile customer_id:{USER_ID} attributes carry the traits (name={NAME!r}, plan='gold')")

p = poll(
    PROFILE,
    lambda p: None
    if contains(p.get("attributes"), EMAIL) or contains(p.get("identity"), EMAIL)
    else f"neither attributes nor identity carry the email: {json.dumps({'attributes': p.get('attributes'), 'identity': p.get('identity')})[:300]}",
    "identify email",
)
ok(f"profile carries the email trait {EMAIL}")

poll(
    PROFILE,
    lambda p: None
    if metric(p, "purchase_count") == 1 and abs(float(metric(p, "lifetime_value") or 0) - TOTAL) < 0.005
    else f"metrics purchase_count={metric(p, 'purchase_count')} lifetime_value={metric(p, 'lifetime_value')}, want 1 and {TOTAL}",
    "order metrics",
)
ok(f"metrics: purchase_count 1, lifetime_value {TOTAL} (Order Completed {ORDER_ID})")

poll(
    PROFILE,
    lambda p: None
    if all(counts(p).get(t) == n for t, n in EXPECTED.items())
    else f"event_counts {json.dumps(counts(p))}, want {json.dumps(EXPECTED)} (the anonymous event is one of the two product.viewed)",
    "event counts",
)
ok(f"event_counts {json.dumps(EXPECTED)}: the aliased anonymous view is counted, its duplicate messageId is not")

anon = poll(
    f"/v1/profiles/{urllib.parse.quote('anonymous_id:' + PREV_ANON, safe=':')}",
    lambda a: None if a.get("canonical_id") and a.get("canonical_id") == p.get("canonical_id") else f"canonical_id {a.get('canonical_id')!r}, want {p.get('canonical_id')!r}",
    "alias",
)
ok(f"alias: anonymous_id:{PREV_ANON} answers the same canonical_id {anon['canonical_id']!r}")

context = poll(f"/v1/context/{urllib.parse.quote('customer_id:' + USER_ID, safe=':')}", lambda c: None, "context")
ok(f"GET /v1/context/customer_id:{USER_ID} answers (keys: {', '.join(sorted(context))})")

# last, after every other effect has shown: nothing was counted twice meanwhile
time.sleep(2)
status, p = get(PROFILE)
if status != 200:
    fail(f"GET {PROFILE} -> {status} on the final read")
if any(counts(p).get(t) != n for t, n in EXPECTED.items()):
    fail(f"final read: event_counts {json.dumps(counts(p))}, want {json.dumps(EXPECTED)}")
total_counted = sum(counts(p).values())
if metric(p, "event_count") != total_counted:
    fail(f"final read: metrics.event_count {metric(p, 'event_count')} != sum of event_counts {total_counted} ({json.dumps(counts(p))})")
types = {a.get("type") or a.get("event_type") for a in p.get("recent_activity") or []}
if not set(EXPECTED) <= types:
    fail(f"final read: recent_activity types {sorted(t for t in types if t)} lack {sorted(set(EXPECTED) - types)}")
ok(f"final read: event_count {total_counted} = sum of event_counts {json.dumps(counts(p))}; recent_activity has {', '.join(sorted(EXPECTED))}")
print("PASS python_client (segment-analytics-python)", flush=True)
