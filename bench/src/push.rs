//! Configuration push to many proxies: `lumen control` with a mesh of
//! `services` services (each with three endpoints, a DestinationRule and a
//! VirtualService), `proxies` config streams opened the way sidecars open
//! them (one connection each, node first, every snapshot acknowledged), then
//! `changes` weight changes applied with `lumen apply`'s call: the time from
//! the apply until every stream has the new version, and until the control
//! plane has every acknowledgement; the control plane's memory.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lumen_core::control::v1::control_plane_client::ControlPlaneClient;
use lumen_core::control::v1::{self, Node, ProxyMessage};
use lumen_core::resource::parse_resources;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::peers::{self, Proc, local};
use crate::report::median;

pub struct Settings {
    pub proxies: usize,
    pub services: usize,
    pub changes: usize,
}

pub struct Outcome {
    /// Per change: (all received, all acknowledged at the control plane).
    pub pushes: Vec<(Duration, Duration)>,
    pub connect_all: Duration,
    pub rss_idle_mib: f64,
    /// Once every stream has its first snapshot.
    pub rss_connected_mib: f64,
    /// Right after the last change was acknowledged.
    pub rss_mib: f64,
    /// After the allocator's purge delay (10 s): what the streams hold,
    /// not memory freed and not yet handed back.
    pub rss_settled_mib: f64,
    pub snapshot_bytes: usize,
}

fn mesh(services: usize, weight: u32) -> String {
    let mut y = String::from(
        "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {name: scale}\nspec:\n  services:\n",
    );
    for s in 0..services {
        let _ = writeln!(y, "    - name: svc-{s}\n      port: 8080\n      endpoints:");
        for e in 0..3 {
            let _ = writeln!(
                y,
                "        - {{address: 10.{}.{}.{e}:8080, version: v{}}}",
                s / 250,
                s % 250,
                e % 2 + 1
            );
        }
    }
    for s in 0..services {
        let _ = write!(
            y,
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: svc-{s}}}\nspec:\n  host: svc-{s}\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: svc-{s}}}\nspec:\n  hosts: [svc-{s}]\n  http:\n  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]\n    route: [{{destination: {{host: svc-{s}, subset: v2}}}}]\n  - route:\n    - {{destination: {{host: svc-{s}, subset: v1}}, weight: {weight}}}\n    - {{destination: {{host: svc-{s}, subset: v2}}, weight: {}}}\n",
            100 - weight
        );
    }
    y
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// One simulated proxy: its stream, acknowledging every snapshot and
/// publishing the version it got.
async fn proxy(addr: String, n: usize, got: watch::Sender<String>) -> Result<()> {
    let mut client = ControlPlaneClient::connect(addr).await?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(ProxyMessage {
        node: Some(Node {
            id: format!("sim-{n}"),
            service: "sim".into(),
            namespace: "default".into(),
            workload: format!("sim-{n}"),
            version: "v1".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;
    let mut stream = client
        .stream_config(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(s) = stream.message().await? {
        if s.more {
            continue;
        }
        got.send_replace(s.version_info.clone());
        tx.send(ProxyMessage {
            version_info: s.version_info,
            response_nonce: s.nonce,
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

pub fn run(lumen: &Path, dir: &Path, set: &Settings) -> Result<Outcome> {
    let config = dir.join("push-config");
    std::fs::create_dir_all(&config)?;
    std::fs::write(config.join("mesh.yaml"), mesh(set.services, 100))?;
    let port = peers::free_ports(1)?[0];
    let mut cmd = std::process::Command::new(lumen);
    cmd.arg("control")
        .arg("-f")
        .arg(&config)
        .args(["--control-addr", &local(port).to_string()])
        .args(["--monitoring-addr", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("control-data"));
    let mut control = Proc::spawn("lumen control", cmd, dir.join("control.log"))?;
    control.wait_listening(local(port))?;
    let pid = control.pid();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let url = format!("http://{}", local(port));
        let rss_idle_mib = rss_mib(pid);
        let started = Instant::now();
        let mut versions = Vec::with_capacity(set.proxies);
        let failed = Arc::new(AtomicUsize::new(0));
        for n in 0..set.proxies {
            let (tx, rx) = watch::channel(String::new());
            versions.push(rx);
            let (url, failed) = (url.clone(), failed.clone());
            tokio::spawn(async move {
                if let Err(e) = proxy(url, n, tx).await
                    && failed.fetch_add(1, Ordering::Relaxed) == 0
                {
                    eprintln!("a simulated proxy failed: {e:#}");
                }
            });
        }
        let mut admin = ControlPlaneClient::connect(url.clone()).await?;
        let first = admin
            .get(v1::GetRequest::default())
            .await?
            .into_inner()
            .version;
        wait_all(&versions, &first, &failed).await?;
        let connect_all = started.elapsed();
        let rss_connected_mib = rss_mib(pid);
        let snapshot_bytes = {
            use prost::Message;
            v1::GetResponse {
                resources: admin
                    .get(v1::GetRequest::default())
                    .await?
                    .into_inner()
                    .resources,
                ..Default::default()
            }
            .encoded_len()
        };
        eprintln!(
            "{} streams on version {first} in {connect_all:?}",
            set.proxies
        );
        let mut pushes = Vec::new();
        for change in 0..set.changes {
            let weight = 90 - 10 * (change as u32 % 8);
            let resources = parse_resources("weights.yaml", &mesh(set.services, weight))?;
            let t0 = Instant::now();
            let version = admin
                .apply(v1::ApplyRequest {
                    resources: resources.iter().map(v1::Resource::from).collect(),
                    dry_run: false,
                })
                .await?
                .into_inner()
                .version;
            wait_all(&versions, &version, &failed).await?;
            let received = t0.elapsed();
            loop {
                let status = admin
                    .proxy_status(v1::ProxyStatusRequest {})
                    .await?
                    .into_inner();
                let acked = status
                    .proxies
                    .iter()
                    .filter(|p| p.acked_version == version)
                    .count();
                if acked == set.proxies {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(60) {
                    bail!(
                        "only {acked} of {} proxies acknowledged {version}",
                        set.proxies
                    );
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let acked = t0.elapsed();
            eprintln!(
                "change {}: all received in {received:?}, all acked in {acked:?}",
                change + 1
            );
            pushes.push((received, acked));
        }
        let rss_after = rss_mib(pid);
        tokio::time::sleep(Duration::from_secs(12)).await;
        Ok(Outcome {
            pushes,
            connect_all,
            rss_idle_mib,
            rss_connected_mib,
            rss_mib: rss_after,
            rss_settled_mib: rss_mib(pid),
            snapshot_bytes,
        })
    })
}

async fn wait_all(
    versions: &[watch::Receiver<String>],
    version: &str,
    failed: &AtomicUsize,
) -> Result<()> {
    for rx in versions {
        let mut rx = rx.clone();
        tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|v| v == version))
            .await
            .context("a proxy never got the version")?
            .context("a simulated proxy ended")?;
        if failed.load(Ordering::Relaxed) > 0 {
            bail!("simulated proxies failed");
        }
    }
    Ok(())
}

pub fn render(command: &str, machine: &str, set: &Settings, o: &Outcome) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let received = median(&o.pushes.iter().map(|p| ms(p.0)).collect::<Vec<_>>());
    let acked = median(&o.pushes.iter().map(|p| ms(p.1)).collect::<Vec<_>>());
    let worst = o.pushes.iter().map(|p| ms(p.1)).fold(0.0, f64::max);
    let mut s = String::new();
    let _ = writeln!(s, "# Configuration push to {} proxies\n", set.proxies);
    let _ = writeln!(
        s,
        "`lumen control` (release build) serving {} services, each with 3 endpoints, a \
         DestinationRule and a VirtualService ({} resources, a {:.0} KiB snapshot); {} \
         simulated proxies, one connection and one config stream each, acknowledging every \
         snapshot; then {} weight changes through the Apply call (`lumen apply`). Times are \
         from the apply's start.\n",
        set.services,
        1 + 2 * set.services,
        o.snapshot_bytes as f64 / 1024.0,
        set.proxies,
        set.changes
    );
    let _ = writeln!(s, "`{command}` on {machine}\n");
    let _ = writeln!(s, "| figure | value | goal |");
    let _ = writeln!(s, "|---|---|---|");
    let _ = writeln!(
        s,
        "| every proxy has the change (median) | {received:.0} ms | |"
    );
    let _ = writeln!(
        s,
        "| every proxy acknowledged it (median) | {acked:.0} ms | ≤ 1000 ms |"
    );
    let _ = writeln!(
        s,
        "| every proxy acknowledged it (worst) | {worst:.0} ms | |"
    );
    let _ = writeln!(
        s,
        "| {} streams connected and synced | {:.0} ms | |",
        set.proxies,
        ms(o.connect_all)
    );
    let _ = writeln!(
        s,
        "| control plane RSS, no proxies | {:.1} MiB | |",
        o.rss_idle_mib
    );
    let _ = writeln!(
        s,
        "| control plane RSS, {} proxies connected | {:.1} MiB | |",
        set.proxies, o.rss_connected_mib
    );
    let _ = writeln!(
        s,
        "| control plane RSS, {} proxies, right after the pushes | {:.1} MiB | |",
        set.proxies, o.rss_mib
    );
    let _ = writeln!(
        s,
        "| control plane RSS, {} proxies, 12 s later | {:.1} MiB | ≤ 100 MB |",
        set.proxies, o.rss_settled_mib
    );
    let _ = writeln!(
        s,
        "\nistiod's published sizing: 1 vCPU and 1.5 GB of memory for 2,000 sidecars."
    );
    s
}
