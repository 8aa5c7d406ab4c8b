//! A server certificate from the mesh CA for the control plane's own DNS
//! names (the webhook's, the TLS control port's), re-issued at half its
//! life: new connections get the new one, open ones keep theirs.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::ca::MeshCa;

#[derive(Debug, thiserror::Error)]
#[error("serving certificate for {names:?}: {why}")]
pub struct ServingError {
    names: Vec<String>,
    why: String,
}

/// The certificate in use, swapped when renewed.
#[derive(Debug)]
struct Current(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

pub struct ServingCert {
    ca: Arc<MeshCa>,
    names: Vec<String>,
    current: Arc<Current>,
    not_after: SystemTime,
}

fn certified(ca: &MeshCa, names: &[String]) -> Result<(CertifiedKey, SystemTime), ServingError> {
    let err = |why: String| ServingError {
        names: names.to_vec(),
        why,
    };
    let serving = ca.serving(names).map_err(|e| err(e.to_string()))?;
    let chain: Vec<CertificateDer<'static>> = serving
        .chain
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_slice(serving.key.as_bytes()).map_err(|e| err(e.to_string()))?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| err(e.to_string()))?;
    Ok((CertifiedKey::new(chain, signing), serving.not_after))
}

impl ServingCert {
    /// Issues the first certificate.
    pub fn issue(ca: Arc<MeshCa>, names: Vec<String>) -> Result<Self, ServingError> {
        let (key, not_after) = certified(&ca, &names)?;
        Ok(ServingCert {
            ca,
            names,
            current: Arc::new(Current(ArcSwap::from_pointee(key))),
            not_after,
        })
    }

    /// A TLS server configuration presenting the current certificate,
    /// offering `alpn`.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, rustls::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(self.current.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// Re-issues the certificate at half its life until `stop` turns true.
    pub fn renew(
        &self,
        what: &'static str,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let (ca, names, current) = (self.ca.clone(), self.names.clone(), self.current.clone());
        let mut not_after = self.not_after;
        tokio::spawn(async move {
            loop {
                let left = not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                let wait = (left / 2).max(Duration::from_secs(60));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                match certified(&ca, &names) {
                    Ok((key, end)) => {
                        current.0.store(Arc::new(key));
                        not_after = end;
                        tracing::info!(server = what, "certificate renewed");
                    }
                    Err(e) => {
                        tracing::error!(server = what, error = %e, "cannot renew the certificate")
                    }
                }
            }
        })
    }
}
