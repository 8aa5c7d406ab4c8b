//! Per-endpoint state that outlives configuration: connections (dialled
//! the same way for pools, tunnels and opaque TCP) and their pools,
//! requests in flight, a latency average, and outlier ejection. The
//! [`Registry`] hands out one [`EndpointState`] per address, so a new
//! routing table built after a config push finds the pools warm, the
//! loads counted and the ejected endpoints still ejected.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use lumen_core::networking::OutlierDetection;
use tokio::net::TcpStream;

use crate::body::RequestBody;
use crate::coalesce::Coalesce;
use crate::mtls::{MeshStream, MeshTls};
use crate::replay::ReplayBody;

/// A connector that dials one endpoint whatever the request's authority,
/// within the connect timeout in force (a DestinationRule may change it),
/// originating mesh mTLS when the endpoint is a sidecar holding a
/// certificate (or a DestinationRule says `ISTIO_MUTUAL`).
#[derive(Clone, Debug)]
pub struct Dial {
    address: SocketAddr,
    timeout_us: Arc<AtomicU64>,
    /// `None` for the local app: never TLS there.
    tls: Option<Arc<MeshTls>>,
    tls_mode: Arc<AtomicU8>,
    account: Arc<ArcSwapOption<String>>,
    alpn: &'static [u8],
}

impl Dial {
    pub fn new(address: SocketAddr, timeout_us: Arc<AtomicU64>) -> Self {
        Dial {
            address,
            timeout_us,
            tls: None,
            tls_mode: Arc::new(AtomicU8::new(TlsMode::Auto as u8)),
            account: Default::default(),
            alpn: b"http/1.1",
        }
    }
}

/// How a DestinationRule's `trafficPolicy.tls.mode` has a cluster's
/// connections made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TlsMode {
    /// Mesh mTLS to sidecars the control plane lists (Istio's auto mTLS).
    Auto = 0,
    /// `ISTIO_MUTUAL`: mesh mTLS to every endpoint.
    IstioMutual = 1,
    /// `DISABLE`: plaintext.
    Disable = 2,
}

impl tower::Service<Uri> for Dial {
    type Response = TokioIo<Coalesce<MeshStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let address = self.address;
        let timeout = Duration::from_micros(self.timeout_us.load(Ordering::Relaxed));
        let tls = self.tls.clone();
        let mode = self.tls_mode.load(Ordering::Relaxed);
        let account = self.account.load_full();
        let alpn = self.alpn;
        Box::pin(async move {
            let tcp = dial(address, timeout).await?;
            let stream = match tls {
                Some(tls) => {
                    let to = Upstream {
                        address,
                        account: account.as_deref().map(String::as_str),
                        authority: uri.authority().map_or("", |a| a.as_str()),
                    };
                    originate(&tls, mode, to, tcp, alpn).await?
                }
                None => MeshStream::Plain(tcp),
            };
            // HTTP/2 connections carry many small frames per request;
            // HTTP/1.1's codec already writes a request in one go.
            Ok(TokioIo::new(Coalesce::new(stream, alpn == b"h2")))
        })
    }
}

/// Where a connection goes, as mesh mTLS needs to know it.
pub struct Upstream<'a> {
    pub address: SocketAddr,
    /// `ns/<namespace>/sa/<account>` when the configuration names the
    /// endpoint's service account.
    pub account: Option<&'a str>,
    /// For the SNI.
    pub authority: &'a str,
}

/// mTLS on `tcp` when the mode and what the control plane says of the
/// upstream call for it, else the plain connection. The identity accepted
/// is the endpoint's configured service account's, else the one the
/// sidecar there registered, else (ISTIO_MUTUAL to an unknown endpoint)
/// any of the trust domain.
pub async fn originate(
    tls: &MeshTls,
    mode: u8,
    to: Upstream<'_>,
    tcp: TcpStream,
    alpn: &'static [u8],
) -> std::io::Result<MeshStream> {
    let peer = tls.peer(to.address);
    let wanted = match mode {
        m if m == TlsMode::Disable as u8 => false,
        m if m == TlsMode::IstioMutual as u8 => true,
        // Auto mTLS needs a certificate of this proxy's own; without one
        // (no join token) it speaks plaintext, which PERMISSIVE takes.
        _ => peer.is_some() && tls.ready(),
    };
    if !wanted {
        return Ok(MeshStream::Plain(tcp));
    }
    let configured = to
        .account
        .zip(tls.id())
        .map(|(account, me)| format!("spiffe://{}/{account}", me.trust_domain));
    let expected = configured.as_deref().or(peer.as_deref());
    match crate::mtls::connect(tls, tcp, to.authority, expected, alpn) {
        Some(handshake) => handshake.await,
        None => Err(std::io::Error::other(
            "mTLS is required to this endpoint but this proxy has no workload certificate yet",
        )),
    }
}

pub type UpstreamBody = ReplayBody<RequestBody>;

/// Connects to an upstream endpoint within `timeout`, set up as every
/// upstream connection is: no Nagle delay, TCP keepalive.
pub async fn dial(address: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect timed out after {timeout:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    keepalive(&stream);
    Ok(stream)
}

/// TCP keepalive on an upstream connection, so a peer that vanished without
/// a FIN (a crashed node, a dropped NAT entry) is found even on
/// connections nothing is sent on — HTTP/1.1 pools and opaque tunnels.
fn keepalive(stream: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// How long a pooled upstream connection may sit idle.
pub const UPSTREAM_IDLE: Duration = Duration::from_secs(4);

/// Microseconds since the process's first use of this clock: a compact
/// time stamp that fits an atomic.
pub fn now_micros() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64 + 1
}

pub type Pool = Client<Dial, UpstreamBody>;
/// Mirrored copies carry their whole body at once.
pub type MirrorBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;
pub type MirrorPool = Client<Dial, MirrorBody>;

/// The pools of one endpoint: HTTP/1.1, HTTP/2 with prior knowledge (h2c),
/// and HTTP/1.1 without reuse (`maxRequestsPerConnection: 1`).
#[derive(Debug)]
pub struct Pools {
    pub http1: Pool,
    pub http2: Pool,
    pub http1_once: Pool,
    pub mirror_http1: MirrorPool,
    pub mirror_http2: MirrorPool,
}

/// What Lumen knows about one upstream address.
#[derive(Debug)]
pub struct EndpointState {
    pub address: SocketAddr,
    pub address_str: Arc<str>,
    connect_timeout: Arc<AtomicU64>,
    tls: Option<Arc<MeshTls>>,
    tls_mode: Arc<AtomicU8>,
    account: Arc<ArcSwapOption<String>>,
    /// One set per worker ([`crate::workers`]): a connection is driven by
    /// the runtime that opened it, so a worker uses only its own.
    pools: Box<[OnceLock<Pools>]>,
    /// Requests sent and not yet answered (response headers).
    in_flight: AtomicU32,
    /// Peak-sensitive moving average of response latency, in microseconds.
    ewma_us: AtomicU64,
    ewma_at: AtomicU64,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// While `now_micros()` is below this, the endpoint is ejected.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
}

/// Linkerd's defaults: an unmeasured endpoint is assumed to answer in
/// 30 ms, and the average forgets with a 10 s time constant.
const DEFAULT_RTT_US: u64 = 30_000;
const DECAY_US: f64 = 10_000_000.0;

/// How one try ended, as outlier detection counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Success,
    /// A 5xx other than a gateway error.
    ServerError,
    /// 502, 503, 504, a failed connect, a reset or a timeout.
    GatewayError,
    /// Not the endpoint's doing (the client broke off).
    Neutral,
}

impl EndpointState {
    fn new(
        address: SocketAddr,
        connect_timeout: Duration,
        tls: Option<Arc<MeshTls>>,
        workers: usize,
    ) -> Self {
        EndpointState {
            address,
            address_str: address.to_string().into(),
            connect_timeout: Arc::new(AtomicU64::new(connect_timeout.as_micros() as u64)),
            tls,
            tls_mode: Arc::new(AtomicU8::new(TlsMode::Auto as u8)),
            account: Default::default(),
            pools: (0..workers.max(1)).map(|_| OnceLock::new()).collect(),
            in_flight: AtomicU32::new(0),
            ewma_us: AtomicU64::new(0),
            ewma_at: AtomicU64::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_micros(self.connect_timeout.load(Ordering::Relaxed))
    }

    /// A DestinationRule's `connectTimeout` for new connections.
    pub fn set_connect_timeout(&self, t: Duration) {
        self.connect_timeout
            .store(t.as_micros() as u64, Ordering::Relaxed);
    }

    /// A DestinationRule's `tls.mode` for new connections.
    pub fn set_tls_mode(&self, mode: TlsMode) {
        self.tls_mode.store(mode as u8, Ordering::Relaxed);
    }

    /// The service account the configuration gives the endpoint, if any.
    pub fn set_service_account(&self, account: Option<&str>, namespace: &str) {
        let want = account.map(|a| format!("ns/{namespace}/sa/{a}"));
        if self.account.load().as_deref() != want.as_ref() {
            self.account.store(want.map(Arc::new));
        }
    }

    /// Opens a connection of this endpoint's kind (plain or mesh mTLS) for
    /// opaque TCP.
    pub async fn connect(&self, authority: &str) -> std::io::Result<MeshStream> {
        let tcp = dial(self.address, self.connect_timeout()).await?;
        match &self.tls {
            Some(tls) => {
                let account = self.account.load_full();
                let to = Upstream {
                    address: self.address,
                    account: account.as_deref().map(String::as_str),
                    authority,
                };
                let mode = self.tls_mode.load(Ordering::Relaxed);
                originate(tls, mode, to, tcp, crate::mtls::TCP_ALPN).await
            }
            None => Ok(MeshStream::Plain(tcp)),
        }
    }

    /// The calling worker's pools, opened on first use.
    pub fn pools(&self) -> &Pools {
        let own = &self.pools[crate::workers::index() % self.pools.len()];
        own.get_or_init(|| {
            let dial = Dial {
                address: self.address,
                timeout_us: self.connect_timeout.clone(),
                tls: self.tls.clone(),
                tls_mode: self.tls_mode.clone(),
                account: self.account.clone(),
                alpn: b"http/1.1",
            };
            let dial_h2 = Dial {
                alpn: b"h2",
                ..dial.clone()
            };
            let mut builder = Client::builder(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                // Shorter than apps' own keep-alive (Node's is 5 s), so the
                // proxy closes an idle connection before the app does and a
                // request never races the app's close.
                .pool_idle_timeout(UPSTREAM_IDLE)
                .pool_max_idle_per_host(256)
                // A dead HTTP/2 connection (an upstream that stopped reading,
                // a silently dropped peer) is found by pings, not by a hang.
                .http2_keep_alive_interval(Some(Duration::from_secs(10)))
                .http2_keep_alive_timeout(Duration::from_secs(5))
                .http2_keep_alive_while_idle(true);
            let http1 = builder.build(dial.clone());
            let http1_once = {
                let mut b = builder.clone();
                b.pool_max_idle_per_host(0);
                b.build(dial.clone())
            };
            let mirror_http1 = builder.build(dial.clone());
            builder.http2_only(true);
            let http2 = builder.build(dial_h2.clone());
            let mirror_http2 = builder.build(dial_h2);
            Pools {
                http1,
                http2,
                http1_once,
                mirror_http1,
                mirror_http2,
            }
        })
    }

    pub fn has_pools(&self) -> bool {
        self.pools.iter().any(|p| p.get().is_some())
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request in flight to this endpoint until dropped.
    pub fn start(self: &Arc<Self>) -> Started {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Started {
            endpoint: self.clone(),
            at: Instant::now(),
        }
    }

    /// The cost the latency-aware balancer compares: the latency average
    /// times the load (plus one), as Linkerd's peak-EWMA.
    pub fn latency_cost(&self, now: u64) -> f64 {
        let ewma = self.ewma_us.load(Ordering::Relaxed);
        let at = self.ewma_at.load(Ordering::Relaxed);
        let rtt = if ewma == 0 {
            DEFAULT_RTT_US as f64
        } else {
            // An endpoint not heard from lately drifts back towards the
            // default, so a slow one gets tried again.
            let w = (-(now.saturating_sub(at) as f64) / DECAY_US).exp();
            ewma as f64 * w + DEFAULT_RTT_US as f64 * (1.0 - w)
        };
        rtt * f64::from(self.in_flight() + 1)
    }

    fn observe_latency(&self, rtt: Duration) {
        let now = now_micros();
        let rtt = rtt.as_micros() as u64;
        let prev = self.ewma_us.load(Ordering::Relaxed);
        let at = self.ewma_at.swap(now, Ordering::Relaxed);
        let next = if prev == 0 || rtt > prev {
            // Peak-sensitive: a slow answer counts in full at once.
            rtt
        } else {
            let w = (-(now.saturating_sub(at) as f64) / DECAY_US).exp();
            (prev as f64 * w + rtt as f64 * (1.0 - w)) as u64
        };
        self.ewma_us.store(next.max(1), Ordering::Relaxed);
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        now < self.ejected_until.load(Ordering::Relaxed)
    }

    /// Counts a try's outcome; returns whether the endpoint should now be
    /// ejected under `od` (the caller checks the cluster's ejection cap).
    fn count(&self, health: Health, od: &OutlierDetection) -> bool {
        match health {
            Health::Neutral => false,
            Health::Success => {
                self.consecutive_5xx.store(0, Ordering::Relaxed);
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                false
            }
            Health::ServerError | Health::GatewayError => {
                let c5 = self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
                let gw = if health == Health::GatewayError {
                    self.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
                } else {
                    self.consecutive_gateway.store(0, Ordering::Relaxed);
                    0
                };
                od.consecutive_5xx.is_some_and(|n| c5 >= n)
                    || od.consecutive_gateway.is_some_and(|n| gw >= n)
            }
        }
    }

    /// Ejects the endpoint for the base ejection time times the number of
    /// times in a row it was ejected (an endpoint back and healthy for an
    /// interval starts again from one), as Envoy does.
    fn eject(&self, od: &OutlierDetection, now: u64) {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let interval = od.interval.as_micros() as u64;
        let n = if until != 0 && now < until.saturating_add(interval) {
            self.ejections.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.ejections.store(1, Ordering::Relaxed);
            1
        };
        let base = od.base_ejection_time.as_micros() as u64;
        let max = base.max(300_000_000);
        let time = base.saturating_mul(u64::from(n)).min(max);
        self.ejected_until.store(now + time, Ordering::Relaxed);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
    }
}

/// A request in flight to an endpoint; [`finish`](Started::finish) says how
/// it went. Dropped unfinished (the caller went away), it only stops counting.
pub struct Started {
    endpoint: Arc<EndpointState>,
    at: Instant,
}

impl Started {
    /// Records the try's latency and health, and ejects the endpoint when
    /// the cluster's outlier detection says so and its cap allows.
    pub fn finish(
        self,
        health: Health,
        outlier: Option<(&OutlierDetection, &[Arc<EndpointState>])>,
    ) {
        let e = &self.endpoint;
        if health != Health::Neutral {
            e.observe_latency(self.at.elapsed());
        }
        let Some((od, peers)) = outlier else {
            return;
        };
        if !e.count(health, od) {
            return;
        }
        let now = now_micros();
        if e.is_ejected(now) {
            return;
        }
        let ejected = peers.iter().filter(|p| p.is_ejected(now)).count();
        // As Envoy: at least one endpoint may always be ejected.
        if ejected == 0 || ejected * 100 < od.max_ejection_percent as usize * peers.len() {
            tracing::info!(endpoint = %e.address, "outlier detection: endpoint ejected");
            e.eject(od, now);
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every endpoint the proxy talks to, by address.
#[derive(Debug)]
pub struct Registry {
    endpoints: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
    connect_timeout: Duration,
    tls: Arc<MeshTls>,
    workers: usize,
}

impl Registry {
    pub fn new(connect_timeout: Duration) -> Self {
        Registry {
            endpoints: Mutex::new(HashMap::new()),
            connect_timeout,
            tls: Default::default(),
            workers: 1,
        }
    }

    /// Endpoints keep a set of pools for each of the proxy's workers.
    pub fn with_workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Connections to sidecars take mesh mTLS with this identity.
    pub fn with_tls(mut self, tls: Arc<MeshTls>) -> Self {
        self.tls = tls;
        self
    }

    pub fn tls(&self) -> &Arc<MeshTls> {
        &self.tls
    }

    /// The state of the endpoint at `address`, made on first use. Called
    /// when a routing table is built, not per request.
    pub fn endpoint(&self, address: SocketAddr) -> Arc<EndpointState> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(address)
            .or_insert_with(|| {
                Arc::new(EndpointState::new(
                    address,
                    self.connect_timeout,
                    Some(self.tls.clone()),
                    self.workers,
                ))
            })
            .clone()
    }

    /// Forgets endpoints no table lists any more (their pools close once
    /// the last request on them ends).
    pub fn retain(&self, keep: &HashSet<SocketAddr>) {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|a, _| keep.contains(a));
    }

    /// Endpoints with connection pools, as `ip:port`.
    pub fn pooled(&self) -> Vec<String> {
        let map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = map
            .values()
            .filter(|e| e.has_pools())
            .map(|e| e.address_str.to_string())
            .collect();
        v.sort();
        v
    }

    /// An endpoint kept apart from the registry (the inbound side's local
    /// app), never forgotten by [`retain`](Self::retain).
    pub fn standalone(&self, address: SocketAddr) -> Arc<EndpointState> {
        Arc::new(EndpointState::new(
            address,
            self.connect_timeout,
            None,
            self.workers,
        ))
    }

    pub fn default_connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn od() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: Some(3),
            consecutive_gateway: None,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }

    #[test]
    fn consecutive_errors_eject_and_a_success_resets_the_count() {
        let reg = Registry::new(Duration::from_secs(1));
        let a = reg.endpoint("127.0.0.1:1".parse().unwrap());
        let b = reg.endpoint("127.0.0.1:2".parse().unwrap());
        let peers = [a.clone(), b.clone()];
        let od = od();
        for h in [
            Health::ServerError,
            Health::ServerError,
            Health::Success,
            Health::ServerError,
            Health::ServerError,
        ] {
            a.start().finish(h, Some((&od, &peers)));
        }
        assert!(!a.is_ejected(now_micros()));
        a.start().finish(Health::GatewayError, Some((&od, &peers)));
        assert!(a.is_ejected(now_micros()));
        // 10 % of two endpoints: the one ejected is the cap.
        for _ in 0..3 {
            b.start().finish(Health::ServerError, Some((&od, &peers)));
        }
        assert!(!b.is_ejected(now_micros()));
    }

    #[test]
    fn slow_answers_raise_the_latency_cost_at_once() {
        let reg = Registry::new(Duration::from_secs(1));
        let e = reg.endpoint("127.0.0.1:3".parse().unwrap());
        let now = now_micros();
        assert_eq!(e.latency_cost(now), DEFAULT_RTT_US as f64);
        e.observe_latency(Duration::from_millis(200));
        assert!(e.latency_cost(now_micros()) > 150_000.0);
        let _busy = e.start();
        assert!(
            e.latency_cost(now_micros()) > 300_000.0,
            "load multiplies the cost"
        );
    }
}
