//! Istio's security API (`security.istio.io/v1`, also `v1beta1`):
//! `PeerAuthentication` — whether a workload's inbound side takes mesh
//! mTLS only (`STRICT`), mTLS and plaintext (`PERMISSIVE`) or plaintext
//! only (`DISABLE`) — read as Istio's users write it.
//!
//! Scope and precedence are Istio's: a policy in the root namespace
//! (`istio-system`) without a selector is mesh-wide, one without a selector
//! in another namespace covers that namespace, one with a selector covers
//! the workloads whose labels it matches; the narrowest wins, `UNSET`
//! inherits from the next wider, and with none at all the mode is
//! `PERMISSIVE`. `portLevelMtls` (with a selector only, as Istio requires)
//! overrides the mode for the workload's port.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::networking::At;
use crate::resource::{ConfigError, Resource};

/// Istio's root namespace: its selector-less policies are mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// What a workload's inbound side accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MtlsMode {
    /// Mesh mTLS and plaintext, the row saying which (Istio's default).
    #[default]
    Permissive,
    /// Mesh mTLS only.
    Strict,
    /// Plaintext only: mesh mTLS is not terminated.
    Disable,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
            MtlsMode::Disable => "DISABLE",
        }
    }
}

/// One validated PeerAuthentication.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    /// `matchLabels`; `None` for a namespace- or mesh-wide policy.
    pub selector: Option<BTreeMap<String, String>>,
    /// `None` for `UNSET` (or no `mtls`): inherited.
    pub mode: Option<MtlsMode>,
    /// By the workload's port; `None` inherits the policy's mode.
    pub port_level: BTreeMap<u16, Option<MtlsMode>>,
}

impl PeerAuthentication {
    fn mesh_wide(&self) -> bool {
        self.namespace == ROOT_NAMESPACE && self.selector.is_none()
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .as_ref()
            .is_some_and(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

/// The mode in force for a workload in `namespace` with `labels`, on its
/// `port` (the app's port, as Istio's `portLevelMtls` keys it).
pub fn mtls_mode(
    policies: &[PeerAuthentication],
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: Option<u16>,
) -> MtlsMode {
    // Istio: among several of one scope, the oldest wins; files keep no
    // creation time, so the first listed does.
    let mesh = policies.iter().find(|p| p.mesh_wide());
    let ns = policies
        .iter()
        .find(|p| p.namespace == namespace && p.selector.is_none() && !p.mesh_wide());
    let workload = policies
        .iter()
        .find(|p| p.namespace == namespace && p.selects(labels));
    let mut mode = MtlsMode::default();
    for p in [mesh, ns].into_iter().flatten() {
        if let Some(m) = p.mode {
            mode = m;
        }
    }
    if let Some(w) = workload {
        if let Some(m) = w.mode {
            mode = m;
        }
        if let Some(m) = port.and_then(|p| w.port_level.get(&p)).copied().flatten() {
            mode = m;
        }
    }
    mode
}

// ---- Istio's schema ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PeerAuthenticationSpec {
    #[serde(default)]
    selector: Option<SelectorSpec>,
    #[serde(default)]
    mtls: Option<MtlsSpec>,
    #[serde(default)]
    port_level_mtls: BTreeMap<String, MtlsSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SelectorSpec {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MtlsSpec {
    #[serde(default)]
    mode: Option<String>,
}

fn mode(spec: Option<&MtlsSpec>, at: &At<'_>) -> Result<Option<MtlsMode>, ConfigError> {
    match spec.and_then(|m| m.mode.as_deref()) {
        None | Some("UNSET") => Ok(None),
        Some("PERMISSIVE") => Ok(Some(MtlsMode::Permissive)),
        Some("STRICT") => Ok(Some(MtlsMode::Strict)),
        Some("DISABLE") => Ok(Some(MtlsMode::Disable)),
        Some(other) => Err(at.at("mode").err(format!(
            "`{other}` is not UNSET, DISABLE, PERMISSIVE or STRICT"
        ))),
    }
}

pub fn validate_peer_authentication(res: &Resource) -> Result<PeerAuthentication, ConfigError> {
    let spec: PeerAuthenticationSpec = res.spec()?;
    let at = At::spec(res);
    let selector = spec.selector.map(|s| s.match_labels);
    if !spec.port_level_mtls.is_empty() && selector.is_none() {
        return Err(at.at("portLevelMtls").err(
            "needs a workload selector (Istio applies port-level mTLS to selected workloads only)",
        ));
    }
    let mut port_level = BTreeMap::new();
    for (port, m) in &spec.port_level_mtls {
        let here = at.at("portLevelMtls").at(port);
        let p: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| here.err(format!("`{port}` is not a port number (1-65535)")))?;
        port_level.insert(p, mode(Some(m), &here)?);
    }
    Ok(PeerAuthentication {
        name: res.name.clone(),
        namespace: res.namespace.clone(),
        selector,
        mode: mode(spec.mtls.as_ref(), &at.at("mtls"))?,
        port_level,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::parse_resources;

    fn pa(text: &str) -> Result<Vec<PeerAuthentication>, String> {
        let rs = parse_resources("pa.yaml", text).map_err(|e| e.to_string())?;
        rs.iter()
            .map(|r| validate_peer_authentication(r).map_err(|e| e.to_string()))
            .collect()
    }

    fn labels(app: &str) -> BTreeMap<String, String> {
        [("app".to_string(), app.to_string())].into()
    }

    // Istio's own examples (istio.io, "PeerAuthentication" reference).
    const ISTIO_EXAMPLES: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: foo
spec:
  mtls:
    mode: PERMISSIVE
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: finance
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
"#;

    #[test]
    fn narrowest_scope_wins_and_ports_override() {
        let p = pa(ISTIO_EXAMPLES).unwrap();
        assert_eq!(mtls_mode(&p, "bar", &labels("x"), None), MtlsMode::Strict);
        assert_eq!(
            mtls_mode(&p, "foo", &labels("x"), None),
            MtlsMode::Permissive
        );
        assert_eq!(
            mtls_mode(&p, "foo", &labels("finance"), Some(9000)),
            MtlsMode::Strict
        );
        assert_eq!(
            mtls_mode(&p, "foo", &labels("finance"), Some(8080)),
            MtlsMode::Disable
        );
        assert_eq!(
            mtls_mode(&[], "foo", &labels("x"), None),
            MtlsMode::Permissive
        );
    }

    #[test]
    fn unset_inherits_and_bad_values_are_refused() {
        let p = pa("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: b, namespace: foo}\nspec: {mtls: {mode: UNSET}}\n").unwrap();
        assert_eq!(mtls_mode(&p, "foo", &labels("x"), None), MtlsMode::Strict);
        let err = pa("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: {mtls: {mode: STRIKT}}\n").unwrap_err();
        assert!(
            err.contains("spec.mtls.mode") && err.contains("STRIKT"),
            "{err}"
        );
        let err = pa("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: {portLevelMtls: {8080: {mode: DISABLE}}}\n").unwrap_err();
        assert!(err.contains("needs a workload selector"), "{err}");
        let err = pa("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: {mtls: {mode: STRICT, extra: 1}}\n").unwrap_err();
        assert!(err.contains("extra"), "{err}");
    }
}
