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
use crate::kafka::client_config;
use crate::metrics::metrics;
use anyhow::{anyhow, Context as _, Result};
use chorus_state::{changelog_topic, StoreWrite, TaskDb};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const BATCH: usize = 2_000;

/// Changelog records replayed by this process so far.
pub fn restored_total() -> u64 {
    crate::metrics::counter_total(&metrics().restored_records)
}

/// Seconds this process has spent replaying changelogs.
pub fn restore_seconds_total() -> f64 {
    metrics().restore_seconds.get()
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

/// Decide how to restore from a local `checkpoint` given the changelog's log start
/// (`low`) and end (`high`) offsets.
pub fn plan(checkpoint: i64, low: i64, high: i64) -> Plan {
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

/// Replay every store of one task; returns the number of records applied.
pub fn restore_task(
    config: &EngineConfig,
    processor: &str,
    partition: i32,
    stores: &[&str],
    db: &TaskDb,
) -> Result<u64> {
    let consumer: BaseConsumer = client_config(&config.brokers)
        .set("group.id", config.topology.client_name(&format!("restore-{processor}")))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()
        .context("cannot create the restore consumer")?;
    let mut total = 0;
    for store in stores {
        let topic = config.topology.physical_topic(&changelog_topic(processor, store)).into_owned();
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
        let Plan { from, wipe } = plan(checkpoint, low, high);
        if wipe {
            tracing::warn!(%topic, partition, checkpoint, low, high, "local store does not match its changelog (compacted past its checkpoint, or recreated); rebuilding it from the changelog");
            db.clear_store(store)?;
        }
        if from >= high {
            if wipe {
                db.apply(&[], &BTreeMap::from([(topic.clone(), from)]))?;
            }
            continue;
        }
        total += replay(&consumer, db, processor, store, &topic, partition, from, high)?;
    }
    Ok(total)
}

/// Apply `topic[partition]` from `from` up to `end` to the store.
#[allow(clippy::too_many_arguments)]
fn replay(
    consumer: &BaseConsumer,
    db: &TaskDb,
    processor: &str,
    store: &str,
    topic: &str,
    partition: i32,
    from: i64,
    end: i64,
) -> Result<u64> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))?;
    consumer.assign(&tpl).with_context(|| format!("cannot assign {topic}[{partition}]"))?;
    let remaining = metrics().restore_remaining.with_label_values(&[processor, store, &partition.to_string()]);
    remaining.set(end - from);
    let started = Instant::now();
    let mut batch: Vec<StoreWrite> = Vec::new();
    let mut next = from;
    let mut total = 0;
    let mut last_seen = Instant::now();
    let mut last_log = Instant::now();
    loop {
        // Asking for the position costs a call into librdkafka and a partition list: only
        // when no record came (the end is then near, or past trailing markers).
        let mut idle = false;
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                batch.push(StoreWrite {
                    store: store.to_string(),
                    key: m.key().unwrap_or_default().to_vec(),
                    value: m.payload().map(<[u8]>::to_vec),
                });
                next = m.offset() + 1;
                last_seen = Instant::now();
                if batch.len() >= BATCH {
                    total += flush(db, topic, store, processor, &mut batch, next)?;
                    remaining.set((end - next).max(0));
                }
            }
            Some(Err(e)) => return Err(anyhow!("restoring {topic}[{partition}]: {e}")),
            None => idle = true,
        }
        if next >= end {
            break;
        }
        // Transaction markers take offsets but are never delivered: the position, not
        // the last record, tells when the end is reached.
        let position = || {
            consumer
                .position()
                .ok()
                .and_then(|p| p.find_partition(topic, partition).and_then(|e| e.offset().to_raw()))
                .unwrap_or(next)
        };
        if idle && position() >= end {
            break;
        }
        if last_log.elapsed() >= PROGRESS_EVERY {
            tracing::info!(%topic, partition, at = next.max(position()), end, restored = total + batch.len() as u64, "restoring");
            last_log = Instant::now();
        }
        if last_seen.elapsed() > STALL_LIMIT {
            return Err(anyhow!(
                "restoring {topic}[{partition}] stalled at offset {} of {end}: nothing received for {STALL_LIMIT:?}",
                next.max(position())
            ));
        }
    }
    // Checkpoint at the end offset: markers past the last record are consumed too.
    total += flush(db, topic, store, processor, &mut batch, next.max(end))?;
    remaining.set(0);
    consumer.unassign().ok();
    let secs = started.elapsed().as_secs_f64();
    metrics().restore_seconds.inc_by(secs);
    tracing::info!(%topic, partition, records = total, secs, per_second = (total as f64 / secs.max(1e-9)) as u64, "restored");
    Ok(total)
}

fn flush(
    db: &TaskDb,
    topic: &str,
    store: &str,
    processor: &str,
    batch: &mut Vec<StoreWrite>,
    next: i64,
) -> Result<u64> {
    let n = batch.len() as u64;
    db.apply(batch, &BTreeMap::from([(topic.to_owned(), next)]))?;
    batch.clear();
    metrics().restored_records.with_label_values(&[processor, store]).inc_by(n);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_inside_the_log_resumes_there() {
        assert_eq!(plan(40, 10, 100), Plan { from: 40, wipe: false });
        assert_eq!(plan(100, 10, 100), Plan { from: 100, wipe: false });
        assert_eq!(plan(0, 0, 100), Plan { from: 0, wipe: false });
    }

    #[test]
    fn a_checkpoint_before_the_log_start_rebuilds_the_store() {
        // Compaction removed offsets 5..10, tombstones possibly among them.
        assert_eq!(plan(5, 10, 100), Plan { from: 10, wipe: true });
        // A new store: nothing to wipe, but it starts at the log start.
        assert_eq!(plan(0, 10, 100), Plan { from: 10, wipe: true });
    }

    #[test]
    fn a_checkpoint_past_the_end_rebuilds_the_store() {
        assert_eq!(plan(500, 0, 100), Plan { from: 0, wipe: true });
    }
}
