//! `Sidecar`: Istio's per-workload proxy settings. Lumen takes its
//! `outboundTrafficPolicy` — whether a workload may call hosts outside the
//! service registry (`ALLOW_ANY`, Istio's default) or only the mesh's
//! services and ServiceEntry hosts (`REGISTRY_ONLY`, an egress allow-list).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{At, labels};
use crate::resource::{ConfigError, Resource};

/// Where a workload's calls to hosts outside the registry may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutboundMode {
    /// Through to where they were going (Istio's `PassthroughCluster`).
    #[default]
    AllowAny,
    /// Refused (Istio's `BlackHoleCluster`): only services of the mesh and
    /// ServiceEntry hosts are reachable.
    RegistryOnly,
}

impl OutboundMode {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundMode::AllowAny => "ALLOW_ANY",
            OutboundMode::RegistryOnly => "REGISTRY_ONLY",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sidecar {
    pub name: String,
    pub namespace: String,
    /// `workloadSelector.labels`; `None`: the namespace's default (the
    /// mesh's, in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub outbound: Option<OutboundMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    workload_selector: Option<SelectorSpec>,
    #[serde(default)]
    outbound_traffic_policy: Option<PolicySpec>,
    #[serde(default)]
    ingress: Option<serde_json::Value>,
    #[serde(default)]
    egress: Option<serde_json::Value>,
    #[serde(default)]
    inbound_connection_pool: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorSpec {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Istio's `OutboundTrafficPolicy` (also MeshConfig's).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PolicySpec {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    egress_proxy: Option<serde_json::Value>,
}

impl PolicySpec {
    pub(crate) fn validate(self, at: &At<'_>) -> Result<OutboundMode, ConfigError> {
        at.unsupported(
            &self.egress_proxy,
            "egressProxy",
            "calls outside the registry go through or are refused",
        )?;
        match self.mode.as_deref() {
            None | Some("ALLOW_ANY") => Ok(OutboundMode::AllowAny),
            Some("REGISTRY_ONLY") => Ok(OutboundMode::RegistryOnly),
            Some(other) => Err(at
                .at("mode")
                .err(format!("`{other}` is not REGISTRY_ONLY or ALLOW_ANY"))),
        }
    }
}

pub fn validate(res: &Resource) -> Result<Sidecar, ConfigError> {
    let spec: Spec = res.spec()?;
    let at = At::spec(res);
    let why =
        "Lumen's sidecars take every service of the registry; only outboundTrafficPolicy is read";
    at.unsupported(&spec.egress, "egress", why)?;
    at.unsupported(&spec.ingress, "ingress", why)?;
    at.unsupported(
        &spec.inbound_connection_pool,
        "inboundConnectionPool",
        "the inbound side's limits are `lumen proxy` flags",
    )?;
    let selector = match spec.workload_selector {
        None => None,
        Some(s) => Some(labels(s.labels, &at.at("workloadSelector.labels"))?),
    };
    let outbound = match spec.outbound_traffic_policy {
        None => None,
        Some(p) => Some(p.validate(&at.at("outboundTrafficPolicy"))?),
    };
    Ok(Sidecar {
        name: res.name.clone(),
        namespace: res.namespace.clone(),
        selector,
        outbound,
    })
}

/// The outbound mode of a workload in `namespace` with `labels`: from its
/// Sidecar as Istio picks one (a selector matching it in its namespace,
/// else its namespace's default, else the root namespace's), else the
/// mesh's.
pub fn outbound_mode(
    sidecars: &[Sidecar],
    mesh_default: OutboundMode,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> OutboundMode {
    let selected = sidecars.iter().find(|s| {
        s.namespace == namespace
            && s.selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
    });
    let default_of = |ns: &str| {
        sidecars
            .iter()
            .find(|s| s.namespace == ns && s.selector.is_none())
    };
    selected
        .or_else(|| default_of(namespace))
        .or_else(|| default_of(crate::security::ROOT_NAMESPACE))
        .and_then(|s| s.outbound)
        .unwrap_or(mesh_default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::parse_resources;

    fn sidecar(yaml: &str) -> Result<Sidecar, ConfigError> {
        let text = format!("apiVersion: networking.istio.io/v1\nkind: Sidecar\n{yaml}");
        validate(&parse_resources("s.yaml", &text)?[0])
    }

    #[test]
    fn the_workloads_sidecar_decides_then_its_namespace_then_the_mesh() {
        let ns_default = sidecar("metadata: {name: default, namespace: shop}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n").unwrap();
        let open = sidecar("metadata: {name: open, namespace: shop}\nspec:\n  workloadSelector: {labels: {app: crawler}}\n  outboundTrafficPolicy: {mode: ALLOW_ANY}\n").unwrap();
        let root = sidecar("metadata: {name: default, namespace: istio-system}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n").unwrap();
        let app = |a: &str| BTreeMap::from([("app".to_string(), a.to_string())]);
        let all = [ns_default, open, root.clone()];
        assert_eq!(
            outbound_mode(&all, OutboundMode::AllowAny, "shop", &app("cart")),
            OutboundMode::RegistryOnly
        );
        assert_eq!(
            outbound_mode(&all, OutboundMode::AllowAny, "shop", &app("crawler")),
            OutboundMode::AllowAny
        );
        assert_eq!(
            outbound_mode(&[root], OutboundMode::AllowAny, "other", &app("x")),
            OutboundMode::RegistryOnly
        );
        assert_eq!(
            outbound_mode(&[], OutboundMode::RegistryOnly, "other", &app("x")),
            OutboundMode::RegistryOnly
        );
    }

    #[test]
    fn what_lumen_does_not_read_is_refused_by_name() {
        let e =
            sidecar("metadata: {name: s}\nspec:\n  egress: [{hosts: [\"./*\"]}]\n").unwrap_err();
        assert_eq!(e.field, "spec.egress", "{e}");
        let e = sidecar("metadata: {name: s}\nspec:\n  outboundTrafficPolicy: {mode: BLOCK}\n")
            .unwrap_err();
        assert_eq!(e.field, "spec.outboundTrafficPolicy.mode", "{e}");
    }
}
