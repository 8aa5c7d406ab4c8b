//! A pooled HTTP/2 upstream connection that goes silent (a peer gone
//! without a FIN, a frozen middlebox) is found dead by the sidecar's
//! keepalive pings and closed, and the next request gets a fresh one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lumen_tests::{Sidecar, SidecarPorts, UpPorts, start_up};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// An HTTP/2-only app; `/stream` sends one chunk and then holds its body
/// open, sending nothing.
async fn h2_app() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let body: Body = if req.uri().path() == "/stream" {
                        let first = futures_util::stream::once(async {
                            Ok(http_body::Frame::data(Bytes::from_static(b"first")))
                        });
                        BodyExt::boxed(http_body_util::StreamBody::new(
                            futures_util::StreamExt::chain(first, futures_util::stream::pending()),
                        ))
                    } else {
                        BodyExt::boxed(Full::new(Bytes::from_static(b"ok")))
                    };
                    Ok::<_, std::convert::Infallible>(http::Response::new(body))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// A relay whose open connections can be frozen: nothing passes either
/// way, nothing is closed — what a dead peer looks like from the sidecar.
/// It notices when the sidecar closes a connection.
struct FreezingRelay {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    /// Connections the sidecar closed.
    closed: Arc<AtomicU64>,
    opened: Arc<AtomicU64>,
}

impl FreezingRelay {
    async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let frozen = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicU64::new(0));
        let opened = Arc::new(AtomicU64::new(0));
        let (f, c, o) = (frozen.clone(), closed.clone(), opened.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                o.fetch_add(1, Ordering::SeqCst);
                // A connection opened while frozen is not frozen itself.
                let freezes = !f.load(Ordering::SeqCst);
                tokio::spawn(relay(client, server, freezes.then(|| f.clone()), c.clone()));
            }
        });
        Ok(FreezingRelay {
            addr,
            frozen,
            closed,
            opened,
        })
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    frozen: Option<Arc<AtomicBool>>,
    closed: Arc<AtomicU64>,
) {
    let is_frozen = move || frozen.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = {
        let is_frozen = is_frozen.clone();
        async move {
            let mut buf = vec![0u8; 16384];
            loop {
                match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    // Frozen: swallowed, as a dead peer would.
                    Ok(_) if is_frozen() => {}
                    Ok(n) => {
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16384];
        loop {
            match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return std::future::pending::<()>().await,
                Ok(_) if is_frozen() => {}
                Ok(n) => {
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return std::future::pending::<()>().await;
                    }
                }
            }
        }
    };
    // The sidecar closing its side is what the test waits for.
    tokio::select! {
        () = up => { closed.fetch_add(1, Ordering::SeqCst); }
        () = down => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_http2_upstream_is_found_dead_by_keepalive_and_replaced() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let app = h2_app().await?;
    let relay = FreezingRelay::start(app).await?;
    let front = SidecarPorts::pick();
    let up_ports = UpPorts::pick();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "apiVersion: lumen.dev/v1alpha1
kind: Mesh
metadata:
  name: keepalive
spec:
  services:
    - name: h2app
      protocol: http2
      endpoints: [{{address: {}}}]
",
            relay.addr
        ),
    )?;
    let _up = start_up(logs, &mesh, &dir.path().join("data"), up_ports, &[]).await?;
    let collector = up_ports.grpc_endpoint();
    let _front = Sidecar {
        service: "front",
        version: "v1",
        mesh: &mesh,
        ports: front,
        app: None,
        collector: &collector,
        extra: &[],
    }
    .start(logs)
    .await?;
    let client = reqwest::Client::new();
    let get = || {
        client
            .get(format!("http://127.0.0.1:{}/", front.outbound))
            .header("host", "h2app")
            .send()
    };
    // A response streaming on the connection (so it is in use, not idle
    // in the pool, whose idle timeout would close it anyway).
    let mut streaming = client
        .get(format!("http://127.0.0.1:{}/stream", front.outbound))
        .header("host", "h2app")
        .send()
        .await?;
    assert_eq!(streaming.status(), 200);
    assert_eq!(streaming.chunk().await?.as_deref(), Some(&b"first"[..]));
    assert_eq!(relay.opened.load(Ordering::SeqCst), 1);

    relay.frozen.store(true, Ordering::SeqCst);
    // Pings every 10 s, 5 s to answer: the sidecar gives up within ~15 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    while relay.closed.load(Ordering::SeqCst) == 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the silent connection was never closed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The stream on it ends in an error, long before the 5 min stream idle
    // timeout would have cut it.
    assert!(streaming.chunk().await.is_err());
    // The next request goes out on a new connection, and is answered.
    assert_eq!(get().await?.status(), 200);
    assert_eq!(relay.opened.load(Ordering::SeqCst), 2);
    Ok(())
}
