//! The Lumen control plane: where mesh configuration comes from and how it
//! reaches proxies.
//!
//! [`discovery`] reads the mesh's files (YAML in Kubernetes resource form:
//! Lumen's `Mesh` and Istio's networking kinds, in files or directories),
//! validates them together through `lumen-core`, and publishes immutable snapshots on a
//! `watch` channel; proxies swap their routing table when a new snapshot
//! arrives. An invalid edit is logged with file, field and reason, and the
//! last valid configuration stays in force.

pub mod discovery;

pub use discovery::{ControlError, FileDiscovery, load, load_file};
