//! The collector as OTLP clients and Parquet readers see it: acknowledged
//! data survives `kill -9`, bad payloads are refused while it keeps serving,
//! the OpenTelemetry SDK's spans land in `spans`, DuckDB reads its files.

use std::path::Path;

use anyhow::Result;
use lumen_tests::otlp::export;
use lumen_tests::{UpPorts, duckdb_count, run_python, sql_count, start_up, write_mesh};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use prost::Message;

fn mesh(dir: &Path) -> Result<std::path::PathBuf> {
    let path = dir.join("mesh.yaml");
    write_mesh(&path, &[("reviews", 9080, &[])])?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_spans_survive_kill_9_and_land_in_parquet_duckdb_reads() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mesh = mesh(dir.path())?;
    let ports = UpPorts::pick();
    let mut up = start_up(dir.path(), &mesh, &data, ports, &[]).await?;

    let mut client = TraceServiceClient::connect(ports.grpc_endpoint()).await?;
    let (mut app_total, mut proxy_total) = (0i64, 0i64);
    for i in 0..rand::random_range(3..=12) {
        // Some exports carry no proxy spans, but the first always carries
        // some, so the `requests` files below always have rows to count.
        let (a, p) = (
            rand::random_range(1..=40usize),
            rand::random_range(usize::from(i == 0)..=5),
        );
        client.export(export("checkout", a, p)).await?;
        app_total += a as i64;
        proxy_total += p as i64;
    }
    let spans_q = "SELECT count(*) AS n FROM spans WHERE service_name = 'checkout'";
    let requests_q = "SELECT count(*) AS n FROM requests";
    // Acknowledged means queryable at once.
    assert_eq!(sql_count(&ports.sql_url(), spans_q).await?, app_total);
    assert_eq!(sql_count(&ports.sql_url(), requests_q).await?, proxy_total);

    up.kill9()?;
    let ports = UpPorts::pick();
    let mut up = start_up(dir.path(), &mesh, &data, ports, &[]).await?;
    assert_eq!(
        sql_count(&ports.sql_url(), spans_q).await?,
        app_total,
        "{}",
        up.logs()
    );
    assert_eq!(sql_count(&ports.sql_url(), requests_q).await?, proxy_total);

    // A graceful stop flushes the hot buffer to Parquet.
    assert_eq!(up.terminate()?, 0, "{}", up.logs());
    let spans_glob = format!("{}/tables/spans/date=*/hour=*/*.parquet", data.display());
    let requests_glob = format!("{}/tables/requests/date=*/hour=*/*.parquet", data.display());
    assert_eq!(duckdb_count(&spans_glob)?, app_total);
    assert_eq!(duckdb_count(&requests_glob)?, proxy_total);
    let dur = run_python(
        "import sys, duckdb\nprint(duckdb.connect().execute(f\"SELECT min(duration_us), max(duration_us), count(DISTINCT span_id) FROM read_parquet('{sys.argv[1]}')\").fetchone())",
        &[&spans_glob],
    )?;
    assert_eq!(dur.trim(), format!("(1500, 1500, {app_total})"));

    // Restarted again, the rows come from the files, once: the WAL was truncated.
    let ports = UpPorts::pick();
    let _up = start_up(dir.path(), &mesh, &data, ports, &[]).await?;
    assert_eq!(sql_count(&ports.sql_url(), spans_q).await?, app_total);
    assert_eq!(sql_count(&ports.sql_url(), requests_q).await?, proxy_total);
    // Time pruning keeps every row that matches and none that does not.
    let recent = "SELECT count(*) AS n FROM spans WHERE time > now() - INTERVAL '1 hour'";
    assert_eq!(sql_count(&ports.sql_url(), recent).await?, app_total);
    let old = "SELECT count(*) AS n FROM spans WHERE time < TIMESTAMP '2000-01-01T00:00:00Z'";
    assert_eq!(sql_count(&ports.sql_url(), old).await?, 0);
    Ok(())
}

async fn grpc_raw(port: u16, body: Vec<u8>) -> Result<String> {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<bytes::Bytes>>();
    let req = http::Request::post(format!(
        "http://127.0.0.1:{port}/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(Full::new(bytes::Bytes::from(body)))?;
    let resp = client.request(req).await?;
    let headers = resp.headers().clone();
    let trailers = resp.into_body().collect().await?.trailers().cloned();
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"))
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    Ok(status)
}

fn frame(msg: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_otlp_is_refused_and_the_collector_keeps_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = mesh(dir.path())?;
    let ports = UpPorts::pick();
    let limit = 64 * 1024;
    let _up = start_up(
        dir.path(),
        &mesh,
        &dir.path().join("data"),
        ports,
        &["--max-request-bytes", &limit.to_string()],
    )
    .await?;
    let garbage: Vec<u8> = (0..2000).map(|_| rand::random::<u8>()).collect();

    // gRPC: random bytes in a well-framed message → INVALID_ARGUMENT (3).
    assert_eq!(grpc_raw(ports.otlp_grpc, frame(&garbage)).await?, "3");
    // gRPC: a declared length over the limit → INVALID_ARGUMENT before reading it.
    let mut client = TraceServiceClient::connect(ports.grpc_endpoint()).await?;
    let big = export("big", 2000, 0);
    assert!(big.encoded_len() > limit);
    let err = client.export(big).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("exceeds the limit"), "{err}");
    // gRPC: a span with a 3-byte trace id beside a good one → OTLP's
    // partial success naming the field; the good span is kept.
    let mut bad = export("bad", 2, 0);
    bad.resource_spans[0].scope_spans[0].spans[0].trace_id = vec![1, 2, 3];
    let answer = client.export(bad).await?.into_inner();
    let partial = answer.partial_success.expect("partial success");
    assert_eq!(partial.rejected_spans, 1);
    assert!(
        partial
            .error_message
            .contains("resource_spans[0].scope_spans[0].spans[0].trace_id"),
        "{}",
        partial.error_message
    );

    // HTTP: random bytes, wrong content type, oversized, broken JSON.
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/v1/traces", ports.otlp_http);
    let post = |ct: &'static str, body: Vec<u8>| {
        http.post(&url).header("content-type", ct).body(body).send()
    };
    let r = post("application/x-protobuf", garbage.clone()).await?;
    assert_eq!(r.status(), 400);
    let r = post("text/plain", export("x", 1, 0).encode_to_vec()).await?;
    assert_eq!(r.status(), 415);
    assert!(r.text().await?.contains("Content-Type"));
    let r = post("application/x-protobuf", vec![0u8; limit + 1]).await?;
    assert_eq!(r.status(), 400);
    let r = post("application/json", b"{\"resourceSpans\": [".to_vec()).await?;
    assert_eq!(r.status(), 400);
    assert!(r.text().await?.contains("malformed"));

    // Still serving: valid payloads over both transports are stored.
    client.export(export("after", 3, 0)).await?;
    let r = post(
        "application/x-protobuf",
        export("after", 4, 0).encode_to_vec(),
    )
    .await?;
    assert_eq!(r.status(), 200);
    let q = "SELECT count(*) AS n FROM spans WHERE service_name = 'after'";
    assert_eq!(sql_count(&ports.sql_url(), q).await?, 7);
    let rejected = "SELECT count(*) AS n FROM spans WHERE service_name IN ('big', 'x')";
    assert_eq!(sql_count(&ports.sql_url(), rejected).await?, 0);
    let half = "SELECT count(*) AS n FROM spans WHERE service_name = 'bad'";
    assert_eq!(sql_count(&ports.sql_url(), half).await?, 1);
    Ok(())
}

/// A string attribute.
fn attr(key: &str, value: &str) -> opentelemetry_proto::tonic::common::v1::KeyValue {
    lumen_tests::otlp::kv(key, lumen_tests::otlp::s(value))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_and_attributes_past_their_limits_are_refused_with_the_protocols_error() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let mesh = mesh(dir.path())?;
    let ports = UpPorts::pick();
    let _up = start_up(
        dir.path(),
        &mesh,
        &dir.path().join("data"),
        ports,
        &[
            "--max-items-per-request",
            "100",
            "--max-attributes",
            "8",
            "--max-attribute-bytes",
            "1024",
        ],
    )
    .await?;
    // OTLP/gRPC: 101 spans in one request → INVALID_ARGUMENT, nothing kept.
    let mut client = TraceServiceClient::connect(ports.grpc_endpoint()).await?;
    let err = client.export(export("many", 101, 0)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(
        err.message()
            .contains("101 spans in one request; at most 100 are taken (--max-items-per-request)"),
        "{err}"
    );
    // OTLP/HTTP: a span with 9 attributes → 400 with a google.rpc.Status
    // naming the span.
    let mut wide = export("wide", 1, 0);
    wide.resource_spans[0].scope_spans[0].spans[0].attributes =
        (0..9).map(|i| attr(&format!("k{i}"), "v")).collect();
    let http = reqwest::Client::new();
    let r = http
        .post(format!("http://127.0.0.1:{}/v1/traces", ports.otlp_http))
        .header("content-type", "application/x-protobuf")
        .body(wide.encode_to_vec())
        .send()
        .await?;
    assert_eq!(r.status(), 400);
    let said = String::from_utf8_lossy(&r.bytes().await?).to_string();
    assert!(
        said.contains("resource_spans[0].scope_spans[0].spans[0] has 9 attributes; at most 8"),
        "{said}"
    );
    // OTLP/HTTP logs: a 2 KB attribute value → 400.
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    let logs = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            scope_logs: vec![ScopeLogs {
                log_records: vec![LogRecord {
                    time_unix_nano: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)?
                        .as_nanos() as u64,
                    attributes: vec![attr("stack", &"x".repeat(2000))],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let r = http
        .post(format!("http://127.0.0.1:{}/v1/logs", ports.otlp_http))
        .header("content-type", "application/x-protobuf")
        .body(logs.encode_to_vec())
        .send()
        .await?;
    assert_eq!(r.status(), 400);
    let said = String::from_utf8_lossy(&r.bytes().await?).to_string();
    assert!(
        said.contains("attribute \"stack\" has a value of"),
        "{said}"
    );
    // Flight DoPut: 101 rows in one batch → INVALID_ARGUMENT.
    let mut flight = lumen_tests::flight::client(&ports).await?;
    let records: Vec<lumen_core::RequestRecord> = (0..101)
        .map(|i| lumen_core::RequestRecord {
            start_time: std::time::SystemTime::now(),
            path: format!("/many/{i}"),
            span_id: rand::random(),
            ..lumen_core::RequestRecord::example()
        })
        .collect();
    let err = lumen_tests::flight::put_records(&mut flight, rand::random(), 1, &records)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("101 `requests` rows in one request"), "{err}");
    // Within the limits, all of it is stored.
    client.export(export("fits", 100, 0)).await?;
    lumen_tests::flight::put_records(&mut flight, rand::random(), 1, &records[..100]).await?;
    let q = "SELECT count(*) AS n FROM spans WHERE service_name IN ('fits', 'many', 'wide')";
    assert_eq!(sql_count(&ports.sql_url(), q).await?, 100);
    let q = "SELECT count(*) AS n FROM requests WHERE path LIKE '/many/%'";
    assert_eq!(sql_count(&ports.sql_url(), q).await?, 100);
    Ok(())
}

const PYTHON_SDK: &str = r#"
import sys
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

service, grpc_endpoint, http_endpoint, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
for transport, exporter in (("grpc", GrpcExporter(endpoint=grpc_endpoint, insecure=True)),
                            ("http", HttpExporter(endpoint=http_endpoint))):
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("py-test")
    for i in range(n):
        with tracer.start_as_current_span(f"parent-{transport}") as parent:
            parent.set_attribute("order.id", i)
            with tracer.start_as_current_span(f"child-{transport}"):
                pass
    if not provider.force_flush(30000):
        sys.exit(f"{transport} export did not finish")
    provider.shutdown()
print("ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_from_the_opentelemetry_python_sdk_land_in_spans() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = mesh(dir.path())?;
    let ports = UpPorts::pick();
    let _up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, &[]).await?;
    let service = format!("py-{}", rand::random::<u32>());
    let n = rand::random_range(3..=20);
    let grpc = format!("http://127.0.0.1:{}", ports.otlp_grpc);
    let http = format!("http://127.0.0.1:{}/v1/traces", ports.otlp_http);
    let out = tokio::task::spawn_blocking({
        let service = service.clone();
        move || run_python(PYTHON_SDK, &[&service, &grpc, &http, &n.to_string()])
    })
    .await??;
    assert_eq!(out.trim(), "ok");

    let url = ports.sql_url();
    for transport in ["grpc", "http"] {
        let q = format!(
            "SELECT count(*) AS n FROM spans WHERE service_name = '{service}' AND name = 'parent-{transport}' \
             AND kind = 'internal' AND attributes LIKE '%\"order.id\"%' AND scope_name = 'py-test'"
        );
        assert_eq!(sql_count(&url, &q).await?, n, "{transport}");
        // Every child points at its parent in the same trace.
        let q = format!(
            "SELECT count(*) AS n FROM spans c JOIN spans p ON c.parent_span_id = p.span_id AND c.trace_id = p.trace_id \
             WHERE c.name = 'child-{transport}' AND p.name = 'parent-{transport}' AND c.service_name = '{service}'"
        );
        assert_eq!(sql_count(&url, &q).await?, n, "{transport}");
    }
    let requests = "SELECT count(*) AS n FROM requests";
    assert_eq!(
        sql_count(&url, requests).await?,
        0,
        "SDK spans are not request records"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_even_when_clients_hold_connections_open() -> Result<()> {
    use std::io::Write;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mesh = mesh(dir.path())?;
    let ports = UpPorts::pick();
    let mut up = start_up(dir.path(), &mesh, &data, ports, &[]).await?;
    let n = rand::random_range(1..=30usize);
    let mut client = TraceServiceClient::connect(ports.grpc_endpoint()).await?;
    client.export(export("held", n, 0)).await?;

    // An HTTP/2 client that never answers GOAWAY nor hangs up, as a stopped
    // or wedged exporter would; and an idle keep-alive connection to the
    // SQL API.
    let mut grpc = std::net::TcpStream::connect(("127.0.0.1", ports.otlp_grpc))?;
    grpc.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")?;
    let mut query = std::net::TcpStream::connect(("127.0.0.1", ports.query))?;
    query.write_all(b"GET /ready HTTP/1.1\r\nHost: lumen\r\n\r\n")?;

    assert_eq!(up.terminate()?, 0, "{}", up.logs());
    assert!(
        up.logs().contains("still open"),
        "the held connection is named in the log:\n{}",
        up.logs()
    );
    let glob = format!("{}/tables/spans/date=*/hour=*/*.parquet", data.display());
    assert_eq!(duckdb_count(&glob)?, n as i64, "flushed on the way out");
    drop((grpc, query));
    Ok(())
}
