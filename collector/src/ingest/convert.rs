//! OTLP spans → table rows. Spans of Lumen proxies (instrumentation scope
//! [`PROXY_SCOPE`]) become `requests` rows; every other span becomes a
//! `spans` row. An invalid span is left out and counted, with the path of
//! its offending field (OTLP's partial success); the others are kept.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::{
    ArrayBuilder, ArrayRef, DictionaryArray, FixedSizeBinaryBuilder, Int32Builder, Int64Builder,
    StringBuilder, StringDictionaryBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::Int32Type;
use arrow::record_batch::RecordBatch;
use lumen_core::schema::{
    PROXY_SCOPE, RequestBatchBuilder, RequestRow, append_id, attr, hex_id, spans_schema,
};
use lumen_core::{Protocol, Reporter, ResponseFlags};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::{Map, Value as Json};

use crate::store::table_index;

/// A payload that is well-formed protobuf but not acceptable OTLP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidSpan {
    pub field: String,
    pub reason: String,
}

/// Rows ready for the WAL: (table index, batch).
pub type TableBatches = Vec<(usize, RecordBatch)>;

/// Span start times the collector accepts, in nanoseconds since the epoch.
/// Rows are partitioned by hour, so unbounded client timestamps would let one
/// request create any number of partitions and files.
#[derive(Debug, Clone, Copy)]
pub struct TimeWindow {
    pub min_nanos: u64,
    pub max_nanos: u64,
}

impl TimeWindow {
    /// How far back spans may start (a late retry, a backfill).
    pub const MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
    /// How far ahead of this clock spans may start (clock skew).
    pub const MAX_SKEW: Duration = Duration::from_secs(3600);

    /// The window around now.
    pub fn around_now() -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        TimeWindow {
            min_nanos: now.saturating_sub(Self::MAX_AGE.as_nanos() as u64),
            max_nanos: now.saturating_add(Self::MAX_SKEW.as_nanos() as u64),
        }
    }

    /// Accepts everything, for tests with fixed timestamps.
    pub fn unbounded() -> Self {
        TimeWindow {
            min_nanos: 0,
            max_nanos: u64::MAX,
        }
    }
}

/// A converted export request: at most one batch per table, and the
/// spans left out.
#[derive(Debug)]
pub struct ConvertedTraces {
    pub batches: TableBatches,
    pub rejected: usize,
    /// The first rejected span's field and reason.
    pub first: Option<InvalidSpan>,
}

/// Converts one export request into at most one batch per table; invalid
/// spans are left out and counted.
pub fn convert_traces(
    req: &ExportTraceServiceRequest,
    window: TimeWindow,
) -> Result<ConvertedTraces, InvalidSpan> {
    let (mut rejected, mut first) = (0, None);
    let mut requests = RequestBatchBuilder::new();
    let mut spans = SpanBatchBuilder::default();
    for (r, rs) in req.resource_spans.iter().enumerate() {
        let resource_attrs: &[KeyValue] = rs.resource.as_ref().map_or(&[], |r| &r.attributes);
        let service_name = resource_attrs
            .iter()
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| as_str(&kv.value))
            .unwrap_or("unknown_service");
        // Only resources with spans for the `spans` table need their JSON.
        let mut resource_key: Option<i32> = None;
        for (s, ss) in rs.scope_spans.iter().enumerate() {
            let scope_name = ss.scope.as_ref().map(|s| s.name.as_str());
            let from_proxy = scope_name == Some(PROXY_SCOPE);
            for (i, span) in ss.spans.iter().enumerate() {
                let at = format!("resource_spans[{r}].scope_spans[{s}].spans[{i}]");
                let checked = check_ids(span, &at, window).and_then(|ids| {
                    if from_proxy {
                        // Validates every attribute before it appends the row.
                        push_request(&mut requests, span, ids, &at).map(|()| None)
                    } else {
                        Ok(Some(ids))
                    }
                });
                let ids = match checked {
                    Ok(Some(ids)) => ids,
                    Ok(None) => continue,
                    Err(e) => {
                        rejected += 1;
                        first.get_or_insert(e);
                        continue;
                    }
                };
                let key = *resource_key
                    .get_or_insert_with(|| spans.add_resource(&attributes_json(resource_attrs)));
                spans.push(span, ids, service_name, scope_name, key);
            }
        }
    }
    let mut out = Vec::new();
    let encode_err = |e: arrow::error::ArrowError| InvalidSpan {
        field: "request".into(),
        reason: format!("cannot build rows: {e}"),
    };
    if !requests.is_empty() {
        let t = table_index(lumen_core::schema::REQUESTS).expect("requests table");
        out.push((t, requests.finish().map_err(encode_err)?));
    }
    if !spans.is_empty() {
        let t = table_index(lumen_core::schema::SPANS).expect("spans table");
        out.push((t, spans.finish().map_err(encode_err)?));
    }
    Ok(ConvertedTraces {
        batches: out,
        rejected,
        first,
    })
}

type Ids = ([u8; 16], [u8; 8], Option<[u8; 8]>);

fn check_ids(span: &Span, at: &str, window: TimeWindow) -> Result<Ids, InvalidSpan> {
    let bad = |f: &str, reason: String| InvalidSpan {
        field: format!("{at}.{f}"),
        reason,
    };
    let trace_id: [u8; 16] = span.trace_id.as_slice().try_into().map_err(|_| {
        bad(
            "trace_id",
            format!("must be 16 bytes, got {}", span.trace_id.len()),
        )
    })?;
    if trace_id == [0; 16] {
        return Err(bad("trace_id", "must not be all zeros".into()));
    }
    let span_id: [u8; 8] = span.span_id.as_slice().try_into().map_err(|_| {
        bad(
            "span_id",
            format!("must be 8 bytes, got {}", span.span_id.len()),
        )
    })?;
    if span_id == [0; 8] {
        return Err(bad("span_id", "must not be all zeros".into()));
    }
    let parent = match span.parent_span_id.len() {
        0 => None,
        8 => {
            let p: [u8; 8] = span.parent_span_id.as_slice().try_into().expect("8 bytes");
            (p != [0; 8]).then_some(p)
        }
        n => {
            return Err(bad(
                "parent_span_id",
                format!("must be empty or 8 bytes, got {n}"),
            ));
        }
    };
    let start = span.start_time_unix_nano;
    if start < window.min_nanos || start > window.max_nanos {
        let at_time = chrono::DateTime::<chrono::Utc>::from_timestamp_nanos(
            start.min(i64::MAX as u64) as i64,
        );
        return Err(bad(
            "start_time_unix_nano",
            format!(
                "{} is outside the accepted window ({} days back to {} hour ahead of the collector's clock)",
                at_time.to_rfc3339(),
                TimeWindow::MAX_AGE.as_secs() / 86400,
                TimeWindow::MAX_SKEW.as_secs() / 3600
            ),
        ));
    }
    if span.end_time_unix_nano != 0 && span.end_time_unix_nano < span.start_time_unix_nano {
        return Err(bad(
            "end_time_unix_nano",
            format!(
                "ends ({}) before it starts ({})",
                span.end_time_unix_nano, span.start_time_unix_nano
            ),
        ));
    }
    Ok((trace_id, span_id, parent))
}

pub(crate) fn as_str(v: &Option<AnyValue>) -> Option<&str> {
    match v.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn as_int(v: &Option<AnyValue>) -> Option<i64> {
    match v.as_ref()?.value.as_ref()? {
        any_value::Value::IntValue(i) => Some(*i),
        any_value::Value::StringValue(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_bool(v: &Option<AnyValue>) -> Option<bool> {
    match v.as_ref()?.value.as_ref()? {
        any_value::Value::BoolValue(b) => Some(*b),
        _ => None,
    }
}

/// Appends the proxy's record carried by `span` straight to the columns,
/// reading its attributes in place (no record or strings of its own).
fn push_request(
    requests: &mut RequestBatchBuilder,
    span: &Span,
    (trace_id, span_id, parent): Ids,
    at: &str,
) -> Result<(), InvalidSpan> {
    let bad = |key: &str, reason: &str| InvalidSpan {
        field: format!("{at}.attributes[{key}]"),
        reason: reason.to_string(),
    };
    const UNKNOWN: &str = "unknown";
    let mut source = [UNKNOWN; 4];
    let mut destination = [UNKNOWN; 4];
    let mut reporter = None;
    let mut protocol = Protocol::Http1.as_str();
    let mut status = None;
    let (mut method, mut authority, mut path, mut route) = ("", "", "", UNKNOWN);
    let mut grpc_status = None;
    let (mut request_bytes, mut response_bytes, mut retries) = (0i64, 0i64, 0i32);
    let mut upstream_address = None;
    let mut policy = None;
    let (mut source_principal, mut destination_principal) = (None, None);
    let mut flags_text = None;
    let mut mtls = false;
    let count = |key: &str, v: &Option<AnyValue>| -> Result<i64, InvalidSpan> {
        as_int(v)
            .filter(|i| *i >= 0)
            .ok_or_else(|| bad(key, "must be a non-negative integer"))
    };
    for kv in &span.attributes {
        let v = &kv.value;
        let text = || as_str(v).unwrap_or(UNKNOWN);
        match kv.key.as_str() {
            attr::REPORTER => {
                reporter = Some(
                    as_str(v)
                        .filter(|r| Reporter::parse(r).is_some())
                        .ok_or_else(|| bad(attr::REPORTER, "must be `source` or `destination`"))?,
                )
            }
            attr::SOURCE_SERVICE => source[0] = text(),
            attr::SOURCE_WORKLOAD => source[1] = text(),
            attr::SOURCE_NAMESPACE => source[2] = text(),
            attr::SOURCE_VERSION => source[3] = text(),
            attr::DESTINATION_SERVICE => destination[0] = text(),
            attr::DESTINATION_WORKLOAD => destination[1] = text(),
            attr::DESTINATION_NAMESPACE => destination[2] = text(),
            attr::DESTINATION_VERSION => destination[3] = text(),
            attr::PROTOCOL => {
                protocol = as_str(v)
                    .filter(|p| Protocol::parse(p).is_some())
                    .ok_or_else(|| {
                        bad(
                            attr::PROTOCOL,
                            "must be `http/1.1`, `h2`, `grpc`, `websocket` or `tcp`",
                        )
                    })?
            }
            attr::METHOD => method = as_str(v).unwrap_or_default(),
            attr::AUTHORITY => authority = as_str(v).unwrap_or_default(),
            attr::PATH => path = as_str(v).unwrap_or_default(),
            attr::ROUTE => route = text(),
            attr::STATUS => {
                status = Some(
                    as_int(v)
                        .and_then(|s| u16::try_from(s).ok())
                        .ok_or_else(|| bad(attr::STATUS, "must be an HTTP status code"))?,
                )
            }
            attr::GRPC_STATUS => {
                grpc_status = Some(
                    as_int(v)
                        .and_then(|s| i32::try_from(s).ok())
                        .ok_or_else(|| bad(attr::GRPC_STATUS, "must be an integer"))?,
                )
            }
            attr::REQUEST_BYTES => request_bytes = count(attr::REQUEST_BYTES, v)?,
            attr::RESPONSE_BYTES => response_bytes = count(attr::RESPONSE_BYTES, v)?,
            attr::RETRIES => {
                retries = i32::try_from(count(attr::RETRIES, v)?)
                    .map_err(|_| bad(attr::RETRIES, "is out of range"))?
            }
            attr::UPSTREAM_ADDRESS => upstream_address = as_str(v),
            attr::POLICY => policy = as_str(v),
            attr::SOURCE_PRINCIPAL => source_principal = as_str(v),
            attr::DESTINATION_PRINCIPAL => destination_principal = as_str(v),
            attr::RESPONSE_FLAGS => {
                let flags = as_str(v)
                    .and_then(ResponseFlags::parse)
                    .ok_or_else(|| bad(attr::RESPONSE_FLAGS, "is not a list of known flags"))?;
                // Stored in Envoy's order, whatever order they came in.
                flags_text = (!flags.is_empty()).then(|| flags.to_string());
            }
            attr::MTLS => mtls = as_bool(v).unwrap_or(false),
            _ => {}
        }
    }
    let reporter = reporter.ok_or_else(|| bad(attr::REPORTER, "is required on proxy spans"))?;
    let status = status.ok_or_else(|| bad(attr::STATUS, "is required on proxy spans"))?;
    let micros = |nanos: u64| (nanos / 1000) as i64;
    requests.push_row(&RequestRow {
        time_us: micros(span.start_time_unix_nano),
        duration_us: micros(
            span.end_time_unix_nano
                .saturating_sub(span.start_time_unix_nano),
        ),
        reporter,
        source,
        destination,
        protocol,
        method,
        authority,
        path,
        route,
        status: i32::from(status),
        grpc_status,
        request_bytes,
        response_bytes,
        retries,
        upstream_address,
        response_flags: flags_text.as_deref().unwrap_or("-"),
        mtls,
        trace_id: &trace_id,
        span_id: &span_id,
        parent_span_id: parent.as_ref(),
        policy,
        source_principal,
        destination_principal,
    });
    Ok(())
}

pub(crate) fn any_to_json(v: &AnyValue) -> Json {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => Json::String(s.clone()),
        Some(any_value::Value::BoolValue(b)) => Json::Bool(*b),
        Some(any_value::Value::IntValue(i)) => Json::from(*i),
        Some(any_value::Value::DoubleValue(d)) => {
            serde_json::Number::from_f64(*d).map_or(Json::Null, Json::Number)
        }
        Some(any_value::Value::ArrayValue(a)) => {
            Json::Array(a.values.iter().map(any_to_json).collect())
        }
        Some(any_value::Value::KvlistValue(kv)) => Json::Object(attributes_map(&kv.values)),
        Some(any_value::Value::BytesValue(b)) => Json::String(hex_id(b)),
        _ => Json::Null,
    }
}

fn attributes_map(attrs: &[KeyValue]) -> Map<String, Json> {
    attrs
        .iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map_or(Json::Null, any_to_json),
            )
        })
        .collect()
}

/// Attributes as a JSON object, queryable with string functions and by any
/// Parquet reader.
pub(crate) fn attributes_json(attrs: &[KeyValue]) -> String {
    Json::Object(attributes_map(attrs)).to_string()
}

fn kind_name(kind: i32) -> &'static str {
    match kind {
        1 => "internal",
        2 => "server",
        3 => "client",
        4 => "producer",
        5 => "consumer",
        _ => "unspecified",
    }
}

fn status_name(code: i32) -> &'static str {
    match code {
        1 => "ok",
        2 => "error",
        _ => "unset",
    }
}

type DictBuilder = StringDictionaryBuilder<Int32Type>;

/// Column builders for the `spans` table.
struct SpanBatchBuilder {
    time: TimestampMicrosecondBuilder,
    duration_us: Int64Builder,
    trace_id: FixedSizeBinaryBuilder,
    span_id: FixedSizeBinaryBuilder,
    parent_span_id: FixedSizeBinaryBuilder,
    service_name: DictBuilder,
    name: DictBuilder,
    kind: DictBuilder,
    status_code: DictBuilder,
    status_message: StringBuilder,
    scope_name: DictBuilder,
    attributes: StringBuilder,
    /// Keys into `resource_values`: a resource's JSON is stored once per
    /// batch however many spans share it (a large resource repeated per row
    /// would multiply a small payload into gigabytes).
    resource_keys: Int32Builder,
    resource_values: StringBuilder,
    events: Int32Builder,
    links: Int32Builder,
    rows: usize,
}

impl Default for SpanBatchBuilder {
    fn default() -> Self {
        SpanBatchBuilder {
            time: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            duration_us: Int64Builder::new(),
            trace_id: FixedSizeBinaryBuilder::new(16),
            span_id: FixedSizeBinaryBuilder::new(8),
            parent_span_id: FixedSizeBinaryBuilder::new(8),
            service_name: DictBuilder::new(),
            name: DictBuilder::new(),
            kind: DictBuilder::new(),
            status_code: DictBuilder::new(),
            status_message: StringBuilder::new(),
            scope_name: DictBuilder::new(),
            attributes: StringBuilder::new(),
            resource_keys: Int32Builder::new(),
            resource_values: StringBuilder::new(),
            events: Int32Builder::new(),
            links: Int32Builder::new(),
            rows: 0,
        }
    }
}

impl SpanBatchBuilder {
    fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Adds a resource's attribute JSON; spans refer to it by the returned key.
    fn add_resource(&mut self, json: &str) -> i32 {
        self.resource_values.append_value(json);
        (self.resource_values.len() - 1) as i32
    }

    fn push(
        &mut self,
        span: &Span,
        (trace_id, span_id, parent): Ids,
        service_name: &str,
        scope_name: Option<&str>,
        resource: i32,
    ) {
        let start = SystemTime::UNIX_EPOCH + Duration::from_nanos(span.start_time_unix_nano);
        let micros = start
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        self.time.append_value(micros);
        self.duration_us.append_value(
            (span
                .end_time_unix_nano
                .saturating_sub(span.start_time_unix_nano)
                / 1000) as i64,
        );
        append_id(&mut self.trace_id, Some(&trace_id));
        append_id(&mut self.span_id, Some(&span_id));
        append_id(&mut self.parent_span_id, parent.as_ref());
        self.service_name.append_value(service_name);
        self.name.append_value(&span.name);
        self.kind.append_value(kind_name(span.kind));
        let status = span.status.as_ref();
        self.status_code
            .append_value(status_name(status.map_or(0, |s| s.code)));
        self.status_message
            .append_option(status.map(|s| s.message.as_str()).filter(|m| !m.is_empty()));
        self.scope_name.append_option(scope_name);
        self.attributes
            .append_value(attributes_json(&span.attributes));
        self.resource_keys.append_value(resource);
        self.events.append_value(span.events.len() as i32);
        self.links.append_value(span.links.len() as i32);
        self.rows += 1;
    }

    fn finish(&mut self) -> Result<RecordBatch, arrow::error::ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.time.finish()),
            Arc::new(self.duration_us.finish()),
            Arc::new(self.trace_id.finish()),
            Arc::new(self.span_id.finish()),
            Arc::new(self.parent_span_id.finish()),
            Arc::new(self.service_name.finish()),
            Arc::new(self.name.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.status_code.finish()),
            Arc::new(self.status_message.finish()),
            Arc::new(self.scope_name.finish()),
            Arc::new(self.attributes.finish()),
            Arc::new(DictionaryArray::<Int32Type>::try_new(
                self.resource_keys.finish(),
                Arc::new(self.resource_values.finish()),
            )?),
            Arc::new(self.events.finish()),
            Arc::new(self.links.finish()),
        ];
        self.rows = 0;
        RecordBatch::try_new(spans_schema(), columns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};

    fn kv(key: &str, v: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        }
    }

    fn s(v: &str) -> any_value::Value {
        any_value::Value::StringValue(v.into())
    }

    fn span(attrs: Vec<KeyValue>) -> Span {
        Span {
            trace_id: vec![7; 16],
            span_id: vec![8; 8],
            name: "GET /".into(),
            kind: 2,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_002_500_000,
            attributes: attrs,
            ..Default::default()
        }
    }

    fn request(scope: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", s("checkout"))],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: scope.into(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn proxy_spans_become_request_rows() {
        let attrs = vec![
            kv(attr::REPORTER, s("destination")),
            kv(attr::DESTINATION_SERVICE, s("reviews")),
            kv(attr::PATH, s("/reviews/1")),
            kv(attr::STATUS, any_value::Value::IntValue(503)),
            kv(attr::RESPONSE_FLAGS, s("UF")),
        ];
        let out = convert_traces(
            &request(PROXY_SCOPE, vec![span(attrs)]),
            TimeWindow::unbounded(),
        )
        .unwrap()
        .batches;
        assert_eq!(out.len(), 1);
        let (table, batch) = &out[0];
        assert_eq!(lumen_core::schema::TABLES[*table], "requests");
        assert_eq!(batch.num_rows(), 1);
        let dur = batch.column_by_name("duration_us").unwrap();
        assert_eq!(
            dur.as_primitive::<arrow::datatypes::Int64Type>().value(0),
            2500
        );
        let status = batch.column_by_name("status").unwrap();
        assert_eq!(
            status
                .as_primitive::<arrow::datatypes::Int32Type>()
                .value(0),
            503
        );
    }

    #[test]
    fn other_spans_become_span_rows_with_json_attributes() {
        let attrs = vec![
            kv("http.route", s("/cart")),
            kv("retry", any_value::Value::IntValue(2)),
        ];
        let out = convert_traces(
            &request("my-app", vec![span(attrs)]),
            TimeWindow::unbounded(),
        )
        .unwrap()
        .batches;
        let (table, batch) = &out[0];
        assert_eq!(lumen_core::schema::TABLES[*table], "spans");
        let attrs = batch
            .column_by_name("attributes")
            .unwrap()
            .as_string::<i32>()
            .value(0)
            .to_string();
        assert_eq!(attrs, r#"{"http.route":"/cart","retry":2}"#);
        assert!(batch.column_by_name("parent_span_id").unwrap().is_null(0));
    }

    #[test]
    fn invalid_spans_are_left_out_and_named_by_their_field_path() {
        let rejected = |req: &ExportTraceServiceRequest, window| {
            let c = convert_traces(req, window).unwrap();
            assert_eq!(c.rejected, 1);
            c.first.unwrap()
        };
        let mut bad = span(vec![]);
        bad.trace_id = vec![1, 2, 3];
        let req = request("x", vec![span(vec![]), bad]);
        let kept = convert_traces(&req, TimeWindow::unbounded()).unwrap();
        assert_eq!(kept.batches[0].1.num_rows(), 1, "the good span is kept");
        let e = rejected(&req, TimeWindow::unbounded());
        assert_eq!(
            e.field,
            "resource_spans[0].scope_spans[0].spans[1].trace_id"
        );

        let e = rejected(
            &request(
                PROXY_SCOPE,
                vec![span(vec![kv(attr::REPORTER, s("nobody"))])],
            ),
            TimeWindow::unbounded(),
        );
        assert!(e.field.ends_with("attributes[lumen.reporter]"), "{e}");

        let e = rejected(
            &request(
                PROXY_SCOPE,
                vec![span(vec![kv(attr::REPORTER, s("source"))])],
            ),
            TimeWindow::unbounded(),
        );
        assert!(e.to_string().contains("http.response.status_code"), "{e}");

        // 2023 is long before "now" (2026+): outside the accepted window.
        let e = rejected(&request("x", vec![span(vec![])]), TimeWindow::around_now());
        assert_eq!(
            e.field,
            "resource_spans[0].scope_spans[0].spans[0].start_time_unix_nano"
        );
        assert!(e.reason.contains("2023-11-14T22:13:20"), "{e}");
    }
}
