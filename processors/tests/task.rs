//! The customer sub-topology's task as the runtime drives it — many records, then one
//! commit — rather than the TestDriver's commit after every record: snapshots go out once
//! per changed customer per commit, and values are encoded once per commit.

mod common;

use chorus_processors::cache::StateCache;
use chorus_processors::resolved::{Kind, Resolved};
use chorus_processors::store::{MemStoreSet, StoreSet};
use chorus_processors::task::{MemberStores, NoMeter};
use chorus_processors::{Record, Task};
use common::{event, topology, T0};
use serde_json::json;

fn resolved(i: i64) -> Record {
    let e = event(
        &format!("e{i}"),
        "product.viewed",
        T0 + i,
        json!({"customer_id": "c1"}),
        json!({"product_id": "p1", "category": "outdoor", "price": 10.0}),
    );
    let r = Resolved {
        kind: Kind::Event,
        canonical_id: "cus_1".into(),
        customer_id: Some("c1".into()),
        at: T0 + i,
        body: e,
        stage: None,
    };
    Record {
        topic: "events.resolved".into(),
        partition: 0,
        offset: i,
        key: Some(b"cus_1".to_vec()),
        value: Some(serde_json::to_vec(&r).unwrap()),
        timestamp: 0,
        resolved: Default::default(),
    }
}

#[test]
fn snapshots_and_store_writes_happen_once_per_customer_per_commit() {
    let topology = topology(1, 1);
    let sub = chorus_processors::sub_topologies(&topology).into_iter().find(|s| s.name == "customer").unwrap();
    let mut stores: Vec<MemberStores<MemStoreSet>> = sub
        .members
        .iter()
        .map(|m| MemberStores { stores: MemStoreSet::with_stores(m.all_stores()), cache: StateCache::new(1 << 20) })
        .collect();
    let mut task = Task::new(&sub, &topology, 0);
    let mut outputs = Vec::new();
    for i in 0..5 {
        outputs.extend(task.process(&mut stores, &resolved(i), 0, &mut NoMeter).unwrap().outputs);
    }
    let of = |outputs: &[chorus_processors::Output], topic: &str| outputs.iter().filter(|o| o.topic == topic).count();
    assert_eq!((of(&outputs, "profiles"), of(&outputs, "context")), (0, 0), "nothing published before the commit");
    let profile = sub.members.iter().position(|m| m.name == "profile").unwrap();
    assert!(stores[profile].stores.store("profiles").unwrap().get(b"cus_1").unwrap().is_none(), "nor written");
    let flushed = task.flush(&mut stores, 0, &mut NoMeter).unwrap().outputs;
    assert_eq!((of(&flushed, "profiles"), of(&flushed, "context")), (1, 1), "one snapshot each at the commit");
    let snapshot: serde_json::Value =
        serde_json::from_slice(flushed.iter().find(|o| o.topic == "profiles").unwrap().value.as_ref().unwrap())
            .unwrap();
    assert_eq!(snapshot["metrics"]["event_count"], 5);
    assert!(
        stores[profile].stores.store("profiles").unwrap().get(b"cus_1").unwrap().is_some(),
        "written at the commit"
    );
    // Nothing changed since: the next commit publishes nothing.
    let again = task.flush(&mut stores, 0, &mut NoMeter).unwrap().outputs;
    assert_eq!(of(&again, "profiles") + of(&again, "context"), 0);
}
