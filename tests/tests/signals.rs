//! Every OTLP signal into its table: metrics and logs from the
//! OpenTelemetry Python SDK over gRPC and HTTP (gzip), zstd bodies, JSON,
//! and partial success when some items are bad.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use lumen_tests::{UpPorts, run_python, sql, sql_count, start_up, write_mesh};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::summary_data_point::ValueAtQuantile;
use opentelemetry_proto::tonic::metrics::v1::{
    Metric, ResourceMetrics, ScopeMetrics, Summary, SummaryDataPoint, metric,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

fn mesh(dir: &Path) -> Result<std::path::PathBuf> {
    let path = dir.join("mesh.yaml");
    write_mesh(&path, &[("reviews", 9080, &[])])?;
    Ok(path)
}

const PYTHON_SDK: &str = r#"
import sys, logging, grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import View, ExponentialBucketHistogramAggregation
from opentelemetry.metrics import Observation
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogs
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogs

service, grpc_endpoint, http_base, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
for transport, metrics_exporter, logs_exporter in (
    ("grpc",
     GrpcMetrics(endpoint=grpc_endpoint, insecure=True, compression=grpc.Compression.Gzip),
     GrpcLogs(endpoint=grpc_endpoint, insecure=True)),
    ("http",
     HttpMetrics(endpoint=http_base + "/v1/metrics", compression=HttpCompression.Gzip),
     HttpLogs(endpoint=http_base + "/v1/logs", compression=HttpCompression.Gzip)),
):
    resource = Resource.create({"service.name": service, "service.namespace": "shop",
                                "k8s.pod.name": "pod-" + transport, "team": "payments"})
    reader = PeriodicExportingMetricReader(metrics_exporter, export_interval_millis=3600000)
    provider = MeterProvider(resource=resource, metric_readers=[reader],
                             views=[View(instrument_name="latency_exp",
                                         aggregation=ExponentialBucketHistogramAggregation())])
    meter = provider.get_meter("py-metrics", "1.2")
    orders = meter.create_counter("orders", unit="1", description="orders placed")
    latency = meter.create_histogram("latency", unit="ms")
    latency_exp = meter.create_histogram("latency_exp", unit="ms")
    queue = meter.create_up_down_counter("queue_depth")
    meter.create_observable_gauge("temperature",
                                  callbacks=[lambda options: [Observation(21.5, {"room": "a"})]])
    for i in range(n):
        orders.add(1, {"transport": transport, "method": "card"})
        latency.record(i * 10.0, {"transport": transport})
        latency_exp.record(i + 1.0, {"transport": transport})
        queue.add(2)
        queue.add(-1)
    if not provider.force_flush(30000):
        sys.exit(transport + " metrics export did not finish")
    provider.shutdown()

    logs = LoggerProvider(resource=resource)
    logs.add_log_record_processor(BatchLogRecordProcessor(logs_exporter))
    log = logging.getLogger("py-" + transport)
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(LoggingHandler(level=logging.INFO, logger_provider=logs))
    for i in range(n):
        log.warning("order %d failed", i, extra={"order.id": i})
    if not logs.force_flush(30000):
        sys.exit(transport + " logs export did not finish")
    logs.shutdown()
print("ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_logs_from_the_opentelemetry_python_sdk_land_in_their_tables() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = mesh(dir.path())?;
    let ports = UpPorts::pick();
    let _up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, &[]).await?;
    let service = format!("py-{}", rand::random::<u32>());
    let n = rand::random_range(3..=12i64);
    let grpc = format!("http://127.0.0.1:{}", ports.otlp_grpc);
    let http = format!("http://127.0.0.1:{}", ports.otlp_http);
    let out = tokio::task::spawn_blocking({
        let service = service.clone();
        move || run_python(PYTHON_SDK, &[&service, &grpc, &http, &n.to_string()])
    })
    .await??;
    assert_eq!(out.trim(), "ok");

    let url = ports.sql_url();
    for transport in ["grpc", "http"] {
        let from = format!(
            "FROM metrics WHERE service_name = '{service}' AND service_namespace = 'shop' \
             AND k8s_pod_name = 'pod-{transport}' AND scope_name = 'py-metrics' AND scope_version = '1.2'"
        );
        // Cumulative points are sent at each collection (the flush, then the
        // shutdown): the latest says it all.
        // A cumulative monotonic sum, its attributes a map.
        let q = format!(
            "SELECT value, unit, description, aggregation_temporality AS t, is_monotonic AS m, \
             attributes['method'] AS method, resource_attributes {from} AND name = 'orders' \
             AND type = 'sum' AND attributes['transport'] = '{transport}' ORDER BY time DESC LIMIT 1"
        );
        let rows = sql(&url, &q).await?;
        assert_eq!(rows.len(), 1, "{transport}: {rows:?}");
        let r = &rows[0];
        assert_eq!(r["value"].as_f64(), Some(n as f64), "{r}");
        assert_eq!(
            (r["unit"].as_str(), r["description"].as_str()),
            (Some("1"), Some("orders placed"))
        );
        assert_eq!(
            (r["t"].as_str(), r["m"].as_bool()),
            (Some("cumulative"), Some(true))
        );
        assert_eq!(r["method"], "card");
        let others = r["resource_attributes"].as_str().unwrap_or_default();
        assert!(
            others.contains("\"team\":\"payments\"") && !others.contains("service.name"),
            "typed resource attributes have columns; the rest stay: {others}"
        );
        // An explicit-bucket histogram: count, sum, min, max, buckets.
        let q = format!(
            "SELECT count, sum, min, max, array_length(explicit_bounds) + 1 = array_length(bucket_counts) AS shaped \
             {from} AND name = 'latency' AND type = 'histogram' ORDER BY time DESC LIMIT 1"
        );
        let rows = sql(&url, &q).await?;
        assert_eq!(rows.len(), 1, "{transport}: {rows:?}");
        let r = &rows[0];
        let sum: f64 = (0..n).map(|i| i as f64 * 10.0).sum();
        assert_eq!(r["count"].as_i64(), Some(n));
        assert_eq!(r["sum"].as_f64(), Some(sum));
        assert_eq!(
            (r["min"].as_f64(), r["max"].as_f64()),
            (Some(0.0), Some((n - 1) as f64 * 10.0))
        );
        assert_eq!(r["shaped"], true);
        // Exponential histogram: its scale and buckets hold every value.
        let q = format!(
            "SELECT count, scale, CAST(zero_count + array_sum(positive_bucket_counts) AS BIGINT) AS held \
             {from} AND name = 'latency_exp' AND type = 'exponential_histogram' \
             ORDER BY time DESC LIMIT 1"
        );
        let rows = sql(&url, &q).await?;
        assert_eq!(rows.len(), 1, "{transport}: {rows:?}");
        assert_eq!(rows[0]["count"].as_i64(), Some(n));
        assert_eq!(rows[0]["held"].as_i64(), Some(n), "{rows:?}");
        assert!(rows[0]["scale"].is_i64());
        // A non-monotonic sum and a gauge.
        let q = format!(
            "SELECT count(DISTINCT name) AS n {from} AND name = 'queue_depth' AND type = 'sum' \
             AND NOT is_monotonic AND value = {n}"
        );
        assert_eq!(sql_count(&url, &q).await?, 1, "{transport}");
        let q = format!(
            "SELECT count(DISTINCT name) AS n {from} AND name = 'temperature' AND type = 'gauge' \
             AND value = 21.5 AND attributes['room'] = 'a' AND aggregation_temporality IS NULL"
        );
        assert_eq!(sql_count(&url, &q).await?, 1, "{transport}");

        // Logs: body, severity, scope (the logger's name), attributes.
        let q = format!(
            "SELECT count(*) AS n FROM logs WHERE service_name = '{service}' \
             AND k8s_pod_name = 'pod-{transport}' AND severity_text = 'WARN' AND severity_number = 13 \
             AND body LIKE 'order % failed' AND scope_name = 'py-{transport}' \
             AND attributes['order.id'] IS NOT NULL AND observed_time IS NOT NULL"
        );
        assert_eq!(sql_count(&url, &q).await?, n, "{transport}");
    }

    // The same metrics through PromQL, by their own names (Prometheus's
    // OTLP naming: unit and type suffixes, `job` from the resource).
    let job = format!("shop/{service}");
    for (expr, want) in [
        (
            format!("sum(orders_total{{job=\"{job}\"}})"),
            2.0 * n as f64,
        ),
        (
            format!("sum(orders{{job=\"{job}\",method=\"card\"}})"),
            2.0 * n as f64,
        ),
        (
            format!("sum(latency_milliseconds_count{{job=\"{job}\"}})"),
            2.0 * n as f64,
        ),
        (
            format!("sum(latency_bucket{{job=\"{job}\",le=\"+Inf\"}})"),
            2.0 * n as f64,
        ),
        // No attributes, and one process (the SDK's `service.instance.id`
        // is per process): one series, its `instance` that id.
        (
            format!("count(queue_depth{{job=\"{job}\",instance!=\"\"}})"),
            1.0,
        ),
        (format!("sum(queue_depth{{job=\"{job}\"}})"), n as f64),
        (
            format!("max(temperature{{job=\"{job}\",room=\"a\"}})"),
            21.5,
        ),
    ] {
        let q: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", &expr)
            .finish();
        let answer: serde_json::Value =
            reqwest::get(format!("http://127.0.0.1:{}/api/v1/query?{q}", ports.query))
                .await?
                .json()
                .await?;
        let got = answer["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok());
        assert_eq!(got, Some(want), "{expr}: {answer}");
    }
    Ok(())
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn kv(key: &str, v: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

fn logs(service: &str, records: Vec<LogRecord>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service)],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                log_records: records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn record(body: &str, span_id: Vec<u8>) -> LogRecord {
    LogRecord {
        time_unix_nano: now_nanos(),
        severity_number: 17,
        severity_text: "ERROR".into(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(body.into())),
        }),
        trace_id: vec![3; 16],
        span_id,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_items_are_left_out_as_partial_success_and_zstd_and_json_are_taken() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = mesh(dir.path())?;
    let ports = UpPorts::pick();
    let _up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, &[]).await?;
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", ports.otlp_http);
    let url = ports.sql_url();

    // zstd protobuf, one record of three bad (a 3-byte span id).
    let good = rand::random_range(2..=6usize);
    let mut records: Vec<_> = (0..good).map(|_| record("disk full", vec![4; 8])).collect();
    records.insert(1, record("bad ids", vec![1, 2, 3]));
    let body = zstd::encode_all(&logs("zstd-app", records).encode_to_vec()[..], 3)?;
    let resp = client
        .post(format!("{base}/v1/logs"))
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "zstd")
        .body(body)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let answer = ExportLogsServiceResponse::decode(resp.bytes().await?)?;
    let partial = answer.partial_success.expect("partial success");
    assert_eq!(partial.rejected_log_records, 1);
    assert!(
        partial
            .error_message
            .contains("resource_logs[0].scope_logs[0].log_records[1]")
            && partial.error_message.contains("span_id is 3 bytes"),
        "{}",
        partial.error_message
    );
    let q = "SELECT count(*) AS n FROM logs WHERE service_name = 'zstd-app' AND body = 'disk full' \
             AND severity_text = 'ERROR' AND trace_id IS NOT NULL AND span_id IS NOT NULL";
    assert_eq!(sql_count(&url, q).await?, good as i64);

    // OTLP/JSON metrics: a summary kept whole, and a metric with no name
    // rejected with its path.
    let summary = |name: &str| Metric {
        name: name.into(),
        data: Some(metric::Data::Summary(Summary {
            data_points: vec![SummaryDataPoint {
                time_unix_nano: now_nanos(),
                attributes: vec![kv("rpc.method", "Get")],
                count: 10,
                sum: 42.0,
                quantile_values: vec![
                    ValueAtQuantile {
                        quantile: 0.5,
                        value: 3.0,
                    },
                    ValueAtQuantile {
                        quantile: 0.99,
                        value: 9.5,
                    },
                ],
                ..Default::default()
            }],
        })),
        ..Default::default()
    };
    let req = ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "json-app")],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![summary("rpc_latency"), summary("")],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let resp = client
        .post(format!("{base}/v1/metrics"))
        .header("content-type", "application/json")
        .body(serde_json::to_string(&req)?)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let answer: serde_json::Value = resp.json().await?;
    assert_eq!(
        answer["partialSuccess"]["rejectedDataPoints"], 1,
        "{answer}"
    );
    let message = answer["partialSuccess"]["errorMessage"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("metrics[1].name"), "{message}");
    let rows = sql(
        &url,
        "SELECT count, sum, quantiles, quantile_values FROM metrics \
         WHERE service_name = 'json-app' AND name = 'rpc_latency' AND type = 'summary'",
    )
    .await?;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["count"], 10);
    assert_eq!(rows[0]["sum"], 42.0);
    assert_eq!(rows[0]["quantiles"], serde_json::json!([0.5, 0.99]));
    assert_eq!(rows[0]["quantile_values"], serde_json::json!([3.0, 9.5]));

    // Not decodable at all: 400 with the reason, nothing stored, and the
    // collector serves on.
    let resp = client
        .post(format!("{base}/v1/metrics"))
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "zstd")
        .body(&b"not zstd"[..])
        .send()
        .await?;
    assert_eq!(resp.status(), 400);
    let resp = client
        .post(format!("{base}/v1/logs"))
        .header("content-type", "application/x-protobuf")
        .body(&b"\xff\xff\xff"[..])
        .send()
        .await?;
    assert_eq!(resp.status(), 400);
    let q = "SELECT count(*) AS n FROM logs WHERE service_name = 'zstd-app'";
    assert_eq!(sql_count(&url, q).await?, good as i64);

    // Postgres has no map type: psql sees the attributes as JSON text.
    let out = std::process::Command::new(lumen_tests::peer_tool(
        "psql",
        "apt-get install -y postgresql-client",
    ))
    .args([
        "-X",
        "-A",
        "-t",
        "-h",
        "127.0.0.1",
        "-U",
        "lumen",
        "-d",
        "lumen",
        "-p",
    ])
    .arg(ports.pg.to_string())
    .args([
        "-c",
        "SELECT attributes FROM metrics WHERE service_name = 'json-app' LIMIT 1",
    ])
    .env("PGCONNECT_TIMEOUT", "10")
    .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"rpc.method":"Get"}"#
    );
    Ok(())
}
