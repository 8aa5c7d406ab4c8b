//! The Lumen sidecar proxy: the mesh's data plane.
//!
//! A sidecar sits beside one workload with two listeners. The **outbound**
//! listener takes the app's calls to other services and routes them by a
//! table compiled from each mesh snapshot ([`route`]: Istio's
//! VirtualService routes, first match wins, weighted destinations); the
//! chosen [`cluster`] balances them over its endpoints ([`balance`]) under
//! its DestinationRule's connection pool and outlier detection, with
//! per-endpoint state kept across snapshots ([`endpoint`]); the service's
//! RateLimits (those always on, and the conditional ones the policy engine
//! has switched on) are checked first ([`ratelimit`]). The **inbound** listener
//! takes calls from other sidecars and hands them to the local app, after
//! Istio's RequestAuthentication ([`jwt`]) and AuthorizationPolicy
//! ([`authz`]) have had their say. Both speak HTTP/1.1 and HTTP/2 (h2c),
//! stream bodies, pool upstream connections (an HTTP/2 connection's
//! writes gathered per scheduler tick, so a call's HEADERS and DATA leave
//! together: [`coalesce`]) and propagate W3C trace context. Between
//! sidecars the hop is mutual TLS when both hold a certificate from the
//! mesh CA ([`mtls`]: SPIFFE identities, renewed at half life;
//! PeerAuthentication decides what the inbound side accepts).
//! Under REGISTRY_ONLY (Istio's `outboundTrafficPolicy`) the outbound side
//! refuses hosts outside the registry. Run as a gateway ([`gateway`]), the
//! proxy listens on the ports of the Istio Gateways that select it instead,
//! terminating TLS with the certificate SNI picks, or passing it through.
//! With several workers ([`workers`]) each thread accepts on its own socket
//! of each listener and keeps its own upstream connections, so a request
//! stays on the thread that accepted it.
//!
//! Every request becomes one [`lumen_core::RequestRecord`] (see
//! [`request`] for the phases and [`telemetry`] for where records go):
//! counted in `/stats/prometheus` on the admin port and exported as OTLP
//! spans to the collector through a bounded queue that never blocks a
//! request. The proxy's stats — those counters, its config version and its
//! clusters' state under Envoy's names ([`stats`]) — are pushed to the
//! collector as OTLP metrics every 15 s, so the fleet is in the store too.

#![forbid(unsafe_code)]

pub mod admin;
pub mod attempt;
pub mod authz;
pub mod balance;
pub mod body;
pub mod cluster;
pub mod coalesce;
pub mod context;
pub mod controlplane;
pub mod detect;
pub mod edit;
pub mod endpoint;
pub mod fault;
pub mod forward;
pub mod gateway;
pub mod idle;
pub mod jwt;
pub mod limits;
pub mod listener;
pub mod mirror;
pub mod mtls;
pub mod quota;
pub mod ratelimit;
pub mod replay;
pub mod reply;
pub mod request;
pub mod retry;
pub mod route;
pub mod stats;
pub mod subscribe;
pub mod tcp;
pub mod telemetry;
pub mod trace;
pub mod tunnel;
pub mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use lumen_core::{MeshConfig, Workload};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::context::{Shared, Side};
use crate::endpoint::Registry;
use crate::route::{Caller, RoutingTable};
use crate::telemetry::{Metrics, Telemetry, TelemetryConfig};

/// The version to show for a snapshot: the one it carries, or a local
/// count for snapshots built in code without one.
fn version_of(carried: &str, local: &AtomicU64) -> String {
    if carried.is_empty() {
        format!("local-{}", local.fetch_add(1, Ordering::Relaxed) + 1)
    } else {
        carried.to_string()
    }
}

/// The ports a gateway's table has servers on (none for a sidecar).
fn gateway_ports(shared: &Shared) -> Vec<u16> {
    shared
        .routes
        .load()
        .gateway_ports()
        .iter()
        .map(|p| p.port)
        .collect()
}

/// Errors starting or running a proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid proxy configuration: {0}")]
    Config(String),
    #[error("telemetry exporter: {0}")]
    Telemetry(String),
}

/// Everything one sidecar needs to know about itself.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The workload this sidecar stands beside.
    pub identity: Workload,
    /// Where the app sends its outbound calls (default port 15001).
    pub outbound: Option<SocketAddr>,
    /// Where other sidecars send calls for this workload (default port 15006).
    pub inbound: Option<SocketAddr>,
    /// The local app inbound calls are handed to.
    pub app: Option<SocketAddr>,
    /// Admin endpoint (default port 15000).
    pub admin: Option<SocketAddr>,
    pub telemetry: TelemetryConfig,
    pub connect_timeout: Duration,
    /// Longest wait for an upstream's response headers (Envoy's default route timeout).
    pub upstream_timeout: Duration,
    /// How long open connections may finish their requests on shutdown.
    pub drain_timeout: Duration,
    /// Request bodies up to this size are kept so a failed try can be
    /// retried; larger ones are streamed once.
    pub replay_limit: usize,
    /// Bytes all requests in flight together may keep for retries.
    pub replay_budget: usize,
    pub limits: limits::Limits,
    /// Labels of the workload beyond `app` and `version` (route matches'
    /// `sourceLabels` see them).
    pub labels: std::collections::BTreeMap<String, String>,
    /// `region/zone/subzone`, for locality-aware balancing.
    pub locality: Option<String>,
    /// Run as a gateway: listen on the ports of the Gateway servers that
    /// select this proxy's labels (the outbound listener serves its own
    /// port, others open beside it on its address), routed by the
    /// VirtualServices bound to them.
    pub gateway: bool,
    /// A gateway's credentials directory: `credentialName: x` is read
    /// from `<dir>/x/` (tls.crt, tls.key, ca.crt).
    pub credentials: Option<std::path::PathBuf>,
    /// The app's HTTP probes the kubelet asks through the admin port
    /// (an injected pod's `LUMEN_APP_PROBES`).
    pub app_probes: std::collections::BTreeMap<String, admin::AppProbe>,
    /// Counts under Quotas, shared with the control stream that reports
    /// them and brings allocations.
    pub quotas: Arc<quota::QuotaLedger>,
    /// The workload certificate and mesh mTLS, shared with the control
    /// stream (trust bundle, peers) and the certificate's renewal.
    pub tls: Arc<mtls::MeshTls>,
    /// Threads serving the listeners, each with its own sockets and
    /// upstream connections ([`workers`]); the thread `run` is called on
    /// is the first.
    pub workers: usize,
}

impl ProxyConfig {
    pub fn new(identity: Workload) -> Self {
        ProxyConfig {
            identity,
            outbound: None,
            inbound: None,
            app: None,
            admin: None,
            telemetry: TelemetryConfig::default(),
            connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(5),
            replay_limit: 64 * 1024,
            replay_budget: 64 << 20,
            limits: limits::Limits::default(),
            labels: Default::default(),
            locality: None,
            gateway: false,
            credentials: None,
            app_probes: Default::default(),
            quotas: Default::default(),
            tls: Default::default(),
            workers: 1,
        }
    }
}

/// A proxy whose listeners are bound; [`run`](Proxy::run) serves them.
pub struct Proxy {
    config: ProxyConfig,
    mesh: watch::Receiver<Arc<MeshConfig>>,
    outbound: Option<TcpListener>,
    inbound: Option<TcpListener>,
    admin: Option<TcpListener>,
    /// Workers 1.. each get a socket of their own on the outbound and
    /// inbound addresses, in that order.
    siblings: Vec<Vec<(std::net::TcpListener, Side)>>,
}

/// Binds `addr`; with more than one worker, as a socket the workers' own
/// sockets share the address with.
async fn bind(
    what: &'static str,
    addr: Option<SocketAddr>,
    workers: usize,
) -> Result<Option<TcpListener>, ProxyError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let bound = if workers > 1 {
        workers::bind_shared(addr)
    } else {
        TcpListener::bind(addr).await
    };
    bound
        .map(Some)
        .map_err(|source| ProxyError::Bind { what, addr, source })
}

impl Proxy {
    /// Binds the configured listeners (port 0 picks a free port; see the
    /// `*_addr` methods). `mesh` delivers config snapshots; each new one
    /// replaces the routing table atomically.
    pub async fn bind(
        config: ProxyConfig,
        mesh: watch::Receiver<Arc<MeshConfig>>,
    ) -> Result<Proxy, ProxyError> {
        Self::bind_with_admin(config, mesh, None).await
    }

    /// As [`Proxy::bind`], with the admin listener already bound (it served
    /// the app's probes while the first configuration was awaited).
    pub async fn bind_with_admin(
        config: ProxyConfig,
        mesh: watch::Receiver<Arc<MeshConfig>>,
        admin: Option<TcpListener>,
    ) -> Result<Proxy, ProxyError> {
        if config.inbound.is_some() && config.app.is_none() {
            return Err(ProxyError::Config(
                "an inbound listener needs the local app's address".into(),
            ));
        }
        if config.outbound.is_none() && config.inbound.is_none() {
            return Err(ProxyError::Config(
                "neither an outbound nor an inbound listener is configured".into(),
            ));
        }
        let workers = config.workers.max(1);
        let outbound = bind("outbound", config.outbound, workers).await?;
        let inbound = bind("inbound", config.inbound, workers).await?;
        let mut siblings = Vec::new();
        for _ in 1..workers {
            let mut own = Vec::new();
            for (first, side, what) in [
                (&outbound, Side::Outbound, "outbound"),
                (&inbound, Side::Inbound, "inbound"),
            ] {
                if let Some(first) = first {
                    let socket = workers::sibling(first).map_err(|source| ProxyError::Bind {
                        what,
                        addr: first
                            .local_addr()
                            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                        source,
                    })?;
                    own.push((socket, side));
                }
            }
            siblings.push(own);
        }
        Ok(Proxy {
            outbound,
            inbound,
            admin: match admin {
                Some(l) => Some(l),
                None => bind("admin", config.admin, 1).await?,
            },
            siblings,
            config,
            mesh,
        })
    }

    pub fn outbound_addr(&self) -> Option<SocketAddr> {
        self.outbound.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.inbound.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then drains connections and
    /// exports the records still queued.
    pub fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> lumen_core::BoxFuture<'static, Result<(), ProxyError>> {
        self.run_until(Box::pin(shutdown))
    }

    // Not generic, so the state machine it boxes is compiled here, once
    // (see `lumen_core::BoxFuture`).
    fn run_until(
        self,
        shutdown: lumen_core::BoxFuture<'static, ()>,
    ) -> lumen_core::BoxFuture<'static, Result<(), ProxyError>> {
        Box::pin(self.serve(shutdown))
    }

    async fn serve(self, shutdown: lumen_core::BoxFuture<'static, ()>) -> Result<(), ProxyError> {
        let Proxy {
            config,
            mut mesh,
            outbound,
            inbound,
            admin,
            siblings,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        // The exporter stops only after the listeners have drained, so
        // requests finishing during the drain are still exported.
        let (export_stop_tx, export_stop_rx) = watch::channel(false);
        let metrics = Arc::new(Metrics::new());
        let collector_tls = telemetry::channel::CollectorTls {
            mesh: config.tls.clone(),
            extra_roots: Arc::new(config.telemetry.collector_ca.clone()),
        };
        let (telemetry, exporter) = Telemetry::start(
            &config.telemetry,
            &config.identity,
            &collector_tls,
            metrics,
            export_stop_rx,
        )?;
        let identity_header = request::source_header_value(&config.identity).ok_or_else(|| {
            ProxyError::Config(
                "workload identity contains characters not allowed in a header".into(),
            )
        })?;
        let registry = Arc::new(
            Registry::new(config.connect_timeout)
                .with_tls(config.tls.clone())
                .with_workers(config.workers),
        );
        let mut caller = Caller::of(&config.identity, &config.labels, config.locality.clone());
        caller.app_port = config.app.map(|a| a.port());
        caller.gateway = config.gateway;
        let first = RoutingTable::new(mesh.borrow_and_update().clone(), &caller, &registry, None);
        let first_version = first.mesh().version.clone();
        let shared = Arc::new(Shared {
            identity: config.identity.clone(),
            identity_header,
            routes: ArcSwap::from_pointee(first),
            config_version: ArcSwap::from_pointee(version_of(&first_version, &AtomicU64::new(0))),
            registry: registry.clone(),
            telemetry: Arc::new(telemetry),
            app: config.app.map(|address| attempt::App {
                address,
                address_str: Arc::from(address.to_string()),
                identity: config.identity.clone(),
                endpoint: registry.standalone(address),
                retries: lumen_core::RetryPolicy {
                    attempts: 0,
                    ..Default::default()
                },
                budget: Default::default(),
            }),
            app_ports: Default::default(),
            default_route: Arc::from(route::DEFAULT_ROUTE),
            timeout: config.upstream_timeout,
            replay_limit: config.replay_limit,
            replay_budget: replay::Budget::new(config.replay_budget),
            stop: stop_rx.clone(),
            drain: config.drain_timeout,
            tunnels: Default::default(),
            limits: config.limits.clone(),
            quotas: config.quotas.clone(),
            jwks: Default::default(),
            gateway: config
                .gateway
                .then(|| Arc::new(gateway::Credentials::new(config.credentials.clone()))),
        });
        // A gateway's ports follow its Gateways' servers.
        let (gateway_ports_tx, ports_rx) = watch::channel(gateway_ports(&shared));

        let mut tasks = tokio::task::JoinSet::new();
        if config.telemetry.export && !config.telemetry.stats_interval.is_zero() {
            let push = stats::PushConfig {
                endpoint: config.telemetry.collector_endpoint.clone(),
                tls: collector_tls.clone(),
                interval: config.telemetry.stats_interval,
                timeout: config.telemetry.export_timeout,
                instance: config
                    .telemetry
                    .instance
                    .clone()
                    .unwrap_or_else(|| config.identity.workload.to_string()),
            };
            tasks.spawn(stats::push(shared.clone(), push, stop_rx.clone()));
        }
        {
            let shared = shared.clone();
            let mut stop = stop_rx.clone();
            let versions = AtomicU64::new(1);
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        changed = mesh.changed() => {
                            if changed.is_err() { break; }
                            let snapshot = mesh.borrow_and_update().clone();
                            // Built beside the table in force, which keeps
                            // serving until the swap: no request sees half.
                            let next = RoutingTable::new(snapshot, &caller, &shared.registry, Some(&shared.routes.load()));
                            shared.routes.store(Arc::new(next));
                            let version = version_of(&shared.routes.load().mesh().version, &versions);
                            tracing::info!(%version, "mesh config updated");
                            shared.config_version.store(Arc::new(version));
                            gateway_ports_tx.send_if_modified(|ports| {
                                let now = gateway_ports(&shared);
                                let changed = *ports != now;
                                *ports = now;
                                changed
                            });
                        }
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
            });
        }
        if config.gateway {
            let fixed = outbound.as_ref().and_then(|l| l.local_addr().ok());
            let ip = fixed.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
            let shared = shared.clone();
            let drain = config.drain_timeout;
            tasks.spawn(gateway::keep_listeners(
                ip,
                fixed.map(|a| a.port()),
                ports_rx,
                stop_rx.clone(),
                move |l, stop| {
                    let open = Arc::new(Semaphore::new(shared.limits.max_connections));
                    listener::serve(l, shared.clone(), Side::Outbound, open, stop, drain)
                },
            ));
        }
        // Each listener's connection limit holds across its workers' sockets.
        let open_outbound = Arc::new(Semaphore::new(config.limits.max_connections));
        let open_inbound = Arc::new(Semaphore::new(config.limits.max_connections));
        let open = |side| match side {
            Side::Outbound => open_outbound.clone(),
            Side::Inbound => open_inbound.clone(),
        };
        for (listener, side) in [(outbound, Side::Outbound), (inbound, Side::Inbound)] {
            if let Some(l) = listener {
                tasks.spawn(listener::serve(
                    l,
                    shared.clone(),
                    side,
                    open(side),
                    stop_rx.clone(),
                    config.drain_timeout,
                ));
            }
        }
        for (i, own) in siblings.into_iter().enumerate() {
            let index = i + 1;
            let sockets: Vec<_> = own
                .into_iter()
                .map(|(socket, side)| (socket, side, open(side)))
                .collect();
            let (shared, stop, drain) = (shared.clone(), stop_rx.clone(), config.drain_timeout);
            let work = move || async move {
                let mut serving = tokio::task::JoinSet::new();
                for (socket, side, open) in sockets {
                    // Registered with this worker's runtime, not the first's.
                    match TcpListener::from_std(socket) {
                        Ok(l) => {
                            let serve =
                                listener::serve(l, shared.clone(), side, open, stop.clone(), drain);
                            serving.spawn(serve);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, worker = index, ?side, "worker cannot serve its socket")
                        }
                    }
                }
                while serving.join_next().await.is_some() {}
                // Tunnels are tasks of their own, beyond the listeners'
                // drain; they get the same time here as on the first worker
                // before this runtime, and they with it, goes away.
                let _ = tokio::time::timeout(drain + Duration::from_secs(1), shared.tunnels.none())
                    .await;
            };
            // A worker that cannot start leaves its sockets closed (the
            // kernel sends their share of connections to the others); the
            // proxy serves on with the workers it has.
            match workers::start(index, work) {
                Ok(done) => {
                    tasks.spawn(async move {
                        let _ = done.await;
                    });
                }
                Err(e) => {
                    tracing::error!(worker = index, error = %e, "cannot start worker; serving with fewer")
                }
            }
        }
        let admin_state = Arc::new(admin::AdminState {
            shared: shared.clone(),
            ready: AtomicBool::new(true),
            app_probes: config.app_probes.clone(),
        });
        if let Some(l) = admin {
            let mut stop = stop_rx.clone();
            let router = admin::router(admin_state.clone());
            tasks.spawn(async move {
                let served = axum::serve(
                    l,
                    router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
                )
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
                if let Err(e) = served {
                    tracing::warn!(error = %e, "admin server failed");
                }
            });
        }

        shutdown.await;
        tracing::info!(workload = %config.identity.workload, "proxy shutting down");
        admin_state.ready.store(false, Ordering::Relaxed);
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        // Tunnels end within the drain too (then write their records).
        let _ = tokio::time::timeout(
            config.drain_timeout + Duration::from_secs(1),
            shared.tunnels.none(),
        )
        .await;
        // Listeners are drained; the exporter flushes what is queued.
        drop(shared);
        let _ = export_stop_tx.send(true);
        if let Some(exporter) = exporter {
            let _ = tokio::task::spawn_blocking(move || exporter.join()).await;
        }
        Ok(())
    }
}
