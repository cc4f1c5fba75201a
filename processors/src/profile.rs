//! Profile: the Customer 360 aggregate, keyed by canonical id. Each resolved event
//! updates counts, lifetime value (net of returns), purchases, first/last seen, last
//! channel and trait attributes (last write by event time wins, per attribute). When a
//! customer merges away, its profile travels to the survivor and folds in; every event
//! was counted once on exactly one side, so the fold is a sum and nothing is counted
//! twice.

use crate::processor::{Ctx, ProcessError, Processor, Record};
use crate::resolved::{absorbed, decode, incoming, on_merge, Kind, RESOLVED_TOPIC};
use crate::segments::Segments;
use crate::task::ProcessorSpec;
use crate::topology::Topology;
use chorus_schemas::Event;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const NAME: &str = "profile";
pub const STORE: &str = "profiles";
pub const TOPIC: &str = "profiles";

pub const SEGMENTS_TOPIC: &str = "segments";

pub fn spec(topology: &Topology) -> ProcessorSpec {
    // Validated with the topology; a rule that does not compile matches nobody.
    let segments = Arc::new(Segments::compile(&topology.segments).unwrap_or_else(|_| Segments::none()));
    ProcessorSpec {
        name: NAME,
        inputs: vec![RESOLVED_TOPIC.into()],
        stores: vec![STORE],
        outputs: vec![TOPIC.into(), SEGMENTS_TOPIC.into(), RESOLVED_TOPIC.into()],
        factory: Box::new(move || Box::new(ProfileStage { segments: segments.clone() })),
    }
}

pub struct ProfileStage {
    segments: Arc<Segments>,
}

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
    /// `payload.category` of the latest order, by event time.
    #[serde(default)]
    pub last_purchase_category: Option<String>,
    #[serde(default)]
    pub last_purchase_at: i64,
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
                if let Some(category) = event.payload.get("category").and_then(Value::as_str) {
                    if at >= self.metrics.last_purchase_at {
                        self.metrics.last_purchase_category = Some(category.to_owned());
                        self.metrics.last_purchase_at = at;
                    }
                }
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
        if other.metrics.last_purchase_category.is_some()
            && other.metrics.last_purchase_at > self.metrics.last_purchase_at
        {
            self.metrics.last_purchase_category = other.metrics.last_purchase_category.clone();
            self.metrics.last_purchase_at = other.metrics.last_purchase_at;
        }
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

    /// What segment rules see as `customer`: the metrics at the top level
    /// (`customer.lifetime_value`), the attributes as nested objects
    /// (`customer.location.state`), identity, counts and times.
    pub fn customer_view(&self) -> Value {
        let mut view = Map::new();
        for (name, attr) in &self.attributes {
            let parts: Vec<&str> = name.split('.').collect();
            insert_path(&mut view, &parts, attr.value.clone());
        }
        let m = &self.metrics;
        for (k, v) in [
            ("canonical_id", serde_json::json!(self.canonical_id)),
            ("customer_id", serde_json::json!(self.customer_id)),
            ("lifetime_value", serde_json::json!(m.lifetime_value)),
            ("purchase_count", serde_json::json!(m.purchase_count)),
            ("average_order_value", serde_json::json!(m.average_order_value)),
            ("event_count", serde_json::json!(m.event_count)),
            ("last_purchase_category", serde_json::json!(m.last_purchase_category)),
            ("event_counts", serde_json::json!(self.event_counts)),
            ("emails", serde_json::json!(self.identity.emails)),
            ("phones", serde_json::json!(self.identity.phones)),
            ("first_seen", serde_json::json!(self.first_seen)),
            ("last_seen", serde_json::json!(self.last_seen)),
            ("last_channel", serde_json::json!(self.last_channel)),
        ] {
            view.insert(k.to_owned(), v);
        }
        Value::Object(view)
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
                "last_purchase_category": self.metrics.last_purchase_category,
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

/// Set `a.b.c` in a JSON object, creating (or replacing non-object) parents.
fn insert_path(map: &mut Map<String, Value>, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            map.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = map.entry((*first).to_owned()).or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            if let Value::Object(inner) = entry {
                insert_path(inner, rest, value);
            }
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
        let now_in = self.segments.evaluate(&profile.customer_view());
        for (name, change) in profile
            .segments
            .iter()
            .filter(|s| !now_in.contains(s))
            .map(|s| (s, "exited"))
            .chain(now_in.iter().filter(|s| !profile.segments.contains(s)).map(|s| (s, "entered")))
        {
            ctx.count("segment_changes", change);
            let record = serde_json::json!({"canonical_id": profile.canonical_id, "customer_id": profile.customer_id,
                "segment": name, "change": change, "at": ctx.now});
            ctx.emit_json(SEGMENTS_TOPIC, &profile.canonical_id, &record)?;
        }
        profile.segments = now_in;
        ctx.put_json(STORE, &profile.canonical_id, &profile)?;
        ctx.emit_json(TOPIC, &profile.canonical_id, &profile.snapshot())
    }
}
