//! A gateway proxy's edge: a listener on every port of the Istio Gateway
//! servers that select it (opened and closed as Gateways change), and for
//! TLS servers the TLS itself — terminated with the certificate of the
//! server the ClientHello's SNI picks (SIMPLE, MUTUAL, OPTIONAL_MUTUAL), or
//! passed through to the service a VirtualService `tls` route names
//! (PASSTHROUGH). Credentials are read from files: a Kubernetes-style
//! secret directory per `credentialName`, or the server's own
//! `serverCertificate` / `privateKey` / `caCertificates`; a changed file is
//! read again within a second, so rotating a certificate needs no restart.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lumen_core::networking::gateway::{Credential, GatewayServer, ServerTlsMode, TlsVersion};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How often a credential's files are looked at again for changes.
const RECHECK: Duration = Duration::from_secs(1);

/// Where a gateway finds its servers' certificates, and those it has read.
#[derive(Debug)]
pub struct Credentials {
    /// `credentialName: x` is `<dir>/x/` (`tls.crt`, `tls.key`, `ca.crt`,
    /// or a generic secret's `cert`, `key`, `cacert`).
    dir: Option<PathBuf>,
    provider: Arc<CryptoProvider>,
    loaded: Mutex<HashMap<String, Loaded>>,
}

#[derive(Debug)]
struct Loaded {
    checked: Instant,
    stamps: Vec<Stamp>,
    config: Result<Arc<ServerConfig>, String>,
}

/// The files a credential is read from.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials::new(None)
    }
}

fn first_existing(dir: &Path, names: &[&str]) -> PathBuf {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists())
        .unwrap_or_else(|| dir.join(names[0]))
}

impl Credentials {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Credentials {
            dir,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            loaded: Mutex::default(),
        }
    }

    fn files(&self, credential: &Credential) -> Result<Files, String> {
        match credential {
            Credential::Files { cert, key, ca } => Ok(Files {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }),
            Credential::Secret(name) => {
                let Some(root) = &self.dir else {
                    return Err(format!(
                        "credentialName `{name}` needs a credentials directory (lumen proxy --credentials DIR)"
                    ));
                };
                let dir = root.join(name);
                let ca = first_existing(&dir, &["ca.crt", "cacert"]);
                // Istio also takes the CA from a secret of its own,
                // `<name>-cacert`.
                let separate =
                    first_existing(&root.join(format!("{name}-cacert")), &["ca.crt", "cacert"]);
                Ok(Files {
                    cert: first_existing(&dir, &["tls.crt", "cert"]),
                    key: first_existing(&dir, &["tls.key", "key"]),
                    ca: [ca, separate].into_iter().find(|p| p.exists()),
                })
            }
        }
    }

    /// The TLS configuration that terminates `server`'s connections, read
    /// from its credential's files (again if they changed).
    pub fn server_config(&self, server: &GatewayServer) -> Result<Arc<ServerConfig>, String> {
        let Some(tls) = &server.tls else {
            return Err("the server is plaintext".into());
        };
        let Some(credential) = &tls.credential else {
            return Err("a PASSTHROUGH server terminates no TLS".into());
        };
        let key = format!(
            "{credential:?}/{:?}/{:?}/{:?}/{:?}/{:?}",
            tls.mode, tls.min_version, tls.max_version, tls.subject_alt_names, server.protocol
        );
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = loaded.get_mut(&key) {
            if l.checked.elapsed() < RECHECK {
                return l.config.clone();
            }
            l.checked = Instant::now();
            let files = self.files(credential)?;
            if stamps(&files) == l.stamps {
                return l.config.clone();
            }
        }
        let files = self.files(credential)?;
        // Stamped before reading: a file written meanwhile is read again.
        let stamped = stamps(&files);
        let config = self.build(server, &files).map(Arc::new);
        match &config {
            Ok(_) => {
                tracing::info!(server = %server.name, cert = %files.cert.display(), "gateway certificate loaded")
            }
            Err(e) => {
                tracing::warn!(server = %server.name, error = %e, "gateway certificate unusable")
            }
        }
        loaded.insert(
            key,
            Loaded {
                checked: Instant::now(),
                stamps: stamped,
                config: config.clone(),
            },
        );
        config
    }

    fn build(&self, server: &GatewayServer, files: &Files) -> Result<ServerConfig, String> {
        let tls = server.tls.as_ref().ok_or("plaintext server")?;
        let read =
            |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read(&files.cert)?)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: not PEM certificates: {e}", files.cert.display()))?;
        if chain.is_empty() {
            return Err(format!("{}: no certificate in it", files.cert.display()));
        }
        let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
            .map_err(|e| format!("{}: not a PEM private key: {e}", files.key.display()))?;
        let key = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("{}: {e}", files.key.display()))?;
        let leaf = x509_parser::parse_x509_certificate(&chain[0])
            .map_err(|e| format!("{}: not an X.509 certificate: {e}", files.cert.display()))?
            .1;
        // rustls's own check parses with webpki, which refuses version 1
        // certificates — what `openssl x509 -req` makes, as Istio's tasks
        // do — so the key is matched to the certificate here.
        if key
            .public_key()
            .is_some_and(|spki| spki.as_ref() != leaf.tbs_certificate.subject_pki.raw)
        {
            return Err(format!(
                "{} is not the key of {}",
                files.key.display(),
                files.cert.display()
            ));
        }
        let certified = Arc::new(CertifiedKey::new(chain, key));
        let versions: Vec<&'static rustls::SupportedProtocolVersion> = [
            (TlsVersion::V1_2, &rustls::version::TLS12),
            (TlsVersion::V1_3, &rustls::version::TLS13),
        ]
        .into_iter()
        .filter(|(v, _)| (tls.min_version..=tls.max_version).contains(v))
        .map(|(_, p)| p)
        .collect();
        let builder = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| e.to_string())?;
        let builder = match tls.mode {
            ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual => {
                let ca = files.ca.as_ref().ok_or_else(|| {
                    format!(
                        "MUTUAL needs the CA of client certificates (ca.crt beside {})",
                        files.cert.display()
                    )
                })?;
                let mut roots = RootCertStore::empty();
                let mut anchors = Vec::new();
                for c in CertificateDer::pem_slice_iter(&read(ca)?) {
                    let c =
                        c.map_err(|e| format!("{}: not PEM certificates: {e}", ca.display()))?;
                    roots
                        .add(c.clone())
                        .map_err(|e| format!("{}: {e}", ca.display()))?;
                    anchors.push(c);
                }
                let webpki = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    self.provider.clone(),
                );
                let webpki = if tls.mode == ServerTlsMode::OptionalMutual {
                    webpki.allow_unauthenticated()
                } else {
                    webpki
                }
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(Arc::new(ClientVerifier {
                    webpki,
                    anchors,
                    provider: self.provider.clone(),
                }))
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(Fixed(certified)));
        if server.protocol != lumen_core::UpstreamProtocol::Tcp {
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        }
        Ok(config)
    }
}

/// One certificate for every ClientHello (SNI chose the server already).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// MUTUAL's check of client certificates: webpki's, except for version 1
/// certificates (what `openssl x509 -req` makes, as in Istio's task),
/// which webpki refuses outright: those are checked here by the signature
/// of one of the server's CAs, and their validity.
#[derive(Debug)]
struct ClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    anchors: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
}

fn parse(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, rustls::Error> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))
}

fn is_v1(der: &[u8]) -> bool {
    x509_parser::parse_x509_certificate(der)
        .is_ok_and(|(_, c)| c.version() == x509_parser::x509::X509Version::V1)
}

fn bad_cert(why: &str) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(std::io::Error::other(why.to_string())),
    )))
}

impl ClientVerifier {
    /// A version 1 leaf: signed by one of the anchors itself and in its
    /// validity. A version 1 certificate cannot say it is a CA, so none is
    /// taken as an intermediate.
    fn verify_v1(&self, leaf: &CertificateDer<'_>, now: UnixTime) -> Result<(), rustls::Error> {
        let cert = parse(leaf)?;
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let v = cert.validity();
        if now < v.not_before.timestamp() {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidYet,
            ));
        }
        if now > v.not_after.timestamp() {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired,
            ));
        }
        for anchor in &self.anchors {
            let a = parse(anchor)?;
            if a.subject() == cert.issuer() && cert.verify_signature(Some(a.public_key())).is_ok() {
                return Ok(());
            }
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ))
    }

    /// TLS 1.2's handshake signature by a version 1 certificate's key.
    fn verify_v1_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let c = parse(cert)?;
        let spki = rustls::pki_types::SubjectPublicKeyInfoDer::from(c.public_key().raw);
        let key = webpki::RawPublicKeyEntity::try_from(&spki)
            .map_err(|_| bad_cert("unreadable public key"))?;
        let algs = self
            .provider
            .signature_verification_algorithms
            .mapping
            .iter()
            .find(|(scheme, _)| *scheme == dss.scheme)
            .map(|(_, algs)| *algs)
            .unwrap_or_default();
        algs.iter()
            .find(|alg| {
                key.verify_signature(**alg, message, dss.signature())
                    .is_ok()
            })
            .map(|_| HandshakeSignatureValid::assertion())
            .ok_or_else(|| bad_cert("the handshake signature does not verify"))
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.webpki.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.webpki.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if is_v1(end_entity) {
            self.verify_v1(end_entity, now)?;
            return Ok(ClientCertVerified::assertion());
        }
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if is_v1(cert) {
            return self.verify_v1_signature(message, cert, dss);
        }
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if is_v1(cert) {
            let c = parse(cert)?;
            let spki = rustls::pki_types::SubjectPublicKeyInfoDer::from(c.public_key().raw);
            return rustls::crypto::verify_tls13_signature_with_raw_key(
                message,
                &spki,
                dss,
                &self.provider.signature_verification_algorithms,
            );
        }
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// What tells a credential file changed: where its links lead (a mounted
/// secret's update swaps a symlink) and when it was written.
type Stamp = (Option<PathBuf>, Option<SystemTime>);

fn stamps(files: &Files) -> Vec<Stamp> {
    [Some(&files.cert), Some(&files.key), files.ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| {
            (
                std::fs::canonicalize(p).ok(),
                std::fs::metadata(p).and_then(|m| m.modified()).ok(),
            )
        })
        .collect()
}

/// Whether a MUTUAL server's `subjectAltNames` admit this client
/// certificate (any of its DNS or URI names; no list admits all).
pub fn client_san_allowed(server: &GatewayServer, leaf: Option<&CertificateDer<'_>>) -> bool {
    let wanted = match &server.tls {
        Some(t) if !t.subject_alt_names.is_empty() => &t.subject_alt_names,
        _ => return true,
    };
    let Some(leaf) = leaf else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    san.value.general_names.iter().any(|n| {
        let name = match n {
            x509_parser::extensions::GeneralName::DNSName(d) => *d,
            x509_parser::extensions::GeneralName::URI(u) => *u,
            _ => return false,
        };
        wanted.iter().any(|w| w == name)
    })
}

/// Keeps one listener open per gateway port the routing table names,
/// on `ip`, serving each with `serve` until the port goes away or
/// `stop` turns true. `fixed` is served already (the `--outbound` port).
pub async fn keep_listeners<F, Fut>(
    ip: std::net::IpAddr,
    fixed: Option<u16>,
    mut ports: watch::Receiver<Vec<u16>>,
    mut stop: watch::Receiver<bool>,
    serve: F,
) where
    F: Fn(TcpListener, watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut open: BTreeMap<u16, (watch::Sender<bool>, tokio::task::JoinHandle<()>)> =
        BTreeMap::new();
    loop {
        let wanted: Vec<u16> = ports
            .borrow_and_update()
            .iter()
            .copied()
            .filter(|p| Some(*p) != fixed)
            .collect();
        open.retain(|port, (tx, _)| {
            let keep = wanted.contains(port);
            if !keep {
                tracing::info!(
                    port,
                    "gateway port closed: no Gateway server on it any more"
                );
                let _ = tx.send(true);
            }
            keep
        });
        for port in wanted {
            if open.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(ip, port);
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    tracing::info!(%addr, "gateway port open");
                    let (tx, rx) = watch::channel(false);
                    open.insert(port, (tx, tokio::spawn(serve(l, rx))));
                }
                // Retried on the next change; the rest of the gateway serves.
                Err(e) => {
                    tracing::error!(%addr, error = %e, "cannot listen on a Gateway server's port")
                }
            }
        }
        tokio::select! {
            changed = ports.changed() => if changed.is_err() { break },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    for (_, (tx, task)) in open {
        let _ = tx.send(true);
        let _ = task.await;
    }
}

/// What a gateway does with a TLS connection on one of its ports.
pub enum Plan {
    /// Terminate with this configuration; then HTTP (or TCP for a `TLS`
    /// server), the Host checked against the server's hosts.
    Terminate {
        config: Arc<ServerConfig>,
        server: crate::route::PortServer,
    },
    /// Through as it is, routed by SNI among this server's Gateway's routes.
    Passthrough(crate::route::PortServer),
}

/// Picks the server for a ClientHello naming `sni` on `port`, and how to
/// serve it; `Err` says why the connection is refused.
pub fn plan(
    table: &crate::route::RoutingTable,
    credentials: &Credentials,
    port: u16,
    sni: Option<&str>,
) -> Result<Plan, String> {
    let gw = table
        .gateway_port(port)
        .ok_or_else(|| format!("no Gateway server on port {port}"))?;
    let server = gw.server_for_sni(sni).ok_or_else(|| match sni {
        Some(name) => format!("no Gateway server on port {port} serves `{name}`"),
        None => {
            format!("a ClientHello without a server name on port {port}, and no server for `*`")
        }
    })?;
    match server.server.tls.as_ref().map(|t| t.mode) {
        Some(ServerTlsMode::Passthrough) => Ok(Plan::Passthrough(server.clone())),
        _ => Ok(Plan::Terminate {
            config: credentials.server_config(&server.server)?,
            server: server.clone(),
        }),
    }
}

/// Whether connections to a gateway's `port` open with TLS.
pub fn is_tls_port(table: &crate::route::RoutingTable, port: u16) -> bool {
    table.gateway_port(port).is_some_and(|p| p.is_tls())
}

/// Accepts TLS on a terminated server's connection.
pub async fn accept(
    config: Arc<ServerConfig>,
    stream: TcpStream,
    timeout: Duration,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, String> {
    match tokio::time::timeout(
        timeout,
        tokio_rustls::TlsAcceptor::from(config).accept(stream),
    )
    .await
    {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the TLS handshake did not finish in time".into()),
    }
}
