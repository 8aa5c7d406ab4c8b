//! What the phases of the request path share, beneath them all: the
//! proxy's [`Shared`] state, one downstream [`Connection`], and the record
//! every request or connection starts with. Nothing here reaches up into a
//! phase, so `request`, `attempt`, `tunnel` and `tcp` all import one way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::header::HeaderValue;
use lumen_core::{Protocol, Reporter, RequestRecord, ResponseFlags, RetryPolicy, Workload};

use crate::body::{PendingRecord, RequestBodyState};
use crate::endpoint::{EndpointState, Registry};
use crate::retry::Budget;
use crate::route::RoutingTable;
use crate::telemetry::Telemetry;
use crate::trace::TraceContext;

/// Carries the caller's identity from its outbound sidecar to the callee's
/// inbound sidecar, as `namespace/service/workload/version`, the way Istio's
/// metadata exchange does. Until mTLS lands it is taken on trust.
pub const SOURCE_HEADER: &str = "x-lumen-source";
/// Names the response flags of a reply the proxy made itself.
pub const FLAGS_HEADER: &str = "x-lumen-response-flags";

/// Which listener a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// From the local app, to another service.
    Outbound,
    /// From another service's sidecar, to the local app.
    Inbound,
}

/// What every request on one downstream connection shares.
#[derive(Debug)]
pub struct Connection {
    pub side: Side,
    /// The downstream peer.
    pub peer: SocketAddr,
    /// The address the connection was accepted on.
    pub local: SocketAddr,
    /// Where the app was really going, when iptables redirected it here
    /// (transparent capture).
    pub original_dst: Option<SocketAddr>,
    /// The connection's place under the listener's connection limit; a
    /// tunnel opened on it takes it along, so tunnels count too.
    pub permit: std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    /// Inbound over mesh mTLS: the calling sidecar's SPIFFE id, checked
    /// against the mesh's roots.
    pub peer_identity: Option<Arc<str>>,
    /// At a gateway, a TLS connection: the Gateway server its
    /// ClientHello's SNI chose (requests must name one of its hosts, and
    /// only its Gateway's routes apply).
    pub gateway_server: Option<Arc<crate::route::PortServer>>,
}

impl Connection {
    /// Takes the connection's place under the limit (for a tunnel).
    pub fn take_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.permit.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// What every request handler shares: identity, routes, pools, telemetry.
pub struct Shared {
    pub identity: Workload,
    pub identity_header: HeaderValue,
    pub routes: ArcSwap<RoutingTable>,
    /// The configuration version in force, as `/config_dump` shows it.
    pub config_version: ArcSwap<String>,
    /// Per-endpoint and per-cluster state (pools, loads, ejections) that
    /// outlives routing tables.
    pub registry: Arc<Registry>,
    pub telemetry: Arc<Telemetry>,
    pub app: Option<App>,
    /// The app on the other ports inbound connections were sent to.
    pub app_ports: AppPorts,
    pub default_route: Arc<str>,
    /// Longest wait for response headers once the request body is sent.
    pub timeout: Duration,
    /// Request bodies up to this size are kept so they can be retried…
    pub replay_limit: usize,
    /// …out of this many bytes for every request in flight together.
    pub replay_budget: Arc<crate::replay::Budget>,
    /// Turns true when the proxy shuts down; tunnels then get `drain` to end.
    pub stop: tokio::sync::watch::Receiver<bool>,
    pub drain: Duration,
    /// CONNECT and upgrade tunnels still open.
    pub tunnels: Arc<Open>,
    pub limits: crate::limits::Limits,
    pub quotas: Arc<crate::quota::QuotaLedger>,
    /// Key sets RequestAuthentications' `jwksUri`s gave.
    pub jwks: crate::jwt::KeySets,
    /// A gateway proxy's server credentials; `None` for a sidecar.
    pub gateway: Option<Arc<crate::gateway::Credentials>>,
}

/// A record from the first moment of a request or connection, with what
/// every kind of traffic knows then. From here on it is written exactly
/// once, even if the client goes away before a response exists (the
/// guard's drop writes it).
pub fn begin_record(
    shared: &Shared,
    conn: &Connection,
    protocol: Protocol,
    source: Workload,
    destination: Workload,
    trace: &TraceContext,
    body_state: Arc<RequestBodyState>,
) -> PendingRecord {
    let side = conn.side;
    // Inbound over mesh mTLS, both sides are proven now; outbound, the
    // upstream's identity comes with its connection.
    let (mtls, source_principal, destination_principal) = match &conn.peer_identity {
        Some(peer) => (true, Some(peer.clone()), shared.registry.tls().principal()),
        None => (false, None, None),
    };
    let record = RequestRecord {
        start_time: SystemTime::now(),
        duration: Duration::ZERO,
        reporter: match side {
            Side::Outbound => Reporter::Source,
            Side::Inbound => Reporter::Destination,
        },
        source,
        destination,
        protocol,
        method: String::new(),
        authority: String::new(),
        path: String::new(),
        route: shared.default_route.clone(),
        status: 0,
        grpc_status: None,
        request_bytes: 0,
        response_bytes: 0,
        retries: 0,
        upstream_address: None,
        response_flags: ResponseFlags::empty(),
        mtls,
        trace_id: trace.trace_id,
        span_id: trace.span_id,
        parent_span_id: trace.parent_span_id,
        policy: None,
        source_principal,
        destination_principal,
    };
    PendingRecord::new(record, Instant::now(), body_state, shared.telemetry.clone())
}

impl Shared {
    /// The local app an inbound connection is for: where it was sent when
    /// the capture redirected it — the pod's address and port, as Istio
    /// forwards since 1.10, so an app listening on several ports gets each
    /// connection on its own and what it binds on loopback only stays
    /// private — else `--app` (none when its port is 0).
    pub fn inbound_app(&self, conn: &Connection) -> Option<&App> {
        let app = self.app.as_ref()?;
        match conn.original_dst {
            Some(dst) if dst != app.address => self.app_ports.get(app, dst, &self.registry),
            _ if app.address.port() == 0 => None,
            _ => Some(app),
        }
    }
}

/// Apps by the address connections were sent to, made the first time one
/// is seen. Each lives as long as the process (the table never shrinks, so
/// a `&App` stays good); at most [`AppPorts::MAX`], as a pod listens on few
/// ports — connections to more are refused rather than sent elsewhere.
#[derive(Default)]
pub struct AppPorts {
    by_address: std::sync::RwLock<std::collections::HashMap<SocketAddr, &'static App>>,
}

impl AppPorts {
    pub const MAX: usize = 256;

    fn get(&self, default: &App, address: SocketAddr, registry: &Registry) -> Option<&'static App> {
        let read = self.by_address.read().unwrap_or_else(|p| p.into_inner());
        if let Some(app) = read.get(&address) {
            return Some(app);
        }
        drop(read);
        let mut write = self.by_address.write().unwrap_or_else(|p| p.into_inner());
        if let Some(app) = write.get(&address) {
            return Some(app);
        }
        if write.len() >= Self::MAX {
            tracing::warn!(%address, "inbound connections to more than {} addresses: refused", Self::MAX);
            return None;
        }
        let app: &'static App = Box::leak(Box::new(App {
            address,
            address_str: Arc::from(address.to_string()),
            identity: default.identity.clone(),
            endpoint: registry.standalone(address),
            retries: default.retries.clone(),
            budget: Default::default(),
        }));
        write.insert(address, app);
        Some(app)
    }
}

/// The local app behind an inbound sidecar.
pub struct App {
    pub address: SocketAddr,
    pub address_str: Arc<str>,
    pub identity: Workload,
    pub endpoint: Arc<EndpointState>,
    /// Inbound requests are not retried: the caller's sidecar does that.
    pub retries: RetryPolicy,
    pub budget: Budget,
}

/// Tunnels still open, so shutdown can wait for their records before the
/// exporter stops.
#[derive(Debug, Default)]
pub struct Open {
    count: std::sync::atomic::AtomicUsize,
    closed: tokio::sync::Notify,
}

/// One open tunnel; dropping it closes its count.
pub struct Held(std::sync::Arc<Open>);

impl Open {
    pub fn hold(self: &std::sync::Arc<Self>) -> Held {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Held(self.clone())
    }

    /// Resolves when no tunnel is open.
    pub async fn none(&self) {
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.closed.notify_waiters();
        }
    }
}
