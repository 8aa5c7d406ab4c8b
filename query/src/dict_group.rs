//! Grouping by dictionary-encoded string columns at the speed of integers.
//!
//! Most of Lumen's string columns (`destination_service`, `path`, …) are
//! dictionaries, and dashboards group by them. DataFusion 55 groups a
//! dictionary column through its row format — every row's string copied,
//! hashed and compared, then re-encoded on output — several times slower
//! than grouping an integer (apache/datafusion#7647; the specialised
//! grouping merged upstream in apache/datafusion#23187 is not released).
//! This rule rewrites
//!
//! ```text
//! Aggregate: group by [requests.path]
//! ```
//! into
//!
//! ```text
//! Projection: lumen_dict_lookup(requests.path) AS requests.path, …
//!   Aggregate: group by [lumen_dict_intern(requests.path) AS requests.path]
//! ```
//!
//! `lumen_dict_intern` gives each distinct string a number, shared by every
//! partition of the query, looking up each batch's *dictionary* (a few
//! hundred values) rather than its rows, and remembering the last
//! dictionaries it saw (a Parquet column chunk hands every batch the same
//! one). The aggregate then groups plain `UInt32`s; `lumen_dict_lookup`
//! turns the numbers back into the column's own type, so the plan's schema
//! is unchanged. Remove once DataFusion's own dictionary grouping ships.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use arrow::array::{AnyDictionaryArray, Array, ArrayRef, AsArray, StringArray, UInt32Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef, Int32Type};
use datafusion::common::tree_node::Transformed;
use datafusion::common::{Result, exec_err};
use datafusion::logical_expr::{
    Aggregate, ColumnarValue, Expr, LogicalPlan, Projection, ReturnFieldArgs, ScalarFunctionArgs,
    ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};

/// The optimizer rule; see the module documentation.
#[derive(Debug, Default)]
pub struct DictionaryGroupKeys;

fn is_string_dictionary(t: &DataType) -> bool {
    matches!(t, DataType::Dictionary(_, v)
        if matches!(v.as_ref(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View))
}

impl OptimizerRule for DictionaryGroupKeys {
    fn name(&self) -> &str {
        "lumen_dictionary_group_keys"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        let LogicalPlan::Aggregate(agg) = plan else {
            return Ok(Transformed::no(plan));
        };
        let input_schema = agg.input.schema();
        // Plain column keys only: grouping sets and computed keys keep
        // DataFusion's own path (and this rule's output stays as it is).
        let targets: Vec<bool> = agg
            .group_expr
            .iter()
            .map(|e| match e {
                Expr::Column(c) => input_schema
                    .qualified_field_from_column(c)
                    .is_ok_and(|(_, f)| is_string_dictionary(f.data_type())),
                _ => false,
            })
            .collect();
        if !targets.contains(&true) {
            return Ok(Transformed::no(LogicalPlan::Aggregate(agg)));
        }

        let interner = Arc::new(Interner::default());
        let intern = Arc::new(ScalarUDF::from(Intern {
            signature: Signature::any(1, Volatility::Immutable),
            interner: interner.clone(),
        }));
        let mut group_expr = Vec::with_capacity(agg.group_expr.len());
        let mut outputs = Vec::new();
        for (i, (e, &target)) in agg.group_expr.iter().zip(&targets).enumerate() {
            if !target {
                group_expr.push(e.clone());
                continue;
            }
            let (qualifier, field) = agg.schema.qualified_field(i);
            group_expr.push(
                intern
                    .call(vec![e.clone()])
                    .alias_qualified(qualifier.cloned(), field.name()),
            );
            outputs.push((i, field.data_type().clone()));
        }
        let inner = Aggregate::try_new(agg.input.clone(), group_expr, agg.aggr_expr.clone())?;

        // Every output column as it was, the keys looked up again.
        let mut exprs: Vec<Expr> = inner
            .schema
            .iter()
            .map(|(q, f)| Expr::Column((q, f).into()))
            .collect();
        for (i, output) in outputs {
            let (qualifier, field) = agg.schema.qualified_field(i);
            let lookup = ScalarUDF::from(Lookup {
                signature: Signature::any(1, Volatility::Immutable),
                interner: interner.clone(),
                output,
            });
            exprs[i] = lookup
                .call(vec![exprs[i].clone()])
                .alias_qualified(qualifier.cloned(), field.name());
        }
        let projection = Projection::try_new(exprs, Arc::new(LogicalPlan::Aggregate(inner)))?;
        Ok(Transformed::yes(LogicalPlan::Projection(projection)))
    }
}

/// Dictionaries remembered per query: enough for each partition's current
/// column chunk.
const REMEMBERED: usize = 8;

/// The numbers given to one query's key strings.
#[derive(Debug, Default)]
struct Interner {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    ids: HashMap<Box<str>, u32, foldhash::fast::RandomState>,
    strings: Vec<Box<str>>,
    /// Recent dictionaries (held, so their buffers cannot be reused by
    /// another array while remembered) and each value's number.
    recent: Vec<(ArrayRef, Arc<[Option<u32>]>)>,
}

impl State {
    fn id(&mut self, s: &str) -> Result<u32> {
        if let Some(&id) = self.ids.get(s) {
            return Ok(id);
        }
        let Ok(id) = u32::try_from(self.strings.len()) else {
            return exec_err!("more than 2^32 distinct group keys");
        };
        self.strings.push(s.into());
        self.ids.insert(s.into(), id);
        Ok(id)
    }

    /// Each value of a dictionary's `values` array, numbered.
    fn numbers(&mut self, values: &ArrayRef) -> Result<Arc<[Option<u32>]>> {
        let data = values.to_data();
        let same = |a: &ArrayRef| {
            let b = a.to_data();
            b.len() == data.len()
                && b.offset() == data.offset()
                && b.buffers().len() == data.buffers().len()
                && b.buffers()
                    .iter()
                    .zip(data.buffers())
                    .all(|(x, y)| x.as_ptr() == y.as_ptr())
        };
        if let Some((_, numbers)) = self.recent.iter().find(|(a, _)| same(a)) {
            return Ok(numbers.clone());
        }
        let strings = cast(values, &DataType::Utf8)?;
        let strings = strings.as_string::<i32>();
        let numbers: Arc<[Option<u32>]> = strings
            .iter()
            .map(|v| v.map(|s| self.id(s)).transpose())
            .collect::<Result<_>>()?;
        if self.recent.len() == REMEMBERED {
            self.recent.remove(0);
        }
        self.recent.push((values.clone(), numbers.clone()));
        Ok(numbers)
    }
}

impl Interner {
    fn intern(&self, array: &ArrayRef) -> Result<UInt32Array> {
        let mut state = self.state.lock().map_err(|_| {
            datafusion::error::DataFusionError::Internal("interner poisoned".into())
        })?;
        // Lumen's tables key dictionaries by Int32: map the keys
        // directly, a load per row.
        if let Some(dict) = array.as_dictionary_opt::<Int32Type>() {
            let numbers = state.numbers(dict.values())?;
            drop(state);
            if numbers.iter().all(Option::is_some) {
                let dense: Vec<u32> = numbers.iter().map(|n| n.unwrap_or(0)).collect();
                let keys = dict.keys();
                // A null slot's key may be anything: `get` keeps it in range.
                let ids: Vec<u32> = keys
                    .values()
                    .iter()
                    .map(|&k| dense.get(k as usize).copied().unwrap_or(0))
                    .collect();
                return Ok(UInt32Array::new(ids.into(), keys.nulls().cloned()));
            }
            return Ok(Self::by_key(dict, &numbers));
        }
        if let Some(dict) = array.as_any_dictionary_opt() {
            let numbers = state.numbers(dict.values())?;
            drop(state);
            return Ok(Self::by_key(dict, &numbers));
        }
        // Not a dictionary after all (a cast upstream): number each row.
        let strings = cast(array, &DataType::Utf8)?;
        strings
            .as_string::<i32>()
            .iter()
            .map(|v| v.map(|s| state.id(s)).transpose())
            .collect()
    }

    /// Any dictionary's keys, through its values' numbers.
    fn by_key(dict: &dyn AnyDictionaryArray, numbers: &[Option<u32>]) -> UInt32Array {
        let nulls = dict.keys().logical_nulls();
        dict.normalized_keys()
            .into_iter()
            .enumerate()
            .map(|(i, k)| {
                if nulls.as_ref().is_some_and(|n| n.is_null(i)) {
                    None
                } else {
                    numbers.get(k).copied().flatten()
                }
            })
            .collect()
    }

    fn strings(&self, ids: &UInt32Array) -> Result<StringArray> {
        let state = self.state.lock().map_err(|_| {
            datafusion::error::DataFusionError::Internal("interner poisoned".into())
        })?;
        ids.iter()
            .map(|id| match id {
                None => Ok(None),
                Some(id) => match state.strings.get(id as usize) {
                    Some(s) => Ok(Some(s.as_ref())),
                    None => exec_err!("group key number {id} was never given"),
                },
            })
            .collect()
    }
}

/// `lumen_dict_intern(column)`: the column's strings as numbers.
#[derive(Debug)]
struct Intern {
    signature: Signature,
    interner: Arc<Interner>,
}

/// `lumen_dict_lookup(numbers)`: the strings back, in the column's type.
#[derive(Debug)]
struct Lookup {
    signature: Signature,
    interner: Arc<Interner>,
    output: DataType,
}

// One query's functions are equal when they share its interner.
impl PartialEq for Intern {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.interner, &other.interner)
    }
}
impl Eq for Intern {}
impl Hash for Intern {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.interner).hash(state);
    }
}
impl PartialEq for Lookup {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.interner, &other.interner) && self.output == other.output
    }
}
impl Eq for Lookup {}
impl Hash for Lookup {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.interner).hash(state);
        self.output.hash(state);
    }
}

fn nullable_like(args: &ReturnFieldArgs, t: DataType) -> FieldRef {
    let nullable = args.arg_fields.iter().any(|f| f.is_nullable());
    Arc::new(Field::new("", t, nullable))
}

impl ScalarUDFImpl for Intern {
    fn name(&self) -> &str {
        "lumen_dict_intern"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::UInt32)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        Ok(nullable_like(&args, DataType::UInt32))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        Ok(ColumnarValue::Array(Arc::new(
            self.interner.intern(&arrays[0])?,
        )))
    }
}

impl ScalarUDFImpl for Lookup {
    fn name(&self) -> &str {
        "lumen_dict_lookup"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(self.output.clone())
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        Ok(nullable_like(&args, self.output.clone()))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let Some(ids) = arrays[0].as_primitive_opt::<arrow::datatypes::UInt32Type>() else {
            return exec_err!("lumen_dict_lookup takes the numbers lumen_dict_intern gave");
        };
        let strings = self.interner.strings(ids)?;
        Ok(ColumnarValue::Array(cast(&strings, &self.output)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{DictionaryArray, Int64Array};
    use arrow::datatypes::Schema;
    use arrow::record_batch::RecordBatch;
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    /// Batches whose dictionaries differ (order, members, a null key and
    /// a null value), as Parquet row groups and hot buffers give them.
    fn table() -> MemTable {
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "service",
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                true,
            ),
            Field::new("status", DataType::Int64, false),
        ]));
        let batch = |keys: Vec<Option<i32>>, values: Vec<Option<&str>>, status: Vec<i64>| {
            let dict = DictionaryArray::<Int32Type>::try_new(
                keys.into(),
                Arc::new(StringArray::from(values)),
            )
            .unwrap();
            RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(dict), Arc::new(Int64Array::from(status))],
            )
            .unwrap()
        };
        let a = batch(
            vec![Some(0), Some(1), Some(0), None, Some(2)],
            vec![Some("reviews"), Some("ratings"), None],
            vec![200, 500, 200, 200, 503],
        );
        let b = batch(
            vec![Some(1), Some(1), Some(0), Some(2)],
            vec![Some("ratings"), Some("details"), Some("reviews")],
            vec![200, 200, 500, 200],
        );
        MemTable::try_new(schema.clone(), vec![vec![a.clone(), b.clone()], vec![b, a]]).unwrap()
    }

    async fn run(rule: bool, sql: &str) -> (String, Arc<Schema>) {
        let ctx = SessionContext::new();
        if rule {
            ctx.add_optimizer_rule(Arc::new(DictionaryGroupKeys));
        }
        ctx.register_table("t", Arc::new(table())).unwrap();
        let df = ctx.sql(sql).await.unwrap();
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await.unwrap();
        (pretty_format_batches(&batches).unwrap().to_string(), schema)
    }

    #[tokio::test]
    async fn grouping_by_dictionaries_answers_as_before() {
        for sql in [
            "SELECT service, count(*) AS n FROM t GROUP BY service ORDER BY service NULLS FIRST",
            "SELECT service, status, count(*) AS n FROM t GROUP BY service, status ORDER BY 1 NULLS FIRST, 2",
            "SELECT service, sum(status) AS s FROM t GROUP BY service HAVING count(*) > 2 ORDER BY s",
            "SELECT count(*) FROM (SELECT service FROM t GROUP BY service) AS x",
            "SELECT * FROM (SELECT service FROM t GROUP BY service UNION ALL SELECT service FROM t WHERE status = 503) AS u ORDER BY 1 NULLS FIRST",
        ] {
            let with = run(true, sql).await;
            let without = run(false, sql).await;
            assert_eq!(with.0, without.0, "{sql}");
            assert_eq!(with.1, without.1, "{sql}");
        }
    }

    #[tokio::test]
    async fn the_rule_is_what_runs() {
        let (plan, _) = run(
            true,
            "EXPLAIN SELECT service, count(*) FROM t GROUP BY service",
        )
        .await;
        assert!(plan.contains("lumen_dict_intern"), "{plan}");
        assert!(plan.contains("lumen_dict_lookup"), "{plan}");
    }
}
