//! The TestDriver runs a whole topology in memory, in the spirit of Kafka Streams'
//! TopologyTestDriver, but with partitions: every topic has its configured number of
//! partitions (keys placed by Kafka's murmur2), every sub-topology has one task per
//! partition with its own stores (the same [`Task`] the runtime runs, so records pass
//! between a task's processors in memory as they do there), and which pending record
//! is processed next is chosen by a seeded RNG. The same seed gives the same run; many seeds explore many
//! interleavings, so invariants can be property-tested across partition counts.

use crate::cache::StateCache;
use crate::partition::partition_for;
use crate::processor::{Counter, Output, ProcessError, Record};
use crate::store::{MemStoreSet, StoreSet};
use crate::subtopology::SubTopology;
use crate::task::{MemberStores, NoMeter, ProcessorSpec, Task};
use crate::topology::Topology;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::collections::{BTreeMap, VecDeque};

/// A record as it sits in a topic partition of the driver.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedRecord {
    pub partition: u32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub timestamp: i64,
}

impl LoggedRecord {
    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(&self.key).into_owned()
    }

    pub fn json(&self) -> Option<Value> {
        self.value.as_deref().and_then(|v| serde_json::from_slice(v).ok())
    }
}

struct DriverTask {
    task: Task,
    /// One store set (and cache of decoded values) per member.
    stores: Vec<MemberStores<MemStoreSet>>,
}

/// Index into `subs` and partition.
type TaskId = (usize, u32);

/// One raw entry of a store, as [`TestDriver::dump`] finds it.
#[derive(Debug, Clone)]
pub struct StoreEntry {
    pub processor: &'static str,
    pub store: String,
    pub partition: u32,
    pub key: Vec<u8>,
    /// The stored bytes (expiry header included).
    pub value: Vec<u8>,
}

pub struct TestDriver {
    topology: Topology,
    subs: Vec<SubTopology>,
    /// Topics each sub-topology reads from the log.
    inputs: Vec<Vec<String>>,
    tasks: BTreeMap<TaskId, DriverTask>,
    /// Pending input per task and input topic, in log order.
    queues: BTreeMap<(TaskId, String), VecDeque<Record>>,
    logs: BTreeMap<String, Vec<Vec<LoggedRecord>>>,
    rng: ChaCha8Rng,
    wall_now: i64,
    counters: BTreeMap<Counter, u64>,
}

impl TestDriver {
    /// A driver for the standard pipeline.
    pub fn new(topology: Topology, seed: u64) -> TestDriver {
        let specs = crate::processor_specs(&topology);
        TestDriver::with_specs(topology, specs, seed)
    }

    /// A driver for these processors, grouped into their sub-topologies.
    pub fn with_specs(topology: Topology, specs: Vec<ProcessorSpec>, seed: u64) -> TestDriver {
        let subs = crate::subtopology::group(specs);
        let mut tasks = BTreeMap::new();
        for (i, sub) in subs.iter().enumerate() {
            for p in 0..sub.partitions(&topology) {
                let stores = sub.members.iter().map(|m| member_stores(m, &topology)).collect();
                tasks.insert((i, p), DriverTask { task: Task::new(sub, &topology, p), stores });
            }
        }
        let inputs = subs.iter().map(SubTopology::kafka_inputs).collect();
        TestDriver {
            topology,
            subs,
            inputs,
            tasks,
            queues: BTreeMap::new(),
            logs: BTreeMap::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            wall_now: 0,
            counters: BTreeMap::new(),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Restart every task as a process restart with its local state intact would: new
    /// processor instances (nothing kept in memory), stream time forgotten, stores and
    /// their timers kept.
    pub fn restart(&mut self) {
        for ((i, p), task) in self.tasks.iter_mut() {
            task.task = Task::new(&self.subs[*i], &self.topology, *p);
            // A new process has no decoded values: drop the caches (every write was
            // written back by the commit after each record).
            for m in &mut task.stores {
                m.cache = StateCache::new(m.cache.limit());
            }
        }
    }

    /// Set the wall clock (used under `clock: wall`).
    pub fn set_wall_clock(&mut self, ms: i64) {
        self.wall_now = ms;
    }

    /// Append a record to a topic, as a producer would.
    pub fn pipe(&mut self, topic: &str, key: &[u8], value: Option<Vec<u8>>, timestamp: i64) {
        self.append(Output { topic: topic.to_owned(), key: key.to_vec(), value, timestamp, partition: None });
    }

    pub fn pipe_json(&mut self, topic: &str, key: &str, value: &Value, timestamp: i64) {
        self.pipe(topic, key.as_bytes(), Some(value.to_string().into_bytes()), timestamp);
    }

    /// Append to every partition of a topic (clock ticks).
    pub fn broadcast_json(&mut self, topic: &str, key: &str, value: &Value, timestamp: i64) {
        for p in 0..self.topology.partitions_of(topic) {
            self.append(Output {
                topic: topic.to_owned(),
                key: key.as_bytes().to_vec(),
                value: Some(value.to_string().into_bytes()),
                timestamp,
                partition: Some(p),
            });
        }
    }

    fn append(&mut self, out: Output) {
        let partitions = self.topology.partitions_of(&out.topic);
        let partition = out.partition.unwrap_or_else(|| partition_for(&out.key, partitions)) % partitions;
        let log = self.logs.entry(out.topic.clone()).or_insert_with(|| vec![Vec::new(); partitions as usize]);
        let offset = log[partition as usize].len() as i64;
        log[partition as usize].push(LoggedRecord {
            partition,
            offset,
            key: out.key.clone(),
            value: out.value.clone(),
            timestamp: out.timestamp,
        });
        for (i, inputs) in self.inputs.iter().enumerate() {
            if inputs.contains(&out.topic) {
                let record = Record {
                    topic: out.topic.clone(),
                    partition,
                    offset,
                    key: Some(out.key.clone()),
                    value: out.value.clone(),
                    timestamp: out.timestamp,
                    resolved: Default::default(),
                };
                self.queues.entry(((i, partition), out.topic.clone())).or_default().push_back(record);
            }
        }
    }

    /// Process pending records, one at a time in a seeded random order, until none is
    /// left. Returns how many were processed.
    pub fn run(&mut self) -> Result<usize, ProcessError> {
        let mut processed = 0;
        loop {
            let ready: Vec<(TaskId, String)> =
                self.queues.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| k.clone()).collect();
            if ready.is_empty() {
                return Ok(processed);
            }
            let pick = ready[self.rng.random_range(0..ready.len())].clone();
            let record = self.queues.get_mut(&pick).and_then(VecDeque::pop_front).expect("picked a non-empty queue");
            let (task_id, _) = pick;
            let wall_now = self.wall_now;
            let entry = self.tasks.get_mut(&task_id).expect("every queue belongs to a task");
            let out = entry.task.process(&mut entry.stores, &record, wall_now, &mut NoMeter)?;
            // The driver commits after every record.
            let flushed = entry.task.flush(&mut entry.stores, wall_now, &mut NoMeter)?;
            self.absorb(out);
            self.absorb(flushed);
            processed += 1;
        }
    }

    /// Fire due timers on every task (wall-clock punctuation), then run.
    pub fn punctuate(&mut self) -> Result<usize, ProcessError> {
        let ids: Vec<TaskId> = self.tasks.keys().copied().collect();
        for id in ids {
            let wall_now = self.wall_now;
            let entry = self.tasks.get_mut(&id).expect("listed task");
            let out = entry.task.punctuate(&mut entry.stores, wall_now, &mut NoMeter)?;
            self.absorb(out);
        }
        self.run()
    }

    fn absorb(&mut self, out: crate::task::TaskOutput) {
        for (_, c) in out.counters {
            *self.counters.entry(c).or_default() += 1;
        }
        for o in out.outputs {
            self.append(o);
        }
    }

    /// Every record of a topic, partition by partition, each in offset order.
    pub fn read(&self, topic: &str) -> Vec<LoggedRecord> {
        self.logs.get(topic).map(|parts| parts.iter().flatten().cloned().collect()).unwrap_or_default()
    }

    /// The latest value per key of a topic (what compaction keeps); tombstones remove.
    pub fn table(&self, topic: &str) -> BTreeMap<String, Value> {
        let mut table = BTreeMap::new();
        for r in self.read(topic) {
            match r.json() {
                Some(v) => {
                    table.insert(r.key_str(), v);
                }
                None => {
                    table.remove(&r.key_str());
                }
            }
        }
        table
    }

    pub fn counter(&self, name: &str, label: &str) -> u64 {
        self.counters.iter().filter(|(c, _)| c.name == name && c.label == label).map(|(_, n)| *n).sum()
    }

    /// A stored value of a processor's store, looked up in the partition owning `key`
    /// under `topic`'s partitioning; decoded from its expiry header.
    pub fn store_get(&mut self, processor: &str, store: &str, partition: u32, key: &str) -> Option<Vec<u8>> {
        let (i, m) = self.member(processor)?;
        let entry = self.tasks.get_mut(&(i, partition))?;
        let stored = entry.stores[m].stores.store(store).ok()?.get(key.as_bytes()).ok()??;
        crate::store::decode_value(key.as_bytes(), &stored).ok().map(|(_, v)| v)
    }

    /// Every live entry of a store whose key starts with `prefix`, across partitions:
    /// `(partition, key, value)`.
    pub fn store_scan(&mut self, processor: &str, store: &str, prefix: &str) -> Vec<(u32, String, Vec<u8>)> {
        let Some((i, m)) = self.member(processor) else { return Vec::new() };
        let end = crate::store::prefix_end(prefix.as_bytes());
        let mut out = Vec::new();
        for ((s, p), t) in self.tasks.iter_mut() {
            if *s != i {
                continue;
            }
            let Ok(st) = t.stores[m].stores.store(store) else { continue };
            for (k, v) in st.range(prefix.as_bytes(), &end, usize::MAX).unwrap_or_default() {
                if let Ok((_, value)) = crate::store::decode_value(&k, &v) {
                    out.push((*p, String::from_utf8_lossy(&k).into_owned(), value));
                }
            }
        }
        out
    }

    /// Every raw entry of every store of every member on every partition, timers and
    /// expiry index included: what a search for a person's traces must look through.
    pub fn dump(&mut self) -> Vec<StoreEntry> {
        let mut out = Vec::new();
        for ((i, p), t) in self.tasks.iter_mut() {
            for (m, member) in self.subs[*i].members.iter().enumerate() {
                for (store, entries) in &t.stores[m].stores.stores {
                    for (k, v) in entries.entries() {
                        out.push(StoreEntry {
                            processor: member.name,
                            store: store.clone(),
                            partition: *p,
                            key: k.clone(),
                            value: v.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// Total entries of a store across partitions.
    pub fn store_len(&mut self, processor: &str, store: &str) -> u64 {
        let Some((i, m)) = self.member(processor) else { return 0 };
        self.tasks
            .iter_mut()
            .filter(|((s, _), _)| *s == i)
            .filter_map(|(_, t)| t.stores[m].stores.store(store).ok().map(|s| s.approximate_len()))
            .sum()
    }

    /// (sub-topology index, member index) of a processor.
    fn member(&self, processor: &str) -> Option<(usize, usize)> {
        self.subs
            .iter()
            .enumerate()
            .find_map(|(i, sub)| sub.members.iter().position(|m| m.name == processor).map(|m| (i, m)))
    }
}

fn member_stores(spec: &ProcessorSpec, topology: &Topology) -> MemberStores<MemStoreSet> {
    MemberStores {
        stores: MemStoreSet::with_stores(spec.all_stores()),
        cache: StateCache::new(topology.state.processor_cache_bytes()),
    }
}
