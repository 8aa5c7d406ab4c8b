//! Apps' OTLP metrics (the `metrics` table) as Prometheus series, named
//! the way Prometheus's own OTLP receiver names them: dots become
//! underscores, the unit is a suffix (`_milliseconds`, `_bytes`),
//! monotonic sums end in `_total`, histograms become `_bucket{le}`,
//! `_sum` and `_count`, summaries `{quantile}`, `_sum` and `_count`. The
//! name without its unit suffix is accepted too. Each series is labelled
//! with its point's attributes and `job` (`service.namespace/service.name`)
//! and `instance` (`service.instance.id`). Delta temporality is summed into
//! the cumulative series PromQL's `rate` expects. Recording rules' results
//! are stored here too, and read back with only the labels the rule gave.

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int64Type, TimestampMicrosecondType};
use lumen_core::schema::{RECORDING_SCOPE, REMOTE_WRITE_SCOPE};
use promql_parser::parser::VectorSelector;

use super::PromError;
use super::eval::{Source, matches, selected_names};
use super::istio::{IstioSource, quote, ts};
use super::value::{self, Labels, METRIC_NAME, RawSeries};
use crate::engine::QueryEngine;

/// What part of a metric a Prometheus name reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Value,
    Bucket,
    Sum,
    Count,
    Quantile,
}

/// One OTLP metric as stored, and a Prometheus name for a part of it.
#[derive(Debug, Clone)]
struct Named {
    prom: String,
    otlp: String,
    kind: String,
    unit: String,
    monotonic: bool,
    part: Part,
    /// Prometheus's own name for it (unit and type suffixes); the others
    /// are aliases a selector must name.
    canonical: bool,
}

/// A Prometheus metric or label name from an OTLP one.
pub fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// The Prometheus suffix of a UCUM unit, as Prometheus's OTLP translation.
fn unit_suffix(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "ms" => "milliseconds",
        "s" => "seconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "min" => "minutes",
        "h" => "hours",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "KBy" => "kilobytes",
        "MBy" => "megabytes",
        "%" => "percent",
        "Cel" => "celsius",
        "Hz" => "hertz",
        _ => return None,
    })
}

/// Every Prometheus name a stored metric answers to.
fn names_of(otlp: &str, kind: &str, unit: &str, monotonic: bool) -> Vec<Named> {
    let base = sanitize(otlp);
    let mut bases = vec![base.clone()];
    if let Some(s) = unit_suffix(unit)
        && !base.ends_with(&format!("_{s}"))
    {
        bases.push(format!("{base}_{s}"));
    }
    let parts: &[(&str, Part)] = match (kind, monotonic) {
        ("sum", true) => &[("_total", Part::Value), ("", Part::Value)],
        ("gauge" | "sum", _) => &[("", Part::Value)],
        ("histogram", _) => &[
            ("_bucket", Part::Bucket),
            ("_sum", Part::Sum),
            ("_count", Part::Count),
        ],
        ("exponential_histogram", _) => &[("_sum", Part::Sum), ("_count", Part::Count)],
        ("summary", _) => &[
            ("", Part::Quantile),
            ("_sum", Part::Sum),
            ("_count", Part::Count),
        ],
        _ => &[],
    };
    let mut out = Vec::new();
    let last = bases.len() - 1;
    for (i, b) in bases.iter().enumerate() {
        for (j, (suffix, part)) in parts.iter().enumerate() {
            out.push(Named {
                prom: format!("{b}{suffix}"),
                otlp: otlp.to_string(),
                kind: kind.to_string(),
                unit: unit.to_string(),
                monotonic,
                part: *part,
                // With its unit suffix, and for counters `_total`.
                canonical: i == last && (kind != "sum" || !monotonic || j == 0),
            });
        }
    }
    out
}

/// A string column as `Utf8`, whatever string type SQL gave it.
fn utf8(column: &arrow::array::ArrayRef) -> Result<arrow::array::StringArray, PromError> {
    let cast = arrow::compute::cast(column, &DataType::Utf8)
        .map_err(|e| PromError::Execution(e.to_string()))?;
    Ok(cast.as_string::<i32>().clone())
}

/// Series from the `metrics` table.
pub struct OtlpSource {
    engine: QueryEngine,
    origin: String,
}

impl OtlpSource {
    pub fn new(engine: QueryEngine, origin: String) -> Self {
        OtlpSource { engine, origin }
    }

    async fn sql(&self, sql: &str) -> Result<Vec<RecordBatch>, PromError> {
        Ok(self.engine.execute(sql, &self.origin).await?.batches)
    }

    /// The stored metrics with points in `(from, to]` (of `scopes`), under every name.
    async fn catalog(&self, from: i64, to: i64, scopes: Scopes) -> Result<Vec<Named>, PromError> {
        let sql = format!(
            "SELECT DISTINCT CAST(name AS VARCHAR) AS name, CAST(type AS VARCHAR) AS type, \
             COALESCE(CAST(unit AS VARCHAR), '') AS unit, COALESCE(is_monotonic, false) AS mono \
             FROM metrics WHERE time > {} AND time <= {}{}",
            ts(from),
            ts(to),
            scopes.filter(),
        );
        let mut out = Vec::new();
        for b in self.sql(&sql).await? {
            let (name, kind, unit) = (utf8(b.column(0))?, utf8(b.column(1))?, utf8(b.column(2))?);
            let mono = b.column(3).as_boolean();
            for i in 0..b.num_rows() {
                out.extend(names_of(
                    name.value(i),
                    kind.value(i),
                    unit.value(i),
                    mono.value(i),
                ));
            }
        }
        Ok(out)
    }

    /// Samples of one metric's part, per label set. Delta points are
    /// added to `totals` (each series' running total before `from`).
    async fn fetch(
        &self,
        named: &Named,
        from: i64,
        to: i64,
        scopes: Scopes,
        totals: &mut BTreeMap<Labels, f64>,
    ) -> Result<BTreeMap<Labels, Vec<(i64, f64)>>, PromError> {
        // The instance: the SDK's `service.instance.id`, or where it runs,
        // so replicas' counters stay apart.
        let sql = format!(
            "SELECT time, CAST(service_name AS VARCHAR), CAST(service_namespace AS VARCHAR), \
             CAST(COALESCE(service_instance_id, k8s_pod_name, host_name) AS VARCHAR), attributes, \
             value, count, sum, explicit_bounds, bucket_counts, quantiles, quantile_values, \
             CAST(aggregation_temporality AS VARCHAR), CAST(scope_name AS VARCHAR) \
             FROM metrics WHERE name = {} AND type = {} \
             AND COALESCE(CAST(unit AS VARCHAR), '') = {} AND COALESCE(is_monotonic, false) = {} \
             AND time > {} AND time <= {}{} ORDER BY time",
            quote(&named.otlp),
            quote(&named.kind),
            quote(&named.unit),
            named.monotonic,
            ts(from),
            ts(to),
            scopes.filter(),
        );
        let mut series: BTreeMap<Labels, Vec<(i64, f64)>> = BTreeMap::new();
        for b in self.sql(&sql).await? {
            let time = b.column(0).as_primitive::<TimestampMicrosecondType>();
            let strings = |i: usize| utf8(b.column(i));
            let (service, namespace, instance) = (strings(1)?, strings(2)?, strings(3)?);
            let attributes = b.column(4).as_map();
            let value = b.column(5).as_primitive::<Float64Type>();
            let count = b.column(6).as_primitive::<Int64Type>();
            let sum = b.column(7).as_primitive::<Float64Type>();
            let bounds = b.column(8).as_list::<i32>();
            let buckets = b.column(9).as_list::<i32>();
            let quantiles = b.column(10).as_list::<i32>();
            let quantile_values = b.column(11).as_list::<i32>();
            let temporality = strings(12)?;
            let scope = strings(13)?;
            for row in 0..b.num_rows() {
                let ms = time.value(row) / 1000;
                let mut labels: Labels = Vec::new();
                // A recording rule's series has only the labels the rule gave
                // it; a remote-written one those its Prometheus gave it.
                let recorded = !scope.is_null(row)
                    && matches!(scope.value(row), RECORDING_SCOPE | REMOTE_WRITE_SCOPE);
                if !recorded {
                    let job = match (namespace.is_null(row), service.value(row)) {
                        (false, s) => format!("{}/{s}", namespace.value(row)),
                        (true, s) => s.to_string(),
                    };
                    value::set(&mut labels, "job", &job);
                    if !instance.is_null(row) {
                        value::set(&mut labels, "instance", instance.value(row));
                    }
                }
                if !attributes.is_null(row) {
                    let entries = attributes.value(row);
                    let keys = arrow::compute::cast(entries.column(0), &DataType::Utf8)
                        .map_err(|e| PromError::Execution(e.to_string()))?;
                    let values = arrow::compute::cast(entries.column(1), &DataType::Utf8)
                        .map_err(|e| PromError::Execution(e.to_string()))?;
                    let (keys, values) = (keys.as_string::<i32>(), values.as_string::<i32>());
                    for i in 0..keys.len() {
                        if !values.is_null(i) {
                            value::set(&mut labels, &sanitize(keys.value(i)), values.value(i));
                        }
                    }
                }
                value::set(&mut labels, METRIC_NAME, &named.prom);
                let delta = !temporality.is_null(row) && temporality.value(row) == "delta";
                let mut push = |labels: Labels, v: f64| {
                    let v = if delta {
                        let t = totals.entry(labels.clone()).or_default();
                        *t += v;
                        *t
                    } else {
                        v
                    };
                    series.entry(labels).or_default().push((ms, v));
                };
                match named.part {
                    Part::Value if !value.is_null(row) => push(labels, value.value(row)),
                    Part::Count if !count.is_null(row) => push(labels, count.value(row) as f64),
                    Part::Sum if !sum.is_null(row) => push(labels, sum.value(row)),
                    Part::Bucket if !buckets.is_null(row) => {
                        let b = buckets.value(row);
                        let b = b.as_primitive::<Int64Type>();
                        let le = bounds.value(row);
                        let le = le.as_primitive::<Float64Type>();
                        let mut cumulative = 0f64;
                        for i in 0..b.len() {
                            cumulative += b.value(i) as f64;
                            let bound = if i < le.len() {
                                format_bound(le.value(i))
                            } else {
                                "+Inf".to_string()
                            };
                            let mut l = labels.clone();
                            value::set(&mut l, "le", &bound);
                            push(l, cumulative);
                        }
                    }
                    Part::Quantile if !quantiles.is_null(row) => {
                        let q = quantiles.value(row);
                        let q = q.as_primitive::<Float64Type>();
                        let v = quantile_values.value(row);
                        let v = v.as_primitive::<Float64Type>();
                        for i in 0..q.len().min(v.len()) {
                            let mut l = labels.clone();
                            value::set(&mut l, "quantile", &format_bound(q.value(i)));
                            push(l, v.value(i));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(series)
    }
}

/// Which instrumentation scopes' metrics a read takes.
#[derive(Debug, Clone, Copy)]
enum Scopes {
    All,
    /// Not what a Prometheus remote-wrote to Lumen.
    Own,
}

impl Scopes {
    fn filter(self) -> String {
        match self {
            Scopes::All => String::new(),
            Scopes::Own => format!(
                " AND (scope_name IS NULL OR CAST(scope_name AS VARCHAR) <> {})",
                quote(REMOTE_WRITE_SCOPE)
            ),
        }
    }
}

/// A bucket bound or quantile as Prometheus prints it (`0.5`, `10`, `+Inf`).
fn format_bound(v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    format!("{v}")
}

#[async_trait::async_trait]
impl Source for OtlpSource {
    async fn select(
        &self,
        selector: &VectorSelector,
        from: i64,
        to: i64,
        _range: Option<i64>,
    ) -> Result<Vec<RawSeries>, PromError> {
        let mut catalog = self.catalog(from, to, Scopes::All).await?;
        // A selector that does not name its metric gets each once, by
        // Prometheus's name, not once per alias.
        if selector.name.is_none() {
            catalog.retain(|n| n.canonical);
        }
        let names: Vec<&str> = catalog.iter().map(|n| n.prom.as_str()).collect();
        let wanted: Vec<&str> = selected_names(selector, &names);
        let mut out = Vec::new();
        for named in catalog.iter().filter(|n| wanted.contains(&n.prom.as_str())) {
            let mut totals = BTreeMap::new();
            for (labels, samples) in self
                .fetch(named, from, to, Scopes::All, &mut totals)
                .await?
            {
                if matches(&selector.matchers, &labels) {
                    out.push(RawSeries { labels, samples });
                }
            }
        }
        Ok(out)
    }
}

impl OtlpSource {
    /// Every series' samples in `(from, to]` by Prometheus's names, apps'
    /// and recording rules' (not those a Prometheus remote-wrote, which
    /// would go back where they came from): what remote write sends.
    /// `totals` carries delta series' running totals from one call to the
    /// next, so they stay the cumulative counters a receiver expects.
    pub async fn export(
        &self,
        from: i64,
        to: i64,
        totals: &mut BTreeMap<Labels, f64>,
    ) -> Result<Vec<RawSeries>, PromError> {
        let mut out = Vec::new();
        for named in self.catalog(from, to, Scopes::Own).await? {
            if !named.canonical {
                continue;
            }
            for (labels, samples) in self.fetch(&named, from, to, Scopes::Own, totals).await? {
                out.push(RawSeries { labels, samples });
            }
        }
        Ok(out)
    }

    /// The label sets of the series `selector` selects in `(from, to]`.
    pub async fn series(
        &self,
        selector: &VectorSelector,
        from: i64,
        to: i64,
    ) -> Result<Vec<Labels>, PromError> {
        Ok(self
            .select(selector, from, to, None)
            .await?
            .into_iter()
            .map(|s| s.labels)
            .collect())
    }
}

/// Istio's series from rollups and apps' own from `metrics`, as one source.
pub struct Sources {
    pub istio: IstioSource,
    pub otlp: OtlpSource,
}

/// Names only Istio's series can have.
fn istio_only(selector: &VectorSelector) -> bool {
    selector
        .name
        .as_deref()
        .is_some_and(|n| n.starts_with("istio_"))
}

#[async_trait::async_trait]
impl Source for Sources {
    async fn select(
        &self,
        selector: &VectorSelector,
        from: i64,
        to: i64,
        range: Option<i64>,
    ) -> Result<Vec<RawSeries>, PromError> {
        let mut out = self.istio.select(selector, from, to, range).await?;
        if !istio_only(selector) {
            out.extend(self.otlp.select(selector, from, to, range).await?);
        }
        Ok(out)
    }
}

impl Sources {
    pub async fn series(
        &self,
        selector: &VectorSelector,
        from: i64,
        to: i64,
    ) -> Result<Vec<Labels>, PromError> {
        let mut out = self.istio.series(selector, from, to).await?;
        if !istio_only(selector) {
            out.extend(self.otlp.series(selector, from, to).await?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_names_become_prometheus_names_with_unit_and_type_suffixes() {
        let prom = |otlp, kind, unit, mono| -> Vec<String> {
            names_of(otlp, kind, unit, mono)
                .into_iter()
                .map(|n| n.prom)
                .collect()
        };
        assert_eq!(
            prom("http.server.request.duration", "histogram", "s", false),
            [
                "http_server_request_duration_bucket",
                "http_server_request_duration_sum",
                "http_server_request_duration_count",
                "http_server_request_duration_seconds_bucket",
                "http_server_request_duration_seconds_sum",
                "http_server_request_duration_seconds_count",
            ]
        );
        assert_eq!(prom("orders", "sum", "1", true), ["orders_total", "orders"]);
        assert_eq!(prom("queue.depth", "sum", "", false), ["queue_depth"]);
        assert_eq!(
            prom("heap_bytes", "gauge", "By", false),
            ["heap_bytes"],
            "the unit is not repeated"
        );
        assert_eq!(sanitize("9lives.count"), "_9lives_count");
        let canonical = |otlp, kind, unit, mono| -> Vec<String> {
            names_of(otlp, kind, unit, mono)
                .into_iter()
                .filter(|n| n.canonical)
                .map(|n| n.prom)
                .collect()
        };
        assert_eq!(
            canonical("latency", "histogram", "ms", false),
            [
                "latency_milliseconds_bucket",
                "latency_milliseconds_sum",
                "latency_milliseconds_count"
            ]
        );
        assert_eq!(canonical("orders", "sum", "", true), ["orders_total"]);
        assert_eq!(canonical("queue", "sum", "", false), ["queue"]);
    }
}
