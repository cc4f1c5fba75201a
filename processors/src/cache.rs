//! Decoded store values kept between records and between commits, per task member (the
//! typed cousin of Kafka Streams' record cache). A customer's profile is decoded once,
//! changed in place across all of that customer's events, and encoded once per commit,
//! into the store and so into its changelog.
//!
//! The cache sits in front of the task's stores and is their only writer for the values
//! it holds: a dirty value is written back before any byte-level read, scan or commit
//! of its store, so every other path sees it. The cache is bounded by the heap its
//! values take decoded (several times their encoded size: maps, strings, boxed JSON),
//! measured when a value is decoded ([`crate::heap::retained`]) and scaled with its
//! encoded size as it changes; clean values are evicted oldest first, dirty ones written
//! back first. Without the metered allocator (unit tests) the encoded size stands in.
//!
//! Stored values use a compact, versioned binary encoding (a version byte, then
//! MessagePack with field names, so `serde_json::Value` fields and `#[serde(flatten)]`
//! round-trip). Values written before it (JSON) still decode.

use crate::heap;
use crate::store::{decode_value, encode_value, StoreError, StoreSet};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::any::Any;
use std::collections::{BTreeSet, HashMap};

/// First byte of a value in the binary encoding; JSON never starts with it.
const BINARY_V1: u8 = 0x01;

/// Encode a store value (the bytes under the expiry header).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    let mut out = vec![BINARY_V1];
    rmp_serde::encode::write_named(&mut out, value).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Decode a store value written by [`encode`] or, before it, as JSON.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.first() {
        Some(&BINARY_V1) => rmp_serde::from_slice(&bytes[1..]).map_err(|e| e.to_string()),
        Some(v) if *v > BINARY_V1 && *v < b' ' => Err(format!("unknown store encoding version {v}")),
        _ => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
    }
}

/// A decoded value the cache can hand back by type and encode when written back.
trait CachedValue: Send {
    fn encode(&self) -> Result<Vec<u8>, String>;
    /// Decoded bytes per encoded byte, for a value of this type encoded as `encoded`
    /// (`None` without the metered allocator).
    fn measure(&self, encoded: &[u8]) -> Option<f32>;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<T: Serialize + DeserializeOwned + Send + 'static> CachedValue for T {
    fn encode(&self) -> Result<Vec<u8>, String> {
        encode(self)
    }
    fn measure(&self, encoded: &[u8]) -> Option<f32> {
        if !heap::metered() {
            return None;
        }
        decode_measured::<T>(b"", encoded).ok().and_then(|(_, ratio)| ratio)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

struct Entry {
    value: Box<dyn CachedValue>,
    /// Not yet written to the store.
    dirty: bool,
    /// Estimated memory the entry takes: its decoded value, key and bookkeeping. The
    /// cache's measure of the entry.
    bytes: usize,
    /// Decoded bytes per encoded byte of this value, measured when it was decoded
    /// (`None`: not yet, for a value put new until its first write-back).
    ratio: Option<f32>,
    last_used: u64,
}

/// Assumed encoded size of a value put before it was ever encoded.
const NEW_VALUE_BYTES: usize = 512;

/// Memory an entry of `encoded` bytes takes, at `ratio` decoded bytes per encoded one.
fn entry_bytes(key: &[u8], encoded: usize, ratio: Option<f32>) -> usize {
    (encoded as f64 * f64::from(ratio.unwrap_or(1.0))) as usize + key.len() + std::mem::size_of::<Entry>()
}

/// Decode `bytes` as `T`, with the decoded-to-encoded size ratio measured by the
/// metered allocator (`None` without it).
fn decode_measured<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<(T, Option<f32>), StoreError> {
    let (value, heap) = heap::retained(|| decode::<T>(bytes));
    let value = value.map_err(|e| corrupt(key, e))?;
    let ratio = heap.map(|heap| (heap + std::mem::size_of::<T>()) as f32 / bytes.len().max(1) as f32);
    Ok((value, ratio))
}

/// The decoded values of one member's stores.
pub struct StateCache {
    /// Store name → key → value: looked up by `&str` and `&[u8]`, without allocating.
    entries: HashMap<String, HashMap<Vec<u8>, Entry>>,
    /// Dirty keys per store, so a scan writes back only its own store.
    dirty: HashMap<String, BTreeSet<Vec<u8>>>,
    /// Per store, the size ratio last measured: the estimate for new values.
    ratios: HashMap<String, f32>,
    bytes: usize,
    len: usize,
    limit: usize,
    clock: u64,
}

impl StateCache {
    /// A cache holding about `limit` bytes of decoded values; 0 caches nothing beyond
    /// the current step.
    pub fn new(limit: usize) -> StateCache {
        StateCache {
            entries: HashMap::new(),
            dirty: HashMap::new(),
            ratios: HashMap::new(),
            bytes: 0,
            len: 0,
            limit,
            clock: 0,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Estimated memory held by the cached values.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn entry(&self, store: &str, key: &[u8]) -> Option<&Entry> {
        self.entries.get(store)?.get(key)
    }

    fn entry_mut(&mut self, store: &str, key: &[u8]) -> Option<&mut Entry> {
        self.entries.get_mut(store)?.get_mut(key)
    }

    /// The live value under `key`, decoded as `T`: from the cache, or read from the
    /// store (and kept). Values stored with an expiry are not cached.
    pub fn get<T: DeserializeOwned + Serialize + Clone + Send + 'static>(
        &mut self,
        stores: &mut dyn StoreSet,
        store: &str,
        key: &[u8],
        now: i64,
    ) -> Result<Option<T>, StoreError> {
        self.read(stores, store, key, now, T::clone)
    }

    /// `f` of the live value under `key`, borrowed from the cache (loaded into it
    /// first when needed): what a reader that only looks needs, without a copy.
    pub fn read<T: DeserializeOwned + Serialize + Send + 'static, R>(
        &mut self,
        stores: &mut dyn StoreSet,
        store: &str,
        key: &[u8],
        now: i64,
        f: impl FnOnce(&T) -> R,
    ) -> Result<Option<R>, StoreError> {
        self.clock += 1;
        let used = self.clock;
        if let Some(entry) = self.entry_mut(store, key) {
            entry.last_used = used;
            if let Some(value) = entry.value.as_any().downcast_ref::<T>() {
                return Ok(Some(f(value)));
            }
            // Stored as another type (a stage reading state generically): convert.
            let bytes = entry.value.encode().map_err(|e| corrupt(key, e))?;
            let value: T = decode(&bytes).map_err(|e| corrupt(key, e))?;
            return Ok(Some(f(&value)));
        }
        let Some(stored) = stores.store(store)?.get(key)? else { return Ok(None) };
        let (expires_at, bytes) = decode_value(key, &stored)?;
        if expires_at != 0 {
            // Expiring values are read through, never kept: the sweep deletes them below.
            if expires_at <= now {
                return Ok(None);
            }
            let value: T = decode(&bytes).map_err(|e| corrupt(key, e))?;
            return Ok(Some(f(&value)));
        }
        let (value, ratio) = decode_measured::<T>(key, &bytes)?;
        let result = f(&value);
        self.keep_decoded(stores, store, key, Box::new(value), false, (bytes.len(), ratio))?;
        Ok(Some(result))
    }

    /// The cached value under `key`, encoded, for a reader outside the task; `None` when
    /// the cache does not hold it (the store has what there is).
    pub fn peek_encoded(&self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.entry(store, key) {
            Some(entry) => entry.value.encode().map(Some).map_err(|e| corrupt(key, e)),
            None => Ok(None),
        }
    }

    /// Keep `value` under `key`; it reaches the store at the next write-back.
    pub fn put<T: Serialize + DeserializeOwned + Send + 'static>(
        &mut self,
        stores: &mut dyn StoreSet,
        store: &str,
        key: &[u8],
        value: T,
    ) -> Result<(), StoreError> {
        let (bytes, ratio) = match self.entry(store, key) {
            Some(e) => (e.bytes, e.ratio),
            // Measured at its first write-back; until then, like the store's last value.
            None => (entry_bytes(key, NEW_VALUE_BYTES, self.ratios.get(store).copied()), None),
        };
        self.insert(store, key, Box::new(value), true, bytes, ratio);
        self.evict(stores)
    }

    /// Change the value under `key` in place (`default` when there is none) and keep
    /// it; it reaches the store at the next write-back. For values stored without an
    /// expiry (those are the ones the cache keeps).
    pub fn update<T: DeserializeOwned + Serialize + Send + 'static, R>(
        &mut self,
        stores: &mut dyn StoreSet,
        store: &str,
        key: &[u8],
        default: impl FnOnce() -> T,
        f: impl FnOnce(&mut T) -> R,
    ) -> Result<R, StoreError> {
        self.clock += 1;
        let used = self.clock;
        if let Some(entry) = self.entry_mut(store, key) {
            if let Some(value) = entry.value.as_any_mut().downcast_mut::<T>() {
                entry.last_used = used;
                entry.dirty = true;
                let result = f(value);
                self.mark_dirty(store, key);
                return Ok(result);
            }
        }
        // The value to change, with its encoded size and ratio when decoded from the store.
        let (mut value, decoded) = match self.entry(store, key) {
            // Cached as another type (a stage reading state generically): convert.
            Some(entry) => {
                (decode(&entry.value.encode().map_err(|e| corrupt(key, e))?).map_err(|e| corrupt(key, e))?, None)
            }
            None => match stores.store(store)?.get(key)? {
                None => (default(), None),
                Some(stored) => match decode_value(key, &stored)? {
                    (0, bytes) => {
                        let (value, ratio) = decode_measured(key, &bytes)?;
                        (value, Some((bytes.len(), ratio)))
                    }
                    (_, _) => return Err(corrupt(key, "an expiring value cannot be updated in place".into())),
                },
            },
        };
        let result = f(&mut value);
        match decoded {
            Some(decoded) => self.keep_decoded(stores, store, key, Box::new(value), true, decoded)?,
            None => self.put(stores, store, key, value)?,
        }
        Ok(result)
    }

    /// Keep a value just decoded from the store: `(encoded, ratio)` are the size of its
    /// bytes there and its measured size ratio.
    fn keep_decoded(
        &mut self,
        stores: &mut dyn StoreSet,
        store: &str,
        key: &[u8],
        value: Box<dyn CachedValue>,
        dirty: bool,
        (encoded, ratio): (usize, Option<f32>),
    ) -> Result<(), StoreError> {
        let ratio = learn(&mut self.ratios, store, ratio);
        self.insert(store, key, value, dirty, entry_bytes(key, encoded, ratio), ratio);
        self.evict(stores)
    }

    fn mark_dirty(&mut self, store: &str, key: &[u8]) {
        let keys = match self.dirty.get_mut(store) {
            Some(keys) => keys,
            None => self.dirty.entry(store.to_owned()).or_default(),
        };
        if !keys.contains(key) {
            keys.insert(key.to_vec());
        }
    }

    fn insert(
        &mut self,
        store: &str,
        key: &[u8],
        value: Box<dyn CachedValue>,
        dirty: bool,
        bytes: usize,
        ratio: Option<f32>,
    ) {
        self.clock += 1;
        let entry = Entry { value, dirty, bytes, ratio, last_used: self.clock };
        let values = match self.entries.get_mut(store) {
            Some(values) => values,
            None => self.entries.entry(store.to_owned()).or_default(),
        };
        let old = match values.get_mut(key) {
            Some(slot) => Some(std::mem::replace(slot, entry)),
            None => {
                values.insert(key.to_vec(), entry);
                None
            }
        };
        match old {
            Some(old) => self.bytes -= old.bytes,
            None => self.len += 1,
        }
        self.bytes += bytes;
        if dirty {
            self.mark_dirty(store, key);
        }
    }

    /// Forget `key` (it is about to be written or deleted below the cache). A dirty
    /// value is dropped: the caller's write supersedes it.
    pub fn forget(&mut self, store: &str, key: &[u8]) {
        let Some(old) = self.entries.get_mut(store).and_then(|values| values.remove(key)) else { return };
        self.bytes -= old.bytes;
        self.len -= 1;
        if old.dirty {
            if let Some(keys) = self.dirty.get_mut(store) {
                keys.remove(key);
            }
        }
    }

    /// Write `key`'s dirty value to the store now (before a byte-level read of it).
    pub fn write_back_key(&mut self, stores: &mut dyn StoreSet, store: &str, key: &[u8]) -> Result<(), StoreError> {
        let dirty = self.dirty.get_mut(store).is_some_and(|keys| keys.remove(key));
        if dirty {
            self.write_entry(stores, store, key)?;
        }
        Ok(())
    }

    /// Write every dirty value of `store` (before a scan of it).
    pub fn write_back_store(&mut self, stores: &mut dyn StoreSet, store: &str) -> Result<(), StoreError> {
        let keys = self.dirty.remove(store).unwrap_or_default();
        for key in keys {
            self.write_entry(stores, store, &key)?;
        }
        Ok(())
    }

    /// Write every dirty value (before a commit). Returns how many were written.
    pub fn write_back(&mut self, stores: &mut dyn StoreSet) -> Result<usize, StoreError> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut n = 0;
        for (store, keys) in dirty {
            for key in keys {
                self.write_entry(stores, &store, &key)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn write_entry(&mut self, stores: &mut dyn StoreSet, store: &str, key: &[u8]) -> Result<(), StoreError> {
        let Some(entry) = self.entries.get_mut(store).and_then(|values| values.get_mut(key)) else { return Ok(()) };
        let bytes = entry.value.encode().map_err(|e| corrupt(key, e))?;
        if entry.ratio.is_none() {
            // A value put new: measured once, from what was just encoded.
            entry.ratio = learn(&mut self.ratios, store, entry.value.measure(&bytes));
        }
        let measure = entry_bytes(key, bytes.len(), entry.ratio);
        self.bytes = self.bytes - entry.bytes + measure;
        entry.bytes = measure;
        entry.dirty = false;
        stores.store(store)?.put(key, encode_value(0, &bytes))
    }

    /// Keep the cache within its limit: oldest entries go first, dirty ones written
    /// back before they go.
    fn evict(&mut self, stores: &mut dyn StoreSet) -> Result<(), StoreError> {
        if self.bytes <= self.limit {
            return Ok(());
        }
        // Evict down to three quarters of the limit at once, so the sort is amortised.
        let target = self.limit / 4 * 3;
        let mut by_age: Vec<(u64, String, Vec<u8>)> = self
            .entries
            .iter()
            .flat_map(|(s, values)| values.iter().map(move |(k, e)| (e.last_used, s.clone(), k.clone())))
            .collect();
        by_age.sort_unstable();
        for (_, store, key) in by_age {
            if self.bytes <= target {
                break;
            }
            self.write_back_key(stores, &store, &key)?;
            self.forget(&store, &key);
        }
        Ok(())
    }
}

/// Remember `store`'s latest measured size `ratio` in `ratios`, the estimate for its
/// values put new; returns `ratio`.
fn learn(ratios: &mut HashMap<String, f32>, store: &str, ratio: Option<f32>) -> Option<f32> {
    let measured = ratio?;
    match ratios.get_mut(store) {
        Some(r) => *r = measured,
        None => {
            ratios.insert(store.to_owned(), measured);
        }
    }
    ratio
}

fn corrupt(key: &[u8], message: String) -> StoreError {
    StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStoreSet;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Doc {
        n: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        extra: serde_json::Value,
    }

    fn doc(n: u32) -> Doc {
        Doc { n, note: None, extra: serde_json::json!({"a": [1, 2.5, "x"], "b": null}) }
    }

    #[test]
    fn values_round_trip_through_the_binary_encoding_and_json_still_decodes() {
        let bytes = encode(&doc(3)).unwrap();
        assert_eq!(bytes[0], BINARY_V1);
        assert_eq!(decode::<Doc>(&bytes).unwrap(), doc(3));
        let json = serde_json::to_vec(&doc(4)).unwrap();
        assert_eq!(decode::<Doc>(&json).unwrap(), doc(4));
        assert!(decode::<Doc>(&[0x07, 1, 2]).is_err());
    }

    #[test]
    fn a_value_is_written_once_per_write_back_whatever_the_number_of_puts() {
        let mut stores = MemStoreSet::with_stores(["s"]);
        let mut cache = StateCache::new(1 << 20);
        for n in 0..10 {
            cache.put(&mut stores, "s", b"k", doc(n)).unwrap();
        }
        assert!(stores.stores["s"].entries().is_empty(), "nothing written before the write-back");
        assert_eq!(cache.get::<Doc>(&mut stores, "s", b"k", 0).unwrap(), Some(doc(9)));
        assert_eq!(cache.write_back(&mut stores).unwrap(), 1);
        assert_eq!(cache.write_back(&mut stores).unwrap(), 0, "clean values are not written again");
        let stored = stores.store("s").unwrap().get(b"k").unwrap().unwrap();
        let (_, bytes) = decode_value(b"k", &stored).unwrap();
        assert_eq!(decode::<Doc>(&bytes).unwrap(), doc(9));
    }

    #[test]
    fn an_update_in_place_is_written_back_and_an_expiring_value_is_refused() {
        let mut stores = MemStoreSet::with_stores(["s"]);
        let mut cache = StateCache::new(1 << 20);
        let n = cache.update(
            &mut stores,
            "s",
            b"k",
            || doc(1),
            |d: &mut Doc| {
                d.n += 1;
                d.n
            },
        );
        assert_eq!(n.unwrap(), 2, "the default, changed");
        cache.write_back(&mut stores).unwrap();
        cache.update(&mut stores, "s", b"k", || doc(0), |d: &mut Doc| d.n = 7).unwrap();
        assert_eq!(cache.write_back(&mut stores).unwrap(), 1, "changed in place, so dirty again");
        let mut fresh = StateCache::new(1 << 20);
        assert_eq!(fresh.get::<Doc>(&mut stores, "s", b"k", 0).unwrap(), Some(doc(7)));
        // Not cached: loaded from the store, changed, kept.
        let mut cold = StateCache::new(1 << 20);
        cold.update(&mut stores, "s", b"k", || doc(0), |d: &mut Doc| d.n += 1).unwrap();
        assert_eq!(cold.get::<Doc>(&mut stores, "s", b"k", 0).unwrap(), Some(doc(8)));
        stores.store("s").unwrap().put(b"e", encode_value(99, &encode(&doc(5)).unwrap())).unwrap();
        assert!(cold.update(&mut stores, "s", b"e", || doc(0), |d: &mut Doc| d.n += 1).is_err());
    }

    #[test]
    fn eviction_keeps_the_limit_and_loses_no_write() {
        let mut stores = MemStoreSet::with_stores(["s"]);
        let mut cache = StateCache::new(8 * NEW_VALUE_BYTES);
        for n in 0..100u32 {
            cache.put(&mut stores, "s", format!("k{n}").as_bytes(), doc(n)).unwrap();
            assert!(cache.bytes() <= 8 * NEW_VALUE_BYTES);
        }
        cache.write_back(&mut stores).unwrap();
        for n in 0..100u32 {
            assert_eq!(cache.get::<Doc>(&mut stores, "s", format!("k{n}").as_bytes(), 0).unwrap(), Some(doc(n)));
        }
    }

    #[test]
    fn a_borrowing_read_sees_the_live_value_and_keeps_what_it_loaded() {
        let mut stores = MemStoreSet::with_stores(["s"]);
        let mut cache = StateCache::new(1 << 20);
        cache.put(&mut stores, "s", b"k", doc(1)).unwrap();
        assert_eq!(cache.read(&mut stores, "s", b"k", 0, |d: &Doc| d.n).unwrap(), Some(1));
        assert_eq!(cache.read(&mut stores, "s", b"other", 0, |d: &Doc| d.n).unwrap(), None);
        cache.write_back(&mut stores).unwrap();
        let mut fresh = StateCache::new(1 << 20);
        assert_eq!(fresh.read(&mut stores, "s", b"k", 0, |d: &Doc| d.n).unwrap(), Some(1));
        assert_eq!(fresh.len(), 1, "a value read from the store stays decoded");
        fresh.forget("s", b"k");
        assert!(fresh.is_empty());
        assert_eq!(fresh.bytes(), 0);
    }

    #[test]
    fn a_value_read_as_another_type_is_converted() {
        let mut stores = MemStoreSet::with_stores(["s"]);
        let mut cache = StateCache::new(1 << 20);
        cache.put(&mut stores, "s", b"k", doc(1)).unwrap();
        let generic: serde_json::Value = cache.get(&mut stores, "s", b"k", 0).unwrap().unwrap();
        assert_eq!(generic["n"], 1);
    }
}
