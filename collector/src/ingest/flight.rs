//! Arrow Flight receiver: Lumen proxies `DoPut` their request records as
//! Arrow record batches, on the same gRPC port as OTLP (4317).
//!
//! One `DoPut` call carries one numbered batch (its record batches are
//! stored together, as one WAL entry): the first message's flight
//! descriptor names the table (path `["requests"]`) and its `app_metadata`
//! holds the 24-byte batch id (16 bytes of producer instance, then the
//! sequence, little-endian). The answer — one `PutResult` echoing the id —
//! comes once the rows are fsynced in the WAL; a retried batch whose first
//! attempt was stored is answered the same way without being stored again.
//! Errors: `INVALID_ARGUMENT` for a batch that cannot be stored (do not
//! retry), `UNAVAILABLE` while the collector is busy or cannot write (retry
//! with backoff).

use arrow::record_batch::RecordBatch;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{Admission, Ingest, IngestError};
use crate::dedup::BatchId;

/// The Flight service, ready to add to a `tonic` server.
pub fn service(ingest: Ingest) -> FlightServiceServer<FlightIngest> {
    let limit = ingest.max_request_bytes();
    FlightServiceServer::new(FlightIngest::new(ingest)).max_decoding_message_size(limit)
}

#[derive(Debug, Clone)]
pub struct FlightIngest {
    ingest: Ingest,
}

fn status_of(e: IngestError) -> Status {
    e.to_status()
}

fn unsupported<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "Lumen's collector takes rows with DoPut only; {what} is served by the query \
         service's Flight SQL endpoint"
    )))
}

impl FlightIngest {
    pub fn new(ingest: Ingest) -> Self {
        FlightIngest { ingest }
    }

    /// Stores the messages of one whole `DoPut` stream (the table and batch
    /// id in the first); the answer echoes the id once the rows are in the
    /// WAL.
    pub async fn put(
        &self,
        admitted: &Admission,
        messages: Vec<FlightData>,
    ) -> Result<PutResult, Status> {
        let Some(first) = messages.first() else {
            return Err(Status::invalid_argument("empty DoPut stream"));
        };
        let table = table_of(first.flight_descriptor.as_ref())?;
        let id = first.app_metadata.clone();
        let origin = if id.is_empty() {
            None
        } else {
            Some(BatchId::decode(&id).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "app_metadata of the first message must be a {}-byte batch id, got {} bytes",
                    BatchId::ENCODED_LEN,
                    id.len()
                ))
            })?)
        };
        check_declared_sizes(&messages, self.ingest.max_request_bytes())?;
        let batches = decode(messages, "DoPut")?;
        self.ingest
            .arrow(admitted, &table, origin, batches)
            .await
            .map_err(status_of)?;
        Ok(PutResult { app_metadata: id })
    }

    /// Reads a whole `DoPut` stream, bounded by the request size limit.
    async fn read(&self, mut stream: Streaming<FlightData>) -> Result<Vec<FlightData>, Status> {
        let limit = self.ingest.max_request_bytes();
        let mut total = 0usize;
        let mut messages = Vec::new();
        while let Some(m) = stream.message().await? {
            total += m.data_header.len() + m.data_body.len() + m.app_metadata.len();
            if total > limit {
                return Err(Status::invalid_argument(format!(
                    "batch of more than {limit} bytes; send smaller batches"
                )));
            }
            messages.push(m);
        }
        Ok(messages)
    }
}

/// Every buffer must lie inside its message ([`lumen_core::ipc`]), and
/// compressed buffers declare their decompressed size, which the decoder
/// allocates at once; the total is held to the same limit as a gzip or
/// zstd OTLP payload once inflated.
fn check_declared_sizes(messages: &[FlightData], limit: usize) -> Result<(), Status> {
    for (i, m) in messages.iter().enumerate() {
        lumen_core::ipc::check_buffers(&m.data_header, &m.data_body).map_err(|e| {
            Status::invalid_argument(format!("malformed Arrow IPC in DoPut message {i}: {e}"))
        })?;
    }
    let declared = messages.iter().fold(0u64, |n, m| {
        n.saturating_add(lumen_core::ipc::declared_decompressed_size(
            &m.data_header,
            &m.data_body,
        ))
    });
    if declared > limit as u64 {
        return Err(Status::invalid_argument(format!(
            "compressed Arrow IPC buffers declare {declared} bytes once decompressed, over the limit of {limit}"
        )));
    }
    Ok(())
}

/// Decodes the whole messages of one `DoPut` (`what`, for errors) into
/// record batches. Every message is in hand, so decoding finishes in one
/// poll; it runs guarded ([`lumen_core::ipc::guarded`]), as arrow's decoder
/// panics on some inconsistent batches. Also the Flight SQL parameters'.
pub fn decode(messages: Vec<FlightData>, what: &str) -> Result<Vec<RecordBatch>, Status> {
    let decoded = lumen_core::ipc::guarded(|| {
        FlightRecordBatchStream::new_from_flight_data(futures_util::stream::iter(
            messages.into_iter().map(Ok::<_, FlightError>),
        ))
        .try_collect::<Vec<_>>()
        .now_or_never()
    });
    match decoded {
        Ok(Some(Ok(batches))) => Ok(batches),
        Ok(Some(Err(e))) => Err(Status::invalid_argument(format!(
            "malformed Arrow IPC in {what}: {e}"
        ))),
        Ok(None) => Err(Status::internal(format!(
            "{what}: decoding did not complete"
        ))),
        Err(e) => Err(Status::invalid_argument(format!("{what}: {e}"))),
    }
}

/// The table a descriptor names: a path of one element.
fn table_of(descriptor: Option<&FlightDescriptor>) -> Result<String, Status> {
    let path = descriptor.map(|d| d.path.as_slice()).unwrap_or_default();
    match path {
        [table] => Ok(table.clone()),
        _ => Err(Status::invalid_argument(
            "the first message's flight descriptor must name the table as a one-element path, \
             e.g. [\"requests\"]",
        )),
    }
}

#[tonic::async_trait]
impl FlightService for FlightIngest {
    type HandshakeStream = BoxStream<'static, Result<HandshakeResponse, Status>>;
    type ListFlightsStream = BoxStream<'static, Result<FlightInfo, Status>>;
    type DoGetStream = BoxStream<'static, Result<FlightData, Status>>;
    type DoPutStream = BoxStream<'static, Result<PutResult, Status>>;
    type DoActionStream = BoxStream<'static, Result<arrow_flight::Result, Status>>;
    type ListActionsStream = BoxStream<'static, Result<ActionType, Status>>;
    type DoExchangeStream = BoxStream<'static, Result<FlightData, Status>>;

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        let admitted = self.ingest.admit().await.map_err(status_of)?;
        let messages = self.read(request.into_inner()).await?;
        let ack = self.put(&admitted, messages).await?;
        Ok(Response::new(
            futures_util::stream::once(async move { Ok(ack) }).boxed(),
        ))
    }

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        unsupported("Handshake")
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        unsupported("ListFlights")
    }

    async fn get_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        unsupported("GetFlightInfo")
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        unsupported("PollFlightInfo")
    }

    async fn get_schema(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        unsupported("GetSchema")
    }

    async fn do_get(
        &self,
        _request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        unsupported("DoGet")
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        unsupported("DoExchange")
    }

    async fn do_action(
        &self,
        _request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        unsupported("DoAction")
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        unsupported("ListActions")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::ipc::CompressionType;
    use arrow::ipc::writer::IpcWriteOptions;
    use arrow::record_batch::RecordBatch;
    use arrow_flight::encode::FlightDataEncoderBuilder;
    use std::sync::Arc;

    /// 4096 rows of one zstd-compressed Int64 column, as Flight messages.
    async fn compressed() -> Vec<FlightData> {
        let batch = RecordBatch::try_from_iter([(
            "n",
            Arc::new(Int64Array::from(vec![7i64; 4096])) as arrow::array::ArrayRef,
        )])
        .unwrap();
        let options = IpcWriteOptions::default()
            .try_with_compression(Some(CompressionType::ZSTD))
            .unwrap();
        FlightDataEncoderBuilder::new()
            .with_options(options)
            .build(futures_util::stream::iter([Ok(batch)]))
            .try_collect()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_compressed_batch_declaring_a_terabyte_is_refused_before_decoding() {
        let messages = compressed().await;
        // The real batch: 32 KiB once decompressed, within a 1 MiB limit.
        check_declared_sizes(&messages, 1 << 20).unwrap();
        let decoded: Vec<_> = FlightRecordBatchStream::new_from_flight_data(
            futures_util::stream::iter(messages.clone().into_iter().map(Ok::<_, FlightError>)),
        )
        .try_collect()
        .await
        .unwrap();
        assert_eq!(decoded[0].num_rows(), 4096);
        // Within 16 KiB it is refused: the limit counts decompressed bytes.
        let err = check_declared_sizes(&messages, 16 << 10).unwrap_err();
        assert!(err.message().contains("over the limit of 16384"), "{err}");

        // The same bytes with the value buffer's length prefix set to 1 TiB.
        let mut bomb = messages;
        let m = bomb.iter_mut().find(|m| !m.data_body.is_empty()).unwrap();
        let message = arrow::ipc::root_as_message(&m.data_header).unwrap();
        let buffers = message.header_as_record_batch().unwrap().buffers().unwrap();
        let values = buffers.iter().find(|b| b.length() >= 8).unwrap();
        let at = values.offset() as usize;
        let mut body = m.data_body.to_vec();
        body[at..at + 8].copy_from_slice(&(1i64 << 40).to_le_bytes());
        m.data_body = body.into();
        let err = check_declared_sizes(&bomb, 1 << 20).unwrap_err();
        assert!(err.message().contains("1099511627776 bytes"), "{err}");
    }

    /// Found by fuzzing: a header whose buffers run past the body made
    /// arrow's decoder panic ("the offset of the new Buffer cannot exceed
    /// the existing length"); the DoPut is refused instead.
    #[tokio::test]
    async fn a_batch_whose_buffers_run_past_its_body_is_refused_not_decoded() {
        let mut messages = compressed().await;
        let m = messages
            .iter_mut()
            .find(|m| !m.data_body.is_empty())
            .unwrap();
        m.data_body = m.data_body.slice(..m.data_body.len() / 2);
        let err = check_declared_sizes(&messages, 1 << 20).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("lies outside the message body"),
            "{err}"
        );
    }
}
