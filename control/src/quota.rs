//! Quota allocation, as Envoy's rate-limit quota service does it: every
//! proxy reports what it admitted per quota, key and window; every second
//! each proxy is told how many it may admit in all this window — what it
//! used, plus its share of what is left of the limit, by its demand over
//! the last report (so a busy proxy gets most of it, an idle one keeps a
//! little). What proxies admit between a report and the next allocation
//! is not yet counted: the mesh-wide total can pass the limit by at most
//! one reporting interval's admissions.

use std::collections::HashMap;
use std::sync::Mutex;

use lumen_core::control::v1::{QuotaAllocation, QuotaUsage};

#[derive(Debug, Default, Clone, Copy)]
struct NodeUse {
    used: u64,
    /// Admitted since the report before the last.
    demand: u64,
}

type EntryKey = (String, String, i64);

#[derive(Debug, Default)]
pub struct QuotaBook {
    entries: Mutex<HashMap<EntryKey, HashMap<String, NodeUse>>>,
}

impl QuotaBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<EntryKey, HashMap<String, NodeUse>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A proxy's report.
    pub fn report(&self, node: &str, usage: &[QuotaUsage]) {
        let mut entries = self.lock();
        for u in usage {
            let per_node = entries
                .entry((u.quota.clone(), u.key.clone(), u.window_start))
                .or_default();
            let n = per_node.entry(node.to_string()).or_default();
            // Counts only grow within a window; a smaller one is an old
            // report arriving late.
            if u.used > n.used {
                n.demand = u.used - n.used;
                n.used = u.used;
            }
        }
    }

    /// What `node` may admit per quota key it reported, given each
    /// quota's limit and period (`limit_of`), at `now` (Unix seconds).
    /// Windows that have ended are forgotten.
    pub fn allocations(
        &self,
        node: &str,
        now: i64,
        limit_of: impl Fn(&str) -> Option<(u64, i64)>,
    ) -> Vec<QuotaAllocation> {
        let mut entries = self.lock();
        entries.retain(|(quota, _, window), _| {
            limit_of(quota).is_some_and(|(_, period)| window + period > now)
        });
        let mut out = Vec::new();
        for ((quota, key, window), per_node) in entries.iter_mut() {
            let Some(mine) = per_node.get(node).copied() else {
                continue;
            };
            let Some((limit, _)) = limit_of(quota) else {
                continue;
            };
            let used: u64 = per_node.values().map(|n| n.used).sum();
            let left = limit.saturating_sub(used);
            let weight = |n: &NodeUse| n.demand as f64 + 1.0;
            let total: f64 = per_node.values().map(weight).sum();
            let share = (left as f64 * weight(&mine) / total).floor() as u64;
            out.push(QuotaAllocation {
                quota: quota.clone(),
                key: key.clone(),
                window_start: *window,
                allowed: mine.used + share,
            });
        }
        out
    }

    /// A proxy gone: its usage still counts (it was admitted), its demand
    /// no longer takes a share.
    pub fn idle(&self, node: &str) {
        for per_node in self.lock().values_mut() {
            if let Some(n) = per_node.get_mut(node) {
                n.demand = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(used: u64) -> Vec<QuotaUsage> {
        vec![QuotaUsage {
            quota: "default/q".into(),
            key: String::new(),
            window_start: 600,
            used,
        }]
    }

    #[test]
    fn what_is_left_goes_to_demand_and_allocations_never_pass_the_limit_together() {
        let book = QuotaBook::default();
        let limits = |q: &str| (q == "default/q").then_some((100, 60));
        book.report("a", &usage(40));
        book.report("b", &usage(10));
        let a = book.allocations("a", 610, limits);
        let b = book.allocations("b", 610, limits);
        // 50 left, by demand 41 : 11.
        assert_eq!(a[0].allowed, 40 + 39);
        assert_eq!(b[0].allowed, 10 + 10);
        assert!(a[0].allowed + b[0].allowed <= 100);
        // The window over: forgotten.
        assert!(book.allocations("a", 660, limits).is_empty());
    }
}
