//! What a downstream client may ask of the proxy, and for how long it may
//! take: each limit answered with its status, counted by reason on
//! `/stats/prometheus`, and the process left healthy.

use std::time::Duration;

/// Limits and timeouts of the listeners; Envoy's defaults where it has one.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request headers (HTTP/1.1) must arrive within this of their first
    /// byte, or the connection is closed: slowloris gets nowhere.
    pub request_headers_timeout: Duration,
    /// A downstream HTTP/1.1 connection waiting this long for its next
    /// request is closed (Envoy's `idle_timeout`, 1 h).
    pub idle_timeout: Duration,
    /// A request or response body that sends nothing for this long is cut
    /// (`408` and `SI` if no response started, else a reset and `SI`).
    pub stream_idle_timeout: Duration,
    /// Open downstream connections per listener; beyond, new ones are
    /// closed at once.
    pub max_connections: usize,
    /// Header fields per request (HTTP/1.1; `431` beyond).
    pub max_headers: usize,
    /// Bytes of request headers (`431` beyond).
    pub max_header_bytes: usize,
    /// Bytes of the request target (`414` beyond).
    pub max_uri_bytes: usize,
    /// Bytes of the method token (`400` beyond).
    pub max_method_bytes: usize,
    /// Bytes of a request body, when set (`413` beyond).
    pub max_request_bytes: Option<u64>,
    /// HTTP/2 streams open at once per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before the server has answered
    /// them, per connection, before it is sent GOAWAY (the rapid-reset
    /// attack, CVE-2023-44487).
    pub max_pending_resets: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_headers_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            stream_idle_timeout: Duration::from_secs(300),
            max_connections: 16_384,
            max_headers: 100,
            max_header_bytes: 60 * 1024,
            max_uri_bytes: 16 * 1024,
            max_method_bytes: 32,
            max_request_bytes: None,
            max_concurrent_streams: 100,
            max_pending_resets: 20,
        }
    }
}

/// Why a downstream request or connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    ConnectionLimit,
    HeadersTimeout,
    HeadersTooLarge,
    UriTooLong,
    MethodTooLong,
    BodyTooLarge,
    RequestBodyIdle,
    ResponseBodyIdle,
    /// An HTTP/2 connection closed for abuse (rapid resets, protocol errors).
    Http2Abuse,
    /// Plaintext (or an app's own TLS) where PeerAuthentication says STRICT.
    MtlsRequired,
    /// A mesh mTLS handshake that failed: a client certificate missing,
    /// expired or from another CA.
    MtlsHandshake,
    /// A TLS connection a gateway could not terminate: no server for its
    /// server name, the server's credential unreadable, or the handshake
    /// failed (a MUTUAL client without a good certificate).
    GatewayTls,
    /// A call to a host outside the service registry where
    /// `outboundTrafficPolicy` is REGISTRY_ONLY.
    RegistryOnly,
}

impl Refused {
    pub const ALL: [Refused; 13] = [
        Refused::ConnectionLimit,
        Refused::HeadersTimeout,
        Refused::HeadersTooLarge,
        Refused::UriTooLong,
        Refused::MethodTooLong,
        Refused::BodyTooLarge,
        Refused::RequestBodyIdle,
        Refused::ResponseBodyIdle,
        Refused::Http2Abuse,
        Refused::MtlsRequired,
        Refused::MtlsHandshake,
        Refused::GatewayTls,
        Refused::RegistryOnly,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refused::ConnectionLimit => "connection_limit",
            Refused::HeadersTimeout => "request_headers_timeout",
            Refused::HeadersTooLarge => "headers_too_large",
            Refused::UriTooLong => "uri_too_long",
            Refused::MethodTooLong => "method_too_long",
            Refused::BodyTooLarge => "body_too_large",
            Refused::RequestBodyIdle => "request_body_idle",
            Refused::ResponseBodyIdle => "response_body_idle",
            Refused::Http2Abuse => "http2_abuse",
            Refused::MtlsRequired => "mtls_required",
            Refused::MtlsHandshake => "mtls_handshake",
            Refused::GatewayTls => "gateway_tls",
            Refused::RegistryOnly => "registry_only",
        }
    }
}
