//! Lumen's policies for an Envoy fleet: Envoy's global rate-limit service
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`) and
//! external authorization (`envoy.service.auth.v3.Authorization/Check`),
//! so plain Envoys — or Istio's `EnvoyFilter` rate-limit sample — can use
//! Lumen as their rate-limit and authorization service.
//!
//! Rate limits: a `RateLimit` or `Quota` with an `envoy:` descriptor
//! (envoyproxy/ratelimit's model: a domain and entries, a value left out
//! matching any value) answers the requests whose descriptor is that one.
//! This service is central, so its counters are exact: a RateLimit is a
//! token bucket per descriptor values, a Quota a fixed window count.
//! Conditional policies count only while the policy engine has them on;
//! a dry run answers OK with the status it would have given (shadow mode).
//!
//! Authorization: the `AccessPolicy`s on the service the request's host
//! names, for the source its mTLS principal (`spiffe://…/ns/N/sa/W`) or
//! the `x-lumen-source` header a Lumen sidecar sets names.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit as CurrentLimit, rate_limit::Unit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use lumen_core::MeshConfig;
use lumen_core::access::AccessRule;
use tonic::{Request, Response, Status};

/// Most counters kept (descriptor values × policies); past it, the idle
/// ones go first.
const MAX_COUNTERS: usize = 100_000;

/// The mesh configuration in force and the policy engine's decisions.
pub type Policies = Arc<dyn Fn() -> (Arc<MeshConfig>, BTreeSet<String>) + Send + Sync>;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Both services over the same policies and counters.
#[derive(Clone)]
pub struct EnvoyServices {
    policies: Policies,
    buckets: Arc<Mutex<HashMap<String, Bucket>>>,
    windows: Arc<Mutex<HashMap<String, (i64, u64)>>>,
}

impl EnvoyServices {
    pub fn new(policies: Policies) -> Self {
        EnvoyServices {
            policies,
            buckets: Arc::default(),
            windows: Arc::default(),
        }
    }

    pub fn rate_limit_server(&self) -> RateLimitServiceServer<Self> {
        RateLimitServiceServer::new(self.clone())
    }

    pub fn authorization_server(&self) -> AuthorizationServer<Self> {
        AuthorizationServer::new(self.clone())
    }

    /// One descriptor's status, counting `hits` against the first policy
    /// it matches.
    fn status(
        &self,
        mesh: &MeshConfig,
        active: &BTreeSet<String>,
        domain: &str,
        entries: &[(&str, &str)],
        hits: u64,
    ) -> DescriptorStatus {
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let counter = |id: &str| {
            let mut k = id.to_string();
            for (key, value) in entries {
                k.push('\u{1f}');
                k.push_str(key);
                k.push('=');
                k.push_str(value);
            }
            k
        };
        for rl in &mesh.rate_limits {
            let Some(d) = &rl.envoy else { continue };
            if !d.matches(domain, entries.iter().copied()) {
                continue;
            }
            if rl.when.is_some() && !active.contains(&rl.id()) {
                continue;
            }
            let rate = rl.requests_per_second;
            let burst = f64::from(rl.burst);
            let now = Instant::now();
            let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            if buckets.len() >= MAX_COUNTERS {
                buckets.retain(|_, b| {
                    b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
                });
            }
            let b = buckets.entry(counter(&rl.id())).or_insert(Bucket {
                tokens: burst,
                last: now,
            });
            b.tokens =
                (b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate).min(burst);
            b.last = now;
            let over = b.tokens < hits as f64;
            if !over {
                b.tokens -= hits as f64;
            }
            let until_token = ((1.0 - b.tokens.fract()) / rate).ceil().max(1.0) as i64;
            let (per_unit, unit) = unit_of(rate);
            return DescriptorStatus {
                code: if over && !rl.dry_run {
                    Code::OverLimit
                } else {
                    Code::Ok
                } as i32,
                current_limit: Some(CurrentLimit {
                    name: rl.id(),
                    requests_per_unit: per_unit,
                    unit: unit as i32,
                }),
                limit_remaining: b.tokens.max(0.0) as u32,
                duration_until_reset: Some(PbDuration {
                    seconds: until_token,
                    nanos: 0,
                }),
                quota: None,
            };
        }
        for q in &mesh.quotas {
            let Some(d) = &q.envoy else { continue };
            if !d.matches(domain, entries.iter().copied()) {
                continue;
            }
            let window = q.window_start(now_unix);
            let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
            if windows.len() >= MAX_COUNTERS {
                windows.retain(|_, (w, _)| *w >= window - 86_400);
            }
            let count = windows.entry(counter(&q.id())).or_insert((window, 0));
            if count.0 != window {
                *count = (window, 0);
            }
            let over = count.1 + hits > q.limit;
            if !over {
                count.1 += hits;
            }
            let unit = match q.per {
                lumen_core::policy::QuotaPeriod::Minute => Unit::Minute,
                lumen_core::policy::QuotaPeriod::Hour => Unit::Hour,
                lumen_core::policy::QuotaPeriod::Day => Unit::Day,
            };
            return DescriptorStatus {
                code: if over { Code::OverLimit } else { Code::Ok } as i32,
                current_limit: Some(CurrentLimit {
                    name: q.id(),
                    requests_per_unit: u32::try_from(q.limit).unwrap_or(u32::MAX),
                    unit: unit as i32,
                }),
                limit_remaining: u32::try_from(q.limit.saturating_sub(count.1)).unwrap_or(u32::MAX),
                duration_until_reset: Some(PbDuration {
                    seconds: (window + q.per.secs() - now_unix).max(1),
                    nanos: 0,
                }),
                quota: None,
            };
        }
        // No policy: not limited (envoyproxy/ratelimit answers the same).
        DescriptorStatus {
            code: Code::Ok as i32,
            ..Default::default()
        }
    }
}

/// A rate as Envoy's limit units say it: per second when it is at least
/// one a second, else per minute, else per hour.
fn unit_of(rate: f64) -> (u32, Unit) {
    if rate >= 1.0 {
        (rate.round() as u32, Unit::Second)
    } else if rate * 60.0 >= 1.0 {
        ((rate * 60.0).round() as u32, Unit::Minute)
    } else {
        ((rate * 3600.0).round().max(1.0) as u32, Unit::Hour)
    }
}

#[tonic::async_trait]
impl RateLimitService for EnvoyServices {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let req = request.into_inner();
        if req.domain.is_empty() {
            return Err(Status::invalid_argument(
                "rate limit domain must not be empty",
            ));
        }
        if req.descriptors.is_empty() {
            return Err(Status::invalid_argument(
                "rate limit descriptor list must not be empty",
            ));
        }
        let (mesh, active) = (self.policies)();
        let hits = u64::from(req.hits_addend.max(1));
        let statuses: Vec<DescriptorStatus> = req
            .descriptors
            .iter()
            .map(|d| {
                let entries: Vec<(&str, &str)> = d
                    .entries
                    .iter()
                    .map(|e| (e.key.as_str(), e.value.as_str()))
                    .collect();
                let hits = d.hits_addend.map_or(hits, |h| h.value);
                self.status(&mesh, &active, &req.domain, &entries, hits)
            })
            .collect();
        let over = statuses.iter().any(|s| s.code() == Code::OverLimit);
        if over {
            tracing::debug!(domain = %req.domain, "envoy rate limit: over limit");
        }
        Ok(Response::new(RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            ..Default::default()
        }))
    }
}

/// `(namespace, workload)` of the caller: its SPIFFE id
/// (`spiffe://<trust domain>/ns/<namespace>/sa/<account>`, the account
/// standing for the workload), or a Lumen sidecar's `x-lumen-source`
/// (`namespace/service/workload/version`).
fn source_of(principal: &str, headers: &HashMap<String, String>) -> Option<(String, String)> {
    if let Some(path) = principal.strip_prefix("spiffe://") {
        let mut parts = path.split('/').skip(1);
        if let (Some("ns"), Some(ns), Some("sa"), Some(sa)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        {
            return Some((ns.to_string(), sa.to_string()));
        }
    }
    let header = headers.get("x-lumen-source")?;
    let mut parts = header.split('/');
    let (ns, _service, workload) = (parts.next()?, parts.next()?, parts.next()?);
    Some((ns.to_string(), workload.to_string()))
}

fn allow() -> CheckResponse {
    CheckResponse {
        status: Some(RpcStatus {
            code: tonic::Code::Ok as i32,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
        dynamic_metadata: None,
    }
}

#[tonic::async_trait]
impl Authorization for EnvoyServices {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let attributes = request.into_inner().attributes.unwrap_or_default();
        let http = attributes.request.and_then(|r| r.http).unwrap_or_default();
        let host = if http.host.is_empty() {
            http.headers.get(":authority").cloned().unwrap_or_default()
        } else {
            http.host.clone()
        };
        // `ratings`, `ratings:9080`, `ratings.default.svc.cluster.local`.
        let host = host.split(':').next().unwrap_or("");
        let mut labels = host.split('.');
        let service = labels.next().unwrap_or("");
        let namespace = labels.next();
        let principal = attributes
            .source
            .as_ref()
            .map_or("", |s| s.principal.as_str());
        let (mesh, active) = (self.policies)();
        let (src_ns, src_wl) = source_of(principal, &http.headers).unwrap_or_default();
        for ap in &mesh.access_policies {
            if ap.service != service || namespace.is_some_and(|n| n != ap.namespace) {
                continue;
            }
            let Some(rule) = AccessRule::compile(ap, &active, false) else {
                continue;
            };
            if rule.denies(&src_ns, &src_wl) {
                let id = rule.id.to_string();
                tracing::debug!(policy = %id, source = %format!("{src_ns}/{src_wl}"), "ext_authz: denied");
                return Ok(Response::new(CheckResponse {
                    status: Some(RpcStatus {
                        code: tonic::Code::PermissionDenied as i32,
                        message: format!("denied by {id}"),
                        details: Vec::new(),
                    }),
                    http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                        status: Some(HttpStatus {
                            code: StatusCode::Forbidden as i32,
                        }),
                        headers: vec![HeaderValueOption {
                            header: Some(HeaderValue {
                                key: "x-lumen-policy".into(),
                                value: id.clone(),
                                raw_value: Vec::new(),
                            }),
                            ..Default::default()
                        }],
                        body: format!("lumen: denied by {id}\n"),
                    })),
                    dynamic_metadata: None,
                }));
            }
        }
        Ok(Response::new(allow()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_come_from_spiffe_ids_or_the_lumen_header() {
        let none = HashMap::new();
        assert_eq!(
            source_of("spiffe://cluster.local/ns/default/sa/reviews-v2", &none),
            Some(("default".into(), "reviews-v2".into()))
        );
        let header = HashMap::from([(
            "x-lumen-source".to_string(),
            "shop/reviews/reviews-v1/v1".to_string(),
        )]);
        assert_eq!(
            source_of("", &header),
            Some(("shop".into(), "reviews-v1".into()))
        );
        assert_eq!(source_of("", &none), None);
        assert_eq!(unit_of(0.1), (6, Unit::Minute));
        assert_eq!(unit_of(5.0), (5, Unit::Second));
    }
}
