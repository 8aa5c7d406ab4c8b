//! Who may reach Lumen's data and config listeners, and over what.
//!
//! A process's [`Access`] comes from four files its flags name
//! ([`AccessFiles`]): a server certificate and key (TLS on every listener
//! that takes data or config), a static token file in kube-apiserver's
//! `--token-auth-file` form (people and tools: `Authorization: Bearer`,
//! or Basic with the token as password, or the token as the Postgres /
//! Flight SQL password), and a client CA (the mesh's trust bundle: a
//! proxy's or collector's workload certificate, with its SPIFFE id).
//!
//! [`Access::bind`] refuses an address beyond loopback unless TLS and a
//! credential are configured, and returns a [`SecureListener`]: TCP
//! accepts, TLS handshakes beside the accept loop, and [`Conn`]ections
//! that carry their [`Peer`] (address, workload identity). axum serves it
//! as an [`axum::serve::Listener`] behind [`Access::guard_http`]; tonic
//! serves [`SecureListener::incoming`] behind [`GrpcGuard`]. Either guard
//! runs [`Access::authenticate`] once per request, before any handler,
//! and answers 401 / `UNAUTHENTICATED` saying what was missing or wrong.
//!
//! Once a credential is configured it is required on every listener of
//! the process, loopback included; with none, loopback listeners serve
//! anyone on the machine (the single-host default).

#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How often certificate and token files are looked at for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(10);
/// A TLS handshake not done in this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once, per listener; more connections wait
/// in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// What HTTP listeners offer in the TLS handshake: HTTP/2 or HTTP/1.1.
pub const ALPN_HTTP: &[&[u8]] = &[b"h2", b"http/1.1"];
/// gRPC's: HTTP/2 only.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];

/// The files a process's listeners are secured with (its flags).
#[derive(Debug, Clone, Default)]
pub struct AccessFiles {
    /// The server certificate chain (PEM), with `key_file`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Roots client certificates are checked against (PEM): the mesh's
    /// trust bundle, so proxies and collectors present their own.
    pub client_ca_file: Option<PathBuf>,
    /// Bearer tokens: `token,user[,uid[,"groups"]]` per line.
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{}: {reason}", file.display())]
    File { file: PathBuf, reason: String },
    #[error("{0}")]
    Flags(&'static str),
    #[error(
        "{what} on {addr} would be reachable from other machines {missing}: give \
         --tls-cert-file and --tls-key-file, and --token-file or --tls-client-ca-file, \
         or listen on 127.0.0.1"
    )]
    Exposed {
        what: &'static str,
        addr: SocketAddr,
        missing: &'static str,
    },
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
}

fn file_error(file: &Path, reason: impl std::fmt::Display) -> AccessError {
    AccessError::File {
        file: file.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Whom a listener serves once credentials are required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Telemetry in (OTLP, Flight `DoPut`): people's tokens and the mesh's
    /// workload certificates.
    Ingest,
    /// Reading and changing (SQL, PromQL, Postgres, Flight SQL, control
    /// changes): people's tokens only.
    Operate,
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No credentials are configured: anyone who reaches the listener.
    Anonymous,
    /// A user of the token file.
    User(String),
    /// A mesh workload, by the SPIFFE id of its client certificate.
    Workload(String),
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error(
        "credentials required: send `Authorization: Bearer <token>` (or Basic with the token as password)"
    )]
    Missing,
    #[error("the token is not valid")]
    WrongToken,
    #[error("malformed Authorization header: {0}")]
    Malformed(&'static str),
    #[error("workload {0} may send telemetry here, not read or change it: use a token")]
    NotGranted(String),
}

/// A connection's other end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The SPIFFE id of a client certificate the client CA verified.
    pub workload: Option<String>,
}

/// A process's listener security: TLS, tokens and client certificates.
#[derive(Debug)]
pub struct Access {
    tls: Option<Tls>,
    tokens: Option<Tokens>,
}

#[derive(Debug)]
struct Tls {
    resolver: Arc<FileCert>,
    verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

impl Access {
    /// No TLS, no credentials: loopback only.
    pub fn open() -> Arc<Access> {
        Arc::new(Access {
            tls: None,
            tokens: None,
        })
    }

    /// Reads `files`, refusing what is incomplete or unreadable with the
    /// file and the reason.
    pub fn load(files: &AccessFiles) -> Result<Arc<Access>, AccessError> {
        let tls = match (&files.cert_file, &files.key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(Tls {
                resolver: Arc::new(FileCert::load(cert, key)?),
                verifier: files
                    .client_ca_file
                    .as_deref()
                    .map(client_verifier)
                    .transpose()?,
            }),
            _ => {
                return Err(AccessError::Flags(
                    "--tls-cert-file and --tls-key-file go together",
                ));
            }
        };
        if files.client_ca_file.is_some() && tls.is_none() {
            return Err(AccessError::Flags(
                "--tls-client-ca-file needs --tls-cert-file and --tls-key-file: client \
                 certificates are presented in a TLS handshake",
            ));
        }
        let tokens = files.token_file.as_deref().map(Tokens::load).transpose()?;
        Ok(Arc::new(Access { tls, tokens }))
    }

    /// Whether every request must authenticate.
    pub fn requires_credentials(&self) -> bool {
        self.tokens.is_some() || self.tls.as_ref().is_some_and(|t| t.verifier.is_some())
    }

    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Refuses `addr` for `what` beyond loopback without TLS and a
    /// credential.
    pub fn check_exposure(&self, what: &'static str, addr: SocketAddr) -> Result<(), AccessError> {
        if addr.ip().is_loopback() {
            return Ok(());
        }
        let missing = match (self.tls.is_some(), self.requires_credentials()) {
            (true, true) => return Ok(()),
            (false, false) => "in cleartext and without credentials",
            (false, true) => "in cleartext",
            (true, false) => "without credentials",
        };
        Err(AccessError::Exposed {
            what,
            addr,
            missing,
        })
    }

    /// A TLS acceptor offering `alpn` (none when TLS is off).
    pub fn acceptor(&self, alpn: &[&[u8]]) -> Option<tokio_rustls::TlsAcceptor> {
        let tls = self.tls.as_ref()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .ok()?;
        let mut config = match &tls.verifier {
            Some(v) => builder.with_client_cert_verifier(v.clone()),
            None => builder.with_no_client_auth(),
        }
        .with_cert_resolver(tls.resolver.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    /// Binds `addr` for `what` after [`Access::check_exposure`]; TLS
    /// handshakes (offering `alpn`) run beside the accept loop.
    pub async fn bind(
        self: &Arc<Self>,
        what: &'static str,
        addr: SocketAddr,
        alpn: &[&[u8]],
    ) -> Result<SecureListener, AccessError> {
        self.check_exposure(what, addr)?;
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| AccessError::Bind { what, addr, source })?;
        Ok(SecureListener::new(tcp, self.acceptor(alpn), what))
    }

    /// Who a request is from, by its connection and headers, for a
    /// listener serving `grant`.
    pub fn authenticate(
        &self,
        peer: Option<&Peer>,
        headers: &http::HeaderMap,
        grant: Grant,
    ) -> Result<Principal, Denied> {
        if !self.requires_credentials() {
            return Ok(Principal::Anonymous);
        }
        let workload = peer.and_then(|p| p.workload.clone());
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return match workload {
                Some(w) if grant == Grant::Ingest => Ok(Principal::Workload(w)),
                Some(w) => Err(Denied::NotGranted(w)),
                None => Err(Denied::Missing),
            };
        };
        let value = value.to_str().map_err(|_| Denied::Malformed("not ASCII"))?;
        let (scheme, rest) = value
            .split_once(' ')
            .ok_or(Denied::Malformed("expected `<scheme> <credentials>`"))?;
        let (user, token) = if scheme.eq_ignore_ascii_case("bearer") {
            (None, rest.trim().to_string())
        } else if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .map_err(|_| Denied::Malformed("Basic credentials are not base64"))?;
            let decoded = String::from_utf8(decoded)
                .map_err(|_| Denied::Malformed("Basic credentials are not UTF-8"))?;
            let (user, password) = decoded
                .split_once(':')
                .ok_or(Denied::Malformed("Basic credentials are not user:password"))?;
            (Some(user.to_string()), password.to_string())
        } else {
            return Err(Denied::Malformed("the scheme is neither Bearer nor Basic"));
        };
        match self.user_of(&token) {
            // Basic's user name, when given, must be the token's.
            Some(u) if user.as_deref().is_none_or(|n| n.is_empty() || n == u) => {
                Ok(Principal::User(u))
            }
            _ => Err(Denied::WrongToken),
        }
    }

    /// The user a token belongs to.
    pub fn user_of(&self, token: &str) -> Option<String> {
        self.tokens.as_ref()?.user_of(token)
    }

    /// A user's token, which is their password where a protocol needs the
    /// secret itself (Postgres SCRAM).
    pub fn token_of(&self, user: &str) -> Option<String> {
        self.tokens.as_ref()?.token_of(user)
    }

    /// `router` with every request authenticated for `grant` first;
    /// health checks (`/ready`, `/healthz`, `/-/ready`, `/-/healthy`)
    /// stay open for probes. Serve it with
    /// `into_make_service_with_connect_info::<Peer>()`; handlers then find
    /// `ConnectInfo<SocketAddr>` and the [`Principal`] in the extensions.
    pub fn guard_http(self: &Arc<Self>, router: axum::Router, grant: Grant) -> axum::Router {
        router.layer(axum::middleware::from_fn_with_state(
            (self.clone(), grant),
            http_guard,
        ))
    }
}

const HEALTH_PATHS: [&str; 4] = ["/ready", "/healthz", "/-/ready", "/-/healthy"];

async fn http_guard(
    axum::extract::State((access, grant)): axum::extract::State<(Arc<Access>, Grant)>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<Peer>>()
        .map(|c| c.0.clone());
    if let Some(p) = &peer {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(p.addr));
    }
    if HEALTH_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    match access.authenticate(peer.as_ref(), req.headers(), grant) {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(denied) => {
            tracing::debug!(peer = ?peer.map(|p| p.addr), path = req.uri().path(), %denied, "request refused");
            let body = serde_json::json!({
                "status": "error",
                "errorType": "unauthorized",
                "error": denied.to_string(),
            });
            let status = match denied {
                Denied::NotGranted(_) => http::StatusCode::FORBIDDEN,
                _ => http::StatusCode::UNAUTHORIZED,
            };
            (
                status,
                [(
                    http::header::WWW_AUTHENTICATE,
                    "Bearer realm=\"lumen\", Basic realm=\"lumen\"",
                )],
                axum::Json(body),
            )
                .into_response()
        }
    }
}

/// A tonic layer authenticating every call for its [`Grant`]; refused
/// calls get `UNAUTHENTICATED` (or `PERMISSION_DENIED`) without reaching
/// a service. It also gives handlers tonic's `remote_addr()`.
#[derive(Clone)]
pub struct GrpcGuard {
    access: Arc<Access>,
    grant: Grant,
}

impl GrpcGuard {
    pub fn new(access: Arc<Access>, grant: Grant) -> Self {
        GrpcGuard { access, grant }
    }
}

impl<S> tower::Layer<S> for GrpcGuard {
    type Service = GrpcGuarded<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcGuarded {
            inner,
            guard: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcGuarded<S> {
    inner: S,
    guard: GrpcGuard,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for GrpcGuarded<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let peer = req.extensions().get::<Peer>().cloned();
        if let Some(p) = &peer {
            req.extensions_mut()
                .insert(tonic::transport::server::TcpConnectInfo {
                    local_addr: None,
                    remote_addr: Some(p.addr),
                });
        }
        match self
            .guard
            .access
            .authenticate(peer.as_ref(), req.headers(), self.guard.grant)
        {
            Ok(principal) => {
                req.extensions_mut().insert(principal);
                // The clone that was made ready serves this call.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(req))
            }
            Err(denied) => {
                tracing::debug!(peer = ?peer.map(|p| p.addr), path = req.uri().path(), %denied, "call refused");
                let status = match denied {
                    Denied::NotGranted(_) => tonic::Status::permission_denied(denied.to_string()),
                    _ => tonic::Status::unauthenticated(denied.to_string()),
                };
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// Accepted connections, after their TLS handshake when TLS is on.
pub struct SecureListener {
    local: SocketAddr,
    accepted: mpsc::Receiver<Conn>,
    accepting: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl SecureListener {
    fn new(
        tcp: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        what: &'static str,
    ) -> SecureListener {
        let local = tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, accepted) = mpsc::channel(64);
        let accepting = AbortOnDrop(tokio::spawn(accept_loop(tcp, tls, tx, what)));
        SecureListener {
            local,
            accepted,
            accepting,
        }
    }

    /// An already-bound listener (tests, inherited sockets), without TLS.
    pub fn plain(tcp: TcpListener, what: &'static str) -> SecureListener {
        SecureListener::new(tcp, None, what)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The connections as tonic's `serve_with_incoming` takes them.
    pub fn incoming(self) -> Incoming {
        Incoming(self)
    }
}

/// [`SecureListener`]'s connections as a stream.
pub struct Incoming(SecureListener);

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.accepted.poll_recv(cx).map(|c| c.map(Ok))
    }
}

async fn accept_loop(
    tcp: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tx: mpsc::Sender<Conn>,
    what: &'static str,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (stream, addr) = tokio::select! {
            () = tx.closed() => return,
            accepted = tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    tracing::warn!(listener = what, error = %e, "cannot accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Some(acceptor) = &tls else {
            let conn = Conn {
                io: Io::Plain(stream),
                peer: Peer {
                    addr,
                    workload: None,
                },
            };
            if tx.send(conn).await.is_err() {
                return;
            }
            continue;
        };
        let Ok(slot) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let workload = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| lumen_core::identity::spiffe_of(c))
                        .map(|id| id.to_string());
                    let conn = Conn {
                        io: Io::Tls(Box::new(tls)),
                        peer: Peer { addr, workload },
                    };
                    let _ = tx.send(conn).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(listener = what, peer = %addr, error = %e, "TLS handshake failed")
                }
                Err(_) => {
                    tracing::debug!(listener = what, peer = %addr, "TLS handshake timed out")
                }
            }
        });
    }
}

impl axum::serve::Listener for SecureListener {
    type Io = Conn;
    type Addr = Peer;

    async fn accept(&mut self) -> (Conn, Peer) {
        match self.accepted.recv().await {
            Some(conn) => {
                let peer = conn.peer.clone();
                (conn, peer)
            }
            // The accept loop only ends once this receiver is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Peer> {
        let _ = &self.accepting;
        Ok(Peer {
            addr: self.local,
            workload: None,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, SecureListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, SecureListener>) -> Peer {
        stream.remote_addr().clone()
    }
}

/// One accepted connection: plain TCP or TLS, with its peer.
pub struct Conn {
    io: Io,
    peer: Peer,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Conn {
    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The modification times of files, to see that one changed.
fn mtimes(files: &[&Path]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

/// Whether `last` is old enough to look at the files again (and marks
/// now as the last look).
fn due(last: &Mutex<Instant>) -> bool {
    let Ok(mut last) = last.lock() else {
        return false;
    };
    if last.elapsed() < RELOAD_CHECK {
        return false;
    }
    *last = Instant::now();
    true
}

/// The server certificate, read again when its files change (cert-manager
/// and the like renew them in place): new handshakes get the new one.
#[derive(Debug)]
struct FileCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    checked: Mutex<Instant>,
    seen: Mutex<Vec<Option<SystemTime>>>,
}

impl FileCert {
    fn load(cert: &Path, key: &Path) -> Result<FileCert, AccessError> {
        let seen = mtimes(&[cert, key]);
        Ok(FileCert {
            current: ArcSwap::from_pointee(certified_key(cert, key)?),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            checked: Mutex::new(Instant::now()),
            seen: Mutex::new(seen),
        })
    }

    fn reload_if_changed(&self) {
        if !due(&self.checked) {
            return;
        }
        let now = mtimes(&[&self.cert, &self.key]);
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        if *seen == now {
            return;
        }
        match certified_key(&self.cert, &self.key) {
            Ok(key) => {
                self.current.store(Arc::new(key));
                *seen = now;
                tracing::info!(cert = %self.cert.display(), "server certificate reloaded");
            }
            // Half-written during a renewal, perhaps: keep serving the old
            // one and look again at the next check.
            Err(e) => tracing::warn!(error = %e, "server certificate not reloaded"),
        }
    }
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.reload_if_changed();
        Some(self.current.load_full())
    }
}

fn read(file: &Path) -> Result<Vec<u8>, AccessError> {
    std::fs::read(file).map_err(|e| file_error(file, e))
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, AccessError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(cert, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(file_error(cert, "holds no PEM certificate"));
    }
    let der = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|e| file_error(key, format!("not a PEM private key: {e}")))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| file_error(key, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| file_error(key, format!("does not match {}: {e}", cert.display())))?;
    Ok(certified)
}

fn client_verifier(
    file: &Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, AccessError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read(file)?) {
        let c = c.map_err(|e| file_error(file, format!("not a PEM certificate: {e}")))?;
        roots
            .add(c)
            .map_err(|e| file_error(file, format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(file_error(file, "holds no PEM certificate"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Without a certificate a client may still send a token.
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .allow_unauthenticated()
        .build()
        .map_err(|e| file_error(file, e))
}

/// The token file: kube-apiserver's `--token-auth-file` CSV
/// (`token,user,uid,"group1,group2"`; only the first two are used), read
/// again when it changes.
#[derive(Debug)]
struct Tokens {
    file: PathBuf,
    entries: RwLock<Vec<(String, String)>>,
    checked: Mutex<Instant>,
    seen: Mutex<Vec<Option<SystemTime>>>,
}

impl Tokens {
    fn load(file: &Path) -> Result<Tokens, AccessError> {
        let seen = mtimes(&[file]);
        Ok(Tokens {
            entries: RwLock::new(parse_tokens(file)?),
            file: file.to_path_buf(),
            checked: Mutex::new(Instant::now()),
            seen: Mutex::new(seen),
        })
    }

    fn reload_if_changed(&self) {
        if !due(&self.checked) {
            return;
        }
        let now = mtimes(&[&self.file]);
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        if *seen == now {
            return;
        }
        match parse_tokens(&self.file) {
            Ok(entries) => {
                if let Ok(mut e) = self.entries.write() {
                    *e = entries;
                }
                *seen = now;
                tracing::info!(file = %self.file.display(), "token file reloaded");
            }
            Err(e) => tracing::warn!(error = %e, "token file not reloaded; the old tokens stay"),
        }
    }

    fn user_of(&self, token: &str) -> Option<String> {
        self.reload_if_changed();
        let entries = self.entries.read().ok()?;
        // Every entry is compared, each without stopping at the first
        // difference, so timing does not tell how close a guess was.
        let mut found = None;
        for (t, user) in entries.iter() {
            if same_secret(t.as_bytes(), token.as_bytes()) {
                found = Some(user.clone());
            }
        }
        found
    }

    fn token_of(&self, user: &str) -> Option<String> {
        self.reload_if_changed();
        let entries = self.entries.read().ok()?;
        entries
            .iter()
            .find(|(_, u)| u == user)
            .map(|(t, _)| t.clone())
    }
}

fn parse_tokens(file: &Path) -> Result<Vec<(String, String)>, AccessError> {
    let text = std::fs::read_to_string(file).map_err(|e| file_error(file, e))?;
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.splitn(3, ',');
        let token = fields.next().unwrap_or_default().trim();
        let user = fields.next().unwrap_or_default().trim().trim_matches('"');
        let at = |reason: &str| file_error(file, format!("line {}: {reason}", n + 1));
        if token.len() < 16 {
            return Err(at(
                "the token is shorter than 16 characters (expected token,user[,uid[,groups]])",
            ));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(at("the token holds whitespace"));
        }
        if user.is_empty() {
            return Err(at(
                "no user after the token (expected token,user[,uid[,groups]])",
            ));
        }
        entries.push((token.to_string(), user.to_string()));
    }
    if entries.is_empty() {
        return Err(file_error(file, "holds no token"));
    }
    Ok(entries)
}

/// Compares without stopping at the first difference.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_file(dir: &Path, text: &str) -> PathBuf {
        let f = dir.join("tokens.csv");
        std::fs::write(&f, text).unwrap();
        f
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lumen-listen-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn with_tokens(name: &str, text: &str) -> Arc<Access> {
        let dir = scratch(name);
        Access::load(&AccessFiles {
            token_file: Some(token_file(&dir, text)),
            ..Default::default()
        })
        .unwrap()
    }

    fn headers(auth: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn without_credentials_configured_loopback_serves_anyone_and_nothing_else_binds() {
        let open = Access::open();
        assert_eq!(
            open.authenticate(None, &http::HeaderMap::new(), Grant::Operate),
            Ok(Principal::Anonymous)
        );
        assert!(
            open.check_exposure("query", "127.0.0.1:9900".parse().unwrap())
                .is_ok()
        );
        let err = open
            .check_exposure("query", "0.0.0.0:9900".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("query on 0.0.0.0:9900") && err.contains("cleartext and without"),
            "{err}"
        );
        // Tokens alone are not enough beyond loopback: they would travel
        // in cleartext.
        let tokens = with_tokens("exposed", "0123456789abcdef0123,alice\n");
        let err = tokens
            .check_exposure("query", "10.0.0.1:9900".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("in cleartext:"), "{err}");
    }

    #[test]
    fn tokens_authenticate_as_bearer_or_basic_and_wrong_ones_are_refused() {
        let access = with_tokens(
            "tokens",
            "# people\n0123456789abcdef0123,alice,1000,\"ops,dev\"\nfedcba9876543210fedc,grafana\n",
        );
        let none = http::HeaderMap::new();
        assert_eq!(
            access.authenticate(None, &none, Grant::Operate),
            Err(Denied::Missing)
        );
        assert_eq!(
            access.authenticate(
                None,
                &headers("Bearer 0123456789abcdef0123"),
                Grant::Operate
            ),
            Ok(Principal::User("alice".into()))
        );
        assert_eq!(
            access.authenticate(
                None,
                &headers("Bearer 0123456789abcdef0124"),
                Grant::Operate
            ),
            Err(Denied::WrongToken)
        );
        let basic = |up: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(up)
            )
        };
        assert_eq!(
            access.authenticate(
                None,
                &headers(&basic("grafana:fedcba9876543210fedc")),
                Grant::Operate
            ),
            Ok(Principal::User("grafana".into()))
        );
        // Someone else's token under your name is refused.
        assert_eq!(
            access.authenticate(
                None,
                &headers(&basic("mallory:fedcba9876543210fedc")),
                Grant::Operate
            ),
            Err(Denied::WrongToken)
        );
        assert!(matches!(
            access.authenticate(None, &headers("Digest x"), Grant::Operate),
            Err(Denied::Malformed(_))
        ));
        assert_eq!(
            access.token_of("alice").as_deref(),
            Some("0123456789abcdef0123")
        );
    }

    #[test]
    fn a_workload_certificate_may_send_telemetry_but_not_read() {
        let access = with_tokens("workload", "0123456789abcdef0123,alice\n");
        let peer = Peer {
            addr: "10.0.0.7:40000".parse().unwrap(),
            workload: Some("spiffe://cluster.local/ns/default/sa/reviews".into()),
        };
        let none = http::HeaderMap::new();
        assert_eq!(
            access.authenticate(Some(&peer), &none, Grant::Ingest),
            Ok(Principal::Workload(
                "spiffe://cluster.local/ns/default/sa/reviews".into()
            ))
        );
        assert!(matches!(
            access.authenticate(Some(&peer), &none, Grant::Operate),
            Err(Denied::NotGranted(_))
        ));
    }

    #[test]
    fn a_bad_token_file_is_refused_with_its_line() {
        let dir = scratch("badtokens");
        let f = token_file(&dir, "0123456789abcdef0123,alice\nshort,bob\n");
        let err = Access::load(&AccessFiles {
            token_file: Some(f),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("tokens.csv: line 2: the token is shorter"),
            "{err}"
        );
        let f = token_file(&dir, "# nothing\n");
        let err = Access::load(&AccessFiles {
            token_file: Some(f),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("holds no token"), "{err}");
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
    }

    #[test]
    fn half_given_tls_flags_are_refused() {
        let err = Access::load(&AccessFiles {
            cert_file: Some("cert.pem".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("go together"), "{err}");
        let err = Access::load(&AccessFiles {
            client_ca_file: Some("ca.pem".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("needs --tls-cert-file"), "{err}");
    }

    #[tokio::test]
    async fn the_server_certificate_is_read_again_when_renewed() {
        let dir = scratch("reload");
        let write = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
            std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
            cert.der().to_vec()
        };
        let first = write("one.example");
        let cert = FileCert::load(&dir.join("tls.crt"), &dir.join("tls.key")).unwrap();
        assert_eq!(cert.current.load().cert[0].as_ref(), first.as_slice());
        // A renewal a second later has a newer mtime; the check is due.
        std::thread::sleep(Duration::from_millis(1100));
        let second = write("two.example");
        *cert.checked.lock().unwrap() = Instant::now() - RELOAD_CHECK;
        cert.reload_if_changed();
        assert_eq!(cert.current.load().cert[0].as_ref(), second.as_slice());
        // A half-written renewal keeps the old one.
        std::thread::sleep(Duration::from_millis(1100));
        std::fs::write(dir.join("tls.key"), "not a key").unwrap();
        *cert.checked.lock().unwrap() = Instant::now() - RELOAD_CHECK;
        cert.reload_if_changed();
        assert_eq!(cert.current.load().cert[0].as_ref(), second.as_slice());
    }
}
