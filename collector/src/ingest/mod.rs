//! Ingest: OTLP payloads in (gRPC on 4317, HTTP on 4318), rows out to the
//! WAL. A payload is decoded and validated whole before anything is
//! written; it is acknowledged only once the WAL has fsynced it.

pub mod convert;
pub mod grpc;
pub mod http;

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

use crate::wal::WalHandle;

/// Why a payload was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    /// The client sent something wrong; retrying will not help.
    #[error("{0}")]
    Invalid(String),
    /// The collector cannot store data right now; the client may retry.
    #[error("{0}")]
    Unavailable(String),
}

/// Payload counters, for logs and status.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub accepted_spans: AtomicU64,
    pub rejected_payloads: AtomicU64,
}

/// How an OTLP payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Protobuf,
    Json,
}

/// The ingest front door shared by the gRPC and HTTP receivers.
#[derive(Debug, Clone)]
pub struct Ingest {
    wal: WalHandle,
    max_request_bytes: usize,
    stats: Arc<IngestStats>,
    /// Payloads being decoded and converted at once. A decoded request can
    /// take many times its encoded size (an empty span is 2 bytes on the
    /// wire, hundreds in memory), so this bounds the memory ingest can take.
    decoding: Arc<tokio::sync::Semaphore>,
}

impl Ingest {
    pub fn new(wal: WalHandle, max_request_bytes: usize) -> Self {
        let permits = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(2);
        Ingest {
            wal,
            max_request_bytes,
            stats: Arc::default(),
            decoding: Arc::new(tokio::sync::Semaphore::new(permits)),
        }
    }

    /// Largest payload accepted, compressed or not.
    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
    }

    pub fn stats(&self) -> &IngestStats {
        &self.stats
    }

    /// Decodes, validates and stores one encoded export request; returns
    /// how many spans were stored.
    pub async fn traces(&self, payload: &[u8], encoding: Encoding) -> Result<usize, IngestError> {
        let batches = {
            let _permit = self
                .decoding
                .acquire()
                .await
                .map_err(|_| IngestError::Unavailable("collector is shutting down".into()))?;
            let req = match encoding {
                Encoding::Protobuf => self.decode_protobuf(payload)?,
                Encoding::Json => self.decode_json(payload)?,
            };
            match convert::convert_traces(&req, convert::TimeWindow::around_now()) {
                Ok(b) => b,
                Err(e) => {
                    return Err(self.rejected(IngestError::Invalid(format!("invalid span: {e}"))));
                }
            }
        };
        let rows: usize = batches.iter().map(|(_, b)| b.num_rows()).sum();
        self.wal
            .append(batches)
            .await
            .map_err(|e| IngestError::Unavailable(format!("cannot store spans: {e}")))?;
        self.stats
            .accepted_spans
            .fetch_add(rows as u64, Ordering::Relaxed);
        Ok(rows)
    }

    fn rejected(&self, e: IngestError) -> IngestError {
        self.stats.rejected_payloads.fetch_add(1, Ordering::Relaxed);
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
        let mut out = Vec::new();
        let limit = self.max_request_bytes as u64;
        flate2::read::GzDecoder::new(bytes)
            .take(limit + 1)
            .read_to_end(&mut out)
            .map_err(|e| {
                self.rejected(IngestError::Invalid(format!("invalid gzip payload: {e}")))
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
            self.max_request_bytes
        )))
    }
}
