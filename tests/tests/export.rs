//! Export fan-out: one `lumen up` forwards what it stores to another
//! (standing in for Jaeger or Tempo) over OTLP — apps' spans, proxies'
//! records as spans, metrics, logs — and with that endpoint down its own
//! ingest goes on unaffected while drops are counted.

use anyhow::Result;
use lumen_core::RequestRecord;
use lumen_tests::flight::{client as flight_client, put_records};
use lumen_tests::otlp::export;
use lumen_tests::{UpPorts, metric, sql_count, start_up, wait_for_count, wait_metric, write_mesh};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;

fn logs(service: &str, n: usize) -> ExportLogsServiceRequest {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "service.name".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue(service.into())),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                log_records: (0..n)
                    .map(|i| LogRecord {
                        time_unix_nano: now,
                        severity_number: 9,
                        body: Some(AnyValue {
                            value: Some(any_value::Value::StringValue(format!("line {i}"))),
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_collector_stores_reaches_another_and_a_dead_endpoint_costs_ingest_nothing()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let (front, back) = (UpPorts::pick(), UpPorts::pick());
    let back_dir = dir.path().join("back");
    std::fs::create_dir_all(&back_dir)?;
    let mut jaeger = start_up(&back_dir, &mesh, &back_dir.join("data"), back, &[]).await?;
    let target = back.grpc_endpoint();
    let args = [
        "--export-otlp",
        target.as_str(),
        "--export-retry-for",
        "1s",
        "--export-queue-mib",
        "1",
    ];
    let _up = start_up(dir.path(), &mesh, &dir.path().join("data"), front, &args).await?;

    // Apps' spans and proxy spans over OTLP, proxies' records over Arrow
    // Flight, and logs.
    let (app, proxy) = (rand::random_range(1..=30), rand::random_range(1..=30));
    let mut traces = TraceServiceClient::connect(front.grpc_endpoint()).await?;
    traces.export(export("shop", app, proxy)).await?;
    let flight_rows = rand::random_range(1..=50usize);
    let records: Vec<RequestRecord> = (0..flight_rows)
        .map(|_| RequestRecord {
            span_id: rand::random(),
            start_time: std::time::SystemTime::now(),
            ..RequestRecord::example()
        })
        .collect();
    put_records(
        &mut flight_client(&front).await?,
        rand::random(),
        1,
        &records,
    )
    .await?;
    let lines = rand::random_range(1..=20);
    LogsServiceClient::connect(front.grpc_endpoint())
        .await?
        .export(logs("shop", lines))
        .await?;

    let url = back.sql_url();
    let q = "SELECT count(*) AS n FROM spans WHERE service_name = 'shop'";
    assert_eq!(wait_for_count(&url, q, app as i64).await?, app as i64);
    let q = "SELECT count(*) AS n FROM requests";
    let want = (proxy + flight_rows) as i64;
    assert_eq!(
        wait_for_count(&url, q, want).await?,
        want,
        "records, as spans"
    );
    let q = "SELECT count(*) AS n FROM logs WHERE service_name = 'shop'";
    assert_eq!(wait_for_count(&url, q, lines as i64).await?, lines as i64);
    // The forwarded records are the same records: same trace ids.
    let same = "SELECT count(*) AS n FROM requests WHERE destination_service = 'reviews'";
    assert_eq!(
        sql_count(&url, same).await?,
        sql_count(&front.sql_url(), same).await?
    );
    let sent = "lumen_export_items_total{endpoint=\"".to_string() + &target;
    assert!(
        metric(
            &front,
            &format!("{sent}\",signal=\"traces\",outcome=\"sent\"}}")
        )
        .await?
            >= (app + proxy + flight_rows) as f64
    );

    // The endpoint goes away: ingest takes and keeps everything; what
    // cannot be forwarded is dropped and counted.
    jaeger.kill9()?;
    for _ in 0..20 {
        traces.export(export("after", 50, 0)).await?;
    }
    let q = "SELECT count(*) AS n FROM spans WHERE service_name = 'after'";
    assert_eq!(sql_count(&front.sql_url(), q).await?, 1000);
    let dropped = format!("{sent}\",signal=\"traces\",outcome=\"dropped_retries_exhausted\"}}");
    assert!(
        wait_metric(&front, &dropped, |v| v > 0.0).await? > 0.0,
        "drops are counted"
    );
    Ok(())
}
