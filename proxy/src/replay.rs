//! A request body that can be sent more than once.
//!
//! The first try streams the downstream body as it arrives — nothing waits
//! for the whole body — while keeping each frame, up to a cap. A retry
//! sends the kept frames again, then goes on reading the downstream body
//! where the previous try stopped. A body larger than the cap is streamed
//! once and its request is not retried: the frames it would need are gone.
//!
//! One try reads at a time. A superseded try still held by a connection
//! task gets an error, never a frame meant for the next try.
//!
//! Kept bytes also come out of one [`Budget`] for the whole proxy, so many
//! large uploads at once cannot make the retry buffers grow without bound:
//! once it is spent, bodies are streamed once, like bodies over the cap.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What keeping one frame costs besides its bytes (the `Bytes` handle,
/// its place in the list, the buffer it may pin).
const FRAME_OVERHEAD: usize = 64;

/// Bytes all requests together may keep for retries.
#[derive(Debug)]
pub struct Budget {
    available: AtomicUsize,
}

impl Budget {
    pub fn new(bytes: usize) -> Arc<Self> {
        Arc::new(Budget {
            available: AtomicUsize::new(bytes),
        })
    }

    fn take(&self, n: usize) -> bool {
        self.available
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| a.checked_sub(n))
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.available.fetch_add(n, Ordering::AcqRel);
    }

    pub fn available(&self) -> usize {
        self.available.load(Ordering::Acquire)
    }
}

/// The body shared by a request's tries.
pub struct Replay<B> {
    state: Arc<Mutex<State<B>>>,
}

struct State<B> {
    source: B,
    /// Data frames read so far, while within `cap`.
    frames: Vec<Bytes>,
    buffered: usize,
    trailers: Option<HeaderMap>,
    cap: usize,
    budget: Arc<Budget>,
    /// More than `cap` bytes were read (or the budget was spent): no retry
    /// can send this body.
    overflowed: bool,
    /// The downstream body ended.
    ended: bool,
    /// The downstream body failed (the client broke off).
    failed: bool,
    /// The try allowed to read.
    current: u32,
}

impl<B: Body> Replay<B> {
    /// Keeps up to `cap` bytes for retries, out of `budget`; 0 keeps
    /// nothing (no retries).
    pub fn new(source: B, cap: usize, budget: Arc<Budget>) -> Self {
        Replay {
            state: Arc::new(Mutex::new(State {
                ended: source.is_end_stream(),
                source,
                frames: Vec::new(),
                buffered: 0,
                trailers: None,
                cap,
                budget,
                overflowed: false,
                failed: false,
                current: 0,
            })),
        }
    }

    /// The body for the next try; earlier tries' bodies stop yielding.
    pub fn try_body(&self) -> ReplayBody<B> {
        let mut s = lock(&self.state);
        s.current += 1;
        ReplayBody {
            state: self.state.clone(),
            id: s.current,
            next: 0,
            trailers_sent: false,
        }
    }

    /// No more tries will come: stop keeping frames (those kept stay until
    /// the current try has sent them, and are freed with the body).
    pub fn commit(&self) {
        lock(&self.state).overflowed = true;
    }

    /// The whole body, when it has ended and every byte was kept: what a
    /// mirror sends. The tries are left alone.
    pub fn complete(&self) -> Option<(Bytes, Option<HeaderMap>)> {
        let s = lock(&self.state);
        if !s.ended || s.overflowed || s.failed {
            return None;
        }
        let mut all = bytes::BytesMut::with_capacity(s.frames.iter().map(Bytes::len).sum());
        for f in &s.frames {
            all.extend_from_slice(f);
        }
        Some((all.freeze(), s.trailers.clone()))
    }

    /// Whether another try could send the whole body again.
    pub fn replayable(&self) -> bool {
        let s = lock(&self.state);
        !s.overflowed && !s.failed
    }
}

impl<B> Drop for State<B> {
    fn drop(&mut self) {
        self.budget.give(self.buffered);
    }
}

fn lock<B>(state: &Mutex<State<B>>) -> std::sync::MutexGuard<'_, State<B>> {
    // A panic elsewhere cannot leave the frames half-written: recover them.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// One try's view of the request body.
pub struct ReplayBody<B> {
    state: Arc<Mutex<State<B>>>,
    id: u32,
    /// The next kept frame this try sends.
    next: usize,
    trailers_sent: bool,
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut s = lock(&this.state);
        if s.current != this.id {
            return Poll::Ready(Some(Err("request body taken over by a retry".into())));
        }
        if let Some(frame) = s.frames.get(this.next) {
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(frame.clone()))));
        }
        if s.ended {
            if !this.trailers_sent
                && let Some(t) = &s.trailers
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut s.source).poll_frame(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.failed = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if s.source.is_end_stream() {
                    s.ended = true;
                }
                if let Some(data) = frame.data_ref() {
                    if !s.overflowed {
                        // Each kept frame costs its bytes and its bookkeeping,
                        // so a body in tiny frames cannot hide its memory.
                        let cost = data.len() + FRAME_OVERHEAD;
                        if s.buffered + cost <= s.cap && s.budget.take(cost) {
                            s.buffered += cost;
                            s.frames.push(data.clone());
                            this.next = s.frames.len();
                        } else {
                            s.overflowed = true;
                            s.frames = Vec::new();
                            let kept = std::mem::take(&mut s.buffered);
                            s.budget.give(kept);
                            this.next = 0;
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    // Trailers are last: hyper may never poll again.
                    s.trailers = Some(t.clone());
                    s.ended = true;
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.state);
        s.current == self.id
            && s.ended
            && self.next >= s.frames.len()
            && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let s = lock(&self.state);
        let kept: u64 = s.frames[self.next.min(s.frames.len())..]
            .iter()
            .map(|f| f.len() as u64)
            .sum();
        if s.ended {
            return SizeHint::with_exact(kept);
        }
        let rest = s.source.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(kept + rest.lower());
        if let Some(upper) = rest.upper() {
            hint.set_upper(kept + upper);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Source =
        StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>>;

    fn source(chunks: &[&'static str], trailer: bool) -> Source {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        if trailer {
            let mut t = HeaderMap::new();
            t.insert("x-sum", "1".parse().unwrap());
            frames.push(Ok(Frame::trailers(t)));
        }
        StreamBody::new(futures_util::stream::iter(frames))
    }

    async fn all(body: ReplayBody<Source>) -> (Bytes, Option<HeaderMap>) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn a_retry_sends_the_same_bytes_and_trailers() {
        let replay = Replay::new(source(&["ab", "cd"], true), 1024, Budget::new(1 << 20));
        let first = all(replay.try_body()).await;
        assert!(replay.replayable());
        let second = all(replay.try_body()).await;
        assert_eq!(first.0, "abcd");
        assert_eq!(first, second);
        assert!(second.1.is_some());
    }

    #[tokio::test]
    async fn a_retry_mid_body_resends_what_was_read_then_reads_on() {
        let replay = Replay::new(
            source(&["ab", "cd", "ef"], false),
            1024,
            Budget::new(1 << 20),
        );
        let mut first = replay.try_body();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        let second = replay.try_body();
        // The superseded try gets an error, not the next try's frames.
        assert!(first.frame().await.unwrap().is_err());
        assert_eq!(all(second).await.0, "abcdef");
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_streamed_once_and_not_replayable() {
        let replay = Replay::new(source(&["abc", "def"], false), 4, Budget::new(1 << 20));
        assert_eq!(all(replay.try_body()).await.0, "abcdef");
        assert!(!replay.replayable());
    }

    #[tokio::test]
    async fn bodies_share_one_budget_and_give_it_back() {
        // Each kept frame costs its bytes and FRAME_OVERHEAD.
        let budget = Budget::new(4 + FRAME_OVERHEAD + 2);
        let first = Replay::new(source(&["abcd"], false), 1024, budget.clone());
        assert_eq!(all(first.try_body()).await.0, "abcd");
        assert!(first.replayable());
        assert_eq!(budget.available(), 2);
        // The budget has 2 bytes left: this body is streamed, not kept.
        let second = Replay::new(source(&["xyz"], false), 1024, budget.clone());
        assert_eq!(all(second.try_body()).await.0, "xyz");
        assert!(!second.replayable());
        assert_eq!(budget.available(), 2);
        drop(first);
        drop(second);
        assert_eq!(budget.available(), 4 + FRAME_OVERHEAD + 2);
    }

    #[tokio::test]
    async fn trailers_end_the_body_for_a_retry_even_if_never_polled_past() {
        let replay = Replay::new(source(&["ab"], true), 1024, Budget::new(1 << 20));
        let mut first = replay.try_body();
        assert!(first.frame().await.unwrap().unwrap().is_data());
        assert!(first.frame().await.unwrap().unwrap().is_trailers());
        // The first try stops here, as hyper does after trailers.
        let second = all(replay.try_body()).await;
        assert_eq!(second.0, "ab");
        assert!(second.1.is_some(), "the retry sends the trailers too");
    }

    #[tokio::test]
    async fn a_committed_body_keeps_no_more() {
        let budget = Budget::new(1 << 20);
        let replay = Replay::new(source(&["ab", "cd"], false), 1024, budget.clone());
        let mut body = replay.try_body();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "ab"
        );
        replay.commit();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "cd"
        );
        assert!(!replay.replayable());
        assert_eq!(budget.available(), (1 << 20) - 2 - FRAME_OVERHEAD);
    }

    #[tokio::test]
    async fn an_empty_body_ends_at_once_for_every_try() {
        let replay = Replay::new(http_body_util::Empty::<Bytes>::new(), 0, Budget::new(0));
        assert!(replay.try_body().is_end_stream());
        assert!(replay.try_body().is_end_stream());
        assert!(replay.replayable());
    }
}
