//! Forwarding: one try over an endpoint's pooled keep-alive connections
//! (connections and pools live in [`crate::endpoint`]), and the header
//! hygiene a proxy owes both sides.
//!
//! Each endpoint has its own pools (HTTP/1.1 and HTTP/2) whose connector
//! always dials that endpoint. Requests keep the authority the caller used
//! (`Host` for HTTP/1.1, `:authority` for HTTP/2), so the upstream sidecar
//! and the app see `reviews:9080`, not an IP address, while balancing still
//! picks the connection by endpoint.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use lumen_core::ResponseFlags;

use crate::body::{BodyFailure, RequestBodyState};
use crate::endpoint::{EndpointState, UpstreamBody};
use crate::retry::Outcome;

/// Why a try failed: the flag and status the client will see, and what
/// the retry policy makes of it.
#[derive(Debug)]
pub struct ForwardError {
    pub flags: ResponseFlags,
    pub status: http::StatusCode,
    pub message: String,
    pub outcome: Outcome,
}

/// One try: sends the request to `endpoint` as `version` (HTTP/1.1 or
/// HTTP/2; `fresh`: on a connection of its own, never reused), keeping its
/// authority, path and query, and waits for response headers up to
/// `per_try`.
pub async fn send(
    endpoint: &EndpointState,
    version: Version,
    fresh: bool,
    authority: &str,
    body_state: &RequestBodyState,
    mut req: Request<UpstreamBody>,
    per_try: Option<Duration>,
) -> Result<Response<Incoming>, ForwardError> {
    let address = endpoint.address;
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    // Without an authority (HTTP/1.0, no Host) name the endpoint itself.
    let named;
    let authority = if authority.is_empty() {
        named = address.to_string();
        &named
    } else {
        authority
    };
    let uri = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| ForwardError {
            flags: ResponseFlags::empty(),
            status: http::StatusCode::BAD_REQUEST,
            message: format!("invalid request target: {e}"),
            outcome: Outcome::Final,
        })?;
    *req.uri_mut() = uri;
    let pools = endpoint.pools();
    let pool = if version == Version::HTTP_2 {
        // HTTP/2 carries the authority as `:authority`.
        req.headers_mut().remove(header::HOST);
        &pools.http2
    } else if fresh {
        &pools.http1_once
    } else {
        &pools.http1
    };
    *req.version_mut() = version;
    let sent = pool.request(req);
    let result = match per_try {
        None => sent.await,
        // As Envoy's: the try's clock starts once the body is sent, so a
        // slow upload is not blamed on the upstream.
        Some(limit) => match tokio::select! {
            r = sent => Ok(r),
            () = async {
                body_state.wait_ended().await;
                tokio::time::sleep(limit).await;
            } => Err(()),
        } {
            Ok(r) => r,
            Err(()) => {
                return Err(ForwardError {
                    flags: ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
                    status: http::StatusCode::GATEWAY_TIMEOUT,
                    message: format!(
                        "upstream {address} sent no response headers within the per-try timeout of {limit:?}"
                    ),
                    outcome: Outcome::TimedOut,
                });
            }
        },
    };
    result.map_err(|e| {
        if let Some(why) = body_state.failure() {
            let (flags, status, message) = match why {
                BodyFailure::Aborted => (
                    ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION,
                    http::StatusCode::BAD_REQUEST,
                    "the client broke off while sending the request body",
                ),
                BodyFailure::TooLarge => (
                    ResponseFlags::empty(),
                    http::StatusCode::PAYLOAD_TOO_LARGE,
                    "the request body is larger than this proxy accepts",
                ),
                BodyFailure::Idle => (
                    ResponseFlags::STREAM_IDLE_TIMEOUT,
                    http::StatusCode::REQUEST_TIMEOUT,
                    "the request body stalled: nothing arrived for the stream idle timeout",
                ),
            };
            ForwardError {
                flags,
                status,
                message: message.into(),
                outcome: Outcome::Final,
            }
        } else if e.is_connect() {
            ForwardError {
                flags: ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                message: format!("upstream connect error to {address}: {}", source_chain(&e)),
                outcome: Outcome::ConnectFailed,
            }
        } else {
            ForwardError {
                flags: ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                message: format!(
                    "upstream {address} reset or closed before response headers: {}",
                    source_chain(&e)
                ),
                outcome: if refused_stream(&e) {
                    Outcome::Refused
                } else {
                    Outcome::Reset
                },
            }
        }
    })
}

/// Whether an HTTP/2 upstream refused the stream (REFUSED_STREAM): it
/// promises the request was not processed, so any request may be retried.
fn refused_stream(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those the
/// `Connection` header names. `TE: trailers` survives: gRPC needs it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if let Some(te) = headers.remove(header::TE) {
        let wants_trailers = te.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
        if wants_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_headers_and_those_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-private").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get("x-kept").unwrap(), "yes");
        // `Trailer` is end-to-end: HTTP/1.1 sends only the trailers it declares.
        assert_eq!(h.get(header::TRAILER).unwrap(), "x-checksum");
    }

    #[test]
    fn te_without_trailers_is_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.get(header::TE).is_none());
    }
}
