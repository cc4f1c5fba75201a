//! A task member's state as its processing thread and the interactive queries share it:
//! the stores with their uncommitted writes and the cache of decoded values, behind one
//! lock the processing thread holds for one step at a time. Reads answer from the
//! current state as soon as a record is processed (as Kafka Streams' interactive
//! queries read uncommitted local state), or from RocksDB alone when they ask for
//! committed state.

use crate::db::{StateError, TaskDb};
use crate::overlay::TaskState;
use chorus_processors::cache::StateCache;
use chorus_processors::store::{encode_value, StoreError, StoreSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// What the processing thread holds while it processes a step.
pub struct MemberState {
    pub state: TaskState,
    pub cache: StateCache,
}

pub struct LiveStore {
    db: Arc<TaskDb>,
    member: Mutex<MemberState>,
}

impl LiveStore {
    pub fn new(state: TaskState, cache: StateCache) -> Arc<LiveStore> {
        Arc::new(LiveStore { db: state.db_handle(), member: Mutex::new(MemberState { state, cache }) })
    }

    pub fn lock(&self) -> MutexGuard<'_, MemberState> {
        self.member.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn db(&self) -> &TaskDb {
        &self.db
    }

    /// The stored entry (expiry header and value) as the task sees it now.
    pub fn read_live(&self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let mut member = self.lock();
        if let Some(value) = member.cache.peek_encoded(store, key)? {
            return Ok(Some(encode_value(0, &value)));
        }
        member.state.store(store)?.get(key)
    }

    /// The stored entry as of the last commit.
    pub fn read_committed(&self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        self.db.get(store, key)
    }
}
