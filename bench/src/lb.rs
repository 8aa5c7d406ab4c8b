//! Balancing around a slow endpoint: three upstreams, one answering
//! `slow_ms` late; the same fixed-rate load (oha) through one Lumen
//! sidecar with round robin, least request and LEAST_LATENCY (set by an
//! Istio DestinationRule), and through Envoy with LEAST_REQUEST on the same
//! three endpoints; rounds interleaved, medians reported.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::load::{Target, run_oha};
use crate::peers::{self, CollectorPorts, Listener, Proc, SidecarOpts, local};
use crate::report::median;

pub struct Settings {
    pub rate: u32,
    pub connections: u32,
    pub secs: u64,
    pub rounds: u32,
    pub slow_ms: u64,
}

/// What is compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Peer {
    Lumen(&'static str),
    EnvoyLeastRequest,
}

impl Peer {
    pub const ALL: [Peer; 4] = [
        Peer::Lumen("ROUND_ROBIN"),
        Peer::Lumen("LEAST_REQUEST"),
        Peer::Lumen("LEAST_LATENCY"),
        Peer::EnvoyLeastRequest,
    ];

    pub fn label(self) -> String {
        match self {
            Peer::Lumen(lb) => format!("Lumen {lb}"),
            Peer::EnvoyLeastRequest => "Envoy LEAST_REQUEST".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Run {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub success: f64,
    /// Share of requests the slow endpoint answered.
    pub slow_share: f64,
}

/// The upstream of this benchmark (`lumen-bench slow-upstream`): answers
/// `ok` after `delay`, and `/__count` with how many requests it answered
/// since the last `/__count`.
pub fn serve_upstream(port: u16, delay: Duration) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(local(port)).await?;
        let served = Arc::new(AtomicU64::new(0));
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let served = served.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let served = served.clone();
                    async move {
                        let body = if req.uri().path() == "/__count" {
                            Bytes::from(served.swap(0, Ordering::Relaxed).to_string())
                        } else {
                            served.fetch_add(1, Ordering::Relaxed);
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            Bytes::from_static(b"ok")
                        };
                        Ok::<_, Infallible>(http::Response::new(Full::new(body)))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

/// How many requests the upstream on `port` answered since last asked.
fn count(port: u16) -> Result<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&local(port), Duration::from_secs(2))?;
    write!(
        s,
        "GET /__count HTTP/1.1\r\nHost: upstream\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    body.trim()
        .parse()
        .with_context(|| format!("upstream count in {text:?}"))
}

fn write_config(dir: &Path, upstreams: &[u16], lb: &str) -> Result<std::path::PathBuf> {
    let cfg = dir.join(format!("lb-{lb}"));
    std::fs::create_dir_all(&cfg)?;
    let mut mesh = String::from(
        "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {name: bench}\nspec:\n  services:\n    - name: upstream\n      port: 8080\n      endpoints:\n",
    );
    for (i, p) in upstreams.iter().enumerate() {
        let _ = writeln!(
            mesh,
            "        - {{address: {}, version: v{}}}",
            local(*p),
            i + 1
        );
    }
    std::fs::write(cfg.join("mesh.yaml"), mesh)?;
    std::fs::write(
        cfg.join("rule.yaml"),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: upstream}}\nspec:\n  host: upstream\n  trafficPolicy:\n    loadBalancer: {{simple: {lb}}}\n"
        ),
    )?;
    Ok(cfg)
}

/// Runs every peer `rounds` times, interleaved; the runs per peer.
pub fn run(lumen: &Path, dir: &Path, set: &Settings) -> Result<Vec<(Peer, Vec<Run>)>> {
    let ports = peers::free_ports(3)?;
    let mut upstreams: Vec<Proc> = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let delay = if i == 0 { set.slow_ms } else { 0 };
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args([
            "slow-upstream",
            "--port",
            &port.to_string(),
            "--delay-ms",
            &delay.to_string(),
        ]);
        let mut p = Proc::spawn("slow-upstream", cmd, dir.join(format!("upstream-{i}.log")))?;
        p.wait_listening(local(*port))?;
        upstreams.push(p);
    }
    let collector_ports = CollectorPorts::pick()?;
    let first = write_config(dir, &ports, "ROUND_ROBIN")?;
    let _collector = peers::start_collector(lumen, dir, &first, &collector_ports, &[])?;
    let mut out: Vec<(Peer, Vec<Run>)> = Peer::ALL.iter().map(|p| (*p, Vec::new())).collect();
    for round in 1..=set.rounds {
        for (peer, runs) in out.iter_mut() {
            eprintln!("{} (round {round} of {})", peer.label(), set.rounds);
            let listen = peers::free_ports(2)?;
            let _proxy = match *peer {
                Peer::Lumen(lb) => peers::start_lumen_proxy(SidecarOpts {
                    lumen,
                    dir,
                    mesh: &write_config(dir, &ports, lb)?,
                    service: "loadgen",
                    listener: Listener::Outbound(listen[0]),
                    admin: listen[1],
                    collector_otlp_grpc: collector_ports.otlp_grpc,
                    telemetry: true,
                    mtls: None,
                    workers: 1,
                })?,
                Peer::EnvoyLeastRequest => peers::start_envoy(
                    "envoy-lb",
                    dir,
                    &peers::envoy_bootstrap(
                        listen[0],
                        listen[1],
                        &["*"],
                        peers::ENVOY_ROUTE_ALL,
                        &ports,
                        "    lb_policy: LEAST_REQUEST\n",
                    ),
                    listen[1],
                    1,
                )?,
            };
            let target = Target {
                url: format!("http://{}/", local(listen[0])),
                host: Some("upstream:8080".into()),
                body: None,
                grpc: None,
                headers: Vec::new(),
            };
            // Warm-up: pools, and the latency averages of the balancers
            // that keep them.
            run_oha(&target, set.rate, set.connections, 2)?;
            for p in &ports {
                count(*p)?;
            }
            let oha = run_oha(&target, set.rate, set.connections, set.secs)?;
            let counts: Vec<u64> = ports.iter().map(|p| count(*p)).collect::<Result<_>>()?;
            let total: u64 = counts.iter().sum();
            runs.push(Run {
                p50_ms: oha.p50_ms,
                p99_ms: oha.p99_ms,
                success: oha.success_rate,
                slow_share: counts[0] as f64 / total.max(1) as f64,
            });
        }
    }
    Ok(out)
}

pub fn render(
    command: &str,
    machine: &str,
    set: &Settings,
    results: &[(Peer, Vec<Run>)],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Balancing around a slow endpoint\n");
    let _ = writeln!(
        s,
        "Three upstreams, one answering {} ms late; `oha -q {} -c {} --latency-correction` for {} s \
         per run through one proxy (one worker), {} rounds interleaved, medians. Lumen's balancer \
         is set by an Istio DestinationRule (`loadBalancer.simple`); Envoy's cluster has \
         `lb_policy: LEAST_REQUEST` (two random choices, as Lumen's LEAST_REQUEST). Lumen's \
         sidecar records every request (telemetry on, to `lumen up`).\n",
        set.slow_ms, set.rate, set.connections, set.secs, set.rounds
    );
    let _ = writeln!(s, "`{command}` on {machine}\n");
    let _ = writeln!(
        s,
        "| balancer | p50 ms | p99 ms | slow endpoint's share | success |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    let p99 = |peer: Peer| {
        results
            .iter()
            .find(|(p, _)| *p == peer)
            .map(|(_, r)| median(&r.iter().map(|x| x.p99_ms).collect::<Vec<_>>()))
    };
    for (peer, runs) in results {
        let m = |f: fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.2} | {:.1} % | {:.2} % |",
            peer.label(),
            m(|r| r.p50_ms),
            m(|r| r.p99_ms),
            m(|r| r.slow_share) * 100.0,
            m(|r| r.success) * 100.0
        );
    }
    if let (Some(ewma), Some(envoy)) = (
        p99(Peer::Lumen("LEAST_LATENCY")),
        p99(Peer::EnvoyLeastRequest),
    ) {
        let _ = writeln!(
            s,
            "\nLumen LEAST_LATENCY p99 / Envoy LEAST_REQUEST p99: **{:.2}×** (goal ≤ 0.5×)",
            ewma / envoy
        );
    }
    let _ = writeln!(s, "\n## Every round\n");
    for (peer, runs) in results {
        let _ = writeln!(
            s,
            "- {}: {}",
            peer.label(),
            runs.iter()
                .map(|r| format!("p99 {:.2} ms, slow {:.1} %", r.p99_ms, r.slow_share * 100.0))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    s
}
