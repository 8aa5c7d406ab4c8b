//! Thread per core. With N workers a proxy runs N threads, each with a
//! single-threaded runtime of its own: the thread `run` was called on is
//! worker 0 (it also follows the config, serves the admin port and pushes
//! the stats), and workers 1..N are started here. Every worker accepts on its
//! own socket bound to each listener's address with `SO_REUSEPORT`, so the
//! kernel spreads new connections over them, and keeps its own upstream
//! connections ([`crate::endpoint::EndpointState::pools`] holds one set of
//! pools per worker). A request then stays on the thread that accepted it,
//! from the first byte to the upstream and back: no task moves between
//! threads and no wake-up crosses one, which is what a work-stealing
//! runtime spends its time on at a sidecar's request rates. Envoy's workers
//! are built the same way (`--concurrency`, `reuse_port`).

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;

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

/// Starts worker `index` on a thread of its own, with a single-threaded
/// runtime in which `work` makes the future it runs (its listeners'
/// sockets are registered there). `done` resolves once that future has
/// finished: the worker has stopped serving and its connections drained.
pub(crate) fn start<F, Fut>(index: usize, work: F) -> std::io::Result<oneshot::Receiver<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done_tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("lumen-worker-{index}"))
        .spawn(move || {
            INDEX.with(|i| i.set(index));
            runtime.block_on(async move { work().await });
            // Connections past the drain were given up on already; what is
            // left (idle pooled connections, timers) goes now.
            runtime.shutdown_timeout(Duration::from_millis(100));
            let _ = done_tx.send(());
        })?;
    Ok(done)
}
