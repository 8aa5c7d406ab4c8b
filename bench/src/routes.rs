//! The cost of a large route table: one upstream behind one proxy whose
//! service has 1 VirtualService route, then `routes` routes (URI regexes,
//! half of them with a header match too), each request taking the last
//! route so every route before it is tried and refused. The same tables
//! in Envoy (`safe_regex` + `headers`). CPU time per request of the proxy
//! process at a fixed rate; what the big table adds over the small one is
//! the number compared. Rounds interleaved, medians reported.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::load::{Target, cpu_per_request, oha_once};
use crate::peers::{self, CollectorPorts, Listener, SidecarOpts, local};
use crate::report::median;

pub struct Settings {
    pub rate: u32,
    pub connections: u32,
    pub secs: u64,
    pub rounds: u32,
    /// Routes in the large table.
    pub routes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Peer {
    Lumen,
    Envoy,
}

impl Peer {
    pub fn label(self) -> &'static str {
        match self {
            Peer::Lumen => "Lumen",
            Peer::Envoy => "Envoy",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Run {
    /// The proxy process's CPU time (all threads) per request answered.
    pub cpu_us: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub success: f64,
}

/// One measured configuration: a peer with a table of `routes` routes.
pub struct Case {
    pub peer: Peer,
    pub routes: usize,
    pub runs: Vec<Run>,
}

/// Route `i` of a table of `n`: a URI regex; every other route, and always
/// the last (the one requests take), a header match as well.
fn route(i: usize, n: usize) -> (String, Option<String>) {
    let regex = format!("/api/v{i}/items/[0-9]+");
    let header = (i.is_multiple_of(2) || i + 1 == n).then(|| format!("tenant-{i}"));
    (regex, header)
}

fn lumen_config(dir: &Path, upstream: u16, n: usize) -> Result<PathBuf> {
    let cfg = dir.join(format!("routes-{n}"));
    std::fs::create_dir_all(&cfg)?;
    std::fs::write(
        cfg.join("mesh.yaml"),
        format!(
            "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: bench}}\nspec:\n  services:\n    - name: upstream\n      port: 8080\n      endpoints: [{{address: {}}}]\n",
            local(upstream)
        ),
    )?;
    let mut vs = String::from(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: upstream}\nspec:\n  hosts: [upstream]\n  http:\n",
    );
    for i in 0..n {
        let (regex, header) = route(i, n);
        let _ = writeln!(
            vs,
            "  - name: r{i}\n    match:\n    - uri: {{regex: \"{regex}\"}}"
        );
        if let Some(h) = header {
            let _ = writeln!(vs, "      headers: {{x-tenant: {{exact: {h}}}}}");
        }
        let _ = writeln!(vs, "    route: [{{destination: {{host: upstream}}}}]");
    }
    std::fs::write(cfg.join("routes.yaml"), vs)?;
    Ok(cfg)
}

/// The same table as Envoy routes (`safe_regex` + `headers`).
fn envoy_routes(n: usize) -> String {
    let mut routes = String::new();
    for i in 0..n {
        let (regex, header) = route(i, n);
        let _ = writeln!(
            routes,
            "              - match:\n                  safe_regex: {{ regex: \"{regex}\" }}"
        );
        if let Some(h) = header {
            let _ = writeln!(
                routes,
                "                  headers: [{{ name: x-tenant, string_match: {{ exact: {h} }} }}]"
            );
        }
        let _ = writeln!(routes, "                route: {{ cluster: upstream }}");
    }
    routes
}

/// Every peer with the small and the large table, `rounds` times,
/// interleaved.
pub fn run(lumen: &Path, dir: &Path, set: &Settings) -> Result<Vec<Case>> {
    let (_upstream, upstream_port) = peers::start_fast_upstream(dir)?;
    let collector_ports = CollectorPorts::pick()?;
    let first = lumen_config(dir, upstream_port, 1)?;
    let _collector = peers::start_collector(lumen, dir, &first, &collector_ports, &[])?;
    let mut cases: Vec<Case> = [Peer::Lumen, Peer::Envoy]
        .into_iter()
        .flat_map(|peer| {
            [1, set.routes].map(|routes| Case {
                peer,
                routes,
                runs: Vec::new(),
            })
        })
        .collect();
    for round in 1..=set.rounds {
        for case in cases.iter_mut() {
            let (peer, n) = (case.peer, case.routes);
            eprintln!(
                "{} with {n} routes (round {round} of {})",
                peer.label(),
                set.rounds
            );
            let listen = peers::free_ports(2)?;
            let proxy = match peer {
                Peer::Lumen => peers::start_lumen_proxy(SidecarOpts {
                    lumen,
                    dir,
                    mesh: &lumen_config(dir, upstream_port, n)?,
                    service: "loadgen",
                    listener: Listener::Outbound(listen[0]),
                    admin: listen[1],
                    collector_otlp_grpc: collector_ports.otlp_grpc,
                    telemetry: true,
                    mtls: None,
                    workers: 1,
                })?,
                Peer::Envoy => peers::start_envoy(
                    "envoy-routes",
                    dir,
                    &peers::envoy_bootstrap(
                        listen[0],
                        listen[1],
                        &["*"],
                        &envoy_routes(n),
                        &[upstream_port],
                        "",
                    ),
                    listen[1],
                    1,
                )?,
            };
            let last = n - 1;
            let target = Target {
                url: format!("http://{}/api/v{last}/items/42", local(listen[0])),
                host: Some("upstream:8080".into()),
                body: None,
                grpc: None,
                headers: vec![format!("x-tenant: tenant-{last}")],
            };
            // The request must take the last route, not fail to match.
            let status = oha_once(&target)?;
            if status != 200 {
                bail!(
                    "{} with {n} routes answered {status}, not 200: the last route did not take the request",
                    peer.label()
                );
            }
            let (cpu_us, oha) =
                cpu_per_request(proxy.pid(), &target, set.rate, set.connections, set.secs)?;
            case.runs.push(Run {
                cpu_us,
                p50_ms: oha.p50_ms,
                p99_ms: oha.p99_ms,
                success: oha.success_rate,
            });
            drop(proxy);
        }
    }
    Ok(cases)
}

fn cpu(cases: &[Case], peer: Peer, routes: usize) -> Option<f64> {
    cases
        .iter()
        .find(|c| c.peer == peer && c.routes == routes)
        .map(|c| median(&c.runs.iter().map(|r| r.cpu_us).collect::<Vec<_>>()))
}

pub fn render(command: &str, machine: &str, set: &Settings, cases: &[Case]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# A large route table\n");
    let _ = writeln!(
        s,
        "One upstream behind one proxy (one worker); its service routed by 1 route, then by {n} \
         routes: each a URI regex (`/api/v<i>/items/[0-9]+`), every other one with a header \
         match (`x-tenant: tenant-<i>`) too. Every request takes the last route, so all the \
         others are tried and refused first. Lumen reads the routes as an Istio VirtualService \
         and records every request (telemetry on, to `lumen up`); Envoy has the same routes as \
         `safe_regex` + `headers` matches. `oha -q {} -c {} --latency-correction` for {} s per \
         run, {} rounds interleaved, medians. CPU is the proxy process's (all threads) per \
         request answered.\n",
        set.rate,
        set.connections,
        set.secs,
        set.rounds,
        n = set.routes
    );
    let _ = writeln!(s, "`{command}` on {machine}\n");
    let _ = writeln!(
        s,
        "| proxy | routes | CPU µs / request | p50 ms | p99 ms | success |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for c in cases {
        let m = |f: fn(&Run) -> f64| median(&c.runs.iter().map(f).collect::<Vec<_>>());
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.2} | {:.2} | {:.2} % |",
            c.peer.label(),
            c.routes,
            m(|r| r.cpu_us),
            m(|r| r.p50_ms),
            m(|r| r.p99_ms),
            m(|r| r.success) * 100.0
        );
    }
    let added = |peer| Some(cpu(cases, peer, set.routes)? - cpu(cases, peer, 1)?);
    if let (Some(l), Some(e)) = (added(Peer::Lumen), added(Peer::Envoy)) {
        let _ = writeln!(
            s,
            "\nCPU added per request by {} routes: Lumen {l:.1} µs, Envoy {e:.1} µs; \
             Lumen / Envoy **{:.2}×** (goal ≤ 1×)",
            set.routes,
            l / e
        );
    }
    let _ = writeln!(s, "\n## Every round\n");
    for c in cases {
        let _ = writeln!(
            s,
            "- {} with {} routes: {}",
            c.peer.label(),
            c.routes,
            c.runs
                .iter()
                .map(|r| format!("{:.1} µs, p99 {:.2} ms", r.cpu_us, r.p99_ms))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_tables_route_the_request_to_the_last_route() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = lumen_config(dir.path(), 9, 4).unwrap();
        let vs = std::fs::read_to_string(cfg.join("routes.yaml")).unwrap();
        assert_eq!(vs.matches("- name: r").count(), 4);
        assert!(vs.contains(
            "uri: {regex: \"/api/v3/items/[0-9]+\"}\n      headers: {x-tenant: {exact: tenant-3}}"
        ));
        assert!(!vs.contains("tenant-1"));
        let envoy = envoy_routes(4);
        assert_eq!(envoy.matches("safe_regex").count(), 4);
        assert!(envoy.contains("exact: tenant-3"));
        assert!(!envoy.contains("tenant-1"));
    }
}
