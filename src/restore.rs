//! Restoring a task's stores from their changelogs when the task is opened: on start,
//! and when a rebalance hands this instance a partition. Replay starts at the local
//! checkpoint, so a clean restart replays nothing and a crash replays only the tail;
//! a new owner without local state replays the whole (compacted) changelog.
//!
//! A restore always reaches the end offset it read when it started — the last stable
//! offset, since the restore consumer reads `read_committed` — however slowly the
//! broker serves it: a task never starts on partial state. A local store whose
//! checkpoint lies before the changelog's log start offset is not trusted (compaction
//! may have removed tombstones it never saw): it is wiped and restored whole.

use crate::engine::EngineConfig;
use crate::kafka::{client_config, now_ms};
use crate::metrics::metrics;
use anyhow::{anyhow, Context as _, Result};
use chorus_processors::processor::{expiry_index_key, EXPIRY_STORE};
use chorus_processors::store::expiry_of;
use chorus_processors::task::is_logged;
use chorus_state::{changelog_topic, StoreWrite, TaskDb};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

const BATCH: usize = 2_000;

/// Changelog records replayed by this process so far, by `processor/store`.
pub fn restored_by_store() -> BTreeMap<String, u64> {
    crate::metrics::counter_series(&metrics().restored_records)
}

/// Bytes of the changelog records replayed by this process so far.
pub fn restored_bytes() -> u64 {
    crate::metrics::counter_series(&metrics().restored_bytes).values().sum()
}

/// A restore that has received nothing for this long while short of its end offset
/// fails the task (which the runtime reports), rather than serve partial state.
const STALL_LIMIT: Duration = Duration::from_secs(300);
/// How often a long restore logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where replay of one changelog partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Replay from this offset.
    pub from: i64,
    /// Empty the local store first.
    pub wipe: bool,
}

/// Whether a checkpoint written at `written_at` is too old to resume from: compaction
/// keeps a tombstone at least `topics.delete_retention` after it was written, so a store
/// checkpointed within that horizon (less a margin for clocks) has seen every tombstone
/// it could miss.
pub fn is_stale(written_at: Option<i64>, topology: &chorus_processors::Topology, now: i64) -> bool {
    let retention = topology.topics.delete_retention.ms();
    let horizon = retention - (retention / 10).min(3_600_000);
    written_at.is_some_and(|at| now.saturating_sub(at) >= horizon)
}

/// Decide how to restore from a local `checkpoint` given the changelog's log start
/// (`low`) and end (`high`) offsets.
pub fn plan(checkpoint: i64, low: i64, high: i64, stale: bool) -> Plan {
    if stale && checkpoint > 0 {
        // Older than the changelog's tombstones are kept: an erased customer's
        // tombstone may be gone, and resuming would keep their value.
        return Plan { from: low, wipe: true };
    }
    if checkpoint > high {
        // The changelog is behind the store (recreated): rebuild from it.
        return Plan { from: low, wipe: true };
    }
    if checkpoint < low {
        // Records between the checkpoint and the log start are gone, tombstones among
        // them: what the store holds may be deleted state. Rebuild it whole.
        return Plan { from: low, wipe: checkpoint > 0 || low > 0 };
    }
    Plan { from: checkpoint, wipe: false }
}

/// The stores of one member of one task, to be restored.
pub struct Target<'a> {
    pub processor: &'a str,
    pub partition: i32,
    pub stores: &'a [&'a str],
    pub db: &'a TaskDb,
}

/// One changelog partition being replayed into its store.
struct Replay<'a> {
    target: &'a Target<'a>,
    store: &'a str,
    topic: String,
    /// Next offset expected; the replay is done when it reaches `end`.
    next: i64,
    end: i64,
    batch: Vec<StoreWrite>,
    /// Expiry of the latest value of each key written in `batch` that has one.
    expiring: std::collections::HashMap<Vec<u8>, i64>,
    /// Changelog records in `batch` (it also holds the expiry index entries they imply),
    /// and their bytes.
    batched: u64,
    batched_bytes: u64,
    total: u64,
    done: bool,
    remaining: prometheus::IntGauge,
}

impl Replay<'_> {
    /// Add one changelog record to the batch, with the expiry index entry its value's
    /// header implies (the index has no changelog of its own).
    fn push(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        if value.is_none() {
            // A tombstone: the index entry of the value it deletes (in this batch, or
            // already in the store) goes too, or it would keep the key until it is due
            // (an erased subject's key, say).
            let replaced = match self.expiring.get(key) {
                Some(at) => Some(*at),
                None => self.target.db.get(self.store, key)?.as_deref().and_then(expiry_of),
            };
            if let Some(at) = replaced.filter(|at| *at > 0) {
                let index_key = expiry_index_key(at, self.store, key);
                self.batch.push(StoreWrite { store: EXPIRY_STORE.to_owned(), key: index_key, value: None });
            }
        }
        match value.and_then(expiry_of).filter(|at| *at > 0) {
            Some(at) => {
                let index_key = expiry_index_key(at, self.store, key);
                self.batch.push(StoreWrite { store: EXPIRY_STORE.to_owned(), key: index_key, value: Some(Vec::new()) });
                self.expiring.insert(key.to_vec(), at);
            }
            None => {
                self.expiring.remove(key);
            }
        }
        self.batch.push(StoreWrite {
            store: self.store.to_owned(),
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
        });
        self.batched += 1;
        self.batched_bytes += (key.len() + value.map_or(0, <[u8]>::len)) as u64;
        Ok(())
    }

    /// Write the batch with the checkpoint `next`.
    fn flush(&mut self) -> Result<()> {
        let n = std::mem::take(&mut self.batched);
        let bytes = std::mem::take(&mut self.batched_bytes);
        self.target.db.apply(&self.batch, &BTreeMap::from([(self.topic.clone(), self.next)]))?;
        self.batch.clear();
        self.expiring.clear();
        self.total += n;
        metrics().restored_records.with_label_values(&[self.target.processor, self.store]).inc_by(n);
        metrics().restored_bytes.with_label_values(&[self.target.processor, self.store]).inc_by(bytes);
        self.remaining.set((self.end - self.next).max(0));
        Ok(())
    }

    /// The end is reached: checkpoint at the end offset (transaction markers past the
    /// last record count too).
    fn finish(&mut self) -> Result<()> {
        self.next = self.next.max(self.end);
        self.flush()?;
        self.done = true;
        Ok(())
    }
}

/// Replay every store of `targets` (the members of one or more tasks of one
/// sub-topology) with one consumer: every changelog partition is fetched at once, as
/// Kafka Streams' restore consumer does, rather than one store after the other.
/// Returns the number of records applied.
pub fn restore(config: &EngineConfig, sub_topology: &str, targets: &[Target<'_>]) -> Result<u64> {
    let consumer: BaseConsumer = client_config(&config.brokers)
        .set("group.id", config.topology.client_name(&format!("restore-{sub_topology}")))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()
        .context("cannot create the restore consumer")?;
    let mut replays: Vec<Replay<'_>> = Vec::new();
    for target in targets {
        let (db, partition) = (target.db, target.partition);
        for store in target.stores.iter().filter(|s| is_logged(s)) {
            let topic = config.topology.physical_topic(&changelog_topic(target.processor, store)).into_owned();
            if config.fresh_broker {
                // The embedded broker starts empty: local RocksDB is the whole state and
                // the new changelog starts at offset 0.
                db.apply(&[], &BTreeMap::from([(topic.clone(), 0)]))?;
                continue;
            }
            // Under read_committed the end offset is the last stable offset.
            let (low, high) = consumer
                .fetch_watermarks(&topic, partition, Duration::from_secs(10))
                .map_err(|e| anyhow!("cannot read the end of {topic}[{partition}]: {e}"))?;
            let checkpoint = db.checkpoint(&topic)?;
            let stale = is_stale(db.checkpoint_written_at()?, &config.topology, now_ms());
            let Plan { from, wipe } = plan(checkpoint, low, high, stale);
            if wipe && stale {
                tracing::warn!(%topic, partition, checkpoint, "local store is older than its changelog keeps tombstones (topics.delete_retention); rebuilding it from the changelog");
            } else if wipe {
                tracing::warn!(%topic, partition, checkpoint, low, high, "local store does not match its changelog (compacted past its checkpoint, or recreated); rebuilding it from the changelog");
                db.clear_store(store)?;
            }
            if from >= high {
                if wipe {
                    db.apply(&[], &BTreeMap::from([(topic.clone(), from)]))?;
                }
                continue;
            }
            let remaining =
                metrics().restore_remaining.with_label_values(&[target.processor, store, &partition.to_string()]);
            remaining.set(high - from);
            replays.push(Replay {
                target,
                store,
                topic,
                next: from,
                end: high,
                batch: Vec::new(),
                expiring: std::collections::HashMap::new(),
                batched: 0,
                batched_bytes: 0,
                total: 0,
                done: false,
                remaining,
            });
        }
    }
    if replays.is_empty() {
        return Ok(0);
    }
    let mut tpl = TopicPartitionList::new();
    for r in &replays {
        tpl.add_partition_offset(&r.topic, r.target.partition, Offset::Offset(r.next))?;
    }
    consumer.assign(&tpl).context("cannot assign the changelogs to restore")?;
    let started = Instant::now();
    replay(&consumer, &mut replays)?;
    consumer.unassign().ok();
    let secs = started.elapsed().as_secs_f64();
    metrics().restore_seconds.inc_by(secs);
    let total: u64 = replays.iter().map(|r| r.total).sum();
    window().record(started, Instant::now());
    tracing::info!(
        sub_topology,
        changelogs = replays.len(),
        records = total,
        secs,
        per_second = (total as f64 / secs.max(1e-9)) as u64,
        "restored"
    );
    Ok(total)
}

/// Poll until every replay reaches its end offset.
fn replay(consumer: &BaseConsumer, replays: &mut [Replay<'_>]) -> Result<()> {
    let mut index: HashMap<String, HashMap<i32, usize>> = HashMap::new();
    for (i, r) in replays.iter().enumerate() {
        index.entry(r.topic.clone()).or_default().insert(r.target.partition, i);
    }
    let mut open = replays.len();
    let mut last_seen = Instant::now();
    let mut last_log = Instant::now();
    while open > 0 {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last_seen = Instant::now();
                let Some(&i) = index.get(m.topic()).and_then(|p| p.get(&m.partition())) else { continue };
                let r = &mut replays[i];
                if r.done {
                    continue;
                }
                if m.offset() >= r.end {
                    // Past the end offset read when the restore began: not part of it.
                    r.finish()?;
                    open -= 1;
                    continue;
                }
                r.push(m.key().unwrap_or_default(), m.payload())?;
                r.next = m.offset() + 1;
                if r.next >= r.end {
                    r.finish()?;
                    open -= 1;
                } else if r.batch.len() >= BATCH {
                    r.flush()?;
                }
            }
            Some(Err(e)) => return Err(anyhow!("restoring: {e}")),
            None => {
                // Transaction markers take offsets but are never delivered: the
                // position, not the last record, tells when the end is reached. Asked
                // only when no record came, as it costs a partition list.
                let positions = consumer.position().map_err(|e| anyhow!("restore position: {e}"))?;
                for r in replays.iter_mut().filter(|r| !r.done) {
                    let at = positions
                        .find_partition(&r.topic, r.target.partition)
                        .and_then(|e| e.offset().to_raw())
                        .unwrap_or(r.next);
                    if at >= r.end {
                        r.finish()?;
                        open -= 1;
                    }
                }
            }
        }
        if last_log.elapsed() >= PROGRESS_EVERY {
            let left: i64 = replays.iter().filter(|r| !r.done).map(|r| r.end - r.next).sum();
            let restored: u64 = replays.iter().map(|r| r.total + r.batch.len() as u64).sum();
            tracing::info!(changelogs_left = open, records_left = left, restored, "restoring");
            last_log = Instant::now();
        }
        if open > 0 && last_seen.elapsed() > STALL_LIMIT {
            let r = replays
                .iter()
                .find(|r| !r.done)
                .map(|r| format!("{}[{}] at offset {} of {}", r.topic, r.target.partition, r.next, r.end));
            return Err(anyhow!("restoring {} stalled: nothing received for {STALL_LIMIT:?}", r.unwrap_or_default()));
        }
    }
    Ok(())
}

/// The span from the first replay's start to the last one's end in this process, over
/// which the restore rate is measured (first record to last, like every other rate).
#[derive(Default)]
pub struct Window(std::sync::Mutex<Option<(Instant, Instant)>>);

impl Window {
    fn record(&self, from: Instant, to: Instant) {
        let mut span = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *span = Some(match *span {
            Some((a, b)) => (a.min(from), b.max(to)),
            None => (from, to),
        });
    }

    /// Seconds between the first replay's start and the last one's end; resets.
    pub fn take(&self) -> Option<f64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take().map(|(a, b)| (b - a).as_secs_f64())
    }
}

pub fn window() -> &'static Window {
    static WINDOW: std::sync::OnceLock<Window> = std::sync::OnceLock::new();
    WINDOW.get_or_init(Window::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_inside_the_log_resumes_there() {
        assert_eq!(plan(40, 10, 100, false), Plan { from: 40, wipe: false });
        assert_eq!(plan(100, 10, 100, false), Plan { from: 100, wipe: false });
        assert_eq!(plan(0, 0, 100, false), Plan { from: 0, wipe: false });
    }

    #[test]
    fn a_checkpoint_before_the_log_start_rebuilds_the_store() {
        // Compaction removed offsets 5..10, tombstones possibly among them.
        assert_eq!(plan(5, 10, 100, false), Plan { from: 10, wipe: true });
        // A new store: nothing to wipe, but it starts at the log start.
        assert_eq!(plan(0, 10, 100, false), Plan { from: 10, wipe: true });
    }

    #[test]
    fn a_checkpoint_past_the_end_rebuilds_the_store() {
        assert_eq!(plan(500, 0, 100, false), Plan { from: 0, wipe: true });
    }

    /// A member away longer than the changelog keeps tombstones rebuilds its stores: an
    /// erasure's tombstone may have been compacted away meanwhile.
    #[test]
    fn a_checkpoint_older_than_the_tombstones_rebuilds_the_store() {
        assert_eq!(plan(40, 10, 100, true), Plan { from: 10, wipe: true });
        assert_eq!(plan(0, 0, 100, true), Plan { from: 0, wipe: false }, "a new store has nothing to wipe");
        let topology = chorus_processors::Topology::default();
        let day = 86_400_000;
        let now = 100 * day;
        assert!(!is_stale(None, &topology, now));
        assert!(!is_stale(Some(now - day + 2 * 3_600_000), &topology, now));
        assert!(is_stale(Some(now - day + 3_600_000), &topology, now), "within the one-hour margin");
        assert!(is_stale(Some(now - 2 * day), &topology, now));
    }

    #[test]
    fn replay_rebuilds_the_expiry_index_from_the_values() {
        use chorus_processors::store::encode_value;
        let dir = tempfile::tempdir().unwrap();
        let shared = chorus_state::SharedResources::new(8 << 20, 8 << 20, chorus_state::Durability::Local);
        let db = TaskDb::open(dir.path(), &["dedupe", EXPIRY_STORE], &shared).unwrap();
        let target = Target { processor: "identity", partition: 0, stores: &["dedupe", EXPIRY_STORE], db: &db };
        let mut replay = Replay {
            target: &target,
            store: "dedupe",
            topic: "chorus-identity-dedupe-changelog".into(),
            next: 3,
            end: 3,
            batch: Vec::new(),
            expiring: Default::default(),
            batched: 0,
            batched_bytes: 0,
            total: 0,
            done: false,
            remaining: metrics().restore_remaining.with_label_values(&["identity", "dedupe", "0"]),
        };
        replay.push(b"e1", Some(&encode_value(5_000, b""))).unwrap();
        replay.push(b"e2", Some(&encode_value(0, b""))).unwrap();
        replay.push(b"e3", None).unwrap();
        // Deleted later in the same batch, and in a later batch: no index entry stays.
        replay.push(b"e4", Some(&encode_value(6_000, b""))).unwrap();
        replay.push(b"e4", None).unwrap();
        replay.push(b"e5", Some(&encode_value(7_000, b""))).unwrap();
        replay.flush().unwrap();
        replay.push(b"e5", None).unwrap();
        replay.finish().unwrap();
        assert_eq!(replay.total, 7, "index entries are not changelog records");
        let index = db.range(EXPIRY_STORE, &[0u8; 8], &[0xff; 8], 10).unwrap();
        let keys: Vec<Vec<u8>> = index.into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![expiry_index_key(5_000, "dedupe", b"e1")]);
        assert_eq!(db.get("dedupe", b"e2").unwrap(), Some(encode_value(0, b"")));
        assert_eq!(db.checkpoint("chorus-identity-dedupe-changelog").unwrap(), 3);
        let written = db.checkpoint_written_at().unwrap().expect("the checkpoint says when it was written");
        assert!((now_ms() - written).abs() < 60_000, "{written}");
    }

    #[test]
    fn the_expiry_index_has_no_changelog() {
        assert!(!is_logged(EXPIRY_STORE));
        assert!(is_logged("dedupe") && is_logged(chorus_processors::processor::TIMERS_STORE));
    }
}
