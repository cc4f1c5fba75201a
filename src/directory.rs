//! Which instance serves which task, so that any instance answers an interactive query
//! for any customer (Kafka Streams does this with `application.server` in the group
//! metadata; here each instance publishes its address and open tasks on the compacted
//! topic `chorus-instances`, and every instance reads that topic whole).
//!
//! The table is a hint, never the authority: an instance asked for a task checks that
//! the task is open on it right now and answers 503 otherwise, so a stale entry during a
//! rebalance costs a retry, never a wrong answer. A task is open only once its stores
//! are restored (see `engine.rs`), and it is closed before its partition is handed over.

use crate::kafka::{client_config, now_ms};
use crate::query::LocalStores;
use anyhow::{Context as _, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub const INSTANCES_TOPIC: &str = "chorus-instances";

/// How often an instance republishes its entry though nothing changed.
const HEARTBEAT: Duration = Duration::from_secs(3);
/// An entry not refreshed for this long belongs to an instance that is gone.
const STALE_MS: i64 = 15_000;

/// One instance's entry on `chorus-instances`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub instance_id: String,
    /// Base URL of its HTTP API, as other instances reach it.
    pub url: String,
    /// Processor → partitions open (restored and serving) there.
    pub tasks: BTreeMap<String, Vec<u32>>,
    pub at: i64,
    /// The secret other members present to read this one's stores, when the
    /// application has no shared `access.cluster_secret` (then each member makes its
    /// own; only members read this topic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_key: Option<String>,
}

/// Where a task is served.
#[derive(Debug, Clone, PartialEq)]
pub enum Owner {
    Local,
    /// Another member: its URL and the cluster secret it takes.
    Remote {
        url: String,
        key: String,
    },
    /// Nobody serves it right now (a rebalance is moving it, or it is restoring).
    Nobody,
}

#[derive(Clone)]
pub struct Directory {
    instance_id: String,
    /// `chorus-instances` as named on the cluster (with the application id).
    topic: String,
    members: Arc<RwLock<BTreeMap<String, Member>>>,
    local: LocalStores,
    /// The application's shared cluster secret, or this member's own one (published).
    cluster_key: String,
    cluster_key_shared: bool,
}

impl Directory {
    pub fn new(
        instance_id: &str,
        local: LocalStores,
        topology: &chorus_processors::Topology,
        access: &crate::auth::Access,
    ) -> Directory {
        Directory {
            instance_id: instance_id.to_owned(),
            topic: topology.physical_topic(INSTANCES_TOPIC).into_owned(),
            members: Arc::default(),
            local,
            cluster_key: access.cluster_key.clone(),
            cluster_key_shared: access.cluster_key_shared,
        }
    }

    pub fn owner(&self, processor: &str, partition: u32) -> Owner {
        if self.local.has(processor, partition) {
            return Owner::Local;
        }
        let now = now_ms();
        let members = self.members.read().unwrap_or_else(|p| p.into_inner());
        members
            .values()
            .filter(|m| m.instance_id != self.instance_id && now - m.at < STALE_MS)
            .filter(|m| m.tasks.get(processor).is_some_and(|ps| ps.contains(&partition)))
            .max_by_key(|m| m.at)
            .map_or(Owner::Nobody, |m| Owner::Remote {
                url: m.url.clone(),
                key: if self.cluster_key_shared {
                    self.cluster_key.clone()
                } else {
                    m.cluster_key.clone().unwrap_or_default()
                },
            })
    }

    /// Every live member, this one included (for `/v1/instances`).
    pub fn members(&self) -> Vec<Member> {
        let now = now_ms();
        let members = self.members.read().unwrap_or_else(|p| p.into_inner());
        members.values().filter(|m| now - m.at < STALE_MS).cloned().collect()
    }

    fn apply(&self, key: &str, value: Option<&[u8]>) {
        let mut members = self.members.write().unwrap_or_else(|p| p.into_inner());
        match value.and_then(|v| serde_json::from_slice::<Member>(v).ok()) {
            Some(m) => {
                members.insert(key.to_owned(), m);
            }
            None => {
                members.remove(key);
            }
        }
    }

    /// Publish this instance's entry whenever its tasks change (and as a heartbeat),
    /// and follow every instance's entries, until `stop`. On stop the entry is removed.
    pub fn start(&self, brokers: &str, url: String, stop: Arc<AtomicBool>) -> Result<Vec<std::thread::JoinHandle<()>>> {
        let producer: FutureProducer = client_config(brokers)
            .set("message.timeout.ms", "10000")
            .set("linger.ms", "0")
            .create()
            .context("cannot create the instance directory producer")?;
        let consumer: BaseConsumer = client_config(brokers)
            .set("group.id", format!("{}-directory-{}", self.topic, self.instance_id))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "100")
            .create()
            .context("cannot create the instance directory consumer")?;
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&self.topic, 0, Offset::Beginning)
            .context("cannot assign the instance directory")?;
        consumer.assign(&assignment).context("cannot assign the instance directory")?;

        let reader = {
            let directory = self.clone();
            let stop = stop.clone();
            std::thread::Builder::new().name("chorus-directory".into()).spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match consumer.poll(Duration::from_millis(200)) {
                        Some(Ok(m)) => {
                            let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
                            directory.apply(&key, m.payload());
                        }
                        Some(Err(e)) => tracing::debug!(error = %e, "instance directory read"),
                        None => {}
                    }
                }
            })?
        };
        let writer = {
            let directory = self.clone();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            std::thread::Builder::new().name("chorus-directory-publish".into()).spawn(move || {
                runtime.block_on(directory.publish_loop(producer, url, stop));
            })?
        };
        Ok(vec![reader, writer])
    }

    async fn publish_loop(&self, producer: FutureProducer, url: String, stop: Arc<AtomicBool>) {
        let mut last: Option<BTreeMap<String, Vec<u32>>> = None;
        let mut last_sent = std::time::Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let tasks = self.local.tasks();
            if last.as_ref() != Some(&tasks) || last_sent.elapsed() >= HEARTBEAT {
                let member = Member {
                    instance_id: self.instance_id.clone(),
                    url: url.clone(),
                    tasks: tasks.clone(),
                    at: now_ms(),
                    cluster_key: (!self.cluster_key_shared).then(|| self.cluster_key.clone()),
                };
                let payload = serde_json::to_vec(&member).unwrap_or_default();
                let record = FutureRecord::to(&self.topic).key(&self.instance_id).payload(&payload).partition(0);
                match producer.send(record, Duration::from_secs(5)).await {
                    Ok(_) => {
                        self.apply(&self.instance_id, Some(&payload));
                        last = Some(tasks);
                        last_sent = std::time::Instant::now();
                    }
                    Err((e, _)) => tracing::warn!(error = %e, "cannot publish this instance's tasks"),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let record = FutureRecord::<str, [u8]>::to(&self.topic).key(&self.instance_id).partition(0);
        let _ = producer.send(record, Duration::from_secs(5)).await;
    }
}
