//! Accepting connections: each one's context (peer, original destination),
//! what it speaks (detected from its first bytes, or declared), then HTTP
//! (HTTP/1.1 and HTTP/2 on one port, keep-alive) or opaque TCP; a graceful
//! drain on shutdown.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use lumen_core::UpstreamProtocol;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::coalesce::Coalesce;
use crate::context::{Connection, Shared, Side};
use crate::detect::{self, Detected};
use crate::idle::{CountingIo, HeaderTimer, ReadCount};
use crate::limits::Refused;
use crate::request::handle;
use lumen_core::security::MtlsMode;

/// How long an HTTP/2 connection may go without answering a ping.
const PING_INTERVAL: Duration = Duration::from_secs(60);

/// How long a new connection may stay silent before its protocol is taken
/// to be opaque TCP (a server-first protocol). Ports declared `tcp` skip it.
const DETECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one listener until `shutdown` turns true, then lets open
/// connections finish their requests for up to `drain`. A connection is
/// refused at once when `open` (the listener's limit, shared by its
/// workers' sockets) has no permit left.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    side: Side,
    open: Arc<tokio::sync::Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let limits = &shared.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(limits.request_headers_timeout)
        .max_headers(limits.max_headers)
        // hyper's floor for its read buffer is 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(PING_INTERVAL))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.max_pending_resets)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let mut tcp = tokio::task::JoinSet::new();
    let accepted_here = listener.local_addr().ok().map(|a| {
        shared
            .telemetry
            .metrics()
            .accepted_by(a, crate::workers::index())
    });
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE; back off instead of spinning.
                tracing::warn!(error = %e, ?side, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            // Over the limit: closed at once, before it costs anything more.
            shared.telemetry.metrics().refused(Refused::ConnectionLimit);
            drop(stream);
            continue;
        };
        if let Some(c) = &accepted_here {
            c.inc();
        }
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            side,
            peer,
            local: stream.local_addr().unwrap_or(peer),
            original_dst: detect::original_dst(&stream),
            permit: std::sync::Mutex::new(Some(permit)),
            peer_identity: None,
            gateway_server: None,
        };
        let shared = shared.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let stop = shutdown.clone();
        tcp.spawn(async move {
            if side == Side::Outbound && shared.gateway.is_some() {
                return serve_gateway(stream, shared, conn, &builder, watcher, stop, drain).await;
            }
            let speaks = match declared(&shared, &conn) {
                // Inbound with a certificate, a sidecar's mTLS comes first
                // whatever the app speaks (a server-first app included).
                Some(UpstreamProtocol::Tcp)
                    if side == Side::Outbound || !shared.registry.tls().ready() =>
                {
                    Detected::Tcp
                }
                _ => detect::detect(&stream, DETECT_TIMEOUT).await,
            };
            if side == Side::Inbound {
                let sni = match speaks {
                    Detected::Tls => detect::server_name(&stream, DETECT_TIMEOUT).await,
                    _ => None,
                };
                let mesh = sni
                    .as_deref()
                    .is_some_and(|n| n.starts_with(crate::mtls::MESH_SNI_PREFIX));
                // DISABLE: mesh TLS is not terminated here (it fails, as in Istio).
                if mesh && shared.routes.load().inbound_mtls() != MtlsMode::Disable {
                    return serve_mtls(stream, shared, conn, &builder, watcher, stop, drain).await;
                }
                if shared.routes.load().inbound_mtls() == MtlsMode::Strict {
                    // Istio's STRICT: nothing but mesh mTLS.
                    shared.telemetry.metrics().refused(Refused::MtlsRequired);
                    tracing::debug!(peer = %conn.peer, "plaintext refused: PeerAuthentication is STRICT");
                    return;
                }
            }
            let conn = Arc::new(conn);
            match speaks {
                Detected::Http1 | Detected::Http2 => {
                    let h2 = speaks == Detected::Http2;
                    serve_http(stream, h2, shared, conn, &builder, watcher).await
                }
                Detected::Tls | Detected::Tcp => {
                    let sni = match (speaks, side) {
                        (Detected::Tls, Side::Outbound) => {
                            detect::server_name(&stream, DETECT_TIMEOUT).await
                        }
                        _ => None,
                    };
                    crate::tcp::proxy(shared, conn, stream, speaks == Detected::Tls, sni, stop, drain).await;
                }
                Detected::Closed => {}
            }
        });
        // Reap finished connections so the set stays as small as what is open.
        while tcp.try_join_next().is_some() {}
    }
    drop(listener);
    let drained = async {
        graceful.shutdown().await;
        while tcp.join_next().await.is_some() {}
    };
    if tokio::time::timeout(drain, drained).await.is_err() {
        tracing::warn!(
            ?side,
            "connections still open after {drain:?}; closing them"
        );
    }
}

/// The protocol the connection's destination declares, if any: the local
/// app's service (inbound), or the service a captured connection dialled.
fn declared(shared: &Shared, conn: &Connection) -> Option<UpstreamProtocol> {
    let table = shared.routes.load();
    let mesh = table.mesh();
    match conn.side {
        Side::Inbound => mesh
            .find(&shared.identity.service, &shared.identity.namespace)
            .map(|s| s.protocol),
        // A service routed by SNI is detected even when declared TCP (as
        // Istio's TLS and HTTPS ports are): its ClientHello picks the route.
        Side::Outbound => {
            let i = mesh.index_by_address(conn.original_dst?)?;
            (!table.has_tls_routes(i)).then(|| mesh.services[i].protocol)
        }
    }
}

/// A connection to one of a gateway's ports: plaintext HTTP or TCP as the
/// port's servers declare, or TLS — terminated with the certificate of the
/// server its SNI picks, or passed through by SNI.
async fn serve_gateway(
    stream: TcpStream,
    shared: Arc<Shared>,
    mut conn: Connection,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let port = conn.local.port();
    let table = shared.routes.load_full();
    let Some(credentials) = shared.gateway.clone() else {
        return;
    };
    if !crate::gateway::is_tls_port(&table, port) {
        let tcp_only = table.gateway_port(port).is_some_and(|p| {
            p.servers
                .iter()
                .all(|s| s.server.protocol == UpstreamProtocol::Tcp)
        });
        let conn = Arc::new(conn);
        if tcp_only {
            crate::tcp::proxy(shared, conn, stream, false, None, stop, drain).await;
        } else {
            match detect::detect(&stream, DETECT_TIMEOUT).await {
                Detected::Closed => {}
                Detected::Tls | Detected::Tcp => {
                    crate::tcp::proxy(shared, conn, stream, false, None, stop, drain).await
                }
                speaks => {
                    let h2 = speaks == Detected::Http2;
                    serve_http(stream, h2, shared, conn, builder, watcher).await
                }
            }
        }
        return;
    }
    let refuse = |why: &str| {
        shared.telemetry.metrics().refused(Refused::GatewayTls);
        tracing::debug!(peer = %conn.peer, port, reason = why, "gateway TLS refused");
    };
    match detect::detect(&stream, DETECT_TIMEOUT).await {
        Detected::Tls => {}
        Detected::Closed => return,
        _ => return refuse("plaintext on a TLS port"),
    }
    let sni = detect::server_name(&stream, DETECT_TIMEOUT).await;
    let plan = crate::gateway::plan(&table, &credentials, port, sni.as_deref());
    drop(table);
    match plan {
        Err(why) => refuse(&why),
        Ok(crate::gateway::Plan::Passthrough(server)) => {
            conn.gateway_server = Some(Arc::new(server));
            crate::tcp::proxy(shared, Arc::new(conn), stream, true, sni, stop, drain).await
        }
        Ok(crate::gateway::Plan::Terminate { config, server }) => {
            let tls = match crate::gateway::accept(config, stream, DETECT_TIMEOUT).await {
                Ok(t) => t,
                Err(why) => return refuse(&why),
            };
            let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            if !crate::gateway::client_san_allowed(&server.server, leaf) {
                return refuse("the client certificate has none of the server's subjectAltNames");
            }
            let tcp = server.server.protocol == UpstreamProtocol::Tcp;
            conn.gateway_server = Some(Arc::new(server));
            let conn = Arc::new(conn);
            if tcp {
                crate::tcp::proxy(shared, conn, tls, false, None, stop, drain).await;
            } else {
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                serve_http(tls, h2, shared, conn, builder, watcher).await;
            }
        }
    }
}

/// Terminates a sidecar's mesh mTLS: the client's chain must lead to the
/// mesh's roots; its SPIFFE id is the connection's source identity. Then
/// HTTP or, for `lumen-tcp`, opaque TCP to the app.
async fn serve_mtls(
    stream: TcpStream,
    shared: Arc<Shared>,
    mut conn: Connection,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let tls = shared.registry.tls().clone();
    let Some(config) = tls.server_config() else {
        shared.telemetry.metrics().refused(Refused::MtlsHandshake);
        tracing::debug!(peer = %conn.peer, "mesh mTLS refused: this proxy has no workload certificate yet");
        return;
    };
    let accepted = tokio::time::timeout(
        DETECT_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(config).accept(stream),
    )
    .await;
    let stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared.telemetry.metrics().refused(Refused::MtlsHandshake);
            tracing::debug!(peer = %conn.peer, error = %e, "mesh mTLS handshake failed");
            return;
        }
        Err(_) => {
            shared.telemetry.metrics().refused(Refused::MtlsHandshake);
            return;
        }
    };
    let session = stream.get_ref().1;
    conn.peer_identity = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| crate::mtls::spiffe_of(c))
        .map(|id| Arc::from(id.to_string()));
    let tcp = session.alpn_protocol() == Some(crate::mtls::TCP_ALPN);
    let conn = Arc::new(conn);
    if tcp {
        crate::tcp::proxy(shared, conn, stream, false, None, stop, drain).await;
    } else {
        let h2 = session.alpn_protocol() == Some(b"h2");
        serve_http(stream, h2, shared, conn, builder, watcher).await;
    }
}

/// Serves HTTP on `stream`; `h2` when the client is known to speak HTTP/2,
/// whose responses' frames are then written together ([`Coalesce`]).
async fn serve_http<S>(
    stream: S,
    h2: bool,
    shared: Arc<Shared>,
    conn: Arc<Connection>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let side = conn.side;
    let metrics = shared.telemetry.metrics().clone();
    // The headers deadline runs from a request's first byte; before it the
    // connection is idle, not slow.
    let count = Arc::new(ReadCount::default());
    let mut builder = builder.clone();
    builder
        .http1()
        .timer(HeaderTimer::new(count.clone(), shared.limits.idle_timeout));
    let svc = service_fn(move |req| handle(shared.clone(), conn.clone(), req));
    let io = TokioIo::new(CountingIo::new(Coalesce::new(stream, h2), count.clone()));
    let served = builder.serve_connection_with_upgrades(io, svc).into_owned();
    if let Err(e) = watcher.watch(served).await {
        if count.idle_expired() {
            tracing::debug!(?side, "idle connection closed");
            return;
        }
        if let Some(why) = refusal(e.as_ref()) {
            metrics.refused(why);
        }
        tracing::debug!(error = %e, ?side, "connection ended with error");
    }
}

/// Which limit, if any, ended a connection with this error.
fn refusal(e: &(dyn std::error::Error + 'static)) -> Option<Refused> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_timeout() {
                return Some(Refused::HeadersTimeout);
            }
            if h.is_parse_too_large() {
                return Some(Refused::HeadersTooLarge);
            }
        }
        if let Some(h2) = err.downcast_ref::<h2::Error>()
            && h2.is_go_away()
            && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
        {
            return Some(Refused::Http2Abuse);
        }
        cur = err.source();
    }
    None
}
