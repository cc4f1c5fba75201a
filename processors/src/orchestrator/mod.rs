//! Orchestrator: decides, for every message request, whether, when and on which channel
//! a customer is messaged (the rules are in [`decide`]). Each request is decided once
//! (request ids are remembered for the dedupe window). A send becomes a record on
//! `decisions.<channel>` with a deterministic decision id (the channel service's
//! idempotency key), a refusal a record on `decisions.suppressed` with its reason code,
//! a request held back for quiet hours or the coordination window a record on
//! `decisions.deferred`; held requests wait in the customer's record and a durable timer
//! decides them again when their wait ends, after a restart or a rebalance too.
//!
//! A send carries its content rendered for the chosen channel: the item comes from the
//! `content` topic (broadcast to every partition by the catalog stage) or
//! topology.yaml, the personalisation from the customer's profile, which this stage
//! mirrors from the compacted `profiles` topic (co-partitioned with `events.resolved`)
//! and uses only while the customer consents to personalisation.
//!
//! Store `consent`: canonical id → the customer's [`Recipient`] record (consent and its
//! history, activity, reach, sends, waiting requests). Store `requests`: request ids
//! seen within the dedupe window. Store `customers`: canonical id → what templates see
//! of the customer ([`crate::profile::template_view`]). Store `content`: content id →
//! item from the `content` topic.

pub mod config;
pub mod decide;
pub mod quiet_hours;
pub mod recipient;

pub use decide::{ContentFailure, Outcome, Verdict};
pub use recipient::{Hold, Pending, PurposeState, Recipient};

use crate::content::ContentItem;
use crate::processor::{Ctx, ProcessError, Processor, Record};
use crate::resolved::{absorbed, decode, incoming, on_merge, Kind, RESOLVED_TOPIC};
use crate::task::ProcessorSpec;
use crate::topology::{Topology, PROFILES};
use chorus_schemas::{ConsentChange, MessageRequest};
use recipient::rfc3339;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

pub const NAME: &str = "orchestrator";
pub const CONSENT_STORE: &str = "consent";
pub const REQUESTS_STORE: &str = "requests";
pub const CUSTOMERS_STORE: &str = "customers";
pub const CONTENT_STORE: &str = "content";
/// The consent purpose that allows personalised content.
pub const PERSONALISATION: &str = "personalisation";
pub const SUPPRESSED_TOPIC: &str = "decisions.suppressed";
pub const DEFERRED_TOPIC: &str = "decisions.deferred";

pub fn spec(topology: &Topology) -> ProcessorSpec {
    let topology = Arc::new(topology.clone());
    let mut outputs: Vec<String> = topology.orchestration.channels.iter().map(|c| format!("decisions.{c}")).collect();
    outputs.extend([SUPPRESSED_TOPIC.into(), DEFERRED_TOPIC.into(), RESOLVED_TOPIC.into()]);
    ProcessorSpec {
        name: NAME,
        inputs: vec![RESOLVED_TOPIC.into(), PROFILES.into()],
        stores: vec![CONSENT_STORE, REQUESTS_STORE, CUSTOMERS_STORE, CONTENT_STORE],
        outputs,
        forwards: vec![],
        sub_topology: crate::subtopology::CUSTOMER,
        factory: Box::new(move || {
            let erased = crate::privacy::Erased::new(&topology.privacy, CONSENT_STORE);
            Box::new(Orchestrator { topology: topology.clone(), erased })
        }),
    }
}

/// Ask the orchestrator to decide a message request for customer `id` (journeys and
/// campaigns do): a request record on `events.resolved` addressed to it, keyed by the
/// customer, so it is decided in order with their events and consent changes.
pub fn ask(ctx: &mut Ctx<'_>, id: &str, customer_id: Option<String>, request: Value) -> Result<(), ProcessError> {
    let record = crate::resolved::Resolved {
        kind: Kind::Request,
        canonical_id: id.to_owned(),
        customer_id,
        at: ctx.now,
        body: request,
        stage: Some(NAME.to_owned()),
    };
    ctx.emit_json(RESOLVED_TOPIC, id, &record)
}

pub struct Orchestrator {
    topology: Arc<Topology>,
    erased: crate::privacy::Erased,
}

impl Processor for Orchestrator {
    fn process(&mut self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError> {
        if record.topic == PROFILES {
            return on_profile(ctx, record, &self.erased);
        }
        let Some(resolved) = incoming(ctx, record, NAME, CONSENT_STORE, &self.erased)? else { return Ok(()) };
        let id = resolved.canonical_id.clone();
        let config = &self.topology.orchestration;
        match resolved.kind {
            Kind::Consent => {
                let change: ConsentChange = decode(&resolved.body)?;
                let mut recipient = self.load(ctx, &id)?;
                if recipient.apply(&change.purpose, change.granted, resolved.at, change.source.clone()) {
                    ctx.put_json(CONSENT_STORE, &id, &recipient)?;
                }
                Ok(())
            }
            Kind::Request => {
                let request: MessageRequest = decode(&resolved.body)?;
                if ctx.get_bytes(REQUESTS_STORE, request.request_id.as_bytes())?.is_some() {
                    ctx.count("duplicates", "messages.requests");
                    return Ok(());
                }
                let expires = ctx.now.saturating_add(self.topology.dedupe.window.ms());
                ctx.put_bytes(REQUESTS_STORE, request.request_id.as_bytes(), &[], Some(expires))?;
                let mut recipient = self.load(ctx, &id)?;
                recipient.remember_request(&request.request_id);
                // A request naming the customer by email or phone says where to reach them.
                recipient.reach.learn(&resolved.body, resolved.at, config);
                let arrival = Pending {
                    request,
                    customer_id: resolved.customer_id.clone(),
                    arrived: ctx.now,
                    due: ctx.now,
                    hold: None,
                };
                self.decide(ctx, &id, recipient, vec![arrival])
            }
            Kind::Merge => on_merge(ctx, NAME, CONSENT_STORE, &resolved.body, None),
            Kind::Absorb => {
                let Some(other) = absorbed::<Recipient>(&resolved.body, NAME)? else { return Ok(()) };
                let mut recipient = self.load(ctx, &id)?;
                recipient.absorb(other);
                ctx.put_json(CONSENT_STORE, &id, &recipient)?;
                // The absorbed customer's waiting requests wait here now.
                if let Some(due) = recipient.next_due() {
                    ctx.schedule(due, id.as_bytes(), &[])?;
                }
                Ok(())
            }
            Kind::Event => {
                let event_type = resolved.body.get("event_type").and_then(Value::as_str).unwrap_or_default();
                let watched = config.suppressions.iter().any(|s| s.event_types().any(|t| t == event_type));
                let mut recipient = self.load(ctx, &id)?;
                let learned = recipient.reach.learn(&resolved.body, resolved.at, config);
                if watched {
                    recipient.activity.record(event_type, resolved.at);
                }
                if watched || learned {
                    ctx.put_json(CONSENT_STORE, &id, &recipient)?;
                }
                Ok(())
            }
            Kind::Content => {
                let change: crate::resolved::CatalogBody = decode(&resolved.body)?;
                if change.value.is_null() {
                    ctx.delete(CONTENT_STORE, &change.id)
                } else {
                    ctx.put_json(CONTENT_STORE, &change.id, &change.value)
                }
            }
            Kind::Privacy => self.on_privacy(ctx, &id, decode(&resolved.body)?),
            Kind::Tick | Kind::Recommendations | Kind::Campaign | Kind::PrivacyReport => Ok(()),
        }
    }

    fn init(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ProcessError> {
        self.erased.load(ctx)
    }

    fn on_expired(&mut self, _ctx: &mut Ctx<'_>, store: &str, key: &[u8]) -> Result<(), ProcessError> {
        if store == CONSENT_STORE {
            self.erased.forget_expired(key);
        }
        Ok(())
    }

    /// A customer's waiting requests are due: decide them together.
    fn on_timer(&mut self, ctx: &mut Ctx<'_>, key: &[u8], _payload: &[u8]) -> Result<(), ProcessError> {
        let id = String::from_utf8_lossy(key).into_owned();
        // Gone when the customer merged away; their waiting requests moved with them.
        let Some(mut recipient) = ctx.get_json::<Recipient>(CONSENT_STORE, &id)? else { return Ok(()) };
        let due = recipient.take_due(ctx.now);
        if due.is_empty() {
            return Ok(());
        }
        self.decide(ctx, &id, recipient, due)
    }
}

impl Orchestrator {
    /// A data subject request at `id`: the customer's record (consent and its history,
    /// reach, sends, waiting requests) and template view are exported or deleted; waiting
    /// requests are never decided.
    fn on_privacy(&mut self, ctx: &mut Ctx<'_>, id: &str, order: crate::privacy::Order) -> Result<(), ProcessError> {
        let (waiting, requests) = ctx
            .read_json(CONSENT_STORE, id, |r: &Recipient| (r.pending.len() as u64, r.requests.clone()))?
            .unwrap_or_default();
        let view = ctx.get_json::<Value>(CUSTOMERS_STORE, id)?;
        let (mut report, state) = crate::privacy::stage_order(ctx, NAME, CONSENT_STORE, &mut self.erased, &order, id)?;
        if order.erases() {
            report.stopped("deferred_messages", waiting);
            let mut seen = 0;
            for request_id in &requests {
                seen += u64::from(ctx.delete_expiring(REQUESTS_STORE, request_id.as_bytes())?);
            }
            report.deleted(NAME, REQUESTS_STORE, seen);
            report.deleted(NAME, CUSTOMERS_STORE, crate::privacy::delete_counted(ctx, CUSTOMERS_STORE, id)?);
        } else if order.kind.exports() {
            report.export = Some(serde_json::json!({"recipient": state, "template_view": view}));
        }
        report.send(ctx)
    }

    fn load(&self, ctx: &mut Ctx<'_>, id: &str) -> Result<Recipient, ProcessError> {
        Ok(ctx.get_json::<Recipient>(CONSENT_STORE, id)?.unwrap_or_default())
    }

    /// Decide `items`, store the customer's record, emit every outcome and arm the timer
    /// of what still waits.
    fn decide(
        &self,
        ctx: &mut Ctx<'_>,
        id: &str,
        mut recipient: Recipient,
        items: Vec<Pending>,
    ) -> Result<(), ProcessError> {
        let content = self.content_for(ctx, id, &recipient, &items)?;
        let outcomes = decide::decide(&mut recipient, items, ctx.now, &self.topology, &content);
        ctx.put_json(CONSENT_STORE, id, &recipient)?;
        if let Some(due) = recipient.next_due() {
            ctx.schedule(due, id.as_bytes(), &[])?;
        }
        for outcome in outcomes {
            self.emit(ctx, id, outcome)?;
        }
        Ok(())
    }

    /// The content items `items` name and what templates may see of the customer.
    fn content_for(
        &self,
        ctx: &mut Ctx<'_>,
        id: &str,
        recipient: &Recipient,
        items: &[Pending],
    ) -> Result<Content<'_>, ProcessError> {
        let mut found = BTreeMap::new();
        for content_id in items.iter().filter_map(|p| p.request.content_id.as_deref()) {
            if found.contains_key(content_id) {
                continue;
            }
            let item = match ctx.get_bytes(CONTENT_STORE, content_id.as_bytes())? {
                Some(bytes) => crate::cache::decode::<ContentItem>(&bytes).ok(),
                None => self.topology.content.item(content_id).cloned(),
            };
            found.insert(content_id.to_owned(), item);
        }
        let personalised = recipient.granted(PERSONALISATION, &self.topology);
        let view = if personalised { ctx.get_json::<Value>(CUSTOMERS_STORE, id)? } else { None };
        let customer = template_customer(id, items.first().and_then(|p| p.customer_id.as_deref()), view);
        Ok(Content { items: found, customer, topology: &self.topology })
    }

    fn emit(&self, ctx: &mut Ctx<'_>, id: &str, outcome: Outcome) -> Result<(), ProcessError> {
        let Outcome { request, customer_id, verdict, coordinated } = outcome;
        let now = rfc3339(ctx.now);
        if !matches!(verdict, Verdict::Hold { .. }) {
            ctx.count("coordination", if coordinated { "coordinated" } else { "uncoordinated" });
        }
        // What every decision record says of its request.
        let mut record = serde_json::json!({
            "request_id": request.request_id,
            "canonical_id": id,
            "customer_id": customer_id,
            "campaign_id": request.campaign_id,
            "journey_id": request.journey_id,
            "category": request.category,
        });
        let (topic, fields) = match verdict {
            Verdict::Send { channel, to, reasons, content } => {
                let decision_id = uuid::Uuid::new_v5(
                    &uuid::Uuid::NAMESPACE_OID,
                    format!("decision:{}:{channel}", request.request_id).as_bytes(),
                );
                ctx.count("decisions_sent", format!("{channel}/{}", request.category));
                let fields = serde_json::json!({
                    "decision_id": decision_id.to_string(),
                    "channel": channel,
                    "to": to,
                    "send_at": now,
                    "content": content,
                    "reasons": reasons,
                });
                (format!("decisions.{channel}"), fields)
            }
            Verdict::Hold { hold, until, detail } => {
                ctx.count("deferrals", hold.reason());
                let fields = serde_json::json!({
                    "channels": request.channels,
                    "reason": hold.reason(),
                    "detail": detail,
                    "deferred_until": rfc3339(until),
                    "timestamp": now,
                });
                (DEFERRED_TOPIC.to_owned(), fields)
            }
            Verdict::Refuse { reason, detail, channel } => {
                ctx.count("suppressions", reason.clone());
                let fields =
                    serde_json::json!({"channel": channel, "reason": reason, "detail": detail, "timestamp": now});
                (SUPPRESSED_TOPIC.to_owned(), fields)
            }
        };
        if let (Some(record), Value::Object(fields)) = (record.as_object_mut(), fields) {
            record.extend(fields);
        }
        ctx.emit_json(&topic, id, &record)
    }
}

/// What templates see as `customer`: the profile view (`None` without personalisation
/// consent, or before the profile arrived), else who the message is for and no more.
pub fn template_customer(id: &str, customer_id: Option<&str>, view: Option<Value>) -> Value {
    view.unwrap_or_else(|| serde_json::json!({"canonical_id": id, "customer_id": customer_id}))
}

/// An item rendered for a channel as a decision carries it (with its `content_id`).
pub fn render_content(
    item: &ContentItem,
    channel: &str,
    customer: &Value,
    vars: &Value,
    config: &crate::content::ContentConfig,
) -> Result<Value, crate::content::ContentError> {
    let mut rendered = crate::content::render(item, channel, customer, vars, config)?;
    if let Value::Object(fields) = &mut rendered {
        fields.insert("content_id".into(), Value::String(item.id.clone()));
    }
    Ok(rendered)
}

/// Mirror a `profiles` record: what templates see of the customer.
fn on_profile(ctx: &mut Ctx<'_>, record: &Record, erased: &crate::privacy::Erased) -> Result<(), ProcessError> {
    let Some(key) = record.key.as_deref() else { return Ok(()) };
    let id = String::from_utf8_lossy(key).into_owned();
    if record.value.is_some() && erased.holds(&id, ctx.now) {
        // A snapshot written before the customer was erased.
        ctx.count("privacy_dropped", NAME);
        return Ok(());
    }
    match record.value.as_deref() {
        None => ctx.delete(CUSTOMERS_STORE, &id),
        Some(bytes) => {
            let view = crate::profile::template_view_of(bytes)
                .map_err(|e| ProcessError::reject("invalid_profile", format!("profiles record: {e}")))?;
            // Most events change nothing templates see: skip the write and its changelog record.
            if ctx.read_json(CUSTOMERS_STORE, &id, |stored: &Value| *stored == view)? == Some(true) {
                return Ok(());
            }
            ctx.put_json_owned(CUSTOMERS_STORE, &id, view)
        }
    }
}

/// The content a batch of requests names, and the customer it is rendered for.
struct Content<'a> {
    /// Content id → the item (`None`: no such item).
    items: BTreeMap<String, Option<ContentItem>>,
    customer: Value,
    topology: &'a Topology,
}

impl decide::Render for Content<'_> {
    fn missing(&self, request: &MessageRequest) -> Option<ContentFailure> {
        let content_id = request.content_id.as_deref()?;
        matches!(self.items.get(content_id), None | Some(None)).then(|| ContentFailure {
            reason: "unknown_content",
            detail: format!("content item {content_id:?} does not exist"),
        })
    }

    /// The item rendered with the customer and the request's variables; a request
    /// without a content id carries its variables for the channel service to render.
    fn render(&self, request: &MessageRequest, channel: &str) -> Result<Value, ContentFailure> {
        let Some(content_id) = request.content_id.as_deref() else {
            return Ok(serde_json::json!({"content_id": null, "variables": request.variables}));
        };
        let item = self.items.get(content_id).and_then(Option::as_ref).ok_or_else(|| ContentFailure {
            reason: "unknown_content",
            detail: format!("content item {content_id:?} does not exist"),
        })?;
        render_content(item, channel, &self.customer, &request.variables, &self.topology.content)
            .map_err(|e| ContentFailure { reason: "content_error", detail: e.to_string() })
    }
}
