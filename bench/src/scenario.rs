//! One scenario = one topology on loopback, the same load against it, and
//! the cost of its proxies measured from /proc while the load runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use serde_json::Value;

use crate::http;
use crate::load::{self, OhaResult, Target, WrkResult};
use crate::peers::{self, CollectorPorts, Listener, Proc, SidecarOpts, local};
use crate::procstat::{self, Background, Memory};

/// Host the meshes route on; the name and port of the service in mesh.yaml.
const SERVICE_HOST: &str = "upstream:8080";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// load → nginx
    A,
    /// load → Lumen client → Lumen server → nginx, telemetry on
    B,
    /// as b, telemetry off
    C,
    /// load → Envoy client → Envoy server → nginx
    D,
    /// as b, the hop between the sidecars mutual TLS (certificates from
    /// `lumen up`'s mesh CA, PeerAuthentication STRICT)
    E,
    /// as d, the hop between the Envoys mutual TLS (TLS 1.3, client
    /// certificates required, the server's SPIFFE id checked)
    F,
    /// as e, with every feature a mesh runs on the path: a VirtualService
    /// route with retries and a timeout, a RateLimit far above the load
    G,
    /// as g, telemetry off
    H,
    /// as f, with the same features: a route with a retry policy and a
    /// timeout, a local rate limit far above the load, and Istio's JSON
    /// access log written by both Envoys
    I,
}

impl Scenario {
    pub fn label(self) -> &'static str {
        match self {
            Scenario::A => "(a) nginx direct",
            Scenario::B => "(b) Lumen, telemetry on",
            Scenario::C => "(c) Lumen, telemetry off",
            Scenario::D => "(d) Envoy",
            Scenario::E => "(e) Lumen, mTLS, telemetry on",
            Scenario::F => "(f) Envoy, mTLS",
            Scenario::G => "(g) Lumen, every feature, telemetry on",
            Scenario::H => "(h) Lumen, every feature, telemetry off",
            Scenario::I => "(i) Envoy, every feature",
        }
    }

    /// Lumen's sidecars carry this scenario.
    pub fn is_lumen(self) -> bool {
        matches!(
            self,
            Scenario::B | Scenario::C | Scenario::E | Scenario::G | Scenario::H
        )
    }

    pub fn is_envoy(self) -> bool {
        matches!(self, Scenario::D | Scenario::F | Scenario::I)
    }

    /// Lumen's sidecars record every request and export it.
    pub fn records(self) -> bool {
        matches!(self, Scenario::B | Scenario::E | Scenario::G)
    }

    fn mtls(self) -> bool {
        matches!(
            self,
            Scenario::E | Scenario::F | Scenario::G | Scenario::H | Scenario::I
        )
    }

    fn every_feature(self) -> bool {
        matches!(self, Scenario::G | Scenario::H | Scenario::I)
    }
}

/// What else happens on the machine while the fixed-rate (latency) run
/// measures: telemetry must drop and count, never make a request wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Stress {
    /// Nothing.
    None,
    /// The collector (`lumen up`) stopped with SIGSTOP: exports hang.
    CollectorStopped,
    /// SQL queries that run for minutes sent to the collector in a loop.
    RunawayQuery,
}

impl Stress {
    pub fn label(self) -> &'static str {
        match self {
            Stress::None => "",
            Stress::CollectorStopped => " [collector stopped]",
            Stress::RunawayQuery => " [runaway query]",
        }
    }
}

/// A self-join of every record with every other: minutes of CPU on a
/// collector holding this bench's hundreds of thousands of records.
const RUNAWAY_SQL: &str = "SELECT count(*) AS n FROM requests a, requests b \
     WHERE a.duration_us + b.duration_us > 7 AND a.path <> b.method";

pub struct Settings {
    pub lumen: PathBuf,
    pub tmp: PathBuf,
    pub duration: u64,
    pub warmup: u64,
    pub rate: u32,
    pub wrk_connections: u32,
    pub oha_connections: u32,
    pub clk_tck: u64,
    /// Requests POST this file as their body (GET without).
    pub body: Option<PathBuf>,
    /// gRPC calls over HTTP/2 to a gRPC app instead of HTTP/1.1 to
    /// nginx (`body` is then the framed request): this method.
    pub grpc: Option<&'static str>,
    /// Worker threads of each proxy (Lumen `--workers`, Envoy `--concurrency`).
    pub workers: u16,
    /// No connection between the two proxies carries a second request.
    pub fresh_connections: bool,
}

pub struct Measured {
    pub scenario: Scenario,
    pub stress: Stress,
    pub wrk: WrkResult,
    pub oha: OhaResult,
    /// CPU seconds of both proxies together per 1000 requests of the
    /// fixed-rate run; None without proxies.
    pub cpu_s_per_1000: Option<f64>,
    /// The same during the wrk run, where the proxies are saturated.
    pub saturated_cpu_s_per_1000: Option<f64>,
    /// Largest memory of the proxies after the runs.
    pub memory: Option<Memory>,
    /// Largest memory of the proxies started and idle (one request served).
    pub idle_memory: Option<Memory>,
    /// System calls and context switches of both proxies per request of
    /// the fixed-rate run (perf's count, all threads).
    pub kernel: Option<procstat::KernelCounts>,
    pub telemetry: Option<TelemetryCheck>,
    /// CPU used outside the benchmark during the wrk and the oha run.
    pub background: [Background; 2],
    /// Cores `lumen up` kept busy during the wrk run: on a small machine the
    /// collector takes CPU the proxies would otherwise have.
    pub collector_cores: Option<f64>,
}

impl Measured {
    /// More than this share of the machine used by others during a
    /// measurement makes its numbers suspect.
    pub const NOISY: f64 = 0.10;

    pub fn noisy(&self) -> bool {
        self.background
            .iter()
            .any(|b| b.other > Self::NOISY || b.steal > Self::NOISY)
    }
}

/// Did the collector really receive a record per request per sidecar?
pub struct TelemetryCheck {
    pub requests_sent: u64,
    pub records_in_collector: u64,
    /// Sums over both sidecars of their own counters.
    pub proxy_requests: u64,
    pub exported: u64,
    pub dropped: u64,
}

/// The processes of a running topology, stopped in reverse start order
/// (load-facing proxies first, nginx last) when dropped.
struct Topology {
    procs: Vec<Proc>,
    /// Indexes into `procs` of the proxies whose cost is measured.
    proxies: Vec<usize>,
    target: Target,
    /// Lumen only: the query API and the sidecars' admin ports.
    query: Option<u16>,
    /// Index into `procs` of `lumen up`, whose CPU competes with the proxies.
    collector: Option<usize>,
    admins: Vec<u16>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        while let Some(mut p) = self.procs.pop() {
            p.stop();
        }
    }
}

impl Topology {
    fn proxy_pids(&self) -> Vec<u32> {
        self.proxies.iter().map(|&i| self.procs[i].pid()).collect()
    }

    fn check_alive(&mut self) -> Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_alive)
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(Proc::log_tail)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

pub fn run(s: Scenario, stress: Stress, round: u32, set: &Settings) -> Result<Measured> {
    // A fresh directory per round: the collector's data must hold this
    // round's records only.
    let dir = set
        .tmp
        .join(format!("{s:?}-{stress:?}-{round}").to_lowercase());
    fs::create_dir_all(&dir)?;
    let mut topo = start(s, set, &dir)?;
    probe(&mut topo)?;
    let pids = topo.proxy_pids();
    let idle_memory = max_memory(&pids)?;

    eprintln!("  warm-up: wrk {} s", set.warmup);
    let warm = load::run_wrk(&topo.target, set.wrk_connections, set.warmup)?;
    eprintln!(
        "  throughput: wrk -c{} {} s",
        set.wrk_connections, set.duration
    );
    let collector_pid = topo.collector.map(|i| topo.procs[i].pid());
    let collector_before = total_ticks(collector_pid.as_slice())?;
    let window = procstat::Window::start()?;
    let saturated_before = total_ticks(&pids)?;
    let wrk = load::run_wrk(&topo.target, set.wrk_connections, set.duration)?;
    let saturated_after = total_ticks(&pids)?;
    let wrk_background = window.finish()?;
    let saturated_cpu_s_per_1000 = (!pids.is_empty() && wrk.requests > 0).then(|| {
        let secs = (saturated_after - saturated_before) as f64 / set.clk_tck as f64;
        secs / (wrk.requests as f64 / 1000.0)
    });
    let collector_cores = match collector_pid {
        Some(pid) => {
            let ticks = procstat::cpu_ticks(pid)? - collector_before;
            Some(ticks as f64 / set.clk_tck as f64 / set.duration as f64)
        }
        None => None,
    };
    topo.check_alive()?;

    eprintln!(
        "  latency: oha -q {} -c{} {} s",
        set.rate, set.oha_connections, set.duration
    );
    let window = procstat::Window::start()?;
    let counting = (!pids.is_empty())
        .then(|| procstat::KernelCounter::start(&pids, &dir))
        .transpose()?;
    let stressing = Stressing::start(stress, &topo, set.duration)?;
    let cpu_before = total_ticks(&pids)?;
    let oha = load::run_oha(&topo.target, set.rate, set.oha_connections, set.duration);
    let cpu_after = total_ticks(&pids)?;
    stressing.finish()?;
    let oha = oha?;
    let kernel = counting.map(|c| c.finish(oha.responses)).transpose()?;
    let oha_background = window.finish()?;
    topo.check_alive()?;

    let cpu_s_per_1000 = (!pids.is_empty() && oha.responses > 0).then(|| {
        let secs = (cpu_after - cpu_before) as f64 / set.clk_tck as f64;
        secs / (oha.responses as f64 / 1000.0)
    });
    let memory = max_memory(&pids)?;
    // The probe request counts too.
    let telemetry = s
        .records()
        .then(|| check_telemetry(&topo, 1 + warm.requests + wrk.requests + oha.responses))
        .transpose()?;
    Ok(Measured {
        scenario: s,
        stress,
        wrk,
        oha,
        cpu_s_per_1000,
        saturated_cpu_s_per_1000,
        memory,
        idle_memory,
        kernel,
        telemetry,
        background: [wrk_background, oha_background],
        collector_cores,
    })
}

impl TelemetryCheck {
    /// Records the sidecars made that are neither in the collector nor
    /// counted as dropped: telemetry that was silently lost.
    pub fn missing(&self) -> i64 {
        self.proxy_requests as i64 - self.dropped as i64 - self.records_in_collector as i64
    }

    pub fn summary(&self) -> String {
        let expected = 2 * self.requests_sent;
        let verdict = match self.missing() {
            0 => "all accounted for".to_string(),
            n if n > 0 => format!("MISMATCH: {n} records lost without being counted"),
            n => format!("MISMATCH: {} more records than the sidecars made", -n),
        };
        format!(
            "collector holds {} request records for {} requests sent ({:.1}% of the 2 per \
             request expected; wrk does not count requests in flight when it stops, so slightly \
             over 100% is normal); the sidecars made {} records, exported {}, dropped {}: {verdict}",
            self.records_in_collector,
            self.requests_sent,
            self.records_in_collector as f64 * 100.0 / expected.max(1) as f64,
            self.proxy_requests,
            self.exported,
            self.dropped,
        )
    }
}

/// A stress running beside the latency run, until [`Stressing::finish`].
enum Stressing {
    None,
    Stopped(u32),
    Querying {
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        thread: std::thread::JoinHandle<u32>,
    },
}

impl Stressing {
    fn start(stress: Stress, topo: &Topology, secs: u64) -> Result<Self> {
        let collector = || {
            topo.collector
                .map(|i| topo.procs[i].pid())
                .context("this scenario runs no collector to stress")
        };
        Ok(match stress {
            Stress::None => Stressing::None,
            Stress::CollectorStopped => {
                let pid = collector()?;
                procstat::signal("-STOP", pid)?;
                Stressing::Stopped(pid)
            }
            Stress::RunawayQuery => {
                let query = topo.query.context("no collector in this topology")?;
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let flag = stop.clone();
                let deadline = Instant::now() + Duration::from_secs(secs + 5);
                let thread = std::thread::spawn(move || {
                    // Each query outlives the client's 5 s timeout; the next
                    // one starts at once, so the collector always has one.
                    let mut sent = 0;
                    while !flag.load(std::sync::atomic::Ordering::Relaxed)
                        && Instant::now() < deadline
                    {
                        let _ = http::post(local(query), "/api/v1/sql", RUNAWAY_SQL);
                        sent += 1;
                    }
                    sent
                });
                Stressing::Querying { stop, thread }
            }
        })
    }

    fn finish(self) -> Result<()> {
        match self {
            Stressing::None => Ok(()),
            Stressing::Stopped(pid) => procstat::signal("-CONT", pid),
            Stressing::Querying { stop, thread } => {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let sent = thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("the runaway-query thread panicked"))?;
                eprintln!("  stress: {sent} runaway queries sent to the collector");
                Ok(())
            }
        }
    }
}

/// The largest memory figures of `pids`, None without proxies.
fn max_memory(pids: &[u32]) -> Result<Option<Memory>> {
    let mut max: Option<Memory> = None;
    for &pid in pids {
        let m = Memory::of(pid)?;
        max = Some(max.map_or(m, |x| x.max(m)));
    }
    Ok(max)
}

fn total_ticks(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|&p| procstat::cpu_ticks(p)).sum()
}

fn start(s: Scenario, set: &Settings, dir: &Path) -> Result<Topology> {
    let ports = peers::free_ports(8)?;
    let [
        nginx,
        front,
        back,
        admin1,
        admin2,
        otlp_grpc,
        otlp_http,
        query,
    ] = ports[..]
    else {
        unreachable!("asked for 8 ports")
    };
    let grpc = set.grpc;
    let upstream = if grpc.is_some() {
        peers::start_grpc_upstream(dir, nginx)?
    } else {
        peers::start_nginx(dir, nginx)?
    };
    let mut topo = Topology {
        procs: vec![upstream],
        proxies: vec![],
        collector: None,
        target: Target {
            url: format!("http://{}/", local(front)),
            host: Some(SERVICE_HOST.into()),
            body: set.body.clone(),
            grpc,
            headers: Vec::new(),
        },
        query: None,
        admins: vec![],
    };
    match s {
        Scenario::A => {
            topo.target = Target {
                url: format!("http://{}/", local(nginx)),
                host: None,
                body: set.body.clone(),
                grpc,
                headers: Vec::new(),
            };
        }
        Scenario::B | Scenario::C | Scenario::E | Scenario::G | Scenario::H => {
            let mtls = s.mtls();
            let mesh = peers::write_mesh(dir, local(back), grpc.is_some())?;
            if mtls {
                peers::append_strict_mtls(&mesh)?;
            }
            if s.every_feature() {
                peers::append_every_feature(&mesh)?;
            }
            if set.fresh_connections {
                peers::append_fresh_connections(&mesh)?;
            }
            let control = peers::free_ports(1)?[0];
            // The collector runs in (c) too, idle, so that (b) − (c) is the
            // cost of telemetry alone and not of one extra process.
            let cports = CollectorPorts {
                otlp_grpc,
                otlp_http,
                query,
            };
            let control_addr = local(control).to_string();
            topo.procs.push(peers::start_collector(
                &set.lumen,
                dir,
                &mesh,
                &cports,
                &["--control-addr", &control_addr],
            )?);
            let token = dir.join("lumen-data/control/ca/join-token");
            topo.query = Some(query);
            topo.collector = Some(topo.procs.len() - 1);
            let sidecar = |service, listener, admin| SidecarOpts {
                lumen: &set.lumen,
                dir,
                mesh: &mesh,
                service,
                listener,
                admin,
                collector_otlp_grpc: otlp_grpc,
                telemetry: s.records(),
                mtls: mtls.then(|| (control, token.clone())),
                workers: set.workers,
            };
            let app = Listener::Inbound {
                port: back,
                app: nginx,
            };
            topo.procs
                .push(peers::start_lumen_proxy(sidecar("upstream", app, admin2))?);
            let client = Listener::Outbound(front);
            topo.procs
                .push(peers::start_lumen_proxy(sidecar("client", client, admin1))?);
            topo.proxies = vec![2, 3];
            topo.admins = vec![admin1, admin2];
            if mtls {
                // Both certified, and the client knows the server takes mTLS
                // (STRICT refuses anything else, so the probe proves it).
                for admin in [admin1, admin2] {
                    peers::wait_certified(admin)?;
                }
            }
        }
        Scenario::D | Scenario::F | Scenario::I => {
            let h2 = grpc.is_some();
            // The client routes only the service's name, as Lumen's outbound
            // listener does.
            let domains = [SERVICE_HOST, "upstream"];
            let (mut server, mut client) = if s.mtls() {
                let certs = peers::EnvoyCerts::make(dir)?;
                (
                    peers::envoy_mtls_server(back, admin2, nginx, &certs, h2),
                    peers::envoy_mtls_client(front, admin1, back, &domains, &certs, h2),
                )
            } else {
                (
                    peers::envoy_config(back, admin2, nginx, &["*"], h2),
                    peers::envoy_config(front, admin1, back, &domains, h2),
                )
            };
            if s.every_feature() {
                server = peers::envoy_every_feature(
                    &server,
                    &dir.join("envoy-server-access.log"),
                    false,
                );
                client =
                    peers::envoy_every_feature(&client, &dir.join("envoy-client-access.log"), true);
            }
            topo.procs.push(peers::start_envoy(
                "envoy-server",
                dir,
                &server,
                admin2,
                set.workers,
            )?);
            let client = fresh(client, set);
            topo.procs.push(peers::start_envoy(
                "envoy-client",
                dir,
                &client,
                admin1,
                set.workers,
            )?);
            topo.proxies = vec![1, 2];
        }
    }
    Ok(topo)
}

/// The client Envoy's cluster with one request per upstream connection,
/// when the settings ask for it.
fn fresh(config: String, set: &Settings) -> String {
    if !set.fresh_connections {
        return config;
    }
    config.replacen(
        "    load_assignment:\n",
        "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        common_http_protocol_options: { max_requests_per_connection: 1 }\n        explicit_http_config:\n          http_protocol_options: {}\n    load_assignment:\n",
        1,
    )
}

/// One request through the whole path before any load, so a broken topology
/// fails with the processes' logs instead of as a wall of wrk errors.
fn probe(topo: &mut Topology) -> Result<()> {
    if topo.target.grpc.is_some() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            topo.check_alive()?;
            let last = match load::oha_once(&topo.target) {
                Ok(200) if topo.target.grpc == Some(crate::grpc::STREAM_PATH) => {
                    let url = topo.target.url.trim_end_matches('/');
                    return crate::grpc::check_stream(url, topo.target.host.as_deref())
                        .with_context(|| format!("a DoGet stream through {url}"));
                }
                Ok(200) => return Ok(()),
                Ok(s) => format!("status {s}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "the gRPC call through {} never succeeded; last: {last}\n{}",
                    topo.target.url,
                    topo.logs()
                );
            }
            sleep(Duration::from_millis(200));
        }
    }
    let url = topo.target.url.clone();
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .context("target address")?;
    let host = topo.target.host.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        topo.check_alive()?;
        let last = match http::get(addr, "/", host.as_deref()) {
            Ok(r) if r.status == 200 && r.body.contains("hello from nginx") => return Ok(()),
            Ok(r) => format!("{} {:?}", r.status, http::truncate(&r.body, 300)),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "GET {url} (Host: {}) never answered nginx's 200; last answer: {last}\n{}",
                host.as_deref().unwrap_or("-"),
                topo.logs()
            );
        }
        sleep(Duration::from_millis(200));
    }
}

fn check_telemetry(topo: &Topology, requests_sent: u64) -> Result<TelemetryCheck> {
    let query = topo.query.context("no collector in this topology")?;
    eprintln!("  telemetry: waiting for the collector's record count to settle");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = (u64::MAX, Instant::now());
    loop {
        let n = count_records(query)?;
        let (proxy_requests, exported, dropped) = proxy_counters(&topo.admins)?;
        // Settled: every record the sidecars produced is either in the
        // collector or counted as dropped, or the count stopped moving.
        let accounted = n + dropped >= proxy_requests;
        if n != last.0 {
            last = (n, Instant::now());
        }
        let still = last.1.elapsed() > Duration::from_secs(3);
        if accounted || still || Instant::now() > deadline {
            return Ok(TelemetryCheck {
                requests_sent,
                records_in_collector: n,
                proxy_requests,
                exported,
                dropped,
            });
        }
        sleep(Duration::from_millis(500));
    }
}

fn count_records(query: u16) -> Result<u64> {
    let r = http::post(
        local(query),
        "/api/v1/sql",
        "SELECT count(*) AS n FROM requests",
    )?;
    if r.status != 200 {
        bail!("SQL API answered {}: {}", r.status, r.body);
    }
    parse_count(&r.body).with_context(|| format!("SQL API answer {:?}", r.body))
}

/// `n` of the first row of the SQL API's JSON answer (an array of row objects).
pub fn parse_count(json: &str) -> Result<u64> {
    let v: Value = serde_json::from_str(json)?;
    let n = v.pointer("/0/n").context("no rows[0].n")?;
    // Arrow's JSON writer may quote 64-bit integers.
    n.as_u64()
        .or_else(|| n.as_str().and_then(|s| s.parse().ok()))
        .with_context(|| format!("n is not a count: {n}"))
}

/// (requests, records exported, records dropped) summed over the sidecars.
fn proxy_counters(admins: &[u16]) -> Result<(u64, u64, u64)> {
    let mut sums = (0.0, 0.0, 0.0);
    for &port in admins {
        let r = http::get(local(port), "/stats/prometheus", None)?;
        if r.status != 200 {
            bail!("admin :{port}/stats/prometheus answered {}", r.status);
        }
        sums.0 += prom_sum(&r.body, "istio_requests_total");
        sums.1 += prom_sum(&r.body, "lumen_telemetry_records_exported_total");
        sums.2 += prom_sum(&r.body, "lumen_telemetry_records_dropped_total");
    }
    Ok((sums.0 as u64, sums.1 as u64, sums.2 as u64))
}

/// Sum of every series of one metric in Prometheus text exposition.
pub fn prom_sum(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(metric)?;
            // Exactly this metric: followed by labels or the value.
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            let value = match rest.rfind('}') {
                Some(i) => &rest[i + 1..],
                None => rest,
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_from_sql_json() {
        assert_eq!(parse_count(r#"[{"n":20042}]"#).unwrap(), 20042);
        assert_eq!(parse_count(r#"[{"n":"7"}]"#).unwrap(), 7);
        assert!(parse_count("[]").is_err());
    }

    #[test]
    fn prometheus_sums_series_of_one_metric() {
        let text = "# HELP lumen_requests Requests completed by this proxy.\n\
            # TYPE lumen_requests counter\n\
            istio_requests_total{reporter=\"source\",source_app=\"client\",destination_service_name=\"upstream\",response_code=\"200\"} 1500\n\
            istio_requests_total{reporter=\"source\",source_app=\"client\",destination_service_name=\"upstream\",response_code=\"503\"} 2\n\
            istio_requests_total_other 99\n\
            lumen_telemetry_records_dropped_total{reason=\"queue_full\"} 10\n\
            lumen_telemetry_records_dropped_total{reason=\"export_failed\"} 0\n\
            lumen_telemetry_records_exported_total 1492\n\
            # EOF\n";
        assert_eq!(prom_sum(text, "istio_requests_total"), 1502.0);
        assert_eq!(
            prom_sum(text, "lumen_telemetry_records_dropped_total"),
            10.0
        );
        assert_eq!(
            prom_sum(text, "lumen_telemetry_records_exported_total"),
            1492.0
        );
        assert_eq!(prom_sum(text, "missing_total"), 0.0);
    }
}
