//! The processing runtime: one Kafka consumer group per sub-topology, one task per input
//! partition running every member processor of the sub-topology, exactly-once by
//! default. The loop is the classic one — consume, hand the record to its task (which
//! passes what its processors write for each other in memory), produce outputs, and
//! when the commit interval elapses or the oldest uncommitted record reaches the latency
//! budget, produce the tasks' store writes to their changelogs, add the consumed offsets,
//! and commit it all in one Kafka transaction; store writes reach RocksDB only after that
//! commit. Nothing here knows about customers: it moves records between Kafka and
//! `chorus-processors`.
//!
//! Kafka details that matter (see docs/runtime.md):
//! - The transactional id is per sub-topology and instance, so a restarted instance fences
//!   its own zombie and aborts its open transaction before it restores (otherwise the
//!   changelog's last stable offset would stay behind the zombie's transaction).
//! - Offsets are committed with the consumer's group metadata (KIP-447), so a member
//!   that lost its partitions in a rebalance cannot commit for them any more.
//! - Inputs of one sub-topology are co-partitioned; the `range` assignor keeps partition
//!   N of every input on the same member, which cooperative-sticky does not promise.
//!   Single-input sub-topologies use cooperative-sticky.
//! - Delivery reports are served by the producer's own polling thread; the commit waits
//!   in librdkafka's `rd_kafka_flush`, which sends what lingers at once and sleeps until
//!   every record is acknowledged. rust-rdkafka's `flush` waits in 100 ms steps (every
//!   commit cost a multiple of 100 ms), and its `poll(timeout)` spins through the last
//!   millisecond of every timeout, so polling in 1 ms steps is a busy loop that takes a
//!   core from the broker (docs/runtime.md).

use crate::kafka::{client_config, now_ms, tune};
use crate::metrics::metrics;
use crate::query::LocalStores;
use anyhow::{anyhow, Context as _, Result};
use chorus_processors::cache::StateCache;
use chorus_processors::task::{Meter, TaskOutput};
use chorus_processors::topology::Processing;
use chorus_processors::{ProcessError, Record, SubTopology, Task, Topology};
use chorus_state::{changelog_topic, LiveStore, MemberState, SharedResources, StoreWrite, TaskDb, TaskState};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What every processor loop of one process shares.
#[derive(Clone)]
pub struct EngineConfig {
    pub brokers: String,
    pub topology: Arc<Topology>,
    pub data_dir: PathBuf,
    pub instance_id: String,
    pub shared: Arc<SharedResources>,
    pub local: LocalStores,
    pub shutdown: Arc<AtomicBool>,
    pub drain: Arc<DrainState>,
    /// The broker was just created empty (embedded mode): the changelogs hold nothing,
    /// local stores are the state, and checkpoints restart at 0.
    pub fresh_broker: bool,
    /// The brokers are the embedded broker, which does not store offsets committed in
    /// transactions: commit them directly as well (see docs/runtime.md).
    pub embedded_broker: bool,
}

/// Run one thread of a sub-topology until shutdown: a member of its consumer group with
/// its own transactional producer, running the tasks of the partitions it is assigned
/// (as a Kafka Streams stream thread). Returns when stopped cleanly.
pub fn run_sub_topology(sub: SubTopology, config: EngineConfig, thread: u32) -> Result<()> {
    let name = sub.name.clone();
    let eos = config.topology.processing == Processing::ExactlyOnce;
    // Per thread, and stable across restarts, so a restarted instance fences its own.
    let client = config.topology.client_name(&format!("{name}-{}-{thread}", config.instance_id));
    let drain_name = format!("{name}#{thread}");
    let producer = create_producer(&config, &client, eos)?;
    let inputs = sub.kafka_inputs();
    let assignor = if inputs.len() > 1 { "range" } else { "cooperative-sticky" };
    let context = EngineContext {
        name: name.clone(),
        lag_series: Mutex::new(BTreeSet::new()),
        state: Mutex::new(EngineState {
            sub,
            config: config.clone(),
            producer,
            eos,
            tasks: BTreeMap::new(),
            txn_open: None,
            offsets: BTreeMap::new(),
            failed: None,
            records_out: BTreeMap::new(),
        }),
    };
    let mut consumer_config = client_config(&config.brokers);
    consumer_config
        .set("group.id", config.topology.client_name(&name))
        .set("client.id", &client)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", assignor)
        .set("statistics.interval.ms", "2000");
    tune(&mut consumer_config, "session.timeout.ms", "10000");
    tune(&mut consumer_config, "heartbeat.interval.ms", "1000");
    tune(&mut consumer_config, "max.poll.interval.ms", "300000");
    tune(&mut consumer_config, "fetch.wait.max.ms", "10");
    // Prefetch a few seconds of input, not librdkafka's 64 MB and 100,000 records per
    // partition: a task that is behind holds that much in memory for nothing (Kafka
    // Streams buffers 1,000 records per partition). A full queue pauses a partition's
    // fetches for `fetch.queue.backoff.ms`, 1 s by default: with smaller queues that
    // pause cut the passthrough from 105k to 28k records/s, so it is short here.
    tune(&mut consumer_config, "queued.max.messages.kbytes", "16384");
    tune(&mut consumer_config, "queued.min.messages", "10000");
    tune(&mut consumer_config, "fetch.queue.backoff.ms", "10");
    let consumer: BaseConsumer<EngineContext> =
        consumer_config.create_with_context(context).with_context(|| format!("cannot create the {name} consumer"))?;
    let physical: Vec<String> = inputs.iter().map(|t| config.topology.physical_topic(t).into_owned()).collect();
    let topics: Vec<&str> = physical.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).with_context(|| format!("cannot subscribe {name} to {topics:?}"))?;
    tracing::info!(sub_topology = %name, ?topics, assignor, "sub-topology started");

    let interval = Duration::from_millis(config.topology.commit_interval.ms() as u64);
    let budget = Duration::from_millis(config.topology.commit_latency_budget.ms() as u64);
    let mut last_commit = Instant::now();
    let mut last_drain_check = Instant::now();
    while !config.shutdown.load(Ordering::SeqCst) {
        // Caught up when a poll finds nothing: only then does the latency budget cut a
        // transaction short. With a backlog, commits come at the interval, so each one
        // carries more records (as in Kafka Streams, whose interval is the only rule).
        let mut caught_up_now = false;
        match consumer.poll(Duration::from_millis(5)) {
            Some(Ok(message)) => {
                consumer.context().lock().process(&message)?;
                config.drain.set_idle(&drain_name, false);
            }
            Some(Err(e)) => tracing::warn!(sub_topology = %name, error = %e, "consumer error"),
            None => {
                caught_up_now = true;
                if config.drain.requested() && last_drain_check.elapsed() >= Duration::from_millis(100) {
                    // Stopping: once everything is read, commit it now rather than wait
                    // for the interval.
                    let caught_up = caught_up(&consumer);
                    if caught_up {
                        consumer.context().lock().commit(&consumer)?;
                    }
                    let idle = consumer.context().lock().txn_open.is_none() && caught_up;
                    config.drain.set_idle(&drain_name, idle);
                    last_drain_check = Instant::now();
                }
            }
        }
        if let Some(e) = consumer.context().lock().failed.take() {
            return Err(e);
        }
        let oldest = consumer.context().lock().txn_open;
        if last_commit.elapsed() >= interval || (caught_up_now && oldest.is_some_and(|at| at.elapsed() >= budget)) {
            let mut state = consumer.context().lock();
            state.punctuate()?;
            state.commit(&consumer)?;
            last_commit = Instant::now();
        }
    }
    let mut state = consumer.context().lock();
    state.commit(&consumer)?;
    state.close_all();
    drop(state);
    consumer.unsubscribe();
    tracing::info!(sub_topology = %name, "sub-topology stopped cleanly");
    Ok(())
}

/// Lets `chorus up` finish everything it accepted before it stops: every processor
/// reports whether it has consumed all of its input and committed.
#[derive(Default)]
pub struct DrainState {
    requested: AtomicBool,
    idle: Mutex<BTreeMap<String, bool>>,
}

impl DrainState {
    pub fn register(&self, name: &str) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_owned(), false);
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn set_idle(&self, name: &str, idle: bool) {
        if self.requested() {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_owned(), idle);
        }
    }

    fn all_idle(&self) -> bool {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).values().all(|i| *i)
    }

    /// Wait until every sub-topology has been idle for several checks in a row (a record
    /// one stage emits is input of the next), or until `limit`.
    pub async fn wait(&self, limit: Duration) {
        self.requested.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let mut stable = 0;
        while started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(100)).await;
            stable = if self.all_idle() { stable + 1 } else { 0 };
            if stable >= 5 {
                return;
            }
        }
        tracing::warn!("stopping before every processor caught up ({limit:?} passed)");
    }
}

/// Whether the consumer has read everything currently in its assigned partitions. Only
/// the drain of `chorus up` asks, where the one member owns every partition: no
/// assignment yet means the group is still forming, not that there is nothing to read
/// (a stop right after start-up dropped records the member had not been given yet).
fn caught_up<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> bool {
    let (Ok(assignment), Ok(positions)) = (consumer.assignment(), consumer.position()) else { return false };
    if assignment.count() == 0 {
        return false;
    }
    assignment.elements().iter().all(|elem| {
        let Ok((_, high)) = consumer.fetch_watermarks(elem.topic(), elem.partition(), Duration::from_millis(500))
        else {
            return false;
        };
        let position = positions.find_partition(elem.topic(), elem.partition()).and_then(|p| p.offset().to_raw());
        match position {
            Some(p) if p >= 0 => p >= high,
            _ => high == 0,
        }
    })
}

fn create_producer(config: &EngineConfig, client: &str, eos: bool) -> Result<ThreadedProducer<DeliveryContext>> {
    let mut producer_config = client_config(&config.brokers);
    producer_config
        .set("client.id", client)
        .set("partitioner", "murmur2_random")
        .set("message.max.bytes", config.topology.limits.max_message_bytes().to_string())
        .set("enable.idempotence", "true");
    tune(&mut producer_config, "linger.ms", "5");
    tune(&mut producer_config, "compression.type", "lz4");
    if eos {
        producer_config.set("transactional.id", client).set("transaction.timeout.ms", "30000");
    }
    let producer: ThreadedProducer<DeliveryContext> =
        producer_config
            .create_with_context(DeliveryContext::default())
            .with_context(|| format!("cannot create the {client} producer"))?;
    if eos {
        producer
            .init_transactions(Duration::from_secs(30))
            .map_err(|e| anyhow!("cannot initialise transactions for {client} on {}: {e}", config.brokers))?;
    }
    Ok(producer)
}

/// Delivery reports: the highest offset written per topic partition in the current
/// transaction (changelog checkpoints), and any failure (which aborts it).
#[derive(Default)]
struct DeliveryContext {
    written: Mutex<BTreeMap<(String, i32), i64>>,
    failures: Mutex<Vec<String>>,
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
                let entry = written.entry((m.topic().to_owned(), m.partition())).or_insert(-1);
                *entry = (*entry).max(m.offset());
            }
            Err((e, m)) => {
                let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
                failures.push(format!("{}[{}]: {e}", m.topic(), m.partition()));
            }
        }
    }
}

struct EngineContext {
    name: String,
    state: Mutex<EngineState>,
    /// Partitions with a lag series, so series of partitions that left can be removed.
    lag_series: Mutex<BTreeSet<(String, i32)>>,
}

impl EngineContext {
    fn lock(&self) -> MutexGuard<'_, EngineState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ClientContext for EngineContext {
    /// Consumer lag from librdkafka's periodic statistics: no extra broker requests on the
    /// processing thread.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut now = BTreeSet::new();
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.desired && p.consumer_lag >= 0 {
                    metrics().lag.with_label_values(&[&self.name, topic, &partition.to_string()]).set(p.consumer_lag);
                    now.insert((topic.clone(), *partition));
                }
            }
        }
        let mut series = self.lag_series.lock().unwrap_or_else(|p| p.into_inner());
        for (topic, partition) in series.difference(&now) {
            let _ = metrics().lag.remove_label_values(&[&self.name, topic, &partition.to_string()]);
        }
        *series = now;
    }
}

impl ConsumerContext for EngineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut state = self.lock();
            // Commit what was processed while we still own the partitions.
            if let Err(e) = state.commit(consumer) {
                state.failed = Some(e);
                return;
            }
            let revoked: BTreeSet<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            state.close_partitions(&revoked);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let assigned: BTreeSet<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            let mut state = self.lock();
            if let Err(e) = state.open_tasks(&assigned) {
                tracing::error!(sub_topology = %state.sub.name, partitions = ?assigned, error = %format!("{e:#}"), "cannot open tasks");
                state.failed = Some(e);
            }
        }
    }
}

/// One member's share of a task: its stores (shared with interactive queries) and
/// their metrics.
struct MemberSlot {
    name: &'static str,
    live: Arc<LiveStore>,
    records_in: prometheus::IntCounter,
    processing_seconds: prometheus::Histogram,
    /// Store writes produced to the changelog in the open transaction.
    unapplied: Vec<StoreWrite>,
}

struct TaskSlot {
    task: Task,
    /// In member order, as the task expects its stores.
    members: Vec<MemberSlot>,
}

/// The member store sets of a task, as the processors' `Task` sees them: locked for
/// one step, so interactive queries read between steps, never inside one.
struct SlotStores<'a>(Vec<MutexGuard<'a, MemberState>>);

impl chorus_processors::task::TaskStores for SlotStores<'_> {
    fn member(&mut self, index: usize) -> (&mut dyn chorus_processors::StoreSet, &mut StateCache) {
        let MemberState { state, cache } = &mut *self.0[index];
        (state, cache)
    }
}

fn lock_all(members: &[MemberSlot]) -> SlotStores<'_> {
    SlotStores(members.iter().map(|m| m.live.lock()).collect())
}

/// Thread CPU time per stage within one step: what a stage costs, without the time the
/// thread spent descheduled on busy cores.
#[derive(Default)]
struct CpuMeter {
    started: f64,
    spent: Vec<(&'static str, f64)>,
}

impl CpuMeter {
    fn thread_cpu_seconds() -> f64 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid timespec to write into; the clock id is a constant.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        if rc == 0 {
            ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
        } else {
            0.0
        }
    }
}

impl Meter for CpuMeter {
    fn start(&mut self) {
        self.started = Self::thread_cpu_seconds();
    }

    fn stop(&mut self, stage: &'static str) {
        let spent = (Self::thread_cpu_seconds() - self.started).max(0.0);
        match self.spent.iter_mut().find(|(s, _)| *s == stage) {
            Some((_, total)) => *total += spent,
            None => self.spent.push((stage, spent)),
        }
    }
}

struct EngineState {
    sub: SubTopology,
    config: EngineConfig,
    producer: ThreadedProducer<DeliveryContext>,
    eos: bool,
    tasks: BTreeMap<i32, TaskSlot>,
    /// When the open transaction took its first record (`None`: no transaction open).
    txn_open: Option<Instant>,
    /// Next offset per consumed topic partition in the open transaction.
    offsets: BTreeMap<(String, i32), i64>,
    failed: Option<anyhow::Error>,
    /// Output counters by topic, looked up once rather than per record.
    records_out: BTreeMap<String, prometheus::IntCounter>,
}

impl EngineState {
    fn name(&self) -> &str {
        &self.sub.name
    }

    fn begin(&mut self) -> Result<()> {
        if self.txn_open.is_some() {
            return Ok(());
        }
        if self.eos {
            self.producer
                .begin_transaction()
                .map_err(|e| anyhow!("{}: cannot begin a transaction: {e}", self.name()))?;
        }
        self.txn_open = Some(Instant::now());
        Ok(())
    }

    fn process(&mut self, message: &BorrowedMessage<'_>) -> Result<()> {
        let partition = message.partition();
        if !self.tasks.contains_key(&partition) {
            tracing::warn!(sub_topology = self.name(), partition, "record for a partition without a task; skipped");
            return Ok(());
        }
        self.begin()?;
        let Some(slot) = self.tasks.get_mut(&partition) else { return Ok(()) };
        let record = Record {
            topic: self.config.topology.logical_topic(message.topic()).into_owned(),
            partition: partition as u32,
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            timestamp: message.timestamp().to_millis().unwrap_or_else(now_ms),
            resolved: Default::default(),
        };
        let mut meter = CpuMeter::default();
        let out = slot.task.process(&mut lock_all(&slot.members), &record, now_ms(), &mut meter);
        let out = out.map_err(|e| task_failure(&self.sub.name, partition, e))?;
        observe(&mut slot.members, &out, &meter);
        self.send_outputs(out)?;
        self.offsets.insert((message.topic().to_owned(), partition), record.offset + 1);
        Ok(())
    }

    fn punctuate(&mut self) -> Result<()> {
        if self.config.topology.clock != chorus_processors::topology::Clock::Wall || self.tasks.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut fired = Vec::new();
        let mut wrote = false;
        for (p, slot) in self.tasks.iter_mut() {
            let mut meter = CpuMeter::default();
            let out = slot
                .task
                .punctuate(&mut lock_all(&slot.members), now, &mut meter)
                .map_err(|e| task_failure(&self.sub.name, *p, e))?;
            observe(&mut slot.members, &out, &meter);
            wrote |= slot.members.iter().any(|m| m.live.lock().state.has_pending());
            fired.push(out);
        }
        if wrote || fired.iter().any(|out| !out.outputs.is_empty()) {
            self.begin()?;
        }
        for out in fired {
            self.send_outputs(out)?;
        }
        Ok(())
    }

    fn send_outputs(&mut self, out: TaskOutput) -> Result<()> {
        for (stage, c) in &out.counters {
            if c.name == "dlq" {
                metrics().dlq.with_label_values(&[*stage, c.label.as_str()]).inc();
            }
            metrics().business(stage, c.name, &c.label);
        }
        let now = now_ms();
        // Reads answer from the task's live state, so an effect is readable as soon as
        // its step is done (now); `?consistency=committed` readers see it at the commit.
        for (stage, at) in &out.visible {
            metrics().end_to_end_seconds.with_label_values(&[stage]).observe(((now - at).max(0)) as f64 / 1000.0);
        }
        for o in &out.outputs {
            // The record timestamp is when chorus wrote it, not the event time (which
            // travels in the body): brokers apply time-based retention to record
            // timestamps, and replayed history would be deleted as soon as it is written.
            let topic = self.config.topology.physical_topic(&o.topic);
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&topic).key(o.key.as_slice()).timestamp(now);
            if let Some(value) = &o.value {
                record = record.payload(value.as_slice());
            }
            if let Some(p) = o.partition {
                record = record.partition(p as i32);
            }
            send(&self.producer, record)?;
            let name = &self.sub.name;
            self.records_out
                .entry(o.topic.clone())
                .or_insert_with(|| metrics().records_out.with_label_values(&[name, &o.topic]))
                .inc();
        }
        Ok(())
    }

    /// Changelogs + offsets + outputs in one transaction; then apply to RocksDB.
    fn commit<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> Result<()> {
        if self.txn_open.is_none() {
            return Ok(());
        }
        let started = Instant::now();
        let name = self.sub.name.clone();
        let flush_started = Instant::now();
        let mut flushed = Vec::new();
        for (p, slot) in self.tasks.iter_mut() {
            let mut meter = CpuMeter::default();
            let out = slot
                .task
                .flush(&mut lock_all(&slot.members), now_ms(), &mut meter)
                .map_err(|e| task_failure(&name, *p, e))?;
            // What a commit's flush costs is part of each stage's CPU time.
            observe(&mut slot.members, &out, &meter);
            flushed.push(out);
        }
        for out in flushed {
            self.send_outputs(out)?;
        }
        self.phase("flush", flush_started);
        let changelog_started = Instant::now();
        for (p, slot) in self.tasks.iter_mut() {
            for member in &mut slot.members {
                // Kept in the overlay until applied, so live reads never miss them.
                let writes = member.live.lock().state.pending_writes();
                for w in writes.iter().filter(|w| chorus_processors::task::is_logged(&w.store)) {
                    let topic =
                        self.config.topology.physical_topic(&changelog_topic(member.name, &w.store)).into_owned();
                    let mut record: BaseRecord<'_, [u8], [u8]> =
                        BaseRecord::to(&topic).key(w.key.as_slice()).partition(*p);
                    if let Some(v) = &w.value {
                        record = record.payload(v.as_slice());
                    }
                    send(&self.producer, record)?;
                }
                member.unapplied.extend(writes);
            }
        }
        self.phase("changelog", changelog_started);
        let result = self.finish_transaction(consumer);
        if let Err(e) = result {
            metrics().errors.with_label_values(&[&name, "commit"]).inc();
            tracing::warn!(sub_topology = %name, error = %format!("{e:#}"), "transaction failed; aborting and rewinding");
            self.abort_and_rewind(consumer)?;
            return Ok(());
        }
        let apply_started = Instant::now();
        let written = std::mem::take(&mut *self.producer.context().written.lock().unwrap_or_else(|p| p.into_inner()));
        for (p, slot) in self.tasks.iter_mut() {
            for member in &mut slot.members {
                let checkpoints: BTreeMap<String, i64> = written
                    .iter()
                    .filter(|((topic, part), _)| {
                        part == p && is_changelog_of(&self.config.topology.logical_topic(topic), member.name)
                    })
                    .map(|((topic, _), offset)| (topic.clone(), offset + 1))
                    .collect();
                let writes = std::mem::take(&mut member.unapplied);
                let mut live = member.live.lock();
                live.state
                    .db()
                    .apply(&writes, &checkpoints)
                    .with_context(|| format!("{}[{p}]: cannot apply committed writes", member.name))?;
                live.state.discard_pending();
            }
        }
        self.phase("apply", apply_started);
        self.offsets.clear();
        self.txn_open = None;
        metrics().commit_seconds.with_label_values(&[&name]).observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Time one part of a commit (`commit_phase_seconds`).
    fn phase(&self, phase: &str, since: Instant) {
        metrics()
            .commit_phase_seconds
            .with_label_values(&[&self.sub.name, phase])
            .observe(since.elapsed().as_secs_f64())
    }

    /// Wait until the broker acknowledged every record of the transaction, serving
    /// delivery reports as they come.
    fn await_deliveries(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.producer.in_flight_count() > 0 {
            if Instant::now() >= deadline {
                return Err(anyhow!("{} records not acknowledged within 30 s", self.producer.in_flight_count()));
            }
            flush_for(&self.producer, 10);
        }
        Ok(())
    }

    fn finish_transaction<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> Result<()> {
        let started = Instant::now();
        self.await_deliveries()?;
        self.phase("deliveries", started);
        let failures = std::mem::take(&mut *self.producer.context().failures.lock().unwrap_or_else(|p| p.into_inner()));
        if !failures.is_empty() {
            return Err(anyhow!("deliveries failed: {}", failures.join("; ")));
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in &self.offsets {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
        }
        if self.eos {
            if tpl.count() > 0 {
                let group = consumer.group_metadata().ok_or_else(|| anyhow!("consumer has no group metadata"))?;
                let started = Instant::now();
                self.producer
                    .send_offsets_to_transaction(&tpl, &group, Duration::from_secs(30))
                    .map_err(|e| anyhow!("send offsets: {e}"))?;
                self.phase("offsets", started);
            }
            let started = Instant::now();
            self.producer.commit_transaction(Duration::from_secs(60)).map_err(|e| anyhow!("commit: {e}"))?;
            self.phase("commit", started);
            if self.config.embedded_broker && tpl.count() > 0 {
                // The transaction is committed: a failure here (a rebalance changed the
                // generation) must not abort it. The next commit of the partition stores
                // a later offset; until then its new owner could replay from the last
                // stored one (docs/runtime.md).
                if let Err(e) = consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync) {
                    tracing::warn!(sub_topology = self.name(), error = %e, "offsets not stored on the embedded broker");
                }
            }
        } else if tpl.count() > 0 {
            consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync).map_err(|e| anyhow!("commit offsets: {e}"))?;
        }
        Ok(())
    }

    /// Throw away the failed transaction's effects and consume again from the last
    /// committed offsets.
    fn abort_and_rewind<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> Result<()> {
        if self.eos {
            if let Err(e) = self.producer.abort_transaction(Duration::from_secs(30)) {
                return Err(anyhow!(
                    "{}: cannot abort the transaction ({e}); another instance may have fenced this one",
                    self.name()
                ));
            }
        }
        self.producer.context().written.lock().unwrap_or_else(|p| p.into_inner()).clear();
        for slot in self.tasks.values_mut() {
            for member in &mut slot.members {
                member.live.lock().state.discard_pending();
                member.unapplied.clear();
            }
        }
        let assignment = consumer.assignment().map_err(|e| anyhow!("assignment: {e}"))?;
        let committed = consumer
            .committed_offsets(assignment, Duration::from_secs(10))
            .map_err(|e| anyhow!("committed offsets: {e}"))?;
        for elem in committed.elements() {
            let offset = match elem.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            if let Err(e) = consumer.seek(elem.topic(), elem.partition(), offset, Duration::from_secs(10)) {
                tracing::warn!(error = %e, topic = elem.topic(), partition = elem.partition(), "seek after abort failed");
            }
        }
        self.offsets.clear();
        self.txn_open = None;
        // Reopen tasks so that what their processors keep in memory matches the rewound
        // input (stream time comes back from the stores).
        let partitions: BTreeSet<i32> = self.tasks.keys().copied().collect();
        self.close_partitions(&partitions);
        self.open_tasks(&partitions)
    }

    /// Open the tasks of `partitions` not open yet: every member's store, restored from
    /// the changelogs together, then served.
    fn open_tasks(&mut self, partitions: &BTreeSet<i32>) -> Result<()> {
        let partitions: Vec<i32> = partitions.iter().copied().filter(|p| !self.tasks.contains_key(p)).collect();
        let mut opened: Vec<(i32, &'static str, Vec<&'static str>, TaskDb)> = Vec::new();
        for &partition in &partitions {
            for spec in &self.sub.members {
                let name = spec.name;
                let stores = spec.all_stores();
                let path = self.config.data_dir.join("state").join(name).join(partition.to_string());
                std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
                let db = TaskDb::open(&path, &stores, &self.config.shared)
                    .with_context(|| format!("{name}[{partition}]: cannot open state"))?;
                opened.push((partition, name, stores, db));
            }
        }
        if opened.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let targets: Vec<crate::restore::Target<'_>> = opened
            .iter()
            .map(|(partition, processor, stores, db)| crate::restore::Target {
                processor,
                partition: *partition,
                stores,
                db,
            })
            .collect();
        let restored = crate::restore::restore(&self.config, &self.sub.name, &targets)?;
        drop(targets);
        tracing::info!(
            sub_topology = self.name(),
            partitions = ?partitions,
            restored,
            ms = started.elapsed().as_millis() as u64,
            "stores ready"
        );
        let mut members: BTreeMap<i32, Vec<MemberSlot>> = BTreeMap::new();
        for (partition, name, stores, db) in opened {
            let cache = StateCache::new(self.config.topology.state.processor_cache_bytes());
            let live = LiveStore::new(TaskState::new(db, &stores), cache);
            let labels = [name, &partition.to_string()];
            members.entry(partition).or_default().push(MemberSlot {
                name,
                live,
                records_in: metrics().records_in.with_label_values(&labels),
                processing_seconds: metrics().processing_seconds.with_label_values(&labels),
                unapplied: Vec::new(),
            });
        }
        for (partition, members) in members {
            // Served only once every member is restored.
            for member in &members {
                self.config.local.register(member.name, partition as u32, member.live.clone());
            }
            let task = Task::new(&self.sub, &self.config.topology, partition as u32);
            tracing::info!(sub_topology = self.name(), partition, "task ready");
            self.tasks.insert(partition, TaskSlot { task, members });
        }
        Ok(())
    }

    fn close_partitions(&mut self, partitions: &BTreeSet<i32>) {
        for p in partitions {
            if let Some(slot) = self.tasks.remove(p) {
                for member in &slot.members {
                    self.config.local.unregister(member.name, *p as u32);
                    if let Err(e) = member.live.db().flush() {
                        tracing::warn!(processor = member.name, partition = p, error = %e, "flush on close failed");
                    }
                }
            }
        }
    }

    fn close_all(&mut self) {
        let all: BTreeSet<i32> = self.tasks.keys().copied().collect();
        self.close_partitions(&all);
    }
}

/// Per-stage records and CPU time of one step.
fn observe(members: &mut [MemberSlot], out: &TaskOutput, meter: &CpuMeter) {
    for member in members {
        if let Some((_, n)) = out.handled.iter().find(|(s, _)| *s == member.name) {
            member.records_in.inc_by(*n as u64);
        }
        if let Some((_, secs)) = meter.spent.iter().find(|(s, _)| *s == member.name) {
            member.processing_seconds.observe(*secs);
        }
    }
}

/// Whether `topic` is one of `processor`'s changelogs.
fn is_changelog_of(topic: &str, processor: &str) -> bool {
    topic
        .strip_prefix("chorus-")
        .and_then(|rest| rest.strip_prefix(processor))
        .is_some_and(|rest| rest.starts_with('-') && rest.ends_with("-changelog"))
}

fn task_failure(name: &str, partition: i32, e: ProcessError) -> anyhow::Error {
    metrics().errors.with_label_values(&[name, "task"]).inc();
    anyhow!("{name}[{partition}]: {e}")
}

/// Send, waiting for room in the producer queue when it is full.
fn send<C: ProducerContext>(
    producer: &ThreadedProducer<C>,
    mut record: BaseRecord<'_, [u8], [u8], C::DeliveryOpaque>,
) -> Result<()>
where
    C::DeliveryOpaque: Default,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                flush_for(producer, 10);
            }
            Err((e, r)) => return Err(anyhow!("cannot produce to {}: {e}", r.topic)),
        }
    }
}

/// Wait up to `ms` for every record to be acknowledged and its delivery report served
/// (by the producer's polling thread), sending what lingers at once. librdkafka waits on
/// a condition variable, so the thread sleeps instead of spinning.
fn flush_for<C: ProducerContext>(producer: &ThreadedProducer<C>, ms: i32) {
    // SAFETY: the pointer is the live client handle owned by `producer`; `rd_kafka_flush`
    // is thread-safe and, with delivery reports as events, only waits for the count of
    // outstanding messages to reach zero.
    unsafe {
        rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), ms);
    }
}
