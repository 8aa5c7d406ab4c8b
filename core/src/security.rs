//! Istio's security API (`security.istio.io/v1`, also `v1beta1`):
//! `PeerAuthentication` — whether a workload's inbound side takes mesh
//! mTLS only (`STRICT`), mTLS and plaintext (`PERMISSIVE`) or plaintext
//! only (`DISABLE`) — and `RequestAuthentication` — which JWTs it accepts
//! — read as Istio's users write them.
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

/// Whether a policy in `policy_namespace` with `selector` applies to a
/// workload in `namespace` with `labels`, as Istio scopes its security
/// policies: from the root namespace mesh-wide, else in its own namespace;
/// a selector narrows it to the workloads whose labels it matches.
pub fn in_scope(
    policy_namespace: &str,
    selector: Option<&BTreeMap<String, String>>,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    (policy_namespace == ROOT_NAMESPACE || policy_namespace == namespace)
        && selector.is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Refuses Gateway API targets, which Lumen's policies do not take.
pub(crate) fn no_target_refs(
    at: &At<'_>,
    target_ref: &Option<serde_json::Value>,
    target_refs: &Option<serde_json::Value>,
) -> Result<(), ConfigError> {
    let why = "Gateway API targets; use selector";
    at.unsupported(target_ref, "targetRef", why)?;
    at.unsupported(target_refs, "targetRefs", why)
}

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

/// One validated RequestAuthentication: the JWTs a workload accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestAuthentication {
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub rules: Vec<JwtRule>,
}

impl RequestAuthentication {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether it applies to a workload in `namespace` with `labels`
    /// (mesh-wide from the root namespace, namespace-wide, or selected).
    pub fn applies(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        in_scope(&self.namespace, self.selector.as_ref(), namespace, labels)
    }
}

/// Where a token is looked for.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenLocation {
    /// A header, its value after `prefix` (`Authorization: Bearer …`).
    Header {
        name: String,
        prefix: String,
    },
    /// A query parameter.
    Param(String),
    Cookie(String),
}

/// Istio's `JWTRule`.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks_uri: Option<String>,
    /// An inline JSON Web Key Set.
    pub jwks: Option<String>,
    /// Istio's defaults (`Authorization: Bearer`, `access_token`) when the
    /// rule names none.
    pub locations: Vec<TokenLocation>,
    pub output_payload_to_header: Option<String>,
    pub forward_original_token: bool,
    /// (header, claim).
    pub output_claim_to_headers: Vec<(String, String)>,
    /// For fetching `jwks_uri`.
    pub timeout: std::time::Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RequestAuthenticationSpec {
    #[serde(default)]
    selector: Option<SelectorSpec>,
    #[serde(default)]
    target_ref: Option<serde_json::Value>,
    #[serde(default)]
    target_refs: Option<serde_json::Value>,
    #[serde(default)]
    jwt_rules: Vec<JwtRuleSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JwtRuleSpec {
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    jwks_uri: Option<String>,
    #[serde(default)]
    jwks: Option<String>,
    #[serde(default)]
    from_headers: Vec<HeaderSpec>,
    #[serde(default)]
    from_params: Vec<String>,
    #[serde(default)]
    from_cookies: Vec<String>,
    #[serde(default)]
    output_payload_to_header: Option<String>,
    #[serde(default)]
    forward_original_token: bool,
    #[serde(default)]
    output_claim_to_headers: Vec<ClaimHeaderSpec>,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderSpec {
    name: String,
    #[serde(default)]
    prefix: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimHeaderSpec {
    header: String,
    claim: String,
}

/// Istio's default for fetching a key set.
const JWKS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub fn validate_request_authentication(
    res: &Resource,
) -> Result<RequestAuthentication, ConfigError> {
    let spec: RequestAuthenticationSpec = res.spec()?;
    let at = At::spec(res);
    no_target_refs(&at, &spec.target_ref, &spec.target_refs)?;
    let mut rules = Vec::new();
    for (i, r) in spec.jwt_rules.into_iter().enumerate() {
        let at = at.at("jwtRules").at(format!("[{i}]"));
        if r.issuer.is_empty() {
            return Err(at.at("issuer").err("an issuer is required"));
        }
        if rules.iter().any(|x: &JwtRule| x.issuer == r.issuer) {
            return Err(at
                .at("issuer")
                .err(format!("`{}` has a rule already", r.issuer)));
        }
        match (&r.jwks_uri, &r.jwks) {
            (Some(_), Some(_)) => {
                return Err(at.err("jwksUri and jwks are exclusive; give one"));
            }
            (None, None) => {
                return Err(
                    at.err("needs jwksUri or jwks (Lumen does not discover keys from the issuer)")
                );
            }
            (Some(u), None) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                return Err(at
                    .at("jwksUri")
                    .err(format!("`{u}` is not an http:// or https:// URL")));
            }
            (None, Some(j)) => {
                let keys = serde_json::from_str::<serde_json::Value>(j)
                    .ok()
                    .and_then(|v| v.get("keys").and_then(|k| k.as_array()).map(Vec::len));
                if keys.is_none() {
                    return Err(at
                        .at("jwks")
                        .err("not a JSON Web Key Set (a JSON object with `keys`)"));
                }
            }
            _ => {}
        }
        let mut locations = Vec::new();
        for (j, h) in r.from_headers.into_iter().enumerate() {
            if !crate::policy::http_header_name(&h.name) {
                return Err(at
                    .at("fromHeaders")
                    .at(format!("[{j}]"))
                    .at("name")
                    .err(format!("`{}` is not a header name", h.name)));
            }
            locations.push(TokenLocation::Header {
                name: h.name.to_ascii_lowercase(),
                prefix: h.prefix,
            });
        }
        locations.extend(r.from_params.into_iter().map(TokenLocation::Param));
        locations.extend(r.from_cookies.into_iter().map(TokenLocation::Cookie));
        if locations.is_empty() {
            locations = vec![
                TokenLocation::Header {
                    name: "authorization".into(),
                    prefix: "Bearer ".into(),
                },
                TokenLocation::Param("access_token".into()),
            ];
        }
        for (field, h) in r
            .output_payload_to_header
            .iter()
            .map(|h| ("outputPayloadToHeader".to_string(), h))
            .chain(
                r.output_claim_to_headers
                    .iter()
                    .enumerate()
                    .map(|(j, c)| (format!("outputClaimToHeaders[{j}].header"), &c.header)),
            )
        {
            if !crate::policy::http_header_name(h) {
                return Err(at.at(field).err(format!("`{h}` is not a header name")));
            }
        }
        let timeout = match r.timeout {
            None => JWKS_TIMEOUT,
            Some(t) => humantime::parse_duration(&t).map_err(|e| {
                at.at("timeout")
                    .err(format!("`{t}` is not a duration: {e}"))
            })?,
        };
        rules.push(JwtRule {
            issuer: r.issuer,
            audiences: r.audiences,
            jwks_uri: r.jwks_uri,
            jwks: r.jwks,
            locations,
            output_payload_to_header: r.output_payload_to_header,
            forward_original_token: r.forward_original_token,
            output_claim_to_headers: r
                .output_claim_to_headers
                .into_iter()
                .map(|c| (c.header.to_ascii_lowercase(), c.claim))
                .collect(),
            timeout,
        });
    }
    Ok(RequestAuthentication {
        name: res.name.clone(),
        namespace: res.namespace.clone(),
        selector: spec.selector.map(|s| s.match_labels),
        rules,
    })
}
