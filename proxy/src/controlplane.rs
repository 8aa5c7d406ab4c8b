//! Where a proxy's control plane is: its URL and, for `https://`, the roots
//! its certificate is checked against — shared by the config stream
//! ([`crate::subscribe`]) and certificate requests ([`crate::mtls`]).

/// An error with its causes (`transport error: … invalid peer
/// certificate: UnknownIssuer`), which tonic's own text leaves out.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = cause.source();
    }
    text
}

/// Where the control plane is, and — for `https://` — the roots its
/// certificate is checked against (the mesh's, mounted in the pod).
#[derive(Clone, Debug)]
pub struct ControlEndpoint {
    pub url: String,
    pub ca: Option<tonic::transport::Certificate>,
}

impl ControlEndpoint {
    pub fn plain(url: impl Into<String>) -> Self {
        ControlEndpoint {
            url: url.into(),
            ca: None,
        }
    }

    /// The control plane at `url`, checked against the roots in the PEM
    /// file `ca` when `https://`; `ca_flag` names the flag that gives them,
    /// for the error when there are none.
    pub fn open(url: String, ca: Option<&std::path::Path>, ca_flag: &str) -> Result<Self, String> {
        let ca = match ca {
            Some(path) => Some(tonic::transport::Certificate::from_pem(
                std::fs::read(path).map_err(|e| {
                    format!("reading the control plane's CA {}: {e}", path.display())
                })?,
            )),
            None => None,
        };
        if url.starts_with("https://") && ca.is_none() {
            return Err(format!(
                "{ca_flag} is needed to check an https:// control plane (the mesh's trust bundle)"
            ));
        }
        Ok(ControlEndpoint { url, ca })
    }

    /// The URL's host and port (`None` when it has neither).
    pub fn host_port(&self) -> Option<(String, u16)> {
        let uri: http::Uri = self.url.parse().ok()?;
        let default = if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        };
        Some((uri.host()?.to_string(), uri.port_u16().unwrap_or(default)))
    }

    /// The same control plane at one of its addresses (one replica behind
    /// a headless Service): TLS still checks the URL's host name.
    pub fn at(&self, address: std::net::SocketAddr) -> Result<tonic::transport::Endpoint, String> {
        let https = self.url.starts_with("https://");
        let scheme = if https { "https" } else { "http" };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| format!("{address}: {e}"))?;
        if !https {
            return Ok(endpoint);
        }
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some((host, _)) = self.host_port() {
            tls = tls.domain_name(host);
        }
        if let Some(ca) = &self.ca {
            tls = tls.ca_certificate(ca.clone());
        }
        endpoint
            .tls_config(tls)
            .map_err(|e| format!("{}: TLS: {e}", self.url))
    }

    /// A channel endpoint: TLS checked against `ca` for `https://` URLs.
    pub fn endpoint(&self) -> Result<tonic::transport::Endpoint, String> {
        let endpoint = tonic::transport::Endpoint::from_shared(self.url.clone())
            .map_err(|e| format!("{}: {e}", self.url))?;
        if !self.url.starts_with("https://") {
            return Ok(endpoint);
        }
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            tls = tls.ca_certificate(ca.clone());
        }
        endpoint
            .tls_config(tls)
            .map_err(|e| format!("{}: TLS: {e}", self.url))
    }
}

impl std::fmt::Display for ControlEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}
