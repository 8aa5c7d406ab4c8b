//! A signal from latency-sensitive work to background work that shares its
//! cores: while [`Pressure`] is active, background threads should step aside.
//!
//! The collector marks each ingest payload while it is decoded and stored
//! (until acknowledgement); the query executor reads the mark and, while it is set,
//! runs its threads in short slices with pauses between them. Lowering a
//! thread's priority alone is not enough on a small machine: a busy thread
//! at the lowest priority still fills every gap the higher-priority work
//! leaves while it waits on I/O, and its caches and wakeups slow that work.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How many latency-sensitive operations are under way. Cheap to clone and
/// to read; cloning shares the count.
#[derive(Debug, Clone, Default)]
pub struct Pressure {
    active: Arc<AtomicUsize>,
}

impl Pressure {
    pub fn new() -> Self {
        Pressure::default()
    }

    /// Marks one operation as under way until the returned guard drops.
    pub fn enter(&self) -> PressureGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        PressureGuard {
            active: self.active.clone(),
        }
    }

    /// Whether any operation is under way.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed) > 0
    }
}

/// One operation under way; see [`Pressure::enter`].
#[derive(Debug)]
pub struct PressureGuard {
    active: Arc<AtomicUsize>,
}

impl Drop for PressureGuard {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_while_any_guard_lives() {
        let p = Pressure::new();
        assert!(!p.is_active());
        let a = p.enter();
        let b = p.clone().enter();
        drop(a);
        assert!(p.is_active());
        drop(b);
        assert!(!p.is_active());
    }
}
