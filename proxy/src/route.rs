//! Routing: which service a request is for, from its authority and the
//! current mesh snapshot.

use std::sync::Arc;

use lumen_core::{Endpoint, MeshConfig, Service};

use crate::balance::RoundRobin;
use crate::retry::Budget;

/// The route every request of a service takes until routes are configurable.
pub const DEFAULT_ROUTE: &str = "default";

/// An immutable view of the mesh plus per-service balancer state; swapped
/// whole when the configuration changes, never mutated in place.
#[derive(Debug)]
pub struct RoutingTable {
    mesh: Arc<MeshConfig>,
    balancers: Vec<RoundRobin>,
    budgets: Vec<Budget>,
}

/// Why an outbound request has nowhere to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoute {
    /// No service of that name (404, `NR`).
    UnknownService,
    /// The service exists but has no endpoints (503, `UH`).
    NoEndpoints,
}

/// The service a request is for, in the table it was routed by (kept for
/// the request's life, so a config change mid-request changes nothing).
#[derive(Clone)]
pub struct Routed {
    table: Arc<RoutingTable>,
    index: usize,
}

impl Routed {
    pub fn service(&self) -> &Service {
        &self.table.mesh.services[self.index]
    }

    pub fn budget(&self) -> &Budget {
        &self.table.budgets[self.index]
    }

    /// The next endpoint by the balancer, avoiding those already tried
    /// while others remain (as Istio's `previous_hosts` retry predicate).
    pub fn pick(&self, tried: &[std::net::SocketAddr]) -> Option<&Endpoint> {
        let endpoints = &self.service().endpoints;
        let balancer = &self.table.balancers[self.index];
        let mut first = None;
        for _ in 0..endpoints.len() {
            let e = balancer.pick(endpoints)?;
            if !tried.contains(&e.address) {
                return Some(e);
            }
            first.get_or_insert(e);
        }
        first
    }
}

impl RoutingTable {
    pub fn new(mesh: Arc<MeshConfig>) -> Self {
        let balancers = mesh
            .services
            .iter()
            .map(|_| RoundRobin::default())
            .collect();
        let budgets = mesh.services.iter().map(|_| Budget::default()).collect();
        RoutingTable {
            mesh,
            balancers,
            budgets,
        }
    }

    pub fn mesh(&self) -> &Arc<MeshConfig> {
        &self.mesh
    }

    /// The service a transparently captured connection dialled (by its
    /// cluster IP), if it has somewhere to send to.
    pub fn route_address(self: &Arc<Self>, dst: std::net::SocketAddr) -> Result<Routed, NoRoute> {
        self.routed(self.mesh.index_by_address(dst))
    }

    /// The service `authority` names, if it has somewhere to send to.
    pub fn route(
        self: &Arc<Self>,
        authority: &str,
        caller_namespace: &str,
    ) -> Result<Routed, NoRoute> {
        self.routed(self.mesh.resolve_index(authority, caller_namespace))
    }

    fn routed(self: &Arc<Self>, index: Option<usize>) -> Result<Routed, NoRoute> {
        let index = index.ok_or(NoRoute::UnknownService)?;
        if self.mesh.services[index].endpoints.is_empty() {
            return Err(NoRoute::NoEndpoints);
        }
        Ok(Routed {
            table: self.clone(),
            index,
        })
    }
}
