//! Arrow schemas of the store's tables and the OTLP names request records
//! travel under between proxy and collector.

use std::sync::{Arc, LazyLock};
use std::time::{SystemTime, UNIX_EPOCH};

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, FixedSizeBinaryBuilder, Int32Builder, Int64Builder,
    StringDictionaryBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use crate::record::RequestRecord;

/// Table of one row per request per reporting proxy.
pub const REQUESTS: &str = "requests";
/// Table of spans sent by applications' own OpenTelemetry SDKs.
pub const SPANS: &str = "spans";
/// Table of request aggregates per window, kept at ingest from `requests`.
pub const ROLLUPS: &str = "rollups";
/// Table of applications' OTLP metric data points, one row per point.
pub const METRICS: &str = "metrics";
/// Table of applications' OTLP log records.
pub const LOGS: &str = "logs";
/// Table of the policy engine's changes: alerts and policies turning on
/// and off, and why.
pub const POLICY_EVENTS: &str = "policy_events";
/// Every table the store keeps, in a stable order (the WAL names tables by
/// position: new tables go at the end).
pub const TABLES: [&str; 6] = [REQUESTS, SPANS, ROLLUPS, METRICS, LOGS, POLICY_EVENTS];

/// Resource attributes of the OpenTelemetry semantic conventions that
/// `metrics` and `logs` keep as columns of their own (column, attribute);
/// the rest stay in `resource_attributes`.
pub const RESOURCE_COLUMNS: [(&str, &str); 10] = [
    ("service_name", "service.name"),
    ("service_namespace", "service.namespace"),
    ("service_version", "service.version"),
    ("service_instance_id", "service.instance.id"),
    ("deployment_environment", "deployment.environment.name"),
    ("host_name", "host.name"),
    ("k8s_namespace_name", "k8s.namespace.name"),
    ("k8s_pod_name", "k8s.pod.name"),
    ("k8s_deployment_name", "k8s.deployment.name"),
    ("k8s_node_name", "k8s.node.name"),
];

/// Rollup window lengths, in seconds: the short one is kept from rows, the
/// long one merged from short ones.
pub const ROLLUP_WINDOWS: [i64; 2] = [10, 60];

/// Istio's buckets for `istio_request_duration_milliseconds`, so that
/// dashboards and `histogram_quantile` built for Istio read the same
/// quantiles from the proxies' metrics and from rollups. `+Inf` follows.
pub const DURATION_BUCKETS_MS: [f64; 14] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];

/// Buckets (bytes) for `istio_request_bytes` and `istio_response_bytes`:
/// Envoy's default histogram buckets, which Istio's size histograms use
/// unless a pod's `sidecar.istio.io/statsHistogramBuckets` says otherwise.
/// `+Inf` follows.
pub const SIZE_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Instrumentation scope of the spans Lumen proxies export; the collector
/// routes spans of this scope into `requests`, everything else into `spans`.
pub const PROXY_SCOPE: &str = "lumen-proxy";

/// Instrumentation scope of the `metrics` rows recording rules write: their
/// series carry exactly the labels the rule gave them (no `job` or
/// `instance` from the resource), as Prometheus's recorded series.
pub const RECORDING_SCOPE: &str = "lumen-rules";

/// Instrumentation scope of the `metrics` rows a Prometheus remote-wrote:
/// like recorded series, they carry exactly their own labels (`job` and
/// `instance` included, as the sending Prometheus gave them).
pub const REMOTE_WRITE_SCOPE: &str = "prometheus-remote-write";

/// Name of the timestamp column every table is partitioned and pruned by.
pub const TIME_COLUMN: &str = "time";

/// OTLP span attribute keys of the request record's fields. Fields with an
/// OpenTelemetry semantic convention use it, so Jaeger and other OTLP
/// consumers show them as they expect; the rest are `lumen.*`.
pub mod attr {
    pub const REPORTER: &str = "lumen.reporter";
    pub const SOURCE_SERVICE: &str = "lumen.source.service";
    pub const SOURCE_WORKLOAD: &str = "lumen.source.workload";
    pub const SOURCE_NAMESPACE: &str = "lumen.source.namespace";
    pub const SOURCE_VERSION: &str = "lumen.source.version";
    pub const DESTINATION_SERVICE: &str = "lumen.destination.service";
    pub const DESTINATION_WORKLOAD: &str = "lumen.destination.workload";
    pub const DESTINATION_NAMESPACE: &str = "lumen.destination.namespace";
    pub const DESTINATION_VERSION: &str = "lumen.destination.version";
    pub const PROTOCOL: &str = "lumen.protocol";
    pub const METHOD: &str = "http.request.method";
    pub const AUTHORITY: &str = "lumen.authority";
    pub const PATH: &str = "url.path";
    pub const ROUTE: &str = "lumen.route";
    pub const STATUS: &str = "http.response.status_code";
    pub const GRPC_STATUS: &str = "rpc.grpc.status_code";
    pub const REQUEST_BYTES: &str = "lumen.request_bytes";
    pub const RESPONSE_BYTES: &str = "lumen.response_bytes";
    pub const RETRIES: &str = "lumen.retries";
    pub const UPSTREAM_ADDRESS: &str = "lumen.upstream_address";
    pub const RESPONSE_FLAGS: &str = "lumen.response_flags";
    pub const MTLS: &str = "lumen.mtls";
    pub const POLICY: &str = "lumen.policy";
    pub const SOURCE_PRINCIPAL: &str = "lumen.source_principal";
    pub const DESTINATION_PRINCIPAL: &str = "lumen.destination_principal";
}

fn dict() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// Trace ids: 16 bytes, as W3C trace context and OTLP carry them.
pub const TRACE_ID: DataType = DataType::FixedSizeBinary(16);
/// Span ids: 8 bytes.
pub const SPAN_ID: DataType = DataType::FixedSizeBinary(8);

fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

static REQUESTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("time", timestamp(), false),
        Field::new("duration_us", DataType::Int64, false),
        Field::new("reporter", dict(), false),
        Field::new("source_service", dict(), false),
        Field::new("source_workload", dict(), false),
        Field::new("source_namespace", dict(), false),
        Field::new("source_version", dict(), false),
        Field::new("destination_service", dict(), false),
        Field::new("destination_workload", dict(), false),
        Field::new("destination_version", dict(), false),
        Field::new("destination_namespace", dict(), false),
        Field::new("protocol", dict(), false),
        Field::new("method", dict(), false),
        Field::new("authority", dict(), false),
        Field::new("path", dict(), false),
        Field::new("route", dict(), false),
        Field::new("status", DataType::Int32, false),
        Field::new("grpc_status", DataType::Int32, true),
        Field::new("request_bytes", DataType::Int64, false),
        Field::new("response_bytes", DataType::Int64, false),
        Field::new("retries", DataType::Int32, false),
        Field::new("upstream_address", dict(), true),
        Field::new("response_flags", dict(), false),
        Field::new("mtls", DataType::Boolean, false),
        Field::new("trace_id", TRACE_ID, false),
        Field::new("span_id", SPAN_ID, false),
        Field::new("parent_span_id", SPAN_ID, true),
        // Last, so that files and batches from before them read as null.
        Field::new("policy", dict(), true),
        // The SPIFFE ids mesh mTLS proved, null without it.
        Field::new("source_principal", dict(), true),
        Field::new("destination_principal", dict(), true),
    ]))
});

static SPANS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("time", timestamp(), false),
        Field::new("duration_us", DataType::Int64, false),
        Field::new("trace_id", TRACE_ID, false),
        Field::new("span_id", SPAN_ID, false),
        Field::new("parent_span_id", SPAN_ID, true),
        Field::new("service_name", dict(), false),
        Field::new("name", dict(), false),
        Field::new("kind", dict(), false),
        Field::new("status_code", dict(), false),
        Field::new("status_message", DataType::Utf8, true),
        Field::new("scope_name", dict(), true),
        Field::new("attributes", DataType::Utf8, false),
        Field::new("resource_attributes", dict(), false),
        Field::new("events", DataType::Int32, false),
        Field::new("links", DataType::Int32, false),
    ]))
});

/// Attributes as a map of names to values (non-string values as JSON), so
/// SQL can say `attributes['http.route']`.
pub fn attributes_type() -> DataType {
    DataType::Map(
        Arc::new(Field::new(
            "entries",
            DataType::Struct(
                vec![
                    Field::new("keys", DataType::Utf8, false),
                    Field::new("values", DataType::Utf8, true),
                ]
                .into(),
            ),
            false,
        )),
        false,
    )
}

fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new_list_field(item, false)))
}

/// The resource's columns: the typed semantic-convention ones, then its
/// other attributes as a JSON object (dictionary-encoded: stored once per
/// resource, however many rows share it).
fn resource_fields() -> Vec<Field> {
    RESOURCE_COLUMNS
        .iter()
        .map(|(column, _)| Field::new(*column, dict(), *column != "service_name"))
        .collect()
}

static METRICS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new("time", timestamp(), false),
        Field::new("start_time", timestamp(), true),
    ];
    fields.extend(resource_fields());
    fields.extend([
        Field::new("scope_name", dict(), true),
        Field::new("scope_version", dict(), true),
        Field::new("name", dict(), false),
        Field::new("description", dict(), true),
        Field::new("unit", dict(), true),
        // gauge, sum, histogram, exponential_histogram, summary
        Field::new("type", dict(), false),
        // cumulative, delta (sums and histograms)
        Field::new("aggregation_temporality", dict(), true),
        Field::new("is_monotonic", DataType::Boolean, true),
        // Gauges and sums; null for a point flagged no_recorded_value.
        Field::new("value", DataType::Float64, true),
        Field::new("count", DataType::Int64, true),
        Field::new("sum", DataType::Float64, true),
        Field::new("min", DataType::Float64, true),
        Field::new("max", DataType::Float64, true),
        Field::new("explicit_bounds", list_of(DataType::Float64), true),
        Field::new("bucket_counts", list_of(DataType::Int64), true),
        Field::new("scale", DataType::Int32, true),
        Field::new("zero_count", DataType::Int64, true),
        Field::new("positive_offset", DataType::Int32, true),
        Field::new("positive_bucket_counts", list_of(DataType::Int64), true),
        Field::new("negative_offset", DataType::Int32, true),
        Field::new("negative_bucket_counts", list_of(DataType::Int64), true),
        Field::new("quantiles", list_of(DataType::Float64), true),
        Field::new("quantile_values", list_of(DataType::Float64), true),
        Field::new("flags", DataType::Int32, false),
        Field::new("attributes", attributes_type(), false),
        Field::new("resource_attributes", dict(), false),
    ]);
    Arc::new(Schema::new(fields))
});

static LOGS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new("time", timestamp(), false),
        Field::new("observed_time", timestamp(), true),
    ];
    fields.extend(resource_fields());
    fields.extend([
        Field::new("scope_name", dict(), true),
        Field::new("scope_version", dict(), true),
        Field::new("severity_number", DataType::Int32, false),
        Field::new("severity_text", dict(), true),
        // A string body as is; any other body as JSON.
        Field::new("body", DataType::Utf8, true),
        Field::new("event_name", dict(), true),
        Field::new("trace_id", TRACE_ID, true),
        Field::new("span_id", SPAN_ID, true),
        Field::new("flags", DataType::Int32, false),
        Field::new("attributes", attributes_type(), false),
        Field::new("resource_attributes", dict(), false),
    ]);
    Arc::new(Schema::new(fields))
});

static ROLLUPS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new("time", timestamp(), false),
        Field::new("window_seconds", DataType::Int32, false),
    ];
    for name in ROLLUP_KEY_NAMES {
        // Files from before the principals read them as null (unknown).
        let nullable = name.ends_with("_principal");
        fields.push(Field::new(name, dict(), nullable));
    }
    fields.extend([
        Field::new("status", DataType::Int32, false),
        Field::new("grpc_status", DataType::Int32, true),
        Field::new("mtls", DataType::Boolean, false),
        Field::new("requests", DataType::Int64, false),
        Field::new("errors", DataType::Int64, false),
        Field::new("request_bytes", DataType::Int64, false),
        Field::new("response_bytes", DataType::Int64, false),
        Field::new("duration_sum_us", DataType::Int64, false),
        Field::new("duration_max_us", DataType::Int64, false),
        Field::new("duration_sketch", DataType::Binary, false),
        Field::new(
            "duration_bucket",
            DataType::List(Arc::new(Field::new_list_field(DataType::Int64, false))),
            false,
        ),
        // Cumulative counts per [`SIZE_BUCKETS`] bound; files from before
        // them read them as null (no size histogram for those windows).
        Field::new(
            "request_bytes_bucket",
            DataType::List(Arc::new(Field::new_list_field(DataType::Int64, false))),
            true,
        ),
        Field::new(
            "response_bytes_bucket",
            DataType::List(Arc::new(Field::new_list_field(DataType::Int64, false))),
            true,
        ),
    ]);
    Arc::new(Schema::new(fields))
});

/// The string columns a rollup is keyed by (with `status`, `grpc_status`
/// and `mtls`), named as in `requests`.
pub const ROLLUP_KEY_NAMES: [&str; 14] = [
    "reporter",
    "source_service",
    "source_workload",
    "source_namespace",
    "source_version",
    "destination_service",
    "destination_workload",
    "destination_namespace",
    "destination_version",
    "route",
    "protocol",
    "response_flags",
    "source_principal",
    "destination_principal",
];

/// Schema of the `rollups` table.
pub fn rollups_schema() -> SchemaRef {
    ROLLUPS_SCHEMA.clone()
}

/// Schema of the `requests` table.
pub fn requests_schema() -> SchemaRef {
    REQUESTS_SCHEMA.clone()
}

/// Schema of the `spans` table.
pub fn spans_schema() -> SchemaRef {
    SPANS_SCHEMA.clone()
}

/// Schema of the `metrics` table.
pub fn metrics_schema() -> SchemaRef {
    METRICS_SCHEMA.clone()
}

/// Schema of the `logs` table.
pub fn logs_schema() -> SchemaRef {
    LOGS_SCHEMA.clone()
}

/// Schema of a table by name, for the tables in [`TABLES`].
pub fn table_schema(table: &str) -> Option<SchemaRef> {
    match table {
        REQUESTS => Some(requests_schema()),
        SPANS => Some(spans_schema()),
        ROLLUPS => Some(rollups_schema()),
        METRICS => Some(metrics_schema()),
        LOGS => Some(logs_schema()),
        POLICY_EVENTS => Some(policy_events_schema()),
        _ => None,
    }
}

static POLICY_EVENTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("time", timestamp(), false),
        // `alert` or the policy's kind (`RateLimit`, `AccessPolicy`, …)
        Field::new("kind", dict(), false),
        // The alert's name, or the policy's `namespace/name`.
        Field::new("name", dict(), false),
        // The alert's labels (`{service="ratings"}`), or the policy's target.
        Field::new("target", dict(), false),
        Field::new("old_state", dict(), false),
        Field::new("new_state", dict(), false),
        // The alert expression's value when it changed.
        Field::new("value", DataType::Float64, true),
        Field::new("reason", DataType::Utf8, false),
    ]))
});

pub fn policy_events_schema() -> SchemaRef {
    POLICY_EVENTS_SCHEMA.clone()
}

/// One `policy_events` row.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyEvent {
    pub time: SystemTime,
    pub kind: String,
    pub name: String,
    pub target: String,
    pub old_state: String,
    pub new_state: String,
    pub value: Option<f64>,
    pub reason: String,
}

/// The rows of `events` as a `policy_events` batch.
pub fn policy_events_batch(events: &[PolicyEvent]) -> Result<RecordBatch, ArrowError> {
    let mut time = TimestampMicrosecondBuilder::with_capacity(events.len()).with_timezone("UTC");
    let mut dicts: Vec<DictBuilder> = (0..5).map(|_| DictBuilder::new()).collect();
    let mut value = arrow::array::Float64Builder::with_capacity(events.len());
    let mut reason = arrow::array::StringBuilder::new();
    for e in events {
        let micros = e
            .time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        time.append_value(micros);
        for (b, v) in
            dicts
                .iter_mut()
                .zip([&e.kind, &e.name, &e.target, &e.old_state, &e.new_state])
        {
            b.append_value(v);
        }
        value.append_option(e.value.filter(|v| v.is_finite()));
        reason.append_value(&e.reason);
    }
    let mut columns: Vec<ArrayRef> = vec![Arc::new(time.finish())];
    columns.extend(dicts.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    columns.push(Arc::new(value.finish()));
    columns.push(Arc::new(reason.finish()));
    RecordBatch::try_new(policy_events_schema(), columns)
}

/// Lower-case hex of trace and span ids, as W3C `traceparent` and Jaeger show them.
pub fn hex_id(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0xf) as usize] as char);
    }
    out
}

type DictBuilder = StringDictionaryBuilder<Int32Type>;

/// Appends a trace or span id (or a null) to its column.
pub fn append_id<const N: usize>(column: &mut FixedSizeBinaryBuilder, id: Option<&[u8; N]>) {
    match id {
        // The builders are made with the ids' widths, so this cannot fail.
        Some(id) => column
            .append_value(id)
            .expect("id width matches its column"),
        None => column.append_null(),
    }
}

/// One `requests` row as borrowed values (see [`RequestBatchBuilder::push_row`]).
#[derive(Debug, Clone)]
pub struct RequestRow<'a> {
    pub time_us: i64,
    pub duration_us: i64,
    pub reporter: &'a str,
    /// Service, workload, namespace, version.
    pub source: [&'a str; 4],
    /// Service, workload, namespace, version.
    pub destination: [&'a str; 4],
    pub protocol: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub status: i32,
    pub grpc_status: Option<i32>,
    pub request_bytes: i64,
    pub response_bytes: i64,
    pub retries: i32,
    pub upstream_address: Option<&'a str>,
    /// Envoy's form, `-` for none.
    pub response_flags: &'a str,
    pub mtls: bool,
    pub trace_id: &'a [u8; 16],
    pub span_id: &'a [u8; 8],
    pub parent_span_id: Option<&'a [u8; 8]>,
    /// The policy that limited or denied the request (or would have, in
    /// dry run), `namespace/name`.
    pub policy: Option<&'a str>,
    pub source_principal: Option<&'a str>,
    pub destination_principal: Option<&'a str>,
}

/// Column builders for the `requests` table: push records, take a batch.
pub struct RequestBatchBuilder {
    time: TimestampMicrosecondBuilder,
    duration_us: Int64Builder,
    reporter: DictBuilder,
    source_service: DictBuilder,
    source_workload: DictBuilder,
    source_namespace: DictBuilder,
    source_version: DictBuilder,
    destination_service: DictBuilder,
    destination_workload: DictBuilder,
    destination_version: DictBuilder,
    destination_namespace: DictBuilder,
    protocol: DictBuilder,
    method: DictBuilder,
    authority: DictBuilder,
    path: DictBuilder,
    route: DictBuilder,
    status: Int32Builder,
    grpc_status: Int32Builder,
    request_bytes: Int64Builder,
    response_bytes: Int64Builder,
    retries: Int32Builder,
    upstream_address: DictBuilder,
    response_flags: DictBuilder,
    mtls: BooleanBuilder,
    trace_id: FixedSizeBinaryBuilder,
    span_id: FixedSizeBinaryBuilder,
    parent_span_id: FixedSizeBinaryBuilder,
    policy: DictBuilder,
    source_principal: DictBuilder,
    destination_principal: DictBuilder,
}

impl Default for RequestBatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestBatchBuilder {
    pub fn new() -> Self {
        Self::with_capacity(1024)
    }

    /// Builders sized for `rows` rows, so that filling them does not
    /// reallocate and a small batch does not hold a large one's memory.
    pub fn with_capacity(rows: usize) -> Self {
        // Names repeat: a few distinct values of a few bytes each.
        let dict = || DictBuilder::with_capacity(rows, 16, 256);
        RequestBatchBuilder {
            time: TimestampMicrosecondBuilder::with_capacity(rows).with_timezone("UTC"),
            duration_us: Int64Builder::with_capacity(rows),
            reporter: dict(),
            source_service: dict(),
            source_workload: dict(),
            source_namespace: dict(),
            source_version: dict(),
            destination_service: dict(),
            destination_workload: dict(),
            destination_version: dict(),
            destination_namespace: dict(),
            protocol: dict(),
            method: dict(),
            authority: dict(),
            path: DictBuilder::with_capacity(rows, rows.min(256), 16 * rows.min(256)),
            route: dict(),
            status: Int32Builder::with_capacity(rows),
            grpc_status: Int32Builder::with_capacity(rows),
            request_bytes: Int64Builder::with_capacity(rows),
            response_bytes: Int64Builder::with_capacity(rows),
            retries: Int32Builder::with_capacity(rows),
            upstream_address: dict(),
            response_flags: dict(),
            mtls: BooleanBuilder::with_capacity(rows),
            trace_id: FixedSizeBinaryBuilder::with_capacity(rows, 16),
            span_id: FixedSizeBinaryBuilder::with_capacity(rows, 8),
            parent_span_id: FixedSizeBinaryBuilder::with_capacity(rows, 8),
            policy: dict(),
            source_principal: dict(),
            destination_principal: dict(),
        }
    }

    /// Rows pushed since the last [`finish`](Self::finish).
    pub fn len(&self) -> usize {
        self.duration_us.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn push(&mut self, r: &RequestRecord) {
        let micros = r
            .start_time
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        let flags = r.response_flags;
        let flags_text;
        self.push_row(&RequestRow {
            time_us: micros,
            duration_us: r.duration.as_micros() as i64,
            reporter: r.reporter.as_str(),
            source: [
                &r.source.service,
                &r.source.workload,
                &r.source.namespace,
                &r.source.version,
            ],
            destination: [
                &r.destination.service,
                &r.destination.workload,
                &r.destination.namespace,
                &r.destination.version,
            ],
            protocol: r.protocol.as_str(),
            method: &r.method,
            authority: &r.authority,
            path: &r.path,
            route: &r.route,
            status: i32::from(r.status),
            grpc_status: r.grpc_status,
            request_bytes: r.request_bytes as i64,
            response_bytes: r.response_bytes as i64,
            retries: r.retries as i32,
            upstream_address: r.upstream_address.as_deref(),
            // Nearly every request has no flags: no string to make.
            response_flags: if flags.is_empty() {
                "-"
            } else {
                flags_text = flags.to_string();
                &flags_text
            },
            mtls: r.mtls,
            trace_id: &r.trace_id,
            span_id: &r.span_id,
            parent_span_id: r.parent_span_id.as_ref(),
            policy: r.policy.as_deref(),
            source_principal: r.source_principal.as_deref(),
            destination_principal: r.destination_principal.as_deref(),
        });
    }

    /// Appends one row given as borrowed values, so that a row read from
    /// elsewhere (an OTLP span's attributes) needs no record of its own.
    pub fn push_row(&mut self, r: &RequestRow<'_>) {
        self.time.append_value(r.time_us);
        self.duration_us.append_value(r.duration_us);
        self.reporter.append_value(r.reporter);
        let [service, workload, namespace, version] = r.source;
        self.source_service.append_value(service);
        self.source_workload.append_value(workload);
        self.source_namespace.append_value(namespace);
        self.source_version.append_value(version);
        let [service, workload, namespace, version] = r.destination;
        self.destination_service.append_value(service);
        self.destination_workload.append_value(workload);
        self.destination_version.append_value(version);
        self.destination_namespace.append_value(namespace);
        self.protocol.append_value(r.protocol);
        self.method.append_value(r.method);
        self.authority.append_value(r.authority);
        self.path.append_value(r.path);
        self.route.append_value(r.route);
        self.status.append_value(r.status);
        self.grpc_status.append_option(r.grpc_status);
        self.request_bytes.append_value(r.request_bytes);
        self.response_bytes.append_value(r.response_bytes);
        self.retries.append_value(r.retries);
        self.upstream_address.append_option(r.upstream_address);
        self.response_flags.append_value(r.response_flags);
        self.mtls.append_value(r.mtls);
        append_id(&mut self.trace_id, Some(r.trace_id));
        append_id(&mut self.span_id, Some(r.span_id));
        append_id(&mut self.parent_span_id, r.parent_span_id);
        self.policy.append_option(r.policy);
        self.source_principal.append_option(r.source_principal);
        self.destination_principal
            .append_option(r.destination_principal);
    }

    /// Takes the rows pushed so far as one batch and starts over.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.time.finish()),
            Arc::new(self.duration_us.finish()),
            Arc::new(self.reporter.finish()),
            Arc::new(self.source_service.finish()),
            Arc::new(self.source_workload.finish()),
            Arc::new(self.source_namespace.finish()),
            Arc::new(self.source_version.finish()),
            Arc::new(self.destination_service.finish()),
            Arc::new(self.destination_workload.finish()),
            Arc::new(self.destination_version.finish()),
            Arc::new(self.destination_namespace.finish()),
            Arc::new(self.protocol.finish()),
            Arc::new(self.method.finish()),
            Arc::new(self.authority.finish()),
            Arc::new(self.path.finish()),
            Arc::new(self.route.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.grpc_status.finish()),
            Arc::new(self.request_bytes.finish()),
            Arc::new(self.response_bytes.finish()),
            Arc::new(self.retries.finish()),
            Arc::new(self.upstream_address.finish()),
            Arc::new(self.response_flags.finish()),
            Arc::new(self.mtls.finish()),
            Arc::new(self.trace_id.finish()),
            Arc::new(self.span_id.finish()),
            Arc::new(self.parent_span_id.finish()),
            Arc::new(self.policy.finish()),
            Arc::new(self.source_principal.finish()),
            Arc::new(self.destination_principal.finish()),
        ];
        RecordBatch::try_new(requests_schema(), columns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Workload;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;

    fn record(path: &str) -> RequestRecord {
        RequestRecord {
            destination: Workload {
                service: "reviews".into(),
                workload: "reviews-v2".into(),
                namespace: "default".into(),
                version: "v2".into(),
            },
            path: path.into(),
            response_bytes: 42,
            ..RequestRecord::example()
        }
    }

    #[test]
    fn builder_fills_every_column_of_the_schema() {
        let mut b = RequestBatchBuilder::new();
        b.push(&record("/a"));
        b.push(&record("/b"));
        let batch = b.finish().unwrap();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.schema(), requests_schema());
        let d = batch.column_by_name("duration_us").unwrap();
        assert_eq!(d.as_primitive::<Int64Type>().value(1), 1500);
        assert_eq!(
            batch
                .column_by_name("trace_id")
                .unwrap()
                .as_fixed_size_binary()
                .value(0),
            [1; 16]
        );
        assert!(batch.column_by_name("parent_span_id").unwrap().is_null(0));
        // The builder starts over after finish.
        assert!(b.is_empty());
    }

    #[test]
    fn hex_ids_are_lower_case() {
        assert_eq!(hex_id(&[0x0a, 0xff, 0x10]), "0aff10");
    }
}
