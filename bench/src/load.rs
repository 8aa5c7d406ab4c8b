//! Load generation: `wrk` for closed-loop maximum throughput, `oha` for
//! open-loop fixed-rate latency. Both are external tools so the numbers are
//! comparable with anyone else's wrk/oha runs, and so the load generator is
//! not part of the system under test.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Where and how to send load.
pub struct Target {
    pub url: String,
    /// `Host` header; the meshes route on it, nginx direct needs none.
    pub host: Option<String>,
    /// POST this file as every request's body, instead of GET.
    pub body: Option<std::path::PathBuf>,
    /// gRPC over HTTP/2 (oha only; `body` is the framed request): the
    /// request goes to `http://<host><path>`, connected to `url`'s address.
    pub grpc: Option<&'static str>,
    /// Extra request headers (`name: value`), oha only.
    pub headers: Vec<String>,
}

impl Target {
    /// oha's URL and options for this target.
    fn oha_args(&self, cmd: &mut Command) {
        match (self.grpc, &self.host) {
            (Some(path), Some(host)) => {
                let addr = self.url.trim_start_matches("http://").trim_end_matches('/');
                cmd.args(["--http2", "--connect-to", &format!("{host}:{addr}")]);
                cmd.arg(format!("http://{host}{path}"));
            }
            (Some(path), None) => {
                cmd.arg("--http2");
                cmd.arg(format!("{}{}", self.url.trim_end_matches('/'), path));
            }
            (None, host) => {
                if let Some(h) = host {
                    cmd.args(["-H", &format!("Host: {h}")]);
                }
                cmd.arg(&self.url);
            }
        }
        for h in &self.headers {
            cmd.args(["-H", h]);
        }
        if let Some(body) = &self.body {
            let content_type = if self.grpc.is_some() {
                "application/grpc"
            } else {
                "application/octet-stream"
            };
            cmd.args(["-m", "POST", "-T", content_type, "-D"]).arg(body);
            if self.grpc.is_some() {
                cmd.args(["-H", "te: trailers"]);
            }
        }
    }
}

/// The wrk script that POSTs `body` (wrk's own way to send a body).
fn wrk_script(body: &std::path::Path) -> Result<std::path::PathBuf> {
    let script = body.with_extension("lua");
    let lua_path = body
        .display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    std::fs::write(
        &script,
        format!(
            "local f = assert(io.open(\"{lua_path}\", \"rb\"))\n\
             wrk.method = \"POST\"\n\
             wrk.body = f:read(\"*a\")\n\
             f:close()\n\
             wrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n"
        ),
    )?;
    Ok(script)
}

#[derive(Debug, Clone, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub rps: f64,
    pub socket_errors: u64,
    pub non_2xx_3xx: u64,
}

pub fn run_wrk(target: &Target, connections: u32, secs: u64) -> Result<WrkResult> {
    if target.grpc.is_some() {
        // wrk speaks HTTP/1.1 only: closed-loop oha over HTTP/2 instead.
        return run_oha_closed(target, connections, secs);
    }
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{connections}"), &format!("-d{secs}s")]);
    if let Some(h) = &target.host {
        cmd.args(["-H", &format!("Host: {h}")]);
    }
    if let Some(body) = &target.body {
        cmd.arg("-s").arg(wrk_script(body)?);
    }
    cmd.arg(&target.url);
    let out = cmd.output().context("running wrk")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk exited with {}: {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&stdout).with_context(|| format!("parsing wrk output:\n{stdout}"))
}

pub fn parse_wrk(out: &str) -> Result<WrkResult> {
    let mut requests = None;
    let mut rps = None;
    let mut socket_errors = 0;
    let mut non_2xx_3xx = 0;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = Some(v.trim().parse::<f64>().context("Requests/sec")?);
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non_2xx_3xx = v.trim().parse().context("Non-2xx or 3xx responses")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in v.split(',') {
                let n = part.split_whitespace().nth(1).unwrap_or("");
                socket_errors += n
                    .parse::<u64>()
                    .with_context(|| format!("socket error count {part:?}"))?;
            }
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            requests = Some(n.trim().parse::<u64>().context("request count")?);
        }
    }
    Ok(WrkResult {
        requests: requests.context("no \"N requests in\" line")?,
        rps: rps.context("no Requests/sec line")?,
        socket_errors,
        non_2xx_3xx,
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct OhaResult {
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Requests that got a response, whatever its status.
    pub responses: u64,
    /// Responses with a 2xx status.
    pub ok: u64,
    pub success_rate: f64,
    /// Status → count, for the non-2xx responses.
    pub bad_statuses: BTreeMap<String, u64>,
    /// Error message → count, for requests that got no response at all.
    pub errors: BTreeMap<String, u64>,
}

impl OhaResult {
    /// Whether every request got a 2xx response, as a fixed-rate latency
    /// number is meaningless if some requests failed fast.
    pub fn clean(&self) -> bool {
        self.errors.is_empty() && self.bad_statuses.is_empty() && self.success_rate >= 0.999
    }
}

/// Runs `oha` with `args` against `target`; its JSON report.
fn oha(target: &Target, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("oha");
    cmd.args(["--no-tui", "--output-format", "json"]).args(args);
    target.oha_args(&mut cmd);
    let out = cmd.output().context("running oha")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "oha exited with {}: {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// A proxy's CPU time (all threads) per request answered, µs, at a fixed
/// rate for `secs` after 2 s of warm-up, and what oha saw meanwhile.
pub fn cpu_per_request(
    pid: u32,
    target: &Target,
    rate: u32,
    connections: u32,
    secs: u64,
) -> Result<(f64, OhaResult)> {
    use crate::procstat::{clock_ticks_per_sec, cpu_ticks};
    run_oha(target, rate, connections, 2)?;
    let before = cpu_ticks(pid)?;
    let oha = run_oha(target, rate, connections, secs)?;
    let ticks = cpu_ticks(pid)? - before;
    let answered = (oha.ok as f64).max(1.0);
    Ok((
        ticks as f64 / clock_ticks_per_sec() as f64 * 1e6 / answered,
        oha,
    ))
}

pub fn run_oha(target: &Target, rate: u32, connections: u32, secs: u64) -> Result<OhaResult> {
    let stdout = oha(
        target,
        &[
            "-q",
            &rate.to_string(),
            "-z",
            &format!("{secs}s"),
            "-c",
            &connections.to_string(),
            "--latency-correction",
            // Otherwise requests in flight at the deadline count as errors.
            "--wait-ongoing-requests-after-deadline",
        ],
    )?;
    parse_oha(&stdout).with_context(|| {
        format!(
            "parsing oha JSON output:\n{}",
            crate::http::truncate(&stdout, 2000)
        )
    })
}

/// One request with oha; its status, or what went wrong.
pub fn oha_once(target: &Target) -> Result<u16> {
    let stdout = oha(target, &["-n", "1"])?;
    let r = parse_oha(&stdout).with_context(|| format!("oha: {stdout}"))?;
    if let Some(e) = r.errors.keys().next() {
        bail!("{e}");
    }
    if r.ok == 1 {
        return Ok(200);
    }
    let status = r.bad_statuses.keys().next().cloned().unwrap_or_default();
    status
        .parse()
        .with_context(|| format!("oha status {status:?}"))
}

/// oha as a closed loop (no rate): as many requests as the path carries,
/// reported as wrk's numbers are.
fn run_oha_closed(target: &Target, connections: u32, secs: u64) -> Result<WrkResult> {
    let stdout = oha(
        target,
        &[
            "-z",
            &format!("{secs}s"),
            "-c",
            &connections.to_string(),
            "--wait-ongoing-requests-after-deadline",
        ],
    )?;
    let v: Value = serde_json::from_str(&stdout).context("oha output is not JSON")?;
    let r = parse_oha(&stdout)?;
    Ok(WrkResult {
        requests: r.responses,
        rps: v
            .pointer("/summary/requestsPerSec")
            .and_then(Value::as_f64)
            .context("no summary.requestsPerSec")?,
        socket_errors: r.errors.values().sum(),
        non_2xx_3xx: r.bad_statuses.values().sum(),
    })
}

pub fn parse_oha(json: &str) -> Result<OhaResult> {
    let v: Value = serde_json::from_str(json).context("not JSON")?;
    let pct = |key: &str| -> Result<f64> {
        v.pointer(&format!("/latencyPercentiles/{key}"))
            .and_then(Value::as_f64)
            // oha reports seconds.
            .map(|s| s * 1000.0)
            .with_context(|| format!("no latencyPercentiles.{key} (no successful request?)"))
    };
    let counts = |key: &str| -> BTreeMap<String, u64> {
        v.get(key)
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let statuses = counts("statusCodeDistribution");
    let errors = counts("errorDistribution");
    let responses = statuses.values().sum();
    let (ok, bad_statuses): (BTreeMap<_, _>, BTreeMap<_, _>) = statuses
        .into_iter()
        .partition(|(code, _)| code.starts_with('2'));
    let success_rate = v
        .pointer("/summary/successRate")
        .and_then(Value::as_f64)
        .context("no summary.successRate")?;
    Ok(OhaResult {
        p50_ms: pct("p50")?,
        p99_ms: pct("p99")?,
        responses,
        ok: ok.values().sum(),
        success_rate,
        bad_statuses,
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = include_str!("../testdata/wrk.txt");
    const WRK_ERRORS: &str = include_str!("../testdata/wrk-errors.txt");
    const OHA: &str = include_str!("../testdata/oha.json");
    const OHA_ERRORS: &str = include_str!("../testdata/oha-errors.json");

    #[test]
    fn wrk_clean_run() {
        let r = parse_wrk(WRK).unwrap();
        let want = WrkResult {
            requests: 42800,
            rps: 20938.52,
            socket_errors: 0,
            non_2xx_3xx: 0,
        };
        assert_eq!(r, want);
    }

    #[test]
    fn wrk_run_with_errors() {
        // nginx answered 503 and was then stopped mid-run.
        let r = parse_wrk(WRK_ERRORS).unwrap();
        assert_eq!(r.requests, 22969);
        assert_eq!(r.socket_errors, 64 + 17695);
        assert_eq!(r.non_2xx_3xx, 22969);
    }

    #[test]
    fn wrk_garbage_is_an_error() {
        assert!(parse_wrk("unable to connect to 127.0.0.1:1 Connection refused").is_err());
    }

    #[test]
    fn oha_clean_run() {
        let r = parse_oha(OHA).unwrap();
        assert!(r.clean(), "{r:?}");
        assert!((r.p50_ms - 0.157675).abs() < 1e-9, "{r:?}");
        assert!((r.p99_ms - 5.829962).abs() < 1e-9, "{r:?}");
        assert_eq!((r.responses, r.ok), (3000, 3000));
    }

    #[test]
    fn oha_run_with_errors() {
        // nginx answered 503 and was then stopped mid-run.
        let r = parse_oha(OHA_ERRORS).unwrap();
        assert!(!r.clean(), "{r:?}");
        assert_eq!((r.responses, r.ok), (1475, 0));
        assert_eq!(r.bad_statuses.get("503"), Some(&1475));
        assert_eq!(
            r.errors.get("Connection refused (os error 111)"),
            Some(&1520)
        );
        assert!(r.success_rate < 0.5);
    }

    #[test]
    fn oha_not_json_is_an_error() {
        assert!(parse_oha("Error: connection refused").is_err());
    }
}
