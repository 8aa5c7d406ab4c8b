//! Persisting: hot rows become Parquet files, partitioned by table and hour.
//!
//! Files are laid out Hive-style so any Parquet reader can prune by path:
//! `<root>/<table>/date=YYYY-MM-DD/hour=HH/part-<segment>-<random>.parquet`,
//! where the root is `<data>/tables` or this collector's prefix of a shared
//! store ([`crate::storage`]). The segment in the name is the last WAL
//! segment the file holds. A flush writes each file whole and durably, and
//! only then checkpoints the WAL; on start, files newer than the checkpoint
//! belong to a flush that did not finish and are removed (their rows are
//! still in the WAL).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, UInt32Array};
use arrow::compute::{concat_batches, take_record_batch};
use arrow::datatypes::{DataType, SchemaRef, TimestampMicrosecondType};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lumen_core::schema::{TABLES, table_schema};
use object_store::ObjectMeta;
use object_store::path::Path;
use parquet::arrow::ArrowWriter;
use parquet::arrow::async_reader::MetadataFetch;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::metadata::ParquetMetaDataReader;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterPropertiesBuilder};
use parquet::schema::types::ColumnPath;
use rand::Rng;
use tokio::sync::watch;

use crate::buffer::time_range;
use crate::storage::{Storage, StorageError};
use crate::store::{FileMeta, Store};
use crate::wal::{self, WalError, WalHandle};

const MICROS_PER_HOUR: i64 = 3_600_000_000;
const META_SEGMENT: &str = "lumen.wal_segment";
const META_MIN_TIME: &str = "lumen.min_time";
const META_MAX_TIME: &str = "lumen.max_time";
/// Names of the files a compacted file replaces, `/`-separated (a name
/// cannot hold one).
const META_REPLACES: &str = "lumen.replaces";

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("writing {path}: {message}")]
    Write { path: String, message: String },
    #[error("reading {path}: {message}")]
    Read { path: String, message: String },
}

/// When the hot buffer is flushed to Parquet.
#[derive(Debug, Clone)]
pub struct FlushPolicy {
    /// Flush rows at least this often.
    pub interval: Duration,
    /// Flush once this many rows are hot.
    pub max_rows: usize,
    /// Flush once hot rows take this much memory.
    pub max_bytes: usize,
}

impl Default for FlushPolicy {
    fn default() -> Self {
        FlushPolicy {
            interval: Duration::from_secs(60),
            max_rows: 1_000_000,
            max_bytes: 256 << 20,
        }
    }
}

/// What one flush did.
#[derive(Debug, Clone, Default)]
pub struct FlushReport {
    pub segment: u64,
    pub files: Vec<FileMeta>,
}

/// Moves hot rows to Parquet and checkpoints the WAL behind them.
#[derive(Debug, Clone)]
pub struct Persister {
    pub(crate) storage: Arc<Storage>,
    /// Files of a failed flush not deleted yet: an object store may have
    /// taken a write it reported as failed. The WAL checkpoint does not
    /// move past their rows until they are gone, so a restart deletes them
    /// (their segment is past it) rather than keeping their rows twice.
    pub(crate) orphans: Arc<std::sync::Mutex<Vec<Path>>>,
    pub(crate) wal_dir: PathBuf,
    pub(crate) wal: WalHandle,
    pub(crate) store: Arc<Store>,
    /// One flush at a time: two interleaved flushes would write the same
    /// rows twice and could move the checkpoint backwards.
    pub(crate) running: Arc<tokio::sync::Mutex<()>>,
}

impl Persister {
    /// Flushes every row acknowledged so far.
    pub async fn flush(&self) -> Result<FlushReport, PersistError> {
        let _one_at_a_time = self.running.lock().await;
        self.delete_orphans().await?;
        let segment = self.wal.rotate().await?;
        let per_table = self.store.batches_through(segment);
        let storage = self.storage.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut files = Vec::new();
            let mut attempted = Vec::new();
            for (t, batches) in per_table.into_iter().enumerate() {
                if batches.is_empty() {
                    continue;
                }
                if let Err(e) =
                    write_table(&storage, t, &batches, segment, &mut files, &mut attempted)
                {
                    return Err((e, attempted));
                }
            }
            Ok(files)
        })
        .await
        .map_err(|e| PersistError::Write {
            path: self.storage.url_of(self.storage.root()),
            message: e.to_string(),
        })?;
        let files: Vec<(usize, FileMeta)> = match written {
            Ok(files) => files,
            Err((e, attempted)) => {
                // The rows stay hot and in the WAL; files of this attempt
                // (a store may have taken a write it reported as failed)
                // must not survive to be loaded beside a later flush's.
                self.orphans
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(attempted);
                let _ = self.delete_orphans().await;
                return Err(e);
            }
        };
        let report = FlushReport {
            segment,
            files: files.iter().map(|(_, f)| f.clone()).collect(),
        };
        self.store.commit_flush(segment, files);
        let wal_dir = self.wal_dir.clone();
        tokio::task::spawn_blocking(move || wal::checkpoint(&wal_dir, segment))
            .await
            .map_err(|e| PersistError::Write {
                path: self.wal_dir.display().to_string(),
                message: e.to_string(),
            })??;
        self.store.set_checkpoint(segment);
        Ok(report)
    }

    /// Deletes the files failed flushes left; fails if one cannot be.
    async fn delete_orphans(&self) -> Result<(), PersistError> {
        let orphans = std::mem::take(&mut *self.orphans.lock().unwrap_or_else(|e| e.into_inner()));
        let mut first_error = None;
        let mut left = Vec::new();
        for location in orphans {
            if let Err(e) = self.storage.delete(&location).await {
                first_error.get_or_insert(e);
                left.push(location);
            }
        }
        self.orphans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(left);
        match first_error {
            None => Ok(()),
            Some(e) => Err(PersistError::Write {
                path: self.storage.url_of(self.storage.root()),
                message: format!("cannot delete a file a failed flush left: {e}"),
            }),
        }
    }

    /// Flushes by `policy` until `shutdown`, then once more for what is left.
    pub async fn run(self, policy: FlushPolicy, mut shutdown: watch::Receiver<bool>) {
        let mut last_flush = Instant::now();
        // After a failure, wait before trying again (doubling, up to a minute)
        // rather than rotating a new WAL segment every tick.
        let mut retry_at: Option<(Instant, Duration)> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
            let stats = self.store.stats();
            let rows: usize = stats.iter().map(|s| s.hot_rows).sum();
            let bytes: usize = stats.iter().map(|s| s.hot_bytes).sum();
            let due = rows > 0
                && (rows >= policy.max_rows
                    || bytes >= policy.max_bytes
                    || last_flush.elapsed() >= policy.interval);
            if !due {
                if rows == 0 {
                    last_flush = Instant::now();
                }
                continue;
            }
            if retry_at.is_some_and(|(at, _)| Instant::now() < at) {
                continue;
            }
            if self.flush_logged(rows).await {
                retry_at = None;
            } else {
                let pause = retry_at.map_or(Duration::from_secs(1), |(_, p)| {
                    (p * 2).min(Duration::from_secs(60))
                });
                retry_at = Some((Instant::now() + pause, pause));
            }
            last_flush = Instant::now();
        }
        let rows: usize = self.store.stats().iter().map(|s| s.hot_rows).sum();
        if rows > 0 {
            self.flush_logged(rows).await;
        }
    }

    async fn flush_logged(&self, rows: usize) -> bool {
        let started = Instant::now();
        match self.flush().await {
            Ok(r) => {
                tracing::info!(
                    rows,
                    files = r.files.len(),
                    segment = r.segment,
                    ms = started.elapsed().as_millis() as u64,
                    "flushed hot buffer to Parquet"
                );
                self.store.health().set_flush(None);
                self.store.metrics().flushed(true);
                true
            }
            Err(e) => {
                // Rows stay hot and in the WAL; a later attempt retries.
                tracing::error!(error = %e, "flush to Parquet failed");
                self.store.health().set_flush(Some(e.to_string()));
                self.store.metrics().flushed(false);
                false
            }
        }
    }
}

/// Splits a table's hot rows by hour and writes one sorted file per hour;
/// each file's location goes to `attempted` before it is written.
fn write_table(
    storage: &Storage,
    table: usize,
    batches: &[RecordBatch],
    segment: u64,
    out: &mut Vec<(usize, FileMeta)>,
    attempted: &mut Vec<Path>,
) -> Result<(), PersistError> {
    let name = TABLES[table];
    let schema = table_schema(name).expect("every table has a schema");
    let root = storage.root();
    let err = |message: String| PersistError::Write {
        path: storage.url_of(&root.clone().join(name)),
        message,
    };
    let all = concat_batches(&schema, batches).map_err(|e| err(e.to_string()))?;
    let times = all.column(0).as_primitive::<TimestampMicrosecondType>();
    let mut hours: BTreeMap<i64, Vec<(i64, u32)>> = BTreeMap::new();
    for (i, t) in times.values().iter().enumerate() {
        hours
            .entry(t.div_euclid(MICROS_PER_HOUR))
            .or_default()
            .push((*t, i as u32));
    }
    for (hour, mut rows) in hours {
        // Sorted by time, so row-group statistics prune well.
        rows.sort_unstable();
        let indices = UInt32Array::from_iter_values(rows.iter().map(|(_, i)| *i));
        let part = take_record_batch(&all, &indices).map_err(|e| err(e.to_string()))?;
        let partition = partition_of_hour(root, name, hour);
        let meta = write_file(storage, &partition, segment, &part, &[], attempted)?;
        out.push((table, meta));
    }
    Ok(())
}

/// `<root>/<table>/date=YYYY-MM-DD/hour=HH`.
fn partition_of_hour(root: &Path, table: &str, hour: i64) -> Path {
    let start = DateTime::<Utc>::from_timestamp_micros(hour * MICROS_PER_HOUR).unwrap_or_default();
    root.clone()
        .join(table)
        .join(format!("date={}", start.format("%Y-%m-%d")))
        .join(format!("hour={}", start.format("%H")))
}

/// The partition (directory) a file is in.
pub(crate) fn partition_of(location: &Path) -> Path {
    let parts: Vec<_> = location.parts().collect();
    Path::from_iter(parts[..parts.len().saturating_sub(1)].iter().cloned())
}

/// How a table's columns are encoded, measured on the demo's traffic
/// (`lumen-bench storage`). Rows are in time order, which keeps the rows of
/// one trace close together, so zstd finds a trace id's repeats; sorting by
/// service and route instead shortens the dictionary columns' runs but
/// scatters traces, and costs more than it saves. Dictionaries pay for the
/// names (few distinct values); for times, durations and ids they only add
/// a dictionary page, so those are encoded for what they are: times as
/// deltas (small, being sorted), durations split into byte streams (their
/// high bytes are mostly zero), ids plain (random bytes do not compress).
///
/// zstd works where bytes repeat: names, times and durations at level 6;
/// trace and parent span ids (repeated within a trace) at 3; a span id is
/// eight random bytes no level shrinks, so it is not compressed at all —
/// together as fast to write as level 3 everywhere and 0.1 byte a row
/// smaller. Pages hold up to 64k rows: larger pages give zstd more to work
/// with and the page index fewer entries, while a page still spans about a
/// minute of a busy mesh's traffic for time filters to skip. Statistics per
/// page and the page index are kept, so time and service filters prune
/// pages, not only files.
fn writer_properties(schema: &arrow::datatypes::Schema) -> WriterPropertiesBuilder {
    let zstd = |level| Compression::ZSTD(ZstdLevel::try_new(level).expect("valid zstd level"));
    let mut props = WriterProperties::builder()
        .set_compression(zstd(6))
        .set_data_page_row_count_limit(PAGE_ROWS)
        .set_dictionary_enabled(true)
        .set_statistics_enabled(EnabledStatistics::Page);
    for field in schema.fields() {
        let column = ColumnPath::from(field.name().as_str());
        let encoding = match field.data_type() {
            DataType::Timestamp(..) => Encoding::DELTA_BINARY_PACKED,
            DataType::Int64 if field.name().ends_with("duration_us") => Encoding::BYTE_STREAM_SPLIT,
            DataType::FixedSizeBinary(_) => {
                let compression = match field.name().as_str() {
                    "span_id" => Compression::UNCOMPRESSED,
                    _ => zstd(3),
                };
                props = props.set_column_compression(column.clone(), compression);
                Encoding::PLAIN
            }
            _ => continue,
        };
        props = props
            .set_column_dictionary_enabled(column.clone(), false)
            .set_column_encoding(column, encoding);
    }
    props
}

/// Most rows in one data page (the parquet crate's default is 20k).
const PAGE_ROWS: usize = 64 * 1024;

/// Writes one file of a partition (from a blocking thread). `replaces`
/// names files of the same partition the new one takes the place of
/// (compaction); its location goes to `attempted` before it is written.
pub(crate) fn write_file(
    storage: &Storage,
    partition: &Path,
    segment: u64,
    batch: &RecordBatch,
    replaces: &[String],
    attempted: &mut Vec<Path>,
) -> Result<FileMeta, PersistError> {
    let mut next = Some(batch.clone());
    let batches = || Ok(next.take());
    write_batches(
        storage,
        partition,
        segment,
        batch.schema(),
        replaces,
        attempted,
        batches,
    )
}

/// Writes one file of a partition from what `batches` yields until it
/// yields `None`, so the rows need not all be in memory at once; an error
/// it returns leaves no file. As [`write_file`] otherwise.
pub(crate) fn write_batches(
    storage: &Storage,
    partition: &Path,
    segment: u64,
    schema: SchemaRef,
    replaces: &[String],
    attempted: &mut Vec<Path>,
    mut batches: impl FnMut() -> Result<Option<RecordBatch>, String>,
) -> Result<FileMeta, PersistError> {
    let suffix: u32 = rand::rng().random();
    let location = partition
        .clone()
        .join(format!("part-{segment:020}-{suffix:08x}.parquet"));
    let props = writer_properties(&schema)
        .set_key_value_metadata(Some(
            std::iter::once(KeyValue::new(META_SEGMENT.to_string(), segment.to_string()))
                .chain(
                    (!replaces.is_empty())
                        .then(|| KeyValue::new(META_REPLACES.to_string(), replaces.join("/"))),
                )
                .collect(),
        ))
        .build();
    attempted.push(location.clone());
    let mut rows = 0;
    let mut range: Option<(i64, i64)> = None;
    let bytes = storage.write_blocking(&location, |out| {
        let mut writer =
            ArrowWriter::try_new(out, schema, Some(props)).map_err(|e| e.to_string())?;
        while let Some(batch) = batches()? {
            if let Some((lo, hi)) = time_range(&batch) {
                range = Some(range.map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))));
            }
            rows += batch.num_rows() as u64;
            writer.write(&batch).map_err(|e| e.to_string())?;
        }
        // The time range goes in the footer, known once every row is.
        let (min_time, max_time) = range.unwrap_or((0, 0));
        writer.append_key_value_metadata(KeyValue::new(
            META_MIN_TIME.to_string(),
            min_time.to_string(),
        ));
        writer.append_key_value_metadata(KeyValue::new(
            META_MAX_TIME.to_string(),
            max_time.to_string(),
        ));
        writer.close().map(drop).map_err(|e| e.to_string())
    })?;
    let (min_time, max_time) = range.unwrap_or((0, 0));
    Ok(FileMeta {
        location,
        rows,
        bytes,
        min_time,
        max_time,
        segment,
        replaces: replaces.to_vec(),
    })
}

/// Finds the Parquet files of every table of this collector. Files of
/// segments past the WAL checkpoint, and leftover `.tmp` files, are from a
/// flush (or compaction) that never completed; they are deleted because the
/// WAL (or the files being compacted) still hold their rows. Files a
/// completed compaction replaced but did not get to delete are deleted too.
pub async fn load_files(
    storage: &Storage,
    checkpoint: u64,
) -> Result<Vec<(usize, FileMeta)>, PersistError> {
    let mut out = Vec::new();
    for (t, name) in TABLES.iter().enumerate() {
        let mut kept = Vec::new();
        for object in storage.list(&storage.root().clone().join(*name)).await? {
            let file_name = object.location.filename().unwrap_or_default();
            if file_name.ends_with(".parquet.tmp") {
                storage.delete(&object.location).await?;
                continue;
            }
            if segment_of(file_name).is_some_and(|s| s > checkpoint) {
                tracing::warn!(file = %storage.url_of(&object.location), "removing file of an unfinished flush; its rows are replayed from the WAL");
                storage.delete(&object.location).await?;
                continue;
            }
            kept.push(object);
        }
        let (files, replaced, _) = read_table(storage, kept, &HashMap::new(), true).await?;
        for location in replaced {
            tracing::info!(file = %storage.url_of(&location), "removing a file a finished compaction replaced");
            storage.delete(&location).await?;
        }
        out.extend(files.into_iter().map(|f| (t, Arc::unwrap_or_clone(f))));
    }
    Ok(out)
}

/// Other collectors' files in a shared store, per table, without the files
/// a compaction has replaced (their collector deletes them after a grace).
/// Footers already read (`known`) are not read again.
pub async fn load_others(
    storage: &Storage,
    known: &HashMap<Path, Arc<FileMeta>>,
) -> Result<Others, PersistError> {
    let others = storage.others().await?;
    let mut per_table = Vec::new();
    let mut unreadable = Vec::new();
    for name in TABLES {
        let mut objects = Vec::new();
        for prefix in &others {
            objects.extend(
                storage
                    .list(&prefix.clone().join(name))
                    .await?
                    .into_iter()
                    .filter(|o| {
                        o.location
                            .filename()
                            .is_some_and(|n| n.ends_with(".parquet"))
                    }),
            );
        }
        let (files, _, skipped) = read_table(storage, objects, known, false).await?;
        per_table.push(files);
        unreadable.extend(skipped);
    }
    Ok(Others {
        per_table,
        unreadable,
    })
}

/// Other collectors' files, per table, and those that could not be read.
#[derive(Debug, Default)]
pub struct Others {
    pub per_table: Vec<Vec<Arc<FileMeta>>>,
    /// Files left out, and why (deleted since the listing, or not Parquet
    /// a reader can open).
    pub unreadable: Vec<(Path, String)>,
}

/// Lists the other collectors' files of a shared store into the catalog,
/// so queries read them; footers of files seen before are not read again.
pub async fn refresh_others(
    storage: &Storage,
    store: &Store,
) -> Result<(usize, Vec<(Path, String)>), PersistError> {
    let known: HashMap<Path, Arc<FileMeta>> = (0..TABLES.len())
        .flat_map(|t| store.others_of(t))
        .map(|f| (f.location.clone(), f))
        .collect();
    let others = load_others(storage, &known).await?;
    let files = others.per_table.iter().map(Vec::len).sum();
    store.set_others(others.per_table);
    Ok((files, others.unreadable))
}

/// [`refresh_others`] every `every` until `shutdown`. A store that cannot
/// be listed is warned about once; queries keep the last listing, and once
/// it is older than the delete grace (other collectors may have deleted
/// files it names) `/ready` says their rows may be missing.
pub async fn follow_others(
    storage: Arc<Storage>,
    store: Arc<Store>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failing_since: Option<Instant> = None;
    let mut unreadable_before: HashSet<Path> = HashSet::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        match refresh_others(&storage, &store).await {
            Ok((_, unreadable)) => {
                if failing_since.take().is_some() {
                    tracing::info!("listing other collectors' files works again");
                    store.health().set_others(None);
                }
                for (location, why) in &unreadable {
                    if !unreadable_before.contains(location) {
                        tracing::warn!(file = %storage.url_of(location), error = %why, "leaving out another collector's file that cannot be read");
                    }
                }
                unreadable_before = unreadable.into_iter().map(|(l, _)| l).collect();
            }
            Err(e) => {
                let since = *failing_since.get_or_insert_with(|| {
                    tracing::warn!(error = %e, "cannot list other collectors' files; queries read the last listing");
                    Instant::now()
                });
                if since.elapsed() >= storage.delete_grace() {
                    store.health().set_others(Some(format!(
                        "other collectors' files could not be listed for {}s; queries may miss their rows: {e}",
                        since.elapsed().as_secs()
                    )));
                }
            }
        }
    }
}

/// The segment a file's name carries (`part-<segment>-<random>.parquet`).
fn segment_of(file_name: &str) -> Option<u64> {
    file_name
        .strip_prefix("part-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Reads the footers of a table's Parquet files (other files are skipped);
/// returns the files in force, the files a compacted file replaced, and —
/// unless `strict`, where they are an error — the files that could not be
/// read.
async fn read_table(
    storage: &Storage,
    mut objects: Vec<ObjectMeta>,
    known: &HashMap<Path, Arc<FileMeta>>,
    strict: bool,
) -> Result<(Vec<Arc<FileMeta>>, Vec<Path>, Vec<(Path, String)>), PersistError> {
    objects.retain(|o| {
        o.location
            .filename()
            .is_some_and(|n| n.ends_with(".parquet"))
    });
    objects.sort_by(|a, b| a.location.cmp(&b.location));
    let results: Vec<(Path, Result<Arc<FileMeta>, PersistError>)> =
        futures_util::stream::iter(objects)
            .map(|object| async move {
                let read = match known.get(&object.location) {
                    Some(f) if f.bytes == object.size => Ok(f.clone()),
                    _ => read_meta(storage, &object).await.map(Arc::new),
                };
                (object.location, read)
            })
            .buffered(16)
            .collect()
            .await;
    let mut read = Vec::with_capacity(results.len());
    let mut unreadable = Vec::new();
    for (location, result) in results {
        match result {
            Ok(meta) => read.push(meta),
            Err(e) if strict => return Err(e),
            Err(e) => unreadable.push((location, e.to_string())),
        }
    }
    let replaced: HashSet<Path> = read
        .iter()
        .flat_map(|meta| {
            let partition = partition_of(&meta.location);
            meta.replaces
                .iter()
                .map(move |name| partition.clone().join(name.as_str()))
        })
        .filter(|p| read.iter().any(|m| &m.location == p))
        .collect();
    let files = read
        .into_iter()
        .filter(|meta| !replaced.contains(&meta.location))
        .collect();
    Ok((files, replaced.into_iter().collect(), unreadable))
}

/// Byte ranges of one file, for the Parquet footer reader.
struct Ranges<'a> {
    storage: &'a Storage,
    location: &'a Path,
}

impl MetadataFetch for Ranges<'_> {
    fn fetch(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> futures_util::future::BoxFuture<'_, parquet::errors::Result<Bytes>> {
        Box::pin(async move {
            self.storage
                .get_range(self.location, range)
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
        })
    }
}

async fn read_meta(storage: &Storage, object: &ObjectMeta) -> Result<FileMeta, PersistError> {
    let read_err = |message: String| PersistError::Read {
        path: storage.url_of(&object.location),
        message,
    };
    let fetch = Ranges {
        storage,
        location: &object.location,
    };
    // One read of the file's tail holds the footer of most files.
    let metadata = ParquetMetaDataReader::new()
        .with_prefetch_hint(Some(64 << 10))
        .load_and_finish(fetch, object.size)
        .await
        .map_err(|e| read_err(e.to_string()))?;
    let meta = metadata.file_metadata();
    let value = |key: &str| -> Option<&str> {
        meta.key_value_metadata()?
            .iter()
            .find(|kv| kv.key == key)?
            .value
            .as_deref()
    };
    let kv = |key: &str| value(key).and_then(|v| v.parse::<i64>().ok());
    let replaces: Vec<String> = value(META_REPLACES)
        .map(|v| {
            v.split('/')
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let segment = object
        .location
        .filename()
        .and_then(segment_of)
        .or_else(|| kv(META_SEGMENT).map(|s| s.max(0) as u64))
        .unwrap_or(0);
    // Files without our metadata (written by another tool) are never pruned.
    Ok(FileMeta {
        location: object.location.clone(),
        rows: meta.num_rows().max(0) as u64,
        bytes: object.size,
        min_time: kv(META_MIN_TIME).unwrap_or(i64::MIN),
        max_time: kv(META_MAX_TIME).unwrap_or(i64::MAX),
        segment,
        replaces,
    })
}
