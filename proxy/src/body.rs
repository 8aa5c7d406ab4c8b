//! Streaming body wrappers: bytes pass through frame by frame (never
//! buffered whole) while being counted, and the response body writes the
//! request's record when it ends — or when the client goes away first.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use lumen_core::{RequestRecord, ResponseFlags};

use crate::telemetry::Telemetry;

/// The downstream request body on its way upstream, counting bytes.
pub struct RequestBody {
    inner: Incoming,
    bytes: Arc<AtomicU64>,
}

impl RequestBody {
    pub fn new(inner: Incoming, bytes: Arc<AtomicU64>) -> Self {
        RequestBody { inner, bytes }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request's record, completed when the response ends.
pub struct PendingRecord {
    pub record: RequestRecord,
    pub started: Instant,
    pub request_bytes: Arc<AtomicU64>,
    pub telemetry: Arc<Telemetry>,
}

impl PendingRecord {
    fn finish(mut self, response_bytes: u64) {
        self.record.duration = self.started.elapsed();
        self.record.request_bytes = self.request_bytes.load(Ordering::Relaxed);
        self.record.response_bytes = response_bytes;
        self.telemetry.record(self.record);
    }
}

/// The body the proxy answers with: the upstream's, streamed, or a local reply.
pub struct ResponseBody {
    inner: Either<Incoming, Full<Bytes>>,
    pending: Option<PendingRecord>,
    bytes: u64,
}

impl ResponseBody {
    pub fn upstream(inner: Incoming, pending: PendingRecord) -> Self {
        ResponseBody {
            inner: Either::Left(inner),
            pending: Some(pending),
            bytes: 0,
        }
    }

    pub fn local(text: impl Into<Bytes>, pending: Option<PendingRecord>) -> Self {
        ResponseBody {
            inner: Either::Right(Full::new(text.into())),
            pending,
            bytes: 0,
        }
    }

    fn finish(&mut self, flags: ResponseFlags) {
        if let Some(mut p) = self.pending.take() {
            p.record.response_flags.insert(flags);
            p.finish(self.bytes);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = match &mut self.inner {
            Either::Left(b) => Pin::new(b).poll_frame(cx),
            Either::Right(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(p) = self.pending.as_mut()
                {
                    // gRPC puts its status in the trailers of a normal response.
                    if let Some(s) = grpc_status(trailers) {
                        p.record.grpc_status = Some(s);
                    }
                }
            }
            Poll::Ready(None) => self.finish(ResponseFlags::empty()),
            Poll::Ready(Some(Err(_))) => {
                self.finish(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION)
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Bodies known to be empty (HEAD, 204, Content-Length: 0) may never be
        // polled; anything else dropped early means the client left.
        let flags = if self.inner.is_end_stream() {
            ResponseFlags::empty()
        } else {
            ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION
        };
        self.finish(flags);
    }
}

/// `grpc-status` from headers or trailers, when present and numeric.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
}
