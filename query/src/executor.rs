//! The query executor: DataFusion plans run on threads of their own.
//!
//! DataFusion operators are CPU-bound and poll for long stretches. On the
//! runtime that serves OTLP ingest, the WAL, the HTTP front ends and health
//! checks, one heavy query would starve all of them (and the timers meant
//! to stop it). Queries therefore run on this separate runtime, whose
//! threads also run at a lower priority and pause while ingest is busy (see
//! [`crate::throttle`]), so that on a small machine ingest and health checks
//! get the CPU first. Front ends only await results.

use std::future::Future;

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

use crate::throttle::Throttle;

/// A dedicated multi-threaded tokio runtime for query execution.
#[derive(Debug)]
pub struct QueryExecutor {
    runtime: Option<Runtime>,
    handle: Handle,
    threads: usize,
}

impl QueryExecutor {
    /// Starts `threads` worker threads (at least one), named `lumen-query`.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            // Blocking threads read Parquet files (object_store's local
            // file system); a few per worker keep scans busy.
            .max_blocking_threads(threads * 4)
            .thread_name("lumen-query")
            .on_thread_start(lumen_core::thread::lower_priority)
            .on_thread_park(Throttle::parked)
            .on_thread_unpark(Throttle::unparked)
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        Ok(QueryExecutor {
            runtime: Some(runtime),
            handle,
            threads,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `fut` on the executor; the caller awaits the handle from any runtime.
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(fut)
    }
}

impl Drop for QueryExecutor {
    fn drop(&mut self) {
        // Never wait for query threads: a stopped query unwinds on its own,
        // and shutdown must not depend on it (this may run inside the I/O
        // runtime, where a blocking drop would panic).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Half the machine's cores, at least one: a single query leaves the rest
/// to ingest and to other queries.
pub fn default_parallelism() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() / 2)
        .unwrap_or(1)
        .max(1)
}
