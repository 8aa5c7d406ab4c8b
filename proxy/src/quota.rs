//! Quotas at the calling sidecar: N requests per window per key across
//! every proxy. Each proxy counts what it admits per key and window,
//! reports the counts to the control plane every second, and admits up to
//! the allowance the control plane sends back (its share of what is left,
//! by recent demand). A key it has no allowance for yet starts with
//! `limit / proxies`. Proxies admit between reports without asking, so
//! the mesh-wide total can pass N by what the proxies admit in one
//! reporting interval — the documented bound.
//!
//! One ledger per proxy, shared by its routing tables (so counts survive
//! configuration changes) and its control stream (reports out,
//! allocations in).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use lumen_core::control::v1::{QuotaAllocation, QuotaUsage};
use lumen_core::policy::Quota;

/// Most keys one proxy counts per quota; past it, new keys share one.
pub const MAX_KEYS: usize = 10_000;
const OVERFLOW_KEY: &str = "(other)";

/// A Quota on a service, as the routing table holds it.
#[derive(Debug)]
pub struct QuotaRule {
    /// `namespace/name`.
    pub id: Arc<str>,
    pub spec: Quota,
}

impl QuotaRule {
    pub fn new(spec: &Quota) -> Self {
        QuotaRule {
            id: spec.id().into(),
            spec: spec.clone(),
        }
    }

    /// Whether the quota covers a request with this method and path.
    pub fn applies(&self, method: &str, path: &str) -> bool {
        self.spec.method.as_ref().is_none_or(|m| m.matches(method))
            && self.spec.path.as_ref().is_none_or(|p| p.matches(path))
    }
}

#[derive(Debug, Clone, Copy)]
struct Count {
    window: i64,
    used: u64,
    allowed: Option<u64>,
    /// Changed since the last report.
    dirty: bool,
}

/// What a quota said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Allowed,
    /// Over; the window ends in this many seconds.
    Exhausted {
        reset_secs: u64,
    },
}

#[derive(Debug, Default)]
pub struct QuotaLedger {
    counts: Mutex<HashMap<String, HashMap<String, Count>>>,
    /// Proxies sharing the quotas, as the control plane last said.
    proxies: AtomicU32,
}

impl QuotaLedger {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Count>>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one request of `key` under `q` at `now` (Unix seconds) if
    /// the proxy's allowance has room.
    pub fn admit(&self, q: &Quota, id: &str, key: &str, now: i64) -> Admit {
        let window = q.window_start(now);
        let proxies = u64::from(self.proxies.load(Ordering::Relaxed).max(1));
        let mut counts = self.lock();
        let per_key = match counts.get_mut(id) {
            Some(m) => m,
            None => counts.entry(id.to_string()).or_default(),
        };
        let key = if per_key.contains_key(key) || per_key.len() < MAX_KEYS {
            key
        } else {
            OVERFLOW_KEY
        };
        let count = match per_key.get_mut(key) {
            Some(c) => c,
            None => per_key.entry(key.to_string()).or_insert(Count {
                window,
                used: 0,
                allowed: None,
                dirty: false,
            }),
        };
        if count.window != window {
            *count = Count {
                window,
                used: 0,
                allowed: None,
                dirty: false,
            };
        }
        let allowed = count.allowed.unwrap_or(q.limit.div_ceil(proxies));
        if count.used < allowed {
            count.used += 1;
            count.dirty = true;
            Admit::Allowed
        } else {
            Admit::Exhausted {
                reset_secs: (window + q.per.secs() - now).max(1) as u64,
            }
        }
    }

    /// Counts changed since the last call, for a report; counts of past
    /// windows (reported already) are let go.
    pub fn take_usage(&self, now: i64) -> Vec<QuotaUsage> {
        let mut out = Vec::new();
        let mut counts = self.lock();
        for (quota, per_key) in counts.iter_mut() {
            for (key, c) in per_key.iter_mut() {
                if c.dirty {
                    c.dirty = false;
                    out.push(QuotaUsage {
                        quota: quota.clone(),
                        key: key.clone(),
                        window_start: c.window,
                        used: c.used,
                    });
                }
            }
            // A day is the longest window: anything older is over.
            per_key.retain(|_, c| c.dirty || c.window > now - 86_400);
        }
        counts.retain(|_, m| !m.is_empty());
        out
    }

    /// Takes the control plane's allocations for this proxy.
    pub fn apply(&self, allocations: &[QuotaAllocation], proxies: u32) {
        self.proxies.store(proxies, Ordering::Relaxed);
        let mut counts = self.lock();
        for a in allocations {
            if let Some(c) = counts.get_mut(&a.quota).and_then(|m| m.get_mut(&a.key))
                && c.window == a.window_start
            {
                c.allowed = Some(a.allowed);
            }
        }
    }

    /// A new stream: every count is reported again, so a control plane
    /// that restarted learns the window's usage so far.
    pub fn report_all(&self) {
        for per_key in self.lock().values_mut() {
            for c in per_key.values_mut() {
                c.dirty = true;
            }
        }
    }

    /// Quotas no longer configured are forgotten.
    pub fn retain(&self, ids: &[String]) {
        self.lock().retain(|id, _| ids.contains(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_core::policy::{LimitKey, QuotaPeriod};

    fn quota(limit: u64) -> Quota {
        Quota {
            name: "q".into(),
            namespace: "default".into(),
            service: "ratings".into(),
            method: None,
            path: None,
            key: LimitKey::Global,
            limit,
            per: QuotaPeriod::Minute,
            envoy: None,
        }
    }

    #[test]
    fn a_proxy_admits_its_share_then_its_allocation_and_reports_what_changed() {
        let ledger = QuotaLedger::default();
        ledger.apply(&[], 2);
        let q = quota(10);
        // A minute boundary.
        let t = 1_800_000_000;
        let admitted = (0..8)
            .filter(|_| ledger.admit(&q, "default/q", "k", t) == Admit::Allowed)
            .count();
        assert_eq!(admitted, 5, "limit / proxies before any allocation");
        assert_eq!(
            ledger.admit(&q, "default/q", "k", t + 10),
            Admit::Exhausted { reset_secs: 50 }
        );
        let usage = ledger.take_usage(t);
        assert_eq!(usage.len(), 1);
        assert_eq!((usage[0].used, usage[0].window_start), (5, t));
        assert!(ledger.take_usage(t).is_empty(), "nothing changed since");
        ledger.apply(
            &[QuotaAllocation {
                quota: "default/q".into(),
                key: "k".into(),
                window_start: t,
                allowed: 7,
            }],
            2,
        );
        assert_eq!(ledger.admit(&q, "default/q", "k", t), Admit::Allowed);
        assert_eq!(ledger.admit(&q, "default/q", "k", t), Admit::Allowed);
        assert!(matches!(
            ledger.admit(&q, "default/q", "k", t),
            Admit::Exhausted { .. }
        ));
        // A new window starts over, with the default share.
        assert_eq!(ledger.admit(&q, "default/q", "k", t + 60), Admit::Allowed);
    }
}
