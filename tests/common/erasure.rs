//! The erasure scenario, shared by the embedded-broker and the Kafka tests: a customer
//! with three merged identities (anonymous id, customer id, email), a cart, a consent
//! history, the cart-abandonment journey waiting on its timer and a promotion deferred
//! by the orchestrator; and another customer with a cart, a journey and a deferred
//! promotion of their own, who must come through untouched.

use super::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;

pub const MIN: i64 = 60_000;
/// Every identifier of the subject contains it; nothing else does.
pub const MARK: &str = "zq8";
pub const SUBJECT_REQUEST: &str = "r-zq8-promo";
pub const OTHER_REQUEST: &str = "r-other-promo";

fn event(id: &str, kind: &str, at: i64, fields: Value) -> Value {
    let mut e = json!({"event_id": id, "event_type": kind, "timestamp": ts(T0 + at), "channel": "web"});
    for (k, v) in fields.as_object().unwrap() {
        e[k] = v.clone();
    }
    e
}

fn events() -> Vec<Value> {
    vec![
        event("zq8-e1", "product.viewed", 0, json!({"anonymous_id": "anon-zq81", "payload": {"product_id": "tent"}})),
        event(
            "zq8-e2",
            "identify",
            MIN,
            json!({"customer_id": "cust-zq82", "traits": {"email": "zq83@example.com", "first_name": "Zqa"}}),
        ),
        event(
            "zq8-e3",
            "cart.item_added",
            2 * MIN,
            json!({"anonymous_id": "anon-zq81", "customer_id": "cust-zq82",
                "payload": {"product_id": "tent", "price": 300.0, "quantity": 1}}),
        ),
        event(
            "other-e1",
            "identify",
            2 * MIN,
            json!({"customer_id": "other-1", "traits": {"email": "other1@example.com"}}),
        ),
        event(
            "other-e2",
            "cart.item_added",
            3 * MIN,
            json!({"customer_id": "other-1", "payload": {"product_id": "stove", "price": 80.0, "quantity": 1}}),
        ),
    ]
}

fn promotion(request_id: &str, customer: &str) -> Value {
    json!({"request_id": request_id, "timestamp": ts(T0 + 7 * MIN), "customer_id": customer,
        "campaign_id": "spring", "category": "promotional", "content_id": "cart_reminder", "channels": ["email"]})
}

fn put_consent(http: &str, customer: &str, granted: bool, at: i64) {
    let body = json!({"purpose": "marketing_email", "granted": granted, "timestamp": ts(T0 + at)});
    let response = client().put(format!("{http}/v1/consent/{customer}")).json(&body).send().unwrap();
    assert_eq!(response.status().as_u16(), 202);
}

fn mentions(record: &Value, needles: &BTreeSet<String>) -> bool {
    let text = record.to_string();
    needles.iter().any(|n| text.contains(n.as_str()))
}

/// What the scenario built before the erasure.
pub struct Seeded {
    /// The subject's profile as the API shows it.
    pub profile: Value,
    /// Every canonical id the subject had, and [`MARK`].
    pub needles: BTreeSet<String>,
}

/// Feed the scenario through `http` and the topics, and wait until the journeys wait
/// on their timers and both promotions are deferred.
pub fn seed(http: &str, bootstrap: &str, topology: &Path) -> Seeded {
    let (status, answer) = post_json(&format!("{http}/v1/events"), &json!({"batch": events()}));
    assert_eq!(status, 202, "{answer}");
    // Consent names the customer by an identifier; wait until identity has settled.
    eventually(90, "both customers resolved", || {
        let (subject, p) = get_json(&format!("{http}/v1/profiles/zq83@example.com"));
        let (other, _) = get_json(&format!("{http}/v1/profiles/other1@example.com"));
        (subject == 200 && other == 200 && p["metrics"]["event_count"] == 3).then_some(())
    });
    for (i, granted) in [true, false, true].into_iter().enumerate() {
        put_consent(http, "cust-zq82", granted, (4 + i as i64) * MIN);
    }
    put_consent(http, "other-1", true, 4 * MIN);
    let profile = eventually(90, "the subject's profile", || {
        let (status, p) = get_json(&format!("{http}/v1/profiles/zq83@example.com"));
        (status == 200
            && p["metrics"]["event_count"] == 3
            && p["preferences"]["consent"]["marketing_email"].is_object())
        .then_some(p)
    });
    eventually(90, "both journeys waiting on their timer", || {
        let waiting = tail(bootstrap, "journeys.events", 1000)
            .into_iter()
            .filter(|e| e["value"]["event"] == "step" && e["value"]["step"] == "wait_1h")
            .count();
        (waiting == 2).then_some(())
    });
    produce_with(
        bootstrap,
        topology,
        "messages.requests",
        &[promotion(SUBJECT_REQUEST, "cust-zq82"), promotion(OTHER_REQUEST, "other-1")],
    );
    eventually(90, "both promotions deferred", || {
        (tail(bootstrap, "decisions.deferred", 1000).len() == 2).then_some(())
    });
    let mut needles: BTreeSet<String> = tail(bootstrap, "events.resolved", 1000)
        .iter()
        .filter(|r| r["value"].to_string().contains(MARK))
        .filter_map(|r| r["value"]["canonical_id"].as_str().map(str::to_owned))
        .collect();
    assert!(needles.len() >= 2, "the scenario merges two customers: {needles:?}");
    needles.insert(MARK.to_owned());
    Seeded { profile, needles }
}

pub fn status_of(http: &str, id: &str) -> Value {
    get_json(&format!("{http}/v1/privacy/requests/{id}")).1
}

pub fn completed(http: &str, id: &str) -> Value {
    eventually(90, "the request to complete", || {
        let s = status_of(http, id);
        (s["status"] == "completed").then_some(s)
    })
}

/// Erase the subject, named by an email in another case than it was sent in; the
/// completed receipt.
pub fn erase(http: &str) -> (String, Value) {
    let (status, filed) = post_json(
        &format!("{http}/v1/privacy/requests"),
        &json!({"type": "erasure", "identifier": {"type": "email", "value": "ZQ83@example.com"}, "reason": "asked"}),
    );
    assert_eq!(status, 202, "{filed}");
    let id = filed["request_id"].as_str().unwrap().to_owned();
    let receipt = completed(http, &id);
    assert!(!receipt.to_string().contains(MARK), "a receipt holds no identifier: {receipt}");
    assert_eq!(receipt["stopped"]["deferred_messages"], 1, "{receipt:#}");
    assert!(receipt["stopped"]["journeys_timers"].as_u64().unwrap_or(0) >= 1, "{receipt:#}");
    assert!(receipt["stores"].as_array().unwrap().iter().any(|s| s["store"] == "profile/profiles"), "{receipt:#}");
    (id, receipt)
}

/// After the erasure: nothing of theirs on the APIs or in the latest value of any key
/// of a compacted topic; time moves past the deferral and the journey timer, and only
/// the other customer's promotion and journey step come out.
pub fn assert_erased_online(http: &str, bootstrap: &str, topology: &Path, seeded: &Seeded) {
    let compacted = ["profiles", "context", "identity.graph", "recommendations"];
    let outputs = [
        "decisions.email",
        "decisions.push",
        "decisions.suppressed",
        "decisions.deferred",
        "journeys.events",
        "segments",
        "identity.merges",
    ];
    let position = |r: &Value| (r["topic"].to_string(), r["partition"].as_i64(), r["offset"].as_i64());
    let before: BTreeSet<_> = outputs.iter().flat_map(|t| tail(bootstrap, t, 1500)).map(|r| position(&r)).collect();
    for key in ["cust-zq82", "anon-zq81", "zq83@example.com"] {
        assert_eq!(get_json(&format!("{http}/v1/profiles/{key}")).0, 404, "{key}");
    }
    assert_eq!(get_json(&format!("{http}/v1/profiles/other-1")).0, 200);
    for topic in compacted {
        let latest = latest_by_key(tail(bootstrap, topic, 1000));
        let left: Vec<&String> =
            latest.iter().filter(|(k, v)| mentions(&json!([k, v]), &seeded.needles)).map(|(k, _)| k).collect();
        assert!(left.is_empty(), "{topic} still holds {left:?}");
    }
    let results = tail(bootstrap, "privacy.results", 1000);
    assert!(results.iter().all(|r| !r.to_string().contains(MARK)));

    // Past the one-minute coordination window and the journeys' one-hour wait.
    tick(bootstrap, topology, T0 + 2 * 60 * MIN);
    eventually(90, "the other customer's promotion decided", || {
        let decided = ["decisions.email", "decisions.suppressed"]
            .iter()
            .flat_map(|t| tail(bootstrap, t, 500))
            .any(|r| r["value"]["request_id"] == OTHER_REQUEST);
        decided.then_some(())
    });
    eventually(90, "the other customer's journey moving on", || {
        tail(bootstrap, "journeys.events", 500)
            .iter()
            .any(|e| e["value"]["customer_id"] == "other-1" && e["value"]["step"] == "email_reminder")
            .then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    let since: Vec<Value> =
        outputs.iter().flat_map(|t| tail(bootstrap, t, 500)).filter(|r| !before.contains(&position(r))).collect();
    assert!(!since.is_empty(), "time moved: the other customer's records came out");
    let theirs: Vec<&Value> =
        since.iter().filter(|r| mentions(r, &seeded.needles) || r.to_string().contains(SUBJECT_REQUEST)).collect();
    assert!(theirs.is_empty(), "nothing of the subject's came out after the erasure: {theirs:#?}");

    // A late event with an erased identifier is dropped at intake, without its payload.
    let late = event("zq8-late", "page.viewed", 10 * MIN, json!({"customer_id": "cust-zq82"}));
    assert_eq!(post_json(&format!("{http}/v1/events"), &late).0, 202);
    let letter = eventually(60, "the dead letter", || {
        tail(bootstrap, "events.dlq", 1000).into_iter().find(|l| l["value"]["reason"] == "erased_subject")
    });
    assert!(!letter.to_string().contains(MARK), "{letter}");
    assert_eq!(letter["value"]["redacted"], true);
    assert_eq!(get_json(&format!("{http}/v1/profiles/cust-zq82")).0, 404);
}

/// `chorus state scan` over a stopped member's data dir: no entry of any column family
/// mentions the subject, while the other customer is found (the scan does look).
pub fn assert_no_trace_on_disk(data: &Path, seeded: &Seeded) {
    let scan = |needles: &[&str]| -> Vec<Value> {
        let mut args = vec!["state", "scan", "--data-dir", data.to_str().unwrap()];
        for n in needles {
            args.extend(["--contains", n]);
        }
        let out = std::process::Command::new(bin()).args(&args).output().unwrap();
        assert!(out.status.success(), "state scan: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let needles: Vec<&str> = seeded.needles.iter().map(String::as_str).collect();
    let found = scan(&needles);
    assert!(found.is_empty(), "the subject is still on disk: {found:#?}");
    let other = scan(&["other1@example.com"]);
    assert!(!other.is_empty(), "the scan finds the other customer");
}
