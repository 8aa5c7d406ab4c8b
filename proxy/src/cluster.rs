//! Clusters: the endpoints a route sends to — a service, or a subset of it
//! by labels — with the DestinationRule's policy for them compiled: the
//! balancer, the connection pool limits (the circuit breaker), outlier
//! detection and locality. A cluster is rebuilt with every routing table;
//! the state that must survive a push (endpoint loads and ejections, the
//! circuit breaker's counts, the balancer when the endpoints are the same)
//! is carried over by name.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use lumen_core::networking::destination_rule::Algorithm;
use lumen_core::networking::{ConnectionPool, HashKey, OutlierDetection, TrafficPolicy};
use lumen_core::{RetryPolicy, UpstreamProtocol};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::balance::{Balancer, Candidates};
use crate::endpoint::{EndpointState, now_micros};
use crate::retry::Budget;

/// One endpoint as a cluster sees it.
#[derive(Debug)]
pub struct ClusterEndpoint {
    pub state: Arc<EndpointState>,
    pub workload: Arc<str>,
    pub version: Arc<str>,
    /// 0 is preferred; higher levels take traffic only when no endpoint of
    /// a lower one is healthy (locality failover).
    pub priority: u8,
}

/// The circuit breaker's counts and the retry budget of one cluster,
/// carried from table to table while its limits stay the same.
#[derive(Debug)]
pub struct ClusterState {
    limits: ConnectionPool,
    requests: AtomicU32,
    pending: AtomicU32,
    connections: AtomicU32,
    /// HTTP/1.1 connections in use, when `maxConnections` bounds them.
    http1: Option<Arc<Semaphore>>,
    pub budget: Budget,
}

impl ClusterState {
    pub fn new(limits: ConnectionPool) -> Self {
        ClusterState {
            http1: limits
                .max_connections
                .map(|n| Arc::new(Semaphore::new(n as usize))),
            limits,
            requests: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            connections: AtomicU32::new(0),
            budget: Budget::default(),
        }
    }

    pub fn limits(&self) -> &ConnectionPool {
        &self.limits
    }

    /// Requests admitted and not yet finished, requests waiting for a
    /// connection, and TCP connections open: Envoy's `upstream_rq_active`,
    /// `upstream_rq_pending_active` and (for TCP) `upstream_cx_active`.
    pub fn active(&self) -> (u32, u32, u32) {
        (
            self.requests.load(Ordering::Relaxed),
            self.pending.load(Ordering::Relaxed),
            self.connections.load(Ordering::Relaxed),
        )
    }
}

/// The pool was full: answered 503 with `UO`.
#[derive(Debug)]
pub struct Overflow(pub &'static str);

/// A request's place under the cluster's limits, held until it ends.
pub struct Admitted {
    state: Arc<ClusterState>,
    _connection: Option<OwnedSemaphorePermit>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.state.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP connection's place under `maxConnections`.
pub struct Connected {
    state: Arc<ClusterState>,
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.state.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct Cluster {
    /// Istio's cluster name: `outbound|9080|v1|reviews.default.svc.cluster.local`.
    pub name: Arc<str>,
    /// The service's position in the mesh snapshot the cluster was built from.
    pub service_index: usize,
    pub service: Arc<str>,
    pub namespace: Arc<str>,
    pub subset: Option<Arc<str>>,
    pub protocol: UpstreamProtocol,
    /// The service's retry policy, for routes that set none.
    pub retries: Arc<RetryPolicy>,
    pub endpoints: Vec<ClusterEndpoint>,
    peers: Vec<Arc<EndpointState>>,
    pub balancer: Arc<Balancer>,
    /// The balancer's algorithm, to tell whether a new table may keep it.
    pub algorithm: Algorithm,
    pub hash_key: Option<HashKey>,
    pub outlier: Option<OutlierDetection>,
    pub state: Arc<ClusterState>,
    /// `(percent, min concurrency)` of a DestinationRule's retry budget.
    pub retry_budget: Option<(f64, u32)>,
    /// `maxRequestsPerConnection: 1`: no connection is reused.
    pub fresh_connections: bool,
}

impl Cluster {
    /// Builds a cluster from its endpoints and policy. `previous` is the
    /// cluster of the same name in the table being replaced, if any.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: Arc<str>,
        service_index: usize,
        service: &lumen_core::Service,
        subset: Option<Arc<str>>,
        endpoints: Vec<ClusterEndpoint>,
        policy: &TrafficPolicy,
        previous: Option<&Cluster>,
    ) -> Cluster {
        let lb = policy.load_balancer.as_ref();
        let algorithm = lb.map_or(Algorithm::LeastRequest, |l| l.algorithm.clone());
        let addresses: Vec<SocketAddr> = endpoints.iter().map(|e| e.state.address).collect();
        let balancer = match previous {
            Some(p)
                if p.algorithm == algorithm
                    && p.endpoints
                        .iter()
                        .map(|e| e.state.address)
                        .eq(addresses.iter().copied()) =>
            {
                p.balancer.clone()
            }
            _ => {
                let keys: Vec<&str> = endpoints.iter().map(|e| &*e.state.address_str).collect();
                Arc::new(Balancer::new(&algorithm, &keys))
            }
        };
        let limits = policy.connection_pool.clone().unwrap_or_default();
        let state = match previous {
            Some(p) if *p.state.limits() == limits => p.state.clone(),
            _ => Arc::new(ClusterState::new(limits.clone())),
        };
        if let Some(t) = limits.connect_timeout {
            for e in &endpoints {
                e.state.set_connect_timeout(t);
            }
        }
        let tls = match policy.tls {
            None => crate::endpoint::TlsMode::Auto,
            Some(lumen_core::networking::TlsMode::IstioMutual) => {
                crate::endpoint::TlsMode::IstioMutual
            }
            Some(lumen_core::networking::TlsMode::Disable) => crate::endpoint::TlsMode::Disable,
        };
        for e in &endpoints {
            e.state.set_tls_mode(tls);
        }
        let hash_key = match &algorithm {
            Algorithm::ConsistentHash(ch) => Some(ch.key.clone()),
            _ => None,
        };
        Cluster {
            name,
            service_index,
            service: service.name.clone(),
            namespace: service.namespace.clone(),
            subset,
            protocol: service.protocol,
            retries: service.retries.clone(),
            peers: endpoints.iter().map(|e| e.state.clone()).collect(),
            endpoints,
            balancer,
            algorithm,
            hash_key,
            outlier: policy.outlier_detection.clone(),
            state,
            retry_budget: policy.retry_budget,
            fresh_connections: limits.max_requests_per_connection == Some(1),
        }
    }

    /// The endpoints outlier detection weighs an ejection against.
    pub fn outlier_peers(&self) -> Option<(&OutlierDetection, &[Arc<EndpointState>])> {
        self.outlier.as_ref().map(|od| (od, self.peers.as_slice()))
    }

    /// The next endpoint: healthy (not ejected, unless too few are healthy
    /// and the cluster panics as Envoy does), in the best locality with a
    /// healthy endpoint, not `tried` while others remain; then as the
    /// balancer chooses.
    pub fn pick(&self, tried: &[SocketAddr], hash: Option<u64>) -> Option<&ClusterEndpoint> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let now = now_micros();
        let healthy = |i: usize| !self.endpoints[i].state.is_ejected(now);
        let healthy_count = (0..n).filter(|&i| healthy(i)).count();
        let panic = match &self.outlier {
            Some(od) => healthy_count * 100 < od.min_health_percent as usize * n,
            None => true,
        };
        let level = (0..n)
            .filter(|&i| panic || healthy(i))
            .map(|i| self.endpoints[i].priority)
            .min()?;
        let usable = |i: usize| (panic || healthy(i)) && self.endpoints[i].priority == level;
        let fresh = |i: usize| usable(i) && !tried.contains(&self.endpoints[i].state.address);
        let any_fresh = (0..n).any(fresh);
        let cost = |i: usize| match *self.balancer {
            Balancer::LeastLatency => self.endpoints[i].state.latency_cost(now),
            _ => f64::from(self.endpoints[i].state.in_flight()),
        };
        let pick = if any_fresh {
            self.balancer.pick(&Candidates {
                len: n,
                eligible: &fresh,
                cost: &cost,
                hash,
            })
        } else {
            self.balancer.pick(&Candidates {
                len: n,
                eligible: &usable,
                cost: &cost,
                hash,
            })
        };
        pick.map(|i| &self.endpoints[i])
    }

    /// A request's place under the pool's limits: `http2MaxRequests`
    /// bounds requests in flight, and for HTTP/1.1 `maxConnections` bounds
    /// connections in use, with at most `http1MaxPendingRequests` waiting
    /// for one. Beyond them: [`Overflow`].
    pub async fn admit(&self, http1: bool) -> Result<Admitted, Overflow> {
        let s = &self.state;
        let requests = s.requests.fetch_add(1, Ordering::Relaxed);
        let mut admitted = Admitted {
            state: s.clone(),
            _connection: None,
        };
        if s.limits
            .http2_max_requests
            .is_some_and(|max| requests >= max)
        {
            return Err(Overflow("requests in flight reached http2MaxRequests"));
        }
        let Some(sem) = s.http1.as_ref().filter(|_| http1) else {
            return Ok(admitted);
        };
        if let Ok(p) = sem.clone().try_acquire_owned() {
            admitted._connection = Some(p);
            return Ok(admitted);
        }
        let max_pending = s.limits.http1_max_pending_requests.unwrap_or(u32::MAX);
        if s.pending.fetch_add(1, Ordering::Relaxed) >= max_pending {
            s.pending.fetch_sub(1, Ordering::Relaxed);
            return Err(Overflow(
                "every connection maxConnections allows is busy and http1MaxPendingRequests are waiting",
            ));
        }
        let permit = sem.clone().acquire_owned().await;
        s.pending.fetch_sub(1, Ordering::Relaxed);
        match permit {
            Ok(p) => {
                admitted._connection = Some(p);
                Ok(admitted)
            }
            Err(_) => Err(Overflow("the connection pool closed")),
        }
    }

    /// A TCP connection's place under `maxConnections`.
    pub fn connect_admit(&self) -> Result<Connected, Overflow> {
        let s = &self.state;
        let n = s.connections.fetch_add(1, Ordering::Relaxed);
        let held = Connected { state: s.clone() };
        if s.limits.max_connections.is_some_and(|max| n >= max) {
            return Err(Overflow("connections reached maxConnections"));
        }
        Ok(held)
    }

    /// The policy's retry budget over the route's.
    pub fn retry_policy_budget(&self, policy: &RetryPolicy) -> (u32, u32) {
        match self.retry_budget {
            Some((pct, min)) => (pct.round() as u32, min),
            None => (policy.budget_percent, policy.budget_min_concurrency),
        }
    }
}

/// Istio's cluster name for a service, subset and port.
pub fn cluster_name(
    service: &lumen_core::Service,
    subset: Option<&str>,
    port: Option<u16>,
) -> String {
    format!(
        "outbound|{}|{}|{}",
        port.or(service.port)
            .map(|p| p.to_string())
            .unwrap_or_default(),
        subset.unwrap_or(""),
        service.fqdn()
    )
}

/// How near an endpoint is to the proxy: 0 same region, zone and
/// subzone; 1 same zone; 2 same region; 3 a region `failover` names for
/// the proxy's; 4 elsewhere.
pub fn locality_priority(proxy: &str, endpoint: Option<&str>, failover: &[(String, String)]) -> u8 {
    let Some(endpoint) = endpoint else {
        return 4;
    };
    let mut p = proxy.split('/');
    let mut e = endpoint.split('/');
    let (pr, pz, ps) = (p.next(), p.next(), p.next());
    let (er, ez, es) = (e.next(), e.next(), e.next());
    if pr != er {
        let fails_over_here = failover
            .iter()
            .any(|(from, to)| Some(from.as_str()) == pr && Some(to.as_str()) == er);
        return if fails_over_here { 3 } else { 4 };
    }
    if pz != ez {
        return 2;
    }
    if ps != es {
        return 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locality_prefers_zone_then_region_then_failover() {
        let f = [("us-east".to_string(), "eu-west".to_string())];
        assert_eq!(locality_priority("us-east/a/x", Some("us-east/a/x"), &f), 0);
        assert_eq!(locality_priority("us-east/a/x", Some("us-east/a/y"), &f), 1);
        assert_eq!(locality_priority("us-east/a", Some("us-east/b"), &f), 2);
        assert_eq!(locality_priority("us-east/a", Some("eu-west/c"), &f), 3);
        assert_eq!(locality_priority("us-east/a", Some("ap-south/c"), &f), 4);
        assert_eq!(locality_priority("us-east/a", None, &f), 4);
    }
}
