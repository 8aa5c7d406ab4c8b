//! Prometheus metrics of the proxy, served on `/stats/prometheus`: Istio's
//! standard request and TCP metrics under Istio's names and labels (so
//! Istio's dashboards read a Lumen sidecar unchanged), and the proxy's own
//! (`lumen_*`: telemetry export, refusals, retries).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use lumen_core::istio::IstioKey;
use lumen_core::schema::DURATION_BUCKETS_MS;
use lumen_core::{Protocol, Reporter, RequestRecord, ResponseFlags, Workload};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Istio's labels, by name.
type IstioLabels = Vec<(&'static str, String)>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Envoy's tags for a listener's per-worker stats.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerWorkerLabels {
    envoy_listener_address: String,
    envoy_worker_id: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

/// Istio's size buckets: 1 B to 1 GB, ×10 each.
fn size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 10.0, 10))
}

type HistogramFamily = Family<IstioLabels, Histogram, fn() -> Histogram>;

/// What identifies one series: the record's fields Istio's labels come
/// from, as shared strings, so finding a series allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct SeriesKey {
    reporter: Reporter,
    source: Workload,
    destination: Workload,
    protocol: Protocol,
    flags: ResponseFlags,
    status: u16,
    grpc: Option<i32>,
    mtls: bool,
    /// Source, destination: from verified certificates only, so they
    /// cannot mint series.
    principals: [Option<Arc<str>>; 2],
}

/// One series' metrics, found once per key.
#[derive(Clone, Debug)]
enum Series {
    Http {
        requests: Counter,
        duration: Histogram,
        request_bytes: Histogram,
        response_bytes: Histogram,
    },
    Tcp {
        sent: Counter,
        received: Counter,
        opened: Counter,
        closed: Counter,
    },
}

/// The proxy's metrics and the registry they are exposed through.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<IstioLabels, Counter>,
    duration: HistogramFamily,
    request_bytes: HistogramFamily,
    response_bytes: HistogramFamily,
    tcp_sent: Family<IstioLabels, Counter>,
    tcp_received: Family<IstioLabels, Counter>,
    tcp_opened: Family<IstioLabels, Counter>,
    tcp_closed: Family<IstioLabels, Counter>,
    /// Found once per key; foldhash because this is per request.
    series: RwLock<HashMap<SeriesKey, Series, foldhash::fast::RandomState>>,
    records_dropped: Family<DropLabels, Counter>,
    records_exported: Family<ProtocolLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    retries: Counter,
    retries_refused: Counter,
    stats_pushes: Family<OutcomeLabels, Counter>,
    accepted: Family<ListenerWorkerLabels, Counter>,
    unknown: Arc<str>,
    other: Workload,
    /// Source identities seen as labels so far (see [`MAX_SOURCE_LABELS`]).
    sources: RwLock<HashSet<Workload, foldhash::fast::RandomState>>,
}

/// Distinct source identities kept as labels; later newcomers are counted
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
        let mut registry = Registry::default();
        let requests = Family::<IstioLabels, Counter>::default();
        let duration = HistogramFamily::new_with_constructor(duration_histogram);
        let request_bytes = HistogramFamily::new_with_constructor(size_histogram);
        let response_bytes = HistogramFamily::new_with_constructor(size_histogram);
        let (tcp_sent, tcp_received, tcp_opened, tcp_closed) = Default::default();
        registry.register(
            "istio_requests",
            "Requests handled, by source, destination and response",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from the first request byte to the last response byte, in milliseconds",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes, in bytes",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes, in bytes",
            response_bytes.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the downstream on TCP connections (and tunnels)",
            Family::clone(&tcp_sent),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the downstream on TCP connections (and tunnels)",
            Family::clone(&tcp_received),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened (counted when they close and their row is written)",
            Family::clone(&tcp_opened),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            Family::clone(&tcp_closed),
        );
        let records_dropped = Family::<DropLabels, Counter>::default();
        let records_exported = Family::<ProtocolLabels, Counter>::default();
        registry.register(
            "lumen_telemetry_records_dropped",
            "Request records not exported, by reason: queue_full (exporter or collector behind), export_failed (collector unreachable), rejected (refused as invalid)",
            records_dropped.clone(),
        );
        registry.register(
            "lumen_telemetry_records_exported",
            "Request records accepted by the collector",
            records_exported.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "lumen_downstream_refused",
            "Downstream connections and requests refused by a limit or timeout, by reason",
            refused.clone(),
        );
        for why in crate::limits::Refused::ALL {
            let _ = refused.get_or_create(&ReasonLabels {
                reason: why.as_str(),
            });
        }
        let retries = Counter::default();
        registry.register(
            "lumen_upstream_retries",
            "Retries sent upstream",
            retries.clone(),
        );
        let retries_refused = Counter::default();
        registry.register(
            "lumen_upstream_retries_budget_exhausted",
            "Retries not sent because the retry budget was spent",
            retries_refused.clone(),
        );
        let stats_pushes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "lumen_proxy_stats_pushes",
            "Pushes of these stats to the collector (OTLP metrics), by outcome: ok, failed",
            stats_pushes.clone(),
        );
        let accepted = Family::<ListenerWorkerLabels, Counter>::default();
        registry.register(
            "envoy_listener_worker_downstream_cx",
            "Connections accepted (within the connection limit), by listener and by the worker that took them",
            accepted.clone(),
        );
        // Register the drop reasons up front so a scrape shows them at zero.
        for reason in [DROP_QUEUE_FULL, DROP_EXPORT_FAILED, DROP_REJECTED] {
            let _ = records_dropped.get_or_create(&DropLabels { reason });
        }
        let other: Arc<str> = Arc::from("other");
        Metrics {
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
            tcp_sent,
            tcp_received,
            tcp_opened,
            tcp_closed,
            series: RwLock::default(),
            records_dropped,
            records_exported,
            refused,
            retries,
            retries_refused,
            stats_pushes,
            accepted,
            unknown: Arc::from("unknown"),
            other: Workload {
                service: other.clone(),
                workload: other.clone(),
                namespace: other.clone(),
                version: other,
            },
            sources: RwLock::default(),
        }
    }

    /// Counts a finished request (or a TCP connection, or a tunnel).
    pub fn observe(&self, r: &RequestRecord) {
        let mut destination = r.destination.clone();
        // A request for no known service names whatever host the caller
        // made up; as a label that would grow the series without bound.
        if r.response_flags.contains(ResponseFlags::NO_ROUTE) {
            destination.service = self.unknown.clone();
        }
        let key = SeriesKey {
            reporter: r.reporter,
            source: if self.source_known(&r.source) {
                r.source.clone()
            } else {
                self.other.clone()
            },
            destination,
            protocol: r.protocol,
            flags: r.response_flags,
            status: r.status,
            // gRPC defines 0–16; anything else an upstream sends is UNKNOWN
            // here, so it cannot mint series.
            grpc: r
                .grpc_status
                .map(|g| if (0..=16).contains(&g) { g } else { 2 }),
            mtls: r.mtls,
            principals: [r.source_principal.clone(), r.destination_principal.clone()],
        };
        let found = self
            .series
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let series = match found {
            Some(s) => s,
            None => {
                let s = self.series_for(&key);
                self.series
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, s.clone());
                s
            }
        };
        match series {
            Series::Http {
                requests,
                duration,
                request_bytes,
                response_bytes,
            } => {
                requests.inc();
                duration.observe(r.duration.as_secs_f64() * 1000.0);
                request_bytes.observe(r.request_bytes as f64);
                response_bytes.observe(r.response_bytes as f64);
            }
            Series::Tcp {
                sent,
                received,
                opened,
                closed,
            } => {
                sent.inc_by(r.response_bytes);
                received.inc_by(r.request_bytes);
                opened.inc();
                closed.inc();
            }
        }
    }

    /// The metrics of a series not seen before, labelled as Istio does.
    fn series_for(&self, k: &SeriesKey) -> Series {
        let flags = k.flags.to_string();
        let labels = IstioKey {
            reporter: k.reporter.as_str(),
            source_service: &k.source.service,
            source_workload: &k.source.workload,
            source_namespace: &k.source.namespace,
            source_version: &k.source.version,
            destination_service: &k.destination.service,
            destination_workload: &k.destination.workload,
            destination_namespace: &k.destination.namespace,
            destination_version: &k.destination.version,
            protocol: k.protocol.as_str(),
            response_flags: &flags,
            status: Some(i32::from(k.status)),
            grpc_status: k.grpc,
            mtls: k.mtls,
            source_principal: k.principals[0].as_deref().unwrap_or(""),
            destination_principal: k.principals[1].as_deref().unwrap_or(""),
        }
        .labels();
        if k.protocol == Protocol::Tcp {
            Series::Tcp {
                sent: self.tcp_sent.get_or_create(&labels).clone(),
                received: self.tcp_received.get_or_create(&labels).clone(),
                opened: self.tcp_opened.get_or_create(&labels).clone(),
                closed: self.tcp_closed.get_or_create(&labels).clone(),
            }
        } else {
            Series::Http {
                requests: self.requests.get_or_create(&labels).clone(),
                duration: self.duration.get_or_create(&labels).clone(),
                request_bytes: self.request_bytes.get_or_create(&labels).clone(),
                response_bytes: self.response_bytes.get_or_create(&labels).clone(),
            }
        }
    }

    /// Whether `source` (the whole identity: every part of it comes from
    /// the caller's word) may be a label: seen before, or still room.
    fn source_known(&self, source: &Workload) -> bool {
        let known = self
            .sources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(source);
        if known {
            return true;
        }
        let mut sources = self.sources.write().unwrap_or_else(|e| e.into_inner());
        if sources.len() < MAX_SOURCE_LABELS {
            sources.insert(source.clone());
            true
        } else {
            false
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

    /// A push of the stats to the collector ended.
    pub fn stats_pushed(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.stats_pushes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// The counter of connections `worker` accepts on the listener at
    /// `listener` (named as Envoy names it: `0.0.0.0_15001`), shown at
    /// zero from now on.
    pub fn accepted_by(&self, listener: std::net::SocketAddr, worker: usize) -> Counter {
        let address = match listener {
            std::net::SocketAddr::V4(a) => format!("{}_{}", a.ip(), a.port()),
            std::net::SocketAddr::V6(a) => format!("[{}]_{}", a.ip(), a.port()),
        };
        self.accepted
            .get_or_create(&ListenerWorkerLabels {
                envoy_listener_address: address,
                envoy_worker_id: worker.to_string(),
            })
            .clone()
    }

    /// The counters' registry (the admin port adds the clusters' state).
    pub fn registry(&self) -> &Registry {
        &self.registry
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
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        assert_eq!(series.len(), MAX_SOURCE_LABELS + 1);
        let other = series
            .iter()
            .find(|l| l.contains("source_app=\"other\""))
            .expect("newcomers past the cap are counted as other");
        assert!(other.ends_with(" 50"), "{other}");
        let first = series
            .iter()
            .find(|l| l.contains("source_app=\"caller-0\""))
            .expect("early sources keep their names");
        assert!(first.ends_with(" 2"), "{first}");
    }
}
