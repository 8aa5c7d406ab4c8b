//! An Arrow Flight producer, as a Lumen sidecar talks to the collector:
//! numbered batches sent with `DoPut`.

use anyhow::Result;
use arrow::array::RecordBatch;
use arrow_flight::encode::{DictionaryHandling, FlightDataEncoderBuilder};
use arrow_flight::error::FlightError;
use arrow_flight::{FlightClient, FlightDescriptor, PutResult};
use bytes::Bytes;
use futures_util::TryStreamExt;
use lumen_core::RequestRecord;
use lumen_core::schema::RequestBatchBuilder;

use crate::UpPorts;

/// A batch id as the collector reads it: 16 bytes of producer, then the
/// sequence number, little-endian.
pub fn batch_id(producer: [u8; 16], seq: u64) -> Bytes {
    let mut v = producer.to_vec();
    v.extend_from_slice(&seq.to_le_bytes());
    Bytes::from(v)
}

/// A Flight client of `lumen up`'s gRPC port.
pub async fn client(ports: &UpPorts) -> Result<FlightClient> {
    let channel = tonic::transport::Endpoint::from_shared(ports.grpc_endpoint())?
        .connect()
        .await?;
    Ok(FlightClient::new(channel))
}

/// `DoPut`s one batch into `table` under `id`; `dictionaries` says whether
/// dictionary columns go as they are or as plain values (which the
/// collector must cast back).
pub async fn put(
    client: &mut FlightClient,
    table: &str,
    id: Bytes,
    batch: RecordBatch,
    dictionaries: DictionaryHandling,
) -> Result<Vec<PutResult>, FlightError> {
    let stream = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(FlightDescriptor::new_path(vec![table.to_string()])))
        .with_metadata(id)
        .with_dictionary_handling(dictionaries)
        .build(futures_util::stream::iter([Ok(batch)]));
    client.do_put(stream).await?.try_collect().await
}

/// Sends `records` into `requests` as one batch numbered `seq` of
/// `producer`, as a sidecar does (dictionaries as they are).
pub async fn put_records(
    client: &mut FlightClient,
    producer: [u8; 16],
    seq: u64,
    records: &[RequestRecord],
) -> Result<()> {
    let mut b = RequestBatchBuilder::new();
    for r in records {
        b.push(r);
    }
    put(
        client,
        "requests",
        batch_id(producer, seq),
        b.finish()?,
        DictionaryHandling::Resend,
    )
    .await?;
    Ok(())
}
