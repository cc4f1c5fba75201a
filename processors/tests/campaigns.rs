//! Campaigns and content under `clock: event`: each trigger (event with a condition,
//! segment entry, schedule and its repeats), the audience, run-time changes on the
//! `campaigns` topic (add, pause, delete, refuse), content items from the `content`
//! topic rendered into decisions with the customer's profile, and personalisation
//! consent honoured when rendering.

use chorus_processors::campaigns::config::CampaignConfig;
use chorus_processors::topology::Topology;
use chorus_processors::TestDriver;
mod common;

use common::{event, send, tick, topology, ts, T0};
use serde_json::{json, Value};

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;

fn campaign(value: Value) -> CampaignConfig {
    serde_json::from_value(value).unwrap()
}

fn with_campaigns(partitions: u32, campaigns: Vec<Value>) -> Topology {
    let mut t = topology(1, partitions);
    t.campaigns = campaigns.into_iter().map(campaign).collect();
    assert!(t.validate().is_empty(), "{:?}", t.validate());
    t
}

/// A customer reachable by email and push who agreed to marketing by both.
fn customer(d: &mut TestDriver, id: &str, when: i64, traits: Value) {
    let mut e = event(&format!("id-{id}-{when}"), "identify", when, json!({"customer_id": id}), json!({}));
    e["traits"] = json!({"email": format!("{id}@example.com"), "push_token": format!("tok-{id}"), "first_name": "Ann"});
    for (k, v) in traits.as_object().unwrap() {
        e["traits"][k] = v.clone();
    }
    send(d, &e);
    d.run().unwrap();
    for purpose in ["marketing_email", "marketing_push"] {
        let grant = json!({"customer_id": id, "purpose": purpose, "granted": true, "timestamp": ts(when)});
        d.pipe_json("consent", id, &grant, 0);
    }
    d.run().unwrap();
}

fn time(d: &mut TestDriver, when: i64) {
    tick(d, when);
    d.run().unwrap();
}

fn view(d: &mut TestDriver, id: &str, customer: &str, category: &str, when: i64) {
    send(
        d,
        &event(
            id,
            "product.viewed",
            when,
            json!({"customer_id": customer}),
            json!({"product_id": format!("p-{id}"), "category": category}),
        ),
    );
    d.run().unwrap();
}

fn buy(d: &mut TestDriver, id: &str, customer: &str, total: f64, when: i64) {
    let payload = json!({"order_id": id, "total": total, "category": "outdoor",
        "items": [{"product_id": "tent", "category": "outdoor", "price": total, "quantity": 1}]});
    send(d, &event(id, "order.completed", when, json!({"customer_id": customer}), payload));
    d.run().unwrap();
}

/// Send decisions on `channel`.
fn decisions(d: &TestDriver, channel: &str) -> Vec<Value> {
    d.read(&format!("decisions.{channel}")).iter().filter_map(|r| r.json()).collect()
}

fn all_decisions(d: &TestDriver) -> Vec<Value> {
    ["email", "push", "sms"].iter().flat_map(|c| decisions(d, c)).collect()
}

fn suppressed(d: &TestDriver) -> Vec<Value> {
    d.read("decisions.suppressed").iter().filter_map(|r| r.json()).collect()
}

fn dlq_reasons(d: &TestDriver) -> Vec<String> {
    d.read("events.dlq").iter().filter_map(|r| r.json()).map(|v| v["reason"].as_str().unwrap().to_owned()).collect()
}

fn outdoor_campaign() -> Value {
    json!({"id": "outdoor_picks", "category": "promotional", "content": "cart_reminder", "channels": ["email"],
           "trigger": {"event": "product.viewed", "if": "event.payload.category == \"outdoor\""}})
}

#[test]
fn an_event_with_its_condition_requests_one_message_per_customer() {
    for partitions in [1, 3] {
        let mut d = TestDriver::new(with_campaigns(partitions, vec![outdoor_campaign()]), 11);
        customer(&mut d, "c1", T0, json!({}));
        customer(&mut d, "c2", T0, json!({}));
        view(&mut d, "v1", "c1", "kitchen", T0 + MIN);
        time(&mut d, T0 + 3 * MIN);
        assert!(all_decisions(&d).is_empty(), "the condition does not hold for kitchen");
        view(&mut d, "v2", "c1", "outdoor", T0 + 4 * MIN);
        view(&mut d, "v3", "c2", "outdoor", T0 + 4 * MIN);
        view(&mut d, "v4", "c1", "outdoor", T0 + 5 * MIN);
        time(&mut d, T0 + 7 * MIN);
        let sent = decisions(&d, "email");
        assert_eq!(sent.len(), 2, "{partitions} partitions: {sent:?}");
        for decision in &sent {
            assert_eq!(decision["campaign_id"], "outdoor_picks");
            assert_eq!(decision["content"]["subject"], "Ann, your cart is waiting");
        }
        let repeat: Vec<Value> = suppressed(&d).into_iter().filter(|s| s["reason"] == "duplicate_campaign").collect();
        assert_eq!(repeat.len(), 1, "the second outdoor view of c1 is the same campaign: {repeat:?}");
        assert_eq!(d.counter("campaign_requests", "outdoor_picks/event"), 3);
    }
}

#[test]
fn the_audience_is_a_segment_and_entering_a_segment_triggers() {
    // Service messages are not held back by the purchase that made the customer a VIP.
    let vip = json!({"id": "vip_welcome", "category": "service", "content": "cart_reminder", "channels": ["email"],
                     "trigger": {"segment_entry": "high_value"}});
    let outdoor_vip = json!({"id": "vip_outdoor", "category": "promotional", "content": "cart_reminder",
        "channels": ["push"], "audience": "high_value",
        "trigger": {"event": "product.viewed", "if": "event.payload.category == \"outdoor\""}});
    let mut d = TestDriver::new(with_campaigns(2, vec![vip, outdoor_vip]), 12);
    customer(&mut d, "big", T0, json!({}));
    customer(&mut d, "small", T0, json!({}));
    buy(&mut d, "o1", "big", 12_000.0, T0 + MIN);
    buy(&mut d, "o2", "small", 50.0, T0 + MIN);
    time(&mut d, T0 + 3 * MIN);
    let welcome = decisions(&d, "email");
    assert_eq!(welcome.len(), 1, "{welcome:?}");
    assert_eq!(welcome[0]["customer_id"], "big");
    assert_eq!(welcome[0]["campaign_id"], "vip_welcome");
    // A promotion waits until the purchase suppression (24 h) is over.
    view(&mut d, "v1", "big", "outdoor", T0 + 2 * DAY);
    view(&mut d, "v2", "small", "outdoor", T0 + 2 * DAY);
    time(&mut d, T0 + 2 * DAY + 2 * MIN);
    let push = decisions(&d, "push");
    assert_eq!(push.len(), 1, "only the high-value customer is in the audience: {push:?}");
    assert_eq!(push[0]["customer_id"], "big");
    assert_eq!(d.counter("campaign_requests", "vip_outdoor/event"), 1);
}

#[test]
fn a_schedule_reaches_the_audience_at_its_time_and_repeats() {
    let weekly = json!({"id": "weekly", "category": "promotional", "content": "cart_discount", "channels": ["push"],
        "trigger": {"schedule": ts(T0 + HOUR), "every": "1d"}, "variables": {"discount": "20%"}});
    let mut d = TestDriver::new(with_campaigns(2, vec![weekly]), 13);
    for c in ["c1", "c2", "c3"] {
        customer(&mut d, c, T0, json!({}));
    }
    time(&mut d, T0 + HOUR - 1);
    assert!(all_decisions(&d).is_empty(), "nothing before the scheduled time");
    d.restart();
    time(&mut d, T0 + HOUR);
    time(&mut d, T0 + HOUR + 2 * MIN);
    let first = decisions(&d, "push");
    assert_eq!(first.len(), 3, "every customer, once, after a restart: {first:?}");
    assert_eq!(first[0]["content"]["title"], "Ann, take 20% off your cart");
    let occurrence = format!("weekly@{}", ts(T0 + HOUR));
    assert!(first.iter().all(|p| p["campaign_id"] == occurrence.as_str()), "{first:?}");
    time(&mut d, T0 + DAY + HOUR);
    time(&mut d, T0 + DAY + HOUR + 2 * MIN);
    let both = decisions(&d, "push");
    assert_eq!(both.len(), 6, "the next day's occurrence is a campaign of its own: {both:?}");
    assert_eq!(d.counter("campaign_requests", "weekly/schedule"), 6);
}

#[test]
fn a_scheduled_run_larger_than_a_batch_reaches_everyone_once() {
    let n = chorus_processors::campaigns::BATCH + 20;
    let once = json!({"id": "launch", "category": "service", "content": "cart_reminder", "channels": ["email"],
        "trigger": {"schedule": ts(T0 + HOUR)}});
    let mut d = TestDriver::new(with_campaigns(1, vec![once]), 14);
    for i in 0..n {
        let mut e = event(&format!("id-{i}"), "identify", T0, json!({"customer_id": format!("c{i}")}), json!({}));
        e["traits"] = json!({"email": format!("c{i}@example.com")});
        send(&mut d, &e);
    }
    d.run().unwrap();
    for step in 0..4 {
        time(&mut d, T0 + HOUR + step);
    }
    time(&mut d, T0 + 2 * HOUR);
    let mut to: Vec<String> = decisions(&d, "email").iter().map(|e| e["to"].as_str().unwrap().to_owned()).collect();
    to.sort();
    to.dedup();
    assert_eq!(to.len(), n, "every customer once across batches");
    assert_eq!(decisions(&d, "email").len(), n);
}

#[test]
fn campaigns_change_at_run_time_on_their_topic() {
    let mut d = TestDriver::new(with_campaigns(2, vec![]), 15);
    customer(&mut d, "c1", T0, json!({}));
    customer(&mut d, "c2", T0, json!({}));
    view(&mut d, "v1", "c1", "outdoor", T0 + MIN);
    assert_eq!(d.counter("campaign_requests", "outdoor_picks/event"), 0);

    d.pipe_json("campaigns", "outdoor_picks", &outdoor_campaign(), T0 + 365 * DAY);
    d.run().unwrap();
    view(&mut d, "v2", "c1", "outdoor", T0 + 2 * MIN);
    assert_eq!(d.counter("campaign_requests", "outdoor_picks/event"), 1, "added at run time");

    let mut paused = outdoor_campaign();
    paused["enabled"] = json!(false);
    d.pipe_json("campaigns", "outdoor_picks", &paused, 0);
    d.run().unwrap();
    view(&mut d, "v3", "c2", "outdoor", T0 + 3 * MIN);
    assert_eq!(d.counter("campaign_requests", "outdoor_picks/event"), 1, "paused");

    d.pipe_json("campaigns", "outdoor_picks", &outdoor_campaign(), 0);
    d.run().unwrap();
    view(&mut d, "v4", "c2", "outdoor", T0 + 4 * MIN);
    assert_eq!(d.counter("campaign_requests", "outdoor_picks/event"), 2, "resumed");

    d.pipe("campaigns", b"outdoor_picks", None, 0);
    d.run().unwrap();
    view(&mut d, "v5", "c2", "outdoor", T0 + 5 * MIN);
    assert_eq!(d.counter("campaign_requests", "outdoor_picks/event"), 2, "deleted");

    // Refused whole, with the reason, and nothing broadcast.
    let mut bad = outdoor_campaign();
    bad["category"] = json!("spam");
    d.pipe_json("campaigns", "outdoor_picks", &bad, 0);
    d.pipe_json("campaigns", "other_key", &outdoor_campaign(), 0);
    d.pipe("campaigns", b"broken", Some(b"{not json".to_vec()), 0);
    d.run().unwrap();
    assert_eq!(dlq_reasons(&d), ["invalid_campaign"; 3]);
    view(&mut d, "v6", "c2", "outdoor", T0 + 6 * MIN);
    assert_eq!(d.counter("campaign_requests", "outdoor_picks/event"), 2);
}

#[test]
fn a_topology_campaign_is_overridden_by_the_topic_and_comes_back_on_its_tombstone() {
    let mut d = TestDriver::new(with_campaigns(2, vec![outdoor_campaign()]), 16);
    customer(&mut d, "c1", T0, json!({}));
    let mut kitchen = outdoor_campaign();
    kitchen["trigger"]["if"] = json!("event.payload.category == \"kitchen\"");
    d.pipe_json("campaigns", "outdoor_picks", &kitchen, 0);
    d.run().unwrap();
    view(&mut d, "v1", "c1", "outdoor", T0 + MIN);
    assert_eq!(d.counter("campaign_requests", "outdoor_picks/event"), 0, "the topic's version applies");
    d.restart();
    view(&mut d, "v2", "c1", "kitchen", T0 + 2 * MIN);
    assert_eq!(d.counter("campaign_requests", "outdoor_picks/event"), 1, "and survives a restart");
    d.pipe("campaigns", b"outdoor_picks", None, 0);
    d.run().unwrap();
    view(&mut d, "v3", "c1", "outdoor", T0 + 3 * MIN);
    assert_eq!(d.counter("campaign_requests", "outdoor_picks/event"), 2, "the topology's version is back");
}

#[test]
fn content_from_its_topic_is_rendered_into_decisions_and_can_change() {
    let mut d = TestDriver::new(topology(1, 3), 17);
    customer(&mut d, "c1", T0, json!({"phone": "+61730000000"}));
    d.pipe_json(
        "consent",
        "c1",
        &json!({"customer_id": "c1", "purpose": "marketing_sms", "granted": true, "timestamp": ts(T0)}),
        0,
    );
    let item = |title: &str| {
        json!({"id": "winter_sale", "title": title, "description": {"short": "Up to {{ vars.discount }} off coats."},
               "cta": {"label": "Shop", "url": "https://shop.example/winter"}})
    };
    // Written a year later than the stream's events: catalogue records do not move event time.
    let written = T0 + 365 * DAY;
    d.pipe_json("content", "winter_sale", &item("{{ customer.first_name }}, the winter sale is on"), written);
    d.run().unwrap();
    let request = |d: &mut TestDriver, id: &str, when: i64| {
        let r = json!({"request_id": id, "timestamp": ts(when), "customer_id": "c1", "category": "promotional",
            "campaign_id": id, "content_id": "winter_sale", "channels": ["sms"], "variables": {"discount": "30%"}});
        d.pipe_json("messages.requests", "c1", &r, 0);
        d.run().unwrap();
    };
    request(&mut d, "r1", T0 + MIN);
    time(&mut d, T0 + 3 * MIN);
    let sms = decisions(&d, "sms");
    assert_eq!(sms.len(), 1, "{:?}", suppressed(&d));
    let text = sms[0]["content"]["text"].as_str().unwrap();
    assert!(text.starts_with("Ann, the winter sale is on"), "{text}");
    assert!(text.contains("Up to 30% off coats."), "{text}");
    assert_eq!(sms[0]["content"]["encoding"], "GSM-7");
    assert_eq!(sms[0]["content"]["content_id"], "winter_sale");

    d.pipe_json("content", "winter_sale", &item("Last days of the sale"), 0);
    d.run().unwrap();
    request(&mut d, "r2", T0 + 4 * MIN);
    time(&mut d, T0 + 6 * MIN);
    let text = decisions(&d, "sms")[1]["content"]["text"].as_str().unwrap().to_owned();
    assert!(text.starts_with("Last days of the sale"), "the newer item: {text}");

    // A deleted item cannot be sent; a broken one is refused on the way in.
    d.pipe("content", b"winter_sale", None, 0);
    d.pipe_json("content", "x", &json!({"id": "y", "title": "mismatched key"}), 0);
    d.pipe_json("content", "z", &json!({"id": "z", "title": "{{ unclosed"}), 0);
    d.run().unwrap();
    request(&mut d, "r3", T0 + 7 * MIN);
    time(&mut d, T0 + 9 * MIN);
    let refused = suppressed(&d).into_iter().find(|s| s["request_id"] == "r3").expect("r3 refused");
    assert_eq!(refused["reason"], "unknown_content", "{refused}");
    assert_eq!(dlq_reasons(&d), ["invalid_content"; 2]);
}

#[test]
fn without_personalisation_consent_content_is_not_personalised() {
    let mut d = TestDriver::new(topology(1, 2), 18);
    customer(&mut d, "c1", T0, json!({}));
    let withdraw =
        json!({"customer_id": "c1", "purpose": "personalisation", "granted": false, "timestamp": ts(T0 + 1)});
    d.pipe_json("consent", "c1", &withdraw, 0);
    d.run().unwrap();
    let r = json!({"request_id": "r1", "timestamp": ts(T0 + MIN), "customer_id": "c1", "category": "retention",
        "content_id": "cart_reminder", "channels": ["email"]});
    d.pipe_json("messages.requests", "c1", &r, 0);
    d.run().unwrap();
    time(&mut d, T0 + 3 * MIN);
    let email = decisions(&d, "email");
    assert_eq!(email.len(), 1);
    assert_eq!(email[0]["content"]["subject"], "Hi, your cart is waiting", "no first name without consent");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// For any customers, purchases and views, on any partition count and interleaving:
    /// a scheduled run requests exactly the audience's members, once each; an event
    /// trigger requests once per matching event, never for another.
    #[test]
    fn campaigns_request_exactly_their_audience_and_matching_events(
        spends in proptest::collection::vec(proptest::bool::ANY, 1..12),
        views in proptest::collection::vec((0usize..12, proptest::bool::ANY), 0..30),
        partitions in 1u32..5,
        seed in 0u64..1_000,
    ) {
        let scheduled = json!({"id": "vip_run", "category": "service", "content": "cart_reminder", "channels": ["email"],
            "audience": "high_value", "trigger": {"schedule": ts(T0 + HOUR)}});
        let mut d = TestDriver::new(with_campaigns(partitions, vec![scheduled, outdoor_campaign()]), seed);
        for (i, big) in spends.iter().enumerate() {
            let c = format!("c{i}");
            let mut e = event(&format!("id-{i}"), "identify", T0, json!({"customer_id": c}), json!({}));
            e["traits"] = json!({"email": format!("{c}@example.com")});
            send(&mut d, &e);
            let total = if *big { 12_000.0 } else { 50.0 };
            let payload = json!({"order_id": format!("o{i}"), "total": total, "items": []});
            send(&mut d, &event(&format!("o{i}"), "order.completed", T0 + 1, json!({"customer_id": c}), payload));
        }
        let mut outdoor = 0;
        for (n, (who, is_outdoor)) in views.iter().enumerate() {
            let c = format!("c{}", who % spends.len());
            let category = if *is_outdoor { "outdoor" } else { "kitchen" };
            outdoor += usize::from(*is_outdoor);
            let payload = json!({"product_id": format!("p{n}"), "category": category});
            send(&mut d, &event(&format!("v{n}"), "product.viewed", T0 + 2 + n as i64, json!({"customer_id": c}), payload));
        }
        d.run().unwrap();
        time(&mut d, T0 + HOUR);
        time(&mut d, T0 + HOUR + 1);
        let audience = spends.iter().filter(|big| **big).count() as u64;
        proptest::prop_assert_eq!(d.counter("campaign_requests", "vip_run/schedule"), audience);
        proptest::prop_assert_eq!(d.counter("campaign_requests", "outdoor_picks/event"), outdoor as u64);
        let requested: Vec<String> = d
            .read("events.resolved")
            .iter()
            .filter_map(|r| r.json())
            .filter(|r| r["kind"] == "request" && r["body"]["campaign_id"] == "vip_run")
            .map(|r| r["customer_id"].as_str().unwrap_or_default().to_owned())
            .collect();
        let mut unique = requested.clone();
        unique.sort();
        unique.dedup();
        proptest::prop_assert_eq!(unique.len(), requested.len(), "once each: {:?}", requested);
        for c in &requested {
            let i: usize = c[1..].parse().unwrap();
            proptest::prop_assert!(spends[i], "{} is not high value", c);
        }
    }
}
