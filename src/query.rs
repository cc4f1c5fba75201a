//! Interactive queries: the HTTP API reads the committed state of this instance's
//! tasks directly from their RocksDB (never the uncommitted overlay). An identifier is
//! resolved through the identity stores, then the owning partition of the canonical id
//! is read. Answers for partitions this instance does not own are "not here" (routing
//! to the owner comes with multi-instance interactive queries).

use chorus_processors::context::CustomerContext;
use chorus_processors::identity;
use chorus_processors::partition::partition_for;
use chorus_processors::profile::Profile;
use chorus_processors::resolved::RESOLVED_TOPIC;
use chorus_processors::store::decode_value;
use chorus_processors::Topology;
use chorus_state::TaskDb;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

type TaskDbs = BTreeMap<(String, u32), Arc<TaskDb>>;

/// The task databases open in this process, by processor and partition.
#[derive(Clone, Default)]
pub struct LocalStores {
    tasks: Arc<RwLock<TaskDbs>>,
}

#[derive(Debug, PartialEq)]
pub enum Lookup<T> {
    Found(T),
    /// No customer is known by this identifier.
    Unknown,
    /// The owning partition is not open on this instance (another owns it, or a
    /// rebalance is moving it).
    NotLocal,
}

impl<T> Lookup<T> {
    fn and_then<U>(self, f: impl FnOnce(T) -> Lookup<U>) -> Lookup<U> {
        match self {
            Lookup::Found(v) => f(v),
            Lookup::Unknown => Lookup::Unknown,
            Lookup::NotLocal => Lookup::NotLocal,
        }
    }
}

impl LocalStores {
    pub fn register(&self, processor: &str, partition: u32, db: Arc<TaskDb>) {
        self.tasks.write().unwrap_or_else(|p| p.into_inner()).insert((processor.to_owned(), partition), db);
    }

    pub fn unregister(&self, processor: &str, partition: u32) {
        self.tasks.write().unwrap_or_else(|p| p.into_inner()).remove(&(processor.to_owned(), partition));
    }

    fn dbs(&self, processor: &str) -> Vec<Arc<TaskDb>> {
        self.tasks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|((name, _), _)| name == processor)
            .map(|(_, db)| db.clone())
            .collect()
    }

    fn db(&self, processor: &str, partition: u32) -> Option<Arc<TaskDb>> {
        self.tasks.read().unwrap_or_else(|p| p.into_inner()).get(&(processor.to_owned(), partition)).cloned()
    }

    pub fn open_tasks(&self) -> usize {
        self.tasks.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Store sizes per processor, store and partition.
    pub fn store_sizes(&self, stores_of: impl Fn(&str) -> Vec<&'static str>) -> Vec<(String, String, u32, u64)> {
        let tasks = self.tasks.read().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for ((processor, partition), db) in tasks.iter() {
            for store in stores_of(processor) {
                out.push((processor.clone(), store.to_owned(), *partition, db.approximate_len(store)));
            }
        }
        out
    }

    /// The canonical id of a path identifier (a canonical id resolves to itself).
    pub fn resolve(&self, topology: &Topology, identifier: &str) -> Lookup<String> {
        let dbs = self.dbs(identity::NAME);
        if dbs.is_empty() {
            return Lookup::NotLocal;
        }
        // A canonical id (live, or merged away) is known by its component or pointer.
        let is_canonical = |id: &str| {
            dbs.iter().any(|db| {
                db.get(identity::STORE, format!("comp:{id}").as_bytes()).ok().flatten().is_some()
                    || db.get(identity::STORE, format!("fwd:{id}").as_bytes()).ok().flatten().is_some()
            })
        };
        let mut canonical = is_canonical(identifier).then(|| identifier.to_owned());
        if canonical.is_none() {
            'labels: for label in identity::lookup_labels(&topology.identity, identifier) {
                for db in &dbs {
                    let key = identity::identifier_key(&label);
                    if let Some(c) = read_json::<identity::IdState>(db, identity::STORE, &key).and_then(|s| s.canonical)
                    {
                        canonical = Some(c);
                        break 'labels;
                    }
                }
            }
        }
        let Some(id) = canonical else { return Lookup::Unknown };
        Lookup::Found(self.survivor(&dbs, id))
    }

    /// Follow merges to the surviving id.
    fn survivor(&self, dbs: &[Arc<TaskDb>], mut id: String) -> String {
        for _ in 0..64 {
            let next = dbs.iter().find_map(|db| read_json::<String>(db, identity::STORE, &format!("fwd:{id}")));
            match next {
                Some(n) => id = n,
                None => break,
            }
        }
        id
    }

    /// `GET /v1/identity/{type}/{value}`: the customer holding an identifier, every
    /// identifier linked to it with how, and its merge history.
    pub fn identity(&self, label: &str) -> Lookup<Value> {
        let dbs = self.dbs(identity::NAME);
        if dbs.is_empty() {
            return Lookup::NotLocal;
        }
        let key = identity::identifier_key(label);
        let Some(state) = dbs.iter().find_map(|db| read_json::<identity::IdState>(db, identity::STORE, &key)) else {
            return Lookup::Unknown;
        };
        let Some(canonical) = state.canonical else { return Lookup::Unknown };
        let canonical = self.survivor(&dbs, canonical);
        let comp_key = format!("comp:{canonical}");
        let Some(comp) = dbs.iter().find_map(|db| read_json::<identity::Component>(db, identity::STORE, &comp_key))
        else {
            return Lookup::Unknown;
        };
        Lookup::Found(serde_json::json!({
            "identifier": label,
            "canonical_id": comp.canonical_id,
            "customer_id": comp.customer_id,
            "identifiers": comp.identifiers,
            "merged_from": comp.merged_from,
            "merges": comp.history,
            "excluded": comp.excluded,
            "refusals": comp.refusals,
            "created_at": comp.created_at,
        }))
    }

    fn read_owned<T: DeserializeOwned>(
        &self,
        topology: &Topology,
        processor: &str,
        store: &str,
        canonical: &str,
    ) -> Lookup<T> {
        let partition = partition_for(canonical.as_bytes(), topology.partitions_of(RESOLVED_TOPIC));
        match self.db(processor, partition) {
            None => Lookup::NotLocal,
            Some(db) => match read_json::<T>(&db, store, canonical) {
                Some(v) => Lookup::Found(v),
                None => Lookup::Unknown,
            },
        }
    }

    pub fn profile(&self, topology: &Topology, identifier: &str) -> Lookup<Value> {
        self.resolve(topology, identifier).and_then(|id| {
            self.read_owned::<Profile>(topology, "profile", "profiles", &id).and_then(|p| Lookup::Found(p.snapshot()))
        })
    }

    /// `now` is the wall clock, or `None` under `clock: event` (then expiry is left to
    /// the task, which alone knows event time).
    pub fn context(&self, topology: &Topology, identifier: &str, now: Option<i64>) -> Lookup<Value> {
        self.resolve(topology, identifier).and_then(|id| {
            self.read_owned::<CustomerContext>(topology, "context", "context", &id).and_then(|mut c| {
                // Expired parts vanish from reads at once, before the sweep runs.
                if let Some(now) = now {
                    c.expire(now, &topology.context);
                }
                Lookup::Found(c.snapshot())
            })
        })
    }
}

fn read_json<T: DeserializeOwned>(db: &TaskDb, store: &str, key: &str) -> Option<T> {
    let stored = db.get(store, key.as_bytes()).ok()??;
    // Stores read here (identity, profiles, context) hold no expiring entries; context
    // expiry is applied by the caller with the topology's clock.
    let (_, value) = decode_value(key.as_bytes(), &stored).ok()?;
    serde_json::from_slice(&value).ok()
}
