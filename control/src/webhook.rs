//! The sidecar injector's HTTPS server: `POST /inject` answers the API
//! server's `AdmissionReview`s ([`crate::inject`]), `GET /ready` says it
//! serves. Its certificate comes from the mesh CA for the webhook
//! Service's DNS names — the trust bundle is the
//! `MutatingWebhookConfiguration`'s `caBundle` — and is re-issued at half
//! its life, new connections getting the new one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ca::{CaError, MeshCa};
use crate::inject::Injector;

/// Largest `AdmissionReview` read: a pod is a few KiB; the API server's
/// own request limit is 3 MiB.
const MAX_BODY: usize = 3 << 20;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 256;
/// Longest a connection is kept, whatever it does.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook certificate: {0}")]
    Certificate(String),
    #[error("webhook server on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl From<CaError> for WebhookError {
    fn from(e: CaError) -> Self {
        WebhookError::Certificate(e.to_string())
    }
}

/// The certificate in use, swapped when renewed.
#[derive(Debug)]
struct Renewing(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Renewing {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn certified(ca: &MeshCa, dns: &[String]) -> Result<(CertifiedKey, SystemTime), WebhookError> {
    let serving = ca.serving(dns)?;
    let chain: Vec<CertificateDer<'static>> = serving
        .chain
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| WebhookError::Certificate(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(serving.key.as_bytes())
        .map_err(|e| WebhookError::Certificate(e.to_string()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| WebhookError::Certificate(e.to_string()))?;
    Ok((CertifiedKey::new(chain, signing), serving.not_after))
}

/// The injector's server, bound and with its first certificate.
pub struct Webhook {
    listener: TcpListener,
    ca: Arc<MeshCa>,
    dns: Vec<String>,
    injector: Arc<Injector>,
    current: Arc<Renewing>,
    not_after: SystemTime,
}

impl Webhook {
    pub async fn bind(
        addr: SocketAddr,
        ca: Arc<MeshCa>,
        dns: Vec<String>,
        injector: Injector,
    ) -> Result<Self, WebhookError> {
        let (key, not_after) = certified(&ca, &dns)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| WebhookError::Bind { addr, source })?;
        Ok(Webhook {
            listener,
            ca,
            dns,
            injector: Arc::new(injector),
            current: Arc::new(Renewing(ArcSwap::from_pointee(key))),
            not_after,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `stop` turns true; requests in flight finish.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions();
        let mut config = match builder {
            Ok(b) => b
                .with_no_client_auth()
                .with_cert_resolver(self.current.clone()),
            Err(e) => {
                tracing::error!(error = %e, "webhook TLS configuration");
                return;
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let injector = self.injector.clone();
        let app = Router::new()
            .route("/ready", get(|| async { "ready\n" }))
            .route(
                "/inject",
                post(move |body: Bytes| {
                    let injector = injector.clone();
                    async move {
                        let review = crate::inject::review(&body, &injector);
                        (
                            [(header::CONTENT_TYPE, "application/json")],
                            serde_json::to_vec(&review).unwrap_or_default(),
                        )
                    }
                }),
            )
            .fallback(|| async { (StatusCode::NOT_FOUND, "POST /inject\n").into_response() })
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY));
        let service = hyper_util::service::TowerToHyperService::new(app);
        // Re-issue at half life.
        let renew = {
            let (ca, dns, current) = (self.ca.clone(), self.dns.clone(), self.current.clone());
            let mut not_after = self.not_after;
            let mut stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let left = not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    let wait = (left / 2).max(Duration::from_secs(60));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        () = stopped(&mut stop) => return,
                    }
                    match certified(&ca, &dns) {
                        Ok((key, end)) => {
                            current.0.store(Arc::new(key));
                            not_after = end;
                            tracing::info!("webhook certificate renewed");
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot renew the webhook certificate")
                        }
                    }
                }
            })
        };
        // Slow or idle clients cannot hold the server: headers within
        // 10 s, a connection at most a minute, at most 256 at once (more
        // are closed at once; the API server retries).
        let mut builder =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10));
        builder.http2().timer(hyper_util::rt::TokioTimer::new());
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = stopped(&mut stop) => break,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "webhook at its connection limit: connection closed");
                continue;
            };
            let (acceptor, service, builder) = (acceptor.clone(), service.clone(), builder.clone());
            connections.spawn(async move {
                let _slot = slot;
                let serve = async {
                    let tls =
                        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    let served = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                    if let Err(e) = served {
                        tracing::debug!(%peer, error = %e, "webhook connection ended");
                    }
                };
                let _ = tokio::time::timeout(CONNECTION_DEADLINE, serve).await;
            });
            // Reap finished connections so the set stays small.
            while connections.try_join_next().is_some() {}
        }
        renew.abort();
        // The API server's calls are short: let those in flight answer.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while connections.join_next().await.is_some() {}
        })
        .await;
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
