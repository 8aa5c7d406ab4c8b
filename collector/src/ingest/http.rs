//! OTLP/HTTP receiver: `POST /v1/traces`, `/v1/metrics` and `/v1/logs`
//! with `application/x-protobuf` or `application/json`, optionally gzip-
//! or zstd-encoded.

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use prost::Message;

use super::{Compression, Encoding, Ingest, IngestError, Signal};

/// `google.rpc.Status`, the error body OTLP/HTTP specifies.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

pub fn router(ingest: Ingest) -> Router {
    let mut router = Router::new();
    for signal in Signal::ALL {
        router = router.route(
            signal.http_path(),
            post(move |state, headers, body| export(state, signal, headers, body)),
        );
    }
    router.route("/ready", get(ready)).with_state(ingest)
}

/// 200 while payloads are taken (naming any trouble that may soon stop
/// that), 503 with the reasons while they are refused.
async fn ready(State(ingest): State<Ingest>) -> Response {
    let report = ingest.health();
    let mut body = String::new();
    for r in &report.refusing {
        body.push_str(&format!("not ready: {r}\n"));
    }
    for d in &report.degraded {
        body.push_str(&format!("degraded: {d}\n"));
    }
    if report.refusing.is_empty() {
        body.insert_str(0, "ready\n");
        (StatusCode::OK, body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

fn error(encoding: Option<Encoding>, status: StatusCode, message: String) -> Response {
    // gRPC codes: 3 INVALID_ARGUMENT, 8 RESOURCE_EXHAUSTED, 14 UNAVAILABLE.
    let code = match status {
        StatusCode::TOO_MANY_REQUESTS => 8,
        s if s.is_server_error() => 14,
        _ => 3,
    };
    match encoding {
        Some(Encoding::Protobuf) => (
            status,
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            RpcStatus { code, message }.encode_to_vec(),
        )
            .into_response(),
        Some(Encoding::Json) => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "code": code, "message": message }).to_string(),
        )
            .into_response(),
        None => (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{message}\n"),
        )
            .into_response(),
    }
}

fn ingest_error(encoding: Encoding, e: IngestError) -> Response {
    match e {
        IngestError::Invalid(m) => error(Some(encoding), StatusCode::BAD_REQUEST, m),
        IngestError::Unavailable(m) => {
            let mut resp = error(Some(encoding), StatusCode::SERVICE_UNAVAILABLE, m);
            // OTLP/HTTP clients honour Retry-After on 503.
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
        IngestError::Exhausted(m) => {
            // 429 with Retry-After: OTLP/HTTP's "slow down".
            let mut resp = error(Some(encoding), StatusCode::TOO_MANY_REQUESTS, m);
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(super::RETRY_AFTER.as_secs()),
            );
            resp
        }
    }
}

async fn export(
    State(ingest): State<Ingest>,
    signal: Signal,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    let encoding = match mime {
        "application/x-protobuf" | "application/protobuf" => Encoding::Protobuf,
        "application/json" => Encoding::Json,
        _ => {
            return error(
                None,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "unsupported Content-Type `{content_type}`: send application/x-protobuf or application/json"
                ),
            );
        }
    };
    let compression =
        match Compression::from_header(headers.get(header::CONTENT_ENCODING).map(|v| v.as_bytes()))
        {
            Ok(c) => c,
            Err(e) => {
                return error(
                    Some(encoding),
                    StatusCode::BAD_REQUEST,
                    format!("unsupported Content-Encoding: {e}"),
                );
            }
        };
    let admitted = match ingest.admit().await {
        Ok(a) => a,
        Err(e) => return ingest_error(encoding, e),
    };
    let limit = ingest.max_request_bytes();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared.filter(|n| *n > discard_cap(limit)) {
        // Far too large to be worth reading just to answer politely.
        return ingest_error(encoding, ingest.too_large(Some(n)));
    }
    let bytes = match read_limited(body, limit).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return ingest_error(encoding, ingest.too_large(None)),
        Err(BodyError::Read(e)) => {
            return error(
                Some(encoding),
                StatusCode::BAD_REQUEST,
                format!("reading request body: {e}"),
            );
        }
    };
    let bytes = match compression {
        Compression::None => bytes,
        how => match ingest.decompress(&bytes, how) {
            Ok(b) => b.into(),
            Err(e) => return ingest_error(encoding, e),
        },
    };
    let accepted = match ingest.export(&admitted, signal, &bytes, encoding).await {
        Ok(a) => a,
        Err(e) => return ingest_error(encoding, e),
    };
    let response = signal.response(&accepted);
    match encoding {
        Encoding::Protobuf => (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            response.protobuf(),
        )
            .into_response(),
        Encoding::Json => (
            [(header::CONTENT_TYPE, "application/json")],
            response.json(),
        )
            .into_response(),
    }
}

fn discard_cap(limit: usize) -> usize {
    limit.saturating_mul(4).max(1 << 20)
}

enum BodyError {
    TooLarge,
    Read(axum::Error),
}

/// Reads at most `limit` bytes. Past the limit the rest is read and thrown
/// away (up to a bound) so the client, still sending, gets the 400 instead of
/// a reset connection; a body far past the limit is cut off.
async fn read_limited(mut body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let discard_cap = discard_cap(limit);
    let mut buf = BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Read)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen > limit {
            if seen > discard_cap {
                return Err(BodyError::TooLarge);
            }
            buf.clear();
            continue;
        }
        buf.extend_from_slice(&data);
    }
    if seen > limit {
        return Err(BodyError::TooLarge);
    }
    Ok(buf.freeze())
}
