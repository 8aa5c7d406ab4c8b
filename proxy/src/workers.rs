//! Thread per core. With N workers a proxy runs N threads, each with a
//! single-threaded runtime of its own: the thread `run` was called on is
//! worker 0 (it also keeps the config, the admin port and the exporter's
//! feed), and workers 1..N are started here. Every worker accepts on its
//! own socket bound to each listener's address with `SO_REUSEPORT`, so the
//! kernel spreads new connections over them, and keeps its own upstream
//! connections ([`crate::endpoint::EndpointState::pools`] holds one set of
//! pools per worker). A request then stays on the thread that accepted it,
//! from the first byte to the upstream and back: no task moves between
//! threads and no wake-up crosses one, which is what a work-stealing
//! runtime spends its time on at a sidecar's request rates. Envoy's workers
//! are built the same way (`--concurrency`, `reuse_port`).

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, oneshot, watch};

use crate::context::{Shared, Side};

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Which worker the calling thread is: 0 on the thread the proxy was run
/// on (and on any thread that is not a worker's).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// The listen backlog, as `tokio::net::TcpListener::bind` sets it.
const BACKLOG: u32 = 1024;

/// A listening socket at `addr` that other workers' sockets may share
/// (`SO_REUSEPORT`; `SO_REUSEADDR` as a plain bind sets it).
pub(crate) fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// One more socket on `first`'s address, for another worker. It leaves the
/// calling runtime: the worker registers it with its own.
pub(crate) fn sibling(first: &TcpListener) -> std::io::Result<std::net::TcpListener> {
    bind_shared(first.local_addr()?)?.into_std()
}

/// What a worker serves: its socket on each listener, with the side it
/// serves and the connection limit all of that listener's sockets share.
pub(crate) struct Assignment {
    pub listeners: Vec<(std::net::TcpListener, Side, Arc<Semaphore>)>,
}

/// Starts worker `index` on a thread of its own. It serves until `stop`
/// turns true and its connections have drained; `done` resolves then.
pub(crate) fn start(
    index: usize,
    work: Assignment,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    drain: Duration,
) -> std::io::Result<oneshot::Receiver<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done_tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("lumen-worker-{index}"))
        .spawn(move || {
            INDEX.with(|i| i.set(index));
            runtime.block_on(async move {
                let mut serving = tokio::task::JoinSet::new();
                for (listener, side, open) in work.listeners {
                    match TcpListener::from_std(listener) {
                        Ok(l) => {
                            serving.spawn(crate::listener::serve(
                                l,
                                shared.clone(),
                                side,
                                open,
                                stop.clone(),
                                drain,
                            ));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, worker = index, ?side, "worker cannot serve its socket")
                        }
                    }
                }
                while serving.join_next().await.is_some() {}
            });
            // Connections past the drain were given up on above; what is
            // left (idle pooled connections, timers) goes now.
            runtime.shutdown_timeout(Duration::from_millis(100));
            let _ = done_tx.send(());
        })?;
    Ok(done)
}
