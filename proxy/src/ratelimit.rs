//! Rate limits at the calling sidecar: each `RateLimit` on a service is a
//! [`Limiter`] with a token bucket per key (all callers, the calling
//! workload, or a header's value), refilled at the limit's rate up to its
//! burst. Checked after routing, before any upstream work; a limited
//! request is answered here (429, Envoy's `RL`) and costs the upstream
//! nothing. Buckets survive configuration swaps while the limit is
//! unchanged.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lumen_core::Workload;
use lumen_core::policy::{LimitKey, RateLimit};

/// The keys of one request, worked out once however many limits ask: a
/// header is looked up once per name in a row, the workload formatted
/// once.
pub struct RequestKeys<'a, F> {
    source: Option<&'a Workload>,
    principal: Option<&'a str>,
    header: F,
    workload: Option<String>,
    last_header: Option<(&'a str, &'a str)>,
}

impl<'a, F: Fn(&str) -> Option<&'a str>> RequestKeys<'a, F> {
    pub fn new(source: Option<&'a Workload>, principal: Option<&'a str>, header: F) -> Self {
        RequestKeys {
            source,
            principal,
            header,
            workload: None,
            last_header: None,
        }
    }

    pub fn of(&mut self, key: &'a LimitKey) -> &str {
        match key {
            LimitKey::Global => "",
            LimitKey::SourceWorkload => {
                let source = self.source;
                self.workload.get_or_insert_with(|| {
                    source.map_or(String::new(), |w| format!("{}/{}", w.namespace, w.workload))
                })
            }
            LimitKey::SourcePrincipal => self.principal.unwrap_or(""),
            LimitKey::Header(h) => match self.last_header {
                Some((name, value)) if name == h => value,
                _ => {
                    let value = (self.header)(h).unwrap_or("");
                    self.last_header = Some((h, value));
                    value
                }
            },
        }
    }
}

/// The key a request counts under, for a RateLimit or a Quota.
pub fn key_of<'a>(
    key: &LimitKey,
    source: Option<&Workload>,
    principal: Option<&'a str>,
    header: impl Fn(&str) -> Option<&'a str>,
) -> Cow<'a, str> {
    match key {
        LimitKey::Global => Cow::Borrowed(""),
        LimitKey::SourcePrincipal => Cow::Borrowed(principal.unwrap_or("")),
        LimitKey::SourceWorkload => source.map_or(Cow::Borrowed(""), |w| {
            Cow::Owned(format!("{}/{}", w.namespace, w.workload))
        }),
        LimitKey::Header(h) => Cow::Borrowed(header(h).unwrap_or("")),
    }
}

/// Most keys one limit tracks; past it, idle (full) buckets are dropped,
/// and if none are, new keys share one bucket, so memory stays bounded
/// whatever callers send.
const MAX_KEYS: usize = 10_000;

#[derive(Debug)]
pub struct Limiter {
    pub spec: RateLimit,
    /// `namespace/name`, as rows and headers name it.
    pub name: Arc<str>,
    buckets: Mutex<HashMap<String, Bucket, foldhash::fast::RandomState>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// What a limit says of one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Within the limit; tokens left in the bucket.
    Allow { remaining: u32 },
    /// Over it: answer 429, retry after this long.
    Limited { retry_after: Duration },
    /// Over it, but the limit is a dry run: let it through, say so.
    WouldLimit,
}

impl Limiter {
    pub fn new(spec: RateLimit) -> Self {
        Limiter {
            name: format!("{}/{}", spec.namespace, spec.name).into(),
            spec,
            buckets: Mutex::new(HashMap::default()),
        }
    }

    /// Whether the limit covers a request with this method and path.
    pub fn applies(&self, method: &str, path: &str) -> bool {
        self.spec.method.as_ref().is_none_or(|m| m.matches(method))
            && self.spec.path.as_ref().is_none_or(|p| p.matches(path))
    }

    /// Takes a token for `key` at `now`.
    pub fn check(&self, key: &str, now: Instant) -> Verdict {
        let rate = self.spec.requests_per_second;
        let burst = f64::from(self.spec.burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= MAX_KEYS {
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
            });
        }
        let key = if !buckets.contains_key(key) && buckets.len() >= MAX_KEYS {
            ""
        } else {
            key
        };
        // A key seen before costs no allocation.
        if !buckets.contains_key(key) {
            buckets.insert(
                key.to_string(),
                Bucket {
                    tokens: burst,
                    last: now,
                },
            );
        }
        let Some(b) = buckets.get_mut(key) else {
            return Verdict::Allow { remaining: 0 };
        };
        b.tokens =
            (b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Verdict::Allow {
                remaining: b.tokens as u32,
            };
        }
        if self.spec.dry_run {
            return Verdict::WouldLimit;
        }
        Verdict::Limited {
            retry_after: Duration::from_secs_f64((1.0 - b.tokens) / rate),
        }
    }

    /// The same limit with its buckets, when `spec` is unchanged.
    pub fn carried_over(previous: Option<&Arc<Limiter>>, spec: &RateLimit) -> Arc<Limiter> {
        match previous {
            Some(l) if l.spec == *spec => l.clone(),
            _ => Arc::new(Limiter::new(spec.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rps: f64, burst: u32, key: LimitKey, dry_run: bool) -> Limiter {
        Limiter::new(RateLimit {
            name: "l".into(),
            namespace: "default".into(),
            service: "ratings".into(),
            method: None,
            path: None,
            key,
            requests_per_second: rps,
            burst,
            dry_run,
            when: None,
            fail_mode: Default::default(),
            envoy: None,
        })
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let l = limit(10.0, 3, LimitKey::Global, false);
        let t = Instant::now();
        assert_eq!(l.check("", t), Verdict::Allow { remaining: 2 });
        assert_eq!(l.check("", t), Verdict::Allow { remaining: 1 });
        assert_eq!(l.check("", t), Verdict::Allow { remaining: 0 });
        let Verdict::Limited { retry_after } = l.check("", t) else {
            panic!("the fourth at once is over the burst");
        };
        assert_eq!(retry_after, Duration::from_millis(100));
        // One token comes back every 100 ms.
        let later = t + Duration::from_millis(100);
        assert_eq!(l.check("", later), Verdict::Allow { remaining: 0 });
        assert!(matches!(l.check("", later), Verdict::Limited { .. }));
        // Never more than the burst, however long it waited.
        let much_later = t + Duration::from_secs(60);
        assert_eq!(l.check("", much_later), Verdict::Allow { remaining: 2 });
    }

    #[test]
    fn keys_have_buckets_of_their_own_and_dry_runs_limit_nothing() {
        let l = limit(1.0, 1, LimitKey::SourceWorkload, false);
        let t = Instant::now();
        assert!(matches!(l.check("a", t), Verdict::Allow { .. }));
        assert!(matches!(l.check("b", t), Verdict::Allow { .. }));
        assert!(matches!(l.check("a", t), Verdict::Limited { .. }));
        let dry = limit(1.0, 1, LimitKey::Global, true);
        assert!(matches!(dry.check("", t), Verdict::Allow { .. }));
        assert_eq!(dry.check("", t), Verdict::WouldLimit);
    }

    #[test]
    fn a_request_counts_under_the_key_its_limit_names() {
        let w = Workload {
            service: "reviews".into(),
            workload: "reviews-v2".into(),
            namespace: "default".into(),
            version: "v2".into(),
        };
        let id = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews";
        let header = |h: &str| (h == "x-user").then_some("jason");
        let by_user = LimitKey::Header("x-user".into());
        let mut keys = RequestKeys::new(Some(&w), Some(id), header);
        assert_eq!(keys.of(&LimitKey::SourcePrincipal), id);
        assert_eq!(keys.of(&LimitKey::SourceWorkload), "default/reviews-v2");
        assert_eq!(keys.of(&by_user), "jason");
        assert_eq!(keys.of(&LimitKey::Global), "");
        assert_eq!(
            key_of(&LimitKey::SourcePrincipal, Some(&w), Some(id), header),
            id
        );
        // Without a certificate, callers share one bucket.
        assert_eq!(
            key_of(&LimitKey::SourcePrincipal, Some(&w), None, header),
            ""
        );
    }

    #[test]
    fn the_keys_tracked_are_bounded() {
        let l = limit(1.0, 1, LimitKey::Header("x-user".into()), false);
        let t = Instant::now();
        for i in 0..MAX_KEYS + 50 {
            l.check(&format!("user-{i}"), t);
        }
        assert!(l.buckets.lock().unwrap().len() <= MAX_KEYS + 1);
    }
}
