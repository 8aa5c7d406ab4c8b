//! What the collector knows about its own trouble: a failing WAL, failing
//! flushes, a hot buffer past its cap. Ingest consults it before taking a
//! payload; `/ready` reports it.

use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Health {
    wal: Mutex<Option<String>>,
    flush: Mutex<Option<String>>,
    others: Mutex<Option<String>>,
}

/// Why the collector takes no data now, or why it soon may not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Conditions under which payloads are refused.
    pub refusing: Vec<String>,
    /// Trouble that does not yet stop ingest.
    pub degraded: Vec<String>,
}

impl Health {
    pub(crate) fn set_wal(&self, problem: Option<String>) {
        *lock(&self.wal) = problem;
    }

    pub(crate) fn set_flush(&self, problem: Option<String>) {
        *lock(&self.flush) = problem;
    }

    pub(crate) fn set_others(&self, problem: Option<String>) {
        *lock(&self.others) = problem;
    }

    /// Why other collectors' files in a shared store may be missing from
    /// queries (their listing failed for longer than the delete grace).
    pub fn others_problem(&self) -> Option<String> {
        lock(&self.others).clone()
    }

    /// The WAL's failure, if it cannot take writes now.
    pub fn wal_problem(&self) -> Option<String> {
        lock(&self.wal).clone()
    }

    pub fn flush_problem(&self) -> Option<String> {
        lock(&self.flush).clone()
    }
}

fn lock(m: &Mutex<Option<String>>) -> std::sync::MutexGuard<'_, Option<String>> {
    // A panic while holding this lock leaves a valid Option behind.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
