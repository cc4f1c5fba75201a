//! Catalog: the compacted `content` and `campaigns` topics, checked once and broadcast
//! to every partition of `events.resolved`, so each orchestrator and campaigns task
//! keeps a full local copy in its own store (what a Kafka Streams GlobalKTable gives,
//! with the copy restored from the task's changelog like any other store). A record
//! that does not parse, or whose key is not its id, goes to `events.dlq` with the
//! reason and is not broadcast; a tombstone deletes the item or campaign everywhere.
//!
//! Both topics are keyed by id, so every change of one item or campaign is read by
//! one task, in order, and reaches each partition in that order.

use crate::campaigns::config::CampaignConfig;
use crate::content::ContentItem;
use crate::processor::{Ctx, ProcessError, Processor, Record};
use crate::resolved::{CatalogBody, Kind, Resolved, RESOLVED_TOPIC};
use crate::task::ProcessorSpec;
use crate::topology::{Topology, CAMPAIGNS, CONTENT};
use serde_json::Value;
use std::sync::Arc;

pub const NAME: &str = "catalog";

pub fn spec(topology: &Topology) -> ProcessorSpec {
    let topology = Arc::new(topology.clone());
    ProcessorSpec {
        name: NAME,
        inputs: vec![CONTENT.into(), CAMPAIGNS.into()],
        stores: vec![],
        outputs: vec![RESOLVED_TOPIC.into()],
        forwards: vec![],
        sub_topology: crate::subtopology::CATALOG,
        factory: Box::new(move || Box::new(Catalog { topology: topology.clone() })),
    }
}

struct Catalog {
    topology: Arc<Topology>,
}

impl Processor for Catalog {
    fn process(&mut self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError> {
        let key = record.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
        let campaign = record.topic == CAMPAIGNS;
        let (kind, reason) =
            if campaign { (Kind::Campaign, "invalid_campaign") } else { (Kind::Content, "invalid_content") };
        if key.is_empty() {
            return Err(ProcessError::reject(reason, format!("a {} record needs its id as key", record.topic)));
        }
        // The parsed record, re-encoded: each receiver reads exactly what was checked.
        let value = match record.value.as_deref() {
            None => Ok(Value::Null),
            Some(bytes) if campaign => serde_json::to_value(
                CampaignConfig::from_record(&key, bytes, &self.topology)
                    .map_err(|e| ProcessError::reject(reason, format!("campaign {key:?}: {e}")))?,
            ),
            Some(bytes) => {
                let item = ContentItem::parse(bytes).map_err(|e| ProcessError::reject(reason, e.to_string()))?;
                if item.id != key {
                    return Err(ProcessError::reject(
                        reason,
                        format!("content item id {:?} differs from the key {key:?}", item.id),
                    ));
                }
                serde_json::to_value(item)
            }
        }
        .map_err(|e| ProcessError::reject(reason, format!("cannot encode {key:?}: {e}")))?;
        let catalog = if campaign { "campaign" } else { "content" };
        ctx.count("catalog_changes", format!("{catalog}/{}", if value.is_null() { "deleted" } else { "changed" }));
        let change = Resolved {
            kind,
            canonical_id: String::new(),
            customer_id: None,
            at: ctx.now,
            body: serde_json::to_value(CatalogBody { id: key.clone(), value }).unwrap_or(Value::Null),
            stage: None,
        };
        let bytes = serde_json::to_vec(&change)
            .map_err(|e| ProcessError::reject(reason, format!("cannot encode {key:?}: {e}")))?;
        let routing = format!("{catalog}:{key}");
        for p in 0..ctx.partitions(RESOLVED_TOPIC) {
            ctx.emit(RESOLVED_TOPIC, routing.as_bytes(), Some(bytes.clone()), Some(p));
        }
        Ok(())
    }
}
