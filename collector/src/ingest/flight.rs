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

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{Ingest, IngestError};
use crate::dedup::BatchId;

/// The Flight service, ready to add to a `tonic` server.
pub fn service(ingest: Ingest) -> FlightServiceServer<FlightIngest> {
    let limit = ingest.max_request_bytes();
    FlightServiceServer::new(FlightIngest { ingest }).max_decoding_message_size(limit)
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
        let batches: Vec<_> = FlightRecordBatchStream::new_from_flight_data(
            futures_util::stream::iter(messages.into_iter().map(Ok::<_, FlightError>)),
        )
        .try_collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("malformed Arrow IPC in DoPut: {e}")))?;
        self.ingest
            .arrow(&admitted, &table, origin, batches)
            .await
            .map_err(status_of)?;
        let ack = PutResult { app_metadata: id };
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
