//! Context TTLs under `clock: event`, in the TestDriver: each part (session, cart,
//! offers, recent interactions) is there one millisecond before its expiry and gone at
//! it; the expiry timer publishes the updated `context` record, and a tombstone once
//! nothing is left. `system.tick` events move event time.

mod common;

use chorus_processors::context::CustomerContext;
use chorus_processors::topology::{Duration, Topology};
use chorus_processors::TestDriver;
use common::{event, send, tick, topology, ts, T0};
use proptest::prelude::*;
use serde_json::{json, Value};

const MINUTE: i64 = 60_000;
const SESSION_TIMEOUT: i64 = 30 * MINUTE;
const OFFER_TTL: i64 = 60 * MINUTE;
const CART_TTL: i64 = 120 * MINUTE;
const INTERACTION_TTL: i64 = 180 * MINUTE;

/// Every part with its own TTL, so each expiry is seen on its own.
fn context_topology(partitions: u32) -> Topology {
    let mut t = topology(1, partitions);
    t.context.session_timeout = Duration(SESSION_TIMEOUT);
    t.context.offer_ttl = Duration(OFFER_TTL);
    t.context.cart_ttl = Duration(CART_TTL);
    t.context.recent_interactions.ttl = Duration(INTERACTION_TTL);
    assert_eq!(t.validate(), Vec::new());
    t
}

fn customer() -> Value {
    json!({"customer_id": "c1"})
}

/// The customer's live context record (None after a tombstone).
fn context(d: &TestDriver) -> Option<Value> {
    let table = d.table("context");
    assert!(table.len() <= 1, "{table:?}");
    table.into_values().next()
}

/// Tick to `at` and return how many `context` records that wrote, and the record now.
fn tick_to(d: &mut TestDriver, at: i64) -> (usize, Option<Value>) {
    let before = d.read("context").len();
    tick(d, at);
    d.run().unwrap();
    (d.read("context").len() - before, context(d))
}

fn offer_ids(ctx: &Value) -> Vec<&str> {
    ctx["engagements"]["offers"].as_array().unwrap().iter().map(|o| o["offer_id"].as_str().unwrap()).collect()
}

fn interaction_times(ctx: &Value) -> Vec<i64> {
    ctx["recent_interactions"].as_array().unwrap().iter().map(|i| i["at"].as_i64().unwrap()).collect()
}

#[test]
fn every_part_expires_at_exactly_its_ttl_and_the_record_follows() {
    let mut d = TestDriver::new(context_topology(3), 17);
    let c = customer();
    let cart = json!({"product_id": "tent", "category": "outdoor", "price": 300.0});
    send(&mut d, &event("e1", "cart.item_added", T0, c.clone(), cart));
    send(&mut d, &event("e2", "offer.presented", T0 + MINUTE, c.clone(), json!({"offer_id": "o1"})));
    send(&mut d, &event("e3", "offer.presented", T0 + 2 * MINUTE, c.clone(), json!({"offer_id": "o2"})));
    send(&mut d, &event("e4", "offer.redeemed", T0 + 3 * MINUTE, c.clone(), json!({"offer_id": "o2"})));
    d.run().unwrap();
    let ctx = context(&d).unwrap();
    assert_eq!(offer_ids(&ctx), ["o1"], "redeemed offers close at once");
    assert_eq!(ctx["engagements"]["offers"][0]["expires_at"], T0 + MINUTE + OFFER_TTL);
    assert_eq!(ctx["session"]["expires_at"], T0 + 3 * MINUTE + SESSION_TIMEOUT);
    assert_eq!(ctx["cart"]["expires_at"], T0 + CART_TTL);

    // Session: last activity + timeout.
    let session_end = T0 + 3 * MINUTE + SESSION_TIMEOUT;
    let (written, ctx) = tick_to(&mut d, session_end - 1);
    assert_eq!((written, ctx.unwrap()["session"]["id"].as_str()), (0, Some("s_e1")));
    let (written, ctx) = tick_to(&mut d, session_end);
    let ctx = ctx.unwrap();
    assert_eq!((written, &ctx["session"]), (1, &Value::Null), "the timer publishes the session's end");
    assert_eq!(ctx["updated_at"], session_end);

    // Offer: presented_at + offer_ttl.
    let offer_end = T0 + MINUTE + OFFER_TTL;
    let (written, ctx) = tick_to(&mut d, offer_end - 1);
    assert_eq!((written, offer_ids(&ctx.unwrap())), (0, vec!["o1"]));
    let (written, ctx) = tick_to(&mut d, offer_end);
    assert_eq!((written, offer_ids(&ctx.unwrap())), (1, vec![]));

    // Cart: updated_at + cart_ttl.
    let (written, ctx) = tick_to(&mut d, T0 + CART_TTL - 1);
    assert_eq!((written, ctx.unwrap()["cart"]["value"].as_f64()), (0, Some(300.0)));
    let (written, ctx) = tick_to(&mut d, T0 + CART_TTL);
    assert_eq!((written, &ctx.unwrap()["cart"]), (1, &Value::Null));

    // Recent interactions: each at + ttl; the last one takes the record with it.
    let (written, ctx) = tick_to(&mut d, T0 + INTERACTION_TTL - 1);
    assert_eq!(
        (written, interaction_times(&ctx.unwrap())),
        (0, vec![T0, T0 + MINUTE, T0 + 2 * MINUTE, T0 + 3 * MINUTE])
    );
    let (written, ctx) = tick_to(&mut d, T0 + INTERACTION_TTL);
    assert_eq!((written, interaction_times(&ctx.unwrap())), (1, vec![T0 + MINUTE, T0 + 2 * MINUTE, T0 + 3 * MINUTE]));
    // Two due at once: one timer, one record.
    let (written, ctx) = tick_to(&mut d, T0 + 3 * MINUTE + INTERACTION_TTL - 1);
    assert_eq!((written, interaction_times(&ctx.unwrap())), (1, vec![T0 + 3 * MINUTE]));
    let (written, ctx) = tick_to(&mut d, T0 + 3 * MINUTE + INTERACTION_TTL);
    assert_eq!((written, ctx), (1, None));
    let last = d.read("context").pop().unwrap();
    assert_eq!(last.value, None, "the last expiry writes a tombstone");
    assert_eq!(d.store_len("context", "context"), 0, "and the stored context is gone");
}

#[test]
fn an_offer_expires_at_its_own_expires_at_when_that_is_sooner() {
    let mut d = TestDriver::new(context_topology(2), 5);
    let soon = T0 + 5 * MINUTE;
    let offer = json!({"offer_id": "flash", "expires_at": ts(soon)});
    send(&mut d, &event("e1", "offer.presented", T0, customer(), offer));
    let late = json!({"offer_id": "late", "expires_at": ts(T0 + 10 * OFFER_TTL)});
    send(&mut d, &event("e2", "offer.presented", T0, customer(), late));
    d.run().unwrap();
    let (_, ctx) = tick_to(&mut d, soon - 1);
    assert_eq!(offer_ids(&ctx.unwrap()), ["flash", "late"]);
    let (written, ctx) = tick_to(&mut d, soon);
    let ctx = ctx.unwrap();
    assert_eq!((written, offer_ids(&ctx)), (1, vec!["late"]));
    assert_eq!(ctx["engagements"]["offers"][0]["expires_at"], T0 + OFFER_TTL, "capped at offer_ttl");
    send(&mut d, &event("e3", "offer.dismissed", soon + 1, customer(), json!({"offer_id": "late"})));
    d.run().unwrap();
    assert_eq!(offer_ids(&context(&d).unwrap()), Vec::<&str>::new());
}

/// When the stored context's expiry timer is set for.
fn timer_at(d: &mut TestDriver) -> Option<i64> {
    let stored = d.store_scan("context", "context", "");
    assert_eq!(stored.len(), 1);
    chorus_processors::cache::decode::<CustomerContext>(&stored[0].2).unwrap().timer_at
}

/// A session every event extends keeps the expiry timer its first event set (moving it
/// would cost a tombstone and a new timer per event); the timer fires early without
/// writing a record, is set again for the session's real end, and the session still
/// ends exactly then.
#[test]
fn an_extended_session_keeps_its_timer_until_it_fires_early() {
    let mut d = TestDriver::new(context_topology(2), 11);
    for (i, at) in [T0, T0 + MINUTE, T0 + 2 * MINUTE].into_iter().enumerate() {
        send(&mut d, &event(&format!("e{i}"), "page.viewed", at, customer(), json!({})));
    }
    d.run().unwrap();
    assert_eq!(timer_at(&mut d), Some(T0 + SESSION_TIMEOUT), "set by the first event, not moved by the others");
    assert_eq!(d.store_len("context", "__timers"), 1);
    let session_end = T0 + 2 * MINUTE + SESSION_TIMEOUT;
    let (written, ctx) = tick_to(&mut d, T0 + SESSION_TIMEOUT);
    let ctx = ctx.unwrap();
    assert_eq!(written, 0, "an early timer changes nothing readers see");
    assert!(!ctx["session"].is_null());
    assert_eq!(timer_at(&mut d), Some(session_end), "set again for the session's real end");
    let (written, ctx) = tick_to(&mut d, session_end - 1);
    assert_eq!((written, ctx.unwrap()["session"].is_null()), (0, false));
    let (written, ctx) = tick_to(&mut d, session_end);
    assert_eq!((written, &ctx.unwrap()["session"]), (1, &Value::Null), "ends exactly at its timeout");
}

/// A late event (an offline app syncing) from a session long over does not replace
/// the customer's live session, nor bring back a cart that has already expired.
#[test]
fn late_events_do_not_resurrect_expired_parts() {
    let mut d = TestDriver::new(context_topology(1), 3);
    let mut live = event("e1", "page.viewed", T0 + 4 * CART_TTL, customer(), json!({}));
    live["session_id"] = json!("s-live");
    send(&mut d, &live);
    d.run().unwrap();
    let mut stale = event("e0", "cart.item_added", T0, customer(), json!({"product_id": "pan", "price": 20.0}));
    stale["session_id"] = json!("s-old");
    send(&mut d, &stale);
    d.run().unwrap();
    let ctx = context(&d).unwrap();
    assert_eq!(ctx["session"]["id"], "s-live", "{ctx}");
    assert_eq!(ctx["session"]["expires_at"], T0 + 4 * CART_TTL + SESSION_TIMEOUT);
    assert_eq!(ctx["cart"], Value::Null, "{ctx}");
    assert_eq!(interaction_times(&ctx), [T0 + 4 * CART_TTL], "older than the interaction TTL: {ctx}");
}

/// Which part a boundary case looks at.
#[derive(Debug, Clone, Copy)]
enum Part {
    Session,
    Cart,
    Offer,
    Interaction,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// A part is present at `expiry + offset` exactly when `offset < 0`, for any
    /// partition count and interleaving.
    #[test]
    fn a_part_is_present_iff_time_is_before_its_expiry(
        part in prop::sample::select(vec![Part::Session, Part::Cart, Part::Offer, Part::Interaction]),
        offset in -2i64..=2,
        partitions in prop::sample::select(vec![1u32, 2, 3, 8]),
        seed in any::<u64>(),
    ) {
        let mut d = TestDriver::new(context_topology(partitions), seed);
        let start = T0 + 7;
        let (kind, payload, ttl) = match part {
            Part::Session => ("page.viewed", json!({}), SESSION_TIMEOUT),
            Part::Cart => ("cart.item_added", json!({"product_id": "tent", "price": 1.5}), CART_TTL),
            Part::Offer => ("offer.presented", json!({"offer_id": "o1"}), OFFER_TTL),
            Part::Interaction => ("page.viewed", json!({}), INTERACTION_TTL),
        };
        send(&mut d, &event("e1", kind, start, customer(), payload));
        d.run().unwrap();
        // Half way first, so the expiry is reached by a timer set earlier, then at it.
        tick(&mut d, start + ttl / 2);
        d.run().unwrap();
        let (_, ctx) = tick_to(&mut d, start + ttl + offset);
        let present = match (part, &ctx) {
            (_, None) => false,
            (Part::Session, Some(c)) => !c["session"].is_null(),
            (Part::Cart, Some(c)) => !c["cart"].is_null(),
            (Part::Offer, Some(c)) => !offer_ids(c).is_empty(),
            (Part::Interaction, Some(c)) => !interaction_times(c).is_empty(),
        };
        prop_assert_eq!(present, offset < 0, "{:?} at expiry {:+} ms: {:?}", part, offset, ctx);
        if let Part::Interaction = part {
            // Interactions outlive every other part: their expiry empties the record.
            prop_assert_eq!(ctx.is_none(), offset >= 0);
        }
    }
}

/// A producer's absurd `quantity` (or price) neither overflows the cart arithmetic nor
/// writes a value JSON cannot hold: the line is capped and the task keeps going.
#[test]
fn huge_quantity_caps_the_cart_line_instead_of_overflowing() {
    let mut d = TestDriver::new(context_topology(2), 3);
    let huge = json!({"product_id": "tent", "category": "outdoor", "price": 1e303, "quantity": 1e30});
    send(&mut d, &event("e1", "cart.item_added", T0, customer(), huge.clone()));
    send(&mut d, &event("e2", "cart.item_added", T0 + 1, customer(), huge));
    d.run().unwrap();
    let ctx = context(&d).unwrap();
    let line = &ctx["cart"]["items"][0];
    assert_eq!(line["product_id"], "tent");
    assert_eq!(line["quantity"], chorus_processors::context::MAX_QUANTITY);
    assert_eq!(ctx["cart"]["value"], 0.0, "a total that is not finite counts as zero");
    let remove = json!({"product_id": "tent", "quantity": 1e30});
    send(&mut d, &event("e3", "cart.item_removed", T0 + 2, customer(), remove));
    d.run().unwrap();
    assert_eq!(context(&d).unwrap()["cart"], Value::Null, "removing more than the line holds empties it");
}
