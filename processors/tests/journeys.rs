//! The seed's cart-abandonment journey under `clock: event`: trigger → wait 1 h → still
//! abandoned? → email → wait 24 h → still abandoned? → push with a discount; a purchase
//! between steps converts and stops it; an emptied cart exits it; one state per
//! customer; a restart while a wait is pending resumes it.

use chorus_processors::TestDriver;
mod common;

use common::{event, send, tick, topology, ts, T0};
use serde_json::{json, Value};

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;

fn shopper(d: &mut TestDriver, customer: &str) {
    let mut e = event(&format!("id-{customer}"), "identify", T0 - HOUR, json!({"customer_id": customer}), json!({}));
    e["traits"] = json!({"email": format!("{customer}@example.com"), "push_token": format!("tok-{customer}"), "first_name": "Ann"});
    send(d, &e);
    for purpose in ["marketing_email", "marketing_push"] {
        let grant = json!({"customer_id": customer, "purpose": purpose, "granted": true, "timestamp": ts(T0 - HOUR)});
        d.pipe_json("consent", customer, &grant, 0);
    }
    d.run().unwrap();
}

fn add_to_cart(d: &mut TestDriver, id: &str, customer: &str, at: i64) {
    let payload = json!({"product_id": "tent", "category": "outdoor", "price": 300.0, "quantity": 1});
    let mut e = event(id, "cart.item_added", at, json!({"customer_id": customer}), payload);
    e["channel"] = json!("mobile_app");
    send(d, &e);
    d.run().unwrap();
}

fn time(d: &mut TestDriver, at: i64) {
    tick(d, at);
    d.run().unwrap();
}

/// `journeys.events` of a customer: (event, step, reason).
fn progress(d: &TestDriver, customer: &str) -> Vec<(String, String, String)> {
    d.read("journeys.events")
        .iter()
        .map(|r| r.json().unwrap())
        .filter(|v| v["customer_id"] == customer)
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            (s("event"), s("step"), s("reason"))
        })
        .collect()
}

fn decisions(d: &TestDriver, channel: &str) -> Vec<Value> {
    d.read(&format!("decisions.{channel}")).iter().map(|r| r.json().unwrap()).collect()
}

fn row(event: &str, step: &str, reason: &str) -> (String, String, String) {
    (event.into(), step.into(), reason.into())
}

#[test]
fn an_abandoned_cart_gets_an_email_then_a_push_with_a_discount() {
    let mut d = TestDriver::new(topology(1, 2), 1);
    shopper(&mut d, "c1");
    add_to_cart(&mut d, "a1", "c1", T0);
    time(&mut d, T0 + HOUR - 1);
    assert!(decisions(&d, "email").is_empty(), "nothing before the hour");
    time(&mut d, T0 + HOUR);
    time(&mut d, T0 + HOUR + MIN); // the orchestrator's coordination window
    let email = decisions(&d, "email");
    assert_eq!(email.len(), 1);
    assert_eq!(email[0]["journey_id"], "cart_abandonment");
    assert_eq!(email[0]["campaign_id"], "cart_abandonment.email_reminder");
    assert_eq!(email[0]["to"], "c1@example.com");
    // Rendered for email with the customer's profile: subject, HTML and plain text.
    assert_eq!(email[0]["content"]["content_id"], "cart_reminder");
    assert_eq!(email[0]["content"]["subject"], "Ann, your cart is waiting");
    assert!(email[0]["content"]["text"].as_str().is_some_and(|t| t.contains("cart?c=")), "{}", email[0]["content"]);
    time(&mut d, T0 + 25 * HOUR);
    time(&mut d, T0 + 25 * HOUR + MIN);
    let push = decisions(&d, "push");
    assert_eq!(push.len(), 1);
    assert_eq!(push[0]["category"], "promotional");
    assert_eq!(push[0]["content"]["title"], "Ann, take 10% off your cart", "the journey's discount variable");
    assert_eq!(
        progress(&d, "c1"),
        [
            row("entered", "wait_1h", ""),
            row("step", "wait_1h", ""),
            row("step", "still_abandoned", ""),
            row("step", "email_reminder", ""),
            row("step", "wait_24h", ""),
            row("step", "still_abandoned_24h", ""),
            row("step", "push_discount", ""),
            row("exited", "", "completed"),
        ]
    );
    assert_eq!(d.counter("journey_events", "cart_abandonment/entered/wait_1h"), 1);
}

/// A purchase between the email and the push converts the journey: no push follows.
#[test]
fn a_purchase_between_steps_converts_and_stops_the_journey() {
    let mut d = TestDriver::new(topology(1, 2), 2);
    shopper(&mut d, "c1");
    add_to_cart(&mut d, "a1", "c1", T0);
    time(&mut d, T0 + HOUR);
    time(&mut d, T0 + HOUR + MIN);
    assert_eq!(decisions(&d, "email").len(), 1);
    send(&mut d, &event("o1", "order.completed", T0 + 3 * HOUR, json!({"customer_id": "c1"}), json!({"total": 300.0})));
    d.run().unwrap();
    time(&mut d, T0 + 25 * HOUR);
    time(&mut d, T0 + 25 * HOUR + MIN);
    assert!(decisions(&d, "push").is_empty());
    let last = progress(&d, "c1").pop().unwrap();
    assert_eq!(last, row("converted", "wait_24h", ""));
    // The cart was filled on the app and the order placed on the web: cross-channel.
    assert_eq!(d.counter("journey_conversions", "cart_abandonment/cross_channel"), 1);
}

/// A cart emptied within the hour is not abandoned: the check fails and the journey ends.
#[test]
fn an_emptied_cart_exits_at_the_check() {
    let mut d = TestDriver::new(topology(1, 2), 3);
    shopper(&mut d, "c1");
    add_to_cart(&mut d, "a1", "c1", T0);
    let remove = event(
        "r1",
        "cart.item_removed",
        T0 + 10 * MIN,
        json!({"customer_id": "c1"}),
        json!({"product_id": "tent", "quantity": 1}),
    );
    send(&mut d, &remove);
    d.run().unwrap();
    time(&mut d, T0 + HOUR);
    time(&mut d, T0 + HOUR + MIN);
    assert!(decisions(&d, "email").is_empty());
    assert_eq!(progress(&d, "c1").pop().unwrap(), row("exited", "still_abandoned", "still_abandoned did not hold"));
}

/// More items while in the journey do not start a second one; after it ends, the
/// customer may enter again only after `reentry_after` (7 days).
#[test]
fn one_journey_state_per_customer() {
    let mut d = TestDriver::new(topology(1, 2), 4);
    shopper(&mut d, "c1");
    add_to_cart(&mut d, "a1", "c1", T0);
    add_to_cart(&mut d, "a2", "c1", T0 + 5 * MIN);
    let entered = |d: &TestDriver| progress(d, "c1").iter().filter(|(e, _, _)| e == "entered").count();
    assert_eq!(entered(&d), 1);
    send(&mut d, &event("o1", "order.completed", T0 + 10 * MIN, json!({"customer_id": "c1"}), json!({"total": 1.0})));
    d.run().unwrap();
    add_to_cart(&mut d, "a3", "c1", T0 + 2 * HOUR);
    assert_eq!(entered(&d), 1, "within a week of the last entry");
    add_to_cart(&mut d, "a4", "c1", T0 + 7 * 24 * HOUR);
    assert_eq!(entered(&d), 2);
}

/// A restart while the one-hour wait is pending: the timer is in the store and the
/// journey goes on.
#[test]
fn a_restart_while_a_journey_timer_is_pending_resumes_it() {
    let mut d = TestDriver::new(topology(1, 2), 5);
    shopper(&mut d, "c1");
    add_to_cart(&mut d, "a1", "c1", T0);
    d.restart();
    time(&mut d, T0 + HOUR);
    time(&mut d, T0 + HOUR + MIN);
    assert_eq!(decisions(&d, "email").len(), 1);
}

/// The journey's email still goes through the orchestrator: without consent it is
/// suppressed, and the journey carries on to its next step.
#[test]
fn journey_sends_obey_consent() {
    let mut d = TestDriver::new(topology(1, 2), 6);
    shopper(&mut d, "c1");
    let withdraw =
        json!({"customer_id": "c1", "purpose": "marketing_email", "granted": false, "timestamp": ts(T0 - 1)});
    d.pipe_json("consent", "c1", &withdraw, 0);
    d.run().unwrap();
    add_to_cart(&mut d, "a1", "c1", T0);
    time(&mut d, T0 + HOUR);
    let suppressed: Vec<Value> = d.read("decisions.suppressed").iter().map(|r| r.json().unwrap()).collect();
    assert_eq!(suppressed.len(), 1);
    assert_eq!(
        (suppressed[0]["reason"].as_str(), suppressed[0]["journey_id"].as_str()),
        (Some("opted_out"), Some("cart_abandonment"))
    );
}
