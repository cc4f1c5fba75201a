//! The processing runtime: one Kafka consumer group per processor, one task per input
//! partition, exactly-once by default. The loop is the classic one — consume, hand the
//! record to its task, produce outputs, and every commit interval produce the tasks'
//! store writes to their changelogs, add the consumed offsets, and commit it all in one
//! Kafka transaction; store writes reach RocksDB only after that commit. Nothing here
//! knows about customers: it moves records between Kafka and `chorus-processors`.
//!
//! Kafka details that matter (see docs/runtime.md):
//! - The transactional id is per processor and instance, so a restarted instance fences
//!   its own zombie and aborts its open transaction before it restores (otherwise the
//!   changelog's last stable offset would stay behind the zombie's transaction).
//! - Offsets are committed with the consumer's group metadata (KIP-447), so a member
//!   that lost its partitions in a rebalance cannot commit for them any more.
//! - Inputs of one processor are co-partitioned; the `range` assignor keeps partition N
//!   of every input on the same member, which cooperative-sticky does not promise. Single-input
//!   processors use cooperative-sticky.

use crate::kafka::{client_config, now_ms};
use crate::metrics::metrics;
use crate::query::LocalStores;
use anyhow::{anyhow, Context as _, Result};
use chorus_processors::task::TaskOutput;
use chorus_processors::topology::Processing;
use chorus_processors::{ProcessError, ProcessorSpec, Record, Task, Topology};
use chorus_state::{changelog_topic, SharedResources, StoreWrite, TaskDb, TaskState};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
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

/// Run one processor until shutdown; returns when stopped cleanly.
pub fn run_processor(spec: ProcessorSpec, config: EngineConfig) -> Result<()> {
    let name = spec.name;
    let eos = config.topology.processing == Processing::ExactlyOnce;
    let producer = create_producer(&config, name, eos)?;
    let inputs = spec.inputs.clone();
    let assignor = if inputs.len() > 1 { "range" } else { "cooperative-sticky" };
    let context = EngineContext {
        name,
        lag_series: Mutex::new(BTreeSet::new()),
        state: Mutex::new(EngineState {
            spec,
            config: config.clone(),
            producer,
            eos,
            tasks: BTreeMap::new(),
            txn_open: false,
            offsets: BTreeMap::new(),
            failed: None,
            records_out: BTreeMap::new(),
        }),
    };
    let consumer: BaseConsumer<EngineContext> = client_config(&config.brokers)
        .set("group.id", format!("chorus-{name}"))
        .set("client.id", format!("chorus-{name}-{}", config.instance_id))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", assignor)
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", "300000")
        .set("fetch.wait.max.ms", "10")
        .set("statistics.interval.ms", "2000")
        .create_with_context(context)
        .with_context(|| format!("cannot create the {name} consumer"))?;
    let topics: Vec<&str> = inputs.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).with_context(|| format!("cannot subscribe {name} to {topics:?}"))?;
    tracing::info!(processor = name, ?topics, assignor, "processor started");

    let interval = Duration::from_millis(config.topology.commit_interval.ms() as u64);
    let mut last_commit = Instant::now();
    let mut last_drain_check = Instant::now();
    while !config.shutdown.load(Ordering::SeqCst) {
        match consumer.poll(Duration::from_millis(20)) {
            Some(Ok(message)) => {
                consumer.context().lock().process(&message)?;
                config.drain.set_idle(name, false);
            }
            Some(Err(e)) => tracing::warn!(processor = name, error = %e, "consumer error"),
            None => {
                if config.drain.requested() && last_drain_check.elapsed() >= Duration::from_millis(100) {
                    let idle = !consumer.context().lock().txn_open && caught_up(&consumer);
                    config.drain.set_idle(name, idle);
                    last_drain_check = Instant::now();
                }
            }
        }
        if let Some(e) = consumer.context().lock().failed.take() {
            return Err(e);
        }
        if last_commit.elapsed() >= interval {
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
    tracing::info!(processor = name, "processor stopped cleanly");
    Ok(())
}

/// Lets `chorus up` finish everything it accepted before it stops: every processor
/// reports whether it has consumed all of its input and committed.
#[derive(Default)]
pub struct DrainState {
    requested: AtomicBool,
    idle: Mutex<BTreeMap<&'static str, bool>>,
}

impl DrainState {
    pub fn register(&self, name: &'static str) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).insert(name, false);
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn set_idle(&self, name: &'static str, idle: bool) {
        if self.requested() {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).insert(name, idle);
        }
    }

    fn all_idle(&self) -> bool {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).values().all(|i| *i)
    }

    /// Wait until every processor has been idle for several checks in a row (a record
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

/// Whether the consumer has read everything currently in its assigned partitions.
fn caught_up<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> bool {
    let (Ok(assignment), Ok(positions)) = (consumer.assignment(), consumer.position()) else { return false };
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

fn create_producer(config: &EngineConfig, name: &str, eos: bool) -> Result<BaseProducer<DeliveryContext>> {
    let mut producer_config = client_config(&config.brokers);
    producer_config
        .set("client.id", format!("chorus-{name}-{}", config.instance_id))
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("message.max.bytes", "4194304")
        .set("enable.idempotence", "true");
    if eos {
        producer_config
            .set("transactional.id", format!("chorus-{name}-{}", config.instance_id))
            .set("transaction.timeout.ms", "30000");
    }
    let producer: BaseProducer<DeliveryContext> = producer_config
        .create_with_context(DeliveryContext::default())
        .with_context(|| format!("cannot create the {name} producer"))?;
    if eos {
        producer
            .init_transactions(Duration::from_secs(30))
            .map_err(|e| anyhow!("cannot initialise transactions for {name} on {}: {e}", config.brokers))?;
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
    name: &'static str,
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
                    metrics().lag.with_label_values(&[self.name, topic, &partition.to_string()]).set(p.consumer_lag);
                    now.insert((topic.clone(), *partition));
                }
            }
        }
        let mut series = self.lag_series.lock().unwrap_or_else(|p| p.into_inner());
        for (topic, partition) in series.difference(&now) {
            let _ = metrics().lag.remove_label_values(&[self.name, topic, &partition.to_string()]);
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
            for p in assigned {
                if let Err(e) = state.open_task(p) {
                    tracing::error!(processor = state.spec.name, partition = p, error = %format!("{e:#}"), "cannot open task");
                    state.failed = Some(e);
                    return;
                }
            }
        }
    }
}

struct TaskSlot {
    task: Task,
    state: TaskState,
    records_in: prometheus::IntCounter,
    processing_seconds: prometheus::Histogram,
    /// Store writes produced to the changelog in the open transaction.
    unapplied: Vec<StoreWrite>,
}

struct EngineState {
    spec: ProcessorSpec,
    config: EngineConfig,
    producer: BaseProducer<DeliveryContext>,
    eos: bool,
    tasks: BTreeMap<i32, TaskSlot>,
    txn_open: bool,
    /// Next offset per consumed topic partition in the open transaction.
    offsets: BTreeMap<(String, i32), i64>,
    failed: Option<anyhow::Error>,
    /// Output counters by topic, looked up once rather than per record.
    records_out: BTreeMap<String, prometheus::IntCounter>,
}

impl EngineState {
    fn name(&self) -> &'static str {
        self.spec.name
    }

    fn begin(&mut self) -> Result<()> {
        if self.eos && !self.txn_open {
            self.producer
                .begin_transaction()
                .map_err(|e| anyhow!("{}: cannot begin a transaction: {e}", self.name()))?;
        }
        self.txn_open = true;
        Ok(())
    }

    fn process(&mut self, message: &BorrowedMessage<'_>) -> Result<()> {
        let partition = message.partition();
        if !self.tasks.contains_key(&partition) {
            tracing::warn!(processor = self.name(), partition, "record for a partition without a task; skipped");
            return Ok(());
        }
        self.begin()?;
        let Some(slot) = self.tasks.get_mut(&partition) else { return Ok(()) };
        let record = Record {
            topic: message.topic().to_owned(),
            partition: partition as u32,
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            timestamp: message.timestamp().to_millis().unwrap_or_else(now_ms),
        };
        let started = Instant::now();
        let out = slot.task.process(&mut slot.state, &record, now_ms());
        slot.records_in.inc();
        slot.processing_seconds.observe(started.elapsed().as_secs_f64());
        let out = out.map_err(|e| task_failure(self.spec.name, partition, e))?;
        self.send_outputs(out)?;
        self.offsets.insert((record.topic, partition), record.offset + 1);
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
            fired.push(slot.task.punctuate(&mut slot.state, now).map_err(|e| task_failure(self.spec.name, *p, e))?);
            wrote |= slot.state.has_pending();
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
        let name = self.spec.name;
        for c in &out.counters {
            if c.name == "dlq" {
                metrics().dlq.with_label_values(&[name, &c.label]).inc();
            }
            metrics().business(name, c.name, &c.label);
        }
        let now = now_ms();
        for at in &out.visible {
            metrics().end_to_end_seconds.with_label_values(&[name]).observe(((now - at).max(0)) as f64 / 1000.0);
        }
        for o in &out.outputs {
            // The record timestamp is when chorus wrote it, not the event time (which
            // travels in the body): brokers apply time-based retention to record
            // timestamps, and replayed history would be deleted as soon as it is written.
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&o.topic).key(o.key.as_slice()).timestamp(now);
            if let Some(value) = &o.value {
                record = record.payload(value.as_slice());
            }
            if let Some(p) = o.partition {
                record = record.partition(p as i32);
            }
            send(&self.producer, record)?;
            self.records_out
                .entry(o.topic.clone())
                .or_insert_with(|| metrics().records_out.with_label_values(&[name, &o.topic]))
                .inc();
        }
        Ok(())
    }

    /// Changelogs + offsets + outputs in one transaction; then apply to RocksDB.
    fn commit<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> Result<()> {
        if !self.txn_open {
            return Ok(());
        }
        let started = Instant::now();
        let name = self.spec.name;
        let mut flushed = Vec::new();
        for (p, slot) in self.tasks.iter_mut() {
            flushed.push(slot.task.flush(&mut slot.state, now_ms()).map_err(|e| task_failure(name, *p, e))?);
        }
        for out in flushed {
            self.send_outputs(out)?;
        }
        for (p, slot) in self.tasks.iter_mut() {
            let writes = slot.state.take_pending();
            for w in &writes {
                let topic = changelog_topic(name, &w.store);
                let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&topic).key(w.key.as_slice()).partition(*p);
                if let Some(v) = &w.value {
                    record = record.payload(v.as_slice());
                }
                send(&self.producer, record)?;
            }
            slot.unapplied.extend(writes);
        }
        let result = self.finish_transaction(consumer);
        if let Err(e) = result {
            metrics().errors.with_label_values(&[name, "commit"]).inc();
            tracing::warn!(processor = name, error = %format!("{e:#}"), "transaction failed; aborting and rewinding");
            self.abort_and_rewind(consumer)?;
            return Ok(());
        }
        let written = std::mem::take(&mut *self.producer.context().written.lock().unwrap_or_else(|p| p.into_inner()));
        for (p, slot) in self.tasks.iter_mut() {
            let checkpoints: BTreeMap<String, i64> = written
                .iter()
                .filter(|((topic, part), _)| part == p && topic.starts_with("chorus-") && topic.ends_with("-changelog"))
                .map(|((topic, _), offset)| (topic.clone(), offset + 1))
                .collect();
            let writes = std::mem::take(&mut slot.unapplied);
            slot.state
                .db()
                .apply(&writes, &checkpoints)
                .with_context(|| format!("{name}[{p}]: cannot apply committed writes"))?;
        }
        self.offsets.clear();
        self.txn_open = false;
        metrics().commit_seconds.with_label_values(&[name]).observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    fn finish_transaction<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> Result<()> {
        self.producer.flush(Duration::from_secs(30)).map_err(|e| anyhow!("flush: {e}"))?;
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
                self.producer
                    .send_offsets_to_transaction(&tpl, &group, Duration::from_secs(30))
                    .map_err(|e| anyhow!("send offsets: {e}"))?;
            }
            self.producer.commit_transaction(Duration::from_secs(60)).map_err(|e| anyhow!("commit: {e}"))?;
            if self.config.embedded_broker && tpl.count() > 0 {
                // The transaction is committed: a failure here (a rebalance changed the
                // generation) must not abort it. The next commit of the partition stores
                // a later offset; until then its new owner could replay from the last
                // stored one (docs/runtime.md).
                if let Err(e) = consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync) {
                    tracing::warn!(processor = self.spec.name, error = %e, "offsets not stored on the embedded broker");
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
            slot.state.discard_pending();
            slot.unapplied.clear();
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
        self.txn_open = false;
        // Reopen tasks so their in-memory stream time matches the rewound input.
        let partitions: BTreeSet<i32> = self.tasks.keys().copied().collect();
        self.close_partitions(&partitions);
        for p in partitions {
            self.open_task(p)?;
        }
        Ok(())
    }

    fn open_task(&mut self, partition: i32) -> Result<()> {
        if self.tasks.contains_key(&partition) {
            return Ok(());
        }
        let name = self.spec.name;
        let stores = self.spec.all_stores();
        let path = self.config.data_dir.join("state").join(name).join(partition.to_string());
        std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let db = TaskDb::open(&path, &stores, &self.config.shared)
            .with_context(|| format!("{name}[{partition}]: cannot open state"))?;
        let started = Instant::now();
        let restored = crate::restore::restore_task(&self.config, name, partition, &stores, &db)?;
        tracing::info!(processor = name, partition, restored, ms = started.elapsed().as_millis() as u64, "task ready");
        let state = TaskState::new(db, &stores);
        self.config.local.register(name, partition as u32, state.db_handle());
        let task = Task::new(&self.spec, &self.config.topology, partition as u32);
        let labels = [name, &partition.to_string()];
        let records_in = metrics().records_in.with_label_values(&labels);
        let processing_seconds = metrics().processing_seconds.with_label_values(&labels);
        self.tasks.insert(partition, TaskSlot { task, state, records_in, processing_seconds, unapplied: Vec::new() });
        Ok(())
    }

    fn close_partitions(&mut self, partitions: &BTreeSet<i32>) {
        for p in partitions {
            if let Some(slot) = self.tasks.remove(p) {
                self.config.local.unregister(self.spec.name, *p as u32);
                if let Err(e) = slot.state.db().flush() {
                    tracing::warn!(processor = self.spec.name, partition = p, error = %e, "flush on close failed");
                }
            }
        }
    }

    fn close_all(&mut self) {
        let all: BTreeSet<i32> = self.tasks.keys().copied().collect();
        self.close_partitions(&all);
    }
}

fn task_failure(name: &str, partition: i32, e: ProcessError) -> anyhow::Error {
    metrics().errors.with_label_values(&[name, "task"]).inc();
    anyhow!("{name}[{partition}]: {e}")
}

/// Send, waiting for room in the producer queue when it is full.
fn send<C: ProducerContext>(
    producer: &BaseProducer<C>,
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
                producer.poll(Duration::from_millis(10));
            }
            Err((e, r)) => return Err(anyhow!("cannot produce to {}: {e}", r.topic)),
        }
    }
}
