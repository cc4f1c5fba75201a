//! Profile: the Customer 360 aggregate, keyed by canonical id. Each resolved event
//! updates counts, lifetime value (net of returns), purchases, first/last seen, last
//! channel and trait attributes (last write by event time wins, per attribute). When a
//! customer merges away, its profile travels to the survivor and folds in; every event
//! was counted once on exactly one side, so the fold is a sum and nothing is counted
//! twice.

use crate::processor::{Ctx, ProcessError, Processor, Record};
use crate::resolved::{absorbed, decode, incoming, on_merge, Kind, RESOLVED_TOPIC};
use crate::task::ProcessorSpec;
use crate::topology::Topology;
use chorus_schemas::Event;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

pub const NAME: &str = "profile";
pub const STORE: &str = "profiles";
pub const TOPIC: &str = "profiles";

pub fn spec(_topology: &Topology) -> ProcessorSpec {
    ProcessorSpec {
        name: NAME,
        inputs: vec![RESOLVED_TOPIC.into()],
        stores: vec![STORE],
        outputs: vec![TOPIC.into(), RESOLVED_TOPIC.into()],
        factory: Box::new(|| Box::new(ProfileStage)),
    }
}

pub struct ProfileStage;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Attribute {
    pub value: Value,
    pub at: i64,
    pub source: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileIdentity {
    pub emails: Vec<String>,
    pub phones: Vec<String>,
    pub linked_ids: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub lifetime_value: f64,
    pub purchase_count: i64,
    pub average_order_value: f64,
    pub event_count: i64,
    #[serde(default)]
    pub gross_revenue: f64,
    #[serde(default)]
    pub returns_value: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub canonical_id: String,
    pub customer_id: Option<String>,
    pub identity: ProfileIdentity,
    pub attributes: BTreeMap<String, Attribute>,
    pub metrics: Metrics,
    pub event_counts: BTreeMap<String, i64>,
    pub first_seen: i64,
    pub last_seen: i64,
    pub last_channel: Option<String>,
    #[serde(default)]
    pub last_channel_at: i64,
    #[serde(default)]
    pub segments: Vec<String>,
    #[serde(default)]
    pub merged_from: Vec<String>,
    pub updated_at: i64,
}

impl Profile {
    pub fn new(canonical_id: &str) -> Profile {
        Profile { canonical_id: canonical_id.to_owned(), first_seen: i64::MAX, ..Profile::default() }
    }

    /// Apply one event. Counting is by event type; money by order events.
    pub fn apply(&mut self, event: &Event, customer_id: Option<&str>) {
        let at = event.timestamp_ms;
        if self.customer_id.is_none() {
            self.customer_id = customer_id.map(str::to_owned);
        }
        *self.event_counts.entry(event.event_type.clone()).or_default() += 1;
        self.metrics.event_count += 1;
        self.first_seen = self.first_seen.min(at);
        self.last_seen = self.last_seen.max(at);
        if let Some(channel) = &event.channel {
            if at >= self.last_channel_at {
                self.last_channel = Some(channel.clone());
                self.last_channel_at = at;
            }
        }
        match event.event_type.as_str() {
            "order.completed" => {
                self.metrics.purchase_count += 1;
                self.metrics.gross_revenue += event.payload_f64("total").unwrap_or(0.0);
            }
            "order.returned" => self.metrics.returns_value += event.payload_f64("amount").unwrap_or(0.0),
            _ => {}
        }
        for (kind, value) in &event.identifiers {
            self.identity.add(kind, value);
        }
        for kind in ["email", "phone"] {
            if let Some(v) = event.traits.get(kind).and_then(Value::as_str) {
                self.identity.add(kind, v);
            }
        }
        if let Some(c) = &event.customer_id {
            self.identity.add("customer_id", c);
        }
        if let Some(a) = &event.anonymous_id {
            self.identity.add("anonymous_id", a);
        }
        let source = event.channel.clone().unwrap_or_else(|| event.event_type.clone());
        for (name, value) in flatten_traits(&event.traits) {
            let newer = self.attributes.get(&name).is_none_or(|a| at >= a.at);
            if newer {
                self.attributes.insert(name, Attribute { value, at, source: source.clone() });
            }
        }
        self.derive();
    }

    /// Fold another profile of the same customer into this one.
    pub fn absorb(&mut self, other: &Profile) {
        if self.customer_id.is_none() {
            self.customer_id = other.customer_id.clone();
        }
        for (t, n) in &other.event_counts {
            *self.event_counts.entry(t.clone()).or_default() += n;
        }
        self.metrics.event_count += other.metrics.event_count;
        self.metrics.purchase_count += other.metrics.purchase_count;
        self.metrics.gross_revenue += other.metrics.gross_revenue;
        self.metrics.returns_value += other.metrics.returns_value;
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
        if other.last_channel.is_some() && other.last_channel_at > self.last_channel_at {
            self.last_channel = other.last_channel.clone();
            self.last_channel_at = other.last_channel_at;
        }
        for (name, attr) in &other.attributes {
            if self.attributes.get(name).is_none_or(|a| attr.at > a.at) {
                self.attributes.insert(name.clone(), attr.clone());
            }
        }
        for e in &other.identity.emails {
            self.identity.add("email", e);
        }
        for p in &other.identity.phones {
            self.identity.add("phone", p);
        }
        for l in &other.identity.linked_ids {
            if !self.identity.linked_ids.contains(l) {
                self.identity.linked_ids.push(l.clone());
            }
        }
        self.merged_from.push(other.canonical_id.clone());
        self.merged_from.extend(other.merged_from.iter().cloned());
        self.derive();
    }

    fn derive(&mut self) {
        let m = &mut self.metrics;
        m.lifetime_value = round2(m.gross_revenue - m.returns_value);
        m.average_order_value =
            if m.purchase_count > 0 { round2(m.gross_revenue / m.purchase_count as f64) } else { 0.0 };
    }

    /// The record published on `profiles` and served by the API.
    pub fn snapshot(&self) -> Value {
        let attributes: Map<String, Value> =
            self.attributes.iter().map(|(k, a)| (k.clone(), a.value.clone())).collect();
        serde_json::json!({
            "canonical_id": self.canonical_id,
            "customer_id": self.customer_id,
            "identity": self.identity,
            "attributes": attributes,
            "attribute_sources": self.attributes,
            "metrics": {
                "lifetime_value": self.metrics.lifetime_value,
                "purchase_count": self.metrics.purchase_count,
                "average_order_value": self.metrics.average_order_value,
                "event_count": self.metrics.event_count,
            },
            "event_counts": self.event_counts,
            "first_seen": if self.first_seen == i64::MAX { 0 } else { self.first_seen },
            "last_seen": self.last_seen,
            "last_channel": self.last_channel,
            "segments": self.segments,
            "merged_from": self.merged_from,
            "updated_at": self.updated_at,
        })
    }
}

impl ProfileIdentity {
    fn add(&mut self, kind: &str, raw: &str) {
        let Some(value) = crate::identity::normalise(kind, raw) else { return };
        let list = match kind {
            "email" => Some(&mut self.emails),
            "phone" => Some(&mut self.phones),
            _ => None,
        };
        if let Some(list) = list {
            if !list.contains(&value) {
                list.push(value.clone());
            }
        }
        let label = format!("{kind}:{value}");
        if !self.linked_ids.contains(&label) {
            self.linked_ids.push(label);
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Traits as attributes: nested objects one level deep become `address.city` style
/// names so each attribute has its own last-write time.
fn flatten_traits(traits: &Map<String, Value>) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (k, v) in traits {
        match v {
            Value::Object(inner) if !inner.is_empty() => {
                for (ik, iv) in inner {
                    out.push((format!("{k}.{ik}"), iv.clone()));
                }
            }
            _ => out.push((k.clone(), v.clone())),
        }
    }
    out
}

impl Processor for ProfileStage {
    fn process(&mut self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError> {
        let Some(resolved) = incoming(ctx, record, NAME, STORE)? else { return Ok(()) };
        match resolved.kind {
            Kind::Event => {
                let mut event: Event = decode(resolved.body)?;
                event.timestamp_ms = resolved.at;
                let id = resolved.canonical_id;
                let mut profile = ctx.get_json::<Profile>(STORE, &id)?.unwrap_or_else(|| Profile::new(&id));
                profile.apply(&event, resolved.customer_id.as_deref());
                ctx.mark_visible(resolved.at);
                self.save(ctx, profile)
            }
            Kind::Merge => on_merge(ctx, NAME, STORE, resolved.body, Some(TOPIC)),
            Kind::Absorb => {
                let Some(other) = absorbed::<Profile>(resolved.body, NAME)? else { return Ok(()) };
                let id = resolved.canonical_id;
                let mut profile = ctx.get_json::<Profile>(STORE, &id)?.unwrap_or_else(|| Profile::new(&id));
                profile.absorb(&other);
                self.save(ctx, profile)
            }
            Kind::Request | Kind::Consent | Kind::Tick => Ok(()),
        }
    }
}

impl ProfileStage {
    fn save(&self, ctx: &mut Ctx<'_>, mut profile: Profile) -> Result<(), ProcessError> {
        profile.updated_at = ctx.now;
        ctx.put_json(STORE, &profile.canonical_id, &profile)?;
        ctx.emit_json(TOPIC, &profile.canonical_id, &profile.snapshot())
    }
}
