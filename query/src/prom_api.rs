//! Prometheus's HTTP API on the query port, in Prometheus's JSON shapes,
//! GET or form POST as Grafana sends them:
//! `/api/v1/query`, `/api/v1/query_range`, `/api/v1/series`,
//! `/api/v1/labels`, `/api/v1/label/{name}/values`, `/api/v1/metadata`,
//! `/api/v1/status/buildinfo`; and `/federate` for another Prometheus.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use promql_parser::parser::{Expr, VectorSelector};
use serde_json::{Value as Json, json};

use crate::engine::QueryEngine;
use crate::promql::eval::{DEFAULT_LOOKBACK, millis};
use crate::promql::istio::{self, IstioSource};
use crate::promql::value::{self, Labels, RawSeries, Steps, Value, format_number, format_time};
use crate::promql::{self, PromError, PromQuery};

pub fn router() -> Router<QueryEngine> {
    Router::new()
        .route("/api/v1/query", get(query).post(query))
        .route("/api/v1/query_range", get(query_range).post(query_range))
        .route("/api/v1/series", get(series).post(series))
        .route("/api/v1/labels", get(labels).post(labels))
        .route("/api/v1/label/{name}/values", get(label_values))
        .route("/api/v1/metadata", get(metadata))
        .route("/api/v1/status/buildinfo", get(buildinfo))
        .route("/federate", get(federate))
}

/// `/federate?match[]=…`: the latest sample of every series the selectors
/// match (within the 5 minute lookback), with its timestamp, in
/// Prometheus's text format — what another Prometheus scrapes with
/// `honor_labels: true` to federate Lumen's series.
async fn federate(
    State(engine): State<QueryEngine>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let params = Params::new(query, &headers, &[]);
    if params.all("match[]").is_empty() {
        return failure(PromError::BadData("no match[] parameter provided".into()));
    }
    let parsed = match selectors(&params) {
        Ok(p) => p,
        Err(e) => return failure(e),
    };
    let sources = promql::otlp::Sources {
        istio: IstioSource::new(engine.clone(), "federate".into()),
        otlp: promql::otlp::OtlpSource::new(engine.clone(), "federate".into()),
    };
    let now = now_ms();
    let ev = crate::promql::eval::Evaluator {
        source: &sources,
        query: Steps::instant(now),
        lookback: millis(&DEFAULT_LOOKBACK),
    };
    // Each series once, whichever selectors match it.
    let mut series: BTreeMap<String, BTreeMap<Labels, (f64, i64)>> = BTreeMap::new();
    for vs in &parsed {
        match ev.latest(vs, now).await {
            Ok(got) => {
                for (labels, v, t) in got {
                    let name = value::get(&labels, value::METRIC_NAME)
                        .unwrap_or("")
                        .to_string();
                    series.entry(name).or_default().insert(labels, (v, t));
                }
            }
            Err(e) => return failure(e),
        }
    }
    let mut out = String::new();
    for (name, members) in series {
        if !name.is_empty() {
            out.push_str(&format!("# TYPE {name} untyped\n"));
        }
        for (mut labels, (v, t)) in members {
            value::remove(&mut labels, value::METRIC_NAME);
            out.push_str(&name);
            crate::exposition::write_labels(&mut out, &labels);
            out.push_str(&format!(" {} {t}\n", format_number(v)));
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            crate::exposition::Exposition::Text.content_type(),
        )],
        out,
    )
        .into_response()
}

/// Parameters from the query string and, for a form POST, the body.
struct Params(Vec<(String, String)>);

impl Params {
    fn new(query: Option<String>, headers: &HeaderMap, body: &[u8]) -> Self {
        let mut all: Vec<(String, String)> =
            form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .into_owned()
                .collect();
        let form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if form {
            all.extend(form_urlencoded::parse(body).into_owned());
        }
        Params(all)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn time(&self, name: &str) -> Result<Option<i64>, PromError> {
        self.get(name)
            .map(|v| parse_time(v).map_err(|e| bad_param(name, &e)))
            .transpose()
    }

    fn duration(&self, name: &str) -> Result<Option<Duration>, PromError> {
        self.get(name)
            .map(|v| parse_duration(v).map_err(|e| bad_param(name, &e)))
            .transpose()
    }
}

fn bad_param(name: &str, why: &str) -> PromError {
    PromError::BadData(format!("invalid parameter \"{name}\": {why}"))
}

/// Unix seconds (with fractions) or RFC 3339, as Prometheus accepts.
fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(secs) = s.parse::<f64>() {
        if !secs.is_finite() {
            return Err(format!("cannot parse {s:?} to a valid timestamp"));
        }
        return Ok((secs * 1000.0).round() as i64);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|_| format!("cannot parse {s:?} to a valid timestamp"))
}

/// Seconds (with fractions) or a Prometheus duration (`1m30s`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return Err(format!("cannot parse {s:?} to a valid duration"));
        }
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("cannot parse {s:?} to a valid duration"));
    }
    promql_parser::util::parse_duration(s)
        .map_err(|_| format!("cannot parse {s:?} to a valid duration"))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn success(data: Json) -> Response {
    axum::Json(json!({ "status": "success", "data": data })).into_response()
}

fn failure(e: PromError) -> Response {
    match e {
        PromError::BadData(m) => crate::http::error(StatusCode::BAD_REQUEST, "bad_data", m),
        PromError::Execution(m) => {
            crate::http::error(StatusCode::UNPROCESSABLE_ENTITY, "execution", m)
        }
        PromError::Query(q) => crate::http::query_error(q),
    }
}

fn labels_json(labels: &Labels) -> Json {
    Json::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), Json::String(v.clone())))
            .collect(),
    )
}

fn sample(t: i64, v: f64) -> Json {
    json!([format_time(t), format_number(v)])
}

/// Lumen's own parameter `lumen_source`: `rollups` (the default) or
/// `raw` (the same series computed from `requests` rows).
fn raw_source(p: &Params) -> Result<bool, PromError> {
    match p.get("lumen_source") {
        None | Some("rollups") => Ok(false),
        Some("raw") => Ok(true),
        Some(other) => Err(bad_param(
            "lumen_source",
            &format!("{other:?} is neither \"rollups\" nor \"raw\""),
        )),
    }
}

fn lookback(p: &Params) -> Result<Duration, PromError> {
    Ok(p.duration("lookback_delta")?
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_LOOKBACK))
}

async fn query(
    State(engine): State<QueryEngine>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = Params::new(q, &headers, &body);
    let run = async {
        let expr = p
            .get("query")
            .ok_or_else(|| bad_param("query", "query is empty"))?;
        let t = p.time("time")?.unwrap_or_else(now_ms);
        let value = promql::evaluate(
            &engine,
            PromQuery {
                expr: expr.to_string(),
                steps: Steps::instant(t),
                lookback: lookback(&p)?,
                origin: format!("promql {peer}"),
                raw: raw_source(&p)?,
                cache: None,
            },
        )
        .await?;
        Ok::<_, PromError>(match value {
            Value::Scalar(v) => json!({ "resultType": "scalar", "result": sample(t, v[0]) }),
            Value::String(s) => json!({ "resultType": "string", "result": [format_time(t), s] }),
            Value::Vector(series) => json!({
                "resultType": "vector",
                "result": series.iter().filter_map(|s| s.values[0].map(|v| json!({
                    "metric": labels_json(&s.labels),
                    "value": sample(t, v),
                }))).collect::<Vec<_>>(),
            }),
            Value::Matrix(series) => json!({ "resultType": "matrix", "result": matrix(series) }),
        })
    };
    match run.await {
        Ok(data) => success(data),
        Err(e) => failure(e),
    }
}

fn matrix(mut series: Vec<RawSeries>) -> Vec<Json> {
    series.sort_by(|a, b| a.labels.cmp(&b.labels));
    series
        .iter()
        .map(|s| {
            json!({
                "metric": labels_json(&s.labels),
                "values": s.samples.iter().map(|(t, v)| sample(*t, *v)).collect::<Vec<_>>(),
            })
        })
        .collect()
}

async fn query_range(
    State(engine): State<QueryEngine>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = Params::new(q, &headers, &body);
    let run = async {
        let expr = p
            .get("query")
            .ok_or_else(|| bad_param("query", "query is empty"))?;
        let start = p
            .time("start")?
            .ok_or_else(|| bad_param("start", "missing"))?;
        let end = p.time("end")?.ok_or_else(|| bad_param("end", "missing"))?;
        if end < start {
            return Err(bad_param(
                "end",
                "end timestamp must not be before start time",
            ));
        }
        let step = p
            .duration("step")?
            .ok_or_else(|| bad_param("step", "missing"))?;
        let step = millis(&step);
        if step <= 0 {
            return Err(bad_param(
                "step",
                "zero or negative query resolution step widths are not accepted. Try a positive integer",
            ));
        }
        let steps = Steps { start, end, step };
        let value = promql::evaluate(
            &engine,
            PromQuery {
                expr: expr.to_string(),
                steps,
                lookback: lookback(&p)?,
                origin: format!("promql {peer}"),
                raw: raw_source(&p)?,
                cache: None,
            },
        )
        .await?;
        let series: Vec<RawSeries> = match value {
            Value::Scalar(v) => vec![RawSeries {
                labels: Vec::new(),
                samples: steps.times().zip(v).collect(),
            }],
            Value::Vector(series) => series
                .into_iter()
                .map(|s| RawSeries {
                    samples: steps
                        .times()
                        .zip(s.values)
                        .filter_map(|(t, v)| v.map(|v| (t, v)))
                        .collect(),
                    labels: s.labels,
                })
                .collect(),
            other => {
                return Err(PromError::BadData(format!(
                    "invalid expression type \"{}\" for range query, must be Scalar or instant Vector",
                    other.kind()
                )));
            }
        };
        Ok(json!({ "resultType": "matrix", "result": matrix(series) }))
    };
    match run.await {
        Ok(data) => success(data),
        Err(e) => failure(e),
    }
}

/// `match[]` selectors; none means every series.
fn selectors(p: &Params) -> Result<Vec<VectorSelector>, PromError> {
    let raw = p.all("match[]");
    if raw.is_empty() {
        return Ok(vec![VectorSelector::new(
            None,
            promql_parser::label::Matchers::empty(),
        )]);
    }
    raw.into_iter()
        .map(|m| match crate::promql::parse(m) {
            Ok(Expr::VectorSelector(vs)) => Ok(vs),
            Ok(_) => Err(bad_param(
                "match[]",
                &format!("{m:?} is not a series selector"),
            )),
            Err(e) => Err(bad_param("match[]", &e.to_string())),
        })
        .collect()
}

/// `start` and `end` of a metadata request; all of time by default.
fn span(p: &Params) -> Result<(i64, i64), PromError> {
    let start = p.time("start")?.unwrap_or(0);
    let end = p.time("end")?.unwrap_or_else(now_ms);
    Ok((start.saturating_sub(1), end))
}

async fn matching_series(
    engine: &QueryEngine,
    peer: SocketAddr,
    p: &Params,
) -> Result<Vec<Labels>, PromError> {
    let (from, to) = span(p)?;
    let origin = format!("prometheus api {peer}");
    let source = crate::promql::otlp::Sources {
        istio: IstioSource::new(engine.clone(), origin.clone()),
        otlp: crate::promql::otlp::OtlpSource::new(engine.clone(), origin),
    };
    let mut out: BTreeSet<Labels> = BTreeSet::new();
    for selector in selectors(p)? {
        out.extend(source.series(&selector, from, to).await?);
    }
    Ok(out.into_iter().collect())
}

async fn series(
    State(engine): State<QueryEngine>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = Params::new(q, &headers, &body);
    if p.all("match[]").is_empty() {
        return failure(PromError::BadData("no match[] parameter provided".into()));
    }
    match matching_series(&engine, peer, &p).await {
        Ok(s) => success(Json::Array(s.iter().map(labels_json).collect())),
        Err(e) => failure(e),
    }
}

async fn labels(
    State(engine): State<QueryEngine>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = Params::new(q, &headers, &body);
    match matching_series(&engine, peer, &p).await {
        Ok(s) => {
            let names: BTreeSet<&str> = s
                .iter()
                .flat_map(|l| l.iter().map(|(k, _)| k.as_str()))
                .collect();
            success(json!(names))
        }
        Err(e) => failure(e),
    }
}

async fn label_values(
    State(engine): State<QueryEngine>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let p = Params::new(q, &headers, &[]);
    match matching_series(&engine, peer, &p).await {
        Ok(s) => {
            let values: BTreeSet<&str> = s.iter().filter_map(|l| value::get(l, &name)).collect();
            success(json!(values))
        }
        Err(e) => failure(e),
    }
}

async fn metadata(RawQuery(q): RawQuery) -> Response {
    let p = Params::new(q, &HeaderMap::new(), &[]);
    let wanted = p.get("metric");
    let mut out: BTreeMap<&str, Json> = BTreeMap::new();
    let metas = istio::METRICS
        .iter()
        .map(|m| m.meta)
        .chain(std::iter::once(istio::BUILD_META));
    for (family, kind, help) in metas {
        if wanted.is_some_and(|w| w != family) {
            continue;
        }
        out.insert(family, json!([{ "type": kind, "help": help, "unit": "" }]));
    }
    success(json!(out))
}

async fn buildinfo() -> Response {
    // The Prometheus API level Lumen answers, so clients (Grafana) enable
    // what that version offers; `application` says who is answering.
    success(json!({
        "version": "2.53.0",
        "revision": concat!("lumen-", env!("CARGO_PKG_VERSION")),
        "branch": "main",
        "buildUser": "lumen",
        "buildDate": "",
        "goVersion": "",
        "application": "lumen",
    }))
}
