//! Time as processors hold it: milliseconds since the epoch, written out as RFC 3339,
//! and "latest time per key" maps (when a customer last did something).

use std::collections::BTreeMap;

/// `ms` as RFC 3339 (`2026-11-25T10:30:00Z`); empty when out of range.
pub fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| t.to_string()).unwrap_or_default()
}

/// Remember `at` for `key` unless a later time is already known; true when it changed.
pub fn keep_latest<K: Ord>(map: &mut BTreeMap<K, i64>, key: K, at: i64) -> bool {
    let last = map.entry(key).or_insert(i64::MIN);
    let changed = at > *last;
    *last = (*last).max(at);
    changed
}
