//! The HTTP front end on port 9900: `POST /api/v1/sql` and `/ready`.

use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::engine::{QueryEngine, QueryError};
use crate::format::Format;

pub fn router(engine: QueryEngine) -> Router {
    Router::new()
        .route("/api/v1/sql", post(sql))
        .route("/ready", get(|| async { "ready\n" }))
        .with_state(engine)
}

fn error(status: StatusCode, message: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "error": message }).to_string(),
    )
        .into_response()
}

/// Runs the SQL in the request body; answers in the format `Accept` asks for.
async fn sql(State(engine): State<QueryEngine>, headers: HeaderMap, body: String) -> Response {
    let query = body.trim();
    if query.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "empty query: send the SQL as the request body".into(),
        );
    }
    let format = Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let started = Instant::now();
    let result = match engine.execute(query).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "query failed");
            let status = match e {
                QueryError::ReadOnly(_)
                | QueryError::Sql(_)
                | QueryError::Timeout(_)
                | QueryError::TooManyRows(_)
                | QueryError::TooLarge(_) => StatusCode::BAD_REQUEST,
            };
            return error(status, e.to_string());
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
                "query done"
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
            format!("cannot encode result: {e}"),
        ),
    }
}
