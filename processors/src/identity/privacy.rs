//! Data subject requests in the identity graph.
//!
//! 1. Intake (the `privacy.requests` partition) admits the request to the status actor
//!    and hands it to the owner of the identifier it names ([`Msg::PrivacyLocate`]).
//! 2. The identifier's owner finds its customer (a frozen identifier parks the request
//!    until it settles) and hands it to the customer actor ([`Msg::PrivacyCollect`]).
//! 3. The customer actor knows all of the subject: every identifier of the component
//!    and every canonical id merged into it. It plans the parts, exports the component
//!    or, for an erasure, deletes it and broadcasts [`Msg::PrivacyErase`] to every
//!    identity partition; either way it sends the order to each customer stage at each
//!    of the subject's canonical ids.
//! 4. Every identity partition adds the hashes to its copy of the suppression list and
//!    deletes what it owns of the subject: identifier state, parked messages,
//!    forwarding pointers, dedupe entries, matching candidates.
//!
//! From then on an input naming an erased identifier is dropped at intake (a redacted
//! letter, reason `erased_subject`), and a message still in flight for the subject is
//! dropped by the actor it reaches, so nothing recreates them.

use super::graph::{send, Envelope, Graph, IdState, Msg};
use super::identifier::Identifier;
use super::matching::MatchRecord;
use super::{DEDUPE_STORE, GRAPH_TOPIC, NAME, STORE};
use crate::privacy::{Hasher, Order, Report, RequestType};
use crate::processor::{Ctx, ProcessError};
use crate::resolved::RESOLVED_TOPIC;
use crate::topology::IDENTITY_REPARTITION;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashSet;

/// Store of the suppression list, a copy on every identity partition:
/// `s:<hash>` → [`Suppressed`].
pub const SUPPRESSED_STORE: &str = "suppressed";
const PREFIX: &str = "s:";

/// Why a hash is on the list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suppressed {
    /// `identifier` or `canonical`.
    pub kind: String,
    pub request_id: String,
    pub at: i64,
}

/// This partition's copy of the suppression list, in memory (loaded when the task
/// starts) and in its store.
#[derive(Debug)]
pub struct Suppression {
    hasher: Hasher,
    hashes: RefCell<HashSet<String>>,
}

impl Suppression {
    pub fn new(hasher: Hasher) -> Suppression {
        Suppression { hasher, hashes: RefCell::new(HashSet::new()) }
    }

    pub fn hasher(&self) -> &Hasher {
        &self.hasher
    }

    pub fn load(&self, ctx: &mut Ctx<'_>) -> Result<(), ProcessError> {
        let mut hashes = self.hashes.borrow_mut();
        hashes.clear();
        let mut after: Option<String> = None;
        loop {
            let rows = ctx.scan_after(SUPPRESSED_STORE, PREFIX, after.as_deref(), 4096)?;
            let Some((last, _)) = rows.last() else { return Ok(()) };
            after = Some(last.clone());
            hashes.extend(rows.into_iter().map(|(key, _)| key[PREFIX.len()..].to_owned()));
        }
    }

    pub fn len(&self) -> usize {
        self.hashes.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.borrow().is_empty()
    }

    /// Whether an identifier label or canonical id is suppressed (free while the list
    /// is empty).
    pub fn holds(&self, label_or_canonical: &str) -> bool {
        !self.is_empty() && self.hashes.borrow().contains(&self.hasher.hash(label_or_canonical))
    }

    pub fn holds_any<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> bool {
        !self.is_empty() && names.into_iter().any(|n| self.holds(n))
    }

    pub fn identifiers_held(&self, ids: &[Identifier]) -> bool {
        !self.is_empty() && ids.iter().any(|id| self.holds(&id.label()))
    }

    fn add(&self, ctx: &mut Ctx<'_>, hash: &str, entry: &Suppressed) -> Result<bool, ProcessError> {
        if self.hashes.borrow().contains(hash) {
            return Ok(false);
        }
        ctx.put_json(SUPPRESSED_STORE, &format!("{PREFIX}{hash}"), entry)?;
        self.hashes.borrow_mut().insert(hash.to_owned());
        Ok(true)
    }

    fn remove(&self, ctx: &mut Ctx<'_>, hash: &str) -> Result<bool, ProcessError> {
        if !self.hashes.borrow_mut().remove(hash) {
            return Ok(false);
        }
        ctx.delete(SUPPRESSED_STORE, &format!("{PREFIX}{hash}"))?;
        Ok(true)
    }
}

/// The customer stages every request visits, at each canonical id of the subject.
pub fn customer_stages() -> impl Iterator<Item = &'static str> {
    crate::PROCESSORS
        .iter()
        .filter(|(name, sub)| *sub == crate::subtopology::CUSTOMER && *name != crate::privacy::NAME)
        .map(|(name, _)| *name)
}

fn identity_part(partition: u32) -> String {
    format!("{NAME}/{partition}")
}

impl Graph<'_> {
    /// Every identity partition gets `msg` (the suppression list has a copy on each).
    fn broadcast(&self, ctx: &mut Ctx<'_>, at: i64, request_id: &str, msg: Msg) -> Result<(), ProcessError> {
        let bytes = serde_json::to_vec(&Envelope { at, msg })
            .map_err(|e| ProcessError::Encode { what: IDENTITY_REPARTITION.into(), message: e.to_string() })?;
        for p in 0..ctx.partitions(IDENTITY_REPARTITION) {
            ctx.emit(IDENTITY_REPARTITION, request_id.as_bytes(), Some(bytes.clone()), Some(p));
        }
        Ok(())
    }

    /// A request with nothing to do: its root, with why.
    fn nothing_to_do(&self, ctx: &mut Ctx<'_>, order: &Order, note: &str) -> Result<(), ProcessError> {
        let mut root = Report::new(&order.request_id, "root");
        root.note = Some(note.to_owned());
        root.send(ctx)
    }

    /// At the owner of the identifier a request names.
    pub(super) fn on_privacy_locate(
        &self,
        ctx: &mut Ctx<'_>,
        at: i64,
        order: Order,
        id: Identifier,
    ) -> Result<(), ProcessError> {
        if self.suppression.holds(&id.label()) {
            if order.kind == RequestType::Unsuppress {
                return self.unsuppress(ctx, at, &order, &id);
            }
            return self.nothing_to_do(ctx, &order, "already_erased");
        }
        let st: IdState = ctx.get_json(STORE, &super::identifier_key(&id.label()))?.unwrap_or_default();
        if st.pending.is_some() {
            // Frozen: the request waits for the identifier to settle, as inputs do.
            let msg = Msg::PrivacyLocate { order: Box::new(order), id: id.clone() };
            return self.park(ctx, &id.label(), Envelope { at, msg });
        }
        match (st.canonical, order.kind) {
            (_, RequestType::Unsuppress) => self.nothing_to_do(ctx, &order, "not_suppressed"),
            (None, _) => self.nothing_to_do(ctx, &order, "never_seen"),
            (Some(canonical), _) => send(ctx, at, Msg::PrivacyCollect { order: Box::new(order), canonical }),
        }
    }

    /// At the customer actor: the whole subject is here.
    pub(super) fn on_privacy_collect(
        &self,
        ctx: &mut Ctx<'_>,
        at: i64,
        order: Order,
        canonical: String,
    ) -> Result<(), ProcessError> {
        if let Some(into) = self.forwarded(ctx, &canonical)? {
            return send(ctx, at, Msg::PrivacyCollect { order: Box::new(order), canonical: into });
        }
        let Some(comp) = self.load_comp(ctx, &canonical)? else {
            // Erased meanwhile (by another request), or never completed.
            let note = if self.suppression.holds(&canonical) { "already_erased" } else { "never_seen" };
            return self.nothing_to_do(ctx, &order, note);
        };
        if comp.pending.is_some() {
            let msg = Msg::PrivacyCollect { order: Box::new(order), canonical: canonical.clone() };
            return self.park(ctx, &canonical, Envelope { at, msg });
        }
        let hasher = self.suppression.hasher();
        let labels: Vec<String> = comp.identifiers.iter().map(|l| l.identifier().label()).collect();
        // Every canonical id the subject had: state may sit under each in the stages.
        let targets: Vec<String> = if order.kind == RequestType::Rectification {
            vec![canonical.clone()]
        } else {
            std::iter::once(canonical.clone()).chain(comp.merged_from.iter().cloned()).collect()
        };
        let mut root = Report::new(&order.request_id, "root");
        root.subject_hashes = labels.iter().chain(&targets).map(|x| hasher.hash(x)).collect();
        for target in &targets {
            for stage in customer_stages() {
                root.planned.push(Report::stage_part(stage, hasher, target));
            }
        }
        if order.erases() {
            let identifiers: Vec<Identifier> = comp.identifiers.iter().map(|l| l.identifier()).collect();
            let aliases: Vec<String> = targets.clone();
            root.planned.extend((0..ctx.partitions(IDENTITY_REPARTITION)).map(identity_part));
            let mut deleted = 1;
            ctx.delete(STORE, &format!("comp:{canonical}"))?;
            deleted += self.answer_parked(ctx, at, &canonical)?;
            root.deleted(NAME, STORE, deleted);
            ctx.count("privacy_erasures", "customers");
            self.broadcast(
                ctx,
                at,
                &order.request_id,
                Msg::PrivacyErase {
                    request_id: order.request_id.clone(),
                    identifiers,
                    aliases,
                    hashes: root.subject_hashes.clone(),
                },
            )?;
        } else if order.kind.exports() {
            root.deleted(NAME, STORE, 1);
            root.export = Some(serde_json::to_value(&comp).unwrap_or_default());
        }
        for target in &targets {
            ctx.emit_json(RESOLVED_TOPIC, target, &order.to_stages(target, at))?;
        }
        root.send(ctx)
    }

    /// The erased customer's parked messages are dropped; those whose senders wait for
    /// an answer are answered, so nobody stays frozen. How many there were.
    fn answer_parked(&self, ctx: &mut Ctx<'_>, at: i64, canonical: &str) -> Result<u64, ProcessError> {
        let mut n = 0;
        for (key, bytes) in ctx.scan_prefix(STORE, &super::graph::mailbox_prefix(canonical), usize::MAX)? {
            ctx.delete(STORE, &key)?;
            n += 1;
            let Ok(env) = crate::cache::decode::<Envelope>(&bytes) else { continue };
            match env.msg {
                Msg::Propose { from, into, .. } => {
                    send(ctx, at, Msg::Refused { from: from.canonical_id, into, guard: "erased".into() })?
                }
                Msg::Join { canonical, id, create: false, .. } => {
                    send(ctx, at, Msg::JoinRefused { id, canonical, guard: "erased".into() })?
                }
                Msg::PrivacyCollect { order, .. } => self.nothing_to_do(ctx, &order, "already_erased")?,
                _ => ctx.count("privacy_dropped", "identity"),
            }
        }
        n += crate::privacy::delete_counted(ctx, STORE, &format!("mseq:{canonical}"))?;
        Ok(n)
    }

    /// On every identity partition: suppress, then delete what this partition owns of
    /// the subject.
    pub(super) fn on_privacy_erase(
        &self,
        ctx: &mut Ctx<'_>,
        at: i64,
        request_id: String,
        identifiers: Vec<Identifier>,
        aliases: Vec<String>,
        hashes: Vec<String>,
    ) -> Result<(), ProcessError> {
        let mut part = Report::new(&request_id, identity_part(ctx.partition));
        let (n, here) = (ctx.partitions(IDENTITY_REPARTITION), ctx.partition);
        let mine = |key: &str| crate::partition::partition_for(key.as_bytes(), n) == here;
        let mut added = 0;
        let kinds = identifiers.iter().map(|_| "identifier").chain(aliases.iter().map(|_| "canonical"));
        for (hash, kind) in hashes.iter().zip(kinds) {
            let entry = Suppressed { kind: kind.to_owned(), request_id: request_id.clone(), at };
            added += u64::from(self.suppression.add(ctx, hash, &entry)?);
        }
        part.stopped("suppressed_hashes", added);
        let mut deleted = 0;
        let mut dedupe = 0;
        for id in identifiers.iter().filter(|id| mine(id.owner_key())) {
            let label = id.label();
            deleted += crate::privacy::delete_counted(ctx, STORE, &super::identifier_key(&label))?;
            deleted += self.drop_mailbox(ctx, &label)?;
            dedupe += delete_dedupe(ctx, &label)?;
            ctx.emit_tombstone(GRAPH_TOPIC, &label);
            part.tombstoned(GRAPH_TOPIC, 1);
        }
        for alias in aliases.iter().filter(|a| mine(a)) {
            deleted += crate::privacy::delete_counted(ctx, STORE, &format!("fwd:{alias}"))?;
            deleted += crate::privacy::delete_counted(ctx, STORE, &format!("comp:{alias}"))?;
            deleted += self.drop_mailbox(ctx, alias)?;
        }
        if self.config.probabilistic.enabled {
            deleted += self.forget_candidates(ctx, &identifiers, &aliases)?;
        }
        part.deleted(NAME, STORE, deleted);
        part.deleted(NAME, DEDUPE_STORE, dedupe);
        part.send(ctx)
    }

    fn drop_mailbox(&self, ctx: &mut Ctx<'_>, owner: &str) -> Result<u64, ProcessError> {
        let mut n = 0;
        for (key, _) in ctx.scan_prefix(STORE, &super::graph::mailbox_prefix(owner), usize::MAX)? {
            ctx.delete(STORE, &key)?;
            n += 1;
        }
        n += crate::privacy::delete_counted(ctx, STORE, &format!("mseq:{owner}"))?;
        Ok(n)
    }

    /// Matching candidates of the subject, in this partition's blocking buckets (a scan
    /// of the buckets: erasures are rare).
    fn forget_candidates(
        &self,
        ctx: &mut Ctx<'_>,
        identifiers: &[Identifier],
        aliases: &[String],
    ) -> Result<u64, ProcessError> {
        let labels: HashSet<String> = identifiers.iter().map(Identifier::label).collect();
        let mut n = 0;
        let mut after: Option<String> = None;
        loop {
            let rows = ctx.scan_after(STORE, "blk:", after.as_deref(), 1024)?;
            let Some((last, _)) = rows.last() else { return Ok(n) };
            after = Some(last.clone());
            for (key, bytes) in rows {
                let Ok(mut bucket) = crate::cache::decode::<Vec<MatchRecord>>(&bytes) else { continue };
                let before = bucket.len();
                bucket.retain(|c| !labels.contains(&c.anchor) && !aliases.contains(&c.canonical));
                if bucket.len() == before {
                    continue;
                }
                n += (before - bucket.len()) as u64;
                if bucket.is_empty() {
                    ctx.delete(STORE, &key)?;
                } else {
                    ctx.put_json_owned(STORE, &key, bucket)?;
                }
            }
        }
    }

    /// Lift the suppression of `id` (its subject asked to come back) on every partition.
    fn unsuppress(&self, ctx: &mut Ctx<'_>, at: i64, order: &Order, id: &Identifier) -> Result<(), ProcessError> {
        let mut root = Report::new(&order.request_id, "root");
        root.subject_hashes = vec![self.suppression.hasher().hash(&id.label())];
        root.planned = (0..ctx.partitions(IDENTITY_REPARTITION)).map(identity_part).collect();
        root.send(ctx)?;
        let msg =
            Msg::PrivacyRelease { request_id: Some(order.request_id.clone()), hashes: root.subject_hashes.clone() };
        self.broadcast(ctx, at, &order.request_id, msg)
    }

    /// A new consent naming suppressed identifiers: they are released here at once and
    /// on the other partitions by messages that precede anything this input sends.
    pub(super) fn release(&self, ctx: &mut Ctx<'_>, at: i64, ids: &[Identifier]) -> Result<(), ProcessError> {
        if !self.suppression.identifiers_held(ids) {
            return Ok(());
        }
        let hashes: Vec<String> = ids
            .iter()
            .map(|id| self.suppression.hasher().hash(&id.label()))
            .filter(|h| self.suppression.hashes.borrow().contains(h))
            .collect();
        for hash in &hashes {
            self.suppression.remove(ctx, hash)?;
        }
        ctx.count("privacy_released", "consent");
        let bytes = serde_json::to_vec(&Envelope { at, msg: Msg::PrivacyRelease { request_id: None, hashes } })
            .map_err(|e| ProcessError::Encode { what: IDENTITY_REPARTITION.into(), message: e.to_string() })?;
        let here = ctx.partition;
        for p in (0..ctx.partitions(IDENTITY_REPARTITION)).filter(|p| *p != here) {
            ctx.emit(IDENTITY_REPARTITION, b"release", Some(bytes.clone()), Some(p));
        }
        Ok(())
    }

    pub(super) fn on_privacy_release(
        &self,
        ctx: &mut Ctx<'_>,
        request_id: Option<String>,
        hashes: Vec<String>,
    ) -> Result<(), ProcessError> {
        let mut released = 0;
        for hash in &hashes {
            released += u64::from(self.suppression.remove(ctx, hash)?);
        }
        let Some(request_id) = request_id else { return Ok(()) };
        let mut part = Report::new(&request_id, identity_part(ctx.partition));
        part.stopped("released_hashes", released);
        part.send(ctx)
    }

    /// A message still in flight for an erased subject: true when it was dealt with
    /// here (dropped, or answered so that its sender does not stay frozen).
    pub(super) fn drop_if_erased(&self, ctx: &mut Ctx<'_>, at: i64, msg: &Msg) -> Result<bool, ProcessError> {
        if self.suppression.is_empty() {
            return Ok(false);
        }
        let held = |name: &str| self.suppression.holds(name);
        let dropped = match msg {
            Msg::Resolve(r) => {
                if !self.suppression.identifiers_held(&r.identifiers) {
                    return Ok(false);
                }
                // The identifiers this input froze on its way wait for it: release them.
                for label in &r.frozen {
                    if let Some(id) = Identifier::from_label(label) {
                        let canonical = String::new();
                        send(ctx, at, Msg::JoinRefused { id, canonical, guard: "erased".into() })?;
                    }
                }
                true
            }
            Msg::Link { id, canonical, .. } => {
                if !(held(&id.label()) || held(canonical)) {
                    return Ok(false);
                }
                let st: IdState = ctx.get_json(STORE, &super::identifier_key(&id.label()))?.unwrap_or_default();
                if !held(&id.label()) && st.pending == Some(super::graph::Pending::Probe) {
                    // The probe that froze it waits for this link: settle it as refused.
                    refuse_join(ctx, at, id, canonical)?;
                }
                true
            }
            Msg::Join { canonical, id, create, .. } => {
                if !(held(canonical) || held(&id.label())) {
                    return Ok(false);
                }
                if !create && !held(&id.label()) {
                    refuse_join(ctx, at, id, canonical)?;
                }
                true
            }
            Msg::Joined { id, .. } | Msg::Repoint { id, .. } | Msg::Unlink { id } | Msg::Removed { id, .. }
                if held(&id.label()) =>
            {
                true
            }
            Msg::Joined { id, canonical, .. } | Msg::Repoint { id, canonical, .. } if held(canonical) => {
                // The identifier joined a customer that is gone: it settles unattached.
                if matches!(msg, Msg::Joined { .. }) {
                    refuse_join(ctx, at, id, canonical)?;
                }
                true
            }
            Msg::MergeRequest { from, into, .. } | Msg::Accepted { from, into } => held(from) || held(into),
            Msg::Propose { from, into, .. } => {
                if held(into) && !held(&from.canonical_id) {
                    let (from, into) = (from.canonical_id.clone(), into.clone());
                    send(ctx, at, Msg::Refused { from, into, guard: "erased".into() })?;
                    true
                } else {
                    held(&from.canonical_id)
                }
            }
            Msg::Remove { canonical, .. } => held(canonical),
            Msg::Candidate { record, .. } => held(&record.anchor) || held(&record.canonical),
            _ => false,
        };
        if dropped {
            ctx.count("privacy_dropped", "identity");
        }
        Ok(dropped)
    }
}

/// Answer a join the erased customer can no longer take: the identifier settles unattached.
fn refuse_join(ctx: &mut Ctx<'_>, at: i64, id: &Identifier, canonical: &str) -> Result<(), ProcessError> {
    send(ctx, at, Msg::JoinRefused { id: id.clone(), canonical: canonical.to_owned(), guard: "erased".into() })
}

/// The dedupe entries of inputs anchored at `label` (they are keyed `label\u{1}event_id`).
fn delete_dedupe(ctx: &mut Ctx<'_>, label: &str) -> Result<u64, ProcessError> {
    let mut n = 0;
    for (key, _) in ctx.scan_prefix(DEDUPE_STORE, &dedupe_prefix(label), usize::MAX)? {
        n += u64::from(ctx.delete_expiring(DEDUPE_STORE, key.as_bytes())?);
    }
    Ok(n)
}

fn dedupe_prefix(label: &str) -> String {
    format!("{label}\u{1}")
}

/// The dedupe key of an input anchored at `label`: erasing the identifier finds it.
pub fn dedupe_key(label: &str, event_id: &str) -> String {
    format!("{}{event_id}", dedupe_prefix(label))
}
