//! What rule evaluation costs: `lumen demo` (Bookinfo, its sidecars,
//! collector, query service and policy engine in one process) with only
//! Lumen's shipped rules, then with `rules` more alerting rules over the
//! same series, every group evaluated each second. The process's CPU over
//! a measured window, and what the extra rules add, as a share of a core;
//! and whether every group still finishes within its interval.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::peers::{self, Proc, local};
use crate::procstat::{clock_ticks_per_sec, cpu_ticks};

pub struct Settings {
    pub rules: usize,
    pub warmup: Duration,
    pub measure: Duration,
}

pub struct Run {
    pub rules: usize,
    /// CPU seconds per second of the demo process.
    pub cores: f64,
    /// The slowest group's last evaluation, and the groups' mean.
    pub slowest_group_ms: f64,
    pub mean_group_ms: f64,
    pub unhealthy: usize,
}

/// `n` alerting rules in groups of 100, over Istio's series as the demo
/// records them: error ratios, p99s and per-caller rates, each with its
/// own threshold so no two are the same query.
fn rule_file(n: usize) -> String {
    let mut y = String::from("groups:\n");
    for i in 0..n {
        if i % 100 == 0 {
            let _ = writeln!(y, "- name: bench-{}\n  rules:", i / 100);
        }
        let t = i as f64 / n as f64;
        let expr = match i % 3 {
            0 => format!(
                "sum by (destination_service_name) (rate(istio_requests_total{{reporter=\"destination\", response_code=~\"5..\"}}[1m])) / sum by (destination_service_name) (rate(istio_requests_total{{reporter=\"destination\"}}[1m])) > {:.4}",
                0.5 + t / 2.0
            ),
            1 => format!(
                "histogram_quantile(0.99, sum by (destination_service_name, le) (rate(istio_request_duration_milliseconds_bucket{{reporter=\"destination\"}}[1m]))) > {:.1}",
                1000.0 + t * 1000.0
            ),
            _ => format!(
                "sum by (source_workload, source_workload_namespace) (rate(istio_requests_total{{reporter=\"source\"}}[5s])) > {:.1}",
                1000.0 + t * 1000.0
            ),
        };
        let _ = writeln!(y, "  - alert: Bench{i}\n    expr: '{expr}'");
    }
    y
}

fn one(lumen: &Path, dir: &Path, rules: usize, set: &Settings) -> Result<Run> {
    let ports = peers::free_ports(7)?;
    let run_dir = dir.join(format!("rules-{rules}"));
    std::fs::create_dir_all(&run_dir)?;
    let mut cmd = Command::new(lumen);
    cmd.current_dir(&run_dir)
        .args(["demo", "--data-dir", "data", "--incident-every", "1h"])
        .args(["--query-addr", &local(ports[0]).to_string()])
        .args(["--pg-addr", &local(ports[1]).to_string()])
        .args(["--flight-sql-addr", &local(ports[2]).to_string()])
        .args(["--control-addr", &local(ports[3]).to_string()])
        .args(["--ingress", &local(ports[4]).to_string()])
        .args(["--otlp-grpc", &local(ports[5]).to_string()])
        .args(["--otlp-http", &local(ports[6]).to_string()]);
    if rules > 0 {
        let file = run_dir.join("bench.rules.yaml");
        std::fs::write(&file, rule_file(rules))?;
        cmd.arg("--rules").arg(&file);
    }
    let mut demo = Proc::spawn("lumen demo", cmd, run_dir.join("demo.log"))?;
    demo.wait_http_ok(local(ports[0]), "/ready")?;
    std::thread::sleep(set.warmup);
    let (t0, c0) = (Instant::now(), cpu_ticks(demo.pid())?);
    std::thread::sleep(set.measure);
    let (c1, wall) = (cpu_ticks(demo.pid())?, t0.elapsed());
    let cores = (c1 - c0) as f64 / clock_ticks_per_sec() as f64 / wall.as_secs_f64();
    let body = ureq_get(local(ports[0]), "/api/v1/rules")?;
    let v: serde_json::Value = serde_json::from_str(&body).context("/api/v1/rules")?;
    let groups = v["data"]["groups"].as_array().cloned().unwrap_or_default();
    let times: Vec<f64> = groups
        .iter()
        .filter_map(|g| g["evaluationTime"].as_f64())
        .map(|s| s * 1e3)
        .collect();
    let unhealthy = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter(|r| r["health"] != "ok")
        .count();
    demo.check_alive()?;
    Ok(Run {
        rules,
        cores,
        slowest_group_ms: times.iter().copied().fold(0.0, f64::max),
        mean_group_ms: times.iter().sum::<f64>() / times.len().max(1) as f64,
        unhealthy,
    })
}

/// A plain HTTP GET on loopback (the bench has no async runtime here).
fn ureq_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // Chunked: join the chunks.
    if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        return Ok(out);
    }
    Ok(body.to_string())
}

pub fn run(lumen: &Path, dir: &Path, set: &Settings) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for rules in [0, set.rules] {
        eprintln!("lumen demo with {rules} extra rules");
        runs.push(one(lumen, dir, rules, set)?);
    }
    Ok(runs)
}

pub fn render(command: &str, machine: &str, set: &Settings, runs: &[Run]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Rule evaluation cost\n");
    let _ = writeln!(
        s,
        "`lumen demo` (Bookinfo at 50 requests/s: apps, sidecars, collector, query service and \
         policy engine in one process) with Lumen's shipped rules, then with {} more alerting \
         rules (error ratios and p99s over `[1m]`, per-caller rates over `[5s]`, in groups of \
         100) evaluated every second. CPU of the process over {} s after {} s of warm-up.\n",
        set.rules,
        set.measure.as_secs(),
        set.warmup.as_secs()
    );
    let _ = writeln!(s, "`{command}` on {machine}\n");
    let _ = writeln!(
        s,
        "| extra rules | CPU (cores) | slowest group's evaluation | mean group | rules not ok |\n|---|---|---|---|---|"
    );
    for r in runs {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.0} ms | {:.0} ms | {} |",
            r.rules, r.cores, r.slowest_group_ms, r.mean_group_ms, r.unhealthy
        );
    }
    if let [base, many] = runs {
        let _ = writeln!(
            s,
            "\n{} rules at a 1 s interval add **{:.2} cores** ({:.0} % of one core); per rule \
             evaluation {:.2} ms of CPU.",
            many.rules,
            many.cores - base.cores,
            (many.cores - base.cores) * 100.0,
            (many.cores - base.cores) * 1000.0 / many.rules.max(1) as f64
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_file_is_valid_and_has_every_rule() {
        let groups = lumen_policy::rules::parse("bench.rules.yaml", &rule_file(250)).unwrap();
        assert_eq!(groups.len(), 3);
        assert_eq!(groups.iter().map(|g| g.rules.len()).sum::<usize>(), 250);
    }
}
