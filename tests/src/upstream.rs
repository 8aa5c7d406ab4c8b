//! A test application behind a sidecar. It answers what the request asks
//! for, so a test knows exactly what the proxy should have recorded:
//!
//! - `/status/<code>/…` answers with that status (any other path: 200);
//! - `?delay_ms=N` waits N ms before answering;
//! - `/flaky/<key>/<n>/…` answers 503 to the first `n` requests for `key`,
//!   then 200 (a failure a retry gets past);
//! - `?size=N` answers with an N-byte body;
//! - `?stall_after=N` sends N body bytes, then nothing, never ending;
//! - the JSON body otherwise echoes the request's `traceparent`,
//!   `x-lumen-source` and `host` headers, the authority (`:authority` or
//!   `Host`), the path and query, every request header (`headers`), the
//!   request body's length and the app's name;
//! - an app whose name ends in `-failing` answers every request 503.
//!
//! [`requests_seen`] counts each app's requests.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Requests each app (by name) has answered.
static SEEN: LazyLock<Mutex<HashMap<&'static str, u64>>> = LazyLock::new(Default::default);

/// How many requests the app named `name` has answered so far.
pub fn requests_seen(name: &str) -> u64 {
    SEEN.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .copied()
        .unwrap_or(0)
}

/// Requests seen per `/flaky/<key>`.
static FLAKY: LazyLock<Mutex<HashMap<String, u32>>> = LazyLock::new(Default::default);

/// 503 while `/flaky/<key>/<n>` has been asked at most `n` times.
fn flaky(path: &str) -> Option<StatusCode> {
    let mut parts = path.strip_prefix("/flaky/")?.split('/');
    let key = parts.next()?.to_string();
    let n: u32 = parts.next()?.parse().ok()?;
    let mut seen = FLAKY.lock().unwrap_or_else(|p| p.into_inner());
    let count = seen.entry(key).or_insert(0);
    *count += 1;
    Some(if *count <= n {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    })
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn handle(
    name: &'static str,
    req: Request<Incoming>,
) -> Result<Response<AppBody>, Infallible> {
    *SEEN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(name)
        .or_default() += 1;
    let query = req.uri().query().unwrap_or("").to_string();
    let path = req.uri().path().to_string();
    // An app named `…-failing` answers every request with 503.
    if name.ends_with("-failing") {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"failing")).boxed());
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return Ok(resp);
    }
    let header = |h: &str| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut echo = serde_json::json!({
        "app": name,
        "path": path,
        "traceparent": header("traceparent"),
        "x-lumen-source": header("x-lumen-source"),
        "host": header("host"),
        "authority": req.uri().authority().map(|a| a.to_string()).or_else(|| header("host")),
        "query": req.uri().query(),
        "headers": req
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_string(), serde_json::Value::from(v.to_str().ok()?))))
            .collect::<serde_json::Map<_, _>>(),
    });
    // Drain the request body so its bytes are counted upstream.
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    echo["body_bytes"] = body.map_or(serde_json::Value::Null, |b| b.len().into());
    if let Some(ms) = query_param(&query, "delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = path
        .strip_prefix("/status/")
        .and_then(|rest| rest.split('/').next())
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .or_else(|| flaky(&path))
        .unwrap_or(StatusCode::OK);
    if let Some(n) = query_param(&query, "stall_after").and_then(|v| v.parse::<usize>().ok()) {
        let first = futures_util::stream::once(async move {
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(vec![b'x'; n])))
        });
        let body = http_body_util::StreamBody::new(first.chain(futures_util::stream::pending()));
        return Ok(Response::new(BodyExt::boxed(body)));
    }
    let body = match query_param(&query, "size").and_then(|v| v.parse::<usize>().ok()) {
        Some(n) => Bytes::from(vec![b'x'; n]),
        None => Bytes::from(echo.to_string()),
    };
    let mut resp = Response::new(Full::new(body).boxed());
    *resp.status_mut() = status;
    Ok(resp)
}

/// Starts the app on a free port; it serves until the test's runtime ends.
pub async fn start_app(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = listener.local_addr().expect("app address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(move |r| handle(name, r)))
                    .await;
            });
        }
    });
    addr
}

/// Starts a TCP app that echoes what it reads (a raw TCP service behind a
/// sidecar); it serves until the test's runtime ends.
pub async fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}
