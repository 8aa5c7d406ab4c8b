//! Forwarding: pooled keep-alive connections to upstreams, one pool per
//! protocol, and the header hygiene a proxy owes both sides.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use lumen_core::ResponseFlags;

use crate::body::RequestBody;

/// Why forwarding failed, with the flag and status the client will see.
#[derive(Debug)]
pub struct ForwardError {
    pub flags: ResponseFlags,
    pub status: http::StatusCode,
    pub message: String,
}

/// Upstream connection pools. HTTP/2 downstream requests (gRPC among them)
/// go upstream as HTTP/2 with prior knowledge (h2c), HTTP/1.x as HTTP/1.1,
/// so the application sees the protocol its client chose.
#[derive(Clone, Debug)]
pub struct Upstreams {
    http1: Client<HttpConnector, RequestBody>,
    http2: Client<HttpConnector, RequestBody>,
    timeout: Duration,
}

impl Upstreams {
    pub fn new(connect_timeout: Duration, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256);
        let http1 = builder.build(connector.clone());
        builder.http2_only(true);
        let http2 = builder.build(connector);
        Upstreams {
            http1,
            http2,
            timeout,
        }
    }

    /// Sends the request to `address` (`ip:port`), keeping its path and query.
    pub async fn send(
        &self,
        address: &str,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let h2 = req.version() == Version::HTTP_2;
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri = Uri::builder()
            .scheme("http")
            .authority(address)
            .path_and_query(path)
            .build()
            .map_err(|e| ForwardError {
                flags: ResponseFlags::empty(),
                status: http::StatusCode::BAD_REQUEST,
                message: format!("invalid request target: {e}"),
            })?;
        *req.uri_mut() = uri;
        let client = if h2 {
            &self.http2
        } else {
            *req.version_mut() = Version::HTTP_11;
            &self.http1
        };
        match tokio::time::timeout(self.timeout, client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if e.is_connect() => Err(ForwardError {
                flags: ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                message: format!("upstream connect error to {address}: {}", source_chain(&e)),
            }),
            Ok(Err(e)) => Err(ForwardError {
                flags: ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                message: format!(
                    "upstream {address} reset or closed before response headers: {}",
                    source_chain(&e)
                ),
            }),
            Err(_) => Err(ForwardError {
                flags: ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
                status: http::StatusCode::GATEWAY_TIMEOUT,
                message: format!(
                    "upstream {address} sent no response headers within {:?}",
                    self.timeout
                ),
            }),
        }
    }
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
        header::TRAILER,
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
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-private").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get("x-kept").unwrap(), "yes");
    }
}
