//! Istio's `AuthorizationPolicy` (`security.istio.io/v1`), read as Istio's
//! users write it and evaluated as Istio evaluates it at a workload's
//! inbound side.
//!
//! A policy applies to a workload when it sits in the root namespace
//! without a selector (mesh-wide), in the workload's namespace without a
//! selector, or there with a selector matching the workload's labels. A
//! request is decided in Istio's order: `CUSTOM` policies first (Lumen's
//! policy engine is their provider), then `DENY` (any matching rule
//! denies), then `ALLOW` (once any ALLOW policy applies, what none of them
//! allows is denied; `spec: {}` allows nothing). `AUDIT` changes nothing.
//! A rule matches when one of its `from` sources, one of its `to`
//! operations and all of its `when` conditions match; within a source or
//! operation every field given must match, each by any of its values
//! (Istio's exact, `prefix*`, `*suffix` and `*` present).
//!
//! Over plain TCP the HTTP-only fields cannot be known: as in Istio, an
//! ALLOW rule that needs them matches nothing, and a DENY rule is applied
//! without them (it denies more, never less).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use crate::networking::At;
use crate::resource::{ConfigError, Resource};
use crate::security::SelectorSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    /// An external authorizer decides: Lumen's policy engine.
    Custom,
}

/// What a request's attributes are, as the policies ask for them.
pub trait Attributes {
    /// The source's principal, Istio's form (`cluster.local/ns/x/sa/y`),
    /// when mTLS proved one.
    fn source_principal(&self) -> Option<&str>;
    fn source_ip(&self) -> Option<IpAddr>;
    /// The original client (first `X-Forwarded-For`), else the source.
    fn remote_ip(&self) -> Option<IpAddr>;
    fn destination_ip(&self) -> Option<IpAddr>;
    /// The workload's port (the app's).
    fn destination_port(&self) -> Option<u16>;
    fn sni(&self) -> Option<&str>;
    /// False over plain TCP: no host, method, path, headers or JWT.
    fn http(&self) -> bool;
    fn host(&self) -> Option<&str>;
    fn method(&self) -> Option<&str>;
    /// Without the query.
    fn path(&self) -> Option<&str>;
    fn header(&self, name: &str) -> Option<&str>;
    /// `iss/sub` of a JWT RequestAuthentication validated.
    fn request_principal(&self) -> Option<&str>;
    /// The JWT's claim at `path` (nested names), as strings (a list's
    /// items each).
    fn claim(&self, path: &[String]) -> Vec<String>;
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` (present).
#[derive(Debug, Clone, PartialEq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    fn parse(s: &str) -> Pattern {
        if s == "*" {
            Pattern::Any
        } else if let Some(p) = s.strip_suffix('*') {
            Pattern::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            Pattern::Suffix(p.to_string())
        } else {
            Pattern::Exact(s.to_string())
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => !v.is_empty(),
            Pattern::Exact(e) => v == e,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(s) => v.ends_with(s.as_str()),
        }
    }

    fn matches_ignoring_case(&self, v: &str) -> bool {
        let v = v.to_ascii_lowercase();
        match self {
            Pattern::Any => !v.is_empty(),
            Pattern::Exact(e) => v == e.to_ascii_lowercase(),
            Pattern::Prefix(p) => v.starts_with(&p.to_ascii_lowercase()),
            Pattern::Suffix(s) => v.ends_with(&s.to_ascii_lowercase()),
        }
    }
}

/// `addr/len`, or one address.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    fn parse(s: &str) -> Option<Cidr> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l.parse::<u8>().ok()?)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(max);
        (len <= max).then_some(Cidr { addr, len })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

/// A field's values and its `not` values; `None` when not given.
#[derive(Debug, Clone, PartialEq)]
struct Field<T> {
    any: Option<Vec<T>>,
    none: Option<Vec<T>>,
}

impl<T> Field<T> {
    fn given(&self) -> bool {
        self.any.is_some() || self.none.is_some()
    }

    /// Every part given holds: some of `any` matches, none of `none` does.
    fn check(&self, m: impl Fn(&T) -> bool) -> bool {
        self.any.as_ref().is_none_or(|v| v.iter().any(&m))
            && self.none.as_ref().is_none_or(|v| !v.iter().any(&m))
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Source {
    principals: Field<Pattern>,
    request_principals: Field<Pattern>,
    namespaces: Field<Pattern>,
    ip_blocks: Field<Cidr>,
    remote_ip_blocks: Field<Cidr>,
}

#[derive(Debug, Clone, PartialEq)]
struct Operation {
    hosts: Field<Pattern>,
    ports: Field<u16>,
    methods: Field<Pattern>,
    paths: Field<Pattern>,
}

#[derive(Debug, Clone, PartialEq)]
enum Key {
    Header(String),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
    Claim(Vec<String>),
    DestinationIp,
    DestinationPort,
    Sni,
}

impl Key {
    fn http_only(&self) -> bool {
        matches!(
            self,
            Key::Header(_)
                | Key::AuthPrincipal
                | Key::AuthAudiences
                | Key::AuthPresenter
                | Key::Claim(_)
                | Key::RemoteIp
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Condition {
    key: Key,
    values: Option<Vec<String>>,
    not_values: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq)]
struct Rule {
    from: Option<Vec<Source>>,
    to: Option<Vec<Operation>>,
    when: Vec<Condition>,
}

/// One validated AuthorizationPolicy.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    /// CUSTOM's `provider.name`.
    pub provider: Option<String>,
    rules: Vec<Rule>,
}

/// What the policies decided for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Allow,
    /// Denied: by this policy (`namespace/name`), or `None` when no ALLOW
    /// policy allowed it (Envoy: `rbac_access_denied_matched_policy[none]`).
    Deny(Option<String>),
    /// A CUSTOM policy matched: the external authorizer decides.
    Custom(String),
}

impl AuthorizationPolicy {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether this policy applies to a workload in `namespace` with
    /// `labels`.
    pub fn applies(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        crate::security::in_scope(&self.namespace, self.selector.as_ref(), namespace, labels)
    }

    /// Whether any rule matches the request.
    fn matches(&self, a: &dyn Attributes) -> bool {
        let deny = self.action == Action::Deny;
        self.rules.iter().any(|r| rule_matches(r, a, deny))
    }
}

/// The policies that apply to one workload, by action, and the decision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkloadPolicies {
    custom: Vec<AuthorizationPolicy>,
    deny: Vec<AuthorizationPolicy>,
    allow: Vec<AuthorizationPolicy>,
    audit: Vec<AuthorizationPolicy>,
}

impl WorkloadPolicies {
    pub fn of(
        policies: &[AuthorizationPolicy],
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Self {
        let mut out = WorkloadPolicies::default();
        for p in policies.iter().filter(|p| p.applies(namespace, labels)) {
            match p.action {
                Action::Custom => out.custom.push(p.clone()),
                Action::Deny => out.deny.push(p.clone()),
                Action::Allow => out.allow.push(p.clone()),
                Action::Audit => out.audit.push(p.clone()),
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.custom.is_empty() && self.deny.is_empty() && self.allow.is_empty()
    }

    /// Istio's order: CUSTOM, DENY, ALLOW.
    pub fn decide(&self, a: &dyn Attributes) -> Verdict {
        if let Some(p) = self.custom.iter().find(|p| p.matches(a)) {
            return Verdict::Custom(p.id());
        }
        if let Some(p) = self.deny.iter().find(|p| p.matches(a)) {
            return Verdict::Deny(Some(p.id()));
        }
        if self.allow.is_empty() || self.allow.iter().any(|p| p.matches(a)) {
            Verdict::Allow
        } else {
            Verdict::Deny(None)
        }
    }

    /// The AUDIT policies whose rules match (Istio marks the request).
    pub fn audited(&self, a: &dyn Attributes) -> Option<String> {
        self.audit.iter().find(|p| p.matches(a)).map(|p| p.id())
    }
}

fn rule_matches(r: &Rule, a: &dyn Attributes, deny: bool) -> bool {
    let http = a.http();
    // Over TCP an ALLOW rule needing HTTP matches nothing; a DENY rule
    // drops what it cannot see.
    if !http && !deny && rule_needs_http(r) {
        return false;
    }
    let from = r
        .from
        .as_ref()
        .is_none_or(|f| f.iter().any(|s| source_matches(s, a, http)));
    let to =
        r.to.as_ref()
            .is_none_or(|t| t.iter().any(|o| operation_matches(o, a, http)));
    let when = r
        .when
        .iter()
        .all(|c| (!http && c.key.http_only()) || condition_matches(c, a));
    from && to && when
}

fn rule_needs_http(r: &Rule) -> bool {
    r.from
        .iter()
        .flatten()
        .any(|s| s.request_principals.given())
        || r.to
            .iter()
            .flatten()
            .any(|o| o.hosts.given() || o.methods.given() || o.paths.given())
        || r.when.iter().any(|c| c.key.http_only())
}

fn opt_match(p: &Pattern, v: Option<&str>) -> bool {
    v.is_some_and(|v| p.matches(v))
}

fn source_matches(s: &Source, a: &dyn Attributes, http: bool) -> bool {
    let principal = a.source_principal();
    let namespace = principal.and_then(|p| p.split('/').nth(2));
    s.principals.check(|p| opt_match(p, principal))
        && s.namespaces.check(|p| opt_match(p, namespace))
        && s.ip_blocks
            .check(|c| a.source_ip().is_some_and(|ip| c.contains(ip)))
        && s.remote_ip_blocks
            .check(|c| a.remote_ip().is_some_and(|ip| c.contains(ip)))
        && (!http
            || s.request_principals
                .check(|p| opt_match(p, a.request_principal())))
}

fn operation_matches(o: &Operation, a: &dyn Attributes, http: bool) -> bool {
    let host_matches = |p: &Pattern| {
        a.host().is_some_and(|h| {
            // With or without its port, as Istio matches authorities.
            p.matches_ignoring_case(h)
                || h.rsplit_once(':')
                    .is_some_and(|(name, _)| p.matches_ignoring_case(name))
        })
    };
    o.ports.check(|p| a.destination_port() == Some(*p))
        && (!http
            || (o.hosts.check(host_matches)
                && o.methods.check(|p| opt_match(p, a.method()))
                && o.paths.check(|p| opt_match(p, a.path()))))
}

fn condition_matches(c: &Condition, a: &dyn Attributes) -> bool {
    let text = |v: Option<&str>| v.map(str::to_string).into_iter().collect::<Vec<_>>();
    let ip_values = |ip: Option<IpAddr>| -> Box<dyn Fn(&str) -> bool> {
        Box::new(move |want: &str| {
            Cidr::parse(want).is_some_and(|c| ip.is_some_and(|ip| c.contains(ip)))
        })
    };
    let principal = a.source_principal();
    let got: Box<dyn Fn(&str) -> bool> = match &c.key {
        Key::SourceIp => ip_values(a.source_ip()),
        Key::RemoteIp => ip_values(a.remote_ip()),
        Key::DestinationIp => ip_values(a.destination_ip()),
        key => {
            let values: Vec<String> = match key {
                Key::Header(h) => text(a.header(h)),
                Key::SourceNamespace => text(principal.and_then(|p| p.split('/').nth(2))),
                Key::SourcePrincipal => text(principal),
                Key::AuthPrincipal => text(a.request_principal()),
                Key::AuthAudiences => a.claim(&["aud".to_string()]),
                Key::AuthPresenter => a.claim(&["azp".to_string()]),
                Key::Claim(path) => a.claim(path),
                Key::DestinationPort => a
                    .destination_port()
                    .map(|p| p.to_string())
                    .into_iter()
                    .collect(),
                Key::Sni => text(a.sni()),
                _ => Vec::new(),
            };
            Box::new(move |want: &str| {
                let p = Pattern::parse(want);
                values.iter().any(|v| p.matches(v))
            })
        }
    };
    c.values.as_ref().is_none_or(|v| v.iter().any(|w| got(w)))
        && c.not_values
            .as_ref()
            .is_none_or(|v| !v.iter().any(|w| got(w)))
}

// ---- Istio's schema ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    selector: Option<SelectorSpec>,
    #[serde(default)]
    target_ref: Option<serde_json::Value>,
    #[serde(default)]
    target_refs: Option<serde_json::Value>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    provider: Option<ProviderSpec>,
    #[serde(default)]
    rules: Option<Vec<RuleSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderSpec {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    #[serde(default)]
    from: Option<Vec<FromSpec>>,
    #[serde(default)]
    to: Option<Vec<ToSpec>>,
    #[serde(default)]
    when: Option<Vec<ConditionSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FromSpec {
    source: SourceSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToSpec {
    operation: OperationSpec,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SourceSpec {
    principals: Option<Vec<String>>,
    not_principals: Option<Vec<String>>,
    request_principals: Option<Vec<String>>,
    not_request_principals: Option<Vec<String>>,
    namespaces: Option<Vec<String>>,
    not_namespaces: Option<Vec<String>>,
    ip_blocks: Option<Vec<String>>,
    not_ip_blocks: Option<Vec<String>>,
    remote_ip_blocks: Option<Vec<String>>,
    not_remote_ip_blocks: Option<Vec<String>>,
    service_accounts: Option<Vec<String>>,
    not_service_accounts: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OperationSpec {
    hosts: Option<Vec<String>>,
    not_hosts: Option<Vec<String>>,
    ports: Option<Vec<String>>,
    not_ports: Option<Vec<String>>,
    methods: Option<Vec<String>>,
    not_methods: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    not_paths: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConditionSpec {
    key: String,
    #[serde(default)]
    values: Option<Vec<String>>,
    #[serde(default)]
    not_values: Option<Vec<String>>,
}

fn patterns(v: Option<Vec<String>>, at: &At<'_>) -> Result<Option<Vec<Pattern>>, ConfigError> {
    let Some(v) = v else { return Ok(None) };
    if v.is_empty() {
        return Err(at.err("an empty list matches nothing; leave the field out instead"));
    }
    Ok(Some(v.iter().map(|s| Pattern::parse(s)).collect()))
}

fn field(
    any: Option<Vec<String>>,
    none: Option<Vec<String>>,
    at: &At<'_>,
    name: &str,
    not_name: &str,
) -> Result<Field<Pattern>, ConfigError> {
    Ok(Field {
        any: patterns(any, &at.at(name))?,
        none: patterns(none, &at.at(not_name))?,
    })
}

fn cidrs(v: Option<Vec<String>>, at: &At<'_>) -> Result<Option<Vec<Cidr>>, ConfigError> {
    let Some(v) = v else { return Ok(None) };
    v.iter()
        .enumerate()
        .map(|(i, s)| {
            Cidr::parse(s).ok_or_else(|| {
                at.at(format!("[{i}]"))
                    .err(format!("`{s}` is not an IP address or CIDR block"))
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn ports(v: Option<Vec<String>>, at: &At<'_>) -> Result<Option<Vec<u16>>, ConfigError> {
    let Some(v) = v else { return Ok(None) };
    v.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                at.at(format!("[{i}]"))
                    .err(format!("`{s}` is not a port number (1-65535)"))
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn key(k: &str, at: &At<'_>) -> Result<Key, ConfigError> {
    let bracket = |prefix: &str| -> Option<Vec<String>> {
        let rest = k.strip_prefix(prefix)?;
        let mut names = Vec::new();
        let mut rest = rest;
        while let Some(r) = rest.strip_prefix('[') {
            let (name, after) = r.split_once(']')?;
            if name.is_empty() {
                return None;
            }
            names.push(name.to_string());
            rest = after;
        }
        (rest.is_empty() && !names.is_empty()).then_some(names)
    };
    if let Some(h) = bracket("request.headers")
        && h.len() == 1
    {
        return Ok(Key::Header(h[0].to_ascii_lowercase()));
    }
    if let Some(path) = bracket("request.auth.claims") {
        return Ok(Key::Claim(path));
    }
    Ok(match k {
        "source.ip" => Key::SourceIp,
        "remote.ip" => Key::RemoteIp,
        "source.namespace" => Key::SourceNamespace,
        "source.principal" => Key::SourcePrincipal,
        "request.auth.principal" => Key::AuthPrincipal,
        "request.auth.audiences" => Key::AuthAudiences,
        "request.auth.presenter" => Key::AuthPresenter,
        "destination.ip" => Key::DestinationIp,
        "destination.port" => Key::DestinationPort,
        "connection.sni" => Key::Sni,
        other => {
            return Err(at.err(format!(
                "`{other}` is not a condition key Lumen knows (request.headers[…], source.ip, remote.ip, source.namespace, source.principal, request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[…], destination.ip, destination.port, connection.sni)"
            )));
        }
    })
}

pub fn validate_authorization_policy(res: &Resource) -> Result<AuthorizationPolicy, ConfigError> {
    let spec: Spec = res.spec()?;
    let at = At::spec(res);
    crate::security::no_target_refs(&at, &spec.target_ref, &spec.target_refs)?;
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => Action::Custom,
        Some(other) => {
            return Err(at
                .at("action")
                .err(format!("`{other}` is not ALLOW, DENY, AUDIT or CUSTOM")));
        }
    };
    let provider = spec.provider.map(|p| p.name);
    match (action, &provider) {
        (Action::Custom, None) => {
            return Err(at
                .at("provider")
                .err("CUSTOM needs a provider (Lumen's policy engine serves any name)"));
        }
        (Action::Custom, Some(_)) | (_, None) => {}
        (_, Some(_)) => {
            return Err(at
                .at("provider")
                .err("only a CUSTOM action takes a provider"));
        }
    }
    let mut rules = Vec::new();
    for (i, r) in spec.rules.unwrap_or_default().into_iter().enumerate() {
        let at = at.at("rules").at(format!("[{i}]"));
        let from = match r.from {
            None => None,
            Some(list) => Some(
                list.into_iter()
                    .enumerate()
                    .map(|(j, f)| {
                        source(f.source, &at.at("from").at(format!("[{j}]")).at("source"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let to = match r.to {
            None => None,
            Some(list) => Some(
                list.into_iter()
                    .enumerate()
                    .map(|(j, t)| {
                        operation(
                            t.operation,
                            &at.at("to").at(format!("[{j}]")).at("operation"),
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let mut when = Vec::new();
        for (j, c) in r.when.unwrap_or_default().into_iter().enumerate() {
            let at = at.at("when").at(format!("[{j}]"));
            if c.values.is_none() && c.not_values.is_none() {
                return Err(at.err("a condition needs values or notValues"));
            }
            when.push(Condition {
                key: key(&c.key, &at.at("key"))?,
                values: c.values,
                not_values: c.not_values,
            });
        }
        rules.push(Rule { from, to, when });
    }
    Ok(AuthorizationPolicy {
        name: res.name.clone(),
        namespace: res.namespace.clone(),
        selector: spec.selector.map(|s| s.match_labels),
        action,
        provider,
        rules,
    })
}

fn source(s: SourceSpec, at: &At<'_>) -> Result<Source, ConfigError> {
    at.unsupported(&s.service_accounts, "serviceAccounts", "use principals")?;
    at.unsupported(
        &s.not_service_accounts,
        "notServiceAccounts",
        "use notPrincipals",
    )?;
    let out = Source {
        principals: field(
            s.principals,
            s.not_principals,
            at,
            "principals",
            "notPrincipals",
        )?,
        request_principals: field(
            s.request_principals,
            s.not_request_principals,
            at,
            "requestPrincipals",
            "notRequestPrincipals",
        )?,
        namespaces: field(
            s.namespaces,
            s.not_namespaces,
            at,
            "namespaces",
            "notNamespaces",
        )?,
        ip_blocks: Field {
            any: cidrs(s.ip_blocks, &at.at("ipBlocks"))?,
            none: cidrs(s.not_ip_blocks, &at.at("notIpBlocks"))?,
        },
        remote_ip_blocks: Field {
            any: cidrs(s.remote_ip_blocks, &at.at("remoteIpBlocks"))?,
            none: cidrs(s.not_remote_ip_blocks, &at.at("notRemoteIpBlocks"))?,
        },
    };
    Ok(out)
}

fn operation(o: OperationSpec, at: &At<'_>) -> Result<Operation, ConfigError> {
    Ok(Operation {
        hosts: field(o.hosts, o.not_hosts, at, "hosts", "notHosts")?,
        ports: Field {
            any: ports(o.ports, &at.at("ports"))?,
            none: ports(o.not_ports, &at.at("notPorts"))?,
        },
        methods: field(o.methods, o.not_methods, at, "methods", "notMethods")?,
        paths: field(o.paths, o.not_paths, at, "paths", "notPaths")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::parse_resources;

    /// A request as the tests describe it.
    #[derive(Clone)]
    struct Req {
        principal: Option<&'static str>,
        method: &'static str,
        path: &'static str,
        headers: Vec<(&'static str, &'static str)>,
        request_principal: Option<&'static str>,
        claims: serde_json::Value,
        http: bool,
        ip: IpAddr,
    }

    fn get(path: &'static str) -> Req {
        Req {
            principal: None,
            method: "GET",
            path,
            headers: Vec::new(),
            request_principal: None,
            claims: serde_json::Value::Null,
            http: true,
            ip: "10.0.0.7".parse().unwrap(),
        }
    }

    impl Req {
        fn from(mut self, sa: &'static str) -> Req {
            self.principal = Some(sa);
            self
        }
        fn method(mut self, m: &'static str) -> Req {
            self.method = m;
            self
        }
        fn header(mut self, k: &'static str, v: &'static str) -> Req {
            self.headers.push((k, v));
            self
        }
    }

    impl Attributes for Req {
        fn source_principal(&self) -> Option<&str> {
            self.principal
        }
        fn source_ip(&self) -> Option<IpAddr> {
            Some(self.ip)
        }
        fn remote_ip(&self) -> Option<IpAddr> {
            Some(self.ip)
        }
        fn destination_ip(&self) -> Option<IpAddr> {
            None
        }
        fn destination_port(&self) -> Option<u16> {
            Some(8000)
        }
        fn sni(&self) -> Option<&str> {
            None
        }
        fn http(&self) -> bool {
            self.http
        }
        fn host(&self) -> Option<&str> {
            Some("httpbin.foo:8000")
        }
        fn method(&self) -> Option<&str> {
            Some(self.method)
        }
        fn path(&self) -> Option<&str> {
            Some(self.path)
        }
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| *v)
        }
        fn request_principal(&self) -> Option<&str> {
            self.request_principal
        }
        fn claim(&self, path: &[String]) -> Vec<String> {
            let mut v = &self.claims;
            for p in path {
                v = &v[p];
            }
            match v {
                serde_json::Value::String(s) => vec![s.clone()],
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            }
        }
    }

    macro_rules! istio {
        ($p:literal) => {
            (
                $p,
                include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../tests/data/istio/security/",
                    $p
                )),
            )
        };
    }

    fn policies(files: &[(&str, &str)]) -> Vec<AuthorizationPolicy> {
        files
            .iter()
            .flat_map(|(name, text)| parse_resources(name, text).unwrap())
            .map(|r| validate_authorization_policy(&r).unwrap())
            .collect()
    }

    fn decide(p: &[AuthorizationPolicy], ns: &str, app: &str, r: &Req) -> Verdict {
        let labels = [("app".to_string(), app.to_string())].into();
        WorkloadPolicies::of(p, ns, &labels).decide(r)
    }

    const PRODUCTPAGE: &str = "cluster.local/ns/default/sa/bookinfo-productpage";
    const REVIEWS: &str = "cluster.local/ns/default/sa/bookinfo-reviews";
    const RATINGS: &str = "cluster.local/ns/default/sa/bookinfo-ratings";
    use Verdict::{Allow, Deny};

    #[test]
    fn istios_http_authorization_task() {
        let nothing = policies(&[istio!("authz-http/allow-nothing.yaml")]);
        assert_eq!(
            decide(&nothing, "default", "productpage", &get("/")),
            Deny(None)
        );
        let all = policies(&[
            istio!("authz-http/allow-nothing.yaml"),
            istio!("authz-http/productpage-viewer.yaml"),
            istio!("authz-http/details-viewer.yaml"),
            istio!("authz-http/reviews-viewer.yaml"),
            istio!("authz-http/ratings-viewer.yaml"),
        ]);
        let cases = [
            ("productpage", get("/productpage"), Allow),
            (
                "productpage",
                get("/productpage").method("POST"),
                Deny(None),
            ),
            ("details", get("/details/0").from(PRODUCTPAGE), Allow),
            ("details", get("/details/0").from(REVIEWS), Deny(None)),
            ("details", get("/details/0"), Deny(None)),
            (
                "details",
                get("/details/0").from(PRODUCTPAGE).method("DELETE"),
                Deny(None),
            ),
            ("reviews", get("/reviews/0").from(PRODUCTPAGE), Allow),
            ("reviews", get("/reviews/0").from(RATINGS), Deny(None)),
            ("ratings", get("/ratings/0").from(REVIEWS), Allow),
            ("ratings", get("/ratings/0").from(PRODUCTPAGE), Deny(None)),
        ];
        for (app, req, want) in cases {
            assert_eq!(
                decide(&all, "default", app, &req),
                want,
                "{app} {} {}",
                req.method,
                req.path
            );
        }
        // Another namespace's workloads are not covered.
        assert_eq!(decide(&all, "foo", "details", &get("/")), Allow);
    }

    #[test]
    fn istios_explicit_deny_task() {
        let deny = policies(&[istio!("authz-deny/deny-method-get.yaml")]);
        let denied = Deny(Some("foo/deny-method-get".into()));
        assert_eq!(decide(&deny, "foo", "httpbin", &get("/get")), denied);
        assert_eq!(
            decide(&deny, "foo", "httpbin", &get("/post").method("POST")),
            Allow
        );
        let unless_admin = policies(&[istio!("authz-deny/deny-method-get-unless-admin.yaml")]);
        let admin = get("/get").header("x-token", "admin");
        let guest = get("/get").header("x-token", "guest");
        assert_eq!(decide(&unless_admin, "foo", "httpbin", &admin), Allow);
        assert_eq!(decide(&unless_admin, "foo", "httpbin", &guest), denied);
        assert_eq!(
            decide(&unless_admin, "foo", "httpbin", &get("/get")),
            denied
        );
        let both = policies(&[
            istio!("authz-deny/deny-method-get-unless-admin.yaml"),
            istio!("authz-deny/allow-path-ip.yaml"),
        ]);
        let ip = |token| get("/ip").header("x-token", token);
        assert_eq!(decide(&both, "foo", "httpbin", &ip("guest")), denied);
        assert_eq!(decide(&both, "foo", "httpbin", &ip("admin")), Allow);
        assert_eq!(decide(&both, "foo", "httpbin", &admin), Deny(None));
    }

    #[test]
    fn istios_jwt_task() {
        let jwt = policies(&[istio!("authz-jwt/require-jwt.yaml")]);
        let mut with = get("/headers");
        with.request_principal = Some("testing@secure.istio.io/testing@secure.istio.io");
        assert_eq!(decide(&jwt, "foo", "httpbin", &with), Allow);
        assert_eq!(decide(&jwt, "foo", "httpbin", &get("/headers")), Deny(None));
        let groups = policies(&[istio!("authz-jwt/require-jwt-group1.yaml")]);
        let mut grouped = with.clone();
        grouped.claims = serde_json::json!({"groups": ["group1", "group2"]});
        assert_eq!(decide(&groups, "foo", "httpbin", &grouped), Allow);
        assert_eq!(decide(&groups, "foo", "httpbin", &with), Deny(None));
    }

    fn policy(spec: &str) -> Vec<AuthorizationPolicy> {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec:\n{spec}"
        );
        policies(&[("p.yaml", Box::leak(text.into_boxed_str()))])
    }

    #[test]
    fn namespaces_ip_blocks_custom_and_tcp() {
        let p = policy("  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [bar]}\n");
        let from_bar = get("/").from("cluster.local/ns/bar/sa/x");
        assert_eq!(
            decide(&p, "foo", "a", &from_bar),
            Deny(Some("foo/p".into()))
        );
        assert_eq!(
            decide(&p, "foo", "a", &get("/").from("cluster.local/ns/foo/sa/x")),
            Allow
        );
        let p = policy("  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/24]}\n");
        assert_eq!(decide(&p, "foo", "a", &get("/")), Allow);
        let mut far = get("/");
        far.ip = "10.0.1.7".parse().unwrap();
        assert_eq!(decide(&p, "foo", "a", &far), Deny(None));
        let p = policy(
            "  action: CUSTOM\n  provider: {name: lumen}\n  rules:\n  - to:\n    - operation: {paths: [/admin*]}\n",
        );
        assert_eq!(
            decide(&p, "foo", "a", &get("/admin/x")),
            Verdict::Custom("foo/p".into())
        );
        assert_eq!(decide(&p, "foo", "a", &get("/x")), Allow);
        // Over TCP: an ALLOW rule on methods matches nothing, a DENY rule
        // on paths denies everything it could.
        let mut tcp = get("/");
        tcp.http = false;
        let p = policy("  rules:\n  - to:\n    - operation: {methods: [GET]}\n");
        assert_eq!(decide(&p, "foo", "a", &tcp), Deny(None));
        let p = policy("  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [/x]}\n");
        assert_eq!(decide(&p, "foo", "a", &tcp), Deny(Some("foo/p".into())));
        // `rules: [{}]` allows everything.
        let p = policy("  rules:\n  - {}\n");
        assert_eq!(decide(&p, "foo", "a", &get("/")), Allow);
    }

    #[test]
    fn what_is_wrong_is_refused_by_name() {
        let err = |spec: &str| {
            let text = format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec:\n{spec}"
            );
            let r = parse_resources("p.yaml", &text).unwrap();
            validate_authorization_policy(&r[0])
                .unwrap_err()
                .to_string()
        };
        let e = err("  action: MAYBE\n");
        assert!(e.contains("spec.action") && e.contains("MAYBE"), "{e}");
        let e = err("  action: CUSTOM\n");
        assert!(e.contains("spec.provider"), "{e}");
        let e = err("  rules:\n  - when:\n    - {key: request.nonsense, values: [x]}\n");
        assert!(
            e.contains("spec.rules[0].when[0].key") && e.contains("request.nonsense"),
            "{e}"
        );
        let e = err("  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/99]}\n");
        assert!(
            e.contains("spec.rules[0].from[0].source.ipBlocks[0]"),
            "{e}"
        );
        let e = err("  targetRef: {kind: Gateway, name: g}\n");
        assert!(e.contains("spec.targetRef"), "{e}");
        let e = err("  rules:\n  - to:\n    - operation: {methodz: [GET]}\n");
        assert!(e.contains("methodz"), "{e}");
    }
}
