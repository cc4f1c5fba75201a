//! Journeys: multi-step journeys from topology.yaml, one state per customer per
//! journey. A trigger event enters the customer; steps run in order until one waits (a
//! durable timer, so a restart or a rebalance resumes it) or the journey ends; a goal
//! event ends it as converted at any time. Sends go through the orchestrator (as
//! requests on `events.resolved` addressed to it), so consent, caps and quiet hours
//! apply. Every entry, step, exit (with its reason) and conversion is a record on
//! `journeys.events`.
//!
//! Checks read the customer's live context: this stage also reads the compacted
//! `context` topic (co-partitioned with `events.resolved`) and keeps the latest
//! snapshot of each customer, as a Kafka Streams table join would — as its text,
//! parsed only when a condition or check reads it.
//!
//! Store `journeys`: canonical id → [`Customer`].

pub mod config;

use crate::json::JsonText;
use crate::processor::{Ctx, ProcessError, Processor, Record};
use crate::resolved::{absorbed, decode, incoming, on_merge, Kind, Resolved, RESOLVED_TOPIC};
use crate::rules::RuleSet;
use crate::task::ProcessorSpec;
use crate::topology::Topology;
use config::{EventMatch, JourneyConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub const NAME: &str = "journeys";
pub const STORE: &str = "journeys";
pub const TOPIC: &str = "journeys.events";
pub const CONTEXT_TOPIC: &str = "context";
/// Most steps one customer may run without waiting (a `goto` loop).
const MAX_STEPS_AT_ONCE: usize = 100;

pub fn spec(topology: &Topology) -> ProcessorSpec {
    let journeys = Arc::new(Journeys::compile(topology));
    let privacy = topology.privacy.clone();
    ProcessorSpec {
        name: NAME,
        inputs: vec![RESOLVED_TOPIC.into(), CONTEXT_TOPIC.into()],
        stores: vec![STORE],
        outputs: vec![TOPIC.into(), RESOLVED_TOPIC.into()],
        forwards: vec![TOPIC.into()],
        sub_topology: crate::subtopology::CUSTOMER,
        factory: Box::new(move || {
            Box::new(JourneyStage { journeys: journeys.clone(), erased: crate::privacy::Erased::new(&privacy, STORE) })
        }),
    }
}

/// The journeys with every condition compiled once.
struct Journeys {
    journeys: Vec<JourneyConfig>,
    /// Condition text → compiled rule.
    conditions: BTreeMap<String, RuleSet>,
}

impl Journeys {
    fn compile(topology: &Topology) -> Journeys {
        let mut conditions = BTreeMap::new();
        for journey in &topology.journeys {
            for condition in journey.conditions() {
                // Validated at load; a condition that does not compile never holds.
                let rule = RuleSet::compile([condition]).unwrap_or_else(|_| RuleSet::empty());
                conditions.insert(condition.to_owned(), rule);
            }
        }
        Journeys { journeys: topology.journeys.clone(), conditions }
    }

    fn holds(&self, condition: &str, vars: &[(&str, &Value)]) -> bool {
        self.conditions.get(condition).is_some_and(|rule| !rule.matching(vars).is_empty())
    }

    fn matches(&self, m: &EventMatch, event: &Value, context: &Context) -> bool {
        event.get("event_type").and_then(Value::as_str) == Some(m.event.as_str())
            && m.condition.as_deref().is_none_or(|c| self.holds(c, &[("event", event), ("context", context.value())]))
    }
}

/// The customer's context as conditions and checks see it: parsed on first use, since
/// most events and steps look only at the event.
struct Context {
    text: Option<JsonText>,
    value: OnceCell<Value>,
}

impl Context {
    fn new(text: Option<JsonText>) -> Context {
        Context { text, value: OnceCell::new() }
    }

    fn value(&self) -> &Value {
        self.value.get_or_init(|| self.text.as_ref().map_or(Value::Null, JsonText::value))
    }
}

struct JourneyStage {
    journeys: Arc<Journeys>,
    erased: crate::privacy::Erased,
}

/// What this stage keeps of a customer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    /// Latest `context` snapshot (none before the first), kept as its text: shared,
    /// not copied, when the customer's state is, and parsed only when a check reads it.
    #[serde(default)]
    pub context: Option<JsonText>,
    /// Journey name → the customer's place in it.
    #[serde(default)]
    pub active: BTreeMap<String, Instance>,
    /// Journey name → when the customer last entered it (re-entry).
    #[serde(default)]
    pub entered: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub entered_at: i64,
    /// Index of the current step.
    pub step: usize,
    /// When the current `wait` ends.
    pub due: Option<i64>,
    pub customer_id: Option<String>,
    /// Channels the customer used while in the journey (cross-channel conversion).
    pub channels: BTreeSet<String>,
}

impl Customer {
    fn is_empty(&self) -> bool {
        self.context.is_none() && self.active.is_empty() && self.entered.is_empty()
    }
}

/// How an instance ends.
enum End {
    Exited(String),
    Converted,
}

impl Processor for JourneyStage {
    fn process(&mut self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError> {
        if record.topic == CONTEXT_TOPIC {
            return self.on_context(ctx, record);
        }
        let Some(resolved) = incoming(ctx, record, NAME, STORE, &self.erased)? else { return Ok(()) };
        let id = resolved.canonical_id.clone();
        match resolved.kind {
            Kind::Event => self.on_event(ctx, &resolved),
            Kind::Merge => on_merge(ctx, NAME, STORE, &resolved.body, None),
            Kind::Absorb => {
                let Some(other) = absorbed::<Customer>(&resolved.body, NAME)? else { return Ok(()) };
                let mut customer = self.load(ctx, &id)?;
                for (name, instance) in other.active {
                    // One state per customer per journey: the earlier entry goes on.
                    match customer.active.get(&name) {
                        Some(mine) if mine.entered_at <= instance.entered_at => {
                            self.emit(ctx, &id, &name, &instance, "exited", Some("merged"))?;
                        }
                        _ => {
                            if let Some(due) = instance.due {
                                ctx.schedule(due, id.as_bytes(), &[])?;
                            }
                            customer.active.insert(name, instance);
                        }
                    }
                }
                for (name, at) in other.entered {
                    crate::time::keep_latest(&mut customer.entered, name, at);
                }
                ctx.put_json_owned(STORE, &id, customer)
            }
            Kind::Privacy => {
                // Erasure: the waits are cancelled and no `journeys.events` record says
                // the customer left (it would name them).
                let order: crate::privacy::Order = decode(&resolved.body)?;
                let (mut report, state) = crate::privacy::stage_order(ctx, NAME, STORE, &mut self.erased, &order, &id)?;
                if order.kind.exports() {
                    report.export = state.map(|mut customer| {
                        if let Some(map) = customer.as_object_mut() {
                            // A copy of the context stage's record, exported by it.
                            map.remove("context");
                        }
                        customer
                    });
                }
                report.send(ctx)
            }
            Kind::Request
            | Kind::Consent
            | Kind::Tick
            | Kind::Recommendations
            | Kind::Content
            | Kind::Campaign
            | Kind::PrivacyReport => Ok(()),
        }
    }

    fn init(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ProcessError> {
        self.erased.load(ctx)
    }

    fn on_expired(&mut self, _ctx: &mut Ctx<'_>, _store: &str, key: &[u8]) -> Result<(), ProcessError> {
        self.erased.forget_expired(key);
        Ok(())
    }

    /// Waits that ended: go on with the steps after them.
    fn on_timer(&mut self, ctx: &mut Ctx<'_>, key: &[u8], _payload: &[u8]) -> Result<(), ProcessError> {
        let id = String::from_utf8_lossy(key).into_owned();
        let Some(mut customer) = ctx.get_json::<Customer>(STORE, &id)? else { return Ok(()) };
        let due: Vec<String> = customer
            .active
            .iter()
            .filter(|(_, i)| i.due.is_some_and(|d| d <= ctx.now))
            .map(|(n, _)| n.clone())
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        for name in due {
            let Some(journey) = self.journey(&name) else { continue };
            if let Some(instance) = customer.active.get_mut(&name) {
                instance.due = None;
                instance.step += 1;
            }
            self.run(ctx, &id, &mut customer, journey)?;
        }
        ctx.put_json_owned(STORE, &id, customer)
    }
}

impl JourneyStage {
    fn load(&self, ctx: &mut Ctx<'_>, id: &str) -> Result<Customer, ProcessError> {
        Ok(ctx.get_json::<Customer>(STORE, id)?.unwrap_or_default())
    }

    fn journey(&self, name: &str) -> Option<&JourneyConfig> {
        self.journeys.journeys.iter().find(|j| j.name == name)
    }

    fn on_context(&self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError> {
        let Some(key) = record.key.as_deref() else { return Ok(()) };
        let id = String::from_utf8_lossy(key).into_owned();
        if self.erased.holds(&id, ctx.now) {
            // A snapshot written before the customer was erased.
            ctx.count("privacy_dropped", NAME);
            return Ok(());
        }
        let snapshot = match record.value.as_deref() {
            None => None,
            Some(bytes) => Some(
                JsonText::parse(bytes)
                    .map_err(|e| ProcessError::reject("invalid_context", format!("context record: {e}")))?,
            ),
        };
        let mut customer = self.load(ctx, &id)?;
        customer.context = snapshot.filter(|s| s.text() != "null");
        if customer.is_empty() {
            ctx.delete(STORE, &id)
        } else {
            ctx.put_json_owned(STORE, &id, customer)
        }
    }

    fn on_event(&self, ctx: &mut Ctx<'_>, resolved: &Resolved) -> Result<(), ProcessError> {
        let id = &resolved.canonical_id;
        let event = &resolved.body;
        let mut customer = self.load(ctx, id)?;
        let context = Context::new(customer.context.clone());
        let mut changed = false;
        let channel = event.get("channel").and_then(Value::as_str).map(str::to_owned);
        for journey in &self.journeys.journeys {
            if let Some(instance) = customer.active.get_mut(&journey.name) {
                if let Some(channel) = &channel {
                    changed |= instance.channels.insert(channel.clone());
                }
                if journey.goal.as_ref().is_some_and(|g| self.journeys.matches(g, event, &context)) {
                    self.end(ctx, id, &mut customer, journey, End::Converted)?;
                    changed = true;
                }
                continue;
            }
            if !self.journeys.matches(&journey.trigger, event, &context) {
                continue;
            }
            let last = customer.entered.get(&journey.name).copied();
            let wait = journey.reentry_after.map_or(0, |d| d.ms());
            if last.is_some_and(|at| ctx.now < at.saturating_add(wait)) {
                continue;
            }
            let instance = Instance {
                entered_at: ctx.now,
                step: 0,
                due: None,
                customer_id: resolved.customer_id.clone(),
                channels: channel.iter().cloned().collect(),
            };
            self.emit(ctx, id, &journey.name, &instance, "entered", None)?;
            let first = journey.steps.first().map(|s| s.name(0)).unwrap_or_default();
            ctx.count("journey_events", format!("{}/entered/{first}", journey.name));
            customer.entered.insert(journey.name.clone(), ctx.now);
            customer.active.insert(journey.name.clone(), instance);
            self.run(ctx, id, &mut customer, journey)?;
            changed = true;
        }
        if changed {
            ctx.put_json(STORE, id, &customer)?;
        }
        Ok(())
    }

    /// Run the customer's steps of `journey` from the current one until a wait or the end.
    fn run(
        &self,
        ctx: &mut Ctx<'_>,
        id: &str,
        customer: &mut Customer,
        journey: &JourneyConfig,
    ) -> Result<(), ProcessError> {
        let context = Context::new(customer.context.clone());
        for _ in 0..MAX_STEPS_AT_ONCE {
            let Some(instance) = customer.active.get(&journey.name).cloned() else { return Ok(()) };
            let Some(step) = journey.steps.get(instance.step) else {
                return self.end(ctx, id, customer, journey, End::Exited("completed".into()));
            };
            let name = step.name(instance.step);
            self.emit(ctx, id, &journey.name, &instance, "step", None)?;
            ctx.count("journey_events", format!("{}/step/{name}", journey.name));
            let journey_view = json!({"name": journey.name, "entered_at": instance.entered_at, "step": name});
            let vars = [("context", context.value()), ("journey", &journey_view)];
            let mut next = instance.step + 1;
            if let Some(wait) = step.wait {
                let due = ctx.now.saturating_add(wait.ms());
                if let Some(i) = customer.active.get_mut(&journey.name) {
                    i.due = Some(due);
                }
                return ctx.schedule(due, id.as_bytes(), &[]);
            } else if let Some(check) = &step.check {
                if !self.journeys.holds(check, &vars) {
                    match step.otherwise.as_deref().unwrap_or("exit") {
                        "exit" => {
                            let reason = format!("{name} did not hold");
                            return self.end(ctx, id, customer, journey, End::Exited(reason));
                        }
                        target => next = journey.step_index(target).unwrap_or(journey.steps.len()),
                    }
                }
            } else if let Some(send) = &step.send {
                self.request(ctx, id, journey, &instance, &name, send)?;
            } else if let Some(branches) = &step.branch {
                if let Some(b) = branches.iter().find(|b| self.journeys.holds(&b.condition, &vars)) {
                    if b.goto == "exit" {
                        return self.end(ctx, id, customer, journey, End::Exited(format!("{name} branched to exit")));
                    }
                    next = journey.step_index(&b.goto).unwrap_or(journey.steps.len());
                }
            } else if let Some(reason) = &step.exit {
                return self.end(ctx, id, customer, journey, End::Exited(reason.clone()));
            }
            if let Some(i) = customer.active.get_mut(&journey.name) {
                i.step = next;
            }
        }
        self.end(ctx, id, customer, journey, End::Exited("too_many_steps".into()))
    }

    /// Ask the orchestrator to message the customer for this step.
    fn request(
        &self,
        ctx: &mut Ctx<'_>,
        id: &str,
        journey: &JourneyConfig,
        instance: &Instance,
        step: &str,
        send: &config::SendStep,
    ) -> Result<(), ProcessError> {
        let request_id = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("journey:{id}:{}:{}:{step}", journey.name, instance.entered_at).as_bytes(),
        );
        let body = json!({
            "request_id": request_id.to_string(),
            "timestamp": crate::time::rfc3339(ctx.now),
            "customer_id": instance.customer_id,
            "campaign_id": send.campaign.clone().unwrap_or_else(|| format!("{}.{step}", journey.name)),
            "category": send.category,
            "content_id": send.content,
            "channels": send.channels,
            "variables": send.variables,
            "journey_id": journey.name,
        });
        crate::orchestrator::ask(ctx, id, instance.customer_id.clone(), body)
    }

    fn end(
        &self,
        ctx: &mut Ctx<'_>,
        id: &str,
        customer: &mut Customer,
        journey: &JourneyConfig,
        end: End,
    ) -> Result<(), ProcessError> {
        let Some(instance) = customer.active.remove(&journey.name) else { return Ok(()) };
        let step = journey.steps.get(instance.step).map(|s| s.name(instance.step)).unwrap_or_else(|| "end".into());
        if let Some(due) = instance.due {
            ctx.cancel(due, id.as_bytes())?;
        }
        match end {
            End::Converted => {
                self.emit(ctx, id, &journey.name, &instance, "converted", None)?;
                ctx.count("journey_events", format!("{}/converted/{step}", journey.name));
                let reach = if instance.channels.len() > 1 { "cross_channel" } else { "single_channel" };
                ctx.count("journey_conversions", format!("{}/{reach}", journey.name));
            }
            End::Exited(reason) => {
                self.emit(ctx, id, &journey.name, &instance, "exited", Some(&reason))?;
                ctx.count("journey_events", format!("{}/exited/{step}", journey.name));
            }
        }
        Ok(())
    }

    fn emit(
        &self,
        ctx: &mut Ctx<'_>,
        id: &str,
        journey: &str,
        instance: &Instance,
        event: &str,
        reason: Option<&str>,
    ) -> Result<(), ProcessError> {
        let config = self.journey(journey);
        let step = config.and_then(|j| j.steps.get(instance.step).map(|s| s.name(instance.step)));
        let record = json!({
            "journey": journey,
            "canonical_id": id,
            "customer_id": instance.customer_id,
            "event": event,
            "step": step,
            "reason": reason,
            "entered_at": crate::time::rfc3339(instance.entered_at),
            "channels": instance.channels,
            "at": crate::time::rfc3339(ctx.now),
        });
        ctx.emit_json(TOPIC, id, &record)
    }
}
