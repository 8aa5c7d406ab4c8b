//! The Lumen policy engine: Prometheus alerting and recording rules
//! evaluated over Lumen's own series, and the decisions they drive —
//! switching rate limits and access policies on and off at every proxy.
//! (The `RateLimit` and `AccessPolicy` resources live in
//! `lumen-core::policy`, travel with the mesh configuration, and are
//! enforced by the proxy's `ratelimit` and `access` modules.)
//!
//! Data flows one way: rule files are read and validated ([`rules`]); the
//! [`alerts::RuleEngine`] evaluates each group on its interval with the
//! query crate's PromQL, moving alerts through pending → firing → resolved
//! as Prometheus does; [`http`] serves that state in Prometheus's API
//! shapes (`/api/v1/rules`, `/api/v1/alerts`) on the query port, and
//! [`notify`] sends firing alerts to Alertmanagers; [`decide`] turns
//! firing alerts into the set of conditional policies that are on, which
//! the control plane streams to every proxy, and every change into a
//! `policy_events` row.

#![forbid(unsafe_code)]

pub mod alerts;
pub mod decide;
pub mod envoy;
pub mod http;
pub mod notify;
pub mod rules;

pub use alerts::RuleEngine;
pub use rules::{RuleError, RuleGroup};
