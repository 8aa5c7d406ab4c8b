//! Mixed OTLP ingest per core, and bytes on disk per item after compaction.
//!
//! One `lumen up`; OTLP/gRPC senders export traces, metrics and logs from
//! many resources (services, pods, hosts), each sending its next export
//! when the last is acknowledged. Items acknowledged per second, per core
//! of `lumen up`, say what one core takes in; then the rows are flushed and
//! compacted and the tables' bytes per row say what each item costs on
//! disk.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
    Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use rand::Rng;

use crate::peers::{self, CollectorPorts, local};
use crate::procstat;

pub struct Settings {
    pub duration: Duration,
    pub senders: usize,
    /// Resources (service instances) per export.
    pub resources: usize,
    /// Spans, log records, and metric data points per resource per export.
    pub per_resource: usize,
}

/// What one signal did.
#[derive(Debug, Default, Clone)]
pub struct SignalResult {
    pub items_per_s: f64,
    pub exports: u64,
    pub failed: u64,
    /// Rows and bytes of its table after compaction.
    pub rows: f64,
    pub bytes: f64,
    pub files: f64,
}

pub struct Outcome {
    /// Traces, metrics, logs.
    pub signals: [SignalResult; 3],
    pub lumen_cores: f64,
}

const SIGNALS: [(&str, &str); 3] = [
    ("traces", "spans"),
    ("metrics", "metrics"),
    ("logs", "logs"),
];

fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

fn s(v: impl Into<String>) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

const SERVICES: [&str; 8] = [
    "checkout", "cart", "payment", "shipping", "catalog", "search", "auth", "frontend",
];
const ROUTES: [&str; 6] = [
    "/api/orders/{id}",
    "/api/cart",
    "/api/items/{id}",
    "/api/search",
    "/login",
    "/",
];

/// A resource as an SDK in Kubernetes describes itself.
fn resource(sender: usize, r: usize) -> Resource {
    let service = SERVICES[r % SERVICES.len()];
    Resource {
        attributes: vec![
            kv("service.name", s(service)),
            kv("service.namespace", s("shop")),
            kv("service.version", s("1.4.2")),
            kv("service.instance.id", s(format!("{service}-{sender}-{r}"))),
            kv("k8s.namespace.name", s("shop")),
            kv("k8s.pod.name", s(format!("{service}-7d9f8-{sender}{r:02}"))),
            kv("k8s.deployment.name", s(service)),
            kv("host.name", s(format!("node-{}", r % 4))),
            kv("telemetry.sdk.language", s("go")),
            kv("telemetry.sdk.version", s("1.30.0")),
        ],
        ..Default::default()
    }
}

fn traces(set: &Settings, sender: usize, rng: &mut impl Rng) -> ExportTraceServiceRequest {
    let now = now_nanos();
    ExportTraceServiceRequest {
        resource_spans: (0..set.resources)
            .map(|r| {
                let trace_id: [u8; 16] = rng.random();
                let spans = (0..set.per_resource)
                    .map(|i| {
                        let route = ROUTES[i % ROUTES.len()];
                        let status = if rng.random_bool(0.02) { 500 } else { 200 };
                        let start = now - rng.random_range(0..50_000_000u64);
                        Span {
                            trace_id: trace_id.to_vec(),
                            span_id: rng.random::<[u8; 8]>().to_vec(),
                            parent_span_id: if i == 0 {
                                Vec::new()
                            } else {
                                rng.random::<[u8; 8]>().to_vec()
                            },
                            name: format!("GET {route}"),
                            kind: 2,
                            start_time_unix_nano: start,
                            end_time_unix_nano: start + rng.random_range(100_000..80_000_000u64),
                            attributes: vec![
                                kv("http.request.method", s("GET")),
                                kv("http.route", s(route)),
                                kv(
                                    "url.path",
                                    s(route
                                        .replace("{id}", &rng.random_range(1..5000).to_string())),
                                ),
                                kv(
                                    "http.response.status_code",
                                    any_value::Value::IntValue(status),
                                ),
                                kv("server.address", s("shop.example.com")),
                                kv("network.protocol.version", s("1.1")),
                                kv("user_agent.original", s("Mozilla/5.0 (X11; Linux x86_64)")),
                                kv(
                                    "client.address",
                                    s(format!(
                                        "10.0.{}.{}",
                                        rng.random_range(0..4),
                                        rng.random_range(1..255)
                                    )),
                                ),
                            ],
                            status: (status >= 500).then(|| Status {
                                code: 2,
                                message: "internal error".into(),
                            }),
                            ..Default::default()
                        }
                    })
                    .collect();
                ResourceSpans {
                    resource: Some(resource(sender, r)),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: "net/http".into(),
                            version: "0.53.0".into(),
                            ..Default::default()
                        }),
                        spans,
                        ..Default::default()
                    }],
                    ..Default::default()
                }
            })
            .collect(),
    }
}

fn metrics(set: &Settings, sender: usize, rng: &mut impl Rng) -> ExportMetricsServiceRequest {
    let now = now_nanos();
    let start = now - 600_000_000_000;
    // A third each: counter, histogram and gauge points.
    let n = set.per_resource.div_ceil(3);
    let attrs = |i: usize| {
        vec![
            kv("http.route", s(ROUTES[i % ROUTES.len()])),
            kv("http.request.method", s("GET")),
            kv(
                "http.response.status_code",
                any_value::Value::IntValue(if i.is_multiple_of(7) { 500 } else { 200 }),
            ),
        ]
    };
    ExportMetricsServiceRequest {
        resource_metrics: (0..set.resources)
            .map(|r| {
                let counter = Metric {
                    name: "http.server.requests".into(),
                    unit: "1".into(),
                    data: Some(metric::Data::Sum(Sum {
                        data_points: (0..n)
                            .map(|i| NumberDataPoint {
                                attributes: attrs(i),
                                start_time_unix_nano: start,
                                time_unix_nano: now,
                                value: Some(number_data_point::Value::AsInt(
                                    rng.random_range(0..100_000),
                                )),
                                ..Default::default()
                            })
                            .collect(),
                        aggregation_temporality: 2,
                        is_monotonic: true,
                    })),
                    ..Default::default()
                };
                let bounds = vec![
                    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                ];
                let histogram = Metric {
                    name: "http.server.request.duration".into(),
                    unit: "s".into(),
                    data: Some(metric::Data::Histogram(Histogram {
                        data_points: (0..n)
                            .map(|i| {
                                let counts: Vec<u64> = (0..=bounds.len())
                                    .map(|_| rng.random_range(0..500))
                                    .collect();
                                HistogramDataPoint {
                                    attributes: attrs(i),
                                    start_time_unix_nano: start,
                                    time_unix_nano: now,
                                    count: counts.iter().sum(),
                                    sum: Some(rng.random_range(0.0..5000.0)),
                                    bucket_counts: counts,
                                    explicit_bounds: bounds.clone(),
                                    min: Some(0.001),
                                    max: Some(9.0),
                                    ..Default::default()
                                }
                            })
                            .collect(),
                        aggregation_temporality: 2,
                    })),
                    ..Default::default()
                };
                let gauge = Metric {
                    name: "process.memory.usage".into(),
                    unit: "By".into(),
                    data: Some(metric::Data::Gauge(Gauge {
                        data_points: (0..n)
                            .map(|i| NumberDataPoint {
                                attributes: vec![kv(
                                    "memory.type",
                                    s(["heap", "stack", "other"][i % 3]),
                                )],
                                time_unix_nano: now,
                                value: Some(number_data_point::Value::AsDouble(
                                    rng.random_range(1e6..5e8),
                                )),
                                ..Default::default()
                            })
                            .collect(),
                    })),
                    ..Default::default()
                };
                ResourceMetrics {
                    resource: Some(resource(sender, r)),
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(InstrumentationScope {
                            name: "go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
                                .into(),
                            ..Default::default()
                        }),
                        metrics: vec![counter, histogram, gauge],
                        ..Default::default()
                    }],
                    ..Default::default()
                }
            })
            .collect(),
    }
}

fn logs(set: &Settings, sender: usize, rng: &mut impl Rng) -> ExportLogsServiceRequest {
    let now = now_nanos();
    ExportLogsServiceRequest {
        resource_logs: (0..set.resources)
            .map(|r| ResourceLogs {
                resource: Some(resource(sender, r)),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "app.logger".into(),
                        ..Default::default()
                    }),
                    log_records: (0..set.per_resource)
                        .map(|_| {
                            let (severity, text) = match rng.random_range(0..20) {
                                0 => (17, "ERROR"),
                                1..=3 => (13, "WARN"),
                                _ => (9, "INFO"),
                            };
                            let order = rng.random_range(10_000..99_999);
                            let ms = rng.random_range(1..900);
                            LogRecord {
                                time_unix_nano: now - rng.random_range(0..50_000_000u64),
                                observed_time_unix_nano: now,
                                severity_number: severity,
                                severity_text: text.into(),
                                body: Some(AnyValue {
                                    value: Some(s(format!(
                                        "order {order} processed in {ms} ms by worker {}",
                                        rng.random_range(0..16)
                                    ))),
                                }),
                                attributes: vec![
                                    kv("order.id", any_value::Value::IntValue(order)),
                                    kv("code.function", s("ProcessOrder")),
                                    kv(
                                        "thread.id",
                                        any_value::Value::IntValue(rng.random_range(1..64)),
                                    ),
                                ],
                                trace_id: rng.random::<[u8; 16]>().to_vec(),
                                span_id: rng.random::<[u8; 8]>().to_vec(),
                                flags: 1,
                                ..Default::default()
                            }
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

/// Payloads built ahead, so senders spend their CPU on sending; each send
/// gets fresh ids, times and values ([`refresh`]), so no two rows are alike.
struct Payloads {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
    logs: Vec<ExportLogsServiceRequest>,
}

const PAYLOADS_PER_SIGNAL: usize = 40;

pub fn run(lumen: &Path, dir: &Path, set: &Settings) -> Result<Outcome> {
    let ports = CollectorPorts::pick()?;
    let mesh = peers::write_mesh(dir, local(9), false)?;
    let args = [
        "--flush-interval",
        "5s",
        "--compaction-interval",
        "2s",
        "--compaction-min-files",
        "2",
        "--max-hot-mib",
        "4096",
    ];
    let mut up = peers::start_collector(lumen, dir, &mesh, &ports, &args)?;
    let clk_tck = procstat::clock_ticks_per_sec();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let endpoint = format!("http://{}", local(ports.otlp_grpc));
    eprintln!("  building payloads");
    let payloads: Vec<Arc<Payloads>> = (0..set.senders)
        .map(|sender| {
            let mut rng = rand::rng();
            Arc::new(Payloads {
                traces: (0..PAYLOADS_PER_SIGNAL)
                    .map(|_| traces(set, sender, &mut rng))
                    .collect(),
                metrics: (0..PAYLOADS_PER_SIGNAL)
                    .map(|_| metrics(set, sender, &mut rng))
                    .collect(),
                logs: (0..PAYLOADS_PER_SIGNAL)
                    .map(|_| logs(set, sender, &mut rng))
                    .collect(),
            })
        })
        .collect();
    eprintln!("  mixed OTLP load ({} s)", set.duration.as_secs());
    let before = procstat::cpu_ticks(up.pid())?;
    let mut signals = rt.block_on(load(&endpoint, set, &payloads))?;
    let lumen_cores = (procstat::cpu_ticks(up.pid())? - before) as f64
        / clk_tck as f64
        / set.duration.as_secs_f64();
    up.check_alive()?;

    // Everything to Parquet, then compacted: the bytes an item costs.
    eprintln!("  waiting for flush and compaction");
    let query = local(ports.query);
    let metric = |series: &str| crate::http::metric(query, series);
    // Done once nothing is hot and three compaction intervals pass with
    // no compaction.
    let compactions = "lumen_compactions_total{outcome=\"ok\"}";
    let mut last = (f64::NAN, Instant::now());
    up.wait_within("flushed and compacted", Duration::from_secs(180), || {
        let hot = SIGNALS.iter().all(|(_, table)| {
            metric(&format!(
                "lumen_table_rows{{table=\"{table}\",tier=\"hot\"}}"
            )) == 0.0
        });
        let done = metric(compactions);
        if done != last.0 {
            last = (done, Instant::now());
        }
        hot && last.1.elapsed() > Duration::from_secs(6)
    })?;
    for (i, (_, table)) in SIGNALS.iter().enumerate() {
        signals[i].rows = metric(&format!(
            "lumen_table_rows{{table=\"{table}\",tier=\"files\"}}"
        ));
        signals[i].bytes = metric(&format!(
            "lumen_table_bytes{{table=\"{table}\",tier=\"files\"}}"
        ));
        signals[i].files = metric(&format!("lumen_table_files{{table=\"{table}\"}}"));
    }
    up.check_alive()?;
    Ok(Outcome {
        signals,
        lumen_cores,
    })
}

/// New ids and times for a reused traces payload.
fn refresh_traces(r: &mut ExportTraceServiceRequest, rng: &mut impl Rng) {
    let now = now_nanos();
    for rs in &mut r.resource_spans {
        let trace_id: [u8; 16] = rng.random();
        for s in rs.scope_spans.iter_mut().flat_map(|s| &mut s.spans) {
            let length = s.end_time_unix_nano - s.start_time_unix_nano;
            s.start_time_unix_nano = now - rng.random_range(0..50_000_000u64);
            s.end_time_unix_nano = s.start_time_unix_nano + length;
            s.trace_id.copy_from_slice(&trace_id);
            rng.fill(&mut s.span_id[..]);
            if !s.parent_span_id.is_empty() {
                rng.fill(&mut s.parent_span_id[..]);
            }
        }
    }
}

/// New times and values for a reused metrics payload.
fn refresh_metrics(r: &mut ExportMetricsServiceRequest, rng: &mut impl Rng) {
    let now = now_nanos();
    for m in r
        .resource_metrics
        .iter_mut()
        .flat_map(|r| &mut r.scope_metrics)
        .flat_map(|s| &mut s.metrics)
    {
        match &mut m.data {
            Some(metric::Data::Sum(x)) => {
                for p in &mut x.data_points {
                    p.time_unix_nano = now;
                    if let Some(number_data_point::Value::AsInt(v)) = &mut p.value {
                        *v += rng.random_range(0..50);
                    }
                }
            }
            Some(metric::Data::Gauge(g)) => {
                for p in &mut g.data_points {
                    p.time_unix_nano = now;
                    p.value = Some(number_data_point::Value::AsDouble(
                        rng.random_range(1e6..5e8),
                    ));
                }
            }
            Some(metric::Data::Histogram(h)) => {
                for p in &mut h.data_points {
                    p.time_unix_nano = now;
                    for c in &mut p.bucket_counts {
                        *c += rng.random_range(0..20);
                    }
                    p.count = p.bucket_counts.iter().sum();
                    p.sum = p.sum.map(|s| s + rng.random_range(0.0..100.0));
                }
            }
            _ => {}
        }
    }
}

/// New times, ids and messages for a reused logs payload.
fn refresh_logs(r: &mut ExportLogsServiceRequest, rng: &mut impl Rng) {
    let now = now_nanos();
    for rec in r
        .resource_logs
        .iter_mut()
        .flat_map(|r| &mut r.scope_logs)
        .flat_map(|s| &mut s.log_records)
    {
        rec.time_unix_nano = now - rng.random_range(0..50_000_000u64);
        rec.observed_time_unix_nano = now;
        rng.fill(&mut rec.trace_id[..]);
        rng.fill(&mut rec.span_id[..]);
        let order = rng.random_range(10_000..99_999i64);
        rec.body = Some(AnyValue {
            value: Some(s(format!(
                "order {order} processed in {} ms by worker {}",
                rng.random_range(1..900),
                rng.random_range(0..16)
            ))),
        });
        if let Some(a) = rec.attributes.first_mut() {
            a.value = Some(AnyValue {
                value: Some(any_value::Value::IntValue(order)),
            });
        }
    }
}

async fn load(
    endpoint: &str,
    set: &Settings,
    payloads: &[Arc<Payloads>],
) -> Result<[SignalResult; 3]> {
    let items: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let exports: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let failed: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let deadline = Instant::now() + set.duration;
    let mut tasks = Vec::new();
    let per_export = [
        set.resources * set.per_resource,
        set.resources * set.per_resource.div_ceil(3) * 3,
        set.resources * set.per_resource,
    ];
    for p in payloads {
        let mut t = TraceServiceClient::connect(endpoint.to_string())
            .await
            .context("connecting to the collector")?;
        let mut m = MetricsServiceClient::connect(endpoint.to_string()).await?;
        let mut l = LogsServiceClient::connect(endpoint.to_string()).await?;
        let (p, items, exports, failed) =
            (p.clone(), items.clone(), exports.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = 0usize;
            while Instant::now() < deadline {
                let signal = k % 3;
                let i = (k / 3) % PAYLOADS_PER_SIGNAL;
                // The thread's generator is not held across an await.
                let ok = match signal {
                    0 => {
                        let mut r = p.traces[i].clone();
                        refresh_traces(&mut r, &mut rand::rng());
                        t.export(r).await.is_ok()
                    }
                    1 => {
                        let mut r = p.metrics[i].clone();
                        refresh_metrics(&mut r, &mut rand::rng());
                        m.export(r).await.is_ok()
                    }
                    _ => {
                        let mut r = p.logs[i].clone();
                        refresh_logs(&mut r, &mut rand::rng());
                        l.export(r).await.is_ok()
                    }
                };
                if ok {
                    items[signal].fetch_add(per_export[signal] as u64, Ordering::Relaxed);
                    exports[signal].fetch_add(1, Ordering::Relaxed);
                } else {
                    failed[signal].fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                k += 1;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let secs = set.duration.as_secs_f64();
    Ok(std::array::from_fn(|i| SignalResult {
        items_per_s: items[i].load(Ordering::Relaxed) as f64 / secs,
        exports: exports[i].load(Ordering::Relaxed),
        failed: failed[i].load(Ordering::Relaxed),
        ..Default::default()
    }))
}

/// Published per-core figures of the OpenTelemetry Collector (Splunk's
/// distribution's sizing guide: receive, process and export; no storage).
const OTELCOL_PER_CORE: [f64; 3] = [15_000.0, 20_000.0, 10_000.0];

pub fn render(command: &str, machine: &str, set: &Settings, o: &Outcome) -> String {
    let mut out = crate::report::header(
        "Lumen collector: mixed OTLP ingest per core, bytes per item after compaction",
        command,
        &crate::report::now(),
        machine,
    );
    let w = &mut out;
    let _ = writeln!(
        w,
        "- load: {} OTLP/gRPC senders, each cycling traces → metrics → logs exports and sending the \
         next when the last is acknowledged, for {} s; every export holds {} resources (service \
         instances with 10 resource attributes) × {} items: spans with 8 attributes, metric points \
         (a third each counter, 15-bucket histogram, gauge; 1–3 attributes), log records with a \
         text body, 3 attributes and trace ids; ids random, no two rows alike",
        set.senders,
        set.duration.as_secs(),
        set.resources,
        set.per_resource
    );
    let _ = writeln!(
        w,
        "- lumen up: WAL with fsync per group commit, Parquet flushes every 5 s, compaction every 2 s; \
         the senders run on the same 2 cores\n"
    );
    let _ = writeln!(
        w,
        "| signal | items acked/s | exports | failed | rows on disk | files | bytes per item on disk |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|");
    let names = ["spans", "metric data points", "log records"];
    let total: f64 = o.signals.iter().map(|s| s.items_per_s).sum();
    for (i, s) in o.signals.iter().enumerate() {
        let _ = writeln!(
            w,
            "| {} | {:.0} | {} | {} | {:.0} | {:.0} | {:.1} |",
            names[i],
            s.items_per_s,
            s.exports,
            s.failed,
            s.rows,
            s.files,
            s.bytes / s.rows.max(1.0)
        );
    }
    let per_core = total / o.lumen_cores.max(1e-9);
    let _ = writeln!(
        w,
        "\n- all signals: {total:.0} items/s on {:.2} cores of `lumen up` = **{per_core:.0} items per core-second**",
        o.lumen_cores
    );
    // The OpenTelemetry Collector's per-core figure for this same mix.
    let mix: f64 = o
        .signals
        .iter()
        .zip(OTELCOL_PER_CORE)
        .map(|(s, c)| s.items_per_s / total.max(1.0) / c)
        .sum();
    let _ = writeln!(
        w,
        "- the OpenTelemetry Collector's published sizing (1 core per 15,000 spans/s, 20,000 data points/s or \
         10,000 log records/s; it forwards, it does not store) gives {:.0} items per core-second for this \
         mix: Lumen / OTel Collector = **{:.1}×**",
        1.0 / mix.max(1e-12),
        per_core * mix
    );
    out
}
