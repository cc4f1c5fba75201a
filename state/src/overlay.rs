//! The stores a task sees while processing: RocksDB underneath, uncommitted writes on
//! top. Reads see the task's own pending writes; `take_pending` hands them to the
//! runtime, which produces them to the changelogs inside the transaction and applies
//! them to RocksDB once the transaction has committed (or drops them on abort).

use crate::db::TaskDb;
use chorus_processors::store::Entries;
use chorus_processors::store::{Store, StoreError, StoreSet};
use std::collections::BTreeMap;
use std::sync::Arc;

/// One store write of a committed (or committing) batch; `None` deletes.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreWrite {
    pub store: String,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

struct OverlayStore {
    name: String,
    db: Arc<TaskDb>,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

fn io(e: crate::StateError) -> StoreError {
    StoreError::Io(e.to_string())
}

impl Store for OverlayStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.pending.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.db.get(&self.name, key).map_err(io),
        }
    }

    fn put(&mut self, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
        self.pending.insert(key.to_vec(), Some(value));
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.pending.insert(key.to_vec(), None);
        Ok(())
    }

    fn range(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Entries, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let overlay: Vec<_> = self.pending.range(from.to_vec()..to.to_vec()).collect();
        // Pending deletes may hide rows, so read enough from disk to still fill `limit`.
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> =
            self.db.range(&self.name, from, to, limit.saturating_add(overlay.len())).map_err(io)?.into_iter().collect();
        for (k, v) in overlay {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().take(limit).collect())
    }

    fn approximate_len(&self) -> u64 {
        self.db.approximate_len(&self.name)
    }
}

/// A task's stores with their uncommitted writes.
pub struct TaskState {
    db: Arc<TaskDb>,
    stores: BTreeMap<String, OverlayStore>,
}

impl TaskState {
    pub fn new(db: TaskDb, stores: &[&str]) -> TaskState {
        let db = Arc::new(db);
        let stores = stores
            .iter()
            .map(|s| (s.to_string(), OverlayStore { name: s.to_string(), db: db.clone(), pending: BTreeMap::new() }))
            .collect();
        TaskState { db, stores }
    }

    pub fn db(&self) -> &TaskDb {
        &self.db
    }

    /// A shared handle for readers outside the task (interactive queries); they see
    /// committed state only.
    pub fn db_handle(&self) -> Arc<TaskDb> {
        self.db.clone()
    }

    pub fn has_pending(&self) -> bool {
        self.stores.values().any(|s| !s.pending.is_empty())
    }

    /// Uncommitted writes, store by store, each in key order (the last write per key).
    pub fn take_pending(&mut self) -> Vec<StoreWrite> {
        let mut out = Vec::new();
        for store in self.stores.values_mut() {
            for (key, value) in std::mem::take(&mut store.pending) {
                out.push(StoreWrite { store: store.name.clone(), key, value });
            }
        }
        out
    }

    /// Uncommitted writes, as [`TaskState::take_pending`] gives them, but kept: readers
    /// go on seeing them until the commit that carries them is applied to RocksDB.
    pub fn pending_writes(&self) -> Vec<StoreWrite> {
        let mut out = Vec::new();
        for store in self.stores.values() {
            for (key, value) in &store.pending {
                out.push(StoreWrite { store: store.name.clone(), key: key.clone(), value: value.clone() });
            }
        }
        out
    }

    /// Drop uncommitted writes (the transaction aborted, or they were applied).
    pub fn discard_pending(&mut self) {
        for store in self.stores.values_mut() {
            store.pending.clear();
        }
    }
}

impl StoreSet for TaskState {
    fn store(&mut self, name: &str) -> Result<&mut dyn Store, StoreError> {
        self.stores.get_mut(name).map(|s| s as &mut dyn Store).ok_or_else(|| StoreError::Undeclared(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SharedResources;

    fn open(dir: &std::path::Path) -> TaskState {
        let shared = SharedResources::new(8 << 20, 8 << 20, crate::Durability::Local);
        TaskState::new(TaskDb::open(dir, &["a", "b"], &shared).unwrap(), &["a", "b"])
    }

    #[test]
    fn reads_see_pending_writes_and_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = open(dir.path());
        state.store("a").unwrap().put(b"k1", b"v1".to_vec()).unwrap();
        state.store("a").unwrap().put(b"k2", b"v2".to_vec()).unwrap();
        let writes = state.take_pending();
        assert_eq!(writes.len(), 2);
        state.db().apply(&writes, &[("t".to_string(), 7)].into_iter().collect()).unwrap();
        assert_eq!(state.db().checkpoint("t").unwrap(), 7);

        let a = state.store("a").unwrap();
        a.delete(b"k1").unwrap();
        a.put(b"k3", b"v3".to_vec()).unwrap();
        assert_eq!(a.get(b"k1").unwrap(), None);
        assert_eq!(a.get(b"k2").unwrap(), Some(b"v2".to_vec()));
        let keys: Vec<_> = a.range(b"k", b"l", 10).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![b"k2".to_vec(), b"k3".to_vec()]);
        assert_eq!(a.range(b"k", b"l", 1).unwrap().len(), 1);
    }

    #[test]
    fn discarded_writes_never_reach_disk_and_applied_ones_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut state = open(dir.path());
            state.store("b").unwrap().put(b"kept", b"1".to_vec()).unwrap();
            let w = state.take_pending();
            state.db().apply(&w, &BTreeMap::new()).unwrap();
            state.store("b").unwrap().put(b"lost", b"2".to_vec()).unwrap();
            state.discard_pending();
            assert!(!state.has_pending());
            state.db().flush().unwrap();
        }
        let mut state = open(dir.path());
        assert_eq!(state.store("b").unwrap().get(b"kept").unwrap(), Some(b"1".to_vec()));
        assert_eq!(state.store("b").unwrap().get(b"lost").unwrap(), None);
        assert!(state.store("nope").is_err());
    }

    #[test]
    fn changelog_names_are_per_processor_and_store() {
        assert_eq!(crate::changelog_topic("context", "__timers"), "chorus-context-timers-changelog");
    }
}
