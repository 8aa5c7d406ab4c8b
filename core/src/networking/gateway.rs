//! `Gateway`: the listeners of a proxy at the mesh's edge — which ports it
//! opens and for which hosts. Routes for them come from VirtualServices
//! that name the gateway in `gateways`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

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
    /// What is spoken once TLS, if any, is terminated: `HTTP` (also for
    /// `HTTPS`), `HTTP2`, `GRPC`, or `TCP` (also for `TLS`).
    pub protocol: UpstreamProtocol,
    pub hosts: Vec<String>,
    pub bind: Option<IpAddr>,
    /// The server's `tls`: terminated here (SIMPLE, MUTUAL) or passed
    /// through by SNI (PASSTHROUGH). `None`: plaintext.
    pub tls: Option<ServerTls>,
    /// `tls.httpsRedirect` on a plaintext server: every request gets a 301
    /// to the same URL over https.
    pub https_redirect: bool,
}

impl GatewayServer {
    /// Whether connections to this server open with TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether `host` (an SNI name or Host header, no port) is one of this
    /// server's hosts (`*`, `*.example.com` and exact names).
    pub fn serves(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| host_pattern_matches(h, host))
    }
}

/// Istio's host patterns: `*`, a `*.suffix` wildcard, or an exact name,
/// case-insensitive.
pub fn host_pattern_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => {
            host.len() > suffix.len()
                && host
                    .get(host.len() - suffix.len()..)
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// A Gateway server's `tls` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTls {
    pub mode: ServerTlsMode,
    /// Where the certificate and key come from (SIMPLE and MUTUAL).
    pub credential: Option<Credential>,
    /// For MUTUAL: a client certificate must carry one of these SANs
    /// (empty: any certificate the CA signed).
    pub subject_alt_names: Vec<String>,
    /// The lowest TLS version accepted (Istio's default: TLS 1.2).
    pub min_version: TlsVersion,
    /// The highest TLS version accepted (default TLS 1.3).
    pub max_version: TlsVersion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerTlsMode {
    /// TLS terminated with the server's certificate.
    Simple,
    /// TLS terminated; clients must present a certificate the server's CA
    /// signed.
    Mutual,
    /// Like MUTUAL, but a client without a certificate is let in too.
    OptionalMutual,
    /// Not terminated: the ClientHello's server name picks a VirtualService
    /// `tls` route and the bytes go through as they are.
    Passthrough,
}

impl ServerTlsMode {
    /// Istio's name for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerTlsMode::Simple => "SIMPLE",
            ServerTlsMode::Mutual => "MUTUAL",
            ServerTlsMode::OptionalMutual => "OPTIONAL_MUTUAL",
            ServerTlsMode::Passthrough => "PASSTHROUGH",
        }
    }
}

/// A server's certificate, key and (for MUTUAL) client CA.
#[derive(Debug, Clone, PartialEq)]
pub enum Credential {
    /// `credentialName`: a secret, read from the gateway's credentials
    /// directory (`<dir>/<name>/tls.crt`, `tls.key`, `ca.crt`, as a
    /// Kubernetes secret is mounted).
    Secret(String),
    /// `serverCertificate`, `privateKey`, `caCertificates`: files the
    /// gateway reads itself.
    Files {
        cert: PathBuf,
        key: PathBuf,
        ca: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
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
    tls: Option<TlsSpec>,
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

/// Istio's `ServerTLSSettings`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TlsSpec {
    #[serde(default)]
    https_redirect: bool,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    server_certificate: Option<String>,
    #[serde(default)]
    private_key: Option<String>,
    #[serde(default)]
    ca_certificates: Option<String>,
    #[serde(default)]
    ca_crl: Option<String>,
    #[serde(default)]
    credential_name: Option<String>,
    #[serde(default)]
    credential_names: Option<Vec<String>>,
    #[serde(default)]
    tls_certificates: Option<serde_json::Value>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    #[serde(default)]
    verify_certificate_spki: Option<Vec<String>>,
    #[serde(default)]
    verify_certificate_hash: Option<Vec<String>>,
    #[serde(default)]
    min_protocol_version: Option<String>,
    #[serde(default)]
    max_protocol_version: Option<String>,
    #[serde(default)]
    cipher_suites: Option<Vec<String>>,
}

fn tls_version(v: &str, at: &At<'_>) -> Result<Option<TlsVersion>, ConfigError> {
    match v {
        "TLS_AUTO" => Ok(None),
        "TLSV1_2" => Ok(Some(TlsVersion::V1_2)),
        "TLSV1_3" => Ok(Some(TlsVersion::V1_3)),
        "TLSV1_0" | "TLSV1_1" => Err(at.err(format!(
            "not supported by Lumen: {v} (rustls speaks TLS 1.2 and 1.3 only)"
        ))),
        other => Err(at.err(format!(
            "`{other}` is not TLS_AUTO, TLSV1_0, TLSV1_1, TLSV1_2 or TLSV1_3"
        ))),
    }
}

impl TlsSpec {
    /// The server's TLS, `None` when it only asks for `httpsRedirect`.
    fn validate(self, at: &At<'_>) -> Result<Option<ServerTls>, ConfigError> {
        at.unsupported(
            &self.ca_crl,
            "caCrl",
            "certificate revocation lists are not checked",
        )?;
        at.unsupported(
            &self.credential_names,
            "credentialNames",
            "one credential per server (`credentialName`)",
        )?;
        at.unsupported(
            &self.tls_certificates,
            "tlsCertificates",
            "one certificate per server (`credentialName` or `serverCertificate`)",
        )?;
        at.unsupported(
            &self.verify_certificate_spki,
            "verifyCertificateSpki",
            "client certificates are checked by CA and `subjectAltNames`",
        )?;
        at.unsupported(
            &self.verify_certificate_hash,
            "verifyCertificateHash",
            "client certificates are checked by CA and `subjectAltNames`",
        )?;
        at.unsupported(
            &self.cipher_suites,
            "cipherSuites",
            "rustls's default suites (TLS 1.3 and ECDHE with AEAD for 1.2) are used",
        )?;
        let mode = match self.mode.as_deref() {
            // Istio's default mode, when only `httpsRedirect` is set.
            None if self.credential_name.is_none() && self.server_certificate.is_none() => {
                return Ok(None);
            }
            None | Some("SIMPLE") => ServerTlsMode::Simple,
            Some("MUTUAL") => ServerTlsMode::Mutual,
            Some("OPTIONAL_MUTUAL") => ServerTlsMode::OptionalMutual,
            Some("PASSTHROUGH") => ServerTlsMode::Passthrough,
            Some(m @ ("ISTIO_MUTUAL" | "AUTO_PASSTHROUGH")) => {
                return Err(at.at("mode").err(format!(
                    "not supported by Lumen: {m} (gateways terminate with their own credentials or pass TLS through)"
                )));
            }
            Some(other) => {
                return Err(at.at("mode").err(format!(
                    "`{other}` is not PASSTHROUGH, SIMPLE, MUTUAL, OPTIONAL_MUTUAL, AUTO_PASSTHROUGH or ISTIO_MUTUAL"
                )));
            }
        };
        let credential = match (
            self.credential_name,
            self.server_certificate,
            self.private_key,
        ) {
            _ if mode == ServerTlsMode::Passthrough => None,
            (Some(name), None, None) => {
                // `kubernetes://name` is Istio's longer spelling. A secret's
                // name is a DNS subdomain: it never leaves the directory.
                let bare = name.strip_prefix("kubernetes://").unwrap_or(&name);
                let valid = !bare.is_empty()
                    && bare.len() <= 253
                    && bare.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                    })
                    && !bare.starts_with('.')
                    && !bare.contains("..");
                if !valid {
                    return Err(at.at("credentialName").err(format!(
                        "`{name}` is not a secret name (lower-case letters, digits, `-` and `.`)"
                    )));
                }
                Some(Credential::Secret(bare.to_string()))
            }
            (None, Some(cert), Some(key)) => Some(Credential::Files {
                cert: cert.into(),
                key: key.into(),
                ca: self.ca_certificates.clone().map(PathBuf::from),
            }),
            (Some(_), _, _) => {
                return Err(at.at("credentialName").err(
                    "give either credentialName or serverCertificate and privateKey, not both",
                ));
            }
            (None, Some(_), None) => {
                return Err(at
                    .at("privateKey")
                    .err("is required with serverCertificate"));
            }
            (None, None, Some(_)) => {
                return Err(at
                    .at("serverCertificate")
                    .err("is required with privateKey"));
            }
            (None, None, None) => {
                return Err(at.err(format!(
                    "mode {:?} needs credentialName (or serverCertificate and privateKey)",
                    mode
                )));
            }
        };
        if matches!(mode, ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual)
            && matches!(credential, Some(Credential::Files { ca: None, .. }))
        {
            return Err(at
                .at("caCertificates")
                .err("MUTUAL needs the CA that signs client certificates"));
        }
        let min = match &self.min_protocol_version {
            Some(v) => tls_version(v, &at.at("minProtocolVersion"))?,
            None => None,
        }
        .unwrap_or(TlsVersion::V1_2);
        let max = match &self.max_protocol_version {
            Some(v) => tls_version(v, &at.at("maxProtocolVersion"))?,
            None => None,
        }
        .unwrap_or(TlsVersion::V1_3);
        if min > max {
            return Err(at
                .at("minProtocolVersion")
                .err("is higher than maxProtocolVersion"));
        }
        Ok(Some(ServerTls {
            mode,
            credential,
            subject_alt_names: self.subject_alt_names,
            min_version: min,
            max_version: max,
        }))
    }
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
        let (tls, https_redirect) = match s.tls {
            None => (None, false),
            Some(t) => {
                let redirect = t.https_redirect;
                (t.validate(&at.at("tls"))?, redirect)
            }
        };
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
            Some("HTTPS") => UpstreamProtocol::Http,
            Some("TLS") => UpstreamProtocol::Tcp,
            Some(other) => {
                return Err(at.at("port.protocol").err(format!(
                    "`{other}` is not HTTP, HTTPS, HTTP2, GRPC, TLS or TCP"
                )));
            }
            None => return Err(at.at("port.protocol").err("is required")),
        };
        let declared = s
            .port
            .protocol
            .as_deref()
            .unwrap_or("")
            .to_ascii_uppercase();
        match (&tls, declared.as_str()) {
            (None, "HTTPS" | "TLS") => {
                return Err(at.at("tls").err(format!(
                    "a {declared} server needs tls (mode SIMPLE, MUTUAL or PASSTHROUGH)"
                )));
            }
            (Some(_), "HTTP" | "HTTP2" | "GRPC" | "TCP") => {
                return Err(at.at("tls.mode").err(format!(
                    "a {declared} server is plaintext; declare the port HTTPS or TLS for TLS"
                )));
            }
            _ => {}
        }
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
        // Servers may share a port (Istio's secure-ingress task puts two
        // hosts' certificates on 443): TLS ones are told apart by SNI,
        // plaintext ones by Host. They must agree on what the port speaks.
        for (j, x) in servers.iter().enumerate() {
            if x.port != port || x.bind != bind {
                continue;
            }
            if x.is_tls() != tls.is_some() || x.protocol != protocol {
                return Err(at.at("port.number").err(format!(
                    "port {port} is already served by servers[{j}] with another protocol"
                )));
            }
            let hosts: Vec<&str> = s
                .hosts
                .iter()
                .map(|h| h.rsplit('/').next().unwrap_or(h))
                .collect();
            if let Some(h) = x.hosts.iter().find(|h| hosts.contains(&h.as_str()))
                && tls.is_some()
            {
                return Err(at.at("hosts").err(format!(
                    "host `{h}` on port {port} is already served by servers[{j}] (SNI must pick one server)"
                )));
            }
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
            tls,
            https_redirect,
        });
    }
    Ok(Gateway {
        name: res.name.clone(),
        namespace: res.namespace.clone(),
        selector: labels(spec.selector, &at.at("selector"))?,
        servers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::parse_resources;

    macro_rules! istio {
        ($path:literal) => {
            (
                $path,
                include_str!(concat!("../../../tests/data/istio/security/", $path)),
            )
        };
    }

    fn gateway(file: (&str, &str)) -> Result<Gateway, ConfigError> {
        let resources = parse_resources(file.0, file.1)?;
        validate(&resources[0])
    }

    fn yaml(servers: &str) -> Result<Gateway, ConfigError> {
        let text = format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: gw\nspec:\n  servers:\n{servers}"
        );
        gateway(("gw.yaml", &text))
    }

    #[test]
    fn istios_secure_ingress_gateways_read_as_istio_means_them() {
        let single = gateway(istio!("secure-ingress/gateway.yaml")).unwrap();
        let s = &single.servers[0];
        assert_eq!((s.port, s.protocol), (443, UpstreamProtocol::Http));
        let tls = s.tls.as_ref().unwrap();
        assert_eq!(tls.mode, ServerTlsMode::Simple);
        assert_eq!(
            tls.credential,
            Some(Credential::Secret("httpbin-credential".into()))
        );
        assert_eq!(
            (tls.min_version, tls.max_version),
            (TlsVersion::V1_2, TlsVersion::V1_3)
        );

        // Two servers on 443, one certificate each, told apart by SNI.
        let multi = gateway(istio!("secure-ingress/gateway-multiple-hosts.yaml")).unwrap();
        assert_eq!(multi.servers.len(), 2);
        assert!(multi.servers[1].serves("helloworld.example.com"));
        assert!(!multi.servers[1].serves("httpbin.example.com"));

        let mutual = gateway(istio!("secure-ingress/gateway-mutual.yaml")).unwrap();
        assert_eq!(
            mutual.servers[0].tls.as_ref().unwrap().mode,
            ServerTlsMode::Mutual
        );

        let passthrough = gateway(istio!("sni-passthrough/gateway.yaml")).unwrap();
        let tls = passthrough.servers[0].tls.as_ref().unwrap();
        assert_eq!(
            (tls.mode, &tls.credential),
            (ServerTlsMode::Passthrough, &None)
        );
    }

    #[test]
    fn tls_settings_lumen_cannot_honour_are_refused_by_name() {
        let server = |tls: &str| {
            format!(
                "  - port: {{number: 443, name: https, protocol: HTTPS}}\n    hosts: [a.example.com]\n    tls: {tls}\n"
            )
        };
        let e = yaml(&server("{mode: SIMPLE, credentialName: ../../etc}")).unwrap_err();
        assert_eq!(e.field, "spec.servers[0].tls.credentialName", "{e}");
        let e = yaml(&server(
            "{mode: SIMPLE, credentialName: \"kubernetes:///etc/x\"}",
        ))
        .unwrap_err();
        assert_eq!(e.field, "spec.servers[0].tls.credentialName", "{e}");
        let e = yaml(&server("{mode: ISTIO_MUTUAL}")).unwrap_err();
        assert_eq!(e.field, "spec.servers[0].tls.mode", "{e}");
        let e = yaml(&server("{mode: SIMPLE}")).unwrap_err();
        assert!(e.reason.contains("credentialName"), "{e}");
        let e = yaml(&server(
            "{mode: SIMPLE, credentialName: c, minProtocolVersion: TLSV1_1}",
        ))
        .unwrap_err();
        assert_eq!(e.field, "spec.servers[0].tls.minProtocolVersion", "{e}");
        let e = yaml(&server(
            "{mode: MUTUAL, serverCertificate: /c, privateKey: /k}",
        ))
        .unwrap_err();
        assert_eq!(e.field, "spec.servers[0].tls.caCertificates", "{e}");
        let e = yaml(&server(
            "{mode: SIMPLE, credentialName: c, cipherSuites: [ECDHE-RSA-AES256-GCM-SHA384]}",
        ))
        .unwrap_err();
        assert_eq!(e.field, "spec.servers[0].tls.cipherSuites", "{e}");
        // HTTPS without TLS, and TLS on a plaintext port.
        let e = yaml("  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [a]\n")
            .unwrap_err();
        assert_eq!(e.field, "spec.servers[0].tls", "{e}");
        let e = yaml("  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [a]\n    tls: {mode: SIMPLE, credentialName: c}\n").unwrap_err();
        assert_eq!(e.field, "spec.servers[0].tls.mode", "{e}");
        // httpsRedirect alone is a plaintext server that redirects.
        let g = yaml("  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [a]\n    tls: {httpsRedirect: true}\n").unwrap();
        assert!(g.servers[0].https_redirect && g.servers[0].tls.is_none());
        // One SNI name, two certificates: ambiguous.
        let two = format!(
            "{}{}",
            server("{mode: SIMPLE, credentialName: c}"),
            server("{mode: SIMPLE, credentialName: d}")
        );
        let e = yaml(&two).unwrap_err();
        assert_eq!(e.field, "spec.servers[1].hosts", "{e}");
    }

    #[test]
    fn host_patterns_match_as_istio_does() {
        assert!(host_pattern_matches("*", "a.b"));
        assert!(host_pattern_matches("*.example.com", "httpbin.Example.com"));
        assert!(!host_pattern_matches("*.example.com", "example.com"));
        assert!(host_pattern_matches(
            "Httpbin.example.com",
            "httpbin.example.com"
        ));
    }
}
