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

/// Streams both ways through two sidecars, message by message: a server
/// stream (health `Watch`) sees each status change as it happens, a bidi
/// stream (reflection) gets each answer before it sends the next question,
/// and each exchange is one recorded row with its final gRPC status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_flow_message_by_message_and_are_recorded() -> Result<()> {
    use futures_util::StreamExt;
    use tonic_health::ServingStatus;
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("ratings", ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let (fe, be) = (SidecarPorts::pick(), SidecarPorts::pick());
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("grpcapp", 50051, &[(local(be.inbound), "v1")])])?;
    let up_ports = UpPorts::pick();
    let _up = start_up(logs, &mesh, &dir.path().join("data"), up_ports, &[]).await?;
    let collector = up_ports.grpc_endpoint();
    let _fe = start_sidecar(logs, "client", "v1", &mesh, fe, None, &collector).await?;
    let _be = start_sidecar(logs, "grpcapp", "v1", &mesh, be, Some(app_addr), &collector).await?;
    let channel = tonic::transport::Endpoint::from_static("http://grpcapp:50051")
        .connect_with_connector(DialSidecar(local(fe.outbound)))
        .await?;
    let next_within = std::time::Duration::from_secs(10);

    // Server streaming: each change arrives while the stream stays open.
    let mut health_client = HealthClient::new(channel.clone());
    let watch = HealthCheckRequest {
        service: "ratings".into(),
    };
    let mut statuses = health_client.watch(watch).await?.into_inner();
    let first = tokio::time::timeout(next_within, statuses.message()).await??;
    assert_eq!(first.map(|r| r.status()), Some(Wire::Serving));
    reporter
        .set_service_status("ratings", ServingStatus::NotServing)
        .await;
    let second = tokio::time::timeout(next_within, statuses.message()).await??;
    assert_eq!(second.map(|r| r.status()), Some(Wire::NotServing));
    drop(statuses);

    // A unary error status through the same channel.
    let err = health_client
        .check(HealthCheckRequest {
            service: "nosuch".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");

    // Bidirectional: a question, its answer, then the next question.
    let (questions, rx) = tokio::sync::mpsc::channel::<ServerReflectionRequest>(1);
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|q| (q, rx)) });
    let mut reflection_client = ServerReflectionClient::new(channel);
    questions
        .send(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        })
        .await?;
    let mut answers = reflection_client
        .server_reflection_info(outgoing)
        .await?
        .into_inner();
    let listed = tokio::time::timeout(next_within, answers.message())
        .await??
        .and_then(|a: ServerReflectionResponse| a.message_response);
    let Some(MessageResponse::ListServicesResponse(listed)) = listed else {
        anyhow::bail!("expected a service list, got {listed:?}");
    };
    let names: Vec<_> = listed.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    questions
        .send(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "grpc.health.v1.Health".into(),
            )),
        })
        .await?;
    let file = tokio::time::timeout(next_within, answers.message())
        .await??
        .and_then(|a| a.message_response);
    assert!(
        matches!(file, Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
        "{file:?}"
    );
    // Closing our side ends the exchange with OK.
    drop(questions);
    assert!(
        tokio::time::timeout(next_within, answers.next())
            .await?
            .is_none()
    );

    let url = up_ports.sql_url();
    let bidi = "SELECT count(*) AS n FROM requests WHERE protocol = 'grpc' AND grpc_status = 0 \
         AND path = '/grpc.reflection.v1.ServerReflection/ServerReflectionInfo' \
         AND request_bytes > 0 AND response_bytes > 0";
    assert_eq!(wait_for_count(&url, bidi, 2).await?, 2, "one row per side");
    let not_found = "SELECT count(*) AS n FROM requests WHERE protocol = 'grpc' AND grpc_status = 5 \
         AND path = '/grpc.health.v1.Health/Check'";
    assert_eq!(wait_for_count(&url, not_found, 2).await?, 2);
    // The watch the client gave up on is recorded too, once per side, as
    // the downstream's doing.
    let watched = "SELECT count(*) AS n FROM requests WHERE protocol = 'grpc' \
         AND path = '/grpc.health.v1.Health/Watch' AND response_bytes > 0";
    assert_eq!(wait_for_count(&url, watched, 2).await?, 2);
    Ok(())
}
