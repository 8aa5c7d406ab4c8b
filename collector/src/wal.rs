//! The write-ahead log: the one place durability is decided.
//!
//! Ingest hands the WAL Arrow batches; a dedicated writer thread appends
//! every batch that arrived meanwhile, fsyncs once (group commit), puts the
//! rows in the hot buffer and only then acknowledges. So an acknowledged row
//! is on disk and already queryable.
//!
//! The log is a series of segment files `<seq>.wal`. A flush seals the
//! current segment ([`WalHandle::rotate`]), writes its rows to Parquet,
//! records the segment in `checkpoint` and deletes the sealed segments. On
//! start, segments after the checkpoint are replayed into the buffer.
//!
//! Segment layout: the magic `LUMNWAL1`, then entries of
//! `[u32 LE payload length][u32 LE crc32 of payload][payload]`. A payload is
//! one of
//! - `[u8 table index][Arrow IPC stream of one batch]`;
//! - `[u8 0x80 | table index][24-byte batch id][Arrow IPC stream]`, rows of a
//!   batch its producer numbered (see [`crate::dedup`]);
//! - `[u8 0xFF][dedup snapshot]`, first in every segment: which numbered
//!   batches are stored, so that a retried batch is not stored twice even
//!   after the segments that held it are flushed and deleted.
//!
//! A torn entry at the end (a crash mid-write, never acknowledged) ends
//! replay of that segment.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, oneshot};

use crate::dedup::{BatchId, Dedup};
use crate::store::Store;

const MAGIC: &[u8; 8] = b"LUMNWAL1";
/// Payload kind bit: a batch id follows the table index.
const NUMBERED: u8 = 0x80;
/// Payload kind: a dedup snapshot.
const SNAPSHOT: u8 = 0xFF;
const CHECKPOINT: &str = "checkpoint";

#[derive(Debug, Clone, thiserror::Error)]
pub enum WalError {
    #[error("WAL I/O error on {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("cannot encode batch for the WAL: {0}")]
    Encode(String),
    #[error("the WAL has failed earlier and accepts no more writes: {0}")]
    Failed(String),
    #[error("the WAL is shut down")]
    Closed,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |e| WalError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

struct Append {
    encoded: Vec<u8>,
    entries: Vec<(usize, RecordBatch)>,
    origin: Option<BatchId>,
    ack: oneshot::Sender<Result<Stored, WalError>>,
}

/// What became of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Written and fsynced.
    Written,
    /// A batch of this id was stored before; nothing was written.
    Duplicate,
}

enum Command {
    Append(Append),
    Rotate(oneshot::Sender<Result<u64, WalError>>),
    /// Commits what came before, then ends the writer: later appends fail
    /// as closed, whoever still holds a handle.
    Close,
    /// Makes the next write fail, as a full or failing disk would.
    #[cfg(test)]
    Break(oneshot::Sender<()>),
}

/// Sends writes to the WAL writer thread; cheap to clone.
#[derive(Clone, Debug)]
pub struct WalHandle {
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Append(a) => write!(f, "Append({} entries)", a.entries.len()),
            Command::Rotate(_) => f.write_str("Rotate"),
            Command::Close => f.write_str("Close"),
            #[cfg(test)]
            Command::Break(_) => f.write_str("Break"),
        }
    }
}

impl WalHandle {
    /// Logs the batches (table index, batch) durably and puts them in the
    /// hot buffer; returns once both are done.
    pub async fn append(&self, entries: Vec<(usize, RecordBatch)>) -> Result<(), WalError> {
        self.append_once(None, entries).await.map(|_| ())
    }

    /// As [`append`](Self::append), for a batch its producer numbered: a
    /// batch whose id was stored before is acknowledged without being
    /// written again. A numbered append must be one entry (one batch), so
    /// that a crash keeps all of it or none.
    pub async fn append_once(
        &self,
        origin: Option<BatchId>,
        entries: Vec<(usize, RecordBatch)>,
    ) -> Result<Stored, WalError> {
        if entries.is_empty() {
            return Ok(Stored::Written);
        }
        // Encode here, on the caller's task, so the writer thread only writes.
        let mut encoded = Vec::new();
        for (table, batch) in &entries {
            encode_entry(&mut encoded, *table, origin.as_ref(), batch)?;
        }
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Command::Append(Append {
                encoded,
                entries,
                origin,
                ack,
            }))
            .await
            .map_err(|_| WalError::Closed)?;
        done.await.map_err(|_| WalError::Closed)?
    }

    /// Ends the writer thread once everything sent before is committed.
    pub async fn close(&self) {
        let _ = self.tx.send(Command::Close).await;
    }

    /// Seals the current segment and starts a new one; returns the sealed
    /// segment's number. Every batch of it is in the buffer when this returns.
    pub async fn rotate(&self) -> Result<u64, WalError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Command::Rotate(ack))
            .await
            .map_err(|_| WalError::Closed)?;
        done.await.map_err(|_| WalError::Closed)?
    }
}

#[cfg(test)]
impl WalHandle {
    async fn break_writes(&self) {
        let (ack, done) = oneshot::channel();
        self.tx.send(Command::Break(ack)).await.unwrap();
        done.await.unwrap();
    }
}

fn encode_entry(
    out: &mut Vec<u8>,
    table: usize,
    origin: Option<&BatchId>,
    batch: &RecordBatch,
) -> Result<(), WalError> {
    let mut payload = match origin {
        None => vec![table as u8],
        Some(id) => {
            let mut p = vec![NUMBERED | table as u8];
            id.encode(&mut p);
            p
        }
    };
    {
        let mut w = StreamWriter::try_new(&mut payload, &batch.schema())
            .map_err(|e| WalError::Encode(e.to_string()))?;
        w.write(batch)
            .map_err(|e| WalError::Encode(e.to_string()))?;
        w.finish().map_err(|e| WalError::Encode(e.to_string()))?;
    }
    frame(out, &payload);
    Ok(())
}

fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// One entry read back from a segment.
enum Entry {
    Rows {
        table: usize,
        origin: Option<BatchId>,
        batch: RecordBatch,
    },
    Snapshot(Dedup),
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.wal"))
}

/// Segment numbers present in `dir`, ascending.
fn segments(dir: &Path) -> Result<Vec<u64>, WalError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(seq) = name.strip_suffix(".wal").and_then(|s| s.parse().ok()) {
            out.push(seq);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Makes a directory entry (a new or renamed file) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Last segment whose rows are safely in Parquet (0: none yet).
/// A batch logged by an earlier Lumen in the table's current columns: a
/// column added since (nullable, at the end) reads as null.
fn current_layout(table: usize, batch: RecordBatch) -> Result<RecordBatch, String> {
    let Some(schema) = lumen_core::schema::table_schema(lumen_core::schema::TABLES[table]) else {
        return Ok(batch);
    };
    if batch.schema().fields() == schema.fields() {
        return Ok(batch);
    }
    crate::ingest::conform::conform(&schema, &batch)
}

pub fn read_checkpoint(dir: &Path) -> Result<u64, WalError> {
    let path = dir.join(CHECKPOINT);
    match fs::read_to_string(&path) {
        Ok(s) => s.trim().parse().map_err(|_| WalError::Io {
            path,
            message: format!("checkpoint holds `{}`, not a segment number", s.trim()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Records that segments up to `seq` are in Parquet, then deletes them.
pub(crate) fn checkpoint(dir: &Path, seq: u64) -> Result<(), WalError> {
    let tmp = dir.join("checkpoint.tmp");
    let path = dir.join(CHECKPOINT);
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(seq.to_string().as_bytes())
        .map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)?;
    remove_through(dir, seq)
}

fn remove_through(dir: &Path, seq: u64) -> Result<(), WalError> {
    for s in segments(dir)? {
        if s <= seq {
            let p = segment_path(dir, s);
            fs::remove_file(&p).map_err(io_err(&p))?;
        }
    }
    Ok(())
}

/// Reads one segment's entries; stops at a torn or corrupt entry.
fn read_segment(path: &Path) -> Result<Vec<Entry>, WalError> {
    let data = fs::read(path).map_err(io_err(path))?;
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        if data.is_empty() {
            return Ok(Vec::new()); // created, then crashed before the magic was written
        }
        return Err(WalError::Io {
            path: path.to_path_buf(),
            message: "not a Lumen WAL segment (bad magic)".into(),
        });
    }
    let mut out = Vec::new();
    let mut pos = MAGIC.len();
    while pos < data.len() {
        let torn = |what: &str| {
            tracing::warn!(
                segment = %path.display(),
                offset = pos,
                "WAL entry {what}; ignoring the rest of the segment (a write never acknowledged)"
            );
        };
        if data.len() - pos < 8 {
            torn("header is truncated");
            break;
        }
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().expect("4 bytes"));
        let start = pos + 8;
        if data.len() - start < len || len == 0 {
            torn("is truncated");
            break;
        }
        let payload = &data[start..start + len];
        if crc32fast::hash(payload) != crc {
            torn("fails its checksum");
            break;
        }
        let bad = |message: String| WalError::Io {
            path: path.to_path_buf(),
            message: format!("entry at offset {pos}: {message}"),
        };
        let kind = payload[0];
        if kind == SNAPSHOT {
            let dedup = Dedup::decode(&payload[1..])
                .ok_or_else(|| bad("malformed dedup snapshot".into()))?;
            out.push(Entry::Snapshot(dedup));
            pos = start + len;
            continue;
        }
        let table = (kind & !NUMBERED) as usize;
        let (origin, ipc) = if kind & NUMBERED != 0 {
            let id =
                BatchId::decode(&payload[1..]).ok_or_else(|| bad("truncated batch id".into()))?;
            (Some(id), &payload[1 + BatchId::ENCODED_LEN..])
        } else {
            (None, &payload[1..])
        };
        // Guarded: an entry whose checksum holds but whose Arrow IPC does
        // not (found by fuzzing the replay) made arrow's decoder panic.
        let batches = lumen_core::ipc::guarded(|| {
            StreamReader::try_new(Cursor::new(ipc), None)?.collect::<Result<Vec<_>, _>>()
        })
        .map_err(bad)?
        .map_err(|e| bad(e.to_string()))?;
        out.extend(batches.into_iter().map(|batch| Entry::Rows {
            table,
            origin,
            batch,
        }));
        pos = start + len;
    }
    Ok(out)
}

/// Starts segment `seq` with the magic and a snapshot of `dedup`.
fn create_segment(dir: &Path, seq: u64, dedup: &Dedup) -> Result<File, WalError> {
    let path = segment_path(dir, seq);
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let mut head = MAGIC.to_vec();
    let mut snapshot = vec![SNAPSHOT];
    dedup.encode(&mut snapshot);
    frame(&mut head, &snapshot);
    let ready = f
        .write_all(&head)
        .and_then(|()| f.sync_all())
        .map_err(io_err(&path))
        .and_then(|()| sync_dir(dir));
    if let Err(e) = ready {
        // Nothing was acknowledged into it; leaving it would block every
        // later rotation ("exists") and startup (bad magic).
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(f)
}

/// What [`open`] found on disk.
#[derive(Debug, Clone, Default)]
pub struct Replayed {
    pub segments: usize,
    pub rows: usize,
    /// Producers whose stored batches are remembered (for exactly-once).
    pub producers: usize,
    /// Rows of batches found stored twice (skipped).
    pub duplicates: usize,
}

/// Opens the WAL in `dir`: replays unflushed segments into `store`, then
/// starts the writer thread on a fresh segment.
pub fn open(
    dir: &Path,
    store: Arc<Store>,
) -> Result<(WalHandle, std::thread::JoinHandle<()>, Replayed), WalError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let done = read_checkpoint(dir)?;
    remove_through(dir, done)?;
    let mut replayed = Replayed::default();
    let mut dedup = Dedup::default();
    let mut last = done;
    for seq in segments(dir)? {
        // The entries of one append are consecutive and share its id; an id
        // met again later is a retry that a failed write let through twice.
        let mut current: Option<(BatchId, bool)> = None;
        for entry in read_segment(&segment_path(dir, seq))? {
            let (table, origin, batch) = match entry {
                Entry::Snapshot(d) => {
                    dedup.merge(d);
                    continue;
                }
                Entry::Rows {
                    table,
                    origin,
                    batch,
                } => (table, origin, batch),
            };
            if table >= lumen_core::schema::TABLES.len() {
                return Err(WalError::Io {
                    path: segment_path(dir, seq),
                    message: format!("entry names unknown table #{table}"),
                });
            }
            if let Some(id) = origin {
                let skip = match current {
                    Some((c, skip)) if c == id => skip,
                    _ => dedup.contains(&id),
                };
                current = Some((id, skip));
                if skip {
                    replayed.duplicates += batch.num_rows();
                    continue;
                }
                dedup.insert(&id);
            } else {
                current = None;
            }
            replayed.rows += batch.num_rows();
            let batch = current_layout(table, batch).map_err(|message| WalError::Io {
                path: segment_path(dir, seq),
                message,
            })?;
            store.insert(seq, table, batch);
        }
        replayed.segments += 1;
        last = last.max(seq);
    }
    dedup.prune();
    replayed.producers = dedup.len();
    let seq = last + 1;
    let file = create_segment(dir, seq, &dedup)?;
    let (tx, rx) = mpsc::channel(1024);
    let writer = Writer {
        dir: dir.to_path_buf(),
        seq,
        file,
        store,
        failed: None,
        dedup,
    };
    let thread = std::thread::Builder::new()
        .name("lumen-wal".into())
        .spawn(move || writer.run(rx))
        .map_err(io_err(dir))?;
    Ok((WalHandle { tx }, thread, replayed))
}

struct Writer {
    dir: PathBuf,
    seq: u64,
    file: File,
    store: Arc<Store>,
    /// Set after a failed write or fsync: what is on disk of the current
    /// segment is then unknown, so nothing more is written to it; after a
    /// pause the writer tries a fresh segment (see [`Writer::recover`]).
    failed: Option<(String, Instant)>,
    /// Numbered batches stored so far.
    dedup: Dedup,
}

/// Pause after a WAL failure before a new segment is tried.
const RECOVERY_PAUSE: Duration = Duration::from_secs(1);

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut cmds = Vec::with_capacity(256);
        let mut group: Vec<Append> = Vec::new();
        'run: while let Some(first) = rx.blocking_recv() {
            cmds.push(first);
            while cmds.len() < 1024 {
                match rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            for cmd in cmds.drain(..) {
                match cmd {
                    Command::Append(a) => group.push(a),
                    Command::Close => {
                        self.commit(&mut group);
                        break 'run;
                    }
                    Command::Rotate(ack) => {
                        self.commit(&mut group);
                        let _ = ack.send(self.rotate());
                    }
                    #[cfg(test)]
                    Command::Break(ack) => {
                        self.commit(&mut group);
                        // Writing to a read-only handle fails with EBADF.
                        if let Ok(f) = File::open(segment_path(&self.dir, self.seq)) {
                            self.file = f;
                        }
                        let _ = ack.send(());
                    }
                }
            }
            self.commit(&mut group);
        }
        let _ = self.file.sync_all();
    }

    /// Writes the group, fsyncs once, fills the buffer, acknowledges.
    fn commit(&mut self, group: &mut Vec<Append>) {
        if group.is_empty() {
            return;
        }
        self.recover();
        let path = segment_path(&self.dir, self.seq);
        // A batch stored before, or earlier in this group, is not written.
        let mut fresh: Vec<BatchId> = Vec::new();
        let stored: Vec<Stored> = group
            .iter()
            .map(|a| match &a.origin {
                Some(id) if self.dedup.contains(id) || fresh.contains(id) => Stored::Duplicate,
                Some(id) => {
                    fresh.push(*id);
                    Stored::Written
                }
                None => Stored::Written,
            })
            .collect();
        let written = match &self.failed {
            Some((f, _)) => Err(WalError::Failed(f.clone())),
            None => {
                let started = Instant::now();
                let mut result = Ok(());
                for (a, s) in group.iter().zip(&stored) {
                    if *s == Stored::Duplicate {
                        continue;
                    }
                    if let Err(e) = self.file.write_all(&a.encoded) {
                        result = Err(io_err(&path)(e));
                        break;
                    }
                }
                let result = result.and_then(|()| self.file.sync_data().map_err(io_err(&path)));
                self.store.metrics().fsync(started.elapsed().as_secs_f64());
                result
            }
        };
        if written.is_ok() {
            for id in &fresh {
                self.dedup.insert(id);
            }
        }
        if let Err(e) = &written
            && self.failed.is_none()
        {
            tracing::error!(error = %e, "WAL write failed; refusing writes until a new segment can be started");
            self.failed = Some((e.to_string(), Instant::now()));
            self.store.health().set_wal(Some(e.to_string()));
        }
        for (a, s) in group.drain(..).zip(stored) {
            if written.is_ok() && s == Stored::Written {
                for (table, batch) in a.entries {
                    self.store.insert(self.seq, table, batch);
                }
            }
            let _ = a.ack.send(written.clone().map(|()| s));
        }
    }

    /// After a failure, once the pause is over, moves on to a new segment:
    /// the failed one keeps what was acknowledged before the failure (its
    /// torn end is skipped on replay, like a crash's), and writes resume.
    /// Rows of the failed group were never acknowledged; clients retry them.
    fn recover(&mut self) {
        let Some((_, at)) = &self.failed else {
            return;
        };
        if at.elapsed() < RECOVERY_PAUSE {
            return;
        }
        match create_segment(&self.dir, self.seq + 1, &self.dedup) {
            Ok(file) => {
                self.file = file;
                self.seq += 1;
                self.failed = None;
                self.store.health().set_wal(None);
                tracing::info!(segment = self.seq, "WAL writable again, in a new segment");
            }
            Err(e) => {
                tracing::warn!(error = %e, "WAL still failing");
                self.failed = Some((e.to_string(), Instant::now()));
                self.store.health().set_wal(Some(e.to_string()));
            }
        }
    }

    fn rotate(&mut self) -> Result<u64, WalError> {
        self.recover();
        if let Some((f, _)) = &self.failed {
            return Err(WalError::Failed(f.clone()));
        }
        let sealed = self.seq;
        self.dedup.prune();
        let file = create_segment(&self.dir, sealed + 1, &self.dedup)?;
        self.file = file;
        self.seq = sealed + 1;
        Ok(sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_core::RequestRecord;
    use lumen_core::schema::{REQUESTS, RequestBatchBuilder};
    use std::time::SystemTime;

    fn batch(n: usize) -> RecordBatch {
        let mut b = RequestBatchBuilder::new();
        for i in 0..n {
            b.push(&RequestRecord {
                start_time: SystemTime::now(),
                path: format!("/{i}"),
                ..RequestRecord::example()
            });
        }
        b.finish().unwrap()
    }

    fn hot_rows(store: &Store) -> usize {
        store
            .snapshot(REQUESTS)
            .unwrap()
            .hot
            .iter()
            .map(|c| c.batch.num_rows())
            .sum()
    }

    #[tokio::test]
    async fn acknowledged_batches_are_replayed_and_torn_tails_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::new());
        let (wal, thread, replayed) = open(dir.path(), store.clone()).unwrap();
        assert_eq!(replayed.rows, 0);
        wal.append(vec![(0, batch(3))]).await.unwrap();
        wal.append(vec![(0, batch(4))]).await.unwrap();
        assert_eq!(
            hot_rows(&store),
            7,
            "acknowledged rows are queryable at once"
        );
        drop(wal);
        thread.join().unwrap();

        // A crash mid-write leaves a torn entry at the end of the segment.
        let seg = segments(dir.path()).unwrap()[0];
        let mut f = OpenOptions::new()
            .append(true)
            .open(segment_path(dir.path(), seg))
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9]).unwrap();

        let store = Arc::new(Store::new());
        let (wal, thread, replayed) = open(dir.path(), store.clone()).unwrap();
        assert_eq!(replayed.rows, 7);
        assert_eq!(hot_rows(&store), 7);

        // A checkpoint past a rotated segment removes it from replay.
        wal.append(vec![(0, batch(2))]).await.unwrap();
        let sealed = wal.rotate().await.unwrap();
        checkpoint(dir.path(), sealed).unwrap();
        drop(wal);
        thread.join().unwrap();
        let store = Arc::new(Store::new());
        let (_wal, _thread, replayed) = open(dir.path(), store).unwrap();
        assert_eq!(replayed.rows, 0);
    }

    #[tokio::test]
    async fn after_a_failed_write_the_wal_recovers_in_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::new());
        let (wal, thread, _) = open(dir.path(), store.clone()).unwrap();
        wal.append(vec![(0, batch(2))]).await.unwrap();
        wal.break_writes().await;
        let failed = wal.append(vec![(0, batch(5))]).await.unwrap_err();
        assert!(matches!(failed, WalError::Io { .. }), "{failed:?}");
        assert!(store.health().wal_problem().is_some());
        // Within the pause, writes are refused without touching the disk.
        assert!(matches!(
            wal.append(vec![(0, batch(5))]).await,
            Err(WalError::Failed(_))
        ));
        tokio::time::sleep(RECOVERY_PAUSE + Duration::from_millis(100)).await;
        wal.append(vec![(0, batch(3))]).await.unwrap();
        assert!(store.health().wal_problem().is_none());
        assert_eq!(hot_rows(&store), 5, "only acknowledged rows are hot");
        drop(wal);
        thread.join().unwrap();

        let store = Arc::new(Store::new());
        let (_wal, _thread, replayed) = open(dir.path(), store.clone()).unwrap();
        assert_eq!(
            replayed.rows, 5,
            "both segments replay their acknowledged rows"
        );
        assert_eq!(replayed.segments, 2);
    }

    fn id(seq: u64) -> BatchId {
        BatchId {
            producer: [7; 16],
            seq,
        }
    }

    fn reopen(dir: &Path) -> (WalHandle, std::thread::JoinHandle<()>, Replayed, Arc<Store>) {
        let store = Arc::new(Store::new());
        let (wal, thread, replayed) = open(dir, store.clone()).unwrap();
        (wal, thread, replayed, store)
    }

    #[tokio::test]
    async fn a_retried_batch_is_stored_once_across_restarts_and_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, thread, _, store) = reopen(dir.path());
        let first = wal.append_once(Some(id(1)), vec![(0, batch(3))]).await;
        assert_eq!(first.unwrap(), Stored::Written);
        let retry = wal.append_once(Some(id(1)), vec![(0, batch(3))]).await;
        assert_eq!(retry.unwrap(), Stored::Duplicate);
        // Two attempts at once (an ack lost while the retry was sent): one is stored.
        let (a, b) = tokio::join!(
            wal.append_once(Some(id(2)), vec![(0, batch(2))]),
            wal.append_once(Some(id(2)), vec![(0, batch(2))]),
        );
        let mut outcomes = [a.unwrap(), b.unwrap()];
        outcomes.sort_by_key(|s| *s == Stored::Duplicate);
        assert_eq!(outcomes, [Stored::Written, Stored::Duplicate]);
        assert_eq!(hot_rows(&store), 5);
        drop(wal);
        thread.join().unwrap();

        let (wal, thread, replayed, store) = reopen(dir.path());
        assert_eq!((replayed.rows, replayed.producers), (5, 1));
        let after_restart = wal.append_once(Some(id(1)), vec![(0, batch(3))]).await;
        assert_eq!(after_restart.unwrap(), Stored::Duplicate);
        assert_eq!(hot_rows(&store), 5);
        // Flushed and checkpointed: the segments holding the batches are gone,
        // and their ids live on in the snapshot the next segment opens with.
        let sealed = wal.rotate().await.unwrap();
        checkpoint(dir.path(), sealed).unwrap();
        drop(wal);
        thread.join().unwrap();

        let (wal, _thread, replayed, store) = reopen(dir.path());
        assert_eq!(replayed.rows, 0);
        assert_eq!(replayed.producers, 1);
        let late = wal.append_once(Some(id(2)), vec![(0, batch(2))]).await;
        assert_eq!(late.unwrap(), Stored::Duplicate);
        let next = wal.append_once(Some(id(3)), vec![(0, batch(1))]).await;
        assert_eq!(next.unwrap(), Stored::Written);
        assert_eq!(hot_rows(&store), 1);
    }

    #[test]
    fn replay_skips_a_batch_written_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 1);
        drop(create_segment(dir.path(), 1, &Dedup::default()).unwrap());
        let mut data = Vec::new();
        // One append of two tables' entries, another batch, then the first again.
        encode_entry(&mut data, 0, Some(&id(1)), &batch(2)).unwrap();
        encode_entry(&mut data, 0, Some(&id(1)), &batch(1)).unwrap();
        encode_entry(&mut data, 0, Some(&id(2)), &batch(4)).unwrap();
        encode_entry(&mut data, 0, Some(&id(1)), &batch(2)).unwrap();
        encode_entry(&mut data, 0, Some(&id(1)), &batch(1)).unwrap();
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let (_wal, _thread, replayed, store) = reopen(dir.path());
        assert_eq!((replayed.rows, replayed.duplicates), (7, 3));
        assert_eq!(hot_rows(&store), 7);
    }
}
