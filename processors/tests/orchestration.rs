//! The orchestrator's rules as scenarios under `clock: event`, each at its edges:
//! consent, suppressions, one message per campaign, quiet hours in the recipient's own
//! zone (across midnight, UTC+10, UTC−5, DST days), frequency caps at exactly their
//! limit and at the rolling window's boundary, priorities competing for the last slot,
//! channel selection, waiting requests surviving a restart; and a property test over
//! random request streams: no cap exceeded, no consent or quiet-hours violation, every
//! request decided exactly once.

use chorus_processors::TestDriver;
mod common;

use common::{event, send, tick, topology, ts, T0};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;
/// The default coordination window.
const WINDOW: i64 = MIN;
const CHANNELS: [&str; 6] = ["email", "push", "sms", "chat", "web", "in_app"];

fn at(text: &str) -> i64 {
    text.parse::<jiff::Timestamp>().unwrap().as_millisecond()
}

fn driver(seed: u64) -> TestDriver {
    TestDriver::new(topology(1, 2), seed)
}

/// An identify event for `customer` with these traits (email, phone, push_token,
/// timezone, preferred_channel).
fn known(d: &mut TestDriver, customer: &str, when: i64, traits: Value) {
    let mut e = event(&format!("id-{customer}-{when}"), "identify", when, json!({"customer_id": customer}), json!({}));
    e["traits"] = traits;
    send(d, &e);
    d.run().unwrap();
}

/// `customer` reachable on email, SMS and push, in `timezone` (UTC when `None`).
fn reachable(d: &mut TestDriver, customer: &str, when: i64, timezone: Option<&str>) {
    let mut traits = json!({"email": format!("{customer}@example.com"), "phone": "+61730000000",
                            "push_token": format!("tok-{customer}")});
    if let Some(tz) = timezone {
        traits["timezone"] = json!(tz);
    }
    known(d, customer, when, traits);
}

fn consent(d: &mut TestDriver, customer: &str, purpose: &str, granted: bool, when: i64) {
    let change = json!({"customer_id": customer, "purpose": purpose, "granted": granted, "timestamp": ts(when),
                        "source": "preference_centre"});
    d.pipe_json("consent", customer, &change, 0);
    d.run().unwrap();
}

fn grant_marketing(d: &mut TestDriver, customer: &str, when: i64) {
    for purpose in ["marketing_email", "marketing_push", "marketing_sms"] {
        consent(d, customer, purpose, true, when);
    }
}

fn request(d: &mut TestDriver, id: &str, customer: &str, category: &str, campaign: &str, channels: &[&str], when: i64) {
    let r = json!({"request_id": id, "timestamp": ts(when), "customer_id": customer, "campaign_id": campaign,
                   "category": category, "content_id": "cart_reminder", "channels": channels});
    d.pipe_json("messages.requests", customer, &r, 0);
    d.run().unwrap();
}

/// Move event time to `when` everywhere and let due timers fire.
fn time(d: &mut TestDriver, when: i64) {
    tick(d, when);
    d.run().unwrap();
}

/// Every send decision: request id → (channel, send_at ms, record).
fn sent(d: &TestDriver) -> BTreeMap<String, (String, i64, Value)> {
    let mut out = BTreeMap::new();
    for channel in CHANNELS {
        for r in d.read(&format!("decisions.{channel}")) {
            let v = r.json().unwrap();
            let id = v["request_id"].as_str().unwrap().to_owned();
            let when = at(v["send_at"].as_str().unwrap());
            assert!(out.insert(id.clone(), (channel.to_owned(), when, v)).is_none(), "{id} sent twice");
        }
    }
    out
}

fn sent_on(d: &TestDriver) -> BTreeMap<String, String> {
    sent(d).into_iter().map(|(id, (channel, _, _))| (id, channel)).collect()
}

/// Refusals: request id → reason.
fn suppressed(d: &TestDriver) -> BTreeMap<String, String> {
    d.read("decisions.suppressed")
        .iter()
        .map(|r| r.json().unwrap())
        .map(|v| (v["request_id"].as_str().unwrap().to_owned(), v["reason"].as_str().unwrap().to_owned()))
        .collect()
}

fn suppression(d: &TestDriver, id: &str) -> Value {
    d.read("decisions.suppressed").iter().map(|r| r.json().unwrap()).find(|v| v["request_id"] == id).unwrap()
}

/// Deferrals of one request: (reason, deferred_until ms).
fn deferrals(d: &TestDriver, id: &str) -> Vec<(String, i64)> {
    d.read("decisions.deferred")
        .iter()
        .map(|r| r.json().unwrap())
        .filter(|v| v["request_id"] == id)
        .map(|v| (v["reason"].as_str().unwrap().to_owned(), at(v["deferred_until"].as_str().unwrap())))
        .collect()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[test]
fn marketing_needs_consent_and_transactional_does_not() {
    let mut d = TestDriver::new(topology(2, 3), 3);
    known(&mut d, "c1", T0 - 1, json!({"email": "c1@example.com", "phone": "+61730000000"}));
    request(&mut d, "r1", "c1", "promotional", "spring", &["email", "sms"], T0);
    request(&mut d, "r2", "c1", "transactional", "receipt", &["email", "sms"], T0 + 1);
    consent(&mut d, "c1", "marketing_sms", true, T0 + 2);
    request(&mut d, "r3", "c1", "promotional", "spring", &["email", "sms"], T0 + 3);
    request(&mut d, "r3", "c1", "promotional", "spring", &["email", "sms"], T0 + 3);
    time(&mut d, T0 + 3 + WINDOW);

    assert_eq!(suppressed(&d), map(&[("r1", "no_consent")]));
    assert_eq!(sent_on(&d), map(&[("r2", "email"), ("r3", "sms")]), "r3 decided once, on the consented channel");
    let (_, when, receipt) = &sent(&d)["r2"];
    assert_eq!(*when, T0 + 1, "transactional goes out at once");
    assert_eq!(receipt["customer_id"], "c1");
    assert_eq!(sent(&d)["r3"].1, T0 + 3 + WINDOW, "marketing waits for its coordination window");
    assert_eq!(deferrals(&d, "r3"), [("coordination_window".to_owned(), T0 + 3 + WINDOW)]);
}

#[test]
fn consent_withdrawn_suppresses_again() {
    let mut d = driver(3);
    reachable(&mut d, "c1", T0 - 1, None);
    consent(&mut d, "c1", "marketing_email", true, T0);
    consent(&mut d, "c1", "marketing_email", false, T0 + 10);
    request(&mut d, "r", "c1", "promotional", "spring", &["email"], T0 + 20);
    assert_eq!(suppressed(&d), map(&[("r", "opted_out")]), "withdrawn, not merely never given");
}

/// The seed's suppressions, at their exact boundaries: a purchase stops promotions for
/// 24 h, a complaint for 48 h, an open support case until it closes; transactional
/// messages are never suppressed.
#[test]
fn suppressions_follow_what_the_customer_just_did() {
    let mut d = driver(5);
    reachable(&mut d, "c1", T0 - 2, None);
    consent(&mut d, "c1", "marketing_email", true, T0 - 1);
    // Suppressions apply when a request arrives (and again when its window closes); a
    // refused request needs no time to pass, one that waits is decided a window later.
    let ask = |d: &mut TestDriver, id: &str, category: &str, when: i64| {
        request(d, id, "c1", category, id, &["email"], when);
        if !suppressed(d).contains_key(id) {
            time(d, when + WINDOW);
        }
    };
    send(&mut d, &event("o1", "order.completed", T0, json!({"customer_id": "c1"}), json!({"total": 10.0})));
    d.run().unwrap();
    ask(&mut d, "promo-in-window", "promotional", T0 + 24 * HOUR - 1);
    request(&mut d, "receipt", "c1", "transactional", "receipt", &["email"], T0 + 24 * HOUR - 1);
    ask(&mut d, "promo-after-window", "promotional", T0 + 24 * HOUR);
    send(
        &mut d,
        &event("k1", "complaint.filed", T0 + 30 * HOUR, json!({"customer_id": "c1"}), json!({"case_id": "x"})),
    );
    d.run().unwrap();
    ask(&mut d, "retention-after-complaint", "retention", T0 + 78 * HOUR - 1);
    ask(&mut d, "retention-after-complaint-window", "retention", T0 + 78 * HOUR);
    let day5 = T0 + 100 * HOUR;
    send(&mut d, &event("s1", "support.case_opened", day5, json!({"customer_id": "c1"}), json!({"case_id": "k9"})));
    d.run().unwrap();
    ask(&mut d, "promo-during-case", "promotional", day5 + 10 * HOUR);
    let closed =
        event("s2", "support.case_closed", day5 + 20 * HOUR, json!({"customer_id": "c1"}), json!({"case_id": "k9"}));
    send(&mut d, &closed);
    d.run().unwrap();
    ask(&mut d, "promo-after-case", "promotional", day5 + 21 * HOUR);

    assert_eq!(
        suppressed(&d),
        map(&[
            ("promo-in-window", "recent_purchase"),
            ("retention-after-complaint", "recent_complaint"),
            ("promo-during-case", "active_support_case"),
        ])
    );
    let ids: Vec<String> = sent(&d).into_keys().collect();
    let mut want = ["receipt", "promo-after-window", "retention-after-complaint-window", "promo-after-case"];
    want.sort();
    assert_eq!(ids, want);
}

/// 22:30 in Brisbane (UTC+10, no DST) is quiet: a promotion waits until 08:00 local
/// (22:00Z), then its coordination window; the receipt goes at once.
#[test]
fn quiet_hours_cross_midnight_in_utc_plus_10() {
    let mut d = driver(1);
    let evening = at("2026-03-10T12:30:00Z");
    reachable(&mut d, "c1", evening - HOUR, Some("Australia/Brisbane"));
    grant_marketing(&mut d, "c1", evening - HOUR);
    request(&mut d, "promo", "c1", "promotional", "spring", &["email"], evening);
    request(&mut d, "receipt", "c1", "transactional", "order-1", &["email"], evening);
    assert_eq!(sent(&d)["receipt"].1, evening, "transactional is exempt");
    let end = at("2026-03-10T22:00:00Z");
    assert_eq!(deferrals(&d, "promo"), [("quiet_hours".to_owned(), end)]);

    time(&mut d, at("2026-03-10T16:00:00Z")); // 02:00 local, across midnight
    time(&mut d, end - 1);
    assert!(!sent(&d).contains_key("promo"), "still 07:59:59.999 in Brisbane");
    time(&mut d, end);
    assert_eq!(deferrals(&d, "promo")[1], ("coordination_window".to_owned(), end + WINDOW));
    time(&mut d, end + WINDOW);
    assert_eq!(sent(&d)["promo"].1, end + WINDOW);
    assert_eq!(d.counter("deferrals", "quiet_hours"), 1);
}

/// UTC−5 (Bogotá): 21:00 local is not quiet, 22:30 local is, until 08:00 local = 13:00Z.
#[test]
fn quiet_hours_in_utc_minus_5() {
    let mut d = driver(2);
    let t = at("2026-03-11T02:00:00Z"); // 21:00 on the 10th in Bogotá
    reachable(&mut d, "c1", t - HOUR, Some("America/Bogota"));
    grant_marketing(&mut d, "c1", t - HOUR);
    request(&mut d, "evening", "c1", "promotional", "a", &["email"], t);
    time(&mut d, t + WINDOW);
    assert_eq!(sent(&d)["evening"].1, t + WINDOW);
    request(&mut d, "late", "c1", "promotional", "b", &["email"], at("2026-03-11T03:30:00Z"));
    assert_eq!(deferrals(&d, "late"), [("quiet_hours".to_owned(), at("2026-03-11T13:00:00Z"))]);
    // Without a time zone of their own the recipient is held by UTC: 03:30Z is quiet.
    reachable(&mut d, "c2", t - HOUR, None);
    grant_marketing(&mut d, "c2", t - HOUR);
    request(&mut d, "utc", "c2", "promotional", "b", &["email"], at("2026-03-11T03:30:00Z"));
    assert_eq!(deferrals(&d, "utc"), [("quiet_hours".to_owned(), at("2026-03-11T08:00:00Z"))]);
}

/// On the days clocks change in New York the hold still ends at 08:00 local: 9 hours
/// after 22:30 on the spring-forward night, 11 on the fall-back night.
#[test]
fn quiet_hours_on_dst_change_days() {
    let mut d = driver(4);
    let start = at("2026-03-07T12:00:00Z");
    reachable(&mut d, "c1", start, Some("America/New_York"));
    grant_marketing(&mut d, "c1", start);
    request(&mut d, "spring", "c1", "promotional", "a", &["email"], at("2026-03-08T03:30:00Z"));
    assert_eq!(deferrals(&d, "spring"), [("quiet_hours".to_owned(), at("2026-03-08T12:00:00Z"))]);
    time(&mut d, at("2026-03-08T12:00:00Z"));
    time(&mut d, at("2026-03-08T12:00:00Z") + WINDOW);
    assert_eq!(sent(&d)["spring"].1, at("2026-03-08T12:01:00Z"), "08:01 EDT");
    request(&mut d, "fall", "c1", "promotional", "b", &["email"], at("2026-11-01T02:30:00Z"));
    assert_eq!(deferrals(&d, "fall"), [("quiet_hours".to_owned(), at("2026-11-01T13:00:00Z"))]);
}

/// Email 2/day, push 2/day, 3/day over all channels: at exactly the limit the next
/// request moves to another channel, then is refused; transactional is not capped.
#[test]
fn caps_at_exactly_the_limit() {
    let mut d = driver(6);
    reachable(&mut d, "c1", T0 - HOUR, None);
    grant_marketing(&mut d, "c1", T0 - HOUR);
    let ask = |d: &mut TestDriver, id: &str, category: &str, channels: &[&str], when: i64| {
        request(d, id, "c1", category, id, channels, when);
        time(d, when + WINDOW);
    };
    ask(&mut d, "r1", "promotional", &["email"], T0);
    ask(&mut d, "r2", "promotional", &["email"], T0 + 10 * MIN);
    ask(&mut d, "r3", "promotional", &["email"], T0 + 20 * MIN);
    ask(&mut d, "r4", "promotional", &["email", "push"], T0 + 30 * MIN);
    ask(&mut d, "r5", "retention", &["push", "sms"], T0 + 40 * MIN);
    ask(&mut d, "receipt", "transactional", &["email"], T0 + 50 * MIN);
    assert_eq!(sent_on(&d), map(&[("r1", "email"), ("r2", "email"), ("r4", "push"), ("receipt", "email")]));
    assert_eq!(suppressed(&d), map(&[("r3", "channel_cap"), ("r5", "global_cap_day")]));
    assert!(suppression(&d, "r3")["detail"].as_str().unwrap().contains("email: 2 of 2 per day"));
    let reasons = sent(&d)["r4"].2["reasons"].to_string();
    assert!(reasons.contains("skipped email: 2 of 2 per day"), "{reasons}");
}

/// Caps are rolling: a send stops counting exactly 24 h (email) or 7 days (SMS) later.
/// Two customers with the same history are asked 1 ms apart around each boundary.
#[test]
fn caps_roll_at_the_window_boundary() {
    let mut d = driver(8);
    for c in ["c1", "c2"] {
        reachable(&mut d, c, T0 - HOUR, None);
        grant_marketing(&mut d, c, T0 - HOUR);
    }
    // Two sends on the channel, then a request decided 1 ms before the first send
    // leaves the window (c1) and one decided exactly when it does (c2).
    for (channel, first, second, period) in
        [("email", T0 + 10 * MIN, T0 + 20 * MIN, DAY), ("sms", T0 + 2 * DAY, T0 + 3 * DAY, 7 * DAY)]
    {
        for (i, when) in [(1, first), (2, second)] {
            for c in ["c1", "c2"] {
                let id = format!("{c}-{channel}-{i}");
                request(&mut d, &id, c, "promotional", &id, &[channel], when);
            }
            time(&mut d, when + WINDOW);
        }
        let boundary = first + WINDOW + period;
        let (early, on_time) = (format!("{channel}-early"), format!("{channel}-on-time"));
        request(&mut d, &early, "c1", "promotional", &early, &[channel], boundary - 1 - WINDOW);
        request(&mut d, &on_time, "c2", "promotional", &on_time, &[channel], boundary - WINDOW);
        time(&mut d, boundary - 1);
        time(&mut d, boundary);
        assert_eq!(sent(&d)[&on_time].1, boundary, "{on_time}");
    }
    assert_eq!(sent(&d).len(), 2 * 2 * 2 + 2, "every send of the history and both on-time requests");
    assert_eq!(suppressed(&d), map(&[("email-early", "channel_cap"), ("sms-early", "channel_cap")]));
}

/// Two campaigns in one coordination window compete for the customer's last slot of
/// the day: the retention message wins although the promotion arrived first.
#[test]
fn two_campaigns_compete_for_the_last_slot() {
    let mut d = driver(9);
    reachable(&mut d, "c1", T0 - HOUR, None);
    grant_marketing(&mut d, "c1", T0 - HOUR);
    for (i, channel) in [(1, "email"), (2, "push")] {
        request(&mut d, &format!("early-{i}"), "c1", "promotional", &format!("early-{i}"), &[channel], T0 + i * MIN);
        time(&mut d, T0 + i * MIN + WINDOW);
    }
    let t = T0 + HOUR;
    request(&mut d, "sale", "c1", "promotional", "sale", &["email", "sms"], t);
    request(&mut d, "winback", "c1", "retention", "winback", &["sms", "email"], t + 10_000);
    assert_eq!(deferrals(&d, "winback"), [("coordination_window".to_owned(), t + WINDOW)], "joins the open window");
    time(&mut d, t + WINDOW);
    assert_eq!(sent_on(&d).get("winback").map(String::as_str), Some("sms"));
    assert_eq!(suppressed(&d), map(&[("sale", "lower_priority")]));
    assert_eq!(d.counter("suppressions", "lower_priority"), 1);
}

/// A customer gets one message per campaign whatever the channel: the push service's
/// request for a campaign already waiting on email is refused, and so is the campaign
/// the next day.
#[test]
fn one_message_per_campaign_across_channels() {
    let mut d = driver(10);
    reachable(&mut d, "c1", T0 - HOUR, None);
    grant_marketing(&mut d, "c1", T0 - HOUR);
    request(&mut d, "from-email", "c1", "promotional", "spring", &["email"], T0);
    request(&mut d, "from-push", "c1", "promotional", "spring", &["push"], T0 + 1);
    time(&mut d, T0 + WINDOW);
    request(&mut d, "next-day", "c1", "promotional", "spring", &["sms"], T0 + DAY);
    time(&mut d, T0 + DAY + WINDOW);
    assert_eq!(sent_on(&d), map(&[("from-email", "email")]));
    assert_eq!(suppressed(&d), map(&[("from-push", "duplicate_campaign"), ("next-day", "duplicate_campaign")]));
}

/// Channel choice: the stated preference first, then the requested order; a channel
/// without an address is skipped, and with none at all the request is unreachable.
#[test]
fn channel_follows_preference_consent_and_reachability() {
    let mut d = driver(11);
    known(&mut d, "c1", T0 - HOUR, json!({"email": "c1@example.com", "push_token": "t1", "preferred_channel": "push"}));
    known(&mut d, "c2", T0 - HOUR, json!({"email": "c2@example.com"}));
    known(&mut d, "c3", T0 - HOUR, json!({"name": "No Address"}));
    for c in ["c1", "c2", "c3"] {
        grant_marketing(&mut d, c, T0 - HOUR);
    }
    request(&mut d, "pref", "c1", "promotional", "a", &["email", "push"], T0);
    request(&mut d, "no-phone", "c2", "promotional", "a", &["sms", "email"], T0);
    request(&mut d, "nowhere", "c3", "promotional", "a", &["email", "sms"], T0);
    time(&mut d, T0 + WINDOW);
    assert_eq!(sent_on(&d), map(&[("pref", "push"), ("no-phone", "email")]));
    assert_eq!(suppressed(&d), map(&[("nowhere", "unreachable")]));
    let reasons = sent(&d)["pref"].2["reasons"].to_string();
    assert!(reasons.contains("preferred channel: push"), "{reasons}");
    assert_eq!(sent(&d)["pref"].2["to"], "t1", "the push token the channel service sends to");
    assert_eq!(sent(&d)["no-phone"].2["to"], "c2@example.com");
    let reasons = sent(&d)["no-phone"].2["reasons"].to_string();
    assert!(reasons.contains("skipped sms: no phone on file"), "{reasons}");
}

/// Consent withdrawn while a message waits for quiet hours to end: it is not sent.
#[test]
fn consent_withdrawn_while_a_deferred_message_waits() {
    let mut d = driver(12);
    let night = at("2026-05-01T23:00:00Z");
    reachable(&mut d, "c1", night - HOUR, None);
    grant_marketing(&mut d, "c1", night - HOUR);
    request(&mut d, "promo", "c1", "promotional", "a", &["email"], night);
    assert_eq!(deferrals(&d, "promo"), [("quiet_hours".to_owned(), at("2026-05-02T08:00:00Z"))]);
    consent(&mut d, "c1", "marketing_email", false, at("2026-05-02T03:00:00Z"));
    time(&mut d, at("2026-05-02T08:00:00Z"));
    assert_eq!(suppressed(&d), map(&[("promo", "opted_out")]));
    assert!(sent(&d).is_empty());
}

/// A message waiting for quiet hours survives a restart: its timer is in the store.
#[test]
fn a_deferred_message_survives_a_restart() {
    let mut d = driver(13);
    let night = at("2026-05-01T23:00:00Z");
    reachable(&mut d, "c1", night - HOUR, None);
    grant_marketing(&mut d, "c1", night - HOUR);
    request(&mut d, "promo", "c1", "promotional", "a", &["email"], night);
    d.restart();
    time(&mut d, at("2026-05-02T08:00:00Z"));
    time(&mut d, at("2026-05-02T08:01:00Z"));
    assert_eq!(sent(&d)["promo"].1, at("2026-05-02T08:01:00Z"));
}

/// A customer merged while a message waits: the waiting request moves to the survivor
/// and is decided there, once.
#[test]
fn a_waiting_request_follows_an_identity_merge() {
    let mut d = driver(14);
    let night = at("2026-05-01T23:00:00Z");
    // c1 is known; an anonymous visitor gives an email and consent, then logs in as c1.
    send(&mut d, &event("c", "page.viewed", night - 2 * HOUR, json!({"customer_id": "c1"}), json!({"url": "/"})));
    let visitor = json!({"anonymous_id": "anon-1"});
    let mut e = event("v1", "identify", night - HOUR, visitor.clone(), json!({}));
    e["traits"] = json!({"email": "v@example.com"});
    send(&mut d, &e);
    d.run().unwrap();
    let grant = json!({"identifiers": {"anonymous_id": "anon-1"}, "purpose": "marketing_email", "granted": true,
                       "timestamp": ts(night - HOUR)});
    d.pipe_json("consent", "anon-1", &grant, 0);
    d.run().unwrap();
    let r = json!({"request_id": "promo", "timestamp": ts(night), "identifiers": {"anonymous_id": "anon-1"},
                   "campaign_id": "a", "category": "promotional", "channels": ["email"]});
    d.pipe_json("messages.requests", "anon-1", &r, 0);
    d.run().unwrap();
    assert_eq!(deferrals(&d, "promo").len(), 1);
    let login =
        event("l1", "identify", night + HOUR, json!({"customer_id": "c1", "anonymous_id": "anon-1"}), json!({}));
    send(&mut d, &login);
    d.run().unwrap();
    assert_eq!(d.read("identity.merges").len(), 1);
    time(&mut d, at("2026-05-02T08:00:00Z"));
    time(&mut d, at("2026-05-02T08:01:00Z"));
    let sent = sent(&d);
    assert_eq!(sent.len(), 1);
    let survivor = d.read("identity.merges")[0].json().unwrap()["into"].clone();
    assert_eq!(sent["promo"].2["canonical_id"], survivor);
}

/// One request of the random stream.
#[derive(Debug, Clone)]
enum Input {
    Request { customer: usize, category: usize, campaign: usize, channels: Vec<usize> },
    Consent { customer: usize, purpose: usize, granted: bool },
    Purchase { customer: usize },
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        8 => (0..3usize, 0..4usize, 0..30usize, proptest::collection::vec(0..3usize, 1..3))
            .prop_map(|(customer, category, campaign, channels)| Input::Request { customer, category, campaign, channels }),
        2 => (0..3usize, 0..3usize, any::<bool>()).prop_map(|(customer, purpose, granted)| Input::Consent { customer, purpose, granted }),
        1 => (0..3usize).prop_map(|customer| Input::Purchase { customer }),
    ]
}

const ZONES: [Option<&str>; 3] = [None, Some("Australia/Brisbane"), Some("America/New_York")];
const CATEGORIES: [&str; 4] = ["transactional", "service", "retention", "promotional"];
const PURPOSES: [&str; 3] = ["marketing_email", "marketing_push", "marketing_sms"];
const REQUESTED: [&str; 3] = ["email", "push", "sms"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// For any stream of requests, consent changes and purchases over several days and
    /// nights, in three time zones: no customer exceeds any cap in any rolling window,
    /// no marketing message goes out without consent at its send time, none is sent in
    /// the recipient's quiet hours, and every request is decided exactly once.
    #[test]
    fn no_decision_breaks_a_cap_consent_or_quiet_hours(
        inputs in proptest::collection::vec((input(), 1..180i64), 1..80),
        seed in any::<u64>(),
        raw_partitions in 1..3u32,
        partitions in 1..5u32,
    ) {
        let mut d = TestDriver::new(topology(raw_partitions, partitions), seed);
        let start = at("2026-03-06T12:00:00Z"); // spans the New York spring-forward night
        let customer = |i: usize| format!("c{i}");
        // Consent changes per customer and purpose: (time, granted), in time order.
        let mut consents: BTreeMap<(String, String), Vec<(i64, bool)>> = BTreeMap::new();
        for (i, zone) in ZONES.iter().enumerate() {
            reachable(&mut d, &customer(i), start - HOUR, *zone);
            grant_marketing(&mut d, &customer(i), start - HOUR);
            for purpose in PURPOSES {
                consents.entry((customer(i), purpose.to_owned())).or_default().push((start - HOUR, true));
            }
        }
        let mut now = start;
        let mut requests: BTreeMap<String, (String, String)> = BTreeMap::new();
        for (n, (input, gap_minutes)) in inputs.iter().enumerate() {
            now += gap_minutes * MIN; // a few days and nights in all
            match input {
                Input::Request { customer: c, category, campaign, channels } => {
                    let id = format!("r{n}");
                    let channels: Vec<&str> = channels.iter().map(|i| REQUESTED[*i]).collect();
                    request(&mut d, &id, &customer(*c), CATEGORIES[*category], &format!("camp{campaign}"), &channels, now);
                    requests.insert(id, (customer(*c), CATEGORIES[*category].to_owned()));
                }
                Input::Consent { customer: c, purpose, granted } => {
                    consent(&mut d, &customer(*c), PURPOSES[*purpose], *granted, now);
                    consents.entry((customer(*c), PURPOSES[*purpose].to_owned())).or_default().push((now, *granted));
                }
                Input::Purchase { customer: c } => {
                    send(&mut d, &event(&format!("o{n}"), "order.completed", now, json!({"customer_id": customer(*c)}), json!({"total": 5.0})));
                    d.run().unwrap();
                }
            }
        }
        // Let everything waiting be decided: through a whole night in every zone.
        for hour in 1..=36 {
            time(&mut d, now + hour * HOUR);
        }

        let sent = sent(&d);
        let refused = suppressed(&d);
        for id in requests.keys() {
            prop_assert!(sent.contains_key(id) ^ refused.contains_key(id), "{} decided {} times", id,
                u8::from(sent.contains_key(id)) + u8::from(refused.contains_key(id)));
        }
        let topology = d.topology().clone();
        let config = &topology.orchestration;
        let quiet = config.quiet_hours.clone().unwrap();
        for (id, (channel, when, _)) in &sent {
            let (c, category) = &requests[id];
            let settings = &config.categories[category];
            let i: usize = c[1..].parse().unwrap();
            if settings.needs_marketing_consent {
                let purpose = config.purpose_of(channel).to_owned();
                let granted = consents.get(&(c.clone(), purpose)).and_then(|changes| {
                    changes.iter().rev().find(|(t, _)| t <= when).map(|(_, g)| *g)
                });
                prop_assert_eq!(granted, Some(true), "{} sent on {} without consent", id, channel);
            }
            if settings.quiet_hours {
                let zone = chorus_processors::orchestrator::quiet_hours::zone_of(ZONES[i], &quiet);
                prop_assert!(chorus_processors::orchestrator::quiet_hours::quiet_until(*when, &zone, &quiet).is_none(),
                    "{} sent in quiet hours at {}", id, ts(*when));
            }
            if settings.capped {
                // Every rolling window ending at a capped send holds at most the cap.
                let capped: Vec<(&String, i64)> = sent.iter()
                    .filter(|(other, _)| requests[*other].0 == *c && config.categories[&requests[*other].1].capped)
                    .map(|(_, (ch, t, _))| (ch, *t))
                    .collect();
                let within = |window: i64, on: Option<&str>| capped.iter()
                    .filter(|(ch, t)| *t > when - window && t <= when && on.is_none_or(|o| o == ch.as_str()))
                    .count() as u32;
                let global = &config.frequency_caps.global;
                prop_assert!(within(DAY, None) <= global.max_per_day.unwrap(), "{}: day cap", id);
                prop_assert!(within(7 * DAY, None) <= global.max_per_week.unwrap(), "{}: week cap", id);
                if let Some(limits) = config.frequency_caps.channels.get(channel) {
                    if let Some(max) = limits.max_per_day {
                        prop_assert!(within(DAY, Some(channel)) <= max, "{}: {} day cap", id, channel);
                    }
                    if let Some(max) = limits.max_per_week {
                        prop_assert!(within(7 * DAY, Some(channel)) <= max, "{}: {} week cap", id, channel);
                    }
                }
            }
        }
    }
}
