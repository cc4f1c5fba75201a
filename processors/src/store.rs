//! The key-value store contract processors use, and the in-memory implementation the
//! TestDriver runs on. The runtime implements the same trait over RocksDB (crate
//! `chorus-state`), so a processor never knows which one it has.
//!
//! Every stored value carries an 8-byte big-endian expiry header (0 = never). Expired
//! entries read as absent at once and are deleted by the task's expiry sweep, which is
//! what puts their tombstones on the changelog.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store `{0}` is not declared by this processor")]
    Undeclared(String),
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error("stored value under {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
}

/// Key-value pairs in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// A sorted byte-key store of one task.
pub trait Store {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn put(&mut self, key: &[u8], value: Vec<u8>) -> Result<(), StoreError>;
    fn delete(&mut self, key: &[u8]) -> Result<(), StoreError>;
    /// Entries with `from <= key < to`, in key order, at most `limit`.
    fn range(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Entries, StoreError>;
    /// Number of entries (may be an estimate for large on-disk stores).
    fn approximate_len(&self) -> u64;
}

/// The named stores of one task.
pub trait StoreSet {
    fn store(&mut self, name: &str) -> Result<&mut dyn Store, StoreError>;
}

/// An in-memory sorted store.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MemStore {
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn entries(&self) -> &BTreeMap<Vec<u8>, Vec<u8>> {
        &self.entries
    }
}

impl Store for MemStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.entries.get(key).cloned())
    }

    fn put(&mut self, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
        self.entries.insert(key.to_vec(), value);
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.entries.remove(key);
        Ok(())
    }

    fn range(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Entries, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(self.entries.range(from.to_vec()..to.to_vec()).take(limit).map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn approximate_len(&self) -> u64 {
        self.entries.len() as u64
    }
}

/// Named in-memory stores of one task.
#[derive(Debug, Default, Clone)]
pub struct MemStoreSet {
    pub stores: BTreeMap<String, MemStore>,
}

impl MemStoreSet {
    pub fn with_stores<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        MemStoreSet { stores: names.into_iter().map(|n| (n.to_owned(), MemStore::new())).collect() }
    }
}

impl StoreSet for MemStoreSet {
    fn store(&mut self, name: &str) -> Result<&mut dyn Store, StoreError> {
        self.stores.get_mut(name).map(|s| s as &mut dyn Store).ok_or_else(|| StoreError::Undeclared(name.to_owned()))
    }
}

/// Header + value; `expires_at` 0 means the entry never expires.
pub fn encode_value(expires_at: i64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&(expires_at.max(0) as u64).to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// (expires_at, value) of a stored entry.
pub fn decode_value(key: &[u8], stored: &[u8]) -> Result<(i64, Vec<u8>), StoreError> {
    if stored.len() < 8 {
        return Err(StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            message: "shorter than its 8-byte expiry header".into(),
        });
    }
    let mut header = [0u8; 8];
    header.copy_from_slice(&stored[..8]);
    Ok((u64::from_be_bytes(header) as i64, stored[8..].to_vec()))
}

/// The expiry (0 = never) of a stored value, read from its header without copying it;
/// `None` when the value is too short to have one.
pub fn expiry_of(stored: &[u8]) -> Option<i64> {
    let header: [u8; 8] = stored.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(header) as i64)
}

/// The smallest key greater than every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_is_half_open_and_ordered() {
        let mut s = MemStore::new();
        for k in ["a1", "a2", "b1", "a3"] {
            s.put(k.as_bytes(), k.as_bytes().to_vec()).unwrap();
        }
        let got: Vec<_> = s.range(b"a", &prefix_end(b"a"), 10).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(got, vec![b"a1".to_vec(), b"a2".to_vec(), b"a3".to_vec()]);
        assert_eq!(s.range(b"a", &prefix_end(b"a"), 2).unwrap().len(), 2);
        s.delete(b"a2").unwrap();
        assert_eq!(s.get(b"a2").unwrap(), None);
        assert_eq!(s.approximate_len(), 3);
    }

    #[test]
    fn value_header_round_trips() {
        let v = encode_value(1234, b"hello");
        assert_eq!(decode_value(b"k", &v).unwrap(), (1234, b"hello".to_vec()));
        assert!(decode_value(b"k", b"abc").is_err());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
