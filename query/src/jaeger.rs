//! Jaeger's query API on the query port, in the JSON shapes the Jaeger UI
//! and Grafana's Jaeger data source read: services, operations, trace
//! search, one trace, and the service dependency graph.
//!
//! A trace joins the sidecars' records (`requests`: one client span from
//! the caller's sidecar, one server span from the callee's) and the apps'
//! own spans (`spans`), linked by their parent span ids. Every lookup is
//! SQL through the one query engine, with its limits.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::engine::{QueryEngine, QueryError};
use crate::format::Format;

pub fn router() -> Router<QueryEngine> {
    Router::new()
        .route("/api/services", get(services))
        .route(
            "/api/services/{service}/operations",
            get(service_operations),
        )
        .route("/api/operations", get(operations))
        .route("/api/traces", get(search))
        .route("/api/traces/{id}", get(trace))
        .route("/api/dependencies", get(dependencies))
}

/// Jaeger's envelope around every answer.
fn ok(data: Value, total: usize) -> Response {
    axum::Json(json!({ "data": data, "total": total, "limit": 0, "offset": 0, "errors": null }))
        .into_response()
}

fn fail(status: StatusCode, msg: String) -> Response {
    (
        status,
        axum::Json(json!({
            "data": null, "total": 0, "limit": 0, "offset": 0,
            "errors": [{ "code": status.as_u16(), "msg": msg }],
        })),
    )
        .into_response()
}

fn query_failed(e: QueryError) -> Response {
    let status = match &e {
        QueryError::Sql(_) | QueryError::ReadOnly(_) => StatusCode::BAD_REQUEST,
        QueryError::Busy(_) | QueryError::Timeout(_) | QueryError::Stopped(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    fail(status, e.to_string())
}

/// Rows of `sql` as JSON objects (ids as hex, as every Lumen answer).
async fn rows(engine: &QueryEngine, sql: &str, peer: SocketAddr) -> Result<Vec<Value>, QueryError> {
    let result = engine.execute(sql, &format!("jaeger {peer}")).await?;
    let bytes = Format::Json
        .encode(&result)
        .map_err(|e| QueryError::Internal(format!("cannot encode rows: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| QueryError::Internal(format!("cannot read rows: {e}")))
}

/// A numeric parameter: `default` when absent; when present it must parse
/// (and be positive, if asked), else the 400 saying it "must be {must}".
fn number<T>(
    p: &HashMap<String, String>,
    name: &str,
    must: &str,
    positive: bool,
    default: T,
) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + Default,
{
    match p.get(name).map(|v| v.parse::<T>()) {
        None => Ok(default),
        Some(Ok(v)) if !positive || v > T::default() => Ok(v),
        Some(_) => Err(format!("parameter '{name}' must be {must}")),
    }
}

fn params(q: Option<String>) -> HashMap<String, String> {
    form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .into_owned()
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The service a sidecar's record belongs to: the caller's for the
/// client side, the callee's for the server side.
const PROXY_SERVICE: &str =
    "CASE WHEN reporter = 'source' THEN source_service ELSE destination_service END";
/// A sidecar span's operation: method and path, as HTTP spans are named.
const PROXY_OPERATION: &str = "method || ' ' || path";

async fn services(
    State(engine): State<QueryEngine>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    let sql = format!(
        "SELECT DISTINCT CAST(s AS VARCHAR) AS s FROM (\
           SELECT {PROXY_SERVICE} AS s FROM rollups WHERE window_seconds = 10 \
           UNION ALL SELECT service_name AS s FROM spans) ORDER BY 1"
    );
    match rows(&engine, &sql, peer).await {
        Ok(r) => {
            let names: Vec<Value> = r.into_iter().filter_map(|r| r.get("s").cloned()).collect();
            let n = names.len();
            ok(Value::Array(names), n)
        }
        Err(e) => query_failed(e),
    }
}

/// Operations of `service`, with their span kind.
async fn operations_of(
    engine: &QueryEngine,
    service: &str,
    kind: Option<&str>,
    peer: SocketAddr,
) -> Result<Vec<(String, String)>, QueryError> {
    let s = quote(service);
    let sql = format!(
        "SELECT DISTINCT op, kind FROM (\
           SELECT {PROXY_OPERATION} AS op, CASE WHEN reporter = 'source' THEN 'client' ELSE 'server' END AS kind \
           FROM requests WHERE {PROXY_SERVICE} = {s} \
           UNION ALL SELECT CAST(name AS VARCHAR) AS op, CAST(kind AS VARCHAR) AS kind FROM spans WHERE service_name = {s}) \
         ORDER BY 1, 2"
    );
    let out = rows(engine, &sql, peer).await?;
    Ok(out
        .into_iter()
        .filter_map(|r| {
            let op = r.get("op")?.as_str()?.to_string();
            let k = r.get("kind")?.as_str()?.to_string();
            kind.is_none_or(|want| want == k).then_some((op, k))
        })
        .collect())
}

async fn service_operations(
    State(engine): State<QueryEngine>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(service): Path<String>,
) -> Response {
    match operations_of(&engine, &service, None, peer).await {
        Ok(ops) => {
            let mut names: Vec<String> = ops.into_iter().map(|(o, _)| o).collect();
            names.dedup();
            let n = names.len();
            ok(json!(names), n)
        }
        Err(e) => query_failed(e),
    }
}

async fn operations(
    State(engine): State<QueryEngine>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
) -> Response {
    let p = params(q);
    let Some(service) = p.get("service") else {
        return fail(
            StatusCode::BAD_REQUEST,
            "parameter 'service' is required".into(),
        );
    };
    match operations_of(
        &engine,
        service,
        p.get("spanKind").map(String::as_str),
        peer,
    )
    .await
    {
        Ok(ops) => {
            let data: Vec<Value> = ops
                .iter()
                .map(|(o, k)| json!({ "name": o, "spanKind": k }))
                .collect();
            let n = data.len();
            ok(Value::Array(data), n)
        }
        Err(e) => query_failed(e),
    }
}

/// A Go duration (`1.5s`, `100ms`, `2m30s`, `250us`) in microseconds.
pub fn parse_duration_us(s: &str) -> Option<i64> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..end].parse().ok()?;
        rest = &rest[end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "ns" => 0.001,
            "us" | "µs" => 1.0,
            "ms" => 1_000.0,
            "s" => 1_000_000.0,
            "m" => 60_000_000.0,
            "h" => 3_600_000_000.0,
            _ => return None,
        };
        total += number * factor;
        rest = &rest[unit_end..];
    }
    Some(total as i64)
}

/// SQL conditions for a tag filter on the sidecars' records; `None`
/// when no record can carry that tag.
fn proxy_tag(key: &str, value: &str) -> Option<String> {
    Some(match key {
        "http.status_code" | "http.response.status_code" => {
            format!("status = {}", value.parse::<i32>().ok()?)
        }
        "http.method" | "http.request.method" => format!("method = {}", quote(value)),
        "http.url" | "url.path" => format!("path = {}", quote(value)),
        "error" if value == "true" => "(status >= 500 OR status = 0)".into(),
        "error" => "(status < 500 AND status <> 0)".into(),
        "response_flags" | "lumen.response_flags" => format!("response_flags = {}", quote(value)),
        "lumen.route" => format!("route = {}", quote(value)),
        "span.kind" => match value {
            "client" => "reporter = 'source'".into(),
            "server" => "reporter = 'destination'".into(),
            _ => return None,
        },
        _ => return None,
    })
}

/// The same for apps' spans: attributes are a JSON object, matched as text.
fn app_tag(key: &str, value: &str) -> String {
    match key {
        "error" if value == "true" => "status_code = 'error'".into(),
        "span.kind" => format!("kind = {}", quote(value)),
        _ => {
            let string = serde_json::to_string(&json!({ key: value })).unwrap_or_default();
            let raw = format!(
                "{{{}:{}}}",
                serde_json::to_string(key).unwrap_or_default(),
                value
            );
            let inner = |j: &str| {
                j.trim_start_matches('{')
                    .trim_end_matches('}')
                    .replace('\'', "''")
            };
            format!(
                "(attributes LIKE '%{}%' OR attributes LIKE '%{}%')",
                inner(&string),
                inner(&raw)
            )
        }
    }
}

async fn search(
    State(engine): State<QueryEngine>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
) -> Response {
    let p = params(q);
    let Some(service) = p.get("service") else {
        return fail(
            StatusCode::BAD_REQUEST,
            "parameter 'service' is required".into(),
        );
    };
    let now_us = chrono::Utc::now().timestamp_micros();
    let lookback = p
        .get("lookback")
        .and_then(|l| parse_duration_us(l))
        .unwrap_or(3_600_000_000);
    let since_epoch = "microseconds since the epoch";
    let end = match number(&p, "end", since_epoch, false, now_us) {
        Ok(v) => v,
        Err(m) => return fail(StatusCode::BAD_REQUEST, m),
    };
    let start = match number(&p, "start", since_epoch, false, end - lookback) {
        Ok(v) => v,
        Err(m) => return fail(StatusCode::BAD_REQUEST, m),
    };
    let limit = match number(&p, "limit", "a positive number", true, 20usize) {
        Ok(v) => v.min(1500),
        Err(m) => return fail(StatusCode::BAD_REQUEST, m),
    };
    let mut duration = Vec::new();
    for (name, op) in [("minDuration", ">="), ("maxDuration", "<=")] {
        if let Some(d) = p.get(name) {
            match parse_duration_us(d) {
                Some(us) => duration.push(format!("duration_us {op} {us}")),
                None => {
                    return fail(
                        StatusCode::BAD_REQUEST,
                        format!("parameter '{name}': {d:?} is not a duration like 1.2s or 100ms"),
                    );
                }
            }
        }
    }
    let tags: BTreeMap<String, String> = match p.get("tags") {
        Some(t) => match serde_json::from_str::<BTreeMap<String, Value>>(t) {
            Ok(m) => m
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        v.as_str()
                            .map(String::from)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect(),
            Err(e) => {
                return fail(
                    StatusCode::BAD_REQUEST,
                    format!("parameter 'tags' must be a JSON object of strings: {e}"),
                );
            }
        },
        None => BTreeMap::new(),
    };
    let time =
        format!("time >= to_timestamp_micros({start}) AND time <= to_timestamp_micros({end})");
    let s = quote(service);
    let mut proxy = vec![time.clone(), format!("{PROXY_SERVICE} = {s}")];
    let mut app = vec![time, format!("service_name = {s}")];
    if let Some(op) = p.get("operation") {
        proxy.push(format!("{PROXY_OPERATION} = {}", quote(op)));
        app.push(format!("name = {}", quote(op)));
    }
    proxy.extend(duration.iter().cloned());
    app.extend(duration);
    for (k, v) in &tags {
        match proxy_tag(k, v) {
            Some(c) => proxy.push(c),
            None => proxy.push("false".into()),
        }
        app.push(app_tag(k, v));
    }
    let sql = format!(
        "SELECT encode(trace_id, 'hex') AS id, max(time) AS t FROM (\
           SELECT trace_id, time FROM requests WHERE {} \
           UNION ALL SELECT trace_id, time FROM spans WHERE {}) \
         GROUP BY 1 ORDER BY t DESC LIMIT {limit}",
        proxy.join(" AND "),
        app.join(" AND ")
    );
    let ids: Vec<String> = match rows(&engine, &sql, peer).await {
        Ok(r) => r
            .iter()
            .filter_map(|r| r.get("id")?.as_str().map(String::from))
            .collect(),
        Err(e) => return query_failed(e),
    };
    match traces(&engine, &ids, peer).await {
        Ok(t) => {
            let n = t.len();
            ok(Value::Array(t), n)
        }
        Err(e) => query_failed(e),
    }
}

/// A Jaeger trace id (16 or 32 hex digits) as 32 lower-case digits.
fn normalize_id(id: &str) -> Option<String> {
    let id = id.trim().to_ascii_lowercase();
    if id.is_empty() || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(format!("{id:0>32}"))
}

async fn trace(
    State(engine): State<QueryEngine>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
) -> Response {
    let Some(id) = normalize_id(&id) else {
        return fail(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a trace id (up to 32 hex digits)"),
        );
    };
    match traces(&engine, std::slice::from_ref(&id), peer).await {
        Ok(t) if t.is_empty() => fail(StatusCode::NOT_FOUND, "trace not found".into()),
        Ok(t) => ok(Value::Array(t), 1),
        Err(e) => query_failed(e),
    }
}

/// The traces with these ids (32 hex digits each), in the order given.
async fn traces(
    engine: &QueryEngine,
    ids: &[String],
    peer: SocketAddr,
) -> Result<Vec<Value>, QueryError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<String> = ids.iter().map(|i| format!("X'{i}'")).collect();
    let list = list.join(", ");
    let proxy = rows(
        engine,
        &format!(
            "SELECT encode(trace_id, 'hex') AS trace, encode(span_id, 'hex') AS span, \
             encode(parent_span_id, 'hex') AS parent, CAST(time AS BIGINT) AS start, duration_us, \
             reporter, source_service, source_workload, source_namespace, source_version, \
             destination_service, destination_workload, destination_namespace, destination_version, \
             protocol, method, authority, path, route, status, grpc_status, request_bytes, \
             response_bytes, retries, upstream_address, response_flags, mtls \
             FROM requests WHERE trace_id IN ({list})"
        ),
        peer,
    )
    .await?;
    let app = rows(
        engine,
        &format!(
            "SELECT encode(trace_id, 'hex') AS trace, encode(span_id, 'hex') AS span, \
             encode(parent_span_id, 'hex') AS parent, CAST(time AS BIGINT) AS start, duration_us, \
             service_name, name, kind, status_code, status_message, scope_name, attributes, \
             resource_attributes FROM spans WHERE trace_id IN ({list})"
        ),
        peer,
    )
    .await?;
    let mut by_trace: HashMap<String, TraceBuilder> = HashMap::new();
    for r in &proxy {
        if let Some(t) = r["trace"].as_str() {
            by_trace.entry(t.to_string()).or_default().proxy_span(r);
        }
    }
    for r in &app {
        if let Some(t) = r["trace"].as_str() {
            by_trace.entry(t.to_string()).or_default().app_span(r);
        }
    }
    Ok(ids
        .iter()
        .filter_map(|id| by_trace.remove(id).map(|b| b.finish(id)))
        .collect())
}

fn tag(key: &str, value: Value) -> Value {
    let kind = match &value {
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_i64() || n.is_u64() => "int64",
        Value::Number(_) => "float64",
        _ => "string",
    };
    let value = match value {
        Value::String(_) | Value::Bool(_) | Value::Number(_) => value,
        other => Value::String(other.to_string()),
    };
    json!({ "key": key, "type": kind, "value": value })
}

/// Tags from a JSON object of attributes.
fn tags_of(json_text: Option<&str>) -> Vec<Value> {
    let Some(Ok(Value::Object(map))) = json_text.map(serde_json::from_str::<Value>) else {
        return Vec::new();
    };
    map.into_iter().map(|(k, v)| tag(&k, v)).collect()
}

#[derive(Default)]
struct TraceBuilder {
    spans: Vec<Value>,
    /// Process (service + tags) → its id in this trace.
    processes: Vec<(String, Vec<Value>)>,
}

impl TraceBuilder {
    fn process(&mut self, service: &str, tags: Vec<Value>) -> String {
        let found = self
            .processes
            .iter()
            .position(|(s, t)| s == service && *t == tags);
        let i = match found {
            Some(i) => i,
            None => {
                self.processes.push((service.to_string(), tags));
                self.processes.len() - 1
            }
        };
        format!("p{}", i + 1)
    }

    fn span(&mut self, r: &Value, operation: String, tags: Vec<Value>, process: String) {
        let trace = r["trace"].as_str().unwrap_or_default();
        let references = match r["parent"].as_str() {
            Some(parent) => json!([{ "refType": "CHILD_OF", "traceID": trace, "spanID": parent }]),
            None => json!([]),
        };
        self.spans.push(json!({
            "traceID": trace,
            "spanID": r["span"],
            "operationName": operation,
            "references": references,
            "startTime": r["start"],
            "duration": r["duration_us"],
            "tags": tags,
            "logs": [],
            "processID": process,
            "warnings": null,
            "flags": 1,
        }));
    }

    fn proxy_span(&mut self, r: &Value) {
        let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
        let client = s("reporter") == "source";
        let side = if client { "source" } else { "destination" };
        let service = s(&format!("{side}_service"));
        let process = self.process(
            &service,
            vec![
                tag("lumen.workload", json!(s(&format!("{side}_workload")))),
                tag("lumen.namespace", json!(s(&format!("{side}_namespace")))),
                tag("lumen.version", json!(s(&format!("{side}_version")))),
            ],
        );
        let status = r["status"].as_i64().unwrap_or(0);
        let mut tags = vec![
            tag("span.kind", json!(if client { "client" } else { "server" })),
            tag("component", json!("lumen-proxy")),
            tag("http.method", json!(s("method"))),
            tag(
                "http.url",
                json!(format!("{}{}", s("authority"), s("path"))),
            ),
            tag("http.status_code", json!(status)),
            tag("http.protocol", json!(s("protocol"))),
            tag(
                "peer.service",
                json!(if client {
                    s("destination_service")
                } else {
                    s("source_service")
                }),
            ),
            tag("lumen.reporter", json!(s("reporter"))),
            tag("lumen.route", json!(s("route"))),
            tag("response_flags", json!(s("response_flags"))),
            tag("request_size", r["request_bytes"].clone()),
            tag("response_size", r["response_bytes"].clone()),
            tag("retries", r["retries"].clone()),
            tag("mtls", r["mtls"].clone()),
        ];
        if let Some(u) = r["upstream_address"].as_str() {
            tags.push(tag("upstream_address", json!(u)));
        }
        if let Some(g) = r["grpc_status"].as_i64() {
            tags.push(tag("grpc.status_code", json!(g)));
        }
        if status >= 500 || status == 0 {
            tags.push(tag("error", json!(true)));
        }
        let operation = format!("{} {}", s("method"), s("path"));
        self.span(r, operation, tags, process);
    }

    fn app_span(&mut self, r: &Value) {
        let service = r["service_name"]
            .as_str()
            .unwrap_or("unknown_service")
            .to_string();
        let process = self.process(&service, tags_of(r["resource_attributes"].as_str()));
        let mut tags = tags_of(r["attributes"].as_str());
        if let Some(kind) = r["kind"].as_str().filter(|k| *k != "unspecified") {
            tags.push(tag("span.kind", json!(kind)));
        }
        if let Some(scope) = r["scope_name"].as_str() {
            tags.push(tag("otel.scope.name", json!(scope)));
        }
        match r["status_code"].as_str() {
            Some("error") => {
                tags.push(tag("otel.status_code", json!("ERROR")));
                tags.push(tag("error", json!(true)));
                if let Some(m) = r["status_message"].as_str() {
                    tags.push(tag("otel.status_description", json!(m)));
                }
            }
            Some("ok") => tags.push(tag("otel.status_code", json!("OK"))),
            _ => {}
        }
        let operation = r["name"].as_str().unwrap_or_default().to_string();
        self.span(r, operation, tags, process);
    }

    fn finish(mut self, id: &str) -> Value {
        self.spans
            .sort_by_key(|s| s["startTime"].as_i64().unwrap_or(0));
        let processes: serde_json::Map<String, Value> = self
            .processes
            .into_iter()
            .enumerate()
            .map(|(i, (service, tags))| {
                (
                    format!("p{}", i + 1),
                    json!({ "serviceName": service, "tags": tags }),
                )
            })
            .collect();
        json!({ "traceID": id, "spans": self.spans, "processes": processes, "warnings": null })
    }
}

/// The service graph: calls between services in `(endTs - lookback, endTs]`
/// (milliseconds), from rollups. A call recorded by both sidecars counts
/// once (the callee's record); one seen only by the caller's sidecar (the
/// callee has none) counts from that record.
async fn dependencies(
    State(engine): State<QueryEngine>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
) -> Response {
    let p = params(q);
    let now = chrono::Utc::now().timestamp_millis();
    let end = match number(&p, "endTs", "milliseconds since the epoch", false, now) {
        Ok(v) => v,
        Err(m) => return fail(StatusCode::BAD_REQUEST, m),
    };
    let lookback = match number(
        &p,
        "lookback",
        "a positive number of milliseconds",
        true,
        86_400_000i64,
    ) {
        Ok(v) => v,
        Err(m) => return fail(StatusCode::BAD_REQUEST, m),
    };
    let sql = format!(
        "SELECT CAST(source_service AS VARCHAR) AS parent, CAST(destination_service AS VARCHAR) AS child, \
         CAST(reporter AS VARCHAR) AS reporter, sum(requests) AS calls FROM rollups \
         WHERE window_seconds = 10 AND time > to_timestamp_millis({start}) AND time <= to_timestamp_millis({end}) \
         GROUP BY 1, 2, 3",
        start = end - lookback
    );
    match rows(&engine, &sql, peer).await {
        Ok(r) => {
            let mut edges: BTreeMap<(String, String), (Option<i64>, Option<i64>)> = BTreeMap::new();
            for row in r {
                let (Some(parent), Some(child)) = (row["parent"].as_str(), row["child"].as_str())
                else {
                    continue;
                };
                let calls = row["calls"].as_i64().unwrap_or(0);
                let e = edges
                    .entry((parent.to_string(), child.to_string()))
                    .or_default();
                if row["reporter"] == "destination" {
                    e.1 = Some(calls);
                } else {
                    e.0 = Some(calls);
                }
            }
            let data: Vec<Value> = edges
                .into_iter()
                .map(|((parent, child), (by_source, by_destination))| {
                    json!({
                        "parent": parent,
                        "child": child,
                        "callCount": by_destination.or(by_source).unwrap_or(0),
                    })
                })
                .collect();
            let n = data.len();
            ok(Value::Array(data), n)
        }
        Err(e) => query_failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_are_read() {
        assert_eq!(parse_duration_us("1.5s"), Some(1_500_000));
        assert_eq!(parse_duration_us("100ms"), Some(100_000));
        assert_eq!(parse_duration_us("2m30s"), Some(150_000_000));
        assert_eq!(parse_duration_us("250us"), Some(250));
        assert_eq!(parse_duration_us("fast"), None);
    }

    #[test]
    fn trace_ids_are_padded_to_32_digits() {
        assert_eq!(
            normalize_id("ABC").as_deref(),
            Some("00000000000000000000000000000abc")
        );
        assert!(normalize_id("xyz").is_none());
    }
}
