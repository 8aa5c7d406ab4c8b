//! A store table as a DataFusion table: the hot buffer (in memory) united
//! with the table's Parquet files, both pruned by the query's time range.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::datatypes::{DataType, TimeUnit};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use chrono::Utc;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::stats::Precision;
use datafusion::common::{ScalarValue, Statistics};
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder};
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::Result;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::{
    BinaryExpr, Expr, Operator, TableProviderFilterPushDown, TableType,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{BinaryExpr as PhysBinary, Column, lit};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
use datafusion::physical_plan::union::UnionExec;
use lumen_collector::{FileMeta, Store};
use lumen_core::schema::{ROLLUP_WINDOWS, ROLLUPS, TIME_COLUMN};
use object_store::ObjectMeta;

/// How long after a rollup window ends it stays hidden, while records of
/// its last moments are still on their way from the proxies (which send
/// every 200 ms, and retry for longer only when the collector is down).
pub const ROLLUP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// One table of the store (`requests`, `spans`, …).
#[derive(Debug)]
pub struct StoreTable {
    store: Arc<Store>,
    name: &'static str,
    schema: SchemaRef,
}

impl StoreTable {
    pub fn new(store: Arc<Store>, name: &'static str, schema: SchemaRef) -> Self {
        StoreTable {
            store,
            name,
            schema,
        }
    }
}

/// Inclusive time range (microseconds) a query can touch; `None` is open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeRange {
    pub min: Option<i64>,
    pub max: Option<i64>,
}

impl TimeRange {
    fn overlaps(&self, lo: i64, hi: i64) -> bool {
        self.min.is_none_or(|m| hi >= m) && self.max.is_none_or(|m| lo <= m)
    }

    fn raise_min(&mut self, v: i64) {
        self.min = Some(self.min.map_or(v, |m| m.max(v)));
    }

    fn lower_max(&mut self, v: i64) {
        self.max = Some(self.max.map_or(v, |m| m.min(v)));
    }

    /// Narrows the range by every conjunct that bounds the time column.
    /// Bounds are kept inclusive: pruning may keep too much, never too little.
    pub fn from_filters(filters: &[Expr]) -> Self {
        let mut range = TimeRange::default();
        for f in filters {
            range.apply(f);
        }
        range
    }

    fn apply(&mut self, e: &Expr) {
        match e {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                if *op == Operator::And {
                    self.apply(left);
                    self.apply(right);
                    return;
                }
                let (op, micros) = if is_time_column(left) {
                    match literal_micros(right) {
                        Some(v) => (*op, v),
                        None => return,
                    }
                } else if is_time_column(right) {
                    match (literal_micros(left), op.swap()) {
                        (Some(v), Some(op)) => (op, v),
                        _ => return,
                    }
                } else {
                    return;
                };
                match op {
                    Operator::Gt | Operator::GtEq => self.raise_min(micros),
                    Operator::Lt | Operator::LtEq => self.lower_max(micros),
                    Operator::Eq => {
                        self.raise_min(micros);
                        self.lower_max(micros);
                    }
                    _ => {}
                }
            }
            Expr::Between(b) if !b.negated && is_time_column(&b.expr) => {
                if let Some(lo) = literal_micros(&b.low) {
                    self.raise_min(lo);
                }
                if let Some(hi) = literal_micros(&b.high) {
                    self.lower_max(hi);
                }
            }
            _ => {}
        }
    }
}

/// Casts that keep every microsecond distinct; a cast to seconds (say)
/// would make `<=` match rows up to a second past the literal.
fn lossless_time_cast(to: &DataType) -> bool {
    matches!(
        to,
        DataType::Timestamp(TimeUnit::Microsecond | TimeUnit::Nanosecond, _)
    )
}

fn is_time_column(e: &Expr) -> bool {
    match e {
        Expr::Column(c) => c.name == TIME_COLUMN,
        Expr::Cast(c) => lossless_time_cast(c.field.data_type()) && is_time_column(&c.expr),
        Expr::TryCast(c) => lossless_time_cast(c.field.data_type()) && is_time_column(&c.expr),
        _ => false,
    }
}

/// A timestamp literal in microseconds, rounded outward-safe: sub-microsecond
/// parts are floored, which only widens a lower bound's reach by < 1µs.
fn literal_micros(e: &Expr) -> Option<i64> {
    let Expr::Literal(v, _) = e else {
        return match e {
            Expr::Cast(c) if lossless_time_cast(c.field.data_type()) => literal_micros(&c.expr),
            _ => None,
        };
    };
    match v {
        ScalarValue::TimestampSecond(Some(s), _) => s.checked_mul(1_000_000),
        ScalarValue::TimestampMillisecond(Some(ms), _) => ms.checked_mul(1_000),
        ScalarValue::TimestampMicrosecond(Some(us), _) => Some(*us),
        ScalarValue::TimestampNanosecond(Some(ns), _) => Some(ns.div_euclid(1_000)),
        _ => None,
    }
}

#[async_trait]
impl TableProvider for StoreTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Filters are used for pruning only; DataFusion still applies them.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if self.name == ROLLUPS {
            return self.scan_closed_windows(state, projection, filters).await;
        }
        self.scan_all(state, projection, filters, limit).await
    }
}

impl StoreTable {
    /// `rollups` rows of windows that have closed: a window still open (or
    /// within [`ROLLUP_GRACE`] of its end, while late records arrive) would
    /// show partial counts. Rows of every window length are filtered by
    /// their own length.
    async fn scan_closed_windows(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let time_at = self.schema.index_of(TIME_COLUMN)?;
        let window_at = self.schema.index_of("window_seconds")?;
        let mut needed: Vec<usize> = projection
            .cloned()
            .unwrap_or_else(|| (0..self.schema.fields().len()).collect());
        let wanted = needed.len();
        for i in [time_at, window_at] {
            if !needed.contains(&i) {
                needed.push(i);
            }
        }
        let input = self.scan_all(state, Some(&needed), filters, None).await?;
        let schema = input.schema();
        let position = |i: usize| needed.iter().position(|n| *n == i).expect("added above");
        let time = Arc::new(Column::new(TIME_COLUMN, position(time_at)));
        let window = Arc::new(Column::new("window_seconds", position(window_at)));
        let watermark = Utc::now().timestamp_micros() - ROLLUP_GRACE.as_micros() as i64;
        let mut closed: Option<Arc<dyn PhysicalExpr>> = None;
        for w in ROLLUP_WINDOWS {
            let this_length: Arc<dyn PhysicalExpr> = Arc::new(PhysBinary::new(
                window.clone(),
                Operator::Eq,
                lit(ScalarValue::Int32(Some(w as i32))),
            ));
            let ended: Arc<dyn PhysicalExpr> = Arc::new(PhysBinary::new(
                time.clone(),
                Operator::LtEq,
                lit(ScalarValue::TimestampMicrosecond(
                    Some(watermark - w * 1_000_000),
                    Some("UTC".into()),
                )),
            ));
            let both: Arc<dyn PhysicalExpr> =
                Arc::new(PhysBinary::new(this_length, Operator::And, ended));
            closed = Some(match closed {
                None => both,
                Some(c) => Arc::new(PhysBinary::new(c, Operator::Or, both)),
            });
        }
        let closed = closed.expect("at least one window length");
        let filtered: Arc<dyn ExecutionPlan> = Arc::new(FilterExec::try_new(closed, input)?);
        if needed.len() == wanted {
            return Ok(filtered);
        }
        let exprs: Vec<ProjectionExpr> = (0..wanted)
            .map(|i| {
                let name = schema.field(i).name().clone();
                ProjectionExpr::new(
                    Arc::new(Column::new(&name, i)) as Arc<dyn PhysicalExpr>,
                    name,
                )
            })
            .collect();
        Ok(Arc::new(ProjectionExec::try_new(exprs, filtered)?))
    }

    async fn scan_all(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let Some(snapshot) = self.store.snapshot(self.name) else {
            return Ok(Arc::new(EmptyExec::new(project(&self.schema, projection)?)));
        };
        let range = TimeRange::from_filters(filters);
        if let Some(holds) = state
            .config()
            .get_extension::<lumen_collector::store::FileHolds>()
        {
            holds.hold(&snapshot.files);
        }
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::new();

        let hot: Vec<RecordBatch> = snapshot
            .hot
            .iter()
            .filter(|c| range.overlaps(c.min_time, c.max_time))
            .map(|c| c.batch.clone())
            .collect();
        if !hot.is_empty() {
            // Spread chunks over partitions so scans of the buffer run in parallel.
            let n = state.config().target_partitions().clamp(1, hot.len());
            let mut partitions: Vec<Vec<RecordBatch>> = vec![Vec::new(); n];
            for (i, b) in hot.into_iter().enumerate() {
                partitions[i % n].push(b);
            }
            inputs.push(MemorySourceConfig::try_new_exec(
                &partitions,
                self.schema.clone(),
                projection.cloned(),
            )?);
        }

        // The catalog knows every file and its size: the scan is built from
        // it, with no listing or HEAD request per file (which an object
        // store charges in latency on every query).
        let mut files: Vec<&FileMeta> = snapshot
            .files
            .iter()
            .filter(|f| range.overlaps(f.min_time, f.max_time))
            .map(|f| f.as_ref())
            .collect();
        if !files.is_empty() {
            let storage = self.store.storage();
            let store_url = ObjectStoreUrl::parse(storage.base_url().as_str())?;
            // Row counts are exact (from the footers): `count(*)` without a
            // filter is answered from them.
            let mut statistics = Statistics::new_unknown(&self.schema);
            statistics.num_rows = Precision::Exact(files.iter().map(|f| f.rows as usize).sum());
            statistics.total_byte_size =
                Precision::Inexact(files.iter().map(|f| f.bytes as usize).sum());
            // Largest first, each to the group holding least: groups of
            // about equal bytes, read in parallel.
            files.sort_by_key(|f| std::cmp::Reverse(f.bytes));
            let n = state.config().target_partitions().clamp(1, files.len());
            let mut groups: Vec<(u64, Vec<PartitionedFile>)> = vec![(0, Vec::new()); n];
            for f in files {
                let group = groups
                    .iter_mut()
                    .min_by_key(|(bytes, _)| *bytes)
                    .expect("at least one group");
                group.0 += f.bytes;
                group.1.push(PartitionedFile::new_from_meta(ObjectMeta {
                    location: f.location.clone(),
                    // Files are never rewritten in place: name and size
                    // identify one for the metadata cache.
                    last_modified: chrono::DateTime::UNIX_EPOCH,
                    size: f.bytes,
                    e_tag: None,
                    version: None,
                }));
            }
            let format = ParquetFormat::default();
            let source = format.file_source(TableSchema::from(self.schema.clone()));
            let config = FileScanConfigBuilder::new(store_url, source)
                .with_file_groups(groups.into_iter().map(|(_, g)| FileGroup::new(g)).collect())
                .with_projection_indices(projection.cloned())?
                .with_limit(limit)
                .with_statistics(statistics)
                .build();
            inputs.push(format.create_physical_plan(state, config).await?);
        }

        if inputs.is_empty() {
            return Ok(Arc::new(EmptyExec::new(project(&self.schema, projection)?)));
        }
        UnionExec::try_new(inputs)
    }
}

fn project(schema: &SchemaRef, projection: Option<&Vec<usize>>) -> Result<SchemaRef> {
    Ok(match projection {
        Some(p) => Arc::new(schema.project(p)?),
        None => schema.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::logical_expr::{col, lit};

    fn ts(us: i64) -> Expr {
        lit(ScalarValue::TimestampMicrosecond(
            Some(us),
            Some("UTC".into()),
        ))
    }

    #[test]
    fn time_bounds_come_from_comparisons_between_and_conjunctions() {
        let r = TimeRange::from_filters(&[col("time").gt_eq(ts(100)), col("time").lt(ts(200))]);
        assert_eq!(
            r,
            TimeRange {
                min: Some(100),
                max: Some(200)
            }
        );

        let r = TimeRange::from_filters(&[ts(150).lt(col("time")).and(col("status").eq(lit(500)))]);
        assert_eq!(
            r,
            TimeRange {
                min: Some(150),
                max: None
            }
        );

        let r = TimeRange::from_filters(&[col("time").between(ts(10), ts(20))]);
        assert_eq!(
            r,
            TimeRange {
                min: Some(10),
                max: Some(20)
            }
        );

        let ns = lit(ScalarValue::TimestampNanosecond(Some(5_000_999), None));
        let r = TimeRange::from_filters(&[col("time").gt(ns)]);
        assert_eq!(r.min, Some(5_000));

        // A cast to whole seconds is lossy: it must not narrow the range.
        let secs = Expr::Cast(datafusion::logical_expr::Cast::new(
            Box::new(col("time")),
            DataType::Timestamp(TimeUnit::Second, None),
        ));
        assert_eq!(
            TimeRange::from_filters(&[secs.lt_eq(ts(10))]),
            TimeRange::default()
        );

        // Disjunctions and other columns do not narrow the range.
        let r = TimeRange::from_filters(&[col("time").gt(ts(1)).or(col("time").lt(ts(0)))]);
        assert_eq!(r, TimeRange::default());
    }

    #[test]
    fn overlap_is_inclusive() {
        let r = TimeRange {
            min: Some(100),
            max: Some(200),
        };
        assert!(r.overlaps(50, 100));
        assert!(r.overlaps(200, 300));
        assert!(!r.overlaps(201, 300));
        assert!(!r.overlaps(0, 99));
        assert!(TimeRange::default().overlaps(i64::MIN, i64::MAX));
    }
}
