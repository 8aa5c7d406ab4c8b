//! The Lumen control plane: where mesh configuration comes from and how it
//! reaches proxies.
//!
//! [`discovery`] reads the mesh's files (YAML in Kubernetes resource form:
//! Lumen's `Mesh` and `RateLimit` and Istio's networking kinds, in files
//! or directories)
//! and watches them. [`store`] holds the control plane's one set of
//! resources — from the files and from `lumen apply / delete` — valid as a
//! whole, kept on disk, published as versioned snapshots. [`server`]
//! streams each snapshot to every connected proxy over gRPC with xDS's
//! acknowledgements (version, nonce, ACK / NACK) — encoded once, in parts
//! every stream shares — and, apart from versions, the policy engine's
//! decisions (which conditional policies are on); it answers `apply`,
//! `delete`, `get` and `proxy-status`. [`ca`] is the mesh CA: it signs
//! proxies' CSRs for SPIFFE identities, and the streams carry its trust
//! bundle and which sidecars hold certificates. An invalid change is refused with
//! file, resource, field and reason; the last valid configuration stays.
//! On Kubernetes (feature `kubernetes`), [`inject`] answers the mutating
//! admission webhook — pods of labelled namespaces get the capture's init
//! container and the `lumen-proxy` sidecar — served over TLS with a
//! certificate from the mesh CA by [`webhook`]; [`tokenreview`] lets the
//! CA take a pod's projected service-account token as proof of identity.

pub mod ca;
#[cfg(feature = "kubernetes")]
pub mod casecret;
#[cfg(feature = "kubernetes")]
pub mod controller;
#[cfg(feature = "kubernetes")]
pub mod crd;
pub mod discovery;
#[cfg(feature = "kubernetes")]
pub mod inject;
#[cfg(feature = "kubernetes")]
pub mod lease;
pub mod quota;
pub mod server;
pub mod serving;
pub mod store;
#[cfg(feature = "kubernetes")]
pub mod tokenreview;
#[cfg(feature = "kubernetes")]
pub mod webhook;

pub use discovery::{ControlError, FileDiscovery, feed_store, load, load_file};
pub use server::ControlService;
pub use store::{ConfigStore, Published, StoreError};
