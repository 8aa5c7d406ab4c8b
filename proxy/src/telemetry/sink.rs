//! The two ways batches leave a proxy: Arrow Flight `DoPut` to Lumen's own
//! collector (columnar end to end, exactly once), or OTLP/gRPC spans to any
//! OpenTelemetry collector or Jaeger. Each encodes a batch once; retries
//! send the same bytes.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    Array, AsArray, BooleanArray, DictionaryArray, FixedSizeBinaryArray, Int32Array, Int64Array,
    StringArray,
};
use arrow::datatypes::{Int32Type, TimestampMicrosecondType};
use arrow::record_batch::RecordBatch;
use arrow_flight::encode::{DictionaryHandling, FlightDataEncoderBuilder};
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{FlightData, FlightDescriptor};
use bytes::{Buf, BufMut, Bytes};
use futures_util::TryStreamExt;
use lumen_core::Workload;
use lumen_core::schema::{PROXY_SCOPE, REQUESTS, attr};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use prost::Message;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};

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

fn channel(endpoint: &str, timeout: Duration) -> Result<Channel, String> {
    // Lazy: the collector may start after the proxy, or restart under it.
    Ok(Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| format!("collector endpoint `{endpoint}`: {e}"))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

impl Sink {
    pub fn flight(endpoint: &str, timeout: Duration) -> Result<Sink, String> {
        Ok(Sink::Flight(FlightSink {
            client: FlightServiceClient::new(channel(endpoint, timeout)?),
        }))
    }

    pub fn otlp(endpoint: &str, timeout: Duration, identity: &Workload) -> Result<Sink, String> {
        Ok(Sink::Otlp(OtlpSink {
            grpc: tonic::client::Grpc::new(channel(endpoint, timeout)?),
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
                PassThrough,
            )
            .await
            .map(|_| ())
            .map_err(classify)
    }

    /// The batch's rows as OTLP spans of this proxy's resource.
    fn request(&self, batch: &RecordBatch) -> Result<ExportTraceServiceRequest, String> {
        let c = Columns::of(batch)?;
        let spans = (0..batch.num_rows()).map(|i| c.span(i)).collect();
        Ok(ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some((*self.resource).clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: PROXY_SCOPE.into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
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

/// Typed views of a `requests` batch's columns.
struct Columns<'a> {
    time: &'a arrow::array::PrimitiveArray<TimestampMicrosecondType>,
    duration_us: &'a Int64Array,
    names: Vec<(
        &'static str,
        &'a DictionaryArray<Int32Type>,
        &'a StringArray,
    )>,
    method: usize,
    destination_service: usize,
    reporter: usize,
    status: &'a Int32Array,
    grpc_status: &'a Int32Array,
    ints: Vec<(&'static str, &'a dyn Array)>,
    upstream: (&'a DictionaryArray<Int32Type>, &'a StringArray),
    mtls: &'a BooleanArray,
    trace_id: &'a FixedSizeBinaryArray,
    span_id: &'a FixedSizeBinaryArray,
    parent_span_id: &'a FixedSizeBinaryArray,
}

impl<'a> Columns<'a> {
    fn of(b: &'a RecordBatch) -> Result<Self, String> {
        let col = |name: &str| {
            b.column_by_name(name)
                .ok_or_else(|| format!("batch has no `{name}` column"))
        };
        let dict =
            |name: &str| -> Result<(&'a DictionaryArray<Int32Type>, &'a StringArray), String> {
                let d = col(name)?
                    .as_dictionary_opt::<Int32Type>()
                    .ok_or_else(|| format!("`{name}` is not a dictionary"))?;
                let v = d
                    .values()
                    .as_string_opt::<i32>()
                    .ok_or_else(|| format!("`{name}` values are not strings"))?;
                Ok((d, v))
            };
        let names_spec: [(&'static str, &'static str); 15] = [
            ("reporter", attr::REPORTER),
            ("source_service", attr::SOURCE_SERVICE),
            ("source_workload", attr::SOURCE_WORKLOAD),
            ("source_namespace", attr::SOURCE_NAMESPACE),
            ("source_version", attr::SOURCE_VERSION),
            ("destination_service", attr::DESTINATION_SERVICE),
            ("destination_workload", attr::DESTINATION_WORKLOAD),
            ("destination_namespace", attr::DESTINATION_NAMESPACE),
            ("destination_version", attr::DESTINATION_VERSION),
            ("protocol", attr::PROTOCOL),
            ("method", attr::METHOD),
            ("authority", attr::AUTHORITY),
            ("path", attr::PATH),
            ("route", attr::ROUTE),
            ("response_flags", attr::RESPONSE_FLAGS),
        ];
        let mut names = Vec::with_capacity(names_spec.len());
        for (column, key) in names_spec {
            let (d, v) = dict(column)?;
            names.push((key, d, v));
        }
        let position = |key: &str| names.iter().position(|(k, ..)| *k == key).unwrap_or(0);
        let prim = |name: &str| -> Result<&'a dyn Array, String> { Ok(col(name)?.as_ref()) };
        let ids = |name: &str| {
            col(name)?
                .as_fixed_size_binary_opt()
                .ok_or_else(|| format!("`{name}` is not fixed-size binary"))
        };
        Ok(Columns {
            time: col("time")?
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or("`time` is not a timestamp")?,
            duration_us: col("duration_us")?
                .as_primitive_opt()
                .ok_or("`duration_us` is not int64")?,
            method: position(attr::METHOD),
            destination_service: position(attr::DESTINATION_SERVICE),
            reporter: position(attr::REPORTER),
            names,
            status: col("status")?
                .as_primitive_opt()
                .ok_or("`status` is not int32")?,
            grpc_status: col("grpc_status")?
                .as_primitive_opt()
                .ok_or("`grpc_status` is not int32")?,
            ints: vec![
                (attr::REQUEST_BYTES, prim("request_bytes")?),
                (attr::RESPONSE_BYTES, prim("response_bytes")?),
                (attr::RETRIES, prim("retries")?),
            ],
            upstream: dict("upstream_address")?,
            mtls: col("mtls")?
                .as_boolean_opt()
                .ok_or("`mtls` is not boolean")?,
            trace_id: ids("trace_id")?,
            span_id: ids("span_id")?,
            parent_span_id: ids("parent_span_id")?,
        })
    }

    fn name(&self, which: usize, row: usize) -> &'a str {
        let (_, d, v) = &self.names[which];
        if d.is_null(row) {
            return "";
        }
        v.value(d.keys().value(row) as usize)
    }

    fn span(&self, i: usize) -> Span {
        let s = |v: &str| any_value::Value::StringValue(v.into());
        let mut attributes: Vec<KeyValue> = (0..self.names.len())
            .map(|n| kv(self.names[n].0, s(self.name(n, i))))
            .collect();
        attributes.push(kv(
            attr::STATUS,
            any_value::Value::IntValue(i64::from(self.status.value(i))),
        ));
        for (key, column) in &self.ints {
            let v = if let Some(a) = column.as_primitive_opt::<arrow::datatypes::Int64Type>() {
                a.value(i)
            } else if let Some(a) = column.as_primitive_opt::<Int32Type>() {
                i64::from(a.value(i))
            } else {
                0
            };
            attributes.push(kv(key, any_value::Value::IntValue(v)));
        }
        attributes.push(kv(
            attr::MTLS,
            any_value::Value::BoolValue(self.mtls.value(i)),
        ));
        let grpc = (!self.grpc_status.is_null(i)).then(|| self.grpc_status.value(i));
        if let Some(g) = grpc {
            attributes.push(kv(
                attr::GRPC_STATUS,
                any_value::Value::IntValue(i64::from(g)),
            ));
        }
        let (ud, uv) = self.upstream;
        if !ud.is_null(i) {
            let u = uv.value(ud.keys().value(i) as usize);
            attributes.push(kv(attr::UPSTREAM_ADDRESS, s(u)));
        }
        let start = self.time.value(i).max(0) as u64 * 1000;
        let end = start + self.duration_us.value(i).max(0) as u64 * 1000;
        let failed = self.status.value(i) >= 500 || grpc.is_some_and(|g| g != 0);
        let client = self.name(self.reporter, i) == "source";
        Span {
            trace_id: self.trace_id.value(i).to_vec(),
            span_id: self.span_id.value(i).to_vec(),
            parent_span_id: if self.parent_span_id.is_null(i) {
                Vec::new()
            } else {
                self.parent_span_id.value(i).to_vec()
            },
            name: format!(
                "{} {}",
                self.name(self.method, i),
                self.name(self.destination_service, i)
            ),
            kind: if client {
                span::SpanKind::Client
            } else {
                span::SpanKind::Server
            } as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            attributes,
            status: failed.then(|| Status {
                code: status::StatusCode::Error as i32,
                message: String::new(),
            }),
            ..Default::default()
        }
    }
}

/// Sends pre-encoded protobuf bytes and ignores the (empty) answer.
#[derive(Debug, Clone, Copy)]
struct PassThrough;

impl Codec for PassThrough {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = PassThrough;
    type Decoder = PassThrough;

    fn encoder(&mut self) -> Self::Encoder {
        PassThrough
    }

    fn decoder(&mut self) -> Self::Decoder {
        PassThrough
    }
}

impl Encoder for PassThrough {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for PassThrough {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        src.advance(src.remaining());
        Ok(Some(()))
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
        let sink = Sink::flight("http://127.0.0.1:9", Duration::from_secs(1)).unwrap();
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
