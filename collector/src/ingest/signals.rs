//! OTLP metrics and logs → `metrics` and `logs` rows.
//!
//! Each data point and each log record is judged alone: a bad one is left
//! out and counted, with the path of its first bad field, and the rest of
//! the payload is stored — OTLP's partial success. Resource attributes of
//! the semantic conventions become columns of their own
//! ([`RESOURCE_COLUMNS`]); the resource's other attributes are kept once
//! per resource as JSON; a point's or record's attributes become a map.

use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, DictionaryArray, FixedSizeBinaryBuilder,
    Float64Builder, Int32Builder, Int64Builder, ListBuilder, MapBuilder, MapFieldNames,
    StringBuilder, StringDictionaryBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Int32Type};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use lumen_core::schema::{LOGS, METRICS, RESOURCE_COLUMNS, logs_schema, metrics_schema};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::metrics::v1::{
    ExponentialHistogramDataPoint, HistogramDataPoint, NumberDataPoint, SummaryDataPoint, metric,
    number_data_point,
};

use super::convert::{TimeWindow, any_to_json, as_str, attributes_json};
use crate::store::table_index;

/// What a payload came to: its rows, and what was left out and why.
#[derive(Debug)]
pub struct Converted {
    /// (table index, rows), empty when nothing was accepted.
    pub batches: Vec<(usize, RecordBatch)>,
    pub rows: usize,
    pub rejected: usize,
    /// The first rejected item's path and reason, for the partial-success
    /// message.
    pub first_error: Option<String>,
}

impl Converted {
    /// `rows` rows of `table` (built by `finish` when there are any) and
    /// the rejections.
    fn of(
        table: &str,
        rows: usize,
        finish: impl FnOnce() -> Result<RecordBatch, ArrowError>,
        rejected: Rejections,
    ) -> Result<Self, ArrowError> {
        let mut batches = Vec::new();
        if rows > 0 {
            let t = table_index(table).expect("a table of the store");
            batches.push((t, finish()?));
        }
        Ok(Converted {
            batches,
            rows,
            rejected: rejected.count,
            first_error: rejected.first,
        })
    }
}

/// Data point flag: the point has no value (a staleness marker).
const NO_RECORDED_VALUE: u32 = 1;

type DictBuilder = StringDictionaryBuilder<Int32Type>;

/// Rejections as they come; the first one's reason is kept.
#[derive(Default)]
struct Rejections {
    count: usize,
    first: Option<String>,
}

impl Rejections {
    fn add(&mut self, at: impl FnOnce() -> String, reason: &str) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(format!("{}: {reason}", at()));
        }
    }
}

fn micros(nanos: u64) -> i64 {
    (nanos / 1000) as i64
}

fn check_time(nanos: u64, window: TimeWindow) -> Result<(), String> {
    if nanos < window.min_nanos || nanos > window.max_nanos {
        return Err(format!(
            "time {nanos} ns since the epoch is outside what the collector keeps \
             (from 30 days ago to 1 hour ahead)"
        ));
    }
    Ok(())
}

/// A value as a map entry: strings as they are, anything else as JSON.
fn value_text(v: &AnyValue) -> Option<String> {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
        None => None,
        Some(_) => Some(any_to_json(v).to_string()),
    }
}

/// The columns every row of a resource shares.
struct ResourceColumns {
    typed: Vec<DictBuilder>,
    scope_name: DictBuilder,
    scope_version: DictBuilder,
    /// Keys into `other_values`: a resource's JSON is stored once per
    /// batch however many rows share it.
    other_keys: Int32Builder,
    other_values: StringBuilder,
}

/// One resource's values for [`ResourceColumns::append`].
struct Resource<'a> {
    typed: Vec<Option<&'a str>>,
    key: i32,
}

impl ResourceColumns {
    fn new() -> Self {
        ResourceColumns {
            typed: RESOURCE_COLUMNS
                .iter()
                .map(|_| DictBuilder::new())
                .collect(),
            scope_name: DictBuilder::new(),
            scope_version: DictBuilder::new(),
            other_keys: Int32Builder::new(),
            other_values: StringBuilder::new(),
        }
    }

    fn resource<'a>(&mut self, attrs: &'a [KeyValue]) -> Resource<'a> {
        let typed = RESOURCE_COLUMNS
            .iter()
            .map(|(_, key)| {
                attrs
                    .iter()
                    .find(|kv| kv.key == *key)
                    .and_then(|kv| as_str(&kv.value))
            })
            .collect();
        let rest: Vec<KeyValue> = attrs
            .iter()
            .filter(|kv| !RESOURCE_COLUMNS.iter().any(|(_, k)| *k == kv.key))
            .cloned()
            .collect();
        self.other_values.append_value(attributes_json(&rest));
        Resource {
            typed,
            key: (self.other_values.len() - 1) as i32,
        }
    }

    fn append(&mut self, r: &Resource<'_>, scope: Option<&InstrumentationScope>) {
        for (i, (builder, value)) in self.typed.iter_mut().zip(&r.typed).enumerate() {
            match value {
                Some(v) => builder.append_value(v),
                // OTLP's default for a resource without a name.
                None if i == 0 => builder.append_value("unknown_service"),
                None => builder.append_null(),
            }
        }
        let non_empty = |s: &str| (!s.is_empty()).then_some(s.to_owned());
        self.scope_name
            .append_option(scope.and_then(|s| non_empty(&s.name)));
        self.scope_version
            .append_option(scope.and_then(|s| non_empty(&s.version)));
        self.other_keys.append_value(r.key);
    }

    fn finish_typed(&mut self) -> Vec<ArrayRef> {
        self.typed
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef)
            .collect()
    }

    fn finish_other(&mut self) -> Result<ArrayRef, ArrowError> {
        Ok(Arc::new(DictionaryArray::<Int32Type>::try_new(
            self.other_keys.finish(),
            Arc::new(self.other_values.finish()),
        )?))
    }
}

type AttributesBuilder = MapBuilder<StringBuilder, StringBuilder>;

fn attributes_builder() -> AttributesBuilder {
    let names = MapFieldNames {
        entry: "entries".into(),
        key: "keys".into(),
        value: "values".into(),
    };
    MapBuilder::new(Some(names), StringBuilder::new(), StringBuilder::new())
        .with_values_field(Arc::new(Field::new("values", DataType::Utf8, true)))
}

fn append_attributes(b: &mut AttributesBuilder, attrs: &[KeyValue]) -> Result<(), ArrowError> {
    for kv in attrs {
        b.keys().append_value(&kv.key);
        b.values()
            .append_option(kv.value.as_ref().and_then(value_text));
    }
    b.append(true)
}

fn list_builder<T: arrow::array::ArrayBuilder>(values: T, item: DataType) -> ListBuilder<T> {
    ListBuilder::new(values).with_field(Arc::new(Field::new_list_field(item, false)))
}

/// Column builders of the `metrics` table.
struct MetricColumns {
    time: TimestampMicrosecondBuilder,
    start_time: TimestampMicrosecondBuilder,
    resource: ResourceColumns,
    name: DictBuilder,
    description: DictBuilder,
    unit: DictBuilder,
    kind: DictBuilder,
    temporality: DictBuilder,
    is_monotonic: BooleanBuilder,
    value: Float64Builder,
    count: Int64Builder,
    sum: Float64Builder,
    min: Float64Builder,
    max: Float64Builder,
    explicit_bounds: ListBuilder<Float64Builder>,
    bucket_counts: ListBuilder<Int64Builder>,
    scale: Int32Builder,
    zero_count: Int64Builder,
    positive_offset: Int32Builder,
    positive_counts: ListBuilder<Int64Builder>,
    negative_offset: Int32Builder,
    negative_counts: ListBuilder<Int64Builder>,
    quantiles: ListBuilder<Float64Builder>,
    quantile_values: ListBuilder<Float64Builder>,
    flags: Int32Builder,
    attributes: AttributesBuilder,
    rows: usize,
}

/// What every kind of data point has.
struct PointHead<'a> {
    time: u64,
    start: u64,
    flags: u32,
    attributes: &'a [KeyValue],
}

/// A metric's description shared by its points.
struct MetricHead<'a> {
    name: &'a str,
    description: &'a str,
    unit: &'a str,
    kind: &'static str,
    temporality: Option<&'static str>,
    is_monotonic: Option<bool>,
}

fn temporality(t: i32) -> Option<&'static str> {
    match t {
        1 => Some("delta"),
        2 => Some("cumulative"),
        _ => None,
    }
}

fn u64_count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl MetricColumns {
    fn new() -> Self {
        let ts = || TimestampMicrosecondBuilder::new().with_timezone("UTC");
        MetricColumns {
            time: ts(),
            start_time: ts(),
            resource: ResourceColumns::new(),
            name: DictBuilder::new(),
            description: DictBuilder::new(),
            unit: DictBuilder::new(),
            kind: DictBuilder::new(),
            temporality: DictBuilder::new(),
            is_monotonic: BooleanBuilder::new(),
            value: Float64Builder::new(),
            count: Int64Builder::new(),
            sum: Float64Builder::new(),
            min: Float64Builder::new(),
            max: Float64Builder::new(),
            explicit_bounds: list_builder(Float64Builder::new(), DataType::Float64),
            bucket_counts: list_builder(Int64Builder::new(), DataType::Int64),
            scale: Int32Builder::new(),
            zero_count: Int64Builder::new(),
            positive_offset: Int32Builder::new(),
            positive_counts: list_builder(Int64Builder::new(), DataType::Int64),
            negative_offset: Int32Builder::new(),
            negative_counts: list_builder(Int64Builder::new(), DataType::Int64),
            quantiles: list_builder(Float64Builder::new(), DataType::Float64),
            quantile_values: list_builder(Float64Builder::new(), DataType::Float64),
            flags: Int32Builder::new(),
            attributes: attributes_builder(),
            rows: 0,
        }
    }

    /// The columns every point fills; the kind-specific ones are appended
    /// by the caller (each exactly once per row).
    fn head(
        &mut self,
        resource: &Resource<'_>,
        scope: Option<&InstrumentationScope>,
        m: &MetricHead<'_>,
        p: &PointHead<'_>,
    ) -> Result<(), ArrowError> {
        self.time.append_value(micros(p.time));
        self.start_time
            .append_option((p.start != 0).then(|| micros(p.start)));
        self.resource.append(resource, scope);
        self.name.append_value(m.name);
        self.description
            .append_option((!m.description.is_empty()).then_some(m.description));
        self.unit
            .append_option((!m.unit.is_empty()).then_some(m.unit));
        self.kind.append_value(m.kind);
        self.temporality.append_option(m.temporality);
        self.is_monotonic.append_option(m.is_monotonic);
        self.flags.append_value(p.flags as i32);
        append_attributes(&mut self.attributes, p.attributes)?;
        self.rows += 1;
        Ok(())
    }

    fn number(&mut self, p: &NumberDataPoint) {
        let value = match p.value {
            _ if p.flags & NO_RECORDED_VALUE != 0 => None,
            Some(number_data_point::Value::AsDouble(d)) => Some(d),
            Some(number_data_point::Value::AsInt(i)) => Some(i as f64),
            None => None,
        };
        self.value.append_option(value);
        self.summary_stats(None, None, None, None);
        self.no_buckets();
        self.no_exponential();
        self.no_quantiles();
    }

    fn histogram(&mut self, p: &HistogramDataPoint) {
        self.value.append_null();
        self.summary_stats(Some(p.count), p.sum, p.min, p.max);
        self.explicit_bounds
            .append_value(p.explicit_bounds.iter().map(|b| Some(*b)));
        self.bucket_counts
            .append_value(p.bucket_counts.iter().map(|c| Some(u64_count(*c))));
        self.no_exponential();
        self.no_quantiles();
    }

    fn exponential(&mut self, p: &ExponentialHistogramDataPoint) {
        self.value.append_null();
        self.summary_stats(Some(p.count), p.sum, p.min, p.max);
        self.no_buckets();
        self.scale.append_value(p.scale);
        self.zero_count.append_value(u64_count(p.zero_count));
        let side = |offset: &mut Int32Builder,
                    counts: &mut ListBuilder<Int64Builder>,
                    b: &Option<metric_buckets::Buckets>| {
            let (o, c): (i32, &[u64]) = b
                .as_ref()
                .map_or((0, &[]), |b| (b.offset, &b.bucket_counts));
            offset.append_value(o);
            counts.append_value(c.iter().map(|n| Some(u64_count(*n))));
        };
        side(
            &mut self.positive_offset,
            &mut self.positive_counts,
            &p.positive,
        );
        side(
            &mut self.negative_offset,
            &mut self.negative_counts,
            &p.negative,
        );
        self.no_quantiles();
    }

    fn summary(&mut self, p: &SummaryDataPoint) {
        self.value.append_null();
        self.summary_stats(Some(p.count), Some(p.sum), None, None);
        self.no_buckets();
        self.no_exponential();
        self.quantiles
            .append_value(p.quantile_values.iter().map(|q| Some(q.quantile)));
        self.quantile_values
            .append_value(p.quantile_values.iter().map(|q| Some(q.value)));
    }

    fn summary_stats(
        &mut self,
        count: Option<u64>,
        sum: Option<f64>,
        min: Option<f64>,
        max: Option<f64>,
    ) {
        self.count.append_option(count.map(u64_count));
        self.sum.append_option(sum);
        self.min.append_option(min);
        self.max.append_option(max);
    }

    fn no_buckets(&mut self) {
        self.explicit_bounds.append_null();
        self.bucket_counts.append_null();
    }

    fn no_exponential(&mut self) {
        self.scale.append_null();
        self.zero_count.append_null();
        self.positive_offset.append_null();
        self.positive_counts.append_null();
        self.negative_offset.append_null();
        self.negative_counts.append_null();
    }

    fn no_quantiles(&mut self) {
        self.quantiles.append_null();
        self.quantile_values.append_null();
    }

    fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.time.finish()),
            Arc::new(self.start_time.finish()),
        ];
        columns.extend(self.resource.finish_typed());
        columns.extend([
            Arc::new(self.resource.scope_name.finish()) as ArrayRef,
            Arc::new(self.resource.scope_version.finish()),
            Arc::new(self.name.finish()),
            Arc::new(self.description.finish()),
            Arc::new(self.unit.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.temporality.finish()),
            Arc::new(self.is_monotonic.finish()),
            Arc::new(self.value.finish()),
            Arc::new(self.count.finish()),
            Arc::new(self.sum.finish()),
            Arc::new(self.min.finish()),
            Arc::new(self.max.finish()),
            Arc::new(self.explicit_bounds.finish()),
            Arc::new(self.bucket_counts.finish()),
            Arc::new(self.scale.finish()),
            Arc::new(self.zero_count.finish()),
            Arc::new(self.positive_offset.finish()),
            Arc::new(self.positive_counts.finish()),
            Arc::new(self.negative_offset.finish()),
            Arc::new(self.negative_counts.finish()),
            Arc::new(self.quantiles.finish()),
            Arc::new(self.quantile_values.finish()),
            Arc::new(self.flags.finish()),
            Arc::new(self.attributes.finish()),
            self.resource.finish_other()?,
        ]);
        RecordBatch::try_new(metrics_schema(), columns)
    }
}

use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point as metric_buckets;

fn check_histogram(p: &HistogramDataPoint) -> Result<(), String> {
    if !p.bucket_counts.is_empty() && p.bucket_counts.len() != p.explicit_bounds.len() + 1 {
        return Err(format!(
            "{} bucket_counts for {} explicit_bounds; there must be one more count than bounds",
            p.bucket_counts.len(),
            p.explicit_bounds.len()
        ));
    }
    if p.explicit_bounds
        .windows(2)
        .any(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less))
    {
        return Err("explicit_bounds must be strictly increasing".into());
    }
    Ok(())
}

fn check_summary(p: &SummaryDataPoint) -> Result<(), String> {
    match p
        .quantile_values
        .iter()
        .position(|q| !(0.0..=1.0).contains(&q.quantile))
    {
        Some(i) => Err(format!(
            "quantile_values[{i}].quantile {} is outside [0, 1]",
            p.quantile_values[i].quantile
        )),
        None => Ok(()),
    }
}

/// Converts an export request into `metrics` rows, one per data point.
pub fn convert_metrics(
    req: &ExportMetricsServiceRequest,
    window: TimeWindow,
) -> Result<Converted, ArrowError> {
    let mut cols = MetricColumns::new();
    let mut rejected = Rejections::default();
    for (r, rm) in req.resource_metrics.iter().enumerate() {
        let attrs: &[KeyValue] = rm.resource.as_ref().map_or(&[], |r| &r.attributes);
        let mut resource: Option<Resource<'_>> = None;
        for (s, sm) in rm.scope_metrics.iter().enumerate() {
            let scope = sm.scope.as_ref();
            for (m, metric) in sm.metrics.iter().enumerate() {
                let at = || format!("resource_metrics[{r}].scope_metrics[{s}].metrics[{m}]");
                let points = match &metric.data {
                    Some(metric::Data::Gauge(g)) => g.data_points.len(),
                    Some(metric::Data::Sum(x)) => x.data_points.len(),
                    Some(metric::Data::Histogram(h)) => h.data_points.len(),
                    Some(metric::Data::ExponentialHistogram(h)) => h.data_points.len(),
                    Some(metric::Data::Summary(x)) => x.data_points.len(),
                    None => 0,
                };
                if metric.name.is_empty() {
                    for _ in 0..points.max(1) {
                        rejected.add(|| format!("{}.name", at()), "a metric needs a name");
                    }
                    continue;
                }
                let Some(data) = &metric.data else {
                    rejected.add(
                        || format!("{}.data", at()),
                        "no data (gauge, sum, histogram, exponential_histogram or summary)",
                    );
                    continue;
                };
                let (kind, temp, mono) = match data {
                    metric::Data::Gauge(_) => ("gauge", None, None),
                    metric::Data::Sum(x) => (
                        "sum",
                        temporality(x.aggregation_temporality),
                        Some(x.is_monotonic),
                    ),
                    metric::Data::Histogram(h) => {
                        ("histogram", temporality(h.aggregation_temporality), None)
                    }
                    metric::Data::ExponentialHistogram(h) => (
                        "exponential_histogram",
                        temporality(h.aggregation_temporality),
                        None,
                    ),
                    metric::Data::Summary(_) => ("summary", None, None),
                };
                let head = MetricHead {
                    name: &metric.name,
                    description: &metric.description,
                    unit: &metric.unit,
                    kind,
                    temporality: temp,
                    is_monotonic: mono,
                };
                let resource = &*resource.get_or_insert_with(|| cols.resource.resource(attrs));
                let mut ctx = PointContext {
                    cols: &mut cols,
                    rejected: &mut rejected,
                    resource,
                    scope,
                    metric: &head,
                    window,
                    at: &at,
                };
                match data {
                    metric::Data::Gauge(g) => {
                        for (i, p) in g.data_points.iter().enumerate() {
                            if ctx.accept(i, number_head(p), Ok(()))? {
                                ctx.cols.number(p);
                            }
                        }
                    }
                    metric::Data::Sum(x) => {
                        for (i, p) in x.data_points.iter().enumerate() {
                            if ctx.accept(i, number_head(p), Ok(()))? {
                                ctx.cols.number(p);
                            }
                        }
                    }
                    metric::Data::Histogram(h) => {
                        for (i, p) in h.data_points.iter().enumerate() {
                            let head = PointHead {
                                time: p.time_unix_nano,
                                start: p.start_time_unix_nano,
                                flags: p.flags,
                                attributes: &p.attributes,
                            };
                            if ctx.accept(i, head, check_histogram(p))? {
                                ctx.cols.histogram(p);
                            }
                        }
                    }
                    metric::Data::ExponentialHistogram(h) => {
                        for (i, p) in h.data_points.iter().enumerate() {
                            let head = PointHead {
                                time: p.time_unix_nano,
                                start: p.start_time_unix_nano,
                                flags: p.flags,
                                attributes: &p.attributes,
                            };
                            if ctx.accept(i, head, Ok(()))? {
                                ctx.cols.exponential(p);
                            }
                        }
                    }
                    metric::Data::Summary(x) => {
                        for (i, p) in x.data_points.iter().enumerate() {
                            let head = PointHead {
                                time: p.time_unix_nano,
                                start: p.start_time_unix_nano,
                                flags: p.flags,
                                attributes: &p.attributes,
                            };
                            if ctx.accept(i, head, check_summary(p))? {
                                ctx.cols.summary(p);
                            }
                        }
                    }
                }
            }
        }
    }
    Converted::of(METRICS, cols.rows, || cols.finish(), rejected)
}

/// Where one metric's points go: its rows, or its rejections.
struct PointContext<'c, 'a> {
    cols: &'c mut MetricColumns,
    rejected: &'c mut Rejections,
    resource: &'c Resource<'a>,
    scope: Option<&'c InstrumentationScope>,
    metric: &'c MetricHead<'c>,
    window: TimeWindow,
    at: &'c dyn Fn() -> String,
}

impl PointContext<'_, '_> {
    /// Appends the point's common columns if it is valid (the caller then
    /// appends its kind's), or counts it as rejected.
    fn accept(
        &mut self,
        i: usize,
        p: PointHead<'_>,
        check: Result<(), String>,
    ) -> Result<bool, ArrowError> {
        if let Err(e) = check.and_then(|()| check_time(p.time, self.window)) {
            let kind = self.metric.kind;
            self.rejected
                .add(|| format!("{}.{kind}.data_points[{i}]", (self.at)()), &e);
            return Ok(false);
        }
        self.cols
            .head(self.resource, self.scope, self.metric, &p)
            .map(|()| true)
    }
}

fn number_head(p: &NumberDataPoint) -> PointHead<'_> {
    PointHead {
        time: p.time_unix_nano,
        start: p.start_time_unix_nano,
        flags: p.flags,
        attributes: &p.attributes,
    }
}

/// Column builders of the `logs` table.
struct LogColumns {
    time: TimestampMicrosecondBuilder,
    observed_time: TimestampMicrosecondBuilder,
    resource: ResourceColumns,
    severity_number: Int32Builder,
    severity_text: DictBuilder,
    body: StringBuilder,
    event_name: DictBuilder,
    trace_id: FixedSizeBinaryBuilder,
    span_id: FixedSizeBinaryBuilder,
    flags: Int32Builder,
    attributes: AttributesBuilder,
    rows: usize,
}

/// A record's ids: empty (none) or of their exact widths.
/// A log record's trace and span ids, when it has them.
type LogIds = (Option<[u8; 16]>, Option<[u8; 8]>);

fn log_ids(rec: &LogRecord) -> Result<LogIds, String> {
    let trace = match rec.trace_id.len() {
        0 => None,
        16 => rec.trace_id.as_slice().try_into().ok(),
        n => return Err(format!("trace_id is {n} bytes; it must be 16 or empty")),
    };
    let span = match rec.span_id.len() {
        0 => None,
        8 => rec.span_id.as_slice().try_into().ok(),
        n => return Err(format!("span_id is {n} bytes; it must be 8 or empty")),
    };
    Ok((
        trace.filter(|t: &[u8; 16]| t.iter().any(|b| *b != 0)),
        span.filter(|s: &[u8; 8]| s.iter().any(|b| *b != 0)),
    ))
}

impl LogColumns {
    fn new() -> Self {
        let ts = || TimestampMicrosecondBuilder::new().with_timezone("UTC");
        LogColumns {
            time: ts(),
            observed_time: ts(),
            resource: ResourceColumns::new(),
            severity_number: Int32Builder::new(),
            severity_text: DictBuilder::new(),
            body: StringBuilder::new(),
            event_name: DictBuilder::new(),
            trace_id: FixedSizeBinaryBuilder::new(16),
            span_id: FixedSizeBinaryBuilder::new(8),
            flags: Int32Builder::new(),
            attributes: attributes_builder(),
            rows: 0,
        }
    }

    fn push(
        &mut self,
        resource: &Resource<'_>,
        scope: Option<&InstrumentationScope>,
        rec: &LogRecord,
        time: u64,
        (trace, span): LogIds,
    ) -> Result<(), ArrowError> {
        self.time.append_value(micros(time));
        self.observed_time.append_option(
            (rec.observed_time_unix_nano != 0).then(|| micros(rec.observed_time_unix_nano)),
        );
        self.resource.append(resource, scope);
        self.severity_number.append_value(rec.severity_number);
        self.severity_text
            .append_option((!rec.severity_text.is_empty()).then_some(&rec.severity_text));
        self.body
            .append_option(rec.body.as_ref().and_then(value_text));
        self.event_name
            .append_option((!rec.event_name.is_empty()).then_some(&rec.event_name));
        lumen_core::schema::append_id(&mut self.trace_id, trace.as_ref());
        lumen_core::schema::append_id(&mut self.span_id, span.as_ref());
        self.flags.append_value(rec.flags as i32);
        append_attributes(&mut self.attributes, &rec.attributes)?;
        self.rows += 1;
        Ok(())
    }

    fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.time.finish()),
            Arc::new(self.observed_time.finish()),
        ];
        columns.extend(self.resource.finish_typed());
        columns.extend([
            Arc::new(self.resource.scope_name.finish()) as ArrayRef,
            Arc::new(self.resource.scope_version.finish()),
            Arc::new(self.severity_number.finish()),
            Arc::new(self.severity_text.finish()),
            Arc::new(self.body.finish()),
            Arc::new(self.event_name.finish()),
            Arc::new(self.trace_id.finish()),
            Arc::new(self.span_id.finish()),
            Arc::new(self.flags.finish()),
            Arc::new(self.attributes.finish()),
            self.resource.finish_other()?,
        ]);
        RecordBatch::try_new(logs_schema(), columns)
    }
}

/// Converts an export request into `logs` rows. A record's time is when
/// the event happened, or when it was observed if the source gave none.
pub fn convert_logs(
    req: &ExportLogsServiceRequest,
    window: TimeWindow,
) -> Result<Converted, ArrowError> {
    let mut cols = LogColumns::new();
    let mut rejected = Rejections::default();
    for (r, rl) in req.resource_logs.iter().enumerate() {
        let attrs: &[KeyValue] = rl.resource.as_ref().map_or(&[], |r| &r.attributes);
        let mut resource: Option<Resource<'_>> = None;
        for (s, sl) in rl.scope_logs.iter().enumerate() {
            let scope = sl.scope.as_ref();
            for (i, rec) in sl.log_records.iter().enumerate() {
                let at = || format!("resource_logs[{r}].scope_logs[{s}].log_records[{i}]");
                let time = match rec.time_unix_nano {
                    0 => rec.observed_time_unix_nano,
                    t => t,
                };
                let checked = if time == 0 {
                    Err("neither time_unix_nano nor observed_time_unix_nano is set".to_string())
                } else if !(0..=24).contains(&rec.severity_number) {
                    Err(format!(
                        "severity_number {} is not one of OTLP's (0 to 24)",
                        rec.severity_number
                    ))
                } else {
                    check_time(time, window).and_then(|()| log_ids(rec))
                };
                match checked {
                    Ok(ids) => {
                        let resource =
                            &*resource.get_or_insert_with(|| cols.resource.resource(attrs));
                        cols.push(resource, scope, rec, time, ids)?;
                    }
                    Err(e) => rejected.add(at, &e),
                }
            }
        }
    }
    Converted::of(LOGS, cols.rows, || cols.finish(), rejected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, TimestampMicrosecondType};
    use opentelemetry_proto::tonic::logs::v1::{ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::metrics::v1::{
        Gauge, Histogram, Metric, ResourceMetrics, ScopeMetrics,
    };

    const T: u64 = 1_700_000_000_000_000_000;

    fn metrics(metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn a_point_without_a_recorded_value_is_kept_with_a_null_value() {
        let points = vec![
            NumberDataPoint {
                time_unix_nano: T,
                value: Some(number_data_point::Value::AsInt(7)),
                ..Default::default()
            },
            NumberDataPoint {
                time_unix_nano: T + 1000,
                value: Some(number_data_point::Value::AsDouble(1.0)),
                flags: NO_RECORDED_VALUE,
                ..Default::default()
            },
        ];
        let req = metrics(vec![Metric {
            name: "up".into(),
            data: Some(metric::Data::Gauge(Gauge {
                data_points: points,
            })),
            ..Default::default()
        }]);
        let c = convert_metrics(&req, TimeWindow::unbounded()).unwrap();
        assert_eq!((c.rows, c.rejected), (2, 0));
        let batch = &c.batches[0].1;
        let value = batch
            .column_by_name("value")
            .unwrap()
            .as_primitive::<Float64Type>();
        assert_eq!(value.value(0), 7.0);
        assert!(value.is_null(1));
        let service = batch.column_by_name("service_name").unwrap();
        let service = arrow::compute::cast(service, &DataType::Utf8).unwrap();
        assert_eq!(service.as_string::<i32>().value(0), "unknown_service");
    }

    #[test]
    fn a_histogram_with_one_count_too_few_is_rejected_alone() {
        let good = HistogramDataPoint {
            time_unix_nano: T,
            count: 3,
            bucket_counts: vec![1, 2],
            explicit_bounds: vec![10.0],
            ..Default::default()
        };
        let bad = HistogramDataPoint {
            bucket_counts: vec![3],
            ..good.clone()
        };
        let req = metrics(vec![Metric {
            name: "latency".into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: vec![good, bad],
                aggregation_temporality: 1,
            })),
            ..Default::default()
        }]);
        let c = convert_metrics(&req, TimeWindow::unbounded()).unwrap();
        assert_eq!((c.rows, c.rejected), (1, 1));
        let e = c.first_error.unwrap();
        assert!(
            e.starts_with("resource_metrics[0].scope_metrics[0].metrics[0].histogram.data_points[1]: 1 bucket_counts for 1 explicit_bounds"),
            "{e}"
        );
    }

    #[test]
    fn a_log_without_an_event_time_takes_its_observed_time() {
        let req = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                scope_logs: vec![ScopeLogs {
                    log_records: vec![
                        LogRecord {
                            observed_time_unix_nano: T,
                            ..Default::default()
                        },
                        LogRecord::default(),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let c = convert_logs(&req, TimeWindow::unbounded()).unwrap();
        assert_eq!((c.rows, c.rejected), (1, 1));
        assert!(c.first_error.unwrap().contains("log_records[1]: neither"));
        let time = c.batches[0]
            .1
            .column(0)
            .as_primitive::<TimestampMicrosecondType>()
            .value(0);
        assert_eq!(time, (T / 1000) as i64);
    }
}
