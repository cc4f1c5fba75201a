//! Task state on RocksDB. One RocksDB instance per task (processor × partition) with a
//! column family per store, so that all of a task's store writes and its changelog
//! checkpoint land in one atomic write batch. Writes made while processing stay in an
//! in-memory overlay ([`TaskState`]) until the Kafka transaction carrying their
//! changelog records commits; only then are they applied. Local RocksDB is therefore
//! never ahead of the changelog, and restoring from the checkpoint to the end of the
//! changelog always converges, after a clean stop or a crash.

mod db;
mod live;
mod overlay;

pub use chorus_processors::store::{MemStore, MemStoreSet};
pub use db::{changelog_topic, scan_all, Durability, SharedResources, StateError, TaskDb, CHECKPOINT_CF};
pub use live::{LiveStore, MemberState};
pub use overlay::{StoreWrite, TaskState};
