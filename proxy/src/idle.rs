//! Keep-alive without slowloris, for downstream HTTP/1.1.
//!
//! hyper's header timer starts when a connection waits for its next
//! request, so on its own it would close every keep-alive connection idle
//! for longer than the headers timeout — and a client reusing one as it
//! closes gets a reset instead of an answer. Here the timer waits for the
//! request's first byte: until then the connection is merely idle (closed
//! after the idle timeout, as Envoy's `idle_timeout`); from that byte on
//! the headers must complete within the headers timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a connection has read, shared by its IO and its header timer.
#[derive(Debug, Default)]
pub struct ReadCount {
    bytes: AtomicU64,
    /// The connection was closed for being idle, not for slow headers.
    idle_expired: AtomicBool,
}

impl ReadCount {
    pub fn idle_expired(&self) -> bool {
        self.idle_expired.load(Ordering::Relaxed)
    }
}

/// A connection's IO, counting the bytes read.
#[derive(Debug)]
pub struct CountingIo<T> {
    inner: T,
    count: Arc<ReadCount>,
}

impl<T> CountingIo<T> {
    pub fn new(inner: T, count: Arc<ReadCount>) -> Self {
        CountingIo { inner, count }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let n = (buf.filled().len() - before) as u64;
            self.count.bytes.fetch_add(n, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper's HTTP/1.1 timer for one connection: a header deadline that
/// starts at the request's first byte.
#[derive(Debug, Clone)]
pub struct HeaderTimer {
    count: Arc<ReadCount>,
    idle: Duration,
}

impl HeaderTimer {
    pub fn new(count: Arc<ReadCount>, idle: Duration) -> Self {
        HeaderTimer { count, idle }
    }
}

impl hyper::rt::Timer for HeaderTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let now = Instant::now();
        Box::pin(HeadSleep {
            headers: deadline.saturating_duration_since(now),
            seen: self.count.bytes.load(Ordering::Relaxed),
            count: self.count.clone(),
            started: false,
            sleep: Box::pin(tokio::time::sleep(self.idle)),
        })
    }
}

/// Idle until a byte arrives, then the headers deadline.
struct HeadSleep {
    headers: Duration,
    /// Bytes read when the wait began.
    seen: u64,
    count: Arc<ReadCount>,
    started: bool,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        // hyper polls this right after a read left the head incomplete, so
        // a new byte is seen here as it arrives.
        if !this.started && this.count.bytes.load(Ordering::Relaxed) != this.seen {
            this.started = true;
            let at = tokio::time::Instant::now() + this.headers;
            this.sleep.as_mut().reset(at);
        }
        match this.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                if !this.started {
                    this.count.idle_expired.store(true, Ordering::Relaxed);
                }
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl hyper::rt::Sleep for HeadSleep {}
