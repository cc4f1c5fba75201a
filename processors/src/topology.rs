//! `topology.yaml` as typed data: topics and partitions, time, delivery, identity,
//! event catalogue, context TTLs, consent and orchestration defaults, state limits.
//! Parsed once with every error reported with its YAML path, then trusted. Defaults
//! live here and only here; the shipped `topology.yaml` spells them out.

pub use crate::identity::config::IdentityConfig;
pub use crate::orchestrator::config::{
    CapLimits, CategoryConfig, FrequencyCaps, OrchestrationConfig, QuietHours, Suppression, DEFAULT_CHANNELS,
};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// YAML path such as `context.session_timeout`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() || self.path == "." {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

pub(crate) fn config_error(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    err(path, message)
}

fn err(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { path: path.into(), message: message.into() }
}

/// Where "now" comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Clock {
    #[default]
    Wall,
    Event,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Processing {
    #[default]
    ExactlyOnce,
    AtLeastOnce,
}

/// A duration written as `100ms`, `30s`, `30m`, `24h` or `7d`; held in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub i64);

impl Duration {
    pub const fn seconds(s: i64) -> Self {
        Duration(s * 1_000)
    }
    pub const fn minutes(m: i64) -> Self {
        Duration(m * 60_000)
    }
    pub const fn hours(h: i64) -> Self {
        Duration(h * 3_600_000)
    }
    pub const fn days(d: i64) -> Self {
        Duration(d * 86_400_000)
    }
    pub fn ms(self) -> i64 {
        self.0
    }

    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let n: i64 = digits.parse().map_err(|_| format!("expected a duration such as 30m, 24h or 7d, got {text:?}"))?;
        let factor = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            _ => return Err(format!("unknown duration unit {unit:?} in {text:?} (use ms, s, m, h, d or w)")),
        };
        n.checked_mul(factor).map(Duration).ok_or_else(|| format!("duration {text:?} is too large"))
    }
}

/// Written back in the largest unit that divides it (`7d`, `90m`, `1500ms`).
impl serde::Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ms = self.0;
        let text = [("w", 7 * 86_400_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)]
            .into_iter()
            .find(|(_, unit)| ms != 0 && ms % unit == 0)
            .map_or_else(|| format!("{ms}ms"), |(name, unit)| format!("{}{name}", ms / unit));
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Duration::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topology {
    /// Prefixes consumer groups, transactional ids and internal topics (changelogs, the
    /// identity repartition topic, the instance directory), as Kafka Streams'
    /// `application.id`: two deployments with different ids share one cluster.
    pub application_id: String,
    /// librdkafka settings for every Kafka client (`security.protocol`, `sasl.*`,
    /// `ssl.*`, tuning); `${VAR}` in a value is read from the environment.
    pub kafka: BTreeMap<String, String>,
    pub clock: Clock,
    pub processing: Processing,
    /// How often a task commits its transaction (Kafka Streams' commit.interval.ms).
    pub commit_interval: Duration,
    /// A task also commits as soon as its oldest uncommitted record has waited this
    /// long, so a record's effects are not held back a whole interval.
    pub commit_latency_budget: Duration,
    /// Threads per sub-topology in each process (Kafka Streams' `num.stream.threads`):
    /// each is a member of the sub-topology's consumer group with its own transactional
    /// producer, so one thread processes while another waits for its commit.
    pub stream_threads: u32,
    pub topics: TopicsConfig,
    pub limits: Limits,
    pub dedupe: DedupeConfig,
    pub identity: IdentityConfig,
    pub event_types: Vec<String>,
    pub context: ContextConfig,
    pub consent: ConsentConfig,
    pub orchestration: OrchestrationConfig,
    /// Named rule expressions over the customer; membership changes go to `segments`.
    pub segments: Vec<crate::segments::SegmentRule>,
    /// How events update the Customer 360 profile; churn model.
    pub profile: crate::profile::config::ProfileConfig,
    /// Rules, next best action, content variants, recommendations.
    pub personalisation: crate::personalisation::PersonalisationConfig,
    /// Multi-step journeys (the seed's cart abandonment by default).
    pub journeys: Vec<crate::journeys::config::JourneyConfig>,
    /// Channel-agnostic content items and per-channel limits.
    pub content: crate::content::ContentConfig,
    /// Campaigns (more arrive on the `campaigns` topic at run time).
    pub campaigns: Vec<crate::campaigns::config::CampaignConfig>,
    pub state: StateConfig,
    /// Data subject rights: the key hashing erased identifiers, how long erasure
    /// markers and exports are kept, when a request fails.
    pub privacy: crate::privacy::PrivacyConfig,
    /// Write keys per source, secret API keys with scopes, visitor tokens, the
    /// cluster secret (README, "Access control").
    pub access: crate::access::AccessConfig,
    /// Segment-compatible intake: track event names → event types.
    pub segment: crate::tracking::SegmentConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    pub default_partitions: u32,
    pub replication_factor: i32,
    /// Per-topic partition counts overriding `default_partitions`.
    pub partitions: BTreeMap<String, u32>,
    /// How long a record of a topic that is not compacted (`events.raw`,
    /// `events.resolved`, `decisions.*`, ...) is kept: what bounds how long an erased
    /// subject's records stay in it (with `segment`).
    pub retention: Duration,
    /// Per-topic overrides of `retention`.
    pub retention_per_topic: BTreeMap<String, Duration>,
    /// Segments of topics that are not compacted roll this often; retention deletes whole
    /// segments, so a record leaves within `retention` + `segment`.
    pub segment: Duration,
    /// A compacted topic's overwritten values (an erased subject's, under a tombstone)
    /// are cleaned within this (Kafka's `max.compaction.lag.ms`; it also rolls the
    /// active segment).
    pub compaction_lag: Duration,
    /// How long a tombstone itself stays after cleaning (`delete.retention.ms`).
    pub delete_retention: Duration,
}

impl TopicsConfig {
    pub fn retention_of(&self, topic: &str) -> Duration {
        self.retention_per_topic.get(topic).copied().unwrap_or(self.retention)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted input record; larger ones go to `events.dlq` as `oversized`.
    pub max_record_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupeConfig {
    /// Events repeating an `event_id` within this window are processed once.
    pub window: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    pub session_timeout: Duration,
    pub cart_ttl: Duration,
    /// An offer presented to the customer stays open this long unless redeemed or
    /// dismissed (or until its own `expires_at`).
    pub offer_ttl: Duration,
    pub recent_interactions: RecentConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecentConfig {
    pub ttl: Duration,
    pub max: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsentConfig {
    pub purposes: Vec<String>,
    /// Consent a customer has before any consent record; marketing purposes are opt-in.
    pub defaults: BTreeMap<String, bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Block cache shared by every RocksDB store of the process.
    pub block_cache_mb: usize,
    /// Total memtable memory of every RocksDB store of the process.
    pub write_buffer_mb: usize,
    /// Decoded values each processor keeps between commits in each task (partition),
    /// measured by the heap they take. `task_cache_mb`, its name before, was a budget
    /// per task divided among its processors.
    #[serde(alias = "task_cache_mb")]
    pub processor_cache_mb: usize,
}

impl StateConfig {
    /// The decoded-value cache of one processor in one task.
    pub fn processor_cache_bytes(&self) -> usize {
        self.processor_cache_mb << 20
    }
}

/// The `application_id` of a topology that names none; internal topic names are
/// spelled with it inside the processors and renamed at the Kafka boundary.
pub const DEFAULT_APPLICATION_ID: &str = "chorus";

pub const DEFAULT_EVENT_TYPES: &[&str] = &[
    "identify",
    "alias",
    "group",
    "track",
    "page.viewed",
    "screen.viewed",
    "app.opened",
    "content.viewed",
    "product.viewed",
    "cart.item_added",
    "cart.item_removed",
    "cart.viewed",
    "checkout.started",
    "order.completed",
    "order.returned",
    "email.opened",
    "email.clicked",
    "push.opened",
    "sms.clicked",
    "support.case_opened",
    "support.case_closed",
    "complaint.filed",
    "chat.message",
    "call.completed",
    "offer.presented",
    "offer.redeemed",
    "offer.dismissed",
    "system.tick",
];

impl Default for Topology {
    fn default() -> Self {
        Topology {
            application_id: DEFAULT_APPLICATION_ID.to_owned(),
            kafka: BTreeMap::new(),
            clock: Clock::Wall,
            processing: Processing::ExactlyOnce,
            commit_interval: Duration(100),
            commit_latency_budget: Duration(20),
            stream_threads: 1,
            topics: TopicsConfig::default(),
            limits: Limits::default(),
            dedupe: DedupeConfig::default(),
            identity: IdentityConfig::default(),
            event_types: DEFAULT_EVENT_TYPES.iter().map(|s| s.to_string()).collect(),
            context: ContextConfig::default(),
            consent: ConsentConfig::default(),
            orchestration: OrchestrationConfig::default(),
            journeys: crate::journeys::config::default_journeys(),
            content: crate::content::ContentConfig::default(),
            campaigns: Vec::new(),
            segments: crate::segments::default_rules(),
            profile: Default::default(),
            personalisation: Default::default(),
            state: StateConfig::default(),
            privacy: Default::default(),
            access: Default::default(),
            segment: Default::default(),
        }
    }
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            default_partitions: 8,
            replication_factor: 1,
            partitions: BTreeMap::new(),
            retention: Duration::days(7),
            retention_per_topic: BTreeMap::new(),
            segment: Duration::days(1),
            compaction_lag: Duration::days(1),
            delete_retention: Duration::days(1),
        }
    }
}

impl Limits {
    /// The largest record chorus writes, and so the producers' `message.max.bytes` and
    /// the topics' `max.message.bytes`: an input of `max_record_bytes` wrapped in an
    /// `events.resolved` record, with room to spare. Dead letters stay far below it.
    pub fn max_message_bytes(&self) -> usize {
        self.max_record_bytes.saturating_mul(2).saturating_add(64 * 1024)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_record_bytes: 1 << 20 }
    }
}

impl Default for DedupeConfig {
    fn default() -> Self {
        DedupeConfig { window: Duration::hours(24) }
    }
}

impl Default for ContextConfig {
    fn default() -> Self {
        ContextConfig {
            session_timeout: Duration::minutes(30),
            cart_ttl: Duration::days(7),
            offer_ttl: Duration::days(7),
            recent_interactions: RecentConfig::default(),
        }
    }
}

impl Default for RecentConfig {
    fn default() -> Self {
        RecentConfig { ttl: Duration::days(30), max: 50 }
    }
}

impl Default for ConsentConfig {
    fn default() -> Self {
        let purposes: Vec<String> =
            ["marketing_email", "marketing_sms", "marketing_push", "personalisation", "analytics"]
                .map(String::from)
                .to_vec();
        let defaults = purposes.iter().map(|p| (p.clone(), p == "analytics" || p == "personalisation")).collect();
        ConsentConfig { purposes, defaults }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig { block_cache_mb: 64, write_buffer_mb: 64, processor_cache_mb: 16 }
    }
}

/// Input topics of the pipeline.
pub const EVENTS_RAW: &str = "events.raw";
pub const MESSAGES_REQUESTS: &str = "messages.requests";
pub const CONSENT: &str = "consent";
pub const EVENTS_RESOLVED: &str = "events.resolved";
/// Precomputed recommendations per canonical id (compacted input of the profile stage).
pub const RECOMMENDATIONS: &str = "recommendations";
/// Context snapshots per canonical id (compacted output of the context stage, read by
/// the journeys stage).
pub const CONTEXT: &str = "context";
/// Customer 360 snapshots per canonical id (compacted output of the profile stage, read
/// by the orchestrator for personalised content).
pub const PROFILES: &str = "profiles";
/// Segment entries and exits per canonical id (output of the profile stage, read by the
/// campaigns stage).
pub const SEGMENTS: &str = "segments";
/// Content items per content id (compacted input of the catalog stage).
pub const CONTENT: &str = "content";
/// Campaigns per campaign id (compacted input of the catalog stage).
pub const CAMPAIGNS: &str = "campaigns";
/// The identity stage's internal topic: link, join and merge messages between the
/// owners of identifiers and of customers. Always as many partitions as `events.raw`.
pub const IDENTITY_REPARTITION: &str = "chorus-identity-repartition";

/// One topic the topology needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: u32,
    pub compacted: bool,
}

impl Topology {
    /// Parse and validate; every problem is reported, each with its YAML path.
    pub fn from_yaml_str(text: &str) -> Result<Topology, Vec<ConfigError>> {
        let de = serde_yaml::Deserializer::from_str(text);
        let topology: Topology = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            // serde_yaml appends " at line L column C"; keep it, it helps.
            vec![err(path, message)]
        })?;
        let errors = topology.validate();
        if errors.is_empty() {
            Ok(topology)
        } else {
            Err(errors)
        }
    }

    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        if self.commit_interval.ms() <= 0 {
            errors.push(err("commit_interval", "must be positive"));
        }
        let id = &self.application_id;
        if id.is_empty()
            || id.len() > 100
            || !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            errors.push(err(
                "application_id",
                "must be 1 to 100 characters of letters, digits, `-`, `_` and `.` (it prefixes topic names)",
            ));
        }
        for key in self.kafka.keys() {
            if matches!(
                key.as_str(),
                "bootstrap.servers"
                    | "group.id"
                    | "transactional.id"
                    | "enable.auto.commit"
                    | "isolation.level"
                    | "enable.idempotence"
            ) {
                errors.push(err(format!("kafka.{key}"), "is set by chorus itself and cannot be overridden"));
            }
        }
        if !(1..=16).contains(&self.stream_threads) {
            errors.push(err("stream_threads", "must be between 1 and 16"));
        }
        if self.commit_latency_budget.ms() <= 0 {
            errors.push(err("commit_latency_budget", "must be positive"));
        }
        for (name, d) in [
            ("retention", self.topics.retention),
            ("segment", self.topics.segment),
            ("compaction_lag", self.topics.compaction_lag),
            ("delete_retention", self.topics.delete_retention),
        ]
        .into_iter()
        .chain(self.topics.retention_per_topic.iter().map(|(t, d)| (t.as_str(), *d)))
        {
            if d.ms() <= 0 {
                errors.push(err(format!("topics.{name}"), "must be positive"));
            }
        }
        let resolved = self.topics.retention_of(crate::resolved::RESOLVED_TOPIC).ms() + self.topics.segment.ms();
        if self.privacy.marker_ttl.ms() < resolved {
            errors.push(err(
                "privacy.marker_ttl",
                format!(
                    "must be at least the retention of events.resolved plus topics.segment ({} h): a record still in \
                     that topic for an erased customer would otherwise recreate them",
                    resolved / 3_600_000
                ),
            ));
        }
        if self.topics.default_partitions == 0 {
            errors.push(err("topics.default_partitions", "must be at least 1"));
        }
        if self.topics.replication_factor < 1 {
            errors.push(err("topics.replication_factor", "must be at least 1"));
        }
        let known: Vec<String> = self.topic_specs().into_iter().map(|t| t.name).collect();
        for (topic, n) in &self.topics.partitions {
            if *n == 0 {
                errors.push(err(format!("topics.partitions.{topic}"), "must be at least 1"));
            }
            if topic == IDENTITY_REPARTITION {
                errors.push(err(format!("topics.partitions.{topic}"), "always has events.raw's partition count"));
            } else if !known.contains(topic) {
                errors.push(err(format!("topics.partitions.{topic}"), "is not a topic of this topology"));
            }
        }
        let raw = self.partitions_of(EVENTS_RAW);
        for co in [MESSAGES_REQUESTS, CONSENT, crate::privacy::REQUESTS_TOPIC] {
            if self.partitions_of(co) != raw {
                errors.push(err(
                    format!("topics.partitions.{co}"),
                    format!(
                        "must equal events.raw's partition count ({raw}): the identity stage reads them co-partitioned"
                    ),
                ));
            }
        }
        let resolved = self.partitions_of(EVENTS_RESOLVED);
        for (co, stage) in
            [(RECOMMENDATIONS, "profile"), (CONTEXT, "journeys"), (PROFILES, "orchestrator"), (SEGMENTS, "campaigns")]
        {
            if self.partitions_of(co) != resolved {
                errors.push(err(
                    format!("topics.partitions.{co}"),
                    format!("must equal events.resolved's partition count ({resolved}): the {stage} stage reads them co-partitioned"),
                ));
            }
        }
        if self.partitions_of(CAMPAIGNS) != self.partitions_of(CONTENT) {
            errors.push(err(
                format!("topics.partitions.{CAMPAIGNS}"),
                format!(
                    "must equal content's partition count ({}): the catalog stage reads them co-partitioned",
                    self.partitions_of(CONTENT)
                ),
            ));
        }
        if self.limits.max_record_bytes < 1024 {
            errors.push(err("limits.max_record_bytes", "must be at least 1024"));
        }
        if self.dedupe.window.ms() <= 0 {
            errors.push(err("dedupe.window", "must be positive"));
        }
        for (path, d) in [
            ("context.session_timeout", self.context.session_timeout),
            ("context.cart_ttl", self.context.cart_ttl),
            ("context.offer_ttl", self.context.offer_ttl),
            ("context.recent_interactions.ttl", self.context.recent_interactions.ttl),
        ] {
            if d.ms() <= 0 {
                errors.push(err(path, "must be positive"));
            }
        }
        if self.context.recent_interactions.max == 0 {
            errors.push(err("context.recent_interactions.max", "must be at least 1"));
        }
        self.identity.validate(&mut errors);
        for (i, t) in self.event_types.iter().enumerate() {
            if t.trim().is_empty() {
                errors.push(err(format!("event_types[{i}]"), "must not be empty"));
            }
        }
        for purpose in self.consent.defaults.keys() {
            if !self.consent.purposes.contains(purpose) {
                errors.push(err(format!("consent.defaults.{purpose}"), "is not a declared purpose (consent.purposes)"));
            }
        }
        self.orchestration.validate(&self.event_types, &self.consent.purposes, &mut errors);
        for (i, seg) in self.segments.iter().enumerate() {
            if !is_identifier_type(&seg.name) {
                errors.push(err(
                    format!("segments[{i}].name"),
                    format!("{:?} is not a valid segment name (lower-case letters, digits, _)", seg.name),
                ));
            }
            if self.segments[..i].iter().any(|o| o.name == seg.name) {
                errors.push(err(format!("segments[{i}].name"), format!("{:?} is declared twice", seg.name)));
            }
            if let Err((_, message)) = crate::segments::Segments::compile(std::slice::from_ref(seg)) {
                errors.push(err(format!("segments[{i}].rule"), message));
            }
        }
        self.profile.validate(&self.event_types, &mut errors);
        let segment_names: Vec<String> = self.segments.iter().map(|s| s.name.clone()).collect();
        self.personalisation.validate(&segment_names, &mut errors);
        crate::journeys::config::validate(&self.journeys, self, &mut errors);
        errors.extend(self.content.validate("content").into_iter().map(|(path, message)| err(path, message)));
        crate::campaigns::config::validate(&self.campaigns, self, &mut errors);
        self.privacy.validate(&mut errors);
        self.access.validate(&mut errors);
        self.segment.validate(&self.event_types, &mut errors);
        if self.state.block_cache_mb == 0 || self.state.write_buffer_mb == 0 {
            errors.push(err("state", "block_cache_mb and write_buffer_mb must be positive"));
        }
        errors
    }

    pub fn partitions_of(&self, topic: &str) -> u32 {
        let topic = if topic == IDENTITY_REPARTITION { EVENTS_RAW } else { topic };
        self.topics.partitions.get(topic).copied().unwrap_or(self.topics.default_partitions)
    }

    /// Every topic of the topology (changelogs are added by the runtime).
    pub fn topic_specs(&self) -> Vec<TopicSpec> {
        let mut names: Vec<(String, bool)> = [
            ("events.raw", false),
            ("events.dlq", false),
            ("events.resolved", false),
            ("identity.merges", false),
            ("identity.graph", true),
            ("identity.review", false),
            (IDENTITY_REPARTITION, false),
            ("profiles", true),
            ("context", true),
            ("segments", false),
            ("consent", false),
            ("messages.requests", false),
            ("decisions.suppressed", false),
            ("decisions.deferred", false),
            ("journeys.events", false),
            ("content", true),
            ("campaigns", true),
            ("recommendations", true),
            ("privacy.requests", false),
            ("privacy.results", false),
        ]
        .into_iter()
        .map(|(n, c)| (n.to_owned(), c))
        .collect();
        for channel in &self.orchestration.channels {
            names.push((format!("decisions.{channel}"), false));
        }
        names
            .into_iter()
            .map(|(name, compacted)| TopicSpec { partitions: self.partitions_of(&name), name, compacted })
            .collect()
    }

    /// Topic → partition count, for processors that address partitions directly.
    /// The name a topic has on the cluster: internal topics (spelled `chorus-...` in the
    /// processors) carry the `application_id` instead.
    pub fn physical_topic<'a>(&self, logical: &'a str) -> std::borrow::Cow<'a, str> {
        match logical.strip_prefix("chorus-") {
            Some(rest) if self.application_id != DEFAULT_APPLICATION_ID => {
                std::borrow::Cow::Owned(format!("{}-{rest}", self.application_id))
            }
            _ => std::borrow::Cow::Borrowed(logical),
        }
    }

    /// The processors' name of a topic read from the cluster (the inverse of
    /// [`Topology::physical_topic`]).
    pub fn logical_topic<'a>(&self, physical: &'a str) -> std::borrow::Cow<'a, str> {
        if self.application_id == DEFAULT_APPLICATION_ID {
            return std::borrow::Cow::Borrowed(physical);
        }
        match physical.strip_prefix(self.application_id.as_str()).and_then(|r| r.strip_prefix('-')) {
            Some(rest) => std::borrow::Cow::Owned(format!("chorus-{rest}")),
            None => std::borrow::Cow::Borrowed(physical),
        }
    }

    /// A consumer group, transactional id or client id of this deployment.
    pub fn client_name(&self, name: &str) -> String {
        format!("{}-{name}", self.application_id)
    }

    pub fn partition_map(&self) -> BTreeMap<String, u32> {
        self.topic_specs().into_iter().map(|t| (t.name, t.partitions)).collect()
    }

    /// The same topology with every topic at `n` partitions (`chorus up --partitions`).
    pub fn with_partitions(mut self, n: u32) -> Topology {
        self.topics.default_partitions = n;
        self.topics.partitions.clear();
        self
    }

    /// Consent to `purpose` before any consent record.
    pub fn default_consent(&self, purpose: &str) -> bool {
        self.consent.defaults.get(purpose).copied().unwrap_or(false)
    }

    pub fn is_known_event_type(&self, event_type: &str) -> bool {
        self.event_types.iter().any(|t| t == event_type)
    }
}

pub fn is_identifier_type(t: &str) -> bool {
    !t.is_empty() && t.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_defaults() {
        let t = Topology::from_yaml_str("{}").unwrap();
        assert_eq!(t.partitions_of("events.raw"), 8);
        assert_eq!(t.context.session_timeout, Duration::minutes(30));
        assert!(!t.consent.defaults["marketing_email"]);
        assert!(t.topic_specs().iter().any(|s| s.name == "decisions.email"));
    }

    #[test]
    fn the_cache_budget_is_per_processor_and_its_earlier_name_still_reads() {
        assert_eq!(Topology::default().state.processor_cache_mb, 16);
        let t = Topology::from_yaml_str("state: {task_cache_mb: 8}").unwrap();
        assert_eq!(t.state.processor_cache_bytes(), 8 << 20);
        let t = Topology::from_yaml_str("state: {processor_cache_mb: 32}").unwrap();
        assert_eq!(t.state.processor_cache_mb, 32);
    }

    #[test]
    fn shipped_topology_is_valid() {
        let text = include_str!("../../topology.yaml");
        let shipped = Topology::from_yaml_str(text).unwrap_or_else(|errors| panic!("{errors:?}"));
        // The shipped file spells out the built-in defaults.
        let defaults = Topology::default();
        assert_eq!(
            (shipped.commit_interval, shipped.commit_latency_budget, shipped.stream_threads),
            (defaults.commit_interval, defaults.commit_latency_budget, defaults.stream_threads)
        );
        assert_eq!((&shipped.application_id, &shipped.kafka), (&defaults.application_id, &defaults.kafka));
        assert_eq!(shipped.identity.types, defaults.identity.types);
        assert_eq!(shipped.identity.blocked_values, defaults.identity.blocked_values);
        assert_eq!(shipped.identity.probabilistic.fields, defaults.identity.probabilistic.fields);
        assert_eq!(shipped.identity.probabilistic.blocking, defaults.identity.probabilistic.blocking);
        assert_eq!(shipped.segments, defaults.segments);
        assert_eq!(shipped.profile, defaults.profile);
        let (shipped_o, default_o) = (&shipped.orchestration, &defaults.orchestration);
        assert_eq!(shipped_o.suppressions, default_o.suppressions);
        assert_eq!(shipped_o.categories, default_o.categories);
        assert_eq!(shipped_o.reachability, default_o.reachability);
        assert_eq!(shipped_o.quiet_hours, default_o.quiet_hours);
        assert_eq!(shipped_o.frequency_caps, default_o.frequency_caps);
        assert_eq!(
            (shipped_o.coordination_window, shipped_o.campaign_window, shipped_o.max_pending),
            (default_o.coordination_window, default_o.campaign_window, default_o.max_pending)
        );
        assert_eq!(shipped.personalisation, defaults.personalisation);
        assert_eq!(shipped.journeys, defaults.journeys);
        assert_eq!(shipped.content, defaults.content);
        assert_eq!(shipped.campaigns, defaults.campaigns);
    }

    #[test]
    fn application_id_renames_internal_topics_only() {
        let mut t = Topology::default();
        assert_eq!(t.physical_topic("chorus-identity-repartition"), "chorus-identity-repartition");
        t.application_id = "staging".into();
        assert_eq!(t.physical_topic("chorus-profile-profiles-changelog"), "staging-profile-profiles-changelog");
        assert_eq!(t.physical_topic("events.raw"), "events.raw");
        assert_eq!(t.logical_topic("staging-identity-repartition"), "chorus-identity-repartition");
        assert_eq!(t.logical_topic("profiles"), "profiles");
        assert_eq!(t.client_name("customer"), "staging-customer");
        assert!(t.validate().is_empty());
        t.application_id = "no spaces".into();
        t.kafka.insert("group.id".into(), "x".into());
        let paths: Vec<String> = t.validate().into_iter().map(|e| e.path).collect();
        assert_eq!(paths, vec!["application_id".to_owned(), "kafka.group.id".to_owned()]);
    }

    #[test]
    fn errors_carry_their_yaml_path() {
        let e = Topology::from_yaml_str("context:\n  session_timeout: 30 minutes\n").unwrap_err();
        assert_eq!(e[0].path, "context.session_timeout");
        assert!(e[0].message.contains("unknown duration unit"), "{}", e[0].message);

        let e = Topology::from_yaml_str("context:\n  sesion_timeout: 30m\n").unwrap_err();
        assert!(e[0].to_string().contains("unknown field `sesion_timeout`"), "{}", e[0]);

        let e = Topology::from_yaml_str("topics:\n  partitions:\n    consent: 3\n    nope: 0\n").unwrap_err();
        let paths: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"topics.partitions.consent"), "{paths:?}");
        assert!(paths.contains(&"topics.partitions.nope"), "{paths:?}");

        let e =
            Topology::from_yaml_str("segments:\n  - {name: vip, rule: \"customer.lifetime_value >\"}\n").unwrap_err();
        assert_eq!(e[0].path, "segments[0].rule");

        let e = Topology::from_yaml_str("consent:\n  defaults:\n    telepathy: true\n").unwrap_err();
        assert_eq!(e[0].path, "consent.defaults.telepathy");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(Duration::parse("100ms").unwrap(), Duration(100));
        assert_eq!(Duration::parse("7d").unwrap(), Duration::days(7));
        assert!(Duration::parse("h").is_err());
        assert!(Duration::parse("5 parsecs").is_err());
    }
}
