//! Chaos: the mesh under steady mixed traffic — HTTP/1.1, HTTP/2, gRPC and
//! TCP through sidecars with STRICT mTLS from the mesh CA, a VirtualService
//! with retries, outlier detection and a RateLimit in force — while one
//! fault at a time is applied and then healed: `kill -9` of `lumen up`
//! (collector, policy engine and its query service), of the control plane
//! (config and CA), of the standalone query service and of one sidecar of a
//! service with two; a 30 s partition between the sidecars and the
//! collector, then the control plane (iptables DROP); a full disk under the
//! collector; a slow disk (every fsync delayed by an `LD_PRELOAD` shim);
//! a clock stepped 5 minutes forward, then back, on one sidecar
//! (libfaketime).
//!
//! After each fault the load pauses until every sidecar's records are
//! accounted for, so each row of the table is exact: requests made and
//! failed; telemetry rows made, acknowledged by the collector, stored and
//! dropped (by counter); duplicates; and the time from healing to the mesh
//! being whole again. The table is printed (RELIABILITY.md holds a run of
//! it). Everything runs in a network namespace and a mount namespace of the
//! test's own (`unshare`), so the iptables rules and the tmpfs touch
//! nothing else; it needs root, as CI has.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use lumen_tests::upstream::start_app;
use lumen_tests::{
    DialSidecar, LumenProcess, Sidecar, SidecarPorts, UpPorts, counter_sum, free_port,
    h2_client_via, local, lumen_bin, peer_tool, run, sql, sql_count,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IN_NAMESPACE: &str = "LUMEN_CHAOS_IN_NAMESPACE";

/// Runs the body in fresh network and mount namespaces: the test binary
/// again, under `unshare`.
#[test]
fn the_mesh_rides_out_one_fault_at_a_time() -> Result<()> {
    if std::env::var_os(IN_NAMESPACE).is_some() {
        return tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(chaos());
    }
    let unshare = peer_tool("unshare", "apt-get install util-linux");
    peer_tool("iptables", "apt-get install iptables");
    let status = Command::new(unshare)
        .args(["--net", "--mount", "--propagation", "private", "--"])
        .arg(std::env::current_exe()?)
        .args([
            "--exact",
            "the_mesh_rides_out_one_fault_at_a_time",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(IN_NAMESPACE, "1")
        .status()
        .context("running the test under unshare (it needs root)")?;
    if !status.success() {
        bail!("the chaos run failed ({status}); its output is above");
    }
    Ok(())
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn get(url: &str) -> Result<String> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?
        .get(url)
        .send()
        .await?
        .text()
        .await?)
}

/// What the sidecars have recorded so far, summed.
#[derive(Debug, Default, Clone, Copy)]
struct Records {
    made: f64,
    exported: f64,
    dropped: f64,
}

impl std::ops::Add for Records {
    type Output = Records;
    fn add(self, o: Records) -> Records {
        Records {
            made: self.made + o.made,
            exported: self.exported + o.exported,
            dropped: self.dropped + o.dropped,
        }
    }
}

impl std::ops::Sub for Records {
    type Output = Records;
    fn sub(self, o: Records) -> Records {
        Records {
            made: self.made - o.made,
            exported: self.exported - o.exported,
            dropped: self.dropped - o.dropped,
        }
    }
}

/// Requests by protocol: answered as expected, and failed (with the first
/// few reasons).
#[derive(Default)]
struct Load {
    running: AtomicBool,
    stop: AtomicBool,
    in_flight: AtomicU64,
    ok: [AtomicU64; 4],
    failed: [AtomicU64; 4],
    reasons: Mutex<Vec<String>>,
}

const PROTOCOLS: [&str; 4] = ["HTTP/1.1", "HTTP/2", "gRPC", "TCP"];

impl Load {
    fn outcome(&self, p: usize, result: Result<()>) {
        match result {
            Ok(()) => self.ok[p].fetch_add(1, Ordering::SeqCst),
            Err(e) => {
                let mut r = self.reasons.lock().unwrap();
                if r.len() < 5 {
                    r.push(format!("{}: {e:#}", PROTOCOLS[p]));
                }
                self.failed[p].fetch_add(1, Ordering::SeqCst)
            }
        };
    }

    /// Counts since the last take: (ok, failed) per protocol, and reasons.
    fn take(&self) -> ([u64; 4], [u64; 4], Vec<String>) {
        let ok = std::array::from_fn(|i| self.ok[i].swap(0, Ordering::SeqCst));
        let failed = std::array::from_fn(|i| self.failed[i].swap(0, Ordering::SeqCst));
        (
            ok,
            failed,
            std::mem::take(&mut *self.reasons.lock().unwrap()),
        )
    }

    async fn pause(&self) {
        self.running.store(false, Ordering::SeqCst);
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn resume(&self) {
        self.running.store(true, Ordering::SeqCst);
    }
}

/// One client loop of protocol `p`: a request every 40 ms while running.
fn drive<F, Fut>(load: Arc<Load>, p: usize, mut call: F)
where
    F: FnMut(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    tokio::spawn(async move {
        let mut i = 0u64;
        while !load.stop.load(Ordering::SeqCst) {
            if !load.running.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            load.in_flight.fetch_add(1, Ordering::SeqCst);
            // Checked again: `pause` may have begun between the two loads.
            if load.running.load(Ordering::SeqCst) {
                i += 1;
                let r = tokio::time::timeout(Duration::from_secs(15), call(i))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 15 s")));
                load.outcome(p, r);
            }
            load.in_flight.fetch_sub(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });
}

/// A gRPC app: the standard health service, SERVING.
async fn grpc_app() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (_reporter, service) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    Ok(addr)
}

/// One TCP exchange through the caller's sidecar: `CONNECT` to the echo
/// service, a line each way.
async fn tcp_echo(outbound: SocketAddr, i: u64) -> Result<()> {
    let mut s = tokio::net::TcpStream::connect(outbound).await?;
    s.write_all(b"CONNECT echo:7000 HTTP/1.1\r\nhost: echo:7000\r\n\r\n")
        .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            bail!(
                "closed during the CONNECT answer: {}",
                String::from_utf8_lossy(&head)
            );
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        bail!("CONNECT answered {}", String::from_utf8_lossy(&head));
    }
    let line = format!("ping {i}\n");
    s.write_all(line.as_bytes())
        .await
        .context("writing into the tunnel")?;
    let mut back = vec![0u8; line.len()];
    s.read_exact(&mut back)
        .await
        .context("reading the echo from the tunnel")?;
    if back != line.as_bytes() {
        bail!("echoed {:?}", String::from_utf8_lossy(&back));
    }
    s.shutdown().await?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    Ok(())
}

/// The fsync shim: each `fsync` / `fdatasync` first sleeps the number of
/// milliseconds in the file `LUMEN_FSYNC_DELAY_FILE` names (0: none).
const FSYNC_SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static void delay(void) {
    const char *path = getenv("LUMEN_FSYNC_DELAY_FILE");
    if (!path) return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    long ms = 0;
    if (fscanf(f, "%ld", &ms) != 1) ms = 0;
    fclose(f);
    if (ms > 0) usleep(ms * 1000);
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    delay();
    return real(fd);
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    delay();
    return real(fd);
}
"#;

/// libfaketime, from Debian's `faketime` package.
fn libfaketime() -> Result<PathBuf> {
    for dir in [
        "/usr/lib/x86_64-linux-gnu/faketime",
        "/usr/lib/aarch64-linux-gnu/faketime",
        "/usr/lib/faketime",
    ] {
        let lib = Path::new(dir).join("libfaketime.so.1");
        if lib.exists() {
            return Ok(lib);
        }
    }
    bail!("libfaketime not found: apt-get install faketime (README's test command installs it)")
}

/// The sidecars of the mesh, by name: their ports, how to start them, and
/// the running process.
struct Sidecars {
    dir: PathBuf,
    control: String,
    collector: String,
    token: String,
    all: BTreeMap<&'static str, (SidecarPorts, Option<SocketAddr>, Option<LumenProcess>)>,
    env: BTreeMap<&'static str, Vec<(String, String)>>,
    /// The counters of killed sidecars as last read (a restarted one
    /// counts from zero again).
    gone: Records,
}

impl Sidecars {
    fn admins(&self) -> Vec<u16> {
        self.all.values().map(|(p, _, _)| p.admin).collect()
    }

    async fn start(&mut self, name: &'static str) -> Result<()> {
        let (ports, app) = {
            let (p, a, _) = &self.all[name];
            (*p, *a)
        };
        let (service, version) = name.split_once('-').context("service-version")?;
        let sa = format!("chaos-{service}");
        let extra = [
            "--control",
            &self.control,
            "--join-token-file",
            &self.token,
            "--service-account",
            &sa,
            "--telemetry-flush",
            "100ms",
        ];
        let env = self.env.get(name).cloned().unwrap_or_default();
        let p = Sidecar {
            service,
            version,
            mesh: &self.dir,
            ports,
            app,
            collector: &self.collector,
            extra: &extra,
        }
        .start_env(&self.dir, &env)
        .await?;
        self.all.get_mut(name).context("sidecar")?.2 = Some(p);
        Ok(())
    }

    /// Reads its counters, then kills it: what it made after the read, and
    /// what it had not exported, die with it.
    async fn kill9(&mut self, name: &str) -> Result<()> {
        let admin = self.all[name].0.admin;
        let last = records_of(admin).await?;
        if let Some(mut p) = self.all.get_mut(name).and_then(|s| s.2.take()) {
            p.kill9()?;
        }
        self.gone = self.gone + last;
        Ok(())
    }

    /// The running sidecars' counters, summed.
    async fn live(&self) -> Result<Records> {
        let mut r = Records::default();
        for admin in self.admins() {
            r = r + records_of(admin).await?;
        }
        Ok(r)
    }

    /// Every running sidecar's records acknowledged or dropped.
    async fn settled(&self) -> Result<bool> {
        for admin in self.admins() {
            let r = records_of(admin).await?;
            if r.made > r.exported + r.dropped {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Every sidecar's counters since the start, the killed ones' too.
    async fn records(&self) -> Result<Records> {
        Ok(self.gone + self.live().await?)
    }
}

async fn records_of(admin: u16) -> Result<Records> {
    let s = get(&format!("http://127.0.0.1:{admin}/stats/prometheus")).await?;
    Ok(Records {
        made: counter_sum(&s, "istio_requests_total")
            + counter_sum(&s, "istio_tcp_connections_closed_total"),
        exported: counter_sum(&s, "lumen_telemetry_records_exported_total"),
        dropped: counter_sum(&s, "lumen_telemetry_records_dropped_total"),
    })
}

/// How long until `check` holds, polling; fails after `limit`.
async fn until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `lumen proxy-status`, as an operator reads it.
fn proxy_status(control: &str) -> String {
    // `timeout`: a control plane cut off must not hold the test's worker.
    Command::new("timeout")
        .arg("10")
        .arg(lumen_bin())
        .args(["proxy-status", "--control", control])
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_else(|e| e.to_string())
}

/// Every sidecar SYNCED with the control plane: a line per sidecar (its
/// name, then the instance) with the version acknowledged. The policy
/// engine follows the control plane too, but is not waited for.
async fn synced(control: &str, names: &[&str]) -> bool {
    let status = proxy_status(control);
    names.iter().all(|name| {
        status
            .lines()
            .any(|l| l.starts_with(&format!("{name}-")) && l.ends_with("SYNCED"))
    })
}

/// The version the control plane serves, from `lumen proxy-status`.
fn served_version(status: &str) -> Option<&str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("control plane version "))
        .and_then(|rest| rest.split(',').next())
}

/// Changes the configuration (a connection limit on `grpc`, never
/// reached) and waits until every sidecar has acknowledged the new
/// version: a stream that only looks alive does not count.
async fn change_reaches_every_sidecar(
    config: &Path,
    control: &str,
    names: &[&str],
    change: u32,
    limit: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    // The control plane answers first (it may have just restarted), so
    // the version compared against is the one it serves now.
    until("the control plane answers", limit, || async {
        served_version(&proxy_status(control)).is_some()
    })
    .await?;
    let before = proxy_status(control);
    let before = served_version(&before).unwrap_or_default().to_string();
    std::fs::write(
        config.join("bump.yaml"),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: grpc}}\nspec:\n  host: grpc\n  trafficPolicy:\n    connectionPool:\n      tcp: {{maxConnections: {}}}\n",
            10_000 + change
        ),
    )?;
    until(
        "a config change acknowledged by every sidecar",
        limit,
        || async {
            let status = proxy_status(control);
            served_version(&status).is_some_and(|v| v != before) && synced(control, names).await
        },
    )
    .await
    .with_context(|| proxy_status(control))?;
    Ok(start.elapsed())
}

/// One row of the table.
struct Row {
    scenario: &'static str,
    ok: u64,
    failed: [u64; 4],
    records: Records,
    stored: i64,
    recovery: Duration,
    reasons: Vec<String>,
}

/// Runs the scenarios; on failure the processes' logs are kept.
async fn chaos() -> Result<()> {
    run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    let dir = tempfile::tempdir()?;
    // Bounded, whatever hangs: every scenario's own waits are, and the
    // whole run normally takes under 4 minutes.
    let result = tokio::time::timeout(Duration::from_secs(20 * 60), scenarios(dir.path()))
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "the chaos run did not finish within 20 minutes"
            ))
        });
    if result.is_err() {
        eprintln!(
            "chaos: the processes' logs are kept in {}",
            dir.keep().display()
        );
    }
    result
}

async fn scenarios(root: &Path) -> Result<()> {
    let root = root.to_path_buf();
    let ports = UpPorts::pick();
    let (control_addr, monitoring) = (local(free_port()).to_string(), free_port());
    let query_alone = UpPorts::pick();

    // The collector's disk: a tmpfs, so it can be filled.
    let data = root.join("data");
    std::fs::create_dir_all(&data)?;
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=96m", "tmpfs"])
        .arg(&data))?;
    let store = data.join("store");

    // The fsync shim and libfaketime's control files.
    let shim_c = root.join("fsync-delay.c");
    std::fs::write(&shim_c, FSYNC_SHIM)?;
    let shim = root.join("fsync-delay.so");
    run(Command::new(peer_tool("cc", "apt-get install gcc"))
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&shim)
        .arg(&shim_c)
        .arg("-ldl"))?;
    let fsync_delay = root.join("fsync-delay-ms");
    std::fs::write(&fsync_delay, "0")?;
    let clock = root.join("clock-offset");
    std::fs::write(&clock, "+0")?;
    let faketime = libfaketime()?;

    let sidecar_ports: BTreeMap<&str, SidecarPorts> = [
        "caller-v1",
        "reviews-v1",
        "reviews-v2",
        "grpc-v1",
        "echo-v1",
    ]
    .into_iter()
    .map(|n| (n, SidecarPorts::pick()))
    .collect();
    let inbound = |n: &str| local(sidecar_ports[n].inbound);

    // The control plane's configuration: the mesh, Istio's routing and
    // security, and an always-on RateLimit far above the load.
    let config = root.join("config");
    std::fs::create_dir_all(&config)?;
    std::fs::write(
        config.join("mesh.yaml"),
        format!(
            r#"apiVersion: lumen.dev/v1alpha1
kind: Mesh
metadata: {{name: chaos}}
spec:
  services:
  - name: reviews
    port: 9080
    endpoints:
    - {{address: {}, version: v1}}
    - {{address: {}, version: v2}}
  - name: grpc
    port: 50051
    protocol: grpc
    endpoints:
    - {{address: {}, version: v1}}
  - name: echo
    port: 7000
    protocol: tcp
    endpoints:
    - {{address: {}, version: v1}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec:
  mtls: {{mode: STRICT}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews}}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 3
      interval: 1s
      baseEjectionTime: 5s
      maxEjectionPercent: 50
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews}}
    timeout: 10s
    retries:
      attempts: 3
      perTryTimeout: 3s
      retryOn: connect-failure,reset,refused-stream,5xx
---
apiVersion: policy.lumen.dev/v1alpha1
kind: RateLimit
metadata: {{name: reviews-ceiling}}
spec:
  target: {{service: reviews}}
  requestsPerSecond: 10000
  burst: 10000
"#,
            inbound("reviews-v1"),
            inbound("reviews-v2"),
            inbound("grpc-v1"),
            inbound("echo-v1"),
        ),
    )?;

    let control_data = root.join("control");
    let start_control = || -> Result<LumenProcess> {
        LumenProcess::spawn(
            "lumen-control",
            &root,
            &[
                args(&["control", "-f"]),
                vec![config.display().to_string()],
                args(&["--control-addr", &control_addr, "--data-dir"]),
                vec![control_data.display().to_string()],
                args(&["--monitoring-addr", &local(monitoring).to_string()]),
            ]
            .concat(),
        )
    };
    let mut control = start_control()?;
    control
        .wait_ready(&format!("http://127.0.0.1:{monitoring}/ready"))
        .await?;

    let empty = root.join("empty.yaml");
    std::fs::write(
        &empty,
        "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {name: up}\nspec: {services: []}\n",
    )?;
    let up_args: Vec<String> = [
        args(&["up", "-f"]),
        vec![empty.display().to_string()],
        args(&[
            "--data-dir",
            &data.display().to_string(),
            "--store",
            &store.display().to_string(),
            "--flush-interval",
            "2s",
            "--otlp-grpc",
            &local(ports.otlp_grpc).to_string(),
            "--otlp-http",
            &local(ports.otlp_http).to_string(),
            "--query-addr",
            &local(ports.query).to_string(),
            "--pg-addr",
            &local(ports.pg).to_string(),
            "--flight-sql-addr",
            &local(ports.flight_sql).to_string(),
            "--control-addr",
            &local(ports.control).to_string(),
            "--mesh-control",
            &control_addr,
        ]),
    ]
    .concat();
    let up_env = vec![
        ("LD_PRELOAD".to_string(), shim.display().to_string()),
        (
            "LUMEN_FSYNC_DELAY_FILE".to_string(),
            fsync_delay.display().to_string(),
        ),
    ];
    let start_up =
        || LumenProcess::spawn_bin_env(&lumen_bin(), "lumen-up", &root, &up_args, &up_env);
    let up_ready = format!("http://127.0.0.1:{}/ready", ports.query);
    let mut up = start_up()?;
    up.wait_ready(&up_ready).await?;

    // The query service alone, over the store the collector flushes to.
    let query_args: Vec<String> = args(&[
        "query",
        "--store",
        &store.display().to_string(),
        "--store-refresh",
        "1s",
        "--query-addr",
        &local(query_alone.query).to_string(),
        "--pg-addr",
        &local(query_alone.pg).to_string(),
        "--flight-sql-addr",
        &local(query_alone.flight_sql).to_string(),
    ]);
    let query_ready = format!("http://127.0.0.1:{}/ready", query_alone.query);
    let start_query = || LumenProcess::spawn("lumen-query", &root, &query_args);
    let mut query = start_query()?;
    query.wait_ready(&query_ready).await?;

    // The sidecars, their apps, and the join token the CA issued.
    let token = until("the join token", Duration::from_secs(30), || async {
        control_data.join("ca/join-token").exists()
    })
    .await
    .map(|_| control_data.join("ca/join-token"))?;
    let apps: BTreeMap<&str, Option<SocketAddr>> = [
        ("caller-v1", None),
        ("reviews-v1", Some(start_app("reviews-v1").await)),
        ("reviews-v2", Some(start_app("reviews-v2").await)),
        ("grpc-v1", Some(grpc_app().await?)),
        ("echo-v1", Some(lumen_tests::upstream::start_echo().await)),
    ]
    .into_iter()
    .collect();
    let faked = vec![
        ("LD_PRELOAD".to_string(), faketime.display().to_string()),
        (
            "FAKETIME_TIMESTAMP_FILE".to_string(),
            clock.display().to_string(),
        ),
        ("FAKETIME_CACHE_DURATION".to_string(), "1".to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".to_string(), "1".to_string()),
    ];
    let mut sidecars = Sidecars {
        dir: root.clone(),
        control: control_addr.clone(),
        collector: ports.grpc_endpoint(),
        token: token.display().to_string(),
        all: sidecar_ports
            .iter()
            .map(|(n, p)| (*n, (*p, apps[n], None)))
            .collect(),
        env: [("reviews-v1", faked)].into_iter().collect(),
        gone: Records::default(),
    };
    for name in [
        "reviews-v1",
        "reviews-v2",
        "grpc-v1",
        "echo-v1",
        "caller-v1",
    ] {
        sidecars.start(name).await?;
    }
    let names: Vec<&str> = sidecars.all.keys().copied().collect();
    until("every sidecar synced", Duration::from_secs(60), || {
        synced(&control_addr, &names)
    })
    .await
    .with_context(|| proxy_status(&control_addr))?;

    // The load: four clients through the caller's sidecar.
    let outbound = local(sidecar_ports["caller-v1"].outbound);
    let load = Arc::new(Load::default());
    let http1 = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?;
    drive(load.clone(), 0, move |i| {
        let http1 = http1.clone();
        async move {
            let r = http1
                .get(format!("http://{outbound}/chaos/http1/{i}"))
                .header("host", "reviews:9080")
                .send()
                .await?;
            if r.status() != 200 {
                bail!(
                    "status {}: {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                );
            }
            Ok(())
        }
    });
    let h2 = h2_client_via(outbound);
    drive(load.clone(), 1, move |i| {
        let h2 = h2.clone();
        async move {
            let req = http::Request::get(format!("http://reviews:9080/chaos/h2/{i}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))?;
            let r = h2.request(req).await?;
            if r.status() != 200 {
                bail!("status {}", r.status());
            }
            Ok(())
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://grpc:50051")
        .connect_with_connector_lazy(DialSidecar(outbound));
    drive(load.clone(), 2, move |_| {
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        async move {
            let r = client
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await?;
            if r.get_ref().status != 1 {
                bail!("health status {}", r.get_ref().status);
            }
            Ok(())
        }
    });
    drive(load.clone(), 3, move |i| tcp_echo(outbound, i));

    let sql_url = ports.sql_url();
    let stored = || async { sql_count(&sql_url, "SELECT count(*) AS n FROM requests").await };
    let mut rows: Vec<Row> = Vec::new();
    let mut before = sidecars.records().await?;
    let mut stored_before = stored().await?;

    // Each scenario: load runs; `fault` applies and heals the fault (and
    // says how long recovery took); then load pauses until every record
    // is accounted for, and the row is taken.
    // LUMEN_CHAOS_ONLY=<words>[,<words>…]: the baseline and the scenarios
    // naming any of them.
    let only = std::env::var("LUMEN_CHAOS_ONLY").ok();
    macro_rules! scenario {
        ($name:expr, $fault:block) => {{
            if let Some(only) = &only
                && $name != "baseline"
                && !only.split(',').any(|w| $name.contains(w))
            {
                eprintln!("chaos: skipping {} (LUMEN_CHAOS_ONLY)", $name);
            } else {
                load.resume();
                tokio::time::sleep(Duration::from_secs(3)).await;
                let recovery: Duration = $fault;
                tokio::time::sleep(Duration::from_secs(3)).await;
                load.pause().await;
                let (ok, failed, reasons) = load.take();
                // Every record acknowledged or dropped (and counted), then
                // stored: the numbers of this row are final.
                // Settled, and unchanged over a read (a tunnel that closed just
                // after the pause adds its record late).
                let limit = Instant::now() + Duration::from_secs(120);
                let mut last: Option<Records> = None;
                let now = loop {
                    let r = sidecars.records().await?;
                    if sidecars.settled().await?
                        && last.is_some_and(|l| {
                            (l.made, l.exported, l.dropped) == (r.made, r.exported, r.dropped)
                        })
                    {
                        break r;
                    }
                    if Instant::now() > limit {
                        bail!(
                            "{}: records still unaccounted for after 120 s: {r:?}",
                            $name
                        );
                    }
                    last = Some(r);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                };
                let total = stored().await?;
                let row = Row {
                    scenario: $name,
                    ok: ok.iter().sum(),
                    failed,
                    records: now - before,
                    stored: total - stored_before,
                    recovery,
                    reasons,
                };
                eprintln!(
                    "chaos: {}: ok {} failed {:?} records {:?} stored {} recovery {:?} {:?}",
                    row.scenario,
                    row.ok,
                    row.failed,
                    row.records,
                    row.stored,
                    row.recovery,
                    row.reasons
                );
                rows.push(row);
                before = now;
                stored_before = total;
            }
        }};
    }

    scenario!("baseline", {
        tokio::time::sleep(Duration::from_secs(4)).await;
        Duration::ZERO
    });

    scenario!("kill -9 `lumen up` (collector, policy engine, query)", {
        up.kill9()?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let healed = Instant::now();
        up = start_up()?;
        up.wait_ready(&up_ready).await?;
        // Whole again: what the sidecars had made by now is acknowledged.
        let r = sidecars.live().await?;
        until(
            "the sidecars' queues drained",
            Duration::from_secs(60),
            || async {
                sidecars
                    .live()
                    .await
                    .is_ok_and(|n| n.exported + n.dropped >= r.made)
            },
        )
        .await?;
        healed.elapsed()
    });

    scenario!("kill -9 the control plane (config + CA)", {
        control.kill9()?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let healed = Instant::now();
        control = start_control()?;
        change_reaches_every_sidecar(&config, &control_addr, &names, 1, Duration::from_secs(60))
            .await?;
        healed.elapsed()
    });

    scenario!("kill -9 the query service (`lumen query`)", {
        query.kill9()?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let healed = Instant::now();
        query = start_query()?;
        query.wait_ready(&query_ready).await?;
        let alone = query_alone.sql_url();
        until(
            "the query service answers",
            Duration::from_secs(60),
            || async {
                sql_count(&alone, "SELECT count(*) AS n FROM requests")
                    .await
                    .is_ok_and(|n| n > 0)
            },
        )
        .await?;
        healed.elapsed()
    });

    scenario!("kill -9 one of reviews' two sidecars", {
        sidecars.kill9("reviews-v2").await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let healed = Instant::now();
        sidecars.start("reviews-v2").await?;
        change_reaches_every_sidecar(&config, &control_addr, &names, 4, Duration::from_secs(60))
            .await?;
        healed.elapsed()
    });

    let partition = |port: u16, on: bool| -> Result<()> {
        let op = if on { "-I" } else { "-D" };
        for dir in ["--dport", "--sport"] {
            run(Command::new("iptables").args([
                op,
                "INPUT",
                "-p",
                "tcp",
                dir,
                &port.to_string(),
                "-j",
                "DROP",
            ]))?;
        }
        Ok(())
    };

    scenario!("partition sidecars ↔ collector, 30 s", {
        partition(ports.otlp_grpc, true)?;
        tokio::time::sleep(Duration::from_secs(30)).await;
        partition(ports.otlp_grpc, false)?;
        let healed = Instant::now();
        // Whole again: what the sidecars had made by now is acknowledged.
        let r = sidecars.live().await?;
        until(
            "the sidecars' queues drained",
            Duration::from_secs(120),
            || async {
                sidecars
                    .live()
                    .await
                    .is_ok_and(|n| n.exported + n.dropped >= r.made)
            },
        )
        .await?;
        healed.elapsed()
    });

    let control_port: u16 = control_addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("control port")?;
    scenario!("partition sidecars ↔ control plane, 30 s", {
        partition(control_port, true)?;
        tokio::time::sleep(Duration::from_secs(30)).await;
        partition(control_port, false)?;
        let healed = Instant::now();
        change_reaches_every_sidecar(&config, &control_addr, &names, 2, Duration::from_secs(120))
            .await?;
        let recovered = healed.elapsed();
        // Still whole a while later, once the streams the partition cut
        // have timed out on the control plane's side too.
        tokio::time::sleep(Duration::from_secs(15)).await;
        change_reaches_every_sidecar(&config, &control_addr, &names, 3, Duration::from_secs(60))
            .await?;
        recovered
    });

    scenario!("disk full under the collector, 10 s", {
        // Fill the tmpfs to the last byte.
        let filler = data.join("filler");
        let mut f = std::fs::File::create(&filler)?;
        let block = vec![0u8; 1 << 20];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
        let _ = std::io::Write::write_all(&mut f, &[0u8; 4096]);
        drop(f);
        tokio::time::sleep(Duration::from_secs(10)).await;
        std::fs::remove_file(&filler)?;
        let healed = Instant::now();
        // Whole again: what the sidecars had made by now is acknowledged.
        let r = sidecars.live().await?;
        until(
            "the sidecars' queues drained",
            Duration::from_secs(120),
            || async {
                sidecars
                    .live()
                    .await
                    .is_ok_and(|n| n.exported + n.dropped >= r.made)
            },
        )
        .await?;
        healed.elapsed()
    });

    scenario!("slow disk: every fsync +300 ms, 10 s", {
        std::fs::write(&fsync_delay, "300")?;
        tokio::time::sleep(Duration::from_secs(10)).await;
        std::fs::write(&fsync_delay, "0")?;
        let healed = Instant::now();
        // Whole again: what the sidecars had made by now is acknowledged.
        let r = sidecars.live().await?;
        until(
            "the sidecars' queues drained",
            Duration::from_secs(120),
            || async {
                sidecars
                    .live()
                    .await
                    .is_ok_and(|n| n.exported + n.dropped >= r.made)
            },
        )
        .await?;
        healed.elapsed()
    });

    scenario!(
        "clock of reviews-v1's sidecar +5 min, then −5 min, 10 s each",
        {
            std::fs::write(&clock, "+5m")?;
            tokio::time::sleep(Duration::from_secs(10)).await;
            std::fs::write(&clock, "-5m")?;
            tokio::time::sleep(Duration::from_secs(10)).await;
            std::fs::write(&clock, "+0")?;
            let healed = Instant::now();
            change_reaches_every_sidecar(
                &config,
                &control_addr,
                &names,
                5,
                Duration::from_secs(60),
            )
            .await?;
            healed.elapsed()
        }
    );
    load.stop.store(true, Ordering::SeqCst);
    // Kept running to the end (and read here, so the last restart counts).
    let _ = (control.pid(), before, stored_before);

    // The table.
    let mut table = String::from(
        "| scenario | requests ok | failed (HTTP/1.1, HTTP/2, gRPC, TCP) | rows made | acknowledged | stored | dropped | recovery |\n|---|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} s |\n",
            r.scenario,
            r.ok,
            r.failed.map(|f| f.to_string()).join(", "),
            r.records.made,
            r.records.exported,
            r.stored,
            r.records.dropped,
            r.recovery.as_secs_f64()
        ));
    }
    eprintln!("\n{table}");
    std::fs::write(
        std::env::temp_dir().join("lumen-chaos-table.md"),
        format!(
            "{table}\n(run at {:?})\n",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
        ),
    )?;

    // Exactly once, over the whole run. (`ensure!`, not `assert!`: a
    // failure is an error, so the processes' logs are kept.)
    let twice = sql(
        &sql_url,
        "SELECT trace_id, span_id, reporter, count(*) AS n FROM requests \
         GROUP BY 1, 2, 3 HAVING count(*) > 1 LIMIT 5",
    )
    .await?;
    anyhow::ensure!(twice.is_empty(), "rows stored twice: {twice:?}");
    for r in &rows {
        let killed_sidecar = r.scenario.starts_with("kill -9") && r.scenario.contains("sidecars");
        if killed_sidecar {
            // Its counters were read just before the kill: what it made
            // and exported after that is stored but counted nowhere, and
            // what it still held dies with it; acknowledged rows are stored.
            anyhow::ensure!(
                r.records.exported <= r.stored as f64,
                "{}: acknowledged {} > stored {}",
                r.scenario,
                r.records.exported,
                r.stored
            );
        } else {
            anyhow::ensure!(
                r.stored as f64 == r.records.exported,
                "{}: acknowledged {} but stored {}",
                r.scenario,
                r.records.exported,
                r.stored
            );
            anyhow::ensure!(
                r.records.made == r.records.exported + r.records.dropped,
                "{}: made {}, acknowledged {}, dropped {}",
                r.scenario,
                r.records.made,
                r.records.exported,
                r.records.dropped
            );
            // Off the request path: not one request may fail.
            anyhow::ensure!(
                r.failed == [0; 4],
                "{}: requests failed {:?}: {:?}",
                r.scenario,
                r.failed,
                r.reasons
            );
        }
        anyhow::ensure!(r.ok > 0, "{}: no request got through", r.scenario);
    }
    // Every sidecar still holds its workload certificate from the mesh CA.
    for admin in sidecars.admins() {
        let dump: serde_json::Value =
            serde_json::from_str(&get(&format!("http://127.0.0.1:{admin}/config_dump")).await?)?;
        anyhow::ensure!(
            dump["certificate"]["spiffe_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("spiffe://cluster.local/ns/default/sa/chaos-")),
            "a sidecar without its certificate: {dump}"
        );
        anyhow::ensure!(dump["inboundMtls"] == "STRICT", "not STRICT: {dump}");
    }
    let _ = run(Command::new("umount").arg("-l").arg(&data));
    Ok(())
}
