//! Opaque TCP: a connection's bytes passed through both ways, and one row
//! per connection (bytes each way, how long it lasted, how it ended).
//! Tunnels made from HTTP — `CONNECT`, WebSocket and other upgrades — use
//! the same [`splice`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lumen_core::networking::OutboundMode;
use lumen_core::{Protocol, ResponseFlags, Workload};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::body::{RequestBodyState, Spliced};
use crate::cluster::Cluster;
use crate::context::{Connection, Shared, Side, begin_record};
use crate::endpoint::Health;
use crate::route::NoRoute;
use crate::trace::TraceContext;

/// Copies `from` into `to` until end of stream, then closes `to`'s
/// writing side so the other end sees the end too.
async fn pipe<R, W>(mut from: R, mut to: W, count: &mut u64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        *count += n as u64;
    }
}

/// Passes bytes both ways between `downstream` and `upstream` until both
/// directions end, either side fails, or `stop` turns true and `drain`
/// passes.
pub async fn splice<D, U>(
    downstream: D,
    upstream: U,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) -> Spliced
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (d_read, d_write) = tokio::io::split(downstream);
    let (u_read, u_write) = tokio::io::split(upstream);
    let mut out = Spliced::default();
    let (mut sent, mut received) = (0u64, 0u64);
    {
        let up = pipe(d_read, u_write, &mut sent);
        let down = pipe(u_read, d_write, &mut received);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        let stopping = async {
            let _ = stop.wait_for(|s| *s).await;
            tokio::time::sleep(drain).await;
        };
        tokio::pin!(stopping);
        // A direction that ends cleanly half-closes and the other goes on;
        // one that fails ends the tunnel, so neither side waits on a peer
        // that is gone.
        while !(up_done && down_done) {
            tokio::select! {
                r = &mut up, if !up_done => {
                    up_done = true;
                    if r.is_err() {
                        out.flags.insert(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION);
                        break;
                    }
                }
                r = &mut down, if !down_done => {
                    down_done = true;
                    if r.is_err() {
                        out.flags.insert(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION);
                        break;
                    }
                }
                () = &mut stopping => break,
            }
        }
    }
    out.sent = sent;
    out.received = received;
    out
}

/// Where an opaque connection goes, and whom its row names.
struct Target {
    to: To,
    authority: String,
    route: Option<Arc<str>>,
}

/// Istio's name for the destination of calls refused under REGISTRY_ONLY.
pub const BLACK_HOLE: &str = "BlackHoleCluster";

enum To {
    /// One address: the local app, or where a connection to no mesh
    /// service was going (Istio's passthrough).
    Fixed(SocketAddr, Arc<str>, Workload),
    /// A mesh service's cluster, balanced.
    Cluster(Arc<Cluster>),
    /// Nowhere: a host outside the registry under REGISTRY_ONLY (Istio's
    /// `BlackHoleCluster`).
    BlackHole,
}

fn target(
    shared: &Shared,
    conn: &Connection,
    sni: Option<&str>,
) -> Result<Target, (ResponseFlags, String)> {
    match conn.side {
        Side::Inbound => match shared.inbound_app(conn) {
            Some(app) => Ok(Target {
                to: To::Fixed(app.address, app.address_str.clone(), app.identity.clone()),
                authority: app.address_str.to_string(),
                route: None,
            }),
            None => Err((
                ResponseFlags::NO_HEALTHY_UPSTREAM,
                "no local application for inbound traffic".into(),
            )),
        },
        Side::Outbound if shared.gateway.is_some() => {
            let table = shared.routes.load();
            let port = conn.local.port();
            match table.route_gateway_tcp(port, conn.local, sni, conn.gateway_server.as_deref()) {
                Ok((cluster, route)) => Ok(Target {
                    authority: match sni {
                        Some(sni) => format!("{sni}:{port}"),
                        None => format!(
                            "{}:{port}",
                            table.mesh().services[cluster.service_index].name
                        ),
                    },
                    to: To::Cluster(cluster),
                    route: Some(route),
                }),
                Err(NoRoute::NoEndpoints) => Err((
                    ResponseFlags::NO_HEALTHY_UPSTREAM,
                    format!("the gateway's route on port {port} leads to no endpoints"),
                )),
                Err(_) => Err((
                    ResponseFlags::NO_ROUTE,
                    match sni {
                        Some(sni) => format!(
                            "no tls route bound to this gateway matches server name `{sni}` on port {port}"
                        ),
                        None => format!("no tcp route bound to this gateway matches port {port}"),
                    },
                )),
            }
        }
        Side::Outbound => {
            let Some(dst) = conn.original_dst else {
                // Explicit mode names destinations in HTTP; bytes name none.
                return Err((
                    ResponseFlags::NO_ROUTE,
                    "an opaque TCP connection reached the outbound listener directly; \
                     only transparently captured TCP has a destination"
                        .into(),
                ));
            };
            let table = shared.routes.load();
            let mesh = table.mesh();
            // A TLS connection to no mesh address may still name a mesh
            // host (a ServiceEntry's) in its ClientHello, as egress does.
            let service = mesh.index_by_address(dst).or_else(|| {
                let i = mesh.resolve_host(sni?, &shared.identity.namespace)?;
                table.route_tcp(i, dst, sni).is_ok().then_some(i)
            });
            let authority = |name: &str| match sni {
                Some(sni) => format!("{sni}:{}", dst.port()),
                None => format!("{name}:{}", dst.port()),
            };
            match service {
                Some(i) => {
                    let name = mesh.services[i].name.clone();
                    match table.route_tcp(i, dst, sni) {
                        Ok((cluster, route)) => Ok(Target {
                            to: To::Cluster(cluster),
                            authority: authority(&name),
                            route: Some(route),
                        }),
                        Err(NoRoute::NoEndpoints) => Err((
                            ResponseFlags::NO_HEALTHY_UPSTREAM,
                            format!("service `{name}` has no endpoints"),
                        )),
                        Err(_) if sni.is_some() || table.has_tls_routes(i) => Err((
                            ResponseFlags::NO_ROUTE,
                            format!(
                                "no tls route of `{name}`'s VirtualService matches server name {:?} on port {}",
                                sni.unwrap_or(""),
                                dst.port()
                            ),
                        )),
                        Err(_) => Err((
                            ResponseFlags::NO_ROUTE,
                            format!(
                                "no tcp route of `{name}`'s VirtualService matches port {}",
                                dst.port()
                            ),
                        )),
                    }
                }
                None if table.outbound_mode() == OutboundMode::RegistryOnly => Ok(Target {
                    to: To::BlackHole,
                    authority: match sni {
                        Some(sni) => format!("{sni}:{}", dst.port()),
                        None => dst.to_string(),
                    },
                    route: None,
                }),
                // Not a mesh service: through to where it was going, as
                // Istio's passthrough does.
                None => {
                    // Istio's name for traffic to no mesh service; the
                    // address is in `authority` and `upstream_address`.
                    let mut w = Workload::unknown();
                    w.service = "PassthroughCluster".into();
                    Ok(Target {
                        to: To::Fixed(dst, dst.to_string().into(), w),
                        authority: match sni {
                            Some(sni) => format!("{sni}:{}", dst.port()),
                            None => dst.to_string(),
                        },
                        route: None,
                    })
                }
            }
        }
    }
}

/// Serves one opaque TCP connection and writes its row. One that opens
/// with a TLS ClientHello (`tls`) is routed by its server name too, and
/// its row's `authority` is that name.
/// `sni` is the ClientHello's server name, read by the caller (outbound).
pub async fn proxy<D>(
    shared: Arc<Shared>,
    conn: Arc<Connection>,
    downstream: D,
    tls: bool,
    sni: Option<String>,
    stop: watch::Receiver<bool>,
    drain: Duration,
) where
    D: AsyncRead + AsyncWrite + Unpin + Send,
{
    let trace = TraceContext::continue_from(None);
    let source = match conn.side {
        Side::Outbound => shared.identity.clone(),
        // Until mTLS, bytes carry no name for their sender.
        Side::Inbound => Workload::unknown(),
    };
    // Written exactly once, even if the task is dropped at shutdown (then
    // with `DC`).
    let mut pending = begin_record(
        &shared,
        &conn,
        Protocol::Tcp,
        source,
        Workload::unknown(),
        &trace,
        Arc::new(RequestBodyState::default()),
    );
    let sni = if tls { sni } else { None };
    if conn.side == Side::Inbound {
        // AuthorizationPolicy over TCP: what a connection shows.
        let attributes = crate::authz::RequestAttributes {
            conn: &conn,
            app_port: shared.inbound_app(&conn).map(|a| a.address.port()),
            method: "",
            path: "",
            host: None,
            headers: None,
            jwt: None,
        };
        if let Some(refusal) = crate::authz::check(&shared, &attributes, &Workload::unknown()) {
            tracing::debug!(peer = %conn.peer, policy = %refusal.policy, "tcp connection denied by an AuthorizationPolicy");
            if let Some(r) = pending.record_mut() {
                r.policy = Some(refusal.policy);
            }
            pending.finish(0, ResponseFlags::empty());
            return;
        }
    }
    let t = match target(&shared, &conn, sni.as_deref()) {
        Err((flags, message)) => {
            tracing::debug!(peer = %conn.peer, %message, "tcp connection refused");
            if let (Some(r), Some(dst)) = (pending.record_mut(), conn.original_dst) {
                r.authority = match &sni {
                    Some(sni) => format!("{sni}:{}", dst.port()),
                    None => dst.to_string(),
                };
            }
            pending.finish(0, flags);
            return;
        }
        Ok(t) => t,
    };
    if let Some(r) = pending.record_mut() {
        r.authority = t.authority;
        if let Some(route) = t.route {
            r.route = route;
        }
    }
    let (upstream, _held) = match t.to {
        To::BlackHole => {
            tracing::debug!(peer = %conn.peer, "tcp connection refused: outside the registry under REGISTRY_ONLY");
            shared
                .telemetry
                .metrics()
                .refused(crate::limits::Refused::RegistryOnly);
            if let Some(r) = pending.record_mut() {
                r.destination.service = BLACK_HOLE.into();
            }
            pending.finish(0, ResponseFlags::NO_ROUTE);
            return;
        }
        To::Fixed(address, address_str, workload) => {
            if let Some(r) = pending.record_mut() {
                r.destination = workload;
                r.upstream_address = Some(address_str);
            }
            match crate::endpoint::dial(address, shared.registry.default_connect_timeout()).await {
                Ok(s) => (Some(crate::mtls::MeshStream::Plain(s)), None),
                Err(e) => {
                    tracing::debug!(%address, error = %e, "tcp connect failed");
                    (None, None)
                }
            }
        }
        To::Cluster(cluster) => {
            let held = match cluster.connect_admit() {
                Ok(h) => h,
                Err(overflow) => {
                    tracing::debug!(cluster = %cluster.name, reason = overflow.0, "tcp connection refused: overflow");
                    pending.finish(0, ResponseFlags::UPSTREAM_OVERFLOW);
                    return;
                }
            };
            if let Some(r) = pending.record_mut() {
                r.destination.service = cluster.service.clone();
                r.destination.namespace = cluster.namespace.clone();
            }
            // A connect failure tries the cluster's other endpoints, each once.
            let mut tried = Vec::new();
            let mut upstream = None;
            while let Some(e) = cluster.pick(&tried, None) {
                if tried.contains(&e.state.address) {
                    break;
                }
                tried.push(e.state.address);
                if let Some(r) = pending.record_mut() {
                    r.destination.workload = e.workload.clone();
                    r.destination.version = e.version.clone();
                    r.upstream_address = Some(e.state.address_str.clone());
                    r.retries = tried.len() as u32 - 1;
                }
                let started = e.state.start();
                let host = format!("{}.{}", cluster.service, cluster.namespace);
                match e.state.connect(&host).await {
                    Ok(s) => {
                        drop(started);
                        if let (Some(peer), Some(r)) = (s.peer(), pending.record_mut()) {
                            r.mtls = true;
                            r.destination_principal = Some(peer.0);
                            r.source_principal = shared.registry.tls().principal();
                        }
                        upstream = Some(s);
                        break;
                    }
                    Err(err) => {
                        tracing::debug!(address = %e.state.address, error = %err, "tcp connect failed");
                        started.finish(Health::GatewayError, cluster.outlier_peers());
                    }
                }
            }
            (upstream, Some(held))
        }
    };
    match upstream {
        None => pending.finish(0, ResponseFlags::UPSTREAM_CONNECTION_FAILURE),
        Some(up) => {
            let spliced = splice(downstream, up, stop, drain).await;
            pending.finish_tunnel(spliced);
        }
    }
}
