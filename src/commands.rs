//! The CLI commands. `up` and `run` share one pipeline lifecycle: start a thread per
//! processor, serve HTTP, wait for Ctrl-C/SIGTERM, then stop cleanly (commit, flush).

use crate::broker::{forward_port, EmbeddedBroker};
use crate::directory::Directory;
use crate::engine::{run_sub_topology, DrainState, EngineConfig};
use crate::http::{event_key, serve, ApiState};
use crate::kafka::{client_config, create_topics, now_ms};
use crate::query::{LocalStores, Query};
use anyhow::{anyhow, bail, Context as _, Result};
use chorus_processors::campaigns::config::CampaignConfig;
use chorus_processors::content::ContentItem;
use chorus_processors::identity;
use chorus_processors::personalisation::Precomputed;
use chorus_processors::topology::{Clock, CAMPAIGNS, CONSENT, CONTENT, EVENTS_RAW, MESSAGES_REQUESTS, RECOMMENDATIONS};
use chorus_processors::{processor_specs, Topology};
use chorus_schemas::{decode_avro, ConsentChange, Event, MessageRequest};
use chorus_state::{Durability, SharedResources};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The topology at `path`; the built-in default when `path` is the default
/// `topology.yaml` and the working directory has none (said in the log). Its `kafka:`
/// settings then apply to every Kafka client of the process.
pub fn load_topology(path: &Path) -> Result<Topology> {
    let topology = if path == Path::new(DEFAULT_TOPOLOGY) && !path.exists() {
        let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
        tracing::warn!("no {DEFAULT_TOPOLOGY} in {cwd}: using the built-in default topology");
        Topology::default()
    } else {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read topology {}", path.display()))?;
        Topology::from_yaml_str(&text).map_err(|errors| {
            let all: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            anyhow!("invalid topology {}: {}", path.display(), all.join("; "))
        })?
    };
    crate::kafka::use_settings(&topology.kafka)?;
    let mut topology = topology;
    topology.privacy.hash_key = crate::kafka::expand_env(&topology.privacy.hash_key).context("privacy.hash_key")?;
    let callbacks = &mut topology.privacy.callbacks;
    callbacks.secret = crate::kafka::expand_env(&callbacks.secret).context("privacy.callbacks.secret")?;
    Ok(topology)
}

/// Say at start, once, which privacy keys are development ones (the commands that
/// serve: `up`, `run`; the others keep stderr to their one line).
fn warn_development_keys(topology: &Topology) {
    if topology.privacy.hash_key.is_empty() {
        tracing::warn!(
            "privacy.hash_key is not set: erased identifiers are hashed with the development key, which anyone can \
             use to test an email against the suppression list; set it (for example ${{CHORUS_PRIVACY_KEY}}) in production"
        );
    }
    if topology.privacy.callbacks.secret.is_empty() {
        tracing::warn!(
            "privacy.callbacks.secret is not set: status callbacks are signed with the development secret, which \
             anyone can use to forge one; set it (for example ${{CHORUS_CALLBACK_SECRET}}) in production"
        );
    }
}

/// The topology file every command reads unless told otherwise.
pub const DEFAULT_TOPOLOGY: &str = "topology.yaml";

pub fn validate(path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read topology {}", path.display()))?;
    match Topology::from_yaml_str(&text) {
        Ok(t) => {
            println!(
                "{}: ok ({} topics, clock {:?}, {:?})",
                path.display(),
                crate::kafka::all_topics(&t).len(),
                t.clock,
                t.processing
            );
            Ok(())
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{}: {e}", path.display());
            }
            std::process::exit(1);
        }
    }
}

/// `chorus identity train FILE`: fit m/u with EM and print the fields section.
pub fn identity_train(file: &Path, topology: &Path, iterations: usize) -> Result<()> {
    let topology = load_topology(topology)?;
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("{}:{}: not a JSON record", file.display(), i + 1))?;
        if !value.is_object() {
            bail!("{}:{}: expected a JSON object (an event or its traits)", file.display(), i + 1);
        }
        records.push(value);
    }
    let model = &topology.identity.probabilistic;
    let trained = identity::train::train(model, &records, iterations.max(1)).map_err(|e| anyhow!(e))?;
    let fields: BTreeMap<&String, Value> = trained
        .fields
        .iter()
        .map(|(name, f)| {
            let mut v = serde_json::to_value(f).unwrap_or(Value::Null);
            if f.thresholds.is_empty() {
                if let Some(o) = v.as_object_mut() {
                    o.remove("thresholds");
                }
            }
            (name, v)
        })
        .collect();
    let section = serde_json::json!({"identity": {"probabilistic": {"fields": fields}}});
    println!(
        "# chorus identity train: {} records, {} candidate pairs, estimated match share {:.4}, {} EM iterations",
        trained.records, trained.pairs, trained.match_share, trained.iterations
    );
    println!("# u measured on random pairs; m fitted by EM per blocking rule. Paste into topology.yaml.");
    print!("{}", serde_yaml::to_string(&section).context("cannot write YAML")?);
    Ok(())
}

pub struct UpArgs {
    pub topology: PathBuf,
    pub data_dir: PathBuf,
    pub http: String,
    pub partitions: Option<u32>,
    pub clock: Option<String>,
}

pub async fn up(args: UpArgs) -> Result<()> {
    let mut topology = load_topology(&args.topology)?;
    if let Some(n) = args.partitions {
        if n == 0 {
            bail!("--partitions must be at least 1");
        }
        topology = topology.with_partitions(n);
    }
    match args.clock.as_deref() {
        Some("event") => topology.clock = Clock::Event,
        Some("wall") => topology.clock = Clock::Wall,
        _ => {}
    }
    let broker = EmbeddedBroker::start(&topology)?;
    let bootstrap = broker.bootstrap();
    println!("bootstrap: {bootstrap}");
    let pipeline = Pipeline {
        brokers: bootstrap,
        topology: Arc::new(topology),
        data_dir: args.data_dir,
        instance_id: "up".into(),
        processors: "all".into(),
        http: args.http,
        advertise: None,
        fresh_broker: true,
    };
    let result = pipeline.run().await;
    drop(broker);
    result
}

pub async fn broker(port: u16, topology: &Path, partitions: Option<u32>) -> Result<()> {
    let mut topology = load_topology(topology)?;
    if let Some(n) = partitions {
        topology = topology.with_partitions(n.max(1));
    }
    let broker = EmbeddedBroker::start(&topology)?;
    let port = forward_port(port, broker.bootstrap()).await?;
    println!("bootstrap: 127.0.0.1:{port}");
    std::io::stdout().flush().ok();
    wait_for_signal().await;
    drop(broker);
    Ok(())
}

pub struct RunArgs {
    pub brokers: String,
    pub processors: String,
    pub instance_id: Option<String>,
    pub data_dir: PathBuf,
    pub http: String,
    pub advertise: Option<String>,
    pub topology: PathBuf,
}

pub async fn run(args: RunArgs) -> Result<()> {
    let topology = load_topology(&args.topology)?;
    crate::kafka::check_reachable(&args.brokers, Duration::from_secs(10))?;
    crate::kafka::verify_partitions(&args.brokers, &crate::kafka::all_topics(&topology))?;
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let instance_id = match args.instance_id {
        Some(id) => id,
        None => instance_id_from(&args.data_dir)?,
    };
    let pipeline = Pipeline {
        brokers: args.brokers,
        topology: Arc::new(topology),
        data_dir: args.data_dir,
        instance_id,
        processors: args.processors,
        http: args.http,
        advertise: args.advertise,
        fresh_broker: false,
    };
    pipeline.run().await
}

/// A stable member id kept in the data dir, so a restart fences its own zombie.
fn instance_id_from(data_dir: &Path) -> Result<String> {
    let path = data_dir.join("instance-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_owned();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let id = format!("i-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    std::fs::write(&path, &id).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

struct Pipeline {
    brokers: String,
    topology: Arc<Topology>,
    data_dir: PathBuf,
    instance_id: String,
    processors: String,
    http: String,
    advertise: Option<String>,
    fresh_broker: bool,
}

/// The URL other instances reach this one at.
fn advertised_url(bound: &str) -> String {
    match bound.rsplit_once(':') {
        Some((host, port)) if host == "0.0.0.0" || host == "[::]" => {
            let name = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
            let name = if name.is_empty() { "localhost".to_owned() } else { name };
            format!("http://{name}:{port}")
        }
        _ => format!("http://{bound}"),
    }
}

impl Pipeline {
    async fn run(self) -> Result<()> {
        warn_development_keys(&self.topology);
        let subs = chorus_processors::subtopology::select(processor_specs(&self.topology), &self.processors)?;
        for sub in &subs {
            tracing::info!(sub_topology = %sub.name, members = ?sub.member_names(), "running");
        }
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("cannot create {}", self.data_dir.display()))?;
        let local = LocalStores::default();
        let shutdown = Arc::new(AtomicBool::new(false));
        let drain = Arc::new(DrainState::default());
        let embedded_broker = self.fresh_broker || crate::kafka::is_embedded_broker(&self.brokers);
        let config = EngineConfig {
            brokers: self.brokers.clone(),
            topology: self.topology.clone(),
            data_dir: self.data_dir.clone(),
            instance_id: self.instance_id.clone(),
            shared: Arc::new(SharedResources::new(
                self.topology.state.block_cache_mb << 20,
                self.topology.state.write_buffer_mb << 20,
                if embedded_broker { Durability::Local } else { Durability::Changelog },
            )),
            local: local.clone(),
            shutdown: shutdown.clone(),
            drain: drain.clone(),
            fresh_broker: self.fresh_broker,
            embedded_broker,
        };
        let access = Arc::new(crate::auth::Access::from_config(
            &self.topology.access,
            &self.topology.privacy.api_key,
            &self.data_dir,
        )?);
        let directory = Directory::new(&self.instance_id, local.clone(), &self.topology, &access);
        let query = Query::new(self.topology.clone(), local.clone(), directory.clone());
        let api = ApiState::new(&self.brokers, query, access.clone())?;
        let http_stop = Arc::new(tokio::sync::Notify::new());
        let (http_task, bound) = serve(&self.http, api, http_stop.clone()).await?;
        // Development credentials go to stdout (as `bootstrap:` and `http:` do), never
        // to the log.
        for line in access.development_lines() {
            println!("{line}");
        }
        if !access.development.is_empty() {
            tracing::warn!(
                "access: development credentials are in use (printed on stdout, kept in the data directory); set \
                 access.sources and access.api_keys in production"
            );
        }
        println!("http: http://{bound}");
        std::io::stdout().flush().ok();
        let url = self.advertise.clone().unwrap_or_else(|| advertised_url(&bound));
        let background_stop = Arc::new(AtomicBool::new(false));
        let mut background_threads = directory.start(&self.brokers, url, background_stop.clone())?;
        background_threads.push(crate::callbacks::start(&self.brokers, &self.topology, background_stop.clone())?);

        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Result<()>)>();
        let mut threads = Vec::new();
        for index in 0..subs.len() {
            for thread in 0..self.topology.stream_threads {
                // Each thread has processors of its own (they hold per-task state).
                let sub = chorus_processors::subtopology::select(processor_specs(&self.topology), &self.processors)?
                    .swap_remove(index);
                let config = config.clone();
                let done = done_tx.clone();
                let name = sub.name.clone();
                drain.register(&format!("{name}#{thread}"));
                let handle = std::thread::Builder::new()
                    .name(format!("chorus-{name}-{thread}"))
                    .spawn(move || {
                        let local = config.local.clone();
                        let result = supervised(&name, || run_sub_topology(sub, config, thread));
                        if let Err(e) = &result {
                            local.set_failed(format!("sub-topology {name} stopped: {e:#}"));
                        }
                        let _ = done.send((name, result));
                    })
                    .context("cannot start a processor thread")?;
                threads.push(handle);
            }
        }
        drop(done_tx);

        let failure = tokio::select! {
            _ = wait_for_signal() => None,
            finished = done_rx.recv() => finished.and_then(|(name, r)| r.err().map(|e| e.context(format!("sub-topology {name} stopped")))),
        };
        // Stop intake first, then let the pipeline finish what it accepted.
        http_stop.notify_waiters();
        let _ = http_task.await;
        if failure.is_none() && self.fresh_broker {
            drain.wait(Duration::from_secs(30)).await;
        }
        shutdown.store(true, Ordering::SeqCst);
        let mut errors: Vec<anyhow::Error> = failure.into_iter().collect();
        while let Some((name, result)) = done_rx.recv().await {
            if let Err(e) = result {
                errors.push(e.context(format!("sub-topology {name} stopped")));
            }
        }
        for t in threads {
            let _ = t.join();
        }
        background_stop.store(true, Ordering::SeqCst);
        for t in background_threads {
            let _ = t.join();
        }
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Run a sub-topology's loop, turning a panic into an error: a thread that dies must
/// stop the process (non-zero exit, `/readyz` failing first) rather than leave it
/// serving state nobody updates.
pub fn supervised(name: &str, run: impl FnOnce() -> Result<()>) -> Result<()> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            tracing::error!(sub_topology = name, panic = %message, "a processing thread panicked; stopping");
            Err(anyhow!("panicked: {message}"))
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

pub async fn topics_create(brokers: &str, topology: &Path) -> Result<()> {
    let topology = load_topology(topology)?;
    let created = create_topics(brokers, &topology).await?;
    println!(
        "{} topics created, {} already existed",
        created.len(),
        crate::kafka::all_topics(&topology).len() - created.len()
    );
    Ok(())
}

pub fn topics_list(topology: &Path) -> Result<()> {
    let topology = load_topology(topology)?;
    for topic in crate::kafka::all_topics(&topology) {
        println!("{}", json!({"topic": topic.name, "partitions": topic.partitions, "compacted": topic.compacted}));
    }
    Ok(())
}

pub async fn tail(
    topic: &str,
    brokers: &str,
    from_beginning: bool,
    max: Option<usize>,
    timeout_ms: Option<u64>,
    to_end: bool,
) -> Result<()> {
    crate::kafka::check_reachable(brokers, Duration::from_secs(10))?;
    let consumer: BaseConsumer = client_config(brokers)
        .set("group.id", format!("chorus-tail-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", if from_beginning { "earliest" } else { "latest" })
        .create()
        .context("cannot create a consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| anyhow!("cannot read metadata: {e}"))?;
    let partitions = metadata.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
    if partitions == 0 {
        bail!("topic {topic} does not exist");
    }
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions as i32 {
        let offset = if from_beginning { rdkafka::Offset::Beginning } else { rdkafka::Offset::End };
        tpl.add_partition_offset(topic, p, offset)?;
    }
    consumer.assign(&tpl).context("cannot assign partitions")?;
    // `--to-end`: each partition's end when the command started.
    let mut ends = Vec::new();
    if to_end {
        for p in 0..partitions as i32 {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .map_err(|e| anyhow!("cannot read the end of {topic}[{p}]: {e}"))?;
            if high > low {
                ends.push((p, high));
            }
        }
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut seen = 0usize;
    let mut last = Instant::now();
    let idle = timeout_ms.map(Duration::from_millis);
    loop {
        if max.is_some_and(|m| seen >= m) {
            break;
        }
        if to_end && reached(&consumer, topic, &ends)? {
            break;
        }
        if idle.is_some_and(|d| last.elapsed() >= d) {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let value = m.payload().map(decode_value).unwrap_or(Value::Null);
                let line = json!({
                    "topic": m.topic(),
                    "partition": m.partition(),
                    "offset": m.offset(),
                    "timestamp": m.timestamp().to_millis(),
                    "key": m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    "value": value,
                });
                if writeln!(out, "{line}").is_err() {
                    break;
                }
                seen += 1;
                last = Instant::now();
            }
            Some(Err(e)) => bail!("consuming {topic}: {e}"),
            None => {}
        }
    }
    Ok(())
}

/// Whether the consumer's position is at or past `ends` on every partition listed.
fn reached(consumer: &BaseConsumer, topic: &str, ends: &[(i32, i64)]) -> Result<bool> {
    let positions = consumer.position().context("cannot read the consumer's position")?;
    Ok(ends.iter().all(|(p, end)| {
        matches!(positions.find_partition(topic, *p).map(|e| e.offset()), Some(rdkafka::Offset::Offset(at)) if at >= *end)
    }))
}

/// A record value as JSON: Avro single-object, JSON, or (otherwise) a string.
fn decode_value(bytes: &[u8]) -> Value {
    if let Ok((_, v)) = decode_avro(bytes) {
        return v;
    }
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

pub async fn produce(topic: &str, brokers: &str, topology: &Path, no_validate: bool) -> Result<()> {
    let topology = load_topology(topology)?;
    // Read and check everything first: a bad line fails the command before anything
    // is written.
    let stdin = std::io::stdin();
    let mut prepared: Vec<(String, Vec<u8>, bool)> = Vec::new();
    for (i, line) in stdin.lock().lines().enumerate() {
        let line = line.context("cannot read stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        if no_validate {
            let key = serde_json::from_str::<Value>(&line)
                .ok()
                .and_then(|v| v.get("customer_id").or(v.get("anonymous_id")).and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_default();
            prepared.push((key, line.into_bytes(), false));
            continue;
        }
        let value: Value = serde_json::from_str(&line).map_err(|e| anyhow!("line {n}: not valid JSON: {e}"))?;
        let (key, broadcast) = record_key(topic, &value, &topology).map_err(|e| anyhow!("line {n}: {e}"))?;
        prepared.push((key, line.into_bytes(), broadcast));
    }
    crate::kafka::check_reachable(brokers, Duration::from_secs(10))?;
    let producer: FutureProducer = client_config(brokers)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.max.bytes", topology.limits.max_message_bytes().to_string())
        .create()
        .context("cannot create a producer")?;
    let partitions = topology.partitions_of(topic) as i32;
    let mut deliveries = Vec::new();
    for (key, payload, broadcast) in &prepared {
        let targets: Vec<Option<i32>> = if *broadcast { (0..partitions).map(Some).collect() } else { vec![None] };
        for p in targets {
            let mut record = FutureRecord::to(topic).key(key).payload(payload).timestamp(now_ms());
            if let Some(p) = p {
                record = record.partition(p);
            }
            deliveries.push(producer.send(record, Duration::from_secs(30)));
        }
        if deliveries.len() >= 5_000 {
            for d in futures::future::join_all(deliveries.drain(..)).await {
                d.map_err(|(e, _)| anyhow!("delivery to {topic} failed: {e}"))?;
            }
        }
    }
    for d in futures::future::join_all(deliveries).await {
        d.map_err(|(e, _)| anyhow!("delivery to {topic} failed: {e}"))?;
    }
    eprintln!("produced {} records to {topic}", prepared.len());
    Ok(())
}

/// The key a validated input record is produced under, and whether it goes to every
/// partition (clock ticks).
fn record_key(topic: &str, value: &Value, topology: &Topology) -> Result<(String, bool)> {
    Ok(match topic {
        EVENTS_RAW => {
            let event = Event::from_json(value)?;
            if !topology.is_known_event_type(&event.event_type) {
                bail!("event_type {:?} is not in the topology's event_types", event.event_type);
            }
            (event_key(topology, &event), event.event_type == "system.tick")
        }
        MESSAGES_REQUESTS => {
            let r = MessageRequest::from_json(value)?;
            let key = identity::named_partition_key(&topology.identity, r.customer_id.as_deref(), &r.identifiers);
            (key.unwrap_or(r.request_id), false)
        }
        CONSENT => {
            let c = ConsentChange::from_json(value)?;
            let key = identity::named_partition_key(&topology.identity, c.customer_id.as_deref(), &c.identifiers);
            (key.unwrap_or_default(), false)
        }
        RECOMMENDATIONS => {
            let list = Precomputed::parse(value.to_string().as_bytes()).map_err(|e| anyhow!(e))?;
            let key = list.canonical_id.filter(|c| !c.is_empty());
            (key.ok_or_else(|| anyhow!("a recommendations record needs `canonical_id` (its key)"))?, false)
        }
        CONTENT => (ContentItem::parse(value.to_string().as_bytes())?.id, false),
        CAMPAIGNS => {
            let id = value.get("id").and_then(Value::as_str).unwrap_or_default();
            let campaign =
                CampaignConfig::from_record(id, value.to_string().as_bytes(), topology).map_err(|e| anyhow!(e))?;
            (campaign.id, false)
        }
        _ => (value.get("key").and_then(Value::as_str).unwrap_or_default().to_owned(), false),
    })
}

/// `chorus state scan`: every entry under `data_dir`'s task databases that mentions one
/// of `needles`, as JSON lines `{"task", "store", "key", "matched"}`; the number of
/// entries scanned goes to stderr.
pub fn state_scan(data_dir: &Path, needles: &[String]) -> Result<()> {
    let root = data_dir.join("state");
    if !root.is_dir() {
        bail!("{} holds no task state (no {} directory)", data_dir.display(), root.display());
    }
    let mut tasks = Vec::new();
    for processor in std::fs::read_dir(&root).with_context(|| format!("cannot read {}", root.display()))? {
        let processor = processor?.path();
        for partition in
            std::fs::read_dir(&processor).with_context(|| format!("cannot read {}", processor.display()))?
        {
            let partition = partition?.path();
            if partition.join("CURRENT").is_file() {
                tasks.push(partition);
            }
        }
    }
    tasks.sort();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut scanned = 0u64;
    for task in &tasks {
        let name = task.strip_prefix(&root).unwrap_or(task).display().to_string();
        let mut result = Ok(());
        chorus_state::scan_all(task, |store, key, value| {
            scanned += 1;
            let found = needles.iter().find(|n| contains(key, n.as_bytes()) || contains(value, n.as_bytes()));
            if let (Some(needle), Ok(())) = (found, &result) {
                let line =
                    json!({"task": name, "store": store, "key": String::from_utf8_lossy(key), "matched": needle});
                result = writeln!(out, "{line}");
            }
        })
        .with_context(|| format!("cannot scan {}", task.display()))?;
        result?;
    }
    eprintln!("scanned {scanned} entries in {} task databases", tasks.len());
    Ok(())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod supervision_tests {
    use super::supervised;

    #[test]
    fn a_panicking_thread_becomes_an_error() {
        let result = supervised("customer", || panic!("store exploded"));
        assert_eq!(result.unwrap_err().to_string(), "panicked: store exploded");
        assert!(supervised("customer", || Ok(())).is_ok());
    }
}
