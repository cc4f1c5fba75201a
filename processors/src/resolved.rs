//! The records on `events.resolved`, the internal repartition topic keyed by canonical
//! customer id. Identity writes events, message requests, consent changes, merges and
//! clock ticks here; downstream stages also write `absorb` records here to move a
//! merged-away customer's state to the partition of the customer that survived.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

pub const RESOLVED_TOPIC: &str = "events.resolved";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `body` is the validated event.
    Event,
    /// `body` is a message request.
    Request,
    /// `body` is a consent change.
    Consent,
    /// Keyed by the merged-away id; `body` is `{from, into}`.
    Merge,
    /// Keyed by the surviving id; `body` is `{stage, from, state}`.
    Absorb,
    /// Moves event time forward on this partition.
    Tick,
    /// `body` is the customer's precomputed recommendations (or null to clear them);
    /// addressed to the profile stage.
    Recommendations,
    /// A content item changed: `body` is a [`CatalogBody`]; on every partition.
    Content,
    /// A campaign changed: `body` is a [`CatalogBody`]; on every partition.
    Campaign,
    /// A data subject request for every customer stage at this canonical id: `body` is a
    /// [`crate::privacy::Order`]. Handled where it lands, never forwarded after a merge
    /// (each canonical id the subject had gets its own).
    Privacy,
    /// A part of a data subject request done: `body` is a [`crate::privacy::Report`],
    /// keyed by request id, for the status actor.
    PrivacyReport,
}

impl Kind {
    /// Catalogue records and ticks are about no customer: every partition gets one.
    pub fn is_broadcast(self) -> bool {
        matches!(self, Kind::Tick | Kind::Content | Kind::Campaign)
    }
}

/// A catalogue change (content item or campaign), broadcast by the catalog stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogBody {
    pub id: String,
    /// The validated record as JSON; null when it was deleted.
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    pub kind: Kind,
    pub canonical_id: String,
    #[serde(default)]
    pub customer_id: Option<String>,
    /// Event time, ms since the epoch.
    pub at: i64,
    pub body: Value,
    /// Set when only one stage should handle this record (state moving between that
    /// stage's partitions); `None` for records every stage reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeBody {
    pub from: String,
    pub into: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbsorbBody {
    /// Which stage's state this is (`profile`, `context`, `orchestrator`).
    pub stage: String,
    pub from: String,
    pub state: Value,
}

impl Resolved {
    pub fn parse(bytes: &[u8]) -> Result<Resolved, crate::ProcessError> {
        serde_json::from_slice(bytes).map_err(|e| crate::ProcessError::reject("invalid_resolved", e.to_string()))
    }
}

/// Decode a record value from `events.resolved` (tombstones and garbage are rejected):
/// once per record, shared by every stage of the task that reads it.
pub fn parse_record(record: &crate::Record) -> Result<Arc<Resolved>, crate::ProcessError> {
    record
        .resolved
        .get_or_init(|| {
            let value = record.value.as_deref().ok_or_else(|| "empty record".to_owned())?;
            serde_json::from_slice(value).map(Arc::new).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|detail| crate::ProcessError::reject("invalid_resolved", detail))
}

/// Decode a record body (`body` of an event, request, consent, merge or absorb record).
pub fn decode<T: serde::de::DeserializeOwned>(body: &Value) -> Result<T, crate::ProcessError> {
    T::deserialize(body).map_err(|e| crate::ProcessError::reject("invalid_resolved", e.to_string()))
}

/// The state carried by an absorb record, when it is addressed to `stage`.
pub fn absorbed<T: serde::de::DeserializeOwned>(body: &Value, stage: &str) -> Result<Option<T>, crate::ProcessError> {
    let invalid =
        |what: &str| crate::ProcessError::reject("invalid_resolved", format!("an absorb record needs {what}"));
    let addressed = body.get("stage").and_then(Value::as_str).ok_or_else(|| invalid("its stage"))?;
    if addressed != stage {
        return Ok(None);
    }
    decode(body.get("state").ok_or_else(|| invalid("the state"))?).map(Some)
}

/// Handle a merge record: move this stage's state of the merged-away id to the survivor.
pub fn on_merge(
    ctx: &mut crate::Ctx<'_>,
    stage: &str,
    store: &str,
    body: &Value,
    output_topic: Option<&str>,
) -> Result<(), crate::ProcessError> {
    let merge: MergeBody = decode(body)?;
    forward_state_on_merge(ctx, stage, store, &merge, output_topic)
}

/// Decode a record for `stage`, or `None` when it is addressed to another stage.
pub fn parse_for_stage(
    ctx: &mut crate::Ctx<'_>,
    record: &crate::Record,
    stage: &str,
) -> Result<Option<Arc<Resolved>>, crate::ProcessError> {
    let resolved = parse_record(record)?;
    if resolved.stage.as_deref().is_some_and(|s| s != stage) {
        return Ok(None);
    }
    // A catalogue change happens in the content team's time, not the customers': it
    // must not move event time (a campaign written today would release tomorrow's
    // timers of a stream replaying last year).
    // Nor does a data subject request: it happens in the operator's time.
    if !matches!(resolved.kind, Kind::Content | Kind::Campaign | Kind::Privacy | Kind::PrivacyReport) {
        ctx.observe_event_time(resolved.at);
    }
    Ok(Some(resolved))
}

/// The next record for `stage`, or `None` when there is nothing for it to do: the record
/// is addressed to another stage, or it was forwarded to the survivor of a merge.
pub fn incoming(
    ctx: &mut crate::Ctx<'_>,
    record: &crate::Record,
    stage: &str,
    store: &str,
    erased: &crate::privacy::Erased,
) -> Result<Option<Arc<Resolved>>, crate::ProcessError> {
    let Some(resolved) = parse_for_stage(ctx, record, stage)? else { return Ok(None) };
    if dropped_as_erased(ctx, stage, &resolved, erased) {
        return Ok(None);
    }
    if forward_if_merged(ctx, stage, store, &resolved)? {
        return Ok(None);
    }
    Ok(Some(resolved))
}

/// A record still in flight for a customer this stage erased: dropped (and counted),
/// so that it cannot bring the customer back.
pub fn dropped_as_erased(
    ctx: &mut crate::Ctx<'_>,
    stage: &str,
    resolved: &Resolved,
    erased: &crate::privacy::Erased,
) -> bool {
    if resolved.kind.is_broadcast() || matches!(resolved.kind, Kind::Privacy | Kind::PrivacyReport) {
        return false;
    }
    if !erased.holds(&resolved.canonical_id, ctx.now) {
        return false;
    }
    ctx.count("privacy_dropped", stage.to_owned());
    true
}

pub fn forward_key(id: &str) -> String {
    format!("fwd:{id}")
}

/// If this stage already moved `resolved.canonical_id`'s state to a survivor, send the
/// record on to it (addressed to this stage only) and return true. Merges can chain
/// (B into A while C's state is on its way to B), so state may arrive after its target
/// merged away; following the pointers makes every piece land on the final survivor.
pub fn forward_if_merged(
    ctx: &mut crate::Ctx<'_>,
    stage: &str,
    store: &str,
    resolved: &Resolved,
) -> Result<bool, crate::ProcessError> {
    if resolved.kind.is_broadcast() || matches!(resolved.kind, Kind::Merge | Kind::Privacy | Kind::PrivacyReport) {
        return Ok(false);
    }
    let Some(into) = ctx.get_json::<String>(store, &forward_key(&resolved.canonical_id))? else { return Ok(false) };
    let mut moved = resolved.clone();
    moved.canonical_id = into.clone();
    moved.stage = Some(stage.to_owned());
    ctx.emit_json(RESOLVED_TOPIC, &into, &moved)?;
    Ok(true)
}

/// For a merge record seen by a downstream stage: take the merged-away customer's state
/// out of `store` and send it, keyed by the survivor, back through `events.resolved`.
pub fn forward_state_on_merge(
    ctx: &mut crate::Ctx<'_>,
    stage: &str,
    store: &str,
    merge: &MergeBody,
    output_topic: Option<&str>,
) -> Result<(), crate::ProcessError> {
    ctx.put_json(store, &forward_key(&merge.from), &merge.into)?;
    let Some(state) = ctx.get_json::<Value>(store, &merge.from)? else { return Ok(()) };
    ctx.delete(store, &merge.from)?;
    if let Some(topic) = output_topic {
        ctx.emit_tombstone(topic, &merge.from);
    }
    let absorb = Resolved {
        kind: Kind::Absorb,
        canonical_id: merge.into.clone(),
        customer_id: None,
        at: ctx.now,
        body: serde_json::to_value(AbsorbBody { stage: stage.to_owned(), from: merge.from.clone(), state })
            .unwrap_or(Value::Null),
        stage: Some(stage.to_owned()),
    };
    ctx.emit_json(RESOLVED_TOPIC, &merge.into, &absorb)
}
