//! Kafka plumbing shared by every command: client configuration, reachability checks,
//! and creating the topology's topics (idempotently) with the right cleanup policy.

use anyhow::{anyhow, bail, Context as _, Result};
use chorus_processors::{processor_specs, ProcessorSpec, Topology};
use chorus_state::changelog_topic;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

/// The topology's `kafka:` settings, with environment variables expanded; set once when
/// the topology is loaded, applied to every client.
static SETTINGS: OnceLock<BTreeMap<String, String>> = OnceLock::new();

/// Use the topology's `kafka:` section for every client of this process. Values may
/// name environment variables (`${SASL_PASSWORD}`); a missing one is an error. Only
/// the keys are logged, never the values.
pub fn use_settings(settings: &BTreeMap<String, String>) -> Result<()> {
    let mut expanded = BTreeMap::new();
    for (key, value) in settings {
        expanded.insert(key.clone(), expand_env(value).with_context(|| format!("kafka.{key}"))?);
    }
    if !expanded.is_empty() {
        tracing::info!(keys = ?expanded.keys().collect::<Vec<_>>(), "kafka settings from the topology");
    }
    // A second topology in one process (tests) keeps the first one's settings.
    let _ = SETTINGS.set(expanded);
    Ok(())
}

/// `${VAR}` replaced by the variable's value.
pub fn expand_env(value: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| anyhow!("unterminated ${{ in a value"))?;
        let name = &after[..end];
        let var = std::env::var(name).map_err(|_| anyhow!("environment variable {name} is not set"))?;
        out.push_str(&var);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Settings every client of chorus uses, then the topology's `kafka:` section.
pub fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("socket.connection.setup.timeout.ms", "10000")
        .set("log_level", "3");
    for (key, value) in SETTINGS.get().into_iter().flatten() {
        config.set(key, value);
    }
    config
}

/// A tuning default of chorus's, unless the topology's `kafka:` section sets the key.
pub fn tune(config: &mut ClientConfig, key: &str, value: &str) {
    if config.get(key).is_none() {
        config.set(key, value);
    }
}

/// One topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicToCreate {
    pub name: String,
    pub partitions: u32,
    pub compacted: bool,
}

/// Every topic of the topology, changelogs included.
pub fn all_topics(topology: &Topology) -> Vec<TopicToCreate> {
    let mut topics: Vec<TopicToCreate> = topology
        .topic_specs()
        .into_iter()
        .map(|t| TopicToCreate { name: t.name, partitions: t.partitions, compacted: t.compacted })
        .collect();
    for spec in processor_specs(topology) {
        topics.extend(changelog_topics(&spec, topology));
    }
    topics.push(TopicToCreate { name: crate::directory::INSTANCES_TOPIC.into(), partitions: 1, compacted: true });
    for t in &mut topics {
        t.name = topology.physical_topic(&t.name).into_owned();
    }
    topics
}

/// The compacted changelog of every store of a processor, one partition per task.
pub fn changelog_topics(spec: &ProcessorSpec, topology: &Topology) -> Vec<TopicToCreate> {
    let partitions = spec.inputs.iter().map(|t| topology.partitions_of(t)).max().unwrap_or(1);
    spec.logged_stores()
        .into_iter()
        .map(|store| TopicToCreate { name: changelog_topic(spec.name, store), partitions, compacted: true })
        .collect()
}

/// Fail with one clear line when no broker answers.
pub fn check_reachable(brokers: &str, timeout: Duration) -> Result<()> {
    let consumer: BaseConsumer = client_config(brokers).create().context("cannot create a Kafka client")?;
    consumer.fetch_metadata(None, timeout).map_err(|e| anyhow!("cannot reach Kafka at {brokers}: {e}"))?;
    Ok(())
}

/// Create every topic (existing ones are left as they are; a partition count that
/// differs from the topology is an error, since keys would land elsewhere).
pub async fn create_topics(brokers: &str, topology: &Topology) -> Result<Vec<String>> {
    create_topic_list(brokers, &all_topics(topology), topology).await
}

/// The settings that bound how long a record stays in a topic (README, "Privacy"): a
/// compacted topic cleans a replaced value within `topics.compaction_lag` and drops the
/// tombstone `topics.delete_retention` later; any other topic deletes a record within
/// its retention plus `topics.segment`.
pub fn topic_configs(topology: &Topology, topic: &TopicToCreate) -> Vec<(&'static str, String)> {
    let topics = &topology.topics;
    let ms = |d: chorus_processors::topology::Duration| d.ms().to_string();
    if topic.compacted {
        vec![
            ("cleanup.policy", "compact".to_owned()),
            ("max.compaction.lag.ms", ms(topics.compaction_lag)),
            ("delete.retention.ms", ms(topics.delete_retention)),
        ]
    } else {
        let logical = topology.logical_topic(&topic.name);
        vec![
            ("cleanup.policy", "delete".to_owned()),
            ("retention.ms", ms(topics.retention_of(&logical))),
            ("segment.ms", ms(topics.segment)),
        ]
    }
}

/// Create these topics (existing ones are checked, not changed), each accepting the
/// largest record chorus writes (`limits.max_message_bytes`).
pub async fn create_topic_list(brokers: &str, topics: &[TopicToCreate], topology: &Topology) -> Result<Vec<String>> {
    check_reachable(brokers, Duration::from_secs(10))?;
    let admin: AdminClient<DefaultClientContext> =
        client_config(brokers).create().context("cannot create a Kafka admin client")?;
    let replication = topology.topics.replication_factor;
    let max_message_bytes = topology.limits.max_message_bytes().to_string();
    let configs: Vec<Vec<(&str, String)>> = topics.iter().map(|t| topic_configs(topology, t)).collect();
    let new_topics: Vec<NewTopic> = topics
        .iter()
        .zip(&configs)
        .map(|(t, configs)| {
            let topic = NewTopic::new(&t.name, t.partitions as i32, TopicReplication::Fixed(replication))
                .set("max.message.bytes", &max_message_bytes);
            configs.iter().fold(topic, |topic, (key, value)| topic.set(key, value))
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(new_topics.iter(), &options).await.context("CreateTopics failed")?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("cannot create topic {name}: {code}"),
        }
    }
    // Metadata of just-created topics reaches every broker shortly after CreateTopics
    // returns; wait for it rather than report a topic as missing.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match verify_partitions(brokers, topics) {
            Ok(()) => return Ok(created),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Check that every topic exists with the partition count the topology expects.
pub fn verify_partitions(brokers: &str, topics: &[TopicToCreate]) -> Result<()> {
    let consumer: BaseConsumer = client_config(brokers).create()?;
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| anyhow!("cannot read topic metadata from {brokers}: {e}"))?;
    for t in topics {
        let found = metadata.topics().iter().find(|m| m.name() == t.name);
        match found {
            Some(m) if m.partitions().len() as u32 == t.partitions => {}
            Some(m) => bail!(
                "topic {} has {} partitions but the topology needs {}",
                t.name,
                m.partitions().len(),
                t.partitions
            ),
            None => bail!("topic {} is missing (run `chorus topics create`)", t.name),
        }
    }
    Ok(())
}

/// Whether the brokers are chorus's embedded broker (librdkafka's mock cluster, whose
/// cluster id starts with `mockCluster`). Its TxnOffsetCommit acknowledges offsets
/// without storing them, so the engine also commits them directly there.
pub fn is_embedded_broker(brokers: &str) -> bool {
    let Ok(consumer) = client_config(brokers).create::<BaseConsumer>() else { return false };
    consumer.client().fetch_cluster_id(Duration::from_secs(10)).is_some_and(|id| id.starts_with("mockCluster"))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::tune;
    use rdkafka::ClientConfig;

    /// Producer and consumer tuning from the topology's `kafka:` section wins over
    /// chorus's defaults (`linger.ms: 50` is not reset to 5).
    #[test]
    fn a_setting_of_the_topology_wins_over_a_tuning_default() {
        let mut config = ClientConfig::new();
        config.set("linger.ms", "50");
        tune(&mut config, "linger.ms", "5");
        tune(&mut config, "compression.type", "lz4");
        assert_eq!(config.get("linger.ms"), Some("50"));
        assert_eq!(config.get("compression.type"), Some("lz4"));
    }
}

#[cfg(test)]
mod topic_config_tests {
    use super::{all_topics, topic_configs};
    use chorus_processors::Topology;

    fn configs_of(topology: &Topology, topic: &str) -> Vec<(&'static str, String)> {
        let all = all_topics(topology);
        let topic = all.iter().find(|t| t.name == topic).unwrap_or_else(|| panic!("no topic {topic}"));
        topic_configs(topology, topic)
    }

    /// Every topic says how long a record may stay: compacted ones clean within the
    /// compaction lag, the others delete within retention plus a segment.
    #[test]
    fn every_topic_bounds_how_long_a_record_stays() {
        let topology = Topology::from_yaml_str(
            "application_id: shop\ntopics:\n  retention: 3d\n  retention_per_topic: {events.raw: 2d}\n  segment: 6h\n  \
             compaction_lag: 12h\nprivacy:\n  marker_ttl: 4d\n",
        )
        .unwrap();
        let h = |n: i64| (n * 3_600_000).to_string();
        assert_eq!(
            configs_of(&topology, "events.raw"),
            [("cleanup.policy", "delete".into()), ("retention.ms", h(48)), ("segment.ms", h(6))]
        );
        assert_eq!(configs_of(&topology, "decisions.email")[1], ("retention.ms", h(72)));
        assert_eq!(
            configs_of(&topology, "shop-profile-profiles-changelog"),
            [("cleanup.policy", "compact".into()), ("max.compaction.lag.ms", h(12)), ("delete.retention.ms", h(24))]
        );
        assert_eq!(configs_of(&topology, "profiles")[0], ("cleanup.policy", "compact".into()));
        for topic in all_topics(&topology) {
            let configs = topic_configs(&topology, &topic);
            assert!(
                configs.iter().any(|(k, _)| *k == "retention.ms" || *k == "max.compaction.lag.ms"),
                "{}: {configs:?}",
                topic.name
            );
        }
    }

    #[test]
    fn erasure_markers_must_outlive_events_resolved() {
        let errors = Topology::from_yaml_str("topics:\n  retention: 7d\nprivacy:\n  marker_ttl: 7d\n").unwrap_err();
        assert!(errors.iter().any(|e| e.to_string().contains("privacy.marker_ttl")), "{errors:?}");
    }
}
