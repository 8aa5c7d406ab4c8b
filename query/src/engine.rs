//! One DataFusion context over the store, shared by every front end, with
//! the read-only guard and per-query limits applied in one place.

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures_util::StreamExt;
use lumen_collector::Store;
use lumen_core::schema::table_schema;

use crate::table::StoreTable;

/// Bounds on one query's resources.
#[derive(Debug, Clone)]
pub struct QueryLimits {
    /// Wall-clock limit from parse to last row.
    pub timeout: Duration,
    /// Memory the query's operators may hold (sorts, joins, aggregates).
    pub memory_bytes: usize,
    /// Most rows one result may hold; results are materialized before they
    /// are sent, so this bounds the memory a `SELECT *` can take.
    pub max_result_rows: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            timeout: Duration::from_secs(30),
            memory_bytes: 1 << 30,
            max_result_rows: 1_000_000,
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
}

impl QueryEngine {
    pub fn new(store: Arc<Store>, limits: QueryLimits) -> Self {
        QueryEngine { store, limits }
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
            let (mut batches, mut rows) = (Vec::new(), 0usize);
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(classify)?;
                rows += batch.num_rows();
                if rows > self.limits.max_result_rows {
                    return Err(QueryError::TooManyRows(self.limits.max_result_rows));
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
