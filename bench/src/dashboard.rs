//! Dashboard queries over Lumen's own Parquet files: Lumen through its
//! HTTP SQL API against DuckDB and chDB reading the same files, in one
//! run; then the same dashboard as PromQL over rollups against PromQL
//! over the raw rows.
//!
//! Rows are generated (Bookinfo-like services, routes, statuses and
//! latencies spread over the last hour), sent to `lumen up` over Arrow
//! Flight as a sidecar sends them, flushed to Parquet, and `lumen up` is
//! restarted so every query reads files, not memory.

use std::fmt::Write as _;
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use arrow_flight::flight_service_client::FlightServiceClient;
use bytes::Bytes;
use lumen_core::schema::RequestBatchBuilder;
use lumen_core::{Reporter, RequestRecord, Workload};
use lumen_proxy::telemetry::export::Payload;
use lumen_proxy::telemetry::sink::Sink;
use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::peers::{self, CollectorPorts, local};
use crate::report;

pub struct Settings {
    pub rows: u64,
    pub runs: usize,
}

/// One dashboard query in each engine's dialect.
struct Query {
    name: &'static str,
    lumen: String,
    duckdb: String,
    chdb: String,
}

pub struct Timed {
    pub name: &'static str,
    /// Median seconds per engine: Lumen, DuckDB, chDB.
    pub lumen: f64,
    pub duckdb: f64,
    pub chdb: f64,
    pub rows: usize,
}

pub struct PromTimed {
    pub name: &'static str,
    pub rollups: f64,
    pub raw: f64,
    pub series: usize,
}

pub struct Measured {
    pub rows: u64,
    pub files: usize,
    pub load_s: f64,
    pub sql: Vec<Timed>,
    pub promql: Vec<PromTimed>,
}

const SERVICES: usize = 20;
const BATCH: usize = 8192;

fn workload(i: usize, version: usize) -> Workload {
    let service = format!("svc-{i:02}");
    Workload {
        workload: format!("{service}-v{version}").into(),
        service: service.into(),
        namespace: "default".into(),
        version: format!("v{version}").into(),
    }
}

/// Batch `seed` of `batches`, covering the hour before `end` in time
/// order as live traffic arrives (so a flush holds a stretch of time, and
/// rollups a window once).
fn batch(end: SystemTime, seed: u64, batches: u64) -> Result<arrow::record_batch::RecordBatch> {
    let mut b = RequestBatchBuilder::with_capacity(BATCH);
    let slot = 3_600_000_000 / batches.max(1);
    let from = end - Duration::from_secs(3600) + Duration::from_micros(seed * slot);
    for i in 0..BATCH {
        let k = seed.wrapping_mul(BATCH as u64).wrapping_add(i as u64);
        let dst = (k % SERVICES as u64) as usize;
        // A mesh's call graph is sparse: each service has two callers.
        let src = (dst + 1 + ((k / 7) % 2) as usize) % SERVICES;
        let roll: u32 = rand::random_range(0..1000);
        let status = match roll {
            0..20 => 503,
            20..50 => 404,
            _ => 200,
        };
        // Log-uniform latency: 50 µs to 5 s, a tail per service.
        let exp = rand::random_range(1.7..(4.5 + dst as f64 / 10.0));
        b.push(&RequestRecord {
            start_time: from + Duration::from_micros(rand::random_range(0..slot.max(1))),
            duration: Duration::from_micros(10f64.powf(exp) as u64),
            reporter: if k.is_multiple_of(2) {
                Reporter::Source
            } else {
                Reporter::Destination
            },
            source: workload(src, 1),
            destination: workload(dst, 1 + (k % 3) as usize),
            path: format!("/api/{dst}/{}", k % 50),
            authority: format!("svc-{dst:02}:8080"),
            status,
            request_bytes: rand::random_range(0..2_000),
            response_bytes: rand::random_range(100..20_000),
            trace_id: rand::random(),
            span_id: rand::random(),
            parent_span_id: Some(rand::random()),
            ..RequestRecord::example()
        });
    }
    Ok(b.finish()?)
}

/// Sends `rows` records over Arrow Flight with two senders.
async fn load(endpoint: &str, rows: u64, end: SystemTime) -> Result<()> {
    let batches = rows.div_ceil(BATCH as u64);
    let mut tasks = Vec::new();
    for sender in 0..2u64 {
        let endpoint = endpoint.to_string();
        tasks.push(tokio::spawn(async move {
            let sink = Sink::flight(&endpoint, Duration::from_secs(30), &Default::default())
                .map_err(anyhow::Error::msg)?;
            let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())?
                .connect()
                .await?;
            let mut client = FlightServiceClient::new(channel);
            let producer: [u8; 16] = rand::random();
            let mut seq = sender;
            while seq < batches {
                let data = batch(end, seq, batches)?;
                let mut id = producer.to_vec();
                id.extend_from_slice(&seq.to_le_bytes());
                let id = Bytes::from(id);
                let Payload::Flight(frames) =
                    sink.encode(&id, data).await.map_err(anyhow::Error::msg)?
                else {
                    bail!("the Flight sink encoded OTLP");
                };
                // Retried while the collector is busy flushing.
                loop {
                    let put = async {
                        let mut acks = client
                            .do_put(futures_util::stream::iter(frames.clone()))
                            .await?
                            .into_inner();
                        acks.message().await
                    };
                    match put.await {
                        Ok(Some(_)) => break,
                        _ => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
                seq += 2;
                if seq % 244 < 2 {
                    eprintln!("    {} of {rows} rows sent", (seq * BATCH as u64).min(rows));
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

fn parquet_rows(dir: &Path) -> Result<(u64, usize)> {
    let files = crate::storage::parquet_files(dir)?;
    let mut rows = 0;
    for f in &files {
        rows += SerializedFileReader::new(File::open(f)?)?
            .metadata()
            .file_metadata()
            .num_rows() as u64;
    }
    Ok((rows, files.len()))
}

fn queries(requests: &Path, hour_ago: &str) -> Vec<Query> {
    let glob = format!("{}/**/*.parquet", requests.display());
    let ch_glob = format!("{}/*/*/*.parquet", requests.display());
    let duck = format!("read_parquet('{glob}')");
    let ch = format!("file('{ch_glob}', Parquet)");
    let since_df = format!("time >= TIMESTAMP '{hour_ago}'");
    let since_duck = format!("time >= TIMESTAMPTZ '{hour_ago}'");
    let since_ch = format!("time >= parseDateTime64BestEffort('{hour_ago}', 6, 'UTC')");
    let q = |name, body: &str, df_extra: &str, duck_extra: &str, ch_extra: &str| Query {
        name,
        lumen: body
            .replace("{from}", "requests")
            .replace("{since}", &since_df)
            .replace("{x}", df_extra),
        duckdb: body
            .replace("{from}", &duck)
            .replace("{since}", &since_duck)
            .replace("{x}", duck_extra),
        chdb: body
            .replace("{from}", &ch)
            .replace("{since}", &since_ch)
            .replace("{x}", ch_extra),
    };
    let minute = (
        "date_trunc('minute', time)",
        "date_trunc('minute', time)",
        "toStartOfMinute(time)",
    );
    vec![
        q(
            "RED per service, 1 h",
            "SELECT destination_service, count(*) AS requests, sum(CASE WHEN status >= 500 THEN 1 ELSE 0 END) AS errors, avg(duration_us) AS avg_us FROM {from} WHERE reporter = 'destination' AND {since} GROUP BY destination_service ORDER BY destination_service",
            "",
            "",
            "",
        ),
        q(
            "p99 by route",
            "SELECT path, {x} AS p99_us FROM {from} WHERE reporter = 'destination' AND {since} GROUP BY path ORDER BY p99_us DESC LIMIT 20",
            "approx_percentile_cont(duration_us, 0.99)",
            "approx_quantile(duration_us, 0.99)",
            "quantile(0.99)(duration_us)",
        ),
        q(
            "top slow paths",
            "SELECT path, avg(duration_us) AS avg_us, count(*) AS n FROM {from} WHERE {since} GROUP BY path ORDER BY avg_us DESC LIMIT 10",
            "",
            "",
            "",
        ),
        q(
            "error ratio per minute and service",
            "SELECT {x} AS minute, destination_service, sum(CASE WHEN status >= 500 THEN 1 ELSE 0 END) * 1.0 / count(*) AS ratio FROM {from} WHERE reporter = 'destination' AND {since} GROUP BY 1, 2 ORDER BY 1, 2",
            minute.0,
            minute.1,
            minute.2,
        ),
        q(
            "service graph edges",
            "SELECT source_service, destination_service, count(*) AS calls, avg(duration_us) AS avg_us FROM {from} WHERE reporter = 'source' AND {since} GROUP BY 1, 2 ORDER BY 1, 2",
            "",
            "",
            "",
        ),
        q(
            "requests per minute per service",
            "SELECT {x} AS minute, destination_service, count(*) AS n FROM {from} WHERE {since} GROUP BY 1, 2 ORDER BY 1, 2",
            minute.0,
            minute.1,
            minute.2,
        ),
        q(
            "status code distribution",
            "SELECT status, count(*) AS n FROM {from} WHERE {since} GROUP BY status ORDER BY status",
            "",
            "",
            "",
        ),
        q(
            "bytes per service",
            "SELECT destination_service, sum(request_bytes) AS bytes_in, sum(response_bytes) AS bytes_out FROM {from} WHERE {since} GROUP BY 1 ORDER BY 1",
            "",
            "",
            "",
        ),
        q(
            "slowest requests with trace ids",
            "SELECT time, destination_service, path, duration_us, {x} AS trace FROM {from} WHERE {since} ORDER BY duration_us DESC LIMIT 20",
            "encode(trace_id, 'hex')",
            "hex(trace_id)",
            "hex(trace_id)",
        ),
    ]
}

/// The Python side: runs each query `runs` times in DuckDB and chDB
/// (after one warm-up), prints median seconds and row counts as JSON.
const PYTHON: &str = r#"
import json, statistics, sys, time
import duckdb, chdb
queries, runs = json.load(open(sys.argv[1])), int(sys.argv[2])
out = {}
con = duckdb.connect()
con.execute("SET threads = 2")
sess = chdb.session.Session()
def timed(run):
    run()
    times = []
    for _ in range(runs):
        t = time.perf_counter(); rows = run(); times.append(time.perf_counter() - t)
    return statistics.median(times), rows
for q in queries:
    d, dr = timed(lambda: len(con.execute(q["duckdb"]).fetchall()))
    c, cr = timed(lambda: len(sess.query(q["chdb"], "JSONEachRow").data().splitlines()))
    out[q["name"]] = {"duckdb": d, "duckdb_rows": dr, "chdb": c, "chdb_rows": cr}
print(json.dumps(out))
"#;

fn promql() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "request rate per service",
            r#"sum by (destination_service_name) (rate(istio_requests_total{reporter="destination"}[5m]))"#,
        ),
        (
            "p99 latency per service",
            r#"histogram_quantile(0.99, sum by (le, destination_service_name) (rate(istio_request_duration_milliseconds_bucket{reporter="destination"}[5m])))"#,
        ),
        (
            "error ratio per service",
            r#"sum by (destination_service_name) (rate(istio_requests_total{reporter="destination",response_code=~"5.."}[5m])) / sum by (destination_service_name) (rate(istio_requests_total{reporter="destination"}[5m]))"#,
        ),
        (
            "bytes out per service",
            r#"sum by (destination_service_name) (rate(istio_response_bytes_sum{reporter="destination"}[5m]))"#,
        ),
    ]
}

pub fn run(lumen: &Path, dir: &Path, set: &Settings) -> Result<Measured> {
    let ports = CollectorPorts::pick()?;
    let mesh = peers::write_mesh(dir, local(9), false)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let end = SystemTime::now();
    let requests = dir.join("lumen-data/tables/requests");

    eprintln!("  loading {} rows over Arrow Flight…", set.rows);
    let started = Instant::now();
    let load_s;
    {
        let mut up = peers::start_collector(
            lumen,
            dir,
            &mesh,
            &ports,
            &["--flush-interval", "5s", "--compaction-interval", "2s"],
        )?;
        rt.block_on(load(
            &format!("http://{}", local(ports.otlp_grpc)),
            set.rows,
            end,
        ))?;
        up.wait_within("every row in Parquet", Duration::from_secs(600), || {
            parquet_rows(&requests).is_ok_and(|(n, _)| n >= set.rows)
        })?;
        load_s = started.elapsed().as_secs_f64();
        // Compacted now, as an hour-old partition would be: a collector
        // compacting while queries are timed takes a core from them (it
        // added 20-60 ms to each query in earlier runs, run to run).
        eprintln!("  waiting for compaction to finish");
        let query = local(ports.query);
        let mut last = (f64::NAN, Instant::now());
        up.wait_within("compaction finished", Duration::from_secs(300), || {
            let done = crate::http::metric(query, "lumen_compactions_total{outcome=\"ok\"}");
            if done != last.0 {
                last = (done, Instant::now());
            }
            last.1.elapsed() > Duration::from_secs(6)
        })?;
        up.stop();
    }
    let (rows, files) = parquet_rows(&requests)?;
    eprintln!("  {rows} rows in {files} Parquet files ({load_s:.0} s)");

    let mut up = peers::start_collector(
        lumen,
        dir,
        &mesh,
        &ports,
        &[
            "--query-parallelism",
            "2",
            "--query-timeout",
            "600s",
            "--query-max-rows",
            "10000000",
            // Nothing but the queries runs while they are timed.
            "--compaction-interval",
            "0",
        ],
    )?;
    let base = format!("http://{}", local(ports.query));
    let hour_ago = chrono::DateTime::<chrono::Utc>::from(end - Duration::from_secs(3600))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let qs = queries(&requests, &hour_ago);
    let http = reqwest::Client::new();

    // Lumen: warm-up then `runs` timed runs each, through the HTTP API.
    let mut lumen_times = Vec::new();
    for q in &qs {
        eprintln!("  Lumen: {}", q.name);
        let mut times = Vec::new();
        let mut n = 0;
        for i in 0..=set.runs {
            let t = Instant::now();
            let resp = rt.block_on(
                http.post(format!("{base}/api/v1/sql"))
                    .body(q.lumen.clone())
                    .send(),
            )?;
            let status = resp.status();
            let body = rt.block_on(resp.text())?;
            if !status.is_success() {
                bail!("Lumen failed `{}`: {status} {body}", q.name);
            }
            if i > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
            n = serde_json::from_str::<Vec<serde_json::Value>>(&body)?.len();
        }
        lumen_times.push((report::median(&times), n));
    }

    // DuckDB and chDB on the same files.
    let spec: Vec<serde_json::Value> = qs
        .iter()
        .map(|q| serde_json::json!({ "name": q.name, "duckdb": q.duckdb, "chdb": q.chdb }))
        .collect();
    let spec_path = dir.join("queries.json");
    std::fs::write(&spec_path, serde_json::to_string(&spec)?)?;
    eprintln!("  DuckDB and chDB…");
    let out = std::process::Command::new("python3")
        .args(["-c", PYTHON])
        .arg(&spec_path)
        .arg(set.runs.to_string())
        .output()
        .context("running python3 (pip install duckdb chdb)")?;
    if !out.status.success() {
        bail!(
            "DuckDB / chDB run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // chDB may print before the script's one JSON line: take the last.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("{}");
    let peers_out: serde_json::Value = serde_json::from_str(last)
        .with_context(|| format!("reading the DuckDB / chDB results: {stdout}"))?;
    let mut sql = Vec::new();
    for (q, (lumen_s, n)) in qs.iter().zip(lumen_times) {
        let p = &peers_out[q.name];
        let (dr, cr) = (
            p["duckdb_rows"].as_u64().unwrap_or(0) as usize,
            p["chdb_rows"].as_u64().unwrap_or(0) as usize,
        );
        if dr != n || cr != n {
            eprintln!(
                "  warning: {}: rows Lumen {n}, DuckDB {dr}, chDB {cr}",
                q.name
            );
        }
        sql.push(Timed {
            name: q.name,
            lumen: lumen_s,
            duckdb: p["duckdb"].as_f64().unwrap_or(f64::NAN),
            chdb: p["chdb"].as_f64().unwrap_or(f64::NAN),
            rows: n,
        });
    }

    // The dashboard as PromQL: rollups vs raw rows, an hour at 1 min steps.
    let end_s = end.duration_since(UNIX_EPOCH)?.as_secs() / 60 * 60;
    let mut prom = Vec::new();
    for (name, expr) in promql() {
        eprintln!("  PromQL: {name}");
        let timed = |source: &str| -> Result<(f64, usize)> {
            let mut times = Vec::new();
            let mut series = 0;
            for i in 0..=set.runs {
                let t = Instant::now();
                let resp = rt.block_on(
                    http.post(format!("{base}/api/v1/query_range"))
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(
                            form_urlencoded::Serializer::new(String::new())
                                .append_pair("query", expr)
                                .append_pair("start", &(end_s - 3600).to_string())
                                .append_pair("end", &end_s.to_string())
                                .append_pair("step", "60")
                                .append_pair("lumen_source", source)
                                .finish(),
                        )
                        .send(),
                )?;
                let body: serde_json::Value = rt.block_on(resp.json())?;
                if body["status"] != "success" {
                    bail!("PromQL `{name}` ({source}) failed: {body}");
                }
                if i > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
                series = body["data"]["result"].as_array().map_or(0, Vec::len);
            }
            Ok((report::median(&times), series))
        };
        let (rollups, series) = timed("rollups")?;
        let (raw, raw_series) = timed("raw")?;
        if raw_series != series {
            eprintln!(
                "  warning: {name}: {series} series from rollups, {raw_series} from raw rows"
            );
        }
        prom.push(PromTimed {
            name,
            rollups,
            raw,
            series,
        });
    }
    up.check_alive()?;
    Ok(Measured {
        rows,
        files,
        load_s,
        sql,
        promql: prom,
    })
}

pub fn render(command: &str, machine: &str, set: &Settings, m: &Measured) -> String {
    let mut s = report::header(
        "Lumen dashboard query benchmark",
        command,
        &report::now(),
        machine,
    );
    let _ = writeln!(
        s,
        "- data: {} generated `requests` rows (20 services with two callers each, 3 versions, 50 routes each, over one hour, sent in time order as live traffic) in {} of Lumen's Parquet files, loaded over Arrow Flight in {:.0} s",
        m.rows, m.files, m.load_s
    );
    let _ = writeln!(
        s,
        "- Lumen: `lumen up --query-parallelism 2` on the compacted files (compaction off while timing), SQL through `POST /api/v1/sql` (JSON answer, HTTP included); DuckDB (`threads = 2`) and chDB in-process from Python, reading the same files; median of {} runs after one warm-up\n",
        set.runs
    );
    let _ = writeln!(
        s,
        "| query | rows | Lumen s | DuckDB s | chDB s | Lumen / DuckDB | Lumen / chDB |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    for t in &m.sql {
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.2}× | {:.2}× |",
            t.name,
            t.rows,
            t.lumen,
            t.duckdb,
            t.chdb,
            t.lumen / t.duckdb,
            t.lumen / t.chdb
        );
    }
    let _ = writeln!(
        s,
        "\n## The same dashboard as PromQL (1 h range, 1 min step)\n"
    );
    let _ = writeln!(
        s,
        "| panel | series | rollups s | raw rows s | raw / rollups |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    for p in &m.promql {
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.3} | {:.1}× |",
            p.name,
            p.series,
            p.rollups,
            p.raw,
            p.raw / p.rollups
        );
    }
    s
}
