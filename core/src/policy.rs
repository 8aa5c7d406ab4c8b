//! Lumen's policy resources (`policy.lumen.dev/v1alpha1`), validated like
//! Istio's: a field Lumen does not support is refused by name.
//!
//! `RateLimit`: requests per second and a burst for calls to a service
//! (optionally one method or path), per key — the caller's workload, a
//! header's value, or all callers together — enforced by every calling
//! sidecar with token buckets, no network hop per request.
//!
//! `AccessPolicy`: deny the sources it lists (or allow only them) to call
//! a service; conditional ones deny while an alert fires, and may take
//! the sources to deny from the alert's labels (`source_workload`,
//! `source_workload_namespace`) — blocking a caller whose error or request
//! rate crossed a line, for at most a TTL.
//!
//! A conditional policy says what proxies do once they have heard nothing
//! from the policy engine for a while (`failMode`): open (off) or closed
//! (on).

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
    /// Each caller's mTLS identity (its SPIFFE id; callers without a
    /// certificate share one bucket).
    SourcePrincipal,
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
    pub fail_mode: FailMode,
    /// The descriptor Envoy's rate-limit filter sends for it, when Lumen
    /// serves an Envoy fleet as its rate-limit service.
    pub envoy: Option<EnvoyDescriptor>,
}

/// A descriptor in envoyproxy/ratelimit's config model: the domain and the
/// entries, in order; an entry without a value matches any value (each
/// value counted apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyDescriptor {
    pub domain: String,
    pub entries: Vec<(String, Option<String>)>,
}

impl EnvoyDescriptor {
    /// Whether a request's descriptor (domain, entries) is this one; the
    /// counter key is its values.
    pub fn matches<'e>(
        &self,
        domain: &str,
        entries: impl ExactSizeIterator<Item = (&'e str, &'e str)>,
    ) -> bool {
        if domain != self.domain || entries.len() != self.entries.len() {
            return false;
        }
        entries
            .zip(&self.entries)
            .all(|((k, v), (key, value))| k == key && value.as_deref().is_none_or(|want| want == v))
    }
}

/// What a conditional policy does when the policy engine's decisions are
/// stale (the control plane unreachable for longer than the proxy's
/// `--policy-staleness`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailMode {
    /// Off: traffic flows as if the condition did not hold.
    #[default]
    Open,
    /// On, as if the condition held (an AccessPolicy taking its sources
    /// from alerts keeps denying the last ones it was told).
    Closed,
}

impl FailMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        }
    }
}

/// The window a `Quota` counts in: fixed, aligned to UTC (as Envoy's
/// rate-limit service counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaPeriod {
    Minute,
    Hour,
    Day,
}

impl QuotaPeriod {
    pub fn secs(self) -> i64 {
        match self {
            QuotaPeriod::Minute => 60,
            QuotaPeriod::Hour => 3600,
            QuotaPeriod::Day => 86_400,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QuotaPeriod::Minute => "minute",
            QuotaPeriod::Hour => "hour",
            QuotaPeriod::Day => "day",
        }
    }
}

/// N requests per minute / hour / day per key, across every calling
/// proxy: each admits against the allowance the control plane gives it
/// from everyone's reported usage.
#[derive(Debug, Clone, PartialEq)]
pub struct Quota {
    pub name: String,
    pub namespace: String,
    pub service: String,
    pub method: Option<StringMatch>,
    pub path: Option<StringMatch>,
    pub key: LimitKey,
    pub limit: u64,
    pub per: QuotaPeriod,
    pub envoy: Option<EnvoyDescriptor>,
}

impl Quota {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Start (Unix seconds) of the window `now` falls in.
    pub fn window_start(&self, now: i64) -> i64 {
        now.div_euclid(self.per.secs()) * self.per.secs()
    }
}

/// Whether an AccessPolicy denies its sources or allows only them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessAction {
    Deny,
    AllowOnly,
}

/// A calling workload, by namespace and/or workload name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceMatch {
    pub namespace: Option<String>,
    pub workload: Option<String>,
}

impl SourceMatch {
    pub fn matches(&self, namespace: &str, workload: &str) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self.workload.as_deref().is_none_or(|w| w == workload)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AccessPolicy {
    pub name: String,
    pub namespace: String,
    pub service: String,
    pub action: AccessAction,
    /// Listed sources; empty: the sources the firing alert names.
    pub sources: Vec<SourceMatch>,
    pub when: Option<Condition>,
    /// Longest one episode holds, even if its alert keeps firing; it
    /// comes back only once the alert has stopped and fires again.
    pub ttl: Option<std::time::Duration>,
    pub fail_mode: FailMode,
}

impl AccessPolicy {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the sources come from the alert rather than a list.
    pub fn sources_from_alert(&self) -> bool {
        self.sources.is_empty()
    }
}

/// How a decision names an AccessPolicy switched on for one source the
/// alert named: `namespace/name#source-namespace/source-workload`.
pub fn source_decision(policy: &str, namespace: &str, workload: &str) -> String {
    format!("{policy}#{namespace}/{workload}")
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
struct AccessSpec {
    target: TargetSpec,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    sources: Vec<SourceSpec>,
    #[serde(default)]
    when: Option<WhenSpec>,
    #[serde(default)]
    cooldown: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    fail_mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SourceSpec {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    workload: Option<String>,
    #[serde(default)]
    principal: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct QuotaSpec {
    target: TargetSpec,
    #[serde(default)]
    key: Option<serde_json::Value>,
    limit: u64,
    per: String,
    #[serde(default)]
    envoy: Option<EnvoySpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EnvoySpec {
    domain: String,
    descriptor: Vec<EntrySpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EntrySpec {
    key: String,
    #[serde(default)]
    value: Option<String>,
}

fn envoy_descriptor(
    spec: Option<EnvoySpec>,
    at: &At<'_>,
) -> Result<Option<EnvoyDescriptor>, ConfigError> {
    let Some(spec) = spec else { return Ok(None) };
    let at = at.at("envoy");
    if spec.domain.trim().is_empty() {
        return Err(at
            .at("domain")
            .err("must name the domain Envoy's filter sends"));
    }
    if spec.descriptor.is_empty() {
        return Err(at.at("descriptor").err("needs at least one entry"));
    }
    let mut entries = Vec::new();
    for (i, e) in spec.descriptor.into_iter().enumerate() {
        if e.key.is_empty() {
            return Err(at
                .at(format_args!("descriptor[{i}].key"))
                .err("must not be empty"));
        }
        entries.push((e.key, e.value));
    }
    Ok(Some(EnvoyDescriptor {
        domain: spec.domain,
        entries,
    }))
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
    #[serde(default)]
    fail_mode: Option<String>,
    #[serde(default)]
    envoy: Option<EnvoySpec>,
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

/// `when` and `cooldown` of a policy: the condition, if any.
fn condition(
    res: &Resource,
    when: Option<WhenSpec>,
    cooldown: Option<&str>,
) -> Result<Option<Condition>, ConfigError> {
    let at = At::spec(res);
    let Some(w) = when else {
        if cooldown.is_some() {
            return Err(at
                .at("cooldown")
                .err("applies to conditional policies only (set `when`)"));
        }
        return Ok(None);
    };
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
                .err("name the alert that switches the policy on"));
        }
    };
    let cooldown = match cooldown {
        None => DEFAULT_COOLDOWN,
        Some(c) => crate::networking::duration_field(c, &At::spec(res).at("cooldown"))?,
    };
    Ok(Some(Condition {
        alert,
        labels: w.labels,
        cooldown,
    }))
}

fn fail_mode(
    res: &Resource,
    mode: Option<&str>,
    when: &Option<Condition>,
) -> Result<FailMode, ConfigError> {
    let at = At::spec(res).at("failMode");
    let mode = match mode {
        None => return Ok(FailMode::Open),
        Some("open") => FailMode::Open,
        Some("closed") => FailMode::Closed,
        Some(other) => {
            return Err(at.err(format!("`{other}` is not a fail mode; open or closed")));
        }
    };
    if when.is_none() {
        return Err(at.err("applies to conditional policies only (set `when`)"));
    }
    Ok(mode)
}

pub fn validate_access_policy(res: &Resource) -> Result<AccessPolicy, ConfigError> {
    let spec: AccessSpec = res.spec()?;
    let at = At::spec(res);
    let when = condition(res, spec.when, spec.cooldown.as_deref())?;
    let fail_mode = fail_mode(res, spec.fail_mode.as_deref(), &when)?;
    let target = at.at("target");
    target.unsupported(&spec.target.route, "route", "target the service")?;
    if spec.target.method.is_some() || spec.target.path.is_some() {
        return Err(
            target.err("an AccessPolicy applies to every call of the service; name only `service`")
        );
    }
    if spec.target.service.trim().is_empty() {
        return Err(target.at("service").err("must name a service"));
    }
    let action = match spec.action.as_deref() {
        None | Some("DENY") => AccessAction::Deny,
        Some("ALLOW") => AccessAction::AllowOnly,
        Some(other) => {
            return Err(at.at("action").err(format!(
                "`{other}` is not an action; DENY or ALLOW (allow only the sources)"
            )));
        }
    };
    let mut sources = Vec::new();
    for (i, s) in spec.sources.into_iter().enumerate() {
        let at = at.at(format_args!("sources[{i}]"));
        at.unsupported(
            &s.principal,
            "principal",
            "name the source by `namespace` and `workload` (principals need mesh mTLS identities)",
        )?;
        let clean = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
        let m = SourceMatch {
            namespace: clean(s.namespace),
            workload: clean(s.workload),
        };
        if m.namespace.is_none() && m.workload.is_none() {
            return Err(at.err("name a `namespace`, a `workload` or both"));
        }
        sources.push(m);
    }
    if sources.is_empty() {
        if action == AccessAction::AllowOnly {
            return Err(at.at("sources").err("ALLOW needs the sources it allows"));
        }
        if when.is_none() {
            return Err(at.at("sources").err(
                "list the sources to deny, or set `when` to deny the sources its alert names (labels source_workload and source_workload_namespace)",
            ));
        }
    }
    let ttl = match spec.ttl.as_deref() {
        None => None,
        Some(t) => {
            if when.is_none() {
                return Err(at
                    .at("ttl")
                    .err("applies to conditional policies only (set `when`)"));
            }
            Some(crate::networking::duration_field(t, &at.at("ttl"))?)
        }
    };
    Ok(AccessPolicy {
        name: res.name.clone(),
        namespace: res.namespace.clone(),
        service: spec.target.service,
        action,
        sources,
        when,
        ttl,
        fail_mode,
    })
}

pub fn validate_rate_limit(res: &Resource) -> Result<RateLimit, ConfigError> {
    let spec: Spec = res.spec()?;
    let at = At::spec(res);
    let when = condition(res, spec.when, spec.cooldown.as_deref())?;
    let fail_mode = fail_mode(res, spec.fail_mode.as_deref(), &when)?;
    let (service, method, path) = limited_target(spec.target, &at)?;
    let key = limit_key(&spec.key, &at)?;
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
        service,
        method,
        path,
        key,
        requests_per_second: rps,
        burst,
        dry_run: spec.dry_run,
        when,
        fail_mode,
        envoy: envoy_descriptor(spec.envoy, &at)?,
    })
}

/// `target:` of a RateLimit or Quota: the service, and optionally the
/// method and path it limits.
fn limited_target(
    spec: TargetSpec,
    at: &At<'_>,
) -> Result<(String, Option<StringMatch>, Option<StringMatch>), ConfigError> {
    let target = at.at("target");
    target.unsupported(&spec.route, "route", "limit by `method` and `path`")?;
    if spec.service.trim().is_empty() {
        return Err(target.at("service").err("must name a service"));
    }
    let method = spec
        .method
        .map(|m| m.validate(&target.at("method")))
        .transpose()?
        .flatten();
    let path = spec
        .path
        .map(|m| m.validate(&target.at("path")))
        .transpose()?
        .flatten();
    Ok((spec.service, method, path))
}

/// `key:` of a RateLimit or Quota.
fn limit_key(key: &Option<serde_json::Value>, at: &At<'_>) -> Result<LimitKey, ConfigError> {
    Ok(match key {
        None => LimitKey::Global,
        Some(serde_json::Value::String(s)) => match s.as_str() {
            "global" => LimitKey::Global,
            "sourceWorkload" => LimitKey::SourceWorkload,
            "sourcePrincipal" => LimitKey::SourcePrincipal,
            other => {
                return Err(at.at("key").err(format!(
                    "`{other}` is not a key; one of global, sourceWorkload, sourcePrincipal, or {{header: NAME}}"
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
    })
}

pub fn validate_quota(res: &Resource) -> Result<Quota, ConfigError> {
    let spec: QuotaSpec = res.spec()?;
    let at = At::spec(res);
    let (service, method, path) = limited_target(spec.target, &at)?;
    let key = limit_key(&spec.key, &at)?;
    if spec.limit == 0 {
        return Err(at.at("limit").err("0 allows nothing; at least 1"));
    }
    let per = match spec.per.as_str() {
        "minute" => QuotaPeriod::Minute,
        "hour" => QuotaPeriod::Hour,
        "day" => QuotaPeriod::Day,
        other => {
            return Err(at
                .at("per")
                .err(format!("`{other}` is not a period; minute, hour or day")));
        }
    };
    Ok(Quota {
        name: res.name.clone(),
        namespace: res.namespace.clone(),
        service,
        method,
        path,
        key,
        limit: spec.limit,
        per,
        envoy: envoy_descriptor(spec.envoy, &at)?,
    })
}

/// Whether `s` is an HTTP header name (RFC 9110 `token`).
pub(crate) fn http_header_name(s: &str) -> bool {
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

    fn access(spec: &str) -> Result<MeshConfig, String> {
        let text = format!(
            "{MESH}apiVersion: policy.lumen.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: ap}}\nspec:\n{spec}"
        );
        let resources = parse_resources("a.yaml", &text).map_err(|e| e.to_string())?;
        MeshConfig::from_resources(&resources).map_err(|e| e.to_string())
    }

    #[test]
    fn access_policies_validate_and_are_refused_by_field() {
        let mesh = access(
            "  target: {service: ratings}\n  when: {alert: Noisy}\n  ttl: 5m\n  failMode: closed\n",
        )
        .unwrap();
        let ap = &mesh.access_policies[0];
        assert!(ap.sources_from_alert());
        assert_eq!(ap.action, super::AccessAction::Deny);
        assert_eq!(ap.fail_mode, super::FailMode::Closed);
        assert_eq!(ap.ttl, Some(std::time::Duration::from_secs(300)));
        let mesh = access(
            "  target: {service: ratings}\n  action: ALLOW\n  sources: [{namespace: default, workload: reviews-v1}]\n",
        )
        .unwrap();
        assert!(
            mesh.access_policies[0].sources[0].matches("default", "reviews-v1")
                && !mesh.access_policies[0].sources[0].matches("default", "reviews-v2")
        );
        let cases = [
            (
                "  target: {service: ratings}\n",
                "spec.sources: list the sources to deny, or set `when`",
            ),
            (
                "  target: {service: ratings}\n  action: ALLOW\n  when: {alert: A}\n",
                "spec.sources: ALLOW needs the sources it allows",
            ),
            (
                "  target: {service: ratings}\n  action: AUDIT\n  sources: [{workload: w}]\n",
                "spec.action: `AUDIT` is not an action",
            ),
            (
                "  target: {service: ratings}\n  sources: [{}]\n",
                "spec.sources[0]: name a `namespace`, a `workload` or both",
            ),
            (
                "  target: {service: ratings}\n  sources: [{workload: w}]\n  ttl: 1m\n",
                "spec.ttl: applies to conditional policies only",
            ),
            (
                "  target: {service: ratings}\n  when: {alert: A}\n  failMode: maybe\n",
                "spec.failMode: `maybe` is not a fail mode",
            ),
            (
                "  target: {service: nowhere}\n  sources: [{workload: w}]\n",
                "spec.target.service: no service `nowhere` in the mesh",
            ),
        ];
        for (spec, want) in cases {
            let e = access(spec).unwrap_err();
            assert!(
                e.contains("AccessPolicy default/ap") && e.contains(want),
                "{spec}\n got: {e}\nwant: {want}"
            );
        }
    }

    #[test]
    fn quotas_validate_and_are_refused_by_field() {
        let quota = |spec: &str| {
            let text = format!(
                "{MESH}apiVersion: policy.lumen.dev/v1alpha1\nkind: Quota\nmetadata: {{name: q}}\nspec:\n{spec}"
            );
            let resources = parse_resources("q.yaml", &text).map_err(|e| e.to_string())?;
            MeshConfig::from_resources(&resources).map_err(|e| e.to_string())
        };
        let mesh = quota(
            "  target: {service: ratings}\n  key: sourceWorkload\n  limit: 1000\n  per: minute\n",
        )
        .unwrap();
        let q = &mesh.quotas[0];
        assert_eq!((q.limit, q.per.secs()), (1000, 60));
        assert_eq!(q.window_start(1_800_000_059), 1_800_000_000);
        for (spec, want) in [
            (
                "  target: {service: ratings}\n  limit: 0\n  per: hour\n",
                "spec.limit: 0 allows nothing",
            ),
            (
                "  target: {service: ratings}\n  limit: 5\n  per: week\n",
                "spec.per: `week` is not a period",
            ),
            (
                "  target: {service: nowhere}\n  limit: 5\n  per: day\n",
                "spec.target.service: no service `nowhere`",
            ),
        ] {
            let e = quota(spec).unwrap_err();
            assert!(
                e.contains("Quota default/q") && e.contains(want),
                "{spec}\n got: {e}"
            );
        }
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
                "  target: {service: ratings}\n  requestsPerSecond: 1\n  key: everyone\n",
                "spec.key: `everyone` is not a key",
            ),
            (
                "  target: {service: ratings}\n  requestsPerSecond: 1\n  when: {expr: up}\n",
                "spec.when.expr: ",
            ),
            (
                "  target: {service: ratings}\n  requestsPerSecond: 1\n  cooldown: 5s\n",
                "spec.cooldown: applies to conditional policies only",
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
