//! Prometheus counters and histograms of the proxy, served on `/stats/prometheus`.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use lumen_core::schema::DURATION_BUCKETS_MS;
use lumen_core::{RequestRecord, ResponseFlags};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    reporter: &'static str,
    source_service: Arc<str>,
    destination_service: Arc<str>,
    response_code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

/// The proxy's metrics and the registry they are exposed through.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    records_dropped: Family<DropLabels, Counter>,
    records_exported: Family<ProtocolLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    retries: Counter,
    retries_refused: Counter,
    unknown: Arc<str>,
    other: Arc<str>,
    /// Source services seen as labels so far (see [`MAX_SOURCE_LABELS`]).
    sources: RwLock<HashSet<Arc<str>>>,
}

/// Distinct `source_service` label values kept; later newcomers are counted
/// as `other`. The inbound side takes the caller's word for its name (until
/// mTLS proves it), and a caller making names up must not grow the series
/// without bound.
pub const MAX_SOURCE_LABELS: usize = 256;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lumen");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        let records_dropped = Family::<DropLabels, Counter>::default();
        let records_exported = Family::<ProtocolLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests completed by this proxy",
            requests.clone(),
        );
        registry.register(
            "request_duration_milliseconds",
            "Time from the first request byte to the last response byte",
            duration.clone(),
        );
        registry.register(
            "telemetry_records_dropped",
            "Request records not exported, by reason: queue_full (exporter or collector behind), export_failed (collector unreachable), rejected (refused as invalid)",
            records_dropped.clone(),
        );
        registry.register(
            "telemetry_records_exported",
            "Request records accepted by the collector",
            records_exported.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "downstream_refused",
            "Downstream connections and requests refused by a limit or timeout, by reason",
            refused.clone(),
        );
        for why in crate::limits::Refused::ALL {
            let _ = refused.get_or_create(&ReasonLabels {
                reason: why.as_str(),
            });
        }
        let retries = Counter::default();
        registry.register("upstream_retries", "Retries sent upstream", retries.clone());
        let retries_refused = Counter::default();
        registry.register(
            "upstream_retries_budget_exhausted",
            "Retries not sent because the retry budget was spent",
            retries_refused.clone(),
        );
        // Register the drop reasons up front so a scrape shows them at zero.
        for reason in [DROP_QUEUE_FULL, DROP_EXPORT_FAILED, DROP_REJECTED] {
            let _ = records_dropped.get_or_create(&DropLabels { reason });
        }
        Metrics {
            registry,
            requests,
            duration,
            records_dropped,
            records_exported,
            refused,
            retries,
            retries_refused,
            unknown: Arc::from("unknown"),
            other: Arc::from("other"),
            sources: RwLock::default(),
        }
    }

    /// Counts a finished request.
    pub fn observe(&self, r: &RequestRecord) {
        // A request for no known service names whatever host the caller
        // made up; as a label that would grow the series without bound.
        let destination_service = if r.response_flags.contains(ResponseFlags::NO_ROUTE) {
            self.unknown.clone()
        } else {
            r.destination.service.clone()
        };
        let labels = RequestLabels {
            reporter: r.reporter.as_str(),
            source_service: self.source_label(&r.source.service),
            destination_service,
            response_code: r.status,
        };
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(r.duration.as_secs_f64() * 1000.0);
    }

    fn source_label(&self, service: &Arc<str>) -> Arc<str> {
        let known = self
            .sources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(service);
        if known {
            return service.clone();
        }
        let mut sources = self.sources.write().unwrap_or_else(|e| e.into_inner());
        if sources.len() < MAX_SOURCE_LABELS {
            sources.insert(service.clone());
            service.clone()
        } else {
            self.other.clone()
        }
    }

    /// A connection or request refused by a limit.
    pub fn refused(&self, why: crate::limits::Refused) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: why.as_str(),
            })
            .inc();
    }

    /// A retry sent, or (`sent = false`) one the budget did not allow.
    pub fn retry(&self, sent: bool) {
        if sent {
            self.retries.inc();
        } else {
            self.retries_refused.inc();
        }
    }

    pub fn dropped(&self, reason: &'static str, n: u64) {
        self.records_dropped
            .get_or_create(&DropLabels { reason })
            .inc_by(n);
    }

    /// Records the collector acknowledged, by wire protocol (`arrow`, `otlp`).
    pub fn exported(&self, protocol: &'static str, n: u64) {
        self.records_exported
            .get_or_create(&ProtocolLabels { protocol })
            .inc_by(n);
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The builders or the send queue were full (exporter or collector behind).
pub const DROP_QUEUE_FULL: &str = "queue_full";
/// The collector could not be reached, or not in time, for too long.
pub const DROP_EXPORT_FAILED: &str = "export_failed";
/// The collector refused the batch as invalid (retrying cannot help).
pub const DROP_REJECTED: &str = "rejected";

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_core::Workload;

    fn record(source: &str) -> RequestRecord {
        RequestRecord {
            source: Workload {
                service: source.into(),
                ..Workload::unknown()
            },
            ..RequestRecord::example()
        }
    }

    #[test]
    fn made_up_source_names_cannot_grow_series_without_bound() {
        let m = Metrics::new();
        for i in 0..MAX_SOURCE_LABELS + 50 {
            m.observe(&record(&format!("caller-{i}")));
        }
        m.observe(&record("caller-0"));
        let text = m.encode();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("lumen_requests_total{"))
            .collect();
        assert_eq!(series.len(), MAX_SOURCE_LABELS + 1);
        let other = series
            .iter()
            .find(|l| l.contains("source_service=\"other\""))
            .expect("newcomers past the cap are counted as other");
        assert!(other.ends_with(" 50"), "{other}");
        let first = series
            .iter()
            .find(|l| l.contains("source_service=\"caller-0\""))
            .expect("early sources keep their names");
        assert!(first.ends_with(" 2"), "{first}");
    }
}
