//! The decoded-value cache is bounded by the heap its values take, measured with the
//! metered allocator the chorus binary installs.

use chorus_processors::cache::{encode, StateCache};
use chorus_processors::heap::{retained, Metered};
use chorus_processors::store::{encode_value, MemStoreSet};
use chorus_processors::StoreSet;
use std::alloc::System;

#[global_allocator]
static ALLOCATOR: Metered<System> = Metered(System);

/// A profile-like document: many short strings and numbers in JSON maps, which take
/// several times their encoded size once decoded.
fn doc(n: usize) -> serde_json::Value {
    let traits: serde_json::Map<String, serde_json::Value> =
        (0..24).map(|i| (format!("trait_{i}"), serde_json::json!(format!("value {n} {i}")))).collect();
    serde_json::json!({ "id": n, "traits": traits, "scores": [1.5, 2.5, n as f64] })
}

#[test]
fn the_cache_holds_no_more_heap_than_its_limit() {
    ALLOCATOR.install();
    let mut stores = MemStoreSet::with_stores(["s"]);
    let mut encoded = 0;
    for n in 0..4_000 {
        let bytes = encode(&doc(n)).unwrap();
        encoded += bytes.len();
        stores.store("s").unwrap().put(format!("k{n}").as_bytes(), encode_value(0, &bytes)).unwrap();
    }
    let limit = 512 << 10;
    assert!(encoded > 4 * limit, "the values do not all fit");
    let mut cache = StateCache::new(limit);
    let ((), heap) = retained(|| {
        for n in 0..4_000 {
            let key = format!("k{n}");
            let found = cache.read(&mut stores, "s", key.as_bytes(), 0, |d: &serde_json::Value| d["id"].as_u64());
            assert_eq!(found.unwrap(), Some(Some(n as u64)));
        }
    });
    let heap = heap.expect("the metered allocator is installed");
    assert!(cache.bytes() <= limit, "the cache's own measure: {} of {limit}", cache.bytes());
    // The entries' table and the allocator's bookkeeping come on top of the values.
    assert!(heap <= limit + limit / 2, "the cache holds {heap} bytes of heap with a limit of {limit}");
    assert!(cache.len() > 50, "it still caches: {} values", cache.len());
}

#[test]
fn retained_counts_what_a_closure_keeps_not_what_it_frees() {
    ALLOCATOR.install();
    let (kept, heap) = retained(|| {
        let _scratch = vec![0u8; 1 << 20];
        vec![0u8; 1000]
    });
    assert_eq!(kept.len(), 1000);
    assert_eq!(heap, Some(1000));
}

#[test]
fn values_put_new_are_measured_at_their_first_write_back() {
    ALLOCATOR.install();
    let mut stores = MemStoreSet::with_stores(["s"]);
    // The store already holds values of the same sizes, so writing back to it takes no
    // more heap: what the closure keeps is the cache's.
    for n in 0..4_000 {
        let bytes = encode_value(0, &encode(&doc(n)).unwrap());
        stores.store("s").unwrap().put(format!("k{n}").as_bytes(), bytes).unwrap();
    }
    let limit = 512 << 10;
    let mut cache = StateCache::new(limit);
    let ((), heap) = retained(|| {
        for n in 0..4_000 {
            cache.put(&mut stores, "s", format!("k{n}").as_bytes(), doc(n)).unwrap();
            if n % 50 == 49 {
                // A commit.
                cache.write_back(&mut stores).unwrap();
            }
        }
    });
    let heap = heap.expect("the metered allocator is installed");
    assert!(heap <= limit + limit / 2, "the cache holds {heap} bytes of heap with a limit of {limit}");
    assert!(cache.len() > 50, "it still caches: {} values", cache.len());
}
