//! `VirtualService`: ordered routes for a set of hosts — matches, weighted
//! destinations, and what happens on the way (faults, rewrites, header
//! edits, mirrors, retries, timeouts).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{
    At, Destination, DestinationSpec, PercentSpec, StringMatch, StringMatchSpec, duration_field,
    labels,
};
use crate::resource::ConfigError;
use crate::resource::Resource;
use crate::service::{RetryOn, RetryPolicy};

/// A validated VirtualService.
#[derive(Debug, Clone, PartialEq)]
pub struct VirtualService {
    pub name: String,
    pub namespace: String,
    /// As written (short names are read in `namespace`).
    pub hosts: Vec<String>,
    /// Gateways the routes apply at (`mesh` for sidecars, the default).
    pub gateways: Vec<String>,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<TcpRoute>,
    pub tls: Vec<TlsRoute>,
}

impl VirtualService {
    /// Whether the routes apply to sidecars (no gateways named, or `mesh`).
    pub fn applies_to_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == "mesh")
    }
}

/// One HTTP route: first match wins.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRoute {
    /// The route's `name`, or its position when it has none; recorded as
    /// `<virtual service>/<name>`.
    pub name: String,
    /// Any one of these matches; none means every request.
    pub matches: Vec<HttpMatch>,
    pub action: HttpAction,
    pub rewrite: Option<Rewrite>,
    pub timeout: Option<Duration>,
    pub retries: Option<RetryPolicy>,
    pub fault: Option<Fault>,
    pub mirrors: Vec<Mirror>,
    pub headers: Headers,
}

/// What a matched request gets.
#[derive(Debug, Clone, PartialEq)]
pub enum HttpAction {
    /// Forwarded to one of these, by weight.
    Route(Vec<WeightedDestination>),
    Redirect(Redirect),
    DirectResponse {
        status: u16,
        body: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct WeightedDestination {
    pub destination: Destination,
    /// Share of the route's traffic; the weights of a route sum to 100
    /// (a lone destination has 100).
    pub weight: u32,
    pub headers: Headers,
}

/// `HTTPMatchRequest`: every condition set must hold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HttpMatch {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    /// Header name (lower case) → match; `None`: present with any value.
    pub headers: Vec<(String, Option<StringMatch>)>,
    /// Headers that must not be there (or not match).
    pub without_headers: Vec<(String, Option<StringMatch>)>,
    pub query_params: Vec<(String, Option<StringMatch>)>,
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
    pub ignore_uri_case: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    /// `derivePort: FROM_REQUEST_PORT`.
    pub port_from_request: bool,
    pub scheme: Option<String>,
    pub code: u16,
}

#[derive(Debug, Clone)]
pub struct Rewrite {
    /// Replaces the part of the path the match's `uri` prefix matched (the
    /// whole path for exact and regex matches, as Envoy's prefix rewrite).
    pub uri: Option<String>,
    pub authority: Option<String>,
    /// `uriRegexRewrite`: every match of `match` replaced by `rewrite`.
    pub uri_regex: Option<(regex::Regex, String)>,
}

impl PartialEq for Rewrite {
    fn eq(&self, other: &Self) -> bool {
        let regex = |r: &Option<(regex::Regex, String)>| {
            r.as_ref()
                .map(|(re, to)| (re.as_str().to_owned(), to.clone()))
        };
        self.uri == other.uri
            && self.authority == other.authority
            && regex(&self.uri_regex) == regex(&other.uri_regex)
    }
}

/// `fault`: a delay, an abort, or both, each for a share of requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    /// `(HTTP status, gRPC status)`, and the share.
    pub abort: Option<(u16, Option<i32>, f64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub destination: Destination,
    /// Share of requests mirrored, as a fraction of 1.
    pub fraction: f64,
}

/// Header edits of a route or destination.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Headers {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

impl Headers {
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeaderOps {
    /// Replace (or add) these.
    pub set: Vec<(String, String)>,
    /// Append these.
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// Matches of a TCP route.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct L4Match {
    pub port: Option<u16>,
    pub destination_subnets: Vec<(std::net::IpAddr, u8)>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
    /// TLS routes only: the ClientHello's server names (`*.example.com` too).
    pub sni_hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TcpRoute {
    pub name: String,
    pub matches: Vec<L4Match>,
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsRoute {
    pub name: String,
    pub matches: Vec<L4Match>,
    pub route: Vec<RouteDestination>,
}

// ---- Istio's schema, field for field ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    http: Vec<HttpRouteSpec>,
    #[serde(default)]
    tls: Vec<TlsRouteSpec>,
    #[serde(default)]
    tcp: Vec<TcpRouteSpec>,
    #[serde(default)]
    export_to: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpRouteSpec {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "match")]
    matches: Vec<HttpMatchSpec>,
    #[serde(default)]
    route: Vec<HttpRouteDestinationSpec>,
    #[serde(default)]
    redirect: Option<RedirectSpec>,
    #[serde(default)]
    direct_response: Option<DirectResponseSpec>,
    #[serde(default)]
    delegate: Option<serde_json::Value>,
    #[serde(default)]
    rewrite: Option<RewriteSpec>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retries: Option<RetrySpec>,
    #[serde(default)]
    fault: Option<FaultSpec>,
    #[serde(default)]
    mirror: Option<DestinationSpec>,
    #[serde(default)]
    mirrors: Vec<MirrorPolicySpec>,
    #[serde(default)]
    mirror_percent: Option<u32>,
    #[serde(default)]
    mirror_percentage: Option<PercentSpec>,
    #[serde(default)]
    cors_policy: Option<serde_json::Value>,
    #[serde(default)]
    headers: Option<HeadersSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpMatchSpec {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    uri: Option<StringMatchSpec>,
    #[serde(default)]
    scheme: Option<StringMatchSpec>,
    #[serde(default)]
    method: Option<StringMatchSpec>,
    #[serde(default)]
    authority: Option<StringMatchSpec>,
    #[serde(default)]
    headers: BTreeMap<String, StringMatchSpec>,
    #[serde(default)]
    port: Option<u32>,
    #[serde(default)]
    source_labels: BTreeMap<String, String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    query_params: BTreeMap<String, StringMatchSpec>,
    #[serde(default)]
    ignore_uri_case: bool,
    #[serde(default)]
    without_headers: BTreeMap<String, StringMatchSpec>,
    #[serde(default)]
    source_namespace: Option<String>,
    #[serde(default)]
    stat_prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpRouteDestinationSpec {
    destination: DestinationSpec,
    #[serde(default)]
    weight: Option<i64>,
    #[serde(default)]
    headers: Option<HeadersSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RouteDestinationSpec {
    destination: DestinationSpec,
    #[serde(default)]
    weight: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RedirectSpec {
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    port: Option<u32>,
    #[serde(default)]
    derive_port: Option<String>,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    redirect_code: Option<u32>,
    #[serde(default)]
    prefix_rewrite: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectResponseSpec {
    status: u32,
    #[serde(default)]
    body: Option<BodySpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BodySpec {
    #[serde(default)]
    string: Option<String>,
    #[serde(default)]
    bytes: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RewriteSpec {
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    uri_regex_rewrite: Option<RegexRewriteSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RegexRewriteSpec {
    #[serde(rename = "match")]
    pattern: String,
    #[serde(default)]
    rewrite: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RetrySpec {
    #[serde(default)]
    attempts: Option<i64>,
    #[serde(default)]
    per_try_timeout: Option<String>,
    #[serde(default)]
    retry_on: Option<String>,
    #[serde(default)]
    retry_remote_localities: Option<bool>,
    #[serde(default)]
    retry_ignore_previous_hosts: Option<bool>,
    #[serde(default)]
    backoff: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSpec {
    #[serde(default)]
    delay: Option<DelaySpec>,
    #[serde(default)]
    abort: Option<AbortSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DelaySpec {
    #[serde(default)]
    percent: Option<u32>,
    #[serde(default)]
    fixed_delay: Option<String>,
    #[serde(default)]
    exponential_delay: Option<String>,
    #[serde(default)]
    percentage: Option<PercentSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AbortSpec {
    #[serde(default)]
    http_status: Option<u32>,
    #[serde(default)]
    grpc_status: Option<String>,
    #[serde(default)]
    http2_error: Option<String>,
    #[serde(default)]
    percentage: Option<PercentSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorPolicySpec {
    destination: DestinationSpec,
    #[serde(default)]
    percentage: Option<PercentSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadersSpec {
    #[serde(default)]
    request: Option<HeaderOpsSpec>,
    #[serde(default)]
    response: Option<HeaderOpsSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderOpsSpec {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TcpRouteSpec {
    #[serde(default, rename = "match")]
    matches: Vec<L4MatchSpec>,
    #[serde(default)]
    route: Vec<RouteDestinationSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TlsRouteSpec {
    #[serde(default, rename = "match")]
    matches: Vec<L4MatchSpec>,
    #[serde(default)]
    route: Vec<RouteDestinationSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct L4MatchSpec {
    #[serde(default)]
    destination_subnets: Vec<String>,
    #[serde(default)]
    port: Option<u32>,
    #[serde(default)]
    source_subnet: Option<String>,
    #[serde(default)]
    source_labels: BTreeMap<String, String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    source_namespace: Option<String>,
    #[serde(default)]
    sni_hosts: Vec<String>,
}

// ---- validation ----

/// Validates a `VirtualService` resource.
pub fn validate(res: &Resource) -> Result<VirtualService, ConfigError> {
    let spec: Spec = res.spec()?;
    let at = At::spec(res);
    at.unsupported(
        &spec.export_to.filter(|e| !(e.is_empty() || e == &["*"])),
        "exportTo",
        "every resource is visible to the whole mesh (`*`)",
    )?;
    if spec.hosts.is_empty() {
        return Err(at.at("hosts").err("at least one host is required"));
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        if h.trim().is_empty() {
            return Err(at.at("hosts").at(format!("[{i}]")).err("must not be empty"));
        }
        if h.contains('*') && !(h == "*" || h.starts_with("*.") && !h[2..].contains('*')) {
            return Err(at.at("hosts").at(format!("[{i}]")).err(format!(
                "`{h}`: a wildcard may only be `*` or lead the host (`*.example.com`)"
            )));
        }
    }
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        return Err(at.err("has no http, tcp or tls routes"));
    }
    let mut http = Vec::with_capacity(spec.http.len());
    for (i, r) in spec.http.into_iter().enumerate() {
        http.push(http_route(r, i, &at.at("http").at(format!("[{i}]")))?);
    }
    let mut tcp = Vec::new();
    for (i, r) in spec.tcp.into_iter().enumerate() {
        let at = at.at("tcp").at(format!("[{i}]"));
        tcp.push(TcpRoute {
            name: i.to_string(),
            matches: l4_matches(r.matches, &at.at("match"), false)?,
            route: route_destinations(r.route, &at.at("route"))?,
        });
    }
    let mut tls = Vec::new();
    for (i, r) in spec.tls.into_iter().enumerate() {
        let at = at.at("tls").at(format!("[{i}]"));
        if r.matches.is_empty() {
            return Err(at
                .at("match")
                .err("a TLS route needs a match with sniHosts"));
        }
        tls.push(TlsRoute {
            name: i.to_string(),
            matches: l4_matches(r.matches, &at.at("match"), true)?,
            route: route_destinations(r.route, &at.at("route"))?,
        });
    }
    Ok(VirtualService {
        name: res.name.clone(),
        namespace: res.namespace.clone(),
        hosts: spec.hosts,
        gateways: spec.gateways,
        http,
        tcp,
        tls,
    })
}

fn http_route(r: HttpRouteSpec, index: usize, at: &At<'_>) -> Result<HttpRoute, ConfigError> {
    at.unsupported(
        &r.delegate,
        "delegate",
        "routes are written in the VirtualService that owns the host",
    )?;
    at.unsupported(
        &r.cors_policy,
        "corsPolicy",
        "CORS is left to the application",
    )?;
    let name = r
        .name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| index.to_string());
    let mut matches = Vec::with_capacity(r.matches.len());
    for (i, m) in r.matches.into_iter().enumerate() {
        matches.push(http_match(m, &at.at("match").at(format!("[{i}]")))?);
    }
    let actions = [
        !r.route.is_empty(),
        r.redirect.is_some(),
        r.direct_response.is_some(),
    ];
    let action = match actions {
        [true, false, false] => HttpAction::Route(weighted(r.route, &at.at("route"))?),
        [false, true, false] => HttpAction::Redirect(redirect(
            r.redirect.unwrap_or_else(|| unreachable!()),
            &at.at("redirect"),
        )?),
        [false, false, true] => {
            let d = r.direct_response.unwrap_or_else(|| unreachable!());
            let at = at.at("directResponse");
            let status = u16::try_from(d.status)
                .ok()
                .filter(|s| (200..=599).contains(s))
                .ok_or_else(|| {
                    at.at("status")
                        .err(format!("{} is not an HTTP status (200-599)", d.status))
                })?;
            let body = match d.body {
                None => Vec::new(),
                Some(BodySpec {
                    string: Some(s),
                    bytes: None,
                }) => s.into_bytes(),
                Some(BodySpec {
                    string: None,
                    bytes: Some(b),
                }) => {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD
                        .decode(b.trim())
                        .map_err(|e| at.at("body.bytes").err(format!("not base64: {e}")))?
                }
                Some(_) => return Err(at.at("body").err("set one of string and bytes")),
            };
            HttpAction::DirectResponse { status, body }
        }
        [false, false, false] => {
            return Err(at.err("needs one of route, redirect and directResponse"));
        }
        _ => {
            return Err(at.err("set only one of route, redirect and directResponse"));
        }
    };
    let is_route = matches!(action, HttpAction::Route(_));
    if !is_route {
        for (field, set) in [
            ("rewrite", r.rewrite.is_some()),
            ("fault", r.fault.is_some()),
            ("mirror", r.mirror.is_some() || !r.mirrors.is_empty()),
            ("retries", r.retries.is_some()),
            ("timeout", r.timeout.is_some()),
        ] {
            if set {
                return Err(at
                    .at(field)
                    .err("applies only to a route that forwards (`route`), not to a redirect or direct response"));
            }
        }
    }
    let rewrite = match r.rewrite {
        None => None,
        Some(rw) => {
            let at = at.at("rewrite");
            if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
                return Err(at.err("set only one of uri and uriRegexRewrite"));
            }
            let uri_regex = match rw.uri_regex_rewrite {
                None => None,
                Some(x) => Some((
                    regex::Regex::new(&x.pattern).map_err(|e| {
                        at.at("uriRegexRewrite.match")
                            .err(format!("`{}` is not a valid RE2 regex: {e}", x.pattern))
                    })?,
                    // Envoy writes groups as \1; the regex crate as ${1}.
                    envoy_substitution(&x.rewrite),
                )),
            };
            if let Some(u) = &rw.uri
                && !u.starts_with('/')
                && !u.is_empty()
            {
                return Err(at.at("uri").err(format!("`{u}` must start with `/`")));
            }
            Some(Rewrite {
                uri: rw.uri.filter(|u| !u.is_empty()),
                authority: rw.authority.filter(|a| !a.is_empty()),
                uri_regex,
            })
        }
    };
    let timeout = match &r.timeout {
        None => None,
        Some(t) => Some(duration_field(t, &at.at("timeout"))?),
    };
    let retries = match r.retries {
        None => None,
        Some(x) => Some(retries(x, &at.at("retries"))?),
    };
    let fault = match r.fault {
        None => None,
        Some(f) => Some(fault(f, &at.at("fault"))?),
    };
    let mut mirrors = Vec::new();
    if let Some(m) = r.mirror {
        if !r.mirrors.is_empty() {
            return Err(at.at("mirror").err("set only one of mirror and mirrors"));
        }
        let fraction = match (&r.mirror_percentage, r.mirror_percent) {
            (Some(p), None) => p.fraction(&at.at("mirrorPercentage"))?,
            (None, Some(p)) if p <= 100 => f64::from(p) / 100.0,
            (None, Some(p)) => {
                return Err(at.at("mirrorPercent").err(format!("{p} is more than 100")));
            }
            (None, None) => 1.0,
            (Some(_), Some(_)) => {
                return Err(at
                    .at("mirrorPercent")
                    .err("set only one of mirrorPercent and mirrorPercentage"));
            }
        };
        mirrors.push(Mirror {
            destination: m.validate(&at.at("mirror"))?,
            fraction,
        });
    } else if r.mirror_percentage.is_some() || r.mirror_percent.is_some() {
        return Err(at.at("mirrorPercentage").err("needs a mirror"));
    }
    for (i, m) in r.mirrors.into_iter().enumerate() {
        let at = at.at("mirrors").at(format!("[{i}]"));
        let fraction = match &m.percentage {
            None => 1.0,
            Some(p) => p.fraction(&at.at("percentage"))?,
        };
        mirrors.push(Mirror {
            destination: m.destination.validate(&at.at("destination"))?,
            fraction,
        });
    }
    let headers = match r.headers {
        None => Headers::default(),
        Some(h) => headers(h, &at.at("headers"))?,
    };
    Ok(HttpRoute {
        name,
        matches,
        action,
        rewrite,
        timeout,
        retries,
        fault,
        mirrors,
        headers,
    })
}

fn opt_match(m: Option<StringMatchSpec>, at: &At<'_>) -> Result<Option<StringMatch>, ConfigError> {
    match m {
        None => Ok(None),
        Some(m) => m.validate(at),
    }
}

fn http_match(m: HttpMatchSpec, at: &At<'_>) -> Result<HttpMatch, ConfigError> {
    at.unsupported(
        &m.stat_prefix,
        "statPrefix",
        "Lumen records every request with its route; there are no per-match stats",
    )?;
    let port = match m.port {
        None | Some(0) => None,
        Some(p) => {
            Some(u16::try_from(p).map_err(|_| at.at("port").err(format!("{p} is not a port")))?)
        }
    };
    let named = |map: BTreeMap<String, StringMatchSpec>,
                 field: &str,
                 lower: bool|
     -> Result<Vec<(String, Option<StringMatch>)>, ConfigError> {
        let mut out = Vec::with_capacity(map.len());
        for (k, v) in map {
            let key = if lower {
                k.to_ascii_lowercase()
            } else {
                k.clone()
            };
            if lower && http_header_name_invalid(&key) {
                return Err(at
                    .at(field)
                    .at(&k)
                    .err(format!("`{k}` is not a header name")));
            }
            out.push((key, v.validate(&at.at(field).at(&k))?));
        }
        Ok(out)
    };
    let headers = named(m.headers, "headers", true)?;
    let without_headers = named(m.without_headers, "withoutHeaders", true)?;
    let query_params = named(m.query_params, "queryParams", false)?;
    Ok(HttpMatch {
        name: m.name,
        uri: opt_match(m.uri, &at.at("uri"))?,
        scheme: opt_match(m.scheme, &at.at("scheme"))?,
        method: opt_match(m.method, &at.at("method"))?,
        authority: opt_match(m.authority, &at.at("authority"))?,
        headers,
        without_headers,
        query_params,
        port,
        source_labels: labels(m.source_labels, &at.at("sourceLabels"))?,
        source_namespace: m.source_namespace.filter(|s| !s.is_empty()),
        gateways: m.gateways,
        ignore_uri_case: m.ignore_uri_case,
    })
}

fn http_header_name_invalid(name: &str) -> bool {
    name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:".contains(&b))
}

/// Weights as Istio reads them: a lone destination may omit its weight
/// (100); several must say theirs and sum to 100.
fn check_weights(weights: &[Option<i64>], at: &At<'_>) -> Result<Vec<u32>, ConfigError> {
    if weights.is_empty() {
        return Err(at.err("needs at least one destination"));
    }
    for (i, w) in weights.iter().enumerate() {
        if let Some(w) = w
            && !(0..=100).contains(w)
        {
            return Err(at
                .at(format!("[{i}]"))
                .at("weight")
                .err(format!("{w} is not between 0 and 100")));
        }
    }
    if weights.len() == 1 {
        return Ok(vec![100]);
    }
    let sum: i64 = weights.iter().map(|w| w.unwrap_or(0)).sum();
    if sum == 0 {
        // Istio spreads unweighted destinations evenly.
        let n = weights.len() as u32;
        return Ok((0..n).map(|i| 100 / n + u32::from(i < 100 % n)).collect());
    }
    if sum != 100 {
        return Err(at.err(format!("weights sum to {sum}, must be 100")));
    }
    Ok(weights.iter().map(|w| w.unwrap_or(0) as u32).collect())
}

fn weighted(
    route: Vec<HttpRouteDestinationSpec>,
    at: &At<'_>,
) -> Result<Vec<WeightedDestination>, ConfigError> {
    let weights = check_weights(&route.iter().map(|r| r.weight).collect::<Vec<_>>(), at)?;
    let mut out = Vec::with_capacity(route.len());
    for (i, (r, weight)) in route.into_iter().zip(weights).enumerate() {
        let at = at.at(format!("[{i}]"));
        out.push(WeightedDestination {
            destination: r.destination.validate(&at.at("destination"))?,
            weight,
            headers: match r.headers {
                None => Headers::default(),
                Some(h) => headers(h, &at.at("headers"))?,
            },
        });
    }
    Ok(out)
}

fn route_destinations(
    route: Vec<RouteDestinationSpec>,
    at: &At<'_>,
) -> Result<Vec<RouteDestination>, ConfigError> {
    let weights = check_weights(&route.iter().map(|r| r.weight).collect::<Vec<_>>(), at)?;
    let mut out = Vec::with_capacity(route.len());
    for (i, (r, weight)) in route.into_iter().zip(weights).enumerate() {
        let at = at.at(format!("[{i}]"));
        let destination = r.destination.validate(&at.at("destination"))?;
        out.push(RouteDestination {
            destination,
            weight,
        });
    }
    Ok(out)
}

fn l4_matches(ms: Vec<L4MatchSpec>, at: &At<'_>, tls: bool) -> Result<Vec<L4Match>, ConfigError> {
    let mut out = Vec::with_capacity(ms.len());
    for (i, m) in ms.into_iter().enumerate() {
        let at = at.at(format!("[{i}]"));
        at.unsupported(
            &m.source_subnet,
            "sourceSubnet",
            "sources are matched by labels or namespace",
        )?;
        if !tls && !m.sni_hosts.is_empty() {
            return Err(at
                .at("sniHosts")
                .err("unknown field for a tcp route (TLS routes have it)"));
        }
        if tls && m.sni_hosts.is_empty() {
            return Err(at
                .at("sniHosts")
                .err("a TLS route matches on at least one server name"));
        }
        for (j, h) in m.sni_hosts.iter().enumerate() {
            let bad = h.is_empty()
                || h.contains(':')
                || h.contains('*') && !(h == "*" || h.starts_with("*.") && !h[2..].contains('*'));
            if bad {
                return Err(at.at("sniHosts").at(format!("[{j}]")).err(format!(
                    "`{h}` is not a server name (a host, `*.example.com` or `*`, no port)"
                )));
            }
        }
        let port = match m.port {
            None | Some(0) => None,
            Some(p) => Some(
                u16::try_from(p).map_err(|_| at.at("port").err(format!("{p} is not a port")))?,
            ),
        };
        let mut subnets = Vec::new();
        for (j, s) in m.destination_subnets.iter().enumerate() {
            subnets.push(parse_subnet(s).ok_or_else(|| {
                at.at("destinationSubnets")
                    .at(format!("[{j}]"))
                    .err(format!("`{s}` is not an address or CIDR block"))
            })?);
        }
        out.push(L4Match {
            port,
            destination_subnets: subnets,
            source_labels: labels(m.source_labels, &at.at("sourceLabels"))?,
            source_namespace: m.source_namespace.filter(|s| !s.is_empty()),
            gateways: m.gateways,
            sni_hosts: m.sni_hosts,
        });
    }
    Ok(out)
}

/// `10.0.0.0/8` or a lone address.
pub fn parse_subnet(s: &str) -> Option<(std::net::IpAddr, u8)> {
    let (addr, bits) = match s.split_once('/') {
        Some((a, b)) => (a, Some(b.parse::<u8>().ok()?)),
        None => (s, None),
    };
    let addr: std::net::IpAddr = addr.trim().parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let bits = bits.unwrap_or(max);
    (bits <= max).then_some((addr, bits))
}

fn redirect(r: RedirectSpec, at: &At<'_>) -> Result<Redirect, ConfigError> {
    at.unsupported(
        &r.prefix_rewrite,
        "prefixRewrite",
        "use `uri` to replace the whole path",
    )?;
    let code = match r.redirect_code {
        None | Some(0) => 301,
        Some(c @ (301 | 302 | 303 | 307 | 308)) => c as u16,
        Some(c) => {
            return Err(at.at("redirectCode").err(format!(
                "{c} is not a redirect status (301, 302, 303, 307, 308)"
            )));
        }
    };
    let (port, port_from_request) = match (r.port, r.derive_port.as_deref()) {
        (Some(_), Some(_)) => return Err(at.at("port").err("set only one of port and derivePort")),
        (Some(p), None) => (
            Some(
                u16::try_from(p)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| at.at("port").err(format!("{p} is not a port")))?,
            ),
            false,
        ),
        (None, Some("FROM_REQUEST_PORT")) => (None, true),
        (None, Some("FROM_PROTOCOL_DEFAULT")) | (None, None) => (None, false),
        (None, Some(other)) => {
            return Err(at.at("derivePort").err(format!(
                "`{other}` is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"
            )));
        }
    };
    if let Some(s) = &r.scheme
        && !(s == "http" || s == "https")
    {
        return Err(at.at("scheme").err(format!("`{s}` is not http or https")));
    }
    Ok(Redirect {
        uri: r.uri.filter(|u| !u.is_empty()),
        authority: r.authority.filter(|a| !a.is_empty()),
        port,
        port_from_request,
        scheme: r.scheme,
        code,
    })
}

fn retries(r: RetrySpec, at: &At<'_>) -> Result<RetryPolicy, ConfigError> {
    at.unsupported(
        &r.retry_remote_localities,
        "retryRemoteLocalities",
        "retries go to any healthy endpoint, another than those tried when there is one",
    )?;
    // Istio's default: retries pick another host than those tried.
    if r.retry_ignore_previous_hosts == Some(false) {
        return Err(at
            .at("retryIgnorePreviousHosts")
            .err("not supported by Lumen: a retry always prefers an endpoint not tried yet"));
    }
    let mut p = RetryPolicy::default();
    if let Some(a) = r.attempts {
        if !(0..=10).contains(&a) {
            return Err(at
                .at("attempts")
                .err(format!("{a} is not between 0 and 10")));
        }
        p.attempts = a as u32;
    }
    if let Some(t) = &r.per_try_timeout {
        let t = duration_field(t, &at.at("perTryTimeout"))?;
        if t.is_zero() {
            return Err(at.at("perTryTimeout").err("must be more than 0"));
        }
        p.per_try_timeout = Some(t);
    }
    if let Some(on) = &r.retry_on {
        // Istio lets status codes stand in the list (`retryOn: 503,reset`).
        let mut names = Vec::new();
        let mut codes = Vec::new();
        for part in on.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match part.parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => codes.push(c),
                Ok(c) => {
                    return Err(at.at("retryOn").err(format!("{c} is not an HTTP status")));
                }
                Err(_) => names.push(part),
            }
        }
        p.retry_on = RetryOn::parse(&names.join(",")).map_err(|e| at.at("retryOn").err(e))?;
        if !codes.is_empty() {
            p.retry_on.retriable_status_codes = true;
            p.retriable_status_codes = codes;
        } else if !p.retry_on.retriable_status_codes {
            p.retriable_status_codes.clear();
        }
    }
    if let Some(b) = &r.backoff {
        let b = duration_field(b, &at.at("backoff"))?;
        if b.is_zero() {
            return Err(at.at("backoff").err("must be more than 0"));
        }
        p.backoff_base = b;
        // Envoy's maximum: ten times the base.
        p.backoff_max = b * 10;
    }
    Ok(p)
}

fn fault(f: FaultSpec, at: &At<'_>) -> Result<Fault, ConfigError> {
    if f.delay.is_none() && f.abort.is_none() {
        return Err(at.err("needs a delay or an abort"));
    }
    let share = |percentage: &Option<PercentSpec>, percent: Option<u32>, at: &At<'_>| {
        match (percentage, percent) {
            (Some(p), _) => p.fraction(&at.at("percentage")),
            (None, Some(p)) if p <= 100 => Ok(f64::from(p) / 100.0),
            (None, Some(p)) => Err(at.at("percent").err(format!("{p} is more than 100"))),
            // Istio: without a percentage, every request.
            (None, None) => Ok(1.0),
        }
    };
    let delay = match f.delay {
        None => None,
        Some(d) => {
            let at = at.at("delay");
            at.unsupported(
                &d.exponential_delay,
                "exponentialDelay",
                "Istio does not implement it either; use fixedDelay",
            )?;
            let Some(fixed) = &d.fixed_delay else {
                return Err(at.at("fixedDelay").err("is required"));
            };
            let fixed = duration_field(fixed, &at.at("fixedDelay"))?;
            if fixed < Duration::from_millis(1) {
                return Err(at.at("fixedDelay").err("must be at least 1ms"));
            }
            Some((fixed, share(&d.percentage, d.percent, &at)?))
        }
    };
    let abort = match f.abort {
        None => None,
        Some(a) => {
            let at = at.at("abort");
            at.unsupported(&a.http2_error, "http2Error", "use httpStatus or grpcStatus")?;
            let fraction = share(&a.percentage, None, &at)?;
            match (a.http_status, &a.grpc_status) {
                (Some(s), None) => {
                    let s = u16::try_from(s)
                        .ok()
                        .filter(|s| (200..=599).contains(s))
                        .ok_or_else(|| {
                            at.at("httpStatus")
                                .err(format!("{s} is not an HTTP status (200-599)"))
                        })?;
                    Some((s, None, fraction))
                }
                (None, Some(g)) => {
                    let code = grpc_code(g).ok_or_else(|| {
                        at.at("grpcStatus").err(format!(
                            "`{g}` is not a gRPC status name such as UNAVAILABLE"
                        ))
                    })?;
                    Some((200, Some(code), fraction))
                }
                (None, None) => return Err(at.err("needs httpStatus or grpcStatus")),
                (Some(_), Some(_)) => {
                    return Err(at.err("set only one of httpStatus and grpcStatus"));
                }
            }
        }
    };
    Ok(Fault { delay, abort })
}

/// gRPC's status names (as Istio takes them in `grpcStatus`), or a number.
fn grpc_code(name: &str) -> Option<i32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    if let Ok(n) = name.parse::<i32>() {
        return (1..=16).contains(&n).then_some(n);
    }
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .filter(|&p| p > 0)
        .map(|p| p as i32)
}

fn headers(h: HeadersSpec, at: &At<'_>) -> Result<Headers, ConfigError> {
    let ops = |o: Option<HeaderOpsSpec>, at: At<'_>| -> Result<HeaderOps, ConfigError> {
        let Some(o) = o else {
            return Ok(HeaderOps::default());
        };
        let mut out = HeaderOps::default();
        for (field, map, list) in [("set", o.set, &mut out.set), ("add", o.add, &mut out.add)] {
            for (k, v) in map {
                let key = k.to_ascii_lowercase();
                if http_header_name_invalid(&key) || key.starts_with(':') {
                    return Err(at
                        .at(field)
                        .at(&k)
                        .err(format!("`{k}` is not a header name Lumen may set")));
                }
                if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                    return Err(at
                        .at(field)
                        .at(&k)
                        .err("a header value may not hold line breaks"));
                }
                list.push((key, v));
            }
        }
        for (i, k) in o.remove.into_iter().enumerate() {
            let key = k.to_ascii_lowercase();
            if http_header_name_invalid(&key) {
                return Err(at
                    .at("remove")
                    .at(format!("[{i}]"))
                    .err(format!("`{k}` is not a header name")));
            }
            out.remove.push(key);
        }
        Ok(out)
    };
    Ok(Headers {
        request: ops(h.request, at.at("request"))?,
        response: ops(h.response, at.at("response"))?,
    })
}

/// Envoy's `\1` group references as the regex crate's `${1}`.
fn envoy_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                let mut n = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    n.push(*d);
                    chars.next();
                }
                out.push_str(&format!("${{{n}}}"));
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::parse_resources;

    fn vs(yaml: &str) -> Result<VirtualService, ConfigError> {
        let text = format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n{yaml}"
        );
        let rs = parse_resources("vs.yaml", &text)?;
        validate(&rs[0])
    }

    #[test]
    fn weights_sum_to_100_or_are_refused() {
        let v = vs("  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 80\n    - destination: {host: reviews, subset: v2}\n      weight: 20\n").unwrap();
        let HttpAction::Route(d) = &v.http[0].action else {
            panic!()
        };
        assert_eq!(d.iter().map(|d| d.weight).collect::<Vec<_>>(), [80, 20]);
        let e = vs("  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 80\n    - destination: {host: reviews, subset: v2}\n      weight: 10\n").unwrap_err();
        assert_eq!(e.field, "spec.http[0].route");
        assert!(e.reason.contains("sum to 90"), "{e}");
        assert_eq!(e.resource, "VirtualService default/reviews");
    }

    #[test]
    fn unsupported_and_unknown_fields_are_refused_by_name() {
        let e = vs("  hosts: [reviews]\n  http:\n  - corsPolicy: {allowOrigins: [{exact: x}]}\n    route:\n    - destination: {host: reviews}\n").unwrap_err();
        assert_eq!(e.field, "spec.http[0].corsPolicy");
        assert!(e.reason.starts_with("not supported by Lumen"), "{e}");
        let e = vs("  hosts: [reviews]\n  http:\n  - rout:\n    - destination: {host: reviews}\n")
            .unwrap_err();
        assert_eq!(e.field, "spec.http[0].rout");
        assert!(e.reason.contains("unknown field"), "{e}");
        let e = vs("  hosts: [reviews]\n  http:\n  - match:\n    - uri: {regex: '(('}\n    route:\n    - destination: {host: reviews}\n").unwrap_err();
        assert_eq!(e.field, "spec.http[0].match[0].uri.regex");
    }

    #[test]
    fn regexes_match_whole_values() {
        let v = vs("  hosts: [reviews]\n  http:\n  - match:\n    - uri: {regex: '/api/v[0-9]+'}\n    route:\n    - destination: {host: reviews}\n").unwrap();
        let m = v.http[0].matches[0].uri.as_ref().unwrap();
        assert!(m.matches("/api/v2"));
        assert!(!m.matches("/api/v2/x"));
    }

    #[test]
    fn retry_on_takes_status_codes_as_istio_does() {
        let v = vs("  hosts: [ratings]\n  http:\n  - retries: {attempts: 3, perTryTimeout: 2s, retryOn: 'gateway-error,connect-failure,503'}\n    route:\n    - destination: {host: ratings}\n").unwrap();
        let r = v.http[0].retries.as_ref().unwrap();
        assert_eq!(r.attempts, 3);
        assert!(r.retry_on.gateway_error && r.retry_on.connect_failure);
        assert_eq!(r.retriable_status_codes, [503]);
    }

    #[test]
    fn envoy_group_references_become_regex_crate_ones() {
        assert_eq!(envoy_substitution(r"/v2/\1"), "/v2/${1}");
    }
}
