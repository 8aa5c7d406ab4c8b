//! Several collectors on one S3 bucket (moto's server on loopback), through
//! the real `lumen up`: each writes its Parquet files under its own prefix,
//! each one's queries read every collector's rows exactly once — while they
//! compact, and after one is killed with `kill -9` — and an independent
//! reader (pyarrow's S3 filesystem, queried by DuckDB) reads the same files.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use lumen_tests::otlp::export;
use lumen_tests::s3::{ACCESS_KEY, Moto, REGION, SECRET_KEY};
use lumen_tests::{
    LumenProcess, UpPorts, clear_of_hour_boundary, metric, run_python, send_flushed, sql_count,
    start_up, wait_for_count, wait_metric, write_mesh,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;

const BUCKET: &str = "lumen-test";
const PREFIX: &str = "mesh";

async fn start_collector(
    dir: &Path,
    moto: &Moto,
    id: &str,
    ports: UpPorts,
) -> Result<LumenProcess> {
    let mesh = dir.join("mesh.yaml");
    if !mesh.exists() {
        write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    }
    let mut args: Vec<String> = [
        "--store",
        &format!("s3://{BUCKET}/{PREFIX}"),
        "--collector-id",
        id,
        "--store-refresh",
        "300ms",
        "--store-delete-grace",
        // Longer than the waits below between `b`'s compaction (soon
        // after its third flush) and the check that its replaced files
        // are still there: under the whole test run's load those waits
        // took over 5 s.
        "15s",
        "--flush-interval",
        "300ms",
        "--compaction-interval",
        "1s",
        "--compaction-min-files",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(moto.store_options());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    start_up(dir, &mesh, &dir.join(format!("data-{id}")), ports, &args)
        .await
        .with_context(|| format!("starting collector {id}"))
}

fn count_of(service: &str) -> String {
    format!("SELECT count(*) AS n FROM spans WHERE service_name = '{service}'")
}

/// Spans files under a collector's prefix.
async fn span_files(moto: &Moto, id: &str) -> Result<Vec<String>> {
    Ok(moto
        .keys(BUCKET, &format!("{PREFIX}/{id}/spans/"))
        .await?
        .into_iter()
        .filter(|k| k.ends_with(".parquet"))
        .collect())
}

/// Rows per service as DuckDB counts them in the bucket's `spans` files,
/// found and read by pyarrow's S3 filesystem.
fn duckdb_counts(moto: &Moto) -> Result<serde_json::Value> {
    let script = r#"
import json, sys, duckdb
import pyarrow.dataset as ds
import pyarrow.fs as pafs
endpoint, key, secret, region, root = sys.argv[1:6]
s3 = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key=key,
                       secret_key=secret, region=region)
files = [f.path for f in s3.get_file_info(pafs.FileSelector(root, recursive=True))
         if "/spans/" in f.path and f.path.endswith(".parquet")]
spans = ds.dataset(files, filesystem=s3, format="parquet")
rows = duckdb.connect().execute(
    "SELECT service_name, count(*) FROM spans GROUP BY 1 ORDER BY 1").fetchall()
print(json.dumps({name: n for name, n in rows}))
"#;
    let out = run_python(
        script,
        &[
            &format!("127.0.0.1:{}", moto.port),
            ACCESS_KEY,
            SECRET_KEY,
            REGION,
            &format!("{BUCKET}/{PREFIX}"),
        ],
    )?;
    Ok(serde_json::from_str(out.trim())?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_share_one_bucket_and_each_reads_both() -> Result<()> {
    // Each collector's three flushes must land in one hour partition to be
    // compacted together.
    clear_of_hour_boundary(Duration::from_secs(120)).await;
    let dir = tempfile::tempdir()?;
    let moto = Moto::start(BUCKET).await?;
    let (pa, pb) = (UpPorts::pick(), UpPorts::pick());
    let mut a = start_collector(dir.path(), &moto, "a", pa).await?;
    let b = start_collector(dir.path(), &moto, "b", pb).await?;

    // A third collector given `a`'s id (another data directory) is refused
    // rather than sharing, and deleting from, `a`'s prefix.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere)?;
    let refused = start_collector(&elsewhere, &moto, "a", UpPorts::pick())
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(
        refused.contains("belongs to another collector"),
        "a second collector with id a started: {refused}"
    );

    // Each collector takes its own apps' spans (three flushes each, which
    // --compaction-min-files then merges)…
    let mut sent_a = send_flushed(&pa, "alpha", 3).await?;
    let sent_b = send_flushed(&pb, "beta", 3).await?;

    // … writes them under its own prefix, Hive-style …
    let files_a = span_files(&moto, "a").await?;
    assert!(!files_a.is_empty(), "{}", a.logs());
    for key in &files_a {
        let parts: Vec<&str> = key.split('/').collect();
        assert!(
            parts.len() == 6
                && parts[..3] == [PREFIX, "a", "spans"]
                && parts[3].starts_with("date=")
                && parts[4].starts_with("hour=")
                && parts[5].starts_with("part-"),
            "{key}"
        );
    }
    assert!(!span_files(&moto, "b").await?.is_empty(), "{}", b.logs());

    // … and each one's queries read the other's files too.
    assert_eq!(
        wait_for_count(&pa.sql_url(), &count_of("beta"), sent_b).await?,
        sent_b,
        "a reads b's rows:\n{}",
        a.logs()
    );
    assert_eq!(
        wait_for_count(&pb.sql_url(), &count_of("alpha"), sent_a).await?,
        sent_a,
        "b reads a's rows:\n{}",
        b.logs()
    );

    assert_eq!(
        metric(
            &pa,
            "lumen_table_rows{table=\"spans\",tier=\"other_collectors\"}"
        )
        .await?,
        sent_b as f64
    );

    // Compaction merges each collector's three files; replaced files stay
    // for the delete grace (15 s), yet no query counts a row twice meanwhile.
    for (ports, who) in [(&pa, "a"), (&pb, "b")] {
        let done = wait_metric(ports, "lumen_compactions_total{outcome=\"ok\"}", |v| {
            v >= 1.0
        })
        .await?;
        assert!(done >= 1.0, "{who} compacted");
    }
    assert!(
        span_files(&moto, "b").await?.len() > 1,
        "the replaced files are still in the bucket during the grace"
    );
    for _ in 0..12 {
        assert_eq!(sql_count(&pa.sql_url(), &count_of("beta")).await?, sent_b);
        assert_eq!(sql_count(&pb.sql_url(), &count_of("alpha")).await?, sent_a);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // After the grace, only the merged files are left in the bucket.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while span_files(&moto, "b").await?.len() > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(span_files(&moto, "b").await?.len(), 1, "{}", b.logs());

    // An independent reader of the bucket sees every row once.
    let counts = duckdb_counts(&moto)?;
    assert_eq!(counts["beta"], sent_b, "{counts}");

    // The query service alone (no ingest) reads both collectors' files.
    let qp = UpPorts::pick();
    let mut args: Vec<String> = vec![
        "query".into(),
        "--store".into(),
        format!("s3://{BUCKET}/{PREFIX}"),
        "--store-refresh".into(),
        "300ms".into(),
    ];
    args.extend(moto.store_options());
    for (flag, port) in [
        ("--query-addr", qp.query),
        ("--pg-addr", qp.pg),
        ("--flight-sql-addr", qp.flight_sql),
    ] {
        args.extend([flag.to_string(), format!("127.0.0.1:{port}")]);
    }
    let mut query = LumenProcess::spawn("lumen-query", dir.path(), &args)?;
    query
        .wait_ready(&format!("http://127.0.0.1:{}/ready", qp.query))
        .await?;
    for (service, sent) in [("alpha", sent_a), ("beta", sent_b)] {
        assert_eq!(
            wait_for_count(&qp.sql_url(), &count_of(service), sent).await?,
            sent,
            "lumen query reads {service}:\n{}",
            query.logs()
        );
    }

    // `a` killed: rows it had not flushed come back from its local WAL, and
    // it reads `b`'s files again after the restart.
    let mut client = TraceServiceClient::connect(pa.grpc_endpoint()).await?;
    client.export(export("alpha", 7, 0)).await?;
    sent_a += 7;
    a.kill9()?;
    let mut a = start_collector(dir.path(), &moto, "a", pa).await?;
    assert_eq!(sql_count(&pa.sql_url(), &count_of("alpha")).await?, sent_a);
    assert_eq!(
        wait_for_count(&pa.sql_url(), &count_of("beta"), sent_b).await?,
        sent_b
    );
    assert_eq!(
        wait_for_count(&pb.sql_url(), &count_of("alpha"), sent_a).await?,
        sent_a,
        "b reads what a wrote since its restart"
    );

    assert_eq!(
        wait_for_count(&qp.sql_url(), &count_of("alpha"), sent_a).await?,
        sent_a,
        "lumen query reads what a flushed since its restart"
    );
    assert_eq!(query.terminate()?, 0, "{}", query.logs());

    // Stopped cleanly, everything is in the bucket, once.
    assert_eq!(a.terminate()?, 0, "{}", a.logs());
    let counts = duckdb_counts(&moto)?;
    assert_eq!(
        (counts["alpha"].as_i64(), counts["beta"].as_i64()),
        (Some(sent_a), Some(sent_b)),
        "{counts}"
    );
    Ok(())
}
