//! The Segment-compatible HTTP Tracking API on the real binary (embedded broker): the
//! spec's example payloads for every call type, batches mixing types, gzip, text/plain,
//! both auth forms, Segment's limits at exactly their size and one byte over, duplicate
//! messageIds, clock-skew correction, CORS, and bad input refused whole.

mod common;

use common::*;
use flate2::write::GzEncoder;
use serde_json::{json, Value};
use std::io::Write as _;

fn fixture(name: &str) -> Value {
    let path = format!("{}/processors/tests/fixtures/segment/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// How a call authenticates.
#[derive(Clone, Copy)]
enum Auth {
    /// `Basic base64(key:)`.
    Basic,
    /// `Basic base64(key)`, no colon.
    BasicNoColon,
    /// `writeKey` in the body.
    Body,
}

struct Call<'a> {
    path: &'a str,
    body: Value,
    auth: Auth,
    gzip: bool,
    text_plain: bool,
    origin: Option<&'a str>,
}

impl<'a> Call<'a> {
    fn new(path: &'a str, body: Value) -> Call<'a> {
        Call { path, body, auth: Auth::Basic, gzip: false, text_plain: false, origin: None }
    }
}

/// POST a call with the test source's write key as it says; (status, JSON answer).
fn send(http: &str, call: Call<'_>) -> (u16, Value) {
    let mut body = call.body;
    let mut request = reqwest::blocking::Client::new().post(format!("{http}{}", call.path));
    match call.auth {
        Auth::Basic => request = request.basic_auth(WRITE_KEY, Some("")),
        Auth::BasicNoColon => {
            use base64::Engine as _;
            let encoded = base64::engine::general_purpose::STANDARD.encode(WRITE_KEY);
            request = request.header("Authorization", format!("Basic {encoded}"));
        }
        Auth::Body => body["writeKey"] = json!(WRITE_KEY),
    }
    send_raw(request, body.to_string().into_bytes(), call.gzip, call.text_plain, call.origin)
}

fn send_raw(
    mut request: reqwest::blocking::RequestBuilder,
    bytes: Vec<u8>,
    gzip: bool,
    text_plain: bool,
    origin: Option<&str>,
) -> (u16, Value) {
    let bytes = if gzip {
        let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&bytes).unwrap();
        request = request.header("Content-Encoding", "gzip");
        encoder.finish().unwrap()
    } else {
        bytes
    };
    request = request.header("Content-Type", if text_plain { "text/plain" } else { "application/json" });
    if let Some(origin) = origin {
        request = request.header("Origin", origin);
    }
    let response = request.body(bytes).send().unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

fn profile(http: &str, identifier: &str) -> Option<Value> {
    let (status, p) = get_json(&format!("{http}/v1/profiles/{identifier}"));
    (status == 200).then_some(p)
}

fn event_count(p: &Value) -> i64 {
    p["metrics"]["event_count"].as_i64().unwrap_or(-1)
}

#[test]
fn spec_examples_of_every_call_type_reach_profiles_in_every_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let chorus = Chorus::up(&dir.path().join("data"), &test_topology(dir.path()));
    let http = chorus.http().to_owned();
    let ok = json!({"success": true});
    // Each call type on its long or short route, each auth form, each encoding.
    let calls = [
        ("/v1/identify", "identify", Auth::Basic, false, false),
        ("/v1/t", "track", Auth::BasicNoColon, true, false),
        ("/v1/page", "page", Auth::Body, false, true),
        ("/v1/s", "screen", Auth::Basic, true, true),
        ("/v1/group", "group", Auth::Body, true, false),
        ("/v1/a", "alias", Auth::BasicNoColon, false, true),
    ];
    for (path, name, auth, gzip, text_plain) in calls {
        let mut body = fixture(name);
        if name == "alias" {
            // The example's anonymousId is Peter's (identify's): linking it to another
            // userId is refused by the one-customer_id guard. Alias the previous id alone.
            body.as_object_mut().unwrap().remove("anonymousId");
        }
        let call = Call { auth, gzip, text_plain, ..Call::new(path, body) };
        assert_eq!(send(&http, call), (200, ok.clone()), "{path}");
    }
    // A batch mixing types, with batch-level context and sentAt, as analytics-python sends.
    let mut order = fixture("order-completed");
    order.as_object_mut().unwrap().remove("sentAt");
    let batch = json!({
        "batch": [
            {"type": "identify", "userId": "mixed-1", "traits": {"email": "mixed@example.com", "plan": "pro"},
             "messageId": "mixed-identify"},
            {"type": "track", "userId": "mixed-1", "event": "Product Viewed", "messageId": "mixed-view",
             "properties": {"product_id": "p-9", "category": "outdoor", "price": 49.0}},
            {"type": "page", "userId": "mixed-1", "name": "Pricing", "messageId": "mixed-page",
             "properties": {"url": "https://example.com/pricing"}},
            order,
        ],
        "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
        "sentAt": "2015-02-23T22:30:00.000Z",
    });
    assert_eq!(send(&http, Call::new("/v1/batch", batch.clone())), (200, ok.clone()));
    assert_eq!(send(&http, Call { gzip: true, auth: Auth::Body, ..Call::new("/v1/b", batch) }), (200, ok));

    // identify's traits, group's account traits, page and screen, on one customer.
    let peter = eventually(60, "the spec examples on Peter's profile", || {
        profile(&http, "97980cfea0067").filter(|p| {
            p["attributes"]["account"]["name"] == "Initech"
                && p["event_counts"]["page.viewed"] == 1
                && p["event_counts"]["screen.viewed"] == 1
        })
    });
    assert_eq!(peter["attributes"]["name"], "Peter Gibbons");
    assert_eq!(peter["attributes"]["address"]["city"], "San Francisco");
    assert_eq!(peter["identity"]["email"], "peter@example.com");
    assert_eq!(peter["attributes"]["account"]["id"], "0e8c78ea9d97a7b8185e8632");
    // The order (sent twice, once as a batch and once gzipped: same messageId) counted once.
    assert_eq!(peter["metrics"]["purchase_count"], 1);
    assert_eq!(peter["metrics"]["lifetime_value"], 27.5);
    // The anonymous id of identify belongs to Peter.
    assert_eq!(profile(&http, "anonymous_id:507f191e810c19729de860ea").unwrap()["canonical_id"], peter["canonical_id"]);

    // alias linked the previous id to the user.
    let aliased = eventually(60, "the alias to link", || {
        let (a, b) = (profile(&http, "507f191e81")?, profile(&http, "anonymous_id:39239-239239-239239-23923")?);
        (a["canonical_id"] == b["canonical_id"]).then_some(a)
    });
    assert_eq!(aliased["customer_id"], "507f191e81");

    // The mixed batch, sent twice, counted once.
    let mixed = eventually(60, "the mixed batch", || {
        profile(&http, "mixed-1").filter(|p| event_count(p) == 3 && p["attributes"]["plan"] == "pro")
    });
    assert_eq!(mixed["identity"]["email"], "mixed@example.com");
    assert_eq!(mixed["event_counts"]["product.viewed"], 1);
    let context = eventually(60, "the context of the batch", || {
        let (status, c) = get_json(&format!("{http}/v1/context/mixed-1"));
        (status == 200).then_some(c)
    });
    assert!(context.to_string().contains("p-9"), "{context}");

    // What reached events.raw: the source and library are on the event.
    let raw = tail(chorus.bootstrap(), "events.raw", 2_000);
    let view = raw.iter().map(|r| &r["value"]).find(|v| v["event_id"] == "mixed-view").unwrap();
    assert_eq!(view["context"]["source"], "website");
    assert_eq!(view["context"]["library"]["name"], "analytics-python");
    assert_eq!(view["channel"], "web");
}

/// A message of exactly `size` bytes (compact JSON) for user `user`.
fn message_of(size: usize, user: &str, id: &str) -> Value {
    let mut m = json!({"type": "track", "event": "Product Viewed", "userId": user, "messageId": id,
                       "properties": {"pad": ""}});
    let base = m.to_string().len();
    assert!(size >= base);
    m["properties"]["pad"] = json!("x".repeat(size - base));
    assert_eq!(m.to_string().len(), size);
    m
}

/// A batch body of exactly `size` bytes with `n` messages (the last one padded).
fn batch_of(size: usize, n: usize, user: &str, id: &str) -> String {
    let each = size / n - 16;
    let mut messages: Vec<Value> = (0..n).map(|i| message_of(each, user, &format!("{id}-{i}"))).collect();
    let frame = json!({"batch": messages}).to_string().len();
    let last = messages.len() - 1;
    let need = size - frame + each;
    assert!(need <= 32 * 1024, "a message of {need} bytes");
    messages[last] = message_of(need, user, &format!("{id}-{last}"));
    let body = json!({"batch": messages}).to_string();
    assert_eq!(body.len(), size);
    body
}

fn post_raw(http: &str, path: &str, body: String) -> (u16, Value) {
    let request = reqwest::blocking::Client::new().post(format!("{http}{path}")).basic_auth(WRITE_KEY, Some(""));
    send_raw(request, body.into_bytes(), false, false, None)
}

#[test]
fn limits_hold_at_exactly_their_size_and_refuse_one_byte_more() {
    let dir = tempfile::tempdir().unwrap();
    let chorus = Chorus::up(&dir.path().join("data"), &test_topology(dir.path()));
    let http = chorus.http().to_owned();

    // 32 KB per message, on a single call.
    assert_eq!(post_raw(&http, "/v1/track", message_of(32 * 1024, "lim-1", "lim-1-a").to_string()).0, 200);
    let (status, body) = post_raw(&http, "/v1/track", message_of(32 * 1024 + 1, "lim-1", "lim-1-b").to_string());
    assert_eq!(status, 413);
    assert_eq!(body["code"], "payload_too_large");
    assert!(body["message"].is_string());
    // ... and inside a batch.
    let big = json!({"batch": [message_of(32 * 1024 + 1, "lim-2", "lim-2-a")]}).to_string();
    let (status, body) = post_raw(&http, "/v1/batch", big);
    assert_eq!((status, body["code"].as_str()), (413, Some("message_too_large")));
    assert_eq!(body["field"], "batch[0]");

    // 500 KB per batch.
    assert_eq!(post_raw(&http, "/v1/batch", batch_of(500 * 1024, 20, "lim-3", "lim-3")).0, 200);
    let (status, body) = post_raw(&http, "/v1/batch", batch_of(500 * 1024 + 1, 20, "lim-4", "lim-4"));
    assert_eq!((status, body["code"].as_str()), (413, Some("payload_too_large")));

    // 2,500 messages per batch.
    let messages = |n: usize, user: &str| -> String {
        let batch: Vec<Value> = (0..n)
            .map(|i| json!({"type": "track", "event": "Product Viewed", "userId": user, "messageId": format!("{user}-{i}")}))
            .collect();
        json!({"batch": batch}).to_string()
    };
    assert_eq!(post_raw(&http, "/v1/batch", messages(2_500, "lim-5")).0, 200);
    let (status, body) = post_raw(&http, "/v1/batch", messages(2_501, "lim-6"));
    assert_eq!((status, body["code"].as_str()), (400, Some("too_many_messages")));

    // What was accepted is counted; what was refused never arrives.
    eventually(120, "the accepted calls on their profiles", || {
        let ok = [("lim-1", 1), ("lim-3", 20), ("lim-5", 2_500)]
            .iter()
            .all(|(user, n)| profile(&http, user).is_some_and(|p| event_count(&p) == *n));
        ok.then_some(())
    });
    for refused in ["lim-2", "lim-4", "lim-6"] {
        assert!(profile(&http, refused).is_none(), "{refused} was refused whole");
    }
    assert_eq!(event_count(&profile(&http, "lim-1").unwrap()), 1, "the oversized lim-1 message was not written");
}

#[test]
fn duplicates_clock_skew_bad_input_and_auth_answer_as_segment_does() {
    let dir = tempfile::tempdir().unwrap();
    // Calls come through a trusted proxy on 127.0.0.1 (a load balancer).
    let path = test_topology(dir.path());
    let text = std::fs::read_to_string(&path).unwrap().replace("trusted_proxies: []", "trusted_proxies: [127.0.0.1]");
    std::fs::write(&path, text).unwrap();
    let chorus = Chorus::up(&dir.path().join("data"), &path);
    let http = chorus.http().to_owned();

    // A message sent twice (a client retry) is counted once.
    let once = json!({"userId": "dup-1", "event": "Product Viewed", "messageId": "dup-message-1",
                      "properties": {"product_id": "p-1"}});
    assert_eq!(send(&http, Call::new("/v1/track", once.clone())).0, 200);
    assert_eq!(send(&http, Call::new("/v1/track", once)).0, 200);

    // A client clock 10 minutes fast: stamped and sent by its clock, 2 s apart.
    let now = jiff::Timestamp::now();
    let fast = now + jiff::SignedDuration::from_secs(600);
    let skewed = json!({"userId": "skew-1", "event": "Product Viewed", "messageId": "skew-message",
        "timestamp": (fast - jiff::SignedDuration::from_secs(2)).to_string(), "sentAt": fast.to_string()});
    assert_eq!(send(&http, Call::new("/v1/track", skewed)).0, 200);

    // Bad input: a JSON 400 naming the field, and nothing of the call written.
    let bad_calls = [
        (Call { text_plain: true, ..Call::new("/v1/track", json!("not an object")) }, 400, "invalid_request", None),
        (Call::new("/v1/track", json!({"userId": "bad-1", "event": 7})), 400, "invalid_message", Some("event")),
        (Call::new("/v1/identify", json!({"traits": {"a": 1}})), 400, "invalid_message", Some("userId")),
        (
            Call::new(
                "/v1/batch",
                json!({"batch": [
                    {"type": "track", "userId": "bad-2", "event": "Product Viewed", "messageId": "bad-2-ok"},
                    {"type": "purchase", "userId": "bad-2"}]}),
            ),
            400,
            "invalid_message",
            Some("batch[1].type"),
        ),
        (
            Call::new(
                "/v1/batch",
                json!({"batch": [
                    {"type": "identify", "userId": "bad-3", "messageId": "bad-3-ok"},
                    {"type": "track", "userId": "bad-3", "event": "Product Viewed", "properties": "cheap"}]}),
            ),
            400,
            "invalid_message",
            Some("batch[1].properties"),
        ),
        (Call::new("/v1/batch", json!({"batch": {"type": "track"}})), 400, "invalid_request", Some("batch")),
    ];
    for (call, status, code, field) in bad_calls {
        let path = call.path;
        let (got, body) = send(&http, call);
        assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{path}: {body}");
        assert_eq!(body["field"].as_str(), field, "{path}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let request = reqwest::blocking::Client::new().post(format!("{http}/v1/track")).basic_auth(WRITE_KEY, Some(""));
    let (status, body) = send_raw(request, b"{\"userId\": ".to_vec(), false, true, None);
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_json")));

    // Auth: missing and unknown write keys are 401 (Segment answers 200 and drops them).
    let unauthenticated = reqwest::blocking::Client::new().post(format!("{http}/v1/track"));
    let body = json!({"userId": "auth-1", "event": "Product Viewed"}).to_string().into_bytes();
    let (status, answer) = send_raw(unauthenticated, body.clone(), false, false, None);
    assert_eq!((status, answer["code"].as_str()), (401, Some("unauthorized")));
    let wrong =
        reqwest::blocking::Client::new().post(format!("{http}/v1/track")).basic_auth("wk_nobody_knows", Some(""));
    assert_eq!(send_raw(wrong, body.clone(), false, false, None).0, 401);
    // The rotated second key of the source works too.
    let rotated =
        reqwest::blocking::Client::new().post(format!("{http}/v1/track")).basic_auth("wk_test_website_next", Some(""));
    let rotated_body = json!({"userId": "rotated-1", "event": "Product Viewed"}).to_string().into_bytes();
    assert_eq!(send_raw(rotated, rotated_body, false, false, None).0, 200);
    // A secret API key is not a write key.
    let secret = reqwest::blocking::Client::new().post(format!("{http}/v1/track")).basic_auth(SECRET_KEY, Some(""));
    assert_eq!(send_raw(secret, body.clone(), false, false, None).0, 401);

    // CORS: an origin the source allows gets its preflight and the header; another is refused.
    let preflight = |origin: &str| {
        reqwest::blocking::Client::new()
            .request(reqwest::Method::OPTIONS, format!("{http}/v1/t"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "authorization, x-retry-count")
            .send()
            .unwrap()
    };
    let allowed = preflight("http://127.0.0.1:5173");
    assert_eq!(allowed.status().as_u16(), 204);
    assert_eq!(allowed.headers()["access-control-allow-origin"], "http://127.0.0.1:5173");
    assert!(allowed.headers()["access-control-allow-headers"].to_str().unwrap().contains("x-retry-count"));
    assert_eq!(preflight("https://evil.example").status().as_u16(), 403);
    let from_page =
        Call { origin: Some("http://localhost:8000"), ..Call::new("/v1/page", json!({"anonymousId": "cors-1"})) };
    assert_eq!(send(&http, from_page).0, 200);
    // The store backend's key has no browser origins.
    let store =
        reqwest::blocking::Client::new().post(format!("{http}/v1/track")).basic_auth("wk_test_store_0123456", Some(""));
    let (status, answer) = send_raw(store, body, false, false, Some("http://localhost:8000"));
    assert_eq!((status, answer["code"].as_str()), (403, Some("origin_not_allowed")));

    // Without context.ip, the event carries the client's address: behind the trusted
    // proxy, the last hop of X-Forwarded-For it did not add itself.
    let forwarded = reqwest::blocking::Client::new()
        .post(format!("{http}/v1/page"))
        .basic_auth(WRITE_KEY, Some(""))
        .header("X-Forwarded-For", "198.51.100.1, 203.0.113.77")
        .json(&json!({"anonymousId": "xff-1", "messageId": "xff-message"}));
    assert_eq!(forwarded.send().unwrap().status().as_u16(), 200);

    // A marker after everything above: once it is processed (one events.raw partition,
    // so in order), everything earlier is too.
    assert_eq!(send(&http, Call::new("/v1/track", json!({"userId": "marker", "event": "Product Viewed"}))).0, 200);
    eventually(60, "the marker", || profile(&http, "marker"));
    assert!(profile(&http, "rotated-1").is_some());
    assert!(profile(&http, "anonymous_id:cors-1").is_some(), "the page view from an allowed origin");
    assert_eq!(event_count(&profile(&http, "dup-1").unwrap()), 1, "a repeated messageId counts once");
    for refused in ["bad-1", "bad-2", "bad-3", "auth-1"] {
        assert!(profile(&http, refused).is_none(), "nothing of {refused}'s refused call was written");
    }
    // The skewed event happened 2 s before chorus received it, whatever the client's clock said.
    let raw = tail(chorus.bootstrap(), "events.raw", 2_000);
    let event = raw.iter().map(|r| &r["value"]).find(|v| v["event_id"] == "skew-message").unwrap();
    let ms = |v: &Value| v.as_str().unwrap().parse::<jiff::Timestamp>().unwrap().as_millisecond();
    let (at, received) = (ms(&event["timestamp"]), ms(&event["context"]["received_at"]));
    assert_eq!(received - at, 2_000, "{event}");
    assert!((received - now.as_millisecond()).abs() < 30_000, "received now, not ten minutes ahead: {event}");
    let xff = raw.iter().map(|r| &r["value"]).find(|v| v["event_id"] == "xff-message").unwrap();
    assert_eq!(xff["context"]["ip"], "203.0.113.77");
    let original = ms(&event["context"]["original_timestamp"]);
    assert!((original - at - 600_000).abs() < 1_000, "the client's own timestamp is kept: {event}");

    // Refusals are counted.
    let (_, metrics) = get_text(&format!("{http}/metrics"));
    assert!(metrics.contains("chorus_auth_failures_total{reason=\"unknown_key\"}"), "auth failures in /metrics");
    assert!(metrics.contains("chorus_tracking_messages_total{source=\"website\",type=\"track\"}"));
}
