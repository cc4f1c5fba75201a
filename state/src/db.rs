//! The RocksDB instance of one task: open with shared memory limits, read, apply a
//! committed batch together with changelog checkpoints, restore from the changelog.

use chorus_processors::store::Entries;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteBufferManager,
    WriteOptions, DB,
};
use std::collections::BTreeMap;
use std::path::Path;

/// Column family holding `changelog topic` → next offset to restore from.
pub const CHECKPOINT_CF: &str = "__checkpoint";
/// Key of [`CHECKPOINT_CF`] holding when the checkpoints were last written (no topic
/// name starts with `__`).
const WRITTEN_AT_KEY: &[u8] = b"__written_at";

fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("rocksdb at {path}: {source}")]
    Rocks { path: String, source: rocksdb::Error },
    #[error("store `{0}` does not exist in this task")]
    UnknownStore(String),
    #[error("corrupt checkpoint for {0}")]
    CorruptCheckpoint(String),
}

/// The compacted changelog topic of a store.
pub fn changelog_topic(processor: &str, store: &str) -> String {
    format!("chorus-{processor}-{}-changelog", store.trim_start_matches('_'))
}

/// Memory shared by every task of the process: one block cache, and one budget for all
/// memtables (charged to the cache, so the two together stay within the limit).
pub struct SharedResources {
    cache: Cache,
    write_buffers: WriteBufferManager,
    wal: bool,
}

/// What a task's local state must survive on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The changelogs are durable (a Kafka cluster): as in Kafka Streams, RocksDB
    /// writes no write-ahead log. A crash loses what was not yet flushed to SST files,
    /// all column families together (atomic flush), checkpoints included, so the
    /// store is an older consistent state and the restore replays the changelog from
    /// there.
    Changelog,
    /// The changelogs do not outlive the process (the embedded broker): the local
    /// store is the only copy, so every write goes through RocksDB's write-ahead log.
    Local,
}

impl SharedResources {
    pub fn new(block_cache_bytes: usize, write_buffer_bytes: usize, durability: Durability) -> SharedResources {
        let cache = Cache::new_lru_cache(block_cache_bytes + write_buffer_bytes);
        let write_buffers =
            WriteBufferManager::new_write_buffer_manager_with_cache(write_buffer_bytes, false, cache.clone());
        SharedResources { cache, write_buffers, wal: durability == Durability::Local }
    }

    fn options(&self) -> Options {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_write_buffer_manager(&self.write_buffers);
        // The write buffer manager charges every memtable for the arena blocks it has
        // allocated. At RocksDB's default (1 MiB) a task's few hundred small
        // memtables (one per store and task, most holding a few KiB between commits)
        // claim more than the whole budget, and the manager flushes without pause:
        // thousands of tiny SST files and compactions a minute, which took more CPU
        // than the processors. Small blocks charge what is really held.
        opts.set_arena_block_size(64 << 10);
        opts.set_max_log_file_size(1 << 20);
        opts.set_max_background_jobs(2);
        // LZ4 where data is young and rewritten soon; zstd in the last level, where
        // most of it rests (RocksDB's advice): profiles and contexts are JSON-like
        // text, which zstd packs about a third smaller than LZ4.
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_bottommost_compression_type(rocksdb::DBCompressionType::Zstd);
        opts.set_keep_log_file_num(2);
        opts.set_max_open_files(256);
        // Without a write-ahead log, the column families (and the checkpoints among
        // them) must reach SST files together.
        opts.set_atomic_flush(!self.wal);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&self.cache);
        table.set_cache_index_and_filter_blocks(true);
        table.set_bloom_filter(10.0, false);
        // At a million customers (ten million dedupe keys) whole-file filter blocks of
        // several MB did not stay in the cache: every get read and checksummed one from
        // the file again, most of identity's CPU. Partitioned filters and indexes load
        // only the small partition a key needs; the top level and L0's stay pinned.
        table.set_partition_filters(true);
        table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
        table.set_pin_top_level_index_and_filter(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        opts.set_block_based_table_factory(&table);
        opts
    }
}

/// Visit every entry of every column family of the task database at `path`, opened
/// read-only (the task may not be running): what an audit reads to prove a subject is
/// gone. Deleted entries are not visited (their bytes leave the files at compaction).
pub fn scan_all(path: &Path, mut visit: impl FnMut(&str, &[u8], &[u8])) -> Result<(), StateError> {
    let display = path.display().to_string();
    let rocks = |source| StateError::Rocks { path: display.clone(), source };
    let opts = Options::default();
    let names = DB::list_cf(&opts, path).map_err(rocks)?;
    let db = DB::open_cf_for_read_only(&opts, path, &names, false).map_err(rocks)?;
    for name in &names {
        let cf = db.cf_handle(name).ok_or_else(|| StateError::UnknownStore(name.clone()))?;
        for entry in db.iterator_cf(cf, IteratorMode::Start) {
            let (key, value) = entry.map_err(rocks)?;
            visit(name, &key, &value);
        }
    }
    Ok(())
}

pub struct TaskDb {
    db: DB,
    path: String,
    stores: Vec<String>,
    writes: WriteOptions,
}

impl TaskDb {
    /// Open (or create) the task's database with a column family per store.
    pub fn open(path: &Path, stores: &[&str], shared: &SharedResources) -> Result<TaskDb, StateError> {
        let opts = shared.options();
        let mut cfs: Vec<ColumnFamilyDescriptor> =
            stores.iter().map(|s| ColumnFamilyDescriptor::new(*s, shared.options())).collect();
        cfs.push(ColumnFamilyDescriptor::new(CHECKPOINT_CF, shared.options()));
        let display = path.display().to_string();
        let db = DB::open_cf_descriptors(&opts, path, cfs)
            .map_err(|source| StateError::Rocks { path: display.clone(), source })?;
        let mut names: Vec<String> = stores.iter().map(|s| s.to_string()).collect();
        names.push(CHECKPOINT_CF.to_owned());
        let mut writes = WriteOptions::default();
        writes.disable_wal(!shared.wal);
        Ok(TaskDb { db, path: display, stores: names, writes })
    }

    fn rocks(&self, source: rocksdb::Error) -> StateError {
        StateError::Rocks { path: self.path.clone(), source }
    }

    fn cf(&self, store: &str) -> Result<&rocksdb::ColumnFamily, StateError> {
        self.db.cf_handle(store).ok_or_else(|| StateError::UnknownStore(store.to_owned()))
    }

    pub fn get(&self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        self.db.get_cf(self.cf(store)?, key).map_err(|e| self.rocks(e))
    }

    /// Entries with `from <= key < to`, in order, at most `limit`.
    pub fn range(&self, store: &str, from: &[u8], to: &[u8], limit: usize) -> Result<Entries, StateError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(store)?, IteratorMode::From(from, Direction::Forward)) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            if &*k >= to || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    pub fn approximate_len(&self, store: &str) -> u64 {
        self.cf(store)
            .ok()
            .and_then(|cf| self.db.property_int_value_cf(cf, "rocksdb.estimate-num-keys").ok().flatten())
            .unwrap_or(0)
    }

    /// Approximate bytes a store holds (live data in SST files plus memtables).
    pub fn approximate_bytes(&self, store: &str) -> u64 {
        let Ok(cf) = self.cf(store) else { return 0 };
        ["rocksdb.estimate-live-data-size", "rocksdb.cur-size-all-mem-tables"]
            .iter()
            .filter_map(|p| self.db.property_int_value_cf(cf, *p).ok().flatten())
            .sum()
    }

    /// Apply committed writes and the changelog offsets they reached, atomically.
    pub fn apply(&self, writes: &[crate::StoreWrite], checkpoints: &BTreeMap<String, i64>) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        for w in writes {
            let cf = self.cf(&w.store)?;
            match &w.value {
                Some(v) => batch.put_cf(cf, &w.key, v),
                None => batch.delete_cf(cf, &w.key),
            }
        }
        let checkpoint_cf = self.cf(CHECKPOINT_CF)?;
        for (topic, next) in checkpoints {
            batch.put_cf(checkpoint_cf, topic.as_bytes(), next.to_be_bytes());
        }
        if !checkpoints.is_empty() {
            batch.put_cf(checkpoint_cf, WRITTEN_AT_KEY, wall_ms().to_be_bytes());
        }
        self.db.write_opt(batch, &self.writes).map_err(|e| self.rocks(e))
    }

    /// When a checkpoint was last written (wall clock, ms), if ever. A store whose
    /// checkpoint is older than its changelog's `delete.retention.ms` may have missed
    /// tombstones that compaction has since removed: it must be rebuilt, not resumed.
    pub fn checkpoint_written_at(&self) -> Result<Option<i64>, StateError> {
        let Some(bytes) = self.db.get_cf(self.cf(CHECKPOINT_CF)?, WRITTEN_AT_KEY).map_err(|e| self.rocks(e))? else {
            return Ok(None);
        };
        let arr: [u8; 8] =
            bytes.as_slice().try_into().map_err(|_| StateError::CorruptCheckpoint("written_at".to_owned()))?;
        Ok(Some(i64::from_be_bytes(arr)))
    }

    /// Remove every entry of a store (its changelog no longer matches it).
    pub fn clear_store(&self, store: &str) -> Result<(), StateError> {
        let cf = self.cf(store)?;
        let mut batch = WriteBatch::default();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, _) = item.map_err(|e| self.rocks(e))?;
            batch.delete_cf(cf, k);
        }
        self.db.write_opt(batch, &self.writes).map_err(|e| self.rocks(e))
    }

    /// Next changelog offset to restore from (0 when never checkpointed).
    pub fn checkpoint(&self, changelog: &str) -> Result<i64, StateError> {
        match self.db.get_cf(self.cf(CHECKPOINT_CF)?, changelog.as_bytes()).map_err(|e| self.rocks(e))? {
            None => Ok(0),
            Some(bytes) => {
                let arr: [u8; 8] =
                    bytes.as_slice().try_into().map_err(|_| StateError::CorruptCheckpoint(changelog.to_owned()))?;
                Ok(i64::from_be_bytes(arr))
            }
        }
    }

    /// Flush memtables to disk (clean shutdown: the next start reads SST files only).
    pub fn flush(&self) -> Result<(), StateError> {
        for store in &self.stores {
            self.db.flush_cf(self.cf(store)?).map_err(|e| self.rocks(e))?;
        }
        Ok(())
    }

    /// Compact every store into one sorted run, dropping overwritten versions and
    /// deletes: the space the state needs at rest, for measuring.
    pub fn compact(&self) -> Result<(), StateError> {
        self.flush()?;
        for store in &self.stores {
            self.db.compact_range_cf(self.cf(store)?, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}
