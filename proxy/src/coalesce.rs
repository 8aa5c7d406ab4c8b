//! Write coalescing for HTTP/2 connections, upstream and downstream.
//!
//! hyper's HTTP/2 client opens a stream and writes its HEADERS in one turn
//! of the connection task; the request body's task can only queue its DATA
//! once the opened stream has send capacity, so the DATA leaves in the
//! connection's next turn. Flushed as they come, a gRPC call is two writes
//! (two TLS records, two system calls) and the peer wakes up twice. Envoy
//! avoids this by writing at the end of its event loop's iteration; this
//! stream does the same within a tokio scheduler tick: a flush with bytes
//! pending is put off once — the connection task yields, the tasks it woke
//! (the body pipe among them) run, and the next flush writes everything
//! queued meanwhile in one call. A task that wakes itself is rescheduled
//! behind the tasks already queued, on both of tokio's schedulers, so the
//! put-off costs one trip through the run queue, never a timer.
//!
//! Downstream, a response's last DATA frame and its trailers (a gRPC
//! status) are flushed apart the same way, and are joined the same way.
//!
//! Small writes are gathered in a buffer; anything that would make it
//! larger than [`GATHER`] bytes first drains it and then goes through as
//! it came, so large bodies are not copied twice.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes gathered before writing: a full 16 KiB DATA frame and
/// what comes with it fit; larger payloads are written as they come.
pub const GATHER: usize = 64 * 1024;

/// Buffer capacity kept between bursts; a larger one, grown by a big
/// burst, is given back, so idle connections hold little.
const KEEP: usize = 16 * 1024;

#[derive(Debug)]
pub struct Coalesce<T> {
    inner: T,
    pending: Vec<u8>,
    /// The pending bytes' flush was put off once already.
    yielded: bool,
    /// Gather at all; off, every call goes straight through.
    enabled: bool,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T, enabled: bool) -> Self {
        Coalesce {
            inner,
            pending: Vec::new(),
            yielded: false,
            enabled,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes the gathered bytes out; Ready once none are left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.pending.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        if self.pending.capacity() > KEEP {
            self.pending = Vec::new();
        }
        self.yielded = false;
        Poll::Ready(Ok(()))
    }
}

impl<T: hyper_util::client::legacy::connect::Connection>
    hyper_util::client::legacy::connect::Connection for Coalesce<T>
{
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.inner.connected()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        if !me.enabled {
            return Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        }
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if me.pending.len() + len <= GATHER {
            for b in bufs {
                me.pending.extend_from_slice(b);
            }
            return Poll::Ready(Ok(len));
        }
        // Too big to gather: what is gathered goes first, in order.
        std::task::ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // Gathering takes any number of slices.
        self.enabled || self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if !me.pending.is_empty() && !me.yielded {
            me.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        std::task::ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        std::task::ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes that reach the inner stream.
    struct Counting {
        writes: Vec<Vec<u8>>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.get_mut().writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_flushed_within_one_tick_leave_together() {
        let mut s = Coalesce::new(Counting { writes: vec![] }, true);
        s.write_all(b"HEADERS").await.unwrap();
        // The first flush yields; meanwhile the body arrives.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut s).poll_flush(&mut cx).is_pending());
        assert!(s.get_ref().writes.is_empty());
        s.write_all(b"DATA").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(s.get_ref().writes, vec![b"HEADERSDATA".to_vec()]);
    }

    #[tokio::test]
    async fn large_writes_go_through_after_what_was_gathered() {
        let mut s = Coalesce::new(Counting { writes: vec![] }, true);
        s.write_all(b"HEADERS").await.unwrap();
        let big = vec![7u8; GATHER + 1];
        s.write_all(&big).await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(s.get_ref().writes, vec![b"HEADERS".to_vec(), big]);
    }

    #[tokio::test]
    async fn disabled_writes_go_straight_through() {
        let mut s = Coalesce::new(Counting { writes: vec![] }, false);
        s.write_all(b"a").await.unwrap();
        s.write_all(b"b").await.unwrap();
        assert_eq!(s.get_ref().writes, vec![b"a".to_vec(), b"b".to_vec()]);
    }

    #[tokio::test]
    async fn reads_and_shutdown_pass_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = Coalesce::new(a, true);
        s.write_all(b"ping").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
    }
}
