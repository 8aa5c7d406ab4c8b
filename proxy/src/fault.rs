//! Fault injection, as a route's `fault` says: a delay and an abort, each
//! for its share of requests, before the request goes anywhere.

use lumen_core::networking::Fault;

/// What the fault did to one request.
#[derive(Debug, Default)]
pub struct Injected {
    pub delayed: bool,
    /// `(HTTP status, gRPC status)` to answer with instead of forwarding.
    pub abort: Option<(u16, Option<i32>)>,
}

fn chosen(fraction: f64) -> bool {
    fraction >= 1.0 || (fraction > 0.0 && rand::random::<f64>() < fraction)
}

/// Waits the delay (when chosen), then says whether to abort.
pub async fn inject(fault: &Fault) -> Injected {
    let mut out = Injected::default();
    if let Some((delay, fraction)) = fault.delay
        && chosen(fraction)
    {
        tokio::time::sleep(delay).await;
        out.delayed = true;
    }
    if let Some((status, grpc, fraction)) = fault.abort
        && chosen(fraction)
    {
        out.abort = Some((status, grpc));
    }
    out
}
