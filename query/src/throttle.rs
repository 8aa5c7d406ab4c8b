//! Query threads step aside while ingest is busy.
//!
//! The query executor's threads already run at a lower priority, but on a
//! small machine that is not enough: a CPU-bound query fills every moment
//! ingest spends waiting on the network or on fsync, and its wakeups and
//! cache traffic slow ingest by a quarter even at the lowest priority. So
//! while ingest has payloads in progress ([`Pressure`]), each query thread
//! runs for a short slice, then pauses; every plan node's guard asks
//! [`Throttle::pause`] on each poll. With ingest idle, queries run at full
//! speed. A thread that was parked (idle) for a slice's length starts a
//! fresh slice, so queries that wait on I/O are not paused on top of it.

use std::cell::Cell;
use std::time::{Duration, Instant};

use std::sync::atomic::AtomicU64;

use lumen_core::load::Pressure;
use prometheus_client::metrics::counter::Counter;

/// How long a query thread runs before it pauses while ingest is busy.
const SLICE: Duration = Duration::from_millis(4);

/// Paces query threads while `pressure` is active.
#[derive(Debug, Clone)]
pub struct Throttle {
    pressure: Pressure,
    pause: Duration,
    /// Seconds paused, for `lumen_query_ingest_pause_seconds_total`.
    paused: Counter<f64, AtomicU64>,
}

#[derive(Debug, Clone, Copy)]
struct Turn {
    /// When this thread's current run began.
    since: Instant,
    /// The end of this thread's current pause.
    paused_until: Option<Instant>,
    parked_at: Option<Instant>,
}

thread_local! {
    static TURN: Cell<Option<Turn>> = const { Cell::new(None) };
}

impl Throttle {
    /// Query threads keep `share_percent` of their time while `pressure` is
    /// active; `None` when that is all of it (no throttling).
    pub fn new(
        pressure: Pressure,
        share_percent: u32,
        paused: Counter<f64, AtomicU64>,
    ) -> Option<Self> {
        if share_percent >= 100 {
            return None;
        }
        let share = share_percent.max(1);
        Some(Throttle {
            pressure,
            pause: SLICE * (100 - share) / share,
            paused,
        })
    }

    /// How long the calling query thread should pause now, if at all.
    pub fn pause(&self) -> Option<Duration> {
        let now = Instant::now();
        TURN.with(|cell| {
            let mut turn = cell.get().unwrap_or(Turn {
                since: now,
                paused_until: None,
                parked_at: None,
            });
            if let Some(until) = turn.paused_until {
                if now < until {
                    return Some(until - now);
                }
                turn.since = now;
                turn.paused_until = None;
            }
            let pause = (self.pressure.is_active() && now - turn.since >= SLICE).then(|| {
                turn.paused_until = Some(now + self.pause);
                self.paused.inc_by(self.pause.as_secs_f64());
                self.pause
            });
            cell.set(Some(turn));
            pause
        })
    }

    /// The executor's park hook: the thread has nothing to run.
    pub fn parked() {
        TURN.with(|cell| {
            if let Some(mut turn) = cell.get() {
                turn.parked_at = Some(Instant::now());
                cell.set(Some(turn));
            }
        });
    }

    /// The executor's unpark hook: a rest of a slice's length counts as a pause.
    pub fn unparked() {
        TURN.with(|cell| {
            if let Some(mut turn) = cell.get() {
                let now = Instant::now();
                if turn.parked_at.take().is_some_and(|at| now - at >= SLICE) {
                    turn.since = now;
                }
                cell.set(Some(turn));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_after_a_slice_only_while_pressure_is_active() {
        let pressure = Pressure::new();
        let throttle = Throttle::new(pressure.clone(), 25, Counter::default()).expect("throttled");
        assert_eq!(throttle.pause, SLICE * 3);
        assert!(Throttle::new(pressure.clone(), 100, Counter::default()).is_none());

        // Idle ingest: a thread runs on past its slice.
        assert_eq!(throttle.pause(), None);
        std::thread::sleep(SLICE * 2);
        assert_eq!(throttle.pause(), None);

        let busy = pressure.enter();
        let first = throttle.pause().expect("a thread past its slice pauses");
        assert_eq!(first, throttle.pause);
        std::thread::sleep(first);
        // After the pause a fresh slice begins.
        assert_eq!(throttle.pause(), None);
        assert_eq!(throttle.paused.get(), first.as_secs_f64());
        drop(busy);
    }

    #[test]
    fn a_long_park_counts_as_the_pause() {
        let pressure = Pressure::new();
        let throttle = Throttle::new(pressure.clone(), 50, Counter::default()).expect("throttled");
        let _busy = pressure.enter();
        assert_eq!(throttle.pause(), None);
        std::thread::sleep(SLICE * 2);
        Throttle::parked();
        std::thread::sleep(SLICE * 2);
        Throttle::unparked();
        assert_eq!(throttle.pause(), None, "the park was the thread's rest");
    }
}
