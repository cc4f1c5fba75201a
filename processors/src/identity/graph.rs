//! The partition-parallel identity graph.
//!
//! Identifiers of one customer hash to different partitions, so the graph is built by
//! actors that own their piece of it and talk through one internal topic
//! (`chorus-identity-repartition`, co-partitioned with `events.raw`):
//!
//! * an **identifier actor** (key `type:value`, the partition of that key) knows which
//!   customer its identifier belongs to;
//! * a **customer actor** (key = canonical id, the partition of that key) holds the
//!   component: its identifiers with how each was linked, merge history, exclusions;
//! * a **blocking-key actor** holds the probabilistic candidates sharing that key.
//!
//! The rules that make any partitioning and any interleaving end at the graph one thread
//! would build:
//! 1. Merges always go from the larger canonical id into the smaller. Forwarding
//!    pointers (`fwd:<id>`) therefore only point downwards, can never form a cycle, and a
//!    message for a merged-away customer is re-sent to its survivor.
//! 2. A customer has at most one outgoing merge proposal in flight. While it waits for the
//!    answer it is frozen: every message that would change it waits in its mailbox and is
//!    replayed (or forwarded to the survivor) when the answer comes. The survivor decides
//!    with both components in hand, so the guards see exactly what the merge would create.
//!    Waits only point to smaller ids, so there is no deadlock.
//! 3. An identifier joins a customer through the customer's actor (which checks the
//!    guards); while the answer is on its way the identifier is frozen the same way.
//! 4. An identifier's canonical id only moves down within one lineage (merges), so
//!    repoints commute; an unlink starts a new lineage and excludes the old customer.
//!
//! Every step runs inside the identity task's transaction, so a crash replays whole
//! steps and a merge is emitted once.

use super::config::IdentityConfig;
use super::identifier::Identifier;
use super::matching::{self, MatchRecord};
use super::{canonical_id_for, GRAPH_TOPIC, MERGES_TOPIC, REVIEW_TOPIC, STORE};
use crate::processor::{Ctx, ProcessError};
use crate::resolved::{Kind, MergeBody, Resolved, RESOLVED_TOPIC};
use crate::topology::IDENTITY_REPARTITION;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Why a link exists (or was proposed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// `deterministic` (seen together on one input) or `probabilistic`.
    pub rule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// Probabilistic links: comparison level per field (`exact`, `jw>=0.94`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub comparisons: BTreeMap<String, String>,
    /// The identifiers (labels) whose co-occurrence or similarity made the link.
    pub identifiers: Vec<String>,
    /// The identifier carrying the link may not merge two existing customers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

impl Evidence {
    pub fn deterministic(identifiers: Vec<String>) -> Evidence {
        Evidence { rule: "deterministic".into(), score: None, comparisons: BTreeMap::new(), identifiers, shared: false }
    }
}

/// One identifier of a component with how it joined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkedIdentifier {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
    pub rule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    pub first_seen: i64,
}

impl LinkedIdentifier {
    pub fn identifier(&self) -> Identifier {
        Identifier::raw(&self.kind, &self.value)
    }

    fn new(id: &Identifier, evidence: &Evidence, at: i64) -> LinkedIdentifier {
        LinkedIdentifier {
            kind: id.kind.clone(),
            value: id.value.clone(),
            rule: evidence.rule.clone(),
            score: evidence.score,
            first_seen: at,
        }
    }
}

/// A merge (or, with rule `unlink`, a split) as emitted on `identity.merges`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeRecord {
    pub from: String,
    pub into: String,
    pub rule: String,
    pub score: Option<f64>,
    /// Probabilistic merges: the level of each compared field.
    #[serde(default)]
    pub comparisons: BTreeMap<String, String>,
    pub identifiers: Vec<String>,
    pub at: i64,
}

/// A customer as the identity graph knows it (store key `comp:<canonical id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Component {
    pub canonical_id: String,
    pub customer_id: Option<String>,
    pub identifiers: Vec<LinkedIdentifier>,
    /// Every canonical id merged into this one, directly or not.
    #[serde(default)]
    pub merged_from: Vec<String>,
    /// Merges into this customer, oldest first.
    #[serde(default)]
    pub history: Vec<MergeRecord>,
    /// Customers this one must never merge with (an operator unlinked them).
    #[serde(default)]
    pub excluded: Vec<String>,
    /// The latest links a guard refused at this customer (most recent last).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refusals: Vec<GuardRefusal>,
    /// The customer this one has proposed to merge into, awaiting the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    pub created_at: i64,
}

impl Component {
    fn aliases(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.canonical_id).chain(self.merged_from.iter())
    }

    fn holds(&self, id: &Identifier) -> bool {
        self.identifiers.iter().any(|l| l.kind == id.kind && l.value == id.value)
    }
}

/// A link a guard refused, kept on the customer that refused it (visible in
/// `GET /v1/identity/...`). The other side is named by hashes only
/// ([`crate::privacy::Hasher`]): this customer's state must hold nothing of another
/// customer's, which an erasure of theirs could not find. An operator checks a
/// suspect identifier by its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardRefusal {
    pub guard: String,
    /// Hashes of the identifiers that asked to join (the first few of a refused
    /// customer's).
    #[serde(alias = "identifiers")]
    pub identifier_hashes: Vec<String>,
    /// Hash of the other customer's canonical id, when a merge was refused.
    #[serde(default, alias = "customer", skip_serializing_if = "Option::is_none")]
    pub customer_hash: Option<String>,
    pub at: i64,
}

/// Refusals kept per customer.
const REFUSALS_KEPT: usize = 20;

impl Component {
    fn refused(
        &mut self,
        hasher: &crate::privacy::Hasher,
        guard: &str,
        identifiers: Vec<String>,
        customer: Option<String>,
        at: i64,
    ) {
        // Refusals stored before they were hashed named identifiers as `type:value`.
        let hash_legacy = |x: &mut String| {
            if x.contains(':') || x.len() != 32 {
                *x = hasher.hash(x);
            }
        };
        for refusal in &mut self.refusals {
            refusal.identifier_hashes.iter_mut().for_each(hash_legacy);
            refusal.customer_hash.iter_mut().for_each(hash_legacy);
        }
        self.refusals.push(GuardRefusal {
            guard: guard.to_owned(),
            identifier_hashes: identifiers.iter().map(|l| hasher.hash(l)).collect(),
            customer_hash: customer.map(|c| hasher.hash(&c)),
            at,
        });
        if self.refusals.len() > REFUSALS_KEPT {
            self.refusals.remove(0);
        }
    }
}

/// What an identifier's actor knows (store key `id:<type>:<value>`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IdState {
    /// The customer holding this identifier (possibly merged away since: follow `fwd:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canonical: Option<String>,
    /// The customer's business id, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// A join or an unlink in flight; the identifier is frozen until it is answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
    /// Hashes of the identifiers this one has already sent a link for (skip repeating
    /// them); hashes, so that nothing here names another customer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub linked: Vec<String>,
    /// How many times an operator unlinked it (new lineages get new canonical ids).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pending {
    Join(String),
    Unlink,
    /// An input passed this unknown identifier on to the next of its identifiers; the
    /// identifier waits for the link that input will send back, so that no other input
    /// creates a second customer for it meanwhile.
    Probe,
}

/// Most identifiers remembered in [`IdState::linked`].
const LINKED_MEMORY: usize = 64;

/// Messages between the identity actors, on the internal topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Msg {
    /// Raw partition → the owner of the input's most specific identifier.
    Resolve(Box<ResolveMsg>),
    /// → identifier owner: `id` was seen with (or matched) a member of `canonical`.
    Link { id: Identifier, canonical: String, evidence: Evidence },
    /// → customer owner: add `id`. `create` starts the customer if it does not exist.
    Join {
        canonical: String,
        id: Identifier,
        evidence: Evidence,
        #[serde(default)]
        create: bool,
        #[serde(default)]
        excluded: Vec<String>,
    },
    /// → identifier owner: the join was accepted by (live) customer `canonical`.
    Joined { id: Identifier, canonical: String, customer_id: Option<String> },
    /// → identifier owner: the join was refused by a guard.
    JoinRefused { id: Identifier, canonical: String, guard: String },
    /// → owner of `from`: customers `from` (larger id) and `into` should be one.
    MergeRequest { from: String, into: String, evidence: Evidence },
    /// → owner of `into`: `from` (frozen until answered) proposes to merge into it.
    Propose { from: Box<Component>, into: String, evidence: Evidence },
    /// → owner of `from`: the proposal was accepted; `from` now forwards to `into`.
    Accepted { from: String, into: String },
    /// → owner of `from`: a guard refused the proposal.
    Refused { from: String, into: String, guard: String },
    /// → identifier owner: its customer is now `canonical` (or got a business id).
    Repoint { id: Identifier, canonical: String, customer_id: Option<String> },
    /// → blocking-key owner: compare `record` with the candidates kept under `key`.
    Candidate { key: String, window: Option<i64>, record: Box<MatchRecord> },
    /// → identifier owner (an operator's unlink): leave its customer.
    Unlink { id: Identifier },
    /// → customer owner: remove `id`.
    Remove { canonical: String, id: Identifier },
    /// → identifier owner: removed from `from`; start anew, never to merge with it.
    Removed { id: Identifier, from: String },
    /// → identifier owner: a data subject request names `id`.
    PrivacyLocate { order: Box<crate::privacy::Order>, id: Identifier },
    /// → customer owner: carry out the request for the whole customer.
    PrivacyCollect { order: Box<crate::privacy::Order>, canonical: String },
    /// → every identity partition: suppress `hashes`; delete what the partition owns of
    /// `identifiers` and `aliases` (the subject's canonical ids).
    PrivacyErase { request_id: String, identifiers: Vec<Identifier>, aliases: Vec<String>, hashes: Vec<String> },
    /// → every identity partition: lift the suppression of `hashes`.
    PrivacyRelease {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        hashes: Vec<String>,
    },
}

/// An input to resolve: an event, message request or consent change with its usable
/// identifiers, most specific first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolveMsg {
    pub kind: Kind,
    pub identifiers: Vec<Identifier>,
    /// Which identifier's owner is looking at it (owners of unknown identifiers pass
    /// it on to the next).
    #[serde(default)]
    pub probe: usize,
    /// Nothing was known along the probe: the owner of `identifiers[probe]` creates.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub create: bool,
    /// Unknown identifiers the probe passed (frozen until linked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frozen: Vec<String>,
    pub body: Value,
    /// Events are processed once per `event_id` within the dedupe window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// Fields for probabilistic matching (identify events with traits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_fields: Option<BTreeMap<String, String>>,
}

impl ResolveMsg {
    /// An input to resolve, starting at its most specific identifier.
    pub fn new(kind: Kind, identifiers: Vec<Identifier>, body: Value) -> ResolveMsg {
        ResolveMsg {
            kind,
            identifiers,
            probe: 0,
            create: false,
            frozen: Vec::new(),
            body,
            event_id: None,
            match_fields: None,
        }
    }
}

/// A message with the event time it carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub at: i64,
    #[serde(flatten)]
    pub msg: Msg,
}

/// The owner key (and so partition) of a message.
pub fn route(msg: &Msg) -> String {
    match msg {
        Msg::Resolve(r) => r.identifiers.get(r.probe).map(|id| id.owner_key().to_owned()).unwrap_or_default(),
        Msg::Link { id, .. }
        | Msg::Joined { id, .. }
        | Msg::JoinRefused { id, .. }
        | Msg::Repoint { id, .. }
        | Msg::Unlink { id }
        | Msg::Removed { id, .. } => id.owner_key().to_owned(),
        Msg::Join { canonical, .. } | Msg::Remove { canonical, .. } => canonical.clone(),
        Msg::MergeRequest { from, .. } | Msg::Accepted { from, .. } | Msg::Refused { from, .. } => from.clone(),
        Msg::Propose { into, .. } => into.clone(),
        Msg::Candidate { key, .. } => key.clone(),
        Msg::PrivacyLocate { id, .. } => id.owner_key().to_owned(),
        Msg::PrivacyCollect { canonical, .. } => canonical.clone(),
        // Broadcast: sent to every partition explicitly.
        Msg::PrivacyErase { request_id, .. } => request_id.clone(),
        Msg::PrivacyRelease { hashes, .. } => hashes.first().cloned().unwrap_or_default(),
    }
}

/// Send a message to its owner through the internal topic.
pub fn send(ctx: &mut Ctx<'_>, at: i64, msg: Msg) -> Result<(), ProcessError> {
    let key = route(&msg);
    ctx.emit_json(IDENTITY_REPARTITION, &key, &Envelope { at, msg })
}

fn id_key(id: &Identifier) -> String {
    format!("id:{}", id.label())
}

fn comp_key(canonical: &str) -> String {
    format!("comp:{canonical}")
}

fn fwd_key(canonical: &str) -> String {
    format!("fwd:{canonical}")
}

/// Keys of an actor's parked messages. Identifiers and canonical ids never hold
/// control characters, so `\u{1}` ends the owner unambiguously.
pub(super) fn mailbox_prefix(owner: &str) -> String {
    format!("mbox:{owner}\u{1}")
}

/// The identity stage's graph logic, with the topology's rules.
pub struct Graph<'c> {
    pub config: &'c IdentityConfig,
    /// How long an `event_id` is remembered for deduplication.
    pub dedupe_ms: i64,
    /// This partition's copy of the suppression list (erased subjects).
    pub suppression: &'c super::privacy::Suppression,
}

impl Graph<'_> {
    /// Handle one message from the internal topic.
    pub fn handle(&self, ctx: &mut Ctx<'_>, env: Envelope) -> Result<(), ProcessError> {
        // An unlink is an operator's command, stamped with the wall clock of the API
        // that took it: it happens at the task's time and must not move event time
        // (under `clock: event` a replay of last year would jump to today).
        let at = if matches!(
            env.msg,
            Msg::Unlink { .. }
                | Msg::PrivacyLocate { .. }
                | Msg::PrivacyCollect { .. }
                | Msg::PrivacyErase { .. }
                | Msg::PrivacyRelease { .. }
        ) {
            ctx.now
        } else {
            ctx.observe_event_time(env.at);
            env.at
        };
        if self.drop_if_erased(ctx, at, &env.msg)? {
            return Ok(());
        }
        match env.msg {
            Msg::Resolve(r) => self.on_resolve(ctx, at, *r),
            Msg::Link { id, canonical, evidence } => self.on_link(ctx, at, id, canonical, evidence),
            Msg::Join { canonical, id, evidence, create, excluded } => {
                self.on_join(ctx, at, canonical, id, evidence, create, excluded)
            }
            Msg::Joined { id, canonical, customer_id } => self.settle_identifier(ctx, &id, |st| {
                st.canonical = Some(canonical);
                st.customer_id = customer_id;
            }),
            Msg::JoinRefused { id, .. } => {
                self.settle_identifier(ctx, &id, |_| {})?;
                // Refused while unknown: nothing to remember.
                if self.load_id(ctx, &id)? == IdState::default() {
                    ctx.delete(STORE, &id_key(&id))?;
                }
                Ok(())
            }
            Msg::MergeRequest { from, into, evidence } => self.on_merge_request(ctx, at, from, into, evidence),
            Msg::Propose { from, into, evidence } => self.on_propose(ctx, at, *from, into, evidence),
            Msg::Accepted { from, into } => self.on_accepted(ctx, at, from, into),
            Msg::Refused { from, .. } => self.on_refused(ctx, from),
            Msg::Repoint { id, canonical, customer_id } => self.on_repoint(ctx, id, canonical, customer_id),
            Msg::Candidate { key, window, record } => self.on_candidate(ctx, at, key, window, *record),
            Msg::Unlink { id } => self.on_unlink(ctx, at, id),
            Msg::Remove { canonical, id } => self.on_remove(ctx, at, canonical, id),
            Msg::Removed { id, from } => self.on_removed(ctx, at, id, from),
            Msg::PrivacyLocate { order, id } => self.on_privacy_locate(ctx, at, *order, id),
            Msg::PrivacyCollect { order, canonical } => self.on_privacy_collect(ctx, at, *order, canonical),
            Msg::PrivacyErase { request_id, identifiers, aliases, hashes } => {
                self.on_privacy_erase(ctx, at, request_id, identifiers, aliases, hashes)
            }
            Msg::PrivacyRelease { request_id, hashes } => self.on_privacy_release(ctx, request_id, hashes),
        }
    }

    // ----- identifier actors -----

    fn load_id(&self, ctx: &mut Ctx<'_>, id: &Identifier) -> Result<IdState, ProcessError> {
        Ok(ctx.get_json(STORE, &id_key(id))?.unwrap_or_default())
    }

    fn save_id(&self, ctx: &mut Ctx<'_>, id: &Identifier, st: &IdState) -> Result<(), ProcessError> {
        ctx.put_json(STORE, &id_key(id), st)
    }

    /// Park a message for a frozen actor: one entry per message, numbered in arrival
    /// order (a frozen customer may collect many inputs; appending stays O(1)).
    pub(super) fn park(&self, ctx: &mut Ctx<'_>, owner: &str, env: Envelope) -> Result<(), ProcessError> {
        let seq_key = format!("mseq:{owner}");
        let seq: u64 = ctx.get_json(STORE, &seq_key)?.unwrap_or(0);
        ctx.put_json(STORE, &format!("{}{seq:020}", mailbox_prefix(owner)), &env)?;
        ctx.put_json(STORE, &seq_key, &(seq + 1))?;
        ctx.count("identity_parked", "message");
        Ok(())
    }

    /// Replay parked messages of an actor that is no longer frozen, in arrival order,
    /// until one freezes it again (the rest stay parked). Each message is taken off the
    /// store before it is handled, so a replay nested in a handler never repeats one.
    fn replay(
        &self,
        ctx: &mut Ctx<'_>,
        owner: &str,
        frozen: impl Fn(&mut Ctx<'_>) -> Result<bool, ProcessError>,
    ) -> Result<(), ProcessError> {
        let prefix = mailbox_prefix(owner);
        loop {
            if frozen(ctx)? {
                return Ok(());
            }
            let Some((key, bytes)) = ctx.scan_prefix(STORE, &prefix, 1)?.pop() else {
                return ctx.delete(STORE, &format!("mseq:{owner}"));
            };
            ctx.delete(STORE, &key)?;
            let env: Envelope = crate::cache::decode(&bytes).map_err(|message| {
                ProcessError::Store(crate::store::StoreError::Corrupt { key: key.clone(), message })
            })?;
            self.handle(ctx, env)?;
        }
    }

    /// Resolve an input at the owner of `identifiers[probe]`. Owners of identifiers the
    /// graph does not know pass it on to the next one, so an input joins the customer
    /// of its most specific *known* identifier (no transient customer, no merge) and a
    /// customer is created only when none is known.
    fn on_resolve(&self, ctx: &mut Ctx<'_>, at: i64, mut r: ResolveMsg) -> Result<(), ProcessError> {
        let Some(here) = r.identifiers.get(r.probe).cloned() else { return Ok(()) };
        let mut st = self.load_id(ctx, &here)?;
        let probed_here = r.frozen.contains(&here.label());
        let released = matches!(st.pending, Some(Pending::Probe)) && probed_here && r.create;
        // Most inputs name a known identifier with nothing new to remember: then its
        // state is not written again (a store write and a changelog record saved).
        let mut changed = released;
        match st.pending {
            // The input that froze this identifier comes back to create its customer.
            Some(Pending::Probe) if released => st.pending = None,
            Some(_) => return self.park(ctx, &here.label(), Envelope { at, msg: Msg::Resolve(Box::new(r)) }),
            None => {}
        }
        if r.probe == 0 && !r.create {
            if let Some(event_id) = &r.event_id {
                // Keyed by the anchor too, so that erasing the identifier finds them.
                let key = super::privacy::dedupe_key(&here.label(), event_id);
                if ctx.get_bytes(super::DEDUPE_STORE, key.as_bytes())?.is_some() {
                    ctx.count("duplicates", "events.raw");
                    return Ok(());
                }
                let expires = ctx.now.saturating_add(self.dedupe_ms);
                ctx.put_bytes(super::DEDUPE_STORE, key.as_bytes(), &[], Some(expires))?;
            }
        }
        // A shared identifier (a family's device) is no anchor when the input carries
        // an identifier that may merge: the input belongs to that one's customer.
        let founder = r.identifiers.iter().position(|id| self.merges(id));
        // Nor is a customer with another business id: the input's own customer_id is
        // not known yet (a family member's first login on a shared phone number).
        let other_customer = st
            .customer_id
            .as_ref()
            .is_some_and(|known| r.identifiers.iter().any(|id| id.kind == "customer_id" && id.value != *known));
        let anchor_ok =
            st.canonical.is_some() && !other_customer && (r.create || founder.is_none() || self.merges(&here));
        if !anchor_ok {
            // On to the next identifier or, when nobody is known, back to the owner of the
            // most specific identifier that may merge, which creates the customer.
            let founder = founder.unwrap_or(0);
            let next = if !r.create && r.probe + 1 < r.identifiers.len() {
                Some((r.probe + 1, false))
            } else {
                (r.probe != founder).then_some((founder, true))
            };
            if let Some((probe, create)) = next {
                // Passed over while unknown: frozen until the link this input owes it.
                if st.canonical.is_none() {
                    st.pending = Some(Pending::Probe);
                    self.save_id(ctx, &here, &st)?;
                    r.frozen.push(here.label());
                }
                r.probe = probe;
                r.create = create;
                return send(ctx, at, Msg::Resolve(Box::new(r)));
            }
        }
        let labels: Vec<String> = r.identifiers.iter().map(Identifier::label).collect();
        let evidence = Evidence::deterministic(labels);
        let canonical = match &st.canonical {
            Some(c) => c.clone(),
            None => {
                // Named after its founding identifier: inputs racing to create the same
                // customer agree on its id.
                // An erased customer's id is never reused: its records may still be in
                // flight, and the stages drop them (a returning subject starts anew).
                while self.suppression.holds(&canonical_id_for(&here, st.generation)) {
                    st.generation += 1;
                }
                let c = canonical_id_for(&here, st.generation);
                st.canonical = Some(c.clone());
                changed = true;
                if here.kind == "customer_id" {
                    st.customer_id = Some(here.value.clone());
                }
                let msg = Msg::Join {
                    canonical: c.clone(),
                    id: here.clone(),
                    evidence: evidence.clone(),
                    create: true,
                    excluded: Vec::new(),
                };
                send(ctx, at, msg)?;
                c
            }
        };
        let here_merges = self.merges(&here);
        for id in r.identifiers.iter().filter(|id| **id != here) {
            let label = id.label();
            // Remembered by hash: this identifier's state must not name another
            // customer's identifier, which an erasure of theirs could not find.
            let hash = self.suppression.hasher().hash(&label);
            // A frozen identifier waits for this link: always send it.
            if st.linked.contains(&hash) && !r.frozen.contains(&label) {
                continue;
            }
            if st.linked.len() < LINKED_MEMORY {
                st.linked.retain(|l| !l.contains(':'));
                st.linked.push(hash);
                changed = true;
            }
            // A link made through a shared identifier (on either end) never merges
            // two existing customers.
            let evidence = Evidence { shared: !here_merges || !self.merges(id), ..evidence.clone() };
            send(ctx, at, Msg::Link { id: id.clone(), canonical: canonical.clone(), evidence })?;
        }
        if changed {
            self.save_id(ctx, &here, &st)?;
        }
        if let Some(fields) = r.match_fields {
            self.send_candidates(ctx, at, &canonical, &r.identifiers[0], fields)?;
        }
        let customer_id = st
            .customer_id
            .clone()
            .or_else(|| r.identifiers.iter().find(|i| i.kind == "customer_id").map(|i| i.value.clone()));
        ctx.count("resolved", if customer_id.is_some() { "known" } else { "anonymous" });
        let resolved =
            Resolved { kind: r.kind, canonical_id: canonical.clone(), customer_id, at, body: r.body, stage: None };
        ctx.emit_json(RESOLVED_TOPIC, &canonical, &resolved)?;
        if released {
            self.settle_identifier(ctx, &here, |_| {})?;
        }
        Ok(())
    }

    fn merges(&self, id: &Identifier) -> bool {
        self.config.identifier_type(&id.kind).is_none_or(|t| t.merges)
    }

    fn on_link(
        &self,
        ctx: &mut Ctx<'_>,
        at: i64,
        id: Identifier,
        canonical: String,
        evidence: Evidence,
    ) -> Result<(), ProcessError> {
        let mut st = self.load_id(ctx, &id)?;
        match st.pending {
            // The link a probing input owed this identifier: join as if unknown.
            Some(Pending::Probe) => st.pending = None,
            Some(_) => return self.park(ctx, &id.label(), Envelope { at, msg: Msg::Link { id, canonical, evidence } }),
            None => {}
        }
        match st.canonical.clone() {
            None => {
                st.pending = Some(Pending::Join(canonical.clone()));
                self.save_id(ctx, &id, &st)?;
                let msg = Msg::Join { canonical, id, evidence, create: false, excluded: Vec::new() };
                send(ctx, at, msg)
            }
            Some(mine) if mine == canonical => Ok(()),
            Some(mine) => {
                let (from, into) = if mine > canonical { (mine, canonical) } else { (canonical, mine) };
                send(ctx, at, Msg::MergeRequest { from, into, evidence })
            }
        }
    }

    /// An identifier's join was answered: apply `update`, unfreeze, replay its mailbox.
    fn settle_identifier(
        &self,
        ctx: &mut Ctx<'_>,
        id: &Identifier,
        update: impl FnOnce(&mut IdState),
    ) -> Result<(), ProcessError> {
        let mut st = self.load_id(ctx, id)?;
        st.pending = None;
        update(&mut st);
        self.save_id(ctx, id, &st)?;
        let key = id_key(id);
        self.replay(ctx, &id.label(), |ctx| {
            Ok(ctx.get_json::<IdState>(STORE, &key)?.is_some_and(|s| s.pending.is_some()))
        })
    }

    fn on_repoint(
        &self,
        ctx: &mut Ctx<'_>,
        id: Identifier,
        canonical: String,
        customer_id: Option<String>,
    ) -> Result<(), ProcessError> {
        let mut st = self.load_id(ctx, &id)?;
        st.canonical = Some(match st.canonical.take() {
            Some(current) if current < canonical => current,
            _ => canonical,
        });
        if customer_id.is_some() {
            st.customer_id = customer_id;
        }
        self.save_id(ctx, &id, &st)
    }

    fn on_unlink(&self, ctx: &mut Ctx<'_>, at: i64, id: Identifier) -> Result<(), ProcessError> {
        let mut st = self.load_id(ctx, &id)?;
        if st.pending.is_some() {
            return self.park(ctx, &id.label(), Envelope { at, msg: Msg::Unlink { id } });
        }
        let Some(canonical) = st.canonical.clone() else {
            ctx.count("identity_unlinks", "unknown_identifier");
            return Ok(());
        };
        st.pending = Some(Pending::Unlink);
        self.save_id(ctx, &id, &st)?;
        send(ctx, at, Msg::Remove { canonical, id })
    }

    fn on_removed(&self, ctx: &mut Ctx<'_>, at: i64, id: Identifier, from: String) -> Result<(), ProcessError> {
        let mut st = self.load_id(ctx, &id)?;
        st.generation += 1;
        let fresh = canonical_id_for(&id, st.generation);
        st.canonical = Some(fresh.clone());
        st.customer_id = (id.kind == "customer_id").then(|| id.value.clone());
        st.linked.clear();
        self.save_id(ctx, &id, &st)?;
        let evidence = Evidence { rule: "unlink".into(), ..Evidence::deterministic(vec![id.label()]) };
        let split = MergeRecord {
            from: from.clone(),
            into: fresh.clone(),
            rule: "unlink".into(),
            score: None,
            comparisons: BTreeMap::new(),
            identifiers: vec![id.label()],
            at,
        };
        ctx.emit_json(MERGES_TOPIC, &from, &split)?;
        ctx.count("identity_unlinks", "done");
        send(ctx, at, Msg::Join { canonical: fresh, id: id.clone(), evidence, create: true, excluded: vec![from] })?;
        self.settle_identifier(ctx, &id, |_| {})
    }

    // ----- customer actors -----

    pub(super) fn forwarded(&self, ctx: &mut Ctx<'_>, canonical: &str) -> Result<Option<String>, ProcessError> {
        ctx.get_json(STORE, &fwd_key(canonical))
    }

    pub(super) fn load_comp(&self, ctx: &mut Ctx<'_>, canonical: &str) -> Result<Option<Component>, ProcessError> {
        ctx.get_json(STORE, &comp_key(canonical))
    }

    fn save_comp(&self, ctx: &mut Ctx<'_>, comp: &Component) -> Result<(), ProcessError> {
        ctx.put_json(STORE, &comp_key(&comp.canonical_id), comp)
    }

    #[allow(clippy::too_many_arguments)]
    fn on_join(
        &self,
        ctx: &mut Ctx<'_>,
        at: i64,
        canonical: String,
        id: Identifier,
        evidence: Evidence,
        create: bool,
        excluded: Vec<String>,
    ) -> Result<(), ProcessError> {
        if let Some(into) = self.forwarded(ctx, &canonical)? {
            return send(ctx, at, Msg::Join { canonical: into, id, evidence, create: false, excluded });
        }
        let Some(mut comp) = self.load_comp(ctx, &canonical)? else {
            let comp = Component {
                canonical_id: canonical.clone(),
                customer_id: (id.kind == "customer_id").then(|| id.value.clone()),
                identifiers: vec![LinkedIdentifier::new(&id, &evidence, at)],
                merged_from: Vec::new(),
                history: Vec::new(),
                excluded,
                refusals: Vec::new(),
                pending: None,
                created_at: at,
            };
            self.save_comp(ctx, &comp)?;
            self.emit_graph(ctx, &id, &canonical, &evidence.rule, at)?;
            ctx.count("customers_created", "identity");
            ctx.count("component_size", "1");
            if !create {
                send(ctx, at, Msg::Joined { id, canonical, customer_id: comp.customer_id })?;
            }
            return Ok(());
        };
        if comp.pending.is_some() {
            let msg = Msg::Join { canonical: canonical.clone(), id, evidence, create, excluded };
            return self.park(ctx, &canonical, Envelope { at, msg });
        }
        if comp.holds(&id) {
            if !create {
                send(ctx, at, Msg::Joined { id, canonical, customer_id: comp.customer_id })?;
            }
            return Ok(());
        }
        let joining = [LinkedIdentifier::new(&id, &evidence, at)];
        if let Some(guard) = self.refusal(&comp, &joining, &[], &[]) {
            ctx.count("guard_refusals", guard);
            comp.refused(self.suppression.hasher(), guard, vec![id.label()], None, at);
            self.save_comp(ctx, &comp)?;
            return send(ctx, at, Msg::JoinRefused { id, canonical, guard: guard.to_owned() });
        }
        comp.identifiers.extend(joining);
        ctx.count("component_size", comp.identifiers.len().to_string());
        let became_known = id.kind == "customer_id" && comp.customer_id.is_none();
        if became_known {
            comp.customer_id = Some(id.value.clone());
        }
        self.save_comp(ctx, &comp)?;
        self.emit_graph(ctx, &id, &canonical, &evidence.rule, at)?;
        if became_known {
            // The others learn the business id; `id` learns it from the answer.
            self.repoint(ctx, at, &comp, comp.identifiers.iter().filter(|l| l.kind != id.kind || l.value != id.value))?;
        }
        send(ctx, at, Msg::Joined { id, canonical, customer_id: comp.customer_id })
    }

    /// Tell identifiers (of `comp`) their customer: its canonical id and business id.
    fn repoint<'l>(
        &self,
        ctx: &mut Ctx<'_>,
        at: i64,
        comp: &Component,
        identifiers: impl Iterator<Item = &'l LinkedIdentifier>,
    ) -> Result<(), ProcessError> {
        for linked in identifiers {
            let msg = Msg::Repoint {
                id: linked.identifier(),
                canonical: comp.canonical_id.clone(),
                customer_id: comp.customer_id.clone(),
            };
            send(ctx, at, msg)?;
        }
        Ok(())
    }

    fn on_merge_request(
        &self,
        ctx: &mut Ctx<'_>,
        at: i64,
        from: String,
        into: String,
        evidence: Evidence,
    ) -> Result<(), ProcessError> {
        if from == into {
            return Ok(());
        }
        if let Some(next) = self.forwarded(ctx, &from)? {
            if next == into {
                return Ok(());
            }
            let (from, into) = if next > into { (next, into) } else { (into, next) };
            return send(ctx, at, Msg::MergeRequest { from, into, evidence });
        }
        let Some(mut comp) = self.load_comp(ctx, &from)? else {
            ctx.count("identity_stale_messages", "merge_request");
            return Ok(());
        };
        if comp.pending.is_some() {
            let owner = from.clone();
            return self.park(ctx, &owner, Envelope { at, msg: Msg::MergeRequest { from, into, evidence } });
        }
        if evidence.shared {
            // A shared identifier (a family's device) never merges two customers.
            ctx.count("guard_refusals", "shared_identifier");
            comp.refused(self.suppression.hasher(), "shared_identifier", evidence.identifiers, Some(into), at);
            return self.save_comp(ctx, &comp);
        }
        comp.pending = Some(into.clone());
        self.save_comp(ctx, &comp)?;
        send(ctx, at, Msg::Propose { from: Box::new(comp), into, evidence })
    }

    fn on_propose(
        &self,
        ctx: &mut Ctx<'_>,
        at: i64,
        from: Component,
        into: String,
        evidence: Evidence,
    ) -> Result<(), ProcessError> {
        if let Some(next) = self.forwarded(ctx, &into)? {
            return send(ctx, at, Msg::Propose { from: Box::new(from), into: next, evidence });
        }
        let from_id = from.canonical_id.clone();
        let Some(mut comp) = self.load_comp(ctx, &into)? else {
            ctx.count("identity_stale_messages", "propose");
            return send(ctx, at, Msg::Refused { from: from_id, into, guard: "unknown_customer".into() });
        };
        if comp.pending.is_some() {
            let owner = into.clone();
            return self.park(ctx, &owner, Envelope { at, msg: Msg::Propose { from: Box::new(from), into, evidence } });
        }
        let from_aliases: Vec<String> = from.aliases().cloned().collect();
        if let Some(guard) = self.refusal(&comp, &from.identifiers, &from_aliases, &from.excluded) {
            ctx.count("guard_refusals", guard);
            let labels = from.identifiers.iter().take(5).map(|l| l.identifier().label()).collect();
            comp.refused(self.suppression.hasher(), guard, labels, Some(from_id.clone()), at);
            self.save_comp(ctx, &comp)?;
            return send(ctx, at, Msg::Refused { from: from_id, into, guard: guard.to_owned() });
        }
        let became_known = comp.customer_id.is_none() && from.customer_id.is_some();
        for linked in &from.identifiers {
            if !comp.holds(&linked.identifier()) {
                let mut linked = linked.clone();
                if evidence.rule != "deterministic" {
                    // Joined this customer through the probabilistic match.
                    linked.rule = evidence.rule.clone();
                    linked.score = evidence.score;
                }
                comp.identifiers.push(linked);
            }
        }
        comp.customer_id = comp.customer_id.take().or(from.customer_id.clone());
        comp.merged_from.extend(from_aliases);
        for x in from.excluded {
            if !comp.excluded.contains(&x) {
                comp.excluded.push(x);
            }
        }
        let record = MergeRecord {
            from: from_id.clone(),
            into: into.clone(),
            rule: evidence.rule.clone(),
            score: evidence.score,
            comparisons: evidence.comparisons.clone(),
            identifiers: evidence.identifiers.clone(),
            at,
        };
        comp.history.push(record.clone());
        self.save_comp(ctx, &comp)?;
        // The absorbed identifiers move here; if the customer just got a business id,
        // its own identifiers learn it too.
        let moved = if became_known { &comp.identifiers } else { &from.identifiers };
        self.repoint(ctx, at, &comp, moved.iter())?;
        for linked in &from.identifiers {
            self.emit_graph(ctx, &linked.identifier(), &into, &linked.rule, linked.first_seen)?;
        }
        ctx.emit_json(MERGES_TOPIC, &from_id, &record)?;
        ctx.count("merges", evidence.rule.clone());
        ctx.count("component_size", comp.identifiers.len().to_string());
        let body = serde_json::to_value(MergeBody { from: from_id.clone(), into: into.clone() }).unwrap_or(Value::Null);
        let merge =
            Resolved { kind: Kind::Merge, canonical_id: from_id.clone(), customer_id: None, at, body, stage: None };
        ctx.emit_json(RESOLVED_TOPIC, &from_id, &merge)?;
        send(ctx, at, Msg::Accepted { from: from_id, into })
    }

    fn on_accepted(&self, ctx: &mut Ctx<'_>, _at: i64, from: String, into: String) -> Result<(), ProcessError> {
        ctx.delete(STORE, &comp_key(&from))?;
        ctx.put_json(STORE, &fwd_key(&from), &into)?;
        // Parked messages now find the forwarding pointer and go on to the survivor.
        self.replay(ctx, &from, |_| Ok(false))
    }

    fn on_refused(&self, ctx: &mut Ctx<'_>, from: String) -> Result<(), ProcessError> {
        if let Some(mut comp) = self.load_comp(ctx, &from)? {
            comp.pending = None;
            self.save_comp(ctx, &comp)?;
        }
        let key = comp_key(&from);
        self.replay(ctx, &from, |ctx| Ok(ctx.get_json::<Component>(STORE, &key)?.is_some_and(|c| c.pending.is_some())))
    }

    fn on_remove(&self, ctx: &mut Ctx<'_>, at: i64, canonical: String, id: Identifier) -> Result<(), ProcessError> {
        if let Some(into) = self.forwarded(ctx, &canonical)? {
            return send(ctx, at, Msg::Remove { canonical: into, id });
        }
        if let Some(mut comp) = self.load_comp(ctx, &canonical)? {
            if comp.pending.is_some() {
                let owner = canonical.clone();
                return self.park(ctx, &owner, Envelope { at, msg: Msg::Remove { canonical, id } });
            }
            comp.identifiers.retain(|l| !(l.kind == id.kind && l.value == id.value));
            if id.kind == "customer_id" && comp.customer_id.as_deref() == Some(id.value.as_str()) {
                comp.customer_id = None;
            }
            self.save_comp(ctx, &comp)?;
        }
        send(ctx, at, Msg::Removed { id, from: canonical })
    }

    /// The guard a union would violate: `comp` plus `joining` identifiers from a
    /// customer known as `aliases` that excludes `excluded`.
    fn refusal(
        &self,
        comp: &Component,
        joining: &[LinkedIdentifier],
        aliases: &[String],
        excluded: &[String],
    ) -> Option<&'static str> {
        if comp.excluded.iter().any(|x| aliases.contains(x)) || excluded.iter().any(|x| comp.aliases().any(|a| a == x))
        {
            return Some("unlinked");
        }
        let new: Vec<&LinkedIdentifier> = joining.iter().filter(|l| !comp.holds(&l.identifier())).collect();
        if comp.identifiers.len() + new.len() > self.config.max_component_size {
            return Some("component_size");
        }
        for ty in &self.config.types {
            let Some(limit) = ty.limit() else { continue };
            let count = comp.identifiers.iter().chain(new.iter().copied()).filter(|l| l.kind == ty.name).count();
            if count > limit {
                return Some(if ty.unique { "unique" } else { "type_limit" });
            }
        }
        None
    }

    fn emit_graph(
        &self,
        ctx: &mut Ctx<'_>,
        id: &Identifier,
        canonical: &str,
        rule: &str,
        first_seen: i64,
    ) -> Result<(), ProcessError> {
        let entry = serde_json::json!({
            "identifier": id.label(), "type": id.kind, "value": id.value,
            "canonical_id": canonical, "rule": rule, "first_seen": first_seen,
        });
        ctx.emit_json(GRAPH_TOPIC, &id.label(), &entry)
    }

    // ----- probabilistic matching -----

    fn send_candidates(
        &self,
        ctx: &mut Ctx<'_>,
        at: i64,
        canonical: &str,
        anchor: &Identifier,
        fields: BTreeMap<String, String>,
    ) -> Result<(), ProcessError> {
        let model = &self.config.probabilistic;
        let record = MatchRecord { canonical: canonical.to_owned(), anchor: anchor.label(), fields, at };
        for (rule, key) in matching::blocking_keys(model, &record.fields) {
            let window = model.blocking.iter().find(|b| b.name == rule).and_then(|b| b.window).map(|d| d.ms());
            send(ctx, at, Msg::Candidate { key, window, record: Box::new(record.clone()) })?;
        }
        Ok(())
    }

    fn on_candidate(
        &self,
        ctx: &mut Ctx<'_>,
        at: i64,
        key: String,
        window: Option<i64>,
        record: MatchRecord,
    ) -> Result<(), ProcessError> {
        let model = &self.config.probabilistic;
        let store_key = format!("blk:{key}");
        let mut bucket: Vec<MatchRecord> = ctx.get_json(STORE, &store_key)?.unwrap_or_default();
        if let Some(w) = window {
            bucket.retain(|c| c.at >= at - w);
        }
        for candidate in &bucket {
            if candidate.canonical == record.canonical || candidate.anchor == record.anchor {
                continue;
            }
            let scored = matching::score(model, &record.fields, &candidate.fields);
            if scored.score >= model.link_threshold {
                let evidence = Evidence {
                    rule: "probabilistic".into(),
                    score: Some(round3(scored.score)),
                    comparisons: scored.levels.clone(),
                    identifiers: vec![record.anchor.clone(), candidate.anchor.clone()],
                    shared: false,
                };
                let (from, into) = if record.canonical > candidate.canonical {
                    (record.canonical.clone(), candidate.canonical.clone())
                } else {
                    (candidate.canonical.clone(), record.canonical.clone())
                };
                ctx.count("probabilistic_matches", "link");
                send(ctx, at, Msg::MergeRequest { from, into, evidence })?;
            } else if scored.score >= model.review_threshold {
                ctx.count("probabilistic_matches", "review");
                let review = serde_json::json!({
                    "a": record.canonical, "b": candidate.canonical,
                    "identifiers": [record.anchor, candidate.anchor],
                    "score": round3(scored.score), "comparisons": scored.levels,
                    "blocking_key": key, "at": at,
                });
                let mut pair = [record.anchor.clone(), candidate.anchor.clone()];
                pair.sort();
                ctx.emit_json(REVIEW_TOPIC, &pair.join("|"), &review)?;
            }
        }
        bucket.retain(|c| c.anchor != record.anchor);
        bucket.push(record);
        if bucket.len() > model.max_block_size {
            let excess = bucket.len() - model.max_block_size;
            bucket.drain(..excess);
            ctx.count("blocking_evictions", "max_block_size");
        }
        ctx.put_json_owned(STORE, &store_key, bucket)
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
