//! Ingest: OTLP payloads in (gRPC on 4317, HTTP on 4318), rows out to the
//! WAL. A payload is decoded and validated whole before anything is
//! written; it is acknowledged only once the WAL has fsynced it.

pub mod conform;
pub mod convert;
pub mod flight;
pub mod grpc;
pub mod http;
pub mod remote_write;
pub mod shape;
pub mod signals;

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lumen_core::load::{Pressure, PressureGuard};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use arrow::record_batch::RecordBatch;
use lumen_core::schema::{ROLLUPS, TABLES, table_schema};

use crate::dedup::BatchId;
use crate::export::Item;
use crate::health;
use crate::metrics::Refusal;
use crate::store::{Store, table_index};
use crate::wal::{Stored, WalHandle};

/// Why a payload was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    /// The client sent something wrong; retrying will not help.
    #[error("{0}")]
    Invalid(String),
    /// The collector cannot store data right now; the client may retry.
    #[error("{0}")]
    Unavailable(String),
    /// The collector holds as much as its memory bound allows (or as many
    /// payloads as it takes at once); the client should retry shortly.
    #[error("{0}")]
    Exhausted(String),
}

/// How long an exhausted collector asks clients to wait before retrying.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

impl IngestError {
    /// As a gRPC status: INVALID_ARGUMENT, UNAVAILABLE, or
    /// RESOURCE_EXHAUSTED with `RetryInfo` (OTLP clients retry that only
    /// when told when to).
    pub fn to_status(&self) -> tonic::Status {
        use tonic_types::{ErrorDetails, StatusExt};
        match self {
            IngestError::Invalid(m) => tonic::Status::invalid_argument(m),
            IngestError::Unavailable(m) => tonic::Status::unavailable(m),
            IngestError::Exhausted(m) => tonic::Status::with_error_details(
                tonic::Code::ResourceExhausted,
                m,
                ErrorDetails::with_retry_info(Some(RETRY_AFTER)),
            ),
        }
    }
}

/// Payload counters, for logs and status.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Rows stored (spans and Arrow rows alike).
    pub accepted_spans: AtomicU64,
    pub rejected_payloads: AtomicU64,
    /// Data points and log records left out of accepted payloads.
    pub rejected_items: AtomicU64,
    /// Retried batches recognised as stored before.
    pub duplicate_batches: AtomicU64,
}

/// The three OTLP signals and where each goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
    Logs,
}

impl Signal {
    pub const ALL: [Signal; 3] = [Signal::Traces, Signal::Metrics, Signal::Logs];

    /// The OTLP/HTTP path.
    pub fn http_path(self) -> &'static str {
        match self {
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
            Signal::Logs => "/v1/logs",
        }
    }

    /// The gRPC service.
    pub fn grpc_service(self) -> &'static str {
        match self {
            Signal::Traces => "opentelemetry.proto.collector.trace.v1.TraceService",
            Signal::Metrics => "opentelemetry.proto.collector.metrics.v1.MetricsService",
            Signal::Logs => "opentelemetry.proto.collector.logs.v1.LogsService",
        }
    }

    /// Its name, as in metrics' `signal` label.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
        }
    }

    /// What its items are called, in messages.
    pub fn items(self) -> &'static str {
        match self {
            Signal::Traces => "spans",
            Signal::Metrics => "data points",
            Signal::Logs => "log records",
        }
    }

    /// The export request's message name, in messages.
    fn request_name(self) -> &'static str {
        match self {
            Signal::Traces => "ExportTraceServiceRequest",
            Signal::Metrics => "ExportMetricsServiceRequest",
            Signal::Logs => "ExportLogsServiceRequest",
        }
    }

    /// The export response: empty, or OTLP's partial success.
    pub fn response(self, accepted: &Accepted) -> ExportResponse {
        use opentelemetry_proto::tonic::collector::{logs, metrics, trace};
        let message = accepted.message.clone().unwrap_or_default();
        let rejected = accepted.rejected as i64;
        let partial = accepted.rejected > 0;
        match self {
            Signal::Traces => ExportResponse::Traces(trace::v1::ExportTraceServiceResponse {
                partial_success: partial.then_some(trace::v1::ExportTracePartialSuccess {
                    rejected_spans: rejected,
                    error_message: message,
                }),
            }),
            Signal::Metrics => ExportResponse::Metrics(metrics::v1::ExportMetricsServiceResponse {
                partial_success: partial.then_some(metrics::v1::ExportMetricsPartialSuccess {
                    rejected_data_points: rejected,
                    error_message: message,
                }),
            }),
            Signal::Logs => ExportResponse::Logs(logs::v1::ExportLogsServiceResponse {
                partial_success: partial.then_some(logs::v1::ExportLogsPartialSuccess {
                    rejected_log_records: rejected,
                    error_message: message,
                }),
            }),
        }
    }
}

/// An export response of any signal, to encode as the request was.
#[derive(Debug)]
pub enum ExportResponse {
    Traces(opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse),
    Metrics(opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse),
    Logs(opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse),
}

impl ExportResponse {
    pub fn protobuf(&self) -> Vec<u8> {
        match self {
            ExportResponse::Traces(r) => r.encode_to_vec(),
            ExportResponse::Metrics(r) => r.encode_to_vec(),
            ExportResponse::Logs(r) => r.encode_to_vec(),
        }
    }

    pub fn json(&self) -> String {
        let v = match self {
            ExportResponse::Traces(r) => serde_json::to_string(r),
            ExportResponse::Metrics(r) => serde_json::to_string(r),
            ExportResponse::Logs(r) => serde_json::to_string(r),
        };
        v.unwrap_or_else(|_| "{}".into())
    }
}

/// What an export stored, and what it left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accepted {
    pub rows: usize,
    pub rejected: usize,
    /// Why items were rejected (the first one's path and reason).
    pub message: Option<String>,
}

/// How a payload is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From a `Content-Encoding` or `grpc-encoding` value.
    pub fn from_header(v: Option<&[u8]>) -> Result<Self, String> {
        match v {
            None | Some(b"identity") => Ok(Compression::None),
            Some(b"gzip") => Ok(Compression::Gzip),
            Some(b"zstd") => Ok(Compression::Zstd),
            Some(other) => Err(format!(
                "`{}` is not supported (use gzip, zstd or identity)",
                String::from_utf8_lossy(other)
            )),
        }
    }
}

/// How an OTLP payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Protobuf,
    Json,
}

/// Bounds on what ingest takes on at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_hot_bytes: usize,
    pub max_inflight_payloads: usize,
    /// Items per payload, attributes per item and their sizes.
    pub shape: shape::Shape,
}

/// How long a payload waits for a free slot before it is refused.
const ADMISSION_WAIT: Duration = Duration::from_secs(2);

/// The ingest front door shared by the gRPC and HTTP receivers.
#[derive(Debug, Clone)]
pub struct Ingest {
    wal: WalHandle,
    store: Arc<Store>,
    limits: Limits,
    stats: Arc<IngestStats>,
    /// Payloads between admission and acknowledgement. Raw bytes, decoded
    /// requests and Arrow batches all live within this window, so it bounds
    /// ingest's memory however many clients send at once.
    inflight: Arc<Semaphore>,
    /// Payloads being decoded and converted at once. A decoded request can
    /// take many times its encoded size (an empty span is 2 bytes on the
    /// wire, hundreds in memory), so this bounds the memory ingest can take.
    decoding: Arc<Semaphore>,
    /// Marked while a payload is decoded and stored, and briefly while it
    /// arrives, so that query threads step aside while ingest has work.
    pressure: Pressure,
    /// Where stored payloads are forwarded (none by default).
    fanout: crate::export::Fanout,
}

/// A payload's place in ingest, held from before its body is read until it
/// is acknowledged.
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    /// Ingest counts as busy while the payload's body arrives, but for
    /// [`RECEIVING_BUSY`] at most: a client that stalls mid-body must not
    /// hold query threads back.
    _receiving: ReceivingBusy,
}

/// Longest time a payload's arrival marks ingest as busy.
const RECEIVING_BUSY: Duration = Duration::from_millis(100);

/// The busy mark of a payload that is arriving: released when the
/// admission ends or after [`RECEIVING_BUSY`], whichever comes first.
#[derive(Debug)]
struct ReceivingBusy(Arc<std::sync::Mutex<Option<PressureGuard>>>);

impl ReceivingBusy {
    fn enter(pressure: &Pressure) -> Self {
        let mark = Arc::new(std::sync::Mutex::new(Some(pressure.enter())));
        let timer = mark.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RECEIVING_BUSY).await;
            timer.lock().unwrap_or_else(|e| e.into_inner()).take();
        });
        ReceivingBusy(mark)
    }
}

impl Drop for ReceivingBusy {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl Ingest {
    pub fn new(wal: WalHandle, store: Arc<Store>, limits: Limits) -> Self {
        let permits = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(2);
        Ingest {
            wal,
            store,
            limits,
            stats: Arc::default(),
            inflight: Arc::new(Semaphore::new(limits.max_inflight_payloads.max(1))),
            decoding: Arc::new(Semaphore::new(permits)),
            pressure: Pressure::new(),
            fanout: Default::default(),
        }
    }

    /// Logs and stores batches made in this process (the policy engine's
    /// events).
    pub fn wal(&self) -> WalHandle {
        self.wal.clone()
    }

    /// Forwards what is stored from now on to `fanout`'s endpoints.
    pub fn set_fanout(&mut self, fanout: crate::export::Fanout) {
        self.fanout = fanout;
    }

    /// Active while ingest decodes or stores a payload.
    pub fn pressure(&self) -> &Pressure {
        &self.pressure
    }

    /// Takes a place for one payload, refusing it (as retryable) while the
    /// collector cannot store data or is too far behind to take more.
    pub async fn admit(&self) -> Result<Admission, IngestError> {
        // A failing WAL is not checked here: the next append is what tries
        // a fresh segment, and it answers unavailable itself while failing.
        let metrics = self.store.metrics();
        if let Some(refusal) = self.over_hot_cap() {
            metrics.refused(Refusal::Memory);
            return Err(IngestError::Exhausted(refusal));
        }
        match tokio::time::timeout(ADMISSION_WAIT, self.inflight.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Admission {
                _permit: permit,
                _receiving: ReceivingBusy::enter(&self.pressure),
            }),
            Ok(Err(_)) => {
                metrics.refused(Refusal::Shutdown);
                Err(IngestError::Unavailable(
                    "collector is shutting down".into(),
                ))
            }
            Err(_) => {
                metrics.refused(Refusal::Busy);
                Err(IngestError::Exhausted(format!(
                    "collector is busy: {} payloads in progress; retry later",
                    self.limits.max_inflight_payloads
                )))
            }
        }
    }

    fn over_hot_cap(&self) -> Option<String> {
        let hot = self.store.hot_bytes();
        (hot > self.limits.max_hot_bytes).then(|| {
            format!(
                "{} MiB of rows wait to be flushed to Parquet, over the limit of {} MiB; retry later",
                hot >> 20,
                self.limits.max_hot_bytes >> 20
            )
        })
    }

    /// Refuses every payload not yet admitted, as the collector stops.
    pub fn close(&self) {
        self.inflight.close();
    }

    /// What stops ingest now, or may soon.
    pub fn health(&self) -> health::Report {
        let mut report = health::Report::default();
        let h = self.store.health();
        if let Some(e) = h.wal_problem() {
            report
                .refusing
                .push(format!("the WAL cannot be written: {e}"));
        }
        report.refusing.extend(self.over_hot_cap());
        if let Some(e) = h.flush_problem() {
            report.degraded.push(format!(
                "flushing to Parquet fails (rows stay in the WAL): {e}"
            ));
        }
        if let Some(e) = h.others_problem() {
            report.degraded.push(e);
        }
        report
    }

    /// Largest payload accepted, compressed or not.
    pub fn max_request_bytes(&self) -> usize {
        self.limits.max_request_bytes
    }

    pub fn stats(&self) -> &IngestStats {
        &self.stats
    }

    /// Decodes, validates and stores one encoded export request; returns
    /// how many spans were stored. The admission shows there is room for it.
    pub async fn traces(
        &self,
        _admitted: &Admission,
        payload: &[u8],
        encoding: Encoding,
    ) -> Result<Accepted, IngestError> {
        let _busy = self.pressure.enter();
        let converted = {
            let _permit = self
                .decoding
                .acquire()
                .await
                .map_err(|_| IngestError::Unavailable("collector is shutting down".into()))?;
            let req = match encoding {
                Encoding::Protobuf => self.decode_protobuf(payload)?,
                Encoding::Json => self.decode_json(payload)?,
            };
            self.limits
                .shape
                .traces(&req)
                .map_err(|m| self.rejected(IngestError::Invalid(m)))?;
            match convert::convert_traces(&req, convert::TimeWindow::around_now()) {
                Ok(c) => {
                    let forward = self.forwarded(Signal::Traces, payload, encoding, &req, || {
                        c.batches.iter().map(|(_, b)| b.num_rows()).sum::<usize>() + c.rejected
                    });
                    (c, forward)
                }
                Err(e) => {
                    return Err(self.rejected(IngestError::Invalid(format!("invalid span: {e}"))));
                }
            }
        };
        let (converted, forward) = converted;
        let rows: usize = converted.batches.iter().map(|(_, b)| b.num_rows()).sum();
        if rows > 0 {
            self.wal.append(converted.batches).await.map_err(|e| {
                self.store.metrics().refused(Refusal::Storage);
                IngestError::Unavailable(format!("cannot store spans: {e}"))
            })?;
        }
        self.stats
            .accepted_spans
            .fetch_add(rows as u64, Ordering::Relaxed);
        let rejected = converted.rejected;
        if rejected > 0 {
            self.stats
                .rejected_items
                .fetch_add(rejected as u64, Ordering::Relaxed);
        }
        if let Some(item) = forward {
            self.fanout.offer(|| item);
        }
        Ok(Accepted {
            rows,
            rejected,
            message: converted.first.map(|e| {
                format!(
                    "{rejected} of {} spans rejected; the first: {e}",
                    rejected + rows
                )
            }),
        })
    }

    /// Decodes, validates and stores one export request of any signal.
    /// Items that are invalid on their own are left out and counted
    /// (partial success); a payload that cannot be decoded is rejected whole.
    pub async fn export(
        &self,
        admitted: &Admission,
        signal: Signal,
        payload: &[u8],
        encoding: Encoding,
    ) -> Result<Accepted, IngestError> {
        let metrics = self.store.metrics();
        metrics.received(signal.name(), payload.len());
        if signal == Signal::Traces {
            let accepted = self.traces(admitted, payload, encoding).await?;
            metrics.items(signal.name(), accepted.rows, accepted.rejected);
            return Ok(accepted);
        }
        let _busy = self.pressure.enter();
        let converted = {
            let _permit = self
                .decoding
                .acquire()
                .await
                .map_err(|_| IngestError::Unavailable("collector is shutting down".into()))?;
            let window = convert::TimeWindow::around_now();
            let (converted, item) = match signal {
                Signal::Metrics => {
                    let req: ExportMetricsServiceRequest =
                        self.decode(signal, payload, encoding)?;
                    self.limits
                        .shape
                        .metrics(&req)
                        .map_err(|m| self.rejected(IngestError::Invalid(m)))?;
                    let c = signals::convert_metrics(&req, window);
                    let items = || c.as_ref().map_or(0, |c| c.rows + c.rejected);
                    let item = self.forwarded(signal, payload, encoding, &req, items);
                    (c, item)
                }
                _ => {
                    let req: ExportLogsServiceRequest = self.decode(signal, payload, encoding)?;
                    self.limits
                        .shape
                        .logs(&req)
                        .map_err(|m| self.rejected(IngestError::Invalid(m)))?;
                    let c = signals::convert_logs(&req, window);
                    let items = || c.as_ref().map_or(0, |c| c.rows + c.rejected);
                    let item = self.forwarded(signal, payload, encoding, &req, items);
                    (c, item)
                }
            };
            let converted = converted.map_err(|e| {
                self.rejected(IngestError::Invalid(format!("cannot build rows: {e}")))
            })?;
            (converted, item)
        };
        let (converted, item) = converted;
        if converted.rows > 0 {
            self.wal.append(converted.batches).await.map_err(|e| {
                metrics.refused(Refusal::Storage);
                IngestError::Unavailable(format!("cannot store {}: {e}", signal.items()))
            })?;
        }
        metrics.items(signal.name(), converted.rows, converted.rejected);
        if let Some(item) = item {
            // Forwarded as received; the endpoint judges bad items itself.
            self.fanout.offer(|| item);
        }
        self.stats
            .accepted_spans
            .fetch_add(converted.rows as u64, Ordering::Relaxed);
        if converted.rejected > 0 {
            self.stats
                .rejected_items
                .fetch_add(converted.rejected as u64, Ordering::Relaxed);
        }
        Ok(Accepted {
            rows: converted.rows,
            rejected: converted.rejected,
            message: converted.first_error.map(|e| {
                format!(
                    "{} of {} {} rejected; the first: {e}",
                    converted.rejected,
                    converted.rejected + converted.rows,
                    signal.items()
                )
            }),
        })
    }

    /// What goes to the export fan-out for a payload (nothing without
    /// export targets): the protobuf as received, or JSON re-encoded.
    fn forwarded<M: Message>(
        &self,
        signal: Signal,
        payload: &[u8],
        encoding: Encoding,
        req: &M,
        items: impl FnOnce() -> usize,
    ) -> Option<Item> {
        if self.fanout.is_empty() {
            return None;
        }
        let bytes = match encoding {
            Encoding::Protobuf => bytes::Bytes::copy_from_slice(payload),
            Encoding::Json => bytes::Bytes::from(req.encode_to_vec()),
        };
        Some(Item::Encoded {
            signal,
            bytes,
            items: items(),
        })
    }

    /// Decodes an export request of `signal` from protobuf or OTLP/JSON.
    fn decode<M: Message + Default + serde::de::DeserializeOwned>(
        &self,
        signal: Signal,
        bytes: &[u8],
        encoding: Encoding,
    ) -> Result<M, IngestError> {
        let name = signal.request_name();
        match encoding {
            Encoding::Protobuf => M::decode(bytes)
                .map_err(|e| format!("malformed {name} ({} bytes of protobuf): {e}", bytes.len())),
            Encoding::Json => serde_json::from_slice(bytes)
                .map_err(|e| format!("malformed OTLP/JSON {name}: {e}")),
        }
        .map_err(|m| self.rejected(IngestError::Invalid(m)))
    }

    /// Stores Arrow batches of `table` sent by a producer that numbers its
    /// batches (`origin`): checked against the table's schema and time
    /// window, then appended whole. A retried batch whose first attempt was
    /// stored is acknowledged again without being stored twice. Returns the
    /// rows the batch holds and whether it was new.
    pub async fn arrow(
        &self,
        _admitted: &Admission,
        table: &str,
        origin: Option<BatchId>,
        batches: Vec<RecordBatch>,
    ) -> Result<(usize, Stored), IngestError> {
        let _busy = self.pressure.enter();
        if table == ROLLUPS {
            return Err(self.rejected(IngestError::Invalid(
                "`rollups` is kept by the collector from `requests`; it takes no rows".into(),
            )));
        }
        let (Some(index), Some(schema)) = (table_index(table), table_schema(table)) else {
            return Err(self.rejected(IngestError::Invalid(format!(
                "unknown table `{table}`; Lumen takes Arrow batches for {}",
                TABLES.join(", ")
            ))));
        };
        let sent: usize = batches.iter().map(RecordBatch::num_rows).sum();
        self.limits
            .shape
            .rows(sent, table)
            .map_err(|m| self.rejected(IngestError::Invalid(m)))?;
        let window = convert::TimeWindow::around_now();
        let mut entries = Vec::with_capacity(batches.len());
        for (i, batch) in batches.iter().enumerate() {
            let conformed = conform::conform(&schema, batch)
                .and_then(|b| conform::check_times(&b, window).map(|()| b))
                .map_err(|e| {
                    self.rejected(IngestError::Invalid(format!(
                        "batch {i} for `{table}`: {e}"
                    )))
                })?;
            if conformed.num_rows() > 0 {
                entries.push((index, conformed));
            }
        }
        // One WAL entry per numbered batch: an entry is whole or torn, so a
        // crash can never keep part of a batch whose id replay then trusts.
        let rows: usize = entries.iter().map(|(_, b)| b.num_rows()).sum();
        if entries.len() > 1 {
            let parts: Vec<RecordBatch> = entries.drain(..).map(|(_, b)| b).collect();
            let whole = arrow::compute::concat_batches(&schema, &parts).map_err(|e| {
                self.rejected(IngestError::Invalid(format!("batches for `{table}`: {e}")))
            })?;
            entries.push((index, whole));
        }
        // RecordBatch clones share their buffers.
        let for_export: Vec<RecordBatch> = if self.fanout.is_empty() {
            Vec::new()
        } else {
            entries.iter().map(|(_, b)| b.clone()).collect()
        };
        let stored = self.wal.append_once(origin, entries).await.map_err(|e| {
            self.store.metrics().refused(Refusal::Storage);
            IngestError::Unavailable(format!("cannot store rows: {e}"))
        })?;
        if stored == Stored::Written {
            self.store.metrics().items("arrow", rows, 0);
            if table == lumen_core::schema::REQUESTS {
                for b in for_export {
                    self.fanout.offer(|| Item::Requests(b));
                }
            }
            self.stats
                .accepted_spans
                .fetch_add(rows as u64, Ordering::Relaxed);
        } else {
            self.stats.duplicate_batches.fetch_add(1, Ordering::Relaxed);
            if let Some(id) = origin {
                // Rare (a lost acknowledgement), and worth knowing about.
                tracing::info!(
                    producer = %lumen_core::schema::hex_id(&id.producer),
                    seq = id.seq,
                    rows,
                    "batch was stored before; acknowledged again without storing it twice"
                );
            }
        }
        Ok((rows, stored))
    }

    fn rejected(&self, e: IngestError) -> IngestError {
        self.stats.rejected_payloads.fetch_add(1, Ordering::Relaxed);
        self.store.metrics().refused(Refusal::Invalid);
        tracing::debug!(error = %e, "rejected OTLP payload");
        e
    }

    /// Decodes a protobuf `ExportTraceServiceRequest`.
    fn decode_protobuf(&self, bytes: &[u8]) -> Result<ExportTraceServiceRequest, IngestError> {
        ExportTraceServiceRequest::decode(bytes).map_err(|e| {
            self.rejected(IngestError::Invalid(format!(
                "malformed ExportTraceServiceRequest ({} bytes of protobuf): {e}",
                bytes.len()
            )))
        })
    }

    /// Decodes OTLP/JSON.
    fn decode_json(&self, bytes: &[u8]) -> Result<ExportTraceServiceRequest, IngestError> {
        serde_json::from_slice(bytes).map_err(|e| {
            self.rejected(IngestError::Invalid(format!(
                "malformed OTLP/JSON ExportTraceServiceRequest: {e}"
            )))
        })
    }

    /// Inflates a gzip payload, refusing to grow it past the size limit.
    pub fn gunzip(&self, bytes: &[u8]) -> Result<Vec<u8>, IngestError> {
        self.decompress(bytes, Compression::Gzip)
    }

    /// Inflates a compressed payload, refusing to grow it past the size
    /// limit (a small bomb must not become gigabytes).
    pub fn decompress(&self, bytes: &[u8], how: Compression) -> Result<Vec<u8>, IngestError> {
        let mut out = Vec::new();
        let limit = self.limits.max_request_bytes as u64;
        let read = match how {
            Compression::None => return Ok(bytes.to_vec()),
            Compression::Gzip => flate2::read::GzDecoder::new(bytes)
                .take(limit + 1)
                .read_to_end(&mut out),
            Compression::Zstd => zstd::stream::read::Decoder::new(bytes)
                .and_then(|d| d.take(limit + 1).read_to_end(&mut out)),
        };
        read.map_err(|e| {
            let name = if how == Compression::Gzip {
                "gzip"
            } else {
                "zstd"
            };
            self.rejected(IngestError::Invalid(format!("invalid {name} payload: {e}")))
        })?;
        if out.len() as u64 > limit {
            return Err(self.too_large(None));
        }
        Ok(out)
    }

    pub fn too_large(&self, declared: Option<usize>) -> IngestError {
        let size = declared.map_or_else(
            || "more than the limit".to_string(),
            |n| format!("{n} bytes"),
        );
        self.rejected(IngestError::Invalid(format!(
            "payload of {size} exceeds the limit of {} bytes",
            self.limits.max_request_bytes
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use std::time::{SystemTime, UNIX_EPOCH};

    fn payload() -> Vec<u8> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![7; 16],
                        span_id: vec![8; 8],
                        name: "work".into(),
                        start_time_unix_nano: now,
                        end_time_unix_nano: now + 1_000,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
        .encode_to_vec()
    }

    fn ingest(dir: &std::path::Path, limits: Limits) -> (Ingest, Arc<Store>) {
        let store = Arc::new(Store::new());
        let (wal, _thread, _) = crate::wal::open(dir, store.clone()).unwrap();
        (Ingest::new(wal, store.clone(), limits), store)
    }

    const LIMITS: Limits = Limits {
        max_request_bytes: 1 << 20,
        max_hot_bytes: 1 << 30,
        max_inflight_payloads: 4,
        shape: shape::Shape {
            max_items: shape::DEFAULT_MAX_ITEMS,
            max_attributes: shape::DEFAULT_MAX_ATTRIBUTES,
            max_key_bytes: shape::DEFAULT_MAX_KEY_BYTES,
            max_value_bytes: shape::DEFAULT_MAX_VALUE_BYTES,
        },
    };

    /// 64 MiB of zeros, compressed as `how`: a few kilobytes on the wire.
    fn bomb(how: Compression) -> Vec<u8> {
        use std::io::Write;
        let zeros = vec![0u8; 64 << 20];
        match how {
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
                e.write_all(&zeros).unwrap();
                e.finish().unwrap()
            }
            Compression::Zstd => zstd::stream::encode_all(&zeros[..], 19).unwrap(),
            Compression::None => zeros,
        }
    }

    #[tokio::test]
    async fn a_compression_bomb_is_refused_at_the_limit_and_a_real_payload_inflates() {
        let dir = tempfile::tempdir().unwrap();
        let (ingest, _) = ingest(dir.path(), LIMITS);
        for how in [Compression::Gzip, Compression::Zstd] {
            let small = bomb(how);
            assert!(
                small.len() < 256 << 10,
                "{how:?}: {} bytes on the wire",
                small.len()
            );
            let err = ingest.decompress(&small, how).unwrap_err();
            assert!(
                err.to_string()
                    .contains("exceeds the limit of 1048576 bytes"),
                "{how:?}: {err}"
            );
        }
        let real = payload();
        let gz = {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&real).unwrap();
            e.finish().unwrap()
        };
        assert_eq!(ingest.decompress(&gz, Compression::Gzip).unwrap(), real);
        let zs = zstd::stream::encode_all(&real[..], 3).unwrap();
        assert_eq!(ingest.decompress(&zs, Compression::Zstd).unwrap(), real);
        let err = ingest
            .decompress(b"not gzip at all", Compression::Gzip)
            .unwrap_err();
        assert!(err.to_string().contains("invalid gzip payload"), "{err}");
    }

    #[tokio::test]
    async fn past_the_hot_cap_payloads_are_refused_as_retryable_until_rows_are_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let (ingest, store) = ingest(
            dir.path(),
            Limits {
                max_hot_bytes: 1,
                ..LIMITS
            },
        );
        let admitted = ingest.admit().await.unwrap();
        assert_eq!(
            ingest
                .traces(&admitted, &payload(), Encoding::Protobuf)
                .await
                .unwrap()
                .rows,
            1
        );
        drop(admitted);
        let refused = ingest.admit().await.unwrap_err();
        assert!(
            matches!(&refused, IngestError::Exhausted(m) if m.contains("flushed to Parquet")),
            "{refused:?}"
        );
        assert_eq!(ingest.health().refusing.len(), 1);
        // Once the rows are in Parquet the collector takes data again.
        let tables = dir.path().join("tables");
        let persister = crate::persist::Persister {
            storage: Arc::new(crate::storage::Storage::local(&tables).unwrap()),
            orphans: Arc::default(),
            wal_dir: dir.path().to_path_buf(),
            wal: ingest.wal.clone(),
            store: store.clone(),
            running: Arc::default(),
        };
        persister.flush().await.unwrap();
        assert!(ingest.health().refusing.is_empty());
        ingest.admit().await.unwrap();
    }

    #[tokio::test]
    async fn payloads_beyond_the_inflight_limit_wait_then_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ingest, _store) = ingest(
            dir.path(),
            Limits {
                max_inflight_payloads: 1,
                ..LIMITS
            },
        );
        let first = ingest.admit().await.unwrap();
        let refused = ingest.admit().await.unwrap_err();
        assert!(
            matches!(&refused, IngestError::Exhausted(m) if m.contains("busy")),
            "{refused:?}"
        );
        drop(first);
        ingest.admit().await.unwrap();
    }

    #[tokio::test]
    async fn ingest_is_busy_while_storing_and_briefly_while_a_body_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let (ingest, _store) = ingest(dir.path(), LIMITS);
        assert!(!ingest.pressure().is_active());
        let admitted = ingest.admit().await.unwrap();
        assert!(ingest.pressure().is_active(), "a payload is arriving");
        // A client stalling mid-body stops counting as busy.
        tokio::time::sleep(RECEIVING_BUSY * 3).await;
        assert!(!ingest.pressure().is_active());
        drop(admitted);
        let admitted = ingest.admit().await.unwrap();
        ingest
            .traces(&admitted, &payload(), Encoding::Protobuf)
            .await
            .unwrap();
        drop(admitted);
        assert!(!ingest.pressure().is_active(), "nothing left in progress");
    }
}
