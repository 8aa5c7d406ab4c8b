//! Arrow batches in: what a Lumen proxy sends over Arrow Flight (`DoPut`).
//!
//! A batch is checked against its table's schema and cast where the types
//! differ but convert without loss (another dictionary key width, plain
//! strings for a dictionary column); rows are not converted one by one.

use arrow::array::{Array, ArrayRef, AsArray, new_null_array};
use arrow::compute::{CastOptions, can_cast_types, cast_with_options};
use arrow::datatypes::{SchemaRef, TimestampMicrosecondType};
use arrow::record_batch::RecordBatch;
use lumen_core::schema::TIME_COLUMN;

use super::convert::TimeWindow;

/// Fits `batch` to `schema`: columns by name, cast where needed. The error
/// names the column and says what is wrong.
pub fn conform(schema: &SchemaRef, batch: &RecordBatch) -> Result<RecordBatch, String> {
    let given = batch.schema();
    if let Some(extra) = given
        .fields()
        .iter()
        .find(|f| schema.field_with_name(f.name()).is_err())
    {
        return Err(format!("unknown column `{}`", extra.name()));
    }
    let strict = CastOptions {
        safe: false,
        ..CastOptions::default()
    };
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let column = match batch.column_by_name(field.name()) {
            None if field.is_nullable() => new_null_array(field.data_type(), batch.num_rows()),
            None => return Err(format!("missing column `{}`", field.name())),
            Some(c) if c.data_type() == field.data_type() => c.clone(),
            Some(c) if can_cast_types(c.data_type(), field.data_type()) => {
                cast_with_options(c, field.data_type(), &strict).map_err(|e| {
                    format!(
                        "column `{}`: cannot convert {} to {}: {e}",
                        field.name(),
                        c.data_type(),
                        field.data_type()
                    )
                })?
            }
            Some(c) => {
                return Err(format!(
                    "column `{}` is {}, expected {}",
                    field.name(),
                    c.data_type(),
                    field.data_type()
                ));
            }
        };
        if !field.is_nullable() && column.null_count() > 0 {
            return Err(format!(
                "column `{}` has {} nulls but may have none",
                field.name(),
                column.null_count()
            ));
        }
        columns.push(column);
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}

/// Refuses a batch with rows outside `window`, as OTLP spans are refused.
pub fn check_times(batch: &RecordBatch, window: TimeWindow) -> Result<(), String> {
    let Some(times) = batch.column_by_name(TIME_COLUMN) else {
        return Ok(());
    };
    let Some(times) = times.as_primitive_opt::<TimestampMicrosecondType>() else {
        return Ok(());
    };
    for (row, t) in times.iter().enumerate() {
        let Some(t) = t else { continue };
        let nanos = u64::try_from(t).unwrap_or(0).saturating_mul(1000);
        if nanos < window.min_nanos || nanos > window.max_nanos {
            return Err(format!(
                "row {row}: time {t} µs is outside the accepted window \
                 ({} days back, {} minutes ahead)",
                TimeWindow::MAX_AGE.as_secs() / 86400,
                TimeWindow::MAX_SKEW.as_secs() / 60
            ));
        }
    }
    Ok(())
}

/// A batch's memory, as ingest counts it against its limits.
pub fn batch_bytes(batches: &[RecordBatch]) -> usize {
    batches.iter().map(|b| b.get_array_memory_size()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow::array::{Int32Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use lumen_core::RequestRecord;
    use lumen_core::schema::{RequestBatchBuilder, requests_schema};

    #[test]
    fn a_batch_of_the_table_schema_passes_as_is() {
        let mut b = RequestBatchBuilder::new();
        b.push(&RequestRecord::example());
        let batch = b.finish().unwrap();
        let out = conform(&requests_schema(), &batch).unwrap();
        assert_eq!(out, batch);
    }

    #[test]
    fn castable_columns_are_cast_and_the_rest_refused_by_name() {
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "service",
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                false,
            ),
            Field::new("status", DataType::Int32, false),
            Field::new("note", DataType::Utf8, true),
        ]));
        let given = RecordBatch::try_from_iter([
            (
                "service",
                Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
            ),
            ("status", Arc::new(Int32Array::from(vec![200, 500]))),
        ])
        .unwrap();
        let out = conform(&schema, &given).unwrap();
        assert_eq!(out.schema(), schema);
        assert_eq!(out.column(2).null_count(), 2, "missing nullable column");

        let wrong = RecordBatch::try_from_iter([
            (
                "service",
                Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
            ),
            ("status", Arc::new(StringArray::from(vec!["ok"]))),
        ])
        .unwrap();
        let e = conform(&schema, &wrong).unwrap_err();
        assert!(e.contains("`status`"), "{e}");

        let extra = RecordBatch::try_from_iter([
            (
                "service",
                Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
            ),
            ("status", Arc::new(Int32Array::from(vec![1]))),
            ("colour", Arc::new(Int32Array::from(vec![1]))),
        ])
        .unwrap();
        assert_eq!(
            conform(&schema, &extra).unwrap_err(),
            "unknown column `colour`"
        );
        let missing = RecordBatch::try_from_iter([(
            "service",
            Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
        )])
        .unwrap();
        assert_eq!(
            conform(&schema, &missing).unwrap_err(),
            "missing column `status`"
        );
    }
}
