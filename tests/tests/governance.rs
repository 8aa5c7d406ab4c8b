//! No query can stall ingest, the API or shutdown. Each test runs `lumen up`
//! with a runaway or memory-hungry query and checks what its users see:
//! an independent OTLP sender keeps being acknowledged, `/ready` and other
//! queries answer, the runaway ends at its limit and stops burning CPU,
//! memory stays bounded, Ctrl-C works, and queries can be listed and
//! cancelled. Time bounds are generous liveness bounds, not performance
//! assertions.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lumen_tests::otlp::{proxy_span, request};
use lumen_tests::{LumenProcess, UpPorts, figures_of, sql_count, start_up, write_mesh};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use serde_json::Value;
use tokio::sync::watch;

/// Three-way self cross join with an aggregate over it: with 1,500 rows,
/// 3.4 billion combinations, and nothing short-circuits.
const RUNAWAY: &str = "SELECT sum(length(a.path) + length(b.path) + length(c.path)) AS n \
                       FROM requests a, requests b, requests c";

/// Each group's array would hold 27,000 strings of 11 kB: 15 GB in all.
/// (DataFusion's memory pool sees an operator's state, not the values an
/// expression builds for one batch while it evaluates: 1,000 copies keep
/// that transient near 90 MB for 8,192 rows, so the bound below is tight.)
const MEMORY_HOG: &str = "SELECT a.path, cardinality(array_agg(repeat(a.path, 1000))) AS n \
                          FROM requests a JOIN requests b ON a.path = b.path \
                          JOIN requests c ON b.path = c.path GROUP BY a.path";

/// Longest wait for an acknowledgement, `/ready` or a small query while a
/// heavy query runs: generous, since a debug build on a shared machine is slow.
const LIVE: Duration = Duration::from_secs(10);

async fn up(dir: &Path, extra: &[&str]) -> Result<(LumenProcess, UpPorts)> {
    let mesh = dir.join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let process = start_up(dir, &mesh, &dir.join("data"), ports, extra).await?;
    Ok((process, ports))
}

/// Stores `n` request rows (paths spread over 50 values); returns once acknowledged.
async fn seed(ports: UpPorts, n: usize) -> Result<()> {
    let mut client = TraceServiceClient::connect(ports.grpc_endpoint()).await?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let spans = chunk
            .iter()
            .map(|i| proxy_span(&format!("/reviews/{}", i % 50)))
            .collect();
        client.export(request("seed", vec![], spans)).await?;
    }
    Ok(())
}

/// An independent OTLP sender: one export of 10 request spans every 100 ms
/// on its own connection, each of which must be acknowledged within [`LIVE`].
struct Sender {
    stop: watch::Sender<bool>,
    acked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Result<usize>>,
}

impl Sender {
    async fn start(ports: UpPorts) -> Result<Sender> {
        let mut client = TraceServiceClient::connect(ports.grpc_endpoint()).await?;
        let (stop, mut stopped) = watch::channel(false);
        let acked = Arc::new(AtomicUsize::new(0));
        let count = acked.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !*stopped.borrow() {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let spans = (0..10).map(|_| proxy_span("/live")).collect();
                let sent = Instant::now();
                match tokio::time::timeout(LIVE, client.export(request("sender", vec![], spans)))
                    .await
                {
                    Ok(Ok(_)) => count.fetch_add(1, Ordering::Relaxed),
                    Ok(Err(status)) => bail!("export refused after {:?}: {status}", sent.elapsed()),
                    Err(_) => bail!("export not acknowledged within {LIVE:?}"),
                };
            }
            Ok(count.load(Ordering::Relaxed))
        });
        Ok(Sender { stop, acked, task })
    }

    fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    /// Stops sending; fails if any export went unacknowledged.
    async fn finish(self) -> Result<usize> {
        let _ = self.stop.send(true);
        self.task.await?
    }
}

/// `/ready` of the query service and of the collector, and a count on a
/// new connection, each answer within [`LIVE`].
async fn still_serving(ports: UpPorts) -> Result<()> {
    let http = reqwest::Client::builder().timeout(LIVE).build()?;
    for url in [
        format!("http://127.0.0.1:{}/ready", ports.query),
        format!("http://127.0.0.1:{}/ready", ports.otlp_http),
    ] {
        let r = http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        if !r.status().is_success() {
            bail!("GET {url}: {}", r.status());
        }
    }
    let r = http
        .post(ports.sql_url())
        .body("SELECT count(*) AS n FROM requests")
        .send()
        .await
        .context("SELECT count(*) while the heavy query runs")?;
    if !r.status().is_success() {
        bail!("SELECT count(*): {} {}", r.status(), r.text().await?);
    }
    Ok(())
}

/// The answer to a query: status, `Retry-After`, JSON body.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
    took: Duration,
}

impl Answer {
    fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or_default()
    }
}

async fn query(ports: UpPorts, sql: impl Into<String>) -> Result<Answer> {
    let sql = sql.into();
    let started = Instant::now();
    // A client of its own: a connection of its own, as another user's.
    let r = reqwest::Client::new()
        .post(ports.sql_url())
        .body(sql)
        .send()
        .await?;
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = r.json().await?;
    Ok(Answer {
        status,
        retry_after,
        body,
        took: started.elapsed(),
    })
}

async fn running_queries(ports: UpPorts) -> Result<Vec<Value>> {
    let body: Value = reqwest::get(format!("http://127.0.0.1:{}/api/v1/queries", ports.query))
        .await?
        .json()
        .await?;
    Ok(body["queries"].as_array().cloned().unwrap_or_default())
}

/// Waits until a query with this SQL is listed in `state`; returns its entry.
async fn wait_listed(ports: UpPorts, sql: &str, state: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(q) = running_queries(ports)
            .await?
            .into_iter()
            .find(|q| q["sql"] == sql && q["state"] == state)
        {
            return Ok(q);
        }
        if Instant::now() > deadline {
            bail!(
                "`{sql}` not listed as {state}: {:?}",
                running_queries(ports).await?
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// While `heavy` runs, checks that ingest, health and other queries carry on.
async fn serving_beside(
    ports: UpPorts,
    heavy: &tokio::task::JoinHandle<Result<Answer>>,
) -> Result<()> {
    let sender = Sender::start(ports).await?;
    let mut checks = 0;
    while !heavy.is_finished() && checks < 6 {
        still_serving(ports).await?;
        checks += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let before = sender.acked();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = sender.finish().await?;
    assert!(
        checks > 0,
        "the heavy query ended before anything was checked"
    );
    assert!(acked > before, "exports kept being acknowledged");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_query_times_out_and_stops_burning_cpu_while_ingest_and_health_carry_on()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let (lumen, ports) = up(dir.path(), &["--query-timeout", "6s"]).await?;
    seed(ports, 1500).await?;

    let heavy = tokio::spawn(query(ports, RUNAWAY));
    wait_listed(ports, RUNAWAY, "running").await?;
    serving_beside(ports, &heavy).await?;

    let answer = heavy.await??;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.body["errorType"], "timeout", "{}", answer.body);
    assert!(
        answer.error().contains("time limit of 6s"),
        "{}",
        answer.body
    );
    assert!(answer.took >= Duration::from_secs(6), "{:?}", answer.took);

    // Its work has ended: nothing listed, and the process idles.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !running_queries(ports).await?.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            running_queries(ports).await?
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = figures_of(lumen.pid())?.cpu_seconds;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = figures_of(lumen.pid())?.cpu_seconds - before;
    // A query still running would use about 3 s of a query thread here.
    assert!(used < 1.0, "{used:.2} s of CPU in 3 s after the timeout");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hungry_queries_spill_then_hit_their_limits_and_memory_stays_bounded() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let (lumen, ports) = up(
        dir.path(),
        &[
            "--query-memory-mib",
            "64",
            "--query-memory-budget-mib",
            "128",
            "--query-spill-mib",
            "256",
            // Memory an expression builds per batch is not pooled and grows
            // with partitions; one keeps the bound independent of the cores.
            "--query-parallelism",
            "1",
        ],
    )
    .await?;
    seed(ports, 1500).await?;
    let baseline = figures_of(lumen.pid())?.resident_bytes as u64;
    let pid = lumen.pid();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (stop_sampling, stopped) = watch::channel(false);
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            while !*stopped.borrow() {
                peak.fetch_max(figures_of(pid)?.resident_bytes as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(())
        }
    });

    // Grouped aggregation can spill: it does, until the spill limit.
    let heavy = tokio::spawn(query(ports, MEMORY_HOG));
    serving_beside(ports, &heavy).await?;
    let answer = heavy.await??;
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert_eq!(answer.body["errorType"], "execution", "{}", answer.body);
    assert!(
        answer
            .error()
            .contains("spilled more than its limit of 256 MiB"),
        "{}",
        answer.body
    );

    eprintln!(
        "RSS peak during the spilling query: {} MiB",
        peak.swap(0, Ordering::Relaxed) >> 20
    );
    // An aggregate over everything cannot spill: it fails at the memory limit.
    let ungrouped = MEMORY_HOG
        .replace("SELECT a.path, ", "SELECT ")
        .replace(" GROUP BY a.path", "");
    let heavy = tokio::spawn(query(ports, ungrouped));
    serving_beside(ports, &heavy).await?;
    let answer = heavy.await??;
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert!(
        answer.error().contains("memory limit of 64 MiB"),
        "{}",
        answer.body
    );

    let _ = stop_sampling.send(true);
    sampler.await??;
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "RSS: {} MiB before the queries, peak {} MiB",
        baseline >> 20,
        peak >> 20
    );
    // The budget, plus what DataFusion builds before its pool can see it:
    // one batch of an expression's values (~90 MB here) and the copies a
    // spill makes of the state it writes (sort, encode), and the allocator's
    // slack. Unbounded, these queries would hold 15 GB.
    let bound = baseline + (128 << 20) + (512 << 20);
    assert!(
        peak < bound,
        "peak RSS {} MiB, bound {} MiB",
        peak >> 20,
        bound >> 20
    );
    let spill = dir.path().join("data/query-spill");
    assert_eq!(
        std::fs::read_dir(&spill)?.count(),
        0,
        "spill files are removed with their query"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_lumen_up_during_a_runaway_and_acknowledged_rows_survive() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut lumen, ports) = up(dir.path(), &[]).await?;
    seed(ports, 1500).await?;
    let heavy = tokio::spawn(query(ports, RUNAWAY));
    wait_listed(ports, RUNAWAY, "running").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (code, took) = lumen.stop_with("INT", Duration::from_secs(10))?;
    assert_eq!(code, 0, "{}", lumen.logs());
    eprintln!("lumen up stopped {took:?} after SIGINT");
    // Its client got an answer (or lost the connection), not a hang.
    let _ = tokio::time::timeout(LIVE, heavy).await?;

    let (_lumen, ports) = up(dir.path(), &[]).await?;
    assert_eq!(
        sql_count(&ports.sql_url(), "SELECT count(*) AS n FROM requests").await?,
        1500
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_are_listed_cancelled_by_id_and_told_to_retry_when_all_turns_are_taken()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let (lumen, ports) = up(
        dir.path(),
        &[
            "--query-concurrency",
            "1",
            "--query-queue",
            "1",
            "--query-queue-timeout",
            "1s",
            "--query-slow",
            "500ms",
        ],
    )
    .await?;
    seed(ports, 1500).await?;
    let heavy = tokio::spawn(query(ports, RUNAWAY));
    let listed = wait_listed(ports, RUNAWAY, "running").await?;
    let id = listed["id"].as_str().context("id")?.to_string();
    assert!(
        listed["started"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{listed}"
    );
    assert!(
        listed["elapsed_ms"].is_u64() && listed["memory_bytes"].is_u64(),
        "{listed}"
    );
    assert!(
        listed["origin"]
            .as_str()
            .is_some_and(|o| o.starts_with("http 127.0.0.1:")),
        "{listed}"
    );

    // The one turn is taken: a query waits its queue timeout, then is told to retry.
    let waited = query(ports, "SELECT 1 AS one").await?;
    assert_eq!(waited.status, 503, "{}", waited.body);
    assert!(waited.retry_after.is_some(), "Retry-After on 503");
    assert!(waited.error().contains("busy"), "{}", waited.body);

    // While one waits in the queue, the next is refused at once.
    let queued = tokio::spawn(query(ports, "SELECT 2 AS two"));
    wait_listed(ports, "SELECT 2 AS two", "queued").await?;
    let refused = query(ports, "SELECT 3 AS three").await?;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(refused.retry_after.is_some(), "Retry-After on 429");

    // Cancelled by id, the runaway answers 499, and the queued query gets its turn.
    let http = reqwest::Client::new();
    let cancel = format!("http://127.0.0.1:{}/api/v1/queries/{id}", ports.query);
    let r = http.delete(&cancel).send().await?;
    assert_eq!(r.status(), 200, "{}", r.text().await?);
    let answer = tokio::time::timeout(LIVE, heavy).await???;
    assert_eq!(answer.status, 499, "{}", answer.body);
    assert_eq!(answer.body["errorType"], "canceled");
    let second = tokio::time::timeout(LIVE, queued).await???;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.body, serde_json::json!([{"two": 2}]));

    // Gone from the list once its work has ended; unknown ids are 404.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !running_queries(ports).await?.is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(http.delete(&cancel).send().await?.status(), 404);
    let not_an_id = format!("http://127.0.0.1:{}/api/v1/queries/x1", ports.query);
    assert_eq!(http.delete(&not_an_id).send().await?.status(), 400);

    // Outcomes are counted and the runaway was logged as slow.
    let metrics = http
        .get(format!("http://127.0.0.1:{}/metrics", ports.query))
        .send()
        .await?
        .text()
        .await?;
    for line in [
        "lumen_queries_total{outcome=\"cancelled\"} 1",
        "lumen_queries_total{outcome=\"busy\"} 2",
        "lumen_queries_running 0",
        "lumen_query_duration_seconds_count{outcome=\"cancelled\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    let logs = lumen.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("slow query") && l.contains(&format!("id={id}"))),
        "{logs}"
    );
    Ok(())
}
