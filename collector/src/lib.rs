//! The Lumen collector: where request records, spans, metrics and logs are
//! kept.
//!
//! Data flows through one module per stage:
//!
//! 1. [`ingest`] — OTLP over gRPC (4317) and HTTP (4318) in, every signal,
//!    on listeners `lumen_listen` secures (TLS, tokens, workload
//!    certificates); payloads are decoded, held to their shape
//!    ([`ingest::shape`]: items, attributes, sizes), validated and turned
//!    into Arrow batches (Lumen
//!    proxy spans → `requests`, other spans → `spans`, metric data points →
//!    `metrics`, log records → `logs`; Arrow Flight from proxies →
//!    `requests`; Prometheus remote write, mounted on the query port, →
//!    `metrics` through the same conversion).
//! 2. [`wal`] — batches are appended to the write-ahead log and fsynced
//!    (group commit) before the client is acknowledged.
//! 3. [`buffer`] — acknowledged rows sit in the hot buffer, queryable at once.
//! 4. [`persist`] — on size/time thresholds and on shutdown, hot rows become
//!    zstd Parquet files partitioned by table and hour; the WAL is then
//!    checkpointed and truncated.
//!
//! [`store::Store`] is the catalog of both hot rows and files; the query
//! service reads consistent snapshots of it.

#![forbid(unsafe_code)]

pub mod buffer;
pub mod compact;
pub mod dedup;
pub mod events;
pub mod export;
pub mod format;
pub mod health;
pub mod ingest;
pub mod live;
pub mod metrics;
pub mod persist;
#[cfg(test)]
mod persist_tests;
pub mod rollup;
pub mod storage;
pub mod store;
pub mod wal;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lumen_listen::{Grant, GrpcGuard, SecureListener};
use tokio::sync::watch;

pub use persist::FlushPolicy;
pub use store::{FileMeta, Store, TableSnapshot, TableStats};

/// Default cap on one OTLP payload, as the OpenTelemetry Collector's gRPC default.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 << 20;
/// How long shutdown waits for OTLP clients to finish and disconnect.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long shutdown waits for export endpoints to take what is queued.
pub const EXPORT_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a stop waits for compaction and deletions to finish.
const HOUSEKEEPING_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);
/// Default cap on hot rows' memory: four flushes' worth.
pub const DEFAULT_MAX_HOT_BYTES: usize = 1 << 30;
/// Default cap on payloads in progress: with 4 MiB payloads, 256 MiB raw.
pub const DEFAULT_MAX_INFLIGHT_PAYLOADS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error(transparent)]
    Listen(#[from] lumen_listen::AccessError),
    #[error("data directory {path}: {message}")]
    DataDir { path: PathBuf, message: String },
    #[error(transparent)]
    Format(#[from] format::FormatError),
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    #[error(transparent)]
    Persist(#[from] persist::PersistError),
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error("OTLP/gRPC server: {0}")]
    Grpc(String),
}

#[derive(Debug, Clone)]
pub struct CollectorConfig {
    pub data_dir: PathBuf,
    /// OTLP/gRPC listener (default port 4317).
    pub otlp_grpc: Option<SocketAddr>,
    /// OTLP/HTTP listener (default port 4318).
    pub otlp_http: Option<SocketAddr>,
    pub max_request_bytes: usize,
    /// Past this much memory of hot rows (flushes failing or behind),
    /// payloads are refused as unavailable until flushes catch up.
    pub max_hot_bytes: usize,
    /// OTLP payloads read, decoded or waiting for the WAL at once; more wait
    /// briefly, then are refused as unavailable.
    pub max_inflight_payloads: usize,
    pub flush: FlushPolicy,
    /// When small files are merged.
    pub compaction: compact::CompactionPolicy,
    /// How long each table's rows are kept.
    pub retention: compact::Retention,
    /// OTLP endpoints what is stored is forwarded to.
    pub export: Vec<export::ExportTarget>,
    /// Distinct values each rollup label keeps per hour; the rest are
    /// counted under `other`.
    pub rollup_max_values: usize,
    /// Where Parquet files go: `<data>/tables`, or a store shared by
    /// several collectors.
    pub storage: storage::StorageConfig,
    /// Items per payload, attributes per item and their sizes.
    pub shape: ingest::shape::Shape,
    /// Who may send telemetry: TLS and the credentials both OTLP
    /// listeners require (none: loopback only).
    pub access: Arc<lumen_listen::Access>,
}

impl CollectorConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        CollectorConfig {
            data_dir: data_dir.into(),
            otlp_grpc: Some(SocketAddr::from(([127, 0, 0, 1], 4317))),
            otlp_http: Some(SocketAddr::from(([127, 0, 0, 1], 4318))),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_hot_bytes: DEFAULT_MAX_HOT_BYTES,
            max_inflight_payloads: DEFAULT_MAX_INFLIGHT_PAYLOADS,
            flush: FlushPolicy::default(),
            compaction: compact::CompactionPolicy::default(),
            retention: compact::Retention::default(),
            export: Vec::new(),
            rollup_max_values: rollup::DEFAULT_MAX_VALUES,
            storage: storage::StorageConfig::default(),
            shape: ingest::shape::Shape::default(),
            access: lumen_listen::Access::open(),
        }
    }
}

/// An opened collector: WAL replayed, files loaded, listeners bound.
pub struct Collector {
    config: CollectorConfig,
    store: Arc<Store>,
    ingest: ingest::Ingest,
    persister: persist::Persister,
    housekeeper: compact::Housekeeper,
    /// Turns true to stop the export tasks (after ingest has stopped).
    export_stop: watch::Sender<bool>,
    export_tasks: Vec<tokio::task::JoinHandle<()>>,
    wal_thread: std::thread::JoinHandle<()>,
    grpc: Option<SecureListener>,
    http: Option<SecureListener>,
    replayed: wal::Replayed,
}

async fn bind(
    access: &Arc<lumen_listen::Access>,
    what: &'static str,
    addr: Option<SocketAddr>,
    alpn: &[&[u8]],
) -> Result<Option<SecureListener>, CollectorError> {
    match addr {
        None => Ok(None),
        Some(addr) => Ok(Some(access.bind(what, addr, alpn).await?)),
    }
}

/// A store shared by collectors as a query service alone reads it: every
/// collector's files, listed every refresh; no ingest, no WAL, no writes.
pub struct StoreReader {
    store: Arc<Store>,
    storage: Arc<storage::Storage>,
    refresh: std::time::Duration,
}

impl StoreReader {
    /// Opens the store and lists every collector's files once.
    pub fn open(
        config: &storage::StorageConfig,
    ) -> lumen_core::BoxFuture<'_, Result<StoreReader, CollectorError>> {
        Box::pin(Self::open_inner(config))
    }

    async fn open_inner(config: &storage::StorageConfig) -> Result<StoreReader, CollectorError> {
        let storage = Arc::new(storage::Storage::reader(config)?);
        let store = Arc::new(Store::new());
        store.set_storage(storage.clone());
        let (files, unreadable) = persist::refresh_others(&storage, &store).await?;
        for (location, why) in unreadable {
            tracing::warn!(file = %storage.url_of(&location), error = %why, "leaving out a file that cannot be read");
        }
        tracing::info!(
            files,
            "reading every collector's files in {}",
            storage.url_of(storage.root())
        );
        Ok(StoreReader {
            store,
            storage,
            refresh: config.refresh,
        })
    }

    /// The catalog the query service reads.
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Lists the collectors' files every refresh until `shutdown` resolves.
    pub fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> lumen_core::BoxFuture<'static, ()> {
        self.run_until(Box::pin(shutdown))
    }

    // Not generic, so the state machine it boxes is compiled here, once
    // (see `lumen_core::BoxFuture`).
    fn run_until(
        self,
        shutdown: lumen_core::BoxFuture<'static, ()>,
    ) -> lumen_core::BoxFuture<'static, ()> {
        Box::pin(self.follow(shutdown))
    }

    async fn follow(self, shutdown: lumen_core::BoxFuture<'static, ()>) {
        let (stop, stop_rx) = watch::channel(false);
        let follow = tokio::spawn(persist::follow_others(
            self.storage,
            self.store,
            self.refresh,
            stop_rx,
        ));
        shutdown.await;
        let _ = stop.send(true);
        follow.abort();
    }
}

/// `<data>/wal`.
pub fn wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wal")
}

/// The data directory's claim on its prefix of a shared store: made once,
/// kept with the WAL whose files the prefix holds.
fn claim_token(data_dir: &Path) -> Result<String, CollectorError> {
    let path = data_dir.join("store-claim");
    let err = |e: std::io::Error| CollectorError::DataDir {
        path: path.clone(),
        message: e.to_string(),
    };
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_string()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let token = format!("{:032x}", rand::random::<u128>());
    std::fs::write(&path, &token)
        .and_then(|()| std::fs::File::open(&path)?.sync_all())
        .map_err(err)?;
    Ok(token)
}

impl Collector {
    /// Opens the store in `config.data_dir` — loading Parquet files and
    /// replaying the WAL — and binds the OTLP listeners.
    pub fn open(
        config: CollectorConfig,
    ) -> lumen_core::BoxFuture<'static, Result<Collector, CollectorError>> {
        Box::pin(Self::open_inner(config))
    }

    async fn open_inner(config: CollectorConfig) -> Result<Collector, CollectorError> {
        let data = config.data_dir.clone();
        std::fs::create_dir_all(&data).map_err(|e| CollectorError::DataDir {
            path: data.clone(),
            message: e.to_string(),
        })?;
        // A store that cannot be opened is a config error: before binding.
        let storage = Arc::new(storage::Storage::open(&config.storage, &data)?);
        let grpc = bind(
            &config.access,
            "OTLP/gRPC",
            config.otlp_grpc,
            lumen_listen::ALPN_GRPC,
        )
        .await?;
        let http = bind(
            &config.access,
            "OTLP/HTTP",
            config.otlp_http,
            lumen_listen::ALPN_HTTP,
        )
        .await?;
        let store = Arc::new(Store::new());
        store.set_storage(storage.clone());
        // Before the WAL replays into it, so replayed rows fold the same way.
        store.set_rollup_max_values(config.rollup_max_values);
        let checkpoint = {
            let dir = data.clone();
            tokio::task::spawn_blocking(move || {
                format::check(&dir)?;
                let wal_dir = wal_dir(&dir);
                std::fs::create_dir_all(&wal_dir).map_err(|e| CollectorError::DataDir {
                    path: wal_dir.clone(),
                    message: e.to_string(),
                })?;
                Ok::<_, CollectorError>(wal::read_checkpoint(&wal_dir)?)
            })
            .await
            .map_err(|e| CollectorError::DataDir {
                path: data.clone(),
                message: e.to_string(),
            })??
        };
        store.set_checkpoint(checkpoint);
        if storage.is_shared() {
            let token = claim_token(&data)?;
            storage.claim(&token).await?;
        }
        // Files first: those of an unfinished flush go before the WAL
        // replays their rows.
        let files = persist::load_files(&storage, checkpoint).await?;
        let (wal, wal_thread, replayed) = {
            let store = store.clone();
            let dir = data.clone();
            tokio::task::spawn_blocking(move || {
                Ok::<_, CollectorError>(wal::open(&wal_dir(&dir), store)?)
            })
            .await
            .map_err(|e| CollectorError::DataDir {
                path: data.clone(),
                message: e.to_string(),
            })??
        };
        let file_count = files.len();
        if storage.is_shared() {
            store.live_whole_from(i64::MAX);
        } else if file_count > 0 {
            store.live_whole_from(chrono::Utc::now().timestamp() + 1);
        }
        store.add_files(files);
        if storage.is_shared() {
            match persist::refresh_others(&storage, &store).await {
                Ok((n, _)) => tracing::info!(
                    files = n,
                    "reading other collectors' files in {}",
                    storage.url_of(storage.root())
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list other collectors' files yet")
                }
            }
        }
        if replayed.rows > 0 || file_count > 0 {
            tracing::info!(
                files = file_count,
                wal_segments = replayed.segments,
                wal_rows = replayed.rows,
                "opened store in {} (WAL in {})",
                storage.url_of(storage.root()),
                data.display()
            );
        }
        let mut ingest = ingest::Ingest::new(
            wal.clone(),
            store.clone(),
            ingest::Limits {
                max_request_bytes: config.max_request_bytes,
                max_hot_bytes: config.max_hot_bytes,
                max_inflight_payloads: config.max_inflight_payloads,
                shape: config.shape,
            },
        );
        let persister = persist::Persister {
            storage: storage.clone(),
            orphans: Arc::default(),
            wal_dir: wal_dir(&data),
            wal,
            store: store.clone(),
            running: Arc::default(),
        };
        let (export_stop, export_stop_rx) = watch::channel(false);
        let mut export_tasks = Vec::new();
        if !config.export.is_empty() {
            let (fanout, tasks) =
                export::Fanout::start(config.export.clone(), store.clone(), export_stop_rx);
            for t in &config.export {
                tracing::info!(endpoint = %t.endpoint, "forwarding traces, metrics and logs over OTLP");
            }
            ingest.set_fanout(fanout);
            export_tasks = tasks;
        }
        let mut housekeeper = compact::Housekeeper::new(storage.clone(), store.clone());
        housekeeper.compaction = config.compaction.clone();
        housekeeper.retention = config.retention.clone();
        Ok(Collector {
            config,
            store,
            ingest,
            persister,
            housekeeper,
            export_stop,
            export_tasks,
            wal_thread,
            grpc,
            http,
            replayed,
        })
    }

    /// Active while ingest decodes or stores payloads; background work on
    /// the same cores (queries) steps aside while it is.
    pub fn ingest_pressure(&self) -> lumen_core::load::Pressure {
        self.ingest.pressure().clone()
    }

    /// The catalog the query service reads.
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Appends batches made in this process, durably, as ingest does.
    pub fn writer(&self) -> wal::WalHandle {
        self.ingest.wal()
    }

    /// Rows recovered from the WAL when the collector opened.
    pub fn replayed_rows(&self) -> usize {
        self.replayed.rows
    }

    pub fn otlp_grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_ref().map(|l| l.local_addr())
    }

    pub fn otlp_http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|l| l.local_addr())
    }

    /// Compaction and retention, to run on demand (tests, admin actions)
    /// and for their counters.
    pub fn housekeeper(&self) -> compact::Housekeeper {
        self.housekeeper.clone()
    }

    /// A handle to flush on demand (tests, admin actions).
    pub fn persister(&self) -> persist::Persister {
        self.persister.clone()
    }

    /// Serves OTLP until `shutdown` resolves; then stops accepting, flushes
    /// the hot buffer to Parquet and closes the WAL.
    pub fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> lumen_core::BoxFuture<'static, Result<(), CollectorError>> {
        self.run_until(Box::pin(shutdown))
    }

    // Not generic, so the state machine it boxes is compiled here, once
    // (see `lumen_core::BoxFuture`).
    fn run_until(
        self,
        shutdown: lumen_core::BoxFuture<'static, ()>,
    ) -> lumen_core::BoxFuture<'static, Result<(), CollectorError>> {
        Box::pin(self.serve(shutdown))
    }

    async fn serve(
        self,
        shutdown: lumen_core::BoxFuture<'static, ()>,
    ) -> Result<(), CollectorError> {
        let Collector {
            config,
            store: _,
            ingest,
            persister,
            housekeeper,
            export_stop,
            export_tasks,
            wal_thread,
            grpc,
            http,
            replayed: _,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut servers = tokio::task::JoinSet::new();
        if let Some(listener) = grpc {
            let mut stop = stop_rx.clone();
            let traces = ingest::grpc::TraceServiceGrpc::new(ingest.clone());
            let metrics = ingest::grpc::MetricsServiceGrpc::new(ingest.clone());
            let logs = ingest::grpc::LogsServiceGrpc::new(ingest.clone());
            let flight = ingest::flight::service(ingest.clone());
            let guard = GrpcGuard::new(config.access.clone(), Grant::Ingest);
            servers.spawn(async move {
                tonic::transport::Server::builder()
                    .layer(guard)
                    .add_service(traces)
                    .add_service(metrics)
                    .add_service(logs)
                    .add_service(flight)
                    .serve_with_incoming_shutdown(listener.incoming(), async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await
                    .map_err(|e| CollectorError::Grpc(e.to_string()))
            });
        }
        if let Some(listener) = http {
            let mut stop = stop_rx.clone();
            let router = config
                .access
                .guard_http(ingest::http::router(ingest.clone()), Grant::Ingest)
                .into_make_service_with_connect_info::<lumen_listen::Peer>();
            servers.spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await
                    .map_err(|e| CollectorError::Grpc(e.to_string()))
            });
        }
        let (flush_stop_tx, flush_stop_rx) = watch::channel(false);
        let flusher = tokio::spawn(persister.clone().run(config.flush.clone(), flush_stop_rx));
        let housekeeping = tokio::spawn(housekeeper.run(stop_rx.clone()));
        let others = persister.storage.is_shared().then(|| {
            tokio::spawn(persist::follow_others(
                persister.storage.clone(),
                persister.store.clone(),
                config.storage.refresh,
                stop_rx.clone(),
            ))
        });

        shutdown.await;
        tracing::info!("collector shutting down: finishing requests, flushing to Parquet");
        let _ = stop_tx.send(true);
        let mut result = Ok(());
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(r) = servers.join_next().await {
                if let Ok(Err(e)) = r {
                    result = Err(e);
                }
            }
        })
        .await;
        if drained.is_err() {
            // A client that ignores GOAWAY (or is stopped) would hold the
            // shutdown forever.
            tracing::warn!("OTLP connections still open after {DRAIN_TIMEOUT:?}; closing them");
            servers.abort_all();
        }
        // Payloads still in progress may finish; new ones are refused.
        ingest.close();
        // Listing other collectors' files only serves queries, which stop.
        if let Some(others) = others {
            others.abort();
        }
        // A compaction in progress finishes (it is one partition), unless it
        // or deletions against a store that does not answer would hold the
        // final flush past a pod's grace; the next start finishes or undoes
        // what is cut short.
        let abort_housekeeping = housekeeping.abort_handle();
        if tokio::time::timeout(HOUSEKEEPING_DRAIN, housekeeping)
            .await
            .is_err()
        {
            tracing::warn!(
                "compaction still running after {HOUSEKEEPING_DRAIN:?}; stopping it (the next start finishes or undoes it)"
            );
            abort_housekeeping.abort();
        }
        let _ = flush_stop_tx.send(true);
        let _ = flusher.await;
        // Exporters try once more to send what they hold, then stop.
        let _ = export_stop.send(true);
        let aborts: Vec<_> = export_tasks.iter().map(|t| t.abort_handle()).collect();
        let exports = futures_util::future::join_all(export_tasks);
        if tokio::time::timeout(EXPORT_DRAIN, exports).await.is_err() {
            tracing::warn!(
                "export endpoints still not answering after {EXPORT_DRAIN:?}; their queued items are dropped"
            );
            for a in aborts {
                a.abort();
            }
        }
        // Whatever was acknowledged after the flush's rotation is in the WAL
        // and is replayed on the next start.
        persister.wal.close().await;
        drop(ingest);
        drop(persister);
        let _ = tokio::task::spawn_blocking(move || wal_thread.join()).await;
        result
    }
}
