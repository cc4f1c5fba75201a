//! Helpers shared by the processors' integration tests.

use std::collections::BTreeMap;

/// Union-find root of `x` (with path compression): the oracle's component of `x`.
pub fn find(parent: &mut BTreeMap<String, String>, x: &str) -> String {
    let p = parent.get(x).cloned().unwrap_or_else(|| x.to_owned());
    if p == x {
        return p;
    }
    let root = find(parent, &p);
    parent.insert(x.to_owned(), root.clone());
    root
}
