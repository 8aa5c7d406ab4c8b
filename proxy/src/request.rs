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
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use lumen_core::{Protocol, Reporter, RequestRecord, ResponseFlags, Workload};

use crate::attempt::{App, Destination, Forward, upstream_version};
use crate::body::{BodyFailure, PendingRecord, RequestBodyState, ResponseBody, grpc_status};
use crate::forward::{Upstreams, strip_hop_by_hop};
use crate::limits::Refused;
use crate::route::{NoRoute, RoutingTable};
use crate::telemetry::Telemetry;
use crate::trace::{TRACEPARENT, TraceContext};
use crate::tunnel;

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
    pub upstreams: Upstreams,
    pub telemetry: Arc<Telemetry>,
    pub app: Option<App>,
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
    pub tunnels: Arc<tunnel::Open>,
    pub limits: crate::limits::Limits,
}

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
    for decision in [
        admit(&shared, &req),
        authorize(&conn, &req),
        rate_limit(&conn, &req),
    ] {
        if let Decision::Deny {
            status,
            flags,
            message,
        } = decision
        {
            return Ok(local_reply(status, flags, message, pending));
        }
    }

    let authority = pending.record().map_or("", |r| r.authority.as_str());
    let destination = match route(&shared, &conn, authority) {
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
    if let (Some(r), Destination::Service(routed)) = (pending.record_mut(), &destination) {
        let s = routed.service();
        r.destination.service = s.name.clone();
        r.destination.namespace = s.namespace.clone();
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
    let forward = Forward {
        upstreams: &shared.upstreams,
        destination: &destination,
        version,
        timeout: shared.timeout,
        replay_limit: shared.replay_limit,
        replay_budget: &shared.replay_budget,
        limits: &shared.limits,
        metrics: shared.telemetry.metrics(),
        deadline,
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
        (Ok(resp), _, _) => respond(resp, pending, shared.limits.stream_idle_timeout),
        (Err(e), _, _) => local_reply(e.status, e.flags, e.message, pending),
    })
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
        conn.side,
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

/// A record from the first moment of a request or connection, with what
/// every kind of traffic knows then. From here on it is written exactly
/// once, even if the client goes away before a response exists (the
/// guard's drop writes it).
pub(crate) fn begin_record(
    shared: &Shared,
    side: Side,
    protocol: Protocol,
    source: Workload,
    destination: Workload,
    trace: &TraceContext,
    body_state: Arc<RequestBodyState>,
) -> PendingRecord {
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
        mtls: false,
        trace_id: trace.trace_id,
        span_id: trace.span_id,
        parent_span_id: trace.parent_span_id,
    };
    PendingRecord::new(record, Instant::now(), body_state, shared.telemetry.clone())
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

/// Authorize: who may call what. The policy engine decides here once it
/// exists; until then every request is allowed.
fn authorize<B>(_conn: &Connection, _req: &Request<B>) -> Decision {
    Decision::Allow
}

/// Rate-limit: the policy engine's limits apply here once it exists;
/// until then no request is limited.
fn rate_limit<B>(_conn: &Connection, _req: &Request<B>) -> Decision {
    Decision::Allow
}

/// Route: the service the authority names (outbound), or the local app.
fn route<'a>(
    shared: &'a Shared,
    conn: &Connection,
    authority: &str,
) -> Result<Destination<'a>, Refusal> {
    match conn.side {
        Side::Outbound => {
            route_outbound(shared, authority, conn.original_dst).map(Destination::Service)
        }
        Side::Inbound => match &shared.app {
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
        Destination::Service(r) => r.service().protocol,
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

fn route_outbound(
    shared: &Shared,
    authority: &str,
    original_dst: Option<SocketAddr>,
) -> Result<crate::route::Routed, Refusal> {
    let table = shared.routes.load_full();
    let mut routed = table.route(authority, &shared.identity.namespace);
    // Captured traffic often names an address, not a service
    // (`Host: 10.96.0.12`): the address it dialled says which service.
    if let (Err(NoRoute::UnknownService), Some(dst)) = (&routed, original_dst) {
        routed = table.route_address(dst);
    }
    match routed {
        Ok(routed) => Ok(routed),
        Err(NoRoute::UnknownService) => {
            let host = authority.split(':').next().unwrap_or(authority);
            let mut destination = Workload::unknown();
            if !host.is_empty() {
                destination.service = host.into();
            }
            let message = if authority.is_empty() {
                "no route: the request has no authority (Host header)".to_string()
            } else {
                format!("no route to `{authority}`: no such service in the mesh")
            };
            Err(Refusal {
                status: StatusCode::NOT_FOUND,
                flags: ResponseFlags::NO_ROUTE,
                message,
                destination: Some(destination),
            })
        }
        Err(NoRoute::NoEndpoints) => {
            let found = table
                .mesh()
                .resolve(authority, &shared.identity.namespace)
                .or_else(|| original_dst.and_then(|d| table.mesh().by_address(d)));
            let (service, namespace) = match found {
                Some(s) => (s.name.clone(), s.namespace.clone()),
                None => (authority.into(), shared.identity.namespace.clone()),
            };
            let message = format!("no healthy upstream: service `{service}` has no endpoints");
            let mut destination = Workload::unknown();
            destination.service = service;
            destination.namespace = namespace;
            Err(Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                flags: ResponseFlags::NO_HEALTHY_UPSTREAM,
                message,
                destination: Some(destination),
            })
        }
    }
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

/// A reply the proxy makes itself. A gRPC caller gets it the gRPC way —
/// HTTP 200, trailers-only, the status as `grpc-status` — as Envoy does, so
/// its client library reports a status rather than a protocol error.
pub(crate) fn local_reply(
    status: StatusCode,
    flags: ResponseFlags,
    message: String,
    mut pending: PendingRecord,
) -> Response<ResponseBody> {
    let grpc = pending
        .record()
        .is_some_and(|r| r.protocol == Protocol::Grpc)
        .then(|| grpc_code(status, flags));
    if let Some(record) = pending.record_mut() {
        record.status = status.as_u16();
        record.response_flags.insert(flags);
        if grpc.is_some() {
            record.status = StatusCode::OK.as_u16();
            record.grpc_status = grpc;
        }
    }
    let flags_value =
        HeaderValue::from_str(&flags.to_string()).unwrap_or_else(|_| HeaderValue::from_static("-"));
    let text = format!("lumen: {message}");
    let body = if grpc.is_some() {
        String::new()
    } else {
        format!("{text}\n")
    };
    let mut resp = Response::new(ResponseBody::local(body, pending));
    let h = resp.headers_mut();
    h.insert(FLAGS_HEADER, flags_value);
    match grpc {
        Some(code) => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(code));
            // grpc-message is percent-encoded (gRPC over HTTP/2, "Responses").
            let encoded: String = text
                .bytes()
                .map(|b| match b {
                    b' '..=b'~' if b != b'%' => (b as char).to_string(),
                    _ => format!("%{b:02X}"),
                })
                .collect();
            if let Ok(v) = HeaderValue::from_str(&encoded) {
                h.insert("grpc-message", v);
            }
        }
        None => {
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
        }
    }
    resp
}

/// The gRPC status for a reply the proxy makes (Envoy's mapping, with a
/// timeout as DEADLINE_EXCEEDED).
fn grpc_code(status: StatusCode, flags: ResponseFlags) -> i32 {
    if flags.contains(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT) {
        return 4;
    }
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        408 => 4,
        413 | 429 => 8,
        502..=504 => 14,
        _ => 2,
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
