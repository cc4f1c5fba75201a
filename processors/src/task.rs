//! A task is one sub-topology on one partition: the unit the runtime assigns, restores
//! and commits, and the unit the TestDriver interleaves. It owns what every processor
//! needs the same way — the clock, timers, the expiry sweep, turning rejected input into
//! `events.dlq` records, and handing records between its processors in memory — so
//! processors only hold business rules.

use crate::cache::StateCache;
use crate::partition::partition_for;
use crate::processor::{timer_key, Counter, Ctx, Output, ProcessError, Processor, Record, EXPIRY_STORE, TIMERS_STORE};
use crate::store::{decode_value, encode_value, StoreSet};
use crate::subtopology::SubTopology;
use crate::topology::{Clock, Topology};
use base64::Engine as _;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub const DLQ_TOPIC: &str = "events.dlq";

/// How to build one processor of the topology, and what it reads and writes.
pub struct ProcessorSpec {
    pub name: &'static str,
    /// Input topics; all are co-partitioned (task N reads partition N of each).
    pub inputs: Vec<String>,
    /// Stores the processor uses (timers and the expiry index are added to every task).
    pub stores: Vec<&'static str>,
    pub outputs: Vec<String>,
    /// Outputs always keyed by the record being processed (same key, same partition):
    /// a member of the same task that reads one gets it in memory.
    pub forwards: Vec<String>,
    /// The sub-topology this processor belongs to (see `subtopology.rs`).
    pub sub_topology: &'static str,
    pub factory: Box<dyn Fn() -> Box<dyn Processor> + Send + Sync>,
}

impl ProcessorSpec {
    /// Every store a task of this processor has.
    pub fn all_stores(&self) -> Vec<&'static str> {
        let mut all = self.stores.clone();
        all.push(TIMERS_STORE);
        all.push(EXPIRY_STORE);
        all
    }

    /// The stores backed by a changelog: all but the expiry index.
    pub fn logged_stores(&self) -> Vec<&'static str> {
        self.all_stores().into_iter().filter(|s| is_logged(s)).collect()
    }
}

/// Whether a store's writes go to its changelog. The expiry index does not: it is
/// derived from the expiry headers of the other stores' values, which a restore
/// replays, so logging it would double the changelog records of every expiring write
/// (one per event for the dedupe window).
pub fn is_logged(store: &str) -> bool {
    store != EXPIRY_STORE
}

/// A metric increment, with the stage that counted it.
pub type StageCounter = (&'static str, Counter);

/// What one step of a task produced.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TaskOutput {
    /// Records for Kafka (records delivered in memory to a member of the task are not
    /// here unless outside readers want them too).
    pub outputs: Vec<Output>,
    pub counters: Vec<StageCounter>,
    /// Event times whose effects this step made visible, by stage.
    pub visible: Vec<(&'static str, i64)>,
    /// Records each stage handled in this step, Kafka and in-memory input alike.
    pub handled: Vec<(&'static str, u32)>,
}

/// Measures each stage's share of a step (the runtime reads thread CPU time; the
/// TestDriver measures nothing). Processors stay free of clocks.
pub trait Meter {
    fn start(&mut self) {}
    fn stop(&mut self, _stage: &'static str) {}
}

/// A meter that measures nothing.
pub struct NoMeter;
impl Meter for NoMeter {}

/// The stores of a task, one set per member in member order, each with the cache of
/// its decoded values.
pub trait TaskStores {
    fn member(&mut self, index: usize) -> (&mut dyn StoreSet, &mut StateCache);
}

/// One member's stores and cache, as the TestDriver holds them.
pub struct MemberStores<S> {
    pub stores: S,
    pub cache: StateCache,
}

impl<S: StoreSet> TaskStores for Vec<MemberStores<S>> {
    fn member(&mut self, index: usize) -> (&mut dyn StoreSet, &mut StateCache) {
        let m = &mut self[index];
        (&mut m.stores, &mut m.cache)
    }
}

fn member_ctx<'a>(
    stores: &'a mut dyn TaskStores,
    member: usize,
    now: i64,
    clock: Clock,
    partition: u32,
    partitions: &'a BTreeMap<String, u32>,
) -> Ctx<'a> {
    let (set, cache) = stores.member(member);
    Ctx::new(now, clock, partition, set, cache, partitions)
}

struct Member {
    name: &'static str,
    processor: Box<dyn Processor>,
    inputs: Vec<String>,
}

/// One partition of a sub-topology: every member processor, each record visiting the
/// members that read its topic in member order, and what they write for each other on
/// this partition handed on in memory (breadth first, in the order written).
pub struct Task {
    pub name: String,
    pub partition: u32,
    members: Vec<Member>,
    /// Topics the task reads from Kafka: a record written to one of them for this
    /// partition is delivered in memory only.
    kafka_inputs: BTreeSet<String>,
    /// Topics some member reads.
    read: BTreeSet<String>,
    clock: Clock,
    /// Highest event time seen: "now" under `clock: event`.
    stream_time: i64,
    partitions: BTreeMap<String, u32>,
    /// `Processor::init` ran.
    started: bool,
    /// Hashes the keys of redacted dead letters.
    hasher: crate::privacy::Hasher,
}

/// Where a task keeps its stream time: in the first member's timer store, under a key
/// that sorts after every timer (due times are at most `i64::MAX`), so it is
/// changelogged and restored with the timers it governs and never fires.
const STREAM_TIME_KEY: &[u8] = b"\xff\xff\xff\xff\xff\xff\xff\xffstream_time";

/// Guard against timers that keep rescheduling themselves at `now`.
const MAX_TIMER_ROUNDS: usize = 10_000;
/// In-memory records one step may hand on; past this (a forwarding loop) the rest go
/// through Kafka, as they would between separate tasks.
const MAX_IN_MEMORY: usize = 100_000;
/// Flush rounds per commit: a member's flush may hand records to members flushed before.
const MAX_FLUSH_ROUNDS: usize = 16;

impl Task {
    pub fn new(sub: &SubTopology, topology: &Topology, partition: u32) -> Task {
        Task {
            name: sub.name.clone(),
            partition,
            members: sub
                .members
                .iter()
                .map(|spec| Member { name: spec.name, processor: (spec.factory)(), inputs: spec.inputs.clone() })
                .collect(),
            kafka_inputs: sub.kafka_inputs().into_iter().collect(),
            read: sub.read_topics(),
            clock: topology.clock,
            stream_time: 0,
            partitions: topology.partition_map(),
            started: false,
            hasher: topology.privacy.hasher(),
        }
    }

    pub fn stream_time(&self) -> i64 {
        self.stream_time
    }

    /// Resume from a persisted stream time (never moves it back).
    pub fn resume_stream_time(&mut self, at: i64) {
        self.stream_time = self.stream_time.max(at);
    }

    pub fn member_names(&self) -> Vec<&'static str> {
        self.members.iter().map(|m| m.name).collect()
    }

    fn now(&self, wall_now: i64) -> i64 {
        match self.clock {
            Clock::Event => self.stream_time,
            Clock::Wall => wall_now,
        }
    }

    /// Process one record from Kafka (and everything it hands on in memory), then fire
    /// whatever timers and expiries became due.
    pub fn process(
        &mut self,
        stores: &mut dyn TaskStores,
        record: &Record,
        wall_now: i64,
        meter: &mut dyn Meter,
    ) -> Result<TaskOutput, ProcessError> {
        let now = self.now(wall_now);
        let mut step = Step::new(now);
        self.start(stores, &mut step, meter)?;
        self.deliver(stores, record, &mut step, meter)?;
        self.drain(stores, &mut step, meter)?;
        // Under `clock: event` time moves with records, so timers are checked whenever
        // stream time advances; under `clock: wall` the runtime punctuates every commit
        // interval, and checking after each record would only cost two scans per record.
        if self.clock == Clock::Event && step.now > self.stream_time {
            self.stream_time = step.now;
            self.fire_due(stores, &mut step, meter)?;
            if !self.members.is_empty() {
                let stored = encode_value(0, &self.stream_time.to_be_bytes());
                stores.member(0).0.store(TIMERS_STORE)?.put(STREAM_TIME_KEY, stored)?;
            }
        }
        Ok(step.out)
    }

    /// Let every member write what it caches; before every commit. Repeated while a
    /// flush hands records to members (which may cache again), so nothing cached is
    /// left behind the commit.
    pub fn flush(
        &mut self,
        stores: &mut dyn TaskStores,
        wall_now: i64,
        meter: &mut dyn Meter,
    ) -> Result<TaskOutput, ProcessError> {
        let mut step = Step::new(self.now(wall_now));
        for _ in 0..MAX_FLUSH_ROUNDS {
            let handed_before = step.in_memory;
            for i in 0..self.members.len() {
                self.hook(stores, i, &mut step, meter, |processor, ctx| {
                    processor.flush(ctx)?;
                    ctx.write_back().map(|_| ())
                })?;
                self.drain(stores, &mut step, meter)?;
            }
            if step.in_memory == handed_before {
                break;
            }
        }
        Ok(step.out)
    }

    /// Advance time without a record (wall-clock punctuation).
    pub fn punctuate(
        &mut self,
        stores: &mut dyn TaskStores,
        wall_now: i64,
        meter: &mut dyn Meter,
    ) -> Result<TaskOutput, ProcessError> {
        let mut step = Step::new(self.now(wall_now));
        self.start(stores, &mut step, meter)?;
        self.fire_due(stores, &mut step, meter)?;
        Ok(step.out)
    }

    fn start(
        &mut self,
        stores: &mut dyn TaskStores,
        step: &mut Step,
        meter: &mut dyn Meter,
    ) -> Result<(), ProcessError> {
        if self.started {
            return Ok(());
        }
        if self.clock == Clock::Event && !self.members.is_empty() {
            // Resume where the task's time stood before a restart, an abort or a move.
            if let Some(stored) = stores.member(0).0.store(TIMERS_STORE)?.get(STREAM_TIME_KEY)? {
                let (_, bytes) = decode_value(STREAM_TIME_KEY, &stored)?;
                if let Ok(at) = <[u8; 8]>::try_from(bytes.as_slice()) {
                    self.stream_time = self.stream_time.max(i64::from_be_bytes(at));
                    step.now = step.now.max(self.stream_time);
                }
            }
        }
        for i in 0..self.members.len() {
            self.hook(stores, i, step, meter, |processor, ctx| processor.init(ctx))?;
        }
        self.started = true;
        self.drain(stores, step, meter)
    }

    /// Run one member's hook (`init`, `flush`) at the step's time and take its outputs.
    fn hook(
        &mut self,
        stores: &mut dyn TaskStores,
        i: usize,
        step: &mut Step,
        meter: &mut dyn Meter,
        run: impl FnOnce(&mut dyn Processor, &mut Ctx<'_>) -> Result<(), ProcessError>,
    ) -> Result<(), ProcessError> {
        meter.start();
        let mut ctx = member_ctx(stores, i, step.now, self.clock, self.partition, &self.partitions);
        run(self.members[i].processor.as_mut(), &mut ctx)?;
        let name = self.members[i].name;
        self.absorb(ctx, name, step);
        meter.stop(name);
        Ok(())
    }

    /// Hand one record to every member that reads its topic.
    fn deliver(
        &mut self,
        stores: &mut dyn TaskStores,
        record: &Record,
        step: &mut Step,
        meter: &mut dyn Meter,
    ) -> Result<(), ProcessError> {
        for i in 0..self.members.len() {
            if !self.members[i].inputs.contains(&record.topic) {
                continue;
            }
            let name = self.members[i].name;
            meter.start();
            let start = step.now;
            let mut ctx = member_ctx(stores, i, start, self.clock, self.partition, &self.partitions);
            let result = self.members[i].processor.process(&mut ctx, record);
            match result {
                Ok(()) => {
                    // Under `clock: event` the member moved time to the record's event
                    // time; the rest of the step runs at that time.
                    let moved = ctx.now;
                    self.absorb(ctx, name, step);
                    step.now = step.now.max(moved);
                }
                Err(ProcessError::Reject { reason, detail }) => {
                    // A processor rejects before it writes, so dropping its outputs loses
                    // nothing; the input itself is kept on the DLQ.
                    drop(ctx);
                    let mut ctx = member_ctx(stores, i, start, self.clock, self.partition, &self.partitions);
                    ctx.count("dlq", reason);
                    let letter = dead_letter(name, record, reason, &detail, start);
                    ctx.emit(DLQ_TOPIC, record.key.as_deref().unwrap_or_default(), Some(letter), None);
                    self.absorb(ctx, name, step);
                }
                Err(ProcessError::Redacted { reason, detail }) => {
                    drop(ctx);
                    let mut ctx = member_ctx(stores, i, start, self.clock, self.partition, &self.partitions);
                    ctx.count("dlq", reason);
                    if reason == crate::privacy::ERASED_SUBJECT {
                        ctx.count("privacy_suppressed_events", record.topic.clone());
                    }
                    let key = self.hasher.hash(&String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()));
                    let letter = redacted_letter(name, record, reason, &detail, &key, start);
                    ctx.emit(DLQ_TOPIC, key.as_bytes(), Some(letter), None);
                    self.absorb(ctx, name, step);
                }
                Err(fatal) => return Err(fatal),
            }
            step.handled(name);
            meter.stop(name);
        }
        Ok(())
    }

    /// Process what members handed each other, until nothing is left.
    fn drain(
        &mut self,
        stores: &mut dyn TaskStores,
        step: &mut Step,
        meter: &mut dyn Meter,
    ) -> Result<(), ProcessError> {
        while let Some(record) = step.queue.pop_front() {
            self.deliver(stores, &record, step, meter)?;
        }
        Ok(())
    }

    /// Take a member's outputs: records for this partition of a topic a member reads are
    /// queued for it; the rest (and outside topics that members also read, such as
    /// `profiles`) go to Kafka.
    fn absorb(&self, ctx: Ctx<'_>, stage: &'static str, step: &mut Step) {
        let Ctx { outputs, counters, visible, .. } = ctx;
        step.out.counters.extend(counters.into_iter().map(|c| (stage, c)));
        step.out.visible.extend(visible.into_iter().map(|at| (stage, at)));
        for o in outputs {
            if self.read.contains(&o.topic) && step.in_memory < MAX_IN_MEMORY {
                let partitions = self.partitions.get(&o.topic).copied().unwrap_or(1).max(1);
                let partition = o.partition.unwrap_or_else(|| partition_for(&o.key, partitions)) % partitions;
                if partition == self.partition {
                    step.in_memory += 1;
                    let record = Record {
                        topic: o.topic.clone(),
                        partition,
                        offset: -1,
                        key: Some(o.key.clone()),
                        value: o.value.clone(),
                        timestamp: o.timestamp,
                        resolved: Default::default(),
                    };
                    step.queue.push_back(record);
                    if self.kafka_inputs.contains(&o.topic) {
                        continue;
                    }
                }
            }
            step.out.outputs.push(o);
        }
    }

    fn fire_due(
        &mut self,
        stores: &mut dyn TaskStores,
        step: &mut Step,
        meter: &mut dyn Meter,
    ) -> Result<(), ProcessError> {
        for i in 0..self.members.len() {
            self.fire_member(stores, i, step, meter)?;
        }
        Ok(())
    }

    fn fire_member(
        &mut self,
        stores: &mut dyn TaskStores,
        i: usize,
        step: &mut Step,
        meter: &mut dyn Meter,
    ) -> Result<(), ProcessError> {
        let now = step.now;
        let name = self.members[i].name;
        let until = timer_key(now.saturating_add(1), &[]);
        for _ in 0..MAX_TIMER_ROUNDS {
            let due = stores.member(i).0.store(TIMERS_STORE)?.range(&[0u8; 8], &until, 64)?;
            if due.is_empty() {
                break;
            }
            for (key, stored) in due {
                meter.start();
                stores.member(i).0.store(TIMERS_STORE)?.delete(&key)?;
                let (_, payload) = decode_value(&key, &stored)?;
                let mut ctx = member_ctx(stores, i, now, self.clock, self.partition, &self.partitions);
                self.members[i].processor.on_timer(&mut ctx, &key[8..], &payload)?;
                self.absorb(ctx, name, step);
                meter.stop(name);
                self.drain(stores, step, meter)?;
            }
        }
        for _ in 0..MAX_TIMER_ROUNDS {
            let due = stores.member(i).0.store(EXPIRY_STORE)?.range(&[0u8; 8], &until, 256)?;
            if due.is_empty() {
                break;
            }
            for (index_key, _) in due {
                meter.start();
                stores.member(i).0.store(EXPIRY_STORE)?.delete(&index_key)?;
                let rest = &index_key[8..];
                let Some(sep) = rest.iter().position(|b| *b == 0) else { continue };
                let store = String::from_utf8_lossy(&rest[..sep]).into_owned();
                let key = &rest[sep + 1..];
                let mut ctx = member_ctx(stores, i, now, self.clock, self.partition, &self.partitions);
                if ctx.sweep_if_expired(&store, key)? {
                    self.members[i].processor.on_expired(&mut ctx, &store, key)?;
                }
                self.absorb(ctx, name, step);
                meter.stop(name);
                self.drain(stores, step, meter)?;
            }
        }
        Ok(())
    }
}

/// One step of a task: its time, what it produced, and what waits in memory.
struct Step {
    now: i64,
    out: TaskOutput,
    queue: VecDeque<Record>,
    in_memory: usize,
}

impl Step {
    fn new(now: i64) -> Step {
        Step { now, out: TaskOutput::default(), queue: VecDeque::new(), in_memory: 0 }
    }

    fn handled(&mut self, stage: &'static str) {
        match self.out.handled.iter_mut().find(|(s, _)| *s == stage) {
            Some((_, n)) => *n += 1,
            None => self.out.handled.push((stage, 1)),
        }
    }
}

/// The most of a rejected record's bytes a dead letter carries. A letter must stay far
/// below what the broker accepts (`max.message.bytes`, 1 MiB by default): a letter the
/// broker refuses would abort the transaction again and again and stall the task. A
/// longer record is cut; its size and SHA-256 identify it.
pub const DLQ_MAX_ORIGINAL_BYTES: usize = 64 * 1024;
/// The most of a rejection's detail a letter carries.
const DLQ_MAX_DETAIL_CHARS: usize = 2_048;

fn dead_letter(processor: &str, record: &Record, reason: &str, detail: &str, now: i64) -> Vec<u8> {
    use sha2::Digest as _;
    let original = record.value.as_deref().unwrap_or_default();
    let kept = &original[..original.len().min(DLQ_MAX_ORIGINAL_BYTES)];
    let detail: String = detail.chars().take(DLQ_MAX_DETAIL_CHARS).collect();
    let digest = sha2::Sha256::digest(original);
    let letter = serde_json::json!({
        "reason": reason,
        "detail": detail,
        "source_topic": record.topic,
        "source_partition": record.partition,
        "source_offset": record.offset,
        "processor": processor,
        "original_base64": base64::engine::general_purpose::STANDARD.encode(kept),
        "original_bytes": original.len(),
        "original_sha256": digest.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "original_truncated": kept.len() < original.len(),
        "redacted": false,
        "key_hash": "",
        "at": now,
    });
    letter.to_string().into_bytes()
}

/// The dead letter of an input that must not be kept: why, and where it was, with no
/// byte of it (`redacted: true`; the DLQ key is `key_hash`).
fn redacted_letter(processor: &str, record: &Record, reason: &str, detail: &str, key_hash: &str, now: i64) -> Vec<u8> {
    let letter = serde_json::json!({
        "reason": reason,
        "detail": detail.chars().take(DLQ_MAX_DETAIL_CHARS).collect::<String>(),
        "source_topic": record.topic,
        "source_partition": record.partition,
        "source_offset": record.offset,
        "processor": processor,
        "original_base64": "",
        "original_bytes": record.value.as_deref().map_or(0, <[u8]>::len),
        "original_sha256": "",
        "original_truncated": false,
        "redacted": true,
        "key_hash": key_hash,
        "at": now,
    });
    letter.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStoreSet;
    use crate::topology::Clock;

    /// Rejects every record.
    struct Refuse;
    impl Processor for Refuse {
        fn process(&mut self, _: &mut Ctx<'_>, _: &Record) -> Result<(), ProcessError> {
            Err(ProcessError::reject("invalid_event", "x".repeat(100_000)))
        }
    }

    /// Moves event time to the record timestamp and writes the task's `now`.
    struct Clocked;
    impl Processor for Clocked {
        fn process(&mut self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError> {
            ctx.observe_event_time(record.timestamp);
            let now = ctx.now;
            ctx.emit("out", b"k", Some(now.to_string().into_bytes()), None);
            Ok(())
        }
    }

    fn sub(processor: fn() -> Box<dyn Processor>) -> SubTopology {
        let spec = ProcessorSpec {
            name: "one",
            inputs: vec!["in".into()],
            stores: vec![],
            outputs: vec!["out".into()],
            forwards: vec![],
            sub_topology: "test",
            factory: Box::new(move || processor()),
        };
        crate::subtopology::group(vec![spec]).remove(0)
    }

    fn record(timestamp: i64, value: Vec<u8>) -> Record {
        Record {
            topic: "in".into(),
            partition: 0,
            offset: 7,
            key: Some(b"k".to_vec()),
            value: Some(value),
            timestamp,
            resolved: Default::default(),
        }
    }

    #[test]
    fn a_dead_letter_stays_small_whatever_the_record_size() {
        let sub = sub(|| Box::new(Refuse));
        let topology = Topology::default();
        let mut task = Task::new(&sub, &topology, 0);
        let mut stores = vec![MemberStores {
            stores: MemStoreSet::with_stores(sub.members[0].all_stores()),
            cache: StateCache::new(1 << 20),
        }];
        let big = vec![b'a'; 1_000_000];
        let out = task.process(&mut stores, &record(1, big), 0, &mut NoMeter).unwrap();
        let letter = &out.outputs[0];
        assert_eq!(letter.topic, DLQ_TOPIC);
        let bytes = letter.value.as_ref().unwrap();
        assert!(bytes.len() < 100_000, "letter of {} bytes", bytes.len());
        let json: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(json["original_bytes"], 1_000_000);
        assert_eq!(json["original_truncated"], true);
        assert_eq!(json["original_sha256"].as_str().unwrap().len(), 64);
        assert_eq!(json["source_offset"], 7);
    }

    #[test]
    fn stream_time_survives_a_restart_of_the_task() {
        let sub = sub(|| Box::new(Clocked));
        let topology = Topology { clock: Clock::Event, ..Topology::default() };
        let mut stores = vec![MemberStores {
            stores: MemStoreSet::with_stores(sub.members[0].all_stores()),
            cache: StateCache::new(1 << 20),
        }];
        let mut task = Task::new(&sub, &topology, 0);
        task.process(&mut stores, &record(5_000, b"a".to_vec()), 0, &mut NoMeter).unwrap();
        assert_eq!(task.stream_time(), 5_000);
        // A new task over the same stores (a restart, an abort, a move): time resumes at
        // 5 s, so a late record does not move it back to 1 s.
        let mut task = Task::new(&sub, &topology, 0);
        let out = task.process(&mut stores, &record(1_000, b"b".to_vec()), 0, &mut NoMeter).unwrap();
        assert_eq!(out.outputs[0].value.as_deref(), Some(&b"5000"[..]));
        assert_eq!(task.stream_time(), 5_000);
    }
}
