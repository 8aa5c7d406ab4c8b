//! Lumen's shared vocabulary, with no network or disk I/O.
//!
//! - [`record`]: the [`RequestRecord`] a proxy fills for every request it sees.
//! - [`schema`]: the Arrow schemas of the store's tables (`requests`, `spans`, …),
//!   the OTLP attribute names a request record travels under, and a batch
//!   builder that turns records into Arrow columns.
//! - [`resource`]: resources in Kubernetes form (`apiVersion`, `kind`,
//!   `metadata`, `spec`) as files hold them and the control plane stores
//!   and streams them, keyed by kind, namespace and name.
//! - [`networking`]: Istio's `VirtualService`, `DestinationRule`,
//!   `ServiceEntry`, `Gateway` and `Sidecar`, read as Istio's users write them; fields
//!   Lumen does not implement are refused by name.
//! - [`service`]: services, their endpoints, protocols and retry policy —
//!   what proxies route to.
//! - [`config`]: the validated mesh — Lumen's `Mesh` registry and Istio's
//!   resources over it, checked together — with errors naming file,
//!   resource, field and reason.
//! - [`control`]: the control stream's protobuf API (snapshots with xDS's
//!   version / nonce / ACK / NACK, apply, delete, get, proxy status).
//! - [`thread`]: the one scheduling hint background threads share;
//!   [`process`]: the live heap (a counting global allocator) and the
//!   `process_*` figures every server's `/metrics` appends, read from /proc.
//! - [`ipc`]: what compressed Arrow IPC from outside says it will take
//!   once decompressed, checked before decoding it.
//! - [`istio`]: Istio's standard metric labels, from a record or a rollup key.
//! - [`sketch`]: the mergeable latency sketch (DDSketch, 1 % relative
//!   accuracy) rollups keep per key and window.
//! - [`load`]: the signal latency-sensitive work gives background work to
//!   step aside while it runs.
//! - [`policy`]: Lumen's policy resources (`RateLimit`, `Quota`,
//!   `AccessPolicy`), validated like Istio's; [`access`]: an AccessPolicy
//!   as the decisions in force make it, for sidecars and ext_authz alike.
//! - [`identity`]: workload identities as SPIFFE ids and Istio principals;
//!   [`security`]: Istio's `PeerAuthentication`; [`authz`]: Istio's
//!   `AuthorizationPolicy`, and how it decides a request.
//!
//! Proxies produce records, the collector turns their OTLP spans back into
//! rows of the same schema, and the query service reads those rows; all three
//! agree on names through this crate.

#![deny(unsafe_code)]

pub mod access;
pub mod authz;
pub mod config;
pub mod control;
pub mod exposition;
pub mod identity;
pub mod ipc;
pub mod istio;
pub mod load;
pub mod networking;
pub mod otlp;
pub mod policy;
pub mod process;
pub mod record;
pub mod resource;
pub mod schema;
pub mod security;
pub mod service;
pub mod sketch;
pub mod thread;

pub use config::{
    ConfigError, Endpoint, MeshConfig, RetryOn, RetryPolicy, Service, UpstreamProtocol,
};
pub use record::{Protocol, Reporter, RequestRecord, ResponseFlags, Workload};

/// A boxed future, as the long-running entry points of Lumen's crates
/// (servers, the collector, the controller, query execution) return.
///
/// An `async fn`'s state machine is compiled again in every crate that
/// polls it, with everything it awaits: without the box, the `lumen` binary
/// crate recompiled the proxy, the collector and DataFusion's SQL planner
/// behind each command. Boxed in the crate that defines it, it is compiled
/// once; callers see one `poll` through a vtable.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
