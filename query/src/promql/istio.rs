//! Istio's standard metrics, read from `rollups`.
//!
//! A rollup row holds what one key (reporter × source × destination ×
//! route × status × …) did in one 10 s or 1 min window. Istio's series are
//! cumulative counters and histograms, so a series' sample at the end of a
//! window is everything its key did up to then: the sum of the windows
//! before the queried range (the "base"), plus each window in it. Samples
//! fall on every window end while the series exists, as a scrape every
//! window would see them; a series that begins inside the range starts
//! with a 0 at the start of its first window (as Prometheus's created
//! timestamps give), so `increase()` over its whole life counts every
//! request.
//!
//! Istio's labels are computed from the key columns
//! (`destination_service` is `<service>.<namespace>.svc.cluster.local`,
//! `connection_security_policy` from `mtls`, …); Lumen adds `route`.
//! Request-size and response-size histograms have `_sum` and `_count`
//! only: rollups keep no size buckets.

use std::collections::{BTreeMap, HashMap};

use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int32Type, Int64Type, TimestampMicrosecondType};
use arrow::record_batch::RecordBatch;
use promql_parser::label::MatchOp;
use promql_parser::parser::VectorSelector;

use super::PromError;
use super::eval::{Source, matches, selected_names};
use super::value::{self, Labels, METRIC_NAME, RawSeries};
use crate::engine::QueryEngine;
use lumen_core::schema::{DURATION_BUCKETS_MS, ROLLUP_KEY_NAMES};

/// Which rows of `rollups` a metric reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Http,
    Tcp,
}

/// What a series' value is, from a window's aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Requests,
    RequestBytes,
    ResponseBytes,
    /// `duration_sum_us`, in milliseconds.
    DurationMs,
    /// Istio's duration buckets, one series per `le`.
    DurationBuckets,
}

pub struct Metric {
    pub name: &'static str,
    pub family: Family,
    field: Field,
    /// Prometheus metadata: the family name, its type and help.
    pub meta: (&'static str, &'static str, &'static str),
}

const DURATION: (&str, &str, &str) = (
    "istio_request_duration_milliseconds",
    "histogram",
    "Duration of requests, in milliseconds, as the reporting sidecar saw them.",
);
// Istio makes these histograms; rollups keep no size buckets, so Lumen
// offers their sum and count, which is what a summary without quantiles is.
const REQUEST_SIZE: (&str, &str, &str) = (
    "istio_request_bytes",
    "summary",
    "Sizes of request bodies, in bytes.",
);
const RESPONSE_SIZE: (&str, &str, &str) = (
    "istio_response_bytes",
    "summary",
    "Sizes of response bodies, in bytes.",
);

/// Every series name Lumen answers, with Istio's meaning.
pub const METRICS: [Metric; 12] = [
    Metric {
        name: "istio_requests_total",
        family: Family::Http,
        field: Field::Requests,
        meta: (
            "istio_requests_total",
            "counter",
            "Requests handled, by source, destination and response.",
        ),
    },
    Metric {
        name: "istio_request_duration_milliseconds_bucket",
        family: Family::Http,
        field: Field::DurationBuckets,
        meta: DURATION,
    },
    Metric {
        name: "istio_request_duration_milliseconds_sum",
        family: Family::Http,
        field: Field::DurationMs,
        meta: DURATION,
    },
    Metric {
        name: "istio_request_duration_milliseconds_count",
        family: Family::Http,
        field: Field::Requests,
        meta: DURATION,
    },
    Metric {
        name: "istio_request_bytes_sum",
        family: Family::Http,
        field: Field::RequestBytes,
        meta: REQUEST_SIZE,
    },
    Metric {
        name: "istio_request_bytes_count",
        family: Family::Http,
        field: Field::Requests,
        meta: REQUEST_SIZE,
    },
    Metric {
        name: "istio_response_bytes_sum",
        family: Family::Http,
        field: Field::ResponseBytes,
        meta: RESPONSE_SIZE,
    },
    Metric {
        name: "istio_response_bytes_count",
        family: Family::Http,
        field: Field::Requests,
        meta: RESPONSE_SIZE,
    },
    Metric {
        name: "istio_tcp_sent_bytes_total",
        family: Family::Tcp,
        field: Field::ResponseBytes,
        meta: (
            "istio_tcp_sent_bytes_total",
            "counter",
            "Bytes sent towards the client on TCP connections.",
        ),
    },
    Metric {
        name: "istio_tcp_received_bytes_total",
        family: Family::Tcp,
        field: Field::RequestBytes,
        meta: (
            "istio_tcp_received_bytes_total",
            "counter",
            "Bytes received from the client on TCP connections.",
        ),
    },
    Metric {
        name: "istio_tcp_connections_opened_total",
        family: Family::Tcp,
        field: Field::Requests,
        meta: (
            "istio_tcp_connections_opened_total",
            "counter",
            "TCP connections opened.",
        ),
    },
    Metric {
        name: "istio_tcp_connections_closed_total",
        family: Family::Tcp,
        field: Field::Requests,
        meta: (
            "istio_tcp_connections_closed_total",
            "counter",
            "TCP connections closed.",
        ),
    },
];

pub fn metric_names() -> Vec<&'static str> {
    METRICS.iter().map(|m| m.name).collect()
}

fn metric(name: &str) -> Option<&'static Metric> {
    METRICS.iter().find(|m| m.name == name)
}

/// Labels of a series, besides `__name__`, `le`.
pub const HTTP_LABELS: [&str; 20] = [
    "connection_security_policy",
    "destination_app",
    "destination_principal",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_version",
    "destination_workload",
    "destination_workload_namespace",
    "grpc_response_status",
    "reporter",
    "request_protocol",
    "response_code",
    "response_flags",
    "route",
    "source_app",
    "source_principal",
    "source_version",
    "source_workload",
    "source_workload_namespace",
];

/// Istio's label → the `rollups` column it is a copy of (for SQL filters).
fn column_of(label: &str) -> Option<&'static str> {
    Some(match label {
        "reporter" => "reporter",
        "source_workload" => "source_workload",
        "source_workload_namespace" => "source_namespace",
        "source_app" => "source_service",
        "source_version" => "source_version",
        "destination_service_name" | "destination_app" => "destination_service",
        "destination_service_namespace" | "destination_workload_namespace" => {
            "destination_namespace"
        }
        "destination_workload" => "destination_workload",
        "destination_version" => "destination_version",
        "route" => "route",
        "response_flags" => "response_flags",
        _ => return None,
    })
}

/// The `le` label of each duration bucket, as Prometheus formats bounds.
fn bucket_bounds() -> Vec<String> {
    DURATION_BUCKETS_MS
        .iter()
        .map(|b| value::format_number(*b))
        .chain(std::iter::once("+Inf".to_string()))
        .collect()
}

const BUCKETS: usize = DURATION_BUCKETS_MS.len() + 1;

/// A key's aggregates: requests, request bytes, response bytes, duration
/// sum (µs), then the cumulative bucket counts (as `rollups` stores them).
type Aggs = [f64; 4 + BUCKETS];

/// One key of `rollups` as read back: its Istio labels.
fn istio_labels(
    keys: &[String; 12],
    status: Option<i32>,
    grpc: Option<i32>,
    mtls: bool,
    family: Family,
) -> Labels {
    let k = |name: &str| {
        let i = ROLLUP_KEY_NAMES
            .iter()
            .position(|n| *n == name)
            .unwrap_or(0);
        keys[i].clone()
    };
    let reporter = k("reporter");
    let (service, namespace) = (k("destination_service"), k("destination_namespace"));
    let fqdn = if namespace.is_empty() {
        service.clone()
    } else {
        format!("{service}.{namespace}.svc.cluster.local")
    };
    let policy = if reporter == "source" {
        "unknown"
    } else if mtls {
        "mutual_tls"
    } else {
        "none"
    };
    let protocol = match (family, k("protocol").as_str()) {
        (Family::Tcp, _) => "tcp",
        (_, "grpc") => "grpc",
        _ => "http",
    };
    let mut labels = vec![
        ("connection_security_policy".to_string(), policy.to_string()),
        ("destination_app".into(), service.clone()),
        // Peer identities arrive with mTLS; until then Istio says "unknown".
        ("destination_principal".into(), "unknown".into()),
        ("destination_service".into(), fqdn),
        ("destination_service_name".into(), service),
        ("destination_service_namespace".into(), namespace.clone()),
        ("destination_version".into(), k("destination_version")),
        ("destination_workload".into(), k("destination_workload")),
        ("destination_workload_namespace".into(), namespace),
        ("reporter".into(), reporter),
        ("request_protocol".into(), protocol.into()),
        ("response_flags".into(), k("response_flags")),
        ("source_app".into(), k("source_service")),
        ("source_principal".into(), "unknown".into()),
        ("source_version".into(), k("source_version")),
        ("source_workload".into(), k("source_workload")),
        ("source_workload_namespace".into(), k("source_namespace")),
    ];
    if family == Family::Http {
        labels.push(("route".into(), k("route")));
        if let Some(s) = status {
            labels.push(("response_code".into(), s.to_string()));
        }
        if let Some(g) = grpc {
            labels.push(("grpc_response_status".into(), g.to_string()));
        }
    }
    value::normalize(labels)
}

/// Reads Istio series from `rollups` through the query engine.
pub struct IstioSource {
    engine: QueryEngine,
    origin: String,
    /// End of the last closed 10 s window: later samples would be partial.
    now_ms: i64,
    /// Read raw `requests` rows instead of rollups: the same series, the
    /// way to check rollups and to measure what they save.
    raw: bool,
}

/// The aggregate columns `r, qb, pb, d` and `b0…` (cumulative duration
/// buckets) over `rollups`, or the same computed from `requests` rows.
fn value_list(raw: bool, buckets: bool) -> String {
    let mut values = if raw {
        "count(*) AS r, sum(request_bytes) AS qb, sum(response_bytes) AS pb, sum(duration_us) AS d"
            .to_string()
    } else {
        "sum(requests) AS r, sum(request_bytes) AS qb, sum(response_bytes) AS pb, sum(duration_sum_us) AS d"
            .to_string()
    };
    if buckets {
        for b in 0..BUCKETS {
            if !raw {
                values.push_str(&format!(", sum(duration_bucket[{}]) AS b{b}", b + 1));
            } else if let Some(bound) = DURATION_BUCKETS_MS.get(b) {
                // The rollups' rule: a duration counts in the first bucket
                // whose bound (ms) it does not exceed.
                let us = (bound * 1000.0) as i64;
                values.push_str(&format!(
                    ", CAST(sum(CASE WHEN duration_us <= {us} THEN 1 ELSE 0 END) AS BIGINT) AS b{b}"
                ));
            } else {
                values.push_str(&format!(", count(*) AS b{b}"));
            }
        }
    }
    values
}

impl IstioSource {
    pub fn new(engine: QueryEngine, origin: String) -> Self {
        let now_ms = chrono::Utc::now().timestamp_millis();
        IstioSource {
            engine,
            origin,
            now_ms,
            raw: false,
        }
    }

    /// Series from raw `requests` rows rather than rollups.
    pub fn raw(mut self, raw: bool) -> Self {
        self.raw = raw;
        self
    }

    async fn sql(&self, sql: &str) -> Result<Vec<RecordBatch>, PromError> {
        tracing::debug!(sql, "promql fetch");
        Ok(self.engine.execute(sql, &self.origin).await?.batches)
    }

    /// The label sets (without `__name__`) of each family's series with
    /// data in `(from, to]`.
    pub async fn label_sets(&self, from: i64, to: i64) -> Result<Vec<(Family, Labels)>, PromError> {
        let mut out = Vec::new();
        for family in [Family::Http, Family::Tcp] {
            let sql = format!(
                "SELECT DISTINCT {keys} FROM rollups WHERE window_seconds = 10 AND time >= {a} AND time <= {b} AND {fam}",
                keys = key_list(),
                a = ts(from.div_euclid(10_000) * 10_000),
                b = ts(to),
                fam = family_filter(family),
            );
            let mut seen = std::collections::HashSet::new();
            for batch in self.sql(&sql).await? {
                for row in read_keys(&batch)? {
                    let labels = istio_labels(&row.keys, row.status, row.grpc, row.mtls, family);
                    if seen.insert(labels.clone()) {
                        out.push((family, labels));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The series `selector` selects, by name, with every label.
    pub async fn series(
        &self,
        selector: &VectorSelector,
        from: i64,
        to: i64,
    ) -> Result<Vec<Labels>, PromError> {
        let names = selected_names(selector, &metric_names());
        let sets = self.label_sets(from, to).await?;
        let bounds = bucket_bounds();
        let mut out = Vec::new();
        for name in names {
            let Some(m) = metric(name) else { continue };
            for (family, labels) in &sets {
                if *family != m.family {
                    continue;
                }
                let mut base = labels.clone();
                value::set(&mut base, METRIC_NAME, name);
                let variants: Vec<Labels> = if m.field == Field::DurationBuckets {
                    bounds
                        .iter()
                        .map(|le| {
                            let mut l = base.clone();
                            value::set(&mut l, "le", le);
                            l
                        })
                        .collect()
                } else {
                    vec![base]
                };
                out.extend(
                    variants
                        .into_iter()
                        .filter(|l| matches(&selector.matchers, l)),
                );
            }
        }
        Ok(out)
    }
}

impl IstioSource {
    /// Every series' value now: what `/metrics` exposes. Minute windows
    /// hold everything stored, the open minute included, so a scraper
    /// sees counters that only grow.
    pub async fn totals(&self) -> Result<Vec<Exposed>, PromError> {
        let mut out: BTreeMap<(Family, Labels), Aggs> = BTreeMap::new();
        let values = value_list(false, true);
        // Windows are shown once they end: closed minutes, then the ten
        // seconds windows of the minute in progress.
        let minute = self.now_ms.div_euclid(60_000) * 60_000;
        let sql = format!(
            "SELECT {keys}, {values} FROM rollups WHERE (window_seconds = 60 AND time < {m}) \
             OR (window_seconds = 10 AND time >= {m}) GROUP BY {keys}",
            keys = key_list(),
            m = ts(minute),
        );
        for batch in self.sql(&sql).await? {
            for (row, k) in read_keys(&batch)?.into_iter().enumerate() {
                let family = if k.keys[protocol_index()] == "tcp" {
                    Family::Tcp
                } else {
                    Family::Http
                };
                let labels = istio_labels(&k.keys, k.status, k.grpc, k.mtls, family);
                add(
                    out.entry((family, labels)).or_insert([0.0; 4 + BUCKETS]),
                    &read_aggs(&batch, row, true)?,
                );
            }
        }
        let bounds = bucket_bounds();
        let mut exposed = Vec::new();
        // Family by family, and within one, a label set's samples together
        // (buckets, sum, count), as OpenMetrics wants them.
        let mut families: Vec<&str> = METRICS.iter().map(|m| m.meta.0).collect();
        families.dedup();
        for family_name in families {
            let members: Vec<&'static Metric> =
                METRICS.iter().filter(|m| m.meta.0 == family_name).collect();
            for ((family, labels), a) in &out {
                for m in members.iter().filter(|m| m.family == *family) {
                    if m.field == Field::DurationBuckets {
                        for (b, le) in bounds.iter().enumerate() {
                            let mut l = labels.clone();
                            value::set(&mut l, "le", le);
                            exposed.push(Exposed {
                                metric: m,
                                labels: l,
                                value: a[4 + b],
                            });
                        }
                    } else {
                        exposed.push(Exposed {
                            metric: m,
                            labels: labels.clone(),
                            value: field_value(m.field, a),
                        });
                    }
                }
            }
        }
        Ok(exposed)
    }
}

/// One sample of `/metrics`.
pub struct Exposed {
    pub metric: &'static Metric,
    pub labels: Labels,
    pub value: f64,
}

fn protocol_index() -> usize {
    ROLLUP_KEY_NAMES
        .iter()
        .position(|n| *n == "protocol")
        .unwrap_or(0)
}

fn field_value(field: Field, a: &Aggs) -> f64 {
    match field {
        Field::Requests => a[0],
        Field::RequestBytes => a[1],
        Field::ResponseBytes => a[2],
        Field::DurationMs => a[3] / 1000.0,
        Field::DurationBuckets => a[4 + BUCKETS - 1],
    }
}

fn key_list() -> String {
    let mut cols: Vec<&str> = ROLLUP_KEY_NAMES.to_vec();
    cols.extend(["status", "grpc_status", "mtls"]);
    cols.join(", ")
}

fn family_filter(family: Family) -> &'static str {
    match family {
        Family::Http => "protocol <> 'tcp'",
        Family::Tcp => "protocol = 'tcp'",
    }
}

/// A SQL timestamp literal for milliseconds since the epoch.
fn ts(ms: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    format!(
        "TIMESTAMP '{}'",
        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    )
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// SQL filters the selector's equality matchers allow; every matcher is
/// checked again on the computed labels, so these only narrow the scan.
fn pushdown(selector: &VectorSelector) -> String {
    if !selector.matchers.or_matchers.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    for m in &selector.matchers.matchers {
        if !matches!(m.op, MatchOp::Equal) {
            continue;
        }
        if m.value.is_empty() {
            // An empty value also matches series without the label.
            continue;
        }
        if m.name == "response_code" {
            match m.value.parse::<i32>() {
                Ok(code) => out.push_str(&format!(" AND status = {code}")),
                Err(_) => out.push_str(" AND false"),
            }
            continue;
        }
        if m.name == "destination_service" {
            if let Some(service) = m.value.split('.').next()
                && !service.is_empty()
            {
                out.push_str(&format!(" AND destination_service = {}", quote(service)));
            }
            continue;
        }
        if let Some(col) = column_of(&m.name) {
            out.push_str(&format!(" AND {col} = {}", quote(&m.value)));
        }
    }
    out
}

struct KeyRow {
    keys: [String; 12],
    status: Option<i32>,
    grpc: Option<i32>,
    mtls: bool,
}

fn column<'b>(batch: &'b RecordBatch, name: &str) -> Result<&'b dyn Array, PromError> {
    batch
        .column_by_name(name)
        .map(|c| c.as_ref())
        .ok_or_else(|| PromError::Execution(format!("rollups answer lacks column {name}")))
}

fn read_keys(batch: &RecordBatch) -> Result<Vec<KeyRow>, PromError> {
    let strings: Vec<_> = ROLLUP_KEY_NAMES
        .iter()
        .map(|n| {
            cast(column(batch, n)?, &DataType::Utf8)
                .map_err(|e| PromError::Execution(format!("reading rollups: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let status = column(batch, "status")?.as_primitive_opt::<Int32Type>();
    let grpc = column(batch, "grpc_status")?.as_primitive_opt::<Int32Type>();
    let mtls = column(batch, "mtls")?.as_boolean_opt();
    let (Some(status), Some(grpc), Some(mtls)) = (status, grpc, mtls) else {
        return Err(PromError::Execution(
            "rollups answer has unexpected types".into(),
        ));
    };
    Ok((0..batch.num_rows())
        .map(|r| KeyRow {
            keys: std::array::from_fn(|i| {
                let s = strings[i].as_string::<i32>();
                if s.is_null(r) {
                    String::new()
                } else {
                    s.value(r).to_string()
                }
            }),
            status: status.is_valid(r).then(|| status.value(r)),
            grpc: grpc.is_valid(r).then(|| grpc.value(r)),
            mtls: mtls.is_valid(r) && mtls.value(r),
        })
        .collect())
}

fn read_aggs(batch: &RecordBatch, row: usize, buckets: bool) -> Result<Aggs, PromError> {
    let mut a: Aggs = [0.0; 4 + BUCKETS];
    let names = ["r", "qb", "pb", "d"];
    for (i, n) in names.iter().enumerate() {
        a[i] = int(column(batch, n)?, row);
    }
    if buckets {
        for b in 0..BUCKETS {
            a[4 + b] = int(column(batch, &format!("b{b}"))?, row);
        }
    }
    Ok(a)
}

fn int(col: &dyn Array, row: usize) -> f64 {
    match col.as_primitive_opt::<Int64Type>() {
        Some(c) if c.is_valid(row) => c.value(row) as f64,
        _ => 0.0,
    }
}

fn add(into: &mut Aggs, from: &Aggs) {
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

#[async_trait::async_trait]
impl Source for IstioSource {
    async fn select(
        &self,
        selector: &VectorSelector,
        from: i64,
        to: i64,
        range: Option<i64>,
    ) -> Result<Vec<RawSeries>, PromError> {
        let names = selected_names(selector, &metric_names());
        let mut families: BTreeMap<Family, Vec<&'static Metric>> = BTreeMap::new();
        for name in names {
            if let Some(m) = metric(name) {
                families.entry(m.family).or_default().push(m);
            }
        }
        let mut out = Vec::new();
        for (family, metrics) in families {
            let buckets = metrics.iter().any(|m| m.field == Field::DurationBuckets);
            let per_key = self
                .fetch(selector, family, buckets, from, to, range)
                .await?;
            expand(per_key, &metrics, selector, &mut out);
        }
        Ok(out)
    }
}

/// Each Istio label set's cumulative aggregates at its sample times.
type Cumulative = Vec<(Labels, Vec<(i64, Aggs)>)>;

impl IstioSource {
    async fn fetch(
        &self,
        selector: &VectorSelector,
        family: Family,
        buckets: bool,
        from: i64,
        to: i64,
        range: Option<i64>,
    ) -> Result<Cumulative, PromError> {
        // Ten-second windows unless the range is long: then minutes keep
        // the samples (and the scan) small — if a range function still
        // gets four samples per window.
        let w: i64 = if to - from > 6 * 3_600_000 && range.is_none_or(|r| r >= 240_000) {
            60_000
        } else {
            10_000
        };
        let first = from.div_euclid(w) * w;
        let end = to.min(self.now_ms.div_euclid(w) * w);
        if end < first + w {
            return Ok(Vec::new());
        }
        let minute = first.div_euclid(60_000) * 60_000;
        let values = value_list(self.raw, buckets);
        let filter = format!("{}{}", family_filter(family), pushdown(selector));
        let keys = key_list();
        let (base_sql, range_sql) = if self.raw {
            (
                format!(
                    "SELECT {keys}, {values} FROM requests WHERE time < {f} AND {filter} GROUP BY {keys}",
                    f = ts(first),
                ),
                format!(
                    "SELECT {keys}, date_bin(INTERVAL '{ws} seconds', time, TIMESTAMP '1970-01-01T00:00:00Z') AS time, \
                     {values} FROM requests WHERE time >= {f} AND time < {e} AND {filter} GROUP BY {keys}, {bin}",
                    ws = w / 1000,
                    // The window's position: after the key columns.
                    bin = ROLLUP_KEY_NAMES.len() + 4,
                    f = ts(first),
                    e = ts(end),
                ),
            )
        } else {
            (
                // Everything before the range, from minute windows where
                // whole minutes allow.
                format!(
                    "SELECT {keys}, {values} FROM rollups WHERE ((window_seconds = 60 AND time < {m}) \
                     OR (window_seconds = 10 AND time >= {m} AND time < {f})) AND {filter} GROUP BY {keys}",
                    m = ts(minute),
                    f = ts(first),
                ),
                format!(
                    "SELECT {keys}, time, {values} FROM rollups WHERE window_seconds = {ws} AND time >= {f} \
                     AND time <= {l} AND {filter} GROUP BY {keys}, time",
                    ws = w / 1000,
                    f = ts(first),
                    l = ts(end - w),
                ),
            )
        };
        let (base, range) =
            futures_util::future::try_join(self.sql(&base_sql), self.sql(&range_sql)).await?;

        let mut bases: HashMap<Labels, Aggs> = HashMap::new();
        for batch in &base {
            for (row, k) in read_keys(batch)?.into_iter().enumerate() {
                let labels = istio_labels(&k.keys, k.status, k.grpc, k.mtls, family);
                add(
                    bases.entry(labels).or_insert([0.0; 4 + BUCKETS]),
                    &read_aggs(batch, row, buckets)?,
                );
            }
        }
        let mut windows: HashMap<Labels, BTreeMap<i64, Aggs>> = HashMap::new();
        for batch in &range {
            // Window starts, in µs whatever unit the scan gave them.
            let times = cast(
                column(batch, "time")?,
                &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into())),
            )
            .map_err(|e| PromError::Execution(format!("reading window starts: {e}")))?;
            let times = times
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or_else(|| {
                    PromError::Execution("window starts have an unexpected type".into())
                })?;
            for (row, k) in read_keys(batch)?.into_iter().enumerate() {
                let labels = istio_labels(&k.keys, k.status, k.grpc, k.mtls, family);
                let start = times.value(row) / 1000;
                add(
                    windows
                        .entry(labels)
                        .or_default()
                        .entry(start)
                        .or_insert([0.0; 4 + BUCKETS]),
                    &read_aggs(batch, row, buckets)?,
                );
            }
        }

        let points = ((end - first) / w) as usize;
        let mut series: BTreeMap<Labels, (Option<Aggs>, BTreeMap<i64, Aggs>)> = BTreeMap::new();
        for (labels, b) in bases {
            series.entry(labels).or_default().0 = Some(b);
        }
        for (labels, ws) in windows {
            series.entry(labels).or_default().1 = ws;
        }
        // Each metric read expands a key's samples into its own series
        // (the duration histogram into fifteen).
        let expansion = if buckets { BUCKETS + 2 } else { 3 };
        let total = series
            .len()
            .saturating_mul(points)
            .saturating_mul(expansion);
        let bytes = series
            .len()
            .saturating_mul(points)
            .saturating_mul(std::mem::size_of::<(i64, Aggs)>());
        if bytes > self.engine.config().memory_bytes {
            return Err(PromError::Execution(format!(
                "{selector} over this range needs {} MiB of samples, more than the query memory limit of {} MiB; narrow the selector or the range",
                bytes >> 20,
                self.engine.config().memory_bytes >> 20
            )));
        }
        if total > super::eval::MAX_SAMPLES {
            return Err(PromError::Execution(format!(
                "query processing would load too many samples into memory ({total} for {}); narrow the selector or the range",
                selector
            )));
        }
        let mut out = Vec::with_capacity(series.len());
        for (labels, (base, ws)) in series {
            let mut samples = Vec::new();
            let mut cumulative = base;
            for k in 1..=points as i64 {
                let t = first + k * w;
                let window_start = t - w;
                if cumulative.is_none() {
                    match ws.keys().next() {
                        // A series born in this window: 0 at its start.
                        Some(&s) if s == window_start => {
                            if window_start > from {
                                samples.push((window_start, [0.0; 4 + BUCKETS]));
                            }
                            cumulative = Some([0.0; 4 + BUCKETS]);
                        }
                        _ => continue,
                    }
                }
                let c = cumulative.get_or_insert([0.0; 4 + BUCKETS]);
                if let Some(delta) = ws.get(&window_start) {
                    add(c, delta);
                }
                samples.push((t, *c));
            }
            if !samples.is_empty() {
                out.push((labels, samples));
            }
        }
        Ok(out)
    }
}

/// Turns each label set's aggregates into the selected metrics' series.
fn expand(
    per_key: Cumulative,
    metrics: &[&'static Metric],
    selector: &VectorSelector,
    out: &mut Vec<RawSeries>,
) {
    let bounds = bucket_bounds();
    for (labels, samples) in per_key {
        for m in metrics {
            let mut named = labels.clone();
            value::set(&mut named, METRIC_NAME, m.name);
            if m.field == Field::DurationBuckets {
                for (b, le) in bounds.iter().enumerate() {
                    let mut l = named.clone();
                    value::set(&mut l, "le", le);
                    if !matches(&selector.matchers, &l) {
                        continue;
                    }
                    let samples = samples.iter().map(|(t, a)| (*t, a[4 + b])).collect();
                    out.push(RawSeries { labels: l, samples });
                }
            } else if matches(&selector.matchers, &named) {
                out.push(RawSeries {
                    samples: samples
                        .iter()
                        .map(|(t, a)| (*t, field_value(m.field, a)))
                        .collect(),
                    labels: named,
                });
            }
        }
    }
}
