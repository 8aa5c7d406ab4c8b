//! One DataFusion context over the store, shared by every front end, with
//! the read-only guard and per-query limits applied in one place.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::Array;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures_util::StreamExt;
use lumen_collector::Store;
use lumen_core::schema::table_schema;
use tokio::sync::Semaphore;

use crate::table::StoreTable;

/// Bounds on one query's resources.
#[derive(Debug, Clone)]
pub struct QueryLimits {
    /// Wall-clock limit from parse to last row.
    pub timeout: Duration,
    /// Memory the query's operators may hold (sorts, joins, aggregates).
    pub memory_bytes: usize,
    /// Most rows one result may hold; results are materialized before they
    /// are sent, so this and `max_result_bytes` bound what a `SELECT *` takes.
    pub max_result_rows: usize,
    /// Most memory one result may hold (Arrow, before encoding).
    pub max_result_bytes: usize,
    /// Queries run at once; more wait for a turn within their time limit.
    /// With the per-query limits this bounds the memory of all queries.
    pub max_concurrent: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            timeout: Duration::from_secs(30),
            memory_bytes: 1 << 30,
            max_result_rows: 1_000_000,
            max_result_bytes: 256 << 20,
            max_concurrent: 4,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The statement would change data or touch files.
    #[error("Lumen SQL is read-only: {0}")]
    ReadOnly(String),
    /// Planning or execution failed (DataFusion's message).
    #[error("{0}")]
    Sql(String),
    #[error("query exceeded the time limit of {0:?}")]
    Timeout(Duration),
    #[error("the result has more than {0} rows: add a LIMIT, a filter or an aggregate")]
    TooManyRows(usize),
    #[error(
        "the result takes more than {} MiB: select fewer columns, add a LIMIT, a filter or an aggregate",
        .0 >> 20
    )]
    TooLarge(usize),
}

/// A finished query: its schema (also when no rows came back) and rows.
#[derive(Debug, Clone)]
pub struct QueryResult {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

impl QueryResult {
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }
}

/// Runs read-only SQL over the store.
#[derive(Debug, Clone)]
pub struct QueryEngine {
    store: Arc<Store>,
    limits: QueryLimits,
    running: Arc<Semaphore>,
}

impl QueryEngine {
    pub fn new(store: Arc<Store>, limits: QueryLimits) -> Self {
        let running = Arc::new(Semaphore::new(limits.max_concurrent.max(1)));
        QueryEngine {
            store,
            limits,
            running,
        }
    }

    pub fn limits(&self) -> &QueryLimits {
        &self.limits
    }

    /// A context per query: the memory pool is the query's own, and table
    /// providers take their snapshot when the query scans.
    fn context(&self) -> Result<SessionContext, QueryError> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(self.limits.memory_bytes, 1.0)
            .build_arc()
            .map_err(|e| QueryError::Sql(e.to_string()))?;
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("lumen", "public");
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        for name in self.store.table_names() {
            let schema = table_schema(name).expect("every store table has a schema");
            ctx.register_table(
                *name,
                Arc::new(StoreTable::new(self.store.clone(), name, schema)),
            )
            .map_err(|e| QueryError::Sql(e.to_string()))?;
        }
        Ok(ctx)
    }

    pub async fn execute(&self, sql: &str) -> Result<QueryResult, QueryError> {
        let run = async {
            // Waiting for a turn counts against the time limit.
            let _turn = self
                .running
                .acquire()
                .await
                .map_err(|_| QueryError::Sql("the query service is shutting down".into()))?;
            let ctx = self.context()?;
            // DDL (CREATE [EXTERNAL] TABLE, DROP), DML (INSERT, COPY … TO) and
            // statements (SET, transactions) are refused at planning time.
            let options = SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false);
            let df = ctx.sql_with_options(sql, options).await.map_err(classify)?;
            let schema = Arc::new(df.schema().as_arrow().clone());
            let mut stream = df.execute_stream().await.map_err(classify)?;
            let (mut batches, mut rows, mut bytes) = (Vec::new(), 0usize, 0usize);
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(classify)?;
                rows += batch.num_rows();
                if rows > self.limits.max_result_rows {
                    return Err(QueryError::TooManyRows(self.limits.max_result_rows));
                }
                bytes += slice_bytes(&batch);
                if bytes > self.limits.max_result_bytes {
                    return Err(QueryError::TooLarge(self.limits.max_result_bytes));
                }
                batches.push(batch);
            }
            Ok(QueryResult { schema, batches })
        };
        tokio::time::timeout(self.limits.timeout, run)
            .await
            .map_err(|_| QueryError::Timeout(self.limits.timeout))?
    }
}

/// Memory of the rows a batch holds. Batches scanned from the hot buffer
/// are often slices of larger ones; counting whole buffers would refuse a
/// `LIMIT 10` for the chunk around it.
fn slice_bytes(batch: &RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .map(|c| {
            c.to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size())
        })
        .sum()
}

fn classify(e: DataFusionError) -> QueryError {
    let msg = e.strip_backtrace();
    let read_only = [
        "DDL not supported",
        "DML not supported",
        "Statement not supported",
    ];
    if read_only.iter().any(|m| msg.contains(m)) {
        QueryError::ReadOnly(msg)
    } else {
        QueryError::Sql(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(limits: QueryLimits) -> QueryEngine {
        QueryEngine::new(Arc::new(Store::new()), limits)
    }

    #[tokio::test]
    async fn results_past_the_byte_limit_are_refused_with_advice() {
        let e = engine(QueryLimits {
            max_result_bytes: 1 << 20,
            ..QueryLimits::default()
        });
        // 8 bytes × 1M rows: 8 MiB.
        let err = e
            .execute("SELECT value FROM generate_series(1, 1000000)")
            .await
            .unwrap_err();
        assert!(matches!(err, QueryError::TooLarge(_)), "{err:?}");
        assert!(err.to_string().contains("more than 1 MiB"), "{err}");
        let ok = e
            .execute("SELECT sum(value) AS s FROM generate_series(1, 1000000)")
            .await
            .unwrap();
        assert_eq!(ok.num_rows(), 1);
    }
}
