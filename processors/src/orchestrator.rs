//! Orchestrator: decides, for every message request, whether and on which channel a
//! customer is messaged. This slice enforces consent: marketing purposes are opt-in
//! (not granted until a consent record grants them, unless `consent.defaults` says
//! otherwise), categories that need no marketing consent (transactional, service) go
//! out on the first requested channel. Each request is decided once (request ids are
//! remembered for the dedupe window); a send becomes a record on `decisions.<channel>`
//! with a deterministic decision id, a refusal a record on `decisions.suppressed`.
//!
//! Store `consent`: canonical id → every purpose's current state and its history.

use crate::processor::{Ctx, ProcessError, Processor, Record};
use crate::resolved::{absorbed, decode, incoming, on_merge, Kind, Resolved, RESOLVED_TOPIC};
use crate::task::ProcessorSpec;
use crate::topology::Topology;
use chorus_schemas::{ConsentChange, MessageRequest};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

pub const NAME: &str = "orchestrator";
pub const CONSENT_STORE: &str = "consent";
pub const REQUESTS_STORE: &str = "requests";
pub const SUPPRESSED_TOPIC: &str = "decisions.suppressed";
/// Consent history kept per customer.
const HISTORY_LIMIT: usize = 200;

pub fn spec(topology: &Topology) -> ProcessorSpec {
    let topology = Arc::new(topology.clone());
    let mut outputs: Vec<String> = topology.orchestration.channels.iter().map(|c| format!("decisions.{c}")).collect();
    outputs.push(SUPPRESSED_TOPIC.into());
    outputs.push(RESOLVED_TOPIC.into());
    ProcessorSpec {
        name: NAME,
        inputs: vec![RESOLVED_TOPIC.into()],
        stores: vec![CONSENT_STORE, REQUESTS_STORE],
        outputs,
        factory: Box::new(move || Box::new(Orchestrator { topology: topology.clone() })),
    }
}

pub struct Orchestrator {
    topology: Arc<Topology>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurposeState {
    pub granted: bool,
    pub at: i64,
    pub source: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentEntry {
    pub purpose: String,
    pub granted: bool,
    pub at: i64,
    pub source: Option<String>,
}

/// The orchestrator's record of a customer: consent, and the activity suppressions
/// look at.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConsentState {
    pub purposes: BTreeMap<String, PurposeState>,
    pub history: Vec<ConsentEntry>,
    #[serde(default)]
    pub activity: Activity,
}

/// When the customer last did what suppressions watch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    /// Event type → latest event time.
    pub last: BTreeMap<String, i64>,
}

impl Activity {
    pub fn record(&mut self, event_type: &str, at: i64) {
        let last = self.last.entry(event_type.to_owned()).or_insert(at);
        *last = (*last).max(at);
    }

    fn absorb(&mut self, other: &Activity) {
        for (event_type, at) in &other.last {
            self.record(event_type, *at);
        }
    }

    /// The first suppression of `category` in force at `now`, with its detail.
    pub fn suppressed(&self, category: &str, now: i64, topology: &Topology) -> Option<(String, String)> {
        topology.orchestration.suppressions.iter().filter(|s| s.categories.iter().any(|c| c == category)).find_map(
            |s| match (&s.after, s.duration, &s.from, &s.until) {
                (Some(after), Some(d), _, _) => {
                    let at = *self.last.get(after)?;
                    (at <= now && now < at.saturating_add(d.ms())).then(|| {
                        (s.reason.clone(), format!("{after} at {}, within {} h", rfc3339(at), d.ms() / 3_600_000))
                    })
                }
                (_, _, Some(from), Some(until)) => {
                    let opened = *self.last.get(from)?;
                    let open = self.last.get(until).is_none_or(|closed| *closed < opened);
                    open.then(|| (s.reason.clone(), format!("{from} at {} and no {until} since", rfc3339(opened))))
                }
                _ => None,
            },
        )
    }
}

impl ConsentState {
    /// Apply a change unless a later one for the purpose is already known.
    pub fn apply(&mut self, purpose: &str, granted: bool, at: i64, source: Option<String>) -> bool {
        if self.purposes.get(purpose).is_some_and(|p| p.at > at) {
            return false;
        }
        self.purposes.insert(purpose.to_owned(), PurposeState { granted, at, source: source.clone() });
        self.history.push(ConsentEntry { purpose: purpose.to_owned(), granted, at, source });
        self.history.sort_by_key(|h| h.at);
        if self.history.len() > HISTORY_LIMIT {
            let excess = self.history.len() - HISTORY_LIMIT;
            self.history.drain(..excess);
        }
        true
    }

    pub fn granted(&self, purpose: &str, topology: &Topology) -> bool {
        match self.purposes.get(purpose) {
            Some(p) => p.granted,
            None => topology.consent.defaults.get(purpose).copied().unwrap_or(false),
        }
    }

    /// Merge another customer's consent: per purpose, the latest change wins.
    pub fn absorb(&mut self, other: ConsentState) {
        self.activity.absorb(&other.activity);
        for h in other.history {
            self.apply(&h.purpose, h.granted, h.at, h.source);
        }
        for (purpose, state) in other.purposes {
            self.apply(&purpose, state.granted, state.at, state.source);
        }
    }
}

/// The decision a request gets.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Send { channel: String, reasons: Vec<String> },
    Suppress { reason: String, detail: String, channel: Option<String> },
}

/// Consent rules for one request, pure.
pub fn decide(request: &MessageRequest, consent: &ConsentState, now: i64, topology: &Topology) -> Decision {
    let decision = decide_consent(request, consent, topology);
    if let Decision::Send { channel, .. } = &decision {
        if let Some((reason, detail)) = consent.activity.suppressed(&request.category, now, topology) {
            return Decision::Suppress { reason, detail, channel: Some(channel.clone()) };
        }
    }
    decision
}

/// Consent alone: the first requested channel the request may use.
fn decide_consent(request: &MessageRequest, consent: &ConsentState, topology: &Topology) -> Decision {
    let orchestration = &topology.orchestration;
    let Some(category) = orchestration.categories.get(&request.category) else {
        return Decision::Suppress {
            reason: "unknown_category".into(),
            detail: format!("category {:?} is not declared", request.category),
            channel: None,
        };
    };
    if !category.needs_marketing_consent {
        let channel = request.channels[0].clone();
        return Decision::Send {
            reasons: vec![
                format!("category {} needs no marketing consent", request.category),
                format!("first requested channel: {channel}"),
            ],
            channel,
        };
    }
    let mut refused = Vec::new();
    for channel in &request.channels {
        let purpose = orchestration.channel_purposes.get(channel).map(String::as_str).unwrap_or("marketing_email");
        if consent.granted(purpose, topology) {
            return Decision::Send {
                channel: channel.clone(),
                reasons: vec![
                    format!("consent {purpose} granted"),
                    format!("first requested channel with consent: {channel}"),
                ],
            };
        }
        refused.push(format!("{channel} ({purpose})"));
    }
    // Every channel refused by the customer's own withdrawal: opted out; otherwise the
    // customer never gave consent (marketing is opt-in).
    let opted_out = request.channels.iter().all(|channel| {
        let purpose = orchestration.channel_purposes.get(channel).map(String::as_str).unwrap_or("marketing_email");
        consent.purposes.get(purpose).is_some_and(|p| !p.granted)
    });
    Decision::Suppress {
        reason: if opted_out { "opted_out".into() } else { "no_consent".into() },
        detail: format!("no consent for any requested channel: {}", refused.join(", ")),
        channel: request.channels.first().cloned(),
    }
}

fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| t.to_string()).unwrap_or_default()
}

impl Processor for Orchestrator {
    fn process(&mut self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError> {
        let Some(resolved) = incoming(ctx, record, NAME, CONSENT_STORE)? else { return Ok(()) };
        let id = resolved.canonical_id.clone();
        match resolved.kind {
            Kind::Consent => {
                let change: ConsentChange = decode(resolved.body)?;
                let mut state = ctx.get_json::<ConsentState>(CONSENT_STORE, &id)?.unwrap_or_default();
                if state.apply(&change.purpose, change.granted, resolved.at, change.source.clone()) {
                    ctx.put_json(CONSENT_STORE, &id, &state)?;
                }
                Ok(())
            }
            Kind::Request => {
                let request: MessageRequest = decode(resolved.body.clone())?;
                if ctx.get_bytes(REQUESTS_STORE, request.request_id.as_bytes())?.is_some() {
                    ctx.count("duplicates", "messages.requests");
                    return Ok(());
                }
                let expires = ctx.now.saturating_add(self.topology.dedupe.window.ms());
                ctx.put_bytes(REQUESTS_STORE, request.request_id.as_bytes(), &[], Some(expires))?;
                let consent = ctx.get_json::<ConsentState>(CONSENT_STORE, &id)?.unwrap_or_default();
                let decision = decide(&request, &consent, ctx.now.max(resolved.at), &self.topology);
                self.emit_decision(ctx, &resolved, &request, decision)
            }
            Kind::Merge => on_merge(ctx, NAME, CONSENT_STORE, resolved.body, None),
            Kind::Absorb => {
                let Some(other) = absorbed::<ConsentState>(resolved.body, NAME)? else { return Ok(()) };
                let mut state = ctx.get_json::<ConsentState>(CONSENT_STORE, &id)?.unwrap_or_default();
                state.absorb(other);
                ctx.put_json(CONSENT_STORE, &id, &state)
            }
            Kind::Event => {
                // Only the event types a suppression watches are recorded.
                let Some(event_type) = resolved.body.get("event_type").and_then(Value::as_str) else { return Ok(()) };
                if !self.topology.orchestration.suppressions.iter().any(|s| s.event_types().any(|t| t == event_type)) {
                    return Ok(());
                }
                let mut state = ctx.get_json::<ConsentState>(CONSENT_STORE, &id)?.unwrap_or_default();
                state.activity.record(event_type, resolved.at);
                ctx.put_json(CONSENT_STORE, &id, &state)
            }
            Kind::Tick | Kind::Recommendations => Ok(()),
        }
    }
}

impl Orchestrator {
    fn emit_decision(
        &self,
        ctx: &mut Ctx<'_>,
        resolved: &Resolved,
        request: &MessageRequest,
        decision: Decision,
    ) -> Result<(), ProcessError> {
        let id = &resolved.canonical_id;
        match decision {
            Decision::Send { channel, reasons } => {
                let decision_id = uuid::Uuid::new_v5(
                    &uuid::Uuid::NAMESPACE_OID,
                    format!("decision:{}:{channel}", request.request_id).as_bytes(),
                );
                let record = serde_json::json!({
                    "decision_id": decision_id.to_string(),
                    "request_id": request.request_id,
                    "canonical_id": id,
                    "customer_id": resolved.customer_id,
                    "campaign_id": request.campaign_id,
                    "journey_id": Value::Null,
                    "category": request.category,
                    "channel": channel,
                    "send_at": rfc3339(ctx.now.max(resolved.at)),
                    "content": {"content_id": request.content_id, "variables": request.variables},
                    "reasons": reasons,
                });
                ctx.count("decisions_sent", format!("{channel}/{}", request.category));
                ctx.emit_json(&format!("decisions.{channel}"), id, &record)
            }
            Decision::Suppress { reason, detail, channel } => {
                let record = serde_json::json!({
                    "request_id": request.request_id,
                    "canonical_id": id,
                    "customer_id": resolved.customer_id,
                    "campaign_id": request.campaign_id,
                    "channel": channel,
                    "reason": reason,
                    "detail": detail,
                    "timestamp": rfc3339(ctx.now.max(resolved.at)),
                });
                ctx.count("suppressions", reason.clone());
                ctx.emit_json(SUPPRESSED_TOPIC, id, &record)
            }
        }
    }
}
