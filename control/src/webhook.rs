//! The sidecar injector's HTTPS server: `POST /inject` answers the API
//! server's `AdmissionReview`s ([`crate::inject`]), `GET /ready` says it
//! serves. Its certificate comes from the mesh CA for the webhook
//! Service's DNS names — the trust bundle is the
//! `MutatingWebhookConfiguration`'s `caBundle` — and is re-issued at half
//! its life, new connections getting the new one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ca::{CaError, MeshCa};
use crate::inject::Injector;
use crate::serving::ServingCert;

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

/// The injector's server, bound and with its first certificate.
pub struct Webhook {
    listener: TcpListener,
    injector: Arc<Injector>,
    cert: ServingCert,
}

impl Webhook {
    pub async fn bind(
        addr: SocketAddr,
        ca: Arc<MeshCa>,
        dns: Vec<String>,
        injector: Injector,
    ) -> Result<Self, WebhookError> {
        let cert =
            ServingCert::issue(ca, dns).map_err(|e| WebhookError::Certificate(e.to_string()))?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| WebhookError::Bind { addr, source })?;
        Ok(Webhook {
            listener,
            injector: Arc::new(injector),
            cert,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `stop` turns true; requests in flight finish.
    pub fn run(self, stop: watch::Receiver<bool>) -> lumen_core::BoxFuture<'static, ()> {
        Box::pin(self.serve_until(stop))
    }

    async fn serve_until(self, mut stop: watch::Receiver<bool>) {
        let config = match self.cert.server_config(&[b"h2", b"http/1.1"]) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "webhook TLS configuration");
                return;
            }
        };
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
        let renew = self.cert.renew("webhook", stop.clone());
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
