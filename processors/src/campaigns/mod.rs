//! Campaigns: turn each campaign's trigger into message requests for the orchestrator
//! (which applies consent, suppressions, one message per campaign, quiet hours, caps
//! and priorities). Campaigns come from topology.yaml and, at run time, from the
//! `campaigns` topic through the catalog stage; each task keeps them in its store.
//!
//! - **event**: an event of the trigger's type (and condition over `event`) requests a
//!   message for its customer;
//! - **segment entry**: the customer entering the segment (read from the `segments`
//!   topic, co-partitioned with `events.resolved`) requests one;
//! - **schedule**: at the scheduled time (then `every` after) every customer of the
//!   audience this partition knows is requested, a batch of [`BATCH`] per punctuation
//!   on a durable timer, so a restart or rebalance resumes where the run stopped.
//!
//! The audience is a segment; the stage keeps every customer it has seen with their
//! segments (`member/<canonical id>`), which is the audience index of scheduled runs.
//! Request ids are deterministic (campaign, customer, occurrence), so a replay asks
//! for the same message and the orchestrator decides it once.
//!
//! Store `campaigns`: `campaign/<id>` → [`Stored`], `member/<canonical id>` → [`Member`].

pub mod config;

use crate::processor::{Ctx, ProcessError, Processor, Record};
use crate::resolved::{decode, parse_for_stage, CatalogBody, Kind, RESOLVED_TOPIC};
use crate::rules::RuleSet;
use crate::task::ProcessorSpec;
use crate::time::rfc3339;
use crate::topology::{Topology, SEGMENTS};
use config::CampaignConfig;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub const NAME: &str = "campaigns";
pub const STORE: &str = "campaigns";
/// Customers requested per timer firing of a scheduled run.
pub const BATCH: usize = 500;
const CAMPAIGN: &str = "campaign/";
const MEMBER: &str = "member/";

pub fn spec(topology: &Topology) -> ProcessorSpec {
    let topology = Arc::new(topology.clone());
    ProcessorSpec {
        name: NAME,
        inputs: vec![RESOLVED_TOPIC.into(), SEGMENTS.into()],
        stores: vec![STORE],
        outputs: vec![RESOLVED_TOPIC.into()],
        forwards: vec![],
        sub_topology: crate::subtopology::CUSTOMER,
        factory: Box::new(move || {
            Box::new(CampaignStage {
                topology: topology.clone(),
                campaigns: None,
                conditions: BTreeMap::new(),
                erased: crate::privacy::Erased::new(&topology.privacy, STORE),
            })
        }),
    }
}

/// Where a stored campaign came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Topology,
    Topic,
}

/// A campaign as this task keeps it, with the progress of its schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub source: Source,
    pub campaign: CampaignConfig,
    /// When the schedule's timer is armed.
    #[serde(default)]
    pub armed: Option<i64>,
    /// The last occurrence whose run finished.
    #[serde(default)]
    pub last_run: Option<i64>,
}

/// A customer the stage has seen, with their segments.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Member {
    #[serde(default)]
    pub customer_id: Option<String>,
    #[serde(default)]
    pub segments: BTreeSet<String>,
}

/// A scheduled run in progress: the occurrence and the last customer requested.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Run {
    occurrence: i64,
    #[serde(default)]
    after: Option<String>,
}

/// A `segments` record.
#[derive(Debug, Deserialize)]
struct SegmentChange {
    canonical_id: String,
    #[serde(default)]
    customer_id: Option<String>,
    segment: String,
    change: String,
    /// Event time of the change (the record's own timestamp is when it was written).
    #[serde(default)]
    at: i64,
}

struct CampaignStage {
    topology: Arc<Topology>,
    /// The task's campaigns, loaded from the store on first use (a task whose
    /// transaction aborts is rebuilt, so this never outlives the store).
    campaigns: Option<Vec<CampaignConfig>>,
    /// Condition text → compiled rule.
    conditions: BTreeMap<String, RuleSet>,
    erased: crate::privacy::Erased,
}

/// What set a request off.
enum Occasion<'a> {
    Event(&'a Value),
    SegmentEntry(&'a str),
    Schedule(i64),
}

impl Processor for CampaignStage {
    /// Reconcile the stored campaigns with topology.yaml: new or changed ones are
    /// stored (and their schedule armed), removed ones dropped. A campaign from the
    /// topic overrides the topology's of the same id.
    fn init(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ProcessError> {
        let declared = self.topology.campaigns.clone();
        for campaign in &declared {
            let stored = self.stored(ctx, &campaign.id)?;
            match &stored {
                Some(s) if s.source == Source::Topic || s.campaign == *campaign => continue,
                _ => self.install(ctx, campaign.clone(), Source::Topology, stored)?,
            }
        }
        for (_, bytes) in ctx.scan_prefix(STORE, CAMPAIGN, usize::MAX)? {
            let Ok(stored) = crate::cache::decode::<Stored>(&bytes) else { continue };
            if stored.source == Source::Topology && !declared.iter().any(|c| c.id == stored.campaign.id) {
                self.remove(ctx, &stored)?;
            }
        }
        self.erased.load(ctx)
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError> {
        if record.topic == SEGMENTS {
            return self.on_segment(ctx, record);
        }
        let Some(resolved) = parse_for_stage(ctx, record, NAME)? else { return Ok(()) };
        if crate::resolved::dropped_as_erased(ctx, NAME, &resolved, &self.erased) {
            return Ok(());
        }
        match resolved.kind {
            Kind::Event => {
                let member = self.member(ctx, &resolved.canonical_id, resolved.customer_id.as_deref())?;
                let event_type = resolved.body.get("event_type").and_then(Value::as_str).unwrap_or_default();
                self.load(ctx)?;
                for campaign in self.live(ctx.now) {
                    let t = &campaign.trigger;
                    if t.event.as_deref() == Some(event_type)
                        && t.condition.as_deref().is_none_or(|c| self.holds(c, &resolved.body))
                    {
                        self.request(ctx, campaign, &resolved.canonical_id, &member, Occasion::Event(&resolved.body))?;
                    }
                }
                Ok(())
            }
            Kind::Campaign => {
                let change: CatalogBody = decode(&resolved.body)?;
                self.campaigns = None;
                let stored = self.stored(ctx, &change.id)?;
                if change.value.is_null() {
                    // Deleted from the topic: the topology's campaign of this id, if any, applies again.
                    match self.topology.campaigns.iter().find(|c| c.id == change.id) {
                        Some(declared) => self.install(ctx, declared.clone(), Source::Topology, stored),
                        None => stored.map_or(Ok(()), |s| self.remove(ctx, &s)),
                    }
                } else {
                    let campaign: CampaignConfig = decode(&change.value)?;
                    self.install(ctx, campaign, Source::Topic, stored)
                }
            }
            // The merged-away customer is gone; the survivor is a member of its own.
            Kind::Merge => {
                let merge: crate::resolved::MergeBody = decode(&resolved.body)?;
                ctx.delete(STORE, &format!("{MEMBER}{}", merge.from))
            }
            Kind::Privacy => self.on_privacy(ctx, &resolved.canonical_id, decode(&resolved.body)?),
            Kind::Request
            | Kind::Consent
            | Kind::Absorb
            | Kind::Tick
            | Kind::Recommendations
            | Kind::Content
            | Kind::PrivacyReport => Ok(()),
        }
    }

    fn on_expired(&mut self, _ctx: &mut Ctx<'_>, _store: &str, key: &[u8]) -> Result<(), ProcessError> {
        self.erased.forget_expired(key);
        Ok(())
    }

    /// A scheduled run: the next batch of the audience, then the next batch or the
    /// next occurrence.
    fn on_timer(&mut self, ctx: &mut Ctx<'_>, key: &[u8], payload: &[u8]) -> Result<(), ProcessError> {
        let key = String::from_utf8_lossy(key).into_owned();
        let Some(id) = key.strip_prefix(CAMPAIGN) else { return Ok(()) };
        let Some(mut stored) = self.stored(ctx, id)? else { return Ok(()) };
        let run: Run = serde_json::from_slice(payload).unwrap_or_default();
        stored.armed = None;
        let campaign = stored.campaign.clone();
        if campaign.live(ctx.now) {
            let batch = ctx.scan_after(STORE, MEMBER, run.after.as_deref(), BATCH)?;
            let full = batch.len() == BATCH;
            let mut last = None;
            for (member_key, bytes) in batch {
                let canonical = member_key[MEMBER.len()..].to_owned();
                if let Ok(member) = crate::cache::decode::<Member>(&bytes) {
                    self.request(ctx, &campaign, &canonical, &member, Occasion::Schedule(run.occurrence))?;
                }
                last = Some(member_key);
            }
            if full {
                let next = Run { occurrence: run.occurrence, after: last };
                let at = ctx.now.saturating_add(1);
                ctx.schedule(at, key.as_bytes(), &serde_json::to_vec(&next).unwrap_or_default())?;
                stored.armed = Some(at);
                return ctx.put_json_owned(STORE, &key, stored);
            }
        }
        stored.last_run = Some(run.occurrence);
        arm(ctx, &mut stored)?;
        ctx.put_json_owned(STORE, &key, stored)
    }
}

impl CampaignStage {
    /// A data subject request at `id`: the customer's member record (the audience index
    /// of scheduled runs) is exported or deleted. A run paused on that very member goes
    /// on from the member before it, so its cursor no longer names the customer.
    fn on_privacy(&mut self, ctx: &mut Ctx<'_>, id: &str, order: crate::privacy::Order) -> Result<(), ProcessError> {
        let key = format!("{MEMBER}{id}");
        let member = ctx.get_json::<Value>(STORE, &key)?;
        let mut report = crate::privacy::Report::new(
            &order.request_id,
            crate::privacy::Report::stage_part(NAME, self.erased.hasher(), id),
        );
        if order.erases() {
            report.deleted(NAME, STORE, crate::privacy::delete_counted(ctx, STORE, &key)?);
            let paused = ctx.timers_where(|k| k.starts_with(CAMPAIGN.as_bytes()))?;
            let mut moved = 0;
            for timer in paused {
                let Ok(mut run) = serde_json::from_slice::<Run>(&timer.payload) else { continue };
                if run.after.as_deref() != Some(key.as_str()) {
                    continue;
                }
                run.after = self.member_before(ctx, &key)?;
                ctx.schedule(timer.due, &timer.key, &serde_json::to_vec(&run).unwrap_or_default())?;
                moved += 1;
            }
            report.stopped("scheduled_runs_moved_on", moved);
            self.erased.mark(ctx, id)?;
        } else if order.kind.exports() {
            report.deleted(NAME, STORE, u64::from(member.is_some()));
            report.export = member;
        }
        report.send(ctx)
    }

    /// The greatest member key before `key` (`None`: it was the first).
    fn member_before(&self, ctx: &mut Ctx<'_>, key: &str) -> Result<Option<String>, ProcessError> {
        let mut before = None;
        let mut after: Option<String> = None;
        loop {
            let batch = ctx.scan_after(STORE, MEMBER, after.as_deref(), BATCH)?;
            let Some((last, _)) = batch.last() else { return Ok(before) };
            after = Some(last.clone());
            for (member_key, _) in batch {
                if member_key.as_str() >= key {
                    return Ok(before);
                }
                before = Some(member_key);
            }
        }
    }

    fn stored(&self, ctx: &mut Ctx<'_>, id: &str) -> Result<Option<Stored>, ProcessError> {
        ctx.get_json(STORE, &format!("{CAMPAIGN}{id}"))
    }

    /// Store a new or changed campaign and arm its schedule; the previous version's
    /// timer is cancelled, its progress kept (an occurrence that ran does not run again).
    fn install(
        &mut self,
        ctx: &mut Ctx<'_>,
        campaign: CampaignConfig,
        source: Source,
        previous: Option<Stored>,
    ) -> Result<(), ProcessError> {
        let key = format!("{CAMPAIGN}{}", campaign.id);
        let last_run = previous.as_ref().and_then(|p| p.last_run);
        if let Some(at) = previous.and_then(|p| p.armed) {
            ctx.cancel(at, key.as_bytes())?;
        }
        let mut stored = Stored { source, campaign, armed: None, last_run };
        arm(ctx, &mut stored)?;
        self.campaigns = None;
        ctx.put_json_owned(STORE, &key, stored)
    }

    fn remove(&mut self, ctx: &mut Ctx<'_>, stored: &Stored) -> Result<(), ProcessError> {
        let key = format!("{CAMPAIGN}{}", stored.campaign.id);
        if let Some(at) = stored.armed {
            ctx.cancel(at, key.as_bytes())?;
        }
        self.campaigns = None;
        ctx.delete(STORE, &key)
    }

    /// Load the task's campaigns from the store, once (again after a change).
    fn load(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ProcessError> {
        if self.campaigns.is_some() {
            return Ok(());
        }
        let mut all = Vec::new();
        for (_, bytes) in ctx.scan_prefix(STORE, CAMPAIGN, usize::MAX)? {
            if let Ok(stored) = crate::cache::decode::<Stored>(&bytes) {
                all.push(stored.campaign);
            }
        }
        for condition in all.iter().filter_map(|c| c.trigger.condition.clone()) {
            // Checked before the campaign was stored; one that does not compile never holds.
            let rule = RuleSet::compile([condition.as_str()]).unwrap_or_else(|_| RuleSet::empty());
            self.conditions.insert(condition, rule);
        }
        self.campaigns = Some(all);
        Ok(())
    }

    /// The loaded campaigns that may send at `now`.
    fn live(&self, now: i64) -> impl Iterator<Item = &CampaignConfig> {
        self.campaigns.iter().flatten().filter(move |c| c.live(now))
    }

    fn holds(&self, condition: &str, event: &Value) -> bool {
        self.conditions.get(condition).is_some_and(|rule| !rule.matching(&[("event", event)]).is_empty())
    }

    /// The customer's member record, created on first sight (and when their business
    /// id becomes known).
    fn member(&self, ctx: &mut Ctx<'_>, id: &str, customer_id: Option<&str>) -> Result<Member, ProcessError> {
        let key = format!("{MEMBER}{id}");
        let existing: Option<Member> = ctx.get_json(STORE, &key)?;
        let learned = |m: &Member| customer_id.is_some() && m.customer_id.as_deref() != customer_id;
        let write = existing.as_ref().is_none_or(learned);
        let mut member = existing.unwrap_or_default();
        if write {
            member.customer_id = customer_id.map(str::to_owned).or(member.customer_id);
            ctx.put_json(STORE, &key, &member)?;
        }
        Ok(member)
    }

    fn on_segment(&mut self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError> {
        let Some(bytes) = record.value.as_deref() else { return Ok(()) };
        let change: SegmentChange = serde_json::from_slice(bytes)
            .map_err(|e| ProcessError::reject("invalid_segment_change", format!("segments record: {e}")))?;
        ctx.observe_event_time(change.at);
        if self.erased.holds(&change.canonical_id, ctx.now) {
            ctx.count("privacy_dropped", NAME);
            return Ok(());
        }
        let key = format!("{MEMBER}{}", change.canonical_id);
        let entered = change.change == "entered";
        let mut member = match ctx.get_json::<Member>(STORE, &key)? {
            Some(m) => m,
            // An exit of a customer that merged away (or was never seen) changes nothing.
            None if !entered => return Ok(()),
            None => Member::default(),
        };
        if change.customer_id.is_some() {
            member.customer_id = change.customer_id.clone();
        }
        let changed = if entered {
            member.segments.insert(change.segment.clone())
        } else {
            member.segments.remove(&change.segment)
        };
        ctx.put_json(STORE, &key, &member)?;
        if !(entered && changed) {
            return Ok(());
        }
        self.load(ctx)?;
        for campaign in self.live(ctx.now) {
            if campaign.trigger.segment_entry.as_deref() == Some(change.segment.as_str()) {
                self.request(ctx, campaign, &change.canonical_id, &member, Occasion::SegmentEntry(&change.segment))?;
            }
        }
        Ok(())
    }

    /// Ask the orchestrator to message `member` for `campaign`, when in its audience.
    fn request(
        &self,
        ctx: &mut Ctx<'_>,
        campaign: &CampaignConfig,
        id: &str,
        member: &Member,
        occasion: Occasion<'_>,
    ) -> Result<(), ProcessError> {
        if campaign.audience.as_ref().is_some_and(|a| !member.segments.contains(a)) {
            return Ok(());
        }
        let mut variables = match &campaign.variables {
            Value::Object(vars) => vars.clone(),
            _ => serde_json::Map::new(),
        };
        // One message per campaign per customer: a repeating schedule's occurrences are
        // campaigns of their own (`weekly@2026-12-07T09:00:00Z`).
        let mut campaign_id = campaign.id.clone();
        let (trigger, occurrence) = match occasion {
            Occasion::Event(event) => {
                variables.insert("event".into(), event.get("payload").cloned().unwrap_or(Value::Null));
                let event_id = event.get("event_id").and_then(Value::as_str).unwrap_or_default();
                ("event", format!("event:{event_id}"))
            }
            Occasion::SegmentEntry(segment) => ("segment_entry", format!("segment:{segment}:{}", ctx.now)),
            Occasion::Schedule(at) => {
                if campaign.trigger.every.is_some() {
                    campaign_id = format!("{}@{}", campaign.id, rfc3339(at));
                }
                ("schedule", format!("schedule:{at}"))
            }
        };
        let request_id = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("campaign:{}:{id}:{occurrence}", campaign.id).as_bytes(),
        );
        ctx.count("campaign_requests", format!("{}/{trigger}", campaign.id));
        let body = json!({
            "request_id": request_id.to_string(),
            "timestamp": rfc3339(ctx.now),
            "customer_id": member.customer_id,
            "campaign_id": campaign_id,
            "category": campaign.category,
            "content_id": campaign.content,
            "channels": campaign.channels,
            "variables": variables,
        });
        crate::orchestrator::ask(ctx, id, member.customer_id.clone(), body)
    }
}

/// Arm the timer of the campaign's next occurrence after its last run: the scheduled
/// time itself (at once when it has passed), then every `every` after it; an
/// occurrence already past when the previous one finished is skipped, not run late.
fn arm(ctx: &mut Ctx<'_>, stored: &mut Stored) -> Result<(), ProcessError> {
    let campaign = &stored.campaign;
    let Some(first) = campaign.schedule_at().filter(|_| campaign.enabled) else { return Ok(()) };
    let next = match (stored.last_run, campaign.trigger.every) {
        (None, _) => Some(first),
        (Some(last), Some(every)) => {
            let (every, after) = (every.ms().max(1), last.max(ctx.now.saturating_sub(1)));
            if after < first {
                Some(first)
            } else {
                Some(first.saturating_add(((after - first) / every + 1).saturating_mul(every)))
            }
        }
        // A one-off that ran runs again only when moved to a later time.
        (Some(last), None) => (first > last).then_some(first),
    };
    if let Some(at) = next {
        let key = format!("{CAMPAIGN}{}", campaign.id);
        let run = Run { occurrence: at, after: None };
        ctx.schedule(at, key.as_bytes(), &serde_json::to_vec(&run).unwrap_or_default())?;
        stored.armed = Some(at);
    }
    Ok(())
}
