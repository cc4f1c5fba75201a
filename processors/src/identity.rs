//! Identity: the first stage. It validates and dedupes raw input, resolves every event,
//! message request and consent change to a canonical customer id, links identifiers seen
//! together (deterministic matching), merges customers that turn out to be one, and
//! repartitions everything onto `events.resolved` keyed by canonical id.
//!
//! Store `identity` keys: `id:<type>:<value>` → canonical id; `comp:<canonical>` → the
//! component (its identifiers); `fwd:<merged-away id>` → the id it merged into.
//! Merges always flow toward the smaller canonical id, so replaying the same links in
//! any order ends at the same survivor.
//!
//! This is correct within one partition of `events.raw`; identifiers of one customer that
//! hash to different partitions are joined by the cross-partition protocol (next stage
//! of the identity work).

use crate::processor::{Ctx, ProcessError, Processor, Record};
use crate::resolved::{Kind, MergeBody, Resolved, RESOLVED_TOPIC};
use crate::task::ProcessorSpec;
use crate::topology::{Topology, CONSENT, EVENTS_RAW, MESSAGES_REQUESTS};
use chorus_schemas::{decode_avro, ConsentChange, Event, MessageRequest, AVRO_MAGIC};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

pub const NAME: &str = "identity";
pub const STORE: &str = "identity";
pub const DEDUPE_STORE: &str = "dedupe";
pub const MERGES_TOPIC: &str = "identity.merges";
pub const GRAPH_TOPIC: &str = "identity.graph";

pub fn spec(topology: &Topology) -> ProcessorSpec {
    let topology = Arc::new(topology.clone());
    ProcessorSpec {
        name: NAME,
        inputs: vec![EVENTS_RAW.into(), MESSAGES_REQUESTS.into(), CONSENT.into()],
        stores: vec![STORE, DEDUPE_STORE],
        outputs: vec![RESOLVED_TOPIC.into(), MERGES_TOPIC.into(), GRAPH_TOPIC.into(), "events.dlq".into()],
        factory: Box::new(move || Box::new(Identity { topology: topology.clone() })),
    }
}

pub struct Identity {
    topology: Arc<Topology>,
}

/// One identifier, normalised: (`email`, `ann@example.com`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Identifier {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

impl Identifier {
    pub fn new(kind: &str, raw: &str) -> Option<Identifier> {
        let value = normalise(kind, raw)?;
        Some(Identifier { kind: kind.to_owned(), value })
    }

    pub fn store_key(&self) -> String {
        format!("id:{}:{}", self.kind, self.value)
    }

    pub fn label(&self) -> String {
        format!("{}:{}", self.kind, self.value)
    }
}

/// Normalise an identifier value for its type; `None` for values that identify nobody.
pub fn normalise(kind: &str, raw: &str) -> Option<String> {
    let trimmed = raw.trim();
    let value = match kind {
        "email" => trimmed.to_lowercase(),
        "phone" => {
            let plus = trimmed.starts_with('+');
            let digits: String = trimmed.chars().filter(char::is_ascii_digit).collect();
            if plus {
                format!("+{digits}")
            } else {
                digits
            }
        }
        _ => trimmed.to_owned(),
    };
    (!value.is_empty() && value != "+").then_some(value)
}

/// One identifier of a component with how it joined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkedIdentifier {
    #[serde(flatten)]
    pub id: Identifier,
    pub rule: String,
    pub first_seen: i64,
}

/// A customer as the identity graph knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Component {
    pub canonical_id: String,
    pub customer_id: Option<String>,
    pub identifiers: Vec<LinkedIdentifier>,
    #[serde(default)]
    pub merged_from: Vec<String>,
}

/// A merge as emitted on `identity.merges`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeRecord {
    pub from: String,
    pub into: String,
    pub rule: String,
    pub score: Option<f64>,
    pub identifiers: Vec<String>,
    pub at: i64,
}

/// A deterministic canonical id for a customer first seen through `first`.
pub fn canonical_id_for(first: &Identifier) -> String {
    let uuid = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, first.label().as_bytes());
    format!("cus_{}", &uuid.simple().to_string()[..20])
}

/// Store keys to try, in order, for a path identifier: `type:value`, a canonical id, or
/// a bare value (customer id, email, phone, anonymous id, loyalty card).
pub fn lookup_keys(identifier: &str) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some((kind, value)) = identifier.split_once(':') {
        if let Some(id) = Identifier::new(kind, value) {
            keys.push(id.store_key());
        }
    }
    for kind in ["customer_id", "email", "phone", "anonymous_id", "loyalty_card", "device_id"] {
        if let Some(id) = Identifier::new(kind, identifier) {
            keys.push(id.store_key());
        }
    }
    keys
}

impl Processor for Identity {
    fn process(&mut self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError> {
        let bytes = record.value.as_deref().unwrap_or_default();
        if bytes.len() > self.topology.limits.max_record_bytes {
            return Err(ProcessError::reject(
                "oversized",
                format!(
                    "record of {} bytes exceeds limits.max_record_bytes ({})",
                    bytes.len(),
                    self.topology.limits.max_record_bytes
                ),
            ));
        }
        let json = decode_input(bytes)?;
        match record.topic.as_str() {
            MESSAGES_REQUESTS => self.on_request(ctx, &json),
            CONSENT => self.on_consent(ctx, &json),
            _ => self.on_event(ctx, &json),
        }
    }
}

/// JSON or Avro single-object bytes → JSON.
fn decode_input(bytes: &[u8]) -> Result<Value, ProcessError> {
    if bytes.is_empty() {
        return Err(ProcessError::reject("empty", "record has no value"));
    }
    if bytes.starts_with(&AVRO_MAGIC) {
        return decode_avro(bytes).map(|(_, v)| v).map_err(|e| ProcessError::reject("invalid_avro", e.to_string()));
    }
    serde_json::from_slice(bytes).map_err(|e| ProcessError::reject("invalid_json", format!("not valid JSON: {e}")))
}

impl Identity {
    fn on_event(&mut self, ctx: &mut Ctx<'_>, json: &Value) -> Result<(), ProcessError> {
        let event = Event::from_json(json).map_err(|e| ProcessError::reject("invalid_event", e.to_string()))?;
        ctx.observe_event_time(event.timestamp_ms);
        if !self.topology.is_known_event_type(&event.event_type) {
            return Err(ProcessError::reject(
                "unknown_event_type",
                format!("event_type {:?} is not in the topology's event_types", event.event_type),
            ));
        }
        if event.event_type == "system.tick" {
            return self.broadcast_tick(ctx, &event);
        }
        let identifiers = self.event_identifiers(&event);
        if identifiers.is_empty() {
            return Err(ProcessError::reject(
                "no_identifier",
                format!(
                    "an event needs customer_id, anonymous_id or an identifier of type {:?}",
                    self.topology.identity.link_types
                ),
            ));
        }
        if ctx.get_bytes(DEDUPE_STORE, event.event_id.as_bytes())?.is_some() {
            ctx.count("duplicates", "events.raw");
            return Ok(());
        }
        let expires = ctx.now.saturating_add(self.topology.dedupe.window.ms());
        ctx.put_bytes(DEDUPE_STORE, event.event_id.as_bytes(), &[], Some(expires))?;
        let component = resolve(ctx, &identifiers, event.timestamp_ms)?;
        ctx.count("resolved", if component.customer_id.is_some() { "known" } else { "anonymous" });
        let body = serde_json::to_value(&event).unwrap_or(Value::Null);
        emit_resolved(ctx, Kind::Event, &component, event.timestamp_ms, body)
    }

    fn on_request(&mut self, ctx: &mut Ctx<'_>, json: &Value) -> Result<(), ProcessError> {
        let request =
            MessageRequest::from_json(json).map_err(|e| ProcessError::reject("invalid_request", e.to_string()))?;
        ctx.observe_event_time(request.timestamp_ms);
        let orchestration = &self.topology.orchestration;
        if !orchestration.categories.contains_key(&request.category) {
            return Err(ProcessError::reject(
                "unknown_category",
                format!(
                    "category {:?} is not one of {:?}",
                    request.category,
                    orchestration.categories.keys().collect::<Vec<_>>()
                ),
            ));
        }
        if let Some(bad) = request.channels.iter().find(|c| !orchestration.channels.contains(c)) {
            return Err(ProcessError::reject(
                "unknown_channel",
                format!("channel {bad:?} is not one of {:?}", orchestration.channels),
            ));
        }
        let identifiers = named_identifiers(request.customer_id.as_deref(), &request.identifiers);
        if identifiers.is_empty() {
            return Err(ProcessError::reject("no_identifier", "the request names no usable identifier"));
        }
        let component = resolve(ctx, &identifiers, request.timestamp_ms)?;
        let body = serde_json::to_value(&request).unwrap_or(Value::Null);
        emit_resolved(ctx, Kind::Request, &component, request.timestamp_ms, body)
    }

    fn on_consent(&mut self, ctx: &mut Ctx<'_>, json: &Value) -> Result<(), ProcessError> {
        let change =
            ConsentChange::from_json(json).map_err(|e| ProcessError::reject("invalid_consent", e.to_string()))?;
        ctx.observe_event_time(change.timestamp_ms);
        if !self.topology.consent.purposes.contains(&change.purpose) {
            return Err(ProcessError::reject(
                "unknown_purpose",
                format!("purpose {:?} is not one of {:?}", change.purpose, self.topology.consent.purposes),
            ));
        }
        let identifiers = named_identifiers(change.customer_id.as_deref(), &change.identifiers);
        if identifiers.is_empty() {
            return Err(ProcessError::reject("no_identifier", "the consent change names no usable identifier"));
        }
        let component = resolve(ctx, &identifiers, change.timestamp_ms)?;
        let body = serde_json::to_value(&change).unwrap_or(Value::Null);
        emit_resolved(ctx, Kind::Consent, &component, change.timestamp_ms, body)
    }

    /// A tick reaches every partition of `events.raw`; each identity task forwards it to
    /// the `events.resolved` partitions it is responsible for, so each downstream task
    /// sees it exactly once per tick.
    fn broadcast_tick(&mut self, ctx: &mut Ctx<'_>, event: &Event) -> Result<(), ProcessError> {
        let raw = ctx.partitions(EVENTS_RAW).max(1);
        let resolved = ctx.partitions(RESOLVED_TOPIC);
        let tick = Resolved {
            kind: Kind::Tick,
            canonical_id: String::new(),
            customer_id: None,
            at: event.timestamp_ms,
            body: Value::Null,
            stage: None,
        };
        let bytes = serde_json::to_vec(&tick).unwrap_or_default();
        let mine = ctx.partition % raw;
        for p in (0..resolved).filter(|q| q % raw == mine) {
            ctx.emit(RESOLVED_TOPIC, b"tick", Some(bytes.clone()), Some(p));
        }
        Ok(())
    }

    /// Link identifiers of an event: customer id, anonymous id, and identifiers of a
    /// linking type.
    fn event_identifiers(&self, event: &Event) -> Vec<Identifier> {
        let link_types = &self.topology.identity.link_types;
        let mut out = Vec::new();
        let mut push = |kind: &str, raw: &str| {
            if link_types.iter().any(|t| t == kind) {
                if let Some(id) = Identifier::new(kind, raw) {
                    if !out.contains(&id) {
                        out.push(id);
                    }
                }
            }
        };
        if let Some(c) = &event.customer_id {
            push("customer_id", c);
        }
        if let Some(a) = &event.anonymous_id {
            push("anonymous_id", a);
        }
        for (kind, value) in &event.identifiers {
            push(kind, value);
        }
        if event.event_type == "identify" {
            for kind in ["email", "phone"] {
                if let Some(v) = event.traits.get(kind).and_then(Value::as_str) {
                    push(kind, v);
                }
            }
        }
        out
    }
}

fn named_identifiers(customer_id: Option<&str>, map: &std::collections::BTreeMap<String, String>) -> Vec<Identifier> {
    let mut out: Vec<Identifier> = customer_id.and_then(|c| Identifier::new("customer_id", c)).into_iter().collect();
    out.extend(map.iter().filter_map(|(k, v)| Identifier::new(k, v)));
    out
}

fn emit_resolved(
    ctx: &mut Ctx<'_>,
    kind: Kind,
    component: &Component,
    at: i64,
    body: Value,
) -> Result<(), ProcessError> {
    let resolved = Resolved {
        kind,
        canonical_id: component.canonical_id.clone(),
        customer_id: component.customer_id.clone(),
        at,
        body,
        stage: None,
    };
    ctx.emit_json(RESOLVED_TOPIC, &component.canonical_id, &resolved)
}

/// Follow forwarding pointers from a merged-away id to the live canonical id.
pub fn live_canonical(ctx: &mut Ctx<'_>, id: &str) -> Result<String, ProcessError> {
    let mut current = id.to_owned();
    for _ in 0..64 {
        match ctx.get_json::<String>(STORE, &format!("fwd:{current}"))? {
            Some(next) => current = next,
            None => break,
        }
    }
    Ok(current)
}

/// Resolve identifiers seen together to one component, creating or merging as needed.
pub fn resolve(ctx: &mut Ctx<'_>, identifiers: &[Identifier], at: i64) -> Result<Component, ProcessError> {
    let mut owners: Vec<String> = Vec::new();
    for id in identifiers {
        if let Some(owner) = ctx.get_json::<String>(STORE, &id.store_key())? {
            let live = live_canonical(ctx, &owner)?;
            if !owners.contains(&live) {
                owners.push(live);
            }
        }
    }
    owners.sort();
    // The component is rewritten (store + changelog) only when something changed:
    // most events come from identifiers already linked.
    let mut changed = owners.len() != 1;
    let mut component = match owners.first() {
        Some(survivor) => load_component(ctx, survivor)?,
        None => {
            let canonical_id = canonical_id_for(&identifiers[0]);
            ctx.count("customers_created", "deterministic");
            Component { canonical_id, customer_id: None, identifiers: Vec::new(), merged_from: Vec::new() }
        }
    };
    let labels: Vec<String> = identifiers.iter().map(Identifier::label).collect();
    for loser in owners.iter().skip(1) {
        merge_into(ctx, &mut component, loser, &labels, at)?;
    }
    for id in identifiers {
        if !component.identifiers.iter().any(|l| &l.id == id) {
            component.identifiers.push(LinkedIdentifier {
                id: id.clone(),
                rule: "deterministic".into(),
                first_seen: at,
            });
            changed = true;
            ctx.put_json(STORE, &id.store_key(), &component.canonical_id)?;
            emit_graph(ctx, id, &component.canonical_id, "deterministic", at)?;
        }
        if id.kind == "customer_id" && component.customer_id.is_none() {
            component.customer_id = Some(id.value.clone());
            changed = true;
        }
    }
    if changed {
        ctx.put_json(STORE, &format!("comp:{}", component.canonical_id), &component)?;
    }
    Ok(component)
}

fn load_component(ctx: &mut Ctx<'_>, canonical_id: &str) -> Result<Component, ProcessError> {
    Ok(ctx.get_json(STORE, &format!("comp:{canonical_id}"))?.unwrap_or_else(|| Component {
        canonical_id: canonical_id.to_owned(),
        customer_id: None,
        identifiers: Vec::new(),
        merged_from: Vec::new(),
    }))
}

fn emit_graph(
    ctx: &mut Ctx<'_>,
    id: &Identifier,
    canonical_id: &str,
    rule: &str,
    first_seen: i64,
) -> Result<(), ProcessError> {
    let entry = serde_json::json!({"identifier": id.label(), "canonical_id": canonical_id, "rule": rule, "first_seen": first_seen});
    ctx.emit_json(GRAPH_TOPIC, &id.label(), &entry)
}

fn merge_into(
    ctx: &mut Ctx<'_>,
    survivor: &mut Component,
    loser_id: &str,
    labels: &[String],
    at: i64,
) -> Result<(), ProcessError> {
    let loser = load_component(ctx, loser_id)?;
    for linked in &loser.identifiers {
        ctx.put_json(STORE, &linked.id.store_key(), &survivor.canonical_id)?;
        emit_graph(ctx, &linked.id, &survivor.canonical_id, &linked.rule, linked.first_seen)?;
        if !survivor.identifiers.iter().any(|l| l.id == linked.id) {
            survivor.identifiers.push(linked.clone());
        }
    }
    if survivor.customer_id.is_none() {
        survivor.customer_id = loser.customer_id.clone();
    }
    survivor.merged_from.push(loser_id.to_owned());
    survivor.merged_from.extend(loser.merged_from.iter().cloned());
    ctx.delete(STORE, &format!("comp:{loser_id}"))?;
    ctx.put_json(STORE, &format!("fwd:{loser_id}"), &survivor.canonical_id)?;
    let merge = MergeRecord {
        from: loser_id.to_owned(),
        into: survivor.canonical_id.clone(),
        rule: "deterministic".into(),
        score: None,
        identifiers: labels.to_vec(),
        at,
    };
    ctx.emit_json(MERGES_TOPIC, loser_id, &merge)?;
    ctx.count("merges", "deterministic");
    let body = serde_json::to_value(MergeBody { from: loser_id.to_owned(), into: survivor.canonical_id.clone() })
        .unwrap_or(Value::Null);
    let resolved =
        Resolved { kind: Kind::Merge, canonical_id: loser_id.to_owned(), customer_id: None, at, body, stage: None };
    ctx.emit_json(RESOLVED_TOPIC, loser_id, &resolved)
}
