//! Helpers shared by the processors' integration tests. Each test binary compiles this
//! module and uses a different subset of it.
#![allow(dead_code)]

use chorus_processors::topology::{Clock, Topology};
use chorus_processors::TestDriver;
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub const T0: i64 = 1_707_906_600_000; // 2024-02-14T10:30:00Z

/// Union-find root of `x` (with path compression): the oracle's component of `x`.
pub fn find(parent: &mut BTreeMap<String, String>, x: &str) -> String {
    let p = parent.get(x).cloned().unwrap_or_else(|| x.to_owned());
    if p == x {
        return p;
    }
    let root = find(parent, &p);
    parent.insert(x.to_owned(), root.clone());
    root
}

pub fn ts(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).unwrap().to_string()
}

/// The default topology under `clock: event`, with `raw_partitions` for the identity
/// stage's inputs and `partitions` for every other topic.
pub fn topology(raw_partitions: u32, partitions: u32) -> Topology {
    let mut t = Topology::default().with_partitions(partitions);
    t.clock = Clock::Event;
    for topic in ["events.raw", "messages.requests", "consent", "privacy.requests"] {
        t.topics.partitions.insert(topic.into(), raw_partitions);
    }
    t
}

/// A web event; `ids` holds `customer_id` / `anonymous_id` (or any top-level field).
pub fn event(id: &str, kind: &str, at: i64, ids: Value, payload: Value) -> Value {
    let mut e = json!({"event_id": id, "event_type": kind, "timestamp": ts(at), "channel": "web", "payload": payload});
    for (k, v) in ids.as_object().unwrap() {
        e[k] = v.clone();
    }
    e
}

fn key_of(e: &Value) -> String {
    e.get("customer_id").or(e.get("anonymous_id")).and_then(Value::as_str).unwrap_or("k").to_owned()
}

pub fn send(d: &mut TestDriver, e: &Value) {
    d.pipe_json("events.raw", &key_of(e), e, 0);
}

/// Move event time to `at` on every partition (`system.tick`).
pub fn tick(d: &mut TestDriver, at: i64) {
    let tick = json!({"event_id": format!("tick-{at}"), "event_type": "system.tick", "timestamp": ts(at),
        "customer_id": "system"});
    d.broadcast_json("events.raw", "tick", &tick, 0);
}

/// The latest `profiles` record of the customer with this customer id.
pub fn profile_of(d: &TestDriver, customer_id: &str) -> Value {
    d.table("profiles")
        .into_values()
        .find(|p| p["customer_id"] == customer_id)
        .unwrap_or_else(|| panic!("no profile for {customer_id}"))
}
