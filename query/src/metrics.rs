//! The query service's own metrics, served on `/metrics` of the query port.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// How a query ended, as counted in `lumen_queries_total{outcome}`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Invalid SQL or a failure while planning or executing.
    Error,
    ReadOnly,
    Timeout,
    MemoryLimit,
    /// Past the result's row or byte limit.
    ResultTooLarge,
    Cancelled,
    ClientGone,
    Shutdown,
    /// Refused for want of a turn (queue full or waited too long).
    Busy,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::ReadOnly => "read_only",
            Outcome::Timeout => "timeout",
            Outcome::MemoryLimit => "memory_limit",
            Outcome::ResultTooLarge => "result_too_large",
            Outcome::Cancelled => "cancelled",
            Outcome::ClientGone => "client_gone",
            Outcome::Shutdown => "shutdown",
            Outcome::Busy => "busy",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// From 1 ms to 5 min: dashboard queries, ad-hoc scans and runaways.
const DURATION_BUCKETS_S: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_S)
}

#[derive(Debug)]
pub struct QueryMetrics {
    registry: Registry,
    finished: Family<OutcomeLabels, Counter>,
    duration: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    pub(crate) running: Gauge,
    pub(crate) queued: Gauge,
    pub(crate) memory: Gauge,
    pub(crate) memory_budget: Gauge,
    pub(crate) ingest_pause: Counter<f64, AtomicU64>,
}

impl QueryMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lumen");
        let finished = Family::<OutcomeLabels, Counter>::default();
        let duration = Family::<OutcomeLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        let (running, queued, memory, memory_budget) = Default::default();
        registry.register("queries", "Queries finished, by outcome", finished.clone());
        registry.register(
            "query_duration_seconds",
            "Time from a query's arrival to its answer (or refusal), by outcome",
            duration.clone(),
        );
        registry.register(
            "queries_running",
            "Queries executing now",
            Gauge::clone(&running),
        );
        registry.register(
            "queries_queued",
            "Queries waiting for a turn",
            Gauge::clone(&queued),
        );
        registry.register(
            "query_memory_bytes",
            "Memory held by running queries' operators and results",
            Gauge::clone(&memory),
        );
        registry.register(
            "query_memory_budget_bytes",
            "Memory all running queries may hold together",
            Gauge::clone(&memory_budget),
        );
        let ingest_pause = Counter::<f64, AtomicU64>::default();
        registry.register(
            "query_ingest_pause_seconds",
            "Time query threads paused to leave the CPU to busy ingest",
            ingest_pause.clone(),
        );
        QueryMetrics {
            registry,
            finished,
            duration,
            running,
            queued,
            memory,
            memory_budget,
            ingest_pause,
        }
    }

    pub fn finished(&self, outcome: Outcome, seconds: f64) {
        let labels = OutcomeLabels {
            outcome: outcome.as_str(),
        };
        self.finished.get_or_create(&labels).inc();
        self.duration.get_or_create(&labels).observe(seconds);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for QueryMetrics {
    fn default() -> Self {
        Self::new()
    }
}
