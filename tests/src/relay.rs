//! A TCP relay between a client and a server that can lose the server's
//! answers, as a network that breaks after a request was delivered does:
//! the server has done the work, the client never hears of it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// A running relay; dropping it stops accepting.
pub struct Relay {
    pub addr: SocketAddr,
    lose: Arc<AtomicBool>,
    /// Cuts the connections whose answers are being lost.
    cut_now: Arc<Notify>,
    /// Connections cut after their answers were lost.
    cut: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays to `upstream`. While `lose_answers` is set, a new connection's
    /// server-to-client bytes are dropped until [`cut`](Self::cut_losing)
    /// closes it; cutting also clears the setting, so the client's retry
    /// gets through.
    pub async fn start(upstream: SocketAddr) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let lose = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicU64::new(0));
        let cut_now = Arc::new(Notify::new());
        let task = tokio::spawn({
            let (lose, cut, cut_now) = (lose.clone(), cut.clone(), cut_now.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let losing = lose.load(Ordering::SeqCst);
                    let (lose, cut, cut_now) = (lose.clone(), cut.clone(), cut_now.clone());
                    tokio::spawn(relay(client, server, losing, cut_now, lose, cut));
                }
            }
        });
        Ok(Relay {
            addr,
            lose,
            cut_now,
            cut,
            task,
        })
    }

    pub fn lose_answers(&self) {
        self.lose.store(true, Ordering::SeqCst);
    }

    /// Closes the connections whose answers were lost.
    pub fn cut_losing(&self) {
        self.cut_now.notify_waiters();
    }

    /// Connections cut so far.
    pub fn cut(&self) -> u64 {
        self.cut.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    losing: bool,
    cut_now: Arc<Notify>,
    lose: Arc<AtomicBool>,
    cut: Arc<AtomicU64>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if server_tx.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if !losing && client_tx.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let cutting = async {
        if losing {
            cut_now.notified().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let was_cut = tokio::select! {
        () = up => false,
        () = down => false,
        () = cutting => true,
    };
    if was_cut {
        lose.store(false, Ordering::SeqCst);
        cut.fetch_add(1, Ordering::SeqCst);
    }
    // Dropping both halves closes both connections.
}
