//! Sub-topologies: processors that share a key and are connected without a repartition
//! run together, as in Kafka Streams. A task runs a whole sub-topology for one
//! partition — one consumer group, one transactional producer, one transaction per
//! commit — and the records its processors write for each other pass in memory.
//!
//! chorus has three: `identity` (keyed by identifier), `catalog` (keyed by content or
//! campaign id; it broadcasts the catalogue to every customer partition) and `customer`
//! (everything keyed by canonical id: profile, context, orchestrator, journeys,
//! campaigns). A processor joins the sub-topology its spec names; it never adds a
//! consumer group.
//!
//! A sub-topology can also run with only some of its members (`chorus run --processors
//! identity,profile`): then a topic that a missing member would have forwarded in memory
//! is read from Kafka instead, where that member, running elsewhere, writes it.

use crate::task::ProcessorSpec;
use crate::topology::Topology;
use std::collections::BTreeSet;

pub const IDENTITY: &str = "identity";
pub const CATALOG: &str = "catalog";
pub const CUSTOMER: &str = "customer";

/// The sub-topologies in pipeline order.
pub const ALL: [&str; 3] = [IDENTITY, CATALOG, CUSTOMER];

/// The members of one sub-topology that one task runs, in the order each record visits
/// them.
pub struct SubTopology {
    /// Names the consumer group, the transactional id and the task: the sub-topology's
    /// name when every member runs, `customer-profile-context` for a subset.
    pub name: String,
    /// The sub-topology this is (all of it or a part).
    pub sub_topology: &'static str,
    pub members: Vec<ProcessorSpec>,
}

impl SubTopology {
    /// Topics read from Kafka: every member's inputs except those another member here
    /// forwards in memory.
    pub fn kafka_inputs(&self) -> Vec<String> {
        let forwarded = self.forwarded();
        let mut inputs: Vec<String> = Vec::new();
        for spec in &self.members {
            for topic in &spec.inputs {
                if !forwarded.contains(topic) && !inputs.contains(topic) {
                    inputs.push(topic.clone());
                }
            }
        }
        inputs
    }

    /// Topics a member here writes keyed by the customer being processed and another
    /// member here reads: they never need Kafka to reach their reader.
    pub fn forwarded(&self) -> BTreeSet<String> {
        let read: BTreeSet<&String> = self.members.iter().flat_map(|m| m.inputs.iter()).collect();
        self.members.iter().flat_map(|m| m.forwards.iter()).filter(|t| read.contains(t)).cloned().collect()
    }

    /// Topics some member reads (records written to them on this task's partition are
    /// delivered in memory).
    pub fn read_topics(&self) -> BTreeSet<String> {
        self.members.iter().flat_map(|m| m.inputs.iter().cloned()).collect()
    }

    /// How many tasks the sub-topology has: the largest partition count of its inputs.
    pub fn partitions(&self, topology: &Topology) -> u32 {
        self.members.iter().flat_map(|m| m.inputs.iter()).map(|t| topology.partitions_of(t)).max().unwrap_or(1)
    }

    pub fn member_names(&self) -> Vec<&'static str> {
        self.members.iter().map(|m| m.name).collect()
    }
}

/// Group processor specs into their sub-topologies, keeping the specs' order.
pub fn group(specs: Vec<ProcessorSpec>) -> Vec<SubTopology> {
    let mut subs: Vec<SubTopology> = Vec::new();
    for spec in specs {
        match subs.iter_mut().find(|s| s.sub_topology == spec.sub_topology) {
            Some(sub) => sub.members.push(spec),
            None => {
                subs.push(SubTopology { name: String::new(), sub_topology: spec.sub_topology, members: vec![spec] })
            }
        }
    }
    for sub in &mut subs {
        let every = crate::PROCESSORS.iter().filter(|(_, s)| *s == sub.sub_topology);
        let complete = every.clone().all(|(name, _)| sub.members.iter().any(|m| m.name == *name));
        sub.name = if complete {
            sub.sub_topology.to_owned()
        } else {
            format!("{}-{}", sub.sub_topology, sub.member_names().join("-"))
        };
    }
    subs
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown processor or sub-topology {0:?} (known: {1})")]
pub struct UnknownProcessor(pub String, pub String);

/// The processors `--processors` names: `all`, sub-topology names (`identity`,
/// `catalog`, `customer`) and processor names (`profile`, ...), comma-separated.
pub fn select(specs: Vec<ProcessorSpec>, wanted: &str) -> Result<Vec<SubTopology>, UnknownProcessor> {
    let names: Vec<&str> = wanted.split(',').map(str::trim).filter(|w| !w.is_empty()).collect();
    if names.is_empty() || names.contains(&"all") {
        return Ok(group(specs));
    }
    let known = || {
        let mut k: Vec<&str> = ALL.to_vec();
        for s in &specs {
            if !k.contains(&s.name) {
                k.push(s.name);
            }
        }
        k.join(", ")
    };
    for n in &names {
        if !ALL.contains(n) && !specs.iter().any(|s| s.name == *n) {
            return Err(UnknownProcessor(n.to_string(), known()));
        }
    }
    let chosen = specs.into_iter().filter(|s| names.contains(&s.name) || names.contains(&s.sub_topology)).collect();
    Ok(group(chosen))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(subs: &[SubTopology]) -> Vec<(String, Vec<&'static str>)> {
        subs.iter().map(|s| (s.name.clone(), s.member_names())).collect()
    }

    #[test]
    fn the_processor_table_names_every_spec() {
        let specs = crate::processor_specs(&Topology::default());
        let table: Vec<(&str, &str)> = specs.iter().map(|s| (s.name, s.sub_topology)).collect();
        assert_eq!(table, crate::PROCESSORS.to_vec());
    }

    #[test]
    fn the_pipeline_has_three_sub_topologies() {
        let topology = Topology::default();
        let subs = group(crate::processor_specs(&topology));
        assert_eq!(
            names(&subs),
            vec![
                ("identity".to_owned(), vec!["identity"]),
                ("catalog".to_owned(), vec!["catalog"]),
                ("customer".to_owned(), vec!["profile", "context", "orchestrator", "journeys", "campaigns", "privacy"]),
            ]
        );
        let customer = &subs[2];
        // profiles, context and segments pass in memory; events.resolved and the
        // recommendations still come from Kafka.
        assert_eq!(customer.kafka_inputs(), vec!["events.resolved".to_owned(), "recommendations".to_owned()]);
    }

    #[test]
    fn a_subset_reads_what_missing_members_forward_from_kafka() {
        let topology = Topology::default();
        let subs = select(crate::processor_specs(&topology), "identity, orchestrator").unwrap();
        assert_eq!(
            names(&subs),
            vec![("identity".to_owned(), vec!["identity"]), ("customer-orchestrator".to_owned(), vec!["orchestrator"])]
        );
        assert_eq!(subs[1].kafka_inputs(), vec!["events.resolved".to_owned(), "profiles".to_owned()]);
        assert!(select(crate::processor_specs(&topology), "customer").unwrap()[0].name == "customer");
        let err = select(crate::processor_specs(&topology), "identity,profil").err().unwrap();
        assert!(err.to_string().contains("\"profil\""), "{err}");
    }
}
