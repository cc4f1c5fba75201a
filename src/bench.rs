//! `chorus bench`: throughput and latency of the pipeline, reported as ratios against a
//! consume→produce passthrough measured in the same run on the same broker, since
//! absolute numbers on shared machines are noisy.
//!
//! 1. passthrough: N records copied from `bench.in` to `bench.out` by a no-op processor
//!    on the same runtime (same exactly-once transactions and commit interval), so the
//!    ratio isolates what identity, profile, context and orchestration cost;
//! 2. full slice: the same N events through identity → profile / context / orchestrator,
//!    timed until profile and context have both processed every event;
//! 3. latency: events offered at a fixed rate while the pipeline runs; event timestamp →
//!    profile / context committed, from the end-to-end histogram.

use crate::broker::EmbeddedBroker;
use crate::commands::load_topology;
use crate::engine::{run_sub_topology, DrainState, EngineConfig};
use crate::kafka::{changelog_topics, client_config, create_topic_list, create_topics, now_ms, TopicToCreate};
use crate::metrics::metrics;
use crate::query::LocalStores;
use anyhow::{anyhow, bail, Context as _, Result};
use chorus_processors::subtopology::{group, select};
use chorus_processors::topology::{Clock, EVENTS_RAW};
use chorus_processors::{context, profile};
use chorus_processors::{processor_specs, Ctx, ProcessError, Processor, ProcessorSpec, Record, SubTopology, Topology};
use chorus_state::{Durability, SharedResources, TaskDb};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A fresh Kafka cluster; without it the embedded broker is used.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Events of the throughput run [default: 200000 on Kafka, 50000 on the embedded
    /// broker, whose partitions keep 5 MiB each].
    #[arg(long)]
    pub events: Option<usize>,
    #[arg(long, default_value_t = 20_000)]
    pub customers: usize,
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    /// Offered load for the latency measurement, events per second (0: no latency run).
    #[arg(long, default_value_t = 1_000)]
    pub rate: u32,
    /// Length of the latency measurement.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Override the topology's commit interval (`25ms`, ...).
    #[arg(long)]
    pub commit_interval: Option<String>,
    /// Override the topology's commit latency budget (`20ms`, ...).
    #[arg(long)]
    pub latency_budget: Option<String>,
    #[arg(long, default_value = "topology.yaml")]
    pub topology: PathBuf,
    /// Sub-topologies or processors to run, as `chorus run --processors`.
    #[arg(long, default_value = "all")]
    pub processors: String,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

const BENCH_IN: &str = "bench.in";
const BENCH_OUT: &str = "bench.out";

struct Copy;

impl Processor for Copy {
    fn process(&mut self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError> {
        ctx.emit(BENCH_OUT, record.key.as_deref().unwrap_or_default(), record.value.clone(), None);
        Ok(())
    }
}

fn passthrough_spec() -> ProcessorSpec {
    ProcessorSpec {
        name: "passthrough",
        inputs: vec![BENCH_IN.into()],
        stores: vec![],
        outputs: vec![BENCH_OUT.into()],
        forwards: vec![],
        sub_topology: "passthrough",
        factory: Box::new(|| Box::new(Copy)),
    }
}

/// What one partition of the embedded broker keeps (librdkafka's mock cluster drops the
/// oldest records beyond it, like retention): 5 MiB or 100,000 records.
const EMBEDDED_PARTITION_BYTES: usize = 5 << 20;
const EMBEDDED_PARTITION_RECORDS: usize = 100_000;

/// Refuse a workload whose input would not stay whole on the embedded broker (the
/// benchmark would wait forever for records it dropped).
fn fits_the_embedded_broker(events: usize, customers: usize, partitions: u32) -> Result<()> {
    let per_partition = events.div_ceil(partitions.max(1) as usize);
    let sample = (0..100).map(|i| event(events.saturating_sub(1 + i), customers).1.len()).max().unwrap_or(0);
    // Headroom: `events.resolved` records are about twice the raw event, and keys do not
    // spread evenly over partitions.
    let bytes = per_partition * (sample + 64) * 2;
    if bytes > EMBEDDED_PARTITION_BYTES || per_partition * 2 > EMBEDDED_PARTITION_RECORDS {
        let most = EMBEDDED_PARTITION_BYTES / 2 / (sample + 64) * partitions as usize;
        bail!(
            "{events} events do not fit the embedded broker, which keeps {} MiB per partition: use --events {most} or fewer, more --partitions, or --brokers",
            EMBEDDED_PARTITION_BYTES >> 20
        );
    }
    Ok(())
}

/// One event of the benchmark workload, timestamped now.
fn event(i: usize, customers: usize) -> (String, Vec<u8>) {
    let c = i % customers;
    let kind = ["page.viewed", "product.viewed", "cart.item_added", "order.completed", "app.opened"][i % 5];
    let at = chorus_processors::time::rfc3339(now_ms());
    let mut e = json!({"event_id": format!("bench-{i}"), "event_type": kind, "timestamp": at, "customer_id": format!("c{c}"),
        "channel": if i.is_multiple_of(3) { "mobile_app" } else { "web" },
        "payload": {"product_id": format!("p{}", i % 997), "category": "outdoor", "price": 19.5, "quantity": 1, "total": 39.0}});
    if i.is_multiple_of(50) {
        e["anonymous_id"] = json!(format!("anon-{c}"));
    }
    (format!("c{c}"), e.to_string().into_bytes())
}

async fn produce_all(
    producer: &FutureProducer,
    topic: &str,
    records: impl Iterator<Item = (String, Vec<u8>)>,
) -> Result<()> {
    let mut pending = Vec::new();
    for (key, value) in records {
        let producer = producer.clone();
        let topic = topic.to_owned();
        pending.push(async move {
            producer
                .send(FutureRecord::to(&topic).key(&key).payload(&value).timestamp(now_ms()), Duration::from_secs(60))
                .await
                .map(|_| ())
                .map_err(|(e, _)| anyhow!("produce to {topic}: {e}"))
        });
        if pending.len() >= 20_000 {
            for r in futures::future::join_all(pending.drain(..)).await {
                r?;
            }
        }
    }
    for r in futures::future::join_all(pending).await {
        r?;
    }
    Ok(())
}

/// Mean time one record takes in a processor, in microseconds (where the time goes).
fn mean_processing_us(name: &str, partitions: u32) -> f64 {
    let (sum, count) = (0..partitions)
        .map(|p| metrics().processing_seconds.with_label_values(&[name, &p.to_string()]))
        .fold((0.0, 0u64), |(s, c), h| (s + h.get_sample_sum(), c + h.get_sample_count()));
    sum / count.max(1) as f64 * 1e6
}

fn processed(name: &str, partitions: u32) -> u64 {
    (0..partitions).map(|p| metrics().records_in.with_label_values(&[name, &p.to_string()]).get()).sum()
}

/// Events whose effect a stage made readable (records handed on in memory — requests,
/// forwarded state — are not events and are not counted).
fn events_done(stage: &str) -> u64 {
    metrics().end_to_end_seconds.with_label_values(&[stage]).get_sample_count()
}

struct Running {
    shutdown: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
}

impl Running {
    /// Run each sub-topology `make()` returns with the topology's stream threads.
    fn start(make: impl Fn() -> Result<Vec<SubTopology>>, config: &EngineConfig) -> Result<Running> {
        let shutdown = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for thread in 0..config.topology.stream_threads {
            for sub in make()? {
                let mut config = config.clone();
                config.shutdown = shutdown.clone();
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("bench-{}-{thread}", sub.name))
                        .spawn(move || run_sub_topology(sub, config, thread))?,
                );
            }
        }
        Ok(Running { shutdown, threads })
    }

    fn stop(self) -> Result<()> {
        self.shutdown.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().map_err(|_| anyhow!("a processor thread panicked"))??;
        }
        Ok(())
    }
}

/// Records per second a no-op processor copies from `bench.in` to `bench.out` on the same
/// runtime (same exactly-once transactions and commit interval): the yardstick every
/// benchmark figure is divided by.
async fn passthrough_rate(
    producer: &FutureProducer,
    config: &EngineConfig,
    partitions: u32,
    records: impl ExactSizeIterator<Item = (String, Vec<u8>)>,
) -> Result<f64> {
    let n = records.len();
    produce_all(producer, BENCH_IN, records).await?;
    let running = Running::start(|| Ok(group(vec![passthrough_spec()])), config)?;
    let took =
        first_to_last("the passthrough", Duration::from_secs(1800), n as u64, || processed("passthrough", partitions))
            .await?;
    running.stop()?;
    Ok(n as f64 / took.as_secs_f64())
}

/// The passthrough's two topics, created on `brokers` (or the embedded broker).
async fn create_bench_topics(
    embedded: Option<&EmbeddedBroker>,
    brokers: &str,
    partitions: u32,
    topology: &Topology,
) -> Result<()> {
    let mut topics: Vec<TopicToCreate> =
        [BENCH_IN, BENCH_OUT].map(|name| TopicToCreate { name: name.into(), partitions, compacted: false }).to_vec();
    // Every task has timer and expiry stores, so the passthrough has changelogs too.
    topics.extend(changelog_topics(&passthrough_spec(), topology).into_iter().map(|mut t| {
        t.name = topology.physical_topic(&t.name).into_owned();
        t
    }));
    match embedded {
        Some(broker) => {
            for t in &topics {
                broker.create_topic(&t.name, t.partitions)?;
            }
            Ok(())
        }
        None => create_topic_list(brokers, &topics, topology).await.map(|_| ()),
    }
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Result<Duration> {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(started.elapsed())
}

/// Cumulative (upper bound, count) buckets of a processor's end-to-end histogram.
fn latency_buckets(processor: &str) -> Vec<(f64, u64)> {
    use prometheus::core::Collector;
    let h = metrics().end_to_end_seconds.with_label_values(&[processor]);
    h.collect()
        .first()
        .and_then(|family| family.get_metric().first().map(|m| m.get_histogram().get_bucket().to_vec()))
        .unwrap_or_default()
        .iter()
        .map(|b| (b.upper_bound(), b.cumulative_count()))
        .collect()
}

/// Quantile of the samples recorded between two bucket snapshots (linear within a bucket).
fn quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, u64)> =
        after.iter().zip(before.iter().chain(std::iter::repeat(&(0.0, 0)))).map(|(a, b)| (a.0, a.1 - b.1)).collect();
    let total = counts.last()?.1;
    if total == 0 {
        return None;
    }
    let target = q * total as f64;
    let mut lower = (0.0, 0u64);
    for (bound, cum) in counts {
        if cum as f64 >= target {
            let width = (cum - lower.1).max(1) as f64;
            return Some(lower.0 + (bound - lower.0) * ((target - lower.1 as f64) / width));
        }
        lower = (bound, cum);
    }
    None
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn dir_size_mb(path: &std::path::Path) -> f64 {
    fn walk(p: &std::path::Path) -> u64 {
        std::fs::read_dir(p)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => walk(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(path) as f64 / (1024.0 * 1024.0)
}

/// An engine configuration over a fresh data dir, and a fast producer, for a benchmark.
fn bench_runtime(
    brokers: &str,
    topology: &Arc<Topology>,
    fresh: bool,
) -> Result<(EngineConfig, PathBuf, FutureProducer)> {
    let data = tempfile_dir()?;
    let config = EngineConfig {
        brokers: brokers.to_owned(),
        topology: topology.clone(),
        data_dir: data.clone(),
        instance_id: format!("bench-{}", std::process::id()),
        shared: Arc::new(SharedResources::new(
            topology.state.block_cache_mb << 20,
            topology.state.write_buffer_mb << 20,
            if fresh { Durability::Local } else { Durability::Changelog },
        )),
        local: LocalStores::default(),
        shutdown: Arc::new(AtomicBool::new(false)),
        drain: Arc::new(DrainState::default()),
        fresh_broker: fresh,
        embedded_broker: fresh,
    };
    let producer: FutureProducer = client_config(brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .context("cannot create the benchmark producer")?;
    Ok((config, data, producer))
}

/// The topology's topics on `brokers`, or an embedded broker holding them.
async fn start_broker(brokers: Option<&str>, topology: &Topology) -> Result<(Option<EmbeddedBroker>, String)> {
    match brokers {
        Some(b) => {
            create_topics(b, topology).await?;
            Ok((None, b.to_owned()))
        }
        None => {
            let broker = EmbeddedBroker::start(topology)?;
            let b = broker.bootstrap();
            Ok((Some(broker), b))
        }
    }
}

pub async fn bench(mut args: BenchArgs) -> Result<()> {
    let events = args.events.unwrap_or(if args.brokers.is_some() { 200_000 } else { 50_000 });
    args.events = Some(events);
    if events == 0 || args.customers == 0 || args.partitions == 0 {
        bail!("--events, --customers and --partitions must be positive");
    }
    let mut topology: Topology = load_topology(&args.topology)?.with_partitions(args.partitions);
    // Latency is event timestamp → visible, so events carry the wall-clock time.
    topology.clock = Clock::Wall;
    let duration = |flag: &str, text: &str| match chorus_processors::topology::Duration::parse(text) {
        Ok(d) if d.ms() > 0 => Ok(d),
        Ok(_) => Err(anyhow!("{flag} must be positive")),
        Err(e) => Err(anyhow!("{flag}: {e}")),
    };
    if let Some(interval) = &args.commit_interval {
        topology.commit_interval = duration("--commit-interval", interval)?;
    }
    if let Some(budget) = &args.latency_budget {
        topology.commit_latency_budget = duration("--latency-budget", budget)?;
    }
    if args.brokers.is_none() {
        fits_the_embedded_broker(events, args.customers, args.partitions)?;
    }
    let topology = Arc::new(topology);
    let (embedded, brokers) = start_broker(args.brokers.as_deref(), &topology).await?;
    create_bench_topics(embedded.as_ref(), &brokers, args.partitions, &topology).await?;
    let probe: BaseConsumer = client_config(&brokers).create()?;
    for topic in [EVENTS_RAW, BENCH_IN] {
        for p in 0..args.partitions as i32 {
            // Fresh topics may not have a leader yet: retry for a while.
            let started = Instant::now();
            let high = loop {
                match probe.fetch_watermarks(topic, p, Duration::from_secs(10)) {
                    Ok((_, high)) => break high,
                    Err(e) if started.elapsed() > Duration::from_secs(30) => bail!("{topic}[{p}]: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            };
            if high > 0 {
                bail!("{topic} already holds records: run the benchmark on a fresh broker");
            }
        }
    }
    let (config, data, producer) = bench_runtime(&brokers, &topology, embedded.is_some())?;
    let make = || Ok(select(processor_specs(&topology), &args.processors)?);
    let subs = make()?;
    let members: Vec<&'static str> = subs.iter().flat_map(|s| s.member_names()).collect();
    // The pipeline is done with an event when every customer-facing stage run has it.
    let done_stages: Vec<&'static str> =
        [profile::NAME, context::NAME].into_iter().filter(|s| members.contains(s)).collect();
    if done_stages.is_empty() {
        bail!("--processors must include profile or context (the stages whose output the benchmark waits for)");
    }
    let n = events;
    let limit = Duration::from_secs(1800);
    let where_ = if embedded.is_some() { "embedded broker".to_owned() } else { format!("Kafka at {brokers}") };
    let sub_names: Vec<String> = subs.iter().map(|s| s.name.clone()).collect();
    println!(
        "chorus bench: {n} events, {} customers, {} partitions, commit interval {} ms, latency budget {} ms, {where_}",
        args.customers,
        args.partitions,
        topology.commit_interval.ms(),
        topology.commit_latency_budget.ms()
    );
    println!("sub-topologies: {}", sub_names.join(", "));
    println!("(every rate is timed from the first record processed to the last)");

    let pass_rate =
        passthrough_rate(&producer, &config, args.partitions, (0..n).map(|i| event(i, args.customers))).await?;
    println!("passthrough (consume→produce, same transactions):  {pass_rate:>10.0} events/s");

    produce_all(&producer, EVENTS_RAW, (0..n).map(|i| event(i, args.customers))).await?;
    let running = Running::start(make, &config)?;
    let pipeline = first_to_last("the pipeline", limit, n as u64, || {
        done_stages.iter().map(|s| events_done(s)).min().unwrap_or(0)
    })
    .await?;
    let slice_rate = n as f64 / pipeline.as_secs_f64();
    println!(
        "pipeline ({}):{:>width$.0} events/s",
        members.join(", "),
        slice_rate,
        width = 40usize.saturating_sub(members.join(", ").len()).max(1) + 10
    );
    println!("ratio pipeline / passthrough:                      {:>10.2}", slice_rate / pass_rate);
    let cpu: Vec<(String, f64)> =
        members.iter().map(|m| (m.to_string(), mean_processing_us(m, args.partitions))).collect();
    let cpu_text: Vec<String> = cpu.iter().map(|(m, us)| format!("{m} {us:.1} µs")).collect();
    println!("thread CPU time per record and stage:              {}", cpu_text.join(", "));
    let zero = CommitSums::default();
    let after_run = CommitSums::now(&sub_names);
    let (commits, phases) = after_run.since(&zero).report("");
    let mut latency = serde_json::Map::new();
    let mut latency_events = 0;
    if args.rate > 0 && args.seconds > 0 {
        let commits_before = CommitSums::now(&sub_names);
        let before: Vec<Vec<(f64, u64)>> = done_stages.iter().map(|s| latency_buckets(s)).collect();
        let offered = args.rate as usize * args.seconds as usize;
        latency_events = offered;
        let started = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
        let mut sends = Vec::with_capacity(offered);
        for i in 0..offered {
            let due = started + interval * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
            let (key, value) = event(n + i, args.customers);
            let producer = producer.clone();
            sends.push(tokio::spawn(async move {
                producer
                    .send(
                        FutureRecord::to(EVENTS_RAW).key(&key).payload(&value).timestamp(now_ms()),
                        Duration::from_secs(60),
                    )
                    .await
                    .map(|_| ())
            }));
        }
        for s in sends {
            s.await?.map_err(|(e, _)| anyhow!("produce: {e}"))?;
        }
        wait_for("the offered load to be processed", limit, || {
            done_stages.iter().all(|s| events_done(s) >= (n + offered) as u64)
        })
        .await?;
        let ms = |v: Option<f64>| v.map(|s| format!("{:.1} ms", s * 1000.0)).unwrap_or_else(|| "n/a".into());
        for (stage, before) in done_stages.iter().zip(&before) {
            let after = latency_buckets(stage);
            let (p50, p99) = (quantile(before, &after, 0.5), quantile(before, &after, 0.99));
            println!(
                "event→{stage} readable at {} events/s offered:{:>width$} p50 {}, p99 {}",
                args.rate,
                "",
                ms(p50),
                ms(p99),
                width = 12usize.saturating_sub(stage.len())
            );
            latency.insert(stage.to_string(), json!({"p50_ms": p50.map(|s| s * 1e3), "p99_ms": p99.map(|s| s * 1e3)}));
        }
        let (commits, phases) = CommitSums::now(&sub_names).since(&commits_before).report(" at the offered load");
        latency.insert("commit_ms".into(), commits);
        latency.insert("commit_phase_ms".into(), phases);
    }
    // Disk as the run left it (memtables flushed), then at rest: compacted into one
    // sorted run per store, without the overwritten versions a young store still holds
    // in its upper levels (each customer's profile is rewritten at every commit).
    config.local.for_each_db(TaskDb::flush)?;
    let disk = dir_size_mb(&data);
    config.local.for_each_db(TaskDb::compact)?;
    let compacted = dir_size_mb(&data);
    let stores = store_sizes(&config, &topology);
    running.stop()?;
    let rss = rss_mb();
    let per_million = 1_000_000.0 / args.customers as f64;
    println!("peak RSS of this process (processors + client):    {rss:>10.0} MB");
    println!(
        "RocksDB state on disk for {} customers:           {disk:>10.1} MB ({compacted:.1} MB compacted)",
        args.customers
    );
    println!(
        "RocksDB on disk per million customers:             {:>10.0} MB ({:.0} MB compacted)",
        disk * per_million,
        compacted * per_million
    );
    let store_text: Vec<String> = stores
        .iter()
        .filter(|(_, _, bytes)| *bytes >= 1 << 20)
        .map(|(store, entries, bytes)| {
            format!("{store} {:.0} MB ({entries} entries)", *bytes as f64 / f64::from(1 << 20))
        })
        .collect();
    println!("live data per store (RocksDB estimate, ≥ 1 MB):    {}", store_text.join(", "));

    // Restore: a new member without local state rebuilds every store from the changelogs.
    let restore = if embedded.is_some() {
        println!("changelog restore:                                        n/a (the embedded broker starts empty; local stores are the state)");
        serde_json::Value::Null
    } else {
        let bytes_before = crate::restore::restored_bytes();
        let (by_store, seconds) = restore_rate(&config, &topology, &args.processors).await?;
        let records: u64 = by_store.values().sum();
        let mb = (crate::restore::restored_bytes() - bytes_before) as f64 / f64::from(1 << 20);
        println!(
            "changelog restore (fresh member, every store):     {:>10.0} records/s, {:.0} MB/s ({records} records, {mb:.0} MB in {seconds:.2} s)",
            records as f64 / seconds.max(1e-9),
            mb / seconds.max(1e-9)
        );
        // What every input event (both runs) left in the changelogs, before compaction.
        let per_event = |count: u64| count as f64 / (n + latency_events) as f64;
        let text: Vec<String> =
            by_store.iter().filter(|(_, c)| **c > 0).map(|(s, c)| format!("{s} {:.2}", per_event(*c))).collect();
        println!("changelog records per input event:                 {}", text.join(", "));
        json!({
            "records": records, "seconds": seconds, "records_per_s": records as f64 / seconds.max(1e-9),
            "mb": mb, "mb_per_s": mb / seconds.max(1e-9),
            "records_per_input_event": by_store.iter().map(|(s, c)| (s.clone(), json!(per_event(*c)))).collect::<serde_json::Map<_, _>>(),
        })
    };
    if let Some(path) = &args.json {
        let report = json!({
            "broker": if embedded.is_some() { "embedded" } else { "kafka" },
            "events": n, "customers": args.customers, "partitions": args.partitions,
            "processors": args.processors, "sub_topologies": sub_names,
            "commit_interval_ms": topology.commit_interval.ms(),
            "commit_latency_budget_ms": topology.commit_latency_budget.ms(),
            "passthrough_events_per_s": pass_rate,
            "pipeline_events_per_s": slice_rate,
            "ratio": slice_rate / pass_rate,
            "cpu_us_per_record": cpu.iter().map(|(m, us)| (m.clone(), json!(us))).collect::<serde_json::Map<_, _>>(),
            "commit_ms": commits,
            "commit_phase_ms": phases,
            "offered_events_per_s": args.rate, "latency": latency,
            "restore": restore,
            "peak_rss_mb": rss, "disk_mb": disk, "disk_per_million_customers_mb": disk * per_million,
            "disk_compacted_mb": compacted, "disk_compacted_per_million_customers_mb": compacted * per_million,
            "stores": stores.iter().map(|(store, entries, bytes)| (store.clone(), json!({"entries": entries, "bytes": bytes}))).collect::<serde_json::Map<_, _>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    let _ = std::fs::remove_dir_all(&data);
    // Clients first, so none of them reports the embedded broker going away.
    drop(producer);
    drop(probe);
    drop(embedded);
    Ok(())
}

const COMMIT_PARTS: [&str; 6] = ["flush", "changelog", "deliveries", "offsets", "commit", "apply"];

/// Sum of seconds and count of the commits of each sub-topology, whole (`""`) and by
/// part, so that one phase of the benchmark can be told from another.
#[derive(Default)]
struct CommitSums(BTreeMap<(String, &'static str), (f64, u64)>);

impl CommitSums {
    fn now(sub_names: &[String]) -> CommitSums {
        let mut sums = BTreeMap::new();
        for name in sub_names {
            let h = metrics().commit_seconds.with_label_values(&[name]);
            sums.insert((name.clone(), ""), (h.get_sample_sum(), h.get_sample_count()));
            for part in COMMIT_PARTS {
                let h = metrics().commit_phase_seconds.with_label_values(&[name.as_str(), part]);
                sums.insert((name.clone(), part), (h.get_sample_sum(), h.get_sample_count()));
            }
        }
        CommitSums(sums)
    }

    fn since(&self, before: &CommitSums) -> CommitSums {
        let delta = |k: &(String, &'static str), (sum, n): &(f64, u64)| {
            let (sum0, n0) = before.0.get(k).copied().unwrap_or_default();
            (k.clone(), (sum - sum0, n - n0))
        };
        CommitSums(self.0.iter().map(|(k, v)| delta(k, v)).collect())
    }

    fn mean_ms(&self, name: &str, part: &'static str) -> (f64, u64) {
        let (sum, n) = self.0.get(&(name.to_owned(), part)).copied().unwrap_or_default();
        (sum / n.max(1) as f64 * 1e3, n)
    }

    /// Print the mean commit and its parts; (`commit_ms`, `commit_phase_ms`) as JSON.
    fn report(&self, when: &str) -> (serde_json::Value, serde_json::Value) {
        let names: Vec<&String> = self.0.keys().filter(|(_, part)| part.is_empty()).map(|(n, _)| n).collect();
        let text: Vec<String> = names
            .iter()
            .map(|n| {
                let (ms, count) = self.mean_ms(n, "");
                format!("{n} {ms:.1} ms × {count}")
            })
            .collect();
        println!(
            "mean transaction commit time{when}: {:>w$}{}",
            "",
            text.join(", "),
            w = 21usize.saturating_sub(when.len())
        );
        let mut commits = serde_json::Map::new();
        let mut phases = serde_json::Map::new();
        for name in names {
            let (ms, count) = self.mean_ms(name, "");
            commits.insert(name.clone(), json!({"mean": ms, "count": count}));
            let parts: Vec<(&str, f64)> = COMMIT_PARTS.iter().map(|p| (*p, self.mean_ms(name, p).0)).collect();
            let text: Vec<String> = parts.iter().map(|(p, ms)| format!("{p} {ms:.1}")).collect();
            println!(
                "  {name} commit, mean ms per part:{:>w$}{}",
                "",
                text.join(", "),
                w = 18usize.saturating_sub(name.len())
            );
            phases.insert(name.clone(), parts.into_iter().map(|(p, ms)| (p.to_owned(), json!(ms))).collect());
        }
        (commits.into(), phases.into())
    }
}

/// `processor/store` → (entries, bytes) summed over the partitions open here, largest first.
fn store_sizes(config: &EngineConfig, topology: &Topology) -> Vec<(String, u64, u64)> {
    let sizes = config.local.store_sizes(topology);
    let mut sums: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (processor, store, _, entries, bytes) in sizes {
        let sum = sums.entry(format!("{processor}/{store}")).or_default();
        sum.0 += entries;
        sum.1 += bytes;
    }
    let mut out: Vec<(String, u64, u64)> = sums.into_iter().map(|(s, (n, b))| (s, n, b)).collect();
    out.sort_by_key(|s| std::cmp::Reverse(s.2));
    out
}

/// Start the same sub-topologies on an empty data dir and time the restore of every
/// store from its changelog: (records, seconds from the first replay's start to the
/// last one's end; the sub-topologies restore side by side, each with one consumer).
async fn restore_rate(
    config: &EngineConfig,
    topology: &Topology,
    processors: &str,
) -> Result<(BTreeMap<String, u64>, f64)> {
    let make = || Ok(select(processor_specs(topology), processors)?);
    let subs = make()?;
    let expected: usize = subs.iter().map(|s| s.members.len() * s.partitions(topology) as usize).sum();
    let mut fresh = config.clone();
    fresh.data_dir = tempfile_dir()?;
    fresh.local = LocalStores::default();
    fresh.instance_id = format!("{}-restore", config.instance_id);
    let before = crate::restore::restored_by_store();
    crate::restore::window().take();
    let local = fresh.local.clone();
    let running = Running::start(make, &fresh)?;
    wait_for("every task to restore", Duration::from_secs(1800), || local.open_tasks() >= expected).await?;
    running.stop()?;
    let _ = std::fs::remove_dir_all(&fresh.data_dir);
    let seconds = crate::restore::window().take().unwrap_or(0.0);
    let by_store = crate::restore::restored_by_store()
        .into_iter()
        .map(|(store, count)| (store.clone(), count - before.get(&store).copied().unwrap_or(0)))
        .collect();
    Ok((by_store, seconds))
}

/// Wait until `count()` reaches `n`; the time from the first record counted to the
/// last (start-up and group join excluded, as every system is timed).
async fn first_to_last(what: &str, limit: Duration, n: u64, count: impl Fn() -> u64) -> Result<Duration> {
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    loop {
        let c = count();
        if c > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if c >= n {
            return Ok(first.map(|f| f.elapsed()).unwrap_or_default().max(Duration::from_millis(1)));
        }
        if started.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("chorus-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

pub struct IdentityBenchArgs {
    pub file: PathBuf,
    pub brokers: Option<String>,
    pub partitions: u32,
    pub topology: PathBuf,
}

/// One labelled record of an identity benchmark file: `{"entity": ..., "event": {...}}`.
#[derive(serde::Deserialize)]
struct Labelled {
    entity: String,
    event: serde_json::Value,
}

/// `chorus bench identity`: resolution quality and speed of the identity stage alone.
/// Every record of FILE is an identify event with the entity it truly belongs to; the
/// events go through the identity stage once, and the components it builds are
/// compared pair by pair with the true entities (precision, recall, F1).
pub async fn bench_identity(args: IdentityBenchArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let r: Labelled = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: expected {{\"entity\", \"event\"}}", args.file.display(), i + 1))?;
        records.push(r);
    }
    if records.is_empty() || args.partitions == 0 {
        bail!("the file holds no records, or --partitions is 0");
    }
    let topology = Arc::new(load_topology(&args.topology)?.with_partitions(args.partitions));
    let (embedded, brokers) = start_broker(args.brokers.as_deref(), &topology).await?;
    create_bench_topics(embedded.as_ref(), &brokers, args.partitions, &topology).await?;
    let (config, data, producer) = bench_runtime(&brokers, &topology, embedded.is_some())?;
    let n = records.len();
    let where_ = if embedded.is_some() { "embedded broker".to_owned() } else { format!("Kafka at {brokers}") };
    println!(
        "chorus bench identity: {n} records from {}, {} partitions, {where_}",
        args.file.display(),
        args.partitions
    );

    let mut entity_of = std::collections::BTreeMap::new();
    let mut events = Vec::with_capacity(n);
    for r in &records {
        let event = chorus_schemas::Event::from_json(&r.event).map_err(|e| anyhow!("invalid event: {e}"))?;
        // Keyed by its most specific identifier, as `POST /v1/events` keys it.
        let anchor = chorus_processors::identity::anchor(&topology.identity, &event)
            .ok_or_else(|| anyhow!("event {} has no usable identifier", event.event_id))?;
        entity_of.insert(anchor.label(), r.entity.clone());
        events.push((anchor.owner_key().to_owned(), r.event.to_string().into_bytes()));
    }
    let pass_rate = passthrough_rate(&producer, &config, args.partitions, events.clone().into_iter()).await?;
    produce_all(&producer, EVENTS_RAW, events.into_iter()).await?;
    let business = |name: &str, labels: &[&str]| -> u64 {
        labels.iter().map(|l| metrics().business.with_label_values(&["identity", name, l]).get()).sum()
    };
    let started = Instant::now();
    let running = Running::start(
        || {
            Ok(group(
                processor_specs(&topology)
                    .into_iter()
                    .filter(|s| s.name == chorus_processors::identity::NAME)
                    .collect(),
            ))
        },
        &config,
    )?;
    let limit = Duration::from_secs(3600);
    wait_for("every record to resolve", limit, || business("resolved", &["known", "anonymous"]) >= n as u64).await?;
    // Then until the graph is quiet: no record consumed for 2 s (20 commit intervals).
    let mut last = (processed("identity", args.partitions), Instant::now());
    let quiet_at = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = processed("identity", args.partitions);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) {
            break last.1;
        }
        if started.elapsed() > limit {
            bail!("the identity graph did not settle within {limit:?}");
        }
    };
    let elapsed = quiet_at.duration_since(started).as_secs_f64();
    running.stop()?;
    let merges = business("merges", &["deterministic", "probabilistic"]);

    // The graph as a compacted consumer sees it: identifier → canonical id.
    let graph = read_table(&brokers, chorus_processors::identity::GRAPH_TOPIC).await?;
    let mut predicted = std::collections::BTreeMap::new();
    for (anchor, entity) in &entity_of {
        let canonical = graph
            .get(anchor)
            .and_then(|v| v["canonical_id"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("missing:{anchor}"));
        predicted.insert(anchor.clone(), (canonical, entity.clone()));
    }
    let quality = pairwise_quality(predicted.values().cloned());
    println!("records resolved:                 {n:>10}");
    println!("merges:                           {merges:>10}");
    println!("pairwise precision:               {:>10.4}", quality.precision);
    println!("pairwise recall:                  {:>10.4}", quality.recall);
    println!("pairwise F1:                      {:>10.4}", quality.f1);
    println!("true pairs / predicted pairs:     {:>10} / {}", quality.true_pairs, quality.predicted_pairs);
    let rate = n as f64 / elapsed;
    println!("passthrough, same records:        {pass_rate:>10.0} events/s");
    println!("identity throughput:              {rate:>10.0} events/s (until the graph is quiet)");
    println!("ratio identity / passthrough:     {:>10.2}", rate / pass_rate);
    println!("merges per second:                {:>10.0}", merges as f64 / elapsed);
    let _ = std::fs::remove_dir_all(&data);
    drop(producer);
    drop(embedded);
    Ok(())
}

#[derive(Debug, PartialEq)]
pub struct Quality {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub true_pairs: u64,
    pub predicted_pairs: u64,
}

/// Pairwise precision/recall/F1 of a clustering (`(predicted cluster, true entity)` per
/// record) against the truth.
pub fn pairwise_quality(items: impl IntoIterator<Item = (String, String)>) -> Quality {
    use std::collections::BTreeMap;
    let pairs = |n: u64| n * n.saturating_sub(1) / 2;
    let (mut by_pred, mut by_true, mut by_both) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for (pred, truth) in items {
        *by_pred.entry(pred.clone()).or_insert(0u64) += 1;
        *by_true.entry(truth.clone()).or_insert(0u64) += 1;
        *by_both.entry((pred, truth)).or_insert(0u64) += 1;
    }
    let tp: u64 = by_both.values().map(|n| pairs(*n)).sum();
    let predicted_pairs: u64 = by_pred.values().map(|n| pairs(*n)).sum();
    let true_pairs: u64 = by_true.values().map(|n| pairs(*n)).sum();
    let precision = if predicted_pairs == 0 { 1.0 } else { tp as f64 / predicted_pairs as f64 };
    let recall = if true_pairs == 0 { 1.0 } else { tp as f64 / true_pairs as f64 };
    let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
    Quality { precision, recall, f1, true_pairs, predicted_pairs }
}

/// Latest value per key of a topic, read from the beginning to the current end.
async fn read_table(brokers: &str, topic: &str) -> Result<std::collections::BTreeMap<String, serde_json::Value>> {
    use rdkafka::Message;
    let consumer: BaseConsumer = client_config(brokers)
        .set("group.id", format!("chorus-bench-read-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata.topics().first().map(|t| t.partitions().len()).unwrap_or(0) as i32;
    let mut ends = std::collections::BTreeMap::new();
    let mut assignment = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        ends.insert(p, high);
        assignment.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut table = std::collections::BTreeMap::new();
    let mut positions: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
    let started = Instant::now();
    while ends.iter().any(|(p, end)| positions.get(p).copied().unwrap_or(0) < *end) {
        if started.elapsed() > Duration::from_secs(300) {
            bail!("timed out reading {topic}");
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            // Transaction markers occupy offsets no message reports: use the position.
            for p in 0..partitions {
                if let Ok(pos) = consumer.position() {
                    if let Some(off) = pos.find_partition(topic, p).and_then(|e| e.offset().to_raw()) {
                        positions.insert(p, off);
                    }
                }
            }
            continue;
        };
        let message = message?;
        positions.insert(message.partition(), message.offset() + 1);
        let key = message.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
        match message.payload() {
            Some(v) => {
                if let Ok(json) = serde_json::from_slice(v) {
                    table.insert(key, json);
                }
            }
            None => {
                table.remove(&key);
            }
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_quality_counts_pairs() {
        let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        // Truth {1,2,3} {4}; predicted {1,2} {3,4}.
        let q = pairwise_quality([s("x", "A"), s("x", "A"), s("y", "A"), s("y", "B")]);
        assert_eq!((q.true_pairs, q.predicted_pairs), (3, 2));
        assert!((q.precision - 0.5).abs() < 1e-9 && (q.recall - 1.0 / 3.0).abs() < 1e-9);
        assert!((q.f1 - 0.4).abs() < 1e-9);
    }
}
