//! Where the request path leaves its records: Arrow column builders, one
//! per worker thread, each behind its own (uncontended) lock.
//!
//! Recording a request appends its fields to the columns — names that
//! repeat become dictionary keys, ids fixed-width bytes — and nothing else:
//! no per-record message, no channel, no wakeup. The exporter thread takes
//! the builders' contents every flush interval (or sooner, once one holds a
//! full batch) and turns them into record batches off the request path.

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use lumen_core::RequestRecord;
use lumen_core::schema::RequestBatchBuilder;
use tokio::sync::Notify;

struct Shard {
    builder: RequestBatchBuilder,
}

/// The request path's side of telemetry export.
pub struct Batcher {
    shards: Box<[Mutex<Shard>]>,
    /// Records recorded and not yet acknowledged by the collector (or
    /// dropped): in builders, or encoded and waiting to be sent.
    pending: AtomicUsize,
    /// Most pending records; past it new ones are dropped, so a stalled
    /// exporter or an unreachable collector cannot take unbounded memory.
    capacity: usize,
    /// Records per batch; a shard that reaches it wakes the exporter.
    batch_size: usize,
    /// Wakes the exporter early.
    pub(crate) full: Notify,
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Each thread sticks to one shard, so its lock is uncontended.
    static SHARD: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Why [`Batcher::record`] dropped a record.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

impl Batcher {
    /// `shards` should be the number of threads that record (the proxy's
    /// workers); `capacity` bounds the records pending export.
    pub fn new(shards: usize, capacity: usize, batch_size: usize) -> Self {
        let shards = shards.max(1);
        Batcher {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        builder: RequestBatchBuilder::with_capacity(batch_size),
                    })
                })
                .collect(),
            pending: AtomicUsize::new(0),
            capacity: capacity.max(1),
            batch_size: batch_size.max(1),
            full: Notify::new(),
        }
    }

    fn shard(&self) -> &Mutex<Shard> {
        let i = SHARD.with(|s| match s.get() {
            Some(i) => i,
            None => {
                let i = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
                s.set(Some(i));
                i
            }
        });
        &self.shards[i % self.shards.len()]
    }

    /// Appends a finished request's record; refuses it when `capacity`
    /// records are pending export already.
    pub fn record(&self, r: &RequestRecord) -> Result<(), Full> {
        if self.pending.load(Ordering::Relaxed) >= self.capacity {
            return Err(Full);
        }
        self.pending.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.shard().lock().unwrap_or_else(|e| e.into_inner());
        let rows = shard.builder.len();
        shard.builder.push(r);
        if rows + 1 == self.batch_size {
            drop(shard);
            self.full.notify_one();
        }
        Ok(())
    }

    /// Records that left the proxy's care: acknowledged, or dropped.
    pub fn release(&self, records: u64) {
        self.pending.fetch_sub(records as usize, Ordering::Relaxed);
    }

    /// Records pending export now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Takes every shard's records as batches of at most `batch_size` rows
    /// (a shard's rows become one batch; a stalled exporter catching up
    /// gets a few larger ones).
    pub fn take(&self) -> Vec<(u64, Result<RecordBatch, ArrowError>)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let lock = || shard.lock().unwrap_or_else(|e| e.into_inner());
            if lock().builder.is_empty() {
                continue;
            }
            // The fresh builder is made outside the lock, so the request
            // path waits only for a swap.
            let fresh = RequestBatchBuilder::with_capacity(self.batch_size);
            let mut taken = std::mem::replace(&mut lock().builder, fresh);
            out.push((taken.len() as u64, taken.finish()));
        }
        out
    }
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("shards", &self.shards.len())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_out_as_batches_and_a_full_shard_drops() {
        let b = Batcher::new(1, 4, 2);
        for _ in 0..4 {
            b.record(&RequestRecord::example()).unwrap();
        }
        assert_eq!(b.record(&RequestRecord::example()), Err(Full));
        let batches = b.take();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].1.as_ref().unwrap().num_rows(), 4);
        assert!(b.take().is_empty(), "taken records are gone");
        // Taken is not gone: until acknowledged, they count against the bound.
        assert_eq!(b.record(&RequestRecord::example()), Err(Full));
        b.release(4);
        b.record(&RequestRecord::example()).unwrap();
        assert_eq!(b.take()[0].1.as_ref().unwrap().num_rows(), 1);
        assert_eq!(b.pending(), 1);
    }

    #[test]
    fn threads_record_into_their_own_shards() {
        let b = std::sync::Arc::new(Batcher::new(2, 1000, 100));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        b.record(&RequestRecord::example()).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let taken = b.take();
        let rows: usize = taken
            .iter()
            .map(|(n, r)| {
                assert_eq!(*n as usize, r.as_ref().unwrap().num_rows());
                *n as usize
            })
            .sum();
        assert_eq!(rows, 20);
    }
}
