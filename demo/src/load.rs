//! Steady traffic into the sample: a fixed request rate, whatever the
//! latency, with a cap on requests in flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{Semaphore, watch};

/// What the load generator sent and got back.
#[derive(Debug, Default)]
pub struct LoadStats {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

/// Sends `GET http://{authority}{path}` through `outbound` at `rps` until
/// `shutdown` turns true; waits for requests in flight before returning.
pub async fn run(
    outbound: SocketAddr,
    authority: String,
    path: String,
    rps: f64,
    stats: Arc<LoadStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    const MAX_IN_FLIGHT: u32 = 256;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build(connector);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rps.max(0.1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        n += 1;
        // Vary the book id so paths differ a little, as real traffic does.
        let uri = format!("http://{outbound}{path}{}", n % 5);
        let mut req = Request::get(uri).header(header::HOST, authority.as_str());
        // One visitor in ten is signed in as jason, whom the demo's
        // VirtualService sends to reviews v2 (as Istio's Bookinfo task does).
        if n.is_multiple_of(10) {
            req = req.header("end-user", "jason");
        }
        let req = req.body(Empty::new());
        let Ok(req) = req else { continue };
        let client = client.clone();
        let stats = stats.clone();
        stats.sent.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let ok = match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await
            {
                Ok(Ok(resp)) => {
                    let success = resp.status().is_success();
                    success && resp.into_body().collect().await.is_ok()
                }
                _ => false,
            };
            let counter = if ok { &stats.ok } else { &stats.failed };
            counter.fetch_add(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        in_flight.acquire_many(MAX_IN_FLIGHT),
    )
    .await;
}
