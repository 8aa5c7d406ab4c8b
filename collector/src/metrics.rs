//! The collector's own metrics: what ingest took and refused, how the WAL,
//! flushes, compaction and retention fare, and what each table holds.
//! Served with the query service's on `/metrics` (they share a process).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::store::TableStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignalLabels {
    signal: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ItemLabels {
    signal: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExportLabels {
    endpoint: String,
    signal: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LabelLabels {
    label: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    table: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    table: &'static str,
    tier: &'static str,
}

/// Why a payload was not taken, as counted in
/// `lumen_ingest_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Malformed, too large, or otherwise not acceptable.
    Invalid,
    /// Too many payloads in progress.
    Busy,
    /// Rows waiting for Parquet past the memory bound.
    Memory,
    /// The WAL cannot be written (disk full, I/O error).
    Storage,
    Shutdown,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Invalid => "invalid",
            Refusal::Busy => "busy",
            Refusal::Memory => "memory",
            Refusal::Storage => "storage",
            Refusal::Shutdown => "shutdown",
        }
    }
}

/// WAL fsyncs: from 100 µs (page cache on fast disks) to 10 s (a disk in
/// trouble).
const FSYNC_BUCKETS_S: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0, 10.0,
];

#[derive(Debug)]
pub struct CollectorMetrics {
    registry: Registry,
    items: Family<ItemLabels, Counter>,
    payload_bytes: Family<SignalLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    fsync: Histogram,
    flushes: Family<OutcomeLabels, Counter>,
    compactions: Family<OutcomeLabels, Counter>,
    compacted_files: Counter,
    expired_files: Counter,
    expired_bytes: Counter,
    exported: Family<ExportLabels, Counter>,
    folded: Family<LabelLabels, Counter>,
    rows: Family<TierLabels, Gauge>,
    bytes: Family<TierLabels, Gauge>,
    files: Family<TableLabels, Gauge>,
}

impl Default for CollectorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CollectorMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lumen");
        let items = Family::<ItemLabels, Counter>::default();
        registry.register(
            "ingest_items",
            "Spans, data points and log records received, by signal and outcome (accepted, rejected)",
            items.clone(),
        );
        let payload_bytes = Family::<SignalLabels, Counter>::default();
        registry.register(
            "ingest_payload_bytes",
            "Bytes of OTLP payloads received (after decompression), by signal",
            payload_bytes.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "ingest_refused",
            "Payloads refused, by reason (invalid, busy, memory, storage, shutdown)",
            refused.clone(),
        );
        let fsync = Histogram::new(FSYNC_BUCKETS_S);
        registry.register(
            "wal_fsync_seconds",
            "Time of each WAL group commit's write and fsync",
            fsync.clone(),
        );
        let flushes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "flushes",
            "Flushes of hot rows to Parquet, by outcome",
            flushes.clone(),
        );
        let compactions = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "compactions",
            "Partitions compacted, by outcome",
            compactions.clone(),
        );
        let compacted_files = Counter::default();
        registry.register(
            "compacted_files",
            "Small Parquet files merged away by compaction",
            compacted_files.clone(),
        );
        let expired_files = Counter::default();
        registry.register(
            "retention_deleted_files",
            "Parquet files dropped for being past their table's retention",
            expired_files.clone(),
        );
        let expired_bytes = Counter::default();
        registry.register(
            "retention_deleted_bytes",
            "Bytes of Parquet files dropped for being past their table's retention",
            expired_bytes.clone(),
        );
        let exported = Family::<ExportLabels, Counter>::default();
        registry.register(
            "export_items",
            "Spans, data points and log records forwarded to OTLP endpoints, by endpoint, signal and outcome (sent, dropped_queue_full, dropped_rejected, dropped_retries_exhausted)",
            exported.clone(),
        );
        let folded = Family::<LabelLabels, Counter>::default();
        registry.register(
            "rollup_folded_requests",
            "Requests counted under `other` in rollups because their label had too many distinct values this hour, by label",
            folded.clone(),
        );
        let rows = Family::<TierLabels, Gauge>::default();
        registry.register(
            "table_rows",
            "Rows per table, in memory (hot) and in Parquet files",
            rows.clone(),
        );
        let bytes = Family::<TierLabels, Gauge>::default();
        registry.register(
            "table_bytes",
            "Bytes per table: memory of hot rows, size of Parquet files",
            bytes.clone(),
        );
        let files = Family::<TableLabels, Gauge>::default();
        registry.register("table_files", "Parquet files per table", files.clone());
        CollectorMetrics {
            registry,
            items,
            payload_bytes,
            refused,
            fsync,
            flushes,
            compactions,
            compacted_files,
            expired_files,
            expired_bytes,
            exported,
            folded,
            rows,
            bytes,
            files,
        }
    }

    pub fn received(&self, signal: &'static str, bytes: usize) {
        self.payload_bytes
            .get_or_create(&SignalLabels { signal })
            .inc_by(bytes as u64);
    }

    pub fn items(&self, signal: &'static str, accepted: usize, rejected: usize) {
        for (outcome, n) in [("accepted", accepted), ("rejected", rejected)] {
            if n > 0 {
                self.items
                    .get_or_create(&ItemLabels { signal, outcome })
                    .inc_by(n as u64);
            }
        }
    }

    pub fn refused(&self, why: Refusal) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: why.as_str(),
            })
            .inc();
    }

    pub fn fsync(&self, seconds: f64) {
        self.fsync.observe(seconds);
    }

    pub fn flushed(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.flushes.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub(crate) fn compacted(&self, ok: bool, files: usize) {
        let outcome = if ok { "ok" } else { "error" };
        self.compactions
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.compacted_files.inc_by(files as u64);
    }

    pub(crate) fn expired(&self, files: usize, bytes: u64) {
        self.expired_files.inc_by(files as u64);
        self.expired_bytes.inc_by(bytes);
    }

    pub(crate) fn folded(&self, label: &'static str, requests: u64) {
        self.folded
            .get_or_create(&LabelLabels { label })
            .inc_by(requests);
    }

    pub(crate) fn exported(
        &self,
        endpoint: &str,
        signal: &'static str,
        outcome: &'static str,
        n: usize,
    ) {
        self.exported
            .get_or_create(&ExportLabels {
                endpoint: endpoint.to_owned(),
                signal,
                outcome,
            })
            .inc_by(n as u64);
    }

    /// OpenMetrics text of these metrics, with the tables' sizes as of now.
    pub fn encode(&self, tables: &[TableStats]) -> String {
        for t in tables {
            let tier = |tier| TierLabels {
                table: t.table,
                tier,
            };
            self.rows.get_or_create(&tier("hot")).set(t.hot_rows as i64);
            self.rows
                .get_or_create(&tier("files"))
                .set(t.file_rows as i64);
            self.bytes
                .get_or_create(&tier("hot"))
                .set(t.hot_bytes as i64);
            self.bytes
                .get_or_create(&tier("files"))
                .set(t.file_bytes as i64);
            self.rows
                .get_or_create(&tier("other_collectors"))
                .set(t.other_rows as i64);
            self.bytes
                .get_or_create(&tier("other_collectors"))
                .set(t.other_bytes as i64);
            self.files
                .get_or_create(&TableLabels { table: t.table })
                .set(t.files as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
