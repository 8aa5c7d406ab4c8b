//! A small Bookinfo, modelled on Istio's sample: `productpage` calls
//! `details` and `reviews`; `reviews` v2 and v3 call `ratings`; `ratings`
//! v2 reads its stars from `mongodb` over TCP. Each app is a plain HTTP
//! server (`mongodb` a line-oriented TCP one) that reaches other services
//! only through its sidecar's outbound listener — TCP by `CONNECT` —
//! forwarding the trace context it received, as the real Bookinfo apps do. With [`crate::otel::AppTelemetry`], an app also
//! sends its own spans (between its sidecars' spans in one trace),
//! metrics and logs with the OpenTelemetry SDK.

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
use opentelemetry::Context;
use opentelemetry::logs::Severity;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::otel::AppTelemetry;

/// The port Bookinfo services are addressed on (`reviews:9080`).
pub const PORT: u16 = 9080;
/// The port of Bookinfo's ratings database (`mongodb:27017`).
pub const DB_PORT: u16 = 27017;

/// Which Bookinfo app, and which version of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum App {
    ProductPage,
    Details,
    Reviews(u8),
    Ratings(u8),
    /// Ratings v2's database: TCP, not HTTP.
    MongoDb,
}

impl App {
    pub fn service(self) -> &'static str {
        match self {
            App::ProductPage => "productpage",
            App::Details => "details",
            App::Reviews(_) => "reviews",
            App::Ratings(_) => "ratings",
            App::MongoDb => "mongodb",
        }
    }

    pub fn version(self) -> String {
        match self {
            App::Reviews(v) | App::Ratings(v) => format!("v{v}"),
            _ => "v1".to_string(),
        }
    }

    /// Every app instance of the sample, in start order.
    pub fn all() -> [App; 8] {
        [
            App::ProductPage,
            App::Details,
            App::Reviews(1),
            App::Reviews(2),
            App::Reviews(3),
            App::Ratings(1),
            App::Ratings(2),
            App::MongoDb,
        ]
    }
}

/// Share of `ratings` calls answered with 503, so error-rate queries have
/// something to find.
pub const RATINGS_FAILURE_RATE: f64 = 0.02;

/// Whether ratings is in an incident (answers every request 503).
pub type Incident = Arc<std::sync::atomic::AtomicBool>;

struct AppState {
    app: App,
    incident: Incident,
    outbound: SocketAddr,
    client: Client<HttpConnector, Empty<Bytes>>,
    telemetry: Option<Arc<AppTelemetry>>,
}

/// What a call made within a request carries along: the trace context to
/// forward (the app's span, or the caller's as received).
struct Within<'a> {
    trace: Option<&'a header::HeaderValue>,
    cx: &'a Context,
    /// Who is signed in; passed on to the services this request calls, as
    /// Istio's productpage and reviews do, so routes can match on it.
    end_user: Option<&'a header::HeaderValue>,
}

/// Serves one app on `listener` until `shutdown` turns true. Its calls to
/// other services go to `outbound`, its sidecar's outbound listener.
pub async fn serve(
    app: App,
    listener: TcpListener,
    outbound: SocketAddr,
    telemetry: Option<Arc<AppTelemetry>>,
    incident: Incident,
    mut shutdown: watch::Receiver<bool>,
) {
    if app == App::MongoDb {
        return serve_db(listener, shutdown).await;
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build(connector);
    let state = Arc::new(AppState {
        app,
        incident,
        outbound,
        client,
        telemetry,
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

/// The ratings database: each line asked is answered with one line of
/// JSON, until the caller closes.
async fn serve_db(listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(_query)) = lines.next_line().await {
                let doc = "{\"rating\":[{\"reviewer\":\"Reviewer1\",\"rating\":5},{\"reviewer\":\"Reviewer2\",\"rating\":4}]}\n";
                if write.write_all(doc.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Ratings v2's read of book `id` from `mongodb`: a `CONNECT` tunnel
/// through the sidecar (mutual TLS and a TCP row on each side), one
/// query line, one answer line.
async fn read_db(outbound: SocketAddr, id: u32) -> Result<serde_json::Value, String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let talk = async {
        let mut s = tokio::net::TcpStream::connect(outbound)
            .await
            .map_err(|e| format!("mongodb unreachable: {e}"))?;
        let authority = format!("mongodb:{DB_PORT}");
        s.write_all(
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| format!("mongodb: {e}"))?;
        // The proxy's answer head, byte by byte: the tunnel follows it.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
            let b = s.read_u8().await.map_err(|e| format!("mongodb: {e}"))?;
            head.push(b);
        }
        if !head.starts_with(b"HTTP/1.1 200") {
            let line = String::from_utf8_lossy(&head);
            return Err(format!("mongodb: {}", line.lines().next().unwrap_or("")));
        }
        s.write_all(format!("{{\"find\":\"ratings\",\"id\":{id}}}\n").as_bytes())
            .await
            .map_err(|e| format!("mongodb: {e}"))?;
        let mut answer = String::new();
        BufReader::new(&mut s)
            .read_line(&mut answer)
            .await
            .map_err(|e| format!("mongodb: {e}"))?;
        let _ = s.shutdown().await;
        serde_json::from_str(&answer).map_err(|e| format!("mongodb answered {answer:?}: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(2), talk)
        .await
        .map_err(|_| "mongodb timed out".to_string())?
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
    let end_user = req.headers().get("end-user").cloned();
    if path == "/health" {
        return Ok(reply(StatusCode::OK, "text/plain", "ok\n"));
    }
    let started = std::time::Instant::now();
    let route = route_of(state.app, &path);
    let cx = match &state.telemetry {
        Some(t) => t.server_span(req.headers(), req.method().as_str(), route),
        None => Context::new(),
    };
    let within = Within {
        trace: trace.as_ref(),
        cx: &cx,
        end_user: end_user.as_ref(),
    };
    let (resp, error) = answer(&state, &within, &path, req.uri().query()).await;
    if let Some(t) = &state.telemetry {
        let status = resp.status().as_u16();
        t.end(&cx, status, error.as_deref());
        t.served(route, status, started);
    }
    Ok(resp)
}

/// The route a path is served by, for span names and metrics.
fn route_of(app: App, path: &str) -> &'static str {
    match app {
        App::ProductPage if path == "/productpage" => "/productpage",
        App::Details if path.starts_with("/details/") => "/details/{id}",
        App::Reviews(_) if path.starts_with("/reviews/") => "/reviews/{id}",
        App::Ratings(_) if path.starts_with("/ratings/") => "/ratings/{id}",
        _ => "unknown",
    }
}

/// The app's answer, and what went wrong serving it (for its span).
async fn answer(
    state: &AppState,
    within: &Within<'_>,
    path: &str,
    query: Option<&str>,
) -> (Response<Full<Bytes>>, Option<String>) {
    let mut error = None;
    // The book id: `?id=N` on the product page, the last path segment elsewhere.
    let id = query
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("id=")))
        .or_else(|| path.rsplit('/').next())
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(0);
    let resp = match (state.app, path) {
        (App::ProductPage, "/productpage") => {
            let (details_path, reviews_path) = (format!("/details/{id}"), format!("/reviews/{id}"));
            let (details, reviews) = tokio::join!(
                call(state, within, "details", &details_path),
                call(state, within, "reviews", &reviews_path),
            );
            let (status, page) = match (details, reviews) {
                (Ok(d), Ok(r)) => (
                    StatusCode::OK,
                    format!(
                        "<html><body><h1>The Comedy of Errors</h1><pre>{d}</pre><pre>{r}</pre></body></html>\n"
                    ),
                ),
                (d, r) => {
                    let failed = [&d, &r]
                        .into_iter()
                        .filter_map(|x| x.as_ref().err().cloned())
                        .collect::<Vec<_>>()
                        .join("; ");
                    log(
                        state,
                        within,
                        Severity::Error,
                        "a product page part is unavailable",
                        failed,
                    );
                    (
                        StatusCode::OK,
                        format!(
                            "<html><body><h1>The Comedy of Errors</h1><p>details: {}</p><p>reviews: {}</p></body></html>\n",
                            d.unwrap_or_else(|e| e),
                            r.unwrap_or_else(|e| e)
                        ),
                    )
                }
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
                match call(state, within, "ratings", &format!("/ratings/{id}")).await {
                    Ok(r) => {
                        reviews["ratings"] =
                            serde_json::from_str(&r).unwrap_or(serde_json::Value::Null);
                        reviews["color"] = color.into();
                    }
                    Err(e) => {
                        log(
                            state,
                            within,
                            Severity::Error,
                            "ratings unavailable; reviews shown without stars",
                            e.clone(),
                        );
                        reviews["ratings"] = serde_json::json!({ "error": e });
                    }
                }
            }
            json(StatusCode::OK, reviews)
        }
        (App::Ratings(v), p) if p.starts_with("/ratings/") => {
            if state.incident.load(std::sync::atomic::Ordering::Relaxed)
                || rand::rng().random_bool(RATINGS_FAILURE_RATE)
            {
                error = Some("overloaded".to_string());
                log(
                    state,
                    within,
                    Severity::Warn,
                    "ratings overloaded; request shed",
                    format!("book {id}"),
                );
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"error": "ratings service is overloaded"}),
                )
            } else if v == 2 {
                // v2 keeps its stars in the database.
                match read_db(state.outbound, id).await {
                    Ok(doc) => {
                        let mut ratings = serde_json::Map::new();
                        for r in doc["rating"].as_array().into_iter().flatten() {
                            if let Some(who) = r["reviewer"].as_str() {
                                ratings.insert(who.to_string(), r["rating"].clone());
                            }
                        }
                        json(
                            StatusCode::OK,
                            serde_json::json!({"id": id, "ratings": ratings}),
                        )
                    }
                    Err(e) => {
                        error = Some(e.clone());
                        log(
                            state,
                            within,
                            Severity::Error,
                            "ratings database unavailable",
                            e,
                        );
                        json(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            serde_json::json!({"error": "could not connect to ratings database"}),
                        )
                    }
                }
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
    (resp, error)
}

fn log(
    state: &AppState,
    within: &Within<'_>,
    severity: Severity,
    text: &'static str,
    detail: String,
) {
    if let Some(t) = &state.telemetry {
        t.log(within.cx, severity, text, detail);
    }
}

/// Calls `service` through the sidecar; `Err` holds a message for the page.
async fn call(
    state: &AppState,
    within: &Within<'_>,
    service: &str,
    path: &str,
) -> Result<String, String> {
    let mut req = Request::get(format!("http://{}{path}", state.outbound))
        .header(header::HOST, format!("{service}:{PORT}"))
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    if let Some(u) = within.end_user {
        req.headers_mut().insert("end-user", u.clone());
    }
    let Some(t) = &state.telemetry else {
        if let Some(t) = within.trace {
            req.headers_mut().insert("traceparent", t.clone());
        }
        return send(state, service, req).await.map(|(_, body)| body);
    };
    let cx = t.client_span(within.cx, service, req.headers_mut());
    let result = send(state, service, req).await;
    match &result {
        Ok((status, _)) => t.end(&cx, *status, None),
        Err(e) => t.end(&cx, 0, Some(e)),
    }
    result.map(|(_, body)| body)
}

async fn send(
    state: &AppState,
    service: &str,
    req: Request<Empty<Bytes>>,
) -> Result<(u16, String), String> {
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
        Ok((status.as_u16(), text))
    } else {
        Err(format!("{service} answered {status}"))
    }
}
