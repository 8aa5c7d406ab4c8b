//! Routing: which service a request is for, from its authority and the
//! current mesh snapshot.

use std::sync::Arc;

use lumen_core::{Endpoint, MeshConfig, Service};

use crate::balance::RoundRobin;

/// The route every request of a service takes until routes are configurable.
pub const DEFAULT_ROUTE: &str = "default";

/// An immutable view of the mesh plus per-service balancer state; swapped
/// whole when the configuration changes, never mutated in place.
#[derive(Debug)]
pub struct RoutingTable {
    mesh: Arc<MeshConfig>,
    balancers: Vec<RoundRobin>,
}

/// Why an outbound request has nowhere to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoute {
    /// No service of that name (404, `NR`).
    UnknownService,
    /// The service exists but has no endpoints (503, `UH`).
    NoEndpoints,
}

/// Where the route phase sends a request.
pub struct Routed<'a> {
    pub service: &'a Service,
    pub endpoint: &'a Endpoint,
}

impl RoutingTable {
    pub fn new(mesh: Arc<MeshConfig>) -> Self {
        let balancers = mesh
            .services
            .iter()
            .map(|_| RoundRobin::default())
            .collect();
        RoutingTable { mesh, balancers }
    }

    pub fn mesh(&self) -> &Arc<MeshConfig> {
        &self.mesh
    }

    /// Resolves the authority (route) and picks an endpoint (balance).
    pub fn route(&self, authority: &str, caller_namespace: &str) -> Result<Routed<'_>, NoRoute> {
        let i = self
            .mesh
            .resolve_index(authority, caller_namespace)
            .ok_or(NoRoute::UnknownService)?;
        let service = &self.mesh.services[i];
        let endpoint = self.balancers[i]
            .pick(&service.endpoints)
            .ok_or(NoRoute::NoEndpoints)?;
        Ok(Routed { service, endpoint })
    }
}
