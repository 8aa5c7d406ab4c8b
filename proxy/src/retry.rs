//! When a failed try is tried again: the policy's conditions, backoff with
//! jitter, and a budget that keeps retries a bounded share of the traffic
//! so a failing upstream is never sent a multiple of its load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::StatusCode;
use lumen_core::{RetryOn, RetryPolicy};

use rand::Rng;

/// How one try ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers arrived: the status and, for a trailers-only gRPC
    /// response, its `grpc-status`.
    Response {
        status: StatusCode,
        grpc: Option<i32>,
    },
    ConnectFailed,
    /// HTTP/2 REFUSED_STREAM: the upstream did not process the request.
    Refused,
    /// Reset or closed before response headers.
    Reset,
    /// No response headers within the per-try timeout.
    TimedOut,
    /// Not the upstream's fault (the client broke off, a bad request):
    /// never retried.
    Final,
}

/// Whether `policy` retries a try that ended so.
pub fn wants_retry(policy: &RetryPolicy, outcome: Outcome) -> bool {
    let on: &RetryOn = &policy.retry_on;
    match outcome {
        Outcome::Response { status, grpc } => {
            let code = status.as_u16();
            (on.server_error && status.is_server_error())
                || (on.gateway_error && matches!(code, 502..=504))
                || (on.retriable_status_codes && policy.retriable_status_codes.contains(&code))
                || grpc.is_some_and(|g| grpc_retriable(on, g))
        }
        Outcome::ConnectFailed => on.connect_failure || on.server_error || on.gateway_error,
        Outcome::Refused => on.refused_stream || on.server_error,
        Outcome::Reset => on.reset || on.server_error,
        Outcome::TimedOut => on.reset || on.server_error || on.gateway_error,
        Outcome::Final => false,
    }
}

fn grpc_retriable(on: &RetryOn, status: i32) -> bool {
    match status {
        1 => on.grpc_cancelled,
        4 => on.grpc_deadline_exceeded,
        8 => on.grpc_resource_exhausted,
        13 => on.grpc_internal,
        14 => on.grpc_unavailable,
        _ => false,
    }
}

/// The wait before retry number `retry` (1 for the first): a random
/// duration up to `base · 2^(retry-1)`, capped at `max` (Envoy's "full
/// jitter"), so retries from many clients do not arrive together.
pub fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let ceiling = policy
        .backoff_base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
        .min(policy.backoff_max);
    if ceiling.is_zero() {
        return ceiling;
    }
    let nanos = rand::rng().random_range(0..=ceiling.as_nanos().min(u64::MAX as u128) as u64);
    Duration::from_nanos(nanos)
}

/// Requests and retries in flight to one service. A retry may start while
/// retries in flight stay under the policy's share of requests in flight
/// (and at least its minimum), as Envoy's retry budget.
#[derive(Debug, Default)]
pub struct Budget {
    requests: AtomicU64,
    retries: AtomicU64,
    /// Retries the budget refused, for `/stats/prometheus`.
    pub refused: AtomicU64,
}

/// Counts one request (or retry) in flight until dropped.
pub struct InFlight<'a> {
    counter: &'a AtomicU64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Budget {
    pub fn request(&self) -> InFlight<'_> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            counter: &self.requests,
        }
    }

    /// A retry's place in the budget, or `None` when it is spent: retries
    /// in flight stay within `percent` of requests in flight (at least
    /// `min`), and under `max` (a DestinationRule's `maxRetries`).
    pub fn retry(&self, percent: u32, min: u32, max: Option<u32>) -> Option<InFlight<'_>> {
        let requests = self.requests.load(Ordering::Relaxed);
        let mut allowed = (requests * u64::from(percent) / 100).max(u64::from(min));
        if let Some(max) = max {
            allowed = allowed.min(u64::from(max));
        }
        let taken = self.retries.fetch_add(1, Ordering::Relaxed);
        if taken >= allowed {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(InFlight {
            counter: &self.retries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(code: u16) -> Outcome {
        Outcome::Response {
            status: StatusCode::from_u16(code).unwrap(),
            grpc: None,
        }
    }

    #[test]
    fn istio_default_retries_503_connect_failures_refused_streams_and_grpc_unavailable() {
        let p = RetryPolicy::default();
        assert!(wants_retry(&p, response(503)));
        assert!(!wants_retry(&p, response(500)));
        assert!(!wants_retry(&p, response(504)));
        assert!(!wants_retry(&p, response(200)));
        assert!(wants_retry(&p, Outcome::ConnectFailed));
        assert!(wants_retry(&p, Outcome::Refused));
        assert!(!wants_retry(&p, Outcome::Reset));
        assert!(!wants_retry(&p, Outcome::TimedOut));
        assert!(!wants_retry(&p, Outcome::Final));
        let grpc = |g| Outcome::Response {
            status: StatusCode::OK,
            grpc: Some(g),
        };
        assert!(wants_retry(&p, grpc(14)));
        assert!(wants_retry(&p, grpc(1)));
        assert!(!wants_retry(&p, grpc(13)));
    }

    #[test]
    fn named_conditions_widen_what_is_retried() {
        let p = RetryPolicy {
            retry_on: RetryOn::parse("5xx").unwrap(),
            ..RetryPolicy::default()
        };
        assert!(wants_retry(&p, response(500)));
        assert!(wants_retry(&p, Outcome::Reset));
        assert!(wants_retry(&p, Outcome::TimedOut));
        let p = RetryPolicy {
            retry_on: RetryOn::parse("gateway-error").unwrap(),
            ..RetryPolicy::default()
        };
        assert!(wants_retry(&p, response(504)));
        assert!(!wants_retry(&p, response(500)));
        assert!(RetryOn::parse("5xx,bogus").is_err());
    }

    #[test]
    fn backoff_grows_with_jitter_and_stays_under_the_cap() {
        let p = RetryPolicy::default();
        for retry in 1..10 {
            let ceiling = (p.backoff_base * (1 << (retry - 1))).min(p.backoff_max);
            for _ in 0..50 {
                assert!(backoff(&p, retry) <= ceiling);
            }
        }
        let waits: Vec<Duration> = (0..50).map(|_| backoff(&p, 3)).collect();
        assert!(waits.iter().any(|w| *w != waits[0]), "no jitter");
    }

    #[test]
    fn the_budget_allows_a_share_of_requests_in_flight() {
        let p = RetryPolicy::default(); // 20 %, at least 3
        let budget = Budget::default();
        let requests: Vec<_> = (0..50).map(|_| budget.request()).collect();
        let retry = || budget.retry(p.budget_percent, p.budget_min_concurrency, None);
        let retries: Vec<_> = (0..20).filter_map(|_| retry()).collect();
        assert_eq!(retries.len(), 10);
        assert_eq!(budget.refused.load(Ordering::Relaxed), 10);
        drop(retries);
        drop(requests);
        // A quiet service still gets its minimum.
        let _one = budget.request();
        let few: Vec<_> = (0..5).filter_map(|_| retry()).collect();
        assert_eq!(few.len(), 3);
        drop(few);
        // maxRetries caps it further.
        let capped: Vec<_> = (0..5)
            .filter_map(|_| budget.retry(20, 3, Some(1)))
            .collect();
        assert_eq!(capped.len(), 1);
    }
}
