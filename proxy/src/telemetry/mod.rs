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
use tokio::task::JoinHandle;

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
    /// Longest a record waits for its batch to fill.
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
            flush_interval: Duration::from_millis(100),
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
    pub fn start(
        config: &TelemetryConfig,
        identity: &Workload,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Telemetry, Option<JoinHandle<()>>), crate::ProxyError> {
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
        let exporter = otlp::Exporter::new(config, identity, metrics.clone())?;
        let task = tokio::spawn(exporter.run(rx, shutdown));
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
