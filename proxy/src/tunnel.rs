//! Tunnels opened by HTTP: `CONNECT host:port`, answered `200` and then
//! bytes both ways to an endpoint of that service; and HTTP/1.1 upgrades
//! (WebSocket and others), forwarded as a request whose `101` turns both
//! connections into one tunnel. Either way the request's row is written
//! when the tunnel closes, with the bytes it carried.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use lumen_core::{Protocol, ResponseFlags};

use crate::attempt::Destination;
use crate::body::{PendingRecord, ResponseBody};
use crate::context::{Connection, Shared};
use crate::forward::strip_hop_by_hop;
use crate::reply::local_reply;
use crate::tcp::splice;

/// The protocol an HTTP/1.1 request asks to upgrade to, if it does.
pub fn upgrade_of<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != http::Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten()
}

/// Puts back the two hop-by-hop headers an upgrade needs on the next hop.
pub fn keep_upgrade_headers(headers: &mut HeaderMap, upgrade: &HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade.clone());
}

/// The upstream agreed to upgrade: answer `101` downstream and splice the
/// two upgraded connections once both are handed over.
pub fn upgraded(
    shared: &Shared,
    conn: &Connection,
    mut resp: Response<Incoming>,
    upgrade: HeaderValue,
    downstream: OnUpgrade,
    mut pending: PendingRecord,
) -> Response<ResponseBody> {
    let upstream = hyper::upgrade::on(&mut resp);
    if let Some(r) = pending.record_mut() {
        r.status = StatusCode::SWITCHING_PROTOCOLS.as_u16();
        if upgrade.as_bytes().eq_ignore_ascii_case(b"websocket") {
            r.protocol = Protocol::WebSocket;
        }
    }
    let (stop, drain) = (shared.stop.clone(), shared.drain);
    let held = (shared.tunnels.hold(), conn.take_permit());
    tokio::spawn(async move {
        let _held = held;
        match tokio::try_join!(downstream, upstream) {
            Ok((down, up)) => {
                let spliced = splice(TokioIo::new(down), TokioIo::new(up), stop, drain).await;
                pending.finish_tunnel(spliced);
            }
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed after 101");
                pending.finish(0, ResponseFlags::UPSTREAM_CONNECTION_TERMINATION);
            }
        }
    });
    let (mut parts, _) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    keep_upgrade_headers(&mut parts.headers, &upgrade);
    Response::from_parts(parts, ResponseBody::tunnel())
}

/// `CONNECT host:port`: connects to an endpoint of the service (or the
/// local app, inbound), answers `200`, then splices.
pub async fn connect(
    shared: &Shared,
    conn: &Connection,
    destination: &Destination<'_>,
    req: Request<Incoming>,
    mut pending: PendingRecord,
) -> Response<ResponseBody> {
    if let Some(r) = pending.record_mut() {
        r.protocol = Protocol::Tcp;
    }
    let mut tried = Vec::new();
    let mut upstream = None;
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // A connect failure tries the service's other endpoints, each once.
    while let Some(endpoint) = destination.pick(&tried, None) {
        if tried.contains(&endpoint.address()) {
            break;
        }
        tried.push(endpoint.address());
        if let Some(r) = pending.record_mut() {
            r.destination.workload = endpoint.workload.clone();
            r.destination.version = endpoint.version.clone();
            r.upstream_address = Some(endpoint.state.address_str.clone());
            r.retries = tried.len() as u32 - 1;
        }
        match endpoint.state.connect(&authority).await {
            Ok(s) => {
                if let (Some(peer), Some(r)) = (s.peer(), pending.record_mut()) {
                    r.mtls = true;
                    r.destination_principal = Some(peer.0);
                    r.source_principal = shared.registry.tls().principal();
                }
                upstream = Some(s);
                break;
            }
            Err(e) => {
                tracing::debug!(address = %endpoint.address(), error = %e, "CONNECT: connect failed")
            }
        }
    }
    let Some(upstream) = upstream else {
        return local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
            "upstream connect error: no endpoint accepted the connection".into(),
            pending,
        );
    };
    if let Some(r) = pending.record_mut() {
        r.status = StatusCode::OK.as_u16();
    }
    let (stop, drain) = (shared.stop.clone(), shared.drain);
    let held = (shared.tunnels.hold(), conn.take_permit());
    tokio::spawn(async move {
        let _held = held;
        match hyper::upgrade::on(req).await {
            Ok(down) => {
                let spliced = splice(TokioIo::new(down), upstream, stop, drain).await;
                pending.finish_tunnel(spliced);
            }
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT: the client left before the tunnel opened");
                pending.finish(0, ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION);
            }
        }
    });
    Response::new(ResponseBody::tunnel())
}
