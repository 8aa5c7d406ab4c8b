//! The store's catalog: per table, the hot buffer and the Parquet files.
//!
//! A flush moves rows from the buffer to files in one step under the lock,
//! so a query snapshot sees each row exactly once: either hot or in a file.

use std::sync::{Arc, Mutex, OnceLock, RwLock};

use object_store::path::Path;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use lumen_core::schema::{REQUESTS, ROLLUPS, TABLES, table_schema};

use crate::buffer::{Chunk, TableBuffer};
use crate::health::Health;
use crate::rollup::Rollups;
use crate::storage::Storage;

/// A Parquet file the collector wrote, and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct FileMeta {
    /// Where it is in the store ([`Store::storage`]).
    pub location: Path,
    pub rows: u64,
    pub bytes: u64,
    /// Time range of its rows, microseconds since the epoch (UTC).
    pub min_time: i64,
    pub max_time: i64,
    /// Last WAL segment whose rows it holds.
    pub segment: u64,
    /// Names of the files of its partition it took the place of (a
    /// compacted file's); while they are still there, they are not read.
    pub replaces: Vec<String>,
}

/// The files a query planned with, held until the query ends: a file that
/// compaction or retention took out of the catalog is deleted only once no
/// query holds it (see [`crate::compact`]). One per query, as a DataFusion
/// session extension.
#[derive(Debug, Default)]
pub struct FileHolds(Mutex<Vec<Arc<FileMeta>>>);

impl FileHolds {
    pub fn hold(&self, files: &[Arc<FileMeta>]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(files.iter().cloned());
    }
}

/// A consistent view of one table for one query.
#[derive(Debug, Clone)]
pub struct TableSnapshot {
    pub schema: SchemaRef,
    pub hot: Vec<Chunk>,
    pub files: Vec<Arc<FileMeta>>,
}

/// Row and file counts of one table, for status and progress reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableStats {
    pub table: &'static str,
    pub hot_rows: usize,
    pub hot_bytes: usize,
    pub files: usize,
    pub file_rows: u64,
    pub file_bytes: u64,
    /// Rows and bytes of other collectors' files in a shared store.
    pub other_rows: u64,
    pub other_bytes: u64,
}

#[derive(Debug)]
struct TableState {
    buffer: TableBuffer,
    /// This collector's files, which it compacts and expires.
    files: Vec<Arc<FileMeta>>,
    /// Other collectors' files in a shared store, as last listed; read only.
    others: Vec<Arc<FileMeta>>,
}

/// Catalog of every table; cheap to share (`Arc<Store>`).
#[derive(Debug)]
pub struct Store {
    tables: RwLock<Vec<TableState>>,
    /// Hot rows of `rollups`: aggregates of the hot `requests` rows, kept
    /// as they are committed. Locked after `tables`, never before.
    rollups: Mutex<Rollups>,
    /// Trouble of the writers (WAL, flush) that readers of the store report.
    health: Health,
    /// The collector's own metrics, counted by every stage.
    metrics: crate::metrics::CollectorMetrics,
    /// The last WAL segment whose rows are durably in files (the WAL
    /// checkpoint). Files of later segments are not durable yet: a restart
    /// deletes them and replays their rows, so compaction leaves them be.
    checkpoint: std::sync::atomic::AtomicU64,
    /// Where the files are; the local filesystem until set.
    storage: OnceLock<Arc<Storage>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

/// Position of a table in [`TABLES`].
pub fn table_index(table: &str) -> Option<usize> {
    TABLES.iter().position(|t| *t == table)
}

impl Store {
    pub fn new() -> Self {
        let tables = TABLES
            .iter()
            .map(|t| TableState {
                buffer: TableBuffer::new(table_schema(t).expect("every table has a schema")),
                files: Vec::new(),
                others: Vec::new(),
            })
            .collect();
        Store {
            tables: RwLock::new(tables),
            rollups: Mutex::default(),
            health: Health::default(),
            metrics: crate::metrics::CollectorMetrics::new(),
            checkpoint: std::sync::atomic::AtomicU64::new(0),
            storage: OnceLock::new(),
        }
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Where the files of the catalog are.
    pub fn storage(&self) -> Arc<Storage> {
        self.storage
            .get_or_init(|| Arc::new(Storage::filesystem()))
            .clone()
    }

    /// Sets where files are, once, before any file is added.
    pub(crate) fn set_storage(&self, storage: Arc<Storage>) {
        let _ = self.storage.set(storage);
    }

    pub fn metrics(&self) -> &crate::metrics::CollectorMetrics {
        &self.metrics
    }

    /// The WAL checkpoint as last written.
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn set_checkpoint(&self, segment: u64) {
        self.checkpoint
            .fetch_max(segment, std::sync::atomic::Ordering::AcqRel);
    }

    /// OpenMetrics text of the collector's metrics, tables' sizes included.
    pub fn encode_metrics(&self) -> String {
        self.metrics.encode(&self.stats())
    }

    /// Memory held by hot rows of all tables.
    pub fn hot_bytes(&self) -> usize {
        self.read().iter().map(|t| t.buffer.bytes()).sum()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<TableState>> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.tables.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<TableState>> {
        self.tables.write().unwrap_or_else(|e| e.into_inner())
    }

    fn rollups(&self) -> std::sync::MutexGuard<'_, Rollups> {
        self.rollups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hot `rollups` rows (segments up to `segment`), as one chunk.
    fn rollup_chunks(&self, segment: u64) -> Vec<RecordBatch> {
        match self.rollups().batch_through(segment) {
            Ok(b) => b.into_iter().collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot build rollup rows");
                Vec::new()
            }
        }
    }

    /// Names of the tables, in a stable order.
    pub fn table_names(&self) -> &'static [&'static str] {
        &TABLES
    }

    pub fn snapshot(&self, table: &str) -> Option<TableSnapshot> {
        let i = table_index(table)?;
        let tables = self.read();
        let t = &tables[i];
        let hot = if table == ROLLUPS {
            self.rollup_chunks(u64::MAX)
                .into_iter()
                .map(|b| Chunk::new(0, b))
                .collect()
        } else {
            t.buffer.chunks().cloned().collect()
        };
        Some(TableSnapshot {
            schema: table_schema(table)?,
            hot,
            files: t.files.iter().chain(&t.others).cloned().collect(),
        })
    }

    pub fn stats(&self) -> Vec<TableStats> {
        let tables = self.read();
        TABLES
            .iter()
            .zip(tables.iter())
            .map(|(name, t)| TableStats {
                table: name,
                hot_rows: if *name == ROLLUPS {
                    self.rollups().len()
                } else {
                    t.buffer.rows()
                },
                hot_bytes: t.buffer.bytes(),
                files: t.files.len(),
                file_rows: t.files.iter().map(|f| f.rows).sum(),
                file_bytes: t.files.iter().map(|f| f.bytes).sum(),
                other_rows: t.others.iter().map(|f| f.rows).sum(),
                other_bytes: t.others.iter().map(|f| f.bytes).sum(),
            })
            .collect()
    }

    pub(crate) fn insert(&self, segment: u64, table: usize, batch: RecordBatch) {
        let mut tables = self.write();
        if TABLES[table] == REQUESTS {
            let mut rollups = self.rollups();
            if let Err(e) = rollups.add(segment, &batch) {
                tracing::error!(error = %e, "cannot roll up a requests batch");
            }
            for (label, requests) in rollups.take_folded() {
                self.metrics.folded(label, requests);
            }
        }
        tables[table].buffer.insert(segment, batch);
    }

    pub(crate) fn add_files(&self, files: Vec<(usize, FileMeta)>) {
        let mut tables = self.write();
        for (t, f) in files {
            tables[t].files.push(Arc::new(f));
        }
    }

    /// Reads the live tier: calls `f` for every key's counts in each second
    /// from `from` (Unix seconds) on. Returns the first second from which
    /// the tier holds every committed row; earlier ones are for the
    /// rollups to answer.
    pub fn live_visit(
        &self,
        from: i64,
        f: impl FnMut(i64, crate::live::LiveKey<'_>, &crate::live::Counts),
    ) -> i64 {
        let rollups = self.rollups();
        rollups.live_visit(from, f);
        rollups.live().complete_from()
    }

    /// Rows before `second` may be only in files: the live tier does not
    /// answer for them.
    pub(crate) fn live_whole_from(&self, second: i64) {
        self.rollups().live_mut().whole_from(second);
    }

    /// First second from which the live tier is whole.
    pub fn live_complete_from(&self) -> i64 {
        self.rollups().live().complete_from()
    }

    /// Distinct values each rollup label keeps per hour before the rest
    /// are folded into `other`.
    pub fn set_rollup_max_values(&self, n: usize) {
        self.rollups().set_max_values(n);
    }

    /// The files of one table now.
    pub fn files_of(&self, table: usize) -> Vec<Arc<FileMeta>> {
        self.read()
            .get(table)
            .map(|t| t.files.clone())
            .unwrap_or_default()
    }

    /// Swaps `old` files for `new` in one step, for queries; refuses (and
    /// changes nothing) unless every old file is still in the catalog.
    pub(crate) fn replace_files(&self, table: usize, old: &[Path], new: FileMeta) -> bool {
        let mut tables = self.write();
        let files = &mut tables[table].files;
        if !old.iter().all(|p| files.iter().any(|f| &f.location == p)) {
            return false;
        }
        files.retain(|f| !old.contains(&f.location));
        files.push(Arc::new(new));
        true
    }

    /// Takes files out of the catalog; returns how many were in it.
    pub(crate) fn remove_files(&self, table: usize, locations: &[Path]) -> usize {
        let mut tables = self.write();
        let files = &mut tables[table].files;
        let before = files.len();
        files.retain(|f| !locations.contains(&f.location));
        before - files.len()
    }

    /// Other collectors' files, per table, as just listed.
    pub(crate) fn set_others(&self, per_table: Vec<Vec<Arc<FileMeta>>>) {
        let mut tables = self.write();
        for (t, others) in tables.iter_mut().zip(per_table) {
            t.others = others;
        }
    }

    /// Other collectors' files of one table, as last listed.
    pub fn others_of(&self, table: usize) -> Vec<Arc<FileMeta>> {
        self.read()
            .get(table)
            .map(|t| t.others.clone())
            .unwrap_or_default()
    }

    /// Hot batches of segments up to `segment`, per table, for a flush.
    pub(crate) fn batches_through(&self, segment: u64) -> Vec<Vec<RecordBatch>> {
        let tables = self.read();
        TABLES
            .iter()
            .zip(tables.iter())
            .map(|(name, t)| {
                if *name == ROLLUPS {
                    self.rollup_chunks(segment)
                } else {
                    t.buffer.batches_through(segment)
                }
            })
            .collect()
    }

    /// Publishes flushed files and drops the rows they hold from the buffer,
    /// atomically for queries.
    pub(crate) fn commit_flush(&self, segment: u64, files: Vec<(usize, FileMeta)>) {
        let mut tables = self.write();
        for (t, f) in files {
            tables[t].files.push(Arc::new(f));
        }
        for t in tables.iter_mut() {
            t.buffer.remove_through(segment);
        }
        self.rollups().remove_through(segment);
    }
}
