//! Export fan-out: what the collector stored, forwarded to other OTLP
//! endpoints (Jaeger, Grafana Tempo, another collector) over OTLP/gRPC.
//!
//! Ingest offers each payload once it is in the WAL; every target keeps its
//! own queue, bounded in bytes, and never makes ingest wait: past the
//! bound, items are dropped and counted. A target's task sends batches
//! (proxies' records become spans), retries what the endpoint may take
//! later with backoff and jitter for a while, then gives up on the batch
//! and counts it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use lumen_core::schema::PROXY_SCOPE;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
use prost::Message;
use tokio::sync::{Notify, watch};
use tonic::transport::{Channel, Endpoint};

use crate::metrics::CollectorMetrics;
use crate::store::Store;

/// One OTLP endpoint to forward to.
#[derive(Debug, Clone)]
pub struct ExportTarget {
    /// `http://host:4317` (OTLP/gRPC).
    pub endpoint: String,
    /// Bytes of items waiting to be sent; past it new items are dropped.
    pub queue_bytes: usize,
    /// How long a batch is retried before it is dropped.
    pub retry_for: Duration,
    /// Longest one export call may take.
    pub timeout: Duration,
}

impl ExportTarget {
    pub fn new(endpoint: impl Into<String>) -> Self {
        ExportTarget {
            endpoint: endpoint.into(),
            queue_bytes: 64 << 20,
            retry_for: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Something stored, to forward.
#[derive(Debug, Clone)]
pub enum Item {
    Traces(ExportTraceServiceRequest),
    /// Rows of `requests` (from proxies over Arrow Flight): sent as spans.
    Requests(RecordBatch),
    Metrics(ExportMetricsServiceRequest),
    Logs(ExportLogsServiceRequest),
}

impl Item {
    fn signal(&self) -> &'static str {
        match self {
            Item::Traces(_) | Item::Requests(_) => "traces",
            Item::Metrics(_) => "metrics",
            Item::Logs(_) => "logs",
        }
    }

    fn size(&self) -> usize {
        match self {
            Item::Traces(r) => r.encoded_len(),
            Item::Requests(b) => b.get_array_memory_size(),
            Item::Metrics(r) => r.encoded_len(),
            Item::Logs(r) => r.encoded_len(),
        }
    }

    /// Spans, data points or log records it holds.
    fn count(&self) -> usize {
        match self {
            Item::Traces(r) => r
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum(),
            Item::Requests(b) => b.num_rows(),
            Item::Metrics(r) => r
                .resource_metrics
                .iter()
                .flat_map(|r| &r.scope_metrics)
                .flat_map(|s| &s.metrics)
                .map(|m| {
                    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
                    match &m.data {
                        Some(Data::Gauge(g)) => g.data_points.len(),
                        Some(Data::Sum(x)) => x.data_points.len(),
                        Some(Data::Histogram(h)) => h.data_points.len(),
                        Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
                        Some(Data::Summary(x)) => x.data_points.len(),
                        None => 0,
                    }
                })
                .sum(),
            Item::Logs(r) => r
                .resource_logs
                .iter()
                .flat_map(|r| &r.scope_logs)
                .map(|s| s.log_records.len())
                .sum(),
        }
    }
}

/// A target's queue and its task's handle on it.
#[derive(Debug)]
struct Target {
    config: ExportTarget,
    queue: std::sync::Mutex<VecDeque<(Item, usize)>>,
    bytes: AtomicUsize,
    wake: Notify,
}

/// Ingest's side of the fan-out; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Fanout {
    targets: Arc<Vec<Arc<Target>>>,
    store: Option<Arc<Store>>,
}

/// Most items one send carries (its requests merged).
const BATCH_ITEMS: usize = 64;
/// Most bytes one send carries, below gRPC's usual 4 MiB message limit.
const BATCH_BYTES: usize = 3 << 20;

impl Fanout {
    /// Starts one task per target; they stop (after a last try to send
    /// what is queued) when `stop` turns true.
    pub fn start(
        targets: Vec<ExportTarget>,
        store: Arc<Store>,
        stop: watch::Receiver<bool>,
    ) -> (Fanout, Vec<tokio::task::JoinHandle<()>>) {
        let targets: Vec<Arc<Target>> = targets
            .into_iter()
            .map(|config| {
                Arc::new(Target {
                    config,
                    queue: Default::default(),
                    bytes: AtomicUsize::new(0),
                    wake: Notify::new(),
                })
            })
            .collect();
        let tasks = targets
            .iter()
            .map(|t| tokio::spawn(run(t.clone(), store.clone(), stop.clone())))
            .collect();
        (
            Fanout {
                targets: Arc::new(targets),
                store: Some(store),
            },
            tasks,
        )
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Queues `item` for every target, or drops and counts it for a
    /// target whose queue is full. Never waits.
    pub fn offer(&self, item: impl FnOnce() -> Item) {
        if self.targets.is_empty() {
            return;
        }
        let item = item();
        let size = item.size();
        for t in self.targets.iter() {
            if t.bytes.load(Ordering::Relaxed) + size > t.config.queue_bytes {
                if let Some(store) = &self.store {
                    store.metrics().exported(
                        &t.config.endpoint,
                        item.signal(),
                        "dropped_queue_full",
                        item.count(),
                    );
                }
                continue;
            }
            t.bytes.fetch_add(size, Ordering::Relaxed);
            t.queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back((item.clone(), size));
            t.wake.notify_one();
        }
    }
}

/// Items taken from the queue for one round of sends.
fn take(t: &Target) -> Vec<Item> {
    let mut queue = t.queue.lock().unwrap_or_else(|e| e.into_inner());
    let (mut out, mut bytes) = (Vec::new(), 0);
    while let Some((_, size)) = queue.front() {
        if !out.is_empty() && (out.len() >= BATCH_ITEMS || bytes + size > BATCH_BYTES) {
            break;
        }
        let (item, size) = queue.pop_front().expect("front exists");
        bytes += size;
        out.push(item);
    }
    t.bytes.fetch_sub(bytes, Ordering::Relaxed);
    out
}

/// Requests merged per signal, ready to send.
#[derive(Default)]
struct Merged {
    traces: Option<ExportTraceServiceRequest>,
    metrics: Option<ExportMetricsServiceRequest>,
    logs: Option<ExportLogsServiceRequest>,
}

fn merge(items: Vec<Item>) -> Merged {
    let mut m = Merged::default();
    for item in items {
        match item {
            Item::Traces(r) => m
                .traces
                .get_or_insert_with(Default::default)
                .resource_spans
                .extend(r.resource_spans),
            Item::Requests(b) => match requests_as_spans(&b) {
                Ok(spans) => m
                    .traces
                    .get_or_insert_with(Default::default)
                    .resource_spans
                    .extend(spans),
                Err(e) => tracing::warn!(error = %e, "cannot turn records into spans to export"),
            },
            Item::Metrics(r) => m
                .metrics
                .get_or_insert_with(Default::default)
                .resource_metrics
                .extend(r.resource_metrics),
            Item::Logs(r) => m
                .logs
                .get_or_insert_with(Default::default)
                .resource_logs
                .extend(r.resource_logs),
        }
    }
    m
}

/// Proxies' records as spans, one resource per reporting service, as the
/// proxies themselves would send them over OTLP.
fn requests_as_spans(b: &RecordBatch) -> Result<Vec<ResourceSpans>, String> {
    let spans = lumen_core::otlp::request_spans(b)?;
    let services = lumen_core::otlp::reporting_services(b)?;
    let mut by_service: std::collections::BTreeMap<String, Vec<_>> = Default::default();
    for (span, service) in spans.into_iter().zip(services) {
        by_service.entry(service).or_default().push(span);
    }
    Ok(by_service
        .into_iter()
        .map(|(service, spans)| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "service.name".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue(service)),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: PROXY_SCOPE.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        })
        .collect())
}

/// Whether the endpoint may take it later (OTLP's retryable codes).
fn retryable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Cancelled
            | DeadlineExceeded
            | ResourceExhausted
            | Aborted
            | OutOfRange
            | Unavailable
            | DataLoss
    )
}

struct Clients {
    traces: TraceServiceClient<Channel>,
    metrics: MetricsServiceClient<Channel>,
    logs: LogsServiceClient<Channel>,
}

async fn run(t: Arc<Target>, store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    let endpoint = &t.config.endpoint;
    let channel = match Endpoint::from_shared(endpoint.clone()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(5))
            .timeout(t.config.timeout)
            .connect_lazy(),
        Err(e) => {
            // Checked when the config is read; kept for safety.
            tracing::error!(endpoint, error = %e, "export endpoint is not a URL; not exporting there");
            return;
        }
    };
    let mut clients = Clients {
        traces: TraceServiceClient::new(channel.clone()),
        metrics: MetricsServiceClient::new(channel.clone()),
        logs: LogsServiceClient::new(channel),
    };
    let metrics = store.metrics();
    loop {
        let stopping = *stop.borrow();
        if t.queue.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            if stopping {
                return;
            }
            tokio::select! {
                _ = t.wake.notified() => {}
                changed = stop.changed() => {
                    // The collector is gone without a word: nothing more comes.
                    if changed.is_err() {
                        return;
                    }
                }
            }
            continue;
        }
        let items = take(&t);
        let merged = merge(items);
        // On the way out, one quick try each and no more.
        let retry_for = if stopping {
            Duration::ZERO
        } else {
            t.config.retry_for
        };
        if let Some(r) = merged.traces {
            let n = Item::Traces(r.clone()).count();
            let outcome = send(&mut stop, retry_for, || {
                let mut c = clients.traces.clone();
                let r = r.clone();
                async move { c.export(r).await.map(|_| ()) }
            })
            .await;
            record(metrics, endpoint, "traces", n, outcome);
        }
        if let Some(r) = merged.metrics {
            let n = Item::Metrics(r.clone()).count();
            let outcome = send(&mut stop, retry_for, || {
                let mut c = clients.metrics.clone();
                let r = r.clone();
                async move { c.export(r).await.map(|_| ()) }
            })
            .await;
            record(metrics, endpoint, "metrics", n, outcome);
        }
        if let Some(r) = merged.logs {
            let n = Item::Logs(r.clone()).count();
            let outcome = send(&mut stop, retry_for, || {
                let mut c = clients.logs.clone();
                let r = r.clone();
                async move { c.export(r).await.map(|_| ()) }
            })
            .await;
            record(metrics, endpoint, "logs", n, outcome);
        }
        // Keep the clients' channel alive across rounds.
        let _ = &mut clients;
    }
}

/// How a batch ended.
enum Outcome {
    Sent,
    Rejected(tonic::Status),
    GaveUp(tonic::Status),
}

fn record(metrics: &CollectorMetrics, endpoint: &str, signal: &'static str, n: usize, o: Outcome) {
    match o {
        Outcome::Sent => metrics.exported(endpoint, signal, "sent", n),
        Outcome::Rejected(s) => {
            tracing::warn!(endpoint, signal, items = n, error = %s, "export endpoint rejected a batch; dropped");
            metrics.exported(endpoint, signal, "dropped_rejected", n);
        }
        Outcome::GaveUp(s) => {
            tracing::warn!(endpoint, signal, items = n, error = %s, "export endpoint unreachable; batch dropped after retries");
            metrics.exported(endpoint, signal, "dropped_retries_exhausted", n);
        }
    }
}

/// Sends with retries (exponential backoff, full jitter) for up to
/// `retry_for`; stops retrying early when the collector stops.
async fn send<F, Fut>(stop: &mut watch::Receiver<bool>, retry_for: Duration, attempt: F) -> Outcome
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(()) => return Outcome::Sent,
            Err(s) if !retryable(s.code()) => return Outcome::Rejected(s),
            Err(s) => {
                if started.elapsed() + backoff > retry_for || *stop.borrow() {
                    return Outcome::GaveUp(s);
                }
                let pause = backoff.mul_f64(rand::random_range(0.0..1.0));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    changed = stop.changed() => {
                        if changed.is_err() {
                            return Outcome::GaveUp(s);
                        }
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
