//! The Lumen query service: SQL over the collector's store.
//!
//! [`engine::QueryEngine`] is one DataFusion context over the store's
//! tables ([`table::StoreTable`]: hot buffer ∪ Parquet files, pruned by
//! time), with the read-only guard, admission and limits. Every front end
//! goes through it: a query is listed and admitted ([`running`]), then
//! planned and executed on the [`executor::QueryExecutor`] — threads of its
//! own, apart from the I/O runtime that serves ingest and health checks —
//! with a memory pool per query drawn from one budget ([`memory`]) and a
//! stop check in every plan node ([`guard`]), so a timeout, a cancel, a
//! client that leaves or shutdown end its work; while ingest is busy, the
//! same check paces query threads so they leave ingest its cores
//! ([`throttle`]). The first front end is
//! [`http`] on port 9900: `POST /api/v1/sql` (JSON, CSV or Arrow IPC),
//! `GET /api/v1/queries`, `DELETE /api/v1/queries/{id}`, `/metrics`; with
//! Prometheus's HTTP API, `/federate` and PromQL ([`promql`], checked
//! against Prometheus's own engine tests in `tests/promqltest.rs`).
//! [`remote_write`] sends the same series out to Prometheus remote-write
//! receivers, reading them through the PromQL sources every ten seconds.
//! [`ui`] serves the web UI at `/`, which reads these same APIs. [`pg`]
//! (Postgres wire, SCRAM-SHA-256) and [`flight_sql`] are the other front
//! ends; every listener is bound and guarded by `lumen_listen` (TLS and
//! people's tokens once configured).

#![forbid(unsafe_code)]

pub mod dict_group;
pub mod engine;
pub mod executor;
pub mod exposition;
pub mod flight_sql;
pub mod format;
pub mod functions;
pub mod guard;
pub mod http;
pub mod jaeger;
pub mod memory;
pub mod metrics;
pub mod pg;
pub mod prom_api;
pub mod promql;
pub mod remote_write;
pub mod running;
pub mod self_metrics;
pub mod settings;
pub mod table;
pub mod throttle;
pub mod ui;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

pub use engine::{QueryConfig, QueryEngine, QueryError, QueryResult};
pub use settings::QuerySettings;

/// How long shutdown waits for answers in progress and open connections.
/// Running queries are stopped at once, so answers go out quickly.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Listen(#[from] lumen_listen::AccessError),
    #[error("query HTTP server: {0}")]
    Serve(std::io::Error),
}

/// The query HTTP server, bound and ready to run.
pub struct QueryServer {
    listener: lumen_listen::SecureListener,
    access: Arc<lumen_listen::Access>,
    engine: QueryEngine,
    /// More of the API served on the same port (the rule engine's).
    extra: Option<axum::Router>,
}

impl QueryServer {
    /// Binds `addr`; every request must then satisfy `access` (people's
    /// tokens once credentials are configured).
    pub async fn bind(
        addr: SocketAddr,
        engine: QueryEngine,
        access: &Arc<lumen_listen::Access>,
    ) -> Result<Self, ServeError> {
        let listener = access
            .bind("query HTTP", addr, lumen_listen::ALPN_HTTP)
            .await?;
        Ok(QueryServer {
            listener,
            access: access.clone(),
            engine,
            extra: None,
        })
    }

    /// Serves `routes` too, beside the query API.
    pub fn with_routes(mut self, routes: axum::Router) -> Self {
        self.extra = Some(match self.extra.take() {
            Some(r) => r.merge(routes),
            None => routes,
        });
        self
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        Some(self.listener.local_addr())
    }

    /// Serves until `shutdown` resolves; then stops every running query
    /// (they are reads: nothing is lost) and closes connections.
    pub fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> lumen_core::BoxFuture<'static, Result<(), ServeError>> {
        self.run_until(Box::pin(shutdown))
    }

    // Not generic, so the state machine it boxes is compiled here, once
    // (see `lumen_core::BoxFuture`).
    fn run_until(
        self,
        shutdown: lumen_core::BoxFuture<'static, ()>,
    ) -> lumen_core::BoxFuture<'static, Result<(), ServeError>> {
        Box::pin(self.serve(shutdown))
    }

    async fn serve(self, shutdown: lumen_core::BoxFuture<'static, ()>) -> Result<(), ServeError> {
        let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
        let engine = self.engine.clone();
        let mut router = http::router(self.engine);
        if let Some(extra) = self.extra {
            router = router.merge(extra);
        }
        let app = self
            .access
            .guard_http(router, lumen_listen::Grant::Operate)
            .into_make_service_with_connect_info::<lumen_listen::Peer>();
        let serve = axum::serve(self.listener, app).with_graceful_shutdown(async move {
            shutdown.await;
            engine.shutdown();
            let _ = stopping_tx.send(true);
        });
        // A client that keeps an idle HTTP/2 connection open must not hold
        // shutdown forever.
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
