//! One row per request: what a proxy saw, filled once the response ends.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Which side of a request wrote the record, as Istio's `reporter` label says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The caller's sidecar (outbound listener).
    Source,
    /// The callee's sidecar (inbound listener).
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "source" => Some(Reporter::Source),
            "destination" => Some(Reporter::Destination),
            _ => None,
        }
    }
}

/// Application protocol of a request, as seen on the downstream side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
    Grpc,
    /// An HTTP/1.1 connection upgraded to WebSocket (or another protocol).
    WebSocket,
    /// Opaque bytes: a row per connection.
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1.1",
            Protocol::Http2 => "h2",
            Protocol::Grpc => "grpc",
            Protocol::WebSocket => "websocket",
            Protocol::Tcp => "tcp",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "http/1.1" => Protocol::Http1,
            "h2" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            "websocket" => Protocol::WebSocket,
            "tcp" => Protocol::Tcp,
            _ => return None,
        })
    }
}

/// A workload's identity as the mesh knows it. Names are shared `Arc<str>`s
/// so filling a record per request copies pointers, not strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Workload {
    pub service: Arc<str>,
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    pub version: Arc<str>,
}

impl Workload {
    /// Placeholder identity for a peer the proxy cannot name, as Istio's `unknown`.
    pub fn unknown() -> Self {
        let unknown: Arc<str> = Arc::from("unknown");
        Workload {
            service: unknown.clone(),
            workload: unknown.clone(),
            namespace: unknown.clone(),
            version: unknown,
        }
    }
}

/// Why a request did not get a normal upstream response, as Envoy's
/// `%RESPONSE_FLAGS%` short codes, so operators can reuse what they know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u16);

impl ResponseFlags {
    /// No route (unknown destination service).
    pub const NO_ROUTE: ResponseFlags = ResponseFlags(1 << 0);
    /// The destination has no endpoint to send to.
    pub const NO_HEALTHY_UPSTREAM: ResponseFlags = ResponseFlags(1 << 1);
    /// Connecting to the upstream failed.
    pub const UPSTREAM_CONNECTION_FAILURE: ResponseFlags = ResponseFlags(1 << 2);
    /// The upstream closed or reset the connection mid-request.
    pub const UPSTREAM_CONNECTION_TERMINATION: ResponseFlags = ResponseFlags(1 << 3);
    /// The downstream went away before the response finished.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: ResponseFlags = ResponseFlags(1 << 4);
    /// The upstream did not answer in time.
    pub const UPSTREAM_REQUEST_TIMEOUT: ResponseFlags = ResponseFlags(1 << 5);
    /// Every allowed retry was used and the last try failed too.
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: ResponseFlags = ResponseFlags(1 << 6);
    /// A body (request or response) sent nothing for the stream idle timeout.
    pub const STREAM_IDLE_TIMEOUT: ResponseFlags = ResponseFlags(1 << 7);
    /// A route's fault injection aborted the request.
    pub const FAULT_INJECTED: ResponseFlags = ResponseFlags(1 << 8);
    /// A route's fault injection delayed the request.
    pub const DELAY_INJECTED: ResponseFlags = ResponseFlags(1 << 9);
    /// The destination's connection pool (circuit breaker) was full.
    pub const UPSTREAM_OVERFLOW: ResponseFlags = ResponseFlags(1 << 10);
    /// A rate limit refused the request.
    pub const RATE_LIMITED: ResponseFlags = ResponseFlags(1 << 11);
    /// An access policy (or external authorization) denied the request.
    pub const UNAUTHORIZED_EXTERNAL_SERVICE: ResponseFlags = ResponseFlags(1 << 12);

    const CODES: [(ResponseFlags, &'static str); 13] = [
        (Self::NO_ROUTE, "NR"),
        (Self::NO_HEALTHY_UPSTREAM, "UH"),
        (Self::UPSTREAM_CONNECTION_FAILURE, "UF"),
        (Self::UPSTREAM_CONNECTION_TERMINATION, "UC"),
        (Self::DOWNSTREAM_CONNECTION_TERMINATION, "DC"),
        (Self::UPSTREAM_REQUEST_TIMEOUT, "UT"),
        (Self::UPSTREAM_RETRY_LIMIT_EXCEEDED, "URX"),
        (Self::STREAM_IDLE_TIMEOUT, "SI"),
        (Self::FAULT_INJECTED, "FI"),
        (Self::DELAY_INJECTED, "DI"),
        (Self::UPSTREAM_OVERFLOW, "UO"),
        (Self::RATE_LIMITED, "RL"),
        (Self::UNAUTHORIZED_EXTERNAL_SERVICE, "UAEX"),
    ];

    pub const fn empty() -> Self {
        ResponseFlags(0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, other: ResponseFlags) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn insert(&mut self, other: ResponseFlags) {
        self.0 |= other.0;
    }

    /// Parses the `,`-separated form written by [`fmt::Display`]; `-` is empty.
    pub fn parse(s: &str) -> Option<Self> {
        let mut flags = ResponseFlags::empty();
        if s == "-" || s.is_empty() {
            return Some(flags);
        }
        for code in s.split(',') {
            let (flag, _) = Self::CODES.iter().find(|(_, c)| *c == code)?;
            flags.insert(*flag);
        }
        Some(flags)
    }
}

impl fmt::Display for ResponseFlags {
    /// Envoy's form: short codes joined by `,`, or `-` when there are none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        let mut first = true;
        for (flag, code) in Self::CODES {
            if self.contains(flag) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(code)?;
                first = false;
            }
        }
        Ok(())
    }
}

/// Everything a proxy knows about one request once its response has ended.
/// Column names and meanings are documented in `docs/tables.md`.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    pub start_time: SystemTime,
    pub duration: Duration,
    pub reporter: Reporter,
    pub source: Workload,
    pub destination: Workload,
    pub protocol: Protocol,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub route: Arc<str>,
    pub status: u16,
    pub grpc_status: Option<i32>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub retries: u32,
    pub upstream_address: Option<Arc<str>>,
    pub response_flags: ResponseFlags,
    pub mtls: bool,
    /// W3C trace id (16 bytes).
    pub trace_id: [u8; 16],
    /// This hop's span id (8 bytes).
    pub span_id: [u8; 8],
    /// The caller's span id, when the request carried one.
    pub parent_span_id: Option<[u8; 8]>,
    /// The policy (`namespace/name`) that limited or denied the request,
    /// or would have in dry run.
    pub policy: Option<Arc<str>>,
    /// The SPIFFE ids of both sides, as mesh mTLS proved them (`None`
    /// without mTLS).
    pub source_principal: Option<Arc<str>>,
    pub destination_principal: Option<Arc<str>>,
}

impl RequestRecord {
    /// A plain `GET /` answered 200 in 1.5 ms, between unknown workloads,
    /// reported by the destination: a base for tests to change what they
    /// are about (`RequestRecord { path: …, ..RequestRecord::example() }`).
    pub fn example() -> Self {
        RequestRecord {
            start_time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_micros(1500),
            reporter: Reporter::Destination,
            source: Workload::unknown(),
            destination: Workload::unknown(),
            protocol: Protocol::Http1,
            method: "GET".into(),
            authority: "reviews:9080".into(),
            path: "/".into(),
            route: "default".into(),
            status: 200,
            grpc_status: None,
            request_bytes: 0,
            response_bytes: 0,
            retries: 0,
            upstream_address: None,
            response_flags: ResponseFlags::empty(),
            mtls: false,
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            policy: None,
            source_principal: None,
            destination_principal: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_flags_round_trip_in_envoy_form() {
        let mut flags = ResponseFlags::empty();
        assert_eq!(flags.to_string(), "-");
        flags.insert(ResponseFlags::NO_ROUTE);
        flags.insert(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
        assert_eq!(flags.to_string(), "NR,UT");
        assert_eq!(ResponseFlags::parse("NR,UT"), Some(flags));
        assert_eq!(ResponseFlags::parse("-"), Some(ResponseFlags::empty()));
        assert_eq!(ResponseFlags::parse("XX"), None);
    }
}
