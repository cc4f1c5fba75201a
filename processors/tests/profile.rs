//! The Customer 360 profile in the TestDriver: its aggregates equal a recomputation from
//! each customer's events whatever the order identifiers get linked in, the partition
//! counts and the interleaving; segment membership equals the rules over the final
//! profile and the `segments` topic tells each id's story consistently; precomputed
//! recommendations, personalisation consent and popularity tables.

mod common;

use chorus_processors::personalisation::{recommend, Popularity, RecommendationInputs};
use chorus_processors::profile::Profile;
use chorus_processors::segments::{SegmentRule, Segments};
use chorus_processors::topology::Topology;
use chorus_processors::TestDriver;
use common::{event, profile_of, send, topology, ts, T0};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

const CUSTOMERS: usize = 3;
const ANONYMOUS_IDS: usize = 2;
/// `profile.recent_activity` of the test topology: small, so trimming happens.
const RECENT: usize = 5;

const PRODUCTS: [(&str, &str); 5] =
    [("tent", "outdoor"), ("stove", "outdoor"), ("novel", "books"), ("atlas", "books"), ("pan", "kitchen")];
const CATEGORIES: [&str; 3] = ["outdoor", "books", "kitchen"];
const STATES: [&str; 3] = ["QLD", "NSW", "VIC"];
const CAMPAIGNS: [&str; 3] = ["spring", "summer", "vip"];
const PAYMENTS: [&str; 2] = ["card", "paypal"];

/// What one generated event does. Amounts are in quarters so sums are exact in f64.
#[derive(Debug, Clone)]
enum Act {
    View(usize),
    CartAdd(usize),
    /// `category` indexes CATEGORIES; past its end the order names none (the first
    /// item's category counts, if any).
    Order {
        quarters: u16,
        category: usize,
        items: Vec<usize>,
        payment: usize,
    },
    Return(u16),
    EmailOpen(usize),
    Call(u16),
    Identify(usize),
}

/// Which of its customer's identifiers an event carries.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Who {
    Anonymous(usize),
    Customer,
    /// An identify linking the anonymous id to the customer id.
    Link(usize),
}

#[derive(Debug, Clone)]
struct Sent {
    event_id: String,
    customer: usize,
    at: i64,
    kind: &'static str,
    act: Act,
    json: Value,
}

fn arb_act() -> impl Strategy<Value = Act> {
    prop_oneof![
        3 => (0..PRODUCTS.len()).prop_map(Act::View),
        2 => (0..PRODUCTS.len()).prop_map(Act::CartAdd),
        3 => (1u16..1600, 0..CATEGORIES.len() + 1, prop::collection::vec(0..PRODUCTS.len(), 0..3), 0..PAYMENTS.len())
            .prop_map(|(quarters, category, items, payment)| Act::Order { quarters, category, items, payment }),
        1 => (1u16..800).prop_map(Act::Return),
        2 => (0..CAMPAIGNS.len()).prop_map(Act::EmailOpen),
        1 => (1u16..900).prop_map(Act::Call),
        1 => (0..STATES.len()).prop_map(Act::Identify),
    ]
}

/// Events over a few customers, each with two anonymous ids linked to its customer id
/// by an identify at a random place in the stream, so customers form and merge in any
/// order. Event times are a random permutation (unique, so "latest" is never a tie).
fn arb_stream() -> impl Strategy<Value = Vec<Sent>> {
    let acts = prop::collection::vec((0..CUSTOMERS, 0..=ANONYMOUS_IDS, arb_act()), 1..40);
    let links = prop::collection::vec((any::<prop::sample::Index>(), 0..STATES.len()), CUSTOMERS * ANONYMOUS_IDS);
    (acts, links)
        .prop_flat_map(|(acts, links)| {
            let n = (acts.len() + links.len()) as i64;
            (Just(acts), Just(links), Just((0..n).collect::<Vec<i64>>()).prop_shuffle())
        })
        .prop_map(|(acts, links, times)| {
            let mut plan: Vec<(usize, Who, Act)> = acts
                .into_iter()
                .map(|(c, a, act)| (c, if a < ANONYMOUS_IDS { Who::Anonymous(a) } else { Who::Customer }, act))
                .collect();
            for (pair, (place, state)) in links.into_iter().enumerate() {
                let at = place.index(plan.len() + 1);
                plan.insert(at, (pair / ANONYMOUS_IDS, Who::Link(pair % ANONYMOUS_IDS), Act::Identify(state)));
            }
            plan.into_iter()
                .zip(times)
                .enumerate()
                .map(|(i, ((customer, who, act), t))| sent(format!("e{i}"), customer, who, act, T0 + t * 1000))
                .collect()
        })
}

fn sent(event_id: String, customer: usize, who: Who, act: Act, at: i64) -> Sent {
    let product = |p: usize| json!({"product_id": PRODUCTS[p].0, "category": PRODUCTS[p].1});
    let (kind, payload) = match &act {
        Act::View(p) => ("product.viewed", product(*p)),
        Act::CartAdd(p) => {
            let mut item = product(*p);
            item["price"] = json!(10.0);
            item["quantity"] = json!(1);
            ("cart.item_added", item)
        }
        Act::Order { quarters, category, items, payment } => {
            let mut order = json!({"order_id": format!("o-{event_id}"), "total": *quarters as f64 / 4.0,
                "payment_method": PAYMENTS[*payment],
                "items": items.iter().map(|p| product(*p)).collect::<Vec<_>>()});
            if let Some(c) = CATEGORIES.get(*category) {
                order["category"] = json!(c);
            }
            ("order.completed", order)
        }
        Act::Return(q) => ("order.returned", json!({"amount": *q as f64 / 4.0})),
        Act::EmailOpen(c) => ("email.opened", json!({"campaign_id": CAMPAIGNS[*c]})),
        Act::Call(s) => ("call.completed", json!({"duration_s": s})),
        Act::Identify(_) => ("identify", json!({})),
    };
    let anonymous = |j: usize| format!("a{customer}x{j}");
    let ids = match who {
        Who::Anonymous(j) => json!({"anonymous_id": anonymous(j)}),
        Who::Customer => json!({"customer_id": format!("c{customer}")}),
        Who::Link(j) => json!({"anonymous_id": anonymous(j), "customer_id": format!("c{customer}")}),
    };
    let mut json = event(&event_id, kind, at, ids, payload);
    if let Act::Identify(state) = act {
        json["traits"] = json!({"location": {"state": STATES[state]}, "plan": format!("plan-{state}")});
    }
    Sent { event_id, customer, at, kind, act, json }
}

fn segment_rules() -> Vec<SegmentRule> {
    [
        ("high_value", "customer.lifetime_value > 500"),
        ("outdoor_enthusiast", "customer.last_purchase_category == \"outdoor\""),
        ("queensland", "customer.location.state == \"QLD\""),
        ("browser", "customer.behavioural.product_views.count >= 3"),
        ("engaged_buyer", "customer.purchase_count >= 2 and customer.interaction.email_opens.count >= 1"),
        ("never_opened_email", "not (customer.interaction.email_opens.count >= 1)"),
    ]
    .into_iter()
    .map(|(name, rule)| SegmentRule { name: name.into(), rule: rule.into() })
    .collect()
}

fn profile_topology(raw_partitions: u32, partitions: u32) -> Topology {
    let mut t = topology(raw_partitions, partitions);
    t.profile.recent_activity = RECENT;
    t.segments = segment_rules();
    // Customers differ only by their identifiers here; traits must not match them.
    t.identity.probabilistic.enabled = false;
    assert_eq!(t.validate(), Vec::new());
    t
}

fn run(stream: &[Sent], raw_partitions: u32, partitions: u32, seed: u64) -> TestDriver {
    let mut d = TestDriver::new(profile_topology(raw_partitions, partitions), seed);
    for e in stream {
        send(&mut d, &e.json);
    }
    d.run().unwrap();
    d
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// What the profile of one customer must say, recomputed from its events alone.
struct Expected {
    event_counts: BTreeMap<String, i64>,
    behavioural: Value,
    transactional: Value,
    interaction: Value,
    gross: f64,
    returns: f64,
    purchases: i64,
    last_purchase_category: Option<String>,
    /// Event ids, newest first.
    recent: Vec<String>,
    /// (campaign, last interaction), most recent first.
    campaigns: Vec<(String, i64)>,
    state: Option<String>,
    first_seen: i64,
    last_seen: i64,
}

impl Expected {
    fn of(events: &[&Sent]) -> Expected {
        let latest = |pick: &dyn Fn(&Sent) -> Option<String>| {
            events.iter().filter_map(|e| pick(e).map(|v| (e.at, v))).max().map(|(_, v)| v)
        };
        let tally = |section: &mut Map<String, Value>, name: &str, kind: &str| {
            let ats: Vec<i64> = events.iter().filter(|e| e.kind == kind).map(|e| e.at).collect();
            if let Some(last) = ats.iter().max() {
                section.insert(name.into(), json!({"count": ats.len(), "last_at": last}));
            }
        };
        let total = |section: &mut Map<String, Value>, name: &str, amounts: Vec<f64>| {
            if !amounts.is_empty() {
                section.insert(name.into(), json!(round2(amounts.iter().sum::<f64>())));
            }
        };
        let (mut behavioural, mut transactional, mut interaction) = (Map::new(), Map::new(), Map::new());
        tally(&mut behavioural, "product_views", "product.viewed");
        tally(&mut behavioural, "cart_additions", "cart.item_added");
        tally(&mut transactional, "orders", "order.completed");
        tally(&mut transactional, "returns", "order.returned");
        tally(&mut interaction, "email_opens", "email.opened");
        tally(&mut interaction, "calls", "call.completed");
        let returns: Vec<f64> = events
            .iter()
            .filter_map(|e| if let Act::Return(q) = e.act { Some(q as f64 / 4.0) } else { None })
            .collect();
        total(&mut transactional, "returned_value", returns.clone());
        let seconds: Vec<f64> =
            events.iter().filter_map(|e| if let Act::Call(s) = e.act { Some(s as f64) } else { None }).collect();
        total(&mut interaction, "call_seconds", seconds);
        if let Some(p) = latest(&|e| match &e.act {
            Act::Order { payment, .. } => Some(PAYMENTS[*payment].to_owned()),
            _ => None,
        }) {
            transactional.insert("payment_method".into(), json!(p));
        }
        let orders: Vec<&Sent> = events.iter().copied().filter(|e| e.kind == "order.completed").collect();
        let mut campaigns: BTreeMap<String, i64> = BTreeMap::new();
        for e in events {
            if let Act::EmailOpen(c) = e.act {
                let last = campaigns.entry(CAMPAIGNS[c].to_owned()).or_default();
                *last = (*last).max(e.at);
            }
        }
        let mut campaigns: Vec<(String, i64)> = campaigns.into_iter().collect();
        campaigns.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut by_time: Vec<(i64, &str)> = events.iter().map(|e| (e.at, e.event_id.as_str())).collect();
        by_time.sort();
        Expected {
            event_counts: events.iter().fold(BTreeMap::new(), |mut m, e| {
                *m.entry(e.kind.to_owned()).or_default() += 1;
                m
            }),
            behavioural: Value::Object(behavioural),
            transactional: Value::Object(transactional),
            interaction: Value::Object(interaction),
            gross: orders
                .iter()
                .map(|e| match e.act {
                    Act::Order { quarters, .. } => quarters as f64 / 4.0,
                    _ => 0.0,
                })
                .sum(),
            returns: returns.iter().sum(),
            purchases: orders.len() as i64,
            last_purchase_category: latest(&|e| match &e.act {
                Act::Order { category, items, .. } => {
                    CATEGORIES.get(*category).or(items.first().map(|p| &PRODUCTS[*p].1)).map(|c| c.to_string())
                }
                _ => None,
            }),
            recent: by_time.iter().rev().take(RECENT).map(|(_, id)| id.to_string()).collect(),
            campaigns,
            state: latest(&|e| match e.act {
                Act::Identify(s) => Some(STATES[s].to_owned()),
                _ => None,
            }),
            first_seen: events.iter().map(|e| e.at).min().unwrap_or(0),
            last_seen: events.iter().map(|e| e.at).max().unwrap_or(0),
        }
    }

    fn lifetime_value(&self) -> f64 {
        round2(self.gross - self.returns)
    }

    fn product_views(&self) -> i64 {
        self.behavioural["product_views"]["count"].as_i64().unwrap_or(0)
    }

    fn email_opens(&self) -> i64 {
        self.interaction["email_opens"]["count"].as_i64().unwrap_or(0)
    }

    /// The test topology's segments, written out in Rust.
    fn segments(&self) -> Vec<String> {
        [
            ("high_value", self.lifetime_value() > 500.0),
            ("outdoor_enthusiast", self.last_purchase_category.as_deref() == Some("outdoor")),
            ("queensland", self.state.as_deref() == Some("QLD")),
            ("browser", self.product_views() >= 3),
            ("engaged_buyer", self.purchases >= 2 && self.email_opens() >= 1),
            ("never_opened_email", self.email_opens() == 0),
        ]
        .into_iter()
        .filter(|(_, holds)| *holds)
        .map(|(name, _)| name.to_owned())
        .collect()
    }
}

fn events_of(stream: &[Sent], customer: usize) -> Vec<&Sent> {
    stream.iter().filter(|e| e.customer == customer).collect()
}

/// The stored profile (not the published snapshot) of a canonical id.
fn stored_profile(d: &mut TestDriver, canonical_id: &str) -> Profile {
    let rows = d.store_scan("profile", "profiles", canonical_id);
    let (_, _, bytes) = rows.iter().find(|(_, k, _)| k == canonical_id).expect("the profile is stored");
    chorus_processors::cache::decode(bytes).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Every aggregate of a customer's final profile equals a recomputation from that
    /// customer's events, whatever order its identifiers were linked (and its profiles
    /// merged) in, for any partitioning and interleaving.
    #[test]
    fn profile_aggregates_equal_a_recomputation_from_the_events(
        stream in arb_stream(),
        raw in prop::sample::select(vec![1u32, 2, 3]),
        partitions in prop::sample::select(vec![1u32, 2, 3, 8]),
        seed in any::<u64>(),
    ) {
        let d = run(&stream, raw, partitions, seed);
        prop_assert!(d.read("events.dlq").is_empty(), "{:?}", d.read("events.dlq"));
        prop_assert_eq!(d.table("profiles").len(), CUSTOMERS, "one profile per customer once every id is linked");
        for customer in 0..CUSTOMERS {
            let p = profile_of(&d, &format!("c{customer}"));
            let want = Expected::of(&events_of(&stream, customer));
            prop_assert_eq!(&p["event_counts"], &json!(want.event_counts));
            prop_assert_eq!(&p["behavioural"], &want.behavioural);
            prop_assert_eq!(&p["transactional"], &want.transactional);
            prop_assert_eq!(&p["interaction"], &want.interaction);
            let m = &p["metrics"];
            prop_assert_eq!(m["event_count"].as_i64(), Some(want.event_counts.values().sum::<i64>()));
            prop_assert_eq!(m["purchase_count"].as_i64(), Some(want.purchases));
            prop_assert_eq!(m["gross_revenue"].as_f64(), Some(round2(want.gross)));
            prop_assert_eq!(m["returns_value"].as_f64(), Some(round2(want.returns)));
            prop_assert_eq!(m["lifetime_value"].as_f64(), Some(want.lifetime_value()));
            let aov = if want.purchases > 0 { round2(want.gross / want.purchases as f64) } else { 0.0 };
            prop_assert_eq!(m["average_order_value"].as_f64(), Some(aov));
            prop_assert_eq!(m["last_purchase_category"].as_str(), want.last_purchase_category.as_deref());
            let recent: Vec<&str> =
                p["recent_activity"].as_array().unwrap().iter().map(|a| a["event_id"].as_str().unwrap()).collect();
            prop_assert_eq!(recent, want.recent.iter().map(String::as_str).collect::<Vec<_>>());
            let campaigns: Vec<(String, i64)> = p["active_campaigns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| (c["campaign_id"].as_str().unwrap().to_owned(), c["last_interaction"].as_i64().unwrap()))
                .collect();
            prop_assert_eq!(campaigns, want.campaigns);
            prop_assert_eq!(p["attributes"]["location"]["state"].as_str(), want.state.as_deref());
            prop_assert_eq!(p["first_seen"].as_i64(), Some(want.first_seen));
            prop_assert_eq!(p["last_seen"].as_i64(), Some(want.last_seen));
            let linked: BTreeSet<&str> =
                p["identity"]["linked_ids"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
            let mut want_linked: BTreeSet<String> =
                (0..ANONYMOUS_IDS).map(|j| format!("anonymous_id:a{customer}x{j}")).collect();
            want_linked.insert(format!("customer_id:c{customer}"));
            prop_assert_eq!(linked, want_linked.iter().map(String::as_str).collect::<BTreeSet<_>>());
        }
    }

    /// Segment membership on each final profile equals the rules evaluated over the
    /// customer (both as written out in Rust over the recomputed aggregates and as the
    /// rule engine sees the stored profile), and the `segments` topic tells each id's
    /// story consistently: per segment, entered and exited alternate starting with
    /// entered, ending in the id's current membership — none for merged-away ids.
    #[test]
    fn segment_membership_follows_the_rules_and_the_topic_agrees(
        stream in arb_stream(),
        raw in prop::sample::select(vec![1u32, 2, 3]),
        partitions in prop::sample::select(vec![1u32, 2, 3, 8]),
        seed in any::<u64>(),
    ) {
        let mut d = run(&stream, raw, partitions, seed);
        let rules = Segments::compile(&segment_rules()).unwrap();
        let config = d.topology().profile.clone();
        let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for customer in 0..CUSTOMERS {
            let p = profile_of(&d, &format!("c{customer}"));
            let id = p["canonical_id"].as_str().unwrap().to_owned();
            let segments: Vec<String> = serde_json::from_value(p["segments"].clone()).unwrap();
            let want = Expected::of(&events_of(&stream, customer)).segments();
            prop_assert_eq!(&segments, &want, "customer c{}", customer);
            let stored = stored_profile(&mut d, &id);
            prop_assert_eq!(&rules.evaluate(&stored.customer_view(stored.updated_at, &config)), &want);
            members.insert(id, segments);
        }
        // Each key sits in one partition, so its records are in order.
        let mut state: BTreeMap<(String, String), bool> = BTreeMap::new();
        for r in d.read("segments") {
            let (key, v) = (r.key_str(), r.json().unwrap());
            prop_assert_eq!(v["canonical_id"].as_str(), Some(key.as_str()));
            let inside = state.entry((key.clone(), v["segment"].as_str().unwrap().to_owned())).or_insert(false);
            match v["change"].as_str().unwrap() {
                "entered" => prop_assert!(!*inside, "{} entered {} twice in a row", key, v["segment"]),
                "exited" => prop_assert!(*inside, "{} exited {} without entering", key, v["segment"]),
                other => prop_assert!(false, "unknown change {}", other),
            }
            *inside = !*inside;
        }
        let mut ending: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for ((id, segment), inside) in state {
            let list = ending.entry(id).or_default();
            if inside {
                list.push(segment);
            }
        }
        for (id, mut now_in) in ending {
            let mut want = members.get(&id).cloned().unwrap_or_default();
            now_in.sort();
            want.sort();
            prop_assert_eq!(now_in, want, "segments topic's ending state for {}", id);
        }
    }
}

fn canonical_of(d: &TestDriver, label: &str) -> String {
    let profiles = d.table("profiles");
    let (id, _) = profiles
        .iter()
        .find(|(_, p)| p["identity"]["linked_ids"].as_array().unwrap().iter().any(|l| l == label))
        .unwrap_or_else(|| panic!("no profile links {label}"));
    id.clone()
}

fn precomputed() -> Value {
    json!({"items": [{"product_id": "tent", "score": 0.9, "category": "outdoor"},
                     {"product_id": "novel", "score": 0.4}],
           "model": "als-v3", "generated_at": "2024-02-14T00:00:00Z"})
}

/// `precomputed()` as the profile embeds it (every item field spelled out).
fn embedded() -> Value {
    let mut v = precomputed();
    v["items"][1]["category"] = Value::Null;
    v
}

#[test]
fn precomputed_recommendations_are_embedded_in_the_profile_and_a_tombstone_clears_them() {
    let mut d = TestDriver::new(topology(1, 3), 4);
    send(&mut d, &event("e1", "product.viewed", T0, json!({"customer_id": "c1"}), json!({"product_id": "pan"})));
    d.run().unwrap();
    let id = profile_of(&d, "c1")["canonical_id"].as_str().unwrap().to_owned();
    d.pipe_json("recommendations", &id, &precomputed(), 0);
    d.run().unwrap();
    let p = profile_of(&d, "c1");
    assert_eq!(p["recommendations"], embedded());
    assert_eq!(p["metrics"]["event_count"], 1, "a recommendations record is not an event");
    d.pipe("recommendations", id.as_bytes(), None, 0);
    d.run().unwrap();
    assert_eq!(profile_of(&d, "c1")["recommendations"], Value::Null);
}

#[test]
fn recommendations_for_an_id_that_merges_away_reach_the_survivor() {
    let mut d = TestDriver::new(topology(2, 3), 8);
    send(&mut d, &event("e1", "product.viewed", T0, json!({"anonymous_id": "anon-1"}), json!({})));
    send(&mut d, &event("e2", "product.viewed", T0 + 1, json!({"customer_id": "c1"}), json!({})));
    d.run().unwrap();
    let (anon, known) = (canonical_of(&d, "anonymous_id:anon-1"), canonical_of(&d, "customer_id:c1"));
    // Merges go from the larger canonical id into the smaller one.
    let (gone, survivor) = if anon > known { (anon, known) } else { (known, anon) };
    d.pipe_json("recommendations", &gone, &precomputed(), 0);
    d.run().unwrap();
    assert_eq!(d.table("profiles")[&gone]["recommendations"], embedded());
    assert_eq!(d.table("profiles")[&survivor]["recommendations"], Value::Null);

    let link = event("e3", "identify", T0 + 2, json!({"anonymous_id": "anon-1", "customer_id": "c1"}), json!({}));
    send(&mut d, &link);
    d.run().unwrap();
    let profiles = d.table("profiles");
    assert_eq!(profiles.keys().collect::<Vec<_>>(), [&survivor]);
    assert_eq!(profiles[&survivor]["recommendations"], embedded());
    assert_eq!(profiles[&survivor]["merged_from"], json!([gone]));

    // A newer list still addressed to the merged-away id follows the forwarding pointer.
    let mut newer = precomputed();
    newer["model"] = json!("als-v4");
    d.pipe_json("recommendations", &gone, &newer, 0);
    d.run().unwrap();
    let profiles = d.table("profiles");
    assert_eq!(profiles.len(), 1, "{profiles:?}");
    assert_eq!(profiles[&survivor]["recommendations"]["model"], "als-v4");
}

#[test]
fn invalid_recommendations_go_to_the_dlq() {
    let mut d = TestDriver::new(topology(1, 2), 3);
    send(&mut d, &event("e1", "page.viewed", T0, json!({"customer_id": "c1"}), json!({})));
    d.run().unwrap();
    let id = profile_of(&d, "c1")["canonical_id"].as_str().unwrap().to_owned();
    let bad = [
        b"{not json".to_vec(),
        br#"{"items": "tent"}"#.to_vec(),
        br#"{"items": [{"product_id": "", "score": 1.0}]}"#.to_vec(),
        br#"{"items": [], "surprise": true}"#.to_vec(),
    ];
    for value in &bad {
        d.pipe("recommendations", id.as_bytes(), Some(value.clone()), 0);
    }
    d.run().unwrap();
    let dlq: Vec<Value> = d.read("events.dlq").iter().map(|r| r.json().unwrap()).collect();
    assert_eq!(dlq.len(), bad.len(), "{dlq:?}");
    for letter in &dlq {
        assert_eq!(letter["reason"], "invalid_recommendations");
        assert_eq!(letter["source_topic"], "recommendations");
        assert_eq!(letter["processor"], "profile");
    }
    assert_eq!(profile_of(&d, "c1")["recommendations"], Value::Null);
}

#[test]
fn withdrawn_personalisation_consent_makes_the_profile_generic() {
    let mut d = TestDriver::new(topology(2, 3), 6);
    let order = json!({"total": 12_000.0, "category": "outdoor"});
    send(&mut d, &event("o1", "order.completed", T0, json!({"customer_id": "c1"}), order));
    d.run().unwrap();
    let p = profile_of(&d, "c1")["personalisation"].clone();
    assert_eq!(p["personalised"], true);
    assert_eq!(p["actions"], json!(["show_premium_collection", "show_outdoor_accessories"]));
    assert_eq!(p["next_best_action"], "show_premium_collection");
    assert_eq!(p["content"]["offers"], json!({"id": "exclusive_early_access", "source": "high_value"}));

    let consent = |granted: bool, at: i64| {
        json!({"customer_id": "c1", "purpose": "personalisation", "granted": granted, "timestamp": ts(at),
               "source": "preference_centre"})
    };
    d.pipe_json("consent", "c1", &consent(false, T0 + 1), 0);
    d.run().unwrap();
    let profile = profile_of(&d, "c1");
    let p = &profile["personalisation"];
    assert_eq!(p["personalised"], false);
    assert_eq!(p["reason"], "no_personalisation_consent");
    assert_eq!(p["actions"], json!([]));
    assert_eq!(p["next_best_action"], Value::Null);
    assert_eq!(p["content"]["offers"], json!({"id": "standard_offers", "source": "default"}));
    assert_eq!(profile["preferences"]["consent"]["personalisation"]["granted"], false);
    assert_eq!(profile["segments"], json!(["high_value", "outdoor_enthusiast"]), "segments still computed");

    d.pipe_json("consent", "c1", &consent(true, T0 + 2), 0);
    d.run().unwrap();
    assert_eq!(profile_of(&d, "c1")["personalisation"]["personalised"], true);
}

#[test]
fn without_analytics_consent_browsing_stays_out_of_the_profile() {
    let mut d = TestDriver::new(topology(1, 2), 8);
    let view = |id: &str, at: i64| {
        event(
            id,
            "product.viewed",
            at,
            json!({"customer_id": "c1"}),
            json!({"product_id": "p1", "category": "outdoor"}),
        )
    };
    send(&mut d, &view("v1", T0));
    d.run().unwrap();
    let withdraw = json!({"customer_id": "c1", "purpose": "analytics", "granted": false, "timestamp": ts(T0 + 1)});
    d.pipe_json("consent", "c1", &withdraw, 0);
    d.run().unwrap();
    send(&mut d, &view("v2", T0 + 2));
    send(&mut d, &event("o1", "order.completed", T0 + 3, json!({"customer_id": "c1"}), json!({"total": 20.0})));
    d.run().unwrap();
    let p = profile_of(&d, "c1");
    assert_eq!(p["behavioural"]["product_views"]["count"], 1, "only the view before the withdrawal");
    assert_eq!(p["transactional"]["orders"]["count"], 1, "orders are still aggregated");
    assert_eq!(p["metrics"]["event_count"], 2);
    assert!(p["recent_activity"].as_array().unwrap().iter().all(|a| a["event_id"] != "v2"));
    assert_eq!(d.counter("analytics_opt_out", "product.viewed"), 1);
}

fn popularity(d: &mut TestDriver, category: Option<&str>) -> Option<Popularity> {
    let key = chorus_processors::personalisation::popularity_key(category);
    d.store_get("profile", "profiles", 0, &key).map(|b| chorus_processors::cache::decode(&b).unwrap())
}

fn ranked(table: &Popularity, now: i64, d: &TestDriver) -> Vec<(String, f64)> {
    table.ranked(now, &d.topology().personalisation.recommendations).into_iter().map(|(p, s, _)| (p, s)).collect()
}

#[test]
fn popularity_tables_accumulate_per_category_and_feed_recommendations() {
    let mut d = TestDriver::new(topology(1, 1), 2);
    let c = json!({"customer_id": "c1"});
    let view = |id: &str, at: i64, product: &str, category: &str| {
        event(id, "product.viewed", at, c.clone(), json!({"product_id": product, "category": category}))
    };
    for i in 0..3 {
        send(&mut d, &view(&format!("v{i}"), T0, "tent", "outdoor"));
    }
    send(&mut d, &view("v3", T0, "pan", "kitchen"));
    send(&mut d, &event("a1", "cart.item_added", T0, c.clone(), json!({"product_id": "tent", "category": "outdoor"})));
    let items = json!([{"product_id": "stove", "category": "outdoor"}, {"product_id": "novel", "category": "books"}]);
    send(&mut d, &event("o1", "order.completed", T0, c.clone(), json!({"total": 40.0, "items": items})));
    d.run().unwrap();

    let all = popularity(&mut d, None).expect("pop:* is kept");
    let want = |rows: &[(&str, f64)]| rows.iter().map(|(p, s)| (p.to_string(), *s)).collect::<Vec<_>>();
    assert_eq!(ranked(&all, T0, &d), want(&[("tent", 6.0), ("novel", 5.0), ("stove", 5.0), ("pan", 1.0)]));
    let outdoor = popularity(&mut d, Some("outdoor")).unwrap();
    assert_eq!(ranked(&outdoor, T0, &d), want(&[("tent", 6.0), ("stove", 5.0)]));
    assert_eq!(ranked(&popularity(&mut d, Some("books")).unwrap(), T0, &d), want(&[("novel", 5.0)]));

    // A week (one half life) later interest has halved; a new view adds at full weight.
    let week = 7 * 86_400_000;
    send(&mut d, &view("v4", T0 + week, "pan", "kitchen"));
    d.run().unwrap();
    let all = popularity(&mut d, None).unwrap();
    assert_eq!(ranked(&all, T0 + week, &d), want(&[("tent", 3.0), ("novel", 2.5), ("stove", 2.5), ("pan", 1.5)]));

    // Recommendations for a customer who bought the novel, browsing books this session.
    let config = d.topology().personalisation.recommendations.clone();
    let purchased: BTreeSet<String> = ["novel".to_owned()].into();
    let session = ["books".to_owned()];
    let inputs = RecommendationInputs {
        precomputed: None,
        consent: true,
        purchased: &purchased,
        in_cart: &BTreeSet::new(),
        session_categories: &session,
        fallback_categories: &[],
        now: T0 + week,
    };
    let tables: BTreeMap<String, Popularity> = ["books", "outdoor", "kitchen"]
        .into_iter()
        .map(|c| (c.to_owned(), popularity(&mut d, Some(c)).unwrap()))
        .chain([("*".to_owned(), all)])
        .collect();
    let answer = recommend(&config, &inputs, |c| tables.get(c.unwrap_or("*")).cloned());
    let products: Vec<&str> =
        answer["items"].as_array().unwrap().iter().map(|i| i["product_id"].as_str().unwrap()).collect();
    assert_eq!(products, ["tent", "stove", "pan"]);
    assert_eq!(answer["items"][0]["reason"], "popular overall");
}

#[test]
fn clearing_recommendations_of_an_unknown_id_creates_no_profile() {
    let mut d = TestDriver::new(topology(1, 2), 1);
    d.pipe("recommendations", b"cus_nobody", None, 0);
    d.run().unwrap();
    let profiles: Vec<Option<Value>> = d.read("profiles").iter().map(|r| r.json()).collect();
    assert!(profiles.is_empty(), "{profiles:?}");
    assert!(d.store_scan("profile", "profiles", "cus_").is_empty());
}

#[test]
fn purchased_items_stay_bounded_when_profiles_merge() {
    let mut t = topology(1, 3);
    t.profile.purchased_items = 2;
    let mut d = TestDriver::new(t, 9);
    let order = |id: &str, at: i64, ids: Value, products: [&str; 2]| {
        let items: Vec<Value> = products.iter().map(|p| json!({"product_id": p})).collect();
        event(id, "order.completed", at, ids, json!({"total": 10.0, "items": items}))
    };
    send(&mut d, &order("o1", T0, json!({"anonymous_id": "anon-1"}), ["tent", "stove"]));
    send(&mut d, &order("o2", T0 + 1, json!({"customer_id": "c1"}), ["pan", "novel"]));
    d.run().unwrap();
    send(&mut d, &event("l1", "identify", T0 + 2, json!({"anonymous_id": "anon-1", "customer_id": "c1"}), json!({})));
    d.run().unwrap();
    let id = profile_of(&d, "c1")["canonical_id"].as_str().unwrap().to_owned();
    let stored = stored_profile(&mut d, &id);
    assert_eq!(stored.metrics.purchase_count, 2, "the merge happened");
    assert_eq!(stored.purchased.keys().collect::<Vec<_>>(), ["novel", "pan"], "the two most recent");
}

/// Rules see the same active campaigns as the profile: those within campaign_window.
#[test]
fn active_campaigns_in_rules_respect_the_campaign_window() {
    let mut t = topology(1, 2);
    t.segments
        .push(SegmentRule { name: "spring_audience".into(), rule: "\"spring\" in customer.active_campaigns".into() });
    let window = t.profile.campaign_window.ms();
    let mut d = TestDriver::new(t, 2);
    let c = json!({"customer_id": "c1"});
    send(&mut d, &event("e1", "email.opened", T0, c.clone(), json!({"campaign_id": "spring"})));
    d.run().unwrap();
    assert_eq!(profile_of(&d, "c1")["segments"], json!(["spring_audience"]));
    send(&mut d, &event("e2", "page.viewed", T0 + window, c, json!({})));
    d.run().unwrap();
    let p = profile_of(&d, "c1");
    assert_eq!(p["active_campaigns"], json!([]));
    assert_eq!(p["segments"], json!([]), "the window is over: {}", p["segments"]);
    let changes: Vec<String> =
        d.read("segments").iter().map(|r| r.json().unwrap()["change"].as_str().unwrap().to_owned()).collect();
    assert_eq!(changes, ["entered", "exited"]);
}
