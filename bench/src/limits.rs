//! The cost of enforcing policies at the sidecar: one upstream behind one
//! Lumen sidecar (one worker, every request recorded), with no RateLimit,
//! then with `limits` RateLimits on the service — first each on a path of
//! its own (a request is subject to one, the others only looked at), then
//! all on every request (each takes a token from its own bucket, keyed by
//! a header). The limits are far above the load, so nothing is refused:
//! what is measured is the checking. CPU time per request of the proxy at
//! a fixed rate; rounds interleaved, medians reported.

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
    pub limits: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Setup {
    None,
    /// Each limit on a path of its own; a request matches one.
    OneApplies,
    /// Every limit applies to every request.
    AllApply,
}

impl Setup {
    fn label(self, n: usize) -> String {
        match self {
            Setup::None => "no limits".into(),
            Setup::OneApplies => format!("{n} limits, 1 applies"),
            Setup::AllApply => format!("{n} limits, all apply"),
        }
    }
}

pub struct Case {
    pub setup: Setup,
    /// Per round: (CPU µs / request, p50 ms, p99 ms, success).
    pub runs: Vec<(f64, f64, f64, f64)>,
}

fn config(dir: &Path, upstream: u16, setup: Setup, n: usize) -> Result<PathBuf> {
    let cfg = dir.join(format!("limits-{setup:?}"));
    std::fs::create_dir_all(&cfg)?;
    let mut y = format!(
        "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: bench}}\nspec:\n  services:\n    - name: upstream\n      port: 8080\n      endpoints: [{{address: {}}}]\n",
        local(upstream)
    );
    if setup != Setup::None {
        for i in 0..n {
            let path = match setup {
                Setup::OneApplies => format!("\n    path: {{prefix: /api/v{i}/}}"),
                _ => String::new(),
            };
            let _ = write!(
                y,
                "---\napiVersion: policy.lumen.dev/v1alpha1\nkind: RateLimit\nmetadata: {{name: limit-{i}}}\nspec:\n  target:\n    service: upstream{path}\n  key: {{header: x-tenant}}\n  requestsPerSecond: 1000000\n"
            );
        }
    }
    std::fs::write(cfg.join("mesh.yaml"), y)?;
    Ok(cfg)
}

pub fn run(lumen: &Path, dir: &Path, set: &Settings) -> Result<Vec<Case>> {
    let (_upstream, upstream_port) = peers::start_fast_upstream(dir)?;
    let collector_ports = CollectorPorts::pick()?;
    let first = config(dir, upstream_port, Setup::None, 0)?;
    let _collector =
        peers::start_collector(lumen, dir, &first.join("mesh.yaml"), &collector_ports, &[])?;
    let mut cases: Vec<Case> = [Setup::None, Setup::OneApplies, Setup::AllApply]
        .into_iter()
        .map(|setup| Case {
            setup,
            runs: Vec::new(),
        })
        .collect();
    for round in 1..=set.rounds {
        for case in cases.iter_mut() {
            eprintln!(
                "{} (round {round} of {})",
                case.setup.label(set.limits),
                set.rounds
            );
            let listen = peers::free_ports(2)?;
            let proxy = peers::start_lumen_proxy(SidecarOpts {
                lumen,
                dir,
                mesh: &config(dir, upstream_port, case.setup, set.limits)?,
                service: "loadgen",
                listener: Listener::Outbound(listen[0]),
                admin: listen[1],
                collector_otlp_grpc: collector_ports.otlp_grpc,
                telemetry: true,
                mtls: None,
                workers: 1,
            })?;
            let last = set.limits.saturating_sub(1);
            let target = Target {
                url: format!("http://{}/api/v{last}/items/42", local(listen[0])),
                host: Some("upstream:8080".into()),
                body: None,
                grpc: None,
                headers: vec!["x-tenant: tenant-1".into()],
            };
            let status = oha_once(&target)?;
            if status != 200 {
                bail!(
                    "{}: answered {status}, not 200",
                    case.setup.label(set.limits)
                );
            }
            let (cpu_us, oha) =
                cpu_per_request(proxy.pid(), &target, set.rate, set.connections, set.secs)?;
            case.runs
                .push((cpu_us, oha.p50_ms, oha.p99_ms, oha.success_rate));
            drop(proxy);
        }
    }
    Ok(cases)
}

pub fn render(command: &str, machine: &str, set: &Settings, cases: &[Case]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# The cost of enforcement at the sidecar\n");
    let _ = writeln!(
        s,
        "One upstream behind one Lumen sidecar (one worker, every request recorded to `lumen up`): \
         no RateLimit; {n} RateLimits on the service, each on a path of its own (a request is \
         subject to one, the others only checked); {n} RateLimits all applying to every request \
         (each takes a token from its bucket, keyed by a header). Limits far above the load: \
         nothing is refused. `oha -q {} -c {}` for {} s per run, {} rounds interleaved, medians. \
         CPU is the proxy process's (all threads) per request answered.\n",
        set.rate,
        set.connections,
        set.secs,
        set.rounds,
        n = set.limits
    );
    let _ = writeln!(s, "`{command}` on {machine}\n");
    let _ = writeln!(
        s,
        "| sidecar | CPU µs / request | vs none | p50 ms | p99 ms | success |\n|---|---|---|---|---|---|"
    );
    let med = |c: &Case, f: fn(&(f64, f64, f64, f64)) -> f64| {
        median(&c.runs.iter().map(f).collect::<Vec<_>>())
    };
    let base = cases
        .iter()
        .find(|c| c.setup == Setup::None)
        .map(|c| med(c, |r| r.0))
        .unwrap_or(f64::NAN);
    for c in cases {
        let cpu = med(c, |r| r.0);
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:+.1} % | {:.2} | {:.2} | {:.2} % |",
            c.setup.label(set.limits),
            cpu,
            (cpu / base - 1.0) * 100.0,
            med(c, |r| r.1),
            med(c, |r| r.2),
            med(c, |r| r.3) * 100.0
        );
    }
    let _ = writeln!(s, "\nGoal: ≤ 3 % CPU for {} active limits.", set.limits);
    let _ = writeln!(s, "\n## Every round\n");
    for c in cases {
        let _ = writeln!(
            s,
            "- {}: {}",
            c.setup.label(set.limits),
            c.runs
                .iter()
                .map(|r| format!("{:.1} µs, p99 {:.2} ms", r.0, r.2))
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
    fn the_limits_are_valid_lumen_config() {
        let dir = tempfile::tempdir().unwrap();
        for setup in [Setup::OneApplies, Setup::AllApply] {
            let cfg = config(dir.path(), 9, setup, 3).unwrap();
            let text = std::fs::read_to_string(cfg.join("mesh.yaml")).unwrap();
            let resources = lumen_core::resource::parse_resources("m.yaml", &text).unwrap();
            let mesh = lumen_core::MeshConfig::from_resources(&resources).unwrap();
            assert_eq!(mesh.rate_limits.len(), 3);
        }
    }
}
