//! Queries in flight: admission (a few run, a few wait, the rest are told
//! to retry), the list operators see and cancel by id, and what is counted
//! and logged when each one ends.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::engine::{Busy, QueryError};
use crate::guard::{Stop, StopReason};
use crate::memory::{MemoryBudget, QueryPool};
use crate::metrics::{Outcome, QueryMetrics};

/// Where a query is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryState {
    /// Waiting for a turn.
    Queued,
    /// Planning and executing on the query executor.
    Running,
    /// Stopped (timeout, cancel, client gone, shutdown) and unwinding; its
    /// memory and turn are given back when its work has ended.
    Stopping,
}

impl QueryState {
    fn from_code(c: u8) -> Self {
        match c {
            0 => QueryState::Queued,
            1 => QueryState::Running,
            _ => QueryState::Stopping,
        }
    }

    fn code(self) -> u8 {
        match self {
            QueryState::Queued => 0,
            QueryState::Running => 1,
            QueryState::Stopping => 2,
        }
    }
}

/// One query in flight.
#[derive(Debug)]
pub struct Entry {
    pub id: u64,
    pub sql: String,
    /// Which front end and client sent it (`http 127.0.0.1:50312`).
    pub origin: String,
    submitted_at: SystemTime,
    submitted: Instant,
    state: AtomicU8,
    pub stop: Arc<Stop>,
    pool: OnceLock<Arc<QueryPool>>,
}

impl Entry {
    pub fn state(&self) -> QueryState {
        match QueryState::from_code(self.state.load(Ordering::Acquire)) {
            QueryState::Running if self.stop.reason().is_some() => QueryState::Stopping,
            s => s,
        }
    }

    pub(crate) fn set_state(&self, s: QueryState) {
        self.state.store(s.code(), Ordering::Release);
    }

    pub(crate) fn set_pool(&self, pool: Arc<QueryPool>) {
        let _ = self.pool.set(pool);
    }

    pub fn elapsed(&self) -> Duration {
        self.submitted.elapsed()
    }

    /// Bytes its operators and result hold now.
    pub fn memory(&self) -> usize {
        self.pool.get().map_or(0, |p| p.reserved_bytes())
    }

    pub fn peak_memory(&self) -> usize {
        self.pool.get().map_or(0, |p| p.peak())
    }

    pub fn info(&self) -> QueryInfo {
        QueryInfo {
            id: self.id.to_string(),
            sql: self.sql.clone(),
            origin: self.origin.clone(),
            started: chrono::DateTime::<chrono::Utc>::from(self.submitted_at)
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            elapsed_ms: self.elapsed().as_millis() as u64,
            memory_bytes: self.memory(),
            peak_memory_bytes: self.peak_memory(),
            state: self.state(),
            stop_reason: self.stop.reason().map(|r| r.to_string()),
        }
    }
}

/// A query as `GET /api/v1/queries` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct QueryInfo {
    /// A string, as JSON numbers lose precision past 2^53.
    pub id: String,
    pub sql: String,
    pub origin: String,
    /// When it arrived (RFC 3339, UTC).
    pub started: String,
    pub elapsed_ms: u64,
    pub memory_bytes: usize,
    pub peak_memory_bytes: usize,
    pub state: QueryState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
}

/// Bounds on admission.
#[derive(Debug, Clone)]
pub struct Admission {
    /// Queries executing at once.
    pub max_running: usize,
    /// Queries waiting for a turn; past this they are refused at once.
    pub max_queued: usize,
    /// Longest wait for a turn before the query is refused.
    pub queue_timeout: Duration,
}

/// All queries in flight, and the turns they take.
#[derive(Debug)]
pub struct Running {
    admission: Admission,
    turns: Arc<Semaphore>,
    queued: std::sync::atomic::AtomicUsize,
    next_id: AtomicU64,
    queries: Mutex<BTreeMap<u64, Arc<Entry>>>,
    closed: AtomicBool,
    slow: Duration,
    pub(crate) metrics: QueryMetrics,
    pub(crate) budget: Arc<MemoryBudget>,
}

/// Removes its entry from the list when the query's work has ended.
#[derive(Debug)]
pub struct Registered {
    running: Arc<Running>,
    pub entry: Arc<Entry>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.running.lock().remove(&self.entry.id);
    }
}

/// A query's turn: held until its work has ended, so a query that is slow
/// to stop still counts against the concurrency limit.
///
/// Work can outlive the query's task: `EXPLAIN ANALYZE` runs the query it
/// measures in tasks of its own, which aborting the query's task does not
/// reach. Every plan node of the query holds a clone of the turn's `work`
/// token, so when the turn is dropped while nodes are still alive, a
/// watcher keeps the turn (and the query's place in the list) until the
/// last of them is gone.
#[derive(Debug)]
pub struct Turn {
    permit: Option<OwnedSemaphorePermit>,
    registered: Option<Registered>,
    work: Arc<()>,
}

/// How often a watcher looks whether a stopped query's work has ended.
const WORK_POLL: Duration = Duration::from_millis(20);

impl Turn {
    fn new(permit: OwnedSemaphorePermit, registered: Registered) -> Self {
        Turn {
            permit: Some(permit),
            registered: Some(registered),
            work: Arc::new(()),
        }
    }

    /// A token every plan node of the query holds while it is alive.
    pub fn work_token(&self) -> Arc<()> {
        self.work.clone()
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if Arc::strong_count(&self.work) == 1 {
            return;
        }
        let (Ok(runtime), permit, registered) = (
            tokio::runtime::Handle::try_current(),
            self.permit.take(),
            self.registered.take(),
        ) else {
            return;
        };
        let work = self.work.clone();
        runtime.spawn(async move {
            while Arc::strong_count(&work) > 1 {
                tokio::time::sleep(WORK_POLL).await;
            }
            drop((permit, registered));
        });
    }
}

impl Running {
    pub fn new(admission: Admission, budget: Arc<MemoryBudget>, slow: Duration) -> Self {
        let turns = Arc::new(Semaphore::new(admission.max_running.max(1)));
        let metrics = QueryMetrics::new();
        metrics.memory_budget.set(budget.limit() as i64);
        Running {
            admission,
            turns,
            queued: Default::default(),
            next_id: AtomicU64::new(1),
            queries: Mutex::new(BTreeMap::new()),
            closed: AtomicBool::new(false),
            slow,
            metrics,
            budget,
        }
    }

    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Entry>>> {
        // Entries stay valid whatever panicked while the lock was held.
        self.queries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lists the query; refused once shutdown has begun.
    pub fn register(self: &Arc<Self>, sql: &str, origin: &str) -> Result<Registered, QueryError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(QueryError::Stopped(StopReason::Shutdown));
        }
        let entry = Arc::new(Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            sql: sql.to_string(),
            origin: origin.to_string(),
            submitted_at: SystemTime::now(),
            submitted: Instant::now(),
            state: AtomicU8::new(QueryState::Queued.code()),
            stop: Arc::new(Stop::default()),
            pool: OnceLock::new(),
        });
        self.lock().insert(entry.id, entry.clone());
        // A shutdown that began while this query was being listed has
        // already stopped the others; stop this one too.
        if self.closed.load(Ordering::Acquire) {
            entry.stop.stop(StopReason::Shutdown);
        }
        Ok(Registered {
            running: self.clone(),
            entry,
        })
    }

    /// Waits for a turn: at once if one is free, else in a short queue.
    pub async fn admit(&self, registered: Registered) -> Result<Turn, QueryError> {
        let stop = registered.entry.stop.clone();
        if let Some(r) = stop.reason() {
            return Err(QueryError::Stopped(r));
        }
        if let Ok(permit) = self.turns.clone().try_acquire_owned() {
            return Ok(Turn::new(permit, registered));
        }
        let queued = QueuedGuard::enter(&self.queued);
        if queued.position >= self.admission.max_queued {
            return Err(QueryError::Busy(Busy::QueueFull {
                running: self.admission.max_running,
                queued: self.admission.max_queued,
            }));
        }
        tokio::select! {
            permit = self.turns.clone().acquire_owned() => match permit {
                Ok(permit) => Ok(Turn::new(permit, registered)),
                Err(_) => Err(QueryError::Stopped(StopReason::Shutdown)),
            },
            () = tokio::time::sleep(self.admission.queue_timeout) => {
                Err(QueryError::Busy(Busy::QueueTimeout(self.admission.queue_timeout)))
            }
            reason = stop.stopped() => Err(QueryError::Stopped(reason)),
        }
    }

    /// Queries in flight, oldest first.
    pub fn list(&self) -> Vec<QueryInfo> {
        self.lock().values().map(|e| e.info()).collect()
    }

    /// Stops a query by id; false when no such query is in flight.
    pub fn cancel(&self, id: u64) -> bool {
        let entry = self.lock().get(&id).cloned();
        match entry {
            Some(e) => {
                e.stop.stop(StopReason::Cancelled);
                true
            }
            None => false,
        }
    }

    /// Stops every query in flight and refuses new ones.
    pub fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        self.turns.close();
        let entries: Vec<Arc<Entry>> = self.lock().values().cloned().collect();
        for e in entries {
            e.stop.stop(StopReason::Shutdown);
        }
    }

    /// Queries whose work is still going (running or stopping).
    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }

    /// Counts and, past the slow-query threshold, logs a finished query.
    pub fn finished(
        &self,
        entry: &Entry,
        outcome: Outcome,
        rows: Option<usize>,
        error: Option<&str>,
    ) {
        let elapsed = entry.elapsed();
        self.metrics.finished(outcome, elapsed.as_secs_f64());
        if elapsed >= self.slow {
            tracing::warn!(
                id = entry.id,
                origin = %entry.origin,
                outcome = outcome.as_str(),
                elapsed_ms = elapsed.as_millis() as u64,
                rows,
                peak_memory_bytes = entry.peak_memory(),
                error,
                sql = %truncate(&entry.sql, 2000),
                "slow query"
            );
        } else {
            tracing::debug!(
                id = entry.id,
                outcome = outcome.as_str(),
                elapsed_ms = elapsed.as_millis() as u64,
                "query finished"
            );
        }
    }

    /// The metrics exposition, with the gauges read now.
    pub fn encode_metrics(&self) -> String {
        let (mut running, mut queued, mut memory) = (0, 0, 0usize);
        for e in self.lock().values() {
            match e.state() {
                QueryState::Queued => queued += 1,
                QueryState::Running | QueryState::Stopping => running += 1,
            }
            memory += e.memory();
        }
        self.metrics.running.set(running);
        self.metrics.queued.set(queued);
        self.metrics.memory.set(memory as i64);
        self.metrics.encode()
    }
}

/// Counts a query in the queue while it waits.
struct QueuedGuard<'a> {
    count: &'a std::sync::atomic::AtomicUsize,
    /// How many were waiting before this one.
    position: usize,
}

impl<'a> QueuedGuard<'a> {
    fn enter(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        let position = count.fetch_add(1, Ordering::AcqRel);
        QueuedGuard { count, position }
    }
}

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
