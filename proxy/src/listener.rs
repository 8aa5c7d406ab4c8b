//! Accepting connections: HTTP/1.1 and HTTP/2 (h2c, detected by preface) on
//! one port, keep-alive, and a graceful drain on shutdown.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::request::{Connection, Shared, Side, handle};

/// How long a connection may wait for request headers (HTTP/1.1) or go
/// without answering a ping (HTTP/2) before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves one listener until `shutdown` turns true, then lets open
/// connections finish their requests for up to `drain`.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    side: Side,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(IDLE_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(IDLE_TIMEOUT))
        .keep_alive_timeout(Duration::from_secs(20));
    let graceful = GracefulShutdown::new();
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
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Connection {
            side,
            peer,
            local: stream.local_addr().unwrap_or(peer),
        });
        let shared = shared.clone();
        let svc = service_fn(move |req| handle(shared.clone(), conn.clone(), req));
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, ?side, "connection ended with error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?side,
            "connections still open after {drain:?}; closing them"
        );
    }
}
