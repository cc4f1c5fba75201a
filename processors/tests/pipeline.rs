//! The whole pipeline in the TestDriver: identity → profile / context / orchestrator.

use chorus_processors::TestDriver;
mod common;

use common::{event, find, profile_of, send, tick, topology, ts, T0};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;

#[test]
fn same_seed_same_outputs() {
    let run = |seed| {
        let mut d = TestDriver::new(topology(1, 4), seed);
        for i in 0..50 {
            let e = event(
                &format!("e{i}"),
                "order.completed",
                T0 + i,
                json!({"customer_id": format!("c{}", i % 7)}),
                json!({"total": i}),
            );
            send(&mut d, &e);
        }
        d.run().unwrap();
        ["events.resolved", "profiles", "context"].map(|t| d.read(t))
    };
    assert_eq!(run(7), run(7));
}

#[test]
fn duplicate_events_count_once() {
    let mut d = TestDriver::new(topology(2, 2), 1);
    let e = event("dup-1", "order.completed", T0, json!({"customer_id": "c1"}), json!({"total": 50.0}));
    send(&mut d, &e);
    send(&mut d, &e);
    d.run().unwrap();
    let p = profile_of(&d, "c1");
    assert_eq!(p["metrics"]["purchase_count"], 1);
    assert_eq!(p["metrics"]["lifetime_value"], 50.0);
    assert_eq!(d.counter("duplicates", "events.raw"), 1);
}

#[test]
fn dedupe_forgets_after_its_window() {
    let mut d = TestDriver::new(topology(1, 1), 1);
    let e = event("dup-1", "page.viewed", T0, json!({"customer_id": "c1"}), json!({}));
    send(&mut d, &e);
    let later = event("dup-1", "page.viewed", T0 + 24 * 3_600_000, json!({"customer_id": "c1"}), json!({}));
    send(&mut d, &later);
    d.run().unwrap();
    assert_eq!(profile_of(&d, "c1")["event_counts"]["page.viewed"], 2);
}

#[test]
fn bad_input_goes_to_the_dlq_with_reason_and_original_bytes() {
    let mut d = TestDriver::new(topology(1, 1), 1);
    d.pipe("events.raw", b"k", Some(b"{not json".to_vec()), 0);
    d.pipe_json(
        "events.raw",
        "k",
        &json!({"event_id": "e1", "event_type": "teleported", "timestamp": ts(T0), "customer_id": "c"}),
        0,
    );
    d.pipe_json(
        "events.raw",
        "k",
        &json!({"event_id": "e2", "event_type": "page.viewed", "timestamp": 5, "customer_id": "c"}),
        0,
    );
    d.pipe_json("events.raw", "k", &json!({"event_id": "e3", "event_type": "page.viewed", "timestamp": ts(T0)}), 0);
    d.pipe("events.raw", b"k", Some(vec![b' '; 2 << 20]), 0);
    d.run().unwrap();
    let dlq: Vec<Value> = d.read("events.dlq").iter().map(|r| r.json().unwrap()).collect();
    let reasons: Vec<&str> = dlq.iter().map(|l| l["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["invalid_json", "unknown_event_type", "invalid_event", "no_identifier", "oversized"]);
    assert_eq!(dlq[0]["original_base64"], "e25vdCBqc29u");
    assert!(dlq[2]["detail"].as_str().unwrap().contains("field `timestamp`"));
    assert!(d.read("profiles").is_empty());
}

#[test]
fn cart_follows_customer_after_login() {
    let mut d = TestDriver::new(topology(1, 4), 11);
    // Known on desktop first, then an anonymous cart on mobile: two customers so far.
    send(&mut d, &event("d1", "page.viewed", T0 - 60_000, json!({"customer_id": "cust_1"}), json!({"url": "/"})));
    let mobile = json!({"anonymous_id": "anon-9"});
    let mut add = event(
        "a1",
        "cart.item_added",
        T0,
        mobile.clone(),
        json!({"product_id": "tent", "category": "outdoor", "price": 300.0, "quantity": 1}),
    );
    add["channel"] = json!("mobile_app");
    send(&mut d, &add);
    d.run().unwrap();
    // Login on desktop: the event carries both ids.
    let login = event(
        "l1",
        "page.viewed",
        T0 + 60_000,
        json!({"customer_id": "cust_1", "anonymous_id": "anon-9"}),
        json!({"url": "/"}),
    );
    send(&mut d, &login);
    d.run().unwrap();

    assert_eq!(d.read("identity.merges").len(), 1);
    assert_eq!(d.table("profiles").len(), 1);
    let contexts = d.table("context");
    assert_eq!(contexts.len(), 1, "the anonymous context merged away: {contexts:?}");
    let ctx = contexts.values().next().unwrap();
    assert_eq!(ctx["cart"]["items"][0]["product_id"], "tent");
    assert_eq!(ctx["cart"]["value"], 300.0);
    assert_eq!(ctx["session"]["channel"], "web");
    let p = profile_of(&d, "cust_1");
    assert_eq!(p["metrics"]["event_count"], 3);
}

#[test]
fn session_expires_at_exactly_its_timeout() {
    let mut d = TestDriver::new(topology(1, 1), 1);
    send(&mut d, &event("e1", "page.viewed", T0, json!({"customer_id": "c1"}), json!({})));
    tick(&mut d, T0 + 30 * 60_000 - 1);
    d.run().unwrap();
    let ctx = d.table("context").into_values().next().unwrap();
    assert!(ctx["session"].is_object(), "still live one ms before the timeout");
    tick(&mut d, T0 + 30 * 60_000);
    d.run().unwrap();
    let ctx = d.table("context").into_values().next().unwrap();
    assert!(ctx["session"].is_null(), "gone at the timeout: {ctx}");
    // Recent interactions expire after 30 days; then the whole record is tombstoned.
    tick(&mut d, T0 + 30 * 86_400_000);
    d.run().unwrap();
    assert!(d.table("context").is_empty());
}

#[test]
fn order_clears_the_cart_and_returns_reduce_lifetime_value() {
    let mut d = TestDriver::new(topology(1, 2), 5);
    let c = json!({"customer_id": "c1"});
    send(
        &mut d,
        &event("e1", "cart.item_added", T0, c.clone(), json!({"product_id": "p", "price": 10.0, "quantity": 2})),
    );
    send(&mut d, &event("e2", "order.completed", T0 + 1, c.clone(), json!({"order_id": "o1", "total": 20.0})));
    send(&mut d, &event("e3", "order.returned", T0 + 2, c.clone(), json!({"order_id": "o1", "amount": 5.0})));
    d.run().unwrap();
    let ctx = d.table("context").into_values().next().unwrap();
    assert!(ctx["cart"].is_null());
    let p = profile_of(&d, "c1");
    assert_eq!(p["metrics"]["lifetime_value"], 15.0);
    assert_eq!(p["metrics"]["average_order_value"], 20.0);
}

#[test]
fn traits_rectify_by_event_time() {
    let mut d = TestDriver::new(topology(1, 1), 5);
    let mut newer = event("e2", "identify", T0 + 10, json!({"customer_id": "c1"}), json!({}));
    newer["traits"] = json!({"name": "Ann Smith", "location": {"state": "QLD"}});
    let mut older = event("e1", "identify", T0, json!({"customer_id": "c1"}), json!({}));
    older["traits"] = json!({"name": "Ann", "email": "ANN@example.com "});
    send(&mut d, &newer);
    send(&mut d, &older);
    d.run().unwrap();
    let p = profile_of(&d, "c1");
    assert_eq!(p["attributes"]["name"], "Ann Smith");
    assert_eq!(p["attributes"]["location"]["state"], "QLD");
    assert_eq!(p["attribute_sources"]["location.state"]["at"], T0 + 10);
    assert_eq!(p["identity"]["emails"][0], "ann@example.com");
}

/// A customer's events: (customer index, anonymous index, kind, amount).
fn arb_stream() -> impl Strategy<Value = Vec<(u8, u8, u8, u16, bool)>> {
    prop::collection::vec((0u8..6, 0u8..8, 0u8..4, 1u16..500, any::<bool>()), 1..60)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Profile totals equal a recomputation from the event list grouped by a union-find
    /// oracle over the same links, for any downstream partition count and interleaving.
    #[test]
    fn profile_totals_equal_recomputation(stream in arb_stream(), partitions in prop::sample::select(vec![1u32, 2, 3, 8]), seed in any::<u64>()) {
        // The oracle knows no guards: customer ids here are not unique.
        let mut t = topology(1, partitions);
        for ty in &mut t.identity.types {
            ty.unique = false;
            ty.max_per_customer = None;
        }
        let mut d = TestDriver::new(t, seed);
        let mut parent = BTreeMap::new();
        let mut events = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut oracle_merges = 0;
        for (i, (cust, anon, kind, amount, logged_in)) in stream.iter().enumerate() {
            let anon_id = format!("anon:a{anon}");
            let cust_id = format!("cust:c{cust}");
            let mut ids = json!({"anonymous_id": format!("a{anon}")});
            let linked: Vec<&String> = if *logged_in { vec![&anon_id, &cust_id] } else { vec![&anon_id] };
            let mut roots: Vec<String> = linked.iter().filter(|x| seen.contains(**x)).map(|x| find(&mut parent, x)).collect();
            roots.sort();
            roots.dedup();
            oracle_merges += roots.len().saturating_sub(1);
            for x in &linked { seen.insert((*x).clone()); }
            if *logged_in {
                ids["customer_id"] = json!(format!("c{cust}"));
                let (ra, rc) = (find(&mut parent, &anon_id), find(&mut parent, &cust_id));
                if ra != rc { parent.insert(ra, rc); }
            }
            let kind = ["page.viewed", "order.completed", "order.returned", "cart.item_added"][*kind as usize];
            let e = event(&format!("e{i}"), kind, T0 + i as i64 * 1000, ids, json!({"total": amount, "amount": amount, "product_id": "p", "price": 1}));
            send(&mut d, &e);
            events.push((anon_id, kind, *amount as f64));
        }
        d.run().unwrap();

        let mut expected: BTreeMap<String, (i64, i64, f64)> = BTreeMap::new();
        for (anon_id, kind, amount) in &events {
            let root = find(&mut parent, anon_id);
            let e = expected.entry(root).or_default();
            e.0 += 1;
            match *kind {
                "order.completed" => { e.1 += 1; e.2 += amount; }
                "order.returned" => e.2 -= amount,
                _ => {}
            }
        }
        let profiles = d.table("profiles");
        prop_assert_eq!(profiles.len(), expected.len());
        let mut got: Vec<(i64, i64, i64)> = profiles.values().map(|p| (
            p["metrics"]["event_count"].as_i64().unwrap(),
            p["metrics"]["purchase_count"].as_i64().unwrap(),
            (p["metrics"]["lifetime_value"].as_f64().unwrap() * 100.0).round() as i64,
        )).collect();
        let mut want: Vec<(i64, i64, i64)> = expected.values().map(|(n, c, v)| (*n, *c, (v * 100.0).round() as i64)).collect();
        got.sort();
        want.sort();
        prop_assert_eq!(got, want);
        // Every merge retires one customer: created - merged = live.
        let merges = d.read("identity.merges");
        let froms: std::collections::BTreeSet<String> = merges.iter().map(|r| r.key_str()).collect();
        prop_assert_eq!(froms.len(), merges.len(), "a customer merged away twice");
        prop_assert_eq!(d.counter("customers_created", "identity") as usize - merges.len(), expected.len());
        prop_assert!(merges.len() >= oracle_merges);
    }
}

/// Every record the pipeline writes has the shape its topic's Avro schema declares:
/// encoding it to Avro and back loses nothing.
#[test]
fn every_output_round_trips_through_its_avro_schema() {
    let mut d = TestDriver::new(topology(1, 2), 9);
    send(&mut d, &event("d1", "page.viewed", T0, json!({"customer_id": "c1"}), json!({"url": "/"})));
    send(
        &mut d,
        &event(
            "m1",
            "cart.item_added",
            T0 + 1,
            json!({"anonymous_id": "a1"}),
            json!({"product_id": "p", "price": 2.5}),
        ),
    );
    let mut identify = event("l1", "identify", T0 + 2, json!({"customer_id": "c1", "anonymous_id": "a1"}), json!({}));
    identify["traits"] = json!({"name": "Ann", "email": "ann@example.com", "address": {"city": "Brisbane"}, "location": {"state": "QLD"}});
    send(&mut d, &identify);
    d.pipe("events.raw", b"k", Some(b"nope".to_vec()), 0);
    // The requests below need the email address the identify event brings.
    d.run().unwrap();
    d.pipe_json(
        "consent",
        "c1",
        &json!({"customer_id": "c1", "purpose": "marketing_email", "granted": true, "timestamp": ts(T0 + 2)}),
        0,
    );
    d.run().unwrap();
    d.pipe_json("messages.requests", "c1", &json!({"request_id": "r3", "timestamp": ts(T0 + 5), "customer_id": "c1", "category": "promotional", "campaign_id": "spring", "channels": ["email"]}), 0);
    d.pipe_json("messages.requests", "c1", &json!({"request_id": "r1", "timestamp": ts(T0 + 3), "customer_id": "c1", "category": "transactional", "channels": ["email"], "variables": {"order": "o1"}}), 0);
    d.pipe_json("messages.requests", "c1", &json!({"request_id": "r2", "timestamp": ts(T0 + 4), "customer_id": "c1", "category": "promotional", "channels": ["sms"]}), 0);
    d.run().unwrap();
    let topics = [
        "events.resolved",
        "events.dlq",
        "identity.merges",
        "identity.graph",
        "profiles",
        "context",
        "decisions.email",
        "decisions.suppressed",
        "decisions.deferred",
        "journeys.events",
        "segments",
    ];
    for topic in topics {
        let records = d.read(topic);
        assert!(!records.is_empty(), "scenario writes to {topic}");
        for r in records {
            let Some(json) = r.json() else { continue };
            let bytes = chorus_schemas::encode_avro(topic, &json).unwrap_or_else(|e| panic!("{topic}: {e}\n{json}"));
            let (_, back) = chorus_schemas::decode_avro(&bytes).unwrap();
            assert_eq!(strip_nulls(back), strip_nulls(json), "{topic} loses data through Avro");
        }
    }
}

/// Avro fills absent optional fields with null; JSON omits them. Compare without nulls.
fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            Value::Object(m.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, strip_nulls(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

#[test]
fn avro_events_are_accepted_and_corrupt_avro_goes_to_the_dlq() {
    let mut d = TestDriver::new(topology(1, 1), 2);
    let e = json!({"event_id": "av1", "event_type": "order.completed", "timestamp": ts(T0), "customer_id": "c1",
                   "identifiers": {}, "payload": {"total": 12.0}});
    let bytes = chorus_schemas::encode_avro("events.raw", &e).unwrap();
    d.pipe("events.raw", b"c1", Some(bytes.clone()), 0);
    let mut corrupt = bytes;
    corrupt.truncate(14);
    d.pipe("events.raw", b"c1", Some(corrupt), 0);
    d.run().unwrap();
    assert_eq!(profile_of(&d, "c1")["metrics"]["lifetime_value"], 12.0);
    let dlq: Vec<Value> = d.read("events.dlq").iter().map(|r| r.json().unwrap()).collect();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["reason"], "invalid_avro");
}

/// Segments follow the profile: entered when the rule starts to hold, exited when it
/// stops, listed on the profile; the seed's rules work as written.
#[test]
fn segments_are_entered_and_exited_as_the_profile_changes() {
    let mut d = TestDriver::new(topology(1, 3), 11);
    let order = |id: &str, at: i64, total: f64, category: &str| {
        event(id, "order.completed", at, json!({"customer_id": "vip"}), json!({"total": total, "category": category}))
    };
    send(&mut d, &order("o1", T0, 6000.0, "books"));
    send(&mut d, &order("o2", T0 + 1, 5000.0, "outdoor"));
    d.run().unwrap();
    let mut identify = event("t1", "identify", T0 + 2, json!({"customer_id": "vip"}), json!({}));
    identify["traits"] = json!({"location": {"state": "QLD"}});
    send(&mut d, &identify);
    d.run().unwrap();
    let profile = profile_of(&d, "vip");
    assert_eq!(profile["segments"], json!(["high_value", "outdoor_enthusiast", "queensland"]));
    // A return brings lifetime value to 10,000: no longer above it.
    send(&mut d, &event("r1", "order.returned", T0 + 3, json!({"customer_id": "vip"}), json!({"amount": 1000.0})));
    d.run().unwrap();
    assert_eq!(profile_of(&d, "vip")["segments"], json!(["outdoor_enthusiast", "queensland"]));
    let changes: Vec<(String, String)> = d
        .read("segments")
        .iter()
        .filter_map(|r| r.json())
        .map(|v| (v["segment"].as_str().unwrap().to_owned(), v["change"].as_str().unwrap().to_owned()))
        .collect();
    let count = |seg: &str, change: &str| changes.iter().filter(|(s, c)| s == seg && c == change).count();
    assert_eq!((count("high_value", "entered"), count("high_value", "exited")), (1, 1));
    assert_eq!((count("outdoor_enthusiast", "entered"), count("queensland", "entered")), (1, 1));
}
