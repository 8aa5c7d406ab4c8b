//! Streaming body wrappers: bytes pass through frame by frame (never
//! buffered whole) while being counted, and the request's record is written
//! exactly once — when the response body ends, or when the client goes away
//! first, even before any response existed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use lumen_core::{RequestRecord, ResponseFlags};
use tokio::sync::Notify;
use tokio::time::Sleep;

use crate::replay::BoxError;
use crate::telemetry::Telemetry;

/// A body that sends nothing for `limit` is cut. The timer is armed only
/// while the body waits, and re-armed (not reallocated) as frames pass.
struct IdleTimer {
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl IdleTimer {
    fn new(limit: Duration) -> Self {
        IdleTimer {
            limit,
            sleep: None,
            waiting: false,
        }
    }

    /// The body had nothing: true once it has had nothing for too long.
    fn pending(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.waiting {
            let deadline = tokio::time::Instant::now() + self.limit;
            match &mut self.sleep {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.waiting = true;
        }
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().poll(cx).is_ready(),
            None => false,
        }
    }

    fn progressed(&mut self) {
        self.waiting = false;
    }
}

/// Why a request body stopped short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFailure {
    /// The client broke off.
    Aborted,
    /// More than the configured maximum.
    TooLarge,
    /// Nothing arrived for the stream idle timeout.
    Idle,
}

/// What the request body did on its way upstream.
#[derive(Debug, Default)]
pub struct RequestBodyState {
    bytes: AtomicU64,
    ended: AtomicBool,
    /// 0: fine; else a [`BodyFailure`] + 1.
    failure: AtomicU8,
    ended_signal: Notify,
}

impl RequestBodyState {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Why the body stopped short, if it did.
    pub fn failure(&self) -> Option<BodyFailure> {
        match self.failure.load(Ordering::Relaxed) {
            1 => Some(BodyFailure::Aborted),
            2 => Some(BodyFailure::TooLarge),
            3 => Some(BodyFailure::Idle),
            _ => None,
        }
    }

    /// The body stopped moving (seen from outside it, e.g. the upstream no
    /// longer reads it).
    pub fn stalled(&self) {
        self.fail(BodyFailure::Idle);
    }

    fn fail(&self, why: BodyFailure) {
        let code = match why {
            BodyFailure::Aborted => 1,
            BodyFailure::TooLarge => 2,
            BodyFailure::Idle => 3,
        };
        let _ = self
            .failure
            .compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
        self.end();
    }

    fn end(&self) {
        if !self.ended.swap(true, Ordering::AcqRel) {
            self.ended_signal.notify_waiters();
        }
    }

    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Resolves once the whole body has been sent upstream. Any number of
    /// waiters: each registers before it looks, so none misses the end.
    pub async fn wait_ended(&self) {
        let notified = self.ended_signal.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.ended() {
            return;
        }
        notified.await;
    }
}

/// The downstream request body on its way upstream, counting bytes and
/// holding it to the size limit and the idle timeout.
pub struct RequestBody {
    inner: Incoming,
    state: Arc<RequestBodyState>,
    limit: Option<u64>,
    idle: IdleTimer,
}

impl RequestBody {
    pub fn new(
        inner: Incoming,
        state: Arc<RequestBodyState>,
        limit: Option<u64>,
        idle: Duration,
    ) -> Self {
        // An empty body (most GETs) may never be polled: it has ended already.
        if inner.is_end_stream() {
            state.end();
        }
        RequestBody {
            inner,
            state,
            limit,
            idle: IdleTimer::new(idle),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.progressed();
                if let Some(data) = frame.data_ref() {
                    let total = this
                        .state
                        .bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed)
                        + data.len() as u64;
                    if this.limit.is_some_and(|l| total > l) {
                        this.state.fail(BodyFailure::TooLarge);
                        return Poll::Ready(Some(Err("request body over the size limit".into())));
                    }
                }
                // With a known length the last frame may not be followed by a poll.
                if this.inner.is_end_stream() {
                    this.state.end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.state.end();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.fail(BodyFailure::Aborted);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                if this.idle.pending(cx) {
                    this.state.fail(BodyFailure::Idle);
                    return Poll::Ready(Some(Err("request body idle too long".into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Bytes each way through a tunnel, and how it ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct Spliced {
    /// Downstream → upstream.
    pub sent: u64,
    /// Upstream → downstream.
    pub received: u64,
    pub flags: ResponseFlags,
}

/// A request's record from accept on. It is written when [`finish`]ed, or
/// on drop — a handler dropped before its response existed means the client
/// went away (`DC`, status 0, as Envoy logs it).
///
/// [`finish`]: PendingRecord::finish
pub struct PendingRecord {
    record: Option<RequestRecord>,
    started: Instant,
    request_body: Arc<RequestBodyState>,
    telemetry: Arc<Telemetry>,
}

impl PendingRecord {
    pub fn new(
        record: RequestRecord,
        started: Instant,
        request_body: Arc<RequestBodyState>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        PendingRecord {
            record: Some(record),
            started,
            request_body,
            telemetry,
        }
    }

    /// The record being filled; `None` only after it was written.
    pub fn record(&self) -> Option<&RequestRecord> {
        self.record.as_ref()
    }

    /// The record being filled; `None` only after it was written.
    pub fn record_mut(&mut self) -> Option<&mut RequestRecord> {
        self.record.as_mut()
    }

    /// Writes the record (once; later calls do nothing).
    pub fn finish(&mut self, response_bytes: u64, flags: ResponseFlags) {
        if let Some(mut r) = self.record.take() {
            r.duration = self.started.elapsed();
            r.request_bytes = self.request_body.bytes();
            r.response_bytes = response_bytes;
            r.response_flags.insert(flags);
            self.telemetry.record(r);
        }
    }

    /// Writes a tunnel's record: the bytes it carried each way on top of
    /// the request that opened it.
    pub fn finish_tunnel(&mut self, spliced: Spliced) {
        if let Some(r) = self.record.as_mut() {
            r.request_bytes = self.request_body.bytes() + spliced.sent;
        }
        if let Some(mut r) = self.record.take() {
            r.duration = self.started.elapsed();
            r.response_bytes = spliced.received;
            r.response_flags.insert(spliced.flags);
            self.telemetry.record(r);
        }
    }
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        self.finish(0, ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION);
    }
}

/// The body the proxy answers with: the upstream's, streamed, or a local
/// reply. It writes the request's record when it ends — except for a
/// tunnel's answer, whose record the tunnel writes when it closes.
pub struct ResponseBody {
    inner: Either<Incoming, Full<Bytes>>,
    pending: Option<PendingRecord>,
    bytes: u64,
    /// For an upstream's body: cut when it stalls.
    idle: Option<IdleTimer>,
}

impl ResponseBody {
    /// The upstream's body, cut (flag `SI`) if it sends nothing for `idle`.
    pub fn upstream(inner: Incoming, pending: PendingRecord, idle: Duration) -> Self {
        ResponseBody {
            inner: Either::Left(inner),
            pending: Some(pending),
            bytes: 0,
            idle: Some(IdleTimer::new(idle)),
        }
    }

    pub fn local(text: impl Into<Bytes>, pending: PendingRecord) -> Self {
        ResponseBody {
            inner: Either::Right(Full::new(text.into())),
            pending: Some(pending),
            bytes: 0,
            idle: None,
        }
    }

    /// The empty body of a tunnel's `101` or `200`.
    pub fn tunnel() -> Self {
        ResponseBody {
            inner: Either::Right(Full::new(Bytes::new())),
            pending: None,
            bytes: 0,
            idle: None,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled: Poll<Option<Result<Frame<Bytes>, BoxError>>> = match &mut self.inner {
            Either::Left(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Either::Right(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        };
        if polled.is_pending() {
            if let Some(idle) = &mut self.idle
                && idle.pending(cx)
            {
                let bytes = self.bytes;
                if let Some(p) = &mut self.pending {
                    p.telemetry
                        .metrics()
                        .refused(crate::limits::Refused::ResponseBodyIdle);
                    p.finish(bytes, ResponseFlags::STREAM_IDLE_TIMEOUT);
                }
                return Poll::Ready(Some(Err("upstream response body idle too long".into())));
            }
            return Poll::Pending;
        }
        if let Some(idle) = &mut self.idle {
            idle.progressed();
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(s) = grpc_status(trailers)
                    && let Some(r) = self.pending.as_mut().and_then(|p| p.record_mut())
                {
                    // gRPC puts its status in the trailers of a normal response.
                    r.grpc_status = Some(s);
                }
            }
            Poll::Ready(None) => {
                let bytes = self.bytes;
                if let Some(p) = &mut self.pending {
                    p.finish(bytes, ResponseFlags::empty());
                }
            }
            Poll::Ready(Some(Err(_))) => {
                let bytes = self.bytes;
                if let Some(p) = &mut self.pending {
                    p.finish(bytes, ResponseFlags::UPSTREAM_CONNECTION_TERMINATION);
                }
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
        // polled, nor may a local reply to HEAD; anything else dropped early
        // means the client left.
        let Some(pending) = &mut self.pending else {
            return;
        };
        let head = pending.record_mut().is_some_and(|r| r.method == "HEAD");
        let flags =
            if self.inner.is_end_stream() || (head && matches!(self.inner, Either::Right(_))) {
                ResponseFlags::empty()
            } else {
                ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION
            };
        let bytes = self.bytes;
        if let Some(p) = &mut self.pending {
            p.finish(bytes, flags);
        }
    }
}

/// `grpc-status` from headers or trailers, when present and numeric.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
}
