//! Interactive queries: the HTTP API reads the committed state of the tasks directly
//! from their RocksDB (never the uncommitted overlay), on this instance or, through the
//! [`Directory`], on the instance serving the partition. An identifier is resolved
//! through the identity stores (each key read from the partition that owns it), then
//! the partition of the canonical id is read. While nobody serves a partition (a
//! rebalance or restore is moving it) the answer is "unavailable", never a stale one.

use crate::directory::{Directory, Owner};
use crate::metrics::metrics;
use chorus_processors::content::{ContentError, ContentItem};
use chorus_processors::context::{self, CustomerContext};
use chorus_processors::identity;
use chorus_processors::orchestrator::{self, Recipient};
use chorus_processors::partition::partition_for;
use chorus_processors::personalisation::{
    popularity_key, recommend, Personaliser, Popularity, RecommendationInputs, CONSENT_PURPOSE,
};
use chorus_processors::privacy::{self, status, status::RequestState};
use chorus_processors::profile::{self, Profile};
use chorus_processors::resolved::RESOLVED_TOPIC;
use chorus_processors::segments::Segments;
use chorus_processors::store::decode_value;
use chorus_processors::topology::IDENTITY_REPARTITION;
use chorus_processors::Topology;
use chorus_state::{LiveStore, TaskDb};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

type TaskDbs = BTreeMap<(String, u32), Arc<LiveStore>>;

/// The task stores open in this process, by processor and partition.
#[derive(Clone, Default)]
pub struct LocalStores {
    tasks: Arc<RwLock<TaskDbs>>,
    /// Why a sub-topology of this process stopped, once one has: the process is going
    /// down and must not report ready.
    failed: Arc<RwLock<Option<String>>>,
}

/// Which state a read answers from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// The serving task's current state, uncommitted writes included (the default, as
    /// Kafka Streams' interactive queries): an event's effect shows as soon as it is
    /// processed. A transaction that aborts takes it back.
    #[default]
    Live,
    /// State as of the task's last committed transaction.
    Committed,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Live => "live",
            Consistency::Committed => "committed",
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum Lookup<T> {
    Found(T),
    /// No customer is known by this identifier.
    Unknown,
    /// Nobody serves the partition right now (a rebalance is moving it), or its
    /// instance did not answer.
    Unavailable(String),
}

impl LocalStores {
    pub fn register(&self, processor: &str, partition: u32, db: Arc<LiveStore>) {
        self.tasks.write().unwrap_or_else(|p| p.into_inner()).insert((processor.to_owned(), partition), db);
    }

    pub fn unregister(&self, processor: &str, partition: u32) {
        self.tasks.write().unwrap_or_else(|p| p.into_inner()).remove(&(processor.to_owned(), partition));
    }

    fn db(&self, processor: &str, partition: u32) -> Option<Arc<LiveStore>> {
        self.tasks.read().unwrap_or_else(|p| p.into_inner()).get(&(processor.to_owned(), partition)).cloned()
    }

    /// Record that a sub-topology failed (its tasks stop being served).
    pub fn set_failed(&self, why: String) {
        self.failed.write().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
    }

    pub fn failure(&self) -> Option<String> {
        self.failed.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn open_tasks(&self) -> usize {
        self.tasks.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Store sizes per processor, store and partition: (entries, bytes).
    pub fn store_sizes(&self, topology: &chorus_processors::Topology) -> Vec<(String, String, u32, u64, u64)> {
        let specs = chorus_processors::processor_specs(topology);
        let stores_of =
            |name: &str| specs.iter().find(|s| s.name == name).map(|s| s.stores.clone()).unwrap_or_default();
        let tasks = self.tasks.read().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for ((processor, partition), db) in tasks.iter() {
            for store in stores_of(processor) {
                out.push((
                    processor.clone(),
                    store.to_owned(),
                    *partition,
                    db.db().approximate_len(store),
                    db.db().approximate_bytes(store),
                ));
            }
        }
        out
    }

    /// Estimated memory held by each open task member's decoded-value cache:
    /// `(processor, partition, bytes)`.
    pub fn cache_sizes(&self) -> Vec<(String, u32, usize)> {
        let tasks = self.tasks.read().unwrap_or_else(|p| p.into_inner());
        tasks
            .iter()
            .map(|((processor, partition), live)| (processor.clone(), *partition, live.lock().cache.bytes()))
            .collect()
    }

    /// Apply `f` to the database of every open task.
    pub fn for_each_db(
        &self,
        f: impl Fn(&TaskDb) -> Result<(), chorus_state::StateError>,
    ) -> Result<(), chorus_state::StateError> {
        let tasks = self.tasks.read().unwrap_or_else(|p| p.into_inner());
        tasks.values().try_for_each(|live| f(live.db()))
    }

    pub fn has(&self, processor: &str, partition: u32) -> bool {
        self.db(processor, partition).is_some()
    }

    /// Processor → partitions open here.
    pub fn tasks(&self) -> BTreeMap<String, Vec<u32>> {
        let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (processor, partition) in self.tasks.read().unwrap_or_else(|p| p.into_inner()).keys() {
            out.entry(processor.clone()).or_default().push(*partition);
        }
        out
    }

    /// A value of a store of an open task, in the store's encoding: as the task holds
    /// it now, or as of its last commit. `Err` when the task is not open here.
    pub fn read(
        &self,
        processor: &str,
        partition: u32,
        store: &str,
        key: &str,
        consistency: Consistency,
    ) -> Result<Option<Vec<u8>>, ()> {
        let db = self.db(processor, partition).ok_or(())?;
        let stored = match consistency {
            Consistency::Live => db.read_live(store, key.as_bytes()).ok().flatten(),
            Consistency::Committed => db.read_committed(store, key.as_bytes()).ok().flatten(),
        };
        let Some(stored) = stored else { return Ok(None) };
        // Stores read here hold no expiring entries; context expiry is applied by the
        // caller with the topology's clock.
        Ok(decode_value(key.as_bytes(), &stored).ok().map(|(_, value)| value))
    }
}

/// Interactive queries over every instance's tasks: reads go to this instance's
/// RocksDB when it serves the partition, to the serving instance over HTTP otherwise.
#[derive(Clone)]
pub struct Query {
    pub topology: Arc<Topology>,
    pub local: LocalStores,
    pub directory: Directory,
    personaliser: Arc<Personaliser>,
    segments: Arc<Segments>,
    client: reqwest::Client,
    /// Which state reads answer from.
    pub consistency: Consistency,
}

/// Why an answer cannot be given right now.
type Unavailable = String;

/// `GET /v1/content/{id}`: a content item rendered for a channel, as a decision for
/// that customer would carry it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ContentPreview {
    pub content_id: String,
    pub channel: String,
    /// The customer it was rendered for; `None` for a preview without one.
    pub canonical_id: Option<String>,
    /// Whether templates saw the customer's profile (consent granted and profile known).
    pub personalised: bool,
    /// The channel's rendering, with `content_id` as in a decision.
    pub rendered: Value,
}

/// Why a content preview has no rendering.
#[derive(Debug, Clone, PartialEq)]
pub enum PreviewError {
    /// No customer is known by the identifier given.
    UnknownCustomer,
    /// Neither the `content` topic nor topology.yaml has the item.
    UnknownContent,
    /// The item does not render for this channel and customer (a decision would be
    /// suppressed with `content_error`).
    Render(ContentError),
    /// A store the preview reads is moving.
    Unavailable(Unavailable),
}

impl Query {
    pub fn new(topology: Arc<Topology>, local: LocalStores, directory: Directory) -> Query {
        let personaliser = Arc::new(Personaliser::compile(&topology.personalisation));
        let segments = Arc::new(Segments::compile(&topology.segments).unwrap_or_else(|_| Segments::none()));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default();
        Query { topology, local, directory, personaliser, segments, client, consistency: Consistency::Live }
    }

    /// The same queries, answered from `consistency`'s state.
    pub fn with_consistency(&self, consistency: Consistency) -> Query {
        Query { consistency, ..self.clone() }
    }

    /// One store value, from wherever its task is served.
    async fn read(
        &self,
        processor: &str,
        partition: u32,
        store: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, Unavailable> {
        match self.directory.owner(processor, partition) {
            Owner::Local => self
                .local
                .read(processor, partition, store, key, self.consistency)
                .map_err(|()| moving(processor, partition)),
            Owner::Nobody => Err(moving(processor, partition)),
            Owner::Remote { url, key: cluster_key } => {
                let response = self
                    .client
                    .get(format!("{url}/internal/v1/stores/{processor}/{partition}/{store}"))
                    .header(crate::auth::CLUSTER_HEADER, cluster_key.as_str())
                    .query(&[("key", key), ("consistency", self.consistency.as_str())])
                    .send()
                    .await
                    .map_err(|e| format!("{processor}[{partition}] is served by {url}, which did not answer: {e}"))?;
                match response.status() {
                    reqwest::StatusCode::OK => response
                        .bytes()
                        .await
                        .map(|b| Some(b.to_vec()))
                        .map_err(|e| format!("{processor}[{partition}] read from {url} failed: {e}")),
                    reqwest::StatusCode::NO_CONTENT => Ok(None),
                    _ => Err(moving(processor, partition)),
                }
            }
        }
    }

    async fn read_json<T: DeserializeOwned>(
        &self,
        processor: &str,
        partition: u32,
        store: &str,
        key: &str,
    ) -> Result<Option<T>, Unavailable> {
        Ok(self.read(processor, partition, store, key).await?.and_then(|v| chorus_processors::cache::decode(&v).ok()))
    }

    /// An identity store value of the actor `owner_key` (identifier label or canonical id).
    async fn identity_json<T: DeserializeOwned>(
        &self,
        owner_key: &str,
        store_key: &str,
    ) -> Result<Option<T>, Unavailable> {
        let route = identity::owner_key(owner_key);
        let partition = partition_for(route.as_bytes(), self.topology.partitions_of(IDENTITY_REPARTITION));
        self.read_json(identity::NAME, partition, identity::STORE, store_key).await
    }

    /// A store value of a downstream stage, keyed by canonical id.
    async fn customer_json<T: DeserializeOwned>(
        &self,
        processor: &str,
        store: &str,
        canonical: &str,
        key: &str,
    ) -> Result<Option<T>, Unavailable> {
        let partition = partition_for(canonical.as_bytes(), self.topology.partitions_of(RESOLVED_TOPIC));
        self.read_json(processor, partition, store, key).await
    }

    /// The canonical id of a path identifier (a canonical id resolves to itself, or to
    /// the customer it merged into).
    pub async fn resolve(&self, identifier: &str) -> Lookup<String> {
        let known = async {
            let comp = self.identity_json::<Value>(identifier, &format!("comp:{identifier}")).await?;
            let fwd = self.identity_json::<String>(identifier, &format!("fwd:{identifier}")).await?;
            Ok::<_, Unavailable>(comp.is_some() || fwd.is_some())
        };
        let canonical = match known.await {
            Ok(true) => Some(identifier.to_owned()),
            Ok(false) => {
                let mut found = None;
                for label in identity::lookup_labels(&self.topology.identity, identifier) {
                    match self.identity_json::<identity::IdState>(&label, &identity::identifier_key(&label)).await {
                        Ok(state) => {
                            if let Some(c) = state.and_then(|s| s.canonical) {
                                found = Some(c);
                                break;
                            }
                        }
                        Err(e) => return Lookup::Unavailable(e),
                    }
                }
                found
            }
            Err(e) => return Lookup::Unavailable(e),
        };
        let Some(id) = canonical else { return Lookup::Unknown };
        match self.survivor(id).await {
            Ok(id) => Lookup::Found(id),
            Err(e) => Lookup::Unavailable(e),
        }
    }

    /// Follow merges to the surviving id.
    async fn survivor(&self, mut id: String) -> Result<String, Unavailable> {
        for _ in 0..64 {
            match self.identity_json::<String>(&id, &format!("fwd:{id}")).await? {
                Some(next) => id = next,
                None => break,
            }
        }
        Ok(id)
    }

    /// `GET /v1/identity/{type}/{value}`: the customer holding an identifier, every
    /// identifier linked to it with how, and its merge history.
    pub async fn identity(&self, label: &str) -> Lookup<Value> {
        let state = match self.identity_json::<identity::IdState>(label, &identity::identifier_key(label)).await {
            Ok(Some(s)) => s,
            Ok(None) => return Lookup::Unknown,
            Err(e) => return Lookup::Unavailable(e),
        };
        let Some(canonical) = state.canonical else { return Lookup::Unknown };
        let component = match self.survivor(canonical).await {
            Ok(c) => self.identity_json::<identity::Component>(&c, &format!("comp:{c}")).await,
            Err(e) => Err(e),
        };
        match component {
            Ok(Some(comp)) => Lookup::Found(serde_json::json!({
                "identifier": label,
                "canonical_id": comp.canonical_id,
                "customer_id": comp.customer_id,
                "identifiers": comp.identifiers,
                "merged_from": comp.merged_from,
                "merges": comp.history,
                "excluded": comp.excluded,
                "refusals": comp.refusals,
                "created_at": comp.created_at,
            })),
            Ok(None) => Lookup::Unknown,
            Err(e) => Lookup::Unavailable(e),
        }
    }

    /// An identifier (`type`, `value`) the identity stage knows for this customer: the
    /// path identifier itself when it is one, else the customer's most specific one.
    pub async fn known_identifier(&self, identifier: &str) -> Lookup<(String, String)> {
        let canonical = match self.resolve(identifier).await {
            Lookup::Found(c) => c,
            Lookup::Unknown => return Lookup::Unknown,
            Lookup::Unavailable(e) => return Lookup::Unavailable(e),
        };
        for label in identity::lookup_labels(&self.topology.identity, identifier) {
            if let Ok(Some(state)) =
                self.identity_json::<identity::IdState>(&label, &identity::identifier_key(&label)).await
            {
                if state.canonical.is_some() {
                    if let Some((kind, value)) = label.split_once(':') {
                        return Lookup::Found((kind.to_owned(), value.to_owned()));
                    }
                }
            }
        }
        match self.identity_json::<identity::Component>(&canonical, &format!("comp:{canonical}")).await {
            Ok(Some(comp)) => comp
                .identifiers
                .iter()
                .min_by_key(|i| self.topology.identity.rank(&i.kind))
                .map_or(Lookup::Unknown, |i| Lookup::Found((i.kind.clone(), i.value.clone()))),
            Ok(None) => Lookup::Unknown,
            Err(e) => Lookup::Unavailable(e),
        }
    }

    /// `GET /v1/consent/{identifier}`: every purpose's current state (the topology's
    /// default when the customer never changed it), with the source and time of the
    /// change, and the history of changes.
    pub async fn consent(&self, identifier: &str) -> Lookup<Value> {
        self.for_customer(identifier, |id| async move {
            let state: Recipient = self
                .customer_json(orchestrator::NAME, orchestrator::CONSENT_STORE, &id, &id)
                .await?
                .unwrap_or_default();
            let purposes: serde_json::Map<String, Value> = self
                .topology
                .consent
                .purposes
                .iter()
                .map(|purpose| {
                    let value = match state.purposes.get(purpose) {
                        Some(p) => {
                            serde_json::json!({"granted": p.granted, "at": p.at, "source": p.source, "default": false})
                        }
                        None => serde_json::json!({"granted": self.topology.default_consent(purpose), "default": true}),
                    };
                    (purpose.clone(), value)
                })
                .collect();
            Ok(Some(serde_json::json!({"canonical_id": id, "purposes": purposes, "history": state.history})))
        })
        .await
    }

    /// `GET /v1/content/{id}`: `content_id` rendered for `channel` exactly as the
    /// orchestrator renders a decision, from the same stores: the item from the
    /// orchestrator's content store (else topology.yaml), the customer's template view
    /// only while they consent to personalisation, `vars` as the request's variables.
    /// Without a customer, templates see no customer fields and the item is read from
    /// partition 0 (every partition holds every item).
    pub async fn content_preview(
        &self,
        content_id: &str,
        channel: &str,
        customer: Option<&str>,
        vars: &Value,
    ) -> Result<ContentPreview, PreviewError> {
        let canonical = match customer {
            None => None,
            Some(identifier) => match self.resolve(identifier).await {
                Lookup::Found(id) => Some(id),
                Lookup::Unknown => return Err(PreviewError::UnknownCustomer),
                Lookup::Unavailable(e) => return Err(PreviewError::Unavailable(e)),
            },
        };
        // The partition whose orchestrator would render a decision for this customer.
        let partition = canonical
            .as_deref()
            .map_or(0, |id| partition_for(id.as_bytes(), self.topology.partitions_of(RESOLVED_TOPIC)));
        let stored = self
            .read(orchestrator::NAME, partition, orchestrator::CONTENT_STORE, content_id)
            .await
            .map_err(PreviewError::Unavailable)?;
        // As the orchestrator: a stored item wins over topology.yaml, one that does not
        // parse is no item.
        let item = match stored {
            Some(bytes) => chorus_processors::cache::decode::<ContentItem>(&bytes).ok(),
            None => self.topology.content.item(content_id).cloned(),
        };
        let item = item.ok_or(PreviewError::UnknownContent)?;
        let (customer_view, personalised) = match &canonical {
            Some(id) => self.template_customer(id).await.map_err(PreviewError::Unavailable)?,
            None => (Value::Object(Default::default()), false),
        };
        let rendered = orchestrator::render_content(&item, channel, &customer_view, vars, &self.topology.content)
            .map_err(PreviewError::Render)?;
        Ok(ContentPreview {
            content_id: content_id.to_owned(),
            channel: channel.to_owned(),
            canonical_id: canonical,
            personalised,
            rendered,
        })
    }

    /// What the orchestrator's templates see as `customer` for canonical id `id`, and
    /// whether that is their profile: without personalisation consent (or before the
    /// orchestrator has mirrored the profile) only who the message is for.
    async fn template_customer(&self, id: &str) -> Result<(Value, bool), Unavailable> {
        let recipient: Recipient =
            self.customer_json(orchestrator::NAME, orchestrator::CONSENT_STORE, id, id).await?.unwrap_or_default();
        let view = if recipient.granted(orchestrator::PERSONALISATION, &self.topology) {
            self.customer_json::<Value>(orchestrator::NAME, orchestrator::CUSTOMERS_STORE, id, id).await?
        } else {
            None
        };
        let personalised = view.is_some();
        // A decision names the customer id its request carried, which identity resolved
        // from the customer's component; only read when templates do not see the profile.
        let customer_id = if personalised {
            None
        } else {
            self.identity_json::<identity::Component>(id, &format!("comp:{id}")).await?.and_then(|c| c.customer_id)
        };
        Ok((orchestrator::template_customer(id, customer_id.as_deref(), view), personalised))
    }

    async fn load_profile(&self, id: &str) -> Result<Option<Profile>, Unavailable> {
        self.customer_json(profile::NAME, profile::STORE, id, id).await
    }

    /// The context of a customer; expired parts are dropped at `now` (`None` under
    /// `clock: event`: then expiry is left to the task, which alone knows event time).
    async fn load_context(&self, id: &str, now: Option<i64>) -> Result<Option<CustomerContext>, Unavailable> {
        let mut context: Option<CustomerContext> = self.customer_json(context::NAME, context::STORE, id, id).await?;
        if let (Some(c), Some(now)) = (context.as_mut(), now) {
            // Expired parts vanish from reads at once, before the sweep runs.
            c.expire(now, &self.topology.context);
        }
        Ok(context)
    }

    /// `GET /v1/profiles/{identifier}`: the Customer 360 snapshot, personalised with
    /// the customer's current context, with the hybrid recommendations.
    pub async fn profile(&self, identifier: &str, now: Option<i64>) -> Lookup<Value> {
        self.for_customer(identifier, |id| async move {
            let Some(profile) = self.load_profile(&id).await? else { return Ok(None) };
            let context = self.load_context(&id, now).await?;
            self.render_profile(&profile, context.as_ref(), now).await.map(Some)
        })
        .await
    }

    /// A profile as `GET /v1/profiles` shows it (the access export shows the same).
    async fn render_profile(
        &self,
        profile: &Profile,
        context: Option<&CustomerContext>,
        now: Option<i64>,
    ) -> Result<Value, Unavailable> {
        {
            let at = now.unwrap_or(profile.updated_at);
            let mut snapshot = profile.snapshot(at, &self.topology.profile);
            let context_view = context.map_or(Value::Null, CustomerContext::snapshot);
            let consent = profile.personalisation_allowed(self.topology.default_consent(CONSENT_PURPOSE));
            let mut view = profile.customer_view(at, &self.topology.profile);
            // The stage brings segments up to date when it commits: a live read
            // evaluates them over what it reads.
            let segments = self.segments.evaluate(&view);
            if segments != profile.segments {
                view["segments"] = serde_json::json!(segments);
                snapshot["segments"] = serde_json::json!(segments);
            }
            let personalised = self.personaliser.resolve(&view, &context_view, &segments, consent);
            count_served("profile", personalised.personalised);
            snapshot["personalisation"] = serde_json::to_value(&personalised).unwrap_or(Value::Null);
            snapshot["recommendations"] = self.recommend(profile, context, at).await?;
            Ok(snapshot)
        }
    }

    /// `GET /v1/privacy/requests/{id}`: the status actor's record of the request.
    pub async fn privacy_request(&self, request_id: &str) -> Lookup<RequestState> {
        let partition = partition_for(request_id.as_bytes(), self.topology.partitions_of(RESOLVED_TOPIC));
        let key = status::request_key(request_id);
        match self.read_json::<RequestState>(privacy::NAME, partition, status::STORE, &key).await {
            Ok(Some(state)) => Lookup::Found(state),
            Ok(None) => Lookup::Unknown,
            Err(why) => Lookup::Unavailable(why),
        }
    }

    /// `GET /v1/privacy/requests/{id}/export`: everything chorus held about the subject
    /// when the access (or portability) request ran, assembled from its parts.
    pub async fn privacy_export(&self, state: &RequestState, now: Option<i64>) -> Result<Value, Unavailable> {
        let partition = partition_for(state.request_id.as_bytes(), self.topology.partitions_of(RESOLVED_TOPIC));
        let mut stages: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut identity = Value::Null;
        for part in state.parts.keys() {
            let key = format!("{}{part}", status::export_prefix(&state.request_id));
            let Some(fragment) = self.read_json::<Value>(privacy::NAME, partition, status::STORE, &key).await? else {
                continue;
            };
            if holds_nothing(&fragment) {
                // A stage at a canonical id merged away, which keeps nothing there.
                continue;
            }
            match part.split_once('/') {
                Some((stage, _)) => stages.entry(stage.to_owned()).or_default().push(fragment),
                None => identity = fragment,
            }
        }
        let mut profiles = Vec::new();
        for fragment in stages.get(profile::NAME).into_iter().flatten() {
            if let Ok(p) = serde_json::from_value::<Profile>(fragment.clone()) {
                let context = stages
                    .get(context::NAME)
                    .into_iter()
                    .flatten()
                    .find(|c| c["canonical_id"] == p.canonical_id.as_str())
                    .and_then(|c| serde_json::from_value::<CustomerContext>(c.clone()).ok());
                profiles.push(self.render_profile(&p, context.as_ref(), now).await?);
            }
        }
        let contexts: Vec<Value> = stages
            .get(context::NAME)
            .into_iter()
            .flatten()
            .filter_map(|c| serde_json::from_value::<CustomerContext>(c.clone()).ok())
            .map(|c| c.snapshot())
            .collect();
        let take = |stages: &mut BTreeMap<String, Vec<Value>>, name: &str| stages.remove(name).unwrap_or_default();
        Ok(serde_json::json!({
            "request_id": state.request_id,
            "type": state.kind().map(|k| k.as_str()),
            "generated_at": state.finished_at,
            "identity": identity,
            "profiles": profiles,
            "profile_state": take(&mut stages, profile::NAME),
            "context": contexts,
            "messaging": take(&mut stages, orchestrator::NAME),
            "journeys": take(&mut stages, chorus_processors::journeys::NAME),
            "campaign_memberships": take(&mut stages, chorus_processors::campaigns::NAME),
        }))
    }

    /// `GET /v1/context/{identifier}`.
    pub async fn context(&self, identifier: &str, now: Option<i64>) -> Lookup<Value> {
        self.for_customer(identifier, |id| async move { Ok(self.load_context(&id, now).await?.map(|c| c.snapshot())) })
            .await
    }

    /// `GET /v1/recommendations/{identifier}`.
    pub async fn recommendations(&self, identifier: &str, now: Option<i64>) -> Lookup<Value> {
        self.for_customer(identifier, |id| async move {
            let Some(profile) = self.load_profile(&id).await? else { return Ok(None) };
            let context = self.load_context(&id, now).await?;
            let mut answer = self.recommend(&profile, context.as_ref(), now.unwrap_or(profile.updated_at)).await?;
            count_served("recommendations", answer["personalised"] == Value::Bool(true));
            answer["canonical_id"] = Value::String(id);
            Ok(Some(answer))
        })
        .await
    }

    /// Resolve an identifier, then read what `read` reads for the canonical id.
    async fn for_customer<F, Fut>(&self, identifier: &str, read: F) -> Lookup<Value>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<Option<Value>, Unavailable>>,
    {
        match self.resolve(identifier).await {
            Lookup::Found(id) => match read(id).await {
                Ok(Some(v)) => Lookup::Found(v),
                Ok(None) => Lookup::Unknown,
                Err(e) => Lookup::Unavailable(e),
            },
            Lookup::Unknown => Lookup::Unknown,
            Lookup::Unavailable(e) => Lookup::Unavailable(e),
        }
    }

    /// The hybrid list for a customer: their precomputed items adjusted by context,
    /// filled from the popularity tables of the partition that serves them.
    async fn recommend(
        &self,
        profile: &Profile,
        context: Option<&CustomerContext>,
        now: i64,
    ) -> Result<Value, Unavailable> {
        let config = &self.topology.personalisation.recommendations;
        let consent = profile.personalisation_allowed(self.topology.default_consent(CONSENT_PURPOSE));
        let session_categories: Vec<String> =
            context.and_then(|c| c.session.as_ref()).map(|s| s.categories.clone()).unwrap_or_default();
        let fallback: Vec<String> = profile.metrics.last_purchase_category.iter().cloned().collect();
        // Each table once (a session category is often the last purchase's too), all
        // read at the same time.
        let mut categories: BTreeSet<Option<&str>> = BTreeSet::from([None]);
        if consent {
            categories.extend(session_categories.iter().chain(&fallback).map(|c| Some(c.as_str())));
        }
        let reads = categories.iter().map(|category| self.popularity(*category));
        let tables: BTreeMap<Option<String>, Popularity> =
            categories.iter().map(|c| c.map(str::to_owned)).zip(futures::future::join_all(reads).await).collect();
        let purchased: BTreeSet<String> = profile.purchased.keys().cloned().collect();
        let in_cart: BTreeSet<String> =
            context.and_then(|c| c.cart.as_ref()).map(|c| c.items.keys().cloned().collect()).unwrap_or_default();
        let inputs = RecommendationInputs {
            precomputed: profile.recommendations.as_ref(),
            consent,
            purchased: &purchased,
            in_cart: &in_cart,
            session_categories: &session_categories,
            fallback_categories: &fallback,
            now,
        };
        Ok(recommend(config, &inputs, |category| tables.get(&category.map(str::to_owned)).cloned()))
    }
}

impl Query {
    /// Popularity of a category (or overall) across every partition of the profile
    /// stage: each partition counts the events it processes, reads add them up. A
    /// partition that cannot be read right now is left out (popularity only fills).
    async fn popularity(&self, category: Option<&str>) -> Popularity {
        let config = &self.topology.personalisation.recommendations;
        let key = popularity_key(category);
        let partitions = self.topology.partitions_of(RESOLVED_TOPIC);
        let reads = (0..partitions).map(|p| self.read_json::<Popularity>(profile::NAME, p, profile::STORE, &key));
        let mut total = Popularity::default();
        for table in futures::future::join_all(reads).await.into_iter().flatten().flatten() {
            total.merge(&table, config);
        }
        total
    }
}

fn moving(processor: &str, partition: u32) -> Unavailable {
    format!("{processor}[{partition}] is not served by any instance right now (a rebalance or restore is moving it)")
}

fn count_served(endpoint: &str, personalised: bool) {
    let outcome = if personalised { "personalised" } else { "generic" };
    metrics().personalisation_served.with_label_values(&[endpoint, outcome]).inc();
}

/// Whether an export fragment is empty: null, or only nulls and empty lists.
fn holds_nothing(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(fields) => fields.values().all(holds_nothing),
        _ => false,
    }
}
