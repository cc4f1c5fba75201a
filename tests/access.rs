//! Access control on the real binary: every endpoint without a key, with a wrong key,
//! with a key lacking the scope, and with a visitor token for another customer answers
//! 401 or 403 with a JSON error and no data; visitor tokens read their own customer;
//! a write key reads only an anonymous visitor's own data; members need the cluster
//! secret; repeated failures are rate-limited; `chorus up` prints development keys.

mod common;

use common::*;
use reqwest::blocking::{Client, RequestBuilder};
use reqwest::Method;
use serde_json::{json, Value};

/// Every keyed route, with a request that would succeed with the right key.
fn routes() -> Vec<(Method, &'static str, Option<Value>)> {
    let privacy = json!({"type": "access", "identifier": {"type": "customer_id", "value": "u1"}});
    vec![
        (Method::GET, "/v1/profiles/u1", None),
        (Method::GET, "/v1/context/u1", None),
        (Method::GET, "/v1/recommendations/u1", None),
        (Method::GET, "/v1/consent/u1", None),
        (Method::PUT, "/v1/consent/u1", Some(json!({"purposes": {"marketing_email": true}, "source": "test"}))),
        (Method::GET, "/v1/identity/customer_id/u1", None),
        (Method::POST, "/v1/identity/unlink", Some(json!({"type": "email", "value": "ann@example.com"}))),
        (Method::GET, "/v1/content/cart_reminder?channel=email&customer=u1", None),
        (Method::GET, "/v1/instances", None),
        (Method::POST, "/v1/privacy/requests", Some(privacy)),
        (
            Method::POST,
            "/v1/privacy/unsuppress",
            Some(json!({"identifier": {"type": "email", "value": "x@example.com"}})),
        ),
        (Method::GET, "/v1/privacy/requests/0193a5b0-0000-7000-8000-000000000000", None),
        (Method::GET, "/v1/privacy/requests/0193a5b0-0000-7000-8000-000000000000/export", None),
        (Method::GET, "/v1/privacy/requests/0193a5b0-0000-7000-8000-000000000000/export.zip", None),
        (Method::POST, "/v1/tokens", Some(json!({"identifier": "customer_id:u1"}))),
        (
            Method::POST,
            "/v1/events",
            Some(json!({"event_id": "e-x", "event_type": "page.viewed",
            "timestamp": "2024-02-14T10:30:00Z", "customer_id": "u9"})),
        ),
        (Method::GET, "/internal/v1/stores/profile/0/profiles?key=x", None),
    ]
}

fn request(http: &str, method: &Method, path: &str, body: &Option<Value>) -> RequestBuilder {
    let r = Client::new().request(method.clone(), format!("{http}{path}"));
    match body {
        Some(b) => r.json(b),
        None => r,
    }
}

/// (status, body) of a refused request, checked to be a JSON error with no data.
fn refused(r: RequestBuilder, what: &str) -> (u16, String) {
    let response = r.send().unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().unwrap_or(Value::Null);
    let keys: Vec<&String> = body.as_object().map(|o| o.keys().collect()).unwrap_or_default();
    assert_eq!(keys, vec!["error"], "{what}: {status} {body}");
    let code = body["error"]["code"].as_str().unwrap_or_default().to_owned();
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
    (status, code)
}

fn mint(http: &str, identifier: &str, scopes: Value) -> String {
    let (status, body) = post_json(&format!("{http}/v1/tokens"), &json!({"identifier": identifier, "scopes": scopes}));
    assert_eq!(status, 200, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

#[test]
fn every_endpoint_refuses_missing_wrong_narrow_and_foreign_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let chorus = Chorus::up(&dir.path().join("data"), &test_topology(dir.path()));
    let http = chorus.http().to_owned();
    produce(
        chorus.bootstrap(),
        "events.raw",
        &[
            json!({"event_id": "a-1", "event_type": "identify", "timestamp": ts(T0), "customer_id": "u1",
                   "traits": {"email": "ann@example.com", "name": "Ann"}}),
            json!({"event_id": "a-2", "event_type": "identify", "timestamp": ts(T0), "customer_id": "u2",
                   "traits": {"email": "bob@example.com", "name": "Bob"}}),
        ],
    );
    eventually(60, "both customers", || {
        let ok = get_json(&format!("{http}/v1/profiles/u1")).0 == 200
            && get_json(&format!("{http}/v1/profiles/u2")).0 == 200;
        ok.then_some(())
    });
    let foreign = mint(
        &http,
        "customer_id:u2",
        json!(["read:profiles", "read:context", "read:recommendations", "read:consent", "write:consent"]),
    );

    for (method, path, body) in routes() {
        let what = format!("{method} {path}");
        let (status, code) = refused(request(&http, &method, path, &body), &format!("{what} without a key"));
        assert_eq!((status, code.as_str()), (401, "unauthorized"), "{what} without a key");
        let wrong = request(&http, &method, path, &body).bearer_auth("sk_wrong_0123456789abcdefghij");
        assert_eq!(refused(wrong, &what).0, 401, "{what} with a wrong key");
        let wrong_cluster = request(&http, &method, path, &body).header("x-chorus-cluster-key", "guess");
        assert_eq!(refused(wrong_cluster, &what).0, 401, "{what} with a wrong cluster key");
        if path.starts_with("/internal/") {
            // Only the cluster secret opens it; no API key does.
            assert_eq!(refused(request(&http, &method, path, &body).bearer_auth(SECRET_KEY), &what).0, 401);
            continue;
        }
        // The reader key holds read:profiles only.
        if !path.starts_with("/v1/profiles/") {
            let narrow = request(&http, &method, path, &body).bearer_auth(READER_KEY);
            let (status, code) = refused(narrow, &format!("{what} with a key lacking the scope"));
            assert_eq!((status, code.as_str()), (403, "insufficient_scope"), "{what} with a narrow key");
        }
        // A visitor token for u2 never reads or changes u1, nor anything administrative.
        let (status, code) = refused(request(&http, &method, path, &body).bearer_auth(&foreign), &what);
        assert_eq!(status, 403, "{what} with u2's visitor token: {code}");
        // A write key only sends events.
        if path != "/v1/events" {
            let write = request(&http, &method, path, &body).basic_auth(WRITE_KEY, Some(""));
            assert!(matches!(refused(write, &what).0, 401 | 403), "{what} with a write key");
        }
    }
    // The same requests with the right key are not refused.
    for (method, path, body) in routes().into_iter().filter(|(_, p, _)| !p.starts_with("/internal/")) {
        let status = request(&http, &method, path, &body).bearer_auth(SECRET_KEY).send().unwrap().status().as_u16();
        assert!(status != 401 && status != 403, "{method} {path} with the secret key: {status}");
    }
    // Health and metrics stay open; refusals are counted there.
    assert_eq!(Client::new().get(format!("{http}/healthz")).send().unwrap().status().as_u16(), 200);
    let metrics = Client::new().get(format!("{http}/metrics")).send().unwrap().text().unwrap();
    for reason in ["missing", "unknown_key", "insufficient_scope", "wrong_customer"] {
        assert!(metrics.contains(&format!("chorus_auth_failures_total{{reason=\"{reason}\"}}")), "{reason}");
    }
    // No key ever appears in the log or the metrics.
    assert!(!metrics.contains(SECRET_KEY) && !metrics.contains(WRITE_KEY));
}

#[test]
fn visitor_tokens_and_anonymous_visitors_read_only_their_own_data() {
    let dir = tempfile::tempdir().unwrap();
    let chorus = Chorus::up(&dir.path().join("data"), &test_topology(dir.path()));
    let http = chorus.http().to_owned();
    let anonymous_page = |anon: &str, id: &str| {
        json!({"event_id": id, "event_type": "product.viewed", "timestamp": ts(T0), "anonymous_id": anon,
               "channel": "web", "payload": {"product_id": "tent-2p", "category": "outdoor", "price": 299.0}})
    };
    produce(chorus.bootstrap(), "events.raw", &[anonymous_page("anon-a", "v-1"), anonymous_page("anon-b", "v-2")]);
    let write_key_read =
        |path: &str| Client::new().get(format!("{http}{path}")).basic_auth(WRITE_KEY, Some("")).send().unwrap();
    // An anonymous visitor's browser reads its own context with the site's write key.
    eventually(60, "anon-a's context", || {
        (write_key_read("/v1/context/anonymous_id:anon-a").status() == 200).then_some(())
    });
    assert_eq!(write_key_read("/v1/recommendations/anonymous_id:anon-a").status().as_u16(), 200);
    // ... not by another kind of identifier, not its profile.
    for path in ["/v1/context/anon-a", "/v1/context/customer_id:u1", "/v1/profiles/anonymous_id:anon-a"] {
        let (status, _) = refused(Client::new().get(format!("{http}{path}")).basic_auth(WRITE_KEY, Some("")), path);
        assert_eq!(status, 403, "{path}");
    }
    // Login links anon-a to u1: from then on the write key no longer reads it.
    produce(
        chorus.bootstrap(),
        "events.raw",
        &[json!({"event_id": "v-3", "event_type": "identify", "timestamp": ts(T0 + 1000), "customer_id": "u1",
                 "anonymous_id": "anon-a", "traits": {"email": "ann@example.com"}})],
    );
    eventually(60, "the login", || {
        let r = write_key_read("/v1/context/anonymous_id:anon-a");
        (r.status() == 403 && r.json::<Value>().ok()?["error"]["code"] == "token_required").then_some(())
    });
    // The site's backend mints a token for u1: it reads u1 by any identifier, and `me`.
    let token = mint(&http, "customer_id:u1", json!(["read:context", "read:recommendations"]));
    let with_token = |path: &str| Client::new().get(format!("{http}{path}")).bearer_auth(&token).send().unwrap();
    for path in
        ["/v1/context/me", "/v1/context/customer_id:u1", "/v1/context/anonymous_id:anon-a", "/v1/recommendations/me"]
    {
        let r = with_token(path);
        assert_eq!(r.status().as_u16(), 200, "{path}");
        let body: Value = r.json().unwrap();
        assert!(body.to_string().contains("tent-2p") || path.starts_with("/v1/recommendations"), "{path}: {body}");
    }
    // Not anon-b, not a profile (no scope), not another customer's email.
    for path in ["/v1/context/anonymous_id:anon-b", "/v1/profiles/me", "/v1/context/bob@example.com"] {
        assert_eq!(refused(Client::new().get(format!("{http}{path}")).bearer_auth(&token), path).0, 403, "{path}");
    }
    // A tampered token is refused.
    let tampered = format!("{}x", &token[..token.len() - 1]);
    assert_eq!(refused(Client::new().get(format!("{http}/v1/context/me")).bearer_auth(tampered), "tampered").0, 401);
    // Minting checks what it is asked.
    let bad = [
        (json!({"identifier": "customer_id:u1", "scopes": ["admin:privacy"]}), "scopes[0]"),
        (json!({"identifier": "customer_id:u1", "ttl": "2h"}), "ttl"),
        (json!({"identifier": "nonsense"}), "identifier"),
    ];
    for (body, field) in bad {
        let (status, answer) = post_json(&format!("{http}/v1/tokens"), &body);
        assert_eq!((status, answer["error"]["field"].as_str()), (400, Some(field)), "{answer}");
    }
    // A token with only read:context cannot mint another (admin:tokens is a secret key's).
    let (status, _) = refused(
        Client::new()
            .post(format!("{http}/v1/tokens"))
            .bearer_auth(&token)
            .json(&json!({"identifier": "customer_id:u2"})),
        "mint with a token",
    );
    assert_eq!(status, 403);
}

#[test]
fn repeated_failures_from_one_address_are_rate_limited_and_development_keys_are_printed() {
    let dir = tempfile::tempdir().unwrap();
    // The shipped topology: no keys configured, so chorus up makes and prints development ones.
    let base = std::fs::read_to_string(topology_path()).unwrap();
    let path = dir.path().join("topology.yaml");
    // ... and /metrics closed: it then takes read:metrics.
    let text = base
        .replace("failed_auth_limit: 20", "failed_auth_limit: 3")
        .replace("open: [healthz, readyz, metrics]", "open: [healthz, readyz]")
        .replace("cluster_secret: \"\"", "cluster_secret: test-cluster-secret-0123456789");
    std::fs::write(&path, text).unwrap();
    let chorus = Chorus::up(&dir.path().join("data"), &path);
    let http = chorus.http().to_owned();
    let write_key = chorus.printed_value("write_key").expect("a development write key printed");
    let secret_key = chorus.printed_value("secret_key").expect("a development secret key printed");
    assert!(chorus.printed.iter().filter(|l| l.contains("key: ")).all(|l| l.contains("development")));
    let post = Client::new()
        .post(format!("{http}/v1/track"))
        .basic_auth(&write_key, Some(""))
        .json(&json!({"userId": "dev-1", "event": "Product Viewed"}));
    assert_eq!(post.send().unwrap().status().as_u16(), 200);
    let read = |key: &str| Client::new().get(format!("{http}/v1/instances")).bearer_auth(key).send().unwrap();
    assert_eq!(read(&secret_key).status().as_u16(), 200);
    let metrics = |key: Option<&str>| {
        let r = Client::new().get(format!("{http}/metrics"));
        let r = match key {
            Some(k) => r.bearer_auth(k),
            None => r,
        };
        r.send().unwrap().status().as_u16()
    };
    assert_eq!(metrics(Some(&secret_key)), 200);
    assert_eq!(metrics(None), 401, "a closed /metrics takes a key");
    assert_eq!(Client::new().get(format!("{http}/healthz")).send().unwrap().status().as_u16(), 200);
    // The configured cluster secret opens a member's stores to the others.
    let store = Client::new()
        .get(format!("{http}/internal/v1/stores/profile/0/profiles?key=nobody"))
        .header("x-chorus-cluster-key", "test-cluster-secret-0123456789")
        .send()
        .unwrap();
    assert!(matches!(store.status().as_u16(), 204 | 503), "{}", store.status());
    for _ in 0..2 {
        assert_eq!(read("sk_guess_0123456789abcdefghij").status().as_u16(), 401);
    }
    let limited = read(&secret_key);
    assert_eq!(limited.status().as_u16(), 429, "the address is refused until its window ends");
    assert!(limited.headers().contains_key("retry-after"));
    let body: Value = limited.json().unwrap();
    assert_eq!(body["error"]["code"], "too_many_failures");
    // The keys survive a restart (kept in the data directory).
    chorus.stop();
    let again = Chorus::up(&dir.path().join("data"), &path);
    assert_eq!(again.printed_value("write_key"), Some(write_key));
    assert_eq!(again.printed_value("secret_key"), Some(secret_key));
}
