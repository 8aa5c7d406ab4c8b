//! Replies the proxy makes itself — no route, a fault, an overflow, a
//! redirect — in the caller's protocol, with Envoy's response flags.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use lumen_core::{Protocol, ResponseFlags};
use std::sync::Arc;

use crate::body::{PendingRecord, ResponseBody};
use crate::context::FLAGS_HEADER;

/// A reply the proxy makes itself. A gRPC caller gets it the gRPC way —
/// HTTP 200, trailers-only, the status as `grpc-status` — as Envoy does, so
/// its client library reports a status rather than a protocol error.
pub fn local_reply(
    status: StatusCode,
    flags: ResponseFlags,
    message: String,
    pending: PendingRecord,
) -> Response<ResponseBody> {
    reply_with(status, flags, message, None, pending)
}

/// A fault's abort: its HTTP status, or for a gRPC abort (and to a gRPC
/// caller) its gRPC status, with `FI`.
pub fn fault_abort(
    status: u16,
    grpc: Option<i32>,
    pending: PendingRecord,
) -> Response<ResponseBody> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    reply_with(
        status,
        ResponseFlags::FAULT_INJECTED,
        "fault filter abort".into(),
        grpc,
        pending,
    )
}

/// A request a rate limit or quota refused: 429 with `RL` (a gRPC caller gets
/// `RESOURCE_EXHAUSTED`), and when to come back, in the headers
/// Envoy's rate limiter and the IETF draft use.
pub fn rate_limited(
    policy: Arc<str>,
    limit: u64,
    retry_after: std::time::Duration,
    mut pending: PendingRecord,
) -> Response<ResponseBody> {
    if let Some(r) = pending.record_mut() {
        r.policy = Some(policy.clone());
    }
    let mut resp = reply_with(
        StatusCode::TOO_MANY_REQUESTS,
        ResponseFlags::RATE_LIMITED,
        format!("rate limited by {policy}"),
        // 429 is RESOURCE_EXHAUSTED to a gRPC caller.
        None,
        pending,
    );
    let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let h = resp.headers_mut();
    for (name, value) in [
        ("x-ratelimit-limit", limit.to_string()),
        ("x-ratelimit-remaining", "0".to_string()),
        ("x-ratelimit-reset", secs.to_string()),
        ("retry-after", secs.to_string()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&policy) {
        h.insert("x-lumen-policy", v);
    }
    resp
}

/// A request an access policy denied: 403 with `UAEX` (a gRPC caller gets
/// `PERMISSION_DENIED`), the policy named in the row and a header.
pub fn denied(policy: Arc<str>, mut pending: PendingRecord) -> Response<ResponseBody> {
    if let Some(r) = pending.record_mut() {
        r.policy = Some(policy.clone());
    }
    let mut resp = reply_with(
        StatusCode::FORBIDDEN,
        ResponseFlags::UNAUTHORIZED_EXTERNAL_SERVICE,
        format!("denied by {policy}"),
        None,
        pending,
    );
    if let Ok(v) = HeaderValue::from_str(&policy) {
        resp.headers_mut().insert("x-lumen-policy", v);
    }
    resp
}

/// A request Istio's AuthorizationPolicy refused: 403 `RBAC: access
/// denied` (a gRPC caller gets `PERMISSION_DENIED`), the policy in the row
/// (`none` when no ALLOW policy allowed it); a CUSTOM policy's refusal is
/// the external authorizer's, flagged `UAEX`.
pub fn rbac_denied(
    refusal: crate::authz::Refusal,
    mut pending: PendingRecord,
) -> Response<ResponseBody> {
    if let Some(r) = pending.record_mut() {
        r.policy = Some(refusal.policy.clone());
    }
    let flags = if refusal.external {
        ResponseFlags::UNAUTHORIZED_EXTERNAL_SERVICE
    } else {
        ResponseFlags::empty()
    };
    let mut resp = envoy_reply(
        StatusCode::FORBIDDEN,
        flags,
        crate::authz::RBAC_DENIED.into(),
        pending,
    );
    if let Ok(v) = HeaderValue::from_str(&refusal.policy) {
        resp.headers_mut().insert("x-lumen-policy", v);
    }
    resp
}

/// A request whose JWT a RequestAuthentication refused: 401 with Envoy's
/// reason and `WWW-Authenticate` (a gRPC caller gets `UNAUTHENTICATED`).
pub fn unauthenticated(
    rejected: crate::jwt::Rejected,
    realm: &str,
    mut pending: PendingRecord,
) -> Response<ResponseBody> {
    if let Some(r) = pending.record_mut() {
        r.policy = Some(rejected.policy.clone());
    }
    let mut resp = envoy_reply(
        StatusCode::UNAUTHORIZED,
        ResponseFlags::empty(),
        rejected.reason,
        pending,
    );
    let challenge = format!("Bearer realm=\"{realm}\", error=\"invalid_token\"");
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// A route's redirect: its status and `Location`, no body.
pub fn redirect(code: u16, location: &str, mut pending: PendingRecord) -> Response<ResponseBody> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Some(r) = pending.record_mut() {
        r.status = status.as_u16();
    }
    let mut resp = Response::new(ResponseBody::local(bytes::Bytes::new(), pending));
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// A route's direct response: its status and body.
pub fn direct(
    status: u16,
    body: bytes::Bytes,
    mut pending: PendingRecord,
) -> Response<ResponseBody> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    if let Some(r) = pending.record_mut() {
        r.status = status.as_u16();
    }
    let mut resp = Response::new(ResponseBody::local(body, pending));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn reply_with(
    status: StatusCode,
    flags: ResponseFlags,
    message: String,
    grpc_status: Option<i32>,
    pending: PendingRecord,
) -> Response<ResponseBody> {
    let text = format!("lumen: {message}");
    let body = format!("{text}\n");
    reply_text(status, flags, text, body, grpc_status, pending)
}

/// A reply whose body is Envoy's own words, as clients of Envoy match
/// them (`RBAC: access denied`, `Jwt is expired`).
fn envoy_reply(
    status: StatusCode,
    flags: ResponseFlags,
    text: String,
    pending: PendingRecord,
) -> Response<ResponseBody> {
    reply_text(status, flags, text.clone(), text, None, pending)
}

fn reply_text(
    status: StatusCode,
    flags: ResponseFlags,
    text: String,
    plain_body: String,
    grpc_status: Option<i32>,
    mut pending: PendingRecord,
) -> Response<ResponseBody> {
    let is_grpc = pending
        .record()
        .is_some_and(|r| r.protocol == Protocol::Grpc);
    let grpc = match grpc_status {
        Some(code) => Some(code),
        None => is_grpc.then(|| grpc_code(status, flags)),
    };
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
    let body = if grpc.is_some() {
        String::new()
    } else {
        plain_body
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
