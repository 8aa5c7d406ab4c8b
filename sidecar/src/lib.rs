//! The sidecar on its own: `lumen-proxy`, the binary injected beside every
//! pod — the proxy crate, its telemetry export and the control-stream
//! client, without the collector or the query engine, so the image is
//! small. `lumen proxy` runs the same [`run`] with the same [`ProxyArgs`].
//!
//! `lumen-init`, the pod's init container, installs the traffic capture
//! that sends the app's connections through it ([`capture`]).
//!
//! Also what every Lumen binary's process shares: duration and label flag
//! parsing, logging, signals, the allocator's settings.

#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use lumen_core::Workload;
use lumen_core::config::DEFAULT_NAMESPACE;
use lumen_proxy::telemetry::ExportProtocol;
use lumen_proxy::{Proxy, ProxyConfig};
use tokio::sync::watch;

pub mod capture;

/// How often configuration files are checked for changes: a change
/// reaches every proxy within a second.
pub const CONFIG_POLL: Duration = Duration::from_millis(250);

/// The control plane's URL from `host:port` (or a URL as it is).
pub fn endpoint_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// `mi_option_purge_delay` in mimalloc.h (the same in mimalloc v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The collector's hot rows grow until a flush and are then freed at once.
/// mimalloc hands freed memory back to the OS within about a second, so
/// each flush cycle page-faults the whole buffer back in — a quarter of the
/// collector's CPU at 700k rows/s. Keeping freed memory for 10 s instead
/// costs nothing the hot-row limit does not already bound. An operator's
/// own `MIMALLOC_PURGE_DELAY` (mimalloc's environment option) wins.
#[allow(unsafe_code)] // mimalloc's C option setter
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets a plain integer option; mimalloc reads it when it next
    // considers returning memory, and any value is valid.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10_000) };
}

/// Hands back to the OS what the allocators keep free: mimalloc's pages
/// on the calling thread's heap and its arenas' pages waiting out
/// [`keep_freed_memory`]'s delay, and glibc malloc's free memory, which
/// the C libraries (zstd's contexts, one per Parquet column read or
/// written) allocate from. For [`lumen_core::process::set_release`].
#[allow(unsafe_code)] // mimalloc's and glibc's C calls
pub fn release_free_memory() {
    // SAFETY: neither takes a pointer; each returns to the OS only memory
    // no allocation holds, under its allocator's own locks.
    unsafe {
        libmimalloc_sys::mi_collect(true);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        libc::malloc_trim(0);
    }
}

/// mimalloc asks for transparent huge pages on its arenas, and the kernel
/// zeroes a whole 2 MiB page on the first touch of each: with memory
/// turning over at ingest rates that zeroing was half of the
/// collector's WAL thread and held Arrow ingest near 0.9M records/s (1.15M
/// without). Small pages also keep a sidecar's RSS a quarter smaller.
#[allow(unsafe_code)] // prctl
pub fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and affects
    // this process's later page faults; failure leaves THP as it was.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration like 30s, 500ms or 5m: {e}"))
}

pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// How a sidecar's records leave it.
#[derive(Clone, Copy, ValueEnum)]
pub enum TelemetryProtocol {
    /// Arrow record batches over Arrow Flight, to Lumen's collector
    /// (columnar end to end, stored exactly once).
    Arrow,
    /// OTLP/gRPC spans, to any OpenTelemetry collector or Jaeger.
    Otlp,
}

#[derive(Args)]
pub struct ProxyArgs {
    /// Service this sidecar's workload belongs to.
    #[arg(long)]
    service: String,
    /// Namespace of the service.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// Version of the workload (e.g. v1).
    #[arg(long, default_value = "unknown")]
    version: String,
    /// Workload name [default: <service>-<version>, or <service>].
    #[arg(long)]
    workload: Option<String>,
    /// A label of the workload, KEY=VALUE (repeatable), beyond `app` and
    /// `version`: VirtualService matches' `sourceLabels` see them.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Where the workload runs, `region/zone/subzone`, for locality-aware
    /// balancing (DestinationRule `localityLbSetting`).
    #[arg(long)]
    locality: Option<String>,
    /// Run as an ingress gateway: listen on the ports of the Istio Gateway
    /// servers whose selector matches this proxy's --label's (on
    /// --outbound's address; its own port among them), routed by the
    /// VirtualServices bound to them. HTTPS and TLS servers are terminated
    /// with their credentials (chosen by SNI) or passed through.
    #[arg(long)]
    gateway: bool,
    /// Where a gateway reads Gateway servers' `credentialName`s: secret
    /// `x` is the directory <DIR>/x holding tls.crt, tls.key and, for
    /// MUTUAL, ca.crt (a Kubernetes TLS secret as mounted). Files are
    /// re-read within a second of changing.
    #[arg(long, requires = "gateway")]
    credentials: Option<PathBuf>,
    /// Mesh configuration that outbound requests are routed by: files or
    /// directories (Mesh and Istio networking resources); repeatable;
    /// reloaded on change. For a proxy without a control plane.
    #[arg(short = 'f', long = "file", conflicts_with = "control")]
    file: Vec<PathBuf>,
    /// Get configuration from the control plane at this address
    /// (`host:port`, or `https://host:port` for its TLS port): streamed,
    /// acknowledged, the last good one kept while it is unreachable.
    #[arg(long)]
    control: Option<String>,
    /// The roots an `https://` --control's certificate is checked against
    /// (PEM: the mesh's trust bundle, mounted in injected pods); needed
    /// with `https://`.
    #[arg(long, requires = "control")]
    control_ca: Option<PathBuf>,
    /// Cut off from the control plane this long, the proxy stops trusting
    /// the policy engine's last decisions: each conditional policy turns
    /// on or off as its `failMode` says, until the stream is back.
    #[arg(long, default_value = "30s", value_parser = parse_duration, requires = "control")]
    policy_staleness: Duration,
    /// The workload's Kubernetes service account: its identity is
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    #[arg(long, default_value = lumen_core::identity::DEFAULT_SERVICE_ACCOUNT)]
    service_account: String,
    /// A file holding the control plane's join token (`lumen up` keeps it
    /// at <data-dir>/control/ca/join-token): with it the proxy gets a
    /// workload certificate from the mesh CA and speaks mTLS with other
    /// sidecars. Without it (or LUMEN_JOIN_TOKEN) hops stay plaintext.
    #[arg(long, requires = "control")]
    join_token_file: Option<PathBuf>,
    /// Outbound listener: the app sends its calls here.
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound: SocketAddr,
    /// Do not listen for outbound calls.
    #[arg(long)]
    no_outbound: bool,
    /// Inbound listener: other sidecars send calls for this workload here.
    #[arg(long, default_value = "127.0.0.1:15006")]
    inbound: SocketAddr,
    /// Do not listen for inbound calls.
    #[arg(long)]
    no_inbound: bool,
    /// The local application inbound calls are handed to.
    #[arg(long)]
    app: Option<SocketAddr>,
    /// The pod's address, when its inbound traffic is captured (lumen-init):
    /// other sidecars calling any port of it originate mTLS to this one
    /// (the injector sets it from the downward API).
    #[arg(long, env = "LUMEN_POD_IP")]
    pod_ip: Option<std::net::IpAddr>,
    /// Admin endpoint: /ready, /stats/prometheus, /config_dump.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// gRPC endpoint request records are exported to (Lumen's collector
    /// takes Arrow Flight and OTLP there). `https://`: mutual TLS, the
    /// collector checked against the mesh's roots (and --collector-ca),
    /// this sidecar's mesh certificate as its credential.
    #[arg(long, default_value = "http://127.0.0.1:4317")]
    collector: String,
    /// More roots (PEM) an `https://` --collector is checked against,
    /// besides the mesh's trust bundle.
    #[arg(long, value_name = "FILE")]
    collector_ca: Option<PathBuf>,
    /// Wire protocol of the export.
    #[arg(long, value_enum, default_value = "arrow")]
    telemetry_protocol: TelemetryProtocol,
    /// How often records leave for the collector: the longest a record
    /// waits before it is sent (a full batch leaves at once).
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    telemetry_flush: Duration,
    /// Export a record of every request to the collector.
    #[arg(long, value_enum, default_value = "on")]
    telemetry: OnOff,
    /// Records not yet acknowledged by the collector before new ones are
    /// dropped (and counted).
    #[arg(long, default_value_t = 65536)]
    telemetry_queue: usize,
    /// How often the sidecar pushes its own stats (config version, cluster
    /// requests in flight, ejections, retries, drops) to the collector as
    /// OTLP metrics, as Envoy's OpenTelemetry stats sink does; 0s: never.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    stats_interval: Duration,
    /// Longest wait for an upstream's response headers.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    upstream_timeout: Duration,
    /// Longest time a client's request headers may take from their first
    /// byte (slowloris guard).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    request_headers_timeout: Duration,
    /// A downstream HTTP/1.1 connection waiting this long for its next
    /// request is closed (as Envoy's idle_timeout).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// A request or response body that sends nothing for this long is cut
    /// (response flag SI).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    stream_idle_timeout: Duration,
    /// Open downstream connections per listener; more are closed at once.
    #[arg(long, default_value_t = 16384)]
    max_connections: usize,
    /// Largest request body accepted, in bytes (413 beyond) [default: no limit].
    #[arg(long)]
    max_request_bytes: Option<u64>,
    /// Largest request headers accepted, in bytes (431 beyond).
    #[arg(long, default_value_t = 60 * 1024)]
    max_header_bytes: usize,
    /// Most header fields in one request (431 beyond).
    #[arg(long, default_value_t = 100)]
    max_headers: usize,
    /// Most HTTP/2 streams open at once on one downstream connection.
    #[arg(long, default_value_t = 100)]
    max_concurrent_streams: u32,
    /// The app's HTTP probes, asked through the admin port at
    /// `/app-health/<container>/<livez|readyz|startupz>` (set by the
    /// sidecar injector, which points the kubelet's probes there):
    /// `{"/app-health/c/readyz": {"port": 8080, "path": "/health"}}`.
    #[arg(long, env = "LUMEN_APP_PROBES", value_parser = lumen_proxy::admin::parse_app_probes)]
    app_probes: Option<std::collections::BTreeMap<String, lumen_proxy::admin::AppProbe>>,
    /// Worker threads, as Envoy's --concurrency [default: 2 for a sidecar,
    /// as Istio's; one per core for a gateway; never more than the cores
    /// the process may use]. Each has its own event loop, its own socket
    /// on each listener's port and its own upstream connections; a request
    /// stays on the worker that accepted its connection.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,
}

pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Resolves on the first Ctrl-C or SIGTERM. A second one ends the process
/// at once, for when a graceful shutdown takes longer than its operator
/// will wait (acknowledged data is in the WAL either way).
pub async fn shutdown_signal() {
    signal().await;
    tokio::spawn(async {
        signal().await;
        eprintln!("second signal: exiting without finishing the shutdown");
        std::process::exit(130);
    });
}

async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// A random id for this process's proxy node.
fn rand_id() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    t ^ std::process::id().rotate_left(16)
}

/// Resolves once the flag turns true (or its sender is gone).
pub async fn until(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The join token from `file`, else from `LUMEN_JOIN_TOKEN`.
fn join_token(file: Option<&std::path::Path>) -> Result<Option<String>> {
    let token = match file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the join token {}", f.display()))?,
        ),
        None => std::env::var("LUMEN_JOIN_TOKEN").ok(),
    };
    match token.map(|t| t.trim().to_string()) {
        Some(t) if t.is_empty() => bail!("the join token is empty"),
        t => Ok(t),
    }
}

pub fn fmt_addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "-".to_string(), |a| a.to_string())
}

/// Runs one sidecar until Ctrl-C or SIGTERM, then drains it.
pub fn run(a: ProxyArgs) -> lumen_core::BoxFuture<'static, Result<()>> {
    Box::pin(run_inner(a))
}

async fn run_inner(a: ProxyArgs) -> Result<()> {
    init_logging("info");
    let workload = a.workload.clone().unwrap_or_else(|| {
        if a.version == "unknown" {
            a.service.clone()
        } else {
            format!("{}-{}", a.service, a.version)
        }
    });
    let identity = Workload {
        service: a.service.as_str().into(),
        workload: workload.into(),
        namespace: a.namespace.as_str().into(),
        version: a.version.as_str().into(),
    };
    let mut config = ProxyConfig::new(identity);
    config.outbound = (!a.no_outbound).then_some(a.outbound);
    config.inbound = (!a.no_inbound).then_some(a.inbound);
    config.app = a.app;
    config.admin = Some(a.admin);
    config.upstream_timeout = a.upstream_timeout;
    config.labels = a.labels.iter().cloned().collect();
    config.locality = a.locality.clone();
    config.gateway = a.gateway;
    config.credentials = a.credentials.clone();
    config.app_probes = a.app_probes.clone().unwrap_or_default();
    config.limits.request_headers_timeout = a.request_headers_timeout;
    config.limits.stream_idle_timeout = a.stream_idle_timeout;
    config.limits.idle_timeout = a.idle_timeout;
    config.limits.max_connections = a.max_connections.max(1);
    config.limits.max_request_bytes = a.max_request_bytes;
    config.limits.max_header_bytes = a.max_header_bytes;
    config.limits.max_headers = a.max_headers;
    config.limits.max_concurrent_streams = a.max_concurrent_streams.max(1);
    config.telemetry.export = matches!(a.telemetry, OnOff::On);
    config.telemetry.collector_endpoint = a.collector.clone();
    if let Some(path) = &a.collector_ca {
        config.telemetry.collector_ca =
            lumen_proxy::mtls::read_roots(path).map_err(anyhow::Error::msg)?;
    }
    config.telemetry.queue_capacity = a.telemetry_queue;
    config.telemetry.flush_interval = a.telemetry_flush;
    config.telemetry.stats_interval = a.stats_interval;
    // How the control plane and the pushed stats both name this sidecar.
    let node_id = format!("{}-{:08x}", config.identity.workload, rand_id());
    config.telemetry.instance = Some(node_id.clone());
    config.workers = a
        .workers
        .map_or_else(|| default_workers(a.gateway), usize::from);
    config.telemetry.recording_threads = config.workers;
    config.telemetry.protocol = match a.telemetry_protocol {
        TelemetryProtocol::Arrow => ExportProtocol::Arrow,
        TelemetryProtocol::Otlp => ExportProtocol::Otlp,
    };
    if config.inbound.is_some() && config.app.is_none() {
        bail!("--app is required for the inbound listener (or pass --no-inbound)");
    }
    let (stop, stop_rx) = watch::channel(false);
    let mut admin_listener = None;
    let (mesh_rx, discovery_task) = match (&a.control, a.file.is_empty()) {
        (Some(control), _) => {
            let (tx, mut rx) = watch::channel(Arc::<lumen_core::MeshConfig>::default());
            // Others reach this sidecar at its inbound address, when it
            // names one they can dial — or, in a pod whose inbound traffic
            // is captured, at every port of the pod's address (port 0).
            let inbound_address = match (config.inbound, a.pod_ip) {
                (Some(_), Some(ip)) => std::net::SocketAddr::new(ip, 0).to_string(),
                (inbound, _) => inbound
                    .filter(|a| !a.ip().is_unspecified() && a.port() != 0)
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            };
            let node = lumen_core::control::v1::Node {
                id: node_id,
                service: config.identity.service.to_string(),
                namespace: config.identity.namespace.to_string(),
                workload: config.identity.workload.to_string(),
                version: config.identity.version.to_string(),
                inbound_address,
                spiffe_id: String::new(),
            };
            let url = lumen_proxy::controlplane::ControlEndpoint::open(
                endpoint_url(control),
                a.control_ca.as_deref(),
                "--control-ca",
            )
            .map_err(anyhow::Error::msg)?;
            if let Some(join_token) = join_token(a.join_token_file.as_deref())? {
                let certifier = lumen_proxy::mtls::Certifier {
                    endpoint: url.clone(),
                    join_token,
                    // A projected service-account token rotates: read it
                    // again for each certificate.
                    token_file: a.join_token_file.clone(),
                    namespace: config.identity.namespace.to_string(),
                    service_account: a.service_account.clone(),
                    lifetime: None,
                };
                tokio::spawn(lumen_proxy::mtls::keep_certified(
                    config.tls.clone(),
                    certifier,
                    stop_rx.clone(),
                ));
            } else {
                tracing::warn!(
                    "no join token (--join-token-file or LUMEN_JOIN_TOKEN): no workload certificate, hops from and to this sidecar stay plaintext"
                );
            }
            let task = tokio::spawn(lumen_proxy::subscribe::follow(
                url.clone(),
                node,
                tx,
                a.policy_staleness,
                config.quotas.clone(),
                config.tls.clone(),
                stop_rx.clone(),
            ));
            // Like Envoy before its first config: not ready, not serving —
            // but the admin port answers the app's probes meanwhile.
            let waiting = WaitingAdmin::start(a.admin, &config.app_probes).await?;
            tracing::info!(control = %url, "waiting for the first configuration from the control plane");
            tokio::select! {
                _ = rx.changed() => {}
                () = shutdown_signal() => return Ok(()),
            }
            rx.borrow_and_update();
            admin_listener = Some(waiting.finish().await?);
            (rx, Some(task))
        }
        (None, false) => {
            let discovery = lumen_control::FileDiscovery::open(&a.file)?;
            let rx = discovery.subscribe();
            let task = tokio::spawn(discovery.watch(CONFIG_POLL, stop_rx.clone()));
            (rx, Some(task))
        }
        (None, true) if config.outbound.is_some() => {
            bail!(
                "-f <mesh.yaml> or --control <address> is required to route outbound calls (or pass --no-outbound)"
            )
        }
        (None, true) => (watch::channel(Arc::default()).1, None),
    };
    let proxy = Proxy::bind_with_admin(config, mesh_rx, admin_listener).await?;
    tracing::info!(
        outbound = %fmt_addr(proxy.outbound_addr()),
        inbound = %fmt_addr(proxy.inbound_addr()),
        admin = %fmt_addr(proxy.admin_addr()),
        telemetry = if matches!(a.telemetry, OnOff::On) { a.collector.as_str() } else { "off" },
        "sidecar ready"
    );
    let task = tokio::spawn(proxy.run(until(stop_rx)));
    shutdown_signal().await;
    let _ = stop.send(true);
    if let Some(t) = discovery_task {
        let _ = t.await;
    }
    task.await.context("proxy task")??;
    tracing::info!("sidecar stopped cleanly");
    Ok(())
}

/// Istio's defaults: a sidecar gets 2 workers (each keeps its own upstream
/// connections, and a sidecar's app rarely needs more), a gateway one per
/// core; both within the cores the process may use (its cgroup's quota).
fn default_workers(gateway: bool) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if gateway { cores } else { cores.min(2) }
}

/// The runtime `run` is called on: one thread, the proxy's first worker.
/// The proxy starts its other workers itself, a runtime each
/// ([`lumen_proxy::workers`]).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// The admin port while the first configuration is awaited
/// ([`lumen_proxy::admin::waiting_router`]); handed to the proxy after.
struct WaitingAdmin {
    listener: std::net::TcpListener,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl WaitingAdmin {
    async fn start(
        addr: SocketAddr,
        probes: &std::collections::BTreeMap<String, lumen_proxy::admin::AppProbe>,
    ) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (admin; --admin to change)"))?
            .into_std()?;
        // The same socket, served now and by the proxy later.
        let serving = tokio::net::TcpListener::from_std(listener.try_clone()?)?;
        let router = lumen_proxy::admin::waiting_router(Arc::new(probes.clone()));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let served = axum::serve(serving, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "admin server failed");
            }
        });
        Ok(WaitingAdmin {
            listener,
            stop,
            task,
        })
    }

    /// Stops serving (a probe in flight gets 2 s to finish) and gives the
    /// listener back.
    async fn finish(self) -> Result<tokio::net::TcpListener> {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
        Ok(tokio::net::TcpListener::from_std(self.listener)?)
    }
}
