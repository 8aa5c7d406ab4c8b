//! gRPC (HTTP/2 with trailers) through two sidecars: the status in the
//! trailers — or in the headers of a trailers-only error — is recorded.

use anyhow::Result;
use lumen_tests::{
    DialSidecar, SidecarPorts, UpPorts, h2_client_via, local, start_sidecar, start_up,
    wait_for_count, write_mesh,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use tonic::{Request, Response, Status};

/// A gRPC app: empty exports fail with UNAVAILABLE, others succeed.
struct App;

#[tonic::async_trait]
impl TraceService for App {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        match req.get_ref().resource_spans.len() {
            0 => return Err(Status::unavailable("nothing to export")),
            // Slower than the deadline the test sets.
            2 => tokio::time::sleep(std::time::Duration::from_secs(3)).await,
            _ => {}
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_recorded_with_their_grpc_status() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(App))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let (fe, be) = (SidecarPorts::pick(), SidecarPorts::pick());
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("tracer", 4317, &[(local(be.inbound), "v1")])])?;
    let up_ports = UpPorts::pick();
    let _up = start_up(logs, &mesh, &dir.path().join("data"), up_ports, &[]).await?;
    let collector = up_ports.grpc_endpoint();
    let _fe = start_sidecar(logs, "client", "v1", &mesh, fe, None, &collector).await?;
    let _be = start_sidecar(logs, "tracer", "v1", &mesh, be, Some(app_addr), &collector).await?;

    // The channel names the service in :authority and dials the sidecar.
    let channel = tonic::transport::Endpoint::from_static("http://tracer:4317")
        .connect_with_connector(DialSidecar(local(fe.outbound)))
        .await?;
    let mut client = TraceServiceClient::new(channel);
    let (ok, failed) = (rand::random_range(2..=10i64), rand::random_range(1..=5i64));
    for _ in 0..ok {
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans::default()],
        };
        client.export(req).await?;
    }
    for _ in 0..failed {
        let err = client
            .export(ExportTraceServiceRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert_eq!(err.message(), "nothing to export");
    }

    // The caller's deadline (`grpc-timeout`) is the proxy's too: past it,
    // DEADLINE_EXCEEDED, the gRPC way, while the app is still busy.
    // (A raw HTTP/2 client: tonic would enforce the deadline itself.)
    let message = prost::Message::encode_to_vec(&ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans::default(), ResourceSpans::default()],
    });
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let slow = http::Request::post(
        "http://tracer:4317/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    )
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", "300m")
    .body(http_body_util::Full::new(bytes::Bytes::from(framed)))?;
    let resp = h2_client_via(local(fe.outbound)).request(slow).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "4", "{:?}", resp.headers());
    // No such service: UNIMPLEMENTED, not an HTTP 404 the client cannot read.
    let channel = tonic::transport::Endpoint::from_static("http://nosuch:4317")
        .connect_with_connector(DialSidecar(local(fe.outbound)))
        .await?;
    let err = TraceServiceClient::new(channel)
        .export(ExportTraceServiceRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
    assert!(err.message().contains("nosuch"), "{err}");

    let url = up_ports.sql_url();
    let deadline = "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND protocol = 'grpc' \
         AND status = 200 AND grpc_status = 4 AND response_flags = 'UT'";
    assert_eq!(wait_for_count(&url, deadline, 1).await?, 1);
    let unknown = "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND protocol = 'grpc' \
         AND grpc_status = 12 AND response_flags = 'NR' AND destination_service = 'nosuch'";
    assert_eq!(wait_for_count(&url, unknown, 1).await?, 1);
    let base = "SELECT count(*) AS n FROM requests WHERE protocol = 'grpc' AND status = 200 \
         AND destination_service = 'tracer' \
         AND path = '/opentelemetry.proto.collector.trace.v1.TraceService/Export'";
    // UNAVAILABLE is retried twice (Istio's default), the request message
    // sent again each time: three tries the app answered, one request.
    for (reporter, tries) in [("source", 1), ("destination", 3)] {
        let q = format!("{base} AND reporter = '{reporter}' AND grpc_status = 0");
        assert_eq!(wait_for_count(&url, &q, ok).await?, ok, "{reporter}");
        let q = format!("{base} AND reporter = '{reporter}' AND grpc_status = 14");
        assert_eq!(
            wait_for_count(&url, &q, tries * failed).await?,
            tries * failed,
            "{reporter}"
        );
    }
    let q = format!(
        "{base} AND reporter = 'source' AND grpc_status = 14 AND retries = 2 AND response_flags = 'URX'"
    );
    assert_eq!(wait_for_count(&url, &q, failed).await?, failed);
    Ok(())
}
