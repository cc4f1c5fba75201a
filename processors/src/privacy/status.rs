//! The status actor: one per request, at the `events.resolved` partition of its request
//! id. It collects the parts of a request in any order (they come from many partitions
//! and producers), keeps its status, and writes every change of status to
//! `privacy.results` (keyed by request id); the last carries the receipt.
//!
//! Store `privacy`: `req:<request_id>` → [`RequestState`]; `part:<request_id>\u{1}<part>`
//! → that part's share of an access export (expiring at `privacy.export_ttl`).

use super::{Admission, Counts, Report, RequestType, NAME, RESULTS_TOPIC};
use crate::processor::{Ctx, ProcessError, Processor, Record};
use crate::resolved::{decode, parse_for_stage, Kind, RESOLVED_TOPIC};
use crate::task::ProcessorSpec;
use crate::topology::Topology;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

pub const STORE: &str = "privacy";

pub fn spec(topology: &Topology) -> ProcessorSpec {
    let config = topology.privacy.clone();
    ProcessorSpec {
        name: NAME,
        inputs: vec![RESOLVED_TOPIC.into()],
        stores: vec![STORE],
        outputs: vec![RESULTS_TOPIC.into(), RESOLVED_TOPIC.into()],
        forwards: vec![],
        sub_topology: crate::subtopology::CUSTOMER,
        factory: Box::new(move || Box::new(StatusActor { config: config.clone() })),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    InProgress,
    Completed,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Failed => "failed",
        }
    }

    fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed)
    }
}

/// The counts a part reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartSummary {
    #[serde(flatten)]
    pub counts: Counts,
    pub at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub part: String,
    pub reason: String,
}

/// A request as the status actor knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestState {
    pub request_id: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<Admission>,
    /// When the first part was seen.
    pub started_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    /// The root (the plan) arrived.
    #[serde(default)]
    pub root: bool,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub planned: BTreeSet<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parts: BTreeMap<String, PartSummary>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_hashes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<Failure>,
}

impl RequestState {
    fn new(request_id: &str, now: i64) -> RequestState {
        RequestState {
            request_id: request_id.to_owned(),
            status: Status::Pending,
            admission: None,
            started_at: now,
            finished_at: None,
            root: false,
            planned: BTreeSet::new(),
            parts: BTreeMap::new(),
            subject_hashes: Vec::new(),
            note: None,
            failed: None,
        }
    }

    pub fn kind(&self) -> Option<RequestType> {
        self.admission.as_ref().map(|a| a.kind)
    }

    /// Planned parts that have not reported.
    pub fn missing(&self) -> impl Iterator<Item = &String> {
        self.planned.iter().filter(|p| !self.parts.contains_key(*p))
    }

    fn status_now(&self) -> Status {
        if self.status.is_final() {
            self.status
        } else if self.admission.is_some() && self.root && self.missing().next().is_none() {
            Status::Completed
        } else if self.root {
            Status::InProgress
        } else {
            Status::Pending
        }
    }

    /// The receipt: what was done, store by store and topic by topic, with no personal
    /// data (hashes only).
    pub fn receipt(&self) -> Value {
        let mut stores: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
        let mut topics: BTreeMap<&str, u64> = BTreeMap::new();
        let mut stopped: BTreeMap<&str, u64> = BTreeMap::new();
        for part in self.parts.values() {
            for (store, n) in &part.counts.stores {
                let entry = stores.entry(store).or_default();
                entry.0 += n;
                entry.1 += 1;
            }
            for (topic, n) in &part.counts.topics {
                *topics.entry(topic).or_default() += n;
            }
            for (what, n) in &part.counts.stopped {
                *stopped.entry(what).or_default() += n;
            }
        }
        let verb = if self.kind() == Some(RequestType::Erasure) { "deleted" } else { "read" };
        let mut stages: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for part in &self.planned {
            let stage = part.split('/').next().unwrap_or(part).to_owned();
            let entry = stages.entry(stage).or_default();
            entry.0 += 1;
            entry.1 += usize::from(self.parts.contains_key(part));
        }
        let admission = self.admission.as_ref();
        serde_json::json!({
            "request_id": self.request_id,
            "type": admission.map(|a| a.kind.as_str()),
            "status": self.status.as_str(),
            "subject_hash": admission.map(|a| a.subject.as_str()),
            "received_at": admission.map(|a| a.received_at),
            "expected_completion": admission.map(|a| a.expected_completion),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "note": self.note,
            "failed": self.failed,
            "stages": stages.iter().map(|(stage, (planned, done))| serde_json::json!({
                "stage": stage,
                "status": if done == planned { "completed" } else if self.status == Status::Failed { "failed" } else { "in_progress" },
                "parts": planned, "parts_done": done,
            })).collect::<Vec<_>>(),
            "stores": stores.iter().map(|(store, (n, parts))| serde_json::json!({
                "store": store, verb: n, "parts": parts,
            })).collect::<Vec<_>>(),
            "topics": topics.iter().map(|(topic, n)| serde_json::json!({"topic": topic, "tombstones": n})).collect::<Vec<_>>(),
            "stopped": stopped,
            "subject_hashes": self.subject_hashes,
            "status_callback_url": admission.and_then(|a| a.callback.as_deref()),
        })
    }
}

/// The part of the broadcast an erasure's completion sends to every status actor.
const FORGET: &str = "forget";
/// `forgot:<subject hash>` → the erasure's request id, kept `export_ttl`.
const FORGOTTEN: &str = "forgot:";
/// The note of an access request whose export went with an erasure of its subject.
pub const SUBJECT_ERASED: &str = "subject_erased";

/// Whether an erasure of this request's subject completed since.
fn forgotten(ctx: &mut Ctx<'_>, state: &RequestState) -> Result<bool, ProcessError> {
    if !state.kind().is_some_and(RequestType::exports) {
        return Ok(false);
    }
    for hash in &state.subject_hashes {
        if ctx.get_json::<String>(STORE, &format!("{FORGOTTEN}{hash}"))?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Delete a request's export fragments; its status says why.
fn purge_exports(ctx: &mut Ctx<'_>, state: &mut RequestState) -> Result<(), ProcessError> {
    let prefix = export_prefix(&state.request_id);
    loop {
        let rows = ctx.scan_prefix(STORE, &prefix, 512)?;
        if rows.is_empty() {
            break;
        }
        for (key, _) in rows {
            ctx.delete_expiring(STORE, key.as_bytes())?;
        }
    }
    state.note = Some(SUBJECT_ERASED.to_owned());
    ctx.count("privacy_exports_erased", state.kind().map(RequestType::as_str).unwrap_or("unknown"));
    Ok(())
}

pub fn request_key(request_id: &str) -> String {
    format!("req:{request_id}")
}

/// Prefix of a request's export fragments.
pub fn export_prefix(request_id: &str) -> String {
    format!("part:{request_id}\u{1}")
}

pub struct StatusActor {
    config: super::PrivacyConfig,
}

impl StatusActor {
    fn on_report(&mut self, ctx: &mut Ctx<'_>, report: Report) -> Result<(), ProcessError> {
        if report.part == FORGET {
            return self.on_forget(ctx, &report);
        }
        let key = request_key(&report.request_id);
        let now = ctx.now;
        let mut state: RequestState =
            ctx.get_json(STORE, &key)?.unwrap_or_else(|| RequestState::new(&report.request_id, now));
        let before = state.status;
        let first = state.parts.is_empty() && state.admission.is_none() && !state.root;
        match report.part.as_str() {
            "admit" => {
                if state.admission.is_some() {
                    ctx.count("privacy_duplicates", "admit");
                    return Ok(());
                }
                state.admission = report.admission.clone();
                if let Some(admission) = &state.admission {
                    let deadline = admission.received_at.max(now).saturating_add(self.config.timeout.ms());
                    ctx.schedule(deadline, key.as_bytes(), &[])?;
                }
            }
            "root" => {
                if state.root {
                    ctx.count("privacy_duplicates", "root");
                    return Ok(());
                }
                state.root = true;
                state.planned.extend(report.planned.iter().cloned());
                state.subject_hashes = report.subject_hashes.clone();
                state.note = report.note.clone();
                self.record_part(ctx, &mut state, &report)?;
                // Parts may arrive before the root: an export of a subject erased
                // meanwhile goes now.
                if forgotten(ctx, &state)? {
                    purge_exports(ctx, &mut state)?;
                }
            }
            _ => {
                if state.parts.contains_key(&report.part) {
                    ctx.count("privacy_duplicates", "part");
                    return Ok(());
                }
                self.record_part(ctx, &mut state, &report)?;
            }
        }
        if first {
            ctx.count("privacy_requests", format!("{}/received", kind_label(&state)));
        }
        state.status = state.status_now();
        if state.status != before && state.status.is_final() {
            state.finished_at = Some(now);
            self.count_final(ctx, &state);
            if state.status == Status::Completed && state.kind() == Some(RequestType::Erasure) {
                // Exports of earlier access requests hold the subject's data too.
                let mut forget = Report::new(&state.request_id, FORGET);
                forget.subject_hashes = state.subject_hashes.clone();
                forget.broadcast(ctx)?;
            }
        }
        if state.status != before || report.part == "admit" {
            self.publish(ctx, &state)?;
        }
        ctx.put_json_owned(STORE, &key, state)
    }

    fn record_part(&self, ctx: &mut Ctx<'_>, state: &mut RequestState, report: &Report) -> Result<(), ProcessError> {
        let summary = PartSummary { counts: report.counts.clone(), at: ctx.now };
        state.parts.insert(report.part.clone(), summary);
        if state.note.as_deref() == Some(SUBJECT_ERASED) {
            return Ok(());
        }
        if let Some(export) = &report.export {
            let until = ctx.now.saturating_add(self.config.export_ttl.ms());
            let key = format!("{}{}", export_prefix(&report.request_id), report.part);
            ctx.put_json_expiring(STORE, &key, export, until)?;
        }
        Ok(())
    }

    /// An erasure completed (on some partition): every export about its subject held
    /// here is deleted, and exports still arriving for it are not kept.
    fn on_forget(&self, ctx: &mut Ctx<'_>, report: &Report) -> Result<(), ProcessError> {
        let until = ctx.now.saturating_add(self.config.export_ttl.ms());
        for hash in &report.subject_hashes {
            ctx.put_json_expiring(STORE, &format!("{FORGOTTEN}{hash}"), &report.request_id, until)?;
        }
        let mut keys = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let rows = ctx.scan_after(STORE, "req:", after.as_deref(), 512)?;
            let Some((last, _)) = rows.last() else { break };
            after = Some(last.clone());
            keys.extend(rows.into_iter().map(|(key, _)| key));
        }
        for key in keys {
            let Some(mut state) = ctx.get_json::<RequestState>(STORE, &key)? else { continue };
            let about = state.subject_hashes.iter().any(|h| report.subject_hashes.contains(h));
            if about && state.kind().is_some_and(RequestType::exports) && state.request_id != report.request_id {
                purge_exports(ctx, &mut state)?;
                ctx.put_json_owned(STORE, &key, state)?;
            }
        }
        Ok(())
    }

    fn count_final(&self, ctx: &mut Ctx<'_>, state: &RequestState) {
        let kind = kind_label(state);
        ctx.count("privacy_requests", format!("{kind}/{}", state.status.as_str()));
        if let (Some(admission), Some(finished)) = (&state.admission, state.finished_at) {
            let seconds = (finished - admission.received_at).max(0) as f64 / 1000.0;
            ctx.count("privacy_request_seconds", format!("{kind}/{seconds}"));
        }
    }

    fn publish(&self, ctx: &mut Ctx<'_>, state: &RequestState) -> Result<(), ProcessError> {
        ctx.emit_json(RESULTS_TOPIC, &state.request_id, &state.receipt())
    }
}

fn kind_label(state: &RequestState) -> &'static str {
    state.kind().map(RequestType::as_str).unwrap_or("unknown")
}

impl Processor for StatusActor {
    fn process(&mut self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError> {
        let Some(resolved) = parse_for_stage(ctx, record, NAME)? else { return Ok(()) };
        if resolved.kind != Kind::PrivacyReport {
            return Ok(());
        }
        let report: Report = decode(&resolved.body)?;
        self.on_report(ctx, report)
    }

    /// A request's deadline: fail it if parts are still missing.
    fn on_timer(&mut self, ctx: &mut Ctx<'_>, key: &[u8], _payload: &[u8]) -> Result<(), ProcessError> {
        let key = String::from_utf8_lossy(key).into_owned();
        let Some(mut state) = ctx.get_json::<RequestState>(STORE, &key)? else { return Ok(()) };
        if state.status.is_final() {
            return Ok(());
        }
        let (part, reason) = match state.missing().next() {
            Some(part) => (part.clone(), "no_report"),
            None if !state.root => ("identity".to_owned(), "not_resolved"),
            None => ("admit".to_owned(), "not_admitted"),
        };
        state.failed = Some(Failure { part, reason: reason.to_owned() });
        state.status = Status::Failed;
        state.finished_at = Some(ctx.now);
        self.count_final(ctx, &state);
        self.publish(ctx, &state)?;
        ctx.put_json_owned(STORE, &key, state)
    }
}
