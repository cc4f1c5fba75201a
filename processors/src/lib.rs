//! chorus business logic. Everything here is pure: processors are functions of
//! (stores, record, now) → outputs and timers, with no Kafka, RocksDB, threads or clocks,
//! so every rule runs in the in-memory [`TestDriver`] in microseconds, across any number
//! of partitions and any interleaving. The Kafka runtime (`src/`) drives the very same
//! [`Task`] code with RocksDB-backed stores.

pub mod access;
pub mod cache;
pub mod campaigns;
pub mod catalog;
pub mod content;
pub mod context;
pub mod driver;
pub mod heap;
pub mod identity;
pub mod journeys;
pub mod json;
pub mod orchestrator;
pub mod partition;
pub mod personalisation;
pub mod privacy;
pub mod processor;
pub mod profile;
pub mod resolved;
pub mod rules;
pub mod segments;
pub mod store;
pub mod subtopology;
pub mod task;
pub mod time;
pub mod topology;
pub mod tracking;

pub use driver::TestDriver;
pub use processor::{Counter, Ctx, Output, ProcessError, Processor, Record};
pub use store::{MemStore, Store, StoreError, StoreSet};
pub use subtopology::SubTopology;
pub use task::{ProcessorSpec, Task};
pub use topology::{ConfigError, Topology};

/// Every processor of the pipeline with its sub-topology, in pipeline order (the order
/// a record visits the members of a task).
pub const PROCESSORS: [(&str, &str); 8] = [
    (identity::NAME, subtopology::IDENTITY),
    (catalog::NAME, subtopology::CATALOG),
    (profile::NAME, subtopology::CUSTOMER),
    (context::NAME, subtopology::CUSTOMER),
    (orchestrator::NAME, subtopology::CUSTOMER),
    (journeys::NAME, subtopology::CUSTOMER),
    (campaigns::NAME, subtopology::CUSTOMER),
    (privacy::NAME, subtopology::CUSTOMER),
];

/// The sub-topologies of the pipeline, each with every member.
pub fn sub_topologies(topology: &Topology) -> Vec<SubTopology> {
    subtopology::group(processor_specs(topology))
}

/// The processors of the pipeline, in pipeline order.
pub fn processor_specs(topology: &Topology) -> Vec<ProcessorSpec> {
    vec![
        identity::spec(topology),
        catalog::spec(topology),
        profile::spec(topology),
        context::spec(topology),
        orchestrator::spec(topology),
        journeys::spec(topology),
        campaigns::spec(topology),
        privacy::status::spec(topology),
    ]
}
