//! Istio's AuthorizationPolicy at the inbound side: a request's (or a TCP
//! connection's) attributes as the policies ask for them, and the answer
//! Envoy's RBAC filter gives — `403 RBAC: access denied` (gRPC
//! `PERMISSION_DENIED`), the deciding policy in the row. A CUSTOM
//! policy's provider is Lumen's policy engine: its AccessPolicies on this
//! service decide, as its ext_authz service does for Envoy.

use std::net::IpAddr;

use http::HeaderMap;
use lumen_core::Workload;
use lumen_core::authz::{Attributes, Verdict};

use crate::context::{Connection, Shared};

/// Envoy's body for an RBAC denial.
pub const RBAC_DENIED: &str = "RBAC: access denied";

/// A request's attributes (`headers: None` for plain TCP).
pub struct RequestAttributes<'a> {
    pub conn: &'a Connection,
    pub app_port: Option<u16>,
    pub method: &'a str,
    pub path: &'a str,
    pub host: Option<&'a str>,
    pub headers: Option<&'a HeaderMap>,
    pub jwt: Option<&'a crate::jwt::Authenticated>,
}

impl Attributes for RequestAttributes<'_> {
    fn source_principal(&self) -> Option<&str> {
        self.conn
            .peer_identity
            .as_deref()
            .and_then(|p| p.strip_prefix("spiffe://"))
    }

    fn source_ip(&self) -> Option<IpAddr> {
        Some(self.conn.peer.ip())
    }

    fn remote_ip(&self) -> Option<IpAddr> {
        let forwarded = self
            .headers
            .and_then(|h| h.get("x-forwarded-for"))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok());
        forwarded.or(Some(self.conn.peer.ip()))
    }

    fn destination_ip(&self) -> Option<IpAddr> {
        Some(self.conn.local.ip())
    }

    fn destination_port(&self) -> Option<u16> {
        self.app_port
    }

    fn sni(&self) -> Option<&str> {
        None
    }

    fn http(&self) -> bool {
        self.headers.is_some()
    }

    fn host(&self) -> Option<&str> {
        self.host
    }

    fn method(&self) -> Option<&str> {
        self.headers.map(|_| self.method)
    }

    fn path(&self) -> Option<&str> {
        self.headers.map(|_| self.path)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers?.get(name)?.to_str().ok()
    }

    fn request_principal(&self) -> Option<&str> {
        self.jwt.map(|j| j.principal.as_str())
    }

    fn claim(&self, path: &[String]) -> Vec<String> {
        self.jwt.map(|j| j.claim(path)).unwrap_or_default()
    }
}

/// Why a request is refused: the policy to name in the row, and whether
/// the external authorizer (CUSTOM) refused it.
pub struct Refusal {
    pub policy: std::sync::Arc<str>,
    pub external: bool,
}

/// The inbound decision for `a`; `None` lets it through.
pub fn check(shared: &Shared, a: &RequestAttributes<'_>, source: &Workload) -> Option<Refusal> {
    let table = shared.routes.load();
    let policies = table.inbound_authz();
    if policies.is_empty() {
        return None;
    }
    match policies.decide(a) {
        Verdict::Allow => None,
        // Envoy words it rbac_access_denied_matched_policy[none].
        Verdict::Deny(policy) => Some(Refusal {
            policy: policy.unwrap_or_else(|| "none".into()).into(),
            external: false,
        }),
        Verdict::Custom(custom) => {
            // The policy engine: its AccessPolicies on this service.
            let mesh = table.mesh();
            let service =
                mesh.resolve_host(&shared.identity.service, &shared.identity.namespace)?;
            let denied = table
                .access(service)
                .iter()
                .find(|r| r.denies(&source.namespace, &source.workload));
            match denied {
                Some(rule) => Some(Refusal {
                    policy: rule.id.clone(),
                    external: true,
                }),
                None => {
                    tracing::trace!(policy = %custom, "CUSTOM authorization allowed by the policy engine");
                    None
                }
            }
        }
    }
}
