//! The HTTP front end on port 9900.
//!
//! - `POST /api/v1/sql`: SQL in the body, the answer in the format `Accept` asks for.
//! - `GET /api/v1/queries`: queries in flight; `DELETE /api/v1/queries/{id}` cancels one.
//! - `GET /metrics`: Istio's metrics and the query service's own; `GET /ready`.
//! - `GET /`: the web UI ([`crate::ui`]).
//! - Prometheus's HTTP API ([`crate::prom_api`]) and Jaeger's ([`crate::jaeger`]).
//!
//! Errors are JSON in Prometheus's shape (`status`, `errorType`, `error`)
//! with Prometheus's status codes: 400 bad SQL, 422 a limit stopped it,
//! 503 timeout or shutting down, 499 cancelled, 429/503 with `Retry-After`
//! when no turn is free.

use std::net::SocketAddr;
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};

use crate::engine::{QueryEngine, QueryError};
use crate::exposition::Exposition;
use crate::format::Format;
use crate::guard::StopReason;

pub fn router(engine: QueryEngine) -> Router {
    Router::new()
        .route("/api/v1/sql", post(sql))
        .route("/api/v1/queries", get(queries))
        .route("/api/v1/queries/{id}", delete(cancel))
        .route("/metrics", get(metrics))
        .route("/ready", get(|| async { "ready\n" }))
        .merge(crate::prom_api::router())
        .merge(crate::jaeger::router())
        .merge(crate::ui::router())
        .with_state(engine)
}

pub(crate) fn error(status: StatusCode, kind: &str, message: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "status": "error", "errorType": kind, "error": message }).to_string(),
    )
        .into_response()
}

/// The answer to a failed query: status, Prometheus error type, and
/// `Retry-After` where retrying later is the remedy.
pub(crate) fn query_error(e: QueryError) -> Response {
    let (status, kind, retry) = match &e {
        QueryError::ReadOnly(_) => (StatusCode::BAD_REQUEST, "read_only", None),
        QueryError::Sql(_) => (StatusCode::BAD_REQUEST, "bad_data", None),
        QueryError::Timeout(_) | QueryError::Stopped(StopReason::Timeout) => {
            (StatusCode::SERVICE_UNAVAILABLE, "timeout", None)
        }
        QueryError::MemoryLimit(_) | QueryError::TooManyRows(_) | QueryError::TooLarge(_) => {
            (StatusCode::UNPROCESSABLE_ENTITY, "execution", None)
        }
        QueryError::Stopped(StopReason::Cancelled | StopReason::ClientGone) => (
            // What Prometheus answers for a cancelled query (nginx's
            // "client closed request").
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "canceled",
            None,
        ),
        QueryError::Stopped(StopReason::Shutdown) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            Some(std::time::Duration::from_secs(5)),
        ),
        QueryError::Busy(b) => (
            match b {
                crate::engine::Busy::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
                crate::engine::Busy::QueueTimeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
            "unavailable",
            Some(b.retry_after()),
        ),
        QueryError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None),
    };
    let mut response = error(status, kind, e.to_string());
    if let Some(after) = retry
        && let Ok(v) = HeaderValue::from_str(&after.as_secs().max(1).to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

/// Runs the SQL in the request body; answers in the format `Accept` asks for.
async fn sql(
    State(engine): State<QueryEngine>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let query = body.trim();
    if query.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_data",
            "empty query: send the SQL as the request body".into(),
        );
    }
    let format = Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let started = Instant::now();
    let origin = match query_label(&headers) {
        Ok(Some(label)) => format!("http {peer} {label}"),
        Ok(None) => format!("http {peer}"),
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_data", e),
    };
    // If the client disconnects, axum drops this future, and with it the
    // query's: that stops the query.
    let result = match engine.execute(query, &origin).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "query failed");
            return query_error(e);
        }
    };
    let rows = result.num_rows();
    // Encoding a large result takes a while; off the async workers it does
    // not hold up OTLP ingest sharing the runtime.
    let encoded = tokio::task::spawn_blocking(move || format.encode(&result))
        .await
        .unwrap_or_else(|e| {
            Err(arrow::error::ArrowError::ComputeError(format!(
                "encoder panicked: {e}"
            )))
        });
    match encoded {
        Ok(bytes) => {
            tracing::debug!(
                rows,
                ms = started.elapsed().as_millis() as u64,
                "query answered"
            );
            (
                [
                    (header::CONTENT_TYPE, format.content_type().to_string()),
                    (
                        header::HeaderName::from_static("x-lumen-rows"),
                        rows.to_string(),
                    ),
                ],
                bytes,
            )
                .into_response()
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot encode result: {e}"),
        ),
    }
}

/// `X-Lumen-Query-Label`: a client's name for its query, shown in the
/// running queries' `origin`, so the client can find and cancel it there
/// (the web UI's SQL console does).
fn query_label(headers: &HeaderMap) -> Result<Option<&str>, String> {
    let Some(v) = headers.get("x-lumen-query-label") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(s)
            if !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            Ok(Some(s))
        }
        _ => Err("X-Lumen-Query-Label: 1 to 64 of A-Z, a-z, 0-9, '-' and '_'".into()),
    }
}

async fn queries(State(engine): State<QueryEngine>) -> Response {
    axum::Json(serde_json::json!({ "queries": engine.queries() })).into_response()
}

async fn cancel(State(engine): State<QueryEngine>, Path(id): Path<String>) -> Response {
    let Ok(n) = id.parse::<u64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_data",
            format!("`{id}` is not a query id (see GET /api/v1/queries)"),
        );
    };
    if engine.cancel(n) {
        axum::Json(serde_json::json!({ "status": "success", "cancelled": id })).into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no query {id} is running (it may have finished)"),
        )
    }
}

/// Istio's metrics from rollups and the query service's own; when the
/// store cannot be read, the service's own metrics still go out, with a
/// log line, so a scraper sees the service is up.
async fn metrics(State(engine): State<QueryEngine>, headers: HeaderMap) -> Response {
    let format = Exposition::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    match crate::exposition::render(&engine, format).await {
        Ok(body) => ([(header::CONTENT_TYPE, format.content_type())], body).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read rollups for /metrics; serving the query service's own metrics only");
            let own = crate::exposition::own_only(&engine, format);
            ([(header::CONTENT_TYPE, format.content_type())], own).into_response()
        }
    }
}
