//! Istio's standard metrics, read from `rollups`.
//!
//! A rollup row holds what one key (reporter × source × destination ×
//! route × status × …) did in one 10 s or 1 min window. Istio's series are
//! cumulative counters and histograms, so a series' sample at the end of a
//! window is everything its key did up to then: the sum of the windows
//! before the queried range (the "base"), plus each window in it. Samples
//! fall on every window end while the series reports, as a scrape every
//! window would see them; a key quiet for Prometheus's 5 minute lookback
//! gets a staleness marker, as a target that went away, until its next
//! request; a series that begins inside the range starts
//! with a 0 at the start of its first window (as Prometheus's created
//! timestamps give), so `increase()` over its whole life counts every
//! request.
//!
//! Istio's labels are computed from the key columns
//! (`destination_service` is `<service>.<namespace>.svc.cluster.local`,
//! `connection_security_policy` from `mtls`, …); Lumen adds `route`.
//! Request-size and response-size histograms have Envoy's default
//! buckets (as Istio's), from the rollups' size buckets: ten-second
//! windows, since the live tier keeps none. `istio_build` has one series
//! per reporting proxy. [`IstioExport`] follows the same series window by
//! window for remote write.

use std::collections::{BTreeMap, HashMap};

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int32Array, Int64Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int32Type, Int64Type, TimestampMicrosecondType};
use arrow::record_batch::RecordBatch;
use promql_parser::label::MatchOp;
use promql_parser::parser::VectorSelector;

use super::PromError;
use super::eval::{Source, matches, selected_names};
use super::value::{self, Labels, METRIC_NAME, RawSeries};
use crate::engine::QueryEngine;
use lumen_core::schema::{DURATION_BUCKETS_MS, ROLLUP_KEY_NAMES, SIZE_BUCKETS};

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
    /// Request and response body size buckets, one series per `le`.
    RequestSizeBuckets,
    ResponseSizeBuckets,
}

impl Field {
    /// A histogram's buckets: their `le` bounds.
    fn buckets(self) -> Option<Vec<String>> {
        match self {
            Field::DurationBuckets => Some(bounds(&DURATION_BUCKETS_MS)),
            Field::RequestSizeBuckets | Field::ResponseSizeBuckets => Some(bounds(&SIZE_BUCKETS)),
            _ => None,
        }
    }
}

/// Which histograms a read needs (each costs a column of buckets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Hist {
    durations: bool,
    sizes: bool,
}

impl Hist {
    const ALL: Hist = Hist {
        durations: true,
        sizes: true,
    };

    fn of(metrics: &[&Metric]) -> Hist {
        Hist {
            durations: metrics.iter().any(|m| m.field == Field::DurationBuckets),
            sizes: metrics.iter().any(|m| {
                matches!(
                    m.field,
                    Field::RequestSizeBuckets | Field::ResponseSizeBuckets
                )
            }),
        }
    }
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
const REQUEST_SIZE: (&str, &str, &str) = (
    "istio_request_bytes",
    "histogram",
    "Sizes of request bodies, in bytes.",
);
const RESPONSE_SIZE: (&str, &str, &str) = (
    "istio_response_bytes",
    "histogram",
    "Sizes of response bodies, in bytes.",
);

/// Every series name Lumen answers, with Istio's meaning.
pub const METRICS: [Metric; 14] = [
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
        name: "istio_request_bytes_bucket",
        family: Family::Http,
        field: Field::RequestSizeBuckets,
        meta: REQUEST_SIZE,
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
        name: "istio_response_bytes_bucket",
        family: Family::Http,
        field: Field::ResponseSizeBuckets,
        meta: RESPONSE_SIZE,
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

/// Istio's build gauge: one series per proxy (its workload, as it
/// reported in rollups), 1 while it reports, labelled `component="proxy"`
/// and `tag` with the Lumen version, as each Istio proxy exposes it.
pub const BUILD: &str = "istio_build";
pub const BUILD_META: (&str, &str, &str) = (
    BUILD,
    "gauge",
    "Version of the proxy (component, tag): one series per reporting workload.",
);

pub fn metric_names() -> Vec<&'static str> {
    METRICS
        .iter()
        .map(|m| m.name)
        .chain(std::iter::once(BUILD))
        .collect()
}

fn metric(name: &str) -> Option<&'static Metric> {
    METRICS.iter().find(|m| m.name == name)
}

/// Labels of a series, besides `__name__`, `le`.
pub const HTTP_LABELS: [&str; 26] = [
    "connection_security_policy",
    "destination_app",
    "destination_canonical_revision",
    "destination_canonical_service",
    "destination_cluster",
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
    "source_canonical_revision",
    "source_canonical_service",
    "source_cluster",
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
        "source_app" | "source_canonical_service" => "source_service",
        "source_version" => "source_version",
        "destination_service_name" | "destination_app" | "destination_canonical_service" => {
            "destination_service"
        }
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

/// The `le` label of each bucket, as Prometheus formats bounds.
fn bounds(of: &[f64]) -> Vec<String> {
    of.iter()
        .map(|b| value::format_number(*b))
        .chain(std::iter::once("+Inf".to_string()))
        .collect()
}

const BUCKETS: usize = DURATION_BUCKETS_MS.len() + 1;
const SIZES: usize = SIZE_BUCKETS.len() + 1;
/// Every aggregate a key has: [`Layout`] of [`Hist::ALL`].
const WIDTH: usize = 4 + BUCKETS + 2 * SIZES;

/// A key's every aggregate, for what follows all of them (`/metrics`,
/// remote write): requests, request bytes, response bytes, duration sum
/// (µs), then the cumulative bucket counts (as `rollups` stores them) of
/// durations, request sizes and response sizes.
type Aggs = [f64; WIDTH];

/// Where a read's aggregates sit in its flat rows: the four sums, then the
/// cumulative buckets of only the histograms the read asks for, so a
/// request-rate query keeps 4 numbers a window rather than 59.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    width: usize,
    durations: Option<usize>,
    request_sizes: Option<usize>,
    response_sizes: Option<usize>,
}

impl Layout {
    fn of(hist: Hist) -> Layout {
        let mut width = 4;
        let mut take = |on: bool, n: usize| {
            on.then(|| {
                width += n;
                width - n
            })
        };
        let durations = take(hist.durations, BUCKETS);
        let request_sizes = take(hist.sizes, SIZES);
        let response_sizes = take(hist.sizes, SIZES);
        Layout {
            width,
            durations,
            request_sizes,
            response_sizes,
        }
    }

    /// Where a field's value, or a histogram's first bucket, is; none for
    /// a histogram the layout leaves out.
    fn at(&self, field: Field) -> Option<usize> {
        match field {
            Field::Requests => Some(0),
            Field::RequestBytes => Some(1),
            Field::ResponseBytes => Some(2),
            Field::DurationMs => Some(3),
            Field::DurationBuckets => self.durations,
            Field::RequestSizeBuckets => self.request_sizes,
            Field::ResponseSizeBuckets => self.response_sizes,
        }
    }
}

/// One key of `rollups` as read back: its Istio labels.
fn istio_labels(key: &KeyRef<'_>, family: Family) -> Labels {
    let k = |name: &str| {
        let i = ROLLUP_KEY_NAMES
            .iter()
            .position(|n| *n == name)
            .unwrap_or(0);
        key.keys[i]
    };
    let protocol = match family {
        Family::Tcp => "tcp",
        Family::Http => k("protocol"),
    };
    let istio = lumen_core::istio::IstioKey {
        reporter: k("reporter"),
        source_service: k("source_service"),
        source_workload: k("source_workload"),
        source_namespace: k("source_namespace"),
        source_version: k("source_version"),
        destination_service: k("destination_service"),
        destination_workload: k("destination_workload"),
        destination_namespace: k("destination_namespace"),
        destination_version: k("destination_version"),
        protocol,
        response_flags: k("response_flags"),
        status: key.status,
        grpc_status: key.grpc,
        mtls: key.mtls,
        source_principal: k("source_principal"),
        destination_principal: k("destination_principal"),
    };
    let mut labels: Labels = istio
        .labels()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
    if family == Family::Http {
        labels.push(("route".into(), k("route").to_string()));
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

/// The aggregate columns `r, qb, pb, d`, and for the histograms `hist`
/// asks for their cumulative buckets (`b0…` durations, `q0…` request
/// sizes, `p0…` response sizes), over `rollups`, or the same computed from
/// `requests` rows.
fn value_list(raw: bool, hist: Hist) -> String {
    let mut values = if raw {
        "count(*) AS r, sum(request_bytes) AS qb, sum(response_bytes) AS pb, sum(duration_us) AS d"
            .to_string()
    } else {
        "sum(requests) AS r, sum(request_bytes) AS qb, sum(response_bytes) AS pb, sum(duration_sum_us) AS d"
            .to_string()
    };
    // (alias prefix, rollups column, row column, bounds in the row's unit)
    let mut histograms: Vec<(&str, &str, &str, Vec<f64>)> = Vec::new();
    if hist.durations {
        // The rollups' rule: a value counts in the first bucket whose
        // bound it does not exceed (durations' bounds are ms, rows' µs).
        let us = DURATION_BUCKETS_MS.iter().map(|b| b * 1000.0).collect();
        histograms.push(("b", "duration_bucket", "duration_us", us));
    }
    if hist.sizes {
        let sizes = SIZE_BUCKETS.to_vec();
        histograms.push(("q", "request_bytes_bucket", "request_bytes", sizes.clone()));
        histograms.push(("p", "response_bytes_bucket", "response_bytes", sizes));
    }
    for (alias, list, row, bounds) in histograms {
        for b in 0..=bounds.len() {
            if !raw {
                values.push_str(&format!(", sum({list}[{}]) AS {alias}{b}", b + 1));
            } else if let Some(bound) = bounds.get(b) {
                values.push_str(&format!(
                    ", CAST(sum(CASE WHEN {row} <= {bound} THEN 1 ELSE 0 END) AS BIGINT) AS {alias}{b}"
                ));
            } else {
                values.push_str(&format!(", count(*) AS {alias}{b}"));
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
                keys = key_select(false),
                a = ts(from.div_euclid(10_000) * 10_000),
                b = ts(to),
                fam = family_filter(family),
            );
            let mut index = LabelIndex::new(Some(family));
            for batch in self.sql(&sql).await? {
                let keys = KeyColumns::new(&batch)?;
                for row in 0..batch.num_rows() {
                    index.index(&keys.key(row));
                }
            }
            out.extend(index.sets);
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
        let mut out = Vec::new();
        if names.contains(&BUILD) {
            out.extend(
                self.builds(selector, from, to)
                    .await?
                    .into_iter()
                    .map(|s| s.labels),
            );
        }
        for name in names {
            let Some(m) = metric(name) else { continue };
            for (family, labels) in &sets {
                if *family != m.family {
                    continue;
                }
                let mut base = labels.clone();
                value::set(&mut base, METRIC_NAME, name);
                let variants: Vec<Labels> = if let Some(bounds) = m.field.buckets() {
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
        let values = value_list(false, Hist::ALL);
        // Windows are shown once they end: closed minutes, then the ten
        // seconds windows of the minute in progress.
        let minute = self.now_ms.div_euclid(60_000) * 60_000;
        let sql = format!(
            "SELECT {keys}, {values} FROM rollups WHERE (window_seconds = 60 AND time < {m}) \
             OR (window_seconds = 10 AND time >= {m}) GROUP BY {groups}",
            keys = key_select(false),
            groups = key_positions(),
            m = ts(minute),
        );
        let mut index = LabelIndex::new(None);
        let mut totals: Vec<Aggs> = Vec::new();
        for batch in self.sql(&sql).await? {
            let keys = KeyColumns::new(&batch)?;
            let aggs = AggColumns::new(&batch, Hist::ALL)?;
            for row in 0..batch.num_rows() {
                let i = index.index(&keys.key(row));
                if i == totals.len() {
                    totals.push(ZERO);
                }
                add(&mut totals[i], &aggs.read(row));
            }
        }
        let mut out: Vec<(&(Family, Labels), &Aggs)> = index.sets.iter().zip(&totals).collect();
        out.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let all = Layout::of(Hist::ALL);
        let mut exposed = Vec::new();
        // Family by family, and within one, a label set's samples together
        // (buckets, sum, count), as OpenMetrics wants them.
        let mut families: Vec<&str> = METRICS.iter().map(|m| m.meta.0).collect();
        families.dedup();
        for family_name in families {
            let members: Vec<&'static Metric> =
                METRICS.iter().filter(|m| m.meta.0 == family_name).collect();
            for &((family, labels), a) in &out {
                for m in members.iter().filter(|m| m.family == *family) {
                    if let (Some(bounds), Some(at)) = (m.field.buckets(), all.at(m.field)) {
                        for (b, le) in bounds.iter().enumerate() {
                            let mut l = labels.clone();
                            value::set(&mut l, "le", le);
                            exposed.push(Exposed {
                                metric: m,
                                labels: l,
                                value: a[at + b],
                            });
                        }
                    } else {
                        exposed.push(Exposed {
                            metric: m,
                            labels: labels.clone(),
                            value: field_value(m.field, a, &all),
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

/// A field's value in a row of `layout`; a histogram's is its `+Inf`
/// bucket (its count).
fn field_value(field: Field, a: &[f64], layout: &Layout) -> f64 {
    let Some(at) = layout.at(field) else {
        return 0.0;
    };
    match (field, field.buckets()) {
        (Field::DurationMs, _) => a[at] / 1000.0,
        (_, Some(bounds)) => a[at + bounds.len() - 1],
        _ => a[at],
    }
}

/// The key columns as the SQL answers them. Over rollups, strings rather
/// than dictionaries: grouping then runs DataFusion's vectorised string
/// path, and emitting the groups re-encodes nothing. Over millions of raw
/// rows the cast costs more than it saves, so those stay dictionaries.
fn key_select(raw: bool) -> String {
    let mut cols: Vec<String> = ROLLUP_KEY_NAMES
        .iter()
        .map(|n| match (raw, n.ends_with("_principal")) {
            // Null (no mTLS, or a file from before the column) is "".
            (true, true) => format!("COALESCE(arrow_cast({n}, 'Utf8'), '') AS {n}"),
            (true, false) => n.to_string(),
            (false, true) => format!("COALESCE(arrow_cast({n}, 'Utf8'), '') AS {n}"),
            (false, false) => format!("arrow_cast({n}, 'Utf8') AS {n}"),
        })
        .collect();
    cols.extend(["status", "grpc_status", "mtls"].map(String::from));
    cols.join(", ")
}

/// `GROUP BY` positions of [`key_select`]'s columns.
fn key_positions() -> String {
    let n = ROLLUP_KEY_NAMES.len() + 3;
    (1..=n)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn family_filter(family: Family) -> &'static str {
    match family {
        Family::Http => "protocol <> 'tcp'",
        Family::Tcp => "protocol = 'tcp'",
    }
}

/// A SQL timestamp literal for milliseconds since the epoch.
pub(super) fn ts(ms: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    format!(
        "TIMESTAMP '{}'",
        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    )
}

/// A SQL string literal.
pub(super) fn quote(s: &str) -> String {
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

/// One rollup key, borrowed from an answer batch.
struct KeyRef<'a> {
    keys: [&'a str; ROLLUP_KEY_NAMES.len()],
    status: Option<i32>,
    grpc: Option<i32>,
    mtls: bool,
}

/// An answer batch's key columns, read in place.
struct KeyColumns {
    strings: Vec<ArrayRef>,
    status: Int32Array,
    grpc: Int32Array,
    mtls: BooleanArray,
}

impl KeyColumns {
    fn new(batch: &RecordBatch) -> Result<Self, PromError> {
        let strings = ROLLUP_KEY_NAMES
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
        Ok(KeyColumns {
            strings,
            status: status.clone(),
            grpc: grpc.clone(),
            mtls: mtls.clone(),
        })
    }

    fn key(&self, row: usize) -> KeyRef<'_> {
        KeyRef {
            keys: std::array::from_fn(|i| {
                let s = self.strings[i].as_string::<i32>();
                if s.is_null(row) { "" } else { s.value(row) }
            }),
            status: self.status.is_valid(row).then(|| self.status.value(row)),
            grpc: self.grpc.is_valid(row).then(|| self.grpc.value(row)),
            mtls: self.mtls.is_valid(row) && self.mtls.value(row),
        }
    }
}

/// Gives each distinct Istio label set an index, computing the labels
/// once per rollup key rather than once per row: many keys (routes, for
/// one) share a label set, and many rows one key.
struct LabelIndex {
    /// `None`: each key's family comes from its protocol.
    family: Option<Family>,
    by_key: HashMap<String, usize, foldhash::fast::RandomState>,
    by_labels: HashMap<(Family, Labels), usize, foldhash::fast::RandomState>,
    sets: Vec<(Family, Labels)>,
    scratch: String,
}

impl LabelIndex {
    fn new(family: Option<Family>) -> Self {
        LabelIndex {
            family,
            by_key: HashMap::default(),
            by_labels: HashMap::default(),
            sets: Vec::new(),
            scratch: String::new(),
        }
    }

    fn len(&self) -> usize {
        self.sets.len()
    }

    fn index(&mut self, key: &KeyRef<'_>) -> usize {
        use std::fmt::Write as _;
        let s = &mut self.scratch;
        s.clear();
        for k in key.keys {
            // A separator no label value holds keeps keys apart.
            s.push_str(k);
            s.push('\u{1f}');
        }
        let _ = write!(s, "{:?}\u{1f}{:?}\u{1f}{}", key.status, key.grpc, key.mtls);
        if let Some(&i) = self.by_key.get(s.as_str()) {
            return i;
        }
        let family = self
            .family
            .unwrap_or(if key.keys[protocol_index()] == "tcp" {
                Family::Tcp
            } else {
                Family::Http
            });
        let set = (family, istio_labels(key, family));
        let next = self.sets.len();
        let i = *self.by_labels.entry(set.clone()).or_insert(next);
        if i == next {
            self.sets.push(set);
        }
        self.by_key.insert(s.clone(), i);
        i
    }
}

/// An answer batch's aggregate columns `r, qb, pb, d` (and `b0…`).
struct AggColumns<'b> {
    /// Each column and where in [`Aggs`] it goes.
    columns: Vec<(usize, &'b Int64Array)>,
}

impl<'b> AggColumns<'b> {
    /// The columns `hist` asks for, placed as [`Layout::of`] it.
    fn new(batch: &'b RecordBatch, hist: Hist) -> Result<Self, PromError> {
        let layout = Layout::of(hist);
        let mut names: Vec<(usize, String)> = ["r", "qb", "pb", "d"]
            .iter()
            .enumerate()
            .map(|(i, n)| (i, n.to_string()))
            .collect();
        let histograms = [
            (layout.durations, BUCKETS, "b"),
            (layout.request_sizes, SIZES, "q"),
            (layout.response_sizes, SIZES, "p"),
        ];
        for (at, n, alias) in histograms {
            if let Some(at) = at {
                names.extend((0..n).map(|b| (at + b, format!("{alias}{b}"))));
            }
        }
        let columns = names
            .iter()
            .map(|(at, n)| {
                let c = column(batch, n)?
                    .as_primitive_opt::<Int64Type>()
                    .ok_or_else(|| {
                        PromError::Execution(format!("rollups column {n} is not BIGINT"))
                    })?;
                Ok((*at, c))
            })
            .collect::<Result<_, PromError>>()?;
        Ok(AggColumns { columns })
    }

    /// A row's aggregates into `a` (its layout's width); a window from
    /// before size buckets were kept (null) counts none.
    fn read_into(&self, row: usize, a: &mut [f64]) {
        for (at, c) in &self.columns {
            a[*at] = if c.is_valid(row) {
                c.value(row) as f64
            } else {
                0.0
            };
        }
    }

    /// A row's every aggregate, from columns of [`Hist::ALL`].
    fn read(&self, row: usize) -> Aggs {
        let mut a: Aggs = ZERO;
        self.read_into(row, &mut a);
        a
    }
}

fn column<'b>(batch: &'b RecordBatch, name: &str) -> Result<&'b dyn Array, PromError> {
    batch
        .column_by_name(name)
        .map(|c| c.as_ref())
        .ok_or_else(|| PromError::Execution(format!("rollups answer lacks column {name}")))
}

fn add(into: &mut [f64], from: &[f64]) {
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
        for &name in &names {
            if let Some(m) = metric(name) {
                families.entry(m.family).or_default().push(m);
            }
        }
        let mut out = Vec::new();
        for (family, metrics) in families {
            let hist = Hist::of(&metrics);
            let per_key = self.fetch(selector, family, hist, from, to, range).await?;
            expand(per_key, &metrics, selector, &mut out);
        }
        if names.contains(&BUILD) {
            out.extend(self.builds(selector, from, to).await?);
        }
        Ok(out)
    }
}

impl IstioSource {
    /// `istio_build`: each workload that reported (as either side's
    /// proxy) in a window has a 1 at that window's end.
    async fn builds(
        &self,
        selector: &VectorSelector,
        from: i64,
        to: i64,
    ) -> Result<Vec<RawSeries>, PromError> {
        let w: i64 = if to - from > 6 * 3_600_000 {
            60_000
        } else {
            10_000
        };
        let first = from.div_euclid(w) * w;
        let sql = format!(
            "SELECT DISTINCT CASE WHEN reporter = 'source' THEN arrow_cast(source_workload, 'Utf8') \
             ELSE arrow_cast(destination_workload, 'Utf8') END AS workload, \
             CASE WHEN reporter = 'source' THEN arrow_cast(source_namespace, 'Utf8') \
             ELSE arrow_cast(destination_namespace, 'Utf8') END AS namespace, time \
             FROM rollups WHERE window_seconds = {ws} AND time >= {f} AND time <= {t}",
            ws = w / 1000,
            f = ts(first),
            t = ts(to - w),
        );
        let mut series: BTreeMap<Labels, Vec<(i64, f64)>> = BTreeMap::new();
        for batch in self.sql(&sql).await? {
            let times = window_starts(&batch)?;
            let strings = |name: &str| {
                cast(column(&batch, name)?, &DataType::Utf8)
                    .map_err(|e| PromError::Execution(format!("reading rollups: {e}")))
            };
            let (workloads, namespaces) = (strings("workload")?, strings("namespace")?);
            let (workloads, namespaces) =
                (workloads.as_string::<i32>(), namespaces.as_string::<i32>());
            for row in 0..batch.num_rows() {
                let end = times.value(row) / 1000 + w;
                if end <= from
                    || end > to
                    || workloads.is_null(row)
                    || workloads.value(row).is_empty()
                {
                    continue;
                }
                let labels = value::normalize(vec![
                    (METRIC_NAME.to_string(), BUILD.to_string()),
                    ("component".into(), "proxy".into()),
                    ("tag".into(), env!("CARGO_PKG_VERSION").into()),
                    ("workload".into(), workloads.value(row).into()),
                    (
                        "namespace".into(),
                        if namespaces.is_null(row) {
                            ""
                        } else {
                            namespaces.value(row)
                        }
                        .into(),
                    ),
                ]);
                if matches(&selector.matchers, &labels) {
                    series.entry(labels).or_default().push((end, 1.0));
                }
            }
        }
        Ok(series
            .into_iter()
            .map(|(labels, mut samples)| {
                samples.sort_unstable_by_key(|p| p.0);
                samples.dedup_by_key(|p| p.0);
                RawSeries { labels, samples }
            })
            .collect())
    }
}

/// Each Istio label set's cumulative aggregates at its sample times, as
/// rows of one layout.
struct Cumulative {
    layout: Layout,
    series: Vec<Samples>,
}

/// One label set's samples: row `j` of `values` is the sample at `times[j]`.
#[derive(Default)]
struct Samples {
    labels: Labels,
    times: Vec<i64>,
    values: Vec<f64>,
}

impl Samples {
    fn push(&mut self, t: i64, a: &[f64]) {
        self.times.push(t);
        self.values.extend_from_slice(a);
    }

    fn pop(&mut self, width: usize) {
        self.times.pop();
        self.values.truncate(self.values.len() - width);
    }
}

/// Longest range the live tier answers (it keeps 15 minutes; the rest is
/// room for the base it is joined to).
const LIVE_SPAN_MS: i64 = 14 * 60_000;
/// How far behind now the rollups give the base the live tier adds to:
/// their windows up to then have closed.
const LIVE_CUT_MS: i64 = 12_000;

/// Where a fetch's samples fall: window `k` starts at `first + k * w` and
/// its sample is at its end, except a last partial window (the current
/// second, from the live tier) whose sample is at `partial`.
struct Grid {
    w: i64,
    first: i64,
    full: usize,
    partial: Option<i64>,
}

impl Grid {
    fn points(&self) -> usize {
        self.full + usize::from(self.partial.is_some())
    }

    fn sample_at(&self, k: usize) -> i64 {
        match self.partial {
            Some(t) if k == self.full => t,
            _ => self.first + (k as i64 + 1) * self.w,
        }
    }

    /// The window a time (ms) falls in, if in the grid.
    fn window(&self, ms: i64) -> Option<usize> {
        let k = usize::try_from((ms - self.first).div_euclid(self.w)).ok()?;
        (k < self.points()).then_some(k)
    }
}

/// Each key's aggregates before the grid (`bases`) and in each of its
/// windows, gathered from SQL answers or the live tier.
struct Gathered<'s> {
    selector: &'s VectorSelector,
    layout: Layout,
    index: LabelIndex,
    bases: Vec<Option<Vec<f64>>>,
    /// When each label set's base was last added to (ms): a series quiet
    /// for longer than the lookback is stale, as a scrape that stopped.
    last_seen: Vec<i64>,
    /// Each label set's windows, `layout.width` numbers apiece.
    windows: Vec<Vec<f64>>,
    born: Vec<usize>,
    points: usize,
    used: usize,
    limit: usize,
}

/// How long a series with no new requests keeps answering: Prometheus's
/// lookback, after which a series that stopped reporting is stale.
const STALE_AFTER_MS: i64 = 5 * 60_000;

const ZERO: Aggs = [0.0; WIDTH];
/// Every field a staleness marker.
const STALE: Aggs = [f64::from_bits(super::eval::STALE_NAN); WIDTH];

impl<'s> Gathered<'s> {
    fn new(
        selector: &'s VectorSelector,
        family: Family,
        hist: Hist,
        points: usize,
        limit: usize,
    ) -> Self {
        Gathered {
            selector,
            layout: Layout::of(hist),
            index: LabelIndex::new(Some(family)),
            bases: Vec::new(),
            last_seen: Vec::new(),
            windows: Vec::new(),
            born: Vec::new(),
            points,
            used: 0,
            limit,
        }
    }

    fn add_base(&mut self, key: &KeyRef<'_>, aggs: &[f64], seen_ms: i64) {
        let i = self.index.index(key);
        if i >= self.bases.len() {
            self.bases.resize(i + 1, None);
            self.last_seen.resize(i + 1, i64::MIN);
        }
        let width = self.layout.width;
        add(self.bases[i].get_or_insert_with(|| vec![0.0; width]), aggs);
        self.last_seen[i] = self.last_seen[i].max(seen_ms);
    }

    /// Each series' windows are dense once it has one, and bounded by the
    /// query's memory limit as they are allocated.
    fn add_window(&mut self, key: &KeyRef<'_>, k: usize, aggs: &[f64]) -> Result<(), PromError> {
        let i = self.index.index(key);
        if i >= self.windows.len() {
            self.windows.resize_with(i + 1, Vec::new);
            self.born.resize(i + 1, usize::MAX);
        }
        if self.windows[i].is_empty() {
            let dense = (self.points)
                .saturating_mul(self.layout.width)
                .saturating_mul(std::mem::size_of::<f64>());
            self.used = self.used.saturating_add(dense);
            if self.used > self.limit {
                return Err(PromError::Execution(format!(
                    "{} over this range needs more than the query memory limit of {} MiB of samples; narrow the selector or the range",
                    self.selector,
                    self.limit >> 20
                )));
            }
            self.windows[i] = vec![0.0; self.points * self.layout.width];
        }
        let width = self.layout.width;
        add(&mut self.windows[i][k * width..(k + 1) * width], aggs);
        self.born[i] = self.born[i].min(k);
        Ok(())
    }

    fn add_batches(
        &mut self,
        base: &[RecordBatch],
        range: &[RecordBatch],
        hist: Hist,
        grid: &Grid,
    ) -> Result<(), PromError> {
        let mut scratch = vec![0.0; self.layout.width];
        for batch in base {
            let keys = KeyColumns::new(batch)?;
            let aggs = AggColumns::new(batch, hist)?;
            let seen = cast(column(batch, "last_seen")?, &DataType::Int64)
                .map_err(|e| PromError::Execution(format!("reading last_seen: {e}")))?;
            let seen = seen.as_primitive::<Int64Type>();
            for row in 0..batch.num_rows() {
                let ms = if seen.is_null(row) {
                    i64::MIN
                } else {
                    seen.value(row).saturating_mul(1000)
                };
                aggs.read_into(row, &mut scratch);
                self.add_base(&keys.key(row), &scratch, ms);
            }
        }
        for batch in range {
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
            let keys = KeyColumns::new(batch)?;
            let aggs = AggColumns::new(batch, hist)?;
            for row in 0..batch.num_rows() {
                if let Some(k) = grid.window(times.value(row) / 1000) {
                    aggs.read_into(row, &mut scratch);
                    self.add_window(&keys.key(row), k, &scratch)?;
                }
            }
        }
        Ok(())
    }

    /// Adds the live tier's seconds from `cut` (ms) on: before the grid to
    /// the bases, in it to its windows. Keys of the other family, and keys
    /// whose labels the selector cannot match, are passed over before any
    /// window is allocated for them.
    fn add_live(
        &mut self,
        store: &lumen_collector::Store,
        family: Family,
        cut: i64,
        grid: &Grid,
    ) -> Result<(), PromError> {
        let tcp = protocol_index();
        let mut failed = None;
        let mut wanted: HashMap<usize, bool> = HashMap::new();
        let mut aggs = vec![0.0; self.layout.width];
        let durations = self.layout.durations;
        store.live_visit(cut / 1000, |second, key, counts| {
            if failed.is_some() || (key.names[tcp] == "tcp") != (family == Family::Tcp) {
                return;
            }
            let key = KeyRef {
                keys: key.names,
                status: Some(key.status),
                grpc: key.grpc_status,
                mtls: key.mtls,
            };
            let i = self.index.index(&key);
            let selector = self.selector;
            let sets = &self.index.sets;
            if !*wanted
                .entry(i)
                .or_insert_with(|| may_match(selector, &sets[i].1))
            {
                return;
            }
            for (a, c) in aggs.iter_mut().zip(&counts[..4]) {
                *a = *c as f64;
            }
            // Cumulative, as rollups keep buckets.
            if let Some(at) = durations {
                let mut total = 0;
                for (a, c) in aggs[at..at + BUCKETS].iter_mut().zip(&counts[4..]) {
                    total += c;
                    *a = total as f64;
                }
            }
            let ms = second * 1000;
            if ms < grid.first {
                self.add_base(&key, &aggs, ms + 1000);
            } else if let Some(k) = grid.window(ms)
                && let Err(e) = self.add_window(&key, k, &aggs)
            {
                failed = Some(e);
            }
        });
        failed.map_or(Ok(()), Err)
    }

    /// Each label set's cumulative aggregates at the grid's sample times.
    fn samples(mut self, grid: &Grid, from: i64) -> Cumulative {
        let width = self.layout.width;
        let zero = vec![0.0; width];
        let stale = vec![f64::from_bits(super::eval::STALE_NAN); width];
        let mut order: Vec<usize> = (0..self.index.len()).collect();
        order.sort_unstable_by(|a, b| self.index.sets[*a].1.cmp(&self.index.sets[*b].1));
        let mut out = Vec::with_capacity(order.len());
        for i in order {
            let ws = self.windows.get(i).filter(|w| !w.is_empty());
            let born = self.born.get(i).copied().unwrap_or(usize::MAX);
            let mut s = Samples::default();
            let mut cumulative = self.bases.get_mut(i).and_then(Option::take);
            let mut seen = self.last_seen.get(i).copied().unwrap_or(i64::MIN);
            let mut marked = false;
            for k in 0..self.points {
                let t = grid.sample_at(k);
                let window_start = grid.first + k as i64 * grid.w;
                if cumulative.is_none() {
                    if k != born {
                        continue;
                    }
                    // A series born in this window: 0 at its start.
                    if window_start > from {
                        s.push(window_start, &zero);
                    }
                }
                let c = cumulative.get_or_insert_with(|| zero.clone());
                if let Some(window) = ws.map(|ws| &ws[k * width..(k + 1) * width])
                    && window.iter().any(|v| *v != 0.0)
                {
                    if marked {
                        // Back after going stale: first the total it had,
                        // at this window's start, so the window's requests
                        // count as an increase.
                        if s.times.last() == Some(&window_start) {
                            s.pop(width);
                        }
                        s.push(window_start, c);
                    }
                    add(c, window);
                    seen = t;
                }
                // Quiet for the lookback: a staleness marker, as when a
                // scrape target goes away; new requests bring it back.
                if t.saturating_sub(seen) <= STALE_AFTER_MS {
                    s.push(t, c);
                    marked = false;
                } else if !marked {
                    s.push(t, &stale);
                    marked = true;
                }
            }
            if !s.times.is_empty() {
                s.labels = std::mem::take(&mut self.index.sets[i].1);
                out.push(s);
            }
        }
        Cumulative {
            layout: self.layout,
            series: out,
        }
    }
}

/// Whether a series with these labels (whatever its name and `le`) can
/// match the selector.
fn may_match(selector: &VectorSelector, labels: &Labels) -> bool {
    if !selector.matchers.or_matchers.is_empty() {
        return true;
    }
    selector
        .matchers
        .matchers
        .iter()
        .filter(|m| m.name != METRIC_NAME && m.name != "le")
        .all(|m| m.is_match(value::get(labels, &m.name).unwrap_or("")))
}

impl IstioSource {
    /// One-second windows for a range of the last minutes (the live
    /// tier's, and raw rows' for the same range), the current second's
    /// sample at the range's end.
    fn second_grid(&self, from: i64, to: i64) -> Option<Grid> {
        if self.now_ms - from > LIVE_SPAN_MS || to <= from {
            return None;
        }
        let w = 1000;
        let first = from.div_euclid(w) * w;
        let end = to.min(self.now_ms);
        let full = usize::try_from((end - first).div_euclid(w)).ok()?;
        let closed = first + full as i64 * w;
        let partial = (end > closed).then_some(end);
        Some(Grid {
            w,
            first,
            full,
            partial,
        })
    }

    async fn fetch(
        &self,
        selector: &VectorSelector,
        family: Family,
        hist: Hist,
        from: i64,
        to: i64,
        range: Option<i64>,
    ) -> Result<Cumulative, PromError> {
        // The last minutes at one-second resolution: the rollups' closed
        // windows before them, the live tier's seconds since — if the tier
        // holds every row since then. The tier keeps no size buckets (they
        // would double its memory): size histograms read ten-second windows.
        let seconds = self.second_grid(from, to);
        if let Some(grid) = seconds.as_ref().filter(|_| !self.raw && !hist.sizes) {
            let cut = grid.first.min(self.now_ms - LIVE_CUT_MS).div_euclid(10_000) * 10_000;
            if cut / 1000 >= self.engine.store().live_complete_from() {
                return self
                    .fetch_live(selector, family, hist, from, grid, cut)
                    .await;
            }
        }
        let grid = match seconds.filter(|_| self.raw) {
            Some(grid) => grid,
            None => {
                // Ten-second windows unless the range is long: then minutes
                // keep the samples (and the scan) small — if a range
                // function still gets four samples per window.
                let w: i64 = if to - from > 6 * 3_600_000 && range.is_none_or(|r| r >= 240_000) {
                    60_000
                } else {
                    10_000
                };
                let first = from.div_euclid(w) * w;
                let end = to.min(self.now_ms.div_euclid(w) * w);
                if end < first + w {
                    return Ok(Cumulative {
                        layout: Layout::of(hist),
                        series: Vec::new(),
                    });
                }
                Grid {
                    w,
                    first,
                    full: ((end - first) / w) as usize,
                    partial: None,
                }
            }
        };
        let (w, first) = (grid.w, grid.first);
        let end = grid.partial.unwrap_or(first + grid.full as i64 * w);
        let values = value_list(self.raw, hist);
        let filter = format!("{}{}", family_filter(family), pushdown(selector));
        let keys = key_select(self.raw);
        let groups = key_positions();
        let minute = first.div_euclid(60_000) * 60_000;
        let (base_sql, range_sql) = if self.raw {
            (
                format!(
                    "SELECT {keys}, {values}, MAX(to_unixtime(time)) AS last_seen FROM requests WHERE time < {f} AND {filter} GROUP BY {groups}",
                    f = ts(first),
                ),
                format!(
                    "SELECT {keys}, date_bin(INTERVAL '{ws} seconds', time, TIMESTAMP '1970-01-01T00:00:00Z') AS time, \
                     {values} FROM requests WHERE time >= {f} AND time < {e} AND {filter} GROUP BY {groups}, {bin}",
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
                    "SELECT {keys}, {values}, MAX(to_unixtime(time) + window_seconds) AS last_seen \
                     FROM rollups WHERE ((window_seconds = 60 AND time < {m}) \
                     OR (window_seconds = 10 AND time >= {m} AND time < {f})) AND {filter} GROUP BY {groups}",
                    m = ts(minute),
                    f = ts(first),
                ),
                format!(
                    "SELECT {keys}, time, {values} FROM rollups WHERE window_seconds = {ws} AND time >= {f} \
                     AND time <= {l} AND {filter} GROUP BY {groups}, time",
                    ws = w / 1000,
                    f = ts(first),
                    l = ts(end - w),
                ),
            )
        };
        let (base, range) =
            futures_util::future::try_join(self.sql(&base_sql), self.sql(&range_sql)).await?;
        let limit = self.engine.config().memory_bytes;
        let mut gathered = Gathered::new(selector, family, hist, grid.points(), limit);
        gathered.add_batches(&base, &range, hist, &grid)?;
        check_samples(&gathered, hist, selector)?;
        Ok(gathered.samples(&grid, from))
    }

    /// The rollups' closed windows before `cut` as the base, the live
    /// tier's seconds since.
    async fn fetch_live(
        &self,
        selector: &VectorSelector,
        family: Family,
        hist: Hist,
        from: i64,
        grid: &Grid,
        cut: i64,
    ) -> Result<Cumulative, PromError> {
        let minute = cut.div_euclid(60_000) * 60_000;
        let base_sql = format!(
            "SELECT {keys}, {values}, MAX(to_unixtime(time) + window_seconds) AS last_seen \
             FROM rollups WHERE ((window_seconds = 60 AND time < {m}) \
             OR (window_seconds = 10 AND time >= {m} AND time < {c})) AND {filter}{pushdown} GROUP BY {groups}",
            keys = key_select(false),
            values = value_list(false, hist),
            filter = family_filter(family),
            pushdown = pushdown(selector),
            groups = key_positions(),
            m = ts(minute),
            c = ts(cut),
        );
        let base = self.sql(&base_sql).await?;
        let limit = self.engine.config().memory_bytes;
        let mut gathered = Gathered::new(selector, family, hist, grid.points(), limit);
        gathered.add_batches(&base, &[], hist, grid)?;
        gathered.add_live(self.engine.store(), family, cut, grid)?;
        check_samples(&gathered, hist, selector)?;
        Ok(gathered.samples(grid, from))
    }
}

/// Each metric read expands a key's samples into its own series (the
/// duration histogram into fifteen): refuses what would be too many.
fn check_samples(g: &Gathered<'_>, hist: Hist, selector: &VectorSelector) -> Result<(), PromError> {
    let mut expansion = 3;
    if hist.durations {
        expansion += BUCKETS;
    }
    if hist.sizes {
        expansion += 2 * SIZES;
    }
    let total = g
        .index
        .len()
        .saturating_mul(g.points)
        .saturating_mul(expansion);
    if total > super::eval::MAX_SAMPLES {
        return Err(PromError::Execution(format!(
            "query processing would load too many samples into memory ({total} for {selector}); narrow the selector or the range"
        )));
    }
    Ok(())
}

/// Turns each label set's aggregates into the selected metrics' series.
/// A marker sample: its fields go out as the marker, untouched by
/// arithmetic.
fn is_stale(a: &[f64]) -> bool {
    super::eval::is_stale(a[0])
}

fn expand(
    per_key: Cumulative,
    metrics: &[&'static Metric],
    selector: &VectorSelector,
    out: &mut Vec<RawSeries>,
) {
    let layout = per_key.layout;
    let width = layout.width;
    let histograms: Vec<Option<Vec<String>>> = metrics.iter().map(|m| m.field.buckets()).collect();
    for series in per_key.series {
        let rows = || series.times.iter().zip(series.values.chunks_exact(width));
        for (m, histogram) in metrics.iter().zip(&histograms) {
            let mut named = series.labels.clone();
            value::set(&mut named, METRIC_NAME, m.name);
            if let Some(bounds) = histogram {
                // A histogram the read left out has no series here.
                let Some(at) = layout.at(m.field) else {
                    continue;
                };
                for (b, le) in bounds.iter().enumerate() {
                    let mut l = named.clone();
                    value::set(&mut l, "le", le);
                    if !matches(&selector.matchers, &l) {
                        continue;
                    }
                    let samples = rows()
                        .map(|(t, a)| (*t, if is_stale(a) { a[0] } else { a[at + b] }))
                        .collect();
                    out.push(RawSeries { labels: l, samples });
                }
            } else if matches(&selector.matchers, &named) {
                out.push(RawSeries {
                    samples: rows()
                        .map(|(t, a)| {
                            let v = if is_stale(a) {
                                a[0]
                            } else {
                                field_value(m.field, a, &layout)
                            };
                            (*t, v)
                        })
                        .collect(),
                    labels: named,
                });
            }
        }
    }
}

/// How often the totals [`IstioExport`] carries are checked against all of
/// `rollups`: rows that arrived after their window was read count then.
const RECONCILE_MS: i64 = 10 * 60_000;

/// One Istio label set as [`IstioExport`] follows it.
#[derive(Debug, Clone, PartialEq)]
struct Tracked {
    total: Aggs,
    /// End of the last window it had requests in (ms).
    seen: i64,
    /// When its staleness marker went out, while it stays quiet.
    marked: Option<i64>,
}

/// Istio's series for remote write, followed window by window as a
/// scraper every ten seconds would see them: each label set's cumulative
/// totals at every window's end while it has had requests in the last 5
/// minutes, then one staleness marker, then nothing until it has requests
/// again (when its total comes back at that window's start, so the
/// window's requests count as an increase); a label set seen for the
/// first time starts with a 0 at its first window's start. Each read
/// scans only its own windows; the totals it carries start from, and are
/// now and then checked against, everything `rollups` holds.
#[derive(Debug, Default, Clone)]
pub struct IstioExport {
    series: HashMap<(Family, Labels), Tracked>,
    reconciled: Option<i64>,
}

impl IstioExport {
    /// Samples of every Istio series in the ten-second windows of
    /// `[from, to)` (multiples of 10 s), each at its window's end.
    pub async fn read(
        &mut self,
        source: &IstioSource,
        from: i64,
        to: i64,
    ) -> Result<Vec<RawSeries>, PromError> {
        const W: i64 = 10_000;
        let (from, to) = (from.div_euclid(W) * W, to.div_euclid(W) * W);
        if to <= from {
            return Ok(Vec::new());
        }
        if self.reconciled.is_none_or(|r| from - r >= RECONCILE_MS) {
            self.reconcile(source, from).await?;
        }
        let sql = format!(
            "SELECT {keys}, time, {values} FROM rollups WHERE window_seconds = 10 \
             AND time >= {f} AND time < {t} GROUP BY {groups}, time",
            keys = key_select(false),
            values = value_list(false, Hist::ALL),
            groups = key_positions(),
            f = ts(from),
            t = ts(to),
        );
        let batches = source.sql(&sql).await?;
        let n = ((to - from) / W) as usize;
        let mut index = LabelIndex::new(None);
        let mut windows: Vec<BTreeMap<usize, Aggs>> = vec![BTreeMap::new(); n];
        for batch in &batches {
            let times = window_starts(batch)?;
            let keys = KeyColumns::new(batch)?;
            let aggs = AggColumns::new(batch, Hist::ALL)?;
            for row in 0..batch.num_rows() {
                let k = (times.value(row) / 1000 - from).div_euclid(W);
                if let Some(window) = usize::try_from(k).ok().and_then(|k| windows.get_mut(k)) {
                    let i = index.index(&keys.key(row));
                    add(window.entry(i).or_insert(ZERO), &aggs.read(row));
                }
            }
        }
        let mut out: HashMap<(Family, Labels), Vec<(i64, Aggs)>> = HashMap::new();
        for (k, window) in windows.into_iter().enumerate() {
            let start = from + k as i64 * W;
            let data = window
                .into_iter()
                .map(|(i, a)| (index.sets[i].clone(), a))
                .collect();
            self.step(start, start + W, data, &mut out);
        }
        let every = VectorSelector::default();
        let mut raw = Vec::new();
        for family in [Family::Http, Family::Tcp] {
            let metrics: Vec<&'static Metric> =
                METRICS.iter().filter(|m| m.family == family).collect();
            let series = out
                .iter()
                .filter(|((f, _), _)| *f == family)
                .map(|((_, labels), samples)| Samples {
                    labels: labels.clone(),
                    times: samples.iter().map(|(t, _)| *t).collect(),
                    values: samples.iter().flat_map(|(_, a)| *a).collect(),
                })
                .collect();
            let per_key = Cumulative {
                layout: Layout::of(Hist::ALL),
                series,
            };
            expand(per_key, &metrics, &every, &mut raw);
        }
        Ok(raw)
    }

    /// One window: `data` is what each label set did in it.
    fn step(
        &mut self,
        start: i64,
        end: i64,
        data: Vec<((Family, Labels), Aggs)>,
        out: &mut HashMap<(Family, Labels), Vec<(i64, Aggs)>>,
    ) {
        for (key, a) in data {
            let samples = out.entry(key.clone()).or_default();
            match self.series.get_mut(&key) {
                None => {
                    samples.push((start, ZERO));
                    self.series.insert(
                        key,
                        Tracked {
                            total: a,
                            seen: end,
                            marked: None,
                        },
                    );
                }
                Some(t) => {
                    // Back after its marker: first the total it had.
                    if t.marked.is_some_and(|at| at < start) {
                        samples.push((start, t.total));
                    }
                    add(&mut t.total, &a);
                    t.seen = end;
                    t.marked = None;
                }
            }
        }
        for (key, t) in &mut self.series {
            if t.marked.is_some() {
                continue;
            }
            let sample = if end - t.seen <= STALE_AFTER_MS {
                t.total
            } else {
                t.marked = Some(end);
                STALE
            };
            out.entry(key.clone()).or_default().push((end, sample));
        }
    }

    /// Brings the carried totals up to everything stored before `from`:
    /// the first time, all of them; later, rows that came after their
    /// window was read. Counters only grow, so each field takes the larger.
    async fn reconcile(&mut self, source: &IstioSource, from: i64) -> Result<(), PromError> {
        let minute = from.div_euclid(60_000) * 60_000;
        let sql = format!(
            "SELECT {keys}, {values}, MAX(to_unixtime(time) + window_seconds) AS last_seen \
             FROM rollups WHERE (window_seconds = 60 AND time < {m}) \
             OR (window_seconds = 10 AND time >= {m} AND time < {f}) GROUP BY {groups}",
            keys = key_select(false),
            values = value_list(false, Hist::ALL),
            groups = key_positions(),
            m = ts(minute),
            f = ts(from),
        );
        let batches = source.sql(&sql).await?;
        let mut index = LabelIndex::new(None);
        let mut truth: Vec<(Aggs, i64)> = Vec::new();
        for batch in &batches {
            let keys = KeyColumns::new(batch)?;
            let aggs = AggColumns::new(batch, Hist::ALL)?;
            let seen = cast(column(batch, "last_seen")?, &DataType::Int64)
                .map_err(|e| PromError::Execution(format!("reading last_seen: {e}")))?;
            let seen = seen.as_primitive::<Int64Type>();
            for row in 0..batch.num_rows() {
                let i = index.index(&keys.key(row));
                if i == truth.len() {
                    truth.push((ZERO, i64::MIN));
                }
                add(&mut truth[i].0, &aggs.read(row));
                if seen.is_valid(row) {
                    truth[i].1 = truth[i].1.max(seen.value(row).saturating_mul(1000));
                }
            }
        }
        for (key, (total, seen)) in index.sets.into_iter().zip(truth) {
            match self.series.get_mut(&key) {
                Some(t) => {
                    for (a, b) in t.total.iter_mut().zip(&total) {
                        *a = a.max(*b);
                    }
                }
                // Quiet for longer than the lookback already: no marker
                // to send, nothing until it has requests again.
                None => {
                    let quiet = from - seen > STALE_AFTER_MS;
                    self.series.insert(
                        key,
                        Tracked {
                            total,
                            seen,
                            marked: quiet.then_some(i64::MIN),
                        },
                    );
                }
            }
        }
        self.reconciled = Some(from);
        Ok(())
    }
}

/// A batch's window starts, in µs whatever unit the scan gave them.
fn window_starts(
    batch: &RecordBatch,
) -> Result<arrow::array::PrimitiveArray<TimestampMicrosecondType>, PromError> {
    let times = cast(
        column(batch, "time")?,
        &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into())),
    )
    .map_err(|e| PromError::Execution(format!("reading window starts: {e}")))?;
    times
        .as_primitive_opt::<TimestampMicrosecondType>()
        .cloned()
        .ok_or_else(|| PromError::Execution("window starts have an unexpected type".into()))
}

#[cfg(test)]
mod export_tests {
    use super::*;

    fn key(route: &str) -> (Family, Labels) {
        (Family::Http, vec![("route".into(), route.into())])
    }

    fn requests(n: f64) -> Aggs {
        let mut a = ZERO;
        a[0] = n;
        a
    }

    /// Runs windows `[start, start + 10 s)` with `data`, returning each
    /// label set's (time, requests) samples.
    fn run(
        e: &mut IstioExport,
        start: i64,
        data: Vec<((Family, Labels), Aggs)>,
    ) -> BTreeMap<String, Vec<(i64, f64)>> {
        let mut out = HashMap::new();
        e.step(start, start + 10_000, data, &mut out);
        out.into_iter()
            .map(|((_, l), s)| {
                (
                    l[0].1.clone(),
                    s.into_iter().map(|(t, a)| (t, a[0])).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn a_read_keeps_only_the_histograms_it_asks_for() {
        let all = Layout::of(Hist::ALL);
        assert_eq!(all.width, WIDTH);
        assert_eq!(all.durations, Some(4));
        assert_eq!(all.request_sizes, Some(4 + BUCKETS));
        assert_eq!(all.response_sizes, Some(4 + BUCKETS + SIZES));
        let rates = Layout::of(Hist::default());
        assert_eq!(rates.width, 4);
        assert_eq!(rates.at(Field::DurationBuckets), None);
        let sizes = Layout::of(Hist {
            durations: false,
            sizes: true,
        });
        assert_eq!(sizes.request_sizes, Some(4));
        assert_eq!(sizes.width, 4 + 2 * SIZES);
        // A histogram's count is its +Inf bucket, wherever it sits.
        let mut row = vec![0.0; sizes.width];
        row[4 + 2 * SIZES - 1] = 7.0;
        assert_eq!(field_value(Field::ResponseSizeBuckets, &row, &sizes), 7.0);
    }

    #[test]
    fn series_are_born_at_zero_go_stale_once_and_come_back_with_their_total() {
        let mut e = IstioExport::default();
        // Born: a 0 at the window's start, then its total at the end.
        let got = run(&mut e, 0, vec![(key("a"), requests(3.0))]);
        assert_eq!(got["a"], [(0, 0.0), (10_000, 3.0)]);
        // Quiet: the same total every window for 5 minutes…
        for k in 1..=30 {
            let got = run(&mut e, k * 10_000, vec![]);
            assert_eq!(got["a"], [((k + 1) * 10_000, 3.0)], "window {k}");
        }
        // …then one marker, then nothing.
        let got = run(&mut e, 310_000, vec![]);
        assert_eq!(got["a"].len(), 1);
        assert!(super::super::eval::is_stale(got["a"][0].1));
        for k in 32..40 {
            assert!(run(&mut e, k * 10_000, vec![]).is_empty(), "window {k}");
        }
        // Back: its old total at the window's start, then the new one.
        let got = run(&mut e, 400_000, vec![(key("a"), requests(2.0))]);
        assert_eq!(got["a"], [(400_000, 3.0), (410_000, 5.0)]);
        // Requests in the window right after its marker: no sample at the
        // marker's own time (that would be a duplicate timestamp).
        let mut e = IstioExport::default();
        run(&mut e, 0, vec![(key("b"), requests(1.0))]);
        for k in 1..=31 {
            run(&mut e, k * 10_000, vec![]);
        }
        let got = run(&mut e, 320_000, vec![(key("b"), requests(1.0))]);
        assert_eq!(got["b"], [(330_000, 2.0)]);
    }
}
