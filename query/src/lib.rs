//! The Lumen query service: SQL over the collector's store.
//!
//! [`engine::QueryEngine`] is one DataFusion context over the store's
//! tables ([`table::StoreTable`]: hot buffer ∪ Parquet files, pruned by
//! time), with the read-only guard and per-query limits. Front ends are thin
//! translations onto it; the first is [`http`] (`POST /api/v1/sql` on port
//! 9900, answering JSON, CSV or Arrow IPC).

pub mod engine;
pub mod format;
pub mod http;
pub mod table;

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;

pub use engine::{QueryEngine, QueryError, QueryLimits, QueryResult};

/// How long shutdown waits for running queries and open connections.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} (query HTTP): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("query HTTP server: {0}")]
    Serve(std::io::Error),
}

/// The query HTTP server, bound and ready to run.
pub struct QueryServer {
    listener: TcpListener,
    engine: QueryEngine,
}

impl QueryServer {
    pub async fn bind(addr: SocketAddr, engine: QueryEngine) -> Result<Self, ServeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        Ok(QueryServer { listener, engine })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` resolves, letting running queries finish.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
        let serve = axum::serve(self.listener, http::router(self.engine)).with_graceful_shutdown(
            async move {
                shutdown.await;
                let _ = stopping_tx.send(true);
            },
        );
        // Running queries get DRAIN_TIMEOUT to finish; a client that keeps
        // an idle HTTP/2 connection open must not hold shutdown forever.
        let deadline = async move {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        };
        tokio::select! {
            r = serve => r.map_err(ServeError::Serve),
            () = deadline => {
                tracing::warn!("query connections still open after {DRAIN_TIMEOUT:?}; closing them");
                Ok(())
            }
        }
    }
}
