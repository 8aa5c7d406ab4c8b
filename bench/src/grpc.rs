//! The gRPC cases of the proxy benchmark: a minimal gRPC app as the
//! upstream, and the one framed request every load request sends. Unary
//! calls go to OTLP's trace service, answered at once; server-streaming
//! calls go to Arrow Flight's `DoGet`, answered with a fixed stream of
//! messages.

use anyhow::{Context, Result, bail};
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures_util::StreamExt;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

/// The method every unary load request calls.
pub const PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The method every server-streaming load request calls.
pub const STREAM_PATH: &str = "/arrow.flight.protocol.FlightService/DoGet";

/// Messages in each streamed answer, and the bytes of each one's body:
/// a 16 KiB answer in 16 messages, as a paged listing or a query result
/// arrives.
pub const STREAM_MESSAGES: usize = 16;
pub const STREAM_MESSAGE_BYTES: usize = 1024;

struct Sink;

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        _req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Flight's `DoGet` and nothing else: every ticket gets the same stream.
struct Batches;

type Stream<T> =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

fn unimplemented<T>() -> Result<tonic::Response<T>, tonic::Status> {
    Err(tonic::Status::unimplemented(
        "the bench's Flight app answers DoGet only",
    ))
}

#[tonic::async_trait]
impl FlightService for Batches {
    type HandshakeStream = Stream<HandshakeResponse>;
    type ListFlightsStream = Stream<FlightInfo>;
    type DoGetStream = Stream<FlightData>;
    type DoPutStream = Stream<PutResult>;
    type DoExchangeStream = Stream<FlightData>;
    type DoActionStream = Stream<arrow_flight::Result>;
    type ListActionsStream = Stream<ActionType>;

    async fn do_get(
        &self,
        _req: tonic::Request<Ticket>,
    ) -> Result<tonic::Response<Self::DoGetStream>, tonic::Status> {
        let body = bytes::Bytes::from(vec![7u8; STREAM_MESSAGE_BYTES]);
        let messages = (0..STREAM_MESSAGES).map(move |i| {
            Ok(FlightData {
                app_metadata: (i as u32).to_be_bytes().to_vec().into(),
                data_body: body.clone(),
                ..Default::default()
            })
        });
        Ok(tonic::Response::new(Box::pin(futures_util::stream::iter(
            messages,
        ))))
    }

    async fn handshake(
        &self,
        _req: tonic::Request<tonic::Streaming<HandshakeRequest>>,
    ) -> Result<tonic::Response<Self::HandshakeStream>, tonic::Status> {
        unimplemented()
    }
    async fn list_flights(
        &self,
        _req: tonic::Request<Criteria>,
    ) -> Result<tonic::Response<Self::ListFlightsStream>, tonic::Status> {
        unimplemented()
    }
    async fn get_flight_info(
        &self,
        _req: tonic::Request<FlightDescriptor>,
    ) -> Result<tonic::Response<FlightInfo>, tonic::Status> {
        unimplemented()
    }
    async fn poll_flight_info(
        &self,
        _req: tonic::Request<FlightDescriptor>,
    ) -> Result<tonic::Response<PollInfo>, tonic::Status> {
        unimplemented()
    }
    async fn get_schema(
        &self,
        _req: tonic::Request<FlightDescriptor>,
    ) -> Result<tonic::Response<SchemaResult>, tonic::Status> {
        unimplemented()
    }
    async fn do_put(
        &self,
        _req: tonic::Request<tonic::Streaming<FlightData>>,
    ) -> Result<tonic::Response<Self::DoPutStream>, tonic::Status> {
        unimplemented()
    }
    async fn do_exchange(
        &self,
        _req: tonic::Request<tonic::Streaming<FlightData>>,
    ) -> Result<tonic::Response<Self::DoExchangeStream>, tonic::Status> {
        unimplemented()
    }
    async fn do_action(
        &self,
        _req: tonic::Request<Action>,
    ) -> Result<tonic::Response<Self::DoActionStream>, tonic::Status> {
        unimplemented()
    }
    async fn list_actions(
        &self,
        _req: tonic::Request<Empty>,
    ) -> Result<tonic::Response<Self::ListActionsStream>, tonic::Status> {
        unimplemented()
    }
}

/// Serves on 127.0.0.1:`port` on one thread (as nginx runs one worker)
/// until killed.
pub fn serve(port: u16) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("binding 127.0.0.1:{port}"))?;
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Sink))
            .add_service(FlightServiceServer::new(Batches))
            // As gRPC servers do (grpc-go, grpc-java): without it, Nagle
            // holds a streamed answer's later messages for the client's
            // delayed ACK, 40 ms each.
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await
            .context("gRPC server")
    })
}

/// A unary request as it travels: gRPC's 5-byte frame header, then an
/// export of a few spans (about 400 bytes, a typical small RPC).
pub fn request_body() -> Vec<u8> {
    let spans = (0..4u8)
        .map(|i| Span {
            trace_id: vec![i + 1; 16],
            span_id: vec![i + 1; 8],
            name: format!("GET /reviews/{i}"),
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_001_500_000,
            ..Default::default()
        })
        .collect();
    frame(&ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    })
}

/// The framed `Ticket` every streaming load request sends.
pub fn stream_request_body() -> Vec<u8> {
    frame(&ticket())
}

/// The ticket every `DoGet` carries; the app answers any ticket alike.
fn ticket() -> Ticket {
    Ticket {
        ticket: bytes::Bytes::from_static(b"bench"),
    }
}

/// `message` as it travels: gRPC's 5-byte header (uncompressed, length),
/// then the message.
fn frame(message: &impl prost::Message) -> Vec<u8> {
    let message = message.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    framed
}

/// One `DoGet` through `url` (h2c), its `:authority` `host` when given,
/// with a real Flight client: every message arrived, in order, and the call
/// ended with status OK. The load generator sees only HTTP statuses; this
/// is what proves the stream is relayed whole.
pub fn check_stream(url: &str, host: Option<&str>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())?;
        if let Some(host) = host {
            endpoint = endpoint.origin(format!("http://{host}").parse()?);
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let mut client = arrow_flight::flight_service_client::FlightServiceClient::new(channel);
        let mut stream = client.do_get(ticket()).await?.into_inner();
        let mut n = 0usize;
        while let Some(m) = stream.next().await {
            let m = m.context("DoGet stream")?;
            if m.app_metadata.as_ref() != (n as u32).to_be_bytes()
                || m.data_body.len() != STREAM_MESSAGE_BYTES
            {
                bail!("message {n} of the stream arrived altered");
            }
            n += 1;
        }
        if n != STREAM_MESSAGES {
            bail!("the stream ended after {n} of {STREAM_MESSAGES} messages");
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_one_uncompressed_grpc_frame_of_an_export() {
        let body = request_body();
        assert_eq!(body[0], 0, "not compressed");
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        assert_eq!(len, body.len() - 5);
        let req: ExportTraceServiceRequest = prost::Message::decode(&body[5..]).unwrap();
        assert_eq!(req.resource_spans[0].scope_spans[0].spans.len(), 4);
    }
}
