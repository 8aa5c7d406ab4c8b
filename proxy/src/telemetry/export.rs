//! Getting batches to the collector: encode once, queue within a byte
//! budget, send in order with one retry policy.
//!
//! Two tasks share the exporter thread. The *collector* takes the
//! batcher's records every flush interval (or when a batch is full),
//! numbers each batch (this proxy's random instance id + a sequence),
//! encodes it once for the wire and queues it; when the queue's bytes are
//! spent the batch is dropped and counted (`queue_full`). The *sender*
//! sends queued batches one at a time; a retryable failure (collector
//! down, busy, timed out) is retried with the same bytes after an
//! exponential backoff, until the batch has waited [`MAX_RETRY_AGE`]
//! (`export_failed`); a batch the collector refuses as invalid is dropped
//! at once (`rejected`). Retries carry the batch's id, so a batch whose
//! acknowledgement was lost is not stored twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::batcher::Batcher;
use super::metrics::{DROP_EXPORT_FAILED, DROP_QUEUE_FULL, DROP_REJECTED, Metrics};
use super::sink::{SendError, Sink};

/// How long a batch is retried before it is given up.
pub const MAX_RETRY_AGE: Duration = Duration::from_secs(60);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A batch as it goes on the wire, the same bytes for every attempt.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Arrow Flight `DoPut` messages (their buffers are shared `Bytes`).
    Flight(Vec<arrow_flight::FlightData>),
    /// An encoded OTLP `ExportTraceServiceRequest`.
    Otlp(Bytes),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::Flight(frames) => frames
                .iter()
                .map(|f| f.data_header.len() + f.data_body.len() + f.app_metadata.len())
                .sum(),
            Payload::Otlp(b) => b.len(),
        }
    }
}

/// A numbered, encoded batch waiting in the queue.
pub struct Queued {
    pub id: Bytes,
    pub rows: u64,
    pub payload: Payload,
    made: Instant,
    /// Its share of the queue's byte budget, given back when it leaves.
    _bytes: OwnedSemaphorePermit,
}

/// A producer's name for its batches: its random instance id, then the
/// sequence number, little-endian (what the collector's dedup reads).
fn batch_id(instance: &[u8; 16], seq: u64) -> Bytes {
    let mut id = Vec::with_capacity(24);
    id.extend_from_slice(instance);
    id.extend_from_slice(&seq.to_le_bytes());
    Bytes::from(id)
}

pub struct Exporter {
    pub batcher: Arc<Batcher>,
    pub sink: Sink,
    pub metrics: Arc<Metrics>,
    pub flush_interval: Duration,
    pub export_timeout: Duration,
    pub queue_bytes: usize,
    /// Most records per batch sent.
    pub batch_size: usize,
}

impl Exporter {
    /// Runs until `shutdown`; then sends what is left, for at most one
    /// export timeout, and counts what could not be sent.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let instance: [u8; 16] = rand::random();
        let budget = Arc::new(Semaphore::new(self.queue_bytes.max(1)));
        let queued_rows = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::unbounded_channel::<Queued>();
        let sender = tokio::spawn(send_all(
            rx,
            self.sink.clone(),
            self.metrics.clone(),
            self.batcher.clone(),
            self.export_timeout,
            queued_rows.clone(),
        ));
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(self.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                () = self.batcher.full.notified() => false,
                _ = shutdown.wait_for(|s| *s) => true,
            };
            for (rows, batch) in self.batcher.take() {
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot build a telemetry batch");
                        self.metrics.dropped(DROP_REJECTED, rows);
                        self.batcher.release(rows);
                        continue;
                    }
                };
                // A builder that filled while the exporter was held up goes
                // out in batches of the usual size, which the collector's
                // size limit always admits.
                let size = self.batch_size.max(1);
                let mut offset = 0;
                while offset < batch.num_rows() {
                    let part = batch.slice(offset, size.min(batch.num_rows() - offset));
                    offset += part.num_rows();
                    seq += 1;
                    self.enqueue(&tx, &budget, &queued_rows, batch_id(&instance, seq), part)
                        .await;
                }
            }
            if stopping {
                break;
            }
        }
        drop(tx);
        // Everything queued goes out, within one export timeout in all: a
        // collector that takes packets without answering must not hold
        // shutdown for a timeout per batch.
        let abort = sender.abort_handle();
        if tokio::time::timeout(self.export_timeout, sender)
            .await
            .is_err()
        {
            abort.abort();
            let left = queued_rows.load(Ordering::Relaxed);
            self.metrics.dropped(DROP_EXPORT_FAILED, left);
            tracing::warn!(
                records = left,
                "telemetry export did not finish before shutdown; records dropped"
            );
        }
    }
}

impl Exporter {
    /// Encodes a numbered batch and queues it, or drops and counts it when
    /// the queue's bytes are spent.
    async fn enqueue(
        &self,
        tx: &mpsc::UnboundedSender<Queued>,
        budget: &Arc<Semaphore>,
        queued_rows: &AtomicU64,
        id: Bytes,
        batch: arrow::record_batch::RecordBatch,
    ) {
        let rows = batch.num_rows() as u64;
        let payload = match self.sink.encode(&id, batch).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a telemetry batch");
                self.metrics.dropped(DROP_REJECTED, rows);
                self.batcher.release(rows);
                return;
            }
        };
        let size = payload.len().clamp(1, self.queue_bytes.max(1));
        let Ok(permit) = budget.clone().try_acquire_many_owned(size as u32) else {
            self.metrics.dropped(DROP_QUEUE_FULL, rows);
            self.batcher.release(rows);
            return;
        };
        queued_rows.fetch_add(rows, Ordering::Relaxed);
        let _ = tx.send(Queued {
            id,
            rows,
            payload,
            made: Instant::now(),
            _bytes: permit,
        });
    }
}

/// Sends queued batches in order until the queue closes.
async fn send_all(
    mut rx: mpsc::UnboundedReceiver<Queued>,
    mut sink: Sink,
    metrics: Arc<Metrics>,
    batcher: Arc<Batcher>,
    timeout: Duration,
    queued_rows: Arc<AtomicU64>,
) {
    let mut backoff = BACKOFF_START;
    let mut last_warning: Option<Instant> = None;
    let mut warn = |message: &str, records: u64| {
        let now = Instant::now();
        // One warning per interval: a down collector must not flood logs.
        if last_warning.is_none_or(|t| now.duration_since(t) > Duration::from_secs(10)) {
            last_warning = Some(now);
            tracing::warn!(records, error = message, "telemetry export failed");
        }
    };
    while let Some(batch) = rx.recv().await {
        loop {
            let result = match tokio::time::timeout(timeout, sink.send(&batch)).await {
                Ok(r) => r,
                Err(_) => Err(SendError::Retry(format!("no answer within {timeout:?}"))),
            };
            match result {
                Ok(()) => {
                    metrics.exported(sink.protocol(), batch.rows);
                    backoff = BACKOFF_START;
                    break;
                }
                Err(SendError::Reject(m)) => {
                    metrics.dropped(DROP_REJECTED, batch.rows);
                    warn(&format!("the collector refused a batch: {m}"), batch.rows);
                    break;
                }
                Err(SendError::Retry(m)) => {
                    if batch.made.elapsed() >= MAX_RETRY_AGE {
                        metrics.dropped(DROP_EXPORT_FAILED, batch.rows);
                        warn(&format!("{m}; gave up after {MAX_RETRY_AGE:?}"), batch.rows);
                        break;
                    }
                    warn(&format!("{m}; retrying"), batch.rows);
                    // Full jitter keeps a fleet of proxies from retrying in step.
                    let pause = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        queued_rows.fetch_sub(batch.rows, Ordering::Relaxed);
        batcher.release(batch.rows);
    }
}
