//! `Gateway`: the listeners of a proxy at the mesh's edge — which ports it
//! opens and for which hosts. Routes for them come from VirtualServices
//! that name the gateway in `gateways`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use super::{At, labels};
use crate::resource::ConfigError;
use crate::resource::Resource;
use crate::service::UpstreamProtocol;

#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    pub name: String,
    pub namespace: String,
    /// The gateway proxies it configures, by their labels.
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<GatewayServer>,
}

impl Gateway {
    /// Whether a VirtualService's `gateways` entry names this gateway:
    /// `name` in the gateway's namespace or `namespace/name`.
    pub fn is_named(&self, reference: &str, from_namespace: &str) -> bool {
        match reference.split_once('/') {
            Some((ns, name)) => ns == self.namespace && name == self.name,
            None => reference == self.name && from_namespace == self.namespace,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayServer {
    pub port: u16,
    pub name: String,
    /// `HTTP`, `HTTP2`, `GRPC` or `TCP`.
    pub protocol: UpstreamProtocol,
    pub hosts: Vec<String>,
    pub bind: Option<IpAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    servers: Vec<ServerSpec>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServerSpec {
    port: PortSpec,
    #[serde(default)]
    bind: Option<String>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    tls: Option<serde_json::Value>,
    #[serde(default)]
    default_endpoint: Option<serde_json::Value>,
    #[serde(default)]
    name: Option<String>,
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
    target_port: Option<serde_json::Value>,
}

pub fn validate(res: &Resource) -> Result<Gateway, ConfigError> {
    let spec: Spec = res.spec()?;
    let at = At::spec(res);
    if spec.servers.is_empty() {
        return Err(at.at("servers").err("at least one server is required"));
    }
    let mut servers: Vec<GatewayServer> = Vec::new();
    for (i, s) in spec.servers.into_iter().enumerate() {
        let at = at.at("servers").at(format!("[{i}]"));
        at.unsupported(
            &s.tls,
            "tls",
            "TLS at gateways comes with the security milestone",
        )?;
        at.unsupported(
            &s.default_endpoint,
            "defaultEndpoint",
            "a gateway routes by VirtualServices",
        )?;
        at.at("port").unsupported(
            &s.port.target_port,
            "targetPort",
            "the gateway listens on `number`",
        )?;
        let port = u16::try_from(s.port.number)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                at.at("port.number")
                    .err(format!("{} is not a port (1-65535)", s.port.number))
            })?;
        let protocol = match s
            .port
            .protocol
            .as_deref()
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            Some("HTTP") => UpstreamProtocol::Http,
            Some("HTTP2") => UpstreamProtocol::Http2,
            Some("GRPC") => UpstreamProtocol::Grpc,
            Some("TCP") => UpstreamProtocol::Tcp,
            Some(p @ ("HTTPS" | "TLS")) => {
                return Err(at.at("port.protocol").err(format!(
                    "not supported by Lumen yet: {p} (TLS at gateways comes with the security milestone)"
                )));
            }
            Some(other) => {
                return Err(at
                    .at("port.protocol")
                    .err(format!("`{other}` is not HTTP, HTTP2, GRPC or TCP")));
            }
            None => return Err(at.at("port.protocol").err("is required")),
        };
        if s.hosts.is_empty() {
            return Err(at
                .at("hosts")
                .err("at least one host is required (`*` for any)"));
        }
        let bind = match &s.bind {
            None => None,
            Some(b) => Some(b.parse::<IpAddr>().map_err(|_| {
                at.at("bind").err(format!(
                    "`{b}` is not an IP address (Unix sockets are not supported)"
                ))
            })?),
        };
        if let Some(j) = servers
            .iter()
            .position(|x| x.port == port && x.bind == bind)
        {
            return Err(at
                .at("port.number")
                .err(format!("port {port} is already served by servers[{j}]")));
        }
        servers.push(GatewayServer {
            port,
            name: s.name.or(s.port.name).unwrap_or_else(|| format!("{port}")),
            protocol,
            // `namespace/host` limits which namespaces' routes bind; Lumen
            // takes the host part.
            hosts: s
                .hosts
                .iter()
                .map(|h| h.rsplit('/').next().unwrap_or(h).to_string())
                .collect(),
            bind,
        });
    }
    Ok(Gateway {
        name: res.name.clone(),
        namespace: res.namespace.clone(),
        selector: labels(spec.selector, &at.at("selector"))?,
        servers,
    })
}
