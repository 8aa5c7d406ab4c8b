//! Bytes on disk per `requests` row: `lumen demo` records its traffic for a
//! while, stops (flushing to Parquet), and the files' own metadata says what
//! each column costs.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::{FileReader, SerializedFileReader};

pub struct Settings {
    pub duration: Duration,
    pub rps: u32,
}

/// One column's share of the files.
pub struct Column {
    pub name: String,
    pub bytes: u64,
    pub encodings: String,
}

pub struct Measured {
    pub files: usize,
    pub rows: u64,
    pub file_bytes: u64,
    pub columns: Vec<Column>,
    pub traces: u64,
}

/// Runs the demo into `dir` and measures what it wrote.
pub fn run(lumen: &Path, dir: &Path, set: &Settings) -> Result<Measured> {
    let data = dir.join("data");
    let secs = set.duration.as_secs().to_string();
    eprintln!("running lumen demo for {secs} s at {} rps…", set.rps);
    let log = File::create(dir.join("demo.log"))?;
    let status = Command::new(lumen)
        .args(["demo", "--duration", &secs, "--rps", &set.rps.to_string()])
        // One flush at the end: the file holds the whole run, as an hour's
        // compacted file would hold the hour.
        .args([
            "--flush-interval",
            &format!("{}s", set.duration.as_secs() + 60),
        ])
        .arg("--data-dir")
        .arg(&data)
        .args(["--otlp-grpc", "127.0.0.1:0", "--otlp-http", "127.0.0.1:0"])
        .args(["--query-addr", "127.0.0.1:0", "--pg-addr", "127.0.0.1:0"])
        .args(["--flight-sql-addr", "127.0.0.1:0"])
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .status()
        .context("starting lumen demo")?;
    if !status.success() {
        bail!(
            "lumen demo failed ({status}); see {}",
            dir.join("demo.log").display()
        );
    }
    measure(&data.join("tables/requests"))
}

pub fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    Ok(out)
}

pub fn measure(dir: &Path) -> Result<Measured> {
    let files = parquet_files(dir)?;
    if files.is_empty() {
        bail!("no Parquet files under {}", dir.display());
    }
    let (mut rows, mut file_bytes) = (0, 0);
    let mut columns: BTreeMap<usize, Column> = BTreeMap::new();
    let mut traces = HashSet::new();
    for path in &files {
        file_bytes += fs::metadata(path)?.len();
        let reader = SerializedFileReader::new(File::open(path)?)?;
        let meta = reader.metadata();
        rows += meta.file_metadata().num_rows() as u64;
        for rg in meta.row_groups() {
            for (i, c) in rg.columns().iter().enumerate() {
                let col = columns.entry(i).or_insert_with(|| Column {
                    name: c.column_path().string(),
                    bytes: 0,
                    encodings: format!("{:?}", c.encodings().collect::<Vec<_>>()),
                });
                col.bytes += c.compressed_size() as u64;
            }
        }
        // Distinct traces, for the floor: 16 bytes per trace.
        let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?;
        let index = builder
            .schema()
            .index_of("trace_id")
            .context("no trace_id column")?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
        for batch in builder.with_projection(mask).build()? {
            let batch = batch?;
            let ids = batch
                .column(0)
                .as_any()
                .downcast_ref::<arrow::array::FixedSizeBinaryArray>()
                .context("trace_id is not FixedSizeBinary")?;
            for id in ids.iter().flatten() {
                traces.insert(id.to_vec());
            }
        }
    }
    let mut columns: Vec<Column> = columns.into_values().collect();
    columns.sort_by_key(|c| std::cmp::Reverse(c.bytes));
    Ok(Measured {
        files: files.len(),
        rows,
        file_bytes,
        columns,
        traces: traces.len() as u64,
    })
}

pub fn render(command: &str, machine: &str, set: &Settings, m: &Measured) -> String {
    let per_row = |b: u64| b as f64 / m.rows.max(1) as f64;
    let floor = (8 * m.rows + 16 * m.traces) as f64 / m.rows.max(1) as f64;
    let mut s = crate::report::header(
        "Bytes on disk per `requests` row",
        command,
        &crate::report::now(),
        machine,
    );
    s.push_str(&format!(
        "- traffic: `lumen demo` for {} s at {} rps, one flush at the end\n",
        set.duration.as_secs(),
        set.rps
    ));
    s.push_str(&format!(
        "- {} rows in {} file(s), {} traces ({:.1} rows per trace)\n\n",
        m.rows,
        m.files,
        m.traces,
        m.rows as f64 / m.traces.max(1) as f64
    ));
    s.push_str(&format!(
        "**{:.2} bytes per row** on disk (goal ≤ 20); the ids' entropy alone \
         (8 random bytes of span id per row, 16 of trace id per trace) is {floor:.2}.\n\n",
        per_row(m.file_bytes)
    ));
    s.push_str("| column | bytes/row | encodings |\n|---|---:|---|\n");
    let mut in_columns = 0;
    for c in &m.columns {
        in_columns += c.bytes;
        s.push_str(&format!(
            "| {} | {:.2} | {} |\n",
            c.name,
            per_row(c.bytes),
            c.encodings
        ));
    }
    s.push_str(&format!(
        "| (footer, page index, headers) | {:.2} | |\n",
        per_row(m.file_bytes.saturating_sub(in_columns))
    ));
    s
}
