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
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use prost::Message;
use tokio::sync::{Notify, watch};
use tonic::transport::Endpoint;

use crate::ingest::Signal;
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
    /// An OTLP export request as protobuf (the payload as received, or
    /// re-encoded from JSON), shared by every target.
    Encoded {
        signal: Signal,
        bytes: Bytes,
        /// Spans, data points or log records it holds.
        items: usize,
    },
    /// Rows of `requests` (from proxies over Arrow Flight): sent as spans.
    Requests(RecordBatch),
}

impl Item {
    fn signal(&self) -> Signal {
        match self {
            Item::Encoded { signal, .. } => *signal,
            Item::Requests(_) => Signal::Traces,
        }
    }

    /// Memory it holds while queued.
    fn size(&self) -> usize {
        match self {
            Item::Encoded { bytes, .. } => bytes.len(),
            Item::Requests(b) => b.get_array_memory_size(),
        }
    }

    fn count(&self) -> usize {
        match self {
            Item::Encoded { items, .. } => *items,
            Item::Requests(b) => b.num_rows(),
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
                        item.signal().name(),
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

/// One call's worth: encoded requests of one signal, concatenated (which
/// protobuf reads as one request with their resources together).
struct Send {
    signal: Signal,
    bytes: Bytes,
    items: usize,
}

/// The round's items as calls of at most [`BATCH_BYTES`] each (an item
/// larger than that goes alone); proxies' records become spans here, off
/// the ingest path.
fn batch(items: Vec<Item>) -> Vec<Send> {
    let mut encoded: Vec<(Signal, Bytes, usize)> = Vec::new();
    for item in items {
        match item {
            Item::Encoded {
                signal,
                bytes,
                items,
            } => encoded.push((signal, bytes, items)),
            Item::Requests(b) => match encode_requests(&b) {
                Ok(chunks) => encoded.extend(
                    chunks
                        .into_iter()
                        .map(|(bytes, n)| (Signal::Traces, bytes, n)),
                ),
                Err(e) => tracing::warn!(error = %e, "cannot turn records into spans to export"),
            },
        }
    }
    let mut out: Vec<Send> = Vec::new();
    for signal in Signal::ALL {
        let mut current: Option<(bytes::BytesMut, usize)> = None;
        for (_, bytes, n) in encoded.iter().filter(|(s, ..)| *s == signal) {
            if let Some((buf, count)) = &mut current
                && buf.len() + bytes.len() <= BATCH_BYTES
            {
                buf.extend_from_slice(bytes);
                *count += n;
                continue;
            }
            if let Some((buf, items)) = current.take() {
                out.push(Send {
                    signal,
                    bytes: buf.freeze(),
                    items,
                });
            }
            current = Some((bytes::BytesMut::from(&bytes[..]), *n));
        }
        if let Some((buf, items)) = current {
            out.push(Send {
                signal,
                bytes: buf.freeze(),
                items,
            });
        }
    }
    out
}

/// A `requests` batch as encoded trace export requests of at most
/// [`BATCH_BYTES`] each (halving the rows until they fit).
fn encode_requests(b: &RecordBatch) -> Result<Vec<(Bytes, usize)>, String> {
    let request = ExportTraceServiceRequest {
        resource_spans: requests_as_spans(b)?,
    };
    let encoded = request.encode_to_vec();
    if encoded.len() <= BATCH_BYTES || b.num_rows() <= 1 {
        return Ok(vec![(Bytes::from(encoded), b.num_rows())]);
    }
    let half = b.num_rows() / 2;
    let mut out = encode_requests(&b.slice(0, half))?;
    out.extend(encode_requests(&b.slice(half, b.num_rows() - half))?);
    Ok(out)
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
        .map(|(service, spans)| {
            let resource = Resource {
                attributes: vec![KeyValue {
                    key: "service.name".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue(service)),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            };
            lumen_core::otlp::proxy_resource_spans(resource, spans)
        })
        .collect())
}

/// Whether the endpoint may take it later, and when (OTLP's retryable
/// codes; RESOURCE_EXHAUSTED only with the `RetryInfo` that says when).
fn retry_after(status: &tonic::Status) -> Option<Option<Duration>> {
    use tonic::Code::*;
    use tonic_types::StatusExt;
    match status.code() {
        Cancelled | DeadlineExceeded | Aborted | OutOfRange | Unavailable | DataLoss => {
            Some(status.get_details_retry_info().and_then(|r| r.retry_delay))
        }
        ResourceExhausted => status
            .get_details_retry_info()
            .map(|r| r.retry_delay.or(Some(Duration::from_secs(1)))),
        _ => None,
    }
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
    let metrics = store.metrics();
    // Signals the endpoint said it does not take (Jaeger takes no metrics
    // or logs): warned about once.
    let mut unimplemented: Vec<Signal> = Vec::new();
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
        // On the way out, one quick try each and no more.
        let retry_for = if stopping {
            Duration::ZERO
        } else {
            t.config.retry_for
        };
        for call in batch(take(&t)) {
            let path = format!("/{}/Export", call.signal.grpc_service());
            let path = match http::uri::PathAndQuery::try_from(path) {
                Ok(p) => p,
                Err(_) => continue,
            };
            let outcome = send(&mut stop, retry_for, || {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                let (path, bytes) = (path.clone(), call.bytes.clone());
                async move {
                    grpc.ready()
                        .await
                        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                    grpc.unary(
                        tonic::Request::new(bytes),
                        path,
                        lumen_core::otlp::PassThrough,
                    )
                    .await
                    .map(|_| ())
                }
            })
            .await;
            let signal = call.signal;
            if let Outcome::Rejected(s) = &outcome
                && s.code() == tonic::Code::Unimplemented
            {
                metrics.exported(endpoint, signal.name(), "dropped_rejected", call.items);
                if !unimplemented.contains(&signal) {
                    unimplemented.push(signal);
                    tracing::warn!(endpoint, signal = signal.name(), error = %s, "export endpoint does not take this signal; its items are dropped");
                }
                continue;
            }
            record(metrics, endpoint, signal.name(), call.items, outcome);
        }
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
        let s = match attempt().await {
            Ok(()) => return Outcome::Sent,
            Err(s) => s,
        };
        match retry_after(&s) {
            None => return Outcome::Rejected(s),
            Some(asked) => {
                // The endpoint's own delay when it gave one, else backoff.
                let pause = asked.unwrap_or_else(|| backoff.mul_f64(rand::random_range(0.0..1.0)));
                if started.elapsed() + pause > retry_for || *stop.borrow() {
                    return Outcome::GaveUp(s);
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_core::RequestRecord;
    use lumen_core::schema::RequestBatchBuilder;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::logs::v1::ResourceLogs;

    fn logs(resources: usize) -> Item {
        let r = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs::default(); resources],
        };
        Item::Encoded {
            signal: Signal::Logs,
            bytes: Bytes::from(r.encode_to_vec()),
            items: resources,
        }
    }

    #[test]
    fn requests_of_a_signal_go_together_as_one_request_and_records_become_spans() {
        let mut b = RequestBatchBuilder::new();
        for _ in 0..5 {
            b.push(&RequestRecord::example());
        }
        let sends = batch(vec![logs(2), Item::Requests(b.finish().unwrap()), logs(3)]);
        assert_eq!(sends.len(), 2);
        let traces = sends.iter().find(|s| s.signal == Signal::Traces).unwrap();
        let decoded = ExportTraceServiceRequest::decode(traces.bytes.clone()).unwrap();
        let spans: usize = decoded
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        assert_eq!((spans, traces.items), (5, 5));
        let logs = sends.iter().find(|s| s.signal == Signal::Logs).unwrap();
        let decoded = ExportLogsServiceRequest::decode(logs.bytes.clone()).unwrap();
        assert_eq!(decoded.resource_logs.len(), 5, "two requests read as one");
        assert_eq!(logs.items, 5);
    }

    #[test]
    fn resource_exhausted_is_retried_only_when_the_endpoint_says_when() {
        use tonic_types::{ErrorDetails, StatusExt};
        let bare = tonic::Status::resource_exhausted("full");
        assert_eq!(retry_after(&bare), None);
        let told = tonic::Status::with_error_details(
            tonic::Code::ResourceExhausted,
            "full",
            ErrorDetails::with_retry_info(Some(Duration::from_secs(3))),
        );
        assert_eq!(retry_after(&told), Some(Some(Duration::from_secs(3))));
        assert_eq!(retry_after(&tonic::Status::unavailable("down")), Some(None));
        assert_eq!(retry_after(&tonic::Status::invalid_argument("bad")), None);
    }
}
