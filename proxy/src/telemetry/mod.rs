//! Per-request telemetry: every finished request becomes one
//! [`RequestRecord`], counted in Prometheus metrics and pushed to a bounded
//! queue that an exporter task drains in batches. When the queue is full the
//! record is dropped and counted; the request path never waits.

pub mod metrics;
mod otlp;

use std::sync::Arc;
use std::time::Duration;

use lumen_core::{RequestRecord, Workload};
use tokio::sync::{mpsc, watch};

pub use metrics::Metrics;

/// How records leave the proxy.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Export records at all; metrics are kept either way.
    pub export: bool,
    /// OTLP/gRPC endpoint of the collector, e.g. `http://127.0.0.1:4317`.
    pub collector_endpoint: String,
    /// Records waiting for export; beyond this they are dropped and counted.
    pub queue_capacity: usize,
    /// Most records per export call.
    pub batch_size: usize,
    /// How often the exporter drains the queue: the longest a record waits to leave.
    pub flush_interval: Duration,
    /// Longest one export call may take.
    pub export_timeout: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            export: true,
            collector_endpoint: "http://127.0.0.1:4317".to_string(),
            queue_capacity: 8192,
            batch_size: 512,
            flush_interval: Duration::from_millis(50),
            export_timeout: Duration::from_secs(5),
        }
    }
}

/// The request path's handle: record a finished request.
#[derive(Debug, Clone)]
pub struct Telemetry {
    queue: Option<mpsc::Sender<RequestRecord>>,
    metrics: Arc<Metrics>,
}

impl Telemetry {
    /// Starts the exporter (when export is on). The exporter drains the queue
    /// and stops once `shutdown` turns true.
    ///
    /// It runs on a thread of its own: building and encoding a batch of spans
    /// takes a while, and on the request workers it would hold up requests
    /// queued behind it (with one worker, every request).
    pub fn start(
        config: &TelemetryConfig,
        identity: &Workload,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Telemetry, Option<std::thread::JoinHandle<()>>), crate::ProxyError> {
        if !config.export {
            return Ok((
                Telemetry {
                    queue: None,
                    metrics,
                },
                None,
            ));
        }
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| crate::ProxyError::Telemetry(format!("exporter runtime: {e}")))?;
        // The OTLP client binds to the runtime it is built in.
        let exporter = {
            let _in_runtime = runtime.enter();
            otlp::Exporter::new(config, identity, metrics.clone())?
        };
        let task = std::thread::Builder::new()
            .name("lumen-telemetry".into())
            .spawn(move || {
                // An export burst must not delay requests: when the machine
                // is busy, export catches up after them (and if it falls too
                // far behind, the bounded queue drops records and counts them).
                lumen_core::thread::lower_priority();
                runtime.block_on(exporter.run(rx, shutdown))
            })
            .map_err(|e| crate::ProxyError::Telemetry(format!("exporter thread: {e}")))?;
        Ok((
            Telemetry {
                queue: Some(tx),
                metrics,
            },
            Some(task),
        ))
    }

    /// Called once per request when its response has ended (or failed).
    pub fn record(&self, record: RequestRecord) {
        self.metrics.observe(&record);
        if let Some(queue) = &self.queue
            && queue.try_send(record).is_err()
        {
            self.metrics.dropped(metrics::DROP_QUEUE_FULL, 1);
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}
