//! The RocksDB-backed task store behaves exactly like the in-memory model store for any
//! sequence of writes, reads, range scans, commits and aborts.

use chorus_processors::store::{MemStore, Store, StoreSet};
use chorus_state::{SharedResources, TaskDb, TaskState};
use proptest::prelude::*;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u8),
    Delete(u8),
    Range(u8, u8, u8),
    Commit,
    Abort,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..16, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
        2 => (0u8..16).prop_map(Op::Delete),
        2 => (0u8..16, 0u8..17, 1u8..6).prop_map(|(a, b, l)| Op::Range(a, b, l)),
        1 => Just(Op::Commit),
        1 => Just(Op::Abort),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn rocksdb_overlay_matches_the_model(ops in prop::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        let shared = SharedResources::new(4 << 20, 4 << 20, chorus_state::Durability::Local);
        let mut state = TaskState::new(TaskDb::open(dir.path(), &["s"], &shared).unwrap(), &["s"]);
        // committed: what RocksDB must hold; working: committed + pending.
        let mut committed = MemStore::new();
        let mut working = MemStore::new();
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    state.store("s").unwrap().put(&[k], vec![v]).unwrap();
                    working.put(&[k], vec![v]).unwrap();
                }
                Op::Delete(k) => {
                    state.store("s").unwrap().delete(&[k]).unwrap();
                    working.delete(&[k]).unwrap();
                }
                Op::Range(a, b, limit) => {
                    let got = state.store("s").unwrap().range(&[a], &[b], limit as usize).unwrap();
                    let want = working.range(&[a], &[b], limit as usize).unwrap();
                    prop_assert_eq!(got, want);
                }
                Op::Commit => {
                    let writes = state.take_pending();
                    state.db().apply(&writes, &BTreeMap::new()).unwrap();
                    committed = working.clone();
                }
                Op::Abort => {
                    state.discard_pending();
                    working = committed.clone();
                }
            }
            for k in 0u8..16 {
                prop_assert_eq!(state.store("s").unwrap().get(&[k]).unwrap(), working.get(&[k]).unwrap());
                prop_assert_eq!(state.db().get("s", &[k]).unwrap(), committed.get(&[k]).unwrap());
            }
        }
    }
}
