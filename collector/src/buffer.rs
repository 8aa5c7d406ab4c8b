//! The hot buffer: acknowledged rows not yet in Parquet, queryable at once.
//!
//! Rows arrive in many small batches (one per export call). Small batches
//! collect in `pending` and are merged into one chunk every so often, so
//! queries scan a few large batches rather than thousands of tiny ones, and
//! each row is copied about once.

use arrow::array::AsArray;
use arrow::compute::{concat_batches, max, min};
use arrow::datatypes::{SchemaRef, TimestampMicrosecondType};
use arrow::record_batch::RecordBatch;

/// Merge pending batches once this many have collected...
const MERGE_BATCHES: usize = 64;
/// ...or once they hold this many rows.
const MERGE_ROWS: usize = 16 * 1024;

/// Rows of one WAL segment, with their time range for pruning.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub segment: u64,
    pub batch: RecordBatch,
    pub min_time: i64,
    pub max_time: i64,
}

impl Chunk {
    pub fn new(segment: u64, batch: RecordBatch) -> Self {
        let (min_time, max_time) = time_range(&batch).unwrap_or((i64::MAX, i64::MIN));
        Chunk {
            segment,
            batch,
            min_time,
            max_time,
        }
    }
}

/// Min and max of the batch's `time` column (first column, microseconds).
pub fn time_range(batch: &RecordBatch) -> Option<(i64, i64)> {
    let times = batch
        .column_by_name(lumen_core::schema::TIME_COLUMN)?
        .as_primitive_opt::<TimestampMicrosecondType>()?;
    if times.is_empty() {
        return None;
    }
    Some((min(times)?, max(times)?))
}

/// One table's hot rows.
#[derive(Debug)]
pub struct TableBuffer {
    schema: SchemaRef,
    chunks: Vec<Chunk>,
    pending: Vec<Chunk>,
    pending_rows: usize,
    rows: usize,
    bytes: usize,
}

impl TableBuffer {
    pub fn new(schema: SchemaRef) -> Self {
        TableBuffer {
            schema,
            chunks: Vec::new(),
            pending: Vec::new(),
            pending_rows: 0,
            rows: 0,
            bytes: 0,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn insert(&mut self, segment: u64, batch: RecordBatch) {
        if batch.num_rows() == 0 {
            return;
        }
        self.rows += batch.num_rows();
        self.bytes += batch.get_array_memory_size();
        self.pending_rows += batch.num_rows();
        // Chunks never span segments: a flush takes whole segments.
        if self.pending.last().is_some_and(|c| c.segment != segment) {
            self.merge_pending();
        }
        self.pending.push(Chunk::new(segment, batch));
        if self.pending.len() >= MERGE_BATCHES || self.pending_rows >= MERGE_ROWS {
            self.merge_pending();
        }
    }

    fn merge_pending(&mut self) {
        self.pending_rows = 0;
        match self.pending.len() {
            0 => {}
            1 => self.chunks.append(&mut self.pending),
            _ => {
                let segment = self.pending[0].segment;
                let batches: Vec<RecordBatch> =
                    self.pending.iter().map(|c| c.batch.clone()).collect();
                match concat_batches(&self.schema, &batches) {
                    Ok(merged) => {
                        // Small batches carry spare capacity and a dictionary
                        // each; the merged copy is what stays in memory.
                        let before: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
                        self.bytes = self.bytes - before + merged.get_array_memory_size();
                        self.pending.clear();
                        self.chunks.push(Chunk::new(segment, merged));
                    }
                    // Cannot happen with batches of one schema; keep them unmerged.
                    Err(_) => self.chunks.append(&mut self.pending),
                }
            }
        }
    }

    /// Every hot chunk, for a query snapshot.
    pub fn chunks(&self) -> impl Iterator<Item = &Chunk> {
        self.chunks.iter().chain(self.pending.iter())
    }

    /// Batches of segments up to `segment`, for a flush.
    pub fn batches_through(&self, segment: u64) -> Vec<RecordBatch> {
        self.chunks()
            .filter(|c| c.segment <= segment)
            .map(|c| c.batch.clone())
            .collect()
    }

    /// Drops rows of segments up to `segment` once they are in Parquet.
    pub fn remove_through(&mut self, segment: u64) {
        self.merge_pending();
        self.chunks.retain(|c| c.segment > segment);
        self.rows = self.chunks.iter().map(|c| c.batch.num_rows()).sum();
        self.bytes = self
            .chunks
            .iter()
            .map(|c| c.batch.get_array_memory_size())
            .sum();
    }

    /// Oldest segment still held, if any.
    pub fn oldest_segment(&self) -> Option<u64> {
        self.chunks().map(|c| c.segment).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use std::sync::Arc;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("v", DataType::Int64, false),
        ]))
    }

    fn batch(times: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(TimestampMicrosecondArray::from(times.to_vec()).with_timezone("UTC")),
                Arc::new(Int64Array::from(times.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn merges_small_batches_and_keeps_segments_apart() {
        let mut b = TableBuffer::new(schema());
        for i in 0..100 {
            b.insert(1, batch(&[i]));
        }
        b.insert(2, batch(&[500, 400]));
        assert_eq!(b.rows(), 102);
        let total: usize = b.chunks().map(|c| c.batch.num_rows()).sum();
        assert_eq!(total, 102);
        assert!(b.chunks().count() < 10, "small batches were merged");
        // Memory is what the merged chunks hold, not what came in.
        let held: usize = b.chunks().map(|c| c.batch.get_array_memory_size()).sum();
        assert_eq!(b.bytes(), held);
        assert!(
            b.chunks()
                .all(|c| c.segment == 1 || c.batch.num_rows() == 2)
        );
        let seg2 = b.chunks().find(|c| c.segment == 2).unwrap();
        assert_eq!((seg2.min_time, seg2.max_time), (400, 500));

        let through1: usize = b.batches_through(1).iter().map(|x| x.num_rows()).sum();
        assert_eq!(through1, 100);
        b.remove_through(1);
        assert_eq!(b.rows(), 2);
        assert_eq!(b.oldest_segment(), Some(2));
    }
}
