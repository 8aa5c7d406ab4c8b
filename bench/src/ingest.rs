//! Collector ingest with and without a runaway query beside it.
//!
//! One `lumen up`, two phases in one run: OTLP senders push request spans
//! as fast as they are acknowledged, first alone, then while a three-way
//! self cross join runs on the query service. The ratio of the two rates
//! says how much a heavy query takes from ingest.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lumen_tests::otlp::{proxy_span, request};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;

use crate::peers::{self, CollectorPorts, local};
use crate::procstat;

/// Three-way self cross join with an aggregate: billions of combinations.
pub const RUNAWAY: &str = "SELECT sum(length(a.path) + length(b.path) + length(c.path)) AS n \
                           FROM requests a, requests b, requests c";

pub struct Settings {
    pub duration: Duration,
    pub senders: usize,
    pub batch: usize,
    pub seed_rows: usize,
    /// More flags for `lumen up`.
    pub up_args: Vec<String>,
}

/// One phase's numbers.
pub struct Phase {
    pub label: &'static str,
    pub spans_per_s: f64,
    pub exports: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub failed: u64,
    /// Cores `lumen up` used during the phase.
    pub lumen_cores: f64,
    /// Whether the runaway was still running when the phase ended.
    pub runaway_running: Option<bool>,
}

pub fn run(lumen: &Path, dir: &Path, set: &Settings) -> Result<Vec<Phase>> {
    let ports = CollectorPorts::pick()?;
    let mesh = peers::write_mesh(dir, local(9), false)?;
    // No flush during the run (it would land in one phase only), and a
    // runaway that outlasts it.
    let mut args = vec![
        "--flush-interval",
        "1h",
        "--flush-rows",
        "100000000",
        "--max-hot-mib",
        "8192",
        "--query-timeout",
        "1h",
    ];
    args.extend(set.up_args.iter().map(String::as_str));
    let mut up = peers::start_collector(lumen, dir, &mesh, &ports, &args)?;
    let clk_tck = procstat::clock_ticks_per_sec();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let endpoint = format!("http://{}", local(ports.otlp_grpc));
        seed(&endpoint, set.seed_rows).await?;
        let mut phases = Vec::new();

        eprintln!("  ingest alone ({} s)", set.duration.as_secs());
        let before = procstat::cpu_ticks(up.pid())?;
        let mut p = load(&endpoint, set).await?;
        p.label = "ingest alone";
        p.lumen_cores = cores(
            procstat::cpu_ticks(up.pid())? - before,
            clk_tck,
            set.duration,
        );
        phases.push(p);

        eprintln!(
            "  ingest beside a runaway query ({} s)",
            set.duration.as_secs()
        );
        let query = format!("http://{}", local(ports.query));
        let http = reqwest::Client::new();
        let runaway = tokio::spawn({
            let (http, url) = (http.clone(), format!("{query}/api/v1/sql"));
            async move { http.post(url).body(RUNAWAY).send().await }
        });
        let id = wait_running(&http, &query).await?;
        let before = procstat::cpu_ticks(up.pid())?;
        let mut p = load(&endpoint, set).await?;
        p.label = "ingest beside a runaway query";
        p.lumen_cores = cores(
            procstat::cpu_ticks(up.pid())? - before,
            clk_tck,
            set.duration,
        );
        p.runaway_running = Some(running_ids(&http, &query).await?.contains(&id));
        http.delete(format!("{query}/api/v1/queries/{id}"))
            .send()
            .await?;
        let _ = tokio::time::timeout(Duration::from_secs(30), runaway).await;
        phases.push(p);
        anyhow::Ok(phases)
    });
    up.check_alive()?;
    result
}

fn cores(ticks: u64, clk_tck: u64, over: Duration) -> f64 {
    ticks as f64 / clk_tck as f64 / over.as_secs_f64()
}

/// The rows the runaway joins with themselves.
async fn seed(endpoint: &str, rows: usize) -> Result<()> {
    let mut client = TraceServiceClient::connect(endpoint.to_string())
        .await
        .context("connecting to the collector")?;
    for chunk in (0..rows).collect::<Vec<_>>().chunks(500) {
        let spans = chunk
            .iter()
            .map(|i| proxy_span(&format!("/reviews/{}", i % 50)))
            .collect();
        client.export(request("seed", vec![], spans)).await?;
    }
    Ok(())
}

/// Runs the senders for the phase; each sends its next export when the
/// last is acknowledged.
async fn load(endpoint: &str, set: &Settings) -> Result<Phase> {
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + set.duration;
    let mut tasks = Vec::new();
    for s in 0..set.senders {
        let mut client = TraceServiceClient::connect(endpoint.to_string()).await?;
        let (acked, failed, batch) = (acked.clone(), failed.clone(), set.batch);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            // Payloads are built ahead so the sender's CPU goes to sending.
            let payloads: Vec<_> = (0..8)
                .map(|k| {
                    let spans = (0..batch)
                        .map(|i| proxy_span(&format!("/bench/{s}/{}", (k * batch + i) % 100)))
                        .collect();
                    request("bench", vec![], spans)
                })
                .collect();
            let mut k = 0;
            while Instant::now() < deadline {
                let sent = Instant::now();
                match client.export(payloads[k % payloads.len()].clone()).await {
                    Ok(_) => {
                        acked.fetch_add(batch as u64, Ordering::Relaxed);
                        latencies.push(sent.elapsed());
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                k += 1;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await?);
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Ok(Phase {
        label: "",
        spans_per_s: acked.load(Ordering::Relaxed) as f64 / set.duration.as_secs_f64(),
        exports: latencies.len() as u64,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        failed: failed.load(Ordering::Relaxed),
        lumen_cores: 0.0,
        runaway_running: None,
    })
}

async fn running_ids(http: &reqwest::Client, query: &str) -> Result<Vec<String>> {
    let list: serde_json::Value = http
        .get(format!("{query}/api/v1/queries"))
        .send()
        .await?
        .json()
        .await?;
    Ok(list["queries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|q| q["state"] == "running")
        .filter_map(|q| q["id"].as_str().map(str::to_string))
        .collect())
}

async fn wait_running(http: &reqwest::Client, query: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(id) = running_ids(http, query).await?.into_iter().next() {
            return Ok(id);
        }
        if Instant::now() > deadline {
            bail!("the runaway query never showed up as running");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn render(command: &str, machine: &str, set: &Settings, phases: &[Phase]) -> String {
    let mut out = crate::report::header(
        "Lumen collector ingest beside a runaway query",
        command,
        &crate::report::now(),
        machine,
    );
    let w = &mut out;
    let _ = writeln!(
        w,
        "- load: {} OTLP/gRPC senders, {} request spans per export, each sending when the last \
         is acknowledged, {} s per phase; {} seed rows; runaway: `{RUNAWAY}`",
        set.senders,
        set.batch,
        set.duration.as_secs(),
        set.seed_rows
    );
    let up_args = if set.up_args.is_empty() {
        "defaults".to_string()
    } else {
        format!("`{}`", set.up_args.join(" "))
    };
    let _ = writeln!(w, "- lumen up query settings: {up_args}\n");
    let _ = writeln!(
        w,
        "| phase | spans acked/s | exports | p50 ms | p99 ms | failed | lumen cores |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|");
    for p in phases {
        let _ = writeln!(
            w,
            "| {} | {:.0} | {} | {:.1} | {:.1} | {} | {:.2} |",
            p.label, p.spans_per_s, p.exports, p.p50_ms, p.p99_ms, p.failed, p.lumen_cores
        );
    }
    if let [alone, beside] = phases {
        let _ = writeln!(
            w,
            "\nIngest beside the runaway / alone: **{:.2}** (goal ≥ 0.8).",
            beside.spans_per_s / alone.spans_per_s.max(1.0)
        );
        if beside.runaway_running == Some(false) {
            let _ = writeln!(
                w,
                "\nWarning: the runaway query was no longer running at the end of its phase."
            );
        }
    }
    out
}
