//! `lumen demo` as a newcomer runs it: it prints where to query and example
//! queries, those queries answer with rows while it runs, it stops by itself
//! after `--duration`, and what it recorded is left in Parquet files.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lumen_tests::{lumen_bin, sql, wait_for_count};
use tokio::sync::mpsc;

/// Long enough for the checks below to run against the live demo.
/// Long enough for a 10 s rollup window to close (and its 2 s grace).
const DURATION_SECS: u64 = 25;

/// The demo process, its stdout line by line, and its stderr in a file.
struct Demo {
    child: Option<Child>,
    lines: mpsc::UnboundedReceiver<String>,
    stdout: Vec<String>,
    stderr: PathBuf,
}

impl Demo {
    fn start(dir: &Path, data: &Path) -> Result<Demo> {
        let stderr = dir.join("demo.stderr");
        let mut child = Command::new(lumen_bin())
            .args(["demo", "--duration", &DURATION_SECS.to_string()])
            // A ratings incident at once: its alert shows within the run.
            .arg("--incident")
            .arg("--data-dir")
            .arg(data)
            // Port 0 everywhere: the demo must print where it really listens.
            .args(["--otlp-grpc", "127.0.0.1:0", "--otlp-http", "127.0.0.1:0"])
            .args(["--query-addr", "127.0.0.1:0", "--pg-addr", "127.0.0.1:0"])
            .args(["--flight-sql-addr", "127.0.0.1:0"])
            .args(["--control-addr", "127.0.0.1:0", "--ingress", "127.0.0.1:0"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .context("starting lumen demo")?;
        let out = child.stdout.take().context("demo stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Demo {
            child: Some(child),
            lines,
            stdout: Vec::new(),
            stderr,
        })
    }

    /// The next line of stdout; `None` once the demo closed it.
    async fn next_line(&mut self) -> Result<Option<String>> {
        let wait = Duration::from_secs(DURATION_SECS + 60);
        let Ok(line) = tokio::time::timeout(wait, self.lines.recv()).await else {
            bail!("no output from the demo for {wait:?}:\n{}", self.output());
        };
        if let Some(l) = &line {
            self.stdout.push(l.clone());
        }
        Ok(line)
    }

    /// Everything it printed so far, for failure messages.
    fn output(&self) -> String {
        format!(
            "--- stdout:\n{}\n--- stderr:\n{}",
            self.stdout.join("\n"),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Waits for the process to exit by itself; returns its exit code.
    fn wait_exit(&mut self) -> Result<i32> {
        let child = self.child.as_mut().context("already waited")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                bail!(
                    "the demo did not exit after --duration {DURATION_SECS}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The SQL between the double quotes of a printed command.
fn quoted(line: &str) -> Result<&str> {
    let (start, end) = (line.find('"'), line.rfind('"'));
    match (start, end) {
        (Some(s), Some(e)) if e > s => Ok(&line[s + 1..e]),
        _ => bail!("no quoted SQL in `{line}`"),
    }
}

/// Runs a printed command line as a user pasting it into a shell (in the
/// directory they ran the demo from) would.
fn run_in_shell(cwd: &Path, line: &str) -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(line)
        .current_dir(cwd)
        .output()?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `N` of the `(N rows)` line `lumen sql` ends its table with.
fn table_rows(table: &str) -> Option<u64> {
    let last = table.lines().last()?.trim();
    let n = last.strip_prefix('(')?.split(' ').next()?;
    n.parse().ok()
}

fn strings(rows: &[serde_json::Value], column: &str) -> BTreeSet<String> {
    rows.iter()
        .filter_map(|r| r.get(column)?.as_str().map(str::to_string))
        .collect()
}

/// The demo's routing leaves its marks on the rows: its routes by name,
/// reviews split over three versions with jason's requests on v2, retries
/// of ratings, its delay flagged `DI`, the ingress gateway's route.
async fn traffic_management_shows(sql_url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let routes = strings(
            &sql(
                sql_url,
                "SELECT DISTINCT route FROM requests WHERE reporter = 'source'",
            )
            .await?,
            "route",
        );
        let versions = strings(
            &sql(
                sql_url,
                "SELECT DISTINCT destination_version FROM requests                  WHERE reporter = 'source' AND destination_service = 'reviews'",
            )
            .await?,
            "destination_version",
        );
        let jason = sql(
            sql_url,
            "SELECT DISTINCT destination_version FROM requests              WHERE reporter = 'source' AND route = 'reviews/jason'",
        )
        .await?;
        let delayed = sql_count_of(
            sql_url,
            "response_flags LIKE '%DI%' AND route = 'ratings/ratings'",
        )
        .await?;
        let want_routes = [
            "reviews/jason",
            "reviews/split",
            "ratings/ratings",
            "bookinfo/0",
        ];
        let done = want_routes.iter().all(|r| routes.contains(*r))
            && ["v1", "v2", "v3"].iter().all(|v| versions.contains(*v))
            && strings(&jason, "destination_version") == BTreeSet::from(["v2".to_string()])
            && delayed > 0;
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "routes {routes:?}, reviews versions {versions:?}, jason's {jason:?}, delayed {delayed}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// STRICT mTLS everywhere (no destination row without it, SPIFFE ids on
/// both sides), and the load generator's direct calls to ratings denied by
/// Istio's ratings-viewer policy.
async fn security_shows(sql_url: &str) -> Result<()> {
    let mutual = "SELECT count(*) AS n FROM requests WHERE reporter = 'destination' AND mtls \
                  AND source_principal = 'spiffe://cluster.local/ns/default/sa/bookinfo-productpage' \
                  AND destination_principal = 'spiffe://cluster.local/ns/default/sa/bookinfo-reviews'";
    wait_for_count(sql_url, mutual, 1).await?;
    let denied = "SELECT count(*) AS n FROM requests WHERE reporter = 'destination' \
                  AND destination_service = 'ratings' AND status = 403 AND policy = 'none' \
                  AND source_principal = 'spiffe://cluster.local/ns/default/sa/loadgen'";
    wait_for_count(sql_url, denied, 1).await?;
    let plaintext = lumen_tests::sql_count(
        sql_url,
        "SELECT count(*) AS n FROM requests WHERE reporter = 'destination' AND NOT mtls",
    )
    .await?;
    assert_eq!(plaintext, 0, "a destination row without mTLS under STRICT");
    Ok(())
}

async fn sql_count_of(sql_url: &str, condition: &str) -> Result<i64> {
    lumen_tests::sql_count(
        sql_url,
        &format!("SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND {condition}"),
    )
    .await
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files_under(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_queries_that_answer_and_stops_cleanly_leaving_parquet() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("demo-data");
    let mut demo = Demo::start(dir.path(), &data)?;

    // What it prints before running: the SQL API and commands to try.
    let (mut sql_url, mut examples, mut curl) = (None, Vec::new(), None);
    let (mut ingress, mut config_commands, mut policy) = (None, None, None);
    loop {
        let Some(line) = demo.next_line().await? else {
            bail!("the demo stopped before it was running:\n{}", demo.output());
        };
        let line = line.trim();
        if let Some(url) = line.strip_prefix("SQL API:") {
            sql_url = url.trim().strip_prefix("POST ").map(str::to_string);
        } else if line.contains(" sql --url ") {
            examples.push(line.to_string());
        } else if line.starts_with("curl ") {
            curl = Some(line.to_string());
        } else if let Some(rest) = line.strip_prefix("Ingress:") {
            ingress = rest
                .split_whitespace()
                .find(|w| w.starts_with("http://"))
                .map(str::to_string);
        } else if line.contains(" get vs") {
            config_commands = Some(line.to_string());
        } else if line.starts_with("Policy:") {
            policy = Some(line.to_string());
        } else if line.starts_with("Running for") {
            break;
        }
    }
    let out = demo.output();
    let sql_url = sql_url.with_context(|| format!("no `SQL API: POST <url>` line:\n{out}"))?;
    let base = sql_url
        .strip_suffix("/api/v1/sql")
        .with_context(|| format!("SQL API URL {sql_url}"))?;
    assert_eq!(examples.len(), 4, "four example queries:\n{out}");
    for e in &examples {
        assert!(e.contains(&format!(" sql --url {base} \"")), "{e}");
    }
    let curl = curl.with_context(|| format!("no curl example:\n{out}"))?;
    assert!(curl.contains(&sql_url), "{curl}");
    let ingress = ingress.with_context(|| format!("no `Ingress: curl http://…` line:\n{out}"))?;
    let config_commands = config_commands.with_context(|| format!("no `get vs` line:\n{out}"))?;
    let get_vs = config_commands
        .split("   ")
        .next()
        .context("the get vs command")?
        .trim()
        .to_string();

    // The user's own requests reach productpage through the ingress
    // gateway, jason's like everyone's.
    let client = reqwest::Client::builder().no_proxy().build()?;
    for user in [None, Some("jason")] {
        let mut req = client.get(&ingress);
        if let Some(u) = user {
            req = req.header("end-user", u);
        }
        let resp = req.send().await?;
        assert_eq!(resp.status(), 200, "{ingress} as {user:?}");
        assert!(resp.text().await?.contains("The Comedy of Errors"));
    }
    // The demo's Istio resources, as the printed command lists them.
    let listed = run_in_shell(dir.path(), &get_vs).with_context(|| demo.output())?;
    for name in ["reviews", "ratings", "bookinfo"] {
        assert!(listed.contains(name), "{name} in {listed}");
    }

    // Traffic reaches all of Bookinfo, as both sides of each hop report it.
    let services: BTreeSet<String> = ["details", "mongodb", "productpage", "ratings", "reviews"]
        .map(String::from)
        .into();
    for reporter in ["source", "destination"] {
        let q = format!(
            "SELECT count(DISTINCT destination_service) AS n FROM requests WHERE reporter = '{reporter}'"
        );
        let n = wait_for_count(&sql_url, &q, 5)
            .await
            .with_context(|| demo.output())?;
        assert_eq!(n, 5, "{reporter}: {}", demo.output());
    }

    // Each printed command, pasted into a shell, prints a table with rows
    // (the rollups one once a window has closed).
    for line in &examples {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let table = run_in_shell(dir.path(), line).with_context(|| demo.output())?;
            let rows = table_rows(&table).with_context(|| format!("no `(N rows)` in:\n{table}"))?;
            if rows > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "`{line}` returned no rows:\n{table}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // And what they answer, as JSON.
    let per_service = sql(&sql_url, quoted(&examples[0])?).await?;
    assert_eq!(strings(&per_service, "destination_service"), services);
    assert!(
        per_service
            .iter()
            .all(|r| r["requests"].as_i64().is_some_and(|n| n > 0)),
        "{per_service:?}"
    );
    let per_hop = sql(&sql_url, quoted(&examples[1])?).await?;
    let hops: BTreeSet<(String, String)> = per_hop
        .iter()
        .filter_map(|r| {
            Some((
                r["source_service"].as_str()?.to_string(),
                r["destination_service"].as_str()?.to_string(),
            ))
        })
        .collect();
    for hop in [
        ("loadgen", "productpage"),
        ("productpage", "details"),
        ("productpage", "reviews"),
        ("reviews", "ratings"),
    ] {
        assert!(
            hops.contains(&(hop.0.to_string(), hop.1.to_string())),
            "{hop:?} in {per_hop:?}"
        );
    }
    traffic_management_shows(&sql_url)
        .await
        .with_context(|| demo.output())?;
    security_shows(&sql_url)
        .await
        .with_context(|| demo.output())?;
    let policy = policy.with_context(|| format!("no `Policy:` line:\n{}", demo.output()))?;
    assert!(
        policy.contains("bookinfo-policy.yaml") && policy.contains("ratings fails for 20 s now"),
        "{policy}"
    );
    // The incident: ratings fails, the shipped error-rate rule sees it in
    // the last seconds, and policy_events says so.
    let alerted = "SELECT count(*) AS n FROM policy_events WHERE kind = 'alert' \
                   AND name = 'ServiceHighErrorRate' AND target LIKE '%ratings%' \
                   AND new_state IN ('pending', 'firing')";
    assert!(
        wait_for_count(&sql_url, alerted, 1)
            .await
            .with_context(|| demo.output())?
            >= 1
    );
    jaeger_api(base, &sql_url).await?;
    apps_own_telemetry(base, &sql_url)
        .await
        .with_context(|| demo.output())?;
    assert!(
        per_hop.iter().all(|r| r["error_rate"]
            .as_f64()
            .is_some_and(|e| (0.0..=1.0).contains(&e))),
        "{per_hop:?}"
    );
    let slowest = sql(&sql_url, quoted(&examples[2])?).await?;
    assert!((1..=5).contains(&slowest.len()), "{slowest:?}");
    let rolled = sql(&sql_url, quoted(&examples[3])?).await?;
    assert!(
        rolled
            .iter()
            .all(|r| r["p99_us"].as_f64().is_some_and(|p| p > 0.0)
                && r["requests"].as_i64().is_some_and(|n| n > 0)),
        "{rolled:?}"
    );
    assert!(
        strings(&rolled, "destination_service").is_subset(&services),
        "{rolled:?}"
    );
    // The curl example's SQL, sent the same way.
    let counted = sql(&sql_url, quoted(&curl)?).await?;
    let live_rows = counted
        .first()
        .and_then(|r| r.as_object()?.values().next()?.as_i64())
        .with_context(|| format!("a count in {counted:?}"))?;
    assert!(live_rows > 0, "{counted:?}");

    // It stops by itself, cleanly, and says what it kept.
    while demo.next_line().await?.is_some() {}
    let code = demo.wait_exit()?;
    let out = demo.output();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Stopped cleanly."), "{out}");
    let summary = demo
        .stdout
        .iter()
        .find_map(|l| l.trim().strip_prefix("requests: "))
        .with_context(|| format!("no `requests:` summary line:\n{out}"))?;
    // "<rows> rows in <files> Parquet files (<bytes> bytes), <hot> rows still in the WAL"
    let words: Vec<&str> = summary.split_whitespace().collect();
    // The number `back` words before the first `word`.
    let number = |word: &str, back: usize| -> Result<u64> {
        words
            .iter()
            .position(|w| *w == word)
            .and_then(|i| i.checked_sub(back))
            .and_then(|i| words[i].parse().ok())
            .with_context(|| format!("no number {back} before `{word}` in `{summary}`"))
    };
    let rows = i64::try_from(number("rows", 1)?)?;
    let files = usize::try_from(number("Parquet", 1)?)?;
    let hot = number("still", 2)?;
    assert_eq!(hot, 0, "everything flushed on stop: {summary}");
    assert!(
        rows >= live_rows,
        "{summary}: fewer rows than the {live_rows} queried while running"
    );

    // The files are there, complete, and DuckDB reads every row of them.
    let table_dir = data.join("tables").join("requests");
    let mut on_disk = Vec::new();
    files_under(&table_dir, &mut on_disk)?;
    let parquet: Vec<&PathBuf> = on_disk
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    assert!(!parquet.is_empty(), "no Parquet files: {on_disk:?}");
    assert_eq!(parquet.len(), files, "{summary}: {on_disk:?}");
    assert_eq!(parquet.len(), on_disk.len(), "only Parquet: {on_disk:?}");
    let glob = format!("{}/date=*/hour=*/*.parquet", table_dir.display());
    assert_eq!(lumen_tests::duckdb_count(&glob)?, rows, "{summary}");
    Ok(())
}

/// The apps' own spans, metrics and logs (OpenTelemetry SDK): in the same
/// traces as the sidecars' records, between them; metrics by their own
/// names in SQL and PromQL; logs in their trace.
async fn apps_own_telemetry(base: &str, sql_url: &str) -> Result<()> {
    for (what, q, at_least) in [
        (
            "an app's server span under its inbound sidecar's record",
            "SELECT count(*) AS n FROM spans s JOIN requests r ON s.trace_id = r.trace_id \
             AND s.parent_span_id = r.span_id WHERE r.reporter = 'destination' AND s.kind = 'server'",
            1,
        ),
        (
            "an outbound sidecar's record under an app's client span",
            "SELECT count(*) AS n FROM requests r JOIN spans s ON r.trace_id = s.trace_id \
             AND r.parent_span_id = s.span_id WHERE r.reporter = 'source' AND s.kind = 'client'",
            1,
        ),
        (
            "request metrics of every app",
            "SELECT count(DISTINCT service_name) AS n FROM metrics \
             WHERE name = 'http.server.request.duration' AND type = 'histogram'",
            4,
        ),
        (
            "ratings' warnings, in their traces",
            "SELECT count(*) AS n FROM logs l JOIN spans s ON l.trace_id = s.trace_id \
             AND l.span_id = s.span_id WHERE l.service_name = 'ratings' AND l.severity_text = 'WARN'",
            1,
        ),
    ] {
        let n = wait_for_count(sql_url, q, at_least).await?;
        assert!(n >= at_least, "{what}: {n}");
    }
    let q = "sum(bookinfo_requests_total)";
    let answer: serde_json::Value = reqwest::get(format!("{base}/api/v1/query?query={q}"))
        .await?
        .json()
        .await?;
    let total = answer["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse::<f64>().ok());
    assert!(total.is_some_and(|t| t > 0.0), "{q}: {answer}");
    Ok(())
}

/// The Jaeger API over the demo's traffic: the call graph, and a trace
/// through `ratings` whose spans link to their parents as the rows do.
async fn jaeger_api(base: &str, sql_url: &str) -> Result<()> {
    let get = |path: String| async move {
        let r = reqwest::get(format!("{base}{path}")).await?;
        anyhow::ensure!(r.status().is_success(), "{path}: {}", r.status());
        anyhow::Ok(r.json::<serde_json::Value>().await?)
    };
    let deps = get("/api/dependencies".into()).await?;
    let edges: BTreeSet<(String, String)> = deps["data"]
        .as_array()
        .context("dependencies")?
        .iter()
        .filter(|d| d["callCount"].as_i64().is_some_and(|n| n > 0))
        .filter_map(|d| {
            Some((
                d["parent"].as_str()?.to_string(),
                d["child"].as_str()?.to_string(),
            ))
        })
        .collect();
    for (parent, child) in [
        ("loadgen", "productpage"),
        ("productpage", "details"),
        ("productpage", "reviews"),
        ("reviews", "ratings"),
    ] {
        assert!(
            edges.contains(&(parent.to_string(), child.to_string())),
            "{parent} -> {child} missing from {deps}"
        );
    }
    let services = get("/api/services".into()).await?;
    for s in ["details", "loadgen", "productpage", "ratings", "reviews"] {
        assert!(
            services["data"]
                .as_array()
                .is_some_and(|a| a.contains(&s.into())),
            "{s} missing from {services}"
        );
    }
    let ops = get("/api/services/reviews/operations".into()).await?;
    assert!(
        ops["data"].as_array().is_some_and(|a| !a.is_empty()),
        "{ops}"
    );

    // A trace old enough that the apps' SDKs (batching for up to 5 s)
    // have sent their spans of it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let rows = sql(
            sql_url,
            "SELECT encode(trace_id, 'hex') AS t FROM requests \
             WHERE destination_service = 'ratings' AND reporter = 'destination' \
             AND source_service = 'reviews' AND time < now() - INTERVAL '8 seconds' LIMIT 1",
        )
        .await?;
        if let Some(t) = rows.first().and_then(|r| r["t"].as_str()) {
            break t.to_string();
        }
        anyhow::ensure!(Instant::now() < deadline, "no trace through ratings");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let want: BTreeSet<(String, Option<String>)> = sql(
        sql_url,
        &format!(
            "SELECT encode(span_id, 'hex') AS s, encode(parent_span_id, 'hex') AS p FROM requests \
             WHERE trace_id = X'{id}' UNION ALL SELECT encode(span_id, 'hex') AS s, \
             encode(parent_span_id, 'hex') AS p FROM spans WHERE trace_id = X'{id}'"
        ),
    )
    .await?
    .iter()
    .filter_map(|r| {
        Some((
            r["s"].as_str()?.to_string(),
            r["p"].as_str().map(String::from),
        ))
    })
    .collect();
    let trace = get(format!("/api/traces/{id}")).await?;
    let trace = &trace["data"][0];
    assert_eq!(trace["traceID"], id.as_str());
    let spans = trace["spans"].as_array().context("spans")?;
    let got: BTreeSet<(String, Option<String>)> = spans
        .iter()
        .filter_map(|s| {
            Some((
                s["spanID"].as_str()?.to_string(),
                s["references"][0]["spanID"].as_str().map(String::from),
            ))
        })
        .collect();
    assert_eq!(got, want, "spans and their parents, Jaeger vs SQL: {trace}");
    assert!(
        want.len() >= 6,
        "a trace through ratings crosses three hops: {want:?}"
    );
    for s in spans {
        let process = s["processID"].as_str().context("processID")?;
        assert!(
            trace["processes"][process]["serviceName"].is_string(),
            "{trace}"
        );
    }
    let found = get("/api/traces?service=ratings&limit=3&lookback=1h".into()).await?;
    let found = found["data"].as_array().context("traces")?;
    assert!(!found.is_empty() && found.len() <= 3, "{found:?}");
    for t in found {
        let processes = &t["processes"];
        assert!(
            t["spans"]
                .as_array()
                .is_some_and(|spans| spans.iter().any(|s| {
                    processes[s["processID"].as_str().unwrap_or("")]["serviceName"] == "ratings"
                })),
            "a found trace has a span of ratings: {t}"
        );
    }
    Ok(())
}
