//! SQL functions over rollups' latency sketches:
//!
//! - `sketch_merge(duration_sketch)` — aggregate: the sketches of a group
//!   merged into one (as if every request had been added to it);
//! - `sketch_quantile(sketch, q)` — the duration (µs) at quantile `q`
//!   (0 ≤ q ≤ 1), within 1 % of the exact value.
//!
//! ```sql
//! SELECT destination_service,
//!        sketch_quantile(sketch_merge(duration_sketch), 0.99) AS p99_us
//! FROM rollups WHERE window_seconds = 60 GROUP BY 1
//! ```

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Builder};
use arrow::datatypes::{DataType, Float64Type};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::function::AccumulatorArgs;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use lumen_core::sketch::Sketch;

/// Registers the functions with a query's context.
pub fn register(ctx: &SessionContext) {
    ctx.register_udf(ScalarUDF::from(SketchQuantile::new()));
    ctx.register_udaf(AggregateUDF::from(SketchMerge::new()));
}

fn decode(name: &str, bytes: &[u8]) -> Result<Sketch> {
    Sketch::decode(bytes).or_else(|e| exec_err!("{name}: {e}"))
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct SketchQuantile {
    signature: Signature,
}

impl SketchQuantile {
    fn new() -> Self {
        SketchQuantile {
            signature: Signature::exact(
                vec![DataType::Binary, DataType::Float64],
                Volatility::Immutable,
            ),
        }
    }
}

impl ScalarUDFImpl for SketchQuantile {
    fn name(&self) -> &str {
        "sketch_quantile"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let (sketches, qs) = (
            arrays[0].as_binary::<i32>(),
            arrays[1].as_primitive::<Float64Type>(),
        );
        let mut out = Float64Builder::with_capacity(sketches.len());
        for i in 0..sketches.len() {
            if sketches.is_null(i) || qs.is_null(i) {
                out.append_null();
                continue;
            }
            let q = qs.value(i);
            if !(0.0..=1.0).contains(&q) {
                return exec_err!("sketch_quantile: the quantile must be between 0 and 1, got {q}");
            }
            out.append_option(decode(self.name(), sketches.value(i))?.quantile(q));
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct SketchMerge {
    signature: Signature,
}

impl SketchMerge {
    fn new() -> Self {
        SketchMerge {
            signature: Signature::exact(vec![DataType::Binary], Volatility::Immutable),
        }
    }
}

impl AggregateUDFImpl for SketchMerge {
    fn name(&self) -> &str {
        "sketch_merge"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Binary)
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(Merged::default()))
    }
}

/// The merge so far; its state is the merged sketch, encoded.
#[derive(Debug, Default)]
struct Merged {
    sketch: Sketch,
}

impl Merged {
    fn add(&mut self, values: &ArrayRef) -> Result<()> {
        let sketches = values.as_binary::<i32>();
        for i in 0..sketches.len() {
            if !sketches.is_null(i) {
                self.sketch
                    .merge(&decode("sketch_merge", sketches.value(i))?);
            }
        }
        Ok(())
    }
}

impl Accumulator for Merged {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.add(&values[0])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.add(&states[0])
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Binary(Some(self.sketch.to_bytes())))
    }

    fn size(&self) -> usize {
        // A map entry: index, count and the tree's overhead.
        std::mem::size_of::<Self>() + 48 * self.sketch.bucket_count()
    }
}
