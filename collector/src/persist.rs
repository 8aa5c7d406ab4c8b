//! Persisting: hot rows become Parquet files, partitioned by table and hour.
//!
//! Files are laid out Hive-style so any Parquet reader can prune by path:
//! `<data>/tables/<table>/date=YYYY-MM-DD/hour=HH/part-<segment>-<random>.parquet`.
//! The segment in the name is the last WAL segment the file holds. A flush
//! writes `*.parquet.tmp`, fsyncs, renames, and only then checkpoints the
//! WAL; on start, files newer than the checkpoint belong to a flush that did
//! not finish and are removed (their rows are still in the WAL).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, UInt32Array};
use arrow::compute::{concat_batches, take_record_batch};
use arrow::datatypes::{DataType, TimestampMicrosecondType};
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, Utc};
use lumen_core::schema::{TABLES, table_schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterPropertiesBuilder};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::schema::types::ColumnPath;
use rand::Rng;
use tokio::sync::watch;

use crate::buffer::time_range;
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
    #[error("writing {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("reading {path}: {message}")]
    Read { path: PathBuf, message: String },
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
    pub(crate) tables_dir: PathBuf,
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
        let segment = self.wal.rotate().await?;
        let per_table = self.store.batches_through(segment);
        let tables_dir = self.tables_dir.clone();
        let files = tokio::task::spawn_blocking(move || {
            let mut files = Vec::new();
            for (t, batches) in per_table.into_iter().enumerate() {
                if batches.is_empty() {
                    continue;
                }
                if let Err(e) = write_table(&tables_dir, t, &batches, segment, &mut files) {
                    // The rows stay hot and in the WAL; files of this attempt
                    // must not survive to be loaded beside a later flush's.
                    for (_, f) in &files {
                        let _ = fs::remove_file(&f.path);
                    }
                    return Err(e);
                }
            }
            Ok::<_, PersistError>(files)
        })
        .await
        .map_err(|e| PersistError::Write {
            path: self.tables_dir.clone(),
            message: e.to_string(),
        })??;
        let report = FlushReport {
            segment,
            files: files.iter().map(|(_, f)| f.clone()).collect(),
        };
        self.store.commit_flush(segment, files);
        let wal_dir = self.wal_dir.clone();
        tokio::task::spawn_blocking(move || wal::checkpoint(&wal_dir, segment))
            .await
            .map_err(|e| PersistError::Write {
                path: self.wal_dir.clone(),
                message: e.to_string(),
            })??;
        self.store.set_checkpoint(segment);
        Ok(report)
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

fn write_err(path: &Path) -> impl Fn(String) -> PersistError + '_ {
    move |message| PersistError::Write {
        path: path.to_path_buf(),
        message,
    }
}

/// Splits a table's hot rows by hour and writes one sorted file per hour.
fn write_table(
    tables_dir: &Path,
    table: usize,
    batches: &[RecordBatch],
    segment: u64,
    out: &mut Vec<(usize, FileMeta)>,
) -> Result<(), PersistError> {
    let name = TABLES[table];
    let schema = table_schema(name).expect("every table has a schema");
    let dir = tables_dir.join(name);
    let all = concat_batches(&schema, batches).map_err(|e| write_err(&dir)(e.to_string()))?;
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
        let part = take_record_batch(&all, &indices).map_err(|e| write_err(&dir)(e.to_string()))?;
        out.push((table, write_file(&dir, hour, segment, &part)?));
    }
    Ok(())
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

fn write_file(
    table_dir: &Path,
    hour: i64,
    segment: u64,
    batch: &RecordBatch,
) -> Result<FileMeta, PersistError> {
    let start = DateTime::<Utc>::from_timestamp_micros(hour * MICROS_PER_HOUR).unwrap_or_default();
    let dir = table_dir
        .join(format!("date={}", start.format("%Y-%m-%d")))
        .join(format!("hour={}", start.format("%H")));
    write_partition_file(&dir, segment, batch, &[])
}

/// Writes one file into a partition directory: `*.tmp`, fsync, rename,
/// fsync of the directories. `replaces` names files of the same directory
/// the new one takes the place of (compaction).
pub(crate) fn write_partition_file(
    dir: &Path,
    segment: u64,
    batch: &RecordBatch,
    replaces: &[String],
) -> Result<FileMeta, PersistError> {
    fs::create_dir_all(dir).map_err(|e| write_err(dir)(e.to_string()))?;
    let suffix: u32 = rand::rng().random();
    let path = dir.join(format!("part-{segment:020}-{suffix:08x}.parquet"));
    let tmp = path.with_extension("parquet.tmp");
    let (min_time, max_time) = time_range(batch).unwrap_or((0, 0));
    let props = writer_properties(batch.schema_ref())
        .set_key_value_metadata(Some(
            [
                KeyValue::new(META_SEGMENT.to_string(), segment.to_string()),
                KeyValue::new(META_MIN_TIME.to_string(), min_time.to_string()),
                KeyValue::new(META_MAX_TIME.to_string(), max_time.to_string()),
            ]
            .into_iter()
            .chain(
                (!replaces.is_empty())
                    .then(|| KeyValue::new(META_REPLACES.to_string(), replaces.join("/"))),
            )
            .collect(),
        ))
        .build();
    let err = write_err(&tmp);
    let file = File::create(&tmp).map_err(|e| err(e.to_string()))?;
    let mut writer =
        ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(|e| err(e.to_string()))?;
    writer.write(batch).map_err(|e| err(e.to_string()))?;
    let file = writer.into_inner().map_err(|e| err(e.to_string()))?;
    file.sync_all().map_err(|e| err(e.to_string()))?;
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    drop(file);
    fs::rename(&tmp, &path).map_err(|e| write_err(&path)(e.to_string()))?;
    // The file's entry, and the entries of `date=`/`hour=` directories that
    // may be new, must be durable before the WAL behind them is deleted.
    wal::sync_dir(dir)?;
    for parent in dir.ancestors().skip(1).take(2) {
        wal::sync_dir(parent)?;
    }
    Ok(FileMeta {
        path,
        rows: batch.num_rows() as u64,
        bytes,
        min_time,
        max_time,
        segment,
    })
}

/// Finds the Parquet files of every table. Files of segments past the WAL
/// checkpoint, and leftover `.tmp` files, are from a flush (or compaction)
/// that never completed; they are deleted because the WAL (or the files
/// being compacted) still hold their rows. Files a completed compaction
/// replaced but did not get to delete are deleted too.
pub fn load_files(
    tables_dir: &Path,
    checkpoint: u64,
) -> Result<Vec<(usize, FileMeta)>, PersistError> {
    let mut out = Vec::new();
    for (t, name) in TABLES.iter().enumerate() {
        let dir = tables_dir.join(name);
        fs::create_dir_all(&dir).map_err(|e| write_err(&dir)(e.to_string()))?;
        let mut paths = Vec::new();
        walk(&dir, &mut paths)?;
        paths.sort();
        let mut table_files = Vec::new();
        for path in paths {
            let file_name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if file_name.ends_with(".parquet.tmp") {
                fs::remove_file(&path).map_err(|e| write_err(&path)(e.to_string()))?;
                continue;
            }
            if !file_name.ends_with(".parquet") {
                continue;
            }
            let segment = file_name
                .strip_prefix("part-")
                .and_then(|s| s.split('-').next())
                .and_then(|s| s.parse::<u64>().ok());
            if segment.is_some_and(|s| s > checkpoint) {
                tracing::warn!(file = %path.display(), "removing file of an unfinished flush; its rows are replayed from the WAL");
                fs::remove_file(&path).map_err(|e| write_err(&path)(e.to_string()))?;
                continue;
            }
            let (meta, replaces) = read_meta(&path, segment.unwrap_or(0))?;
            table_files.push((meta, replaces));
        }
        let replaced: std::collections::HashSet<PathBuf> = table_files
            .iter()
            .flat_map(|(meta, replaces)| {
                let dir = meta
                    .path
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                replaces.iter().map(move |name| dir.join(name))
            })
            .collect();
        for (meta, _) in table_files {
            if replaced.contains(&meta.path) {
                tracing::info!(file = %meta.path.display(), "removing a file a finished compaction replaced");
                fs::remove_file(&meta.path).map_err(|e| write_err(&meta.path)(e.to_string()))?;
                continue;
            }
            out.push((t, meta));
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PersistError> {
    let read_err = |e: std::io::Error| PersistError::Read {
        path: dir.to_path_buf(),
        message: e.to_string(),
    };
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let path = entry.path();
        if entry.file_type().map_err(read_err)?.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn read_meta(path: &Path, segment: u64) -> Result<(FileMeta, Vec<String>), PersistError> {
    let read_err = |message: String| PersistError::Read {
        path: path.to_path_buf(),
        message,
    };
    let file = File::open(path).map_err(|e| read_err(e.to_string()))?;
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    let reader = SerializedFileReader::new(file).map_err(|e| read_err(e.to_string()))?;
    let meta = reader.metadata().file_metadata();
    let kv = |key: &str| -> Option<i64> {
        meta.key_value_metadata()?
            .iter()
            .find(|kv| kv.key == key)?
            .value
            .as_deref()?
            .parse()
            .ok()
    };
    let replaces: Vec<String> = meta
        .key_value_metadata()
        .and_then(|kvs| kvs.iter().find(|kv| kv.key == META_REPLACES))
        .and_then(|kv| kv.value.as_deref())
        .map(|v| {
            v.split('/')
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    // Files without our metadata (written by another tool) are never pruned.
    Ok((
        FileMeta {
            path: path.to_path_buf(),
            rows: meta.num_rows().max(0) as u64,
            bytes,
            min_time: kv(META_MIN_TIME).unwrap_or(i64::MIN),
            max_time: kv(META_MAX_TIME).unwrap_or(i64::MAX),
            segment,
        },
        replaces,
    ))
}
