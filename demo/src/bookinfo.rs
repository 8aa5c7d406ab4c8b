//! A small Bookinfo, modelled on Istio's sample: `productpage` calls
//! `details` and `reviews`; `reviews` v2 and v3 call `ratings`. Each app is a
//! plain HTTP server that reaches other services only through its sidecar's
//! outbound listener, forwarding the trace context it received, as the
//! real Bookinfo apps do.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The port Bookinfo services are addressed on (`reviews:9080`).
pub const PORT: u16 = 9080;

/// Which Bookinfo app, and which version of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum App {
    ProductPage,
    Details,
    Reviews(u8),
    Ratings,
}

impl App {
    pub fn service(self) -> &'static str {
        match self {
            App::ProductPage => "productpage",
            App::Details => "details",
            App::Reviews(_) => "reviews",
            App::Ratings => "ratings",
        }
    }

    pub fn version(self) -> String {
        match self {
            App::Reviews(v) => format!("v{v}"),
            _ => "v1".to_string(),
        }
    }

    /// Every app instance of the sample, in start order.
    pub fn all() -> [App; 6] {
        [
            App::ProductPage,
            App::Details,
            App::Reviews(1),
            App::Reviews(2),
            App::Reviews(3),
            App::Ratings,
        ]
    }
}

/// Share of `ratings` calls answered with 503, so error-rate queries have
/// something to find.
pub const RATINGS_FAILURE_RATE: f64 = 0.02;

struct AppState {
    app: App,
    outbound: SocketAddr,
    client: Client<HttpConnector, Empty<Bytes>>,
}

/// Serves one app on `listener` until `shutdown` turns true. Its calls to
/// other services go to `outbound`, its sidecar's outbound listener.
pub async fn serve(
    app: App,
    listener: TcpListener,
    outbound: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build(connector);
    let state = Arc::new(AppState {
        app,
        outbound,
        client,
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let svc = service_fn(move |req| handle(state.clone(), req));
        let conn = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned(),
        );
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), graceful.shutdown()).await;
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", v.to_string())
}

async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let trace = req.headers().get("traceparent").cloned();
    if path == "/health" {
        return Ok(reply(StatusCode::OK, "text/plain", "ok\n"));
    }
    // The book id: `?id=N` on the product page, the last path segment elsewhere.
    let id = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("id=")))
        .or_else(|| path.rsplit('/').next())
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(0);
    let resp = match (state.app, path.as_str()) {
        (App::ProductPage, "/productpage") => {
            let (details_path, reviews_path) = (format!("/details/{id}"), format!("/reviews/{id}"));
            let (details, reviews) = tokio::join!(
                call(&state, "details", &details_path, trace.as_ref()),
                call(&state, "reviews", &reviews_path, trace.as_ref()),
            );
            let (status, page) = match (details, reviews) {
                (Ok(d), Ok(r)) => (
                    StatusCode::OK,
                    format!(
                        "<html><body><h1>The Comedy of Errors</h1><pre>{d}</pre><pre>{r}</pre></body></html>\n"
                    ),
                ),
                (d, r) => (
                    StatusCode::OK,
                    format!(
                        "<html><body><h1>The Comedy of Errors</h1><p>details: {}</p><p>reviews: {}</p></body></html>\n",
                        d.unwrap_or_else(|e| e),
                        r.unwrap_or_else(|e| e)
                    ),
                ),
            };
            reply(status, "text/html; charset=utf-8", page)
        }
        (App::Details, p) if p.starts_with("/details/") => json(
            StatusCode::OK,
            serde_json::json!({
                "id": id, "author": "William Shakespeare", "year": 1595, "type": "paperback",
                "pages": 200, "publisher": "PublisherA", "language": "English",
                "ISBN-10": "1234567890", "ISBN-13": "123-1234567890"
            }),
        ),
        (App::Reviews(v), p) if p.starts_with("/reviews/") => {
            let mut reviews = serde_json::json!({
                "id": id, "podname": format!("reviews-v{v}"),
                "reviews": [
                    {"reviewer": "Reviewer1", "text": "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"},
                    {"reviewer": "Reviewer2", "text": "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare."}
                ]
            });
            if v >= 2 {
                let color = if v == 2 { "black" } else { "red" };
                match call(&state, "ratings", &format!("/ratings/{id}"), trace.as_ref()).await {
                    Ok(r) => {
                        reviews["ratings"] =
                            serde_json::from_str(&r).unwrap_or(serde_json::Value::Null);
                        reviews["color"] = color.into();
                    }
                    Err(e) => reviews["ratings"] = serde_json::json!({ "error": e }),
                }
            }
            json(StatusCode::OK, reviews)
        }
        (App::Ratings, p) if p.starts_with("/ratings/") => {
            if rand::rng().random_bool(RATINGS_FAILURE_RATE) {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"error": "ratings service is overloaded"}),
                )
            } else {
                json(
                    StatusCode::OK,
                    serde_json::json!({"id": id, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}),
                )
            }
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("no such page: {path}")}),
        ),
    };
    Ok(resp)
}

/// Calls `service` through the sidecar; `Err` holds a message for the page.
async fn call(
    state: &AppState,
    service: &str,
    path: &str,
    trace: Option<&header::HeaderValue>,
) -> Result<String, String> {
    let mut req = Request::get(format!("http://{}{path}", state.outbound))
        .header(header::HOST, format!("{service}:{PORT}"))
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    if let Some(t) = trace {
        req.headers_mut().insert("traceparent", t.clone());
    }
    let resp = tokio::time::timeout(Duration::from_secs(5), state.client.request(req))
        .await
        .map_err(|_| format!("{service} timed out"))?
        .map_err(|e| format!("{service} unreachable: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{service}: {e}"))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() {
        Ok(text)
    } else {
        Err(format!("{service} answered {status}"))
    }
}
