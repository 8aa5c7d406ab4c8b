//! PromQL with Istio's names, as Prometheus's own client and Grafana see
//! it: `promtool query instant|range` against Lumen's query port returns,
//! for each expression, the values the equivalent SQL over the raw
//! `requests` rows gives on the same data; the metadata endpoints answer
//! what Grafana's query builder asks; a real Prometheus scrapes `/metrics`
//! and federates `/federate`; quiet series go stale.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use arrow_flight::FlightClient;
use lumen_core::{Reporter, RequestRecord, Workload};
use lumen_tests::flight::{self, client};
use lumen_tests::{UpPorts, peer_tool, sql, start_up, wait_for_count, write_mesh};
use serde_json::Value;

const INSTALL: &str = "apt-get install -y --no-install-recommends prometheus";

fn workload(service: &str) -> Workload {
    Workload {
        service: service.into(),
        workload: format!("{service}-v1").into(),
        namespace: "default".into(),
        version: "v1".into(),
    }
}

/// Bookinfo-like calls spread over the 8 minutes before `t` (seconds).
fn traffic(n: usize, t: u64) -> Vec<RequestRecord> {
    let end = UNIX_EPOCH + Duration::from_secs(t);
    (0..n)
        .map(|_| {
            let (source, destination) = match rand::random_range(0..10) {
                0..5 => ("productpage", "reviews"),
                5..8 => ("productpage", "details"),
                _ => ("reviews", "ratings"),
            };
            let status = [200u16, 200, 200, 404, 503][rand::random_range(0..5)];
            RequestRecord {
                start_time: end - Duration::from_micros(rand::random_range(1..480_000_000)),
                duration: Duration::from_micros(10f64.powf(rand::random_range(1.0..5.0)) as u64),
                reporter: if rand::random_bool(0.5) {
                    Reporter::Source
                } else {
                    Reporter::Destination
                },
                source: workload(source),
                destination: workload(destination),
                status,
                request_bytes: rand::random_range(0..2000),
                response_bytes: rand::random_range(0..5000),
                span_id: rand::random(),
                ..RequestRecord::example()
            }
        })
        .collect()
}

async fn put(client: &mut FlightClient, seq: u64, records: &[RequestRecord]) -> Result<()> {
    flight::put_records(client, [7; 16], seq, records).await
}

/// Istio's duration buckets as (le label, bound in µs).
const BUCKETS: &str = "(VALUES ('0.5', 500), ('1', 1000), ('5', 5000), ('10', 10000), ('25', 25000), \
     ('50', 50000), ('100', 100000), ('250', 250000), ('500', 500000), ('1000', 1000000), \
     ('2500', 2500000), ('5000', 5000000), ('10000', 10000000), ('30000', 30000000), \
     ('+Inf', 9223372036854775807)) AS b(k, us)";

/// Envoy's default buckets, Istio's size buckets, as (le label, bytes).
const SIZE_BUCKETS: &str = "(VALUES ('0.5', 0.5), ('1', 1), ('5', 5), ('10', 10), ('25', 25), ('50', 50), \
     ('100', 100), ('250', 250), ('500', 500), ('1000', 1000), ('2500', 2500), ('5000', 5000), \
     ('10000', 10000), ('30000', 30000), ('60000', 60000), ('300000', 300000), ('600000', 600000), \
     ('1800000', 1800000), ('3600000', 3600000), ('+Inf', 1e300)) AS b(k, bytes)";

/// Prometheus's `histogram_quantile` over Istio's buckets, in SQL on raw rows.
fn quantile_sql(q: f64, filter: &str) -> String {
    format!(
        "WITH b AS (SELECT b.us, sum(CASE WHEN r.duration_us <= b.us THEN 1 ELSE 0 END) AS c \
           FROM requests r CROSS JOIN {BUCKETS} WHERE b.k <> '+Inf' AND {filter} GROUP BY b.us), \
         w AS (SELECT us / 1000.0 AS le, c, lag(us / 1000.0, 1, 0.0) OVER (ORDER BY us) AS lo, \
           lag(c, 1, 0) OVER (ORDER BY us) AS clo FROM b), \
         t AS (SELECT {q} * count(*) AS rank FROM requests r WHERE {filter}) \
         SELECT '' AS k, lo + (le - lo) * ((rank - clo) / CAST(c - clo AS DOUBLE)) AS v \
         FROM w, t WHERE c >= rank ORDER BY le LIMIT 1"
    )
}

/// PromQL, the labels that key its answer (joined by a space), and the
/// SQL giving `k` (the same key) and `v` for every element.
fn cases(t: u64) -> Vec<(String, Vec<&'static str>, String)> {
    let ts = |secs: u64| format!("to_timestamp_seconds({secs})");
    // The last minutes are read at one-second resolution (the live tier):
    // irate's last two samples are a second apart.
    let last_window = format!("r.time >= {}", ts(t - 1));
    let c = |p: &str, k: &[&'static str], s: &str| (p.to_string(), k.to_vec(), s.to_string());
    vec![
        c("sum(istio_requests_total)", &[], "SELECT '' AS k, count(*) AS v FROM requests"),
        c(
            "sum by (destination_service_name) (istio_requests_total)",
            &["destination_service_name"],
            "SELECT destination_service AS k, count(*) AS v FROM requests GROUP BY 1",
        ),
        c(
            "sum by (response_code) (istio_requests_total{reporter=\"destination\"})",
            &["response_code"],
            "SELECT CAST(status AS VARCHAR) AS k, count(*) AS v FROM requests WHERE reporter = 'destination' GROUP BY 1",
        ),
        c(
            "sum(istio_requests_total{response_code=~\"5.*\"})",
            &[],
            "SELECT '' AS k, count(*) AS v FROM requests WHERE status >= 500",
        ),
        c(
            "count(sum by (destination_service_name, response_code) (istio_requests_total))",
            &[],
            "SELECT '' AS k, count(*) AS v FROM (SELECT DISTINCT destination_service, status FROM requests)",
        ),
        c(
            "sum(increase(istio_requests_total[10m]))",
            &[],
            "SELECT '' AS k, count(*) AS v FROM requests",
        ),
        c(
            "sum by (source_workload, destination_workload) (increase(istio_requests_total{reporter=\"source\"}[10m]))",
            &["source_workload", "destination_workload"],
            "SELECT source_workload || ' ' || destination_workload AS k, count(*) AS v FROM requests \
             WHERE reporter = 'source' GROUP BY 1",
        ),
        c(
            "sum(rate(istio_requests_total[10m]))",
            &[],
            "SELECT '' AS k, count(*) / 600.0 AS v FROM requests",
        ),
        c(
            "sum(istio_request_duration_milliseconds_sum)",
            &[],
            "SELECT '' AS k, sum(duration_us) / 1000.0 AS v FROM requests",
        ),
        c(
            "sum(istio_request_duration_milliseconds_count{destination_service_name=\"reviews\"})",
            &[],
            "SELECT '' AS k, count(*) AS v FROM requests WHERE destination_service = 'reviews'",
        ),
        (
            "sum by (le) (istio_request_duration_milliseconds_bucket{destination_service_name=\"reviews\"})".into(),
            vec!["le"],
            format!(
                "SELECT b.k, sum(CASE WHEN r.duration_us <= b.us THEN 1 ELSE 0 END) AS v \
                 FROM requests r CROSS JOIN {BUCKETS} WHERE r.destination_service = 'reviews' GROUP BY b.k"
            ),
        ),
        (
            "histogram_quantile(0.9, sum by (le) (rate(istio_request_duration_milliseconds_bucket[10m])))".into(),
            vec![],
            quantile_sql(0.9, "true"),
        ),
        // Size histograms, with Envoy's default buckets (bytes).
        (
            "sum by (le) (istio_response_bytes_bucket{destination_service_name=\"reviews\"})".into(),
            vec!["le"],
            format!(
                "SELECT b.k, sum(CASE WHEN r.response_bytes <= b.bytes THEN 1 ELSE 0 END) AS v \
                 FROM requests r CROSS JOIN {SIZE_BUCKETS} WHERE r.destination_service = 'reviews' GROUP BY b.k"
            ),
        ),
        c(
            "sum(istio_request_bytes_count) - sum(istio_request_bytes_bucket{le=\"+Inf\"})",
            &[],
            "SELECT '' AS k, 0 AS v",
        ),
        c(
            "sum(istio_request_bytes_sum)",
            &[],
            "SELECT '' AS k, sum(request_bytes) AS v FROM requests",
        ),
        c(
            "sum(istio_response_bytes_sum{reporter=\"destination\"})",
            &[],
            "SELECT '' AS k, sum(response_bytes) AS v FROM requests WHERE reporter = 'destination'",
        ),
        c(
            "topk(1, sum by (destination_service_name) (istio_requests_total))",
            &["destination_service_name"],
            "SELECT destination_service AS k, count(*) AS v FROM requests GROUP BY 1 ORDER BY v DESC LIMIT 1",
        ),
        c(
            "sum(istio_requests_total{response_code=\"200\"}) / sum(istio_requests_total)",
            &[],
            "SELECT '' AS k, CAST(sum(CASE WHEN status = 200 THEN 1 ELSE 0 END) AS DOUBLE) / count(*) AS v FROM requests",
        ),
        c(
            "sum by (destination_service_name) (istio_requests_total{response_code=~\"5..\"}) / on (destination_service_name) sum by (destination_service_name) (istio_requests_total)",
            &["destination_service_name"],
            "SELECT destination_service AS k, CAST(sum(CASE WHEN status >= 500 THEN 1 ELSE 0 END) AS DOUBLE) / count(*) AS v \
             FROM requests GROUP BY 1 HAVING sum(CASE WHEN status >= 500 THEN 1 ELSE 0 END) > 0",
        ),
        c(
            "count(count by (destination_service) (istio_requests_total))",
            &[],
            "SELECT '' AS k, count(DISTINCT destination_service) AS v FROM requests",
        ),
        (
            "sum(istio_requests_total offset 5m)".into(),
            vec![],
            format!("SELECT '' AS k, count(*) AS v FROM requests WHERE time < {}", ts(t - 300)),
        ),
        (
            format!("sum(istio_requests_total @ {})", t - 200),
            vec![],
            format!("SELECT '' AS k, count(*) AS v FROM requests WHERE time < {}", ts(t - 200)),
        ),
        c("sum(istio_requests_total) > bool 0", &[], "SELECT '' AS k, 1 AS v"),
        c(
            "sum by (destination_service_name) (istio_request_duration_milliseconds_sum) / sum by (destination_service_name) (istio_request_duration_milliseconds_count)",
            &["destination_service_name"],
            "SELECT destination_service AS k, avg(duration_us) / 1000.0 AS v FROM requests GROUP BY 1",
        ),
        // Istio's service dashboard: request volume, success rate, P50.
        (
            "round(sum(irate(istio_requests_total{reporter=\"source\"}[5m])), 0.001)".into(),
            vec![],
            format!("SELECT '' AS k, count(*) / 1.0 AS v FROM requests r WHERE reporter = 'source' AND {last_window}"),
        ),
        (
            "sum(irate(istio_requests_total{reporter=\"source\",response_code!~\"5.*\"}[5m])) / sum(irate(istio_requests_total{reporter=\"source\"}[5m]))".into(),
            vec![],
            format!(
                "SELECT '' AS k, CAST(sum(CASE WHEN status < 500 THEN 1 ELSE 0 END) AS DOUBLE) / count(*) AS v \
                 FROM requests r WHERE reporter = 'source' AND {last_window}"
            ),
        ),
        (
            "histogram_quantile(0.50, sum(irate(istio_request_duration_milliseconds_bucket{reporter=\"source\"}[1m])) by (le))".into(),
            vec![],
            quantile_sql(0.5, &format!("r.reporter = 'source' AND {last_window}")),
        ),
        c(
            r#"sum by (svc) (label_replace(istio_requests_total, "svc", "$1", "destination_service", "([^.]*)\\..*"))"#,
            &["svc"],
            "SELECT destination_service AS k, count(*) AS v FROM requests GROUP BY 1",
        ),
        c(
            "absent(istio_requests_total{destination_service_name=\"nope\"})",
            &["destination_service_name"],
            "SELECT 'nope' AS k, 1 AS v",
        ),
    ]
}

fn key(metric: &Value, labels: &[&str]) -> String {
    labels
        .iter()
        .map(|l| metric[*l].as_str().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ")
}

fn number(v: &Value) -> f64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(f64::NAN),
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        _ => f64::NAN,
    }
}

fn same(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn promtool(args: &[&str]) -> Result<Value> {
    let out = Command::new(peer_tool("promtool", INSTALL))
        .args(args)
        .output()
        .context("running promtool")?;
    if !out.status.success() {
        bail!(
            "promtool {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("promtool printed {}", String::from_utf8_lossy(&out.stdout)))
}

/// `promtool query instant` of `expr` against `server` (at `time`, in
/// seconds, or now): the vector's samples.
fn instant(server: &str, time: Option<u64>, expr: &str) -> Result<Vec<Value>> {
    let time = time.map(|t| t.to_string());
    let mut args = vec!["query", "instant", "-o", "json"];
    if let Some(t) = &time {
        args.extend(["--time", t.as_str()]);
    }
    args.extend([server, expr]);
    Ok(promtool(&args)?.as_array().cloned().unwrap_or_default())
}

/// A real Prometheus on 127.0.0.1:`port` with `config` (YAML), its TSDB
/// and logs in `dir`; killed when dropped.
fn start_prometheus(
    dir: &std::path::Path,
    config: &str,
    port: u16,
    extra: &[&str],
) -> Result<lumen_tests::KillOnDrop> {
    let file = dir.join("prometheus.yml");
    std::fs::write(&file, config)?;
    Ok(lumen_tests::KillOnDrop(
        Command::new(peer_tool("prometheus", INSTALL))
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .args(extra)
            .stdout(std::fs::File::create(dir.join("prometheus.log"))?)
            .stderr(std::fs::File::create(dir.join("prometheus.err"))?)
            .spawn()?,
    ))
}

async fn expected(url: &str, query: &str) -> Result<BTreeMap<String, f64>> {
    Ok(sql(url, query)
        .await?
        .iter()
        .map(|r| (r["k"].as_str().unwrap_or("").to_string(), number(&r["v"])))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_answers_equal_sql_over_the_raw_rows() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let mut up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, &[]).await?;
    let url = ports.sql_url();
    let server = format!("http://127.0.0.1:{}", ports.query);

    // Every window before `t` has closed: it is a 10 s boundary in the past.
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let t = now / 10 * 10;
    let mut records = traffic(3000, t);
    // Enough in the last second for irate's ratios to have a denominator.
    for r in records.iter_mut().take(200) {
        r.start_time = UNIX_EPOCH + Duration::from_secs(t)
            - Duration::from_micros(rand::random_range(1..1_000_000));
    }
    let mut flight = client(&ports).await?;
    for (seq, chunk) in records.chunks(500).enumerate() {
        put(&mut flight, seq as u64, chunk).await?;
    }
    let stored = wait_for_count(&url, "SELECT count(*) AS n FROM requests", 3000).await?;
    assert_eq!(stored, 3000);
    // The last window before `t` shows in rollups only once the query
    // service's grace for late records (2 s) has passed.
    let visible = UNIX_EPOCH + Duration::from_secs(t + 3);
    if let Ok(wait) = visible.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }

    let mut failures = Vec::new();
    let time = t.to_string();
    let cases = cases(t);
    assert!(cases.len() >= 20);
    for (expr, labels, query) in &cases {
        let got = promtool(&[
            "query", "instant", "-o", "json", "--time", &time, &server, expr,
        ])?;
        let got: BTreeMap<String, f64> = got
            .as_array()
            .with_context(|| format!("{expr}: not a vector: {got}"))?
            .iter()
            .map(|s| (key(&s["metric"], labels), number(&s["value"][1])))
            .collect();
        let want = expected(&url, query).await?;
        let equal = |got: &BTreeMap<String, f64>| {
            got.len() == want.len()
                && got
                    .iter()
                    .all(|(k, v)| want.get(k).is_some_and(|w| same(*v, *w)))
        };
        if !equal(&got) {
            failures.push(format!("{expr}\n  promtool: {got:?}\n  SQL:      {want:?}"));
        }
        // The same series computed from raw rows instead of rollups.
        let raw: Value = reqwest::Client::new()
            .get(format!(
                "{server}/api/v1/query?{}",
                form(&[
                    ("query", expr.as_str()),
                    ("time", &time),
                    ("lumen_source", "raw")
                ])
            ))
            .send()
            .await?
            .json()
            .await?;
        let raw: BTreeMap<String, f64> = raw["data"]["result"]
            .as_array()
            .with_context(|| format!("{expr} (raw): {raw}"))?
            .iter()
            .map(|s| (key(&s["metric"], labels), number(&s["value"][1])))
            .collect();
        if !equal(&raw) {
            failures.push(format!("{expr}\n  raw rows: {raw:?}\n  SQL:      {want:?}"));
        }
    }

    // A range query: one value per step, each the SQL count up to that step.
    let got = promtool(&[
        "query",
        "range",
        "-o",
        "json",
        "--start",
        &(t - 120).to_string(),
        "--end",
        &time,
        "--step",
        "30s",
        &server,
        "sum(increase(istio_requests_total[10m]))",
    ])?;
    let values = got[0]["values"].as_array().context("a matrix")?;
    assert_eq!(values.len(), 5, "{got}");
    for v in values {
        let at = number(&v[0]) as u64;
        let want = expected(
            &url,
            &format!(
                "SELECT '' AS k, count(*) AS v FROM requests WHERE time < to_timestamp_seconds({at})"
            ),
        )
        .await?[""];
        if !same(number(&v[1]), want) {
            failures.push(format!("range step {at}: promtool {} SQL {want}", v[1]));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} expressions differ:\n{}",
        failures.len(),
        cases.len() + 1,
        failures.join("\n")
    );

    grafana_requests(&server, t).await?;
    up.terminate()?;
    Ok(())
}

/// What Grafana's Prometheus data source sends: build info, the query
/// builder's metric / label / value lookups, a step-aligned range query as
/// a form POST, and an error shaped as Prometheus's.
async fn grafana_requests(server: &str, t: u64) -> Result<()> {
    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        async move {
            let r = http.get(format!("{server}{path}")).send().await?;
            let status = r.status();
            let body: Value = r.json().await?;
            anyhow::Ok((status, body))
        }
    };
    let span = format!("start={}&end={}", t - 3600, t);

    let (_, info) = get("/api/v1/status/buildinfo".into()).await?;
    assert_eq!(info["status"], "success");
    assert!(info["data"]["version"].as_str().is_some(), "{info}");

    let (_, names) = get(format!("/api/v1/label/__name__/values?{span}")).await?;
    let names: Vec<&str> = names["data"]
        .as_array()
        .context("names")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for n in [
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_request_bytes_sum",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }

    let (_, labels) = get(format!("/api/v1/labels?{span}")).await?;
    let labels: Vec<&str> = labels["data"]
        .as_array()
        .context("labels")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for l in [
        "destination_service",
        "source_workload",
        "response_code",
        "reporter",
        "le",
        "__name__",
    ] {
        assert!(labels.contains(&l), "{l} missing from {labels:?}");
    }

    let (_, values) = get(format!(
        "/api/v1/label/destination_service_name/values?{span}&match[]=istio_requests_total{{reporter=\"source\"}}"
    ))
    .await?;
    assert_eq!(
        values["data"],
        serde_json::json!(["details", "ratings", "reviews"])
    );

    let (_, series) = get(format!(
        "/api/v1/series?{span}&match[]=istio_requests_total{{destination_service_name=\"ratings\",reporter=\"destination\"}}"
    ))
    .await?;
    let series = series["data"].as_array().context("series")?;
    assert!(!series.is_empty());
    for s in series {
        assert_eq!(
            s["destination_service"], "ratings.default.svc.cluster.local",
            "{s}"
        );
        assert_eq!(s["source_workload"], "reviews-v1", "{s}");
    }

    let (_, meta) = get("/api/v1/metadata".into()).await?;
    assert_eq!(meta["data"]["istio_requests_total"][0]["type"], "counter");
    assert_eq!(
        meta["data"]["istio_request_duration_milliseconds"][0]["type"],
        "histogram"
    );

    // Grafana aligns start and end to the step and posts a form.
    let step = 60;
    let r = http
        .post(format!("{server}/api/v1/query_range"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("query", "sum by (destination_service_name) (rate(istio_requests_total{reporter=\"destination\"}[5m]))"),
            ("start", &((t - 1800) / step * step).to_string()),
            ("end", &(t / step * step).to_string()),
            ("step", &step.to_string()),
        ]))
        .send()
        .await?;
    assert!(r.status().is_success());
    let body: Value = r.json().await?;
    assert_eq!(body["data"]["resultType"], "matrix");
    assert_eq!(
        body["data"]["result"].as_array().map(Vec::len),
        Some(3),
        "{body}"
    );

    let r = http
        .post(format!("{server}/api/v1/query"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("query", "sum(rate(istio_requests_total[5m]"),
            ("time", &t.to_string()),
        ]))
        .send()
        .await?;
    assert_eq!(r.status(), reqwest::StatusCode::BAD_REQUEST);
    let body: Value = r.json().await?;
    assert_eq!(body["status"], "error");
    assert_eq!(body["errorType"], "bad_data");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    Ok(())
}

fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// `/metrics` passes `promtool check metrics`, and a real Prometheus
/// scraping it sees as many requests as Lumen recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_istio_metrics_from_lumen() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let mut up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, &[]).await?;
    let url = ports.sql_url();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let records = traffic(1200, now);
    let mut flight = client(&ports).await?;
    for (seq, chunk) in records.chunks(400).enumerate() {
        put(&mut flight, seq as u64, chunk).await?;
    }
    assert_eq!(
        wait_for_count(&url, "SELECT count(*) AS n FROM requests", 1200).await?,
        1200
    );

    let metrics_url = format!("http://127.0.0.1:{}/metrics", ports.query);
    let text = reqwest::get(&metrics_url).await?.text().await?;
    assert!(
        text.contains("# TYPE istio_requests_total counter"),
        "{text}"
    );
    let check = {
        use std::io::Write;
        let mut child = Command::new(peer_tool("promtool", INSTALL))
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(text.as_bytes())?;
        child.wait_with_output()?
    };
    // The one lint promtool raises is Istio's own metric name, which
    // dashboards depend on: it measures in milliseconds, not seconds.
    // Anything else — a parse error or another lint — fails.
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let istio_unit =
        "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";
    let other: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty() && l.trim() != istio_unit)
        .collect();
    assert!(
        other.is_empty() && matches!(check.status.code(), Some(0) | Some(3)),
        "promtool check metrics ({}): {report}",
        check.status
    );
    let open = reqwest::Client::new()
        .get(&metrics_url)
        .header("accept", "application/openmetrics-text;version=1.0.0")
        .send()
        .await?;
    assert!(
        open.headers()["content-type"]
            .to_str()?
            .starts_with("application/openmetrics-text")
    );
    let open = open.text().await?;
    assert!(open.contains("# TYPE istio_requests counter") && open.ends_with("# EOF\n"));

    // A real Prometheus, scraping every second.
    let prom_port = lumen_tests::free_port();
    let server = start_prometheus(
        dir.path(),
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: lumen\n    static_configs:\n      - targets: ['127.0.0.1:{p}']\n  \
             - job_name: federate\n    honor_labels: true\n    metrics_path: /federate\n    params:\n      'match[]': ['{{__name__=~\"istio_requests_total\"}}']\n    static_configs:\n      - targets: ['127.0.0.1:{p}']\n",
            p = ports.query
        ),
        prom_port,
        &[],
    )?;
    let prom = format!("http://127.0.0.1:{prom_port}");
    let recorded = lumen_tests::sql_count(&url, "SELECT count(*) AS n FROM requests").await? as f64;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // Scraped from /metrics, and federated from /federate (with the
    // series' own labels, job and instance added by the federating side).
    let mut seen = Vec::new();
    for job in ["lumen", "federate"] {
        let expr = format!("sum(istio_requests_total{{job=\"{job}\"}})");
        let value = loop {
            let got = promtool(&["query", "instant", "-o", "json", &prom, &expr]).ok();
            let value = got
                .as_ref()
                .and_then(|g| g.get(0))
                .map(|s| number(&s["value"][1]));
            if value == Some(recorded) || std::time::Instant::now() > deadline {
                break value;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        seen.push((job, value));
    }
    drop(server);
    assert_eq!(
        seen,
        vec![("lumen", Some(recorded)), ("federate", Some(recorded))],
        "Prometheus's sum(istio_requests_total) per job vs Lumen's count; prometheus log:\n{}",
        std::fs::read_to_string(dir.path().join("prometheus.err")).unwrap_or_default()
    );
    // Federation answers in the text format, one sample per series with
    // its timestamp, and refuses what is not a series selector.
    let federate = format!("http://127.0.0.1:{}/federate", ports.query);
    let text = reqwest::Client::new()
        .get(&federate)
        .query(&[("match[]", "istio_requests_total{reporter=\"source\"}")])
        .send()
        .await?
        .text()
        .await?;
    assert!(
        text.starts_with("# TYPE istio_requests_total untyped\n"),
        "{text}"
    );
    assert!(
        text.lines()
            .skip(1)
            .all(|l| l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"source\"")
                && l.split(' ').count() == 3),
        "{text}"
    );
    let refused = reqwest::Client::new()
        .get(&federate)
        .query(&[("match[]", "rate(istio_requests_total[1m])")])
        .send()
        .await?;
    assert_eq!(refused.status(), 400);
    up.terminate()?;
    Ok(())
}

/// A series that stops reporting goes stale after Prometheus's 5 minute
/// lookback: Istio's counters from rollups answer while their key has
/// requests, and stop 5 minutes after the last one, as a scrape target
/// that went away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_istio_series_go_stale_after_the_lookback() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let _up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, &[]).await?;
    let url = ports.sql_url();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    // Ten requests in one second, 30 minutes ago.
    let t0 = now / 60 * 60 - 1800;
    let records: Vec<RequestRecord> = (0..10)
        .map(|i| RequestRecord {
            start_time: UNIX_EPOCH + Duration::from_secs(t0) + Duration::from_millis(i * 50),
            duration: Duration::from_millis(3),
            reporter: Reporter::Source,
            source: workload("productpage"),
            destination: workload("reviews"),
            status: 200,
            span_id: rand::random(),
            ..RequestRecord::example()
        })
        .collect();
    let mut flight = client(&ports).await?;
    put(&mut flight, 0, &records).await?;
    wait_for_count(&url, "SELECT count(*) AS n FROM requests", 10).await?;

    let server = format!("http://127.0.0.1:{}", ports.query);
    let requests = "istio_requests_total{destination_app=\"reviews\"}";
    let at = |secs: u64| instant(&server, Some(secs), requests);
    let sum_of = |secs: u64, expr: &str| -> Result<f64> {
        let v = instant(&server, Some(secs), expr)?;
        Ok(v.first()
            .map(|s| number(&s["value"][1]))
            .unwrap_or_default())
    };
    // A minute and four minutes later: there, with its ten requests.
    for later in [60, 240] {
        let v = at(t0 + later)?;
        assert_eq!(v.len(), 1, "{later} s after: {v:?}");
        assert_eq!(number(&v[0]["value"][1]), 10.0);
    }
    // Seven and twenty minutes later: stale, gone. (Rollups' minute
    // windows put a key's last request anywhere in its minute, so a series
    // goes stale 5 to 6 minutes after it.)
    for later in [420, 1200] {
        let v = at(t0 + later)?;
        assert!(v.is_empty(), "{later} s after the last request: {v:?}");
    }
    // Five more requests 25 minutes on: the series is back with its total,
    // and those five count as an increase over the minute they came in.
    let again: Vec<RequestRecord> = records
        .iter()
        .take(5)
        .map(|r| RequestRecord {
            start_time: r.start_time + Duration::from_secs(1500),
            span_id: rand::random(),
            ..r.clone()
        })
        .collect();
    put(&mut flight, 1, &again).await?;
    wait_for_count(&url, "SELECT count(*) AS n FROM requests", 15).await?;
    let v = at(t0 + 1530)?;
    assert_eq!(v.len(), 1, "back after its new requests: {v:?}");
    assert_eq!(number(&v[0]["value"][1]), 15.0);
    let back = sum_of(
        t0 + 1530,
        "sum(increase(istio_requests_total{destination_app=\"reviews\"}[1m]))",
    )?;
    assert!(back >= 4.0, "the new requests as an increase: {back}");
    // Its requests still count over a range that holds them.
    let total = sum_of(
        t0 + 1200,
        "sum(increase(istio_requests_total{destination_app=\"reviews\"}[30m]))",
    )?;
    assert!((total - 10.0).abs() < 3.0, "increase over 30 min: {total}");
    Ok(())
}

/// A real Prometheus remote-writes what it scrapes (itself) to Lumen's
/// `/api/v1/write`: `promtool query instant` against Lumen returns its
/// series with their own labels; a body that is not snappy, or not a
/// WriteRequest, is refused with 4xx (the sender drops, not retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_remote_writes_into_lumen() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let _up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, &[]).await?;
    let lumen = format!("http://127.0.0.1:{}", ports.query);

    let write = format!("{lumen}/api/v1/write");
    let http = reqwest::Client::new();
    let plain = http.post(&write).body("not snappy").send().await?;
    assert_eq!(plain.status(), 415);
    let garbage = http
        .post(&write)
        .header("content-encoding", "snappy")
        .header("content-type", "application/x-protobuf")
        .body(vec![0xff_u8; 16])
        .send()
        .await?;
    assert_eq!(garbage.status(), 400);

    let prom_port = lumen_tests::free_port();
    let server = start_prometheus(
        dir.path(),
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: prometheus\n    static_configs:\n      - targets: ['127.0.0.1:{prom_port}']\n\
             remote_write:\n  - url: {write}\n    queue_config:\n      batch_send_deadline: 1s\n"
        ),
        prom_port,
        &[],
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let got = loop {
        let got = instant(&lumen, None, "up{job=\"prometheus\"}").unwrap_or_default();
        if !got.is_empty() || std::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let build = instant(&lumen, None, "prometheus_build_info")?;
    drop(server);
    let log = std::fs::read_to_string(dir.path().join("prometheus.err")).unwrap_or_default();
    assert_eq!(
        got.len(),
        1,
        "up from the remote-writing Prometheus: {got:?}\n{log}"
    );
    assert_eq!(
        got[0]["metric"]["instance"],
        format!("127.0.0.1:{prom_port}")
    );
    assert_eq!(number(&got[0]["value"][1]), 1.0);
    assert_eq!(build.len(), 1, "{build:?}");
    assert_eq!(build[0]["metric"]["version"], "2.42.0+ds", "{build:?}");
    // The same samples in SQL, from the `metrics` table.
    let n = lumen_tests::sql_count(
        &ports.sql_url(),
        "SELECT count(*) AS n FROM metrics WHERE name = 'up' AND scope_name = 'prometheus-remote-write'",
    )
    .await?;
    assert!(n >= 1, "{n}");
    Ok(())
}

/// What the stand-in receivers saw: each request's path and
/// `Authorization`, and whether it was remote write's encoding.
#[derive(Default)]
struct Seen {
    requests: Vec<(String, Option<String>, bool)>,
}

/// Stand-in remote-write receivers: `/flaky` answers 429 (Retry-After: 1),
/// then 503, then 204 from then on; `/refuse` always 400.
async fn stand_in_receiver() -> Result<(u16, std::sync::Arc<std::sync::Mutex<Seen>>)> {
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let shared = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |r: http::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let header = |n: &str| {
                            r.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string)
                        };
                        let encoded = header("content-encoding").as_deref() == Some("snappy")
                            && header("content-type").as_deref() == Some("application/x-protobuf")
                            && header("x-prometheus-remote-write-version").as_deref()
                                == Some("0.1.0");
                        let path = r.uri().path().to_string();
                        let flaky_before = {
                            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                            let before = s.requests.iter().filter(|x| x.0 == "/flaky").count();
                            s.requests
                                .push((path.clone(), header("authorization"), encoded));
                            before
                        };
                        let mut resp = http::Response::new(Full::new(bytes::Bytes::new()));
                        *resp.status_mut() = match (path.as_str(), flaky_before) {
                            ("/flaky", 0) => {
                                resp.headers_mut()
                                    .insert("retry-after", http::HeaderValue::from_static("1"));
                                http::StatusCode::TOO_MANY_REQUESTS
                            }
                            ("/flaky", 1) => http::StatusCode::SERVICE_UNAVAILABLE,
                            ("/flaky", _) => http::StatusCode::NO_CONTENT,
                            _ => http::StatusCode::BAD_REQUEST,
                        };
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((port, seen))
}

/// A sample of Lumen's own `/metrics`; a series that is not there fails.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

/// `lumen up --remote-write` sends Istio's series to a real Prometheus
/// (`--web.enable-remote-write-receiver`): the request rate, error ratio
/// and p99 `promtool` gets from that Prometheus equal Lumen's own answers.
/// Beside it, a receiver that first answers 429 and 503 gets the batch
/// once it takes it (retries counted; basic auth from the URL), and one
/// that answers 400 has its samples dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lumen_remote_writes_istio_series_to_prometheus() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let prom_port = lumen_tests::free_port();
    let server = start_prometheus(
        dir.path(),
        "global:\n  scrape_interval: 1m\n",
        prom_port,
        &["--web.enable-remote-write-receiver"],
    )?;
    let (stand_in, seen) = stand_in_receiver().await?;

    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let prom_write = format!("http://127.0.0.1:{prom_port}/api/v1/write");
    let flaky = format!("http://u:p%40ss@127.0.0.1:{stand_in}/flaky");
    let refuse = format!("http://127.0.0.1:{stand_in}/refuse");
    let _up = start_up(
        dir.path(),
        &mesh,
        &dir.path().join("data"),
        ports,
        &[
            "--remote-write",
            &prom_write,
            "--remote-write",
            &flaky,
            "--remote-write",
            &refuse,
        ],
    )
    .await?;

    // 20 s of requests as they happen, so each window is read after its
    // rows are in, as in a running mesh.
    let mut flight = client(&ports).await?;
    let started = std::time::Instant::now();
    let (mut seq, mut orders) = (0, 0.0);
    while started.elapsed() < Duration::from_secs(20) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
        let mut batch = traffic(40, 0);
        for r in &mut batch {
            r.start_time = UNIX_EPOCH + now - Duration::from_millis(rand::random_range(0..200));
        }
        put(&mut flight, seq, &batch).await?;
        // And an app's own counter, as OTLP delta points of 2.
        if seq % 4 == 0 {
            let nanos = now.as_nanos().to_string();
            let point = serde_json::json!({"resourceMetrics": [{
                "resource": {"attributes": [
                    {"key": "service.name", "value": {"stringValue": "checkout"}}]},
                "scopeMetrics": [{"metrics": [{"name": "orders", "sum": {
                    "aggregationTemporality": 1, "isMonotonic": true,
                    "dataPoints": [{"asInt": "2", "timeUnixNano": nanos,
                        "startTimeUnixNano": nanos}]}}]}]}]});
            let resp = reqwest::Client::new()
                .post(format!("http://127.0.0.1:{}/v1/metrics", ports.otlp_http))
                .json(&point)
                .send()
                .await?;
            assert_eq!(resp.status(), 200);
            orders += 2.0;
        }
        seq += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let end = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    // The window after the last request's, once Prometheus has it.
    let t = (end / 10 + 2) * 10;
    let prom = format!("http://127.0.0.1:{prom_port}");
    let lumen = format!("http://127.0.0.1:{}", ports.query);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        // Every series of the last window, buckets too (they may come in a
        // later request than the counters).
        let newest = instant(
            &prom,
            None,
            "min(max(timestamp(istio_requests_total)) or max(timestamp(istio_request_duration_milliseconds_bucket)))",
        )
        .ok()
        .and_then(|v| v.first().map(|s| number(&s["value"][1])))
        .unwrap_or(0.0);
        if newest >= t as f64 {
            break;
        }
        if std::time::Instant::now() > deadline {
            let log =
                std::fs::read_to_string(dir.path().join("prometheus.err")).unwrap_or_default();
            bail!("Prometheus has Istio's series only through {newest}, not {t}\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Over 15 minutes Lumen answers from the same ten-second samples it sent.
    let questions = [
        "sum(rate(istio_requests_total[15m]))",
        "sum by (destination_service, response_code) (rate(istio_requests_total[15m]))",
        "sum(rate(istio_requests_total{response_code=~\"5..\"}[15m])) / sum(rate(istio_requests_total[15m]))",
        "histogram_quantile(0.99, sum by (le) (rate(istio_request_duration_milliseconds_bucket[15m])))",
        "histogram_quantile(0.99, sum by (destination_app, le) (rate(istio_request_duration_milliseconds_bucket[15m])))",
    ];
    for q in questions {
        let answers = |server: &str| -> Result<BTreeMap<String, f64>> {
            Ok(instant(server, Some(t), q)?
                .iter()
                .map(|s| (s["metric"].to_string(), number(&s["value"][1])))
                .collect())
        };
        let (from_prometheus, from_lumen) = (answers(&prom)?, answers(&lumen)?);
        assert!(!from_lumen.is_empty(), "{q}: Lumen has no answer");
        assert_eq!(
            from_prometheus.keys().collect::<Vec<_>>(),
            from_lumen.keys().collect::<Vec<_>>(),
            "{q}"
        );
        for (k, v) in &from_lumen {
            assert!(
                same(*v, from_prometheus[k]),
                "{q} {k}: Lumen {v}, Prometheus {}",
                from_prometheus[k]
            );
        }
    }
    // The app's delta counter arrives as the cumulative `_total` PromQL
    // expects, by its Prometheus name.
    let total = instant(&prom, Some(t), "orders_total{job=\"checkout\"}")?;
    assert_eq!(total.len(), 1, "{total:?}");
    assert_eq!(number(&total[0]["value"][1]), orders, "{total:?}");
    drop(server);

    // The stand-ins: retried into acceptance, refused and counted.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = reqwest::get(format!("{lumen}/metrics"))
            .await?
            .text()
            .await?;
        let sent = metric(
            &text,
            &format!(
                "lumen_remote_write_samples_sent_total{{remote=\"http://127.0.0.1:{stand_in}/flaky\"}}"
            ),
        );
        let refused = metric(
            &text,
            &format!(
                "lumen_remote_write_samples_dropped_total{{remote=\"http://127.0.0.1:{stand_in}/refuse\",reason=\"rejected\"}}"
            ),
        );
        if (sent > 0.0 && refused > 0.0) || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let of = |remote: &str, name: &str, extra: &str| {
        metric(
            &text,
            &format!("lumen_remote_write_{name}{{remote=\"{remote}\"{extra}}}"),
        )
    };
    let flaky_name = format!("http://127.0.0.1:{stand_in}/flaky");
    let refuse_name = format!("http://127.0.0.1:{stand_in}/refuse");
    assert!(of(&flaky_name, "samples_sent_total", "") > 0.0, "{text}");
    assert!(of(&flaky_name, "retries_total", "") >= 2.0, "{text}");
    assert!(
        of(
            &refuse_name,
            "samples_dropped_total",
            ",reason=\"rejected\""
        ) > 0.0,
        "{text}"
    );
    assert_eq!(of(&refuse_name, "samples_sent_total", ""), 0.0, "{text}");
    for reason in ["queue_full", "rejected", "shutdown"] {
        assert_eq!(
            of(
                &prom_write,
                "samples_dropped_total",
                &format!(",reason=\"{reason}\"")
            ),
            0.0,
            "{text}"
        );
    }
    assert!(of(&prom_write, "samples_sent_total", "") > 0.0, "{text}");
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    let flaky_auth: Vec<_> = seen
        .requests
        .iter()
        .filter(|r| r.0 == "/flaky")
        .map(|r| (r.1.clone(), r.2))
        .collect();
    assert!(flaky_auth.len() >= 3, "{flaky_auth:?}");
    // Progress is kept for a restart, under each URL's name.
    let mut progress: Vec<serde_json::Value> = Vec::new();
    for entry in std::fs::read_dir(dir.path().join("data").join("remote-write"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            progress.push(serde_json::from_slice(&std::fs::read(path)?)?);
        }
    }
    assert_eq!(progress.len(), 3, "{progress:?}");
    let through = |url: &str| {
        progress
            .iter()
            .find(|p| p["url"] == url)
            .and_then(|p| p["sent_through_ms"].as_i64())
    };
    assert!(
        through(&prom_write) >= Some(t as i64 * 1000),
        "{progress:?}"
    );
    assert!(through(&flaky_name).is_some(), "{progress:?}");
    // "u:p@ss", from the URL's user info.
    assert!(
        flaky_auth
            .iter()
            .all(|(auth, encoded)| auth.as_deref() == Some("Basic dTpwQHNz") && *encoded),
        "{flaky_auth:?}"
    );
    Ok(())
}
