//! Resources in Kubernetes form (`apiVersion`, `kind`, `metadata`, `spec`),
//! as files hold them and as the control plane stores and streams them.
//!
//! A file is split into [`Resource`]s here, each with its envelope checked
//! (a known `apiVersion` for its kind, a name) and its spec kept as JSON
//! until the kind's own validation types it. The control plane keys them by
//! [`ResourceKey`] — kind, namespace, name — so applying a resource of the
//! same key replaces it, as `kubectl apply` does.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A configuration problem: which file, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    /// `Kind namespace/name` of the resource at fault; empty for problems
    /// of the file itself.
    pub resource: String,
    /// Dotted path of the offending field; empty for whole-file problems.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file)?;
        if !self.resource.is_empty() {
            write!(f, "{}: ", self.resource)?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.reason)
    }
}

/// The `apiVersion` of Lumen's own kinds.
pub const LUMEN_API: &str = "lumen.dev/v1alpha1";
/// The `apiVersion` of Lumen's policy kinds (`RateLimit`).
pub const POLICY_API: &str = "policy.lumen.dev/v1alpha1";
/// Istio's networking group; `v1`, `v1beta1` and `v1alpha3` share one schema.
pub const ISTIO_NETWORKING_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];
/// Istio's security group.
pub const ISTIO_SECURITY_VERSIONS: [&str; 2] =
    ["security.istio.io/v1", "security.istio.io/v1beta1"];
/// Namespace of resources and services that do not name one, as in Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The kinds Lumen reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// Lumen's local service registry (what Istio takes from Kubernetes).
    Mesh,
    /// The query service's settings.
    QueryService,
    VirtualService,
    DestinationRule,
    ServiceEntry,
    Gateway,
    /// Istio's per-workload proxy settings (`outboundTrafficPolicy`).
    Sidecar,
    /// Lumen's rate limit (`policy.lumen.dev`).
    RateLimit,
    /// Lumen's conditional deny / allow-only of sources (`policy.lumen.dev`).
    AccessPolicy,
    /// Lumen's mesh-wide request quota (`policy.lumen.dev`).
    Quota,
    /// Istio's inbound mTLS mode (`security.istio.io`).
    PeerAuthentication,
    /// Istio's access control (`security.istio.io`).
    AuthorizationPolicy,
    /// Istio's JWT validation (`security.istio.io`).
    RequestAuthentication,
}

impl Kind {
    pub const ALL: [Kind; 13] = [
        Kind::Mesh,
        Kind::QueryService,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::ServiceEntry,
        Kind::Gateway,
        Kind::Sidecar,
        Kind::RateLimit,
        Kind::AccessPolicy,
        Kind::Quota,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::RequestAuthentication,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Mesh => "Mesh",
            Kind::QueryService => "QueryService",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::Gateway => "Gateway",
            Kind::Sidecar => "Sidecar",
            Kind::RateLimit => "RateLimit",
            Kind::AccessPolicy => "AccessPolicy",
            Kind::Quota => "Quota",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RequestAuthentication => "RequestAuthentication",
        }
    }

    /// A kind by its name, its plural or a short name, as `kubectl get` takes
    /// them (`virtualservice`, `virtualservices`, `vs`, `dr`, `se`, `gw`).
    pub fn parse(s: &str) -> Option<Kind> {
        let lower = s.to_ascii_lowercase();
        let lower = lower.split('.').next().unwrap_or("");
        Some(match lower {
            "mesh" | "meshes" => Kind::Mesh,
            "queryservice" | "queryservices" => Kind::QueryService,
            "virtualservice" | "virtualservices" | "vs" => Kind::VirtualService,
            "destinationrule" | "destinationrules" | "dr" => Kind::DestinationRule,
            "serviceentry" | "serviceentries" | "se" => Kind::ServiceEntry,
            "gateway" | "gateways" | "gw" => Kind::Gateway,
            "sidecar" | "sidecars" => Kind::Sidecar,
            "ratelimit" | "ratelimits" | "rl" => Kind::RateLimit,
            "accesspolicy" | "accesspolicies" | "acp" => Kind::AccessPolicy,
            "quota" | "quotas" => Kind::Quota,
            // Istio's short names.
            "peerauthentication" | "peerauthentications" | "pa" => Kind::PeerAuthentication,
            "authorizationpolicy" | "authorizationpolicies" | "ap" => Kind::AuthorizationPolicy,
            "requestauthentication" | "requestauthentications" | "ra" => {
                Kind::RequestAuthentication
            }
            _ => return None,
        })
    }

    /// The `apiVersion`s a resource of this kind may carry.
    pub fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::Mesh | Kind::QueryService => &[LUMEN_API],
            Kind::RateLimit | Kind::AccessPolicy | Kind::Quota => &[POLICY_API],
            Kind::PeerAuthentication | Kind::AuthorizationPolicy | Kind::RequestAuthentication => {
                &ISTIO_SECURITY_VERSIONS
            }
            _ => &ISTIO_NETWORKING_VERSIONS,
        }
    }

    /// Whether the kind is part of the mesh's routing configuration (the
    /// query service's settings are not).
    pub fn is_mesh_config(self) -> bool {
        self != Kind::QueryService
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What identifies a resource: applying another with the same key replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// One resource: its envelope checked, its spec not yet typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    pub api_version: String,
    pub kind: Kind,
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub spec: serde_json::Value,
    /// Where it came from, for errors: the file (as its user named it).
    pub origin: String,
    /// `document N: ` when its file holds several, so field paths say which.
    #[serde(default)]
    pub prefix: String,
}

impl Resource {
    pub fn key(&self) -> ResourceKey {
        ResourceKey {
            kind: self.kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// An error about this resource's `field` (a path under the resource,
    /// such as `spec.http[0].route`).
    pub fn error(&self, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.origin.clone(),
            resource: self.key().to_string(),
            field: format!("{}{}", self.prefix, field.into()),
            reason: reason.into(),
        }
    }

    /// The spec as `T`; errors name the field under `spec.`.
    pub fn spec<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        // `spec:` left empty means "all defaults", as an empty mapping would.
        let spec = match &self.spec {
            serde_json::Value::Null => serde_json::Value::Object(Default::default()),
            v => without_nulls(v.clone()),
        };
        serde_path_to_error::deserialize(spec).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "spec".to_string()
            } else {
                format!("spec.{path}")
            };
            self.error(field, e.inner().to_string())
        })
    }
}

/// `key:` left empty is unset, as Kubernetes reads it, not a null the
/// field's type must take.
fn without_nulls(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(without_nulls).collect())
        }
        v => v,
    }
}

/// A version naming a set of resources by their content (order aside):
/// the same resources give the same version in every process and across
/// restarts, so a proxy that already runs them is seen to.
pub fn content_version(resources: &[Resource]) -> String {
    let mut keyed: Vec<(ResourceKey, String)> = resources
        .iter()
        .map(|r| {
            (
                r.key(),
                format!("{}|{}|{:?}", r.api_version, r.spec, r.labels),
            )
        })
        .collect();
    keyed.sort();
    let mut text = String::new();
    for (k, v) in keyed {
        text.push_str(&format!("{k}\n{v}\n"));
    }
    format!("{:016x}", twox_hash::XxHash64::oneshot(0, text.as_bytes()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Envelope {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: serde_json::Value,
    /// What a cluster reports back (`kubectl get -o yaml` prints it); not
    /// configuration, so it is read and left alone.
    #[serde(default)]
    #[allow(dead_code)]
    status: serde_json::Value,
}

/// Kubernetes metadata. Fields a cluster fills in (`uid`,
/// `resourceVersion`, `creationTimestamp`, …) are accepted and ignored, so a
/// resource exported with `kubectl get -o yaml` applies as is.
#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

/// Splits a file into its resources (`---`-separated documents, empty ones
/// skipped), checking each one's envelope. `file` names it in errors.
pub fn parse_resources(file: &str, text: &str) -> Result<Vec<Resource>, ConfigError> {
    let err = |field: String, reason: String| ConfigError {
        file: file.to_string(),
        resource: String::new(),
        field,
        reason,
    };
    let mut out = Vec::new();
    for (d, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        // Field paths name the document only when the file has several.
        let prefix = if d == 0 {
            String::new()
        } else {
            format!("document {}: ", d + 1)
        };
        let value: serde_json::Value = serde_json::Value::deserialize(doc)
            .map_err(|e| err(String::new(), format!("{prefix}invalid YAML: {e}")))?;
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        let env: Envelope = serde_path_to_error::deserialize(value)
            .map_err(|e| err(format!("{prefix}{}", e.path()), e.inner().to_string()))?;
        let Some(kind) = Kind::ALL.into_iter().find(|k| k.as_str() == env.kind) else {
            let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            return Err(err(
                format!("{prefix}kind"),
                format!(
                    "unknown kind `{}`; Lumen reads {}",
                    env.kind,
                    known.join(", ")
                ),
            ));
        };
        if !kind.api_versions().contains(&env.api_version.as_str()) {
            return Err(err(
                format!("{prefix}apiVersion"),
                format!(
                    "`{}` is not supported for {kind}, expected {}",
                    env.api_version,
                    kind.api_versions()
                        .iter()
                        .map(|v| format!("`{v}`"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            ));
        }
        if env.metadata.name.trim().is_empty() {
            return Err(err(
                format!("{prefix}metadata.name"),
                "must not be empty".into(),
            ));
        }
        let namespace = env
            .metadata
            .namespace
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
        for (field, value) in [("name", &env.metadata.name), ("namespace", &namespace)] {
            check_name(value).map_err(|r| err(format!("{prefix}metadata.{field}"), r))?;
        }
        out.push(Resource {
            api_version: env.api_version,
            kind,
            name: env.metadata.name,
            namespace,
            labels: env.metadata.labels.unwrap_or_default(),
            spec: env.spec,
            origin: file.to_string(),
            prefix,
        });
    }
    Ok(out)
}

/// A DNS-1123 subdomain, as Kubernetes requires of object names.
fn check_name(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{value}` is not a valid name: use lower-case letters, digits, '-' or '.', \
             starting and ending with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_checked_per_kind() {
        let rs = parse_resources(
            "f.yaml",
            "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata:\n  name: reviews\n  namespace: prod\n  resourceVersion: \"12\"\nspec:\n  hosts: [reviews]\nstatus: {}\n---\n",
        )
        .unwrap();
        assert_eq!(rs.len(), 1);
        assert_eq!(rs[0].key().to_string(), "VirtualService prod/reviews");

        let e = parse_resources(
            "f.yaml",
            "apiVersion: lumen.dev/v1alpha1\nkind: VirtualService\nmetadata:\n  name: a\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "apiVersion");
        assert!(e.reason.contains("networking.istio.io/v1"), "{e}");

        let e = parse_resources(
            "f.yaml",
            "apiVersion: networking.istio.io/v1\nkind: EnvoyFilter\nmetadata:\n  name: a\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "kind");
        assert!(e.reason.contains("`EnvoyFilter`"), "{e}");

        let e = parse_resources(
            "f.yaml",
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: Bad_Name\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "metadata.name");
    }

    #[test]
    fn kinds_parse_as_kubectl_names_them() {
        assert_eq!(Kind::parse("vs"), Some(Kind::VirtualService));
        assert_eq!(
            Kind::parse("destinationrules.networking.istio.io"),
            Some(Kind::DestinationRule)
        );
        assert_eq!(Kind::parse("Gateway"), Some(Kind::Gateway));
        assert_eq!(Kind::parse("pods"), None);
    }
}
