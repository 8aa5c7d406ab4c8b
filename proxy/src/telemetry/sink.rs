//! The two ways batches leave a proxy: Arrow Flight `DoPut` to Lumen's own
//! collector (columnar end to end, exactly once), or OTLP/gRPC spans to any
//! OpenTelemetry collector or Jaeger. Each encodes a batch once; retries
//! send the same bytes.

use std::sync::Arc;
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use arrow_flight::encode::{DictionaryHandling, FlightDataEncoderBuilder};
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{FlightData, FlightDescriptor};
use bytes::Bytes;
use futures_util::TryStreamExt;
use lumen_core::Workload;
use lumen_core::schema::REQUESTS;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

use super::channel::{CollectorTls, channel};

use super::export::{Payload, Queued};

/// Why an attempt failed.
#[derive(Debug)]
pub enum SendError {
    /// Worth trying again later (collector down, busy, slow).
    Retry(String),
    /// The collector will never take this batch.
    Reject(String),
}

fn classify(s: tonic::Status) -> SendError {
    let message = format!("{:?}: {}", s.code(), s.message());
    match s.code() {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated => SendError::Reject(message),
        _ => SendError::Retry(message),
    }
}

/// How batches are sent.
#[derive(Debug, Clone)]
pub enum Sink {
    Flight(FlightSink),
    Otlp(OtlpSink),
}

impl Sink {
    pub fn flight(endpoint: &str, timeout: Duration, tls: &CollectorTls) -> Result<Sink, String> {
        Ok(Sink::Flight(FlightSink {
            client: FlightServiceClient::new(channel(endpoint, timeout, tls)?),
        }))
    }

    pub fn otlp(
        endpoint: &str,
        timeout: Duration,
        tls: &CollectorTls,
        identity: &Workload,
    ) -> Result<Sink, String> {
        Ok(Sink::Otlp(OtlpSink {
            grpc: tonic::client::Grpc::new(channel(endpoint, timeout, tls)?),
            resource: Arc::new(resource(identity)),
        }))
    }

    /// The protocol's name, as metrics label it.
    pub fn protocol(&self) -> &'static str {
        match self {
            Sink::Flight(_) => "arrow",
            Sink::Otlp(_) => "otlp",
        }
    }

    /// Encodes a batch for the wire, once.
    pub async fn encode(&self, id: &Bytes, batch: RecordBatch) -> Result<Payload, String> {
        match self {
            Sink::Flight(_) => {
                let frames: Vec<FlightData> = FlightDataEncoderBuilder::new()
                    .with_flight_descriptor(Some(FlightDescriptor::new_path(vec![
                        REQUESTS.to_string(),
                    ])))
                    .with_metadata(id.clone())
                    // Names travel as dictionaries, as they are stored.
                    .with_dictionary_handling(DictionaryHandling::Resend)
                    .build(futures_util::stream::iter([Ok(batch)]))
                    .try_collect()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Payload::Flight(frames))
            }
            Sink::Otlp(s) => Ok(Payload::Otlp(Bytes::from(
                s.request(&batch)?.encode_to_vec(),
            ))),
        }
    }

    /// One attempt at sending a queued batch.
    pub async fn send(&mut self, q: &Queued) -> Result<(), SendError> {
        match (self, &q.payload) {
            (Sink::Flight(s), Payload::Flight(frames)) => s.send(&q.id, frames).await,
            (Sink::Otlp(s), Payload::Otlp(bytes)) => s.send(bytes.clone()).await,
            _ => Err(SendError::Reject(
                "batch encoded for another protocol".into(),
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FlightSink {
    client: FlightServiceClient<Channel>,
}

impl FlightSink {
    async fn send(&mut self, id: &Bytes, frames: &[FlightData]) -> Result<(), SendError> {
        // Cloning a frame copies pointers: its buffers are shared `Bytes`.
        let request = futures_util::stream::iter(frames.to_vec());
        let mut acks = self
            .client
            .do_put(request)
            .await
            .map_err(classify)?
            .into_inner();
        match acks.message().await.map_err(classify)? {
            Some(ack) if ack.app_metadata == *id => Ok(()),
            Some(_) => Err(SendError::Retry(
                "the collector acknowledged another batch".into(),
            )),
            None => Err(SendError::Retry(
                "the collector ended the call without an acknowledgement".into(),
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct OtlpSink {
    grpc: tonic::client::Grpc<Channel>,
    resource: Arc<Resource>,
}

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

impl OtlpSink {
    async fn send(&mut self, request: Bytes) -> Result<(), SendError> {
        self.grpc
            .ready()
            .await
            .map_err(|e| SendError::Retry(e.to_string()))?;
        self.grpc
            .unary(
                tonic::Request::new(request),
                http::uri::PathAndQuery::from_static(EXPORT_PATH),
                lumen_core::otlp::PassThrough,
            )
            .await
            .map(|_| ())
            .map_err(classify)
    }

    /// The batch's rows as OTLP spans of this proxy's resource.
    fn request(&self, batch: &RecordBatch) -> Result<ExportTraceServiceRequest, String> {
        let spans = lumen_core::otlp::request_spans(batch)?;
        Ok(ExportTraceServiceRequest {
            resource_spans: vec![lumen_core::otlp::proxy_resource_spans(
                (*self.resource).clone(),
                spans,
            )],
        })
    }
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn resource(identity: &Workload) -> Resource {
    let s = |v: &str| any_value::Value::StringValue(v.into());
    Resource {
        attributes: vec![
            kv("service.name", s(&identity.service)),
            kv("service.namespace", s(&identity.namespace)),
            kv("service.version", s(&identity.version)),
            kv("lumen.workload", s(&identity.workload)),
        ],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_flight::decode::FlightRecordBatchStream;
    use lumen_core::RequestRecord;
    use lumen_core::schema::RequestBatchBuilder;

    #[tokio::test]
    async fn a_slice_of_a_batch_goes_on_the_wire_as_just_its_rows() {
        let mut b = RequestBatchBuilder::new();
        for i in 0..10 {
            b.push(&RequestRecord {
                path: format!("/{i}"),
                ..RequestRecord::example()
            });
        }
        let batch = b.finish().unwrap();
        let part = batch.slice(3, 4);
        let sink = Sink::flight(
            "http://127.0.0.1:9",
            Duration::from_secs(1),
            &CollectorTls::default(),
        )
        .unwrap();
        let Payload::Flight(frames) = sink
            .encode(&Bytes::from_static(b"id"), part.clone())
            .await
            .unwrap()
        else {
            panic!("Flight sink made another payload");
        };
        assert_eq!(frames[0].app_metadata, Bytes::from_static(b"id"));
        let decoded: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(
            futures_util::stream::iter(frames.into_iter().map(Ok)),
        )
        .try_collect()
        .await
        .unwrap();
        assert_eq!(decoded.len(), 1);
        assert_eq!(decoded[0], part);
    }
}
