//! The request path, one named phase at a time, in the order [`handle`]
//! runs them:
//!
//! 1. **accept** — the record starts; from here it is written exactly once;
//! 2. **identify peer** — who is calling;
//! 3. **authorize** and 4. **rate-limit** — the policy engine's places;
//!    until it lands they allow everything and say so;
//! 5. **route** — which service (outbound) or the local app (inbound);
//! 6. **forward** — the tries, each picking an endpoint ([`crate::attempt`]);
//! 7. **respond** — the upstream's answer, or one of our own;
//! 8. **record** — when the response body ends ([`crate::body`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use lumen_core::config::split_authority;
use lumen_core::{Protocol, ResponseFlags, Workload};

use crate::attempt::{Destination, Forward, upstream_version};
use crate::body::{BodyFailure, PendingRecord, RequestBodyState, ResponseBody, grpc_status};
use crate::context::{Connection, SOURCE_HEADER, Shared, Side, begin_record};
use crate::forward::strip_hop_by_hop;
use crate::limits::Refused;
use crate::ratelimit::Verdict;
use crate::reply::{self, local_reply};
use crate::route::{Action, NoRoute, RequestView, Routed};
use crate::trace::{TRACEPARENT, TraceContext};
use crate::{edit, fault, tunnel};

/// A phase's verdict on whether the request goes on.
#[derive(Debug)]
pub enum Decision {
    Allow,
    Deny {
        status: StatusCode,
        flags: ResponseFlags,
        message: String,
    },
}

/// A reply the proxy makes itself instead of forwarding.
struct Refusal {
    status: StatusCode,
    flags: ResponseFlags,
    message: String,
    /// Whom the record names as destination, when routing got that far.
    destination: Option<Workload>,
}

pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<Connection>,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let trace = TraceContext::continue_from(req.headers().get(TRACEPARENT));
    let body_state = Arc::new(RequestBodyState::default());
    let mut pending = accept(&shared, &conn, &req, &trace, &body_state);

    let source = identify_peer(&shared, conn.side, &req);
    if let Some(r) = pending.record_mut() {
        r.source = source;
    }
    if let Decision::Deny {
        status,
        flags,
        message,
    } = admit(&shared, &req)
    {
        return Ok(local_reply(status, flags, message, pending));
    }
    if conn.side == Side::Inbound {
        // Istio's order at a workload: JWT authentication, then
        // authorization.
        let jwt = {
            let table = shared.routes.load();
            let rules = table.inbound_jwt();
            if rules.is_empty() {
                None
            } else {
                let uri = req.uri().clone();
                match crate::jwt::authenticate(&shared.jwks, rules, req.headers_mut(), &uri).await {
                    Ok(a) => a,
                    Err(rejected) => {
                        let realm = format!("http://{}{}", authority_of(&req), uri.path());
                        return Ok(reply::unauthenticated(rejected, &realm, pending));
                    }
                }
            }
        };
        let attributes = crate::authz::RequestAttributes {
            conn: &conn,
            app_port: shared.inbound_app(&conn).map(|a| a.address.port()),
            method: req.method().as_str(),
            path: req.uri().path(),
            host: Some(authority_of(&req)).filter(|h| !h.is_empty()),
            headers: Some(req.headers()),
            jwt: jwt.as_ref(),
        };
        let source = pending
            .record()
            .map(|r| r.source.clone())
            .unwrap_or_else(Workload::unknown);
        if let Some(refusal) = crate::authz::check(&shared, &attributes, &source) {
            return Ok(reply::rbac_denied(refusal, pending));
        }
    }

    let destination = match route(&shared, &conn, &req) {
        Ok(d) => d,
        Err(refusal) => {
            if let (Some(r), Some(d)) = (pending.record_mut(), refusal.destination) {
                r.destination = d;
            }
            return Ok(local_reply(
                refusal.status,
                refusal.flags,
                refusal.message,
                pending,
            ));
        }
    };
    let routed = match &destination {
        Destination::Service(routed) => Some(routed.clone()),
        Destination::App(_) => None,
    };
    if let (Some(r), Some(routed)) = (pending.record_mut(), &routed) {
        // Workload and version are known once an endpoint is picked.
        r.destination = Workload::unknown();
        if let Some(s) = routed.service() {
            r.destination.service = s.name.clone();
            r.destination.namespace = s.namespace.clone();
        }
        r.route = routed.route.name.clone();
    }
    if let Some(routed) = &routed {
        let source = pending.record().map(|r| &r.source);
        if let Some(policy) = access_denied(routed, source) {
            return Ok(reply::denied(policy, pending));
        }
        let tls = shared.registry.tls();
        let verdict = rate_limit(routed, source, tls, &req);
        // A request a limit refuses takes nothing from a quota.
        let exhausted = match verdict {
            RateVerdict::Limited { .. } => None,
            _ => quota_exhausted(routed, &shared.quotas, source, tls, &req),
        };
        match verdict {
            RateVerdict::Pass => {}
            RateVerdict::WouldLimit(policy) => {
                if let Some(r) = pending.record_mut() {
                    r.policy = Some(policy);
                }
            }
            RateVerdict::Limited {
                policy,
                per_second,
                retry_after,
            } => {
                return Ok(reply::rate_limited(
                    policy,
                    per_second.ceil() as u64,
                    retry_after,
                    pending,
                ));
            }
        }
        if let Some((policy, limit, reset)) = exhausted {
            return Ok(reply::rate_limited(policy, limit, reset, pending));
        }
        match &routed.route.action {
            Action::Forward(_) => {}
            Action::Redirect(r) => {
                let authority = pending.record().map_or("", |r| r.authority.as_str());
                let location = edit::redirect_location(r, authority, req.uri().path_and_query());
                return Ok(reply::redirect(r.code, &location, pending));
            }
            Action::Direct { status, body } => {
                return Ok(reply::direct(*status, body.clone(), pending));
            }
        }
        if let Some(fault) = &routed.route.fault {
            let injected = fault::inject(fault).await;
            if injected.delayed
                && let Some(r) = pending.record_mut()
            {
                r.response_flags.insert(ResponseFlags::DELAY_INJECTED);
            }
            if let Some((status, grpc)) = injected.abort {
                return Ok(reply::fault_abort(status, grpc, pending));
            }
        }
    }

    if req.method() == Method::CONNECT {
        return Ok(tunnel::connect(&shared, &conn, &destination, req, pending).await);
    }
    // An HTTP/1.1 upgrade (WebSocket…): forwarded as HTTP/1.1, then both
    // connections become one tunnel.
    let upgrade = tunnel::upgrade_of(&req);
    let downstream_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));

    let deadline = pending
        .record()
        .is_some_and(|r| r.protocol == Protocol::Grpc)
        .then(|| grpc_timeout(&req))
        .flatten();
    let (mut parts, body) = req.into_parts();
    prepare_upstream_headers(&shared, conn.side, &trace, &mut parts.headers);
    let mut version = upstream_version(protocol_of(&shared, &destination), parts.version);
    if let Some(u) = &upgrade {
        tunnel::keep_upgrade_headers(&mut parts.headers, u);
        version = Version::HTTP_11;
    }
    let mut authority = pending
        .record()
        .map(|r| r.authority.clone())
        .unwrap_or_default();
    let mut hash = None;
    let mut set_cookie = None;
    let mut mirrors = Vec::new();
    if let Some(routed) = &routed {
        edit_request(routed, &mut parts, &mut authority);
        if let Some(key) = routed.cluster.as_ref().and_then(|c| c.hash_key.as_ref()) {
            (hash, set_cookie) =
                edit::request_hash(key, &parts.headers, parts.uri.path_and_query(), conn.peer);
        }
        mirrors = routed
            .route
            .mirrors
            .iter()
            .filter(|(_, fraction)| *fraction >= 1.0 || rand::random::<f64>() < *fraction)
            .map(|(c, _)| c.clone())
            .collect();
    }
    let timeout = routed
        .as_ref()
        .and_then(|r| r.route.timeout)
        .unwrap_or(shared.timeout);
    let forward = Forward {
        destination: &destination,
        authority: &authority,
        hash,
        version,
        // Istio's `timeout: 0s` turns the route's timeout off.
        timeout: if timeout.is_zero() {
            Duration::from_secs(365 * 24 * 3600)
        } else {
            timeout
        },
        replay_limit: shared.replay_limit,
        replay_budget: &shared.replay_budget,
        limits: &shared.limits,
        metrics: shared.telemetry.metrics(),
        deadline,
        mirrors,
        tls: (conn.side == Side::Outbound).then(|| &**shared.registry.tls()),
    };
    let sent = forward
        .run(parts, body, body_state.clone(), &mut pending)
        .await;
    match body_state.failure() {
        Some(BodyFailure::TooLarge) => shared.telemetry.metrics().refused(Refused::BodyTooLarge),
        Some(BodyFailure::Idle) => shared.telemetry.metrics().refused(Refused::RequestBodyIdle),
        _ => {}
    }

    Ok(match (sent, upgrade, downstream_upgrade) {
        (Ok(resp), Some(u), Some(down)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            tunnel::upgraded(&shared, &conn, resp, u, down, pending)
        }
        (Ok(mut resp), _, _) => {
            if let Some(routed) = &routed {
                edit_response(routed, resp.headers_mut(), set_cookie);
            }
            respond(resp, pending, shared.limits.stream_idle_timeout)
        }
        (Err(e), _, _) => local_reply(e.status, e.flags, e.message, pending),
    })
}

/// A route's edits to the request: header operations (the route's, then
/// the chosen destination's), then rewrites of the path and authority.
fn edit_request(routed: &Routed, parts: &mut http::request::Parts, authority: &mut String) {
    edit::apply(&mut parts.headers, &routed.route.headers.request);
    if let Some(h) = routed.destination_headers() {
        edit::apply(&mut parts.headers, &h.request);
    }
    let Some(rw) = &routed.route.rewrite else {
        return;
    };
    if let Some(a) = &rw.authority {
        a.clone_into(authority);
        if let Ok(v) = HeaderValue::from_str(a) {
            parts.headers.insert(header::HOST, v);
        }
    }
    if let Some(pq) = edit::rewrite_path(
        parts.uri.path_and_query(),
        rw,
        routed.matched_prefix,
        routed.matched_whole_uri,
    ) {
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.path_and_query = Some(pq);
        parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
    }
}

/// The route's edits to the response's headers, and a hash cookie made
/// for a client that had none.
fn edit_response(routed: &Routed, headers: &mut http::HeaderMap, set_cookie: Option<HeaderValue>) {
    edit::apply(headers, &routed.route.headers.response);
    if let Some(h) = routed.destination_headers() {
        edit::apply(headers, &h.response);
    }
    if let Some(c) = set_cookie {
        headers.append(header::SET_COOKIE, c);
    }
}

/// Accept: the request's record, with what is known before routing.
fn accept(
    shared: &Arc<Shared>,
    conn: &Connection,
    req: &Request<Incoming>,
    trace: &TraceContext,
    body_state: &Arc<RequestBodyState>,
) -> PendingRecord {
    let mut pending = begin_record(
        shared,
        conn,
        detect_protocol(req),
        Workload::unknown(),
        shared.identity.clone(),
        trace,
        body_state.clone(),
    );
    if let Some(r) = pending.record_mut() {
        r.method = req.method().as_str().to_owned();
        r.authority = recorded(authority_of(req));
        r.path = recorded(req.uri().path());
    }
    pending
}

/// Within the listener's limits: method, target and declared body size.
/// (Header count and size are enforced by the HTTP codec: `431`.)
fn admit<B>(shared: &Shared, req: &Request<B>) -> Decision {
    let limits = &shared.limits;
    let deny = |why: Refused, status: StatusCode, message: String| {
        shared.telemetry.metrics().refused(why);
        Decision::Deny {
            status,
            flags: ResponseFlags::empty(),
            message,
        }
    };
    let method = req.method().as_str().len();
    if method > limits.max_method_bytes {
        return deny(
            Refused::MethodTooLong,
            StatusCode::BAD_REQUEST,
            format!(
                "the method is {method} bytes, more than {}",
                limits.max_method_bytes
            ),
        );
    }
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > limits.max_uri_bytes {
        return deny(
            Refused::UriTooLong,
            StatusCode::URI_TOO_LONG,
            format!(
                "the request target is {target} bytes, more than {}",
                limits.max_uri_bytes
            ),
        );
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(max), Some(len)) = (limits.max_request_bytes, declared)
        && len > max
    {
        return deny(
            Refused::BodyTooLarge,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is {len} bytes, more than {max}"),
        );
    }
    Decision::Allow
}

/// Access: the first AccessPolicy on the routed service that refuses this
/// caller.
fn access_denied(routed: &Routed, source: Option<&Workload>) -> Option<Arc<str>> {
    let rules = routed.table.access(routed.service?);
    if rules.is_empty() {
        return None;
    }
    let (namespace, workload) = source.map_or(("", ""), |s| (&*s.namespace, &*s.workload));
    rules
        .iter()
        .find(|r| r.denies(namespace, workload))
        .map(|r| r.id.clone())
}

/// Quotas: the first Quota on the routed service whose allowance at this
/// proxy is used up for this request's key.
fn quota_exhausted<B>(
    routed: &Routed,
    ledger: &crate::quota::QuotaLedger,
    source: Option<&Workload>,
    tls: &crate::mtls::MeshTls,
    req: &Request<B>,
) -> Option<(Arc<str>, u64, Duration)> {
    let quotas = routed.table.quotas(routed.service?);
    if quotas.is_empty() {
        return None;
    }
    // Limits are kept by callers: the principal is this sidecar's own.
    let principal = tls.principal();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let path = req.uri().path();
    for q in quotas {
        if !q.applies(req.method().as_str(), path) {
            continue;
        }
        let key = crate::ratelimit::key_of(&q.spec.key, source, principal.as_deref(), |h| {
            req.headers().get(h).and_then(|v| v.to_str().ok())
        });
        if let crate::quota::Admit::Exhausted { reset_secs } =
            ledger.admit(&q.spec, &q.id, &key, now)
        {
            return Some((q.id.clone(), q.spec.limit, Duration::from_secs(reset_secs)));
        }
    }
    None
}

enum RateVerdict {
    Pass,
    /// A dry-run limit would have refused it: the row names the policy.
    WouldLimit(Arc<str>),
    Limited {
        policy: Arc<str>,
        per_second: f64,
        retry_after: Duration,
    },
}

/// Rate-limit: the RateLimits on the routed service, each taking a token
/// from the bucket of this request's key. The first that has none decides;
/// a dry run only records which policy would have.
fn rate_limit<B>(
    routed: &Routed,
    source: Option<&Workload>,
    tls: &crate::mtls::MeshTls,
    req: &Request<B>,
) -> RateVerdict {
    let Some(service) = routed.service else {
        return RateVerdict::Pass;
    };
    let limits = routed.table.limits(service);
    if limits.is_empty() {
        return RateVerdict::Pass;
    }
    let mut would = None;
    let now = std::time::Instant::now();
    let path = req.uri().path();
    let principal = tls.principal();
    let mut keys = crate::ratelimit::RequestKeys::new(source, principal.as_deref(), |h| {
        req.headers().get(h).and_then(|v| v.to_str().ok())
    });
    for l in limits {
        if !l.applies(req.method().as_str(), path) {
            continue;
        }
        let key = keys.of(&l.spec.key);
        match l.check(key, now) {
            Verdict::Allow { .. } => {}
            Verdict::WouldLimit => {
                tracing::debug!(policy = %l.name, key = %key, "would rate limit (dry run)");
                would.get_or_insert_with(|| l.name.clone());
            }
            Verdict::Limited { retry_after } => {
                return RateVerdict::Limited {
                    policy: l.name.clone(),
                    per_second: l.spec.requests_per_second,
                    retry_after,
                };
            }
        }
    }
    would.map_or(RateVerdict::Pass, RateVerdict::WouldLimit)
}

/// Route: the service the authority names and the route its
/// VirtualService gives the request (outbound), or the local app.
fn route<'a, B>(
    shared: &'a Shared,
    conn: &Connection,
    req: &Request<B>,
) -> Result<Destination<'a>, Refusal> {
    match conn.side {
        Side::Outbound => route_outbound(shared, conn, req).map(Destination::Service),
        Side::Inbound => match shared.inbound_app(conn) {
            Some(app) => Ok(Destination::App(app)),
            None => Err(Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                flags: ResponseFlags::NO_HEALTHY_UPSTREAM,
                message: "no local application configured for inbound traffic".to_string(),
                destination: None,
            }),
        },
    }
}

/// The protocol the destination declares: a service's own, or for the
/// local app, the one its service declares in the mesh.
fn protocol_of(shared: &Shared, destination: &Destination<'_>) -> lumen_core::UpstreamProtocol {
    match destination {
        Destination::Service(r) => match (&r.cluster, r.service()) {
            (Some(c), _) => c.protocol,
            (None, Some(s)) => s.protocol,
            (None, None) => Default::default(),
        },
        Destination::App(_) => shared
            .routes
            .load()
            .mesh()
            .find(&shared.identity.service, &shared.identity.namespace)
            .map(|s| s.protocol)
            .unwrap_or_default(),
    }
}

/// Respond: the upstream's answer, streamed; the record is written when
/// its body ends.
pub(crate) fn respond(
    resp: Response<Incoming>,
    mut pending: PendingRecord,
    idle: Duration,
) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(record) = pending.record_mut() {
        record.status = parts.status.as_u16();
        // A trailers-only gRPC response carries its status in the headers.
        record.grpc_status = grpc_status(&parts.headers);
    }
    Response::from_parts(parts, ResponseBody::upstream(body, pending, idle))
}

/// Longest path or authority a record keeps, in bytes. Beyond this a
/// value is cut (at a character boundary): the row keeps its place in the
/// table and the export batch keeps a bounded size.
pub const MAX_RECORDED_LEN: usize = 4096;

fn recorded(s: &str) -> String {
    s[..s.floor_char_boundary(MAX_RECORDED_LEN)].to_owned()
}

/// HTTP/1.x, HTTP/2, or gRPC (HTTP/2 with a gRPC content type).
fn detect_protocol<B>(req: &Request<B>) -> Protocol {
    if req.version() != Version::HTTP_2 {
        return Protocol::Http1;
    }
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        Protocol::Grpc
    } else {
        Protocol::Http2
    }
}

/// The request's authority: the URI's (HTTP/2, absolute-form HTTP/1.1) or `Host`.
fn authority_of<B>(req: &Request<B>) -> &str {
    if let Some(a) = req.uri().authority() {
        return a.as_str();
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
}

/// Who is calling: this workload on the outbound side; on the inbound side,
/// what the caller's sidecar declared, or `unknown`.
fn identify_peer<B>(shared: &Shared, side: Side, req: &Request<B>) -> Workload {
    match side {
        Side::Outbound => shared.identity.clone(),
        Side::Inbound => req
            .headers()
            .get(SOURCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_source_header)
            .unwrap_or_else(Workload::unknown),
    }
}

fn parse_source_header(v: &str) -> Option<Workload> {
    let mut parts = v.split('/');
    let namespace = parts.next()?;
    let service = parts.next()?;
    let workload = parts.next()?;
    let version = parts.next()?;
    if parts.next().is_some() || [namespace, service, workload, version].contains(&"") {
        return None;
    }
    Some(Workload {
        service: service.into(),
        workload: workload.into(),
        namespace: namespace.into(),
        version: version.into(),
    })
}

/// The value of [`SOURCE_HEADER`] for a workload.
pub fn source_header_value(w: &Workload) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "{}/{}/{}/{}",
        w.namespace, w.service, w.workload, w.version
    ))
    .ok()
}

fn route_outbound<B>(
    shared: &Shared,
    conn: &Connection,
    req: &Request<B>,
) -> Result<Routed, Refusal> {
    let table = shared.routes.load_full();
    let authority = authority_of(req);
    if table.is_gateway() {
        return route_at_gateway(&table, conn, req, authority);
    }
    let Some(service) =
        table.service_index(authority, &shared.identity.namespace, conn.original_dst)
    else {
        let host = authority.split(':').next().unwrap_or(authority);
        let mut destination = Workload::unknown();
        if !host.is_empty() {
            destination.service = host.into();
        }
        if table.outbound_mode() == lumen_core::networking::OutboundMode::RegistryOnly
            && !authority.is_empty()
        {
            // Istio answers 502 from its BlackHoleCluster.
            shared
                .telemetry
                .metrics()
                .refused(crate::limits::Refused::RegistryOnly);
            destination.service = crate::tcp::BLACK_HOLE.into();
            return Err(Refusal {
                status: StatusCode::BAD_GATEWAY,
                flags: ResponseFlags::NO_ROUTE,
                message: format!(
                    "`{authority}` is not in the service registry and outboundTrafficPolicy is REGISTRY_ONLY (add a ServiceEntry for it)"
                ),
                destination: Some(destination),
            });
        }
        let message = if authority.is_empty() {
            "no route: the request has no authority (Host header)".to_string()
        } else {
            format!("no route to `{authority}`: no such service in the mesh")
        };
        return Err(Refusal {
            status: StatusCode::NOT_FOUND,
            flags: ResponseFlags::NO_ROUTE,
            message,
            destination: Some(destination),
        });
    };
    let s = &table.mesh().services[service];
    let port = split_authority(authority)
        .and_then(|(_, p)| p)
        .or(s.port)
        .or(conn.original_dst.map(|d| d.port()));
    let view = RequestView {
        method: req.method().as_str(),
        path: req.uri().path(),
        query: req.uri().query(),
        authority,
        scheme: req.uri().scheme_str().unwrap_or("http"),
        headers: req.headers(),
        port,
    };
    let mut destination = Workload::unknown();
    destination.service = s.name.clone();
    destination.namespace = s.namespace.clone();
    match table.route(service, &view) {
        Ok(routed) => Ok(routed),
        Err(NoRoute::NoMatch | NoRoute::UnknownService) => Err(Refusal {
            status: StatusCode::NOT_FOUND,
            flags: ResponseFlags::NO_ROUTE,
            message: format!(
                "no route: no route of `{}`'s VirtualService matches the request",
                s.name
            ),
            destination: Some(destination),
        }),
        Err(NoRoute::NoEndpoints) => Err(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            flags: ResponseFlags::NO_HEALTHY_UPSTREAM,
            message: format!(
                "no healthy upstream: the destination of service `{}` has no endpoints",
                s.name
            ),
            destination: Some(destination),
        }),
    }
}

/// A gateway routes by the VirtualServices bound to it, whatever the host.
fn route_at_gateway<B>(
    table: &Arc<crate::route::RoutingTable>,
    conn: &Connection,
    req: &Request<B>,
    authority: &str,
) -> Result<Routed, Refusal> {
    let view = RequestView {
        method: req.method().as_str(),
        path: req.uri().path(),
        query: req.uri().query(),
        authority,
        scheme: req.uri().scheme_str().unwrap_or("http"),
        headers: req.headers(),
        port: Some(conn.local.port()),
    };
    let port = conn.local.port();
    table
        .route_gateway(port, conn.gateway_server.as_deref(), &view)
        .map_err(|why| {
            let (status, flags, message) = match why {
                NoRoute::NoEndpoints => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ResponseFlags::NO_HEALTHY_UPSTREAM,
                    "no healthy upstream".to_string(),
                ),
                _ => (
                    StatusCode::NOT_FOUND,
                    ResponseFlags::NO_ROUTE,
                    format!(
                        "no route: no VirtualService bound to this gateway matches `{authority}{}`",
                        req.uri().path()
                    ),
                ),
            };
            Refusal {
                status,
                flags,
                message,
                destination: None,
            }
        })
}

fn prepare_upstream_headers(
    shared: &Shared,
    side: Side,
    trace: &TraceContext,
    headers: &mut http::HeaderMap,
) {
    strip_hop_by_hop(headers);
    headers.insert(TRACEPARENT, trace.header_value());
    match side {
        Side::Outbound => {
            headers.insert(SOURCE_HEADER, shared.identity_header.clone());
        }
        Side::Inbound => {
            headers.remove(SOURCE_HEADER);
        }
    }
}

/// The deadline a gRPC caller set (`grpc-timeout`: up to 8 digits and a
/// unit, H M S m u n).
fn grpc_timeout<B>(req: &Request<B>) -> Option<Duration> {
    let v = req.headers().get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_header_round_trips_and_rejects_malformed_values() {
        let w = Workload {
            service: "productpage".into(),
            workload: "productpage-v1".into(),
            namespace: "default".into(),
            version: "v1".into(),
        };
        let v = source_header_value(&w).unwrap();
        assert_eq!(v, "default/productpage/productpage-v1/v1");
        assert_eq!(parse_source_header(v.to_str().unwrap()), Some(w));
        for bad in ["", "a/b/c", "a/b/c/d/e", "a//c/d"] {
            assert_eq!(parse_source_header(bad), None, "{bad}");
        }
    }

    #[test]
    fn detects_protocol_from_version_and_content_type() {
        let h1 = Request::builder().body(()).unwrap();
        assert_eq!(detect_protocol(&h1), Protocol::Http1);
        let h2 = Request::builder()
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        assert_eq!(detect_protocol(&h2), Protocol::Http2);
        let grpc = Request::builder()
            .version(Version::HTTP_2)
            .header("content-type", "application/grpc+proto")
            .body(())
            .unwrap();
        assert_eq!(detect_protocol(&grpc), Protocol::Grpc);
    }

    #[test]
    fn grpc_timeouts_parse_as_grpc_defines_them() {
        let req = |v: &str| {
            Request::builder()
                .header("grpc-timeout", v)
                .body(())
                .unwrap()
        };
        assert_eq!(grpc_timeout(&req("250m")), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout(&req("3S")), Some(Duration::from_secs(3)));
        assert_eq!(grpc_timeout(&req("1H")), Some(Duration::from_secs(3600)));
        assert_eq!(
            grpc_timeout(&req("99999999n")),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "10", "10x", "123456789S", "-1S"] {
            assert_eq!(grpc_timeout(&req(bad)), None, "{bad}");
        }
    }

    #[test]
    fn recorded_values_are_cut_at_a_character_boundary() {
        assert_eq!(recorded("/reviews/1"), "/reviews/1");
        let long = format!("/{}", "é".repeat(MAX_RECORDED_LEN));
        let kept = recorded(&long);
        assert!(kept.len() <= MAX_RECORDED_LEN && kept.len() > MAX_RECORDED_LEN - 2);
        assert!(long.starts_with(&kept));
    }

    #[test]
    fn authority_comes_from_the_uri_or_the_host_header() {
        let abs = Request::builder()
            .uri("http://reviews:9080/x")
            .header("host", "ignored")
            .body(())
            .unwrap();
        assert_eq!(authority_of(&abs), "reviews:9080");
        let origin = Request::builder()
            .uri("/x")
            .header("host", "details")
            .body(())
            .unwrap();
        assert_eq!(authority_of(&origin), "details");
    }
}
