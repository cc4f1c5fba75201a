//! chorus: an omni-channel customer engagement pipeline on Kafka. This binary is the
//! CLI, the Kafka runtime, the HTTP API and the embedded broker.

mod auth;
mod bench;
mod broker;
mod callbacks;
mod commands;
mod directory;
mod engine;
mod export;
mod http;
mod kafka;
mod metrics;
mod query;
mod restore;
mod tracking;

use chorus_processors::heap::Metered;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// mimalloc, metered per thread so the decoded-value caches can be bounded by the heap
/// their values take (`chorus_processors::heap`).
#[global_allocator]
static ALLOCATOR: Metered<mimalloc::MiMalloc> = Metered(mimalloc::MiMalloc);

#[derive(Parser)]
#[command(name = "chorus", version, about = "Omni-channel customer engagement pipeline on Kafka")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start an embedded broker, create the topics, run every processor and the HTTP API.
    Up {
        #[arg(long, default_value = "topology.yaml")]
        topology: PathBuf,
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: String,
        /// Override the partition count of every topic.
        #[arg(long)]
        partitions: Option<u32>,
        /// Override the topology's clock.
        #[arg(long, value_parser = ["wall", "event"])]
        clock: Option<String>,
    },
    /// Start only the embedded broker (for several processes on one machine).
    Broker {
        #[arg(long, default_value_t = 9092)]
        port: u16,
        #[arg(long, default_value = "topology.yaml")]
        topology: PathBuf,
        #[arg(long)]
        partitions: Option<u32>,
    },
    /// Run processors as one member of the processing group against any Kafka cluster.
    Run {
        #[arg(long)]
        brokers: String,
        /// `all` or a comma-separated list of identity, profile, context, orchestrator, journeys,
        /// catalog, campaigns.
        #[arg(long, default_value = "all")]
        processors: String,
        /// Stable id of this member (defaults to one kept in the data dir).
        #[arg(long)]
        instance_id: Option<String>,
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: String,
        /// URL other instances reach this one's HTTP API at (interactive queries are
        /// routed there); defaults to http://<bound address>, with the host name when
        /// listening on all interfaces.
        #[arg(long)]
        advertise: Option<String>,
        #[arg(long, default_value = "topology.yaml")]
        topology: PathBuf,
    },
    /// Manage the topology's topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Print a topic's records as one JSON object per line.
    Tail {
        topic: String,
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many records.
        #[arg(long)]
        max: Option<usize>,
        /// Stop when no record arrives for this long.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Stop at the end each partition had when the command started (records
        /// written meanwhile are not awaited).
        #[arg(long)]
        to_end: bool,
    },
    /// Produce JSON lines from stdin to a topic (validated for the pipeline's inputs).
    Produce {
        topic: String,
        #[arg(long)]
        brokers: String,
        #[arg(long, default_value = "topology.yaml")]
        topology: PathBuf,
        /// Send lines as they are, without validation (to exercise the DLQ path).
        #[arg(long)]
        no_validate: bool,
    },
    /// Measure throughput (as a ratio to a passthrough in the same run) and latency;
    /// `chorus bench identity FILE` measures identity resolution quality and speed.
    Bench {
        #[command(subcommand)]
        command: Option<BenchCommand>,
        #[command(flatten)]
        args: bench::BenchArgs,
    },
    /// Check a topology file and print every error with its YAML path.
    Validate {
        #[arg(default_value = "topology.yaml")]
        topology: PathBuf,
    },
    /// Identity graph tools.
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Local state tools.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// Print, one JSON line each, every entry of every store (every RocksDB column
    /// family) under a member's data dir whose key or value contains one of the texts:
    /// an audit that an erased subject left nothing behind. Run it while the member is
    /// stopped, or on a copy.
    Scan {
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        /// Byte strings to look for (an identifier, a canonical id).
        #[arg(long = "contains", required = true)]
        needles: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Resolution quality (pairwise precision, recall, F1 against the true entities)
    /// and identity throughput, for labelled records `{"entity", "event"}` per line
    /// (scripts/febrl4.py writes the FEBRL4 data set in this form).
    Identity {
        file: PathBuf,
        /// A fresh Kafka cluster; without it the embedded broker is used.
        #[arg(long)]
        brokers: Option<String>,
        #[arg(long, default_value_t = 8)]
        partitions: u32,
        #[arg(long, default_value = "topology.yaml")]
        topology: PathBuf,
    },
}

#[derive(Subcommand)]
enum IdentityCommand {
    /// Estimate the probabilistic model's m/u probabilities from unlabelled records
    /// (JSON lines: identify events, or bare trait objects) with EM, and print them as
    /// the `identity.probabilistic.fields` section of topology.yaml.
    Train {
        file: PathBuf,
        #[arg(long, default_value = "topology.yaml")]
        topology: PathBuf,
        #[arg(long, default_value_t = 200)]
        iterations: usize,
    },
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create every topic of the topology (idempotent).
    Create {
        #[arg(long)]
        brokers: String,
        #[arg(long, default_value = "topology.yaml")]
        topology: PathBuf,
    },
    /// Print every topic of the topology, changelogs included, as JSON lines
    /// `{"topic", "partitions", "compacted"}` (no broker needed).
    List {
        #[arg(long, default_value = "topology.yaml")]
        topology: PathBuf,
    },
}

fn main() {
    ALLOCATOR.install();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => e.exit(),
            _ => {
                let text = e.render().to_string();
                let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid arguments");
                eprintln!("{first} (see `chorus --help`)");
                std::process::exit(2);
            }
        },
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CHORUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(dispatch(cli.command));
    if let Err(e) = result {
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up { topology, data_dir, http, partitions, clock } => {
            commands::up(commands::UpArgs { topology, data_dir, http, partitions, clock }).await
        }
        Command::Broker { port, topology, partitions } => commands::broker(port, &topology, partitions).await,
        Command::Run { brokers, processors, instance_id, data_dir, http, advertise, topology } => {
            commands::run(commands::RunArgs { brokers, processors, instance_id, data_dir, http, advertise, topology })
                .await
        }
        Command::Topics { command: TopicsCommand::Create { brokers, topology } } => {
            commands::topics_create(&brokers, &topology).await
        }
        Command::Topics { command: TopicsCommand::List { topology } } => commands::topics_list(&topology),
        Command::Tail { topic, brokers, from_beginning, max, timeout_ms, to_end } => {
            commands::tail(&topic, &brokers, from_beginning, max, timeout_ms, to_end).await
        }
        Command::Produce { topic, brokers, topology, no_validate } => {
            commands::produce(&topic, &brokers, &topology, no_validate).await
        }
        Command::Validate { topology } => commands::validate(&topology),
        Command::Identity { command: IdentityCommand::Train { file, topology, iterations } } => {
            commands::identity_train(&file, &topology, iterations)
        }
        Command::Bench { command: Some(BenchCommand::Identity { file, brokers, partitions, topology }), .. } => {
            bench::bench_identity(bench::IdentityBenchArgs { file, brokers, partitions, topology }).await
        }
        Command::Bench { command: None, args } => bench::bench(args).await,
        Command::State { command: StateCommand::Scan { data_dir, needles } } => {
            commands::state_scan(&data_dir, &needles)
        }
    }
}
