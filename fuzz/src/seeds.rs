//! Seed inputs the fuzzers start from, built with the same encoders real
//! peers use (prost for OTLP protobuf, arrow-flight for `DoPut`, the
//! collector's own WAL writer, parquet's `ArrowWriter`). `tests/corpus.rs`
//! checks that the committed seeds still equal what these build, and
//! rewrites them with `LUMEN_FUZZ_WRITE_SEEDS=1`.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow_flight::{FlightData, FlightDescriptor};
use lumen_collector::store::Store;
use lumen_core::RequestRecord;
use prost::Message;

/// Splits a `DoPut` fuzz input into messages: each a 2-byte little-endian
/// length, then that many bytes (a short tail is the last message).
pub fn split_messages(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
        let rest = &data[2..];
        let (m, tail) = rest.split_at(len.min(rest.len()));
        out.push(m);
        data = tail;
    }
    out
}

/// The inverse of [`split_messages`].
pub fn join_messages(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        let len = u16::try_from(m.len()).expect("a seed message under 64 KiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(m);
    }
    out
}

/// Requests at a fixed time, so seeds are the same on every build.
pub fn fixed_requests() -> RecordBatch {
    let mut b = lumen_core::schema::RequestBatchBuilder::new();
    for i in 0..20u32 {
        let mut r = RequestRecord::example();
        r.status = if i % 5 == 0 { 503 } else { 200 };
        r.path = format!("/reviews/{i}");
        b.push(&r);
    }
    b.finish().expect("example rows make a batch")
}

/// A numbered `DoPut` of [`fixed_requests`] to `requests`, encoded as the
/// proxy encodes its batches (names as dictionaries).
pub fn flight_put() -> Vec<u8> {
    use arrow_flight::encode::{DictionaryHandling, FlightDataEncoderBuilder};
    use futures_util::TryStreamExt;
    let id: Vec<u8> = [[7u8; 16].as_slice(), &1u64.to_le_bytes()].concat();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let messages: Vec<FlightData> = rt
        .block_on(
            FlightDataEncoderBuilder::new()
                .with_flight_descriptor(Some(FlightDescriptor::new_path(vec!["requests".into()])))
                .with_metadata(id.into())
                .with_dictionary_handling(DictionaryHandling::Resend)
                .build(futures_util::stream::iter([Ok(fixed_requests())]))
                .try_collect(),
        )
        .expect("example rows encode");
    join_messages(
        &messages
            .iter()
            .map(Message::encode_to_vec)
            .collect::<Vec<_>>(),
    )
}

/// A WAL segment holding [`fixed_requests`], written by the collector.
pub fn wal_segment() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let (wal, writer, _) =
        lumen_collector::wal::open(dir.path(), Arc::new(Store::new())).expect("a WAL");
    rt.block_on(async {
        wal.append(vec![(0, fixed_requests())])
            .await
            .expect("rows appended");
        wal.close().await;
    });
    drop(wal);
    writer.join().expect("the writer ends");
    let mut segments: Vec<_> = std::fs::read_dir(dir.path())
        .expect("the WAL directory")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segments.sort();
    std::fs::read(segments.first().expect("a segment")).expect("the segment")
}

/// A Parquet file of [`fixed_requests`].
pub fn parquet_file() -> Vec<u8> {
    let batch = fixed_requests();
    let mut out = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None)
        .expect("a Parquet writer");
    w.write(&batch).expect("rows written");
    w.close().expect("footer written");
    out
}

/// An OTLP/JSON seed as protobuf (`signal` 0 traces, 1 metrics, 2 logs).
pub fn otlp_protobuf(signal: u8, json: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    use opentelemetry_proto::tonic::collector as c;
    Ok(match signal {
        0 => {
            serde_json::from_slice::<c::trace::v1::ExportTraceServiceRequest>(json)?.encode_to_vec()
        }
        1 => serde_json::from_slice::<c::metrics::v1::ExportMetricsServiceRequest>(json)?
            .encode_to_vec(),
        _ => serde_json::from_slice::<c::logs::v1::ExportLogsServiceRequest>(json)?.encode_to_vec(),
    })
}
