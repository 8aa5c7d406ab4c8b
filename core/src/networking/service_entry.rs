//! `ServiceEntry`: services the registry does not list (external APIs,
//! VMs), added under their own host names, with their endpoints.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Deserialize;

use super::{At, labels};
use crate::resource::ConfigError;
use crate::resource::Resource;
use crate::service::{Endpoint, RetryPolicy, Service, UpstreamProtocol};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    hosts: Vec<String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    #[serde(default)]
    location: Option<String>,
    #[serde(default)]
    resolution: Option<String>,
    #[serde(default)]
    endpoints: Vec<WorkloadEntrySpec>,
    #[serde(default)]
    workload_selector: Option<serde_json::Value>,
    #[serde(default)]
    export_to: Option<Vec<String>>,
    #[serde(default)]
    subject_alt_names: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortSpec {
    number: u32,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    target_port: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WorkloadEntrySpec {
    address: String,
    #[serde(default)]
    ports: BTreeMap<String, u32>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    locality: Option<String>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    service_account: Option<String>,
}

fn port(n: u32, at: &At<'_>) -> Result<u16, ConfigError> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| at.err(format!("{n} is not a port (1-65535)")))
}

/// Istio's port protocols as the sidecar speaks them upstream.
fn protocol(p: Option<&str>, at: &At<'_>) -> Result<UpstreamProtocol, ConfigError> {
    Ok(match p.map(str::to_ascii_uppercase).as_deref() {
        None => UpstreamProtocol::Auto,
        Some("HTTP") => UpstreamProtocol::Http,
        Some("HTTP2") => UpstreamProtocol::Http2,
        Some("GRPC") | Some("GRPC-WEB") => UpstreamProtocol::Grpc,
        Some("TCP" | "TLS" | "HTTPS" | "MONGO" | "MYSQL" | "REDIS") => UpstreamProtocol::Tcp,
        Some(other) => {
            return Err(at.err(format!(
                "`{other}` is not a protocol Lumen knows (HTTP, HTTP2, GRPC, TCP, TLS, HTTPS)"
            )));
        }
    })
}

/// The services a `ServiceEntry` adds: one per host, named by the host.
pub fn service_entry_services(res: &Resource) -> Result<Vec<Service>, ConfigError> {
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
        "list the endpoints in `endpoints`",
    )?;
    at.unsupported(
        &spec.subject_alt_names,
        "subjectAltNames",
        "TLS to upstreams is not implemented yet",
    )?;
    match spec.location.as_deref() {
        None | Some("MESH_EXTERNAL" | "MESH_INTERNAL") => {}
        Some(other) => {
            return Err(at
                .at("location")
                .err(format!("`{other}` is not MESH_EXTERNAL or MESH_INTERNAL")));
        }
    }
    match spec.resolution.as_deref() {
        None | Some("NONE") => {
            return Err(at.at("resolution").err(
                "not supported by Lumen: NONE (pass-through to the address the app dialled); \
                 use STATIC with endpoints",
            ));
        }
        Some("STATIC" | "DNS" | "DNS_ROUND_ROBIN") => {}
        Some("DYNAMIC_DNS") => {
            return Err(at
                .at("resolution")
                .err("not supported by Lumen: DYNAMIC_DNS"));
        }
        Some(other) => {
            return Err(at.at("resolution").err(format!(
                "`{other}` is not NONE, STATIC, DNS, DNS_ROUND_ROBIN or DYNAMIC_DNS"
            )));
        }
    }
    if spec.hosts.is_empty() {
        return Err(at.at("hosts").err("at least one host is required"));
    }
    if spec.ports.is_empty() {
        return Err(at.at("ports").err("at least one port is required"));
    }
    if spec.endpoints.is_empty() {
        return Err(at
            .at("endpoints")
            .err("Lumen does not resolve hosts by DNS yet: list the endpoints' addresses"));
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let at = at.at("ports").at(format!("[{i}]"));
        let number = port(p.number, &at.at("number"))?;
        let target = match p.target_port {
            None | Some(0) => number,
            Some(t) => port(t, &at.at("targetPort"))?,
        };
        ports.push((
            number,
            target,
            p.name.clone().unwrap_or_default(),
            protocol(p.protocol.as_deref(), &at.at("protocol"))?,
        ));
    }
    let cluster_ip = match spec.addresses.first() {
        None => None,
        Some(a) => Some(a.parse::<IpAddr>().map_err(|_| {
            at.at("addresses[0]").err(format!(
                "`{a}` is not an IP address (CIDR blocks are not supported)"
            ))
        })?),
    };
    if spec.addresses.len() > 1 {
        return Err(at
            .at("addresses")
            .err("Lumen takes one address per ServiceEntry"));
    }
    let (number, target, port_name, proto) = ports[0].clone();
    if ports.len() > 1 {
        return Err(at
            .at("ports")
            .err("Lumen takes one port per ServiceEntry; write one entry per port"));
    }
    let mut endpoints: Vec<Endpoint> = Vec::new();
    for (j, e) in spec.endpoints.into_iter().enumerate() {
        let at = at.at("endpoints").at(format!("[{j}]"));
        at.unsupported(&e.network, "network", "the mesh is one network")?;
        at.unsupported(
            &e.weight.filter(|w| *w != 1),
            "weight",
            "endpoints of a service share its traffic evenly",
        )?;
        let ip: IpAddr = e.address.parse().map_err(|_| {
            at.at("address").err(format!(
                "`{}` is not an IP address (Lumen does not resolve endpoint names by DNS yet)",
                e.address
            ))
        })?;
        let p = match e.ports.get(&port_name) {
            Some(p) => port(*p, &at.at("ports").at(&port_name))?,
            None => target,
        };
        let address = SocketAddr::new(ip, p);
        if endpoints.iter().any(|x| x.address == address) {
            return Err(at.at("address").err(format!("`{address}` is listed twice")));
        }
        let lbls = labels(e.labels, &at.at("labels"))?;
        let version = lbls
            .get("version")
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        let mut ep = Endpoint::new(address, &res.name, &version);
        ep.labels = Arc::new(lbls);
        ep.locality = e.locality.filter(|l| !l.is_empty()).map(Arc::from);
        if let Some(sa) = e.service_account {
            if !crate::identity::valid_segment(&sa) {
                return Err(at
                    .at("serviceAccount")
                    .err(format!("`{sa}` is not a Kubernetes name")));
            }
            ep.service_account = Some(sa.into());
        }
        endpoints.push(ep);
    }
    let mut out = Vec::new();
    for (i, h) in spec.hosts.iter().enumerate() {
        if h.contains('*') || h.is_empty() {
            return Err(at
                .at("hosts")
                .at(format!("[{i}]"))
                .err(format!("`{h}`: Lumen needs a host name without wildcards")));
        }
        out.push(Service {
            name: h.as_str().into(),
            namespace: res.namespace.as_str().into(),
            port: Some(number),
            cluster_ip,
            protocol: proto,
            retries: Arc::new(RetryPolicy::default()),
            endpoints: endpoints.clone(),
            external_host: true,
        });
    }
    Ok(out)
}
