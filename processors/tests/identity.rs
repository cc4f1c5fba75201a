//! The identity graph across partitions: property tests against a single-threaded
//! union-find oracle, guard invariants, convergence, unlink, probabilistic matching and
//! bad identifiers — all through the TestDriver.

use chorus_processors::identity::config::IdentityConfig;
use chorus_processors::identity::{Component, IdState, Identifier};
use chorus_processors::topology::{Clock, Topology};
use chorus_processors::TestDriver;
mod common;

use common::find;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

const T0: i64 = 1_707_906_600_000;

fn ts(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).unwrap().to_string()
}

fn topology(partitions: u32, guards: bool) -> Topology {
    let mut t = Topology::default().with_partitions(partitions);
    t.clock = Clock::Event;
    if !guards {
        for ty in &mut t.identity.types {
            ty.unique = false;
            ty.max_per_customer = None;
            ty.merges = true;
        }
        t.identity.max_component_size = 10_000;
    }
    t
}

/// One generated event: which identifiers it carries (type, raw value), its id and time.
#[derive(Debug, Clone)]
struct GenEvent {
    event_id: String,
    at: i64,
    ids: Vec<(String, String)>,
    amount: u16,
}

fn raw_value() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        8 => (0u8..6).prop_map(|i| ("customer_id".to_string(), format!("c{i}"))),
        6 => (0u8..10).prop_map(|i| ("anonymous_id".to_string(), format!("a{i}"))),
        5 => (0u8..6).prop_map(|i| ("email".to_string(), format!(" User{i}@Example.com"))),
        3 => (0u8..4).prop_map(|i| ("phone".to_string(), format!("(415) 555-01{i:02}"))),
        3 => (0u8..4).prop_map(|i| ("device_id".to_string(), format!("dev-{i}"))),
        1 => (0u8..2).prop_map(|i| ("loyalty_card".to_string(), format!("L{i}"))),
        1 => prop::sample::select(vec!["null", "", "0000", "undefined", "anonymous"])
            .prop_map(|v| ("anonymous_id".to_string(), v.to_string())),
        1 => Just(("email".to_string(), "test@test.com".to_string())),
        1 => Just(("email".to_string(), "not-an-email".to_string())),
        1 => Just(("shoe_size".to_string(), "42".to_string())),
    ]
}

fn arb_events() -> impl Strategy<Value = Vec<GenEvent>> {
    prop::collection::vec((prop::collection::vec(raw_value(), 1..4), 0i64..50, 1u16..300, 0u8..10), 1..50).prop_map(
        |rows| {
            let mut out: Vec<GenEvent> = Vec::new();
            for (i, (ids, jitter, amount, dup)) in rows.into_iter().enumerate() {
                // Some events are retries of an earlier one; times go back and forth.
                if dup == 0 && i > 0 {
                    out.push(out[i / 2].clone());
                } else {
                    out.push(GenEvent {
                        event_id: format!("e{i}"),
                        at: T0 + (i as i64) * 1000 - jitter * 300,
                        ids,
                        amount,
                    });
                }
            }
            out
        },
    )
}

fn event_json(e: &GenEvent) -> Value {
    let mut v = json!({"event_id": e.event_id, "event_type": "order.completed", "timestamp": ts(e.at),
        "payload": {"total": e.amount}});
    let mut identifiers = serde_json::Map::new();
    for (kind, value) in &e.ids {
        match kind.as_str() {
            "customer_id" | "anonymous_id" => {
                v[kind] = json!(value);
            }
            _ => {
                identifiers.insert(kind.clone(), json!(value));
            }
        }
    }
    v["identifiers"] = Value::Object(identifiers);
    v
}

/// The usable identifiers of an event exactly as the pipeline will see it (the JSON
/// object keeps one value per key, so later duplicates overwrite earlier ones).
fn usable(config: &IdentityConfig, e: &GenEvent) -> Vec<Identifier> {
    // An event the schema refuses (an empty anonymous_id) goes to the DLQ whole.
    let Ok(parsed) = chorus_schemas::Event::from_json(&event_json(e)) else { return Vec::new() };
    let mut out: Vec<Identifier> = chorus_processors::identity::raw_identifiers(&parsed)
        .into_iter()
        .filter_map(|(k, v)| Identifier::parse(config, k, v).ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

fn feed(d: &mut TestDriver, events: &[GenEvent], seed: u64) {
    for (i, e) in events.iter().enumerate() {
        // Producers key records by any identifier (or none): the raw partition is random.
        let key = format!("k{}", (seed as usize + i * 7) % 13);
        d.pipe_json("events.raw", &key, &event_json(e), 0);
    }
    d.run().unwrap();
}

/// What the graph looks like once quiet, read from every partition's store.
struct GraphView {
    /// Live components by canonical id.
    comps: BTreeMap<String, Component>,
    ids: BTreeMap<String, IdState>,
    fwd: BTreeMap<String, String>,
    parked: usize,
}

impl GraphView {
    fn read(d: &mut TestDriver) -> GraphView {
        let json = |b: &[u8]| chorus_processors::cache::decode::<Value>(b).unwrap();
        let comps = d
            .store_scan("identity", "identity", "comp:")
            .into_iter()
            .map(|(_, k, v)| (k["comp:".len()..].to_owned(), serde_json::from_value(json(&v)).unwrap()))
            .collect();
        let ids = d
            .store_scan("identity", "identity", "id:")
            .into_iter()
            .map(|(_, k, v)| (k["id:".len()..].to_owned(), serde_json::from_value(json(&v)).unwrap()))
            .collect();
        let fwd = d
            .store_scan("identity", "identity", "fwd:")
            .into_iter()
            .map(|(_, k, v)| (k["fwd:".len()..].to_owned(), serde_json::from_value(json(&v)).unwrap()))
            .collect();
        let parked = d.store_scan("identity", "identity", "mbox:").len();
        GraphView { comps, ids, fwd, parked }
    }

    /// Identifier label → canonical id of the live component holding it.
    fn membership(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (c, comp) in &self.comps {
            for l in &comp.identifiers {
                let label = l.identifier().label();
                assert!(out.insert(label.clone(), c.clone()).is_none(), "{label} is in two customers");
            }
        }
        out
    }

    /// The structural invariants every quiet graph satisfies, guards or not.
    fn check_converged(&self) -> Result<BTreeMap<String, String>, TestCaseError> {
        prop_assert_eq!(self.parked, 0, "messages still parked");
        for (c, comp) in &self.comps {
            prop_assert!(comp.pending.is_none(), "{} still has a proposal in flight", c);
            prop_assert!(!self.fwd.contains_key(c), "{} is both live and forwarded", c);
        }
        for (from, into) in &self.fwd {
            prop_assert!(into < from, "forwarding pointer {} -> {} does not go down", from, into);
        }
        let members = self.membership();
        for (label, st) in &self.ids {
            prop_assert!(st.pending.is_none(), "{} is still frozen", label);
            match (members.get(label), &st.canonical) {
                (Some(c), Some(mine)) => prop_assert_eq!(c, mine, "{} points to a merged-away customer", label),
                (None, None) => {}
                (held, mine) => prop_assert!(false, "{label}: held by {held:?}, thinks {mine:?}"),
            }
        }
        Ok(members)
    }
}

/// Sets of identifier labels, one per component, in a canonical order.
fn partition_of(groups: impl IntoIterator<Item = (String, String)>) -> BTreeSet<BTreeSet<String>> {
    let mut by: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (label, group) in groups {
        by.entry(group).or_default().insert(label);
    }
    by.into_values().collect()
}

fn partitions() -> impl Strategy<Value = u32> {
    prop::sample::select(vec![1u32, 2, 3, 8, 16])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Invariants 1, 4 and 5 without guards: the converged graph equals the union-find
    /// oracle, every identifier points at its live customer, each merge is emitted
    /// once, later events resolve to survivors, and profile totals match the oracle.
    #[test]
    fn converges_to_the_union_find_oracle(events in arb_events(), n in partitions(), seed in any::<u64>()) {
        let t = topology(n, false);
        let config = t.identity.clone();
        let mut d = TestDriver::new(t, seed);
        feed(&mut d, &events, seed);

        // Oracle: union-find over identifiers seen together; each event id counts once.
        let mut parent = BTreeMap::new();
        let mut counted: BTreeMap<String, (String, u64)> = BTreeMap::new();
        for e in &events {
            let ids = usable(&config, e);
            let Some(first) = ids.first() else { continue };
            for id in &ids {
                parent.entry(id.label()).or_insert_with(|| id.label());
            }
            for id in &ids[1..] {
                let (a, b) = (find(&mut parent, &first.label()), find(&mut parent, &id.label()));
                if a != b { parent.insert(a, b); }
            }
            counted.entry(e.event_id.clone()).or_insert((first.label(), e.amount as u64));
        }
        let labels: Vec<String> = parent.keys().cloned().collect();
        let oracle = partition_of(labels.iter().map(|l| (l.clone(), find(&mut parent, l))));

        let view = GraphView::read(&mut d);
        let members = view.check_converged()?;
        prop_assert_eq!(partition_of(members.clone()), oracle);

        let merges = d.read("identity.merges");
        let froms: BTreeSet<String> = merges.iter().map(|r| r.key_str()).collect();
        prop_assert_eq!(froms.len(), merges.len(), "a customer merged away twice");
        prop_assert_eq!(d.counter("customers_created", "identity") as usize - merges.len(), view.comps.len());
        prop_assert_eq!(d.counter("guard_refusals", "unique") + d.counter("guard_refusals", "type_limit"), 0);

        // Profile totals: each distinct event once, in its oracle component's profile.
        let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (first, amount) in counted.values() {
            let c = members[first].clone();
            let w = want.entry(c).or_default();
            w.0 += 1;
            w.1 += amount;
        }
        let mut got: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (c, p) in d.table("profiles") {
            got.insert(c, (p["metrics"]["event_count"].as_u64().unwrap(), p["metrics"]["lifetime_value"].as_f64().unwrap() as u64));
        }
        prop_assert_eq!(got, want);

        // Later events of any identifier resolve to the surviving customer.
        for (i, label) in members.keys().enumerate() {
            let id = Identifier::from_label(label).unwrap();
            let e = GenEvent { event_id: format!("later{i}"), at: T0 + 10_000_000, ids: vec![(id.kind, id.value)], amount: 1 };
            d.pipe_json("events.raw", label, &event_json(&e), 0);
        }
        d.run().unwrap();
        for r in &d.read("events.resolved") {
            let v = r.json().unwrap();
            if v["kind"] != "event" || !v["body"]["event_id"].as_str().unwrap().starts_with("later") { continue; }
            let body = &v["body"];
            let label = if let Some(c) = body["customer_id"].as_str() { format!("customer_id:{c}") }
                else if let Some(a) = body["anonymous_id"].as_str() { format!("anonymous_id:{a}") }
                else { let (k, val) = body["identifiers"].as_object().unwrap().iter().next().unwrap(); format!("{k}:{}", val.as_str().unwrap()) };
            prop_assert_eq!(v["canonical_id"].as_str().unwrap(), members[&label].as_str(), "{}", label);
        }
    }

    /// Invariants 2, 3 and 4 with the default guards: no component violates a guard,
    /// every link not honoured is one a guard refuses, and the graph is quiet and
    /// consistent.
    #[test]
    fn guards_hold_and_every_unrefused_link_is_honoured(events in arb_events(), n in partitions(), seed in any::<u64>()) {
        let t = topology(n, true);
        let config = t.identity.clone();
        let mut d = TestDriver::new(t, seed);
        feed(&mut d, &events, seed);
        let view = GraphView::read(&mut d);
        let members = view.check_converged()?;

        for comp in view.comps.values() {
            prop_assert!(violation(&config, comp.identifiers.iter().map(|l| l.identifier())).is_none(), "{comp:?}");
        }
        // An input links each of its identifiers to the customer of the one it resolved
        // through (its anchor). So some identifier of every input must hold a customer
        // that every other identifier joined, unless a guard forbids the union (the
        // guards only grow stricter as customers grow, so final customers can judge).
        let merges_of = |l: &str| config.identifier_type(l.split(':').next().unwrap()).is_none_or(|t| t.merges);
        let side = |l: &String| -> Vec<Identifier> {
            match members.get(l) {
                Some(c) => view.comps[c].identifiers.iter().map(|x| x.identifier()).collect(),
                None => vec![Identifier::from_label(l).unwrap()],
            }
        };
        let honoured = |anchor: &String, other: &String| {
            members.contains_key(other) && members.get(other) == members.get(anchor)
                || !merges_of(anchor)
                || !merges_of(other)
                || violation(&config, side(anchor).into_iter().chain(side(other))).is_some()
        };
        for e in &events {
            let labels: Vec<String> = usable(&config, e).iter().map(Identifier::label).collect();
            if labels.is_empty() { continue; }
            let centre = labels.iter().find(|a| members.contains_key(*a) && labels.iter().all(|b| b == *a || honoured(a, b)));
            prop_assert!(centre.is_some(), "input {} {:?}: no identifier's customer honours every unrefused link: {:?}",
                e.event_id, labels, labels.iter().map(|l| members.get(l)).collect::<Vec<_>>());
        }
        let merges = d.read("identity.merges");
        let froms: BTreeSet<String> = merges.iter().map(|r| r.key_str()).collect();
        prop_assert_eq!(froms.len(), merges.len());
    }
}

/// The guard a set of identifiers held by one customer would violate.
fn violation(config: &IdentityConfig, ids: impl IntoIterator<Item = Identifier>) -> Option<&'static str> {
    let ids: BTreeSet<Identifier> = ids.into_iter().collect();
    if ids.len() > config.max_component_size {
        return Some("component_size");
    }
    for ty in &config.types {
        if let Some(limit) = ty.limit() {
            if ids.iter().filter(|i| i.kind == ty.name).count() > limit {
                return Some("type_limit");
            }
        }
    }
    None
}

fn identify(d: &mut TestDriver, id: &str, at: i64, ids: Value, traits: Value) {
    let mut e = json!({"event_id": id, "event_type": "identify", "timestamp": ts(at), "traits": traits});
    for (k, v) in ids.as_object().unwrap() {
        e[k] = v.clone();
    }
    d.pipe_json("events.raw", id, &e, 0);
}

fn identity_of(d: &mut TestDriver, label: &str) -> Component {
    let view = GraphView::read(d);
    let c = view.ids[label].canonical.clone().unwrap();
    view.comps[&c].clone()
}

#[test]
fn a_shared_device_never_merges_two_logged_in_customers() {
    let mut d = TestDriver::new(topology(4, true), 1);
    identify(&mut d, "e1", T0, json!({"customer_id": "mum", "context": {"device_id": "ipad"}}), json!({}));
    identify(&mut d, "e2", T0 + 1, json!({"customer_id": "kid", "context": {"device_id": "ipad"}}), json!({}));
    d.run().unwrap();
    let mum = identity_of(&mut d, "customer_id:mum");
    let kid = identity_of(&mut d, "customer_id:kid");
    assert_ne!(mum.canonical_id, kid.canonical_id);
    assert!(d.read("identity.merges").is_empty());
    assert_eq!(d.counter("guard_refusals", "shared_identifier"), 1);
    // The second event still resolved, to the most specific customer.
    let resolved: Vec<Value> = d.read("events.resolved").iter().filter_map(|r| r.json()).collect();
    assert!(resolved.iter().any(|r| r["customer_id"] == "kid" && r["canonical_id"] == kid.canonical_id.as_str()));
}

/// A family member's first login carries a phone number another member already holds:
/// the event is theirs (a new customer), not the other member's, and nothing merges.
#[test]
fn a_first_login_on_a_shared_phone_number_is_its_own_customer() {
    let mut d = TestDriver::new(topology(2, true), 3);
    identify(&mut d, "e1", T0, json!({"customer_id": "mum", "identifiers": {"phone": "+61730000000"}}), json!({}));
    d.run().unwrap();
    identify(&mut d, "e2", T0 + 1, json!({"customer_id": "kid", "identifiers": {"phone": "+61730000000"}}), json!({}));
    d.run().unwrap();
    let mum = identity_of(&mut d, "customer_id:mum");
    let kid = identity_of(&mut d, "customer_id:kid");
    assert_ne!(mum.canonical_id, kid.canonical_id);
    assert!(d.read("identity.merges").is_empty());
    let resolved: Vec<Value> = d.read("events.resolved").iter().filter_map(|r| r.json()).collect();
    let e2 = resolved.iter().find(|r| r["body"]["event_id"] == "e2").unwrap();
    assert_eq!(
        (e2["customer_id"].as_str(), e2["canonical_id"].as_str()),
        (Some("kid"), Some(kid.canonical_id.as_str()))
    );
}

#[test]
fn unique_ids_and_type_limits_refuse_merges_and_count_them() {
    let mut t = topology(3, true);
    t.identity.types.iter_mut().find(|t| t.name == "email").unwrap().max_per_customer = Some(2);
    let mut d = TestDriver::new(t, 2);
    identify(&mut d, "e1", T0, json!({"customer_id": "c1", "identifiers": {"email": "a@x.com"}}), json!({}));
    identify(&mut d, "e2", T0 + 1, json!({"customer_id": "c2", "identifiers": {"email": "b@x.com"}}), json!({}));
    d.run().unwrap();
    // Two business ids on one email: refused (customer_id is unique).
    identify(&mut d, "e3", T0 + 2, json!({"customer_id": "c2", "identifiers": {"email": "a@x.com"}}), json!({}));
    // A third email for c1 exceeds max_per_customer 2.
    identify(&mut d, "e4", T0 + 3, json!({"customer_id": "c1", "identifiers": {"email": "c@x.com"}}), json!({}));
    identify(&mut d, "e5", T0 + 4, json!({"customer_id": "c1", "identifiers": {"email": "d@x.com"}}), json!({}));
    d.run().unwrap();
    assert_eq!(d.counter("guard_refusals", "unique"), 1);
    assert_eq!(d.counter("guard_refusals", "type_limit"), 1);
    let c1 = identity_of(&mut d, "customer_id:c1");
    assert_eq!(c1.identifiers.iter().filter(|l| l.kind == "email").count(), 2);
    // Each refusal is visible on the customer that refused it.
    let guards: Vec<&str> = c1.refusals.iter().map(|r| r.guard.as_str()).collect();
    assert!(guards.contains(&"type_limit"), "{guards:?}");
    let c2 = identity_of(&mut d, "customer_id:c2");
    let all: Vec<&str> = c1.refusals.iter().chain(&c2.refusals).map(|r| r.guard.as_str()).collect();
    assert!(all.contains(&"unique"), "{all:?}");
    assert!(d.read("identity.merges").is_empty());
}

#[test]
fn merges_carry_history_and_the_graph_topic_follows() {
    let mut d = TestDriver::new(topology(8, true), 3);
    identify(&mut d, "e1", T0, json!({"anonymous_id": "web-1"}), json!({}));
    identify(&mut d, "e2", T0 + 1, json!({"anonymous_id": "app-1", "identifiers": {"email": "ann@x.com"}}), json!({}));
    d.run().unwrap();
    identify(
        &mut d,
        "e3",
        T0 + 2,
        json!({"customer_id": "ann", "anonymous_id": "web-1", "identifiers": {"email": "ANN@x.com"}}),
        json!({}),
    );
    d.run().unwrap();
    let comp = identity_of(&mut d, "customer_id:ann");
    let labels: BTreeSet<String> = comp.identifiers.iter().map(|l| l.identifier().label()).collect();
    let want: BTreeSet<String> = ["customer_id:ann", "anonymous_id:web-1", "anonymous_id:app-1", "email:ann@x.com"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(labels, want);
    assert_eq!(comp.customer_id.as_deref(), Some("ann"));
    let merges = d.read("identity.merges");
    assert_eq!(merges.len(), 1, "web-1's and app-1's customers became one");
    assert_eq!(comp.history.len(), 1);
    assert_eq!(merges[0].json().unwrap()["rule"], "deterministic");
    let graph = d.table("identity.graph");
    for l in &want {
        assert_eq!(graph[l]["canonical_id"], comp.canonical_id.as_str(), "{l}");
    }
}

#[test]
fn unlink_splits_an_identifier_off_and_keeps_it_off() {
    let mut d = TestDriver::new(topology(4, true), 4);
    identify(&mut d, "e1", T0, json!({"customer_id": "bob", "identifiers": {"email": "shared@x.com"}}), json!({}));
    d.run().unwrap();
    let before = identity_of(&mut d, "customer_id:bob");
    let id = Identifier::raw("email", "shared@x.com");
    let (key, value) = chorus_processors::identity::unlink_message(&id, T0 + 10);
    d.pipe("chorus-identity-repartition", key.as_bytes(), Some(value), 0);
    d.run().unwrap();
    let after = identity_of(&mut d, "customer_id:bob");
    assert_eq!(after.canonical_id, before.canonical_id);
    assert!(!after.identifiers.iter().any(|l| l.kind == "email"));
    let split = identity_of(&mut d, "email:shared@x.com");
    assert_ne!(split.canonical_id, before.canonical_id);
    assert_eq!(split.excluded, vec![before.canonical_id.clone()]);
    let merges = d.read("identity.merges");
    assert_eq!(merges.last().unwrap().json().unwrap()["rule"], "unlink");
    // Seen together again, directly or through another identifier: the split stays.
    identify(&mut d, "e2", T0 + 20, json!({"customer_id": "bob", "identifiers": {"email": "shared@x.com"}}), json!({}));
    identify(&mut d, "e3", T0 + 21, json!({"anonymous_id": "z", "identifiers": {"email": "shared@x.com"}}), json!({}));
    d.run().unwrap();
    identify(&mut d, "e4", T0 + 22, json!({"customer_id": "bob", "anonymous_id": "z"}), json!({}));
    d.run().unwrap();
    assert_ne!(
        identity_of(&mut d, "email:shared@x.com").canonical_id,
        identity_of(&mut d, "customer_id:bob").canonical_id
    );
    assert_eq!(d.counter("guard_refusals", "unlinked"), 1);
    assert!(GraphView::read(&mut d).check_converged().is_ok());
}

#[test]
fn similar_traits_link_probabilistically_and_borderline_pairs_go_to_review() {
    let mut d = TestDriver::new(topology(8, true), 5);
    let traits = |first: &str, dob: &str, street: &str| {
        json!({"firstName": first, "lastName": "Nguyen", "birthday": dob,
               "address": {"street": street, "city": "Brisbane", "postalCode": "4000", "state": "QLD"}})
    };
    identify(
        &mut d,
        "e1",
        T0,
        json!({"identifiers": {"email": "t.nguyen@work.com"}}),
        traits("Thanh", "1984-03-09", "12 Eagle St"),
    );
    identify(
        &mut d,
        "e2",
        T0 + 1,
        json!({"identifiers": {"email": "thanh84@home.net"}}),
        traits("Thanh", "1984-09-03", "12 Eagle Street"),
    );
    // Same surname and address, another person.
    identify(
        &mut d,
        "e3",
        T0 + 2,
        json!({"identifiers": {"email": "kim@home.net"}}),
        traits("Kim", "1986-11-21", "12 Eagle St"),
    );
    d.run().unwrap();
    let a = identity_of(&mut d, "email:t.nguyen@work.com");
    let b = identity_of(&mut d, "email:thanh84@home.net");
    let kim = identity_of(&mut d, "email:kim@home.net");
    assert_eq!(a.canonical_id, b.canonical_id, "the two Thanh records are one customer");
    assert_ne!(a.canonical_id, kim.canonical_id);
    let merge = d.read("identity.merges")[0].json().unwrap();
    assert_eq!(merge["rule"], "probabilistic");
    assert!(merge["score"].as_f64().unwrap() >= 17.0, "{merge}");
    let linked = a.identifiers.iter().find(|l| l.rule == "probabilistic").expect("linked probabilistically");
    assert!(linked.score.is_some());
    let reviews = d.read("identity.review");
    assert!(!reviews.is_empty(), "Kim vs Thanh scores between the thresholds");
    let review = reviews[0].json().unwrap();
    assert!(review["score"].as_f64().unwrap() >= 10.0 && review["comparisons"]["last_name"] == "exact", "{review}");
}

#[test]
fn bad_identifiers_are_refused_counted_and_explained() {
    let mut d = TestDriver::new(topology(2, true), 6);
    let e = json!({"event_id": "b1", "event_type": "page.viewed", "timestamp": ts(T0), "anonymous_id": "undefined",
        "identifiers": {"email": "nope", "shoe_size": "42", "phone": "12", "customer_id": "x".repeat(300)}});
    d.pipe_json("events.raw", "k", &e, 0);
    // One good identifier among bad ones: the event resolves through it.
    let ok = json!({"event_id": "b2", "event_type": "page.viewed", "timestamp": ts(T0), "anonymous_id": "a-1",
        "identifiers": {"email": "nope", "shoe_size": "42", "customer_id": "x".repeat(300), "device_id": "0000"}});
    d.pipe_json("events.raw", "k", &ok, 0);
    // The same identifier twice is no self-link.
    let twice = json!({"event_id": "b3", "event_type": "page.viewed", "timestamp": ts(T0), "anonymous_id": "a-2",
        "identifiers": {"anonymous_id": " a-2 "}});
    d.pipe_json("events.raw", "k", &twice, 0);
    d.run().unwrap();
    let dlq = d.read("events.dlq");
    assert_eq!(dlq.len(), 1);
    let reason = dlq[0].json().unwrap();
    assert_eq!(reason["reason"], "no_identifier");
    let detail = reason["detail"].as_str().unwrap();
    for needle in ["placeholder", "not an email", "not declared", "phone", "max_value_length"] {
        assert!(detail.contains(needle), "{needle:?} missing from {detail}");
    }
    for label in ["placeholder", "invalid_shape", "unknown_type", "too_long"] {
        assert!(d.counter("identifier_refusals", label) >= 1, "{label}");
    }
    assert_eq!(d.read("events.resolved").iter().filter(|r| r.json().unwrap()["kind"] == "event").count(), 2);
    assert!(d.read("identity.merges").is_empty());
    assert!(GraphView::read(&mut d).check_converged().is_ok());
}

/// Two anonymous ids on one event (`anonymous_id` and `identifiers.anonymous_id`), and a
/// second event naming the same two the other way round: both anchor on the same value
/// (ties of one type break by value, not input order), so neither waits for the other;
/// both resolve, to one customer.
#[test]
fn two_values_of_one_type_in_either_order_resolve_to_one_customer() {
    for partitions in [1, 2, 4, 8] {
        for seed in 0..8 {
            let mut d = TestDriver::new(topology(partitions, true), seed);
            identify(
                &mut d,
                "e1",
                T0,
                json!({"anonymous_id": "zed", "identifiers": {"anonymous_id": "amy"}}),
                json!({}),
            );
            identify(
                &mut d,
                "e2",
                T0 + 1,
                json!({"anonymous_id": "amy", "identifiers": {"anonymous_id": "zed"}}),
                json!({}),
            );
            d.run().unwrap();
            let resolved: Vec<Value> =
                d.read("events.resolved").iter().filter_map(|r| r.json()).filter(|r| r["kind"] == "event").collect();
            assert_eq!(resolved.len(), 2, "partitions {partitions}, seed {seed}: {resolved:?}");
            assert_eq!(resolved[0]["canonical_id"], resolved[1]["canonical_id"], "partitions {partitions}");
            let a = identity_of(&mut d, "anonymous_id:amy");
            let z = identity_of(&mut d, "anonymous_id:zed");
            assert_eq!(a.canonical_id, z.canonical_id);
        }
    }
}

/// `POST /v1/identity/unlink` stamps the API's wall clock; under `clock: event` the
/// unlink happens at the task's event time and does not move it (a stream replaying
/// 2024 must not jump to the day the operator unlinked).
#[test]
fn an_unlink_does_not_move_event_time() {
    let mut d = TestDriver::new(topology(1, true), 4);
    identify(&mut d, "e1", T0, json!({"customer_id": "bob", "identifiers": {"email": "shared@x.com"}}), json!({}));
    d.run().unwrap();
    let wall_clock = T0 + 3 * 365 * 86_400_000;
    let (key, value) =
        chorus_processors::identity::unlink_message(&Identifier::raw("email", "shared@x.com"), wall_clock);
    d.pipe("chorus-identity-repartition", key.as_bytes(), Some(value), 0);
    d.run().unwrap();
    let unlink = d.read("identity.merges").last().unwrap().json().unwrap();
    assert_eq!(unlink["rule"], "unlink");
    assert_eq!(unlink["at"], T0, "the unlink happened at the stream's time");
    // The next event's time is still the stream's: a record at T0 + 1 s is not late.
    identify(&mut d, "e2", T0 + 1_000, json!({"customer_id": "ann"}), json!({}));
    d.run().unwrap();
    let resolved: Vec<Value> = d.read("events.resolved").iter().filter_map(|r| r.json()).collect();
    assert!(resolved.iter().all(|r| r["at"].as_i64().unwrap() < wall_clock), "{resolved:?}");
}

/// An event keyed by the plain customer id (what producers and `chorus produce` do) is
/// already on the partition that owns `customer_id:<id>`: a known customer's events
/// resolve without a single record through the internal topic.
#[test]
fn events_keyed_by_their_plain_id_resolve_without_a_hop() {
    for partitions in [1, 3, 8] {
        let mut d = TestDriver::new(topology(partitions, true), 11);
        let event = |i: usize, c: usize| {
            json!({"event_id": format!("e{i}-{c}"), "event_type": "page.viewed", "timestamp": ts(T0 + i as i64),
                "customer_id": format!("c{c}"), "payload": {"url": "/"}})
        };
        for c in 0..20 {
            d.pipe_json("events.raw", &format!("c{c}"), &event(0, c), 0);
        }
        d.run().unwrap();
        let before = d.read("chorus-identity-repartition").len();
        for c in 0..20 {
            d.pipe_json("events.raw", &format!("c{c}"), &event(1, c), 0);
        }
        d.run().unwrap();
        assert_eq!(d.read("chorus-identity-repartition").len(), before, "partitions {partitions}");
        let resolved =
            d.read("events.resolved").iter().filter(|r| r.json().is_some_and(|v| v["kind"] == "event")).count();
        assert_eq!(resolved, 40);
    }
}
