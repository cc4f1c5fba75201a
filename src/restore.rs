//! Restoring a task's stores from their changelogs when the task is opened: on start,
//! and when a rebalance hands this instance a partition. Replay starts at the local
//! checkpoint, so a clean restart replays nothing and a crash replays only the tail;
//! a new owner without local state replays the whole (compacted) changelog.

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
/// Give up waiting for more records this long after the last one (an open transaction
/// of another producer can hold the last stable offset below the high watermark).
const IDLE_LIMIT: Duration = Duration::from_secs(2);

/// Replay every store of one task; returns the number of records applied.
pub fn restore_task(
    config: &EngineConfig,
    processor: &str,
    partition: i32,
    stores: &[&str],
    db: &TaskDb,
) -> Result<u64> {
    let consumer: BaseConsumer = client_config(&config.brokers)
        .set("group.id", format!("chorus-restore-{processor}"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()
        .context("cannot create the restore consumer")?;
    let mut total = 0;
    for store in stores {
        let topic = changelog_topic(processor, store);
        if config.fresh_broker {
            // The embedded broker starts empty: local RocksDB is the whole state and
            // the new changelog starts at offset 0.
            db.apply(&[], &BTreeMap::from([(topic.clone(), 0)]))?;
            continue;
        }
        let (low, high) = consumer
            .fetch_watermarks(&topic, partition, Duration::from_secs(10))
            .map_err(|e| anyhow!("cannot read the end of {topic}[{partition}]: {e}"))?;
        let mut from = db.checkpoint(&topic)?;
        if from > high {
            tracing::warn!(%topic, partition, checkpoint = from, high, "changelog is behind the local checkpoint (recreated?); rebuilding the store from it");
            db.clear_store(store)?;
            from = 0;
        }
        let from = from.max(low);
        if from >= high {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition, Offset::Offset(from))?;
        consumer.assign(&tpl).with_context(|| format!("cannot assign {topic}[{partition}]"))?;
        let mut batch: Vec<StoreWrite> = Vec::new();
        let mut next = from;
        let mut last_seen = Instant::now();
        loop {
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
                        total += flush(db, &topic, store, processor, &mut batch, next)?;
                    }
                }
                Some(Err(e)) => return Err(anyhow!("restoring {topic}[{partition}]: {e}")),
                None => {}
            }
            let position = consumer
                .position()
                .ok()
                .and_then(|p| p.find_partition(&topic, partition).and_then(|e| e.offset().to_raw()))
                .unwrap_or(next);
            if next >= high || position >= high {
                break;
            }
            if last_seen.elapsed() > IDLE_LIMIT {
                tracing::warn!(%topic, partition, position, high, "restore stopped before the end of the changelog: no records for {IDLE_LIMIT:?} (an open transaction of another producer?)");
                break;
            }
        }
        total += flush(db, &topic, store, processor, &mut batch, next)?;
        consumer.unassign().ok();
    }
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
