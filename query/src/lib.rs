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
        axum::serve(self.listener, http::router(self.engine))
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(ServeError::Serve)
    }
}
