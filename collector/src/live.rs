//! The live tier: what each rollup key did in each of the last 15 minutes'
//! seconds, in memory only. Rollups are written in 10 s windows and read
//! once a window has closed (plus a grace for late rows), so a rate read
//! from them lags by up to 12 s; the policy engine reacts to the last
//! second instead. The tier is fed by the same path as the rollups (every
//! committed or replayed `requests` row, after the cardinality guard), so
//! the two agree; PromQL reads it for recent ranges and the rollups for
//! everything before.
//!
//! A restart loses the tier: rows already in Parquet are not replayed, so
//! the tier is whole only from [`Live::complete_from`] on, and readers go
//! to the rollups for anything earlier. In a store shared by several
//! collectors it is never whole (others' rows are not here).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use lumen_core::schema::DURATION_BUCKETS_MS;

/// How far back the tier keeps seconds.
pub const RETENTION_SECS: i64 = 15 * 60;
/// Most (second, key) entries kept: past it the oldest seconds go (and
/// the tier is whole from later on), so a label exploding in the last
/// minutes costs bounded memory — about 100 MiB at this bound.
pub const MAX_ENTRIES: usize = 250_000;

pub const BUCKETS: usize = DURATION_BUCKETS_MS.len() + 1;

/// One key's second: requests, request bytes, response bytes, duration
/// sum (µs), then requests per duration bucket (not cumulative).
pub type Counts = [u64; 4 + BUCKETS];

/// A key as a reader sees it.
#[derive(Debug, Clone, Copy)]
pub struct LiveKey<'a> {
    /// Values of [`lumen_core::schema::ROLLUP_KEY_NAMES`], in order.
    pub names: [&'a str; lumen_core::schema::ROLLUP_KEY_NAMES.len()],
    pub status: i32,
    pub grpc_status: Option<i32>,
    pub mtls: bool,
}

/// The tier, over keys `K` (the rollups' key).
#[derive(Debug)]
pub struct Live<K> {
    seconds: BTreeMap<i64, HashMap<K, Counts>>,
    entries: usize,
    complete_from: i64,
}

impl<K> Default for Live<K> {
    /// Whole from the start: until files are found, every row there is
    /// comes through here.
    fn default() -> Self {
        Live::new(i64::MIN)
    }
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

impl<K> Live<K> {
    /// A tier whole from second `complete_from` (the first second no row
    /// of which can be in a file already).
    pub fn new(complete_from: i64) -> Self {
        Live {
            seconds: BTreeMap::new(),
            entries: 0,
            complete_from,
        }
    }

    /// Rows before `second` may be in files only (a restart found files;
    /// `i64::MAX`: other collectors write to the same store, so the tier
    /// is never whole).
    pub fn whole_from(&mut self, second: i64) {
        self.complete_from = self.complete_from.max(second);
    }

    /// The first second (Unix) from which every committed row is here.
    pub fn complete_from(&self) -> i64 {
        self.complete_from.max(now_secs() - RETENTION_SECS + 1)
    }

    /// Entries held, for the collector's metrics.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Visits every key's counts in each second from `from` on, oldest
    /// second first.
    pub fn visit(&self, from: i64, mut f: impl FnMut(i64, &K, &Counts)) {
        for (second, per_key) in self.seconds.range(from..) {
            for (key, counts) in per_key {
                f(*second, key, counts);
            }
        }
    }
}

impl<K: Eq + Hash + Clone> Live<K> {
    /// Counts one group of rows of a key in second `second`.
    pub(crate) fn add(&mut self, second: i64, key: &K, counts: &Counts) {
        let now = now_secs();
        if second <= now - RETENTION_SECS {
            return;
        }
        let per_key = self.seconds.entry(second).or_default();
        match per_key.get_mut(key) {
            Some(c) => {
                for (a, b) in c.iter_mut().zip(counts) {
                    *a += b;
                }
            }
            None => {
                per_key.insert(key.clone(), *counts);
                self.entries += 1;
            }
        }
        self.trim(now);
    }

    fn trim(&mut self, now: i64) {
        while let Some(entry) = self.seconds.first_entry() {
            let second = *entry.key();
            let expired = second <= now - RETENTION_SECS;
            if !expired && self.entries <= MAX_ENTRIES {
                break;
            }
            self.entries -= entry.get().len();
            entry.remove();
            if !expired {
                // Dropped for room: the seconds up to it are no longer whole.
                self.complete_from = self.complete_from.max(second + 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(service: &str) -> String {
        service.to_string()
    }

    fn one() -> Counts {
        let mut c = [0; 4 + BUCKETS];
        c[0] = 1;
        c
    }

    #[test]
    fn seconds_add_up_per_key_and_old_ones_go() {
        let now = now_secs();
        let mut live = Live::new(now - 100);
        live.add(now - 2, &key("a"), &one());
        live.add(now - 2, &key("a"), &one());
        live.add(now - 1, &key("b"), &one());
        live.add(now - RETENTION_SECS - 5, &key("a"), &one());
        assert_eq!(live.len(), 2);
        let mut seen = Vec::new();
        live.visit(now - 10, |s, k, c| seen.push((s, k.clone(), c[0])));
        assert_eq!(
            seen,
            vec![(now - 2, "a".to_string(), 2), (now - 1, "b".to_string(), 1)]
        );
        assert_eq!(live.complete_from(), now - 100);
    }

    #[test]
    fn past_its_bound_the_tier_forgets_the_oldest_seconds_and_says_so() {
        let now = now_secs();
        let mut live = Live::new(now - 600);
        for i in 0..MAX_ENTRIES + 10 {
            live.add(now - 500, &key(&i.to_string()), &one());
        }
        live.add(now - 1, &key("late"), &one());
        assert!(live.len() <= MAX_ENTRIES);
        assert_eq!(live.complete_from(), now - 499);
    }
}
