//! Identity: the first stage. It validates raw input (events, message requests, consent
//! changes), normalises and guards their identifiers, and hands each input to the owner
//! of its most specific identifier, which resolves it to a canonical customer id, links
//! the other identifiers (deterministic matching), sends its traits to the blocking-key
//! owners (probabilistic matching) and emits it on `events.resolved` keyed by the
//! customer. The graph itself — identifiers, customers, merges, guards — is spread over
//! the partitions as described in [`graph`].
//!
//! Store `identity` keys: `id:<type>:<value>` → [`graph::IdState`];
//! `comp:<canonical>` → [`graph::Component`]; `fwd:<merged-away id>` → survivor;
//! `mbox:<owner>` → messages parked while an actor is frozen; `blk:<blocking key>` →
//! probabilistic candidates.

pub mod config;
pub mod graph;
pub mod identifier;
pub mod matching;
pub mod privacy;
pub mod train;

use crate::processor::{Ctx, ProcessError, Processor, Record};
use crate::resolved::{Kind, Resolved, RESOLVED_TOPIC};
use crate::task::ProcessorSpec;
use crate::topology::{Topology, CONSENT, EVENTS_RAW, IDENTITY_REPARTITION, MESSAGES_REQUESTS};
use chorus_schemas::{decode_avro, ConsentChange, Event, MessageRequest, AVRO_MAGIC};
pub use graph::{Component, IdState, LinkedIdentifier, MergeRecord};
use graph::{Envelope, Graph, Msg, ResolveMsg};
pub use identifier::{normalise, owner_key, Identifier, Refusal};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

pub const NAME: &str = "identity";
pub const STORE: &str = "identity";
pub const DEDUPE_STORE: &str = "dedupe";
pub const MERGES_TOPIC: &str = "identity.merges";
pub const GRAPH_TOPIC: &str = "identity.graph";
pub const REVIEW_TOPIC: &str = "identity.review";

pub fn spec(topology: &Topology) -> ProcessorSpec {
    let topology = Arc::new(topology.clone());
    ProcessorSpec {
        name: NAME,
        inputs: vec![
            EVENTS_RAW.into(),
            MESSAGES_REQUESTS.into(),
            CONSENT.into(),
            crate::privacy::REQUESTS_TOPIC.into(),
            IDENTITY_REPARTITION.into(),
        ],
        stores: vec![STORE, DEDUPE_STORE, privacy::SUPPRESSED_STORE],
        outputs: vec![
            RESOLVED_TOPIC.into(),
            MERGES_TOPIC.into(),
            GRAPH_TOPIC.into(),
            REVIEW_TOPIC.into(),
            IDENTITY_REPARTITION.into(),
            "events.dlq".into(),
        ],
        forwards: vec![],
        sub_topology: crate::subtopology::IDENTITY,
        factory: Box::new(move || {
            let suppression = privacy::Suppression::new(topology.privacy.hasher());
            Box::new(Identity { topology: topology.clone(), suppression })
        }),
    }
}

pub struct Identity {
    topology: Arc<Topology>,
    suppression: privacy::Suppression,
}

/// A deterministic canonical id for a customer first seen through `first` (in its
/// `generation`-th lineage: an unlinked identifier starts a new customer).
pub fn canonical_id_for(first: &Identifier, generation: u32) -> String {
    let name = if generation == 0 { first.label() } else { format!("{}#{generation}", first.label()) };
    let uuid = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes());
    format!("cus_{}", &uuid.simple().to_string()[..20])
}

/// Identifier labels to try, in order, for a path identifier: `type:value`, or a bare
/// value of any declared type (customer id, email, phone, ...).
pub fn lookup_labels(config: &config::IdentityConfig, identifier: &str) -> Vec<String> {
    let mut labels = Vec::new();
    if let Some((kind, value)) = identifier.split_once(':') {
        if let Ok(id) = Identifier::parse(config, kind, value) {
            labels.push(id.label());
        }
    }
    for ty in &config.types {
        if let Ok(id) = Identifier::parse(config, &ty.name, identifier) {
            if !labels.contains(&id.label()) {
                labels.push(id.label());
            }
        }
    }
    labels
}

/// The store key of an identifier's state.
pub fn identifier_key(label: &str) -> String {
    format!("id:{label}")
}

/// An operator's unlink as a message for the identity stage: key and value to produce
/// on the internal topic.
pub fn unlink_message(id: &Identifier, at: i64) -> (String, Vec<u8>) {
    let env = Envelope { at, msg: Msg::Unlink { id: id.clone() } };
    (id.owner_key().to_owned(), serde_json::to_vec(&env).unwrap_or_default())
}

impl Processor for Identity {
    fn init(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ProcessError> {
        self.suppression.load(ctx)
    }

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
        if record.topic == IDENTITY_REPARTITION {
            let env: Envelope = serde_json::from_slice(bytes)
                .map_err(|e| ProcessError::reject("invalid_identity_message", e.to_string()))?;
            return self.graph().handle(ctx, env);
        }
        if record.topic == crate::privacy::REQUESTS_TOPIC {
            return self.on_privacy_request(ctx, record, bytes);
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

/// Usable identifiers of an input, most specific first, and what was refused.
struct Extracted {
    identifiers: Vec<Identifier>,
    refused: Vec<String>,
}

impl Identity {
    fn graph(&self) -> Graph<'_> {
        Graph {
            config: &self.topology.identity,
            dedupe_ms: self.topology.dedupe.window.ms(),
            suppression: &self.suppression,
        }
    }

    /// An input naming an erased identifier is dropped before anything of it is kept:
    /// a dead letter without the payload, and the count.
    fn refuse_erased(&self, extracted: &Extracted) -> Result<(), ProcessError> {
        if !self.suppression.identifiers_held(&extracted.identifiers) {
            return Ok(());
        }
        Err(ProcessError::Redacted {
            reason: crate::privacy::ERASED_SUBJECT,
            detail:
                "names an identifier whose subject was erased (POST /v1/privacy/unsuppress or a new consent lifts it)"
                    .into(),
        })
    }

    /// A data subject request from `privacy.requests` (the HTTP API writes there too):
    /// validated, admitted to the status actor, and handed to the owner of the
    /// identifier it names. A bad one leaves a dead letter without its payload (it may
    /// name a person).
    fn on_privacy_request(&mut self, ctx: &mut Ctx<'_>, record: &Record, bytes: &[u8]) -> Result<(), ProcessError> {
        let invalid = |detail: String| ProcessError::Redacted { reason: "invalid_privacy_request", detail };
        let json = decode_input(bytes).map_err(|e| invalid(e.to_string()))?;
        let fallback = || {
            let name = format!("privacy:{}:{}:{}", record.topic, record.partition, record.offset);
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
        };
        let request = crate::privacy::PrivacyRequest::parse(
            &json,
            &self.topology.identity,
            fallback,
            record.timestamp,
            self.topology.limits.max_record_bytes,
        )
        .map_err(|e| invalid(format!("{} ({})", e, e.code)))?;
        let seen = privacy::dedupe_key("privacy", &request.request_id);
        if ctx.get_bytes(DEDUPE_STORE, seen.as_bytes())?.is_some() {
            ctx.count("duplicates", crate::privacy::REQUESTS_TOPIC);
            return Ok(());
        }
        let privacy = &self.topology.privacy;
        let keep =
            ctx.now.max(request.received_at).saturating_add(privacy.timeout.ms().max(self.topology.dedupe.window.ms()));
        ctx.put_bytes(DEDUPE_STORE, seen.as_bytes(), &[], Some(keep))?;
        let mut admit = crate::privacy::Report::new(&request.request_id, "admit");
        admit.admission = Some(crate::privacy::Admission {
            kind: request.kind,
            subject: self.suppression.hasher().hash(&request.identifier.label()),
            received_at: request.received_at,
            expected_completion: request.received_at.saturating_add(privacy.expected_completion.ms()),
            callback: request.status_callback_url.clone(),
        });
        admit.send(ctx)?;
        ctx.count("privacy_requests_admitted", request.kind.as_str());
        let msg = Msg::PrivacyLocate { order: Box::new(request.order()), id: request.identifier };
        let now = ctx.now;
        self.hand_over(ctx, now, msg)
    }

    /// Normalise and guard raw `(type, value)` pairs; count each refusal.
    fn extract<'v>(&self, ctx: &mut Ctx<'_>, raw: impl IntoIterator<Item = (&'v str, &'v str)>) -> Extracted {
        let config = &self.topology.identity;
        let mut out = Extracted { identifiers: Vec::new(), refused: Vec::new() };
        for (kind, value) in raw {
            match Identifier::parse(config, kind, value) {
                Ok(id) => {
                    if !out.identifiers.contains(&id) {
                        out.identifiers.push(id);
                    }
                }
                Err(refusal) => {
                    ctx.count("identifier_refusals", refusal.label());
                    out.refused.push(refusal.explain(kind, value));
                }
            }
        }
        out.identifiers.sort_by(|a, b| anchor_order(config, a, b));
        out
    }

    fn require_identifiers(&self, what: &str, extracted: &Extracted) -> Result<(), ProcessError> {
        if !extracted.identifiers.is_empty() {
            return Ok(());
        }
        let declared: Vec<&str> = self.topology.identity.types.iter().map(|t| t.name.as_str()).collect();
        let mut detail = format!("{what} carries no usable identifier (declared types: {declared:?})");
        if !extracted.refused.is_empty() {
            detail.push_str(&format!("; refused: {}", extracted.refused.join("; ")));
        }
        Err(ProcessError::reject("no_identifier", detail))
    }

    /// Hand an input to the owner of its most specific identifier: at once when that is
    /// this partition (producers keying by [`partition_key`]), else through the topic.
    fn resolve(&self, ctx: &mut Ctx<'_>, at: i64, resolve: ResolveMsg) -> Result<(), ProcessError> {
        self.hand_over(ctx, at, Msg::Resolve(Box::new(resolve)))
    }

    /// Hand a message to its owner: at once when that is this partition, else through
    /// the internal topic.
    fn hand_over(&self, ctx: &mut Ctx<'_>, at: i64, msg: Msg) -> Result<(), ProcessError> {
        let owner =
            crate::partition::partition_for(graph::route(&msg).as_bytes(), ctx.partitions(IDENTITY_REPARTITION));
        if owner == ctx.partition {
            return self.graph().handle(ctx, Envelope { at, msg });
        }
        graph::send(ctx, at, msg)
    }

    /// Resolve a message request or consent change by the identifiers it names.
    fn resolve_named(
        &self,
        ctx: &mut Ctx<'_>,
        what: &str,
        kind: Kind,
        named: Vec<(&str, &str)>,
        body: Value,
        at: i64,
    ) -> Result<(), ProcessError> {
        let extracted = self.extract(ctx, named);
        self.require_identifiers(what, &extracted)?;
        if kind == Kind::Consent && body.get("granted").and_then(Value::as_bool) == Some(true) {
            // A new consent is the subject coming back: lift the suppression first (on
            // every partition, before the consent itself is resolved).
            self.graph().release(ctx, at, &extracted.identifiers)?;
        }
        self.refuse_erased(&extracted)?;
        self.resolve(ctx, at, ResolveMsg::new(kind, extracted.identifiers, body))
    }

    fn on_event(&mut self, ctx: &mut Ctx<'_>, json: &Value) -> Result<(), ProcessError> {
        let mut event = Event::from_json(json).map_err(|e| ProcessError::reject("invalid_event", e.to_string()))?;
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
        let extracted = self.extract(ctx, raw_identifiers(&event));
        self.require_identifiers("the event", &extracted)?;
        self.refuse_erased(&extracted)?;
        // Downstream stages see the identifiers as the graph knows them.
        event.customer_id = None;
        event.anonymous_id = None;
        event.identifiers = BTreeMap::new();
        for id in &extracted.identifiers {
            match id.kind.as_str() {
                "customer_id" => event.customer_id = Some(id.value.clone()),
                "anonymous_id" => event.anonymous_id = Some(id.value.clone()),
                _ => {
                    event.identifiers.insert(id.kind.clone(), id.value.clone());
                }
            }
        }
        let model = &self.topology.identity.probabilistic;
        // Only inputs that describe the person (traits) are matched: page views sharing an
        // office's IP and browser must not flood the candidate blocks.
        let match_fields = if model.enabled && !event.traits.is_empty() {
            let fields = matching::extract_fields(model, json);
            (!fields.is_empty()).then_some(fields)
        } else {
            None
        };
        let body = serde_json::to_value(&event).unwrap_or(Value::Null);
        let resolve = ResolveMsg {
            event_id: Some(event.event_id.clone()),
            match_fields,
            ..ResolveMsg::new(Kind::Event, extracted.identifiers, body)
        };
        self.resolve(ctx, event.timestamp_ms, resolve)
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
        let body = serde_json::to_value(&request).unwrap_or(Value::Null);
        let named = named(request.customer_id.as_deref(), &request.identifiers);
        self.resolve_named(ctx, "the request", Kind::Request, named, body, request.timestamp_ms)
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
        let body = serde_json::to_value(&change).unwrap_or(Value::Null);
        let named = named(change.customer_id.as_deref(), &change.identifiers);
        self.resolve_named(ctx, "the consent change", Kind::Consent, named, body, change.timestamp_ms)
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
}

/// The raw `(type, value)` identifiers an event carries: `customer_id`, `anonymous_id`,
/// `context.device_id`, `identifiers`, and an identify event's `email`/`phone` traits.
pub fn raw_identifiers(event: &Event) -> Vec<(&str, &str)> {
    let mut raw: Vec<(&str, &str)> = Vec::new();
    if let Some(c) = &event.customer_id {
        raw.push(("customer_id", c));
    }
    if let Some(a) = &event.anonymous_id {
        raw.push(("anonymous_id", a));
    }
    if let Some(d) = &event.context.device_id {
        raw.push(("device_id", d));
    }
    for (kind, value) in &event.identifiers {
        raw.push((kind, value));
    }
    if event.event_type == "identify" {
        for kind in ["email", "phone"] {
            if let Some(v) = event.traits.get(kind).and_then(Value::as_str) {
                if !event.identifiers.contains_key(kind) {
                    raw.push((kind, v));
                }
            }
        }
    }
    raw
}

/// The key to produce an event under: the plain (normalised) value of its most specific
/// usable identifier — what producers naturally key by. Keyed so, it lands on the
/// partition that owns that identifier and is resolved without a hop through the
/// internal topic.
pub fn partition_key(config: &config::IdentityConfig, event: &Event) -> Option<String> {
    anchor(config, event).map(|id| id.owner_key().to_owned())
}

/// The identifier an event resolves through: its most specific usable one.
pub fn anchor(config: &config::IdentityConfig, event: &Event) -> Option<Identifier> {
    raw_identifiers(event)
        .into_iter()
        .filter_map(|(kind, value)| Identifier::parse(config, kind, value).ok())
        .min_by(|a, b| anchor_order(config, a, b))
}

/// Most specific type first; two values of one type by value, never by input order:
/// two events naming the same pair in opposite orders must anchor on the same
/// identifier, or each can wait for the other forever.
fn anchor_order(config: &config::IdentityConfig, a: &Identifier, b: &Identifier) -> std::cmp::Ordering {
    config.rank(&a.kind).cmp(&config.rank(&b.kind)).then_with(|| a.value.cmp(&b.value))
}

/// [`partition_key`] for message requests and consent changes.
pub fn named_partition_key(
    config: &config::IdentityConfig,
    customer_id: Option<&str>,
    identifiers: &BTreeMap<String, String>,
) -> Option<String> {
    named(customer_id, identifiers)
        .into_iter()
        .filter_map(|(kind, value)| Identifier::parse(config, kind, value).ok())
        .min_by(|a, b| anchor_order(config, a, b))
        .map(|id| id.owner_key().to_owned())
}

fn named<'a>(customer_id: Option<&'a str>, map: &'a BTreeMap<String, String>) -> Vec<(&'a str, &'a str)> {
    let mut out: Vec<(&str, &str)> = customer_id.map(|c| ("customer_id", c)).into_iter().collect();
    out.extend(map.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    out
}
