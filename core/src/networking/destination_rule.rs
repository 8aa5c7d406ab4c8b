//! `DestinationRule`: what happens to traffic for a host once routing chose
//! it — subsets by endpoint labels, and per host, subset and port the
//! balancer, the connection pool (the circuit breaker) and outlier
//! detection.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{At, PortSelectorSpec, duration_field, labels};
use crate::resource::ConfigError;
use crate::resource::Resource;

#[derive(Debug, Clone, PartialEq)]
pub struct DestinationRule {
    pub name: String,
    pub namespace: String,
    pub host: String,
    pub traffic_policy: TrafficPolicy,
    pub subsets: Vec<Subset>,
}

impl DestinationRule {
    /// The policy in force for `subset` on `port`: the subset's settings
    /// over the host's, port-level settings over the rest, each setting
    /// (balancer, pool, outlier detection, TLS) taken whole, as Istio does.
    pub fn policy(&self, subset: Option<&str>, port: Option<u16>) -> TrafficPolicy {
        let mut p = self.traffic_policy.for_port(port);
        if let Some(s) = subset.and_then(|n| self.subsets.iter().find(|s| s.name == n))
            && let Some(sp) = &s.traffic_policy
        {
            p = sp.for_port(port).over(p);
        }
        p.port_level.clear();
        p
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<TlsMode>,
    /// `(retry budget percent, min retry concurrency)`.
    pub retry_budget: Option<(f64, u32)>,
    pub port_level: Vec<(u16, TrafficPolicy)>,
}

impl TrafficPolicy {
    /// `self`'s settings where it has them, `base`'s elsewhere.
    fn over(self, base: TrafficPolicy) -> TrafficPolicy {
        TrafficPolicy {
            load_balancer: self.load_balancer.or(base.load_balancer),
            connection_pool: self.connection_pool.or(base.connection_pool),
            outlier_detection: self.outlier_detection.or(base.outlier_detection),
            tls: self.tls.or(base.tls),
            retry_budget: self.retry_budget.or(base.retry_budget),
            port_level: Vec::new(),
        }
    }

    fn for_port(&self, port: Option<u16>) -> TrafficPolicy {
        let mut base = self.clone();
        base.port_level.clear();
        match port.and_then(|p| self.port_level.iter().find(|(n, _)| *n == p)) {
            Some((_, pl)) => pl.clone().over(base),
            None => base,
        }
    }
}

/// How endpoints are chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadBalancer {
    pub algorithm: Algorithm,
    pub locality: Option<LocalityFailover>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Algorithm {
    RoundRobin,
    Random,
    /// Power of two choices by requests in flight (Istio's default).
    LeastRequest,
    /// Lumen's extension (`simple: LEAST_LATENCY`): power of two choices by
    /// a peak-sensitive moving average of latency times load, as Linkerd's.
    LeastLatency,
    ConsistentHash(ConsistentHash),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConsistentHash {
    pub key: HashKey,
    pub ring: HashRing,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HashKey {
    Header(String),
    /// A cookie; when absent and `ttl` is set, the proxy makes one and
    /// sets it on the response.
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
    },
    SourceIp,
    QueryParameter(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashRing {
    RingHash { minimum_ring_size: u64 },
    Maglev { table_size: u64 },
}

/// Locality-aware balancing: same zone first, then same region, then
/// elsewhere (or the regions `failover` names first).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LocalityFailover {
    pub enabled: bool,
    /// `(from region, to region)`.
    pub failover: Vec<(String, String)>,
}

/// The circuit breaker. `None` is Envoy's default (effectively unlimited).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConnectionPool {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutlierDetection {
    /// Consecutive 5xx answers (and connect failures) that eject an endpoint.
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502/503/504 (and connect failures) that eject one.
    pub consecutive_gateway: Option<u32>,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    /// Mesh mTLS with the mesh CA's certificates.
    IstioMutual,
}

// ---- Istio's schema ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    host: String,
    #[serde(default)]
    traffic_policy: Option<TrafficPolicySpec>,
    #[serde(default)]
    subsets: Vec<SubsetSpec>,
    #[serde(default)]
    export_to: Option<Vec<String>>,
    #[serde(default)]
    workload_selector: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SubsetSpec {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    traffic_policy: Option<TrafficPolicySpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TrafficPolicySpec {
    #[serde(default)]
    load_balancer: Option<LoadBalancerSpec>,
    #[serde(default)]
    connection_pool: Option<ConnectionPoolSpec>,
    #[serde(default)]
    outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default)]
    tls: Option<TlsSpec>,
    #[serde(default)]
    port_level_settings: Vec<PortTrafficPolicySpec>,
    #[serde(default)]
    tunnel: Option<serde_json::Value>,
    #[serde(default)]
    proxy_protocol: Option<serde_json::Value>,
    #[serde(default)]
    retry_budget: Option<RetryBudgetSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortTrafficPolicySpec {
    port: PortSelectorSpec,
    #[serde(default)]
    load_balancer: Option<LoadBalancerSpec>,
    #[serde(default)]
    connection_pool: Option<ConnectionPoolSpec>,
    #[serde(default)]
    outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default)]
    tls: Option<TlsSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RetryBudgetSpec {
    #[serde(default)]
    percent: Option<f64>,
    #[serde(default)]
    min_retry_concurrency: Option<u32>,
    #[serde(default)]
    budget_interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LoadBalancerSpec {
    #[serde(default)]
    simple: Option<String>,
    #[serde(default)]
    consistent_hash: Option<ConsistentHashSpec>,
    #[serde(default)]
    locality_lb_setting: Option<LocalitySpec>,
    #[serde(default)]
    zone_aware_lb_setting: Option<serde_json::Value>,
    #[serde(default)]
    warmup_duration_secs: Option<serde_json::Value>,
    #[serde(default)]
    warmup: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConsistentHashSpec {
    #[serde(default)]
    http_header_name: Option<String>,
    #[serde(default)]
    http_cookie: Option<CookieSpec>,
    #[serde(default)]
    use_source_ip: Option<bool>,
    #[serde(default)]
    http_query_parameter_name: Option<String>,
    #[serde(default)]
    ring_hash: Option<RingHashSpec>,
    #[serde(default)]
    maglev: Option<MaglevSpec>,
    #[serde(default)]
    minimum_ring_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CookieSpec {
    name: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    attributes: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RingHashSpec {
    #[serde(default)]
    minimum_ring_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MaglevSpec {
    #[serde(default)]
    table_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalitySpec {
    #[serde(default)]
    distribute: Option<serde_json::Value>,
    #[serde(default)]
    failover: Vec<FailoverSpec>,
    #[serde(default)]
    failover_priority: Option<serde_json::Value>,
    #[serde(default)]
    enabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverSpec {
    from: String,
    to: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionPoolSpec {
    #[serde(default)]
    tcp: Option<TcpPoolSpec>,
    #[serde(default)]
    http: Option<HttpPoolSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TcpPoolSpec {
    #[serde(default)]
    max_connections: Option<i64>,
    #[serde(default)]
    connect_timeout: Option<String>,
    #[serde(default)]
    tcp_keepalive: Option<serde_json::Value>,
    #[serde(default)]
    max_connection_duration: Option<serde_json::Value>,
    #[serde(default)]
    idle_timeout: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpPoolSpec {
    #[serde(default)]
    http1_max_pending_requests: Option<i64>,
    #[serde(default)]
    http2_max_requests: Option<i64>,
    #[serde(default)]
    max_requests_per_connection: Option<i64>,
    #[serde(default)]
    max_retries: Option<i64>,
    #[serde(default)]
    idle_timeout: Option<serde_json::Value>,
    #[serde(default)]
    h2_upgrade_policy: Option<String>,
    #[serde(default)]
    use_client_protocol: Option<bool>,
    #[serde(default)]
    max_concurrent_streams: Option<serde_json::Value>,
    #[serde(default)]
    http2_keep_alive: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OutlierDetectionSpec {
    #[serde(default)]
    consecutive_errors: Option<i64>,
    #[serde(default)]
    split_external_local_origin_errors: Option<bool>,
    #[serde(default)]
    consecutive_local_origin_failures: Option<serde_json::Value>,
    #[serde(default)]
    consecutive_gateway_errors: Option<i64>,
    #[serde(default, rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<i64>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    base_ejection_time: Option<String>,
    #[serde(default)]
    max_ejection_percent: Option<i64>,
    #[serde(default)]
    min_health_percent: Option<i64>,
    #[serde(default)]
    outlier_detection_http_error_codes: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TlsSpec {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    client_certificate: Option<serde_json::Value>,
    #[serde(default)]
    private_key: Option<serde_json::Value>,
    #[serde(default)]
    ca_certificates: Option<serde_json::Value>,
    #[serde(default)]
    credential_name: Option<serde_json::Value>,
    #[serde(default)]
    subject_alt_names: Option<serde_json::Value>,
    #[serde(default)]
    sni: Option<serde_json::Value>,
    #[serde(default)]
    insecure_skip_verify: Option<serde_json::Value>,
    #[serde(default)]
    ca_crl: Option<serde_json::Value>,
}

// ---- validation ----

pub fn validate(res: &Resource) -> Result<DestinationRule, ConfigError> {
    let spec: Spec = res.spec()?;
    let at = At::spec(res);
    at.unsupported(
        &spec.export_to.filter(|e| !(e.is_empty() || e == &["*"])),
        "exportTo",
        "every resource is visible to the whole mesh (`*`)",
    )?;
    at.unsupported(
        &spec.workload_selector,
        "workloadSelector",
        "a DestinationRule applies to every sidecar",
    )?;
    if spec.host.trim().is_empty() {
        return Err(at.at("host").err("must not be empty"));
    }
    if spec.host.contains('*') {
        return Err(at
            .at("host")
            .err("Lumen applies a DestinationRule to one host; wildcards are not supported"));
    }
    let host_policy = match spec.traffic_policy {
        None => TrafficPolicy::default(),
        Some(p) => traffic_policy(p, &at.at("trafficPolicy"))?,
    };
    let mut subsets: Vec<Subset> = Vec::new();
    for (i, s) in spec.subsets.into_iter().enumerate() {
        let at = at.at("subsets").at(format!("[{i}]"));
        let valid_name = !s.name.is_empty()
            && s.name.len() <= 63
            && s.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !valid_name {
            return Err(at
                .at("name")
                .err(format!("`{}` is not a valid subset name", s.name)));
        }
        if let Some(j) = subsets.iter().position(|x| x.name == s.name) {
            return Err(at.at("name").err(format!(
                "subset `{}` is already defined at subsets[{j}]",
                s.name
            )));
        }
        subsets.push(Subset {
            labels: labels(s.labels, &at.at("labels"))?,
            traffic_policy: match s.traffic_policy {
                None => None,
                Some(p) => Some(traffic_policy(p, &at.at("trafficPolicy"))?),
            },
            name: s.name,
        });
    }
    Ok(DestinationRule {
        name: res.name.clone(),
        namespace: res.namespace.clone(),
        host: spec.host,
        traffic_policy: host_policy,
        subsets,
    })
}

fn traffic_policy(p: TrafficPolicySpec, at: &At<'_>) -> Result<TrafficPolicy, ConfigError> {
    at.unsupported(
        &p.tunnel,
        "tunnel",
        "Lumen does not tunnel to upstreams over CONNECT",
    )?;
    at.unsupported(
        &p.proxy_protocol,
        "proxyProtocol",
        "Lumen does not send the PROXY protocol",
    )?;
    let retry_budget = match p.retry_budget {
        None => None,
        Some(b) => {
            let at = at.at("retryBudget");
            at.unsupported(
                &b.budget_interval,
                "budgetInterval",
                "the budget counts retries in flight, not over an interval",
            )?;
            let percent = b.percent.unwrap_or(20.0);
            if !(0.0..=100.0).contains(&percent) {
                return Err(at
                    .at("percent")
                    .err(format!("{percent} is not between 0 and 100")));
            }
            Some((percent, b.min_retry_concurrency.unwrap_or(3)))
        }
    };
    let mut port_level = Vec::new();
    for (i, pl) in p.port_level_settings.into_iter().enumerate() {
        let at = at.at("portLevelSettings").at(format!("[{i}]"));
        let port = pl.port.port(&at.at("port"))?;
        if port_level.iter().any(|(p, _)| *p == port) {
            return Err(at
                .at("port")
                .err(format!("port {port} has settings already")));
        }
        port_level.push((
            port,
            TrafficPolicy {
                load_balancer: opt(pl.load_balancer, |x| {
                    load_balancer(x, &at.at("loadBalancer"))
                })?,
                connection_pool: opt(pl.connection_pool, |x| {
                    connection_pool(x, &at.at("connectionPool"))
                })?,
                outlier_detection: opt(pl.outlier_detection, |x| {
                    outlier(x, &at.at("outlierDetection"))
                })?,
                tls: opt(pl.tls, |x| tls(x, &at.at("tls")))?,
                retry_budget: None,
                port_level: Vec::new(),
            },
        ));
    }
    Ok(TrafficPolicy {
        load_balancer: opt(p.load_balancer, |x| {
            load_balancer(x, &at.at("loadBalancer"))
        })?,
        connection_pool: opt(p.connection_pool, |x| {
            connection_pool(x, &at.at("connectionPool"))
        })?,
        outlier_detection: opt(p.outlier_detection, |x| {
            outlier(x, &at.at("outlierDetection"))
        })?,
        tls: opt(p.tls, |x| tls(x, &at.at("tls")))?,
        retry_budget,
        port_level,
    })
}

fn opt<T, U>(
    v: Option<T>,
    f: impl FnOnce(T) -> Result<U, ConfigError>,
) -> Result<Option<U>, ConfigError> {
    v.map(f).transpose()
}

fn load_balancer(lb: LoadBalancerSpec, at: &At<'_>) -> Result<LoadBalancer, ConfigError> {
    at.unsupported(
        &lb.zone_aware_lb_setting,
        "zoneAwareLbSetting",
        "use localityLbSetting",
    )?;
    at.unsupported(
        &lb.warmup_duration_secs,
        "warmupDurationSecs",
        "new endpoints take their full share at once",
    )?;
    at.unsupported(
        &lb.warmup,
        "warmup",
        "new endpoints take their full share at once",
    )?;
    let algorithm = match (lb.simple.as_deref(), lb.consistent_hash) {
        (Some(_), Some(_)) => return Err(at.err("set only one of simple and consistentHash")),
        (Some(s), None) => match s {
            "ROUND_ROBIN" => Algorithm::RoundRobin,
            "RANDOM" => Algorithm::Random,
            "LEAST_REQUEST" | "LEAST_CONN" | "UNSPECIFIED" => Algorithm::LeastRequest,
            "LEAST_LATENCY" => Algorithm::LeastLatency,
            "PASSTHROUGH" => {
                return Err(at.at("simple").err(
                    "not supported by Lumen: PASSTHROUGH (requests go to the endpoints the registry lists)",
                ));
            }
            other => {
                return Err(at.at("simple").err(format!(
                    "`{other}` is not one of ROUND_ROBIN, RANDOM, LEAST_REQUEST, LEAST_CONN, LEAST_LATENCY (Lumen's)"
                )));
            }
        },
        (None, Some(ch)) => {
            Algorithm::ConsistentHash(consistent_hash(ch, &at.at("consistentHash"))?)
        }
        (None, None) => Algorithm::LeastRequest,
    };
    let locality = match lb.locality_lb_setting {
        None => None,
        Some(l) => {
            let at = at.at("localityLbSetting");
            at.unsupported(&l.distribute, "distribute", "use failover")?;
            at.unsupported(&l.failover_priority, "failoverPriority", "use failover")?;
            Some(LocalityFailover {
                enabled: l.enabled.unwrap_or(true),
                failover: l.failover.into_iter().map(|f| (f.from, f.to)).collect(),
            })
        }
    };
    Ok(LoadBalancer {
        algorithm,
        locality,
    })
}

fn consistent_hash(ch: ConsistentHashSpec, at: &At<'_>) -> Result<ConsistentHash, ConfigError> {
    let mut keys = Vec::new();
    if let Some(h) = ch.http_header_name {
        keys.push(HashKey::Header(h.to_ascii_lowercase()));
    }
    if let Some(c) = ch.http_cookie {
        let at = at.at("httpCookie");
        at.unsupported(
            &c.attributes,
            "attributes",
            "the cookie Lumen sets carries its name, path and Max-Age",
        )?;
        let ttl = match &c.ttl {
            None => None,
            Some(t) => Some(duration_field(t, &at.at("ttl"))?).filter(|t| !t.is_zero()),
        };
        keys.push(HashKey::Cookie {
            name: c.name,
            path: c.path,
            ttl,
        });
    }
    if ch.use_source_ip == Some(true) {
        keys.push(HashKey::SourceIp);
    }
    if let Some(q) = ch.http_query_parameter_name {
        keys.push(HashKey::QueryParameter(q));
    }
    let key = match keys.len() {
        1 => keys.remove(0),
        0 => return Err(at.err(
            "needs a hash key: httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName",
        )),
        _ => return Err(at.err("set only one hash key")),
    };
    let ring = match (ch.ring_hash, ch.maglev) {
        (Some(_), Some(_)) => return Err(at.err("set only one of ringHash and maglev")),
        (None, Some(m)) => {
            let size = m.table_size.unwrap_or(65537);
            if !is_prime(size) || size > 5_000_011 {
                return Err(at
                    .at("maglev.tableSize")
                    .err(format!("{size} must be a prime of at most 5000011")));
            }
            HashRing::Maglev { table_size: size }
        }
        (Some(r), None) => HashRing::RingHash {
            minimum_ring_size: ring_size(
                r.minimum_ring_size.or(ch.minimum_ring_size),
                &at.at("ringHash.minimumRingSize"),
            )?,
        },
        (None, None) => HashRing::RingHash {
            minimum_ring_size: ring_size(ch.minimum_ring_size, &at.at("minimumRingSize"))?,
        },
    };
    Ok(ConsistentHash { key, ring })
}

fn ring_size(v: Option<u64>, at: &At<'_>) -> Result<u64, ConfigError> {
    let v = v.filter(|v| *v > 0).unwrap_or(1024);
    if v > 8_388_608 {
        return Err(at.err(format!("{v} is more than 8388608")));
    }
    Ok(v)
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

fn count(v: Option<i64>, at: &At<'_>) -> Result<Option<u32>, ConfigError> {
    match v {
        None | Some(0) => Ok(None),
        Some(n) if n > 0 && n <= i64::from(u32::MAX) => Ok(Some(n as u32)),
        Some(n) => Err(at.err(format!("{n} is not a positive count"))),
    }
}

fn connection_pool(p: ConnectionPoolSpec, at: &At<'_>) -> Result<ConnectionPool, ConfigError> {
    let mut out = ConnectionPool::default();
    if let Some(t) = p.tcp {
        let at = at.at("tcp");
        at.unsupported(&t.tcp_keepalive, "tcpKeepalive", "Lumen keeps upstream connections alive with its own probes (30 s, every 10 s, 3 tries)")?;
        at.unsupported(
            &t.max_connection_duration,
            "maxConnectionDuration",
            "connections live until idle",
        )?;
        at.unsupported(
            &t.idle_timeout,
            "idleTimeout",
            "pooled connections close after 4 s idle",
        )?;
        out.max_connections = count(t.max_connections, &at.at("maxConnections"))?;
        if let Some(c) = &t.connect_timeout {
            let d = duration_field(c, &at.at("connectTimeout"))?;
            if d.is_zero() {
                return Err(at.at("connectTimeout").err("must be more than 0"));
            }
            out.connect_timeout = Some(d);
        }
    }
    if let Some(h) = p.http {
        let at = at.at("http");
        at.unsupported(
            &h.idle_timeout,
            "idleTimeout",
            "pooled connections close after 4 s idle",
        )?;
        at.unsupported(
            &h.max_concurrent_streams,
            "maxConcurrentStreams",
            "use http2MaxRequests",
        )?;
        at.unsupported(
            &h.http2_keep_alive,
            "http2KeepAlive",
            "Lumen pings HTTP/2 upstreams every 10 s",
        )?;
        match h.h2_upgrade_policy.as_deref() {
            None | Some("DEFAULT") | Some("DO_NOT_UPGRADE") => {}
            Some("UPGRADE") => {
                return Err(at.at("h2UpgradePolicy").err(
                    "not supported by Lumen: UPGRADE; declare the service's protocol as http2 in the Mesh",
                ));
            }
            Some(other) => {
                return Err(at.at("h2UpgradePolicy").err(format!(
                    "`{other}` is not DEFAULT, DO_NOT_UPGRADE or UPGRADE"
                )));
            }
        }
        if h.use_client_protocol == Some(false) {
            return Err(at.at("useClientProtocol").err(
                "not supported by Lumen: false; a sidecar speaks the service's declared protocol, or the caller's",
            ));
        }
        out.http1_max_pending_requests = count(
            h.http1_max_pending_requests,
            &at.at("http1MaxPendingRequests"),
        )?;
        out.http2_max_requests = count(h.http2_max_requests, &at.at("http2MaxRequests"))?;
        out.max_requests_per_connection = count(
            h.max_requests_per_connection,
            &at.at("maxRequestsPerConnection"),
        )?;
        out.max_retries = count(h.max_retries, &at.at("maxRetries"))?;
    }
    Ok(out)
}

fn outlier(o: OutlierDetectionSpec, at: &At<'_>) -> Result<OutlierDetection, ConfigError> {
    at.unsupported(
        &o.split_external_local_origin_errors.filter(|s| *s),
        "splitExternalLocalOriginErrors",
        "connect failures count as 5xx and gateway errors, as Envoy's default",
    )?;
    at.unsupported(
        &o.consecutive_local_origin_failures,
        "consecutiveLocalOriginFailures",
        "connect failures count as 5xx and gateway errors",
    )?;
    at.unsupported(
        &o.outlier_detection_http_error_codes,
        "outlierDetectionHttpErrorCodes",
        "5xx and gateway errors are counted",
    )?;
    let nonneg = |v: Option<i64>, at: At<'_>| -> Result<Option<u32>, ConfigError> {
        match v {
            None => Ok(None),
            Some(n) if (0..=i64::from(u32::MAX)).contains(&n) => Ok(Some(n as u32)),
            Some(n) => Err(at.err(format!("{n} is negative"))),
        }
    };
    let mut consecutive_5xx = nonneg(o.consecutive_5xx_errors, at.at("consecutive5xxErrors"))?;
    let mut consecutive_gateway = nonneg(
        o.consecutive_gateway_errors,
        at.at("consecutiveGatewayErrors"),
    )?;
    // Istio maps the deprecated `consecutiveErrors` to gateway errors.
    if let Some(n) = nonneg(o.consecutive_errors, at.at("consecutiveErrors"))?
        && consecutive_5xx.is_none()
        && consecutive_gateway.is_none()
    {
        consecutive_gateway = Some(n);
        consecutive_5xx = Some(0);
    }
    // Envoy's default: eject after 5 consecutive 5xx.
    let consecutive_5xx = match consecutive_5xx {
        None => Some(5),
        Some(0) => None,
        n => n,
    };
    let consecutive_gateway = consecutive_gateway.filter(|n| *n > 0);
    let dur =
        |v: &Option<String>, field: &str, default: Duration| -> Result<Duration, ConfigError> {
            match v {
                None => Ok(default),
                Some(t) => {
                    let d = duration_field(t, &at.at(field))?;
                    if d < Duration::from_millis(1) {
                        return Err(at.at(field).err("must be at least 1ms"));
                    }
                    Ok(d)
                }
            }
        };
    let percent = |v: Option<i64>, field: &str, default: u32| -> Result<u32, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) if (0..=100).contains(&n) => Ok(n as u32),
            Some(n) => Err(at.at(field).err(format!("{n} is not between 0 and 100"))),
        }
    };
    Ok(OutlierDetection {
        consecutive_5xx,
        consecutive_gateway,
        interval: dur(&o.interval, "interval", Duration::from_secs(10))?,
        base_ejection_time: dur(
            &o.base_ejection_time,
            "baseEjectionTime",
            Duration::from_secs(30),
        )?,
        max_ejection_percent: percent(o.max_ejection_percent, "maxEjectionPercent", 10)?,
        min_health_percent: percent(o.min_health_percent, "minHealthPercent", 0)?,
    })
}

fn tls(t: TlsSpec, at: &At<'_>) -> Result<TlsMode, ConfigError> {
    for (field, v) in [
        ("clientCertificate", &t.client_certificate),
        ("privateKey", &t.private_key),
        ("caCertificates", &t.ca_certificates),
        ("credentialName", &t.credential_name),
        ("subjectAltNames", &t.subject_alt_names),
        ("sni", &t.sni),
        ("insecureSkipVerify", &t.insecure_skip_verify),
        ("caCrl", &t.ca_crl),
    ] {
        at.unsupported(
            v,
            field,
            "TLS to upstreams outside the mesh is not implemented yet",
        )?;
    }
    match t.mode.as_deref() {
        None | Some("DISABLE") => Ok(TlsMode::Disable),
        Some("ISTIO_MUTUAL") => Ok(TlsMode::IstioMutual),
        Some(m @ ("SIMPLE" | "MUTUAL")) => Err(at.at("mode").err(format!(
            "not supported by Lumen yet: {m} (TLS to upstreams outside the mesh); ISTIO_MUTUAL and DISABLE are"
        ))),
        Some(other) => Err(at.at("mode").err(format!(
            "`{other}` is not DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::parse_resources;

    fn dr(yaml: &str) -> Result<DestinationRule, ConfigError> {
        let text = format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: reviews\nspec:\n  host: reviews\n{yaml}"
        );
        validate(&parse_resources("dr.yaml", &text)?[0])
    }

    #[test]
    fn subset_and_port_settings_override_the_hosts_whole() {
        let d = dr("  trafficPolicy:\n    loadBalancer: {simple: RANDOM}\n    connectionPool: {tcp: {maxConnections: 10}}\n    portLevelSettings:\n    - port: {number: 9080}\n      loadBalancer: {simple: ROUND_ROBIN}\n  subsets:\n  - name: v2\n    labels: {version: v2}\n    trafficPolicy:\n      connectionPool: {http: {http2MaxRequests: 5}}\n").unwrap();
        let p = d.policy(None, None);
        assert_eq!(p.load_balancer.unwrap().algorithm, Algorithm::Random);
        let p = d.policy(Some("v2"), Some(9080));
        assert_eq!(p.load_balancer.unwrap().algorithm, Algorithm::RoundRobin);
        let pool = p.connection_pool.unwrap();
        assert_eq!(pool.http2_max_requests, Some(5));
        assert_eq!(
            pool.max_connections, None,
            "the subset's pool replaces the host's whole"
        );
    }

    #[test]
    fn outlier_detection_takes_envoys_defaults() {
        let d =
            dr("  trafficPolicy:\n    outlierDetection: {consecutiveGatewayErrors: 2}\n").unwrap();
        let o = d.traffic_policy.outlier_detection.unwrap();
        assert_eq!(o.consecutive_gateway, Some(2));
        assert_eq!(o.consecutive_5xx, Some(5));
        assert_eq!(o.interval, Duration::from_secs(10));
        assert_eq!(o.base_ejection_time, Duration::from_secs(30));
        assert_eq!(o.max_ejection_percent, 10);
    }

    #[test]
    fn refusals_name_the_field() {
        let e = dr("  trafficPolicy:\n    loadBalancer: {simple: PASSTHROUGH}\n").unwrap_err();
        assert_eq!(e.field, "spec.trafficPolicy.loadBalancer.simple");
        let e = dr("  trafficPolicy:\n    loadBalancer:\n      consistentHash: {httpHeaderName: x, maglev: {tableSize: 100}}\n").unwrap_err();
        assert_eq!(
            e.field,
            "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize"
        );
        let e = dr("  subsets:\n  - name: v1\n  - name: v1\n").unwrap_err();
        assert_eq!(e.field, "spec.subsets[1].name");
        let e = dr("  trafficPolicy:\n    tls: {mode: SIMPLE}\n").unwrap_err();
        assert_eq!(e.field, "spec.trafficPolicy.tls.mode");
    }
}
