//! Rollups as SQL users see them: per window they add up to exactly the raw
//! rows — also after a retried batch, `kill -9` and a flush to Parquet —
//! and their latency sketches answer quantiles within the stated 1 %.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use arrow_flight::FlightClient;
use lumen_core::sketch::RELATIVE_ACCURACY;
use lumen_core::{Reporter, RequestRecord, Workload};
use lumen_tests::flight::{self, client};
use lumen_tests::{UpPorts, sql, start_up, write_mesh};

fn workload(service: &str) -> Workload {
    Workload {
        service: service.into(),
        workload: format!("{service}-v1").into(),
        namespace: "default".into(),
        version: "v1".into(),
    }
}

/// Requests spread over the last few minutes (every window closed), of two
/// services, with latencies over four orders of magnitude and some errors.
fn traffic(n: usize) -> Vec<RequestRecord> {
    let now = SystemTime::now();
    (0..n)
        .map(|_| {
            let service = if rand::random_bool(0.6) {
                "reviews"
            } else {
                "ratings"
            };
            let status = *[200u16, 200, 200, 404, 503]
                .get(rand::random_range(0..5))
                .unwrap_or(&200);
            RequestRecord {
                start_time: now - Duration::from_millis(rand::random_range(150_000..330_000)),
                duration: Duration::from_micros(10f64.powf(rand::random_range(1.0..5.0)) as u64),
                reporter: if rand::random_bool(0.5) {
                    Reporter::Source
                } else {
                    Reporter::Destination
                },
                source: workload("productpage"),
                destination: workload(service),
                status,
                response_bytes: rand::random_range(0..5000),
                span_id: rand::random(),
                ..RequestRecord::example()
            }
        })
        .collect()
}

async fn put(client: &mut FlightClient, seq: u64, records: &[RequestRecord]) -> Result<()> {
    flight::put_records(client, [3; 16], seq, records).await
}

/// (window, reporter, service, status) → (requests, errors, bytes), from `rollups`.
async fn from_rollups(url: &str, window: i64) -> Result<BTreeMap<String, (i64, i64, i64)>> {
    let rows = sql(
        url,
        &format!(
            "SELECT CAST(time AS VARCHAR) AS t, reporter, destination_service AS s, status, \
             sum(requests) AS n, sum(errors) AS e, sum(response_bytes) AS b FROM rollups \
             WHERE window_seconds = {window} GROUP BY 1, 2, 3, 4"
        ),
    )
    .await?;
    Ok(keyed(&rows))
}

/// The same, counted from `requests`.
async fn from_rows(url: &str, window: i64) -> Result<BTreeMap<String, (i64, i64, i64)>> {
    let rows = sql(
        url,
        &format!(
            "SELECT CAST(date_bin(INTERVAL '{window} seconds', time) AS VARCHAR) AS t, reporter, \
             destination_service AS s, status, count(*) AS n, \
             sum(CASE WHEN status >= 500 OR status = 0 THEN 1 ELSE 0 END) AS e, \
             sum(response_bytes) AS b FROM requests GROUP BY 1, 2, 3, 4"
        ),
    )
    .await?;
    Ok(keyed(&rows))
}

fn keyed(rows: &[serde_json::Value]) -> BTreeMap<String, (i64, i64, i64)> {
    rows.iter()
        .map(|r| {
            (
                format!("{} {} {} {}", r["t"], r["reporter"], r["s"], r["status"]),
                (
                    r["n"].as_i64().unwrap_or(-1),
                    r["e"].as_i64().unwrap_or(-1),
                    r["b"].as_i64().unwrap_or(-1),
                ),
            )
        })
        .collect()
}

async fn check_windows(url: &str, sent: usize) -> Result<()> {
    for window in [10, 60] {
        let rolled = from_rollups(url, window).await?;
        let counted = from_rows(url, window).await?;
        let total: i64 = rolled.values().map(|v| v.0).sum();
        assert_eq!(
            total, sent as i64,
            "{window} s windows hold every request once"
        );
        assert_eq!(rolled, counted, "{window} s windows equal the raw rows");
    }
    Ok(())
}

async fn check_quantiles(url: &str, records: &[RequestRecord]) -> Result<()> {
    for service in ["reviews", "ratings"] {
        let mut exact: Vec<u64> = records
            .iter()
            .filter(|r| &*r.destination.service == service)
            .map(|r| r.duration.as_micros() as u64)
            .collect();
        exact.sort_unstable();
        for q in [0.5, 0.9, 0.99] {
            let rows = sql(
                url,
                &format!(
                    "SELECT sketch_quantile(sketch_merge(duration_sketch), {q}) AS v FROM rollups \
                     WHERE window_seconds = 10 AND destination_service = '{service}'"
                ),
            )
            .await?;
            let got = rows[0]["v"].as_f64().expect("a quantile");
            let want = exact[(q * (exact.len() - 1) as f64).floor() as usize] as f64;
            assert!(
                (got - want).abs() <= RELATIVE_ACCURACY * want + 1e-9,
                "{service} q{q}: sketch {got}, exact {want}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_add_up_to_the_raw_rows_and_their_quantiles_hold_their_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let mut up = start_up(dir.path(), &mesh, &data, ports, &[]).await?;
    let mut flight = client(&ports).await?;

    let records = traffic(rand::random_range(800..1500));
    let chunks: Vec<&[RequestRecord]> = records.chunks(200).collect();
    for (seq, chunk) in chunks.iter().enumerate() {
        put(&mut flight, seq as u64, chunk).await?;
    }
    // A retried batch counts once in the rollups as in the rows.
    put(&mut flight, 0, chunks[0]).await?;
    check_windows(&ports.sql_url(), records.len()).await?;
    check_quantiles(&ports.sql_url(), &records).await?;

    // Rebuilt from the WAL after kill -9…
    up.kill9()?;
    let ports = UpPorts::pick();
    let mut up = start_up(dir.path(), &mesh, &data, ports, &[]).await?;
    check_windows(&ports.sql_url(), records.len()).await?;
    // …and read from Parquet after a flush on shutdown.
    assert_eq!(up.terminate()?, 0, "{}", up.logs());
    let ports = UpPorts::pick();
    let mut up = start_up(dir.path(), &mesh, &data, ports, &[]).await?;
    let flushed = walk(&data.join("tables/rollups"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .count();
    assert!(flushed > 0, "rollups were flushed to Parquet on shutdown");
    check_windows(&ports.sql_url(), records.len()).await?;
    check_quantiles(&ports.sql_url(), &records).await?;
    up.terminate()?;
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// With `--rollup-max-values 3`, a fourth and fifth destination this hour
/// count under `other`: every request is still in the rollups, and the
/// folding is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_with_too_many_values_folds_the_rest_into_other() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let args = ["--rollup-max-values", "3"];
    let _up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, &args).await?;
    let services = ["a", "b", "c", "d", "e"];
    // Past the grace rollups give late records.
    let now = SystemTime::now() - Duration::from_secs(180);
    let records: Vec<RequestRecord> = services
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            (0..=i).map(move |_| RequestRecord {
                start_time: now,
                destination: workload(s),
                span_id: rand::random(),
                ..RequestRecord::example()
            })
        })
        .collect();
    put(&mut client(&ports).await?, 1, &records).await?;
    let rows = sql(
        &ports.sql_url(),
        "SELECT destination_service AS s, sum(requests) AS n FROM rollups \
         WHERE window_seconds = 10 GROUP BY 1 ORDER BY 1",
    )
    .await?;
    let got: BTreeMap<String, i64> = rows
        .iter()
        .map(|r| {
            (
                r["s"].as_str().unwrap_or("").to_string(),
                r["n"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    let want: BTreeMap<String, i64> = [("a", 1), ("b", 2), ("c", 3), ("other", 4 + 5)]
        .into_iter()
        .map(|(s, n)| (s.to_string(), n))
        .collect();
    assert_eq!(got, want);
    let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", ports.query))
        .await?
        .text()
        .await?;
    assert!(
        text.contains("lumen_rollup_folded_requests_total{label=\"destination_service\"} 9"),
        "{text}"
    );
    Ok(())
}
