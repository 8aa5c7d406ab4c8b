//! PromQL over the store, with Istio's standard metric names.
//!
//! An expression is parsed by `promql-parser` and evaluated step by step
//! ([`eval`]), as Prometheus's engine does; selectors read their samples
//! from [`istio::IstioSource`], which turns the `rollups` table into
//! Istio's series (`istio_requests_total`, …), and from
//! [`otlp::OtlpSource`], which turns apps' OTLP metrics into series by
//! their own names — both with SQL run through the query engine, so every
//! PromQL query is admitted, limited and cancellable like any other query. Evaluation itself runs on the query
//! executor, not on the I/O runtime.

pub mod eval;
pub mod functions;
pub mod istio;
pub mod otlp;
pub mod value;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::{QueryEngine, QueryError};
use eval::Evaluator;
use value::{Steps, Value};

#[derive(Debug, thiserror::Error)]
pub enum PromError {
    /// The request or expression is wrong (Prometheus's `bad_data`).
    #[error("{0}")]
    BadData(String),
    /// The expression is valid but cannot be computed on this data
    /// (Prometheus's `execution`).
    #[error("{0}")]
    Execution(String),
    #[error(transparent)]
    Query(#[from] QueryError),
}

/// Most steps a range query may have, as in Prometheus.
pub const MAX_STEPS: usize = 11_000;

/// One PromQL query: the expression and its steps.
#[derive(Debug, Clone)]
pub struct PromQuery {
    pub expr: String,
    pub steps: Steps,
    pub lookback: Duration,
    /// For the running-query list and logs.
    pub origin: String,
    /// Read raw `requests` rows instead of rollups.
    pub raw: bool,
    /// Shared by queries evaluated at the same instant (a rule group's
    /// rules): a selector read by one is not read again by the next.
    pub cache: Option<Arc<SelectCache>>,
}

/// Selector (and the metric name it names), time range, range window.
type SelectKey = (String, Option<String>, i64, i64, Option<i64>);

/// Selections already read, by selector, time range and range window.
#[derive(Debug, Default)]
pub struct SelectCache(Mutex<HashMap<SelectKey, Vec<value::RawSeries>>>);

impl SelectCache {
    /// Drops what was read of `metric` (and by selectors naming no metric):
    /// it has just been written.
    pub fn forget(&self, metric: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(_, name, ..), _| name.as_deref().is_some_and(|n| n != metric));
    }
}

/// A source that asks `inner` once per distinct selection of `cache`.
struct Cached<'a> {
    inner: &'a otlp::Sources,
    cache: Option<Arc<SelectCache>>,
}

#[async_trait::async_trait]
impl eval::Source for Cached<'_> {
    async fn select(
        &self,
        selector: &promql_parser::parser::VectorSelector,
        from: i64,
        to: i64,
        range: Option<i64>,
    ) -> Result<Vec<value::RawSeries>, PromError> {
        let Some(cache) = &self.cache else {
            return self.inner.select(selector, from, to, range).await;
        };
        let key = (selector.to_string(), selector.name.clone(), from, to, range);
        if let Some(hit) = cache.0.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(hit.clone());
        }
        let got = self.inner.select(selector, from, to, range).await?;
        cache
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, got.clone());
        Ok(got)
    }
}

/// Parses PromQL. The parser panics on some out-of-range numbers (`x[1e30]`);
/// that is a bad expression, not a crash.
pub fn parse(expr: &str) -> Result<promql_parser::parser::Expr, PromError> {
    match std::panic::catch_unwind(|| promql_parser::parser::parse(expr)) {
        Ok(Ok(e)) => Ok(e),
        Ok(Err(e)) => Err(PromError::BadData(e)),
        Err(_) => Err(PromError::BadData(format!(
            "cannot parse {expr:?}: a number in it is out of range"
        ))),
    }
}

/// Parses and evaluates `query` over the store.
pub fn evaluate(
    engine: &QueryEngine,
    query: PromQuery,
) -> lumen_core::BoxFuture<'_, Result<Value, PromError>> {
    Box::pin(evaluate_inner(engine, query))
}

async fn evaluate_inner(engine: &QueryEngine, query: PromQuery) -> Result<Value, PromError> {
    let expr = parse(&query.expr)
        .map_err(|e| PromError::BadData(format!("invalid parameter \"query\": {e}")))?;
    if query.steps.len() > MAX_STEPS {
        return Err(PromError::BadData(
            "exceeded maximum resolution of 11,000 points per timeseries. Try decreasing the query resolution (?step=XX)".into(),
        ));
    }
    let timeout = engine.config().timeout;
    let source = otlp::Sources {
        istio: istio::IstioSource::new(engine.clone(), query.origin.clone()).raw(query.raw),
        otlp: otlp::OtlpSource::new(engine.clone(), query.origin.clone()),
    };
    let cache = query.cache.clone();
    let work = async move {
        let source = Cached {
            inner: &source,
            cache,
        };
        let evaluator = Evaluator {
            source: &source,
            query: query.steps,
            lookback: eval::millis(&query.lookback).max(1),
        };
        evaluator.eval(&expr, query.steps).await
    };
    // Evaluation is CPU work: on the query threads, with the query time limit.
    let task = AbortOnDrop(engine.spawn(work));
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(PromError::Execution(format!(
            "query evaluation failed: {e}"
        ))),
        Err(_) => Err(PromError::Query(QueryError::Timeout(timeout))),
    }
}

/// Stops the evaluation when its caller goes away (timeout, client gone).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

#[cfg(test)]
mod tests;
