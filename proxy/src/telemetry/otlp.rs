//! Exports request records as OTLP spans over gRPC with `opentelemetry-otlp`,
//! so any OpenTelemetry collector (or Jaeger) can receive them, and Lumen's
//! collector turns them back into `requests` rows.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lumen_core::schema::{PROXY_SCOPE, attr};
use lumen_core::{Reporter, RequestRecord, Workload};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use tokio::sync::{mpsc, watch};

use super::TelemetryConfig;
use super::metrics::{DROP_EXPORT_FAILED, Metrics};

/// Pauses between attempts of one batch; a collector restart is usually
/// shorter than their sum, and the queue keeps filling meanwhile.
const RETRY_BACKOFF: [Duration; 2] = [Duration::from_millis(200), Duration::from_secs(1)];

/// Most encoded bytes per export call, well under the collector's (and the
/// OpenTelemetry Collector's) 4 MiB default: one batch of long URLs must not
/// be refused whole, losing every record in it.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// A record's size as an OTLP span, give or take: the strings that can be
/// long, plus attribute keys, workload names and fixed fields (~600 bytes).
fn approx_encoded_len(r: &RequestRecord) -> usize {
    600 + 2 * r.method.len() + r.authority.len() + r.path.len()
}

pub(super) struct Exporter {
    inner: opentelemetry_otlp::SpanExporter,
    scope: InstrumentationScope,
    metrics: Arc<Metrics>,
    batch_size: usize,
    flush_interval: Duration,
    export_timeout: Duration,
    last_warning: Option<Instant>,
}

impl Exporter {
    pub(super) fn new(
        config: &TelemetryConfig,
        identity: &Workload,
        metrics: Arc<Metrics>,
    ) -> Result<Self, crate::ProxyError> {
        let mut inner = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.collector_endpoint.clone())
            .with_timeout(config.export_timeout)
            .build()
            .map_err(|e| crate::ProxyError::Telemetry(e.to_string()))?;
        inner.set_resource(
            &Resource::builder_empty()
                .with_service_name(identity.service.clone())
                .with_attributes([
                    KeyValue::new("service.namespace", identity.namespace.clone()),
                    KeyValue::new("service.version", identity.version.clone()),
                    KeyValue::new("lumen.workload", identity.workload.clone()),
                ])
                .build(),
        );
        Ok(Exporter {
            inner,
            scope: InstrumentationScope::builder(PROXY_SCOPE)
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            metrics,
            batch_size: config.batch_size.max(1),
            flush_interval: config.flush_interval,
            export_timeout: config.export_timeout,
            last_warning: None,
        })
    }

    /// Drains the queue in batches until shutdown, then exports what is left.
    ///
    /// The queue is polled on a timer rather than awaited: waiting on it
    /// would have every record the proxy queues wake this thread (a context
    /// switch per request); polling wakes it once per interval.
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<RequestRecord>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.wait_for(|s| *s) => true,
            };
            // The final drain shares one deadline: a collector that takes
            // packets without answering must not hold shutdown for a timeout
            // per batch.
            let deadline = stopping.then(|| tokio::time::Instant::now() + self.export_timeout);
            if stopping {
                rx.close();
            }
            // Everything queued now, in batches; a full batch may have more behind it.
            loop {
                let mut batch = Vec::with_capacity(self.batch_size);
                let mut bytes = 0;
                while batch.len() < self.batch_size && bytes < MAX_BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(r) => {
                            bytes += approx_encoded_len(&r);
                            batch.push(r);
                        }
                        Err(_) => break,
                    }
                }
                let full = batch.len() == self.batch_size || bytes >= MAX_BATCH_BYTES;
                if !batch.is_empty() {
                    let n = batch.len() as u64;
                    match deadline {
                        None => self.export(batch, true).await,
                        Some(d) => {
                            if tokio::time::timeout_at(d, self.export(batch, false))
                                .await
                                .is_err()
                            {
                                self.metrics.dropped(DROP_EXPORT_FAILED, n);
                                let rest = drain_count(&mut rx);
                                self.metrics.dropped(DROP_EXPORT_FAILED, rest);
                                tracing::warn!(
                                    records = n + rest,
                                    "telemetry export did not finish before shutdown; records dropped"
                                );
                                break;
                            }
                        }
                    }
                }
                if !full {
                    break;
                }
            }
            if stopping {
                break;
            }
        }
        let _ = self.inner.shutdown();
    }

    async fn export(&mut self, records: Vec<RequestRecord>, retry: bool) {
        let n = records.len() as u64;
        let mut backoffs = if retry { &RETRY_BACKOFF[..] } else { &[] }.iter();
        loop {
            // Spans are rebuilt per attempt rather than cloned up front: the
            // first attempt almost always succeeds.
            let spans: Vec<SpanData> = records.iter().map(|r| self.to_span(r)).collect();
            let Err(e) = self.inner.export(spans).await else {
                self.metrics.exported(n);
                return;
            };
            if let Some(pause) = backoffs.next() {
                tokio::time::sleep(*pause).await;
                continue;
            }
            self.metrics.dropped(DROP_EXPORT_FAILED, n);
            // One warning per interval: a down collector must not flood logs.
            let now = Instant::now();
            if self
                .last_warning
                .is_none_or(|t| now.duration_since(t) > Duration::from_secs(10))
            {
                self.last_warning = Some(now);
                tracing::warn!(records = n, error = %e, "telemetry export failed; records dropped");
            }
            return;
        }
    }

    fn to_span(&self, r: &RequestRecord) -> SpanData {
        let str_attr = |k: &'static str, v: &Arc<str>| KeyValue::new(k, Value::from(v.clone()));
        let mut attributes = vec![
            KeyValue::new(attr::REPORTER, r.reporter.as_str()),
            str_attr(attr::SOURCE_SERVICE, &r.source.service),
            str_attr(attr::SOURCE_WORKLOAD, &r.source.workload),
            str_attr(attr::SOURCE_NAMESPACE, &r.source.namespace),
            str_attr(attr::SOURCE_VERSION, &r.source.version),
            str_attr(attr::DESTINATION_SERVICE, &r.destination.service),
            str_attr(attr::DESTINATION_WORKLOAD, &r.destination.workload),
            str_attr(attr::DESTINATION_NAMESPACE, &r.destination.namespace),
            str_attr(attr::DESTINATION_VERSION, &r.destination.version),
            KeyValue::new(attr::PROTOCOL, r.protocol.as_str()),
            KeyValue::new(attr::METHOD, r.method.clone()),
            KeyValue::new(attr::AUTHORITY, r.authority.clone()),
            KeyValue::new(attr::PATH, r.path.clone()),
            str_attr(attr::ROUTE, &r.route),
            KeyValue::new(attr::STATUS, i64::from(r.status)),
            KeyValue::new(attr::REQUEST_BYTES, r.request_bytes as i64),
            KeyValue::new(attr::RESPONSE_BYTES, r.response_bytes as i64),
            KeyValue::new(attr::RETRIES, i64::from(r.retries)),
            KeyValue::new(attr::RESPONSE_FLAGS, r.response_flags.to_string()),
            KeyValue::new(attr::MTLS, r.mtls),
        ];
        if let Some(g) = r.grpc_status {
            attributes.push(KeyValue::new(attr::GRPC_STATUS, i64::from(g)));
        }
        if let Some(u) = &r.upstream_address {
            attributes.push(str_attr(attr::UPSTREAM_ADDRESS, u));
        }
        let failed = r.status >= 500 || r.grpc_status.is_some_and(|g| g != 0);
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(r.trace_id),
                SpanId::from_bytes(r.span_id),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: r.parent_span_id.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: r.parent_span_id.is_some(),
            span_kind: match r.reporter {
                Reporter::Source => SpanKind::Client,
                Reporter::Destination => SpanKind::Server,
            },
            name: Cow::Owned(format!("{} {}", r.method, r.destination.service)),
            start_time: r.start_time,
            end_time: r.start_time + r.duration,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if failed {
                Status::error("")
            } else {
                Status::Unset
            },
            instrumentation_scope: self.scope.clone(),
        }
    }
}

/// Empties a closed queue, returning how many records it held.
fn drain_count(rx: &mut mpsc::Receiver<RequestRecord>) -> u64 {
    let mut n = 0;
    while rx.try_recv().is_ok() {
        n += 1;
    }
    n
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}
