//! Routing: which route and cluster a request takes, from a table compiled
//! once per configuration snapshot.
//!
//! For every service the table holds the routes of the VirtualService for
//! its host (first match wins) or, with none, one default route to the
//! whole service. Matchers, weights and clusters are built when the
//! snapshot arrives, never per request; per-endpoint state comes from the
//! [`Registry`] and per-cluster state from the table being replaced, so a
//! push keeps loads, ejections and circuit-breaker counts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use lumen_core::networking::virtual_service::{L4Match, RouteDestination};
use lumen_core::networking::{
    Fault, Headers, HttpAction, HttpMatch, Redirect, Rewrite, StringMatch,
};
use lumen_core::{MeshConfig, RetryPolicy, Workload};

use crate::cluster::{Cluster, ClusterEndpoint, cluster_name, locality_priority};
use crate::edit::query_param;
use crate::endpoint::Registry;
use crate::ratelimit::Limiter;

/// The route every request of a service takes when no VirtualService routes it.
pub const DEFAULT_ROUTE: &str = "default";

/// Who this proxy is, as route matches and locality see it.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// `region/zone/subzone`.
    pub locality: Option<String>,
    /// A gateway proxy: it listens on the ports of the Gateways' servers
    /// that select it (by labels) and routes by the VirtualServices bound
    /// to them, not by service names.
    pub gateway: bool,
    /// The local app's port, which PeerAuthentication's `portLevelMtls`
    /// names.
    pub app_port: Option<u16>,
}

impl Caller {
    /// A sidecar's view of itself: `app` and `version` labels from its
    /// workload, plus any it was given.
    pub fn of(w: &Workload, extra: &BTreeMap<String, String>, locality: Option<String>) -> Self {
        let mut labels = BTreeMap::new();
        labels.insert("app".to_string(), w.service.to_string());
        if &*w.version != "unknown" {
            labels.insert("version".to_string(), w.version.to_string());
        }
        labels.extend(extra.clone());
        Caller {
            namespace: w.namespace.to_string(),
            labels,
            locality,
            gateway: false,
            app_port: None,
        }
    }
}

/// What a matched route does.
#[derive(Debug)]
pub enum Action {
    /// To one of these clusters, by weight (weights sum to 100).
    Forward(Vec<(Arc<Cluster>, u32, Headers)>),
    Redirect(Redirect),
    Direct {
        status: u16,
        body: Bytes,
    },
}

/// One compiled HTTP route.
#[derive(Debug)]
pub struct Route {
    /// `<virtual service>/<route name or position>`, or `default`.
    pub name: Arc<str>,
    matches: Vec<HttpMatch>,
    pub action: Action,
    pub rewrite: Option<Rewrite>,
    pub timeout: Option<Duration>,
    pub retries: Option<Arc<RetryPolicy>>,
    pub fault: Option<Fault>,
    pub mirrors: Vec<(Arc<Cluster>, f64)>,
    pub headers: Headers,
}

/// A compiled TCP route.
#[derive(Debug)]
struct TcpRoute {
    name: Arc<str>,
    matches: Vec<L4Match>,
    destinations: Vec<(Arc<Cluster>, u32)>,
}

/// A gateway's routes for one VirtualService host (`*` and `*.x` too).
#[derive(Debug)]
struct GatewayHost {
    /// The Gateway (`namespace/name`) whose VirtualServices these are.
    gateway: Arc<str>,
    host: String,
    routes: RouteList,
}

impl GatewayHost {
    fn matches(&self, host: &str) -> bool {
        host_matches(&self.host, host)
    }

    /// Exact hosts before wildcards, longer wildcards before shorter.
    fn rank(&self) -> (bool, std::cmp::Reverse<usize>) {
        (
            self.host.starts_with('*'),
            std::cmp::Reverse(self.host.len()),
        )
    }
}

/// A Gateway server on a gateway proxy's port, with the Gateway
/// (`namespace/name`) it belongs to: its routes are that Gateway's.
#[derive(Debug, Clone)]
pub struct PortServer {
    pub gateway: Arc<str>,
    pub server: lumen_core::networking::GatewayServer,
}

/// A `tls` or `tcp` route at a gateway, with the Gateway and the
/// VirtualService hosts it was bound through.
#[derive(Debug)]
struct GatewayL4 {
    gateway: Arc<str>,
    hosts: Vec<String>,
    route: Arc<TcpRoute>,
}

/// A gateway proxy's port: the Gateway servers on it that select this
/// proxy, and the routes of the VirtualServices bound to them.
#[derive(Debug)]
pub struct GatewayPort {
    pub port: u16,
    pub servers: Vec<PortServer>,
    http: Vec<GatewayHost>,
    /// `tls` routes, by SNI (PASSTHROUGH servers).
    tls: Vec<GatewayL4>,
    /// `tcp` routes (TCP servers, and TLS servers once terminated).
    tcp: Vec<GatewayL4>,
}

impl GatewayPort {
    /// The server a TLS connection's ClientHello picks: the one serving
    /// its server name exactly, else the one with the longest wildcard
    /// that matches (`*` last), as Envoy's SNI matching; without a name,
    /// one serving `*`.
    pub fn server_for_sni(&self, sni: Option<&str>) -> Option<&PortServer> {
        let tls = self.servers.iter().filter(|s| s.server.is_tls());
        match sni {
            Some(name) => tls
                .clone()
                .find(|s| s.server.hosts.iter().any(|h| h.eq_ignore_ascii_case(name)))
                .or_else(|| {
                    tls.filter_map(|s| {
                        let longest = s
                            .server
                            .hosts
                            .iter()
                            .filter(|h| {
                                h.starts_with('*')
                                    && lumen_core::networking::gateway::host_pattern_matches(
                                        h, name,
                                    )
                            })
                            .map(String::len)
                            .max()?;
                        Some((longest, s))
                    })
                    // The first server of the longest wildcard.
                    .fold(None::<(usize, &PortServer)>, |best, (n, s)| match best {
                        Some((b, _)) if b >= n => best,
                        _ => Some((n, s)),
                    })
                    .map(|(_, s)| s)
                }),
            None => tls
                .clone()
                .find(|s| s.server.hosts.iter().any(|h| h == "*")),
        }
    }

    /// Whether connections here open with TLS.
    pub fn is_tls(&self) -> bool {
        self.servers.iter().any(|s| s.server.is_tls())
    }
}

/// Whether a route bound through VirtualService `hosts` belongs to a
/// server with `server_hosts`.
fn hosts_meet(hosts: &[String], server_hosts: &[String]) -> bool {
    use lumen_core::networking::gateway::host_pattern_matches;
    hosts.iter().any(|h| {
        server_hosts
            .iter()
            .any(|s| host_pattern_matches(s, h) || host_pattern_matches(h, s))
    })
}

#[derive(Debug, Default)]
struct Host {
    http: RouteList,
    tcp: Vec<Arc<TcpRoute>>,
    /// Routes by the ClientHello's server name, tried before `tcp` when a
    /// connection opens with TLS.
    tls: Vec<Arc<TcpRoute>>,
    default: Option<Arc<Cluster>>,
    /// The RateLimits on this service, checked by its callers.
    limits: Vec<Arc<Limiter>>,
    /// The AccessPolicies on it that are on.
    access: Vec<Arc<lumen_core::access::AccessRule>>,
    /// The Quotas on it.
    quotas: Vec<Arc<crate::quota::QuotaRule>>,
}

/// An immutable routing table; swapped whole when the configuration
/// changes, never mutated in place.
#[derive(Debug)]
pub struct RoutingTable {
    mesh: Arc<MeshConfig>,
    hosts: Vec<Host>,
    /// A gateway proxy's ports and their routes; `None` for a sidecar.
    gateway: Option<Vec<GatewayPort>>,
    clusters: HashMap<Arc<str>, Arc<Cluster>>,
    inbound_mtls: lumen_core::security::MtlsMode,
    inbound_authz: lumen_core::authz::WorkloadPolicies,
    inbound_jwt: Vec<lumen_core::security::RequestAuthentication>,
    outbound_mode: lumen_core::networking::OutboundMode,
}

/// Why an outbound request has nowhere to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoute {
    /// No service of that name (404, `NR`).
    UnknownService,
    /// The service is routed, but no route matches the request (404, `NR`).
    NoMatch,
    /// The service exists but has no endpoints (503, `UH`).
    NoEndpoints,
}

/// What routing decided for a request, in the table it was routed by
/// (kept for the request's life, so a config change mid-request changes
/// nothing).
#[derive(Clone, Debug)]
pub struct Routed {
    pub table: Arc<RoutingTable>,
    /// The destination service (`None` for a gateway's redirect or direct
    /// response, which has none).
    pub service: Option<usize>,
    pub route: Arc<Route>,
    /// The cluster a forwarding route chose (by weight); `None` for a
    /// redirect or direct response.
    pub cluster: Option<Arc<Cluster>>,
    /// Which of the route's destinations, for its header edits.
    pub destination: usize,
    /// How much of the path a `uri: {prefix}` match matched, for rewrites.
    pub matched_prefix: Option<usize>,
    /// An exact or regex `uri` match held: a rewrite replaces the whole path.
    pub matched_whole_uri: bool,
}

impl Routed {
    pub fn service(&self) -> Option<&lumen_core::Service> {
        self.service.map(|i| &self.table.mesh.services[i])
    }

    /// The route's retry policy, or the service's.
    pub fn retries(&self) -> &RetryPolicy {
        static NONE: std::sync::LazyLock<RetryPolicy> =
            std::sync::LazyLock::new(RetryPolicy::default);
        match (&self.route.retries, &self.cluster, self.service()) {
            (Some(r), _, _) => r,
            (None, Some(c), _) => &c.retries,
            (None, None, Some(s)) => &s.retries,
            (None, None, None) => &NONE,
        }
    }

    pub fn destination_headers(&self) -> Option<&Headers> {
        match &self.route.action {
            Action::Forward(ds) => ds.get(self.destination).map(|(_, _, h)| h),
            _ => None,
        }
    }
}

/// The parts of a request routes match on.
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub authority: &'a str,
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
    /// The port the caller addressed (in the authority, or the service's).
    pub port: Option<u16>,
}

impl RoutingTable {
    /// Compiles `mesh` for a proxy that is `caller`. State for endpoints and
    /// clusters is taken from `registry` and `previous`.
    pub fn new(
        mesh: Arc<MeshConfig>,
        caller: &Caller,
        registry: &Registry,
        previous: Option<&RoutingTable>,
    ) -> Self {
        let mut b = Builder {
            mesh: &mesh,
            caller,
            registry,
            previous,
            clusters: HashMap::new(),
            gateway: None,
        };
        let mut hosts: Vec<Host> = (0..mesh.services.len()).map(|_| Host::default()).collect();
        for (i, host) in hosts.iter_mut().enumerate() {
            host.default = Some(b.cluster(i, None, None));
        }
        let mut http: Vec<Vec<Arc<Route>>> = vec![Vec::new(); hosts.len()];
        for vs in mesh.virtual_services.iter().filter(|v| v.applies_to_mesh()) {
            let targets: Vec<usize> = vs
                .hosts
                .iter()
                .filter_map(|h| mesh.resolve_host(h, &vs.namespace))
                .collect();
            for route in &vs.http {
                let Some(matches) = b.own_matches(&route.matches, |m| {
                    (&m.gateways, &m.source_labels, m.source_namespace.as_deref())
                }) else {
                    continue;
                };
                let compiled = Arc::new(b.route(vs, route, matches));
                for &i in &targets {
                    http[i].push(compiled.clone());
                }
            }
            for route in &vs.tcp {
                if let Some(r) = b.l4_route(vs, "tcp", &route.name, &route.matches, &route.route) {
                    for &i in &targets {
                        hosts[i].tcp.push(r.clone());
                    }
                }
            }
            for route in &vs.tls {
                if let Some(r) = b.l4_route(vs, "tls", &route.name, &route.matches, &route.route) {
                    for &i in &targets {
                        hosts[i].tls.push(r.clone());
                    }
                }
            }
        }
        for (host, routes) in hosts.iter_mut().zip(http) {
            host.http = RouteList::new(routes);
        }
        // A conditional limit is in the table only while the policy engine
        // has it on — or, once its decisions are stale, if it fails closed.
        let on = |rl: &&lumen_core::policy::RateLimit| match &rl.when {
            None => true,
            Some(_) if mesh.policies_stale => rl.fail_mode == lumen_core::policy::FailMode::Closed,
            Some(_) => mesh.active_policies.contains(&rl.id()),
        };
        for rl in mesh.rate_limits.iter().filter(on) {
            let Some(i) = mesh.resolve_host(&rl.service, &rl.namespace) else {
                continue;
            };
            let before = previous.and_then(|p| {
                p.hosts
                    .iter()
                    .flat_map(|h| &h.limits)
                    .find(|l| l.spec.name == rl.name && l.spec.namespace == rl.namespace)
            });
            hosts[i].limits.push(Limiter::carried_over(before, rl));
        }
        for q in &mesh.quotas {
            if let Some(i) = mesh.resolve_host(&q.service, &q.namespace) {
                hosts[i]
                    .quotas
                    .push(Arc::new(crate::quota::QuotaRule::new(q)));
            }
        }
        for ap in &mesh.access_policies {
            let Some(i) = mesh.resolve_host(&ap.service, &ap.namespace) else {
                continue;
            };
            if let Some(rule) = lumen_core::access::AccessRule::compile(
                ap,
                &mesh.active_policies,
                mesh.policies_stale,
            ) {
                hosts[i].access.push(Arc::new(rule));
            }
        }
        let gateway = caller.gateway.then(|| b.gateway_ports());
        let clusters = b.clusters;
        let keep: HashSet<SocketAddr> = clusters
            .values()
            .flat_map(|c| c.endpoints.iter().map(|e| e.state.address))
            .collect();
        registry.retain(&keep);
        let inbound_mtls = lumen_core::security::mtls_mode(
            &mesh.peer_authentications,
            &caller.namespace,
            &caller.labels,
            caller.app_port,
        );
        let inbound_authz = lumen_core::authz::WorkloadPolicies::of(
            &mesh.authorization_policies,
            &caller.namespace,
            &caller.labels,
        );
        let inbound_jwt = mesh
            .request_authentications
            .iter()
            .filter(|r| r.applies(&caller.namespace, &caller.labels))
            .cloned()
            .collect();
        let outbound_mode = lumen_core::networking::sidecar::outbound_mode(
            &mesh.sidecars,
            mesh.outbound_traffic_policy,
            &caller.namespace,
            &caller.labels,
        );
        RoutingTable {
            mesh,
            hosts,
            gateway,
            clusters,
            inbound_mtls,
            inbound_authz,
            inbound_jwt,
            outbound_mode,
        }
    }

    /// The AuthorizationPolicies that apply to this workload.
    pub fn inbound_authz(&self) -> &lumen_core::authz::WorkloadPolicies {
        &self.inbound_authz
    }

    /// The RequestAuthentications that apply to this workload.
    pub fn inbound_jwt(&self) -> &[lumen_core::security::RequestAuthentication] {
        &self.inbound_jwt
    }

    /// Whether this workload may call hosts outside the registry (its
    /// Sidecar's `outboundTrafficPolicy`, else the mesh's).
    pub fn outbound_mode(&self) -> lumen_core::networking::OutboundMode {
        self.outbound_mode
    }

    /// What the inbound side accepts, by the PeerAuthentications in force.
    pub fn inbound_mtls(&self) -> lumen_core::security::MtlsMode {
        self.inbound_mtls
    }

    pub fn mesh(&self) -> &Arc<MeshConfig> {
        &self.mesh
    }

    pub fn clusters(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.clusters.values()
    }

    /// The service `authority` names (or, for captured traffic naming an
    /// address, the one `original_dst` dialled).
    pub fn service_index(
        &self,
        authority: &str,
        caller_namespace: &str,
        original_dst: Option<SocketAddr>,
    ) -> Option<usize> {
        self.mesh
            .resolve_index(authority, caller_namespace)
            .or_else(|| original_dst.and_then(|d| self.mesh.index_by_address(d)))
    }

    /// Routes an HTTP request for the service at `service`: the first
    /// route whose match holds, and for a forwarding route a cluster by
    /// weight.
    pub fn route(
        self: &Arc<Self>,
        service: usize,
        req: &RequestView<'_>,
    ) -> Result<Routed, NoRoute> {
        let host = &self.hosts[service];
        let (route, uri) = if host.http.routes.is_empty() {
            (self.default_route(service), UriMatch::None)
        } else {
            host.http.find(req).ok_or(NoRoute::NoMatch)?
        };
        self.routed(Some(service), route, uri)
    }

    /// Whether this is a gateway proxy's table.
    pub fn is_gateway(&self) -> bool {
        self.gateway.is_some()
    }

    /// A gateway proxy's ports (empty for a sidecar).
    pub fn gateway_ports(&self) -> &[GatewayPort] {
        self.gateway.as_deref().unwrap_or_default()
    }

    /// The gateway's routes on `port`, if a server there selects it.
    pub fn gateway_port(&self, port: u16) -> Option<&GatewayPort> {
        self.gateway_ports().iter().find(|p| p.port == port)
    }

    /// Routes a request at a gateway's `port`: the routes of the
    /// VirtualService host the authority matches (exact before wildcard),
    /// first match wins. `chosen` is the server a TLS connection's SNI
    /// picked: the Host must be one of its hosts and only its Gateway's
    /// routes apply, as Istio scopes each HTTPS server's routes. A
    /// plaintext server with `httpsRedirect` answers with a 301 to https.
    pub fn route_gateway(
        self: &Arc<Self>,
        port: u16,
        chosen: Option<&PortServer>,
        req: &RequestView<'_>,
    ) -> Result<Routed, NoRoute> {
        let Some(gw) = self.gateway_port(port) else {
            return Err(NoRoute::NoMatch);
        };
        let host =
            lumen_core::config::split_authority(req.authority).map_or(req.authority, |(h, _)| h);
        if let Some(c) = chosen
            && !c.server.serves(host)
        {
            return Err(NoRoute::NoMatch);
        }
        if chosen.is_none()
            && gw
                .servers
                .iter()
                .any(|s| s.server.https_redirect && !s.server.is_tls() && s.server.serves(host))
        {
            return self.routed(None, https_redirect(), UriMatch::None);
        }
        let (route, uri) = gw
            .http
            .iter()
            .filter(|g| chosen.is_none_or(|c| c.gateway == g.gateway) && g.matches(host))
            .find_map(|g| g.routes.find(req))
            .ok_or(NoRoute::NoMatch)?;
        self.routed(None, route, uri)
    }

    /// The cluster and route for a TCP connection at a gateway's port: by
    /// SNI among `tls` routes for a PASSTHROUGH server (`sni` given), else
    /// the first `tcp` route for the port — of the chosen server's Gateway
    /// and hosts, when SNI chose one.
    pub fn route_gateway_tcp(
        &self,
        port: u16,
        local: SocketAddr,
        sni: Option<&str>,
        chosen: Option<&PortServer>,
    ) -> Result<(Arc<Cluster>, Arc<str>), NoRoute> {
        let gw = self.gateway_port(port).ok_or(NoRoute::NoMatch)?;
        let own = |r: &&GatewayL4| {
            chosen.is_none_or(|c| c.gateway == r.gateway && hosts_meet(&r.hosts, &c.server.hosts))
        };
        let route = match sni {
            Some(sni) => gw.tls.iter().filter(own).find(|r| {
                r.route.matches.iter().any(|m| {
                    l4_matches(m, local) && m.sni_hosts.iter().any(|h| host_matches(h, sni))
                })
            }),
            None => gw.tcp.iter().filter(own).find(|r| {
                r.route.matches.is_empty() || r.route.matches.iter().any(|m| l4_matches(m, local))
            }),
        }
        .ok_or(NoRoute::NoMatch)?;
        let (c, name) = pick_l4(&route.route)?;
        if c.endpoints.is_empty() {
            return Err(NoRoute::NoEndpoints);
        }
        Ok((c, name))
    }

    fn routed(
        self: &Arc<Self>,
        service: Option<usize>,
        route: Arc<Route>,
        uri: UriMatch,
    ) -> Result<Routed, NoRoute> {
        let (cluster, destination) = match &route.action {
            Action::Forward(ds) => {
                let i = pick_weighted(ds.iter().map(|(_, w, _)| *w));
                // Validation resolves every destination; an empty list
                // would still be answered, not panicked on.
                let c = ds.get(i).ok_or(NoRoute::NoEndpoints)?;
                (Some(c.0.clone()), i)
            }
            _ => (None, 0),
        };
        if let Some(c) = &cluster
            && c.endpoints.is_empty()
        {
            return Err(NoRoute::NoEndpoints);
        }
        Ok(Routed {
            table: self.clone(),
            service: cluster.as_ref().map(|c| c.service_index).or(service),
            route,
            cluster,
            destination,
            matched_prefix: match uri {
                UriMatch::Prefix(n) => Some(n),
                _ => None,
            },
            matched_whole_uri: uri == UriMatch::Whole,
        })
    }

    fn default_route(&self, service: usize) -> Arc<Route> {
        let cluster = self.hosts[service]
            .default
            .clone()
            .expect("every service has a default cluster");
        Arc::new(Route {
            name: DEFAULT_ROUTE.into(),
            matches: Vec::new(),
            action: Action::Forward(vec![(cluster, 100, Headers::default())]),
            rewrite: None,
            timeout: None,
            retries: None,
            fault: None,
            mirrors: Vec::new(),
            headers: Headers::default(),
        })
    }

    /// The cluster and route name for an opaque TCP connection to the
    /// service at `service`, dialled at `dst`. A connection that opened
    /// with a TLS ClientHello naming `sni` takes the service's tls routes
    /// first, as Istio's SNI filter chains do.
    pub fn route_tcp(
        &self,
        service: usize,
        dst: SocketAddr,
        sni: Option<&str>,
    ) -> Result<(Arc<Cluster>, Arc<str>), NoRoute> {
        let host = &self.hosts[service];
        let chosen = match sni {
            Some(sni) if !host.tls.is_empty() => {
                let r = host
                    .tls
                    .iter()
                    .find(|r| {
                        r.matches.iter().any(|m| {
                            l4_matches(m, dst) && m.sni_hosts.iter().any(|h| host_matches(h, sni))
                        })
                    })
                    .ok_or(NoRoute::NoMatch)?;
                Some(pick_l4(r)?)
            }
            _ if host.tcp.is_empty() => host
                .default
                .clone()
                .map(|c| (c, Arc::<str>::from(DEFAULT_ROUTE))),
            _ => {
                let r = host
                    .tcp
                    .iter()
                    .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| l4_matches(m, dst)))
                    .ok_or(NoRoute::NoMatch)?;
                Some(pick_l4(r)?)
            }
        };
        match chosen {
            Some((c, _)) if c.endpoints.is_empty() => Err(NoRoute::NoEndpoints),
            Some(x) => Ok(x),
            None => Err(NoRoute::UnknownService),
        }
    }

    /// The rate limits on calls to `service`.
    pub fn limits(&self, service: usize) -> &[Arc<Limiter>] {
        &self.hosts[service].limits
    }

    /// The Quotas on `service`.
    pub fn quotas(&self, service: usize) -> &[Arc<crate::quota::QuotaRule>] {
        &self.hosts[service].quotas
    }

    /// The AccessPolicies on `service` in force now.
    pub fn access(&self, service: usize) -> &[Arc<lumen_core::access::AccessRule>] {
        &self.hosts[service].access
    }

    /// Whether `service` routes TLS by server name.
    pub fn has_tls_routes(&self, service: usize) -> bool {
        !self.hosts[service].tls.is_empty()
    }
}

/// Envoy's `https_redirect`: same host and path, scheme https, port 443.
fn https_redirect() -> Arc<Route> {
    static ROUTE: std::sync::LazyLock<Arc<Route>> = std::sync::LazyLock::new(|| {
        Arc::new(Route {
            name: "https-redirect".into(),
            matches: Vec::new(),
            action: Action::Redirect(Redirect {
                uri: None,
                authority: None,
                port: None,
                port_from_request: false,
                scheme: Some("https".into()),
                code: 301,
            }),
            rewrite: None,
            timeout: None,
            retries: None,
            fault: None,
            mirrors: Vec::new(),
            headers: Headers::default(),
        })
    });
    ROUTE.clone()
}

fn pick_l4(r: &TcpRoute) -> Result<(Arc<Cluster>, Arc<str>), NoRoute> {
    if r.destinations.is_empty() {
        return Err(NoRoute::NoEndpoints);
    }
    let i = pick_weighted(r.destinations.iter().map(|(_, w)| *w));
    Ok((r.destinations[i].0.clone(), r.name.clone()))
}

/// A VirtualService host or SNI pattern (`*`, `*.example.com`, or exact)
/// against a name, ignoring case.
fn host_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        None => pattern.eq_ignore_ascii_case(name),
        Some("") => true,
        Some(suffix) => {
            name.len() > suffix.len()
                && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
    }
}

fn l4_matches(m: &L4Match, dst: SocketAddr) -> bool {
    m.port.is_none_or(|p| p == dst.port())
        && (m.destination_subnets.is_empty()
            || m.destination_subnets
                .iter()
                .any(|(net, bits)| in_subnet(dst.ip(), *net, *bits)))
}

fn in_subnet(ip: std::net::IpAddr, net: std::net::IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (std::net::IpAddr::V4(a), std::net::IpAddr::V4(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(bits))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (std::net::IpAddr::V6(a), std::net::IpAddr::V6(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(bits))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// An index by weight (weights sum to 100, or are all 0).
fn pick_weighted(weights: impl Iterator<Item = u32> + Clone) -> usize {
    let total: u32 = weights.clone().sum();
    if total == 0 {
        return 0;
    }
    let mut r = rand::random_range(0..total);
    for (i, w) in weights.enumerate() {
        if r < w {
            return i;
        }
        r -= w;
    }
    0
}

/// What a route's `uri` condition matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UriMatch {
    None,
    Prefix(usize),
    Whole,
}

/// A host's HTTP routes in order, first match wins, with what their
/// matches need compiled once per table: the header names they read,
/// each looked up at most once per request however many routes test it,
/// and, with many URI regexes (a large table), one [`regex::RegexSet`]
/// that runs them all in a single pass over the path instead of one
/// regex per route tried.
#[derive(Debug, Default)]
struct RouteList {
    routes: Vec<Arc<Route>>,
    /// Per route, per match.
    slots: Vec<Vec<MatchSlots>>,
    /// The distinct header names the matches read.
    header_names: Vec<Option<http::HeaderName>>,
    uri_set: Option<regex::RegexSet>,
}

/// Where one match's conditions find their inputs.
#[derive(Debug, Default)]
struct MatchSlots {
    /// Its `uri` regex's pattern in the list's set.
    uri: Option<usize>,
    /// For `headers`, then `withoutHeaders`, in order: the name's index.
    headers: Vec<usize>,
    without: Vec<usize>,
}

/// Fewer URI regexes than this are run one by one: a set costs a pass
/// over the whole path, a single regex usually stops at the first byte
/// that differs.
const REGEX_SET_MIN: usize = 8;

/// Header values fetched once per request, for this many names; names
/// beyond are looked up each time they are tested.
const CACHED_HEADERS: usize = 8;

impl RouteList {
    fn new(routes: Vec<Arc<Route>>) -> Self {
        let mut patterns: Vec<&str> = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        fn slot<'a>(names: &mut Vec<&'a str>, name: &'a str) -> usize {
            names.iter().position(|n| *n == name).unwrap_or_else(|| {
                names.push(name);
                names.len() - 1
            })
        }
        let mut slots = Vec::with_capacity(routes.len());
        for r in &routes {
            let mut per_match = Vec::with_capacity(r.matches.len());
            for m in &r.matches {
                let uri = match &m.uri {
                    Some(StringMatch::Regex(re)) if !m.ignore_uri_case => {
                        patterns.push(re.as_str());
                        Some(patterns.len() - 1)
                    }
                    _ => None,
                };
                per_match.push(MatchSlots {
                    uri,
                    headers: m.headers.iter().map(|(k, _)| slot(&mut names, k)).collect(),
                    without: m
                        .without_headers
                        .iter()
                        .map(|(k, _)| slot(&mut names, k))
                        .collect(),
                });
            }
            slots.push(per_match);
        }
        // A name that is not a valid header name is never present.
        let header_names = names
            .iter()
            .map(|n| http::HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        // Each pattern compiled alone already; a set too large to build
        // falls back to them.
        let uri_set = if patterns.len() >= REGEX_SET_MIN {
            regex::RegexSet::new(&patterns).ok()
        } else {
            None
        };
        if uri_set.is_none() {
            for s in slots.iter_mut().flatten() {
                s.uri = None;
            }
        }
        RouteList {
            routes,
            slots,
            header_names,
            uri_set,
        }
    }

    /// The first route whose match holds (a route without matches takes
    /// every request), and what its `uri` condition matched.
    fn find(&self, req: &RequestView<'_>) -> Option<(Arc<Route>, UriMatch)> {
        let mut cached: [Option<Option<&str>>; CACHED_HEADERS] = [None; CACHED_HEADERS];
        let mut header = |i: usize| -> Option<&str> {
            let fetch = || {
                let name = self.header_names[i].as_ref()?;
                req.headers.get(name).and_then(|v| v.to_str().ok())
            };
            match cached.get_mut(i) {
                Some(c) => *c.get_or_insert_with(fetch),
                None => fetch(),
            }
        };
        let mut hits: Option<regex::SetMatches> = None;
        for (r, slots) in self.routes.iter().zip(&self.slots) {
            if r.matches.is_empty() {
                return Some((r.clone(), UriMatch::None));
            }
            for (m, slot) in r.matches.iter().zip(slots) {
                if !conditions_hold(m, slot, req, &mut header) {
                    continue;
                }
                let uri = match (&self.uri_set, slot.uri) {
                    (Some(set), Some(k)) => {
                        let hits = hits.get_or_insert_with(|| set.matches(req.path));
                        hits.matched(k).then_some(UriMatch::Whole)
                    }
                    _ => uri_match(m, req.path),
                };
                if let Some(uri) = uri {
                    return Some((r.clone(), uri));
                }
            }
        }
        None
    }
}

fn string_match(m: &Option<StringMatch>, value: Option<&str>) -> bool {
    match (m, value) {
        // `{}`: present, whatever the value.
        (None, v) => v.is_some(),
        (Some(m), Some(v)) => m.matches(v),
        (Some(_), None) => false,
    }
}

/// Whether `m`'s conditions other than `uri` hold for `req` (`header`
/// gives the value of the name at an index of `slots`); tried before the
/// URI so a request most routes do not take runs few regexes.
fn conditions_hold<'r>(
    m: &HttpMatch,
    slots: &MatchSlots,
    req: &RequestView<'r>,
    header: &mut impl FnMut(usize) -> Option<&'r str>,
) -> bool {
    if m.port.is_some_and(|p| req.port != Some(p)) {
        return false;
    }
    let field = |sm: &Option<StringMatch>, v: &str| sm.as_ref().is_none_or(|sm| sm.matches(v));
    if !field(&m.method, req.method)
        || !field(&m.scheme, req.scheme)
        || !field(&m.authority, req.authority)
    {
        return false;
    }
    m.headers
        .iter()
        .zip(&slots.headers)
        .all(|((_, sm), &i)| string_match(sm, header(i)))
        && !m
            .without_headers
            .iter()
            .zip(&slots.without)
            .any(|((_, sm), &i)| string_match(sm, header(i)))
        && m.query_params
            .iter()
            .all(|(k, sm)| string_match(sm, query_param(req.query, k)))
}

/// `m`'s `uri` condition on `path`: `None` when it fails.
fn uri_match(m: &HttpMatch, path: &str) -> Option<UriMatch> {
    let Some(u) = &m.uri else {
        return Some(UriMatch::None);
    };
    let ok = if m.ignore_uri_case {
        u.matches_ignoring_case(path)
    } else {
        u.matches(path)
    };
    match u {
        _ if !ok => None,
        StringMatch::Prefix(p) => Some(UriMatch::Prefix(p.len())),
        _ => Some(UriMatch::Whole),
    }
}

struct Builder<'a> {
    mesh: &'a MeshConfig,
    caller: &'a Caller,
    registry: &'a Registry,
    previous: Option<&'a RoutingTable>,
    clusters: HashMap<Arc<str>, Arc<Cluster>>,
    /// While a gateway's routes are built: that gateway.
    gateway: Option<&'a lumen_core::networking::Gateway>,
}

impl<'a> Builder<'a> {
    /// A gateway proxy's ports: those of the Gateway servers that select
    /// this proxy, each with the routes of the VirtualServices bound to
    /// the Gateways serving it.
    fn gateway_ports(&mut self) -> Vec<GatewayPort> {
        let mesh = self.mesh;
        let selecting: Vec<&lumen_core::networking::Gateway> = mesh
            .gateways
            .iter()
            .filter(|gw| {
                gw.selector
                    .iter()
                    .all(|(k, v)| self.caller.labels.get(k) == Some(v))
            })
            .collect();
        let mut ports: Vec<u16> = selecting
            .iter()
            .flat_map(|gw| gw.servers.iter().map(|s| s.port))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
            .into_iter()
            .map(|port| self.gateway_port(&selecting, port))
            .collect()
    }

    fn gateway_port(
        &mut self,
        selecting: &[&'a lumen_core::networking::Gateway],
        port: u16,
    ) -> GatewayPort {
        use lumen_core::networking::gateway::host_pattern_matches;
        let mesh = self.mesh;
        let mut servers = Vec::new();
        let mut http: Vec<GatewayHost> = Vec::new();
        let (mut tls, mut tcp) = (Vec::new(), Vec::new());
        for &gw in selecting {
            let on_port: Vec<_> = gw.servers.iter().filter(|s| s.port == port).collect();
            if on_port.is_empty() {
                continue;
            }
            let key: Arc<str> = format!("{}/{}", gw.namespace, gw.name).into();
            let server_hosts: Vec<String> = on_port.iter().flat_map(|s| s.hosts.clone()).collect();
            servers.extend(on_port.iter().map(|s| PortServer {
                gateway: key.clone(),
                server: (*s).clone(),
            }));
            self.gateway = Some(gw);
            for vs in &mesh.virtual_services {
                if !vs.gateways.iter().any(|g| gw.is_named(g, &vs.namespace)) {
                    continue;
                }
                if !hosts_meet(&vs.hosts, &server_hosts) {
                    continue;
                }
                let mut routes = Vec::new();
                for route in &vs.http {
                    let Some(matches) = self.own_matches(&route.matches, |m| {
                        (&m.gateways, &m.source_labels, m.source_namespace.as_deref())
                    }) else {
                        continue;
                    };
                    routes.push(Arc::new(self.route(vs, route, matches)));
                }
                let l4 = |route: Arc<TcpRoute>| GatewayL4 {
                    gateway: key.clone(),
                    hosts: vs.hosts.clone(),
                    route,
                };
                for r in &vs.tls {
                    if let Some(r) = self.l4_route(vs, "tls", &r.name, &r.matches, &r.route) {
                        tls.push(l4(r));
                    }
                }
                for r in &vs.tcp {
                    if let Some(r) = self.l4_route(vs, "tcp", &r.name, &r.matches, &r.route) {
                        tcp.push(l4(r));
                    }
                }
                for host in &vs.hosts {
                    if !server_hosts.iter().any(|s| host_pattern_matches(s, host)) {
                        continue;
                    }
                    match http
                        .iter_mut()
                        .find(|h| h.gateway == key && &h.host == host)
                    {
                        Some(h) => {
                            let mut all = h.routes.routes.clone();
                            all.extend(routes.iter().cloned());
                            h.routes = RouteList::new(all);
                        }
                        None => http.push(GatewayHost {
                            gateway: key.clone(),
                            host: host.clone(),
                            routes: RouteList::new(routes.clone()),
                        }),
                    }
                }
            }
        }
        self.gateway = None;
        http.sort_by_key(GatewayHost::rank);
        GatewayPort {
            port,
            servers,
            http,
            tls,
            tcp,
        }
    }

    /// A tcp or tls route compiled for this proxy; `None` when none of its
    /// matches apply to this caller.
    fn l4_route(
        &mut self,
        vs: &lumen_core::networking::VirtualService,
        kind: &str,
        name: &str,
        matches: &[L4Match],
        route: &[RouteDestination],
    ) -> Option<Arc<TcpRoute>> {
        let matches = self.own_matches(matches, |m| {
            (&m.gateways, &m.source_labels, m.source_namespace.as_deref())
        })?;
        let destinations = route
            .iter()
            .filter_map(|d| {
                let c = self.destination(&d.destination, &vs.namespace)?;
                Some((c, d.weight))
            })
            .collect();
        Some(Arc::new(TcpRoute {
            name: format!("{}/{kind}-{name}", vs.name).into(),
            matches,
            destinations,
        }))
    }

    /// The matches that can hold for this proxy; `None` when a route has
    /// matches and every one is for other callers (the route is not this
    /// proxy's).
    fn own_matches<M: Clone>(
        &self,
        matches: &[M],
        caller: impl Fn(&M) -> (&[String], &BTreeMap<String, String>, Option<&str>),
    ) -> Option<Vec<M>> {
        let own: Vec<M> = matches
            .iter()
            .filter(|m| {
                let (gateways, labels, namespace) = caller(m);
                self.caller_matches(gateways, labels, namespace)
            })
            .cloned()
            .collect();
        (matches.is_empty() || !own.is_empty()).then_some(own)
    }

    /// Whether a match's conditions on the caller hold for this proxy.
    fn caller_matches(
        &self,
        gateways: &[String],
        source_labels: &BTreeMap<String, String>,
        source_namespace: Option<&str>,
    ) -> bool {
        let gateway_ok = match self.gateway {
            // At a gateway, a match naming gateways must name this one.
            Some(gw) => {
                gateways.is_empty() || gateways.iter().any(|g| gw.is_named(g, &gw.namespace))
            }
            None => gateways.is_empty() || gateways.iter().any(|g| g == "mesh"),
        };
        gateway_ok
            && source_labels
                .iter()
                .all(|(k, v)| self.caller.labels.get(k) == Some(v))
            && source_namespace.is_none_or(|ns| ns == self.caller.namespace)
    }

    fn destination(
        &mut self,
        d: &lumen_core::networking::Destination,
        namespace: &str,
    ) -> Option<Arc<Cluster>> {
        let i = self.mesh.resolve_host(&d.host, namespace)?;
        Some(self.cluster(i, d.subset.as_deref(), d.port))
    }

    fn route(
        &mut self,
        vs: &lumen_core::networking::VirtualService,
        route: &lumen_core::networking::HttpRoute,
        matches: Vec<HttpMatch>,
    ) -> Route {
        let action = match &route.action {
            HttpAction::Route(ds) => Action::Forward(
                ds.iter()
                    .filter_map(|wd| {
                        let c = self.destination(&wd.destination, &vs.namespace)?;
                        Some((c, wd.weight, wd.headers.clone()))
                    })
                    .collect(),
            ),
            HttpAction::Redirect(r) => Action::Redirect(r.clone()),
            HttpAction::DirectResponse { status, body } => Action::Direct {
                status: *status,
                body: Bytes::from(body.clone()),
            },
        };
        let mirrors = route
            .mirrors
            .iter()
            .filter_map(|m| Some((self.destination(&m.destination, &vs.namespace)?, m.fraction)))
            .collect();
        Route {
            name: format!("{}/{}", vs.name, route.name).into(),
            matches,
            action,
            rewrite: route.rewrite.clone(),
            timeout: route.timeout,
            retries: route.retries.clone().map(Arc::new),
            fault: route.fault.clone(),
            mirrors,
            headers: route.headers.clone(),
        }
    }

    /// The cluster for a service, subset and port, built once per table.
    fn cluster(&mut self, service: usize, subset: Option<&str>, port: Option<u16>) -> Arc<Cluster> {
        let s = &self.mesh.services[service];
        let name: Arc<str> = cluster_name(s, subset, port).into();
        if let Some(c) = self.clusters.get(&name) {
            return c.clone();
        }
        let rule = self.mesh.destination_rule(service);
        let policy = rule
            .map(|r| r.policy(subset, port.or(s.port)))
            .unwrap_or_default();
        let selector = rule
            .and_then(|r| subset.and_then(|n| r.subsets.iter().find(|x| x.name == n)))
            .map(|x| &x.labels);
        // Istio turns locality balancing on with outlier detection, unless
        // the rule turns it off.
        let locality = policy
            .load_balancer
            .as_ref()
            .and_then(|l| l.locality.as_ref());
        let locality_on = policy.outlier_detection.is_some() && locality.is_none_or(|l| l.enabled);
        let failover: &[(String, String)] = locality.map_or(&[], |l| &l.failover);
        let endpoints = s
            .endpoints
            .iter()
            .filter(|e| selector.is_none_or(|sel| e.selected_by(sel)))
            .map(|e| ClusterEndpoint {
                state: {
                    let state = self.registry.endpoint(e.address);
                    state.set_service_account(e.service_account.as_deref(), &s.namespace);
                    state
                },
                workload: e.workload.clone(),
                version: e.version.clone(),
                priority: match (&self.caller.locality, locality_on) {
                    (Some(mine), true) => locality_priority(mine, e.locality.as_deref(), failover),
                    _ => 0,
                },
            })
            .collect();
        let previous = self
            .previous
            .and_then(|t| t.clusters.get(&name))
            .map(|c| &**c);
        let cluster = Arc::new(Cluster::new(
            name.clone(),
            service,
            s,
            subset.map(Arc::from),
            endpoints,
            &policy,
            previous,
        ));
        self.clusters.insert(name, cluster.clone());
        cluster
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_core::resource::parse_resources;

    const MESH: &str = r#"
apiVersion: lumen.dev/v1alpha1
kind: Mesh
metadata: {name: m}
spec:
  services:
    - name: reviews
      port: 9080
      endpoints:
        - {address: 127.0.0.1:1001, version: v1}
        - {address: 127.0.0.1:1002, version: v2}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
    - queryParams: {user: {exact: jason}}
    route:
    - destination: {host: reviews, subset: v2}
  - match:
    - uri: {prefix: /api}
      method: {exact: POST}
    route:
    - destination: {host: reviews, subset: v1}
  - match:
    - sourceLabels: {app: nobody}
    route:
    - destination: {host: reviews, subset: v2}
"#;

    fn table() -> Arc<RoutingTable> {
        let resources = parse_resources("m.yaml", MESH).unwrap();
        let mesh = Arc::new(MeshConfig::from_resources(&resources).unwrap());
        let caller = Caller::of(&Workload::unknown(), &BTreeMap::new(), None);
        Arc::new(RoutingTable::new(
            mesh,
            &caller,
            &Registry::new(Duration::from_secs(1)),
            None,
        ))
    }

    fn route(
        t: &Arc<RoutingTable>,
        method: &str,
        path: &str,
        query: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<Routed, NoRoute> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        t.route(
            0,
            &RequestView {
                method,
                path,
                query,
                authority: "reviews:9080",
                scheme: "http",
                headers: &h,
                port: Some(9080),
            },
        )
    }

    #[test]
    fn first_matching_route_wins_and_names_itself() {
        let t = table();
        let r = route(&t, "GET", "/", None, &[("end-user", "jason")]).unwrap();
        assert_eq!(&*r.route.name, "reviews/jason");
        assert_eq!(
            &*r.cluster.unwrap().name,
            "outbound|9080|v2|reviews.default.svc.cluster.local"
        );
        let r = route(&t, "GET", "/", Some("a=1&user=jason"), &[]).unwrap();
        assert_eq!(&*r.route.name, "reviews/jason");
        let r = route(&t, "POST", "/api/x", None, &[]).unwrap();
        assert_eq!(&*r.route.name, "reviews/1");
        assert_eq!(r.matched_prefix, Some(4));
        let c = r.cluster.unwrap();
        assert_eq!(c.endpoints.len(), 1);
        assert_eq!(&*c.endpoints[0].version, "v1");
        // Neither matches, and the third is for another caller.
        assert_eq!(
            route(&t, "GET", "/api/x", None, &[]).unwrap_err(),
            NoRoute::NoMatch
        );
    }

    /// Two Gateways on one port: a MUTUAL one for `a.example.com`, a
    /// SIMPLE wildcard one. SNI picks the most specific server, and a
    /// request on the wildcard server's connection never reaches routes
    /// bound only to the MUTUAL Gateway, whatever Host it names.
    #[test]
    fn each_gateway_server_reaches_only_its_own_gateways_routes() {
        let gateways = r#"
apiVersion: lumen.dev/v1alpha1
kind: Mesh
metadata: {name: m}
spec:
  services:
    - {name: secret, port: 80, endpoints: [{address: 127.0.0.1:1001}]}
    - {name: public, port: 80, endpoints: [{address: 127.0.0.1:1002}]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: strict}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [a.example.com]
    tls: {mode: MUTUAL, serverCertificate: /c, privateKey: /k, caCertificates: /ca}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: open}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https-any, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, serverCertificate: /c, privateKey: /k}
  - port: {number: 443, name: https-example, protocol: HTTPS}
    hosts: ["*.example.com"]
    tls: {mode: SIMPLE, serverCertificate: /c, privateKey: /k}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secret}
spec:
  hosts: [a.example.com]
  gateways: [strict]
  http: [{route: [{destination: {host: secret}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: public}
spec:
  hosts: ["*.example.com"]
  gateways: [open]
  http: [{route: [{destination: {host: public}}]}]
"#;
        let resources = parse_resources("g.yaml", gateways).unwrap();
        let mesh = Arc::new(MeshConfig::from_resources(&resources).unwrap());
        let mut labels = BTreeMap::new();
        labels.insert("istio".to_string(), "ingressgateway".to_string());
        let mut caller = Caller::of(&Workload::unknown(), &labels, None);
        caller.gateway = true;
        let t = Arc::new(RoutingTable::new(
            mesh,
            &caller,
            &Registry::new(Duration::from_secs(1)),
            None,
        ));
        let port = t.gateway_port(443).unwrap();
        let pick = |sni| {
            port.server_for_sni(Some(sni))
                .map(|s| s.server.name.clone())
        };
        assert_eq!(pick("a.example.com").as_deref(), Some("https"));
        // The longer wildcard before `*`, whatever their order.
        assert_eq!(pick("b.example.com").as_deref(), Some("https-example"));
        assert_eq!(pick("b.example.org").as_deref(), Some("https-any"));
        let h = HeaderMap::new();
        let view = |authority| RequestView {
            method: "GET",
            path: "/",
            query: None,
            authority,
            scheme: "https",
            headers: &h,
            port: Some(443),
        };
        let strict = port.server_for_sni(Some("a.example.com")).unwrap();
        let open = port.server_for_sni(Some("b.example.com")).unwrap();
        let routed = t
            .route_gateway(443, Some(strict), &view("a.example.com"))
            .unwrap();
        assert_eq!(&*routed.route.name, "secret/0");
        // A client without a certificate, on the SIMPLE wildcard server,
        // naming the MUTUAL host: its own Gateway's wildcard route, never
        // the MUTUAL Gateway's.
        let routed = t
            .route_gateway(443, Some(open), &view("a.example.com"))
            .unwrap();
        assert_eq!(&*routed.route.name, "public/0");
        // Plaintext (no server chosen) sees every Gateway's routes.
        let any = t.route_gateway(443, None, &view("a.example.com")).unwrap();
        assert_eq!(&*any.route.name, "secret/0");
        let routed = t
            .route_gateway(443, Some(open), &view("b.example.com"))
            .unwrap();
        assert_eq!(&*routed.route.name, "public/0");
    }

    #[test]
    fn a_new_table_keeps_cluster_state() {
        let t = table();
        let registry = Registry::new(Duration::from_secs(1));
        let caller = Caller::default();
        let a = RoutingTable::new(t.mesh().clone(), &caller, &registry, None);
        let b = RoutingTable::new(t.mesh().clone(), &caller, &registry, Some(&a));
        let name: Arc<str> = "outbound|9080|v1|reviews.default.svc.cluster.local".into();
        assert!(Arc::ptr_eq(
            &a.clusters[&name].state,
            &b.clusters[&name].state
        ));
        assert!(Arc::ptr_eq(
            &a.clusters[&name].balancer,
            &b.clusters[&name].balancer
        ));
        assert!(Arc::ptr_eq(
            &a.clusters[&name].endpoints[0].state,
            &b.clusters[&name].endpoints[0].state
        ));
    }

    #[test]
    fn tls_routes_pick_by_server_name_and_fall_back_to_tcp_without_one() {
        let yaml = r#"
apiVersion: lumen.dev/v1alpha1
kind: Mesh
metadata: {name: m}
spec:
  services:
    - {name: edge, port: 443, protocol: tcp, clusterIP: 10.0.0.1, endpoints: [{address: 127.0.0.1:1001}]}
    - {name: a, port: 443, protocol: tcp, endpoints: [{address: 127.0.0.1:1002}]}
    - {name: b, port: 443, protocol: tcp, endpoints: [{address: 127.0.0.1:1003}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: edge}
spec:
  hosts: [edge]
  tls:
  - match: [{port: 443, sniHosts: [a.example.com]}]
    route: [{destination: {host: a}}]
  - match: [{sniHosts: ["*.example.com"]}]
    route: [{destination: {host: b}}]
  tcp:
  - route: [{destination: {host: a}}]
"#;
        let resources = parse_resources("m.yaml", yaml).unwrap();
        let mesh = Arc::new(MeshConfig::from_resources(&resources).unwrap());
        let t = RoutingTable::new(
            mesh,
            &Caller::default(),
            &Registry::new(Duration::from_secs(1)),
            None,
        );
        let dst: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let via = |sni: Option<&str>| {
            t.route_tcp(0, dst, sni)
                .map(|(c, route)| (c.service.to_string(), route.to_string()))
        };
        assert_eq!(
            via(Some("A.example.com")).unwrap(),
            ("a".into(), "edge/tls-0".into())
        );
        assert_eq!(
            via(Some("x.example.com")).unwrap(),
            ("b".into(), "edge/tls-1".into())
        );
        assert_eq!(via(Some("example.com")).unwrap_err(), NoRoute::NoMatch);
        assert_eq!(via(None).unwrap(), ("a".into(), "edge/tcp-0".into()));
        assert!(t.has_tls_routes(0));
        assert!(!t.has_tls_routes(1));
    }

    #[test]
    fn a_large_regex_table_answers_as_routes_tried_one_by_one() {
        let mut yaml = String::from(
            "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec:\n  services:\n    - {name: api, port: 80, endpoints: [{address: 127.0.0.1:1001}]}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api}\nspec:\n  hosts: [api]\n  http:\n",
        );
        for i in 0..40 {
            let m = match i % 4 {
                0 => format!("uri: {{regex: \"/v{i}/[0-9]+\"}}, headers: {{x-t: {{exact: t{i}}}}}"),
                1 => format!("uri: {{regex: \"/v{i}/.*\"}}, ignoreUriCase: true"),
                2 => format!("uri: {{prefix: /p{i}/}}"),
                _ => format!("uri: {{regex: \"/v[0-9]*{i}/x\"}}"),
            };
            yaml.push_str(&format!(
                "  - name: r{i}\n    match: [{{{m}}}]\n    route: [{{destination: {{host: api}}}}]\n"
            ));
        }
        let resources = parse_resources("m.yaml", &yaml).unwrap();
        let mesh = Arc::new(MeshConfig::from_resources(&resources).unwrap());
        let t = Arc::new(RoutingTable::new(
            mesh,
            &Caller::default(),
            &Registry::new(Duration::from_secs(1)),
            None,
        ));
        let list = &t.hosts[0].http;
        assert!(list.uri_set.is_some(), "40 routes, 20 regexes: one set");
        assert_eq!(list.header_names.len(), 1, "x-t, read once");
        let one_by_one = |path: &str, h: &HeaderMap| {
            let req = RequestView {
                method: "GET",
                path,
                query: None,
                authority: "api",
                scheme: "http",
                headers: h,
                port: Some(80),
            };
            let a = list.find(&req).map(|(r, u)| (r.name.clone(), u));
            // Every header looked up anew, every regex run alone.
            let mut header = |_: usize| h.get("x-t").and_then(|v| v.to_str().ok());
            let b = list.routes.iter().zip(&list.slots).find_map(|(r, slots)| {
                r.matches
                    .iter()
                    .zip(slots)
                    .find_map(|(m, slot)| {
                        conditions_hold(m, slot, &req, &mut header)
                            .then(|| uri_match(m, path))
                            .flatten()
                    })
                    .map(|u| (r.name.clone(), u))
            });
            assert_eq!(a, b, "{path}");
            a.map(|(n, _)| n.to_string())
        };
        let mut h = HeaderMap::new();
        assert_eq!(one_by_one("/v8/12", &h), None, "the header is missing");
        h.insert("x-t", "t8".parse().unwrap());
        assert_eq!(one_by_one("/v8/12", &h).as_deref(), Some("api/r8"));
        // As in Envoy, ignoreUriCase does not reach a regex.
        assert_eq!(one_by_one("/V13/ANY", &h), None);
        assert_eq!(one_by_one("/v13/ANY", &h).as_deref(), Some("api/r13"));
        assert_eq!(one_by_one("/p14/x", &h).as_deref(), Some("api/r14"));
        assert_eq!(one_by_one("/v915/x", &h).as_deref(), Some("api/r15"));
        assert_eq!(one_by_one("/v3/x", &h).as_deref(), Some("api/r3"));
        assert_eq!(one_by_one("/nothing", &h), None);
    }
}
