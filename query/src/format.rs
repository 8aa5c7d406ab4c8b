//! Query results on the wire: JSON rows, CSV, or an Arrow IPC stream.

use arrow::csv::WriterBuilder;
use arrow::error::ArrowError;
use arrow::ipc::writer::StreamWriter;

use crate::engine::QueryResult;

pub const JSON: &str = "application/json";
pub const CSV: &str = "text/csv";
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// The formats the SQL API can answer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Arrow,
}

impl Format {
    /// Picks a format from an `Accept` header; JSON unless CSV or Arrow is asked for.
    pub fn from_accept(accept: Option<&str>) -> Format {
        let accept = accept.unwrap_or("");
        for part in accept.split(',') {
            match part.split(';').next().unwrap_or("").trim() {
                CSV => return Format::Csv,
                ARROW_STREAM => return Format::Arrow,
                JSON => return Format::Json,
                _ => {}
            }
        }
        Format::Json
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => JSON,
            Format::Csv => "text/csv; charset=utf-8; header=present",
            Format::Arrow => ARROW_STREAM,
        }
    }

    pub fn encode(self, result: &QueryResult) -> Result<Vec<u8>, ArrowError> {
        let mut out = Vec::new();
        match self {
            Format::Json => {
                // An array of objects, one per row; nulls are kept as `null`
                // so every row has every column.
                let mut w = arrow::json::WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, arrow::json::writer::JsonArray>(&mut out);
                for b in &result.batches {
                    w.write(b)?;
                }
                w.finish()?;
                drop(w);
                if out.is_empty() {
                    out.extend_from_slice(b"[]");
                }
            }
            Format::Csv => {
                if result.num_rows() == 0 {
                    let names: Vec<&str> = result
                        .schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect();
                    out.extend_from_slice(names.join(",").as_bytes());
                    out.push(b'\n');
                } else {
                    let mut w = WriterBuilder::new().with_header(true).build(&mut out);
                    for b in &result.batches {
                        w.write(b)?;
                    }
                }
            }
            Format::Arrow => {
                let mut w = StreamWriter::try_new(&mut out, &result.schema)?;
                for b in &result.batches {
                    w.write(b)?;
                }
                w.finish()?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_picks_the_format() {
        assert_eq!(Format::from_accept(None), Format::Json);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Json);
        assert_eq!(Format::from_accept(Some("text/csv")), Format::Csv);
        assert_eq!(
            Format::from_accept(Some("application/vnd.apache.arrow.stream;q=1, */*")),
            Format::Arrow
        );
    }
}
