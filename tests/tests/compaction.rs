//! Compaction and retention through the real `lumen up`: small files of a
//! partition become one, every row kept exactly once — also when the
//! process is killed with `kill -9` at any moment of it — and tables past
//! their retention lose whole partitions.

use std::time::Duration;

use anyhow::{Context, Result};
use lumen_tests::otlp::export;
use lumen_tests::{
    UpPorts, duckdb_count, metric, send_flushed, sql_count, start_up, wait_metric, write_mesh,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;

const COMPACT_FAST: [&str; 6] = [
    "--flush-interval",
    "300ms",
    "--compaction-interval",
    "1s",
    "--compaction-min-files",
    "3",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_are_compacted_and_rows_survive_kill_9_at_any_moment() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let mut up = start_up(dir.path(), &mesh, &data, ports, &COMPACT_FAST).await?;
    let url = ports.sql_url();
    let count = "SELECT count(*) AS n FROM spans WHERE service_name = 'compacted'";

    // Three files (--compaction-min-files) of the current hour become one.
    let mut sent = send_flushed(&ports, "compacted", 3).await?;
    let files = wait_metric(&ports, "lumen_table_files{table=\"spans\"}", |v| v == 1.0).await?;
    assert_eq!(files, 1.0, "three small files became one:\n{}", up.logs());
    assert!(metric(&ports, "lumen_compactions_total{outcome=\"ok\"}").await? >= 1.0);
    assert!(metric(&ports, "lumen_compacted_files_total").await? >= 3.0);
    assert_eq!(sql_count(&url, count).await?, sent);
    assert!(up.logs().contains("compacted partition"), "{}", up.logs());

    // Killed at a random moment — before, during or after a compaction —
    // and started again: every acknowledged row, once, for Lumen and for
    // DuckDB reading the files.
    let glob = format!("{}/tables/spans/date=*/hour=*/*.parquet", data.display());
    for round in 0..3 {
        sent += send_flushed(&ports, "compacted", 3).await?;
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..1500))).await;
        up.kill9()?;
        up = start_up(dir.path(), &mesh, &data, ports, &COMPACT_FAST)
            .await
            .with_context(|| format!("restart {round}"))?;
        assert_eq!(sql_count(&url, count).await?, sent, "round {round}");
    }
    // Stopped cleanly, everything is in Parquet, once.
    assert_eq!(up.terminate()?, 0, "{}", up.logs());
    assert_eq!(duckdb_count(&glob)?, sent);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_past_retention_are_dropped_and_others_kept() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let args = [
        "--flush-interval",
        "300ms",
        "--compaction-interval",
        "1s",
        "--retention",
        "spans=2h",
    ];
    let up = start_up(dir.path(), &mesh, &data, ports, &args).await?;
    // Spans of three hours ago (the collector keeps 30 days back) and of now.
    let mut client = TraceServiceClient::connect(ports.grpc_endpoint()).await?;
    let old = rand::random_range(1..=20usize);
    let mut req = export("old", old, 0);
    let shift = 3 * 3600 * 1_000_000_000u64;
    for rs in &mut req.resource_spans {
        for ss in &mut rs.scope_spans {
            for s in &mut ss.spans {
                s.start_time_unix_nano -= shift;
                s.end_time_unix_nano -= shift;
            }
        }
    }
    client.export(req).await?;
    let new = rand::random_range(1..=20usize);
    client.export(export("new", new, 0)).await?;
    let url = ports.sql_url();
    let expired = wait_metric(&ports, "lumen_retention_deleted_files_total", |v| v >= 1.0).await?;
    assert!(expired >= 1.0, "{}", up.logs());
    let q =
        |service: &str| format!("SELECT count(*) AS n FROM spans WHERE service_name = '{service}'");
    assert_eq!(sql_count(&url, &q("old")).await?, 0);
    assert_eq!(sql_count(&url, &q("new")).await?, new as i64);
    assert!(
        up.logs().contains("dropped partitions past retention"),
        "{}",
        up.logs()
    );

    // A bad retention is refused with the table's name.
    let out = std::process::Command::new(lumen_tests::lumen_bin())
        .args(["up", "--retention", "spams=1d", "-f"])
        .arg(&mesh)
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown table `spams`"), "{stderr}");
    Ok(())
}
