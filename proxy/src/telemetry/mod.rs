//! Per-request telemetry: every finished request becomes one
//! [`RequestRecord`], counted in Prometheus metrics and appended to Arrow
//! column builders ([`batcher`]). An exporter thread turns the builders'
//! contents into record batches and sends them ([`export`]) — as Arrow
//! Flight to Lumen's collector, or as OTLP spans to any OpenTelemetry
//! collector ([`sink`]). Every bound drops and counts instead of waiting:
//! the request path never waits for telemetry.

pub mod batcher;
pub mod channel;
pub mod export;
pub mod metrics;
pub mod sink;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use lumen_core::{RequestRecord, Workload};
use tokio::sync::watch;

pub use metrics::Metrics;

use self::batcher::Batcher;
use self::export::Exporter;
use self::sink::Sink;

/// The wire protocol records leave in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportProtocol {
    /// Arrow record batches over Arrow Flight `DoPut`, to Lumen's collector:
    /// columnar end to end, and stored exactly once.
    Arrow,
    /// OTLP/gRPC spans, for any OpenTelemetry collector or Jaeger.
    Otlp,
}

impl FromStr for ExportProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "arrow" => Ok(ExportProtocol::Arrow),
            "otlp" => Ok(ExportProtocol::Otlp),
            other => Err(format!("unknown export protocol `{other}`: arrow or otlp")),
        }
    }
}

/// How records leave the proxy.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Export records at all; metrics are kept either way.
    pub export: bool,
    pub protocol: ExportProtocol,
    /// gRPC endpoint of the collector, e.g. `http://127.0.0.1:4317`, or
    /// `https://…` (mutual TLS with the proxy's mesh certificate).
    pub collector_endpoint: String,
    /// Roots an `https://` collector is checked against, besides the
    /// mesh's.
    pub collector_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Records recorded and not yet acknowledged by the collector; beyond
    /// this (collector down or slow, exporter stalled) new ones are dropped
    /// and counted.
    pub queue_capacity: usize,
    /// Encoded batches waiting to be sent, in bytes; beyond this (the
    /// collector down or slow) new batches are dropped and counted.
    pub queue_bytes: usize,
    /// Records per batch: a batch leaves when it is this full, or at the
    /// next flush.
    pub batch_size: usize,
    /// How often records are taken from the builders: the longest a record
    /// waits to leave.
    pub flush_interval: Duration,
    /// Longest one export call may take.
    pub export_timeout: Duration,
    /// Threads that record (the proxy's workers); builders are kept per thread.
    pub recording_threads: usize,
    /// How often the proxy pushes its stats to the collector as OTLP
    /// metrics ([`crate::stats`]); zero: never.
    pub stats_interval: Duration,
    /// Which proxy this is among its workload's (`service.instance.id` of
    /// the pushed stats); the workload's name when unset.
    pub instance: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            export: true,
            protocol: ExportProtocol::Arrow,
            collector_endpoint: "http://127.0.0.1:4317".to_string(),
            collector_ca: Vec::new(),
            queue_capacity: 65536,
            queue_bytes: 16 << 20,
            batch_size: 1024,
            flush_interval: Duration::from_millis(200),
            export_timeout: Duration::from_secs(5),
            recording_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            stats_interval: Duration::from_secs(15),
            instance: None,
        }
    }
}

/// The request path's handle: record a finished request.
#[derive(Debug, Clone)]
pub struct Telemetry {
    batcher: Option<Arc<Batcher>>,
    metrics: Arc<Metrics>,
}

impl Telemetry {
    /// Starts the exporter (when export is on). It takes records until
    /// `shutdown` turns true, then sends what is left.
    ///
    /// It runs on a thread of its own, at a lower priority: building and
    /// encoding batches takes a while, and on the request workers it would
    /// hold up requests queued behind it (with one worker, every request).
    pub fn start(
        config: &TelemetryConfig,
        identity: &Workload,
        tls: &channel::CollectorTls,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Telemetry, Option<std::thread::JoinHandle<()>>), crate::ProxyError> {
        if !config.export {
            return Ok((
                Telemetry {
                    batcher: None,
                    metrics,
                },
                None,
            ));
        }
        let batcher = Arc::new(Batcher::new(
            config.recording_threads,
            config.queue_capacity,
            config.batch_size,
        ));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| crate::ProxyError::Telemetry(format!("exporter runtime: {e}")))?;
        // gRPC channels bind to the runtime they are made in.
        let sink = {
            let _in_runtime = runtime.enter();
            match config.protocol {
                ExportProtocol::Arrow => {
                    Sink::flight(&config.collector_endpoint, config.export_timeout, tls)
                }
                ExportProtocol::Otlp => Sink::otlp(
                    &config.collector_endpoint,
                    config.export_timeout,
                    tls,
                    identity,
                ),
            }
            .map_err(crate::ProxyError::Telemetry)?
        };
        let exporter = Exporter {
            batcher: batcher.clone(),
            sink,
            metrics: metrics.clone(),
            flush_interval: config.flush_interval,
            export_timeout: config.export_timeout,
            queue_bytes: config.queue_bytes,
            batch_size: config.batch_size,
        };
        let task = std::thread::Builder::new()
            .name("lumen-telemetry".into())
            .spawn(move || {
                // An export burst must not delay requests: when the machine
                // is busy, export catches up after them (and if it falls too
                // far behind, the bounded queues drop records and count them).
                lumen_core::thread::lower_priority();
                runtime.block_on(exporter.run(shutdown))
            })
            .map_err(|e| crate::ProxyError::Telemetry(format!("exporter thread: {e}")))?;
        Ok((
            Telemetry {
                batcher: Some(batcher),
                metrics,
            },
            Some(task),
        ))
    }

    /// Called once per request when its response has ended (or failed).
    pub fn record(&self, record: RequestRecord) {
        self.metrics.observe(&record);
        if let Some(batcher) = &self.batcher
            && batcher.record(&record).is_err()
        {
            self.metrics.dropped(metrics::DROP_QUEUE_FULL, 1);
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}
