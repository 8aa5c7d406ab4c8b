//! The sidecar's workload identity and the mutual TLS it speaks with other
//! sidecars.
//!
//! The proxy makes its own key (it never leaves the process), asks the
//! control plane's mesh CA to sign a CSR for it, and renews at half the
//! certificate's lifetime; every handshake reads the certificate in force,
//! so a renewal changes nothing for open connections and no listener
//! restarts. The trust bundle (the mesh's roots) and the list of sidecars
//! holding certificates come over the control stream.
//!
//! Outbound, a connection to a sidecar the control plane lists originates
//! mTLS, offering this proxy's certificate and accepting only the SPIFFE id
//! that sidecar holds; its SNI is Istio's `outbound_.<port>_._.<host>`, so
//! the inbound side tells mesh TLS from an app's own TLS. Inbound, such a
//! connection is terminated here, the client's chain checked against the
//! roots, and its SPIFFE id becomes the request's source principal.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use lumen_core::identity::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// SNI prefix of mesh mTLS, as Istio's (`outbound_.9080_._.reviews.default.svc.cluster.local`).
pub const MESH_SNI_PREFIX: &str = "outbound_.";
/// ALPN of opaque TCP over mesh mTLS (HTTP says `h2` or `http/1.1`).
pub const TCP_ALPN: &[u8] = b"lumen-tcp";

/// Where mTLS stands for this proxy, as `/config_dump` shows it — never a
/// key or a certificate's bytes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertificateInfo {
    pub spiffe_id: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub roots: usize,
}

/// One certificate in force.
struct Certified {
    key: Arc<CertifiedKey>,
    id: SpiffeId,
    /// `id` as text, shared by every record that names it.
    principal: Arc<str>,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
    received: SystemTime,
}

/// The proxy's identity and TLS configurations.
pub struct MeshTls {
    provider: Arc<CryptoProvider>,
    /// Shared with the resolvers every handshake asks.
    current: Arc<ArcSwapOption<Certified>>,
    roots: ArcSwap<Vec<CertificateDer<'static>>>,
    /// Built from the roots; the certificate is read at each handshake.
    server: ArcSwapOption<ServerConfig>,
    /// Client configurations by the identity they accept (`None`: any in
    /// the trust domain), built from the roots.
    clients: Mutex<HashMap<Option<String>, Arc<ClientConfig>>>,
    /// Sidecars that hold certificates, by inbound address.
    peers: ArcSwap<HashMap<SocketAddr, Peer>>,
    /// The SPIFFE id in force, for those that announce it.
    id_tx: watch::Sender<Option<String>>,
    /// The root the certificate in force was issued under.
    issued_under: ArcSwapOption<CertificateDer<'static>>,
    renew: tokio::sync::Notify,
}

/// How long a sidecar the control plane stops listing is still taken to
/// hold its certificate. A control plane that restarts lists only the
/// sidecars that have reconnected so far; forgetting the others at once
/// would send plaintext to them, which STRICT refuses.
pub const PEER_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// A sidecar known to hold a certificate.
#[derive(Debug, Clone)]
struct Peer {
    id: Arc<str>,
    /// When the control plane stopped listing it (`None`: listed now).
    unlisted: Option<std::time::Instant>,
}

impl Peer {
    fn current(&self) -> bool {
        self.unlisted.is_none_or(|t| t.elapsed() < PEER_GRACE)
    }
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("certificate", &self.info())
            .finish()
    }
}

impl Default for MeshTls {
    fn default() -> Self {
        MeshTls {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            current: Arc::new(ArcSwapOption::empty()),
            roots: ArcSwap::from_pointee(Vec::new()),
            server: ArcSwapOption::empty(),
            clients: Mutex::new(HashMap::new()),
            peers: ArcSwap::from_pointee(HashMap::new()),
            id_tx: watch::channel(None).0,
            issued_under: ArcSwapOption::empty(),
            renew: tokio::sync::Notify::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the certificate chain is not usable: {0}")]
    BadChain(String),
    #[error("the trust bundle is not usable: {0}")]
    BadRoots(String),
    #[error("cannot make a key or CSR: {0}")]
    Key(String),
}

pub use lumen_core::identity::{spiffe_of, uri_sans};

fn validity(der: &[u8]) -> Option<(SystemTime, SystemTime, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let at = |t: i64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).ok()?));
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let v = cert.validity();
    Some((
        at(v.not_before.timestamp())?,
        at(v.not_after.timestamp())?,
        serial,
    ))
}

fn parse_pems(pems: &[String]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    for p in pems {
        for c in CertificateDer::pem_slice_iter(p.as_bytes()) {
            out.push(c.map_err(|e| e.to_string())?);
        }
    }
    Ok(out)
}

/// The certificates of a PEM file (roots to trust), refused when it has
/// none.
pub fn read_roots(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let roots = parse_pems(&[text]).map_err(|e| format!("{}: {e}", path.display()))?;
    if roots.is_empty() {
        return Err(format!("{}: holds no PEM certificate", path.display()));
    }
    Ok(roots)
}

/// A new key and a CSR for it (PEM), and the key as PKCS#8 DER.
pub fn key_and_csr(id_hint: &str) -> Result<(String, Vec<u8>), TlsError> {
    let key = rcgen::KeyPair::generate().map_err(|e| TlsError::Key(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    // What the proxy would like; the CA decides.
    if let Ok(uri) = id_hint.to_string().try_into() {
        params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    }
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| TlsError::Key(e.to_string()))?;
    Ok((csr, key.serialize_der()))
}

impl MeshTls {
    /// Puts a new certificate (chain PEM, leaf first) and its key in force.
    pub fn install(&self, chain: &[String], key_der: Vec<u8>) -> Result<(), TlsError> {
        let certs = parse_pems(chain).map_err(TlsError::BadChain)?;
        let leaf = certs
            .first()
            .ok_or_else(|| TlsError::BadChain("no certificate".into()))?;
        let id = spiffe_of(leaf)
            .ok_or_else(|| TlsError::BadChain("the certificate carries no SPIFFE id".into()))?;
        let (not_before, not_after, serial) = validity(leaf)
            .ok_or_else(|| TlsError::BadChain("cannot read the certificate's validity".into()))?;
        let key = self
            .provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(key_der.into()))
            .map_err(|e| TlsError::Key(e.to_string()))?;
        let certified = CertifiedKey::new(certs, key);
        certified
            .keys_match()
            .map_err(|e| TlsError::BadChain(e.to_string()))?;
        let changed = self.current.load().as_ref().map(|c| &c.id) != Some(&id);
        tracing::info!(identity = %id, serial = %serial, not_after = %humantime::format_rfc3339_seconds(not_after), "workload certificate in force");
        self.current.store(Some(Arc::new(Certified {
            key: Arc::new(certified),
            principal: Arc::from(id.to_string()),
            id: id.clone(),
            serial,
            not_before,
            not_after,
            received: SystemTime::now(),
        })));
        if changed {
            self.id_tx.send_replace(Some(id.to_string()));
        }
        Ok(())
    }

    /// Takes the mesh's roots (PEM); unchanged roots change nothing.
    /// Returns whether they changed.
    pub fn set_roots(&self, pems: &[String]) -> Result<bool, TlsError> {
        let roots = parse_pems(pems).map_err(TlsError::BadRoots)?;
        if roots.is_empty() || **self.roots.load() == roots {
            return Ok(false);
        }
        let mut store = RootCertStore::empty();
        for r in &roots {
            store
                .add(r.clone())
                .map_err(|e| TlsError::BadRoots(e.to_string()))?;
        }
        let store = Arc::new(store);
        let verifier =
            WebPkiClientVerifier::builder_with_provider(store.clone(), self.provider.clone())
                .build()
                .map_err(|e| TlsError::BadRoots(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::BadRoots(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(self.current.clone())));
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), TCP_ALPN.to_vec()];
        self.roots.store(Arc::new(roots));
        self.server.store(Some(Arc::new(server)));
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(true)
    }

    /// Whether this proxy can speak mesh mTLS now.
    pub fn ready(&self) -> bool {
        self.current.load().is_some() && self.server.load().is_some()
    }

    /// This proxy's SPIFFE id, as records carry it.
    pub fn principal(&self) -> Option<Arc<str>> {
        self.current.load().as_ref().map(|c| c.principal.clone())
    }

    pub fn id(&self) -> Option<SpiffeId> {
        self.current.load().as_ref().map(|c| c.id.clone())
    }

    /// The SPIFFE id in force, as it changes.
    pub fn watch_id(&self) -> watch::Receiver<Option<String>> {
        self.id_tx.subscribe()
    }

    /// When the certificate in force should be renewed: half way through
    /// its life.
    pub fn renew_at(&self) -> Option<SystemTime> {
        // From when it came: its `not_before` is backdated for clock skew.
        self.current
            .load()
            .as_ref()
            .map(|c| c.received + c.not_after.duration_since(c.received).unwrap_or_default() / 2)
    }

    pub fn info(&self) -> Option<CertificateInfo> {
        let c = self.current.load_full()?;
        Some(CertificateInfo {
            spiffe_id: c.id.to_string(),
            serial: c.serial.clone(),
            not_before: humantime::format_rfc3339_seconds(c.not_before).to_string(),
            not_after: humantime::format_rfc3339_seconds(c.not_after).to_string(),
            roots: self.roots.load().len(),
        })
    }

    /// The sidecars holding certificates (from the control plane). One no
    /// longer listed stays a peer for [`PEER_GRACE`].
    pub fn set_peers(&self, listed: HashMap<SocketAddr, Arc<str>>) {
        let now = std::time::Instant::now();
        let old = self.peers.load();
        let mut peers: HashMap<SocketAddr, Peer> = old
            .iter()
            .filter(|(address, p)| !listed.contains_key(address) && p.current())
            .map(|(address, p)| {
                let unlisted = Some(p.unlisted.unwrap_or(now));
                (
                    *address,
                    Peer {
                        id: p.id.clone(),
                        unlisted,
                    },
                )
            })
            .collect();
        peers.extend(
            listed
                .into_iter()
                .map(|(address, id)| (address, Peer { id, unlisted: None })),
        );
        self.peers.store(Arc::new(peers));
    }

    /// The identity the sidecar at `address` holds, if it is one: the one
    /// listening there, or the one capturing every port of its pod's
    /// address (advertised with port 0).
    pub fn peer(&self, address: SocketAddr) -> Option<Arc<str>> {
        let peers = self.peers.load();
        peers
            .get(&address)
            .filter(|p| p.current())
            .or_else(|| {
                peers
                    .get(&SocketAddr::new(address.ip(), 0))
                    .filter(|p| p.current())
            })
            .map(|p| p.id.clone())
    }

    pub fn server_config(&self) -> Option<Arc<ServerConfig>> {
        if self.current.load().is_none() {
            return None;
        }
        self.server.load_full()
    }

    /// A client configuration accepting `expected` (or any identity of the
    /// trust domain), offering `alpn`.
    pub fn client_config(&self, expected: Option<&str>, alpn: &[u8]) -> Option<Arc<ClientConfig>> {
        let current = self.current.load_full()?;
        let key = expected.map(|e| format!("{e}\u{0}{}", String::from_utf8_lossy(alpn)));
        let key = Some(key.unwrap_or_else(|| format!("\u{0}{}", String::from_utf8_lossy(alpn))));
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Some(c.clone());
        }
        let roots = self.roots.load_full();
        if roots.is_empty() {
            return None;
        }
        let verifier = Arc::new(SpiffeVerifier {
            provider: self.provider.clone(),
            roots,
            expected: expected.map(str::to_string),
            trust_domain: current.id.trust_domain.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .ok()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(Resolver(self.current.clone())));
        config.alpn_protocols = vec![alpn.to_vec()];
        let config = Arc::new(config);
        clients.insert(key, config.clone());
        Some(config)
    }
}

impl MeshTls {
    /// A client configuration for the collector's `https://` endpoint: its
    /// server certificate checked by host name against the mesh's roots
    /// and `extra_roots`, this proxy's certificate (when it has one) as
    /// its credential; HTTP/2.
    pub fn collector_config(
        &self,
        extra_roots: &[CertificateDer<'static>],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        // The bundle can come (with the config) before the certificate:
        // a connection made then would carry no credential, be refused,
        // and stay open refusing every export. It waits instead.
        if !self.roots.load().is_empty() && self.current.load().is_none() {
            return Err(TlsError::BadChain(
                "no certificate from the mesh CA yet to present to the collector".into(),
            ));
        }
        let mut store = RootCertStore::empty();
        for r in self.roots.load().iter().chain(extra_roots) {
            store
                .add(r.clone())
                .map_err(|e| TlsError::BadRoots(e.to_string()))?;
        }
        if store.is_empty() {
            return Err(TlsError::BadRoots(
                "no roots to check the collector against yet: the mesh's trust bundle comes \
                 with the proxy's certificate (--control), or give --collector-ca"
                    .into(),
            ));
        }
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::BadRoots(e.to_string()))?
            .with_root_certificates(store);
        let mut config = if self.current.load().is_some() {
            builder.with_client_cert_resolver(Arc::new(Resolver(self.current.clone())))
        } else {
            builder.with_no_client_auth()
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Hands every handshake the certificate in force.
struct Resolver(Arc<ArcSwapOption<Certified>>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl Resolver {
    fn key(&self) -> Option<Arc<CertifiedKey>> {
        self.0.load().as_ref().map(|c| c.key.clone())
    }
}

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Checks a server's chain to the mesh's roots and its SPIFFE id: the one
/// expected for the destination, or any of the trust domain.
#[derive(Debug)]
struct SpiffeVerifier {
    provider: Arc<CryptoProvider>,
    roots: Arc<Vec<CertificateDer<'static>>>,
    expected: Option<String>,
    trust_domain: String,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchors: Vec<_> = self
            .roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect();
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(webpki_error)?;
        let id = spiffe_of(end_entity).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName,
        ))?;
        let ok = match &self.expected {
            Some(e) => id.to_string() == *e,
            None => id.trust_domain == self.trust_domain,
        };
        if !ok {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext {
                    expected: ServerName::try_from("spiffe.invalid")
                        .map(|n| n.to_owned())
                        .map_err(|_| rustls::Error::General("name".into()))?,
                    presented: vec![id.to_string()],
                },
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use rustls::CertificateError as C;
    rustls::Error::InvalidCertificate(match e {
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        other => C::Other(rustls::OtherError(Arc::new(other))),
    })
}

/// An upstream connection: plain TCP, or mesh mTLS over it.
pub enum MeshStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl MeshStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, MeshStream::Tls(_))
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MeshStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MeshStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MeshStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MeshStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MeshStream::Plain(s) => Pin::new(s).poll_flush(cx),
            MeshStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MeshStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MeshStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MeshStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MeshStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MeshStream::Plain(s) => s.is_write_vectored(),
            MeshStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The SPIFFE id an upstream sidecar proved on the connection a response
/// came over (in the response's extensions).
#[derive(Debug, Clone)]
pub struct UpstreamPeer(pub Arc<str>);

impl MeshStream {
    /// The SPIFFE id the upstream proved, over mesh mTLS.
    pub fn peer(&self) -> Option<UpstreamPeer> {
        let MeshStream::Tls(s) = self else {
            return None;
        };
        let cert = s.get_ref().1.peer_certificates()?.first()?;
        Some(UpstreamPeer(Arc::from(spiffe_of(cert)?.to_string())))
    }
}

impl hyper_util::client::legacy::connect::Connection for MeshStream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        let mut c = hyper_util::client::legacy::connect::Connected::new();
        if let Some(peer) = self.peer() {
            c = c.extra(peer);
        }
        match self {
            MeshStream::Tls(s) if s.get_ref().1.alpn_protocol() == Some(b"h2") => c.negotiated_h2(),
            _ => c,
        }
    }
}

/// Originates mesh mTLS on `tcp` to the sidecar at `address` holding
/// `expected` (or, when unknown, any identity of the trust domain).
pub fn connect(
    tls: &MeshTls,
    tcp: TcpStream,
    authority: &str,
    expected: Option<&str>,
    alpn: &'static [u8],
) -> Option<impl Future<Output = std::io::Result<MeshStream>> + use<>> {
    let config = tls.client_config(expected, alpn)?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from(mesh_sni(authority)).ok()?;
    Some(async move {
        let s = connector.connect(name, tcp).await?;
        Ok(MeshStream::Tls(Box::new(s)))
    })
}

/// Istio's SNI for mesh mTLS to `host:port`.
pub fn mesh_sni(authority: &str) -> String {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, p),
        _ => (authority, "80"),
    };
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let host = host.trim_matches(|c| c == '.' || c == '-');
    // An address (`127.0.0.1:8080`) is no DNS name: its dots become dashes.
    let host = if host.is_empty() {
        "mesh".to_string()
    } else if host
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        host.replace('.', "-")
    } else {
        host.to_string()
    };
    format!("{MESH_SNI_PREFIX}{port}_._.{host}")
}

/// How a proxy gets its certificate: from the control plane's mesh CA,
/// proving itself with a join token.
#[derive(Debug, Clone)]
pub struct Certifier {
    /// The control plane.
    pub endpoint: crate::controlplane::ControlEndpoint,
    pub join_token: String,
    /// Where the token is read again for every request, when it rotates
    /// (a pod's projected service-account token, renewed by the kubelet).
    pub token_file: Option<std::path::PathBuf>,
    pub namespace: String,
    pub service_account: String,
    /// Asked-for lifetime (`None`: the CA's default).
    pub lifetime: Option<Duration>,
}

impl std::fmt::Display for Certifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        write!(
            f,
            "{} for ns/{}/sa/{}",
            self.endpoint, self.namespace, self.service_account
        )
    }
}

impl MeshTls {
    /// Asks for a renewal now (the mesh's root changed).
    pub fn renew_now(&self) {
        self.renew.notify_one();
    }

    /// Takes the trust bundle a snapshot carries; a new issuing root means
    /// the certificate in force must be replaced by one it issued.
    pub fn take_bundle(&self, pems: &[String]) {
        match self.set_roots(pems) {
            // Before the first certificate, the certificate's own request
            // brings it.
            Ok(true) if self.current.load().is_some() => {
                let issuing = parse_pems(&pems[..1]).ok();
                let under = self.issued_under.load_full();
                if issuing.as_deref() != under.as_deref().map(std::slice::from_ref) {
                    tracing::info!("the mesh's root changed: renewing the workload certificate");
                    self.renew_now();
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "trust bundle from the control plane refused"),
        }
    }

    async fn certify_once(&self, c: &Certifier) -> Result<(), String> {
        use lumen_core::control::v1;
        let hint = format!(
            "spiffe://unknown/ns/{}/sa/{}",
            c.namespace, c.service_account
        );
        let (csr, key) = key_and_csr(&hint).map_err(|e| e.to_string())?;
        let channel = c.endpoint.endpoint()?.connect().await.map_err(|e| {
            format!(
                "cannot reach the control plane: {}",
                crate::controlplane::error_chain(&e)
            )
        })?;
        let mut client = v1::control_plane_client::ControlPlaneClient::new(channel);
        let mut req = tonic::Request::new(v1::CertificateRequest {
            csr,
            validity_duration: c.lifetime.map_or(0, |d| d.as_secs() as i64),
            namespace: c.namespace.clone(),
            service_account: c.service_account.clone(),
        });
        let token = match &c.token_file {
            Some(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("reading the token {}: {e}", path.display()))?,
            None => c.join_token.clone(),
        };
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the join token has characters a header cannot carry".to_string())?;
        req.metadata_mut().insert("authorization", bearer);
        let resp = client
            .create_certificate(req)
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        self.set_roots(&resp.trust_bundle)
            .map_err(|e| e.to_string())?;
        self.install(&resp.cert_chain, key)
            .map_err(|e| e.to_string())?;
        let issuing = parse_pems(resp.trust_bundle.get(..1).unwrap_or_default())
            .ok()
            .and_then(|v| v.into_iter().next());
        self.issued_under.store(issuing.map(Arc::new));
        Ok(())
    }
}

/// Longest one certificate request may take.
const CERTIFY_DEADLINE: Duration = Duration::from_secs(30);

/// Keeps this proxy certified until `stop`: a certificate at once, a new
/// one at half the current one's life (or when the root changes), retries
/// with backoff while the CA cannot be reached — the certificate in force
/// serves until it expires.
pub async fn keep_certified(tls: Arc<MeshTls>, c: Certifier, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(200);
    let mut failing = false;
    loop {
        // A CA that accepts the call and never answers must not stop
        // renewals: each attempt has a deadline, then it is retried.
        let attempt = tokio::time::timeout(CERTIFY_DEADLINE, tls.certify_once(&c))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {CERTIFY_DEADLINE:?}")));
        let wait = match attempt {
            Ok(()) => {
                backoff = Duration::from_millis(200);
                failing = false;
                tls.renew_at()
                    .and_then(|at| at.duration_since(SystemTime::now()).ok())
                    .unwrap_or(Duration::from_secs(1))
            }
            Err(e) => {
                if failing {
                    tracing::debug!(ca = %c, error = %e, "still no workload certificate");
                } else {
                    tracing::warn!(ca = %c, error = %e, "cannot get a workload certificate; retrying");
                }
                failing = true;
                let w = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                w
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = tls.renew.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_sni_is_istios_and_always_a_dns_name() {
        for (authority, sni) in [
            (
                "reviews.default.svc.cluster.local:9080",
                "outbound_.9080_._.reviews.default.svc.cluster.local",
            ),
            ("reviews:9080", "outbound_.9080_._.reviews"),
            ("127.0.0.1:8080", "outbound_.8080_._.127-0-0-1"),
            ("Bad_Host", "outbound_.80_._.bad-host"),
            ("", "outbound_.80_._.mesh"),
        ] {
            assert_eq!(mesh_sni(authority), sni);
            assert!(ServerName::try_from(mesh_sni(authority)).is_ok(), "{sni}");
        }
    }

    /// A restarted control plane lists only the sidecars that have
    /// reconnected; the others keep being reached over mTLS meanwhile.
    #[test]
    fn a_peer_the_control_plane_stops_listing_stays_one_for_a_grace_period() {
        let tls = MeshTls::default();
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:15006".parse().unwrap(),
            "127.0.0.1:15007".parse().unwrap(),
        );
        let id = |n: &str| Arc::<str>::from(format!("spiffe://cluster.local/ns/default/sa/{n}"));
        tls.set_peers(HashMap::from([(a, id("a")), (b, id("b"))]));
        tls.set_peers(HashMap::from([(a, id("a"))]));
        assert_eq!(tls.peer(b).as_deref(), Some(&*id("b")));
        // Another list without it keeps the time it was first unlisted.
        let first = tls.peers.load()[&b].unlisted;
        tls.set_peers(HashMap::from([(a, id("a"))]));
        assert_eq!(tls.peers.load()[&b].unlisted, first);
        // Listed again: a peer for good, with the id it comes back with.
        tls.set_peers(HashMap::from([(a, id("a")), (b, id("b2"))]));
        assert_eq!(tls.peer(b).as_deref(), Some(&*id("b2")));
        // Past the grace period, an unlisted peer is forgotten.
        let mut peers = (**tls.peers.load()).clone();
        peers.get_mut(&b).unwrap().unlisted =
            Some(std::time::Instant::now() - PEER_GRACE - std::time::Duration::from_secs(1));
        tls.peers.store(Arc::new(peers));
        assert!(tls.peer(b).is_none());
        tls.set_peers(HashMap::from([(a, id("a"))]));
        assert!(!tls.peers.load().contains_key(&b));
    }

    #[test]
    fn a_pod_advertised_with_port_0_is_a_peer_on_every_port_of_its_address() {
        let tls = MeshTls::default();
        let pod: SocketAddr = "10.244.0.12:0".parse().unwrap();
        let listener: SocketAddr = "127.0.0.1:15006".parse().unwrap();
        tls.set_peers(HashMap::from([
            (
                pod,
                Arc::from("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"),
            ),
            (
                listener,
                Arc::from("spiffe://cluster.local/ns/default/sa/local"),
            ),
        ]));
        for port in [9080, 8443] {
            let at = SocketAddr::new(pod.ip(), port);
            assert_eq!(
                tls.peer(at).as_deref(),
                Some("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews")
            );
        }
        assert!(tls.peer(listener).is_some());
        // Another port of a sidecar that listens on one is not it.
        assert!(tls.peer("127.0.0.1:9080".parse().unwrap()).is_none());
        assert!(tls.peer("10.244.0.13:9080".parse().unwrap()).is_none());
    }
}
