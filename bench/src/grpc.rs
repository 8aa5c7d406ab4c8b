//! The gRPC case of the proxy benchmark: a minimal gRPC app as the
//! upstream (OTLP's trace service, answering each export at once), and the
//! one framed request every load request sends.

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

/// The method every load request calls.
pub const PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

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
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
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
    let message = prost::Message::encode_to_vec(&ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    });
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    framed
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
