//! Istio's Grafana dashboards, unchanged (`dashboards/istio/`), against
//! `lumen demo` as Grafana runs them: each template variable is filled as
//! Grafana fills it (`query_result(…)` as an instant query, the
//! variable's regex over each result line, multi-value and "All"
//! selections as escaped regex alternations), then every panel target is
//! asked as Grafana asks it — a range query over the demo's run with
//! `$__rate_interval` and `$__interval` filled in, or an instant query for
//! instant targets — for every value of the dashboard's main variable
//! (service, workload) and both reporters. Every target must answer without
//! error, and every one must return data for some choice of the variables
//! — except exactly those [`why_empty`] gives a reason for (also in
//! `docs/dashboards.md`).
//!
//! Lumen's own dashboards (`dashboards/lumen/`) are asked the same way:
//! their PromQL targets over the Prometheus API, their SQL targets — with
//! Grafana's PostgreSQL macros expanded as Grafana expands them — over the
//! Postgres wire with psycopg, as Grafana's PostgreSQL data source
//! connects; every one must answer with rows. The provisioning files must
//! name these data sources and dashboard directories.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use lumen_tests::{UpPorts, start_demo};
use serde_json::Value;

/// How long the demo runs before the dashboards are read.
const TRAFFIC: Duration = Duration::from_secs(45);
/// Grafana's Prometheus data source default scrape interval, and the step
/// it picks for a short range.
const SCRAPE: u64 = 15;

/// Why a target can have no data from the demo, if it cannot: the test
/// requires exactly these to be empty (`docs/dashboards.md` lists them).
fn why_empty(expr: &str) -> Option<&'static str> {
    let inbound = expr.contains("reporter=\"destination\"");
    let outbound = expr.contains("reporter=\"source\"");
    if inbound && expr.contains("connection_security_policy!=\"mutual_tls\"") {
        return Some("plaintext requests into the mesh: the demo's mesh is STRICT mTLS");
    }
    if outbound && expr.contains("connection_security_policy=\"mutual_tls\"") {
        return Some(
            "a client sidecar reports connection_security_policy=\"unknown\", as Istio's do: empty on Istio too",
        );
    }
    None
}

fn dashboards() -> PathBuf {
    lumen_tests::crate_dir().join("..").join("dashboards")
}

/// An RFC 3339 time, as Grafana's PostgreSQL macros write them.
fn rfc3339(secs: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Grafana's PostgreSQL macros and variable formats, expanded.
fn expand_sql(sql: &str, vars: &BTreeMap<String, Vec<String>>, start: u64, end: u64) -> String {
    let mut out = sql.to_string();
    let (from, to) = (rfc3339(start), rfc3339(end));
    while let Some(at) = out.find("$__timeFilter(") {
        let close = out[at..].find(')').map_or(out.len(), |c| at + c);
        let column = out[at + "$__timeFilter(".len()..close].trim().to_string();
        out.replace_range(at..=close, &format!("{column} BETWEEN '{from}' AND '{to}'"));
    }
    while let Some(at) = out.find("$__timeGroupAlias(") {
        let close = out[at..].find(')').map_or(out.len(), |c| at + c);
        let args: Vec<String> = out[at + "$__timeGroupAlias(".len()..close]
            .split(',')
            .map(|a| a.trim().to_string())
            .collect();
        let secs: u64 = args[1].trim_end_matches('s').parse().unwrap_or(SCRAPE);
        out.replace_range(
            at..=close,
            &format!(
                "floor(extract(epoch from {})/{secs})*{secs} AS \"time\"",
                args[0]
            ),
        );
    }
    for (name, values) in vars {
        let quoted: Vec<String> = values
            .iter()
            .map(|v| format!("'{}'", v.replace('\'', "''")))
            .collect();
        out = out.replace(&format!("${{{name}:sqlstring}}"), &quoted.join(","));
        let escaped: Vec<String> = values.iter().map(|v| regex_escape(v)).collect();
        out = out.replace(
            &format!("${{{name}:regex}}"),
            &format!("({})", escaped.join("|")),
        );
    }
    out
}

/// Runs SQL over the Postgres wire with psycopg, both ways Grafana's
/// PostgreSQL data source may send it (its driver decides): the simple
/// query protocol (psycopg's way for a query without parameters, lib/pq's
/// too) and the extended one (a prepared statement, pgx's way). Each
/// statement's rows (first column as text), or its error; the two ways
/// must agree on whether there are any.
fn psql_rows(port: u16, statements: &[String]) -> Result<Vec<Result<Vec<String>, String>>> {
    let script = r#"
import sys, json, psycopg
out = []
with psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), user="grafana", dbname="lumen", autocommit=True) as conn:
    for sql in json.loads(sys.argv[2]):
        try:
            rows = conn.execute(sql).fetchall()
            prepared = conn.execute(sql, prepare=True).fetchall()
            # (The data moves between the two: rows, not their count.)
            if bool(prepared) != bool(rows):
                out.append({"error": f"simple protocol: {len(rows)} rows, extended: {len(prepared)}"})
            else:
                out.append({"rows": [str(r[0]) for r in rows]})
        except psycopg.Error as e:
            out.append({"error": str(e)})
print(json.dumps(out))
"#;
    let printed = lumen_tests::run_python(
        script,
        &[&port.to_string(), &serde_json::to_string(statements)?],
    )?;
    let answers: Vec<Value> = serde_json::from_str(printed.trim())?;
    Ok(answers
        .into_iter()
        .map(|a| match a["error"].as_str() {
            Some(e) => Err(e.to_string()),
            None => Ok(a["rows"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| r.as_str().unwrap_or("").to_string())
                .collect()),
        })
        .collect())
}

fn form(params: &[(&str, String)]) -> String {
    let mut f = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        f.append_pair(k, v);
    }
    f.finish()
}

/// A panel target: where it is, its expression, and how Grafana asks it.
struct Target {
    panel: String,
    expr: String,
    instant: bool,
}

fn targets(dashboard: &Value) -> Vec<Target> {
    fn walk(panels: &[Value], out: &mut Vec<Target>) {
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str().filter(|e| !e.trim().is_empty()) {
                    out.push(Target {
                        panel: p["title"].as_str().unwrap_or("").to_string(),
                        expr: expr.to_string(),
                        instant: t["instant"].as_bool().unwrap_or(false),
                    });
                }
            }
            walk(p["panels"].as_array().map_or(&[], |v| v), out);
        }
    }
    let mut out = Vec::new();
    walk(dashboard["panels"].as_array().map_or(&[], |v| v), &mut out);
    out
}

/// A template variable as Grafana holds it.
#[derive(Debug, Clone)]
struct Var {
    name: String,
    kind: String,
    query: String,
    regex: String,
    multi: bool,
    include_all: bool,
}

fn variables(dashboard: &Value) -> Vec<Var> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            let query = match &v["query"] {
                Value::String(s) => s.clone(),
                q => q["query"].as_str().unwrap_or("").to_string(),
            };
            Var {
                name: v["name"].as_str().unwrap_or("").to_string(),
                kind: v["type"].as_str().unwrap_or("").to_string(),
                query,
                regex: v["regex"].as_str().unwrap_or("").to_string(),
                multi: v["multi"].as_bool().unwrap_or(false),
                include_all: v["includeAll"].as_bool().unwrap_or(false),
            }
        })
        .collect()
}

/// Grafana's Prometheus escaping of a regex value.
fn regex_escape(v: &str) -> String {
    let mut out = String::new();
    for c in v.chars() {
        if "$^*{}[]'+?.()|\\".contains(c) {
            out.push_str("\\\\");
        }
        out.push(c);
    }
    out
}

/// A variable's value as Grafana writes it into a Prometheus query.
fn format(var: &Var, values: &[String]) -> String {
    if !var.multi && !var.include_all {
        return values.first().cloned().unwrap_or_default();
    }
    let escaped: Vec<String> = values.iter().map(|v| regex_escape(v)).collect();
    match escaped.len() {
        1 => escaped[0].clone(),
        _ => format!("({})", escaped.join("|")),
    }
}

fn interpolate(expr: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = expr.to_string();
    // Longest names first: `$dstwl` before `$dst…`.
    let mut names: Vec<&String> = values.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        out = out.replace(&format!("${{{name}}}"), &values[name]);
        out = out.replace(&format!("${name}"), &values[name]);
    }
    out
}

struct Prom {
    base: String,
    http: reqwest::Client,
    start: u64,
    end: u64,
}

impl Prom {
    /// A Prometheus API call as the provisioned data source makes it
    /// (`httpMethod: POST`, a form body).
    async fn get(&self, path: &str, params: &[(&str, String)]) -> Result<Value> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(params))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await.context("a JSON answer")?;
        if !status.is_success() || body["status"] != "success" {
            bail!("{status}: {body}");
        }
        Ok(body["data"].clone())
    }

    /// `query_result(expr)`: the instant vector as Grafana's text lines.
    async fn query_result(&self, expr: &str) -> Result<Vec<String>> {
        let data = self
            .get(
                "/api/v1/query",
                &[("query", expr.to_string()), ("time", self.end.to_string())],
            )
            .await?;
        Ok(data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let mut text = s["metric"]["__name__"].as_str().unwrap_or("").to_string();
                let labels: Vec<String> = s["metric"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| *k != "__name__")
                    .map(|(k, v)| format!("{k}=\"{}\"", v.as_str().unwrap_or("")))
                    .collect();
                text.push_str(&format!("{{{}}}", labels.join(",")));
                text.push_str(&format!(
                    " {} {}",
                    s["value"][1].as_str().unwrap_or(""),
                    self.end * 1000
                ));
                text
            })
            .collect())
    }

    /// A target as a panel asks it: whether it returned any series.
    async fn target(&self, expr: &str, instant: bool) -> Result<bool> {
        let rate_interval = format!("{}s", (SCRAPE + SCRAPE).max(4 * SCRAPE));
        let expr = expr
            .replace("$__rate_interval", &rate_interval)
            .replace("$__interval", &format!("{SCRAPE}s"))
            .replace("$interval", &format!("{SCRAPE}s"))
            .replace("$__range", &format!("{}s", self.end - self.start));
        let data = if instant {
            self.get(
                "/api/v1/query",
                &[("query", expr), ("time", self.end.to_string())],
            )
            .await?
        } else {
            self.get(
                "/api/v1/query_range",
                &[
                    ("query", expr),
                    ("start", self.start.to_string()),
                    ("end", self.end.to_string()),
                    ("step", SCRAPE.to_string()),
                ],
            )
            .await?
        };
        // Data a panel draws: at least one finite value (an all-NaN
        // quantile is an empty graph).
        let finite = |v: &Value| {
            v[1].as_str()
                .and_then(|x| x.parse::<f64>().ok())
                .is_some_and(f64::is_finite)
        };
        Ok(data["result"].as_array().into_iter().flatten().any(|s| {
            s["values"].as_array().into_iter().flatten().any(finite) || finite(&s["value"])
        }))
    }
}

/// The options a query variable offers: its regex's first group over
/// each result line, once each.
fn options(var: &Var, lines: &[String]) -> Result<Vec<String>> {
    let pattern = var.regex.trim_start_matches('/').trim_end_matches('/');
    let re =
        regex::Regex::new(pattern).with_context(|| format!("${} regex {pattern}", var.name))?;
    let mut out = BTreeSet::new();
    for l in lines {
        if pattern.is_empty() {
            out.insert(l.clone());
        } else if let Some(c) = re.captures(l).and_then(|c| c.get(1)) {
            out.insert(c.as_str().to_string());
        }
    }
    Ok(out.into_iter().collect())
}

/// Every choice of the dashboard's single-valued query variables (the one
/// a user picks: service, namespace, workload) and of `qrep`; the others
/// as saved ("All" for the filters).
async fn fill(
    prom: &Prom,
    vars: &[Var],
    i: usize,
    values: BTreeMap<String, String>,
    out: &mut Vec<BTreeMap<String, String>>,
) -> Result<()> {
    let Some(var) = vars.get(i) else {
        out.push(values);
        return Ok(());
    };
    let choices: Vec<Vec<String>> = match var.kind.as_str() {
        "datasource" => return Box::pin(fill(prom, vars, i + 1, values, out)).await,
        "custom" => {
            let all: Vec<String> = var.query.split(',').map(|s| s.trim().to_string()).collect();
            all.into_iter().map(|v| vec![v]).collect()
        }
        "query" => {
            let expr = interpolate(&var.query, &values);
            let inner = expr
                .trim()
                .strip_prefix("query_result(")
                .and_then(|e| e.strip_suffix(')'))
                .with_context(|| format!("${} is not query_result(…): {expr}", var.name))?;
            let lines = prom
                .query_result(inner)
                .await
                .with_context(|| format!("variable ${}: {inner}", var.name))?;
            let opts = options(var, &lines)?;
            if var.include_all {
                vec![opts]
            } else {
                opts.into_iter().map(|v| vec![v]).collect()
            }
        }
        other => bail!("variable ${} of type {other}", var.name),
    };
    for chosen in choices {
        let mut next = values.clone();
        next.insert(var.name.clone(), format(var, &chosen));
        Box::pin(fill(prom, vars, i + 1, next, out)).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_dashboards_answer_every_panel_from_the_demo() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ports = UpPorts::pick();
    let (query, pg) = (ports.query, ports.pg);
    // A ratings incident at once: its alert, limit and 429s show. The
    // dashboards need every workload's traffic, not much of it: at 20
    // requests a second (not 50) the unoptimised demo leaves the machine's
    // second core to the hundreds of queries that follow.
    let demo = start_demo(
        dir.path(),
        &dir.path().join("data"),
        ports,
        // (Not the usual 600 s: a slow machine may need more for them.)
        &["--incident", "--rps", "20", "--duration", "1500"],
    )
    .await?;
    let began = std::time::Instant::now();
    let base = format!("http://127.0.0.1:{query}");
    let start = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    tokio::time::sleep(TRAFFIC).await;
    // What some panels need has happened: the incident's limit answered
    // 429, and ratings v2 has read from mongodb over TCP since.
    let sql_url = format!("{base}/api/v1/sql");
    for (what, condition) in [
        ("a 429 from the incident's limit", "status = 429"),
        (
            "TCP to mongodb",
            "protocol = 'tcp' AND destination_service = 'mongodb'",
        ),
    ] {
        let q = format!("SELECT count(*) AS n FROM requests WHERE {condition}");
        let n = lumen_tests::wait_for_count(&sql_url, &q, 1).await?;
        assert!(n >= 1, "{what}: {}", demo.logs());
    }
    // And the last of it is in a closed window.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let end = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let prom = Prom {
        base,
        http: reqwest::Client::new(),
        start,
        end,
    };

    let mut errors = Vec::new();
    // (dashboard, panel #target) → why it is empty, if it should be.
    let mut empty: BTreeMap<(String, String), Option<&str>> = BTreeMap::new();
    let mut should_be_empty: BTreeMap<(String, String), &str> = BTreeMap::new();
    let (mut asked, mut targets_seen) = (0, 0);
    let mut answered: BTreeMap<(String, bool), bool> = BTreeMap::new();
    for file in [
        "istio-mesh-dashboard.gen.json",
        "istio-service-dashboard.json",
        "istio-workload-dashboard.json",
    ] {
        let dashboard: Value =
            serde_json::from_slice(&std::fs::read(dashboards().join("istio").join(file))?)?;
        let vars = variables(&dashboard);
        let mut choices = Vec::new();
        fill(&prom, &vars, 0, BTreeMap::new(), &mut choices).await?;
        assert!(!choices.is_empty(), "{file}: no variable values");
        let targets = targets(&dashboard);
        targets_seen += targets.len();
        for (i, t) in targets.iter().enumerate() {
            let mut filled = false;
            for values in &choices {
                let expr = interpolate(&t.expr, values);
                // A choice the expression does not name (`qrep` where it
                // is not used) asks the same query again: ask it once.
                let key = (expr.clone(), t.instant);
                if let Some(data) = answered.get(&key) {
                    filled |= *data;
                } else {
                    asked += 1;
                    match prom.target(&expr, t.instant).await {
                        Ok(data) => {
                            answered.insert(key, data);
                            filled |= data;
                        }
                        Err(e) => errors.push(format!("{file} «{}» {expr}: {e}", t.panel)),
                    }
                }
                if filled {
                    break;
                }
            }
            let at = (file.to_string(), format!("{} #{i}", t.panel));
            if let Some(why) = why_empty(&t.expr) {
                should_be_empty.insert(at.clone(), why);
            }
            if !filled {
                empty.insert(at, why_empty(&t.expr));
            }
        }
    }
    assert!(
        errors.is_empty(),
        "{} targets failed:\n{}",
        errors.len(),
        errors.join("\n")
    );
    let unexplained: Vec<String> = empty
        .iter()
        .filter(|(_, why)| why.is_none())
        .map(|((f, p), _)| format!("  {f}: {p}"))
        .collect();
    let filled: Vec<String> = should_be_empty
        .keys()
        .filter(|k| !empty.contains_key(*k))
        .map(|(f, p)| format!("  {f}: {p}"))
        .collect();
    assert!(
        unexplained.is_empty() && filled.is_empty(),
        "of {asked} queries, targets without data and no reason in why_empty:\n{}\n\
         targets why_empty explains, with data now:\n{}",
        unexplained.join("\n"),
        filled.join("\n")
    );
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for why in empty.values().flatten() {
        *reasons.entry(why).or_default() += 1;
    }
    let total: usize = targets_seen;
    println!(
        "{total} targets, {} with data, in {asked} queries ({:.0?} with the traffic); empty: {reasons:?}",
        total - empty.len(),
        began.elapsed()
    );

    lumens_dashboards_answer(&prom, pg)?;
    Ok(())
}

/// Lumen's own dashboards: every SQL variable and target over the Postgres
/// wire, every PromQL target over the Prometheus API, each with rows.
fn lumens_dashboards_answer(prom: &Prom, pg: u16) -> Result<()> {
    let provisioned = std::fs::read_to_string(
        dashboards()
            .join("provisioning")
            .join("datasources")
            .join("lumen.yaml"),
    )?;
    let providers = std::fs::read_to_string(
        dashboards()
            .join("provisioning")
            .join("dashboards")
            .join("lumen.yaml"),
    )?;
    for uid in ["lumen-prometheus", "lumen-sql", "lumen-jaeger"] {
        assert!(
            provisioned.contains(&format!("uid: {uid}")),
            "{uid} in {provisioned}"
        );
    }
    for dir in ["istio", "lumen"] {
        assert!(
            providers.contains(&format!("${{LUMEN_DASHBOARDS}}/{dir}")),
            "{providers}"
        );
        assert!(dashboards().join(dir).is_dir());
    }
    let mut failures = Vec::new();
    let mut lumen_boards: Vec<PathBuf> = std::fs::read_dir(dashboards().join("lumen"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    lumen_boards.sort();
    assert!(lumen_boards.len() >= 2, "{lumen_boards:?}");
    for path in &lumen_boards {
        let board: Value = serde_json::from_slice(&std::fs::read(path)?)?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        // Variables, in order: each SQL query's first column, all chosen.
        let mut vars: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for v in board["templating"]["list"].as_array().into_iter().flatten() {
            let sql = expand_sql(
                v["query"].as_str().unwrap_or(""),
                &vars,
                prom.start,
                prom.end,
            );
            let rows = psql_rows(pg, std::slice::from_ref(&sql))?.remove(0);
            match rows {
                Ok(values) if !values.is_empty() => {
                    vars.insert(v["name"].as_str().unwrap_or("").to_string(), values);
                }
                other => failures.push(format!("{name} ${}: {sql} → {other:?}", v["name"])),
            }
        }
        let mut statements = Vec::new();
        let mut at = Vec::new();
        for p in board["panels"].as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let title = p["title"].as_str().unwrap_or("").to_string();
                if let Some(sql) = t["rawSql"].as_str() {
                    statements.push(expand_sql(sql, &vars, prom.start, prom.end));
                    at.push(title);
                } else if let Some(expr) = t["expr"].as_str() {
                    let mut expr = expr.to_string();
                    for (n, values) in &vars {
                        let escaped: Vec<String> = values.iter().map(|v| regex_escape(v)).collect();
                        expr = expr.replace(
                            &format!("${{{n}:regex}}"),
                            &format!("({})", escaped.join("|")),
                        );
                    }
                    let instant = t["instant"].as_bool().unwrap_or(false);
                    let got = tokio::task::block_in_place(|| {
                        tokio::runtime::Handle::current().block_on(prom.target(&expr, instant))
                    });
                    match got {
                        Ok(true) => {}
                        other => failures.push(format!("{name} «{title}» {expr} → {other:?}")),
                    }
                }
            }
        }
        for ((title, sql), answer) in at.iter().zip(&statements).zip(psql_rows(pg, &statements)?) {
            match answer {
                Ok(rows) if !rows.is_empty() => {}
                other => failures.push(format!("{name} «{title}» {sql} → {other:?}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "Lumen's dashboards:\n{}",
        failures.join("\n")
    );
    Ok(())
}
