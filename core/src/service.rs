//! The mesh's services as proxies use them: a [`Service`] with its
//! [`Endpoint`]s, the protocol spoken to them, and the [`RetryPolicy`] a
//! failed try is judged by. Built by [`crate::config`] from Lumen's `Mesh`
//! and by [`crate::networking`] from Istio's ServiceEntry.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

/// How a sidecar speaks to a service's endpoints, whatever its caller spoke.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// The caller's own protocol (HTTP/1.1 stays HTTP/1.1, HTTP/2 stays HTTP/2).
    #[default]
    Auto,
    /// HTTP/1.1.
    Http,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    /// gRPC: HTTP/2, with gRPC's status in telemetry.
    Grpc,
    /// Opaque TCP: bytes through, no HTTP.
    Tcp,
}

/// Which failures a request is retried on, by Envoy's `retry_on` names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RetryOn {
    /// `5xx`: any 5xx response, connect failures and resets.
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504.
    pub gateway_error: bool,
    /// `reset`: the upstream reset or closed before answering.
    pub reset: bool,
    /// `connect-failure`.
    pub connect_failure: bool,
    /// `refused-stream`: HTTP/2 REFUSED_STREAM (the stream was never processed).
    pub refused_stream: bool,
    /// `retriable-status-codes`: the statuses of `retriableStatusCodes`.
    pub retriable_status_codes: bool,
    /// gRPC statuses in a trailers-only response: `cancelled`,
    /// `deadline-exceeded`, `internal`, `resource-exhausted`, `unavailable`.
    pub grpc_cancelled: bool,
    pub grpc_deadline_exceeded: bool,
    pub grpc_internal: bool,
    pub grpc_resource_exhausted: bool,
    pub grpc_unavailable: bool,
}

impl RetryOn {
    /// Parses a comma-separated list of Envoy's names.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut on = RetryOn::default();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let flag = match name {
                "5xx" => &mut on.server_error,
                "gateway-error" => &mut on.gateway_error,
                "reset" => &mut on.reset,
                "connect-failure" => &mut on.connect_failure,
                "refused-stream" => &mut on.refused_stream,
                "retriable-status-codes" => &mut on.retriable_status_codes,
                "cancelled" => &mut on.grpc_cancelled,
                "deadline-exceeded" => &mut on.grpc_deadline_exceeded,
                "internal" => &mut on.grpc_internal,
                "resource-exhausted" => &mut on.grpc_resource_exhausted,
                "unavailable" => &mut on.grpc_unavailable,
                other => {
                    return Err(format!(
                        "unknown retry condition `{other}`; known: 5xx, gateway-error, reset, \
                         connect-failure, refused-stream, retriable-status-codes, cancelled, \
                         deadline-exceeded, internal, resource-exhausted, unavailable"
                    ));
                }
            };
            *flag = true;
        }
        Ok(on)
    }
}

/// When and how a failed request is tried again (Istio's `retries`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// Longest wait for one try's response headers; `None`: only the
    /// request's whole timeout applies.
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
    pub retriable_status_codes: Vec<u16>,
    /// Exponential backoff with full jitter between `backoff_base` and
    /// `backoff_max`, as Envoy's.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Retries in flight may be at most this share (%) of requests in
    /// flight to the service…
    pub budget_percent: u32,
    /// …but at least this many, so a quiet service can still retry.
    pub budget_min_concurrency: u32,
}

impl Default for RetryPolicy {
    /// Istio's default: 2 retries on connect failure, refused stream, gRPC
    /// unavailable / cancelled and HTTP 503.
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                grpc_unavailable: true,
                grpc_cancelled: true,
                retriable_status_codes: true,
                ..RetryOn::default()
            },
            retriable_status_codes: vec![503],
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            budget_percent: 20,
            budget_min_concurrency: 3,
        }
    }
}

/// One endpoint of a service: where its inbound sidecar listens, and who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// `address` as text, shared so records can carry it without formatting.
    pub address_str: Arc<str>,
    pub workload: Arc<str>,
    pub version: Arc<str>,
    /// The endpoint's labels, which DestinationRule subsets select by;
    /// `version` is among them when known.
    pub labels: Arc<BTreeMap<String, String>>,
    /// `region/zone/subzone`, for locality-aware balancing.
    pub locality: Option<Arc<str>>,
    /// The Kubernetes service account the endpoint runs as, when the
    /// configuration says (Istio's WorkloadEntry `serviceAccount`): mesh
    /// mTLS to it accepts only that identity.
    pub service_account: Option<Arc<str>>,
}

impl Endpoint {
    /// An endpoint of `service` at `address`, labelled with its version.
    pub fn new(address: SocketAddr, service: &str, version: &str) -> Self {
        let workload = if version == "unknown" {
            service.to_string()
        } else {
            format!("{service}-{version}")
        };
        let mut labels = BTreeMap::new();
        labels.insert("app".to_string(), service.to_string());
        if version != "unknown" {
            labels.insert("version".to_string(), version.to_string());
        }
        Endpoint {
            address,
            address_str: address.to_string().into(),
            workload: workload.into(),
            version: version.into(),
            labels: Arc::new(labels),
            locality: None,
            service_account: None,
        }
    }

    /// Whether every `key: value` of a selector is among the labels.
    pub fn selected_by(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// A named service and the endpoints that serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub port: Option<u16>,
    /// The virtual address apps dial (Kubernetes' ClusterIP), for traffic
    /// captured transparently, where no authority names the service.
    pub cluster_ip: Option<std::net::IpAddr>,
    pub protocol: UpstreamProtocol,
    pub retries: Arc<RetryPolicy>,
    pub endpoints: Vec<Endpoint>,
    /// Added by a ServiceEntry: `name` is a host name (`api.example.com`)
    /// matched whole, not a Kubernetes service name.
    pub external_host: bool,
}

impl Service {
    /// A service with the default protocol and retry policy.
    pub fn new(name: &str, namespace: &str, port: Option<u16>, endpoints: Vec<Endpoint>) -> Self {
        Service {
            name: name.into(),
            namespace: namespace.into(),
            port,
            cluster_ip: None,
            protocol: UpstreamProtocol::default(),
            retries: Arc::new(RetryPolicy::default()),
            endpoints,
            external_host: false,
        }
    }

    /// The name Istio gives the service in metrics and routes:
    /// `reviews.default.svc.cluster.local`, or a ServiceEntry's host.
    pub fn fqdn(&self) -> String {
        if self.external_host {
            self.name.to_string()
        } else {
            format!("{}.{}.svc.cluster.local", self.name, self.namespace)
        }
    }
}
