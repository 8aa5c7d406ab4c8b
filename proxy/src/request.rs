//! The request path, one named phase at a time:
//!
//! accept → detect protocol → peer identity → (authorize, rate-limit: later)
//! → route → balance → forward → record.
//!
//! Each phase is a function below; [`handle`] reads as the list of them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use lumen_core::{Protocol, Reporter, RequestRecord, ResponseFlags, Workload};

use crate::body::{PendingRecord, RequestBody, RequestBodyState, ResponseBody, grpc_status};
use crate::forward::{Upstreams, strip_hop_by_hop};
use crate::route::{NoRoute, RoutingTable};
use crate::telemetry::Telemetry;
use crate::trace::{TRACEPARENT, TraceContext};

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

/// What every request handler shares: identity, routes, pools, telemetry.
pub struct Shared {
    pub identity: Workload,
    pub identity_header: HeaderValue,
    pub routes: ArcSwap<RoutingTable>,
    pub upstreams: Upstreams,
    pub telemetry: Arc<Telemetry>,
    pub app: Option<(SocketAddr, Arc<str>)>,
    pub default_route: Arc<str>,
}

/// Where forwarding goes, and whom the record names as destination.
struct Target {
    address: SocketAddr,
    address_str: Arc<str>,
    destination: Workload,
}

pub async fn handle(
    shared: Arc<Shared>,
    side: Side,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    // accept
    let start_time = SystemTime::now();
    let started = Instant::now();
    let protocol = detect_protocol(&req);
    let trace = TraceContext::continue_from(req.headers().get(TRACEPARENT));
    let authority = recorded(authority_of(&req));
    let source = peer_identity(&shared, side, &req);

    let record = RequestRecord {
        start_time,
        duration: Duration::ZERO,
        reporter: match side {
            Side::Outbound => Reporter::Source,
            Side::Inbound => Reporter::Destination,
        },
        source,
        destination: shared.identity.clone(),
        protocol,
        method: req.method().as_str().to_owned(),
        authority,
        path: recorded(req.uri().path()),
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
    let body_state = Arc::new(RequestBodyState::default());
    // From here on the record is written exactly once, even if the client
    // goes away before a response exists (the guard's drop writes it).
    let mut pending = PendingRecord::new(
        record,
        started,
        body_state.clone(),
        shared.telemetry.clone(),
    );
    let record = pending.record_mut().expect("a new record is unwritten");

    // route + balance
    let target = match side {
        Side::Outbound => route_outbound(&shared, &record.authority),
        Side::Inbound => route_inbound(&shared),
    };
    let target = match target {
        Ok(t) => t,
        Err((status, flags, message, destination)) => {
            if let Some(d) = destination {
                record.destination = d;
            }
            return Ok(local_reply(status, flags, message, pending));
        }
    };
    record.destination = target.destination;
    record.upstream_address = Some(target.address_str.clone());

    // forward
    let (mut parts, body) = req.into_parts();
    prepare_upstream_headers(&shared, side, &trace, &mut parts.headers);
    let upstream_req = Request::from_parts(parts, RequestBody::new(body, body_state.clone()));
    let authority = pending.record().map_or("", |r| r.authority.as_str());
    let sent = shared
        .upstreams
        .send(target.address, authority, &body_state, upstream_req)
        .await;
    match sent {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            if let Some(record) = pending.record_mut() {
                record.status = parts.status.as_u16();
                // A trailers-only gRPC response carries its status in the headers.
                record.grpc_status = grpc_status(&parts.headers);
            }
            // record (when the body ends)
            Ok(Response::from_parts(
                parts,
                ResponseBody::upstream(body, pending),
            ))
        }
        Err(e) => Ok(local_reply(e.status, e.flags, e.message, pending)),
    }
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
fn peer_identity<B>(shared: &Shared, side: Side, req: &Request<B>) -> Workload {
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

type RouteFailure = (StatusCode, ResponseFlags, String, Option<Workload>);

fn route_outbound(shared: &Shared, authority: &str) -> Result<Target, RouteFailure> {
    let table = shared.routes.load();
    match table.route(authority, &shared.identity.namespace) {
        Ok(routed) => Ok(Target {
            address: routed.endpoint.address,
            address_str: routed.endpoint.address_str.clone(),
            destination: Workload {
                service: routed.service.name.clone(),
                workload: routed.endpoint.workload.clone(),
                namespace: routed.service.namespace.clone(),
                version: routed.endpoint.version.clone(),
            },
        }),
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
            Err((
                StatusCode::NOT_FOUND,
                ResponseFlags::NO_ROUTE,
                message,
                Some(destination),
            ))
        }
        Err(NoRoute::NoEndpoints) => {
            let (service, namespace) =
                match table.mesh().resolve(authority, &shared.identity.namespace) {
                    Some(s) => (s.name.clone(), s.namespace.clone()),
                    None => (authority.into(), shared.identity.namespace.clone()),
                };
            let message = format!("no healthy upstream: service `{service}` has no endpoints");
            let mut destination = Workload::unknown();
            destination.service = service;
            destination.namespace = namespace;
            Err((
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlags::NO_HEALTHY_UPSTREAM,
                message,
                Some(destination),
            ))
        }
    }
}

fn route_inbound(shared: &Shared) -> Result<Target, RouteFailure> {
    match &shared.app {
        Some((address, address_str)) => Ok(Target {
            address: *address,
            address_str: address_str.clone(),
            destination: shared.identity.clone(),
        }),
        None => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlags::NO_HEALTHY_UPSTREAM,
            "no local application configured for inbound traffic".to_string(),
            None,
        )),
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

fn local_reply(
    status: StatusCode,
    flags: ResponseFlags,
    message: String,
    mut pending: PendingRecord,
) -> Response<ResponseBody> {
    if let Some(record) = pending.record_mut() {
        record.status = status.as_u16();
        record.response_flags.insert(flags);
    }
    let flags_value =
        HeaderValue::from_str(&flags.to_string()).unwrap_or_else(|_| HeaderValue::from_static("-"));
    let mut resp = Response::new(ResponseBody::local(format!("lumen: {message}\n"), pending));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(FLAGS_HEADER, flags_value);
    resp
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
