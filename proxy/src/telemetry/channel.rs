//! The gRPC channel to the collector: cleartext for `http://`; for
//! `https://`, TLS with the collector's certificate checked by host name
//! against the mesh's roots (and `--collector-ca`), and this proxy's
//! workload certificate as its credential. Both are read at each new
//! connection, so a renewed certificate or rotated bundle is used from the
//! next one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::mtls::MeshTls;

/// What an `https://` collector is checked against and shown.
#[derive(Debug, Clone, Default)]
pub struct CollectorTls {
    pub mesh: Arc<MeshTls>,
    /// Roots besides the mesh's (`--collector-ca`).
    pub extra_roots: Arc<Vec<CertificateDer<'static>>>,
}

/// A lazy channel to `endpoint`: the collector may start after the proxy,
/// or restart under it. Keepalive pings drop a connection a partition cut
/// within seconds, so the next export dials afresh instead of waiting on
/// TCP's retransmissions.
pub fn channel(endpoint: &str, timeout: Duration, tls: &CollectorTls) -> Result<Channel, String> {
    let https = endpoint.strip_prefix("https://");
    // TLS is this module's connector's: tonic, not configured for TLS
    // itself, is given the http:// form (which it refuses to dial as
    // https://); the handshake still checks the URL's host.
    let dialed = match https {
        Some(rest) => format!("http://{rest}"),
        None => endpoint.to_string(),
    };
    let e = Endpoint::from_shared(dialed)
        .map_err(|e| format!("collector endpoint `{endpoint}`: {e}"))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if https.is_none() {
        return Ok(e.connect_lazy());
    }
    Ok(e.connect_with_connector_lazy(MeshConnector {
        tls: tls.clone(),
        timeout,
    }))
}

/// Dials the collector and makes the TLS handshake.
#[derive(Clone)]
struct MeshConnector {
    tls: CollectorTls,
    timeout: Duration,
}

type Connected = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for MeshConnector {
    type Response = Connected;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Connected, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (tls, timeout) = (self.tls.clone(), self.timeout);
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| format!("collector endpoint {uri} has no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let config = tls.mesh.collector_config(&tls.extra_roots)?;
            let name = ServerName::try_from(host.clone())
                .map_err(|e| format!("collector host {host}: {e}"))?;
            let dial = async {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
            };
            let stream = tokio::time::timeout(timeout, dial)
                .await
                .map_err(|_| format!("connecting to the collector at {host}:{port} timed out"))??;
            Ok(TokioIo::new(stream))
        })
    }
}
