//! Query memory: a limit per query and a budget for all queries together.
//!
//! Each query gets its own DataFusion memory pool ([`QueryPool`]) holding
//! the per-query limit; every byte it grants is also drawn from the one
//! process-wide [`MemoryBudget`]. Operators that can spill (sort, grouped
//! aggregation) spill when either refuses; the others fail the query with
//! `ResourcesExhausted`, and [`QueryPool::exhausted`] says which limit it hit.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::{
    FairSpillPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation, TrackConsumersPool,
};

/// The memory all running queries may hold together.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Self {
        MemoryBudget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held by all queries now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_reserve(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }

    /// For DataFusion's infallible `grow`: the bytes are already in use.
    fn force(&self, n: usize) {
        self.used.fetch_add(n, Ordering::AcqRel);
    }

    fn release(&self, n: usize) {
        // Saturating: a release never takes the count below zero, even if
        // an operator shrinks more than it grew.
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }
}

/// Which limit refused memory first, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// The query's own limit.
    Query,
    /// The budget shared by all queries.
    Budget,
}

/// One query's memory pool: its own limit, drawn from the shared budget.
#[derive(Debug)]
pub struct QueryPool {
    inner: TrackConsumersPool<FairSpillPool>,
    limit: usize,
    budget: Arc<MemoryBudget>,
    peak: AtomicUsize,
    exhausted: AtomicU8,
}

impl QueryPool {
    pub fn new(limit: usize, budget: Arc<MemoryBudget>) -> Self {
        QueryPool {
            inner: TrackConsumersPool::new(
                FairSpillPool::new(limit),
                NonZeroUsize::new(5).unwrap_or(NonZeroUsize::MIN),
            ),
            limit,
            budget,
            peak: AtomicUsize::new(0),
            exhausted: AtomicU8::new(0),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held now.
    pub fn reserved_bytes(&self) -> usize {
        self.inner.reserved()
    }

    /// The most this query has held at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// The first limit that refused this query memory. A spilling operator
    /// may have been refused and recovered; this only explains a failure.
    pub fn exhausted(&self) -> Option<Exhausted> {
        match self.exhausted.load(Ordering::Relaxed) {
            1 => Some(Exhausted::Query),
            2 => Some(Exhausted::Budget),
            _ => None,
        }
    }

    fn note_exhausted(&self, which: Exhausted) {
        let v = match which {
            Exhausted::Query => 1,
            Exhausted::Budget => 2,
        };
        let _ = self
            .exhausted
            .compare_exchange(0, v, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn note_peak(&self) {
        self.peak
            .fetch_max(self.inner.reserved(), Ordering::Relaxed);
    }
}

impl fmt::Display for QueryPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "query pool of {} MiB within a budget of {} MiB",
            self.limit >> 20,
            self.budget.limit >> 20
        )
    }
}

impl MemoryPool for QueryPool {
    fn name(&self) -> &str {
        "lumen-query"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.inner.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.inner.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.inner.grow(reservation, additional);
        self.budget.force(additional);
        self.note_peak();
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.inner.shrink(reservation, shrink);
        self.budget.release(shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        if let Err(e) = self.inner.try_grow(reservation, additional) {
            self.note_exhausted(Exhausted::Query);
            return Err(e);
        }
        if !self.budget.try_reserve(additional) {
            self.inner.shrink(reservation, additional);
            self.note_exhausted(Exhausted::Budget);
            return Err(DataFusionError::ResourcesExhausted(format!(
                "cannot allocate {} KiB more for {}: the queries running now hold {} of the {} MiB all queries share",
                additional >> 10,
                reservation.consumer().name(),
                mib(self.budget.used()),
                self.budget.limit >> 20,
            )));
        }
        self.note_peak();
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.inner.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.limit)
    }
}

/// `12.3 MiB`
pub fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(limit: usize, budget: &Arc<MemoryBudget>) -> Arc<dyn MemoryPool> {
        Arc::new(QueryPool::new(limit, budget.clone()))
    }

    #[test]
    fn each_query_is_held_to_its_limit_and_all_to_the_budget() {
        let budget = Arc::new(MemoryBudget::new(100));
        let a = pool(60, &budget);
        let b = pool(60, &budget);
        let ra = MemoryConsumer::new("a").register(&a);
        let rb = MemoryConsumer::new("b").register(&b);

        ra.try_grow(50).unwrap();
        assert!(ra.try_grow(20).is_err(), "past the query's own limit");
        assert_eq!(budget.used(), 50);

        rb.try_grow(40).unwrap();
        let err = rb.try_grow(20).unwrap_err().to_string();
        assert!(err.contains("all queries share"), "{err}");
        assert_eq!(budget.used(), 90, "a refused grow takes nothing");
        assert_eq!(b.reserved(), 40);

        let qa = a.downcast_ref::<QueryPool>().unwrap();
        let qb = b.downcast_ref::<QueryPool>().unwrap();
        assert_eq!(qa.exhausted(), Some(Exhausted::Query));
        assert_eq!(qb.exhausted(), Some(Exhausted::Budget));
        assert_eq!(qa.peak(), 50);

        drop(ra);
        assert_eq!(budget.used(), 40, "a dropped reservation returns its bytes");
        rb.try_grow(20).unwrap();
        drop(rb);
        assert_eq!(budget.used(), 0);
    }
}
