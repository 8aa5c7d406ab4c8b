//! Tests of [`crate::persist`]: what a flush leaves on disk, what opening a
//! data directory keeps of it, and what a failed flush leaves behind.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use arrow::array::{
    ArrayRef, AsArray, BooleanArray, FixedSizeBinaryArray, Int32Array, Int64Array, StringArray,
    TimestampMicrosecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimestampMicrosecondType};
use arrow::record_batch::RecordBatch;
use lumen_core::schema::{REQUESTS, SPANS, table_schema};
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::basic::{Compression, Encoding};
use parquet::file::metadata::PageIndexPolicy;

use crate::persist::{Persister, load_files};
use crate::storage::Storage;
use crate::store::{Store, TableStats, table_index};
use crate::wal;
use crate::{Collector, CollectorConfig, FileMeta};

/// Where a file of `<data>/tables` is on disk.
trait OnDisk {
    fn path(&self) -> PathBuf;
}

impl OnDisk for FileMeta {
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/{}", self.location))
    }
}

fn tables_of(data: &Path) -> Arc<Storage> {
    Arc::new(Storage::local(&data.join("tables")).expect("a tables directory"))
}

/// 2026-01-02T03:00:00Z, in microseconds.
const H03: i64 = 1_767_322_800_000_000;
const MINUTE: i64 = 60_000_000;

/// A batch of `table` with one row per time; every string column holds
/// `<column>-<time>` and ids hold the time's bytes, so rows can be told
/// apart after a round trip.
fn batch(table: &str, times: &[i64]) -> RecordBatch {
    let schema = table_schema(table).expect("a Lumen table");
    let n = times.len();
    let strings =
        |name: &str| StringArray::from_iter_values(times.iter().map(|t| format!("{name}-{t}")));
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| -> ArrayRef {
            match f.data_type() {
                DataType::Timestamp(_, tz) => Arc::new(
                    TimestampMicrosecondArray::from(times.to_vec()).with_timezone_opt(tz.clone()),
                ),
                DataType::Int64 => Arc::new(Int64Array::from_iter_values(0..n as i64)),
                DataType::Int32 => Arc::new(Int32Array::from_iter_values(0..n as i32)),
                DataType::Boolean => Arc::new(BooleanArray::from(vec![false; n])),
                DataType::Utf8 => Arc::new(strings(f.name())),
                DataType::FixedSizeBinary(w) => Arc::new(
                    FixedSizeBinaryArray::try_from_iter(times.iter().map(|t| {
                        let mut id = span_id(*t).repeat(2);
                        id.truncate(*w as usize);
                        id
                    }))
                    .expect("ids of one width"),
                ),
                dict @ DataType::Dictionary(..) => {
                    cast(&strings(f.name()), dict).expect("strings cast to a dictionary")
                }
                other => panic!("no test values for a {other} column"),
            }
        })
        .collect();
    RecordBatch::try_new(schema, columns).expect("a valid batch")
}

fn entry(table: &str, times: &[i64]) -> (usize, RecordBatch) {
    (
        table_index(table).expect("a Lumen table"),
        batch(table, times),
    )
}

/// A store with its WAL opened in `<data>/wal`, and a persister writing to
/// `<data>/tables` — the layout the README documents.
fn open(data: &Path) -> (Persister, Arc<Store>, JoinHandle<()>, wal::Replayed) {
    let store = Arc::new(Store::new());
    crate::format::check(data).expect("a data directory of this format");
    let wal_dir = data.join("wal");
    let (wal, thread, replayed) = wal::open(&wal_dir, store.clone()).expect("WAL opens");
    let persister = Persister {
        storage: tables_of(data),
        orphans: Arc::default(),
        wal_dir,
        wal,
        store: store.clone(),
        running: Arc::default(),
    };
    (persister, store, thread, replayed)
}

/// Drops the last WAL handle and waits for the writer thread, as a stop does.
fn close(persister: Persister, thread: JoinHandle<()>) {
    drop(persister);
    thread.join().expect("WAL thread exits cleanly");
}

fn stats(store: &Store, table: &str) -> TableStats {
    store
        .stats()
        .into_iter()
        .find(|s| s.table == table)
        .expect("stats of every table")
}

/// Every regular file under `dir`, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries {
            let path = e.expect("readable directory entry").path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let file = File::open(path).expect("file opens");
    ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("a Parquet file")
        .build()
        .expect("a reader")
        .collect::<Result<_, _>>()
        .expect("every batch decodes")
}

fn times_of(batches: &[RecordBatch]) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|b| {
            b.column_by_name("time")
                .expect("a time column")
                .as_primitive::<TimestampMicrosecondType>()
                .values()
                .to_vec()
        })
        .collect()
}

fn span_ids_of(batches: &[RecordBatch]) -> BTreeSet<Vec<u8>> {
    batches
        .iter()
        .flat_map(|b| {
            b.column_by_name("span_id")
                .expect("a span_id column")
                .as_fixed_size_binary()
                .iter()
                .map(|s| s.expect("span_id is never null").to_vec())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The span id [`batch`] gives the row of time `t`.
fn span_id(t: i64) -> Vec<u8> {
    t.to_be_bytes().to_vec()
}

fn expected_span_ids(times: &[i64]) -> BTreeSet<Vec<u8>> {
    times.iter().map(|t| span_id(*t)).collect()
}

#[tokio::test]
async fn flush_writes_one_sorted_zstd_parquet_file_per_table_and_hour_with_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (persister, store, thread, _) = open(data);

    // Two appends (two WAL entries) for requests across hours 03 and 04, out
    // of time order; one for spans in hour 03.
    let req_03 = [H03 + 50 * MINUTE, H03 + 5 * MINUTE, H03 + 30 * MINUTE];
    let req_04 = [H03 + 75 * MINUTE, H03 + 61 * MINUTE];
    let req_03_late = [H03 + 20 * MINUTE];
    let spans_03 = [
        H03 + MINUTE,
        H03 + 2 * MINUTE,
        H03 + 3 * MINUTE,
        H03 + 4 * MINUTE,
    ];
    let mut first: Vec<i64> = req_03.to_vec();
    first.extend(req_04);
    persister
        .wal
        .append(vec![entry(REQUESTS, &first), entry(SPANS, &spans_03)])
        .await
        .unwrap();
    persister
        .wal
        .append(vec![entry(REQUESTS, &req_03_late)])
        .await
        .unwrap();

    let report = persister.flush().await.unwrap();

    let tables = data.join("tables");
    let seg = format!("part-{:020}-", report.segment);
    let mut by_dir: Vec<(String, &FileMeta)> = report
        .files
        .iter()
        .map(|f| {
            let path = f.path();
            let rel = path.strip_prefix(&tables).expect("under <data>/tables");
            let dir = rel.parent().unwrap().display().to_string();
            let name = rel.file_name().unwrap().to_string_lossy();
            assert!(
                name.starts_with(&seg) && name.ends_with(".parquet"),
                "{name}: named after the flushed WAL segment {}",
                report.segment
            );
            assert_eq!(f.segment, report.segment);
            (dir, f)
        })
        .collect();
    by_dir.sort_by(|a, b| a.0.cmp(&b.0));
    let dirs: Vec<&str> = by_dir.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(
        dirs,
        [
            "requests/date=2026-01-02/hour=03",
            "requests/date=2026-01-02/hour=04",
            "rollups/date=2026-01-02/hour=03",
            "rollups/date=2026-01-02/hour=04",
            "spans/date=2026-01-02/hour=03",
        ]
    );
    // Rollups are a function of the rows: see rollup.rs and tests/rollups.rs.
    by_dir.retain(|(d, _)| !d.starts_with("rollups/"));

    let mut req_03_all: Vec<i64> = req_03.iter().chain(&req_03_late).copied().collect();
    req_03_all.sort();
    let mut req_04_sorted = req_04.to_vec();
    req_04_sorted.sort();
    let want: [(&str, &[i64]); 3] = [
        (REQUESTS, &req_03_all),
        (REQUESTS, &req_04_sorted),
        (SPANS, &spans_03),
    ];
    for ((_, meta), (table, times)) in by_dir.iter().zip(want) {
        let batches = read_parquet(&meta.path());
        let schema = table_schema(table).unwrap();
        for b in &batches {
            assert_eq!(
                b.schema(),
                schema,
                "{}: the table's schema",
                meta.path().display()
            );
        }
        assert_eq!(
            times_of(&batches),
            times,
            "{}: every row of the hour, sorted by time",
            meta.path().display()
        );
        assert_eq!(span_ids_of(&batches), expected_span_ids(times));
        assert_eq!(meta.rows, times.len() as u64);
        assert_eq!(meta.min_time, times[0]);
        assert_eq!(meta.max_time, *times.last().unwrap());
        assert_eq!(meta.bytes, fs::metadata(meta.path()).unwrap().len());
        let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(
            File::open(meta.path()).unwrap(),
            ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required),
        )
        .unwrap();
        let row_group = reader.metadata().row_group(0);
        for column in row_group.columns() {
            // A span id is random bytes: compressing it only costs time.
            let compressed = column.column_path().string() != "span_id";
            assert_eq!(
                matches!(column.compression(), Compression::ZSTD(_)),
                compressed,
                "{}: {:?}",
                column.column_path(),
                column.compression()
            );
            let encodings: Vec<Encoding> = column.encodings().collect();
            let expected = match column.column_path().string().as_str() {
                "time" => Encoding::DELTA_BINARY_PACKED,
                "duration_us" => Encoding::BYTE_STREAM_SPLIT,
                "trace_id" | "span_id" | "parent_span_id" => Encoding::PLAIN,
                // Parquet has no dictionaries for booleans.
                "mtls" => continue,
                _ => Encoding::RLE_DICTIONARY,
            };
            assert!(
                encodings.contains(&expected),
                "{}: {encodings:?}",
                column.column_path()
            );
        }
        // Page statistics and the page index are kept, for pruning.
        let metadata = reader.metadata();
        assert!(metadata.column_index().is_some(), "no column index");
        assert!(metadata.offset_index().is_some(), "no offset index");
    }

    // The rows moved from the hot buffer to the files, and the WAL was
    // checkpointed behind them.
    let requests = stats(&store, REQUESTS);
    assert_eq!(
        (requests.hot_rows, requests.files, requests.file_rows),
        (0, 2, 6)
    );
    let spans = stats(&store, SPANS);
    assert_eq!((spans.hot_rows, spans.files, spans.file_rows), (0, 1, 4));
    assert_eq!(
        wal::read_checkpoint(&data.join("wal")).unwrap(),
        report.segment
    );
    let leftovers: Vec<PathBuf> = files_under(&tables)
        .into_iter()
        .filter(|p| !p.to_string_lossy().ends_with(".parquet"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // What a restart finds on disk is what the flush reported.
    let mut loaded: Vec<FileMeta> = load_files(&tables_of(data), report.segment)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, f)| f)
        .collect();
    loaded.sort_by_key(|a| a.path());
    let mut reported = report.files.clone();
    reported.sort_by_key(|a| a.path());
    assert_eq!(loaded, reported);
    close(persister, thread);
}

#[tokio::test]
async fn open_deletes_files_of_an_unfinished_flush_and_stray_tmp_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (persister, _store, thread, _) = open(data);
    let flushed = [H03 + MINUTE, H03 + 2 * MINUTE, H03 + 3 * MINUTE];
    persister
        .wal
        .append(vec![entry(REQUESTS, &flushed)])
        .await
        .unwrap();
    let report = persister.flush().await.unwrap();
    let requests_files: Vec<&FileMeta> = report
        .files
        .iter()
        .filter(|f| f.path().starts_with(data.join("tables").join(REQUESTS)))
        .collect();
    assert_eq!(requests_files.len(), 1);
    let kept = requests_files[0].path().clone();

    // Rows acknowledged after the flush: in the WAL only.
    let unflushed = [H03 + 10 * MINUTE, H03 + 11 * MINUTE];
    persister
        .wal
        .append(vec![entry(REQUESTS, &unflushed)])
        .await
        .unwrap();
    close(persister, thread);

    // A crash during the next flush: a renamed file of a segment past the
    // checkpoint (its rows are still in the WAL), and a `.tmp` one.
    let hour_dir = kept.parent().unwrap();
    let next = report.segment + 1;
    let unfinished = hour_dir.join(format!("part-{next:020}-0badf00d.parquet"));
    fs::copy(&kept, &unfinished).unwrap();
    let spans_dir = data.join("tables/spans/date=2026-01-02/hour=03");
    fs::create_dir_all(&spans_dir).unwrap();
    let tmp = spans_dir.join(format!("part-{next:020}-12345678.parquet.tmp"));
    fs::write(&tmp, b"half a Parquet file").unwrap();
    // Not a Parquet file: neither loaded nor deleted.
    let notes = data.join("tables/requests/notes.txt");
    fs::write(&notes, b"kept").unwrap();

    let mut config = CollectorConfig::new(data);
    config.otlp_grpc = None;
    config.otlp_http = None;
    let collector = Collector::open(config).await.unwrap();

    assert!(
        !unfinished.exists(),
        "file of the unfinished flush is deleted"
    );
    assert!(!tmp.exists(), "stray .tmp file is deleted");
    assert!(kept.exists(), "file at the checkpoint is kept");
    assert!(notes.exists(), "a file that is not Parquet is left alone");
    // Each row once: flushed rows from the file, the rest replayed from the WAL.
    let requests = stats(&collector.store(), REQUESTS);
    assert_eq!(
        (requests.files, requests.file_rows, requests.hot_rows),
        (1, flushed.len() as u64, unflushed.len())
    );
    assert_eq!(collector.replayed_rows(), unflushed.len());
    let spans = stats(&collector.store(), SPANS);
    assert_eq!((spans.files, spans.hot_rows), (0, 0));
}

#[tokio::test]
async fn a_failed_flush_leaves_no_files_and_keeps_the_rows_hot_and_in_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (persister, store, thread, _) = open(data);
    let req = [H03 + MINUTE, H03 + 65 * MINUTE, H03 + 2 * MINUTE];
    let spans = [H03 + 3 * MINUTE, H03 + 4 * MINUTE];
    persister
        .wal
        .append(vec![entry(REQUESTS, &req), entry(SPANS, &spans)])
        .await
        .unwrap();
    let tables = data.join("tables");
    let wal_dir = data.join("wal");

    let assert_nothing_flushed = |store: &Store, what: &str| {
        let parquet: Vec<PathBuf> = files_under(&tables)
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(".parquet"))
            .collect();
        assert!(parquet.is_empty(), "{what}: {parquet:?}");
        let (r, s) = (stats(store, REQUESTS), stats(store, SPANS));
        assert_eq!(
            (r.hot_rows, r.files, s.hot_rows, s.files),
            (req.len(), 0, spans.len(), 0),
            "{what}: the rows stay hot (queryable) and no file is published"
        );
        assert_eq!(
            wal::read_checkpoint(&wal_dir).unwrap(),
            0,
            "{what}: the WAL is not checkpointed"
        );
    };

    // `<data>/tables` is a regular file: nothing can be written.
    fs::remove_dir_all(&tables).unwrap();
    fs::write(&tables, b"not a directory").unwrap();
    let err = persister.flush().await.unwrap_err();
    assert!(err.to_string().contains("tables"), "{err}");
    assert_nothing_flushed(&store, "tables is a file");

    // Only `spans` cannot be written: the `requests` files written before it
    // fails must not survive beside the rows still in the WAL.
    fs::remove_file(&tables).unwrap();
    fs::create_dir_all(tables.join(REQUESTS)).unwrap();
    fs::write(tables.join(SPANS), b"not a directory").unwrap();
    let err = persister.flush().await.unwrap_err();
    assert!(err.to_string().contains(SPANS), "{err}");
    assert_nothing_flushed(&store, "tables/spans is a file");

    // A crash now loses nothing: every row is replayed from the WAL.
    close(persister, thread);
    let (persister, store, thread, replayed) = open(data);
    assert_eq!(replayed.rows, req.len() + spans.len());
    assert_nothing_flushed(&store, "after a restart");

    // Once the directory is writable, a flush stores each row exactly once.
    fs::remove_file(tables.join(SPANS)).unwrap();
    let report = persister.flush().await.unwrap();
    let mut req_times = Vec::new();
    let mut span_times = Vec::new();
    for f in &report.files {
        let t = times_of(&read_parquet(&f.path()));
        if f.path().starts_with(tables.join(REQUESTS)) {
            req_times.extend(t);
        } else if f.path().starts_with(tables.join(SPANS)) {
            span_times.extend(t);
        }
    }
    req_times.sort();
    let mut want_req = req.to_vec();
    want_req.sort();
    assert_eq!(req_times, want_req);
    assert_eq!(span_times, spans);
    let on_disk: Vec<PathBuf> = files_under(&tables);
    assert_eq!(on_disk.len(), report.files.len(), "{on_disk:?}");
    assert_eq!(stats(&store, REQUESTS).hot_rows, 0);
    assert_eq!(stats(&store, SPANS).hot_rows, 0);
    close(persister, thread);
}

/// Flushes `rounds` batches of `requests` rows in the hour H03, one file
/// each; returns every time written.
async fn flush_rounds(persister: &Persister, rounds: usize) -> Vec<i64> {
    let mut all = Vec::new();
    for round in 0..rounds {
        // Interleaved across rounds, so the merged file must sort them.
        let times: Vec<i64> = (0..=round as i64)
            .map(|i| H03 + (i * rounds as i64 + round as i64) * MINUTE / 7)
            .collect();
        persister
            .wal
            .append(vec![entry(REQUESTS, &times)])
            .await
            .unwrap();
        persister.flush().await.unwrap();
        all.extend(times);
    }
    all.sort();
    all
}

fn housekeeper(data: &Path, store: &Arc<Store>) -> crate::compact::Housekeeper {
    let mut h = crate::compact::Housekeeper::new(tables_of(data), store.clone());
    h.compaction.min_files = 3;
    h
}

fn requests_files(data: &Path) -> Vec<PathBuf> {
    files_under(&data.join("tables").join(REQUESTS))
}

/// Well after the hour H03.
fn later() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_micros((H03 + 3 * 3_600_000_000) as u64)
}

/// `requests` is one file holding `times`, in order.
fn assert_one_sorted_file_of(data: &Path, times: &[i64]) {
    let left = requests_files(data);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        times_of(&read_parquet(&left[0])),
        times,
        "every row, sorted"
    );
}

#[tokio::test]
async fn compaction_merges_a_partitions_files_into_one_sorted_file_with_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (persister, store, thread, _) = open(data);
    let rounds = 5;
    let times = flush_rounds(&persister, rounds).await;
    assert_eq!(requests_files(data).len(), rounds);

    let h = housekeeper(data, &store);
    let done = h.compact(later()).await;
    let requests: Vec<_> = done.iter().filter(|c| c.table == REQUESTS).collect();
    assert_eq!(requests.len(), 1, "{done:?}");
    assert_eq!(
        (requests[0].files, requests[0].rows),
        (rounds, times.len() as u64)
    );
    let s = stats(&store, REQUESTS);
    assert_eq!((s.files, s.file_rows), (1, times.len() as u64));
    // No query held the replaced files: they are gone already.
    assert_eq!(h.sweep(true).await, 0);
    assert_one_sorted_file_of(data, &times);
    close(persister, thread);
}

/// Another writer's file, not sorted by time, cannot be merged as it is
/// read: its group is sorted in memory instead, and comes out whole.
#[tokio::test]
async fn a_file_out_of_time_order_is_compacted_sorted_with_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (persister, store, thread, _) = open(data);
    let mut times = flush_rounds(&persister, 3).await;
    let backwards: Vec<i64> = (0..50).rev().map(|i| H03 + i * MINUTE / 3 + 1).collect();
    let storage = tables_of(data);
    let table = table_index(REQUESTS).unwrap();
    let partition = crate::persist::partition_of(&store.files_of(table)[0].location);
    let meta = crate::persist::write_file(
        &storage,
        &partition,
        1,
        &batch(REQUESTS, &backwards),
        &[],
        &mut Vec::new(),
    )
    .unwrap();
    store.add_files(vec![(table, meta)]);
    times.extend(&backwards);
    times.sort();

    let h = housekeeper(data, &store);
    let done = h.compact(later()).await;
    let requests: Vec<_> = done.iter().filter(|c| c.table == REQUESTS).collect();
    assert_eq!(
        requests
            .iter()
            .map(|c| (c.files, c.rows))
            .collect::<Vec<_>>(),
        vec![(4, times.len() as u64)]
    );
    assert_one_sorted_file_of(data, &times);
    close(persister, thread);
}

#[tokio::test]
async fn a_compaction_cut_short_keeps_every_row_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (persister, store, thread, _) = open(data);
    let times = flush_rounds(&persister, 4).await;
    // A query holds the files, so compaction cannot delete them; then the
    // process stops (as by `kill -9`), with a half-written file of a later
    // compaction beside them.
    let holds = crate::store::FileHolds::default();
    holds.hold(&store.files_of(table_index(REQUESTS).unwrap()));
    let h = housekeeper(data, &store);
    assert!(!h.compact(later()).await.is_empty());
    let partition = requests_files(data)[0].parent().unwrap().to_path_buf();
    fs::write(
        partition.join("part-00000000000000000009-deadbeef.parquet.tmp"),
        b"half",
    )
    .unwrap();
    assert_eq!(requests_files(data).len(), 4 + 1 + 1);
    close(persister, thread);
    drop(store);

    let checkpoint = wal::read_checkpoint(&data.join("wal")).unwrap();
    let files = load_files(&tables_of(data), checkpoint).await.unwrap();
    let requests = table_index(REQUESTS).unwrap();
    let loaded: Vec<&FileMeta> = files
        .iter()
        .filter(|(t, _)| *t == requests)
        .map(|(_, f)| f)
        .collect();
    assert_eq!(loaded.len(), 1, "only the compacted file: {loaded:?}");
    assert_eq!(loaded[0].rows, times.len() as u64);
    assert_eq!(requests_files(data), vec![loaded[0].path().clone()]);
    assert_eq!(times_of(&read_parquet(&loaded[0].path())), times);
}

#[tokio::test]
async fn retention_drops_only_partitions_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (persister, store, thread, _) = open(data);
    let (h03, h05) = ([H03 + MINUTE], [H03 + 2 * 3_600_000_000 + MINUTE]);
    persister
        .wal
        .append(vec![entry(REQUESTS, &h03), entry(SPANS, &h03)])
        .await
        .unwrap();
    persister
        .wal
        .append(vec![entry(REQUESTS, &h05)])
        .await
        .unwrap();
    persister.flush().await.unwrap();
    let mut h = housekeeper(data, &store);
    h.retention
        .set(REQUESTS, Some(std::time::Duration::from_secs(3600)))
        .unwrap();
    h.retention.set(SPANS, None).unwrap();
    h.retention.set(lumen_core::schema::ROLLUPS, None).unwrap();
    // An hour after H05's row: H03's partition is past an hour's retention.
    let now = std::time::UNIX_EPOCH
        + std::time::Duration::from_micros((H03 + 3 * 3_600_000_000 + MINUTE) as u64);
    assert_eq!(h.expire(now), 1);
    let s = stats(&store, REQUESTS);
    assert_eq!((s.files, s.file_rows), (1, 1));
    assert_eq!(stats(&store, SPANS).files, 1, "spans are kept forever here");
    assert_eq!(h.sweep(true).await, 1);
    let tables = data.join("tables").join(REQUESTS);
    assert!(
        !tables.join("date=2026-01-02/hour=03").exists(),
        "the partition is gone"
    );
    assert!(tables.join("date=2026-01-02/hour=05").exists());
    close(persister, thread);
}

#[tokio::test]
async fn compaction_leaves_files_past_the_wal_checkpoint_alone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (persister, store, thread, _) = open(data);
    flush_rounds(&persister, 3).await;
    // A flush's file whose checkpoint is not written yet (the process could
    // die now: a restart would delete it and replay its rows).
    let requests = table_index(REQUESTS).unwrap();
    let first = store.files_of(requests)[0].clone();
    let pending = first
        .path()
        .with_file_name("part-00000000000000000099-00000000.parquet");
    fs::copy(first.path(), &pending).unwrap();
    store.add_files(vec![(
        requests,
        FileMeta {
            location: object_store::path::Path::from_absolute_path(&pending).unwrap(),
            segment: 99,
            ..(*first).clone()
        },
    )]);
    let done = housekeeper(data, &store).compact(later()).await;
    let merged: Vec<_> = done.iter().filter(|c| c.table == REQUESTS).collect();
    assert_eq!(merged.len(), 1);
    assert_eq!(merged[0].files, 3, "only the durable files: {done:?}");
    assert!(
        store.files_of(requests).iter().any(|f| f.path() == pending),
        "the pending file is still its own"
    );
    close(persister, thread);
}

#[tokio::test]
async fn a_file_two_compactions_back_is_not_read_again_after_the_one_naming_it_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (persister, store, thread, _) = open(data);
    let requests = table_index(REQUESTS).unwrap();
    let mut times = flush_rounds(&persister, 3).await;
    // A query holds the first three files, so the first compaction cannot
    // delete them…
    let holds = crate::store::FileHolds::default();
    holds.hold(&store.files_of(requests));
    let h = housekeeper(data, &store);
    let merged =
        |done: Vec<crate::compact::Compacted>| done.iter().filter(|c| c.table == REQUESTS).count();
    assert_eq!(merged(h.compact(later()).await), 1);
    // … and a second one merges the first merged file with newer ones and
    // deletes it, while the oldest files are still held.
    times.extend(flush_rounds(&persister, 3).await);
    times.sort();
    assert_eq!(merged(h.compact(later()).await), 1);
    assert_eq!(
        requests_files(data).len(),
        3 + 1,
        "held files and the last merge"
    );
    close(persister, thread);
    drop(store);

    // On the next start the last merged file still says the held ones are
    // replaced: every row once.
    let checkpoint = wal::read_checkpoint(&data.join("wal")).unwrap();
    let files = load_files(&tables_of(data), checkpoint).await.unwrap();
    let loaded: Vec<&FileMeta> = files
        .iter()
        .filter(|(t, _)| *t == requests)
        .map(|(_, f)| f)
        .collect();
    assert_eq!(loaded.len(), 1, "{loaded:?}");
    assert_eq!(times_of(&read_parquet(&loaded[0].path())), times);
    assert_eq!(requests_files(data), vec![loaded[0].path()]);
}
