//! The forward phase: a loop of tries. Each try picks an endpoint (one
//! not tried yet, while there are others), sends the request with its own
//! per-try timeout, and is judged by the retry policy; a retry waits a
//! jittered backoff and must fit the service's retry budget. The request
//! body is streamed on the first try and replayed on retries (see
//! [`crate::replay`]). The whole exchange stays under the request timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, Version};
use hyper::body::Incoming;
use lumen_core::{ResponseFlags, RetryPolicy, UpstreamProtocol};

use crate::body::{PendingRecord, RequestBody, RequestBodyState, grpc_status};
pub use crate::context::App;
use crate::endpoint::{EndpointState, Health};
use crate::forward::{self, ForwardError};
use crate::replay::Replay;
use crate::retry::{self, Budget, Outcome};
use crate::route::Routed;

/// Where a request's tries go.
pub enum Destination<'a> {
    /// A mesh service's cluster (outbound).
    Service(Routed),
    /// The local app (inbound).
    App(&'a App),
}

/// One picked endpoint.
pub struct Endpoint {
    pub state: Arc<EndpointState>,
    pub workload: Arc<str>,
    pub version: Arc<str>,
}

impl Endpoint {
    pub fn address(&self) -> SocketAddr {
        self.state.address
    }
}

impl Destination<'_> {
    fn policy(&self) -> &RetryPolicy {
        match self {
            Destination::Service(r) => r.retries(),
            Destination::App(a) => &a.retries,
        }
    }

    fn budget(&self) -> &Budget {
        match self {
            Destination::Service(r) => match &r.cluster {
                Some(c) => &c.state.budget,
                None => &EMPTY_BUDGET,
            },
            Destination::App(a) => &a.budget,
        }
    }

    /// A retry's place: the route's budget share, under the cluster's
    /// `maxRetries`.
    fn retry(&self, policy: &RetryPolicy) -> Option<retry::InFlight<'_>> {
        match self {
            Destination::Service(Routed {
                cluster: Some(c), ..
            }) => {
                let (pct, min) = c.retry_policy_budget(policy);
                c.state.budget.retry(pct, min, c.state.limits().max_retries)
            }
            _ => self
                .budget()
                .retry(policy.budget_percent, policy.budget_min_concurrency, None),
        }
    }

    /// The next endpoint, avoiding those `tried` while others remain.
    pub fn pick(&self, tried: &[SocketAddr], hash: Option<u64>) -> Option<Endpoint> {
        match self {
            Destination::Service(r) => {
                let e = r.cluster.as_ref()?.pick(tried, hash)?;
                Some(Endpoint {
                    state: e.state.clone(),
                    workload: e.workload.clone(),
                    version: e.version.clone(),
                })
            }
            Destination::App(a) => Some(Endpoint {
                state: a.endpoint.clone(),
                workload: a.identity.workload.clone(),
                version: a.identity.version.clone(),
            }),
        }
    }

    fn fresh_connections(&self) -> bool {
        match self {
            Destination::Service(r) => r.cluster.as_ref().is_some_and(|c| c.fresh_connections),
            Destination::App(_) => false,
        }
    }

    fn report(&self, started: crate::endpoint::Started, outcome: Outcome) {
        let health = match outcome {
            Outcome::Response { status, .. } => match status.as_u16() {
                502..=504 => Health::GatewayError,
                500..=599 => Health::ServerError,
                _ => Health::Success,
            },
            Outcome::ConnectFailed | Outcome::Refused | Outcome::Reset | Outcome::TimedOut => {
                Health::GatewayError
            }
            Outcome::Final => Health::Neutral,
        };
        let peers = match self {
            Destination::Service(r) => r.cluster.as_ref().and_then(|c| c.outlier_peers()),
            Destination::App(_) => None,
        };
        started.finish(health, peers);
    }
}

static EMPTY_BUDGET: std::sync::LazyLock<Budget> = std::sync::LazyLock::new(Budget::default);

/// The HTTP version a try speaks upstream: the destination's declared
/// protocol, or the caller's when it declares none.
pub fn upstream_version(protocol: UpstreamProtocol, downstream: Version) -> Version {
    match protocol {
        UpstreamProtocol::Http => Version::HTTP_11,
        UpstreamProtocol::Http2 | UpstreamProtocol::Grpc => Version::HTTP_2,
        UpstreamProtocol::Auto | UpstreamProtocol::Tcp if downstream == Version::HTTP_2 => {
            Version::HTTP_2
        }
        UpstreamProtocol::Auto | UpstreamProtocol::Tcp => Version::HTTP_11,
    }
}

/// How the forward phase is to run.
pub struct Forward<'a> {
    pub destination: &'a Destination<'a>,
    /// The authority the upstream sees (a route may rewrite it).
    pub authority: &'a str,
    /// The request's hash, for a consistent-hash balancer.
    pub hash: Option<u64>,
    pub version: Version,
    /// Longest wait for response headers once the request body is sent,
    /// over all tries.
    pub timeout: Duration,
    /// Request bodies up to this size are kept for retries…
    pub replay_limit: usize,
    /// …out of this many bytes for all requests together.
    pub replay_budget: &'a Arc<crate::replay::Budget>,
    pub limits: &'a crate::limits::Limits,
    pub metrics: &'a crate::telemetry::Metrics,
    /// A gRPC caller's deadline (`grpc-timeout`), from the request's start.
    pub deadline: Option<Duration>,
    /// Clusters that get a copy of the request (fire and forget).
    pub mirrors: Vec<Arc<crate::cluster::Cluster>>,
    /// Outbound: this proxy's identity, for records of tries over mesh
    /// mTLS (inbound, the downstream connection says).
    pub tls: Option<&'a crate::mtls::MeshTls>,
}

impl Forward<'_> {
    /// Sends the request until a try succeeds or the policy stops,
    /// filling the record's `retries`, endpoint and flags.
    pub async fn run(
        &self,
        parts: http::request::Parts,
        body: Incoming,
        body_state: Arc<RequestBodyState>,
        pending: &mut PendingRecord,
    ) -> Result<Response<Incoming>, ForwardError> {
        let deadline = {
            let body_state = body_state.clone();
            let timeout = self.timeout;
            async move {
                body_state.wait_ended().await;
                tokio::time::sleep(timeout).await;
            }
        };
        let caller_deadline = async {
            match self.deadline {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        // Nothing passes for the stream idle timeout while the body is still
        // going up (the client stalled, or the upstream stopped reading):
        // the exchange is cut, whoever is stuck.
        let stalled = {
            let body_state = body_state.clone();
            let idle = self.limits.stream_idle_timeout;
            async move {
                // Most requests (GETs) have no body: no timer for them.
                if body_state.ended() {
                    return std::future::pending::<()>().await;
                }
                let mut seen = body_state.bytes();
                loop {
                    tokio::select! {
                        () = body_state.wait_ended() => return std::future::pending::<()>().await,
                        () = tokio::time::sleep(idle) => {}
                    }
                    let now = body_state.bytes();
                    if now == seen {
                        body_state.stalled();
                        return;
                    }
                    seen = now;
                }
            }
        };
        tokio::select! {
            r = self.tries(parts, body, &body_state, pending) => r,
            () = stalled => Err(ForwardError {
                flags: ResponseFlags::STREAM_IDLE_TIMEOUT,
                status: http::StatusCode::REQUEST_TIMEOUT,
                message: format!(
                    "the request body made no progress for {:?}",
                    self.limits.stream_idle_timeout
                ),
                outcome: Outcome::Final,
            }),
            () = caller_deadline => Err(ForwardError {
                flags: ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
                status: http::StatusCode::GATEWAY_TIMEOUT,
                message: format!(
                    "no response headers within the caller's deadline of {:?}",
                    self.deadline.unwrap_or_default()
                ),
                outcome: Outcome::TimedOut,
            }),
            () = deadline => {
                let mut e = ForwardError {
                    flags: ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
                    status: http::StatusCode::GATEWAY_TIMEOUT,
                    message: format!("upstream sent no response headers within {:?}", self.timeout),
                    outcome: Outcome::TimedOut,
                };
                if let Some(r) = pending.record()
                    && let Some(a) = &r.upstream_address
                {
                    e.message = format!("upstream {a} sent no response headers within {:?}", self.timeout);
                }
                Err(e)
            }
        }
    }

    async fn tries(
        &self,
        parts: http::request::Parts,
        body: Incoming,
        body_state: &Arc<RequestBodyState>,
        pending: &mut PendingRecord,
    ) -> Result<Response<Incoming>, ForwardError> {
        let policy = self.destination.policy();
        let budget = self.destination.budget();
        let _in_flight = budget.request();
        // The circuit breaker: a place under the cluster's pool limits.
        let _admitted = match self.destination {
            Destination::Service(Routed {
                cluster: Some(c), ..
            }) => match c.admit(self.version != Version::HTTP_2).await {
                Ok(a) => Some(a),
                Err(overflow) => {
                    return Err(ForwardError {
                        flags: ResponseFlags::UPSTREAM_OVERFLOW,
                        status: http::StatusCode::SERVICE_UNAVAILABLE,
                        message: format!("upstream overflow: cluster `{}`: {}", c.name, overflow.0),
                        outcome: Outcome::Final,
                    });
                }
            },
            _ => None,
        };
        let keep = if policy.attempts == 0 && self.mirrors.is_empty() {
            0
        } else {
            self.replay_limit
        };
        let mirror_parts = (!self.mirrors.is_empty()).then(|| {
            let mut r = Request::new(());
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = parts.uri.clone();
            *r.headers_mut() = parts.headers.clone();
            r.into_parts().0
        });
        let source = RequestBody::new(
            body,
            body_state.clone(),
            self.limits.max_request_bytes,
            self.limits.stream_idle_timeout,
        );
        let replay = Replay::new(source, keep, self.replay_budget.clone());
        let result = self.loop_tries(&replay, parts, body_state, pending).await;
        if let Some(parts) = mirror_parts {
            match replay.complete() {
                Some(body) => {
                    for cluster in &self.mirrors {
                        crate::mirror::spawn(
                            cluster.clone(),
                            &parts,
                            self.version,
                            self.authority,
                            body.clone(),
                            self.timeout,
                        );
                    }
                }
                None => tracing::debug!(
                    "mirror: the request body was not kept whole (over the replay limit); no copy sent"
                ),
            }
        }
        // The answer is final: keep nothing more for tries that will not come.
        replay.commit();
        result
    }

    async fn loop_tries(
        &self,
        replay: &Replay<RequestBody>,
        parts: http::request::Parts,
        body_state: &Arc<RequestBodyState>,
        pending: &mut PendingRecord,
    ) -> Result<Response<Incoming>, ForwardError> {
        let policy = self.destination.policy();
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut retry = 0u32;
        // The retry in flight holds its place in the budget until the
        // next decision.
        let mut _retrying = None;
        loop {
            let Some(endpoint) = self.destination.pick(&tried, self.hash) else {
                return Err(ForwardError {
                    flags: ResponseFlags::NO_HEALTHY_UPSTREAM,
                    status: http::StatusCode::SERVICE_UNAVAILABLE,
                    message: "no healthy upstream".into(),
                    outcome: Outcome::Final,
                });
            };
            if let Some(r) = pending.record_mut() {
                r.destination.workload = endpoint.workload.clone();
                r.destination.version = endpoint.version.clone();
                r.upstream_address = Some(endpoint.state.address_str.clone());
                r.retries = retry;
            }
            tried.push(endpoint.address());

            let mut req = Request::new(replay.try_body());
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = parts.uri.clone();
            *req.headers_mut() = parts.headers.clone();
            let started = endpoint.state.start();
            let result = forward::send(
                &endpoint.state,
                self.version,
                self.destination.fresh_connections(),
                self.authority,
                body_state,
                req,
                policy.per_try_timeout,
            )
            .await;
            if let (Ok(resp), Some(tls), Some(r)) = (&result, self.tls, pending.record_mut()) {
                // Over mesh mTLS: the identities both sides proved.
                let peer = resp.extensions().get::<crate::mtls::UpstreamPeer>();
                r.mtls = peer.is_some();
                r.destination_principal = peer.map(|p| p.0.clone());
                r.source_principal = peer.and_then(|_| tls.principal());
            }
            let outcome = match &result {
                Ok(resp) => Outcome::Response {
                    status: resp.status(),
                    // Only a trailers-only answer has its status already.
                    grpc: grpc_status(resp.headers()),
                },
                Err(e) => e.outcome,
            };
            self.destination.report(started, outcome);
            if !retry::wants_retry(policy, outcome) {
                return result;
            }
            if retry >= policy.attempts {
                if policy.attempts > 0
                    && let Some(r) = pending.record_mut()
                {
                    r.response_flags
                        .insert(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
                }
                return result;
            }
            if !replay.replayable() {
                return result;
            }
            // The previous retry's place goes back before this one is taken.
            _retrying = None;
            _retrying = self.destination.retry(policy);
            self.metrics.retry(_retrying.is_some());
            if _retrying.is_none() {
                tracing::debug!(retry, "retry budget spent; answering the failed try");
                return result;
            }
            drop(result);
            retry += 1;
            tokio::time::sleep(retry::backoff(policy, retry)).await;
        }
    }
}
