//! The Processor API: a processor sees one record at a time with its key, reads and
//! writes the named stores handed to it, emits records to output topics and schedules
//! timers — all through [`Ctx`], with `now` given, never read from a clock.

use crate::cache::StateCache;
use crate::store::{decode_value, encode_value, prefix_end, StoreError, StoreSet};
use crate::topology::Clock;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;

/// An input record as consumed from a topic partition.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub topic: String,
    pub partition: u32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Record timestamp, ms since the epoch.
    pub timestamp: i64,
    /// The value as `events.resolved` parsed it, once for all of a task's stages (see
    /// [`crate::resolved::parse_record`]); empty until a stage asks.
    pub resolved: std::cell::OnceCell<Result<std::sync::Arc<crate::resolved::Resolved>, String>>,
}

/// A record to produce. `partition: None` lets the key choose (murmur2, as Kafka does).
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub topic: String,
    pub key: Vec<u8>,
    /// `None` is a tombstone.
    pub value: Option<Vec<u8>>,
    pub timestamp: i64,
    pub partition: Option<u32>,
}

/// A metric increment a processor asks the runtime to record (processors stay free of
/// any metrics library).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Counter {
    pub name: &'static str,
    pub label: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The input record is bad; it goes to `events.dlq` with this reason and processing
    /// continues.
    #[error("{reason}: {detail}")]
    Reject { reason: &'static str, detail: String },
    /// As [`ProcessError::Reject`], for an input that may hold personal data that must
    /// not be kept (an erased subject's event): the letter carries neither the record nor
    /// its key, only a keyed hash of the key. `detail` must name no personal data.
    #[error("{reason}: {detail}")]
    Redacted { reason: &'static str, detail: String },
    /// The task cannot go on (storage failure); the runtime aborts the transaction.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot encode {what}: {message}")]
    Encode { what: String, message: String },
}

impl ProcessError {
    pub fn reject(reason: &'static str, detail: impl Into<String>) -> Self {
        ProcessError::Reject { reason, detail: detail.into() }
    }
}

/// Store holding scheduled timers: key = due time (8 bytes BE) ++ timer key.
pub const TIMERS_STORE: &str = "__timers";
/// Store indexing expiring entries: key = expiry (8 bytes BE) ++ store ++ 0 ++ key. It
/// has no changelog: a restore rebuilds it from the expiry headers of the values it
/// replays (see [`expiry_index_key`]).
pub const EXPIRY_STORE: &str = "__expiry";

/// The [`EXPIRY_STORE`] entry of `key` in `store`, expiring at `at`.
pub fn expiry_index_key(at: i64, store: &str, key: &[u8]) -> Vec<u8> {
    let mut index_key = Vec::with_capacity(9 + store.len() + key.len());
    index_key.extend_from_slice(&(at as u64).to_be_bytes());
    index_key.extend_from_slice(store.as_bytes());
    index_key.push(0);
    index_key.extend_from_slice(key);
    index_key
}

/// A scheduled timer, as [`Ctx::timers_where`] finds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Timer {
    pub due: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

/// Everything a processor may touch while handling one record or timer.
pub struct Ctx<'a> {
    pub now: i64,
    clock: Clock,
    pub partition: u32,
    stores: &'a mut dyn StoreSet,
    cache: &'a mut StateCache,
    partitions: &'a BTreeMap<String, u32>,
    pub(crate) outputs: Vec<Output>,
    pub(crate) counters: Vec<Counter>,
    pub(crate) visible: Vec<i64>,
}

impl<'a> Ctx<'a> {
    pub fn new(
        now: i64,
        clock: Clock,
        partition: u32,
        stores: &'a mut dyn StoreSet,
        cache: &'a mut StateCache,
        partitions: &'a BTreeMap<String, u32>,
    ) -> Self {
        Ctx {
            now,
            clock,
            partition,
            stores,
            cache,
            partitions,
            outputs: Vec::new(),
            counters: Vec::new(),
            visible: Vec::new(),
        }
    }

    /// The record being processed happened at `at`. Under `clock: event` this moves
    /// the task's time forward (never back); under `clock: wall` it changes nothing.
    pub fn observe_event_time(&mut self, at: i64) {
        if self.clock == Clock::Event {
            self.now = self.now.max(at);
        }
    }

    /// Partition count of a topic (1 when the topology does not know it).
    pub fn partitions(&self, topic: &str) -> u32 {
        self.partitions.get(topic).copied().unwrap_or(1)
    }

    /// Raw value of a live (unexpired) entry, in the store's encoding (decode it with
    /// [`crate::cache::decode`]).
    pub fn get_bytes(&mut self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, ProcessError> {
        let now = self.now;
        self.cache.write_back_key(self.stores, store, key)?;
        let Some(stored) = self.stores.store(store)?.get(key)? else { return Ok(None) };
        let (expires_at, value) = decode_value(key, &stored)?;
        Ok((expires_at == 0 || expires_at > now).then_some(value))
    }

    /// A stored value, decoded: kept decoded in the task's cache across records and
    /// commits, so a customer's document is parsed once, not once per event.
    pub fn get_json<T: DeserializeOwned + Serialize + Clone + Send + 'static>(
        &mut self,
        store: &str,
        key: &str,
    ) -> Result<Option<T>, ProcessError> {
        Ok(self.cache.get(self.stores, store, key.as_bytes(), self.now)?)
    }

    /// `f` of a stored value, borrowed from the task's cache: for a reader that only
    /// looks (a snapshot built from the cached document, not from a copy of it).
    pub fn read_json<T: DeserializeOwned + Serialize + Send + 'static, R>(
        &mut self,
        store: &str,
        key: &str,
        f: impl FnOnce(&T) -> R,
    ) -> Result<Option<R>, ProcessError> {
        Ok(self.cache.read(self.stores, store, key.as_bytes(), self.now, f)?)
    }

    pub fn put_bytes(
        &mut self,
        store: &str,
        key: &[u8],
        value: &[u8],
        expires_at: Option<i64>,
    ) -> Result<(), ProcessError> {
        self.cache.forget(store, key);
        let expires_at = expires_at.unwrap_or(0);
        self.stores.store(store)?.put(key, encode_value(expires_at, value))?;
        if expires_at > 0 {
            self.stores.store(EXPIRY_STORE)?.put(&expiry_index_key(expires_at, store, key), Vec::new())?;
        }
        Ok(())
    }

    /// Store a value; it stays decoded in the cache and is encoded once, when the task
    /// commits (or when something reads the store's bytes).
    pub fn put_json<T: Serialize + DeserializeOwned + Clone + Send + 'static>(
        &mut self,
        store: &str,
        key: &str,
        value: &T,
    ) -> Result<(), ProcessError> {
        self.put_json_owned(store, key, value.clone())
    }

    /// [`Ctx::put_json`] of a value the caller is done with: kept without a copy.
    pub fn put_json_owned<T: Serialize + DeserializeOwned + Send + 'static>(
        &mut self,
        store: &str,
        key: &str,
        value: T,
    ) -> Result<(), ProcessError> {
        Ok(self.cache.put(self.stores, store, key.as_bytes(), value)?)
    }

    /// Change a stored value in place in the task's cache (`default` when there is
    /// none): no copy of the document per event. For values stored without an expiry.
    pub fn update_json<T: DeserializeOwned + Serialize + Send + 'static, R>(
        &mut self,
        store: &str,
        key: &str,
        default: impl FnOnce() -> T,
        f: impl FnOnce(&mut T) -> R,
    ) -> Result<R, ProcessError> {
        Ok(self.cache.update(self.stores, store, key.as_bytes(), default, f)?)
    }

    /// Store a value that disappears at `expires_at` (event or wall time, as `now`).
    pub fn put_json_expiring<T: Serialize>(
        &mut self,
        store: &str,
        key: &str,
        value: &T,
        expires_at: i64,
    ) -> Result<(), ProcessError> {
        let bytes =
            crate::cache::encode(value).map_err(|message| ProcessError::Encode { what: store.to_owned(), message })?;
        self.put_bytes(store, key.as_bytes(), &bytes, Some(expires_at))
    }

    pub fn delete(&mut self, store: &str, key: &str) -> Result<(), ProcessError> {
        self.cache.forget(store, key.as_bytes());
        self.stores.store(store)?.delete(key.as_bytes())?;
        Ok(())
    }

    /// Live entries whose key starts with `prefix` and sorts after `after` (from the
    /// first when `None`), in key order: a cursor over a large store.
    pub fn scan_after(
        &mut self,
        store: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, ProcessError> {
        let from = match after {
            // The smallest key greater than `after`.
            Some(after) => [after.as_bytes(), &[0u8]].concat(),
            None => prefix.as_bytes().to_vec(),
        };
        let now = self.now;
        self.cache.write_back_store(self.stores, store)?;
        let rows = self.stores.store(store)?.range(&from, &prefix_end(prefix.as_bytes()), limit)?;
        let mut out = Vec::with_capacity(rows.len());
        for (k, stored) in rows {
            let (expires_at, value) = decode_value(&k, &stored)?;
            if expires_at == 0 || expires_at > now {
                out.push((String::from_utf8_lossy(&k).into_owned(), value));
            }
        }
        Ok(out)
    }

    /// Live entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix(
        &mut self,
        store: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, ProcessError> {
        self.scan_after(store, prefix, None, limit)
    }

    pub fn emit_json<T: Serialize>(&mut self, topic: &str, key: &str, value: &T) -> Result<(), ProcessError> {
        let bytes = to_json_bytes(value, topic)?;
        self.emit(topic, key.as_bytes(), Some(bytes), None);
        Ok(())
    }

    pub fn emit_tombstone(&mut self, topic: &str, key: &str) {
        self.emit(topic, key.as_bytes(), None, None);
    }

    pub fn emit(&mut self, topic: &str, key: &[u8], value: Option<Vec<u8>>, partition: Option<u32>) {
        self.outputs.push(Output { topic: topic.to_owned(), key: key.to_vec(), value, timestamp: self.now, partition });
    }

    /// Fire `on_timer(key, payload)` once `now >= at`. Timers live in a store, so they
    /// survive restarts and follow their partition on a rebalance.
    pub fn schedule(&mut self, at: i64, key: &[u8], payload: &[u8]) -> Result<(), ProcessError> {
        let timer_key = timer_key(at, key);
        self.stores.store(TIMERS_STORE)?.put(&timer_key, encode_value(0, payload))?;
        Ok(())
    }

    pub fn cancel(&mut self, at: i64, key: &[u8]) -> Result<(), ProcessError> {
        self.stores.store(TIMERS_STORE)?.delete(&timer_key(at, key))?;
        Ok(())
    }

    /// When timers of `key` are due, earliest first: a scan of this member's timers (for
    /// rare work such as an erasure, which must stop everything a key has scheduled).
    pub fn timers_for(&mut self, key: &[u8]) -> Result<Vec<i64>, ProcessError> {
        Ok(self.timers_where(|k| k == key)?.into_iter().map(|timer| timer.due).collect())
    }

    /// Every timer of this member whose key passes `keep`, earliest first. A scan of all
    /// the member's timers.
    pub fn timers_where(&mut self, mut keep: impl FnMut(&[u8]) -> bool) -> Result<Vec<Timer>, ProcessError> {
        let mut found = Vec::new();
        let mut from = vec![0u8; 8];
        let until = [0xffu8; 8].to_vec();
        loop {
            let rows = self.stores.store(TIMERS_STORE)?.range(&from, &until, 4096)?;
            let Some((last, _)) = rows.last() else { return Ok(found) };
            from = [last.as_slice(), &[0u8]].concat();
            for (k, stored) in rows {
                let Some(at) = k.get(..8).and_then(|h| <[u8; 8]>::try_from(h).ok()) else { continue };
                if keep(&k[8..]) {
                    let (_, payload) = decode_value(&k, &stored)?;
                    found.push(Timer { due: u64::from_be_bytes(at) as i64, key: k[8..].to_vec(), payload });
                }
            }
        }
    }

    /// Delete an entry stored with an expiry together with its [`EXPIRY_STORE`] index
    /// entry, which holds the key and would otherwise stay until it is due.
    pub fn delete_expiring(&mut self, store: &str, key: &[u8]) -> Result<bool, ProcessError> {
        self.cache.write_back_key(self.stores, store, key)?;
        let Some(stored) = self.stores.store(store)?.get(key)? else { return Ok(false) };
        if let Some(at) = crate::store::expiry_of(&stored).filter(|at| *at > 0) {
            self.stores.store(EXPIRY_STORE)?.delete(&expiry_index_key(at, store, key))?;
        }
        self.cache.forget(store, key);
        self.stores.store(store)?.delete(key)?;
        Ok(true)
    }

    pub fn count(&mut self, name: &'static str, label: impl Into<String>) {
        self.counters.push(Counter { name, label: label.into() });
    }

    /// The effect of an event that happened at `event_at` is now visible to readers
    /// once this step commits (feeds the end-to-end latency metric).
    pub fn mark_visible(&mut self, event_at: i64) {
        self.visible.push(event_at);
    }

    /// The expiry sweep: delete the entry if it has expired by now; true if it did.
    pub(crate) fn sweep_if_expired(&mut self, store: &str, key: &[u8]) -> Result<bool, ProcessError> {
        self.cache.write_back_key(self.stores, store, key)?;
        let expired = match self.stores.store(store)?.get(key)? {
            Some(stored) => {
                let (expires_at, _) = decode_value(key, &stored)?;
                expires_at != 0 && expires_at <= self.now
            }
            None => false,
        };
        if expired {
            self.cache.forget(store, key);
            self.stores.store(store)?.delete(key)?;
        }
        Ok(expired)
    }

    /// Write every decoded value this member changed to its stores (before a commit).
    pub(crate) fn write_back(&mut self) -> Result<usize, ProcessError> {
        Ok(self.cache.write_back(self.stores)?)
    }
}

pub(crate) fn timer_key(at: i64, key: &[u8]) -> Vec<u8> {
    let mut k = (at.max(0) as u64).to_be_bytes().to_vec();
    k.extend_from_slice(key);
    k
}

/// A value as JSON bytes for `what` (a topic), or the encode error naming it.
pub(crate) fn to_json_bytes<T: Serialize>(value: &T, what: &str) -> Result<Vec<u8>, ProcessError> {
    serde_json::to_vec(value).map_err(|e| ProcessError::Encode { what: what.to_owned(), message: e.to_string() })
}

/// One stage of the pipeline.
pub trait Processor: Send {
    /// Once per task, before its first record or punctuation (after a restart or a
    /// rebalance too): reconcile the stores with the topology, arm timers
    /// (Kafka Streams' `Processor::init`).
    fn init(&mut self, _ctx: &mut Ctx<'_>) -> Result<(), ProcessError> {
        Ok(())
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError>;

    /// A timer scheduled with [`Ctx::schedule`] is due.
    fn on_timer(&mut self, _ctx: &mut Ctx<'_>, _key: &[u8], _payload: &[u8]) -> Result<(), ProcessError> {
        Ok(())
    }

    /// An entry stored with an expiry has just been deleted by the sweep.
    fn on_expired(&mut self, _ctx: &mut Ctx<'_>, _store: &str, _key: &[u8]) -> Result<(), ProcessError> {
        Ok(())
    }

    /// Write to the stores what the processor keeps in memory between records (a
    /// write-behind cache, as Kafka Streams' record cache); called before every commit.
    /// A task whose transaction aborts is rebuilt, so a cache never outlives the
    /// writes it stands for.
    fn flush(&mut self, _ctx: &mut Ctx<'_>) -> Result<(), ProcessError> {
        Ok(())
    }
}
