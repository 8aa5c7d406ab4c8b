//! The Lumen control plane: where mesh configuration comes from and how it
//! reaches proxies.
//!
//! Configuration comes from files — [`discovery`] reads the mesh's files
//! (YAML in Kubernetes resource form: Lumen's `Mesh` and policy kinds and
//! Istio's networking and security kinds) and watches them — from `lumen
//! apply / delete`, and on Kubernetes (feature `kubernetes`) from the
//! cluster: the [`controller`] turns Services, EndpointSlices, Pods and
//! Nodes into `Mesh` resources and reads the custom resources of [`crd`],
//! writing each one's status (only the holder of the [`lease`] writes).
//! [`store`] holds the one set of resources, valid as a whole (from a
//! cluster, an invalid object is left out alone), kept on disk, published
//! as versioned snapshots. [`server`] streams each snapshot to every
//! connected proxy over gRPC — plaintext, or TLS with a [`serving`]
//! certificate — with xDS's acknowledgements (version, nonce, ACK / NACK),
//! encoded once in parts every stream shares, and the policy engine's
//! decisions (which conditional policies are on); it answers `apply`,
//! `delete`, `get` and `proxy-status` (and takes decisions) from holders
//! of an operator's token once a token file is given. [`ca`] is the mesh CA: it signs
//! proxies' CSRs for SPIFFE identities (proved by a join token or, with
//! [`tokenreview`], a pod's service-account token), shared by replicas
//! through a Secret ([`casecret`]); the streams carry its trust bundle and
//! which sidecars hold certificates. [`inject`] answers the mutating
//! admission webhook — pods of labelled namespaces get the capture's init
//! container and the `lumen-proxy` sidecar — served over TLS by
//! [`webhook`].

#![forbid(unsafe_code)]

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
