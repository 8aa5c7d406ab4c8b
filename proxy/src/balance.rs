//! Load balancing: which endpoint of a service gets the next request.

use std::sync::atomic::{AtomicUsize, Ordering};

use lumen_core::Endpoint;

/// Round-robin over a service's endpoints. One cursor per service, so calls
/// to different services do not skew each other's rotation.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn pick<'a>(&self, endpoints: &'a [Endpoint]) -> Option<&'a Endpoint> {
        if endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Some(&endpoints[i % endpoints.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(port: u16) -> Endpoint {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        Endpoint {
            address,
            address_str: address.to_string().into(),
            workload: "w".into(),
            version: "v1".into(),
        }
    }

    #[test]
    fn rotates_evenly_and_handles_no_endpoints() {
        let rr = RoundRobin::default();
        let eps = [endpoint(1), endpoint(2), endpoint(3)];
        let picks: Vec<u16> = (0..6)
            .map(|_| rr.pick(&eps).unwrap().address.port())
            .collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3]);
        assert!(rr.pick(&[]).is_none());
    }
}
