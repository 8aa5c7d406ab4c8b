//! Lumen's policy resources (`policy.lumen.dev/v1alpha1`), validated like
//! Istio's: a field Lumen does not support is refused by name.
//!
//! `RateLimit`: requests per second and a burst for calls to a service
//! (optionally one method or path), per key — the caller's workload, a
//! header's value, or all callers together — enforced by every calling
//! sidecar with token buckets, no network hop per request.

use serde::Deserialize;

use crate::networking::{At, StringMatch, StringMatchSpec};
use crate::resource::{ConfigError, Resource};

pub use crate::resource::POLICY_API;

/// Whose requests share a bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// All callers of the target together (at each proxy).
    Global,
    /// Each calling workload (`namespace/workload`).
    SourceWorkload,
    /// Each value of this request header (lower case); requests without
    /// it share one bucket.
    Header(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    pub name: String,
    pub namespace: String,
    /// The service limited, as a VirtualService host names it.
    pub service: String,
    pub method: Option<StringMatch>,
    pub path: Option<StringMatch>,
    pub key: LimitKey,
    pub requests_per_second: f64,
    pub burst: u32,
    /// Count what would be limited, limit nothing.
    pub dry_run: bool,
    /// On only while this holds; `None`: always on.
    pub when: Option<Condition>,
}

/// When a conditional policy is on: while an alert (by name, and labels
/// if given) fires — an alert of Lumen's rules, or one an Alertmanager
/// posts — and for `cooldown` after it stops, so a limit does not flap.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub alert: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub cooldown: std::time::Duration,
}

/// How long a conditional policy stays on after its alert stops.
pub const DEFAULT_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(30);

impl RateLimit {
    /// `namespace/name`: how decisions, headers and rows name it.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    target: TargetSpec,
    #[serde(default)]
    key: Option<serde_json::Value>,
    requests_per_second: f64,
    #[serde(default)]
    burst: Option<u32>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    when: Option<WhenSpec>,
    #[serde(default)]
    cooldown: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WhenSpec {
    #[serde(default)]
    alert: Option<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    expr: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TargetSpec {
    service: String,
    #[serde(default)]
    method: Option<StringMatchSpec>,
    #[serde(default)]
    path: Option<StringMatchSpec>,
    #[serde(default)]
    route: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KeySpec {
    #[serde(default)]
    header: Option<String>,
}

pub fn validate_rate_limit(res: &Resource) -> Result<RateLimit, ConfigError> {
    let spec: Spec = res.spec()?;
    let at = At::spec(res);
    let when = match spec.when {
        None => {
            if spec.cooldown.is_some() {
                return Err(at
                    .at("cooldown")
                    .err("applies to conditional limits only (set `when`)"));
            }
            None
        }
        Some(w) => {
            let at = at.at("when");
            at.unsupported(
                &w.expr,
                "expr",
                "name an alert instead (write the expression as a rule in `lumen up --rules`)",
            )?;
            let alert = match w.alert {
                Some(a) if !a.trim().is_empty() => a,
                _ => {
                    return Err(at
                        .at("alert")
                        .err("name the alert that switches the limit on"));
                }
            };
            let cooldown = match spec.cooldown.as_deref() {
                None => DEFAULT_COOLDOWN,
                Some(c) => crate::networking::duration_field(c, &At::spec(res).at("cooldown"))?,
            };
            Some(Condition {
                alert,
                labels: w.labels,
                cooldown,
            })
        }
    };
    let target = at.at("target");
    target.unsupported(&spec.target.route, "route", "limit by `method` and `path`")?;
    if spec.target.service.trim().is_empty() {
        return Err(target.at("service").err("must name a service"));
    }
    let key = match &spec.key {
        None => LimitKey::Global,
        Some(serde_json::Value::String(s)) => match s.as_str() {
            "global" => LimitKey::Global,
            "sourceWorkload" => LimitKey::SourceWorkload,
            "sourcePrincipal" => {
                return Err(at.at("key").err(
                    "not supported by Lumen yet: sourcePrincipal needs mesh mTLS identities (use sourceWorkload)",
                ));
            }
            other => {
                return Err(at.at("key").err(format!(
                    "`{other}` is not a key; one of global, sourceWorkload, or {{header: NAME}}"
                )));
            }
        },
        Some(v) => {
            let k: KeySpec =
                serde_json::from_value(v.clone()).map_err(|e| at.at("key").err(e.to_string()))?;
            match k.header {
                Some(h) if http_header_name(&h) => LimitKey::Header(h.to_ascii_lowercase()),
                Some(h) => {
                    return Err(at
                        .at("key.header")
                        .err(format!("`{h}` is not a header name")));
                }
                None => {
                    return Err(at
                        .at("key")
                        .err("`{}`: name a header, or use global or sourceWorkload"));
                }
            }
        }
    };
    let rps = spec.requests_per_second;
    if !(rps.is_finite() && rps > 0.0) {
        return Err(at
            .at("requestsPerSecond")
            .err(format!("{rps} is not a rate; more than 0")));
    }
    // Istio-like default: a burst of one second's worth, at least one.
    let burst = spec.burst.unwrap_or(rps.ceil() as u32).max(1);
    Ok(RateLimit {
        name: res.name.clone(),
        namespace: res.namespace.clone(),
        service: spec.target.service,
        method: spec
            .target
            .method
            .map(|m| m.validate(&target.at("method")))
            .transpose()?
            .flatten(),
        path: spec
            .target
            .path
            .map(|m| m.validate(&target.at("path")))
            .transpose()?
            .flatten(),
        key,
        requests_per_second: rps,
        burst,
        dry_run: spec.dry_run,
        when,
    })
}

fn http_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use crate::MeshConfig;
    use crate::resource::parse_resources;

    const MESH: &str = "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec:\n  services:\n    - {name: ratings, port: 8080}\n---\n";

    fn limit(spec: &str) -> Result<MeshConfig, String> {
        let text = format!(
            "{MESH}apiVersion: policy.lumen.dev/v1alpha1\nkind: RateLimit\nmetadata: {{name: rl}}\nspec:\n{spec}"
        );
        let resources = parse_resources("l.yaml", &text).map_err(|e| e.to_string())?;
        MeshConfig::from_resources(&resources).map_err(|e| e.to_string())
    }

    #[test]
    fn rate_limits_validate_with_defaults() {
        let mesh =
            limit("  target: {service: ratings, method: {exact: GET}}\n  requestsPerSecond: 2.5\n")
                .unwrap();
        let rl = &mesh.rate_limits[0];
        assert_eq!(rl.burst, 3, "a second's worth by default");
        assert_eq!(rl.key, super::LimitKey::Global);
        let mesh = limit(
            "  target: {service: ratings}\n  key: {header: X-User}\n  requestsPerSecond: 1\n",
        )
        .unwrap();
        assert_eq!(
            mesh.rate_limits[0].key,
            super::LimitKey::Header("x-user".into())
        );
    }

    #[test]
    fn invalid_rate_limits_are_refused_by_field() {
        let cases = [
            (
                "  target: {service: nowhere}\n  requestsPerSecond: 1\n",
                "spec.target.service: no service `nowhere` in the mesh",
            ),
            (
                "  target: {service: ratings}\n  requestsPerSecond: -1\n",
                "spec.requestsPerSecond: -1 is not a rate",
            ),
            (
                "  target: {service: ratings}\n  requestsPerSecond: 1\n  key: sourcePrincipal\n",
                "spec.key: not supported by Lumen yet: sourcePrincipal",
            ),
            (
                "  target: {service: ratings}\n  requestsPerSecond: 1\n  key: everyone\n",
                "spec.key: `everyone` is not a key",
            ),
            (
                "  target: {service: ratings}\n  requestsPerSecond: 1\n  when: {expr: up}\n",
                "spec.when.expr: ",
            ),
            (
                "  target: {service: ratings}\n  requestsPerSecond: 1\n  cooldown: 5s\n",
                "spec.cooldown: applies to conditional limits only",
            ),
            (
                "  target: {service: ratings}\n  requestsPerSecond: 1\n  limit: 3\n",
                "unknown field `limit`",
            ),
        ];
        for (spec, want) in cases {
            let e = limit(spec).unwrap_err();
            assert!(
                e.contains("RateLimit default/rl") && e.contains(want),
                "{spec}\n got: {e}\nwant: {want}"
            );
        }
    }
}
