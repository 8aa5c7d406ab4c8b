//! Workload identities as Istio names them: SPIFFE ids
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, carried
//! as a URI SAN in every workload certificate; Istio's *principal* is the
//! same without `spiffe://` (`cluster.local/ns/default/sa/bookinfo-reviews`),
//! which is what AuthorizationPolicies and the `source_principal` column say.

use std::fmt;

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Kubernetes' service account when a pod names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// One workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{id:?} is not a workload SPIFFE id (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>): {why}"
)]
pub struct BadSpiffeId {
    pub id: String,
    pub why: &'static str,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// Parses `spiffe://td/ns/NS/sa/SA`.
    pub fn parse(id: &str) -> Result<Self, BadSpiffeId> {
        let bad = |why| BadSpiffeId { id: id.into(), why };
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("it must start with spiffe://"))?;
        Self::parse_principal(rest).map_err(|e| bad(e.why))
    }

    /// Parses Istio's principal form, `td/ns/NS/sa/SA`.
    pub fn parse_principal(p: &str) -> Result<Self, BadSpiffeId> {
        let bad = |why| BadSpiffeId { id: p.into(), why };
        let parts: Vec<&str> = p.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(SpiffeId::new(td, ns, sa))
            }
            _ => Err(bad(
                "expected <trust-domain>/ns/<namespace>/sa/<service-account>",
            )),
        }
    }

    /// Istio's principal: the id without `spiffe://`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

/// A name that may stand in a SPIFFE id's path segment or a trust domain:
/// what a Kubernetes name may be (lowercase letters, digits, `-`, `.`).
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The URI SANs of a DER certificate (none when it does not parse).
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// The SPIFFE id a DER certificate carries, if any.
pub fn spiffe_of(der: &[u8]) -> Option<SpiffeId> {
    uri_sans(der).iter().find_map(|u| SpiffeId::parse(u).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_principals_round_trip() {
        let id = SpiffeId::new("cluster.local", "default", "bookinfo-reviews");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
        );
        assert_eq!(
            id.principal(),
            "cluster.local/ns/default/sa/bookinfo-reviews"
        );
        assert_eq!(SpiffeId::parse(&id.to_string()), Ok(id.clone()));
        assert_eq!(SpiffeId::parse_principal(&id.principal()), Ok(id));
        assert!(SpiffeId::parse("cluster.local/ns/a/sa/b").is_err());
        assert!(SpiffeId::parse("spiffe://cluster.local/ns/a/sa/").is_err());
        assert!(SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b/c").is_err());
        assert!(valid_segment("bookinfo-reviews"));
        assert!(!valid_segment("Bad_Name"));
    }
}
