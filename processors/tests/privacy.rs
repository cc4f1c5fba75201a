//! Data subject rights in the TestDriver: erasure across every store and topic of every
//! stage, suppression of late inputs, access exports, rectification, receipts.

use chorus_processors::TestDriver;
mod common;

use common::{event, send, tick, topology, ts};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;

fn at(text: &str) -> i64 {
    text.parse::<jiff::Timestamp>().unwrap().as_millisecond()
}

/// Every token of the subject contains this, so a byte search finds any trace of them.
const MARK: &str = "zq8";

fn consent(d: &mut TestDriver, customer: &str, purpose: &str, granted: bool, when: i64) {
    let change = json!({"customer_id": customer, "purpose": purpose, "granted": granted, "timestamp": ts(when),
                        "source": "preference_centre"});
    d.pipe_json("consent", customer, &change, 0);
    d.run().unwrap();
}

fn privacy(d: &mut TestDriver, body: Value) {
    let key = body["identifier"]["value"].as_str().unwrap_or("k").to_lowercase();
    d.pipe_json("privacy.requests", &key, &body, 0);
    d.run().unwrap();
}

/// The latest receipt of each request on `privacy.results`.
fn receipts(d: &TestDriver) -> BTreeMap<String, Value> {
    d.table("privacy.results")
}

/// The customer of the scenario: an anonymous visitor (a cart, the cart-abandonment
/// journey waiting on its timer) who identifies, merging with the customer known by id
/// and email; a consent history; a promotion deferred by quiet hours.
fn scenario(raw: u32, partitions: u32, seed: u64) -> (TestDriver, i64) {
    let mut d = TestDriver::new(topology(raw, partitions), seed);
    let night = at("2026-05-01T23:00:00Z");
    let t = night - 3 * HOUR;
    send(&mut d, &event("ev-zq8-1", "page.viewed", t, json!({"anonymous_id": "anon-zq81"}), json!({})));
    let mut identify = event("ev-zq8-2", "identify", t + MIN, json!({"customer_id": "cust-zq82"}), json!({}));
    identify["traits"] = json!({"email": "zq83@example.com", "first_name": "Zqa", "push_token": "tok-zq84"});
    send(&mut d, &identify);
    d.run().unwrap();
    let both = json!({"anonymous_id": "anon-zq81", "customer_id": "cust-zq82"});
    send(&mut d, &event("ev-zq8-3", "page.viewed", t + 2 * MIN, both, json!({"page": "/zq8"})));
    d.run().unwrap();
    for (i, granted) in [true, false, true].into_iter().enumerate() {
        consent(&mut d, "cust-zq82", "marketing_email", granted, t + (3 + i as i64) * MIN);
    }
    let payload = json!({"product_id": "tent", "category": "outdoor", "price": 300.0, "quantity": 1});
    send(&mut d, &event("ev-zq8-4", "cart.item_added", night - 30 * MIN, json!({"customer_id": "cust-zq82"}), payload));
    d.run().unwrap();
    let request = json!({"request_id": "req-zq8-1", "timestamp": ts(night), "customer_id": "cust-zq82",
        "campaign_id": "spring", "category": "promotional", "content_id": "cart_reminder", "channels": ["email"]});
    d.pipe_json("messages.requests", "cust-zq82", &request, 0);
    d.run().unwrap();
    // Someone else, whose state must be untouched.
    send(&mut d, &event("ev-other-1", "page.viewed", night, json!({"customer_id": "other-1"}), json!({})));
    d.run().unwrap();
    (d, night)
}

/// Every store entry (key or value) that mentions the subject, as `processor/store`.
fn traces(d: &mut TestDriver, needles: &BTreeSet<String>) -> Vec<String> {
    d.dump()
        .into_iter()
        .filter(|e| needles.iter().any(|n| contains(&e.key, n.as_bytes()) || contains(&e.value, n.as_bytes())))
        .map(|e| format!("{}/{}@{}: {}", e.processor, e.store, e.partition, String::from_utf8_lossy(&e.key)))
        .collect()
}

/// Where each record of `topic` sits now: what came later is what is not in it.
fn positions(d: &TestDriver, topic: &str) -> BTreeSet<(u32, i64)> {
    d.read(topic).iter().map(|r| (r.partition, r.offset)).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The subject's canonical ids: the keys of `events.resolved` records about them.
fn canonical_ids(d: &TestDriver) -> BTreeSet<String> {
    d.read("events.resolved")
        .iter()
        .filter(|r| r.value.as_deref().is_some_and(|v| contains(v, MARK.as_bytes())))
        .map(|r| r.json().unwrap()["canonical_id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn an_erased_customer_leaves_no_trace_and_nothing_of_theirs_goes_out() {
    for (raw, partitions, seed) in [(1, 1, 1), (2, 3, 7), (4, 8, 3)] {
        let (mut d, night) = scenario(raw, partitions, seed);
        let canonical = canonical_ids(&d);
        assert!(canonical.len() >= 2, "the scenario merges two customers: {canonical:?}");
        assert_eq!(d.read("decisions.deferred").len(), 1, "the promotion waits for quiet hours");
        let mut needles: BTreeSet<String> = canonical.clone();
        needles.insert(MARK.to_owned());
        assert!(!traces(&mut d, &needles).is_empty());

        let topics = ["decisions.email", "journeys.events", "profiles", "context", "identity.graph", "segments"];
        let marks: BTreeMap<&str, BTreeSet<(u32, i64)>> = topics.into_iter().map(|t| (t, positions(&d, t))).collect();
        let since = |d: &TestDriver, topic: &str| -> Vec<chorus_processors::driver::LoggedRecord> {
            d.read(topic).into_iter().filter(|r| !marks[topic].contains(&(r.partition, r.offset))).collect()
        };
        privacy(
            &mut d,
            json!({"type": "erasure", "identifier": {"type": "email", "value": "ZQ83@example.com"},
            "request_id": "0190a2b4-0000-7000-8000-000000000001", "reason": "customer asked"}),
        );
        let receipt = &receipts(&d)["0190a2b4-0000-7000-8000-000000000001"];
        assert_eq!(receipt["status"], "completed", "{receipt:#}");
        assert!(!receipt.to_string().contains(MARK), "a receipt holds no personal data: {receipt}");
        let hashes = receipt["subject_hashes"].as_array().unwrap();
        assert_eq!(hashes.len(), 3 + canonical.len(), "three identifiers and every canonical id");
        assert_eq!(receipt["stopped"]["deferred_messages"], 1, "{receipt:#}");
        assert!(receipt["stopped"]["journeys_timers"].as_u64().unwrap() >= 1, "{receipt:#}");

        // No store holds a key or value of theirs.
        assert_eq!(traces(&mut d, &needles), Vec::<String>::new(), "raw {raw}, partitions {partitions}");
        // The latest record of each of their keys on the compacted topics is a tombstone.
        for topic in ["profiles", "context"] {
            for id in &canonical {
                let latest = d.read(topic).into_iter().rev().find(|r| r.key_str() == *id);
                assert!(latest.is_none_or(|r| r.value.is_none()), "{topic} {id} not tombstoned");
            }
        }
        let graph = d.read("identity.graph");
        for label in ["anonymous_id:anon-zq81", "customer_id:cust-zq82", "email:zq83@example.com"] {
            let latest = graph.iter().rev().find(|r| r.key_str() == label).expect("the identifier was published");
            assert!(latest.value.is_none(), "{label} not tombstoned");
        }

        // The waiting message and the journey's next step never come out.
        for when in [night + 45 * MIN, at("2026-05-02T08:00:00Z"), at("2026-05-02T09:00:00Z")] {
            tick(&mut d, when);
            d.run().unwrap();
        }
        assert!(since(&d, "decisions.email").is_empty());
        assert!(since(&d, "journeys.events").is_empty());

        // A late event with an erased identifier does not bring them back.
        let dlq_before = d.read("events.dlq").len();
        let late = event(
            "ev-zq8-late",
            "page.viewed",
            at("2026-05-02T09:05:00Z"),
            json!({"customer_id": "cust-zq82", "anonymous_id": "anon-new-zq8"}),
            json!({}),
        );
        send(&mut d, &late);
        d.run().unwrap();
        let letters: Vec<Value> = d.read("events.dlq")[dlq_before..].iter().map(|r| r.json().unwrap()).collect();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0]["reason"], "erased_subject");
        assert_eq!(letters[0]["redacted"], true);
        assert!(!d.read("events.dlq")[dlq_before].key_str().contains(MARK), "the letter's key is hashed");
        assert!(!letters[0].to_string().contains(MARK), "{}", letters[0]);
        assert_eq!(d.counter("privacy_suppressed_events", "events.raw"), 1);
        assert_eq!(traces(&mut d, &needles), Vec::<String>::new());
        for topic in ["profiles", "context", "segments", "identity.graph"] {
            let after: Vec<_> = since(&d, topic)
                .into_iter()
                .filter(|r| r.value.as_deref().is_some_and(|v| contains(v, MARK.as_bytes())))
                .map(|r| r.key_str())
                .collect();
            assert!(after.is_empty(), "{topic} still names them: {after:?}");
        }

        // A restart (new processors, stores reloaded) still finds nothing and still refuses.
        d.restart();
        send(
            &mut d,
            &event(
                "ev-zq8-late2",
                "page.viewed",
                at("2026-05-02T09:10:00Z"),
                json!({"anonymous_id": "anon-zq81"}),
                json!({}),
            ),
        );
        d.run().unwrap();
        assert_eq!(d.counter("privacy_suppressed_events", "events.raw"), 2);
        assert_eq!(traces(&mut d, &needles), Vec::<String>::new());
        // The other customer is untouched.
        assert!(d.table("profiles").values().any(|p| p["customer_id"] == "other-1"));
    }
}

#[test]
fn a_new_consent_lifts_the_suppression_and_the_subject_starts_anew() {
    let (mut d, night) = scenario(2, 3, 5);
    let old = canonical_ids(&d);
    privacy(&mut d, json!({"type": "erasure", "identifier": {"type": "customer_id", "value": "cust-zq82"}}));
    assert!(receipts(&d).values().all(|r| r["status"] == "completed"));
    consent(&mut d, "cust-zq82", "marketing_email", true, night + HOUR);
    send(
        &mut d,
        &event("ev-zq8-back", "page.viewed", night + HOUR + MIN, json!({"customer_id": "cust-zq82"}), json!({})),
    );
    d.run().unwrap();
    let profile = d.table("profiles").into_values().find(|p| p["customer_id"] == "cust-zq82").expect("back");
    assert!(
        !old.contains(profile["canonical_id"].as_str().unwrap()),
        "a new canonical id: {}",
        profile["canonical_id"]
    );
    assert_eq!(profile["event_counts"]["page.viewed"], 1, "nothing of before");
}

#[test]
fn unsuppress_lets_an_erased_identifier_back_in() {
    let (mut d, night) = scenario(2, 2, 9);
    privacy(&mut d, json!({"type": "erasure", "identifier": {"type": "anonymous_id", "value": "anon-zq81"}}));
    send(&mut d, &event("ev-zq8-5", "page.viewed", night + MIN, json!({"customer_id": "cust-zq82"}), json!({})));
    d.run().unwrap();
    assert_eq!(d.counter("privacy_suppressed_events", "events.raw"), 1);
    privacy(
        &mut d,
        json!({"type": "unsuppress", "identifier": {"type": "customer_id", "value": "cust-zq82"},
        "request_id": "0190a2b4-0000-7000-8000-000000000002"}),
    );
    assert_eq!(receipts(&d)["0190a2b4-0000-7000-8000-000000000002"]["status"], "completed");
    send(&mut d, &event("ev-zq8-6", "page.viewed", night + 2 * MIN, json!({"customer_id": "cust-zq82"}), json!({})));
    d.run().unwrap();
    assert_eq!(d.counter("privacy_suppressed_events", "events.raw"), 1);
    assert!(d.table("profiles").values().any(|p| p["customer_id"] == "cust-zq82"));
}

#[test]
fn an_access_export_holds_every_stage_and_erases_nothing() {
    let (mut d, _) = scenario(2, 3, 11);
    let before = d.dump().len();
    privacy(
        &mut d,
        json!({"type": "access", "identifier": {"type": "anonymous_id", "value": "anon-zq81"},
        "request_id": "0190a2b4-0000-7000-8000-000000000003"}),
    );
    let receipt = &receipts(&d)["0190a2b4-0000-7000-8000-000000000003"];
    assert_eq!(receipt["status"], "completed", "{receipt:#}");
    let parts = d.store_scan("privacy", "privacy", "part:0190a2b4-0000-7000-8000-000000000003\u{1}");
    let stages: BTreeSet<String> =
        parts.iter().map(|(_, k, _)| k.split('\u{1}').nth(1).unwrap().split('/').next().unwrap().to_owned()).collect();
    assert_eq!(
        stages,
        ["campaigns", "context", "journeys", "orchestrator", "profile", "root"].map(String::from).into()
    );
    let all: String = parts.iter().map(|(_, _, v)| String::from_utf8_lossy(v).into_owned()).collect();
    for needle in ["zq83@example.com", "cust-zq82", "anon-zq81", "Zqa", "tent", "marketing_email", "req-zq8-1"] {
        assert!(all.contains(needle), "the export lacks {needle}");
    }
    assert!(d.dump().len() >= before, "nothing was deleted");
    assert!(d.table("profiles").values().any(|p| p["customer_id"] == "cust-zq82"));
}

#[test]
fn rectification_wins_over_older_traits_and_loses_to_newer_ones() {
    let (mut d, night) = scenario(1, 2, 13);
    privacy(
        &mut d,
        json!({"type": "rectification", "identifier": {"type": "customer_id", "value": "cust-zq82"},
        "changes": {"first_name": "Zqb", "address": {"city": "Lyon"}}, "received_at": night + MIN,
        "request_id": "0190a2b4-0000-7000-8000-000000000004"}),
    );
    assert_eq!(receipts(&d)["0190a2b4-0000-7000-8000-000000000004"]["status"], "completed");
    let profile = d.table("profiles").into_values().find(|p| p["customer_id"] == "cust-zq82").unwrap();
    assert_eq!(profile["attributes"]["first_name"], "Zqb", "{profile:#}");
    assert_eq!(profile["attributes"]["address"]["city"], "Lyon");
    // A later identify wins again: the correction is as of its time.
    let mut identify = event("ev-zq8-9", "identify", night + 2 * MIN, json!({"customer_id": "cust-zq82"}), json!({}));
    identify["traits"] = json!({"first_name": "Zqc"});
    send(&mut d, &identify);
    d.run().unwrap();
    let profile = d.table("profiles").into_values().find(|p| p["customer_id"] == "cust-zq82").unwrap();
    assert_eq!(profile["attributes"]["first_name"], "Zqc");
}

#[test]
fn a_subject_never_seen_gets_an_empty_receipt_and_bad_requests_leave_redacted_letters() {
    let (mut d, _) = scenario(2, 2, 17);
    let before = d.dump().len();
    privacy(
        &mut d,
        json!({"type": "erasure", "identifier": {"type": "email", "value": "nobody@example.com"},
        "request_id": "0190a2b4-0000-7000-8000-000000000005"}),
    );
    let receipt = &receipts(&d)["0190a2b4-0000-7000-8000-000000000005"];
    assert_eq!(receipt["status"], "completed");
    assert_eq!(receipt["note"], "never_seen");
    assert_eq!(receipt["stores"], json!([]));
    assert!(d.dump().len() <= before + 4, "at most the request's own bookkeeping");
    d.pipe_json(
        "privacy.requests",
        "k",
        &json!({"type": "erasure", "identifier": {"type": "shoe", "value": "zq8"}}),
        0,
    );
    d.pipe("privacy.requests", b"k", Some(b"{zq8".to_vec()), 0);
    d.run().unwrap();
    let letters: Vec<Value> = d.read("events.dlq").iter().map(|r| r.json().unwrap()).collect();
    assert_eq!(letters.iter().filter(|l| l["reason"] == "invalid_privacy_request").count(), 2);
    assert!(letters.iter().all(|l| !l.to_string().contains(MARK)), "{letters:?}");
    assert!(letters.iter().any(|l| l["detail"].as_str().unwrap().contains("identifier.type")));
}

#[test]
fn a_request_is_carried_out_once() {
    let (mut d, _) = scenario(2, 2, 19);
    let body = json!({"type": "erasure", "identifier": {"type": "customer_id", "value": "cust-zq82"},
        "request_id": "0190a2b4-0000-7000-8000-000000000006"});
    privacy(&mut d, body.clone());
    let published = d.read("privacy.results").len();
    privacy(&mut d, body);
    assert_eq!(d.read("privacy.results").len(), published, "the duplicate changed nothing");
    assert_eq!(d.counter("duplicates", "privacy.requests"), 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever the partitioning and interleaving, and wherever the erasure falls in
    /// the subject's stream: afterwards no store mentions them, and the other customers'
    /// profiles equal those of a run without the subject at all.
    #[test]
    fn erasure_at_any_point_leaves_others_as_if_the_subject_never_was(
        partitions in prop::sample::select(vec![1u32, 2, 3, 8]),
        seed in 0u64..1_000,
        cut in 0usize..6,
    ) {
        let night = at("2026-05-01T23:00:00Z");
        let others: Vec<Value> = (0..6).map(|i| {
            // Later than the subject's: the subject never moves stream time.
            let mut e = event(&format!("o{i}"), if i % 2 == 0 { "identify" } else { "page.viewed" }, night - 2 * HOUR + i * MIN,
                json!({"customer_id": format!("other-{}", i % 3)}), json!({}));
            e["traits"] = json!({"first_name": format!("O{}", i % 3)});
            e
        }).collect();
        let subject: Vec<Value> = vec![
            event("ev-zq8-a", "page.viewed", night - 9 * HOUR, json!({"anonymous_id": "anon-zq81"}), json!({})),
            event("ev-zq8-b", "identify", night - 8 * HOUR, json!({"customer_id": "cust-zq82", "anonymous_id": "anon-zq81"}), json!({})),
            event("ev-zq8-c", "cart.item_added", night - 7 * HOUR, json!({"customer_id": "cust-zq82"}), json!({"product_id": "p1", "price": 5.0, "quantity": 1})),
            event("ev-zq8-d", "order.completed", night - 6 * HOUR, json!({"customer_id": "cust-zq82"}), json!({"total": 5.0})),
            event("ev-zq8-e", "page.viewed", night - 5 * HOUR, json!({"anonymous_id": "anon-zq85"}), json!({})),
            event("ev-zq8-f", "page.viewed", night - 4 * HOUR, json!({"anonymous_id": "anon-zq85", "customer_id": "cust-zq82"}), json!({})),
        ];
        let profiles = |with_subject: bool| {
            let mut d = TestDriver::new(topology(partitions.min(4), partitions), seed);
            for (i, e) in others.iter().enumerate() {
                send(&mut d, e);
                if with_subject && i < subject.len() {
                    send(&mut d, &subject[i]);
                }
                if with_subject && i == cut {
                    d.run().unwrap();
                    privacy(&mut d, json!({"type": "erasure", "identifier": {"type": "anonymous_id", "value": "anon-zq81"}}));
                }
            }
            d.run().unwrap();
            if with_subject {
                // Whatever was sent after the erasure point names a now-suppressed
                // identifier, or is a fresh customer of its own (anon-zq85 before it met
                // cust-zq82): erase that one too, so the comparison holds.
                privacy(&mut d, json!({"type": "erasure", "identifier": {"type": "anonymous_id", "value": "anon-zq85"}}));
                d.run().unwrap();
                let needles: BTreeSet<String> = [MARK.to_owned()].into();
                let left = traces(&mut d, &needles);
                prop_assert!(left.is_empty(), "traces left: {left:?}");
            }
            let table: BTreeMap<String, Value> = d.table("profiles").into_values()
                .filter(|p| !p.to_string().contains(MARK))
                .map(|mut p| {
                    p.as_object_mut().unwrap().remove("updated_at");
                    (p["customer_id"].as_str().unwrap_or_default().to_owned(), p)
                })
                .collect();
            Ok(table)
        };
        let with = profiles(true)?;
        let without = profiles(false)?;
        prop_assert_eq!(with, without);
    }
}

/// Another customer's guard refused the subject's identifiers (two business ids on one
/// email), and identifiers remember the links they sent: neither names the subject in
/// the other customer's state, so the erasure leaves nothing there either.
#[test]
fn other_customers_refusals_and_link_memory_do_not_name_the_subject() {
    for (raw, partitions, seed) in [(1, 1, 1), (2, 4, 5)] {
        let mut d = TestDriver::new(topology(raw, partitions), seed);
        let t = at("2026-05-01T10:00:00Z");
        let mut e = event("ev-keep-1", "identify", t, json!({"customer_id": "c-keep"}), json!({}));
        e["traits"] = json!({"email": "keep@example.com"});
        send(&mut d, &e);
        let mut e = event("ev-zq8-1", "identify", t + 1, json!({"customer_id": "cust-zq8a"}), json!({}));
        e["traits"] = json!({"email": "zq8a@example.com"});
        send(&mut d, &e);
        d.run().unwrap();
        // The subject claims the other's email: the unique customer_id guard refuses it.
        let mut e = event("ev-zq8-2", "identify", t + 2, json!({"customer_id": "cust-zq8a"}), json!({}));
        e["traits"] = json!({"email": "keep@example.com"});
        send(&mut d, &e);
        d.run().unwrap();
        assert!(d.counter("guard_refusals", "unique") >= 1);
        let mut needles: BTreeSet<String> = canonical_ids(&d);
        needles.insert(MARK.to_owned());
        privacy(
            &mut d,
            json!({"type": "erasure", "identifier": {"type": "customer_id", "value": "cust-zq8a"},
                "request_id": "0190a2b4-0000-7000-8000-0000000000f3"}),
        );
        assert_eq!(receipts(&d)["0190a2b4-0000-7000-8000-0000000000f3"]["status"], "completed");
        let left = traces(&mut d, &needles);
        assert!(left.is_empty(), "{raw}/{partitions}: {left:?}");
        // The other customer kept the refusal, by hash.
        let kept: Vec<String> = d
            .dump()
            .into_iter()
            .filter(|e| {
                e.store == "identity"
                    && e.key.starts_with(b"comp:")
                    && contains(&e.value, b"refusals")
                    && contains(&e.value, b"c-keep")
            })
            .map(|e| String::from_utf8_lossy(&e.value).into_owned())
            .collect();
        assert_eq!(kept.len(), 1, "{raw}/{partitions}: the other customer's refusal stays: {kept:?}");
    }
}

/// An access export filed before an erasure holds the subject's data: the erasure takes
/// it too, on whichever partition the access request's status lives.
#[test]
fn an_erasure_takes_earlier_exports_of_its_subject_with_it() {
    for (raw, partitions, seed) in [(1, 1, 2), (2, 4, 9)] {
        let (mut d, _) = scenario(raw, partitions, seed);
        let access = "0190a2b4-0000-7000-8000-0000000000a1";
        privacy(
            &mut d,
            json!({"type": "access", "identifier": {"type": "anonymous_id", "value": "anon-zq81"}, "request_id": access}),
        );
        assert!(!d.store_scan("privacy", "privacy", &format!("part:{access}\u{1}")).is_empty());
        // The access request's reports are on events.resolved too, under its id.
        let mut needles: BTreeSet<String> = canonical_ids(&d).into_iter().filter(|c| c != access).collect();
        needles.insert(MARK.to_owned());
        privacy(
            &mut d,
            json!({"type": "erasure", "identifier": {"type": "customer_id", "value": "cust-zq82"},
                "request_id": "0190a2b4-0000-7000-8000-0000000000e1"}),
        );
        let receipts = receipts(&d);
        assert_eq!(receipts["0190a2b4-0000-7000-8000-0000000000e1"]["status"], "completed");
        assert!(d.store_scan("privacy", "privacy", &format!("part:{access}\u{1}")).is_empty());
        let left = traces(&mut d, &needles);
        assert!(left.is_empty(), "{raw}/{partitions}: {left:?}");
        let status: Value = d
            .store_scan("privacy", "privacy", &format!("req:{access}"))
            .first()
            .map(|(_, _, v)| chorus_processors::cache::decode(v).unwrap())
            .unwrap();
        assert_eq!(status["note"], "subject_erased", "{status:#}");
    }
}
