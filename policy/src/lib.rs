//! The Lumen policy engine: Prometheus alerting and recording rules
//! evaluated over Lumen's own series, and (next) the decisions they drive —
//! switching rate limits, quotas and access on and off at every proxy.
//! (The `RateLimit` resource itself lives in `lumen-core::policy`, travels
//! with the mesh configuration, and is enforced by the proxy's
//! `ratelimit` module.)
//!
//! Data flows one way: rule files are read and validated ([`rules`]); the
//! [`alerts::RuleEngine`] evaluates each group on its interval with the
//! query crate's PromQL, moving alerts through pending → firing → resolved
//! as Prometheus does; [`http`] serves that state in Prometheus's API
//! shapes (`/api/v1/rules`, `/api/v1/alerts`) on the query port, and
//! [`notify`] sends firing alerts to Alertmanagers; [`decide`] turns
//! firing alerts into the set of conditional policies that are on, which
//! the control plane streams to every proxy.

pub mod alerts;
pub mod decide;
pub mod http;
pub mod notify;
pub mod rules;

pub use alerts::RuleEngine;
pub use rules::{RuleError, RuleGroup};
