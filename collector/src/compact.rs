//! Housekeeping of the Parquet files: compaction and retention.
//!
//! **Compaction** merges the small files flushes leave in one partition
//! (table, date, hour) into one larger file sorted by time. The new file
//! names the files it replaces in its own metadata (`lumen.replaces`), is
//! written as `*.tmp`, fsynced and renamed, and only then swapped into the
//! catalog in one step, so a query sees either the old files or the new one
//! and never both. A crash at any point leaves either no new file (the tmp
//! is removed on start) or a complete one whose replaced files are removed
//! on start (see [`crate::persist::load_files`]): rows are kept exactly once.
//!
//! **Retention** drops files whose rows are all older than their table's
//! retention, which removes whole hour partitions.
//!
//! Files leaving the catalog are deleted once no query holds them
//! ([`crate::store::FileHolds`]), so a running query can still read them; in
//! a shared store, also not before the delete grace, which the queries of
//! other collectors (which list this one's files now and then) need.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use arrow::array::AsArray;
use arrow::buffer::ScalarBuffer;
use arrow::compute::{concat_batches, interleave_record_batch, sort_to_indices, take_record_batch};
use arrow::datatypes::{SchemaRef, TimestampMicrosecondType};
use arrow::record_batch::RecordBatch;
use lumen_core::schema::{
    LOGS, METRICS, POLICY_EVENTS, REQUESTS, ROLLUPS, SPANS, TABLES, table_schema,
};
use object_store::path::Path;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use tokio::sync::watch;

use crate::persist::{self, PersistError};
use crate::storage::Storage;
use crate::store::{FileMeta, Store};

/// When partitions are compacted.
#[derive(Debug, Clone)]
pub struct CompactionPolicy {
    /// How often partitions are looked at; zero turns compaction off.
    pub interval: Duration,
    /// While its hour is still being written, this many files of a
    /// partition of about one size are merged into one (flushes' files
    /// with each other, merged files with merged files of their size).
    pub min_files: usize,
    /// Once its hour is over by this much, a partition with two or more
    /// small files is compacted.
    pub settle: Duration,
    /// Most rows one compacted file holds (and one compaction reads into
    /// memory); files half this large are left alone.
    pub max_rows: u64,
    /// Most Parquet bytes one compaction reads (it holds them while it
    /// merges).
    pub max_bytes: u64,
    /// Most files one compaction merges: each file being read holds a
    /// zstd context per column (a merge of 16 files of `requests` held
    /// 170 MiB in them), so an hour's final merge of hundreds of flushes'
    /// files (compaction was off, or behind) goes in rounds instead.
    pub max_files: usize,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            interval: Duration::from_secs(300),
            min_files: 8,
            settle: Duration::from_secs(600),
            max_rows: 4_000_000,
            max_bytes: 64 << 20,
            max_files: 16,
        }
    }
}

/// How long each table's rows are kept; `None` keeps them forever.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    per_table: Vec<Option<Duration>>,
}

const DAY: Duration = Duration::from_secs(24 * 3600);

impl Default for Retention {
    fn default() -> Self {
        let mut r = Retention {
            per_table: vec![None; TABLES.len()],
        };
        for (table, days) in [
            (REQUESTS, 7),
            (SPANS, 7),
            (LOGS, 7),
            (METRICS, 30),
            (ROLLUPS, 90),
            (POLICY_EVENTS, 90),
        ] {
            r.set(table, Some(DAY * days)).expect("known table");
        }
        r
    }
}

impl Retention {
    /// Sets one table's retention; an unknown table is an error naming the
    /// known ones.
    pub fn set(&mut self, table: &str, keep: Option<Duration>) -> Result<(), String> {
        let i = crate::store::table_index(table)
            .ok_or_else(|| format!("unknown table `{table}`; tables are {}", TABLES.join(", ")))?;
        self.per_table[i] = keep;
        Ok(())
    }

    pub fn of(&self, table: usize) -> Option<Duration> {
        self.per_table.get(table).copied().flatten()
    }
}

/// Compaction and retention over one store.
#[derive(Debug, Clone)]
pub struct Housekeeper {
    pub(crate) storage: Arc<Storage>,
    pub(crate) store: Arc<Store>,
    pub compaction: CompactionPolicy,
    pub retention: Retention,
    /// Files out of the catalog since when, deleted once no query holds
    /// them and the store's delete grace is over.
    graveyard: Arc<std::sync::Mutex<Vec<Buried>>>,
}

/// A file out of the catalog, and since when.
type Buried = (Arc<FileMeta>, Instant);

/// What one compaction did.
#[derive(Debug, Clone, PartialEq)]
pub struct Compacted {
    pub table: &'static str,
    pub partition: String,
    pub files: usize,
    pub rows: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

impl Housekeeper {
    pub fn new(storage: Arc<Storage>, store: Arc<Store>) -> Self {
        Housekeeper {
            storage,
            store,
            compaction: CompactionPolicy::default(),
            retention: Retention::default(),
            graveyard: Arc::default(),
        }
    }

    /// Compacts every partition that is due, one at a time; returns what
    /// was done. A partition that fails is logged and left as it was.
    pub async fn compact(&self, now: SystemTime) -> Vec<Compacted> {
        self.compact_until(now, None).await
    }

    /// As [`Self::compact`], stopping between partitions once `stop` is true.
    async fn compact_until(
        &self,
        now: SystemTime,
        stop: Option<&watch::Receiver<bool>>,
    ) -> Vec<Compacted> {
        let mut done = Vec::new();
        for (table, group) in self.due(now) {
            if stop.is_some_and(|s| *s.borrow()) {
                break;
            }
            let result = self.compact_group(table, &group).await;
            // The group's hold on its files goes before the sweep below.
            drop(group);
            match result {
                Ok(Some(c)) => {
                    tracing::info!(
                        table = c.table,
                        partition = %c.partition,
                        files = c.files,
                        rows = c.rows,
                        bytes_before = c.bytes_before,
                        bytes_after = c.bytes_after,
                        "compacted partition"
                    );
                    self.store.metrics().compacted(true, c.files);
                    done.push(c);
                    // Replaced files no query reads go at once (in a store
                    // of its own), so readers of the directory (DuckDB,
                    // Spark) see each row once.
                    self.sweep(false).await;
                }
                Ok(None) => {}
                Err(e) => {
                    self.store.metrics().compacted(false, 0);
                    tracing::error!(error = %e, "compaction failed; the partition's files stay as they were");
                }
            }
        }
        done
    }

    /// Groups of small files to merge: per partition, oldest first, each
    /// group within `max_rows`. While its hour is written, a partition's
    /// files of about one size are merged once `min_files` of them are
    /// there; once the hour is over, all of them.
    fn due(&self, now: SystemTime) -> Vec<(usize, Vec<Arc<FileMeta>>)> {
        let policy = &self.compaction;
        let now_us = micros(now);
        // A file past the WAL checkpoint is not durable yet: if the process
        // died now, a restart would delete it and replay its rows — and a
        // merged file holding it (and older files' rows) with it.
        let durable = self.store.checkpoint();
        let mut out = Vec::new();
        for (t, _) in TABLES.iter().enumerate() {
            let mut partitions: BTreeMap<Path, Vec<Arc<FileMeta>>> = BTreeMap::new();
            for f in self.store.files_of(t) {
                // Large files stay; so do files another tool wrote (no
                // time range of ours): they are not ours to rewrite.
                if f.rows >= policy.max_rows / 2
                    || f.bytes >= policy.max_bytes / 2
                    || f.segment > durable
                    || f.min_time == i64::MIN
                    || f.max_time == i64::MAX
                {
                    continue;
                }
                partitions
                    .entry(persist::partition_of(&f.location))
                    .or_default()
                    .push(f);
            }
            for (_, files) in partitions {
                let hour_over = files
                    .iter()
                    .map(|f| f.max_time)
                    .max()
                    .map(|t| t.div_euclid(HOUR_US) * HOUR_US + HOUR_US)
                    .is_some_and(|end| now_us - end >= policy.settle.as_micros() as i64);
                let tiers = if hour_over {
                    vec![files]
                } else {
                    similar_in_size(files, policy)
                };
                for mut files in tiers {
                    if files.len() < 2 {
                        continue;
                    }
                    files.sort_by_key(|f| (f.min_time, f.segment));
                    let mut group = Vec::new();
                    let (mut rows, mut bytes) = (0, 0);
                    for f in files {
                        if (rows + f.rows > policy.max_rows
                            || bytes + f.bytes > policy.max_bytes
                            || group.len() >= policy.max_files)
                            && group.len() >= 2
                        {
                            out.push((t, std::mem::take(&mut group)));
                            (rows, bytes) = (0, 0);
                        }
                        rows += f.rows;
                        bytes += f.bytes;
                        group.push(f);
                    }
                    if group.len() >= 2 {
                        out.push((t, group));
                    }
                }
            }
        }
        out
    }

    /// Merges `group` (files of one partition) into one file and swaps it
    /// into the catalog.
    async fn compact_group(
        &self,
        table: usize,
        group: &[Arc<FileMeta>],
    ) -> Result<Option<Compacted>, PersistError> {
        let name = TABLES[table];
        let Some(partition) = group.first().map(|f| persist::partition_of(&f.location)) else {
            return Ok(None);
        };
        let mut contents = Vec::with_capacity(group.len());
        for f in group {
            contents.push(self.storage.get(&f.location).await?);
        }
        let files = group.to_vec();
        let at = partition.clone();
        let url = self.storage.url_of(&partition);
        let storage = self.storage.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut attempted = Vec::new();
            let merged = merge(&storage, name, &at, &files, contents, &mut attempted);
            // The merge freed far more than it keeps, much of it on this
            // thread: the allocator would hold it (mimalloc's arena kept
            // 700 MiB resident for 50 MiB live after a large merge).
            lumen_core::process::release_free_memory();
            merged.map_err(|e| (e, attempted))
        })
        .await
        .map_err(|e| PersistError::Write {
            path: url.clone(),
            message: e.to_string(),
        })?;
        let merged = match written {
            Ok(merged) => merged,
            Err((e, attempted)) => {
                // A store may have taken a write it reported as failed: a
                // merged file left behind would count its rows twice beside
                // the next merge of the same files.
                for location in attempted {
                    if let Err(e) = self.storage.delete(&location).await {
                        tracing::warn!(error = %e, "cannot delete the file of a failed compaction");
                    }
                }
                return Err(e);
            }
        };
        let bytes_after = merged.bytes;
        let rows = merged.rows;
        let location = merged.location.clone();
        let old: Vec<Path> = group.iter().map(|f| f.location.clone()).collect();
        if !self.store.replace_files(table, &old, merged) {
            // The catalog changed under us (retention took a file): the
            // merged file must not be loaded beside what is left.
            let _ = self.storage.delete(&location).await;
            return Ok(None);
        }
        self.bury(group.to_vec());
        Ok(Some(Compacted {
            table: name,
            partition: url,
            files: group.len(),
            rows,
            bytes_before: group.iter().map(|f| f.bytes).sum(),
            bytes_after,
        }))
    }

    /// Takes files older than their table's retention out of the catalog
    /// (their deletion follows after the grace period); returns how many.
    pub fn expire(&self, now: SystemTime) -> usize {
        let now_us = micros(now);
        let mut expired = 0;
        for (t, name) in TABLES.iter().enumerate() {
            let Some(keep) = self.retention.of(t) else {
                continue;
            };
            let cutoff = now_us - keep.as_micros() as i64;
            let old: Vec<Arc<FileMeta>> = self
                .store
                .files_of(t)
                .into_iter()
                .filter(|f| f.max_time < cutoff)
                .collect();
            if old.is_empty() {
                continue;
            }
            let locations: Vec<Path> = old.iter().map(|f| f.location.clone()).collect();
            let removed = self.store.remove_files(t, &locations);
            let bytes: u64 = old.iter().map(|f| f.bytes).sum();
            tracing::info!(
                table = name,
                files = removed,
                bytes,
                retention = %humantime(keep),
                "dropped partitions past retention"
            );
            self.store.metrics().expired(removed, bytes);
            expired += removed;
            self.bury(old);
        }
        expired
    }

    fn bury(&self, files: Vec<Arc<FileMeta>>) {
        let mut graveyard = self.graveyard.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        graveyard.extend(files.into_iter().map(|f| (f, now)));
    }

    /// Deletes files out of the catalog that no query holds any more and
    /// whose delete grace is over (all of them with `all`), and partition
    /// directories left empty.
    pub async fn sweep(&self, all: bool) -> usize {
        let grace = self.storage.delete_grace();
        self.sweep_where(|f, since| all || (Arc::strong_count(f) == 1 && since.elapsed() >= grace))
            .await
    }

    async fn sweep_where(&self, due: impl Fn(&Arc<FileMeta>, Instant) -> bool) -> usize {
        let due: Vec<Arc<FileMeta>> = {
            let mut graveyard = self.graveyard.lock().unwrap_or_else(|e| e.into_inner());
            let (due, keep): (Vec<_>, Vec<_>) =
                graveyard.drain(..).partition(|(f, since)| due(f, *since));
            *graveyard = keep;
            due.into_iter().map(|(f, _)| f).collect()
        };
        let mut deleted = 0;
        for file in due {
            match self.storage.delete(&file.location).await {
                Ok(()) => deleted += 1,
                Err(e) => {
                    // Tried again at the next sweep: left in the store, its
                    // rows would count twice for other readers.
                    tracing::warn!(error = %e, "cannot delete a file out of the catalog");
                    self.graveyard
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((file, Instant::now()));
                }
            }
        }
        deleted
    }

    /// Compacts and expires every `compaction.interval` until `shutdown`.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        if self.compaction.interval.is_zero()
            && self.retention.per_table.iter().all(Option::is_none)
        {
            return;
        }
        let period = if self.compaction.interval.is_zero() {
            Duration::from_secs(300)
        } else {
            self.compaction.interval
        };
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
            let now = SystemTime::now();
            self.expire(now);
            if !self.compaction.interval.is_zero() {
                self.compact_until(now, Some(&shutdown)).await;
            }
            self.sweep(false).await;
        }
        // Files out of the catalog would outlive the process in a shared
        // store (until the next start) and be read twice by readers of the
        // bucket; another collector's query still reading one fails, which
        // a stop may cost.
        self.sweep_where(|f, _| Arc::strong_count(f) == 1).await;
    }
}

const HOUR_US: i64 = 3_600_000_000;

/// The files of a partition whose hour is still written, in tiers of about
/// one size — within twice the tier's smallest, and every file under
/// `max_rows / 256` in the first — keeping tiers of `min_files` or more.
///
/// Flushes' files are merged with each other and merged files with merged
/// files of their size, so a row is rewritten about
/// log_min_files(rows an hour / rows a flush) times while its hour lasts,
/// and once more when it is over. Merging each flush's files into the
/// hour's one large file instead read the whole hour at every compaction:
/// the work and the memory of each grew with the hour's age (the soak's
/// memory peaks grew with it).
fn similar_in_size(
    mut files: Vec<Arc<FileMeta>>,
    policy: &CompactionPolicy,
) -> Vec<Vec<Arc<FileMeta>>> {
    let small = policy.max_rows / 256;
    files.sort_by_key(|f| f.rows);
    let mut tiers: Vec<Vec<Arc<FileMeta>>> = Vec::new();
    let mut smallest: u64 = 0;
    for f in files {
        match tiers.last_mut() {
            Some(tier) if f.rows <= small.max(smallest.saturating_mul(2)) => tier.push(f),
            _ => {
                smallest = f.rows;
                tiers.push(vec![f]);
            }
        }
    }
    tiers.retain(|t| t.len() >= policy.min_files.max(2));
    tiers
}

/// Reads a group's files, merges their rows in time order and writes them
/// as one file replacing them all (from a blocking thread).
///
/// Every file a collector writes is sorted by time, so the files are merged
/// as they are read, holding one batch of each: reading a whole group,
/// concatenating and sorting it took ten times its Parquet bytes (the
/// hour's final merge was the soak's peak, near 1 GiB). A file found out of
/// time order (another writer's) sends the group to a sort in memory.
fn merge(
    storage: &Storage,
    name: &'static str,
    partition: &Path,
    group: &[Arc<FileMeta>],
    contents: Vec<bytes::Bytes>,
    attempted: &mut Vec<Path>,
) -> Result<FileMeta, PersistError> {
    let schema = table_schema(name).expect("every table has a schema");
    let segment = group.iter().map(|f| f.segment).max().unwrap_or(0);
    // What the group's files replaced too: one of those may still be
    // there (a query held it, or its deletion failed) after the file that
    // named it is gone, and must not count again beside the new file.
    let mut replaces: Vec<String> = group
        .iter()
        .flat_map(|f| {
            f.location
                .filename()
                .map(str::to_owned)
                .into_iter()
                .chain(f.replaces.iter().cloned())
        })
        .collect();
    replaces.sort();
    replaces.dedup();
    let want: u64 = group.iter().map(|f| f.rows).sum();
    let read_rows = (MERGE_HELD_ROWS / group.len().max(1)).clamp(64, MERGE_BATCH_ROWS);
    let mut merging = SortedMerge::open(
        &schema,
        group,
        contents.clone(),
        read_rows,
        MERGE_BATCH_ROWS,
    )?;
    let batches = || {
        let batch = merging.next_batch()?;
        if batch.is_none() && merging.rows != want {
            return Err(format!(
                "the files hold {} rows but their metadata says {want}; leaving them as they are",
                merging.rows
            ));
        }
        Ok(batch)
    };
    let merged = persist::write_batches(
        storage,
        partition,
        segment,
        schema.clone(),
        &replaces,
        attempted,
        batches,
    );
    if !merging.unsorted {
        return merged;
    }
    tracing::info!(partition = %partition, "a file is not sorted by time; sorting the group in memory");
    let sorted =
        sort_in_memory(&schema, group, contents, want).map_err(|message| PersistError::Write {
            path: partition.to_string(),
            message,
        })?;
    persist::write_file(storage, partition, segment, &sorted, &replaces, attempted)
}

/// Rows in each batch a merge writes, and most it reads from one file.
const MERGE_BATCH_ROWS: usize = 8 * 1024;

/// Rows a merge holds read from its files together, a batch of each (a
/// row of `requests` takes ~350 bytes decoded): with flushes' small files,
/// a batch of `MERGE_BATCH_ROWS` would be each file whole.
const MERGE_HELD_ROWS: usize = 64 * 1024;

/// Files each sorted by time, merged into batches sorted by time.
struct SortedMerge {
    schema: SchemaRef,
    inputs: Vec<Input>,
    /// The time of each input's next row (ties go to the earlier input,
    /// so rows of one time keep their files' order).
    heads: BinaryHeap<Reverse<(i64, usize)>>,
    batch_rows: usize,
    /// Rows yielded so far.
    rows: u64,
    /// An input's times went backwards: what was merged is out of order.
    unsorted: bool,
}

/// One file being merged: its reader and the batch read from it last.
struct Input {
    location: Path,
    reader: ParquetRecordBatchReader,
    batch: RecordBatch,
    times: ScalarBuffer<i64>,
    row: usize,
}

impl SortedMerge {
    fn open(
        schema: &SchemaRef,
        group: &[Arc<FileMeta>],
        contents: Vec<bytes::Bytes>,
        read_rows: usize,
        batch_rows: usize,
    ) -> Result<Self, PersistError> {
        let mut merge = SortedMerge {
            schema: schema.clone(),
            inputs: Vec::with_capacity(group.len()),
            heads: BinaryHeap::with_capacity(group.len()),
            batch_rows,
            rows: 0,
            unsorted: false,
        };
        for (f, data) in group.iter().zip(contents) {
            let mut input = Input::open(f, data, read_rows, schema)?;
            let i = merge.inputs.len();
            if input
                .advance(schema)
                .map_err(|message| PersistError::Read {
                    path: f.location.to_string(),
                    message,
                })?
            {
                merge.heads.push(Reverse((input.times[0], i)));
            }
            merge.inputs.push(input);
        }
        Ok(merge)
    }

    /// The next `batch_rows` rows in time order; `None` once all are out.
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, String> {
        // Picks point into `held`: each input's batch as it was when the
        // pick was made (an input may move to its next batch meanwhile).
        let mut held: Vec<RecordBatch> = self.inputs.iter().map(|i| i.batch.clone()).collect();
        let mut slot: Vec<usize> = (0..self.inputs.len()).collect();
        let mut picks = Vec::with_capacity(self.batch_rows);
        while picks.len() < self.batch_rows {
            let Some(Reverse((time, i))) = self.heads.pop() else {
                break;
            };
            let input = &mut self.inputs[i];
            picks.push((slot[i], input.row));
            input.row += 1;
            if input.row == input.times.len() {
                let more = input
                    .advance(&self.schema)
                    .map_err(|e| format!("reading {}: {e}", input.location))?;
                if !more {
                    continue;
                }
                slot[i] = held.len();
                held.push(input.batch.clone());
            }
            let next = input.times[input.row];
            if next < time {
                self.unsorted = true;
                return Err(format!("{} is not sorted by time", input.location));
            }
            self.heads.push(Reverse((next, i)));
        }
        if picks.is_empty() {
            return Ok(None);
        }
        self.rows += picks.len() as u64;
        let held: Vec<&RecordBatch> = held.iter().collect();
        interleave_record_batch(&held, &picks)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

impl Input {
    /// A reader of `f` (its bytes `data`) in batches of `rows`; nothing read
    /// yet.
    fn open(
        f: &FileMeta,
        data: bytes::Bytes,
        rows: usize,
        schema: &SchemaRef,
    ) -> Result<Input, PersistError> {
        let reader = ParquetRecordBatchReaderBuilder::try_new(data)
            .and_then(|b| b.with_batch_size(rows).build())
            .map_err(|e| PersistError::Read {
                path: f.location.to_string(),
                message: e.to_string(),
            })?;
        Ok(Input {
            location: f.location.clone(),
            reader,
            batch: RecordBatch::new_empty(schema.clone()),
            times: ScalarBuffer::from(Vec::new()),
            row: 0,
        })
    }

    /// Reads the next batch that has rows; false once there is none.
    fn advance(&mut self, schema: &SchemaRef) -> Result<bool, String> {
        for batch in self.reader.by_ref() {
            let batch = batch.map_err(|e| e.to_string())?;
            if batch.num_rows() == 0 {
                continue;
            }
            // Files keep the table's schema of their day; columns added
            // since read as null.
            self.batch = crate::ingest::conform::conform(schema, &batch)?;
            self.times = self
                .batch
                .column(0)
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or("the first column is not the time")?
                .values()
                .clone();
            self.row = 0;
            return Ok(true);
        }
        Ok(false)
    }
}

/// A group's rows sorted by time, all read into memory: for files not
/// sorted by time themselves.
fn sort_in_memory(
    schema: &SchemaRef,
    group: &[Arc<FileMeta>],
    contents: Vec<bytes::Bytes>,
    want: u64,
) -> Result<RecordBatch, String> {
    let mut batches: Vec<RecordBatch> = Vec::new();
    for (f, data) in group.iter().zip(contents) {
        let mut input = Input::open(f, data, 64 * 1024, schema).map_err(|e| e.to_string())?;
        while input
            .advance(schema)
            .map_err(|e| format!("reading {}: {e}", f.location))?
        {
            batches.push(input.batch.clone());
        }
    }
    let all = concat_batches(schema, &batches).map_err(|e| e.to_string())?;
    drop(batches);
    if all.num_rows() as u64 != want {
        return Err(format!(
            "the files hold {} rows but their metadata says {want}; leaving them as they are",
            all.num_rows()
        ));
    }
    let order = sort_to_indices(all.column(0), None, None).map_err(|e| e.to_string())?;
    take_record_batch(&all, &order).map_err(|e| e.to_string())
}

fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn humantime(d: Duration) -> String {
    let days = d.as_secs() / 86_400;
    if days > 0 && d.as_secs().is_multiple_of(86_400) {
        format!("{days}d")
    } else {
        format!("{}s", d.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(n: usize, rows: u64) -> Arc<FileMeta> {
        Arc::new(FileMeta {
            location: Path::from(format!("requests/date=2026-12-07/hour=14/part-{n}.parquet")),
            rows,
            bytes: rows * 20,
            min_time: n as i64,
            max_time: n as i64,
            segment: n as u64,
            replaces: Vec::new(),
        })
    }

    #[test]
    fn tiers_hold_files_of_about_one_size() {
        let policy = CompactionPolicy {
            min_files: 3,
            ..CompactionPolicy::default()
        };
        // Small files (under max_rows / 256) share the first tier whatever
        // their sizes; larger ones group within twice the smallest.
        let files = vec![
            file(1, 100),
            file(2, 9_000),
            file(3, 3_000),
            file(4, 40_000),
            file(5, 70_000),
            file(6, 50_000),
            file(7, 200_000),
            file(8, 300_000),
        ];
        let tiers = similar_in_size(files, &policy);
        let rows: Vec<Vec<u64>> = tiers
            .iter()
            .map(|t| t.iter().map(|f| f.rows).collect())
            .collect();
        assert_eq!(
            rows,
            vec![vec![100, 3_000, 9_000], vec![40_000, 50_000, 70_000]]
        );
    }

    /// An hour of flushes: each row is rewritten a few times, no merge
    /// reads more than a fraction of the hour, and the files stay few.
    #[test]
    fn an_hours_compactions_rewrite_each_row_a_few_times() {
        let policy = CompactionPolicy::default();
        let (flushes, per_flush) = (360, 3_700);
        let mut files: Vec<Arc<FileMeta>> = Vec::new();
        let (mut rewritten, mut largest, mut most_files) = (0, 0, 0);
        for n in 0..flushes {
            files.push(file(n, per_flush + (n as u64 * 7919) % 1_000));
            for group in similar_in_size(files.clone(), &policy) {
                let rows: u64 = group.iter().map(|f| f.rows).sum();
                rewritten += rows;
                largest = largest.max(rows);
                files.retain(|f| !group.iter().any(|g| Arc::ptr_eq(f, g)));
                files.push(file(n, rows));
            }
            most_files = most_files.max(files.len());
        }
        let total: u64 = files.iter().map(|f| f.rows).sum();
        assert!(
            rewritten <= 3 * total,
            "{rewritten} rows rewritten for {total}"
        );
        assert!(largest <= total / 4, "a merge of {largest} rows of {total}");
        assert!(most_files <= 3 * policy.min_files, "{most_files} files");
    }

    /// A file of `times` in Parquet, each row's `value` ten times its time.
    fn parquet_of(schema: &SchemaRef, times: &[i64]) -> bytes::Bytes {
        use arrow::array::{Int64Array, TimestampMicrosecondArray};
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(TimestampMicrosecondArray::from(times.to_vec())),
                Arc::new(Int64Array::from_iter_values(times.iter().map(|t| t * 10))),
            ],
        )
        .unwrap();
        let mut out = Vec::new();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(&mut out, schema.clone(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        out.into()
    }

    fn time_and_value() -> SchemaRef {
        use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
        Arc::new(Schema::new(vec![
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
            Field::new("value", DataType::Int64, false),
        ]))
    }

    #[test]
    fn files_sorted_by_time_merge_into_one_order_with_every_row_whole() {
        let schema = time_and_value();
        let inputs: [&[i64]; 4] = [
            &[1, 4, 4, 9, 12, 13, 20],
            &[2, 3, 4, 15],
            &[],
            &[0, 5, 6, 7, 8, 30],
        ];
        let group: Vec<_> = (0..inputs.len()).map(|n| file(n, 0)).collect();
        let contents = inputs.iter().map(|t| parquet_of(&schema, t)).collect();
        // Batches of 2 read and 3 written: inputs move to their next batch
        // in the middle of a written one.
        let mut merge = SortedMerge::open(&schema, &group, contents, 2, 3).unwrap();
        let (mut times, mut values, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(b) = merge.next_batch().unwrap() {
            sizes.push(b.num_rows());
            times.extend(
                b.column(0)
                    .as_primitive::<TimestampMicrosecondType>()
                    .values()
                    .iter()
                    .copied(),
            );
            values.extend(
                b.column(1)
                    .as_primitive::<arrow::datatypes::Int64Type>()
                    .values()
                    .iter()
                    .copied(),
            );
        }
        let mut want: Vec<i64> = inputs.concat();
        want.sort();
        assert_eq!(times, want);
        assert_eq!(values, want.iter().map(|t| t * 10).collect::<Vec<_>>());
        assert_eq!(sizes, vec![3, 3, 3, 3, 3, 2]);
        assert_eq!(merge.rows, 17);
        assert!(!merge.unsorted);
    }

    #[test]
    fn a_file_out_of_time_order_is_found_not_merged_wrong() {
        let schema = time_and_value();
        let group = vec![file(0, 0), file(1, 0)];
        let contents = vec![
            parquet_of(&schema, &[1, 2, 3]),
            parquet_of(&schema, &[5, 9, 4, 10]),
        ];
        let mut merge = SortedMerge::open(&schema, &group, contents, 2, 2).unwrap();
        let err = loop {
            match merge.next_batch() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("merged a file that is not sorted"),
                Err(e) => break e,
            }
        };
        assert!(
            err.contains("part-1.parquet is not sorted by time"),
            "{err}"
        );
        assert!(merge.unsorted);
    }
}
