//! Mesh configuration: the services and endpoints of Lumen's own `Mesh`
//! kind (what Istio takes from Kubernetes) together with Istio's networking
//! resources, validated once into one [`MeshConfig`].
//!
//! ```yaml
//! apiVersion: lumen.dev/v1alpha1
//! kind: Mesh
//! metadata:
//!   name: bookinfo
//! spec:
//!   services:
//!     - name: reviews
//!       namespace: default        # optional, default "default"
//!       port: 9080                # optional; the port callers put in the authority
//!       clusterIP: 10.96.0.12     # optional; the address apps dial when their
//!                                 # traffic is captured transparently
//!       protocol: http            # optional: http (HTTP/1.1), http2, grpc, tcp;
//!                                 # default: whatever the caller spoke
//!       retries:                  # optional; these are the defaults (Istio's)
//!         attempts: 2             # retries after the first try; 0 turns them off
//!         perTryTimeout: 2s       # optional; default: the request's whole timeout
//!         retryOn: connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes
//!         retriableStatusCodes: [503]
//!         backoff: { baseInterval: 25ms, maxInterval: 250ms }
//!         budget: { percent: 20, minConcurrency: 3 }
//!       endpoints:
//!         - address: 127.0.0.1:15106   # the endpoint's inbound sidecar
//!           workload: reviews-v1       # optional, default "<name>-<version>" or "<name>"
//!           version: v1                # optional, default "unknown"
//!           labels: { track: stable }  # optional; `app` and `version` are implied
//!           locality: us-east/zone-a   # optional: region/zone/subzone
//!           serviceAccount: bookinfo-reviews  # optional: the identity mTLS expects
//! ```
//!
//! A file may hold several documents of any of the kinds; their services
//! are merged. Every error names the file, the resource, the field (as a
//! path such as `spec.services[1].name`) and the reason.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::networking::{self, DestinationRule, Gateway, VirtualService};
pub use crate::resource::{ConfigError, DEFAULT_NAMESPACE, LUMEN_API as API_VERSION};
use crate::resource::{Kind, Resource, parse_resources};
pub use crate::service::{Endpoint, RetryOn, RetryPolicy, Service, UpstreamProtocol};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
struct MeshSpec {
    #[serde(default)]
    services: Vec<ServiceSpec>,
    /// Istio's `meshConfig.outboundTrafficPolicy`: the mesh-wide default a
    /// `Sidecar` can override.
    #[serde(default)]
    outbound_traffic_policy: Option<networking::sidecar::PolicySpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSpec {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default)]
    protocol: UpstreamProtocol,
    #[serde(default)]
    retries: Option<RetrySpec>,
    #[serde(default)]
    endpoints: Vec<EndpointSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RetrySpec {
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    per_try_timeout: Option<String>,
    #[serde(default)]
    retry_on: Option<String>,
    #[serde(default)]
    retriable_status_codes: Option<Vec<u16>>,
    #[serde(default)]
    backoff: Option<BackoffSpec>,
    #[serde(default)]
    budget: Option<BudgetSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BackoffSpec {
    #[serde(default)]
    base_interval: Option<String>,
    #[serde(default)]
    max_interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BudgetSpec {
    #[serde(default)]
    percent: Option<u32>,
    #[serde(default)]
    min_concurrency: Option<u32>,
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration such as `250ms` or `2s`: {e}"))
}

fn validate_retries(r: RetrySpec, at: &str) -> Result<RetryPolicy, (String, String)> {
    let mut p = RetryPolicy::default();
    if let Some(a) = r.attempts {
        if a > 10 {
            return Err((
                format!("{at}.attempts"),
                format!("{a} is more than 10 retries"),
            ));
        }
        p.attempts = a;
    }
    if let Some(t) = r.per_try_timeout {
        let t = duration(&t).map_err(|e| (format!("{at}.perTryTimeout"), e))?;
        if t.is_zero() {
            return Err((format!("{at}.perTryTimeout"), "must be more than 0".into()));
        }
        p.per_try_timeout = Some(t);
    }
    if let Some(on) = r.retry_on {
        p.retry_on = RetryOn::parse(&on).map_err(|e| (format!("{at}.retryOn"), e))?;
    }
    if let Some(codes) = r.retriable_status_codes {
        if let Some(bad) = codes.iter().find(|c| !(100..=599).contains(*c)) {
            return Err((
                format!("{at}.retriableStatusCodes"),
                format!("{bad} is not an HTTP status"),
            ));
        }
        p.retriable_status_codes = codes;
    }
    if let Some(b) = r.backoff {
        if let Some(t) = b.base_interval {
            p.backoff_base = duration(&t).map_err(|e| (format!("{at}.backoff.baseInterval"), e))?;
        }
        if let Some(t) = b.max_interval {
            p.backoff_max = duration(&t).map_err(|e| (format!("{at}.backoff.maxInterval"), e))?;
        }
        if p.backoff_max < p.backoff_base {
            return Err((
                format!("{at}.backoff.maxInterval"),
                "must not be less than baseInterval".into(),
            ));
        }
    }
    if let Some(b) = r.budget {
        if let Some(pc) = b.percent {
            if pc > 100 {
                return Err((
                    format!("{at}.budget.percent"),
                    format!("{pc} is more than 100"),
                ));
            }
            p.budget_percent = pc;
        }
        if let Some(m) = b.min_concurrency {
            p.budget_min_concurrency = m;
        }
    }
    Ok(p)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EndpointSpec {
    address: String,
    #[serde(default)]
    workload: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    locality: Option<String>,
    #[serde(default)]
    service_account: Option<String>,
}

/// The validated mesh: every service, indexed by name and namespace, and
/// Istio's networking resources over them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshConfig {
    /// The configuration version this mesh is (the control plane's, or one
    /// made from the files); empty when nothing named it.
    pub version: String,
    pub services: Vec<Service>,
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    pub gateways: Vec<Gateway>,
    pub rate_limits: Vec<crate::policy::RateLimit>,
    pub access_policies: Vec<crate::policy::AccessPolicy>,
    pub quotas: Vec<crate::policy::Quota>,
    pub peer_authentications: Vec<crate::security::PeerAuthentication>,
    pub authorization_policies: Vec<crate::authz::AuthorizationPolicy>,
    pub request_authentications: Vec<crate::security::RequestAuthentication>,
    pub sidecars: Vec<networking::Sidecar>,
    /// Calls to hosts outside the registry, mesh-wide (a Mesh's
    /// `outboundTrafficPolicy`; Istio's default ALLOW_ANY).
    pub outbound_traffic_policy: networking::OutboundMode,
    /// Conditional policies (`when`) the policy engine has switched on, by
    /// `namespace/name`; not part of the configuration's version.
    pub active_policies: std::collections::BTreeSet<String>,
    /// The proxy has heard nothing from the policy engine for longer than
    /// its staleness: conditional policies follow their `failMode`.
    pub policies_stale: bool,
    /// namespace → name → position in `services`; nested so lookups borrow
    /// `&str` and allocate nothing on the request path.
    index: HashMap<Arc<str>, HashMap<Arc<str>, usize>>,
    /// ServiceEntry hosts → position in `services`.
    external: HashMap<Arc<str>, usize>,
}

impl MeshConfig {
    /// Builds a mesh from already-validated services, e.g. in code that
    /// generates its own topology. Duplicate services are an error.
    pub fn from_services(file: &str, services: Vec<Service>) -> Result<Self, ConfigError> {
        let mut index: HashMap<Arc<str>, HashMap<Arc<str>, usize>> = HashMap::new();
        let mut external: HashMap<Arc<str>, usize> = HashMap::new();
        for (i, s) in services.iter().enumerate() {
            let taken = if s.external_host {
                external.insert(s.name.clone(), i).is_some()
            } else {
                index
                    .entry(s.namespace.clone())
                    .or_default()
                    .insert(s.name.clone(), i)
                    .is_some()
            };
            if taken {
                return Err(ConfigError {
                    file: file.to_string(),
                    resource: String::new(),
                    field: format!("services[{i}].name"),
                    reason: format!(
                        "service `{}` in namespace `{}` is defined twice",
                        s.name, s.namespace
                    ),
                });
            }
        }
        Ok(MeshConfig {
            services,
            index,
            external,
            ..Default::default()
        })
    }

    /// Parses and validates a file's text (Mesh and Istio networking
    /// resources). `file` names it in errors.
    pub fn from_yaml(file: &str, text: &str) -> Result<Self, ConfigError> {
        let resources = parse_resources(file, text)?;
        if resources.is_empty() {
            return Err(ConfigError {
                file: file.to_string(),
                resource: String::new(),
                field: String::new(),
                reason: "no resources in file".into(),
            });
        }
        if let Some(r) = resources.iter().find(|r| !r.kind.is_mesh_config()) {
            return Err(r.error(
                "kind",
                format!(
                    "{} is not mesh configuration; give it to --query-config",
                    r.kind
                ),
            ));
        }
        Self::from_resources(&resources)
    }

    /// Validates a set of resources into one mesh: each on its own, then
    /// together (every destination host and subset must exist; a host is
    /// routed by one VirtualService and set up by one DestinationRule).
    pub fn from_resources(resources: &[Resource]) -> Result<Self, ConfigError> {
        let mut services = Vec::new();
        let mut origin_of: HashMap<(String, String), String> = HashMap::new();
        let mut virtual_services = Vec::new();
        let mut destination_rules = Vec::new();
        let mut gateways = Vec::new();
        let mut rate_limits = Vec::new();
        let mut access_policies = Vec::new();
        let mut quotas = Vec::new();
        let mut peer_authentications = Vec::new();
        let mut authorization_policies = Vec::new();
        let mut request_authentications = Vec::new();
        let mut sidecars = Vec::new();
        let mut outbound_traffic_policy = networking::OutboundMode::default();
        let mut by_resource: Vec<(&Resource, usize)> = Vec::new();
        for res in resources {
            match res.kind {
                Kind::Mesh => {
                    let spec: MeshSpec = res.spec()?;
                    if let Some(p) = spec.outbound_traffic_policy {
                        let at = networking::At::spec(res).at("outboundTrafficPolicy");
                        outbound_traffic_policy = p.validate(&at)?;
                    }
                    for (i, s) in spec.services.into_iter().enumerate() {
                        let at = format!("spec.services[{i}]");
                        let service = validate_service(s, &at).map_err(|(f, r)| res.error(f, r))?;
                        let key = (service.name.to_string(), service.namespace.to_string());
                        let here = format!("{} {at}", res.key());
                        if let Some(first) = origin_of.insert(key, here) {
                            return Err(res.error(
                                format!("{at}.name"),
                                format!(
                                    "service `{}` in namespace `{}` is already defined by {first}",
                                    service.name, service.namespace
                                ),
                            ));
                        }
                        services.push(service);
                    }
                }
                Kind::ServiceEntry => {
                    for service in networking::service_entry_services(res)? {
                        let key = (service.name.to_string(), String::new());
                        if let Some(first) = origin_of.insert(key, res.key().to_string()) {
                            return Err(res.error(
                                "spec.hosts",
                                format!("host `{}` is already defined by {first}", service.name),
                            ));
                        }
                        services.push(service);
                    }
                }
                Kind::VirtualService => {
                    by_resource.push((res, virtual_services.len()));
                    virtual_services.push(networking::virtual_service::validate(res)?);
                }
                Kind::DestinationRule => {
                    destination_rules.push(networking::destination_rule::validate(res)?)
                }
                Kind::Gateway => gateways.push(networking::gateway::validate(res)?),
                Kind::Sidecar => sidecars.push(networking::sidecar::validate(res)?),
                Kind::RateLimit => rate_limits.push(crate::policy::validate_rate_limit(res)?),
                Kind::AccessPolicy => {
                    access_policies.push(crate::policy::validate_access_policy(res)?)
                }
                Kind::Quota => quotas.push(crate::policy::validate_quota(res)?),
                Kind::PeerAuthentication => {
                    peer_authentications.push(crate::security::validate_peer_authentication(res)?)
                }
                Kind::AuthorizationPolicy => {
                    authorization_policies.push(crate::authz::validate_authorization_policy(res)?)
                }
                Kind::RequestAuthentication => request_authentications
                    .push(crate::security::validate_request_authentication(res)?),
                Kind::QueryService => {}
            }
        }
        let file = resources.first().map_or("", |r| r.origin.as_str());
        let mut mesh = Self::from_services(file, services)?;
        mesh.version = crate::resource::content_version(resources);
        mesh.virtual_services = virtual_services;
        mesh.destination_rules = destination_rules;
        mesh.gateways = gateways;
        mesh.rate_limits = rate_limits;
        mesh.access_policies = access_policies;
        mesh.quotas = quotas;
        mesh.peer_authentications = peer_authentications;
        mesh.authorization_policies = authorization_policies;
        mesh.request_authentications = request_authentications;
        mesh.sidecars = sidecars;
        mesh.outbound_traffic_policy = outbound_traffic_policy;
        mesh.check_references(resources)?;
        Ok(mesh)
    }

    /// Cross-resource checks, each error naming the resource that refers.
    fn check_references(&self, resources: &[Resource]) -> Result<(), ConfigError> {
        let res_of = |kind: Kind, ns: &str, name: &str| {
            resources
                .iter()
                .find(|r| r.kind == kind && r.namespace == ns && r.name == name)
                .expect("every validated resource comes from one of `resources`")
        };
        let mut rule_for: HashMap<usize, &DestinationRule> = HashMap::new();
        for dr in &self.destination_rules {
            let res = res_of(Kind::DestinationRule, &dr.namespace, &dr.name);
            let Some(i) = self.resolve_host(&dr.host, &dr.namespace) else {
                return Err(res.error(
                    "spec.host",
                    format!(
                        "`{}` is not a service of the mesh or a ServiceEntry host",
                        dr.host
                    ),
                ));
            };
            if let Some(other) = rule_for.insert(i, dr) {
                return Err(res.error(
                    "spec.host",
                    format!(
                        "`{}` already has DestinationRule {}/{}; Lumen takes one per host",
                        dr.host, other.namespace, other.name
                    ),
                ));
            }
        }
        let mut routed: HashMap<(usize, Option<String>), &VirtualService> = HashMap::new();
        for vs in &self.virtual_services {
            let res = res_of(Kind::VirtualService, &vs.namespace, &vs.name);
            for (g, gw) in vs.gateways.iter().enumerate() {
                if gw != "mesh" && !self.gateways.iter().any(|x| x.is_named(gw, &vs.namespace)) {
                    return Err(res.error(
                        format!("spec.gateways[{g}]"),
                        format!("no Gateway `{gw}` (nor `mesh`)"),
                    ));
                }
            }
            for (h, host) in vs.hosts.iter().enumerate() {
                let service = self.resolve_host(host, &vs.namespace);
                if vs.applies_to_mesh() {
                    let Some(i) = service else {
                        return Err(res.error(
                            format!("spec.hosts[{h}]"),
                            format!(
                                "`{host}` is not a service of the mesh or a ServiceEntry host \
                                 (routes for other hosts need a gateway)"
                            ),
                        ));
                    };
                    if let Some(other) = routed.insert((i, None), vs) {
                        return Err(res.error(
                            format!("spec.hosts[{h}]"),
                            format!(
                                "`{host}` is already routed by VirtualService {}/{}",
                                other.namespace, other.name
                            ),
                        ));
                    }
                }
            }
            let mut destinations = Vec::new();
            for (r, route) in vs.http.iter().enumerate() {
                if let networking::HttpAction::Route(ds) = &route.action {
                    for (d, wd) in ds.iter().enumerate() {
                        destinations.push((
                            format!("spec.http[{r}].route[{d}].destination"),
                            &wd.destination,
                        ));
                    }
                }
                for (m, mirror) in route.mirrors.iter().enumerate() {
                    destinations.push((format!("spec.http[{r}].mirror[{m}]"), &mirror.destination));
                }
            }
            for (kind, routes) in [
                ("tcp", vs.tcp.iter().map(|r| &r.route).collect::<Vec<_>>()),
                ("tls", vs.tls.iter().map(|r| &r.route).collect()),
            ] {
                for (r, route) in routes.into_iter().enumerate() {
                    for (d, rd) in route.iter().enumerate() {
                        destinations.push((
                            format!("spec.{kind}[{r}].route[{d}].destination"),
                            &rd.destination,
                        ));
                    }
                }
            }
            for (field, d) in destinations {
                let Some(i) = self.resolve_host(&d.host, &vs.namespace) else {
                    return Err(res.error(
                        format!("{field}.host"),
                        format!(
                            "`{}` is not a service of the mesh or a ServiceEntry host",
                            d.host
                        ),
                    ));
                };
                if let Some(subset) = &d.subset {
                    let defined = rule_for
                        .get(&i)
                        .is_some_and(|dr| dr.subsets.iter().any(|s| &s.name == subset));
                    if !defined {
                        return Err(res.error(
                            format!("{field}.subset"),
                            format!(
                                "no DestinationRule for `{}` defines subset `{subset}`",
                                d.host
                            ),
                        ));
                    }
                }
            }
        }
        for rl in &self.rate_limits {
            if self.resolve_host(&rl.service, &rl.namespace).is_none() {
                return Err(res_of(Kind::RateLimit, &rl.namespace, &rl.name).error(
                    "spec.target.service",
                    format!("no service `{}` in the mesh", rl.service),
                ));
            }
        }
        for q in &self.quotas {
            if self.resolve_host(&q.service, &q.namespace).is_none() {
                return Err(res_of(Kind::Quota, &q.namespace, &q.name).error(
                    "spec.target.service",
                    format!("no service `{}` in the mesh", q.service),
                ));
            }
        }
        for ap in &self.access_policies {
            if self.resolve_host(&ap.service, &ap.namespace).is_none() {
                return Err(res_of(Kind::AccessPolicy, &ap.namespace, &ap.name).error(
                    "spec.target.service",
                    format!("no service `{}` in the mesh", ap.service),
                ));
            }
        }
        Ok(())
    }

    /// The DestinationRule for the service at `index`, if any.
    pub fn destination_rule(&self, index: usize) -> Option<&DestinationRule> {
        self.destination_rules
            .iter()
            .find(|dr| self.resolve_host(&dr.host, &dr.namespace) == Some(index))
    }

    /// The service a host of an Istio resource in `namespace` names: a
    /// ServiceEntry host, a short name (read in `namespace`), or a
    /// Kubernetes name such as `reviews.prod.svc.cluster.local`.
    pub fn resolve_host(&self, host: &str, namespace: &str) -> Option<usize> {
        if let Some(&i) = self.external.get(host) {
            return Some(i);
        }
        self.resolve_index(host, namespace)
    }

    /// The service `name` in `namespace`.
    pub fn find(&self, name: &str, namespace: &str) -> Option<&Service> {
        let &i = self.index.get(namespace)?.get(name)?;
        Some(&self.services[i])
    }

    /// The service whose cluster IP (and port, when it declares one) a
    /// transparently captured connection was dialled to.
    pub fn by_address(&self, dst: SocketAddr) -> Option<&Service> {
        self.index_by_address(dst).map(|i| &self.services[i])
    }

    /// Like [`by_address`](Self::by_address), but gives the position in
    /// [`services`](Self::services).
    pub fn index_by_address(&self, dst: SocketAddr) -> Option<usize> {
        self.services
            .iter()
            .position(|s| s.cluster_ip == Some(dst.ip()) && s.port.is_none_or(|p| p == dst.port()))
    }

    /// Finds the service an HTTP authority names, the way Kubernetes DNS
    /// resolves it: `reviews`, `reviews:9080`, `reviews.default`,
    /// `reviews.default.svc.cluster.local:9080`, or a ServiceEntry's host.
    /// A bare name is looked up in the caller's namespace. A port, when
    /// given and the service declares one, must match.
    pub fn resolve(&self, authority: &str, caller_namespace: &str) -> Option<&Service> {
        self.resolve_index(authority, caller_namespace)
            .map(|i| &self.services[i])
    }

    /// Like [`resolve`](Self::resolve), but gives the service's position in
    /// [`services`](Self::services), for per-service state kept beside the config.
    pub fn resolve_index(&self, authority: &str, caller_namespace: &str) -> Option<usize> {
        let (host, port) = split_authority(authority)?;
        let i = match self.external.get(host) {
            Some(&i) => i,
            None => {
                let mut labels = host.split('.');
                let name = labels.next()?;
                let namespace = match labels.next() {
                    None => caller_namespace,
                    Some(ns) => {
                        let rest: Vec<&str> = labels.collect();
                        if !(rest.is_empty()
                            || rest == ["svc"]
                            || rest == ["svc", "cluster", "local"])
                        {
                            return None;
                        }
                        ns
                    }
                };
                *self.index.get(namespace)?.get(name)?
            }
        };
        match (port, self.services[i].port) {
            (Some(asked), Some(declared)) if asked != declared => None,
            _ => Some(i),
        }
    }
}

/// Splits `host[:port]` (IPv6 hosts in brackets, returned without them).
/// `None` when malformed.
pub fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    if authority.is_empty() {
        return None;
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(p) => Some((host, Some(p.parse().ok()?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, p)) => Some((host, Some(p.parse().ok()?))),
        None => Some((authority, None)),
    }
}

/// A DNS-1123 label, as Kubernetes requires of service and namespace names.
fn check_dns_label(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{value}` is not a valid name: use 1-63 lower-case letters, digits or '-', \
             starting and ending with a letter or digit"
        ))
    }
}

fn validate_service(s: ServiceSpec, at: &str) -> Result<Service, (String, String)> {
    check_dns_label(&s.name).map_err(|r| (format!("{at}.name"), r))?;
    let namespace = s.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    check_dns_label(&namespace).map_err(|r| (format!("{at}.namespace"), r))?;
    if s.port == Some(0) {
        return Err((format!("{at}.port"), "must be between 1 and 65535".into()));
    }
    let mut endpoints: Vec<Endpoint> = Vec::with_capacity(s.endpoints.len());
    for (j, e) in s.endpoints.into_iter().enumerate() {
        let field = format!("{at}.endpoints[{j}]");
        let address: SocketAddr = e.address.trim().parse().map_err(|_| {
            (
                format!("{field}.address"),
                format!("`{}` is not an IP:port socket address", e.address),
            )
        })?;
        if address.port() == 0 {
            return Err((format!("{field}.address"), "port must not be 0".into()));
        }
        if let Some(dup) = endpoints.iter().position(|x| x.address == address) {
            return Err((
                format!("{field}.address"),
                format!("`{address}` is already listed as endpoints[{dup}]"),
            ));
        }
        let version = e.version.unwrap_or_else(|| "unknown".to_string());
        let mut endpoint = Endpoint::new(address, &s.name, &version);
        match e.workload {
            Some(w) if w.trim().is_empty() => {
                return Err((format!("{field}.workload"), "must not be empty".into()));
            }
            Some(w) => endpoint.workload = w.into(),
            None => {}
        }
        if !e.labels.is_empty() {
            let mut labels = BTreeMap::clone(&endpoint.labels);
            for (k, v) in e.labels {
                if k == "version" && v != version {
                    return Err((
                        format!("{field}.labels.version"),
                        format!("`{v}` differs from the endpoint's version `{version}`"),
                    ));
                }
                labels.insert(k, v);
            }
            endpoint.labels = Arc::new(labels);
        }
        if let Some(l) = e.locality.filter(|l| !l.is_empty()) {
            if l.split('/').count() > 3 || l.split('/').any(str::is_empty) {
                return Err((
                    format!("{field}.locality"),
                    format!("`{l}` is not region, region/zone or region/zone/subzone"),
                ));
            }
            endpoint.locality = Some(l.into());
        }
        if let Some(sa) = e.service_account {
            if !crate::identity::valid_segment(&sa) {
                return Err((
                    format!("{field}.serviceAccount"),
                    format!("`{sa}` is not a Kubernetes name"),
                ));
            }
            endpoint.service_account = Some(sa.into());
        }
        endpoints.push(endpoint);
    }
    let cluster_ip = match s.cluster_ip {
        None => None,
        Some(ip) => Some(ip.trim().parse().map_err(|_| {
            (
                format!("{at}.clusterIP"),
                format!("`{ip}` is not an IP address"),
            )
        })?),
    };
    let retries = match s.retries {
        Some(r) => validate_retries(r, &format!("{at}.retries"))?,
        None => RetryPolicy::default(),
    };
    Ok(Service {
        name: s.name.into(),
        namespace: namespace.into(),
        port: s.port,
        cluster_ip,
        protocol: s.protocol,
        retries: Arc::new(retries),
        endpoints,
        external_host: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: lumen.dev/v1alpha1
kind: Mesh
metadata:
  name: bookinfo
spec:
  services:
    - name: reviews
      port: 9080
      endpoints:
        - address: 127.0.0.1:15106
          version: v1
        - address: 127.0.0.1:15107
          version: v2
          workload: reviews-second
    - name: ratings
      namespace: prod
"#;

    #[test]
    fn parses_services_with_defaults() {
        let mesh = MeshConfig::from_yaml("mesh.yaml", GOOD).unwrap();
        assert_eq!(mesh.services.len(), 2);
        let reviews = &mesh.services[0];
        assert_eq!(&*reviews.namespace, "default");
        assert_eq!(&*reviews.endpoints[0].workload, "reviews-v1");
        assert_eq!(&*reviews.endpoints[1].workload, "reviews-second");
        assert_eq!(&*reviews.endpoints[1].address_str, "127.0.0.1:15107");
        assert!(mesh.services[1].endpoints.is_empty());
    }

    #[test]
    fn resolves_authorities_like_kubernetes_dns() {
        let mesh = MeshConfig::from_yaml("mesh.yaml", GOOD).unwrap();
        for a in [
            "reviews",
            "reviews:9080",
            "reviews.default",
            "reviews.default.svc",
            "reviews.default.svc.cluster.local:9080",
        ] {
            assert_eq!(
                mesh.resolve(a, "default").map(|s| &*s.name),
                Some("reviews"),
                "{a}"
            );
        }
        assert!(mesh.resolve("reviews:1234", "default").is_none());
        assert!(mesh.resolve("reviews", "prod").is_none());
        assert!(mesh.resolve("ratings", "prod").is_some());
        assert!(
            mesh.resolve("ratings.prod.example.com", "default")
                .is_none()
        );
        assert!(mesh.resolve("", "default").is_none());
        assert!(mesh.resolve("reviews:abc", "default").is_none());
    }

    fn error_of(yaml: &str) -> ConfigError {
        MeshConfig::from_yaml("mesh.yaml", yaml).unwrap_err()
    }

    #[test]
    fn errors_name_file_field_and_reason() {
        let e = error_of(&GOOD.replace("127.0.0.1:15107", "not-an-address"));
        assert_eq!(e.file, "mesh.yaml");
        assert_eq!(e.field, "spec.services[0].endpoints[1].address");
        assert!(e.reason.contains("not-an-address"), "{e}");

        let e = error_of(&GOOD.replace("name: ratings", "name: Ratings_1"));
        assert_eq!(e.field, "spec.services[1].name");

        let e = error_of(&GOOD.replace("port: 9080", "port: 99999"));
        assert_eq!(e.field, "spec.services[0].port");

        let e = error_of(&GOOD.replace("port: 9080", "prot: 9080"));
        assert_eq!(e.field, "spec.services[0].prot");
        assert!(e.reason.contains("prot"), "{e}");

        let e = error_of(&GOOD.replace("kind: Mesh", "kind: EnvoyFilter"));
        assert_eq!(e.field, "kind");

        let e = error_of(&GOOD.replace("v1alpha1", "v9"));
        assert_eq!(e.field, "apiVersion");

        let e = error_of(&GOOD.replace("name: ratings\n      namespace: prod", "name: reviews"));
        assert!(e.reason.contains("already defined"), "{e}");

        let e = error_of("");
        assert!(e.reason.contains("no resources"), "{e}");

        let e = error_of("apiVersion: [");
        assert!(e.reason.contains("invalid YAML"), "{e}");
        assert_eq!(
            e.to_string(),
            format!("mesh.yaml: {}", e.reason),
            "whole-file errors have no field"
        );
    }

    #[test]
    fn several_documents_are_merged() {
        let two = format!(
            "{GOOD}\n---\n{}",
            GOOD.replace("reviews", "details")
                .replace("ratings", "other")
        );
        let mesh = MeshConfig::from_yaml("mesh.yaml", &two).unwrap();
        assert_eq!(mesh.services.len(), 4);
        let dup = format!("{GOOD}\n---\n{GOOD}");
        let e = error_of(&dup);
        assert!(e.field.starts_with("document 2: spec.services[0]"), "{e}");
    }
}

/// Istio's own Bookinfo files (`tests/data/istio/`), read over a Bookinfo
/// registry, as Istio's task pages apply them.
#[cfg(test)]
mod istio_files {
    use super::*;

    const BOOKINFO: &str = r#"
apiVersion: lumen.dev/v1alpha1
kind: Mesh
metadata:
  name: bookinfo
spec:
  services:
    - name: productpage
      port: 9080
      endpoints: [{address: 127.0.0.1:9101, version: v1}]
    - name: details
      port: 9080
      endpoints: [{address: 127.0.0.1:9102, version: v1}]
    - name: reviews
      port: 9080
      endpoints:
        - {address: 127.0.0.1:9103, version: v1}
        - {address: 127.0.0.1:9104, version: v2}
        - {address: 127.0.0.1:9105, version: v3}
    - name: ratings
      port: 9080
      endpoints: [{address: 127.0.0.1:9106, version: v1}]
"#;

    macro_rules! istio {
        ($name:literal) => {
            (
                $name,
                include_str!(concat!(
                    "../../tests/data/istio/bookinfo/networking/",
                    $name
                )),
            )
        };
    }

    fn mesh_with(files: &[(&str, &str)]) -> Result<MeshConfig, ConfigError> {
        let mut resources = parse_resources("mesh.yaml", BOOKINFO)?;
        for (name, text) in files {
            resources.extend(parse_resources(name, text)?);
        }
        MeshConfig::from_resources(&resources)
    }

    #[test]
    fn istios_routing_tasks_apply_unchanged() {
        let rules = istio!("destination-rule-all.yaml");
        for file in [
            istio!("virtual-service-all-v1.yaml"),
            istio!("virtual-service-reviews-test-v2.yaml"),
            istio!("virtual-service-reviews-80-20.yaml"),
            istio!("virtual-service-reviews-90-10.yaml"),
            istio!("virtual-service-reviews-50-v3.yaml"),
            istio!("virtual-service-reviews-v3.yaml"),
            istio!("virtual-service-reviews-v2-v3.yaml"),
            istio!("virtual-service-reviews-jason-v2-v3.yaml"),
            istio!("virtual-service-ratings-test-abort.yaml"),
            istio!("virtual-service-ratings-test-delay.yaml"),
            istio!("virtual-service-details-v2.yaml"),
            istio!("virtual-service-ratings-db.yaml"),
            istio!("virtual-service-ratings-mysql.yaml"),
            istio!("virtual-service-ratings-mysql-vm.yaml"),
            istio!("bookinfo-gateway.yaml"),
        ] {
            let mesh = mesh_with(&[rules, file]).unwrap_or_else(|e| panic!("{}: {e}", file.0));
            assert!(!mesh.virtual_services.is_empty(), "{}", file.0);
        }
        let mesh = mesh_with(&[istio!("fault-injection-details-v1.yaml")]).unwrap();
        assert_eq!(mesh.destination_rules.len(), 1);
        // Istio's mTLS task's rules: every host ISTIO_MUTUAL.
        let mesh = mesh_with(&[istio!("destination-rule-all-mtls.yaml")]).unwrap();
        assert!(!mesh.destination_rules.is_empty());
        for dr in &mesh.destination_rules {
            assert_eq!(
                dr.traffic_policy.tls,
                Some(crate::networking::TlsMode::IstioMutual),
                "{}",
                dr.name
            );
        }
    }

    #[test]
    fn what_lumen_lacks_is_refused_by_name() {
        let e = mesh_with(&[istio!("egress-rule-google-apis.yaml")]).unwrap_err();
        assert_eq!(e.field, "spec.endpoints", "{e}");
        assert!(e.reason.contains("DNS"), "{e}");

        // A subset no DestinationRule defines.
        let e = mesh_with(&[istio!("virtual-service-all-v1.yaml")]).unwrap_err();
        assert_eq!(e.field, "spec.http[0].route[0].destination.subset", "{e}");
        assert!(
            e.reason
                .contains("no DestinationRule for `productpage` defines subset `v1`"),
            "{e}"
        );
    }

    #[test]
    fn istios_match_and_weights_read_as_istio_means_them() {
        let mesh = mesh_with(&[
            istio!("destination-rule-all.yaml"),
            istio!("virtual-service-reviews-test-v2.yaml"),
        ])
        .unwrap();
        let vs = &mesh.virtual_services[0];
        let m = &vs.http[0].matches[0];
        assert_eq!(m.headers.len(), 1);
        assert_eq!(m.headers[0].0, "end-user");
        assert!(m.headers[0].1.as_ref().unwrap().matches("jason"));
        let reviews = mesh.resolve_host("reviews", "default").unwrap();
        let dr = mesh.destination_rule(reviews).unwrap();
        assert_eq!(dr.subsets.len(), 3);
        let v2 = &dr.subsets[1];
        let selected: Vec<&str> = mesh.services[reviews]
            .endpoints
            .iter()
            .filter(|e| e.selected_by(&v2.labels))
            .map(|e| &*e.version)
            .collect();
        assert_eq!(selected, ["v2"]);
    }
}

/// Invalid and unsupported resources, each refused with where and why.
#[cfg(test)]
mod refusals {
    use super::*;

    const MESH: &str = "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec:\n  services:\n    - name: reviews\n      endpoints: [{address: 127.0.0.1:1, version: v1}]\n";

    fn refusal(yaml: &str) -> ConfigError {
        let mut resources = parse_resources("mesh.yaml", MESH).unwrap();
        match parse_resources("r.yaml", yaml) {
            Ok(rs) => resources.extend(rs),
            Err(e) => return e,
        }
        MeshConfig::from_resources(&resources).expect_err(yaml)
    }

    #[test]
    fn each_is_refused_naming_file_resource_field_and_reason() {
        let vs = |http: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\nspec:\n  hosts: [reviews]\n  http:\n{http}"
            )
        };
        let dr = |spec: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews}}\nspec:\n  host: reviews\n{spec}"
            )
        };
        let route = "    route: [{destination: {host: reviews}}]\n";
        let table: Vec<(String, &str, &str)> = vec![
            (vs(&format!("  - corsPolicy: {{allowOrigins: [{{exact: x}}]}}\n{route}")), "spec.http[0].corsPolicy", "not supported by Lumen"),
            (vs(&format!("  - delegate: {{name: x}}\n{route}")), "spec.http[0].delegate", "not supported by Lumen"),
            (vs(&format!("  - match: [{{uri: {{exact: /a, prefix: /b}}}}]\n{route}")), "spec.http[0].match[0].uri", "only one of exact, prefix and regex"),
            (vs(&format!("  - match: [{{headers: {{x: {{regex: '['}}}}}}]\n{route}")), "spec.http[0].match[0].headers.x.regex", "not a valid RE2 regex"),
            (vs("  - route: [{destination: {host: reviews}, weight: 60}, {destination: {host: reviews}, weight: 60}]\n"), "spec.http[0].route", "weights sum to 120"),
            (vs("  - route: [{destination: {host: nowhere}}]\n"), "spec.http[0].route[0].destination.host", "`nowhere` is not a service"),
            (vs("  - route: [{destination: {host: reviews, subset: v9}}]\n"), "spec.http[0].route[0].destination.subset", "defines subset `v9`"),
            (vs(&format!("  - fault: {{abort: {{httpStatus: 700}}}}\n{route}")), "spec.http[0].fault.abort.httpStatus", "not an HTTP status"),
            (vs(&format!("  - fault: {{delay: {{fixedDelay: soon}}}}\n{route}")), "spec.http[0].fault.delay.fixedDelay", "not a duration"),
            (vs(&format!("  - retries: {{attempts: 3, retryOn: sometimes}}\n{route}")), "spec.http[0].retries.retryOn", "unknown retry condition `sometimes`"),
            (vs("  - redirect: {uri: /x, redirectCode: 200}\n"), "spec.http[0].redirect.redirectCode", "not a redirect status"),
            (vs(&format!("  - redirect: {{uri: /x}}\n{route}")), "spec.http[0]", "only one of route, redirect and directResponse"),
            (vs(&format!("  - timeout: 1s\n    rout: []\n{route}")), "spec.http[0].rout", "unknown field `rout`"),
            (vs(&format!("  - headers: {{request: {{set: {{':path': /x}}}}}}\n{route}")), "spec.http[0].headers.request.set.:path", "not a header name"),
            (dr("  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}\n"), "spec.trafficPolicy.loadBalancer.simple", "PASSTHROUGH"),
            (dr("  trafficPolicy: {loadBalancer: {consistentHash: {}}}\n"), "spec.trafficPolicy.loadBalancer.consistentHash", "needs a hash key"),
            (dr("  trafficPolicy: {tls: {mode: MUTUAL}}\n"), "spec.trafficPolicy.tls.mode", "MUTUAL"),
            (dr("  trafficPolicy: {outlierDetection: {maxEjectionPercent: 150}}\n"), "spec.trafficPolicy.outlierDetection.maxEjectionPercent", "not between 0 and 100"),
            (dr("  trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}\n"), "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy", "UPGRADE"),
            (dr("  workloadSelector: {matchLabels: {app: x}}\n"), "spec.workloadSelector", "not supported by Lumen"),
            (dr("  subsets: [{name: v1}, {name: v1}]\n"), "spec.subsets[1].name", "already defined"),
            ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 443, protocol: TLS, name: tls}]\n  resolution: NONE\n".into(), "spec.resolution", "NONE"),
            ("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers: [{port: {number: 443, protocol: HTTPS, name: https}, hosts: ['*']}]\n".into(), "spec.servers[0].tls", "needs tls"),
            ("apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s}\nspec: {egress: [{hosts: ['./*']}]}\n".into(), "spec.egress", "not supported by Lumen"),
            ("apiVersion: networking.istio.io/v1\nkind: EnvoyFilter\nmetadata: {name: s}\nspec: {}\n".into(), "kind", "unknown kind `EnvoyFilter`"),
        ];
        for (yaml, field, reason) in &table {
            let e = refusal(yaml);
            assert_eq!(e.file, "r.yaml", "{yaml}");
            assert_eq!(&e.field, field, "{e}");
            assert!(e.reason.contains(reason), "{e}");
            if *field != "kind" {
                assert!(!e.resource.is_empty(), "{e}");
            }
        }
    }
}
