//! OTLP/gRPC receiver: `Export` of the trace, metrics and logs services.
//!
//! The unary call is read by hand rather than through tonic's generated
//! server so that the size limit is checked against the message's length
//! prefix before its bytes are buffered, and so that oversized or malformed
//! payloads get `INVALID_ARGUMENT` (tonic's codec answers `OUT_OF_RANGE` and
//! `INTERNAL`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use super::{Compression, Encoding, Ingest, IngestError, Signal};

/// One OTLP service (`SIGNAL` indexes [`Signal::ALL`]), ready to add to a
/// `tonic` server, which routes by the service's name.
#[derive(Debug, Clone)]
pub struct OtlpGrpc<const SIGNAL: usize> {
    ingest: Ingest,
}

/// The trace, metrics and logs services.
pub type TraceServiceGrpc = OtlpGrpc<0>;
pub type MetricsServiceGrpc = OtlpGrpc<1>;
pub type LogsServiceGrpc = OtlpGrpc<2>;

impl<const SIGNAL: usize> OtlpGrpc<SIGNAL> {
    pub fn new(ingest: Ingest) -> Self {
        OtlpGrpc { ingest }
    }
}

impl NamedService for OtlpGrpc<0> {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl NamedService for OtlpGrpc<1> {
    const NAME: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
}

impl NamedService for OtlpGrpc<2> {
    const NAME: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
}

impl<const SIGNAL: usize> tower::Service<http::Request<Body>> for OtlpGrpc<SIGNAL> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let ingest = self.ingest.clone();
        Box::pin(async move { Ok(export(ingest, req).await.unwrap_or_else(|s| s.into_http())) })
    }
}

fn status_of(e: IngestError) -> Status {
    e.to_status()
}

/// The signal a request's path exports.
fn signal_of(path: &str) -> Option<Signal> {
    let service = path.strip_prefix('/')?.strip_suffix("/Export")?;
    Signal::ALL
        .into_iter()
        .find(|s| s.grpc_service() == service)
}

async fn export(ingest: Ingest, req: http::Request<Body>) -> Result<http::Response<Body>, Status> {
    let Some(signal) = signal_of(req.uri().path()) else {
        return Err(Status::unimplemented(format!(
            "unknown method {}",
            req.uri().path()
        )));
    };
    let compression =
        Compression::from_header(req.headers().get("grpc-encoding").map(|v| v.as_bytes()))
            .map_err(|e| Status::unimplemented(format!("grpc-encoding {e}")))?;
    let admitted = ingest.admit().await.map_err(status_of)?;
    let (compressed, message) = read_unary(req.into_body(), &ingest).await?;
    let message = match (compressed, compression) {
        (false, _) => message,
        (true, Compression::None) => {
            return Err(Status::invalid_argument(
                "message is flagged compressed but no grpc-encoding was given",
            ));
        }
        (true, how) => Bytes::from(ingest.decompress(&message, how).map_err(status_of)?),
    };
    let accepted = ingest
        .export(&admitted, signal, &message, Encoding::Protobuf)
        .await
        .map_err(status_of)?;
    Ok(unary_response(signal.response(&accepted).protobuf()))
}

/// Reads one length-prefixed gRPC message, checking its declared length
/// against the limit before buffering it.
async fn read_unary(mut body: Body, ingest: &Ingest) -> Result<(bool, Bytes), Status> {
    let mut buf = BytesMut::new();
    let mut expected: Option<usize> = None;
    loop {
        if expected.is_none() && buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if len > ingest.max_request_bytes() {
                return Err(status_of(ingest.too_large(Some(len))));
            }
            expected = Some(len);
        }
        if let Some(len) = expected
            && buf.len() >= 5 + len
        {
            if buf.len() > 5 + len {
                return Err(Status::invalid_argument(
                    "more than one message in a unary call",
                ));
            }
            let compressed = buf[0] == 1;
            buf.advance(5);
            return Ok((compressed, buf.freeze()));
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => return Err(Status::invalid_argument(format!("reading request: {e}"))),
            None => {
                return Err(Status::invalid_argument(format!(
                    "request ended after {} bytes, inside a gRPC message",
                    buf.len()
                )));
            }
        }
    }
}

fn unary_response(encoded: Vec<u8>) -> http::Response<Body> {
    let mut framed = BytesMut::with_capacity(5 + encoded.len());
    framed.extend_from_slice(&[0]);
    framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    framed.extend_from_slice(&encoded);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
        Ok(Frame::data(framed.freeze())),
        Ok(Frame::trailers(trailers)),
    ];
    let body = Body::new(StreamBody::new(futures_util::stream::iter(frames)));
    let mut resp = http::Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(
        "grpc-accept-encoding",
        HeaderValue::from_static("gzip,zstd,identity"),
    );
    resp
}
