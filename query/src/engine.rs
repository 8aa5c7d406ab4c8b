//! One DataFusion context over the store, shared by every front end, with
//! the read-only guard, admission, limits and cancellation in one place.
//!
//! A query's life: it is listed ([`Running::register`]), waits for a turn
//! ([`Running::admit`]), then plans and executes on the [`QueryExecutor`]
//! while its front end awaits the answer on the I/O runtime. The time
//! limit is kept on the I/O runtime, so it fires however busy the query
//! threads are; a timeout, a cancel, a client that goes away or shutdown
//! set the query's [`Stop`](crate::guard::Stop) flag, which every plan node
//! checks, and abort its task, so its work ends and its memory is released,
//! not only its answer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::Array;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::catalog::SchemaProvider;
use datafusion::common::ParamValues;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::execute_stream;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures_util::StreamExt;
use lumen_collector::Store;
use lumen_core::BoxFuture;
use lumen_core::load::Pressure;
use lumen_core::schema::table_schema;

use crate::executor::QueryExecutor;
use crate::guard::{Leash, StopReason, guard};
use crate::memory::{Exhausted, MemoryBudget, QueryPool};
use crate::metrics::Outcome;
use crate::running::{Admission, Entry, QueryInfo, Registered, Running};
use crate::table::StoreTable;
use crate::throttle::Throttle;

/// How queries are run and bounded. The defaults fit a 2-core laptop.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    /// Threads of the query executor. One per concurrent query keeps the
    /// others answering while one is stuck in a long computation; they run
    /// at a lower priority, so ingest and health checks still come first.
    pub threads: usize,
    /// Partitions one query is split into (DataFusion's `target_partitions`):
    /// how many cores a single query may keep busy.
    pub parallelism: usize,
    /// Wall-clock limit of one query, from its turn to its last row.
    pub timeout: Duration,
    /// Memory one query's operators and result may hold.
    pub memory_bytes: usize,
    /// Memory all running queries may hold together.
    pub memory_budget_bytes: usize,
    /// Most rows one result may hold; results are materialized before they
    /// are sent, so this and `max_result_bytes` bound what a `SELECT *` takes.
    pub max_result_rows: usize,
    /// Most memory one result may hold (Arrow, before encoding).
    pub max_result_bytes: usize,
    /// Queries executing at once.
    pub max_concurrent: usize,
    /// Queries waiting for a turn; more are refused at once ("busy, retry").
    pub max_queued: usize,
    /// Longest wait for a turn; then the query is refused ("busy, retry").
    pub queue_timeout: Duration,
    /// Queries taking at least this long are logged.
    pub slow_query: Duration,
    /// Where sorts and aggregations spill past their memory limit; `None`
    /// for the system's temporary directory.
    pub spill_dir: Option<PathBuf>,
    /// Disk one query may spill to; 0 turns spilling off, so operators past
    /// their memory limit fail instead.
    pub spill_bytes: u64,
    /// Active while ingest has payloads in progress (the collector's
    /// [`Pressure`]); query threads then keep only `ingest_share` percent
    /// of their time.
    pub ingest: Pressure,
    /// Percent of each query thread's time queries keep while ingest is
    /// busy; 100 never steps aside.
    pub ingest_share: u32,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            threads: 4,
            parallelism: crate::executor::default_parallelism(),
            timeout: Duration::from_secs(30),
            memory_bytes: 512 << 20,
            memory_budget_bytes: 1 << 30,
            max_result_rows: 1_000_000,
            max_result_bytes: 256 << 20,
            max_concurrent: 4,
            max_queued: 16,
            queue_timeout: Duration::from_secs(10),
            slow_query: Duration::from_secs(5),
            spill_dir: None,
            spill_bytes: 2 << 30,
            ingest: Pressure::new(),
            ingest_share: 25,
        }
    }
}

/// What DataFusion names the directories it spills into.
const SPILL_PREFIX: &str = "datafusion-";

/// Why a query got no turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Busy {
    QueueFull { running: usize, queued: usize },
    QueueTimeout(Duration),
}

impl Busy {
    /// What `Retry-After` says: the queue drains as queries finish.
    pub fn retry_after(&self) -> Duration {
        match self {
            Busy::QueueFull { .. } => Duration::from_secs(1),
            Busy::QueueTimeout(_) => Duration::from_secs(5),
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
    #[error("{0}")]
    MemoryLimit(String),
    #[error("the result has more than {0} rows: add a LIMIT, a filter or an aggregate")]
    TooManyRows(usize),
    #[error(
        "the result takes more than {} MiB: select fewer columns, add a LIMIT, a filter or an aggregate",
        .0 >> 20
    )]
    TooLarge(usize),
    #[error("query stopped: {0}")]
    Stopped(StopReason),
    #[error("{}", busy_message(.0))]
    Busy(Busy),
    #[error("internal error: {0}")]
    Internal(String),
}

fn busy_message(b: &Busy) -> String {
    match b {
        Busy::QueueFull { running, queued } => format!(
            "the query service is busy ({running} queries running, {queued} waiting): retry shortly"
        ),
        Busy::QueueTimeout(d) => format!(
            "the query service is busy: no turn within {d:?} (every query slot is taken): retry shortly"
        ),
    }
}

impl QueryError {
    fn outcome(&self) -> Outcome {
        match self {
            QueryError::ReadOnly(_) => Outcome::ReadOnly,
            QueryError::Sql(_) | QueryError::Internal(_) => Outcome::Error,
            QueryError::Timeout(_) => Outcome::Timeout,
            QueryError::MemoryLimit(_) => Outcome::MemoryLimit,
            QueryError::TooManyRows(_) | QueryError::TooLarge(_) => Outcome::ResultTooLarge,
            QueryError::Stopped(StopReason::Timeout) => Outcome::Timeout,
            QueryError::Stopped(StopReason::Cancelled) => Outcome::Cancelled,
            QueryError::Stopped(StopReason::ClientGone) => Outcome::ClientGone,
            QueryError::Stopped(StopReason::Shutdown) => Outcome::Shutdown,
            QueryError::Busy(_) => Outcome::Busy,
        }
    }
}

/// A statement as a front end hands it over.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub sql: String,
    /// A Postgres client's statement: `pg_catalog` and its functions are
    /// there, as `psql` and Grafana's catalog queries expect.
    pub postgres: bool,
    /// Values of `$1`, `$2`, … (prepared statements).
    pub params: Option<ParamValues>,
}

impl Request {
    pub fn sql(sql: impl Into<String>) -> Self {
        Request {
            sql: sql.into(),
            ..Request::default()
        }
    }
}

/// What a statement returns and takes, known without running it.
#[derive(Debug, Clone)]
pub struct Described {
    pub schema: SchemaRef,
    /// Types of `$1`, `$2`, … where planning could infer them.
    pub params: Vec<Option<DataType>>,
}

/// A finished query: its schema (also when no rows came back) and rows.
#[derive(Debug)]
pub struct QueryResult {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// The result's memory, counted against the query budget until the
    /// result is dropped (after it is sent).
    _memory: Option<MemoryReservation>,
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
    config: Arc<QueryConfig>,
    executor: Arc<QueryExecutor>,
    running: Arc<Running>,
    throttle: Option<Throttle>,
    /// `pg_catalog`, made once: its OIDs must stay the same from one query
    /// to the next (`\d` looks a table up, then asks for its columns by OID).
    pg_catalog: Arc<std::sync::OnceLock<Arc<dyn SchemaProvider>>>,
    /// Metrics of parts sharing the process (remote write), for `/metrics`.
    extra_metrics: Arc<ExtraMetrics>,
}

/// Renders some part's metrics as OpenMetrics text.
pub type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Default)]
struct ExtraMetrics(std::sync::Mutex<Vec<MetricsText>>);

impl std::fmt::Debug for ExtraMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtraMetrics")
    }
}

impl QueryEngine {
    /// Starts the query executor's threads.
    pub fn new(store: Arc<Store>, config: QueryConfig) -> std::io::Result<Self> {
        if let Some(dir) = &config.spill_dir {
            std::fs::create_dir_all(dir)?;
            // Spill files outlive nothing: what a crash left is garbage. Only
            // the directories DataFusion makes are removed; the directory
            // itself may be shared (`/var/tmp`), and nothing else in it is ours.
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                let ours = entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(SPILL_PREFIX);
                if ours && entry.file_type()?.is_dir() {
                    std::fs::remove_dir_all(entry.path())?;
                }
            }
        }
        let executor = Arc::new(QueryExecutor::new(config.threads)?);
        let budget = Arc::new(MemoryBudget::new(config.memory_budget_bytes));
        let running = Arc::new(Running::new(
            Admission {
                max_running: config.max_concurrent.max(1),
                max_queued: config.max_queued,
                queue_timeout: config.queue_timeout,
            },
            budget,
            config.slow_query,
        ));
        let throttle = Throttle::new(
            config.ingest.clone(),
            config.ingest_share,
            running.metrics.ingest_pause.clone(),
        );
        Ok(QueryEngine {
            store,
            config: Arc::new(config),
            executor,
            running,
            throttle,
            pg_catalog: Arc::default(),
            extra_metrics: Arc::default(),
        })
    }

    /// The shared `pg_catalog` schema, made on first use.
    fn pg_catalog(&self) -> Result<Arc<dyn SchemaProvider>, QueryError> {
        if let Some(p) = self.pg_catalog.get() {
            return Ok(p.clone());
        }
        let ctx = SessionContext::new_with_config(
            SessionConfig::new().with_default_catalog_and_schema(CATALOG, "public"),
        );
        register_tables(&ctx, &self.store)?;
        datafusion_pg_catalog::setup_pg_catalog(
            &ctx,
            CATALOG,
            datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider,
        )
        .map_err(|e| QueryError::Internal(format!("cannot set up pg_catalog: {e}")))?;
        let schema = ctx
            .catalog(CATALOG)
            .and_then(|c| c.schema("pg_catalog"))
            .ok_or_else(|| QueryError::Internal("pg_catalog was not registered".into()))?;
        // Two first uses at once: one wins, both use the winner's OIDs.
        let _ = self.pg_catalog.set(schema);
        Ok(self
            .pg_catalog
            .get()
            .cloned()
            .unwrap_or_else(|| unreachable!()))
    }

    pub fn config(&self) -> &QueryConfig {
        &self.config
    }

    /// The store queries read (for the live tier, read in place).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Queries in flight, oldest first.
    pub fn queries(&self) -> Vec<QueryInfo> {
        self.running.list()
    }

    /// Stops a query by id; false when none such is in flight.
    pub fn cancel(&self, id: u64) -> bool {
        self.running.cancel(id)
    }

    /// Stops every query and refuses new ones: queries are reads, so
    /// nothing is lost, and shutdown need not wait for them.
    pub fn shutdown(&self) {
        self.running.shutdown();
    }

    /// Queries whose work has not ended yet.
    pub fn in_flight(&self) -> usize {
        self.running.in_flight()
    }

    /// OpenMetrics text of the query service's metrics, the collector's
    /// (which share its process and store) and the process's own.
    pub fn metrics(&self) -> String {
        let mut parts = vec![
            self.running.encode_metrics(),
            self.store.encode_metrics(),
            lumen_core::process::exposition(),
        ];
        let extra: Vec<MetricsText> = self
            .extra_metrics
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        parts.extend(extra.iter().map(|f| f()));
        let mut out = String::with_capacity(parts.iter().map(String::len).sum());
        for part in parts {
            out.push_str(part.trim_end().trim_end_matches("# EOF").trim_end());
            out.push('\n');
        }
        out.push_str("# EOF\n");
        out
    }

    /// Adds a part's metrics to what `/metrics` serves.
    pub fn add_metrics(&self, text: MetricsText) {
        self.extra_metrics
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(text);
    }

    /// Runs a front end's own computation (PromQL evaluation, result
    /// shaping) on the query threads, apart from the I/O runtime.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.executor.spawn(fut)
    }

    /// Runs `sql`; `origin` says who asked, for the running-query list and logs.
    ///
    /// Dropping the returned future (the client went away) stops the query.
    pub fn execute<'a>(
        &'a self,
        sql: &'a str,
        origin: &'a str,
    ) -> BoxFuture<'a, Result<QueryResult, QueryError>> {
        self.execute_request(Request::sql(sql), origin)
    }

    /// Plans `sql` without running it: its result schema and parameter
    /// types, for a prepared statement's description.
    pub fn describe<'a>(
        &'a self,
        sql: &'a str,
        postgres: bool,
    ) -> BoxFuture<'a, Result<Described, QueryError>> {
        Box::pin(self.describe_inner(sql, postgres))
    }

    async fn describe_inner(&self, sql: &str, postgres: bool) -> Result<Described, QueryError> {
        let store = self.store.clone();
        let config = self.config.clone();
        let pool = Arc::new(QueryPool::new(
            self.config.memory_bytes,
            self.running.budget.clone(),
        ));
        let sql = sql.to_string();
        let pg = if postgres {
            Some(self.pg_catalog()?)
        } else {
            None
        };
        let task = self.executor.spawn(async move {
            let ctx = context(&store, &config, pool.clone(), pg)?;
            let classify = |e| classify(e, &config, &pool);
            let df = ctx
                .sql_with_options(&sql, read_only())
                .await
                .map_err(classify)?;
            let types = df.logical_plan().get_parameter_types().map_err(classify)?;
            let mut params: Vec<(usize, Option<DataType>)> = types
                .into_iter()
                .filter_map(|(k, t)| Some((k.trim_start_matches('$').parse().ok()?, t)))
                .collect();
            params.sort_by_key(|(i, _)| *i);
            let count = params.last().map_or(0, |(i, _)| *i);
            let mut ordered = vec![None; count];
            for (i, t) in params {
                if i >= 1 {
                    ordered[i - 1] = t;
                }
            }
            Ok(Described {
                schema: Arc::new(df.schema().as_arrow().clone()),
                params: ordered,
            })
        });
        match tokio::time::timeout(self.config.timeout, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(QueryError::Internal("planning panicked".into())),
            Err(_) => Err(QueryError::Timeout(self.config.timeout)),
        }
    }

    /// Runs a front end's request; `origin` says who asked.
    pub fn execute_request<'a>(
        &'a self,
        request: Request,
        origin: &'a str,
    ) -> BoxFuture<'a, Result<QueryResult, QueryError>> {
        Box::pin(self.execute_request_inner(request, origin))
    }

    async fn execute_request_inner(
        &self,
        request: Request,
        origin: &str,
    ) -> Result<QueryResult, QueryError> {
        let registered = match self.running.register(&request.sql, origin) {
            Ok(r) => r,
            Err(e) => {
                self.running.metrics.finished(e.outcome(), 0.0);
                return Err(e);
            }
        };
        let mut finish = Finish {
            running: &self.running,
            entry: registered.entry.clone(),
            abort: None,
            done: false,
        };
        let result = self.run(registered, request, &mut finish).await;
        finish.done(&result);
        result
    }

    async fn run(
        &self,
        registered: Registered,
        request: Request,
        finish: &mut Finish<'_>,
    ) -> Result<QueryResult, QueryError> {
        let entry = registered.entry.clone();
        let turn = self.running.admit(registered).await?;
        entry.set_state(crate::running::QueryState::Running);
        let pool = Arc::new(QueryPool::new(
            self.config.memory_bytes,
            self.running.budget.clone(),
        ));
        entry.set_pool(pool.clone());
        let job = Job {
            store: self.store.clone(),
            config: self.config.clone(),
            pg: if request.postgres {
                Some(self.pg_catalog()?)
            } else {
                None
            },
            request,
            leash: Leash {
                stop: entry.stop.clone(),
                throttle: self.throttle.clone(),
                work: turn.work_token(),
            },
            pool,
        };
        let mut task = self.executor.spawn(async move {
            // The turn (and the query's place in the list) is given back
            // when this future ends or is dropped: when the work has ended.
            let _turn = turn;
            job.run().await
        });
        finish.abort = Some(task.abort_handle());
        let result = tokio::select! {
            joined = &mut task => match joined {
                Ok(r) => r,
                Err(e) if e.is_panic() => Err(QueryError::Internal("the query panicked".into())),
                Err(_) => Err(QueryError::Stopped(entry.stop.reason().unwrap_or(StopReason::ClientGone))),
            },
            () = tokio::time::sleep(self.config.timeout) => {
                entry.stop.stop(StopReason::Timeout);
                Err(QueryError::Timeout(self.config.timeout))
            }
            reason = entry.stop.stopped() => Err(QueryError::Stopped(reason)),
        };
        match result {
            Ok(r) => Ok(r),
            Err(e) => {
                // Whatever failed, the work stops: the flag ends it at the
                // next plan node, the abort at the next yield.
                task.abort();
                Err(match entry.stop.reason() {
                    Some(StopReason::Timeout) => QueryError::Timeout(self.config.timeout),
                    Some(reason) => QueryError::Stopped(reason),
                    None => e,
                })
            }
        }
    }
}

/// Counts a query's outcome exactly once, also when its front end drops
/// the future because the client went away — and then stops the query.
struct Finish<'a> {
    running: &'a Running,
    entry: Arc<Entry>,
    abort: Option<tokio::task::AbortHandle>,
    done: bool,
}

impl Finish<'_> {
    fn done(&mut self, result: &Result<QueryResult, QueryError>) {
        self.done = true;
        match result {
            Ok(r) => self
                .running
                .finished(&self.entry, Outcome::Ok, Some(r.num_rows()), None),
            Err(e) => {
                let message = e.to_string();
                self.running
                    .finished(&self.entry, e.outcome(), None, Some(&message));
            }
        }
    }
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // The first reason stays: a query cut off by shutdown's drain
        // timeout was stopped by shutdown, not by its client.
        self.entry.stop.stop(StopReason::ClientGone);
        // A query cancelled through the API whose client then left (as
        // the UI's console does) was cancelled.
        let outcome = match self.entry.stop.reason() {
            Some(StopReason::Shutdown) => Outcome::Shutdown,
            Some(StopReason::Cancelled) => Outcome::Cancelled,
            _ => Outcome::ClientGone,
        };
        if let Some(a) = &self.abort {
            a.abort();
        }
        self.running.finished(&self.entry, outcome, None, None);
    }
}

/// What the executor needs to plan and run one query.
struct Job {
    store: Arc<Store>,
    config: Arc<QueryConfig>,
    request: Request,
    pg: Option<Arc<dyn SchemaProvider>>,
    leash: Leash,
    pool: Arc<QueryPool>,
}

/// DDL (CREATE [EXTERNAL] TABLE, DROP), DML (INSERT, COPY … TO) and
/// statements (SET, transactions) are refused at planning time.
fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// A context per query: the memory pool is the query's own, and table
/// providers take their snapshot when the query scans.
fn context(
    store: &Arc<Store>,
    config: &QueryConfig,
    pool: Arc<QueryPool>,
    pg_catalog: Option<Arc<dyn SchemaProvider>>,
) -> Result<SessionContext, QueryError> {
    let pool: Arc<dyn MemoryPool> = pool;
    let spill = match (&config.spill_dir, config.spill_bytes) {
        (_, 0) => DiskManagerMode::Disabled,
        (Some(dir), _) => DiskManagerMode::Directories(vec![dir.clone()]),
        (None, _) => DiskManagerMode::OsTmpDirectory,
    };
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .with_disk_manager_builder(
            DiskManagerBuilder::default()
                .with_mode(spill)
                .with_max_temp_directory_size(config.spill_bytes),
        )
        .build_arc()
        .map_err(|e| QueryError::Internal(e.to_string()))?;
    let storage = store.storage();
    runtime.register_object_store(storage.base_url(), storage.object_store());
    let session = SessionConfig::new()
        .with_information_schema(true)
        .with_default_catalog_and_schema(CATALOG, "public")
        .with_target_partitions(config.parallelism.max(1))
        // Files the query reads stay on disk until it ends.
        .with_extension(Arc::new(lumen_collector::store::FileHolds::default()));
    let ctx = SessionContext::new_with_config_rt(session, runtime);
    ctx.add_optimizer_rule(Arc::new(crate::dict_group::DictionaryGroupKeys));
    crate::functions::register(&ctx);
    register_tables(&ctx, store)?;
    if let Some(shared) = pg_catalog {
        // Its functions and type names per context; its tables shared.
        datafusion_pg_catalog::setup_pg_catalog(
            &ctx,
            CATALOG,
            datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider,
        )
        .map_err(|e| QueryError::Internal(format!("cannot set up pg_catalog: {e}")))?;
        ctx.catalog(CATALOG)
            .ok_or_else(|| QueryError::Internal(format!("no catalog {CATALOG}")))?
            .register_schema("pg_catalog", shared)
            .map_err(|e| QueryError::Internal(e.to_string()))?;
    }
    Ok(ctx)
}

fn register_tables(ctx: &SessionContext, store: &Arc<Store>) -> Result<(), QueryError> {
    for name in store.table_names() {
        let Some(schema) = table_schema(name) else {
            return Err(QueryError::Internal(format!(
                "table `{name}` has no schema"
            )));
        };
        ctx.register_table(
            *name,
            Arc::new(StoreTable::new(store.clone(), name, schema)),
        )
        .map_err(|e| QueryError::Internal(e.to_string()))?;
    }
    Ok(())
}

/// The catalog (Postgres: database) Lumen's tables are in.
pub const CATALOG: &str = "lumen";

impl Job {
    async fn run(self) -> Result<QueryResult, QueryError> {
        let ctx = context(
            &self.store,
            &self.config,
            self.pool.clone(),
            self.pg.clone(),
        )?;
        let classify = |e: DataFusionError| self.classify(e);
        let mut df = ctx
            .sql_with_options(&self.request.sql, read_only())
            .await
            .map_err(classify)?;
        if let Some(params) = self.request.params.clone() {
            df = df.with_param_values(params).map_err(classify)?;
        }
        let schema = Arc::new(df.schema().as_arrow().clone());
        let plan = df.create_physical_plan().await.map_err(classify)?;
        let plan = guard(plan, &self.leash).map_err(classify)?;
        let mut stream = execute_stream(plan, ctx.task_ctx()).map_err(classify)?;

        let pool: Arc<dyn MemoryPool> = self.pool.clone();
        let memory = MemoryConsumer::new("query result").register(&pool);
        let (mut batches, mut rows, mut bytes) = (Vec::new(), 0usize, 0usize);
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(classify)?;
            rows += batch.num_rows();
            if rows > self.config.max_result_rows {
                return Err(QueryError::TooManyRows(self.config.max_result_rows));
            }
            let size = slice_bytes(&batch);
            bytes += size;
            if bytes > self.config.max_result_bytes {
                return Err(QueryError::TooLarge(self.config.max_result_bytes));
            }
            memory.try_grow(size).map_err(classify)?;
            batches.push(batch);
        }
        Ok(QueryResult {
            schema,
            batches,
            _memory: Some(memory),
        })
    }

    fn classify(&self, e: DataFusionError) -> QueryError {
        classify(e, &self.config, &self.pool)
    }
}

fn classify(e: DataFusionError, config: &QueryConfig, pool: &QueryPool) -> QueryError {
    let msg = e.strip_backtrace();
    // The spill writer reports this through an I/O error, as text.
    if msg.contains("spilling process has exceeded") {
        return QueryError::MemoryLimit(format!(
            "query spilled more than its limit of {} MiB to disk: filter earlier, \
             aggregate more, or raise the limit",
            config.spill_bytes >> 20
        ));
    }
    if matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)) {
        let detail = e.find_root().message();
        return QueryError::MemoryLimit(match pool.exhausted() {
            Some(Exhausted::Budget) => format!(
                "queries running together exceeded the query memory budget of {} MiB; \
                 retry when fewer queries run ({detail})",
                config.memory_budget_bytes >> 20
            ),
            _ => format!(
                "query exceeded its memory limit of {} MiB: filter earlier, aggregate \
                 more, or raise the limit ({detail})",
                config.memory_bytes >> 20
            ),
        });
    }
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

#[cfg(test)]
mod tests;
